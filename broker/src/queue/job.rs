//! A job as the state machine stores it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{FencingToken, JobId, SessionId};

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
    Active(Lease),
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub priority: i32,
    pub status: Status,
    /// Attempts started and counted so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub lease_timeout_ms: u64,
    pub created_ms: u64,
    pub run_at_ms: u64,
    pub finished_ms: Option<u64>,
    /// Terminal jobs: when retention drops it. Stored, not recomputed, since
    /// the queue's retention may change meanwhile.
    pub retain_until_ms: Option<u64>,
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    pub error: String,
    pub idempotency_key: Option<String>,
    /// Token of the current or last lease (0: never leased).
    pub last_token: FencingToken,
    pub last_worker_id: String,
    pub progress: String,
    pub history: Vec<AttemptRecord>,
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
        self.history.iter().rev().find(|r| r.token == token)
    }

    pub(super) fn close_attempt(&mut self, token: FencingToken, now_ms: u64, outcome: Outcome, error: &str) {
        if let Some(r) = self.history.iter_mut().rev().find(|r| r.token == token) {
            r.finished_ms = Some(now_ms);
            r.outcome = outcome;
            r.error = error.to_owned();
        }
    }

    pub(super) fn push_attempt(&mut self, record: AttemptRecord) {
        if self.history.len() == HISTORY_MAX {
            self.history.remove(0);
        }
        // Most jobs run once: room for one record, not Vec's default of four,
        // in every job a queue retains.
        self.history.reserve_exact(1);
        self.history.push(record);
    }
}

/// A job together with the state it was in when it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub state: JobState,
    /// Shared with the state, not copied: a read holds the state's lock briefly.
    pub job: std::sync::Arc<Job>,
}
