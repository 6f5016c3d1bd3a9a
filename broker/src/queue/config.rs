//! Per-queue settings. They change outcomes (attempts, leases, backoff), so
//! they are replicated state, never node-local configuration.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_attempts: u32,
    pub lease_timeout_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub retention_ms: u64,
    /// Jobs of the queue active at once; 0 = unlimited.
    pub concurrency_limit: u32,
    /// Dispatches per second; 0 = unlimited.
    pub rate_limit: u32,
    /// Non-terminal jobs; 0 = unlimited.
    pub max_depth: u64,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 25;
pub const DEFAULT_LEASE_TIMEOUT_MS: u64 = 5 * 60 * 1000;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 1000;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 60 * 60 * 1000;
pub const DEFAULT_RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            lease_timeout_ms: DEFAULT_LEASE_TIMEOUT_MS,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            retention_ms: DEFAULT_RETENTION_MS,
            concurrency_limit: 0,
            rate_limit: 0,
            max_depth: 0,
        }
    }
}

/// `None` keeps the current value. Validated at the API edge.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfigUpdate {
    pub max_attempts: Option<u32>,
    pub lease_timeout_ms: Option<u64>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub retention_ms: Option<u64>,
    pub concurrency_limit: Option<u32>,
    pub rate_limit: Option<u32>,
    pub max_depth: Option<u64>,
}

impl QueueConfig {
    pub fn apply(&mut self, u: &QueueConfigUpdate) {
        fn set<T: Copy>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        set(&mut self.max_attempts, u.max_attempts);
        set(&mut self.lease_timeout_ms, u.lease_timeout_ms);
        set(&mut self.backoff_base_ms, u.backoff_base_ms);
        set(&mut self.backoff_max_ms, u.backoff_max_ms);
        set(&mut self.retention_ms, u.retention_ms);
        set(&mut self.concurrency_limit, u.concurrency_limit);
        set(&mut self.rate_limit, u.rate_limit);
        set(&mut self.max_depth, u.max_depth);
    }

    /// Delay before retry number `attempt` (1-based: the attempt that failed),
    /// exponential from `backoff_base_ms`, capped, then scaled into
    /// [50%, 100%] by the leader's jitter so a burst of failures spreads out.
    pub fn backoff_ms(&self, attempt: u32, jitter_permille: u16) -> u64 {
        let exp = attempt.saturating_sub(1).min(62);
        let raw = self.backoff_base_ms.saturating_mul(1u64 << exp).min(self.backoff_max_ms);
        let jitter = u64::from(jitter_permille.min(1000));
        raw / 2 + (raw / 2).saturating_mul(jitter) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps_and_jitter_stays_in_band() {
        let c = QueueConfig { backoff_base_ms: 1000, backoff_max_ms: 10_000, ..Default::default() };
        assert_eq!(c.backoff_ms(1, 1000), 1000);
        assert_eq!(c.backoff_ms(2, 1000), 2000);
        assert_eq!(c.backoff_ms(3, 0), 2000);
        assert_eq!(c.backoff_ms(60, 1000), 10_000);
        assert_eq!(c.backoff_ms(u32::MAX, 500), 7500);
    }
}
