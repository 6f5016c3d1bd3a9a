//! Structural invariants of `QueueState`, checked after every step by the
//! tests. Every index must agree with the jobs it indexes.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ids::{JobId, SessionId},
    job::Status,
    snapshot::encode_snapshot_v1,
    state::QueueState,
};

pub fn check_invariants(state: &QueueState) {
    let now = state.now_ms();
    let mut counts: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
    let mut held: BTreeMap<SessionId, BTreeSet<JobId>> = BTreeMap::new();
    for (id, job) in state.jobs() {
        assert_eq!(*id, job.id);
        assert!(job.attempt <= job.max_attempts, "job {id}: attempt {} > max {}", job.attempt, job.max_attempts);
        assert!(job.last_token <= state.last_token(), "job {id} token above the shard's last");
        let slot = match &job.status {
            Status::Pending => {
                assert!(job.attempt < job.max_attempts, "pending job {id} has no attempt left");
                0
            }
            Status::Active(lease) => {
                assert_eq!(lease.token, job.last_token);
                assert!(state.session(&lease.session_id).is_some(), "job {id} held by a dead session");
                held.entry(lease.session_id.clone()).or_default().insert(*id);
                1
            }
            Status::Succeeded => 2,
            Status::Failed => 3,
            Status::Cancelled => 4,
        };
        assert_eq!(job.is_terminal(), job.finished_ms().is_some(), "job {id}: finished_ms vs terminal");
        assert_eq!(job.is_terminal(), job.retain_until_ms().is_some(), "job {id}: retain_until_ms vs terminal");
        if let Some(until) = job.retain_until_ms() {
            assert!(state.retention_index_holds(until, *id), "job {id} missing from the retention index");
        }
        counts.entry(job.queue.as_str()).or_default()[slot] += 1;
    }
    for (name, queue) in state.queues() {
        let c = counts.get(name.as_str()).copied().unwrap_or_default();
        assert_eq!([queue.pending(), queue.active, queue.succeeded, queue.failed, queue.cancelled], c, "queue {name}");
        let (scheduled, ready) = queue.scheduled_and_ready(now);
        assert_eq!(scheduled + ready, queue.pending());
    }
    for (id, session) in state.sessions() {
        let expected = held.remove(id).unwrap_or_default();
        assert_eq!(session.held, expected, "session {id} held set");
    }
    assert!(held.is_empty(), "jobs held by unknown sessions: {held:?}");
    let terminal = state.jobs().values().filter(|j| j.is_terminal()).count();
    assert_eq!(state.retention_index_len(), terminal, "retention index entries without a terminal job");
    let active = state.jobs().values().filter(|j| j.lease().is_some()).count();
    assert_eq!(state.next_lease_deadline_ms().is_some(), active > 0);
    // The snapshot of a state must restore to an equal state: format 0's
    // while the shard is at format 0 (the only time it is written)...
    if state.format() == 0 {
        let bytes = encode_snapshot_v1(state);
        let restored = super::snapshot::decode_snapshot_v1(&bytes).expect("own snapshot decodes");
        assert!(&restored == state, "snapshot round trip changed the state");
    }
    // ...and format 1's from then on, whose decoder rebuilds every index
    // from the jobs (test code may reach outside the pure module).
    if state.format() == 0 {
        return;
    }
    let bytes = crate::format::storage::encode_state_to_vec(state).expect("payloads in memory");
    let restored = crate::format::storage::decode_state(&bytes).expect("own format-1 state decodes");
    if &restored != state {
        for (name, q) in state.queues() {
            let r = restored.queue(name);
            assert!(r == Some(q), "queue {name}: {q:?} became {r:?}");
        }
        assert!(restored.sessions() == state.sessions(), "sessions");
        assert!(restored.jobs() == state.jobs(), "jobs");
        panic!("format-1 round trip changed the state: {state:?} became {restored:?}");
    }
}
