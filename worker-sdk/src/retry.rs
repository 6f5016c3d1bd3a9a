//! Whether a failed try of a unary call may be sent again. Every retry
//! decision of [`Client`](crate::Client) goes through [`decide`], so what
//! counts as "safe to send twice" is written down once.

use tonic::{Code, Status};

/// Whether sending a call twice is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// Reads, enqueues with an idempotency key (the broker answers the
    /// second with the first job), and cancels (a second one changes nothing).
    Safe,
    /// A second copy may be applied too: an enqueue without an idempotency
    /// key would make a second job.
    Unsafe,
}

/// How a try ended that gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The call was not acted on: it never left this process (no
    /// connection), or the broker said `UNAVAILABLE` (no leader, not the
    /// leader, shutting down), which it only says before acting.
    NotApplied,
    /// The call went out and no answer came back: the deadline passed or the
    /// connection broke. The broker may have applied it.
    Unknown,
    /// The broker's answer; trying again would get the same one.
    Final,
}

/// What [`Client::call`](crate::Client) does after a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Try again (another node, a hinted leader, or later), budget permitting.
    Retry,
    /// Return the status as it is.
    Return,
    /// Stop: the call may have been applied and must not be sent twice.
    OutcomeUnknown,
}

/// Broker metadata on a status whose call may or may not have been applied.
const OUTCOME_METADATA: &str = "gantry-outcome";

pub(crate) fn decide(status: &Status, replay: Replay) -> Decision {
    match (classify(status), replay) {
        (Failure::NotApplied, _) | (Failure::Unknown, Replay::Safe) => Decision::Retry,
        (Failure::Unknown, Replay::Unsafe) => Decision::OutcomeUnknown,
        (Failure::Final, _) => Decision::Return,
    }
}

pub(crate) fn classify(status: &Status) -> Failure {
    // gRPC's own meaning of the code: "the operation may have completed".
    // It is also what a try that ran past its deadline is reported as.
    if status.code() == Code::DeadlineExceeded {
        return Failure::Unknown;
    }
    // The broker says it cannot tell (a call it forwarded lost its answer).
    if status.metadata().get(OUTCOME_METADATA).is_some_and(|v| v == "unknown") {
        return Failure::Unknown;
    }
    if never_sent(status) {
        return Failure::NotApplied;
    }
    // A status that carries a source error was made by tonic from a
    // transport failure; one the broker sent has none.
    let from_transport = std::error::Error::source(status).is_some();
    match status.code() {
        Code::Unavailable if !from_transport => Failure::NotApplied,
        // Connection reset or closed mid-call, an HTTP/2 keepalive ping
        // unanswered (a frozen node), a stream cancelled under the call.
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled if from_transport => Failure::Unknown,
        _ => Failure::Final,
    }
}

/// No connection could be made, or the channel never became ready: the
/// request was not written anywhere.
fn never_sent(status: &Status) -> bool {
    // tonic reports a channel that could not become ready as `UNKNOWN` with
    // this message (the generated clients' wording).
    if status.code() == Code::Unknown && status.message().starts_with("Service was not ready") {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_transport(error: impl std::error::Error + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(error))
    }

    #[test]
    fn a_broker_that_cannot_tell_is_an_unknown_outcome() {
        let mut status = Status::unknown("forwarded, answer lost");
        status.metadata_mut().insert(OUTCOME_METADATA, "unknown".parse().unwrap());
        assert_eq!(classify(&status), Failure::Unknown);
        assert_eq!(decide(&status, Replay::Safe), Decision::Retry);
        assert_eq!(decide(&status, Replay::Unsafe), Decision::OutcomeUnknown);
    }

    #[test]
    fn broker_statuses() {
        assert_eq!(classify(&Status::unavailable("no leader")), Failure::NotApplied);
        assert_eq!(classify(&Status::deadline_exceeded("slow")), Failure::Unknown);
        for final_status in [
            Status::not_found("job"),
            Status::invalid_argument("queue"),
            Status::resource_exhausted("full"),
            Status::failed_precondition("terminal"),
            Status::unknown("handler blew up"),
            Status::internal("bug"),
            Status::cancelled("by the broker"),
        ] {
            assert_eq!(classify(&final_status), Failure::Final, "{final_status:?}");
        }
    }

    #[test]
    fn transport_statuses() {
        assert_eq!(classify(&Status::unknown("Service was not ready: transport error")), Failure::NotApplied);
        let refused =
            from_transport(tonic::ConnectError(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))));
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(classify(&refused), Failure::NotApplied);

        // What tonic makes of a connection that broke after the request
        // went out: a status with the transport error as its source.
        let broke = from_transport(Wrapped(Status::unavailable("connection reset")));
        assert!(std::error::Error::source(&broke).is_some());
        assert_eq!(classify(&broke), Failure::Unknown);
        let reset = from_transport(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(reset.code(), Code::Unknown);
        assert_eq!(classify(&reset), Failure::Unknown);
    }

    #[test]
    fn decisions() {
        let unknown = Status::deadline_exceeded("no answer within 5s");
        assert_eq!(decide(&unknown, Replay::Safe), Decision::Retry);
        assert_eq!(decide(&unknown, Replay::Unsafe), Decision::OutcomeUnknown);
        let not_applied = Status::unavailable("not the leader");
        assert_eq!(decide(&not_applied, Replay::Safe), Decision::Retry);
        assert_eq!(decide(&not_applied, Replay::Unsafe), Decision::Retry);
        let answer = Status::not_found("job");
        assert_eq!(decide(&answer, Replay::Safe), Decision::Return);
        assert_eq!(decide(&answer, Replay::Unsafe), Decision::Return);
    }

    /// A transport-side error whose chain holds a status, the way tonic's
    /// own errors do.
    #[derive(Debug)]
    struct Wrapped(Status);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport: {}", self.0.message())
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
