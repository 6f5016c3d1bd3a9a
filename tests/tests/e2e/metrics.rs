//! The metrics port: `/metrics` series move with the work done, `/healthz`
//! and `/readyz` answer, and a restart does not count the replayed log again.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use gantry_tests::{
    RunningWorker, TestBroker, cluster::TestCluster, eventually, http_get, v1 as proto, wait_for_state,
};
use gantry_worker::JobError;

/// One scrape: series (name and labels, as written) -> value.
type Scrape = BTreeMap<String, f64>;

async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics").await.expect("metrics port answers");
    assert_eq!(status, 200, "{body}");
    let mut series = Scrape::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line:?}"));
        assert!(series.insert(name.to_owned(), value).is_none(), "series twice: {name}");
    }
    series
}

fn value(scrape: &Scrape, series: &str) -> f64 {
    scrape.get(series).copied().unwrap_or(0.0)
}

/// Polls `/metrics` until `series` has `expected` (bounded).
async fn wait_for_series(addr: SocketAddr, series: &str, expected: f64) -> Scrape {
    eventually(&format!("{series} == {expected}"), Duration::from_secs(20), || async move {
        let s = scrape(addr).await;
        (value(&s, series) == expected).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_follow_enqueues_and_results() {
    let broker = TestBroker::start().await;
    let metrics = broker.metrics_addr();
    assert_eq!(http_get(metrics, "/healthz").await, Some((200, "ok\n".into())));
    assert_eq!(http_get(metrics, "/readyz").await, Some((200, "ready\n".into())));
    assert_eq!(http_get(metrics, "/nothing-here").await.map(|(status, _)| status), Some(404));

    let before = scrape(metrics).await;
    assert_eq!(value(&before, r#"gantry_raft_is_leader{shard="0"}"#), 1.0);
    assert!(value(&before, r#"gantry_raft_term{shard="0"}"#) >= 1.0);
    assert_eq!(value(&before, r#"gantry_raft_apply_lag{shard="0"}"#), 0.0);
    assert_eq!(value(&before, r#"gantry_jobs_enqueued_total{queue="metered"}"#), 0.0);
    assert_eq!(value(&before, r#"gantry_sessions{shard="0"}"#), 0.0);

    let client = broker.client().await;
    let mut ids = Vec::new();
    for payload in ["ok-1", "ok-2", "ok-3", "retry-once", "fatal"] {
        ids.push(client.enqueue("metered", payload).send().await.unwrap().job_id);
    }
    let queued = wait_for_series(metrics, r#"gantry_jobs_enqueued_total{queue="metered"}"#, 5.0).await;
    assert_eq!(value(&queued, r#"gantry_queue_jobs{queue="metered",state="ready"}"#), 5.0);
    assert_eq!(value(&queued, r#"gantry_dispatch_latency_seconds_count{queue="metered"}"#), 0.0);
    let applied = value(&queued, r#"gantry_raft_applied_index{shard="0"}"#);
    assert!(applied > value(&before, r#"gantry_raft_applied_index{shard="0"}"#));
    // Each acknowledged enqueue waited for a commit and a log sync.
    for timing in ["gantry_raft_commit_seconds", "gantry_raft_log_sync_seconds"] {
        let count = |s: &Scrape| value(s, &format!(r#"{timing}_count{{shard="0"}}"#));
        assert!(count(&queued) > count(&before), "{timing}: {queued:?}");
        let all = value(&queued, &format!(r#"{timing}_bucket{{shard="0",le="+Inf"}}"#));
        assert_eq!(all, count(&queued), "{timing}: +Inf bucket holds every observation");
        assert!(value(&queued, &format!(r#"{timing}_sum{{shard="0"}}"#)) > 0.0, "{timing}");
    }

    let worker = RunningWorker::spawn(&broker.endpoint(), "metered", "metrics-worker", 2, |ctx| async move {
        match (ctx.payload().as_ref(), ctx.attempt()) {
            (b"retry-once", 1) => Err(JobError::retry_after(Duration::from_millis(10))),
            (b"fatal", _) => Err(JobError::fatal("no good")),
            _ => Ok(Bytes::new()),
        }
    });
    worker.wait_connected().await;
    let mut jobs = broker.jobs();
    for (id, state) in ids.iter().zip([
        proto::JobState::Succeeded,
        proto::JobState::Succeeded,
        proto::JobState::Succeeded,
        proto::JobState::Succeeded,
        proto::JobState::Failed,
    ]) {
        wait_for_state(&mut jobs, id, state).await;
    }
    let after = wait_for_series(metrics, r#"gantry_jobs_succeeded_total{queue="metered"}"#, 4.0).await;
    assert_eq!(value(&after, r#"gantry_jobs_enqueued_total{queue="metered"}"#), 5.0);
    assert_eq!(value(&after, r#"gantry_jobs_failed_total{queue="metered"}"#), 1.0);
    assert_eq!(value(&after, r#"gantry_jobs_retried_total{queue="metered"}"#), 1.0);
    assert_eq!(value(&after, r#"gantry_jobs_lease_expired_total{queue="metered"}"#), 0.0);
    assert_eq!(value(&after, r#"gantry_queue_jobs{queue="metered",state="ready"}"#), 0.0);
    assert_eq!(value(&after, r#"gantry_queue_jobs{queue="metered",state="succeeded"}"#), 4.0);
    assert_eq!(value(&after, r#"gantry_queue_jobs{queue="metered",state="failed"}"#), 1.0);
    // Six assignments: five first attempts and the retry.
    assert_eq!(value(&after, r#"gantry_dispatch_latency_seconds_count{queue="metered"}"#), 6.0);
    assert_eq!(value(&after, r#"gantry_dispatch_latency_seconds_bucket{queue="metered",le="+Inf"}"#), 6.0);
    assert!(value(&after, r#"gantry_dispatch_latency_seconds_bucket{queue="metered",le="60"}"#) == 6.0);
    assert_eq!(value(&after, r#"gantry_sessions{shard="0"}"#), 1.0);
    assert_eq!(value(&after, r#"gantry_worker_streams{shard="0"}"#), 1.0);
    // Five small payloads are well within the memory budget: none moved to disk.
    assert_eq!(value(&after, r#"gantry_payload_moved_bytes{shard="0"}"#), 0.0);
    assert!(value(&after, r#"gantry_raft_commit_index{shard="0"}"#) > applied);

    worker.shutdown().await;
    // A clean goodbye ends the session at once.
    wait_for_series(metrics, r#"gantry_sessions{shard="0"}"#, 0.0).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_does_not_count_the_replayed_log_again() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let broker = TestBroker::start_with(|c| c.data_dir = data_dir.clone()).await;
    let client = broker.client().await;
    for _ in 0..3 {
        client.enqueue("kept", "x").send().await.unwrap();
    }
    wait_for_series(broker.metrics_addr(), r#"gantry_jobs_enqueued_total{queue="kept"}"#, 3.0).await;
    broker.stop().await;

    let broker = TestBroker::start_with(|c| c.data_dir = data_dir.clone()).await;
    let restarted = scrape(broker.metrics_addr()).await;
    // The jobs are there (replayed), the counter starts again at zero.
    assert_eq!(value(&restarted, r#"gantry_queue_jobs{queue="kept",state="ready"}"#), 3.0);
    assert_eq!(restarted.get(r#"gantry_jobs_enqueued_total{queue="kept"}"#), Some(&0.0));
    broker.client().await.enqueue("kept", "y").send().await.unwrap();
    wait_for_series(broker.metrics_addr(), r#"gantry_jobs_enqueued_total{queue="kept"}"#, 1.0).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_turned_off() {
    let broker = TestBroker::start_with(|c| c.metrics_listen = None).await;
    assert_eq!(broker.metrics_addr, None);
    broker.stop().await;
}

fn metrics_of(cluster: &TestCluster, i: usize) -> std::net::SocketAddr {
    cluster.server(i).metrics_addr().expect("metrics on")
}

/// The reason `/readyz` gives once it refuses (bounded wait).
async fn readyz_refusal(addr: std::net::SocketAddr) -> String {
    eventually("readyz turns 503", Duration::from_secs(30), || async move {
        match http_get(addr, "/readyz").await {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_report_and_readyz_needs_a_leader() {
    let mut cluster = TestCluster::start_with_spare(3).await;
    // An election on a busy machine is retried.
    let leader = eventually("an enqueue on the leader", Duration::from_secs(30), || async {
        let leader = cluster.wait_for_leader().await;
        // The key keeps a retry after a lost answer from making a second job.
        let request = proto::EnqueueRequest {
            queue: "replicated".into(),
            payload: b"x".to_vec(),
            idempotency_key: "once".into(),
            ..Default::default()
        };
        cluster.jobs(leader).enqueue(request).await.ok().map(|_| leader)
    })
    .await;

    // Every node counts what it applies; only the leader knows replication.
    for i in 0..3 {
        let s =
            wait_for_series(metrics_of(&cluster, i), r#"gantry_jobs_enqueued_total{queue="replicated"}"#, 1.0).await;
        let is_leader = value(&s, r#"gantry_raft_is_leader{shard="0"}"#);
        assert_eq!(is_leader, if i == leader { 1.0 } else { 0.0 }, "node {}", i + 1);
        assert_eq!(value(&s, r#"gantry_raft_leader_id{shard="0"}"#), (leader + 1) as f64);
        let lags = s.keys().filter(|k| k.starts_with("gantry_raft_replication_lag{")).count();
        assert_eq!(lags, if i == leader { 2 } else { 0 }, "node {}: per-follower lag on the leader only", i + 1);
    }

    // A leader whose voters are gone can commit nothing: not ready, though
    // it keeps its role.
    let leader_metrics = metrics_of(&cluster, leader);
    for i in (0..3).filter(|i| *i != leader) {
        cluster.stop(i).await;
    }
    let reason = readyz_refusal(leader_metrics).await;
    assert!(reason.starts_with("not ready: this node leads shard 0 but no quorum"), "{reason}");
    assert_eq!(http_get(leader_metrics, "/healthz").await.map(|(status, _)| status), Some(200));

    // A node waiting to be added knows no leader at all.
    cluster.restart(3).await;
    let spare_metrics = metrics_of(&cluster, 3);
    let reason = readyz_refusal(spare_metrics).await;
    assert!(reason.starts_with("not ready: shard 0 has no known leader"), "{reason}");
    assert_eq!(http_get(spare_metrics, "/healthz").await.map(|(status, _)| status), Some(200));

    // A follower restarted alone may go on naming the leader it voted for,
    // which is gone (openraft drops it only on some later event): not ready
    // either way.
    cluster.stop(leader).await;
    let follower = (leader + 1) % 3;
    cluster.restart(follower).await;
    let reason = readyz_refusal(metrics_of(&cluster, follower)).await;
    let stale = format!("not ready: shard 0: its leader, node {}, has not reached this node", leader + 1);
    assert!(reason.starts_with(&stale) || reason.starts_with("not ready: shard 0 has no known leader"), "{reason}");

    // The old leader restarted alone may be restored as leader (openraft
    // restores a committed vote of its own) that no quorum ever answered.
    cluster.stop(follower).await;
    cluster.restart(leader).await;
    let reason = readyz_refusal(metrics_of(&cluster, leader)).await;
    assert!(reason.starts_with("not ready: "), "{reason}");
    cluster.shutdown().await;
}
