#!/usr/bin/env bash
# Benchmarks a three-node Gantry cluster on loopback (release build, fresh
# data dirs): end-to-end throughput, latency at a fixed rate, and failover
# (leader SIGKILL -> first acknowledged enqueue; dead worker -> its job
# reassigned). Every node fsyncs before acknowledging.
#
#   scripts/bench-cluster.sh [e2e|latency|consume|failover|all]  (default all)
# Env: GANTRY_BIN (default target/release/gantry), ECHO_WORKER_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
BIN=${GANTRY_BIN:-target/release/gantry}
ECHO=${ECHO_WORKER_BIN:-$(dirname "$BIN")/examples/echo_worker}
[ -x "$BIN" ] || cargo build --release -p gantry-broker --bin gantry
[ -x "$ECHO" ] || cargo build --release -p gantry-worker --example echo_worker
ROOT=$(mktemp -d /tmp/gantry-cluster-bench.XXXXXX)
BASE=${BASE_PORT:-50500}
declare -a PIDS ADDRS
INITIAL=""
for i in 1 2 3; do
  ADDRS[i]=127.0.0.1:$((BASE + 10 * (i - 1)))
  INITIAL+="${INITIAL:+,}$i=127.0.0.1:$((BASE + 10 * (i - 1) + 1))"
done
ALL="${ADDRS[1]},${ADDRS[2]},${ADDRS[3]}"
start_node() {
  local i=$1
  "$BIN" serve --node-id "$i" --listen "${ADDRS[$i]}" --peer-listen "127.0.0.1:$((BASE + 10 * (i - 1) + 1))" \
    --metrics-listen "127.0.0.1:$((BASE + 10 * (i - 1) + 2))" \
    --data-dir "$ROOT/n$i" --initial-cluster "$INITIAL" "${EXTRA[@]}" >>"$ROOT/n$i.log" 2>&1 &
  PIDS[i]=$!
}
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; if [[ -n "${KEEP:-}" ]]; then echo "kept $ROOT" >&2; else rm -rf "$ROOT"; fi; }
trap cleanup EXIT
read -ra EXTRA <<<"${GANTRY_SERVE_ARGS:-}"
for i in 1 2 3; do start_node "$i"; done
leader_id() { "$BIN" cluster status --addr "$ALL" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["shards"][0]["leader_id"])'; }
wait_leader() {
  for _ in $(seq 1 600); do
    l=$(leader_id || true)
    [[ -n "$l" && "$l" != 0 ]] && { echo "$l"; return 0; }
    sleep 0.1
  done
  echo "no leader" >&2; tail -n 20 "$ROOT"/n*.log >&2; exit 1
}
LEADER=$(wait_leader)
# A new cluster starts at format 0 and its leaders raise it within seconds:
# measure at the format the binary runs in production.
for _ in $(seq 1 100); do
  "$BIN" cluster upgrade status --addr "$ALL" --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["shards"] and all(x["format"] == s["newest_format"] for x in s["shards"]) else 1)' && break
  sleep 0.2
done
echo "== gantry $("$BIN" --version | cut -d' ' -f2): three nodes at $ALL, leader node $LEADER" >&2

if [[ $WHAT == all || $WHAT == e2e ]]; then
  echo "== end to end, EnqueueBatch of 100, 8 workers x 128" >&2
  "$BIN" bench --addr "$ALL" --scenario e2e --jobs 200000 --batch 100 --in-flight 16 --workers 8 --worker-concurrency 128 -q
  echo "== end to end, one call per job, SDK coalescing (4096 in flight), 8 workers x 128" >&2
  "$BIN" bench --addr "$ALL" --scenario e2e --jobs 200000 --coalesce 512 --in-flight 4096 --workers 8 --worker-concurrency 128 -q
  echo "== consume: a backlog of 200000 (EnqueueBatch of 100), then 8 workers x 128 empty it" >&2
  "$BIN" bench --addr "$ALL" --scenario consume --jobs 200000 --batch 100 --in-flight 16 --workers 8 --worker-concurrency 128 -q
  echo "== enqueue only, EnqueueBatch of 100" >&2
  "$BIN" bench --addr "$ALL" --scenario enqueue --jobs 200000 --batch 100 --in-flight 16 -q
  echo "== enqueue only, SDK coalescing (4096 in flight)" >&2
  "$BIN" bench --addr "$ALL" --scenario enqueue --jobs 200000 --coalesce 512 --in-flight 4096 -q
fi
if [[ $WHAT == consume ]]; then
  echo "== consume: a backlog of 200000 (EnqueueBatch of 100), then 4 workers x 128 empty it" >&2
  "$BIN" bench --addr "$ALL" --scenario consume --jobs 200000 --batch 100 --in-flight 16 --workers 4 --worker-concurrency 128 -q
fi
# CPU ticks (utime+stime) and context switches (voluntary+involuntary) of
# the three nodes, all threads: "ticks switches".
node_usage() {
  local ticks=0 switches=0 pid t v n
  for pid in "${PIDS[@]}"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    v=0 n=0
    # Each thread counts its own switches (a thread that exited takes its
    # count along: the blocking pool's come and go).
    for task in /proc/"$pid"/task/*; do
      v=$((v + $(awk '/^voluntary_ctxt_switches/ {print $2}' "$task/status" 2>/dev/null || echo 0)))
      n=$((n + $(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$task/status" 2>/dev/null || echo 0)))
    done
    ticks=$((ticks + t)); switches=$((switches + v + n))
  done
  echo "$ticks $switches"
}
if [[ $WHAT == all || $WHAT == latency ]]; then
  RATE=${RATE:-2000}
  echo "== latency at $RATE jobs/s for 10 s" >&2
  read -r T0 S0 <<<"$(node_usage)"
  /usr/bin/time -o "$ROOT/bench.time" -f "%U %S %w %c" \
    "$BIN" bench --addr "$ALL" --scenario latency --rate "$RATE" --duration 10s -q
  read -r T1 S1 <<<"$(node_usage)"
  read -r BU BS BW BC <"$ROOT/bench.time"
  HZ=$(getconf CLK_TCK)
  python3 - "$T0" "$T1" "$S0" "$S1" "$HZ" "$BU" "$BS" "$BW" "$BC" "$RATE" <<'PY'
import sys
t0, t1, s0, s1, hz = (int(x) for x in sys.argv[1:6])
bu, bs = float(sys.argv[6]), float(sys.argv[7])
bw, bc, rate = int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10])
jobs = rate * 10
nodes_cpu = (t1 - t0) / hz
print(f"cpu per job: nodes {nodes_cpu / jobs * 1e6:.0f} us, bench {(bu + bs) / jobs * 1e6:.0f} us, "
      f"all {(nodes_cpu + bu + bs) / jobs * 1e6:.0f} us; context switches per job: nodes {(s1 - s0) / jobs:.1f}, "
      f"bench {(bw + bc) / jobs:.1f}")
PY
  # Where a commit's time goes, per node (the leader's commit line is the one that counts).
  for i in 1 2 3; do
    curl -s "http://127.0.0.1:$((BASE + 10 * (i - 1) + 2))/metrics" | python3 -c '
import sys, re
sums, counts, streams = {}, {}, {}
for line in sys.stdin:
    m = re.match(r"(gantry_raft_(?:commit|log_sync)_seconds)_(sum|count)\{shard=\"0\"\} (\S+)", line)
    if m:
        (sums if m.group(2) == "sum" else counts)[m.group(1)] = float(m.group(3))
    m = re.match(r"gantry_raft_append_streams_total\{shard=\"0\",outcome=\"(\w+)\"\} (\S+)", line)
    if m:
        streams[m.group(1)] = int(float(m.group(2)))
parts = [f"{k[12:-8]} mean {sums[k] / counts[k] * 1000:.2f} ms over {int(counts[k])}" for k in sorted(sums) if counts.get(k)]
print(f"node '"$i"': " + "; ".join(parts) + (f"; streams {streams}" if streams else ""))'
  done
fi
if [[ $WHAT == all || $WHAT == failover ]]; then
  LEADER=$(wait_leader)
  echo "== failover: 1000 jobs/s for 20 s, leader (node $LEADER) SIGKILLed 6 s in" >&2
  "$BIN" bench --addr "$ALL" --scenario latency --rate 1000 --duration 20s --max-errors 1000000 -q --json > "$ROOT/failover.json" &
  BENCH=$!
  sleep 6
  kill -9 "${PIDS[$LEADER]}"
  wait "$BENCH" || true
  python3 - "$ROOT/failover.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["scenarios"][0]
print(f"leader SIGKILL -> first acknowledged enqueue: longest gap between acks {r['longest_ack_gap_ms']:.0f} ms "
      f"(at {r['longest_ack_gap_at_s']:.1f} s); {r['jobs']} acked, {r['errors']} errors {r.get('error_kinds', {})}, lost {r['lost']}")
PY
  NEW=$(wait_leader)
  start_node "$LEADER"
  echo "   new leader: node $NEW; node $LEADER restarted" >&2

  echo "== dead worker -> its job reassigned (session ttl ${SESSION_TTL:-10s})" >&2
  Q=failover-worker-$RANDOM
  GANTRY_ADDR=$ALL GANTRY_WORKER_ID=victim ECHO_DELAY_MS=600000 "$ECHO" $Q >"$ROOT/victim.log" 2>&1 &
  VICTIM=$!
  JOB=$("$BIN" enqueue --addr "$ALL" "$Q" payload | head -n 1)
  for _ in $(seq 1 200); do
    "$BIN" job get --addr "$ALL" "$JOB" --json | grep -q '"state": *"ACTIVE"' && break
    sleep 0.05
  done
  GANTRY_ADDR=$ALL GANTRY_WORKER_ID=rescuer ECHO_DELAY_MS=0 "$ECHO" $Q >"$ROOT/rescuer.log" 2>&1 &
  RESCUER=$!
  T0=$(date +%s%N)
  kill -9 "$VICTIM"
  "$BIN" job wait --addr "$ALL" --timeout 60s "$JOB" >/dev/null
  T1=$(date +%s%N)
  echo "worker SIGKILL -> job SUCCEEDED on another worker: $(( (T1 - T0) / 1000000 )) ms"
  kill "$RESCUER" 2>/dev/null || true
fi
