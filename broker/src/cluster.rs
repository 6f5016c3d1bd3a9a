//! Forming and growing a cluster: the one-time initialization of a new
//! cluster from `--initial-cluster`, and joining a running one (`--join`).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use gantry_proto::{peer as pb, v1 as proto};
use tokio::sync::watch;

use crate::{
    dispatch::Node,
    queue::ShardId,
    raft::{GantryNode, PeerChannels, guard::GuardVote},
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
        // Every member answered and none holds the shard: the cluster is
        // new, which is the verdict `verify_new_data_dir` waits for. Lifted
        // before the first entry exists, so that verdict, seeing members
        // with entries afterwards, cannot take this node's own new group
        // for a lost data directory (openraft also elects at initialize).
        shard.raft.lift_new_data_dir_fence();
        match shard.raft.initialize(members.clone()).await {
            Ok(()) => {
                tracing::info!(shard = %shard.raft.shard(), members = ?members.keys().collect::<Vec<_>>(), "initialized a new cluster")
            }
            Err(e) => tracing::error!(shard = %shard.raft.shard(), error = %e, "cluster initialization failed"),
        }
    }
    // Every member's copy starts fenced on a new data directory (no vote
    // until it knows the cluster is new), so the first election may find
    // no voter: stand again at each retry instead of waiting a whole
    // election timeout per refusal.
    let mut candidacies: BTreeMap<u32, u64> = BTreeMap::new();
    loop {
        let leaderless: Vec<_> = pending.iter().filter(|s| s.raft.leader().is_none()).collect();
        if leaderless.is_empty() {
            return;
        }
        for shard in leaderless {
            let id = shard.raft.shard().0;
            match shard.raft.campaign(candidacies.get(&id).copied()).await {
                Some(term) => candidacies.insert(id, term),
                None => candidacies.remove(&id),
            };
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
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

/// Spreads the shards' leaders over the nodes, so every node's CPU leads
/// some (DESIGN §6). Runs on every node and acts on the shards this node
/// leads (only a leader can hand leadership over): a node that leads at
/// least two more shards than a live voter leading the fewest hands one to
/// it. Shards elect apart after a failover and a node that comes back leads
/// nothing; this evens them out again, at most one handover per election
/// timeout per node and none within two election timeouts of any leader
/// change, so leadership never moves faster than the cluster settles.
pub async fn balance_leaders(node: Arc<Node>, election_timeout: Duration, mut shutdown: watch::Receiver<bool>) {
    // A new or restarted cluster elects first.
    let mut quiet_until = tokio::time::Instant::now() + election_timeout * 2;
    let mut leaders_seen = Vec::new();
    // Said once at warn, not per try.
    let mut refused: Option<(ShardId, u64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(BALANCE_PERIOD) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        // Any leader change (a failover, a node handing its shards over as
        // it shuts down, an operator's TransferLeader) is let settle first:
        // a node that just handed its shards over is about to go, and must
        // not be handed one back while it still answers.
        let leaders: Vec<Option<u64>> = node.shards.iter().map(|s| s.raft.leader().map(|(id, _)| id)).collect();
        if leaders != leaders_seen {
            leaders_seen = leaders;
            quiet_until = quiet_until.max(tokio::time::Instant::now() + election_timeout * 2);
        }
        if tokio::time::Instant::now() < quiet_until {
            continue;
        }
        let Some((slot, to)) = handover(&node, election_timeout) else { continue };
        let shard = &node.shards[slot];
        let id = shard.raft.shard();
        quiet_until = tokio::time::Instant::now() + election_timeout;
        match shard.raft.transfer_leadership(to).await {
            Ok(()) => {
                refused = None;
                tracing::info!(shard = %id, to, "handing leadership over to spread the shards' leaders");
            }
            Err(e) if refused.replace((id, to)) != Some((id, to)) => {
                tracing::warn!(shard = %id, to, error = %e, "cannot hand this shard over to spread the leaders")
            }
            Err(e) => tracing::debug!(shard = %id, to, error = %e, "leadership handover still not possible"),
        }
    }
}

/// How often a node looks at how the leaders are spread.
const BALANCE_PERIOD: Duration = Duration::from_millis(250);
/// How far behind the leader's log a node may be and still be handed a
/// shard (it must win the election the handover starts).
const HANDOVER_MAX_LAG: u64 = 100;

/// The shard this node should hand over now, and to whom, if any.
fn handover(node: &Node, election_timeout: Duration) -> Option<(usize, u64)> {
    let statuses: Vec<_> = node.shards.iter().map(|s| s.raft.status()).collect();
    let leaders: Vec<Option<u64>> = statuses.iter().map(|s| s.leader_id).collect();
    let led_here = statuses.iter().position(|s| s.leader_id == Some(node.node_id) && s.replication.is_some())?;
    let progress = statuses[led_here].replication.as_ref()?;
    // Only voters of every shard that answered this node lately are given
    // shards: a handover to a node that is down costs an election.
    let candidates: BTreeSet<u64> = statuses[0]
        .voters
        .iter()
        .copied()
        .filter(|id| statuses.iter().all(|s| s.voters.contains(id)))
        .filter(|id| {
            // (A node that just handed its shards over to shut down still
            // answers: the quiet period after every leader change keeps it
            // from being handed one back.)
            *id == node.node_id || progress.get(id).and_then(|p| p.last_heard).is_some_and(|ago| ago < election_timeout)
        })
        .collect();
    let caught_up = |slot: usize, to: u64| {
        let status = &statuses[slot];
        let matched = status.replication.as_ref().and_then(|r| r.get(&to)).and_then(|p| p.matched_index);
        matched.is_some_and(|m| m + HANDOVER_MAX_LAG >= status.last_log_index)
    };
    pick_handover(node.node_id, &leaders, &candidates, caught_up)
}

/// Given each shard's leader (None: an election is under way) and the
/// nodes that may lead, the shard `me` hands over and to whom: one it
/// leads, to the candidate leading the fewest (the lowest id of those),
/// when `me` leads at least two more than it. `ready(slot, to)` says
/// whether `to` could take shard `slot` now. Nothing moves while any shard
/// has no leader.
fn pick_handover(
    me: u64,
    leaders: &[Option<u64>],
    candidates: &BTreeSet<u64>,
    ready: impl Fn(usize, u64) -> bool,
) -> Option<(usize, u64)> {
    if leaders.iter().any(Option::is_none) {
        return None;
    }
    let led = |id: u64| leaders.iter().filter(|l| **l == Some(id)).count();
    let (fewest, to) = candidates.iter().filter(|id| **id != me).map(|id| (led(*id), *id)).min()?;
    if led(me) < fewest + 2 {
        return None;
    }
    // The highest shard first: any fixed order would do.
    let slot = (0..leaders.len()).rev().find(|slot| leaders[*slot] == Some(me) && ready(*slot, to))?;
    Some((slot, to))
}

/// A node started on a new data directory must not vote before it knows
/// whether the cluster is new too: a member whose data directory was lost
/// would otherwise grant votes with an empty log (electing a leader without
/// entries it had acknowledged) and could vote twice in a term it forgot.
/// Every shard starts fenced (`ShardRaft::fence_new_data_dir`); this asks
/// the peers (`--initial-cluster`, or the members a `--join` address names)
/// and every member they name, per shard, until all have answered:
/// - no member has committed anything of the shard: the cluster is new, the
///   fence lifts;
/// - else this node lost its data (or is joining a running cluster): the
///   copy stays fenced until a leader whose vote is at least the newest vote
///   any member holds (so at least any vote this node may have granted) has
///   replicated to it past the highest index any member knew committed.
pub async fn verify_new_data_dir(
    node: Arc<Node>,
    initial: BTreeMap<u64, String>,
    join: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending: BTreeSet<u32> = node.shards.iter().map(|s| s.raft.shard().0).collect();
    let mut peers: BTreeMap<u64, String> = initial.into_iter().filter(|(id, _)| *id != node.node_id).collect();
    let mut answers: BTreeMap<u64, pb::NodeInfoResponse> = BTreeMap::new();
    let mut said = false;
    loop {
        if peers.is_empty() {
            for address in &join {
                match cluster_members(&node, address).await {
                    Ok(members) => peers.extend(members.into_iter().filter(|(id, _)| *id != node.node_id)),
                    Err(e) => tracing::debug!(%address, error = %e, "asking the cluster to join for its members"),
                }
            }
        }
        let unanswered: Vec<(u64, String)> =
            peers.iter().filter(|(id, _)| !answers.contains_key(id)).map(|(id, a)| (*id, a.clone())).collect();
        for (id, address) in &unanswered {
            match node_info(&node.channels, address).await {
                Ok(info) if info.node_id == *id => {
                    for view in &info.shard_views {
                        peers.extend(
                            view.members.iter().filter(|(m, _)| **m != node.node_id).map(|(m, a)| (*m, a.clone())),
                        );
                    }
                    answers.insert(*id, info);
                }
                Ok(info) => {
                    tracing::warn!(expected = id, found = info.node_id, %address, "another node answers at this address")
                }
                Err(e) => tracing::debug!(node = id, %address, error = %e, "member not answering yet"),
            }
        }
        let everyone_answered = !peers.is_empty() && peers.keys().all(|id| answers.contains_key(id));
        let undecided: Vec<_> = node.shards.iter().filter(|s| pending.contains(&s.raft.shard().0)).collect();
        for shard in undecided {
            let id = shard.raft.shard().0;
            if !shard.raft.awaits_new_data_dir_verdict() {
                // `bootstrap` found the cluster new and initialized it here.
                pending.remove(&id);
                continue;
            }
            let views: Vec<&pb::ShardRaftView> =
                answers.values().flat_map(|a| a.shard_views.iter().filter(move |v| v.shard == id)).collect();
            let older = answers.values().any(|a| a.shard_views.is_empty() && a.initialized_shards.contains(&id));
            if older {
                if !said {
                    tracing::error!(
                        shard = id,
                        "a member is too old to report its vote: this node stays fenced (upgrade it)"
                    );
                }
                continue;
            }
            if !everyone_answered {
                continue;
            }
            let established = views.iter().any(|v| v.commit_index >= 1);
            if !established {
                tracing::info!(shard = id, "every member answered and none has committed anything: the cluster is new");
                shard.raft.lift_new_data_dir_fence();
            } else {
                let vote = views
                    .iter()
                    .map(|v| GuardVote { term: v.vote_term, node_id: v.vote_node_id, committed: v.vote_committed })
                    .max_by_key(GuardVote::order)
                    .expect("an established shard has views");
                let until = views.iter().map(|v| v.commit_index).max().unwrap_or(0);
                let member = views.iter().any(|v| v.members.contains_key(&node.node_id));
                let why = if member {
                    format!(
                        "this node's data directory is new but the other members hold shard {id} with it as a member: \
                         its data directory was lost. It does not vote, lead or serve reads of the shard until a leader \
                         of vote {vote} or newer has replicated the log to it past index {until}"
                    )
                } else {
                    format!(
                        "this node is new to a running cluster: it does not vote, lead or serve reads of shard {id} \
                         until a leader has replicated the log to it past index {until}"
                    )
                };
                shard.raft.fence_lost_data_dir(until, vote, why);
            }
            pending.remove(&id);
        }
        if pending.is_empty() {
            return;
        }
        if !said {
            tracing::info!(shards = ?pending, waiting_for = ?peers.keys().filter(|id| !answers.contains_key(id)).collect::<Vec<_>>(), "new data directory: not voting until every member has answered");
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The members (id -> peer address) a running cluster's client port names.
async fn cluster_members(node: &Node, address: &str) -> Result<BTreeMap<u64, String>, String> {
    let channel = node
        .channels
        .client_port_endpoint(address)?
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut admin = proto::admin_client::AdminClient::new(channel);
    let mut request = tonic::Request::new(proto::ClusterStatusRequest::default());
    request.set_timeout(CALL_TIMEOUT);
    node.channels.authorize(&mut request);
    let status = admin.cluster_status(request).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    Ok(status.into_inner().nodes.into_iter().map(|n| (n.node_id, n.peer_address)).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::pick_handover;

    fn ids(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn leaders_spread_one_handover_at_a_time_and_settle() {
        let all = ids(&[1, 2, 3]);
        let ready = |_: usize, _: u64| true;
        // Everything on node 1: it hands its highest shard to the lowest
        // idle node, and the others have nothing to hand over.
        let mut leaders = vec![Some(1); 3];
        assert_eq!(pick_handover(1, &leaders, &all, ready), Some((2, 2)));
        assert_eq!(pick_handover(2, &leaders, &all, ready), None);
        leaders[2] = Some(2);
        assert_eq!(pick_handover(1, &leaders, &all, ready), Some((1, 3)));
        leaders[1] = Some(3);
        for me in 1..=3 {
            assert_eq!(pick_handover(me, &leaders, &all, ready), None, "settled: one shard each");
        }
        // Four shards on three nodes: 2, 1, 1 is as even as it gets.
        let four = [Some(1), Some(1), Some(2), Some(3)];
        assert!((1..=3).all(|me| pick_handover(me, &four, &all, ready).is_none()));
    }

    #[test]
    fn nothing_moves_during_an_election_or_toward_a_node_that_cannot_take_it() {
        let all = ids(&[1, 2, 3]);
        let electing = [Some(1), Some(1), None];
        assert_eq!(pick_handover(1, &electing, &all, |_, _| true), None);
        // Node 3 is down (not a candidate): 2 and 1 is even among the rest.
        let after_failover = [Some(1), Some(1), Some(2)];
        assert_eq!(pick_handover(1, &after_failover, &ids(&[1, 2]), |_, _| true), None);
        // Node 3 came back but has not caught up with shard 2 yet: shard 1 goes.
        let led_by_one = [Some(1), Some(1), Some(1)];
        assert_eq!(pick_handover(1, &led_by_one, &ids(&[1, 3]), |slot, _| slot != 2), Some((1, 3)));
        assert_eq!(pick_handover(1, &led_by_one, &ids(&[1, 3]), |_, _| false), None);
        // A single shard never moves.
        assert_eq!(pick_handover(1, &[Some(1)], &all, |_, _| true), None);
    }
}
