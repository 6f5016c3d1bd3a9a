#!/usr/bin/env bash
# How long rebuilding one replica of a shard takes: a three-node cluster on
# loopback (release build, fresh data dirs), N queued jobs (default 1 M,
# 256 bytes each), then `gantry cluster rebuild` of a follower's copy, timed
# until that node's copy is no longer fenced and has applied the leader's
# commit index. Also the time for a node whose raft log was lost (moved
# aside while it was stopped) to be whole again.
#
#   scripts/bench-rebuild.sh [JOBS]
# Env: GANTRY_BIN (default target/release/gantry), BASE_PORT (default 50600).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-1000000}
BIN=${GANTRY_BIN:-target/release/gantry}
[ -x "$BIN" ] || cargo build --release -p gantry-broker --bin gantry
ROOT=$(mktemp -d /tmp/gantry-rebuild-bench.XXXXXX)
BASE=${BASE_PORT:-50600}
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
    --data-dir "$ROOT/n$i" --initial-cluster "$INITIAL" >>"$ROOT/n$i.log" 2>&1 &
  PIDS[i]=$!
}
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$ROOT"; }
trap cleanup EXIT
for i in 1 2 3; do start_node "$i"; done
status() { "$BIN" cluster status --addr "$1" --json "${@:2}" 2>/dev/null; }
field() { python3 -c "import json,sys; s=json.load(sys.stdin)['shards'][0]; print(s['$1'])"; }
wait_leader() {
  for _ in $(seq 1 600); do
    l=$(status "$ALL" | field leader_id || true)
    [[ -n "$l" && "$l" != 0 ]] && { echo "$l"; return 0; }
    sleep 0.1
  done
  echo "no leader" >&2; tail -n 20 "$ROOT"/n*.log >&2; exit 1
}
LEADER=$(wait_leader)
VICTIM=$(( LEADER % 3 + 1 ))
echo "== $JOBS jobs of 256 bytes into one shard (leader node $LEADER)" >&2
"$BIN" bench --addr "$ALL" --scenario enqueue --jobs "$JOBS" --batch 100 --in-flight 16 --payload-bytes 256 -q
COMMIT=$(status "${ADDRS[$LEADER]}" | field commit_index)
# Whole again: not fenced, and applied at least what the leader had committed.
wait_whole() {
  local node=$1 t0=$2
  for _ in $(seq 1 6000); do
    s=$(status "${ADDRS[$node]}" --local || true)
    if [[ -n "$s" ]] && python3 -c "
import json,sys; s=json.loads(sys.argv[1])['shards'][0]
sys.exit(0 if not s['fenced'] and s['applied_index'] >= int(sys.argv[2]) else 1)" "$s" "$COMMIT"; then
      echo "$(( ($(date +%s%N) - t0) / 1000000 ))"
      return 0
    fi
    sleep 0.1
  done
  echo "node $node not whole after 10 minutes" >&2; tail -n 30 "$ROOT/n$node.log" >&2; exit 1
}
echo "== rebuild node $VICTIM's copy (gantry cluster rebuild), commit index $COMMIT" >&2
T0=$(date +%s%N)
"$BIN" cluster rebuild --addr "${ADDRS[$LEADER]}" --node "$VICTIM" --shard 0 >/dev/null
MS=$(wait_whole "$VICTIM" "$T0")
RSS=$(awk '/VmRSS/ {print $2}' "/proc/${PIDS[$VICTIM]}/status")
SNAP=$(du -b "$ROOT/n$LEADER/snapshots/0/"snapshot-v2.bin 2>/dev/null | cut -f1 || echo "?")
echo "rebuild of a replica holding $JOBS jobs: ${MS} ms until whole (leader's snapshot ${SNAP} bytes; rebuilt node RSS ${RSS} kB)"

echo "== node $VICTIM stopped, its raft log lost (moved aside), started again" >&2
kill -9 "${PIDS[$VICTIM]}"; wait "${PIDS[$VICTIM]}" 2>/dev/null || true
mv "$ROOT/n$VICTIM/raft" "$ROOT/n$VICTIM/raft.lost"
T0=$(date +%s%N)
start_node "$VICTIM"
MS=$(wait_whole "$VICTIM" "$T0")
echo "raft log lost on a replica holding $JOBS jobs: ${MS} ms from start until whole"
grep -h "storage check at start-up" "$ROOT/n$VICTIM.log" | tail -n 3 | cut -c1-300 >&2
