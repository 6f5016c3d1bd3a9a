//! `gantry bench`: a load generator over the public API (the SDK's `Client`
//! and `Worker`, nothing private).
//!
//! Scenarios, each on its own queue so their counts never mix:
//! - `enqueue`: N jobs, `--in-flight` enqueue RPCs outstanding (closed loop);
//!   jobs/s and enqueue RPC latency. Confirms the broker counts them all.
//! - `e2e`: SDK workers with a no-op handler first, then N jobs as above;
//!   jobs/s from the first enqueue until every completion was acknowledged.
//! - `latency`: workers running, jobs sent at a fixed offered rate (open
//!   loop) for `--duration`; enqueue→start latency (the handler reads the
//!   send stamp in the payload) and enqueue→SUCCEEDED latency (WaitJob on a
//!   sample of the jobs).
//!
//! Every loop ends by count or time; errors are counted, not fatal. A
//! scenario whose acknowledged jobs are not all accounted for (completed, or
//! counted by the broker) within `--drain-timeout` makes the command fail.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use gantry_worker::{Client, JobContext, JobError, WorkerHandle, proto};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::instrument::WithSubscriber as _;

use super::output::Table;
use super::{ClientArgs, render_status};

/// Open loop: sends still waiting for their answer beyond this are skipped
/// (and counted), so an overloaded broker cannot make the generator grow
/// without bound.
const MAX_OUTSTANDING: usize = 20_000;
/// Distinct error messages kept per scenario; the rest are lumped together.
const MAX_ERROR_KINDS: usize = 16;
/// How long bench workers get to open their sessions.
const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Enqueue,
    E2e,
    Consume,
    Latency,
    All,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Enqueue => "enqueue",
            Scenario::E2e => "e2e",
            Scenario::Consume => "consume",
            Scenario::Latency => "latency",
            Scenario::All => "all",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Queue to use (default bench-<random>). With `--scenario all` each
    /// scenario uses `<queue>.<scenario>`.
    #[arg(long)]
    pub queue: Option<String>,
    /// Spread each scenario over this many queues, `<queue>-0` to
    /// `<queue>-<N-1>` (jobs round-robin, every worker takes all of them),
    /// so a cluster of several shards carries load in each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub queues: u32,
    /// Payload size of each job (the latency scenario uses at least 8: its send stamp).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=64 << 20))]
    pub payload_bytes: u64,
    /// enqueue: enqueue throughput; e2e: enqueue→complete throughput with
    /// workers; consume: --jobs enqueued first, then workers start and the
    /// rate they empty the queue at is measured (dispatch + complete);
    /// latency: latencies at --rate; all: each in turn.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Jobs enqueued by the enqueue and e2e scenarios.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub jobs: u64,
    /// Enqueue RPCs outstanding at once (enqueue and e2e scenarios).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub in_flight: u64,
    /// Jobs per EnqueueBatch call; 1 uses plain Enqueue (enqueue and e2e scenarios).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// With --batch 1: let the SDK pack concurrent Enqueue calls into
    /// EnqueueBatch RPCs of up to this many jobs (`Client::coalescing`); each
    /// call still waits for its own job's commit. 0 = off.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub coalesce: u64,
    /// SDK workers (sessions) of the e2e and latency scenarios.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub workers: u32,
    /// Concurrency (max in flight) of each worker.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub worker_concurrency: u32,
    /// Offered enqueue rate of the latency scenario, jobs/s.
    #[arg(long, default_value_t = 2000.0, value_parser = parse_rate)]
    pub rate: f64,
    /// How long the latency scenario sends, e.g. 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Separate gRPC connections (clients) the producers spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// The latency scenario follows 1 in N jobs with WaitJob to measure
    /// enqueue→SUCCEEDED; 0 turns that off.
    #[arg(long, default_value_t = 20)]
    pub wait_sample: u64,
    /// How long to wait for outstanding completions after the last enqueue.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub drain_timeout: Duration,
    /// Stop a scenario (and fail) once this many enqueues have failed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_errors: u64,
    /// Leave the benchmark's jobs in the broker. By default the jobs of an
    /// auto-named queue are purged after each scenario; a `--queue` you name
    /// is never purged.
    #[arg(long)]
    pub keep_jobs: bool,
    /// No progress lines on stderr (`--json` implies it).
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !r.is_finite() || r <= 0.0 || r > 1_000_000.0 {
        return Err(format!("rate must be > 0 and at most 1000000 jobs/s, got {s}"));
    }
    Ok(r)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than 0".to_owned());
    }
    Ok(d)
}

fn valid_queue_name(q: &str) -> bool {
    (1..=128).contains(&q.len()) && q.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

// ---------------------------------------------------------------------------
// Figures

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Histograms hold microseconds, 1 µs .. 1 h, 3 significant digits.
fn new_hist() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(_) => unreachable!("valid histogram bounds"),
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `None` when nothing was recorded.
pub fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
    if h.is_empty() {
        return None;
    }
    let ms = |us: u64| round3(us as f64 / 1000.0);
    Some(LatencySummary {
        count: h.len(),
        mean: round3(h.mean() / 1000.0),
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    })
}

/// Milliseconds with about four significant digits.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.3}")
    } else if ms < 100.0 {
        format!("{ms:.2}")
    } else if ms < 10_000.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 100.0 { format!("{r:.0}") } else { format!("{r:.1}") }
}

/// What one scenario measured; also its `--json` shape.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub scenario: &'static str,
    pub queue: String,
    /// Jobs whose enqueue was acknowledged.
    pub jobs: u64,
    /// Jobs the generator tried to enqueue.
    pub attempted: u64,
    /// Jobs whose enqueue failed (see `error_kinds`).
    pub errors: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    /// enqueue: until the last enqueue answer; e2e: until the last completion;
    /// latency: the sending window, until the last enqueue answer.
    pub seconds: f64,
    /// `jobs` (e2e: `completed`) per second over `seconds`.
    pub jobs_per_sec: f64,
    /// Enqueue RPC latency of answered calls (one EnqueueBatch call when `--batch` > 1).
    pub latency_ms: Option<LatencySummary>,
    /// Completions the broker acknowledged to the bench workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed: Option<u64>,
    /// Handler invocations (more than `completed` if jobs ran twice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_runs: Option<u64>,
    /// What the broker's GetQueue counts: enqueue = scheduled+ready+active,
    /// e2e/latency = succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_count: Option<u64>,
    /// Acknowledged jobs not accounted for after the drain timeout.
    pub lost: u64,
    /// latency: the longest time between two consecutive acknowledged
    /// enqueues, and when it started (seconds into the run). Under a fixed
    /// offered rate this is the unavailability window of a leader change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_ack_gap_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longest_ack_gap_at_s: Option<f64>,
    /// Stopped early: `--max-errors` enqueues failed.
    pub aborted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<f64>,
    /// Sends skipped because MAX_OUTSTANDING answers were still pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_latency_ms: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete_latency_ms: Option<LatencySummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl ScenarioReport {
    fn new(scenario: Scenario, queue: &str) -> ScenarioReport {
        ScenarioReport {
            scenario: scenario.name(),
            queue: queue.to_owned(),
            jobs: 0,
            attempted: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            seconds: 0.0,
            jobs_per_sec: 0.0,
            latency_ms: None,
            completed: None,
            handler_runs: None,
            broker_count: None,
            lost: 0,
            longest_ack_gap_ms: None,
            longest_ack_gap_at_s: None,
            aborted: false,
            offered_rate: None,
            skipped: None,
            start_latency_ms: None,
            complete_latency_ms: None,
            notes: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
struct BenchJson<'a> {
    addr: Vec<String>,
    payload_bytes: u64,
    connections: u32,
    in_flight: u64,
    batch: u64,
    coalesce: u64,
    workers: u32,
    worker_concurrency: u32,
    scenarios: &'a [ScenarioReport],
    ok: bool,
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { (n as f64 / secs * 10.0).round() / 10.0 } else { 0.0 }
}

/// The results as text: one row per scenario, one row per latency figure, notes.
pub fn render_reports(reports: &[ScenarioReport]) -> String {
    let mut t = Table::new(&["SCENARIO", "QUEUE", ">JOBS", ">ERRORS", ">SECONDS", ">JOBS/S", ">COMPLETED", ">LOST"]);
    for r in reports {
        t.row(vec![
            r.scenario.to_owned(),
            r.queue.clone(),
            r.jobs.to_string(),
            r.errors.to_string(),
            format!("{:.3}", r.seconds),
            fmt_rate(r.jobs_per_sec),
            r.completed.map(|c| c.to_string()).unwrap_or_else(|| "-".to_owned()),
            r.lost.to_string(),
        ]);
    }
    let mut out = t.render();
    let mut l = Table::new(&["SCENARIO", "LATENCY (ms)", ">COUNT", ">P50", ">P90", ">P99", ">P99.9", ">MAX"]);
    for r in reports {
        let rpc = if r.scenario == "latency" { "enqueue RPC (from scheduled send)" } else { "enqueue RPC" };
        for (name, s) in [
            (rpc, &r.latency_ms),
            ("enqueue→start", &r.start_latency_ms),
            ("enqueue→SUCCEEDED (sampled)", &r.complete_latency_ms),
        ] {
            if let Some(s) = s {
                l.row(vec![
                    r.scenario.to_owned(),
                    name.to_owned(),
                    s.count.to_string(),
                    fmt_ms(s.p50),
                    fmt_ms(s.p90),
                    fmt_ms(s.p99),
                    fmt_ms(s.p999),
                    fmt_ms(s.max),
                ]);
            }
        }
    }
    if !l.is_empty() {
        out.push('\n');
        out.push_str(&l.render());
    }
    let notes: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            let errors = r.error_kinds.iter().map(move |(k, n)| format!("{}: {n} × {k}", r.scenario));
            r.notes.iter().map(move |n| format!("{}: {n}", r.scenario)).chain(errors)
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&format!("- {n}\n"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Shared machinery

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    enqueued: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
}

#[derive(Debug, Default)]
struct ErrorKinds(BTreeMap<String, u64>);

impl ErrorKinds {
    fn add(&mut self, key: String, n: u64) {
        let key = if self.0.len() >= MAX_ERROR_KINDS && !self.0.contains_key(&key) {
            "(other errors)".to_owned()
        } else {
            key
        };
        *self.0.entry(key).or_default() += n;
    }

    fn merge(&mut self, other: ErrorKinds) {
        for (k, n) in other.0 {
            self.add(k, n);
        }
    }
}

fn error_key(e: &gantry_worker::Error) -> String {
    let mut s = match e.status() {
        Some(status) => render_status(status),
        None => e.to_string(),
    };
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The first 8 bytes of a latency payload: nanoseconds since the scenario's epoch.
pub fn write_stamp(payload: &mut [u8], nanos: u64) {
    if let Some(head) = payload.get_mut(..8) {
        head.copy_from_slice(&nanos.to_le_bytes());
    }
}

pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// A progress line on stderr: rewritten in place ~4×/s on a terminal, one
/// line per second otherwise.
struct Progress {
    task: Option<JoinHandle<()>>,
    tty: bool,
}

impl Progress {
    fn start(enabled: bool, label: String, total: u64, counters: Arc<Counters>, rate_of_completed: bool) -> Progress {
        if !enabled {
            return Progress { task: None, tty: false };
        }
        let tty = std::io::stderr().is_terminal();
        let tick = if tty { Duration::from_millis(250) } else { Duration::from_secs(1) };
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64);
            let mut interval = tokio::time::interval(tick);
            interval.tick().await;
            loop {
                interval.tick().await;
                let enqueued = counters.enqueued.load(Relaxed);
                let completed = counters.completed.load(Relaxed);
                let errors = counters.errors.load(Relaxed);
                let primary = if rate_of_completed { completed } else { enqueued };
                let now = Instant::now();
                let rate = (primary - last.1.min(primary)) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, primary);
                let mut line = format!("[{label}] enqueued {enqueued}/{total}");
                if rate_of_completed || completed > 0 {
                    line.push_str(&format!("  completed {completed}"));
                }
                if errors > 0 {
                    line.push_str(&format!("  errors {errors}"));
                }
                line.push_str(&format!(
                    "  {} {}/s  {:.0}s",
                    if rate_of_completed { "completing" } else { "enqueuing" },
                    fmt_rate(rate),
                    started.elapsed().as_secs_f64()
                ));
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        });
        Progress { task: Some(task), tty }
    }

    fn finish(self) {
        if let Some(task) = self.task {
            task.abort();
            if self.tty {
                eprint!("\r\x1b[K");
            }
        }
    }
}

fn warnings_only() -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_writer(std::io::stderr).finish()
}

/// SDK workers on one queue, stopped together.
struct BenchWorkers {
    handles: Vec<WorkerHandle>,
    tasks: JoinSet<Result<(), gantry_worker::Error>>,
    stop: watch::Sender<bool>,
}

impl BenchWorkers {
    async fn start<H, Fut>(queue: &str, args: &BenchArgs, handler: H) -> anyhow::Result<Self>
    where
        H: Fn(JobContext) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
    {
        // Eight workers' session chatter at `info` would bury the progress
        // line; keep their warnings unless the user chose a log filter.
        let quiet_logs = std::env::var_os("GANTRY_LOG").is_none() && std::env::var_os("RUST_LOG").is_none();
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        let mut tasks = JoinSet::new();
        for i in 0..args.workers {
            // The client flags' TLS and token apply to the bench's workers too.
            let worker = args
                .client
                .worker_builder()?
                .queues(queue_names(queue, args.queues))
                .concurrency(args.worker_concurrency)
                .worker_id(format!("gantry-bench-{}-{i}", std::process::id()))
                .shutdown_timeout(Duration::from_secs(5))
                .build()
                .context("bench worker")?;
            handles.push(worker.handle());
            let mut rx = stop.subscribe();
            let handler = handler.clone();
            let run = async move {
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                worker.run(handler, shutdown).await
            };
            if quiet_logs {
                tasks.spawn(run.with_subscriber(warnings_only()));
            } else {
                tasks.spawn(run);
            }
        }
        let mut workers = BenchWorkers { handles, tasks, stop };
        let deadline = tokio::time::Instant::now() + WORKER_CONNECT_TIMEOUT;
        for h in workers.handles.clone() {
            tokio::select! {
                _ = h.wait_connected() => {}
                () = tokio::time::sleep_until(deadline) => {
                    workers.tasks.abort_all();
                    anyhow::bail!(
                        "bench workers could not open a session within {}s",
                        WORKER_CONNECT_TIMEOUT.as_secs()
                    );
                }
                Some(ended) = workers.tasks.join_next() => {
                    workers.tasks.abort_all();
                    return Err(match ended {
                        Ok(Err(e)) => anyhow::Error::from(e).context("bench worker"),
                        Ok(Ok(())) => anyhow::anyhow!("a bench worker stopped before it connected"),
                        Err(e) => anyhow::anyhow!("a bench worker task failed: {e}"),
                    });
                }
            }
        }
        Ok(workers)
    }

    /// Completions the broker accepted.
    fn acked(&self) -> u64 {
        self.handles.iter().map(|h| h.stats().completed).sum()
    }

    /// Polls `acked` until it reaches `target`; the instant it did, or `None`
    /// at the deadline.
    async fn drain(&self, target: u64, timeout: Duration, counters: &Counters) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.acked();
            counters.completed.store(done, Relaxed);
            if done >= target {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Keeps `counters.completed` current for the progress line.
    fn watch_completions(&self, counters: Arc<Counters>) -> JoinHandle<()> {
        let handles = self.handles.clone();
        tokio::spawn(async move {
            loop {
                counters.completed.store(handles.iter().map(|h| h.stats().completed).sum(), Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// Graceful stop (goodbye to the broker); problems become notes.
    async fn shutdown(mut self, notes: &mut Vec<String>) {
        self.stop.send_replace(true);
        let tasks = &mut self.tasks;
        let joined = tokio::time::timeout(Duration::from_secs(15), async {
            let mut problems = Vec::new();
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => problems.push(format!("worker stopped with: {}", error_key(&e))),
                    Err(e) => problems.push(format!("worker task failed: {e}")),
                }
            }
            problems
        })
        .await;
        match joined {
            Ok(problems) => notes.extend(problems),
            Err(_) => {
                self.tasks.abort_all();
                notes.push("bench workers did not stop within 15s".to_owned());
            }
        }
    }
}

/// How the workers of a scenario emptied the queue.
struct Drained<'a> {
    target: u64,
    started: Instant,
    /// When the last expected completion was accepted; `None` at timeout.
    drained: Option<Instant>,
    runs: &'a AtomicU64,
}

/// A handler that succeeds at once and counts its runs (a job run twice
/// would show as more runs than jobs).
fn counting_handler(
    runs: Arc<AtomicU64>,
) -> impl Fn(JobContext) -> std::future::Ready<Result<Bytes, JobError>> + Clone + Send + Sync + 'static {
    move |_ctx: JobContext| {
        runs.fetch_add(1, Relaxed);
        std::future::ready(Ok(Bytes::new()))
    }
}

struct Bench {
    args: BenchArgs,
    endpoints: Vec<String>,
    clients: Vec<Client>,
    payload: Bytes,
    progress: bool,
}

/// What the closed-loop enqueue phase measured.
struct EnqueuePhase {
    ok: u64,
    attempted: u64,
    errors: ErrorKinds,
    hist: Histogram<u64>,
    elapsed: Duration,
}

impl Bench {
    fn admin_client(&self) -> &Client {
        &self.clients[0]
    }

    /// N jobs, `--in-flight` producers each with one RPC outstanding,
    /// spread over the connections.
    async fn enqueue_phase(&self, queue: &str, counters: &Arc<Counters>) -> anyhow::Result<EnqueuePhase> {
        let n = self.args.jobs;
        let batch = self.args.batch;
        let max_errors = self.args.max_errors;
        let producers = self.args.in_flight.min(n.div_ceil(batch));
        let next = Arc::new(AtomicU64::new(0));
        let queues: Arc<[String]> = queue_names(queue, self.args.queues).into();
        let started = Instant::now();
        let mut set = JoinSet::new();
        for i in 0..producers {
            let client = self.clients[i as usize % self.clients.len()].clone();
            let (queues, payload, next, counters) =
                (queues.clone(), self.payload.clone(), next.clone(), counters.clone());
            set.spawn(async move {
                let mut hist = new_hist();
                let mut errors = ErrorKinds::default();
                let mut ok = 0u64;
                loop {
                    if counters.errors.load(Relaxed) >= max_errors {
                        break;
                    }
                    let start = next.fetch_add(batch, Relaxed);
                    if start >= n {
                        break;
                    }
                    let count = batch.min(n - start);
                    // A batch goes to one queue: with several shards it stays one RPC to one group.
                    let queue = &queues[((start / batch) % queues.len() as u64) as usize];
                    counters.sent.fetch_add(count, Relaxed);
                    let t0 = Instant::now();
                    let mut good = 0;
                    if batch == 1 {
                        match client.enqueue(queue.as_str(), incompressible(payload.len(), start)).send().await {
                            Ok(_) => good = 1,
                            Err(e) => errors.add(error_key(&e), 1),
                        }
                    } else {
                        let reqs = (0..count)
                            .map(|i| proto::EnqueueRequest {
                                queue: queue.clone(),
                                payload: incompressible(payload.len(), start + i).to_vec(),
                                ..Default::default()
                            })
                            .collect();
                        match client.enqueue_batch(reqs).await {
                            Ok(results) => {
                                for r in &results {
                                    if r.job_id.is_empty() || !r.error.is_empty() {
                                        errors.add(format!("refused in batch: {}", r.error), 1);
                                    } else {
                                        good += 1;
                                    }
                                }
                                let missing = count.saturating_sub(results.len() as u64);
                                if missing > 0 {
                                    errors.add("EnqueueBatch answered fewer results than jobs".to_owned(), missing);
                                }
                            }
                            Err(e) => errors.add(error_key(&e), count),
                        }
                    }
                    // Latency of answered calls only: a failure's time says
                    // more about retries and timeouts than about the broker.
                    if good > 0 {
                        hist.saturating_record(micros(t0.elapsed()));
                    }
                    let good = good.min(count);
                    ok += good;
                    counters.enqueued.fetch_add(good, Relaxed);
                    counters.errors.fetch_add(count - good, Relaxed);
                }
                (ok, errors, hist)
            });
        }
        let mut phase = EnqueuePhase {
            ok: 0,
            attempted: 0,
            errors: ErrorKinds::default(),
            hist: new_hist(),
            elapsed: Duration::ZERO,
        };
        while let Some(joined) = set.join_next().await {
            let (ok, errors, hist) = joined.context("enqueue producer task failed")?;
            phase.ok += ok;
            phase.errors.merge(errors);
            phase.hist.add(&hist).map_err(|e| anyhow::anyhow!("merging histograms: {e}"))?;
        }
        phase.elapsed = started.elapsed();
        phase.attempted = counters.sent.load(Relaxed).min(n);
        Ok(phase)
    }

    fn fill_enqueue(&self, report: &mut ScenarioReport, phase: &EnqueuePhase) {
        self.check_aborted(report, phase.attempted - phase.ok.min(phase.attempted));
        report.jobs = phase.ok;
        report.attempted = phase.attempted;
        report.errors = phase.attempted - phase.ok.min(phase.attempted);
        report.error_kinds = phase.errors.0.clone();
        report.latency_ms = summarize(&phase.hist);
        if self.args.batch == 1 && self.args.coalesce > 0 {
            report.notes.push(format!(
                "one Enqueue call per job, packed by the SDK into EnqueueBatch RPCs of up to {} jobs",
                self.args.coalesce
            ));
        }
        if self.args.batch > 1 {
            report.notes.push(format!("enqueue RPC latency is per EnqueueBatch call of {} jobs", self.args.batch));
        }
    }

    fn check_aborted(&self, report: &mut ScenarioReport, errors: u64) {
        if errors >= self.args.max_errors {
            report.aborted = true;
            report.notes.push(format!("stopped early after {errors} failed enqueues (--max-errors)"));
        }
    }

    /// Reads the queue until `count(info)` reaches `want` (the state is
    /// applied a moment after the commit that acknowledged the enqueue) or
    /// 5 s pass; the last count seen.
    async fn broker_count(
        &self,
        queue: &str,
        want: u64,
        count: fn(&proto::QueueInfo) -> u64,
        notes: &mut Vec<String>,
    ) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let queues = queue_names(queue, self.args.queues);
        let mut seen = None;
        'poll: loop {
            let mut total = 0;
            for queue in &queues {
                match self.admin_client().admin().get_queue(proto::GetQueueRequest { queue: queue.clone() }).await {
                    Ok(info) => total += count(info.get_ref()),
                    // Not created: none of the jobs went there (yet).
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => {
                        if Instant::now() >= deadline {
                            notes.push(format!("GetQueue failed: {}", render_status(&status)));
                            return seen;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'poll;
                    }
                }
            }
            seen = Some(total);
            if total >= want || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cleanup(&self, queue: &str, state: proto::JobState, notes: &mut Vec<String>) {
        if self.args.keep_jobs || self.args.queue.is_some() {
            return;
        }
        for queue in queue_names(queue, self.args.queues) {
            let req = proto::PurgeQueueRequest { queue, state: state as i32 };
            if let Err(status) = self.admin_client().admin().purge_queue(req).await {
                notes.push(format!("could not purge the queue afterwards: {}", render_status(&status)));
            }
        }
    }

    async fn scenario_enqueue(&self, queue: &str) -> anyhow::Result<ScenarioReport> {
        let mut report = ScenarioReport::new(Scenario::Enqueue, queue);
        let counters = Arc::new(Counters::default());
        let progress = Progress::start(self.progress, "enqueue".into(), self.args.jobs, counters.clone(), false);
        let phase = self.enqueue_phase(queue, &counters).await;
        progress.finish();
        let phase = phase?;
        self.fill_enqueue(&mut report, &phase);
        report.seconds = round3(phase.elapsed.as_secs_f64());
        report.jobs_per_sec = per_sec(phase.ok, report.seconds);
        let counted = self.broker_count(queue, phase.ok, |q| q.scheduled + q.ready + q.active, &mut report.notes).await;
        report.broker_count = counted;
        match counted {
            Some(c) => report.lost = phase.ok.saturating_sub(c),
            None => report.notes.push("could not confirm the jobs with GetQueue".to_owned()),
        }
        self.cleanup(queue, proto::JobState::Ready, &mut report.notes).await;
        Ok(report)
    }

    async fn scenario_e2e(&self, queue: &str) -> anyhow::Result<ScenarioReport> {
        let mut report = ScenarioReport::new(Scenario::E2e, queue);
        let runs = Arc::new(AtomicU64::new(0));
        let workers = BenchWorkers::start(queue, &self.args, counting_handler(runs.clone())).await?;
        let counters = Arc::new(Counters::default());
        let watcher = workers.watch_completions(counters.clone());
        let progress = Progress::start(self.progress, "e2e".into(), self.args.jobs, counters.clone(), true);
        let started = Instant::now();
        let phase = self.enqueue_phase(queue, &counters).await;
        let drained = match &phase {
            Ok(phase) => workers.drain(phase.ok, self.args.drain_timeout, &counters).await,
            Err(_) => None,
        };
        watcher.abort();
        progress.finish();
        let Ok(phase) = phase else {
            workers.shutdown(&mut report.notes).await;
            return phase.map(|_| report);
        };
        self.fill_enqueue(&mut report, &phase);
        self.report_drained(&mut report, queue, workers, Drained { target: phase.ok, started, drained, runs: &runs })
            .await;
        Ok(report)
    }

    /// The workers' side of e2e and consume: completions, time, loss.
    async fn report_drained(
        &self,
        report: &mut ScenarioReport,
        queue: &str,
        workers: BenchWorkers,
        drain: Drained<'_>,
    ) {
        let completed = workers.acked();
        workers.shutdown(&mut report.notes).await;
        let end = drain.drained.unwrap_or_else(Instant::now);
        report.seconds = round3(end.duration_since(drain.started).as_secs_f64());
        report.jobs_per_sec = per_sec(completed.min(drain.target), report.seconds);
        report.completed = Some(completed);
        report.handler_runs = Some(drain.runs.load(Relaxed));
        report.lost = drain.target.saturating_sub(completed);
        if drain.drained.is_none() {
            report.notes.push(format!(
                "only {completed} of {} completions within the {}s drain timeout",
                drain.target,
                self.args.drain_timeout.as_secs_f64()
            ));
        }
        report.broker_count = self.broker_count(queue, completed, |q| q.succeeded, &mut report.notes).await;
        self.cleanup(queue, proto::JobState::Succeeded, &mut report.notes).await;
    }

    /// The queue is filled first (not timed here), then workers empty it:
    /// what a consumer of a backlog sees (NATS's "consume" figure).
    async fn scenario_consume(&self, queue: &str) -> anyhow::Result<ScenarioReport> {
        let mut report = ScenarioReport::new(Scenario::Consume, queue);
        let counters = Arc::new(Counters::default());
        let progress =
            Progress::start(self.progress, "consume: filling".into(), self.args.jobs, counters.clone(), false);
        let phase = self.enqueue_phase(queue, &counters).await;
        progress.finish();
        let phase = phase?;
        self.fill_enqueue(&mut report, &phase);
        report.notes.push(format!(
            "the backlog of {} jobs was enqueued first, in {:.3}s; seconds and jobs/s are the workers' (session \
             open to the last accepted complete); enqueue latency is of the filling",
            phase.ok,
            phase.elapsed.as_secs_f64()
        ));
        let runs = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(Counters::default());
        let progress = Progress::start(self.progress, "consume".into(), phase.ok, counters.clone(), true);
        let started = Instant::now();
        let workers = BenchWorkers::start(queue, &self.args, counting_handler(runs.clone())).await?;
        let drained = workers.drain(phase.ok, self.args.drain_timeout, &counters).await;
        progress.finish();
        self.report_drained(&mut report, queue, workers, Drained { target: phase.ok, started, drained, runs: &runs })
            .await;
        Ok(report)
    }

    async fn scenario_latency(&self, queue: &str) -> anyhow::Result<ScenarioReport> {
        let mut report = ScenarioReport::new(Scenario::Latency, queue);
        let rate = self.args.rate;
        let total = ((rate * self.args.duration.as_secs_f64()).round() as u64).max(1);
        let epoch = Instant::now();
        let start_hist = Arc::new(Mutex::new(new_hist()));
        let runs = Arc::new(AtomicU64::new(0));
        let handler = {
            let (start_hist, runs) = (start_hist.clone(), runs.clone());
            move |ctx: JobContext| {
                let now = epoch.elapsed().as_nanos() as u64;
                runs.fetch_add(1, Relaxed);
                if ctx.attempt() == 1
                    && let Some(sent) = read_stamp(ctx.payload())
                {
                    lock(&start_hist).saturating_record((now.saturating_sub(sent) / 1000).max(1));
                }
                std::future::ready(Ok::<Bytes, JobError>(Bytes::new()))
            }
        };
        let workers = BenchWorkers::start(queue, &self.args, handler).await?;
        let counters = Arc::new(Counters::default());
        let watcher = workers.watch_completions(counters.clone());
        let progress = Progress::start(self.progress, "latency".into(), total, counters.clone(), false);

        let rpc_hist = Arc::new(Mutex::new(new_hist()));
        let done_hist = Arc::new(Mutex::new(new_hist()));
        let errors = Arc::new(Mutex::new(ErrorKinds::default()));
        let wait_misses = Arc::new(AtomicU64::new(0));
        let last_answer = Arc::new(AtomicU64::new(0));
        let acked_at = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
        let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
        let mut base = self.payload.to_vec();
        base.resize(base.len().max(8), 0);
        let queues: Arc<[String]> = queue_names(queue, self.args.queues).into();
        let sample = self.args.wait_sample;
        let wait_for = self.args.drain_timeout;
        let mut skipped = 0u64;
        let mut set = JoinSet::new();
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            while set.try_join_next().is_some() {}
            if counters.errors.load(Relaxed) >= self.args.max_errors {
                break;
            }
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            counters.sent.fetch_add(1, Relaxed);
            let mut payload = base.clone();
            write_stamp(&mut payload, due.duration_since(epoch).as_nanos() as u64);
            let client = self.clients[i as usize % self.clients.len()].clone();
            let queue = queues[(i % queues.len() as u64) as usize].clone();
            let (counters, rpc_hist, done_hist, errors, wait_misses, last_answer, acked_at) = (
                counters.clone(),
                rpc_hist.clone(),
                done_hist.clone(),
                errors.clone(),
                wait_misses.clone(),
                last_answer.clone(),
                acked_at.clone(),
            );
            set.spawn(async move {
                let _permit = permit;
                let sent = client.enqueue(queue, payload).send().await;
                last_answer.fetch_max(start.elapsed().as_nanos() as u64, Relaxed);
                match sent {
                    Ok(job) => {
                        lock(&acked_at).push(start.elapsed().as_nanos() as u64);
                        lock(&rpc_hist).saturating_record(micros(due.elapsed()));
                        counters.enqueued.fetch_add(1, Relaxed);
                        if sample > 0 && i % sample == 0 {
                            match client.wait(&job.job_id, wait_for).await {
                                Ok(j) if j.state() == proto::JobState::Succeeded => {
                                    lock(&done_hist).saturating_record(micros(due.elapsed()));
                                }
                                _ => {
                                    wait_misses.fetch_add(1, Relaxed);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Relaxed);
                        lock(&errors).add(error_key(&e), 1);
                    }
                }
            });
        }
        // Every enqueue answered, and every sampled WaitJob back (bounded).
        let bounded = tokio::time::timeout(wait_for + Duration::from_secs(10), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if bounded.is_err() {
            set.abort_all();
            report.notes.push("some enqueues or WaitJob calls were still pending at the drain timeout".to_owned());
        }
        let ok = counters.enqueued.load(Relaxed);
        let drained = workers.drain(ok, self.args.drain_timeout, &counters).await;
        watcher.abort();
        progress.finish();
        let completed = workers.acked();
        workers.shutdown(&mut report.notes).await;

        report.jobs = ok;
        report.attempted = counters.sent.load(Relaxed);
        report.errors = counters.errors.load(Relaxed);
        let failed = report.errors;
        self.check_aborted(&mut report, failed);
        report.error_kinds = std::mem::take(&mut lock(&errors).0);
        report.seconds = round3(Duration::from_nanos(last_answer.load(Relaxed)).as_secs_f64());
        report.jobs_per_sec = per_sec(ok, report.seconds);
        report.offered_rate = Some(rate);
        report.skipped = Some(skipped);
        report.latency_ms = summarize(&lock(&rpc_hist));
        if let Some((gap, at)) = longest_gap(&mut lock(&acked_at)) {
            report.longest_ack_gap_ms = Some(round3(gap as f64 / 1e6));
            report.longest_ack_gap_at_s = Some(round3(at as f64 / 1e9));
            report.notes.push(format!(
                "longest gap between acknowledged enqueues: {:.1} ms, from {:.3} s into the run",
                gap as f64 / 1e6,
                at as f64 / 1e9
            ));
        }
        report.start_latency_ms = summarize(&lock(&start_hist));
        report.complete_latency_ms = summarize(&lock(&done_hist));
        report.completed = Some(completed);
        report.handler_runs = Some(runs.load(Relaxed));
        report.lost = ok.saturating_sub(completed);
        report.notes.push(format!(
            "offered {} jobs/s for {}, achieved {} jobs/s{}",
            fmt_rate(rate),
            humantime::format_duration(self.args.duration),
            fmt_rate(report.jobs_per_sec),
            if skipped > 0 {
                format!(", {skipped} sends skipped ({MAX_OUTSTANDING} outstanding)")
            } else {
                String::new()
            }
        ));
        report.notes.push(
            "latencies are measured from each job's scheduled send time; enqueue→start in the handler (payload \
             stamp)"
                .to_owned(),
        );
        if sample > 0 {
            report.notes.push(format!(
                "enqueue→SUCCEEDED: WaitJob on 1 in {sample} jobs, returned when SUCCEEDED was committed (includes the \
                 WaitJob round trip){}",
                match wait_misses.load(Relaxed) {
                    0 => String::new(),
                    n => format!("; {n} sampled waits did not see SUCCEEDED"),
                }
            ));
        }
        if drained.is_none() {
            report.notes.push(format!(
                "only {completed} of {ok} completions within the {}s drain timeout",
                self.args.drain_timeout.as_secs_f64()
            ));
        }
        report.broker_count = self.broker_count(queue, completed, |q| q.succeeded, &mut report.notes).await;
        self.cleanup(queue, proto::JobState::Succeeded, &mut report.notes).await;
        Ok(report)
    }
}

/// Queue per scenario: the base name, or `<base>.<scenario>` when running all.
/// The queues a scenario's jobs go to: its own name, or `--queues` of them.
fn queue_names(queue: &str, count: u32) -> Vec<String> {
    match count {
        1 => vec![queue.to_owned()],
        n => (0..n).map(|i| format!("{queue}-{i}")).collect(),
    }
}

fn scenario_queues(base: &str, scenario: Scenario) -> Vec<(Scenario, String)> {
    match scenario {
        Scenario::All => [Scenario::Enqueue, Scenario::E2e, Scenario::Consume, Scenario::Latency]
            .into_iter()
            .map(|s| (s, format!("{base}.{}", s.name())))
            .collect(),
        s => vec![(s, base.to_owned())],
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let endpoints = args.client.endpoints()?;
    let base = args.queue.clone().unwrap_or_else(|| format!("bench-{:08x}", rand::random::<u32>()));
    let plan = scenario_queues(&base, args.scenario);
    for q in plan.iter().flat_map(|(_, q)| queue_names(q, args.queues)) {
        if !valid_queue_name(&q) {
            anyhow::bail!("--queue: {q:?} must match [A-Za-z0-9._-]{{1,128}}");
        }
    }
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let c = args
            .client
            .client_builder()?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", endpoints.join(",")))?;
        clients.push(if args.coalesce > 0 { c.coalescing(args.coalesce as usize) } else { c });
    }
    let json = args.client.json;
    let bench = Bench {
        payload: Bytes::from(vec![b'x'; args.payload_bytes as usize]),
        progress: !json && !args.quiet,
        endpoints,
        clients,
        args,
    };
    if !json {
        let a = &bench.args;
        println!(
            "gantry bench → {}: payload {} B, {} connections, {} in flight, batch {}, coalesce {}, {} workers × {}",
            bench.endpoints.join(","),
            a.payload_bytes,
            a.connections,
            a.in_flight,
            a.batch,
            a.coalesce,
            a.workers,
            a.worker_concurrency
        );
    }
    let mut reports = Vec::new();
    let mut failure = None;
    for (scenario, queue) in plan {
        let result = match scenario {
            Scenario::Enqueue => bench.scenario_enqueue(&queue).await,
            Scenario::E2e => bench.scenario_e2e(&queue).await,
            Scenario::Consume => bench.scenario_consume(&queue).await,
            Scenario::Latency => bench.scenario_latency(&queue).await,
            Scenario::All => continue,
        };
        match result {
            Ok(mut r) => {
                if bench.args.queues > 1 {
                    r.queue = format!("{queue}-0..{}", bench.args.queues - 1);
                }
                reports.push(r)
            }
            Err(e) => {
                failure = Some(e.context(format!("bench scenario {}", scenario.name())));
                break;
            }
        }
    }
    let lost: u64 = reports.iter().map(|r| r.lost).sum();
    let nothing = reports.iter().find(|r| r.jobs == 0);
    let aborted = reports.iter().find(|r| r.aborted);
    let ok = failure.is_none() && lost == 0 && nothing.is_none() && aborted.is_none();
    if json {
        let a = &bench.args;
        super::output::print_json(&BenchJson {
            addr: bench.endpoints.clone(),
            payload_bytes: a.payload_bytes,
            connections: a.connections,
            in_flight: a.in_flight,
            batch: a.batch,
            coalesce: a.coalesce,
            workers: a.workers,
            worker_concurrency: a.worker_concurrency,
            scenarios: &reports,
            ok,
        })?;
    } else if !reports.is_empty() {
        println!();
        print!("{}", render_reports(&reports));
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if lost > 0 {
        let which: Vec<String> =
            reports.iter().filter(|r| r.lost > 0).map(|r| format!("{} lost {}", r.scenario, r.lost)).collect();
        anyhow::bail!("acknowledged jobs not accounted for: {}", which.join(", "));
    }
    if let Some(r) = aborted {
        anyhow::bail!("scenario {}: stopped after {} failed enqueues", r.scenario, r.errors);
    }
    if let Some(r) = nothing {
        anyhow::bail!("scenario {}: no enqueue succeeded ({} errors)", r.scenario, r.errors);
    }
    Ok(())
}

/// The longest interval between consecutive instants (ns) and its start.
fn longest_gap(instants: &mut [u64]) -> Option<(u64, u64)> {
    instants.sort_unstable();
    instants.windows(2).map(|w| (w[1] - w[0], w[0])).max_by_key(|(gap, _)| *gap)
}

/// A payload of `len` bytes that differs per job and does not compress, so
/// the log and snapshot sizes measured are those of real data (raft-engine
/// compresses its batches).
fn incompressible(len: usize, seq: u64) -> Bytes {
    let mut state = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*: cheap enough not to show in the producer's CPU time.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_finds_the_outage() {
        let mut acks = vec![30, 10, 20, 500, 510];
        assert_eq!(longest_gap(&mut acks), Some((470, 30)));
        assert_eq!(longest_gap(&mut [7]), None);
    }

    #[test]
    fn summaries_in_milliseconds() {
        let mut h = new_hist();
        assert_eq!(summarize(&h), None);
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let s = summarize(&h).expect("samples");
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() < 1.5, "{s:?}");
        assert!((s.p999 - 999.0).abs() < 1.5, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.5, "{s:?}");
        assert!((s.mean - 500.5).abs() < 1.0, "{s:?}");
        let json = serde_json::to_value(&s).unwrap();
        for k in ["count", "p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(json.get(k).is_some(), "{k} missing in {json}");
        }
    }

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_ms(0.1234), "0.123");
        assert_eq!(fmt_ms(12.345), "12.35");
        assert_eq!(fmt_ms(123.45), "123.5");
        assert_eq!(fmt_ms(12345.6), "12346");
        assert_eq!(fmt_rate(12345.67), "12346");
        assert_eq!(fmt_rate(12.34), "12.3");
        assert_eq!(per_sec(1000, 2.0), 500.0);
        assert_eq!(per_sec(1000, 0.0), 0.0);
        assert_eq!(micros(Duration::ZERO), 1);
    }

    #[test]
    fn stamps_round_trip() {
        let mut p = vec![b'x'; 16];
        write_stamp(&mut p, 123_456_789);
        assert_eq!(read_stamp(&p), Some(123_456_789));
        assert_eq!(&p[8..], b"xxxxxxxx");
        let mut short = vec![0u8; 4];
        write_stamp(&mut short, 1);
        assert_eq!(short, vec![0; 4]);
        assert_eq!(read_stamp(&short), None);
    }

    #[test]
    fn error_kinds_are_bounded() {
        let mut k = ErrorKinds::default();
        for i in 0..40 {
            k.add(format!("e{i}"), 1);
        }
        k.add("e0".into(), 2);
        assert_eq!(k.0.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(k.0["e0"], 3);
        assert_eq!(k.0["(other errors)"], 40 - MAX_ERROR_KINDS as u64);
        let long = gantry_worker::Error::Status(tonic::Status::internal("é".repeat(300)));
        assert!(error_key(&long).chars().count() < 120);
    }

    #[test]
    fn queues_per_scenario() {
        assert_eq!(scenario_queues("b", Scenario::E2e), vec![(Scenario::E2e, "b".to_owned())]);
        let all = scenario_queues("b", Scenario::All);
        let names: Vec<&str> = all.iter().map(|(_, q)| q.as_str()).collect();
        assert_eq!(names, ["b.enqueue", "b.e2e", "b.consume", "b.latency"]);
        assert!(valid_queue_name("bench-0a1b2c3d.latency"));
        assert!(!valid_queue_name("has space"));
        assert!(!valid_queue_name(&"x".repeat(129)));
        assert_eq!(queue_names("b", 1), ["b"]);
        assert_eq!(queue_names("b", 3), ["b-0", "b-1", "b-2"]);
    }

    #[test]
    fn rate_and_duration_parsers() {
        assert_eq!(parse_rate("2000"), Ok(2000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("inf").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_positive_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn reports_render() {
        let mut r = ScenarioReport::new(Scenario::Latency, "b.latency");
        r.jobs = 2000;
        r.attempted = 2000;
        r.seconds = 1.0;
        r.jobs_per_sec = 2000.0;
        r.completed = Some(2000);
        r.latency_ms =
            Some(LatencySummary { count: 2000, mean: 1.0, p50: 1.0, p90: 2.0, p99: 3.0, p999: 4.0, max: 5.0 });
        r.start_latency_ms = r.latency_ms.clone();
        r.error_kinds.insert("UNAVAILABLE: no leader".into(), 2);
        r.notes.push("offered 2000 jobs/s".into());
        let text = render_reports(&[r.clone()]);
        assert!(text.starts_with("SCENARIO  QUEUE      JOBS  ERRORS  SECONDS  JOBS/S  COMPLETED  LOST\n"), "{text}");
        assert!(text.contains("latency   b.latency  2000       0    1.000    2000       2000     0\n"), "{text}");
        assert!(text.contains("enqueue→start"), "{text}");
        assert!(!text.contains("SUCCEEDED (sampled)"), "{text}");
        assert!(text.contains("- latency: offered 2000 jobs/s\n"), "{text}");
        assert!(text.contains("- latency: 2 × UNAVAILABLE: no leader\n"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["scenario"], "latency");
        assert_eq!(json["latency_ms"]["p99"], 3.0);
        assert!(json.get("complete_latency_ms").is_none());
        assert_eq!(json["lost"], 0);
    }
}
