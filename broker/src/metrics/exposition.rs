//! `/metrics` in the Prometheus text format (version 0.0.4), written by hand:
//! a few dozen series do not need a metrics library.
//!
//! Counters and the histogram come from `Counters` (what this node applied);
//! gauges are read at scrape time from the applied state and Raft's own
//! metrics, so they cost nothing between scrapes.

use std::{collections::BTreeMap, fmt::Write as _};

use super::counters::QueueCounters;
use crate::{
    dispatch::Node,
    raft::{ShardStatus, timings::LatencyHistogram},
};

/// Per queue, read from the applied state at scrape time.
struct QueueGauges {
    scheduled: u64,
    ready: u64,
    active: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    oldest_ready_age_ms: u64,
    paused: bool,
}

struct ShardView {
    status: ShardStatus,
    sessions: usize,
    streams: usize,
    /// Payload bytes moved to disk since the process started; of the
    /// newest jobs, in memory.
    payloads_moved: u64,
    payloads_in_memory: u64,
}

/// One metric family: samples of one name, under one HELP and TYPE line.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, String)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Family { name, kind, help, samples: Vec::new() }
    }

    fn add(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.add_suffixed("", labels, value);
    }

    fn add_suffixed(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let mut series = format!("{}{suffix}", self.name);
        if !labels.is_empty() {
            series.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    series.push(',');
                }
                let _ = write!(series, "{key}=\"{}\"", escape_label(val));
            }
            series.push('}');
        }
        self.samples.push((series, value.to_string()));
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (series, value) in &self.samples {
            let _ = writeln!(out, "{series} {value}");
        }
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn micros_as_seconds(us: u64) -> f64 {
    us as f64 / 1_000_000.0
}

/// Everything `/metrics` shows for this node.
pub fn render(node: &Node) -> String {
    let now = node.clock.now_ms();
    let mut shards = Vec::new();
    let mut counters: BTreeMap<String, QueueCounters> = BTreeMap::new();
    let mut gauges: BTreeMap<String, QueueGauges> = BTreeMap::new();
    for shard in &node.shards {
        let state = shard.raft.state();
        counters.extend(state.counters().snapshot());
        let sessions = {
            let applied = state.read();
            for (name, queue) in applied.queue.queues() {
                let (scheduled, ready) = queue.scheduled_and_ready(now);
                let oldest = queue.oldest_due_run_at_ms(now).map_or(0, |t| now.saturating_sub(t));
                gauges.insert(
                    name.clone(),
                    QueueGauges {
                        scheduled,
                        ready,
                        active: queue.active,
                        succeeded: queue.succeeded,
                        failed: queue.failed,
                        cancelled: queue.cancelled,
                        oldest_ready_age_ms: oldest,
                        paused: queue.paused,
                    },
                );
            }
            applied.queue.sessions().len()
        };
        let (payloads_moved, payloads_in_memory) = shard.raft.state().payload_bytes();
        shards.push(ShardView {
            status: shard.raft.status(),
            sessions,
            streams: shard.registry.connected().len(),
            payloads_moved,
            payloads_in_memory,
        });
    }
    // A queue known to the state but without transitions since this process
    // started still gets its counters, at zero, so rate() has a start.
    for name in gauges.keys() {
        counters.entry(name.clone()).or_default();
    }

    let mut families = Vec::new();
    let node_id = node.node_id.to_string();
    let mut info = Family::new("gantry_node_info", "gauge", "This node's id and version (always 1).");
    info.add(&[("node_id", &node_id), ("version", env!("CARGO_PKG_VERSION"))], 1);
    families.push(info);

    type QueueCounter = fn(&QueueCounters) -> u64;
    let counter_families: [(&'static str, &'static str, QueueCounter); 6] = [
        ("gantry_jobs_enqueued_total", "Jobs created by Enqueue (an idempotent repeat is not counted).", |c| {
            c.enqueued
        }),
        ("gantry_jobs_succeeded_total", "Jobs completed by their current lease holder.", |c| c.succeeded),
        (
            "gantry_jobs_failed_total",
            "Jobs that became FAILED: failed for good, or out of attempts after a failure or a lost lease.",
            |c| c.failed,
        ),
        (
            "gantry_jobs_retried_total",
            "Failed attempts scheduled to run again (worker fail with attempts left).",
            |c| c.retried,
        ),
        (
            "gantry_jobs_lease_expired_total",
            "Leases lost without a result: session expired or lease_timeout passed.",
            |c| c.lease_expired,
        ),
        ("gantry_jobs_cancelled_total", "Jobs cancelled.", |c| c.cancelled),
    ];
    for (name, help, value) in counter_families {
        let mut family = Family::new(name, "counter", help);
        for (queue, c) in &counters {
            family.add(&[("queue", queue)], value(c));
        }
        families.push(family);
    }

    let mut latency = Family::new(
        "gantry_dispatch_latency_seconds",
        "histogram",
        "Time a job waited while due (since its run_at, enqueue or previous attempt's end) until the entry assigning it was proposed, in leader time.",
    );
    for (queue, c) in &counters {
        let h = &c.dispatch_latency;
        for (bound_ms, count) in h.cumulative() {
            latency.add_suffixed("_bucket", &[("queue", queue), ("le", &seconds(bound_ms).to_string())], count);
        }
        latency.add_suffixed("_bucket", &[("queue", queue), ("le", "+Inf")], h.count);
        latency.add_suffixed("_sum", &[("queue", queue)], seconds(h.sum_ms));
        latency.add_suffixed("_count", &[("queue", queue)], h.count);
    }
    families.push(latency);

    let mut depth = Family::new(
        "gantry_queue_jobs",
        "gauge",
        "Jobs per queue and state in this node's applied state (terminal jobs until their retention passes).",
    );
    let mut oldest = Family::new(
        "gantry_queue_oldest_ready_age_seconds",
        "gauge",
        "How long the longest-waiting due job of the queue has been due (0: none).",
    );
    let mut paused = Family::new("gantry_queue_paused", "gauge", "1 when the queue is paused.");
    for (queue, g) in &gauges {
        for (state, n) in [
            ("scheduled", g.scheduled),
            ("ready", g.ready),
            ("active", g.active),
            ("succeeded", g.succeeded),
            ("failed", g.failed),
            ("cancelled", g.cancelled),
        ] {
            depth.add(&[("queue", queue), ("state", state)], n);
        }
        oldest.add(&[("queue", queue)], seconds(g.oldest_ready_age_ms));
        paused.add(&[("queue", queue)], u8::from(g.paused));
    }
    families.extend([depth, oldest, paused]);

    type ShardGauge = fn(&ShardView) -> u64;
    let shard_families: [(&'static str, &'static str, ShardGauge); 13] = [
        ("gantry_raft_term", "Raft term this node is in.", |s| s.status.term),
        ("gantry_raft_commit_index", "Highest log index known committed.", |s| s.status.commit_index),
        ("gantry_raft_applied_index", "Highest log index applied to the state machine.", |s| s.status.applied_index),
        ("gantry_raft_apply_lag", "Committed entries not yet applied on this node.", |s| {
            s.status.commit_index.saturating_sub(s.status.applied_index)
        }),
        ("gantry_raft_last_log_index", "Highest index in this node's log.", |s| s.status.last_log_index),
        ("gantry_raft_snapshot_index", "Log index of the last snapshot.", |s| s.status.snapshot_index),
        ("gantry_raft_is_leader", "1 when this node leads the shard.", |s| u64::from(s.status.role == "leader")),
        (
            "gantry_shard_fenced",
            "1 while this node's copy of the shard is fenced (it lost, or cannot trust, what it acknowledged, or its state differed from the others'): it does not vote, lead or serve reads of the shard until it is whole again.",
            |s| u64::from(s.status.fenced.is_some()),
        ),
        ("gantry_raft_leader_id", "Node id of the leader this node knows of (0: none).", |s| {
            s.status.leader_id.unwrap_or(0)
        }),
        ("gantry_sessions", "Worker sessions in the replicated state (connected or within session_ttl).", |s| {
            s.sessions as u64
        }),
        ("gantry_worker_streams", "Worker streams connected to this node (the leader) for the shard.", |s| {
            s.streams as u64
        }),
        (
            "gantry_payload_memory_bytes",
            "Payload bytes of the shard's newest jobs this node keeps in memory (at most its share of --payload-memory-bytes; older payloads wait on disk).",
            |s| s.payloads_in_memory,
        ),
        (
            "gantry_payload_moved_bytes",
            "Payload bytes this node moved to its disk since it started, restored ones included (a counter; only grows).",
            |s| s.payloads_moved,
        ),
    ];
    for (name, help, value) in shard_families {
        let mut family = Family::new(name, "gauge", help);
        for s in &shards {
            family.add(&[("shard", &s.status.shard.to_string())], value(s));
        }
        families.push(family);
    }

    let mut lag = Family::new(
        "gantry_raft_replication_lag",
        "gauge",
        "On the leader: entries of its log a follower (voter or learner) has not replicated yet.",
    );
    for s in &shards {
        let Some(replication) = &s.status.replication else { continue };
        let shard = s.status.shard.to_string();
        for (member, progress) in replication.iter().filter(|(id, _)| **id != node.node_id) {
            let behind = s.status.last_log_index.saturating_sub(progress.matched_index.unwrap_or(0));
            lag.add(&[("shard", &shard), ("follower", &member.to_string())], behind);
        }
    }
    families.push(lag);

    let mut faults = Family::new(
        "gantry_storage_faults_total",
        "counter",
        "Storage faults and divergence this node found in its copy of a shard, by kind (corrupt_entry, log_lost, vote_restored, guard_slot_lost, guard_lost, committed_clamped, snapshot_corrupt, snapshot_dropped, digest_mismatch, rebuild); each is logged at error with what was found.",
    );
    for shard in &node.shards {
        let id = shard.raft.shard().to_string();
        for (kind, count) in shard.raft.fault_counts() {
            faults.add(&[("shard", &id), ("kind", kind)], count);
        }
    }
    families.push(faults);

    let mut streams = Family::new(
        "gantry_raft_append_streams_total",
        "counter",
        "On a shard's leader: pipelined replication streams to followers (storage format 2 on), by outcome: opened, or broken (a follower stalled past the heartbeat interval, reset or refused the stream; what was in flight is sent again on a new one).",
    );
    let mut streamed = Family::new(
        "gantry_raft_append_stream_requests_total",
        "counter",
        "On a shard's leader: AppendEntries requests sent over replication streams (the rest, heartbeats and all replication before storage format 2, go as unary calls).",
    );
    for shard in &node.shards {
        let id = shard.raft.shard().to_string();
        let counts = shard.raft.timings().streams();
        streams.add(&[("shard", &id), ("outcome", "opened")], counts.opened);
        streams.add(&[("shard", &id), ("outcome", "broken")], counts.broken);
        streamed.add(&[("shard", &id)], counts.requests);
    }
    families.push(streams);
    families.push(streamed);

    type Timing = fn(&crate::raft::ShardRaft) -> LatencyHistogram;
    let timing_families: [(&'static str, &'static str, Timing); 2] = [
        (
            "gantry_raft_log_sync_seconds",
            "Synced writes of the shard's Raft log on this node (raft-engine write + fdatasync); each covers every entry appended since the one before. Every acknowledgement waits for one.",
            |raft| raft.timings().log_sync(),
        ),
        (
            "gantry_raft_commit_seconds",
            "On the leader: log entries from proposal until applied (replication to a quorum, their log syncs, apply). Many calls share one entry.",
            |raft| raft.timings().commit(),
        ),
    ];
    for (name, help, timing) in timing_families {
        let mut family = Family::new(name, "histogram", help);
        for shard in &node.shards {
            let h = timing(&shard.raft);
            let id = shard.raft.shard().to_string();
            for (bound_us, count) in h.cumulative() {
                family.add_suffixed(
                    "_bucket",
                    &[("shard", &id), ("le", &micros_as_seconds(bound_us).to_string())],
                    count,
                );
            }
            family.add_suffixed("_bucket", &[("shard", &id), ("le", "+Inf")], h.count);
            family.add_suffixed("_sum", &[("shard", &id)], micros_as_seconds(h.sum_us));
            family.add_suffixed("_count", &[("shard", &id)], h.count);
        }
        families.push(family);
    }

    let mut out = String::with_capacity(8 << 10);
    for family in &families {
        family.write(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_one_header_and_escaped_labels() {
        let mut family = Family::new("gantry_x_total", "counter", "An example.");
        family.add(&[("queue", "a\"b\\c")], 3);
        family.add_suffixed("_sum", &[], 1.5);
        let mut out = String::new();
        family.write(&mut out);
        assert_eq!(
            out,
            "# HELP gantry_x_total An example.\n# TYPE gantry_x_total counter\ngantry_x_total{queue=\"a\\\"b\\\\c\"} 3\ngantry_x_total_sum 1.5\n"
        );
        assert_eq!(seconds(2_500).to_string(), "2.5");
        assert_eq!(seconds(1).to_string(), "0.001");
        assert_eq!(micros_as_seconds(250).to_string(), "0.00025");
    }
}
