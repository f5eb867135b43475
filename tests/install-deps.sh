#!/bin/sh
# Installs what amidala's tests and demo need on a Debian machine that has Rust: the tools the
# daemon calls (mkfs.ext4, from e2fsprogs), the ones the tests use (sfdisk, mount, losetup,
# tar, xz), and busybox-static for the test root filesystem. Needs root; installs only what is
# missing.
set -eu
missing=
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need sfdisk fdisk
need losetup mount
need mount mount
need tar tar
need xz xz-utils
# The test root filesystem needs a statically linked busybox.
if ! command -v busybox >/dev/null 2>&1 || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    missing="$missing busybox-static"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "$0: missing packages:$missing; run as root to install them" >&2
        exit 1
    fi
    echo "installing:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
