#!/bin/sh
# Makes a Debian bookworm minbase root filesystem with ansible-core, for the ansible
# provisioner's tests. Needs root and debootstrap; takes about a minute on a good connection.
# Usage: tests/make-debian-rootfs.sh DEST [MIRROR]   (DEST must not exist)
set -eu
dest=${1:?usage: $0 DEST [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
[ ! -e "$dest" ] || { echo "$0: $dest exists" >&2; exit 1; }
tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
# python3-cffi-backend: ansible-core needs it through a virtual package debootstrap cannot resolve.
debootstrap --variant=minbase --include=ansible-core,python3-cffi-backend bookworm "$tmp" "$mirror" >&2
# A known resolver configuration: the tests check it is restored after a build.
printf '# resolv.conf of the debian test image\nnameserver 192.0.2.53\n' > "$tmp/etc/resolv.conf"
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*
mv "$tmp" "$dest"
trap - EXIT
