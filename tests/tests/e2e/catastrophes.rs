//! The two field reports Gantry answers (DESIGN §1, background/): a worker
//! that only *looks* dead (zc.async), and a worker that really dies
//! (Gearman).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use gantry_tests::{RunningWorker, TEST_SESSION_TTL, TestBroker, eventually, get_job, v1 as proto, wait_for_state};
use gantry_worker::JobError;
use proto::JobState;
use tokio::sync::Notify;

/// zc.async, "catastrophes revisited": the first worker keeps its stream open
/// but its heartbeats stop (its ping was blocked). After session_ttl its job
/// goes to a second worker with a larger fencing token; the first worker's
/// late result is answered STALE_LEASE, changes nothing, and is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_that_only_looks_dead_loses_its_job_and_its_late_result() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let release_first = Arc::new(Notify::new());
    let first_tokens = Arc::new(AtomicU64::new(0));
    let (gate, tokens) = (release_first.clone(), first_tokens.clone());
    let first = RunningWorker::spawn(&broker.endpoint(), "zc", "looks-dead", 1, move |ctx| {
        let (gate, tokens) = (gate.clone(), tokens.clone());
        async move {
            tokens.store(ctx.fencing_token(), Ordering::SeqCst);
            // A long commit: the handler keeps working, unaware.
            gate.notified().await;
            Ok(Bytes::from_static(b"from the first worker"))
        }
    });
    first.wait_connected().await;
    let job = client.enqueue("zc", "payload").send().await.unwrap();
    let active = wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    assert_eq!(active.worker_id, "looks-dead");
    let first_token = active.fencing_token;

    // The second worker is ready before the first one looks dead.
    let second = RunningWorker::spawn(&broker.endpoint(), "zc", "healthy", 1, |ctx| async move {
        Ok(Bytes::from(format!("from the second worker, token {}", ctx.fencing_token())))
    });
    second.wait_connected().await;
    first.handle.pause_heartbeats(true);

    let done = tokio::time::timeout(TEST_SESSION_TTL * 20, client.wait(&job.job_id, TEST_SESSION_TTL * 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.worker_id, "healthy");
    assert!(done.fencing_token > first_token, "the new holder's token must be larger");
    assert_eq!(done.result, format!("from the second worker, token {}", done.fencing_token).as_bytes());
    assert_eq!(done.history[0].outcome(), proto::AttemptOutcome::SessionExpired);
    assert_eq!(done.attempt, 2);
    // The SDK told the first handler its lease was lost.
    eventually("first worker saw lease lost", Duration::from_secs(10), || async {
        (first.handle.stats().lease_lost >= 1).then_some(())
    })
    .await;

    // The first worker finishes at last: refused, not retried, nothing changed.
    release_first.notify_one();
    eventually("late result answered STALE_LEASE", Duration::from_secs(10), || async {
        (first.handle.stats().stale_results == 1).then_some(())
    })
    .await;
    assert_eq!(first.handle.stats().completed, 0);
    let after = get_job(&mut broker.jobs(), &job.job_id).await;
    assert_eq!(after, done, "a stale result changed the job");
    assert_eq!(first_tokens.load(Ordering::SeqCst), first_token);
    first.handle.pause_heartbeats(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.handle.stats().stale_results, 1, "the SDK retried a refused result");
    first.kill();
    second.shutdown().await;
    broker.stop().await;
}

/// Gearman: the worker dies mid-job (no goodbye, no release). The job is not
/// lost: after session_ttl it runs again on another worker and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_is_finished_by_another() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let dying = RunningWorker::spawn(&broker.endpoint(), "gearman", "dies", 1, |_ctx| async {
        std::future::pending::<()>().await;
        Ok(Bytes::new())
    });
    dying.wait_connected().await;
    let job = client.enqueue("gearman", "x").send().await.unwrap();
    let active = wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    assert_eq!(active.worker_id, "dies");
    dying.kill();
    let survivor = RunningWorker::spawn(&broker.endpoint(), "gearman", "survives", 1, |ctx| async move {
        Ok(Bytes::from(format!("attempt {}", ctx.attempt())))
    });
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.worker_id, "survives");
    assert_eq!(done.result, b"attempt 2");
    assert_eq!(done.history[0].outcome(), proto::AttemptOutcome::SessionExpired);
    survivor.shutdown().await;
    broker.stop().await;
}

/// Gearman again, with a real process: a worker process (the SDK's
/// echo_worker example) is SIGKILLed while its job runs; the job finishes
/// on another worker, as attempt 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_killed_mid_job_is_finished_by_another() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("gearman-process", "x").send().await.unwrap();
    let mut process = std::process::Command::new(gantry_tests::echo_worker_binary())
        .arg("gearman-process")
        .env("GANTRY_ADDR", broker.endpoint())
        .env("GANTRY_WORKER_ID", "doomed-process")
        .env("ECHO_DELAY_MS", "600000")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start echo_worker");
    let active = wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    assert_eq!(active.worker_id, "doomed-process");
    process.kill().expect("SIGKILL the worker process");
    process.wait().expect("reap");
    let survivor = RunningWorker::spawn(&broker.endpoint(), "gearman-process", "survivor", 1, |ctx| async move {
        Ok(Bytes::from(format!("attempt {}", ctx.attempt())))
    });
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (done.state(), done.worker_id.as_str(), done.result.as_slice()),
        (JobState::Succeeded, "survivor", b"attempt 2".as_slice())
    );
    assert_eq!(done.history[0].outcome(), proto::AttemptOutcome::SessionExpired);
    assert_eq!(done.history[0].worker_id, "doomed-process");
    survivor.shutdown().await;
    broker.stop().await;
}

/// The opposite of a crash: a worker process told to stop with SIGTERM
/// (how Kubernetes stops a pod) finishes the job it runs, then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_stopped_with_sigterm_finishes_its_job() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("sigterm", "x").send().await.unwrap();
    let mut process = std::process::Command::new(gantry_tests::echo_worker_binary())
        .arg("sigterm")
        .env("GANTRY_ADDR", broker.endpoint())
        .env("GANTRY_WORKER_ID", "terminated-process")
        .env("ECHO_DELAY_MS", "1000")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start echo_worker");
    wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    let term = std::process::Command::new("kill").args(["-TERM", &process.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || process.wait().expect("reap")).await.unwrap();
    assert!(status.success(), "echo_worker exited with {status} after SIGTERM");
    let done = get_job(&mut broker.jobs(), &job.job_id).await;
    assert_eq!((done.state(), done.attempt, done.worker_id.as_str()), (JobState::Succeeded, 1, "terminated-process"));
    broker.stop().await;
}

/// Admin.ExpireSession declares a worker dead by hand: its jobs go at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_expires_a_session_and_its_jobs_move() {
    let broker = TestBroker::start_with(|c| c.session_ttl = Duration::from_secs(60)).await;
    let client = broker.client().await;
    let stuck = RunningWorker::spawn(&broker.endpoint(), "manual", "stuck", 1, |ctx| async move {
        ctx.lease_lost().await;
        Err(JobError::failed("lost"))
    });
    let session = stuck.wait_connected().await;
    let job = client.enqueue("manual", "x").send().await.unwrap();
    wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    let mut admin = broker.admin();
    let expired =
        admin.expire_session(proto::ExpireSessionRequest { session_id: session.clone() }).await.unwrap().into_inner();
    assert_eq!(expired.jobs_released, 1);
    let job_now = get_job(&mut broker.jobs(), &job.job_id).await;
    assert_eq!(job_now.state(), JobState::Ready);
    assert!(job_now.history[0].error.contains("administrator"));
    let missing = admin.expire_session(proto::ExpireSessionRequest { session_id: session }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    stuck.kill();
    broker.stop().await;
}
