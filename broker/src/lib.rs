pub mod queue;
pub mod raft;
