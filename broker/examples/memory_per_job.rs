//! Bytes the state machine holds per queued job beyond its payload, counted
//! by the allocator (not RSS: no allocator slack, no log, no buffers), for
//! the state as applied and as restored from a snapshot, and in all per job
//! when its payload waits on disk.
//!
//!   cargo run --release -p gantry-broker --example memory_per_job [jobs] [payload-bytes]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use gantry_broker::queue::{Batch, Command, NewJob, QueueState, ShardId};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().map_or(1_000_000, |a| a.parse().expect("jobs: a number"));
    let payload: usize = args.next().map_or(256, |a| a.parse().expect("payload-bytes: a number"));
    let mut state = QueueState::new(ShardId(0));
    let mut index = 1;
    state.apply(index, &Batch { proposed_at_ms: 1, commands: vec![Command::SetFormat { format: 2 }].into() });
    let before = LIVE.load(Ordering::Relaxed);
    for chunk in 0..jobs.div_ceil(100) {
        index += 1;
        let commands: Vec<Command> = (0..100.min(jobs - chunk * 100))
            .map(|_| Command::Enqueue(NewJob::new("queue-name", vec![7u8; payload])))
            .collect();
        state.apply(index, &Batch { proposed_at_ms: index, commands: commands.into() });
    }
    let applied = LIVE.load(Ordering::Relaxed) - before;
    let per_job = |bytes: usize| bytes as f64 / jobs as f64 - payload as f64;
    println!("{jobs} queued jobs of {payload} bytes: applied {:.0} bytes per job beyond the payload", per_job(applied));
    println!("size_of::<Job>() = {}", std::mem::size_of::<gantry_broker::queue::Job>());
    let bytes = gantry_broker::raft::state_machine::encode_state_data(&state).expect("payloads in memory");
    drop(state);
    let before = LIVE.load(Ordering::Relaxed);
    let restored = gantry_broker::raft::state_machine::decode_state_data(&bytes).expect("decodes");
    let restored_bytes = LIVE.load(Ordering::Relaxed) - before;
    println!("restored from a snapshot: {:.0} bytes per job beyond the payload", per_job(restored_bytes));
    drop(restored);

    // As a node restores it: every payload written to a file as it is
    // decoded, none in memory.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let spill = gantry_broker::raft::payload_spill::PayloadSpill::new(dir.path(), 0);
    let data = gantry_broker::raft::snapshot_file::SnapshotData::Memory(bytes);
    let before = LIVE.load(Ordering::Relaxed);
    let on_disk = data.decode_to(&spill).expect("decodes");
    let on_disk_bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "restored with the payloads on disk: {:.0} bytes per job (payloads on disk: {} MB)",
        on_disk_bytes as f64 / jobs as f64,
        spill.moved_bytes() / 1_000_000
    );
    drop(on_disk);
}
