//! The Raft log store: openraft's `RaftLogStorage` on one raft-engine instance
//! shared by every Raft group (shard) of this node.
//!
//! Owns the on-disk format of log entries and of each group's small metadata
//! (vote, committed and last purged log ids), and the durability of appends
//! and votes. Each group is one raft-engine region whose id is the group id,
//! so the engine's write group commits the appends of all groups with one
//! fdatasync and its purge reports the groups that need a snapshot directly.
//!
//! Must not: keep job data or snapshots in the engine (its key-value store is
//! held in memory), or call raft-engine from an async thread or from a thread
//! that is not its engine's own (see [`io_threads`]).
//!
//! Format `v1` (a new format gets new keys and a new entry tag):
//! - an entry is a protobuf `BytesValue` (raft-engine only stores rust-protobuf
//!   messages) holding `index: u64 BE ++ ENTRY_FORMAT_V1 ++ postcard(entry)`;
//! - metadata are postcard values under the keys `v1/*` (storage format 0)
//!   or `gantry.storage.v1.MetaValue` under `v2/*` (format 1 on; see `Meta`);
//! - format 1 entries carry tag 2 and the type config's own encoding
//!   (`StoredEntries`): both tags are read in any mix.

use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use futures::TryStreamExt;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use openraft::type_config::alias::EntryOf;
use openraft::type_config::alias::LeaderIdOf;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;
use openraft::vote::RaftLeaderId;
use openraft::vote::RaftVote;
use protobuf::well_known_types::BytesValue;
use raft_engine::Command;
use raft_engine::Engine;
use raft_engine::LogBatch;
use raft_engine::MessageExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use super::guard::{Guard, GuardFound, GuardVote};
use super::log_tail::LogTail;
use super::timings::Timings;
use crate::format::header::DataDirFormat;
use tokio::task::JoinHandle;

#[cfg(test)]
#[path = "log_store_test.rs"]
mod tests;

/// Metadata keys: `v1/*` hold postcard (storage format 0), `v2/*` a
/// `gantry.storage.v1.MetaValue` (format 1 on). A value is read from `v2`
/// when there, else from `v1`; written as the data directory's format says,
/// the other key dropped in the same batch.
#[derive(Clone, Copy, Debug)]
enum Meta {
    Vote,
    Committed,
    Purged,
}

impl Meta {
    fn v1(self) -> &'static [u8] {
        match self {
            Meta::Vote => b"v1/vote",
            Meta::Committed => b"v1/committed",
            Meta::Purged => b"v1/purged",
        }
    }

    fn v2(self) -> &'static [u8] {
        match self {
            Meta::Vote => b"v2/vote",
            Meta::Committed => b"v2/committed",
            Meta::Purged => b"v2/purged",
        }
    }
}

/// Tag after the index prefix of a stored entry: postcard of `C::Entry`
/// (storage format 0).
const ENTRY_FORMAT_V1: u8 = 1;
/// Tag of an entry in its type config's own encoding (storage format 1 on:
/// `gantry.storage.v1.LogEntry`).
const ENTRY_FORMAT_V2: u8 = 2;

/// How a type config's entries are stored from storage format 1 on (format
/// 0 is their postcard encoding), and which entries need the data directory
/// raised before they are written.
pub trait StoredEntries: RaftTypeConfig {
    fn encode_stored(entry: &EntryOf<Self>, out: &mut Vec<u8>);
    fn decode_stored(bytes: &[u8]) -> std::result::Result<EntryOf<Self>, String>;
    /// The storage format the data directory must allow before `entry` is
    /// written: a builds that cannot read what follows it must not start on
    /// a log that holds it.
    fn format_needed(entry: &EntryOf<Self>) -> u32;
    fn log_id_to_pb(log_id: &LogIdOf<Self>) -> MetaLogId;
    fn log_id_from_pb(log_id: MetaLogId) -> LogIdOf<Self>;
    fn vote_to_pb(vote: &VoteOf<Self>) -> MetaVote;
    fn vote_from_pb(vote: MetaVote) -> VoteOf<Self>;
}

use gantry_proto::storage::{LogId as MetaLogId, MetaValue, Vote as MetaVote};
const ENTRY_HEADER_LEN: usize = 9;

/// Upper bound on the bytes one replication read returns; openraft already
/// caps the entry count (`max_payload_entries`), this caps large payloads.
const REPLICATION_READ_BYTES_MAX: usize = 8 << 20;
/// Chunk size of `entries_stream`, so that applying a long committed range
/// (a restart replaying the log since the snapshot) never holds it all.
const STREAM_CHUNK_ENTRIES_MAX: u64 = 1024;
const STREAM_CHUNK_BYTES_MAX: usize = 8 << 20;
/// A read races a purge or truncation of the same group at most this often
/// before its error is reported.
const READ_ATTEMPTS_MAX: usize = 3;
/// Bounds of the newest entries each group keeps decoded in memory
/// ([`LogTail`]): what apply and replication to followers a few hundred
/// milliseconds behind read, at 60,000 jobs/s. Decoded entries take more
/// memory than their encoding (about 1.7 times for 256-byte jobs): at
/// 32 MiB the tail was a fifth of a node's memory after a million enqueues.
const TAIL_ENTRIES_MAX: usize = 4096;
const TAIL_BYTES_MAX: usize = 8 << 20;

/// Errors of the log storage layer. openraft sees them as `io::Error`; any
/// of them reported to openraft stops the group (a storage failure is fatal).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create the raft log directory {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("raft-engine: {0}")]
    Engine(#[from] raft_engine::Error),

    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },

    #[error("the data directory's format: {0}")]
    DataDir(String),

    #[error("group {group}: stored {what} is corrupt: {reason}")]
    Corrupt { group: u64, what: String, reason: String },

    /// Raft must never do this; raft-engine would panic on it.
    #[error(
        "group {group}: append at index {at} refused: the log takes indexes {accepts:?} \
         (anything else leaves a hole or overwrites purged entries)"
    )]
    NonContiguousAppend { group: u64, at: u64, accepts: RangeInclusive<u64> },

    #[error("group {group}: cannot keep the log up to {keep:?}: entries up to {purged} are purged")]
    TruncateBelowPurged { group: u64, keep: Option<u64>, purged: u64 },

    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),

    #[error("group {group}: cannot write the durability record (raft-guard): {source}")]
    Guard {
        group: u64,
        #[source]
        source: io::Error,
    },

    #[error("group {group}: an earlier log flush failed: {reason}")]
    FlushFailed { group: u64, reason: String },

    #[error("raft-engine is still held by {handles} other handles after {waited:?}")]
    EngineInUse { handles: usize, waited: Duration },
}

impl From<StorageError> for io::Error {
    fn from(e: StorageError) -> Self {
        let kind = match &e {
            StorageError::NonContiguousAppend { .. } | StorageError::TruncateBelowPurged { .. } => {
                io::ErrorKind::InvalidInput
            }
            StorageError::Corrupt { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Opens (or creates) the node's raft-engine in `dir`; one per node, shared
/// by all its groups. One engine at a time may hold `dir` (raft-engine locks
/// it): to open it again in the same process, close it with [`close_engine`].
pub fn open_engine(dir: &Path) -> Result<Arc<Engine>, StorageError> {
    // raft-engine creates only the last component of its directory.
    std::fs::create_dir_all(dir).map_err(|source| StorageError::CreateDir { path: dir.to_path_buf(), source })?;
    let config = raft_engine::Config {
        dir: dir.to_string_lossy().into_owned(),
        // Snapshots purge the log long before this; the threshold only bounds
        // the disk a group that cannot snapshot may pin (the purge task then
        // names it).
        purge_threshold: raft_engine::ReadableSize::gb(1),
        // No LZ4: every batch was compressed on write and the whole batch
        // decompressed again on each read (replication to every follower,
        // apply), several percent of every node's CPU. Batches written
        // compressed by an older version are still read.
        batch_compression_threshold: raft_engine::ReadableSize(0),
        ..Default::default()
    };
    Ok(Arc::new(Engine::open(config)?))
}

/// Waits until `engine` is the last strong handle, then closes it, so that
/// the directory can be opened again. `Raft::shutdown()` returns before the
/// storage handles drop, and each store's flush task ends only after its last
/// callback: reopening at once would fail on raft-engine's directory lock.
pub async fn close_engine(engine: Arc<Engine>, timeout: Duration) -> Result<(), StorageError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut engine = engine;
    loop {
        match Arc::try_unwrap(engine) {
            Ok(engine) => {
                forget_dead_engines();
                // Dropping joins raft-engine's background thread: not on an async thread.
                tokio::task::spawn_blocking(move || drop(engine)).await?;
                return Ok(());
            }
            Err(shared) if tokio::time::Instant::now() >= deadline => {
                return Err(StorageError::EngineInUse { handles: Arc::strong_count(&shared) - 1, waited: timeout });
            }
            Err(shared) => {
                engine = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Periodically lets raft-engine delete log files no group needs any more and
/// logs the groups whose old entries keep files alive: they need a snapshot
/// (and a purge) before their files can go. Holds only a weak handle, so it
/// never keeps the engine open; it ends once the engine is closed.
pub fn spawn_purge_task(engine: Arc<Engine>, every: Duration) -> JoinHandle<()> {
    let engine = Arc::downgrade(&engine);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate: nothing to purge at startup
        loop {
            ticks.tick().await;
            let Some(engine) = engine.upgrade() else {
                return;
            };
            // Purging rewrites old entries, a read: on the engine's own threads.
            let purged = io_threads(&engine).spawn_blocking(move || engine.purge_expired_files()).await;
            match purged {
                Ok(Ok(groups)) if groups.is_empty() => {}
                Ok(Ok(groups)) => tracing::warn!(
                    ?groups,
                    "raft log files are held by old entries of these groups: snapshot them so their logs can be purged"
                ),
                Ok(Err(error)) => tracing::error!(%error, "raft-engine purge failed"),
                Err(error) => tracing::error!(%error, "raft-engine purge task failed"),
            }
        }
    })
}

/// The blocking threads that run every call into `engine`.
///
/// raft-engine 0.4.2 keeps the last block it read in a thread-local cache
/// keyed only by (file sequence, offset, length), not by engine. A thread that
/// read from one engine can serve its block to another engine of the process
/// (in-process clusters and tests open several; a restart in-process opens the
/// same directory again, maybe with its files changed meanwhile). So each
/// engine instance gets threads that never touch another one: a blocking pool
/// of its own, from a runtime that only ever runs blocking tasks.
fn io_threads(engine: &Arc<Engine>) -> Handle {
    let mut pools = ENGINE_IO_POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    prune(&mut pools);
    // The `Weak` keeps the engine's allocation, so no other engine can take
    // its address while the entry exists.
    if let Some((_, pool)) = pools.iter().find(|(e, _)| std::ptr::eq(e.as_ptr(), Arc::as_ptr(engine))) {
        return pool.handle().clone();
    }
    let pool = tokio::runtime::Builder::new_current_thread()
        .thread_name("raft-engine-io")
        .max_blocking_threads(ENGINE_IO_THREADS_MAX)
        .build()
        .expect("cannot start raft-engine I/O threads");
    let handle = pool.handle().clone();
    pools.push((Arc::downgrade(engine), pool));
    handle
}

/// Synced writes of many groups wait in raft-engine's write group together,
/// and reads must not queue behind them.
const ENGINE_IO_THREADS_MAX: usize = 32;

static ENGINE_IO_POOLS: Mutex<Vec<(Weak<Engine>, tokio::runtime::Runtime)>> = Mutex::new(Vec::new());

fn forget_dead_engines() {
    prune(&mut ENGINE_IO_POOLS.lock().unwrap_or_else(PoisonError::into_inner));
}

fn prune(pools: &mut Vec<(Weak<Engine>, tokio::runtime::Runtime)>) {
    let mut i = 0;
    while i < pools.len() {
        if pools[i].0.strong_count() == 0 {
            // Dropping a runtime blocks, which is not allowed on async threads.
            pools.swap_remove(i).1.shutdown_background();
        } else {
            i += 1;
        }
    }
}

/// Reads one group's log; cheap to clone, one per replication stream.
pub struct EngineLogReader<C: StoredEntries> {
    engine: Arc<Engine>,
    group: u64,
    io: Handle,
    tail: Arc<Mutex<LogTail<EntryOf<C>>>>,
    /// The data directory's storage format: what entries and metadata are
    /// written in (none: format 0).
    data_format: Option<Arc<DataDirFormat>>,
    // `fn() -> C`: the reader stores no `C`, so it is Send + Sync whatever `C` is.
    _config: PhantomData<fn() -> C>,
}

impl<C: StoredEntries> Clone for EngineLogReader<C> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            group: self.group,
            io: self.io.clone(),
            tail: self.tail.clone(),
            data_format: self.data_format.clone(),
            _config: PhantomData,
        }
    }
}

/// openraft log storage of one Raft group (`group` = shard id) in the shared
/// engine. Its methods must run inside a tokio runtime.
pub struct EngineLogStore<C: StoredEntries> {
    reader: EngineLogReader<C>,
    /// Started on the first append; see [`run_flusher`].
    flusher: Option<std::sync::mpsc::Sender<IOFlushed<C>>>,
    durable: Option<Arc<DurableMark>>,
    /// The committed id openraft saved last, until a flush writes it.
    committed: Arc<PendingCommitted<C>>,
    timings: Option<Arc<Timings>>,
    /// Held by the store and its flush thread: see [`Self::alive_probe`].
    alive: Arc<()>,
}

/// `Some` while a committed id is waiting for the flusher's next sync.
type PendingCommitted<C> = Mutex<Option<Option<LogIdOf<C>>>>;

/// What the flush task raises the group's acknowledged index to: the last
/// index appended before a sync is durable after it.
struct DurableMark {
    guard: Arc<Guard>,
    appended: AtomicU64,
}

impl<C: StoredEntries> EngineLogStore<C>
where
    EntryOf<C>: Clone,
{
    pub fn new(engine: Arc<Engine>, group: u64) -> Self {
        Self {
            reader: EngineLogReader {
                io: io_threads(&engine),
                engine,
                group,
                tail: Arc::new(Mutex::new(LogTail::new(TAIL_ENTRIES_MAX, TAIL_BYTES_MAX))),
                data_format: None,
                _config: PhantomData,
            },
            flusher: None,
            durable: None,
            timings: None,
            committed: Arc::new(Mutex::new(None)),
            alive: Arc::new(()),
        }
    }

    /// Writes entries in the newest encoding `data_format` allows, raising
    /// it first when an entry needs it (see [`StoredEntries::format_needed`]).
    pub fn with_data_format(mut self, data_format: Arc<DataDirFormat>) -> Self {
        self.reader.data_format = Some(data_format);
        self
    }

    /// Keeps `guard` at the highest index this store acknowledged as
    /// durable (raised with every flush, lowered by truncation) and at the
    /// last vote it saved.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        let appended = AtomicU64::new(guard.acknowledged());
        self.durable = Some(Arc::new(DurableMark { guard, appended }));
        self
    }

    /// Records the duration of every synced write in `timings`.
    pub fn with_timings(mut self, timings: Arc<Timings>) -> Self {
        self.timings = Some(timings);
        self
    }

    /// Can no longer be upgraded once the store and its flush thread are
    /// gone, so nothing of it writes to the engine any more.
    pub fn alive_probe(&self) -> Weak<()> {
        Arc::downgrade(&self.alive)
    }

    /// The index the log was purged through, if it ever was.
    pub fn recovered_purge_point(&self) -> Result<Option<u64>> {
        let purged: Option<LogIdOf<C>> = get_purged::<C>(self.engine(), self.group())?;
        Ok(purged.map(|p| p.index()))
    }

    pub fn group(&self) -> u64 {
        self.reader.group
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.reader.engine
    }

    fn flusher(&mut self) -> io::Result<&std::sync::mpsc::Sender<IOFlushed<C>>> {
        if self.flusher.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            let (engine, group) = (self.reader.engine.clone(), self.reader.group);
            let (durable, committed, timings) = (self.durable.clone(), self.committed.clone(), self.timings.clone());
            let data_format = self.reader.data_format.clone();
            let alive = self.alive.clone();
            std::thread::Builder::new().name(format!("raft-flush-{group}")).spawn(move || {
                run_flusher(engine, group, durable, committed, timings, data_format, rx);
                drop(alive);
            })?;
            self.flusher = Some(tx);
        }
        Ok(self.flusher.as_ref().expect("started above"))
    }

    /// Runs `f` on the blocking pool with this group's engine.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Engine, u64) -> Result<T> + Send + 'static,
    {
        self.reader.blocking(f).await
    }
}

/// Completes one group's append callbacks once their entries are on disk.
///
/// `append` writes unsynced and returns (the entries are then readable, as
/// openraft requires), so Raft can replicate to followers while the local
/// fsync runs. This thread then makes a synced write: raft-engine fdatasyncs
/// its active file after it, covering every earlier write of this group (a
/// file is synced when rotated out). Callbacks queued meanwhile share the next
/// sync, and the synced writes of all groups share one fdatasync when they
/// meet in raft-engine's write group. That write also carries the committed
/// id openraft saved last, which costs no write of its own then.
///
/// A thread of its own, not a task: each flush would otherwise cost a task
/// wake-up and two trips to the blocking pool, on every node for every
/// entry. The acknowledged index is written to the guard by a second thread
/// at the same time as the log sync (one more fdatasync, in parallel): if
/// the log sync then fails, the guard is ahead of the log, which only makes
/// a restart cautious.
fn run_flusher<C: StoredEntries>(
    engine: Arc<Engine>,
    group: u64,
    durable: Option<Arc<DurableMark>>,
    committed: Arc<PendingCommitted<C>>,
    timings: Option<Arc<Timings>>,
    data_format: Option<Arc<DataDirFormat>>,
    callbacks: std::sync::mpsc::Receiver<IOFlushed<C>>,
) {
    let marker = durable.map(|durable| WatermarkWriter::spawn(group, durable));
    let take_committed = || committed.lock().unwrap_or_else(PoisonError::into_inner).take();
    // After a failed sync the state of the file is unknown: fail every later flush too.
    let mut failure: Option<String> = None;
    while let Ok(first) = callbacks.recv() {
        let mut waiting = vec![first];
        waiting.extend(callbacks.try_iter());
        if failure.is_none() {
            let marking = marker.as_ref().inspect(|marker| marker.start());
            let started = std::time::Instant::now();
            let synced = sync_group::<C>(&engine, group, take_committed(), meta_format(&data_format));
            if let (Some(timings), Ok(())) = (&timings, &synced) {
                timings.log_synced(started.elapsed());
            }
            if let Err(e) = synced {
                failure = Some(e.to_string());
            }
            if let Some(Err(e)) = marking.map(WatermarkWriter::finish) {
                failure = Some(format!("durability record: {e}"));
            }
            if let Some(reason) = &failure {
                tracing::error!(group, %reason, "raft log flush failed");
            }
        }
        for callback in waiting.drain(..) {
            let result = match &failure {
                None => Ok(()),
                Some(reason) => Err(io::Error::from(StorageError::FlushFailed { group, reason: reason.clone() })),
            };
            callback.io_completed(result);
        }
    }
    // The store is gone: a committed id saved since the last flush is kept too.
    if failure.is_none()
        && let Some(committed) = take_committed()
        && let Err(error) = sync_group::<C>(&engine, group, Some(committed), meta_format(&data_format))
    {
        tracing::warn!(group, %error, "cannot write the last committed id");
    }
}

/// The guard's writer thread: told the acknowledged index to record as a
/// flush starts, answers once it is on disk.
struct WatermarkWriter {
    durable: Arc<DurableMark>,
    targets: std::sync::mpsc::Sender<u64>,
    done: std::sync::mpsc::Receiver<io::Result<()>>,
}

impl WatermarkWriter {
    fn spawn(group: u64, durable: Arc<DurableMark>) -> Self {
        let (targets, target_rx) = std::sync::mpsc::channel::<u64>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let guard = durable.guard.clone();
        let spawned = std::thread::Builder::new().name(format!("raft-mark-{group}")).spawn(move || {
            for target in target_rx {
                if done_tx.send(guard.record_acknowledged(target)).is_err() {
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            // Every flush then fails, naming why: no acknowledgement without the mark.
            tracing::error!(group, error = %e, "cannot start the durability record's writer");
        }
        WatermarkWriter { durable, targets, done }
    }

    /// Starts recording the last index appended so far.
    fn start(&self) {
        let _ = self.targets.send(self.durable.appended.load(Ordering::Acquire));
    }

    fn finish(&self) -> io::Result<()> {
        self.done.recv().unwrap_or_else(|_| Err(io::Error::other("the durability record's writer is gone")))
    }
}

/// A synced write, of the committed id when there is one to save, else of
/// nothing: raft-engine skips empty batches and `Engine::sync()` does nothing
/// in 0.4.2, but compacting a region to index 0 removes no entry and is
/// still a write the engine must fsync.
fn sync_group<C: StoredEntries>(
    engine: &Engine,
    group: u64,
    committed: Option<Option<LogIdOf<C>>>,
    format: u32,
) -> Result<()> {
    let mut batch = LogBatch::with_capacity(1);
    match committed {
        Some(committed) => put_committed::<C>(&mut batch, group, &committed, format)?,
        None => batch.add_command(group, Command::Compact { index: 0 }),
    }
    engine.write(&mut batch, true)?;
    Ok(())
}

impl<C: StoredEntries> EngineLogReader<C>
where
    EntryOf<C>: Clone,
{
    fn meta_format(&self) -> u32 {
        meta_format(&self.data_format)
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, LogTail<EntryOf<C>>> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Engine, u64) -> Result<T> + Send + 'static,
    {
        let (engine, group) = (self.engine.clone(), self.group);
        self.io.spawn_blocking(move || f(&engine, group)).await?
    }

    /// Entries in `[start, end)` that the log holds, at most `max_bytes` of
    /// them (at least one); entries missing at either end are purged or not
    /// yet written.
    async fn read(&self, start: u64, end: u64, max_bytes: Option<usize>) -> Result<Vec<EntryOf<C>>> {
        if let Some(entries) = self.tail().get(start, end, max_bytes) {
            return Ok(entries);
        }
        self.blocking(move |engine, group| read_entries::<C>(engine, group, start, end, max_bytes)).await
    }
}

fn read_entries<C: StoredEntries>(
    engine: &Engine,
    group: u64,
    start: u64,
    end: u64,
    max_bytes: Option<usize>,
) -> Result<Vec<EntryOf<C>>> {
    let mut attempt = 1;
    loop {
        let (Some(first), Some(last)) = (engine.first_index(group), engine.last_index(group)) else {
            return Ok(Vec::new());
        };
        let (from, to) = (start.max(first), end.min(last + 1));
        if from >= to {
            return Ok(Vec::new());
        }
        let mut raw = Vec::new();
        match engine.fetch_entries_to::<EntryCodec>(group, from, to, max_bytes, &mut raw) {
            Ok(_) => {
                return raw.iter().zip(from..).map(|(bytes, index)| decode_entry::<C>(group, index, bytes)).collect();
            }
            // The bounds moved under us: a purge or truncation ran between reading
            // them and fetching. Read again with the new ones.
            Err(raft_engine::Error::EntryCompacted | raft_engine::Error::EntryNotFound)
                if attempt < READ_ATTEMPTS_MAX =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn last_log_id<C: StoredEntries>(engine: &Engine, group: u64) -> Result<Option<LogIdOf<C>>> {
    let Some(last) = engine.last_index(group) else {
        return Ok(None);
    };
    let entry = engine
        .get_entry::<EntryCodec>(group, last)?
        .ok_or_else(|| corrupt(group, format!("entry {last}"), "listed by the engine but not found"))?;
    Ok(Some(decode_entry::<C>(group, last, &entry)?.log_id()))
}

fn get_meta<T: DeserializeOwned>(
    engine: &Engine,
    group: u64,
    meta: Meta,
    from_v2: impl FnOnce(MetaValue) -> Option<T>,
) -> Result<Option<T>> {
    if let Some(bytes) = engine.get(group, meta.v2()) {
        let value = <MetaValue as prost::Message>::decode(bytes.as_slice())
            .map_err(|e| corrupt(group, String::from_utf8_lossy(meta.v2()), e))?;
        return from_v2(value).map(Some).ok_or_else(|| corrupt(group, String::from_utf8_lossy(meta.v2()), "empty"));
    }
    engine
        .get(group, meta.v1())
        .map(|bytes| postcard::from_bytes(&bytes).map_err(|e| corrupt(group, String::from_utf8_lossy(meta.v1()), e)))
        .transpose()
}

fn put_meta<T: Serialize>(
    batch: &mut LogBatch,
    group: u64,
    meta: Meta,
    value: &T,
    v2: MetaValue,
    format: u32,
) -> Result<()> {
    // Fails only for raft-engine's reserved `__` keys, which ours are not.
    if format >= 1 {
        batch.put(group, meta.v2().to_vec(), prost::Message::encode_to_vec(&v2))?;
        batch.delete(group, meta.v1().to_vec());
    } else {
        let bytes = postcard::to_allocvec(value).map_err(|source| StorageError::Encode { what: "metadata", source })?;
        batch.put(group, meta.v1().to_vec(), bytes)?;
    }
    Ok(())
}

fn get_vote<C: StoredEntries>(engine: &Engine, group: u64) -> Result<Option<VoteOf<C>>> {
    get_meta(engine, group, Meta::Vote, |v| v.vote.map(C::vote_from_pb))
}

fn get_purged<C: StoredEntries>(engine: &Engine, group: u64) -> Result<Option<LogIdOf<C>>> {
    get_meta(engine, group, Meta::Purged, |v| v.log_id.map(C::log_id_from_pb))
}

/// `None`: never saved; `Some(None)`: saved as none.
fn get_committed<C: StoredEntries>(engine: &Engine, group: u64) -> Result<Option<Option<LogIdOf<C>>>> {
    get_meta(engine, group, Meta::Committed, |v| Some(v.log_id.map(C::log_id_from_pb)))
}

fn put_vote<C: StoredEntries>(batch: &mut LogBatch, group: u64, vote: &VoteOf<C>, format: u32) -> Result<()> {
    let v2 = MetaValue { log_id: None, vote: Some(C::vote_to_pb(vote)) };
    put_meta(batch, group, Meta::Vote, vote, v2, format)
}

fn put_purged<C: StoredEntries>(batch: &mut LogBatch, group: u64, purged: &LogIdOf<C>, format: u32) -> Result<()> {
    let v2 = MetaValue { log_id: Some(C::log_id_to_pb(purged)), vote: None };
    put_meta(batch, group, Meta::Purged, purged, v2, format)
}

fn put_committed<C: StoredEntries>(
    batch: &mut LogBatch,
    group: u64,
    committed: &Option<LogIdOf<C>>,
    format: u32,
) -> Result<()> {
    let v2 = MetaValue { log_id: committed.as_ref().map(C::log_id_to_pb), vote: None };
    put_meta(batch, group, Meta::Committed, committed, v2, format)
}

/// What metadata is written in: the data directory's storage format.
fn meta_format(data_format: &Option<Arc<DataDirFormat>>) -> u32 {
    data_format.as_ref().map_or(0, |f| f.current())
}

fn corrupt(group: u64, what: impl Into<String>, reason: impl ToString) -> StorageError {
    StorageError::Corrupt { group, what: what.into(), reason: reason.to_string() }
}

/// Start and end (exclusive) of a range of log indexes.
fn index_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

/// Lets raft-engine find an entry's index: the 8-byte big-endian prefix.
struct EntryCodec;

impl MessageExt for EntryCodec {
    type Entry = BytesValue;

    fn index(entry: &BytesValue) -> u64 {
        // A short value is never written by us; u64::MAX fails raft-engine's own index check.
        entry.value.first_chunk::<8>().map_or(u64::MAX, |prefix| u64::from_be_bytes(*prefix))
    }
}

/// The bytes the log store keeps for `entry` in storage format `format`
/// (index prefix, tag, body): what golden-byte tests pin down.
pub fn stored_entry_bytes<C: StoredEntries>(entry: &EntryOf<C>, format: u32) -> Result<Vec<u8>> {
    Ok(encode_entry::<C>(entry, format)?.value)
}

/// Reads bytes the log store kept for the entry at `index`, in any format.
pub fn entry_from_stored_bytes<C: StoredEntries>(index: u64, bytes: Vec<u8>) -> Result<EntryOf<C>> {
    let mut message = BytesValue::new();
    message.value = bytes;
    decode_entry::<C>(0, index, &message)
}

fn encode_entry<C: StoredEntries>(entry: &EntryOf<C>, format: u32) -> Result<BytesValue> {
    let mut value = Vec::with_capacity(64);
    value.extend_from_slice(&entry.index().to_be_bytes());
    let value = if format >= 1 {
        value.push(ENTRY_FORMAT_V2);
        C::encode_stored(entry, &mut value);
        value
    } else {
        value.push(ENTRY_FORMAT_V1);
        postcard::to_extend(entry, value).map_err(|source| StorageError::Encode { what: "log entry", source })?
    };
    let mut message = BytesValue::new();
    message.value = value;
    Ok(message)
}

fn decode_entry<C: StoredEntries>(group: u64, index: u64, message: &BytesValue) -> Result<EntryOf<C>> {
    let what = || format!("entry {index}");
    let Some((header, body)) = message.value.split_first_chunk::<ENTRY_HEADER_LEN>() else {
        return Err(corrupt(group, what(), "shorter than its header"));
    };
    let entry: EntryOf<C> = match header[8] {
        ENTRY_FORMAT_V1 => postcard::from_bytes(body).map_err(|e| corrupt(group, what(), e))?,
        ENTRY_FORMAT_V2 => C::decode_stored(body).map_err(|e| corrupt(group, what(), e))?,
        other => return Err(corrupt(group, what(), format!("unknown entry format {other}"))),
    };
    if entry.index() != index {
        return Err(corrupt(group, what(), format!("holds the entry of index {}", entry.index())));
    }
    Ok(entry)
}

impl<C: StoredEntries> RaftLogReader<C> for EngineLogReader<C>
where
    EntryOf<C>: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<C>>> {
        let (start, end) = index_bounds(&range);
        Ok(self.read(start, end, None).await?)
    }

    /// Reads the vote from the engine's in-memory table: no I/O.
    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<C>>> {
        Ok(get_vote::<C>(&self.engine, self.group)?)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> io::Result<Vec<EntryOf<C>>> {
        Ok(self.read(start, end, Some(REPLICATION_READ_BYTES_MAX)).await?)
    }

    async fn entries_stream<RB>(&mut self, range: RB) -> impl Stream<Item = io::Result<EntryOf<C>>> + OptionalSend
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        let (start, end) = index_bounds(&range);
        let chunks =
            futures::stream::try_unfold((self.clone(), start, true), move |(reader, next, first)| async move {
                if next >= end {
                    return Ok(None);
                }
                let to = end.min(next.saturating_add(STREAM_CHUNK_ENTRIES_MAX));
                let chunk = reader.read(next, to, Some(STREAM_CHUNK_BYTES_MAX)).await?;
                let Some(last) = chunk.last().map(|e| e.index()) else {
                    return Ok(None);
                };
                // Only the first chunk may begin after `start` (those entries are purged):
                // a later gap is a hole.
                if !first && chunk[0].index() != next {
                    return Err(io::Error::from(corrupt(
                        reader.group,
                        format!("log range {next}..{end}"),
                        format!("the read resumed at index {}", chunk[0].index()),
                    )));
                }
                Ok(Some((chunk, (reader, last + 1, false))))
            });
        chunks.map_ok(|chunk| futures::stream::iter(chunk.into_iter().map(Ok))).try_flatten()
    }
}

impl<C: StoredEntries> RaftLogReader<C> for EngineLogStore<C>
where
    EntryOf<C>: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<EntryOf<C>>> {
        self.reader.try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> io::Result<Option<VoteOf<C>>> {
        self.reader.read_vote().await
    }
}

impl<C: StoredEntries<NodeId = u64, Term = u64>> RaftLogStorage<C> for EngineLogStore<C>
where
    EntryOf<C>: Clone,
{
    type LogReader = EngineLogReader<C>;

    async fn get_log_state(&mut self) -> io::Result<LogState<C>> {
        let state = self
            .blocking(|engine, group| {
                let last_purged_log_id: Option<LogIdOf<C>> = get_purged::<C>(engine, group)?;
                let last_log_id = last_log_id::<C>(engine, group)?.or_else(|| last_purged_log_id.clone());
                Ok(LogState { last_purged_log_id, last_log_id })
            })
            .await?;
        Ok(state)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> io::Result<()> {
        let mut batch = LogBatch::with_capacity(1);
        put_vote::<C>(&mut batch, self.group(), vote, self.reader.meta_format())?;
        let guard = self.durable.as_ref().map(|d| d.guard.clone());
        let guard_vote = guard_vote::<C>(vote);
        // A vote must be durable before it is answered: a synced write, and
        // the same vote in the guard (a second copy on another file), so
        // that losing the engine's tail cannot let this node vote twice.
        self.blocking(move |engine, group| {
            engine.write(&mut batch, true)?;
            if let Some(guard) = guard {
                guard.record_vote(guard_vote).map_err(|source| StorageError::Guard { group, source })?;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Written by the flusher's next sync (or when the store is dropped), not
    /// by a write of its own: a committed id that is lost or stale only makes
    /// a restart re-apply less of the log before the leader confirms the rest.
    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> io::Result<()> {
        *self.committed.lock().unwrap_or_else(PoisonError::into_inner) = Some(committed);
        // Nothing appended through this store yet: started here, the flusher
        // writes it when the store closes.
        self.flusher()?;
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogIdOf<C>>> {
        if let Some(pending) = self.committed.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok(pending);
        }
        let committed: Option<Option<LogIdOf<C>>> = get_committed::<C>(self.engine(), self.group())?;
        Ok(committed.flatten())
    }

    /// Writes the entries unsynced and returns once they are readable; the
    /// callback fires after a later synced write (see [`run_flusher`]).
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> io::Result<()>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<EntryOf<C>> = entries.into_iter().collect();
        let last_index = entries.last().map(|e| e.index());
        if let Some(first) = entries.first().map(|e| e.index()) {
            let data_format = self.reader.data_format.clone();
            let (entries, sizes) = self
                .blocking(move |engine, group| {
                    check_contiguous::<C>(engine, group, &entries)?;
                    let format = match &data_format {
                        Some(data_format) => {
                            let needed = entries.iter().map(C::format_needed).max().unwrap_or(0);
                            data_format.ensure(needed).map_err(|e| StorageError::DataDir(e.to_string()))?;
                            data_format.current()
                        }
                        None => 0,
                    };
                    let messages = entries.iter().map(|e| encode_entry::<C>(e, format)).collect::<Result<Vec<_>>>()?;
                    let mut batch = LogBatch::with_capacity(1);
                    batch.add_entries::<EntryCodec>(group, &messages)?;
                    engine.write(&mut batch, false)?;
                    Ok((entries, messages.iter().map(|m| m.value.len()).collect::<Vec<_>>()))
                })
                .await?;
            self.reader.tail().appended(first, entries.into_iter().zip(sizes));
        }
        if let (Some(durable), Some(last)) = (&self.durable, last_index) {
            durable.appended.store(last, Ordering::Release);
        }
        // Even an empty append is acknowledged only after a sync: its callback
        // tells openraft that all earlier log I/O is durable.
        if let Err(std::sync::mpsc::SendError(callback)) = self.flusher()?.send(callback) {
            let group = self.group();
            let reason = "the flush thread is gone".to_string();
            callback.io_completed(Err(StorageError::FlushFailed { group, reason }.into()));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> io::Result<()> {
        let keep = last_log_id.map(|log_id| log_id.index());
        // Before the log: a read meanwhile falls through to the engine.
        self.reader.tail().truncated_after(keep);
        let durable = self.durable.clone();
        self.blocking(move |engine, group| {
            let (Some(first), Some(last)) = (engine.first_index(group), engine.last_index(group)) else {
                return Ok(()); // no entries: nothing after `keep`
            };
            if keep.is_some_and(|keep| keep >= last) {
                return Ok(());
            }
            let purged: Option<LogIdOf<C>> = get_purged::<C>(engine, group)?;
            if let Some(purged) = purged.map(|p| p.index())
                && keep.is_none_or(|keep| keep < purged)
            {
                return Err(StorageError::TruncateBelowPurged { group, keep, purged });
            }
            let mut batch = LogBatch::with_capacity(1);
            match keep {
                // raft-engine cannot delete a suffix, but appending at an index it
                // holds drops everything from there on (also when replayed): so
                // write entry `keep` again.
                Some(keep) if keep >= first => {
                    let entry = engine
                        .get_entry::<EntryCodec>(group, keep)?
                        .ok_or_else(|| corrupt(group, format!("entry {keep}"), "listed by the engine but not found"))?;
                    batch.add_entries::<EntryCodec>(group, &[entry])?;
                }
                // Nothing stays: `keep` is the last purged index, or no purge yet.
                _ => batch.add_command(group, Command::Compact { index: last + 1 }),
            }
            // Synced, like `purge`: installing a snapshot truncates conflicting
            // entries, then purges past them. Were either lost in a crash, entries
            // that contradict the snapshot would come back under it. Both are rare.
            engine.write(&mut batch, true)?;
            // Entries past `keep` were never committed: not acknowledged any
            // more either.
            if let Some(durable) = durable {
                let keep = keep.unwrap_or(0);
                durable.appended.store(keep, Ordering::Release);
                if durable.guard.acknowledged() > keep {
                    durable.guard.record_acknowledged(keep).map_err(|source| StorageError::Guard { group, source })?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> io::Result<()> {
        self.reader.tail().purged_upto(log_id.index());
        let format = self.reader.meta_format();
        self.blocking(move |engine, group| {
            let purged: Option<LogIdOf<C>> = get_purged::<C>(engine, group)?;
            if purged.as_ref().is_some_and(|purged| purged.index() >= log_id.index()) {
                return Ok(()); // never move the purge point back
            }
            // One batch: the purge point and the compaction are replayed together.
            // It may reach past the last entry (after a snapshot install): then the
            // log is empty and continues at `log_id.index + 1`. Synced: see
            // `truncate_after`.
            let mut batch = LogBatch::with_capacity(2);
            put_purged::<C>(&mut batch, group, &log_id, format)?;
            batch.add_command(group, Command::Compact { index: log_id.index() + 1 });
            engine.write(&mut batch, true)?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}

fn guard_vote<C: StoredEntries<NodeId = u64, Term = u64>>(vote: &VoteOf<C>) -> GuardVote {
    let leader = vote.leader_id();
    GuardVote { term: leader.term(), node_id: *leader.node_id(), committed: vote.is_committed() }
}

fn engine_vote<C: StoredEntries<NodeId = u64, Term = u64>>(vote: GuardVote) -> VoteOf<C> {
    VoteOf::<C>::from_leader_id(LeaderIdOf::<C>::new(vote.term, vote.node_id), vote.committed)
}

/// What [`EngineLogStore::check_at_open`] found in one group's storage.
#[derive(Clone, Debug, Default)]
pub struct OpenCheck {
    /// The last index the log holds after any repair (entries or the purge point).
    pub recovered_last: u64,
    /// The highest index this node had acknowledged, as the guard says.
    pub acknowledged: u64,
    /// Set when the log is now shorter than what this node acknowledged, or
    /// when what it acknowledged is unknown: why, in words for an operator.
    pub lost: Option<String>,
    /// Everything found and repaired, each in words for an operator (logged
    /// by the caller, counted in /metrics).
    pub findings: Vec<Finding>,
}

#[derive(Clone, Debug)]
pub struct Finding {
    /// A short name for /metrics: `corrupt_entry`, `vote_restored`,
    /// `guard_slot_lost`, `guard_lost`, `log_lost`, `committed_clamped`.
    pub kind: &'static str,
    pub detail: String,
}

impl<C: StoredEntries<NodeId = u64, Term = u64>> EngineLogStore<C>
where
    EntryOf<C>: Clone,
{
    /// Checks, before openraft reads anything, that the group's storage
    /// holds what this node acknowledged, and repairs what can be repaired
    /// locally: every entry is read back (raft-engine checks an entry's
    /// checksum only when it is read, and at open only for the last batch
    /// of its newest file), a corrupt entry cuts the log before it (or, when
    /// a snapshot covers it, purges through the snapshot); a vote the engine
    /// lost is restored from the guard; a committed id past the log's end
    /// is brought back to it. `snapshot` is the last log id of the
    /// snapshot this node will restore, if any.
    pub async fn check_at_open(&self, found: GuardFound, snapshot: Option<LogIdOf<C>>) -> Result<OpenCheck> {
        let guard = self.durable.as_ref().map(|d| d.guard.clone());
        let format = self.reader.meta_format();
        let check = self
            .blocking(move |engine, group| {
                let mut check = OpenCheck::default();
                let had_data = engine.first_index(group).is_some()
                    || engine.get(group, Meta::Vote.v1()).is_some()
                    || engine.get(group, Meta::Vote.v2()).is_some();
                match &found {
                    GuardFound::OneSlotLost(why) => {
                        check.findings.push(Finding { kind: "guard_slot_lost", detail: why.clone() });
                        if let Some(guard) = &guard {
                            guard.rewrite().map_err(|source| StorageError::Guard { group, source })?;
                        }
                    }
                    GuardFound::Unreadable(why) if had_data => {
                        check.lost = Some(format!("the durability record is unreadable: {why}"));
                        check.findings.push(Finding { kind: "guard_lost", detail: why.clone() });
                    }
                    GuardFound::Missing if had_data => {
                        let why = "the durability record (raft-guard) is missing while the log holds data".to_owned();
                        check.lost = Some(why.clone());
                        check.findings.push(Finding { kind: "guard_lost", detail: why });
                    }
                    _ => {}
                }
                verify_entries::<C>(engine, group, snapshot.clone(), &mut check, format)?;
                let purged: Option<LogIdOf<C>> = get_purged::<C>(engine, group)?;
                let last = last_log_id::<C>(engine, group)?.or(purged);
                check.recovered_last = last.as_ref().map_or(0, |l| l.index());
                if let Some(guard) = &guard {
                    reconcile_vote::<C>(engine, group, guard, &mut check, format)?;
                    check.acknowledged = guard.acknowledged();
                }
                let committed: Option<Option<LogIdOf<C>>> = get_committed::<C>(engine, group)?;
                if let Some(Some(committed)) = committed
                    && committed.index() > check.recovered_last
                    && snapshot.as_ref().is_none_or(|s| committed.index() > s.index())
                {
                    // Everything up to the log's end is older than the
                    // committed id, so committed too.
                    let mut batch = LogBatch::with_capacity(1);
                    put_committed::<C>(&mut batch, group, &last.clone().max(snapshot.clone()), format)?;
                    engine.write(&mut batch, true)?;
                    check.findings.push(Finding {
                        kind: "committed_clamped",
                        detail: format!(
                            "the committed id ({}) is past the log's end ({}): brought back to it",
                            committed.index(),
                            check.recovered_last
                        ),
                    });
                }
                if check.recovered_last < check.acknowledged {
                    let why = format!(
                        "the log ends at index {} but this node had acknowledged entries up to {}",
                        check.recovered_last, check.acknowledged
                    );
                    check.findings.push(Finding { kind: "log_lost", detail: why.clone() });
                    check.lost.get_or_insert(why);
                }
                Ok(check)
            })
            .await?;
        Ok(check)
    }

    /// Drops everything this group's log holds (entries and metadata) but
    /// its vote, which the guard keeps too: the group is then rebuilt from
    /// a healthy leader (a snapshot and the log after it). Used when its
    /// snapshot is corrupt: the log behind it is purged, so nothing local
    /// can replace it.
    pub async fn drop_local_copy(&self) -> Result<()> {
        let guard = self.durable.as_ref().map(|d| d.guard.clone());
        self.reader.tail().truncated_after(None);
        let format = self.reader.meta_format();
        self.blocking(move |engine, group| {
            let vote: Option<VoteOf<C>> = get_vote::<C>(engine, group)?;
            let mut batch = LogBatch::with_capacity(2);
            batch.add_command(group, Command::Clean);
            engine.write(&mut batch, true)?;
            let vote = vote.map(|v| guard_vote::<C>(&v));
            let vote = [vote, guard.and_then(|g| g.current().vote)].into_iter().flatten().max_by_key(GuardVote::order);
            if let Some(vote) = vote {
                let mut batch = LogBatch::with_capacity(1);
                put_vote::<C>(&mut batch, group, &engine_vote::<C>(vote), format)?;
                engine.write(&mut batch, true)?;
            }
            Ok(())
        })
        .await
    }
}

/// Reads every entry of the group back; at the first one that does not
/// read or decode, cuts the log before it (or purges through `snapshot`
/// when the snapshot covers it) and goes on checking what is left.
fn verify_entries<C: StoredEntries>(
    engine: &Engine,
    group: u64,
    snapshot: Option<LogIdOf<C>>,
    check: &mut OpenCheck,
    format: u32,
) -> Result<()> {
    // Each repair removes at least one entry: bounded by the log's length.
    loop {
        let (Some(first), Some(last)) = (engine.first_index(group), engine.last_index(group)) else {
            return Ok(());
        };
        let Some((bad, error)) = first_unreadable_entry::<C>(engine, group, first, last) else {
            return Ok(());
        };
        let mut batch = LogBatch::with_capacity(2);
        let repair = match &snapshot {
            Some(snapshot) if snapshot.index() >= bad => {
                put_purged::<C>(&mut batch, group, snapshot, format)?;
                batch.add_command(group, Command::Compact { index: snapshot.index() + 1 });
                format!("the snapshot covers it (through {}): purged through the snapshot", snapshot.index())
            }
            _ if bad > first => {
                let keep = engine.get_entry::<EntryCodec>(group, bad - 1)?.ok_or_else(|| {
                    corrupt(group, format!("entry {}", bad - 1), "listed by the engine but not found")
                })?;
                batch.add_entries::<EntryCodec>(group, &[keep])?;
                format!("the log was cut after index {}", bad - 1)
            }
            _ => {
                batch.add_command(group, Command::Compact { index: last + 1 });
                "every entry of the log was dropped".to_owned()
            }
        };
        engine.write(&mut batch, true)?;
        check.findings.push(Finding {
            kind: "corrupt_entry",
            detail: format!("entry {bad} (log {first}..={last}) does not read back: {error}; {repair}"),
        });
    }
}

const VERIFY_CHUNK_ENTRIES: u64 = 1024;

/// The first entry in `first..=last` that raft-engine cannot read (checksum)
/// or that does not decode, with why.
fn first_unreadable_entry<C: StoredEntries>(
    engine: &Engine,
    group: u64,
    first: u64,
    last: u64,
) -> Option<(u64, String)> {
    let mut from = first;
    while from <= last {
        let to = (from + VERIFY_CHUNK_ENTRIES).min(last + 1);
        let mut raw = Vec::new();
        let chunk_ok = engine.fetch_entries_to::<EntryCodec>(group, from, to, None, &mut raw).is_ok()
            && raw.len() as u64 == to - from
            && raw.iter().zip(from..).all(|(bytes, index)| decode_entry::<C>(group, index, bytes).is_ok());
        if !chunk_ok {
            // One by one, to name the entry.
            for index in from..to {
                let error = match engine.get_entry::<EntryCodec>(group, index) {
                    Ok(Some(bytes)) => decode_entry::<C>(group, index, &bytes).err().map(|e| e.to_string()),
                    Ok(None) => Some("missing".to_owned()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(error) = error {
                    return Some((index, error));
                }
            }
        }
        from = to;
    }
    None
}

/// The vote is in the engine and in the guard: the newer of the two is the
/// one this node last acknowledged. An engine that lost it (its tail was
/// dropped) gets it back; a guard behind the engine (its write torn) is
/// raised.
fn reconcile_vote<C: StoredEntries<NodeId = u64, Term = u64>>(
    engine: &Engine,
    group: u64,
    guard: &Guard,
    check: &mut OpenCheck,
    format: u32,
) -> Result<()> {
    let in_engine: Option<VoteOf<C>> = get_vote::<C>(engine, group)?;
    let in_engine = in_engine.map(|v| guard_vote::<C>(&v));
    let in_guard = guard.current().vote;
    match (in_engine, in_guard) {
        (engine_vote_now, Some(kept)) if engine_vote_now.as_ref().is_none_or(|v| v.order() < kept.order()) => {
            let mut batch = LogBatch::with_capacity(1);
            put_vote::<C>(&mut batch, group, &engine_vote::<C>(kept), format)?;
            engine.write(&mut batch, true)?;
            let had = engine_vote_now.map_or("none".to_owned(), |v| v.to_string());
            check.findings.push(Finding {
                kind: "vote_restored",
                detail: format!("the log engine lost the last vote (it held {had}): restored {kept} from the guard"),
            });
        }
        (Some(newer), kept) if kept.as_ref().is_none_or(|k| k.order() < newer.order()) => {
            guard.record_vote(newer).map_err(|source| StorageError::Guard { group, source })?;
        }
        _ => {}
    }
    Ok(())
}

/// Refuses an append that would leave a hole or overwrite purged entries:
/// raft-engine panics on both. Overlapping the tail is fine: raft-engine
/// drops the overlapped entries.
fn check_contiguous<C: StoredEntries>(engine: &Engine, group: u64, entries: &[EntryOf<C>]) -> Result<()> {
    let Some(at) = entries.first().map(|e| e.index()) else {
        return Ok(());
    };
    for (expected, entry) in (at..).zip(entries) {
        if entry.index() != expected {
            return Err(StorageError::NonContiguousAppend { group, at: entry.index(), accepts: expected..=expected });
        }
    }
    let accepts = match (engine.first_index(group), engine.last_index(group)) {
        (Some(first), Some(last)) => first..=last + 1,
        _ => match get_purged::<C>(engine, group)? {
            Some(purged) => purged.index() + 1..=purged.index() + 1,
            // A log that never held an entry may start anywhere.
            None => at..=at,
        },
    };
    if !accepts.contains(&at) {
        return Err(StorageError::NonContiguousAppend { group, at, accepts });
    }
    Ok(())
}
