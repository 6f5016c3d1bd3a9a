//! The Python examples (`examples/python`) against a broker: the producer
//! enqueues and waits over `gantry.v1.Jobs`, the worker speaks the raw
//! `gantry.v1.Worker/Connect` stream from grpcio stubs generated from
//! `proto/` at run time. Needs python3 with grpcio and grpcio-tools, which
//! `scripts/test.sh` installs: without them this test fails, it never skips.

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use gantry_tests::{TEST_SESSION_TTL, TestBroker, eventually, get_job, v1 as proto};
use tokio::process::{Child, Command};

const QUEUE: &str = "python-demo";
const WORKER_ID: &str = "python-worker";
const INSTALL_HINT: &str = "python3 -m pip install -r examples/python/requirements.txt (scripts/test.sh does it)";

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python")
}

/// The interpreter: `python3` on PATH, or `$GANTRY_TEST_PYTHON`.
fn python() -> String {
    std::env::var("GANTRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A Python process of the examples, killed if the test ends first.
fn spawn(script: &str, args: &[&str], stubs: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(python())
        .arg(script)
        .args(args)
        .current_dir(examples_dir())
        .env("GANTRY_STUBS_DIR", stubs)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {} ({e}): install python3 and {INSTALL_HINT}", python()))
}

/// Waits at most `timeout` for `child` to exit (it is killed otherwise) and
/// panics with its stderr unless it succeeded; returns its stdout.
async fn finish(what: &str, child: Child, timeout: Duration, log: &Path) -> String {
    let output: Output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} still running after {timeout:?} (killed); its stderr:\n{}", read(log)))
        .expect("wait for python");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{what} failed with {}; stdout:\n{stdout}\nstderr:\n{}", output.status, read(log));
    stdout
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Runs the producer to completion; returns its lines as (job id, state, outcome).
async fn produce(addr: &str, stubs: &Path, dir: &Path, count: usize, payload: &str) -> Vec<(String, String, String)> {
    let log = dir.join(format!("producer-{}.log", payload.replace(|c: char| !c.is_ascii_alphanumeric(), "_")));
    let count = count.to_string();
    let args = ["--addr", addr, "--queue", QUEUE, "--count", &count, "--payload", payload, "--wait", "--timeout", "30"];
    let child = spawn("producer.py", &args, stubs, &log);
    let stdout = finish(&format!("producer.py --payload {payload}"), child, Duration::from_secs(60), &log).await;
    stdout
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, '\t').map(str::to_owned);
            let mut next = || fields.next().unwrap_or_default();
            (next(), next(), next())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_and_worker() {
    // Fail loudly, with the fix, when the toolchain is missing.
    let check =
        Command::new(python()).args(["-c", "import grpc, grpc_tools"]).output().await.unwrap_or_else(|e| {
            panic!("{} is needed for the Python examples test ({e}); then {INSTALL_HINT}", python())
        });
    assert!(
        check.status.success(),
        "grpcio / grpcio-tools missing for {}: {INSTALL_HINT}\n{}",
        python(),
        String::from_utf8_lossy(&check.stderr)
    );

    let broker = TestBroker::start().await;
    let addr = broker.endpoint();
    let dir = tempfile::tempdir().expect("temp dir");
    let stubs = dir.path().join("stubs");
    // Generate the stubs once, so producer and worker start from them.
    let log = dir.path().join("stubs.log");
    let generated = spawn("stubs.py", &[], &stubs, &log);
    finish("stubs.py", generated, Duration::from_secs(60), &log).await;

    // 20 plain jobs, one that fails for good, one that fails once and asks
    // for a retry, one that runs longer than session_ttl: 24 attempts in all,
    // after which the worker says goodbye by itself.
    let sleep_payload = format!("sleep:{}", (TEST_SESSION_TTL * 2).as_secs_f64());
    let worker_log = dir.path().join("worker.log");
    let worker = spawn(
        "worker.py",
        &[
            "--addr",
            &addr,
            "--queue",
            QUEUE,
            "--worker-id",
            WORKER_ID,
            "--max-in-flight",
            "4",
            "--max-jobs",
            "24",
            "--retry-after",
            "0.1",
        ],
        &stubs,
        &worker_log,
    );
    let mut admin = broker.admin();
    eventually("the Python worker's session", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            let workers = admin.list_workers(proto::ListWorkersRequest {}).await.ok()?.into_inner().workers;
            workers.iter().any(|w| w.worker_id == WORKER_ID && w.connected && w.max_in_flight == 4).then_some(())
        }
    })
    .await;

    let plain = produce(&addr, &stubs, dir.path(), 20, "hello {i}").await;
    let failed = produce(&addr, &stubs, dir.path(), 1, "fail: poison {i}").await;
    let flaky = produce(&addr, &stubs, dir.path(), 1, "flaky {i}").await;
    let slow = produce(&addr, &stubs, dir.path(), 1, &sleep_payload).await;

    // What the producer saw (WaitJob) ...
    assert_eq!(plain.len(), 20, "{plain:?}");
    for (i, (_, state, outcome)) in plain.iter().enumerate() {
        assert_eq!((state.as_str(), outcome.as_str()), ("SUCCEEDED", format!("HELLO {i}").as_str()));
    }
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].1, "FAILED", "{failed:?}");
    assert_eq!((flaky[0].1.as_str(), slow[0].1.as_str()), ("SUCCEEDED", "SUCCEEDED"), "{flaky:?} {slow:?}");

    // ... and what the broker holds.
    let mut jobs = broker.jobs();
    for (i, (job_id, _, _)) in plain.iter().enumerate() {
        let job = get_job(&mut jobs, job_id).await;
        assert_eq!(job.state(), proto::JobState::Succeeded, "{job:?}");
        assert_eq!(job.result, format!("HELLO {i}").into_bytes());
        assert_eq!((job.attempt, job.worker_id.as_str(), job.queue.as_str()), (1, WORKER_ID, QUEUE));
    }
    let job = get_job(&mut jobs, &failed[0].0).await;
    assert_eq!(job.state(), proto::JobState::Failed, "{job:?}");
    assert!(job.max_attempts > 1 && job.attempt == 1, "no_retry must fail the first attempt for good: {job:?}");
    assert!(job.error.contains("poison"), "{job:?}");
    let job = get_job(&mut jobs, &flaky[0].0).await;
    assert_eq!(
        (job.state(), job.attempt, job.result.as_slice()),
        (proto::JobState::Succeeded, 2, b"FLAKY 0".as_slice())
    );
    assert_eq!(job.history[0].outcome(), proto::AttemptOutcome::Failed, "{job:?}");
    // Only heartbeats from the worker's background thread kept its session
    // (and so the lease) alive while this job ran for 2 x session_ttl.
    let job = get_job(&mut jobs, &slow[0].0).await;
    assert_eq!((job.state(), job.attempt), (proto::JobState::Succeeded, 1), "{job:?}");
    assert_eq!(job.result, sleep_payload.to_uppercase().into_bytes());

    // After its 24th job the worker says goodbye and exits 0; its session is gone.
    finish("worker.py", worker, Duration::from_secs(30), &worker_log).await;
    assert!(read(&worker_log).contains("goodbye"), "{}", read(&worker_log));
    eventually("the Python worker's session to end", Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let workers = admin.list_workers(proto::ListWorkersRequest {}).await.ok()?.into_inner().workers;
            (!workers.iter().any(|w| w.worker_id == WORKER_ID)).then_some(())
        }
    })
    .await;
    let queue = admin.get_queue(proto::GetQueueRequest { queue: QUEUE.into() }).await.expect("GetQueue").into_inner();
    assert_eq!((queue.succeeded, queue.failed, queue.ready, queue.active), (22, 1, 0, 0), "{queue:?}");
}
