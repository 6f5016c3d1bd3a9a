//! The parts of a worker stream whose shards other nodes lead. A worker's
//! queues may live in shards led by different nodes; the node the stream
//! reached serves the shards it leads itself and opens one stream per other
//! leader on that leader's peer port (the same `Worker.Connect`, marked as
//! forwarded), resuming the session it already opened there. Each leader
//! keeps the session's heartbeat table and pushes its assignments and
//! revokes, which go back to the worker; heartbeats and the goodbye are
//! passed on to every leader. Results and drains are commands, proposed by
//! this node on their shard's leader (`dispatch/route.rs`), and answered
//! from here. A part that ends ends the whole stream, and so does a shard
//! of a part that another node leads now (a stopped leader ends nothing
//! itself): the worker reconnects and resumes its session, and the shards
//! are grouped by their leaders anew.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use gantry_proto::v1::{
    self as proto, broker_message::Kind as Out, worker_client::WorkerClient, worker_message::Kind as In,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Status, metadata::MetadataValue};

use super::forward::FORWARDED_METADATA;
use crate::{queue::ShardId, raft::PeerChannels};

type OutTx = mpsc::UnboundedSender<Result<proto::BrokerMessage, Status>>;

/// One other leader's part of a worker stream.
pub(super) struct Part {
    leader: u64,
    shards: BTreeSet<ShardId>,
    tx: mpsc::UnboundedSender<proto::WorkerMessage>,
    last_sent: Instant,
}

/// What a part is opened with.
pub(super) struct PartHello {
    pub leader: u64,
    pub peer: String,
    pub shards: BTreeSet<ShardId>,
    pub hello: proto::Hello,
}

impl Part {
    /// Opens the part on the leader's peer port and relays what the leader
    /// sends to `out` until the part ends; an end the worker did not ask
    /// for ends the worker's stream with its status. The leader must answer
    /// with the session this node opened (`hello.resume_session_id`).
    pub(super) async fn open(
        channels: &PeerChannels,
        this_node: u64,
        part: PartHello,
        out: OutTx,
    ) -> Result<Part, Status> {
        let PartHello { leader, peer, shards, hello } = part;
        let session_id = hello.resume_session_id.clone();
        let channel = channels.channel(&peer).map_err(|e| {
            Status::unavailable(format!("cannot reach node {leader}, the leader of shards {shards:?}: {e}"))
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(proto::WorkerMessage { kind: Some(In::Hello(hello)) }).expect("receiver held");
        let mut request = Request::new(UnboundedReceiverStream::new(rx));
        request.metadata_mut().insert(FORWARDED_METADATA, MetadataValue::from(this_node));
        let mut inbound = WorkerClient::new(channel)
            .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
            .connect(request)
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(proto::BrokerMessage { kind: Some(Out::Welcome(welcome)) }) if welcome.session_id == session_id => {
                tracing::debug!(leader, ?shards, session = %session_id, "worker stream part opened");
            }
            other => {
                tracing::info!(leader, ?shards, session = %session_id, answer = ?other, "the leader answered another session");
                // That session is the leader's own making and nobody's: it
                // must not hold jobs until its ttl runs out.
                let goodbye = proto::WorkerMessage { kind: Some(In::Goodbye(proto::Goodbye {})) };
                let _ = tx.send(goodbye);
                // Kept open until the leader ends it, so the goodbye is read
                // rather than cut off by a reset.
                tokio::spawn(async move {
                    let drained = async { while let Ok(Some(_)) = inbound.message().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
                    drop(tx);
                });
                return Err(Status::unavailable(format!(
                    "the session changed on node {leader}, the leader of shards {shards:?}, while the stream was set up; reconnect"
                )));
            }
        }
        let part_shards = shards.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        if out.send(Ok(message)).is_err() {
                            return;
                        }
                    }
                    // After a goodbye the leader ends its part; the worker's
                    // stream ends once every part and this node are done.
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(leader, ?shards, %status, "worker stream part ended");
                        let message =
                            format!("node {leader}, leading shards {shards:?} of this stream: {}", status.message());
                        let _ = out.send(Err(Status::with_metadata(status.code(), message, status.metadata().clone())));
                        return;
                    }
                }
            }
        });
        Ok(Part { leader, shards: part_shards, tx, last_sent: Instant::now() })
    }

    /// Passes a message on; false when the part has ended.
    pub(super) fn send(&mut self, message: proto::WorkerMessage) -> bool {
        self.last_sent = Instant::now();
        self.tx.send(message).is_ok()
    }

    /// Any message is a heartbeat, but a worker busy with one leader's jobs
    /// may send the others nothing: each part hears from it at least every
    /// `every` while the worker is heard from.
    /// (A part that has ended is found out by the next message it is sent.)
    pub(super) fn keep_alive(&mut self, every: Duration) {
        if self.last_sent.elapsed() >= every {
            self.send(proto::WorkerMessage { kind: Some(In::Heartbeat(proto::Heartbeat {})) });
        }
    }

    pub(super) fn leader(&self) -> u64 {
        self.leader
    }

    /// A shard of this part that, as `leader_of` says, another node leads
    /// now. A leader that stopped (frozen, cut off) does not end its part
    /// itself: the stream would keep a session the new leader never hears
    /// from, and no jobs of that shard would reach the worker.
    pub(super) fn moved(&self, leader_of: impl Fn(ShardId) -> Option<u64>) -> Option<(ShardId, u64)> {
        self.shards.iter().find_map(|shard| match leader_of(*shard) {
            Some(now) if now != self.leader => Some((*shard, now)),
            _ => None,
        })
    }
}
