//! `nats-bench`: the NATS JetStream counterpart of `gantry bench`, so the two
//! can be run side by side on the same machine and their figures compared.
//!
//! Scenarios (each on a freshly created stream unless noted):
//! - `publish`: N publishes (`--jobs`) of `--payload-bytes`, `--in-flight`
//!   publish acks outstanding (closed loop, spread over `--connections`);
//!   msgs/s and publish→ack latency. ≈ gantry `enqueue`.
//! - `consume`: drains the stream `publish` left (or a pre-filled one) with
//!   `--consumers` pull-consumer tasks on one durable, explicit-ack consumer,
//!   plain `ack()` (fire-and-forget); msgs/s until the server reports every
//!   ack processed (consumer info polled at the end).
//! - `consume-double`: the same on a freshly pre-filled stream, but every ack
//!   is a double ack (ack with a reply; awaited until the server confirms).
//! - `e2e`: consumers running first, then N publishes as in `publish`; msgs/s
//!   from the first publish until the last ack (`--ack`). ≈ gantry `e2e`.
//! - `latency`: consumers running, publishes at a fixed offered rate (open
//!   loop) for `--duration`, each carrying its scheduled send time; reports
//!   publish→ack latency, publish→receive (≈ enqueue→start) and
//!   publish→ack-confirmed (≈ enqueue→complete). ≈ gantry `latency`.
//!
//! Every loop ends by count or time; errors are counted, not fatal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer, stream};
use async_nats::Client;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Open loop: publishes still waiting for their ack beyond this are skipped
/// (and counted), as in `gantry bench`.
const MAX_OUTSTANDING: usize = 20_000;
const MAX_ERROR_KINDS: usize = 16;
const SUBJECT: &str = "bench.jobs";

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Publish,
    Consume,
    ConsumeDouble,
    E2e,
    Latency,
    All,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum AckMode {
    /// `ack()`: one fire-and-forget publish to the ack subject.
    Plain,
    /// Ack with a reply subject, awaited until the server confirms (AckSync).
    Double,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Retention {
    Workqueue,
    Limits,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "nats-bench", about = "JetStream counterpart of `gantry bench`")]
struct Args {
    /// NATS server URL (loopback only in this harness's use).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Messages published by publish / consume pre-fill / e2e.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    jobs: u64,
    /// Publish acks outstanding at once (closed loop), over all connections.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    in_flight: u64,
    /// Payload size (latency uses at least 8 bytes: the send stamp).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    payload_bytes: u64,
    /// Offered publish rate of the latency scenario, msgs/s.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// How long the latency scenario publishes, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Pull-consumer tasks (each on its own connection) sharing one durable consumer.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    consumers: u64,
    /// max_messages_per_batch of each consumer task's pull stream.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    batch: u64,
    /// Double acks outstanding per consumer task (plain acks are never waited on).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    ack_concurrency: u64,
    /// Ack mode of the e2e and latency scenarios.
    #[arg(long, value_enum, default_value_t = AckMode::Double)]
    ack: AckMode,
    /// Connections the publishers spread over (like gantry's --connections).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Stream name; its subjects are ["bench.>"]. It is deleted and recreated.
    #[arg(long, default_value = "BENCH")]
    stream: String,
    #[arg(long, value_enum, default_value_t = Retention::Workqueue)]
    retention: Retention,
    /// Stream replicas (3 against a three-node cluster: every publish is
    /// acknowledged once a majority stored it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    replicas: u64,
    /// The durable consumer's max_ack_pending.
    #[arg(long, default_value_t = 65_536)]
    max_ack_pending: i64,
    /// nats-server PID for VmRSS (default: the only process named nats-server).
    #[arg(long)]
    server_pid: Option<u32>,
    /// How long to wait for outstanding acks / deliveries at the end of a scenario.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Stop a phase once this many publishes failed.
    #[arg(long, default_value_t = 1000)]
    max_errors: u64,
    /// Leave the stream in place at the end.
    #[arg(long)]
    keep: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

// ---------------------------------------------------------------------------
// Figures

#[derive(Debug, Clone, Serialize)]
struct LatencySummary {
    count: u64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, u128::from(u64::MAX)) as u64
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn summarize(h: &Histogram<u64>) -> Option<LatencySummary> {
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

fn fmt_ms(ms: f64) -> String {
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

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

#[derive(Debug, Default)]
struct ErrorKinds(BTreeMap<String, u64>);

impl ErrorKinds {
    fn add(&mut self, key: String) {
        let mut key = key;
        key.truncate(200);
        let key = if self.0.len() >= MAX_ERROR_KINDS && !self.0.contains_key(&key) {
            "(other errors)".to_owned()
        } else {
            key
        };
        *self.0.entry(key).or_default() += 1;
    }
    fn merge(&mut self, other: ErrorKinds) {
        for (k, n) in other.0 {
            let key = if self.0.len() >= MAX_ERROR_KINDS && !self.0.contains_key(&k) { "(other errors)".to_owned() } else { k };
            *self.0.entry(key).or_default() += n;
        }
    }
}

/// What one scenario measured; also its `--json` shape.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    /// publish/latency: publishes acknowledged by the server; consume/e2e:
    /// messages acked by the consumers.
    messages: u64,
    /// Publishes attempted (publish, e2e, latency).
    attempted: u64,
    /// Failed publishes + failed/timed-out acks.
    errors: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    error_kinds: BTreeMap<String, u64>,
    /// publish: first publish → last publish ack; consume: first pull → server
    /// reports all acks processed; e2e: first publish → last ack; latency: the
    /// sending window until the last publish ack.
    seconds: f64,
    msgs_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_mode: Option<AckMode>,
    /// Publish → publish-ack latency (latency scenario: from the scheduled send time).
    #[serde(skip_serializing_if = "Option::is_none")]
    publish_ack_latency_ms: Option<LatencySummary>,
    /// Messages acked by the consumer tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    consumed: Option<u64>,
    /// Deliveries with delivered count > 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    redelivered: Option<u64>,
    /// Acknowledged publishes not consumed by the end.
    lost: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    offered_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<u64>,
    /// Scheduled send → delivered to a consumer task (≈ gantry enqueue→start).
    #[serde(skip_serializing_if = "Option::is_none")]
    receive_latency_ms: Option<LatencySummary>,
    /// Scheduled send → ack done (double: server confirmed; plain: handed to
    /// the client) (≈ gantry enqueue→SUCCEEDED).
    #[serde(skip_serializing_if = "Option::is_none")]
    complete_latency_ms: Option<LatencySummary>,
    /// nats-server VmRSS at the end of the scenario, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_kib: Option<u64>,
    /// Stream state at the end of the publishing phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<String>,
}

impl Report {
    fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            messages: 0,
            attempted: 0,
            errors: 0,
            error_kinds: BTreeMap::new(),
            seconds: 0.0,
            msgs_per_sec: 0.0,
            ack_mode: None,
            publish_ack_latency_ms: None,
            consumed: None,
            redelivered: None,
            lost: 0,
            offered_rate: None,
            skipped: None,
            receive_latency_ms: None,
            complete_latency_ms: None,
            server_rss_kib: None,
            stream_messages: None,
            stream_bytes: None,
            notes: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct BenchJson<'a> {
    url: &'a str,
    server_version: String,
    server_pid: Option<u32>,
    payload_bytes: u64,
    jobs: u64,
    in_flight: u64,
    connections: u64,
    consumers: u64,
    batch: u64,
    ack_concurrency: u64,
    retention: Retention,
    storage: &'static str,
    scenarios: &'a [Report],
}

fn render(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<15} {:>9} {:>7} {:>9} {:>10} {:>9} {:>6} {:>11}\n",
        "SCENARIO", "MSGS", "ERRORS", "SECONDS", "MSGS/S", "CONSUMED", "LOST", "SERVER_RSS"
    ));
    for r in reports {
        out.push_str(&format!(
            "{:<15} {:>9} {:>7} {:>9.3} {:>10.0} {:>9} {:>6} {:>11}\n",
            r.scenario,
            r.messages,
            r.errors,
            r.seconds,
            r.msgs_per_sec,
            r.consumed.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            r.lost,
            r.server_rss_kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "-".into()),
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<15} {:<34} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "SCENARIO", "LATENCY (ms)", "COUNT", "P50", "P90", "P99", "P99.9", "MAX"
    ));
    for r in reports {
        let pubname = if r.scenario == "latency" { "publish ack (from scheduled send)" } else { "publish ack" };
        for (name, s) in [
            (pubname, &r.publish_ack_latency_ms),
            ("publish→receive (≈enqueue→start)", &r.receive_latency_ms),
            ("publish→ack done (≈→complete)", &r.complete_latency_ms),
        ] {
            if let Some(s) = s {
                out.push_str(&format!(
                    "{:<15} {:<34} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
                    r.scenario,
                    name,
                    s.count,
                    fmt_ms(s.p50),
                    fmt_ms(s.p90),
                    fmt_ms(s.p99),
                    fmt_ms(s.p999),
                    fmt_ms(s.max)
                ));
            }
        }
    }
    let notes: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            let errs = r.error_kinds.iter().map(move |(k, n)| format!("{}: {n} × {k}", r.scenario));
            r.notes.iter().map(move |n| format!("{}: {n}", r.scenario)).chain(errs)
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
// Server process

fn find_server_pid() -> Option<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim() == "nats-server" {
                found.push(pid);
            }
        }
    }
    (found.len() == 1).then(|| found[0])
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Machinery

struct Bench {
    args: Args,
    /// Publisher connections and their JetStream contexts.
    pub_ctx: Vec<jetstream::Context>,
    admin: jetstream::Context,
    payload: Bytes,
    server_pid: Option<u32>,
    progress: bool,
    epoch: Instant,
}

/// The payload's first 8 bytes: nanoseconds since the process epoch.
fn write_stamp(payload: &mut [u8], nanos: u64) {
    payload[..8].copy_from_slice(&nanos.to_le_bytes());
}

fn read_stamp(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

struct PubPhase {
    acked: u64,
    attempted: u64,
    errors: u64,
    kinds: ErrorKinds,
    hist: Histogram<u64>,
    started: Instant,
    last_ack: Instant,
}

/// What the consumer tasks share.
#[derive(Default)]
struct ConsumeShared {
    acked: AtomicU64,
    delivered: AtomicU64,
    redelivered: AtomicU64,
    errors: AtomicU64,
    /// When `acked` reached the target.
    done_at: OnceLock<Instant>,
    target: AtomicU64,
    kinds: Mutex<ErrorKinds>,
    receive_hist: Mutex<Option<Histogram<u64>>>,
    complete_hist: Mutex<Option<Histogram<u64>>>,
}

impl ConsumeShared {
    fn new(target: u64, stamped: bool) -> Arc<ConsumeShared> {
        let s = ConsumeShared::default();
        s.target.store(target, Relaxed);
        if stamped {
            *s.receive_hist.lock().unwrap() = Some(new_hist());
            *s.complete_hist.lock().unwrap() = Some(new_hist());
        }
        Arc::new(s)
    }
    fn count_ack(&self) {
        let n = self.acked.fetch_add(1, Relaxed) + 1;
        let t = self.target.load(Relaxed);
        if t > 0 && n >= t {
            let _ = self.done_at.set(Instant::now());
        }
    }
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Relaxed);
        self.kinds.lock().unwrap().add(e);
    }
}

struct Consumers {
    tasks: JoinSet<()>,
    stop: watch::Sender<bool>,
    shared: Arc<ConsumeShared>,
    started: Instant,
}

impl Bench {
    fn log(&self, s: &str) {
        if self.progress {
            eprintln!("[nats-bench] {s}");
        }
    }

    async fn connect(url: &str, name: &str) -> anyhow::Result<Client> {
        async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))
    }

    fn ctx(client: Client, inflight: usize) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .max_ack_inflight(inflight.max(1))
            .backpressure_on_inflight(true)
            .build(client)
    }

    /// Deletes and recreates the stream (file storage, subjects bench.>).
    async fn fresh_stream(&self) -> anyhow::Result<stream::Stream> {
        let _ = self.admin.delete_stream(&self.args.stream).await;
        let cfg = stream::Config {
            name: self.args.stream.clone(),
            subjects: vec!["bench.>".to_owned()],
            storage: stream::StorageType::File,
            retention: match self.args.retention {
                Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
                Retention::Limits => stream::RetentionPolicy::Limits,
            },
            num_replicas: self.args.replicas as usize,
            ..Default::default()
        };
        self.admin.create_stream(cfg).await.context("creating the stream")
    }

    async fn stream_state(&self) -> Option<stream::State> {
        let s = self.admin.get_stream(&self.args.stream).await.ok()?;
        s.get_info().await.ok().map(|i| i.state)
    }

    async fn durable(&self, name: &str) -> anyhow::Result<consumer::PullConsumer> {
        let stream = self.admin.get_stream(&self.args.stream).await?;
        let _ = stream.delete_consumer(name).await;
        let cfg = consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: self.args.max_ack_pending,
            max_waiting: 512,
            ..Default::default()
        };
        Ok(stream.create_consumer(cfg).await.context("creating the durable consumer")?)
    }

    /// Closed-loop publishing of `n` messages, `--in-flight` acks outstanding.
    async fn publish_phase(&self, n: u64) -> PubPhase {
        let conns = self.pub_ctx.len() as u64;
        let share = self.args.in_flight.div_ceil(conns).max(1) as usize;
        let errors_total = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut set = JoinSet::new();
        for (p, ctx) in self.pub_ctx.iter().enumerate() {
            let p = p as u64;
            let count = n / conns + u64::from(p < n % conns);
            let (ctx, payload, errors_total) = (ctx.clone(), self.payload.clone(), errors_total.clone());
            let max_errors = self.args.max_errors;
            set.spawn(async move {
                let mut hist = new_hist();
                let mut kinds = ErrorKinds::default();
                let (mut acked, mut attempted, mut errors) = (0u64, 0u64, 0u64);
                let mut last_ack = Instant::now();
                let mut pending = FuturesUnordered::new();
                let mut next = 0u64;
                loop {
                    while pending.len() < share && next < count && errors_total.load(Relaxed) < max_errors {
                        next += 1;
                        attempted += 1;
                        let t0 = Instant::now();
                        match ctx.publish(SUBJECT, payload.clone()).await {
                            Ok(fut) => pending.push(async move {
                                let r = fut.await;
                                (t0, Instant::now(), r)
                            }),
                            Err(e) => {
                                errors += 1;
                                errors_total.fetch_add(1, Relaxed);
                                kinds.add(format!("publish: {e}"));
                            }
                        }
                    }
                    match pending.next().await {
                        None => break,
                        Some((t0, t1, Ok(_))) => {
                            acked += 1;
                            last_ack = last_ack.max(t1);
                            hist.saturating_record(micros(t1 - t0));
                        }
                        Some((_, _, Err(e))) => {
                            errors += 1;
                            errors_total.fetch_add(1, Relaxed);
                            kinds.add(format!("publish ack: {e}"));
                        }
                    }
                }
                (acked, attempted, errors, kinds, hist, last_ack)
            });
        }
        let mut phase = PubPhase {
            acked: 0,
            attempted: 0,
            errors: 0,
            kinds: ErrorKinds::default(),
            hist: new_hist(),
            started,
            last_ack: started,
        };
        while let Some(r) = set.join_next().await {
            match r {
                Ok((a, t, e, k, h, l)) => {
                    phase.acked += a;
                    phase.attempted += t;
                    phase.errors += e;
                    phase.kinds.merge(k);
                    let _ = phase.hist.add(&h);
                    phase.last_ack = phase.last_ack.max(l);
                }
                Err(e) => {
                    phase.errors += 1;
                    phase.kinds.add(format!("publisher task: {e}"));
                }
            }
        }
        phase
    }

    /// Starts `--consumers` tasks on the durable consumer `name`, each on its
    /// own connection. `target` acks stamp `done_at`.
    async fn start_consumers(
        &self,
        name: &str,
        ack: AckMode,
        target: u64,
        stamped: bool,
    ) -> anyhow::Result<Consumers> {
        let shared = ConsumeShared::new(target, stamped);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut streams = Vec::new();
        for i in 0..self.args.consumers {
            let client = Self::connect(&self.args.url, &format!("nats-bench-consumer-{i}")).await?;
            let js = Self::ctx(client.clone(), 16);
            let stream = js.get_stream(&self.args.stream).await?;
            let cons: consumer::PullConsumer = stream.get_consumer(name).await.map_err(|e| anyhow::anyhow!("get consumer: {e}"))?;
            streams.push((client, cons));
        }
        let started = Instant::now();
        for (client, cons) in streams {
            let messages = cons
                .stream()
                .max_messages_per_batch(self.args.batch as usize)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await?;
            let (shared, mut stop_rx) = (shared.clone(), stop_rx.clone());
            let epoch = self.epoch;
            let ack_conc = self.args.ack_concurrency as usize;
            let drain = self.args.drain_timeout;
            tasks.spawn(async move {
                let mut messages = messages;
                let mut pending = FuturesUnordered::new();
                loop {
                    tokio::select! {
                        biased;
                        _ = stop_rx.changed() => break,
                        Some((stamp, r)) = pending.next(), if !pending.is_empty() => {
                            match r {
                                Ok(_) => {
                                    if let Some(sent) = stamp {
                                        record(&shared.complete_hist, epoch, sent);
                                    }
                                    shared.count_ack();
                                }
                                Err(e) => shared.error(format!("double ack: {e}")),
                            }
                        }
                        m = messages.next(), if pending.len() < ack_conc => {
                            let msg = match m {
                                None => break,
                                Some(Err(e)) => { shared.error(format!("pull: {e}")); continue; }
                                Some(Ok(msg)) => msg,
                            };
                            shared.delivered.fetch_add(1, Relaxed);
                            let stamp = if stamped { read_stamp(&msg.payload) } else { None };
                            if let Some(sent) = stamp {
                                record(&shared.receive_hist, epoch, sent);
                            }
                            if msg.info().map(|i| i.delivered > 1).unwrap_or(false) {
                                shared.redelivered.fetch_add(1, Relaxed);
                            }
                            match ack {
                                AckMode::Plain => match msg.ack().await {
                                    Ok(()) => {
                                        if let Some(sent) = stamp {
                                            record(&shared.complete_hist, epoch, sent);
                                        }
                                        shared.count_ack();
                                    }
                                    Err(e) => shared.error(format!("ack: {e}")),
                                },
                                AckMode::Double => {
                                    let Some(reply) = msg.message.reply.clone() else {
                                        shared.error("message without reply subject".into());
                                        continue;
                                    };
                                    let client = client.clone();
                                    // AckSync: the ack sent as a request; the
                                    // server answers once it processed it. (The
                                    // client's double_ack() does the same with a
                                    // new subscription per ack.)
                                    pending.push(async move {
                                        let r = tokio::time::timeout(
                                            Duration::from_secs(10),
                                            client.request(reply, Bytes::from_static(b"+ACK")),
                                        )
                                        .await;
                                        let r: Result<(), String> = match r {
                                            Ok(Ok(_)) => Ok(()),
                                            Ok(Err(e)) => Err(e.to_string()),
                                            Err(_) => Err("timed out".into()),
                                        };
                                        (stamp, r)
                                    });
                                }
                            }
                        }
                    }
                }
                // Outstanding double acks, bounded.
                let _ = tokio::time::timeout(drain, async {
                    while let Some((stamp, r)) = pending.next().await {
                        match r {
                            Ok(_) => {
                                if let Some(sent) = stamp {
                                    record(&shared.complete_hist, epoch, sent);
                                }
                                shared.count_ack();
                            }
                            Err(e) => shared.error(format!("double ack: {e}")),
                        }
                    }
                })
                .await;
                let _ = client.flush().await;
            });
        }
        Ok(Consumers { tasks, stop, shared, started })
    }

    /// Waits (bounded) until the consumer tasks acked `target`, then until the
    /// server reports no ack pending and nothing left to deliver. Returns the
    /// instant the server's view was confirmed (or None on timeout).
    async fn wait_consumed(&self, c: &Consumers, name: &str, target: u64) -> (Option<Instant>, Vec<String>) {
        let mut notes = Vec::new();
        let deadline = Instant::now() + self.args.drain_timeout;
        while c.shared.acked.load(Relaxed) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let acked = c.shared.acked.load(Relaxed);
        if acked < target {
            notes.push(format!("only {acked} of {target} acked within the drain timeout"));
            return (None, notes);
        }
        let Ok(stream) = self.admin.get_stream(&self.args.stream).await else {
            notes.push("stream info unavailable".into());
            return (c.shared.done_at.get().copied(), notes);
        };
        let Ok(cons) = stream.get_consumer::<consumer::pull::Config>(name).await else {
            notes.push("consumer info unavailable".into());
            return (c.shared.done_at.get().copied(), notes);
        };
        loop {
            match cons.get_info().await {
                Ok(i) if i.num_ack_pending == 0 && i.num_pending == 0 => {
                    return (Some(Instant::now()), notes);
                }
                Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(5)).await,
                Ok(i) => {
                    notes.push(format!(
                        "server still reports {} ack pending, {} pending at the drain timeout",
                        i.num_ack_pending, i.num_pending
                    ));
                    return (None, notes);
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    notes.push(format!("consumer info: {e}"));
                    return (None, notes);
                }
            }
        }
    }

    async fn stop_consumers(&self, mut c: Consumers) -> Arc<ConsumeShared> {
        let _ = c.stop.send(true);
        let bounded = tokio::time::timeout(self.args.drain_timeout + Duration::from_secs(5), async {
            while c.tasks.join_next().await.is_some() {}
        })
        .await;
        if bounded.is_err() {
            c.tasks.abort_all();
        }
        c.shared
    }

    fn fill_publish(&self, r: &mut Report, p: &PubPhase) {
        r.messages = p.acked;
        r.attempted = p.attempted;
        r.errors = p.errors;
        r.error_kinds = p.kinds.0.clone();
        r.seconds = round3((p.last_ack - p.started).as_secs_f64());
        r.msgs_per_sec = per_sec(p.acked, r.seconds);
        r.publish_ack_latency_ms = summarize(&p.hist);
    }

    async fn fill_stream_state(&self, r: &mut Report) {
        if let Some(s) = self.stream_state().await {
            r.stream_messages = Some(s.messages);
            r.stream_bytes = Some(s.bytes);
        }
        r.server_rss_kib = self.server_pid.and_then(rss_kib);
    }

    // -----------------------------------------------------------------------
    // Scenarios

    async fn scenario_publish(&self) -> anyhow::Result<Report> {
        let mut r = Report::new("publish");
        self.fresh_stream().await?;
        self.log(&format!("publish: {} msgs, {} in flight", self.args.jobs, self.args.in_flight));
        let p = self.publish_phase(self.args.jobs).await;
        self.fill_publish(&mut r, &p);
        self.fill_stream_state(&mut r).await;
        r.notes.push(format!(
            "{} publishers (one per connection), {} acks outstanding in all",
            self.pub_ctx.len(),
            self.args.in_flight
        ));
        Ok(r)
    }

    async fn consume(&self, name: &'static str, ack: AckMode, reuse: bool) -> anyhow::Result<Report> {
        let mut r = Report::new(name);
        r.ack_mode = Some(ack);
        let have = if reuse { self.stream_state().await.map(|s| s.messages).unwrap_or(0) } else { 0 };
        let target = if have > 0 {
            r.notes.push(format!("drained the {have} messages the publish scenario left"));
            have
        } else {
            self.fresh_stream().await?;
            self.log(&format!("{name}: pre-filling {} msgs (not measured)", self.args.jobs));
            let p = self.publish_phase(self.args.jobs).await;
            if p.errors > 0 {
                r.notes.push(format!("pre-fill: {} publish errors", p.errors));
            }
            r.notes.push(format!("pre-filled {} messages (not measured)", p.acked));
            self.stream_state().await.map(|s| s.messages).unwrap_or(p.acked)
        };
        let cname = format!("bench-{name}");
        self.durable(&cname).await?;
        self.log(&format!("{name}: draining {target} msgs, {} consumers, {ack:?} ack", self.args.consumers));
        let c = self.start_consumers(&cname, ack, target, false).await?;
        let started = c.started;
        let (confirmed, notes) = self.wait_consumed(&c, &cname, target).await;
        let local_done = c.shared.done_at.get().copied();
        let shared = self.stop_consumers(c).await;
        r.notes.extend(notes);
        let end = confirmed.or(local_done).unwrap_or_else(Instant::now);
        let acked = shared.acked.load(Relaxed);
        r.messages = acked;
        r.consumed = Some(acked);
        r.redelivered = Some(shared.redelivered.load(Relaxed));
        r.errors = shared.errors.load(Relaxed);
        r.error_kinds = std::mem::take(&mut shared.kinds.lock().unwrap().0);
        r.seconds = round3((end - started).as_secs_f64());
        r.msgs_per_sec = per_sec(acked.min(target), r.seconds);
        r.lost = target.saturating_sub(acked);
        if let (Some(l), Some(c)) = (local_done, confirmed) {
            r.notes.push(format!(
                "last ack handed over after {:.3}s; server confirmed all acks after {:.3}s (the rate uses the latter)",
                (l - started).as_secs_f64(),
                (c - started).as_secs_f64()
            ));
        }
        r.notes.push(format!(
            "{} pull tasks × max_messages_per_batch {}{}",
            self.args.consumers,
            self.args.batch,
            if ack == AckMode::Double {
                format!(", {} double acks outstanding per task", self.args.ack_concurrency)
            } else {
                String::new()
            }
        ));
        r.server_rss_kib = self.server_pid.and_then(rss_kib);
        if let Ok(s) = self.admin.get_stream(&self.args.stream).await {
            let _ = s.delete_consumer(&cname).await;
        }
        Ok(r)
    }

    async fn scenario_e2e(&self) -> anyhow::Result<Report> {
        let mut r = Report::new("e2e");
        let ack = self.args.ack;
        r.ack_mode = Some(ack);
        self.fresh_stream().await?;
        let cname = "bench-e2e";
        self.durable(cname).await?;
        let c = self.start_consumers(cname, ack, self.args.jobs, false).await?;
        self.log(&format!("e2e: {} msgs with {} consumers running ({ack:?} ack)", self.args.jobs, self.args.consumers));
        let p = self.publish_phase(self.args.jobs).await;
        let (confirmed, notes) = self.wait_consumed(&c, cname, p.acked).await;
        let shared = self.stop_consumers(c).await;
        r.notes.extend(notes);
        self.fill_publish(&mut r, &p);
        let acked = shared.acked.load(Relaxed);
        let end = confirmed.or(shared.done_at.get().copied()).unwrap_or_else(Instant::now);
        r.seconds = round3((end - p.started).as_secs_f64());
        r.msgs_per_sec = per_sec(acked.min(p.acked), r.seconds);
        r.consumed = Some(acked);
        r.redelivered = Some(shared.redelivered.load(Relaxed));
        r.errors += shared.errors.load(Relaxed);
        for (k, n) in std::mem::take(&mut shared.kinds.lock().unwrap().0) {
            *r.error_kinds.entry(k).or_default() += n;
        }
        r.lost = p.acked.saturating_sub(acked);
        r.server_rss_kib = self.server_pid.and_then(rss_kib);
        r.notes.push(format!(
            "publish phase alone: {:.3}s; rate = acked msgs / (first publish → all acks confirmed by the server)",
            (p.last_ack - p.started).as_secs_f64()
        ));
        Ok(r)
    }

    async fn scenario_latency(&self) -> anyhow::Result<Report> {
        let mut r = Report::new("latency");
        let ack = self.args.ack;
        r.ack_mode = Some(ack);
        let rate = self.args.rate;
        let total = ((rate * self.args.duration.as_secs_f64()).round() as u64).max(1);
        self.fresh_stream().await?;
        let cname = "bench-latency";
        self.durable(cname).await?;
        let c = self.start_consumers(cname, ack, 0, true).await?;
        self.log(&format!("latency: {rate} msgs/s for {:?} ({ack:?} ack)", self.args.duration));
        let epoch = self.epoch;
        let hist = Arc::new(Mutex::new(new_hist()));
        let kinds = Arc::new(Mutex::new(ErrorKinds::default()));
        let (acked, errors, last_answer) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
        let mut base = self.payload.to_vec();
        base.resize(base.len().max(8), 0);
        let mut skipped = 0u64;
        let mut attempted = 0u64;
        let mut set = JoinSet::new();
        let aborted = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            while set.try_join_next().is_some() {}
            if errors.load(Relaxed) >= self.args.max_errors {
                aborted.store(true, Relaxed);
                break;
            }
            let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            attempted += 1;
            let mut payload = base.clone();
            write_stamp(&mut payload, due.duration_since(epoch).as_nanos() as u64);
            let ctx = self.pub_ctx[i as usize % self.pub_ctx.len()].clone();
            let (hist, kinds, acked, errors, last_answer) =
                (hist.clone(), kinds.clone(), acked.clone(), errors.clone(), last_answer.clone());
            set.spawn(async move {
                let _permit = permit;
                let res = match ctx.publish(SUBJECT, Bytes::from(payload)).await {
                    Ok(f) => f.await.map(|_| ()).map_err(|e| format!("publish ack: {e}")),
                    Err(e) => Err(format!("publish: {e}")),
                };
                last_answer.fetch_max(start.elapsed().as_nanos() as u64, Relaxed);
                match res {
                    Ok(()) => {
                        hist.lock().unwrap().saturating_record(micros(due.elapsed()));
                        acked.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Relaxed);
                        kinds.lock().unwrap().add(e);
                    }
                }
            });
        }
        let bounded = tokio::time::timeout(self.args.drain_timeout + Duration::from_secs(10), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if bounded.is_err() {
            set.abort_all();
            r.notes.push("some publish acks were still pending at the drain timeout".into());
        }
        let ok = acked.load(Relaxed);
        let (_, notes) = self.wait_consumed(&c, cname, ok).await;
        let shared = self.stop_consumers(c).await;
        r.notes.extend(notes);
        let consumed = shared.acked.load(Relaxed);
        r.messages = ok;
        r.attempted = attempted;
        r.errors = errors.load(Relaxed) + shared.errors.load(Relaxed);
        r.error_kinds = std::mem::take(&mut kinds.lock().unwrap().0);
        for (k, n) in std::mem::take(&mut shared.kinds.lock().unwrap().0) {
            *r.error_kinds.entry(k).or_default() += n;
        }
        r.seconds = round3(Duration::from_nanos(last_answer.load(Relaxed)).as_secs_f64());
        r.msgs_per_sec = per_sec(ok, r.seconds);
        r.offered_rate = Some(rate);
        r.skipped = Some(skipped);
        r.publish_ack_latency_ms = summarize(&hist.lock().unwrap());
        r.receive_latency_ms = shared.receive_hist.lock().unwrap().as_ref().and_then(summarize);
        r.complete_latency_ms = shared.complete_hist.lock().unwrap().as_ref().and_then(summarize);
        r.consumed = Some(consumed);
        r.redelivered = Some(shared.redelivered.load(Relaxed));
        r.lost = ok.saturating_sub(consumed);
        r.server_rss_kib = self.server_pid.and_then(rss_kib);
        if aborted.load(Relaxed) {
            r.notes.push(format!("stopped after {} errors", self.args.max_errors));
        }
        r.notes.push(format!(
            "offered {rate:.0} msgs/s for {:?}, achieved {:.0} msgs/s{}",
            self.args.duration,
            r.msgs_per_sec,
            if skipped > 0 { format!(", {skipped} sends skipped ({MAX_OUTSTANDING} outstanding)") } else { String::new() }
        ));
        r.notes.push(match ack {
            AckMode::Double => "latencies from each message's scheduled send time; ack done = the server answered the \
                                ack request (AckSync), all messages (no sampling)"
                .into(),
            AckMode::Plain => "latencies from each message's scheduled send time; ack done = plain ack handed to the \
                               client (NOT confirmed by the server)"
                .into(),
        });
        Ok(r)
    }
}

fn record(h: &Mutex<Option<Histogram<u64>>>, epoch: Instant, sent_nanos: u64) {
    let now = epoch.elapsed().as_nanos() as u64;
    if let Some(h) = h.lock().unwrap().as_mut() {
        h.saturating_record((now.saturating_sub(sent_nanos) / 1000).max(1));
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1_000_000.0) {
        bail!("--rate must be > 0 and at most 1000000");
    }
    if args.duration.is_zero() || args.duration > Duration::from_secs(3600) {
        bail!("--duration must be between 0 and 1h");
    }
    let admin_client = Bench::connect(&args.url, "nats-bench-admin").await?;
    let server_version = admin_client.server_info().version.clone();
    let conns = args.connections as usize;
    let share = args.in_flight.div_ceil(args.connections) as usize;
    let mut pub_ctx = Vec::with_capacity(conns);
    for i in 0..conns {
        let c = Bench::connect(&args.url, &format!("nats-bench-pub-{i}")).await?;
        // Room for the closed loop's share and for the latency scenario's open loop.
        pub_ctx.push(Bench::ctx(c, share.max(MAX_OUTSTANDING)));
    }
    let server_pid = args.server_pid.or_else(find_server_pid);
    let payload = Bytes::from(vec![b'x'; args.payload_bytes as usize]);
    let progress = !args.quiet && !args.json;
    let bench = Bench {
        admin: Bench::ctx(admin_client, 16),
        pub_ctx,
        payload,
        server_pid,
        progress,
        epoch: Instant::now(),
        args: args.clone(),
    };
    bench.log(&format!(
        "nats-server {server_version} at {}, pid {:?} (RSS at start: {:?} KiB)",
        args.url,
        server_pid,
        server_pid.and_then(rss_kib)
    ));

    let mut reports = Vec::new();
    let all = args.scenario == Scenario::All;
    if all || args.scenario == Scenario::Publish {
        reports.push(bench.scenario_publish().await?);
    }
    if all || args.scenario == Scenario::Consume {
        reports.push(bench.consume("consume", AckMode::Plain, true).await?);
    }
    if all || args.scenario == Scenario::ConsumeDouble {
        reports.push(bench.consume("consume-double", AckMode::Double, false).await?);
    }
    if all || args.scenario == Scenario::E2e {
        reports.push(bench.scenario_e2e().await?);
    }
    if all || args.scenario == Scenario::Latency {
        reports.push(bench.scenario_latency().await?);
    }
    if !args.keep {
        let _ = bench.admin.delete_stream(&args.stream).await;
    }

    let table = render(&reports);
    if args.json {
        eprint!("{table}");
        let j = BenchJson {
            url: &args.url,
            server_version,
            server_pid,
            payload_bytes: args.payload_bytes,
            jobs: args.jobs,
            in_flight: args.in_flight,
            connections: args.connections,
            consumers: args.consumers,
            batch: args.batch,
            ack_concurrency: args.ack_concurrency,
            retention: args.retention,
            storage: "file",
            scenarios: &reports,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        eprintln!(
            "nats-server {server_version}; stream {} (file storage, {:?} retention, subjects bench.>); payload {} B",
            args.stream, args.retention, args.payload_bytes
        );
        print!("{table}");
    }
    let failed = reports.iter().any(|r| r.lost > 0);
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
