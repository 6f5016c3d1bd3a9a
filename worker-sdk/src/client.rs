//! The producer-side client: enqueue, get, wait, cancel.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::Error;
use crate::backoff::Backoff;
use crate::convert::{to_proto_duration, to_proto_timestamp};
use crate::endpoint::{self, BrokerChannel, Connect, Tls, leader_hint};
use crate::proto::{self, admin_client::AdminClient, jobs_client::JobsClient};
use crate::retry::{self, Decision, Replay};

/// How long a call keeps trying while nodes answer `UNAVAILABLE` (no
/// leader yet, node down) or not at all: long enough to ride out a leader
/// election (up to two election timeouts) and a restart of the node it
/// talked to. Two request timeouts when that is longer, so that a try that
/// timed out is always followed by one on another node.
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// How long one try of a call may take by default before the client gives
/// up on that node (see [`ClientBuilder::request_timeout`]): far above a
/// commit's worst case in practice (a few slow fsyncs), and short enough
/// that a try on a frozen node, then one on another node, fit in the 10 s
/// retry budget.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest per-try deadline accepted. Longer ones would stretch the
/// retry budget (two request timeouts) to where a cluster without a leader
/// keeps callers waiting for hours instead of getting an error.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60 * 60);
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
    /// Per-try deadline of unary calls, on top of any time the broker holds
    /// a call on purpose (a `WaitJob`'s own timeout).
    request_timeout: Duration,
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
        f.debug_struct("Client")
            .field("endpoints", &self.inner.endpoints)
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

/// What an enqueue returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: String,
    /// `false` when an earlier job with the same idempotency key was returned.
    pub created: bool,
}

/// Configures a [`Client`]: endpoints, TLS, a bearer token and the per-try
/// deadline of its calls.
///
/// ```no_run
/// # async fn connect() -> Result<(), gantry_worker::Error> {
/// use std::time::Duration;
/// use gantry_worker::{Client, Tls};
/// let client = Client::builder(["https://gantry.jobs.svc:50051"])
///     .tls(Tls::ca_file("/etc/gantry/tls/ca.crt")?)
///     .token(std::env::var("GANTRY_TOKEN").unwrap_or_default())
///     .request_timeout(Duration::from_secs(3))
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
    request_timeout: Duration,
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

    /// How long one try of a call may wait for its answer (default
    /// [`DEFAULT_REQUEST_TIMEOUT`], 5 s) before the client gives up on that
    /// node. [`Client::wait`] gets its own wait time on top of this.
    ///
    /// A try without an answer in time is retried on another node, within
    /// the same retry budget as `UNAVAILABLE` answers (10 s), when sending
    /// the call twice is harmless: reads, cancels, enqueues with an
    /// idempotency key. An enqueue without a key may have been committed by the node
    /// that went silent, so it is not sent again: it fails with
    /// [`Error::OutcomeUnknown`] (code `DEADLINE_EXCEEDED`).
    ///
    /// Keep it well above the cluster's slowest commits, or healthy but slow
    /// enqueues without a key end as `OutcomeUnknown`. A timeout above 5 s
    /// stretches the retry budget to two timeouts, so that a try that timed
    /// out is still followed by one on another node. [`ClientBuilder::connect`]
    /// refuses zero and anything above an hour.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Connects to the first reachable node. The other nodes are used when
    /// that one fails or names another leader.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.request_timeout.is_zero() || self.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(Error::InvalidConfig(format!(
                "request_timeout: must be more than zero and at most {MAX_REQUEST_TIMEOUT:?} (it bounds each try of \
                 a call), got {:?}",
                self.request_timeout
            )));
        }
        let connect = Connect::new(self.tls.as_ref(), self.token.as_deref())?;
        let endpoints = endpoint::parse_endpoints(self.endpoints, connect.uses_tls())?;
        let mut last_err = None;
        for (i, uri) in endpoints.iter().enumerate() {
            match endpoint::endpoint(uri, &connect)?.connect().await {
                Ok(channel) => {
                    let mut routes = Routes { current: i, ..Routes::default() };
                    routes.channels.insert(uri.clone(), endpoint::with_credentials(channel, &connect));
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            endpoints,
                            connect,
                            request_timeout: self.request_timeout,
                            routes: Mutex::new(routes),
                        }),
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
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            token: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
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
    ///
    /// Retried on another node after a try without an answer only when every
    /// job has an idempotency key; otherwise such a try ends in
    /// [`Error::OutcomeUnknown`] (see [`EnqueueBuilder::send`]).
    pub async fn enqueue_batch(
        &self,
        reqs: Vec<proto::EnqueueRequest>,
    ) -> Result<Vec<proto::EnqueueBatchResult>, Error> {
        // Route by the first job's queue: batches usually target one queue.
        let route = reqs.first().map(|r| r.queue.clone());
        let replay = if reqs.iter().all(has_idempotency_key) { Replay::Safe } else { Replay::Unsafe };
        let req = proto::EnqueueBatchRequest { jobs: reqs };
        let resp = self
            .call(route.as_deref(), Rpc::write("EnqueueBatch", replay), move |ch| {
                let req = req.clone();
                async move { JobsClient::new(ch).enqueue_batch(req).await }
            })
            .await?;
        Ok(resp.results)
    }

    /// The job as the broker has it now. `NOT_FOUND` comes back as [`Error::Status`].
    pub async fn get(&self, job_id: &str) -> Result<proto::Job, Error> {
        let req = proto::GetJobRequest { job_id: job_id.to_owned() };
        self.call(None, Rpc::read("GetJob"), move |ch| {
            let req = req.clone();
            async move { JobsClient::new(ch).get_job(req).await }
        })
        .await
    }

    /// Waits until the job is terminal and returns it, or returns its current
    /// state once `timeout` has passed. The broker holds one call for at most
    /// an hour, so longer waits are made of several calls.
    ///
    /// Each call may take its wait plus the client's
    /// [`request_timeout`](ClientBuilder::request_timeout) before it is given
    /// up and sent to another node (asking only for what is left of the wait).
    pub async fn wait(&self, job_id: &str, timeout: Duration) -> Result<proto::Job, Error> {
        // `None`: further away than a clock can say, so only the job's end
        // stops the wait.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let now = Instant::now();
            let remaining = deadline.map_or(MAX_WAIT_PER_CALL, |d| d.saturating_duration_since(now));
            let last = deadline.is_some() && remaining <= MAX_WAIT_PER_CALL;
            let held_until = now + remaining.min(MAX_WAIT_PER_CALL);
            let job_id = job_id.to_owned();
            let job = self
                .call(None, Rpc::read("WaitJob").held_until(held_until), move |ch| {
                    // A retry on another node waits only for what is left.
                    let timeout = held_until.saturating_duration_since(Instant::now());
                    let req =
                        proto::WaitJobRequest { job_id: job_id.clone(), timeout: Some(to_proto_duration(timeout)) };
                    async move { JobsClient::new(ch).wait_job(req).await }
                })
                .await?;
            if is_terminal(job.state()) || last {
                return Ok(job);
            }
        }
    }

    /// Cancels a job that is not terminal; an active holder is sent `revoke`.
    ///
    /// A try without an answer is sent again to another node (a second
    /// cancel changes nothing); if the first one was applied after all, the
    /// answer is `FAILED_PRECONDITION` naming the job's `CANCELLED` state.
    pub async fn cancel(&self, job_id: &str, reason: &str) -> Result<proto::Job, Error> {
        let req = proto::CancelJobRequest { job_id: job_id.to_owned(), reason: reason.to_owned() };
        self.call(None, Rpc::write("CancelJob", Replay::Safe), move |ch| {
            let req = req.clone();
            async move { JobsClient::new(ch).cancel_job(req).await }
        })
        .await
    }

    /// A raw `Admin` client on the current node (no retries and no deadline:
    /// tools decide; `tonic::Request::set_timeout` sets one per call). Its
    /// channel still drops a connection whose keepalive pings go unanswered.
    pub fn admin(&self) -> AdminClient<BrokerChannel> {
        AdminClient::new(self.current_channel())
    }

    /// A raw `Jobs` client on the current node (no retries and no deadline:
    /// callers decide, as for [`Client::admin`]).
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
        let ch = match endpoint::lazy_channel(target, &self.inner.connect) {
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

    /// Runs a unary call: each try bounded by the request timeout (plus
    /// what `rpc` holds on purpose), failed tries sent again across nodes (a
    /// leader hint in the status first) with backoff for up to
    /// [`RETRY_BUDGET`] (or two request timeouts), as [`retry::decide`] allows.
    pub(crate) async fn call<T, F, Fut>(&self, queue: Option<&str>, rpc: Rpc, mut f: F) -> Result<T, Error>
    where
        F: FnMut(BrokerChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // Short steps: while a cluster elects a leader every node answers
        // UNAVAILABLE at once (cheap), and a long sleep here would be added
        // to the failover time the caller sees.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let mut next_target: Option<String> = None;
        let budget = RETRY_BUDGET.max(self.inner.request_timeout.saturating_mul(2));
        // A call the broker holds on purpose spends its budget only after
        // that: a node lost in the middle of a long wait is worth going on
        // elsewhere for the rest of it.
        let budget_from = rpc.held_until.map_or_else(Instant::now, |until| until.max(Instant::now()));
        loop {
            let target = next_target.take().unwrap_or_else(|| self.pick(queue));
            let held = rpc.held_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()));
            let deadline = self.inner.request_timeout.saturating_add(held);
            // On timeout the call's future is dropped, which resets its HTTP/2
            // stream: the node is told to stop, should it ever wake up.
            let status = match tokio::time::timeout(deadline, f(self.channel(&target))).await {
                Ok(Ok(resp)) => {
                    if let (Some(q), Some(leader)) =
                        (queue, leader_hint(resp.metadata(), self.inner.connect.uses_tls()))
                    {
                        self.learn_leader(q, leader);
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(if held.is_zero() {
                    format!("no answer within the request timeout ({deadline:?})")
                } else {
                    format!("no answer within {deadline:?} (the call's {held:?} and the request timeout)")
                }),
            };
            match retry::decide(&status, rpc.replay) {
                Decision::Retry if Instant::now().saturating_duration_since(budget_from) < budget => {
                    let hint = leader_hint(status.metadata(), self.inner.connect.uses_tls()).filter(|h| *h != target);
                    tracing::debug!(
                        call = rpc.name, node = %target, code = ?status.code(), message = status.message(),
                        leader = ?hint, "call failed, retrying"
                    );
                    self.unreachable(&target, queue);
                    if let (Some(q), Some(h)) = (queue, &hint) {
                        self.learn_leader(q, h.clone());
                    }
                    next_target = hint;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Decision::OutcomeUnknown => {
                    tracing::warn!(
                        call = rpc.name, node = %target, code = ?status.code(), message = status.message(),
                        "no answer to a call that is not safe to send twice; not retried"
                    );
                    // The caller's next call should not wait on the same node.
                    self.unreachable(&target, queue);
                    return Err(Error::OutcomeUnknown { call: rpc.name, node: target, status });
                }
                Decision::Retry | Decision::Return => return Err(Error::Status(status)),
            }
        }
    }
}

/// What [`Client::call`] needs to know about the RPC it runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rpc {
    /// For errors and logs.
    name: &'static str,
    replay: Replay,
    /// Until when the broker holds the call on purpose (`WaitJob`): each
    /// try's deadline is the request timeout past that.
    held_until: Option<Instant>,
}

impl Rpc {
    fn read(name: &'static str) -> Rpc {
        Rpc { name, replay: Replay::Safe, held_until: None }
    }

    fn write(name: &'static str, replay: Replay) -> Rpc {
        Rpc { name, replay, held_until: None }
    }

    fn held_until(self, until: Instant) -> Rpc {
        Rpc { held_until: Some(until), ..self }
    }
}

fn has_idempotency_key(req: &proto::EnqueueRequest) -> bool {
    !req.idempotency_key.is_empty()
}

fn is_terminal(state: proto::JobState) -> bool {
    matches!(state, proto::JobState::Succeeded | proto::JobState::Failed | proto::JobState::Cancelled)
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
    /// A node that answers `UNAVAILABLE` (no leader, not the leader) or
    /// cannot be reached did not take the job: the call goes to another node.
    /// A try that gets no answer (the
    /// [`request_timeout`](ClientBuilder::request_timeout) passed, the
    /// connection broke) may have been committed. With an idempotency key it
    /// is sent again, to another node, and the broker answers the retry with
    /// the first job if there was one (`created == false`). Without a key it
    /// is not sent again, since that could make a second job: it fails with
    /// [`Error::OutcomeUnknown`], and whether the job exists is for the
    /// caller to find out.
    pub async fn send(self) -> Result<Enqueued, Error> {
        let EnqueueBuilder { client, req } = self;
        if let Some(coalescer) = &client.coalescer {
            return coalescer.enqueue(req).await;
        }
        let queue = req.queue.clone();
        let replay = if has_idempotency_key(&req) { Replay::Safe } else { Replay::Unsafe };
        let resp = client
            .call(Some(&queue), Rpc::write("Enqueue", replay), move |ch| {
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

    fn client(endpoints: &[&str], request_timeout: Duration) -> Client {
        Client {
            inner: Arc::new(Inner {
                endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
                connect: Connect::default(),
                request_timeout,
                routes: Mutex::new(Routes::default()),
            }),
            coalescer: None,
        }
    }

    /// Turns a hang into a failure; with paused time it costs nothing.
    async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(24 * 60 * 60), f)
            .await
            .unwrap_or_else(|_| panic!("{what} still waiting after a day"))
    }

    #[tokio::test]
    async fn builder_fills_the_request() {
        let client = client(&["http://127.0.0.1:1"], DEFAULT_REQUEST_TIMEOUT);
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

    #[tokio::test]
    async fn request_timeouts_of_zero_or_over_an_hour_are_refused() {
        for refused in [Duration::ZERO, MAX_REQUEST_TIMEOUT + Duration::from_nanos(1), Duration::MAX] {
            let err = Client::builder(["127.0.0.1:1"]).request_timeout(refused).connect().await.unwrap_err();
            assert!(matches!(&err, Error::InvalidConfig(m) if m.contains("request_timeout")), "{refused:?}: {err:?}");
        }
        let err = Client::builder(["127.0.0.1:1"]).request_timeout(MAX_REQUEST_TIMEOUT).connect().await.unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "an hour is accepted: {err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_then_returned() {
        let client = client(&["http://127.0.0.1:1", "http://127.0.0.1:2"], DEFAULT_REQUEST_TIMEOUT);
        let mut seen = Vec::new();
        let err = client
            .call::<(), _, _>(None, Rpc::write("Enqueue", Replay::Unsafe), |_ch| {
                seen.push(());
                async { Err(tonic::Status::unavailable("no leader")) }
            })
            .await
            .expect_err("always unavailable");
        assert_eq!(err.code(), Some(tonic::Code::Unavailable));
        // Backoff from 50 ms doubling to 300 ms (jittered to 150..300), for
        // the 10 s budget.
        assert!((30..=75).contains(&seen.len()), "{} tries", seen.len());

        let mut calls = 0;
        let err = client
            .call::<(), _, _>(None, Rpc::read("GetJob"), |_ch| {
                calls += 1;
                async { Err(tonic::Status::not_found("nope")) }
            })
            .await
            .expect_err("not found");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert_eq!(calls, 1, "an answer is not retried");
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_without_an_answer_moves_on_to_the_next_node() {
        let client = client(&["http://127.0.0.1:1", "http://127.0.0.1:2"], Duration::from_secs(2));
        let mut tries = 0;
        let started = Instant::now();
        let answer = bounded(
            "a call to a silent node",
            client.call(Some("q"), Rpc::write("Enqueue", Replay::Safe), |_ch| {
                tries += 1;
                let silent = tries == 1;
                async move {
                    if silent {
                        std::future::pending::<()>().await;
                    }
                    Ok(tonic::Response::new(7))
                }
            }),
        )
        .await
        .expect("answered by the second node");
        assert_eq!((answer, tries), (7, 2));
        assert!(started.elapsed() >= Duration::from_secs(2), "the first try had its full deadline");
        assert_eq!(client.pick(Some("q")), "http://127.0.0.1:2", "the silent node is not tried first any more");

        // Every try silent: given up once the budget is spent.
        let mut tries = 0;
        let err = bounded(
            "calls to silent nodes",
            client.call::<(), _, _>(None, Rpc::read("GetJob"), |_ch| {
                tries += 1;
                std::future::pending()
            }),
        )
        .await
        .expect_err("nobody answers");
        assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded));
        assert!(!err.is_outcome_unknown(), "a read has no outcome to be unsure about");
        assert!((5..=6).contains(&tries), "{tries} tries of 2 s in a 10 s budget");
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_without_an_answer_is_not_repeated_when_that_is_unsafe() {
        let client = client(&["http://127.0.0.1:1", "http://127.0.0.1:2"], Duration::from_secs(2));
        let mut tries = 0;
        let err = bounded(
            "an enqueue to a silent node",
            client.call::<(), _, _>(Some("q"), Rpc::write("Enqueue", Replay::Unsafe), |_ch| {
                tries += 1;
                std::future::pending()
            }),
        )
        .await
        .expect_err("no answer");
        assert_eq!(tries, 1, "sent once only");
        let Error::OutcomeUnknown { call, node, status } = &err else { panic!("{err:?}") };
        assert_eq!((*call, node.as_str()), ("Enqueue", "http://127.0.0.1:1"));
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded));
        let message = err.to_string();
        assert!(
            message.contains("may or may not have been applied") && message.contains("idempotency key"),
            "{message}"
        );
        assert_eq!(client.pick(Some("q")), "http://127.0.0.1:2", "the next call goes elsewhere");

        // A refusal before acting is still retried, key or not.
        let mut tries = 0;
        let answer =
            client
                .call(None, Rpc::write("Enqueue", Replay::Unsafe), |_ch| {
                    tries += 1;
                    let first = tries == 1;
                    async move {
                        if first { Err(tonic::Status::unavailable("no leader")) } else { Ok(tonic::Response::new(1)) }
                    }
                })
                .await
                .expect("second try answers");
        assert_eq!((answer, tries), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_timeout_longer_than_the_budget_still_gets_a_second_try() {
        let client = client(&["http://127.0.0.1:1", "http://127.0.0.1:2"], Duration::from_secs(30));
        let mut tries = 0;
        let answer = bounded(
            "a call to a silent node",
            client.call(None, Rpc::read("GetJob"), |_ch| {
                tries += 1;
                let silent = tries == 1;
                async move {
                    if silent {
                        std::future::pending::<()>().await;
                    }
                    Ok(tonic::Response::new(()))
                }
            }),
        )
        .await;
        assert!(answer.is_ok() && tries == 2, "{answer:?} after {tries} tries");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_gets_its_own_time_on_top_of_the_request_timeout() {
        let client = client(&["http://127.0.0.1:1"], Duration::from_secs(2));
        let held_until = Instant::now() + Duration::from_secs(60);
        let mut tries = 0;
        let answer = bounded(
            "a long poll",
            client.call(None, Rpc::read("WaitJob").held_until(held_until), |_ch| {
                tries += 1;
                async move {
                    // Answers a little after its own timeout, as a broker does.
                    tokio::time::sleep_until(held_until + Duration::from_secs(1)).await;
                    Ok(tonic::Response::new("done"))
                }
            }),
        )
        .await
        .expect("answered");
        assert_eq!((answer, tries), ("done", 1), "not cut off at the request timeout");

        // A node lost late in a long wait: the rest of the wait goes on
        // elsewhere, although far more than the retry budget has passed.
        let held_until = Instant::now() + Duration::from_secs(60 * 60);
        let mut tries = 0;
        let answer = bounded(
            "a long poll whose node goes away",
            client.call(None, Rpc::read("WaitJob").held_until(held_until), |_ch| {
                tries += 1;
                let first = tries == 1;
                async move {
                    if first {
                        tokio::time::sleep(Duration::from_secs(50 * 60)).await;
                        return Err(tonic::Status::unavailable("shutting down"));
                    }
                    Ok(tonic::Response::new("done"))
                }
            }),
        )
        .await
        .expect("answered by the next node");
        assert_eq!((answer, tries), ("done", 2));
    }
}
