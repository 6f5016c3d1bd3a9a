# syntax=docker/dockerfile:1
# The Gantry image: `gantry` (the broker and its CLI) and the example worker
# `echo_worker`, running as uid/gid 65532 with its data in /data.
#
#   docker build -t gantry:0.1.0 .
#   docker run --rm -p 50051:50051 -v gantry-data:/data gantry:0.1.0
#
# The runtime is debian:bookworm-slim rather than distroless because the Helm
# chart (helm/gantry) starts brokers through a small POSIX sh script (pod name
# -> node id, DNS names -> addresses); glibc and ca-certificates come with it.
# Without a registry (this project's workplace), scripts/build-image-offline.sh
# builds it from locally made base images and checks it.

FROM rust:1-bookworm AS build
WORKDIR /src
# .dockerignore keeps target/, data dirs, .git and the chart out of the context.
COPY . .
# --locked builds exactly Cargo.lock. The protos are compiled by protox (pure
# Rust): no protoc. BuildKit cache mounts keep the registry and target/
# between builds; the binaries are copied out of target/ because the mount is
# gone after this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p gantry-broker --bin gantry \
    && cargo build --release --locked -p gantry-worker --example echo_worker \
    && install -D -m 0755 target/release/gantry /out/gantry \
    && install -D -m 0755 target/release/examples/echo_worker /out/echo_worker

FROM debian:bookworm-slim
# ca-certificates: for the CLI and workers dialing TLS endpoints signed by a
# public CA. Unpinned on purpose: the point is the current CA list.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 gantry \
    && useradd --system --uid 65532 --gid 65532 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin gantry \
    && install -d -o 65532 -g 65532 -m 0750 /data
COPY --from=build /out/gantry /out/echo_worker /usr/local/bin/

LABEL org.opencontainers.image.title="gantry" \
      org.opencontainers.image.description="Gantry: a replicated job broker (broker, CLI and example worker)" \
      org.opencontainers.image.licenses="Apache-2.0"

# What `gantry serve` reads when no flag says otherwise (every flag is also
# GANTRY_<NAME>): in a container, listen on every interface and keep data in
# the volume. Flags win, so the chart's start-up script is unaffected.
ENV GANTRY_DATA_DIR=/data \
    GANTRY_LISTEN=0.0.0.0:50051 \
    GANTRY_PEER_LISTEN=0.0.0.0:50052 \
    GANTRY_METRICS_LISTEN=0.0.0.0:9464

USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
# 50051 clients and workers (gRPC), 50052 peers (Raft, forwarded calls),
# 9464 metrics (/metrics, /healthz, /readyz).
EXPOSE 50051 50052 9464
ENTRYPOINT ["gantry"]
CMD ["serve"]
