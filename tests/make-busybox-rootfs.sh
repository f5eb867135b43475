#!/bin/sh
# Makes a minimal root filesystem tree from Debian's busybox-static, for amidala's tests and
# the README demo: amidala base import DEST.
# Usage: tests/make-busybox-rootfs.sh DEST   (DEST must not exist)
set -eu
dest=${1:?usage: $0 DEST}
busybox=$(command -v busybox || true)
if [ -z "$busybox" ]; then
    echo "$0: busybox not found: apt-get install busybox-static" >&2
    exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
    echo "$0: $busybox is dynamically linked: apt-get install busybox-static" >&2
    exit 1
fi
[ ! -e "$dest" ] || { echo "$0: $dest exists" >&2; exit 1; }
tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
cd "$tmp"
mkdir -p bin sbin usr/bin usr/sbin etc root tmp var/tmp proc sys dev var/lib/dpkg/info
# An empty package database: busybox's dpkg applet installs .deb files into it.
: > var/lib/dpkg/status
chmod 1777 tmp var/tmp
chmod 700 root
cp "$busybox" bin/busybox
for applet in $(bin/busybox --list-full); do
    [ -e "$applet" ] || ln -s /bin/busybox "$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > etc/passwd
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' > etc/group
printf 'amidala-busybox\n' > etc/hostname
# The image's own resolver configuration: a build swaps in the host's and must restore this.
printf '# resolv.conf of the busybox test image\nnameserver 192.0.2.53\n' > etc/resolv.conf
printf 'NAME="amidala busybox"\nID=busybox\n' > etc/os-release
cd - >/dev/null
mv "$tmp" "$dest"
trap - EXIT
