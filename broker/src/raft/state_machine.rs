//! The openraft state machine: applies committed batches to the shard's
//! `QueueState`, hands the resulting events to the leader's dispatcher, and
//! writes snapshots to `<data-dir>/snapshots/<shard>/`.

use std::{
    fs, io,
    io::{Cursor, Write},
    path::{Path, PathBuf},
    sync::{Arc, RwLock, RwLockReadGuard},
};

use futures::{Stream, TryStreamExt};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder,
    storage::{EntryResponder, RaftStateMachine},
    type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf},
};
use tokio::sync::mpsc;

use super::types::{BatchResponse, TypeConfig};
use crate::format::{header::DataDirFormat, table::FORMAT_MAX};
use crate::metrics::Counters;
use crate::queue::{
    Command, Event, QueueState, ShardId,
    snapshot::{decode_snapshot_v1, encode_snapshot_v1},
};

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

/// The digest of `queue`'s state (see [`StateDigest`]).
pub fn digest_of(queue: &QueueState) -> [u8; 16] {
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
        crate::format::storage::encode_state(queue, &mut |bytes| hashing.0.update(bytes));
    }
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&hashing.0.finalize()[..16]);
    digest
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
        let mut digests = self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        digests.clear();
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
            let digest = StateDigest { index, digest: digest_of(&queue) };
            drop(queue);
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
    fn read(&self) -> io::Result<Option<SnapshotFileV1>> {
        read_snapshot_file(&self.path)
    }

    /// Writes `file` unless `only_if_newer` and the one on disk is as new;
    /// says whether it wrote.
    fn write(&self, file: &SnapshotFileV1, only_if_newer: bool) -> io::Result<bool> {
        let mut on_disk = self.on_disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let index = file.meta.last_log_id.map(|l| l.index);
        if only_if_newer && on_disk.is_some() && *on_disk >= index {
            return Ok(false);
        }
        let container = match &self.data_format {
            Some(data_format) => {
                data_format.ensure(file.format)?;
                data_format.current()
            }
            None => file.format,
        };
        write_snapshot_file(&self.path, file, container)?;
        *on_disk = index;
        Ok(true)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotFileV1 {
    meta: SnapshotMetaOf<C>,
    /// As bytes, not a sequence of u8: the same postcard encoding, written
    /// and read in one piece instead of a call per byte.
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    /// The shard's format in `data` (not stored: `data` says it).
    #[serde(skip)]
    format: u32,
}

/// Before `ShardState` bytes of format 1 on; format 0's data starts with
/// `GNTSNAP1` (queue::snapshot).
const STATE_MAGIC_V2: &[u8; 8] = b"GNTSTAT2";

/// A shard's state as a snapshot carries it (on disk and to followers), in
/// the encoding of the shard's format: postcard at 0, so that binaries
/// before format gates can install it.
pub fn encode_state_data(queue: &QueueState) -> Vec<u8> {
    if queue.format() == 0 {
        return encode_snapshot_v1(queue);
    }
    let mut data = STATE_MAGIC_V2.to_vec();
    crate::format::storage::encode_state(queue, &mut |bytes| data.extend_from_slice(bytes));
    data
}

pub fn decode_state_data(data: &[u8]) -> Result<QueueState, String> {
    match data.strip_prefix(STATE_MAGIC_V2.as_slice()) {
        Some(body) => crate::format::storage::decode_state(body).map_err(|e| format!("shard state: {e}")),
        None => decode_snapshot_v1(data).map_err(|e| e.to_string()),
    }
}

impl SnapshotFileV1 {
    fn into_snapshot(self) -> SnapshotOf<C, Cursor<Vec<u8>>> {
        SnapshotOf::<C, _> { meta: self.meta, snapshot: Cursor::new(self.data) }
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
    ) -> io::Result<Self> {
        fs::create_dir_all(&snapshot_dir)?;
        let mut applied =
            AppliedState { queue: QueueState::new(shard), last_applied: None, membership: Default::default() };
        let snapshot = read_snapshot_file(&snapshot_dir)?;
        let on_disk = snapshot.as_ref().and_then(|file| file.meta.last_log_id.map(|l| l.index));
        if let Some(file) = snapshot {
            applied.queue = decode_state_data(&file.data).map_err(|e| invalid(&snapshot_dir, e))?;
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
        Ok(StateMachineStore {
            shared: Arc::new(ShardState {
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
            }),
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

/// The snapshot file: a magic, the payload's length (u64 LE) and CRC32
/// (u32 LE), then the payload: from storage format 1 `snapshot-v3.bin`
/// (`GSNAP3`, a `gantry.storage.v1.SnapshotFile`), at format 0
/// `snapshot-v2.bin` (`GSNAP2`, postcard of `SnapshotFileV1`). A bit flipped
/// anywhere is found at open, never decoded into a wrong state.
const SNAPSHOT_FILE_V3: &str = "snapshot-v3.bin";
const SNAPSHOT_MAGIC_V3: &[u8; 8] = b"GSNAP3\0\0";
const SNAPSHOT_FILE: &str = "snapshot-v2.bin";
const SNAPSHOT_MAGIC: &[u8; 8] = b"GSNAP2\0\0";
const SNAPSHOT_HEADER_LEN: usize = 20;
/// Written by versions before the checksum: the bare payload.
const SNAPSHOT_FILE_V1: &str = "snapshot-v1.bin";

fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot {}: {why}", path.display()))
}

fn read_snapshot_file(dir: &Path) -> io::Result<Option<SnapshotFileV1>> {
    for (name, magic) in [(SNAPSHOT_FILE_V3, SNAPSHOT_MAGIC_V3), (SNAPSHOT_FILE, SNAPSHOT_MAGIC)] {
        let path = dir.join(name);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let payload = checked_payload(&path, &bytes, magic)?;
        let mut file: SnapshotFileV1 = if magic == SNAPSHOT_MAGIC_V3 {
            let file = <gantry_proto::storage::SnapshotFile as prost::Message>::decode(payload)
                .map_err(|e| invalid(&path, e))?;
            let (meta, data) = crate::format::storage::snapshot_file_from_pb(file).map_err(|e| invalid(&path, e))?;
            SnapshotFileV1 { meta, data, format: 0 }
        } else {
            postcard::from_bytes(payload).map_err(|e| invalid(&path, e))?
        };
        file.format = data_format_of(&file.data);
        return Ok(Some(file));
    }
    let path = dir.join(SNAPSHOT_FILE_V1);
    match fs::read(&path) {
        Ok(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(|e| invalid(&path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lowest storage format that can hold `data`: 0 for postcard, 1 for
/// the `ShardState` encoding (its own format field may be higher; the
/// data directory was raised to it before the file was written).
pub fn data_format_of(data: &[u8]) -> u32 {
    u32::from(data.starts_with(STATE_MAGIC_V2.as_slice()))
}

fn checked_payload<'a>(path: &Path, bytes: &'a [u8], magic: &[u8; 8]) -> io::Result<&'a [u8]> {
    let Some((header, payload)) = bytes.split_first_chunk::<SNAPSHOT_HEADER_LEN>() else {
        return Err(invalid(path, format!("{} bytes, shorter than its header", bytes.len())));
    };
    if &header[..8] != magic {
        return Err(invalid(path, "not a Gantry snapshot (bad magic)"));
    }
    let len = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
    if len != payload.len() as u64 {
        return Err(invalid(path, format!("holds {} payload bytes, its header says {len}", payload.len())));
    }
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(invalid(path, format!("checksum {actual:08x}, its header says {crc:08x}")));
    }
    Ok(payload)
}

/// Durable replace: a crash leaves the old snapshot or the new one, never a
/// torn file, because the log behind a snapshot is purged. `container`: the
/// data directory's storage format (the file's encoding).
fn write_snapshot_file(dir: &Path, file: &SnapshotFileV1, container: u32) -> io::Result<()> {
    let (name, magic, payload) = if container >= 1 {
        let pb = crate::format::storage::snapshot_file_to_pb(&file.meta, file.data.clone());
        (SNAPSHOT_FILE_V3, SNAPSHOT_MAGIC_V3, prost::Message::encode_to_vec(&pb))
    } else {
        (SNAPSHOT_FILE, SNAPSHOT_MAGIC, postcard::to_stdvec(file).map_err(io::Error::other)?)
    };
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = io::BufWriter::new(fs::File::create(&tmp)?);
    f.write_all(magic)?;
    f.write_all(&(payload.len() as u64).to_le_bytes())?;
    f.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
    f.write_all(&payload)?;
    f.into_inner().map_err(io::IntoInnerError::into_error)?.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    for older in [SNAPSHOT_FILE_V3, SNAPSHOT_FILE, SNAPSHOT_FILE_V1].into_iter().filter(|n| *n != name) {
        match fs::remove_file(dir.join(older)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    fs::File::open(dir)?.sync_all()
}

/// Moves the shard's snapshot file (found corrupt) out of the way, kept for
/// a post-mortem; returns where it went.
pub fn set_snapshot_aside(dir: &Path) -> io::Result<Option<PathBuf>> {
    let Some(name) =
        [SNAPSHOT_FILE_V3, SNAPSHOT_FILE, SNAPSHOT_FILE_V1].into_iter().find(|name| dir.join(name).exists())
    else {
        return Ok(None);
    };
    let aside = (0..).map(|n| dir.join(format!("{name}.corrupt-{n}"))).find(|p| !p.exists()).expect("an unused name");
    fs::rename(dir.join(name), &aside)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(Some(aside))
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<C, Cursor<Vec<u8>>>> {
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
            let format = queue.format();
            let data = encode_state_data(&queue);
            drop(queue);
            let file = SnapshotFileV1 { meta, data, format };
            if !snapshots.write(&file, true)? {
                // A snapshot installed from the leader meanwhile is newer: it stands.
                if let Some(newer) = snapshots.read()? {
                    tracing::info!(shard = %shared.shard, index = ?newer.meta.last_log_id.map(|l| l.index), "a newer snapshot was installed meanwhile; kept it");
                    return Ok(newer.into_snapshot());
                }
            }
            tracing::info!(
                shard = %shared.shard,
                index = ?file.meta.last_log_id.map(|l| l.index),
                bytes = file.data.len(),
                ?copied,
                elapsed = ?started.elapsed(),
                "snapshot written"
            );
            Ok(file.into_snapshot())
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<C> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;
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

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, snapshot: Cursor<Vec<u8>>) -> io::Result<()> {
        let data = snapshot.into_inner();
        let queue = decode_state_data(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        check_format_supported(queue.format())?;
        let file = SnapshotFileV1 { meta: meta.clone(), data, format: queue.format() };
        let snapshots = self.snapshots.clone();
        let file = tokio::task::spawn_blocking(move || snapshots.write(&file, false).map(|_| file))
            .await
            .map_err(io::Error::other)??;
        let mut applied = self.write();
        self.shared.format.store(queue.format(), std::sync::atomic::Ordering::Release);
        applied.queue = queue;
        applied.last_applied = file.meta.last_log_id;
        applied.membership = file.meta.last_membership;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<C, Cursor<Vec<u8>>>>> {
        let snapshots = self.snapshots.clone();
        let file = tokio::task::spawn_blocking(move || snapshots.read()).await.map_err(io::Error::other)??;
        Ok(file.map(SnapshotFileV1::into_snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot built from an older state never replaces one installed
    /// from the leader meanwhile; an installed one always lands.
    #[test]
    fn a_built_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots =
            SnapshotDir { path: dir.path().to_path_buf(), on_disk: std::sync::Mutex::new(None), data_format: None };
        let at = |index: u64| SnapshotFileV1 {
            meta: SnapshotMetaOf::<C> {
                last_log_id: Some(openraft::testing::log_id::<C>(1, 1, index)),
                ..Default::default()
            },
            data: index.to_le_bytes().to_vec(),
            format: 0,
        };
        let on_disk = || snapshots.read().unwrap().unwrap().meta.last_log_id.map(|l| l.index);
        assert!(snapshots.write(&at(10), true).unwrap());
        assert!(snapshots.write(&at(50), false).unwrap(), "installed");
        assert!(!snapshots.write(&at(40), true).unwrap(), "an older build replaced a newer snapshot");
        assert!(!snapshots.write(&at(50), true).unwrap());
        assert_eq!(on_disk(), Some(50));
        assert!(snapshots.write(&at(60), true).unwrap());
        assert!(snapshots.write(&at(20), false).unwrap(), "the leader's snapshot always lands");
        assert_eq!(on_disk(), Some(20));
    }

    /// Snapshot files written before `data` was marked as bytes, and
    /// before the checksummed container (`snapshot-v1.bin`), still read;
    /// the container's payload is the same postcard bytes.
    #[test]
    fn snapshot_payload_is_unchanged_and_older_files_still_read() {
        #[derive(serde::Serialize)]
        struct AsSequence {
            meta: SnapshotMetaOf<C>,
            data: Vec<u8>,
        }
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let meta = SnapshotMetaOf::<C>::default();
        let old = postcard::to_allocvec(&AsSequence { meta: meta.clone(), data: data.clone() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_snapshot_file(dir.path(), &SnapshotFileV1 { meta, data: data.clone(), format: 0 }, 0).unwrap();
        assert_eq!(fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap()[SNAPSHOT_HEADER_LEN..], old);
        assert_eq!(read_snapshot_file(dir.path()).unwrap().unwrap().data, data);

        let older = tempfile::tempdir().unwrap();
        fs::write(older.path().join(SNAPSHOT_FILE_V1), &old).unwrap();
        assert_eq!(read_snapshot_file(older.path()).unwrap().unwrap().data, data);
        // The next snapshot replaces it with the checksummed file.
        write_snapshot_file(older.path(), &SnapshotFileV1 { meta: Default::default(), data: vec![1], format: 0 }, 0)
            .unwrap();
        assert!(!older.path().join(SNAPSHOT_FILE_V1).exists());
    }

    /// A snapshot of another shard in a shard's directory is refused as
    /// invalid data (set aside at open like a damaged one), not a panic.
    #[test]
    fn a_snapshot_of_another_shard_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = encode_snapshot_v1(&QueueState::new(ShardId(1)));
        write_snapshot_file(dir.path(), &SnapshotFileV1 { meta: Default::default(), data, format: 0 }, 0).unwrap();
        let (events, _rx) = mpsc::unbounded_channel();
        let opened = StateMachineStore::open(
            ShardId(0),
            dir.path().to_path_buf(),
            events,
            0,
            std::time::Duration::from_secs(60),
            None,
        );
        let error = opened.map(|_| ()).expect_err("a snapshot of shard 1 opened as shard 0");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("a snapshot of shard 1 in shard 0's directory"), "{error}");
    }

    /// From storage format 1 the file is `snapshot-v3.bin` (protobuf), the
    /// older files go, and a shard state of format 1 round-trips through it;
    /// a bit flipped anywhere is found there too.
    #[test]
    fn a_format_1_snapshot_file_round_trips_and_replaces_the_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let meta =
            SnapshotMetaOf::<C> { last_log_id: Some(openraft::testing::log_id::<C>(3, 2, 90)), ..Default::default() };
        write_snapshot_file(dir.path(), &SnapshotFileV1 { meta: meta.clone(), data: vec![1; 10], format: 0 }, 0)
            .unwrap();
        let mut queue = QueueState::new(ShardId(0));
        let raise = crate::queue::Batch { proposed_at_ms: 5, commands: vec![Command::SetFormat { format: 1 }].into() };
        queue.apply(1, &raise);
        let data = encode_state_data(&queue);
        assert!(data.starts_with(STATE_MAGIC_V2), "a format-1 shard is encoded as format 1");
        write_snapshot_file(dir.path(), &SnapshotFileV1 { meta: meta.clone(), data: data.clone(), format: 1 }, 1)
            .unwrap();
        assert!(!dir.path().join(SNAPSHOT_FILE).exists() && dir.path().join(SNAPSHOT_FILE_V3).exists());
        let read = read_snapshot_file(dir.path()).unwrap().unwrap();
        assert_eq!((read.meta, read.format), (meta, 1));
        assert_eq!(decode_state_data(&read.data).unwrap(), queue);
        let path = dir.path().join(SNAPSHOT_FILE_V3);
        let good = fs::read(&path).unwrap();
        for at in (0..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[at] ^= 1 << (at % 8);
            fs::write(&path, &bad).unwrap();
            let error = read_snapshot_file(dir.path()).map(|_| ()).expect_err("a flipped bit went unnoticed");
            assert!(error.to_string().contains("snapshot-v3.bin"), "{error}");
        }
    }

    /// Any flipped bit of the file, header or payload, is found when it is
    /// read, and named; the file set aside is kept.
    #[test]
    fn a_flipped_bit_anywhere_in_a_snapshot_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let meta =
            SnapshotMetaOf::<C> { last_log_id: Some(openraft::testing::log_id::<C>(2, 1, 77)), ..Default::default() };
        write_snapshot_file(dir.path(), &SnapshotFileV1 { meta, data: vec![9; 300], format: 0 }, 0).unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let good = fs::read(&path).unwrap();
        for at in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[at] ^= 1 << (at % 8);
            fs::write(&path, &bad).unwrap();
            let error = read_snapshot_file(dir.path()).map(|_| ()).expect_err("a flipped bit went unnoticed");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "byte {at}: {error}");
            assert!(error.to_string().contains("snapshot-v2.bin"), "{error}");
        }
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(read_snapshot_file(dir.path()).is_err(), "a cut snapshot was read");
        let aside = set_snapshot_aside(dir.path()).unwrap().expect("a snapshot to set aside");
        assert!(aside.exists() && !path.exists());
        assert!(set_snapshot_aside(dir.path()).unwrap().is_none());
        assert!(read_snapshot_file(dir.path()).unwrap().is_none());
    }
}
