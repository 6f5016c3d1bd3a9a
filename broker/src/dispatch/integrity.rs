//! Replicas of a shard compare their state (DESIGN §1.8): every replica
//! digests its state at the same log indexes (`raft::StateDigest`); the
//! shard's leader asks each member for its recent digests every period and
//! compares them at the indexes they share. A replica whose digest differs
//! from the majority's is told to rebuild its copy from the leader (the
//! leader itself hands leadership over first when it is the odd one); a
//! difference without a majority is only reported. Every difference is
//! logged at error and counted in `gantry_storage_faults_total`.
//!
//! Also the operator's `RebuildReplica`, which asks the same of a node.

use std::{sync::Arc, time::Duration};

use gantry_proto::peer::{self as pb, shard_service_client::ShardServiceClient};
use tokio::sync::watch;
use tonic::Request;

use super::ShardNode;
use crate::raft::{StateDigest, compare_digests};

/// Longest wait for a member's answer.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(5);

/// What one member reported.
pub struct MemberIntegrity {
    pub node_id: u64,
    pub digests: Vec<StateDigest>,
    /// Why its copy is fenced, if it is.
    pub fenced: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error("node {node_id} is not a member of shard {shard}")]
    NotAMember { node_id: u64, shard: u32 },
    #[error("node {node_id} did not answer: {message}")]
    Unreachable { node_id: u64, message: String },
    #[error("{0}")]
    Refused(String),
}

/// Compares the shard's replicas every `every` while this node leads it.
pub async fn check_replicas(shard: Arc<ShardNode>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut checked_through = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if !shard.raft.is_leader() {
            continue;
        }
        let members = shard.members_integrity().await;
        let reports: Vec<(u64, Vec<StateDigest>)> = members
            .into_iter()
            .filter_map(|m| match m {
                // A fenced copy is being rebuilt: not a witness.
                Ok(m) if m.fenced.is_none() => Some((m.node_id, m.digests)),
                _ => None,
            })
            .collect();
        let verdict = compare_digests(&reports, checked_through);
        tracing::debug!(
            shard = %shard.raft.shard(), checked_through, reporters = reports.len(),
            newest = ?reports.iter().map(|(node, d)| (*node, d.last().map(|d| d.index))).collect::<Vec<_>>(),
            ?verdict, "compared replicas' digests"
        );
        checked_through = verdict.checked_through;
        let raft_shard = shard.raft.shard();
        for index in verdict.undecided {
            shard.raft.note_fault("digest_mismatch");
            tracing::error!(
                shard = %raft_shard, index,
                "replicas' state digests differ at this index and no majority agrees: nobody is rebuilt; \
                 compare `gantry cluster status` on each node and rebuild the suspect copy with \
                 `gantry cluster rebuild --node <id> --shard {raft_shard}`"
            );
        }
        for (node_id, index, theirs, majority) in verdict.odd {
            shard.raft.note_fault("digest_mismatch");
            let reason = format!(
                "its state digest at index {index} is {theirs}, the other replicas' is {majority} (its state \
                 differs from theirs)"
            );
            tracing::error!(shard = %raft_shard, node_id, "replica diverged: {reason}; rebuilding it from the leader");
            if let Err(e) = shard.rebuild_member(node_id, &reason, false).await {
                tracing::error!(shard = %raft_shard, node_id, error = %e, "the diverged replica could not be rebuilt");
            }
        }
    }
}

impl ShardNode {
    /// This node's digests and fence.
    pub fn local_integrity(&self) -> MemberIntegrity {
        MemberIntegrity { node_id: self.node_id, digests: self.raft.state().digests(), fenced: self.raft.fenced() }
    }

    /// Every member's (voters and learners) digests and fence, this node's
    /// included.
    pub async fn members_integrity(&self) -> Vec<Result<MemberIntegrity, IntegrityError>> {
        let status = self.raft.status();
        let asks = status.nodes.iter().map(|(id, node)| async move {
            if *id == self.node_id {
                return Ok(self.local_integrity());
            }
            let mut client = self.member_client(*id, &node.peer)?;
            let mut request = Request::new(pb::IntegrityRequest { shard: status.shard.0 });
            request.set_timeout(MEMBER_TIMEOUT);
            let answer = client
                .integrity(request)
                .await
                .map_err(|s| IntegrityError::Unreachable { node_id: *id, message: s.message().to_owned() })?
                .into_inner();
            Ok(MemberIntegrity {
                node_id: *id,
                digests: answer
                    .digests
                    .into_iter()
                    .filter_map(|d| Some(StateDigest { index: d.index, digest: d.digest.try_into().ok()? }))
                    .collect(),
                fenced: (!answer.fenced.is_empty()).then_some(answer.fenced),
            })
        });
        futures::future::join_all(asks).await
    }

    /// Has `node_id` drop its copy of the shard and rebuild it from the
    /// leader (this node's own copy when it is `node_id`).
    pub async fn rebuild_member(
        &self,
        node_id: u64,
        reason: &str,
        forget_acknowledged: bool,
    ) -> Result<(), IntegrityError> {
        let shard = self.raft.shard();
        if node_id == self.node_id {
            let raft = self.raft.clone();
            let reason = reason.to_owned();
            // Leadership is handed over, the group stopped and started
            // again: not within the caller's call.
            return raft
                .rebuild(&reason, forget_acknowledged)
                .await
                .map_err(|e| IntegrityError::Refused(e.to_string()));
        }
        let status = self.raft.status();
        let node = status.nodes.get(&node_id).ok_or(IntegrityError::NotAMember { node_id, shard: shard.0 })?;
        let mut request =
            Request::new(pb::RebuildRequest { shard: shard.0, reason: reason.to_owned(), forget_acknowledged });
        // A rebuild stops and starts the group: allow for a leadership handover.
        request.set_timeout(MEMBER_TIMEOUT * 4);
        let answer = self
            .member_client(node_id, &node.peer)?
            .rebuild(request)
            .await
            .map_err(|s| IntegrityError::Unreachable { node_id, message: s.message().to_owned() })?
            .into_inner();
        if answer.error.is_empty() { Ok(()) } else { Err(IntegrityError::Refused(answer.error)) }
    }

    fn member_client(
        &self,
        node_id: u64,
        peer: &str,
    ) -> Result<ShardServiceClient<tonic::transport::Channel>, IntegrityError> {
        let channel = self.peers.channel(peer).map_err(|message| IntegrityError::Unreachable { node_id, message })?;
        Ok(ShardServiceClient::new(channel))
    }
}
