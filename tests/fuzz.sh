#!/bin/sh
# Fuzzes the frame decoder and request parser (tests/fuzz) for SECONDS (default 60), with
# cargo-fuzz on the stable toolchain (no sanitizer: Rust's own checks and the target's
# assertions catch what they catch). Installs cargo-fuzz if it is missing.
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-60}
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --version 0.13.2
fi
cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none frames -- -max_total_time="$seconds"
