//! The leader's memory of worker sessions: when each was last heard from and
//! the stream to push to. Never replicated (DESIGN §4): replicating every
//! heartbeat is what hurt zc.async.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

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
}

#[derive(Clone, Debug)]
pub struct LiveInfo {
    pub session_id: SessionId,
    pub last_seen_age: Duration,
    pub connected: bool,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<SessionId, Live>>,
    next_generation: std::sync::atomic::AtomicU64,
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
        sessions
            .insert(session_id.clone(), Live { last_seen: Instant::now(), stream: Some(Stream { generation, tx }) });
        generation
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
    /// `ttl`. A session it has never seen starts its clock now: the grace a
    /// new leader gives every session that holds jobs.
    pub fn silent<'a>(&self, known: impl IntoIterator<Item = &'a SessionId>, ttl: Duration) -> Vec<SessionId> {
        let now = Instant::now();
        let mut sessions = self.lock();
        known
            .into_iter()
            .filter(|id| {
                let live = sessions.entry((*id).clone()).or_insert(Live { last_seen: now, stream: None });
                now.duration_since(live.last_seen) > ttl
            })
            .cloned()
            .collect()
    }

    /// Leadership is gone: every stream is told so and dropped, and the
    /// heartbeat table is forgotten (the next leader keeps its own).
    pub fn leader_lost(&self, leader: Option<(u64, String)>) {
        let sessions = std::mem::take(&mut *self.lock());
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

    pub fn info(&self, session_id: &SessionId) -> Option<LiveInfo> {
        self.lock().get(session_id).map(|live| LiveInfo {
            session_id: session_id.clone(),
            last_seen_age: live.last_seen.elapsed(),
            connected: live.stream.is_some(),
        })
    }
}
