//! The queue state machine of one shard: deterministic, no async, no I/O, no
//! clock, no randomness. Time, jitter and session ids come in as data stamped
//! by the leader, so every replica that applies the same log reaches the same
//! state, bit for bit.
//!
//! It must not depend on tokio, tonic, openraft or the protobuf types.

pub mod command;
pub mod config;
pub mod ids;
pub mod job;
pub mod payload;
pub mod snapshot;
pub mod state;
pub mod tally;

#[cfg(test)]
mod invariants;
#[cfg(test)]
mod state_test;

pub use command::{
    Applied, Assignment, Batch, Command, Event, ExpiryReason, NewJob, PurgeCursor, Rejection, RetryRequest,
};
pub use config::{QueueConfig, QueueConfigUpdate};
pub use ids::{FencingToken, JobId, SessionId, ShardId};
pub use job::{AttemptRecord, Job, JobMore, JobState, JobView, More, Outcome, Status};
pub use payload::{Payload, PayloadFile, PayloadReadError};
pub use state::{ApplyOutput, ExpiredSession, QueueParts, QueueState, Session, SessionParts, StateParts};
pub use tally::{QueueTally, Tally};
