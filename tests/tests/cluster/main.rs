//! Cluster tests: several brokers replicating through Raft. `replication`
//! runs nodes inside the test process; `processes` runs the real binary and
//! kills, stops and restarts it.

mod membership;
mod replication;
