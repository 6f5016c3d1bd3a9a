//! Gantry's openraft type configuration: one log entry is one `Batch` of
//! queue commands, and its response is the outcome of each command.

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

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
);

pub type GantryRaft = openraft::Raft<TypeConfig, super::state_machine::StateMachineStore>;
