//! Upgrades in place with a real previous build (DESIGN §13): the release
//! pinned in `tests/compat/previous-release`, built from its own sources by
//! `scripts/build-previous.sh` (`GANTRY_PREVIOUS_BINARY` names it in
//! `.ci/run`). Three nodes start on it under continuous enqueue and worker
//! load and are rolled to the current build one at a time, stopped with
//! SIGTERM as a Kubernetes rolling update does; the history checker then
//! holds every acknowledged job to exactly one accepted outcome and each
//! shard's fencing tokens to increasing order.
//!
//! Ignored by default (they need the previous build, minutes to compile the
//! first time): `.ci/run` runs them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use gantry_tests::{
    cluster::{BinaryCluster, CLUSTER_WAIT},
    eventually,
    history::{
        Expect, History, final_jobs,
        load::{Producers, client, echo},
        sdk_worker,
        worker::RecordingWorker,
    },
    previous_gantry_binary, v1 as proto,
};

/// Elections and sessions as in the other process tests; snapshots often,
/// so that snapshots are taken and sent while old and new nodes mix.
const ARGS: &[&str] = &[
    "--heartbeat-interval",
    "100ms",
    "--session-ttl",
    "4s",
    "--election-timeout",
    "1s",
    "--raft-heartbeat-interval",
    "50ms",
    "--snapshot-every",
    "100",
    "--digest-every",
    "1s",
];

const SCRATCH: &str = "upgrade-scratch";

/// The order nodes are rolled in: the shard's leader last, or first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    LeaderLast,
    LeaderFirst,
}

/// What a data directory's FORMAT line says (builds before format gates
/// read only this).
fn format_line(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("FORMAT")).unwrap_or_default().trim().to_owned()
}

async fn delete_scratch(cluster: &BinaryCluster, i: usize) -> Result<(), tonic::Status> {
    let mut admin = cluster.nodes[i].admin();
    admin.delete_queue(proto::DeleteQueueRequest { queue: SCRATCH.into() }).await.map(|_| ())
}

/// Stops node `i` (SIGTERM), switches it to `binary` and starts it again;
/// returns once it serves and holds the shard's log.
async fn roll_node(cluster: &mut BinaryCluster, i: usize, binary: &Path, history: &History) {
    let started = Instant::now();
    cluster.nodes[i].stop().await;
    cluster.nodes[i].use_binary(binary);
    cluster.restart(i).await;
    cluster.nodes[i].wait_ready().await;
    cluster.wait_replicated(i).await;
    history.note(format!("node {} now runs {} ({:?})", i + 1, binary.display(), started.elapsed()));
}

/// Every node's `gantry_storage_faults_total` samples, summed: replicas
/// whose digests differed are counted there (kind `digest_mismatch`).
async fn storage_faults(cluster: &BinaryCluster) -> u64 {
    let mut total = 0;
    for node in &cluster.nodes {
        let Some(metrics) = node.metrics_addr else { continue };
        let Some((200, body)) = gantry_tests::http_get(metrics, "/metrics").await else { continue };
        total += body
            .lines()
            .filter(|l| l.starts_with("gantry_storage_faults_total{") && l.contains("digest_mismatch"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// Waits until `queue` has nothing left to do and the recording workers
/// have no result unanswered; what is left if the queue did not drain.
async fn drain(cluster: &BinaryCluster, queue: &str, workers: &[RecordingWorker]) -> Result<(), String> {
    let left = cluster.wait_queue_drained(queue).await.map(|_| ()).map_err(|left| format!("{left:?}"));
    for worker in workers {
        eventually("recording workers idle", Duration::from_secs(20), || async { worker.is_idle().then_some(()) })
            .await;
    }
    left
}

/// Every acknowledged job of `queue` ended with exactly one accepted
/// outcome, tokens increasing (the history checker), and the queue drained.
async fn history_holds(history: &History, endpoints: &[String], queue: &str, left: &Result<(), String>) {
    let client = client(endpoints).await;
    let finals = final_jobs(&client, &[queue], history.job_ids()).await;
    match history.check(&finals, Expect::Succeeded) {
        Ok(summary) if left.is_ok() => eprintln!("history check passed: {summary}"),
        Ok(summary) => panic!("{left:?}\nhistory check passed: {summary}\ntimeline:\n{}", history.timeline()),
        Err(violations) => panic!("{violations}timeline:\n{}", history.timeline()),
    }
}

async fn rolling_upgrade(order: Order) {
    gantry_tests::init_tracing();
    let old = previous_gantry_binary();
    let new = gantry_tests::gantry_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = BinaryCluster::start_binary(dir.path(), 3, ARGS, &old).await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    let queue = "upgrade-load";
    // A queue that exists and holds nothing: DeleteQueue's target.
    let leader = cluster.wait_for_leader().await;
    cluster.nodes[leader].admin().pause_queue(proto::PauseQueueRequest { queue: SCRATCH.into() }).await.unwrap();

    let raw: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, queue, 8, echo)).collect();
    let sdk = sdk_worker(&history, &endpoints.join(","), queue, "sdk-0", 8, |ctx| async move {
        tokio::time::sleep(Duration::from_millis(3)).await;
        Ok(ctx.payload().clone())
    });
    for worker in &raw {
        worker.wait_connected().await;
    }
    sdk.wait_connected().await;
    let producers = Producers::spawn(&history, &endpoints, queue, 3, 4000);
    eventually("200 jobs acknowledged on the old build", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 200).then_some(())
    })
    .await;

    let leader = cluster.wait_for_leader().await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let plan: Vec<usize> = match order {
        Order::LeaderLast => vec![followers[0], followers[1], leader],
        Order::LeaderFirst => vec![leader, followers[0], followers[1]],
    };
    history.note(format!(
        "{order:?}: rolling nodes {:?} (leader {})",
        plan.iter().map(|i| i + 1).collect::<Vec<_>>(),
        leader + 1
    ));
    for (step, &i) in plan.iter().enumerate() {
        let acknowledged = history.acknowledged().len();
        roll_node(&mut cluster, i, &new, &history).await;
        if step < 2 {
            // Mixed: the new node refuses the new feature, naming an old
            // member; no data directory was raised.
            let refused = delete_scratch(&cluster, i).await.expect_err("DeleteQueue while old nodes run");
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains("from before format gates"), "{refused:?}");
            for node in &cluster.nodes {
                assert_eq!(format_line(&node.data_dir), "gantry-data 2", "raised while an old node runs");
            }
        }
        eventually("100 more jobs acknowledged after the roll", CLUSTER_WAIT, || async {
            (history.acknowledged().len() >= acknowledged + 100).then_some(())
        })
        .await;
    }
    // Every node new: the shard is raised, the feature works, and every data
    // directory now turns the previous build away.
    eventually("DeleteQueue allowed once every node is upgraded", CLUSTER_WAIT, || async {
        delete_scratch(&cluster, 0).await.ok()
    })
    .await;
    eventually("every data directory raised", CLUSTER_WAIT, || async {
        cluster.nodes.iter().all(|n| format_line(&n.data_dir).starts_with("gantry-data 3")).then_some(())
    })
    .await;
    eventually("200 more jobs acknowledged at format 1", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 200 * 4).then_some(())
    })
    .await;

    producers.stop().await;
    let left = drain(&cluster, queue, &raw).await;
    let sdk_handle = sdk.handle.clone();
    sdk.shutdown().await;
    history.sdk_stats("sdk-0", &sdk_handle);
    history_holds(&history, &endpoints, queue, &left).await;
    assert_eq!(storage_faults(&cluster).await, 0, "replicas' digests differed during the upgrade");
    eprintln!("timeline:\n{}", history.timeline());
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous build (scripts/build-previous.sh); .ci/run runs it"]
async fn upgrade_rolling_under_load_leader_last() {
    rolling_upgrade(Order::LeaderLast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous build (scripts/build-previous.sh); .ci/run runs it"]
async fn upgrade_rolling_under_load_leader_first() {
    rolling_upgrade(Order::LeaderFirst).await;
}

/// Held (UPGRADE_HOLD in every new node's data directory), an upgrade can
/// be rolled back: up to the new build, back down to the previous one,
/// nothing lost. Then up again and the hold lifted: the shard is raised,
/// and the previous build refuses to start on a raised directory, saying
/// what to do, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous build (scripts/build-previous.sh); .ci/run runs it"]
async fn upgrade_downgrade_before_the_raise_works_and_after_it_is_refused() {
    gantry_tests::init_tracing();
    let old = previous_gantry_binary();
    let new = gantry_tests::gantry_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = BinaryCluster::start_binary(dir.path(), 3, ARGS, &old).await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    let queue = "downgrade";
    let producers = Producers::spawn(&history, &endpoints, queue, 2, 400);
    eventually("300 jobs acknowledged on the old build", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 300).then_some(())
    })
    .await;
    producers.stop().await;

    // The operator holds as soon as the first node runs the new build (the
    // old ones do not know the call: one holder is enough).
    roll_node(&mut cluster, 0, &new, &history).await;
    let held = cluster.nodes[0].admin().hold_upgrade(proto::HoldUpgradeRequest {}).await.expect("hold").into_inner();
    assert!(held.nodes.iter().any(|n| n.node_id == 1 && n.held), "{held:?}");
    for i in 1..3 {
        roll_node(&mut cluster, i, &new, &history).await;
    }
    let status = cluster.nodes[1].admin().upgrade_status(proto::UpgradeStatusRequest {}).await.unwrap().into_inner();
    assert!(status.shards.iter().all(|s| s.format == 0 && s.blocked.contains("holds")), "{status:?}");
    let producers = Producers::spawn(&history, &endpoints, queue, 2, 400);
    eventually("300 more jobs acknowledged on the new build, held", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 600).then_some(())
    })
    .await;
    producers.stop().await;
    for node in &cluster.nodes {
        assert_eq!(format_line(&node.data_dir), "gantry-data 2", "raised while held");
    }
    for i in 0..3 {
        roll_node(&mut cluster, i, &old, &history).await;
    }
    history.note("rolled back to the previous build".to_owned());

    // Up again: node 1's hold outlived both rolls; finalize lifts it and
    // the shard is raised.
    for i in 0..3 {
        roll_node(&mut cluster, i, &new, &history).await;
    }
    let status = cluster.nodes[2].admin().upgrade_status(proto::UpgradeStatusRequest {}).await.unwrap().into_inner();
    assert!(status.shards.iter().all(|s| s.format == 0 && s.blocked.contains("node 1 holds")), "{status:?}");
    for node in &cluster.nodes {
        assert_eq!(format_line(&node.data_dir), "gantry-data 2", "raised while still held");
    }
    let finalized = cluster.nodes[2]
        .admin()
        .finalize_upgrade(proto::FinalizeUpgradeRequest {})
        .await
        .expect("finalize")
        .into_inner();
    assert!(finalized.nodes.iter().all(|n| !n.held), "{finalized:?}");
    eventually("every data directory raised once the hold is lifted", CLUSTER_WAIT, || async {
        cluster.nodes.iter().all(|n| format_line(&n.data_dir).starts_with("gantry-data 3")).then_some(())
    })
    .await;
    let victim = 2;
    cluster.nodes[victim].stop().await;
    cluster.nodes[victim].use_binary(&old);
    let (status, log) = cluster.nodes[victim].start_expecting_refusal().await;
    assert!(!status.success(), "the previous build started on a raised directory:\n{log}");
    assert!(log.contains("gantry-data 3") && log.contains("a downgrade is refused"), "{log}");
    history.note(format!("the previous build refused: {}", log.lines().last().unwrap_or_default()));
    cluster.nodes[victim].use_binary(&new);
    cluster.restart(victim).await;
    cluster.nodes[victim].wait_ready().await;

    let workers: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, queue, 8, echo)).collect();
    let left = drain(&cluster, queue, &workers).await;
    history_holds(&history, &endpoints, queue, &left).await;
    eprintln!("timeline:\n{}", history.timeline());
}

/// Entries a leader keeps behind its snapshot (`RaftSettings::keep_after_snapshot`):
/// a follower further behind than this is sent a snapshot.
const KEPT_BEHIND_SNAPSHOT: u64 = 1_000;

/// Node `i`'s own view of shard 0 (not the leader's).
async fn own_shard(cluster: &BinaryCluster, i: usize) -> Option<proto::ShardStatus> {
    let mut admin = cluster.nodes[i].admin();
    let mut request = tonic::Request::new(proto::ClusterStatusRequest { local: true });
    request.set_timeout(Duration::from_secs(2));
    admin.cluster_status(request).await.ok()?.into_inner().shards.into_iter().next()
}

/// Stops node `stopped`, keeps the load on until node `sender`'s own
/// snapshot is well past what `stopped` holds (a follower purges its log
/// behind it; a leader would keep it for the stopped node's replication in
/// flight), makes `sender` the leader and starts `stopped` again on
/// `binary`: it can only catch up by installing `sender`'s snapshot, which
/// its log must show.
async fn catch_up_by_snapshot(
    cluster: &mut BinaryCluster,
    stopped: usize,
    sender: usize,
    binary: &Path,
    history: &History,
) {
    let held = own_shard(cluster, stopped).await.expect("the node's own status").last_log_index;
    cluster.nodes[stopped].stop().await;
    eventually("the sender's snapshot far past the stopped node's log", Duration::from_secs(120), || async {
        let shard = own_shard(cluster, sender).await?;
        (shard.snapshot_index > held + KEPT_BEHIND_SNAPSHOT + 200).then_some(())
    })
    .await;
    let commit = own_shard(cluster, sender).await.expect("status").commit_index;
    cluster.lead_from(sender, commit).await;
    let from = cluster.log_len(stopped);
    cluster.nodes[stopped].use_binary(binary);
    cluster.restart(stopped).await;
    cluster.nodes[stopped].wait_ready().await;
    cluster.wait_replicated(stopped).await;
    let log = cluster.log_since(stopped, from);
    assert!(
        log.contains("installing snapshot from the leader"),
        "node {} caught up without a snapshot:\n{log}",
        stopped + 1
    );
    history.note(format!("node {} ({}) installed node {}'s snapshot", stopped + 1, binary.display(), sender + 1));
}

/// A snapshot crosses versions both ways while the cluster is mixed (so
/// at format 0): an old leader's to a new follower, then a new leader's to
/// an old follower; nothing acknowledged is lost, replicas agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous build (scripts/build-previous.sh); .ci/run runs it"]
async fn upgrade_snapshots_cross_versions_both_ways() {
    gantry_tests::init_tracing();
    let old = previous_gantry_binary();
    let new = gantry_tests::gantry_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = BinaryCluster::start_binary(dir.path(), 3, ARGS, &old).await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    let queue = "snapshots";
    let raw: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, queue, 8, echo)).collect();
    for worker in &raw {
        worker.wait_connected().await;
    }
    let producers = Producers::spawn(&history, &endpoints, queue, 3, 20_000);

    // Old sender, new receiver: node 3 comes back on the new build and
    // installs node 2's snapshot (both old until then).
    catch_up_by_snapshot(&mut cluster, 2, 1, &new, &history).await;
    // New sender, old receiver: node 1 (old) installs node 3's snapshot.
    catch_up_by_snapshot(&mut cluster, 0, 2, &old, &history).await;

    producers.stop().await;
    let left = drain(&cluster, queue, &raw).await;
    history_holds(&history, &endpoints, queue, &left).await;
    assert_eq!(storage_faults(&cluster).await, 0, "replicas' digests differed across versions");
    eprintln!("timeline:\n{}", history.timeline());
}

/// Once a cluster's shards are raised, a node on the previous release
/// cannot join: AddNode is refused naming the release it needs, and the
/// joining node's own log says so too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the previous build (scripts/build-previous.sh); .ci/run runs it"]
async fn upgrade_an_old_node_cannot_join_a_raised_cluster() {
    gantry_tests::init_tracing();
    let old = previous_gantry_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = BinaryCluster::start(dir.path(), 3, ARGS).await;
    eventually("every data directory raised", CLUSTER_WAIT, || async {
        cluster.nodes.iter().all(|n| format_line(&n.data_dir).starts_with("gantry-data 3")).then_some(())
    })
    .await;
    let addr = format!("127.0.0.1:{}", gantry_tests::free_port()).parse().expect("addr");
    let peer = format!("127.0.0.1:{}", gantry_tests::free_port()).parse().expect("addr");
    let joining = gantry_tests::BinaryBroker::start_binary_at(
        &old,
        &dir.path().join("node-4"),
        addr,
        peer,
        &["--node-id", "4", "--join", &cluster.endpoint(0)],
        false,
    )
    .await;
    let refused = cluster.nodes[1]
        .admin()
        .add_node(proto::AddNodeRequest { node_id: 4, address: peer.to_string() })
        .await
        .expect_err("an old node joined a raised cluster");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("a release before format gates") && refused.message().contains("or newer"),
        "{refused:?}"
    );
    eventually("the joining node logs the refusal", CLUSTER_WAIT, || async {
        joining.log().contains("start it with gantry").then_some(())
    })
    .await;
    let status = cluster.status(0).await.expect("status");
    assert!(status.nodes.iter().all(|n| n.node_id != 4), "{status:?}");
}
