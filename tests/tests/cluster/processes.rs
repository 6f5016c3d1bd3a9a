//! Three real `gantry` processes on loopback, killed (SIGKILL), frozen
//! (SIGSTOP) and restarted under load. Producers and workers record what
//! they were told in a `History`; the checker then holds it against every
//! job as it ended (DESIGN §1: nothing acknowledged is lost, exactly one
//! outcome, fencing tokens grow, one holder at a time).
//!
//! The last two tests reproduce bugs found here (a resume racing its
//! session's expiry; SDK unary calls without a deadline): they fail until
//! those are fixed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use gantry_tests::{
    cluster::{BinaryCluster, CLUSTER_WAIT},
    eventually,
    history::{
        Expect, History, final_jobs,
        load::{Producers, client, echo},
        sdk_worker,
        worker::{Outcome, RecordingWorker},
    },
    v1::{self as proto, JobState},
};

/// Short liveness, and snapshots often, so a restarted node recovers
/// through a snapshot and the log behind it.
const ARGS: &[&str] = &[
    "--heartbeat-interval",
    "100ms",
    "--session-ttl",
    "1s",
    "--election-timeout",
    "300ms",
    "--raft-heartbeat-interval",
    "50ms",
    "--snapshot-every",
    "100",
];

/// Prints how long a scenario took, build time of the binaries excluded.
struct Timer(Instant);

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!("scenario took {:?} (cluster start included, build excluded)", self.0.elapsed());
    }
}

async fn start_cluster() -> (Timer, tempfile::TempDir, BinaryCluster) {
    gantry_tests::init_tracing();
    // Built (if stale) before the clock starts.
    gantry_tests::gantry_binary();
    let timer = Timer(Instant::now());
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = BinaryCluster::start(dir.path(), 3, ARGS).await;
    (timer, dir, cluster)
}

/// Waits until `queue` has nothing left to do: no job scheduled, ready or active.
async fn wait_drained(cluster: &BinaryCluster, history: &History, queue: &str) -> proto::QueueInfo {
    let (last, left) = match cluster.wait_queue_drained(queue).await {
        Ok(info) => return info,
        Err(left) => left,
    };
    // What is left, and what the workers saw.
    let left: Vec<String> = left
        .iter()
        .map(|j| {
            format!(
                "{} {:?} attempt {} token {} session {:?} worker {:?}",
                j.id,
                j.state(),
                j.attempt,
                j.fencing_token,
                j.session_id,
                j.worker_id
            )
        })
        .collect();
    panic!(
        "queue {queue} not drained within {CLUSTER_WAIT:?}: {last:?}\njobs left: {left:#?}\ntimeline:\n{}",
        history.timeline()
    );
}

/// Waits until every recording worker has no handler running and no
/// result unanswered, so the history holds every ack.
async fn wait_idle(workers: &[&RecordingWorker]) {
    eventually("recording workers idle", Duration::from_secs(20), || async {
        workers.iter().all(|w| w.is_idle()).then_some(())
    })
    .await
}

async fn check(history: &History, client: &gantry_worker::Client, queues: &[&str], expect: Expect) {
    let finals = final_jobs(client, queues, history.job_ids()).await;
    match history.check(&finals, expect) {
        Ok(summary) => eprintln!("history check passed: {summary}"),
        Err(violations) => panic!("{violations}timeline:\n{}", history.timeline()),
    }
}

/// 1. SIGKILL the leader under continuous enqueue and processing load: a
/// new leader serves, every acknowledged job ends SUCCEEDED with exactly
/// one outcome. The killed node, restarted, catches up from a snapshot and
/// the log, and then serves every job itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_under_load() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints();
    let leader = cluster.wait_for_leader().await;
    let history = History::new();
    let queue = "load";

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
    let producers = Producers::spawn(&history, &endpoints, queue, 3, 2000);

    eventually("100 jobs acknowledged before the kill", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 100).then_some(())
    })
    .await;
    let before_kill = history.acknowledged().len();
    // The end of the doomed leader's log, give or take what it appends
    // before the kill lands.
    let log_end = cluster.status(leader).await.expect("leader's status").shards[0].last_log_index + 50;
    let killed_at = Instant::now();
    history.note(format!("SIGKILL node {} (the leader)", leader + 1));
    cluster.kill9(leader);
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    history.note(format!("node {} leads", new_leader + 1));
    eprintln!(
        "node {} killed with {before_kill} jobs acknowledged; node {} leads after {:?}",
        leader + 1,
        new_leader + 1,
        killed_at.elapsed()
    );
    eventually("300 more jobs acknowledged by the new leader", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= before_kill + 300).then_some(())
    })
    .await;
    producers.stop().await;
    let drained = wait_drained(&cluster, &history, queue).await;
    wait_idle(&raw.iter().collect::<Vec<_>>()).await;
    let sdk_handle = sdk.handle.clone();
    sdk.shutdown().await;
    history.sdk_stats("sdk-0", &sdk_handle);
    let client = client(&endpoints).await;
    check(&history, &client, &[queue], Expect::Succeeded).await;
    eprintln!("queue after the load: {drained:?}\ntimeline:\n{}", history.timeline());

    // More than the 1000 entries a leader keeps behind its snapshot, while
    // the killed node is down, so it needs the leader's snapshot to catch
    // up. Concurrent enqueues share entries (group commit), so the writers
    // go on until the leader's snapshot is far enough, not for a count.
    let filled = Instant::now();
    let filler = History::new();
    let enough = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (filler, enough, mut jobs) = (filler.clone(), enough.clone(), cluster.nodes[new_leader].jobs());
            tokio::spawn(async move {
                // Bounded: at most 2000 acknowledged, with up to 100 refusals
                // (an election on two starved cores) on the way.
                let (mut done, mut refused) = (0, 0);
                while done < 2000 && !enough.load(Ordering::Relaxed) {
                    let request = proto::EnqueueRequest {
                        queue: "filler".into(),
                        payload: format!("filler {w} {done}").into_bytes(),
                        ..Default::default()
                    };
                    match jobs.enqueue(request).await {
                        Ok(response) => {
                            filler.enqueued(&response.into_inner().job_id);
                            done += 1;
                        }
                        Err(status) => {
                            filler.enqueue_unacknowledged("filler", &status);
                            refused += 1;
                            assert!(refused < 100, "filler enqueues keep failing: {status:?}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect();
    // The leader snapshots every 100 commands and keeps 1000 entries
    // behind a snapshot: past this index, what the killed node lacks is gone
    // from every log.
    let purged_past = log_end + 1000;
    let leader_snapshot = eventually("the leader's log purged past the killed node's end", CLUSTER_WAIT, || async {
        let index = cluster.status(new_leader).await?.shards[0].snapshot_index;
        (index > purged_past).then_some(index)
    })
    .await;
    enough.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("filler writer");
    }
    eprintln!("{} enqueues by 8 writers took {:?}", filler.acknowledged().len(), filled.elapsed());

    // The killed node comes back: it restores its last snapshot, replays
    // its log, and catches up from the leader.
    let log_from = cluster.log_len(leader);
    cluster.restart(leader).await;
    let commit = cluster.wait_replicated(leader).await;
    let status = cluster.lead_from(leader, commit).await;
    let shard = &status.shards[0];
    let log = cluster.log_since(leader, log_from);
    let installed = log.contains("installing snapshot from the leader");
    assert!(
        installed,
        "node {} caught up without the leader's snapshot, though its log ended near {log_end} and the leader's \
         snapshot is at {leader_snapshot}; its log since the restart:\n{log}",
        leader + 1
    );
    eprintln!(
        "node {} caught up to {commit}: snapshot index {}, applied {}, snapshot installed from the leader: {installed}",
        leader + 1,
        shard.snapshot_index,
        shard.applied_index
    );
    // Every job as the restarted node's own state machine has it.
    check(&history, &client, &[queue], Expect::Succeeded).await;
    check(&filler, &client, &["filler"], Expect::Present).await;
    drop(raw);
}

/// 1b. The same with three shards, their leaders spread over the three
/// nodes: worker streams span shards led by different nodes (one part per
/// other leader), the killed node's shard is elected elsewhere, workers
/// resume their sessions, and the history holds across shards (tokens
/// compared within a shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_of_three_shards_under_load() {
    let (_timer, _dir, mut cluster, leaders) = start_three_leaders().await;
    let endpoints = cluster.endpoints();
    let leader = leaders[0];
    let history = History::new();
    // One queue per shard (fnv1a64 % 3), so every group carries load.
    let queues = ["load-a", "load-b", "load-c"];
    let shards: std::collections::BTreeSet<u64> =
        queues.iter().map(|q| gantry_broker::dispatch::queue_hash(q) % 3).collect();
    assert_eq!(shards.len(), 3, "the queues cover every shard");
    let all = queues.join(",");

    let raw: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, &all, 8, echo)).collect();
    let sdk = sdk_worker(&history, &endpoints.join(","), &all, "sdk-0", 8, |ctx| async move {
        tokio::time::sleep(Duration::from_millis(3)).await;
        Ok(ctx.payload().clone())
    });
    for worker in &raw {
        worker.wait_connected().await;
    }
    sdk.wait_connected().await;
    let producers: Vec<Producers> = queues.iter().map(|q| Producers::spawn(&history, &endpoints, q, 1, 1000)).collect();

    eventually("100 jobs acknowledged before the kill", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= 100).then_some(())
    })
    .await;
    let before_kill = history.acknowledged().len();
    history.note(format!("SIGKILL node {} (the leader of shard 0)", leader + 1));
    cluster.kill9(leader);
    let new_leaders = cluster.wait_for_leaders_other_than(Some(leader)).await;
    history.note(format!("shards led by nodes {:?}", new_leaders.iter().map(|i| i + 1).collect::<Vec<_>>()));
    eventually("300 more jobs acknowledged after the kill", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= before_kill + 300).then_some(())
    })
    .await;
    for producer in producers {
        producer.stop().await;
    }
    for queue in queues {
        wait_drained(&cluster, &history, queue).await;
    }
    wait_idle(&raw.iter().collect::<Vec<_>>()).await;
    let sdk_handle = sdk.handle.clone();
    sdk.shutdown().await;
    history.sdk_stats("sdk-0", &sdk_handle);
    let client = client(&endpoints).await;
    check(&history, &client, &queues, Expect::Succeeded).await;
    let acknowledged = history.acknowledged();
    let by_shard: std::collections::BTreeMap<&str, usize> =
        acknowledged.iter().fold(Default::default(), |mut counts, id| {
            *counts.entry(id.split_once('-').map_or("?", |(s, _)| s)).or_default() += 1;
            counts
        });
    assert_eq!(by_shard.len(), 3, "jobs in every shard: {by_shard:?}");
    eprintln!("acknowledged per shard: {by_shard:?}\ntimeline:\n{}", history.timeline());
    drop(raw);
}

/// Three nodes with three shards, once each shard is led by another node;
/// with each shard's leader (node index).
async fn start_three_leaders() -> (Timer, tempfile::TempDir, BinaryCluster, Vec<usize>) {
    gantry_tests::init_tracing();
    gantry_tests::gantry_binary();
    let timer = Timer(Instant::now());
    let dir = tempfile::tempdir().expect("temp dir");
    let args: Vec<&str> = ARGS.iter().copied().chain(["--shards", "3"]).collect();
    let cluster = BinaryCluster::start(dir.path(), 3, &args).await;
    let leaders = eventually("one shard led by each node", CLUSTER_WAIT, || async {
        let leaders = cluster.wait_for_leaders_other_than(None).await;
        (leaders.iter().collect::<std::collections::BTreeSet<_>>().len() == 3).then_some(leaders)
    })
    .await;
    (timer, dir, cluster, leaders)
}

/// 1c. Three shards led by three nodes; a worker that knows only one node
/// takes jobs of every shard (one stream, a part per other leader). The
/// leader of another shard is SIGSTOPped past the election timeout: it
/// cannot end its part itself, so the worker's node sees the shard led
/// elsewhere and ends the stream, the worker regroups on the new leader,
/// and that shard's jobs keep being done while the node is still stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stream_regroups_when_a_shard_leader_freezes() {
    let (_timer, _dir, mut cluster, leaders) = start_three_leaders().await;
    let endpoints = cluster.endpoints();
    let (via, frozen) = (leaders[0], leaders[1]);
    let history = History::new();
    let client = client(&endpoints).await;
    // queues[i] lives in shard i.
    let queues: Vec<String> = (0..3u64)
        .map(|shard| {
            (0..).map(|i| format!("regroup-{i}")).find(|q| gantry_broker::dispatch::queue_hash(q) % 3 == shard).unwrap()
        })
        .collect();
    let all = queues.join(",");
    let worker =
        sdk_worker(
            &history,
            &cluster.endpoint(via),
            &all,
            "one-node",
            8,
            |ctx| async move { Ok(ctx.payload().clone()) },
        );
    worker.wait_connected().await;
    for queue in &queues {
        history.enqueued(&client.enqueue(queue.as_str(), "before").send().await.expect("enqueue").job_id);
    }
    for id in history.acknowledged() {
        let job = client.wait(&id, Duration::from_secs(10)).await.expect("wait");
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    }

    history.note(format!("SIGSTOP node {} (the leader of shard 1; the worker is on node {})", frozen + 1, via + 1));
    cluster.pause(frozen);
    let now_led = cluster.wait_for_leaders_other_than(Some(frozen)).await;
    history.note(format!("shards led by nodes {:?}", now_led.iter().map(|i| i + 1).collect::<Vec<_>>()));
    // Well before the peer connection's keepalive (5 s + 5 s) would notice
    // the stopped node and end the part that way.
    eventually("the worker's stream regrouped", Duration::from_secs(4), || async {
        (worker.handle.stats().sessions >= 2 && worker.handle.is_connected()).then_some(())
    })
    .await;
    let mut after = Vec::new();
    for i in 0..3 {
        // Keyed: the client may try the stopped node first (it led the
        // queue), and only a keyed enqueue is sent again past a timeout.
        let enqueue =
            client.enqueue(queues[1].as_str(), format!("while frozen {i}")).idempotency_key(format!("frozen-{i}"));
        let id = enqueue.send().await.expect("enqueue").job_id;
        history.enqueued(&id);
        after.push(id);
    }
    for id in &after {
        let job =
            eventually(&format!("job {id} of shard 1 done while its old leader is stopped"), CLUSTER_WAIT, || async {
                let job = client.wait(id, Duration::from_millis(500)).await.ok()?;
                (job.state() == JobState::Succeeded).then_some(job)
            })
            .await;
        assert_eq!(job.attempt, 1, "{job:?}");
    }
    cluster.resume(frozen);
    let handle = worker.handle.clone();
    worker.shutdown().await;
    history.sdk_stats("one-node", &handle);
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    check(&history, &client, &queues, Expect::Succeeded).await;
}

/// Asserts that `check` stays true for `period`, polled every 50 ms: for
/// what must *not* happen (a refused result retried, a job changed).
async fn holds_for<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = Instant::now() + period;
    while Instant::now() < end {
        if let Err(e) = check().await {
            panic!("{what}: {e}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(client: &gantry_worker::Client, job_id: &str) -> proto::Job {
    client.get(job_id).await.unwrap_or_else(|e| panic!("GetJob {job_id}: {e}"))
}

/// 2. SIGSTOP the leader past the election timeout, then SIGCONT it: the
/// others elect a new leader, the old one steps down when it wakes, no
/// term ever has two leaders, and nothing the old leader acknowledges
/// after waking (enqueues sent to it while it was frozen) is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_the_leader_then_sigcont_it_steps_down() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints();
    let leader = cluster.wait_for_leader().await;
    let watch = cluster.watch_leadership();
    let history = History::new();
    let queue = "frozen";
    let workers: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, queue, 8, echo)).collect();
    for worker in &workers {
        worker.wait_connected().await;
    }
    let producers = Producers::spawn(&history, &endpoints, queue, 2, 1000);
    eventually("50 jobs acknowledged", CLUSTER_WAIT, || async { (history.acknowledged().len() >= 50).then_some(()) })
        .await;

    history.note(format!("SIGSTOP node {} (the leader)", leader + 1));
    cluster.pause(leader);
    // Enqueues sent to the frozen leader: answered (if ever) once it wakes.
    let frozen_addr = cluster.nodes[leader].addr;
    let stale_writes: Vec<_> = (0..5)
        .map(|i| {
            let history = history.clone();
            tokio::spawn(async move {
                let mut jobs = proto::jobs_client::JobsClient::new(gantry_tests::channel(frozen_addr));
                let mut request = tonic::Request::new(proto::EnqueueRequest {
                    queue: queue.into(),
                    payload: format!("sent to the frozen leader {i}").into_bytes(),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(20));
                match jobs.enqueue(request).await {
                    Ok(response) => {
                        history.enqueued(&response.into_inner().job_id);
                        "acknowledged".to_owned()
                    }
                    Err(status) => {
                        history.enqueue_unacknowledged(queue, &status);
                        format!("{:?}: {}", status.code(), status.message())
                    }
                }
            })
        })
        .collect();
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    // The new leader serves while the old one is frozen.
    let mut jobs = cluster.nodes[new_leader].jobs();
    for i in 0..20 {
        let request = proto::EnqueueRequest {
            queue: queue.into(),
            payload: format!("while frozen {i}").into_bytes(),
            ..Default::default()
        };
        // A new leader answers "no leader" until its term's first entry is
        // committed: retry that, bounded.
        let mut refused = 0;
        let job_id = loop {
            match jobs.enqueue(request.clone()).await {
                Ok(response) => break response.into_inner().job_id,
                Err(status) if status.code() == tonic::Code::Unavailable && refused < 50 => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("node {} (the new leader) refused an enqueue: {status:?}", new_leader + 1),
            }
        };
        history.enqueued(&job_id);
    }

    history.note(format!("node {} leads; SIGCONT node {}", new_leader + 1, leader + 1));
    cluster.resume(leader);
    let (old_id, new_id) = (leader as u64 + 1, new_leader as u64 + 1);
    let seen = eventually(&format!("node {old_id} steps down and names node {new_id}"), CLUSTER_WAIT, || async {
        // ClusterStatus shows a node's own role only while it leads (or
        // knows no leader); a follower forwards the call to the leader. So
        // an answer from node {new_id} through node {old_id} means node
        // {old_id} is a follower that knows the new leader.
        let status = cluster.status(leader).await?;
        (status.node_id == new_id && status.shards[0].leader_id == new_id).then_some(status)
    })
    .await;
    assert_eq!(seen.shards[0].role, "leader", "{seen:?}");
    let mut answers = Vec::new();
    for write in stale_writes {
        answers.push(write.await.expect("stale write task"));
    }
    producers.stop().await;
    wait_drained(&cluster, &history, queue).await;
    wait_idle(&workers.iter().collect::<Vec<_>>()).await;
    let client = client(&endpoints).await;
    check(&history, &client, &[queue], Expect::Succeeded).await;
    let claims = watch.finish().await.unwrap_or_else(|e| panic!("{e}"));
    let old_terms: Vec<u64> = claims.iter().filter(|(_, n)| n.contains(&old_id)).map(|(t, _)| *t).collect();
    let new_terms: Vec<u64> = claims.iter().filter(|(_, n)| n.contains(&new_id)).map(|(t, _)| *t).collect();
    assert!(
        old_terms.iter().all(|old| new_terms.iter().all(|new| old < new)),
        "node {old_id} led in terms {old_terms:?}, node {new_id} in {new_terms:?}: the new leader's terms must be later"
    );
    eprintln!(
        "leaders by term: {claims:?}; enqueues sent to the frozen leader were answered (acknowledged ones were \
         found SUCCEEDED): {answers:?}"
    );
}

/// 3. SIGSTOP a follower: the cluster keeps taking and running jobs with
/// the same leader; SIGCONT: the follower catches up and can lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_a_follower_the_cluster_keeps_serving() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints();
    let leader = cluster.wait_for_leader().await;
    let follower = (leader + 1) % 3;
    let history = History::new();
    let queue = "follower-frozen";
    let worker = RecordingWorker::spawn(&history, "raw", &endpoints, queue, 8, echo);
    worker.wait_connected().await;
    let producers = Producers::spawn(&history, &endpoints, queue, 2, 1000);
    eventually("30 jobs acknowledged", CLUSTER_WAIT, || async { (history.acknowledged().len() >= 30).then_some(()) })
        .await;

    history.note(format!("SIGSTOP node {} (a follower)", follower + 1));
    cluster.pause(follower);
    let at_pause = history.acknowledged().len();
    eventually("60 jobs acknowledged with a follower frozen", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= at_pause + 60).then_some(())
    })
    .await;
    assert_eq!(cluster.wait_for_leader().await, leader, "a frozen follower must not cost the leader its office");
    history.note(format!("SIGCONT node {}", follower + 1));
    cluster.resume(follower);
    producers.stop().await;
    wait_drained(&cluster, &history, queue).await;
    wait_idle(&[&worker]).await;
    let commit = cluster.wait_replicated(follower).await;
    let status = cluster.lead_from(follower, commit).await;
    eprintln!(
        "node {} caught up: applied {} of commit {commit}, snapshot {}",
        follower + 1,
        status.shards[0].applied_index,
        status.shards[0].snapshot_index
    );
    // Read back from the caught-up node, now the leader.
    let client = client(&endpoints).await;
    check(&history, &client, &[queue], Expect::Succeeded).await;
}

/// 4. SIGKILL all three nodes at once and start them again: every
/// acknowledged job is there, in the state it had (SUCCEEDED, FAILED,
/// ACTIVE with the same lease, READY, SCHEDULED, CANCELLED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_sigkill_and_restart_keeps_every_job() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    let client = client(&endpoints).await;
    // The worker finishes "ok" jobs, fails "bad" ones for good, and holds
    // "hold" ones forever (they stay ACTIVE).
    let worker = RecordingWorker::spawn(&history, "raw", &endpoints, "work", 16, |assign| async move {
        let job = assign.job.unwrap_or_default();
        match job.payload.as_slice() {
            b"ok" => Outcome::Complete(b"done".to_vec()),
            b"bad" => Outcome::FailFinal("bad input".into()),
            _ => std::future::pending().await,
        }
    });
    worker.wait_connected().await;
    let mut ids = Vec::new();
    for payload in ["ok"; 20].into_iter().chain(["bad"; 2]).chain(["hold"; 3]) {
        ids.push(client.enqueue("work", payload).send().await.expect("enqueue").job_id);
    }
    for i in 0..30 {
        ids.push(client.enqueue("idle", format!("ready {i}")).send().await.expect("enqueue").job_id);
    }
    for i in 0..5 {
        let later = client.enqueue("idle", format!("later {i}")).delay(Duration::from_secs(3600));
        ids.push(later.send().await.expect("enqueue").job_id);
    }
    let cancelled = client.enqueue("idle", "cancel me").send().await.expect("enqueue").job_id;
    client.cancel(&cancelled, "not needed").await.expect("cancel");
    ids.push(cancelled);
    for id in &ids {
        history.enqueued(id);
    }
    let before = eventually("work jobs settled", CLUSTER_WAIT, || async {
        let jobs = read_all(&client, &ids).await;
        let count = |s: JobState| jobs.iter().filter(|j| j.state() == s).count();
        (count(JobState::Succeeded) == 20 && count(JobState::Failed) == 2 && count(JobState::Active) == 3)
            .then_some(jobs)
    })
    .await;

    history.note("SIGKILL all three nodes");
    for i in 0..3 {
        cluster.kill9(i);
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    let leader = cluster.wait_for_leader().await;
    eprintln!("all three nodes restarted; node {} leads", leader + 1);
    let after = read_all(&client, &ids).await;
    for (was, now) in before.iter().zip(&after) {
        assert_eq!(
            (now.state(), now.attempt, now.fencing_token, &now.result, &now.payload),
            (was.state(), was.attempt, was.fencing_token, &was.result, &was.payload),
            "job {} changed across the whole-cluster restart: was {was:?}, now {now:?}",
            was.id
        );
    }
    let count = |s: JobState| after.iter().filter(|j| j.state() == s).count();
    assert_eq!(
        [
            JobState::Succeeded,
            JobState::Failed,
            JobState::Active,
            JobState::Ready,
            JobState::Scheduled,
            JobState::Cancelled
        ]
        .map(count),
        [20, 2, 3, 30, 5, 1]
    );
    check(&history, &client, &["work", "idle"], Expect::Present).await;
}

async fn read_all(client: &gantry_worker::Client, ids: &[String]) -> Vec<proto::Job> {
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        jobs.push(get(client, id).await);
    }
    jobs
}

/// 5. A worker that knows only a follower's address works through that
/// node's proxy; the leader is SIGKILLed while the worker holds jobs, and
/// the worker still finishes them: it resumes its session (leases kept,
/// DESIGN §1.6), so no job runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_behind_a_follower_proxy_survives_a_leader_kill() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints();
    let leader = cluster.wait_for_leader().await;
    let follower = (leader + 1) % 3;
    let history = History::new();
    let client = client(&endpoints).await;
    let queue = "proxied";
    let gate = Arc::new(tokio::sync::Notify::new());
    let running = Arc::new(AtomicU64::new(0));
    let (handler_gate, handler_running) = (gate.clone(), running.clone());
    let worker = sdk_worker(&history, &cluster.endpoint(follower), queue, "behind-proxy", 8, move |ctx| {
        let (gate, running) = (handler_gate.clone(), handler_running.clone());
        async move {
            if ctx.payload().starts_with(b"slow") {
                running.fetch_add(1, Ordering::SeqCst);
                gate.notified().await;
            }
            Ok(Bytes::from(format!("done by attempt {}", ctx.attempt())))
        }
    });
    worker.wait_connected().await;

    // Through the proxy: quick jobs are done.
    for i in 0..5 {
        history.enqueued(&client.enqueue(queue, format!("quick {i}")).send().await.expect("enqueue").job_id);
    }
    let mut slow = Vec::new();
    for i in 0..4 {
        slow.push(client.enqueue(queue, format!("slow {i}")).send().await.expect("enqueue").job_id);
    }
    for id in &slow {
        history.enqueued(id);
    }
    eventually("four slow jobs running behind the proxy", CLUSTER_WAIT, || async {
        (running.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    for id in history.acknowledged().iter().filter(|id| !slow.contains(id)) {
        let job = client.wait(id, Duration::from_secs(10)).await.expect("wait");
        assert_eq!(job.state(), JobState::Succeeded, "quick job {id} through the proxy: {job:?}");
    }

    history.note(format!("SIGKILL node {} (the leader)", leader + 1));
    cluster.kill9(leader);
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    eventually("the worker reconnected through its one node", CLUSTER_WAIT, || async {
        (worker.handle.stats().sessions >= 2 && worker.handle.is_connected()).then_some(())
    })
    .await;
    // Enqueued after the kill: proxied (or served) by the worker's node.
    for i in 0..3 {
        history.enqueued(&client.enqueue(queue, format!("after {i}")).send().await.expect("enqueue").job_id);
    }
    let ids = history.acknowledged();
    for id in &ids {
        let job = eventually(&format!("job {id} finished after the leader kill"), CLUSTER_WAIT, || async {
            gate.notify_waiters();
            let job = client.wait(id, Duration::from_millis(500)).await.ok()?;
            (job.state() == JobState::Succeeded).then_some(job)
        })
        .await;
        assert_eq!(
            (job.attempt, job.history.len()),
            (1, 1),
            "job {id} ran again after the leader change (its lease should have been kept): {job:?}"
        );
    }
    let stats = worker.handle.stats();
    assert_eq!(stats.lease_lost, 0, "the worker lost leases across the leader kill: {stats:?}");
    let handle = worker.handle.clone();
    worker.shutdown().await;
    history.sdk_stats("behind-proxy", &handle);
    check(&history, &client, &[queue], Expect::Succeeded).await;
    eprintln!(
        "worker behind node {} (proxy): {} sessions, node {} killed, node {} leads",
        follower + 1,
        stats.sessions,
        leader + 1,
        new_leader + 1
    );
}

/// 6. zc.async across a leader change: the first worker's heartbeats stop
/// (it only looks dead) and the leader is SIGKILLed. On the new leader its
/// session expires after the grace, the job goes to a second worker with a
/// greater token, and the first worker's late result is refused
/// (STALE_LEASE), changes nothing, and is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zc_async_late_result_refused_across_a_leader_change() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints().join(",");
    let leader = cluster.wait_for_leader().await;
    let history = History::new();
    let client = client(&cluster.endpoints()).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let handler_gate = gate.clone();
    let first = sdk_worker(&history, &endpoints, "zc", "looks-dead", 1, move |_ctx| {
        let gate = handler_gate.clone();
        async move {
            // A long commit: the handler keeps working, unaware.
            gate.notified().await;
            Ok(Bytes::from_static(b"from the first worker"))
        }
    });
    first.wait_connected().await;
    let job_id = client.enqueue("zc", "payload").send().await.expect("enqueue").job_id;
    history.enqueued(&job_id);
    let active = eventually("the job runs on the first worker", CLUSTER_WAIT, || async {
        let job = client.get(&job_id).await.ok()?;
        (job.state() == JobState::Active).then_some(job)
    })
    .await;
    assert_eq!(active.worker_id, "looks-dead");
    let first_token = active.fencing_token;
    let second = sdk_worker(&history, &endpoints, "zc", "healthy", 1, |ctx| async move {
        Ok(Bytes::from(format!("from the second worker, token {}", ctx.fencing_token())))
    });
    second.wait_connected().await;

    history.note(format!("first worker's heartbeats paused; SIGKILL node {} (the leader)", leader + 1));
    first.handle.pause_heartbeats(true);
    cluster.kill9(leader);
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    let done = eventually("the job finished on the second worker", CLUSTER_WAIT, || async {
        let job = client.wait(&job_id, Duration::from_secs(1)).await.ok()?;
        (job.state() == JobState::Succeeded).then_some(job)
    })
    .await;
    assert_eq!(done.worker_id, "healthy", "{done:?}");
    assert!(
        done.fencing_token > first_token,
        "the new holder's token {} must be greater than the first worker's {first_token}",
        done.fencing_token
    );
    assert_eq!(done.result, format!("from the second worker, token {}", done.fencing_token).as_bytes());
    assert_eq!((done.attempt, done.history[0].outcome()), (2, proto::AttemptOutcome::SessionExpired), "{done:?}");
    eventually("the first worker saw its lease lost", CLUSTER_WAIT, || async {
        (first.handle.stats().lease_lost >= 1).then_some(())
    })
    .await;

    // The first worker finishes at last: refused, not retried, nothing changed.
    gate.notify_one();
    eventually("the late result answered STALE_LEASE", CLUSTER_WAIT, || async {
        (first.handle.stats().stale_results == 1).then_some(())
    })
    .await;
    first.handle.pause_heartbeats(false);
    holds_for("the refused result stays refused", Duration::from_millis(600), || async {
        let stats = first.handle.stats();
        if stats.stale_results != 1 || stats.completed != 0 {
            return Err(format!("the SDK sent the refused result again: {stats:?}"));
        }
        let now = get(&client, &job_id).await;
        if now != done {
            return Err(format!("a stale result changed the job: was {done:?}, now {now:?}"));
        }
        Ok(())
    })
    .await;
    for (name, worker) in [("looks-dead", first), ("healthy", second)] {
        let handle = worker.handle.clone();
        worker.shutdown().await;
        history.sdk_stats(name, &handle);
    }
    check(&history, &client, &["zc"], Expect::Succeeded).await;
    eprintln!(
        "node {} killed, node {} leads; tokens {first_token} -> {}",
        leader + 1,
        new_leader + 1,
        done.fencing_token
    );
}

/// 7. Gearman across a leader kill: a worker process (echo_worker) is
/// SIGKILLed mid-job, then the leader is SIGKILLed; the job finishes on
/// another worker once the dead worker's session runs out on the new
/// leader. And a handler's retry_after, accepted by the old leader, is
/// honoured by the new one: the next attempt starts no sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gearman_worker_process_and_retry_after_across_a_leader_kill() {
    const RETRY_AFTER: Duration = Duration::from_secs(3);
    gantry_tests::echo_worker_binary();
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let endpoints = cluster.endpoints().join(",");
    let leader = cluster.wait_for_leader().await;
    let history = History::new();
    let client = client(&cluster.endpoints()).await;

    let doomed_job = client.enqueue("gearman", "x").send().await.expect("enqueue").job_id;
    history.enqueued(&doomed_job);
    let mut process = std::process::Command::new(gantry_tests::echo_worker_binary())
        .arg("gearman")
        .env("GANTRY_ADDR", &endpoints)
        .env("GANTRY_WORKER_ID", "doomed-process")
        .env("ECHO_DELAY_MS", "600000")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start echo_worker");
    let active = eventually("the job runs in the worker process", CLUSTER_WAIT, || async {
        let job = client.get(&doomed_job).await.ok()?;
        (job.state() == JobState::Active).then_some(job)
    })
    .await;
    assert_eq!(active.worker_id, "doomed-process");

    // A handler asks for a retry in RETRY_AFTER, and the old leader takes it.
    let first_failed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let second_started_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let (failed_at, started_at) = (first_failed_at.clone(), second_started_at.clone());
    let retrier = sdk_worker(&history, &endpoints, "retry", "retrier", 1, move |ctx| {
        let (failed_at, started_at) = (failed_at.clone(), started_at.clone());
        async move {
            if ctx.attempt() == 1 {
                *failed_at.lock().unwrap() = Some(Instant::now());
                return Err(gantry_worker::JobError::retry_after(RETRY_AFTER));
            }
            *started_at.lock().unwrap() = Some(Instant::now());
            Ok(Bytes::from(format!("attempt {}", ctx.attempt())))
        }
    });
    let retry_job = client.enqueue("retry", "y").send().await.expect("enqueue").job_id;
    history.enqueued(&retry_job);
    let scheduled = eventually("the retry request accepted", CLUSTER_WAIT, || async {
        let job = client.get(&retry_job).await.ok()?;
        (job.state() == JobState::Scheduled).then_some(job)
    })
    .await;

    process.kill().expect("SIGKILL the worker process");
    process.wait().expect("reap");
    history.note(format!("worker process killed; SIGKILL node {} (the leader)", leader + 1));
    cluster.kill9(leader);
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    let survivor = sdk_worker(&history, &endpoints, "gearman", "survivor", 1, |ctx| async move {
        Ok(Bytes::from(format!("attempt {}", ctx.attempt())))
    });

    let done = eventually("the killed process's job finished elsewhere", CLUSTER_WAIT, || async {
        let job = client.wait(&doomed_job, Duration::from_secs(1)).await.ok()?;
        (job.state() == JobState::Succeeded).then_some(job)
    })
    .await;
    assert_eq!((done.worker_id.as_str(), done.result.as_slice()), ("survivor", b"attempt 2".as_slice()), "{done:?}");
    assert_eq!(
        (done.history[0].worker_id.as_str(), done.history[0].outcome()),
        ("doomed-process", proto::AttemptOutcome::SessionExpired),
        "{done:?}"
    );

    let retried = eventually("the retried job finished", CLUSTER_WAIT, || async {
        let job = client.wait(&retry_job, Duration::from_secs(1)).await.ok()?;
        (job.state() == JobState::Succeeded).then_some(job)
    })
    .await;
    let ms = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000).expect("timestamp")
    };
    let failed_record = &retried.history[0];
    let run_at = ms(&scheduled.run_at);
    assert_eq!(failed_record.outcome(), proto::AttemptOutcome::Failed, "{retried:?}");
    assert!(
        run_at >= ms(&failed_record.finished_at) + RETRY_AFTER.as_millis() as u64,
        "run_at {run_at} is not RETRY_AFTER after the failure: {scheduled:?}"
    );
    let second_start = ms(&retried.history[1].started_at);
    assert!(
        second_start >= run_at,
        "attempt 2 started at {second_start} ms, before its run_at {run_at} ms: {retried:?}"
    );
    let waited = second_started_at.lock().unwrap().expect("second attempt ran")
        - first_failed_at.lock().unwrap().expect("first attempt ran");
    assert!(waited >= RETRY_AFTER, "the handler ran again after {waited:?}, before retry_after {RETRY_AFTER:?}");
    assert_eq!((retried.attempt, retried.result.as_slice()), (2, b"attempt 2".as_slice()));

    for (name, worker) in [("retrier", retrier), ("survivor", survivor)] {
        let handle = worker.handle.clone();
        worker.shutdown().await;
        history.sdk_stats(name, &handle);
    }
    check(&history, &client, &["gearman", "retry"], Expect::Succeeded).await;
    eprintln!(
        "node {} killed, node {} leads; retry_after {RETRY_AFTER:?} honoured: next attempt {waited:?} later",
        leader + 1,
        new_leader + 1
    );
}

/// A bare `Worker.Connect` stream, for exact timing.
struct Raw {
    tx: tokio::sync::mpsc::UnboundedSender<proto::WorkerMessage>,
    rx: tonic::Streaming<proto::BrokerMessage>,
}

impl Raw {
    async fn open(broker: &gantry_tests::BinaryBroker, queue: &str, resume: &str) -> (Raw, proto::Welcome) {
        use proto::{broker_message::Kind as Out, worker_message::Kind as In};
        let (tx, out) = tokio::sync::mpsc::unbounded_channel();
        let hello = proto::Hello {
            worker_id: "racer".into(),
            queues: vec![queue.into()],
            max_in_flight: 4,
            resume_session_id: resume.into(),
        };
        tx.send(proto::WorkerMessage { kind: Some(In::Hello(hello)) }).expect("queued");
        let mut client = broker.worker();
        let connect = client.connect(tokio_stream::wrappers::UnboundedReceiverStream::new(out));
        let mut rx = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .expect("Connect within 10s")
            .expect("Connect")
            .into_inner();
        match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
            Ok(Ok(Some(proto::BrokerMessage { kind: Some(Out::Welcome(welcome)) }))) => (Raw { tx, rx }, welcome),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }
}

/// Bug reproduction (DESIGN §1.6, §4): a worker resumes its session at
/// about the moment the broker finds it silent (session_ttl after its last
/// message), at a slightly different moment each round. Whatever the
/// broker decides must be consistent: either the resume wins (welcome
/// `resumed`, the held job is sent again, and the session is not expired
/// for a silence the resume ended), or the expiry wins (a new session, and
/// a revoke for the job). A `resumed` welcome followed by an expiry for
/// silence, or by the job vanishing with no revoke, is a bug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_at_the_moment_of_expiry_is_consistent() {
    use proto::{broker_message::Kind as Out, worker_message::Kind as In};
    const TTL: Duration = Duration::from_millis(200);
    gantry_tests::init_tracing();
    gantry_tests::gantry_binary();
    let _timer = Timer(Instant::now());
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = gantry_tests::BinaryBroker::start(
        &dir.path().join("node"),
        &[
            "--heartbeat-interval",
            "50ms",
            "--session-ttl",
            "200ms",
            "--election-timeout",
            "100ms",
            "--raft-heartbeat-interval",
            "30ms",
        ],
    )
    .await;
    let mut jobs = broker.jobs();
    let mut bugs = Vec::new();
    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    for round in 0..24u64 {
        let queue = format!("race-{round}");
        let job_id = gantry_tests::enqueue(&mut jobs, &queue, b"x").await;
        let (mut first, welcome) = Raw::open(&broker, &queue, "").await;
        let opened = Instant::now();
        let token = loop {
            match tokio::time::timeout(Duration::from_secs(10), first.rx.message()).await {
                Ok(Ok(Some(proto::BrokerMessage { kind: Some(Out::Assign(a)) }))) => break a.fencing_token,
                Ok(Ok(Some(_))) => continue,
                other => panic!("round {round}: expected the assignment, got {other:?}"),
            }
        };
        drop(first); // the stream breaks: no goodbye
        // The broker expires the session once it is silent past TTL (its
        // last sign of life was the hello), judged every few ms.
        tokio::time::sleep_until((opened + TTL - Duration::from_millis(15) + Duration::from_millis(round * 3)).into())
            .await;
        let (mut again, resumed) = Raw::open(&broker, &queue, &welcome.session_id).await;
        // Heartbeat for three TTLs and note what comes.
        let (mut resent, mut revoked, mut reassigned, mut ended) = (false, None, None, None);
        let until = Instant::now() + TTL * 3;
        while Instant::now() < until {
            let _ = again.tx.send(proto::WorkerMessage { kind: Some(In::Heartbeat(proto::Heartbeat {})) });
            match tokio::time::timeout(Duration::from_millis(50), again.rx.message()).await {
                Ok(Ok(Some(proto::BrokerMessage { kind: Some(Out::Assign(a)) }))) if a.fencing_token == token => {
                    resent = true
                }
                Ok(Ok(Some(proto::BrokerMessage { kind: Some(Out::Assign(a)) }))) => reassigned = Some(a.fencing_token),
                Ok(Ok(Some(proto::BrokerMessage { kind: Some(Out::Revoke(r)) }))) => revoked = Some(r.reason),
                Ok(Ok(Some(_))) | Err(_) => {}
                Ok(Ok(None)) => {
                    ended = Some("stream ended".to_owned());
                    break;
                }
                Ok(Err(status)) => {
                    ended = Some(format!("{:?}: {}", status.code(), status.message()));
                    break;
                }
            }
        }
        let job = gantry_tests::get_job(&mut jobs, &job_id).await;
        let held_by_us = job.state() == JobState::Active && job.session_id == resumed.session_id;
        let seen = format!(
            "round {round} (resume {:?} after the hello): welcome resumed={} session {} (was {}); assignment \
             re-sent: {resent}; revoke: {revoked:?}; new assignment: {reassigned:?}; stream end: {ended:?}; job now \
             {:?} token {} session {:?}",
            TTL - Duration::from_millis(15) + Duration::from_millis(round * 3),
            resumed.resumed,
            resumed.session_id,
            welcome.session_id,
            job.state(),
            job.fencing_token,
            job.session_id
        );
        let verdict = match (resumed.resumed, resent, &revoked, held_by_us) {
            (true, true, None, true) if ended.is_none() => "resumed, job kept",
            (false, _, Some(_), _) => "expired first, job revoked",
            (true, _, Some(_), _) => {
                bugs.push(format!("resumed, then the job was revoked: {seen}"));
                "bug: resumed, then revoked"
            }
            (true, false, None, _) if reassigned.is_some() => {
                bugs.push(format!("resumed, but the old lease was replaced (new token) without a revoke: {seen}"));
                "bug: resumed, lease replaced silently"
            }
            (true, _, None, false) => {
                bugs.push(format!("resumed, but the job left the session without a revoke: {seen}"));
                "bug: resumed, job gone silently"
            }
            _ => {
                bugs.push(format!("unexpected: {seen}"));
                "bug: other"
            }
        };
        *tally.entry(verdict).or_default() += 1;
        drop(again);
    }
    eprintln!("outcomes: {tally:?}");
    assert!(
        bugs.is_empty(),
        "{} of 24 rounds inconsistent ({tally:?}):\n{}\nbroker log:\n{}",
        bugs.len(),
        bugs.join("\n"),
        broker.log().lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

/// DESIGN §9 (the client retries across nodes): a producer whose calls go
/// to the leader, when the leader freezes (SIGSTOP: its sockets stay open,
/// nothing answers). The other two elect a new leader within about a
/// second. The SDK's per-try deadline gives up on the frozen node; an
/// enqueue with an idempotency key is then safely sent to the new leader,
/// one without a key is answered "outcome unknown" (it may have been
/// committed) instead of being sent twice. Neither may hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_client_gets_past_a_frozen_leader() {
    let (_timer, _dir, mut cluster) = start_cluster().await;
    let leader = cluster.wait_for_leader().await;
    let client = client(&cluster.endpoints()).await;
    // The client learns where the queue's leader is.
    client.enqueue("frozen-client", "before").send().await.expect("enqueue before the freeze");
    cluster.pause(leader);
    let started = Instant::now();
    let (keyless, during) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), client.enqueue("frozen-client", "keyless").send()),
        tokio::time::timeout(
            Duration::from_secs(20),
            client.enqueue("frozen-client", "during").idempotency_key("frozen-client-during").send()
        ),
    );
    let waited = started.elapsed();
    let new_leader = cluster.wait_for_leader_other_than(Some(leader)).await;
    cluster.resume(leader);
    match keyless {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => assert!(e.is_outcome_unknown(), "a keyless enqueue failed otherwise: {e}"),
        Err(_) => panic!("a keyless enqueue hung on the frozen node {}", leader + 1),
    }
    match during {
        Ok(Ok(enqueued)) => {
            eprintln!("enqueued {} in {waited:?} while node {} was frozen", enqueued.job_id, leader + 1)
        }
        Ok(Err(e)) => panic!("the enqueue failed after {waited:?} while node {} was frozen: {e}", leader + 1),
        Err(_) => panic!(
            "the SDK client's enqueue was still waiting after {waited:?} on node {} (frozen), although node {} \
             had taken over: unary calls have no deadline, so a node that accepts connections but never \
             answers holds them for as long as it stays frozen",
            leader + 1,
            new_leader + 1
        ),
    }
}
