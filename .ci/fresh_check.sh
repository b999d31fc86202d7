#!/usr/bin/env bash
# What a new user does, checked: clone HEAD into an empty folder, empty pip cache, then exactly the README's two
# commands (`make demo`, `make test`). `make fresh-check` runs it; FRESH_DEMO_ARGS=--quick shortens the demo.
# The clone sits beside a link to this checkout's ../shared, so the parity tests find their files as in CI.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/albef-fresh.XXXXXX")
echo "fresh-check: clone of $(git -C "$repo" rev-parse --short HEAD) in $work/albef, pip cache $work/pip-cache"
git clone -q "$repo" "$work/albef"
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
export PIP_CACHE_DIR="$work/pip-cache"
cd "$work/albef"
t0=$(date +%s)
make demo DEMO_ARGS="${FRESH_DEMO_ARGS:-}"
t1=$(date +%s)
make test
t2=$(date +%s)
echo "fresh-check passed: make demo $((t1 - t0)) s (install included), make test $((t2 - t1)) s; removing $work"
rm -rf "$work"
