//! Storage faults on the real binary: one node of three is SIGKILLed under
//! load, its data dir damaged while it is down (a cut or corrupted log
//! tail, lost guard records, a damaged snapshot, the whole dir gone), and
//! it is restarted, either before the others could elect a new leader
//! (election timeout 2 s) or after they did. The history checker then
//! holds every job against what producers and workers were told (nothing
//! acknowledged lost, one outcome each, tokens growing), and every replica
//! of every shard must report the same state digest at the same index.
//!
//! Every choice (when to kill, the cut's size, which bits flip) is drawn
//! from one seed, printed at the start with the command that replays it
//! (`GANTRY_FAULT_SEED`), and again if the test fails. The `fault_matrix_`
//! tests are ignored by default: `--run-ignored all` runs them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use gantry_proto::peer::{IntegrityRequest, shard_service_client::ShardServiceClient};
use gantry_tests::{
    cluster::{BinaryCluster, CLUSTER_WAIT},
    eventually,
    faults::{self, Fault, FaultKind, Rng},
    history::{
        Expect, History, final_jobs,
        load::{Producers, client, echo},
        sdk_worker,
        worker::RecordingWorker,
    },
    v1 as proto,
};

/// Like `processes.rs`, but elections slow enough (2 s) that a node
/// restarted right after its kill is back before the others elect a new
/// leader, and a digest of every shard's state each second. The session
/// ttl must be at least two election timeouts.
const ARGS: &[&str] = &[
    "--heartbeat-interval",
    "100ms",
    "--session-ttl",
    "4s",
    "--election-timeout",
    "2s",
    "--raft-heartbeat-interval",
    "50ms",
    "--snapshot-every",
    "100",
    "--digest-every",
    "1s",
];

/// How long the replicas may take to report one digest at one index.
const DIGEST_WAIT: Duration = Duration::from_secs(60);
/// How long the damaged node's `fenced` is watched after its restart.
const FENCED_WATCH: Duration = Duration::from_secs(5);

/// Which node is killed, damaged and restarted, and when it comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A node that leads nothing (one shard only), back at once.
    FollowerOfEveryShard,
    /// The leader of shard 0, back at once: before the election timeout.
    LeaderBackBeforeElection,
    /// The leader of shard 0, back once every shard has another leader.
    LeaderBackAfterElection,
}

/// The seed of test `name` (its name within this module).
fn fault_seed(name: &str) -> u64 {
    faults::seed_from_env(gantry_broker::dispatch::queue_hash(name))
}

/// The test's nextest name: this module's path without the crate.
fn test_path(name: &str) -> String {
    let module = module_path!();
    format!("{}::{name}", module.split_once("::").map_or(module, |(_, m)| m))
}

/// Prints the replay command when the test panics, wherever it panics.
struct ReplayOnPanic(String);

impl Drop for ReplayOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n==== replay this failure with:\n  {}\n", self.0);
        }
    }
}

/// Prints test `name`'s seed and the command that replays it; the guard
/// prints the command again if the test panics.
fn announce(name: &str, seed: u64) -> (String, ReplayOnPanic) {
    let test = test_path(name);
    let replay = faults::replay_command(&test, seed);
    eprintln!("{test}: seed {seed}\nreplay with: {replay}");
    (replay.clone(), ReplayOnPanic(replay))
}

/// Prints how long a scenario took, build time of the binaries excluded.
struct Timer(Instant);

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!("scenario took {:?} (cluster start included, build excluded)", self.0.elapsed());
    }
}

/// Waits until `queue` has nothing left to do: no job scheduled, ready or
/// active; `Err` says what is left (the history check then says more).
async fn wait_drained(cluster: &BinaryCluster, queue: &str) -> Result<(), String> {
    let Err((last, left)) = cluster.wait_queue_drained(queue).await else {
        return Ok(());
    };
    let left: Vec<String> = left
        .iter()
        .map(|j| format!("{} {:?} attempt {} token {}", j.id, j.state(), j.attempt, j.fencing_token))
        .collect();
    Err(format!("queue {queue} not drained within {CLUSTER_WAIT:?}: {last:?}\njobs left: {left:#?}\n"))
}

/// Waits until every recording worker has no handler running and no
/// result unanswered, so the history holds every ack.
async fn wait_idle(workers: &[RecordingWorker]) {
    eventually("recording workers idle", Duration::from_secs(20), || async {
        workers.iter().all(|w| w.is_idle()).then_some(())
    })
    .await
}

/// `count` queue names, the `k`th in shard `k` (of `shards`).
fn queues_per_shard(prefix: &str, shards: usize) -> Vec<String> {
    (0..shards as u64)
        .map(|shard| {
            (0..)
                .map(|i| format!("{prefix}-{i}"))
                .find(|q| gantry_broker::dispatch::queue_hash(q) % shards as u64 == shard)
                .expect("a queue name in every shard")
        })
        .collect()
}

/// Three nodes with `shards` shards; with several, once the shards'
/// leaders are spread over the nodes. Returns each shard's leader.
async fn start_cluster(shards: usize) -> (Timer, tempfile::TempDir, BinaryCluster, Vec<usize>) {
    gantry_tests::init_tracing();
    // Built (if stale) before the clock starts.
    gantry_tests::gantry_binary();
    let timer = Timer(Instant::now());
    let dir = tempfile::tempdir().expect("temp dir");
    let count = shards.to_string();
    let args: Vec<&str> = ARGS.iter().copied().chain(["--shards", &count]).collect();
    let cluster = BinaryCluster::start(dir.path(), 3, &args).await;
    let spread = shards.min(3);
    let leaders = eventually("the shards' leaders spread over the nodes", CLUSTER_WAIT, || async {
        let leaders = cluster.wait_for_leaders_other_than(None).await;
        (leaders.iter().collect::<BTreeSet<_>>().len() == spread).then_some(leaders)
    })
    .await;
    (timer, dir, cluster, leaders)
}

// A node's own view of a shard. `Admin.ClusterStatus` cannot give it: a
// node that does not lead shard 0 answers with shard 0's leader's view
// (`grpc/admin.rs`, `cluster_view`). So the digests and `fenced` come from
// the node's peer port (`ShardService.Integrity`, what the shard's leader
// itself compares replicas with), and its Raft indexes and role from its
// `/metrics` gauges.

/// This node's recent digests of `shard` (index, hex; oldest first) and
/// its `fenced`, from its peer port; `None` when it does not answer.
async fn own_integrity(peer: SocketAddr, shard: usize) -> Option<(Vec<(u64, String)>, String)> {
    let mut client = ShardServiceClient::new(gantry_tests::channel(peer));
    let mut request = tonic::Request::new(IntegrityRequest { shard: shard as u32 });
    request.set_timeout(Duration::from_secs(2));
    let answer = client.integrity(request).await.ok()?.into_inner();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Some((answer.digests.iter().map(|d| (d.index, hex(&d.digest))).collect(), answer.fenced))
}

/// A node's shard gauges (`gantry_raft_*`, `gantry_shard_fenced`...) from
/// its metrics port: (name, shard) -> value; `None` when it does not answer.
async fn own_gauges(metrics: Option<SocketAddr>) -> Option<BTreeMap<(String, usize), u64>> {
    let (status, body) = gantry_tests::http_get(metrics?, "/metrics").await?;
    if status != 200 {
        return None;
    }
    let mut gauges = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once("{shard=\"") else { continue };
        let Some((shard, value)) = rest.split_once("\"}") else { continue };
        if let (Ok(shard), Ok(value)) = (shard.parse(), value.trim().parse::<f64>()) {
            gauges.insert((name.to_owned(), shard), value as u64);
        }
    }
    Some(gauges)
}

fn gauge(gauges: &Option<BTreeMap<(String, usize), u64>>, name: &str, shard: usize) -> Option<u64> {
    gauges.as_ref()?.get(&(name.to_owned(), shard)).copied()
}

/// What the damaged node said about itself after its restart.
#[derive(Debug, Default)]
struct Watched {
    /// (time since the restart, shard, its `fenced`), at each change.
    fenced: Vec<(Duration, usize, String)>,
    /// (time since the restart, shard, is_leader, term, leader id), at each change.
    roles: Vec<(Duration, usize, u64, u64, u64)>,
    answers: usize,
}

/// Polls `node`'s own view of every shard every 100 ms for `period`.
fn watch_node(node: &gantry_tests::BinaryBroker, shards: usize, period: Duration) -> tokio::task::JoinHandle<Watched> {
    let (peer, metrics) = (node.peer_addr, node.metrics_addr);
    tokio::spawn(async move {
        let started = Instant::now();
        let mut watched = Watched::default();
        let mut fenced_now: BTreeMap<usize, String> = BTreeMap::new();
        let mut role_now: BTreeMap<usize, (u64, u64, u64)> = BTreeMap::new();
        while started.elapsed() < period {
            for shard in 0..shards {
                if let Some((_, fenced)) = own_integrity(peer, shard).await {
                    watched.answers += 1;
                    if fenced_now.get(&shard) != Some(&fenced) {
                        fenced_now.insert(shard, fenced.clone());
                        if !fenced.is_empty() || watched.fenced.iter().any(|(_, s, _)| *s == shard) {
                            watched.fenced.push((started.elapsed(), shard, fenced));
                        }
                    }
                }
            }
            let gauges = own_gauges(metrics).await;
            if gauges.is_some() {
                for shard in 0..shards {
                    let value = |name: &str| gauge(&gauges, name, shard).unwrap_or(0);
                    let role =
                        (value("gantry_raft_is_leader"), value("gantry_raft_term"), value("gantry_raft_leader_id"));
                    if role_now.get(&shard) != Some(&role) {
                        role_now.insert(shard, role);
                        watched.roles.push((started.elapsed(), shard, role.0, role.1, role.2));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watched
    })
}

/// Every shard's highest commit index among the live nodes (their own gauges).
async fn commit_indexes(cluster: &BinaryCluster, shards: usize) -> Vec<u64> {
    let mut commits = vec![0; shards];
    for i in (0..cluster.nodes.len()).filter(|i| cluster.is_live(*i)) {
        let gauges = own_gauges(cluster.nodes[i].metrics_addr).await;
        for (shard, commit) in commits.iter_mut().enumerate() {
            *commit = (*commit).max(gauge(&gauges, "gantry_raft_commit_index", shard).unwrap_or(0));
        }
    }
    commits
}

/// One node's own view of a shard, for the digest check.
struct Seen {
    digests: Option<(Vec<(u64, String)>, String)>,
    applied: Option<u64>,
}

/// Until every node has digested `shard` at a common index at or past
/// `after` (a marker job into `marker` each round, so a fresh entry
/// crosses the next digest window), then checks the three digests there
/// are equal. Returns the index and the digest.
async fn digests_agree(
    cluster: &BinaryCluster,
    client: &gantry_worker::Client,
    shard: usize,
    marker: &str,
    after: u64,
    replay: &str,
) -> (u64, String) {
    let started = Instant::now();
    let mut rounds = 0u64;
    loop {
        rounds += 1;
        let _ = tokio::time::timeout(Duration::from_secs(2), client.enqueue(marker, format!("marker {rounds}")).send())
            .await;
        let mut seen = Vec::new();
        for node in &cluster.nodes {
            let digests = own_integrity(node.peer_addr, shard).await;
            let applied = gauge(&own_gauges(node.metrics_addr).await, "gantry_raft_applied_index", shard);
            seen.push(Seen { digests, applied });
        }
        // The highest index every node has a digest at (each keeps its last few).
        let common = seen.iter().try_fold(None::<BTreeSet<u64>>, |acc, s| {
            let mine: BTreeSet<u64> = s.digests.as_ref()?.0.iter().map(|(i, _)| *i).filter(|i| *i > 0).collect();
            Some(Some(match acc {
                None => mine,
                Some(acc) => acc.intersection(&mine).copied().collect(),
            }))
        });
        if let Some(index) = common.flatten().and_then(|c| c.last().copied()).filter(|i| *i >= after) {
            let at: Vec<&str> = seen
                .iter()
                .filter_map(|s| s.digests.as_ref()?.0.iter().find(|(i, _)| *i == index).map(|(_, d)| d.as_str()))
                .collect();
            let distinct: BTreeSet<&str> = at.iter().copied().collect();
            assert!(
                distinct.len() == 1,
                "shard {shard}: the replicas' state digests differ at index {index} (commit index after the load: \
                 {after}):\n{}replay: {replay}",
                digest_table(&seen, Some(index))
            );
            eprintln!("shard {shard}: every replica has digest {} at index {index} (round {rounds})", at[0]);
            return (index, at[0].to_owned());
        }
        assert!(
            started.elapsed() < DIGEST_WAIT,
            "shard {shard}: the replicas did not digest the state at one index >= {after} (the commit index after \
             the load) within {DIGEST_WAIT:?} ({rounds} rounds, a marker job each); last seen:\n{}replay: {replay}",
            digest_table(&seen, None)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per node: (digest_index, state_digest) at `index` (else its latest),
/// its applied index, its recent digest indexes and `fenced`.
fn digest_table(seen: &[Seen], index: Option<u64>) -> String {
    let mut out = String::new();
    for (i, s) in seen.iter().enumerate() {
        let applied = s.applied.map_or("?".to_owned(), |a| a.to_string());
        match &s.digests {
            Some((digests, fenced)) => {
                let shown = index.and_then(|x| digests.iter().find(|(at, _)| *at == x)).or(digests.last());
                let (at, digest) = shown.map_or((0, ""), |(at, d)| (*at, d.as_str()));
                let recent: Vec<u64> = digests.iter().map(|(at, _)| *at).collect();
                out.push_str(&format!(
                    "  node {}: digest_index {at} state_digest {digest:?} applied_index {applied} (recent digests at \
                     {recent:?}; fenced {fenced:?})\n",
                    i + 1
                ));
            }
            None => out.push_str(&format!("  node {}: peer port did not answer; applied_index {applied}\n", i + 1)),
        }
    }
    out
}

/// Kills `target` after a seeded number of acknowledged jobs, applies
/// `faults` to its data dir, restarts it (before or after an election),
/// keeps the load on for 300 more jobs, then checks the history and the
/// replicas' digests.
async fn run_scenario(name: &str, shards: usize, target: Target, faults: &[FaultKind], seed: u64) {
    assert!(shards == 1 || target != Target::FollowerOfEveryShard, "with several shards every node leads one");
    let (replay, _replay_on_panic) = announce(name, seed);
    // Every choice from the seed, in a fixed order.
    let mut rng = Rng::new(seed);
    let kill_after = rng.range(100..=300) as usize;
    let follower_pick = rng.below(2) as usize;
    let chosen: Vec<Fault> = faults.iter().map(|kind| kind.choose(&mut rng)).collect();
    let plan = format!(
        "{target:?}, {shards} shard(s): SIGKILL after {kill_after} acknowledged jobs, then {}",
        chosen.iter().map(ToString::to_string).collect::<Vec<_>>().join(" + ")
    );
    eprintln!("plan: {plan}");

    let (_timer, _dir, mut cluster, leaders) = start_cluster(shards).await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    history.note(format!("seed {seed}: {plan}; leaders {:?}", leaders.iter().map(|i| i + 1).collect::<Vec<_>>()));
    let queues = queues_per_shard("faults", shards);
    let markers = queues_per_shard("marker", shards);
    let queue_refs: Vec<&str> = queues.iter().map(String::as_str).collect();
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
    let per_queue = (3 / shards).max(1);
    let producers: Vec<Producers> =
        queues.iter().map(|q| Producers::spawn(&history, &endpoints, q, per_queue, 3000 / shards)).collect();

    eventually(&format!("{kill_after} jobs acknowledged before the kill"), CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= kill_after).then_some(())
    })
    .await;
    let leaders = cluster.wait_for_leaders_other_than(None).await;
    let victim = match target {
        Target::FollowerOfEveryShard => {
            let followers: Vec<usize> = (0..3).filter(|i| !leaders.contains(i)).collect();
            followers[follower_pick % followers.len()]
        }
        Target::LeaderBackBeforeElection | Target::LeaderBackAfterElection => leaders[0],
    };
    // Its own gauges, a moment before the kill (it may append a little more).
    let before = own_gauges(cluster.nodes[victim].metrics_addr).await;
    let before_kill = history.acknowledged().len();
    let what = match target {
        Target::FollowerOfEveryShard => "a follower of every shard".to_owned(),
        _ => format!("the leader of shard 0; leaders {:?}", leaders.iter().map(|i| i + 1).collect::<Vec<_>>()),
    };
    history.note(format!("SIGKILL node {} ({what}) with {before_kill} jobs acknowledged", victim + 1));
    let killed_at = Instant::now();
    cluster.kill9(victim);
    for shard in 0..shards {
        let value = |name: &str| gauge(&before, name, shard).map_or("?".to_owned(), |v| v.to_string());
        eprintln!(
            "node {} before the kill, shard {shard}: leader {} term {} last_log {} commit {} applied {} snapshot {}",
            victim + 1,
            value("gantry_raft_is_leader"),
            value("gantry_raft_term"),
            value("gantry_raft_last_log_index"),
            value("gantry_raft_commit_index"),
            value("gantry_raft_applied_index"),
            value("gantry_raft_snapshot_index")
        );
    }
    let data_dir = cluster.nodes[victim].data_dir.clone();
    for fault in &chosen {
        let done = fault.apply(&data_dir, &mut rng).unwrap_or_else(|e| panic!("{fault}: {e:#}\nreplay: {replay}"));
        eprintln!("fault on node {}: {done}", victim + 1);
        history.note(format!("fault on node {}: {done}", victim + 1));
    }
    if target == Target::LeaderBackAfterElection {
        let now_led = cluster.wait_for_leaders_other_than(Some(victim)).await;
        history.note(format!("shards led by nodes {:?}", now_led.iter().map(|i| i + 1).collect::<Vec<_>>()));
    }
    cluster.restart(victim).await;
    let watch = watch_node(&cluster.nodes[victim], shards, FENCED_WATCH);
    history.note(format!("node {} restarted {:?} after the kill", victim + 1, killed_at.elapsed()));
    eprintln!("node {} restarted {:?} after the kill", victim + 1, killed_at.elapsed());

    eventually("300 more jobs acknowledged after the kill", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= before_kill + 300).then_some(())
    })
    .await;
    for producer in producers {
        producer.stop().await;
    }
    let commits = commit_indexes(&cluster, shards).await;
    history.note(format!("load stopped; commit index per shard {commits:?}"));
    let mut undrained = String::new();
    for queue in &queues {
        if let Err(left) = wait_drained(&cluster, queue).await {
            undrained.push_str(&left);
        }
    }
    wait_idle(&raw).await;
    let sdk_handle = sdk.handle.clone();
    sdk.shutdown().await;
    history.sdk_stats("sdk-0", &sdk_handle);

    let watched = watch.await.expect("status watch");
    let ever_fenced = !watched.fenced.is_empty();
    eprintln!(
        "node {} after its restart ({} answers in {FENCED_WATCH:?}): fenced ever shown: {ever_fenced}; fenced \
         changes: {:?}; role changes (at, shard, is_leader, term, leader): {:?}",
        victim + 1,
        watched.answers,
        watched.fenced,
        watched.roles
    );
    history.note(format!("node {} showed fenced after its restart: {ever_fenced}", victim + 1));

    let client = client(&endpoints).await;
    let finals = final_jobs(&client, &queue_refs, history.job_ids()).await;
    match history.check(&finals, Expect::Succeeded) {
        Ok(summary) if undrained.is_empty() => eprintln!("history check passed: {summary}"),
        Ok(summary) => panic!(
            "{plan}\n{undrained}history check passed: {summary}\ntimeline:\n{}\nreplay: {replay}",
            history.timeline()
        ),
        Err(violations) => {
            panic!("{plan}\n{undrained}{violations}timeline:\n{}\nreplay: {replay}", history.timeline())
        }
    }

    for (shard, marker) in markers.iter().enumerate() {
        digests_agree(&cluster, &client, shard, marker, commits[shard], &replay).await;
    }
    // The faults must have met the replication stream (format 2), not only
    // the unary path a cluster starts with.
    let mut streamed = 0;
    for node in &cluster.nodes {
        streamed +=
            gauge(&own_gauges(node.metrics_addr).await, "gantry_raft_append_stream_requests_total", 0).unwrap_or(0);
    }
    assert!(streamed > 0, "{plan}\nno AppendEntries went over a replication stream\nreplay: {replay}");
    eprintln!("timeline:\n{}", history.timeline());
    drop(raw);
}

// The default suite: the leader of shard 0 of three, damaged and back
// before the others' election timeout.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_tail_cut_back_before_election_three_shards() {
    let name = "leader_tail_cut_back_before_election_three_shards";
    run_scenario(name, 3, Target::LeaderBackBeforeElection, &[FaultKind::CutTail], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_bits_flipped_back_before_election_three_shards() {
    let name = "leader_bits_flipped_back_before_election_three_shards";
    run_scenario(name, 3, Target::LeaderBackBeforeElection, &[FaultKind::FlipBits], fault_seed(name)).await;
}

// The matrix, ignored by default (`--run-ignored all`). One shard: a
// follower, the leader back before an election, and after one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_follower_tail_cut() {
    let name = "fault_matrix_follower_tail_cut";
    run_scenario(name, 1, Target::FollowerOfEveryShard, &[FaultKind::CutTail], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_follower_bits_flipped() {
    let name = "fault_matrix_follower_bits_flipped";
    run_scenario(name, 1, Target::FollowerOfEveryShard, &[FaultKind::FlipBits], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_follower_vote_record_lost() {
    let name = "fault_matrix_follower_vote_record_lost";
    run_scenario(name, 1, Target::FollowerOfEveryShard, &[FaultKind::LoseVoteRecord], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_follower_snapshot_damaged() {
    let name = "fault_matrix_follower_snapshot_damaged";
    run_scenario(name, 1, Target::FollowerOfEveryShard, &[FaultKind::DamageSnapshot], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_follower_data_dir_lost() {
    let name = "fault_matrix_follower_data_dir_lost";
    run_scenario(name, 1, Target::FollowerOfEveryShard, &[FaultKind::LoseDataDir], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_tail_cut_back_before_election() {
    let name = "fault_matrix_leader_tail_cut_back_before_election";
    run_scenario(name, 1, Target::LeaderBackBeforeElection, &[FaultKind::CutTail], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_bits_flipped_back_before_election() {
    let name = "fault_matrix_leader_bits_flipped_back_before_election";
    run_scenario(name, 1, Target::LeaderBackBeforeElection, &[FaultKind::FlipBits], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_vote_record_lost_back_before_election() {
    let name = "fault_matrix_leader_vote_record_lost_back_before_election";
    run_scenario(name, 1, Target::LeaderBackBeforeElection, &[FaultKind::LoseVoteRecord], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_tail_cut_back_after_election() {
    let name = "fault_matrix_leader_tail_cut_back_after_election";
    run_scenario(name, 1, Target::LeaderBackAfterElection, &[FaultKind::CutTail], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_bits_flipped_back_after_election() {
    let name = "fault_matrix_leader_bits_flipped_back_after_election";
    run_scenario(name, 1, Target::LeaderBackAfterElection, &[FaultKind::FlipBits], fault_seed(name)).await;
}

// Three shards, the leader of shard 0 back after the others elected one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_three_shards_leader_tail_cut_back_after_election() {
    let name = "fault_matrix_three_shards_leader_tail_cut_back_after_election";
    run_scenario(name, 3, Target::LeaderBackAfterElection, &[FaultKind::CutTail], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_three_shards_leader_bits_flipped_back_after_election() {
    let name = "fault_matrix_three_shards_leader_bits_flipped_back_after_election";
    run_scenario(name, 3, Target::LeaderBackAfterElection, &[FaultKind::FlipBits], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_three_shards_leader_vote_record_lost_back_after_election() {
    let name = "fault_matrix_three_shards_leader_vote_record_lost_back_after_election";
    run_scenario(name, 3, Target::LeaderBackAfterElection, &[FaultKind::LoseVoteRecord], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_three_shards_leader_snapshot_damaged_back_after_election() {
    let name = "fault_matrix_three_shards_leader_snapshot_damaged_back_after_election";
    run_scenario(name, 3, Target::LeaderBackAfterElection, &[FaultKind::DamageSnapshot], fault_seed(name)).await;
}

/// Until every live node reports the same applied index of `shard` as the
/// highest commit index among them: nothing committed is missing anywhere.
async fn wait_applied_everywhere(cluster: &BinaryCluster, shard: usize) -> u64 {
    eventually("every node applied the shard's commit index", CLUSTER_WAIT, || async {
        let mut seen = Vec::new();
        for node in &cluster.nodes {
            let gauges = own_gauges(node.metrics_addr).await;
            seen.push((
                gauge(&gauges, "gantry_raft_commit_index", shard)?,
                gauge(&gauges, "gantry_raft_applied_index", shard)?,
            ));
        }
        let commit = seen.iter().map(|(c, _)| *c).max()?;
        seen.iter().all(|(_, applied)| *applied == commit).then_some(commit)
    })
    .await
}

/// Two of three nodes (the leader and a follower) are SIGKILLed together
/// and both lose their log's tail. Neither may vote (each lost what it had
/// acknowledged), so the healthy third cannot be elected: the shard stops
/// (no leader, writes refused) instead of electing a copy without
/// acknowledged entries. An operator's rebuild of one damaged copy lets it
/// vote for the healthy one, which leads and rebuilds the other; the load
/// resumes and the history and digests are checked as above. The load is
/// paused and every job finished before the kill, so that the healthy node
/// holds every acknowledged entry (what the damaged copies alone had would
/// be lost by the operator's rebuild: their operator's call, not tested).
async fn run_two_damaged(name: &str, seed: u64) {
    let (replay, _replay_on_panic) = announce(name, seed);
    let mut rng = Rng::new(seed);
    let kill_after = rng.range(100..=300) as usize;
    let follower_pick = rng.below(2) as usize;
    let chosen = [FaultKind::CutTail.choose(&mut rng), FaultKind::CutTail.choose(&mut rng)];
    let plan = format!(
        "two damaged of three, 1 shard: quiesce after {kill_after} acknowledged jobs, SIGKILL the leader and a \
         follower, {} and {}",
        chosen[0], chosen[1]
    );
    eprintln!("plan: {plan}");

    let (_timer, _dir, mut cluster, _) = start_cluster(1).await;
    let endpoints = cluster.endpoints();
    let history = History::new();
    history.note(format!("seed {seed}: {plan}"));
    let queue = queues_per_shard("faults", 1).remove(0);
    let marker = queues_per_shard("marker", 1).remove(0);
    let raw: Vec<RecordingWorker> =
        (0..2).map(|i| RecordingWorker::spawn(&history, &format!("raw-{i}"), &endpoints, &queue, 8, echo)).collect();
    for worker in &raw {
        worker.wait_connected().await;
    }
    let producers = Producers::spawn(&history, &endpoints, &queue, 3, 3000);
    eventually(&format!("{kill_after} jobs acknowledged"), CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= kill_after).then_some(())
    })
    .await;
    producers.stop().await;
    wait_drained(&cluster, &queue).await.unwrap_or_else(|left| panic!("{left}replay: {replay}"));
    wait_idle(&raw).await;
    let commit = wait_applied_everywhere(&cluster, 0).await;
    let before_kill = history.acknowledged().len();

    let leader = cluster.wait_for_leaders_other_than(None).await[0];
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let damaged_follower = followers[follower_pick];
    let healthy = followers[1 - follower_pick];
    let damaged = [leader, damaged_follower];
    history.note(format!(
        "SIGKILL nodes {} (leader) and {} at commit {commit}, {before_kill} jobs acknowledged",
        leader + 1,
        damaged_follower + 1
    ));
    for &node in &damaged {
        cluster.kill9(node);
    }
    for (&node, fault) in damaged.iter().zip(&chosen) {
        let done = fault
            .apply(&cluster.nodes[node].data_dir.clone(), &mut rng)
            .unwrap_or_else(|e| panic!("{fault}: {e:#}\nreplay: {replay}"));
        eprintln!("fault on node {}: {done}", node + 1);
        history.note(format!("fault on node {}: {done}", node + 1));
    }
    for &node in &damaged {
        cluster.restart(node).await;
    }

    // Both damaged copies come back fenced, and no leader is elected for
    // three election timeouts (2 s each) while they are.
    for &node in &damaged {
        let peer = cluster.nodes[node].peer_addr;
        let fenced = eventually(&format!("node {} shows its copy fenced", node + 1), CLUSTER_WAIT, || async move {
            own_integrity(peer, 0).await.map(|(_, fenced)| fenced).filter(|f| !f.is_empty())
        })
        .await;
        eprintln!("node {} fenced: {fenced}", node + 1);
    }
    let client = client(&endpoints).await;
    let stopped_since = Instant::now();
    while stopped_since.elapsed() < Duration::from_secs(6) {
        for (i, node) in cluster.nodes.iter().enumerate() {
            let gauges = own_gauges(node.metrics_addr).await;
            assert_ne!(
                gauge(&gauges, "gantry_raft_is_leader", 0),
                Some(1),
                "node {} leads the shard while two of its three copies are fenced\nreplay: {replay}",
                i + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = tokio::time::timeout(Duration::from_secs(3), client.enqueue(&queue, "while stopped").send()).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "an enqueue was acknowledged while the shard had no leader\nreplay: {replay}"
    );
    history.note("shard stopped: no leader for 6 s, an enqueue refused");

    // The operator rebuilds the damaged follower's copy (asked on the
    // healthy node): the shard elects the healthy copy and heals.
    let request = proto::RebuildReplicaRequest { node_id: damaged_follower as u64 + 1, shard: 0 };
    cluster.nodes[healthy]
        .admin()
        .rebuild_replica(request)
        .await
        .unwrap_or_else(|e| panic!("rebuild of node {}: {e}\nreplay: {replay}", damaged_follower + 1));
    history.note(format!("operator rebuilt node {}'s copy", damaged_follower + 1));
    let now_led = cluster.wait_for_leaders_other_than(None).await;
    assert_eq!(now_led[0], healthy, "only the healthy copy may lead after the rebuild\nreplay: {replay}");
    for node in 0..3 {
        let peer = cluster.nodes[node].peer_addr;
        eventually(&format!("node {}'s copy whole again", node + 1), CLUSTER_WAIT, || async move {
            own_integrity(peer, 0).await.filter(|(_, fenced)| fenced.is_empty()).map(|_| ())
        })
        .await;
    }

    let producers = Producers::spawn(&history, &endpoints, &queue, 3, 3000);
    eventually("300 more jobs acknowledged after the rebuild", CLUSTER_WAIT, || async {
        (history.acknowledged().len() >= before_kill + 300).then_some(())
    })
    .await;
    producers.stop().await;
    let commit = commit_indexes(&cluster, 1).await[0];
    let undrained = wait_drained(&cluster, &queue).await.err().unwrap_or_default();
    wait_idle(&raw).await;
    let finals = final_jobs(&client, &[queue.as_str()], history.job_ids()).await;
    match history.check(&finals, Expect::Succeeded) {
        Ok(summary) if undrained.is_empty() => eprintln!("history check passed: {summary}"),
        Ok(summary) => panic!("{plan}\n{undrained}history check passed: {summary}\nreplay: {replay}"),
        Err(violations) => {
            panic!("{plan}\n{undrained}{violations}timeline:\n{}\nreplay: {replay}", history.timeline())
        }
    }
    digests_agree(&cluster, &client, 0, &marker, commit, &replay).await;
    eprintln!("timeline:\n{}", history.timeline());
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_two_nodes_tail_cut_stop_until_one_rebuilt() {
    let name = "fault_matrix_two_nodes_tail_cut_stop_until_one_rebuilt";
    run_two_damaged(name, fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_data_dir_lost_back_after_election() {
    let name = "fault_matrix_leader_data_dir_lost_back_after_election";
    run_scenario(name, 1, Target::LeaderBackAfterElection, &[FaultKind::LoseDataDir], fault_seed(name)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault matrix: --run-ignored all"]
async fn fault_matrix_leader_snapshot_damaged_back_before_election() {
    let name = "fault_matrix_leader_snapshot_damaged_back_before_election";
    run_scenario(name, 1, Target::LeaderBackBeforeElection, &[FaultKind::DamageSnapshot], fault_seed(name)).await;
}
