//! The session loop: one task that owns the stream, the jobs and their
//! unacknowledged messages. Handlers run on their own tasks and talk to it
//! through channels, so no lock is ever held across the network.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::context::{Command, JobContext, JobKey};
use crate::convert::{MAX_BROKER_DURATION, from_proto_duration, from_proto_timestamp, to_proto_duration};
use crate::endpoint::{self, Targets};
use crate::error::{Error, JobError, LeaseLost};
use crate::link::{self, OpenError, Opened, message};
use crate::proto::{self, AckStatus, broker_message, worker_message::Kind};
use crate::worker::{Config, Shared, Stats};

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, JobError>> + Send>>;
pub(crate) type DynHandler = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// Bounds hello-to-welcome, so a node that accepts TCP but never answers
/// does not hold the worker forever.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// After handlers are done (or dropped), how long shutdown still waits for
/// the broker to acknowledge their results.
const ACK_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the broker to close the stream after `goodbye`, so the
/// process does not exit with `goodbye` still in a socket buffer.
const GOODBYE_LINGER: Duration = Duration::from_secs(2);
/// Redirects followed back to back without backoff before assuming a loop.
const MAX_FAST_REDIRECTS: u32 = 3;
/// Finished leases remembered to ignore a late duplicate `assign`.
const RECENT_KEYS: usize = 1024;
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// The broker refuses (and ends the stream over) a larger result; sending it
/// would only repeat that after every reconnect. A retry would most likely
/// produce the same result, so such a job fails for good.
const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Streams the broker ended with `INVALID_ARGUMENT`, back to back, before the
/// unacknowledged messages (one of which it refuses) are dropped.
const MAX_INVALID_STREAMS: u32 = 3;

const STALE_CAUSE: &str = "this worker's heartbeats did not reach the broker within session_ttl \
     (or the job's lease_timeout passed), so the job was given to another worker; \
     the result was refused and will not be retried";

pub(crate) struct Session {
    cfg: Config,
    shared: Arc<Shared>,
    handler: DynHandler,
    /// Ordered, so the leases of one job are found without a scan.
    jobs: BTreeMap<JobKey, Entry>,
    /// Assigned but not started, in arrival order (concurrency is full).
    waiting: VecDeque<JobKey>,
    handlers: JoinSet<(JobKey, Outcome)>,
    /// Messages the broker has not acknowledged yet, per lease in send order.
    /// Acks carry only (job_id, token), so the front of a lease's queue is
    /// what the next ack for that lease answers. Everything here is sent
    /// again on a new stream.
    outbox: HashMap<JobKey, VecDeque<Pending>>,
    recent: RecentKeys,
    commands_tx: mpsc::UnboundedSender<Command>,
    commands: mpsc::UnboundedReceiver<Command>,
    link: Link,
    targets: Targets,
    backoff: Backoff,
    fast_redirects: u32,
    invalid_streams: u32,
    session_id: Option<String>,
    channels: HashMap<String, endpoint::BrokerChannel>,
    stopping: Option<Stopping>,
}

struct Entry {
    ctx: JobContext,
    phase: Phase,
    /// Why the broker revoked the lease, if it did: a result refused after a
    /// revoke is expected and not worth the "heartbeats did not arrive" warning.
    revoked: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    /// A result or release was sent; waiting for its ack.
    Reported,
}

enum Outcome {
    Done(Bytes),
    Error(JobError),
    Panicked(String),
}

enum Pending {
    Progress { msg: proto::Progress, reply: Option<oneshot::Sender<Result<(), LeaseLost>>> },
    Result { kind: ResultKind, msg: proto::WorkerMessage },
}

#[derive(Debug, Clone, Copy)]
enum ResultKind {
    Complete,
    Fail,
    Release,
}

struct Stopping {
    handler_deadline: Instant,
    ack_deadline: Instant,
}

enum Link {
    Down { retry_at: Instant },
    Connecting { target: String, fut: Pin<Box<dyn Future<Output = Result<Opened, OpenError>> + Send>> },
    // Boxed: a live stream is much larger than the other states.
    Up(Box<Conn>),
    Closed,
}

struct Conn {
    target: String,
    tx: mpsc::UnboundedSender<proto::WorkerMessage>,
    inbound: tonic::codec::Streaming<proto::BrokerMessage>,
    heartbeat: Interval,
}

enum Event {
    Shutdown,
    HandlerDone(Result<(JobKey, Outcome), tokio::task::JoinError>),
    Command(Command),
    RetryDue,
    Opened(Result<Opened, OpenError>),
    Inbound(Result<Option<proto::BrokerMessage>, tonic::Status>),
    Heartbeat,
    StopTick,
}

impl Session {
    pub(crate) fn new(cfg: Config, shared: Arc<Shared>, handler: DynHandler) -> Self {
        let (commands_tx, commands) = mpsc::unbounded_channel();
        Session {
            targets: Targets::new(cfg.endpoints.clone()),
            backoff: Backoff::new(cfg.backoff_min, cfg.backoff_max),
            cfg,
            shared,
            handler,
            jobs: BTreeMap::new(),
            waiting: VecDeque::new(),
            handlers: JoinSet::new(),
            outbox: HashMap::new(),
            recent: RecentKeys::default(),
            commands_tx,
            commands,
            link: Link::Down { retry_at: Instant::now() },
            fast_redirects: 0,
            invalid_streams: 0,
            session_id: None,
            channels: HashMap::new(),
            stopping: None,
        }
    }

    pub(crate) async fn run<S: Future<Output = ()>>(mut self, shutdown: S) -> Result<(), Error> {
        tokio::pin!(shutdown);
        loop {
            if self.stop_check().await {
                return Ok(());
            }
            let stop_timer = self.stop_timer();
            let event = tokio::select! {
                () = &mut shutdown, if self.stopping.is_none() => Event::Shutdown,
                Some(done) = self.handlers.join_next(), if !self.handlers.is_empty() => Event::HandlerDone(done),
                Some(cmd) = self.commands.recv() => Event::Command(cmd),
                ev = next_link_event(&mut self.link) => ev,
                // select! builds every branch's future on every turn, even a
                // disabled one: no clock read or timer unless stopping.
                () = sleep_until_some(stop_timer), if stop_timer.is_some() => Event::StopTick,
            };
            self.handle(event)?;
        }
    }

    fn handle(&mut self, event: Event) -> Result<(), Error> {
        match event {
            Event::Shutdown => self.begin_stop(),
            Event::HandlerDone(Ok((key, outcome))) => self.handler_done(key, outcome),
            Event::HandlerDone(Err(e)) => {
                // Panics are caught inside the task; this is an abort.
                tracing::debug!(error = %e, "handler task ended without a result");
            }
            Event::Command(cmd) => self.command(cmd),
            Event::RetryDue => self.start_connect(),
            Event::Opened(result) => return self.opened(result),
            Event::Inbound(Ok(Some(msg))) => self.inbound(msg),
            Event::Inbound(Ok(None)) => {
                tracing::info!("broker closed the stream; reconnecting");
                self.disconnect(false);
            }
            Event::Inbound(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "stream broke; reconnecting");
                if let Some(leader) = endpoint::leader_hint(status.metadata(), self.cfg.connect.uses_tls()) {
                    self.targets.set_hint(leader);
                }
                if status.code() == tonic::Code::InvalidArgument {
                    self.invalid_streams += 1;
                    if self.invalid_streams >= MAX_INVALID_STREAMS {
                        self.drop_outbox(&status);
                    }
                }
                self.disconnect(false);
            }
            Event::Heartbeat => {
                if !self.shared.heartbeats_paused.load(std::sync::atomic::Ordering::Relaxed) {
                    self.send(message(Kind::Heartbeat(proto::Heartbeat {})));
                }
            }
            Event::StopTick => {}
        }
        self.publish_running();
        Ok(())
    }

    // ---- connection ------------------------------------------------------

    fn start_connect(&mut self) {
        let target = self.targets.pick();
        let channel = match self.channels.get(&target) {
            Some(ch) => ch.clone(),
            None => match endpoint::lazy_channel(&target, &self.cfg.connect) {
                Ok(ch) => {
                    self.channels.insert(target.clone(), ch.clone());
                    ch
                }
                Err(e) => {
                    tracing::warn!(node = %target, error = %e, "unusable broker address");
                    self.targets.failed(&target);
                    self.retry_later(false);
                    return;
                }
            },
        };
        let hello = proto::Hello {
            worker_id: self.cfg.worker_id.clone(),
            queues: self.cfg.queues.clone(),
            max_in_flight: self.cfg.concurrency,
            resume_session_id: self.session_id.clone().unwrap_or_default(),
        };
        tracing::debug!(node = %target, resume = %hello.resume_session_id, "connecting");
        let tls = self.cfg.connect.uses_tls();
        self.link = Link::Connecting { target, fut: Box::pin(link::open(channel, hello, WELCOME_TIMEOUT, tls)) };
    }

    fn opened(&mut self, result: Result<Opened, OpenError>) -> Result<(), Error> {
        let target = match std::mem::replace(&mut self.link, Link::Closed) {
            Link::Connecting { target, .. } => target,
            // Unreachable: only a connecting link yields this event.
            other => {
                self.link = other;
                return Ok(());
            }
        };
        let opened = match result {
            Ok(opened) => opened,
            Err(OpenError::Redirect(address)) => {
                self.redirect(&target, &address);
                return Ok(());
            }
            Err(err) => {
                if let OpenError::Status(status) = &err {
                    if is_fatal(status.code()) {
                        tracing::error!(node = %target, code = ?status.code(), message = status.message(),
                            "broker refused this worker");
                        self.link = Link::Closed;
                        return Err(Error::Status(status.clone()));
                    }
                    if let Some(leader) =
                        endpoint::leader_hint(status.metadata(), self.cfg.connect.uses_tls()).filter(|l| *l != target)
                    {
                        self.targets.set_hint(leader);
                    }
                }
                tracing::warn!(node = %target, error = %err, "cannot open a session");
                self.targets.failed(&target);
                self.retry_later(false);
                return Ok(());
            }
        };

        self.targets.succeeded(&target);
        if let Some(leader) = opened.leader.filter(|l| *l != target) {
            // Go straight to the leader next time rather than through a proxy.
            self.targets.set_hint(leader);
        }
        self.backoff.reset();
        self.fast_redirects = 0;
        let welcome = opened.welcome;
        let resumed = match &self.session_id {
            Some(previous) => welcome.resumed && welcome.session_id == *previous,
            None => true,
        };
        if !resumed {
            self.session_lost(&welcome.session_id);
        }
        let period = welcome
            .heartbeat_interval
            .as_ref()
            .and_then(from_proto_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_HEARTBEAT)
            .max(Duration::from_millis(10));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tracing::info!(
            node = %target, node_id = welcome.node_id, session = %welcome.session_id,
            resumed = welcome.resumed, heartbeat_interval = ?period,
            session_ttl = ?welcome.session_ttl.as_ref().and_then(from_proto_duration),
            "session open"
        );
        self.session_id = Some(welcome.session_id.clone());
        self.shared.set_connected(welcome.session_id);
        self.link = Link::Up(Box::new(Conn { target, tx: opened.tx, inbound: opened.inbound, heartbeat }));
        if self.stopping.is_some() {
            // The hello asked for jobs again; a stopping worker wants none.
            self.send(message(Kind::Drain(proto::Drain {})));
        }
        // Whatever the old stream did not get acknowledged goes again; the
        // broker answers a duplicate result of the same token as ACCEPTED.
        let resend: Vec<proto::WorkerMessage> =
            self.outbox.values().flat_map(|queue| queue.iter().map(Pending::message)).collect();
        if !resend.is_empty() {
            tracing::debug!(count = resend.len(), "resending unacknowledged messages");
        }
        for msg in resend {
            self.send(msg);
        }
        Ok(())
    }

    /// The broker gave us a new session instead of resuming ours: every
    /// lease of the old one is gone.
    fn session_lost(&mut self, new_session: &str) {
        let Some(old) = self.session_id.clone() else { return };
        let held: Vec<JobKey> =
            self.jobs.iter().filter(|(_, e)| e.phase != Phase::Reported).map(|(k, _)| k.clone()).collect();
        tracing::warn!(
            old_session = %old, new_session, jobs = held.len(),
            "session could not be resumed (expired: heartbeats did not reach the broker within session_ttl); \
             its jobs belong to other workers now"
        );
        for key in held {
            self.lose_lease(&key, "session expired");
            if self.jobs.get(&key).is_some_and(|e| e.phase == Phase::Waiting) {
                self.jobs.remove(&key);
                self.waiting.retain(|k| *k != key);
            }
        }
        // Progress reports were meant for the old session's stream and are
        // not sent again; results are, so the broker can judge them.
        self.outbox.retain(|key, queue| {
            queue.retain_mut(|p| match p {
                Pending::Progress { reply, .. } => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Err(LeaseLost { job_id: key.0.clone(), fencing_token: key.1 }));
                    }
                    false
                }
                Pending::Result { .. } => true,
            });
            !queue.is_empty()
        });
    }

    fn redirect(&mut self, from: &str, address: &str) {
        match endpoint::parse_endpoint(address, self.cfg.connect.uses_tls()) {
            Ok(leader) => {
                tracing::info!(node = %from, leader = %leader, "redirected to the leader");
                self.targets.set_hint(leader);
                self.fast_redirects += 1;
                self.retry_later(self.fast_redirects <= MAX_FAST_REDIRECTS);
            }
            Err(_) => {
                tracing::warn!(node = %from, leader_address = address, "redirect to an unusable address ignored");
                self.targets.failed(from);
                self.retry_later(false);
            }
        }
    }

    fn disconnect(&mut self, immediately: bool) {
        if matches!(self.link, Link::Closed) {
            return;
        }
        // Dropping the connection ends our request stream; a broken session
        // lives on at the broker until session_ttl, so we come back to it.
        self.shared.set_disconnected();
        self.retry_later(immediately);
    }

    fn retry_later(&mut self, immediately: bool) {
        let delay = if immediately { Duration::ZERO } else { self.backoff.next_delay() };
        self.shared.set_disconnected();
        self.link = Link::Down { retry_at: Instant::now() + delay };
    }

    fn send(&mut self, msg: proto::WorkerMessage) {
        if let Link::Up(conn) = &self.link {
            // A failed send means the stream is going down; the message is
            // still in the outbox (or was a heartbeat) and goes out again.
            let _ = conn.tx.send(msg);
        }
    }

    // ---- broker messages -------------------------------------------------

    fn inbound(&mut self, msg: proto::BrokerMessage) {
        match msg.kind {
            Some(broker_message::Kind::Assign(a)) => self.assign(a),
            Some(broker_message::Kind::Ack(a)) => self.ack(a),
            Some(broker_message::Kind::Revoke(r)) => self.revoke(r),
            Some(broker_message::Kind::Redirect(r)) => {
                let from = match &self.link {
                    Link::Up(conn) => conn.target.clone(),
                    _ => String::new(),
                };
                self.redirect(&from, &r.leader_address);
            }
            Some(broker_message::Kind::Welcome(w)) => {
                tracing::warn!(session = %w.session_id, "unexpected second welcome ignored");
            }
            None => tracing::debug!("empty broker message ignored"),
        }
    }

    fn assign(&mut self, a: proto::Assign) {
        let Some(job) = a.job else {
            tracing::warn!(fencing_token = a.fencing_token, "assign without a job ignored");
            return;
        };
        let key: JobKey = (job.id.clone(), a.fencing_token);
        if self.jobs.contains_key(&key) || self.recent.contains(&key) {
            // A resumed session re-sends the assigns of every job it holds.
            tracing::debug!(job_id = %key.0, fencing_token = key.1, "duplicate assign ignored");
            return;
        }
        // Running an older lease of the same job? That lease is over.
        let older: Vec<JobKey> = self.jobs.range((key.0.clone(), 0)..key.clone()).map(|(k, _)| k.clone()).collect();
        for old in older {
            self.lose_lease(&old, "job reassigned under a newer fencing token");
        }
        let deadline = a.lease_deadline.as_ref().and_then(from_proto_timestamp);
        let attempt = if a.attempt > 0 { a.attempt } else { job.attempt };
        let ctx = JobContext::new(job, a.fencing_token, attempt, deadline, self.commands_tx.clone());
        if self.stopping.is_some() {
            tracing::debug!(job_id = %key.0, fencing_token = key.1, "shutting down: releasing new assignment");
            self.jobs.insert(key.clone(), Entry::new(ctx, Phase::Reported));
            self.push(key.clone(), release(&key));
            return;
        }
        tracing::debug!(job_id = %key.0, fencing_token = key.1, attempt, "assigned");
        self.jobs.insert(key.clone(), Entry::new(ctx, Phase::Waiting));
        self.waiting.push_back(key);
        self.start_waiting();
    }

    fn ack(&mut self, a: proto::Ack) {
        let key: JobKey = (a.job_id, a.fencing_token);
        let status = AckStatus::try_from(a.status).unwrap_or(AckStatus::Unspecified);
        if status == AckStatus::Accepted {
            self.invalid_streams = 0;
        }
        // The broker answers each message as its proposal commits, so two
        // outstanding messages of one lease may be answered out of order.
        // Only a progress ack carries a lease deadline: use that to match it.
        let progress_first = a.lease_deadline.is_some();
        let Some(pending) = self.outbox.get_mut(&key).and_then(|queue| {
            let at = if progress_first {
                queue.iter().position(|p| matches!(p, Pending::Progress { .. })).unwrap_or(0)
            } else {
                0
            };
            queue.remove(at)
        }) else {
            tracing::debug!(job_id = %key.0, fencing_token = key.1, ?status, "ack for nothing outstanding ignored");
            return;
        };
        if self.outbox.get(&key).is_some_and(VecDeque::is_empty) {
            self.outbox.remove(&key);
        }
        match pending {
            Pending::Progress { reply, .. } => {
                let result = if status == AckStatus::Accepted {
                    if let (Some(entry), Some(deadline)) =
                        (self.jobs.get(&key), a.lease_deadline.as_ref().and_then(from_proto_timestamp))
                    {
                        entry.ctx.set_lease_deadline(deadline);
                    }
                    Ok(())
                } else {
                    self.lose_lease(&key, &format!("progress refused ({}): {}", status.as_str_name(), a.message));
                    Err(LeaseLost { job_id: key.0.clone(), fencing_token: key.1 })
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Pending::Result { kind, .. } => {
                let entry = self.jobs.remove(&key);
                self.recent.insert(key.clone());
                let stats = &self.shared.stats;
                match status {
                    AckStatus::Accepted => match kind {
                        ResultKind::Complete => Stats::incr(&stats.completed),
                        ResultKind::Fail => Stats::incr(&stats.failed),
                        ResultKind::Release => Stats::incr(&stats.released),
                    },
                    AckStatus::StaleLease => {
                        Stats::incr(&stats.stale_results);
                        if let Some(entry) = &entry
                            && entry.ctx.mark_lease_lost()
                        {
                            Stats::incr(&stats.lease_lost);
                        }
                        match entry.as_ref().and_then(|e| e.revoked.as_deref()) {
                            Some(reason) => tracing::info!(
                                job_id = %key.0, fencing_token = key.1, revoke_reason = reason,
                                "result of a revoked lease refused (STALE_LEASE); not retried"
                            ),
                            None => tracing::warn!(
                                job_id = %key.0, fencing_token = key.1, broker_message = %a.message,
                                "STALE_LEASE for job {} (fencing token {}): {STALE_CAUSE}", key.0, key.1
                            ),
                        }
                    }
                    AckStatus::UnknownJob | AckStatus::Unspecified => tracing::warn!(
                        job_id = %key.0, fencing_token = key.1, ?kind, ?status, broker_message = %a.message,
                        "broker does not know this job any more; result dropped"
                    ),
                }
            }
        }
    }

    fn revoke(&mut self, r: proto::Revoke) {
        let newest = if r.fencing_token == 0 { u64::MAX } else { r.fencing_token };
        let keys: Vec<JobKey> =
            self.jobs.range((r.job_id.clone(), 0)..=(r.job_id.clone(), newest)).map(|(k, _)| k.clone()).collect();
        if keys.is_empty() {
            tracing::debug!(job_id = %r.job_id, fencing_token = r.fencing_token, "revoke for a job not held ignored");
        }
        for key in keys {
            tracing::warn!(job_id = %key.0, fencing_token = key.1, reason = %r.reason,
                "lease revoked by the broker; a result of this attempt will be refused");
            if let Some(entry) = self.jobs.get_mut(&key) {
                entry.revoked = Some(r.reason.clone());
            }
            self.lose_lease(&key, &r.reason);
            if self.jobs.get(&key).is_some_and(|e| e.phase == Phase::Waiting) {
                // Not started, and the broker took it back: nothing to report.
                self.jobs.remove(&key);
                self.waiting.retain(|k| *k != key);
                self.recent.insert(key);
            }
        }
    }

    /// Last resort against a message the broker refuses each time it is
    /// resent (e.g. a broker with stricter limits than this SDK knows): drop
    /// everything unacknowledged rather than reconnect forever. The jobs
    /// whose results are dropped run again after their lease_timeout.
    fn drop_outbox(&mut self, status: &tonic::Status) {
        tracing::error!(
            code = ?status.code(), message = status.message(), unacknowledged = self.outbox.len(),
            "the broker keeps ending the stream over a message of this worker; dropping unacknowledged \
             results and progress (their jobs will run again after their lease_timeout)"
        );
        for (key, queue) in std::mem::take(&mut self.outbox) {
            for pending in queue {
                if let Pending::Progress { reply: Some(reply), .. } = pending {
                    let _ = reply.send(Err(LeaseLost { job_id: key.0.clone(), fencing_token: key.1 }));
                }
            }
            if self.jobs.get(&key).is_some_and(|e| e.phase == Phase::Reported) {
                self.jobs.remove(&key);
                self.recent.insert(key);
            }
        }
        self.invalid_streams = 0;
    }

    /// Fires the lease-lost signal and fails progress calls waiting on it.
    /// Their queue entries stay, so later acks still line up.
    fn lose_lease(&mut self, key: &JobKey, why: &str) {
        if let Some(entry) = self.jobs.get(key)
            && entry.ctx.mark_lease_lost()
        {
            Stats::incr(&self.shared.stats.lease_lost);
            tracing::info!(job_id = %key.0, fencing_token = key.1, why, "lease lost");
        }
        if let Some(queue) = self.outbox.get_mut(key) {
            for p in queue.iter_mut() {
                if let Pending::Progress { reply, .. } = p
                    && let Some(reply) = reply.take()
                {
                    let _ = reply.send(Err(LeaseLost { job_id: key.0.clone(), fencing_token: key.1 }));
                }
            }
        }
    }

    // ---- handlers --------------------------------------------------------

    fn start_waiting(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        while self.handlers.len() < self.cfg.concurrency as usize {
            let Some(key) = self.waiting.pop_front() else { break };
            let Some(entry) = self.jobs.get_mut(&key) else { continue };
            if entry.phase != Phase::Waiting {
                continue;
            }
            entry.phase = Phase::Running;
            let ctx = entry.ctx.clone();
            let handler = self.handler.clone();
            let span = tracing::info_span!("job", job_id = %key.0, queue = %ctx.queue(),
                attempt = ctx.attempt(), fencing_token = key.1);
            self.handlers.spawn(
                async move {
                    // Calling the handler inside the caught future also catches
                    // a panic before its first await.
                    let outcome = match AssertUnwindSafe(async move { handler(ctx).await }).catch_unwind().await {
                        Ok(Ok(result)) => Outcome::Done(result),
                        Ok(Err(e)) => Outcome::Error(e),
                        Err(panic) => Outcome::Panicked(panic_message(panic.as_ref())),
                    };
                    (key, outcome)
                }
                .instrument(span),
            );
        }
    }

    fn handler_done(&mut self, key: JobKey, outcome: Outcome) {
        let Some(entry) = self.jobs.get_mut(&key) else { return };
        entry.phase = Phase::Reported;
        let outcome = match outcome {
            Outcome::Done(result) if result.len() > MAX_RESULT_BYTES => {
                tracing::error!(job_id = %key.0, fencing_token = key.1, bytes = result.len(),
                    "result over the broker's limit; failing the job for good");
                Outcome::Error(JobError::Fatal(format!(
                    "result of {} bytes is over the broker's limit of {MAX_RESULT_BYTES} bytes",
                    result.len()
                )))
            }
            other => other,
        };
        let (kind, kind_msg) = match outcome {
            Outcome::Done(result) => (
                ResultKind::Complete,
                Kind::Complete(proto::Complete { job_id: key.0.clone(), fencing_token: key.1, result: result.into() }),
            ),
            Outcome::Error(e) => {
                tracing::debug!(job_id = %key.0, fencing_token = key.1, error = %e, "handler failed");
                (ResultKind::Fail, Kind::Fail(e.to_fail(&key.0, key.1)))
            }
            Outcome::Panicked(m) => {
                tracing::error!(job_id = %key.0, fencing_token = key.1, panic = %m, "handler panicked");
                let e = JobError::Failed(format!("handler panicked: {m}"));
                (ResultKind::Fail, Kind::Fail(e.to_fail(&key.0, key.1)))
            }
        };
        self.push(key, Pending::Result { kind, msg: message(kind_msg) });
        self.start_waiting();
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Progress { key, message, extend, reply } => {
                let live = self.jobs.get(&key).is_some_and(|e| e.phase == Phase::Running && !e.ctx.is_lease_lost());
                if !live {
                    let _ = reply.send(Err(LeaseLost { job_id: key.0, fencing_token: key.1 }));
                    return;
                }
                let msg = proto::Progress {
                    job_id: key.0.clone(),
                    fencing_token: key.1,
                    message,
                    // The broker refuses a zero extension (it would end the
                    // lease at once): zero means "no extension" here.
                    extend: extend.filter(|d| !d.is_zero()).map(|d| to_proto_duration(d.min(MAX_BROKER_DURATION))),
                };
                self.push(key, Pending::Progress { msg, reply: Some(reply) });
            }
        }
    }

    fn push(&mut self, key: JobKey, pending: Pending) {
        let msg = pending.message();
        self.outbox.entry(key).or_default().push_back(pending);
        self.send(msg);
    }

    fn publish_running(&self) {
        self.shared.stats.running.store(self.handlers.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    // ---- shutdown --------------------------------------------------------

    fn begin_stop(&mut self) {
        let now = Instant::now();
        let handler_deadline = now + self.cfg.shutdown_timeout;
        self.stopping = Some(Stopping { handler_deadline, ack_deadline: handler_deadline + ACK_GRACE });
        // Before the releases: the broker then assigns this session nothing
        // more, so a released job goes to another worker instead of coming
        // straight back here (to be released again, or counted as an
        // attempt at goodbye).
        self.send(message(Kind::Drain(proto::Drain {})));
        let unstarted: Vec<JobKey> = self.waiting.drain(..).collect();
        tracing::info!(running = self.handlers.len(), released = unstarted.len(), "shutting down");
        for key in unstarted {
            if let Some(entry) = self.jobs.get_mut(&key)
                && entry.phase == Phase::Waiting
            {
                entry.phase = Phase::Reported;
                let pending = release(&key);
                self.push(key, pending);
            }
        }
    }

    fn stop_timer(&self) -> Option<Instant> {
        let st = self.stopping.as_ref()?;
        if !self.handlers.is_empty() && Instant::now() < st.handler_deadline {
            Some(st.handler_deadline)
        } else {
            Some(st.ack_deadline)
        }
    }

    /// Advances a shutdown in progress; `true` once it is complete.
    async fn stop_check(&mut self) -> bool {
        let Some(st) = &self.stopping else { return false };
        let (handler_deadline, ack_deadline) = (st.handler_deadline, st.ack_deadline);
        let now = Instant::now();
        if !self.handlers.is_empty() && now >= handler_deadline {
            tracing::warn!(
                running = self.handlers.len(),
                "shutdown_timeout passed: dropping running handlers; their jobs go back to the queue"
            );
            self.handlers.shutdown().await;
            let dropped: Vec<JobKey> =
                self.jobs.iter().filter(|(_, e)| e.phase == Phase::Running).map(|(k, _)| k.clone()).collect();
            for key in dropped {
                self.jobs.remove(&key);
                self.outbox.remove(&key);
            }
            self.publish_running();
        }
        let idle = self.handlers.is_empty() && self.outbox.is_empty();
        if !idle && now < ack_deadline {
            return false;
        }
        if !idle {
            tracing::warn!(unacknowledged = self.outbox.len(), "gave up waiting for the broker to acknowledge results");
        }
        self.goodbye().await;
        true
    }

    async fn goodbye(&mut self) {
        if let Link::Up(mut conn) = std::mem::replace(&mut self.link, Link::Closed) {
            let _ = conn.tx.send(message(Kind::Goodbye(proto::Goodbye {})));
            drop(conn.tx);
            let linger = async { while let Ok(Some(_)) = conn.inbound.message().await {} };
            let _ = tokio::time::timeout(GOODBYE_LINGER, linger).await;
            tracing::info!("session closed with goodbye");
        }
        self.link = Link::Closed;
        self.shared.set_disconnected();
    }
}

impl Entry {
    fn new(ctx: JobContext, phase: Phase) -> Self {
        Entry { ctx, phase, revoked: None }
    }
}

impl Pending {
    fn message(&self) -> proto::WorkerMessage {
        match self {
            Pending::Progress { msg, .. } => message(Kind::Progress(msg.clone())),
            Pending::Result { msg, .. } => msg.clone(),
        }
    }
}

fn release(key: &JobKey) -> Pending {
    Pending::Result {
        kind: ResultKind::Release,
        msg: message(Kind::Release(proto::Release { job_id: key.0.clone(), fencing_token: key.1 })),
    }
}

/// Statuses that no amount of reconnecting will change.
fn is_fatal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::Unimplemented
    )
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

async fn next_link_event(link: &mut Link) -> Event {
    match link {
        Link::Down { retry_at } => {
            tokio::time::sleep_until(*retry_at).await;
            Event::RetryDue
        }
        Link::Connecting { fut, .. } => Event::Opened(fut.as_mut().await),
        Link::Up(conn) => tokio::select! {
            msg = conn.inbound.message() => Event::Inbound(msg),
            _ = conn.heartbeat.tick() => Event::Heartbeat,
        },
        Link::Closed => std::future::pending().await,
    }
}

/// A bounded set of recently finished leases.
#[derive(Default)]
struct RecentKeys {
    order: VecDeque<JobKey>,
    set: HashSet<JobKey>,
}

impl RecentKeys {
    fn insert(&mut self, key: JobKey) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > RECENT_KEYS
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, key: &JobKey) -> bool {
        self.set.contains(key)
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
