//! The Raft network over tonic on the peer port: one lazily connected
//! channel per peer address, shared by every shard's group and by call
//! forwarding. Each Raft RPC is one `gantry.peer.v1.PeerService` call: the
//! openraft message in postcard while the shard is at format 0, as
//! `gantry.peer.v1` messages from format 1 (`wire.rs`); snapshots go in
//! bounded chunks.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, Stream, StreamExt};
use gantry_proto::peer::{self as pb, peer_service_client::PeerServiceClient as PeerRpcClient};
use openraft::{
    OptionalSend, RaftNetworkFactory, RaftNetworkV2,
    base::{BoxFuture, BoxStream},
    errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
        TransferLeaderResponse, VoteRequest, VoteResponse,
    },
    type_config::alias::{SnapshotOf, VoteOf},
};
use serde::{Serialize, de::DeserializeOwned};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::snapshot_file::SnapshotData;
use super::{
    append_stream,
    types::{GantryNode, TypeConfig},
    wire,
};
use crate::format::storage::DecodeError;
use crate::format::table::APPEND_STREAM;
use crate::queue::ShardId;

type C = TypeConfig;

/// Largest message either side of the peer port accepts. An append carries
/// at most `MAX_ENTRIES_PER_APPEND` entries of at most
/// `proposer::MAX_ENTRY_BYTES` each (one command may exceed that alone, up to
/// the 64 MiB payload limit), so this bound is never hit by a healthy node.
pub const PEER_MAX_MESSAGE_BYTES: usize = 160 << 20;
/// Entries per AppendEntries RPC (openraft `max_payload_entries`).
pub const MAX_ENTRIES_PER_APPEND: u64 = 16;
/// Snapshot data per InstallSnapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How this node dials other nodes (`security::Security` fills it in).
#[derive(Clone, Default)]
pub struct DialSettings {
    /// Mutual TLS to peer ports: the peer CA and this node's certificate.
    pub peer_tls: Option<ClientTlsConfig>,
    /// TLS to a running cluster's client port (`--join`).
    pub client_tls: Option<ClientTlsConfig>,
    /// A token with the admin role for calls to client ports (`--join`
    /// calls AddNode), when the cluster checks tokens.
    pub client_token: Option<String>,
}

impl std::fmt::Debug for DialSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("DialSettings")
            .field("peer_tls", &self.peer_tls.is_some())
            .field("client_tls", &self.client_tls.is_some())
            .field("client_token", &self.client_token.is_some())
            .finish()
    }
}

/// Channels to peers by address. Cheap to clone.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    dial: Arc<DialSettings>,
}

impl PeerChannels {
    pub fn new(dial: DialSettings) -> Self {
        PeerChannels { channels: Default::default(), dial: Arc::new(dial) }
    }

    /// The channel to `address` (host:port), created on first use. tonic
    /// reconnects it by itself after the peer restarts.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = tls_endpoint(address, self.dial.peer_tls.as_ref())
            .map_err(|e| format!("peer address {address:?}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// An endpoint for another node's client port (`--join`): TLS and the
    /// token as `DialSettings` say.
    pub fn client_port_endpoint(&self, address: &str) -> Result<Endpoint, String> {
        tls_endpoint(address, self.dial.client_tls.as_ref()).map_err(|e| format!("address {address:?}: {e}"))
    }

    /// Adds the admin token for client-port calls, if the cluster uses tokens.
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        if let Some(value) = self
            .dial
            .client_token
            .as_ref()
            .and_then(|t| format!("Bearer {t}").parse::<tonic::metadata::AsciiMetadataValue>().ok())
        {
            request.metadata_mut().insert("authorization", value);
        }
    }

    pub fn client(&self, address: &str) -> Result<PeerRpcClient<Channel>, String> {
        Ok(PeerRpcClient::new(self.channel(address)?)
            .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES))
    }
}

/// `https` with `tls`, `http` without.
fn tls_endpoint(address: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| e.to_string())?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| e.to_string()),
        None => Ok(endpoint),
    }
}

/// Whether a call to a peer failed before the request left this node (no
/// connection could be made), so the peer never saw it.
pub fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(value)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The network of one shard's group.
#[derive(Clone)]
pub struct PeerNetwork {
    pub shard: ShardId,
    pub channels: PeerChannels,
    /// The shard's applied state: its format picks the wire encoding.
    pub state: Arc<super::state_machine::ShardState>,
    pub timings: Arc<super::timings::Timings>,
}

impl RaftNetworkFactory<C> for PeerNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &GantryNode) -> PeerConnection {
        PeerConnection {
            target,
            shard: self.shard,
            address: node.peer.clone(),
            channels: self.channels.clone(),
            state: self.state.clone(),
            timings: self.timings.clone(),
        }
    }
}

pub struct PeerConnection {
    target: u64,
    shard: ShardId,
    address: String,
    channels: PeerChannels,
    state: Arc<super::state_machine::ShardState>,
    timings: Arc<super::timings::Timings>,
}

impl PeerConnection {
    fn unreachable(&self, why: impl std::fmt::Display) -> Unreachable<C> {
        Unreachable::from_string(format!("node {} at {}: {why}", self.target, self.address))
    }

    /// Whether this shard speaks the format-1 wire: every member supports
    /// it once the shard's format is 1 (the gate is raised only then).
    fn typed(&self) -> bool {
        self.state.format() >= 1
    }

    async fn raft_call(
        &self,
        kind: pb::RaftKind,
        payload: Vec<u8>,
        body: Option<pb::raft_request::Body>,
        timeout: Duration,
    ) -> Result<pb::RaftResponse, RPCError<C>> {
        let mut client = self.channels.client(&self.address).map_err(|e| self.unreachable(e))?;
        let mut request =
            tonic::Request::new(pb::RaftRequest { shard: self.shard.0, kind: kind as i32, payload, body });
        request.set_timeout(timeout);
        let reply = match client.raft(request).await {
            Ok(reply) => reply.into_inner(),
            // Down, restarting or partitioned: openraft backs off before retrying.
            Err(status) => return Err(self.unreachable(status.message()).into()),
        };
        if !reply.error.is_empty() {
            return Err(self.unreachable(reply.error).into());
        }
        Ok(reply)
    }

    /// A format-0 call: the openraft message in postcard.
    async fn call<Q: Serialize, P: DeserializeOwned>(
        &self,
        kind: pb::RaftKind,
        request: &Q,
        timeout: Duration,
    ) -> Result<P, RPCError<C>> {
        let payload = encode(request).map_err(|e| NetworkError::new(&e))?;
        let reply = self.raft_call(kind, payload, None, timeout).await?;
        decode(&reply.payload).map_err(|e| NetworkError::new(&e).into())
    }

    /// A format-1 call: `body` answered by the response's body.
    async fn typed_call<P>(
        &self,
        kind: pb::RaftKind,
        body: pb::raft_request::Body,
        timeout: Duration,
        answer: impl FnOnce(pb::raft_response::Body) -> Option<Result<P, DecodeError>>,
    ) -> Result<P, RPCError<C>> {
        let reply = self.raft_call(kind, Vec::new(), Some(body), timeout).await?;
        let unexpected = || NetworkError::new(&std::io::Error::other(format!("{kind:?}: an answer of another kind")));
        match reply.body.and_then(answer) {
            Some(Ok(decoded)) => Ok(decoded),
            Some(Err(e)) => Err(NetworkError::new(&e).into()),
            None => Err(unexpected().into()),
        }
    }
}

impl RaftNetworkV2<C> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.unary_append(rpc, option).await
    }

    /// From format 2 one `AppendStream` call carries the requests with
    /// several in flight (`append_stream`); before it they go one at a time
    /// as unary calls, which every member reads.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        if self.state.format() < APPEND_STREAM.format {
            // openraft keeps a session open as long as the follower keeps
            // up: this one ends once the shard's format allows the stream,
            // and openraft opens the next from what the follower confirmed.
            let state = self.state.clone();
            let raised = move || state.format() >= APPEND_STREAM.format;
            return Box::pin(async move { Ok(self.unary_session(input, raised, option)) });
        }
        Box::pin(async move {
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(futures::stream::empty().boxed());
            };
            // A lone request (a heartbeat, a probe) goes as one unary call:
            // a stream costs both sides a task or two and its setup. Polling
            // the input once more does not lose a request it is still
            // building: that stays inside the stream for the next poll.
            let peeked = match input.next().now_or_never() {
                Some(None) => return Ok(self.unary_session(futures::stream::iter([first]), || false, option)),
                Some(Some(second)) => vec![first, second],
                None => vec![first],
            };
            let input = futures::stream::iter(peeked).chain(input);
            let client = self.channels.client(&self.address).map_err(|e| self.unreachable(e))?;
            let peer = format!("node {} at {}", self.target, self.address);
            append_stream::open(client, self.shard.0, peer, input, option.hard_ttl(), self.timings.clone()).await
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.vote_call(pb::RaftKind::Vote, rpc, option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.vote_call(pb::RaftKind::PreVote, rpc, option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        if !self.typed() {
            return self.call(pb::RaftKind::TransferLeader, &req, option.hard_ttl()).await;
        }
        let body = pb::raft_request::Body::TransferLeader(wire::transfer_to_pb(&req));
        self.typed_call(pb::RaftKind::TransferLeader, body, option.hard_ttl(), |answer| match answer {
            pb::raft_response::Body::TransferLeader(r) => Some(wire::transfer_response_from_pb(r)),
            _ => None,
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let mut client = self.channels.client(&self.address).map_err(|e| self.unreachable(e))?;
        // The snapshot's own format decides, not the shard's now: a snapshot
        // of a format-0 state goes as format 0, which any member reads.
        let data = Arc::new(snapshot.snapshot);
        let data_format = data.format().map_err(|e| NetworkError::new(&e))?;
        let typed = self.typed() && data_format >= 1;
        let (header, snapshot_header) = if typed {
            (Vec::new(), Some(wire::snapshot_header_to_pb(&vote, &snapshot.meta)))
        } else {
            (encode(&(vote, snapshot.meta.clone())).map_err(|e| NetworkError::new(&e))?, None)
        };
        let shard = self.shard.0;
        let total = data.len();
        tracing::info!(shard, target = self.target, bytes = total, "sending snapshot");
        // Chunks are read from the snapshot's file as the stream asks for
        // them: at most a couple are in memory, whatever the state's size.
        let first = pb::InstallSnapshotRequest { shard, header, data: Vec::new(), snapshot_header };
        let (failed_tx, mut failed) = tokio::sync::oneshot::channel::<String>();
        let chunks = futures::stream::unfold((0u64, Some(first), Some(failed_tx)), move |(at, first, failed_tx)| {
            let data = data.clone();
            async move {
                if first.is_none() && at >= total {
                    return None;
                }
                let read = tokio::task::spawn_blocking(move || data.read_chunk(at, SNAPSHOT_CHUNK_BYTES)).await;
                let chunk = match read.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        // Not ended: a stream ended here would look whole to
                        // the follower. The call is dropped instead, which
                        // resets it.
                        if let Some(tx) = failed_tx {
                            let _ = tx.send(e);
                        }
                        return std::future::pending().await;
                    }
                };
                let next = at + chunk.len() as u64;
                let mut request = first.unwrap_or(pb::InstallSnapshotRequest {
                    shard,
                    header: Vec::new(),
                    data: Vec::new(),
                    snapshot_header: None,
                });
                request.data = chunk;
                Some((request, (next, None, failed_tx)))
            }
        });
        let sent = client.install_snapshot(chunks);
        let reply = tokio::select! {
            reply = sent => reply,
            Ok(e) = &mut failed => return Err(self.unreachable(format!("reading the snapshot to send: {e}")).into()),
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply.map_err(|status| self.unreachable(status.message()))?.into_inner();
        if !reply.error.is_empty() {
            return Err(self.unreachable(reply.error).into());
        }
        match reply.vote {
            Some(vote) => Ok(wire::snapshot_response_from_pb(vote)),
            None => decode(&reply.payload).map_err(|e| StreamingError::Network(NetworkError::new(&e))),
        }
    }
}

impl PeerConnection {
    /// `input` as unary calls, one at a time (`append_stream::sequential`).
    fn unary_session<'s, S>(
        &'s self,
        input: S,
        stop: impl Fn() -> bool + Send + 's,
        option: RPCOption,
    ) -> BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 's,
    {
        append_stream::sequential(input, stop, move |request| self.unary_append(request, option.clone()))
    }

    /// One AppendEntries as a unary `Raft` call.
    async fn unary_append(
        &self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        if !self.typed() {
            return self.call(pb::RaftKind::AppendEntries, &rpc, option.hard_ttl()).await;
        }
        let body = pb::raft_request::Body::AppendEntries(wire::append_to_pb(&rpc));
        self.typed_call(pb::RaftKind::AppendEntries, body, option.hard_ttl(), |answer| match answer {
            pb::raft_response::Body::AppendEntries(r) => Some(wire::append_response_from_pb(r)),
            _ => None,
        })
        .await
    }

    async fn vote_call(
        &self,
        kind: pb::RaftKind,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        if !self.typed() {
            return self.call(kind, &rpc, option.hard_ttl()).await;
        }
        let body = pb::raft_request::Body::Vote(wire::vote_request_to_pb(&rpc));
        self.typed_call(kind, body, option.hard_ttl(), |answer| match answer {
            pb::raft_response::Body::Vote(r) => Some(wire::vote_response_from_pb(r)),
            _ => None,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::never_sent;

    #[tokio::test]
    async fn a_refused_connection_is_told_from_a_call_lost_in_flight() {
        use tonic::codegen::Service as _;
        // A port nobody listens on: the call never leaves this node.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let channels = crate::raft::PeerChannels::new(Default::default());
        let mut channel = channels.channel(&format!("127.0.0.1:{port}")).unwrap();
        let request = http::Request::builder().uri("/gantry.v1.Jobs/Enqueue").body(tonic::body::Body::empty()).unwrap();
        let ready = std::future::poll_fn(|cx| channel.poll_ready(cx)).await;
        let error = match ready {
            Ok(()) => channel.call(request).await.expect_err("nobody listens"),
            Err(e) => e,
        };
        assert!(never_sent(&error), "{error:?}");
        // A broken connection mid-call carries no connect error.
        let lost = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert!(!never_sent(&lost));
    }
}
