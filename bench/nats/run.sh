#!/usr/bin/env bash
# Starts a throw-away nats-server (127.0.0.1:4222, JetStream, file storage in a
# fresh temp dir), runs nats-bench against it, then stops that server (by PID)
# and removes its store.
#
#   bench/nats/run.sh [--server /path/to/nats-server] [--sync-always] [--runs N] [-- nats-bench args...]
#
# --sync-always writes a config file with `jetstream { sync_interval: always }`
# (fsync after every message); nats-server 2.9.x rejects it ("unknown field"),
# it exists from 2.10.0 on.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
server="$(command -v nats-server || echo /usr/sbin/nats-server)"
sync_always=0
runs=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --sync-always) sync_always=1; shift ;;
    --runs) runs="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-natsbench}"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bench="$CARGO_TARGET_DIR/release/nats-bench"

for run in $(seq 1 "$runs"); do
  store="$(mktemp -d /tmp/nats-js-bench.XXXXXX)"
  if [[ $sync_always == 1 ]]; then
    conf="$store.conf"
    printf 'listen: 127.0.0.1:4222\njetstream {\n  store_dir: "%s"\n  sync_interval: always\n}\n' "$store" > "$conf"
    "$server" -c "$conf" > "$store.log" 2>&1 &
  else
    "$server" -a 127.0.0.1 -p 4222 -js -sd "$store" > "$store.log" 2>&1 &
  fi
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    if grep -q "Server is ready" "$store.log" 2>/dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$store.log" >&2; exit 1; fi
    sleep 0.1
  done
  echo "== run $run/$runs: $("$server" --version) (pid $pid, store $store, sync_always=$sync_always)" >&2
  status=0
  timeout 900 "$bench" --url nats://127.0.0.1:4222 --server-pid "$pid" "$@" || status=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  trap - EXIT
  rm -rf "$store" "$store.conf" "$store.log"
  [[ $status == 0 ]] || exit "$status"
done
