//! Group commit: commands from every RPC are packed into one log entry (and
//! so one fsync) while earlier entries are still being written. Each entry is
//! stamped with the leader's clock, forced monotonic. A rider may add one
//! command of its own to an entry: the dispatcher's `Dispatch`, so that a
//! job enqueued, or a slot freed by a result, is handed out by the same
//! commit instead of a second one.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::{
    clock::Clock,
    queue::{Applied, Batch, Command},
    raft::{ProposeError, ShardRaft},
};

/// Most commands in one log entry: bounds entry size and apply latency.
pub const MAX_COMMANDS_PER_ENTRY: usize = 4096;
/// Bytes in one log entry, roughly; a single larger command gets an entry
/// of its own. Keeps AppendEntries messages on the peer port bounded.
pub const MAX_ENTRY_BYTES: usize = 4 << 20;
/// Entries being replicated at once; later commands wait and batch up.
pub const MAX_ENTRIES_IN_FLIGHT: usize = 8;
/// While another entry is committing, a new one starts only with at least
/// this many commands; a smaller batch waits for a commit and takes what
/// queued meanwhile. Each entry costs every node an fsync and a dozen
/// thread hand-offs whatever it carries, so a second small entry in flight
/// buys a few of its commands a shorter wait at the price of CPU that, on a
/// busy node, every other command then waits for. A batch that is big when
/// taken off the queue still pipelines (up to `MAX_ENTRIES_IN_FLIGHT`).
pub const PIPELINE_BATCH_MIN: usize = 128;
/// A commit slower than this is logged: it shows as latency to every caller.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(50);

struct Pending {
    commands: Vec<Command>,
    reply: oneshot::Sender<Result<Committed, ProposeError>>,
}

/// Commands committed together: the log index of their entry and each
/// command's outcome, in order.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    pub index: u64,
    pub results: Vec<Applied>,
}

/// Given the commands of an entry about to be proposed, a command to append
/// to it, applied after them. Its outcome is not reported back: whatever it
/// does must reach its audience through the state machine's events.
pub type Rider = Box<dyn Fn(&[Command]) -> Option<Command> + Send + Sync>;

/// Cheap to clone; all clones feed the same batching task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::UnboundedSender<Pending>,
    shard: crate::queue::ShardId,
    node_id: u64,
}

impl Proposer {
    pub fn spawn(raft: Arc<ShardRaft>, clock: Arc<dyn Clock>, rider: Option<Rider>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (shard, node_id) = (raft.shard(), raft.node_id());
        tokio::spawn(run(raft, clock, rider, rx));
        Proposer { tx, shard, node_id }
    }

    pub async fn propose(&self, command: Command) -> Result<Applied, ProposeError> {
        let mut committed = self.commit(vec![command]).await?;
        Ok(committed.results.pop().expect("one result per command"))
    }

    /// Commits the commands in one log entry, in order, and says which.
    pub async fn commit(&self, commands: Vec<Command>) -> Result<Committed, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let stopped = ProposeError::Stopped { shard: self.shard, message: "proposer stopped".into() };
        self.tx.send(Pending { commands, reply }).map_err(|_| stopped)?;
        // Taken by the proposer and then dropped: it may have been proposed.
        rx.await.map_err(|_| ProposeError::OutcomeUnknown {
            shard: self.shard,
            leader: self.node_id,
            message: "the proposer stopped with the commands in flight".into(),
        })?
    }
}

async fn run(
    raft: Arc<ShardRaft>,
    clock: Arc<dyn Clock>,
    rider: Option<Rider>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_ENTRIES_IN_FLIGHT));
    let committed = Arc::new(Notify::new());
    let last_stamp = Arc::new(AtomicU64::new(0));
    // Waiting for a free slot *before* draining the queue is what makes
    // batches grow under load instead of entries multiplying.
    let mut carry: Option<Pending> = None;
    while let Ok(permit) = in_flight.clone().acquire_owned().await {
        let first = match carry.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let size = |p: &Pending| p.commands.iter().map(Command::approx_bytes).sum::<usize>();
        let mut count = first.commands.len();
        let mut bytes = size(&first);
        let mut group = vec![first];
        // A request taken off the queue but too big for this entry opens the next one.
        while count < MAX_COMMANDS_PER_ENTRY && bytes < MAX_ENTRY_BYTES {
            let others_in_flight = MAX_ENTRIES_IN_FLIGHT - 1 - in_flight.available_permits();
            let next = match carry.take() {
                Some(next) => next,
                None => match rx.try_recv() {
                    Ok(next) => next,
                    Err(_) if others_in_flight > 0 && count < PIPELINE_BATCH_MIN => {
                        // Commands queue up meanwhile without waking this task.
                        // Re-checked: a stored wake-up from an earlier commit is harmless.
                        committed.notified().await;
                        continue;
                    }
                    Err(_) => break,
                },
            };
            let next_bytes = size(&next);
            if bytes + next_bytes > MAX_ENTRY_BYTES {
                carry = Some(next);
                break;
            }
            count += next.commands.len();
            bytes += next_bytes;
            group.push(next);
        }
        let stamp = clock.now_ms().max(last_stamp.load(Ordering::Relaxed));
        last_stamp.store(stamp, Ordering::Relaxed);
        let mut commands = Vec::with_capacity(count + 1);
        let mut sizes = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        for pending in group {
            sizes.push(pending.commands.len());
            commands.extend(pending.commands);
            replies.push(pending.reply);
        }
        let answered = commands.len();
        if let Some(extra) = rider.as_ref().and_then(|ride| ride(&commands)) {
            commands.push(extra);
        }
        let raft = raft.clone();
        let committed = committed.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let count = commands.len();
            let outcome = raft.propose(Batch { proposed_at_ms: stamp, commands: commands.into() }).await;
            drop(permit);
            committed.notify_one();
            let elapsed = started.elapsed();
            if outcome.is_ok() {
                raft.timings().committed(elapsed);
            }
            if elapsed > SLOW_COMMIT {
                tracing::warn!(shard = %raft.shard(), commands = count, ?elapsed, "slow commit");
            }
            match outcome {
                Ok((index, results)) => {
                    assert_eq!(results.len(), count, "one outcome per command");
                    let mut results = results.into_iter().take(answered);
                    for (reply, size) in replies.into_iter().zip(sizes) {
                        let _ = reply.send(Ok(Committed { index, results: results.by_ref().take(size).collect() }));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
