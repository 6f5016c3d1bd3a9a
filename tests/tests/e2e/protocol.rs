//! `Worker.Connect` at the wire level, with a raw tonic stream: hello rules,
//! acks, stale tokens, and session resume re-sending assignments.

use std::time::Duration;

use gantry_tests::{TestBroker, enqueue, get_job, v1 as proto};
use proto::{broker_message::Kind as Out, worker_message::Kind as In};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};
use tonic::Streaming;

struct RawWorker {
    tx: mpsc::UnboundedSender<proto::WorkerMessage>,
    rx: Streaming<proto::BrokerMessage>,
}

impl RawWorker {
    async fn open(broker: &TestBroker, hello: proto::Hello) -> Result<(RawWorker, proto::Welcome), tonic::Status> {
        let (tx, out) = mpsc::unbounded_channel();
        tx.send(proto::WorkerMessage { kind: Some(In::Hello(hello)) }).unwrap();
        let rx = broker.worker().connect(UnboundedReceiverStream::new(out)).await?.into_inner();
        let mut worker = RawWorker { tx, rx };
        match worker.next().await? {
            Out::Welcome(welcome) => Ok((worker, welcome)),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    fn send(&self, kind: In) {
        self.tx.send(proto::WorkerMessage { kind: Some(kind) }).expect("stream open");
    }

    async fn next(&mut self) -> Result<Out, tonic::Status> {
        let message = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("a broker message within 10 s")
            .expect("stream open")?;
        Ok(message.kind.expect("message kind"))
    }

    async fn next_assign(&mut self) -> proto::Assign {
        loop {
            if let Out::Assign(assign) = self.next().await.unwrap() {
                return assign;
            }
        }
    }

    async fn next_ack(&mut self) -> proto::Ack {
        loop {
            if let Out::Ack(ack) = self.next().await.unwrap() {
                return ack;
            }
        }
    }
}

fn hello(queue: &str, resume: &str) -> proto::Hello {
    proto::Hello {
        worker_id: "raw".into(),
        queues: vec![queue.into()],
        max_in_flight: 4,
        resume_session_id: resume.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_must_be_a_valid_hello() {
    let broker = TestBroker::start().await;
    let bad = RawWorker::open(&broker, proto::Hello { max_in_flight: 0, ..hello("q", "") }).await.err().unwrap();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("max_in_flight"), "{}", bad.message());
    let bad = RawWorker::open(&broker, proto::Hello { queues: vec!["no spaces".into()], ..hello("q", "") })
        .await
        .err()
        .unwrap();
    assert!(bad.message().contains("queues"), "{}", bad.message());
    let (tx, out) = mpsc::unbounded_channel();
    tx.send(proto::WorkerMessage { kind: Some(In::Heartbeat(proto::Heartbeat {})) }).unwrap();
    let err = broker.worker().connect(UnboundedReceiverStream::new(out)).await.err().unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("hello"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_acked_and_stale_or_unknown_tokens_refused() {
    let broker = TestBroker::start().await;
    let mut jobs = broker.jobs();
    let job_id = enqueue(&mut jobs, "raw", b"x").await;
    let (mut worker, welcome) = RawWorker::open(&broker, hello("raw", "")).await.unwrap();
    assert!(!welcome.resumed);
    let assign = worker.next_assign().await;
    assert_eq!(assign.job.as_ref().unwrap().id, job_id);
    assert_eq!(assign.attempt, 1);
    let token = assign.fencing_token;
    worker.send(In::Progress(proto::Progress {
        job_id: job_id.clone(),
        fencing_token: token,
        message: "half".into(),
        extend: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
    }));
    let ack = worker.next_ack().await;
    assert_eq!(ack.status(), proto::AckStatus::Accepted);
    assert!(ack.lease_deadline.is_some());
    worker.send(In::Complete(proto::Complete { job_id: job_id.clone(), fencing_token: token + 1, result: vec![] }));
    let stale = worker.next_ack().await;
    assert_eq!(stale.status(), proto::AckStatus::StaleLease);
    assert!(stale.message.contains("stale"));
    worker.send(In::Complete(proto::Complete { job_id: "0-999999".into(), fencing_token: token, result: vec![] }));
    assert_eq!(worker.next_ack().await.status(), proto::AckStatus::UnknownJob);
    worker.send(In::Complete(proto::Complete { job_id: "garbage".into(), fencing_token: token, result: vec![] }));
    let unknown = worker.next_ack().await;
    assert_eq!(unknown.status(), proto::AckStatus::UnknownJob);
    assert!(unknown.message.contains("job_id"));
    worker.send(In::Complete(proto::Complete { job_id: job_id.clone(), fencing_token: token, result: b"r".to_vec() }));
    assert_eq!(worker.next_ack().await.status(), proto::AckStatus::Accepted);
    let job = get_job(&mut jobs, &job_id).await;
    assert_eq!((job.state(), job.result.as_slice()), (proto::JobState::Succeeded, b"r".as_slice()));
    broker.stop().await;
}

/// A broken stream does not end the session: resuming it within session_ttl
/// keeps its jobs, and the broker sends their assignments again, same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_keeps_its_jobs_and_gets_assignments_again() {
    let broker = TestBroker::start_with(|c| c.session_ttl = Duration::from_secs(30)).await;
    let mut jobs = broker.jobs();
    let job_id = enqueue(&mut jobs, "resume", b"x").await;
    let (mut worker, welcome) = RawWorker::open(&broker, hello("resume", "")).await.unwrap();
    let first = worker.next_assign().await;
    drop(worker); // the stream breaks: no goodbye
    let (mut again, resumed) = RawWorker::open(&broker, hello("resume", &welcome.session_id)).await.unwrap();
    assert!(resumed.resumed);
    assert_eq!(resumed.session_id, welcome.session_id);
    let resent = again.next_assign().await;
    assert_eq!((resent.job.unwrap().id, resent.fencing_token), (job_id.clone(), first.fencing_token));
    again.send(In::Complete(proto::Complete {
        job_id: job_id.clone(),
        fencing_token: first.fencing_token,
        result: vec![],
    }));
    assert_eq!(again.next_ack().await.status(), proto::AckStatus::Accepted);
    assert_eq!(get_job(&mut jobs, &job_id).await.attempt, 1);
    broker.stop().await;
}

/// Resuming a session that expired meanwhile: a new session, and a revoke
/// for every job the old one held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_an_expired_session_revokes_its_old_jobs() {
    let broker = TestBroker::start().await;
    let mut jobs = broker.jobs();
    let job_id = enqueue(&mut jobs, "expired", b"x").await;
    let (mut worker, welcome) = RawWorker::open(&broker, hello("expired", "")).await.unwrap();
    let assign = worker.next_assign().await;
    drop(worker);
    gantry_tests::wait_for_state(&mut jobs, &job_id, proto::JobState::Ready).await;
    let (mut again, fresh) = RawWorker::open(&broker, hello("expired", &welcome.session_id)).await.unwrap();
    assert!(!fresh.resumed);
    assert_ne!(fresh.session_id, welcome.session_id);
    match again.next().await.unwrap() {
        Out::Revoke(revoke) => {
            assert_eq!((revoke.job_id.as_str(), revoke.fencing_token), (job_id.as_str(), assign.fencing_token));
            assert!(revoke.reason.contains("expired"));
        }
        other => panic!("expected revoke, got {other:?}"),
    }
    let reassigned = again.next_assign().await;
    assert_eq!(reassigned.attempt, 2);
    assert!(reassigned.fencing_token > assign.fencing_token);
    broker.stop().await;
}

/// Release gives a job back unstarted: READY again at once, attempt not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_requeues_without_counting_the_attempt() {
    let broker = TestBroker::start().await;
    let mut jobs = broker.jobs();
    let job_id = enqueue(&mut jobs, "release", b"x").await;
    let (mut worker, _) =
        RawWorker::open(&broker, proto::Hello { max_in_flight: 1, ..hello("release", "") }).await.unwrap();
    let first = worker.next_assign().await;
    worker.send(In::Release(proto::Release { job_id: job_id.clone(), fencing_token: first.fencing_token }));
    assert_eq!(worker.next_ack().await.status(), proto::AckStatus::Accepted);
    // The same session gets it again, as attempt 1 with a new token.
    let again = worker.next_assign().await;
    assert_eq!((again.attempt, again.job.unwrap().id), (1, job_id.clone()));
    assert!(again.fencing_token > first.fencing_token);
    let job = get_job(&mut jobs, &job_id).await;
    assert_eq!(job.history[0].outcome(), proto::AttemptOutcome::Released);
    worker.send(In::Goodbye(proto::Goodbye {}));
    drop(worker);
    // Goodbye with the job still held: it goes back at once, not after session_ttl.
    let job = gantry_tests::wait_for_state(&mut jobs, &job_id, proto::JobState::Ready).await;
    assert_eq!(job.history.last().unwrap().outcome(), proto::AttemptOutcome::SessionExpired);
    broker.stop().await;
}

/// Drain (graceful shutdown): the session is assigned nothing more, so a job
/// it releases, and any new job, go to other workers; the jobs it still
/// runs keep their leases and their results are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_assignments_and_released_jobs_go_elsewhere() {
    let broker = TestBroker::start().await;
    let mut jobs = broker.jobs();
    let a = enqueue(&mut jobs, "drain", b"a").await;
    let b = enqueue(&mut jobs, "drain", b"b").await;
    let (mut stopping, welcome) =
        RawWorker::open(&broker, proto::Hello { max_in_flight: 2, ..hello("drain", "") }).await.unwrap();
    let held = [stopping.next_assign().await, stopping.next_assign().await];
    let token = |id: &str| held.iter().find(|x| x.job.as_ref().unwrap().id == id).unwrap().fencing_token;
    stopping.send(In::Drain(proto::Drain {}));
    stopping.send(In::Release(proto::Release { job_id: a.clone(), fencing_token: token(&a) }));
    assert_eq!(stopping.next_ack().await.status(), proto::AckStatus::Accepted);
    let workers = broker.admin().list_workers(proto::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let me = workers.iter().find(|w| w.session_id == welcome.session_id).expect("session listed");
    assert!(me.draining && me.in_flight == 1, "{me:?}");
    let c = enqueue(&mut jobs, "drain", b"c").await;
    let (mut other, _) = RawWorker::open(&broker, hello("drain", "")).await.unwrap();
    let mut elsewhere = vec![other.next_assign().await.job.unwrap().id, other.next_assign().await.job.unwrap().id];
    elsewhere.sort();
    let mut expected = vec![a.clone(), c];
    expected.sort();
    assert_eq!(elsewhere, expected);
    stopping.send(In::Complete(proto::Complete {
        job_id: b.clone(),
        fencing_token: token(&b),
        result: b"ok".to_vec(),
    }));
    loop {
        match stopping.next().await.unwrap() {
            Out::Ack(ack) => {
                assert_eq!((ack.job_id.as_str(), ack.status()), (b.as_str(), proto::AckStatus::Accepted));
                break;
            }
            Out::Assign(assign) => panic!("a draining session was assigned {assign:?}"),
            _ => {}
        }
    }
    let job = get_job(&mut jobs, &a).await;
    assert_eq!(job.history[0].outcome(), proto::AttemptOutcome::Released);
    assert_eq!(job.attempt, 1, "the release cost no attempt");
    stopping.send(In::Goodbye(proto::Goodbye {}));
    broker.stop().await;
}

/// Terminal jobs are kept for the queue's retention, then dropped (and
/// their idempotency keys become free again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_jobs_are_dropped_after_retention() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    admin
        .set_queue_config(proto::SetQueueConfigRequest {
            queue: "short".into(),
            config: Some(proto::QueueConfig {
                retention: Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 }),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut jobs = broker.jobs();
    let keyed = proto::EnqueueRequest { queue: "short".into(), idempotency_key: "k".into(), ..Default::default() };
    let job_id = jobs.enqueue(keyed.clone()).await.unwrap().into_inner().job_id;
    jobs.cancel_job(proto::CancelJobRequest { job_id: job_id.clone(), reason: "done".into() }).await.unwrap();
    gantry_tests::eventually("job dropped after retention", Duration::from_secs(10), || {
        let mut jobs = jobs.clone();
        let job_id = job_id.clone();
        async move {
            let gone = jobs.get_job(proto::GetJobRequest { job_id }).await.err()?;
            (gone.code() == tonic::Code::NotFound).then_some(())
        }
    })
    .await;
    let again = jobs.enqueue(keyed).await.unwrap().into_inner();
    assert!(again.created && again.job_id != job_id, "the key is free again");
    broker.stop().await;
}
