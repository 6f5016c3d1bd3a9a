//! Data directories written by the previous release, opened by this build
//! (DESIGN §13). `tests/compat/fixtures/format-0/{single,three}` hold the
//! data directories of a one-node and a three-node cluster of two shards
//! written by the previous release (tests/compat/previous-release), with
//! jobs in every state, a retained result, idempotency keys, an open lease
//! and a paused queue, and `expected.json`: every job as the previous
//! release answered for it, and its clock when it stopped.
//!
//! The test opens a copy with this build, in this process, with its clock
//! stopped at that moment (so no lease or delay runs out meanwhile): every
//! job, token, key and lease must read back as before. It then writes
//! (cancels, enqueues, completes the held job through the resumed session),
//! lets the shards be raised to format 1 and snapshotted, restarts, and
//! checks everything again.
//!
//! `generate_format_0_fixtures` (ignored) wrote them with the previous
//! build; fixtures are only ever added, one directory per format.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gantry_broker::{clock::Clock, config::Config, server::RunningServer};
use gantry_tests::{
    BinaryBroker, channel,
    cluster::{CLUSTER_WAIT, leaders_seen_by},
    eventually, v1 as proto,
};
use proto::{broker_message::Kind as Out, worker_message::Kind as In};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};

const SHARDS: u32 = 2;

fn fixtures(layout: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/fixtures/format-0").join(layout)
}

/// Fixed ports, below `free_port`'s range: the membership in the fixtures
/// records them, so every start must use them again.
fn ports(layout: &str, nodes: usize) -> Vec<(SocketAddr, SocketAddr)> {
    let base: u16 = if layout == "single" { 19_100 } else { 19_110 };
    (0..nodes as u16)
        .map(|i| {
            let at = |p: u16| format!("127.0.0.1:{p}").parse().expect("addr");
            (at(base + 2 * i), at(base + 2 * i + 1))
        })
        .collect()
}

fn initial_cluster(addrs: &[(SocketAddr, SocketAddr)]) -> String {
    addrs.iter().enumerate().map(|(i, (_, peer))| format!("{}={peer}", i + 1)).collect::<Vec<_>>().join(",")
}

/// A queue name in each shard.
fn queues() -> Vec<String> {
    (0..u64::from(SHARDS))
        .map(|shard| {
            (0..)
                .map(|i| format!("fx-{i}"))
                .find(|q| gantry_broker::dispatch::queue_hash(q) % u64::from(SHARDS) == shard)
                .expect("a name")
        })
        .collect()
}

fn enqueue_request(queue: &str, payload: &str) -> proto::EnqueueRequest {
    proto::EnqueueRequest { queue: queue.into(), payload: payload.as_bytes().to_vec(), ..Default::default() }
}

struct RawWorker {
    tx: mpsc::UnboundedSender<proto::WorkerMessage>,
    rx: tonic::Streaming<proto::BrokerMessage>,
    session_id: String,
}

impl RawWorker {
    async fn open(addr: SocketAddr, queue: &str, resume: &str, max_in_flight: u32) -> RawWorker {
        let (tx, out) = mpsc::unbounded_channel();
        let hello = proto::Hello {
            worker_id: "fixture-worker".into(),
            queues: vec![queue.into()],
            max_in_flight,
            resume_session_id: resume.into(),
        };
        tx.send(proto::WorkerMessage { kind: Some(In::Hello(hello)) }).unwrap();
        let mut rx = proto::worker_client::WorkerClient::new(channel(addr))
            .connect(UnboundedReceiverStream::new(out))
            .await
            .expect("connect")
            .into_inner();
        let welcome = match rx.next().await.expect("a message").expect("welcome").kind {
            Some(Out::Welcome(welcome)) => welcome,
            other => panic!("expected a welcome, got {other:?}"),
        };
        RawWorker { tx, rx, session_id: welcome.session_id }
    }

    fn send(&self, kind: In) {
        self.tx.send(proto::WorkerMessage { kind: Some(kind) }).expect("stream open");
    }

    async fn next_of(&mut self, want: fn(&Out) -> bool) -> Out {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.rx.next())
                .await
                .expect("a broker message within 20 s")
                .expect("stream open")
                .expect("message");
            let kind = message.kind.expect("kind");
            if want(&kind) {
                return kind;
            }
        }
    }

    async fn assign(&mut self) -> proto::Assign {
        match self.next_of(|k| matches!(k, Out::Assign(_))).await {
            Out::Assign(assign) => assign,
            _ => unreachable!(),
        }
    }

    async fn ack(&mut self) -> proto::Ack {
        match self.next_of(|k| matches!(k, Out::Ack(_))).await {
            Out::Ack(ack) => ack,
            _ => unreachable!(),
        }
    }
}

/// What the fixture promises about a job.
fn job_json(job: &proto::Job) -> Value {
    json!({
        "id": job.id,
        "queue": job.queue,
        "state": job.state().as_str_name(),
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "fencing_token": job.fencing_token,
        "result": String::from_utf8_lossy(&job.result),
        "error": job.error,
        "payload": String::from_utf8_lossy(&job.payload),
    })
}

/// Jobs in every state in each queue, through `addr` (any node).
async fn populate(addr: SocketAddr) -> Value {
    let mut jobs = proto::jobs_client::JobsClient::new(channel(addr));
    let mut admin = proto::admin_client::AdminClient::new(channel(addr));
    let mut ids = Vec::new();
    let mut keys = Vec::new();
    let mut held = Vec::new();
    let mut paused = Vec::new();
    for (n, queue) in queues().iter().enumerate() {
        admin
            .set_queue_config(proto::SetQueueConfigRequest {
                queue: queue.clone(),
                config: Some(proto::QueueConfig {
                    retention: Some(prost_types::Duration { seconds: 7 * 24 * 3600, nanos: 0 }),
                    rate_limit: Some(1000),
                    ..Default::default()
                }),
            })
            .await
            .expect("config");
        let mut worker = RawWorker::open(addr, queue, "", 3).await;
        let mut taken = Vec::new();
        for payload in ["succeeds", "fails", "held"] {
            let request = proto::EnqueueRequest { max_attempts: 3, ..enqueue_request(queue, payload) };
            ids.push(jobs.enqueue(request).await.expect("enqueue").into_inner().job_id);
            taken.push(worker.assign().await);
        }
        for assign in &taken {
            let job = assign.job.as_ref().expect("job");
            match job.payload.as_slice() {
                b"succeeds" => worker.send(In::Complete(proto::Complete {
                    job_id: job.id.clone(),
                    fencing_token: assign.fencing_token,
                    result: format!("result of {}", job.id).into_bytes(),
                })),
                b"fails" => worker.send(In::Fail(proto::Fail {
                    job_id: job.id.clone(),
                    fencing_token: assign.fencing_token,
                    error: "bad input".into(),
                    no_retry: true,
                    ..Default::default()
                })),
                _ => {
                    held.push(
                        json!({"job_id": job.id, "session_id": worker.session_id, "token": assign.fencing_token}),
                    );
                    continue;
                }
            }
            worker.ack().await;
        }
        // Nothing more for this worker: the jobs below stay where they are.
        worker.send(In::Drain(proto::Drain {}));
        let ready = jobs.enqueue(enqueue_request(queue, "ready")).await.expect("enqueue").into_inner().job_id;
        let key = format!("key-{queue}");
        let keyed = proto::EnqueueRequest { idempotency_key: key.clone(), ..enqueue_request(queue, "keyed") };
        let keyed = jobs.enqueue(keyed).await.expect("enqueue").into_inner().job_id;
        keys.push(json!({"queue": queue, "key": key, "job_id": keyed}));
        let later = proto::EnqueueRequest {
            delay: Some(prost_types::Duration { seconds: 24 * 3600, nanos: 0 }),
            ..enqueue_request(queue, "scheduled")
        };
        let later = jobs.enqueue(later).await.expect("enqueue").into_inner().job_id;
        let cancelled = jobs.enqueue(enqueue_request(queue, "cancelled")).await.expect("enqueue").into_inner().job_id;
        jobs.cancel_job(proto::CancelJobRequest { job_id: cancelled.clone(), reason: "operator".into() })
            .await
            .expect("cancel");
        ids.extend([ready, keyed, later, cancelled]);
        if n == 1 {
            admin.pause_queue(proto::PauseQueueRequest { queue: queue.clone() }).await.expect("pause");
            paused.push(queue.clone());
        }
        // The stream ends with the test; the session and its lease stay.
        std::mem::forget(worker);
    }
    let mut all = Vec::new();
    for id in &ids {
        let job = jobs.get_job(proto::GetJobRequest { job_id: id.clone() }).await.expect("get").into_inner();
        all.push(job_json(&job));
    }
    json!({ "jobs": all, "keys": keys, "held": held, "paused": paused })
}

/// Writes `tests/compat/fixtures/format-0/` with the previous release.
/// Only for a new format's fixtures: existing ones are never rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "writes fixtures with the previous build: run once per format"]
async fn generate_format_0_fixtures() {
    let old = gantry_tests::previous_gantry_binary();
    for (layout, nodes) in [("single", 1usize), ("three", 3)] {
        let target = fixtures(layout);
        assert!(!target.exists(), "{} exists: fixtures are never rewritten", target.display());
        let dir = tempfile::tempdir().expect("temp dir");
        let addrs = ports(layout, nodes);
        let initial = initial_cluster(&addrs);
        let mut brokers = Vec::new();
        for (i, (addr, peer)) in addrs.iter().enumerate() {
            let id = (i + 1).to_string();
            let mut args = vec!["--node-id", &id, "--shards", "2", "--session-ttl", "1h", "--snapshot-every", "5"];
            if nodes > 1 {
                args.extend(["--initial-cluster", &initial]);
            }
            brokers.push(
                BinaryBroker::start_binary_at(
                    &old,
                    &dir.path().join(format!("node-{}", i + 1)),
                    *addr,
                    *peer,
                    &args,
                    false,
                )
                .await,
            );
        }
        for broker in &brokers {
            broker.wait_ready().await;
        }
        let mut expected = populate(addrs[0].0).await;
        let clock_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
        for broker in &mut brokers {
            broker.stop().await;
        }
        expected["clock_ms"] = json!(clock_ms);
        expected["written_by"] = json!(old.display().to_string());
        for i in 0..nodes {
            let from = dir.path().join(format!("node-{}", i + 1));
            copy_dir(&from, &target.join(format!("node-{}", i + 1)));
        }
        std::fs::write(target.join("expected.json"), serde_json::to_string_pretty(&expected).expect("json"))
            .expect("expected.json");
        eprintln!("wrote {}", target.display());
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else if entry.file_name() != "LOCK" {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

/// The previous release's clock when it stopped: nothing runs out.
struct Stopped(u64);

impl Clock for Stopped {
    fn now_ms(&self) -> u64 {
        self.0
    }
}

struct Opened {
    servers: Vec<Option<RunningServer>>,
    configs: Vec<Config>,
    clock: Arc<Stopped>,
}

impl Opened {
    async fn start(root: &Path, layout: &str, nodes: usize, clock_ms: u64) -> Opened {
        gantry_tests::init_tracing();
        let addrs = ports(layout, nodes);
        let initial: gantry_broker::config::InitialCluster = initial_cluster(&addrs).parse().expect("initial");
        let configs: Vec<Config> = addrs
            .iter()
            .enumerate()
            .map(|(i, (addr, peer))| Config {
                node_id: i as u64 + 1,
                data_dir: root.join(format!("node-{}", i + 1)),
                listen: *addr,
                peer_listen: *peer,
                initial_cluster: if nodes > 1 { initial.clone() } else { Default::default() },
                shards: SHARDS,
                session_ttl: Duration::from_secs(3600),
                snapshot_every: 5,
                election_timeout: Duration::from_millis(800),
                raft_heartbeat_interval: Duration::from_millis(100),
                metrics_listen: None,
                ..Config::default()
            })
            .collect();
        let mut opened = Opened { servers: Vec::new(), configs, clock: Arc::new(Stopped(clock_ms + 1)) };
        opened.start_all().await;
        opened
    }

    async fn start_all(&mut self) {
        let starts = self
            .configs
            .iter()
            .map(|config| gantry_broker::server::start_with_clock(config.clone(), self.clock.clone()));
        self.servers = futures::future::join_all(starts)
            .await
            .into_iter()
            .map(|s| Some(s.expect("this build opens the previous release's data directory")))
            .collect();
        let addr = self.configs[0].listen;
        eventually("a leader for every shard", CLUSTER_WAIT, || async { leaders_seen_by(addr).await }).await;
    }

    async fn restart(&mut self) {
        for server in self.servers.iter_mut() {
            server.take().expect("running").shutdown().await.expect("shutdown");
        }
        self.start_all().await;
    }

    fn addr(&self) -> SocketAddr {
        self.configs[0].listen
    }

    async fn shutdown(mut self) {
        for server in self.servers.iter_mut() {
            if let Some(server) = server.take() {
                server.shutdown().await.expect("shutdown");
            }
        }
    }
}

/// Every job of `expected` reads back as the fixture says, every key still
/// names its job, every paused queue is paused.
async fn check(addr: SocketAddr, expected: &Value) {
    let mut jobs = proto::jobs_client::JobsClient::new(channel(addr));
    let mut admin = proto::admin_client::AdminClient::new(channel(addr));
    for want in expected["jobs"].as_array().expect("jobs") {
        let id = want["id"].as_str().expect("id").to_owned();
        let job =
            jobs.get_job(proto::GetJobRequest { job_id: id.clone() }).await.expect("the job is there").into_inner();
        assert_eq!(&job_json(&job), want, "job {id} changed");
    }
    for key in expected["keys"].as_array().expect("keys") {
        let request = proto::EnqueueRequest {
            idempotency_key: key["key"].as_str().expect("key").into(),
            ..enqueue_request(key["queue"].as_str().expect("queue"), "again")
        };
        let again = jobs.enqueue(request).await.expect("enqueue").into_inner();
        assert!(!again.created, "the idempotency key {key} was forgotten");
        assert_eq!(again.job_id, key["job_id"].as_str().expect("id"), "{key}");
    }
    for queue in expected["paused"].as_array().expect("paused") {
        let info = admin
            .get_queue(proto::GetQueueRequest { queue: queue.as_str().expect("name").into() })
            .await
            .expect("queue")
            .into_inner();
        assert!(info.paused, "{queue} is no longer paused");
    }
}

async fn open_the_previous_releases_directory(layout: &str, nodes: usize) {
    let fixture = fixtures(layout);
    let mut expected: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).expect("expected.json")).expect("json");
    let dir = tempfile::tempdir().expect("temp dir");
    for i in 0..nodes {
        copy_dir(&fixture.join(format!("node-{}", i + 1)), &dir.path().join(format!("node-{}", i + 1)));
    }
    let clock_ms = expected["clock_ms"].as_u64().expect("clock_ms");
    let mut opened = Opened::start(dir.path(), layout, nodes, clock_ms).await;
    check(opened.addr(), &expected).await;

    // Write: cancel a ready job, enqueue more, and complete each held job
    // through its session, resumed.
    let mut jobs = proto::jobs_client::JobsClient::new(channel(opened.addr()));
    let all = expected["jobs"].as_array_mut().expect("jobs");
    let ready = all.iter_mut().find(|j| j["payload"] == "ready").expect("a ready job");
    let cancelled = jobs
        .cancel_job(proto::CancelJobRequest { job_id: ready["id"].as_str().expect("id").into(), reason: "now".into() })
        .await
        .expect("cancel")
        .into_inner();
    *ready = job_json(&cancelled);
    for queue in queues() {
        for n in 0..8 {
            let id =
                jobs.enqueue(enqueue_request(&queue, &format!("new-{n}"))).await.expect("enqueue").into_inner().job_id;
            let job = jobs.get_job(proto::GetJobRequest { job_id: id }).await.expect("get").into_inner();
            all.push(job_json(&job));
        }
    }
    for held in expected["held"].as_array().expect("held").clone() {
        let id = held["job_id"].as_str().expect("id");
        let job = jobs.get_job(proto::GetJobRequest { job_id: id.into() }).await.expect("get").into_inner();
        assert_eq!(job.state(), proto::JobState::Active, "{held}: the lease did not survive");
        // Resumed with room for the job it holds only, and drained before
        // it completes it: the fixture's ready jobs stay ready.
        let session = held["session_id"].as_str().expect("session");
        let mut worker = RawWorker::open(opened.addr(), &job.queue, session, 1).await;
        assert_eq!(worker.session_id, session, "the session was not resumed");
        worker.send(In::Drain(proto::Drain {}));
        worker.send(In::Complete(proto::Complete {
            job_id: id.into(),
            fencing_token: held["token"].as_u64().expect("token"),
            result: b"finished after the upgrade".to_vec(),
        }));
        assert_eq!(worker.ack().await.status(), proto::AckStatus::Accepted, "{held}");
        let done = jobs.get_job(proto::GetJobRequest { job_id: id.into() }).await.expect("get").into_inner();
        assert_eq!(done.state(), proto::JobState::Succeeded);
        let all = expected["jobs"].as_array_mut().expect("jobs");
        *all.iter_mut().find(|j| j["id"] == id).expect("held job listed") = job_json(&done);
    }
    // Every shard raised (the leader does it by itself), snapshotted in
    // format 1 (every 5 commands), then everything again after a restart.
    eventually("every data directory raised to format 1", CLUSTER_WAIT, || async {
        (0..nodes)
            .all(|i| {
                std::fs::read_to_string(dir.path().join(format!("node-{}/FORMAT", i + 1)))
                    .is_ok_and(|l| l.starts_with("gantry-data 3"))
            })
            .then_some(())
    })
    .await;
    // Enough commands for a snapshot of every shard (the policy waits for
    // as many commands as the shard holds jobs, and at least 5).
    for queue in queues() {
        for _ in 0..40 {
            jobs.enqueue(enqueue_request(&queue, "after the raise")).await.expect("enqueue");
        }
    }
    eventually("a format-1 snapshot of every shard", CLUSTER_WAIT, || async {
        (0..SHARDS)
            .all(|shard| dir.path().join(format!("node-1/snapshots/{shard}/snapshot-v3.bin")).exists())
            .then_some(())
    })
    .await;
    check(opened.addr(), &expected).await;
    opened.restart().await;
    check(opened.addr(), &expected).await;
    opened.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_of_the_previous_release_opens_with_every_job() {
    open_the_previous_releases_directory("single", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_of_the_previous_release_open_with_every_job() {
    open_the_previous_releases_directory("three", 3).await;
}
