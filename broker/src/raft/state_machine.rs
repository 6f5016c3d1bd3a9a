//! The openraft state machine: applies committed batches to the shard's
//! `QueueState`, hands the resulting events to the leader's dispatcher, and
//! writes snapshots to `<data-dir>/snapshots/<shard>/`.

use std::{
    fs, io,
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard},
};

use futures::{Stream, TryStreamExt};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder,
    storage::{EntryResponder, RaftStateMachine},
    type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf},
};
use tokio::sync::mpsc;

use super::payload_spill::PayloadSpill;
pub use super::snapshot_file::{SnapshotData, decode_state_data, encode_state_data, set_snapshot_aside};
use super::{
    snapshot_file::{Source, StoredSnapshot, invalid, read_snapshot_file, write_snapshot_file},
    types::{BatchResponse, TypeConfig},
};
use crate::format::{header::DataDirFormat, table::FORMAT_MAX};
use crate::metrics::Counters;
use crate::queue::{Command, Event, QueueState, ShardId};

/// A shard raised to a format this binary does not know cannot be applied
/// here: the group stops (fail-stop, with the way out) instead of guessing.
/// The leader raises a shard only once every member supports the format,
/// so this means a downgrade the data directory's header did not catch.
fn check_format_supported(format: u32) -> io::Result<()> {
    if format <= FORMAT_MAX {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "the shard was raised to format {format}; this gantry ({}) knows formats up to {FORMAT_MAX}: run a \
             gantry that supports it on this node (docs/compatibility.md)",
            crate::format::table::BINARY_VERSION
        ),
    ))
}

type C = TypeConfig;

/// What a replica has applied: the queue state and the Raft bookkeeping
/// that must stay consistent with it (a snapshot captures all three).
pub struct AppliedState {
    pub queue: QueueState,
    pub last_applied: Option<LogIdOf<C>>,
    pub membership: StoredMembershipOf<C>,
}

/// Shared between the state machine (the only writer) and readers on the
/// API edge (GetJob, ListJobs, the dispatcher's view of capacity).
pub struct ShardState {
    shard: ShardId,
    applied: RwLock<AppliedState>,
    /// Commands applied since this process started (drives snapshots).
    applied_commands: std::sync::atomic::AtomicU64,
    /// Job transitions per queue, for `/metrics`.
    counters: Counters,
    /// Entries up to this index were in the local log when the process
    /// started: replaying them is not counted again (see `metrics::counters`).
    replayed_up_to: u64,
    /// Length of the windows of leader time whose first entry every
    /// replica digests its state at (ms).
    digest_every_ms: u64,
    /// The latest digests, oldest first, at most `DIGESTS_KEPT`.
    digests: std::sync::Mutex<std::collections::VecDeque<StateDigest>>,
    /// Set while a digest is being computed: at most one at a time (one
    /// due meanwhile is skipped on this replica; replicas compare the
    /// indexes they have in common).
    digesting: Arc<std::sync::atomic::AtomicBool>,
    /// Raised by every reset: a digest of the state before it is dropped.
    generation: std::sync::atomic::AtomicU64,
    /// The shard's format as applied here, readable without the state's
    /// lock (the peer wire picks its encoding by it on every RPC).
    format: std::sync::atomic::AtomicU32,
    /// Moves payloads of older jobs to disk (see `payload_spill`).
    spill: PayloadSpill,
}

/// How many recent digests a replica keeps for the leader to compare.
const DIGESTS_KEPT: usize = 32;

/// A digest of a shard's queue state right after the entry at `index` was
/// applied: the first 16 bytes of the SHA-256 of its snapshot encoding,
/// which is the same on every replica that applied the same log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateDigest {
    pub index: u64,
    pub digest: [u8; 16],
}

impl StateDigest {
    pub fn to_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The digest of `queue`'s state (see [`StateDigest`]). Fails only if a
/// payload on this node's disk cannot be read back.
pub fn digest_of(queue: &QueueState) -> Result<[u8; 16], crate::queue::PayloadReadError> {
    use sha2::Digest;
    struct Hashing(sha2::Sha256);
    impl io::Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(sha2::Sha256::new());
    // The shard's format says which encoding: the same on every replica at
    // the same index, old binaries included while it is 0.
    if queue.format() == 0 {
        postcard::to_io(queue, &mut hashing).expect("hashing never fails to write");
    } else {
        crate::format::storage::encode_state(queue, &mut |bytes| hashing.0.update(bytes))?;
    }
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&hashing.0.finalize()[..16]);
    Ok(digest)
}

impl ShardState {
    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The shard's format as applied here (see [`QueueState::format`]).
    pub fn format(&self) -> u32 {
        self.format.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn applied_commands(&self) -> u64 {
        self.applied_commands.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Job transitions this node applied since it started, per queue.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A consistent view of the applied state; hold it briefly (apply waits).
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.applied.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Empties the state (a copy being rebuilt): readers see an empty
    /// shard until the leader's snapshot is installed.
    pub fn reset(&self) {
        let mut applied = self.applied.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *applied =
            AppliedState { queue: QueueState::new(self.shard), last_applied: None, membership: Default::default() };
        self.format.store(0, std::sync::atomic::Ordering::Release);
        self.spill.forget();
        let mut digests = self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        digests.clear();
    }

    /// Payload bytes moved to disk since the process started, and those of
    /// the newest jobs kept in memory.
    pub fn payload_bytes(&self) -> (u64, u64) {
        (self.spill.moved_bytes(), self.spill.in_memory_bytes())
    }

    /// The digests this replica computed lately, oldest first.
    pub fn digests(&self) -> Vec<StateDigest> {
        self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().copied().collect()
    }

    /// Digests `queue` (the state right after entry `index`) off the apply
    /// path, unless a digest is still being computed.
    fn digest_later(self: &Arc<Self>, index: u64, queue: QueueState) {
        use std::sync::atomic::Ordering;
        if self.digesting.swap(true, Ordering::AcqRel) {
            tracing::debug!(shard = %self.shard, index, "a digest is still being computed: this one is skipped");
            return;
        }
        let shared = self.clone();
        let generation = self.generation.load(Ordering::Acquire);
        tokio::task::spawn_blocking(move || {
            let digest = digest_of(&queue);
            drop(queue);
            let digest = match digest {
                Ok(digest) => StateDigest { index, digest },
                Err(e) => {
                    tracing::error!(shard = %shared.shard, index, error = %e, "no digest of the state: a payload cannot be read");
                    shared.digesting.store(false, Ordering::Release);
                    return;
                }
            };
            let mut digests = shared.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A reset (rebuild) meanwhile made this digest's state obsolete.
            if shared.generation.load(Ordering::Acquire) == generation
                && digests.back().is_none_or(|last| last.index < index)
            {
                digests.push_back(digest);
                if digests.len() > DIGESTS_KEPT {
                    digests.pop_front();
                }
            }
            drop(digests);
            shared.digesting.store(false, Ordering::Release);
        });
    }
}

/// The thread that moves the shard's payloads to disk (`payload_spill`):
/// woken by apply when there is work, and once a second to let go of and
/// compact payload files. Ends with the shard's state.
fn start_payload_mover(shared: &Arc<ShardState>) -> io::Result<()> {
    let (wake, woken) = std::sync::mpsc::sync_channel(1);
    shared.spill.set_wake(wake);
    let state = Arc::downgrade(shared);
    std::thread::Builder::new().name(format!("gantry-payloads-{}", shared.shard)).spawn(move || {
        loop {
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                woken.recv_timeout(std::time::Duration::from_secs(1))
            {
                return;
            }
            let Some(state) = state.upgrade() else { return };
            let access = super::payload_spill::StateAccess {
                state: &state.applied,
                queue: |applied: &AppliedState| &applied.queue,
                queue_mut: |applied: &mut AppliedState| &mut applied.queue,
            };
            while state.spill.move_round(&access) {}
        }
    })?;
    Ok(())
}

/// Events of one applied entry.
pub type EventSink = mpsc::UnboundedSender<Vec<Event>>;

#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<ShardState>,
    snapshots: Arc<SnapshotDir>,
    events: EventSink,
}

/// The shard's snapshot file. openraft builds a snapshot on a task of its
/// own while the state machine may install one sent by the leader: writes
/// take turns, and a built snapshot never replaces a newer one on disk (the
/// log behind that one may already be purged).
struct SnapshotDir {
    path: PathBuf,
    /// Last log index of the snapshot on disk; the lock is held while writing.
    on_disk: std::sync::Mutex<Option<u64>>,
    /// The data directory's format, raised before a snapshot of a newer
    /// one is written, and choosing the file's container.
    data_format: Option<Arc<DataDirFormat>>,
}

impl SnapshotDir {
    fn read(&self) -> io::Result<Option<StoredSnapshot>> {
        read_snapshot_file(&self.path)
    }

    /// Writes a snapshot of `format` from `source` unless `only_if_newer`
    /// and the one on disk is as new; returns its state bytes as they stand
    /// in the file, `None` if it did not write.
    fn write(
        &self,
        meta: &SnapshotMetaOf<C>,
        format: u32,
        source: Source<'_>,
        only_if_newer: bool,
    ) -> io::Result<Option<SnapshotData>> {
        let mut on_disk = self.on_disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = meta.last_log_id.map(|l| l.index);
        if only_if_newer && on_disk.is_some() && *on_disk >= index {
            return Ok(None);
        }
        let container = match &self.data_format {
            Some(data_format) => {
                data_format.ensure(format)?;
                data_format.current()
            }
            None => format,
        };
        let data = write_snapshot_file(&self.path, meta, source, container)?;
        *on_disk = index;
        Ok(Some(data))
    }
}

impl StateMachineStore {
    /// Opens the shard's state machine, restoring the last snapshot if any;
    /// openraft then replays the committed log after it. `replayed_up_to` is
    /// the last index of the local log now: entries up to it are not counted
    /// in the metrics again.
    pub fn open(
        shard: ShardId,
        snapshot_dir: PathBuf,
        events: EventSink,
        replayed_up_to: u64,
        digest_every: std::time::Duration,
        data_format: Option<Arc<DataDirFormat>>,
        spill: PayloadSpill,
    ) -> io::Result<Self> {
        fs::create_dir_all(&snapshot_dir)?;
        let mut applied =
            AppliedState { queue: QueueState::new(shard), last_applied: None, membership: Default::default() };
        let snapshot = read_snapshot_file(&snapshot_dir)?;
        let on_disk = snapshot.as_ref().and_then(|file| file.meta.last_log_id.map(|l| l.index));
        if let Some(file) = snapshot {
            applied.queue = file.data.decode_to(&spill).map_err(|e| invalid(&snapshot_dir, e))?;
            if applied.queue.shard() != shard {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: a snapshot of shard {} in shard {shard}'s directory (directories mixed up? move it aside)",
                        snapshot_dir.display(),
                        applied.queue.shard()
                    ),
                ));
            }
            applied.last_applied = file.meta.last_log_id;
            applied.membership = file.meta.last_membership.clone();
        }
        let format = applied.queue.format();
        let shared = Arc::new(ShardState {
            format: std::sync::atomic::AtomicU32::new(format),
            shard,
            applied: RwLock::new(applied),
            applied_commands: Default::default(),
            counters: Counters::default(),
            replayed_up_to,
            digest_every_ms: (digest_every.as_millis() as u64).max(1),
            digests: Default::default(),
            digesting: Default::default(),
            generation: Default::default(),
            spill,
        });
        if shared.spill.moves() {
            start_payload_mover(&shared)?;
        }
        Ok(StateMachineStore {
            shared,
            snapshots: Arc::new(SnapshotDir {
                path: snapshot_dir,
                on_disk: std::sync::Mutex::new(on_disk),
                data_format,
            }),
            events,
        })
    }

    /// A state machine over `shared`, emptied by [`ShardState::reset`], for
    /// a copy being rebuilt from the leader: no snapshot on disk.
    pub fn with_state(
        shared: Arc<ShardState>,
        snapshot_dir: PathBuf,
        events: EventSink,
        data_format: Option<Arc<DataDirFormat>>,
    ) -> Self {
        StateMachineStore {
            shared,
            snapshots: Arc::new(SnapshotDir { path: snapshot_dir, on_disk: std::sync::Mutex::new(None), data_format }),
            events,
        }
    }

    pub fn shared(&self) -> Arc<ShardState> {
        self.shared.clone()
    }

    fn shard_id(&self) -> ShardId {
        self.shared.shard
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
        self.shared.applied.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<C, SnapshotData>> {
        let shared = self.shared.clone();
        let snapshots = self.snapshots.clone();
        // Encoding a large state and fsyncing it must not stall async threads.
        tokio::task::spawn_blocking(move || {
            // Apply waits only for the copy, independent of the number of
            // jobs with the persistent maps;
            // the encoding (seconds for millions of jobs) runs on the copy.
            let started = std::time::Instant::now();
            let (meta, queue) = {
                let applied = shared.read();
                let meta = SnapshotMetaOf::<C> {
                    last_log_id: applied.last_applied,
                    last_membership: applied.membership.clone(),
                };
                (meta, applied.queue.clone())
            };
            let copied = started.elapsed();
            let written = snapshots.write(&meta, queue.format(), Source::State(&queue), true)?;
            drop(queue);
            let Some(data) = written else {
                // A snapshot installed from the leader meanwhile is newer: it stands.
                let newer = snapshots.read()?.ok_or_else(|| io::Error::other("the newer snapshot is gone"))?;
                tracing::info!(shard = %shared.shard, index = ?newer.meta.last_log_id.map(|l| l.index), "a newer snapshot was installed meanwhile; kept it");
                return Ok(SnapshotOf::<C, _> { meta: newer.meta, snapshot: newer.data });
            };
            tracing::info!(
                shard = %shared.shard,
                index = ?meta.last_log_id.map(|l| l.index),
                bytes = data.len(),
                ?copied,
                elapsed = ?started.elapsed(),
                "snapshot written"
            );
            Ok(SnapshotOf::<C, _> { meta, snapshot: data })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<C> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>)> {
        let applied = self.shared.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<C>>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let mut digest_due = None;
            let (response, events) = {
                let mut applied = self.write();
                applied.last_applied = Some(entry.log_id);
                match &entry.payload {
                    EntryPayload::Blank => (BatchResponse::default(), Vec::new()),
                    EntryPayload::Normal(batch) => {
                        for command in batch.commands.iter() {
                            if let Command::SetFormat { format } = command {
                                check_format_supported(*format).inspect_err(|e| {
                                    tracing::error!(shard = %self.shard_id(), index = entry.log_id.index, "{e}");
                                })?;
                                if let Some(data_format) = &self.snapshots.data_format {
                                    data_format.ensure(*format)?;
                                }
                            }
                        }
                        let count = batch.commands.len() as u64;
                        self.shared.applied_commands.fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                        let window = applied.queue.now_ms() / self.shared.digest_every_ms;
                        let out = applied.queue.apply(entry.log_id.index, batch);
                        self.shared.spill.after_apply(&applied.queue, &out);
                        self.shared.format.store(applied.queue.format(), std::sync::atomic::Ordering::Release);
                        // The first entry stamped in a new window: the same
                        // entries on every replica (the stamps are in the
                        // log, the last one in the snapshot).
                        if applied.queue.now_ms() / self.shared.digest_every_ms != window {
                            digest_due = Some(applied.queue.clone());
                        }
                        if entry.log_id.index > self.shared.replayed_up_to {
                            self.shared.counters.record(&out.tally);
                        }
                        (BatchResponse(out.results), out.events)
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), membership.clone());
                        (BatchResponse::default(), Vec::new())
                    }
                }
            };
            if let Some(queue) = digest_due {
                self.shared.digest_later(entry.log_id.index, queue);
            }
            if !events.is_empty() {
                // Nobody listening only means the node is shutting down.
                let _ = self.events.send(events);
            }
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, snapshot: SnapshotData) -> io::Result<()> {
        let snapshots = self.snapshots.clone();
        let shared = self.shared.clone();
        let meta = meta.clone();
        // Decoded as it is read, then written to the shard's file from the
        // received bytes: both off the async threads.
        let (queue, meta) = tokio::task::spawn_blocking(move || {
            let queue = snapshot.decode_to(&shared.spill).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            check_format_supported(queue.format())?;
            snapshots.write(&meta, queue.format(), Source::Data(&snapshot), false)?;
            Ok::<_, io::Error>((queue, meta))
        })
        .await
        .map_err(io::Error::other)??;
        let mut applied = self.write();
        self.shared.format.store(queue.format(), std::sync::atomic::Ordering::Release);
        applied.queue = queue;
        // The mover notes the new state's jobs (none in memory if it was
        // decoded to disk).
        self.shared.spill.forget();
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<C, SnapshotData>>> {
        let snapshots = self.snapshots.clone();
        let file = tokio::task::spawn_blocking(move || snapshots.read()).await.map_err(io::Error::other)??;
        Ok(file.map(|file| SnapshotOf::<C, _> { meta: file.meta, snapshot: file.data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_at(index: u64) -> SnapshotMetaOf<C> {
        SnapshotMetaOf::<C> { last_log_id: Some(openraft::testing::log_id::<C>(1, 1, index)), ..Default::default() }
    }

    /// A snapshot built from an older state never replaces one installed
    /// from the leader meanwhile; an installed one always lands.
    #[test]
    fn a_built_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots =
            SnapshotDir { path: dir.path().to_path_buf(), on_disk: std::sync::Mutex::new(None), data_format: None };
        let write = |index: u64, only_if_newer: bool| {
            let data = SnapshotData::Memory(index.to_le_bytes().to_vec());
            snapshots.write(&meta_at(index), 0, Source::Data(&data), only_if_newer).unwrap().is_some()
        };
        let on_disk = || snapshots.read().unwrap().unwrap().meta.last_log_id.map(|l| l.index);
        assert!(write(10, true));
        assert!(write(50, false), "installed");
        assert!(!write(40, true), "an older build replaced a newer snapshot");
        assert!(!write(50, true));
        assert_eq!(on_disk(), Some(50));
        assert!(write(60, true));
        assert!(write(20, false), "the leader's snapshot always lands");
        assert_eq!(on_disk(), Some(20));
    }

    /// A snapshot of another shard in a shard's directory is refused as
    /// invalid data (set aside at open like a damaged one), not a panic.
    #[test]
    fn a_snapshot_of_another_shard_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = QueueState::new(ShardId(1));
        write_snapshot_file(dir.path(), &meta_at(3), Source::State(&other), 0).unwrap();
        let (events, _rx) = mpsc::unbounded_channel();
        let opened = StateMachineStore::open(
            ShardId(0),
            dir.path().to_path_buf(),
            events,
            0,
            std::time::Duration::from_secs(60),
            None,
            PayloadSpill::new(&dir.path().join("payloads"), u64::MAX),
        );
        let error = opened.map(|_| ()).expect_err("a snapshot of shard 1 opened as shard 0");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("a snapshot of shard 1 in shard 0's directory"), "{error}");
    }
}
