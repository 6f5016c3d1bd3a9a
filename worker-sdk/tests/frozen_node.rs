//! The client against a node that freezes (what SIGSTOP does to a broker):
//! its connections stay open and take bytes, nothing comes back, not even
//! HTTP/2 pings. Each node is a fake `Jobs` service; the one that freezes
//! sits behind a TCP proxy that stops forwarding when told.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_worker::Client;
use gantry_worker::proto::{self, jobs_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, tcp};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Bounds each call, so a client that hangs fails the test instead of
/// holding it; never reached when the client works.
const HANG: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct FakeJobs {
    name: &'static str,
    /// What this node was asked: `enqueue:<key>`, `get`, `wait:<ms>`, `cancel`.
    calls: Arc<Mutex<Vec<String>>>,
}

impl FakeJobs {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// `error` names the node that answered.
    fn job(&self, id: &str, state: proto::JobState) -> proto::Job {
        proto::Job { id: id.to_owned(), state: state as i32, error: self.name.to_owned(), ..Default::default() }
    }
}

#[tonic::async_trait]
impl jobs_server::Jobs for FakeJobs {
    async fn enqueue(&self, r: Request<proto::EnqueueRequest>) -> Result<Response<proto::EnqueueResponse>, Status> {
        let r = r.into_inner();
        self.record(format!("enqueue:{}", r.idempotency_key));
        Ok(Response::new(proto::EnqueueResponse {
            job_id: format!("{}-{}", self.name, r.idempotency_key),
            created: true,
            state: proto::JobState::Ready as i32,
        }))
    }

    async fn enqueue_batch(
        &self,
        r: Request<proto::EnqueueBatchRequest>,
    ) -> Result<Response<proto::EnqueueBatchResponse>, Status> {
        let jobs = r.into_inner().jobs;
        self.record(format!("enqueue_batch:{}", jobs.len()));
        let results = jobs
            .iter()
            .map(|j| proto::EnqueueBatchResult {
                job_id: format!("{}-{}", self.name, j.idempotency_key),
                created: true,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(proto::EnqueueBatchResponse { results }))
    }

    async fn get_job(&self, r: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        self.record("get".to_owned());
        Ok(Response::new(self.job(&r.into_inner().job_id, proto::JobState::Active)))
    }

    /// Holds the call for its timeout, as the broker does for a job that
    /// does not finish.
    async fn wait_job(&self, r: Request<proto::WaitJobRequest>) -> Result<Response<proto::Job>, Status> {
        let r = r.into_inner();
        let timeout = r.timeout.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
        self.record(format!("wait:{}", timeout.as_millis()));
        if r.job_id == "0-done" {
            return Ok(Response::new(self.job(&r.job_id, proto::JobState::Succeeded)));
        }
        tokio::time::sleep(timeout).await;
        Ok(Response::new(self.job(&r.job_id, proto::JobState::Active)))
    }

    async fn cancel_job(&self, r: Request<proto::CancelJobRequest>) -> Result<Response<proto::Job>, Status> {
        self.record("cancel".to_owned());
        Ok(Response::new(self.job(&r.into_inner().job_id, proto::JobState::Cancelled)))
    }
}

async fn start_node(name: &'static str) -> (SocketAddr, FakeJobs) {
    let svc = FakeJobs { name, calls: Arc::default() };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(jobs_server::JobsServer::new(svc.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, svc)
}

/// A node behind a proxy that can freeze it: connections are still
/// accepted and bytes still taken, but nothing is passed on either way.
struct Freezable {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    node: FakeJobs,
}

impl Freezable {
    async fn start(name: &'static str) -> Freezable {
        let (upstream, node) = start_node(name).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, _) = watch::channel(false);
        let proxy_frozen = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, proxy_frozen.subscribe()));
                tokio::spawn(pipe(server_read, client_write, proxy_frozen.subscribe()));
            }
        });
        Freezable { addr, frozen, node }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

async fn pipe(mut from: tcp::OwnedReadHalf, mut to: tcp::OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Never thawed in these tests: the bytes are held for good.
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn client(endpoints: [SocketAddr; 2], request_timeout: Duration) -> Client {
    Client::builder(endpoints.map(|a| a.to_string()))
        .request_timeout(request_timeout)
        .connect()
        .await
        .expect("connects to the first node")
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f).await.unwrap_or_else(|_| panic!("{what}: no result after {HANG:?}"))
}

#[tokio::test]
async fn reads_and_cancels_move_past_a_frozen_node() {
    let first = Freezable::start("first").await;
    let (second, second_node) = start_node("second").await;
    let client = client([first.addr, second], Duration::from_secs(1)).await;
    let job = bounded("get before the freeze", client.get("0-1")).await.unwrap();
    assert_eq!(job.error, "first");

    first.freeze();
    let job = bounded("get on a frozen node", client.get("0-1")).await.expect("answered by the other node");
    assert_eq!(job.error, "second");
    let job = bounded("cancel", client.cancel("0-1", "no longer needed")).await.unwrap();
    assert_eq!((job.error.as_str(), job.state()), ("second", proto::JobState::Cancelled));
    assert_eq!(first.node.calls(), ["get"], "the frozen node never saw the later calls");
    assert_eq!(second_node.calls(), ["get", "cancel"]);
}

#[tokio::test]
async fn an_enqueue_with_an_idempotency_key_is_retried_past_a_frozen_leader() {
    let first = Freezable::start("first").await;
    let (second, second_node) = start_node("second").await;
    let client = client([first.addr, second], Duration::from_secs(1)).await;
    let before = bounded("enqueue before", client.enqueue("q", "a").idempotency_key("k1").send()).await.unwrap();
    assert_eq!(before.job_id, "first-k1");

    first.freeze();
    let during = bounded("enqueue on a frozen node", client.enqueue("q", "b").idempotency_key("k2").send())
        .await
        .expect("retried on the other node");
    assert_eq!(during.job_id, "second-k2");
    assert_eq!(second_node.calls(), ["enqueue:k2"]);
}

#[tokio::test]
async fn an_enqueue_without_an_idempotency_key_is_not_sent_twice() {
    let first = Freezable::start("first").await;
    let (second, second_node) = start_node("second").await;
    // Separate clients (not clones, which share what they learn), all
    // talking to the first node when it freezes.
    let client = client([first.addr, second], Duration::from_secs(1)).await;
    let batch_client = self::client([first.addr, second], Duration::from_secs(1)).await;
    let coalescing = self::client([first.addr, second], Duration::from_secs(1)).await.coalescing(8);
    bounded("enqueue before", client.enqueue("q", "a").send()).await.unwrap();

    first.freeze();
    let err = bounded("enqueue on a frozen node", client.enqueue("q", "b").send()).await.expect_err("no answer");
    assert!(err.is_outcome_unknown(), "{err:?}");
    assert_eq!(err.code(), Some(tonic::Code::DeadlineExceeded));
    let message = err.to_string();
    assert!(message.contains("Enqueue") && message.contains(&first.addr.to_string()), "{message}");
    assert!(message.contains("may or may not have been applied"), "{message}");
    assert!(second_node.calls().is_empty(), "sent again: {:?}", second_node.calls());

    // The next call goes to the node that answers, without waiting on the
    // frozen one first.
    let after = bounded("enqueue after", client.enqueue("q", "c").send()).await.expect("the other node answers");
    assert_eq!(after.job_id, "second-");

    // One job without a key makes a batch unsafe to send twice.
    let jobs = vec![client.enqueue("q", "d").idempotency_key("k").request(), client.enqueue("q", "e").request()];
    let err = bounded("batch on a frozen node", batch_client.enqueue_batch(jobs)).await.expect_err("no answer");
    assert!(err.is_outcome_unknown(), "{err:?}");

    // Every caller whose job was in the unanswered batch is told.
    let (d, e) = bounded(
        "coalesced enqueues on a frozen node",
        futures::future::join(coalescing.enqueue("q", "d").send(), coalescing.enqueue("q", "e").send()),
    )
    .await;
    for err in [d.expect_err("no answer"), e.expect_err("no answer")] {
        assert!(err.is_outcome_unknown(), "{err:?}");
    }
    assert_eq!(second_node.calls(), ["enqueue:"], "an unsafe call was sent again");
}

#[tokio::test]
async fn wait_gets_its_own_time_then_moves_past_a_frozen_node() {
    let first = Freezable::start("first").await;
    let (second, second_node) = start_node("second").await;
    let client = client([first.addr, second], Duration::from_secs(1)).await;

    // Held by the node for its whole timeout, well past the request timeout.
    let job = bounded("wait", client.wait("0-1", Duration::from_secs(3))).await.unwrap();
    assert_eq!(job.error, "first");
    let calls = first.node.calls();
    assert!(matches!(calls.as_slice(), [one] if one.starts_with("wait:")), "cut off and sent again: {calls:?}");

    first.freeze();
    let job = bounded("wait on a frozen node", client.wait("0-1", Duration::from_secs(1))).await.unwrap();
    assert_eq!(job.error, "second");
    let calls = second_node.calls();
    let [wait] = calls.as_slice() else { panic!("{calls:?}") };
    let asked: u64 = wait.trim_start_matches("wait:").parse().unwrap();
    assert!(asked <= 1000, "the retry asked for more than what was left of the wait: {asked} ms");

    // "Forever" is an hour per call until the job ends, not an overflow.
    let job = bounded("wait forever", client.wait("0-done", Duration::MAX)).await.unwrap();
    assert_eq!(job.state(), proto::JobState::Succeeded);
    let asked: u64 = second_node.calls().last().unwrap().trim_start_matches("wait:").parse().unwrap();
    assert!((3_500_000..=3_600_000).contains(&asked), "an hour per call, asked for {asked} ms");
}
