//! A worker stream whose node leads none of the shards, when one other
//! node leads them all, goes whole to that node's peer port, untouched (no
//! message decoded here), and the answer names the leader in
//! `gantry-leader` metadata. Every other call is served by the node it
//! reaches: unary calls send a shard's commands to its leader
//! (`dispatch/route.rs`), a stream over shards led by several nodes opens a
//! part on each (`relay.rs`).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use super::status::LEADER_METADATA;
use crate::{
    dispatch::Node,
    raft::{GantryNode, PeerChannels},
};

/// Set on a forwarded call, so a node that is not the leader either (a
/// stale view during an election) answers UNAVAILABLE instead of forwarding
/// again: no call ever travels in a loop.
pub const FORWARDED_METADATA: &str = "gantry-forwarded-by";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

#[derive(Clone)]
pub struct ForwardLayer {
    node: Arc<Node>,
    channels: PeerChannels,
}

impl ForwardLayer {
    pub fn new(node: Arc<Node>, channels: PeerChannels) -> Self {
        ForwardLayer { node, channels }
    }
}

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;

    fn layer(&self, inner: S) -> Forward<S> {
        Forward { inner, node: self.node.clone(), channels: self.channels.clone() }
    }
}

#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    node: Arc<Node>,
    channels: PeerChannels,
}

const WORKER_CONNECT: &str = "/gantry.v1.Worker/Connect";

/// The node that leads every shard, when it is another one: a worker
/// stream then goes to it untouched, whatever its queues. Otherwise the
/// stream is served here, with one part per other leader of its shards
/// (`grpc/relay.rs`).
fn sole_other_leader(node: &Node) -> Option<(u64, GantryNode)> {
    let (id, leader) = node.shards[0].raft.leader().filter(|(id, _)| *id != node.node_id)?;
    node.shards[1..].iter().all(|s| s.raft.leader().is_some_and(|(other, _)| other == id)).then_some((id, leader))
}

fn status_response(status: Status, leader_client: Option<&str>) -> Response<Body> {
    let mut response = status.into_http::<Body>();
    if let Some(value) = leader_client.and_then(|a| HeaderValue::from_str(a).ok()) {
        response.headers_mut().insert(LEADER_METADATA, value);
    }
    response
}

impl<S> Service<Request<Body>> for Forward<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Body>) -> BoxFuture {
        let sole_leader = (request.uri().path() == WORKER_CONNECT).then(|| sole_other_leader(&self.node)).flatten();
        let Some((leader_id, leader)) = sole_leader else {
            // The clone is not ready; the ready one serves this call.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            return Box::pin(async move { inner.call(request).await.map_err(Into::into) });
        };
        let shard_id = self.node.shards[0].raft.shard();
        if let Some(from) = request.headers().get(FORWARDED_METADATA) {
            let status = Status::unavailable(format!(
                "node {} is not the leader of shard {shard_id} either (forwarded by node {}); node {leader_id} at {} is",
                self.node.node_id,
                from.to_str().unwrap_or("?"),
                leader.client
            ));
            return Box::pin(async move { Ok(status_response(status, Some(&leader.client))) });
        }
        let channel = match self.channels.channel(&leader.peer) {
            Ok(channel) => channel,
            Err(e) => {
                let status = Status::unavailable(format!("cannot reach the leader of shard {shard_id}: {e}"));
                return Box::pin(async move { Ok(status_response(status, Some(&leader.client))) });
            }
        };
        request.headers_mut().insert(FORWARDED_METADATA, HeaderValue::from(self.node.node_id));
        let node_id = self.node.node_id;
        Box::pin(async move {
            let mut channel = channel;
            let hint = HeaderValue::from_str(&leader.client).ok();
            // A channel (a buffer) takes a call only after it said it is ready.
            let ready = std::future::poll_fn(|cx| Service::poll_ready(&mut channel, cx)).await;
            let sent = match ready {
                Ok(()) => Service::call(&mut channel, request).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(mut response) => {
                    if let Some(hint) = hint {
                        response.headers_mut().insert(LEADER_METADATA, hint);
                    }
                    Ok(response)
                }
                // Reopening a worker stream is always safe (the session
                // resumes), so a stream lost in flight is UNAVAILABLE too.
                Err(e) => {
                    tracing::debug!(leader = leader_id, error = %e, "forwarding to the leader failed");
                    let status = Status::unavailable(format!(
                        "node {node_id} cannot reach node {leader_id}, the leader of shard {shard_id} ({}); retry shortly",
                        leader.peer
                    ));
                    // No hint: a leader this node cannot reach is likely gone,
                    // and clients would only waste a try on it.
                    Ok(status_response(status, None))
                }
            }
        })
    }
}
