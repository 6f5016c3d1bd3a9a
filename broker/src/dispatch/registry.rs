//! The leader's memory of worker sessions: when each was last heard from and
//! the stream to push to. Never replicated (DESIGN §4): replicating every
//! heartbeat is what hurt zc.async.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::{Notify, mpsc};

use crate::queue::{Assignment, FencingToken, JobId, SessionId};

/// What the dispatcher pushes down a worker's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbound {
    Assign(Assignment),
    Revoke {
        job_id: JobId,
        token: FencingToken,
        reason: String,
    },
    /// This node stopped leading the shard: the stream must end so the
    /// worker resumes its session on the new leader (id, client address).
    LeaderLost {
        leader: Option<(u64, String)>,
    },
}

struct Stream {
    generation: u64,
    tx: mpsc::UnboundedSender<Outbound>,
}

struct Live {
    last_seen: Instant,
    stream: Option<Stream>,
    /// The leader judged the session silent and its expiry is being
    /// committed: a reconnect waits for the verdict instead of racing it.
    expiring: bool,
}

impl Live {
    fn new(last_seen: Instant, stream: Option<Stream>) -> Self {
        Live { last_seen, stream, expiring: false }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LiveInfo {
    pub session_id: SessionId,
    pub last_seen_age: Duration,
    pub connected: bool,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<SessionId, Live>>,
    next_generation: std::sync::atomic::AtomicU64,
    /// Woken whenever an expiry in flight ends (committed, failed, or the
    /// session or the leadership is gone).
    expiry_settled: Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Live>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds a (new) stream to the session; a previous stream of the same
    /// session is cut off. Returns the generation to detach with.
    pub fn attach(&self, session_id: &SessionId, tx: mpsc::UnboundedSender<Outbound>) -> u64 {
        let generation = self.next_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sessions = self.lock();
        let live = sessions.entry(session_id.clone()).or_insert_with(|| Live::new(Instant::now(), None));
        live.last_seen = Instant::now();
        live.stream = Some(Stream { generation, tx });
        generation
    }

    /// A worker is reconnecting to the session: it counts as alive from now
    /// on, and if the leader already decided the session was silent, this
    /// waits until that expiry has committed or failed. Either the expiry
    /// commits before the resume (the resume opens a new session and is
    /// told of the lost leases) or it never commits — never a resume
    /// answered `resumed` and then revoked by a verdict older than it.
    pub async fn reconnecting(&self, session_id: &SessionId) {
        loop {
            let settled = self.expiry_settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match self.lock().get_mut(session_id) {
                Some(live) if live.expiring => {}
                Some(live) => {
                    live.last_seen = Instant::now();
                    return;
                }
                None => return,
            }
            settled.await;
        }
    }

    /// The expiry proposed for a silent session committed or failed.
    pub fn expiry_settled(&self, session_id: &SessionId) {
        if let Some(live) = self.lock().get_mut(session_id) {
            live.expiring = false;
        }
        self.expiry_settled.notify_waiters();
    }

    /// Any message from the worker counts as a heartbeat.
    pub fn touch(&self, session_id: &SessionId) {
        if let Some(live) = self.lock().get_mut(session_id) {
            live.last_seen = Instant::now();
        }
    }

    /// The stream ended; the session lives on until session_ttl passes
    /// without a reconnect (a blip or a leader change is not a death).
    pub fn detach(&self, session_id: &SessionId, generation: u64) {
        if let Some(live) = self.lock().get_mut(session_id)
            && live.stream.as_ref().is_some_and(|s| s.generation == generation)
        {
            live.stream = None;
        }
    }

    /// The session ended: dropping its sender closes its stream.
    pub fn remove(&self, session_id: &SessionId) {
        self.lock().remove(session_id);
        self.expiry_settled.notify_waiters();
    }

    /// Pushes to the session's stream; false when it has none.
    pub fn send(&self, session_id: &SessionId, message: Outbound) -> bool {
        match self.lock().get(session_id).and_then(|live| live.stream.as_ref()) {
            Some(stream) => stream.tx.send(message).is_ok(),
            None => false,
        }
    }

    pub fn connected(&self) -> Vec<SessionId> {
        self.lock().iter().filter(|(_, live)| live.stream.is_some()).map(|(id, _)| id.clone()).collect()
    }

    /// Sessions of the replicated state this leader has not heard from in
    /// `ttl` and whose expiry is not already in flight; each is marked as
    /// expiring until `expiry_settled`. A session it has never seen starts
    /// its clock now: the grace a new leader gives every session that holds
    /// jobs.
    pub fn silent<'a>(&self, known: impl IntoIterator<Item = &'a SessionId>, ttl: Duration) -> Vec<SessionId> {
        let now = Instant::now();
        let mut sessions = self.lock();
        known
            .into_iter()
            .filter(|id| {
                let live = sessions.entry((*id).clone()).or_insert_with(|| Live::new(now, None));
                let silent = !live.expiring && now.duration_since(live.last_seen) > ttl;
                live.expiring |= silent;
                silent
            })
            .cloned()
            .collect()
    }

    /// Leadership is gone: every stream is told so and dropped, and the
    /// heartbeat table is forgotten (the next leader keeps its own).
    pub fn leader_lost(&self, leader: Option<(u64, String)>) {
        let sessions = std::mem::take(&mut *self.lock());
        self.expiry_settled.notify_waiters();
        for live in sessions.into_values() {
            if let Some(stream) = live.stream {
                let _ = stream.tx.send(Outbound::LeaderLost { leader: leader.clone() });
            }
        }
    }

    /// A new leader restarts every session's clock (DESIGN §1.6).
    pub fn grant_grace(&self) {
        let now = Instant::now();
        for live in self.lock().values_mut() {
            live.last_seen = now;
        }
    }

    /// Every session this node has heard from, as `info` says it.
    pub fn live(&self) -> Vec<LiveInfo> {
        self.lock()
            .iter()
            .map(|(session_id, live)| LiveInfo {
                session_id: session_id.clone(),
                last_seen_age: live.last_seen.elapsed(),
                connected: live.stream.is_some(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn session(id: &str) -> SessionId {
        SessionId(id.into())
    }

    #[tokio::test]
    async fn a_reconnect_waits_for_an_expiry_in_flight() {
        let registry = Arc::new(Registry::default());
        let s = session("s");
        assert!(registry.silent([&s], Duration::from_millis(100)).is_empty(), "a new session starts its clock");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(registry.silent([&s], Duration::from_millis(100)), vec![s.clone()]);
        assert!(registry.silent([&s], Duration::from_millis(100)).is_empty(), "one expiry in flight at a time");

        let waiting = tokio::spawn({
            let (registry, s) = (registry.clone(), s.clone());
            async move { registry.reconnecting(&s).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "the reconnect raced the expiry");
        registry.expiry_settled(&s);
        waiting.await.unwrap();
        // The failed expiry left a session that is alive again.
        assert!(registry.silent([&s], Duration::from_millis(100)).is_empty());
    }

    #[tokio::test]
    async fn a_reconnect_to_a_removed_or_unknown_session_does_not_wait() {
        let registry = Registry::default();
        let s = session("s");
        registry.reconnecting(&s).await;
        registry.silent([&s], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(registry.silent([&s], Duration::ZERO), vec![s.clone()]);
        registry.remove(&s);
        registry.reconnecting(&s).await;
    }

    #[test]
    fn attach_keeps_an_expiry_in_flight() {
        let registry = Registry::default();
        let s = session("s");
        registry.silent([&s], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(registry.silent([&s], Duration::ZERO), vec![s.clone()]);
        let (tx, _rx) = mpsc::unbounded_channel();
        registry.attach(&s, tx);
        std::thread::sleep(Duration::from_millis(2));
        assert!(registry.silent([&s], Duration::ZERO).is_empty(), "expired twice");
        assert!(registry.live().iter().any(|l| l.session_id == s && l.connected));
    }
}
