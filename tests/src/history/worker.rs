//! A worker that speaks `gantry.v1.Worker/Connect` itself, so that a test
//! sees everything: each `welcome` (new or resumed session), each `assign`
//! with its session, each `ack` with the result it answers, each `revoke`.
//! It does what the protocol asks of a worker (DESIGN §4) and no more:
//! heartbeats, reconnects to the next node (or the one a `redirect` or a
//! `gantry-leader` hint names), resumes its session, and sends unanswered
//! results again on the new stream.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use gantry_proto::v1::{
    self as proto, broker_message::Kind as Out, worker_client::WorkerClient, worker_message::Kind as In,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Streaming, transport::Channel};

use super::{Ack, Event, History, ResultKind};

/// What a handler decides for one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Complete(Vec<u8>),
    /// Fail; with `retry_after` the job runs again no sooner than that.
    Fail {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Fail for good.
    FailFinal(String),
    /// Hand the job back unstarted.
    Release,
    /// Send nothing (a handler that never finishes, or forgets).
    Abandon,
}

type Handler = Arc<dyn Fn(proto::Assign) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;
type Lease = (String, u64);

/// How long opening a stream (hello to welcome) may take before the next
/// node is tried: a stopped node accepts TCP but never answers.
const OPEN_TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);

struct Shared {
    paused: AtomicBool,
    session: tokio::sync::watch::Sender<Option<String>>,
    /// Handlers running plus results not answered yet.
    outstanding: AtomicUsize,
}

/// A recording worker running in a task of the test; dropping it is a
/// crash (no goodbye, no release).
pub struct RecordingWorker {
    pub name: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingWorker {
    /// Connects to `endpoints` (tried in turn; `host:port`), takes jobs
    /// from `queue` (several: comma-separated), at most `max_in_flight` at
    /// once, and runs `handler` for each lease.
    pub fn spawn<F, Fut>(
        history: &History,
        name: &str,
        endpoints: &[String],
        queue: &str,
        max_in_flight: u32,
        handler: F,
    ) -> Self
    where
        F: Fn(proto::Assign) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        assert!(!endpoints.is_empty(), "a worker needs an endpoint");
        let shared = Arc::new(Shared {
            paused: AtomicBool::new(false),
            session: tokio::sync::watch::Sender::new(None),
            outstanding: AtomicUsize::new(0),
        });
        let handler: Handler = Arc::new(move |assign| Box::pin(handler(assign)));
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let runner = Runner {
            name: name.to_owned(),
            queue: queue.to_owned(),
            max_in_flight,
            endpoints: endpoints.iter().map(|e| with_scheme(e)).collect(),
            channels: BTreeMap::new(),
            next: 0,
            hint: None,
            session: None,
            history: history.clone(),
            shared: shared.clone(),
            handler,
            handlers: JoinSet::new(),
            done_tx,
            done_rx,
            leases: BTreeSet::new(),
            outbox: BTreeMap::new(),
            sent: BTreeMap::new(),
        };
        let task = tokio::spawn(runner.run());
        RecordingWorker { name: name.to_owned(), shared, task }
    }

    /// Waits (bounded) until a session is up; returns its id.
    pub async fn wait_connected(&self) -> String {
        let mut rx = self.shared.session.subscribe();
        let wait = rx.wait_for(Option::is_some);
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(Ok(session)) => session.clone().unwrap_or_default(),
            _ => panic!("worker {} did not connect within 30s", self.name),
        }
    }

    /// The session of the open stream, if one is open.
    pub fn session(&self) -> Option<String> {
        self.shared.session.borrow().clone()
    }

    /// While paused, no heartbeats go out (results still do): the worker
    /// only looks dead.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Relaxed);
    }

    /// No handler running and every result answered.
    pub fn is_idle(&self) -> bool {
        self.shared.outstanding.load(Ordering::Relaxed) == 0
    }

    /// Like a killed process: the stream drops, handlers stop.
    pub fn kill(self) {}
}

impl Drop for RecordingWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Runner {
    name: String,
    queue: String,
    max_in_flight: u32,
    endpoints: Vec<String>,
    channels: BTreeMap<String, Channel>,
    next: usize,
    hint: Option<String>,
    session: Option<String>,
    history: History,
    shared: Arc<Shared>,
    handler: Handler,
    handlers: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<(Lease, Outcome)>,
    done_rx: mpsc::UnboundedReceiver<(Lease, Outcome)>,
    /// Every lease ever received (a resumed session gets them again).
    leases: BTreeSet<Lease>,
    /// Results not answered yet, sent again on every new stream.
    outbox: BTreeMap<Lease, proto::WorkerMessage>,
    sent: BTreeMap<Lease, ResultKind>,
}

/// A stream with its welcome (boxed: much larger than a redirect).
type Stream = Box<(mpsc::UnboundedSender<proto::WorkerMessage>, Streaming<proto::BrokerMessage>, proto::Welcome)>;

enum Opened {
    Welcome(Stream),
    Redirect(String),
}

fn with_scheme(address: &str) -> String {
    if address.contains("://") { address.to_owned() } else { format!("http://{address}") }
}

fn message(kind: In) -> proto::WorkerMessage {
    proto::WorkerMessage { kind: Some(kind) }
}

fn leader_hint(status: &tonic::Status) -> Option<String> {
    let hint = status.metadata().get("gantry-leader")?.to_str().ok()?;
    (!hint.is_empty()).then(|| with_scheme(hint))
}

impl Runner {
    async fn run(mut self) {
        loop {
            let (target, hinted) = match self.hint.take() {
                Some(hint) => (hint, true),
                None => (self.endpoints[self.next % self.endpoints.len()].clone(), false),
            };
            let hello = proto::Hello {
                worker_id: self.name.clone(),
                queues: self.queue.split(',').map(str::to_owned).collect(),
                max_in_flight: self.max_in_flight,
                resume_session_id: self.session.clone().unwrap_or_default(),
            };
            let channel = self.channel(&target);
            match tokio::time::timeout(OPEN_TIMEOUT, open(channel, hello)).await {
                Ok(Ok(Opened::Welcome(stream))) => {
                    let (tx, inbound, welcome) = *stream;
                    self.serve(tx, inbound, welcome).await;
                    // Broken without a hint where to go: that node may be
                    // dead or frozen, try the next one first.
                    if self.hint.is_none() && !hinted {
                        self.next += 1;
                    }
                }
                Ok(Ok(Opened::Redirect(leader))) => self.hint = Some(with_scheme(&leader)),
                Ok(Err(status)) => {
                    self.history.note(format!(
                        "{}: cannot open a session at {target}: {:?} {}",
                        self.name,
                        status.code(),
                        status.message()
                    ));
                    self.hint = leader_hint(&status).filter(|h| *h != target);
                    if !hinted {
                        self.next += 1;
                    }
                }
                Err(_) => {
                    self.history.note(format!("{}: no welcome from {target} within {OPEN_TIMEOUT:?}", self.name));
                    if !hinted {
                        self.next += 1;
                    }
                }
            }
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }

    fn channel(&mut self, target: &str) -> Channel {
        self.channels
            .entry(target.to_owned())
            .or_insert_with(|| {
                tonic::transport::Endpoint::from_shared(target.to_owned())
                    .expect("endpoint")
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    // A stopped node must not hold the stream forever.
                    .http2_keep_alive_interval(Duration::from_millis(300))
                    .keep_alive_timeout(Duration::from_secs(1))
                    .keep_alive_while_idle(true)
                    .connect_lazy()
            })
            .clone()
    }

    async fn serve(
        &mut self,
        tx: mpsc::UnboundedSender<proto::WorkerMessage>,
        mut inbound: Streaming<proto::BrokerMessage>,
        welcome: proto::Welcome,
    ) {
        self.history.record(Event::SessionStarted {
            worker: self.name.clone(),
            session: welcome.session_id.clone(),
            resumed: welcome.resumed,
            node_id: welcome.node_id,
        });
        if let Some(old) = self.session.take()
            && (old != welcome.session_id || !welcome.resumed)
        {
            self.history.record(Event::SessionLost {
                worker: self.name.clone(),
                session: old,
                replaced_by: welcome.session_id.clone(),
            });
        }
        let session = welcome.session_id.clone();
        self.session = Some(session.clone());
        self.shared.session.send_replace(Some(session.clone()));
        for msg in self.outbox.values() {
            let _ = tx.send(msg.clone());
        }
        let period = welcome
            .heartbeat_interval
            .map(|d| Duration::new(d.seconds as u64, d.nanos as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = inbound.message() => match received {
                    Ok(Some(msg)) => match msg.kind {
                        Some(Out::Assign(assign)) => self.assigned(&session, assign),
                        Some(Out::Ack(ack)) => self.acked(ack),
                        Some(Out::Revoke(revoke)) => self.history.record(Event::Revoked {
                            worker: self.name.clone(),
                            session: session.clone(),
                            job_id: revoke.job_id,
                            token: revoke.fencing_token,
                            reason: revoke.reason,
                        }),
                        Some(Out::Redirect(redirect)) => {
                            self.hint = Some(with_scheme(&redirect.leader_address));
                            break;
                        }
                        Some(Out::Welcome(_)) | None => {}
                    },
                    Ok(None) => {
                        self.history.note(format!("{}: the broker ended the stream", self.name));
                        break;
                    }
                    Err(status) => {
                        self.history.note(format!(
                            "{}: stream broke: {:?} {}",
                            self.name,
                            status.code(),
                            status.message()
                        ));
                        self.hint = leader_hint(&status);
                        break;
                    }
                },
                _ = heartbeat.tick() => {
                    if !self.shared.paused.load(Ordering::Relaxed) {
                        let _ = tx.send(message(In::Heartbeat(proto::Heartbeat {})));
                    }
                }
                Some((lease, outcome)) = self.done_rx.recv() => self.finished(&tx, lease, outcome),
            }
        }
        self.shared.session.send_replace(None);
    }

    fn assigned(&mut self, session: &str, assign: proto::Assign) {
        let Some(job) = &assign.job else { return };
        let lease: Lease = (job.id.clone(), assign.fencing_token);
        if !self.leases.insert(lease.clone()) {
            return; // sent again to a resumed session
        }
        self.history.record(Event::Assigned {
            worker: self.name.clone(),
            session: session.to_owned(),
            job_id: lease.0.clone(),
            token: lease.1,
            attempt: assign.attempt,
        });
        self.shared.outstanding.fetch_add(1, Ordering::Relaxed);
        let (handler, done) = (self.handler.clone(), self.done_tx.clone());
        self.handlers.spawn(async move {
            let outcome = handler(assign).await;
            let _ = done.send((lease, outcome));
        });
    }

    fn finished(&mut self, tx: &mpsc::UnboundedSender<proto::WorkerMessage>, lease: Lease, outcome: Outcome) {
        while self.handlers.try_join_next().is_some() {}
        let (job_id, fencing_token) = lease.clone();
        let (kind, msg) = match outcome {
            Outcome::Abandon => {
                self.shared.outstanding.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Outcome::Complete(result) => {
                (ResultKind::Complete, In::Complete(proto::Complete { job_id, fencing_token, result }))
            }
            Outcome::Fail { error, retry_after } => (
                ResultKind::Fail,
                In::Fail(proto::Fail {
                    job_id,
                    fencing_token,
                    error,
                    retry_after: retry_after
                        .map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }),
                    no_retry: false,
                }),
            ),
            Outcome::FailFinal(error) => (
                ResultKind::FailFinal,
                In::Fail(proto::Fail { job_id, fencing_token, error, retry_after: None, no_retry: true }),
            ),
            Outcome::Release => (ResultKind::Release, In::Release(proto::Release { job_id, fencing_token })),
        };
        let msg = message(msg);
        let _ = tx.send(msg.clone());
        self.outbox.insert(lease.clone(), msg);
        self.sent.insert(lease, kind);
    }

    fn acked(&mut self, ack: proto::Ack) {
        let lease: Lease = (ack.job_id.clone(), ack.fencing_token);
        let Some(kind) = self.sent.get(&lease).copied() else { return };
        if self.outbox.remove(&lease).is_some() {
            self.shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        self.history.record(Event::Result {
            worker: self.name.clone(),
            job_id: ack.job_id.clone(),
            token: ack.fencing_token,
            kind,
            ack: Ack::from_proto(ack.status()),
        });
    }
}

async fn open(channel: Channel, hello: proto::Hello) -> Result<Opened, tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(message(In::Hello(hello)));
    let mut inbound = WorkerClient::new(channel).connect(UnboundedReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(proto::BrokerMessage { kind: Some(Out::Welcome(welcome)) }) => {
            Ok(Opened::Welcome(Box::new((tx, inbound, welcome))))
        }
        Some(proto::BrokerMessage { kind: Some(Out::Redirect(redirect)) }) => {
            Ok(Opened::Redirect(redirect.leader_address))
        }
        other => Err(tonic::Status::internal(format!("expected welcome first, got {other:?}"))),
    }
}
