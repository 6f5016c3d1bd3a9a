//! Exponential backoff with jitter, for reconnects and retried calls.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        // A zero minimum would turn a dead broker into a busy loop.
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The delay before the next try: the exponential step with "equal
    /// jitter" (half fixed, half random) so that many workers cut off by the
    /// same broker restart do not all come back in the same millisecond,
    /// while each still waits at least half its step. Always within
    /// `[min, max]`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.min.saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX)).min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        let half = step / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::rng().random_range(0..=jitter_nanos));
        (half + jitter).clamp(self.min, self.max)
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(d >= min && d <= max, "{d:?} out of [{min:?}, {max:?}]");
        }
    }

    #[test]
    fn delays_grow_then_cap() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(100));
        for _ in 0..20 {
            b.next_delay();
        }
        // Once capped, equal jitter keeps every delay in the upper half.
        let late = b.next_delay();
        assert!(late >= max / 2, "{late:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn degenerate_settings_are_repaired() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
