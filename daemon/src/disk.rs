//! Raw disk images: which filesystem a region holds, MBR and GPT partition tables, where the
//! root filesystem is, and copies that keep holes (or share blocks, where the filesystem can).
//!
//! Partition tables are read here rather than by the kernel, so a root partition is attached
//! as a loop device with an offset: this works on kernels without partition support and never
//! races with udev creating partition nodes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

const SECTOR: u64 = 512;

/// A root filesystem type amidala can mount, named as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub fn kernel_name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }
}

fn read_exact_or_short(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The filesystem whose superblock starts the region at `offset`, if it is one we mount.
pub fn detect_fs(file: &File, offset: u64) -> io::Result<Option<FsType>> {
    let mut buf = vec![0u8; 0x10040 + 8];
    let n = read_exact_or_short(file, &mut buf, offset)?;
    let buf = &buf[..n];
    if buf.get(1080..1082) == Some(&[0x53, 0xEF]) {
        return Ok(Some(FsType::Ext4));
    }
    if buf.get(0..4) == Some(b"XFSB") {
        return Ok(Some(FsType::Xfs));
    }
    if buf.get(0x10040..0x10048) == Some(b"_BHRfS_M") {
        return Ok(Some(FsType::Btrfs));
    }
    Ok(None)
}

/// The UUID of the `fs` filesystem whose superblock starts the region at `offset`, in its
/// usual text form (as `blkid` and `/dev/disk/by-uuid` name it); `None` if the superblock is
/// not there.
pub fn fs_uuid(file: &File, offset: u64, fs: FsType) -> io::Result<Option<String>> {
    // Where the superblock's magic and the UUID are.
    let (magic_at, magic, uuid_at): (u64, &[u8], u64) = match fs {
        FsType::Ext4 => (1024 + 0x38, &[0x53, 0xEF], 1024 + 0x68),
        FsType::Xfs => (0, b"XFSB", 32),
        FsType::Btrfs => (0x10040, b"_BHRfS_M", 0x10020),
    };
    let mut found = vec![0u8; magic.len()];
    let mut uuid = [0u8; 16];
    if read_exact_or_short(file, &mut found, offset + magic_at)? != magic.len()
        || found != magic
        || read_exact_or_short(file, &mut uuid, offset + uuid_at)? != 16
    {
        return Ok(None);
    }
    Ok(Some(crate::bootcfg::uuid_text(&uuid)))
}

/// A GUID as GPT stores it (the first three fields little-endian) in its text form.
fn gpt_guid_text(b: &[u8; 16]) -> String {
    let mut swapped = *b;
    swapped[0..4].reverse();
    swapped[4..6].reverse();
    swapped[6..8].reverse();
    crate::bootcfg::uuid_text(&swapped)
}

/// The label of the ext4 filesystem whose superblock starts the region at `offset` (`None`:
/// no ext4 there, or no label).
pub fn ext4_label(file: &File, offset: u64) -> io::Result<Option<String>> {
    let mut sb = [0u8; 0x88];
    if read_exact_or_short(file, &mut sb, offset + 1024)? != sb.len()
        || sb[0x38..0x3a] != [0x53, 0xEF]
    {
        return Ok(None);
    }
    Ok(text_field(&sb[0x78..0x88]))
}

/// A fixed-size name field: up to its first NUL, blanks at the end trimmed; `None` if empty
/// or not printable ASCII.
fn text_field(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?.trim_end();
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .then(|| text.to_owned())
}

/// A FAT filesystem (an EFI system partition), as its boot sector describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fat {
    /// The volume serial, as `UUID=` names it (`ABCD-1234`).
    pub uuid: String,
    pub serial: u32,
    pub label: Option<String>,
    /// FAT32 (else FAT12 or FAT16).
    pub fat32: bool,
}

/// The FAT filesystem whose boot sector starts the region at `offset`, if there is one.
pub fn fat_volume(file: &File, offset: u64) -> io::Result<Option<Fat>> {
    let mut bs = [0u8; 512];
    if read_exact_or_short(file, &mut bs, offset)? != bs.len() {
        return Ok(None);
    }
    Ok(parse_fat(&bs))
}

fn parse_fat(bs: &[u8; 512]) -> Option<Fat> {
    let sector = u16::from_le_bytes([bs[11], bs[12]]);
    let per_cluster = bs[13];
    let fats = bs[16];
    if bs[510..512] != [0x55, 0xAA]
        || !matches!(sector, 512 | 1024 | 2048 | 4096)
        || !per_cluster.is_power_of_two()
        || fats == 0
    {
        return None;
    }
    // FAT32 keeps its table's size in the extended BPB, and its serial and label further on.
    let fat32 = u16::from_le_bytes([bs[22], bs[23]]) == 0;
    let ext = if fat32 { 0x40 } else { 0x24 };
    let name = &bs[ext + 0x12..ext + 0x1a];
    if bs[ext + 2] != 0x29 || !name.starts_with(b"FAT") {
        return None;
    }
    let serial = u32::from_le_bytes(bs[ext + 3..ext + 7].try_into().expect("4 bytes"));
    let label = text_field(&bs[ext + 7..ext + 0x12]).filter(|l| l != "NO NAME");
    Some(Fat {
        uuid: format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff),
        serial,
        label,
        fat32,
    })
}

/// One partition of a partitioned disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers them.
    pub number: u32,
    /// Byte offset and length on the disk.
    pub start: u64,
    pub size: u64,
    /// GPT: the partition type is "Linux root" for x86-64 or arm64.
    pub linux_root_type: bool,
    /// GPT: an EFI system partition; MBR: type 0xEF.
    pub esp: bool,
    /// GPT: the partition's own GUID, as `PARTUUID=` and `/dev/disk/by-partuuid` name it.
    pub unique: Option<String>,
}

/// The kind of partition table found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

const GPT_ROOT_X86_64: [u8; 16] = [
    0xE3, 0xBC, 0x68, 0x4F, 0xCD, 0xE8, 0xB1, 0x4D, 0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09,
];
const GPT_ROOT_ARM64: [u8; 16] = [
    0x45, 0xB0, 0x21, 0xB9, 0xF0, 0x1D, 0xC3, 0x41, 0xAF, 0x44, 0x4C, 0x6F, 0x28, 0x0D, 0x3F, 0xAE,
];

/// C12A7328-F81F-11D2-BA4B-00A0C93EC93B, as GPT stores it.
const GPT_ESP: [u8; 16] = [
    0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
];

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads the partition table, if the disk has one (GPT preferred over its protective MBR).
/// Partitions that do not lie within `disk_size` are an error.
pub fn read_partitions(
    file: &File,
    disk_size: u64,
) -> io::Result<Option<(TableKind, Vec<Partition>)>> {
    let mut head = [0u8; 1024];
    if read_exact_or_short(file, &mut head, 0)? < 1024 {
        return Ok(None);
    }
    if &head[512..520] == b"EFI PART" {
        return read_gpt(file, &head[512..1024], disk_size).map(|p| Some((TableKind::Gpt, p)));
    }
    if head[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let mut parts = Vec::new();
    for i in 0..4 {
        let e = &head[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        let (lba, sectors) = (u64::from(le32(e, 8)), u64::from(le32(e, 12)));
        if kind == 0 || sectors == 0 {
            continue;
        }
        if kind == 0xEE {
            return Err(bad("protective MBR without a GPT header".into()));
        }
        if matches!(kind, 0x05 | 0x0F | 0x85) {
            // Extended partitions hold logical ones, which amidala does not read.
            continue;
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: lba * SECTOR,
            size: sectors * SECTOR,
            linux_root_type: false,
            esp: kind == 0xEF,
            unique: None,
        });
    }
    if parts.is_empty() {
        return Ok(None);
    }
    check_bounds(&parts, disk_size)?;
    Ok(Some((TableKind::Mbr, parts)))
}

fn read_gpt(file: &File, header: &[u8], disk_size: u64) -> io::Result<Vec<Partition>> {
    let entries_lba = le64(header, 72);
    let count = le32(header, 80);
    let entry_size = le32(header, 84) as usize;
    if !(128..=4096).contains(&entry_size) || count > 4096 {
        return Err(bad(format!(
            "GPT header with {count} entries of {entry_size} bytes"
        )));
    }
    let mut table = vec![0u8; count as usize * entry_size];
    let offset = entries_lba
        .checked_mul(SECTOR)
        .ok_or_else(|| bad("GPT entry table offset overflows".into()))?;
    if read_exact_or_short(file, &mut table, offset)? < table.len() {
        return Err(bad("GPT entry table lies beyond the end of the disk".into()));
    }
    let mut parts = Vec::new();
    for (i, e) in table.chunks(entry_size).enumerate() {
        let type_guid: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if type_guid == [0; 16] {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return Err(bad(format!(
                "GPT partition {} ends before it starts",
                i + 1
            )));
        }
        // LBAs are the disk's to choose: every product is checked, none may wrap.
        let span = |lba: u64| lba.checked_mul(SECTOR);
        let (Some(start), Some(size)) = (span(first), (last - first).checked_add(1).and_then(span))
        else {
            return Err(bad(format!(
                "GPT partition {} lies at sectors {first} to {last}, beyond any disk",
                i + 1
            )));
        };
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            size,
            linux_root_type: type_guid == GPT_ROOT_X86_64 || type_guid == GPT_ROOT_ARM64,
            esp: type_guid == GPT_ESP,
            unique: Some(gpt_guid_text(e[16..32].try_into().expect("16 bytes"))),
        });
    }
    check_bounds(&parts, disk_size)?;
    Ok(parts)
}

fn check_bounds(parts: &[Partition], disk_size: u64) -> io::Result<()> {
    for p in parts {
        if p.start
            .checked_add(p.size)
            .is_none_or(|end| end > disk_size)
        {
            return Err(bad(format!(
                "partition {} ({} bytes at {}) lies beyond the end of the disk ({} bytes)",
                p.number, p.size, p.start, disk_size
            )));
        }
    }
    Ok(())
}

/// Where the root filesystem of a disk lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootLocation {
    /// `None` for a whole-disk filesystem.
    pub partition: Option<u32>,
    pub offset: u64,
    /// Length of the region; 0 means to the end of the disk.
    pub size: u64,
    pub fs: FsType,
}

/// Finds the root filesystem: partition `wanted` if given; else the whole disk if it holds a
/// filesystem; else, on a partitioned disk, the GPT "Linux root" partition, or failing that
/// the largest partition that holds a filesystem. Errors say what was found instead.
pub fn locate_root(file: &File, wanted: Option<u32>) -> Result<RootLocation, String> {
    let disk_size = disk_size(file).map_err(|e| format!("reading the disk size: {e}"))?;
    let table = read_partitions(file, disk_size)
        .map_err(|e| format!("reading the partition table: {e}"))?;
    let fs_at = |offset| detect_fs(file, offset).map_err(|e| format!("reading the disk: {e}"));
    if let Some(n) = wanted {
        let Some((_, parts)) = table else {
            return Err(format!(
                "--partition {n} given, but the disk has no partition table"
            ));
        };
        let p = parts.iter().find(|p| p.number == n).ok_or_else(|| {
            let have: Vec<String> = parts.iter().map(|p| p.number.to_string()).collect();
            format!("the disk has no partition {n} (it has {})", have.join(", "))
        })?;
        let fs = fs_at(p.start)?
            .ok_or_else(|| format!("partition {n} holds no ext4, xfs or btrfs filesystem"))?;
        return Ok(RootLocation {
            partition: Some(n),
            offset: p.start,
            size: p.size,
            fs,
        });
    }
    if let Some(fs) = fs_at(0)? {
        return Ok(RootLocation {
            partition: None,
            offset: 0,
            size: 0,
            fs,
        });
    }
    let Some((_, parts)) = table else {
        return Err(
            "the disk holds no ext4, xfs or btrfs filesystem and no partition table".into(),
        );
    };
    let mut candidates = Vec::new();
    for p in &parts {
        if let Some(fs) = fs_at(p.start)? {
            candidates.push((p, fs));
        }
    }
    let chosen = candidates
        .iter()
        .find(|(p, _)| p.linux_root_type)
        .or_else(|| {
            candidates
                .iter()
                .max_by_key(|(p, _)| (p.size, std::cmp::Reverse(p.number)))
        })
        .ok_or_else(|| {
            format!(
                "none of the disk's {} partitions holds an ext4, xfs or btrfs filesystem",
                parts.len()
            )
        })?;
    Ok(RootLocation {
        partition: Some(chosen.0.number),
        offset: chosen.0.start,
        size: chosen.0.size,
        fs: chosen.1,
    })
}

/// What a qcow2 image's header says, once checked to be one amidala converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2 {
    /// The size of the disk it holds (bytes).
    pub virtual_size: u64,
}

/// The qcow2 image's first bytes.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Reads the header of the qcow2 image `file` (QEMU's `docs/interop/qcow2.txt`): `Err` says
/// why amidala does not convert it. A qcow2 image can name other files (a backing file, an
/// external data file), which an import never opens: such images are refused here, before
/// `qemu-img` sees them, and so are encrypted ones (amidala has no key to give).
pub fn read_qcow2(file: &File) -> io::Result<Result<Qcow2, String>> {
    let mut h = [0u8; 104];
    let n = file.read_at(&mut h, 0)?;
    Ok(parse_qcow2(&h[..n]))
}

fn parse_qcow2(h: &[u8]) -> Result<Qcow2, String> {
    let be32 = |at: usize| {
        h.get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    };
    let be64 = |at: usize| {
        h.get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    };
    if !h.starts_with(QCOW2_MAGIC) {
        return Err("it is not a qcow2 image".into());
    }
    let short = || "its qcow2 header is cut short".to_owned();
    let version = be32(4).ok_or_else(short)?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "it is a qcow2 image of version {version} (2 and 3 are known)"
        ));
    }
    if be64(8).ok_or_else(short)? != 0 {
        return Err(
            "it is a qcow2 image with a backing file: convert it to a whole image first              (qemu-img convert -O qcow2 or -O raw), which holds the backing file's data too"
                .into(),
        );
    }
    let cluster_bits = be32(20).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(format!(
            "its qcow2 header is invalid (cluster bits {cluster_bits}, not 9 to 21)"
        ));
    }
    let virtual_size = be64(24).ok_or_else(short)?;
    if virtual_size == 0 {
        return Err("it is a qcow2 image of an empty disk".into());
    }
    if be32(32).ok_or_else(short)? != 0 {
        return Err("it is an encrypted qcow2 image: decrypt it first (qemu-img convert)".into());
    }
    if version == 3 {
        let incompatible = be64(72).ok_or_else(short)?;
        if incompatible & (1 << 2) != 0 {
            return Err(
                "it is a qcow2 image whose data is in an external file: convert it to a whole                  image first (qemu-img convert)"
                    .into(),
            );
        }
        if incompatible & (1 << 1) != 0 {
            return Err(
                "it is a qcow2 image marked corrupt: repair it first (qemu-img check -r all)"
                    .into(),
            );
        }
    }
    Ok(Qcow2 { virtual_size })
}

/// The size of a disk: a file's length, or a block device's (whose metadata says 0).
pub fn disk_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut handle = file;
    let size = handle.seek(SeekFrom::End(0))?;
    handle.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// The EC2 architecture name of an ELF executable, from its header.
pub fn elf_arch(header: &[u8]) -> Option<&'static str> {
    if header.get(..4) != Some(b"\x7fELF".as_slice()) {
        return None;
    }
    let machine = match header.get(5)? {
        1 => u16::from_le_bytes(header.get(18..20)?.try_into().ok()?),
        2 => u16::from_be_bytes(header.get(18..20)?.try_into().ok()?),
        _ => return None,
    };
    match machine {
        0x03 => Some("i386"),
        0x3E => Some("x86_64"),
        0xB7 => Some("arm64"),
        _ => None,
    }
}

/// The bytes of `file`'s data regions (what it holds; a file system that cannot tell holes,
/// or a block device, holds all of its `len` bytes).
pub fn data_bytes(file: &File, len: u64) -> io::Result<u64> {
    let mut bytes = 0;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(at) => at,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(len),
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole)
            .map_err(io::Error::from)?
            .min(len as i64);
        bytes += (hole - data) as u64;
        pos = hole;
    }
    Ok(bytes)
}

/// `struct fstrim_range` of `<linux/fs.h>`.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

nix::ioctl_readwrite!(fitrim, b'X', 121, FstrimRange);

/// Commits the filesystem of `fs` (a directory of it), so that the blocks of files deleted
/// just now are free, then discards its free blocks (`FITRIM`): on a loop device, holes in the
/// backing file, so that the data of deleted files is gone from it.
pub fn discard_free_blocks(fs: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    nix::unistd::syncfs(fs.as_raw_fd())?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes a `struct fstrim_range`, which `range` is (repr(C), the
    // kernel's layout), for the duration of the call; `fs` is an open directory.
    unsafe { fitrim(fs.as_raw_fd(), &mut range) }?;
    Ok(())
}

/// How a file was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Blocks shared with the source (FICLONE): instant, no space used.
    Reflink,
    /// Only the data regions copied; holes stay holes.
    Sparse,
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// Copies all of `src` into the empty file `dst`: by reflink where the filesystem shares
/// blocks, else region by region skipping holes. Does not sync `dst`.
pub fn copy_file(src: &File, dst: &File) -> io::Result<CopyMethod> {
    copy_file_within(src, dst, None)
}

/// [`copy_file`], writing at most `budget` bytes of data, if given: a source with more (one
/// filled in while it is copied) fails the copy with [`io::ErrorKind::FileTooLarge`].
pub fn copy_file_within(src: &File, dst: &File, budget: Option<u64>) -> io::Result<CopyMethod> {
    let len = src.metadata()?.len();
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors
    // are open for the duration of the call and the kernel validates them.
    let cloned = unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as u64) };
    let method = match cloned {
        Ok(_) => CopyMethod::Reflink,
        Err(_) => {
            dst.set_len(len)?;
            copy_regions(src, dst, len, budget)?;
            CopyMethod::Sparse
        }
    };
    dst.set_len(len)?;
    Ok(method)
}

/// Writes the data regions of `src` onto `dst` (a zeroed block device, say) at the same
/// offsets, skipping holes, and syncs `dst`.
pub fn copy_data(src: &File, dst: &File) -> io::Result<()> {
    copy_regions(src, dst, src.metadata()?.len(), None)?;
    dst.sync_all()
}

fn copy_regions(src: &File, dst: &File, len: u64, budget: Option<u64>) -> io::Result<()> {
    let mut pos: i64 = 0;
    let end = len as i64;
    let mut copied: u64 = 0;
    while pos < end {
        let data = match lseek(src.as_raw_fd(), pos, Whence::SeekData) {
            Ok(off) => off,
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole).map_err(io::Error::from)?;
        let region = (hole.min(end) - data) as u64;
        copied = copied.saturating_add(region);
        if budget.is_some_and(|budget| copied > budget) {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the source holds more data than it did when it was measured",
            ));
        }
        copy_range(src, dst, data as u64, region)?;
        pos = hole;
    }
    Ok(())
}

fn copy_range(src: &File, dst: &File, start: u64, len: u64) -> io::Result<()> {
    let mut off_in = start as i64;
    let mut off_out = start as i64;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source shrank while copying",
                ))
            }
            Ok(n) => left -= n as u64,
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return copy_range_by_hand(src, dst, off_in as u64, left)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_by_hand(src: &File, dst: &File, start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = read_exact_or_short(src, &mut buf[..want], start + done)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        dst.write_all_at(&buf[..n], start + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn disk(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn reads_the_uuid_mkfs_gave_ext4_and_xfs() {
        let uuid = "0f1e2d3c-4b5a-4697-a8b9-cadbecfd0e1f";
        for (fs, size, program, args) in [
            (
                FsType::Ext4,
                8u64 << 20,
                "mkfs.ext4",
                vec!["-q", "-F", "-U", uuid],
            ),
            (
                FsType::Xfs,
                300 << 20,
                "mkfs.xfs",
                vec![
                    "-q",
                    "-f",
                    "-m",
                    "uuid=0f1e2d3c-4b5a-4697-a8b9-cadbecfd0e1f",
                ],
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("fs");
            File::create(&image).unwrap().set_len(size).unwrap();
            let made = std::process::Command::new(program)
                .args(&args)
                .arg(&image)
                .status()
                .unwrap_or_else(|e| panic!("{program} (tests/install-deps.sh installs it): {e}"));
            assert!(made.success(), "{program}");
            let file = File::open(&image).unwrap();
            assert_eq!(
                fs_uuid(&file, 0, fs).unwrap().as_deref(),
                Some(uuid),
                "{program}"
            );
            // Another type's superblock is not there.
            let other = if fs == FsType::Ext4 {
                FsType::Xfs
            } else {
                FsType::Ext4
            };
            assert_eq!(fs_uuid(&file, 0, other).unwrap(), None);
        }
    }

    fn put_ext4_magic(f: &File, offset: u64) {
        f.write_all_at(&[0x53, 0xEF], offset + 1080).unwrap();
    }

    fn mbr(f: &File, entries: &[(u8, u32, u32)]) {
        for (i, (kind, lba, sectors)) in entries.iter().enumerate() {
            let mut e = [0u8; 16];
            e[4] = *kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
            f.write_all_at(&e, 446 + 16 * i as u64).unwrap();
        }
        f.write_all_at(&[0x55, 0xAA], 510).unwrap();
    }

    fn gpt(f: &File, entries: &[([u8; 16], u64, u64)]) {
        let mut h = [0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        f.write_all_at(&h, 512).unwrap();
        for (i, (guid, first, last)) in entries.iter().enumerate() {
            let mut e = [0u8; 128];
            e[..16].copy_from_slice(guid);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            f.write_all_at(&e, 1024 + 128 * i as u64).unwrap();
        }
    }

    #[test]
    fn elf_headers_name_the_architecture() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        for (machine, arch) in [(0x3Eu16, "x86_64"), (0xB7, "arm64"), (0x03, "i386")] {
            h[18..20].copy_from_slice(&machine.to_le_bytes());
            assert_eq!(elf_arch(&h), Some(arch));
        }
        h[18..20].copy_from_slice(&0x28u16.to_le_bytes());
        assert_eq!(elf_arch(&h), None, "32-bit ARM is not an EC2 architecture");
        assert_eq!(elf_arch(b"#!/bin/sh\n"), None);
        let own = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(
            elf_arch(&own[..64]),
            Some(if cfg!(target_arch = "x86_64") {
                "x86_64"
            } else {
                "arm64"
            })
        );
    }

    #[test]
    fn detects_filesystems() {
        let f = disk(1 << 20);
        assert_eq!(detect_fs(&f, 0).unwrap(), None);
        put_ext4_magic(&f, 0);
        assert_eq!(detect_fs(&f, 0).unwrap(), Some(FsType::Ext4));
        f.write_all_at(b"XFSB", 4096).unwrap();
        assert_eq!(detect_fs(&f, 4096).unwrap(), Some(FsType::Xfs));
        f.write_all_at(b"_BHRfS_M", 8192 + 0x10040).unwrap();
        assert_eq!(detect_fs(&f, 8192).unwrap(), Some(FsType::Btrfs));
    }

    #[test]
    fn whole_disk_filesystem_wins() {
        let f = disk(1 << 20);
        put_ext4_magic(&f, 0);
        let root = locate_root(&f, None).unwrap();
        assert_eq!(
            (root.partition, root.offset, root.fs),
            (None, 0, FsType::Ext4)
        );
        assert!(locate_root(&f, Some(1))
            .unwrap_err()
            .contains("no partition table"));
    }

    #[test]
    fn mbr_picks_the_largest_partition_with_a_filesystem() {
        let f = disk(8 << 20);
        // 1: small, no fs (like a BIOS boot partition); 2: small ext4 (/boot); 3: large ext4 (root)
        mbr(
            &f,
            &[(0x83, 2048, 100), (0x83, 4096, 2048), (0x83, 8192, 4096)],
        );
        put_ext4_magic(&f, 4096 * 512);
        put_ext4_magic(&f, 8192 * 512);
        let root = locate_root(&f, None).unwrap();
        assert_eq!(
            (root.partition, root.offset, root.size),
            (Some(3), 8192 * 512, 4096 * 512)
        );
        assert_eq!(locate_root(&f, Some(2)).unwrap().offset, 4096 * 512);
        assert!(locate_root(&f, Some(1)).unwrap_err().contains("holds no"));
        assert!(locate_root(&f, Some(7))
            .unwrap_err()
            .contains("has no partition 7"));
    }

    #[test]
    fn gpt_prefers_the_linux_root_type() {
        let f = disk(16 << 20);
        let generic = [
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ];
        gpt(
            &f,
            &[(generic, 2048, 20479), (GPT_ROOT_X86_64, 20480, 22527)],
        );
        mbr(&f, &[(0xEE, 1, 32767)]);
        put_ext4_magic(&f, 2048 * 512);
        put_ext4_magic(&f, 20480 * 512);
        let root = locate_root(&f, None).unwrap();
        assert_eq!(root.partition, Some(2), "root type beats size");
        let (kind, parts) = read_partitions(&f, 16 << 20).unwrap().unwrap();
        assert_eq!(kind, TableKind::Gpt);
        assert_eq!(parts.len(), 2);
    }

    #[test]
    fn huge_lbas_are_refused_not_wrapped() {
        let f = disk(1 << 20);
        // A partition whose sectors, times 512, wrap around 2^64 to a small offset.
        let wrap = u64::MAX / 512 + 2;
        gpt(&f, &[(GPT_ROOT_X86_64, wrap, wrap + 10)]);
        let err = read_partitions(&f, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("beyond any disk"), "{err}");
        let f = disk(1 << 20);
        gpt(&f, &[(GPT_ROOT_X86_64, 0, u64::MAX)]);
        let err = read_partitions(&f, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("beyond any disk"), "{err}");
    }

    #[test]
    fn tables_reaching_past_the_disk_are_refused() {
        let f = disk(1 << 20);
        mbr(&f, &[(0x83, 2048, 1 << 20)]);
        assert!(read_partitions(&f, 1 << 20).is_err());
        let f = disk(1 << 20);
        assert!(locate_root(&f, None)
            .unwrap_err()
            .contains("no partition table"));
    }

    #[test]
    fn copies_keep_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let mut src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all(b"head").unwrap();
        src.write_all_at(b"middle", 32 << 20).unwrap();
        src.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("dst"))
            .unwrap();
        copy_file(&src, &dst).unwrap();
        let mut buf = [0u8; 6];
        dst.read_exact_at(&mut buf, 32 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        dst.read_exact_at(&mut buf[..4], (64 << 20) - 4).unwrap();
        assert_eq!(&buf[..4], b"tail");
        let meta = dst.metadata().unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 4 << 20,
            "holes stayed holes: {} blocks",
            meta.blocks()
        );
    }

    fn qcow2_header(
        version: u32,
        backing: u64,
        size: u64,
        crypt: u32,
        incompatible: u64,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[8..16].copy_from_slice(&backing.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[32..36].copy_from_slice(&crypt.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h
    }

    #[test]
    fn qcow2_headers_that_name_other_files_or_need_keys_are_refused() {
        let ok = qcow2_header(3, 0, 2 << 30, 0, 0);
        assert_eq!(
            parse_qcow2(&ok),
            Ok(Qcow2 {
                virtual_size: 2 << 30
            })
        );
        // Version 2 has no feature fields; a dirty v3 image is qemu-img's to read.
        assert!(parse_qcow2(&qcow2_header(2, 0, 1 << 20, 0, u64::MAX)[..72]).is_ok());
        assert!(parse_qcow2(&qcow2_header(3, 0, 1 << 20, 0, 1)).is_ok());
        let refused = |h: &[u8], says: &str| {
            let why = parse_qcow2(h).unwrap_err();
            assert!(why.contains(says), "{why}");
        };
        refused(&qcow2_header(3, 0x200, 1 << 20, 0, 0), "backing file");
        refused(&qcow2_header(3, 0, 1 << 20, 2, 0), "encrypted");
        refused(&qcow2_header(3, 0, 1 << 20, 0, 4), "external file");
        refused(&qcow2_header(3, 0, 1 << 20, 0, 2), "corrupt");
        refused(&qcow2_header(4, 0, 1 << 20, 0, 0), "version 4");
        refused(&qcow2_header(3, 0, 0, 0, 0), "empty disk");
        refused(&ok[..30], "cut short");
        let mut bits = ok.clone();
        bits[20..24].copy_from_slice(&40u32.to_be_bytes());
        refused(&bits, "cluster bits 40");
    }
}
