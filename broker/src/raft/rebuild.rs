//! Rebuilding this node's copy of a group from a healthy leader, without
//! restarting the process: the group's Raft is stopped, its log and
//! snapshot dropped (the vote is kept, in the engine and the guard), its
//! state emptied, and a new Raft started on the empty copy, fenced until
//! the leader has sent it a snapshot and the log past everything it had
//! acknowledged. Used when replicas' state digests differ (the odd one
//! out) and by `gantry cluster rebuild`.
//!
//! A marker file (`raft-guard/<shard>.rebuild`) is written first and
//! removed last: a crash in between finishes the rebuild at the next start.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::{
    EventSink, Fence, GantryRaft, PeerChannels, RaftError, ShardRaft,
    guard::Guard,
    log_store::EngineLogStore,
    network::PeerNetwork,
    state_machine::{self, StateDigest, StateMachineStore},
    timings::Timings,
};
use crate::queue::ShardId;

/// What starting the group again needs (kept from `ShardRaft::open`).
pub struct Parts {
    pub node_id: u64,
    /// The node's Raft config with leader restore off: a rebuilt copy never
    /// comes back as a leader.
    pub config: Arc<openraft::Config>,
    pub channels: PeerChannels,
    /// Weak: the engine must close when the node shuts down, whoever still
    /// holds this group.
    pub engine: std::sync::Weak<raft_engine::Engine>,
    pub guard: Arc<Guard>,
    pub timings: Arc<Timings>,
    pub snapshot_dir: PathBuf,
    pub events: EventSink,
    pub marker: PathBuf,
    pub may_rebuild_from_peers: bool,
    pub data_format: Option<Arc<crate::format::header::DataDirFormat>>,
}

/// How long a rebuild waits for the stopped group's log store to close.
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leader being rebuilt waits for another voter to take over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);

pub fn marker_path(data_dir: &Path, shard: ShardId) -> PathBuf {
    data_dir.join("raft-guard").join(format!("{}.rebuild", shard.0))
}

/// The reason a rebuild was started and not finished, if one was.
pub fn read_marker(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(reason) => Ok(Some(format!("a rebuild was started and not finished ({})", reason.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_marker(path: &Path, reason: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut &file, reason.as_bytes())?;
    file.sync_all()?;
    sync_dir(path)
}

pub fn remove_marker(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Who should be rebuilt, judged from replicas' digests at the indexes
/// where at least three replicas reported one: at each, the replicas whose
/// digest differs from one that a strict majority of the reporters share.
/// With no such majority (two replicas, or a three-way split) nobody can be
/// told to be the odd one out: `undecided` says where.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// (node, index, its digest, the majority's digest)
    pub odd: Vec<(u64, u64, String, String)>,
    /// Indexes where digests differ without a majority.
    pub undecided: Vec<u64>,
    /// Indexes up to this one are judged (the newest every reporter passed).
    pub checked_through: u64,
}

/// Compares the digests `reports` (node, its recent digests) at every index
/// after `after` that at least two of them hold, up to the newest index
/// every reporter has passed: a replica that lags is compared once it
/// caught up, not skipped.
pub fn compare_digests(reports: &[(u64, Vec<StateDigest>)], after: u64) -> Verdict {
    let horizon = reports.iter().map(|(_, digests)| digests.last().map_or(0, |d| d.index)).min().unwrap_or(0);
    let mut indexes: Vec<u64> = reports
        .iter()
        .flat_map(|(_, digests)| digests.iter().map(|d| d.index))
        .filter(|i| *i > after && *i <= horizon)
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    let mut verdict = Verdict { checked_through: after.max(horizon), ..Verdict::default() };
    for index in indexes {
        let at: Vec<(u64, [u8; 16])> = reports
            .iter()
            .filter_map(|(node, digests)| digests.iter().find(|d| d.index == index).map(|d| (*node, d.digest)))
            .collect();
        if at.len() < 2 {
            continue;
        }
        if at.iter().all(|(_, d)| *d == at[0].1) {
            continue;
        }
        let majority = at.iter().map(|(_, d)| d).find(|d| at.iter().filter(|(_, e)| e == *d).count() * 2 > at.len());
        match majority {
            Some(majority) => {
                let hex = |d: &[u8; 16]| StateDigest { index, digest: *d }.to_hex();
                for (node, digest) in at.iter().filter(|(_, d)| d != majority) {
                    verdict.odd.push((*node, index, hex(digest), hex(majority)));
                }
            }
            None => verdict.undecided.push(index),
        }
    }
    verdict
}

impl ShardRaft {
    /// Rebuilds this node's copy of the group from the leader (see the
    /// module doc). `forget_acknowledged`: the operator's rebuild of a copy
    /// when most copies are fenced: it then no longer insists on what it
    /// had acknowledged (its empty log lets it vote for the most complete
    /// copy, so the group can elect a leader again); otherwise it stays
    /// fenced until it holds everything it had acknowledged.
    pub async fn rebuild(&self, reason: &str, forget_acknowledged: bool) -> Result<(), RaftError> {
        let parts = &self.parts;
        if !parts.may_rebuild_from_peers {
            return Err(RaftError::Config(format!(
                "shard {}: this node runs alone: no other replica can rebuild its copy",
                self.shard
            )));
        }
        let Ok(_one) = self.rebuilding.try_lock() else {
            return Err(RaftError::Raft(format!("shard {}: a rebuild of this copy is already running", self.shard)));
        };
        tracing::error!(shard = %self.shard, reason, "rebuilding this node's copy of the shard from its leader");
        self.note_fault("rebuild");
        write_marker(&parts.marker, reason)?;
        let acknowledged = if forget_acknowledged {
            parts.guard.record_acknowledged(0)?;
            0
        } else {
            parts.guard.acknowledged()
        };
        let fence = Fence::new(acknowledged.max(1), format!("rebuilding from the leader: {reason}"));
        self.set_fence(Fence { grants_votes: forget_acknowledged, ..fence });
        if self.is_leader() {
            self.hand_over_leadership(HANDOVER_TIMEOUT).await;
        }

        let old = self.raft();
        if let Err(e) = old.shutdown().await {
            tracing::warn!(shard = %self.shard, error = %e, "stopping the group for its rebuild");
        }
        drop(old);
        // The old store's flush thread may still write a committed id: it
        // must be gone before the copy is cleared.
        let store_alive = self.store_alive.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let deadline = tokio::time::Instant::now() + STORE_CLOSE_TIMEOUT;
        while store_alive.strong_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(RaftError::Raft(format!(
                    "shard {}: the stopped group's log store did not close within {STORE_CLOSE_TIMEOUT:?}",
                    self.shard
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let group = u64::from(self.shard.0);
        let engine = parts
            .engine
            .upgrade()
            .ok_or_else(|| RaftError::Raft(format!("shard {}: the node is shutting down", self.shard)))?;
        let mut log =
            EngineLogStore::new(engine, group).with_guard(parts.guard.clone()).with_timings(parts.timings.clone());
        if let Some(data_format) = &parts.data_format {
            log = log.with_data_format(data_format.clone());
        }
        log.drop_local_copy().await.map_err(std::io::Error::from)?;
        *self.store_alive.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = log.alive_probe();
        if let Some(aside) = state_machine::set_snapshot_aside(&parts.snapshot_dir)? {
            tracing::warn!(shard = %self.shard, kept = %aside.display(), "the dropped copy's snapshot is kept");
        }
        self.state.reset();
        let sm = StateMachineStore::with_state(
            self.state.clone(),
            parts.snapshot_dir.clone(),
            parts.events.clone(),
            parts.data_format.clone(),
        );
        let network = PeerNetwork {
            shard: self.shard,
            channels: parts.channels.clone(),
            state: self.state.clone(),
            timings: self.timings.clone(),
        };
        let raft = GantryRaft::new(parts.node_id, parts.config.clone(), network, log, sm)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        raft.runtime_config().elect(false);
        self.heard_from_a_leader.store(false, std::sync::atomic::Ordering::Release);
        *self.raft.write().unwrap_or_else(std::sync::PoisonError::into_inner) = raft;
        remove_marker(&parts.marker)?;
        tracing::warn!(shard = %self.shard, "copy dropped; the leader now rebuilds it (a snapshot, then the log)");
        Ok(())
    }

    pub(super) fn set_fence(&self, fence: Fence) {
        *self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fence);
        self.raft().runtime_config().elect(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: u64, byte: u8) -> StateDigest {
        StateDigest { index, digest: [byte; 16] }
    }

    #[test]
    fn the_odd_one_out_is_named_and_a_tie_is_not_judged() {
        let mut reports = vec![
            (1, vec![at(10, 1), at(20, 2), at(30, 3)]),
            (2, vec![at(10, 1), at(20, 9), at(30, 4)]),
            (3, vec![at(10, 1), at(20, 2)]),
        ];
        let verdict = compare_digests(&reports, 0);
        assert_eq!(verdict.odd.len(), 1, "{verdict:?}");
        assert_eq!((verdict.odd[0].0, verdict.odd[0].1), (2, 20));
        assert!(verdict.undecided.is_empty());
        // Node 3 has not digested index 30 yet: it waits for it.
        assert_eq!(verdict.checked_through, 20);
        assert_eq!(compare_digests(&reports, 20), Verdict { checked_through: 20, ..Verdict::default() });
        // Node 3 lagged, skipped 30 (busy) and is past it: 30 is judged
        // between the two that hold it, which do not agree.
        reports[2].1.push(at(40, 5));
        reports[0].1.push(at(40, 5));
        reports[1].1.push(at(40, 5));
        let verdict = compare_digests(&reports, 20);
        assert_eq!((verdict.undecided, verdict.checked_through), (vec![30], 40));
        // Two replicas that differ: nobody can be named.
        let two = vec![(1, vec![at(40, 1)]), (2, vec![at(40, 2)])];
        assert_eq!(compare_digests(&two, 0).undecided, vec![40]);
        assert!(compare_digests(&two, 0).odd.is_empty());
        // An index only one replica holds is never compared; one beyond
        // what another replica reached is not compared yet.
        let one = vec![(1, vec![at(50, 1)]), (2, vec![at(40, 2)])];
        assert_eq!(compare_digests(&one, 0), Verdict { checked_through: 40, ..Verdict::default() });
    }
}
