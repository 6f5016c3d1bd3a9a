//! Payloads of waiting jobs on this node's disk, so that a backlog is
//! bounded by disk rather than memory.
//!
//! A shard keeps the payloads of its newest jobs in memory, up to a budget;
//! older ones move to files here and are read back when a job is handed to
//! a worker or asked for. The files are only this node's copy: the log and
//! the snapshots hold every payload, so nothing here needs to survive a
//! crash. Each file is unlinked as soon as it is created and disappears
//! with the last job that refers to it (or with the process).
//!
//! Apply only notes the jobs it created (a few operations per job); a mover
//! thread per shard writes the files and then swaps, under the state's
//! write lock a thousand jobs at a time, each moved payload for its copy
//! (if the job still holds the same one). Writing a payload once cost
//! enqueue throughput a quarter and stalled applies for up to 200 ms when it
//! ran on the apply path.
//!
//! Only shards at format 1 or more move payloads: a format-0 state is
//! encoded by serde, in memory, by binaries that predate this.

use std::{
    collections::VecDeque,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicU64, Ordering},
        mpsc::SyncSender,
    },
};

use crate::queue::{Applied, ApplyOutput, JobId, Payload, PayloadFile, QueueState, payload::ReadWindow};

/// How large one payload file grows before the next is started.
const FILE_MAX: u64 = 64 << 20;
/// Payloads are written in pieces of about this size.
const WRITE_CHUNK: usize = 1 << 20;
/// Payloads move once this much more than the budget is in memory.
const MOVE_SLACK: u64 = 1 << 20;
/// At most this many bytes move in one round of the mover.
const MOVE_MAX: u64 = 8 << 20;
/// Jobs whose payloads are swapped under one hold of the state's write lock.
const SWAP_CHUNK: usize = 1024;
/// Jobs looked at under one hold of the state's read lock when all of them
/// are noted (after a raise from format 0).
const NOTE_CHUNK: usize = 4096;

/// One shard's payloads on disk: what apply noted (`queue`), the files
/// (`files`, the mover's and a restore's), and counts for `/metrics`.
pub struct PayloadSpill {
    queue: Mutex<SpillQueue>,
    files: Mutex<PayloadFiles>,
    moved_bytes: AtomicU64,
    /// Wakes the mover; none until it runs.
    wake: Mutex<Option<SyncSender<()>>>,
}

struct SpillQueue {
    /// Bytes of payload kept in memory (`u64::MAX`: all of them).
    budget: u64,
    move_slack: u64,
    move_max: u64,
    /// Jobs whose payloads were in memory when noted, oldest first, and the
    /// sum of their lengths.
    in_memory: VecDeque<(JobId, u32)>,
    in_memory_bytes: u64,
    /// Whether every job of the state with its payload in memory is in
    /// `in_memory`: not yet while the shard was at format 0, or after the
    /// state was replaced by one decoded in memory (the mover notes them).
    noted_all: bool,
    /// Raised by [`PayloadSpill::forget`]: a round that began before it
    /// belongs to another state and is dropped.
    generation: u64,
}

struct PayloadFiles {
    dir: PathBuf,
    file: Option<OpenFile>,
    /// Files written before the current one, oldest first: compacted once
    /// few of their payloads are still referred to.
    older: VecDeque<Written>,
    file_max: u64,
    /// Set while writing fails, so the failure is logged once.
    failing: bool,
}

struct OpenFile {
    file: Arc<PayloadFile>,
    /// Bytes handed out, written or not.
    len: u64,
    /// Bytes not written yet, which start at `len - unwritten.len()`.
    unwritten: Vec<u8>,
    written: Written,
}

/// What went into a file: how many payloads, of which jobs.
struct Written {
    file: Arc<PayloadFile>,
    payloads: u64,
    lowest: JobId,
    highest: JobId,
}

impl Written {
    /// Payloads of the file something still refers to (a job of the state,
    /// of a snapshot being written, a read in progress), at most.
    fn referred(&self) -> u64 {
        Arc::strong_count(&self.file) as u64 - 1
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where the mover finds a shard's queue state.
pub struct StateAccess<'a, T> {
    pub state: &'a RwLock<T>,
    pub queue: fn(&T) -> &QueueState,
    pub queue_mut: fn(&mut T) -> &mut QueueState,
}

impl<T> StateAccess<'_, T> {
    fn read<R>(&self, f: impl FnOnce(&QueueState) -> R) -> R {
        f((self.queue)(&self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)))
    }

    fn write<R>(&self, f: impl FnOnce(&mut QueueState) -> R) -> R {
        f((self.queue_mut)(&mut self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)))
    }
}

impl PayloadSpill {
    /// `budget`: bytes of payload kept in memory (`u64::MAX`: all of them).
    pub fn new(dir: &Path, budget: u64) -> Self {
        PayloadSpill {
            queue: Mutex::new(SpillQueue {
                budget,
                move_slack: MOVE_SLACK,
                move_max: MOVE_MAX,
                in_memory: VecDeque::new(),
                in_memory_bytes: 0,
                noted_all: false,
                generation: 0,
            }),
            files: Mutex::new(PayloadFiles {
                dir: dir.to_path_buf(),
                file: None,
                older: VecDeque::new(),
                file_max: FILE_MAX,
                failing: false,
            }),
            moved_bytes: AtomicU64::new(0),
            wake: Mutex::new(None),
        }
    }

    /// Whether payloads ever move (a budget of `u64::MAX` keeps them all).
    pub fn moves(&self) -> bool {
        lock(&self.queue).budget != u64::MAX
    }

    /// Payload files this spill still refers to.
    pub fn files(&self) -> usize {
        let files = lock(&self.files);
        files.older.len() + usize::from(files.file.is_some())
    }

    /// Payload bytes moved to disk since the process started.
    pub fn moved_bytes(&self) -> u64 {
        self.moved_bytes.load(Ordering::Relaxed)
    }

    /// Payload bytes of this shard's jobs known to be in memory.
    pub fn in_memory_bytes(&self) -> u64 {
        lock(&self.queue).in_memory_bytes
    }

    /// The mover is woken through `wake` when there is work.
    pub fn set_wake(&self, wake: SyncSender<()>) {
        *lock(&self.wake) = Some(wake);
    }

    fn wake(&self) {
        if let Some(wake) = lock(&self.wake).as_ref() {
            // Full: a wake-up is pending already.
            let _ = wake.try_send(());
        }
    }

    /// The state was replaced (a snapshot installed, a copy dropped): the
    /// jobs noted are not its jobs.
    pub fn forget(&self) {
        let mut queue = lock(&self.queue);
        queue.in_memory.clear();
        queue.in_memory_bytes = 0;
        queue.noted_all = false;
        queue.generation += 1;
    }

    /// After `queue` applied an entry with output `out` (under the state's
    /// write lock): notes the jobs it created, and wakes the mover if more
    /// than the budget is in memory.
    pub fn after_apply(&self, queue: &QueueState, out: &ApplyOutput) {
        if queue.format() == 0 {
            return;
        }
        let mut noted = lock(&self.queue);
        if noted.budget == u64::MAX {
            return;
        }
        if noted.noted_all {
            for result in &out.results {
                if let Applied::Enqueued { job_id, created: true, .. } = result
                    && let Some(job) = queue.job(*job_id)
                {
                    noted.note(*job_id, &job.payload);
                }
            }
        }
        let due = !noted.noted_all || noted.in_memory_bytes > noted.budget.saturating_add(noted.move_slack);
        drop(noted);
        if due {
            self.wake();
        }
    }

    /// One round of the mover: notes every job if due, moves up to
    /// `move_max` bytes of the oldest payloads, compacts one sparse file.
    /// Returns whether there is more to do at once.
    pub fn move_round<T>(&self, state: &StateAccess<'_, T>) -> bool {
        let noted_all = lock(&self.queue).noted_all;
        if !noted_all {
            self.note_all(state);
        }
        let moved = self.move_oldest(state);
        self.compact(state);
        moved
    }

    /// Notes every job of the state whose payload is in memory, oldest
    /// first (job ids grow with every enqueue), a chunk at a time.
    fn note_all<T>(&self, state: &StateAccess<'_, T>) {
        let generation = lock(&self.queue).generation;
        let mut after: Option<JobId> = None;
        loop {
            let done = state.read(|queue| {
                if queue.format() == 0 {
                    return true;
                }
                let mut noted = lock(&self.queue);
                if noted.generation != generation || noted.budget == u64::MAX {
                    return true;
                }
                let from = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
                let mut seen = 0;
                for (job_id, job) in queue.jobs().range((from, std::ops::Bound::Unbounded)).take(NOTE_CHUNK) {
                    noted.note(*job_id, &job.payload);
                    after = Some(*job_id);
                    seen += 1;
                }
                // Applies wait for the read lock: none noted a job meanwhile.
                if seen < NOTE_CHUNK {
                    noted.noted_all = true;
                }
                seen < NOTE_CHUNK
            });
            if done {
                return;
            }
        }
    }

    fn move_oldest<T>(&self, state: &StateAccess<'_, T>) -> bool {
        let (batch, generation) = {
            let mut noted = lock(&self.queue);
            let mut bytes = 0u64;
            let mut batch = Vec::new();
            if noted.in_memory_bytes > noted.budget.saturating_add(noted.move_slack) || noted.move_slack == 0 {
                while noted.in_memory_bytes > noted.budget && bytes < noted.move_max {
                    let Some((job_id, len)) = noted.in_memory.pop_front() else { break };
                    noted.in_memory_bytes -= u64::from(len);
                    bytes += u64::from(len);
                    batch.push(job_id);
                }
            }
            (batch, noted.generation)
        };
        if batch.is_empty() {
            return false;
        }
        // The payloads, shared (not copied) under the read lock.
        let held: Vec<(JobId, Payload)> = state.read(|queue| {
            batch
                .iter()
                .filter_map(|job_id| {
                    let payload = &queue.job(*job_id)?.payload;
                    payload.in_memory().map(|_| (*job_id, payload.clone()))
                })
                .collect()
        });
        let copies = {
            let mut files = lock(&self.files);
            let written = held
                .iter()
                .map(|(job_id, payload)| files.append(*job_id, payload.in_memory().unwrap_or_default()))
                .collect::<io::Result<Vec<_>>>()
                .and_then(|copies| files.flush().map(|()| copies));
            match written {
                Ok(copies) => copies,
                Err(e) => {
                    files.failed("cannot move payloads to disk: they stay in memory", &e);
                    drop(files);
                    // Back in front, oldest first, unless the state changed.
                    let mut noted = lock(&self.queue);
                    if noted.generation == generation {
                        for (job_id, payload) in held.iter().rev() {
                            noted.in_memory.push_front((*job_id, payload.len() as u32));
                            noted.in_memory_bytes += payload.len() as u64;
                        }
                    }
                    return false;
                }
            }
        };
        lock(&self.files).recovered();
        let moved = self.swap(state, generation, &held, copies);
        self.moved_bytes.fetch_add(moved, Ordering::Relaxed);
        true
    }

    /// Puts each copy in place of the payload it copies, where the job
    /// still holds that one, a chunk at a time.
    /// Returns the bytes swapped.
    fn swap<T>(
        &self,
        state: &StateAccess<'_, T>,
        generation: u64,
        held: &[(JobId, Payload)],
        copies: Vec<Payload>,
    ) -> u64 {
        let mut copies = copies.into_iter();
        let mut swapped = 0;
        for chunk in held.chunks(SWAP_CHUNK) {
            let moved: u64 = state.write(|queue| {
                if lock(&self.queue).generation != generation {
                    return 0;
                }
                chunk
                    .iter()
                    .zip(copies.by_ref())
                    .filter(|((job_id, was), copy)| {
                        queue.job(*job_id).is_some_and(|job| job.payload.same_as(was))
                            && queue.move_payload(*job_id, copy.clone())
                    })
                    .map(|((_, was), _)| was.len() as u64)
                    .sum()
            });
            swapped += moved;
        }
        swapped
    }

    /// A file stays as long as one payload in it is referred to: one job
    /// scheduled for next week would keep 64 MiB of others' payloads on
    /// disk, and a week of them terabytes. Files nothing refers to any more
    /// are let go; the oldest file of which at most a quarter is still
    /// referred to has those payloads copied to the current file.
    fn compact<T>(&self, state: &StateAccess<'_, T>) {
        let generation = lock(&self.queue).generation;
        let sparse = {
            let mut files = lock(&self.files);
            files.older.retain(|written| written.referred() > 0);
            if files.failing {
                return;
            }
            let Some(at) = files.older.iter().position(|w| w.referred() * 4 <= w.payloads) else { return };
            let Some(sparse) = files.older.remove(at) else { return };
            sparse
        };
        let live: Vec<(JobId, Payload)> = state.read(|queue| {
            queue
                .jobs()
                .range(sparse.lowest..=sparse.highest)
                .filter(|(_, job)| job.payload.is_in(&sparse.file))
                .map(|(job_id, job)| (*job_id, job.payload.clone()))
                .collect()
        });
        let mut files = lock(&self.files);
        let mut window = ReadWindow::default();
        let copied = live
            .iter()
            .map(|(job_id, payload)| {
                let bytes = payload.read_through(&mut window).map_err(|e| io::Error::other(e.to_string()))?;
                files.append(*job_id, &bytes)
            })
            .collect::<io::Result<Vec<_>>>()
            .and_then(|copies| files.flush().map(|()| copies));
        match copied {
            Ok(copies) => {
                drop(files);
                tracing::debug!(payloads = live.len(), of = sparse.payloads, "payload file compacted");
                // Copies, not payloads moved out of memory: not counted.
                self.swap(state, generation, &live, copies);
            }
            Err(e) => {
                files.failed("cannot compact a payload file: it stays", &e);
                files.older.push_front(sparse);
            }
        }
    }

    /// Decodes a restored state's payloads straight to disk: `write` gets a
    /// function that takes each payload as it is decoded. Empty payloads stay
    /// in memory (there is nothing to move).
    pub fn restoring<T>(
        &self,
        write: impl FnOnce(&mut dyn FnMut(JobId, Vec<u8>) -> io::Result<Payload>) -> T,
    ) -> io::Result<T> {
        if !self.moves() {
            return Ok(write(&mut |_, bytes| Ok(Payload::from(bytes))));
        }
        self.forget();
        let mut files = lock(&self.files);
        let mut moved = 0u64;
        let restored = write(&mut |job_id, bytes| {
            if bytes.is_empty() {
                return Ok(Payload::from(bytes));
            }
            moved += bytes.len() as u64;
            files.append(job_id, &bytes)
        });
        files.flush()?;
        drop(files);
        self.moved_bytes.fetch_add(moved, Ordering::Relaxed);
        // Nothing of the restored state is in memory to note.
        lock(&self.queue).noted_all = true;
        Ok(restored)
    }
}

impl SpillQueue {
    fn note(&mut self, job_id: JobId, payload: &Payload) {
        if !payload.is_empty() && payload.in_memory().is_some() {
            self.in_memory.push_back((job_id, payload.len() as u32));
            self.in_memory_bytes += payload.len() as u64;
        }
    }
}

impl PayloadFiles {
    /// Hands out a place for `bytes` in the current file. Not readable until
    /// [`Self::flush`].
    fn append(&mut self, job_id: JobId, bytes: &[u8]) -> io::Result<Payload> {
        if self.file.as_ref().is_none_or(|f| f.len + bytes.len() as u64 > self.file_max && f.len > 0) {
            self.flush()?;
            std::fs::create_dir_all(&self.dir)?;
            let file = Arc::new(PayloadFile::new(tempfile::tempfile_in(&self.dir)?));
            let written = Written { file: file.clone(), payloads: 0, lowest: job_id, highest: job_id };
            if let Some(full) = self.file.replace(OpenFile { file, len: 0, unwritten: Vec::new(), written }) {
                self.older.push_back(full.written);
            }
        }
        let Some(open) = self.file.as_mut() else { unreachable!("a file was just opened") };
        let payload = Payload::stored(open.file.clone(), open.len, bytes);
        open.written.payloads += 1;
        open.written.lowest = open.written.lowest.min(job_id);
        open.written.highest = open.written.highest.max(job_id);
        open.unwritten.extend_from_slice(bytes);
        open.len += bytes.len() as u64;
        if open.unwritten.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(payload)
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(open) = self.file.as_mut()
            && !open.unwritten.is_empty()
        {
            let at = open.len - open.unwritten.len() as u64;
            let written = open.file.file().write_all_at(&open.unwritten, at);
            open.unwritten.clear();
            if let Err(e) = written {
                // What was handed out of it is never referred to: a new file next time.
                self.file = None;
                return Err(e);
            }
        }
        Ok(())
    }

    fn failed(&mut self, what: &str, error: &io::Error) {
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(dir = %self.dir.display(), %error, "{what}");
        }
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(dir = %self.dir.display(), "payloads move to disk again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Batch, Command, JobState, NewJob, ShardId};

    /// A shard's state and its spill, the mover run by hand.
    struct Shard {
        state: RwLock<QueueState>,
        spill: PayloadSpill,
        index: u64,
    }

    impl Shard {
        fn new(dir: &Path, budget: u64, format: u32) -> Shard {
            let mut shard = Shard {
                state: RwLock::new(QueueState::new(ShardId(0))),
                spill: PayloadSpill::new(dir, budget),
                index: 0,
            };
            if format > 0 {
                shard.apply(vec![Command::SetFormat { format }]);
            }
            shard
        }

        /// Moves as soon as the budget is passed, all of it at once.
        fn eager(self) -> Shard {
            let mut queue = lock(&self.spill.queue);
            queue.move_slack = 0;
            queue.move_max = u64::MAX;
            drop(queue);
            self
        }

        fn apply(&mut self, commands: Vec<Command>) -> ApplyOutput {
            self.index += 1;
            let mut state = self.state.write().unwrap();
            let out = state.apply(self.index, &Batch { proposed_at_ms: self.index, commands: commands.into() });
            self.spill.after_apply(&state, &out);
            out
        }

        fn enqueue(&mut self, payload: &[u8]) -> JobId {
            let out = self.apply(vec![Command::Enqueue(NewJob::new("q", payload))]);
            match out.results[..] {
                [Applied::Enqueued { job_id, .. }] => job_id,
                ref other => panic!("{other:?}"),
            }
        }

        /// One round of the mover.
        fn round(&self) -> bool {
            self.spill.move_round(&StateAccess { state: &self.state, queue: |q| q, queue_mut: |q| q })
        }

        fn settle(&self) {
            while self.round() {}
        }

        fn payload(&self, job_id: JobId) -> Payload {
            self.state.read().unwrap().job(job_id).unwrap().payload.clone()
        }
    }

    #[test]
    fn the_oldest_payloads_move_to_disk_past_the_budget_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), 250, 1).eager();
        let ids: Vec<JobId> = (0..10u8).map(|i| shard.enqueue(&[i; 100])).collect();
        shard.settle();
        assert!(shard.spill.in_memory_bytes() <= 250, "{}", shard.spill.in_memory_bytes());
        let on_disk: Vec<bool> = ids.iter().map(|id| shard.payload(*id).in_memory().is_none()).collect();
        assert_eq!(on_disk, [true, true, true, true, true, true, true, true, false, false], "oldest first");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(&*shard.payload(*id).read().unwrap(), &[i as u8; 100][..]);
        }
        assert_eq!(shard.spill.moved_bytes(), 800);
        // Moved or not, the state encodes to the same bytes as one that never moved.
        let mut kept = Shard::new(dir.path(), u64::MAX, 1);
        for i in 0..10u8 {
            kept.enqueue(&[i; 100]);
        }
        let (state, kept) = (shard.state.read().unwrap(), kept.state.read().unwrap());
        assert_eq!(
            crate::format::storage::encode_state_to_vec(&state).unwrap(),
            crate::format::storage::encode_state_to_vec(&kept).unwrap()
        );
        assert_eq!(*state, *kept);
    }

    /// A job that finished (and was dropped) or changed meanwhile keeps what
    /// it has: the mover swaps only a payload the job still holds.
    #[test]
    fn a_job_gone_before_the_swap_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), 0, 1).eager();
        let gone = shard.enqueue(b"gone");
        let kept = shard.enqueue(b"kept");
        shard.apply(vec![Command::Cancel { job_id: gone, reason: "test".into() }]);
        shard.apply(vec![Command::PurgeQueue { queue: "q".into(), state: JobState::Cancelled }]);
        shard.settle();
        assert!(shard.state.read().unwrap().job(gone).is_none());
        assert_eq!(shard.payload(kept), b"kept");
        assert!(shard.payload(kept).in_memory().is_none());
        assert_eq!(shard.spill.moved_bytes(), 4, "only the job still there counts");
    }

    /// A file nothing refers to goes; one with a quarter of its payloads
    /// still referred to is compacted into the current file; the bytes stay.
    #[test]
    fn sparse_payload_files_are_compacted_and_unused_ones_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), 0, 1).eager();
        lock(&shard.spill.files).file_max = 450; // four 100-byte payloads per file
        let mut ids = Vec::new();
        for i in 0..10u8 {
            ids.push(shard.enqueue(&[i; 100]));
            shard.settle();
        }
        assert_eq!(shard.spill.files(), 3, "1-4, 5-8, 9-10");
        let cancel = |ids: &[JobId], n: &[usize]| {
            n.iter().map(|&n| Command::Cancel { job_id: ids[n], reason: "test".into() }).collect::<Vec<_>>()
        };
        let purge = Command::PurgeQueue { queue: "q".into(), state: JobState::Cancelled };
        // Jobs 5-8 go: their file with them.
        shard.apply(cancel(&ids, &[4, 5, 6, 7]));
        shard.apply(vec![purge.clone()]);
        shard.settle();
        assert_eq!(shard.spill.files(), 2);
        // Three of jobs 1-4 go: job 4's payload is copied to the current file.
        shard.apply(cancel(&ids, &[0, 1, 2]));
        shard.apply(vec![purge]);
        shard.settle();
        shard.settle();
        assert_eq!(shard.spill.files(), 1, "only the current file");
        for n in [3usize, 8, 9] {
            assert_eq!(&*shard.payload(ids[n]).read().unwrap(), &[n as u8; 100][..], "job {n}");
        }
        assert_eq!(shard.spill.moved_bytes(), 1000, "copies are not counted as moved");
    }

    /// A backlog moves a bounded amount per round, and only once the slack
    /// over the budget is used.
    #[test]
    fn a_backlog_moves_a_bounded_amount_per_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), 0, 1);
        {
            let mut queue = lock(&shard.spill.queue);
            queue.move_slack = 250;
            queue.move_max = 300;
        }
        shard.enqueue(&[1; 100]);
        assert!(!shard.round());
        assert_eq!(shard.spill.moved_bytes(), 0, "within the slack");
        let jobs: Vec<Command> = (0..9).map(|i| Command::Enqueue(NewJob::new("q", vec![i; 100]))).collect();
        shard.apply(jobs);
        assert!(shard.round());
        assert_eq!(shard.spill.moved_bytes(), 300, "at most move_max in one round");
        shard.settle();
        assert_eq!((shard.spill.moved_bytes(), shard.spill.in_memory_bytes()), (900, 100), "the rest beyond the slack");
    }

    #[test]
    fn jobs_enqueued_before_the_raise_move_once_the_shard_is_raised() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), 0, 0).eager();
        for i in 0..3u8 {
            shard.enqueue(&[i; 10]);
        }
        shard.settle();
        assert_eq!(shard.spill.moved_bytes(), 0, "format 0: in memory");
        shard.apply(vec![Command::SetFormat { format: 1 }]);
        shard.settle();
        assert_eq!(shard.spill.moved_bytes(), 30);
        assert!(shard.state.read().unwrap().jobs().values().all(|job| job.payload.in_memory().is_none()));
        shard.enqueue(b"after");
        shard.settle();
        assert_eq!(shard.spill.moved_bytes(), 35, "each job noted once");
    }

    #[test]
    fn a_restored_state_has_its_payloads_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = Shard::new(dir.path(), u64::MAX, 1);
        for i in 0..5u8 {
            shard.enqueue(&[i; 3000]);
        }
        shard.enqueue(b"");
        let state = shard.state.read().unwrap().clone();
        let bytes = crate::format::storage::encode_state_to_vec(&state).unwrap();
        let spill = PayloadSpill::new(dir.path(), 1 << 20);
        let restored = spill
            .restoring(|to_disk| {
                crate::format::storage::decode_state_spilling(bytes.as_slice(), bytes.len() as u64, to_disk)
            })
            .unwrap()
            .unwrap();
        assert_eq!(restored, state);
        let in_memory = restored.jobs().values().filter(|job| job.payload.in_memory().is_some()).count();
        assert_eq!(in_memory, 1, "only the empty payload stays in memory");
        assert_eq!(spill.moved_bytes(), 15_000);
    }

    #[test]
    fn a_payload_file_that_cannot_be_created_leaves_payloads_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, b"a file where the directory should be").unwrap();
        let mut shard = Shard::new(&blocked, 0, 1).eager();
        let job = shard.enqueue(b"kept");
        shard.settle();
        assert_eq!(shard.payload(job).in_memory(), Some(&b"kept"[..]));
        assert_eq!(shard.spill.moved_bytes(), 0);
        assert_eq!(shard.spill.in_memory_bytes(), 4, "noted again, to move later");
    }
}
