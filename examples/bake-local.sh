#!/bin/sh
# The whole bake on this machine with the local provider: builds amidala, starts amidalad on a
# scratch state directory, imports a bootable Debian base, bakes an image from examples/hello
# and boot-tests it in QEMU, prints the image id and its disk image, and stops the daemon. Needs root (for the daemon).
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ "$(id -u)" != 0 ]; then
    echo "$0: amidalad needs root: run it with sudo" >&2
    exit 1
fi
tests/install-deps.sh --demo
. tests/find-cargo.sh
cargo build --workspace
bin=${CARGO_TARGET_DIR:-$repo/target}/debug

scratch=$(mktemp -d /tmp/amidala-demo.XXXXXX)
chmod 755 "$scratch"
mkdir -m 755 "$scratch/plugins"
install -m 644 "$bin/libamidala_shell.so" "$bin/libamidala_chef.so" "$bin/libamidala_ansible.so" "$scratch/plugins/"
export AMIDALA_SOCKET="$scratch/amidala.sock"

"$bin/amidalad" --config /dev/null --state-dir "$scratch/state" --socket "$AMIDALA_SOCKET" \
    --plugin-dir "$scratch/plugins" 2>"$scratch/amidalad.log" &
daemon=$!
stop_daemon() {
    if kill -0 "$daemon" 2>/dev/null; then
        kill -TERM "$daemon"
        wait "$daemon" || true
    fi
}
trap stop_daemon EXIT
i=0
until [ -S "$AMIDALA_SOCKET" ]; do
    i=$((i + 1))
    if [ $i -gt 100 ] || ! kill -0 "$daemon" 2>/dev/null; then
        echo "$0: amidalad did not start:" >&2
        cat "$scratch/amidalad.log" >&2
        exit 1
    fi
    sleep 0.1
done

# A Debian tree with a kernel (made once by tests/install-deps.sh, kept outside the checkout):
# it becomes a bootable disk (GPT, GRUB for legacy BIOS and UEFI).
tree=${AMIDALA_DEBIAN_BOOT_ROOTFS:-/var/cache/amidala-tests/debian-bookworm-boot}
echo "==> importing $tree as a bootable base snapshot"
"$bin/amidala" base import "$tree"

echo "==> checking the spec of examples/hello (amidala.toml)"
cd examples/hello
"$bin/amidala" validate

echo "==> baking examples/hello, and boot-testing the image in QEMU (legacy BIOS and UEFI)"
result=$("$bin/amidala" build --json --boot-test)
image=$(printf '%s\n' "$result" | sed -n 's/.*"image_id": "\(.*\)".*/\1/p')
disk=$(printf '%s\n' "$result" | sed -n 's/.*"snapshot_path": "\(.*\)".*/\1/p')
stop_daemon
trap - EXIT

echo
echo "image:      $image"
echo "disk image: $disk"
echo "boot test:  passed (a build whose image does not boot fails, and registers nothing)"
echo "look inside: mount -o loop,ro,offset=$((66 << 20)) $disk /mnt && cat /mnt/etc/motd; umount /mnt"
echo "boot it:    qemu-system-x86_64 -m 1024 -nographic -drive file=$disk,format=raw,snapshot=on"
echo "daemon log: $scratch/amidalad.log (remove $scratch when done)"
