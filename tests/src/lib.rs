//! Harness for Gantry's end-to-end tests: brokers started in-process or as
//! the real `gantry` binary on loopback ports, raw gRPC clients, and bounded
//! polling. Tests talk to the broker only through its public gRPC API.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gantry_broker::{config::Config, server::RunningServer};
use gantry_proto::v1::{
    self as proto, admin_client::AdminClient, jobs_client::JobsClient, worker_client::WorkerClient,
};
use tonic::transport::Channel;

pub use gantry_proto::v1;

pub mod cluster;
pub mod faults;
pub mod history;
pub mod proxy;
pub mod security;

/// Short liveness settings so expiry scenarios take about a second.
pub const TEST_HEARTBEAT: Duration = Duration::from_millis(100);
pub const TEST_SESSION_TTL: Duration = Duration::from_millis(1000);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A broker running inside the test process, on an ephemeral port.
pub struct TestBroker {
    server: Option<RunningServer>,
    pub addr: SocketAddr,
    /// The metrics port (`/metrics`, `/healthz`, `/readyz`), if not turned off.
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        init_tracing();
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            data_dir: data_dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            peer_listen: "127.0.0.1:0".parse().expect("addr"),
            heartbeat_interval: TEST_HEARTBEAT,
            session_ttl: TEST_SESSION_TTL,
            election_timeout: Duration::from_millis(200),
            raft_heartbeat_interval: Duration::from_millis(50),
            metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..Config::default()
        };
        adjust(&mut config);
        let server = gantry_broker::server::start(config).await.expect("broker starts");
        let addr = server.local_addr();
        let metrics_addr = server.metrics_addr();
        TestBroker { server: Some(server), addr, metrics_addr, data_dir }
    }

    /// The running server (for in-process inspection).
    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("broker runs")
    }

    /// The metrics port; panics when the test turned it off.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr.expect("metrics port on")
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn channel(&self) -> Channel {
        channel(self.addr)
    }

    pub fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel())
    }

    pub fn worker(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel())
    }

    pub async fn client(&self) -> gantry_worker::Client {
        gantry_worker::Client::connect([self.endpoint()]).await.expect("client connects")
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }
}

/// A plain HTTP/1.1 GET (the metrics port): status code and body, or
/// `None` when the port does not answer within 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        // The metrics port answers with Content-Length, never chunked.
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy()
}

/// Polls `check` until it yields `Some`, at most `timeout`; panics naming
/// `what` otherwise. Tests wait on conditions, never on fixed sleeps.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn get_job(jobs: &mut JobsClient<Channel>, job_id: &str) -> proto::Job {
    jobs.get_job(proto::GetJobRequest { job_id: job_id.into() }).await.expect("GetJob").into_inner()
}

pub async fn enqueue(jobs: &mut JobsClient<Channel>, queue: &str, payload: &[u8]) -> String {
    jobs.enqueue(proto::EnqueueRequest { queue: queue.into(), payload: payload.to_vec(), ..Default::default() })
        .await
        .expect("Enqueue")
        .into_inner()
        .job_id
}

pub async fn wait_for_state(jobs: &mut JobsClient<Channel>, job_id: &str, state: proto::JobState) -> proto::Job {
    let mut jobs = jobs.clone();
    eventually(&format!("job {job_id} in {state:?}"), Duration::from_secs(20), || {
        let mut jobs = jobs.clone();
        async move {
            let job = get_job(&mut jobs, job_id).await;
            (job.state() == state).then_some(job)
        }
    })
    .await;
    get_job(&mut jobs, job_id).await
}

/// A binary of this workspace, brought up to date once per test process (a
/// stale binary would test old code). `cargo_args` say what to build,
/// `path` where it lands below `target/<profile>/`.
fn workspace_binary(built: &'static std::sync::OnceLock<PathBuf>, cargo_args: &[&str], path: &str) -> PathBuf {
    built
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>/
            let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
            // Cargo sets these for the test binary. ring's build script
            // tracks some of them, so with them this build would not match
            // the one `scripts/test.sh` made (nor any made from a shell) and
            // would rebuild ring, rustls, tonic and the broker (~20 s), and
            // the next build from a shell would rebuild them again.
            let for_the_test_binary = |name: &str| {
                ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"].iter().any(|p| name.starts_with(p))
                    || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR"].contains(&name)
            };
            let mut cargo = Command::new(env!("CARGO"));
            for (name, _) in std::env::vars_os() {
                if name.to_str().is_some_and(for_the_test_binary) {
                    cargo.env_remove(name);
                }
            }
            let status = cargo.args(["build", "--quiet"]).args(cargo_args).status().expect("run cargo build");
            assert!(status.success(), "cargo build {cargo_args:?} failed");
            profile_dir.join(path)
        })
        .clone()
}

/// The `gantry` binary.
pub fn gantry_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    workspace_binary(&BUILT, &["-p", "gantry-broker", "--bin", "gantry"], "gantry")
}

/// The previous release's `gantry` (tests/compat/previous-release), for
/// upgrade tests: `GANTRY_PREVIOUS_BINARY`, else built (once per machine,
/// cached: minutes the first time) by `scripts/build-previous.sh`.
pub fn previous_gantry_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("GANTRY_PREVIOUS_BINARY") {
                return PathBuf::from(path);
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-previous.sh");
            let out =
                Command::new("bash").arg(&script).stderr(Stdio::inherit()).output().expect("run build-previous.sh");
            assert!(out.status.success(), "{} failed", script.display());
            PathBuf::from(String::from_utf8(out.stdout).expect("a path").trim())
        })
        .clone()
}

/// The SDK's `echo_worker` example: a worker that runs as its own OS
/// process, to be killed.
pub fn echo_worker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    workspace_binary(&BUILT, &["-p", "gantry-worker", "--example", "echo_worker"], "examples/echo_worker")
}

/// A port nothing listens on, for a server started later. Picked below the
/// kernel's ephemeral range (32768-60999 here): a port the kernel handed
/// out for a moment, as `bind(0)` does, goes straight back into the pool
/// every client connection draws from, and a test's outgoing connection
/// took one before its server could bind it. Each test process starts at
/// its own place in the range and moves on from there.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if claim_port(port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// Test processes run side by side (nextest), each walking the port range
/// from its own start: two could pick the same free port before either
/// binds it. A claim is a file created exclusively under the temp dir,
/// honoured for a while (a test's life), then reclaimable.
fn claim_port(port: u16) -> bool {
    const CLAIM_FOR: Duration = Duration::from_secs(15 * 60);
    let dir = std::env::temp_dir().join("gantry-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let path = dir.join(port.to_string());
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stale = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > CLAIM_FOR));
            // Rewritten, so its time is now: the next process skips it.
            stale && std::fs::write(&path, b"").is_ok()
        }
        Err(_) => true,
    }
}

/// The real `gantry serve` as a child process.
pub struct BinaryBroker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// The metrics port: a free port picked at start, unless `extra_args`
    /// set `--metrics-listen` themselves (then that address, if any).
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// The binary `restart` runs (the current build unless switched: a
    /// rolling upgrade or downgrade).
    binary: PathBuf,
}

impl BinaryBroker {
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let peer_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_at(data_dir, addr, peer_addr, extra_args, true).await
    }

    /// Starts on given ports; with `wait_ready` false it returns once the
    /// process answers health checks at all (a cluster member needs its
    /// peers before its services are ready).
    pub async fn start_at(
        data_dir: &Path,
        addr: SocketAddr,
        peer_addr: SocketAddr,
        extra_args: &[&str],
        wait_ready: bool,
    ) -> Self {
        Self::start_binary_at(&gantry_binary(), data_dir, addr, peer_addr, extra_args, wait_ready).await
    }

    /// Like [`start_at`](Self::start_at), running `binary`.
    pub async fn start_binary_at(
        binary: &Path,
        data_dir: &Path,
        addr: SocketAddr,
        peer_addr: SocketAddr,
        extra_args: &[&str],
        wait_ready: bool,
    ) -> Self {
        let mut args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        // Not the default 9464: tests run brokers side by side.
        let metrics_addr = match args.iter().position(|a| a == "--metrics-listen") {
            Some(i) => args.get(i + 1).and_then(|a| a.parse().ok()),
            None => {
                let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
                args.extend(["--metrics-listen".to_owned(), metrics_addr.to_string()]);
                Some(metrics_addr)
            }
        };
        let mut broker = BinaryBroker {
            child: None,
            addr,
            peer_addr,
            metrics_addr,
            data_dir: data_dir.to_path_buf(),
            args,
            log: data_dir.with_extension("log"),
            binary: binary.to_path_buf(),
        };
        broker.spawn().await;
        if wait_ready {
            broker.wait_ready().await;
        }
        broker
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Bounded wait until the node's public services are SERVING: it knows
    /// a leader and can answer or forward.
    pub async fn wait_ready(&self) {
        let addr = self.addr;
        eventually(&format!("node at {addr} ready"), Duration::from_secs(60), || async move {
            let mut health = tonic_health_client(addr);
            let request = tonic_health::pb::HealthCheckRequest { service: "gantry.v1.Jobs".into() };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            let response = tokio::time::timeout(Duration::from_secs(1), health.check(request)).await.ok()?.ok()?;
            (response.into_inner().status == serving).then_some(())
        })
        .await
    }

    /// Starts `binary` instead of the current build from now on (on the
    /// next start, and by `start_at` when called before it).
    pub fn use_binary(&mut self, binary: &Path) {
        self.binary = binary.to_path_buf();
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// SIGTERM and a bounded wait for the process to exit (a Kubernetes
    /// pod being replaced): leaders hand over first.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                child.kill().expect("SIGKILL after 30 s");
                child.wait().expect("reap");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the broker's binary on its data dir and ports expecting it to
    /// refuse to start: its exit status and what it logged, within a bound.
    pub async fn start_expecting_refusal(&mut self) -> (std::process::ExitStatus, String) {
        assert!(self.child.is_none(), "start of a running broker");
        let from = self.log().len();
        self.spawn_child();
        let mut child = self.child.take().expect("spawned");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().expect("kill");
                child.wait().expect("reap");
                panic!("{} started on {} instead of refusing", self.binary.display(), self.data_dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        (status, self.log()[from..].to_owned())
    }

    async fn spawn(&mut self) {
        self.spawn_child();
        self.wait_serving().await;
    }

    fn spawn_child(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(&self.binary)
            .arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--peer-listen")
            .arg(self.peer_addr.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("GANTRY_LOG", "info,openraft=warn,raft_engine=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gantry serve");
        self.child = Some(child);
    }

    /// Bounded wait until the health service answers SERVING.
    async fn wait_serving(&mut self) {
        let addr = self.addr;
        let log = self.log.clone();
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "gantry serve exited with {status}; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let mut health = tonic_health_client(addr);
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(1), health.check(request)).await
                && response.into_inner().status == serving
            {
                return;
            }
            assert!(Instant::now() < deadline, "gantry serve did not become healthy within 60s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn channel(&self) -> Channel {
        channel(self.addr)
    }

    pub fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel())
    }

    pub fn worker(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no shutdown hook runs, nothing is flushed that was not already.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// Starts the binary again on the same data dir and port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running broker");
        self.spawn().await;
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BinaryBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn tonic_health_client(addr: SocketAddr) -> tonic_health::pb::health_client::HealthClient<Channel> {
    tonic_health::pb::health_client::HealthClient::new(channel(addr))
}

/// An SDK worker running in a task of the test.
pub struct RunningWorker {
    pub handle: gantry_worker::WorkerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gantry_worker::Error>>,
}

impl RunningWorker {
    pub fn spawn<H, Fut>(endpoint: &str, queue: &str, worker_id: &str, concurrency: u32, handler: H) -> Self
    where
        H: Fn(gantry_worker::JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<bytes::Bytes, gantry_worker::JobError>> + Send + 'static,
    {
        // `endpoint` may list several nodes, and `queue` several queues,
        // comma-separated.
        let worker = gantry_worker::Worker::builder(endpoint.split(',').map(str::to_owned))
            .queues(queue.split(','))
            .worker_id(worker_id)
            .concurrency(concurrency)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .shutdown_timeout(Duration::from_secs(10))
            .build()
            .expect("worker config");
        let handle = worker.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(handler, async move {
            let _ = stopped.await;
        }));
        RunningWorker { handle, stop: Some(stop), task }
    }

    pub async fn wait_connected(&self) -> String {
        tokio::time::timeout(Duration::from_secs(20), self.handle.wait_connected()).await.expect("worker connects")
    }

    /// Graceful shutdown: finish running jobs, release the rest, goodbye.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        result.expect("worker shuts down in time").expect("worker task").expect("worker run");
    }

    /// Like a process killed mid-job: the stream drops, no goodbye, no release.
    pub fn kill(self) {
        self.task.abort();
    }
}
