//! `gantry.v1.Admin`: what an operator runs with grpcurl or `gantry`.

use std::sync::Arc;

use gantry_proto::v1::{self as proto, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::{
    convert,
    jobs::{linearizable, propose_for_job, shard_of},
    status, validate,
};
use crate::{
    dispatch::{Node, ShardNode, registry::LiveInfo, route::ShardChange},
    queue::{Applied, Command, ExpiryReason, JobId},
    raft::ProposeError,
};

/// Index entries one purge part examines: a part's apply stays short (a few
/// ms) whatever the queue's size.
const PURGE_PART_LIMIT: u32 = 4096;

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }

    /// The leader knows every member's replication; a follower asks it, and
    /// answers with its own view when there is no reachable leader.
    async fn cluster_view(&self) -> proto::ClusterStatusResponse {
        let shard = &self.node.shards[0];
        if !shard.raft.is_leader()
            && let Some((leader_id, leader)) = shard.raft.leader().filter(|(id, _)| *id != self.node.node_id)
        {
            match self.leader_cluster_status(&leader.peer).await {
                Ok(status) => return status,
                Err(e) => tracing::debug!(leader = leader_id, error = %e, "leader's cluster status unavailable"),
            }
        }
        self.local_cluster_status()
    }

    async fn leader_cluster_status(&self, leader_peer: &str) -> Result<proto::ClusterStatusResponse, String> {
        let channel = self.node.channels.channel(leader_peer)?;
        let mut request = Request::new(proto::ClusterStatusRequest::default());
        request.set_timeout(std::time::Duration::from_secs(2));
        proto::admin_client::AdminClient::new(channel)
            .cluster_status(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string())
    }

    /// This node's view of the cluster; with replication progress when it
    /// leads shard 0.
    fn local_cluster_status(&self) -> proto::ClusterStatusResponse {
        let mut nodes = std::collections::BTreeMap::new();
        let shards = self
            .node
            .shards
            .iter()
            .map(|shard| {
                let s = shard.raft.status();
                for (id, member) in &s.nodes {
                    let role = if s.voters.contains(id) { "voter" } else { "learner" };
                    let progress = s.replication.as_ref().and_then(|r| r.get(id));
                    let matched = progress.and_then(|p| p.matched_index);
                    nodes.entry(*id).or_insert(proto::NodeInfo {
                        node_id: *id,
                        address: member.client.clone(),
                        role: role.into(),
                        peer_address: member.peer.clone(),
                        replication_lag: progress.map(|_| s.last_log_index.saturating_sub(matched.unwrap_or(0))),
                        matched_index: matched,
                        last_heard_ms: progress
                            .and_then(|p| p.last_heard)
                            .filter(|_| *id != self.node.node_id)
                            .map(|ago| u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)),
                    });
                }
                proto::ShardStatus {
                    shard: s.shard.0,
                    leader_id: s.leader_id.unwrap_or(0),
                    leader_address: s.leader_address.unwrap_or_default(),
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    last_log_index: s.last_log_index,
                    snapshot_index: s.snapshot_index,
                    role: s.role.into(),
                    voters: s.voters,
                    fenced: s.fenced.unwrap_or_default(),
                    digest_index: s.digest.map_or(0, |d| d.index),
                    state_digest: s.digest.map(|d| d.to_hex()).unwrap_or_default(),
                }
            })
            .collect();
        proto::ClusterStatusResponse { node_id: self.node.node_id, nodes: nodes.into_values().collect(), shards }
    }

    fn queue_info(&self, name: &str) -> Result<proto::QueueInfo, Status> {
        let shard = self.node.shard_for_queue(name);
        let now = self.node.clock.now_ms();
        let applied = shard.raft.state().read();
        let queue = applied.queue.queue(name).ok_or_else(|| Status::not_found(format!("queue {name:?} not found")))?;
        let oldest = queue.oldest_due_run_at_ms(now).map(|t| now.saturating_sub(t));
        Ok(convert::queue_info(name, shard.raft.shard(), queue, now, oldest))
    }

    /// Proposes a queue-level command and answers the queue as it is after it.
    async fn update_queue(&self, queue: String, command: Command) -> Result<Response<proto::QueueInfo>, Status> {
        let shard = self.node.shard_for_queue(&queue);
        let mut committed = shard.commit(vec![command]).await.map_err(status::propose_error)?;
        match committed.results.pop().expect("one result per command") {
            Applied::QueueUpdated => {
                // Read here after the change, wherever the leader is.
                if !shard.applied_through(committed.index).await {
                    return Err(status::propose_error(ProposeError::Lagging {
                        shard: shard.raft.shard(),
                        index: committed.index,
                    }));
                }
                self.queue_info(&queue).map(|info| status::hint_leader(shard, Response::new(info)))
            }
            Applied::Rejected(rejection) => Err(status::rejection(rejection)),
            other => Err(status::unexpected("queue update", &other)),
        }
    }
}

/// A node whose binary cannot read a shard's format cannot become a member
/// (it could not apply the log): refused, saying which release it needs.
fn too_old_to_join(
    node: &crate::dispatch::Node,
    node_id: u64,
    info: &gantry_proto::peer::NodeInfoResponse,
) -> Result<(), Status> {
    let Some(shard) = node.shards.iter().find(|s| s.format() > info.format_max) else { return Ok(()) };
    let version = if info.version.is_empty() { "a release before format gates" } else { info.version.as_str() };
    Err(Status::failed_precondition(format!(
        "node_id: node {node_id} runs gantry {version}, which reads storage formats up to {}; shard {} is at format \
         {}: start it with gantry {} or newer",
        info.format_max,
        shard.raft.shard(),
        shard.format(),
        crate::format::table::BINARY_VERSION
    )))
}

/// How long FinalizeUpgrade waits for the shards to be raised.
const FINALIZE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl AdminService {
    async fn upgrade_status_now(&self) -> proto::UpgradeStatusResponse {
        use crate::dispatch::upgrade::{RaiseVerdict, decide};
        let members = self.node.cluster_formats().await;
        let nodes = members
            .iter()
            .map(|m| match &m.answer {
                Ok(f) => proto::NodeFormats {
                    node_id: m.node_id,
                    version: f.version.clone(),
                    format_min: f.format_min,
                    format_max: f.format_max,
                    held: f.held,
                    error: String::new(),
                },
                Err(why) => proto::NodeFormats { node_id: m.node_id, error: why.clone(), ..Default::default() },
            })
            .collect();
        let mut shards = Vec::new();
        for shard in &self.node.shards {
            let status = shard.raft.status();
            let of_shard: Vec<_> = members.iter().filter(|m| status.nodes.contains_key(&m.node_id)).cloned().collect();
            let format = shard.format();
            let blocked = match decide(format, &of_shard) {
                RaiseVerdict::Blocked { reason } => reason,
                RaiseVerdict::Raise { to } => {
                    format!("every member supports format {to}: its leader raises it shortly")
                }
                RaiseVerdict::UpToDate => String::new(),
            };
            shards.push(proto::ShardFormat {
                shard: status.shard.0,
                format,
                leader_id: status.leader_id.unwrap_or(0),
                blocked,
            });
        }
        proto::UpgradeStatusResponse { nodes, shards, newest_format: crate::format::table::FORMAT_MAX }
    }
}

/// Refuses a command of `feature` before it is proposed while the shard's
/// format is older, naming the members that lack it (apply would refuse it
/// too, without knowing who).
async fn require_feature(
    node: &crate::dispatch::Node,
    shard: &crate::dispatch::ShardNode,
    feature: crate::format::table::Feature,
) -> Result<(), Status> {
    let current = shard.format();
    if current >= feature.format {
        return Ok(());
    }
    let members = shard.members_formats(node).await;
    let lacking: Vec<String> = members
        .iter()
        .filter_map(|m| match &m.answer {
            Ok(f) if f.format_max >= feature.format => None,
            Ok(f) => Some(format!(
                "node {} runs gantry {} (formats up to {})",
                m.node_id,
                if f.version.is_empty() { "from before format gates" } else { &f.version },
                f.format_max
            )),
            Err(why) => Some(format!("node {} did not answer ({why})", m.node_id)),
        })
        .collect();
    let why = if lacking.is_empty() {
        "every member supports it; the shard's leader raises it within seconds unless the upgrade is held \
         (`gantry cluster upgrade status`)"
            .to_owned()
    } else {
        format!("{}: upgrade it", lacking.join("; "))
    };
    Err(Status::failed_precondition(format!(
        "{} needs storage format {}; shard {} is at format {current}: {why}",
        feature.name,
        feature.format,
        shard.raft.shard()
    )))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        request: Request<proto::ClusterStatusRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        if request.get_ref().local {
            return Ok(Response::new(self.local_cluster_status()));
        }
        Ok(Response::new(self.cluster_view().await))
    }

    async fn add_node(
        &self,
        request: Request<proto::AddNodeRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let request = request.into_inner();
        if request.node_id == 0 {
            return Err(Status::invalid_argument("node_id: node ids start at 1"));
        }
        validate::host_port("address", &request.address)?;
        // Ask the node itself: a typo'd address or a node started with
        // another id must not enter the membership.
        let info = crate::cluster::node_info(&self.node.channels, &request.address).await.map_err(|e| {
            Status::failed_precondition(format!(
                "address: cannot reach node {} at {}: {e}",
                request.node_id, request.address
            ))
        })?;
        if info.node_id != request.node_id {
            return Err(Status::failed_precondition(format!(
                "node_id: the node at {} is node {}, not node {}",
                request.address, info.node_id, request.node_id
            )));
        }
        let ours = self.node.shards.len() as u32;
        if info.shards.max(1) != ours {
            return Err(Status::failed_precondition(format!(
                "node_id: node {} runs {} shard(s), this cluster {ours}; start it with --shards {ours} and an empty --data-dir",
                request.node_id,
                info.shards.max(1)
            )));
        }
        too_old_to_join(&self.node, request.node_id, &info)?;
        let member = crate::raft::GantryNode { client: info.client_address.clone(), peer: request.address.clone() };
        // Learner of every shard first, then voter, shard 0 last: a node
        // that could lead shard 0 is a voter of every shard. Each change is
        // made by its shard's leader, wherever that is.
        let node_id = request.node_id;
        for shard in &self.node.shards {
            tracing::info!(shard = %shard.raft.shard(), node = node_id, %member, "adding node as a learner; it becomes a voter once every shard caught it up");
            let change = ShardChange::AddLearner { node_id, node: member.clone() };
            shard.change(change).await.map_err(status::membership_error)?;
            // A raise decided just before the learner was a member: undone.
            if let Err(refusal) = too_old_to_join(&self.node, node_id, &info) {
                let _ = shard.change(ShardChange::Remove { node_id }).await;
                return Err(refusal);
            }
        }
        for shard in self.node.shards.iter().rev() {
            let change = ShardChange::AddVoter { node_id, node: member.clone() };
            shard.change(change).await.map_err(status::membership_error)?;
        }
        Ok(Response::new(self.cluster_view().await))
    }

    async fn remove_node(
        &self,
        request: Request<proto::RemoveNodeRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let node_id = request.get_ref().node_id;
        // A removal that failed part-way is finished by calling again: the
        // shards it already left are skipped.
        let member_of: Vec<_> =
            self.node.shards.iter().filter(|s| s.raft.status().nodes.contains_key(&node_id)).collect();
        if member_of.is_empty() {
            return Err(Status::failed_precondition(format!("node_id: node {node_id} is not a member of any shard")));
        }
        for shard in member_of {
            tracing::info!(shard = %shard.raft.shard(), node = node_id, "removing node");
            shard.change(ShardChange::Remove { node_id }).await.map_err(status::membership_error)?;
        }
        Ok(Response::new(self.cluster_view().await))
    }

    async fn rebuild_replica(
        &self,
        request: Request<proto::RebuildReplicaRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        use crate::dispatch::integrity::IntegrityError;
        let request = request.into_inner();
        let shard = self
            .node
            .shards
            .iter()
            .find(|s| s.raft.shard().0 == request.shard)
            .ok_or_else(|| Status::not_found(format!("shard: this cluster has no shard {}", request.shard)))?;
        let status = shard.raft.status();
        if !status.nodes.contains_key(&request.node_id) {
            return Err(Status::failed_precondition(format!(
                "node_id: node {} is not a member of shard {}",
                request.node_id, request.shard
            )));
        }
        let members = shard.members_integrity().await;
        let healthy = |id: u64| members.iter().flatten().any(|m| m.node_id == id && m.fenced.is_none());
        let target = members.iter().flatten().find(|m| m.node_id == request.node_id);
        let Some(target) = target else {
            let why = members.iter().find_map(|m| m.as_ref().err().map(ToString::to_string)).unwrap_or_default();
            return Err(Status::unavailable(format!("node {} did not answer: {why}", request.node_id)));
        };
        let voters = status.voters.len();
        let healthy_voters = status.voters.iter().filter(|id| healthy(**id)).count();
        if target.fenced.is_none() && status.voters.contains(&request.node_id) && (healthy_voters - 1) * 2 <= voters {
            let others: Vec<String> = members
                .iter()
                .filter_map(|m| match m {
                    Ok(m) if m.node_id != request.node_id => {
                        Some(format!("node {}: {}", m.node_id, m.fenced.as_deref().unwrap_or("healthy")))
                    }
                    Ok(_) => None,
                    Err(e) => Some(e.to_string()),
                })
                .collect();
            return Err(Status::failed_precondition(format!(
                "node_id: node {}'s copy of shard {} is healthy, and rebuilding it would leave {} of the {voters} \
                 voters healthy (answering and not fenced), fewer than a majority: rebuild a fenced copy instead \
                 ({})",
                request.node_id,
                request.shard,
                healthy_voters - 1,
                others.join("; ")
            )));
        }
        // Most copies fenced: no leader can be elected while they all insist
        // on what they acknowledged. The rebuilt copy gives that up, so it
        // votes for the most complete copy (which alone stands for election).
        let forget_acknowledged = healthy_voters * 2 <= voters;
        let reason = if forget_acknowledged {
            format!(
                "an operator asked for it while {healthy_voters} of the {voters} voters were healthy: this copy no \
                 longer insists on what it had acknowledged"
            )
        } else {
            "an operator asked for it".to_owned()
        };
        tracing::warn!(shard = request.shard, node_id = request.node_id, %reason, "rebuilding a replica");
        shard.rebuild_member(request.node_id, &reason, forget_acknowledged).await.map_err(|e| match e {
            IntegrityError::Unreachable { .. } => Status::unavailable(e.to_string()),
            IntegrityError::NotAMember { .. } | IntegrityError::Refused(_) => {
                Status::failed_precondition(e.to_string())
            }
        })?;
        Ok(Response::new(self.cluster_view().await))
    }

    async fn transfer_leader(
        &self,
        request: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::ClusterStatusResponse>, Status> {
        let request = request.into_inner();
        let shard = self
            .node
            .shards
            .iter()
            .find(|s| s.raft.shard().0 == request.shard)
            .ok_or_else(|| Status::not_found(format!("shard: this cluster has no shard {}", request.shard)))?;
        if !shard.raft.status().voters.contains(&request.node_id) {
            return Err(Status::failed_precondition(format!(
                "node_id: node {} is not a voter of shard {}",
                request.node_id,
                shard.raft.shard()
            )));
        }
        let led_by_target = || shard.raft.leader().is_some_and(|(id, _)| id == request.node_id);
        if !led_by_target() {
            let change = ShardChange::TransferLeader { to: request.node_id };
            shard.change(change).await.map_err(status::membership_error)?;
        }
        // Answer once the handover happened, or failed, bounded.
        let deadline = tokio::time::Instant::now() + self.node.settings.session_ttl;
        while tokio::time::Instant::now() < deadline {
            if led_by_target() {
                return Ok(Response::new(self.cluster_view().await));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Err(Status::unavailable(format!(
            "node {} did not take over shard {} in time; see ClusterStatus",
            request.node_id, request.shard
        )))
    }

    async fn list_queues(
        &self,
        _request: Request<proto::ListQueuesRequest>,
    ) -> Result<Response<proto::ListQueuesResponse>, Status> {
        for shard in &self.node.shards {
            linearizable(shard).await?;
        }
        let now = self.node.clock.now_ms();
        let mut queues = Vec::new();
        for shard in &self.node.shards {
            let applied = shard.raft.state().read();
            for (name, queue) in applied.queue.queues() {
                let oldest = queue.oldest_due_run_at_ms(now).map(|t| now.saturating_sub(t));
                queues.push(convert::queue_info(name, shard.raft.shard(), queue, now, oldest));
            }
        }
        queues.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(Response::new(proto::ListQueuesResponse { queues }))
    }

    async fn get_queue(&self, request: Request<proto::GetQueueRequest>) -> Result<Response<proto::QueueInfo>, Status> {
        let queue = &request.get_ref().queue;
        validate::queue_name("queue", queue)?;
        let shard = self.node.shard_for_queue(queue);
        linearizable(shard).await?;
        self.queue_info(queue).map(|info| status::hint_leader(shard, Response::new(info)))
    }

    async fn set_queue_config(
        &self,
        request: Request<proto::SetQueueConfigRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        let request = request.into_inner();
        validate::queue_name("queue", &request.queue)?;
        let config = request.config.ok_or_else(|| Status::invalid_argument("config: is required"))?;
        let update = validate::queue_config_update(&config).map_err(|e| e.prefixed("config"))?;
        let command = Command::SetQueueConfig { queue: request.queue.clone(), update };
        self.update_queue(request.queue, command).await
    }

    async fn pause_queue(
        &self,
        request: Request<proto::PauseQueueRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        let queue = request.into_inner().queue;
        validate::queue_name("queue", &queue)?;
        self.update_queue(queue.clone(), Command::PauseQueue { queue }).await
    }

    async fn resume_queue(
        &self,
        request: Request<proto::ResumeQueueRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        let queue = request.into_inner().queue;
        validate::queue_name("queue", &queue)?;
        self.update_queue(queue.clone(), Command::ResumeQueue { queue }).await
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let request = request.into_inner();
        validate::queue_name("queue", &request.queue)?;
        let state = validate::list_state(request.state)?;
        let limit = validate::list_limit(request.limit) as usize;
        let after = validate::decode_page_token("page_token", &request.page_token)?;
        let shard = self.node.shard_for_queue(&request.queue);
        linearizable(shard).await?;
        let now = self.node.clock.now_ms();
        // The walk may pass every job of the shard to find one queue's: it
        // runs on a copy (O(1), persistent map), so apply never waits for it.
        let all_jobs = shard.raft.state().read().queue.jobs().clone();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut matching = all_jobs
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, job)| job)
            .filter(|job| job.queue == request.queue && state.is_none_or(|s| job.state_at(now) == s));
        let jobs: Vec<proto::Job> = matching
            .by_ref()
            .take(limit)
            .map(|job| {
                convert::job_to_proto(&crate::queue::JobView { state: job.state_at(now), job: job.clone() }, true)
                    .map_err(|e| status::payload_unreadable(job.id, &e))
            })
            .collect::<Result<_, _>>()?;
        let next_page_token = match (jobs.len() == limit, matching.next()) {
            (true, Some(_)) => {
                let last: JobId = validate::job_id("", &jobs[limit - 1].id).map_err(|_| Status::internal("job id"))?;
                validate::encode_page_token(last)
            }
            _ => String::new(),
        };
        Ok(status::hint_leader(shard, Response::new(proto::ListJobsResponse { jobs, next_page_token })))
    }

    async fn retry_job(&self, request: Request<proto::RetryJobRequest>) -> Result<Response<proto::Job>, Status> {
        let job_id = validate::job_id("job_id", &request.get_ref().job_id)?;
        let shard = shard_of(&self.node, job_id)?;
        propose_for_job(shard, Command::RetryJob { job_id }, "retry")
            .await
            .map(|job| status::hint_leader(shard, Response::new(job)))
    }

    async fn upgrade_status(
        &self,
        _request: Request<proto::UpgradeStatusRequest>,
    ) -> Result<Response<proto::UpgradeStatusResponse>, Status> {
        Ok(Response::new(self.upgrade_status_now().await))
    }

    async fn hold_upgrade(
        &self,
        _request: Request<proto::HoldUpgradeRequest>,
    ) -> Result<Response<proto::UpgradeStatusResponse>, Status> {
        let answers = self.node.set_upgrade_hold_everywhere(true).await;
        if answers.iter().all(|(_, a)| a.is_err()) {
            let why: Vec<String> =
                answers.iter().map(|(id, a)| format!("node {id}: {}", a.clone().unwrap_err())).collect();
            return Err(Status::unavailable(format!("no node recorded the hold: {}", why.join("; "))));
        }
        for (id, answer) in &answers {
            if let Err(why) = answer {
                tracing::warn!(node_id = id, "upgrade hold not recorded there: {why} (the others hold)");
            }
        }
        Ok(Response::new(self.upgrade_status_now().await))
    }

    async fn finalize_upgrade(
        &self,
        _request: Request<proto::FinalizeUpgradeRequest>,
    ) -> Result<Response<proto::UpgradeStatusResponse>, Status> {
        let failed: Vec<String> = self
            .node
            .set_upgrade_hold_everywhere(false)
            .await
            .into_iter()
            .filter_map(|(id, answer)| answer.err().map(|why| format!("node {id}: {why}")))
            .collect();
        if !failed.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the hold could not be lifted everywhere, so no shard is raised yet ({}); run it again once those \
                 nodes answer",
                failed.join("; ")
            )));
        }
        let deadline = tokio::time::Instant::now() + FINALIZE_WAIT;
        loop {
            let status = self.upgrade_status_now().await;
            let settled =
                status.shards.iter().all(|s| s.blocked.is_empty() || !s.blocked.contains("raises it shortly"));
            if settled || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(status));
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    async fn delete_queue(
        &self,
        request: Request<proto::DeleteQueueRequest>,
    ) -> Result<Response<proto::DeleteQueueResponse>, Status> {
        let queue = request.into_inner().queue;
        validate::queue_name("queue", &queue)?;
        let shard = self.node.shard_for_queue(&queue);
        require_feature(&self.node, shard, crate::format::table::DELETE_QUEUE).await?;
        match shard.propose(Command::DeleteQueue { queue }).await.map_err(status::propose_error)? {
            Applied::QueueDeleted => Ok(status::hint_leader(shard, Response::new(proto::DeleteQueueResponse {}))),
            Applied::Rejected(rejection) => Err(status::rejection(rejection)),
            other => Err(status::unexpected("DeleteQueue", &other)),
        }
    }

    async fn purge_queue(
        &self,
        request: Request<proto::PurgeQueueRequest>,
    ) -> Result<Response<proto::PurgeQueueResponse>, Status> {
        let request = request.into_inner();
        validate::queue_name("queue", &request.queue)?;
        let state = validate::purge_state(request.state)?;
        let shard = self.node.shard_for_queue(&request.queue);
        // In parts, each its own entry: other commits of the shard wait for
        // one part, not for the whole purge. Jobs enqueued after the first
        // part are spared. A failure part-way leaves the earlier parts done;
        // calling again purges the rest.
        let (mut purged, mut below_seq, mut after, mut through) = (0, None, None, None);
        loop {
            let part = Command::PurgeQueuePart {
                queue: request.queue.clone(),
                state,
                below_seq,
                after,
                through,
                limit: PURGE_PART_LIMIT,
            };
            match shard.propose(part).await {
                Ok(Applied::PurgedPart { count, below_seq: bound, through: end, next }) => {
                    purged += count;
                    below_seq = Some(bound);
                    through = end;
                    after = next;
                    if after.is_none() {
                        return Ok(status::hint_leader(shard, Response::new(proto::PurgeQueueResponse { purged })));
                    }
                }
                Ok(Applied::Rejected(rejection)) => return Err(status::rejection(rejection)),
                Ok(other) => return Err(status::unexpected("purge", &other)),
                Err(e) if purged > 0 => {
                    let status = status::propose_error(e);
                    let message =
                        format!("{} (after {purged} jobs were purged; call again to purge the rest)", status.message());
                    return Err(Status::with_metadata(status.code(), message, status.metadata().clone()));
                }
                Err(e) => return Err(status::propose_error(e)),
            }
        }
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        for shard in &self.node.shards {
            linearizable(shard).await?;
        }
        let mut workers = Vec::new();
        for shard in &self.node.shards {
            // Heartbeats live in the memory of the shard's leader.
            let live = shard.live_sessions().await.map_err(status::propose_error)?;
            workers.extend(list_shard_workers(shard, live));
        }
        // A session spans the shards of its queues: one row, their sums.
        workers.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        workers.dedup_by(|later, kept| {
            if later.session_id != kept.session_id {
                return false;
            }
            kept.queues.append(&mut later.queues);
            kept.max_in_flight += later.max_in_flight;
            kept.in_flight += later.in_flight;
            kept.connected |= later.connected;
            kept.draining |= later.draining;
            kept.last_heartbeat_age = match (kept.last_heartbeat_age.take(), later.last_heartbeat_age.take()) {
                (Some(a), Some(b)) => Some(if (a.seconds, a.nanos) <= (b.seconds, b.nanos) { a } else { b }),
                (a, b) => a.or(b),
            };
            true
        });
        Ok(Response::new(proto::ListWorkersResponse { workers }))
    }

    async fn expire_session(
        &self,
        request: Request<proto::ExpireSessionRequest>,
    ) -> Result<Response<proto::ExpireSessionResponse>, Status> {
        let session_id = validate::required_session_id("session_id", &request.get_ref().session_id)?;
        let mut released = 0;
        let mut found = false;
        for shard in &self.node.shards {
            // A session opened a moment ago on the leader must be seen here.
            linearizable(shard).await?;
            if shard.raft.state().read().queue.session(&session_id).is_none() {
                continue;
            }
            let command = Command::ExpireSession { session_id: session_id.clone(), reason: ExpiryReason::Admin };
            match shard.propose(command).await.map_err(status::propose_error)? {
                Applied::SessionExpired { released: n } => {
                    found = true;
                    released += n;
                }
                // Expired meanwhile by the dispatcher: the same end result.
                Applied::Rejected(crate::queue::Rejection::SessionNotFound(_)) => {}
                other => return Err(status::unexpected("expire session", &other)),
            }
        }
        if !found {
            return Err(Status::not_found(format!(
                "session {session_id} not found (never opened, or already expired)"
            )));
        }
        Ok(Response::new(proto::ExpireSessionResponse { jobs_released: released }))
    }
}

fn list_shard_workers(shard: &ShardNode, live: Vec<LiveInfo>) -> Vec<proto::WorkerInfo> {
    let live: std::collections::HashMap<_, _> = live.into_iter().map(|l| (l.session_id.clone(), l)).collect();
    let applied = shard.raft.state().read();
    applied
        .queue
        .sessions()
        .iter()
        .map(|(session_id, session)| {
            let live = live.get(session_id);
            proto::WorkerInfo {
                session_id: session_id.to_string(),
                worker_id: session.worker_id.clone(),
                queues: session.queues.clone(),
                max_in_flight: session.max_in_flight,
                in_flight: session.held.len() as u32,
                last_heartbeat_age: live.as_ref().map(|l| convert::duration(l.last_seen_age.as_millis() as u64)),
                connected: live.is_some_and(|l| l.connected),
                // Hello asks for at least one job, so zero means Drain.
                draining: session.max_in_flight == 0,
            }
        })
        .collect()
}
