//! What makes a root tree bootable, inside the tree: its kernels and initramfs images found,
//! the boot loader's menu (`/boot/grub/grub.cfg`) and `/etc/fstab` written.
//!
//! The menu is amidala's own while its first line is [`MARKER`]: written when a tree is
//! imported as a bootable disk (by the import helper, [`crate::importer`]), and written again
//! after every build (by the executor), so that a build that installs, upgrades or removes a
//! kernel boots what it left in `/boot`. It names every kernel that has an initramfs, newest
//! first (version order), the root filesystem by UUID, and the serial console. A user who
//! wants a menu of their own (GRUB's `update-grub`, say) replaces the file: without the marker
//! it is never touched again.
//!
//! Every path is opened relative to the tree's root with symbolic links resolved inside it
//! ([`crate::sys::open_in_root`]): a link in the tree cannot lead a write out of it.

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The first line of a menu amidala wrote (and may write again).
pub const MARKER: &str = "# amidala: this menu is written by amidala after every build; remove this line to keep your own";

/// The kernel command line's consoles on x86-64: the screen, then the serial port (the last is
/// `/dev/console`, where the login prompt the boot test waits for appears). An arm64 kernel is
/// given none: it takes its console from the firmware's tables (ACPI's SPCR or the device
/// tree's `stdout-path`), the serial port on EC2 (`ttyS0`) and in QEMU (`ttyAMA0`) alike, and a
/// `console=` naming one of them would take that away on the other.
pub const CONSOLES: &str = "console=tty0 console=ttyS0,115200";

/// The architecture of a bootable disk, told by its kernel's header: which GRUB amidala
/// writes and how the disk boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Legacy BIOS (`i386-pc`) and UEFI (`x86_64-efi`, `EFI/BOOT/BOOTX64.EFI`).
    #[default]
    X86_64,
    /// UEFI only (`arm64-efi`, `EFI/BOOT/BOOTAA64.EFI`).
    Arm64,
}

impl Arch {
    /// As amidala names architectures (ELF headers, `--arch`, EC2): `x86_64`, `arm64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The architecture a disk's [`amidala::proto::BOOT_ARCH_TAG`] names: a disk without the tag
    /// (imported before amidala made arm64 disks, or a disk image imported as it is) is taken
    /// for x86-64.
    pub fn of_tag(tag: Option<&str>) -> Result<Arch, String> {
        match tag {
            None | Some("x86_64") => Ok(Arch::X86_64),
            Some("arm64") => Ok(Arch::Arm64),
            Some(other) => Err(format!(
                "the image's architecture {other:?} (amidala:boot-arch) is not one amidala boots: \
                 x86_64 or arm64"
            )),
        }
    }

    /// The builder host's own.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::X86_64
        }
    }

    /// The GRUB platforms amidala installs for it, its UEFI one last.
    pub fn grub_platforms(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &["i386-pc", "x86_64-efi"],
            Arch::Arm64 => &["arm64-efi"],
        }
    }

    /// Its UEFI GRUB platform.
    pub fn efi_platform(self) -> &'static str {
        self.grub_platforms()
            .last()
            .expect("every architecture boots with UEFI")
    }

    /// The firmware its disks boot with, as the [`amidala::proto::BOOT_TAG`] says it.
    pub fn boot_modes(self) -> &'static str {
        match self {
            Arch::X86_64 => "bios+uefi",
            Arch::Arm64 => "uefi",
        }
    }

    /// The removable-media path's file name on the ESP, which firmware boots without a boot
    /// entry.
    pub fn efi_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "BOOTX64.EFI",
            Arch::Arm64 => "BOOTAA64.EFI",
        }
    }

    /// The GPT type of its root partition (the Discoverable Partitions Specification's).
    pub fn root_type(self) -> &'static str {
        match self {
            Arch::X86_64 => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Arch::Arm64 => "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
        }
    }
}

/// The GPT partition label of the root filesystem's partition and its filesystem label.
pub const ROOT_LABEL: &str = "rootfs";

/// Most kernels a menu names.
const MAX_KERNELS: usize = 32;

/// A kernel of the tree with its initramfs, as GRUB reads them (paths from the tree's root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    pub version: String,
    pub kernel: String,
    pub initramfs: String,
}

/// What a path of a tree is to booting, by name: `Some(true)` a kernel, `Some(false)` an
/// initramfs. `path` is relative to the tree's root. Only regular files count.
pub fn boot_file(path: &Path) -> Option<bool> {
    let path = path.strip_prefix("./").unwrap_or(path);
    let parts: Vec<&[u8]> = path
        .iter()
        .map(|c| c.as_bytes())
        .filter(|c| *c != b".")
        .collect();
    match parts.as_slice() {
        [b"boot", name] => {
            if *name == b"vmlinuz" || name.starts_with(b"vmlinuz-") {
                Some(true)
            } else if name.starts_with(b"initrd.img") || name.starts_with(b"initramfs-") {
                Some(false)
            } else {
                None
            }
        }
        [b"lib" | b"usr", ..] => {
            let rest = if parts[0] == b"usr" {
                &parts[1..]
            } else {
                &parts[..]
            };
            matches!(rest, [b"lib", b"modules", _, b"vmlinuz"]).then_some(true)
        }
        _ => None,
    }
}

/// A kernel version amidala writes into a menu: what kernels are named by, and nothing GRUB's
/// parser would read as more than a word.
fn plain_version(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(b))
}

/// Compares versions as `sort -V` does: runs of digits by value, the rest byte by byte.
pub fn version_order(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let la = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let lb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..la]), trim_zeros(&b[..lb]));
                let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (&a[la..], &b[lb..]);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

/// Names of the directory `path` of the tree (none if it is not there).
fn names_in(root: BorrowedFd<'_>, path: &str) -> io::Result<Vec<Vec<u8>>> {
    let dir =
        match crate::sys::open_in_root(root, Path::new(path), libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(dir) => dir,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
    let mut names: Vec<Vec<u8>> = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd())?)?
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .take(100_000)
        .collect();
    names.sort();
    Ok(names)
}

/// Whether `path` of the tree is a regular file (after the tree's own links).
fn is_file(root: BorrowedFd<'_>, path: &str) -> bool {
    crate::sys::open_in_root(root, Path::new(path), libc::O_PATH)
        .and_then(|fd| Ok(nix::sys::stat::fstat(fd.as_raw_fd())?))
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// The architecture of the tree's kernel `path`, by its header: x86's boot protocol puts
/// `HdrS` at 0x202 of every bzImage, arm64's `Image` format `ARM\x64` at 0x38 (GRUB's
/// `linux` loads both). `None` for anything else (an EFI zboot kernel, say, which GRUB 2.06
/// cannot load).
fn kernel_arch(root: BorrowedFd<'_>, path: &str) -> Option<Arch> {
    let fd = crate::sys::open_in_root(
        root,
        Path::new(path),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
    .ok()?;
    let mut header = [0u8; 0x206];
    let n = nix::sys::uio::pread(&fd, &mut header, 0).ok()?;
    arch_of_header(&header[..n])
}

/// [`kernel_arch`] of a kernel's first bytes.
fn arch_of_header(header: &[u8]) -> Option<Arch> {
    if header.get(0x202..0x206) == Some(b"HdrS") {
        Some(Arch::X86_64)
    } else if header.get(0x38..0x3c) == Some(b"ARM\x64") {
        Some(Arch::Arm64)
    } else {
        None
    }
}

/// The tree's kernels that boot on the architecture of its newest one that amidala knows, that
/// architecture, and the newest kernel if none is known.
fn bootable_kernels(root: BorrowedFd<'_>) -> io::Result<(Vec<Kernel>, Option<Arch>)> {
    let mut kernels = find_kernels(root)?;
    let arches: Vec<Option<Arch>> = kernels
        .iter()
        .map(|k| kernel_arch(root, &k.kernel))
        .collect();
    let arch = arches.iter().flatten().next().copied();
    let mut arches = arches.into_iter();
    kernels.retain(|_| arches.next().flatten() == arch);
    Ok((kernels, arch))
}

/// The tree's kernels that have an initramfs, newest first: `/boot/vmlinuz-V` with
/// `/boot/initrd.img-V` or `/boot/initramfs-V.img`, and `/lib/modules/V/vmlinuz` with one of
/// those or `/lib/modules/V/initrd`.
pub fn find_kernels(root: BorrowedFd<'_>) -> io::Result<Vec<Kernel>> {
    let mut found: Vec<Kernel> = Vec::new();
    let initramfs_of = |v: &str| {
        [
            format!("/boot/initrd.img-{v}"),
            format!("/boot/initramfs-{v}.img"),
            format!("/lib/modules/{v}/initrd"),
        ]
        .into_iter()
        .find(|p| is_file(root, p))
    };
    // The kernel `kernel` of version `v`, if it is a file and has an initramfs.
    let take = |v: &[u8], kernel: &dyn Fn(&str) -> String, found: &mut Vec<Kernel>| {
        if !plain_version(v) {
            return;
        }
        let v = String::from_utf8_lossy(v).into_owned();
        let kernel = kernel(&v);
        if found.len() >= MAX_KERNELS
            || found.iter().any(|k| k.version == v)
            || !is_file(root, &kernel)
        {
            return;
        }
        if let Some(initramfs) = initramfs_of(&v) {
            found.push(Kernel {
                version: v,
                kernel,
                initramfs,
            });
        }
    };
    for name in names_in(root, "boot")? {
        if let Some(v) = name.strip_prefix(b"vmlinuz-") {
            take(v, &|v| format!("/boot/vmlinuz-{v}"), &mut found);
        }
    }
    for name in names_in(root, "lib/modules")? {
        take(&name, &|v| format!("/lib/modules/{v}/vmlinuz"), &mut found);
    }
    found.sort_by(|a, b| version_order(&b.version, &a.version));
    Ok(found)
}

/// amidala's GRUB menu for `kernels` (newest first) on the root filesystem `root_uuid`.
/// On arm64 (UEFI only) GRUB's console is the firmware's, which is the serial port there.
pub fn grub_menu(kernels: &[Kernel], root_uuid: &str, arch: Arch) -> String {
    let (terminal, consoles) = match arch {
        Arch::X86_64 => (
            "# The root filesystem is found by UUID; the serial console (ttyS0, 115200) shows the\n\
             # menu and the boot. Newest kernel first.\n\
             serial --unit=0 --speed=115200\n\
             terminal_input serial console\n\
             terminal_output serial console\n",
            format!(" {CONSOLES}"),
        ),
        Arch::Arm64 => (
            "# The root filesystem is found by UUID; the firmware's console (the serial port) shows\n\
             # the menu, and the kernel finds it in the firmware's tables. Newest kernel first.\n",
            String::new(),
        ),
    };
    let mut menu = format!("{MARKER}\n{terminal}set timeout=1\nset default=0\n");
    for k in kernels {
        menu.push_str(&format!(
            "menuentry 'Linux {v}' {{\n    search --no-floppy --fs-uuid --set=root {root_uuid}\n    \
             linux {kernel} root=UUID={root_uuid} ro{consoles}\n    initrd {initramfs}\n}}\n",
            v = k.version,
            kernel = k.kernel,
            initramfs = k.initramfs,
        ));
    }
    menu
}

/// The fstab amidala writes into a tree whose own mounts nothing at `/`.
pub fn fstab(root_uuid: &str, esp_uuid: &str) -> String {
    format!(
        "# Written by amidala when the tree was imported as a bootable disk.\n\
         UUID={root_uuid} / ext4 rw,errors=remount-ro 0 1\n\
         UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n"
    )
}

/// Whether an fstab mounts something at `/`.
pub fn mounts_root(fstab: &str) -> bool {
    fstab.lines().any(|line| {
        let mut fields = line.split_whitespace();
        matches!(
            (fields.next(), fields.next()),
            (Some(first), Some("/")) if !first.starts_with('#')
        )
    })
}

/// Reads at most `limit` bytes of the tree's regular file `path` (`None`: not there).
pub(crate) fn read_file(
    root: BorrowedFd<'_>,
    path: &str,
    limit: u64,
) -> io::Result<Option<String>> {
    let fd = match crate::sys::open_in_root(
        root,
        Path::new(path),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    ) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let mut text = Vec::new();
    std::fs::File::from(fd).take(limit).read_to_end(&mut text)?;
    Ok(Some(String::from_utf8_lossy(&text).into_owned()))
}

/// Makes the directories of `path` (relative to the tree's root), 0755 and root's, and opens
/// the last.
fn make_dirs(root: BorrowedFd<'_>, path: &str) -> io::Result<OwnedFd> {
    let mut at = Path::new("").to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        at.push(part);
        let parent = at.parent().unwrap_or(Path::new(""));
        let dir = crate::sys::open_in_root(root, parent, libc::O_RDONLY | libc::O_DIRECTORY)?;
        match nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            OsStr::new(part),
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    crate::sys::open_in_root(root, &at, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// Writes `content` as the tree's `dir/name` (0644, root's), through a new file renamed over
/// the old, so that a reader never sees half of it.
fn write_file(root: BorrowedFd<'_>, dir: &str, name: &str, content: &str) -> io::Result<()> {
    let dir = make_dirs(root, dir)?;
    write_in(dir.as_fd(), name, content.as_bytes(), true)
}

/// Writes `content` as `name` in `dir` (0644, root's) through a new file renamed over the old
/// (never through a symbolic link of the tree's), synced first if `sync`.
fn write_in(dir: BorrowedFd<'_>, name: &str, content: &[u8], sync: bool) -> io::Result<()> {
    let temp = format!(".{name}.amidala-new");
    let _ = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        temp.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = crate::sys::open_at(
        dir,
        temp.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_EXCL,
    )?;
    nix::sys::stat::fchmod(
        fd.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?;
    let mut file = std::fs::File::from(fd);
    let written = file
        .write_all(content)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
        .and_then(|()| {
            Ok(nix::fcntl::renameat(
                Some(dir.as_raw_fd()),
                temp.as_str(),
                Some(dir.as_raw_fd()),
                name,
            )?)
        });
    if written.is_err() {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            temp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
    written
}

/// Copies the GRUB modules of `lib` (the host's `/usr/lib/grub`, whose core images amidala
/// writes) and their lists into the tree's `/boot/grub/PLATFORM`, as `grub-install` does: a
/// menu's `insmod` (the ones `update-grub` writes) loads them from there, and a module must be
/// of the core image's version. Only `arch`'s platforms. Returns how many files were copied.
pub fn install_modules(root: BorrowedFd<'_>, lib: &Path, arch: Arch) -> Result<usize, String> {
    let mut copied = 0;
    for platform in arch.grub_platforms() {
        let from = lib.join(platform);
        let dir = make_dirs(root, &format!("boot/grub/{platform}"))
            .map_err(|e| format!("making /boot/grub/{platform}: {e}"))?;
        let entries =
            std::fs::read_dir(&from).map_err(|e| format!("reading {}: {e}", from.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", from.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.ends_with(".mod") || name.ends_with(".lst"))
                || !entry.file_type().is_ok_and(|t| t.is_file())
            {
                continue;
            }
            let content = std::fs::read(entry.path())
                .map_err(|e| format!("reading {}: {e}", entry.path().display()))?;
            write_in(dir.as_fd(), name, &content, false)
                .map_err(|e| format!("writing /boot/grub/{platform}/{name}: {e}"))?;
            copied += 1;
        }
    }
    Ok(copied)
}

/// What the import helper is asked to write into a tree that becomes a bootable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    pub root_uuid: String,
    pub esp_uuid: String,
    /// The architectures whose GRUB the host has (see [`crate::bootdisk::installable`]).
    pub arches: Vec<Arch>,
}

/// What was done to the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The kernels the menu names, newest first.
    pub kernels: Vec<String>,
    /// Whether amidala wrote `/etc/fstab` (the tree's own mounted nothing at `/`).
    pub wrote_fstab: bool,
    /// The kernels' architecture, which the disk's boot loader is for.
    pub arch: Arch,
}

/// Makes the tree bootable from the disk amidala lays out: the menu, `/boot/efi`, and an
/// fstab if the tree's own mounts nothing at `/`.
pub fn set_up(root: BorrowedFd<'_>, setup: &Setup) -> Result<Done, String> {
    let (kernels, arch) =
        bootable_kernels(root).map_err(|e| format!("looking for kernels: {e}"))?;
    let Some(arch) = arch else {
        if let Some(first) = kernels.first() {
            return Err(format!(
                "{} is neither an x86-64 kernel (a bzImage) nor an arm64 one (an Image): amidala \
                 makes bootable disks of those two (an EFI zboot kernel is not loaded by GRUB \
                 2.06); import it with --boot no to make a disk without a boot loader",
                first.kernel
            ));
        }
        return Err(
            "the tree holds no kernel with a matching initramfs (/boot/vmlinuz-VERSION with \
             /boot/initrd.img-VERSION or /boot/initramfs-VERSION.img, or \
             /lib/modules/VERSION/vmlinuz): import it with --boot no to make a disk without a \
             boot loader"
                .into(),
        );
    };
    if !setup.arches.contains(&arch) {
        return Err(format!(
            "the tree's kernel {} is for {}, and this host has no GRUB for it ({}): install \
             it, or import with --boot no to make a disk without a boot loader",
            kernels[0].kernel,
            arch.name(),
            crate::bootdisk::grub_package(arch)
        ));
    }
    if kernels.is_empty() {
        return Err(
            "the tree holds no kernel with a matching initramfs (/boot/vmlinuz-VERSION with \
             /boot/initrd.img-VERSION or /boot/initramfs-VERSION.img, or \
             /lib/modules/VERSION/vmlinuz): import it with --boot no to make a disk without a \
             boot loader"
                .into(),
        );
    }
    write_file(
        root,
        "boot/grub",
        "grub.cfg",
        &grub_menu(&kernels, &setup.root_uuid, arch),
    )
    .map_err(|e| format!("writing /boot/grub/grub.cfg: {e}"))?;
    make_dirs(root, "boot/efi").map_err(|e| format!("making /boot/efi: {e}"))?;
    let own =
        read_file(root, "etc/fstab", 1 << 20).map_err(|e| format!("reading /etc/fstab: {e}"))?;
    let wrote_fstab = !own.as_deref().is_some_and(mounts_root);
    if wrote_fstab {
        write_file(
            root,
            "etc",
            "fstab",
            &fstab(&setup.root_uuid, &setup.esp_uuid),
        )
        .map_err(|e| format!("writing /etc/fstab: {e}"))?;
    }
    Ok(Done {
        kernels: kernels.into_iter().map(|k| k.version).collect(),
        wrote_fstab,
        arch,
    })
}

/// After a build: writes amidala's menu again for the kernels the tree holds now, if the menu
/// is still amidala's. Returns what it says about it, if anything.
pub fn refresh(root: BorrowedFd<'_>, root_uuid: &str) -> Result<Option<String>, String> {
    let Some(menu) = read_file(root, "boot/grub/grub.cfg", 1 << 20)
        .map_err(|e| format!("reading /boot/grub/grub.cfg: {e}"))?
    else {
        return Ok(None);
    };
    if menu.lines().next() != Some(MARKER) {
        return Ok(None);
    }
    let (kernels, arch) =
        bootable_kernels(root).map_err(|e| format!("looking for kernels: {e}"))?;
    let Some(arch) = arch.filter(|_| !kernels.is_empty()) else {
        return Ok(Some(
            "amidala: warning: the image holds no kernel with an initramfs any more (of x86-64 \
             or arm64): it will not boot"
                .into(),
        ));
    };
    let new = grub_menu(&kernels, root_uuid, arch);
    if new == menu {
        return Ok(None);
    }
    write_file(root, "boot/grub", "grub.cfg", &new)
        .map_err(|e| format!("writing /boot/grub/grub.cfg: {e}"))?;
    Ok(Some(format!(
        "amidala: boot menu written for kernel {}",
        kernels
            .iter()
            .map(|k| k.version.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The UUID of the ext4 filesystem whose superblock `dev` (a device or image, opened at the
/// filesystem's start) holds, as text; `None` if it is not ext4.
pub fn ext4_uuid(dev: &std::fs::File) -> io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 0x78];
    dev.read_exact_at(&mut sb, 1024)?;
    if sb[0x38..0x3a] != [0x53, 0xEF] {
        return Ok(None);
    }
    Ok(Some(uuid_text(
        &sb[0x68..0x78].try_into().expect("16 bytes"),
    )))
}

/// A UUID's usual text form.
pub fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A new random (version 4) UUID.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the kernel's random numbers");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_are_known_by_their_paths() {
        for (path, kind) in [
            ("boot/vmlinuz-6.1.0-28-cloud-amd64", Some(true)),
            ("./boot/vmlinuz", Some(true)),
            ("boot/initrd.img-6.1.0-28-cloud-amd64", Some(false)),
            ("boot/initramfs-6.5.img", Some(false)),
            ("lib/modules/6.5.0/vmlinuz", Some(true)),
            ("usr/lib/modules/6.5.0/vmlinuz", Some(true)),
            ("usr/lib/modules/6.5.0/kernel/x.ko", None),
            ("boot/grub/grub.cfg", None),
            ("vmlinuz", None),
            ("etc/boot/vmlinuz-1", None),
        ] {
            assert_eq!(boot_file(Path::new(path)), kind, "{path}");
        }
    }

    #[test]
    fn versions_sort_as_sort_v_does() {
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.1.0-28-amd64",
            "5.10.0-30-amd64",
            "6.10.1",
            "6.1.0-28-amd64",
        ];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(
            v,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-amd64",
                "6.1.0-28-amd64",
                "6.1.0-28-amd64",
                "6.10.1"
            ]
        );
        assert!(plain_version(b"6.1.0-28-cloud-amd64"));
        assert!(!plain_version(b"6.1'; reboot; '"));
        assert!(!plain_version(b"a b"));
    }

    #[test]
    fn menus_and_fstabs_name_filesystems_by_uuid() {
        let k = Kernel {
            version: "6.1.0-28-cloud-amd64".into(),
            kernel: "/boot/vmlinuz-6.1.0-28-cloud-amd64".into(),
            initramfs: "/boot/initrd.img-6.1.0-28-cloud-amd64".into(),
        };
        let menu = grub_menu(
            std::slice::from_ref(&k),
            "0e8f2b1c-0000-4000-8000-000000000001",
            Arch::X86_64,
        );
        assert!(menu.starts_with(MARKER), "{menu}");
        assert!(menu.contains(
            "linux /boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=0e8f2b1c-0000-4000-8000-000000000001 ro console=tty0 console=ttyS0,115200\n"
        ));
        assert!(
            menu.contains("\nserial --unit=0 --speed=115200\n"),
            "{menu}"
        );
        // arm64: no serial command (the firmware's console is the serial port), no console=.
        let menu = grub_menu(&[k], "0e8f2b1c-0000-4000-8000-000000000001", Arch::Arm64);
        assert!(menu.contains(
            "linux /boot/vmlinuz-6.1.0-28-cloud-amd64 root=UUID=0e8f2b1c-0000-4000-8000-000000000001 ro\n"
        ), "{menu}");
        assert!(
            !menu.contains("\nserial ") && !menu.contains("console="),
            "{menu}"
        );
        let tab = fstab("r-u-u-i-d", "ABCD-1234");
        assert!(mounts_root(&tab));
        assert!(tab.contains("UUID=ABCD-1234 /boot/efi vfat"));
        assert!(!mounts_root("# UNCONFIGURED FSTAB FOR BASE SYSTEM\n"));
        assert!(!mounts_root(
            "#UUID=x / ext4 defaults 0 1\nproc /proc proc defaults 0 0\n"
        ));
        assert!(mounts_root("LABEL=root\t/\text4\tdefaults\t0 1\n"));
    }

    #[test]
    fn kernels_are_found_newest_first_and_menus_refreshed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("boot")).unwrap();
        std::fs::create_dir_all(p.join("lib/modules/6.9.0")).unwrap();
        for f in [
            "boot/vmlinuz-6.1.0-9-amd64",
            "boot/initrd.img-6.1.0-9-amd64",
            "boot/vmlinuz-6.1.0-28-amd64",
            "boot/initrd.img-6.1.0-28-amd64",
            "boot/vmlinuz-7.0-noinitrd",
            "lib/modules/6.9.0/vmlinuz",
            "boot/initramfs-6.9.0.img",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        // A link out of the tree is followed inside it only.
        std::os::unix::fs::symlink("/etc/passwd", p.join("boot/vmlinuz-9.9")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("boot/initrd.img-9.9")).unwrap();
        let root = crate::sys::open_dir(p).unwrap();
        let found = find_kernels(root.as_fd()).unwrap();
        let versions: Vec<&str> = found.iter().map(|k| k.version.as_str()).collect();
        assert_eq!(versions, ["6.9.0", "6.1.0-28-amd64", "6.1.0-9-amd64"]);
        assert_eq!(found[0].kernel, "/lib/modules/6.9.0/vmlinuz");
        assert_eq!(found[0].initramfs, "/boot/initramfs-6.9.0.img");

        let setup = Setup {
            root_uuid: "u-1".into(),
            esp_uuid: "E-1".into(),
            arches: vec![Arch::X86_64],
        };
        // Kernels of no architecture amidala knows make no disk amidala boots.
        let why = set_up(root.as_fd(), &setup).unwrap_err();
        assert!(
            why.contains("neither an x86-64 kernel") && why.contains("--boot no"),
            "{why}"
        );
        // An arm64 kernel, on a host without arm64's GRUB.
        let mut image = vec![0u8; 0x400];
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        std::fs::write(p.join("lib/modules/6.9.0/vmlinuz"), &image).unwrap();
        let why = set_up(root.as_fd(), &setup).unwrap_err();
        assert!(
            why.contains("is for arm64") && why.contains("grub-efi-arm64-bin"),
            "{why}"
        );
        let mut bzimage = vec![0u8; 0x400];
        bzimage[0x202..0x206].copy_from_slice(b"HdrS");
        for k in [
            "lib/modules/6.9.0/vmlinuz",
            "boot/vmlinuz-6.1.0-28-amd64",
            "boot/vmlinuz-6.1.0-9-amd64",
        ] {
            std::fs::write(p.join(k), &bzimage).unwrap();
        }
        let done = set_up(root.as_fd(), &setup).unwrap();
        assert_eq!(done.arch, Arch::X86_64);
        assert!(done.wrote_fstab);
        assert!(p.join("boot/efi").is_dir());
        let menu = std::fs::read_to_string(p.join("boot/grub/grub.cfg")).unwrap();
        assert!(menu.contains("linux /lib/modules/6.9.0/vmlinuz root=UUID=u-1"));
        // Nothing to do while the kernels stay; a removed kernel leaves the menu.
        assert_eq!(refresh(root.as_fd(), "u-1").unwrap(), None);
        std::fs::remove_file(p.join("lib/modules/6.9.0/vmlinuz")).unwrap();
        let said = refresh(root.as_fd(), "u-1").unwrap().unwrap();
        assert!(said.contains("6.1.0-28-amd64, 6.1.0-9-amd64"), "{said}");
        let menu = std::fs::read_to_string(p.join("boot/grub/grub.cfg")).unwrap();
        assert!(!menu.contains("6.9.0"));
        // A menu of the user's own is left alone.
        std::fs::write(p.join("boot/grub/grub.cfg"), "set timeout=5\n").unwrap();
        std::fs::remove_file(p.join("boot/vmlinuz-6.1.0-28-amd64")).unwrap();
        assert_eq!(refresh(root.as_fd(), "u-1").unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(p.join("boot/grub/grub.cfg")).unwrap(),
            "set timeout=5\n"
        );
        // An fstab that mounts the root is kept.
        std::fs::write(p.join("etc-fstab"), "").unwrap();
        std::fs::create_dir_all(p.join("etc")).unwrap();
        std::fs::write(p.join("etc/fstab"), "LABEL=x / ext4 defaults 0 1\n").unwrap();
        let done = set_up(
            root.as_fd(),
            &Setup {
                root_uuid: "u-2".into(),
                esp_uuid: "E-2".into(),
                arches: vec![Arch::X86_64, Arch::Arm64],
            },
        )
        .unwrap();
        assert!(!done.wrote_fstab);
        assert_eq!(
            std::fs::read_to_string(p.join("etc/fstab")).unwrap(),
            "LABEL=x / ext4 defaults 0 1\n"
        );
    }

    #[test]
    fn grub_modules_are_copied_as_grub_install_leaves_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (lib, tree) = (tmp.path().join("lib"), tmp.path().join("tree"));
        for platform in Arch::X86_64.grub_platforms() {
            std::fs::create_dir_all(lib.join(platform)).unwrap();
            std::fs::write(lib.join(platform).join("normal.mod"), platform).unwrap();
            std::fs::write(lib.join(platform).join("fs.lst"), "ext2\n").unwrap();
            std::fs::write(lib.join(platform).join("boot.img"), "not copied").unwrap();
        }
        // A link the tree left where a module goes is replaced, not followed.
        std::fs::create_dir_all(tree.join("boot/grub/i386-pc")).unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("outside"),
            tree.join("boot/grub/i386-pc/normal.mod"),
        )
        .unwrap();
        let root = crate::sys::open_dir(&tree).unwrap();
        assert_eq!(
            install_modules(root.as_fd(), &lib, Arch::X86_64).unwrap(),
            4
        );
        let module = tree.join("boot/grub/i386-pc/normal.mod");
        assert!(!module.is_symlink());
        assert_eq!(std::fs::read_to_string(module).unwrap(), "i386-pc");
        assert_eq!(
            std::fs::read_to_string(tree.join("boot/grub/x86_64-efi/fs.lst")).unwrap(),
            "ext2\n"
        );
        assert!(!tree.join("boot/grub/x86_64-efi/boot.img").exists());
        assert!(!tmp.path().join("outside").exists());
        // A host without GRUB's modules says which directory it lacks.
        let err =
            install_modules(root.as_fd(), &tmp.path().join("none"), Arch::X86_64).unwrap_err();
        assert!(err.contains("none/i386-pc"), "{err}");
        // arm64's one platform only.
        std::fs::create_dir_all(lib.join("arm64-efi")).unwrap();
        std::fs::write(lib.join("arm64-efi/normal.mod"), "arm64-efi").unwrap();
        assert_eq!(install_modules(root.as_fd(), &lib, Arch::Arm64).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(tree.join("boot/grub/arm64-efi/normal.mod")).unwrap(),
            "arm64-efi"
        );
    }

    #[test]
    fn kernels_are_told_apart_by_their_headers() {
        let mut bzimage = vec![0u8; 0x206];
        bzimage[0x202..].copy_from_slice(b"HdrS");
        assert_eq!(arch_of_header(&bzimage), Some(Arch::X86_64));
        let mut image = vec![0u8; 0x40];
        image[..2].copy_from_slice(b"MZ");
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        assert_eq!(arch_of_header(&image), Some(Arch::Arm64));
        // EFI zboot: a PE whose payload is compressed, no Image header.
        let mut zboot = vec![0u8; 0x206];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        assert_eq!(arch_of_header(&zboot), None);
        assert_eq!(arch_of_header(b"HdrS"), None);
        assert_eq!(Arch::of_tag(None), Ok(Arch::X86_64));
        assert_eq!(Arch::of_tag(Some("arm64")), Ok(Arch::Arm64));
        assert!(Arch::of_tag(Some("riscv64")).is_err());
    }

    #[test]
    fn uuids_are_random_version_4() {
        let (a, b) = (random_uuid(), random_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
