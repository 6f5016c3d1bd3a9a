//! What applying a committed entry costs the state machine, and what a
//! snapshot's copy of the state costs (apply waits for that copy), with a
//! state that already holds many retained jobs: every node pays both.
//!
//!   cargo bench -p gantry-broker --bench apply

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use gantry_broker::queue::{
    Applied, ApplyOutput, Batch, Command, NewJob, Payload, QueueConfigUpdate, QueueState, SessionId, ShardId,
};

// The allocator `gantry serve` runs with: the maps' costs are mostly
// allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Finished jobs kept for the retention period: what a busy shard carries.
const RETAINED: usize = 300_000;
const BATCH: usize = 100;

struct Shard {
    state: QueueState,
    index: u64,
    now_ms: u64,
}

impl Shard {
    fn apply(&mut self, commands: Vec<Command>) -> ApplyOutput {
        self.index += 1;
        self.now_ms += 1;
        let batch = Batch { proposed_at_ms: self.now_ms, commands: commands.into() };
        self.state.apply(self.index, &batch)
    }

    /// Enqueue `BATCH` jobs, hand them to `session`, complete them: one
    /// job's whole life, in three entries as the leader would commit them.
    fn cycle(&mut self, queue: &str, session: &SessionId) {
        let enqueues = (0..BATCH).map(|_| Command::Enqueue(NewJob::new(queue, vec![7u8; 256]))).collect();
        self.apply(enqueues);
        let dispatched = self.apply(vec![Command::Dispatch { sessions: vec![session.clone()] }]);
        let completes: Vec<Command> = dispatched
            .assignments()
            .map(|a| Command::Complete { job_id: a.job_id, token: a.token, result: Vec::new() })
            .collect();
        assert_eq!(completes.len(), BATCH, "the session has room for the whole batch");
        let completed = self.apply(completes);
        // A refused result would make the cycle cheaper and the figure wrong.
        assert!(completed.results.iter().all(|r| matches!(r, Applied::Accepted { .. })));
    }
}

fn shard_with_retained_jobs() -> (Shard, SessionId) {
    let mut shard = Shard { state: QueueState::new(ShardId(0)), index: 0, now_ms: 1_000_000 };
    let session = SessionId("bench-session".into());
    shard.apply(vec![Command::OpenSession {
        session_id: session.clone(),
        worker_id: "bench-worker".into(),
        queues: vec!["retained".into(), "hot".into()],
        max_in_flight: BATCH as u32,
    }]);
    // The hot queue forgets its finished jobs at once, so the state stays
    // at RETAINED jobs however long the benchmark runs.
    shard.apply(vec![Command::SetQueueConfig {
        queue: "hot".into(),
        update: QueueConfigUpdate { retention_ms: Some(0), ..Default::default() },
    }]);
    for _ in 0..RETAINED / BATCH {
        shard.cycle("retained", &session);
    }
    (shard, session)
}

fn benches(c: &mut Criterion) {
    let (mut shard, session) = shard_with_retained_jobs();
    c.bench_function("apply: enqueue, dispatch, complete 100 jobs (300k retained)", |b| {
        b.iter(|| shard.cycle("hot", &session));
    });
    c.bench_function("snapshot copy of a state of 300k jobs", |b| {
        b.iter_batched(|| (), |()| black_box(shard.state.clone()), BatchSize::SmallInput);
    });
    // What handing out a job whose payload waited on disk adds: its read
    // (from the page cache, as a recently written file is), against a copy
    // from memory. Each iteration reads another of 100k payloads.
    let file = tempfile::tempfile().expect("a temporary file");
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![7u8; 256 * 100_000], 0).expect("written");
    let file = std::sync::Arc::new(gantry_broker::queue::PayloadFile::new(file));
    let on_disk: Vec<Payload> = (0..100_000).map(|i| Payload::stored(file.clone(), i * 256, &[7u8; 256])).collect();
    let in_memory: Vec<Payload> = (0..100_000).map(|_| Payload::from(vec![7u8; 256])).collect();
    for (name, payloads) in [("on disk", &on_disk), ("in memory", &in_memory)] {
        let mut next = 0;
        c.bench_function(&format!("read a 256-byte payload {name}"), |b| {
            b.iter(|| {
                next = (next + 7919) % payloads.len();
                black_box(payloads[next].to_vec().expect("read"))
            });
        });
    }
}

criterion_group! {
    name = apply;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(apply);
