//! The worker protocol against a scripted in-process broker: every message
//! the SDK sends is checked, and every broker answer is chosen by the test.
//! (End-to-end tests against the real broker live in the `tests` crate.)

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gantry_worker::proto::{
    self, AckStatus, BrokerMessage, broker_message, jobs_server, worker_message::Kind, worker_server,
};
use gantry_worker::{Client, JobContext, JobError, Worker, WorkerHandle};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const STEP: Duration = Duration::from_secs(5);

type Outbound = mpsc::UnboundedSender<Result<BrokerMessage, Status>>;

struct FakeConn {
    inbound: Streaming<proto::WorkerMessage>,
    tx: Outbound,
}

#[derive(Clone)]
struct FakeWorkerSvc {
    conns: mpsc::UnboundedSender<FakeConn>,
    /// Statuses to refuse the next connects with, in order.
    rejects: Arc<Mutex<VecDeque<Status>>>,
}

#[tonic::async_trait]
impl worker_server::Worker for FakeWorkerSvc {
    type ConnectStream = UnboundedReceiverStream<Result<BrokerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<proto::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if let Some(status) = self.rejects.lock().unwrap().pop_front() {
            return Err(status);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.conns.send(FakeConn { inbound: request.into_inner(), tx });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct FakeBroker {
    addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<FakeConn>,
    rejects: Arc<Mutex<VecDeque<Status>>>,
}

async fn start_broker() -> FakeBroker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conns_tx, conns) = mpsc::unbounded_channel();
    let rejects = Arc::new(Mutex::new(VecDeque::new()));
    let svc = FakeWorkerSvc { conns: conns_tx, rejects: rejects.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(worker_server::WorkerServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    FakeBroker { addr, conns, rejects }
}

impl FakeBroker {
    async fn accept(&mut self) -> FakeConn {
        tokio::time::timeout(STEP, self.conns.recv()).await.expect("worker connected in time").expect("server alive")
    }
}

impl FakeConn {
    /// The next message that is not a heartbeat.
    async fn recv(&mut self) -> Kind {
        loop {
            match self.recv_raw().await {
                Kind::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }

    async fn recv_raw(&mut self) -> Kind {
        let msg = tokio::time::timeout(STEP, self.inbound.message())
            .await
            .expect("worker sent a message in time")
            .expect("stream ok")
            .expect("stream open");
        msg.kind.expect("message has a kind")
    }

    async fn hello(&mut self) -> proto::Hello {
        match self.recv_raw().await {
            Kind::Hello(h) => h,
            other => panic!("expected hello, got {other:?}"),
        }
    }

    fn send(&self, kind: broker_message::Kind) {
        self.tx.send(Ok(BrokerMessage { kind: Some(kind) })).expect("worker stream open");
    }

    fn welcome(&self, session_id: &str, resumed: bool) {
        self.send(broker_message::Kind::Welcome(proto::Welcome {
            session_id: session_id.into(),
            heartbeat_interval: Some(prost_duration(Duration::from_millis(50))),
            session_ttl: Some(prost_duration(Duration::from_secs(1))),
            node_id: 1,
            resumed,
        }));
    }

    fn assign(&self, job_id: &str, token: u64, payload: &[u8]) {
        self.send(broker_message::Kind::Assign(proto::Assign {
            job: Some(proto::Job {
                id: job_id.into(),
                queue: "q".into(),
                payload: payload.to_vec(),
                attempt: 1,
                ..Default::default()
            }),
            fencing_token: token,
            attempt: 1,
            lease_deadline: None,
        }));
    }

    fn ack(&self, job_id: &str, token: u64, status: AckStatus) {
        self.send(broker_message::Kind::Ack(proto::Ack {
            job_id: job_id.into(),
            fencing_token: token,
            status: status as i32,
            message: String::new(),
            lease_deadline: None,
        }));
    }
}

fn prost_duration(d: Duration) -> gantry_worker::prost_types::Duration {
    gantry_worker::prost_types::Duration::try_from(d).unwrap()
}

fn worker(addr: SocketAddr, concurrency: u32) -> Worker {
    Worker::builder([addr.to_string()])
        .queue("q")
        .worker_id("test-worker")
        .concurrency(concurrency)
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .shutdown_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

async fn echo(ctx: JobContext) -> Result<Bytes, JobError> {
    Ok(ctx.payload().clone())
}

/// Runs `worker` with `handler` until the returned sender fires or is dropped.
fn spawn_worker<H, Fut>(
    worker: Worker,
    handler: H,
) -> (WorkerHandle, oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), gantry_worker::Error>>)
where
    H: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Bytes, JobError>> + Send + 'static,
{
    let handle = worker.handle();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(handler, async move {
        let _ = stop_rx.await;
    }));
    (handle, stop_tx, task)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn hello_welcome_assign_complete_ack() {
    let mut broker = start_broker().await;
    let (handle, stop, task) = spawn_worker(worker(broker.addr, 4), echo);
    let mut conn = broker.accept().await;
    let hello = conn.hello().await;
    assert_eq!(hello.worker_id, "test-worker");
    assert_eq!(hello.queues, vec!["q"]);
    assert_eq!(hello.max_in_flight, 4);
    assert_eq!(hello.resume_session_id, "");
    conn.welcome("s1", false);
    assert_eq!(handle.wait_connected().await, "s1");

    // Heartbeats flow at the welcomed interval.
    assert!(matches!(conn.recv_raw().await, Kind::Heartbeat(_)));

    conn.assign("j1", 10, b"hello");
    match conn.recv().await {
        Kind::Complete(c) => {
            assert_eq!((c.job_id.as_str(), c.fencing_token), ("j1", 10));
            assert_eq!(c.result, b"hello");
        }
        other => panic!("expected complete, got {other:?}"),
    }
    // The same assign again (a resumed session re-sends them): ignored.
    conn.assign("j1", 10, b"hello");
    conn.ack("j1", 10, AckStatus::Accepted);
    eventually("completed count", || handle.stats().completed == 1).await;

    stop.send(()).unwrap();
    assert!(matches!(conn.recv().await, Kind::Drain(_)));
    assert!(matches!(conn.recv().await, Kind::Goodbye(_)));
    drop(conn);
    task.await.unwrap().unwrap();
    assert_eq!(handle.stats().completed, 1);
    assert!(!handle.is_connected());
}

#[tokio::test]
async fn job_errors_map_to_fail_messages() {
    let mut broker = start_broker().await;
    let handler = |ctx: JobContext| async move {
        match ctx.payload().as_ref() {
            b"retry" => Err(JobError::retry_after(Duration::from_secs(7))),
            b"fatal" => Err(JobError::fatal("bad input")),
            b"panic" => panic!("boom"),
            _ => Err(JobError::failed("flaky")),
        }
    };
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 4), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    for (i, payload) in [&b"retry"[..], b"fatal", b"other", b"panic"].into_iter().enumerate() {
        let id = format!("j{i}");
        conn.assign(&id, 100 + i as u64, payload);
        let Kind::Fail(f) = conn.recv().await else { panic!("expected fail") };
        assert_eq!(f.job_id, id);
        match payload {
            b"retry" => assert_eq!(f.retry_after.map(|d| d.seconds), Some(7)),
            b"fatal" => assert!(f.no_retry && f.error == "bad input"),
            b"panic" => assert!(f.error.contains("boom") && !f.no_retry && f.retry_after.is_none()),
            _ => assert!(!f.no_retry && f.retry_after.is_none() && f.error == "flaky"),
        }
        conn.ack(&id, 100 + i as u64, AckStatus::Accepted);
    }
    eventually("failed count", || handle.stats().failed == 4).await;
}

#[tokio::test]
async fn results_are_resent_after_a_broken_stream_and_the_session_resumed() {
    let mut broker = start_broker().await;
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 2), echo);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j1", 5, b"x");
    assert!(matches!(conn.recv().await, Kind::Complete(_)));
    // The stream dies before the ack.
    drop(conn);

    let mut conn = broker.accept().await;
    let hello = conn.hello().await;
    assert_eq!(hello.resume_session_id, "s1");
    conn.welcome("s1", true);
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!((c.job_id.as_str(), c.fencing_token), ("j1", 5)),
        other => panic!("expected the complete again, got {other:?}"),
    }
    // The resumed session re-sends the assign: must not run again.
    conn.assign("j1", 5, b"x");
    conn.ack("j1", 5, AckStatus::Accepted);
    eventually("completed", || handle.stats().completed == 1).await;
    conn.assign("j2", 6, b"y");
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!(c.job_id, "j2", "j1 ran twice"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(handle.stats().lease_lost, 0);
    assert_eq!(handle.stats().sessions, 2);
}

#[tokio::test]
async fn stale_lease_fires_lease_lost_and_is_not_retried() {
    let mut broker = start_broker().await;
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let handler = move |ctx: JobContext| {
        let lost_tx = lost_tx.clone();
        async move {
            let watcher = ctx.clone();
            tokio::spawn(async move {
                watcher.lease_lost().await;
                let _ = lost_tx.send(watcher.job_id().to_owned());
            });
            Ok(Bytes::from_static(b"late"))
        }
    };
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 2), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j1", 9, b"");
    assert!(matches!(conn.recv().await, Kind::Complete(_)));
    conn.ack("j1", 9, AckStatus::StaleLease);
    let lost = tokio::time::timeout(STEP, lost_rx.recv()).await.unwrap();
    assert_eq!(lost.as_deref(), Some("j1"));
    eventually("stale counted", || handle.stats().stale_results == 1).await;
    assert_eq!(handle.stats().lease_lost, 1);
    assert_eq!(handle.stats().completed, 0);

    // Break the stream: the refused result must not come back.
    drop(conn);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", true);
    conn.assign("j2", 10, b"");
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!(c.job_id, "j2", "stale result was retried"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn revoke_and_progress() {
    let mut broker = start_broker().await;
    let handler = |ctx: JobContext| async move {
        ctx.progress("started", Some(Duration::from_secs(30))).await.map_err(|e| JobError::failed(e.to_string()))?;
        ctx.lease_lost().await;
        // Progress after the lease is gone is refused locally.
        assert!(ctx.progress("still here?", None).await.is_err());
        Err(JobError::failed("lease lost"))
    };
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 2), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j1", 3, b"");
    match conn.recv().await {
        Kind::Progress(p) => {
            assert_eq!((p.job_id.as_str(), p.fencing_token, p.message.as_str()), ("j1", 3, "started"));
            assert_eq!(p.extend.map(|d| d.seconds), Some(30));
        }
        other => panic!("expected progress, got {other:?}"),
    }
    conn.ack("j1", 3, AckStatus::Accepted);
    conn.send(broker_message::Kind::Revoke(proto::Revoke {
        job_id: "j1".into(),
        fencing_token: 3,
        reason: "cancelled".into(),
    }));
    // The handler returns once lease_lost fires; its result is still sent
    // for the broker to refuse.
    assert!(matches!(conn.recv().await, Kind::Fail(_)));
    conn.ack("j1", 3, AckStatus::StaleLease);
    eventually("lease lost", || handle.stats().stale_results == 1).await;
    assert_eq!(handle.stats().lease_lost, 1);
}

#[tokio::test]
async fn paused_heartbeats_stop_but_results_flow() {
    let mut broker = start_broker().await;
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let handler = move |_ctx: JobContext| {
        let go_rx = go_rx.clone();
        async move {
            go_rx.lock().await.recv().await;
            Ok(Bytes::from_static(b"done"))
        }
    };
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 1), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j1", 1, b"");
    assert!(matches!(conn.recv_raw().await, Kind::Heartbeat(_)));
    handle.pause_heartbeats(true);
    // Drain a heartbeat that may already be queued, then expect silence.
    let _ = tokio::time::timeout(Duration::from_millis(100), conn.recv_raw()).await;
    let silent = tokio::time::timeout(Duration::from_millis(300), conn.recv_raw()).await;
    assert!(silent.is_err(), "worker sent {silent:?} while paused");
    go_tx.send(()).unwrap();
    assert!(matches!(conn.recv_raw().await, Kind::Complete(_)), "results are sent while paused");
    handle.pause_heartbeats(false);
    assert!(matches!(conn.recv_raw().await, Kind::Heartbeat(_)));
}

#[tokio::test]
async fn graceful_shutdown_releases_unstarted_work_and_finishes_running_jobs() {
    let mut broker = start_broker().await;
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let handler = move |_ctx: JobContext| {
        let go_rx = go_rx.clone();
        async move {
            go_rx.lock().await.recv().await;
            Ok(Bytes::from_static(b"done"))
        }
    };
    let (handle, stop, task) = spawn_worker(worker(broker.addr, 1), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("running", 1, b"");
    conn.assign("queued", 2, b""); // concurrency 1: waits
    eventually("one handler running", || handle.stats().running == 1).await;
    stop.send(()).unwrap();
    assert!(matches!(conn.recv().await, Kind::Drain(_)), "drain first, so released jobs are not pushed back");
    match conn.recv().await {
        Kind::Release(r) => assert_eq!((r.job_id.as_str(), r.fencing_token), ("queued", 2)),
        other => panic!("expected release of the queued job, got {other:?}"),
    }
    conn.ack("queued", 2, AckStatus::Accepted);
    conn.assign("late", 3, b"");
    match conn.recv().await {
        Kind::Release(r) => assert_eq!(r.job_id, "late"),
        other => panic!("expected release of the late job, got {other:?}"),
    }
    conn.ack("late", 3, AckStatus::Accepted);
    go_tx.send(()).unwrap();
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!(c.job_id, "running"),
        other => panic!("expected the running job's result, got {other:?}"),
    }
    conn.ack("running", 1, AckStatus::Accepted);
    assert!(matches!(conn.recv().await, Kind::Goodbye(_)));
    drop(conn);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap().unwrap();
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.released), (1, 2));
}

/// A stream that breaks while the worker drains: the resumed session asks
/// for no jobs again (its hello reset max_in_flight on the broker).
#[tokio::test]
async fn a_session_resumed_while_stopping_drains_again() {
    let mut broker = start_broker().await;
    let (go_tx, go_rx) = mpsc::unbounded_channel::<()>();
    let go_rx = Arc::new(tokio::sync::Mutex::new(go_rx));
    let handler = move |_ctx: JobContext| {
        let go_rx = go_rx.clone();
        async move {
            go_rx.lock().await.recv().await;
            Ok(Bytes::from_static(b"done"))
        }
    };
    let (handle, stop, task) = spawn_worker(worker(broker.addr, 1), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("running", 1, b"");
    eventually("the handler runs", || handle.stats().running == 1).await;
    stop.send(()).unwrap();
    assert!(matches!(conn.recv().await, Kind::Drain(_)));
    drop(conn);
    let mut conn = broker.accept().await;
    assert_eq!(conn.hello().await.resume_session_id, "s1");
    conn.welcome("s1", true);
    assert!(matches!(conn.recv().await, Kind::Drain(_)), "the resumed session must drain again");
    go_tx.send(()).unwrap();
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!(c.job_id, "running"),
        other => panic!("expected the running job's result, got {other:?}"),
    }
    conn.ack("running", 1, AckStatus::Accepted);
    assert!(matches!(conn.recv().await, Kind::Goodbye(_)));
    drop(conn);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_timeout_drops_stuck_handlers() {
    let mut broker = start_broker().await;
    let w = Worker::builder([broker.addr.to_string()])
        .queue("q")
        .shutdown_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (_handle, stop, task) = spawn_worker(w, |_ctx| async {
        std::future::pending::<()>().await;
        Ok(Bytes::new())
    });
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("stuck", 1, b"");
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    assert!(matches!(conn.recv().await, Kind::Drain(_)));
    assert!(matches!(conn.recv().await, Kind::Goodbye(_)));
    drop(conn);
    tokio::time::timeout(STEP, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn expired_session_loses_running_leases() {
    let mut broker = start_broker().await;
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let handler = move |ctx: JobContext| {
        let lost_tx = lost_tx.clone();
        async move {
            ctx.lease_lost().await;
            let _ = lost_tx.send(ctx.job_id().to_owned());
            Err(JobError::failed("lost"))
        }
    };
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 2), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j1", 1, b"");
    eventually("running", || handle.stats().running == 1).await;
    drop(conn);
    let mut conn = broker.accept().await;
    assert_eq!(conn.hello().await.resume_session_id, "s1");
    conn.welcome("s2", false); // s1 expired meanwhile
    let lost = tokio::time::timeout(STEP, lost_rx.recv()).await.unwrap();
    assert_eq!(lost.as_deref(), Some("j1"));
    assert_eq!(handle.session_id().as_deref(), Some("s2"));
    // The late result still goes to the broker, which judges it.
    assert!(matches!(conn.recv().await, Kind::Fail(_)));
}

#[tokio::test]
async fn redirect_and_leader_hint_are_followed() {
    let mut first = start_broker().await;
    let mut second = start_broker().await;
    let mut third = start_broker().await;
    let (handle, _stop, _task) = spawn_worker(worker(first.addr, 1), echo);

    // First node: redirect to the second.
    let mut conn = first.accept().await;
    conn.hello().await;
    conn.send(broker_message::Kind::Redirect(proto::Redirect { leader_address: second.addr.to_string() }));
    let mut conn2 = second.accept().await;
    conn2.hello().await;
    conn2.welcome("s1", false);
    assert_eq!(handle.wait_connected().await, "s1");

    // Second node goes away naming the third as leader.
    let mut status = Status::unavailable("not leader");
    status.metadata_mut().insert("gantry-leader", third.addr.to_string().parse().unwrap());
    second.rejects.lock().unwrap().push_back(status.clone());
    conn2.tx.send(Err(status)).unwrap();
    drop(conn2);
    let mut conn3 = third.accept().await;
    assert_eq!(conn3.hello().await.resume_session_id, "s1");
    conn3.welcome("s1", true);
    conn3.assign("j", 1, b"z");
    assert!(matches!(conn3.recv().await, Kind::Complete(_)));
    drop(conn);
}

#[tokio::test]
async fn fatal_status_ends_run() {
    let mut broker = start_broker().await;
    broker.rejects.lock().unwrap().push_back(Status::invalid_argument("queues: bad name"));
    let (_handle, _stop, task) = spawn_worker(worker(broker.addr, 1), echo);
    let err = tokio::time::timeout(STEP, task).await.unwrap().unwrap().expect_err("refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(broker.conns.try_recv().is_err());
}

// ---- client ---------------------------------------------------------------

#[derive(Clone)]
struct FakeJobs {
    /// When set, answer UNAVAILABLE naming this leader.
    redirect_to: Option<String>,
    calls: Arc<Mutex<Vec<String>>>,
    name: &'static str,
}

#[tonic::async_trait]
impl jobs_server::Jobs for FakeJobs {
    async fn enqueue(&self, r: Request<proto::EnqueueRequest>) -> Result<Response<proto::EnqueueResponse>, Status> {
        self.calls.lock().unwrap().push(format!("{}:enqueue", self.name));
        if let Some(leader) = &self.redirect_to {
            let mut st = Status::unavailable("not the leader");
            st.metadata_mut().insert("gantry-leader", leader.parse().unwrap());
            return Err(st);
        }
        let r = r.into_inner();
        Ok(Response::new(proto::EnqueueResponse {
            job_id: format!("{}-{}", r.queue, r.idempotency_key),
            created: true,
            state: proto::JobState::Ready as i32,
        }))
    }
    async fn enqueue_batch(
        &self,
        _r: Request<proto::EnqueueBatchRequest>,
    ) -> Result<Response<proto::EnqueueBatchResponse>, Status> {
        Err(Status::unimplemented("batch"))
    }
    async fn get_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        self.calls.lock().unwrap().push(format!("{}:get", self.name));
        Err(Status::not_found(r.into_inner().job_id))
    }
    async fn wait_job(&self, _r: Request<proto::WaitJobRequest>) -> Result<Response<proto::Job>, Status> {
        Err(Status::unimplemented("wait"))
    }
    async fn cancel_job(&self, _r: Request<proto::CancelJobRequest>) -> Result<Response<proto::Job>, Status> {
        Err(Status::unimplemented("cancel"))
    }
}

async fn start_jobs(svc: FakeJobs) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(jobs_server::JobsServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test]
async fn client_follows_leader_hints_and_returns_other_statuses() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let leader = start_jobs(FakeJobs { redirect_to: None, calls: calls.clone(), name: "leader" }).await;
    let follower =
        start_jobs(FakeJobs { redirect_to: Some(leader.to_string()), calls: calls.clone(), name: "follower" }).await;
    let client = Client::connect([follower.to_string()]).await.unwrap();
    let e = client.enqueue("q", "p").idempotency_key("k").send().await.unwrap();
    assert_eq!(e.job_id, "q-k");
    assert!(e.created);
    assert_eq!(*calls.lock().unwrap(), vec!["follower:enqueue", "leader:enqueue"]);

    let err = client.get("nope").await.expect_err("not found");
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
}

#[tokio::test]
async fn oversized_results_fail_for_good_instead_of_poisoning_the_stream() {
    let mut broker = start_broker().await;
    let handler = |_ctx: JobContext| async move { Ok(Bytes::from(vec![0u8; 1024 * 1024 + 1])) };
    let (_handle, _stop, _task) = spawn_worker(worker(broker.addr, 1), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("big", 1, b"");
    match conn.recv().await {
        Kind::Fail(f) => assert!(f.no_retry && f.error.contains("over the broker's limit"), "{f:?}"),
        other => panic!("expected fail, got {other:?}"),
    }
}

#[tokio::test]
async fn zero_extension_is_sent_as_none() {
    let mut broker = start_broker().await;
    let handler = |ctx: JobContext| async move {
        let _ = ctx.progress("tick", Some(Duration::ZERO)).await;
        Ok(Bytes::new())
    };
    let (_handle, _stop, _task) = spawn_worker(worker(broker.addr, 1), handler);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("j", 1, b"");
    match conn.recv().await {
        Kind::Progress(p) => assert!(p.extend.is_none()),
        other => panic!("expected progress, got {other:?}"),
    }
}

#[tokio::test]
async fn a_message_refused_on_every_stream_is_eventually_dropped() {
    let mut broker = start_broker().await;
    let (handle, _stop, _task) = spawn_worker(worker(broker.addr, 1), echo);
    let mut conn = broker.accept().await;
    conn.hello().await;
    conn.welcome("s1", false);
    conn.assign("poison", 1, b"x");
    for _ in 0..3 {
        assert!(matches!(conn.recv().await, Kind::Complete(_)));
        conn.tx.send(Err(Status::invalid_argument("result: refused"))).unwrap();
        drop(conn);
        conn = broker.accept().await;
        conn.hello().await;
        conn.welcome("s1", true);
    }
    // Dropped after the third refusal: the new stream only carries new work.
    conn.assign("next", 2, b"y");
    match conn.recv().await {
        Kind::Complete(c) => assert_eq!(c.job_id, "next"),
        other => panic!("unexpected {other:?}"),
    }
    conn.ack("next", 2, AckStatus::Accepted);
    eventually("next completed", || handle.stats().completed == 1).await;
}
