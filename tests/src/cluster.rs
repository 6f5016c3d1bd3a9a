//! Clusters for tests: several brokers in this process (real gRPC on
//! loopback, one raft-engine each), and of the real binary as processes.

use std::{net::SocketAddr, path::Path, time::Duration};

use gantry_broker::{config::Config, server::RunningServer};
use gantry_proto::v1::{self as proto, admin_client::AdminClient, jobs_client::JobsClient};
use tonic::transport::Channel;

use crate::{BinaryBroker, TEST_HEARTBEAT, TEST_SESSION_TTL, channel, eventually, free_port, init_tracing};

/// How long a test waits for an election or a catch-up.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);
/// The election timeout of a `TestCluster`'s nodes.
pub const CLUSTER_ELECTION_TIMEOUT: Duration = Duration::from_millis(800);

fn initial_cluster(peers: &[SocketAddr]) -> String {
    peers.iter().enumerate().map(|(i, p)| format!("{}={p}", i + 1)).collect::<Vec<_>>().join(",")
}

/// Asks `addr` for its cluster status; `None` when it does not answer.
pub async fn cluster_status(addr: SocketAddr) -> Option<proto::ClusterStatusResponse> {
    let mut admin = AdminClient::new(channel(addr));
    let mut request = tonic::Request::new(proto::ClusterStatusRequest::default());
    request.set_timeout(Duration::from_secs(2));
    admin.cluster_status(request).await.ok().map(|r| r.into_inner())
}

/// Each shard's leader as `addr` sees it (node ids), if every shard has one.
pub async fn leaders_seen_by(addr: SocketAddr) -> Option<Vec<u64>> {
    let status = cluster_status(addr).await?;
    status.shards.iter().map(|s| Some(s.leader_id).filter(|id| *id != 0)).collect()
}

/// Brokers of one cluster inside the test process. Node `i` (0-based) has
/// Raft id `i + 1`.
pub struct TestCluster {
    nodes: Vec<Option<RunningServer>>,
    configs: Vec<Config>,
    pub addrs: Vec<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    pub async fn start(size: usize) -> Self {
        Self::start_nodes(size, 0, |_| {}).await
    }

    /// Like `start`, with `adjust` applied to every node's config.
    pub async fn start_with(size: usize, adjust: impl Fn(&mut Config)) -> Self {
        Self::start_nodes(size, 0, adjust).await
    }

    /// `size` voters plus one more node (the last) that is configured but
    /// not started: started later, it waits for an AddNode.
    pub async fn start_with_spare(size: usize) -> Self {
        Self::start_nodes(size, 1, |_| {}).await
    }

    async fn start_nodes(size: usize, spares: usize, adjust: impl Fn(&mut Config)) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let total = size + spares;
        let addrs: Vec<SocketAddr> =
            (0..total).map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr")).collect();
        let peers: Vec<SocketAddr> =
            (0..total).map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr")).collect();
        let voters: gantry_broker::config::InitialCluster =
            initial_cluster(&peers[..size]).parse().expect("initial cluster");
        // A spare lists itself after the voters: not the lowest id, so it
        // never initializes anything and waits to be added.
        let with_spares: gantry_broker::config::InitialCluster =
            initial_cluster(&peers).parse().expect("initial cluster");
        let configs: Vec<Config> = (0..total)
            .map(|i| Config {
                node_id: i as u64 + 1,
                data_dir: dir.path().join(format!("node-{}", i + 1)),
                listen: addrs[i],
                peer_listen: peers[i],
                initial_cluster: match (size, i < size) {
                    (1, true) => Default::default(),
                    (_, true) => voters.clone(),
                    (_, false) => with_spares.clone(),
                },
                // Elections slow enough that a loaded two-core machine (three
                // nodes, the test and its neighbours) does not depose a live
                // leader; the session ttl outlasts two election timeouts.
                heartbeat_interval: TEST_HEARTBEAT,
                session_ttl: TEST_SESSION_TTL.max(Duration::from_millis(2000)),
                election_timeout: CLUSTER_ELECTION_TIMEOUT,
                raft_heartbeat_interval: Duration::from_millis(100),
                metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
                ..Config::default()
            })
            .map(|mut config| {
                adjust(&mut config);
                config
            })
            .collect();
        let mut nodes = Vec::new();
        for config in &configs[..size] {
            nodes.push(Some(gantry_broker::server::start(config.clone()).await.expect("node starts")));
        }
        nodes.extend((0..spares).map(|_| None));
        let cluster = TestCluster { nodes, configs, addrs, _dir: dir };
        cluster.wait_for_leader().await;
        cluster
    }

    /// The server of node `i`, while it runs (for in-process inspection).
    pub fn server(&self, i: usize) -> &RunningServer {
        self.nodes[i].as_ref().expect("node runs")
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.configs[i].data_dir
    }

    pub fn peer_addr(&self, i: usize) -> SocketAddr {
        self.configs[i].peer_listen
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.addrs[i].to_string()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.addrs.iter().map(SocketAddr::to_string).collect()
    }

    pub fn jobs(&self, i: usize) -> JobsClient<Channel> {
        JobsClient::new(channel(self.addrs[i]))
    }

    pub fn admin(&self, i: usize) -> AdminClient<Channel> {
        AdminClient::new(channel(self.addrs[i]))
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    /// Waits until every running node names the same leader for each
    /// shard, each running and established; returns the index of shard 0's.
    pub async fn wait_for_leader(&self) -> usize {
        self.wait_for_leaders().await[0]
    }

    /// Like `wait_for_leader`; returns the index of each shard's leader.
    pub async fn wait_for_leaders(&self) -> Vec<usize> {
        eventually("a leader of every shard, seen by every running node", CLUSTER_WAIT, || async {
            let shards = self.nodes.iter().flatten().next()?.node().shards.len();
            let mut leaders = Vec::with_capacity(shards);
            for slot in 0..shards {
                let mut seen = None;
                // Asked in-process, not over the client port: clusters with
                // TLS or tokens there work the same. `leader()` also needs
                // the leader's addresses, which forwarding uses.
                for i in (0..self.addrs.len()).filter(|i| self.is_running(*i) && self.is_member(*i)) {
                    let (leader, _) = self.nodes[i].as_ref()?.node().shards[slot].raft.leader()?;
                    if seen.is_some_and(|s| s != leader) {
                        return None;
                    }
                    seen = Some(leader);
                }
                let index = seen? as usize - 1;
                // A new leader takes writes once the blank entry of its term
                // is committed; until then it answers "no leader" (retryable).
                let shard = &self.nodes.get(index)?.as_ref()?.node().shards[slot];
                let status = shard.raft.status();
                let established = status.last_log_index > 0 && status.commit_index >= status.last_log_index;
                if !(shard.raft.is_leader() && established) {
                    return None;
                }
                leaders.push(index);
            }
            Some(leaders)
        })
        .await
    }

    /// Whether node `i` belongs to the group as far as it knows itself (a
    /// spare that was never added does not, nor a node that was removed).
    fn is_member(&self, i: usize) -> bool {
        self.nodes[i].as_ref().is_some_and(|s| s.node().shards[0].raft.status().nodes.contains_key(&(i as u64 + 1)))
    }

    /// A node other than `than`.
    pub fn other(&self, than: usize) -> usize {
        (0..self.nodes.len()).find(|i| *i != than && self.is_running(*i)).expect("another running node")
    }

    /// Stops a node (a clean shutdown; processes are for crashes).
    pub async fn stop(&mut self, i: usize) {
        if let Some(server) = self.nodes[i].take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "restart of a running node");
        self.nodes[i] = Some(gantry_broker::server::start(self.configs[i].clone()).await.expect("node restarts"));
    }

    /// Waits until node `i` has applied at least `index` of shard 0.
    pub async fn wait_applied(&self, i: usize, index: u64) {
        eventually(&format!("node {} applies index {index}", i + 1), CLUSTER_WAIT, || async {
            let status = cluster_status_local(&self.nodes[i]).await?;
            (status >= index).then_some(())
        })
        .await
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

async fn cluster_status_local(server: &Option<RunningServer>) -> Option<u64> {
    let server = server.as_ref()?;
    Some(server.node().shards[0].raft.status().applied_index)
}

/// Real `gantry serve` processes forming one cluster on loopback. Node `i`
/// (0-based) has Raft id `i + 1`; each logs to `<root>/node-<id>.log`.
pub struct BinaryCluster {
    pub nodes: Vec<BinaryBroker>,
    /// Nodes stopped with SIGSTOP (alive, but answering nothing).
    paused: Vec<bool>,
}

impl BinaryCluster {
    /// Starts `size` nodes; `extra_args` go to every node.
    pub async fn start(root: &Path, size: usize, extra_args: &[&str]) -> Self {
        Self::start_binary(root, size, extra_args, &crate::gantry_binary()).await
    }

    /// Like [`start`](Self::start), every node running `binary` (an older
    /// release, for upgrade tests).
    pub async fn start_binary(root: &Path, size: usize, extra_args: &[&str], binary: &Path) -> Self {
        let addrs: Vec<SocketAddr> =
            (0..size).map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr")).collect();
        let peers: Vec<SocketAddr> =
            (0..size).map(|_| format!("127.0.0.1:{}", free_port()).parse().expect("addr")).collect();
        let initial = initial_cluster(&peers);
        let mut nodes = Vec::new();
        for i in 0..size {
            let node_id = (i + 1).to_string();
            let mut args: Vec<&str> = vec!["--node-id", &node_id, "--initial-cluster", &initial];
            args.extend_from_slice(extra_args);
            nodes.push(
                BinaryBroker::start_binary_at(
                    binary,
                    &root.join(format!("node-{}", i + 1)),
                    addrs[i],
                    peers[i],
                    &args,
                    false,
                )
                .await,
            );
        }
        let cluster = BinaryCluster { nodes, paused: vec![false; size] };
        for node in &cluster.nodes {
            node.wait_ready().await;
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.nodes[i].addr.to_string()
    }

    /// Running and not paused: it answers.
    pub fn is_live(&self, i: usize) -> bool {
        self.nodes[i].is_running() && !self.paused[i]
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
        self.paused[i] = false;
    }

    /// Starts node `i` again on its data dir and ports.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
    }

    /// SIGSTOP node `i`: its sockets stay open, it answers nothing.
    pub fn pause(&mut self, i: usize) {
        self.nodes[i].signal("STOP");
        self.paused[i] = true;
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        self.nodes[i].signal("CONT");
        self.paused[i] = false;
    }

    /// The index of the node every live node names as leader.
    pub async fn wait_for_leader(&self) -> usize {
        self.wait_for_leader_other_than(None).await
    }

    /// Like [`wait_for_leader`](Self::wait_for_leader), for leaders that
    /// are not node `old` (after `old` was killed or paused).
    pub async fn wait_for_leader_other_than(&self, old: Option<usize>) -> usize {
        self.wait_for_leaders_other_than(old).await[0]
    }

    /// The index of each shard's leader, as every live node names it, none
    /// of them node `old`.
    pub async fn wait_for_leaders_other_than(&self, old: Option<usize>) -> Vec<usize> {
        let what = match old {
            Some(old) => format!("leaders other than node {} seen by every live node", old + 1),
            None => "the same leaders seen by every live node".to_owned(),
        };
        eventually(&what, CLUSTER_WAIT, || async {
            let mut seen = None;
            for i in (0..self.nodes.len()).filter(|i| self.is_live(*i)) {
                let leaders = leaders_seen_by(self.nodes[i].addr).await?;
                if seen.as_ref().is_some_and(|s| *s != leaders) {
                    return None;
                }
                seen = Some(leaders);
            }
            let indexes: Vec<usize> = seen?.into_iter().map(|id| id as usize - 1).collect();
            indexes.iter().all(|i| self.is_live(*i) && Some(*i) != old).then_some(indexes)
        })
        .await
    }

    /// Waits, at most `CLUSTER_WAIT`, until `queue` has nothing left to
    /// do (no job scheduled, ready or active) as a live node reports it.
    /// `Err`: the last report seen, and the jobs still left to do.
    pub async fn wait_queue_drained(
        &self,
        queue: &str,
    ) -> Result<proto::QueueInfo, (Option<proto::QueueInfo>, Vec<proto::Job>)> {
        let live = || (0..self.nodes.len()).filter(|i| self.is_live(*i));
        let deadline = std::time::Instant::now() + CLUSTER_WAIT;
        let mut last = None;
        while std::time::Instant::now() < deadline {
            for i in live() {
                let mut request = tonic::Request::new(proto::GetQueueRequest { queue: queue.to_owned() });
                request.set_timeout(Duration::from_secs(2));
                if let Ok(info) = self.nodes[i].admin().get_queue(request).await {
                    let info = info.into_inner();
                    if info.scheduled + info.ready + info.active == 0 {
                        return Ok(info);
                    }
                    last = Some(info);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut left = Vec::new();
        for i in live() {
            let request = proto::ListJobsRequest { queue: queue.to_owned(), limit: 1000, ..Default::default() };
            if let Ok(page) = self.nodes[i].admin().list_jobs(request).await {
                let unfinished = |j: &proto::Job| {
                    matches!(j.state(), proto::JobState::Ready | proto::JobState::Scheduled | proto::JobState::Active)
                };
                left = page.into_inner().jobs.into_iter().filter(unfinished).collect();
                break;
            }
        }
        Err((last, left))
    }

    /// ClusterStatus as node `i` answers it: its own view when it leads (or
    /// knows no leader), else the leader's (a follower forwards the call).
    pub async fn status(&self, i: usize) -> Option<proto::ClusterStatusResponse> {
        cluster_status(self.nodes[i].addr).await
    }

    /// Waits until the leader sees node `i`'s log hold everything the
    /// leader had committed when the wait began; returns that index.
    pub async fn wait_replicated(&self, i: usize) -> u64 {
        let leader = self.wait_for_leader().await;
        let commit = self.status(leader).await.expect("leader's status").shards[0].commit_index;
        let node_id = i as u64 + 1;
        eventually(&format!("node {node_id} holds the log up to {commit}"), CLUSTER_WAIT, || async {
            let status = self.status(leader).await?;
            let matched = status.nodes.iter().find(|n| n.node_id == node_id)?.matched_index?;
            (matched >= commit).then_some(())
        })
        .await;
        commit
    }

    /// Makes node `i` the leader (Admin.TransferLeader) and returns its own
    /// status once it has applied at least `index`: what it serves from
    /// then on comes from its own state machine.
    pub async fn lead_from(&self, i: usize, index: u64) -> proto::ClusterStatusResponse {
        let node_id = i as u64 + 1;
        eventually(&format!("node {node_id} leads"), CLUSTER_WAIT, || async {
            let mut request = tonic::Request::new(proto::TransferLeaderRequest { shard: 0, node_id });
            request.set_timeout(Duration::from_secs(5));
            let mut admin = AdminClient::new(channel(self.nodes[i].addr));
            let status = admin.transfer_leader(request).await.ok()?.into_inner();
            (status.shards.first()?.leader_id == node_id).then_some(())
        })
        .await;
        eventually(&format!("node {node_id} leads and applied index {index}"), CLUSTER_WAIT, || async {
            let status = self.status(i).await?;
            let shard = status.shards.first()?;
            (status.node_id == node_id && shard.role == "leader" && shard.applied_index >= index).then_some(status)
        })
        .await
    }

    /// Bytes of node `i`'s log so far (to read only what comes later).
    pub fn log_len(&self, i: usize) -> usize {
        self.nodes[i].log().len()
    }

    /// Node `i`'s log from byte `from` on.
    pub fn log_since(&self, i: usize, from: usize) -> String {
        self.nodes[i].log().get(from..).unwrap_or_default().to_owned()
    }

    /// Starts watching who claims leadership, until the watch is finished.
    pub fn watch_leadership(&self) -> LeadershipWatch {
        LeadershipWatch::start(self.nodes.iter().map(|n| n.addr).collect())
    }
}

impl Drop for BinaryCluster {
    /// A failing test's node logs are in a temporary dir about to go: show
    /// their ends.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let log = node.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("---- node {} log ({} lines), last 60 ----\n{tail}", i + 1, lines.len());
        }
    }
}

/// Polls every node's ClusterStatus (every 50 ms, bounded to 5 min) and
/// records which node claimed to lead in which term: the answering node
/// names itself and its role, so two leaders of one term would show.
pub struct LeadershipWatch {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<LeaderClaims>,
}

/// Term -> the nodes that answered as its leader.
pub type LeaderClaims = std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>>;

impl LeadershipWatch {
    fn start(addrs: Vec<SocketAddr>) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut claims = LeaderClaims::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            while !*stopped.borrow() && tokio::time::Instant::now() < deadline {
                let polls = addrs.iter().map(|addr| async move {
                    let mut admin = AdminClient::new(channel(*addr));
                    let mut request = tonic::Request::new(proto::ClusterStatusRequest::default());
                    request.set_timeout(Duration::from_millis(500));
                    tokio::time::timeout(Duration::from_millis(600), admin.cluster_status(request)).await
                });
                for answer in futures::future::join_all(polls).await {
                    let Ok(Ok(status)) = answer else { continue };
                    let status = status.into_inner();
                    if let Some(shard) = status.shards.first()
                        && shard.role == "leader"
                    {
                        claims.entry(shard.term).or_default().insert(status.node_id);
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
            }
            claims
        });
        LeadershipWatch { stop, task }
    }

    /// Stops watching; `Err` names every term two nodes claimed.
    pub async fn finish(self) -> Result<LeaderClaims, String> {
        let _ = self.stop.send(true);
        let claims = self.task.await.expect("leadership watch");
        let split: Vec<String> = claims
            .iter()
            .filter(|(_, nodes)| nodes.len() > 1)
            .map(|(term, nodes)| format!("term {term} claimed by nodes {nodes:?}"))
            .collect();
        if split.is_empty() {
            Ok(claims)
        } else {
            Err(format!("split brain: {}; all claims: {claims:?}", split.join(", ")))
        }
    }
}
