//! What producers and workers saw during a test, and a checker of Gantry's
//! guarantees (DESIGN §1, §4) over it.
//!
//! A [`History`] is shared by every producer task and worker of a test. It
//! records each acknowledged enqueue, each assignment a worker received
//! (job, fencing token, attempt, session), each result a worker sent with
//! the broker's answer to it, and the sessions workers opened, resumed or
//! lost. At the end the test reads every job back ([`final_jobs`]) and
//! [`History::check`] compares the two sides:
//!
//! - **lost job**: an acknowledged enqueue is not found, or not in the state
//!   it should end in;
//! - **double outcome**: two results of one job accepted as its outcome, a
//!   job given out again after its outcome, or the broker's attempt records
//!   showing two successes;
//! - **token order**: a fencing token used twice, a later assignment of a
//!   job with a smaller token, or tokens that do not grow in commit order;
//! - **double holder**: a job leased to a new session before the previous
//!   lease ended (by the broker's attempt records), one lease delivered to
//!   two sessions, or a session seen lost whose lease the broker kept;
//! - **contradiction**: an answer a worker got that the final state
//!   contradicts (an accepted result that is not the outcome, a refused
//!   result that is).
//!
//! Workers are recorded either by [`worker::RecordingWorker`] (raw
//! `Worker.Connect`, sees every ack) or by [`sdk_worker`] (the SDK, whose
//! per-result acks are not visible: its accepted counts are checked
//! instead, see [`History::sdk_stats`]).

pub mod load;
pub mod worker;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use gantry_proto::v1::{self as proto, AttemptOutcome, JobState};
use gantry_worker::{JobContext, JobError, WorkerHandle};

use crate::RunningWorker;

/// The broker keeps this many attempt records per job (the latest).
pub const HISTORY_MAX: usize = 10;

/// What a worker sent as the end of one lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultKind {
    Complete,
    /// A failure or retry request: the job runs again while attempts remain.
    Fail,
    /// A failure for good (`no_retry`).
    FailFinal,
    /// The job handed back unstarted.
    Release,
}

impl ResultKind {
    /// Results that end the job when accepted.
    fn is_outcome(self) -> bool {
        matches!(self, ResultKind::Complete | ResultKind::FailFinal)
    }
}

/// The broker's answer to a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ack {
    Accepted,
    StaleLease,
    UnknownJob,
    /// Sent through the SDK, which does not show per-result answers.
    NotObserved,
}

impl Ack {
    pub fn from_proto(status: proto::AckStatus) -> Ack {
        match status {
            proto::AckStatus::Accepted => Ack::Accepted,
            proto::AckStatus::StaleLease => Ack::StaleLease,
            proto::AckStatus::UnknownJob | proto::AckStatus::Unspecified => Ack::UnknownJob,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An enqueue the broker acknowledged.
    Enqueued {
        job_id: String,
    },
    /// An enqueue that got no acknowledgement (error or timeout): the job
    /// may or may not exist.
    EnqueueUnacknowledged {
        queue: String,
        error: String,
    },
    /// A `welcome`: a new session, or `resumed` an old one.
    SessionStarted {
        worker: String,
        session: String,
        resumed: bool,
        node_id: u64,
    },
    /// A resume refused: `session` is gone (expired), `replaced_by` is new.
    SessionLost {
        worker: String,
        session: String,
        replaced_by: String,
    },
    /// An `assign`, the first time this worker saw this lease. `session` is
    /// empty when unknown.
    Assigned {
        worker: String,
        session: String,
        job_id: String,
        token: u64,
        attempt: u32,
    },
    Revoked {
        worker: String,
        session: String,
        job_id: String,
        token: u64,
        reason: String,
    },
    /// A result and the broker's answer to it.
    Result {
        worker: String,
        job_id: String,
        token: u64,
        kind: ResultKind,
        ack: Ack,
    },
    /// An SDK worker's counters, taken once it stopped.
    SdkStats {
        worker: String,
        completed: u64,
        failed: u64,
        stale_results: u64,
    },
    /// What the test did (killed a node, paused heartbeats...), for the
    /// timeline printed with a failure.
    Note {
        text: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Since the history began (one clock for the whole test process).
    pub at: Duration,
    pub event: Event,
}

/// Shared by every producer and worker of a test; cheap to clone.
#[derive(Clone)]
pub struct History {
    records: Arc<Mutex<Vec<Record>>>,
    epoch: Instant,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> Self {
        History { records: Arc::default(), epoch: Instant::now() }
    }

    pub fn record(&self, event: Event) {
        let at = self.epoch.elapsed();
        self.records.lock().unwrap_or_else(|p| p.into_inner()).push(Record { at, event });
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes what the test did, for the timeline.
    pub fn note(&self, text: impl Into<String>) {
        self.record(Event::Note { text: text.into() });
    }

    /// Notes, sessions, revokes and refused results in order, one a line:
    /// what to read first when a check fails.
    pub fn timeline(&self) -> String {
        let mut out = String::new();
        for record in self.records() {
            let line = match &record.event {
                Event::Note { text } => format!("test: {text}"),
                Event::SessionStarted { worker, session, resumed, node_id } => {
                    let how = if *resumed { "resumed" } else { "opened" };
                    format!("{worker}: session {session} {how} (welcome from node {node_id})")
                }
                Event::SessionLost { worker, session, replaced_by } => {
                    format!("{worker}: session {session} could not be resumed; new session {replaced_by}")
                }
                Event::Revoked { worker, job_id, token, reason, .. } => {
                    format!("{worker}: revoke of job {job_id} token {token}: {reason}")
                }
                Event::Result { worker, job_id, token, kind, ack }
                    if matches!(ack, Ack::StaleLease | Ack::UnknownJob) =>
                {
                    format!("{worker}: {kind:?} of job {job_id} token {token} answered {ack:?}")
                }
                _ => continue,
            };
            out.push_str(&format!("  {:>10.3?} {line}\n", record.at));
        }
        out
    }

    pub fn enqueued(&self, job_id: &str) {
        self.record(Event::Enqueued { job_id: job_id.to_owned() });
    }

    pub fn enqueue_unacknowledged(&self, queue: &str, error: impl fmt::Display) {
        self.record(Event::EnqueueUnacknowledged { queue: queue.to_owned(), error: error.to_string() });
    }

    /// Job ids of acknowledged enqueues, in acknowledgement order.
    pub fn acknowledged(&self) -> Vec<String> {
        self.records()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Enqueued { job_id } => Some(job_id),
                _ => None,
            })
            .collect()
    }

    /// Every job id the history names (acknowledged or assigned).
    pub fn job_ids(&self) -> BTreeSet<String> {
        self.records()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Enqueued { job_id } | Event::Assigned { job_id, .. } => Some(job_id),
                _ => None,
            })
            .collect()
    }

    /// How many results were accepted (distinct leases), as far as seen.
    pub fn accepted_results(&self) -> usize {
        self.records()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::Result { job_id, token, ack: Ack::Accepted, .. } => Some((job_id, token)),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Records an SDK worker's counters; call once it has stopped (or is
    /// idle), so that every result it sent has been answered.
    pub fn sdk_stats(&self, worker: &str, handle: &WorkerHandle) {
        let stats = handle.stats();
        self.record(Event::SdkStats {
            worker: worker.to_owned(),
            completed: stats.completed,
            failed: stats.failed,
            stale_results: stats.stale_results,
        });
    }

    /// Checks the history against the jobs as they ended (see the module
    /// doc). `Ok` carries a summary to print.
    pub fn check(&self, finals: &FinalJobs, expect: Expect) -> Result<Summary, Violations> {
        check(&self.records(), finals, expect)
    }
}

/// Starts an SDK worker (like [`RunningWorker::spawn`]) whose handler is
/// recorded: each lease it runs, with the session the worker had then, and
/// the result the handler returned (the SDK does not show the broker's
/// answer: see [`History::sdk_stats`]).
pub fn sdk_worker<H, Fut>(
    history: &History,
    endpoint: &str,
    queue: &str,
    worker_id: &str,
    concurrency: u32,
    handler: H,
) -> RunningWorker
where
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    let handle_cell: Arc<OnceLock<WorkerHandle>> = Arc::default();
    let (cell, recorder, name) = (handle_cell.clone(), history.clone(), worker_id.to_owned());
    let handler = Arc::new(handler);
    let worker = RunningWorker::spawn(endpoint, queue, worker_id, concurrency, move |ctx: JobContext| {
        let session = cell.get().and_then(WorkerHandle::session_id).unwrap_or_default();
        let (job_id, token) = (ctx.job_id().to_owned(), ctx.fencing_token());
        recorder.record(Event::Assigned {
            worker: name.clone(),
            session,
            job_id: job_id.clone(),
            token,
            attempt: ctx.attempt(),
        });
        let (recorder, name, handler) = (recorder.clone(), name.clone(), handler.clone());
        async move {
            let result = handler(ctx).await;
            let kind = match &result {
                Ok(_) => ResultKind::Complete,
                Err(JobError::Fatal(_)) => ResultKind::FailFinal,
                Err(_) => ResultKind::Fail,
            };
            recorder.record(Event::Result { worker: name, job_id, token, kind, ack: Ack::NotObserved });
            result
        }
    });
    let _ = handle_cell.set(worker.handle.clone());
    worker
}

/// Each job id of interest with the job as read at the end (`None`: not found).
pub type FinalJobs = BTreeMap<String, Option<proto::Job>>;

/// Reads back every job of `queues` (ListJobs, page by page) and every job
/// of `ids` (GetJob for those not listed). Retries calls a node refuses
/// while a leader is being elected; bounded.
pub async fn final_jobs(
    client: &gantry_worker::Client,
    queues: &[&str],
    ids: impl IntoIterator<Item = String>,
) -> FinalJobs {
    let mut finals = FinalJobs::new();
    for queue in queues {
        let mut page_token = String::new();
        loop {
            let request = proto::ListJobsRequest {
                queue: (*queue).to_owned(),
                state: JobState::Unspecified as i32,
                limit: 1000,
                page_token: page_token.clone(),
            };
            let page = retry("ListJobs", || {
                let mut admin = client.admin();
                let request = request.clone();
                async move { admin.list_jobs(request).await.map(tonic::Response::into_inner) }
            })
            .await;
            for job in page.jobs {
                finals.insert(job.id.clone(), Some(job));
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
    }
    for id in ids {
        if finals.contains_key(&id) {
            continue;
        }
        let job = retry("GetJob", || {
            let mut jobs = client.jobs();
            let request = proto::GetJobRequest { job_id: id.clone() };
            async move {
                match jobs.get_job(request).await {
                    Ok(job) => Ok(Some(job.into_inner())),
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                    Err(status) => Err(status),
                }
            }
        })
        .await;
        finals.insert(id, job);
    }
    finals
}

/// Retries a call that fails with any status (a node between leaders,
/// one being killed), up to 100 times in about 20 s.
async fn retry<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..100 {
        match tokio::time::timeout(Duration::from_secs(5), call()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(status)) => last = Some(format!("{}: {}", status.code(), status.message())),
            Err(_) => last = Some("timed out after 5s".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} kept failing; last error: {}", last.unwrap_or_default());
}

/// Where every acknowledged job must have ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Succeeded,
    /// Any terminal state.
    Terminal,
    /// Only that it exists (the test checks states itself).
    Present,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViolationKind {
    LostJob,
    DoubleOutcome,
    TokenOrder,
    DoubleHolder,
    Contradiction,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::LostJob => "lost job",
            ViolationKind::DoubleOutcome => "double outcome",
            ViolationKind::TokenOrder => "token order",
            ViolationKind::DoubleHolder => "double holder",
            ViolationKind::Contradiction => "contradiction",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub job_id: String,
    pub detail: String,
}

/// Everything the checker found; `Display` lists it for a test failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    pub fn kinds(&self) -> BTreeSet<ViolationKind> {
        self.0.iter().map(|v| v.kind).collect()
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} violation(s) of Gantry's guarantees:", self.0.len())?;
        for v in self.0.iter().take(50) {
            writeln!(f, "  {}: job {}: {}", v.kind, v.job_id, v.detail)?;
        }
        if self.0.len() > 50 {
            writeln!(f, "  ... and {} more", self.0.len() - 50)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// What a passing check saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub acknowledged: usize,
    pub unacknowledged: usize,
    pub jobs_read: usize,
    pub assignments: usize,
    pub reassigned_jobs: usize,
    pub accepted: usize,
    pub stale: usize,
    pub sessions: usize,
    pub resumed: usize,
    pub sessions_lost: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acknowledged enqueues ({} unacknowledged), {} jobs read back, {} assignments ({} jobs reassigned), \
             {} results accepted, {} refused as stale, {} sessions opened, {} resumed, {} lost",
            self.acknowledged,
            self.unacknowledged,
            self.jobs_read,
            self.assignments,
            self.reassigned_jobs,
            self.accepted,
            self.stale,
            self.sessions,
            self.resumed,
            self.sessions_lost
        )
    }
}

fn ms(ts: &Option<prost_types::Timestamp>) -> Option<u64> {
    ts.as_ref().map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

fn describe(record: &proto::AttemptRecord) -> String {
    format!(
        "attempt {} (token {}, session {:?}, worker {:?}, {:?}, started {:?} ms, finished {:?} ms)",
        record.attempt,
        record.fencing_token,
        record.session_id,
        record.worker_id,
        record.outcome(),
        ms(&record.started_at),
        ms(&record.finished_at)
    )
}

/// One result as the workers saw it answered.
struct Sent<'a> {
    at: Duration,
    worker: &'a str,
    token: u64,
    kind: ResultKind,
    ack: Ack,
}

/// One assignment as the workers saw it.
struct Seen<'a> {
    at: Duration,
    worker: &'a str,
    session: &'a str,
    token: u64,
    attempt: u32,
}

/// The checker (see the module doc). `finals` must hold every acknowledged
/// job and every assigned one.
pub fn check(records: &[Record], finals: &FinalJobs, expect: Expect) -> Result<Summary, Violations> {
    let mut found = Vec::new();
    let mut violation = |kind: ViolationKind, job_id: &str, detail: String| {
        found.push(Violation { kind, job_id: job_id.to_owned(), detail });
    };
    let mut summary = Summary { jobs_read: finals.values().flatten().count(), ..Summary::default() };

    // What the workers saw, per job.
    let mut assigned: BTreeMap<&str, Vec<Seen<'_>>> = BTreeMap::new();
    let mut results: BTreeMap<&str, Vec<Sent<'_>>> = BTreeMap::new();
    let mut lost_sessions: BTreeMap<&str, Duration> = BTreeMap::new();
    let mut sdk_stats: BTreeMap<&str, u64> = BTreeMap::new();
    for record in records {
        match &record.event {
            Event::Enqueued { .. } => summary.acknowledged += 1,
            Event::EnqueueUnacknowledged { .. } => summary.unacknowledged += 1,
            Event::SessionStarted { resumed, .. } => {
                summary.sessions += 1;
                summary.resumed += usize::from(*resumed);
            }
            Event::SessionLost { session, .. } => {
                summary.sessions_lost += 1;
                lost_sessions.insert(session, record.at);
            }
            Event::Assigned { worker, session, job_id, token, attempt } => {
                summary.assignments += 1;
                assigned.entry(job_id).or_default().push(Seen {
                    at: record.at,
                    worker,
                    session,
                    token: *token,
                    attempt: *attempt,
                });
            }
            Event::Revoked { .. } | Event::Note { .. } => {}
            Event::Result { worker, job_id, token, kind, ack } => {
                results.entry(job_id).or_default().push(Sent {
                    at: record.at,
                    worker,
                    token: *token,
                    kind: *kind,
                    ack: *ack,
                });
            }
            Event::SdkStats { worker, completed, .. } => {
                sdk_stats.insert(worker, *completed);
            }
        }
    }

    // Lost jobs: every acknowledged enqueue is there, in the state expected.
    for record in records {
        let Event::Enqueued { job_id } = &record.event else { continue };
        match finals.get(job_id) {
            None => violation(ViolationKind::LostJob, job_id, "acknowledged, but never read back".to_owned()),
            Some(None) => violation(
                ViolationKind::LostJob,
                job_id,
                format!("acknowledged at {:?}, but GetJob answers NOT_FOUND", record.at),
            ),
            Some(Some(job)) => {
                let ok = match expect {
                    Expect::Succeeded => job.state() == JobState::Succeeded,
                    Expect::Terminal => {
                        matches!(job.state(), JobState::Succeeded | JobState::Failed | JobState::Cancelled)
                    }
                    Expect::Present => true,
                };
                if !ok {
                    let records: Vec<String> = job.history.iter().map(describe).collect();
                    violation(
                        ViolationKind::LostJob,
                        job_id,
                        format!(
                            "ended {:?} (attempt {}, token {}), expected {expect:?}; attempts: [{}]",
                            job.state(),
                            job.attempt,
                            job.fencing_token,
                            records.join("; ")
                        ),
                    );
                }
            }
        }
    }

    // The broker's own attempt records, job by job and across jobs.
    // Tokens are a shard's: two shards may hand out the same number.
    let mut by_token: BTreeMap<(&str, u64), (&str, u32)> = BTreeMap::new();
    let mut starts: Vec<(&str, u64, u64, &str)> = Vec::new();
    for (job_id, job) in finals.iter().filter_map(|(id, job)| Some((id.as_str(), job.as_ref()?))) {
        let history = &job.history;
        let successes: Vec<String> =
            history.iter().filter(|r| r.outcome() == AttemptOutcome::Succeeded).map(describe).collect();
        if successes.len() > 1 {
            violation(ViolationKind::DoubleOutcome, job_id, format!("succeeded twice: {}", successes.join("; ")));
        }
        if job.state() == JobState::Succeeded {
            match history.last() {
                Some(last)
                    if last.outcome() == AttemptOutcome::Succeeded && last.fencing_token == job.fencing_token => {}
                last => violation(
                    ViolationKind::Contradiction,
                    job_id,
                    format!(
                        "SUCCEEDED with token {}, but its last attempt record is {}",
                        job.fencing_token,
                        last.map(describe).unwrap_or_else(|| "missing".to_owned())
                    ),
                ),
            }
        }
        for (i, record) in history.iter().enumerate() {
            if let Some((other_job, other_attempt)) =
                by_token.insert((shard_of(job_id), record.fencing_token), (job_id, record.attempt))
            {
                violation(
                    ViolationKind::TokenOrder,
                    job_id,
                    format!(
                        "token {} of {} was already given to job {other_job} attempt {other_attempt}",
                        record.fencing_token,
                        describe(record)
                    ),
                );
            }
            if let Some(start) = ms(&record.started_at) {
                starts.push((shard_of(job_id), start, record.fencing_token, job_id));
            }
            let running = record.outcome() == AttemptOutcome::Running;
            if running && (i + 1 != history.len() || job.state() != JobState::Active) {
                violation(
                    ViolationKind::DoubleHolder,
                    job_id,
                    format!("{} still holds the lease, but the job is {:?}", describe(record), job.state()),
                );
            }
            let Some(next) = history.get(i + 1) else { continue };
            if next.fencing_token <= record.fencing_token {
                violation(
                    ViolationKind::TokenOrder,
                    job_id,
                    format!("{} came after {}: its token is not greater", describe(next), describe(record)),
                );
            }
            if record.outcome() == AttemptOutcome::Succeeded {
                violation(
                    ViolationKind::DoubleOutcome,
                    job_id,
                    format!("{} after {}: leased again after its outcome", describe(next), describe(record)),
                );
            }
            let ended_first = match (ms(&record.finished_at), ms(&next.started_at)) {
                (Some(end), Some(start)) => !running && end <= start,
                _ => false,
            };
            if !ended_first {
                violation(
                    ViolationKind::DoubleHolder,
                    job_id,
                    format!("{} began before {} ended", describe(next), describe(record)),
                );
            }
        }
    }
    // Commit order across a shard's jobs: the leader stamps entries with a
    // clock it keeps monotonic, so an assignment stamped later has a
    // greater token.
    starts.sort();
    let mut max_before: Option<(u64, u64, &str)> = None;
    let mut group_max: Option<(u64, u64, &str)> = None;
    let mut shard = None;
    for &(job_shard, start, token, job_id) in &starts {
        if shard.replace(job_shard).is_some_and(|before| before != job_shard) {
            (max_before, group_max) = (None, None);
        }
        if group_max.is_some_and(|(group_start, ..)| group_start < start) {
            max_before = pick_max_token(max_before, group_max);
            group_max = None;
        }
        if let Some((earlier_start, earlier_token, earlier_job)) = max_before
            && earlier_token >= token
        {
            violation(
                ViolationKind::TokenOrder,
                job_id,
                format!(
                    "token {token} assigned at {start} ms is not greater than token {earlier_token} of job \
                     {earlier_job} assigned earlier, at {earlier_start} ms"
                ),
            );
        }
        group_max = pick_max_token(group_max, Some((start, token, job_id)));
    }

    // The workers' side, against the broker's records.
    for (job_id, seen) in &assigned {
        let job = finals.get(*job_id).cloned().flatten();
        let history = job.as_ref().map(|j| j.history.as_slice()).unwrap_or_default();
        let oldest_kept = history.first().map(|r| r.fencing_token).unwrap_or(u64::MAX);
        let truncated = history.len() >= HISTORY_MAX;
        let mut sessions_of_token: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
        for s in seen {
            if !s.session.is_empty() {
                sessions_of_token.entry(s.token).or_default().insert(s.session);
            }
            match history.iter().find(|r| r.fencing_token == s.token) {
                Some(record) if !s.session.is_empty() && record.session_id != s.session => violation(
                    ViolationKind::DoubleHolder,
                    job_id,
                    format!(
                        "worker {} got token {} in session {}, but the broker's record is {}",
                        s.worker,
                        s.token,
                        s.session,
                        describe(record)
                    ),
                ),
                Some(record)
                    if lost_sessions.contains_key(s.session) && record.outcome() == AttemptOutcome::Running =>
                {
                    violation(
                        ViolationKind::DoubleHolder,
                        job_id,
                        format!(
                            "worker {} saw session {} lost, but the broker still leases the job to it: {}",
                            s.worker,
                            s.session,
                            describe(record)
                        ),
                    )
                }
                Some(_) => {}
                None if job.is_some() && !(truncated && s.token < oldest_kept) => violation(
                    ViolationKind::Contradiction,
                    job_id,
                    format!(
                        "worker {} got token {} (attempt {}) at {:?}, which the broker never recorded: [{}]",
                        s.worker,
                        s.token,
                        s.attempt,
                        s.at,
                        history.iter().map(describe).collect::<Vec<_>>().join("; ")
                    ),
                ),
                None => {}
            }
        }
        for (token, sessions) in &sessions_of_token {
            if sessions.len() > 1 {
                violation(
                    ViolationKind::DoubleHolder,
                    job_id,
                    format!("token {token} was delivered to {} sessions: {sessions:?}", sessions.len()),
                );
            }
        }
        for a in seen {
            for b in seen {
                if a.attempt < b.attempt && a.token >= b.token {
                    violation(
                        ViolationKind::TokenOrder,
                        job_id,
                        format!(
                            "attempt {} came with token {} (worker {}), but the earlier attempt {} had token {} \
                             (worker {})",
                            b.attempt, b.token, b.worker, a.attempt, a.token, a.worker
                        ),
                    );
                }
            }
        }
        if seen.iter().map(|s| s.token).collect::<BTreeSet<_>>().len() > 1 {
            summary.reassigned_jobs += 1;
        }
    }

    for (job_id, sent) in &results {
        let job = finals.get(*job_id).cloned().flatten();
        let outcomes: BTreeSet<u64> =
            sent.iter().filter(|r| r.kind.is_outcome() && r.ack == Ack::Accepted).map(|r| r.token).collect();
        summary.accepted +=
            sent.iter().filter(|r| r.ack == Ack::Accepted).map(|r| r.token).collect::<BTreeSet<_>>().len();
        summary.stale += sent.iter().filter(|r| r.ack == Ack::StaleLease).count();
        if outcomes.len() > 1 {
            violation(
                ViolationKind::DoubleOutcome,
                job_id,
                format!("results of tokens {outcomes:?} were all accepted as the job's outcome"),
            );
        }
        let later: Vec<String> = assigned
            .get(job_id)
            .into_iter()
            .flatten()
            .filter(|s| outcomes.iter().any(|t| s.token > *t))
            .map(|s| format!("token {} to worker {} at {:?}", s.token, s.worker, s.at))
            .collect();
        if !later.is_empty() {
            violation(
                ViolationKind::DoubleOutcome,
                job_id,
                format!("assigned again after an outcome was accepted (tokens {outcomes:?}): {}", later.join(", ")),
            );
        }
        let Some(job) = job else { continue };
        for Sent { at, worker, token, kind, ack } in sent {
            let won = job.state() == JobState::Succeeded && job.fencing_token == *token;
            let contradiction = match (kind, ack) {
                (ResultKind::Complete, Ack::Accepted) => !won,
                (ResultKind::Complete, Ack::StaleLease | Ack::UnknownJob) => won,
                _ => false,
            };
            if contradiction {
                violation(
                    ViolationKind::Contradiction,
                    job_id,
                    format!(
                        "worker {worker}'s complete with token {token} was answered {ack:?} at {at:?}, but the job \
                         ended {:?} with token {}",
                        job.state(),
                        job.fencing_token
                    ),
                );
            }
        }
    }

    // SDK workers: their accepted completes are exactly the jobs they won.
    for (worker, completed) in sdk_stats {
        let won = assigned
            .iter()
            .filter(|(job_id, seen)| {
                finals.get(**job_id).cloned().flatten().is_some_and(|job| {
                    job.state() == JobState::Succeeded
                        && seen.iter().any(|s| s.worker == worker && s.token == job.fencing_token)
                })
            })
            .count() as u64;
        if completed != won {
            violation(
                ViolationKind::DoubleOutcome,
                &format!("(every job of worker {worker})"),
                format!("the SDK counted {completed} accepted completes, but the worker won {won} jobs"),
            );
        }
        summary.accepted += completed as usize;
    }

    if found.is_empty() { Ok(summary) } else { Err(Violations(found)) }
}

/// The shard part of a job id (`<shard>-<seq>`).
fn shard_of(job_id: &str) -> &str {
    job_id.split_once('-').map_or(job_id, |(shard, _)| shard)
}

/// The entry with the greatest token (ties: the first).
fn pick_max_token<'a>(a: Option<(u64, u64, &'a str)>, b: Option<(u64, u64, &'a str)>) -> Option<(u64, u64, &'a str)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.1 > x.1 { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
    }

    /// An attempt record: (attempt, session, token, started, finished, outcome).
    fn attempt(
        attempt: u32,
        session: &str,
        token: u64,
        started: u64,
        finished: Option<u64>,
        outcome: AttemptOutcome,
    ) -> proto::AttemptRecord {
        proto::AttemptRecord {
            attempt,
            worker_id: format!("w-{session}"),
            session_id: session.to_owned(),
            fencing_token: token,
            started_at: ts(started),
            finished_at: finished.and_then(ts),
            outcome: outcome as i32,
            error: String::new(),
        }
    }

    fn job(id: &str, state: JobState, history: Vec<proto::AttemptRecord>) -> proto::Job {
        proto::Job {
            id: id.to_owned(),
            queue: "q".to_owned(),
            state: state as i32,
            attempt: history.last().map_or(0, |r| r.attempt),
            fencing_token: history.last().map_or(0, |r| r.fencing_token),
            history,
            ..Default::default()
        }
    }

    fn rec(at_ms: u64, event: Event) -> Record {
        Record { at: Duration::from_millis(at_ms), event }
    }

    fn enqueued(at: u64, job_id: &str) -> Record {
        rec(at, Event::Enqueued { job_id: job_id.to_owned() })
    }

    fn assigned(at: u64, worker: &str, session: &str, job_id: &str, token: u64, attempt: u32) -> Record {
        rec(
            at,
            Event::Assigned {
                worker: worker.to_owned(),
                session: session.to_owned(),
                job_id: job_id.to_owned(),
                token,
                attempt,
            },
        )
    }

    fn result(at: u64, worker: &str, job_id: &str, token: u64, kind: ResultKind, ack: Ack) -> Record {
        rec(at, Event::Result { worker: worker.to_owned(), job_id: job_id.to_owned(), token, kind, ack })
    }

    fn finals_of(jobs: Vec<proto::Job>) -> FinalJobs {
        jobs.into_iter().map(|j| (j.id.clone(), Some(j))).collect()
    }

    /// The zc.async story done right: A goes silent, its session expires,
    /// B gets the job with a greater token and completes it, A's late
    /// result is refused.
    fn good() -> (Vec<Record>, FinalJobs) {
        let records = vec![
            enqueued(1, "0-1"),
            enqueued(2, "0-2"),
            rec(3, Event::SessionStarted { worker: "a".into(), session: "sa".into(), resumed: false, node_id: 1 }),
            rec(3, Event::SessionStarted { worker: "b".into(), session: "sb".into(), resumed: false, node_id: 1 }),
            assigned(4, "a", "sa", "0-1", 10, 1),
            assigned(4, "b", "sb", "0-2", 11, 1),
            result(5, "b", "0-2", 11, ResultKind::Complete, Ack::Accepted),
            assigned(20, "b", "sb", "0-1", 30, 2),
            result(21, "b", "0-1", 30, ResultKind::Complete, Ack::Accepted),
            result(22, "a", "0-1", 10, ResultKind::Complete, Ack::StaleLease),
            rec(23, Event::SessionLost { worker: "a".into(), session: "sa".into(), replaced_by: "sa2".into() }),
        ];
        let finals = finals_of(vec![
            job(
                "0-1",
                JobState::Succeeded,
                vec![
                    attempt(1, "sa", 10, 1000, Some(2000), AttemptOutcome::SessionExpired),
                    attempt(2, "sb", 30, 2001, Some(2100), AttemptOutcome::Succeeded),
                ],
            ),
            job("0-2", JobState::Succeeded, vec![attempt(1, "sb", 11, 1000, Some(1050), AttemptOutcome::Succeeded)]),
        ]);
        (records, finals)
    }

    #[test]
    fn a_correct_history_passes() {
        let (records, finals) = good();
        let summary = check(&records, &finals, Expect::Succeeded).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(summary.acknowledged, 2);
        assert_eq!(summary.assignments, 3);
        assert_eq!(summary.reassigned_jobs, 1);
        assert_eq!(summary.accepted, 2);
        assert_eq!(summary.stale, 1);
        assert_eq!(summary.sessions_lost, 1);
    }

    #[test]
    fn a_lost_job_fails() {
        let (mut records, mut finals) = good();
        records.push(enqueued(30, "0-3"));
        finals.insert("0-3".into(), None);
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert_eq!(violations.kinds(), [ViolationKind::LostJob].into());
        assert!(violations.to_string().contains("job 0-3: acknowledged at 30ms, but GetJob answers NOT_FOUND"));

        // Found, but not done.
        let (records, mut finals) = good();
        finals.insert(
            "0-2".into(),
            Some(job("0-2", JobState::Ready, vec![attempt(1, "sb", 11, 1000, Some(1050), AttemptOutcome::Released)])),
        );
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.kinds().contains(&ViolationKind::LostJob), "{violations}");
        assert!(violations.to_string().contains("ended Ready"), "{violations}");
    }

    #[test]
    fn a_double_outcome_fails() {
        // Both the silent worker's and the new holder's results accepted.
        let (mut records, finals) = good();
        records.retain(|r| !matches!(&r.event, Event::Result { worker, .. } if worker == "a"));
        records.push(result(22, "a", "0-1", 10, ResultKind::Complete, Ack::Accepted));
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.kinds().contains(&ViolationKind::DoubleOutcome), "{violations}");
        assert!(violations.to_string().contains("tokens {10, 30} were all accepted"), "{violations}");

        // The broker's records show two successes.
        let (records, mut finals) = good();
        finals.insert(
            "0-1".into(),
            Some(job(
                "0-1",
                JobState::Succeeded,
                vec![
                    attempt(1, "sa", 10, 1000, Some(2000), AttemptOutcome::Succeeded),
                    attempt(2, "sb", 30, 2001, Some(2100), AttemptOutcome::Succeeded),
                ],
            )),
        );
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.kinds().contains(&ViolationKind::DoubleOutcome), "{violations}");
        assert!(violations.to_string().contains("succeeded twice"), "{violations}");

        // An SDK worker counted more accepted completes than jobs it won.
        let (mut records, finals) = good();
        records.push(rec(40, Event::SdkStats { worker: "b".into(), completed: 3, failed: 0, stale_results: 0 }));
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.to_string().contains("counted 3 accepted completes, but the worker won 2"), "{violations}");
    }

    #[test]
    fn a_token_regression_fails() {
        // The reassignment came with a smaller token than the first lease.
        let (mut records, _) = good();
        for r in &mut records {
            match &mut r.event {
                Event::Assigned { token, .. } | Event::Result { token, .. } if *token == 30 => *token = 9,
                _ => {}
            }
        }
        let finals = finals_of(vec![
            job(
                "0-1",
                JobState::Succeeded,
                vec![
                    attempt(1, "sa", 10, 1000, Some(2000), AttemptOutcome::SessionExpired),
                    attempt(2, "sb", 9, 2001, Some(2100), AttemptOutcome::Succeeded),
                ],
            ),
            job("0-2", JobState::Succeeded, vec![attempt(1, "sb", 11, 1000, Some(1050), AttemptOutcome::Succeeded)]),
        ]);
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.kinds().contains(&ViolationKind::TokenOrder), "{violations}");
        let text = violations.to_string();
        assert!(text.contains("attempt 2 came with token 9"), "{text}");
        assert!(text.contains("its token is not greater"), "{text}");
        assert!(text.contains("token 9 assigned at 2001 ms is not greater than token 11"), "{text}");

        // One token given to two jobs.
        let (records, mut finals) = good();
        finals.insert(
            "0-2".into(),
            Some(job(
                "0-2",
                JobState::Succeeded,
                vec![attempt(1, "sb", 10, 1000, Some(1050), AttemptOutcome::Succeeded)],
            )),
        );
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.to_string().contains("token 10 of attempt 1"), "{violations}");
    }

    #[test]
    fn tokens_are_compared_within_a_shard_only() {
        // Shard 1 hands out its own tokens: the same number as shard 0's,
        // and a smaller one later, are both fine there.
        let (mut records, mut finals) = good();
        records.push(enqueued(30, "1-1"));
        records.push(enqueued(30, "1-2"));
        records.push(assigned(31, "b", "sb", "1-1", 10, 1));
        records.push(result(32, "b", "1-1", 10, ResultKind::Complete, Ack::Accepted));
        records.push(assigned(33, "b", "sb", "1-2", 11, 1));
        records.push(result(34, "b", "1-2", 11, ResultKind::Complete, Ack::Accepted));
        finals.insert(
            "1-1".into(),
            Some(job(
                "1-1",
                JobState::Succeeded,
                vec![attempt(1, "sb", 10, 3000, Some(3001), AttemptOutcome::Succeeded)],
            )),
        );
        finals.insert(
            "1-2".into(),
            Some(job(
                "1-2",
                JobState::Succeeded,
                vec![attempt(1, "sb", 11, 3002, Some(3003), AttemptOutcome::Succeeded)],
            )),
        );
        check(&records, &finals, Expect::Succeeded).unwrap_or_else(|v| panic!("{v}"));

        // Within shard 1, the same token twice is still caught.
        finals.insert(
            "1-2".into(),
            Some(job(
                "1-2",
                JobState::Succeeded,
                vec![attempt(1, "sb", 10, 3002, Some(3003), AttemptOutcome::Succeeded)],
            )),
        );
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.to_string().contains("token 10 of attempt 1"), "{violations}");
    }

    #[test]
    fn a_double_holder_fails() {
        // The broker leased the job to B before A's lease ended.
        let (records, mut finals) = good();
        finals.insert(
            "0-1".into(),
            Some(job(
                "0-1",
                JobState::Succeeded,
                vec![
                    attempt(1, "sa", 10, 1000, Some(2500), AttemptOutcome::SessionExpired),
                    attempt(2, "sb", 30, 2001, Some(2600), AttemptOutcome::Succeeded),
                ],
            )),
        );
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert_eq!(violations.kinds(), [ViolationKind::DoubleHolder].into(), "{violations}");
        assert!(violations.to_string().contains("began before attempt 1 (token 10"), "{violations}");

        // One lease delivered to two sessions.
        let (mut records, finals) = good();
        records.push(assigned(21, "c", "sc", "0-1", 30, 2));
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert!(violations.kinds().contains(&ViolationKind::DoubleHolder), "{violations}");
        assert!(violations.to_string().contains("token 30 was delivered to 2 sessions"), "{violations}");

        // A worker saw its session lost, but the broker kept its lease.
        let records = vec![
            enqueued(1, "0-5"),
            assigned(2, "a", "sa", "0-5", 40, 1),
            rec(9, Event::SessionLost { worker: "a".into(), session: "sa".into(), replaced_by: "sa2".into() }),
        ];
        let finals = finals_of(vec![job(
            "0-5",
            JobState::Active,
            vec![attempt(1, "sa", 40, 1000, None, AttemptOutcome::Running)],
        )]);
        let violations = check(&records, &finals, Expect::Present).unwrap_err();
        assert_eq!(violations.kinds(), [ViolationKind::DoubleHolder].into(), "{violations}");
        assert!(violations.to_string().contains("saw session sa lost"), "{violations}");
    }

    #[test]
    fn an_answer_the_final_state_contradicts_fails() {
        // The new holder was told STALE_LEASE, yet its result is the outcome.
        let (mut records, finals) = good();
        for r in &mut records {
            if let Event::Result { token: 30, ack, .. } = &mut r.event {
                *ack = Ack::StaleLease;
            }
        }
        let violations = check(&records, &finals, Expect::Succeeded).unwrap_err();
        assert_eq!(violations.kinds(), [ViolationKind::Contradiction].into(), "{violations}");
        assert!(violations.to_string().contains("answered StaleLease"), "{violations}");
    }
}
