//! Wiring: opens storage, starts each shard's Raft group and dispatcher,
//! serves the gRPC services with health and reflection, and shuts down in
//! order (stop accepting, stop Raft, release the log engine).

use std::{collections::BTreeMap, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use gantry_proto::{
    peer::{peer_service_server::PeerServiceServer, shard_service_server::ShardServiceServer},
    v1::{admin_server::AdminServer, jobs_server::JobsServer, worker_server::WorkerServer},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::ServerTlsConfig;

use crate::{
    clock::{Clock, SystemClock},
    cluster,
    config::Config,
    dispatch::{DispatchSettings, Node, ShardNode, route::ShardCommands},
    error::BrokerError,
    format::{header::DataDirFormat, hold::UpgradeHold},
    grpc::{
        MAX_MESSAGE_BYTES, admin::AdminService, auth::AuthLayer, forward::ForwardLayer, jobs::JobsService,
        validate::Limits, worker::WorkerService,
    },
    queue::ShardId,
    raft::{
        GantryNode, PeerChannels, RaftSettings, ShardRaft, log_store, network::PEER_MAX_MESSAGE_BYTES,
        peer_service::PeerService,
    },
    security::Security,
};

/// How often a shard's leader checks whether every member supports a newer
/// format than the shard's.
const FORMAT_RAISE_CHECK: Duration = Duration::from_secs(2);
/// How long a single-node group may take to elect itself.
const LEADERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long replaying the log after the last snapshot may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a leader that shuts down waits for a successor to take over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long in-flight calls may take to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A broker running in this process.
pub struct RunningServer {
    local_addr: SocketAddr,
    peer_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), BrokerError>>,
}

impl RunningServer {
    /// The address the client port is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the peer port is bound to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The address the metrics port is bound to (`None`: metrics are off).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
    let security = Security::load(&config)?;
    let listener = bind(config.listen).await?;
    let peer_listener = bind(config.peer_listen).await?;
    let local_addr = listener.local_addr().map_err(|e| BrokerError::Serve(e.to_string()))?;
    let peer_addr = peer_listener.local_addr().map_err(|e| BrokerError::Serve(e.to_string()))?;
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr().map_err(|e| BrokerError::Serve(e.to_string()))?),
        None => None,
    };
    let advertise = config.advertise.clone().unwrap_or_else(|| local_addr.to_string());
    let peer_advertise = config.peer_advertise.clone().unwrap_or_else(|| peer_addr.to_string());
    security.warn_if_open(local_addr, peer_addr);

    let new_data_dir = !config.data_dir.join("FORMAT").exists() && !config.data_dir.join("raft").exists();
    // Before anything reads the directory: a format this binary does not
    // read is refused here, with nothing changed.
    let data_format = Arc::new(
        DataDirFormat::open(&config.data_dir, config.shards).map_err(|e| BrokerError::Storage(e.to_string()))?,
    );
    let upgrade_hold = Arc::new(UpgradeHold::open(&config.data_dir));
    let raft_dir = config.data_dir.join("raft");
    let engine = log_store::open_engine(&raft_dir).map_err(|e| BrokerError::Storage(engine_refusal(&raft_dir, &e)))?;
    let purge_task = log_store::spawn_purge_task(engine.clone(), Duration::from_secs(10));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let settings = DispatchSettings { heartbeat_interval: config.heartbeat_interval, session_ttl: config.session_ttl };
    let single_node = config.initial_cluster.0.is_empty() && config.join.is_empty();
    let raft_settings = RaftSettings {
        heartbeat_interval: config.raft_heartbeat_interval,
        election_timeout: config.election_timeout,
        snapshot_every_commands: config.snapshot_every,
        may_rebuild_from_peers: !single_node,
        digest_every: config.digest_every,
        data_format: Some(data_format.clone()),
        payload_memory_per_shard: config.payload_memory_bytes / u64::from(config.shards.max(1)),
        ..RaftSettings::default()
    };
    let channels = PeerChannels::new(security.dial.clone());
    let mut shards = Vec::new();
    for shard in (0..config.shards).map(ShardId) {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let raft = ShardRaft::open(
            config.node_id,
            shard,
            engine.clone(),
            &config.data_dir,
            &raft_settings,
            channels.clone(),
            events_tx,
        )
        .await?;
        if new_data_dir && !single_node {
            raft.fence_new_data_dir();
        }
        if single_node {
            let me = GantryNode { client: advertise.clone(), peer: peer_advertise.clone() };
            raft.lift_fence_of_sole_voter();
            raft.initialize(BTreeMap::from([(config.node_id, me)])).await?;
            raft.wait_for_leadership(LEADERSHIP_TIMEOUT).await?;
            // One voter: everything in its log is committed, so reads after
            // a restart see every acknowledged job once this returns.
            raft.wait_caught_up(REPLAY_TIMEOUT).await?;
        }
        let raft = Arc::new(raft);
        raft.spawn_snapshot_policy(raft_settings.snapshot_every_commands, Duration::from_millis(500));
        shards.push(ShardNode::start(
            config.node_id,
            raft,
            events_rx,
            clock.clone(),
            settings.clone(),
            channels.clone(),
            shutdown_rx.clone(),
        ));
    }
    let node = Arc::new(Node {
        node_id: config.node_id,
        advertise,
        peer_advertise: peer_advertise.clone(),
        channels: channels.clone(),
        shards,
        clock,
        settings,
        shutdown: shutdown_rx.clone(),
        upgrade_hold: upgrade_hold.clone(),
    });

    let limits = Limits { max_payload_bytes: config.max_payload_bytes, ..Limits::default() };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(node.clone(), health_reporter));
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

    // The peer port: Raft traffic, the shards' commands and reads from other
    // nodes (ShardService), and the public services for worker streams
    // other nodes forward or relay here.
    let peer_service = PeerService::new(
        config.node_id,
        node.advertise.clone(),
        peer_advertise,
        node.shards.iter().map(|s| s.raft.clone()).collect(),
        upgrade_hold.clone(),
    );
    let peer_router = server_builder(security.peer_tls.as_ref())?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .layer(ForwardLayer::new(node.clone(), channels.clone()))
        .add_service(
            PeerServiceServer::new(peer_service)
                .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES),
        )
        .add_service(
            ShardServiceServer::new(ShardCommands::new(config.node_id, node.shards.clone()))
                .max_decoding_message_size(PEER_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(PEER_MAX_MESSAGE_BYTES),
        )
        .add_service(jobs_server(&node, &limits))
        .add_service(worker_server(&node, &limits))
        .add_service(AdminServer::new(AdminService::new(node.clone())));
    // The peer port outlives the client port: a leader shutting down hands
    // its shards over and must hear from its successor to know the handover
    // finished (else it waits out the handover timeout per shard and hands
    // the other shards to a node it picks blindly). Closed once Raft is
    // down.
    let (peer_stop_tx, peer_stop_rx) = watch::channel(false);
    let mut peer_task = tokio::spawn(serve(peer_router, peer_listener, peer_stop_rx));
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::http::serve(listener, node.clone(), shutdown_rx.clone()));
    }

    if let Some(file) = &security.tokens {
        tokio::spawn(crate::security::watch_token_file(
            file.clone(),
            config.token_reload_interval,
            shutdown_rx.clone(),
        ));
    }
    if !config.initial_cluster.0.is_empty() {
        tokio::spawn(cluster::bootstrap(node.clone(), config.initial_cluster.0.clone(), shutdown_rx.clone()));
    }
    if !config.join.is_empty() {
        tokio::spawn(cluster::join(node.clone(), config.join.clone(), shutdown_rx.clone()));
    }
    if new_data_dir && !single_node {
        tokio::spawn(cluster::verify_new_data_dir(
            node.clone(),
            config.initial_cluster.0.clone(),
            config.join.clone(),
            shutdown_rx.clone(),
        ));
    }
    for shard in &node.shards {
        tokio::spawn(crate::dispatch::integrity::check_replicas(
            shard.clone(),
            config.digest_every,
            shutdown_rx.clone(),
        ));
    }
    for shard in &node.shards {
        tokio::spawn(crate::dispatch::upgrade::raise_formats(
            node.clone(),
            shard.clone(),
            FORMAT_RAISE_CHECK,
            shutdown_rx.clone(),
        ));
    }
    if node.shards.len() > 1 && config.balance_leaders {
        tokio::spawn(cluster::balance_leaders(node.clone(), config.election_timeout, shutdown_rx.clone()));
    }

    let router = server_builder(security.client_tls.as_ref())?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        // Tokens are checked where a call enters the cluster, before it is
        // served or forwarded; the peer port trusts its mTLS peers instead.
        .layer(AuthLayer::new(security.tokens.clone()))
        .layer(ForwardLayer::new(node.clone(), channels))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs_server(&node, &limits))
        .add_service(worker_server(&node, &limits))
        .add_service(AdminServer::new(AdminService::new(node.clone())));
    tracing::info!(%local_addr, %peer_addr, ?metrics_addr, node_id = config.node_id, data_dir = %config.data_dir.display(), "gantry serving");
    let task_node = node.clone();
    let task = tokio::spawn(async move {
        let serving = serve(router, listener, shutdown_rx);
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
        health_task.abort();
        // Each shard led here goes to its most caught-up live voter, all
        // at once: one timeout in all, however many shards.
        let handovers = task_node.shards.iter().map(|s| s.raft.hand_over_leadership(HANDOVER_TIMEOUT));
        futures::future::join_all(handovers).await;
        for shard in &task_node.shards {
            shard.raft.shutdown().await;
        }
        // Raft is down: nothing needs the peer port any more.
        let _ = peer_stop_tx.send(true);
        if tokio::time::timeout(PEER_CLOSE_GRACE, &mut peer_task).await.is_err() {
            peer_task.abort();
        }
        purge_task.abort();
        drop(task_node);
        if let Err(e) = log_store::close_engine(engine, Duration::from_secs(10)).await {
            tracing::warn!(error = %e, "raft engine still in use at shutdown");
        }
        served.map_err(|e| BrokerError::Serve(e.to_string()))
    });
    Ok(RunningServer { local_addr, peer_addr, metrics_addr, node, shutdown: shutdown_tx, task })
}

/// Why the node cannot start on its raft-engine directory, and the way out.
/// raft-engine tolerates damage only at the tail of its newest file (it
/// drops that tail; the storage check of each shard then finds what was
/// lost): an error here means damage elsewhere, in files that hold
/// acknowledged entries of any shard.
fn engine_refusal(dir: &std::path::Path, error: &log_store::StorageError) -> String {
    let dir = dir.display();
    format!(
        "the raft log in {dir} cannot be opened: {error}. Damage in a log file other than the newest cannot be \
         cut off safely: entries this node acknowledged, of any shard, are in those files. This node cannot \
         start on it. Way out, when the other nodes hold a healthy majority of every shard: move the directory \
         aside (mv {dir} {dir}.damaged) and start the node again: each shard's copy is then fenced and rebuilt \
         from its leader (`gantry cluster status` shows it fenced until it is). See docs/storage.md."
    )
}

/// How long the peer port's accept loop waits for calls still in flight
/// once this node's Raft is down (they fail fast by then); after it the
/// loop is dropped, and connections still open end with the process.
const PEER_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A server builder, speaking TLS when `tls` is set.
fn server_builder(tls: Option<&ServerTlsConfig>) -> Result<tonic::transport::Server, BrokerError> {
    let builder = tonic::transport::Server::builder();
    match tls {
        Some(tls) => builder.tls_config(tls.clone()).map_err(|e| BrokerError::Serve(format!("TLS: {e}"))),
        None => Ok(builder),
    }
}

async fn bind(address: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(address).await.map_err(|source| BrokerError::Listen { address: address.to_string(), source })
}

fn jobs_server(node: &Arc<Node>, limits: &Limits) -> JobsServer<JobsService> {
    JobsServer::new(JobsService::new(node.clone(), limits.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn worker_server(node: &Arc<Node>, limits: &Limits) -> WorkerServer<WorkerService> {
    WorkerServer::new(WorkerService::new(node.clone(), limits.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

async fn serve<L>(
    router: tonic::transport::server::Router<L>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error>
where
    L: tower::Layer<tonic::service::Routes> + Clone,
    L::Service: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    // Without TCP_NODELAY, Nagle and delayed ACKs add up to 40 ms to small
    // messages such as acks and assignments.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// The public services are SERVING while this node knows a leader for its
/// shards (it can answer or forward), NOT_SERVING otherwise. The overall
/// status ("") stays SERVING while the process runs: a liveness signal.
async fn report_health(node: Arc<Node>, reporter: tonic_health::server::HealthReporter) {
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let mut last = None;
    let mut refusals_in_a_row = 0u32;
    loop {
        for shard in &node.shards {
            // Lifts the vote barrier of a node that lost acknowledged entries
            // once the leader has replicated them again.
            let _ = shard.raft.may_vote();
        }
        let refused = crate::metrics::http::not_ready_reason(&node).is_some();
        refusals_in_a_row = if refused { refusals_in_a_row + 1 } else { 0 };
        // Serving again at once; out of service only after two looks in a
        // row, so one unlucky sample (a leader changing hands) does not
        // drop the node from every client's balancer.
        let ready = match last {
            Some(true) => refusals_in_a_row < 2,
            _ => !refused,
        };
        if last != Some(ready) {
            let status =
                if ready { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            reporter.set_service_status(JOBS_SERVICE, status).await;
            reporter.set_service_status(WORKER_SERVICE, status).await;
            reporter.set_service_status(ADMIN_SERVICE, status).await;
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const JOBS_SERVICE: &str = "gantry.v1.Jobs";
const WORKER_SERVICE: &str = "gantry.v1.Worker";
const ADMIN_SERVICE: &str = "gantry.v1.Admin";
