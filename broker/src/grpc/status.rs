//! The one mapping from broker errors and rejections to `tonic::Status`.

use tonic::{Status, metadata::MetadataValue};

use crate::{
    queue::Rejection,
    raft::{MembershipError, ProposeError},
};

/// Metadata key that names the leader's address on UNAVAILABLE.
pub const LEADER_METADATA: &str = "gantry-leader";
/// Set to `unknown` on a status the broker sends when it cannot tell whether
/// the call was applied (a forwarded call whose answer was lost): clients
/// may send it again only if that is harmless (reads, keyed enqueues).
pub const OUTCOME_METADATA: &str = "gantry-outcome";

pub fn propose_error(error: ProposeError) -> Status {
    match error {
        ProposeError::NotLeader { shard, leader } => {
            let mut status = Status::unavailable(match &leader {
                Some((id, address)) => {
                    format!("this node is not the leader of shard {shard}; node {id} at {address} is")
                }
                None => format!("shard {shard} has no leader right now; retry shortly"),
            });
            if let Some(value) = leader.and_then(|(_, address)| MetadataValue::try_from(address).ok()) {
                status.metadata_mut().insert(LEADER_METADATA, value);
            }
            status
        }
        ProposeError::NoQuorum { shard, message } => {
            Status::unavailable(format!("shard {shard} cannot reach a quorum of its nodes ({message}); retry shortly"))
        }
        ProposeError::Stopped { shard, message } => {
            tracing::warn!(%shard, %message, "proposal failed");
            Status::unavailable(format!("shard {shard} is unavailable (shutting down?)"))
        }
    }
}

pub fn rejection(rejection: Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::JobNotFound(_) | Rejection::SessionNotFound(_) => Status::not_found(message),
        Rejection::QueueFull { .. } => Status::resource_exhausted(message),
        Rejection::StaleLease { .. } | Rejection::NotFailed { .. } | Rejection::AlreadyTerminal { .. } => {
            Status::failed_precondition(message)
        }
        Rejection::CannotPurge(_) => Status::invalid_argument(format!("state: {message}")),
    }
}

/// An outcome the caller's command cannot produce: a bug, reported without
/// leaking internals.
pub fn unexpected(what: &str, applied: &crate::queue::Applied) -> Status {
    tracing::error!(?applied, "unexpected outcome for {what}");
    Status::internal(format!("unexpected outcome for {what}"))
}

pub fn membership_error(error: MembershipError) -> Status {
    match error {
        MembershipError::Propose(e) => propose_error(e),
        MembershipError::Refused(message) => Status::failed_precondition(message),
    }
}
