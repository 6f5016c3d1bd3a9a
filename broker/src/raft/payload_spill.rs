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
//! Only shards at format 1 or more move payloads: a format-0 state is
//! encoded by serde, in memory, by binaries that predate this.

use std::{
    collections::VecDeque,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::queue::{Applied, ApplyOutput, JobId, Payload, PayloadFile, QueueState, payload::ReadWindow};

/// How large one payload file grows before the next is started. A file's
/// space returns once all its jobs are gone.
const FILE_MAX: u64 = 64 << 20;
/// Restored payloads are written in pieces of about this size.
const WRITE_CHUNK: usize = 1 << 20;

pub struct PayloadSpill {
    dir: PathBuf,
    /// Bytes of payload the shard's newest jobs keep in memory.
    budget: u64,
    /// Jobs whose payloads were in memory when noted, oldest first, and the
    /// sum of their lengths.
    in_memory: VecDeque<(JobId, u32)>,
    in_memory_bytes: u64,
    /// Whether every job of the state with its payload in memory is in
    /// `in_memory`: not yet when the state was restored or replaced, or
    /// while the shard was at format 0 (its jobs are noted at the raise).
    noted_all: bool,
    file: Option<OpenFile>,
    /// Files written before the current one, oldest first: compacted once
    /// few of their payloads are still referred to.
    older: VecDeque<Written>,
    file_max: u64,
    /// Set while writing fails, so the failure is logged once.
    failing: bool,
    /// Payload bytes moved to disk since the process started.
    moved_bytes: u64,
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
#[derive(Clone)]
struct Written {
    file: Arc<PayloadFile>,
    payloads: u64,
    lowest: JobId,
    highest: JobId,
}

impl Written {
    /// Payloads of the file something still refers to (a job of the state,
    /// of a snapshot being written, of a read in progress), at most.
    fn referred(&self) -> u64 {
        Arc::strong_count(&self.file) as u64 - 1
    }
}

impl PayloadSpill {
    /// `budget`: bytes of payload kept in memory (`u64::MAX`: all of them).
    pub fn new(dir: &Path, budget: u64) -> Self {
        PayloadSpill {
            dir: dir.to_path_buf(),
            budget,
            in_memory: VecDeque::new(),
            in_memory_bytes: 0,
            noted_all: false,
            file: None,
            older: VecDeque::new(),
            file_max: FILE_MAX,
            failing: false,
            moved_bytes: 0,
        }
    }

    /// Payload files this spill still refers to.
    pub fn files(&self) -> usize {
        self.older.len() + usize::from(self.file.is_some())
    }

    /// Payload bytes moved to disk since the process started.
    pub fn moved_bytes(&self) -> u64 {
        self.moved_bytes
    }

    /// Payload bytes of this shard's jobs known to be in memory.
    pub fn in_memory_bytes(&self) -> u64 {
        self.in_memory_bytes
    }

    /// The state was replaced (a snapshot installed, a copy dropped): the
    /// jobs noted are not its jobs.
    pub fn forget(&mut self) {
        self.in_memory.clear();
        self.in_memory_bytes = 0;
        self.noted_all = false;
    }

    fn note(&mut self, job_id: JobId, payload: &Payload) {
        if !payload.is_empty() && payload.in_memory().is_some() {
            self.in_memory.push_back((job_id, payload.len() as u32));
            self.in_memory_bytes += payload.len() as u64;
        }
    }

    /// After `queue` applied an entry with output `out`: notes the jobs it
    /// created and moves the oldest payloads to disk while more than the
    /// budget is in memory. A write that fails leaves the payloads in memory
    /// (logged); nothing is lost.
    pub fn after_apply(&mut self, queue: &mut QueueState, out: &ApplyOutput) {
        if queue.format() == 0 || self.budget == u64::MAX {
            return;
        }
        if !self.noted_all {
            // Oldest first: job ids grow with every enqueue.
            for (job_id, job) in queue.jobs().iter() {
                self.note(*job_id, &job.payload);
            }
            self.noted_all = true;
        } else {
            for result in &out.results {
                if let Applied::Enqueued { job_id, created: true, .. } = result
                    && let Some(job) = queue.job(*job_id)
                {
                    self.note(*job_id, &job.payload);
                }
            }
        }
        if self.in_memory_bytes > self.budget {
            self.move_oldest(queue);
        }
        self.compact(queue);
    }

    /// A file stays as long as one payload in it is referred to: one job
    /// scheduled for next week would keep 64 MiB of others' payloads on
    /// disk, and a week of them terabytes. Files nothing refers to any more
    /// are let go; the oldest file of which at most a quarter is still
    /// referred to has those payloads copied to the current file (one file
    /// per entry applied, so an apply does at most 16 MiB more work).
    fn compact(&mut self, queue: &mut QueueState) {
        self.older.retain(|written| written.referred() > 0);
        if self.failing {
            return;
        }
        let Some(at) = self.older.iter().position(|w| w.referred() * 4 <= w.payloads) else { return };
        let Some(sparse) = self.older.remove(at) else { return };
        let live: Vec<(JobId, Payload)> = queue
            .jobs()
            .range(sparse.lowest..=sparse.highest)
            .filter(|(_, job)| job.payload.is_in(&sparse.file))
            .map(|(job_id, job)| (*job_id, job.payload.clone()))
            .collect();
        let mut window = ReadWindow::default();
        let copied = live
            .iter()
            .map(|(job_id, payload)| {
                let bytes = payload.read_through(&mut window).map_err(|e| io::Error::other(e.to_string()))?;
                self.append(*job_id, &bytes)
            })
            .collect::<io::Result<Vec<_>>>()
            .and_then(|copies| self.flush().map(|()| copies));
        match copied {
            Ok(copies) => {
                for ((job_id, _), copy) in live.iter().zip(copies) {
                    queue.move_payload(*job_id, copy);
                }
                tracing::debug!(dir = %self.dir.display(), payloads = live.len(), of = sparse.payloads, "payload file compacted");
            }
            Err(e) => {
                self.file = None;
                self.older.push_front(sparse);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot compact a payload file: it stays");
                }
            }
        }
    }

    fn move_oldest(&mut self, queue: &mut QueueState) {
        let mut moving = Vec::new();
        let mut bytes = 0u64;
        while self.in_memory_bytes - bytes > self.budget
            && let Some((job_id, len)) = self.in_memory.get(moving.len()).copied()
        {
            moving.push((job_id, len));
            bytes += u64::from(len);
        }
        let written = moving
            .iter()
            .map(|(job_id, _)| {
                let in_memory = queue.job(*job_id).and_then(|job| job.payload.in_memory());
                // Gone (finished and dropped) or moved already: nothing to write.
                in_memory.map(|bytes| self.append(*job_id, bytes)).transpose()
            })
            .collect::<io::Result<Vec<_>>>()
            .and_then(|payloads| self.flush().map(|()| payloads));
        match written {
            Ok(payloads) => {
                for ((job_id, _), payload) in moving.iter().zip(payloads) {
                    if let Some(payload) = payload {
                        self.moved_bytes += payload.len() as u64;
                        queue.move_payload(*job_id, payload);
                    }
                }
                self.in_memory.drain(..moving.len());
                self.in_memory_bytes -= bytes;
                if std::mem::take(&mut self.failing) {
                    tracing::info!(dir = %self.dir.display(), "payloads move to disk again");
                }
            }
            Err(e) => {
                // What was half written is never referred to: a new file next time.
                self.file = None;
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot move payloads to disk: they stay in memory");
                }
            }
        }
    }

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
        let payload = Payload::stored(open.file.clone(), open.len, bytes.len() as u32);
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
            open.file.file().write_all_at(&open.unwritten, at)?;
            open.unwritten.clear();
        }
        Ok(())
    }

    /// Decodes a restored state's payloads straight to disk: `write` gets a
    /// function that takes each payload as it is decoded. Empty payloads stay
    /// in memory (there is nothing to move).
    pub fn restoring<T>(
        &mut self,
        to_disk: bool,
        write: impl FnOnce(&mut dyn FnMut(JobId, Vec<u8>) -> io::Result<Payload>) -> T,
    ) -> io::Result<T> {
        if !to_disk || self.budget == u64::MAX {
            return Ok(write(&mut |_, bytes| Ok(Payload::from(bytes))));
        }
        self.forget();
        let mut moved = 0u64;
        let restored = write(&mut |job_id, bytes| {
            if bytes.is_empty() {
                return Ok(Payload::from(bytes));
            }
            moved += bytes.len() as u64;
            self.append(job_id, &bytes)
        });
        self.flush()?;
        self.moved_bytes += moved;
        self.noted_all = true;
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Batch, Command, NewJob, ShardId};

    fn enqueue(state: &mut QueueState, index: u64, payload: &[u8]) -> ApplyOutput {
        let job = NewJob::new("q", payload);
        state.apply(index, &Batch { proposed_at_ms: index, commands: vec![Command::Enqueue(job)].into() })
    }

    fn raised(shard: ShardId) -> QueueState {
        let mut state = QueueState::new(shard);
        state.apply(1, &Batch { proposed_at_ms: 1, commands: vec![Command::SetFormat { format: 1 }].into() });
        assert_eq!(state.format(), 1);
        state
    }

    #[test]
    fn the_oldest_payloads_move_to_disk_past_the_budget_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = PayloadSpill::new(dir.path(), 250);
        let mut state = raised(ShardId(0));
        let mut ids = Vec::new();
        for i in 0..10u8 {
            let out = enqueue(&mut state, 2 + u64::from(i), &[i; 100]);
            spill.after_apply(&mut state, &out);
            ids.extend(out.results.iter().filter_map(|r| match r {
                Applied::Enqueued { job_id, .. } => Some(*job_id),
                _ => None,
            }));
        }
        assert!(spill.in_memory_bytes() <= 250, "{}", spill.in_memory_bytes());
        let on_disk: Vec<bool> = ids.iter().map(|id| state.job(*id).unwrap().payload.in_memory().is_none()).collect();
        assert_eq!(on_disk, [true, true, true, true, true, true, true, true, false, false], "oldest first");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(&*state.job(*id).unwrap().payload.read().unwrap(), &[i as u8; 100][..]);
        }
        assert_eq!(spill.moved_bytes(), 800);
        // Moved or not, the state encodes to the same bytes as one that never moved.
        let mut kept = raised(ShardId(0));
        for i in 0..10u8 {
            enqueue(&mut kept, 2 + u64::from(i), &[i; 100]);
        }
        assert_eq!(
            crate::format::storage::encode_state_to_vec(&state).unwrap(),
            crate::format::storage::encode_state_to_vec(&kept).unwrap()
        );
        assert_eq!(state, kept);
    }

    /// A file nothing refers to goes; one with a quarter of its payloads
    /// still referred to is compacted into the current file; the bytes stay.
    #[test]
    fn sparse_payload_files_are_compacted_and_unused_ones_let_go() {
        use crate::queue::JobState;
        let dir = tempfile::tempdir().unwrap();
        let mut spill = PayloadSpill::new(dir.path(), 0);
        spill.file_max = 450; // four 100-byte payloads per file
        let mut state = raised(ShardId(0));
        let mut ids = Vec::new();
        let mut index = 2;
        let mut apply = |state: &mut QueueState, spill: &mut PayloadSpill, commands: Vec<Command>| {
            index += 1;
            let out = state.apply(index, &Batch { proposed_at_ms: index, commands: commands.into() });
            spill.after_apply(state, &out);
            out
        };
        for i in 0..10u8 {
            let out = apply(&mut state, &mut spill, vec![Command::Enqueue(NewJob::new("q", vec![i; 100]))]);
            ids.extend(out.results.iter().filter_map(|r| match r {
                Applied::Enqueued { job_id, .. } => Some(*job_id),
                _ => None,
            }));
        }
        assert_eq!(spill.files(), 3, "1-4, 5-8, 9-10");
        let cancel = |n: &[usize]| {
            n.iter().map(|&n| Command::Cancel { job_id: ids[n], reason: "test".into() }).collect::<Vec<_>>()
        };
        let purge = Command::PurgeQueue { queue: "q".into(), state: JobState::Cancelled };
        // Jobs 5-8 go: their file with them.
        apply(&mut state, &mut spill, cancel(&[4, 5, 6, 7]));
        apply(&mut state, &mut spill, vec![purge.clone()]);
        assert_eq!(spill.files(), 2);
        // Three of jobs 1-4 go: job 4's payload is copied to the current file.
        apply(&mut state, &mut spill, cancel(&[0, 1, 2]));
        apply(&mut state, &mut spill, vec![purge]);
        assert_eq!(spill.files(), 1, "only the current file");
        for n in [3usize, 8, 9] {
            assert_eq!(&*state.job(ids[n]).unwrap().payload.read().unwrap(), &[n as u8; 100][..], "job {n}");
        }
    }

    #[test]
    fn a_format_0_shard_keeps_its_payloads_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = PayloadSpill::new(dir.path(), 0);
        let mut state = QueueState::new(ShardId(0));
        let out = enqueue(&mut state, 1, b"legacy");
        spill.after_apply(&mut state, &out);
        assert!(state.jobs().values().all(|job| job.payload.in_memory().is_some()));
        assert_eq!(spill.moved_bytes(), 0);
    }

    #[test]
    fn jobs_enqueued_before_the_raise_move_once_the_shard_is_raised() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = PayloadSpill::new(dir.path(), 0);
        let mut state = QueueState::new(ShardId(0));
        for i in 0..3u8 {
            let out = enqueue(&mut state, 1 + u64::from(i), &[i; 10]);
            spill.after_apply(&mut state, &out);
        }
        assert_eq!(spill.moved_bytes(), 0, "format 0: in memory");
        let out = state.apply(9, &Batch { proposed_at_ms: 9, commands: vec![Command::SetFormat { format: 1 }].into() });
        spill.after_apply(&mut state, &out);
        assert_eq!(spill.moved_bytes(), 30);
        assert!(state.jobs().values().all(|job| job.payload.in_memory().is_none()));
        let out = enqueue(&mut state, 10, b"after");
        spill.after_apply(&mut state, &out);
        assert_eq!(spill.moved_bytes(), 35, "each job noted once");
    }

    #[test]
    fn a_restored_state_has_its_payloads_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = raised(ShardId(0));
        for i in 0..5u8 {
            enqueue(&mut state, 2 + u64::from(i), &[i; 3000]);
        }
        enqueue(&mut state, 9, b"");
        let bytes = crate::format::storage::encode_state_to_vec(&state).unwrap();
        let mut spill = PayloadSpill::new(dir.path(), 1 << 20);
        let restored = spill
            .restoring(true, |to_disk| {
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
        let mut spill = PayloadSpill::new(&blocked, 0);
        let mut state = raised(ShardId(0));
        let out = enqueue(&mut state, 2, b"kept");
        spill.after_apply(&mut state, &out);
        let job = state.jobs().values().next().unwrap().clone();
        assert_eq!(job.payload.in_memory(), Some(&b"kept"[..]));
        assert_eq!(spill.moved_bytes(), 0);
    }
}
