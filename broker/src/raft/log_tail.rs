//! The newest entries of one group's log, kept decoded in memory.
//!
//! Nearly every read of a healthy group is of entries appended moments ago:
//! applying what just committed, and (on the leader) sending it to the
//! followers. Served from here, such a read costs a clone instead of a trip
//! to raft-engine's I/O threads (two thread hand-offs and a `pread`) and a
//! decode, for every entry on every node. Anything older, or not wholly
//! here, is read from the engine as before: this is a cache, never the
//! record.

use std::collections::VecDeque;

/// A contiguous run of entries `first..first + len`, bounded in count and
/// in (encoded) bytes; the oldest go first.
pub struct LogTail<E> {
    entries: VecDeque<(E, usize)>,
    first: u64,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<E: Clone> LogTail<E> {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        LogTail { entries: VecDeque::new(), first: 0, bytes: 0, max_entries, max_bytes }
    }

    /// The index after the last entry held.
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Entries just written to the log from index `at` on, each with its
    /// encoded size. Like the log, they replace whatever was held from `at`
    /// on; entries not adjacent to those held start a new run.
    pub fn appended(&mut self, at: u64, entries: impl IntoIterator<Item = (E, usize)>) {
        if self.entries.is_empty() || at < self.first || at > self.next() {
            self.clear();
            self.first = at;
        } else {
            self.truncate_from(at);
        }
        for (entry, size) in entries {
            self.bytes += size;
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((_, size)) = self.entries.pop_front() else { break };
            self.bytes -= size;
            self.first += 1;
        }
    }

    /// The log now ends at `keep` (nothing is left with `None`).
    pub fn truncated_after(&mut self, keep: Option<u64>) {
        match keep {
            Some(keep) => self.truncate_from(keep.saturating_add(1)),
            None => self.clear(),
        }
    }

    /// The log no longer holds anything up to `upto`.
    pub fn purged_upto(&mut self, upto: u64) {
        while self.first <= upto {
            let Some((_, size)) = self.entries.pop_front() else { break };
            self.bytes -= size;
            self.first += 1;
        }
        if self.entries.is_empty() {
            self.clear();
        }
    }

    /// Entries `start..end` if every one of them is held, but no more than
    /// `max_bytes` of them (always at least one).
    pub fn get(&self, start: u64, end: u64, max_bytes: Option<usize>) -> Option<Vec<E>> {
        if start >= end || start < self.first || end > self.next() {
            return None;
        }
        let skip = (start - self.first) as usize;
        let count = (end - start) as usize;
        let mut taken = Vec::with_capacity(count);
        let mut bytes = 0;
        for (entry, size) in self.entries.iter().skip(skip).take(count) {
            bytes += size;
            if !taken.is_empty() && max_bytes.is_some_and(|max| bytes > max) {
                break;
            }
            taken.push(entry.clone());
        }
        Some(taken)
    }

    fn truncate_from(&mut self, from: u64) {
        while self.next() > from.max(self.first) {
            let Some((_, size)) = self.entries.pop_back() else { break };
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::LogTail;

    fn tail_with(at: u64, count: u64) -> LogTail<u64> {
        let mut tail = LogTail::new(100, 1000);
        tail.appended(at, (at..at + count).map(|i| (i, 10)));
        tail
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let tail = tail_with(5, 5); // 5..10
        assert_eq!(tail.get(5, 10, None), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(tail.get(7, 9, None), Some(vec![7, 8]));
        assert_eq!(tail.get(4, 9, None), None, "index 4 is not held");
        assert_eq!(tail.get(6, 11, None), None, "index 10 is not written yet");
        assert_eq!(tail.get(6, 6, None), None);
    }

    #[test]
    fn a_byte_limit_cuts_the_answer_but_never_to_nothing() {
        let tail = tail_with(1, 5);
        assert_eq!(tail.get(1, 6, Some(25)), Some(vec![1, 2]));
        assert_eq!(tail.get(1, 6, Some(3)), Some(vec![1]));
    }

    #[test]
    fn an_overwrite_replaces_the_entries_from_its_index_on() {
        let mut tail = tail_with(1, 5); // 1..6
        tail.appended(3, [(30, 10)]);
        assert_eq!(tail.get(1, 4, None), Some(vec![1, 2, 30]));
        assert_eq!(tail.get(1, 5, None), None, "4 and 5 were overwritten away");
    }

    #[test]
    fn a_gap_or_an_append_before_the_run_starts_over() {
        let mut tail = tail_with(10, 3); // 10..13
        tail.appended(20, [(20, 10)]);
        assert_eq!(tail.get(10, 11, None), None);
        assert_eq!(tail.get(20, 21, None), Some(vec![20]));
        tail.appended(5, [(5, 10)]);
        assert_eq!(tail.get(20, 21, None), None);
        assert_eq!(tail.get(5, 6, None), Some(vec![5]));
    }

    #[test]
    fn truncation_and_purge_drop_what_the_log_dropped() {
        let mut tail = tail_with(1, 10); // 1..11
        tail.truncated_after(Some(7));
        assert_eq!(tail.get(7, 9, None), None);
        assert_eq!(tail.get(1, 8, None), Some((1..8).collect()));
        tail.purged_upto(3);
        assert_eq!(tail.get(3, 5, None), None);
        assert_eq!(tail.get(4, 8, None), Some(vec![4, 5, 6, 7]));
        tail.appended(8, [(8, 10)]);
        assert_eq!(tail.get(4, 9, None), Some(vec![4, 5, 6, 7, 8]));
        tail.purged_upto(100);
        assert_eq!(tail.get(8, 9, None), None);
        tail.appended(101, [(101, 10)]);
        assert_eq!(tail.get(101, 102, None), Some(vec![101]));
        tail.truncated_after(None);
        assert_eq!(tail.get(101, 102, None), None);
    }

    #[test]
    fn the_oldest_entries_go_first_past_either_bound() {
        let mut tail = LogTail::new(3, 1000);
        tail.appended(1, (1..=5).map(|i| (i, 10)));
        assert_eq!(tail.get(3, 6, None), Some(vec![3, 4, 5]));
        assert_eq!(tail.get(2, 3, None), None);

        let mut tail = LogTail::new(100, 25);
        tail.appended(1, (1..=5).map(|i| (i, 10)));
        assert_eq!(tail.get(4, 6, None), Some(vec![4, 5]));
        assert_eq!(tail.get(3, 4, None), None);
        tail.appended(6, [(6, 100)]);
        assert_eq!(tail.get(6, 7, None), None, "one entry over the byte bound is not held at all");
    }
}
