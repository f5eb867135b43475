# Sourced by tests/run-all.sh and examples/bake-local.sh: makes `cargo` available when they run
# under sudo, whose PATH hides a rustup installation in the invoking user's home.
if ! command -v cargo >/dev/null 2>&1 && [ -n "${SUDO_USER:-}" ]; then
    sudo_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    if [ -x "$sudo_home/.cargo/bin/cargo" ]; then
        PATH="$sudo_home/.cargo/bin:$PATH"
        RUSTUP_HOME=${RUSTUP_HOME:-$sudo_home/.rustup}
        export PATH RUSTUP_HOME
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
fi
