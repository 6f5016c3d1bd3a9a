//! The server half of the peer port's Raft transport: decodes each
//! `gantry.peer.v1.Peer` call and hands it to the shard's group.

use std::sync::Arc;

use gantry_proto::peer::{self as pb, peer_service_server::PeerService as PeerRpc};
use openraft::{
    raft::AppendEntriesResponse,
    type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf},
};
use serde::Serialize;
use tonic::{Request, Response, Status, Streaming};

use super::{
    ShardRaft,
    network::{decode, encode},
    types::TypeConfig,
};

type C = TypeConfig;

/// Largest snapshot a follower accepts (the whole state of a shard).
const MAX_SNAPSHOT_BYTES: usize = 16 << 30;

pub struct PeerService {
    node_id: u64,
    client_address: String,
    peer_address: String,
    shards: Vec<Arc<ShardRaft>>,
    upgrade_hold: Arc<UpgradeHold>,
}

impl PeerService {
    pub fn new(
        node_id: u64,
        client_address: String,
        peer_address: String,
        shards: Vec<Arc<ShardRaft>>,
        upgrade_hold: Arc<UpgradeHold>,
    ) -> Self {
        PeerService { node_id, client_address, peer_address, shards, upgrade_hold }
    }

    fn shard(&self, shard: u32) -> Result<&Arc<ShardRaft>, Status> {
        self.shards
            .iter()
            .find(|s| s.shard().0 == shard)
            .ok_or_else(|| Status::not_found(format!("shard {shard} is not on node {}", self.node_id)))
    }
}

use super::{
    snapshot_file::{self, SnapshotData},
    wire,
};
use crate::format::{
    hold::UpgradeHold,
    table::{BINARY_VERSION, FORMAT_MAX, FORMAT_MIN_SUPPORTED},
};

fn bad_payload(e: postcard::Error) -> Status {
    Status::invalid_argument(format!("payload: {e}"))
}

/// A Raft-level refusal travels as `error`, not as a gRPC failure, so the
/// sender can tell a live but unwilling peer from an unreachable one.
fn encode_outcome<T: Serialize, E: std::fmt::Display>(outcome: Result<T, E>) -> (Vec<u8>, String) {
    match outcome {
        Ok(value) => match encode(&value) {
            Ok(payload) => (payload, String::new()),
            Err(e) => (Vec::new(), format!("encode response: {e}")),
        },
        Err(e) => (Vec::new(), e.to_string()),
    }
}

fn reply<T: Serialize, E: std::fmt::Display>(outcome: Result<T, E>) -> Result<Response<pb::RaftResponse>, Status> {
    let (payload, error) = encode_outcome(outcome);
    Ok(Response::new(pb::RaftResponse { payload, error, body: None }))
}

/// The answer to a format-1 request: its body, or the refusal.
fn typed_reply<T, E: std::fmt::Display>(
    outcome: Result<T, E>,
    body: impl FnOnce(T) -> pb::raft_response::Body,
) -> Result<Response<pb::RaftResponse>, Status> {
    Ok(Response::new(match outcome {
        Ok(value) => pb::RaftResponse { payload: Vec::new(), error: String::new(), body: Some(body(value)) },
        Err(e) => pb::RaftResponse { payload: Vec::new(), error: e.to_string(), body: None },
    }))
}

fn bad_body(e: crate::format::storage::DecodeError) -> Status {
    Status::invalid_argument(format!("body: {e}"))
}

#[tonic::async_trait]
impl PeerRpc for PeerService {
    async fn raft(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftResponse>, Status> {
        let request = request.into_inner();
        let shard = self.shard(request.shard)?;
        let raft = &shard.raft();
        let payload = &request.payload;
        let kind = pb::RaftKind::try_from(request.kind);
        if matches!(kind, Ok(pb::RaftKind::Vote | pb::RaftKind::PreVote))
            && let Err(refusal) = shard.may_vote()
        {
            return reply::<(), _>(Err(refusal));
        }
        // A fenced copy must not lead, whatever it grants.
        if matches!(kind, Ok(pb::RaftKind::TransferLeader))
            && let Some(refusal) = shard.fenced()
        {
            return reply::<(), _>(Err(refusal));
        }
        if let Some(body) = request.body {
            use pb::{raft_request::Body as In, raft_response::Body as Out};
            return match body {
                In::AppendEntries(r) => {
                    let answer = raft.append_entries(wire::append_from_pb(r).map_err(bad_body)?).await;
                    if answer.as_ref().is_ok_and(|a| !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                        shard.heard_from_leader();
                    }
                    typed_reply(answer, |a| Out::AppendEntries(wire::append_response_to_pb(&a)))
                }
                In::Vote(r) => {
                    let r = wire::vote_request_from_pb(r).map_err(bad_body)?;
                    let answer = match kind {
                        Ok(pb::RaftKind::PreVote) => raft.pre_vote(r).await,
                        _ => raft.vote(r).await,
                    };
                    typed_reply(answer, |a| Out::Vote(wire::vote_response_to_pb(&a)))
                }
                In::TransferLeader(r) => {
                    let answer = raft.handle_transfer_leader(wire::transfer_from_pb(r).map_err(bad_body)?).await;
                    typed_reply(answer, |a| Out::TransferLeader(wire::transfer_response_to_pb(&a)))
                }
            };
        }
        match kind {
            Ok(pb::RaftKind::AppendEntries) => {
                let answer = raft.append_entries(decode(payload).map_err(bad_payload)?).await;
                if answer.as_ref().is_ok_and(|a| !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                    shard.heard_from_leader();
                }
                reply(answer)
            }
            Ok(pb::RaftKind::Vote) => reply(raft.vote(decode(payload).map_err(bad_payload)?).await),
            Ok(pb::RaftKind::PreVote) => reply(raft.pre_vote(decode(payload).map_err(bad_payload)?).await),
            Ok(pb::RaftKind::TransferLeader) => {
                reply(raft.handle_transfer_leader(decode(payload).map_err(bad_payload)?).await)
            }
            Ok(pb::RaftKind::Unspecified) | Err(_) => {
                Err(Status::invalid_argument(format!("kind: unknown Raft RPC kind {}", request.kind)))
            }
        }
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::InstallSnapshotRequest>>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks.message().await?.ok_or_else(|| Status::invalid_argument("install_snapshot: no chunks"))?;
        let typed = first.snapshot_header.is_some();
        let (vote, meta): (VoteOf<C>, SnapshotMetaOf<C>) = match first.snapshot_header {
            Some(header) => wire::snapshot_header_from_pb(header).map_err(bad_body)?,
            None => decode(&first.header).map_err(bad_payload)?,
        };
        let shard = self.shard(first.shard)?.clone();
        let too_large =
            || Status::resource_exhausted(format!("install_snapshot: snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"));
        let data = if typed {
            // From format 1 the state goes to an unlinked file as it
            // arrives, and is decoded from there: never whole in memory.
            let local = |e: std::io::Error| Status::internal(format!("install_snapshot: writing it here: {e}"));
            let mut incoming = snapshot_file::Incoming::create(shard.snapshot_dir()).map_err(local)?;
            let mut chunk = first.data;
            loop {
                if incoming.received() + chunk.len() as u64 > MAX_SNAPSHOT_BYTES as u64 {
                    return Err(too_large());
                }
                incoming = tokio::task::spawn_blocking(move || incoming.append(&chunk).map(|()| incoming))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(local)?;
                match chunks.message().await? {
                    Some(next) => chunk = next.data,
                    None => break,
                }
            }
            incoming.finish()
        } else {
            let mut data = first.data;
            while let Some(chunk) = chunks.message().await? {
                if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                    return Err(too_large());
                }
                data.extend_from_slice(&chunk.data);
            }
            SnapshotData::Memory(data)
        };
        tracing::info!(shard = %shard.shard(), bytes = data.len(), index = ?meta.last_log_id.map(|l| l.index), "installing snapshot from the leader");
        let snapshot = SnapshotOf::<C, _> { meta, snapshot: data };
        let outcome = shard.raft().install_full_snapshot(vote, snapshot).await;
        if typed {
            return Ok(Response::new(match outcome {
                Ok(answer) => pb::InstallSnapshotResponse {
                    payload: Vec::new(),
                    error: String::new(),
                    vote: Some(crate::format::storage::vote_to_pb(&answer.vote)),
                },
                Err(e) => pb::InstallSnapshotResponse { payload: Vec::new(), error: e.to_string(), vote: None },
            }));
        }
        let (payload, error) = encode_outcome(outcome);
        Ok(Response::new(pb::InstallSnapshotResponse { payload, error, vote: None }))
    }

    async fn set_upgrade_hold(
        &self,
        request: Request<pb::SetUpgradeHoldRequest>,
    ) -> Result<Response<pb::SetUpgradeHoldResponse>, Status> {
        let hold = request.into_inner().hold;
        self.upgrade_hold
            .set(hold)
            .map_err(|e| Status::internal(format!("node {}: recording the upgrade hold: {e}", self.node_id)))?;
        tracing::info!(hold, "upgrade hold set by an operator");
        Ok(Response::new(pb::SetUpgradeHoldResponse {}))
    }

    type AppendStreamStream = futures::stream::BoxStream<'static, Result<pb::AppendStreamResponse, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<pb::AppendStreamRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        // The shard is named up front so that the stream opens before the
        // leader has a request to send.
        let id = request
            .metadata()
            .get(super::append_stream::SHARD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("append stream: no {} header", super::append_stream::SHARD_HEADER))
            })?;
        let shard = self.shard(id)?.clone();
        Ok(Response::new(super::append_stream::serve(shard, request.into_inner())))
    }

    async fn node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let mut initialized_shards = Vec::new();
        for shard in &self.shards {
            if shard.is_initialized().await {
                initialized_shards.push(shard.shard().0);
            }
        }
        Ok(Response::new(pb::NodeInfoResponse {
            node_id: self.node_id,
            client_address: self.client_address.clone(),
            peer_address: self.peer_address.clone(),
            initialized: initialized_shards.contains(&0),
            shards: self.shards.len() as u32,
            initialized_shards,
            shard_views: self
                .shards
                .iter()
                .map(|shard| {
                    let (vote, commit_index) = shard.vote_and_commit();
                    let status = shard.status();
                    pb::ShardRaftView {
                        shard: shard.shard().0,
                        vote_term: vote.term,
                        vote_node_id: vote.node_id,
                        vote_committed: vote.committed,
                        commit_index,
                        members: status.nodes.into_iter().map(|(id, node)| (id, node.peer)).collect(),
                        voters: status.voters,
                        format: shard.state().read().queue.format(),
                    }
                })
                .collect(),
            format_min: FORMAT_MIN_SUPPORTED,
            format_max: FORMAT_MAX,
            version: BINARY_VERSION.to_owned(),
            upgrade_held: self.upgrade_hold.is_held(),
        }))
    }
}
