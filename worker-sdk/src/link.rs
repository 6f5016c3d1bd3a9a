//! Opening one `Worker.Connect` stream: hello out, welcome (or redirect) back.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::Streaming;

use crate::endpoint::{BrokerChannel, leader_hint};
use crate::proto::{self, broker_message, worker_client::WorkerClient, worker_message};

/// A stream that got its `welcome`.
pub(crate) struct Opened {
    /// Dropping it ends the request stream, which the broker sees as the
    /// worker going away.
    pub(crate) tx: mpsc::UnboundedSender<proto::WorkerMessage>,
    pub(crate) inbound: Streaming<proto::BrokerMessage>,
    pub(crate) welcome: proto::Welcome,
    /// The shard leader, when the node we reached proxies to another one.
    pub(crate) leader: Option<String>,
}

#[derive(Debug)]
pub(crate) enum OpenError {
    Status(tonic::Status),
    Redirect(String),
    Timeout,
    Protocol(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Status(s) => write!(f, "{}: {}", s.code(), s.message()),
            OpenError::Redirect(a) => write!(f, "redirected to {a}"),
            OpenError::Timeout => f.write_str("no welcome in time"),
            OpenError::Protocol(m) => f.write_str(m),
        }
    }
}

pub(crate) fn message(kind: worker_message::Kind) -> proto::WorkerMessage {
    proto::WorkerMessage { kind: Some(kind) }
}

/// `tls`: leader hints are `https://` addresses.
pub(crate) async fn open(
    channel: BrokerChannel,
    hello: proto::Hello,
    timeout: Duration,
    tls: bool,
) -> Result<Opened, OpenError> {
    tokio::time::timeout(timeout, open_inner(channel, hello, tls)).await.unwrap_or(Err(OpenError::Timeout))
}

async fn open_inner(channel: BrokerChannel, hello: proto::Hello, tls: bool) -> Result<Opened, OpenError> {
    let (tx, rx) = mpsc::unbounded_channel();
    // Queued before the call starts, so `hello` is the first message sent.
    tx.send(message(worker_message::Kind::Hello(hello)))
        .map_err(|_| OpenError::Protocol("request stream closed before hello".to_owned()))?;
    let response =
        WorkerClient::new(channel).connect(UnboundedReceiverStream::new(rx)).await.map_err(OpenError::Status)?;
    let leader = leader_hint(response.metadata(), tls);
    let mut inbound = response.into_inner();
    match inbound.message().await.map_err(OpenError::Status)? {
        Some(proto::BrokerMessage { kind: Some(broker_message::Kind::Welcome(welcome)) }) => {
            Ok(Opened { tx, inbound, welcome, leader })
        }
        Some(proto::BrokerMessage { kind: Some(broker_message::Kind::Redirect(r)) }) => {
            Err(OpenError::Redirect(r.leader_address))
        }
        Some(other) => Err(OpenError::Protocol(format!("expected welcome first, got {:?}", kind_name(&other)))),
        None => Err(OpenError::Protocol("stream ended before welcome".to_owned())),
    }
}

pub(crate) fn kind_name(msg: &proto::BrokerMessage) -> &'static str {
    match &msg.kind {
        Some(broker_message::Kind::Welcome(_)) => "welcome",
        Some(broker_message::Kind::Assign(_)) => "assign",
        Some(broker_message::Kind::Ack(_)) => "ack",
        Some(broker_message::Kind::Revoke(_)) => "revoke",
        Some(broker_message::Kind::Redirect(_)) => "redirect",
        None => "empty message",
    }
}
