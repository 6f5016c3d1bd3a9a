#!/usr/bin/env bash
# Tests helm/gantry/files/gantry-start.sh, the broker pods' start-up script,
# outside Kubernetes: pod names are faked and DNS names are replaced by
# loopback stand-ins (HOST_TEMPLATE, BIND_HOST, PORT_STRIDE), so no cluster
# and no /etc/hosts edits are needed. The script's dry-run mode (DRY_RUN=1)
# prints the `gantry serve` command line it would exec; this test compares
# those lines with the expected ones, under every POSIX shell it finds (dash
# is what the image's /bin/sh is).
#
#   bash helm/gantry/tests/start-script-test.sh
#
# The live three-node start-up (real `gantry serve` processes) is at the end,
# which runs only with GANTRY_LIVE_TEST=1 (scripts/test.sh sets it, after
# building the binary; scripts/check-chart.sh runs the rest before the build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
script=$here/../files/gantry-start.sh
scale_down=$here/../files/gantry-scale-down.sh
work=$(mktemp -d)
live_pids=() # broker processes of the live test; stopped by PID on any exit
stop_live_nodes() {
    local pid
    for pid in "${live_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${live_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    live_pids=()
}
trap 'stop_live_nodes; rm -rf "$work"' EXIT

shells=()
for candidate in dash "bash --posix" "busybox sh" posh mksh; do
    if command -v "${candidate%% *}" >/dev/null 2>&1; then
        shells+=("$candidate")
    fi
done
[[ ${#shells[@]} -gt 0 ]] || shells=(sh)

failures=0
checks=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}

# run_start SHELL VAR=VALUE... -- ARG...: runs the script in a clean
# environment under SHELL; prints its stdout, leaves its stderr in
# $work/stderr, and returns its exit status.
run_start() {
    local shell=$1
    shift
    local envs=()
    while [[ $# -gt 0 && $1 != -- ]]; do
        envs+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift
    local sh_cmd
    read -ra sh_cmd <<<"$shell"
    env -i PATH="$PATH" "${envs[@]}" "${sh_cmd[@]}" "$script" "$@" 2>"$work/stderr"
}

# expect_line NAME EXPECTED VAR=VALUE... [-- ARG...]
expect_line() {
    local name=$1 expected=$2 shell actual status
    shift 2
    for shell in "${shells[@]}"; do
        checks=$((checks + 1))
        status=0
        actual=$(run_start "$shell" DRY_RUN=1 "$@") || status=$?
        if [[ $status -ne 0 ]]; then
            fail "$name [$shell]: exit status $status: $(cat "$work/stderr")"
        elif [[ $actual != "$expected" ]]; then
            fail "$name [$shell]: wrong command line"
            echo "  expected: $expected" >&2
            echo "  actual:   $actual" >&2
        fi
    done
}

# expect_error NAME MESSAGE-FRAGMENT VAR=VALUE... [-- ARG...]
expect_error() {
    local name=$1 fragment=$2 shell status
    shift 2
    for shell in "${shells[@]}"; do
        checks=$((checks + 1))
        status=0
        run_start "$shell" DRY_RUN=1 "$@" >"$work/stdout" || status=$?
        if [[ $status -eq 0 ]]; then
            fail "$name [$shell]: accepted, printed: $(cat "$work/stdout")"
        elif ! grep -qF -- "$fragment" "$work/stderr"; then
            fail "$name [$shell]: exit status $status, but stderr lacks '$fragment': $(cat "$work/stderr")"
        elif [[ -s $work/stdout ]]; then
            fail "$name [$shell]: failed but still printed a command: $(cat "$work/stdout")"
        fi
    done
}

timing=(--heartbeat-interval 1s --session-ttl 10s --election-timeout 1s)

# --- Three copies on loopback: one host, ports 10 apart per ordinal (below
# the ephemeral range, which the suite's own connections draw from). ---
loopback=(POD_NAMESPACE=test STATEFULSET_NAME=gantry PEER_SERVICE=gantry-headless CLIENT_SERVICE=gantry
    BOOTSTRAP_SIZE=3 HOST_TEMPLATE=127.0.0.1 BIND_HOST=127.0.0.1 PORT_STRIDE=10
    CLIENT_PORT=26051 PEER_PORT=26052 METRICS_PORT=26464)
members=1=127.0.0.1:26052,2=127.0.0.1:26062,3=127.0.0.1:26072
expect_line "loopback gantry-0" \
    "gantry serve --node-id 1 --data-dir /tmp/g/node-0 --listen 127.0.0.1:26051 --peer-listen 127.0.0.1:26052 --advertise 127.0.0.1:26051 --peer-advertise 127.0.0.1:26052 --initial-cluster $members --metrics-listen 127.0.0.1:26464 --heartbeat-interval 1s --session-ttl 10s --election-timeout 1s" \
    "${loopback[@]}" POD_NAME=gantry-0 DATA_DIR=/tmp/g/node-0 -- "${timing[@]}"
expect_line "loopback gantry-1" \
    "gantry serve --node-id 2 --data-dir /tmp/g/node-1 --listen 127.0.0.1:26061 --peer-listen 127.0.0.1:26062 --advertise 127.0.0.1:26061 --peer-advertise 127.0.0.1:26062 --initial-cluster $members --metrics-listen 127.0.0.1:26474 --heartbeat-interval 1s --session-ttl 10s --election-timeout 1s" \
    "${loopback[@]}" POD_NAME=gantry-1 DATA_DIR=/tmp/g/node-1 -- "${timing[@]}"
expect_line "loopback gantry-2" \
    "gantry serve --node-id 3 --data-dir /tmp/g/node-2 --listen 127.0.0.1:26071 --peer-listen 127.0.0.1:26072 --advertise 127.0.0.1:26071 --peer-advertise 127.0.0.1:26072 --initial-cluster $members --metrics-listen 127.0.0.1:26484 --heartbeat-interval 1s --session-ttl 10s --election-timeout 1s" \
    "${loopback[@]}" POD_NAME=gantry-2 DATA_DIR=/tmp/g/node-2 -- "${timing[@]}"
# A fourth pod (scale-up) joins through a running node instead of bootstrapping.
expect_line "loopback gantry-3 joins" \
    "gantry serve --node-id 4 --data-dir /tmp/g/node-3 --listen 127.0.0.1:26081 --peer-listen 127.0.0.1:26082 --advertise 127.0.0.1:26081 --peer-advertise 127.0.0.1:26082 --join 127.0.0.1:26051 --metrics-listen 127.0.0.1:26494" \
    "${loopback[@]}" POD_NAME=gantry-3 DATA_DIR=/tmp/g/node-3 JOIN_ADDR=127.0.0.1:26051
# One loopback address per node instead of port offsets: 127.0.0.<id>.
expect_line "loopback address per node" \
    "gantry serve --node-id 2 --data-dir /data --listen 127.0.0.2:50051 --peer-listen 127.0.0.2:50052 --advertise 127.0.0.2:50051 --peer-advertise 127.0.0.2:50052 --initial-cluster 1=127.0.0.1:50052,2=127.0.0.2:50052,3=127.0.0.3:50052 --metrics-listen 127.0.0.2:9464" \
    POD_NAME=gantry-1 POD_NAMESPACE=test STATEFULSET_NAME=gantry PEER_SERVICE=gantry-headless BOOTSTRAP_SIZE=3 \
    'HOST_TEMPLATE=127.0.0.{id}' BIND_HOST=127.0.0.2

# --- Kubernetes names, as the chart sets them. ---
k8s=(POD_NAMESPACE=jobs STATEFULSET_NAME=gantry PEER_SERVICE=gantry-headless CLIENT_SERVICE=gantry BOOTSTRAP_SIZE=3)
fqdn='gantry-headless.jobs.svc.cluster.local'
k8s_members=1=gantry-0.$fqdn:50052,2=gantry-1.$fqdn:50052,3=gantry-2.$fqdn:50052
expect_line "kubernetes gantry-0" \
    "gantry serve --node-id 1 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise gantry-0.$fqdn:50051 --peer-advertise gantry-0.$fqdn:50052 --initial-cluster $k8s_members --metrics-listen 0.0.0.0:9464 --heartbeat-interval 1s --session-ttl 10s --election-timeout 1s" \
    "${k8s[@]}" POD_NAME=gantry-0 -- "${timing[@]}"
expect_line "kubernetes gantry-2" \
    "gantry serve --node-id 3 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise gantry-2.$fqdn:50051 --peer-advertise gantry-2.$fqdn:50052 --initial-cluster $k8s_members --metrics-listen 0.0.0.0:9464" \
    "${k8s[@]}" POD_NAME=gantry-2
expect_line "kubernetes gantry-4 (scale-up) joins the client Service" \
    "gantry serve --node-id 5 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise gantry-4.$fqdn:50051 --peer-advertise gantry-4.$fqdn:50052 --join gantry.jobs.svc.cluster.local:50051 --metrics-listen 0.0.0.0:9464" \
    "${k8s[@]}" POD_NAME=gantry-4
expect_line "a single-node cluster" \
    "gantry serve --node-id 1 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise solo-0.solo-headless.ns.svc.example.org:50051 --peer-advertise solo-0.solo-headless.ns.svc.example.org:50052 --initial-cluster 1=solo-0.solo-headless.ns.svc.example.org:50052 --metrics-listen 0.0.0.0:9464" \
    POD_NAME=solo-0 POD_NAMESPACE=ns STATEFULSET_NAME=solo PEER_SERVICE=solo-headless CLIENT_SERVICE=solo BOOTSTRAP_SIZE=1 CLUSTER_DOMAIN=example.org
# A release whose name has dashes and digits: only the last part is the ordinal.
expect_line "release name with dashes" \
    "gantry serve --node-id 2 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise my-gantry-2-1.my-gantry-2-headless.q.svc.cluster.local:50051 --peer-advertise my-gantry-2-1.my-gantry-2-headless.q.svc.cluster.local:50052 --initial-cluster 1=my-gantry-2-0.my-gantry-2-headless.q.svc.cluster.local:50052,2=my-gantry-2-1.my-gantry-2-headless.q.svc.cluster.local:50052,3=my-gantry-2-2.my-gantry-2-headless.q.svc.cluster.local:50052 --metrics-listen 0.0.0.0:9464" \
    POD_NAME=my-gantry-2-1 POD_NAMESPACE=q STATEFULSET_NAME=my-gantry-2 PEER_SERVICE=my-gantry-2-headless CLIENT_SERVICE=my-gantry-2 BOOTSTRAP_SIZE=3
# Arguments pass through untouched, after the identity flags; the dry run quotes them.
expect_line "TLS and token flags pass through" \
    "gantry serve --node-id 5 --data-dir /data --listen 0.0.0.0:50051 --peer-listen 0.0.0.0:50052 --advertise gantry-4.$fqdn:50051 --peer-advertise gantry-4.$fqdn:50052 --join gantry.jobs.svc.cluster.local:50051 --metrics-listen 0.0.0.0:9464 --tls-cert /etc/gantry/tls/tls.crt --token-file '/etc/gantry/my tokens' ''" \
    "${k8s[@]}" POD_NAME=gantry-4 -- --tls-cert /etc/gantry/tls/tls.crt --token-file "/etc/gantry/my tokens" ""

# --- Without DRY_RUN the script execs the broker with exactly those arguments. ---
cat >"$work/fake-gantry" <<'EOF'
#!/bin/sh
for arg in "$@"; do printf '[%s]' "$arg"; done
echo
EOF
chmod +x "$work/fake-gantry"
for shell in "${shells[@]}"; do
    checks=$((checks + 1))
    status=0
    actual=$(run_start "$shell" "${k8s[@]}" POD_NAME=gantry-1 GANTRY_BIN="$work/fake-gantry" -- --token-file "/a b") || status=$?
    expected="[serve][--node-id][2][--data-dir][/data][--listen][0.0.0.0:50051][--peer-listen][0.0.0.0:50052][--advertise][gantry-1.$fqdn:50051][--peer-advertise][gantry-1.$fqdn:50052][--initial-cluster][$k8s_members][--metrics-listen][0.0.0.0:9464][--token-file][/a b]"
    if [[ $status -ne 0 || $actual != "$expected" ]]; then
        fail "exec [$shell]: status $status, argv $actual, expected $expected; stderr: $(cat "$work/stderr")"
    elif ! grep -qF "gantry-start: node 2 (gantry-1): $work/fake-gantry serve --node-id 2" "$work/stderr"; then
        fail "exec [$shell]: the command was not logged on stderr: $(cat "$work/stderr")"
    fi
done

# --- Unexpected input fails with a message that says what is wrong. ---
expect_error "no POD_NAME" "POD_NAME is not set" "${k8s[@]}"
expect_error "pod of another StatefulSet" "POD_NAME 'other-0' is not 'gantry-<ordinal>'" "${k8s[@]}" POD_NAME=other-0
expect_error "name without ordinal" "POD_NAME 'gantry' is not 'gantry-<ordinal>'" "${k8s[@]}" POD_NAME=gantry
expect_error "empty ordinal" "POD_NAME 'gantry-': '' is not an ordinal" "${k8s[@]}" POD_NAME=gantry-
expect_error "ordinal not a number" "POD_NAME 'gantry-x': 'x' is not an ordinal" "${k8s[@]}" POD_NAME=gantry-x
expect_error "ordinal with a leading zero" "'01' is not an ordinal" "${k8s[@]}" POD_NAME=gantry-01
expect_error "name with an extra part" "'abc-1' is not an ordinal" "${k8s[@]}" POD_NAME=gantry-abc-1
expect_error "negative-looking ordinal" "'-1' is not an ordinal" "${k8s[@]}" POD_NAME=gantry--1
expect_error "absurd ordinal" "'99999999999999999999' is not an ordinal" "${k8s[@]}" POD_NAME=gantry-99999999999999999999
expect_error "no BOOTSTRAP_SIZE" "BOOTSTRAP_SIZE is not set" POD_NAME=gantry-0 POD_NAMESPACE=jobs STATEFULSET_NAME=gantry PEER_SERVICE=gantry-headless
expect_error "BOOTSTRAP_SIZE 0" "BOOTSTRAP_SIZE '0' is not a number of at least 1" "${k8s[@]}" POD_NAME=gantry-0 BOOTSTRAP_SIZE=0
expect_error "BOOTSTRAP_SIZE not a number" "BOOTSTRAP_SIZE 'three'" "${k8s[@]}" POD_NAME=gantry-0 BOOTSTRAP_SIZE=three
expect_error "bad port" "port '5005x' is not a port number" "${k8s[@]}" POD_NAME=gantry-0 PEER_PORT=5005x
expect_error "port offset beyond 65535" "is beyond 65535" "${loopback[@]}" POD_NAME=gantry-1 CLIENT_PORT=65530
expect_error "member port beyond 65535" "is beyond 65535" "${loopback[@]}" POD_NAME=gantry-0 PORT_STRIDE=20000
expect_error "scale-up pod without a join address" "CLIENT_SERVICE (or JOIN_ADDR) is not set" \
    POD_NAME=gantry-3 POD_NAMESPACE=jobs STATEFULSET_NAME=gantry PEER_SERVICE=gantry-headless BOOTSTRAP_SIZE=3

# --- the scale-down hook script, with a stand-in gantry ----------------------
# The stand-in logs its arguments and GANTRY_TOKEN and succeeds.
cat >"$work/fake-gantry" <<'FAKE'
#!/bin/sh
echo "args: $* token: ${GANTRY_TOKEN:-none}" >>"$FAKE_LOG"
FAKE
chmod +x "$work/fake-gantry"
printf '# tokens\nproducer-token-00001 producer\n  admin   admin-token-000000001  # ops\n' >"$work/tokens"
for shell in "${shells[@]}"; do
    read -ra sh_cmd <<<"$shell"
    checks=$((checks + 1))
    rm -f "$work/fake.log"
    if env -i PATH="$PATH" REPLICAS=3 CLIENT_ADDR=svc:50051 GANTRY_BIN="$work/fake-gantry" FAKE_LOG="$work/fake.log" \
        TOKEN_FILE="$work/tokens" "${sh_cmd[@]}" "$scale_down" --tls-ca /ca.crt 2>"$work/stderr"; then
        expected="args: cluster remove-node --above 3 --addr svc:50051 --tls-ca /ca.crt token: admin-token-000000001"
        [[ $(tail -n1 "$work/fake.log") == "$expected" ]] ||
            fail "scale-down [$shell]: ran '$(tail -n1 "$work/fake.log")', expected '$expected'"
    else
        fail "scale-down [$shell]: failed: $(cat "$work/stderr")"
    fi
    for bad in "REPLICAS=x|REPLICAS must be a positive integer" "REPLICAS=0|REPLICAS must be a positive integer" \
        "CLIENT_ADDR=|CLIENT_ADDR is required"; do
        checks=$((checks + 1))
        setting=${bad%%|*}
        if env -i PATH="$PATH" REPLICAS=3 CLIENT_ADDR=svc:50051 GANTRY_BIN="$work/fake-gantry" FAKE_LOG=/dev/null \
            "$setting" "${sh_cmd[@]}" "$scale_down" 2>"$work/stderr"; then
            fail "scale-down [$shell]: accepted $setting"
        elif ! grep -qF "${bad#*|}" "$work/stderr"; then
            fail "scale-down [$shell]: $setting refused without saying '${bad#*|}': $(cat "$work/stderr")"
        fi
    done
    checks=$((checks + 1))
    printf 'producer-token-00001 producer\n' >"$work/no-admin"
    if env -i PATH="$PATH" REPLICAS=3 CLIENT_ADDR=svc:50051 GANTRY_BIN="$work/fake-gantry" FAKE_LOG=/dev/null \
        TOKEN_FILE="$work/no-admin" "${sh_cmd[@]}" "$scale_down" 2>"$work/stderr" ||
        ! grep -q "no token with the admin role" "$work/stderr"; then
        fail "scale-down [$shell]: a token file without an admin token was not refused clearly"
    fi
done

# --- live three-node start-up ------------------------------------------------
# With GANTRY_LIVE_TEST=1 (scripts/test.sh, after the build): starts
# gantry-0..2 through the script on loopback exactly as the dry runs above
# print them, waits (bounded) until
#   gantry cluster status --addr 127.0.0.1:26051 --json
# reports a leader and voters [1,2,3], then starts gantry-3 with
# JOIN_ADDR=127.0.0.1:26051, waits until it is a voter too, prints the
# status and stops every node by its PID.
live_cluster_test() {
    local gantry=${GANTRY_BIN:-$here/../../../target/debug/gantry}
    local ordinal deadline status
    [[ -x $gantry ]] || {
        fail "live test: no gantry binary at $gantry (cargo build -p gantry-broker --bin gantry)"
        return
    }
    gantry=$(cd "$(dirname "$gantry")" && pwd)/$(basename "$gantry")
    # cluster_has VOTERS: the status JSON names a leader and exactly these voters.
    cluster_has() {
        "$gantry" cluster status --addr 127.0.0.1:26051 --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)["shards"][0]
sys.exit(0 if s["leader_id"] and sorted(s["voters"]) == [int(v) for v in sys.argv[1].split(",")] else 1)
' "$1" 2>/dev/null
    }
    # wait_for VOTERS SECONDS
    wait_for() {
        deadline=$((SECONDS + $2))
        until cluster_has "$1"; do
            if ((SECONDS >= deadline)); then
                fail "live test: no leader with voters [$1] after $2 s; logs:"
                tail -n 20 "$work"/node-*.log >&2 || true
                return 1
            fi
            sleep 0.5
        done
    }
    # The ports are fixed (the dry runs print them) and below Linux's
    # ephemeral range (32768-60999), so no outgoing connection of the tests
    # before this one holds them; a server of theirs still closing might:
    # wait (bounded) until all can be bound.
    local busy deadline_ports=$((SECONDS + 30))
    until busy=$(python3 - <<'PY'
import socket
for port in (26051, 26052, 26464, 26061, 26062, 26474, 26071, 26072, 26484, 26081, 26082, 26494):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        print(port)
        raise SystemExit(1)
    finally:
        s.close()
PY
    ); do
        if ((SECONDS >= deadline_ports)); then
            fail "live test: port $busy on 127.0.0.1 still in use after 30 s"
            return
        fi
        sleep 0.5
    done
    for ordinal in 0 1 2; do
        env -i PATH="$PATH" "${loopback[@]}" POD_NAME="gantry-$ordinal" DATA_DIR="$work/node-$ordinal" \
            GANTRY_BIN="$gantry" sh "$script" "${timing[@]}" >"$work/node-$ordinal.log" 2>&1 &
        live_pids+=($!)
    done
    status=0
    wait_for 1,2,3 60 || status=1
    if [[ $status -eq 0 ]]; then
        env -i PATH="$PATH" "${loopback[@]}" POD_NAME=gantry-3 DATA_DIR="$work/node-3" JOIN_ADDR=127.0.0.1:26051 \
            GANTRY_BIN="$gantry" sh "$script" "${timing[@]}" >"$work/node-3.log" 2>&1 &
        live_pids+=($!)
        # The joined node may stay a learner until it has caught up.
        wait_for 1,2,3,4 60 || status=1
    fi
    # Scaling back down to 3: the chart's pre-upgrade hook script removes
    # node 4 (an id above the new replica count); run again, it is a no-op.
    if [[ $status -eq 0 ]]; then
        for round in first again; do
            if ! env -i PATH="$PATH" REPLICAS=3 CLIENT_ADDR=127.0.0.1:26051 GANTRY_BIN="$gantry" ATTEMPTS=5 \
                sh "$scale_down" >"$work/scale-down-$round.log" 2>&1; then
                fail "live test: the scale-down script failed ($round run):"
                cat "$work/scale-down-$round.log" >&2
                status=1
                break
            fi
        done
        [[ $status -eq 0 ]] && { wait_for 1,2,3 60 || status=1; }
        grep -q "removed node 4" "$work/scale-down-first.log" || { fail "live test: node 4 was not removed"; status=1; }
        grep -q "nothing to remove" "$work/scale-down-again.log" || { fail "live test: the second run removed something"; status=1; }
    fi
    [[ $status -eq 0 ]] && "$gantry" cluster status --addr 127.0.0.1:26051 || true
    stop_live_nodes
    checks=$((checks + 1))
    [[ $status -eq 0 ]] && echo "live three-node start-up: ok (a fourth node joined, then the scale-down hook removed it)"
}
if [[ ${GANTRY_LIVE_TEST:-0} == 1 ]]; then
    live_cluster_test
fi
# --- end of the live start-up ----------------------------------------------------

if [[ $failures -gt 0 ]]; then
    echo "start-script-test: $failures of $checks checks FAILED (shells: ${shells[*]})" >&2
    exit 1
fi
echo "start-script-test: all $checks checks passed (shells: ${shells[*]})"
