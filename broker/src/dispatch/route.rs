//! A shard's commands go to its leader, from whichever node a call reached:
//! proposed here when this node leads the shard, else sent to the leader
//! over the peer port (`gantry.peer.v1.ShardService`). Reads are follower
//! reads: the leader confirms its leadership with a quorum and names an
//! index, and this node answers from its own state once it has applied
//! that far. Membership changes and the heartbeat table of a shard are asked
//! of its leader the same way. So every node serves the unary calls of
//! every shard itself, whichever node leads it; a worker stream gets one
//! part per other leader of its shards (`grpc/relay.rs`).

use std::{sync::Arc, time::Duration};

use gantry_proto::peer::{self as pb, shard_service_client::ShardServiceClient, shard_service_server::ShardService};
use tonic::{Request, Response, Status};

use super::{ShardNode, proposer::Committed, registry::LiveInfo, shard_wire};
use crate::{
    queue::{Applied, Command},
    raft::{
        GantryNode, MembershipError, ProposeError,
        network::{PEER_MAX_MESSAGE_BYTES, decode, encode, never_sent},
    },
};

/// A change of a shard's Raft group, made by its leader.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum ShardChange {
    /// Adds the node as a learner and waits until it has caught up.
    AddLearner {
        node_id: u64,
        node: GantryNode,
    },
    /// Makes the node a voter (a learner first, caught up).
    AddVoter {
        node_id: u64,
        node: GantryNode,
    },
    Remove {
        node_id: u64,
    },
    TransferLeader {
        to: u64,
    },
}

/// Longest a membership change may take: a new member catches up first,
/// which takes as long as sending it the shard's state.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest wait for the leader's answer: a commit takes milliseconds, so
/// this only ends a call to a leader that hangs (stopped, partitioned).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for this node to apply what the leader committed or
/// confirmed. A follower is normally a few milliseconds behind; one that is
/// far behind (installing a snapshot) answers UNAVAILABLE instead of a
/// stale read.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

impl ShardNode {
    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let mut results = self.propose_all(vec![command]).await?;
        Ok(results.pop().expect("one result per command"))
    }

    /// Commits the commands in one log entry of this shard, in order, on
    /// its leader.
    pub async fn propose_all(&self, commands: Vec<Command>) -> Result<Vec<Applied>, ProposeError> {
        Ok(self.commit(commands).await?.results)
    }

    /// Like `propose_all`, and says which log entry holds the commands: a
    /// read of this node's state after `applied_through(index)` sees them.
    /// (Not waited for here: this node learns of the commit a peer round
    /// trip after the leader, and most callers read nothing after.)
    pub async fn commit(&self, commands: Vec<Command>) -> Result<Committed, ProposeError> {
        let Some((leader, peer)) = self.remote_leader()? else {
            return self.proposer.commit(commands).await;
        };
        let shard = self.raft.shard();
        let (payload, typed_commands) = self.on_the_wire(&commands, "commands", |c| shard_wire::commands_to_pb(c))?;
        let mut request = Request::new(pb::ProposeRequest { shard: shard.0, commands: payload, typed_commands });
        request.set_timeout(REMOTE_TIMEOUT);
        let answer = match self.leader_client(leader, &peer)?.propose(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) if never_sent(&status) || refused_before_proposing(&status) => {
                return Err(call_failed(shard, leader, &status));
            }
            Err(status) => {
                return Err(ProposeError::OutcomeUnknown { shard, leader, message: status.message().into() });
            }
        };
        let unknown =
            |why: String| ProposeError::OutcomeUnknown { shard, leader, message: format!("undecodable answer: {why}") };
        match answer.typed_outcome {
            Some(outcome) => shard_wire::propose_outcome_from_pb(outcome).map_err(|e| unknown(e.to_string()))?,
            None => decode(&answer.outcome).map_err(|e| unknown(e.to_string()))?,
        }
    }

    /// Whether this shard's calls to its leader use the format-1 wire: every
    /// member reads it once the shard's format is 1.
    fn typed_wire(&self) -> bool {
        self.raft.state().format() >= 1
    }

    /// `value` as a request carries it: the format-1 message, or postcard.
    fn on_the_wire<T: serde::Serialize, P>(
        &self,
        value: &T,
        what: &str,
        typed: impl FnOnce(&T) -> P,
    ) -> Result<(Vec<u8>, Option<P>), ProposeError> {
        if self.typed_wire() {
            return Ok((Vec::new(), Some(typed(value))));
        }
        let payload = encode(value).map_err(|e| ProposeError::Stopped {
            shard: self.raft.shard(),
            message: format!("cannot encode the {what}: {e}"),
        })?;
        Ok((payload, None))
    }

    /// Waits (bounded) until this node has applied the shard's log through
    /// `index`; returns whether it has.
    pub async fn applied_through(&self, index: u64) -> bool {
        // A fenced copy may hold a state that differs from the others':
        // nothing is read from it.
        self.raft.fenced().is_none() && self.raft.wait_applied(index, CATCH_UP_TIMEOUT).await
    }

    /// Returns once a read of this node's state is linearizable: it sees
    /// every write acknowledged before the call, by any node, even across a
    /// leader change (a deposed leader finds out here).
    pub async fn linearizable(&self) -> Result<(), ProposeError> {
        if let Some(reason) = self.raft.fenced() {
            return Err(ProposeError::Fenced { shard: self.raft.shard(), reason });
        }
        let Some((leader, peer)) = self.remote_leader()? else {
            return self.raft.ensure_linearizable().await;
        };
        let shard = self.raft.shard();
        let mut request = Request::new(pb::ReadIndexRequest { shard: shard.0 });
        request.set_timeout(REMOTE_TIMEOUT);
        // A read may always be asked again: any failure is UNAVAILABLE.
        let answer = self
            .leader_client(leader, &peer)?
            .read_index(request)
            .await
            .map_err(|status| call_failed(shard, leader, &status))?;
        let answer = answer.into_inner();
        let unreadable = |why: String| ProposeError::LeaderUnreachable { shard, leader, message: undecodable(why) };
        let outcome: Result<u64, ProposeError> = match answer.typed_outcome {
            Some(outcome) => shard_wire::read_index_from_pb(outcome).map_err(|e| unreadable(e.to_string()))?,
            None => decode(&answer.outcome).map_err(|e| unreadable(e.to_string()))?,
        };
        let index = outcome?;
        if self.applied_through(index).await { Ok(()) } else { Err(ProposeError::Lagging { shard, index }) }
    }

    /// Changes the shard's group on its leader, wherever that is.
    pub async fn change(&self, change: ShardChange) -> Result<(), MembershipError> {
        let Some((leader, peer)) = self.remote_leader()? else {
            return self.change_here(change).await;
        };
        let shard = self.raft.shard();
        let (payload, typed_change) = self.on_the_wire(&change, "change", shard_wire::change_to_pb)?;
        let mut request = Request::new(pb::ChangeShardRequest { shard: shard.0, change: payload, typed_change });
        request.set_timeout(CHANGE_TIMEOUT);
        // A change may be asked again: adding a member it has, or handing
        // leadership to the leader, does nothing.
        let answer = self
            .leader_client(leader, &peer)?
            .change_shard(request)
            .await
            .map_err(|status| call_failed(shard, leader, &status))?;
        let answer = answer.into_inner();
        let unreadable = |why: String| {
            MembershipError::from(ProposeError::LeaderUnreachable { shard, leader, message: undecodable(why) })
        };
        match answer.typed_outcome {
            Some(outcome) => shard_wire::change_outcome_from_pb(outcome).map_err(|e| unreadable(e.to_string()))?,
            None => decode(&answer.outcome).map_err(|e| unreadable(e.to_string()))?,
        }
    }

    /// Only here: a node that does not lead the shard says so.
    async fn change_here(&self, change: ShardChange) -> Result<(), MembershipError> {
        match change {
            ShardChange::AddLearner { node_id, node } => self.raft.add_learner(node_id, node).await,
            ShardChange::AddVoter { node_id, node } => self.raft.add_member(node_id, node).await,
            ShardChange::Remove { node_id } => self.raft.remove_member(node_id).await,
            ShardChange::TransferLeader { to } if self.raft.leader().is_some_and(|(id, _)| id == to) => Ok(()),
            ShardChange::TransferLeader { to } => self.raft.transfer_leadership(to).await,
        }
    }

    /// The sessions the shard's leader hears from (its heartbeat table).
    pub async fn live_sessions(&self) -> Result<Vec<LiveInfo>, ProposeError> {
        let Some((leader, peer)) = self.remote_leader()? else {
            return Ok(self.registry.live());
        };
        let shard = self.raft.shard();
        let mut request = Request::new(pb::LiveSessionsRequest { shard: shard.0 });
        request.set_timeout(REMOTE_TIMEOUT);
        let answer = self
            .leader_client(leader, &peer)?
            .live_sessions(request)
            .await
            .map_err(|status| call_failed(shard, leader, &status))?
            .into_inner();
        let unreadable = |why: String| ProposeError::LeaderUnreachable { shard, leader, message: undecodable(why) };
        match answer.typed_outcome {
            Some(outcome) => shard_wire::live_from_pb(outcome).map_err(|e| unreadable(e.to_string()))?,
            None => decode(&answer.outcome).map_err(|e| unreadable(e.to_string()))?,
        }
    }

    /// The leader's id and peer address when another node leads this shard;
    /// None when this node does.
    fn remote_leader(&self) -> Result<Option<(u64, String)>, ProposeError> {
        if self.raft.is_leader() {
            return Ok(None);
        }
        match self.raft.leader() {
            Some((id, node)) if id != self.node_id => Ok(Some((id, node.peer))),
            // Leading in name only (stepping down or up): ask again shortly.
            _ => Err(ProposeError::NotLeader { shard: self.raft.shard(), leader: None }),
        }
    }

    fn leader_client(
        &self,
        leader: u64,
        peer: &str,
    ) -> Result<ShardServiceClient<tonic::transport::Channel>, ProposeError> {
        let channel = self.peers.channel(peer).map_err(|message| ProposeError::LeaderUnreachable {
            shard: self.raft.shard(),
            leader,
            message,
        })?;
        Ok(ShardServiceClient::new(channel)
            .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES))
    }
}

/// An answer from another node's ShardService this node cannot read (a
/// node of another version).
fn undecodable(error: String) -> String {
    format!("undecodable answer: {error}")
}

/// A call to the leader that failed, and says nothing was changed: it
/// could not be sent, or the leader refused it before acting. (Reads and
/// membership changes may always be asked again.)
fn call_failed(shard: crate::queue::ShardId, leader: u64, status: &Status) -> ProposeError {
    let message = if never_sent(status) {
        format!("not reachable: {}", status.message())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    };
    ProposeError::LeaderUnreachable { shard, leader, message }
}

/// Statuses the leader's ShardService answers before anything is proposed
/// (an unknown shard, a request it cannot decode, a node without the
/// service): nothing was committed.
fn refused_before_proposing(status: &Status) -> bool {
    use tonic::Code::*;
    matches!(status.code(), InvalidArgument | NotFound | Unimplemented) && std::error::Error::source(status).is_none()
}

/// The server half: commands and read indexes for the shards this node
/// leads, from nodes that do not.
pub struct ShardCommands {
    node_id: u64,
    shards: Vec<Arc<ShardNode>>,
}

impl ShardCommands {
    pub fn new(node_id: u64, shards: Vec<Arc<ShardNode>>) -> Self {
        ShardCommands { node_id, shards }
    }

    fn shard(&self, shard: u32) -> Result<&Arc<ShardNode>, Status> {
        self.shards
            .iter()
            .find(|s| s.raft.shard().0 == shard)
            .ok_or_else(|| Status::not_found(format!("shard {shard} is not on node {}", self.node_id)))
    }
}

fn encoded<T: serde::Serialize, E: serde::Serialize>(outcome: &Result<T, E>) -> Result<Vec<u8>, Status> {
    encode(outcome).map_err(|e| Status::internal(format!("cannot encode the outcome: {e}")))
}

#[tonic::async_trait]
impl ShardService for ShardCommands {
    async fn propose(&self, request: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeResponse>, Status> {
        let request = request.into_inner();
        let shard = self.shard(request.shard)?;
        let typed = request.typed_commands.is_some();
        let commands: Vec<Command> = match request.typed_commands {
            Some(commands) => shard_wire::commands_from_pb(commands)
                .map_err(|e| Status::invalid_argument(format!("typed_commands: {e}")))?,
            None => decode(&request.commands).map_err(|e| Status::invalid_argument(format!("commands: {e}")))?,
        };
        // Only proposed here: a node that does not lead the shard says so
        // (openraft refuses), it never passes the commands on again.
        let outcome = shard.proposer.commit(commands).await;
        Ok(Response::new(if typed {
            pb::ProposeResponse {
                outcome: Vec::new(),
                typed_outcome: Some(shard_wire::propose_outcome_to_pb(&outcome).map_err(|e| {
                    Status::internal(format!(
                        "shard {}: the commands were committed, but not the reply: {e}",
                        shard.raft.shard()
                    ))
                })?),
            }
        } else {
            pb::ProposeResponse { outcome: encoded(&outcome)?, typed_outcome: None }
        }))
    }

    async fn read_index(
        &self,
        request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        let shard = self.shard(request.get_ref().shard)?;
        let outcome = shard.raft.read_index().await;
        // A read index request has no body to tell the caller's wire by: the
        // shard's format says it (every member reads format 1 from then on).
        Ok(Response::new(if shard.typed_wire() {
            pb::ReadIndexResponse { outcome: Vec::new(), typed_outcome: Some(shard_wire::read_index_to_pb(&outcome)) }
        } else {
            pb::ReadIndexResponse { outcome: encoded(&outcome)?, typed_outcome: None }
        }))
    }

    async fn change_shard(
        &self,
        request: Request<pb::ChangeShardRequest>,
    ) -> Result<Response<pb::ChangeShardResponse>, Status> {
        let request = request.into_inner();
        let shard = self.shard(request.shard)?;
        let typed = request.typed_change.is_some();
        let change: ShardChange = match request.typed_change {
            Some(change) => shard_wire::change_from_pb(change)
                .map_err(|e| Status::invalid_argument(format!("typed_change: {e}")))?,
            None => decode(&request.change).map_err(|e| Status::invalid_argument(format!("change: {e}")))?,
        };
        tracing::info!(shard = %shard.raft.shard(), ?change, "changing the shard's group for another node");
        let outcome = shard.change_here(change).await;
        Ok(Response::new(if typed {
            pb::ChangeShardResponse {
                outcome: Vec::new(),
                typed_outcome: Some(shard_wire::change_outcome_to_pb(&outcome)),
            }
        } else {
            pb::ChangeShardResponse { outcome: encoded(&outcome)?, typed_outcome: None }
        }))
    }

    async fn live_sessions(
        &self,
        request: Request<pb::LiveSessionsRequest>,
    ) -> Result<Response<pb::LiveSessionsResponse>, Status> {
        let shard = self.shard(request.get_ref().shard)?;
        let outcome = if shard.raft.is_leader() {
            Ok(shard.registry.live())
        } else {
            let leader = shard.raft.leader().map(|(id, node)| (id, node.client));
            Err(ProposeError::NotLeader { shard: shard.raft.shard(), leader })
        };
        Ok(Response::new(if shard.typed_wire() {
            pb::LiveSessionsResponse { outcome: Vec::new(), typed_outcome: Some(shard_wire::live_to_pb(&outcome)) }
        } else {
            pb::LiveSessionsResponse { outcome: encoded(&outcome)?, typed_outcome: None }
        }))
    }

    async fn integrity(
        &self,
        request: Request<pb::IntegrityRequest>,
    ) -> Result<Response<pb::IntegrityResponse>, Status> {
        let mine = self.shard(request.get_ref().shard)?.local_integrity();
        Ok(Response::new(pb::IntegrityResponse {
            digests: mine
                .digests
                .into_iter()
                .map(|d| pb::StateDigest { index: d.index, digest: d.digest.to_vec() })
                .collect(),
            fenced: mine.fenced.unwrap_or_default(),
        }))
    }

    async fn rebuild(&self, request: Request<pb::RebuildRequest>) -> Result<Response<pb::RebuildResponse>, Status> {
        let request = request.into_inner();
        let shard = self.shard(request.shard)?;
        let outcome = shard.raft.rebuild(&request.reason, request.forget_acknowledged).await;
        Ok(Response::new(pb::RebuildResponse { error: outcome.err().map(|e| e.to_string()).unwrap_or_default() }))
    }
}
