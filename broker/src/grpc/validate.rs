//! Input validation at the API edge: every request field a client controls is
//! checked here, before anything reaches the Raft log. The state machine
//! trusts what it is given (a bad value there would be replicated forever),
//! so this is the one place that says no.
//!
//! Every function is pure (no clock, no I/O: the caller passes `now_ms`) and
//! returns [`InvalidArgument`], whose message names the offending field so a
//! client in any language can tell what to fix. Nothing here panics on any
//! input: sizes are compared before anything is copied, arithmetic on
//! client numbers is checked, and bad values are echoed back shortened.

use std::collections::BTreeMap;

use gantry_proto::v1 as proto;

use crate::queue::{Command, FencingToken, JobId, JobState, NewJob, QueueConfigUpdate, RetryRequest, SessionId};

/// Default limits. Bounded everything (DESIGN §10): a client must not be able
/// to make a node hold unbounded memory or write unbounded log entries.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_KEY_BYTES: usize = 256;
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
pub const MAX_BATCH: usize = 10_000;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
pub const MAX_ERROR_BYTES: usize = 64 * 1024;
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
pub const MAX_QUEUES_PER_WORKER: usize = 64;
pub const MAX_IN_FLIGHT: u32 = 10_000;
pub const MAX_REASON_BYTES: usize = 1024;
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 4096;
pub const MAX_WORKER_ID_BYTES: usize = 256;
pub const MAX_SESSION_ID_BYTES: usize = 256;
pub const MAX_QUEUE_NAME_BYTES: usize = 128;
/// Upper bound for a lease timeout, a delay, a `retry_after`, a progress
/// `extend`, backoff settings and retention: far enough to never bother a
/// real user, near enough that `now + x` can never overflow.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 60 * 60 * 1000;
pub const MAX_LEASE_TIMEOUT_MS: u64 = MAX_DURATION_MS;
pub const MAX_DELAY_MS: u64 = MAX_DURATION_MS;
pub const MAX_ATTEMPTS: u32 = 1000;

/// `WaitJob` without a timeout waits this long.
pub const DEFAULT_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// `WaitJob` holds a call (and a waiter) at most this long.
pub const MAX_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// `ListJobs` page size when the request says 0, and the largest allowed.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

/// The limits a node enforces; `Default` gives the constants above. Kept as a
/// value (not only constants) so a node's configuration or a test can tighten
/// them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_headers: usize,
    pub max_header_key_bytes: usize,
    pub max_header_value_bytes: usize,
    pub max_batch: usize,
    pub max_idempotency_key_bytes: usize,
    pub max_error_bytes: usize,
    pub max_result_bytes: usize,
    pub max_queues_per_worker: usize,
    pub max_in_flight: u32,
    pub max_reason_bytes: usize,
    pub max_progress_message_bytes: usize,
    pub max_lease_timeout_ms: u64,
    pub max_delay_ms: u64,
    /// Largest `max_attempts` a job or a queue may ask for (the smallest is 1).
    pub max_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            max_headers: MAX_HEADERS,
            max_header_key_bytes: MAX_HEADER_KEY_BYTES,
            max_header_value_bytes: MAX_HEADER_VALUE_BYTES,
            max_batch: MAX_BATCH,
            max_idempotency_key_bytes: MAX_IDEMPOTENCY_KEY_BYTES,
            max_error_bytes: MAX_ERROR_BYTES,
            max_result_bytes: MAX_RESULT_BYTES,
            max_queues_per_worker: MAX_QUEUES_PER_WORKER,
            max_in_flight: MAX_IN_FLIGHT,
            max_reason_bytes: MAX_REASON_BYTES,
            max_progress_message_bytes: MAX_PROGRESS_MESSAGE_BYTES,
            max_lease_timeout_ms: MAX_LEASE_TIMEOUT_MS,
            max_delay_ms: MAX_DELAY_MS,
            max_attempts: MAX_ATTEMPTS,
        }
    }
}

/// A request field the broker refuses. Maps to gRPC `INVALID_ARGUMENT`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", field_label(.field))]
pub struct InvalidArgument {
    /// Path of the field in the request, e.g. `queue` or `jobs[3].headers`.
    pub field: String,
    pub message: String,
}

impl InvalidArgument {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        InvalidArgument { field: field.into(), message: message.into() }
    }

    /// Puts the path of an enclosing message in front of the field:
    /// `headers` prefixed with `jobs[3]` becomes `jobs[3].headers`.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.field = if self.field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{}", self.field) };
        }
        self
    }
}

impl From<InvalidArgument> for tonic::Status {
    fn from(e: InvalidArgument) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// `queue: ` before the message; nothing when no field is named (a caller
/// checking a value that is not a request field).
fn field_label(field: &str) -> String {
    if field.is_empty() { String::new() } else { format!("{field}: ") }
}

type Result<T, E = InvalidArgument> = std::result::Result<T, E>;

fn invalid(field: &str, message: impl Into<String>) -> InvalidArgument {
    InvalidArgument::new(field, message)
}

/// A client's bad value, quoted and shortened: echoing it helps the client,
/// echoing a megabyte of it does not.
fn shown(value: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_some() { format!("{head:?}…") } else { format!("{head:?}") }
}

fn check_len(field: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(invalid(field, format!("is {len} bytes, over the limit of {max}")));
    }
    Ok(())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Informational text a worker sends (a failure's error, a progress message)
/// is cut to the limit instead of refused: refusing a `Fail` because its
/// stack trace is long would lose the failure itself and leave the job
/// leased until its timeout. The marker tells a reader the text was cut.
fn clip_text(s: &str, max: usize) -> String {
    const MARK: &str = "… (truncated)";
    if s.len() <= max {
        return s.to_owned();
    }
    if max < MARK.len() {
        return truncate_utf8(s, max);
    }
    let mut out = truncate_utf8(s, max - MARK.len());
    out.push_str(MARK);
    out
}

/// `[A-Za-z0-9._-]{1,128}`: safe in metrics labels, file names, URLs and logs.
pub fn queue_name(field: &str, name: &str) -> Result<()> {
    let ok = (1..=MAX_QUEUE_NAME_BYTES).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(invalid(field, format!("must match [A-Za-z0-9._-]{{1,128}}, got {}", shown(name)))) }
}

/// `host:port` of another node: a name or address and a port number.
pub fn host_port(field: &str, address: &str) -> Result<()> {
    let ok = address.len() <= 255
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
    if ok { Ok(()) } else { Err(invalid(field, format!("must be host:port, got {}", shown(address)))) }
}

pub fn job_id(field: &str, id: &str) -> Result<JobId> {
    if id.is_empty() {
        return Err(invalid(field, "is required"));
    }
    id.parse().map_err(|_| {
        invalid(
            field,
            format!("is not a Gantry job id (expected <shard>-<sequence>, e.g. \"0-42\"), got {}", shown(id)),
        )
    })
}

/// An optional session id (empty = none), e.g. `Hello.resume_session_id`.
/// Session ids are made by the broker; this only bounds what is stored or
/// looked up.
pub fn session_id(field: &str, id: &str) -> Result<Option<SessionId>> {
    if id.is_empty() {
        return Ok(None);
    }
    check_len(field, id.len(), MAX_SESSION_ID_BYTES)?;
    Ok(Some(SessionId(id.into())))
}

/// A required session id, e.g. `ExpireSessionRequest.session_id`.
pub fn required_session_id(field: &str, id: &str) -> Result<SessionId> {
    session_id(field, id)?.ok_or_else(|| invalid(field, "is required"))
}

/// Whole milliseconds, rounded up: a positive duration never becomes 0 (a
/// 1 ns delay still means "not now"), and "no sooner than" stays true.
pub fn duration_ms(field: &str, d: &prost_types::Duration) -> Result<u64> {
    // The protobuf spec's range for Duration: about ±10,000 years.
    const MAX_SECONDS: i64 = 315_576_000_000;
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid(field, format!("must not be negative, got {}s {}ns", d.seconds, d.nanos)));
    }
    if d.seconds > MAX_SECONDS || d.nanos > 999_999_999 {
        return Err(invalid(field, format!("is not a valid duration ({}s {}ns is out of range)", d.seconds, d.nanos)));
    }
    // Both ranges checked above, so none of this can overflow.
    let secs = d.seconds as u64;
    let nanos = d.nanos as u64;
    Ok(secs * 1000 + nanos.div_ceil(1_000_000))
}

/// Milliseconds since the Unix epoch. Instants before the epoch come out as 0:
/// Gantry's clock starts there, and every use of an instant (a `run_at`) only
/// cares that it is long past.
pub fn timestamp_ms(field: &str, t: &prost_types::Timestamp) -> Result<u64> {
    // The protobuf spec's range for Timestamp: years 0001 to 9999.
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..=999_999_999).contains(&t.nanos) {
        return Err(invalid(field, format!("is not a valid timestamp ({}s {}ns is out of range)", t.seconds, t.nanos)));
    }
    if t.seconds < 0 {
        return Ok(0);
    }
    Ok(t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

/// A duration that must be set to something above zero and at most `max_ms`.
fn positive_duration_ms(field: &str, d: &prost_types::Duration, max_ms: u64) -> Result<u64> {
    let ms = duration_ms(field, d)?;
    if ms == 0 {
        return Err(invalid(field, "must be greater than zero"));
    }
    at_most(field, ms, max_ms)
}

fn at_most(field: &str, ms: u64, max_ms: u64) -> Result<u64> {
    if ms > max_ms {
        return Err(invalid(field, format!("must be at most {}, got {}", human_ms(max_ms), human_ms(ms))));
    }
    Ok(ms)
}

fn human_ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

fn attempts(field: &str, n: u32, limits: &Limits) -> Result<u32> {
    if n == 0 || n > limits.max_attempts {
        return Err(invalid(field, format!("must be between 1 and {}, got {n}", limits.max_attempts)));
    }
    Ok(n)
}

fn headers(
    field: &str,
    given: &std::collections::HashMap<String, String>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>> {
    if given.len() > limits.max_headers {
        return Err(invalid(field, format!("has {} entries, over the limit of {}", given.len(), limits.max_headers)));
    }
    // Sorted so the error for a request with several bad headers is the same
    // every time (HashMap order is random).
    let sorted: BTreeMap<&String, &String> = given.iter().collect();
    for (key, value) in &sorted {
        if key.is_empty() {
            return Err(invalid(field, "has an entry with an empty key"));
        }
        if key.len() > limits.max_header_key_bytes {
            return Err(invalid(
                field,
                format!("key {} is {} bytes, over the limit of {}", shown(key), key.len(), limits.max_header_key_bytes),
            ));
        }
        if value.len() > limits.max_header_value_bytes {
            return Err(invalid(
                field,
                format!(
                    "value of {} is {} bytes, over the limit of {}",
                    shown(key),
                    value.len(),
                    limits.max_header_value_bytes
                ),
            ));
        }
    }
    Ok(sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Checks an `EnqueueRequest` and turns it into the state machine's `NewJob`.
///
/// `now_ms` is the node's clock, used only to judge `run_at`: a `run_at` not
/// in the future means "now" and is left to the leader's stamp (so a job
/// dated in the past does not jump ahead of jobs of its priority that were
/// enqueued before it), and one beyond `now + max_delay` is refused.
pub fn enqueue(req: &proto::EnqueueRequest, limits: &Limits, now_ms: u64) -> Result<NewJob> {
    queue_name("queue", &req.queue)?;
    check_len("payload", req.payload.len(), limits.max_payload_bytes)?;
    let headers = headers("headers", &req.headers, limits)?;

    let mut delay_ms = 0;
    let mut run_at_ms = None;
    match (&req.delay, &req.run_at) {
        (Some(_), Some(_)) => {
            return Err(invalid("run_at", "set at most one of delay and run_at"));
        }
        (Some(d), None) => delay_ms = at_most("delay", duration_ms("delay", d)?, limits.max_delay_ms)?,
        (None, Some(t)) => {
            let at = timestamp_ms("run_at", t)?;
            if at > now_ms {
                if at - now_ms > limits.max_delay_ms {
                    return Err(invalid(
                        "run_at",
                        format!("must be at most {} in the future", human_ms(limits.max_delay_ms)),
                    ));
                }
                run_at_ms = Some(at);
            }
        }
        (None, None) => {}
    }

    let max_attempts = match req.max_attempts {
        0 => None,
        n => Some(attempts("max_attempts", n, limits)?),
    };
    let lease_timeout_ms = req
        .lease_timeout
        .as_ref()
        .map(|d| positive_duration_ms("lease_timeout", d, limits.max_lease_timeout_ms))
        .transpose()?;
    let idempotency_key = if req.idempotency_key.is_empty() {
        None
    } else {
        check_len("idempotency_key", req.idempotency_key.len(), limits.max_idempotency_key_bytes)?;
        Some(req.idempotency_key.clone())
    };

    Ok(NewJob {
        queue: req.queue.clone(),
        payload: req.payload.clone(),
        headers,
        priority: req.priority,
        delay_ms,
        run_at_ms,
        max_attempts,
        lease_timeout_ms,
        idempotency_key,
    })
}

/// Every job of the batch is checked; the first bad one fails the whole call
/// with its index in the field (`jobs[3].queue`), so nothing is half-enqueued
/// because of a client mistake.
pub fn enqueue_batch(req: &proto::EnqueueBatchRequest, limits: &Limits, now_ms: u64) -> Result<Vec<NewJob>> {
    if req.jobs.is_empty() {
        return Err(invalid("jobs", "must hold at least one job"));
    }
    if req.jobs.len() > limits.max_batch {
        return Err(invalid("jobs", format!("has {} jobs, over the limit of {}", req.jobs.len(), limits.max_batch)));
    }
    req.jobs
        .iter()
        .enumerate()
        .map(|(i, job)| enqueue(job, limits, now_ms).map_err(|e| e.prefixed(&format!("jobs[{i}]"))))
        .collect()
}

/// A checked `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidHello {
    pub worker_id: String,
    /// Duplicates removed, first occurrence kept.
    pub queues: Vec<String>,
    pub max_in_flight: u32,
    pub resume_session_id: Option<SessionId>,
}

pub fn hello(h: &proto::Hello, limits: &Limits) -> Result<ValidHello> {
    if h.worker_id.is_empty() {
        return Err(invalid("worker_id", "is required (any name for the worker process)"));
    }
    check_len("worker_id", h.worker_id.len(), MAX_WORKER_ID_BYTES)?;
    if h.queues.is_empty() {
        return Err(invalid("queues", "must name at least one queue"));
    }
    if h.queues.len() > limits.max_queues_per_worker {
        return Err(invalid(
            "queues",
            format!("has {} queues, over the limit of {}", h.queues.len(), limits.max_queues_per_worker),
        ));
    }
    let mut queues: Vec<String> = Vec::with_capacity(h.queues.len());
    for (i, q) in h.queues.iter().enumerate() {
        queue_name(&format!("queues[{i}]"), q)?;
        // A queue named twice would be polled twice for nothing.
        if !queues.contains(q) {
            queues.push(q.clone());
        }
    }
    if h.max_in_flight == 0 || h.max_in_flight > limits.max_in_flight {
        return Err(invalid(
            "max_in_flight",
            format!("must be between 1 and {}, got {}", limits.max_in_flight, h.max_in_flight),
        ));
    }
    Ok(ValidHello {
        worker_id: h.worker_id.clone(),
        queues,
        max_in_flight: h.max_in_flight,
        resume_session_id: session_id("resume_session_id", &h.resume_session_id)?,
    })
}

/// What a `Fail` asks for. `no_retry` wins over `retry_after` (failing for
/// good is the stronger statement); neither means the queue's backoff, with
/// the leader's jitter.
pub fn fail_retry(f: &proto::Fail, jitter_permille: u16) -> Result<RetryRequest> {
    retry_request(f, MAX_DELAY_MS, jitter_permille)
}

fn retry_request(f: &proto::Fail, max_delay_ms: u64, jitter_permille: u16) -> Result<RetryRequest> {
    if f.no_retry {
        return Ok(RetryRequest::Never);
    }
    match &f.retry_after {
        Some(d) => {
            Ok(RetryRequest::After { delay_ms: at_most("retry_after", duration_ms("retry_after", d)?, max_delay_ms)? })
        }
        None => Ok(RetryRequest::Backoff { jitter_permille: jitter_permille.min(1000) }),
    }
}

/// `Worker.Connect` → `complete`: the result is refused over the limit (a
/// result cannot be cut without corrupting it).
pub fn complete(c: &proto::Complete, limits: &Limits) -> Result<Command> {
    let job_id = job_id("job_id", &c.job_id)?;
    check_len("result", c.result.len(), limits.max_result_bytes)?;
    Ok(Command::Complete { job_id, token: FencingToken(c.fencing_token), result: c.result.clone() })
}

/// `Worker.Connect` → `fail`. An over-long error text is cut, not refused
/// (see `clip_text`).
pub fn fail(f: &proto::Fail, limits: &Limits, jitter_permille: u16) -> Result<Command> {
    let job_id = job_id("job_id", &f.job_id)?;
    let retry = retry_request(f, limits.max_delay_ms, jitter_permille)?;
    Ok(Command::Fail {
        job_id,
        token: FencingToken(f.fencing_token),
        error: clip_text(&f.error, limits.max_error_bytes),
        retry,
    })
}

/// `Worker.Connect` → `progress`. `extend`, when set, must be above zero (a
/// zero extension would end the lease on the spot) and at most the largest
/// lease timeout. An over-long message is cut, not refused.
pub fn progress(p: &proto::Progress, limits: &Limits) -> Result<Command> {
    let job_id = job_id("job_id", &p.job_id)?;
    let extend_ms =
        p.extend.as_ref().map(|d| positive_duration_ms("extend", d, limits.max_lease_timeout_ms)).transpose()?;
    Ok(Command::Progress {
        job_id,
        token: FencingToken(p.fencing_token),
        message: clip_text(&p.message, limits.max_progress_message_bytes),
        extend_ms,
    })
}

/// `Worker.Connect` → `release`.
pub fn release(r: &proto::Release) -> Result<Command> {
    Ok(Command::Release { job_id: job_id("job_id", &r.job_id)?, token: FencingToken(r.fencing_token) })
}

/// `Jobs.CancelJob`. The reason comes from a unary call, so an over-long one
/// is refused: the caller sees it at once and can shorten it.
pub fn cancel(req: &proto::CancelJobRequest, limits: &Limits) -> Result<Command> {
    let job_id = job_id("job_id", &req.job_id)?;
    check_len("reason", req.reason.len(), limits.max_reason_bytes)?;
    Ok(Command::Cancel { job_id, reason: req.reason.clone() })
}

/// `Admin.SetQueueConfig` with the default limits.
pub fn queue_config_update(cfg: &proto::QueueConfig) -> Result<QueueConfigUpdate> {
    queue_config_update_with(cfg, &Limits::default())
}

/// Unset fields keep their value. Durations must be above zero: a zero lease
/// timeout or retention would make jobs vanish as soon as they are touched,
/// and a zero backoff would spin a failing job. `backoff_base <= backoff_max`
/// is checked when both are given; a change of only one is harmless either
/// way, since the backoff is capped by `backoff_max` whatever the base.
pub fn queue_config_update_with(cfg: &proto::QueueConfig, limits: &Limits) -> Result<QueueConfigUpdate> {
    let dur = |field: &str, d: &Option<prost_types::Duration>, max_ms: u64| {
        d.as_ref().map(|d| positive_duration_ms(field, d, max_ms)).transpose()
    };
    let update = QueueConfigUpdate {
        max_attempts: cfg.max_attempts.map(|n| attempts("max_attempts", n, limits)).transpose()?,
        lease_timeout_ms: dur("lease_timeout", &cfg.lease_timeout, limits.max_lease_timeout_ms)?,
        backoff_base_ms: dur("backoff_base", &cfg.backoff_base, limits.max_delay_ms)?,
        backoff_max_ms: dur("backoff_max", &cfg.backoff_max, limits.max_delay_ms)?,
        retention_ms: dur("retention", &cfg.retention, MAX_DURATION_MS)?,
        concurrency_limit: cfg.concurrency_limit,
        rate_limit: cfg.rate_limit,
        max_depth: cfg.max_depth,
    };
    if let (Some(base), Some(max)) = (update.backoff_base_ms, update.backoff_max_ms)
        && base > max
    {
        return Err(invalid(
            "backoff_base",
            format!("must not exceed backoff_max ({} > {})", human_ms(base), human_ms(max)),
        ));
    }
    Ok(update)
}

fn known_state(field: &str, state: i32) -> Result<proto::JobState> {
    proto::JobState::try_from(state).map_err(|_| invalid(field, format!("unknown job state {state}")))
}

/// `Admin.PurgeQueue.state`: required, and never ACTIVE (those jobs are held
/// by workers; cancel them instead).
pub fn purge_state(state: i32) -> Result<JobState> {
    const FIELD: &str = "state";
    match known_state(FIELD, state)? {
        proto::JobState::Unspecified => {
            Err(invalid(FIELD, "is required: one of SCHEDULED, READY, SUCCEEDED, FAILED, CANCELLED"))
        }
        proto::JobState::Active => {
            Err(invalid(FIELD, "ACTIVE jobs cannot be purged (workers hold them); cancel them instead"))
        }
        proto::JobState::Scheduled => Ok(JobState::Scheduled),
        proto::JobState::Ready => Ok(JobState::Ready),
        proto::JobState::Succeeded => Ok(JobState::Succeeded),
        proto::JobState::Failed => Ok(JobState::Failed),
        proto::JobState::Cancelled => Ok(JobState::Cancelled),
    }
}

/// `Admin.ListJobs.state`: UNSPECIFIED means every state.
pub fn list_state(state: i32) -> Result<Option<JobState>> {
    Ok(super::convert::job_state_from_proto(known_state("state", state)?))
}

/// `Jobs.WaitJob.timeout`: unset is 30 s, at most 1 h, zero answers at once.
pub fn wait_timeout(timeout: Option<&prost_types::Duration>) -> Result<std::time::Duration> {
    const FIELD: &str = "timeout";
    let Some(d) = timeout else {
        return Ok(DEFAULT_WAIT_TIMEOUT);
    };
    let max_ms = MAX_WAIT_TIMEOUT.as_millis() as u64;
    let ms = at_most(FIELD, duration_ms(FIELD, d)?, max_ms)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// `Admin.ListJobs.limit`: 0 is the default page, above the maximum is the
/// maximum (a page size is a wish, not a contract, so no error).
pub fn list_limit(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_LIST_LIMIT,
        n => n.min(MAX_LIST_LIMIT),
    }
}

/// A page token is the id of the last job returned: the next page starts
/// after it. Clients must treat it as opaque; keeping it a plain job id
/// makes it stable across leader changes and easy to debug.
pub fn encode_page_token(after: JobId) -> String {
    after.to_string()
}

/// Empty: the first page.
pub fn decode_page_token(field: &str, token: &str) -> Result<Option<JobId>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse()
        .map(Some)
        .map_err(|_| invalid(field, format!("is not a page token from a ListJobs answer, got {}", shown(token))))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost_types::{Duration, Timestamp};

    use super::*;
    use crate::queue::ShardId;

    const NOW: u64 = 1_700_000_000_000;

    /// A change that makes a good request bad in one field.
    type Spoil<T> = Box<dyn Fn(&mut T)>;

    fn dur(seconds: i64, nanos: i32) -> Duration {
        Duration { seconds, nanos }
    }

    fn ts(ms: u64) -> Timestamp {
        Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
    }

    fn req(queue: &str) -> proto::EnqueueRequest {
        proto::EnqueueRequest { queue: queue.into(), payload: b"hi".to_vec(), ..Default::default() }
    }

    /// The field the error names, panicking (in tests only) on success.
    fn field_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("expected INVALID_ARGUMENT").field
    }

    #[test]
    fn display_names_the_field_and_shows_the_value() {
        let e = queue_name("queue", "bad name!").unwrap_err();
        assert_eq!(e.to_string(), "queue: must match [A-Za-z0-9._-]{1,128}, got \"bad name!\"");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("queue: "));
    }

    #[test]
    fn prefix_builds_a_path() {
        let e = InvalidArgument::new("headers", "x").prefixed("jobs[3]");
        assert_eq!(e.field, "jobs[3].headers");
        assert_eq!(InvalidArgument::new("a", "x").prefixed("").field, "a");
        assert_eq!(InvalidArgument::new("", "bad").to_string(), "bad");
    }

    #[test]
    fn queue_names() {
        for good in ["a", "emails", "A.b_c-9", &"x".repeat(128)] {
            assert_eq!(queue_name("queue", good), Ok(()), "{good}");
        }
        for bad in ["", "a b", "ü", "a/b", "a:b", &"x".repeat(129)] {
            assert_eq!(field_of(queue_name("queue", bad)), "queue", "{bad}");
        }
        // Long bad values are shortened in the message.
        let e = queue_name("queue", &"!".repeat(10_000)).unwrap_err();
        assert!(e.message.len() < 200);
    }

    #[test]
    fn job_ids() {
        assert_eq!(job_id("job_id", "2-9"), Ok(JobId { shard: ShardId(2), seq: 9 }));
        for bad in ["", "x", "1-", "-1", "1-2-3", "99999999999-1"] {
            assert_eq!(field_of(job_id("job_id", bad)), "job_id", "{bad}");
        }
    }

    #[test]
    fn session_ids() {
        assert_eq!(session_id("s", ""), Ok(None));
        assert_eq!(session_id("s", "abc"), Ok(Some(SessionId("abc".into()))));
        assert_eq!(field_of(session_id("s", &"a".repeat(257))), "s");
        assert_eq!(field_of(required_session_id("session_id", "")), "session_id");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("d", &dur(0, 0)), Ok(0));
        assert_eq!(duration_ms("d", &dur(2, 500_000_000)), Ok(2500));
        // Sub-millisecond rounds up so a positive duration stays positive.
        assert_eq!(duration_ms("d", &dur(0, 1)), Ok(1));
        assert_eq!(duration_ms("d", &dur(315_576_000_000, 999_999_999)), Ok(315_576_000_000_000 + 1000));
        for bad in
            [dur(-1, 0), dur(0, -1), dur(i64::MIN, i32::MIN), dur(i64::MAX, 0), dur(0, 1_000_000_000), dur(0, i32::MAX)]
        {
            assert_eq!(field_of(duration_ms("delay", &bad)), "delay", "{bad:?}");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp_ms("t", &ts(NOW + 7)), Ok(NOW + 7));
        // Before the epoch is "long past".
        let old = Timestamp { seconds: -100, nanos: 0 };
        assert_eq!(timestamp_ms("t", &old), Ok(0));
        for bad in [
            Timestamp { seconds: 0, nanos: -1 },
            Timestamp { seconds: i64::MAX, nanos: 0 },
            Timestamp { seconds: i64::MIN, nanos: 0 },
            Timestamp { seconds: 0, nanos: 1_000_000_000 },
        ] {
            assert_eq!(field_of(timestamp_ms("run_at", &bad)), "run_at", "{bad:?}");
        }
    }

    #[test]
    fn enqueue_accepts_a_full_request() {
        let mut r = req("emails");
        r.headers.insert("trace".into(), "abc".into());
        r.priority = -3;
        r.delay = Some(dur(5, 0));
        r.max_attempts = 7;
        r.lease_timeout = Some(dur(60, 0));
        r.idempotency_key = "k1".into();
        let job = enqueue(&r, &Limits::default(), NOW).unwrap();
        assert_eq!(job.queue, "emails");
        assert_eq!(job.payload, b"hi");
        assert_eq!(job.headers.get("trace").map(String::as_str), Some("abc"));
        assert_eq!(job.priority, -3);
        assert_eq!(job.delay_ms, 5000);
        assert_eq!(job.run_at_ms, None);
        assert_eq!(job.max_attempts, Some(7));
        assert_eq!(job.lease_timeout_ms, Some(60_000));
        assert_eq!(job.idempotency_key.as_deref(), Some("k1"));
    }

    #[test]
    fn enqueue_defaults() {
        let job = enqueue(&req("q"), &Limits::default(), NOW).unwrap();
        assert_eq!(job, NewJob::new("q", b"hi".to_vec()));
    }

    #[test]
    fn enqueue_run_at() {
        let limits = Limits::default();
        let mut r = req("q");
        r.run_at = Some(ts(NOW + 10_000));
        assert_eq!(enqueue(&r, &limits, NOW).unwrap().run_at_ms, Some(NOW + 10_000));
        // In the past (or now): due at once, stamped by the leader.
        r.run_at = Some(ts(NOW - 10_000));
        let job = enqueue(&r, &limits, NOW).unwrap();
        assert_eq!((job.run_at_ms, job.delay_ms), (None, 0));
        r.run_at = Some(ts(NOW + MAX_DELAY_MS + 1));
        assert_eq!(field_of(enqueue(&r, &limits, NOW)), "run_at");
        r.delay = Some(dur(1, 0));
        r.run_at = Some(ts(NOW + 10_000));
        assert_eq!(field_of(enqueue(&r, &limits, NOW)), "run_at");
    }

    #[test]
    fn enqueue_rejects_each_bad_field() {
        let limits = Limits::default();
        let cases: Vec<(&str, Spoil<proto::EnqueueRequest>)> = vec![
            ("queue", Box::new(|r| r.queue = "no spaces".into())),
            ("queue", Box::new(|r| r.queue = String::new())),
            ("payload", Box::new(|r| r.payload = vec![0; MAX_PAYLOAD_BYTES + 1])),
            ("headers", Box::new(|r| r.headers = (0..=MAX_HEADERS).map(|i| (i.to_string(), String::new())).collect())),
            (
                "headers",
                Box::new(|r| {
                    r.headers.insert("k".repeat(MAX_HEADER_KEY_BYTES + 1), "v".into());
                }),
            ),
            (
                "headers",
                Box::new(|r| {
                    r.headers.insert("k".into(), "v".repeat(MAX_HEADER_VALUE_BYTES + 1));
                }),
            ),
            (
                "headers",
                Box::new(|r| {
                    r.headers.insert(String::new(), "v".into());
                }),
            ),
            ("delay", Box::new(|r| r.delay = Some(dur(-1, 0)))),
            ("delay", Box::new(|r| r.delay = Some(dur(0, -5)))),
            ("delay", Box::new(|r| r.delay = Some(dur((MAX_DELAY_MS / 1000 + 1) as i64, 0)))),
            ("run_at", Box::new(|r| r.run_at = Some(Timestamp { seconds: 1, nanos: -1 }))),
            ("max_attempts", Box::new(|r| r.max_attempts = MAX_ATTEMPTS + 1)),
            ("lease_timeout", Box::new(|r| r.lease_timeout = Some(dur(0, 0)))),
            ("lease_timeout", Box::new(|r| r.lease_timeout = Some(dur(-3, 0)))),
            ("lease_timeout", Box::new(|r| r.lease_timeout = Some(dur((MAX_LEASE_TIMEOUT_MS / 1000 + 1) as i64, 0)))),
            ("idempotency_key", Box::new(|r| r.idempotency_key = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1))),
        ];
        for (i, (field, spoil)) in cases.iter().enumerate() {
            let mut r = req("q");
            spoil(&mut r);
            assert_eq!(&field_of(enqueue(&r, &limits, NOW)), field, "case {i}");
        }
    }

    #[test]
    fn enqueue_limits_are_inclusive() {
        let limits = Limits::default();
        let mut r = req("q");
        r.payload = vec![0; MAX_PAYLOAD_BYTES];
        r.headers = (0..MAX_HEADERS).map(|i| (i.to_string(), "v".repeat(MAX_HEADER_VALUE_BYTES))).collect();
        r.max_attempts = MAX_ATTEMPTS;
        r.lease_timeout = Some(dur((MAX_LEASE_TIMEOUT_MS / 1000) as i64, 0));
        r.delay = Some(dur((MAX_DELAY_MS / 1000) as i64, 0));
        assert!(enqueue(&r, &limits, NOW).is_ok());
        // A tighter node limit applies.
        let tight = Limits { max_payload_bytes: 1, ..Limits::default() };
        assert_eq!(field_of(enqueue(&req("q"), &tight, NOW)), "payload");
    }

    #[test]
    fn batches() {
        let limits = Limits::default();
        let empty = proto::EnqueueBatchRequest { jobs: vec![] };
        assert_eq!(field_of(enqueue_batch(&empty, &limits, NOW)), "jobs");
        let mut bad_header = req("q");
        bad_header.headers.insert(String::new(), String::new());
        let batch = proto::EnqueueBatchRequest { jobs: vec![req("a"), req("b"), req("c"), bad_header] };
        assert_eq!(field_of(enqueue_batch(&batch, &limits, NOW)), "jobs[3].headers");
        let ok = proto::EnqueueBatchRequest { jobs: vec![req("a"), req("b")] };
        let jobs = enqueue_batch(&ok, &limits, NOW).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].queue, "b");
        let small = Limits { max_batch: 1, ..Limits::default() };
        assert_eq!(field_of(enqueue_batch(&ok, &small, NOW)), "jobs");
    }

    fn good_hello() -> proto::Hello {
        proto::Hello {
            worker_id: "w1".into(),
            queues: vec!["a".into(), "b".into(), "a".into()],
            max_in_flight: 4,
            resume_session_id: String::new(),
        }
    }

    #[test]
    fn hellos() {
        let limits = Limits::default();
        let h = hello(&good_hello(), &limits).unwrap();
        assert_eq!(h.queues, vec!["a".to_string(), "b".to_string()]);
        assert_eq!((h.worker_id.as_str(), h.max_in_flight), ("w1", 4));
        assert_eq!(h.resume_session_id, None);

        let mut resumed = good_hello();
        resumed.resume_session_id = "s-1".into();
        assert_eq!(hello(&resumed, &limits).unwrap().resume_session_id, Some(SessionId("s-1".into())));

        let cases: Vec<(&str, Spoil<proto::Hello>)> = vec![
            ("worker_id", Box::new(|h| h.worker_id.clear())),
            ("worker_id", Box::new(|h| h.worker_id = "w".repeat(257))),
            ("queues", Box::new(|h| h.queues.clear())),
            ("queues", Box::new(|h| h.queues = (0..=MAX_QUEUES_PER_WORKER).map(|i| i.to_string()).collect())),
            ("queues[1]", Box::new(|h| h.queues[1] = "bad queue".into())),
            ("max_in_flight", Box::new(|h| h.max_in_flight = 0)),
            ("max_in_flight", Box::new(|h| h.max_in_flight = MAX_IN_FLIGHT + 1)),
            ("resume_session_id", Box::new(|h| h.resume_session_id = "s".repeat(MAX_SESSION_ID_BYTES + 1))),
        ];
        for (i, (field, spoil)) in cases.iter().enumerate() {
            let mut h = good_hello();
            spoil(&mut h);
            assert_eq!(&field_of(hello(&h, &limits)), field, "case {i}");
        }
    }

    fn fail_msg() -> proto::Fail {
        proto::Fail { job_id: "0-1".into(), fencing_token: 9, error: "boom".into(), retry_after: None, no_retry: false }
    }

    #[test]
    fn fail_retries() {
        let mut f = fail_msg();
        assert_eq!(fail_retry(&f, 250), Ok(RetryRequest::Backoff { jitter_permille: 250 }));
        f.retry_after = Some(dur(3, 0));
        assert_eq!(fail_retry(&f, 250), Ok(RetryRequest::After { delay_ms: 3000 }));
        f.retry_after = Some(dur(0, 0));
        assert_eq!(fail_retry(&f, 0), Ok(RetryRequest::After { delay_ms: 0 }));
        f.no_retry = true;
        assert_eq!(fail_retry(&f, 250), Ok(RetryRequest::Never));
        f.no_retry = false;
        f.retry_after = Some(dur(-1, 0));
        assert_eq!(field_of(fail_retry(&f, 0)), "retry_after");
        f.retry_after = Some(dur((MAX_DELAY_MS / 1000 + 1) as i64, 0));
        assert_eq!(field_of(fail_retry(&f, 0)), "retry_after");
    }

    #[test]
    fn worker_results() {
        let limits = Limits::default();
        let mut f = fail_msg();
        f.error = "é".repeat(MAX_ERROR_BYTES); // 2 bytes each: over the limit
        let Ok(Command::Fail { error, token, .. }) = fail(&f, &limits, 0) else { panic!("fail refused") };
        assert!(error.len() <= MAX_ERROR_BYTES && error.ends_with("(truncated)"));
        assert_eq!(token, FencingToken(9));
        f.job_id = "nope".into();
        assert_eq!(field_of(fail(&f, &limits, 0)), "job_id");

        let mut c = proto::Complete { job_id: "0-1".into(), fencing_token: 3, result: vec![1; MAX_RESULT_BYTES] };
        assert!(complete(&c, &limits).is_ok());
        c.result.push(0);
        assert_eq!(field_of(complete(&c, &limits)), "result");
        c.job_id.clear();
        assert_eq!(field_of(complete(&c, &limits)), "job_id");

        let mut p = proto::Progress {
            job_id: "0-1".into(),
            fencing_token: 3,
            message: "m".repeat(MAX_PROGRESS_MESSAGE_BYTES + 100),
            extend: Some(dur(30, 0)),
        };
        let Ok(Command::Progress { message, extend_ms, .. }) = progress(&p, &limits) else {
            panic!("progress refused")
        };
        assert!(message.len() <= MAX_PROGRESS_MESSAGE_BYTES);
        assert_eq!(extend_ms, Some(30_000));
        p.extend = Some(dur(0, 0));
        assert_eq!(field_of(progress(&p, &limits)), "extend");
        p.extend = Some(dur(-1, 0));
        assert_eq!(field_of(progress(&p, &limits)), "extend");

        let r = proto::Release { job_id: "x".into(), fencing_token: 1 };
        assert_eq!(field_of(release(&r)), "job_id");
    }

    #[test]
    fn cancels() {
        let limits = Limits::default();
        let mut c = proto::CancelJobRequest { job_id: "1-5".into(), reason: "no longer needed".into() };
        assert!(matches!(cancel(&c, &limits), Ok(Command::Cancel { .. })));
        c.reason = "r".repeat(MAX_REASON_BYTES + 1);
        assert_eq!(field_of(cancel(&c, &limits)), "reason");
        c.job_id = "1_5".into();
        assert_eq!(field_of(cancel(&c, &limits)), "job_id");
    }

    #[test]
    fn queue_config_updates() {
        assert_eq!(queue_config_update(&proto::QueueConfig::default()), Ok(QueueConfigUpdate::default()));
        let full = proto::QueueConfig {
            max_attempts: Some(5),
            lease_timeout: Some(dur(60, 0)),
            backoff_base: Some(dur(1, 0)),
            backoff_max: Some(dur(10, 0)),
            retention: Some(dur(3600, 0)),
            concurrency_limit: Some(0),
            rate_limit: Some(100),
            max_depth: Some(1_000_000),
        };
        assert_eq!(
            queue_config_update(&full),
            Ok(QueueConfigUpdate {
                max_attempts: Some(5),
                lease_timeout_ms: Some(60_000),
                backoff_base_ms: Some(1000),
                backoff_max_ms: Some(10_000),
                retention_ms: Some(3_600_000),
                concurrency_limit: Some(0),
                rate_limit: Some(100),
                max_depth: Some(1_000_000),
            })
        );
        let cases: Vec<(&str, Spoil<proto::QueueConfig>)> = vec![
            ("max_attempts", Box::new(|c| c.max_attempts = Some(0))),
            ("max_attempts", Box::new(|c| c.max_attempts = Some(MAX_ATTEMPTS + 1))),
            ("lease_timeout", Box::new(|c| c.lease_timeout = Some(dur(0, 0)))),
            ("lease_timeout", Box::new(|c| c.lease_timeout = Some(dur(-1, 0)))),
            ("backoff_base", Box::new(|c| c.backoff_base = Some(dur(0, 0)))),
            ("backoff_max", Box::new(|c| c.backoff_max = Some(dur(0, -1)))),
            ("backoff_base", Box::new(|c| c.backoff_base = Some(dur(11, 0)))),
            ("retention", Box::new(|c| c.retention = Some(dur(0, 0)))),
            ("retention", Box::new(|c| c.retention = Some(dur(i64::MAX, 0)))),
        ];
        for (i, (field, spoil)) in cases.iter().enumerate() {
            let mut c = full;
            spoil(&mut c);
            assert_eq!(&field_of(queue_config_update(&c)), field, "case {i}");
        }
        // Only one backoff bound given: nothing to compare it with.
        let only_base = proto::QueueConfig { backoff_base: Some(dur(7200, 0)), ..Default::default() };
        assert!(queue_config_update(&only_base).is_ok());
    }

    #[test]
    fn states() {
        assert_eq!(purge_state(proto::JobState::Failed as i32), Ok(JobState::Failed));
        assert_eq!(purge_state(proto::JobState::Scheduled as i32), Ok(JobState::Scheduled));
        for bad in [proto::JobState::Unspecified as i32, proto::JobState::Active as i32, 99, -1] {
            assert_eq!(field_of(purge_state(bad)), "state", "{bad}");
        }
        let e = purge_state(proto::JobState::Active as i32).unwrap_err();
        assert!(e.message.contains("ACTIVE"));

        assert_eq!(list_state(0), Ok(None));
        assert_eq!(list_state(proto::JobState::Active as i32), Ok(Some(JobState::Active)));
        assert_eq!(field_of(list_state(42)), "state");
    }

    #[test]
    fn wait_timeouts() {
        assert_eq!(wait_timeout(None), Ok(DEFAULT_WAIT_TIMEOUT));
        assert_eq!(wait_timeout(Some(&dur(5, 0))), Ok(std::time::Duration::from_secs(5)));
        assert_eq!(wait_timeout(Some(&dur(0, 0))), Ok(std::time::Duration::ZERO));
        assert_eq!(wait_timeout(Some(&dur(3600, 0))), Ok(MAX_WAIT_TIMEOUT));
        assert_eq!(field_of(wait_timeout(Some(&dur(3601, 0)))), "timeout");
        assert_eq!(field_of(wait_timeout(Some(&dur(-1, 0)))), "timeout");
    }

    #[test]
    fn list_limits_and_page_tokens() {
        assert_eq!(list_limit(0), 100);
        assert_eq!(list_limit(1), 1);
        assert_eq!(list_limit(1000), 1000);
        assert_eq!(list_limit(u32::MAX), 1000);

        let id = JobId { shard: ShardId(4), seq: 123 };
        assert_eq!(decode_page_token("page_token", &encode_page_token(id)), Ok(Some(id)));
        assert_eq!(decode_page_token("page_token", ""), Ok(None));
        assert_eq!(field_of(decode_page_token("page_token", "garbage")), "page_token");
    }

    #[test]
    fn clipping_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
        assert_eq!(clip_text("abc", 3), "abc");
        assert_eq!(clip_text("abcdef", 3), "abc");
        let long = "x".repeat(100);
        let clipped = clip_text(&long, 50);
        assert!(clipped.len() <= 50 && clipped.ends_with("(truncated)"));
    }

    #[test]
    fn headers_map_is_sorted_and_checked() {
        let given: HashMap<String, String> = [("b".into(), "2".into()), ("a".into(), "1".into())].into();
        let h = headers("headers", &given, &Limits::default()).unwrap();
        assert_eq!(h.keys().collect::<Vec<_>>(), ["a", "b"]);
    }
}
