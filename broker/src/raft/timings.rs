//! How long one shard's log syncs and commits take on this node, for
//! `/metrics`. Raft latency is disk latency first: a slow or throttled
//! volume shows here before it shows as slow enqueues.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Upper bounds of the buckets, in microseconds: a local NVMe sync is
/// ~0.1 ms, a network volume's several ms, a stalled one seconds.
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Non-cumulative counts per bucket of `BUCKETS_US`; values above the
    /// last bound are only in `count`.
    pub buckets: [u64; BUCKETS_US.len()],
    pub sum_us: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|bound| us <= *bound) {
            self.buckets[i] += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }

    /// Cumulative counts per bound, as Prometheus wants them.
    pub fn cumulative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut total = 0;
        BUCKETS_US.iter().zip(self.buckets.iter()).map(move |(bound, n)| {
            total += n;
            (*bound, total)
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    pub opened: u64,
    pub broken: u64,
    pub requests: u64,
}

/// One shard's timings on this node.
#[derive(Debug, Default)]
pub struct Timings {
    /// Each synced write of the log (raft-engine write + fdatasync),
    /// covering every entry appended since the one before.
    log_sync: Mutex<LatencyHistogram>,
    /// On the leader: each entry from proposal until applied here
    /// (replication to a quorum, their syncs, apply).
    commit: Mutex<LatencyHistogram>,
    /// On the leader: replication streams (format 2) opened to followers,
    /// and those that broke (stalled, reset, refused). Many broken streams
    /// mean a flaky peer link: each costs a resend of what was in flight.
    streams_opened: AtomicU64,
    streams_broken: AtomicU64,
    /// AppendEntries requests sent over those streams.
    streamed_requests: AtomicU64,
}

impl Timings {
    pub fn log_synced(&self, elapsed: Duration) {
        lock(&self.log_sync).observe(elapsed);
    }

    pub fn committed(&self, elapsed: Duration) {
        lock(&self.commit).observe(elapsed);
    }

    pub fn stream_opened(&self) {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_broken(&self) {
        self.streams_broken.fetch_add(1, Ordering::Relaxed);
    }

    pub fn streamed_request(&self) {
        self.streamed_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Replication streams opened and broken, and the requests sent over them.
    pub fn streams(&self) -> StreamCounts {
        StreamCounts {
            opened: self.streams_opened.load(Ordering::Relaxed),
            broken: self.streams_broken.load(Ordering::Relaxed),
            requests: self.streamed_requests.load(Ordering::Relaxed),
        }
    }

    pub fn log_sync(&self) -> LatencyHistogram {
        lock(&self.log_sync).clone()
    }

    pub fn commit(&self) -> LatencyHistogram {
        lock(&self.commit).clone()
    }
}

fn lock(h: &Mutex<LatencyHistogram>) -> std::sync::MutexGuard<'_, LatencyHistogram> {
    h.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = LatencyHistogram::default();
        for us in [50, 100, 101, 20_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let cumulative: Vec<_> = h.cumulative().take(3).collect();
        assert_eq!(cumulative, [(100, 2), (250, 3), (500, 3)]);
        assert_eq!(h.cumulative().last(), Some((10_000_000, 3)), "above the last bound: only in count");
        assert_eq!((h.count, h.sum_us), (4, 20_000_251));
    }
}
