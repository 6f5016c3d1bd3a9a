//! The worker: configuration, the public handle, and `run`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::context::JobContext;
use crate::endpoint::{Connect, Tls, parse_endpoints};
use crate::error::{Error, JobError};
use crate::session;

const MAX_CONCURRENCY: u32 = 10_000;

/// A worker process's connection to the broker: one session, many jobs.
///
/// Build with [`Worker::builder`], take a [`WorkerHandle`] if you want to
/// watch it, then [`run`](Worker::run) it.
pub struct Worker {
    cfg: Config,
    shared: Arc<Shared>,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) endpoints: Vec<String>,
    pub(crate) queues: Vec<String>,
    pub(crate) concurrency: u32,
    pub(crate) worker_id: String,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) connect: Connect,
}

/// Configures a [`Worker`]. Errors are reported by [`build`](Self::build).
#[must_use]
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    endpoints: Vec<String>,
    queues: Vec<String>,
    concurrency: u32,
    worker_id: Option<String>,
    backoff_min: Duration,
    backoff_max: Duration,
    shutdown_timeout: Duration,
    tls: Option<Tls>,
    token: Option<String>,
}

impl WorkerBuilder {
    /// Speaks TLS to the brokers (`https://` or bare `host:port` endpoints).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends `authorization: Bearer <token>` on the stream (brokers started
    /// with `--token-file`; the token needs the `worker` role).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Adds a queue to take jobs from.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// Adds several queues.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues.extend(queues.into_iter().map(Into::into));
        self
    }

    /// Jobs run at once, which is also how many the broker may push before
    /// results come back (`max_in_flight`). Default 8, at most 10000.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// The name shown by `ListWorkers` and in job history. Default: `hostname-pid`.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Bounds of the reconnect backoff (default 100 ms .. 5 s).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// How long a graceful shutdown waits for running handlers (default 30 s).
    /// Handlers still running then are dropped and their jobs handed back.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    pub fn build(self) -> Result<Worker, Error> {
        let connect = Connect::new(self.tls.as_ref(), self.token.as_deref())?;
        let endpoints = parse_endpoints(self.endpoints, connect.uses_tls())?;
        let mut queues: Vec<String> = Vec::new();
        for q in self.queues {
            if !valid_queue_name(&q) {
                return Err(Error::InvalidConfig(format!("queue name {q:?} must match [A-Za-z0-9._-]{{1,128}}")));
            }
            if !queues.contains(&q) {
                queues.push(q);
            }
        }
        if queues.is_empty() {
            return Err(Error::InvalidConfig("a worker needs at least one queue".to_owned()));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(Error::InvalidConfig(format!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {}",
                self.concurrency
            )));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(Error::InvalidConfig(format!(
                "reconnect backoff needs 0 < min <= max, got {:?}..{:?}",
                self.backoff_min, self.backoff_max
            )));
        }
        let worker_id = match self.worker_id {
            Some(id) if !id.trim().is_empty() => id,
            Some(_) => return Err(Error::InvalidConfig("worker_id must not be empty".to_owned())),
            None => default_worker_id(),
        };
        Ok(Worker {
            cfg: Config {
                endpoints,
                queues,
                concurrency: self.concurrency,
                worker_id,
                backoff_min: self.backoff_min,
                backoff_max: self.backoff_max,
                shutdown_timeout: self.shutdown_timeout,
                connect,
            },
            shared: Arc::new(Shared::default()),
        })
    }
}

fn valid_queue_name(q: &str) -> bool {
    (1..=128).contains(&q.len()) && q.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `hostname-pid`: unique per process on a host, and readable in `ListWorkers`.
fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

impl Worker {
    /// Starts configuring a worker that talks to `endpoints` (`host:port` or
    /// `http://host:port`; any node of the cluster will do).
    pub fn builder<I, S>(endpoints: I) -> WorkerBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        WorkerBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            queues: Vec::new(),
            concurrency: 8,
            worker_id: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            tls: None,
            token: None,
        }
    }

    /// A handle to watch the worker (and pause its heartbeats in tests)
    /// while [`run`](Self::run) owns it.
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle { shared: self.shared.clone() }
    }

    /// The current (or last) session id; `None` before the first `welcome`.
    pub fn session_id(&self) -> Option<String> {
        self.handle().session_id()
    }

    pub fn worker_id(&self) -> &str {
        &self.cfg.worker_id
    }

    /// Runs jobs until `shutdown` resolves, then shuts down gracefully: new
    /// assignments and jobs not yet started are handed back, running handlers
    /// get up to `shutdown_timeout` to finish, their results are delivered,
    /// and the session ends with `goodbye`.
    ///
    /// Connection problems are retried forever; `run` returns an error only
    /// when the broker refuses the worker outright (`INVALID_ARGUMENT`,
    /// `UNAUTHENTICATED`, `PERMISSION_DENIED`, `UNIMPLEMENTED`).
    pub async fn run<H, Fut, S>(self, handler: H, shutdown: S) -> Result<(), Error>
    where
        H: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, JobError>> + Send + 'static,
        S: Future<Output = ()> + Send,
    {
        let handler: session::DynHandler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        let result = session::Session::new(self.cfg, self.shared.clone(), handler).run(shutdown).await;
        self.shared.set_disconnected();
        result
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("config", &self.cfg).finish_non_exhaustive()
    }
}

/// Counters of a worker, since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// `complete` results the broker accepted.
    pub completed: u64,
    /// `fail` results (including retry requests) the broker accepted.
    pub failed: u64,
    /// Leases lost: revoked, refused as stale, or gone with an expired
    /// session. Counted once per lease.
    pub lease_lost: u64,
    /// Results refused with `STALE_LEASE` (and not retried).
    pub stale_results: u64,
    /// Jobs handed back unstarted (`release`) and accepted.
    pub released: u64,
    /// Sessions opened or resumed (`welcome`s received).
    pub sessions: u64,
    /// Handlers running now.
    pub running: u64,
}

/// Watches a running [`Worker`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
}

impl WorkerHandle {
    /// The current (or last) session id; `None` before the first `welcome`.
    pub fn session_id(&self) -> Option<String> {
        self.shared.conn.borrow().session_id.clone()
    }

    /// Whether a stream is open and welcomed right now.
    pub fn is_connected(&self) -> bool {
        self.shared.conn.borrow().connected
    }

    /// Waits until a session is up and returns its id.
    pub async fn wait_connected(&self) -> String {
        let mut rx = self.shared.conn.subscribe();
        // The sender lives in `shared`, which `self` keeps alive.
        match rx.wait_for(|c| c.connected).await {
            Ok(c) => c.session_id.clone().unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    pub fn stats(&self) -> WorkerStats {
        let s = &self.shared.stats;
        WorkerStats {
            completed: s.completed.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            lease_lost: s.lease_lost.load(Ordering::Relaxed),
            stale_results: s.stale_results.load(Ordering::Relaxed),
            released: s.released.load(Ordering::Relaxed),
            sessions: s.sessions.load(Ordering::Relaxed),
            running: s.running.load(Ordering::Relaxed),
        }
    }

    /// Test hook: while paused the worker sends no heartbeats, so the broker
    /// sees a worker that *looks* dead although its stream is open and its
    /// handlers keep running (the zc.async scenario). Results and progress
    /// are still sent.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.shared.heartbeats_paused.store(paused, Ordering::Relaxed);
    }

    pub fn heartbeats_paused(&self) -> bool {
        self.shared.heartbeats_paused.load(Ordering::Relaxed)
    }
}

/// State the session loop publishes for [`WorkerHandle`].
#[derive(Debug, Default)]
pub(crate) struct Shared {
    conn: watch::Sender<ConnState>,
    pub(crate) heartbeats_paused: AtomicBool,
    pub(crate) stats: Stats,
}

#[derive(Debug, Default, Clone)]
struct ConnState {
    session_id: Option<String>,
    connected: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) stale_results: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) sessions: AtomicU64,
    pub(crate) running: AtomicU64,
}

impl Stats {
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Shared {
    pub(crate) fn set_connected(&self, session_id: String) {
        Stats::incr(&self.stats.sessions);
        self.conn.send_replace(ConnState { session_id: Some(session_id), connected: true });
    }

    pub(crate) fn set_disconnected(&self) {
        self.conn.send_if_modified(|c| std::mem::replace(&mut c.connected, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates() {
        let ok = Worker::builder(["127.0.0.1:50051"]).queue("emails").build().expect("valid");
        assert_eq!(ok.cfg.concurrency, 8);
        assert_eq!(ok.cfg.queues, vec!["emails"]);
        assert!(!ok.worker_id().is_empty());
        assert_eq!(ok.session_id(), None);

        let no_queue = Worker::builder(["127.0.0.1:50051"]).build();
        assert!(matches!(no_queue, Err(Error::InvalidConfig(_))));
        let bad_queue = Worker::builder(["127.0.0.1:50051"]).queue("has space").build();
        assert!(matches!(bad_queue, Err(Error::InvalidConfig(_))));
        let zero = Worker::builder(["127.0.0.1:50051"]).queue("q").concurrency(0).build();
        assert!(matches!(zero, Err(Error::InvalidConfig(_))));
        let bad_ep = Worker::builder(["ftp://x:1"]).queue("q").build();
        assert!(matches!(bad_ep, Err(Error::InvalidEndpoint(_))));
        let https_without_tls = Worker::builder(["https://x:1"]).queue("q").build();
        assert!(matches!(https_without_tls, Err(Error::InvalidConfig(m)) if m.contains("no TLS settings")));
        let bad_token = Worker::builder(["x:1"]).queue("q").token("two words").build();
        assert!(matches!(bad_token, Err(Error::InvalidConfig(m)) if m.contains("token")));
        let backoff = Worker::builder(["x:1"])
            .queue("q")
            .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1))
            .build();
        assert!(matches!(backoff, Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn queues_dedupe() {
        let w = Worker::builder(["x:1"]).queues(["a", "b"]).queue("a").build().expect("valid");
        assert_eq!(w.cfg.queues, vec!["a", "b"]);
    }

    #[test]
    fn handle_reflects_shared_state() {
        let w = Worker::builder(["x:1"]).queue("q").build().expect("valid");
        let h = w.handle();
        assert!(!h.is_connected());
        h.pause_heartbeats(true);
        assert!(h.heartbeats_paused());
        w.shared.set_connected("s1".into());
        assert_eq!(h.session_id().as_deref(), Some("s1"));
        assert!(h.is_connected());
        w.shared.set_disconnected();
        assert!(!h.is_connected());
        assert_eq!(h.session_id().as_deref(), Some("s1"), "the last session id stays visible");
        assert_eq!(h.stats().sessions, 1);
    }
}
