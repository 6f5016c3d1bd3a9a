//! Gantry broker: a replicated job broker.
//!
//! ```text
//! grpc/      tonic services (Jobs, Worker, Admin): the edge; only place with protobuf types
//!   └─> dispatch/  leader memory per shard: proposer (group commit), session registry,
//!        │          dispatcher loop, WaitJob waiters
//!        └─> raft/  openraft glue: raft-engine log store, state-machine adapter, network
//!             └─> queue/  the pure state machine: no async, no I/O, no clock, no RNG
//! server.rs  wiring: storage, shards, services, health, reflection, shutdown
//! metrics/   /metrics, /healthz, /readyz over HTTP; counters fed from applied tallies
//! security/  TLS files and bearer tokens (checked on the client port by grpc/auth.rs)
//! cli/       the `gantry` subcommands other than `serve`, and `gantry bench`
//! ```
//!
//! Invariants: the queue state changes only by applying committed log
//! entries; time enters it only as the leader's stamp on each entry; a job is
//! handed to a worker only after the entry that assigned it is committed; a
//! result counts only with the job's current fencing token.

pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod format;
pub mod grpc;
pub mod metrics;
pub mod queue;
pub mod raft;
pub mod security;
pub mod server;
