#!/bin/sh
# Makes a bootable Debian bookworm root filesystem for the boot tests: minbase with the cloud
# kernel (linux-image-cloud-amd64, its initramfs made by initramfs-tools), systemd as init and
# udev; no boot loader (amidala writes that). The kernel's package is kept in apt's archive
# directory, so a test build can reinstall it with dpkg and no network; so are Debian's GRUB
# packages (grub-pc and what it needs, not installed) in /var/cache/amidala-grub, for the test
# of a build that installs GRUB and runs update-grub. Needs root and debootstrap; takes two
# to four minutes.
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
# GRUB's packages downloaded (with the lists and the resolver debootstrap left), not installed.
chroot "$tmp" apt-get update -qq >&2
chroot "$tmp" apt-get install -y -qq --no-install-recommends --download-only \
    -o Dir::Cache::Archives=/var/cache/amidala-grub grub-pc >&2
rm -rf "$tmp/var/cache/amidala-grub/partial" "$tmp/var/cache/amidala-grub/lock"
ls "$tmp/var/cache/amidala-grub/grub-pc_"*.deb >/dev/null
# The login prompt on the serial console is the boot test's signal; no password is set.
find "$tmp/var/cache/apt/archives" -name '*.deb' ! -name 'linux-image-*' -delete
rm -rf "$tmp/var/lib/apt/lists/"*
[ -e "$tmp/boot/vmlinuz-"* ] && ls "$tmp/boot/initrd.img-"* >/dev/null
mv "$tmp" "$dest"
trap - EXIT
