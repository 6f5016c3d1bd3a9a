//! The format gate inside a cluster (DESIGN §13): a command above a
//! shard's format that reaches the log anyway (a proposer that skipped the
//! check at the edge) is the same refusal on every replica, which keep
//! serving; a held upgrade keeps the shard's format until it is finalized.

use std::time::Duration;

use gantry_broker::queue::{Applied, Command, Rejection};
use gantry_tests::{
    cluster::{CLUSTER_WAIT, TestCluster},
    eventually, v1 as proto,
};

/// Three nodes, every one holding the upgrade from its first start (the
/// hold file in its data directory), so every shard stays at format 0.
async fn held_cluster() -> TestCluster {
    TestCluster::start_with(3, |config| {
        std::fs::create_dir_all(&config.data_dir).expect("data dir");
        std::fs::write(config.data_dir.join("UPGRADE_HOLD"), "held by the test\n").expect("hold file");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_above_the_gate_in_the_log_is_the_same_no_op_everywhere() {
    let cluster = held_cluster().await;
    let leader = cluster.wait_for_leader().await;
    let shard = cluster.server(leader).node().shards[0].clone();
    assert_eq!(shard.format(), 0);
    let mut admin = cluster.admin(leader);
    admin.pause_queue(proto::PauseQueueRequest { queue: "poison".into() }).await.expect("queue created");

    // Straight into the log, past Admin's check.
    let committed = shard.commit(vec![Command::DeleteQueue { queue: "poison".into() }]).await.expect("committed");
    assert_eq!(
        committed.results,
        vec![Applied::Rejected(Rejection::FormatTooLow { feature: "DeleteQueue".into(), needs: 1, shard_format: 0 })]
    );
    // Every replica applied it, to the same state, and goes on serving.
    for i in 0..3 {
        cluster.wait_applied(i, committed.index).await;
    }
    let states: Vec<_> = (0..3).map(|i| cluster.server(i).node().shards[0].raft.state().read().queue.clone()).collect();
    let digests: Vec<_> = states.iter().map(|s| gantry_broker::raft::state_machine::digest_of(s).unwrap()).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "replicas differ after the refused command: {digests:?}");
    assert!(states.iter().all(|s| s.queue("poison").is_some() && s.format() == 0));
    let mut jobs = cluster.jobs(leader);
    jobs.enqueue(proto::EnqueueRequest {
        queue: "poison".into(),
        payload: b"still serving".to_vec(),
        ..Default::default()
    })
    .await
    .expect("the shard still takes jobs");
    // Through Admin: refused before the log, naming the holder.
    let refused = admin
        .delete_queue(proto::DeleteQueueRequest { queue: "poison".into() })
        .await
        .expect_err("DeleteQueue on a held shard");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("DeleteQueue needs storage format 1"), "{refused:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_upgrade_is_raised_once_finalized() {
    let cluster = held_cluster().await;
    let mut admin = cluster.admin(0);
    let status = admin.upgrade_status(proto::UpgradeStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.nodes.len(), 3, "{status:?}");
    assert!(status.nodes.iter().all(|n| n.held && n.format_max == status.newest_format), "{status:?}");
    assert!(status.shards.iter().all(|s| s.format == 0 && s.blocked.contains("holds")), "{status:?}");

    let finalized = admin.finalize_upgrade(proto::FinalizeUpgradeRequest {}).await.expect("finalize").into_inner();
    assert!(finalized.nodes.iter().all(|n| !n.held), "{finalized:?}");
    eventually("every shard raised on every node", CLUSTER_WAIT, || async {
        (0..3).all(|i| cluster.server(i).node().shards.iter().all(|s| s.format() == status.newest_format)).then_some(())
    })
    .await;
    // The hold again: it does not lower anything, and shows.
    let held = admin.hold_upgrade(proto::HoldUpgradeRequest {}).await.expect("hold").into_inner();
    assert!(held.nodes.iter().all(|n| n.held), "{held:?}");
    assert!(held.shards.iter().all(|s| s.format == status.newest_format), "{held:?}");
    for i in 0..3 {
        assert!(cluster.data_dir(i).join("UPGRADE_HOLD").exists(), "node {} did not record the hold", i + 1);
    }
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown()).await.expect("shutdown");
}

/// A data directory of a format newer than the binary reads is refused
/// before Raft starts: the process exits non-zero, naming both versions and
/// the way forward, and changes nothing in the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_data_directory_of_a_newer_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("raft")).expect("dirs");
    let header =
        gantry_proto::storage::DataDirHeader { format: 9, min_reader: 9, written_by: "9.9.9".into(), shards: 1 };
    let bytes = gantry_broker::format::header::encode_header(&header);
    std::fs::write(data.join("HEADER"), &bytes).expect("header");
    std::fs::write(data.join("FORMAT"), "gantry-data 3 (storage format 9)\n").expect("format line");
    let port = |_: u8| format!("127.0.0.1:{}", gantry_tests::free_port());
    let run = tokio::process::Command::new(gantry_tests::gantry_binary())
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args(["--listen", &port(0), "--peer-listen", &port(1), "--metrics-listen", &port(2)])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("exits within 60 s").expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a newer data directory:\n{stderr}");
    assert!(
        stderr.contains("storage format 9 by gantry 9.9.9")
            && stderr.contains(gantry_broker::format::table::BINARY_VERSION)
            && stderr.contains("run gantry 9.9.9 or newer"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(data.join("HEADER")).expect("header"), bytes, "the refusal changed the header");
}

/// Replication goes over the pipelined stream once a shard reaches format
/// 2, and only then: a held shard's leader sends every AppendEntries as a
/// unary call; once raised, the replication session that was running ends
/// and the next streams (without waiting for a leader change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_shard_replicates_over_a_stream_and_a_held_one_does_not() {
    let cluster = held_cluster().await;
    let leader = cluster.wait_for_leader().await;
    let shard = |i: usize| cluster.server(i).node().shards[0].clone();
    let mut jobs = cluster.jobs(leader);
    for n in 0..20 {
        gantry_tests::enqueue(&mut jobs, "streamed", format!("held {n}").as_bytes()).await;
    }
    assert_eq!(shard(leader).raft.timings().streams().requests, 0, "a shard below format 2 never streams");

    let mut admin = cluster.admin(leader);
    admin.finalize_upgrade(proto::FinalizeUpgradeRequest {}).await.expect("finalize");
    eventually("every node raised", CLUSTER_WAIT, || async {
        (0..3).all(|i| shard(i).format() >= gantry_broker::format::table::APPEND_STREAM.format).then_some(())
    })
    .await;
    let mut last = None;
    for n in 0..20 {
        last = Some(gantry_tests::enqueue(&mut jobs, "streamed", format!("raised {n}").as_bytes()).await);
    }
    let streamed = shard(leader).raft.timings().streams();
    assert!(streamed.requests > 0 && streamed.opened > 0, "no AppendEntries went over a stream: {streamed:?}");
    assert_eq!(streamed.broken, 0, "{streamed:?}");
    let index = shard(leader).raft.status().applied_index;
    for i in 0..3 {
        cluster.wait_applied(i, index).await;
    }
    let mut follower = cluster.jobs(cluster.other(leader));
    let job = follower
        .get_job(proto::GetJobRequest { job_id: last.expect("enqueued") })
        .await
        .expect("replicated")
        .into_inner();
    assert_eq!(job.payload, b"raised 19");
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown()).await.expect("shutdown");
}
