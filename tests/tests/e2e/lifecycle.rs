//! Every transition of the job lifecycle, driven through the SDK.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use gantry_tests::{RunningWorker, TestBroker, eventually, get_job, v1 as proto, wait_for_state};
use gantry_worker::JobError;
use proto::JobState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_run_complete_and_wait() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("emails", "hello").header("trace", "t-1").send().await.unwrap();
    assert!(job.created);
    let worker = RunningWorker::spawn(&broker.endpoint(), "emails", "w1", 4, |ctx| async move {
        assert_eq!(ctx.headers().get("trace").map(String::as_str), Some("t-1"));
        let mut out = b"echo:".to_vec();
        out.extend_from_slice(ctx.payload());
        Ok(Bytes::from(out))
    });
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.result, b"echo:hello");
    assert_eq!(done.attempt, 1);
    assert!(done.fencing_token > 0);
    assert_eq!(done.worker_id, "w1");
    assert_eq!(done.history.len(), 1);
    assert_eq!(done.history[0].outcome(), proto::AttemptOutcome::Succeeded);
    assert!(done.finished_at.is_some());
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_job_returns_current_state_at_timeout() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("nobody-listens", "x").send().await.unwrap();
    let started = std::time::Instant::now();
    let current = client.wait(&job.job_id, Duration::from_millis(300)).await.unwrap();
    assert_eq!(current.state(), JobState::Ready);
    assert!(started.elapsed() >= Duration::from_millis(300), "WaitJob returned before its timeout");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_enqueue_returns_the_first_job() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let first = client.enqueue("orders", "a").idempotency_key("order-17").send().await.unwrap();
    let second = client.enqueue("orders", "b").idempotency_key("order-17").send().await.unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.job_id, second.job_id);
    let other_queue = client.enqueue("refunds", "c").idempotency_key("order-17").send().await.unwrap();
    assert!(other_queue.created, "keys are per queue");
    assert_eq!(client.get(&first.job_id).await.unwrap().payload, b"a");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_then_enqueue_order_and_delays() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let low = client.enqueue("prio", "low").send().await.unwrap().job_id;
    let high = client.enqueue("prio", "high").priority(10).send().await.unwrap().job_id;
    let low2 = client.enqueue("prio", "low2").send().await.unwrap().job_id;
    let delayed =
        client.enqueue("prio", "delayed").priority(100).delay(Duration::from_millis(1500)).send().await.unwrap();
    assert_eq!(client.get(&delayed.job_id).await.unwrap().state(), JobState::Scheduled);
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = order.clone();
    let worker = RunningWorker::spawn(&broker.endpoint(), "prio", "w", 1, move |ctx| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(ctx.job_id().to_owned());
            Ok(Bytes::new())
        }
    });
    let done = client.wait(&delayed.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(*order.lock().unwrap(), vec![high, low, low2, delayed.job_id.clone()]);
    let created = done.created_at.unwrap();
    let started = done.history[0].started_at.unwrap();
    let waited_ms = (started.seconds - created.seconds) * 1000 + i64::from(started.nanos - created.nanos) / 1_000_000;
    assert!(waited_ms >= 1500, "delayed job started after {waited_ms} ms");
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_redelivered_no_sooner_with_attempt_two() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("gearman-retry", "x").send().await.unwrap();
    let worker = RunningWorker::spawn(&broker.endpoint(), "gearman-retry", "w", 2, |ctx| async move {
        if ctx.attempt() == 1 {
            Err(JobError::retry_after(Duration::from_millis(800)))
        } else {
            Ok(Bytes::from(format!("attempt {}", ctx.attempt())))
        }
    });
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.result, b"attempt 2");
    let [first, second] = &done.history[..] else { panic!("two attempts: {:?}", done.history) };
    assert_eq!(first.outcome(), proto::AttemptOutcome::Failed);
    let failed_at = first.finished_at.unwrap();
    let retried_at = second.started_at.unwrap();
    let gap_ms =
        (retried_at.seconds - failed_at.seconds) * 1000 + i64::from(retried_at.nanos - failed_at.nanos) / 1_000_000;
    assert!(gap_ms >= 800, "redelivered {gap_ms} ms after the failure, asked for 800 ms");
    assert!(second.fencing_token > first.fencing_token);
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_fails_at_once_and_admin_redrives_it() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("fatal", "x").max_attempts(5).send().await.unwrap();
    let fail_first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = fail_first.clone();
    let worker = RunningWorker::spawn(&broker.endpoint(), "fatal", "w", 1, move |_ctx| {
        let fail = flag.swap(false, std::sync::atomic::Ordering::SeqCst);
        async move { if fail { Err(JobError::fatal("bad input: no such user")) } else { Ok(Bytes::from_static(b"ok")) } }
    });
    let failed = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(failed.state(), JobState::Failed);
    assert_eq!(failed.attempt, 1, "no_retry must not use the remaining attempts");
    assert!(failed.error.contains("no such user"), "error kept: {:?}", failed.error);
    // FAILED is the dead-letter set: list it, redrive it.
    let mut admin = broker.admin();
    let dead = admin
        .list_jobs(proto::ListJobsRequest {
            queue: "fatal".into(),
            state: JobState::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dead.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec![job.job_id.as_str()]);
    let redriven = admin.retry_job(proto::RetryJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    assert_eq!(redriven.attempt, 0);
    let done = client.wait(&job.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!((done.state(), done.result.as_slice()), (JobState::Succeeded, b"ok".as_slice()));
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_failures_exhaust_max_attempts_into_failed() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    admin
        .set_queue_config(proto::SetQueueConfigRequest {
            queue: "flaky".into(),
            config: Some(proto::QueueConfig {
                backoff_base: Some(prost_types::Duration { seconds: 0, nanos: 20_000_000 }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let client = broker.client().await;
    let job = client.enqueue("flaky", "x").max_attempts(3).send().await.unwrap();
    let worker =
        RunningWorker::spawn(&broker.endpoint(), "flaky", "w", 1, |_ctx| async { Err(JobError::failed("boom")) });
    let done = wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Failed).await;
    assert_eq!(done.attempt, 3);
    assert_eq!(done.history.len(), 3);
    assert!(done.history.iter().all(|h| h.outcome() == proto::AttemptOutcome::Failed));
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_an_active_job_revokes_it() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let job = client.enqueue("cancel-me", "x").send().await.unwrap();
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = RunningWorker::spawn(&broker.endpoint(), "cancel-me", "w", 1, move |ctx| {
        let lost_tx = lost_tx.clone();
        async move {
            ctx.lease_lost().await;
            let _ = lost_tx.send(ctx.job_id().to_owned());
            Err(JobError::failed("stopped: lease lost"))
        }
    });
    wait_for_state(&mut broker.jobs(), &job.job_id, JobState::Active).await;
    let cancelled = client.cancel(&job.job_id, "customer changed their mind").await.unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(cancelled.error.contains("customer changed their mind"));
    let revoked = tokio::time::timeout(Duration::from_secs(10), lost_rx.recv()).await.expect("handler saw lease lost");
    assert_eq!(revoked.as_deref(), Some(job.job_id.as_str()));
    // The handler's late failure changes nothing.
    eventually("stale result counted", Duration::from_secs(10), || async {
        (worker.handle.stats().stale_results >= 1).then_some(())
    })
    .await;
    let after = get_job(&mut broker.jobs(), &job.job_id).await;
    assert_eq!(after.state(), JobState::Cancelled);
    // Cancelling a terminal job says so.
    let again = client.cancel(&job.job_id, "").await.unwrap_err();
    assert_eq!(again.code(), Some(tonic::Code::FailedPrecondition));
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_purge() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    let paused = admin.pause_queue(proto::PauseQueueRequest { queue: "p".into() }).await.unwrap().into_inner();
    assert!(paused.paused);
    let client = broker.client().await;
    let a = client.enqueue("p", "a").send().await.unwrap();
    let worker = RunningWorker::spawn(&broker.endpoint(), "p", "w", 1, |_ctx| async { Ok(Bytes::new()) });
    worker.wait_connected().await;
    let still = client.wait(&a.job_id, Duration::from_millis(300)).await.unwrap();
    assert_eq!(still.state(), JobState::Ready, "a paused queue dispatched");
    admin.resume_queue(proto::ResumeQueueRequest { queue: "p".into() }).await.unwrap();
    assert_eq!(client.wait(&a.job_id, Duration::from_secs(20)).await.unwrap().state(), JobState::Succeeded);
    worker.shutdown().await;
    for _ in 0..3 {
        client.enqueue("p", "later").delay(Duration::from_secs(3600)).send().await.unwrap();
    }
    let purged = admin
        .purge_queue(proto::PurgeQueueRequest { queue: "p".into(), state: JobState::Scheduled as i32 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 3);
    let info = admin.get_queue(proto::GetQueueRequest { queue: "p".into() }).await.unwrap().into_inner();
    assert_eq!((info.scheduled, info.ready, info.succeeded), (0, 0, 1));
    broker.stop().await;
}

/// DeleteQueue is a format-1 command: a new single node raises its shard to
/// format 1 by itself within seconds; a queue with jobs is refused, an
/// emptied one forgotten, a second delete NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_queue_is_deleted_once_the_shard_allows_it() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    let client = broker.client().await;
    client.enqueue("gone", "x").delay(Duration::from_secs(3600)).send().await.unwrap();
    let delete = proto::DeleteQueueRequest { queue: "gone".into() };
    let refused = eventually("the shard raised to format 1", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        let delete = delete.clone();
        async move {
            let status = admin.delete_queue(delete).await.expect_err("a queue holding a job was deleted");
            (!status.message().contains("needs storage format")).then_some(status)
        }
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("still holds 1 job"), "{refused:?}");
    admin
        .purge_queue(proto::PurgeQueueRequest { queue: "gone".into(), state: JobState::Scheduled as i32 })
        .await
        .unwrap();
    admin.delete_queue(delete.clone()).await.expect("an empty queue is deleted");
    let listed = admin.list_queues(proto::ListQueuesRequest::default()).await.unwrap().into_inner();
    assert!(listed.queues.iter().all(|q| q.queue != "gone"), "{listed:?}");
    let again = admin.delete_queue(delete).await.expect_err("deleted twice");
    assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_timeout_reassigns_and_progress_extends() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    // Runs 4 s with a 2.5 s lease, renewed every 400 ms: only progress keeps
    // it, with two seconds of slack for a slow commit on a loaded machine.
    let extended = client.enqueue("slow", "extend").lease_timeout(Duration::from_millis(2500)).send().await.unwrap();
    let worker = RunningWorker::spawn(&broker.endpoint(), "slow", "w", 2, |ctx| async move {
        if ctx.payload().as_ref() == b"extend" {
            for step in 0..10 {
                ctx.progress(format!("step {step}"), Some(Duration::from_millis(2500)))
                    .await
                    .map_err(|e| JobError::failed(e.to_string()))?;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok(Bytes::from_static(b"extended"))
        } else if ctx.attempt() == 1 {
            ctx.lease_lost().await;
            Err(JobError::failed("lease lost"))
        } else {
            Ok(Bytes::from_static(b"second attempt"))
        }
    });
    let done = client.wait(&extended.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!((done.state(), done.attempt), (JobState::Succeeded, 1), "progress kept the lease");
    assert_eq!(done.progress, "step 9");
    // The lease clock starts when the leader stamps the assignment, so a
    // commit slower than the lease (fsync tails of 450 ms happen here) can
    // also time out a later attempt: every attempt before the last must have
    // timed out, and the job must still end with one success.
    let hung = client.enqueue("slow", "hang").lease_timeout(Duration::from_millis(800)).send().await.unwrap();
    let done = client.wait(&hung.job_id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    assert!(done.attempt >= 2, "the hung first attempt was not reassigned: {done:?}");
    let (last, earlier) = done.history.split_last().expect("attempts are recorded");
    assert_eq!(last.outcome(), proto::AttemptOutcome::Succeeded);
    assert!(!earlier.is_empty());
    for attempt in earlier {
        assert_eq!(attempt.outcome(), proto::AttemptOutcome::LeaseTimedOut, "{done:?}");
    }
    worker.shutdown().await;
    broker.stop().await;
}

/// A worker that stops gracefully finishes its running job and takes no
/// new one: the job waiting in the queue is not pushed to it when the slot
/// frees (to be released, or counted as an attempt at goodbye).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_is_not_handed_new_jobs() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<()>();
    let finish = Arc::new(tokio::sync::Notify::new());
    let running = client.enqueue("stopping", "running").send().await.unwrap();
    let worker = RunningWorker::spawn(&broker.endpoint(), "stopping", "w", 1, {
        let finish = finish.clone();
        move |_ctx| {
            let (finish, started_tx) = (finish.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(());
                finish.notified().await;
                Ok(Bytes::from_static(b"done"))
            }
        }
    });
    started.recv().await.expect("the first job started");
    let waiting = client.enqueue("stopping", "waiting").send().await.unwrap();
    let stopped = tokio::spawn(worker.shutdown());
    let mut admin = broker.admin();
    a_worker_is_listed(&admin, "the worker is draining", |w| w.draining).await;
    finish.notify_one();
    stopped.await.unwrap();
    assert_eq!(client.get(&running.job_id).await.unwrap().state(), JobState::Succeeded);
    let job = client.get(&waiting.job_id).await.unwrap();
    assert_eq!((job.state(), job.attempt, job.history.len()), (JobState::Ready, 0, 0), "{job:?}");
    let workers = admin.list_workers(proto::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert!(workers.is_empty(), "{workers:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_says_goodbye() {
    let broker = TestBroker::start().await;
    let worker = RunningWorker::spawn(&broker.endpoint(), "bye", "w", 1, |_ctx| async { Ok(Bytes::new()) });
    let session = worker.wait_connected().await;
    let mut admin = broker.admin();
    let listed = admin.list_workers(proto::ListWorkersRequest {}).await.unwrap().into_inner();
    assert!(listed.workers.iter().any(|w| w.session_id == session && w.connected && w.queues == ["bye"]));
    worker.shutdown().await;
    eventually("session gone after goodbye", Duration::from_secs(5), || {
        let mut admin = admin.clone();
        async move {
            let workers = admin.list_workers(proto::ListWorkersRequest {}).await.unwrap().into_inner().workers;
            workers.is_empty().then_some(())
        }
    })
    .await;
    broker.stop().await;
}

async fn a_worker_is_listed(
    admin: &proto::admin_client::AdminClient<tonic::transport::Channel>,
    what: &str,
    matches: impl Fn(&proto::WorkerInfo) -> bool,
) {
    let matches = &matches;
    eventually(what, Duration::from_secs(10), || {
        let mut admin = admin.clone();
        async move {
            let workers = admin.list_workers(proto::ListWorkersRequest {}).await.unwrap().into_inner().workers;
            workers.iter().any(matches).then_some(())
        }
    })
    .await;
}

async fn commit_index(admin: &mut proto::admin_client::AdminClient<tonic::transport::Channel>) -> u64 {
    let status = admin.cluster_status(proto::ClusterStatusRequest::default()).await.unwrap().into_inner();
    status.shards[0].commit_index
}

/// The leader appends a `Dispatch` to the entries it proposes, so a job
/// enqueued while a worker waits is leased by the enqueue's own commit, and
/// a result frees a slot and fills it in one commit: one log entry per job,
/// not two, on the path from enqueue to start and from job to job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_rides_along_one_commit_per_job() {
    const BACKLOG: u64 = 20;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let mut admin = broker.admin();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = RunningWorker::spawn(&broker.endpoint(), "riding", "w", 1, {
        let release = release.clone();
        move |ctx| {
            let (release, started_tx) = (release.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(ctx.fencing_token());
                if ctx.payload().as_ref() == b"hold" {
                    release.notified().await;
                }
                Ok(Bytes::new())
            }
        }
    });
    worker.wait_connected().await;
    a_worker_is_listed(&admin, "the worker's stream is attached", |w| w.connected).await;

    let before = commit_index(&mut admin).await;
    client.enqueue("riding", "hold").send().await.unwrap();
    let token = started.recv().await.expect("the job started");
    assert_eq!(token >> 20, before + 1, "leased by a later entry than the one that enqueued it");
    assert_eq!(commit_index(&mut admin).await, before + 1);

    // A backlog behind the held job: each result is followed, in its own
    // entry, by the next job's lease.
    let requests = (0..BACKLOG)
        .map(|i| proto::EnqueueRequest {
            queue: "riding".into(),
            payload: format!("job {i}").into(),
            ..Default::default()
        })
        .collect();
    let backlog = client.enqueue_batch(requests).await.unwrap();
    let last = backlog.last().unwrap().job_id.clone();
    let before = commit_index(&mut admin).await;
    release.notify_one();
    let done = client.wait(&last, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let entries = commit_index(&mut admin).await - before;
    assert!(entries <= BACKLOG + 1, "{entries} entries for {BACKLOG} jobs one after another");
    worker.shutdown().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_purge_is_split_over_entries_and_drops_every_job() {
    const JOBS: usize = 10_000;
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    let client = broker.client().await;
    let request = |queue: &str, i: usize| proto::EnqueueRequest {
        queue: queue.into(),
        payload: format!("job {i}").into(),
        ..Default::default()
    };
    for chunk in 0..2 {
        client.enqueue_batch((0..JOBS / 2).map(|i| request("big", chunk * JOBS + i)).collect()).await.unwrap();
    }
    let kept = client.enqueue_batch((0..10).map(|i| request("small", i)).collect()).await.unwrap();

    let before = commit_index(&mut admin).await;
    let purged = admin
        .purge_queue(proto::PurgeQueueRequest { queue: "big".into(), state: JobState::Ready as i32 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, JOBS as u64);
    let entries = commit_index(&mut admin).await - before;
    assert!(entries >= 3, "a purge of {JOBS} jobs took {entries} entries: not split");
    let big = admin.get_queue(proto::GetQueueRequest { queue: "big".into() }).await.unwrap().into_inner();
    assert_eq!((big.ready, big.scheduled), (0, 0));
    let small = admin.get_queue(proto::GetQueueRequest { queue: "small".into() }).await.unwrap().into_inner();
    assert_eq!(small.ready, 10);
    assert_eq!(client.get(&kept[0].job_id).await.unwrap().state(), JobState::Ready);
    broker.stop().await;
}
