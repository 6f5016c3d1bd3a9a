//! Clusters for tests: several brokers in this process (real gRPC on
//! loopback, one raft-engine each), and of the real binary as processes.

use std::{net::SocketAddr, path::Path, time::Duration};

use gantry_broker::{config::Config, server::RunningServer};
use gantry_proto::v1::{self as proto, admin_client::AdminClient, jobs_client::JobsClient};
use tonic::transport::Channel;

use crate::{BinaryBroker, TEST_HEARTBEAT, TEST_SESSION_TTL, channel, eventually, free_port, init_tracing};

/// How long a test waits for an election or a catch-up.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);

fn initial_cluster(peers: &[SocketAddr]) -> String {
    peers.iter().enumerate().map(|(i, p)| format!("{}={p}", i + 1)).collect::<Vec<_>>().join(",")
}

/// Asks `addr` for its cluster status; `None` when it does not answer.
pub async fn cluster_status(addr: SocketAddr) -> Option<proto::ClusterStatusResponse> {
    let mut admin = AdminClient::new(channel(addr));
    let mut request = tonic::Request::new(proto::ClusterStatusRequest {});
    request.set_timeout(Duration::from_secs(2));
    admin.cluster_status(request).await.ok().map(|r| r.into_inner())
}

/// The leader of shard 0 as `addr` sees it (node id), if any.
pub async fn leader_seen_by(addr: SocketAddr) -> Option<u64> {
    let status = cluster_status(addr).await?;
    status.shards.first().map(|s| s.leader_id).filter(|id| *id != 0)
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
                heartbeat_interval: TEST_HEARTBEAT,
                session_ttl: TEST_SESSION_TTL,
                election_timeout: Duration::from_millis(300),
                raft_heartbeat_interval: Duration::from_millis(50),
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

    /// Waits until every running node names the same leader, which is
    /// running too; returns its index.
    pub async fn wait_for_leader(&self) -> usize {
        eventually("one leader seen by every running node", CLUSTER_WAIT, || async {
            let mut seen = None;
            for (_, addr) in self.addrs.iter().enumerate().filter(|(i, _)| self.is_running(*i) && self.is_member(*i)) {
                let leader = leader_seen_by(*addr).await?;
                if seen.is_some_and(|s| s != leader) {
                    return None;
                }
                seen = Some(leader);
            }
            let index = seen? as usize - 1;
            self.is_running(index).then_some(index)
        })
        .await
    }

    /// Whether node `i` belongs to the group as far as it knows itself (a
    /// spare that was never added does not).
    fn is_member(&self, i: usize) -> bool {
        self.nodes[i].as_ref().is_some_and(|s| !s.node().shards[0].raft.status().nodes.is_empty())
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

/// Real `gantry serve` processes forming one cluster on loopback.
pub struct BinaryCluster {
    pub nodes: Vec<BinaryBroker>,
}

impl BinaryCluster {
    /// Starts `size` nodes; `extra_args` go to every node.
    pub async fn start(root: &Path, size: usize, extra_args: &[&str]) -> Self {
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
                BinaryBroker::start_at(&root.join(format!("node-{}", i + 1)), addrs[i], peers[i], &args, false).await,
            );
        }
        let cluster = BinaryCluster { nodes };
        for node in &cluster.nodes {
            node.wait_ready().await;
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// The index of the node every live node names as leader.
    pub async fn wait_for_leader(&self) -> usize {
        eventually("one leader seen by every running node", CLUSTER_WAIT, || async {
            let mut seen = None;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let leader = leader_seen_by(node.addr).await?;
                if seen.is_some_and(|s| s != leader) {
                    return None;
                }
                seen = Some(leader);
            }
            let index = seen? as usize - 1;
            self.nodes[index].is_running().then_some(index)
        })
        .await
    }
}
