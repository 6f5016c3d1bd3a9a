#!/usr/bin/env bash
# Starts a throw-away three-node nats-server cluster with JetStream (file
# storage, fresh temp dirs, 127.0.0.1:4222/4223/4224, routes on 6222-6224),
# runs nats-bench against it (connected to node 1; the cluster routes) with
# stream replicas 3, then stops the servers
# (by PID) and removes their stores.
#
#   bench/nats/run-cluster.sh [--server /path/to/nats-server] [-- nats-bench args...]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
server="$(command -v nats-server || echo /usr/sbin/nats-server)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-natsbench}"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bench="$CARGO_TARGET_DIR/release/nats-bench"

root="$(mktemp -d /tmp/nats-cluster-bench.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$root"
}
trap cleanup EXIT
routes="nats-route://127.0.0.1:6222,nats-route://127.0.0.1:6223,nats-route://127.0.0.1:6224"
for i in 0 1 2; do
  mkdir -p "$root/n$i"
  cat > "$root/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((4222 + i))
jetstream { store_dir: "$root/n$i" }
cluster {
  name: bench
  listen: 127.0.0.1:$((6222 + i))
  routes: [$routes]
}
CONF
  "$server" -c "$root/n$i.conf" > "$root/n$i.log" 2>&1 &
  pids+=($!)
done
# JetStream is usable once the meta group has a leader.
for _ in $(seq 1 200); do
  if grep -qh "JetStream cluster new metadata leader\|Self is new JetStream cluster metadata leader" "$root"/n*.log 2>/dev/null; then break; fi
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { cat "$root"/n*.log >&2; exit 1; }; done
  sleep 0.1
done
echo "== $("$server" --version): three nodes (pids ${pids[*]}), replicas 3" >&2
timeout 900 "$bench" --url nats://127.0.0.1:4222 \
  --server-pid "${pids[0]}" --replicas 3 "$@"
