//! Error types: what the SDK returns, and what handlers return.

use std::time::Duration;

use crate::convert::{MAX_BROKER_DURATION, to_proto_duration};
use crate::proto;

/// An error from the client or the worker runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered with a gRPC status, or the transport made one up
    /// (no connection: `UNAVAILABLE`; no answer within the per-try deadline:
    /// `DEADLINE_EXCEEDED`), after the retries the call was allowed.
    #[error("broker returned {}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A call that is not safe to send twice (an enqueue without an
    /// idempotency key) was sent to `node` and no answer came back: the
    /// per-try deadline passed (`DEADLINE_EXCEEDED`) or the connection broke
    /// (`UNAVAILABLE`, ...). The broker may or may not have applied it, so
    /// the SDK did not send it again, which could have made a second job.
    /// Look before sending it again, or give enqueues an idempotency key:
    /// those are retried on another node instead.
    #[error(
        "no answer to {call} from {node} ({}: {}): the outcome is unknown, it may or may not have been applied; \
         not sent again, since a second copy could be applied too (an idempotency key makes enqueues safe to retry)",
        .status.code(),
        .status.message()
    )]
    OutcomeUnknown {
        /// The RPC, e.g. `Enqueue`.
        call: &'static str,
        /// The node the call went to.
        node: String,
        /// How the try ended.
        status: tonic::Status,
    },
    /// No connection could be made to any endpoint.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// An endpoint string that is not `host:port`, `http://host:port` or
    /// (with TLS) `https://host:port`.
    #[error("invalid endpoint {0:?}")]
    InvalidEndpoint(String),
    /// A builder was given settings that cannot work (no queue, zero concurrency, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The broker broke the protocol contract (e.g. no `welcome` first, an empty response).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The gRPC status, when the broker answered with one or the transport
    /// made one up (including how an [`Error::OutcomeUnknown`] try ended).
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Status(s) | Error::OutcomeUnknown { status: s, .. } => Some(s),
            _ => None,
        }
    }

    /// `true` when the call may have been applied although it returned an
    /// error: an [`Error::OutcomeUnknown`].
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. })
    }

    /// The same error again, for answering several callers of one failed
    /// call. A transport error cannot be copied; its text is kept.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Status(s) => Error::Status(s.clone()),
            Error::OutcomeUnknown { call, node, status } => {
                Error::OutcomeUnknown { call, node: node.clone(), status: status.clone() }
            }
            Error::Transport(e) => Error::Protocol(e.to_string()),
            Error::InvalidEndpoint(e) => Error::InvalidEndpoint(e.clone()),
            Error::InvalidConfig(e) => Error::InvalidConfig(e.clone()),
            Error::Protocol(e) => Error::Protocol(e.clone()),
        }
    }

    /// The gRPC code of [`Error::Status`] and [`Error::OutcomeUnknown`];
    /// `None` for local errors.
    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(tonic::Status::code)
    }
}

/// Why a handler did not produce a result; decides what the broker does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Ask for another attempt. `after: Some(d)` schedules it no sooner than `d`
    /// from now (`Duration::ZERO` = at once); `None` leaves the timing to the
    /// queue's backoff.
    #[error("retry requested{}: {message}", .after.map(|d| format!(" after {d:?}")).unwrap_or_default())]
    Retry { after: Option<Duration>, message: String },
    /// Fail for good: the job goes to `FAILED` whatever attempts are left.
    #[error("fatal: {0}")]
    Fatal(String),
    /// An ordinary failure: retried with the queue's backoff while attempts remain.
    #[error("{0}")]
    Failed(String),
}

impl JobError {
    /// Retry with the queue's backoff. For an immediate retry use
    /// `JobError::retry_after(Duration::ZERO)`.
    pub fn retry() -> Self {
        JobError::Retry { after: None, message: "retry requested by handler".to_owned() }
    }

    /// Retry no sooner than `after` from now.
    pub fn retry_after(after: Duration) -> Self {
        JobError::Retry { after: Some(after), message: "retry requested by handler".to_owned() }
    }

    /// Fail for good, with no further attempts.
    pub fn fatal(message: impl Into<String>) -> Self {
        JobError::Fatal(message.into())
    }

    /// Fail this attempt; the queue's backoff decides when the next one runs.
    pub fn failed(message: impl Into<String>) -> Self {
        JobError::Failed(message.into())
    }

    /// An ordinary (retryable) failure from any error, with its `source()` chain
    /// in the message so the job's history says more than the outermost layer.
    ///
    /// A blanket `From<E: Error>` is impossible because `JobError` is itself an
    /// `Error`; use `.map_err(JobError::from_error)?`. Accepts anything that
    /// converts into a boxed error: `std` errors, `anyhow::Error`, strings.
    pub fn from_error(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        let error = error.into();
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        JobError::Failed(message)
    }

    /// The `Fail` message that reports this error for one lease.
    pub(crate) fn to_fail(&self, job_id: &str, fencing_token: u64) -> proto::Fail {
        let (error, retry_after, no_retry) = match self {
            JobError::Retry { after, message } => {
                (message.clone(), after.map(|d| to_proto_duration(d.min(MAX_BROKER_DURATION))), false)
            }
            JobError::Fatal(m) => (m.clone(), None, true),
            JobError::Failed(m) => (m.clone(), None, false),
        };
        proto::Fail { job_id: job_id.to_owned(), fencing_token, error, retry_after, no_retry }
    }
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        JobError::Failed(message)
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        JobError::Failed(message.to_owned())
    }
}

/// The job's lease is gone: another worker may own it now, and this attempt's
/// result will be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease lost for job {job_id} (fencing token {fencing_token})")]
pub struct LeaseLost {
    pub job_id: String,
    pub fencing_token: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_maps_to_retry_after() {
        let f = JobError::retry_after(Duration::from_millis(1500)).to_fail("j1", 7);
        assert_eq!(f.job_id, "j1");
        assert_eq!(f.fencing_token, 7);
        assert!(!f.no_retry);
        let d = f.retry_after.expect("retry_after set");
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
    }

    #[test]
    fn retry_zero_is_immediate_not_backoff() {
        let f = JobError::retry_after(Duration::ZERO).to_fail("j", 1);
        let d = f.retry_after.expect("zero delay must still be sent");
        assert_eq!((d.seconds, d.nanos), (0, 0));
    }

    #[test]
    fn plain_retry_uses_queue_backoff() {
        let f = JobError::retry().to_fail("j", 1);
        assert!(f.retry_after.is_none());
        assert!(!f.no_retry);
    }

    #[test]
    fn huge_retry_delays_are_capped_to_what_the_broker_accepts() {
        let f = JobError::retry_after(Duration::MAX).to_fail("j", 1);
        assert_eq!(f.retry_after.map(|d| d.seconds), Some(365 * 24 * 60 * 60));
    }

    #[test]
    fn fatal_sets_no_retry() {
        let f = JobError::fatal("bad input").to_fail("j", 2);
        assert!(f.no_retry);
        assert!(f.retry_after.is_none());
        assert_eq!(f.error, "bad input");
    }

    #[test]
    fn failed_sets_neither() {
        let f = JobError::failed("boom").to_fail("j", 3);
        assert!(!f.no_retry);
        assert!(f.retry_after.is_none());
        assert_eq!(f.error, "boom");
    }

    #[test]
    fn from_error_keeps_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(JobError::from_error(e), JobError::Failed("outer: inner".into()));
    }

    #[test]
    fn error_code_helper() {
        let e = Error::Status(tonic::Status::not_found("no such job"));
        assert_eq!(e.code(), Some(tonic::Code::NotFound));
        assert_eq!(Error::InvalidEndpoint("x".into()).code(), None);
    }
}
