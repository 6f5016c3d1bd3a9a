//! `gantry queues`, `gantry workers`, `gantry cluster status`.

use clap::{Args, Subcommand};
use std::time::Duration;

use gantry_worker::{BrokerChannel, proto, proto::admin_client::AdminClient};
use serde::Serialize;

use super::ClientArgs;
use super::output::{Fields, Table, duration_ms, fmt_proto_duration, print_json};

#[derive(Args, Debug, Clone)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Without a subcommand: list every queue.
    #[command(subcommand)]
    pub command: Option<QueuesCommand>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum QueuesCommand {
    /// Every queue (the default).
    List,
    /// One queue: counts per state and its effective configuration.
    Get { queue: String },
    /// Stop dispatching the queue's jobs (enqueues are still accepted).
    Pause { queue: String },
    /// Dispatch the queue's jobs again.
    Resume { queue: String },
}

#[derive(Args, Debug, Clone)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCommand {
    /// Nodes, and per shard: leader, term, commit/applied/last-log/snapshot index.
    Status {
        /// This node's own view of every shard (its role, indexes, fence and
        /// state digest), not the shard-0 leader's.
        #[arg(long)]
        local: bool,
    },
    /// Add a node (it joins as a learner, catches up, becomes a voter).
    AddNode {
        #[arg(long)]
        node_id: u64,
        /// The new node's peer address (host:port of its --peer-advertise).
        #[arg(long)]
        peer_address: String,
    },
    /// Remove a node from the cluster (--node-id), or every member whose id
    /// is above N (--above N, highest first): what a StatefulSet scaled down
    /// to N pods needs before its pods go.
    RemoveNode {
        #[arg(long, required_unless_present = "above", conflicts_with = "above")]
        node_id: Option<u64>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        above: Option<u64>,
    },
    /// Hand a shard's leadership to another voter (shard 0 unless named).
    TransferLeader {
        #[arg(long, default_value_t = 0)]
        shard: u32,
        #[arg(long)]
        node_id: u64,
    },
    /// Drop one node's copy of a shard and rebuild it from the shard's
    /// leader: for a fenced or suspect copy, and for a shard that cannot
    /// elect a leader because most of its copies are fenced (rebuild the
    /// most damaged one). Refused for a healthy copy when that would leave
    /// fewer than a majority of the shard's voters healthy.
    Rebuild {
        /// The node whose copy is rebuilt.
        #[arg(long = "node")]
        node_id: u64,
        #[arg(long)]
        shard: u32,
    },
    /// Storage formats across an upgrade (docs/compatibility.md).
    Upgrade {
        #[command(subcommand)]
        action: UpgradeAction,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum UpgradeAction {
    /// The formats each node supports, whether it holds, each shard's
    /// format and what keeps it from being raised.
    Status,
    /// Keep every shard at its format (a rollback to the previous release
    /// stays possible) until `finalize`.
    Hold,
    /// Lift the hold everywhere and wait until the shards are raised.
    Finalize,
}

#[derive(Debug, Serialize)]
struct UpgradeJson {
    newest_format: u32,
    nodes: Vec<UpgradeNodeJson>,
    shards: Vec<UpgradeShardJson>,
}

#[derive(Debug, Serialize)]
struct UpgradeNodeJson {
    node_id: u64,
    version: String,
    format_min: u32,
    format_max: u32,
    held: bool,
    error: String,
}

#[derive(Debug, Serialize)]
struct UpgradeShardJson {
    shard: u32,
    format: u32,
    leader_id: u64,
    blocked: String,
}

pub fn render_upgrade(status: &proto::UpgradeStatusResponse) -> String {
    let mut out = String::from("nodes:\n");
    let mut nodes = Table::new(&[">NODE", "VERSION", "FORMATS", "HELD", "ERROR"]);
    for n in &status.nodes {
        let (version, formats) = match (n.error.is_empty(), n.version.is_empty()) {
            (false, _) => ("?".to_owned(), "?".to_owned()),
            (true, true) => ("before format gates".to_owned(), "0".to_owned()),
            (true, false) => (n.version.clone(), format!("{}..{}", n.format_min, n.format_max)),
        };
        let held = if n.held { "yes" } else { "no" };
        nodes.row(vec![n.node_id.to_string(), version, formats, held.to_owned(), n.error.clone()]);
    }
    out.push_str(&nodes.render());
    out.push_str("\nshards:\n");
    let mut shards = Table::new(&[">SHARD", ">FORMAT", ">LEADER", "NOT RAISED BECAUSE"]);
    for s in &status.shards {
        let blocked = if s.blocked.is_empty() { "-".to_owned() } else { s.blocked.clone() };
        shards.row(vec![s.shard.to_string(), s.format.to_string(), s.leader_id.to_string(), blocked]);
    }
    out.push_str(&shards.render());
    out
}

async fn upgrade(admin: &mut AdminClient<BrokerChannel>, action: UpgradeAction, json: bool) -> anyhow::Result<()> {
    let status = match action {
        UpgradeAction::Status => admin.upgrade_status(proto::UpgradeStatusRequest {}).await?,
        UpgradeAction::Hold => admin.hold_upgrade(proto::HoldUpgradeRequest {}).await?,
        UpgradeAction::Finalize => admin.finalize_upgrade(proto::FinalizeUpgradeRequest {}).await?,
    }
    .into_inner();
    if json {
        return print_json(&UpgradeJson {
            newest_format: status.newest_format,
            nodes: status
                .nodes
                .iter()
                .map(|n| UpgradeNodeJson {
                    node_id: n.node_id,
                    version: n.version.clone(),
                    format_min: n.format_min,
                    format_max: n.format_max,
                    held: n.held,
                    error: n.error.clone(),
                })
                .collect(),
            shards: status
                .shards
                .iter()
                .map(|s| UpgradeShardJson {
                    shard: s.shard,
                    format: s.format,
                    leader_id: s.leader_id,
                    blocked: s.blocked.clone(),
                })
                .collect(),
        });
    }
    print!("{}", render_upgrade(&status));
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct QueueConfigJson {
    max_attempts: Option<u32>,
    lease_timeout_ms: Option<u64>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    retention_ms: Option<u64>,
    concurrency_limit: Option<u32>,
    rate_limit: Option<u32>,
    max_depth: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct QueueJson {
    queue: String,
    shard: u32,
    scheduled: u64,
    ready: u64,
    active: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    oldest_ready_age_ms: Option<u64>,
    paused: bool,
    config: Option<QueueConfigJson>,
}

impl QueueJson {
    pub fn new(q: &proto::QueueInfo) -> QueueJson {
        QueueJson {
            queue: q.queue.clone(),
            shard: q.shard,
            scheduled: q.scheduled,
            ready: q.ready,
            active: q.active,
            succeeded: q.succeeded,
            failed: q.failed,
            cancelled: q.cancelled,
            oldest_ready_age_ms: duration_ms(q.oldest_ready_age.as_ref()),
            paused: q.paused,
            config: q.config.as_ref().map(|c| QueueConfigJson {
                max_attempts: c.max_attempts,
                lease_timeout_ms: duration_ms(c.lease_timeout.as_ref()),
                backoff_base_ms: duration_ms(c.backoff_base.as_ref()),
                backoff_max_ms: duration_ms(c.backoff_max.as_ref()),
                retention_ms: duration_ms(c.retention.as_ref()),
                concurrency_limit: c.concurrency_limit,
                rate_limit: c.rate_limit,
                max_depth: c.max_depth,
            }),
        }
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_owned())
}

/// `0` of a limit means "no limit".
fn limit<T: ToString + PartialEq + Default>(v: Option<T>) -> String {
    match v {
        Some(v) if v == T::default() => "none".to_owned(),
        v => opt(v),
    }
}

pub fn queues_table(queues: &[proto::QueueInfo]) -> String {
    let mut t = Table::new(&[
        "QUEUE",
        ">SHARD",
        ">SCHEDULED",
        ">READY",
        ">ACTIVE",
        ">SUCCEEDED",
        ">FAILED",
        ">CANCELLED",
        ">OLDEST READY",
        "PAUSED",
    ]);
    for q in queues {
        t.row(vec![
            q.queue.clone(),
            q.shard.to_string(),
            q.scheduled.to_string(),
            q.ready.to_string(),
            q.active.to_string(),
            q.succeeded.to_string(),
            q.failed.to_string(),
            q.cancelled.to_string(),
            fmt_proto_duration(q.oldest_ready_age.as_ref()),
            yes_no(q.paused),
        ]);
    }
    t.render()
}

pub fn render_queue(q: &proto::QueueInfo) -> String {
    let mut f = Fields::default();
    f.add("queue", &q.queue);
    f.add("shard", q.shard.to_string());
    f.add("paused", yes_no(q.paused));
    f.add("scheduled", q.scheduled.to_string());
    f.add("ready", q.ready.to_string());
    f.add("active", q.active.to_string());
    f.add("succeeded", q.succeeded.to_string());
    f.add("failed", q.failed.to_string());
    f.add("cancelled", q.cancelled.to_string());
    f.add("oldest ready", fmt_proto_duration(q.oldest_ready_age.as_ref()));
    if let Some(c) = &q.config {
        f.add("max attempts", opt(c.max_attempts));
        f.add("lease timeout", fmt_proto_duration(c.lease_timeout.as_ref()));
        f.add(
            "backoff",
            format!(
                "{} .. {}",
                fmt_proto_duration(c.backoff_base.as_ref()),
                fmt_proto_duration(c.backoff_max.as_ref())
            ),
        );
        f.add("retention", fmt_proto_duration(c.retention.as_ref()));
        f.add("concurrency limit", limit(c.concurrency_limit));
        let rate = match c.rate_limit {
            Some(0) => "none".to_owned(),
            Some(r) => format!("{r}/s"),
            None => "-".to_owned(),
        };
        f.add("rate limit", rate);
        f.add("max depth", limit(c.max_depth));
    }
    f.render()
}

pub async fn queues(args: QueuesArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let mut admin = client.admin();
    let json = args.client.json;
    let info = match args.command.unwrap_or(QueuesCommand::List) {
        QueuesCommand::List => {
            let mut queues = admin.list_queues(proto::ListQueuesRequest {}).await?.into_inner().queues;
            queues.sort_by(|a, b| a.queue.cmp(&b.queue));
            if json {
                return print_json(&queues.iter().map(QueueJson::new).collect::<Vec<_>>());
            }
            if queues.is_empty() {
                println!("no queues");
            } else {
                print!("{}", queues_table(&queues));
            }
            return Ok(());
        }
        QueuesCommand::Get { queue } => admin.get_queue(proto::GetQueueRequest { queue }).await?,
        QueuesCommand::Pause { queue } => admin.pause_queue(proto::PauseQueueRequest { queue }).await?,
        QueuesCommand::Resume { queue } => admin.resume_queue(proto::ResumeQueueRequest { queue }).await?,
    }
    .into_inner();
    if json {
        print_json(&QueueJson::new(&info))
    } else {
        print!("{}", render_queue(&info));
        Ok(())
    }
}

#[derive(Debug, Serialize)]
pub struct WorkerJson {
    session_id: String,
    worker_id: String,
    queues: Vec<String>,
    in_flight: u32,
    max_in_flight: u32,
    last_heartbeat_age_ms: Option<u64>,
    connected: bool,
    draining: bool,
}

pub fn workers_table(workers: &[proto::WorkerInfo]) -> String {
    let mut t = Table::new(&["SESSION", "WORKER", "QUEUES", ">IN-FLIGHT", ">LAST HEARTBEAT", "CONNECTED"]);
    for w in workers {
        t.row(vec![
            w.session_id.clone(),
            w.worker_id.clone(),
            w.queues.join(","),
            if w.draining {
                format!("{} draining", w.in_flight)
            } else {
                format!("{}/{}", w.in_flight, w.max_in_flight)
            },
            match w.last_heartbeat_age.as_ref() {
                Some(_) => format!("{} ago", fmt_proto_duration(w.last_heartbeat_age.as_ref())),
                None => "-".to_owned(),
            },
            yes_no(w.connected),
        ]);
    }
    t.render()
}

pub async fn workers(args: WorkersArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let workers = client.admin().list_workers(proto::ListWorkersRequest {}).await?.into_inner().workers;
    if args.client.json {
        let out: Vec<WorkerJson> = workers
            .iter()
            .map(|w| WorkerJson {
                session_id: w.session_id.clone(),
                worker_id: w.worker_id.clone(),
                queues: w.queues.clone(),
                in_flight: w.in_flight,
                max_in_flight: w.max_in_flight,
                last_heartbeat_age_ms: duration_ms(w.last_heartbeat_age.as_ref()),
                connected: w.connected,
                draining: w.draining,
            })
            .collect();
        return print_json(&out);
    }
    if workers.is_empty() {
        println!("no worker sessions");
    } else {
        print!("{}", workers_table(&workers));
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct NodeJson {
    node_id: u64,
    address: String,
    peer_address: String,
    role: String,
    replication_lag: Option<u64>,
    last_heard_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ShardJson {
    shard: u32,
    leader_id: u64,
    leader_address: String,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    last_log_index: u64,
    snapshot_index: u64,
    role: String,
    voters: Vec<u64>,
    fenced: String,
    digest_index: u64,
    state_digest: String,
}

#[derive(Debug, Serialize)]
struct ClusterJson {
    node_id: u64,
    nodes: Vec<NodeJson>,
    shards: Vec<ShardJson>,
}

pub fn render_cluster(status: &proto::ClusterStatusResponse) -> String {
    let mut out = format!("answered by node {}\n\nnodes:\n", status.node_id);
    let mut nodes = Table::new(&[">NODE", "ADDRESS", "PEER ADDRESS", "ROLE", ">LAG", ">HEARD"]);
    for n in &status.nodes {
        let me = if n.node_id == status.node_id { " (this node)" } else { "" };
        let lag = n.replication_lag.map_or_else(|| "-".to_owned(), |l| l.to_string());
        let heard = n.last_heard_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms ago"));
        nodes.row(vec![
            n.node_id.to_string(),
            n.address.clone(),
            n.peer_address.clone(),
            format!("{}{me}", n.role),
            lag,
            heard,
        ]);
    }
    out.push_str(&nodes.render());
    out.push_str("\nshards:\n");
    let mut shards = Table::new(&[
        ">SHARD",
        "LEADER",
        ">TERM",
        ">COMMIT",
        ">APPLIED",
        ">LAST LOG",
        ">SNAPSHOT",
        "ROLE",
        "VOTERS",
        "DIGEST",
    ]);
    for s in &status.shards {
        let leader = match (s.leader_id, s.leader_address.as_str()) {
            (0, _) => "none".to_owned(),
            (id, "") => id.to_string(),
            (id, addr) => format!("{id} ({addr})"),
        };
        shards.row(vec![
            s.shard.to_string(),
            leader,
            s.term.to_string(),
            s.commit_index.to_string(),
            s.applied_index.to_string(),
            s.last_log_index.to_string(),
            s.snapshot_index.to_string(),
            if s.fenced.is_empty() { s.role.clone() } else { format!("{} FENCED", s.role) },
            s.voters.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            match s.digest_index {
                0 => "-".to_owned(),
                index => format!("{}@{index}", s.state_digest.get(..8).unwrap_or(&s.state_digest)),
            },
        ]);
    }
    out.push_str(&shards.render());
    for s in status.shards.iter().filter(|s| !s.fenced.is_empty()) {
        out.push_str(&format!("\nshard {} is FENCED on node {}: {}\n", s.shard, status.node_id, s.fenced));
    }
    out
}

/// Removes the members with ids above `keep`, highest first, one committed
/// membership change at a time. Removing the leader costs an election, so
/// UNAVAILABLE (no leader yet) is waited out for a while.
async fn remove_nodes_above(
    admin: &mut AdminClient<BrokerChannel>,
    keep: u64,
) -> anyhow::Result<proto::ClusterStatusResponse> {
    const ELECTION_PATIENCE: Duration = Duration::from_secs(30);
    let mut status = admin.cluster_status(proto::ClusterStatusRequest::default()).await?.into_inner();
    let mut doomed: Vec<u64> = status.nodes.iter().map(|n| n.node_id).filter(|id| *id > keep).collect();
    doomed.sort_unstable_by(|a, b| b.cmp(a));
    if doomed.is_empty() {
        eprintln!("no member has an id above {keep}: nothing to remove");
    }
    for node_id in doomed {
        let deadline = tokio::time::Instant::now() + ELECTION_PATIENCE;
        status = loop {
            match admin.remove_node(proto::RemoveNodeRequest { node_id }).await {
                Ok(answer) => break answer.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("removing node {node_id}: {e}")),
            }
        };
        eprintln!("removed node {node_id}");
    }
    Ok(status)
}

pub async fn cluster(client_args: ClientArgs, command: ClusterCommand) -> anyhow::Result<()> {
    let client = client_args.connect().await?;
    let mut admin = client.admin();
    if let ClusterCommand::Upgrade { action } = command {
        return upgrade(&mut admin, action, client_args.json).await;
    }
    let status = match command {
        ClusterCommand::Upgrade { .. } => unreachable!("answered above"),
        ClusterCommand::Status { local } => admin.cluster_status(proto::ClusterStatusRequest { local }).await?,
        ClusterCommand::AddNode { node_id, peer_address } => {
            admin.add_node(proto::AddNodeRequest { node_id, address: peer_address }).await?
        }
        ClusterCommand::RemoveNode { node_id: Some(node_id), .. } => {
            admin.remove_node(proto::RemoveNodeRequest { node_id }).await?
        }
        ClusterCommand::RemoveNode { node_id: None, above } => {
            tonic::Response::new(remove_nodes_above(&mut admin, above.unwrap_or(u64::MAX)).await?)
        }
        ClusterCommand::TransferLeader { shard, node_id } => {
            admin.transfer_leader(proto::TransferLeaderRequest { shard, node_id }).await?
        }
        ClusterCommand::Rebuild { node_id, shard } => {
            admin.rebuild_replica(proto::RebuildReplicaRequest { node_id, shard }).await?
        }
    }
    .into_inner();
    if client_args.json {
        return print_json(&ClusterJson {
            node_id: status.node_id,
            nodes: status
                .nodes
                .iter()
                .map(|n| NodeJson {
                    node_id: n.node_id,
                    address: n.address.clone(),
                    peer_address: n.peer_address.clone(),
                    role: n.role.clone(),
                    replication_lag: n.replication_lag,
                    last_heard_ms: n.last_heard_ms,
                })
                .collect(),
            shards: status
                .shards
                .iter()
                .map(|s| ShardJson {
                    shard: s.shard,
                    leader_id: s.leader_id,
                    leader_address: s.leader_address.clone(),
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    last_log_index: s.last_log_index,
                    snapshot_index: s.snapshot_index,
                    role: s.role.clone(),
                    voters: s.voters.clone(),
                    fenced: s.fenced.clone(),
                    digest_index: s.digest_index,
                    state_digest: s.state_digest.clone(),
                })
                .collect(),
        });
    }
    print!("{}", render_cluster(&status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use gantry_worker::prost_types;

    use super::*;

    #[test]
    fn queue_table() {
        let q = proto::QueueInfo {
            queue: "emails".into(),
            shard: 0,
            ready: 12,
            succeeded: 3400,
            oldest_ready_age: Some(prost_types::Duration { seconds: 2, nanos: 500_000_000 }),
            paused: true,
            ..Default::default()
        };
        let text = queues_table(std::slice::from_ref(&q));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "QUEUE   SHARD  SCHEDULED  READY  ACTIVE  SUCCEEDED  FAILED  CANCELLED  OLDEST READY  PAUSED"
        );
        assert_eq!(
            lines[1],
            "emails      0          0     12       0       3400       0          0          2.5s  yes"
        );
        let json = serde_json::to_value(QueueJson::new(&q)).unwrap();
        assert_eq!(json["oldest_ready_age_ms"], 2500);
        assert_eq!(json["paused"], true);
    }

    #[test]
    fn queue_detail_shows_limits() {
        let q = proto::QueueInfo {
            queue: "q".into(),
            config: Some(proto::QueueConfig {
                max_attempts: Some(25),
                lease_timeout: Some(prost_types::Duration { seconds: 300, nanos: 0 }),
                concurrency_limit: Some(0),
                rate_limit: Some(50),
                max_depth: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render_queue(&q);
        assert!(text.contains("max attempts:      25\n"), "{text}");
        assert!(text.contains("lease timeout:     5m00s\n"), "{text}");
        assert!(text.contains("concurrency limit: none\n"), "{text}");
        assert!(text.contains("rate limit:        50/s\n"), "{text}");
        assert!(text.contains("max depth:         none\n"), "{text}");
    }

    #[test]
    fn worker_table() {
        let w = proto::WorkerInfo {
            session_id: "s-1".into(),
            worker_id: "host-42".into(),
            queues: vec!["a".into(), "b".into()],
            max_in_flight: 32,
            in_flight: 3,
            last_heartbeat_age: Some(prost_types::Duration { seconds: 0, nanos: 400_000_000 }),
            connected: true,
            draining: false,
        };
        let stopping = proto::WorkerInfo {
            session_id: "s-2".into(),
            max_in_flight: 0,
            in_flight: 1,
            draining: true,
            last_heartbeat_age: None,
            ..w.clone()
        };
        let text = workers_table(&[w, stopping]);
        assert_eq!(
            text,
            "SESSION  WORKER   QUEUES   IN-FLIGHT  LAST HEARTBEAT  CONNECTED\n\
             s-1      host-42  a,b           3/32     400.0ms ago  yes\n\
             s-2      host-42  a,b     1 draining               -  yes\n"
        );
    }

    #[test]
    fn cluster_rendering() {
        let status = proto::ClusterStatusResponse {
            node_id: 1,
            nodes: vec![proto::NodeInfo {
                node_id: 1,
                address: "127.0.0.1:50051".into(),
                role: "voter".into(),
                ..Default::default()
            }],
            shards: vec![proto::ShardStatus {
                shard: 0,
                leader_id: 1,
                leader_address: "127.0.0.1:50051".into(),
                term: 3,
                commit_index: 10,
                applied_index: 10,
                last_log_index: 11,
                snapshot_index: 0,
                role: "leader".into(),
                voters: vec![1],
                ..Default::default()
            }],
        };
        let text = render_cluster(&status);
        assert!(text.starts_with("answered by node 1\n"), "{text}");
        assert!(text.contains("voter (this node)"), "{text}");
        let mut followed = status.clone();
        followed.nodes[0].last_heard_ms = Some(40);
        assert!(render_cluster(&followed).contains("40 ms ago"), "{}", render_cluster(&followed));
        assert!(text.contains("1 (127.0.0.1:50051)"), "{text}");
        let mut fenced = status.clone();
        fenced.shards[0].role = "follower".into();
        fenced.shards[0].fenced = "the log ends at index 9 but this node had acknowledged entries up to 12".into();
        fenced.shards[0].digest_index = 10;
        fenced.shards[0].state_digest = "0123456789abcdef".into();
        let text = render_cluster(&fenced);
        assert!(text.contains("follower FENCED"), "{text}");
        assert!(text.contains("01234567@10"), "{text}");
        assert!(text.contains("shard 0 is FENCED on node 1: the log ends at index 9"), "{text}");
    }
}
