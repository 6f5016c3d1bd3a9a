//! The format-1 encodings (`gantry.storage.v1`) of what a broker stores and
//! sends: log entries, the log store's metadata, shard states and snapshot
//! files. Format 0 is the postcard encoding of the same Rust types (their
//! serde derives, frozen: a field added later is `#[serde(skip)]`, since it
//! cannot be in use while a shard is at format 0).
//!
//! Decoding refuses what it cannot represent (a missing required field, a
//! command kind or enum value this binary does not know) instead of
//! guessing: a newer binary's data is never half-read.

use std::collections::BTreeMap;

use gantry_proto::storage as pb;
use openraft::{EntryPayload, Membership, StoredMembership, entry::RaftEntry, vote::RaftLeaderId};
use prost::Message;

use crate::queue::{
    AttemptRecord, Batch, Command, ExpiredSession, ExpiryReason, FencingToken, Job, JobId, JobMore, JobState, More,
    NewJob, Outcome, Payload, PayloadReadError, PurgeCursor, QueueConfig, QueueConfigUpdate, QueueParts, QueueState,
    RetryRequest, SessionId, SessionParts, ShardId, StateParts, Status, job::Lease, payload::ReadWindow,
};
use crate::raft::{GantryNode, types::TypeConfig};

type C = TypeConfig;
pub type LogId = openraft::type_config::alias::LogIdOf<C>;
pub type Vote = openraft::type_config::alias::VoteOf<C>;
pub type Entry = openraft::type_config::alias::EntryOf<C>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<C>;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{what}: {value} is not a value this gantry knows (written by a newer one?)")]
    Unknown { what: &'static str, value: i32 },
    #[error("{0}")]
    Invalid(String),
    #[error("writing a restored job's payload to this node's disk: {0}")]
    Spill(std::io::Error),
}

type Result<T> = std::result::Result<T, DecodeError>;

fn required<T>(value: Option<T>, what: &'static str) -> Result<T> {
    value.ok_or(DecodeError::Missing(what))
}

// --- Raft types ----------------------------------------------------------

pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId { term: id.leader_id.term, node_id: id.leader_id.node_id, index: id.index }
}

pub fn log_id_from_pb(id: pb::LogId) -> LogId {
    LogId::new(openraft::vote::leader_id_adv::LeaderId { term: id.term, node_id: id.node_id }, id.index)
}

pub fn vote_to_pb(vote: &Vote) -> pb::Vote {
    pb::Vote { term: vote.leader_id.term, node_id: vote.leader_id.node_id, committed: vote.committed }
}

pub fn vote_from_pb(vote: pb::Vote) -> Vote {
    let leader = <C as openraft::RaftTypeConfig>::LeaderId::new(vote.term, vote.node_id);
    Vote { leader_id: leader, committed: vote.committed }
}

pub fn membership_to_pb(membership: &Membership<u64, GantryNode>) -> pb::Membership {
    pb::Membership {
        configs: membership
            .get_joint_config()
            .iter()
            .map(|voters| pb::VoterSet { voters: voters.iter().copied().collect() })
            .collect(),
        nodes: membership
            .nodes()
            .map(|(id, node)| (*id, pb::Member { client: node.client.clone(), peer: node.peer.clone() }))
            .collect(),
    }
}

pub fn membership_from_pb(membership: pb::Membership) -> Result<Membership<u64, GantryNode>> {
    let configs = membership.configs.into_iter().map(|set| set.voters.into_iter().collect()).collect();
    let nodes: BTreeMap<u64, GantryNode> =
        membership.nodes.into_iter().map(|(id, m)| (id, GantryNode { client: m.client, peer: m.peer })).collect();
    Membership::new(configs, nodes).map_err(|e| DecodeError::Invalid(format!("membership: {e}")))
}

pub fn stored_membership_to_pb(
    stored: &StoredMembership<openraft::vote::leader_id_adv::LeaderId<u64, u64>, u64, GantryNode>,
) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: stored.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(stored.membership())),
    }
}

pub fn stored_membership_from_pb(
    stored: pb::StoredMembership,
) -> Result<StoredMembership<openraft::vote::leader_id_adv::LeaderId<u64, u64>, u64, GantryNode>> {
    let membership = match stored.membership {
        Some(m) => membership_from_pb(m)?,
        None => Membership::default(),
    };
    Ok(StoredMembership::new(stored.log_id.map(log_id_from_pb), membership))
}

pub fn entry_to_pb(entry: &Entry) -> pb::LogEntry {
    use pb::log_entry::Payload;
    let payload = match &entry.payload {
        EntryPayload::Blank => Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(batch) => Payload::Batch(batch_to_pb(batch)),
        EntryPayload::Membership(m) => Payload::Membership(membership_to_pb(m)),
    };
    pb::LogEntry { log_id: Some(log_id_to_pb(&entry.log_id)), payload: Some(payload) }
}

pub fn entry_from_pb(entry: pb::LogEntry) -> Result<Entry> {
    use pb::log_entry::Payload;
    let log_id = log_id_from_pb(required(entry.log_id, "log_id")?);
    let payload = match required(entry.payload, "entry payload (a kind this gantry does not know?)")? {
        Payload::Blank(_) => EntryPayload::Blank,
        Payload::Batch(batch) => EntryPayload::Normal(batch_from_pb(batch)?),
        Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(m)?),
    };
    Ok(Entry::new(log_id, payload))
}

/// The stored bytes of a log entry from format 1 on.
pub fn encode_entry(entry: &Entry, out: &mut Vec<u8>) {
    entry_to_pb(entry).encode(out).expect("a Vec grows as needed");
}

pub fn decode_entry(bytes: &[u8]) -> Result<Entry> {
    entry_from_pb(pb::LogEntry::decode(bytes)?)
}

// --- Commands ------------------------------------------------------------

pub fn batch_to_pb(batch: &Batch) -> pb::Batch {
    pb::Batch { proposed_at_ms: batch.proposed_at_ms, commands: batch.commands.iter().map(command_to_pb).collect() }
}

pub fn batch_from_pb(batch: pb::Batch) -> Result<Batch> {
    let commands = batch.commands.into_iter().map(command_from_pb).collect::<Result<Vec<_>>>()?;
    Ok(Batch { proposed_at_ms: batch.proposed_at_ms, commands: commands.into() })
}

pub fn job_id_to_pb(id: JobId) -> Option<pb::JobId> {
    Some(pb::JobId { shard: id.shard.0, seq: id.seq })
}

pub fn job_id_from_pb(id: Option<pb::JobId>, what: &'static str) -> Result<JobId> {
    let id = required(id, what)?;
    Ok(JobId { shard: ShardId(id.shard), seq: id.seq })
}

fn session(id: &str) -> SessionId {
    SessionId(id.into())
}

pub fn job_state_to_pb(state: JobState) -> i32 {
    (match state {
        JobState::Scheduled => pb::JobState::Scheduled,
        JobState::Ready => pb::JobState::Ready,
        JobState::Active => pb::JobState::Active,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }) as i32
}

pub fn job_state_from_pb(value: i32) -> Result<JobState> {
    Ok(match pb::JobState::try_from(value) {
        Ok(pb::JobState::Scheduled) => JobState::Scheduled,
        Ok(pb::JobState::Ready) => JobState::Ready,
        Ok(pb::JobState::Active) => JobState::Active,
        Ok(pb::JobState::Succeeded) => JobState::Succeeded,
        Ok(pb::JobState::Failed) => JobState::Failed,
        Ok(pb::JobState::Cancelled) => JobState::Cancelled,
        _ => return Err(DecodeError::Unknown { what: "job state", value }),
    })
}

fn reason_to_pb(reason: ExpiryReason) -> i32 {
    (match reason {
        ExpiryReason::Silent => pb::ExpiryReason::Silent,
        ExpiryReason::Admin => pb::ExpiryReason::Admin,
        ExpiryReason::Goodbye => pb::ExpiryReason::Goodbye,
        ExpiryReason::Superseded => pb::ExpiryReason::Superseded,
    }) as i32
}

fn reason_from_pb(value: i32) -> Result<ExpiryReason> {
    Ok(match pb::ExpiryReason::try_from(value) {
        Ok(pb::ExpiryReason::Silent) => ExpiryReason::Silent,
        Ok(pb::ExpiryReason::Admin) => ExpiryReason::Admin,
        Ok(pb::ExpiryReason::Goodbye) => ExpiryReason::Goodbye,
        Ok(pb::ExpiryReason::Superseded) => ExpiryReason::Superseded,
        _ => return Err(DecodeError::Unknown { what: "expiry reason", value }),
    })
}

pub fn cursor_to_pb(cursor: &Option<PurgeCursor>) -> Option<pb::PurgeCursor> {
    use pb::purge_cursor::At;
    cursor.map(|cursor| pb::PurgeCursor {
        at: Some(match cursor {
            PurgeCursor::Pending { neg_priority, run_at_ms, seq } => {
                At::Pending(pb::PendingKey { neg_priority, run_at_ms, seq })
            }
            PurgeCursor::Retained { until_ms, job_id } => {
                At::Retained(pb::RetainedKey { until_ms, job_id: job_id_to_pb(job_id) })
            }
        }),
    })
}

pub fn cursor_from_pb(cursor: Option<pb::PurgeCursor>) -> Result<Option<PurgeCursor>> {
    use pb::purge_cursor::At;
    let Some(cursor) = cursor else { return Ok(None) };
    Ok(Some(match required(cursor.at, "purge cursor")? {
        At::Pending(k) => PurgeCursor::Pending { neg_priority: k.neg_priority, run_at_ms: k.run_at_ms, seq: k.seq },
        At::Retained(k) => {
            PurgeCursor::Retained { until_ms: k.until_ms, job_id: job_id_from_pb(k.job_id, "cursor job_id")? }
        }
    }))
}

fn update_to_pb(u: &QueueConfigUpdate) -> pb::QueueConfigUpdate {
    pb::QueueConfigUpdate {
        max_attempts: u.max_attempts,
        lease_timeout_ms: u.lease_timeout_ms,
        backoff_base_ms: u.backoff_base_ms,
        backoff_max_ms: u.backoff_max_ms,
        retention_ms: u.retention_ms,
        concurrency_limit: u.concurrency_limit,
        rate_limit: u.rate_limit,
        max_depth: u.max_depth,
    }
}

fn update_from_pb(u: pb::QueueConfigUpdate) -> QueueConfigUpdate {
    QueueConfigUpdate {
        max_attempts: u.max_attempts,
        lease_timeout_ms: u.lease_timeout_ms,
        backoff_base_ms: u.backoff_base_ms,
        backoff_max_ms: u.backoff_max_ms,
        retention_ms: u.retention_ms,
        concurrency_limit: u.concurrency_limit,
        rate_limit: u.rate_limit,
        max_depth: u.max_depth,
    }
}

pub fn command_to_pb(command: &Command) -> pb::Command {
    use pb::command::Kind;
    let kind = match command {
        Command::Enqueue(job) => Kind::Enqueue(pb::NewJob {
            queue: job.queue.clone(),
            payload: job.payload.clone(),
            headers: job.headers.clone(),
            priority: job.priority,
            delay_ms: job.delay_ms,
            run_at_ms: job.run_at_ms,
            max_attempts: job.max_attempts,
            lease_timeout_ms: job.lease_timeout_ms,
            idempotency_key: job.idempotency_key.clone(),
        }),
        Command::OpenSession { session_id, worker_id, queues, max_in_flight } => Kind::OpenSession(pb::OpenSession {
            session_id: session_id.to_string(),
            worker_id: worker_id.clone(),
            queues: queues.clone(),
            max_in_flight: *max_in_flight,
        }),
        Command::ResumeSession { session_id, fallback, worker_id, queues, max_in_flight } => {
            Kind::ResumeSession(pb::ResumeSession {
                session_id: session_id.to_string(),
                fallback: fallback.to_string(),
                worker_id: worker_id.clone(),
                queues: queues.clone(),
                max_in_flight: *max_in_flight,
            })
        }
        Command::Dispatch { sessions } => {
            Kind::Dispatch(pb::Dispatch { sessions: sessions.iter().map(ToString::to_string).collect() })
        }
        Command::Complete { job_id, token, result } => {
            Kind::Complete(pb::Complete { job_id: job_id_to_pb(*job_id), token: token.0, result: result.clone() })
        }
        Command::Fail { job_id, token, error, retry } => {
            use pb::retry_request::Kind as Retry;
            let retry = match retry {
                RetryRequest::Backoff { jitter_permille } => Retry::BackoffJitterPermille(u32::from(*jitter_permille)),
                RetryRequest::After { delay_ms } => Retry::AfterDelayMs(*delay_ms),
                RetryRequest::Never => Retry::Never(pb::Blank {}),
            };
            Kind::Fail(pb::Fail {
                job_id: job_id_to_pb(*job_id),
                token: token.0,
                error: error.clone(),
                retry: Some(pb::RetryRequest { kind: Some(retry) }),
            })
        }
        Command::Release { job_id, token } => {
            Kind::Release(pb::Release { job_id: job_id_to_pb(*job_id), token: token.0 })
        }
        Command::Progress { job_id, token, message, extend_ms } => Kind::Progress(pb::Progress {
            job_id: job_id_to_pb(*job_id),
            token: token.0,
            message: message.clone(),
            extend_ms: *extend_ms,
        }),
        Command::ExpireSession { session_id, reason } => {
            Kind::ExpireSession(pb::ExpireSession { session_id: session_id.to_string(), reason: reason_to_pb(*reason) })
        }
        Command::Cancel { job_id, reason } => {
            Kind::Cancel(pb::Cancel { job_id: job_id_to_pb(*job_id), reason: reason.clone() })
        }
        Command::RetryJob { job_id } => Kind::RetryJob(pb::RetryJob { job_id: job_id_to_pb(*job_id) }),
        Command::PurgeQueue { queue, state } => {
            Kind::PurgeQueue(pb::PurgeQueue { queue: queue.clone(), state: job_state_to_pb(*state) })
        }
        Command::PurgeQueuePart { queue, state, below_seq, after, through, limit } => {
            Kind::PurgeQueuePart(pb::PurgeQueuePart {
                queue: queue.clone(),
                state: job_state_to_pb(*state),
                below_seq: *below_seq,
                after: cursor_to_pb(after),
                through: cursor_to_pb(through),
                limit: *limit,
            })
        }
        Command::SetQueueConfig { queue, update } => {
            Kind::SetQueueConfig(pb::SetQueueConfig { queue: queue.clone(), update: Some(update_to_pb(update)) })
        }
        Command::PauseQueue { queue } => Kind::PauseQueue(pb::QueueName { queue: queue.clone() }),
        Command::ResumeQueue { queue } => Kind::ResumeQueue(pb::QueueName { queue: queue.clone() }),
        Command::Tick => Kind::Tick(pb::Blank {}),
        Command::DrainSession { session_id } => {
            Kind::DrainSession(pb::SessionRef { session_id: session_id.to_string() })
        }
        Command::SetFormat { format } => Kind::SetFormat(pb::SetFormat { format: *format }),
        Command::DeleteQueue { queue } => Kind::DeleteQueue(pb::QueueName { queue: queue.clone() }),
    };
    pb::Command { kind: Some(kind) }
}

pub fn command_from_pb(command: pb::Command) -> Result<Command> {
    use pb::command::Kind;
    Ok(match required(command.kind, "command (a kind this gantry does not know?)")? {
        Kind::Enqueue(job) => Command::Enqueue(NewJob {
            queue: job.queue,
            payload: job.payload,
            headers: job.headers,
            priority: job.priority,
            delay_ms: job.delay_ms,
            run_at_ms: job.run_at_ms,
            max_attempts: job.max_attempts,
            lease_timeout_ms: job.lease_timeout_ms,
            idempotency_key: job.idempotency_key,
        }),
        Kind::OpenSession(c) => Command::OpenSession {
            session_id: session(&c.session_id),
            worker_id: c.worker_id,
            queues: c.queues,
            max_in_flight: c.max_in_flight,
        },
        Kind::ResumeSession(c) => Command::ResumeSession {
            session_id: session(&c.session_id),
            fallback: session(&c.fallback),
            worker_id: c.worker_id,
            queues: c.queues,
            max_in_flight: c.max_in_flight,
        },
        Kind::Dispatch(c) => Command::Dispatch { sessions: c.sessions.iter().map(|s| session(s)).collect() },
        Kind::Complete(c) => Command::Complete {
            job_id: job_id_from_pb(c.job_id, "job_id")?,
            token: FencingToken(c.token),
            result: c.result,
        },
        Kind::Fail(c) => {
            use pb::retry_request::Kind as Retry;
            let retry = match required(required(c.retry, "retry")?.kind, "retry kind")? {
                Retry::BackoffJitterPermille(j) => RetryRequest::Backoff {
                    jitter_permille: u16::try_from(j)
                        .map_err(|_| DecodeError::Invalid(format!("jitter {j} permille out of range")))?,
                },
                Retry::AfterDelayMs(delay_ms) => RetryRequest::After { delay_ms },
                Retry::Never(_) => RetryRequest::Never,
            };
            Command::Fail {
                job_id: job_id_from_pb(c.job_id, "job_id")?,
                token: FencingToken(c.token),
                error: c.error,
                retry,
            }
        }
        Kind::Release(c) => {
            Command::Release { job_id: job_id_from_pb(c.job_id, "job_id")?, token: FencingToken(c.token) }
        }
        Kind::Progress(c) => Command::Progress {
            job_id: job_id_from_pb(c.job_id, "job_id")?,
            token: FencingToken(c.token),
            message: c.message,
            extend_ms: c.extend_ms,
        },
        Kind::ExpireSession(c) => {
            Command::ExpireSession { session_id: session(&c.session_id), reason: reason_from_pb(c.reason)? }
        }
        Kind::Cancel(c) => Command::Cancel { job_id: job_id_from_pb(c.job_id, "job_id")?, reason: c.reason },
        Kind::RetryJob(c) => Command::RetryJob { job_id: job_id_from_pb(c.job_id, "job_id")? },
        Kind::PurgeQueue(c) => Command::PurgeQueue { queue: c.queue, state: job_state_from_pb(c.state)? },
        Kind::PurgeQueuePart(c) => Command::PurgeQueuePart {
            queue: c.queue,
            state: job_state_from_pb(c.state)?,
            below_seq: c.below_seq,
            after: cursor_from_pb(c.after)?,
            through: cursor_from_pb(c.through)?,
            limit: c.limit,
        },
        Kind::SetQueueConfig(c) => {
            Command::SetQueueConfig { queue: c.queue, update: update_from_pb(c.update.unwrap_or_default()) }
        }
        Kind::PauseQueue(c) => Command::PauseQueue { queue: c.queue },
        Kind::ResumeQueue(c) => Command::ResumeQueue { queue: c.queue },
        Kind::Tick(_) => Command::Tick,
        Kind::DrainSession(c) => Command::DrainSession { session_id: session(&c.session_id) },
        Kind::SetFormat(c) => Command::SetFormat { format: c.format },
        Kind::DeleteQueue(c) => Command::DeleteQueue { queue: c.queue },
    })
}

// --- Shard state ---------------------------------------------------------

fn outcome_to_pb(outcome: Outcome) -> i32 {
    (match outcome {
        Outcome::Running => pb::Outcome::Running,
        Outcome::Succeeded => pb::Outcome::Succeeded,
        Outcome::Failed => pb::Outcome::Failed,
        Outcome::Released => pb::Outcome::Released,
        Outcome::SessionExpired => pb::Outcome::SessionExpired,
        Outcome::LeaseTimedOut => pb::Outcome::LeaseTimedOut,
        Outcome::Cancelled => pb::Outcome::Cancelled,
    }) as i32
}

fn outcome_from_pb(value: i32) -> Result<Outcome> {
    Ok(match pb::Outcome::try_from(value) {
        Ok(pb::Outcome::Running) => Outcome::Running,
        Ok(pb::Outcome::Succeeded) => Outcome::Succeeded,
        Ok(pb::Outcome::Failed) => Outcome::Failed,
        Ok(pb::Outcome::Released) => Outcome::Released,
        Ok(pb::Outcome::SessionExpired) => Outcome::SessionExpired,
        Ok(pb::Outcome::LeaseTimedOut) => Outcome::LeaseTimedOut,
        Ok(pb::Outcome::Cancelled) => Outcome::Cancelled,
        _ => return Err(DecodeError::Unknown { what: "attempt outcome", value }),
    })
}

/// A job as storage and the peer wire carry it, its payload read from disk
/// if it is there.
pub fn job_to_pb(job: &Job) -> std::result::Result<pb::Job, PayloadReadError> {
    Ok(pb::Job { payload: job.payload.to_vec()?, ..job_to_pb_without_payload(job) })
}

fn job_to_pb_through(job: &Job, window: &mut ReadWindow) -> std::result::Result<pb::Job, PayloadReadError> {
    Ok(pb::Job { payload: job.payload.read_through(window)?.into_owned(), ..job_to_pb_without_payload(job) })
}

/// The length of `job`'s encoding, its payload not read.
fn job_encoded_len(job: &Job) -> usize {
    let payload = match job.payload.len() {
        0 => 0,
        n => prost::encoding::key_len(JOB_PAYLOAD_FIELD) + prost::encoding::encoded_len_varint(n as u64) + n,
    };
    job_to_pb_without_payload(job).encoded_len() + payload
}

/// The field number of `Job.payload`.
const JOB_PAYLOAD_FIELD: u32 = 3;

fn job_to_pb_without_payload(job: &Job) -> pb::Job {
    use pb::job::Status as S;
    let status = match &job.status {
        Status::Pending => S::Pending(pb::Blank {}),
        Status::Active(lease) => S::Active(pb::Lease {
            session_id: lease.session_id.to_string(),
            token: lease.token.0,
            started_ms: lease.started_ms,
            deadline_ms: lease.deadline_ms,
        }),
        Status::Succeeded => S::Succeeded(pb::Blank {}),
        Status::Failed => S::Failed(pb::Blank {}),
        Status::Cancelled => S::Cancelled(pb::Blank {}),
    };
    pb::Job {
        id: job_id_to_pb(job.id),
        queue: job.queue.clone(),
        payload: Vec::new(),
        headers: job.headers().clone(),
        priority: job.priority,
        status: Some(status),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        lease_timeout_ms: job.lease_timeout_ms,
        created_ms: job.created_ms,
        run_at_ms: job.run_at_ms,
        finished_ms: job.finished_ms(),
        retain_until_ms: job.retain_until_ms(),
        result: job.result().to_vec(),
        error: job.error().to_owned(),
        idempotency_key: job.idempotency_key().map(str::to_owned),
        last_token: job.last_token.0,
        last_worker_id: job.last_worker_id().to_owned(),
        progress: job.progress().to_owned(),
        history: job
            .history()
            .iter()
            .map(|a| pb::AttemptRecord {
                attempt: a.attempt,
                worker_id: a.worker_id.clone(),
                session_id: a.session_id.to_string(),
                token: a.token.0,
                started_ms: a.started_ms,
                finished_ms: a.finished_ms,
                outcome: outcome_to_pb(a.outcome),
                error: a.error.clone(),
            })
            .collect(),
    }
}

pub fn job_from_pb(job: pb::Job) -> Result<Job> {
    use pb::job::Status as S;
    let status = match required(job.status, "job status")? {
        S::Pending(_) => Status::Pending,
        S::Active(lease) => Status::Active(Box::new(Lease {
            session_id: session(&lease.session_id),
            token: FencingToken(lease.token),
            started_ms: lease.started_ms,
            deadline_ms: lease.deadline_ms,
        })),
        S::Succeeded(_) => Status::Succeeded,
        S::Failed(_) => Status::Failed,
        S::Cancelled(_) => Status::Cancelled,
    };
    let history = job
        .history
        .into_iter()
        .map(|a| {
            Ok(AttemptRecord {
                attempt: a.attempt,
                worker_id: a.worker_id,
                session_id: session(&a.session_id),
                token: FencingToken(a.token),
                started_ms: a.started_ms,
                finished_ms: a.finished_ms,
                outcome: outcome_from_pb(a.outcome)?,
                error: a.error,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Job {
        id: job_id_from_pb(job.id, "job id")?,
        queue: job.queue,
        payload: job.payload.into(),
        priority: job.priority,
        status,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        lease_timeout_ms: job.lease_timeout_ms,
        created_ms: job.created_ms,
        run_at_ms: job.run_at_ms,
        last_token: FencingToken(job.last_token),
        more: More::of(JobMore {
            headers: job.headers,
            idempotency_key: job.idempotency_key,
            finished_ms: job.finished_ms,
            retain_until_ms: job.retain_until_ms,
            result: job.result,
            error: job.error,
            last_worker_id: job.last_worker_id,
            progress: job.progress,
            history,
        }),
    })
}

fn config_to_pb(c: &QueueConfig) -> pb::QueueConfig {
    pb::QueueConfig {
        max_attempts: c.max_attempts,
        lease_timeout_ms: c.lease_timeout_ms,
        backoff_base_ms: c.backoff_base_ms,
        backoff_max_ms: c.backoff_max_ms,
        retention_ms: c.retention_ms,
        concurrency_limit: c.concurrency_limit,
        rate_limit: c.rate_limit,
        max_depth: c.max_depth,
    }
}

fn config_from_pb(c: pb::QueueConfig) -> QueueConfig {
    QueueConfig {
        max_attempts: c.max_attempts,
        lease_timeout_ms: c.lease_timeout_ms,
        backoff_base_ms: c.backoff_base_ms,
        backoff_max_ms: c.backoff_max_ms,
        retention_ms: c.retention_ms,
        concurrency_limit: c.concurrency_limit,
        rate_limit: c.rate_limit,
        max_depth: c.max_depth,
    }
}

/// Everything of the state but its jobs, which are written after it one by
/// one (protobuf concatenates repeated fields), so a large state is never
/// copied whole.
fn state_head_to_pb(parts: StateParts) -> pb::ShardState {
    pb::ShardState {
        shard: parts.shard.0,
        now_ms: parts.now_ms,
        next_seq: parts.next_seq,
        last_token: parts.last_token.0,
        jobs: Vec::new(),
        queues: parts
            .queues
            .into_iter()
            .map(|q| pb::Queue {
                name: q.name,
                config: Some(config_to_pb(&q.config)),
                paused: q.paused,
                idempotency: q
                    .idempotency
                    .into_iter()
                    .map(|(key, id)| pb::IdempotencyKey { key, job_id: job_id_to_pb(id) })
                    .collect(),
                rate_window_second: q.rate_window.0,
                rate_window_used: q.rate_window.1,
            })
            .collect(),
        sessions: parts
            .sessions
            .into_iter()
            .map(|s| pb::Session {
                session_id: s.session_id.to_string(),
                worker_id: s.worker_id,
                queues: s.queues,
                max_in_flight: s.max_in_flight,
                opened_ms: s.opened_ms,
            })
            .collect(),
        expired_sessions: parts
            .expired_sessions
            .into_iter()
            .map(|(id, e)| pb::ExpiredSession {
                session_id: id.to_string(),
                expired_ms: e.expired_ms,
                reason: reason_to_pb(e.reason),
                lost: e
                    .lost
                    .iter()
                    .map(|(id, token)| pb::LostLease { job_id: job_id_to_pb(*id), token: token.0 })
                    .collect(),
            })
            .collect(),
        format: parts.format,
    }
}

/// The field number of `ShardState.jobs`.
const STATE_JOBS_FIELD: u32 = 5;

/// Encodes `state` as a `ShardState` message, handing the bytes to `sink`
/// piece by piece (a snapshot file, a digest). Deterministic: replicas with
/// equal states produce equal bytes, wherever their payloads are. Fails
/// only if a payload on this node's disk cannot be read back.
pub fn encode_state(state: &QueueState, sink: &mut dyn FnMut(&[u8])) -> std::result::Result<(), PayloadReadError> {
    let mut buf = state_head_to_pb(state.parts_without_jobs()).encode_to_vec();
    sink(&buf);
    let mut window = ReadWindow::default();
    for job in state.jobs().values() {
        buf.clear();
        prost::encoding::message::encode(STATE_JOBS_FIELD, &job_to_pb_through(job, &mut window)?, &mut buf);
        sink(&buf);
    }
    Ok(())
}

pub fn encode_state_to_vec(state: &QueueState) -> std::result::Result<Vec<u8>, PayloadReadError> {
    let mut out = Vec::new();
    encode_state(state, &mut |bytes| out.extend_from_slice(bytes))?;
    Ok(out)
}

/// Top-level fields of a protobuf message read from `reader` one at a
/// time, so that a large message (a shard's state, a snapshot file) is never
/// held whole. A length running past the message's end is refused before
/// anything is allocated for it.
pub struct FieldReader<R> {
    reader: R,
    remaining: u64,
}

impl<R: std::io::Read> FieldReader<R> {
    /// `len`: the message's length in bytes; reading stops there.
    pub fn new(reader: R, len: u64) -> Self {
        FieldReader { reader, remaining: len }
    }

    fn byte(&mut self) -> Result<u8> {
        if self.remaining == 0 {
            return Err(DecodeError::Invalid("the message ends inside a field".into()));
        }
        let mut byte = [0u8];
        self.reader.read_exact(&mut byte).map_err(|e| read_error(&e))?;
        self.remaining -= 1;
        Ok(byte[0])
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Invalid("a varint longer than ten bytes".into()))
    }

    /// The next field's number and wire type; `None` at the message's end.
    pub fn next_key(&mut self) -> Result<Option<(u32, prost::encoding::WireType)>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire_type = prost::encoding::WireType::try_from(key & 7).map_err(DecodeError::Protobuf)?;
        let tag = u32::try_from(key >> 3).ok().filter(|tag| *tag > 0);
        let tag = tag.ok_or_else(|| DecodeError::Invalid(format!("field number {} out of range", key >> 3)))?;
        Ok(Some((tag, wire_type)))
    }

    /// Bytes of the message not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// A length-delimited value's length, checked against what is left.
    pub fn length(&mut self) -> Result<u64> {
        let len = self.varint()?;
        if len > self.remaining {
            return Err(DecodeError::Invalid(format!("a field of {len} bytes where {} are left", self.remaining)));
        }
        Ok(len)
    }

    /// Reads a length-delimited value into `buf` (replacing its contents).
    pub fn bytes(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let len = self.length()?;
        buf.clear();
        buf.resize(len as usize, 0);
        self.reader.read_exact(buf).map_err(|e| read_error(&e))?;
        self.remaining -= len;
        Ok(())
    }

    /// Skips `len` bytes of a value whose length was read with [`Self::length`].
    pub fn skip(&mut self, len: u64) -> Result<()> {
        let copied = std::io::copy(&mut std::io::Read::take(&mut self.reader, len), &mut std::io::sink())
            .map_err(|e| read_error(&e))?;
        if copied != len {
            return Err(DecodeError::Invalid("the message ends inside a field".into()));
        }
        self.remaining -= len;
        Ok(())
    }

    /// Appends the field (key and value) to `out`, for a later
    /// `Message::merge` of the small fields together.
    pub fn copy_field(&mut self, tag: u32, wire_type: prost::encoding::WireType, out: &mut Vec<u8>) -> Result<()> {
        use prost::encoding::{WireType, encode_key, encode_varint};
        encode_key(tag, wire_type, out);
        match wire_type {
            WireType::Varint => encode_varint(self.varint()?, out),
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let width = if wire_type == WireType::SixtyFourBit { 8 } else { 4 };
                for _ in 0..width {
                    out.push(self.byte()?);
                }
            }
            WireType::LengthDelimited => {
                let mut value = Vec::new();
                self.bytes(&mut value)?;
                encode_varint(value.len() as u64, out);
                out.extend_from_slice(&value);
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(DecodeError::Invalid(format!("field {tag}: groups are not used by Gantry")));
            }
        }
        Ok(())
    }
}

fn read_error(e: &std::io::Error) -> DecodeError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => DecodeError::Invalid("the message ends inside a field".into()),
        _ => DecodeError::Invalid(format!("reading: {e}")),
    }
}

/// The length of `state`'s encoding, without holding it: a snapshot file
/// states its data's length before the data.
/// Payloads are not read: their lengths are known.
pub fn encoded_state_len(state: &QueueState) -> u64 {
    let head = state_head_to_pb(state.parts_without_jobs()).encoded_len() as u64;
    let jobs = state.jobs().values().map(|job| {
        let len = job_encoded_len(job);
        (prost::encoding::key_len(STATE_JOBS_FIELD) + prost::encoding::encoded_len_varint(len as u64) + len) as u64
    });
    head + jobs.sum::<u64>()
}

/// Decodes a `ShardState` held in memory.
pub fn decode_state(bytes: &[u8]) -> Result<QueueState> {
    decode_state_from(bytes, bytes.len() as u64)
}

/// Decodes a `ShardState` of `len` bytes read from `reader`, converting each
/// job as it is read: neither the encoding nor the decoded jobs are ever
/// held twice.
pub fn decode_state_from(reader: impl std::io::Read, len: u64) -> Result<QueueState> {
    decode_state_spilling(reader, len, &mut |_, bytes| Ok(Payload::from(bytes)))
}

/// [`decode_state_from`], each job's payload handed to `spill` as it is
/// read (which may write it to disk), so that restoring a large state never
/// holds its payloads in memory together.
pub fn decode_state_spilling(
    reader: impl std::io::Read,
    len: u64,
    spill: &mut dyn FnMut(JobId, Vec<u8>) -> std::io::Result<Payload>,
) -> Result<QueueState> {
    let mut fields = FieldReader::new(reader, len);
    let mut head_bytes = Vec::new();
    let mut jobs = Vec::new();
    let mut job = Vec::new();
    while let Some((tag, wire_type)) = fields.next_key()? {
        if tag == STATE_JOBS_FIELD && wire_type == prost::encoding::WireType::LengthDelimited {
            fields.bytes(&mut job)?;
            let mut decoded = pb::Job::decode(job.as_slice())?;
            let payload = std::mem::take(&mut decoded.payload);
            let mut decoded = job_from_pb(decoded)?;
            decoded.payload = spill(decoded.id, payload).map_err(DecodeError::Spill)?;
            jobs.push(std::sync::Arc::new(decoded));
        } else {
            fields.copy_field(tag, wire_type, &mut head_bytes)?;
        }
    }
    let head = pb::ShardState::decode(head_bytes.as_slice())?;
    let queues = head
        .queues
        .into_iter()
        .map(|q| {
            Ok(QueueParts {
                name: q.name,
                config: config_from_pb(required(q.config, "queue config")?),
                paused: q.paused,
                idempotency: q
                    .idempotency
                    .into_iter()
                    .map(|k| Ok((k.key, job_id_from_pb(k.job_id, "idempotency job_id")?)))
                    .collect::<Result<Vec<_>>>()?,
                rate_window: (q.rate_window_second, q.rate_window_used),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let expired_sessions = head
        .expired_sessions
        .into_iter()
        .map(|e| {
            let lost = e
                .lost
                .into_iter()
                .map(|l| Ok((job_id_from_pb(l.job_id, "lost job_id")?, FencingToken(l.token))))
                .collect::<Result<Vec<_>>>()?;
            Ok((
                session(&e.session_id),
                ExpiredSession { expired_ms: e.expired_ms, reason: reason_from_pb(e.reason)?, lost },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let parts = StateParts {
        shard: ShardId(head.shard),
        now_ms: head.now_ms,
        next_seq: head.next_seq,
        last_token: FencingToken(head.last_token),
        jobs,
        queues,
        sessions: head
            .sessions
            .into_iter()
            .map(|s| SessionParts {
                session_id: session(&s.session_id),
                worker_id: s.worker_id,
                queues: s.queues,
                max_in_flight: s.max_in_flight,
                opened_ms: s.opened_ms,
            })
            .collect(),
        expired_sessions,
        format: head.format,
    };
    QueueState::restore(parts).map_err(DecodeError::Invalid)
}

// --- Snapshot files ------------------------------------------------------

pub fn snapshot_file_to_pb(meta: &SnapshotMeta, data: Vec<u8>) -> pb::SnapshotFile {
    pb::SnapshotFile {
        last_log_id: meta.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&meta.last_membership)),
        data,
    }
}

pub fn snapshot_file_from_pb(file: pb::SnapshotFile) -> Result<(SnapshotMeta, Vec<u8>)> {
    let meta = SnapshotMeta {
        last_log_id: file.last_log_id.map(log_id_from_pb),
        last_membership: match file.last_membership {
            Some(m) => stored_membership_from_pb(m)?,
            None => Default::default(),
        },
    };
    Ok((meta, file.data))
}

impl crate::raft::log_store::StoredEntries for TypeConfig {
    fn encode_stored(entry: &Entry, out: &mut Vec<u8>) {
        encode_entry(entry, out);
    }

    fn decode_stored(bytes: &[u8]) -> std::result::Result<Entry, String> {
        decode_entry(bytes).map_err(|e| e.to_string())
    }

    fn log_id_to_pb(log_id: &LogId) -> pb::LogId {
        log_id_to_pb(log_id)
    }

    fn log_id_from_pb(log_id: pb::LogId) -> LogId {
        log_id_from_pb(log_id)
    }

    fn vote_to_pb(vote: &Vote) -> pb::Vote {
        vote_to_pb(vote)
    }

    fn vote_from_pb(vote: pb::Vote) -> Vote {
        vote_from_pb(vote)
    }

    fn format_needed(entry: &Entry) -> u32 {
        match &entry.payload {
            EntryPayload::Normal(batch) => batch
                .commands
                .iter()
                .map(|c| match c {
                    Command::SetFormat { format } => *format,
                    other => other.min_format(),
                })
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }
}
