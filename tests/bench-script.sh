#!/bin/bash
# The baseline of tests/bench.sh: a no-op "build" by hand, the fewest steps that do what
# `amidala build -- true` does on the local provider. Copies SNAPSHOT to a volume file in
# WORKDIR, attaches it to a loop device, mounts it, runs `true` chrooted in it, unmounts,
# detaches, copies the volume to OUT (the new snapshot) and deletes the volume. With --sync,
# also fsyncs both copies, as amidala does. Needs root.
# Usage: tests/bench-script.sh [--sync] SNAPSHOT WORKDIR OUT
set -euo pipefail
sync=
if [ "${1:-}" = --sync ]; then
    sync=1
    shift
fi
snapshot=${1:?usage: $0 [--sync] SNAPSHOT WORKDIR OUT}
work=${2:?usage: $0 [--sync] SNAPSHOT WORKDIR OUT}
out=${3:?usage: $0 [--sync] SNAPSHOT WORKDIR OUT}
volume=$work/volume.img
mnt=$work/mnt
dev=
mounted=
# On failure, undo what was done.
cleanup() {
    [ -z "$mounted" ] || umount "$mnt" || umount -l "$mnt"
    [ -z "$dev" ] || losetup -d "$dev"
    rm -f "$volume"
}
trap cleanup EXIT
mkdir -p "$mnt"

cp --reflink=auto --sparse=always "$snapshot" "$volume"
[ -z "$sync" ] || sync "$volume"
dev=$(losetup -f --show "$volume")
mount "$dev" "$mnt"
mounted=1
chroot "$mnt" true
umount "$mnt"
mounted=
losetup -d "$dev"
dev=
cp --reflink=auto --sparse=always "$volume" "$out"
[ -z "$sync" ] || sync "$out"
rm "$volume"
