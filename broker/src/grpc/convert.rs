//! Domain types → the public protobuf API (`gantry.v1`). The state machine
//! knows nothing of protobuf (its module must not depend on it), so every
//! answer a client sees is shaped here. Input goes the other way through
//! `validate`, which checks as it converts.
//!
//! Times in the state machine are u64 milliseconds since the epoch (leader
//! stamps); the API speaks `google.protobuf.Timestamp` / `Duration`. The
//! conversions are total: any u64 maps to a well-formed value (clamped to
//! the protobuf range), so nothing here can panic or emit a value a client
//! library would refuse to parse.

use gantry_proto::v1 as proto;

use crate::queue::{AttemptRecord, JobState, JobView, Outcome, PayloadReadError, QueueConfig, ShardId, state::Queue};

pub fn job_state_to_proto(state: JobState) -> proto::JobState {
    match state {
        JobState::Scheduled => proto::JobState::Scheduled,
        JobState::Ready => proto::JobState::Ready,
        JobState::Active => proto::JobState::Active,
        JobState::Succeeded => proto::JobState::Succeeded,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
    }
}

/// `None` for UNSPECIFIED, which names no state (in a filter it means "any").
pub fn job_state_from_proto(state: proto::JobState) -> Option<JobState> {
    match state {
        proto::JobState::Unspecified => None,
        proto::JobState::Scheduled => Some(JobState::Scheduled),
        proto::JobState::Ready => Some(JobState::Ready),
        proto::JobState::Active => Some(JobState::Active),
        proto::JobState::Succeeded => Some(JobState::Succeeded),
        proto::JobState::Failed => Some(JobState::Failed),
        proto::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

pub fn outcome_to_proto(outcome: Outcome) -> proto::AttemptOutcome {
    match outcome {
        Outcome::Running => proto::AttemptOutcome::Running,
        Outcome::Succeeded => proto::AttemptOutcome::Succeeded,
        Outcome::Failed => proto::AttemptOutcome::Failed,
        Outcome::Released => proto::AttemptOutcome::Released,
        Outcome::SessionExpired => proto::AttemptOutcome::SessionExpired,
        Outcome::LeaseTimedOut => proto::AttemptOutcome::LeaseTimedOut,
        Outcome::Cancelled => proto::AttemptOutcome::Cancelled,
    }
}

/// The latest instant protobuf allows (9999-12-31T23:59:59.999Z), in ms.
const MAX_TIMESTAMP_MS: u64 = 253_402_300_799_999;
/// The longest duration protobuf allows (about 10,000 years), in ms.
const MAX_DURATION_MS: u64 = 315_576_000_000_999;

/// Milliseconds since the Unix epoch as a protobuf instant. Clamped to the
/// protobuf range so that every client library can parse it; real stamps
/// (leader clock plus bounded delays) are nowhere near the bound.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    let ms = ms.min(MAX_TIMESTAMP_MS);
    prost_types::Timestamp {
        // Both fit: ms / 1000 < i64::MAX, and ms % 1000 * 10^6 < 10^9 < i32::MAX.
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Milliseconds as a protobuf duration, clamped to the protobuf range.
pub fn duration(ms: u64) -> prost_types::Duration {
    let ms = ms.min(MAX_DURATION_MS);
    prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

pub fn attempt_to_proto(r: &AttemptRecord) -> proto::AttemptRecord {
    proto::AttemptRecord {
        attempt: r.attempt,
        worker_id: r.worker_id.clone(),
        session_id: r.session_id.to_string(),
        fencing_token: r.token.0,
        started_at: Some(timestamp(r.started_ms)),
        finished_at: r.finished_ms.map(timestamp),
        outcome: outcome_to_proto(r.outcome) as i32,
        error: r.error.clone(),
    }
}

/// The client's view of a job. `include_payload: false` leaves `payload`
/// and `result` empty: listings (`ListJobs`) may hold a thousand jobs of up
/// to a MiB each, and a caller who wants the bodies asks `GetJob`.
/// Fails only if the payload is on this node's disk and cannot be read back.
pub fn job_to_proto(view: &JobView, include_payload: bool) -> Result<proto::Job, PayloadReadError> {
    let (job, state) = (&*view.job, view.state);
    // Lease fields only while the job is leased: after that they would name
    // a holder that no longer holds it.
    let lease = job.lease();
    Ok(proto::Job {
        id: job.id.to_string(),
        queue: job.queue.clone(),
        state: job_state_to_proto(state) as i32,
        payload: if include_payload { job.payload.to_vec()? } else { Vec::new() },
        headers: job.headers().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        priority: job.priority,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        result: if include_payload { job.result().to_vec() } else { Vec::new() },
        error: job.error().to_owned(),
        created_at: Some(timestamp(job.created_ms)),
        run_at: Some(timestamp(job.run_at_ms)),
        finished_at: job.finished_ms().map(timestamp),
        fencing_token: job.last_token.0,
        worker_id: job.last_worker_id().to_owned(),
        history: job.history().iter().map(attempt_to_proto).collect(),
        lease_timeout: Some(duration(job.lease_timeout_ms)),
        idempotency_key: job.idempotency_key().unwrap_or_default().to_owned(),
        lease_deadline: lease.map(|l| timestamp(l.deadline_ms)),
        session_id: lease.map(|l| l.session_id.to_string()).unwrap_or_default(),
        progress: job.progress().to_owned(),
    })
}

/// The effective configuration: every field set, so a reader never has to
/// know the defaults.
pub fn queue_config_to_proto(c: &QueueConfig) -> proto::QueueConfig {
    proto::QueueConfig {
        max_attempts: Some(c.max_attempts),
        lease_timeout: Some(duration(c.lease_timeout_ms)),
        backoff_base: Some(duration(c.backoff_base_ms)),
        backoff_max: Some(duration(c.backoff_max_ms)),
        retention: Some(duration(c.retention_ms)),
        concurrency_limit: Some(c.concurrency_limit),
        rate_limit: Some(c.rate_limit),
        max_depth: Some(c.max_depth),
    }
}

/// One queue's counts and settings. SCHEDULED and READY are split at
/// `now_ms` (they are one stored status); `oldest_ready_age_ms` is the
/// caller's to compute (it needs the jobs, not just the queue) and is left
/// unset when no job is due.
pub fn queue_info(
    name: &str,
    shard: ShardId,
    queue: &Queue,
    now_ms: u64,
    oldest_ready_age_ms: Option<u64>,
) -> proto::QueueInfo {
    let (scheduled, ready) = queue.scheduled_and_ready(now_ms);
    proto::QueueInfo {
        queue: name.to_owned(),
        shard: shard.0,
        scheduled,
        ready,
        active: queue.active,
        succeeded: queue.succeeded,
        failed: queue.failed,
        cancelled: queue.cancelled,
        oldest_ready_age: oldest_ready_age_ms.map(duration),
        paused: queue.paused,
        config: Some(queue_config_to_proto(&queue.config)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::grpc::validate;
    use crate::queue::{
        Batch, Command, FencingToken, Job, JobId, JobMore, More, NewJob, QueueState, SessionId, Status, job::Lease,
    };

    fn sample_job() -> Job {
        Job {
            id: JobId { shard: ShardId(2), seq: 41 },
            queue: "emails".into(),
            payload: b"payload".to_vec().into(),
            priority: 5,
            status: Status::Active(Box::new(Lease {
                session_id: SessionId("sess-b".into()),
                token: FencingToken(9000),
                started_ms: 1_700_000_003_000,
                deadline_ms: 1_700_000_063_250,
            })),
            attempt: 2,
            max_attempts: 7,
            lease_timeout_ms: 60_250,
            created_ms: 1_700_000_000_001,
            run_at_ms: 1_700_000_001_999,
            last_token: FencingToken(9000),
            more: More::of(JobMore {
                headers: BTreeMap::from([("trace".into(), "t-1".into())]),
                finished_ms: None,
                retain_until_ms: None,
                result: Vec::new(),
                error: "first try failed".into(),
                idempotency_key: Some("key-1".into()),
                last_worker_id: "worker-b".into(),
                progress: "50%".into(),
                history: vec![
                    AttemptRecord {
                        attempt: 1,
                        worker_id: "worker-a".into(),
                        session_id: SessionId("sess-a".into()),
                        token: FencingToken(8000),
                        started_ms: 1_700_000_002_000,
                        finished_ms: Some(1_700_000_002_500),
                        outcome: Outcome::Failed,
                        error: "first try failed".into(),
                    },
                    AttemptRecord {
                        attempt: 2,
                        worker_id: "worker-b".into(),
                        session_id: SessionId("sess-b".into()),
                        token: FencingToken(9000),
                        started_ms: 1_700_000_003_000,
                        finished_ms: None,
                        outcome: Outcome::Running,
                        error: String::new(),
                    },
                ],
            }),
        }
    }

    fn ms(t: &Option<prost_types::Timestamp>) -> Option<u64> {
        t.as_ref().map(|t| validate::timestamp_ms("t", t).unwrap())
    }

    fn dur_ms(d: &Option<prost_types::Duration>) -> Option<u64> {
        d.as_ref().map(|d| validate::duration_ms("d", d).unwrap())
    }

    #[test]
    fn states_round_trip() {
        for s in [
            JobState::Scheduled,
            JobState::Ready,
            JobState::Active,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(job_state_from_proto(job_state_to_proto(s)), Some(s));
        }
        assert_eq!(job_state_from_proto(proto::JobState::Unspecified), None);
    }

    #[test]
    fn times_round_trip_through_validation() {
        for v in [0, 1, 999, 1000, 1_700_000_000_123, MAX_TIMESTAMP_MS] {
            assert_eq!(validate::timestamp_ms("t", &timestamp(v)), Ok(v));
        }
        for v in [0, 1, 999, 1000, 1_700_000_000_123, MAX_DURATION_MS] {
            assert_eq!(validate::duration_ms("d", &duration(v)), Ok(v));
        }
        // Beyond the protobuf range: clamped, still valid, no panic.
        assert_eq!(validate::timestamp_ms("t", &timestamp(u64::MAX)), Ok(MAX_TIMESTAMP_MS));
        assert_eq!(validate::duration_ms("d", &duration(u64::MAX)), Ok(MAX_DURATION_MS));
    }

    #[test]
    fn active_job_round_trips() {
        let job = sample_job();
        let view = JobView { state: JobState::Active, job: job.clone().into() };
        let p = job_to_proto(&view, true).unwrap();

        assert_eq!(p.id.parse::<JobId>(), Ok(job.id));
        assert_eq!(p.queue, job.queue);
        assert_eq!(proto::JobState::try_from(p.state).ok().and_then(job_state_from_proto), Some(JobState::Active));
        assert_eq!(job.payload, p.payload);
        assert_eq!(&p.headers.into_iter().collect::<BTreeMap<_, _>>(), job.headers());
        assert_eq!(p.priority, job.priority);
        assert_eq!((p.attempt, p.max_attempts), (2, 7));
        assert!(p.result.is_empty());
        assert_eq!(p.error, job.error());
        assert_eq!(ms(&p.created_at), Some(job.created_ms));
        assert_eq!(ms(&p.run_at), Some(job.run_at_ms));
        assert_eq!(p.finished_at, None);
        assert_eq!(p.fencing_token, 9000);
        assert_eq!(p.worker_id, "worker-b");
        assert_eq!(dur_ms(&p.lease_timeout), Some(job.lease_timeout_ms));
        assert_eq!(p.idempotency_key, "key-1");
        assert_eq!(ms(&p.lease_deadline), Some(1_700_000_063_250));
        assert_eq!(p.session_id, "sess-b");
        assert_eq!(p.progress, "50%");

        assert_eq!(p.history.len(), 2);
        for (r, want) in p.history.iter().zip(job.history()) {
            assert_eq!(r.attempt, want.attempt);
            assert_eq!(r.worker_id, want.worker_id);
            assert_eq!(r.session_id, *want.session_id.0);
            assert_eq!(r.fencing_token, want.token.0);
            assert_eq!(ms(&r.started_at), Some(want.started_ms));
            assert_eq!(ms(&r.finished_at), want.finished_ms);
            assert_eq!(r.outcome, outcome_to_proto(want.outcome) as i32);
            assert_eq!(r.error, want.error);
        }
        assert_eq!(p.history[0].outcome, proto::AttemptOutcome::Failed as i32);
        assert_eq!(p.history[1].outcome, proto::AttemptOutcome::Running as i32);

        // The protobuf encoding itself round-trips too.
        let bytes = prost::Message::encode_to_vec(&job_to_proto(&view, true).unwrap());
        let decoded = <proto::Job as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, job_to_proto(&view, true).unwrap());
    }

    #[test]
    fn finished_job_has_no_lease_and_payload_can_be_left_out() {
        let mut job = sample_job();
        job.status = Status::Succeeded;
        job.more_mut().finished_ms = Some(1_700_000_010_000);
        job.more_mut().result = b"done".to_vec();
        job.more_mut().idempotency_key = None;
        let view = JobView { state: JobState::Succeeded, job: job.into() };
        let p = job_to_proto(&view, true).unwrap();
        assert_eq!(p.state, proto::JobState::Succeeded as i32);
        assert_eq!(p.result, b"done");
        assert_eq!(ms(&p.finished_at), Some(1_700_000_010_000));
        assert_eq!(p.lease_deadline, None);
        assert_eq!(p.session_id, "");
        assert_eq!(p.idempotency_key, "");
        // The last holder and token stay visible after the lease ends.
        assert_eq!((p.worker_id.as_str(), p.fencing_token), ("worker-b", 9000));

        let slim = job_to_proto(&view, false).unwrap();
        assert!(slim.payload.is_empty() && slim.result.is_empty());
        assert_eq!(slim.id, p.id);
    }

    #[test]
    fn queue_config_sets_every_field() {
        let c = QueueConfig {
            max_attempts: 3,
            lease_timeout_ms: 1500,
            backoff_base_ms: 200,
            backoff_max_ms: 9000,
            retention_ms: 86_400_000,
            concurrency_limit: 4,
            rate_limit: 0,
            max_depth: 77,
        };
        let p = queue_config_to_proto(&c);
        assert_eq!(p.max_attempts, Some(3));
        assert_eq!(dur_ms(&p.lease_timeout), Some(1500));
        assert_eq!(dur_ms(&p.backoff_base), Some(200));
        assert_eq!(dur_ms(&p.backoff_max), Some(9000));
        assert_eq!(dur_ms(&p.retention), Some(86_400_000));
        assert_eq!(p.concurrency_limit, Some(4));
        assert_eq!(p.rate_limit, Some(0));
        assert_eq!(p.max_depth, Some(77));
        // What an admin reads back, written again, changes nothing.
        let mut again = QueueConfig::default();
        again.apply(&validate::queue_config_update(&p).unwrap());
        assert_eq!(again, c);
    }

    #[test]
    fn queue_info_counts_and_settings() {
        // Two jobs enqueued at t=1000: one due at once, one delayed 10 s.
        let mut state = QueueState::new(ShardId(1));
        let mut later = NewJob::new("q", b"x".to_vec());
        later.delay_ms = 10_000;
        state.apply(
            1,
            &Batch {
                proposed_at_ms: 1_000,
                commands: vec![
                    Command::Enqueue(NewJob::new("q", b"x".to_vec())),
                    Command::Enqueue(later),
                    Command::PauseQueue { queue: "q".into() },
                ]
                .into(),
            },
        );
        let q = state.queue("q").expect("queue created by enqueue");
        let info = queue_info("q", ShardId(1), q, 2_000, Some(1_000));
        assert_eq!(info.queue, "q");
        assert_eq!(info.shard, 1);
        assert_eq!((info.scheduled, info.ready), (1, 1));
        assert_eq!((info.active, info.succeeded, info.failed, info.cancelled), (0, 0, 0, 0));
        assert!(info.paused);
        assert_eq!(dur_ms(&info.oldest_ready_age), Some(1_000));
        assert_eq!(info.config, Some(queue_config_to_proto(&q.config)));
        // Once the delay has passed both are ready.
        let info = queue_info("q", ShardId(1), q, 11_000, None);
        assert_eq!((info.scheduled, info.ready), (0, 2));
        assert_eq!(info.oldest_ready_age, None);
    }
}
