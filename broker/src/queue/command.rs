//! The Raft log payload. One log entry carries a batch of commands, stamped
//! with the leader's clock, so a busy broker pays one entry (and one fsync)
//! for many enqueues, assignments and results.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::format::table::{self as format, Feature};

use super::{
    config::QueueConfigUpdate,
    ids::{FencingToken, JobId, SessionId},
    job::{JobState, JobView},
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The leader's wall clock when it proposed the entry, in ms since the
    /// epoch. The state machine never reads a clock: this is its only time.
    pub proposed_at_ms: u64,
    /// Shared, not copied, when the entry is read from the log's in-memory
    /// tail (apply, and replication to each follower). Encoded as a Vec is.
    pub commands: Arc<[Command]>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Enqueue(NewJob),
    OpenSession {
        session_id: SessionId,
        worker_id: String,
        queues: Vec<String>,
        max_in_flight: u32,
    },
    /// Fill each listed session up to its `max_in_flight` with due jobs of its
    /// queues. The state machine picks the jobs, so replicas agree and no job
    /// can be picked twice by concurrent proposals.
    Dispatch {
        sessions: Vec<SessionId>,
    },
    Complete {
        job_id: JobId,
        token: FencingToken,
        #[serde(with = "serde_bytes")]
        result: Vec<u8>,
    },
    Fail {
        job_id: JobId,
        token: FencingToken,
        error: String,
        retry: RetryRequest,
    },
    Release {
        job_id: JobId,
        token: FencingToken,
    },
    Progress {
        job_id: JobId,
        token: FencingToken,
        message: String,
        extend_ms: Option<u64>,
    },
    /// Every job of the session loses its lease at once.
    ExpireSession {
        session_id: SessionId,
        reason: ExpiryReason,
    },
    Cancel {
        job_id: JobId,
        reason: String,
    },
    RetryJob {
        job_id: JobId,
    },
    PurgeQueue {
        queue: String,
        state: JobState,
    },
    SetQueueConfig {
        queue: String,
        update: QueueConfigUpdate,
    },
    PauseQueue {
        queue: String,
    },
    ResumeQueue {
        queue: String,
    },
    /// Nothing but the passing of time: lets lease deadlines and retention,
    /// which are swept at the start of every entry, take effect when idle.
    Tick,
    /// A reconnecting worker: keeps `session_id` (and its leases) if it is
    /// still open when this entry applies, else opens `fallback` as a new
    /// session. Decided here, not by the node that read the state before
    /// proposing, because the session's expiry may commit in between.
    /// Appended last so older log entries keep their encoding.
    ResumeSession {
        session_id: SessionId,
        fallback: SessionId,
        worker_id: String,
        queues: Vec<String>,
        max_in_flight: u32,
    },
    /// The worker is shutting down: no new jobs for the session (its
    /// max_in_flight drops to zero); it keeps the jobs it holds.
    DrainSession {
        session_id: SessionId,
    },
    /// Part of a purge: examines at most `limit` entries of the index the
    /// state is kept in (a queue's pending jobs, or the retained ones),
    /// after `after` and up to `through`, and drops the queue's jobs in
    /// `state` among them whose sequence is below `below_seq`. The first
    /// part (both unset) fixes `below_seq` (the next job's: jobs enqueued
    /// later are spared) and `through` (the index's last entry then: a purge
    /// ends however fast entries arrive). A purge of a large queue is many
    /// small entries, not one that stalls the shard.
    PurgeQueuePart {
        queue: String,
        state: JobState,
        below_seq: Option<u64>,
        after: Option<PurgeCursor>,
        through: Option<PurgeCursor>,
        limit: u32,
    },
    /// Raises the shard's format (its gate) to `format`; a lower or equal
    /// one changes nothing. Proposed by the shard's leader once every
    /// member runs a binary that supports it (format 0: the raise itself
    /// must be possible before any raise).
    SetFormat {
        format: u32,
    },
    /// Forgets a queue that holds no job at all (its settings, counters and
    /// pause); format 1.
    DeleteQueue {
        queue: String,
    },
}

impl Command {
    /// The shard format that introduced this command (or a field it uses):
    /// it is refused, at the API edge and again at apply, on a shard whose
    /// format is lower.
    pub fn feature(&self) -> Option<Feature> {
        match self {
            Command::DeleteQueue { .. } => Some(format::DELETE_QUEUE),
            _ => None,
        }
    }

    pub fn min_format(&self) -> u32 {
        self.feature().map_or(0, |f| f.format)
    }

    /// Roughly how many bytes the command takes in a log entry: the large
    /// fields only, enough to keep entries (and peer messages) bounded.
    pub fn approx_bytes(&self) -> usize {
        const SMALL: usize = 64;
        SMALL
            + match self {
                Command::Enqueue(job) => {
                    job.queue.len()
                        + job.payload.len()
                        + job.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                        + job.idempotency_key.as_ref().map_or(0, String::len)
                }
                Command::Complete { result, .. } => result.len(),
                Command::Fail { error, .. } => error.len(),
                Command::Progress { message, .. } => message.len(),
                Command::Cancel { reason, .. } => reason.len(),
                Command::OpenSession { worker_id, queues, .. } | Command::ResumeSession { worker_id, queues, .. } => {
                    worker_id.len() + queues.iter().map(String::len).sum::<usize>()
                }
                Command::Dispatch { sessions } => sessions.len() * 32,
                _ => 0,
            }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetryRequest {
    /// The queue's exponential backoff, scaled by the leader's jitter.
    Backoff { jitter_permille: u16 },
    /// The worker asked to be retried no sooner than this.
    After { delay_ms: u64 },
    /// Failed for good.
    Never,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpiryReason {
    /// Silent for session_ttl (judged by the leader).
    Silent,
    /// Admin.ExpireSession.
    Admin,
    /// The worker said goodbye with jobs still held.
    Goodbye,
    /// The worker reconnected after its session had expired in another
    /// shard; one session id names it in all of them, so it starts afresh.
    Superseded,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    pub queue: String,
    // Bytes as one slice, not a sequence of u8: the same postcard encoding,
    // decoded with one copy instead of one call per byte.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub priority: i32,
    pub delay_ms: u64,
    /// Absolute; wins over `delay_ms`.
    pub run_at_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub lease_timeout_ms: Option<u64>,
    pub idempotency_key: Option<String>,
}

impl NewJob {
    pub fn new(queue: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        NewJob {
            queue: queue.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
            priority: 0,
            delay_ms: 0,
            run_at_ms: None,
            max_attempts: None,
            lease_timeout_ms: None,
            idempotency_key: None,
        }
    }
}

/// The outcome of one command, in the order of the batch. Rejections are
/// deterministic outcomes (data), not errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    Enqueued {
        job_id: JobId,
        created: bool,
        state: JobState,
    },
    SessionOpened {
        session_id: SessionId,
        /// The session existed and keeps its leases.
        resumed: bool,
        /// A resume that came too late: the leases the expired session lost.
        lost: Vec<(JobId, FencingToken)>,
    },
    /// How many jobs were leased; each is in the entry's events as
    /// `Event::Assigned` (the one copy: every node applies every dispatch).
    Dispatched {
        assigned: u32,
    },
    /// Complete, Fail, Release or Progress from the current holder (or a
    /// repeat of a result already recorded for the same token).
    Accepted {
        lease_deadline_ms: Option<u64>,
    },
    SessionExpired {
        released: u32,
    },
    SessionDrained,
    /// Cancel or RetryJob: the job as it is now.
    Job(Box<JobView>),
    Purged {
        count: u64,
    },
    /// `next` is where the purge goes on from; unset when it is done.
    PurgedPart {
        count: u64,
        below_seq: u64,
        through: Option<PurgeCursor>,
        next: Option<PurgeCursor>,
    },
    QueueUpdated,
    Ticked,
    Rejected(Rejection),
    /// SetFormat: the shard's format after it.
    FormatSet {
        format: u32,
    },
    QueueDeleted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub session_id: SessionId,
    pub job_id: JobId,
    pub token: FencingToken,
    pub attempt: u32,
    pub lease_deadline_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("job {0} not found")]
    JobNotFound(JobId),
    #[error("stale lease: job {job_id} is no longer held under fencing token {token}")]
    StaleLease { job_id: JobId, token: FencingToken },
    #[error("queue {queue:?} is at its maximum depth of {max_depth} jobs")]
    QueueFull { queue: String, max_depth: u64 },
    #[error("job {job_id} is {state}; only FAILED jobs can be retried")]
    NotFailed { job_id: JobId, state: JobState },
    #[error("job {job_id} is already {state}")]
    AlreadyTerminal { job_id: JobId, state: JobState },
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    #[error("jobs in state {0:?} cannot be purged")]
    CannotPurge(JobState),
    /// A command of a feature the shard's format does not allow yet: the
    /// same no-op on every replica (a proposer that skipped the check at
    /// the edge cannot poison the log).
    #[error(
        "{feature} needs shard format {needs}; this shard is at format {shard_format} (raised once every member runs \
         a gantry that supports it: `gantry cluster upgrade status`)"
    )]
    FormatTooLow { feature: String, needs: u32, shard_format: u32 },
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    #[error("queue {queue:?} still holds {jobs} job(s) (pending, active or retained): purge them first")]
    QueueNotEmpty { queue: String, jobs: u64 },
}

/// Side effects of an entry that the leader's dispatcher and waiters act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A session lost a job's lease while it may still be connected: tell it.
    Revoked { session_id: SessionId, job_id: JobId, token: FencingToken, reason: String },
    /// A job reached a terminal state (wakes WaitJob).
    Finished { job_id: JobId },
    /// A queue may have gained due work (wakes the dispatcher).
    WorkAvailable { queue: String },
    /// A session's held jobs went down, so it can take more.
    CapacityFreed { session_id: SessionId },
    /// A job was leased to a session: the leader pushes it down the
    /// session's stream. Carried as an event, not only as the `Dispatch`
    /// command's answer, so that assignments reach a stream in log order
    /// with the revokes of later entries, whoever proposed the dispatch.
    Assigned(Assignment),
    /// A session is gone (expired, expired by an admin, or said goodbye):
    /// its stream, if any, must be closed so the worker opens a new one.
    SessionEnded { session_id: SessionId },
}

/// The last index entry a purge part examined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PurgeCursor {
    Pending { neg_priority: i64, run_at_ms: u64, seq: u64 },
    Retained { until_ms: u64, job_id: JobId },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log entries written when commands were a Vec must still decode, and
    /// the other way round: a shared slice encodes exactly as a Vec does.
    #[test]
    fn batch_encoding_is_the_same_as_with_a_vec() {
        #[derive(Serialize)]
        struct AsVec {
            proposed_at_ms: u64,
            commands: Vec<Command>,
        }
        let commands = vec![
            Command::Enqueue(NewJob::new("q", b"payload".to_vec())),
            Command::Tick,
            Command::PurgeQueue { queue: "q".into(), state: JobState::Failed },
        ];
        let old = postcard::to_allocvec(&AsVec { proposed_at_ms: 7, commands: commands.clone() }).unwrap();
        let batch = Batch { proposed_at_ms: 7, commands: commands.into() };
        assert_eq!(postcard::to_allocvec(&batch).unwrap(), old);
        assert_eq!(postcard::from_bytes::<Batch>(&old).unwrap(), batch);
    }
}
