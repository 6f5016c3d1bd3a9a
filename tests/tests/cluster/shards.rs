//! Several shards (Raft groups) per cluster: queues spread over them by
//! hash, the count is fixed when the cluster is created, the shards'
//! leaders spread over the nodes (again after a failover), and any node
//! serves the calls and worker streams of shards other nodes lead.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use gantry_broker::{config::Config, dispatch::queue_hash};
use gantry_tests::{
    RunningWorker, TestBroker,
    cluster::{CLUSTER_WAIT, TestCluster, cluster_status},
    eventually, get_job,
    v1::{self as proto, JobState},
};

/// One queue name per shard, `names[i]` in shard `i`.
fn queue_per_shard(shards: u32) -> Vec<String> {
    (0..shards)
        .map(|shard| {
            (0..).map(|i| format!("q{i}")).find(|q| queue_hash(q) % u64::from(shards) == u64::from(shard)).unwrap()
        })
        .collect()
}

fn shard_of_job(job_id: &str) -> u32 {
    job_id.split_once('-').and_then(|(shard, _)| shard.parse().ok()).expect("job id <shard>-<seq>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_runs_several_shards_and_keeps_its_shard_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config {
        data_dir: dir.path().join("node"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        peer_listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: None,
        shards: 4,
        ..Config::default()
    };
    let server = gantry_broker::server::start(config.clone()).await.expect("starts with 4 shards");
    let endpoint = server.local_addr().to_string();
    let client = gantry_worker::Client::connect([endpoint.clone()]).await.expect("client");
    let queues = queue_per_shard(4);

    let mut ids = Vec::new();
    for (shard, queue) in queues.iter().enumerate() {
        for i in 0..3 {
            let id = client.enqueue(queue.as_str(), format!("{queue} {i}")).send().await.expect("enqueue").job_id;
            assert_eq!(shard_of_job(&id), shard as u32, "{queue} lives in shard {shard}: {id}");
            ids.push(id);
        }
    }
    // One batch over every shard: answered in request order.
    let batch: Vec<proto::EnqueueRequest> = queues
        .iter()
        .rev()
        .map(|q| proto::EnqueueRequest { queue: q.clone(), payload: b"batch".to_vec(), ..Default::default() })
        .collect();
    let results = client.enqueue_batch(batch).await.expect("batch over shards");
    for (result, shard) in results.iter().zip((0..4u32).rev()) {
        assert_eq!(shard_of_job(&result.job_id), shard, "{results:?}");
        ids.push(result.job_id.clone());
    }
    let mut admin = proto::admin_client::AdminClient::new(gantry_tests::channel(server.local_addr()));
    let listed = admin.list_queues(proto::ListQueuesRequest {}).await.expect("list").into_inner().queues;
    for (shard, queue) in queues.iter().enumerate() {
        let info = listed.iter().find(|q| &q.queue == queue).expect("listed");
        assert_eq!((info.shard, info.ready), (shard as u32, 4), "{info:?}");
    }

    // One worker stream over all four shards runs every job.
    let worker =
        RunningWorker::spawn(&endpoint, &queues.join(","), "w", 8, |_ctx| async { Ok(Bytes::from_static(b"ok")) });
    worker.wait_connected().await;
    for id in &ids {
        let job = client.wait(id, Duration::from_secs(20)).await.expect("wait");
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    }
    worker.shutdown().await;
    drop(client);
    server.shutdown().await.expect("clean shutdown");

    // The count is the cluster's: another one would map queues elsewhere.
    let refused = gantry_broker::server::start(Config { shards: 2, ..config.clone() }).await.err().expect("refused");
    assert!(refused.to_string().contains("4 shard(s)"), "{refused}");
    let server = gantry_broker::server::start(config).await.expect("restarts with its own count");
    let client = gantry_worker::Client::connect([server.local_addr().to_string()]).await.expect("client");
    for id in &ids {
        assert_eq!(client.get(id).await.expect("get").state(), JobState::Succeeded);
    }
    drop(client);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_several_shards_keeps_its_max_in_flight() {
    let broker = TestBroker::start_with(|c| c.shards = 4).await;
    let client = broker.client().await;
    let queues = queue_per_shard(4);
    let mut ids = Vec::new();
    for queue in &queues {
        for _ in 0..5 {
            ids.push(client.enqueue(queue.as_str(), "held").send().await.expect("enqueue").job_id);
        }
    }
    let release = Arc::new(tokio::sync::Notify::new());
    let worker = {
        let release = release.clone();
        RunningWorker::spawn(&broker.endpoint(), &queues.join(","), "w", 8, move |_ctx| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok(Bytes::from_static(b"ok"))
            }
        })
    };
    worker.wait_connected().await;
    let mut admin = broker.admin();
    let active = |listed: &[proto::QueueInfo]| listed.iter().map(|q| q.active).sum::<u64>();
    eventually("the worker's slots filled", CLUSTER_WAIT, || {
        let mut admin = admin.clone();
        async move {
            let listed = admin.list_queues(proto::ListQueuesRequest {}).await.ok()?.into_inner().queues;
            (active(&listed) >= 8).then_some(())
        }
    })
    .await;
    // One row for the session, its limit split over the shards, not each
    // shard's own copy of it.
    let workers = admin.list_workers(proto::ListWorkersRequest {}).await.expect("workers").into_inner().workers;
    assert_eq!(workers.len(), 1, "{workers:?}");
    let row = &workers[0];
    assert_eq!((row.max_in_flight, row.in_flight, row.queues.len()), (8, 8, 4), "{row:?}");
    let listed = admin.list_queues(proto::ListQueuesRequest {}).await.expect("list").into_inner().queues;
    assert_eq!(active(&listed), 8, "never more than max_in_flight: {listed:?}");

    let total = ids.len() as u64;
    let done = eventually("every job succeeded", CLUSTER_WAIT, || {
        release.notify_waiters();
        let mut admin = admin.clone();
        async move {
            let listed = admin.list_queues(proto::ListQueuesRequest {}).await.ok()?.into_inner().queues;
            (listed.iter().map(|q| q.succeeded).sum::<u64>() == total).then_some(listed)
        }
    })
    .await;
    assert!(done.iter().all(|q| q.failed == 0 && q.cancelled == 0), "{done:?}");
    worker.shutdown().await;
    broker.stop().await;
}

/// The node every shard names as leader, when they agree.
fn leaders(cluster: &TestCluster, node: usize) -> Vec<Option<u64>> {
    cluster.server(node).node().shards.iter().map(|s| s.raft.leader().map(|(id, _)| id)).collect()
}

/// Job id -> fencing tokens of every run the handler saw.
type Runs = HashMap<String, Vec<u64>>;

/// How many shards each node (0-based) leads, as node `node` sees it.
fn led_per_node(cluster: &TestCluster, node: usize) -> Vec<usize> {
    let leaders = leaders(cluster, node);
    (0..3).map(|i| leaders.iter().filter(|l| **l == Some(i as u64 + 1)).count()).collect()
}

async fn wait_spread(cluster: &TestCluster, running: &[usize], what: &str) {
    eventually(what, CLUSTER_WAIT, || async {
        let counts = led_per_node(cluster, running[0]);
        let even = running.iter().all(|i| counts[*i] >= 1) && running.iter().map(|i| counts[*i]).sum::<usize>() == 3;
        even.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_leaders_spread_over_the_nodes_and_again_after_a_failover() {
    let mut cluster = TestCluster::start_with(3, |c| c.shards = 3).await;
    cluster.wait_for_leader().await;
    // All three shards start on the initializer; they spread by themselves.
    wait_spread(&cluster, &[0, 1, 2], "one shard led by each node").await;
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.other(leader);
    let status = cluster_status(cluster.addrs[follower]).await.expect("status");
    assert_eq!(status.shards.len(), 3, "{status:?}");
    assert!(status.shards.iter().all(|s| s.voters.len() == 3), "{status:?}");

    // Slow jobs in every shard are held by one worker while the leader goes.
    let queues = queue_per_shard(3);
    let client = gantry_worker::Client::connect(cluster.endpoints()).await.expect("client");
    let release = Arc::new(tokio::sync::Notify::new());
    let runs: Arc<Mutex<Runs>> = Arc::default();
    let worker = {
        let (release, runs) = (release.clone(), runs.clone());
        RunningWorker::spawn(&cluster.endpoints().join(","), &queues.join(","), "w1", 6, move |ctx| {
            let (release, runs) = (release.clone(), runs.clone());
            async move {
                runs.lock().unwrap().entry(ctx.job_id().to_owned()).or_default().push(ctx.fencing_token());
                release.notified().await;
                Ok(Bytes::from_static(b"ok"))
            }
        })
    };
    worker.wait_connected().await;
    let mut ids = Vec::new();
    for queue in queues.iter().chain(&queues) {
        ids.push(client.enqueue(queue.as_str(), "before").send().await.expect("enqueue").job_id);
    }
    eventually("six jobs running on the worker", CLUSTER_WAIT, || async {
        (runs.lock().unwrap().len() == 6).then_some(())
    })
    .await;

    // Shard 0's leader goes; its shard is led by one of the two others.
    cluster.stop(leader).await;
    let new_leader = cluster.wait_for_leader().await;
    assert_ne!(new_leader, leader);
    let running: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    wait_spread(&cluster, &running, "the two running nodes lead every shard, each at least one").await;
    for queue in &queues {
        ids.push(client.enqueue(queue.as_str(), "after").send().await.expect("enqueue after failover").job_id);
    }
    eventually("the worker reconnected", CLUSTER_WAIT, || async {
        (worker.handle.stats().sessions >= 2 && worker.handle.is_connected()).then_some(())
    })
    .await;
    for id in &ids {
        let job = eventually(&format!("job {id} finished"), CLUSTER_WAIT, || async {
            release.notify_waiters();
            let job = client.wait(id, Duration::from_millis(500)).await.ok()?;
            matches!(job.state(), JobState::Succeeded | JobState::Failed | JobState::Cancelled).then_some(job)
        })
        .await;
        assert_eq!((job.state(), job.attempt), (JobState::Succeeded, 1), "job {id} ran again or failed: {job:?}");
    }
    let runs = runs.lock().unwrap().clone();
    assert!(runs.values().all(|r| r.len() == 1), "a job ran twice: {runs:?}");
    worker.shutdown().await;

    // The node comes back and is given a shard again.
    cluster.restart(leader).await;
    wait_spread(&cluster, &[0, 1, 2], "one shard led by each node again").await;

    // TransferLeader moves the shard it names, from any node.
    let leaders_now = cluster.wait_for_leaders().await;
    let target = (0..3).find(|i| *i != leaders_now[2]).expect("another node");
    let mut admin = cluster.admin(leaders_now[0]);
    let moved = admin
        .transfer_leader(proto::TransferLeaderRequest { shard: 2, node_id: target as u64 + 1 })
        .await
        .expect("transfer shard 2")
        .into_inner();
    assert_eq!(moved.shards[2].leader_id, target as u64 + 1, "{moved:?}");
    let refused =
        admin.transfer_leader(proto::TransferLeaderRequest { shard: 7, node_id: 1 }).await.expect_err("no shard 7");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");

    // A node started with another shard count cannot join.
    let stranger = TestBroker::start_with(|c| {
        c.node_id = 9;
        c.shards = 2;
    })
    .await;
    let peer = stranger.server().peer_addr().to_string();
    let refused =
        admin.add_node(proto::AddNodeRequest { node_id: 9, address: peer }).await.expect_err("another shard count");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("runs 2 shard(s), this cluster 3"), "{refused:?}");
    stranger.stop().await;
    cluster.shutdown().await;
}

/// Moves every shard's leadership to `placement[shard]` (0-based node) and
/// waits until every node sees it.
async fn place_leaders(cluster: &TestCluster, placement: &[usize]) {
    eventually("each shard led by its node, as every node sees it", CLUSTER_WAIT, || async {
        for (shard, node) in placement.iter().enumerate() {
            let wanted = *node as u64 + 1;
            let current = leaders(cluster, *node)[shard]?;
            if current != wanted {
                let raft = &cluster.server(current as usize - 1).node().shards[shard].raft;
                if raft.is_leader() {
                    let _ = raft.transfer_leadership(wanted).await;
                }
            }
        }
        let settled = (0..3)
            .all(|i| leaders(cluster, i).iter().zip(placement).all(|(leader, node)| *leader == Some(*node as u64 + 1)));
        settled.then_some(())
    })
    .await;
}

/// Three nodes, three shards, shard i led by node i (the balancer off, so
/// the placement holds).
async fn cluster_of_three_leaders() -> TestCluster {
    let cluster = TestCluster::start_with(3, |c| {
        c.shards = 3;
        c.balance_leaders = false;
    })
    .await;
    cluster.wait_for_leader().await;
    place_leaders(&cluster, &[0, 1, 2]).await;
    cluster
}

fn leader_hint<T>(response: &tonic::Response<T>) -> Option<String> {
    response.metadata().get("gantry-leader").map(|v| v.to_str().expect("ascii").to_owned())
}

/// Every node serves every unary call of every shard itself, whichever node
/// leads the shard: a shard's commands go to its leader, reads wait until
/// the serving node has applied what the leader confirmed (so they are
/// linearizable from any node), and the answer names the shard's leader
/// when another node leads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_unary_calls_of_shards_led_by_other_nodes() {
    let cluster = cluster_of_three_leaders().await;
    let queues = queue_per_shard(3);
    let leader_address = |shard: usize| cluster.addrs[shard].to_string();

    for via in 0..3 {
        let mut jobs = cluster.jobs(via);
        let mut admin = cluster.admin(via);
        for (shard, queue) in queues.iter().enumerate() {
            let expected_hint = (shard != via).then(|| leader_address(shard));
            let request =
                proto::EnqueueRequest { queue: queue.clone(), payload: b"routed".to_vec(), ..Default::default() };
            let response = jobs.enqueue(request).await.expect("enqueue from any node");
            assert_eq!(leader_hint(&response), expected_hint, "enqueue in shard {shard} via node {via}");
            let job_id = response.into_inner().job_id;
            assert_eq!(shard_of_job(&job_id), shard as u32, "{job_id}");
            // Read right after, from each node: linearizable wherever it runs.
            for reader in 0..3 {
                let job = get_job(&mut cluster.jobs(reader), &job_id).await;
                assert_eq!((job.queue.as_str(), job.state()), (queue.as_str(), JobState::Ready), "via {reader}");
            }
            let cancelled = jobs
                .cancel_job(proto::CancelJobRequest { job_id: job_id.clone(), ..Default::default() })
                .await
                .expect("cancel from any node");
            assert_eq!(leader_hint(&cancelled), expected_hint);
            assert_eq!(cancelled.into_inner().state(), JobState::Cancelled);
            let waited = jobs
                .wait_job(proto::WaitJobRequest { job_id: job_id.clone(), timeout: None })
                .await
                .expect("wait from any node")
                .into_inner();
            assert_eq!(waited.state(), JobState::Cancelled);

            let paused = admin.pause_queue(proto::PauseQueueRequest { queue: queue.clone() }).await.expect("pause");
            assert_eq!(leader_hint(&paused), expected_hint);
            assert!(paused.into_inner().paused, "the answer reads the node's state after the commit");
            let resumed = admin.resume_queue(proto::ResumeQueueRequest { queue: queue.clone() }).await.expect("resume");
            assert!(!resumed.into_inner().paused);
            let listed = admin
                .list_jobs(proto::ListJobsRequest { queue: queue.clone(), ..Default::default() })
                .await
                .expect("list jobs")
                .into_inner()
                .jobs;
            assert!(listed.iter().any(|j| j.id == job_id), "{listed:?}");
        }

        // One batch over every shard: each part commits on its own leader.
        let batch = proto::EnqueueBatchRequest {
            jobs: queues
                .iter()
                .map(|q| proto::EnqueueRequest { queue: q.clone(), payload: b"batch".to_vec(), ..Default::default() })
                .collect(),
        };
        let results = jobs.enqueue_batch(batch).await.expect("batch over shards").into_inner().results;
        for (shard, result) in results.iter().enumerate() {
            assert!(result.error.is_empty(), "{results:?}");
            assert_eq!(shard_of_job(&result.job_id), shard as u32, "{results:?}");
        }
        let listed = admin.list_queues(proto::ListQueuesRequest {}).await.expect("list queues").into_inner().queues;
        for (shard, queue) in queues.iter().enumerate() {
            let info = listed.iter().find(|q| &q.queue == queue).expect("every shard's queue listed");
            assert_eq!((info.shard, info.ready, info.cancelled), (shard as u32, via as u64 + 1, via as u64 + 1));
        }
    }

    // Purging a queue whose shard another node leads, in parts, each on it.
    let mut admin = cluster.admin(0);
    let purged = admin
        .purge_queue(proto::PurgeQueueRequest { queue: queues[2].clone(), state: proto::JobState::Ready as i32 })
        .await
        .expect("purge from a node that does not lead the queue's shard");
    assert_eq!(leader_hint(&purged), Some(leader_address(2)));
    assert_eq!(purged.into_inner().purged, 3);
    let info = admin.get_queue(proto::GetQueueRequest { queue: queues[2].clone() }).await.expect("get queue");
    assert_eq!(info.into_inner().ready, 0);
    cluster.shutdown().await;
}

/// A worker stream over queues whose shards three different nodes lead,
/// connected to each node in turn: the node serves the shards it leads and
/// opens one part per other leader, so every job runs once (heartbeats
/// reach every leader: jobs held past the session ttl keep their leases),
/// the stream's max_in_flight holds over all of them, and a goodbye ends
/// the session in every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stream_spans_shards_led_by_different_nodes() {
    let cluster = cluster_of_three_leaders().await;
    let queues = queue_per_shard(3);
    let client = gantry_worker::Client::connect(cluster.endpoints()).await.expect("client");

    for via in 0..3 {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let runs: Arc<Mutex<Runs>> = Arc::default();
        let worker = {
            let (running, most, runs) = (running.clone(), most.clone(), runs.clone());
            RunningWorker::spawn(&cluster.endpoint(via), &queues.join(","), &format!("w{via}"), 4, move |ctx| {
                let (running, most, runs) = (running.clone(), most.clone(), runs.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                    runs.lock().unwrap().entry(ctx.job_id().to_owned()).or_default().push(ctx.fencing_token());
                    // Longer than the session ttl (2 s): only heartbeats,
                    // passed on to every leader, keep the leases.
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    running.fetch_sub(1, SeqCst);
                    Ok(Bytes::from_static(b"ok"))
                }
            })
        };
        worker.wait_connected().await;
        // Every node lists it as one connected worker, its heartbeats read
        // from each shard's leader.
        for node in 0..3 {
            let workers = eventually("the worker listed as connected", CLUSTER_WAIT, || async {
                let workers = cluster.admin(node).list_workers(proto::ListWorkersRequest {}).await.ok()?;
                let workers = workers.into_inner().workers;
                (workers.len() == 1 && workers[0].connected).then_some(workers)
            })
            .await;
            let row = &workers[0];
            assert_eq!((row.queues.len(), row.max_in_flight), (3, 4), "via node {node}: {row:?}");
            assert!(row.last_heartbeat_age.is_some(), "{row:?}");
        }
        let mut ids = Vec::new();
        for queue in &queues {
            for _ in 0..2 {
                ids.push(client.enqueue(queue.as_str(), "spread").send().await.expect("enqueue").job_id);
            }
        }
        for id in &ids {
            let job = eventually(&format!("job {id} finished (stream via node {via})"), CLUSTER_WAIT, || async {
                let job = client.wait(id, Duration::from_millis(500)).await.ok()?;
                matches!(job.state(), JobState::Succeeded | JobState::Failed | JobState::Cancelled).then_some(job)
            })
            .await;
            assert_eq!((job.state(), job.attempt), (JobState::Succeeded, 1), "job {id} ran again or failed: {job:?}");
        }
        let runs = runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 6, "{runs:?}");
        assert!(runs.values().all(|r| r.len() == 1), "a job ran twice: {runs:?}");
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=4).contains(&most), "max_in_flight 4 over three leaders, {most} ran at once");

        worker.shutdown().await;
        // Well within the session ttl (2 s): ended by the goodbye, not expired.
        let within_ttl = Duration::from_millis(1000);
        eventually("the goodbye ended the session in every shard, on every node", within_ttl, || async {
            let ended = (0..3).all(|node| {
                cluster.server(node).node().shards.iter().all(|s| s.raft.state().read().queue.sessions().is_empty())
            });
            ended.then_some(())
        })
        .await;
    }
    drop(client);
    cluster.shutdown().await;
}
