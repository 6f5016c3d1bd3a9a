//! openraft glue: type config, the raft-engine log store, the state-machine
//! adapter and the network. The only module that names openraft types; the
//! rest of the broker sees `ShardRaft`, `ShardStatus` and `ProposeError`.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use openraft::{BasicNode, ServerState, SnapshotPolicy, async_runtime::watch::WatchReceiver};

pub use self::state_machine::{AppliedState, EventSink, ShardState};
use self::{log_store::EngineLogStore, network::NoPeers, state_machine::StateMachineStore, types::GantryRaft};
use crate::queue::{Applied, Batch, ShardId};

/// Raft timing and log-compaction settings of a node.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// Take a snapshot after this many applied commands. Counted in
    /// commands, not log entries: an entry holds one command or thousands.
    pub snapshot_every_commands: u64,
    /// Entries kept behind a snapshot so a lagging follower needs no snapshot.
    pub keep_after_snapshot: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_every_commands: 1_000_000,
            keep_after_snapshot: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("raft: {0}")]
    Raft(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    #[error("this node is not the leader of shard {shard}")]
    NotLeader { shard: ShardId, leader: Option<(u64, String)> },
    #[error("shard {shard} is shutting down or failed: {message}")]
    Stopped { shard: ShardId, message: String },
}

/// What ClusterStatus reports for a shard.
#[derive(Clone, Debug, Default)]
pub struct ShardStatus {
    pub shard: ShardId,
    pub role: &'static str,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_address: Option<String>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub nodes: BTreeMap<u64, String>,
}

/// One shard's Raft group on this node.
pub struct ShardRaft {
    shard: ShardId,
    raft: GantryRaft,
    state: Arc<ShardState>,
}

impl ShardRaft {
    pub async fn open(
        node_id: u64,
        shard: ShardId,
        engine: Arc<raft_engine::Engine>,
        data_dir: &Path,
        settings: &RaftSettings,
        events: EventSink,
    ) -> Result<Self, RaftError> {
        let election_ms = settings.election_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "gantry".into(),
            heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
            election_timeout_min: election_ms,
            election_timeout_max: election_ms * 2,
            // Triggered by `spawn_snapshot_policy`, which counts commands.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: settings.keep_after_snapshot,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftError::Config(e.to_string()))?;
        let snapshot_dir = data_dir.join("snapshots").join(shard.0.to_string());
        let sm = StateMachineStore::open(shard, snapshot_dir, events)?;
        let state = sm.shared();
        let log = EngineLogStore::new(engine, u64::from(shard.0));
        let raft = GantryRaft::new(node_id, Arc::new(config), NoPeers, log, sm)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        Ok(ShardRaft { shard, raft, state })
    }

    /// Makes this node the single voter of a brand-new group. A group that
    /// was initialized before (any restart) is left alone.
    pub async fn bootstrap_single(&self, node_id: u64, advertise: &str) -> Result<(), RaftError> {
        if self.raft.is_initialized().await.map_err(|e| RaftError::Raft(e.to_string()))? {
            return Ok(());
        }
        let members = BTreeMap::from([(node_id, BasicNode::new(advertise))]);
        self.raft.initialize(members).await.map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    pub fn state(&self) -> &Arc<ShardState> {
        &self.state
    }

    /// Commits a batch (fsync'd on a quorum) and returns each command's outcome.
    pub async fn propose(&self, batch: Batch) -> Result<Vec<Applied>, ProposeError> {
        match self.raft.client_write(batch).await {
            Ok(response) => Ok(response.data.0),
            Err(openraft::errors::RaftError::APIError(err)) => {
                use openraft::errors::ClientWriteError;
                let forward = match err {
                    ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f) => f,
                    other => return Err(ProposeError::Stopped { shard: self.shard, message: other.to_string() }),
                };
                let leader = forward.leader_id.zip(forward.leader_node.map(|n| n.addr));
                Err(ProposeError::NotLeader { shard: self.shard, leader })
            }
            Err(openraft::errors::RaftError::Fatal(fatal)) => {
                Err(ProposeError::Stopped { shard: self.shard, message: fatal.to_string() })
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(m.id)
    }

    pub fn status(&self) -> ShardStatus {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<u64, String> = membership.nodes().map(|(id, node)| (*id, node.addr.clone())).collect();
        ShardStatus {
            shard: self.shard,
            role: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader_id: m.current_leader,
            leader_address: m.current_leader.and_then(|id| nodes.get(&id).cloned()),
            commit_index: m.cluster_committed.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            voters: membership.voter_ids().collect(),
            nodes,
        }
    }

    /// Waits (bounded) until this node leads the shard.
    pub async fn wait_for_leadership(&self, timeout: Duration) -> Result<(), RaftError> {
        self.raft
            .wait(Some(timeout))
            .state(ServerState::Leader, "become leader")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Waits (bounded) until everything in the local log is applied, so that
    /// reads after a restart see every acknowledged job.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), RaftError> {
        let last = self.raft.metrics().borrow_watched().last_log_index;
        let Some(last) = last else { return Ok(()) };
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(last), "apply the local log")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Snapshots once `every_commands` commands were applied since the
    /// last one, checked every `period`. Ends when the group shuts down.
    pub fn spawn_snapshot_policy(
        self: &Arc<Self>,
        every_commands: u64,
        period: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            // Replayed commands count too: they sit in the log until a snapshot.
            let mut last = 0;
            loop {
                tokio::time::sleep(period).await;
                let Some(shard) = this.upgrade() else { return };
                let applied = shard.state.applied_commands();
                let since = applied - last;
                if since >= every_commands {
                    if let Err(e) = shard.snapshot_now().await {
                        tracing::warn!(shard = %shard.shard, error = %e, "snapshot trigger failed");
                        return;
                    }
                    last = applied;
                }
            }
        })
    }

    /// Forces a snapshot now (tests, and an operator before maintenance).
    pub async fn snapshot_now(&self) -> Result<(), RaftError> {
        self.raft.trigger().snapshot().await.map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(shard = %self.shard, error = %e, "raft shutdown");
        }
    }
}
