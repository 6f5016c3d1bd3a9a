#!/bin/sh
# Runs before `helm upgrade` (and rollback) changes the StatefulSet: removes
# from the Raft membership every node whose pod the new replica count drops
# (node id = ordinal + 1, so: every id above REPLICAS), highest first, one
# committed membership change at a time. Without it the dropped pods would
# stay voters that never answer: the cluster would count a quorum over
# nodes that no longer exist, and lose it at the next failure.
# Scaling up or keeping the size removes nothing.
#
# Inputs (environment; the chart's hook Job sets them, a test can too):
#   REPLICAS        required: the replica count being applied
#   CLIENT_ADDR     required: host:port of the client Service
#   TOKEN_FILE      optional: the broker's token file; an admin token is
#                   taken from it (lines `<token> <role>`, either order)
#   GANTRY_BIN      default gantry
#   ATTEMPTS        tries to reach the cluster, 2 s apart (default 30)
# Arguments are passed to the CLI (TLS flags).
set -eu

die() {
    echo "gantry-scale-down: $*" >&2
    exit 1
}

[ -n "${REPLICAS:-}" ] || die "REPLICAS is required"
[ -n "${CLIENT_ADDR:-}" ] || die "CLIENT_ADDR is required"
case $REPLICAS in
    '' | *[!0-9]* | 0) die "REPLICAS must be a positive integer, not '$REPLICAS'" ;;
esac
bin=${GANTRY_BIN:-gantry}
attempts=${ATTEMPTS:-30}

if [ -n "${TOKEN_FILE:-}" ]; then
    token=$(sed 's/#.*//' "$TOKEN_FILE" | awk '
        NF == 2 && $2 == "admin" { print $1; exit }
        NF == 2 && $1 == "admin" { print $2; exit }')
    [ -n "$token" ] || die "$TOKEN_FILE has no token with the admin role (RemoveNode needs one)"
    GANTRY_TOKEN=$token
    export GANTRY_TOKEN
fi

# The cluster may be busy with the upgrade's other changes: retry reaching it.
n=0
until "$bin" cluster status --addr "$CLIENT_ADDR" "$@" >/dev/null; do
    n=$((n + 1))
    [ "$n" -lt "$attempts" ] ||
        die "cannot reach the cluster at $CLIENT_ADDR to remove nodes above $REPLICAS; fix that, or upgrade with cluster.removeNodesOnScaleDown=false and run 'gantry cluster remove-node --above $REPLICAS' yourself"
    sleep 2
done
exec "$bin" cluster remove-node --above "$REPLICAS" --addr "$CLIENT_ADDR" "$@"
