#!/bin/sh
# Starts one broker pod of the Gantry StatefulSet. It works out the pod's
# identity and then execs `gantry serve`:
#   - node id: the pod's ordinal + 1 (node ids start at 1), taken from
#     POD_NAME (`<statefulset>-<ordinal>`);
#   - advertised addresses: the pod's DNS name under the headless Service;
#   - pods with ordinal < BOOTSTRAP_SIZE get --initial-cluster, built from
#     the DNS names of the first BOOTSTRAP_SIZE pods (the *initial* size,
#     never the current replica count, so scaling does not change the pod
#     template); later pods (scale-up) get --join <client Service> and add
#     themselves with AddNode. The broker ignores both once its data dir
#     holds state.
# Arguments are appended to `gantry serve` (timing, TLS and token flags).
#
# Inputs (environment; the chart sets them, a test can too):
#   POD_NAME, POD_NAMESPACE         required (downward API)
#   STATEFULSET_NAME, PEER_SERVICE  required (headless Service)
#   CLIENT_SERVICE                  required unless JOIN_ADDR is set
#   BOOTSTRAP_SIZE                  required: number of voters of a new cluster
#   CLUSTER_DOMAIN                  default cluster.local
#   CLIENT_PORT, PEER_PORT, METRICS_PORT   default 50051, 50052, 9464
#   DATA_DIR                        default /data
#   BIND_HOST                       default 0.0.0.0
#   HOST_TEMPLATE   how a pod's host name is made; tokens {pod} {ordinal}
#                   {id} {service} {namespace} {domain}; default
#                   {pod}.{service}.{namespace}.svc.{domain}
#   PORT_STRIDE     pod <ordinal> uses every port + ordinal*PORT_STRIDE
#                   (default 0). With HOST_TEMPLATE=127.0.0.1, BIND_HOST=
#                   127.0.0.1 and PORT_STRIDE=10, copies run side by side on
#                   loopback without /etc/hosts edits.
#   JOIN_ADDR       default {CLIENT_SERVICE}.{namespace}.svc.{domain}:CLIENT_PORT
#   GANTRY_BIN      default gantry
#   DRY_RUN=1       print the command line instead of running it
# Apart from GANTRY_BIN (there is no --bin flag), none of these starts with
# GANTRY_ on purpose: the broker reads every GANTRY_<FLAG> variable itself.
set -eu

die() {
    echo "gantry-start: $*" >&2
    exit 64
}

# is_uint VALUE: VALUE is 1 to 6 decimal digits without a leading zero.
is_uint() {
    case $1 in
        '' | *[!0-9]* | 0?* | ???????*) return 1 ;;
    esac
}

# replace TEXT FROM TO: every FROM in TEXT becomes TO (no sed needed).
replace() {
    rest=$1 out=''
    while :; do
        case $rest in
            *"$2"*)
                out=$out${rest%%"$2"*}$3
                rest=${rest#*"$2"}
                ;;
            *) break ;;
        esac
    done
    printf '%s' "$out$rest"
}

pod=${POD_NAME:?POD_NAME is not set (downward API metadata.name)}
namespace=${POD_NAMESPACE:?POD_NAMESPACE is not set (downward API metadata.namespace)}
sts=${STATEFULSET_NAME:?STATEFULSET_NAME is not set}
service=${PEER_SERVICE:?PEER_SERVICE (the headless Service) is not set}
bootstrap=${BOOTSTRAP_SIZE:?BOOTSTRAP_SIZE is not set}
domain=${CLUSTER_DOMAIN:-cluster.local}
client_port=${CLIENT_PORT:-50051}
peer_port=${PEER_PORT:-50052}
metrics_port=${METRICS_PORT:-9464}
stride=${PORT_STRIDE:-0}
bind=${BIND_HOST:-0.0.0.0}
template=${HOST_TEMPLATE:-'{pod}.{service}.{namespace}.svc.{domain}'}

case $pod in
    "$sts"-*) ordinal=${pod#"$sts"-} ;;
    *) die "POD_NAME '$pod' is not '$sts-<ordinal>': cannot tell this pod's node id (is STATEFULSET_NAME right?)" ;;
esac
is_uint "$ordinal" || die "POD_NAME '$pod': '$ordinal' is not an ordinal (expected '$sts-0', '$sts-1', ...)"
is_uint "$bootstrap" && [ "$bootstrap" -ge 1 ] || die "BOOTSTRAP_SIZE '$bootstrap' is not a number of at least 1"
for value in "$client_port" "$peer_port" "$metrics_port"; do
    is_uint "$value" && [ "$value" -ge 1 ] && [ "$value" -le 65535 ] || die "port '$value' is not a port number"
done
is_uint "$stride" || die "PORT_STRIDE '$stride' is not a number"

# host ORDINAL: the DNS name (or stand-in) of the pod with that ordinal.
host() {
    h=$(replace "$template" '{pod}' "$sts-$1")
    h=$(replace "$h" '{ordinal}' "$1")
    h=$(replace "$h" '{id}' "$(($1 + 1))")
    h=$(replace "$h" '{service}' "$service")
    h=$(replace "$h" '{namespace}' "$namespace")
    replace "$h" '{domain}' "$domain"
}

# port BASE ORDINAL: the port the pod with that ordinal uses for BASE.
# Call it only in an assignment, so that `set -e` sees a failure.
port() {
    p=$(($1 + $2 * stride))
    [ "$p" -le 65535 ] || die "port $1 + $2 * PORT_STRIDE $stride is beyond 65535"
    echo "$p"
}

id=$((ordinal + 1))
self=$(host "$ordinal")
my_client_port=$(port "$client_port" "$ordinal")
my_peer_port=$(port "$peer_port" "$ordinal")
my_metrics_port=$(port "$metrics_port" "$ordinal")
if [ "$ordinal" -lt "$bootstrap" ]; then
    cluster_flag=--initial-cluster cluster='' i=0
    while [ "$i" -lt "$bootstrap" ]; do
        member_port=$(port "$peer_port" "$i")
        cluster=$cluster${cluster:+,}$((i + 1))=$(host "$i"):$member_port
        i=$((i + 1))
    done
else
    cluster_flag=--join
    cluster=${JOIN_ADDR:-${CLIENT_SERVICE:?CLIENT_SERVICE (or JOIN_ADDR) is not set}.$namespace.svc.$domain:$client_port}
fi

# The script's own arguments (timing, TLS, token flags) go last.
set -- --node-id "$id" \
    --data-dir "${DATA_DIR:-/data}" \
    --listen "$bind:$my_client_port" \
    --peer-listen "$bind:$my_peer_port" \
    --advertise "$self:$my_client_port" \
    --peer-advertise "$self:$my_peer_port" \
    "$cluster_flag" "$cluster" \
    --metrics-listen "$bind:$my_metrics_port" \
    "$@"
bin=${GANTRY_BIN:-gantry}

if [ "${DRY_RUN:-0}" = 1 ]; then
    # One line, each argument shell-quoted if it needs it.
    line="$bin serve"
    for arg in "$@"; do
        case $arg in
            '' | *[!A-Za-z0-9_./:=,@%+-]*) arg="'$(replace "$arg" "'" "'\\''")'" ;;
        esac
        line="$line $arg"
    done
    printf '%s\n' "$line"
    exit 0
fi
echo "gantry-start: node $id ($pod): $bin serve $*" >&2
exec "$bin" serve "$@"
