//! What one entry did to each queue, counted for the broker's metrics.
//!
//! Plain data returned with the results, like events: the state machine
//! records nothing anywhere and reads no clock. The same entry gives the
//! same tally on every replica, so every node can count from what it
//! applies (`raft/state_machine.rs` hands it to `metrics::Counters`).

use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub queues: BTreeMap<String, QueueTally>,
}

/// Transitions of one queue's jobs in one entry. Each ended attempt lands in
/// at most one of `succeeded`, `retried`, `lease_expired` or a final
/// `failed`/`cancelled`; a lost lease of a job out of attempts is counted
/// both as `lease_expired` and as `failed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueTally {
    /// New jobs; an enqueue answered with an earlier job (idempotency key)
    /// is not one.
    pub enqueued: u64,
    pub succeeded: u64,
    /// Jobs that became FAILED (the dead-letter set): failed for good by the
    /// worker, or out of attempts after a failure or a lost lease.
    pub failed: u64,
    /// Failed attempts (`fail` from the worker) scheduled to run again.
    pub retried: u64,
    /// Leases lost without a result: the session expired (or said goodbye
    /// holding the job) or `lease_timeout` passed.
    pub lease_expired: u64,
    pub cancelled: u64,
    /// One per assignment: how long the job had been due when the entry
    /// that assigns it was proposed, in ms of leader time (the entries'
    /// stamps). Due means the latest of its `run_at`, its enqueue and the
    /// end of its previous attempt.
    pub dispatch_waits_ms: Vec<u64>,
}

impl Tally {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    pub(super) fn queue(&mut self, name: &str) -> &mut QueueTally {
        if !self.queues.contains_key(name) {
            self.queues.insert(name.to_owned(), QueueTally::default());
        }
        self.queues.get_mut(name).expect("inserted above")
    }
}

#[cfg(test)]
mod tests {
    use super::QueueTally;
    use crate::queue::{
        Applied, Batch, Command, ExpiryReason, FencingToken, JobId, NewJob, QueueState, RetryRequest, SessionId,
        ShardId, state::ApplyOutput,
    };

    struct Log {
        state: QueueState,
        index: u64,
    }

    impl Log {
        fn apply(&mut self, at_ms: u64, commands: Vec<Command>) -> ApplyOutput {
            self.index += 1;
            self.state.apply(self.index, &Batch { proposed_at_ms: at_ms, commands: commands.into() })
        }

        fn assign(&mut self, at_ms: u64, session: &SessionId) -> (ApplyOutput, Vec<(JobId, FencingToken)>) {
            let out = self.apply(at_ms, vec![Command::Dispatch { sessions: vec![session.clone()] }]);
            let Applied::Dispatched { .. } = out.results[0] else { panic!("not dispatched") };
            let assigned = out.assignments().map(|a| (a.job_id, a.token)).collect();
            (out, assigned)
        }
    }

    fn queue(out: &ApplyOutput, name: &str) -> QueueTally {
        out.tally.queues.get(name).cloned().unwrap_or_default()
    }

    #[test]
    fn each_transition_is_counted_once_per_entry() {
        let mut log = Log { state: QueueState::new(ShardId(0)), index: 0 };
        let session = SessionId("s".into());
        let mut keyed = NewJob::new("q", b"a".to_vec());
        keyed.idempotency_key = Some("k".into());
        let mut once = NewJob::new("q", b"b".to_vec());
        once.max_attempts = Some(1);
        let out = log.apply(
            1_000,
            vec![
                Command::Enqueue(keyed.clone()),
                Command::Enqueue(keyed),
                Command::Enqueue(NewJob::new("q", b"c".to_vec())),
                Command::Enqueue(once),
                Command::Enqueue(NewJob::new("other", b"d".to_vec())),
                Command::OpenSession {
                    session_id: session.clone(),
                    worker_id: "w".into(),
                    queues: vec!["q".into()],
                    max_in_flight: 3,
                },
            ],
        );
        assert_eq!(queue(&out, "q").enqueued, 3, "the idempotent repeat is not a new job");
        assert_eq!(queue(&out, "other").enqueued, 1);

        // Assigned 250 ms after they became due.
        let (out, held) = log.assign(1_250, &session);
        assert_eq!(queue(&out, "q").dispatch_waits_ms, vec![250, 250, 250]);
        let complete = |(job_id, token): (JobId, FencingToken)| Command::Complete { job_id, token, result: vec![] };
        let fail = |(job_id, token): (JobId, FencingToken)| Command::Fail {
            job_id,
            token,
            error: "boom".into(),
            retry: RetryRequest::After { delay_ms: 100 },
        };
        // A result sent twice is one success; the retried job comes back.
        let out = log.apply(2_000, vec![complete(held[0]), complete(held[0]), fail(held[1])]);
        let q = queue(&out, "q");
        assert_eq!((q.succeeded, q.retried, q.failed), (1, 1, 0));

        // The retried job is due at 2_100 (its retry_after), assigned at 2_600.
        let (out, again) = log.assign(2_600, &session);
        assert_eq!(queue(&out, "q").dispatch_waits_ms, vec![500]);
        // The session dies: two leases lost; the job with one attempt is dead.
        let out = log
            .apply(3_000, vec![Command::ExpireSession { session_id: session.clone(), reason: ExpiryReason::Silent }]);
        let q = queue(&out, "q");
        assert_eq!((q.lease_expired, q.failed, q.retried), (2, 1, 0));
        assert_eq!(again.len(), 1);

        let out = log.apply(3_100, vec![Command::Cancel { job_id: held[1].0, reason: String::new() }]);
        assert_eq!(queue(&out, "q").cancelled, 1);
        let out = log.apply(3_200, vec![Command::Tick]);
        assert!(out.tally.is_empty());
    }
}
