#!/usr/bin/env bash
# Lints every .proto under proto/ with buf: the STANDARD rules, with the
# exceptions the gantry.v1 contract needs listed (and explained) in
# proto/buf.yaml. Installs a pinned buf from the npm registry on first use
# (@bufbuild/buf ships the binary), into a cache outside the repository.
# Set BUF=/path/to/buf to use another one.
#
# Then `buf breaking` against the previous release (tests/compat/
# previous-release): gantry.v1 must stay compatible on the wire and in JSON
# (clients in every language, grpcurl), the peer and storage protos on the
# wire (old and new brokers side by side, data directories of every format).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
BUF_DIR=${BUF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gantry/buf-$BUF_VERSION}
BUF=${BUF:-$BUF_DIR/node_modules/.bin/buf}

if [ ! -x "$BUF" ]; then
    command -v npm >/dev/null 2>&1 || { echo "installing buf needs npm (apt-get install -y npm)" >&2; exit 1; }
    echo "installing buf $BUF_VERSION (npm: @bufbuild/buf) into $BUF_DIR" >&2
    npm install --prefix "$BUF_DIR" --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >&2
    [ -x "$BUF" ] || { echo "buf is still missing at $BUF after npm install" >&2; exit 1; }
fi

"$BUF" lint proto
echo "buf lint: $(find proto -name '*.proto' | wc -l) proto files clean"

previous=$(grep -v '^#' tests/compat/previous-release | grep -v '^\s*$' | head -1)
git cat-file -e "$previous^{commit}" 2>/dev/null ||
    { echo "the previous release $previous is not in this clone: fetch the full history" >&2; exit 1; }
against="../.git#ref=$previous,subdir=proto"
(cd proto && "$BUF" breaking --against "$against" --path gantry/v1 \
    --config '{"version":"v2","breaking":{"use":["WIRE_JSON"]}}')
(cd proto && "$BUF" breaking --against "$against" --path gantry/peer --path gantry/storage \
    --config '{"version":"v2","breaking":{"use":["WIRE"]}}')
echo "buf breaking: compatible with ${previous:0:12} (gantry.v1 wire + JSON; peer, storage wire)"
