//! Logs: `--log-format json` writes one JSON object per line, and job
//! events carry the job id, queue and shard.

use gantry_tests::{BinaryBroker, eventually, v1 as proto};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_job_queue_and_shard() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BinaryBroker::start(&dir.path().join("node"), &["--log-format", "json"]).await;
    let mut jobs = broker.jobs();
    let job_id = jobs
        .enqueue(proto::EnqueueRequest { queue: "mail".into(), payload: b"x".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    jobs.cancel_job(proto::CancelJobRequest { job_id: job_id.clone(), reason: "test".into() }).await.unwrap();

    let line = eventually("a JSON log line for the cancelled job", Duration::from_secs(10), || {
        let log = broker.log();
        let job_id = job_id.clone();
        async move {
            log.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["fields"]["message"] == "job cancelled" && v["span"]["job_id"] == job_id.as_str())
        }
    })
    .await;
    assert_eq!(line["fields"]["queue"], "mail", "{line}");
    assert_eq!(line["span"]["shard"], "0", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    // Every line is JSON, start-up included.
    let log = broker.log();
    let not_json: Vec<&str> =
        log.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err()).take(3).collect();
    assert!(not_json.is_empty(), "lines that are not JSON: {not_json:?}");
}
