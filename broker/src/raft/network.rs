//! Raft network for a node with no peers. A single-voter group never sends
//! a Raft RPC; if one is ever attempted (a membership change without the
//! peer transport), it fails as unreachable instead of pretending to work.

use std::{future::Future, io::Cursor};

use openraft::{
    BasicNode, OptionalSend, RaftNetworkFactory, RaftNetworkV2,
    errors::{RPCError, ReplicationClosed, StreamingError, Unreachable},
    network::RPCOption,
    raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse},
    type_config::alias::{SnapshotOf, VoteOf},
};

use super::types::TypeConfig;

type C = TypeConfig;

#[derive(Clone, Debug, Default)]
pub struct NoPeers;

pub struct NoPeerClient {
    target: u64,
}

impl RaftNetworkFactory<C> for NoPeers {
    type Network = NoPeerClient;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> NoPeerClient {
        NoPeerClient { target }
    }
}

impl NoPeerClient {
    fn unreachable(&self) -> Unreachable<C> {
        Unreachable::from_string(format!("node {} is a peer, but this node runs without a peer transport", self.target))
    }
}

impl RaftNetworkV2<C> for NoPeerClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn vote(&mut self, _rpc: VoteRequest<C>, _option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(self.unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<C>,
        _snapshot: SnapshotOf<C, Cursor<Vec<u8>>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        Err(StreamingError::Unreachable(self.unreachable()))
    }
}
