//! The producer-side client: enqueue, get, wait, cancel.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tonic::transport::Channel;

use crate::Error;
use crate::backoff::Backoff;
use crate::convert::{to_proto_duration, to_proto_timestamp};
use crate::endpoint::{self, BrokerChannel, Connect, Tls, leader_hint};
use crate::proto::{self, admin_client::AdminClient, jobs_client::JobsClient};

/// How long a call keeps trying while nodes answer `UNAVAILABLE` (no
/// leader yet, node down): long enough to ride out a leader election (up to
/// two election timeouts) and a restart of the node it talked to.
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// The longest `WaitJob` timeout the broker accepts.
const MAX_WAIT_PER_CALL: Duration = Duration::from_secs(60 * 60);
/// Bound on remembered per-queue leaders, so a producer writing to an
/// unbounded set of queue names cannot grow the map forever.
const MAX_QUEUE_LEADERS: usize = 4096;

/// A connection to a Gantry cluster for producers and tools. Cheap to clone:
/// clones share channels and what was learned about leaders.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Set by [`Client::coalescing`]: enqueues go through the batcher.
    coalescer: Option<Arc<crate::coalesce::Coalescer>>,
}

struct Inner {
    endpoints: Vec<String>,
    connect: Connect,
    routes: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    channels: HashMap<String, BrokerChannel>,
    /// Index into `endpoints` of the node calls go to by default.
    current: usize,
    /// Leader of each queue's shard, learned from `gantry-leader` metadata,
    /// so enqueues go straight to the leader instead of being forwarded.
    queue_leaders: HashMap<String, String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.inner.endpoints).finish_non_exhaustive()
    }
}

/// What an enqueue returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: String,
    /// `false` when an earlier job with the same idempotency key was returned.
    pub created: bool,
}

/// Configures a [`Client`]: endpoints, TLS and a bearer token.
///
/// ```no_run
/// # async fn connect() -> Result<(), gantry_worker::Error> {
/// use gantry_worker::{Client, Tls};
/// let client = Client::builder(["https://gantry.jobs.svc:50051"])
///     .tls(Tls::ca_file("/etc/gantry/tls/ca.crt")?)
///     .token(std::env::var("GANTRY_TOKEN").unwrap_or_default())
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use]
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    token: Option<String>,
}

impl ClientBuilder {
    /// Speaks TLS to the brokers (`https://` or bare `host:port` endpoints).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sends `authorization: Bearer <token>` with every call (brokers
    /// started with `--token-file`; the token needs the `producer` role for
    /// jobs, `admin` for the admin service).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects to the first reachable node. The other nodes are used when
    /// that one fails or names another leader.
    pub async fn connect(self) -> Result<Client, Error> {
        let connect = Connect::new(self.tls.as_ref(), self.token.as_deref())?;
        let endpoints = endpoint::parse_endpoints(self.endpoints, connect.uses_tls())?;
        let mut last_err = None;
        for (i, uri) in endpoints.iter().enumerate() {
            match endpoint::endpoint(uri, false, &connect)?.connect().await {
                Ok(channel) => {
                    let mut routes = Routes { current: i, ..Routes::default() };
                    routes.channels.insert(uri.clone(), endpoint::with_credentials(channel, &connect));
                    return Ok(Client {
                        inner: Arc::new(Inner { endpoints, connect, routes: Mutex::new(routes) }),
                        coalescer: None,
                    });
                }
                Err(e) => {
                    tracing::debug!(endpoint = %uri, error = %e, "cannot connect");
                    last_err = Some(e);
                }
            }
        }
        Err(match last_err {
            Some(e) => Error::Transport(e),
            None => Error::InvalidConfig("no broker endpoints given".to_owned()),
        })
    }
}

impl Client {
    /// Connects to the first reachable node of `endpoints` (`host:port` or
    /// `http://host:port`), without TLS or token; see [`Client::builder`]
    /// for those. The other nodes are used when that one fails or names
    /// another leader.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::builder(endpoints).connect().await
    }

    /// Starts configuring a client for `endpoints` (any nodes of the cluster).
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder { endpoints: endpoints.into_iter().map(Into::into).collect(), tls: None, token: None }
    }

    /// A client whose concurrent `enqueue(..).send()` calls are packed into
    /// `EnqueueBatch` RPCs of up to `max_batch` jobs (16 batches in flight).
    /// Each call still returns only once its own job is committed, with its
    /// own id or error; a job refused for its queue's depth gets
    /// `RESOURCE_EXHAUSTED`, an invalid one `INVALID_ARGUMENT` as usual.
    /// Worth it for producers with many enqueues in flight; a lone enqueue
    /// costs the same as without. Needs a tokio runtime.
    pub fn coalescing(&self, max_batch: usize) -> Client {
        let plain = Client { inner: self.inner.clone(), coalescer: None };
        let coalescer = crate::coalesce::Coalescer::spawn(plain, max_batch);
        Client { inner: self.inner.clone(), coalescer: Some(Arc::new(coalescer)) }
    }

    /// Starts building an enqueue of `payload` into `queue`.
    pub fn enqueue(&self, queue: impl Into<String>, payload: impl Into<Bytes>) -> EnqueueBuilder {
        EnqueueBuilder {
            client: self.clone(),
            req: proto::EnqueueRequest { queue: queue.into(), payload: payload.into().into(), ..Default::default() },
        }
    }

    /// Enqueues many jobs, committed together per shard. One result per
    /// request, in order; a refused job has an empty `job_id` and an `error`.
    pub async fn enqueue_batch(
        &self,
        reqs: Vec<proto::EnqueueRequest>,
    ) -> Result<Vec<proto::EnqueueBatchResult>, Error> {
        // Route by the first job's queue: batches usually target one queue.
        let route = reqs.first().map(|r| r.queue.clone());
        let req = proto::EnqueueBatchRequest { jobs: reqs };
        let resp = self
            .call(route.as_deref(), move |ch| {
                let req = req.clone();
                async move { JobsClient::new(ch).enqueue_batch(req).await }
            })
            .await?;
        Ok(resp.results)
    }

    /// The job as the broker has it now. `NOT_FOUND` comes back as [`Error::Status`].
    pub async fn get(&self, job_id: &str) -> Result<proto::Job, Error> {
        let req = proto::GetJobRequest { job_id: job_id.to_owned() };
        self.call(None, move |ch| {
            let req = req.clone();
            async move { JobsClient::new(ch).get_job(req).await }
        })
        .await
    }

    /// Waits until the job is terminal and returns it, or returns its current
    /// state once `timeout` has passed. The broker holds one call for at most
    /// an hour, so longer waits are made of several calls.
    pub async fn wait(&self, job_id: &str, timeout: Duration) -> Result<proto::Job, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let chunk = remaining.min(MAX_WAIT_PER_CALL);
            let req = proto::WaitJobRequest { job_id: job_id.to_owned(), timeout: Some(to_proto_duration(chunk)) };
            let job = self
                .call(None, move |ch| {
                    let req = req.clone();
                    async move { JobsClient::new(ch).wait_job(req).await }
                })
                .await?;
            if is_terminal(job.state()) || remaining <= MAX_WAIT_PER_CALL {
                return Ok(job);
            }
        }
    }

    /// Cancels a job that is not terminal; an active holder is sent `revoke`.
    pub async fn cancel(&self, job_id: &str, reason: &str) -> Result<proto::Job, Error> {
        let req = proto::CancelJobRequest { job_id: job_id.to_owned(), reason: reason.to_owned() };
        self.call(None, move |ch| {
            let req = req.clone();
            async move { JobsClient::new(ch).cancel_job(req).await }
        })
        .await
    }

    /// A raw `Admin` client on the current node (no retries: tools decide).
    pub fn admin(&self) -> AdminClient<BrokerChannel> {
        AdminClient::new(self.current_channel())
    }

    /// A raw `Jobs` client on the current node (no retries: callers decide).
    pub fn jobs(&self) -> JobsClient<BrokerChannel> {
        JobsClient::new(self.current_channel())
    }

    /// The normalised endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        // The map stays consistent even if a holder panicked: every update is
        // a single insert/remove.
        self.inner.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current_channel(&self) -> BrokerChannel {
        let target = {
            let routes = self.routes();
            self.inner.endpoints[routes.current % self.inner.endpoints.len()].clone()
        };
        self.channel(&target)
    }

    fn channel(&self, target: &str) -> BrokerChannel {
        let mut routes = self.routes();
        if let Some(ch) = routes.channels.get(target) {
            return ch.clone();
        }
        // Every target went through `parse_endpoint`, so `from_shared` cannot
        // fail; fall back to the first known channel rather than panic.
        let ch = match endpoint::lazy_channel(target, false, &self.inner.connect) {
            Ok(ch) => ch,
            Err(_) => match routes.channels.values().next() {
                Some(ch) => return ch.clone(),
                None => endpoint::with_credentials(
                    Channel::from_static("http://127.0.0.1:50051").connect_lazy(),
                    &self.inner.connect,
                ),
            },
        };
        routes.channels.insert(target.to_owned(), ch.clone());
        ch
    }

    fn pick(&self, queue: Option<&str>) -> String {
        let routes = self.routes();
        if let Some(leader) = queue.and_then(|q| routes.queue_leaders.get(q)) {
            return leader.clone();
        }
        self.inner.endpoints[routes.current % self.inner.endpoints.len()].clone()
    }

    fn learn_leader(&self, queue: &str, leader: String) {
        let mut routes = self.routes();
        if routes.queue_leaders.len() >= MAX_QUEUE_LEADERS && !routes.queue_leaders.contains_key(queue) {
            routes.queue_leaders.clear();
        }
        routes.queue_leaders.insert(queue.to_owned(), leader);
    }

    fn unreachable(&self, target: &str, queue: Option<&str>) {
        let mut routes = self.routes();
        if let Some(q) = queue
            && routes.queue_leaders.get(q).map(String::as_str) == Some(target)
        {
            routes.queue_leaders.remove(q);
        }
        let n = self.inner.endpoints.len();
        if self.inner.endpoints[routes.current % n] == target {
            routes.current = (routes.current + 1) % n;
        }
    }

    /// Runs a unary call, retrying on `UNAVAILABLE` across nodes (a leader
    /// hint in the status first), for up to [`RETRY_BUDGET`] with backoff.
    pub(crate) async fn call<T, F, Fut>(&self, queue: Option<&str>, mut f: F) -> Result<T, Error>
    where
        F: FnMut(BrokerChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut next_target: Option<String> = None;
        let started = tokio::time::Instant::now();
        loop {
            let target = next_target.take().unwrap_or_else(|| self.pick(queue));
            match f(self.channel(&target)).await {
                Ok(resp) => {
                    if let (Some(q), Some(leader)) =
                        (queue, leader_hint(resp.metadata(), self.inner.connect.uses_tls()))
                    {
                        self.learn_leader(q, leader);
                    }
                    return Ok(resp.into_inner());
                }
                Err(status) if is_retryable(&status) && started.elapsed() < RETRY_BUDGET => {
                    let hint = leader_hint(status.metadata(), self.inner.connect.uses_tls()).filter(|h| *h != target);
                    tracing::debug!(
                        node = %target, code = ?status.code(), message = status.message(),
                        leader = ?hint, "call failed, retrying"
                    );
                    self.unreachable(&target, queue);
                    if let (Some(q), Some(h)) = (queue, &hint) {
                        self.learn_leader(q, h.clone());
                    }
                    next_target = hint;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(status) => return Err(Error::Status(status)),
            }
        }
    }
}

fn is_terminal(state: proto::JobState) -> bool {
    matches!(state, proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled)
}

/// `UNAVAILABLE` is what the broker (no leader, shutting down) and tonic (no
/// connection) say when trying elsewhere or later may work. tonic reports a
/// channel that could not become ready as `UNKNOWN` with this message, though
/// nothing was sent.
pub(crate) fn is_retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown => status.message().starts_with("Service was not ready"),
        _ => false,
    }
}

/// Builds one enqueue; finish with [`EnqueueBuilder::send`] or take the raw
/// request with [`EnqueueBuilder::request`] (e.g. for a batch).
#[must_use = "an EnqueueBuilder does nothing until .send() is awaited"]
#[derive(Debug, Clone)]
pub struct EnqueueBuilder {
    client: Client,
    req: proto::EnqueueRequest,
}

impl EnqueueBuilder {
    /// Higher goes out first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.req.priority = priority;
        self
    }

    /// Run no sooner than `delay` from now. Replaces any `run_at`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.req.delay = Some(to_proto_duration(delay));
        self.req.run_at = None;
        self
    }

    /// Run no sooner than `at`. Replaces any `delay`.
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.req.run_at = Some(to_proto_timestamp(at));
        self.req.delay = None;
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.req.headers.insert(key.into(), value.into());
        self
    }

    /// Attempts before the job is `FAILED` (default: the queue's).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.req.max_attempts = n;
        self
    }

    /// How long one attempt may hold the job without progress (default: the queue's).
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.req.lease_timeout = Some(to_proto_duration(timeout));
        self
    }

    /// Deduplicates enqueues: a second one with the same key returns the first job.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.req.idempotency_key = key.into();
        self
    }

    /// The request as built, e.g. to put into [`Client::enqueue_batch`].
    pub fn request(self) -> proto::EnqueueRequest {
        self.req
    }

    /// Enqueues the job; returns once it is committed.
    ///
    /// Retries on `UNAVAILABLE` may enqueue twice if the first attempt was
    /// committed but its answer lost; set an idempotency key where that matters.
    pub async fn send(self) -> Result<Enqueued, Error> {
        let EnqueueBuilder { client, req } = self;
        if let Some(coalescer) = &client.coalescer {
            return coalescer.enqueue(req).await;
        }
        let queue = req.queue.clone();
        let resp = client
            .call(Some(&queue), move |ch| {
                let req = req.clone();
                async move { JobsClient::new(ch).enqueue(req).await }
            })
            .await?;
        Ok(Enqueued { job_id: resp.job_id, created: resp.created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable(&tonic::Status::unavailable("no leader")));
        assert!(is_retryable(&tonic::Status::unknown("Service was not ready: x")));
        assert!(!is_retryable(&tonic::Status::unknown("handler blew up")));
        assert!(!is_retryable(&tonic::Status::not_found("job")));
        assert!(!is_retryable(&tonic::Status::invalid_argument("queue")));
    }

    #[tokio::test]
    async fn builder_fills_the_request() {
        let client = Client {
            inner: Arc::new(Inner {
                endpoints: vec!["http://127.0.0.1:1".into()],
                connect: Connect::default(),
                routes: Mutex::new(Routes::default()),
            }),
            coalescer: None,
        };
        let req = client
            .enqueue("emails", &b"hi"[..])
            .priority(5)
            .delay(Duration::from_secs(3))
            .header("k", "v")
            .max_attempts(4)
            .lease_timeout(Duration::from_secs(60))
            .idempotency_key("once")
            .request();
        assert_eq!(req.queue, "emails");
        assert_eq!(req.payload, b"hi");
        assert_eq!(req.priority, 5);
        assert_eq!(req.delay.map(|d| d.seconds), Some(3));
        assert!(req.run_at.is_none());
        assert_eq!(req.headers.get("k").map(String::as_str), Some("v"));
        assert_eq!(req.max_attempts, 4);
        assert_eq!(req.lease_timeout.map(|d| d.seconds), Some(60));
        assert_eq!(req.idempotency_key, "once");

        let req = client.enqueue("q", Bytes::new()).delay(Duration::from_secs(1)).run_at(SystemTime::now()).request();
        assert!(req.delay.is_none() && req.run_at.is_some());
    }

    #[tokio::test]
    async fn connect_fails_cleanly_when_nothing_listens() {
        // Port 1 on loopback: refused at once on any sane machine.
        let err = Client::connect(["127.0.0.1:1"]).await.expect_err("nothing listens there");
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert!(matches!(Client::connect(["ftp://x"]).await, Err(Error::InvalidEndpoint(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_then_returned() {
        let client = Client {
            inner: Arc::new(Inner {
                endpoints: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
                connect: Connect::default(),
                routes: Mutex::new(Routes::default()),
            }),
            coalescer: None,
        };
        let mut seen = Vec::new();
        let err = client
            .call::<(), _, _>(None, |_ch| {
                seen.push(());
                async { Err(tonic::Status::unavailable("no leader")) }
            })
            .await
            .expect_err("always unavailable");
        assert_eq!(err.code(), Some(tonic::Code::Unavailable));
        // Backoff from 50 ms doubling to 1 s, for the 10 s budget.
        assert!((10..=20).contains(&seen.len()), "{} tries", seen.len());

        let mut calls = 0;
        let err = client
            .call::<(), _, _>(None, |_ch| {
                calls += 1;
                async { Err(tonic::Status::not_found("nope")) }
            })
            .await
            .expect_err("not found");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert_eq!(calls, 1, "only UNAVAILABLE is retried");
    }
}
