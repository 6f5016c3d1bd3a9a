//! `QueueState`: every job, queue and session of one shard, and the one
//! function that changes them, `apply`. Deterministic: same log, same state.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Bound,
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    command::{Applied, Assignment, Batch, Command, Event, ExpiryReason, NewJob, PurgeCursor, Rejection, RetryRequest},
    config::{QueueConfig, QueueConfigUpdate},
    ids::{FencingToken, JobId, SessionId, ShardId},
    job::{AttemptRecord, Job, JobMore, JobState, JobView, Lease, More, Outcome, Status},
    payload::Payload,
    tally::Tally,
};

/// Expired sessions are remembered this long so that a worker resuming one
/// learns which jobs it lost (it gets a `revoke` for each).
pub const EXPIRED_SESSION_MEMORY_MS: u64 = 60 * 60 * 1000;

/// The collections that grow with the number of jobs are persistent maps:
/// a snapshot's copy of the state under the state lock costs the same with
/// a million jobs as with none (a `BTreeMap` clone of ~600k jobs held apply
/// up for 70-190 ms, seconds with millions retained), and the applies
/// meanwhile copy only the tree nodes they touch. They cost about 1.5x a
/// `BTreeMap` per operation (benches/apply.rs).
pub type Jobs = imbl::OrdMap<JobId, Arc<Job>>;
type Index<T> = imbl::OrdSet<T>;

/// Reads a persistent map entry by entry. imbl's own `Deserialize` reserves
/// room for the length a snapshot claims before reading an entry, so a
/// damaged length aborted the process instead of failing the decode.
fn deserialize_ord_map<'de, D, K, V>(deserializer: D) -> Result<imbl::OrdMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord + Clone,
    V: Deserialize<'de> + Clone,
{
    struct EntryByEntry<K, V>(std::marker::PhantomData<(K, V)>);
    impl<'de, K, V> serde::de::Visitor<'de> for EntryByEntry<K, V>
    where
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        type Value = imbl::OrdMap<K, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Self::Value, A::Error> {
            let mut map = imbl::OrdMap::new();
            while let Some((key, value)) = entries.next_entry()? {
                map.insert(key, value);
            }
            Ok(map)
        }
    }
    deserializer.deserialize_map(EntryByEntry(std::marker::PhantomData))
}

/// Dispatch order inside a queue: priority (higher first), then run_at, then
/// enqueue order. Holds SCHEDULED and READY jobs alike.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct PendingKey {
    neg_priority: i64,
    run_at_ms: u64,
    seq: u64,
}

impl PendingKey {
    fn of(job: &Job) -> Self {
        PendingKey { neg_priority: -i64::from(job.priority), run_at_ms: job.run_at_ms, seq: job.id.seq }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub config: QueueConfig,
    pub paused: bool,
    pending: Index<PendingKey>,
    pub active: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    #[serde(deserialize_with = "deserialize_ord_map")]
    idempotency: imbl::OrdMap<String, JobId>,
    /// (second, dispatches in it) for `rate_limit`.
    rate_window: (u64, u32),
}

impl Queue {
    pub fn pending(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Finished jobs retained in a terminal state.
    fn count_of(&self, state: JobState) -> u64 {
        match state {
            JobState::Succeeded => self.succeeded,
            JobState::Failed => self.failed,
            JobState::Cancelled => self.cancelled,
            JobState::Scheduled | JobState::Ready | JobState::Active => 0,
        }
    }

    /// Non-terminal jobs: what `max_depth` bounds.
    pub fn depth(&self) -> u64 {
        self.pending() + self.active
    }

    /// The best pending job that is due at `now_ms`. Skips whole priority
    /// levels whose earliest job is still in the future.
    fn first_due(&self, now_ms: u64) -> Option<PendingKey> {
        let mut next = self.pending.get_min().copied();
        while let Some(key) = next {
            if key.run_at_ms <= now_ms {
                return Some(key);
            }
            let level_end = PendingKey { neg_priority: key.neg_priority + 1, run_at_ms: 0, seq: 0 };
            next = self.pending.range(level_end..).next().copied();
        }
        None
    }

    /// Earliest run_at among pending jobs (due or not).
    pub fn next_run_at_ms(&self) -> Option<u64> {
        let mut best: Option<u64> = None;
        let mut next = self.pending.get_min().copied();
        while let Some(key) = next {
            best = Some(best.map_or(key.run_at_ms, |b| b.min(key.run_at_ms)));
            let level_end = PendingKey { neg_priority: key.neg_priority + 1, run_at_ms: 0, seq: 0 };
            next = self.pending.range(level_end..).next().copied();
        }
        best
    }

    /// The earliest run_at among due jobs: how long work has been waiting.
    pub fn oldest_due_run_at_ms(&self, now_ms: u64) -> Option<u64> {
        self.pending.iter().filter(|k| k.run_at_ms <= now_ms).map(|k| k.run_at_ms).min()
    }

    /// Jobs that are pending but not yet due, and the ones that are due.
    pub fn scheduled_and_ready(&self, now_ms: u64) -> (u64, u64) {
        let scheduled = self.pending.iter().filter(|k| k.run_at_ms > now_ms).count() as u64;
        (scheduled, self.pending() - scheduled)
    }

    /// Can this queue hand out one more job at `now_ms`?
    fn can_dispatch(&self, now_ms: u64) -> bool {
        if self.paused {
            return false;
        }
        if self.config.concurrency_limit > 0 && self.active >= u64::from(self.config.concurrency_limit) {
            return false;
        }
        if self.config.rate_limit > 0 {
            let (second, used) = self.rate_window;
            if second == now_ms / 1000 && used >= self.config.rate_limit {
                return false;
            }
        }
        true
    }

    /// A key stays taken while its job is retained; then it may be reused.
    fn forget_idempotency_key(&mut self, key: Option<&str>, job_id: JobId) {
        if let Some(key) = key
            && self.idempotency.get(key) == Some(&job_id)
        {
            self.idempotency.remove(key);
        }
    }

    fn note_dispatch(&mut self, now_ms: u64) {
        let second = now_ms / 1000;
        if self.rate_window.0 == second {
            self.rate_window.1 += 1;
        } else {
            self.rate_window = (second, 1);
        }
    }

    pub fn has_due(&self, now_ms: u64) -> bool {
        self.can_dispatch(now_ms) && self.first_due(now_ms).is_some()
    }

    /// The idempotency keys of the queue's retained and pending jobs, by key.
    pub fn idempotency_keys(&self) -> impl Iterator<Item = (&String, &JobId)> {
        self.idempotency.iter()
    }

    /// (second, dispatches in it) for `rate_limit`.
    pub fn rate_window(&self) -> (u64, u32) {
        self.rate_window
    }
}

/// A queue as a snapshot stores it: what does not follow from its jobs.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueParts {
    pub name: String,
    pub config: QueueConfig,
    pub paused: bool,
    pub idempotency: Vec<(String, JobId)>,
    pub rate_window: (u64, u32),
}

/// A session as a snapshot stores it (the jobs it holds follow from the jobs'
/// leases).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionParts {
    pub session_id: SessionId,
    pub worker_id: String,
    pub queues: Vec<String>,
    pub max_in_flight: u32,
    pub opened_ms: u64,
}

/// A state as a snapshot stores it: its content without the indexes that
/// follow from it, which [`QueueState::restore`] rebuilds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateParts {
    pub shard: ShardId,
    pub now_ms: u64,
    pub next_seq: u64,
    pub last_token: FencingToken,
    /// Each job allocated once, where the state keeps it: a restore does
    /// not hold every job twice (a vector of a million jobs, then their
    /// copies, left the allocator that much larger).
    pub jobs: Vec<Arc<Job>>,
    pub queues: Vec<QueueParts>,
    pub sessions: Vec<SessionParts>,
    pub expired_sessions: Vec<(SessionId, ExpiredSession)>,
    pub format: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub worker_id: String,
    pub queues: Vec<String>,
    pub max_in_flight: u32,
    pub held: BTreeSet<JobId>,
    pub opened_ms: u64,
}

impl Session {
    pub fn free_slots(&self) -> u32 {
        self.max_in_flight.saturating_sub(self.held.len() as u32)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredSession {
    pub expired_ms: u64,
    pub reason: ExpiryReason,
    /// The leases it lost.
    pub lost: Vec<(JobId, FencingToken)>,
}

/// One shard's replicated queue state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    shard: ShardId,
    /// The latest leader stamp applied; never moves backwards.
    now_ms: u64,
    next_seq: u64,
    last_token: FencingToken,
    /// Shared with a snapshot being encoded: [`job_mut`] copies a job only
    /// while the snapshot still holds it.
    #[serde(deserialize_with = "deserialize_ord_map")]
    jobs: Jobs,
    queues: BTreeMap<String, Queue>,
    sessions: BTreeMap<SessionId, Session>,
    expired_sessions: BTreeMap<SessionId, ExpiredSession>,
    expired_order: BTreeSet<(u64, SessionId)>,
    lease_deadlines: Index<(u64, JobId)>,
    retention: Index<(u64, JobId)>,
    /// The shard's format (its gate): the commands it accepts and how its
    /// state is encoded. Only `SetFormat` changes it. Not in the format-0
    /// (postcard) encoding, which is only written while it is 0.
    #[serde(skip)]
    format: u32,
}

/// What one entry did: a result per command, events for the leader, and
/// counts per queue for metrics.
#[derive(Debug, Default)]
pub struct ApplyOutput {
    pub results: Vec<Applied>,
    pub events: Vec<Event>,
    pub tally: Tally,
}

impl ApplyOutput {
    /// The leases the entry's dispatches handed out, in order.
    pub fn assignments(&self) -> impl Iterator<Item = &Assignment> {
        self.events.iter().filter_map(|event| match event {
            Event::Assigned(assignment) => Some(assignment),
            _ => None,
        })
    }
}

/// The one way a job is changed: copied first if a snapshot being encoded
/// still shares it. A free function over the map, so that callers may hold
/// other fields of the state meanwhile.
impl QueueState {
    /// Puts `payload` in place of job `job_id`'s payload, if the job is
    /// still there and it is the same length: the same bytes,
    /// somewhere else (see [`Payload`]). Not a command: where a payload lives
    /// is this node's business, not the shard's state.
    pub fn move_payload(&mut self, job_id: JobId, payload: Payload) -> bool {
        let Some(job) = self.jobs.get(&job_id) else { return false };
        if job.payload.len() != payload.len() {
            return false;
        }
        match job_mut(&mut self.jobs, job_id) {
            Some(job) => {
                job.payload = payload;
                true
            }
            None => false,
        }
    }
}

fn job_mut(jobs: &mut Jobs, id: JobId) -> Option<&mut Job> {
    jobs.get_mut(&id).map(Arc::make_mut)
}

/// Whether `token` holds `job`'s current lease. `Ok(None)` means a repeat
/// of a result already recorded for that token with an outcome in
/// `repeat_of`.
fn lease_check(job: &Job, token: FencingToken, repeat_of: &[Outcome]) -> Result<Option<()>, Rejection> {
    match job.lease() {
        Some(lease) if lease.token == token => Ok(Some(())),
        _ => match job.attempt_with_token(token) {
            Some(record) if repeat_of.contains(&record.outcome) => Ok(None),
            _ => Err(Rejection::StaleLease { job_id: job.id, token }),
        },
    }
}

/// Ends `job`'s current lease: its status, the deadline index, the
/// holder's held set and its queue's active count. Over the fields it needs,
/// so a caller already holding the job needs no second lookup.
fn end_lease_of(
    job: &mut Job,
    queue: &mut Queue,
    lease_deadlines: &mut Index<(u64, JobId)>,
    sessions: &mut BTreeMap<SessionId, Session>,
) -> Lease {
    let Status::Active(lease) = std::mem::replace(&mut job.status, Status::Pending) else {
        panic!("job {} has no lease to end", job.id);
    };
    lease_deadlines.remove(&(lease.deadline_ms, job.id));
    if let Some(session) = sessions.get_mut(&lease.session_id) {
        session.held.remove(&job.id);
    }
    queue.active -= 1;
    *lease
}

/// Moves `job` (of `queue`) into a terminal `status` and the retention
/// index.
fn finish_of(
    job: &mut Job,
    status: Status,
    now: u64,
    queue: &mut Queue,
    retention: &mut Index<(u64, JobId)>,
    events: &mut Vec<Event>,
    tally: &mut Tally,
) {
    let counts = tally.queue(&job.queue);
    match status {
        Status::Succeeded => {
            queue.succeeded += 1;
            counts.succeeded += 1;
        }
        Status::Failed => {
            queue.failed += 1;
            counts.failed += 1;
        }
        Status::Cancelled => {
            queue.cancelled += 1;
            counts.cancelled += 1;
        }
        Status::Pending | Status::Active(_) => {
            unreachable!("finish into a non-terminal status")
        }
    }
    job.status = status;
    job.more_mut().finished_ms = Some(now);
    let until = now.saturating_add(queue.config.retention_ms);
    job.more_mut().retain_until_ms = Some(until);
    retention.insert((until, job.id));
    events.push(Event::Finished { job_id: job.id });
}

/// Wake-ups are hints: one per queue per run of commands is enough, and a
/// busy entry would otherwise carry one per job.
fn note_work(events: &mut Vec<Event>, queue: &str) {
    let recent = events.iter().rev().take(4).any(|e| matches!(e, Event::WorkAvailable { queue: q } if q == queue));
    if !recent {
        events.push(Event::WorkAvailable { queue: queue.to_owned() });
    }
}

fn note_capacity(events: &mut Vec<Event>, session_id: SessionId) {
    let recent =
        events.iter().rev().take(4).any(|e| matches!(e, Event::CapacityFreed { session_id: s } if *s == session_id));
    if !recent {
        events.push(Event::CapacityFreed { session_id });
    }
}

impl QueueState {
    pub fn new(shard: ShardId) -> Self {
        QueueState {
            shard,
            now_ms: 0,
            next_seq: 1,
            last_token: FencingToken(0),
            jobs: Jobs::new(),
            queues: BTreeMap::new(),
            sessions: BTreeMap::new(),
            expired_sessions: BTreeMap::new(),
            expired_order: BTreeSet::new(),
            lease_deadlines: Index::new(),
            retention: Index::new(),
            format: 0,
        }
    }

    /// The shard's active format (see [`Command::SetFormat`]).
    pub fn format(&self) -> u32 {
        self.format
    }

    /// The sequence the next enqueued job gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn expired_sessions(&self) -> &BTreeMap<SessionId, ExpiredSession> {
        &self.expired_sessions
    }

    /// Everything but the jobs, as a snapshot stores it (the jobs are read
    /// one by one from [`QueueState::jobs`]).
    pub fn parts_without_jobs(&self) -> StateParts {
        StateParts {
            shard: self.shard,
            now_ms: self.now_ms,
            next_seq: self.next_seq,
            last_token: self.last_token,
            jobs: Vec::new(),
            queues: self
                .queues
                .iter()
                .map(|(name, q)| QueueParts {
                    name: name.clone(),
                    config: q.config.clone(),
                    paused: q.paused,
                    idempotency: q.idempotency.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    rate_window: q.rate_window,
                })
                .collect(),
            sessions: self
                .sessions
                .iter()
                .map(|(id, s)| SessionParts {
                    session_id: id.clone(),
                    worker_id: s.worker_id.clone(),
                    queues: s.queues.clone(),
                    max_in_flight: s.max_in_flight,
                    opened_ms: s.opened_ms,
                })
                .collect(),
            expired_sessions: self.expired_sessions.iter().map(|(id, e)| (id.clone(), e.clone())).collect(),
            format: self.format,
        }
    }

    /// The state `parts` describe, its indexes rebuilt from its jobs; a
    /// description no state can have (a job of an unknown queue or session,
    /// one id twice) is refused, naming what is wrong.
    pub fn restore(parts: StateParts) -> Result<QueueState, String> {
        let mut state = QueueState::new(parts.shard);
        state.now_ms = parts.now_ms;
        state.next_seq = parts.next_seq;
        state.last_token = parts.last_token;
        state.format = parts.format;
        for q in parts.queues {
            let queue = Queue {
                config: q.config,
                paused: q.paused,
                idempotency: q.idempotency.into_iter().collect(),
                rate_window: q.rate_window,
                ..Queue::default()
            };
            if state.queues.insert(q.name.clone(), queue).is_some() {
                return Err(format!("queue {:?} twice", q.name));
            }
        }
        for s in parts.sessions {
            let session = Session {
                worker_id: s.worker_id,
                queues: s.queues,
                max_in_flight: s.max_in_flight,
                held: BTreeSet::new(),
                opened_ms: s.opened_ms,
            };
            if state.sessions.insert(s.session_id.clone(), session).is_some() {
                return Err(format!("session {} twice", s.session_id));
            }
        }
        for (id, expired) in parts.expired_sessions {
            state.expired_order.insert((expired.expired_ms, id.clone()));
            if state.expired_sessions.insert(id.clone(), expired).is_some() {
                return Err(format!("expired session {id} twice"));
            }
        }
        for job in parts.jobs {
            let id = job.id;
            if id.shard != state.shard {
                return Err(format!("job {id} in shard {}", state.shard));
            }
            let queue =
                state.queues.get_mut(&job.queue).ok_or_else(|| format!("job {id} of unknown queue {:?}", job.queue))?;
            match &job.status {
                Status::Pending => {
                    queue.pending.insert(PendingKey::of(&job));
                }
                Status::Active(lease) => {
                    let session = state
                        .sessions
                        .get_mut(&lease.session_id)
                        .ok_or_else(|| format!("job {id} leased to unknown session {}", lease.session_id))?;
                    session.held.insert(id);
                    state.lease_deadlines.insert((lease.deadline_ms, id));
                    queue.active += 1;
                }
                Status::Succeeded | Status::Failed | Status::Cancelled => {
                    match job.status {
                        Status::Succeeded => queue.succeeded += 1,
                        Status::Failed => queue.failed += 1,
                        _ => queue.cancelled += 1,
                    }
                    let until =
                        job.retain_until_ms().ok_or_else(|| format!("finished job {id} without a retention time"))?;
                    state.retention.insert((until, id));
                }
            }
            if state.jobs.insert(id, job).is_some() {
                return Err(format!("job {id} twice"));
            }
        }
        Ok(state)
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn last_token(&self) -> FencingToken {
        self.last_token
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).map(|job| &**job)
    }

    pub fn view(&self, id: JobId, now_ms: u64) -> Option<JobView> {
        self.jobs.get(&id).map(|job| JobView { state: job.state_at(now_ms), job: job.clone() })
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    pub fn queues(&self) -> &BTreeMap<String, Queue> {
        &self.queues
    }

    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.get(name)
    }

    pub fn sessions(&self) -> &BTreeMap<SessionId, Session> {
        &self.sessions
    }

    pub fn session(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn expired_session(&self, id: &SessionId) -> Option<&ExpiredSession> {
        self.expired_sessions.get(id)
    }

    /// The earliest lease deadline: when the leader should propose a `Tick`.
    pub fn next_lease_deadline_ms(&self) -> Option<u64> {
        self.lease_deadlines.get_min().map(|(d, _)| *d)
    }

    #[cfg(test)]
    pub(super) fn retention_index_holds(&self, until_ms: u64, job_id: JobId) -> bool {
        self.retention.contains(&(until_ms, job_id))
    }

    #[cfg(test)]
    pub(super) fn retention_index_len(&self) -> usize {
        self.retention.len()
    }

    pub fn next_retention_ms(&self) -> Option<u64> {
        self.retention.get_min().map(|(d, _)| *d)
    }

    /// Would a `Dispatch` of this session assign anything at `now_ms`?
    pub fn dispatchable(&self, session_id: &SessionId, now_ms: u64) -> bool {
        let Some(session) = self.sessions.get(session_id) else {
            return false;
        };
        session.free_slots() > 0
            && session.queues.iter().any(|q| self.queues.get(q).is_some_and(|queue| queue.has_due(now_ms)))
    }

    /// Earliest run_at of a not-yet-due job in any of these queues.
    pub fn next_due_ms<'a>(&self, queues: impl IntoIterator<Item = &'a String>) -> Option<u64> {
        queues.into_iter().filter_map(|q| self.queues.get(q)).filter_map(Queue::next_run_at_ms).min()
    }

    /// Applies one committed log entry at `log_index`.
    pub fn apply(&mut self, log_index: u64, batch: &Batch) -> ApplyOutput {
        let mut out = ApplyOutput {
            results: Vec::with_capacity(batch.commands.len()),
            events: Vec::new(),
            tally: Tally::default(),
        };
        // Time passes first: a result that arrives in the same entry as its
        // lease's deadline is late.
        self.advance_time(batch.proposed_at_ms, &mut out.events, &mut out.tally);
        let mut position = 0u64;
        for command in batch.commands.iter() {
            let applied = self.apply_command(log_index, &mut position, command, &mut out.events, &mut out.tally);
            out.results.push(applied);
        }
        out
    }

    fn advance_time(&mut self, stamp_ms: u64, events: &mut Vec<Event>, tally: &mut Tally) {
        self.now_ms = self.now_ms.max(stamp_ms);
        let now = self.now_ms;
        while let Some(&(deadline, job_id)) = self.lease_deadlines.get_min() {
            if deadline > now {
                break;
            }
            // end_lease removes this index entry, so the loop moves on.
            self.lose_lease(job_id, Outcome::LeaseTimedOut, "lease_timeout passed without a result", events, tally);
        }
        while let Some(&(expires, job_id)) = self.retention.get_min() {
            if expires > now {
                break;
            }
            self.retention.remove_min();
            self.drop_job(job_id);
        }
        while let Some((expired_ms, session_id)) = self.expired_order.first().cloned() {
            if expired_ms.saturating_add(EXPIRED_SESSION_MEMORY_MS) > now {
                break;
            }
            self.expired_order.pop_first();
            self.expired_sessions.remove(&session_id);
        }
    }

    fn apply_command(
        &mut self,
        index: u64,
        position: &mut u64,
        command: &Command,
        events: &mut Vec<Event>,
        tally: &mut Tally,
    ) -> Applied {
        if let Some(feature) = command.feature()
            && feature.format > self.format
        {
            return Applied::Rejected(Rejection::FormatTooLow {
                feature: feature.name.to_owned(),
                needs: feature.format,
                shard_format: self.format,
            });
        }
        match command {
            Command::Enqueue(new) => self.enqueue(new, events, tally),
            Command::OpenSession { session_id, worker_id, queues, max_in_flight } => {
                let resumed = self.open_session(session_id, worker_id, queues, *max_in_flight);
                Applied::SessionOpened { session_id: session_id.clone(), resumed, lost: Vec::new() }
            }
            Command::ResumeSession { session_id, fallback, worker_id, queues, max_in_flight } => {
                if self.sessions.contains_key(session_id) {
                    self.open_session(session_id, worker_id, queues, *max_in_flight);
                    Applied::SessionOpened { session_id: session_id.clone(), resumed: true, lost: Vec::new() }
                } else {
                    let lost = self.expired_sessions.get(session_id).map(|e| e.lost.clone()).unwrap_or_default();
                    let resumed = self.open_session(fallback, worker_id, queues, *max_in_flight);
                    Applied::SessionOpened { session_id: fallback.clone(), resumed, lost }
                }
            }
            Command::Dispatch { sessions } => {
                let mut assigned = 0;
                for session_id in sessions {
                    assigned += self.fill_session(index, position, session_id, events, tally);
                }
                Applied::Dispatched { assigned }
            }
            Command::Complete { job_id, token, result } => self.complete(*job_id, *token, result, events, tally),
            Command::Fail { job_id, token, error, retry } => self.fail(*job_id, *token, error, retry, events, tally),
            Command::Release { job_id, token } => self.release(*job_id, *token, events),
            Command::Progress { job_id, token, message, extend_ms } => {
                self.progress(*job_id, *token, message, *extend_ms)
            }
            Command::ExpireSession { session_id, reason } => self.expire_session(session_id, *reason, events, tally),
            Command::DrainSession { session_id } => match self.sessions.get_mut(session_id) {
                Some(session) => {
                    session.max_in_flight = 0;
                    Applied::SessionDrained
                }
                None => Applied::Rejected(Rejection::SessionNotFound(session_id.clone())),
            },
            Command::Cancel { job_id, reason } => self.cancel(*job_id, reason, events, tally),
            Command::RetryJob { job_id } => self.retry_job(*job_id, events),
            Command::PurgeQueue { queue, state } => {
                match self.purge_part(queue, *state, None, None, None, usize::MAX) {
                    Applied::PurgedPart { count, .. } => Applied::Purged { count },
                    other => other,
                }
            }
            Command::PurgeQueuePart { queue, state, below_seq, after, through, limit } => {
                self.purge_part(queue, *state, *below_seq, *after, *through, *limit as usize)
            }
            Command::SetQueueConfig { queue, update } => {
                self.set_config(queue, update);
                Applied::QueueUpdated
            }
            Command::PauseQueue { queue } => {
                self.queue_mut(queue).paused = true;
                Applied::QueueUpdated
            }
            Command::ResumeQueue { queue } => {
                self.queue_mut(queue).paused = false;
                note_work(events, queue);
                Applied::QueueUpdated
            }
            Command::Tick => Applied::Ticked,
            Command::SetFormat { format } => {
                if self.format < 1 && *format >= 1 {
                    // Format 0 left an expiry's entry in `expired_order` when
                    // the session opened again (it then dropped a later
                    // expiry's record early). From format 1 the index holds
                    // exactly the remembered expiries, so a snapshot need not
                    // store it; the leftovers go here, at the same index on
                    // every replica.
                    let remembered = &self.expired_sessions;
                    self.expired_order.retain(|(at, id)| remembered.get(id).is_some_and(|e| e.expired_ms == *at));
                }
                self.format = self.format.max(*format);
                Applied::FormatSet { format: self.format }
            }
            Command::DeleteQueue { queue } => self.delete_queue(queue),
        }
    }

    fn delete_queue(&mut self, name: &str) -> Applied {
        let Some(queue) = self.queues.get(name) else {
            return Applied::Rejected(Rejection::QueueNotFound(name.to_owned()));
        };
        let jobs = queue.depth() + queue.succeeded + queue.failed + queue.cancelled;
        if jobs > 0 {
            return Applied::Rejected(Rejection::QueueNotEmpty { queue: name.to_owned(), jobs });
        }
        self.queues.remove(name);
        Applied::QueueDeleted
    }

    /// Opens the session, or updates it if it is open; true in that case.
    fn open_session(&mut self, session_id: &SessionId, worker_id: &str, queues: &[String], max_in_flight: u32) -> bool {
        let forgotten = self.expired_sessions.remove(session_id);
        if let Some(expired) = forgotten
            && self.format >= 1
        {
            self.expired_order.remove(&(expired.expired_ms, session_id.clone()));
        }
        let existed = self.sessions.contains_key(session_id);
        let session = self.sessions.entry(session_id.clone()).or_insert_with(|| Session {
            worker_id: String::new(),
            queues: Vec::new(),
            max_in_flight: 0,
            held: BTreeSet::new(),
            opened_ms: self.now_ms,
        });
        worker_id.clone_into(&mut session.worker_id);
        queues.clone_into(&mut session.queues);
        session.max_in_flight = max_in_flight;
        existed
    }

    fn queue_mut(&mut self, name: &str) -> &mut Queue {
        if !self.queues.contains_key(name) {
            self.queues.insert(name.to_owned(), Queue::default());
        }
        self.queues.get_mut(name).expect("inserted above")
    }

    fn set_config(&mut self, queue: &str, update: &QueueConfigUpdate) {
        self.queue_mut(queue).config.apply(update);
    }

    fn enqueue(&mut self, new: &NewJob, events: &mut Vec<Event>, tally: &mut Tally) -> Applied {
        let now = self.now_ms;
        self.queue_mut(&new.queue);
        // Field access, not queue_mut(), so jobs and counters stay borrowable.
        let queue = self.queues.get_mut(&new.queue).expect("created above");
        if let Some(&existing) = new.idempotency_key.as_ref().and_then(|key| queue.idempotency.get(key)) {
            let state = self.jobs.get(&existing).map(|j| j.state_at(now)).expect("idempotency key of a dropped job");
            return Applied::Enqueued { job_id: existing, created: false, state };
        }
        if queue.config.max_depth > 0 && queue.depth() >= queue.config.max_depth {
            return Applied::Rejected(Rejection::QueueFull {
                queue: new.queue.clone(),
                max_depth: queue.config.max_depth,
            });
        }
        let id = JobId { shard: self.shard, seq: self.next_seq };
        self.next_seq += 1;
        let job = Job {
            id,
            queue: new.queue.clone(),
            payload: Payload::from(new.payload.as_slice()),
            priority: new.priority,
            status: Status::Pending,
            attempt: 0,
            max_attempts: new.max_attempts.unwrap_or(queue.config.max_attempts).max(1),
            lease_timeout_ms: new.lease_timeout_ms.unwrap_or(queue.config.lease_timeout_ms),
            created_ms: now,
            run_at_ms: new.run_at_ms.unwrap_or_else(|| now.saturating_add(new.delay_ms)),
            last_token: FencingToken(0),
            more: More::of(JobMore {
                headers: new.headers.clone(),
                idempotency_key: new.idempotency_key.clone(),
                ..JobMore::default()
            }),
        };
        if let Some(key) = &new.idempotency_key {
            queue.idempotency.insert(key.clone(), id);
        }
        queue.pending.insert(PendingKey::of(&job));
        let state = job.state_at(now);
        self.jobs.insert(id, Arc::new(job));
        note_work(events, &new.queue);
        tally.queue(&new.queue).enqueued += 1;
        Applied::Enqueued { job_id: id, created: true, state }
    }

    fn fill_session(
        &mut self,
        index: u64,
        position: &mut u64,
        session_id: &SessionId,
        events: &mut Vec<Event>,
        tally: &mut Tally,
    ) -> u32 {
        let now = self.now_ms;
        let Some(session) = self.sessions.get(session_id) else {
            return 0;
        };
        let mut slots = session.free_slots();
        // Every entry the leader proposes carries a Dispatch of all its
        // connected sessions: a full one must cost no more than this lookup.
        if slots == 0 {
            return 0;
        }
        let mut assigned = 0;
        let queue_names = session.queues.clone();
        let worker_id = session.worker_id.clone();
        while slots > 0 {
            // The best due job across the session's queues.
            let best = queue_names
                .iter()
                .filter_map(|name| {
                    let queue = self.queues.get(name)?;
                    if !queue.can_dispatch(now) {
                        return None;
                    }
                    queue.first_due(now).map(|key| (key, name))
                })
                .min_by_key(|(key, _)| *key);
            let Some((key, queue_name)) = best else { break };
            let job_id = JobId { shard: self.shard, seq: key.seq };
            let token = FencingToken::new(index, *position);
            *position += 1;
            assert!(token > self.last_token, "fencing token {token} not above {}", self.last_token);
            self.last_token = token;
            let queue = self.queues.get_mut(queue_name).expect("picked from it");
            queue.pending.remove(&key);
            queue.active += 1;
            queue.note_dispatch(now);
            let job = job_mut(&mut self.jobs, job_id).expect("pending key of a missing job");
            // Due since its run_at, its enqueue (a run_at in the past) or the
            // end of its last attempt (a released job keeps its old run_at).
            let last_end = job.history().last().and_then(|r| r.finished_ms).unwrap_or(0);
            let due_ms = job.run_at_ms.max(job.created_ms).max(last_end);
            tally.queue(queue_name).dispatch_waits_ms.push(now.saturating_sub(due_ms));
            job.attempt += 1;
            let deadline = now.saturating_add(job.lease_timeout_ms);
            job.status = Status::Active(Box::new(Lease {
                session_id: session_id.clone(),
                token,
                started_ms: now,
                deadline_ms: deadline,
            }));
            job.last_token = token;
            let more = job.more_mut();
            more.last_worker_id.clone_from(&worker_id);
            more.progress.clear();
            job.push_attempt(AttemptRecord {
                attempt: job.attempt,
                worker_id: worker_id.clone(),
                session_id: session_id.clone(),
                token,
                started_ms: now,
                finished_ms: None,
                outcome: Outcome::Running,
                error: String::new(),
            });
            self.lease_deadlines.insert((deadline, job_id));
            self.sessions.get_mut(session_id).expect("checked above").held.insert(job_id);
            events.push(Event::Assigned(Assignment {
                session_id: session_id.clone(),
                job_id,
                token,
                attempt: job.attempt,
                lease_deadline_ms: deadline,
            }));
            slots -= 1;
            assigned += 1;
        }
        assigned
    }

    /// Checks that `token` holds the job's current lease. `Ok(None)` means a
    /// repeat of a result already recorded for that token with `outcome`.
    fn check_lease(&self, job_id: JobId, token: FencingToken, repeat_of: &[Outcome]) -> Result<Option<()>, Rejection> {
        let job = self.jobs.get(&job_id).ok_or(Rejection::JobNotFound(job_id))?;
        lease_check(job, token, repeat_of)
    }

    /// Ends the current lease of `job_id`: index, session and counters.
    /// Returns the lease.
    fn end_lease(&mut self, job_id: JobId) -> Lease {
        let job = job_mut(&mut self.jobs, job_id).expect("lease of a missing job");
        let queue = self.queues.get_mut(&job.queue).expect("queue of a job");
        end_lease_of(job, queue, &mut self.lease_deadlines, &mut self.sessions)
    }

    /// Ends the lease `token` holds with a result: the attempt is closed
    /// with `outcome`. `Ok(None)` when this exact result was already
    /// recorded (a resend after a reconnect), which changes nothing.
    fn take_lease(
        &mut self,
        job_id: JobId,
        token: FencingToken,
        outcome: Outcome,
        error: &str,
    ) -> Result<Option<Lease>, Rejection> {
        if self.check_lease(job_id, token, &[outcome])?.is_none() {
            return Ok(None);
        }
        let lease = self.end_lease(job_id);
        let now = self.now_ms;
        job_mut(&mut self.jobs, job_id).expect("checked").close_attempt(lease.token, now, outcome, error);
        Ok(Some(lease))
    }

    fn complete(
        &mut self,
        job_id: JobId,
        token: FencingToken,
        result: &[u8],
        events: &mut Vec<Event>,
        tally: &mut Tally,
    ) -> Applied {
        // The hottest command: one lookup of the job for the check and
        // every change (each lookup of the persistent map costs more than a
        // BTreeMap's). The job itself is copied only once the check passed.
        let Some(shared) = self.jobs.get_mut(&job_id) else {
            return Applied::Rejected(Rejection::JobNotFound(job_id));
        };
        match lease_check(shared, token, &[Outcome::Succeeded]) {
            Ok(Some(())) => {}
            Ok(None) => return Applied::Accepted { lease_deadline_ms: None },
            Err(rejection) => return Applied::Rejected(rejection),
        }
        let now = self.now_ms;
        let job = Arc::make_mut(shared);
        let queue = self.queues.get_mut(&job.queue).expect("queue of a job");
        let lease = end_lease_of(job, queue, &mut self.lease_deadlines, &mut self.sessions);
        job.close_attempt(lease.token, now, Outcome::Succeeded, "");
        job.more_mut().result = result.to_vec();
        finish_of(job, Status::Succeeded, now, queue, &mut self.retention, events, tally);
        note_capacity(events, lease.session_id);
        Applied::Accepted { lease_deadline_ms: None }
    }

    fn fail(
        &mut self,
        job_id: JobId,
        token: FencingToken,
        error: &str,
        retry: &RetryRequest,
        events: &mut Vec<Event>,
        tally: &mut Tally,
    ) -> Applied {
        let lease = match self.take_lease(job_id, token, Outcome::Failed, error) {
            Ok(Some(lease)) => lease,
            Ok(None) => return Applied::Accepted { lease_deadline_ms: None },
            Err(rejection) => return Applied::Rejected(rejection),
        };
        let now = self.now_ms;
        let job = job_mut(&mut self.jobs, job_id).expect("checked");
        job.more_mut().error = error.to_owned();
        let attempts_left = job.attempt < job.max_attempts;
        let delay_ms = match retry {
            RetryRequest::Never => None,
            _ if !attempts_left => None,
            RetryRequest::After { delay_ms } => Some(*delay_ms),
            RetryRequest::Backoff { jitter_permille } => {
                let config = &self.queues[&job.queue].config;
                Some(config.backoff_ms(job.attempt, *jitter_permille))
            }
        };
        match delay_ms {
            Some(delay) => {
                tally.queue(&job.queue).retried += 1;
                self.requeue(job_id, now.saturating_add(delay), events);
            }
            None => self.finish(job_id, Status::Failed, events, tally),
        }
        note_capacity(events, lease.session_id);
        Applied::Accepted { lease_deadline_ms: None }
    }

    fn release(&mut self, job_id: JobId, token: FencingToken, events: &mut Vec<Event>) -> Applied {
        let lease = match self.take_lease(job_id, token, Outcome::Released, "") {
            Ok(Some(lease)) => lease,
            Ok(None) => return Applied::Accepted { lease_deadline_ms: None },
            Err(rejection) => return Applied::Rejected(rejection),
        };
        let now = self.now_ms;
        let job = job_mut(&mut self.jobs, job_id).expect("checked");
        // Given back unstarted: the attempt does not count.
        job.attempt -= 1;
        let run_at = job.run_at_ms;
        self.requeue(job_id, run_at.min(now), events);
        note_capacity(events, lease.session_id);
        Applied::Accepted { lease_deadline_ms: None }
    }

    fn progress(&mut self, job_id: JobId, token: FencingToken, message: &str, extend_ms: Option<u64>) -> Applied {
        if let Err(rejection) = self.check_lease(job_id, token, &[]) {
            return Applied::Rejected(rejection);
        }
        let now = self.now_ms;
        let job = job_mut(&mut self.jobs, job_id).expect("checked");
        if !message.is_empty() {
            job.more_mut().progress = message.to_owned();
        }
        let Status::Active(lease) = &mut job.status else { unreachable!("checked lease") };
        if let Some(extend) = extend_ms {
            let deadline = now.saturating_add(extend);
            self.lease_deadlines.remove(&(lease.deadline_ms, job_id));
            lease.deadline_ms = deadline;
            self.lease_deadlines.insert((deadline, job_id));
        }
        Applied::Accepted { lease_deadline_ms: Some(lease.deadline_ms) }
    }

    /// Takes the lease away from its holder without a result: the attempt is
    /// closed with `outcome`, and the holder is told (it may still be running).
    fn revoke_lease(&mut self, job_id: JobId, outcome: Outcome, why: &str, events: &mut Vec<Event>) {
        let lease = self.end_lease(job_id);
        let now = self.now_ms;
        job_mut(&mut self.jobs, job_id).expect("had a lease").close_attempt(lease.token, now, outcome, why);
        events.push(Event::Revoked {
            session_id: lease.session_id.clone(),
            job_id,
            token: lease.token,
            reason: why.to_owned(),
        });
        note_capacity(events, lease.session_id);
    }

    /// A lease lost without a result: the attempt counts.
    fn lose_lease(&mut self, job_id: JobId, outcome: Outcome, why: &str, events: &mut Vec<Event>, tally: &mut Tally) {
        self.revoke_lease(job_id, outcome, why, events);
        let now = self.now_ms;
        let job = job_mut(&mut self.jobs, job_id).expect("had a lease");
        tally.queue(&job.queue).lease_expired += 1;
        if job.attempt >= job.max_attempts {
            job.more_mut().error = format!("{why} (attempt {} of {})", job.attempt, job.max_attempts);
            self.finish(job_id, Status::Failed, events, tally);
        } else {
            self.requeue(job_id, now, events);
        }
    }

    fn expire_session(
        &mut self,
        session_id: &SessionId,
        reason: ExpiryReason,
        events: &mut Vec<Event>,
        tally: &mut Tally,
    ) -> Applied {
        let Some(session) = self.sessions.get(session_id) else {
            return Applied::Rejected(Rejection::SessionNotFound(session_id.clone()));
        };
        let why = match reason {
            ExpiryReason::Silent => "session expired: no heartbeat within session_ttl",
            ExpiryReason::Admin => "session expired by an administrator",
            ExpiryReason::Goodbye => "worker shut down while holding the job",
            ExpiryReason::Superseded => "worker reconnected after its session expired in another shard",
        };
        let held: Vec<JobId> = session.held.iter().copied().collect();
        let mut lost = Vec::with_capacity(held.len());
        for job_id in held {
            let token = self.jobs[&job_id].lease().expect("held job has a lease").token;
            lost.push((job_id, token));
            self.lose_lease(job_id, Outcome::SessionExpired, why, events, tally);
        }
        self.sessions.remove(session_id);
        events.push(Event::SessionEnded { session_id: session_id.clone() });
        let released = lost.len() as u32;
        let now = self.now_ms;
        self.expired_order.insert((now, session_id.clone()));
        self.expired_sessions.insert(session_id.clone(), ExpiredSession { expired_ms: now, reason, lost });
        Applied::SessionExpired { released }
    }

    fn cancel(&mut self, job_id: JobId, reason: &str, events: &mut Vec<Event>, tally: &mut Tally) -> Applied {
        let Some(job) = self.jobs.get(&job_id) else {
            return Applied::Rejected(Rejection::JobNotFound(job_id));
        };
        let now = self.now_ms;
        if job.is_terminal() {
            return Applied::Rejected(Rejection::AlreadyTerminal { job_id, state: job.state_at(now) });
        }
        let why = if reason.is_empty() { "cancelled".to_owned() } else { format!("cancelled: {reason}") };
        if job.lease().is_some() {
            self.revoke_lease(job_id, Outcome::Cancelled, &why, events);
        } else {
            let key = PendingKey::of(job);
            let queue = job.queue.clone();
            self.queues.get_mut(&queue).expect("queue of a job").pending.remove(&key);
        }
        job_mut(&mut self.jobs, job_id).expect("exists").more_mut().error = why;
        self.finish(job_id, Status::Cancelled, events, tally);
        Applied::Job(Box::new(self.view(job_id, now).expect("exists")))
    }

    fn retry_job(&mut self, job_id: JobId, events: &mut Vec<Event>) -> Applied {
        let Some(job) = self.jobs.get(&job_id) else {
            return Applied::Rejected(Rejection::JobNotFound(job_id));
        };
        let now = self.now_ms;
        if job.status != Status::Failed {
            return Applied::Rejected(Rejection::NotFailed { job_id, state: job.state_at(now) });
        }
        self.unretain(job_id);
        let job = job_mut(&mut self.jobs, job_id).expect("exists");
        job.attempt = 0;
        job.more_mut().finished_ms = None;
        let queue = self.queues.get_mut(&job.queue).expect("queue of a job");
        queue.failed -= 1;
        self.requeue(job_id, now, events);
        Applied::Job(Box::new(self.view(job_id, now).expect("exists")))
    }

    /// Back to pending (SCHEDULED or READY by `run_at_ms`).
    fn requeue(&mut self, job_id: JobId, run_at_ms: u64, events: &mut Vec<Event>) {
        let job = job_mut(&mut self.jobs, job_id).expect("requeue of a missing job");
        job.status = Status::Pending;
        job.run_at_ms = run_at_ms;
        let key = PendingKey::of(job);
        self.queues.get_mut(&job.queue).expect("queue of a job").pending.insert(key);
        note_work(events, &job.queue);
    }

    /// Into a terminal state; retained for the queue's `retention`.
    fn finish(&mut self, job_id: JobId, status: Status, events: &mut Vec<Event>, tally: &mut Tally) {
        let job = job_mut(&mut self.jobs, job_id).expect("finish of a missing job");
        let queue = self.queues.get_mut(&job.queue).expect("queue of a job");
        finish_of(job, status, self.now_ms, queue, &mut self.retention, events, tally);
    }

    /// Takes a terminal job out of the retention index (redrive or purge).
    fn unretain(&mut self, job_id: JobId) {
        let job = job_mut(&mut self.jobs, job_id).expect("unretain of a missing job");
        if let Some(until) = job.more_mut().retain_until_ms.take() {
            self.retention.remove(&(until, job_id));
        }
    }

    /// Forgets a terminal job (retention passed, or purged).
    fn drop_job(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        assert!(job.is_terminal(), "dropping non-terminal job {job_id}");
        let queue = self.queues.get_mut(&job.queue).expect("queue of a job");
        match job.status {
            Status::Succeeded => queue.succeeded -= 1,
            Status::Failed => queue.failed -= 1,
            Status::Cancelled => queue.cancelled -= 1,
            Status::Pending | Status::Active(_) => unreachable!(),
        }
        queue.forget_idempotency_key(job.idempotency_key(), job_id);
    }

    fn purge_part(
        &mut self,
        queue_name: &str,
        state: JobState,
        below_seq: Option<u64>,
        after: Option<PurgeCursor>,
        through: Option<PurgeCursor>,
        limit: usize,
    ) -> Applied {
        if state == JobState::Active {
            return Applied::Rejected(Rejection::CannotPurge(state));
        }
        let now = self.now_ms;
        let below_seq = below_seq.unwrap_or(self.next_seq);
        let Some(queue) = self.queues.get(queue_name) else {
            return Applied::PurgedPart { count: 0, below_seq, through: None, next: None };
        };
        let pending_cursor = |key: &PendingKey| PurgeCursor::Pending {
            neg_priority: key.neg_priority,
            run_at_ms: key.run_at_ms,
            seq: key.seq,
        };
        let pending = matches!(state, JobState::Ready | JobState::Scheduled);
        let through = match through {
            Some(through) => Some(through),
            None if pending => queue.pending.get_max().map(pending_cursor),
            None => self.retention.get_max().map(|&(until_ms, job_id)| PurgeCursor::Retained { until_ms, job_id }),
        };
        let limit = limit.max(1);
        let (victims, next) =
            if let (true, Some(PurgeCursor::Pending { neg_priority, run_at_ms, seq })) = (pending, through) {
                let end = Bound::Included(PendingKey { neg_priority, run_at_ms, seq });
                let start = match after {
                    Some(PurgeCursor::Pending { neg_priority, run_at_ms, seq }) => {
                        Bound::Excluded(PendingKey { neg_priority, run_at_ms, seq })
                    }
                    _ => Bound::Unbounded,
                };
                let wanted = |key: &&PendingKey| {
                    let scheduled = key.run_at_ms > now;
                    (key.seq < below_seq && scheduled == (state == JobState::Scheduled))
                        .then_some(JobId { shard: self.shard, seq: key.seq })
                };
                walk_purge_part(queue.pending.range((start, end)), limit, |key| pending_cursor(key), wanted)
            } else if let (false, true, Some(PurgeCursor::Retained { until_ms, job_id })) =
                (pending, queue.count_of(state) > 0, through)
            {
                // The retention index holds every queue's finished jobs: walk it
                // only when this queue has some in that state.
                let end = Bound::Included((until_ms, job_id));
                let start = match after {
                    Some(PurgeCursor::Retained { until_ms, job_id }) => Bound::Excluded((until_ms, job_id)),
                    _ => Bound::Unbounded,
                };
                let wanted = |&&(_, job_id): &&(u64, JobId)| {
                    let job = &self.jobs[&job_id];
                    (job_id.seq < below_seq && job.queue == queue_name && job.state_at(now) == state).then_some(job_id)
                };
                let cursor = |&&(until_ms, job_id): &&(u64, JobId)| PurgeCursor::Retained { until_ms, job_id };
                walk_purge_part(self.retention.range((start, end)), limit, cursor, wanted)
            } else {
                (Vec::new(), None)
            };
        for &job_id in &victims {
            let job = &self.jobs[&job_id];
            if let Some(until) = job.retain_until_ms() {
                // Not `unretain`: that would copy a job a snapshot shares, only to drop it.
                self.retention.remove(&(until, job_id));
                self.drop_job(job_id);
            } else {
                let key = PendingKey::of(job);
                let queue = self.queues.get_mut(queue_name).expect("queue of a job");
                queue.pending.remove(&key);
                queue.forget_idempotency_key(job.idempotency_key(), job_id);
                self.jobs.remove(&job_id);
            }
        }
        Applied::PurgedPart { count: victims.len() as u64, below_seq, through, next }
    }
}

/// Walks at most `limit` entries of a purge's index, in order: the jobs to
/// drop among them, and the last entry walked when entries are left after
/// it (where the next part starts).
fn walk_purge_part<K>(
    entries: impl Iterator<Item = K>,
    limit: usize,
    cursor: impl Fn(&K) -> PurgeCursor,
    wanted: impl Fn(&K) -> Option<JobId>,
) -> (Vec<JobId>, Option<PurgeCursor>) {
    let mut entries = entries.peekable();
    let mut victims = Vec::new();
    let mut last = None;
    for entry in entries.by_ref().take(limit) {
        victims.extend(wanted(&entry));
        last = Some(cursor(&entry));
    }
    let left_over = entries.peek().is_some();
    (victims, last.filter(|_| left_over))
}
