//! Gantry's openraft type configuration: one log entry is one `Batch` of
//! queue commands, and its response is the outcome of each command. A
//! member of a group is known by two addresses.

use serde::{Deserialize, Serialize};

use crate::queue::{Applied, Batch};

/// The outcomes of a batch's commands, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchResponse(pub Vec<Applied>);

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "batch of {} commands at {} ms", self.commands.len(), self.proposed_at_ms)
    }
}

/// A cluster member as the membership records it. Replicated, so every
/// node can name any leader to clients (`client`) and reach it (`peer`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GantryNode {
    /// What producers and workers dial (`--advertise`).
    pub client: String,
    /// Raft traffic and forwarded calls (`--peer-advertise`).
    pub peer: String,
}

impl std::fmt::Display for GantryNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {} peer {}", self.client, self.peer)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        Node = GantryNode,
);

pub type GantryRaft = openraft::Raft<TypeConfig, super::state_machine::StateMachineStore>;
