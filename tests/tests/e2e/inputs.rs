//! Bad input is answered INVALID_ARGUMENT naming the field (or another
//! precise status), and the broker is fine afterwards.

use std::collections::HashMap;

use gantry_tests::{TestBroker, enqueue, get_job, v1 as proto};
use tonic::Code;

fn request(queue: &str) -> proto::EnqueueRequest {
    proto::EnqueueRequest { queue: queue.into(), payload: b"p".to_vec(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_enqueues_name_the_field_and_nothing_breaks() {
    let broker = TestBroker::start_with(|c| c.max_payload_bytes = 1024).await;
    let mut jobs = broker.jobs();
    let too_many_headers: HashMap<String, String> = (0..100).map(|i| (format!("h{i}"), "v".into())).collect();
    let cases: Vec<(proto::EnqueueRequest, &str)> = vec![
        (request(""), "queue"),
        (request("has space"), "queue"),
        (request(&"q".repeat(129)), "queue"),
        (proto::EnqueueRequest { payload: vec![0; 1025], ..request("q") }, "payload"),
        (
            proto::EnqueueRequest { delay: Some(prost_types::Duration { seconds: -5, nanos: 0 }), ..request("q") },
            "delay",
        ),
        (proto::EnqueueRequest { headers: too_many_headers, ..request("q") }, "headers"),
        (proto::EnqueueRequest { max_attempts: 100_000, ..request("q") }, "max_attempts"),
        (
            proto::EnqueueRequest {
                lease_timeout: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
                ..request("q")
            },
            "lease_timeout",
        ),
    ];
    for (bad, field) in cases {
        let status = jobs.enqueue(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(field), "message {:?} does not name {field}", status.message());
    }
    let batch = proto::EnqueueBatchRequest { jobs: vec![request("ok"), request("not ok!")] };
    let status = jobs.enqueue_batch(batch).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("jobs[1].queue"), "{}", status.message());
    let empty = jobs.enqueue_batch(proto::EnqueueBatchRequest { jobs: vec![] }).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    // Nothing of the refused batch was enqueued, and the broker still works.
    let id = enqueue(&mut jobs, "ok", b"fine").await;
    assert_eq!(get_job(&mut jobs, &id).await.payload, b"fine");
    let mut admin = broker.admin();
    let queues = admin.list_queues(proto::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    assert_eq!(queues.iter().map(|q| (q.queue.as_str(), q.ready)).collect::<Vec<_>>(), vec![("ok", 1)]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_states_get_precise_statuses() {
    let broker = TestBroker::start().await;
    let mut jobs = broker.jobs();
    let status = jobs.get_job(proto::GetJobRequest { job_id: "nonsense".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("job_id"));
    let status = jobs.get_job(proto::GetJobRequest { job_id: "0-424242".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = jobs.get_job(proto::GetJobRequest { job_id: "7-1".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "a shard this cluster lacks");
    let status = jobs
        .wait_job(proto::WaitJobRequest {
            job_id: "0-1".into(),
            timeout: Some(prost_types::Duration { seconds: 7200, nanos: 0 }),
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("timeout"), "{}", status.message());
    let mut admin = broker.admin();
    let status = admin.get_queue(proto::GetQueueRequest { queue: "never-used".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = admin
        .purge_queue(proto::PurgeQueueRequest { queue: "q".into(), state: proto::JobState::Active as i32 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("state"));
    let status =
        admin.retry_job(proto::RetryJobRequest { job_id: enqueue(&mut jobs, "q", b"").await }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "only FAILED jobs can be redriven");
    let status = admin
        .set_queue_config(proto::SetQueueConfigRequest {
            queue: "q".into(),
            config: Some(proto::QueueConfig { max_attempts: Some(0), ..Default::default() }),
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("config.max_attempts"), "{}", status.message());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    admin
        .set_queue_config(proto::SetQueueConfigRequest {
            queue: "small".into(),
            config: Some(proto::QueueConfig { max_depth: Some(2), ..Default::default() }),
        })
        .await
        .unwrap();
    let mut jobs = broker.jobs();
    enqueue(&mut jobs, "small", b"1").await;
    enqueue(&mut jobs, "small", b"2").await;
    let status = jobs.enqueue(request("small")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("maximum depth of 2"));
    let batch = jobs.enqueue_batch(proto::EnqueueBatchRequest { jobs: vec![request("other"), request("small")] }).await;
    let results = batch.unwrap().into_inner().results;
    assert!(results[0].error.is_empty() && !results[0].job_id.is_empty());
    assert!(results[1].job_id.is_empty() && results[1].error.contains("maximum depth"));
    broker.stop().await;
}

/// The SDK's coalescing client packs concurrent enqueues into EnqueueBatch
/// calls; each caller still gets its own answer, and one bad job fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_enqueues_answer_each_caller() {
    let broker = TestBroker::start().await;
    let mut admin = broker.admin();
    admin
        .set_queue_config(proto::SetQueueConfigRequest {
            queue: "capped".into(),
            config: Some(proto::QueueConfig { max_depth: Some(1), ..Default::default() }),
        })
        .await
        .unwrap();
    let client = broker.client().await.coalescing(64);
    let calls = (0..200).map(|i| {
        let client = client.clone();
        async move {
            let queue = match i {
                7 => "bad queue",
                8 | 9 => "capped",
                _ => "coalesced",
            };
            client.enqueue(queue, format!("job {i}")).send().await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut ids = std::collections::HashSet::new();
    for (i, answer) in answers.iter().enumerate() {
        match (i, answer) {
            (7, Err(e)) => {
                assert_eq!(e.code(), Some(Code::InvalidArgument));
                assert!(e.status().unwrap().message().starts_with("queue:"), "{e}");
            }
            (8 | 9, _) => {}
            (_, Ok(enqueued)) => assert!(ids.insert(enqueued.job_id.clone()), "duplicate id"),
            (_, Err(e)) => panic!("job {i} refused: {e}"),
        }
    }
    // Exactly one of the two capped jobs fits.
    let capped: Vec<_> = answers[8..10].iter().map(|a| a.as_ref().map_err(|e| e.code())).collect();
    assert_eq!(capped.iter().filter(|a| a.is_ok()).count(), 1, "{capped:?}");
    assert!(capped.contains(&Err(Some(Code::ResourceExhausted))));
    assert_eq!(ids.len(), 197);
    let info = admin.get_queue(proto::GetQueueRequest { queue: "coalesced".into() }).await.unwrap().into_inner();
    assert_eq!(info.ready, 197);
    let job = get_job(&mut broker.jobs(), ids.iter().next().unwrap()).await;
    assert!(String::from_utf8(job.payload).unwrap().starts_with("job "));
    broker.stop().await;
}
