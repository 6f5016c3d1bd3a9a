//! Per-queue job counters and the dispatch latency histogram of one shard,
//! summed from the tallies of the entries this node applies. A leaf: it
//! knows the queue's `Tally` and nothing else of the broker.
//!
//! Every replica applies every committed entry, so every node counts the
//! same transitions: the counters agree across nodes (up to apply lag), and
//! a dashboard should take one node's value per queue (`max by (queue)`),
//! never the sum over nodes. Entries replayed from the local log at startup
//! were counted by the previous process and are not counted again (the
//! state machine adapter skips them), so a restart is an ordinary counter
//! reset to zero, not a jump.

use std::{collections::BTreeMap, sync::Mutex};

use crate::queue::Tally;

/// Upper bounds of the dispatch latency buckets, in ms (rendered in
/// seconds). Waits are measured in the leader's ms stamps, so 1 ms is the
/// finest useful bound.
pub const DISPATCH_BUCKETS_MS: [u64; 17] =
    [1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    /// Non-cumulative counts per bucket of `DISPATCH_BUCKETS_MS`; values
    /// above the last bound are only in `count`.
    pub buckets: [u64; DISPATCH_BUCKETS_MS.len()],
    pub sum_ms: u64,
    pub count: u64,
}

impl Histogram {
    pub fn observe_ms(&mut self, value_ms: u64) {
        if let Some(i) = DISPATCH_BUCKETS_MS.iter().position(|bound| value_ms <= *bound) {
            self.buckets[i] += 1;
        }
        self.sum_ms = self.sum_ms.saturating_add(value_ms);
        self.count += 1;
    }

    /// Cumulative counts per bound, as Prometheus wants them.
    pub fn cumulative(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut total = 0;
        DISPATCH_BUCKETS_MS.iter().zip(self.buckets.iter()).map(move |(bound, n)| {
            total += n;
            (*bound, total)
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub enqueued: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    pub lease_expired: u64,
    pub cancelled: u64,
    pub dispatch_latency: Histogram,
}

/// Shared by the state machine (the writer, once per applied entry) and
/// the metrics endpoint (a reader, once per scrape).
#[derive(Debug, Default)]
pub struct Counters {
    queues: Mutex<BTreeMap<String, QueueCounters>>,
}

impl Counters {
    pub fn record(&self, tally: &Tally) {
        if tally.is_empty() {
            return;
        }
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for (name, t) in &tally.queues {
            if !queues.contains_key(name) {
                queues.insert(name.clone(), QueueCounters::default());
            }
            let c = queues.get_mut(name).expect("inserted above");
            c.enqueued += t.enqueued;
            c.succeeded += t.succeeded;
            c.failed += t.failed;
            c.retried += t.retried;
            c.lease_expired += t.lease_expired;
            c.cancelled += t.cancelled;
            for wait in &t.dispatch_waits_ms {
                c.dispatch_latency.observe_ms(*wait);
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, QueueCounters> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueTally;

    #[test]
    fn tallies_add_up_and_buckets_are_cumulative() {
        let counters = Counters::default();
        let mut tally = Tally::default();
        tally.queues.insert(
            "q".into(),
            QueueTally { enqueued: 2, succeeded: 1, dispatch_waits_ms: vec![0, 7, 7_200_000], ..Default::default() },
        );
        counters.record(&tally);
        counters.record(&tally);
        let q = &counters.snapshot()["q"];
        assert_eq!((q.enqueued, q.succeeded, q.failed), (4, 2, 0));
        let h = &q.dispatch_latency;
        assert_eq!((h.count, h.sum_ms), (6, 2 * 7_200_007));
        let cumulative: Vec<(u64, u64)> = h.cumulative().collect();
        assert_eq!(cumulative[0], (1, 2), "0 ms is in the first bucket");
        assert_eq!(cumulative[2], (10, 4));
        assert_eq!(cumulative.last(), Some(&(3_600_000, 4)), "above the last bound: only in +Inf");
    }
}
