#!/usr/bin/env bash
# Builds the previous release (tests/compat/previous-release) from its own
# copy of the sources with its own target directory, both cached under
# ${GANTRY_PREVIOUS_CACHE:-~/.cache/gantry/previous}, and prints the path of
# its `gantry` binary. There is no release download here: the previous
# release is built from the pinned commit, once per machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "build-previous: $*" >&2; }
die() { say "$*"; exit 1; }

pinned=$(grep -v '^#' "$root/tests/compat/previous-release" | grep -v '^\s*$' | head -1)
[ -n "$pinned" ] || die "no commit in tests/compat/previous-release"
commit=$(git -C "$root" rev-parse --verify --quiet "$pinned^{commit}") ||
    die "commit $pinned (tests/compat/previous-release) is not in this clone: fetch the full history (git fetch --unshallow)"
cache=${GANTRY_PREVIOUS_CACHE:-$HOME/.cache/gantry/previous}
bin="$cache/$commit/gantry"
if [ -x "$bin" ]; then
    echo "$bin"
    exit 0
fi
src="$cache/$commit/src"
say "building the previous release $commit in $src (once; cached)"
rm -rf "$src"
mkdir -p "$src"
git -C "$root" archive "$commit" | tar -x -C "$src"
(cd "$src" && CARGO_TARGET_DIR="$cache/target" cargo build --locked --quiet -p gantry-broker --bin gantry) >&2 ||
    die "cargo build of $commit failed"
cp "$cache/target/debug/gantry" "$bin.tmp"
mv "$bin.tmp" "$bin"
# Only the binary is kept: the build tree is gigabytes a later run never reads.
rm -rf "$cache/target" "$src"
echo "$bin"
