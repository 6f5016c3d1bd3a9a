//! Unit tests of every transition, and property tests over random command
//! sequences with the invariants checked after every step.

use proptest::prelude::*;

use super::{
    invariants::check_invariants,
    snapshot::{decode_snapshot_v1, encode_snapshot_v1},
    *,
};

const SHARD: ShardId = ShardId(0);

struct Harness {
    state: QueueState,
    index: u64,
    now: u64,
    log: Vec<Batch>,
}

impl Harness {
    fn new() -> Self {
        Harness { state: QueueState::new(SHARD), index: 0, now: 1_000_000, log: Vec::new() }
    }

    fn run(&mut self, commands: Vec<Command>) -> ApplyOutput {
        self.index += 1;
        let batch = Batch { proposed_at_ms: self.now, commands: commands.into() };
        // Every command the tests apply goes through both log encodings.
        let stored = crate::format::storage::batch_to_pb(&batch);
        assert_eq!(crate::format::storage::batch_from_pb(stored).expect("own encoding decodes"), batch);
        let postcard = postcard::to_allocvec(&batch).expect("postcard encodes");
        assert_eq!(postcard::from_bytes::<Batch>(&postcard).expect("postcard decodes"), batch);
        let out = self.state.apply(self.index, &batch);
        self.log.push(batch);
        check_invariants(&self.state);
        out
    }

    fn one(&mut self, command: Command) -> Applied {
        self.run(vec![command]).results.remove(0)
    }

    fn enqueue(&mut self, new: NewJob) -> JobId {
        match self.one(Command::Enqueue(new)) {
            Applied::Enqueued { job_id, .. } => job_id,
            other => panic!("enqueue: {other:?}"),
        }
    }

    fn open(&mut self, session: &str, queues: &[&str], max_in_flight: u32) -> SessionId {
        let session_id = SessionId(session.into());
        let applied = self.one(Command::OpenSession {
            session_id: session_id.clone(),
            worker_id: format!("worker-{session}"),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            max_in_flight,
        });
        assert_eq!(
            applied,
            Applied::SessionOpened { session_id: session_id.clone(), resumed: false, lost: Vec::new() }
        );
        session_id
    }

    fn dispatch(&mut self, session: &SessionId) -> Vec<Assignment> {
        let out = self.run(vec![Command::Dispatch { sessions: vec![session.clone()] }]);
        match out.results[0] {
            Applied::Dispatched { .. } => out.assignments().cloned().collect(),
            ref other => panic!("dispatch: {other:?}"),
        }
    }

    fn state_of(&self, id: JobId) -> JobState {
        self.state.job(id).expect("job exists").state_at(self.state.now_ms())
    }
}

fn job(queue: &str) -> NewJob {
    NewJob::new(queue, b"payload".to_vec())
}

#[test]
fn enqueue_assign_complete() {
    let mut h = Harness::new();
    let id = h.enqueue(job("q"));
    assert_eq!(h.state_of(id), JobState::Ready);
    let s = h.open("s1", &["q"], 4);
    let a = h.dispatch(&s);
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].job_id, a[0].attempt), (id, 1));
    assert_eq!(a[0].lease_deadline_ms, h.now + config::DEFAULT_LEASE_TIMEOUT_MS);
    assert_eq!(h.state_of(id), JobState::Active);
    let done = h.one(Command::Complete { job_id: id, token: a[0].token, result: b"ok".to_vec() });
    assert_eq!(done, Applied::Accepted { lease_deadline_ms: None });
    let job = h.state.job(id).unwrap();
    assert_eq!((h.state_of(id), job.result()), (JobState::Succeeded, b"ok".as_slice()));
    assert_eq!(job.history()[0].outcome, Outcome::Succeeded);
    // A repeat of the same result (say, resent after a reconnect) is accepted and changes nothing.
    let again = h.one(Command::Complete { job_id: id, token: a[0].token, result: b"other".to_vec() });
    assert_eq!(again, Applied::Accepted { lease_deadline_ms: None });
    assert_eq!(h.state.job(id).unwrap().result(), b"ok");
}

#[test]
fn resume_keeps_an_open_session_and_its_leases() {
    let mut h = Harness::new();
    let id = h.enqueue(job("q"));
    let s = h.open("s", &["q"], 1);
    let a = h.dispatch(&s)[0].clone();
    let resumed = h.one(Command::ResumeSession {
        session_id: s.clone(),
        fallback: SessionId("fresh".into()),
        worker_id: "w".into(),
        queues: vec!["q".into(), "r".into()],
        max_in_flight: 2,
    });
    assert_eq!(resumed, Applied::SessionOpened { session_id: s.clone(), resumed: true, lost: Vec::new() });
    assert!(h.state.session(&SessionId("fresh".into())).is_none(), "no second session");
    let session = h.state.session(&s).unwrap();
    assert_eq!((session.max_in_flight, session.queues.len()), (2, 2));
    assert!(session.held.contains(&id));
    assert_eq!(h.state.job(id).unwrap().lease().unwrap().token, a.token);
}

#[test]
fn resume_that_comes_after_the_expiry_opens_the_fallback_and_names_the_lost_leases() {
    // The node that proposed the resume saw the session open; its expiry
    // committed first. The state machine, not that node, has the last word.
    let mut h = Harness::new();
    let id = h.enqueue(job("q"));
    let s = h.open("s", &["q"], 1);
    let a = h.dispatch(&s)[0].clone();
    h.one(Command::ExpireSession { session_id: s.clone(), reason: ExpiryReason::Silent });
    let fresh = SessionId("fresh".into());
    let late = h.one(Command::ResumeSession {
        session_id: s.clone(),
        fallback: fresh.clone(),
        worker_id: "w".into(),
        queues: vec!["q".into()],
        max_in_flight: 1,
    });
    assert_eq!(late, Applied::SessionOpened { session_id: fresh.clone(), resumed: false, lost: vec![(id, a.token)] });
    assert!(h.state.session(&s).is_none(), "the expired session stays ended");
    assert!(h.state.session(&fresh).unwrap().held.is_empty());
    // The fresh session gets the job again under a new token; the old one is stale.
    let again = h.dispatch(&fresh);
    assert_eq!(again[0].job_id, id);
    assert!(again[0].token > a.token);
    let stale = h.one(Command::Complete { job_id: id, token: a.token, result: vec![] });
    assert_eq!(stale, Applied::Rejected(Rejection::StaleLease { job_id: id, token: a.token }));
    // A second late resume with the same old id is told the same.
    let twice = h.one(Command::ResumeSession {
        session_id: s,
        fallback: SessionId("fresh-2".into()),
        worker_id: "w".into(),
        queues: vec!["q".into()],
        max_in_flight: 1,
    });
    assert!(matches!(twice, Applied::SessionOpened { resumed: false, ref lost, .. } if lost == &vec![(id, a.token)]));
}

#[test]
fn a_drained_session_keeps_its_jobs_and_gets_no_more() {
    let mut h = Harness::new();
    let first = h.enqueue(job("q"));
    let second = h.enqueue(job("q"));
    let s = h.open("s", &["q"], 2);
    let held = h.dispatch(&s);
    assert_eq!(h.one(Command::DrainSession { session_id: s.clone() }), Applied::SessionDrained);
    let released = h.one(Command::Release { job_id: first, token: held[0].token });
    assert!(matches!(released, Applied::Accepted { .. }));
    assert!(!h.state.dispatchable(&s, h.now));
    assert!(h.dispatch(&s).is_empty(), "a draining session was refilled");
    let done = h.one(Command::Complete { job_id: second, token: held[1].token, result: vec![] });
    assert!(matches!(done, Applied::Accepted { .. }));
    let gone = SessionId("gone".into());
    assert_eq!(
        h.one(Command::DrainSession { session_id: gone.clone() }),
        Applied::Rejected(Rejection::SessionNotFound(gone))
    );
}

#[test]
fn dispatch_order_is_priority_then_run_at_then_enqueue_order() {
    let mut h = Harness::new();
    let low = h.enqueue(job("q"));
    let high = h.enqueue(NewJob { priority: 5, ..job("q") });
    let delayed_high = h.enqueue(NewJob { priority: 9, delay_ms: 60_000, ..job("q") });
    let low2 = h.enqueue(job("q"));
    assert_eq!(h.state_of(delayed_high), JobState::Scheduled);
    let s = h.open("s", &["q"], 10);
    let order: Vec<JobId> = h.dispatch(&s).iter().map(|a| a.job_id).collect();
    assert_eq!(order, vec![high, low, low2]);
    h.now += 60_000;
    let later: Vec<JobId> = h.dispatch(&s).iter().map(|a| a.job_id).collect();
    assert_eq!(later, vec![delayed_high]);
}

#[test]
fn max_in_flight_bounds_dispatch_and_tokens_increase() {
    let mut h = Harness::new();
    for _ in 0..5 {
        h.enqueue(job("q"));
    }
    let s = h.open("s", &["q"], 2);
    let first = h.dispatch(&s);
    assert_eq!(first.len(), 2);
    assert!(first[0].token < first[1].token);
    assert!(h.dispatch(&s).is_empty());
    h.one(Command::Complete { job_id: first[0].job_id, token: first[0].token, result: vec![] });
    let next = h.dispatch(&s);
    assert_eq!(next.len(), 1);
    assert!(next[0].token > first[1].token);
}

#[test]
fn stale_token_is_refused_and_changes_nothing() {
    let mut h = Harness::new();
    let id = h.enqueue(job("q"));
    let s1 = h.open("s1", &["q"], 1);
    let a1 = h.dispatch(&s1)[0].clone();
    let out = h.run(vec![Command::ExpireSession { session_id: s1.clone(), reason: ExpiryReason::Silent }]);
    assert_eq!(out.results[0], Applied::SessionExpired { released: 1 });
    assert!(out.events.iter().any(|e| matches!(e, Event::Revoked { job_id, .. } if *job_id == id)));
    assert_eq!(h.state.expired_session(&s1).unwrap().lost, vec![(id, a1.token)]);
    let s2 = h.open("s2", &["q"], 1);
    let a2 = h.dispatch(&s2)[0].clone();
    assert_eq!(a2.attempt, 2);
    assert!(a2.token > a1.token);
    let before = h.state.clone();
    for late in [
        Command::Complete { job_id: id, token: a1.token, result: vec![] },
        Command::Fail { job_id: id, token: a1.token, error: "x".into(), retry: RetryRequest::Never },
        Command::Release { job_id: id, token: a1.token },
        Command::Progress { job_id: id, token: a1.token, message: "m".into(), extend_ms: Some(1) },
    ] {
        assert_eq!(h.one(late), Applied::Rejected(Rejection::StaleLease { job_id: id, token: a1.token }));
    }
    assert_eq!(h.state.job(id), before.job(id));
    assert_eq!(
        h.one(Command::Complete { job_id: id, token: a2.token, result: b"r".to_vec() }),
        Applied::Accepted { lease_deadline_ms: None }
    );
}

#[test]
fn fail_retry_after_backoff_and_no_retry() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    let id = h.enqueue(job("q"));
    let a = h.dispatch(&s)[0].clone();
    h.one(Command::Fail {
        job_id: id,
        token: a.token,
        error: "busy".into(),
        retry: RetryRequest::After { delay_ms: 5000 },
    });
    assert_eq!(h.state_of(id), JobState::Scheduled);
    assert_eq!(h.state.job(id).unwrap().run_at_ms, h.now + 5000);
    h.now += 4999;
    assert!(h.dispatch(&s).is_empty(), "redelivered before retry_after");
    h.now += 1;
    let a2 = h.dispatch(&s)[0].clone();
    assert_eq!(a2.attempt, 2);
    h.one(Command::Fail {
        job_id: id,
        token: a2.token,
        error: "e".into(),
        retry: RetryRequest::Backoff { jitter_permille: 1000 },
    });
    assert_eq!(h.state.job(id).unwrap().run_at_ms, h.now + 2000, "base 1s doubled for attempt 2");
    h.now += 2000;
    let a3 = h.dispatch(&s)[0].clone();
    h.one(Command::Fail { job_id: id, token: a3.token, error: "bad input".into(), retry: RetryRequest::Never });
    let job = h.state.job(id).unwrap();
    assert_eq!((h.state_of(id), job.error(), job.attempt), (JobState::Failed, "bad input", 3));
}

#[test]
fn attempts_exhausted_dead_letters_and_retry_job_redrives() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    let id = h.enqueue(NewJob { max_attempts: Some(2), ..job("q") });
    for attempt in 1..=2 {
        let a = h.dispatch(&s)[0].clone();
        assert_eq!(a.attempt, attempt);
        h.one(Command::Fail {
            job_id: id,
            token: a.token,
            error: "e".into(),
            retry: RetryRequest::After { delay_ms: 0 },
        });
    }
    assert_eq!(h.state_of(id), JobState::Failed);
    assert!(matches!(h.one(Command::RetryJob { job_id: id }), Applied::Job(v) if v.state == JobState::Ready));
    let a = h.dispatch(&s)[0].clone();
    assert_eq!(a.attempt, 1, "attempts reset by RetryJob");
    assert!(matches!(h.one(Command::RetryJob { job_id: id }), Applied::Rejected(Rejection::NotFailed { .. })));
}

#[test]
fn release_does_not_count_the_attempt() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 1);
    let id = h.enqueue(job("q"));
    let a = h.dispatch(&s)[0].clone();
    h.one(Command::Release { job_id: id, token: a.token });
    assert_eq!((h.state_of(id), h.state.job(id).unwrap().attempt), (JobState::Ready, 0));
    assert_eq!(h.dispatch(&s)[0].attempt, 1);
}

#[test]
fn lease_timeout_and_progress_extension() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    let id = h.enqueue(NewJob { lease_timeout_ms: Some(1000), ..job("q") });
    let a = h.dispatch(&s)[0].clone();
    h.now += 900;
    let p = h.one(Command::Progress { job_id: id, token: a.token, message: "half".into(), extend_ms: Some(1000) });
    assert_eq!(p, Applied::Accepted { lease_deadline_ms: Some(h.now + 1000) });
    h.now += 500; // past the original deadline, inside the extended one
    h.one(Command::Tick);
    assert_eq!(h.state_of(id), JobState::Active);
    assert_eq!(h.state.job(id).unwrap().progress(), "half");
    h.now += 500;
    let out = h.run(vec![Command::Tick]);
    assert!(out.events.iter().any(|e| matches!(e, Event::Revoked { token, .. } if *token == a.token)));
    assert_eq!(h.state_of(id), JobState::Ready);
    assert_eq!(h.state.job(id).unwrap().history()[0].outcome, Outcome::LeaseTimedOut);
}

#[test]
fn session_expiry_with_last_attempt_dead_letters() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    let id = h.enqueue(NewJob { max_attempts: Some(1), ..job("q") });
    h.dispatch(&s);
    h.one(Command::ExpireSession { session_id: s, reason: ExpiryReason::Admin });
    assert_eq!(h.state_of(id), JobState::Failed);
    assert!(h.state.job(id).unwrap().error().contains("administrator"));
}

#[test]
fn cancel_pending_and_active() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 1);
    let active = h.enqueue(job("q"));
    let pending = h.enqueue(job("q"));
    let a = h.dispatch(&s)[0].clone();
    assert_eq!(a.job_id, active);
    let out = h.run(vec![Command::Cancel { job_id: active, reason: "user".into() }]);
    assert!(matches!(&out.results[0], Applied::Job(v) if v.state == JobState::Cancelled));
    assert!(out.events.contains(&Event::Revoked {
        session_id: s.clone(),
        job_id: active,
        token: a.token,
        reason: "cancelled: user".into()
    }));
    assert!(matches!(h.one(Command::Cancel { job_id: pending, reason: String::new() }), Applied::Job(_)));
    assert!(matches!(
        h.one(Command::Cancel { job_id: pending, reason: String::new() }),
        Applied::Rejected(Rejection::AlreadyTerminal { .. })
    ));
    assert!(h.dispatch(&s).is_empty());
    let stale = h.one(Command::Complete { job_id: active, token: a.token, result: vec![] });
    assert!(matches!(stale, Applied::Rejected(Rejection::StaleLease { .. })));
}

#[test]
fn idempotency_key_returns_the_first_job_while_retained() {
    let mut h = Harness::new();
    let keyed = || NewJob { idempotency_key: Some("k".into()), ..job("q") };
    let first = h.enqueue(keyed());
    match h.one(Command::Enqueue(keyed())) {
        Applied::Enqueued { job_id, created, .. } => assert_eq!((job_id, created), (first, false)),
        other => panic!("{other:?}"),
    }
    // Another queue has its own keys.
    match h.one(Command::Enqueue(NewJob { queue: "other".into(), ..keyed() })) {
        Applied::Enqueued { created, .. } => assert!(created),
        other => panic!("{other:?}"),
    }
    h.one(Command::SetQueueConfig {
        queue: "q".into(),
        update: QueueConfigUpdate { retention_ms: Some(10), ..Default::default() },
    });
    h.one(Command::Cancel { job_id: first, reason: String::new() });
    h.now += 11;
    h.one(Command::Tick);
    assert!(h.state.job(first).is_none(), "retention dropped the job");
    match h.one(Command::Enqueue(keyed())) {
        Applied::Enqueued { job_id, created, .. } => assert!(created && job_id != first),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pause_resume_concurrency_and_max_depth() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    h.one(Command::PauseQueue { queue: "q".into() });
    h.enqueue(job("q"));
    h.enqueue(job("q"));
    assert!(h.dispatch(&s).is_empty(), "paused queue dispatched");
    h.one(Command::ResumeQueue { queue: "q".into() });
    h.one(Command::SetQueueConfig {
        queue: "q".into(),
        update: QueueConfigUpdate { concurrency_limit: Some(1), max_depth: Some(2), ..Default::default() },
    });
    assert_eq!(h.dispatch(&s).len(), 1, "concurrency limit 1");
    let full = h.one(Command::Enqueue(job("q")));
    assert_eq!(full, Applied::Rejected(Rejection::QueueFull { queue: "q".into(), max_depth: 2 }));
}

#[test]
fn rate_limit_spreads_dispatches_over_seconds() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 10);
    h.one(Command::SetQueueConfig {
        queue: "q".into(),
        update: QueueConfigUpdate { rate_limit: Some(2), ..Default::default() },
    });
    for _ in 0..5 {
        h.enqueue(job("q"));
    }
    assert_eq!(h.dispatch(&s).len(), 2);
    assert!(h.dispatch(&s).is_empty());
    h.now += 1000;
    assert_eq!(h.dispatch(&s).len(), 2);
}

#[test]
fn purge_by_state() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 1);
    let done = h.enqueue(job("q"));
    h.enqueue(job("q"));
    h.enqueue(NewJob { delay_ms: 10_000, ..job("q") });
    let a = h.dispatch(&s)[0].clone();
    assert_eq!(a.job_id, done);
    assert_eq!(
        h.one(Command::PurgeQueue { queue: "q".into(), state: JobState::Active }),
        Applied::Rejected(Rejection::CannotPurge(JobState::Active))
    );
    h.one(Command::Complete { job_id: done, token: a.token, result: vec![] });
    assert_eq!(h.one(Command::PurgeQueue { queue: "q".into(), state: JobState::Ready }), Applied::Purged { count: 1 });
    assert_eq!(
        h.one(Command::PurgeQueue { queue: "q".into(), state: JobState::Scheduled }),
        Applied::Purged { count: 1 }
    );
    assert_eq!(
        h.one(Command::PurgeQueue { queue: "q".into(), state: JobState::Succeeded }),
        Applied::Purged { count: 1 }
    );
    assert!(h.state.jobs().is_empty());
}

#[test]
fn purge_in_parts_drops_what_one_purge_would_and_spares_later_jobs() {
    for state in [JobState::Ready, JobState::Scheduled, JobState::Succeeded] {
        let mut h = Harness::new();
        let s = h.open("s", &["q"], 6);
        for i in 0..23 {
            let queue = if i % 3 == 0 { "other" } else { "q" };
            let delay_ms = if i % 4 == 0 { 50_000 } else { 0 };
            h.enqueue(NewJob { delay_ms, priority: i % 3 - 1, ..job(queue) });
        }
        for a in h.dispatch(&s).into_iter().take(6) {
            h.one(Command::Complete { job_id: a.job_id, token: a.token, result: vec![] });
        }
        let mut whole = h.state.clone();
        let expected = match whole
            .apply(
                h.index + 1,
                &Batch {
                    proposed_at_ms: h.now,
                    commands: vec![Command::PurgeQueue { queue: "q".into(), state }].into(),
                },
            )
            .results[0]
        {
            Applied::Purged { count } => count,
            ref other => panic!("purge: {other:?}"),
        };
        assert!(expected > 0, "{state:?}: nothing to purge, the test proves nothing");

        // The entries of the index the purge walks when it starts.
        let index_len = h
            .state
            .jobs()
            .values()
            .filter(|j| match state {
                JobState::Ready | JobState::Scheduled => j.queue == "q" && j.status == Status::Pending,
                _ => j.is_terminal(),
            })
            .count();
        let (mut purged, mut below_seq, mut after, mut through, mut parts) = (0, None, None, None, 0);
        let mut later = Vec::new();
        loop {
            let part = Command::PurgeQueuePart { queue: "q".into(), state, below_seq, after, through, limit: 2 };
            let Applied::PurgedPart { count, below_seq: bound, through: end, next } = h.one(part) else {
                panic!("purge part")
            };
            parts += 1;
            assert!(parts < 1000, "{state:?}: the purge does not end");
            purged += count;
            below_seq = Some(bound);
            through = end;
            after = next;
            if after.is_none() {
                break;
            }
            // Enqueued while the purge goes on: not part of it. Three sort
            // after every job the purge started with, more than a part walks,
            // yet the purge ends; two are READY and sort inside the walk
            // until it passes them.
            for _ in 0..3 {
                later.push(h.enqueue(NewJob { delay_ms: 60_000, priority: -1, ..job("q") }));
            }
            later.push(h.enqueue(job("q")));
            later.push(h.enqueue(NewJob { priority: -1, ..job("q") }));
        }
        assert!(parts > 2, "{state:?}: {parts} parts");
        // READY arrivals may land inside the walked range, and only until it passes them.
        assert!(parts <= 2 * index_len + 2, "{state:?}: {parts} parts for an index of {index_len}");
        assert_eq!(purged, expected, "{state:?}");
        for id in later {
            assert!(h.state.job(id).is_some(), "{state:?}: job {id} enqueued during the purge was purged");
        }
        let now = h.state.now_ms();
        let left = |st: &QueueState| -> Vec<JobId> {
            st.jobs()
                .values()
                .filter(|j| j.queue == "q" && j.state_at(now) == state && j.id.seq < below_seq.unwrap())
                .map(|j| j.id)
                .collect()
        };
        assert!(left(&h.state).is_empty(), "{state:?}: {:?} left", left(&h.state));
        assert!(left(&whole).is_empty());
    }
}

#[test]
fn redrive_after_a_retention_change_keeps_the_job() {
    let mut h = Harness::new();
    let s = h.open("s", &["q"], 1);
    let id = h.enqueue(NewJob { max_attempts: Some(1), ..job("q") });
    let a = h.dispatch(&s)[0].clone();
    h.one(Command::Fail { job_id: id, token: a.token, error: "e".into(), retry: RetryRequest::Never });
    // The retention the job was filed under is not the queue's any more.
    h.one(Command::SetQueueConfig {
        queue: "q".into(),
        update: QueueConfigUpdate { retention_ms: Some(1000), ..Default::default() },
    });
    h.one(Command::RetryJob { job_id: id });
    h.now += config::DEFAULT_RETENTION_MS + 1;
    h.one(Command::Tick);
    assert_eq!(h.state_of(id), JobState::Ready, "the redriven job must outlive its old retention");
}

#[test]
fn time_never_moves_backwards() {
    let mut h = Harness::new();
    h.one(Command::Tick);
    let t = h.state.now_ms();
    h.now -= 500; // a new leader whose clock is behind
    h.one(Command::Tick);
    assert_eq!(h.state.now_ms(), t);
}

#[test]
fn snapshot_rejects_foreign_bytes() {
    assert!(decode_snapshot_v1(b"nonsense").is_err());
    let mut bytes = encode_snapshot_v1(&QueueState::new(SHARD));
    bytes.truncate(bytes.len() - 1);
    assert!(decode_snapshot_v1(&bytes).is_err());
}

/// A damaged snapshot that claims a huge job map fails to decode: it must
/// not make the node reserve memory for the entries it claims (imbl's own
/// reader did, and the process aborted).
#[test]
fn a_snapshot_claiming_a_huge_job_map_is_refused() {
    let mut bytes = encode_snapshot_v1(&QueueState::new(SHARD));
    // Magic, then shard 0, now 0, next_seq 1, last_token 0, and the job
    // map's length: 0.
    assert_eq!(&bytes[8..13], &[0, 0, 1, 0, 0]);
    // 2^40 entries, as a postcard varint.
    bytes.splice(12..13, [0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
    assert!(decode_snapshot_v1(&bytes).is_err());
}

/// The bytes of a snapshot of a known history, as the build before the
/// persistent maps wrote them: a node must read the snapshots its previous
/// version left on disk (and send followers the same format).
#[test]
fn snapshot_bytes_of_a_known_history_are_unchanged() {
    let mut h = Harness::new();
    let keyed = h.enqueue(NewJob { idempotency_key: Some("k-1".into()), ..job("q") });
    let later = h.enqueue(NewJob { delay_ms: 60_000, priority: 3, ..job("q") });
    h.enqueue(job("other"));
    let session = h.open("s1", &["q"], 1);
    let assigned = h.dispatch(&session);
    assert_eq!(assigned.len(), 1);
    h.now += 10;
    let done =
        h.one(Command::Complete { job_id: assigned[0].job_id, token: assigned[0].token, result: b"ok".to_vec() });
    assert!(matches!(done, Applied::Accepted { .. }), "{done:?}");
    assert_eq!((h.state_of(keyed), h.state_of(later)), (JobState::Succeeded, JobState::Scheduled));
    h.open("s2", &["other"], 4);
    h.dispatch(&SessionId("s2".into()));

    let bytes = encode_snapshot_v1(&h.state);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, KNOWN_SNAPSHOT_HEX);
    assert_eq!(decode_snapshot_v1(&bytes).unwrap(), h.state);
}

const KNOWN_SNAPSHOT_HEX: &str = concat!(
    "474e54534e41503100ca843d048080800403000100010171077061796c6f61640000020119e0a712c0843dc0843d01ca",
    "843d01cabcd629026f6b0001036b2d318080c00209776f726b65722d733100010109776f726b65722d73310273318080",
    "c002c0843d01ca843d0100000200020171077061796c6f61640006000019e0a712c0843da0d940000000000000000000",
    "00030003056f74686572077061796c6f616400000102733280808004ca843daaac4f0119e0a712c0843dc0843d000000",
    "00008080800409776f726b65722d733200010109776f726b65722d733202733280808004ca843d00000002056f746865",
    "7219e0a712e80780dddb0180b8992900000000000100000000e80701017119e0a712e80780dddb0180b8992900000000",
    "0105a0d940020001000001036b2d310001e807010202733109776f726b65722d73310101710100c0843d02733209776f",
    "726b65722d733201056f7468657204010003ca843d000001aaac4f000301cabcd6290001",
);

// ---- property tests ----

/// Operations refer to jobs and sessions by small numbers that are resolved
/// against what exists at that point, so most operations hit something real.
#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        queue: u8,
        priority: i8,
        delay: u16,
        max_attempts: u8,
        key: Option<u8>,
    },
    Open {
        session: u8,
        queues: u8,
        max_in_flight: u8,
    },
    Resume {
        session: u8,
        fallback: u8,
        max_in_flight: u8,
    },
    Dispatch {
        sessions: Vec<u8>,
    },
    Complete {
        job: u8,
        stale: bool,
    },
    Fail {
        job: u8,
        stale: bool,
        retry: u8,
        delay: u16,
    },
    Release {
        job: u8,
    },
    Progress {
        job: u8,
        extend: Option<u16>,
    },
    Expire {
        session: u8,
    },
    Drain {
        session: u8,
    },
    Cancel {
        job: u8,
    },
    Retry {
        job: u8,
    },
    /// `part` 0: the whole purge in one command; else one part examining that many.
    Purge {
        queue: u8,
        state: u8,
        part: u8,
    },
    Config {
        queue: u8,
        concurrency: u8,
        retention: u16,
    },
    Pause {
        queue: u8,
        paused: bool,
    },
    AdvanceTime {
        ms: u16,
    },
    SetFormat {
        format: u8,
    },
    DeleteQueue {
        queue: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u8, -2..3i8, prop_oneof![Just(0u16), 0..3000u16], 0..4u8, proptest::option::of(0..4u8))
            .prop_map(|(queue, priority, delay, max_attempts, key)| Op::Enqueue { queue, priority, delay, max_attempts, key }),
        1 => (0..4u8, 1..8u8, 0..4u8).prop_map(|(session, queues, max_in_flight)| Op::Open { session, queues, max_in_flight }),
        1 => (0..4u8, 0..4u8, 0..4u8).prop_map(|(session, fallback, max_in_flight)| Op::Resume { session, fallback, max_in_flight }),
        4 => proptest::collection::vec(0..4u8, 1..4).prop_map(|sessions| Op::Dispatch { sessions }),
        3 => (any::<u8>(), any::<bool>()).prop_map(|(job, stale)| Op::Complete { job, stale }),
        2 => (any::<u8>(), any::<bool>(), 0..3u8, 0..3000u16).prop_map(|(job, stale, retry, delay)| Op::Fail { job, stale, retry, delay }),
        1 => any::<u8>().prop_map(|job| Op::Release { job }),
        1 => (any::<u8>(), proptest::option::of(0..5000u16)).prop_map(|(job, extend)| Op::Progress { job, extend }),
        1 => (0..4u8).prop_map(|session| Op::Expire { session }),
        1 => (0..4u8).prop_map(|session| Op::Drain { session }),
        1 => any::<u8>().prop_map(|job| Op::Cancel { job }),
        1 => any::<u8>().prop_map(|job| Op::Retry { job }),
        1 => (0..3u8, 0..6u8, 0..4u8).prop_map(|(queue, state, part)| Op::Purge { queue, state, part }),
        1 => (0..3u8, 0..3u8, 0..5000u16).prop_map(|(queue, concurrency, retention)| Op::Config { queue, concurrency, retention }),
        1 => (0..3u8, any::<bool>()).prop_map(|(queue, paused)| Op::Pause { queue, paused }),
        3 => (0..4000u16).prop_map(|ms| Op::AdvanceTime { ms }),
        1 => (0..2u8).prop_map(|format| Op::SetFormat { format }),
        1 => (0..3u8).prop_map(|queue| Op::DeleteQueue { queue }),
    ]
}

const STATES: [JobState; 6] = [
    JobState::Scheduled,
    JobState::Ready,
    JobState::Active,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
];

/// Turns an op into a command against the current state; `None` for ops that
/// only move time.
fn command_for(h: &Harness, op: &Op, seen_tokens: &[(JobId, FencingToken)]) -> Option<Command> {
    let queue = |q: u8| format!("q{q}");
    let session = |s: u8| SessionId(format!("s{s}").into());
    let active: Vec<(JobId, FencingToken)> =
        h.state.jobs().values().filter_map(|j| j.lease().map(|l| (j.id, l.token))).collect();
    let pick = |i: u8, stale: bool| -> Option<(JobId, FencingToken)> {
        let pool = if stale || active.is_empty() { seen_tokens } else { &active };
        (!pool.is_empty()).then(|| pool[i as usize % pool.len()])
    };
    let any_job = |i: u8| -> Option<JobId> {
        let n = h.state.jobs().len();
        (n > 0).then(|| *h.state.jobs().keys().nth(i as usize % n).expect("in range"))
    };
    Some(match op.clone() {
        Op::Enqueue { queue: q, priority, delay, max_attempts, key } => Command::Enqueue(NewJob {
            priority: priority.into(),
            delay_ms: delay.into(),
            max_attempts: (max_attempts > 0).then_some(max_attempts.into()),
            idempotency_key: key.map(|k| format!("k{k}")),
            ..NewJob::new(queue(q), vec![q])
        }),
        Op::Open { session: s, queues, max_in_flight } => Command::OpenSession {
            session_id: session(s),
            worker_id: format!("w{s}"),
            queues: (0..3u8).filter(|q| queues & (1 << q) != 0).map(queue).collect(),
            max_in_flight: max_in_flight.into(),
        },
        Op::Resume { session: s, fallback, max_in_flight } => Command::ResumeSession {
            session_id: session(s),
            fallback: session(fallback),
            worker_id: format!("w{s}"),
            queues: vec![queue(s % 3)],
            max_in_flight: max_in_flight.into(),
        },
        Op::Dispatch { sessions } => Command::Dispatch { sessions: sessions.into_iter().map(session).collect() },
        Op::Complete { job, stale } => {
            let (job_id, token) = pick(job, stale)?;
            Command::Complete { job_id, token, result: vec![1] }
        }
        Op::Fail { job, stale, retry, delay } => {
            let (job_id, token) = pick(job, stale)?;
            let retry = match retry {
                0 => RetryRequest::Never,
                1 => RetryRequest::After { delay_ms: delay.into() },
                _ => RetryRequest::Backoff { jitter_permille: delay % 1001 },
            };
            Command::Fail { job_id, token, error: "e".into(), retry }
        }
        Op::Release { job } => {
            let (job_id, token) = pick(job, false)?;
            Command::Release { job_id, token }
        }
        Op::Progress { job, extend } => {
            let (job_id, token) = pick(job, false)?;
            Command::Progress { job_id, token, message: "p".into(), extend_ms: extend.map(u64::from) }
        }
        Op::Expire { session: s } => Command::ExpireSession { session_id: session(s), reason: ExpiryReason::Silent },
        Op::Drain { session: s } => Command::DrainSession { session_id: session(s) },
        Op::Cancel { job } => Command::Cancel { job_id: any_job(job)?, reason: "c".into() },
        Op::Retry { job } => Command::RetryJob { job_id: any_job(job)? },
        Op::Purge { queue: q, state, part: 0 } => {
            Command::PurgeQueue { queue: queue(q), state: STATES[state as usize % 6] }
        }
        Op::Purge { queue: q, state, part } => Command::PurgeQueuePart {
            queue: queue(q),
            state: STATES[state as usize % 6],
            below_seq: None,
            after: None,
            through: None,
            limit: u32::from(part),
        },
        Op::Config { queue: q, concurrency, retention } => Command::SetQueueConfig {
            queue: queue(q),
            update: QueueConfigUpdate {
                concurrency_limit: Some(concurrency.into()),
                retention_ms: Some(retention.into()),
                backoff_base_ms: Some(100),
                ..Default::default()
            },
        },
        Op::Pause { queue: q, paused: true } => Command::PauseQueue { queue: queue(q) },
        Op::Pause { queue: q, paused: false } => Command::ResumeQueue { queue: queue(q) },
        Op::AdvanceTime { .. } => return None,
        Op::SetFormat { format } => Command::SetFormat { format: u32::from(format) },
        Op::DeleteQueue { queue: q } => Command::DeleteQueue { queue: queue(q) },
    })
}

/// The format gate: a command of a newer format is the same refusal on
/// every replica until a SetFormat entry raises the shard; the format never
/// goes down.
#[test]
fn a_command_above_the_shards_format_is_a_no_op_until_the_format_is_raised() {
    let mut h = Harness::new();
    h.enqueue(NewJob::new("q", b"x".to_vec()));
    let before = h.state.clone();
    let refused = h.one(Command::DeleteQueue { queue: "q".into() });
    assert_eq!(
        refused,
        Applied::Rejected(Rejection::FormatTooLow { feature: "DeleteQueue".into(), needs: 1, shard_format: 0 })
    );
    assert_eq!(h.state.queues(), before.queues(), "a refused command changed the state");
    assert!(refused_message_names_the_way_out(&refused));
    assert_eq!(h.one(Command::SetFormat { format: 1 }), Applied::FormatSet { format: 1 });
    assert_eq!(h.one(Command::SetFormat { format: 0 }), Applied::FormatSet { format: 1 }, "a format went down");
    assert_eq!(h.state.format(), 1);
    match h.one(Command::DeleteQueue { queue: "q".into() }) {
        Applied::Rejected(Rejection::QueueNotEmpty { jobs: 1, .. }) => {}
        other => panic!("a queue with a job was deleted: {other:?}"),
    }
    h.one(Command::PurgeQueue { queue: "q".into(), state: JobState::Ready });
    assert_eq!(h.one(Command::DeleteQueue { queue: "q".into() }), Applied::QueueDeleted);
    assert!(h.state.queue("q").is_none());
    assert_eq!(
        h.one(Command::DeleteQueue { queue: "q".into() }),
        Applied::Rejected(Rejection::QueueNotFound("q".into()))
    );
}

/// A snapshot as the shard writes it at its format: postcard at 0, the
/// `gantry.storage.v1` encoding from 1.
fn snapshot_in_its_format(state: &QueueState) -> Vec<u8> {
    if state.format() == 0 {
        encode_snapshot_v1(state)
    } else {
        crate::format::storage::encode_state_to_vec(state).unwrap()
    }
}

fn restore_from_its_format(bytes: &[u8], format: u32) -> QueueState {
    if format == 0 { decode_snapshot_v1(bytes).unwrap() } else { crate::format::storage::decode_state(bytes).unwrap() }
}

fn refused_message_names_the_way_out(applied: &Applied) -> bool {
    let Applied::Rejected(rejection) = applied else { return false };
    let message = rejection.to_string();
    message.contains("DeleteQueue needs shard format 1") && message.contains("gantry cluster upgrade status")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_every_invariant(ops in proptest::collection::vec(op(), 1..120), split in 0..120usize) {
        let mut h = Harness::new();
        let mut seen_tokens: Vec<(JobId, FencingToken)> = Vec::new();
        let mut last_token = FencingToken(0);
        let mut enqueued: Vec<JobId> = Vec::new();
        let mut dropped: Vec<JobId> = Vec::new();
        let mut attempts: std::collections::BTreeMap<JobId, u32> = Default::default();
        for op in &ops {
            if let Op::AdvanceTime { ms } = op {
                h.now += u64::from(*ms);
            }
            let Some(command) = command_for(&h, op, &seen_tokens) else { continue };
            let before = h.state.clone();
            let out = h.run(vec![command.clone()]);
            match &out.results[0] {
                Applied::Enqueued { job_id, created: true, .. } => enqueued.push(*job_id),
                Applied::Dispatched { .. } => for a in out.assignments() {
                    prop_assert!(a.token > last_token, "tokens must strictly increase");
                    last_token = a.token;
                    seen_tokens.push((a.job_id, a.token));
                    let job = h.state.job(a.job_id).unwrap();
                    prop_assert!(job.attempt <= job.max_attempts);
                },
                Applied::Rejected(Rejection::StaleLease { .. }) => {
                    // A stale result never changes a job (time may still sweep).
                    let mut expected = before.clone();
                    expected.apply(h.index, &Batch { proposed_at_ms: h.now, commands: vec![Command::Tick].into() });
                    prop_assert!(expected.jobs() == h.state.jobs(), "stale result changed jobs");
                }
                Applied::SessionOpened { session_id, resumed, lost } => {
                    // Resumed exactly when the session was open before; a
                    // late resume names exactly the leases its expiry took.
                    let asked = match &command {
                        Command::ResumeSession { session_id, .. } | Command::OpenSession { session_id, .. } => session_id,
                        other => unreachable!("{other:?} opened a session"),
                    };
                    let was_open = before.session(asked).is_some();
                    prop_assert_eq!(*resumed, was_open || before.session(session_id).is_some());
                    if was_open {
                        prop_assert_eq!(session_id, asked);
                        prop_assert!(lost.is_empty());
                    } else if matches!(command, Command::ResumeSession { .. }) {
                        let expected = before.expired_session(asked).map(|e| e.lost.clone()).unwrap_or_default();
                        prop_assert_eq!(lost, &expected);
                    }
                }
                Applied::Purged { .. } | Applied::PurgedPart { .. } => {
                    dropped.extend(before.jobs().keys().filter(|id| h.state.job(**id).is_none()));
                }
                _ => {}
            }
            // Retention sweeps drop terminal jobs; remember which. A job can
            // also finish and be dropped by the same entry (its lease ran out
            // with no attempt left, under a retention of 0): its Finished
            // event says so.
            dropped.extend(before.jobs().iter().filter(|(id, j)| j.is_terminal() && h.state.job(**id).is_none()).map(|(id, _)| *id));
            dropped.extend(out.events.iter().filter_map(|e| match e {
                Event::Finished { job_id } if h.state.job(*job_id).is_none() => Some(*job_id),
                _ => None,
            }));
            for (id, job) in h.state.jobs() {
                if let (Some(prev), Some(old)) = (attempts.get(id), before.job(*id)) {
                    // Attempts only go down through Release (by one) or RetryJob (to zero).
                    prop_assert!(job.attempt >= *prev || job.attempt + 1 == *prev || (old.status == Status::Failed && job.attempt == 0));
                }
                attempts.insert(*id, job.attempt);
            }
        }
        // No job lost: every enqueued job still exists unless retention or a purge dropped it.
        for id in &enqueued {
            prop_assert!(h.state.job(*id).is_some() || dropped.contains(id), "job {id} lost");
        }
        // Replaying the same log gives byte-identical state, with or without a
        // snapshot restore in the middle.
        let mut replay = QueueState::new(SHARD);
        let split = split.min(h.log.len());
        for (i, batch) in h.log[..split].iter().enumerate() {
            replay.apply(i as u64 + 1, batch);
        }
        // A snapshot encodes a copy taken at the split while the original
        // goes on applying: the copy must not see those later writes.
        let copy = replay.clone();
        let snapshot = snapshot_in_its_format(&replay);
        let mut restored = restore_from_its_format(&snapshot, replay.format());
        for (i, batch) in h.log.iter().enumerate().skip(split) {
            restored.apply(i as u64 + 1, batch);
            replay.apply(i as u64 + 1, batch);
        }
        prop_assert!(snapshot_in_its_format(&copy) == snapshot, "a copy changed when the state it was taken from applied more");
        prop_assert!(restored == h.state, "a restored snapshot applied the rest of the log differently");
        prop_assert_eq!(snapshot_in_its_format(&restored), snapshot_in_its_format(&h.state));
        prop_assert_eq!(snapshot_in_its_format(&replay), snapshot_in_its_format(&h.state));
    }
}
