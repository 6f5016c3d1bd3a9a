//! ShardService from shard format 1 on: commands, their outcomes, read
//! indexes, membership changes and live sessions as `gantry.peer.v1`
//! messages. At format 0 they are postcard, the only encoding builds before
//! format gates read; the caller picks by the shard's format and the callee
//! answers in kind (docs/compatibility.md).

use std::sync::Arc;

use gantry_proto::{peer as pb, storage as st};

use super::{proposer::Committed, registry::LiveInfo, route::ShardChange};
use crate::{
    format::storage::{
        DecodeError, command_from_pb, command_to_pb, cursor_from_pb, cursor_to_pb, job_from_pb, job_id_from_pb,
        job_id_to_pb, job_state_from_pb, job_state_to_pb, job_to_pb,
    },
    queue::{Applied, Command, FencingToken, JobView, PayloadReadError, Rejection, SessionId, ShardId},
    raft::{GantryNode, MembershipError, ProposeError},
};

type Result<T> = std::result::Result<T, DecodeError>;

fn required<T>(value: Option<T>, what: &'static str) -> Result<T> {
    value.ok_or(DecodeError::Missing(what))
}

fn session(id: &str) -> SessionId {
    SessionId(id.into())
}

pub fn commands_to_pb(commands: &[Command]) -> pb::Commands {
    pb::Commands { commands: commands.iter().map(command_to_pb).collect() }
}

pub fn commands_from_pb(commands: pb::Commands) -> Result<Vec<Command>> {
    commands.commands.into_iter().map(command_from_pb).collect()
}

fn lost_to_pb(lost: &[(crate::queue::JobId, FencingToken)]) -> Vec<st::LostLease> {
    lost.iter().map(|(id, token)| st::LostLease { job_id: job_id_to_pb(*id), token: token.0 }).collect()
}

fn rejection_to_pb(rejection: &Rejection) -> pb::Rejection {
    use pb::rejection::Kind as K;
    let kind = match rejection {
        Rejection::JobNotFound(id) => K::JobNotFound(job_id_to_pb(*id).unwrap_or_default()),
        Rejection::StaleLease { job_id, token } => {
            K::StaleLease(st::LostLease { job_id: job_id_to_pb(*job_id), token: token.0 })
        }
        Rejection::QueueFull { queue, max_depth } => {
            K::QueueFull(pb::QueueFull { queue: queue.clone(), max_depth: *max_depth })
        }
        Rejection::NotFailed { job_id, state } => {
            K::NotFailed(pb::JobInState { job_id: job_id_to_pb(*job_id), state: job_state_to_pb(*state) })
        }
        Rejection::AlreadyTerminal { job_id, state } => {
            K::AlreadyTerminal(pb::JobInState { job_id: job_id_to_pb(*job_id), state: job_state_to_pb(*state) })
        }
        Rejection::SessionNotFound(id) => K::SessionNotFound(id.to_string()),
        Rejection::CannotPurge(state) => K::CannotPurge(job_state_to_pb(*state)),
        Rejection::FormatTooLow { feature, needs, shard_format } => {
            K::FormatTooLow(pb::FormatTooLow { feature: feature.clone(), needs: *needs, shard_format: *shard_format })
        }
        Rejection::QueueNotFound(queue) => K::QueueNotFound(queue.clone()),
        Rejection::QueueNotEmpty { queue, jobs } => {
            K::QueueNotEmpty(pb::QueueNotEmpty { queue: queue.clone(), jobs: *jobs })
        }
    };
    pb::Rejection { kind: Some(kind) }
}

fn rejection_from_pb(rejection: pb::Rejection) -> Result<Rejection> {
    use pb::rejection::Kind as K;
    Ok(match required(rejection.kind, "rejection (a kind this gantry does not know?)")? {
        K::JobNotFound(id) => Rejection::JobNotFound(job_id_from_pb(Some(id), "job_id")?),
        K::StaleLease(l) => {
            Rejection::StaleLease { job_id: job_id_from_pb(l.job_id, "job_id")?, token: FencingToken(l.token) }
        }
        K::QueueFull(q) => Rejection::QueueFull { queue: q.queue, max_depth: q.max_depth },
        K::NotFailed(j) => {
            Rejection::NotFailed { job_id: job_id_from_pb(j.job_id, "job_id")?, state: job_state_from_pb(j.state)? }
        }
        K::AlreadyTerminal(j) => Rejection::AlreadyTerminal {
            job_id: job_id_from_pb(j.job_id, "job_id")?,
            state: job_state_from_pb(j.state)?,
        },
        K::SessionNotFound(id) => Rejection::SessionNotFound(session(&id)),
        K::CannotPurge(state) => Rejection::CannotPurge(job_state_from_pb(state)?),
        K::FormatTooLow(f) => {
            Rejection::FormatTooLow { feature: f.feature, needs: f.needs, shard_format: f.shard_format }
        }
        K::QueueNotFound(queue) => Rejection::QueueNotFound(queue),
        K::QueueNotEmpty(q) => Rejection::QueueNotEmpty { queue: q.queue, jobs: q.jobs },
    })
}

fn applied_to_pb(applied: &Applied) -> std::result::Result<pb::Applied, PayloadReadError> {
    use pb::applied::Kind as K;
    let kind = match applied {
        Applied::Enqueued { job_id, created, state } => K::Enqueued(pb::Enqueued {
            job_id: job_id_to_pb(*job_id),
            created: *created,
            state: job_state_to_pb(*state),
        }),
        Applied::SessionOpened { session_id, resumed, lost } => K::SessionOpened(pb::SessionOpened {
            session_id: session_id.to_string(),
            resumed: *resumed,
            lost: lost_to_pb(lost),
        }),
        Applied::Dispatched { assigned } => K::Dispatched(*assigned),
        Applied::Accepted { lease_deadline_ms } => K::Accepted(pb::Accepted { lease_deadline_ms: *lease_deadline_ms }),
        Applied::SessionExpired { released } => K::SessionExpired(*released),
        Applied::SessionDrained => K::SessionDrained(Default::default()),
        Applied::Job(view) => {
            K::Job(pb::AppliedJob { state: job_state_to_pb(view.state), job: Some(job_to_pb(&view.job)?) })
        }
        Applied::Purged { count } => K::Purged(*count),
        Applied::PurgedPart { count, below_seq, through, next } => K::PurgedPart(pb::PurgedPart {
            count: *count,
            below_seq: *below_seq,
            through: cursor_to_pb(through),
            next: cursor_to_pb(next),
        }),
        Applied::QueueUpdated => K::QueueUpdated(Default::default()),
        Applied::Ticked => K::Ticked(Default::default()),
        Applied::Rejected(rejection) => K::Rejected(rejection_to_pb(rejection)),
        Applied::FormatSet { format } => K::FormatSet(*format),
        Applied::QueueDeleted => K::QueueDeleted(Default::default()),
    };
    Ok(pb::Applied { kind: Some(kind) })
}

fn applied_from_pb(applied: pb::Applied) -> Result<Applied> {
    use pb::applied::Kind as K;
    Ok(match required(applied.kind, "outcome (a kind this gantry does not know?)")? {
        K::Enqueued(e) => Applied::Enqueued {
            job_id: job_id_from_pb(e.job_id, "job_id")?,
            created: e.created,
            state: job_state_from_pb(e.state)?,
        },
        K::SessionOpened(s) => Applied::SessionOpened {
            session_id: session(&s.session_id),
            resumed: s.resumed,
            lost: s
                .lost
                .into_iter()
                .map(|l| Ok((job_id_from_pb(l.job_id, "lost job_id")?, FencingToken(l.token))))
                .collect::<Result<_>>()?,
        },
        K::Dispatched(assigned) => Applied::Dispatched { assigned },
        K::Accepted(a) => Applied::Accepted { lease_deadline_ms: a.lease_deadline_ms },
        K::SessionExpired(released) => Applied::SessionExpired { released },
        K::SessionDrained(_) => Applied::SessionDrained,
        K::Job(j) => Applied::Job(Box::new(JobView {
            state: job_state_from_pb(j.state)?,
            job: Arc::new(job_from_pb(required(j.job, "job")?)?),
        })),
        K::Purged(count) => Applied::Purged { count },
        K::PurgedPart(p) => Applied::PurgedPart {
            count: p.count,
            below_seq: p.below_seq,
            through: cursor_from_pb(p.through)?,
            next: cursor_from_pb(p.next)?,
        },
        K::QueueUpdated(_) => Applied::QueueUpdated,
        K::Ticked(_) => Applied::Ticked,
        K::Rejected(r) => Applied::Rejected(rejection_from_pb(r)?),
        K::FormatSet(format) => Applied::FormatSet { format },
        K::QueueDeleted(_) => Applied::QueueDeleted,
    })
}

pub fn failure_to_pb(error: &ProposeError) -> pb::ProposeFailure {
    use pb::propose_failure::Kind as K;
    let (shard, kind) = match error {
        ProposeError::NotLeader { shard, leader } => (
            shard,
            K::NotLeader(pb::NotLeader {
                leader_id: leader.as_ref().map_or(0, |(id, _)| *id),
                leader_address: leader.as_ref().map(|(_, a)| a.clone()).unwrap_or_default(),
            }),
        ),
        ProposeError::NoQuorum { shard, message } => (shard, K::NoQuorum(message.clone())),
        ProposeError::Stopped { shard, message } => (shard, K::Stopped(message.clone())),
        ProposeError::LeaderUnreachable { shard, leader, message } => {
            (shard, K::LeaderUnreachable(pb::LeaderCall { leader: *leader, message: message.clone() }))
        }
        ProposeError::OutcomeUnknown { shard, leader, message } => {
            (shard, K::OutcomeUnknown(pb::LeaderCall { leader: *leader, message: message.clone() }))
        }
        ProposeError::Lagging { shard, index } => (shard, K::Lagging(*index)),
        ProposeError::Fenced { shard, reason } => (shard, K::Fenced(reason.clone())),
    };
    pb::ProposeFailure { shard: shard.0, kind: Some(kind) }
}

pub fn failure_from_pb(failure: pb::ProposeFailure) -> Result<ProposeError> {
    use pb::propose_failure::Kind as K;
    let shard = ShardId(failure.shard);
    Ok(match required(failure.kind, "failure (a kind this gantry does not know?)")? {
        K::NotLeader(n) => {
            ProposeError::NotLeader { shard, leader: (n.leader_id != 0).then_some((n.leader_id, n.leader_address)) }
        }
        K::NoQuorum(message) => ProposeError::NoQuorum { shard, message },
        K::Stopped(message) => ProposeError::Stopped { shard, message },
        K::LeaderUnreachable(c) => ProposeError::LeaderUnreachable { shard, leader: c.leader, message: c.message },
        K::OutcomeUnknown(c) => ProposeError::OutcomeUnknown { shard, leader: c.leader, message: c.message },
        K::Lagging(index) => ProposeError::Lagging { shard, index },
        K::Fenced(reason) => ProposeError::Fenced { shard, reason },
    })
}

/// Fails only if a job in the results has its payload on this node's disk
/// and it cannot be read back.
pub fn propose_outcome_to_pb(
    outcome: &std::result::Result<Committed, ProposeError>,
) -> std::result::Result<pb::ProposeOutcome, PayloadReadError> {
    use pb::propose_outcome::Result as R;
    let result = match outcome {
        Ok(committed) => R::Committed(pb::Committed {
            index: committed.index,
            results: committed.results.iter().map(applied_to_pb).collect::<std::result::Result<_, _>>()?,
        }),
        Err(e) => R::Failure(failure_to_pb(e)),
    };
    Ok(pb::ProposeOutcome { result: Some(result) })
}

pub fn propose_outcome_from_pb(outcome: pb::ProposeOutcome) -> Result<std::result::Result<Committed, ProposeError>> {
    use pb::propose_outcome::Result as R;
    Ok(match required(outcome.result, "propose outcome")? {
        R::Committed(c) => Ok(Committed {
            index: c.index,
            results: c.results.into_iter().map(applied_from_pb).collect::<Result<_>>()?,
        }),
        R::Failure(f) => Err(failure_from_pb(f)?),
    })
}

pub fn read_index_to_pb(outcome: &std::result::Result<u64, ProposeError>) -> pb::ReadIndexOutcome {
    use pb::read_index_outcome::Result as R;
    pb::ReadIndexOutcome {
        result: Some(match outcome {
            Ok(index) => R::Index(*index),
            Err(e) => R::Failure(failure_to_pb(e)),
        }),
    }
}

pub fn read_index_from_pb(outcome: pb::ReadIndexOutcome) -> Result<std::result::Result<u64, ProposeError>> {
    use pb::read_index_outcome::Result as R;
    Ok(match required(outcome.result, "read index outcome")? {
        R::Index(index) => Ok(index),
        R::Failure(f) => Err(failure_from_pb(f)?),
    })
}

pub fn change_to_pb(change: &ShardChange) -> pb::ShardChange {
    use pb::shard_change::Kind as K;
    let member = |node_id: u64, node: &GantryNode| pb::NewMember {
        node_id,
        node: Some(st::Member { client: node.client.clone(), peer: node.peer.clone() }),
    };
    let kind = match change {
        ShardChange::AddLearner { node_id, node } => K::AddLearner(member(*node_id, node)),
        ShardChange::AddVoter { node_id, node } => K::AddVoter(member(*node_id, node)),
        ShardChange::Remove { node_id } => K::Remove(*node_id),
        ShardChange::TransferLeader { to } => K::TransferLeader(*to),
    };
    pb::ShardChange { kind: Some(kind) }
}

pub fn change_from_pb(change: pb::ShardChange) -> Result<ShardChange> {
    use pb::shard_change::Kind as K;
    let member = |m: pb::NewMember| -> Result<(u64, GantryNode)> {
        let node = required(m.node, "node")?;
        Ok((m.node_id, GantryNode { client: node.client, peer: node.peer }))
    };
    Ok(match required(change.kind, "change (a kind this gantry does not know?)")? {
        K::AddLearner(m) => {
            let (node_id, node) = member(m)?;
            ShardChange::AddLearner { node_id, node }
        }
        K::AddVoter(m) => {
            let (node_id, node) = member(m)?;
            ShardChange::AddVoter { node_id, node }
        }
        K::Remove(node_id) => ShardChange::Remove { node_id },
        K::TransferLeader(to) => ShardChange::TransferLeader { to },
    })
}

pub fn change_outcome_to_pb(outcome: &std::result::Result<(), MembershipError>) -> pb::ChangeOutcome {
    use pb::change_outcome::Result as R;
    pb::ChangeOutcome {
        result: Some(match outcome {
            Ok(()) => R::Done(Default::default()),
            Err(MembershipError::Propose(e)) => R::Failure(failure_to_pb(e)),
            Err(MembershipError::Refused(why)) => R::Refused(why.clone()),
        }),
    }
}

pub fn change_outcome_from_pb(outcome: pb::ChangeOutcome) -> Result<std::result::Result<(), MembershipError>> {
    use pb::change_outcome::Result as R;
    Ok(match required(outcome.result, "change outcome")? {
        R::Done(_) => Ok(()),
        R::Failure(f) => Err(MembershipError::Propose(failure_from_pb(f)?)),
        R::Refused(why) => Err(MembershipError::Refused(why)),
    })
}

pub fn live_to_pb(outcome: &std::result::Result<Vec<LiveInfo>, ProposeError>) -> pb::LiveSessionsOutcome {
    use pb::live_sessions_outcome::Result as R;
    pb::LiveSessionsOutcome {
        result: Some(match outcome {
            Ok(sessions) => R::Sessions(pb::LiveSessionList {
                sessions: sessions
                    .iter()
                    .map(|s| pb::LiveSession {
                        session_id: s.session_id.to_string(),
                        last_seen_age_ms: s.last_seen_age.as_millis() as u64,
                        connected: s.connected,
                    })
                    .collect(),
            }),
            Err(e) => R::Failure(failure_to_pb(e)),
        }),
    }
}

pub fn live_from_pb(outcome: pb::LiveSessionsOutcome) -> Result<std::result::Result<Vec<LiveInfo>, ProposeError>> {
    use pb::live_sessions_outcome::Result as R;
    Ok(match required(outcome.result, "live sessions outcome")? {
        R::Sessions(list) => Ok(list
            .sessions
            .into_iter()
            .map(|s| LiveInfo {
                session_id: session(&s.session_id),
                last_seen_age: std::time::Duration::from_millis(s.last_seen_age_ms),
                connected: s.connected,
            })
            .collect()),
        R::Failure(f) => Err(failure_from_pb(f)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Job, JobId, JobState, PurgeCursor, QueueState};

    fn job_id(seq: u64) -> JobId {
        JobId { shard: ShardId(1), seq }
    }

    /// Every outcome, failure, change and session list survives the
    /// format-1 wire unchanged.
    #[test]
    fn outcomes_round_trip() {
        let mut state = QueueState::new(ShardId(1));
        let enqueue = crate::queue::Batch {
            proposed_at_ms: 5,
            commands: vec![Command::Enqueue(crate::queue::NewJob::new("q", b"p".to_vec()))].into(),
        };
        state.apply(1, &enqueue);
        let job: Arc<Job> = state.jobs().values().next().expect("a job").clone();
        let rejections = vec![
            Rejection::JobNotFound(job_id(1)),
            Rejection::StaleLease { job_id: job_id(2), token: FencingToken(7) },
            Rejection::QueueFull { queue: "q".into(), max_depth: 9 },
            Rejection::NotFailed { job_id: job_id(3), state: JobState::Ready },
            Rejection::AlreadyTerminal { job_id: job_id(4), state: JobState::Cancelled },
            Rejection::SessionNotFound(session("s")),
            Rejection::CannotPurge(JobState::Active),
            Rejection::FormatTooLow { feature: "DeleteQueue".into(), needs: 1, shard_format: 0 },
            Rejection::QueueNotFound("gone".into()),
            Rejection::QueueNotEmpty { queue: "q".into(), jobs: 3 },
        ];
        let mut results = vec![
            Applied::Enqueued { job_id: job_id(1), created: true, state: JobState::Scheduled },
            Applied::SessionOpened {
                session_id: session("s"),
                resumed: false,
                lost: vec![(job_id(2), FencingToken(3))],
            },
            Applied::Dispatched { assigned: 4 },
            Applied::Accepted { lease_deadline_ms: Some(99) },
            Applied::Accepted { lease_deadline_ms: None },
            Applied::SessionExpired { released: 2 },
            Applied::SessionDrained,
            Applied::Job(Box::new(JobView { state: JobState::Ready, job })),
            Applied::Purged { count: 8 },
            Applied::PurgedPart {
                count: 1,
                below_seq: 2,
                through: Some(PurgeCursor::Retained { until_ms: 3, job_id: job_id(4) }),
                next: None,
            },
            Applied::QueueUpdated,
            Applied::Ticked,
            Applied::FormatSet { format: 1 },
            Applied::QueueDeleted,
        ];
        results.extend(rejections.into_iter().map(Applied::Rejected));
        let committed: std::result::Result<Committed, ProposeError> = Ok(Committed { index: 42, results });
        let back = propose_outcome_from_pb(propose_outcome_to_pb(&committed).unwrap()).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{committed:?}"));
        for failure in [
            ProposeError::NotLeader { shard: ShardId(1), leader: Some((2, "h:1".into())) },
            ProposeError::NotLeader { shard: ShardId(1), leader: None },
            ProposeError::NoQuorum { shard: ShardId(1), message: "m".into() },
            ProposeError::Stopped { shard: ShardId(1), message: "m".into() },
            ProposeError::LeaderUnreachable { shard: ShardId(1), leader: 3, message: "m".into() },
            ProposeError::OutcomeUnknown { shard: ShardId(1), leader: 3, message: "m".into() },
            ProposeError::Lagging { shard: ShardId(1), index: 5 },
            ProposeError::Fenced { shard: ShardId(1), reason: "r".into() },
        ] {
            let back = failure_from_pb(failure_to_pb(&failure)).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{failure:?}"));
        }
        let node = GantryNode { client: "c:1".into(), peer: "p:2".into() };
        for change in [
            ShardChange::AddLearner { node_id: 4, node: node.clone() },
            ShardChange::AddVoter { node_id: 4, node },
            ShardChange::Remove { node_id: 4 },
            ShardChange::TransferLeader { to: 2 },
        ] {
            let back = change_from_pb(change_to_pb(&change)).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{change:?}"));
        }
        for outcome in [Ok(()), Err(MembershipError::Refused("no".into()))] {
            let back = change_outcome_from_pb(change_outcome_to_pb(&outcome)).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{outcome:?}"));
        }
        let live: std::result::Result<Vec<LiveInfo>, ProposeError> = Ok(vec![LiveInfo {
            session_id: session("s"),
            last_seen_age: std::time::Duration::from_millis(250),
            connected: true,
        }]);
        assert_eq!(format!("{:?}", live_from_pb(live_to_pb(&live)).unwrap()), format!("{live:?}"));
        let index: std::result::Result<u64, ProposeError> = Ok(17);
        assert_eq!(read_index_from_pb(read_index_to_pb(&index)).unwrap().unwrap(), 17);
        let commands = vec![Command::Tick, Command::DeleteQueue { queue: "q".into() }];
        assert_eq!(commands_from_pb(commands_to_pb(&commands)).unwrap(), commands);
    }
}
