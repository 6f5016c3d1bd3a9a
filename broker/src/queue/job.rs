//! A job as the state machine stores it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    ids::{FencingToken, JobId, SessionId},
    payload::Payload,
};

/// The states a client sees. SCHEDULED and READY are one stored status
/// (`Status::Pending`) told apart by comparing `run_at_ms` with the time of
/// the question, so a job becoming due needs no log write.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    Scheduled,
    Ready,
    Active,
    Succeeded,
    Failed,
    Cancelled,
}

/// The API's name (`READY`), so messages read like the states clients see.
impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Scheduled => "SCHEDULED",
            JobState::Ready => "READY",
            JobState::Active => "ACTIVE",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        })
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pending,
    /// Boxed: most jobs in a state are not active, and a lease inline made
    /// every job 32 bytes larger.
    Active(Box<Lease>),
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub session_id: SessionId,
    pub token: FencingToken,
    pub started_ms: u64,
    pub deadline_ms: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    Released,
    SessionExpired,
    LeaseTimedOut,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub worker_id: String,
    pub session_id: SessionId,
    pub token: FencingToken,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub outcome: Outcome,
    pub error: String,
}

/// Only the latest attempts are kept: enough to debug, bounded in memory.
pub const HISTORY_MAX: usize = 10;

/// A job. What a job that only waits has is inline (about 130 bytes); what
/// it may gain later or rarely has (headers, an idempotency key, its result,
/// error, progress and attempts) is out of line in [`JobMore`], allocated the
/// first time one of them is set. A million queued jobs cost that much less
/// memory each (they cost 360 bytes inline before).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "format0::Job", into = "format0::Job")]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    pub payload: Payload,
    pub priority: i32,
    pub status: Status,
    /// Attempts started and counted so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub lease_timeout_ms: u64,
    pub created_ms: u64,
    pub run_at_ms: u64,
    /// Token of the current or last lease (0: never leased).
    pub last_token: FencingToken,
    pub more: More,
}

/// The fields of a [`Job`] kept out of line; all default while it waits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobMore {
    pub headers: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub finished_ms: Option<u64>,
    /// Terminal jobs: when retention drops it. Stored, not recomputed, since
    /// the queue's retention may change meanwhile.
    pub retain_until_ms: Option<u64>,
    pub result: Vec<u8>,
    pub error: String,
    pub last_worker_id: String,
    pub progress: String,
    pub history: Vec<AttemptRecord>,
}

/// What a job without out-of-line fields reads as.
static NOTHING_MORE: JobMore = JobMore {
    headers: BTreeMap::new(),
    idempotency_key: None,
    finished_ms: None,
    retain_until_ms: None,
    result: Vec::new(),
    error: String::new(),
    last_worker_id: String::new(),
    progress: String::new(),
    history: Vec::new(),
};

/// A job's [`JobMore`], not allocated while all of it is default. Equal
/// whether or not an all-default one is allocated.
#[derive(Clone, Debug, Default)]
pub struct More(Option<Box<JobMore>>);

impl More {
    pub fn of(more: JobMore) -> Self {
        More((more != NOTHING_MORE).then(|| Box::new(more)))
    }

    fn get(&self) -> &JobMore {
        self.0.as_deref().unwrap_or(&NOTHING_MORE)
    }

    fn into_inner(self) -> JobMore {
        self.0.map(|more| *more).unwrap_or_default()
    }
}

impl PartialEq for More {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for More {}

impl Job {
    /// The out-of-line fields, allocated on first use.
    pub fn more_mut(&mut self) -> &mut JobMore {
        self.more.0.get_or_insert_with(Default::default)
    }

    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.more.get().headers
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.more.get().idempotency_key.as_deref()
    }

    pub fn finished_ms(&self) -> Option<u64> {
        self.more.get().finished_ms
    }

    pub fn retain_until_ms(&self) -> Option<u64> {
        self.more.get().retain_until_ms
    }

    pub fn result(&self) -> &[u8] {
        &self.more.get().result
    }

    pub fn error(&self) -> &str {
        &self.more.get().error
    }

    pub fn last_worker_id(&self) -> &str {
        &self.more.get().last_worker_id
    }

    pub fn progress(&self) -> &str {
        &self.more.get().progress
    }

    pub fn history(&self) -> &[AttemptRecord] {
        &self.more.get().history
    }
}

/// The format-0 (postcard) layout of a job, which snapshots of format-0
/// shards still use: every field inline, in this order. Frozen.
mod format0 {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::{AttemptRecord, FencingToken, JobId, JobMore, More, Payload, Status};

    #[derive(Serialize, Deserialize)]
    pub struct Job {
        id: JobId,
        queue: String,
        #[serde(with = "crate::queue::payload::as_bytes")]
        payload: Payload,
        headers: BTreeMap<String, String>,
        priority: i32,
        status: Status,
        attempt: u32,
        max_attempts: u32,
        lease_timeout_ms: u64,
        created_ms: u64,
        run_at_ms: u64,
        finished_ms: Option<u64>,
        retain_until_ms: Option<u64>,
        #[serde(with = "serde_bytes")]
        result: Vec<u8>,
        error: String,
        idempotency_key: Option<String>,
        last_token: FencingToken,
        last_worker_id: String,
        progress: String,
        history: Vec<AttemptRecord>,
    }

    impl From<Job> for super::Job {
        fn from(j: Job) -> Self {
            super::Job {
                id: j.id,
                queue: j.queue,
                payload: j.payload,
                priority: j.priority,
                status: j.status,
                attempt: j.attempt,
                max_attempts: j.max_attempts,
                lease_timeout_ms: j.lease_timeout_ms,
                created_ms: j.created_ms,
                run_at_ms: j.run_at_ms,
                last_token: j.last_token,
                more: More::of(JobMore {
                    headers: j.headers,
                    idempotency_key: j.idempotency_key,
                    finished_ms: j.finished_ms,
                    retain_until_ms: j.retain_until_ms,
                    result: j.result,
                    error: j.error,
                    last_worker_id: j.last_worker_id,
                    progress: j.progress,
                    history: j.history,
                }),
            }
        }
    }

    impl From<super::Job> for Job {
        fn from(j: super::Job) -> Self {
            let more = j.more.into_inner();
            Job {
                id: j.id,
                queue: j.queue,
                payload: j.payload,
                headers: more.headers,
                priority: j.priority,
                status: j.status,
                attempt: j.attempt,
                max_attempts: j.max_attempts,
                lease_timeout_ms: j.lease_timeout_ms,
                created_ms: j.created_ms,
                run_at_ms: j.run_at_ms,
                finished_ms: more.finished_ms,
                retain_until_ms: more.retain_until_ms,
                result: more.result,
                error: more.error,
                idempotency_key: more.idempotency_key,
                last_token: j.last_token,
                last_worker_id: more.last_worker_id,
                progress: more.progress,
                history: more.history,
            }
        }
    }
}

impl Job {
    pub fn state_at(&self, now_ms: u64) -> JobState {
        match self.status {
            Status::Pending if self.run_at_ms > now_ms => JobState::Scheduled,
            Status::Pending => JobState::Ready,
            Status::Active(_) => JobState::Active,
            Status::Succeeded => JobState::Succeeded,
            Status::Failed => JobState::Failed,
            Status::Cancelled => JobState::Cancelled,
        }
    }

    pub fn lease(&self) -> Option<&Lease> {
        match &self.status {
            Status::Active(lease) => Some(lease),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.status, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    /// The history record of the attempt that held `token`, if still kept.
    pub fn attempt_with_token(&self, token: FencingToken) -> Option<&AttemptRecord> {
        self.history().iter().rev().find(|r| r.token == token)
    }

    pub(super) fn close_attempt(&mut self, token: FencingToken, now_ms: u64, outcome: Outcome, error: &str) {
        if let Some(r) = self.more.0.as_mut().and_then(|m| m.history.iter_mut().rev().find(|r| r.token == token)) {
            r.finished_ms = Some(now_ms);
            r.outcome = outcome;
            r.error = error.to_owned();
        }
    }

    pub(super) fn push_attempt(&mut self, record: AttemptRecord) {
        let history = &mut self.more_mut().history;
        if history.len() == HISTORY_MAX {
            history.remove(0);
        }
        // Most jobs run once: room for one record, not Vec's default of four,
        // in every job a queue retains.
        history.reserve_exact(1);
        history.push(record);
    }
}

/// A job together with the state it was in when it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub state: JobState,
    /// Shared with the state, not copied: a read holds the state's lock briefly.
    pub job: std::sync::Arc<Job>,
}
