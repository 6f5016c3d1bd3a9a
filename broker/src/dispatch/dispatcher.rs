//! The leader's dispatch loop for one shard: pushes due jobs to sessions with
//! free slots, proposes the expiry of silent sessions, lets time-driven
//! transitions (lease deadlines, retention) happen, and fans out the state
//! machine's events (revokes, finished jobs) to streams and waiters.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, mpsc, watch};

use super::{ShardNode, registry::Outbound};
use crate::queue::{Applied, Command, Event, ExpiryReason, SessionId};

enum Done {
    Dispatch { assigned: u32 },
    Tick,
    Expire(SessionId),
}

pub(super) async fn run(
    node: Arc<ShardNode>,
    mut events: mpsc::UnboundedReceiver<Vec<Event>>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut ticker = tokio::time::interval(node.settings.tick_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    let mut dirty = true;
    let mut dispatching = false;
    let mut ticking = false;
    loop {
        tokio::select! {
            // Events first: the revokes of an entry must reach a stream
            // before the stream is closed for the same entry's session end.
            biased;
            _ = shutdown.changed() => return,
            Some(batch) = events.recv() => {
                for event in batch {
                    dirty |= handle_event(&node, event);
                }
            }
            Some(done) = done_rx.recv() => match done {
                Done::Dispatch { assigned } => {
                    dispatching = false;
                    // The streams got them through Event::Assigned; more
                    // sessions may have room now.
                    dirty |= assigned > 0;
                }
                Done::Tick => ticking = false,
                Done::Expire(session_id) => node.registry.expiry_settled(&session_id),
            },
            _ = wake.notified() => dirty = true,
            _ = ticker.tick() => {
                let leader = node.raft.is_leader();
                if leader && !was_leader {
                    tracing::info!(shard = %node.raft.shard(), "leading the shard: every session gets a full session_ttl of grace");
                    node.registry.grant_grace();
                }
                if was_leader && !leader {
                    // Proposals already fail here; the streams must also
                    // end so workers find the new leader at once.
                    let new_leader = node.raft.leader().map(|(id, n)| (id, n.client));
                    tracing::warn!(shard = %node.raft.shard(), leader = ?new_leader, "no longer leading the shard: closing worker streams");
                    node.registry.leader_lost(new_leader);
                }
                was_leader = leader;
                if leader {
                    expire_silent_sessions(&node, &done_tx);
                    if !ticking && time_driven_work_due(&node) {
                        ticking = true;
                        let (node, done_tx) = (node.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            if let Err(e) = node.proposer.propose(Command::Tick).await {
                                tracing::debug!(error = %e, "tick not committed");
                            }
                            let _ = done_tx.send(Done::Tick);
                        });
                    }
                    // Scheduled jobs become due without any write.
                    dirty = true;
                }
            }
        }
        if dirty && !dispatching && was_leader {
            dirty = false;
            let now = node.clock.now_ms();
            let sessions: Vec<SessionId> = {
                let applied = node.raft.state().read();
                node.registry.connected().into_iter().filter(|s| applied.queue.dispatchable(s, now)).collect()
            };
            if !sessions.is_empty() {
                dispatching = true;
                let (node, done_tx) = (node.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let assigned = match node.proposer.propose(Command::Dispatch { sessions }).await {
                        Ok(Applied::Dispatched { assigned }) => assigned,
                        Ok(other) => unreachable!("dispatch answered {other:?}"),
                        Err(e) => {
                            tracing::debug!(error = %e, "dispatch not committed");
                            0
                        }
                    };
                    let _ = done_tx.send(Done::Dispatch { assigned });
                });
            }
        }
    }
}

/// Returns whether the event may have made new dispatches possible.
fn handle_event(node: &ShardNode, event: Event) -> bool {
    match event {
        Event::Revoked { session_id, job_id, token, reason } => {
            if node.raft.is_leader() {
                tracing::info!(shard = %node.raft.shard(), %job_id, session = %session_id, token = token.0, %reason, "lease revoked");
            }
            node.registry.send(&session_id, Outbound::Revoke { job_id, token, reason });
            false
        }
        Event::Finished { job_id } => {
            node.waiters.notify(job_id);
            false
        }
        Event::SessionEnded { session_id } => {
            node.registry.remove(&session_id);
            false
        }
        Event::Assigned(assignment) => {
            let session_id = assignment.session_id.clone();
            if tracing::enabled!(tracing::Level::DEBUG) && node.raft.is_leader() {
                tracing::debug!(shard = %node.raft.shard(), job_id = %assignment.job_id, session = %session_id, token = assignment.token.0, attempt = assignment.attempt, "assigned");
            }
            // A session without a stream (a follower has none) gets it again
            // when it resumes, or loses it when it expires.
            node.registry.send(&session_id, Outbound::Assign(assignment));
            false
        }
        Event::WorkAvailable { .. } | Event::CapacityFreed { .. } => true,
    }
}

fn expire_silent_sessions(node: &Arc<ShardNode>, done_tx: &mpsc::UnboundedSender<Done>) {
    let silent = {
        let applied = node.raft.state().read();
        node.registry.silent(applied.queue.sessions().keys(), node.settings.session_ttl)
    };
    for session_id in silent {
        tracing::warn!(shard = %node.raft.shard(), session = %session_id, ttl = ?node.settings.session_ttl, "session silent past session_ttl: expiring it, its jobs go back to the queue");
        let (node, done_tx) = (node.clone(), done_tx.clone());
        tokio::spawn(async move {
            let command = Command::ExpireSession { session_id: session_id.clone(), reason: ExpiryReason::Silent };
            if let Err(e) = node.proposer.propose(command).await {
                tracing::debug!(error = %e, "session expiry not committed");
            }
            let _ = done_tx.send(Done::Expire(session_id));
        });
    }
}

fn time_driven_work_due(node: &ShardNode) -> bool {
    let now = node.clock.now_ms();
    let applied = node.raft.state().read();
    let due = |t: Option<u64>| t.is_some_and(|t| t <= now);
    due(applied.queue.next_lease_deadline_ms()) || due(applied.queue.next_retention_ms())
}

/// How often the loop looks at the clock: often enough that a session is
/// expired soon after its ttl and a due job goes out promptly.
pub(super) fn tick_interval(heartbeat_interval: Duration, session_ttl: Duration) -> Duration {
    (heartbeat_interval / 4).min(session_ttl / 10).clamp(Duration::from_millis(5), Duration::from_millis(100))
}
