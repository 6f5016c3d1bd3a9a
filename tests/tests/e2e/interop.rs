//! Clients other than the Rust SDK: grpcurl through server reflection (no
//! proto files), and the `gantry` CLI binary.

use std::process::Command;

use gantry_tests::{BinaryBroker, TestBroker, gantry_binary, get_job, v1 as proto};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!("grpcurl could not be run ({e}); the test command (scripts/test.sh) installs it with pip")
    });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_enqueues_with_json() {
    let broker = TestBroker::start().await;
    let addr = broker.endpoint();
    let (ok, listed, err) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || grpcurl(&["-plaintext", &addr, "list"])
    })
    .await
    .unwrap();
    assert!(ok, "grpcurl list failed: {err}");
    for service in ["gantry.v1.Jobs", "gantry.v1.Worker", "gantry.v1.Admin", "grpc.health.v1.Health"] {
        assert!(listed.lines().any(|l| l == service), "{service} missing from:\n{listed}");
    }
    let body = r#"{"queue":"from-grpcurl","payload":"aGVsbG8=","priority":3,"headers":{"k":"v"},"delay":"0s"}"#;
    let (ok, out, err) = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || grpcurl(&["-plaintext", "-d", body, &addr, "gantry.v1.Jobs/Enqueue"])
    })
    .await
    .unwrap();
    assert!(ok, "grpcurl Enqueue failed: {err}");
    let response: serde_json::Value = serde_json::from_str(&out).expect("JSON answer");
    let job_id = response["jobId"].as_str().expect("jobId").to_owned();
    assert_eq!(response["created"], true);
    let job = get_job(&mut broker.jobs(), &job_id).await;
    assert_eq!((job.payload.as_slice(), job.priority, job.queue.as_str()), (b"hello".as_slice(), 3, "from-grpcurl"));
    // A bad request through grpcurl gets the field-naming error too.
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        grpcurl(&["-plaintext", "-d", r#"{"queue":"bad queue"}"#, &addr, "gantry.v1.Jobs/Enqueue"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("InvalidArgument") && err.contains("queue"), "{err}");
    let (ok, health, _) = tokio::task::spawn_blocking(move || {
        grpcurl(&["-plaintext", &broker.endpoint(), "grpc.health.v1.Health/Check"])
    })
    .await
    .unwrap();
    assert!(ok && health.contains("SERVING"), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_enqueues_and_reads_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BinaryBroker::start(&dir.path().join("node"), &[]).await;
    let addr = broker.addr.to_string();
    let cli = |args: &[&str]| {
        let output = Command::new(gantry_binary()).args(args).env("GANTRY_ADDR", &addr).output().expect("run gantry");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&["enqueue", "cli-queue", "hello from the cli", "--priority", "4"]);
    assert!(ok, "gantry enqueue failed: {err}");
    let job_id = out.lines().next().expect("job id line").trim().to_owned();
    let job = get_job(&mut broker.jobs(), &job_id).await;
    assert_eq!((job.payload.as_slice(), job.priority), (b"hello from the cli".as_slice(), 4));
    let (ok, out, err) = cli(&["job", "get", &job_id]);
    assert!(ok, "gantry job get failed: {err}");
    assert!(out.contains(&job_id) && out.to_lowercase().contains("ready"), "{out}");
    let (ok, out, _) = cli(&["queues"]);
    assert!(ok && out.contains("cli-queue"), "{out}");
    let (ok, out, _) = cli(&["cluster", "status"]);
    assert!(ok && out.to_lowercase().contains("leader"), "{out}");
    let (ok, _, err) = cli(&["enqueue", "bad queue", "x"]);
    assert!(!ok);
    assert!(err.contains("INVALID_ARGUMENT") || err.contains("InvalidArgument"), "{err}");
    // No worker: the wait runs out, shows the job and exits 2.
    let waited = Command::new(gantry_binary())
        .args(["job", "wait", &job_id, "--timeout", "200ms"])
        .env("GANTRY_ADDR", &addr)
        .output()
        .expect("run gantry");
    assert_eq!(waited.status.code(), Some(2), "{waited:?}");
    assert!(String::from_utf8_lossy(&waited.stdout).contains(&job_id), "{waited:?}");
    assert!(String::from_utf8_lossy(&waited.stderr).contains("still JOB_STATE_READY"), "{waited:?}");
    let (ok, out, err) = cli(&["job", "cancel", &job_id]);
    assert!(ok, "gantry job cancel failed: {err}");
    assert!(out.to_lowercase().contains("cancelled"), "{out}");
    assert_eq!(get_job(&mut broker.jobs(), &job_id).await.state(), proto::JobState::Cancelled);
    let (ok, out, err) = cli(&["job", "wait", &job_id, "--timeout", "200ms"]);
    assert!(ok, "waiting for a finished job: {err}");
    assert!(out.to_lowercase().contains("cancelled"), "{out}");
}

/// `gantry bench` against a real broker: every scenario runs, accounts for
/// every acknowledged job, and the JSON says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_every_scenario_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BinaryBroker::start(&dir.path().join("node"), &[]).await;
    let args = ["--scenario", "all", "--jobs", "400", "--batch", "20", "--in-flight", "4", "--workers", "2"];
    let report = bench_json(&broker, &[&args[..], &["--rate", "200", "--duration", "1s"]].concat()).await;
    assert_eq!(report["ok"], true, "{report:#}");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios.iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["enqueue", "e2e", "consume", "latency"]);
    for scenario in scenarios {
        assert_eq!(scenario["lost"], 0, "{scenario:#}");
        assert!(scenario["jobs_per_sec"].as_f64().unwrap() > 0.0, "{scenario:#}");
    }
    let consume = &scenarios[2];
    assert_eq!((consume["jobs"].as_u64(), consume["completed"].as_u64()), (Some(400), Some(400)), "{consume:#}");
    assert_eq!(consume["handler_runs"].as_u64(), Some(400), "a job ran twice: {consume:#}");
}

/// `gantry bench --queues 3` on a broker of three shards: the jobs spread
/// over the queues (so over the shards), and the counts still add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_spreads_over_queues_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BinaryBroker::start(&dir.path().join("node"), &["--shards", "3"]).await;
    let args = ["--scenario", "e2e", "--jobs", "300", "--batch", "10", "--workers", "2"];
    let report =
        bench_json(&broker, &[&args[..], &["--queue", "spread", "--queues", "3", "--keep-jobs"]].concat()).await;
    let e2e = &report["scenarios"][0];
    assert_eq!((e2e["completed"].as_u64(), e2e["lost"].as_u64()), (Some(300), Some(0)), "{e2e:#}");
    assert_eq!(e2e["broker_count"].as_u64(), Some(300), "counted over every queue: {e2e:#}");
    let listed =
        broker.admin().list_queues(proto::ListQueuesRequest {}).await.expect("list queues").into_inner().queues;
    let mut shards = std::collections::BTreeSet::new();
    for name in ["spread-0", "spread-1", "spread-2"] {
        let queue = listed.iter().find(|q| q.queue == name).unwrap_or_else(|| panic!("{name} in {listed:?}"));
        assert_eq!(queue.succeeded, 100, "{queue:?}");
        shards.insert(queue.shard);
    }
    assert!(shards.len() > 1, "the queues landed in several shards: {listed:?}");
}

/// Runs `gantry bench --json` against `broker` with `args`; asserts it
/// succeeded and returns its report.
async fn bench_json(broker: &BinaryBroker, args: &[&str]) -> serde_json::Value {
    let addr = broker.addr.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(gantry_binary())
            .args(["bench", "--addr", &addr, "--json"])
            .args(&args)
            .output()
            .expect("run gantry bench")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).expect("bench JSON")
}
