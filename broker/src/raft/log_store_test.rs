//! Tests of the raft-engine log store: openraft's storage suite (on a fresh
//! engine per store, and on one engine shared by many groups), reopening,
//! group independence, and the guards raft-engine itself lacks.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftSnapshotBuilder;
use openraft::entry::RaftEntry;
use openraft::impls::Vote;
use openraft::storage::EntryResponder;
use openraft::storage::IOFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::testing::log_id;
use openraft::testing::membership_ent;
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::EntryOf;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::SnapshotMetaOf;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::StoredMembershipOf;
use raft_engine::Engine;
use serde::Deserialize;
use serde::Serialize;
use tempfile::TempDir;

use super::*;
use crate::raft::guard::Guard;

/// Shaped like Gantry's config: u64 node ids, `BasicNode`, serde payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCmd {
    pub key: String,
    pub payload: Vec<u8>,
}

impl std::fmt::Display for TestCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}B", self.key, self.payload.len())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResp;

openraft::declare_raft_types!(
    pub TestConfig:
        D = TestCmd,
        R = TestResp,
);

type C = TestConfig;
type Store = EngineLogStore<C>;

/// The test config's "format 1" encoding: postcard behind the other tag, and
/// an entry whose key is `raise` needs the data directory at format 1.
impl StoredEntries for TestConfig {
    fn encode_stored(entry: &EntryOf<C>, out: &mut Vec<u8>) {
        out.extend_from_slice(&postcard::to_allocvec(entry).expect("encodes"));
    }

    fn decode_stored(bytes: &[u8]) -> std::result::Result<EntryOf<C>, String> {
        postcard::from_bytes(bytes).map_err(|e| e.to_string())
    }

    fn log_id_to_pb(log_id: &LogIdOf<C>) -> gantry_proto::storage::LogId {
        crate::format::storage::log_id_to_pb(log_id)
    }

    fn log_id_from_pb(log_id: gantry_proto::storage::LogId) -> LogIdOf<C> {
        crate::format::storage::log_id_from_pb(log_id)
    }

    fn vote_to_pb(vote: &openraft::type_config::alias::VoteOf<C>) -> gantry_proto::storage::Vote {
        crate::format::storage::vote_to_pb(vote)
    }

    fn vote_from_pb(vote: gantry_proto::storage::Vote) -> openraft::type_config::alias::VoteOf<C> {
        crate::format::storage::vote_from_pb(vote)
    }

    fn format_needed(entry: &EntryOf<C>) -> u32 {
        match &entry.payload {
            openraft::EntryPayload::Normal(cmd) if cmd.key == "raise" => 1,
            _ => 0,
        }
    }
}

// --- openraft's conformance suite -------------------------------------------

/// The smallest state machine the suite accepts: applied id, membership, and
/// a snapshot of just those.
#[derive(Clone, Default)]
struct MemStateMachine(Arc<tokio::sync::Mutex<MemSm>>);

#[derive(Default)]
struct MemSm {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    snapshot: Option<SnapshotMetaOf<C>>,
}

impl RaftSnapshotBuilder<C> for MemStateMachine {
    type SnapshotData = io::Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<C, Self::SnapshotData>> {
        let mut sm = self.0.lock().await;
        let meta = SnapshotMetaOf::<C> { last_log_id: sm.last_applied, last_membership: sm.membership.clone() };
        sm.snapshot = Some(meta.clone());
        Ok(SnapshotOf::<C, _> { meta, snapshot: io::Cursor::new(Vec::new()) })
    }
}

impl RaftStateMachine<C> for MemStateMachine {
    type SnapshotData = io::Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> io::Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>)> {
        let sm = self.0.lock().await;
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = io::Result<EntryResponder<C>>> + Unpin + OptionalSend,
    {
        let mut sm = self.0.lock().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            sm.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(m) = &entry.payload {
                sm.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m.clone());
            }
            if let Some(responder) = responder {
                responder.send(TestResp);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<C>, _snapshot: Self::SnapshotData) -> io::Result<()> {
        let mut sm = self.0.lock().await;
        sm.last_applied = meta.last_log_id;
        sm.membership = meta.last_membership.clone();
        sm.snapshot = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<SnapshotOf<C, Self::SnapshotData>>> {
        let sm = self.0.lock().await;
        Ok(sm.snapshot.clone().map(|meta| SnapshotOf::<C, _> { meta, snapshot: io::Cursor::new(Vec::new()) }))
    }
}

/// Each store gets its own engine in its own directory.
struct FreshEngineBuilder;

impl StoreBuilder<C, Store, MemStateMachine, TempDir> for FreshEngineBuilder {
    async fn build(&self) -> Result<(TempDir, Store, MemStateMachine), openraft::StorageError<C>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(dir.path()).expect("open engine");
        Ok((dir, EngineLogStore::new(engine, 1), MemStateMachine::default()))
    }
}

/// Every store is a new group of one engine: the suite's writes to one group
/// must never show in another.
struct SharedEngineBuilder {
    engine: Arc<Engine>,
    next_group: AtomicU64,
}

impl StoreBuilder<C, Store, MemStateMachine> for SharedEngineBuilder {
    async fn build(&self) -> Result<((), Store, MemStateMachine), openraft::StorageError<C>> {
        let group = self.next_group.fetch_add(1, Ordering::Relaxed);
        Ok(((), EngineLogStore::new(self.engine.clone(), group), MemStateMachine::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_fresh_engines() -> anyhow::Result<()> {
    Suite::test_all(FreshEngineBuilder).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_on_one_engine_shared_by_groups() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let builder = SharedEngineBuilder { engine: engine.clone(), next_group: AtomicU64::new(100) };
    Suite::test_all(builder).await?;
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

// --- helpers ------------------------------------------------------------------

fn entry(term: u64, index: u64) -> EntryOf<C> {
    EntryOf::<C>::new_normal(
        log_id::<C>(term, 1, index),
        TestCmd { key: format!("job-{index}"), payload: vec![index as u8; (index % 7) as usize] },
    )
}

fn entries(term: u64, indexes: impl IntoIterator<Item = u64>) -> Vec<EntryOf<C>> {
    indexes.into_iter().map(|i| entry(term, i)).collect()
}

/// Appends and waits for the flush callback, as openraft would before
/// acknowledging the entries.
async fn append(store: &mut Store, ents: Vec<EntryOf<C>>) -> io::Result<()> {
    let (tx, rx) = C::oneshot();
    store.append(ents, IOFlushed::signal(tx)).await?;
    rx.await.map_err(io::Error::other)?
}

async fn all_entries(store: &mut Store) -> io::Result<Vec<EntryOf<C>>> {
    store.try_get_log_entries(..).await
}

fn indexes(ents: &[EntryOf<C>]) -> Vec<u64> {
    ents.iter().map(|e| e.index()).collect()
}

async fn reopen(engine: Arc<Engine>, dir: &Path) -> anyhow::Result<Arc<Engine>> {
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(open_engine(dir)?)
}

// --- persistence ---------------------------------------------------------------

/// Entries are written in format 0 until an entry that needs format 1
/// raises the data directory (before it is written); both kinds read back,
/// across a reopen, and the directory then turns older builds away.
#[tokio::test]
async fn the_entry_encoding_follows_the_data_directorys_format() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_format = Arc::new(crate::format::header::DataDirFormat::open(dir.path(), 1)?);
    let engine = open_engine(&dir.path().join("raft"))?;
    let mut store = Store::new(engine.clone(), 1).with_data_format(data_format.clone());
    append(&mut store, entries(1, 1..=3)).await?;
    assert_eq!(data_format.current(), 0, "nothing asked for format 1 yet");
    let raise = EntryOf::<C>::new_normal(log_id::<C>(1, 1, 4), TestCmd { key: "raise".into(), payload: vec![] });
    store.save_vote(&Vote::new(1, 1)).await?;
    assert!(engine.get(1, b"v1/vote").is_some() && engine.get(1, b"v2/vote").is_none(), "format 0 metadata");
    append(&mut store, vec![raise.clone()]).await?;
    assert_eq!(data_format.current(), 1, "the data directory was not raised before the entry was written");
    store.save_vote(&Vote::new_committed(2, 1)).await?;
    store.save_committed(Some(log_id::<C>(1, 1, 4))).await?;
    store.purge(log_id::<C>(1, 1, 1)).await?;
    // The committed id goes with the next flush.
    append(&mut store, entries(1, 5..=6)).await?;
    for key in ["vote", "committed", "purged"] {
        assert!(engine.get(1, format!("v2/{key}").as_bytes()).is_some(), "{key} not written in format 1");
        assert!(engine.get(1, format!("v1/{key}").as_bytes()).is_none(), "{key}'s format-0 copy kept");
    }
    let tags: Vec<u8> = (2..=6u64)
        .map(|i| engine.get_entry::<EntryCodec>(1, i).unwrap().unwrap().value[ENTRY_HEADER_LEN - 1])
        .collect();
    assert_eq!(tags, [ENTRY_FORMAT_V1, ENTRY_FORMAT_V1, ENTRY_FORMAT_V2, ENTRY_FORMAT_V2, ENTRY_FORMAT_V2]);
    let mut expected = entries(1, 2..=3);
    expected.push(raise);
    expected.extend(entries(1, 5..=6));
    assert_eq!(all_entries(&mut store).await?, expected);
    drop(store);
    let engine = reopen(engine, &dir.path().join("raft")).await?;
    let mut store = Store::new(engine.clone(), 1);
    assert_eq!(all_entries(&mut store).await?, expected);
    assert_eq!(store.read_vote().await?, Some(Vote::new_committed(2, 1)));
    assert_eq!(store.read_committed().await?, Some(log_id::<C>(1, 1, 4)));
    assert_eq!(store.get_log_state().await?.last_purged_log_id, Some(log_id::<C>(1, 1, 1)));
    let legacy = std::fs::read_to_string(dir.path().join("FORMAT"))?;
    assert!(legacy.starts_with("gantry-data 3"), "{legacy}");
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

/// Older versions let raft-engine LZ4-compress batches over 8 KiB; the
/// engine `open_engine` opens (no compression) still reads such a log.
#[tokio::test]
async fn a_log_written_compressed_is_still_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let compressing = raft_engine::Config {
        dir: dir.path().to_string_lossy().into_owned(),
        batch_compression_threshold: raft_engine::ReadableSize::kb(8),
        ..Default::default()
    };
    let engine = Arc::new(Engine::open(compressing)?);
    let big = |i: u64| {
        let payload = TestCmd { key: format!("k{i}"), payload: vec![i as u8; 64 << 10] };
        EntryOf::<C>::new_normal(log_id::<C>(1, 1, i), payload)
    };
    let written: Vec<EntryOf<C>> = (1..=4).map(big).collect();
    let mut store = Store::new(engine.clone(), 3);
    append(&mut store, written.clone()).await?;
    drop(store);

    let engine = reopen(engine, dir.path()).await?;
    let mut store = Store::new(engine.clone(), 3);
    assert_eq!(all_entries(&mut store).await?, written);
    append(&mut store, vec![big(5)]).await?;
    assert_eq!(indexes(&all_entries(&mut store).await?), [1, 2, 3, 4, 5]);
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn log_state_survives_reopen() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let membership = membership_ent::<C>(3, 1, 0, vec![BTreeSet::from([1, 2, 3])]);

    let mut store = Store::new(engine.clone(), 7);
    store.save_vote(&Vote::new(3, 1)).await?;
    let mut written = vec![membership.clone()];
    written.extend(entries(3, 1..=10));
    append(&mut store, written.clone()).await?;
    store.truncate_after(Some(log_id::<C>(3, 1, 8))).await?; // drops 9..=10
    store.purge(log_id::<C>(3, 1, 3)).await?; // drops 0..=3
    store.save_committed(Some(log_id::<C>(3, 1, 5))).await?;
    // The flush task of `store` holds the engine until its last callback: the
    // close below has to wait for it (pitfall 4).
    drop(store);

    let engine = reopen(engine, dir.path()).await?;
    let mut store = Store::new(engine.clone(), 7);
    assert_eq!(store.read_vote().await?, Some(Vote::new(3, 1)));
    assert_eq!(store.read_committed().await?, Some(log_id::<C>(3, 1, 5)));
    assert_eq!(
        store.get_log_state().await?,
        LogState { last_purged_log_id: Some(log_id::<C>(3, 1, 3)), last_log_id: Some(log_id::<C>(3, 1, 8)) }
    );
    assert_eq!(all_entries(&mut store).await?, written[4..=8].to_vec());

    // A new leader overwrites the tail, then everything above the purge point
    // goes (the compaction path of truncation), then the log continues.
    store.truncate_after(Some(log_id::<C>(3, 1, 6))).await?;
    append(&mut store, entries(4, 7..=9)).await?;
    store.truncate_after(Some(log_id::<C>(3, 1, 3))).await?;
    assert_eq!(store.get_log_state().await?.last_log_id, Some(log_id::<C>(3, 1, 3)));
    append(&mut store, entries(5, 4..=5)).await?;
    drop(store);

    let engine = reopen(engine, dir.path()).await?;
    let mut store = Store::new(engine.clone(), 7);
    assert_eq!(all_entries(&mut store).await?, entries(5, 4..=5));
    assert_eq!(
        store.get_log_state().await?,
        LogState { last_purged_log_id: Some(log_id::<C>(3, 1, 3)), last_log_id: Some(log_id::<C>(5, 1, 5)) }
    );
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

#[tokio::test]
async fn purge_past_the_last_entry_survives_reopen() -> anyhow::Result<()> {
    // What installing a snapshot does: the log empties and continues after it.
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut store = Store::new(engine.clone(), 3);
    append(&mut store, entries(1, 0..=4)).await?;
    store.purge(log_id::<C>(2, 2, 20)).await?;
    let purged = LogState { last_purged_log_id: Some(log_id::<C>(2, 2, 20)), last_log_id: Some(log_id::<C>(2, 2, 20)) };
    assert_eq!(store.get_log_state().await?, purged);
    drop(store);

    let engine = reopen(engine, dir.path()).await?;
    let mut store = Store::new(engine.clone(), 3);
    assert_eq!(store.get_log_state().await?, purged);
    assert!(all_entries(&mut store).await?.is_empty());
    append(&mut store, entries(2, 21..=22)).await?;
    assert_eq!(indexes(&all_entries(&mut store).await?), [21, 22]);
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

// --- groups --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_of_one_engine_stay_independent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut a = Store::new(engine.clone(), 1);
    let mut b = Store::new(engine.clone(), 2);

    // Concurrent synced writes of both groups (raft-engine's group commit path).
    let (ra, rb) = tokio::join!(append(&mut a, entries(1, 0..=20)), append(&mut b, entries(7, 0..=5)));
    ra?;
    rb?;
    a.save_vote(&Vote::new_committed(1, 1)).await?;
    a.purge(log_id::<C>(1, 1, 10)).await?;
    a.save_committed(Some(log_id::<C>(1, 1, 15))).await?;
    b.truncate_after(Some(log_id::<C>(7, 1, 2))).await?;
    append(&mut b, entries(8, 3..=4)).await?;

    let check = |a: Store, b: Store| async move {
        let (mut a, mut b) = (a, b);
        assert_eq!(a.read_vote().await?, Some(Vote::new_committed(1, 1)));
        assert_eq!(b.read_vote().await?, None);
        assert_eq!(a.read_committed().await?, Some(log_id::<C>(1, 1, 15)));
        assert_eq!(b.read_committed().await?, None);
        assert_eq!(all_entries(&mut a).await?, entries(1, 11..=20));
        let mut b_entries = entries(7, 0..=2);
        b_entries.extend(entries(8, 3..=4));
        assert_eq!(all_entries(&mut b).await?, b_entries);
        assert_eq!(b.get_log_state().await?.last_purged_log_id, None);
        anyhow::Ok(())
    };
    check(a, b).await?;

    let engine = reopen(engine, dir.path()).await?;
    check(Store::new(engine.clone(), 1), Store::new(engine.clone(), 2)).await?;
    // A group the engine never saw is empty.
    let mut c = Store::new(engine.clone(), 3);
    assert_eq!(c.get_log_state().await?, LogState::default());
    assert_eq!(c.read_vote().await?, None);
    drop(c);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

// --- purge task ----------------------------------------------------------------

#[tokio::test]
async fn purge_task_never_holds_the_engine_open() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut store = Store::new(engine.clone(), 1);
    append(&mut store, entries(1, 0..=50)).await?;
    store.purge(log_id::<C>(1, 1, 40)).await?;
    drop(store);

    let task = spawn_purge_task(engine.clone(), Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(100)).await; // a few purges run
    assert!(!task.is_finished());
    // Closing does not wait for the task, and the task then ends by itself.
    close_engine(engine, Duration::from_secs(10)).await?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}

// --- guards --------------------------------------------------------------------

fn assert_refused(result: io::Result<()>) {
    let error = result.expect_err("append should have been refused");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
}

#[tokio::test]
async fn appends_that_leave_a_hole_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut store = Store::new(engine.clone(), 9);
    append(&mut store, entries(1, 0..=5)).await?;

    assert_refused(append(&mut store, entries(1, 7..=8)).await); // hole after 5
    assert_refused(append(&mut store, vec![entry(1, 6), entry(1, 8)]).await); // hole inside the batch
    store.purge(log_id::<C>(1, 1, 2)).await?;
    assert_refused(append(&mut store, entries(2, 2..=3)).await); // over purged entries
    assert_eq!(indexes(&all_entries(&mut store).await?), [3, 4, 5]);

    // Overlapping the tail replaces it, as a truncation would.
    append(&mut store, entries(2, 5..=6)).await?;
    assert_eq!(all_entries(&mut store).await?[2..], entries(2, 5..=6));

    // An empty log after a purge continues right after the purge point only.
    store.purge(log_id::<C>(2, 1, 6)).await?;
    assert_refused(append(&mut store, entries(2, 8..=8)).await);
    assert_refused(append(&mut store, entries(2, 6..=6)).await);
    append(&mut store, entries(2, 7..=7)).await?;

    // Truncating into the purged part is a bug upstream: refused too.
    let error = store.truncate_after(Some(log_id::<C>(2, 1, 5))).await.expect_err("below purge point");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    assert_eq!(indexes(&all_entries(&mut store).await?), [7]);
    Ok(())
}

// --- reads ---------------------------------------------------------------------

#[tokio::test]
async fn reads_of_long_ranges_are_chunked_and_complete() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut store = Store::new(engine.clone(), 4);
    let count = 3 * STREAM_CHUNK_ENTRIES_MAX + 17;
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        append(&mut store, entries(1, chunk.iter().copied())).await?;
    }
    store.purge(log_id::<C>(1, 1, 99)).await?;

    let mut reader = store.get_log_reader().await;
    let streamed: Vec<_> = reader.entries_stream(10..count - 5).await.try_collect().await?;
    assert_eq!(indexes(&streamed), (100..count - 5).collect::<Vec<_>>());
    assert_eq!(streamed, reader.try_get_log_entries(10..count - 5).await?);

    let limited = reader.limited_get_log_entries(200, count).await?;
    assert!(!limited.is_empty());
    assert_eq!(limited[0].index(), 200);
    Ok(())
}

/// Entries older than the in-memory tail come from the engine, newer ones
/// from the tail; a range across the boundary, a truncation and a purge
/// must give the same answers either way.
#[tokio::test]
async fn reads_across_the_in_memory_tail_match_the_log() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    let mut store = Store::new(engine.clone(), 5);
    let count = TAIL_ENTRIES_MAX as u64 + 600;
    for chunk in (0..count).collect::<Vec<_>>().chunks(700) {
        append(&mut store, entries(1, chunk.iter().copied())).await?;
    }
    let mut reader = store.get_log_reader().await;
    let tail_start = count - TAIL_ENTRIES_MAX as u64;
    assert_eq!(reader.try_get_log_entries(0..count).await?, entries(1, 0..count), "engine and tail together");
    assert_eq!(reader.try_get_log_entries(tail_start..count).await?, entries(1, tail_start..count), "tail only");
    assert_eq!(reader.try_get_log_entries(10..20).await?, entries(1, 10..20), "engine only");

    // A new leader overwrites the last entries with its own term.
    store.truncate_after(Some(log_id::<C>(1, 1, count - 11))).await?;
    assert_eq!(reader.try_get_log_entries(count - 20..count).await?, entries(1, count - 20..count - 10));
    append(&mut store, entries(2, count - 10..count)).await?;
    let mut expected = entries(1, count - 20..count - 10);
    expected.extend(entries(2, count - 10..count));
    assert_eq!(reader.try_get_log_entries(count - 20..count).await?, expected);

    store.purge(log_id::<C>(1, 1, count - 15)).await?;
    assert_eq!(reader.try_get_log_entries(0..count).await?, expected[6..].to_vec());

    // A restart has no tail: the same entries come from the engine.
    drop((reader, store));
    let engine = reopen(engine, dir.path()).await?;
    let mut store = Store::new(engine, 5);
    assert_eq!(all_entries(&mut store).await?, expected[6..].to_vec());
    Ok(())
}

#[tokio::test]
async fn corrupt_entries_are_reported_not_decoded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = open_engine(dir.path())?;
    // Write an entry of an unknown format straight into the engine.
    let mut bad = encode_entry::<C>(&entry(1, 0), 0)?;
    bad.value[8] = 99;
    let mut batch = LogBatch::default();
    batch.add_entries::<EntryCodec>(5, &[bad])?;
    engine.write(&mut batch, false)?;

    let mut store = Store::new(engine.clone(), 5);
    let error = all_entries(&mut store).await.expect_err("unknown format");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    Ok(())
}

#[tokio::test]
async fn engines_of_one_process_never_read_each_others_blocks() -> anyhow::Result<()> {
    // Two engines with the same layout (same file, same offsets, same sizes)
    // but different entries, read alternately from one runtime: raft-engine's
    // thread-local block cache would hand one engine's block to the other.
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (engine_a, engine_b) = (open_engine(dir_a.path())?, open_engine(dir_b.path())?);
    let mut a = Store::new(engine_a.clone(), 1);
    let mut b = Store::new(engine_b.clone(), 1);
    append(&mut a, entries(1, 0..=9)).await?;
    append(&mut b, entries(2, 0..=9)).await?;
    for _ in 0..20 {
        assert_eq!(all_entries(&mut a).await?, entries(1, 0..=9));
        assert_eq!(all_entries(&mut b).await?, entries(2, 0..=9));
    }

    // Reopening a directory is a new engine as well.
    drop(a);
    let engine_a = reopen(engine_a, dir_a.path()).await?;
    let mut a = Store::new(engine_a.clone(), 1);
    assert_eq!(all_entries(&mut a).await?, entries(1, 0..=9));
    assert_eq!(all_entries(&mut b).await?, entries(2, 0..=9));
    Ok(())
}

// --- crash -----------------------------------------------------------------------

const SIGKILL_DIR_ENV: &str = "GANTRY_LOG_STORE_SIGKILL_DIR";
const SIGKILL_CHILD: &str = "raft::log_store::tests::sigkill_child_appends_until_killed";

/// Run by `acknowledged_appends_survive_sigkill` in a child process: appends
/// with several flushes in flight, printing each acknowledged index, until
/// it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of acknowledged_appends_survive_sigkill"]
async fn sigkill_child_appends_until_killed() -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os(SIGKILL_DIR_ENV) else {
        return Ok(());
    };
    let mut store = Store::new(open_engine(Path::new(&dir))?, 1);
    let mut in_flight = std::collections::VecDeque::new();
    for first in (0..).step_by(10) {
        let (tx, rx) = C::oneshot();
        store.append(entries(1, first..first + 10), IOFlushed::signal(tx)).await?;
        in_flight.push_back((first + 9, rx));
        // Report acknowledgements as they come, while later appends are unsynced.
        while let Some((last, rx)) = in_flight.front_mut() {
            match rx.try_recv() {
                Ok(flushed) => {
                    flushed?;
                    println!("acked {last}");
                    in_flight.pop_front();
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) if in_flight.len() < 8 => break,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[test]
fn acknowledged_appends_survive_sigkill() -> anyhow::Result<()> {
    use std::io::BufRead;

    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", SIGKILL_CHILD, "--ignored", "--nocapture", "--test-threads=1"])
        .env(SIGKILL_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (acks_tx, acks) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(index) = line.strip_prefix("acked ").and_then(|i| i.parse::<u64>().ok()) {
                let _ = acks_tx.send(index);
            }
        }
    });
    let mut acked = None;
    let outcome = loop {
        match acks.recv_timeout(Duration::from_secs(60)) {
            Ok(index) => {
                acked = Some(index);
                if index >= 3_000 {
                    break Ok(());
                }
            }
            Err(e) => break Err(anyhow::anyhow!("child stopped acknowledging after {acked:?}: {e}")),
        }
    };
    child.kill()?; // SIGKILL
    child.wait()?;
    outcome?;
    let acked = acked.expect("at least one acknowledgement");

    tokio::runtime::Runtime::new()?.block_on(async {
        let engine = open_engine(dir.path())?;
        let mut store = Store::new(engine.clone(), 1);
        let state = store.get_log_state().await?;
        let last = state.last_log_id.expect("entries survive").index();
        assert!(last >= acked, "acknowledged up to {acked}, recovered up to {last}");
        assert_eq!(store.try_get_log_entries(..=acked).await?, entries(1, 0..=acked));
        // The recovered log is whole: it continues right after its last entry.
        append(&mut store, entries(2, last + 1..=last + 3)).await?;
        drop(store);
        close_engine(engine, Duration::from_secs(10)).await?;
        anyhow::Ok(())
    })
}

// --- storage faults ----------------------------------------------------------------

/// A store of `group` on the engine in `root/raft`, with its guard in
/// `root/guard`, checked as `ShardRaft::open` checks it.
async fn open_checked(engine: &Arc<Engine>, root: &Path, group: u64) -> anyhow::Result<(Store, OpenCheck)> {
    let (guard, found) = Guard::open(&root.join("guard").join(group.to_string()), &root.join("no-legacy"))?;
    let store = Store::new(engine.clone(), group).with_guard(Arc::new(guard));
    let check = store.check_at_open(found, None).await?;
    Ok((store, check))
}

fn kinds(check: &OpenCheck) -> Vec<&'static str> {
    check.findings.iter().map(|f| f.kind).collect()
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for file in std::fs::read_dir(from)? {
        let file = file?;
        if file.file_type()?.is_file() {
            std::fs::copy(file.path(), to.join(file.file_name()))?;
        }
    }
    Ok(())
}

/// A disk that lies: the last writes were reported synced and vanish at a
/// crash (the engine's files go back to an earlier copy). The guard, synced
/// on its own, still holds the acknowledged index and the vote: the check
/// finds the lost entries (the copy must be fenced) and restores the vote,
/// so the node can neither vote as if it had the entries nor vote twice.
#[tokio::test]
async fn a_disk_that_lost_acknowledged_writes_is_found_out() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let raft_dir = root.path().join("raft");
    let engine = open_engine(&raft_dir)?;
    let (mut store, check) = open_checked(&engine, root.path(), 4).await?;
    assert!(check.lost.is_none() && check.findings.is_empty(), "{check:?}");
    store.save_vote(&Vote::new(3, 1)).await?;
    append(&mut store, entries(3, 1..=20)).await?;
    drop(store);
    let engine = reopen(engine, &raft_dir).await?;
    close_engine(engine, Duration::from_secs(10)).await?;
    copy_dir(&raft_dir, &root.path().join("raft-at-20"))?;

    let engine = open_engine(&raft_dir)?;
    let (mut store, _) = open_checked(&engine, root.path(), 4).await?;
    append(&mut store, entries(3, 21..=50)).await?;
    store.save_vote(&Vote::new_committed(4, 2)).await?;
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    // The crash: everything after the copy vanished from the engine's files.
    std::fs::remove_dir_all(&raft_dir)?;
    std::fs::rename(root.path().join("raft-at-20"), &raft_dir)?;

    let engine = open_engine(&raft_dir)?;
    let (mut store, check) = open_checked(&engine, root.path(), 4).await?;
    assert_eq!((check.recovered_last, check.acknowledged), (20, 50), "{check:?}");
    assert!(check.lost.as_deref().is_some_and(|why| why.contains("acknowledged entries up to 50")), "{check:?}");
    assert_eq!(kinds(&check), ["vote_restored", "log_lost"], "{check:?}");
    assert_eq!(store.read_vote().await?, Some(Vote::new_committed(4, 2)));
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

/// A bit flipped inside an entry in the middle of the newest file:
/// raft-engine opens the file (it checks only the last batch's entries at
/// open) and would fail the first read of that entry later. The check reads
/// every entry back, names the corrupt one and cuts the log before it, so
/// the copy is fenced (it had acknowledged more) instead of failing when
/// the entry is replicated or applied.
#[tokio::test]
async fn a_corrupt_entry_in_the_middle_of_the_log_is_found_and_cut() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let raft_dir = root.path().join("raft");
    let engine = open_engine(&raft_dir)?;
    let (mut store, _) = open_checked(&engine, root.path(), 2).await?;
    let big = |i: u64| {
        EntryOf::<C>::new_normal(log_id::<C>(1, 1, i), TestCmd { key: format!("k{i}"), payload: vec![i as u8; 4096] })
    };
    for i in 1..=60 {
        append(&mut store, vec![big(i)]).await?;
    }
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;

    // Entry 40's payload is 4096 bytes of 40 (no compression): flip a bit
    // in the middle of it.
    let newest = std::fs::read_dir(&raft_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .max()
        .expect("a log file");
    let mut bytes = std::fs::read(&newest)?;
    let run = bytes.windows(4096).position(|w| w.iter().all(|b| *b == 40)).expect("entry 40's payload");
    bytes[run + 2048] ^= 0x10;
    std::fs::write(&newest, &bytes)?;

    let engine = open_engine(&raft_dir)?;
    let (mut store, check) = open_checked(&engine, root.path(), 2).await?;
    assert_eq!(kinds(&check), ["corrupt_entry", "log_lost"], "{check:?}");
    assert!(check.findings[0].detail.starts_with("entry 40 "), "{:?}", check.findings[0]);
    assert_eq!((check.recovered_last, check.acknowledged), (39, 60));
    assert_eq!(all_entries(&mut store).await?, (1..=39).map(big).collect::<Vec<_>>());
    // The log continues after the cut, as a leader will send it.
    append(&mut store, vec![big(40)]).await?;
    drop(store);
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}

/// The guard file lost while the engine still holds the group: what this
/// node acknowledged is unknown, so the copy must be fenced, not trusted.
/// A torn slot of the guard is reported and written whole again.
#[tokio::test]
async fn a_lost_or_torn_guard_is_reported() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let raft_dir = root.path().join("raft");
    let engine = open_engine(&raft_dir)?;
    let (mut store, _) = open_checked(&engine, root.path(), 5).await?;
    append(&mut store, entries(1, 1..=5)).await?;
    store.save_vote(&Vote::new(1, 1)).await?;
    drop(store);
    let engine = reopen(engine, &raft_dir).await?;

    let guard_file = root.path().join("guard").join("5");
    let mut bytes = std::fs::read(&guard_file)?;
    bytes[50] ^= 0xff; // inside the second slot
    std::fs::write(&guard_file, &bytes)?;
    let (store, check) = open_checked(&engine, root.path(), 5).await?;
    assert_eq!(kinds(&check), ["guard_slot_lost"], "{check:?}");
    assert!(check.lost.is_none());
    drop(store);
    let engine = reopen(engine, &raft_dir).await?;
    let (store, check) = open_checked(&engine, root.path(), 5).await?;
    assert!(check.findings.is_empty(), "the torn slot was not written again: {check:?}");
    drop(store);

    std::fs::remove_file(&guard_file)?;
    let engine = reopen(engine, &raft_dir).await?;
    let (store, check) = open_checked(&engine, root.path(), 5).await?;
    assert_eq!(kinds(&check), ["guard_lost"], "{check:?}");
    assert!(check.lost.is_some());
    // A group the engine never held has nothing to lose.
    let (other, fresh) = open_checked(&engine, root.path(), 6).await?;
    assert!(fresh.lost.is_none() && fresh.findings.is_empty(), "{fresh:?}");
    drop((store, other));
    close_engine(engine, Duration::from_secs(10)).await?;
    Ok(())
}
