#!/bin/bash
# amidala's benchmarks: installs what they need (tests/install-deps.sh: the tests'
# prerequisites, xfsprogs among them), builds the workspace in release mode and runs amidala-bench
# (tests/src/bin/bench.rs), which prints medians of several runs and a table of the results
# against their targets. Needs root (loop devices, mounts). Arguments go to amidala-bench:
#   tests/bench.sh [--runs N] [--requests N] [--only SECTION,...] [--skip SECTION,...]
# (sections: local ec2 concurrent first-output daemon isolation boot; `tests/bench.sh --help` lists them).
# Exits 0 when it measured everything, whether the targets are met or not.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "$0: the benchmarks need root (loop devices, mounts, namespaces): run it with sudo" >&2
    exit 1
fi
tests/install-deps.sh
. tests/find-cargo.sh
cargo build --release --workspace
target=${CARGO_TARGET_DIR:-target}
exec "$target/release/amidala-bench" "$@"
