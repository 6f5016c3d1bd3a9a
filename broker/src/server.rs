//! Wiring: opens storage, starts each shard's Raft group and dispatcher,
//! serves the gRPC services with health and reflection, and shuts down in
//! order (stop accepting, stop Raft, release the log engine).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use gantry_proto::v1::{admin_server::AdminServer, jobs_server::JobsServer, worker_server::WorkerServer};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    clock::{Clock, SystemClock},
    config::Config,
    dispatch::{DispatchSettings, Node, ShardNode},
    error::BrokerError,
    grpc::{admin::AdminService, jobs::JobsService, validate::Limits, worker::WorkerService},
    queue::ShardId,
    raft::{RaftSettings, ShardRaft, log_store},
};

/// How long a fresh single-node group may take to elect itself.
const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long replaying the log after the last snapshot may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest gRPC message accepted: a full batch of maximal payloads is refused
/// by validation with a clear message, not by the transport.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How long in-flight calls may take to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A broker running in this process.
pub struct RunningServer {
    local_addr: SocketAddr,
    node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), BrokerError>>,
}

impl RunningServer {
    /// The address the client port is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Stops serving, shuts Raft down and waits until storage is released.
    pub async fn shutdown(self) -> Result<(), BrokerError> {
        let _ = self.shutdown.send(true);
        self.task.await.map_err(|e| BrokerError::Serve(e.to_string()))?
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), BrokerError> {
    let server = start(config).await?;
    shutdown.await;
    server.shutdown().await
}

pub async fn start(config: Config) -> Result<RunningServer, BrokerError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<RunningServer, BrokerError> {
    config.validate()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| BrokerError::Listen { address: config.listen.to_string(), source })?;
    let local_addr = listener.local_addr().map_err(|e| BrokerError::Serve(e.to_string()))?;
    let advertise = config.advertise.clone().unwrap_or_else(|| local_addr.to_string());
    if !local_addr.ip().is_loopback() {
        tracing::warn!(%local_addr, "listening beyond loopback WITHOUT authentication or TLS: anyone who can reach this port can enqueue, take and administer jobs");
    }

    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| BrokerError::Storage(format!("{}: {e}", config.data_dir.display())))?;
    let engine =
        log_store::open_engine(&config.data_dir.join("raft")).map_err(|e| BrokerError::Storage(e.to_string()))?;
    let purge_task = log_store::spawn_purge_task(engine.clone(), Duration::from_secs(10));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let settings = DispatchSettings { heartbeat_interval: config.heartbeat_interval, session_ttl: config.session_ttl };
    let raft_settings = RaftSettings {
        heartbeat_interval: config.election_timeout / 10,
        election_timeout: config.election_timeout,
        snapshot_every_commands: config.snapshot_every,
        ..RaftSettings::default()
    };
    let mut shards = Vec::new();
    for shard in (0..config.shards).map(ShardId) {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let raft =
            ShardRaft::open(config.node_id, shard, engine.clone(), &config.data_dir, &raft_settings, events_tx).await?;
        raft.bootstrap_single(config.node_id, &advertise).await?;
        raft.wait_for_leadership(LEADERSHIP_TIMEOUT).await?;
        raft.wait_caught_up(REPLAY_TIMEOUT).await?;
        let raft = Arc::new(raft);
        raft.spawn_snapshot_policy(raft_settings.snapshot_every_commands, Duration::from_millis(500));
        shards.push(ShardNode::start(raft, events_rx, clock.clone(), settings.clone(), shutdown_rx.clone()));
    }
    let node =
        Arc::new(Node { node_id: config.node_id, advertise, shards, clock, settings, shutdown: shutdown_rx.clone() });

    let limits = Limits { max_payload_bytes: config.max_payload_bytes, ..Limits::default() };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobsServer<JobsService>>().await;
    health_reporter.set_serving::<WorkerServer<WorkerService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gantry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::Serve(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gantry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| BrokerError::Serve(e.to_string()))?;

    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            JobsServer::new(JobsService::new(node.clone(), limits.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            WorkerServer::new(WorkerService::new(node.clone(), limits.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AdminServer::new(AdminService::new(node.clone())));
    let mut serve_shutdown = shutdown_rx.clone();
    let task_node = node.clone();
    tracing::info!(%local_addr, node_id = config.node_id, data_dir = %config.data_dir.display(), "gantry serving");
    let task = tokio::spawn(async move {
        // Without TCP_NODELAY, Nagle and delayed ACKs add up to 40 ms to small
        // messages such as acks and assignments.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let serving = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = serve_shutdown.wait_for(|stop| *stop).await;
        });
        tokio::pin!(serving);
        // Streams end on shutdown by themselves; a client that ignores that
        // must not hold the node up forever.
        let mut stopping = task_node.shutdown.clone();
        let served = tokio::select! {
            served = &mut serving => served,
            _ = async {
                let _ = stopping.wait_for(|stop| *stop).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them");
                Ok(())
            }
        };
        for shard in &task_node.shards {
            shard.raft.shutdown().await;
        }
        purge_task.abort();
        drop(task_node);
        if let Err(e) = log_store::close_engine(engine, Duration::from_secs(10)).await {
            tracing::warn!(error = %e, "raft engine still in use at shutdown");
        }
        served.map_err(|e| BrokerError::Serve(e.to_string()))
    });
    Ok(RunningServer { local_addr, node, shutdown: shutdown_tx, task })
}
