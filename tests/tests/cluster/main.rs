//! Cluster tests: several brokers replicating through Raft. `replication`
//! runs nodes inside the test process; `processes` runs the real binary and
//! kills, stops and restarts it.

mod admin_guide;
mod dev;
mod fixtures;
mod formats;
mod integrity;
mod membership;
mod processes;
mod replication;
mod shards;
mod storage_faults;
mod tls;
mod upgrades;
