//! Forming and growing a cluster: the one-time initialization of a new
//! cluster from `--initial-cluster`, and joining a running one (`--join`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gantry_proto::{peer as pb, v1 as proto};
use tokio::sync::watch;

use crate::{
    dispatch::Node,
    raft::{GantryNode, PeerChannels},
};

const RETRY: Duration = Duration::from_millis(500);
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What a node says about itself on its peer port.
pub async fn node_info(channels: &PeerChannels, peer_address: &str) -> Result<pb::NodeInfoResponse, String> {
    let mut client = channels.client(peer_address)?;
    let mut request = tonic::Request::new(pb::NodeInfoRequest {});
    request.set_timeout(CALL_TIMEOUT);
    client.node_info(request).await.map(|r| r.into_inner()).map_err(|s| s.message().to_string())
}

/// Initializes a brand-new cluster exactly once: only the member with the
/// lowest id does it, only while its own log is empty, and only after every
/// listed member answered and none of them already belongs to a cluster.
/// So restarting any node (the initializer too) never makes a second
/// cluster; a wiped initializer waits to be caught up by the leader.
pub async fn bootstrap(node: Arc<Node>, initial: BTreeMap<u64, String>, mut shutdown: watch::Receiver<bool>) {
    let first = initial.keys().next().copied();
    if first != Some(node.node_id) {
        tracing::info!(initializer = ?first, "waiting for the cluster's first leader to contact this node");
        return;
    }
    for shard in &node.shards {
        if shard.raft.is_initialized().await {
            return;
        }
    }
    let mut members: BTreeMap<u64, GantryNode> = BTreeMap::new();
    members.insert(node.node_id, GantryNode { client: node.advertise.clone(), peer: node.peer_advertise.clone() });
    let mut warned = false;
    loop {
        let missing: Vec<(u64, String)> =
            initial.iter().filter(|(id, _)| !members.contains_key(id)).map(|(id, a)| (*id, a.clone())).collect();
        for (id, address) in &missing {
            match node_info(&node.channels, address).await {
                Ok(info) if info.node_id != *id => {
                    let id = *id;
                    tracing::error!(expected = id, found = info.node_id, %address, "initial-cluster names the wrong node at this address; fix --initial-cluster or that node's --node-id");
                }
                Ok(info) if info.initialized => {
                    tracing::warn!(node = *id, %address, "a member already belongs to an initialized cluster: not initializing another; waiting to be contacted by its leader");
                    return;
                }
                Ok(info) => {
                    members.insert(*id, GantryNode { client: info.client_address, peer: address.clone() });
                }
                Err(e) if warned => tracing::debug!(node = *id, %address, error = %e, "member not reachable yet"),
                Err(e) => tracing::info!(node = *id, %address, error = %e, "waiting for member to start"),
            }
        }
        if members.len() == initial.len() {
            break;
        }
        warned = true;
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
    for shard in &node.shards {
        match shard.raft.initialize(members.clone()).await {
            Ok(()) => {
                tracing::info!(shard = %shard.raft.shard(), members = ?members.keys().collect::<Vec<_>>(), "initialized a new cluster")
            }
            Err(e) => tracing::error!(shard = %shard.raft.shard(), error = %e, "cluster initialization failed"),
        }
    }
}

/// Asks a running cluster (any of `addresses`, client ports) to add this
/// node, until it is a member of every shard.
pub async fn join(node: Arc<Node>, addresses: Vec<String>, mut shutdown: watch::Receiver<bool>) {
    let is_member = |node: &Node| node.shards.iter().all(|s| s.raft.status().nodes.contains_key(&node.node_id));
    let mut round = 0u32;
    loop {
        if is_member(&node) && node.shards.iter().all(|s| s.raft.status().voters.contains(&node.node_id)) {
            tracing::info!("this node is a voter of the cluster");
            return;
        }
        for address in &addresses {
            match add_self(&node, address).await {
                Ok(()) => {
                    tracing::info!(via = %address, "joined the cluster");
                    return;
                }
                Err(e) => {
                    if round.is_multiple_of(10) {
                        tracing::warn!(via = %address, error = %e, "could not join the cluster yet; retrying");
                    }
                }
            }
        }
        round += 1;
        tokio::select! {
            _ = tokio::time::sleep(RETRY * 4) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn add_self(node: &Node, address: &str) -> Result<(), String> {
    // TLS and an admin token when the cluster uses them (security/mod.rs).
    let channel = node
        .channels
        .client_port_endpoint(address)?
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut admin = proto::admin_client::AdminClient::new(channel);
    let mut request =
        tonic::Request::new(proto::AddNodeRequest { node_id: node.node_id, address: node.peer_advertise.clone() });
    // Catching up a large state can take a while.
    request.set_timeout(Duration::from_secs(600));
    node.channels.authorize(&mut request);
    admin.add_node(request).await.map(|_| ()).map_err(|s| format!("{}: {}", s.code(), s.message()))
}
