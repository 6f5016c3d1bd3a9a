//! Conversions between `std::time` and the protobuf well-known types.

use std::time::{Duration, SystemTime};

/// The longest delay or lease extension the broker accepts (365 days); a
/// longer one would get the whole stream refused, so it is capped here.
pub(crate) const MAX_BROKER_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Saturates instead of failing: a caller asking for "practically forever"
/// should get the largest duration protobuf can carry, not an error.
pub(crate) fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 999_999_999 })
}

/// `None` for negative or malformed durations (data from the network).
pub(crate) fn from_proto_duration(d: &prost_types::Duration) -> Option<Duration> {
    Duration::try_from(*d).ok()
}

pub(crate) fn to_proto_timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// `None` for timestamps `SystemTime` cannot represent (data from the network).
pub(crate) fn from_proto_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_saturate() {
        let d = Duration::from_millis(2500);
        assert_eq!(from_proto_duration(&to_proto_duration(d)), Some(d));
        let huge = to_proto_duration(Duration::MAX);
        assert!(huge.seconds > 0);
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        assert_eq!(from_proto_duration(&negative), None);
    }

    #[test]
    fn timestamps_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(from_proto_timestamp(&to_proto_timestamp(t)), Some(t));
    }
}
