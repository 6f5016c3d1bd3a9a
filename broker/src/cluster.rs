//! Forming and growing a cluster: the one-time initialization of a new
//! cluster from `--initial-cluster`, and joining a running one (`--join`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gantry_proto::{peer as pb, v1 as proto};
use tokio::sync::watch;

use crate::{
    dispatch::Node,
    queue::ShardId,
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
/// lowest id does it, only for shards whose log is empty here, and only
/// after every listed member answered, runs the same shard count, and has
/// no membership for that shard. So restarting any node (the initializer
/// too, even part-way through its shards) never makes a second cluster; a
/// wiped initializer waits to be caught up by the leader.
pub async fn bootstrap(node: Arc<Node>, initial: BTreeMap<u64, String>, mut shutdown: watch::Receiver<bool>) {
    let first = initial.keys().next().copied();
    if first != Some(node.node_id) {
        tracing::info!(initializer = ?first, "waiting for the cluster's first leader to contact this node");
        return;
    }
    let mut pending = Vec::new();
    for shard in &node.shards {
        if !shard.raft.is_initialized().await {
            pending.push(shard.clone());
        }
    }
    if pending.is_empty() {
        return;
    }
    let shard_count = node.shards.len() as u32;
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
                Ok(info) if info.shards.max(1) != shard_count => {
                    if warned {
                        continue;
                    }
                    tracing::error!(node = *id, %address, theirs = info.shards.max(1), ours = shard_count, "a member runs another shard count; start every member with the same --shards");
                }
                Ok(info) => {
                    let mut theirs = info.initialized_shards.clone();
                    if info.initialized && theirs.is_empty() {
                        theirs.push(0);
                    }
                    if !theirs.is_empty() {
                        tracing::warn!(node = *id, %address, shards = ?theirs, "a member already belongs to an initialized cluster for these shards: not initializing them again; waiting to be contacted by their leader");
                        pending.retain(|s| !theirs.contains(&s.raft.shard().0));
                        if pending.is_empty() {
                            return;
                        }
                    }
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
    for shard in &pending {
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

/// Keeps every shard led by the node that leads shard 0. The edge forwards
/// a call to one node (shard 0's leader, `grpc/forward.rs`) and a worker's
/// stream spans the shards of its queues, so every shard must be led there;
/// after a failover the shards elect apart and this moves them back. It runs
/// on every node and acts on the shards this node leads: only a leader can
/// hand leadership over. A handover is tried at most once per election
/// timeout per shard (a lagging target needs time to catch up).
pub async fn align_leaders(node: Arc<Node>, election_timeout: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut last_try: BTreeMap<ShardId, tokio::time::Instant> = BTreeMap::new();
    // Shards whose last handover was refused: said once at warn, not per try.
    let mut refused: BTreeMap<ShardId, u64> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ALIGN_PERIOD) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let Some((target, _)) = node.shards[0].raft.leader() else { continue };
        if target == node.node_id {
            continue;
        }
        for shard in &node.shards[1..] {
            let id = shard.raft.shard();
            let recently = last_try.get(&id).is_some_and(|at| at.elapsed() < election_timeout);
            if recently || !shard.raft.is_leader() {
                continue;
            }
            last_try.insert(id, tokio::time::Instant::now());
            match shard.raft.transfer_leadership(target).await {
                Ok(()) => {
                    refused.remove(&id);
                    tracing::info!(shard = %id, to = target, "handing leadership to shard 0's leader")
                }
                Err(e) if refused.insert(id, target) != Some(target) => {
                    tracing::warn!(shard = %id, to = target, error = %e, "cannot hand this shard to shard 0's leader; clients are refused for it until that is possible")
                }
                Err(e) => {
                    tracing::debug!(shard = %id, to = target, error = %e, "leadership handover still not possible")
                }
            }
        }
    }
}

/// How often a node checks that the shards it leads follow shard 0.
const ALIGN_PERIOD: Duration = Duration::from_millis(100);
