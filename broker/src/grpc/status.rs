//! The one mapping from broker errors and rejections to `tonic::Status`.

use tonic::{Status, metadata::MetadataValue};

use crate::{
    dispatch::ShardNode,
    queue::Rejection,
    raft::{MembershipError, ProposeError},
};

/// Metadata key that names the leader's address on UNAVAILABLE.
pub const LEADER_METADATA: &str = "gantry-leader";
/// Set to `unknown` on a status the broker sends when it cannot tell whether
/// the call was applied (a forwarded call whose answer was lost): clients
/// may send it again only if that is harmless (reads, keyed enqueues).
pub const OUTCOME_METADATA: &str = "gantry-outcome";

/// Names the shard's leader in `gantry-leader` when another node leads it,
/// so clients that can go direct (the SDK learns it per queue) do next time.
pub fn hint_leader<T>(shard: &ShardNode, mut response: tonic::Response<T>) -> tonic::Response<T> {
    // Most calls reach the leader: no addresses copied for them.
    if shard.raft.is_leader() {
        return response;
    }
    if let Some((_, leader)) = shard.raft.leader().filter(|(id, _)| *id != shard.node_id)
        && let Ok(value) = MetadataValue::try_from(leader.client)
    {
        response.metadata_mut().insert(LEADER_METADATA, value);
    }
    response
}

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
        // No hint: a leader this node cannot reach is likely gone, and
        // clients would only waste a try on it.
        ProposeError::LeaderUnreachable { shard, leader, message } => Status::unavailable(format!(
            "node {leader}, the leader of shard {shard}, did not take the call ({message}); retry shortly"
        )),
        ProposeError::OutcomeUnknown { shard, leader, message } => {
            // UNAVAILABLE would tell clients to send it again, which for an
            // enqueue without an idempotency key makes a second job if the
            // first was committed.
            tracing::debug!(%shard, leader, %message, "answer of the leader lost");
            let mut status = Status::unknown(format!(
                "shard {shard}: node {leader}, its leader, cannot say whether the call was applied ({message}); it \
                 may or may not have been"
            ));
            status.metadata_mut().insert(OUTCOME_METADATA, MetadataValue::from_static("unknown"));
            status
        }
        ProposeError::Lagging { shard, index } => Status::unavailable(format!(
            "this node has not caught up with shard {shard}'s leader (index {index}) in time; retry, or ask another node"
        )),
        ProposeError::Fenced { shard, reason } => Status::unavailable(format!(
            "this node's copy of shard {shard} is fenced and serves no reads until it is whole again ({reason}); \
             ask another node"
        )),
    }
}

pub fn rejection(rejection: Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::JobNotFound(_) | Rejection::SessionNotFound(_) | Rejection::QueueNotFound(_) => {
            Status::not_found(message)
        }
        Rejection::QueueFull { .. } => Status::resource_exhausted(message),
        Rejection::StaleLease { .. }
        | Rejection::NotFailed { .. }
        | Rejection::AlreadyTerminal { .. }
        | Rejection::FormatTooLow { .. }
        | Rejection::QueueNotEmpty { .. } => Status::failed_precondition(message),
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
        // A membership change may always be asked again: a member it added
        // is kept, a node it removed is skipped.
        MembershipError::Propose(ProposeError::OutcomeUnknown { shard, leader, message }) => {
            Status::unavailable(format!(
                "shard {shard}: node {leader}, its leader, cannot say whether the change was made ({message}); \
                 ask again"
            ))
        }
        MembershipError::Propose(e) => propose_error(e),
        MembershipError::Refused(message) => Status::failed_precondition(message),
    }
}

/// A job's payload on this node's disk could not be read back. The log and
/// snapshots still hold it: a restart of the node rebuilds its payload files.
pub fn payload_unreadable(job_id: crate::queue::JobId, error: &crate::queue::PayloadReadError) -> Status {
    Status::internal(format!(
        "job {job_id}: its payload could not be read from this node's disk ({error}); the replicated log still \
         holds it: restarting this node rebuilds its payload files"
    ))
}
