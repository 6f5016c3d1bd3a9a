#!/usr/bin/env bash
# Measures the broker's RSS with N queued jobs and its restart time (SIGKILL,
# then start until it answers ClusterStatus), on a fresh data dir.
# Usage: scripts/bench-memory-restart.sh [jobs=1000000] [payload-bytes=256]
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-1000000}
PAYLOAD=${2:-256}
BIN=${GANTRY_BIN:-target/release/gantry}
[ -x "$BIN" ] || cargo build --release -p gantry-broker
DIR=$(mktemp -d /tmp/gantry-rss.XXXXXX)
PORT=${PORT:-50400}
ADDR=127.0.0.1:$PORT
"$BIN" serve --listen "$ADDR" --data-dir "$DIR/data" >"$DIR/serve.log" 2>&1 &
PID=$!
trap 'kill -9 $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
wait_up() { for _ in $(seq 1 6000); do "$BIN" cluster status --addr "$ADDR" >/dev/null 2>&1 && return 0; sleep 0.01; done; echo "broker did not come up" >&2; exit 1; }
wait_up
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "idle RSS: $(( $(rss_kib $PID) / 1024 )) MiB"
"$BIN" bench --addr "$ADDR" --scenario enqueue --jobs "$JOBS" --payload-bytes "$PAYLOAD" \
    --batch 100 --in-flight 16 --queue rss --keep-jobs -q
sleep 2
echo "RSS with $JOBS queued ${PAYLOAD}-byte jobs: $(( $(rss_kib $PID) / 1024 )) MiB"
echo "data dir: $(du -sh "$DIR/data" | cut -f1)"
echo "snapshots written before the kill: $(grep -c 'snapshot written' "$DIR/serve.log" || true)"
kill -9 $PID
wait $PID 2>/dev/null || true
START=$(date +%s%N)
"$BIN" serve --listen "$ADDR" --data-dir "$DIR/data" >>"$DIR/serve.log" 2>&1 &
PID=$!
wait_up
END=$(date +%s%N)
echo "restart after SIGKILL until serving: $(( (END - START) / 1000000 )) ms"
"$BIN" queues --addr "$ADDR" | grep -E "QUEUE|^rss "
echo "RSS after restart: $(( $(rss_kib $PID) / 1024 )) MiB"
