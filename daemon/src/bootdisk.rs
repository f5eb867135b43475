//! The bootable disk amidala makes of a root tree: its layout, its partition table and its
//! boot loader, all written into the image file by the daemon with the builder host's own
//! tools (as mkosi and osbuild do), never by a program of the tree.
//!
//! The layout, a GPT disk:
//!
//! | # | what | start | size | type |
//! |---|------|-------|------|------|
//! | 1 | BIOS boot (GRUB's core image, for legacy BIOS) | 1 MiB | 1 MiB | `21686148-…` |
//! | 2 | EFI system partition, FAT32, label `ESP` | 2 MiB | 64 MiB | `C12A7328-…` |
//! | 3 | the root filesystem, ext4, label `rootfs` | 66 MiB | the tree's | Linux root (x86-64 or arm64) |
//!
//! and 1 MiB at the end for the GPT's backup. The tree's kernel says the architecture
//! ([`crate::bootcfg::Arch`]). On x86-64, GRUB comes from the host's `grub-pc-bin` (i386-pc)
//! and `grub-efi-amd64-bin` (x86_64-efi) packages; on arm64, which boots with UEFI only, from
//! `grub-efi-arm64-bin` (arm64-efi; on an x86 host, the arm64 package through multiarch), and
//! partition 1 stays empty (kept, so that both architectures have one layout). `grub-mkimage`
//! makes one core image per firmware with every module the boot needs built in and its prefix
//! on partition 3 of the disk it booted from (`(,gpt3)/boot/grub`), so none depends on the
//! image (the menu, [`crate::bootcfg`], is on the root filesystem, and so are the same GRUB's
//! modules in `/boot/grub/PLATFORM`, as `grub-install` leaves them, for the `insmod` of a menu
//! the image's own `update-grub` writes). For legacy BIOS, the core image is written into
//! partition 1 and GRUB's boot sector into the first 440 bytes of the disk (the protective
//! MBR's partition entries stay), patched with the core image's sector; for UEFI, it is
//! `EFI/BOOT/BOOTX64.EFI` (`BOOTAA64.EFI` on arm64) on the ESP (the removable-media path
//! firmware boots without a boot entry), which mtools formats and fills in the image file: the
//! ESP is never mounted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use amidala::proto::ErrorCode;

use crate::bootcfg::Arch;
use crate::error::Failure;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
pub const BIOS_BOOT_START: u64 = MIB;
pub const BIOS_BOOT_SIZE: u64 = MIB;
pub const ESP_START: u64 = 2 * MIB;
pub const ESP_SIZE: u64 = 64 * MIB;
/// Where the root filesystem's partition starts.
pub const ROOT_START: u64 = ESP_START + ESP_SIZE;
/// Left at the end of the disk for the backup GPT (33 sectors; a whole MiB keeps the end
/// aligned).
pub const TAIL: u64 = MIB;

/// The GRUB modules built into both core images: enough to find partition 3, read its ext4,
/// show the menu on the serial console and load a Linux kernel and its initramfs.
const MODULES: &[&str] = &[
    "part_gpt",
    "part_msdos",
    "ext2",
    "normal",
    "linux",
    "configfile",
    "serial",
    "terminal",
    "echo",
    "test",
    "search",
    "search_fs_uuid",
    "search_label",
    "gzio",
    "xzio",
    "lzopio",
    "zstd",
    "loadenv",
    "halt",
    "reboot",
    "ls",
    "cat",
];
const BIOS_MODULES: &[&str] = &["biosdisk"];
const EFI_MODULES: &[&str] = &["fat", "efi_gop", "all_video"];
/// Where the host's GRUB keeps its platforms' modules.
pub const GRUB_LIB: &str = "/usr/lib/grub";

/// The identities of a new bootable disk's parts, random for each disk.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Bytes of the root filesystem (a whole number of MiB).
    pub root_size: u64,
    pub disk_guid: String,
    pub part_guids: [String; 3],
    /// The root filesystem's UUID.
    pub root_uuid: String,
    /// The ESP's FAT volume serial.
    pub esp_serial: u32,
    /// The architecture the disk boots (its root partition's type, its GRUB): told by the
    /// tree's kernel once it is unpacked.
    pub arch: Arch,
}

impl Layout {
    pub fn new(root_size: u64) -> Layout {
        let mut serial = [0u8; 4];
        getrandom::getrandom(&mut serial).expect("the kernel's random numbers");
        Layout {
            root_size,
            disk_guid: crate::bootcfg::random_uuid(),
            part_guids: std::array::from_fn(|_| crate::bootcfg::random_uuid()),
            root_uuid: crate::bootcfg::random_uuid(),
            esp_serial: u32::from_le_bytes(serial),
            arch: Arch::X86_64,
        }
    }

    /// The whole disk's size.
    pub fn disk_size(&self) -> u64 {
        ROOT_START + self.root_size + TAIL
    }

    /// The ESP as fstab names it (`UUID=XXXX-XXXX`).
    pub fn esp_uuid(&self) -> String {
        format!(
            "{:04X}-{:04X}",
            self.esp_serial >> 16,
            self.esp_serial & 0xffff
        )
    }

    /// The partition table, as sfdisk(8) reads it.
    pub fn sfdisk_script(&self) -> String {
        let s = |bytes: u64| bytes / SECTOR;
        format!(
            "label: gpt\nlabel-id: {disk}\nfirst-lba: 2048\n\
             start={bs}, size={bn}, type=21686148-6449-6E6F-744E-656564454649, uuid={p1}, name=\"bios-boot\"\n\
             start={es}, size={en}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={p2}, name=\"esp\"\n\
             start={rs}, size={rn}, type={root_type}, uuid={p3}, name=\"{label}\"\n",
            disk = self.disk_guid,
            bs = s(BIOS_BOOT_START),
            bn = s(BIOS_BOOT_SIZE),
            es = s(ESP_START),
            en = s(ESP_SIZE),
            rs = s(ROOT_START),
            rn = s(self.root_size),
            p1 = self.part_guids[0],
            p2 = self.part_guids[1],
            p3 = self.part_guids[2],
            root_type = self.arch.root_type(),
            label = crate::bootcfg::ROOT_LABEL,
        )
    }
}

/// What the host lacks to make any bootable disk, named by package; `None` if it has the
/// tools and GRUB for at least one architecture ([`installable`]).
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    if !crate::bootvm::on_path("grub-mkimage") {
        missing.push("grub-mkimage (package grub-common)");
    }
    if installable().is_empty() {
        missing.push(
            "GRUB's images (packages grub-pc-bin and grub-efi-amd64-bin for x86-64, \
             grub-efi-arm64-bin for arm64)",
        );
    }
    if !(crate::bootvm::on_path("mformat") && crate::bootvm::on_path("mcopy")) {
        missing.push("mformat and mcopy (package mtools)");
    }
    if !crate::bootvm::on_path("sfdisk") {
        missing.push("sfdisk (package fdisk)");
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The architectures whose GRUB the host has, for every platform amidala installs.
pub fn installable() -> Vec<Arch> {
    [Arch::X86_64, Arch::Arm64]
        .into_iter()
        .filter(|arch| {
            arch.grub_platforms()
                .iter()
                .all(|p| Path::new(GRUB_LIB).join(p).join("normal.mod").exists())
                && (*arch != Arch::X86_64 || Path::new(GRUB_LIB).join("i386-pc/boot.img").exists())
        })
        .collect()
}

/// The packages of `arch`'s GRUB images.
pub fn grub_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "packages grub-pc-bin and grub-efi-amd64-bin",
        Arch::Arm64 => "package grub-efi-arm64-bin; on an x86 host, grub-efi-arm64-bin:arm64",
    }
}

/// Runs a host tool on amidala's own files; its error output says why it failed.
fn run(what: &str, cmd: &mut Command, input: Option<&str>) -> Result<(), Failure> {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("MTOOLS_SKIP_CHECK", "1")
        .spawn()
        .map_err(|e| Failure::io(format!("running {what}"), e))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| Failure::io(format!("writing to {what}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Failure::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(Failure::new(
            ErrorCode::Io,
            format!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Writes the partition table of `layout` on the (new, sized) image file.
pub fn partition(image: &Path, layout: &Layout) -> Result<(), Failure> {
    run(
        "sfdisk",
        Command::new("sfdisk")
            .args([
                "--quiet",
                "--no-reread",
                "--no-tell-kernel",
                "--wipe",
                "never",
            ])
            .arg(image),
        Some(&layout.sfdisk_script()),
    )
}

/// Makes GRUB's core image for `platform` in `dir`.
fn core_image(platform: &str, extra: &[&str], dir: &Path, name: &str) -> Result<PathBuf, Failure> {
    let out = dir.join(name);
    run(
        "grub-mkimage",
        Command::new("grub-mkimage")
            .arg("--format")
            .arg(platform)
            .arg("--directory")
            .arg(Path::new(GRUB_LIB).join(platform))
            .args(["--prefix", "(,gpt3)/boot/grub", "--compression", "auto"])
            .arg("--output")
            .arg(&out)
            .args(extra)
            .args(MODULES),
        None,
    )?;
    Ok(out)
}

/// Installs GRUB on the partitioned image (its root filesystem already holds the menu), for
/// UEFI and, on x86-64, legacy BIOS, using `dir` (an empty directory of root's) for the core
/// images.
pub fn install_loader(image: &Path, layout: &Layout, dir: &Path) -> Result<(), Failure> {
    // UEFI: the ESP, formatted and filled through mtools, addressing the image at its offset.
    let file = layout.arch.efi_file();
    let efi = core_image(layout.arch.efi_platform(), EFI_MODULES, dir, file)?;
    let esp = format!("{}@@{ESP_START}", image.display());
    run(
        "mformat",
        Command::new("mformat")
            .args(["-i", &esp, "-F", "-v", "ESP"])
            .args(["-T", &(ESP_SIZE / SECTOR).to_string()])
            .args(["-H", &(ESP_START / SECTOR).to_string()])
            .args(["-N", &format!("{:08X}", layout.esp_serial)])
            .arg("::"),
        None,
    )?;
    run(
        "mmd",
        Command::new("mmd").args(["-i", &esp, "::/EFI", "::/EFI/BOOT"]),
        None,
    )?;
    run(
        "mcopy",
        Command::new("mcopy")
            .args(["-i", &esp])
            .arg(&efi)
            .arg(format!("::/EFI/BOOT/{file}")),
        None,
    )?;
    if layout.arch != Arch::X86_64 {
        return Ok(());
    }

    // Legacy BIOS: the core image in partition 1, the boot sector in the MBR.
    let core = std::fs::read(core_image("i386-pc", BIOS_MODULES, dir, "core.img")?)
        .map_err(|e| Failure::io("reading GRUB's core image", e))?;
    let boot = std::fs::read(Path::new(GRUB_LIB).join("i386-pc/boot.img"))
        .map_err(|e| Failure::io("reading GRUB's boot sector (grub-pc-bin)", e))?;
    let (mbr, core) = bios_sectors(&boot, core)?;
    let disk = OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| Failure::io("opening the image", e))?;
    disk.write_all_at(&core, BIOS_BOOT_START)
        .and_then(|()| disk.write_all_at(&mbr, 0))
        .and_then(|()| disk.sync_all())
        .map_err(|e| Failure::io("writing GRUB into the image", e))?;
    Ok(())
}

/// GRUB's boot sector code (440 bytes) and core image, patched for a core image at
/// [`BIOS_BOOT_START`]: the boot sector loads the core's first sector from there (its
/// kernel-sector field, at 0x5c), which loads the rest from the next sector on (the start of
/// the block list at the end of that first sector, at 0x1f4).
pub fn bios_sectors(boot: &[u8], mut core: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), Failure> {
    let bad = |what: &str| Failure::new(ErrorCode::Io, format!("GRUB's {what} is not usable"));
    if boot.len() != 512 || boot[510..512] != [0x55, 0xAA] {
        return Err(bad("boot sector (/usr/lib/grub/i386-pc/boot.img)"));
    }
    if core.len() < 512 || core.len() as u64 > BIOS_BOOT_SIZE {
        return Err(bad("core image (larger than the BIOS boot partition)"));
    }
    let first = BIOS_BOOT_START / SECTOR;
    let mut mbr = boot[..440].to_vec();
    mbr[0x5c..0x64].copy_from_slice(&first.to_le_bytes());
    core[0x1f4..0x1fc].copy_from_slice(&(first + 1).to_le_bytes());
    Ok((mbr, core))
}

/// Whether the disk image `file` can boot, by what its first sector and partition table
/// show: `bios` (boot code in the MBR), `uefi` (an EFI system partition), both as
/// `bios+uefi`, or `none`.
pub fn boot_modes(file: &File) -> std::io::Result<&'static str> {
    let mut mbr = [0u8; 512];
    let n = file.read_at(&mut mbr, 0)?;
    let bios = n == 512 && mbr[510..512] == [0x55, 0xAA] && mbr[..440].iter().any(|&b| b != 0);
    let size = crate::disk::disk_size(file)?;
    let uefi = matches!(crate::disk::read_partitions(file, size), Ok(Some((_, parts))) if parts.iter().any(|p| p.esp));
    Ok(match (bios, uefi) {
        (true, true) => "bios+uefi",
        (true, false) => "bios",
        (false, true) => "uefi",
        (false, false) => "none",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_aligned_and_its_table_complete() {
        let l = Layout::new(512 * MIB);
        assert_eq!(ROOT_START % MIB, 0);
        assert_eq!(l.disk_size(), 66 * MIB + 512 * MIB + MIB);
        let script = l.sfdisk_script();
        assert!(
            script.contains("start=4096, size=131072, type=C12A7328"),
            "{script}"
        );
        assert!(
            script.contains("start=135168, size=1048576, type=4F68BCE3"),
            "{script}"
        );
        assert_eq!(l.esp_uuid().len(), 9);
        assert_ne!(l.root_uuid, Layout::new(MIB).root_uuid);
    }

    #[test]
    fn the_boot_sector_points_at_the_core_image() {
        let mut boot = vec![0xEBu8; 512];
        boot[510] = 0x55;
        boot[511] = 0xAA;
        let core = vec![0u8; 4096];
        let (mbr, core) = bios_sectors(&boot, core).unwrap();
        assert_eq!(mbr.len(), 440);
        assert_eq!(&mbr[0x5c..0x64], &2048u64.to_le_bytes());
        assert_eq!(&core[0x1f4..0x1fc], &2049u64.to_le_bytes());
        assert!(bios_sectors(&boot[..100], vec![0; 4096]).is_err());
        assert!(bios_sectors(&boot, vec![0; 2 << 20]).is_err());
    }
}
