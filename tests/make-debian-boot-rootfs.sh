#!/bin/sh
# Makes a bootable Debian bookworm root filesystem for the boot tests: minbase with the cloud
# kernel (linux-image-cloud-amd64, its initramfs made by initramfs-tools), systemd as init and
# udev; no boot loader (amidala writes that). The kernel's package is kept in apt's archive
# directory, so a test build can reinstall it with dpkg and no network. Needs root and
# debootstrap; takes two to four minutes.
# Usage: tests/make-debian-boot-rootfs.sh DEST [MIRROR]   (DEST must not exist)
set -eu
dest=${1:?usage: $0 DEST [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
[ ! -e "$dest" ] || { echo "$0: $dest exists" >&2; exit 1; }
tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
debootstrap --variant=minbase --include=linux-image-cloud-amd64,systemd-sysv,udev,initramfs-tools \
    bookworm "$tmp" "$mirror" >&2
echo amidala-boot > "$tmp/etc/hostname"
# The login prompt on the serial console is the boot test's signal; no password is set.
find "$tmp/var/cache/apt/archives" -name '*.deb' ! -name 'linux-image-*' -delete
rm -rf "$tmp/var/lib/apt/lists/"*
[ -e "$tmp/boot/vmlinuz-"* ] && ls "$tmp/boot/initrd.img-"* >/dev/null
mv "$tmp" "$dest"
trap - EXIT
