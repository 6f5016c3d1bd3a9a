//! Replicas compare the digests of their state (DESIGN §1.8), and a copy
//! that differs, or that an operator names, is rebuilt from the leader in
//! place: three nodes in the test process.

use std::time::Duration;

use gantry_tests::{
    cluster::{CLUSTER_WAIT, TestCluster, cluster_status},
    enqueue, eventually,
    v1::{self as proto},
};

/// Enqueues a marker job (a new entry with a new leader stamp, so replicas
/// pass the next digest window) until every node reports a digest at the
/// same index past `after`; returns them (node, digest) at that index.
async fn common_digests(cluster: &TestCluster, after: u64) -> (u64, Vec<(usize, String)>) {
    let marker = cluster.jobs(0);
    eventually("every node digests its state at the same index", CLUSTER_WAIT, || {
        let mut marker = marker.clone();
        async move {
            let _ = marker
                .enqueue(proto::EnqueueRequest { queue: "marker".into(), payload: b"m".to_vec(), ..Default::default() })
                .await;
            let mut seen = Vec::new();
            for i in 0..3 {
                // Each node's own view (a follower otherwise answers with the leader's).
                let request = proto::ClusterStatusRequest { local: true };
                let status = cluster.admin(i).cluster_status(request).await.ok()?.into_inner();
                assert_eq!(status.node_id, i as u64 + 1, "a local status answered by another node");
                let shard = status.shards.into_iter().next()?;
                seen.push((i, shard.digest_index, shard.state_digest));
            }
            let index = seen[0].1;
            (index > after && seen.iter().all(|(_, at, _)| *at == index))
                .then(|| (index, seen.into_iter().map(|(i, _, d)| (i, d)).collect()))
        }
    })
    .await
}

/// A job as node `i` serves it, read again while the shard is between
/// leaders (two cores, several clusters: elections happen).
async fn read_job(cluster: &TestCluster, i: usize, id: &str) -> proto::Job {
    eventually(&format!("node {} serves job {id}", i + 1), CLUSTER_WAIT, || async move {
        let request = proto::GetJobRequest { job_id: id.to_owned() };
        cluster.jobs(i).get_job(request).await.ok().map(|r| r.into_inner())
    })
    .await
}

fn settings(c: &mut gantry_broker::config::Config) {
    c.digest_every = Duration::from_millis(300);
    c.snapshot_every = 50;
}

/// A follower restarts on a snapshot whose state differs from the others'
/// (written in the older format, without a checksum, with one job's
/// payload changed: what a bit flip there does). Nothing at start-up can
/// tell; the digests do: the leader finds it the odd one out and has it
/// rebuilt, after which its digests equal the others' and it serves the
/// job as it was enqueued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_state_differs_is_found_and_rebuilt() {
    let mut cluster = TestCluster::start_with(3, settings).await;
    let leader = cluster.wait_for_leader().await;
    let victim = cluster.other(leader);
    // At the newest format, so that the snapshot edited below is always the
    // one a cluster writes from then on.
    eventually("every node's shard at the newest format", CLUSTER_WAIT, || async {
        (0..3)
            .all(|i| cluster.server(i).node().shards[0].format() == gantry_broker::format::table::FORMAT_MAX)
            .then_some(())
    })
    .await;
    let mut jobs = cluster.jobs(leader);
    let canary = enqueue(&mut jobs, "canary", b"divergence-canary-0000").await;
    for i in 0..120u32 {
        enqueue(&mut jobs, "fill", format!("fill {i}").as_bytes()).await;
    }
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(victim, commit).await;
    let (_, digests) = common_digests(&cluster, 0).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas differ before any fault: {digests:?}");
    let victim_raft = cluster.server(victim).node().shards[0].raft.clone();
    let applied = victim_raft.status().applied_index;
    victim_raft.snapshot_now().await.expect("snapshot");
    // The trigger returns before the snapshot is on disk: one written after
    // the edit below would replace the edited one.
    eventually("the victim's snapshot of all it applied is written", CLUSTER_WAIT, || async {
        (victim_raft.status().snapshot_index >= applied).then_some(())
    })
    .await;
    cluster.stop(victim).await;

    let dir = cluster.data_dir(victim).join("snapshots").join("0");
    // In whichever format the shard had reached (v3 from format 1, v2 at
    // format 0; both: magic, length, CRC32, payload): the canary's payload
    // changed in place, the checksum made right again, so the copy reads as
    // valid and differs from the others'.
    let (name, mut file) = ["snapshot-v3.bin", "snapshot-v2.bin"]
        .into_iter()
        .find_map(|name| std::fs::read(dir.join(name)).ok().map(|file| (name, file)))
        .expect("the victim's snapshot");
    let at =
        20 + file[20..].windows(22).position(|w| w == b"divergence-canary-0000").expect("the canary in the snapshot");
    file[at + 18..at + 22].copy_from_slice(b"9999");
    let crc = crc32fast::hash(&file[20..]);
    file[16..20].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.join(name), &file).expect("write");
    eprintln!("edited the victim's {name}");

    cluster.restart(victim).await;
    let raft = cluster.server(victim).node().shards[0].raft.clone();
    eventually("the diverged copy is rebuilt", CLUSTER_WAIT, || {
        let (raft, mut jobs) = (raft.clone(), jobs.clone());
        async move {
            // New entries, so that replicas reach the next digest window.
            let _ = jobs
                .enqueue(proto::EnqueueRequest { queue: "marker".into(), payload: b"m".to_vec(), ..Default::default() })
                .await;
            raft.fault_counts().into_iter().any(|(kind, _)| kind == "rebuild").then_some(())
        }
    })
    .await;
    // The rebuild is counted when it starts: digests taken past the commit
    // index at which the copy is whole again are of the rebuilt state.
    let rebuilt_at = eventually("the rebuilt copy is whole again", CLUSTER_WAIT, || async {
        let status = cluster.admin(victim).cluster_status(proto::ClusterStatusRequest { local: true }).await.ok()?;
        let whole = status.into_inner().shards.first().is_some_and(|shard| shard.fenced.is_empty());
        let commit = cluster_status(cluster.addrs[leader]).await?.shards.first()?.commit_index;
        whole.then_some(commit)
    })
    .await;
    let (index, digests) = common_digests(&cluster, rebuilt_at).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas still differ at {index}: {digests:?}");
    let faults = cluster.server(leader).node().shards[0].raft.fault_counts();
    assert!(faults.iter().any(|(kind, n)| *kind == "digest_mismatch" && *n >= 1), "leader counted {faults:?}");
    assert_eq!(read_job(&cluster, victim, &canary).await.payload, b"divergence-canary-0000");
    cluster.shutdown().await;
}

/// `gantry cluster rebuild` on a healthy follower: its copy is dropped,
/// fenced (no reads) until the leader has rebuilt it, then whole again
/// with every job; bad requests name what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rebuilds_a_replica_in_place() {
    let cluster = TestCluster::start_with(3, settings).await;
    let leader = cluster.wait_for_leader().await;
    let victim = cluster.other(leader);
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..150u32 {
        ids.push(enqueue(&mut jobs, "rebuilt", format!("job {i}").as_bytes()).await);
    }
    let mut admin = cluster.admin(leader);
    let refused = admin
        .rebuild_replica(proto::RebuildReplicaRequest { node_id: 9, shard: 0 })
        .await
        .expect_err("a node that is not a member");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("node_id: node 9 is not a member of shard 0"), "{refused:?}");
    let refused = admin
        .rebuild_replica(proto::RebuildReplicaRequest { node_id: 1, shard: 7 })
        .await
        .expect_err("a shard that does not exist");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");

    let victim_id = victim as u64 + 1;
    admin
        .rebuild_replica(proto::RebuildReplicaRequest { node_id: victim_id, shard: 0 })
        .await
        .expect("rebuild a follower's copy");
    let raft = cluster.server(victim).node().shards[0].raft.clone();
    assert!(raft.fault_counts().iter().any(|(kind, _)| *kind == "rebuild"));
    eventually("the rebuilt copy is whole again", CLUSTER_WAIT, || {
        let raft = raft.clone();
        async move { raft.fenced().is_none().then_some(()) }
    })
    .await;
    for id in [&ids[0], &ids[75], &ids[149]] {
        assert_eq!(read_job(&cluster, victim, id).await.id, *id);
    }
    let (index, digests) = common_digests(&cluster, 0).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas differ at {index}: {digests:?}");
    cluster.shutdown().await;
}

/// What the refusal to open a damaged raft log tells the operator to do:
/// move the raft directory aside and start the node again. Its guard still
/// says what it acknowledged and voted: every shard's copy comes back
/// fenced (its vote restored), is rebuilt by the leader, and serves every
/// job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_raft_log_was_moved_aside_is_rebuilt_fenced() {
    let mut cluster = TestCluster::start_with(3, settings).await;
    let leader = cluster.wait_for_leader().await;
    let victim = cluster.other(leader);
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..80u32 {
        ids.push(enqueue(&mut jobs, "aside", format!("job {i}").as_bytes()).await);
    }
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(victim, commit).await;
    cluster.stop(victim).await;
    let raft_dir = cluster.data_dir(victim).join("raft");
    std::fs::rename(&raft_dir, raft_dir.with_extension("damaged")).expect("move the raft log aside");

    cluster.restart(victim).await;
    let raft = cluster.server(victim).node().shards[0].raft.clone();
    let kinds: Vec<&str> = raft.storage_findings().iter().map(|f| f.kind).collect();
    assert!(kinds.contains(&"log_lost") && kinds.contains(&"vote_restored"), "{kinds:?}");
    let (recovered, acknowledged) = raft.lost_at_open().expect("the lost log is noticed");
    assert!(recovered < acknowledged && acknowledged >= commit, "{recovered} {acknowledged} {commit}");
    eventually("the copy is whole again", CLUSTER_WAIT, || {
        let raft = raft.clone();
        async move { raft.fenced().is_none().then_some(()) }
    })
    .await;
    for id in [&ids[0], &ids[40], &ids[79]] {
        assert_eq!(read_job(&cluster, victim, id).await.id, *id);
    }
    let (index, digests) = common_digests(&cluster, commit).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas differ at {index}: {digests:?}");
    cluster.shutdown().await;
}

/// A follower's whole data directory is lost. It starts as a new node, but
/// its peers hold the shard with it as a member: it does not vote with its
/// empty log (which could elect a leader without what it had acknowledged)
/// until the leader has caught it up past what any member knew committed,
/// then it serves every job again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_data_directory_was_lost_does_not_vote_until_rebuilt() {
    let mut cluster = TestCluster::start_with(3, settings).await;
    let leader = cluster.wait_for_leader().await;
    let victim = cluster.other(leader);
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..80u32 {
        ids.push(enqueue(&mut jobs, "lost", format!("job {i}").as_bytes()).await);
    }
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(victim, commit).await;
    cluster.stop(victim).await;
    std::fs::remove_dir_all(cluster.data_dir(victim)).expect("lose the data directory");

    cluster.restart(victim).await;
    let raft = cluster.server(victim).node().shards[0].raft.clone();
    // Fenced from the first moment (a new data directory), then told why.
    assert!(raft.may_vote().is_err(), "a node with a new data directory voted before its peers answered");
    eventually("the node finds out its data directory was lost", CLUSTER_WAIT, || {
        let raft = raft.clone();
        async move { raft.fault_counts().iter().any(|(kind, _)| *kind == "data_dir_lost").then_some(()) }
    })
    .await;
    eventually("the copy is whole again", CLUSTER_WAIT, || {
        let raft = raft.clone();
        async move { raft.fenced().is_none().then_some(()) }
    })
    .await;
    for id in [&ids[0], &ids[40], &ids[79]] {
        assert_eq!(read_job(&cluster, victim, id).await.id, *id);
    }
    let (index, digests) = common_digests(&cluster, commit).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas differ at {index}: {digests:?}");
    cluster.shutdown().await;
}

/// Two of three copies damaged at once (the leader's and a follower's raft
/// logs lost, as in a power cut that took their write caches): the shard
/// stops instead of losing data — neither damaged copy votes, the healthy
/// one cannot be elected alone, writes are refused. An operator rebuilds
/// one damaged copy; it then votes for the healthy one, which is elected
/// with every acknowledged job, and both damaged copies are caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_damaged_copies_stop_the_shard_until_one_is_rebuilt() {
    let mut cluster = TestCluster::start_with(3, settings).await;
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.other(leader);
    let healthy = (0..3).find(|i| *i != leader && *i != follower).expect("a third node");
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..60u32 {
        ids.push(enqueue(&mut jobs, "two", format!("job {i}").as_bytes()).await);
    }
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    for i in 0..3 {
        cluster.wait_applied(i, commit).await;
    }
    // The leader last, so it hands leadership to nobody.
    for i in [healthy, follower, leader] {
        cluster.stop(i).await;
    }
    for i in [leader, follower] {
        let raft_dir = cluster.data_dir(i).join("raft");
        std::fs::rename(&raft_dir, raft_dir.with_extension("lost")).expect("lose the raft log");
    }
    for i in [healthy, follower, leader] {
        cluster.restart(i).await;
    }
    for i in [leader, follower] {
        assert!(cluster.server(i).node().shards[0].raft.fenced().is_some(), "node {} is not fenced", i + 1);
    }
    // Several election timeouts: nobody may lead.
    let until = tokio::time::Instant::now() + gantry_tests::cluster::CLUSTER_ELECTION_TIMEOUT * 4;
    while tokio::time::Instant::now() < until {
        for i in 0..3 {
            assert!(!cluster.server(i).node().shards[0].raft.is_leader(), "node {} leads a damaged shard", i + 1);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut request = tonic::Request::new(proto::EnqueueRequest {
        queue: "two".into(),
        payload: b"refused".to_vec(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(2));
    assert!(cluster.jobs(healthy).enqueue(request).await.is_err(), "a write was accepted by a shard with no leader");

    // Rebuilding the healthy copy is refused; the damaged follower's works.
    let mut admin = cluster.admin(healthy);
    let refused = admin
        .rebuild_replica(proto::RebuildReplicaRequest { node_id: healthy as u64 + 1, shard: 0 })
        .await
        .expect_err("the only healthy copy");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    admin
        .rebuild_replica(proto::RebuildReplicaRequest { node_id: follower as u64 + 1, shard: 0 })
        .await
        .expect("rebuild a damaged copy");
    eventually("the healthy copy is elected", CLUSTER_WAIT, || async {
        cluster.server(healthy).node().shards[0].raft.is_leader().then_some(())
    })
    .await;
    let jobs = cluster.jobs(healthy);
    for id in &ids {
        assert_eq!(read_job(&cluster, healthy, id).await.id, *id);
    }
    eventually("both damaged copies are whole again", CLUSTER_WAIT, || {
        let mut jobs = jobs.clone();
        let cluster = &cluster;
        async move {
            // New entries carry the old leader's copy past what it acknowledged.
            let _ = jobs
                .enqueue(proto::EnqueueRequest { queue: "marker".into(), payload: b"m".to_vec(), ..Default::default() })
                .await;
            [leader, follower].iter().all(|i| cluster.server(*i).node().shards[0].raft.fenced().is_none()).then_some(())
        }
    })
    .await;
    let (index, digests) = common_digests(&cluster, commit).await;
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas differ at {index}: {digests:?}");
    cluster.shutdown().await;
}
