#!/usr/bin/env bash
# Builds the Dockerfile where no container registry is reachable (this
# workplace reaches Debian's packages, crates.io, PyPI and npm only), then
# checks the image it made.
#
# The two base images the Dockerfile names are made locally instead of
# pulled: debian:bookworm-slim from Debian's packages (mmdebstrap), and
# rust:1-bookworm from that plus this machine's stable Rust toolchain (the
# layout of the official image: /usr/local/cargo, /usr/local/rustup). The
# build runs under podman with chroot isolation: no daemon, and no OCI
# runtime, which cannot set rlimits in this sandbox. The check runs the
# image's own root filesystem (exported, then chroot as the image's user):
# `gantry serve` with the image's defaults, the CLI against it, and the
# example worker finishing a job.
#
#   scripts/build-image-offline.sh [TAG]     (default gantry:dev)
#
# Needs root (chroot, podman). Installs podman and mmdebstrap from Debian if
# missing. Takes a release build (about 10 minutes on 2 cores) the first
# time; podman's layer and cache mounts make later runs faster.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-gantry:dev}
work=$(mktemp -d /tmp/gantry-image.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*"; }
die() {
    printf 'build-image-offline: FAILED: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) == 0 ]] || die "run as root (chroot and podman need it)"
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null; then
    say "installing podman and mmdebstrap (Debian)"
    apt-get install -y -q podman mmdebstrap >/dev/null || die "apt-get install podman mmdebstrap"
fi
build() { podman build --isolation chroot --pull=never "$@"; }
# Short names (FROM rust:1-bookworm) resolve to localhost/ or docker.io/
# depending on registries.conf: tag both.
tag_both() { podman tag "$1" "localhost/${1#docker.io/library/}"; }

debian=docker.io/library/debian:bookworm-slim
if ! podman image exists "$debian"; then
    say "making $debian from Debian's packages"
    mmdebstrap --quiet --variant=minbase bookworm "$work/bookworm.tar" http://deb.debian.org/debian ||
        die "mmdebstrap bookworm"
    podman import --quiet "$work/bookworm.tar" "$debian" >/dev/null || die "podman import"
    rm -f "$work/bookworm.tar"
fi
tag_both "$debian"

rust=docker.io/library/rust:1-bookworm
if ! podman image exists "$rust"; then
    toolchain=$(rustup toolchain list | awk '/^stable/ {print $1; exit}')
    [[ -n $toolchain ]] || die "no stable Rust toolchain on this machine"
    say "making $rust from $debian and the toolchain $toolchain"
    mkdir -p "$work/rust/rustup/toolchains" "$work/rust/cargo/bin"
    cp -a "$HOME/.rustup/toolchains/$toolchain" "$work/rust/rustup/toolchains/"
    for tool in cargo rustc rustup; do cp -a "$(command -v "$tool")" "$work/rust/cargo/bin/"; done
    # Local CAs of this machine (e.g. a TLS-inspecting egress proxy): the
    # builder fetches crates through the same network.
    mkdir -p "$work/rust/local-ca"
    cp /usr/local/share/ca-certificates/*.crt "$work/rust/local-ca/" 2>/dev/null || true
    cat >"$work/rust/Containerfile" <<EOF
FROM $debian
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\
    && rm -rf /var/lib/apt/lists/*
COPY local-ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN rustup default $toolchain && cargo --version
EOF
    build --quiet -t "$rust" "$work/rust" >/dev/null || die "building the $rust stand-in"
    rm -rf "$work/rust"
fi
tag_both "$rust"

say "building $tag from ./Dockerfile"
build -t "$tag" . || die "podman build"

say "checking the image"
user=$(podman image inspect --format '{{.Config.User}}' "$tag")
[[ $user == 65532:65532 ]] || die "the image runs as '$user', not 65532:65532"
podman image inspect --format '{{.Config.Entrypoint}} {{.Config.Cmd}}' "$tag" | grep -q 'gantry.*serve' ||
    die "entrypoint/cmd is not gantry serve"
root=$work/rootfs
# Traversable by the image's user: it is the chroot's "/".
mkdir -m 0755 "$root"
container=$(podman create "$tag")
podman export "$container" | tar -x -C "$root" -f - || die "exporting the image's filesystem"
podman rm "$container" >/dev/null
[[ $(stat -c %u "$root/data") == 65532 ]] || die "/data is not owned by 65532"
in_image() { chroot --userspec=65532:65532 "$root" env -i HOME=/data PATH=/usr/local/bin:/usr/bin:/bin "$@"; }
in_image /usr/local/bin/gantry --version || die "gantry does not run in the image"

# The image's settings (the GANTRY_* of its ENV), with ports moved off the
# usual ones so a broker on this machine does not clash.
base=$((40000 + RANDOM % 20000))
addr=127.0.0.1:$base
chroot --userspec=65532:65532 "$root" env -i HOME=/data \
    GANTRY_DATA_DIR=/data GANTRY_LISTEN="$addr" GANTRY_PEER_LISTEN="127.0.0.1:$((base + 1))" \
    GANTRY_METRICS_LISTEN="127.0.0.1:$((base + 2))" /usr/local/bin/gantry serve >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    in_image /usr/local/bin/gantry cluster status --addr "$addr" >/dev/null 2>&1 && break
    sleep 0.2
done
in_image /usr/local/bin/gantry cluster status --addr "$addr" || { cat "$work/serve.log" >&2; die "gantry serve in the image"; }
job=$(in_image /usr/local/bin/gantry enqueue image-check "hello from the image" --addr "$addr" | head -n1)
[[ -n $job ]] || die "enqueue"
chroot --userspec=65532:65532 "$root" env -i GANTRY_ADDR="$addr" /usr/local/bin/echo_worker image-check \
    >"$work/worker.log" 2>&1 &
pids+=($!)
# Exits 0 once the job is terminal, 2 if it is not within the timeout.
done_job=$(in_image /usr/local/bin/gantry job wait "$job" --timeout 60s --addr "$addr" --json) ||
    { cat "$work/worker.log" >&2; die "the example worker did not finish $job"; }
grep -q '"state": "SUCCEEDED"' <<<"$done_job" || die "job $job: $done_job"
[[ -f $root/data/FORMAT ]] || die "the broker kept no data in /data"
say "build-image-offline: $tag built; gantry serve, the CLI and echo_worker ran from it as 65532"
