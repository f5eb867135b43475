#!/bin/sh
# Installs what amidala's tests and demo need on a Debian machine that has Rust: what amidalad
# builds with (libseccomp-dev), the tools it calls (mkfs.ext4, from e2fsprogs), the ones the
# tests use (sfdisk, sgdisk, mkfs.xfs, mount, losetup, tar, xz, systemd-analyze and systemd-socket-activate, ssh
# and sshd, gcc and a static libc for tests/escape-probe.c), busybox-static for the test root
# filesystem, GRUB's images (grub-pc-bin, grub-efi-amd64-bin, and grub-efi-arm64-bin, of arm64
# through multiarch on x86), mtools, QEMU and OVMF (and QEMU's arm64 machine with AAVMF) for
# bootable disks and their boot test, a small arm64 tree that boots in
# $AMIDALA_ARM64_BOOT_TREE, by default /var/cache/amidala-tests/arm64-boot, qemu-img (qemu-utils) for qcow2 imports, a bootable Debian rootfs (cloud kernel, systemd) in
# $AMIDALA_DEBIAN_BOOT_ROOTFS, by default /var/cache/amidala-tests/debian-bookworm-boot, and a
# Python venv with moto server (the EC2 API emulator of the ec2 tests) in
# $AMIDALA_MOTO_VENV, by default /var/cache/amidala-tests/moto-venv, and a Debian rootfs with
# ansible-core for the ansible tests in $AMIDALA_DEBIAN_ROOTFS, by default
# /var/cache/amidala-tests/debian-bookworm-ansible, both outside the checkout and kept between
# runs. With --demo, only what examples/bake-local.sh needs. The Debian package (tests/build-deb.sh, and
# its test, tests/tests/package.rs) needs cargo-deb, pinned, installed with cargo if missing,
# and dpkg-dev (dpkg-shlibdeps) and binutils (strip); with --deb, only those and
# libseccomp-dev. Needs root; installs only what is missing.
set -eu
mode=${1:-}
missing=
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need sfdisk fdisk
need losetup mount
need mount mount
need tar tar
need xz xz-utils
need dpkg-deb dpkg
need debootstrap debootstrap
need ip iproute2
# Bootable disks of root trees: GRUB's images for legacy BIOS and UEFI, mtools for the ESP.
need grub-mkimage grub-common
[ -e /usr/lib/grub/i386-pc/boot.img ] || missing="$missing grub-pc-bin"
[ -e /usr/lib/grub/x86_64-efi/normal.mod ] || missing="$missing grub-efi-amd64-bin"
need mformat mtools
# The boot test (and the demo's): QEMU, SeaBIOS (its dependency) and OVMF.
need qemu-system-x86_64 qemu-system-x86
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing="$missing ovmf"
# arm64 bootable disks and their boot test: arm64's GRUB images (on this x86 host the arm64
# package, through dpkg's multiarch: its files are data, nothing of it runs), QEMU's arm64
# machine and its UEFI firmware (AAVMF), cpio for the arm64 test tree's initramfs.
if [ "$mode" != --demo ] && [ "$mode" != --deb ]; then
    arm64_grub=grub-efi-arm64-bin
    if [ "$(dpkg --print-architecture)" != arm64 ]; then
        arm64_grub=grub-efi-arm64-bin:arm64
        if ! dpkg --print-foreign-architectures | grep -qx arm64; then
            [ "$(id -u)" = 0 ] && dpkg --add-architecture arm64
        fi
    fi
    [ -e /usr/lib/grub/arm64-efi/normal.mod ] || missing="$missing $arm64_grub"
    need qemu-system-aarch64 qemu-system-arm
    [ -e /usr/share/AAVMF/AAVMF_CODE.fd ] || missing="$missing qemu-efi-aarch64"
    need cpio cpio
fi
# The systemd tests: systemd-analyze verify on the units, systemd-socket-activate.
if [ "${1:-}" != --demo ]; then
    need systemd-analyze systemd
    need systemd-socket-activate systemd
fi
# The --host tests: a test sshd on 127.0.0.1 and the ssh client.
if [ "${1:-}" != --demo ]; then
    need ssh openssh-client
    need ssh-keygen openssh-client
    [ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
fi
# The benchmarks put a state directory on XFS (reflink=1) made on a loop device; the tests of
# grown disks make an XFS root and check a grown GPT with sgdisk; qcow2 images are made and
# imported (the daemon converts them with qemu-img).
if [ "$mode" != --demo ] && [ "$mode" != --deb ]; then
    need mkfs.xfs xfsprogs
    need sgdisk gdisk
    need qemu-img qemu-utils
fi
# amidalad links libseccomp (the provisioner's system call filter): its headers and library
# to build, in every mode.
dpkg -s libseccomp-dev >/dev/null 2>&1 || missing="$missing libseccomp-dev"
# The containment tests compile a small static program (tests/escape-probe.c).
if [ "$mode" != --demo ] && [ "$mode" != --deb ]; then
    need gcc gcc
    [ -e "/usr/lib/$(gcc -print-multiarch 2>/dev/null)/libc.a" ] || missing="$missing libc6-dev"
fi
# The test root filesystem needs a statically linked busybox.
if ! command -v busybox >/dev/null 2>&1 || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    missing="$missing busybox-static"
fi
# The Debian package: its dependencies on shared libraries, its binaries stripped. With --deb,
# only these (and libseccomp-dev, to build).
if [ "$mode" = --deb ]; then
    missing=
    dpkg -s libseccomp-dev >/dev/null 2>&1 || missing=libseccomp-dev
fi
if [ "$mode" != --demo ]; then
    need dpkg-shlibdeps dpkg-dev
    need strip binutils
    need gzip gzip
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "$0: missing packages:$missing; run as root to install them" >&2
        exit 1
    fi
    echo "installing:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No service a package brings is started (openssh-server's sshd on port 22): the tests
    # start what they need themselves. policy-rc.d is how Debian asks for that.
    policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null || {
        [ -z "$policy" ] || rm -f "$policy"
        exit 1
    }
    [ -z "$policy" ] || rm -f "$policy"
    # Debian's QEMU may have replaced a qemu-img of another release (a backported qemu-utils
    # conflicts with bookworm's qemu-system-x86 and is removed with it): the one of its own
    # release, then.
    if [ "$mode" != --demo ] && [ "$mode" != --deb ] && ! command -v qemu-img >/dev/null 2>&1; then
        echo "installing: qemu-utils (again: installing QEMU removed it)" >&2
        apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
    fi
fi

# A bootable Debian root filesystem (cloud kernel, systemd, udev) for the boot tests and the
# demo, which boot-tests what it bakes.
boot=${AMIDALA_DEBIAN_BOOT_ROOTFS:-/var/cache/amidala-tests/debian-bookworm-boot}
# (Made again if it predates the GRUB packages it keeps.)
if [ "$mode" != --deb ] && ! ls "$boot"/boot/vmlinuz-* "$boot"/var/cache/amidala-grub/grub-pc_*.deb >/dev/null 2>&1; then
    echo "making $boot with debootstrap (two to four minutes)" >&2
    rm -rf "$boot"
    mkdir -p "$(dirname "$boot")"
    "$(dirname "$0")/make-debian-boot-rootfs.sh" "$boot"
fi

# The demo (examples/bake-local.sh --demo) needs nothing more; the tests need what follows.
[ "${1:-}" = --demo ] && exit 0

# cargo-deb, pinned, for tests/build-deb.sh (built in a temporary directory, not the project's
# target directory; installed in cargo's bin directory, where `cargo deb` finds it).
cargo_deb_version=3.8.0
. "$(dirname "$0")/find-cargo.sh"
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $cargo_deb_version" ]; then
    echo "installing cargo-deb $cargo_deb_version" >&2
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --version "$cargo_deb_version" cargo-deb
fi
[ "$mode" = --deb ] && exit 0

# The EC2 API emulator, pinned: the ec2 tests are written against its behaviour.
moto_version=5.2.5
venv=${AMIDALA_MOTO_VENV:-/var/cache/amidala-tests/moto-venv}
if ! "$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
    echo "making $venv with moto[server]==$moto_version" >&2
    if ! python3 -m venv --help >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "moto[server]==$moto_version"
fi

# A small arm64 tree that boots (Debian's arm64 cloud kernel, a busybox initramfs), for the
# test of arm64 bootable disks.
arm64=${AMIDALA_ARM64_BOOT_TREE:-/var/cache/amidala-tests/arm64-boot}
if [ ! -e "$arm64/bin/busybox" ]; then
    echo "making $arm64 (arm64's kernel and busybox, unpacked from their packages)" >&2
    rm -rf "$arm64"
    mkdir -p "$(dirname "$arm64")"
    "$(dirname "$0")/make-arm64-boot-tree.sh" "$arm64"
fi

# A Debian minbase root filesystem with ansible-core, for the ansible provisioner's tests.
debian=${AMIDALA_DEBIAN_ROOTFS:-/var/cache/amidala-tests/debian-bookworm-ansible}
if [ ! -x "$debian/usr/bin/ansible-playbook" ]; then
    echo "making $debian with debootstrap (about a minute)" >&2
    rm -rf "$debian"
    mkdir -p "$(dirname "$debian")"
    "$(dirname "$0")/make-debian-rootfs.sh" "$debian"
fi
