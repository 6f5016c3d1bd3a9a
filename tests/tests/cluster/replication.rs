//! Three nodes in the test process: replication, forwarding from any node,
//! and failover that keeps jobs and worker leases.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use gantry_tests::{
    RunningWorker,
    cluster::{CLUSTER_ELECTION_TIMEOUT, CLUSTER_WAIT, TestCluster, cluster_status},
    eventually, get_job,
    v1::{self as proto, JobState},
    wait_for_state,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_every_rpc_and_names_the_leader() {
    let mut cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.other(leader);

    // Enqueue through a follower: forwarded, acknowledged after the commit,
    // and answered with the leader's address.
    let mut jobs = cluster.jobs(follower);
    let response = jobs
        .enqueue(proto::EnqueueRequest { queue: "q".into(), payload: b"via follower".to_vec(), ..Default::default() })
        .await
        .expect("enqueue through a follower");
    let hint = response.metadata().get("gantry-leader").expect("gantry-leader metadata").to_str().unwrap().to_owned();
    assert_eq!(hint, cluster.endpoint(leader));
    let job_id = response.into_inner().job_id;

    // Every node reads it (reads go to the leader: never stale).
    for i in 0..3 {
        let job = get_job(&mut cluster.jobs(i), &job_id).await;
        assert_eq!((job.state(), job.payload.as_slice()), (JobState::Ready, b"via follower".as_slice()));
    }

    // A worker that only knows a follower is proxied to the leader.
    let worker = RunningWorker::spawn(&cluster.endpoint(follower), "q", "w-follower", 4, |ctx| async move {
        Ok(Bytes::from(format!("done {}", ctx.job_id())))
    });
    worker.wait_connected().await;
    let done = wait_for_state(&mut cluster.jobs(follower), &job_id, JobState::Succeeded).await;
    assert_eq!(done.result, format!("done {job_id}").into_bytes());
    worker.shutdown().await;

    // ClusterStatus from any node: three voters, one leader, lag known.
    for i in 0..3 {
        let status = cluster_status(cluster.addrs[i]).await.expect("cluster status");
        assert_eq!(status.nodes.len(), 3, "{status:?}");
        assert!(status.nodes.iter().all(|n| n.role == "voter"), "{status:?}");
        assert_eq!(status.shards[0].leader_id, leader as u64 + 1);
        assert_eq!(status.shards[0].voters.len(), 3);
        assert_eq!(status.node_id, leader as u64 + 1, "a follower asks the leader, who knows replication");
        assert!(status.nodes.iter().all(|n| n.replication_lag.is_some()), "{status:?}");
    }

    // The leader says when it last heard from each other node: recently
    // while they answer, ever longer ago once one is gone.
    let heard = |status: &proto::ClusterStatusResponse, node: usize| {
        status.nodes.iter().find(|n| n.node_id == node as u64 + 1).and_then(|n| n.last_heard_ms)
    };
    // (A leader change on a busy machine would make both moot: then the
    // check is skipped rather than failed.)
    let led_by = |status: &proto::ClusterStatusResponse| status.shards[0].leader_id == leader as u64 + 1;
    let first = cluster_status(cluster.addrs[leader]).await.expect("cluster status");
    if led_by(&first) {
        assert_eq!(heard(&first, leader), None, "not of itself: {first:?}");
        assert!(heard(&first, follower).is_some(), "{first:?}");
    }
    let election_ms = CLUSTER_ELECTION_TIMEOUT.as_millis() as u64;
    eventually("the followers heard from within an election timeout", CLUSTER_WAIT, || async {
        let status = cluster_status(cluster.addrs[leader]).await?;
        let recent = (0..3).filter(|i| *i != leader).all(|i| heard(&status, i).is_some_and(|ms| ms < election_ms));
        (recent || !led_by(&status)).then_some(())
    })
    .await;
    cluster.stop(follower).await;
    eventually("the stopped follower not heard from for an election timeout", CLUSTER_WAIT, || async {
        let status = cluster_status(cluster.addrs[leader]).await?;
        (heard(&status, follower).is_some_and(|ms| ms > election_ms) || !led_by(&status)).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

/// Job id → (attempt, fencing token) of every run the handler saw.
type Runs = HashMap<String, Vec<(u32, u64)>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_acknowledged_jobs_and_worker_leases() {
    let mut cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let client = gantry_worker::Client::connect(cluster.endpoints()).await.expect("client");

    // A worker holds slow jobs while the leader goes away.
    let release = Arc::new(tokio::sync::Notify::new());
    let runs: Arc<Mutex<Runs>> = Arc::default();
    let worker = {
        let (release, runs) = (release.clone(), runs.clone());
        RunningWorker::spawn(&cluster.endpoints().join(","), "slow", "w1", 4, move |ctx| {
            let (release, runs) = (release.clone(), runs.clone());
            async move {
                runs.lock()
                    .unwrap()
                    .entry(ctx.job_id().to_owned())
                    .or_default()
                    .push((ctx.attempt(), ctx.fencing_token()));
                release.notified().await;
                Ok(Bytes::from_static(b"ok"))
            }
        })
    };
    worker.wait_connected().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(client.enqueue("slow", format!("job {i}")).send().await.expect("enqueue").job_id);
    }
    eventually("four jobs running on the worker", CLUSTER_WAIT, || async {
        (runs.lock().unwrap().len() == 4).then_some(())
    })
    .await;

    cluster.stop(leader).await;
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);

    // Enqueues still work (the SDK finds the new leader by itself).
    let after = client.enqueue("slow", "after failover").send().await.expect("enqueue after failover").job_id;
    ids.push(after);

    // The worker resumes its session on the new leader and keeps its
    // leases: its results are accepted, no job runs twice.
    eventually("the worker reconnected", CLUSTER_WAIT, || async {
        (worker.handle.stats().sessions >= 2 && worker.handle.is_connected()).then_some(())
    })
    .await;
    release.notify_waiters();
    for id in &ids {
        loop {
            let job = client.wait(id, Duration::from_secs(1)).await.expect("wait");
            if job.state() == JobState::Succeeded {
                assert_eq!(job.attempt, 1, "job {id} ran again: {job:?}");
                break;
            }
            release.notify_waiters();
        }
    }
    let runs = runs.lock().unwrap().clone();
    assert!(runs.values().all(|r| r.len() == 1), "a job ran twice: {runs:?}");
    worker.shutdown().await;

    // The old leader comes back as a follower and catches up.
    cluster.restart(leader).await;
    let status = cluster_status(cluster.addrs[new_leader]).await.expect("status");
    cluster.wait_applied(leader, status.shards[0].commit_index).await;
    for id in &ids {
        let job = get_job(&mut cluster.jobs(leader), id).await;
        assert_eq!(job.state(), JobState::Succeeded);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_is_caught_up_with_a_snapshot() {
    let mut cluster = TestCluster::start_with(3, |c| c.snapshot_every = 200).await;
    let leader = cluster.wait_for_leader().await;
    let behind = cluster.other(leader);
    cluster.stop(behind).await;

    // More entries than a leader keeps behind its snapshot (1000), one
    // command each, so the stopped node's next entry is purged.
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..1200u32 {
        let request =
            proto::EnqueueRequest { queue: "bulk".into(), payload: i.to_be_bytes().to_vec(), ..Default::default() };
        ids.push(jobs.enqueue(request).await.expect("enqueue").into_inner().job_id);
    }
    snapshot_and_purge(&cluster.server(leader).node().shards[0].raft).await;

    cluster.restart(behind).await;
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(behind, commit).await;
    let status = cluster.server(behind).node().shards[0].raft.status();
    assert!(status.snapshot_index > 0, "caught up without a snapshot: {status:?}");
    // The restored state is the leader's: read it on the caught-up node.
    {
        let applied = cluster.server(behind).node().shards[0].raft.state().read();
        for id in [&ids[0], &ids[600], &ids[1199]] {
            let job_id = id.parse().expect("job id");
            assert!(applied.queue.job(job_id).is_some(), "job {id} missing after the snapshot install");
        }
    }
    cluster.shutdown().await;
}

/// raft-engine drops a damaged log tail silently at open; the node must
/// notice it lost entries it had acknowledged, stay out of elections until
/// the leader gave them back, and no acknowledged job may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_tail_was_lost_does_not_vote_until_caught_up() {
    let mut cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let victim = cluster.other(leader);
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..300u32 {
        let request =
            proto::EnqueueRequest { queue: "tail".into(), payload: vec![7; 2048 + i as usize], ..Default::default() };
        ids.push(jobs.enqueue(request).await.expect("enqueue").into_inner().job_id);
    }
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(victim, commit).await;
    cluster.stop(victim).await;

    // Cut the newest raft-engine file of the stopped node in half.
    let raft_dir = cluster.data_dir(victim).join("raft");
    let newest = std::fs::read_dir(&raft_dir)
        .expect("raft dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .max()
        .expect("a raft-engine log file");
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len / 2).unwrap();

    cluster.restart(victim).await;
    let raft = &cluster.server(victim).node().shards[0].raft;
    let (recovered, acknowledged) = raft.lost_at_open().expect("the restart noticed the lost tail");
    assert!(recovered < acknowledged && acknowledged >= commit, "{recovered} {acknowledged} {commit}");

    // The leader replicates the lost entries again; then it votes again.
    cluster.wait_applied(victim, commit).await;
    eventually("the node votes again once caught up", CLUSTER_WAIT, || async {
        cluster.server(victim).node().shards[0].raft.may_vote().ok()
    })
    .await;
    // Nothing acknowledged is lost, even with the old leader gone.
    cluster.stop(leader).await;
    cluster.wait_for_leader().await;
    let reader = cluster.other(leader);
    for id in [&ids[0], &ids[150], &ids[299]] {
        assert_eq!(get_job(&mut cluster.jobs(reader), id).await.state(), JobState::Ready, "job {id}");
    }
    cluster.shutdown().await;
}

/// A leader shut down cleanly (as in a rolling restart) hands leadership to
/// a follower before it goes: once its shutdown returned, another node
/// leads already, instead of the cluster waiting out an election timeout
/// with no leader. Elections are made too slow here to stand in for a
/// handover that did not happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_shutting_down_hands_leadership_over_first() {
    hands_over_at_shutdown(3).await;
}

/// With two voters the one left can never win an election alone: only the
/// departing leader's handover makes it leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_of_two_shutting_down_hands_leadership_over_first() {
    hands_over_at_shutdown(2).await;
}

async fn hands_over_at_shutdown(size: usize) {
    let mut cluster = TestCluster::start_with(size, |c| {
        c.election_timeout = Duration::from_secs(30);
        c.session_ttl = Duration::from_secs(60);
    })
    .await;
    let leader = cluster.wait_for_leader().await;
    let mut jobs = cluster.jobs(cluster.other(leader));
    let job_id = gantry_tests::enqueue(&mut jobs, "q", b"before the restart").await;
    cluster.stop(leader).await;
    let leading: Vec<usize> =
        (0..size).filter(|i| *i != leader && cluster.server(*i).node().shards[0].raft.is_leader()).collect();
    assert_eq!(leading.len(), 1, "no node led when the old leader's shutdown returned");
    if size > 2 {
        // (Of two, the one left has no quorum to read with.)
        assert_eq!(get_job(&mut cluster.jobs(leading[0]), &job_id).await.payload, b"before the restart");
    }
    cluster.restart(leader).await;
    cluster.shutdown().await;
}

/// Peer links that drop mid-pipeline: every node's peer traffic goes
/// through a proxy that, at seeded random moments, closes every connection
/// through it while jobs are enqueued. Replication streams break with
/// requests in flight and openraft resends from what each follower
/// confirmed: every acknowledged job is then on every node, and the
/// replicas' states are identical at the same index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_streams_survive_peer_links_cut_mid_pipeline() {
    use gantry_tests::{faults, proxy::Proxy};
    let test = "replication::replication_streams_survive_peer_links_cut_mid_pipeline";
    let seed = faults::seed_from_env(gantry_broker::dispatch::queue_hash(test));
    eprintln!("replay: {}", faults::replay_command(test, seed));
    let mut rng = faults::Rng::new(seed);
    let proxies = [Proxy::start().await, Proxy::start().await, Proxy::start().await];
    let initial: String =
        proxies.iter().enumerate().map(|(i, p)| format!("{}={}", i + 1, p.addr)).collect::<Vec<_>>().join(",");
    let routes: Vec<_> = proxies.iter().map(|p| p.addr.to_string()).collect();
    let cluster = TestCluster::start_with(3, |config| {
        let i = config.node_id as usize - 1;
        config.initial_cluster = initial.parse().expect("initial cluster");
        config.peer_advertise = Some(routes[i].clone());
        proxies[i].set_target(config.peer_listen);
    })
    .await;
    let leader = cluster.wait_for_leader().await;
    eventually("the shard streams its replication", CLUSTER_WAIT, || async {
        gantry_tests::enqueue(&mut cluster.jobs(leader), "warm-up", b"x").await;
        (cluster.server(leader).node().shards[0].raft.timings().streams().requests > 0).then_some(())
    })
    .await;

    let mut acknowledged = Vec::new();
    let mut jobs: Vec<_> = (0..3).map(|i| cluster.jobs(i)).collect();
    let mut next_cut = tokio::time::Instant::now();
    for n in 0..600u32 {
        if tokio::time::Instant::now() >= next_cut {
            let which = rng.below(3) as usize;
            proxies[which].cut();
            next_cut = tokio::time::Instant::now() + Duration::from_millis(rng.range(20..=150));
        }
        let node = rng.below(3) as usize;
        let request = proto::EnqueueRequest {
            queue: format!("cut-{}", n % 4),
            payload: format!("job {n}").into_bytes(),
            idempotency_key: format!("k-{n}"),
            ..Default::default()
        };
        // An enqueue that failed was not acknowledged: only those that
        // were are checked (the idempotency key makes a retry harmless).
        if let Ok(reply) = jobs[node].enqueue(request).await {
            acknowledged.push((n, reply.into_inner().job_id));
        }
    }
    let cuts: u64 = proxies.iter().map(Proxy::cuts).sum();
    let leader = cluster.wait_for_leader().await;
    let streams = cluster.server(leader).node().shards[0].raft.timings().streams();
    eprintln!("{} of 600 acknowledged, {cuts} cuts, leader's streams {streams:?}", acknowledged.len());
    assert!(acknowledged.len() >= 300, "too few enqueues got through to prove anything (seed {seed})");
    assert!(streams.broken > 0, "no replication stream broke: the cuts missed them (seed {seed})");

    let index = cluster.server(leader).node().shards[0].raft.status().applied_index;
    for i in 0..3 {
        cluster.wait_applied(i, index).await;
    }
    let digests: Vec<_> = (0..3)
        .map(|i| {
            gantry_broker::raft::state_machine::digest_of(&cluster.server(i).node().shards[0].raft.state().read().queue)
                .unwrap()
        })
        .collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "replicas differ (seed {seed}): {digests:?}");
    let state = cluster.server(cluster.other(leader)).node().shards[0].raft.state().read().queue.clone();
    for (n, job_id) in &acknowledged {
        let id: gantry_broker::queue::JobId = job_id.parse().expect("job id");
        let job = state.job(id).unwrap_or_else(|| panic!("acknowledged job {n} ({job_id}) missing (seed {seed})"));
        assert_eq!(job.payload, format!("job {n}").as_bytes(), "seed {seed}");
    }
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown()).await.expect("shutdown");
}

/// Payloads kept on disk (`payload_memory_bytes = 0`) are the same bytes
/// everywhere a job is read: handed to a worker, read with GetJob, carried
/// to a follower in a snapshot and written to its disk there, and restored
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_on_disk_are_handed_out_replicated_and_restored() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.payload_memory_bytes = 0;
        c.snapshot_every = 200;
    })
    .await;
    let leader = cluster.wait_for_leader().await;
    let newest = gantry_broker::format::table::FORMAT_MAX;
    eventually("every replica at the newest format", CLUSTER_WAIT, || async {
        (0..3).all(|i| shard(&cluster, i).format() == newest).then_some(())
    })
    .await;
    let behind = cluster.other(leader);
    cluster.stop(behind).await;

    // 1200 jobs of 2-3 KiB: more than the 1 MiB the mover lets pass the budget.
    let payload_of = |i: u32| format!("payload {i:04} ").repeat(160 + (i % 7) as usize).into_bytes();
    let mut jobs = cluster.jobs(leader);
    let mut ids = Vec::new();
    for i in 0..1200u32 {
        let request = proto::EnqueueRequest { queue: "disk".into(), payload: payload_of(i), ..Default::default() };
        ids.push(jobs.enqueue(request).await.expect("enqueue").into_inner().job_id);
    }
    eventually("the leader moved the older payloads to disk", CLUSTER_WAIT, || async {
        let (moved, in_memory) = shard(&cluster, leader).raft.state().payload_bytes();
        (moved > 2_000_000 && in_memory <= 1 << 20).then_some(())
    })
    .await;
    assert!(
        ids[..600].iter().all(|id| stored_job(&cluster, leader, id).payload.in_memory().is_none()),
        "oldest on disk"
    );
    for n in [0usize, 599, 1199] {
        let job = get_job(&mut cluster.jobs(leader), &ids[n]).await;
        assert_eq!(job.payload, payload_of(n as u32), "job {}", ids[n]);
    }

    // The follower that missed everything gets a snapshot: its payloads
    // go to its disk as they are decoded.
    snapshot_and_purge(&shard(&cluster, leader).raft).await;
    cluster.restart(behind).await;
    let commit = cluster_status(cluster.addrs[leader]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(behind, commit).await;
    assert!(shard(&cluster, behind).raft.status().snapshot_index > 0, "caught up without a snapshot");
    for (n, id) in ids.iter().enumerate() {
        let job = stored_job(&cluster, behind, id);
        assert!(job.payload.in_memory().is_none(), "job {id} in memory on the follower");
        assert_eq!(job.payload, payload_of(n as u32), "job {id} on the follower");
    }

    // A worker gets the bytes it was given.
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let record = seen.clone();
    let worker = RunningWorker::spawn(&cluster.endpoints().join(","), "disk", "w-disk", 16, move |ctx| {
        let record = record.clone();
        async move {
            record.lock().unwrap().insert(ctx.job_id().to_owned(), ctx.payload().to_vec());
            Ok(Bytes::new())
        }
    });
    eventually("every job handed out", CLUSTER_WAIT, || async {
        (seen.lock().unwrap().len() == ids.len()).then_some(())
    })
    .await;
    worker.shutdown().await;
    let seen = seen.lock().unwrap().clone();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(seen[id], payload_of(n as u32), "job {id} as handed out");
    }

    // A restarted leader restores them from its snapshot and log.
    cluster.stop(leader).await;
    cluster.restart(leader).await;
    let commit = cluster_status(cluster.addrs[behind]).await.expect("status").shards[0].commit_index;
    cluster.wait_applied(leader, commit).await;
    for n in [0usize, 777, 1199] {
        let job = stored_job(&cluster, leader, &ids[n]);
        assert_eq!(job.payload, payload_of(n as u32), "job {} after the restart", ids[n]);
    }
    cluster.shutdown().await;
}

/// Snapshots the leader's shard and waits until its log is purged behind
/// the snapshot (past index 100), so that a node stopped before it needs
/// the snapshot to catch up.
async fn snapshot_and_purge(raft: &gantry_broker::raft::ShardRaft) {
    raft.snapshot_now().await.expect("snapshot");
    // Purging can lag the snapshot (openraft keeps entries a replication
    // request still reads): wait for it, or the stopped node may find
    // its next entry still in the log.
    eventually("the leader purged its log behind a snapshot", CLUSTER_WAIT, || async {
        let status = raft.status();
        (status.snapshot_index > 1000 && status.purged_index > 100).then_some(())
    })
    .await;
}

fn shard(cluster: &TestCluster, i: usize) -> Arc<gantry_broker::dispatch::ShardNode> {
    cluster.server(i).node().shards[0].clone()
}

/// Job `id` as node `i`'s state machine holds it.
fn stored_job(cluster: &TestCluster, i: usize, id: &str) -> Arc<gantry_broker::queue::Job> {
    let shard = shard(cluster, i);
    let applied = shard.raft.state().read();
    applied.queue.jobs().get(&id.parse().expect("job id")).expect("job").clone()
}
