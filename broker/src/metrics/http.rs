//! The metrics port: plain HTTP/1.1 (hyper), three read-only paths.
//!
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 when this node knows a leader for every shard (it
//!   can answer or forward) that reached it within twice the election
//!   timeout and, for the shards it leads, a quorum answered within that;
//!   503 with a one-line reason otherwise: the rule of the gRPC health of
//!   the public services (which goes NOT_SERVING after two looks in a row).
//!
//! Never TLS: it serves no job data, and kubelet's HTTP probes use it when
//! the gRPC ports speak TLS. Bind it to a private address.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::dispatch::Node;

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `shutdown` turns true.
pub async fn serve(listener: TcpListener, node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stopped(&mut shutdown) => return,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let stream = tokio::select! {
            () = stopped(&mut shutdown) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(error = %e, "metrics port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        let mut stopping = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&node, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A scraper's keep-alive connection must not hold the node (and
            // its storage) past shutdown.
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(error = %e, "metrics connection");
                },
                () = stopped(&mut stopping) => {}
            }
            drop(permit);
        });
    }
}

/// Resolves once shutdown began (or the sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn respond<B>(node: &Node, request: &Request<B>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, super::exposition::render(node));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match not_ready_reason(node) {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

/// Why this node cannot serve the public API now, if it cannot.
pub fn not_ready_reason(node: &Node) -> Option<String> {
    if *node.shutdown.borrow() {
        return Some("shutting down".into());
    }
    let leaderless: Vec<String> =
        node.shards.iter().filter(|s| s.raft.leader().is_none()).map(|s| s.raft.shard().to_string()).collect();
    match leaderless.len() {
        0 => {}
        1 => return Some(format!("shard {} has no known leader (election in progress or no quorum)", leaderless[0])),
        _ => {
            return Some(format!(
                "shards {} have no known leader (election in progress or no quorum)",
                leaderless.join(", ")
            ));
        }
    }
    if let Some((shard, reason)) = node.shards.iter().find_map(|s| s.raft.fenced().map(|why| (s.raft.shard(), why))) {
        return Some(format!("this node's copy of shard {shard} is fenced: {reason}"));
    }
    if let Some((shard, leader, silent)) = node
        .shards
        .iter()
        .find_map(|s| s.raft.leader_silent_for().map(|(leader, silent)| (s.raft.shard(), leader, silent)))
    {
        return Some(format!(
            "shard {shard}: its leader, node {leader}, has not reached this node for {} ms (down, or cut off from it)",
            silent.as_millis()
        ));
    }
    node.shards.iter().find_map(|s| {
        let silent = s.raft.quorum_silent_for()?;
        Some(format!(
            "this node leads shard {} but no quorum of its voters has answered for {} ms (cut off, or most voters \
             down): it can commit nothing",
            s.raft.shard(),
            silent.as_millis()
        ))
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
