//! The real binary, killed with SIGKILL: every acknowledged job survives in
//! its state, through the Raft log and through snapshots.

use gantry_tests::{BinaryBroker, v1 as proto};
use proto::{broker_message::Kind as Out, worker_message::Kind as In};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_jobs_survive_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Snapshots every few entries, so recovery goes through snapshot + log.
    let mut broker = BinaryBroker::start(&dir.path().join("node"), &["--snapshot-every", "5"]).await;
    let mut jobs = broker.jobs();
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        let id = jobs
            .enqueue(proto::EnqueueRequest {
                queue: "durable".into(),
                payload: format!("job {i}").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        acknowledged.push(id);
    }
    let batch: Vec<proto::EnqueueRequest> = (0..200)
        .map(|i| proto::EnqueueRequest { queue: "bulk".into(), payload: vec![i as u8; 256], ..Default::default() })
        .collect();
    let results = jobs.enqueue_batch(proto::EnqueueBatchRequest { jobs: batch }).await.unwrap().into_inner().results;
    acknowledged.extend(results.into_iter().map(|r| r.job_id));

    // Exactly four jobs in the worker's queue, so nothing is dispatched after
    // the states below are read: complete three over a raw stream, keep a
    // fourth active.
    for i in 0..4 {
        let id = jobs
            .enqueue(proto::EnqueueRequest {
                queue: "work".into(),
                payload: format!("work {i}").into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        acknowledged.push(id);
    }
    let (tx, out) = mpsc::unbounded_channel();
    tx.send(proto::WorkerMessage {
        kind: Some(In::Hello(proto::Hello {
            worker_id: "w".into(),
            queues: vec!["work".into()],
            max_in_flight: 4,
            resume_session_id: String::new(),
        })),
    })
    .unwrap();
    let mut rx = broker.worker().connect(UnboundedReceiverStream::new(out)).await.unwrap().into_inner();
    let mut assigned = Vec::new();
    while assigned.len() < 4 {
        if let Some(Out::Assign(a)) = rx.next().await.unwrap().unwrap().kind {
            assigned.push(a);
        }
    }
    for a in &assigned[..3] {
        tx.send(proto::WorkerMessage {
            kind: Some(In::Complete(proto::Complete {
                job_id: a.job.as_ref().unwrap().id.clone(),
                fencing_token: a.fencing_token,
                result: b"done".to_vec(),
            })),
        })
        .unwrap();
    }
    let mut acks = 0;
    while acks < 3 {
        if let Some(Out::Ack(ack)) = rx.next().await.unwrap().unwrap().kind {
            assert_eq!(ack.status(), proto::AckStatus::Accepted);
            acks += 1;
        }
    }
    let before: Vec<proto::Job> = {
        let mut all = Vec::new();
        for id in &acknowledged {
            all.push(jobs.get_job(proto::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner());
        }
        all
    };

    // A snapshot (with the log purged behind it) before the kill, and more
    // entries after it: recovery has to combine both.
    let mut admin = broker.admin();
    gantry_tests::eventually("a snapshot", std::time::Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move {
            let status = admin.cluster_status(proto::ClusterStatusRequest::default()).await.ok()?.into_inner();
            (status.shards[0].snapshot_index > 0).then_some(())
        }
    })
    .await;
    let late = jobs
        .enqueue(proto::EnqueueRequest {
            queue: "durable".into(),
            payload: b"after the snapshot".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let before: Vec<proto::Job> = {
        let mut all = before;
        all.push(jobs.get_job(proto::GetJobRequest { job_id: late }).await.unwrap().into_inner());
        all
    };
    let _ = admin.list_queues(proto::ListQueuesRequest {}).await.unwrap();

    broker.kill9();
    broker.restart().await;
    let mut jobs = broker.jobs();
    for job in &before {
        let after = jobs.get_job(proto::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
        assert_eq!(after.state, job.state, "job {} changed state across SIGKILL", job.id);
        assert_eq!(
            (&after.payload, &after.result, after.fencing_token),
            (&job.payload, &job.result, job.fencing_token)
        );
    }
    let succeeded = before.iter().filter(|j| j.state() == proto::JobState::Succeeded).count();
    let active = before.iter().filter(|j| j.state() == proto::JobState::Active).count();
    assert_eq!(succeeded, 3);
    assert_eq!(active, 1, "the active job keeps its lease");
    // The broker serves new work after the restart, with larger job ids.
    let id = jobs
        .enqueue(proto::EnqueueRequest { queue: "durable".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert!(!acknowledged.contains(&id));
    let status = broker.admin().cluster_status(proto::ClusterStatusRequest::default()).await.unwrap().into_inner();
    assert!(status.shards[0].snapshot_index > 0, "recovered from a snapshot: {status:?}");
}
