//! openraft glue: type config, the raft-engine log store, the state-machine
//! adapter and the network. The only module that names openraft types; the
//! rest of the broker sees `ShardRaft`, `ShardStatus` and `ProposeError`.

pub mod append_stream;
pub mod guard;
pub mod log_store;
mod log_tail;
pub mod network;
pub mod payload_spill;
pub mod peer_service;
mod rebuild;
pub mod snapshot_file;
pub mod state_machine;
pub mod timings;
pub mod types;
pub mod wire;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use openraft::{ChangeMembers, ReadPolicy, ServerState, SnapshotPolicy, async_runtime::watch::WatchReceiver};

use self::{log_store::EngineLogStore, network::PeerNetwork, state_machine::StateMachineStore, types::GantryRaft};
pub use self::{
    network::PeerChannels,
    rebuild::compare_digests,
    state_machine::{AppliedState, EventSink, ShardState, StateDigest},
    types::GantryNode,
};
use crate::queue::{Applied, Batch, ShardId};
use payload_spill::PayloadSpill;

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
    /// Whether other replicas can rebuild a copy this node cannot trust
    /// (false for a node started alone).
    pub may_rebuild_from_peers: bool,
    /// Replicas digest their state at the first entry of each window of
    /// leader time this long (see `state_machine::StateDigest`).
    pub digest_every: Duration,
    /// The data directory's storage format, shared by every group's log and
    /// snapshots (none: format 0, for tests of one group).
    pub data_format: Option<Arc<crate::format::header::DataDirFormat>>,
    /// Bytes of payload each shard keeps in memory; older waiting jobs'
    /// payloads move to `<data-dir>/payloads/<shard>/` (see `payload_spill`).
    pub payload_memory_per_shard: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_every_commands: 1_000_000,
            keep_after_snapshot: 1_000,
            may_rebuild_from_peers: true,
            digest_every: Duration::from_secs(60),
            data_format: None,
            payload_memory_per_shard: 64 << 20,
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

/// Why a command was not committed, or a read not confirmed. Crosses the
/// peer port when another node proposed for this one (postcard).
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ProposeError {
    /// `leader` is the leader's id and client address, when known.
    #[error("this node is not the leader of shard {shard}")]
    NotLeader { shard: ShardId, leader: Option<(u64, String)> },
    #[error("shard {shard} cannot reach a quorum: {message}")]
    NoQuorum { shard: ShardId, message: String },
    #[error("shard {shard} is shutting down or failed: {message}")]
    Stopped { shard: ShardId, message: String },
    /// The leader could not be reached, or refused the call before acting
    /// on it: nothing was changed.
    #[error("node {leader}, the leader of shard {shard}, did not take the call: {message}")]
    LeaderUnreachable { shard: ShardId, leader: u64, message: String },
    /// The commands went to the leader and its answer was lost: they may or
    /// may not have been committed.
    #[error("the answer of node {leader}, the leader of shard {shard}, was lost: {message}")]
    OutcomeUnknown { shard: ShardId, leader: u64, message: String },
    /// This node has not applied the shard's log through `index` in time,
    /// so it cannot answer a linearizable read.
    #[error("this node has not applied shard {shard} through index {index} yet")]
    Lagging { shard: ShardId, index: u64 },
    /// This node's copy of the shard is fenced (see `ShardRaft::fenced`):
    /// it serves no reads of the shard until it is whole again.
    #[error("this node's copy of shard {shard} is fenced: {reason}")]
    Fenced { shard: ShardId, reason: String },
}

/// Why a membership change was refused. Crosses the peer port when another
/// node asked this one to change a shard it leads (postcard).
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum MembershipError {
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("{0}")]
    Refused(String),
}

/// The leader's view of one member's replication.
#[derive(Clone, Debug, Default)]
pub struct MemberProgress {
    pub matched_index: Option<u64>,
    /// How long ago the leader sent the last heartbeat or append it
    /// answered (openraft's heartbeat metrics); None if it never has.
    pub last_heard: Option<Duration>,
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
    /// The last log index removed behind a snapshot (0: none yet).
    pub purged_index: u64,
    pub voters: Vec<u64>,
    /// Why this node's copy is fenced, while it is.
    pub fenced: Option<String>,
    /// The last digest of the shard's state this node computed.
    pub digest: Option<StateDigest>,
    pub nodes: BTreeMap<u64, GantryNode>,
    /// Filled on the leader only: what each member has replicated.
    pub replication: Option<BTreeMap<u64, MemberProgress>>,
}

/// Why a node's copy of a group is fenced and what lifts it.
struct Fence {
    /// The fence lifts once a leader has replicated the log to this index.
    until: u64,
    /// ... and once this node's vote is at least this one (openraft's
    /// order): a node that lost its vote must first have followed a leader
    /// of a term at least as new as any vote it may have granted.
    vote_at_least: Option<guard::GuardVote>,
    /// Set on a copy an operator rebuilt while most copies were fenced: it
    /// gave up what it acknowledged and, its log empty, grants votes to the
    /// most complete copy (the only kind that stands), so the shard can
    /// elect a leader again. It still neither stands, leads nor serves reads.
    grants_votes: bool,
    reason: String,
}

impl Fence {
    fn new(until: u64, reason: String) -> Self {
        Fence { until, vote_at_least: None, grants_votes: false, reason }
    }
}

/// One shard's Raft group on this node.
pub struct ShardRaft {
    shard: ShardId,
    /// Replaced when this node's copy of the group is rebuilt (`rebuild.rs`);
    /// always read through [`ShardRaft::raft`].
    raft: std::sync::RwLock<GantryRaft>,
    state: Arc<ShardState>,
    /// Set while this node's copy of the group cannot be trusted (it lost
    /// or cannot check what it acknowledged): it does not vote, stand for
    /// election, lead or serve reads until a leader has replicated to it
    /// past `Fence::until`.
    fence: std::sync::Mutex<Option<Fence>>,
    /// Set by the first append a leader sent that this node took.
    heard_from_a_leader: std::sync::atomic::AtomicBool,
    /// What a rebuild of this copy needs to start the group again.
    parts: rebuild::Parts,
    /// Held while this copy is being rebuilt (one rebuild at a time).
    rebuilding: tokio::sync::Mutex<()>,
    /// The current log store's `alive_probe`.
    store_alive: std::sync::Mutex<std::sync::Weak<()>>,
    /// (recovered last index, acknowledged index) found at open.
    opened: (u64, u64),
    /// What the storage check at open found and repaired.
    findings: Vec<log_store::Finding>,
    /// Faults found since the process started, by kind (for /metrics).
    faults: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    /// A member not heard from for this long is taken to be down.
    election_timeout: Duration,
    /// What readiness judges leader contact from; see `LeaderContact`.
    contact: std::sync::Mutex<LeaderContact>,
    timings: Arc<timings::Timings>,
    /// Set when Raft is being shut down: a write after it was never sent
    /// (openraft answers it and a write caught in flight alike).
    stopping: std::sync::atomic::AtomicBool,
}

impl ShardRaft {
    /// Where this copy's snapshots live (and incoming ones are received).
    pub fn snapshot_dir(&self) -> &std::path::Path {
        &self.parts.snapshot_dir
    }

    pub async fn open(
        node_id: u64,
        shard: ShardId,
        engine: Arc<raft_engine::Engine>,
        data_dir: &Path,
        settings: &RaftSettings,
        channels: PeerChannels,
        events: EventSink,
    ) -> Result<Self, RaftError> {
        let election_ms = settings.election_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "gantry".into(),
            heartbeat_interval: settings.heartbeat_interval.as_millis() as u64,
            // Followers refuse votes for election_timeout_max after the last
            // heartbeat (openraft's leader lease), so a candidate whose timer
            // (min..max) fires first is refused once and wins the next round:
            // failover takes about max + min. The old max of 2 x min made that
            // 3 to 4 s at the default 1 s; a narrow spread still keeps split
            // votes rare (and pre-vote makes a lost round cheap).
            election_timeout_min: election_ms,
            election_timeout_max: election_ms + election_ms / 4,
            // Triggered by `spawn_snapshot_policy`, which counts commands.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: settings.keep_after_snapshot,
            max_payload_entries: network::MAX_ENTRIES_PER_APPEND,
            // A node cut off for a while must not bump the term and depose a
            // healthy leader when it comes back.
            enable_pre_vote: Some(true),
            install_snapshot_timeout: 60_000,
            // A follower whose disk lost a log tail (dropped as corrupt by
            // raft-engine at open) must be caught up again, not panic the
            // leader. Such a follower does not vote until it is (see
            // `Fence`), so the reversion cannot cost a committed entry.
            allow_log_reversion: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftError::Config(e.to_string()))?;
        let group = u64::from(shard.0);
        let (guard, found) = guard::Guard::open(
            &data_dir.join("raft-guard").join(shard.0.to_string()),
            &data_dir.join("raft-watermark").join(shard.0.to_string()),
        )?;
        let guard = Arc::new(guard);
        let timings = Arc::new(timings::Timings::default());
        let mut log =
            EngineLogStore::new(engine.clone(), group).with_guard(guard.clone()).with_timings(timings.clone());
        if let Some(data_format) = &settings.data_format {
            log = log.with_data_format(data_format.clone());
        }
        let snapshot_dir = data_dir.join("snapshots").join(shard.0.to_string());
        let marker = rebuild::marker_path(data_dir, shard);
        let mut findings = Vec::new();
        if let Some(reason) = rebuild::read_marker(&marker)? {
            findings.push(Self::drop_copy_at_open(shard, &snapshot_dir, &log, settings, &reason).await?);
        }
        let local_log_end = engine.last_index(group).unwrap_or(0);
        let sm = match StateMachineStore::open(
            shard,
            snapshot_dir.clone(),
            events.clone(),
            local_log_end,
            settings.digest_every,
            settings.data_format.clone(),
            Self::payload_spill(data_dir, shard, settings),
        ) {
            Ok(sm) => sm,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                findings.push(Self::set_corrupt_snapshot_aside(shard, &snapshot_dir, &log, settings, &e).await?);
                StateMachineStore::open(
                    shard,
                    snapshot_dir.clone(),
                    events.clone(),
                    0,
                    settings.digest_every,
                    settings.data_format.clone(),
                    Self::payload_spill(data_dir, shard, settings),
                )?
            }
            Err(e) => return Err(e.into()),
        };
        rebuild::remove_marker(&marker)?;
        let state = sm.shared();
        let snapshot_last = state.read().last_applied;
        let check = log.check_at_open(found, snapshot_last).await.map_err(std::io::Error::from)?;
        findings.extend(check.findings.iter().cloned());
        for finding in &findings {
            tracing::error!(%shard, kind = finding.kind, "storage check at start-up: {}", finding.detail);
        }
        let lost =
            findings.iter().find(|f| f.kind == "snapshot_dropped").map(|f| f.detail.clone()).or(check.lost.clone());
        // Past everything it acknowledged, and past its own log: only
        // entries a leader sent since this start count.
        let fence = lost.map(|reason| Fence::new(check.acknowledged.max(check.recovered_last + 1), reason));
        let config = openraft::Config {
            // A node that lost what it acknowledged must not come back as
            // the leader it was (openraft restores a leader from its saved
            // vote without an election): it would write new entries where
            // the others hold different ones under the same term.
            enable_leader_restore: Some(fence.is_none()),
            ..config
        };
        let parts = rebuild::Parts {
            node_id,
            config: Arc::new(openraft::Config { enable_leader_restore: Some(false), ..config.clone() }),
            channels: channels.clone(),
            engine: Arc::downgrade(&engine),
            guard,
            timings: timings.clone(),
            snapshot_dir,
            events,
            marker,
            may_rebuild_from_peers: settings.may_rebuild_from_peers,
            data_format: settings.data_format.clone(),
        };
        let network = PeerNetwork { shard, channels, state: state.clone(), timings: timings.clone() };
        let store_alive = log.alive_probe();
        let raft = GantryRaft::new(node_id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        if let Some(fence) = &fence {
            tracing::error!(
                %shard, until = fence.until, reason = %fence.reason,
                "this node's copy of the shard is fenced: it will not vote, stand for election, lead or serve reads \
                 of the shard until a healthy leader has replicated its log past index {} to it; if no healthy \
                 leader can (most replicas damaged), rebuild a replica with `gantry cluster rebuild --node <id> --shard {shard}`",
                fence.until
            );
            raft.runtime_config().elect(false);
        }
        Ok(ShardRaft {
            shard,
            raft: std::sync::RwLock::new(raft),
            state,
            fence: std::sync::Mutex::new(fence),
            parts,
            rebuilding: Default::default(),
            store_alive: std::sync::Mutex::new(store_alive),
            heard_from_a_leader: Default::default(),
            opened: (check.recovered_last, check.acknowledged),
            faults: std::sync::Mutex::new(findings.iter().fold(BTreeMap::new(), |mut counts, f| {
                *counts.entry(f.kind).or_default() += 1;
                counts
            })),
            findings,
            election_timeout: settings.election_timeout,
            contact: std::sync::Mutex::new(LeaderContact::new()),
            timings,
            stopping: Default::default(),
        })
    }

    fn payload_spill(data_dir: &std::path::Path, shard: ShardId, settings: &RaftSettings) -> PayloadSpill {
        PayloadSpill::new(&data_dir.join("payloads").join(shard.0.to_string()), settings.payload_memory_per_shard)
    }

    /// A snapshot that does not read back (checksum or decode) cannot be
    /// replaced from the local log when the log behind it was purged: the
    /// group's local copy is dropped and rebuilt from the leader, unless
    /// this node is alone (then nothing can rebuild it: refused). A log
    /// that still starts at its first entry replays without the snapshot.
    async fn set_corrupt_snapshot_aside(
        shard: ShardId,
        dir: &Path,
        log: &EngineLogStore<types::TypeConfig>,
        settings: &RaftSettings,
        error: &std::io::Error,
    ) -> Result<log_store::Finding, RaftError> {
        let purged = log.recovered_purge_point().map_err(std::io::Error::from)?;
        if purged.is_none() {
            let aside = state_machine::set_snapshot_aside(dir)?.map_or_else(String::new, |a| a.display().to_string());
            return Ok(log_store::Finding {
                kind: "snapshot_corrupt",
                detail: format!(
                    "the snapshot does not read back ({error}); moved to {aside}; the log holds every entry: replayed"
                ),
            });
        }
        Self::drop_copy_at_open(
            shard,
            dir,
            log,
            settings,
            &format!("the snapshot does not read back ({error}) and the log behind it is purged"),
        )
        .await
    }

    /// Drops this node's copy of the group (snapshot set aside, log and
    /// metadata cleared but the vote) so that it is rebuilt from a healthy
    /// leader; the copy stays fenced until it is.
    async fn drop_copy_at_open(
        shard: ShardId,
        dir: &Path,
        log: &EngineLogStore<types::TypeConfig>,
        settings: &RaftSettings,
        reason: &str,
    ) -> Result<log_store::Finding, RaftError> {
        if !settings.may_rebuild_from_peers {
            return Err(RaftError::Config(format!(
                "shard {shard}: {reason}; this node runs alone, so no other replica can rebuild it: restore {} \
                 from a backup",
                dir.display()
            )));
        }
        let aside = state_machine::set_snapshot_aside(dir)?;
        log.drop_local_copy().await.map_err(std::io::Error::from)?;
        let aside = aside.map_or_else(String::new, |a| format!(" (the snapshot is kept as {})", a.display()));
        Ok(log_store::Finding {
            kind: "snapshot_dropped",
            detail: format!("{reason}: this copy of the shard was dropped to be rebuilt from the leader{aside}"),
        })
    }

    /// (recovered last index, acknowledged index) the storage check found at
    /// open.
    pub fn lost_at_open(&self) -> Option<(u64, u64)> {
        let (recovered, acknowledged) = self.opened;
        (recovered < acknowledged).then_some(self.opened)
    }

    /// What the storage check at open found and repaired.
    pub fn storage_findings(&self) -> &[log_store::Finding] {
        &self.findings
    }

    /// Faults found in this copy since the process started, by kind.
    pub fn fault_counts(&self) -> Vec<(&'static str, u64)> {
        self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|(k, n)| (*k, *n)).collect()
    }

    /// Counts a fault of `kind` found in this copy (for /metrics).
    pub fn note_fault(&self, kind: &'static str) {
        *self.faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(kind).or_default() += 1;
    }

    /// Whether this node may grant votes: not while it is fenced (but see
    /// `Fence::grants_votes`).
    pub fn may_vote(&self) -> Result<(), String> {
        match self.fence_check() {
            Err((reason, false)) => Err(reason),
            _ => Ok(()),
        }
    }

    /// Why this node's copy of the group is fenced (it does not stand for
    /// election, lead or serve reads), while it is.
    pub fn fenced(&self) -> Option<String> {
        self.fence_check().err().map(|(reason, _)| reason)
    }

    /// Lifts the fence if it may be: once a leader has replicated to this
    /// node past `Fence::until` (the log then matches that leader's up to
    /// there, and holds everything this node acknowledged). Else why not,
    /// and whether it grants votes meanwhile.
    fn fence_check(&self) -> Result<(), (String, bool)> {
        let mut fence = self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(current) = fence.as_ref() else {
            return Ok(());
        };
        let (last, vote) = {
            let metrics = self.raft().metrics();
            let m = metrics.borrow_watched();
            (m.last_log_index.unwrap_or(0), guard_vote_of(&m.vote))
        };
        // openraft publishes its metrics after the fact: the state machine
        // may already have applied entries the metrics do not show yet (a
        // read right after catching up was refused). What is applied was
        // in this log or its snapshot.
        let applied = self.state.read().last_applied.map_or(0, |l| l.index);
        let last = last.max(applied);
        let heard = self.heard_from_a_leader.load(std::sync::atomic::Ordering::Acquire);
        let voted_recently_enough = current.vote_at_least.is_none_or(|at_least| vote.order() >= at_least.order());
        // While a rebuild runs, the log seen here may still be the copy
        // about to be dropped: it proves nothing about the rebuilt one.
        let rebuilding = self.rebuilding.try_lock().is_err();
        if heard && last >= current.until && voted_recently_enough && !rebuilding {
            tracing::warn!(shard = %self.shard, last, "the log holds everything this node acknowledged again, from a leader: fence lifted");
            *fence = None;
            self.raft().runtime_config().elect(true);
            return Ok(());
        }
        let what = if current.grants_votes { "leading or serving reads" } else { "voting, leading or serving reads" };
        let reason = if current.until == u64::MAX {
            current.reason.clone()
        } else {
            format!(
                "{}; not {what} until a leader has replicated the log past index {} (it holds {last})",
                current.reason, current.until
            )
        };
        Err((reason, current.grants_votes))
    }

    /// Fences a copy that is new on a node whose data directory is new,
    /// until `cluster::verify_new_data_dir` found out whether the cluster is
    /// new too (then [`Self::lift_new_data_dir_fence`]) or this node lost its
    /// data (then [`Self::fence_lost_data_dir`]). It must not vote with an
    /// empty log meanwhile.
    pub fn fence_new_data_dir(&self) {
        if self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some() {
            return;
        }
        self.set_fence(Fence::new(
            u64::MAX,
            "this node's data directory is new: it does not vote until its peers said whether the cluster is new \
             too (a member whose data directory was lost must not vote with an empty log)"
                .to_owned(),
        ));
    }

    /// Whether this copy still waits to learn if the cluster is new.
    pub fn awaits_new_data_dir_verdict(&self) -> bool {
        self.fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|f| f.until == u64::MAX)
    }

    /// The cluster is new: a node with a new data directory may vote.
    pub fn lift_new_data_dir_fence(&self) {
        let mut fence = self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fence.as_ref().is_some_and(|f| f.until == u64::MAX) {
            *fence = None;
            self.raft().runtime_config().elect(true);
        }
    }

    /// This node's data directory was lost while its peers hold the group:
    /// what it acknowledged and voted is unknown. It stays fenced until a
    /// leader whose vote is at least `vote_at_least` (the newest vote any
    /// member holds, so at least any vote this node may have granted) has
    /// replicated to it past `until` (the highest index any member knew
    /// committed).
    pub fn fence_lost_data_dir(&self, until: u64, vote_at_least: guard::GuardVote, why: String) {
        self.note_fault("data_dir_lost");
        tracing::error!(shard = %self.shard, until, vote = %vote_at_least, "{why}");
        self.set_fence(Fence { vote_at_least: Some(vote_at_least), ..Fence::new(until.max(1), why) });
    }

    /// The vote this node saved last, and the highest index it knows
    /// committed (for a peer whose data directory was lost).
    pub fn vote_and_commit(&self) -> (guard::GuardVote, u64) {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        (guard_vote_of(&m.vote), m.local_committed.map_or(0, |l| l.index))
    }

    /// A single voter cannot get lost entries back from anyone: it goes on
    /// with what it has (the error at open says what was lost).
    pub fn lift_fence_of_sole_voter(&self) {
        if let Some(fence) = self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            tracing::error!(shard = %self.shard, reason = %fence.reason, "this node is the shard's only voter: it goes on with what its storage holds");
        }
        self.raft().runtime_config().elect(true);
    }

    /// The group's openraft handle (a new one after a rebuild).
    pub(crate) fn raft(&self) -> GantryRaft {
        self.raft.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether this group has a membership (from its log or a snapshot).
    pub async fn is_initialized(&self) -> bool {
        self.raft().is_initialized().await.unwrap_or(false)
    }

    /// Gives a brand-new group its first membership. Called on one node of
    /// a new cluster only, and only when no member is initialized yet.
    pub async fn initialize(&self, members: BTreeMap<u64, GantryNode>) -> Result<(), RaftError> {
        if self.is_initialized().await {
            return Ok(());
        }
        self.raft().initialize(members).await.map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Stands for election now, unless fenced: for the initializer of a
    /// new cluster, whose first election may have met peers that refused
    /// their vote while they were finding out whether the cluster is new.
    /// `candidate_before` is the term this returned at the previous retry:
    /// an election still under way in a newer term is left to finish (a new
    /// one would end it), but one that made no progress since then was
    /// refused and would otherwise wait out a whole election timeout.
    /// Returns the term of the election under way, if any.
    pub async fn campaign(&self, candidate_before: Option<u64>) -> Option<u64> {
        if self.fenced().is_some() || self.leader().is_some() {
            return None;
        }
        let (state, term) = {
            let metrics = self.raft().metrics();
            let m = metrics.borrow_watched();
            (m.state, m.current_term)
        };
        if state == ServerState::Candidate && candidate_before != Some(term) {
            return Some(term);
        }
        if let Err(e) = self.raft().trigger().elect(true).await {
            tracing::debug!(shard = %self.shard, error = %e, "standing for election");
        }
        None
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        *self.raft().node_id()
    }

    pub fn state(&self) -> &Arc<ShardState> {
        &self.state
    }

    /// Commits a batch (fsync'd on a quorum) and returns its log index and
    /// each command's outcome.
    pub async fn propose(&self, batch: Batch) -> Result<(u64, Vec<Applied>), ProposeError> {
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ProposeError::Stopped { shard: self.shard, message: "shutting down".into() });
        }
        self.raft()
            .client_write(batch)
            .await
            .map(|response| (response.log_id.index, response.data.0))
            .map_err(|e| self.write_error(e))
    }

    fn write_error(
        &self,
        error: openraft::errors::RaftError<types::TypeConfig, openraft::errors::ClientWriteError<types::TypeConfig>>,
    ) -> ProposeError {
        use openraft::errors::{ClientWriteError, RaftError as E};
        let unknown = |message: String| ProposeError::OutcomeUnknown {
            shard: self.shard,
            leader: *self.raft().node_id(),
            message,
        };
        match error {
            // Never appended: safe to send again, to the leader named.
            E::APIError(ClientWriteError::ForwardToLeader(f)) => {
                ProposeError::NotLeader { shard: self.shard, leader: f.leader_id.zip(f.leader_node.map(|n| n.client)) }
            }
            // Appended here, then this node adopted another leader's log:
            // the entry may have committed, or may still commit there.
            E::APIError(ClientWriteError::LogEntryDiscarded(f)) => unknown(format!(
                "leadership changed while the entry was being replicated (new leader: {:?})",
                f.leader_id
            )),
            E::APIError(other) => ProposeError::Stopped { shard: self.shard, message: other.to_string() },
            // The node stopped (shutting down, or a storage failure) with
            // the write in flight.
            E::Fatal(fatal) => unknown(format!("the node stopped with the write in flight: {fatal}")),
        }
    }

    /// Returns once this node is confirmed as leader by a quorum and has
    /// applied everything committed before the call: a read after it is
    /// linearizable (a deposed leader cannot answer from stale state).
    pub async fn ensure_linearizable(&self) -> Result<(), ProposeError> {
        use openraft::errors::RaftError as E;
        match self.raft().ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => Ok(()),
            Err(E::APIError(e)) => Err(self.read_error(e)),
            Err(E::Fatal(fatal)) => Err(ProposeError::Stopped { shard: self.shard, message: fatal.to_string() }),
        }
    }

    /// Confirms with a quorum that this node leads the shard and returns the
    /// index every node must have applied before it answers a linearizable
    /// read (a follower read: the follower waits for it, then reads its own
    /// state).
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        use openraft::errors::RaftError as E;
        match self.raft().get_read_log_id(ReadPolicy::ReadIndex).await {
            Ok((read, _)) => Ok(read.log_id().index),
            Err(E::APIError(e)) => Err(self.read_error(e)),
            Err(E::Fatal(fatal)) => Err(ProposeError::Stopped { shard: self.shard, message: fatal.to_string() }),
        }
    }

    fn read_error(&self, error: openraft::errors::LinearizableReadError<types::TypeConfig>) -> ProposeError {
        use openraft::errors::LinearizableReadError as E;
        match error {
            E::ForwardToLeader(f) => {
                ProposeError::NotLeader { shard: self.shard, leader: f.leader_id.zip(f.leader_node.map(|n| n.client)) }
            }
            E::QuorumNotEnough(q) => ProposeError::NoQuorum { shard: self.shard, message: q.to_string() },
        }
    }

    /// Waits, at most `timeout`, until this node applied the log through
    /// `index`; returns whether it did.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        self.raft().wait(Some(timeout)).applied_index_at_least(Some(index), "apply through an index").await.is_ok()
    }

    /// The leader this node knows of (itself included), with its addresses.
    pub fn leader(&self) -> Option<(u64, GantryNode)> {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }

    /// Adds a node as a learner and waits until it has caught up.
    /// Idempotent: a member is left as it is.
    pub async fn add_learner(&self, node_id: u64, node: GantryNode) -> Result<(), MembershipError> {
        let status = self.status();
        if let Some(existing) = status.nodes.get(&node_id)
            && existing != &node
        {
            return Err(MembershipError::Refused(format!(
                "node {node_id} is already a member with {existing}; remove it first to change its addresses"
            )));
        }
        if !status.nodes.contains_key(&node_id) {
            self.raft().add_learner(node_id, node, true).await.map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    /// Adds a node as a learner, waits until it has caught up, then makes
    /// it a voter. Idempotent: a member is left as it is.
    pub async fn add_member(&self, node_id: u64, node: GantryNode) -> Result<(), MembershipError> {
        self.add_learner(node_id, node).await?;
        if !self.status().voters.contains(&node_id) {
            let voters = BTreeSet::from([node_id]);
            self.raft()
                .change_membership(ChangeMembers::AddVoterIds(voters), false)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    /// Removes a node from the group: first as a voter, then as a node.
    pub async fn remove_member(&self, node_id: u64) -> Result<(), MembershipError> {
        let status = self.status();
        if !status.nodes.contains_key(&node_id) {
            return Err(MembershipError::Refused(format!("node {node_id} is not a member of shard {}", self.shard)));
        }
        if status.voters.contains(&node_id) {
            if status.voters.len() == 1 {
                return Err(MembershipError::Refused(format!(
                    "node {node_id} is the last voter of shard {}; a group cannot remove its only voter",
                    self.shard
                )));
            }
            // retain=false takes it out as a voter and as a node in one
            // change; a second change (RemoveNodes) would be appended by a
            // leader that just removed itself, which openraft refuses.
            let voters = BTreeSet::from([node_id]);
            self.raft()
                .change_membership(ChangeMembers::RemoveVoters(voters), false)
                .await
                .map_err(|e| self.write_error(e))?;
            return Ok(());
        }
        let nodes = BTreeSet::from([node_id]);
        self.raft()
            .change_membership(ChangeMembers::RemoveNodes(nodes), false)
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    /// Asks this leader to hand leadership to `to` (a voter).
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), MembershipError> {
        if !self.status().voters.contains(&to) {
            return Err(MembershipError::Refused(format!("node {to} is not a voter of shard {}", self.shard)));
        }
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                shard: self.shard,
                leader: self.leader().map(|(id, n)| (id, n.client)),
            }
            .into());
        }
        self.raft()
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ProposeError::Stopped { shard: self.shard, message: e.to_string() }.into())
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(m.id)
    }

    pub fn status(&self) -> ShardStatus {
        let fenced = self.fenced();
        ShardStatus { fenced, ..self.raft_status() }
    }

    fn raft_status(&self) -> ShardStatus {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<u64, GantryNode> = membership.nodes().map(|(id, node)| (*id, node.clone())).collect();
        ShardStatus {
            shard: self.shard,
            role: match m.state {
                _ if !nodes.contains_key(&m.id) => "not a member",
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: m.current_term,
            leader_id: m.current_leader,
            leader_address: m.current_leader.and_then(|id| nodes.get(&id).map(|n| n.client.clone())),
            // What this node knows to be committed (never behind what it applied).
            commit_index: m.local_committed.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            voters: membership.voter_ids().collect(),
            fenced: None,
            digest: self.state.digests().last().copied(),
            nodes,
            replication: m.replication.as_ref().map(|replication| {
                let heard = m.heartbeat.as_ref();
                replication
                    .iter()
                    .map(|(id, matched)| {
                        let last_heard = heard
                            .and_then(|h| h.get(id))
                            .and_then(|at| at.as_ref())
                            .map(|at| openraft::Instant::elapsed(&**at));
                        (*id, MemberProgress { matched_index: matched.as_ref().map(|l| l.index), last_heard })
                    })
                    .collect()
            }),
        }
    }

    pub fn timings(&self) -> &timings::Timings {
        &self.timings
    }

    /// Called by the peer service for every append a leader sent this node
    /// and it did not refuse (heartbeats are appends too).
    pub fn heard_from_leader(&self) {
        self.heard_from_a_leader.store(true, std::sync::atomic::Ordering::Release);
        self.contact.lock().unwrap_or_else(std::sync::PoisonError::into_inner).heard = std::time::Instant::now();
    }

    /// How long readiness lets the leader (or a quorum) stay silent: twice
    /// the election timeout, above openraft's own lease (1.25 times), so a
    /// slow sync or two does not take every node out of service at once.
    fn silence_allowed(&self) -> Duration {
        self.election_timeout * 2
    }

    /// The contact times for the term and leader `m` shows, reset when
    /// they changed since the last look (a new leader, or this node newly
    /// leading, gets a full allowance before it is judged).
    fn observe_contact(&self, m: &openraft::RaftMetrics<types::TypeConfig>) -> LeaderContact {
        let mut contact = self.contact.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if (contact.term, contact.leader) != (m.current_term, m.current_leader) {
            *contact = LeaderContact { term: m.current_term, leader: m.current_leader, ..LeaderContact::new() };
        }
        *contact
    }

    /// On a node following a leader: how long that leader has not reached
    /// it, once that is longer than `silence_allowed`. openraft keeps
    /// naming the last leader meanwhile (a restarted node names the one it
    /// voted for; with pre-vote a node cut off never moves to a new term),
    /// but this node can forward nothing to it.
    pub fn leader_silent_for(&self) -> Option<(u64, Duration)> {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        let contact = self.observe_contact(&m);
        let leader = m.current_leader.filter(|l| l != self.raft().node_id())?;
        let silent = contact.heard.elapsed();
        (silent > self.silence_allowed()).then_some((leader, silent))
    }

    /// On the leader of a group with other voters: how long no quorum has
    /// answered it, once that is longer than `silence_allowed`. Such a
    /// leader (cut off from most voters, most of them down, or restored as
    /// leader at a restart while the others are down) keeps its role but
    /// can commit nothing, so it must not look ready.
    pub fn quorum_silent_for(&self) -> Option<Duration> {
        let metrics = self.raft().metrics();
        let m = metrics.borrow_watched();
        let contact = self.observe_contact(&m);
        if m.state != ServerState::Leader || m.membership_config.membership().voter_ids().count() < 2 {
            return None;
        }
        // Never acknowledged by a quorum in this term: silent since this
        // node was first seen leading.
        let silent = match m.last_quorum_acked.as_ref() {
            Some(acked) => openraft::Instant::elapsed(&**acked),
            None => contact.since.elapsed(),
        };
        (silent > self.silence_allowed()).then_some(silent)
    }

    /// Waits (bounded) until this node leads the shard.
    pub async fn wait_for_leadership(&self, timeout: Duration) -> Result<(), RaftError> {
        self.raft()
            .wait(Some(timeout))
            .state(ServerState::Leader, "become leader")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Waits (bounded) until everything in the local log is applied, so that
    /// reads after a restart see every acknowledged job.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), RaftError> {
        let last = self.raft().metrics().borrow_watched().last_log_index;
        let Some(last) = last else { return Ok(()) };
        self.raft()
            .wait(Some(timeout))
            .applied_index_at_least(Some(last), "apply the local log")
            .await
            .map(|_| ())
            .map_err(|e| RaftError::Raft(e.to_string()))
    }

    /// Snapshots once `every_commands` commands were applied since the
    /// last one (or more: see [`SnapshotPacer`]), checked every `period`.
    /// Ends when the group shuts down.
    pub fn spawn_snapshot_policy(
        self: &Arc<Self>,
        every_commands: u64,
        period: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pacer: Option<SnapshotPacer> = None;
            loop {
                tokio::time::sleep(period).await;
                let Some(shard) = this.upgrade() else { return };
                let jobs = shard.state.read().queue.jobs().len() as u64;
                // Replayed commands count too: they sit in the log until a snapshot.
                let pacer = pacer.get_or_insert_with(|| SnapshotPacer::new(every_commands, jobs));
                if pacer.due(shard.state.applied_commands(), jobs)
                    && let Err(e) = shard.snapshot_now().await
                {
                    if shard.stopping.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    // A group being rebuilt is down for a moment: try again
                    // next period.
                    tracing::warn!(shard = %shard.shard, error = %e, "snapshot trigger failed");
                }
            }
        })
    }

    /// On a clean shutdown of a leader: hands leadership to the voter that
    /// has replicated the most, and waits (bounded) for it to take over, so
    /// a rolling restart costs a handover instead of an election timeout.
    pub async fn hand_over_leadership(&self, timeout: Duration) {
        let status = self.status();
        if !self.is_leader() || status.voters.len() < 2 {
            return;
        }
        let me = *self.raft().node_id();
        let Some(successor) = self.most_replicated_voter() else {
            tracing::info!(shard = %self.shard, "no other voter answered lately: not handing leadership over");
            return;
        };
        if let Err(e) = self.transfer_leadership(successor).await {
            tracing::warn!(shard = %self.shard, error = %e, "leadership handover at shutdown failed");
            return;
        }
        let handed_over = self
            .raft()
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some_and(|l| l != me), "another node leads")
            .await;
        match handed_over {
            Ok(_) => tracing::info!(shard = %self.shard, successor, "handed leadership over before shutting down"),
            Err(e) => tracing::warn!(shard = %self.shard, successor, error = %e, "leadership handover did not finish"),
        }
    }

    /// As its leader sees it: the voter other than this node that has
    /// replicated the most of this shard, among those heard from within an
    /// election timeout. A voter that stopped answering
    /// cannot take leadership: handing it over would only wait out a
    /// timeout (a whole cluster shutting down node by node waited one per
    /// shard on each node).
    fn most_replicated_voter(&self) -> Option<u64> {
        let status = self.status();
        let me = *self.raft().node_id();
        let alive = |progress: &MemberProgress| progress.last_heard.is_some_and(|ago| ago < self.election_timeout);
        status
            .replication
            .iter()
            .flatten()
            .filter(|(id, progress)| **id != me && status.voters.contains(id) && alive(progress))
            .max_by_key(|(_, progress)| progress.matched_index)
            .map(|(id, _)| *id)
    }

    /// Forces a snapshot now (tests, and an operator before maintenance).
    pub async fn snapshot_now(&self) -> Result<(), RaftError> {
        self.raft().trigger().snapshot().await.map_err(|e| RaftError::Raft(e.to_string()))
    }

    pub async fn shutdown(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        if let Err(e) = self.raft().shutdown().await {
            tracing::warn!(shard = %self.shard, error = %e, "raft shutdown");
        }
    }
}

fn guard_vote_of(vote: &openraft::type_config::alias::VoteOf<types::TypeConfig>) -> guard::GuardVote {
    use openraft::vote::RaftLeaderId;
    let leader = vote.leader_id();
    guard::GuardVote { term: leader.term(), node_id: *leader.node_id(), committed: vote.is_committed() }
}

/// Readiness's memory of one shard's leadership: the term and leader last
/// seen, since when, and when a leader last reached this node.
#[derive(Clone, Copy, Debug)]
struct LeaderContact {
    term: u64,
    leader: Option<u64>,
    since: std::time::Instant,
    heard: std::time::Instant,
}

impl LeaderContact {
    fn new() -> Self {
        let now = std::time::Instant::now();
        LeaderContact { term: 0, leader: None, since: now, heard: now }
    }
}

/// When a group snapshots: after `every` applied commands, or, when the
/// last snapshot held more jobs than that, after as many commands as it
/// held jobs. A snapshot costs in proportion to the jobs in the state
/// (seconds of CPU on every node for millions), so this bounds its cost per
/// command, and the log replayed at a restart stays in proportion to the
/// snapshot. The bar is the size at the last snapshot, not the size now: a
/// state that grows by a job per command would otherwise never reach it.
pub struct SnapshotPacer {
    every: u64,
    applied_at_last: u64,
    jobs_at_last: u64,
}

impl SnapshotPacer {
    pub fn new(every: u64, jobs: u64) -> Self {
        SnapshotPacer { every, applied_at_last: 0, jobs_at_last: jobs }
    }

    /// Whether to snapshot now, given the commands applied so far and the
    /// jobs in the state; when it says yes it counts from here.
    pub fn due(&mut self, applied: u64, jobs: u64) -> bool {
        let due = applied.saturating_sub(self.applied_at_last) >= self.every.max(self.jobs_at_last);
        if due {
            self.applied_at_last = applied;
            self.jobs_at_last = jobs;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::SnapshotPacer;

    #[test]
    fn a_large_state_waits_for_as_many_commands_as_it_held_jobs() {
        let mut pacer = SnapshotPacer::new(1_000_000, 10);
        assert!(!pacer.due(999_999, 10));
        assert!(pacer.due(1_000_000, 3_000_000));
        assert!(!pacer.due(3_999_999, 3_000_000), "3M jobs at the last snapshot: wait for 3M commands");
        assert!(pacer.due(4_000_000, 100));
        assert!(!pacer.due(4_999_999, 100));
        assert!(pacer.due(5_000_000, 100));
    }

    #[test]
    fn a_state_growing_a_job_per_command_still_snapshots() {
        // Enqueues with no worker: every command adds a job.
        let mut pacer = SnapshotPacer::new(1_000, 5_000);
        let snapshots = (1..=50_000u64).filter(|&applied| pacer.due(applied, 5_000 + applied)).count();
        assert!(snapshots >= 3, "{snapshots} snapshots in 50,000 commands");
    }
}
