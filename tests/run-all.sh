#!/bin/bash
# Runs every test of amidala: unit tests, and the end-to-end tests that drive the real daemon
# and client over the socket with loop devices, mounts and namespaces. Needs root (the
# end-to-end tests fail, never skip, without it). Installs missing packages first. Ends with
# the totals of all test binaries: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "$0: the tests need root (loop devices, mounts, namespaces): run it with sudo" >&2
    exit 1
fi
tests/install-deps.sh
. tests/find-cargo.sh
# The end-to-end tests run the binaries and the plugins, so build them all first.
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast --workspace --lib --bins --tests 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
