#!/bin/sh
# Makes a small arm64 root tree that boots, for the test of arm64 bootable disks on any
# builder: Debian bookworm's arm64 cloud kernel (linux-image-cloud-arm64, from its package,
# unpacked, never run) and an initramfs of a statically linked arm64 busybox whose /init says
# `amidala-arm64-init: up on MACHINE` on the console and powers the machine off. The tree's
# /bin/sh is that busybox (an arm64 ELF). Nothing of it runs on the host: the packages are
# downloaded with apt (the arm64 architecture added to dpkg) and unpacked with dpkg-deb.
# Needs root, cpio and gzip; takes well under a minute.
# Usage: tests/make-arm64-boot-tree.sh DEST   (DEST must not exist)
set -eu
dest=${1:?usage: $0 DEST}
[ ! -e "$dest" ] || { echo "$0: $dest exists" >&2; exit 1; }
tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/debs" "$tmp/kernel" "$tmp/busybox"
dpkg --print-foreign-architectures | grep -qx arm64 || {
    dpkg --add-architecture arm64
    apt-get update -qq
}
kernel=$(apt-cache depends linux-image-cloud-arm64:arm64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
[ -n "$kernel" ] || { echo "$0: no kernel package for linux-image-cloud-arm64:arm64" >&2; exit 1; }
(cd "$tmp/debs" && apt-get download -q -o APT::Sandbox::User=root "$kernel" busybox-static:arm64 >&2)
dpkg-deb -x "$tmp"/debs/linux-image-*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/debs/busybox-static_*.deb "$tmp/busybox"
version=$(ls "$tmp/kernel/boot" | sed -n 's/^vmlinuz-//p' | head -n1)

tree="$tmp/tree"
mkdir -p "$tree/boot" "$tree/bin" "$tree/etc" "$tree/dev" "$tree/proc" "$tree/sys" "$tree/tmp"
cp "$tmp/kernel/boot/vmlinuz-$version" "$tmp/kernel/boot/config-$version" "$tree/boot/"
cp "$tmp/busybox/bin/busybox" "$tree/bin/busybox"
ln -s busybox "$tree/bin/sh"
echo amidala-arm64 > "$tree/etc/hostname"
printf 'PRETTY_NAME="amidala arm64 test tree"\nID=amidala-test\n' > "$tree/etc/os-release"

# The initramfs: busybox as /init's shell, the console node the kernel opens for it.
init="$tmp/initramfs"
mkdir -p "$init/bin" "$init/dev" "$init/proc"
cp "$tmp/busybox/bin/busybox" "$init/bin/busybox"
mknod "$init/dev/console" c 5 1
cat > "$init/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "amidala-arm64-init: up on $(/bin/busybox uname -m)"
/bin/busybox poweroff -f
INIT
chmod 755 "$init/init"
(cd "$init" && find . | cpio --quiet -o -H newc | gzip -9) > "$tree/boot/initrd.img-$version"

file_machine=$(od -An -tx1 -j 18 -N 2 "$tree/bin/busybox" | tr -d ' ')
[ "$file_machine" = b700 ] || { echo "$0: busybox is not an arm64 ELF ($file_machine)" >&2; exit 1; }
mv "$tree" "$dest"
trap - EXIT
rm -rf "$tmp"
