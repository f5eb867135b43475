//! A disk made longer than its contents (`--size`, or an EBS volume rounded up to whole GiB)
//! gets the space where it can be used: a GPT reaches the disk's end (its backup header and
//! entries moved to the last sectors, where the specification puts them), the root partition,
//! when it is the last on the disk, is extended to the end, and the root filesystem is grown
//! online to its partition or disk (see [`grow_filesystem`], run by the executor with the
//! filesystem mounted). An MBR is left as it is: it does not record where the disk ended, so
//! a longer disk cannot be told from space an image leaves free on purpose.
//!
//! The table is the user's data and is read as such: every field is checked (the header's and
//! the entries' CRC32 among them) before anything is written, and a table that does not check
//! is left as it is, for [`crate::disk::locate_root`] to judge. Only the headers, the entry
//! arrays and the protective MBR's length are written; no partition but the root moves its
//! end, and none its start.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use crate::disk::FsType;

const SECTOR: u64 = 512;
/// Partitions end on a whole MiB, as partitioning tools align them.
const ALIGN: u64 = 2048;

/// What [`grow_table`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableGrowth {
    /// The GPT's backup moved to the disk's end.
    pub table_moved: bool,
    /// The root partition's length before and after, in bytes, if it grew.
    pub root: Option<(u64, u64)>,
}

impl TableGrowth {
    /// A line for the build's log.
    pub fn describe(&self, partition: u32) -> String {
        match self.root {
            Some((from, to)) => format!(
                "amidala: grew partition {partition} (the root) from {} to {} MiB to fill the disk",
                from >> 20,
                to >> 20
            ),
            None => "amidala: moved the partition table's backup to the disk's end".into(),
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn read_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Grows the GPT of `disk` (open for reading and writing) to the disk's end when the disk is
/// longer than the table says (its backup header is not in the last sector), and the root
/// partition `root` with it when no partition lies after it. `None` when nothing needed to
/// change or the table is not one this changes: an MBR (whose end is not recorded, so a
/// longer disk cannot be told from free space the image keeps on purpose), a GPT whose
/// checksums fail, a hybrid MBR.
pub fn grow_table(disk: &File, root: u32) -> io::Result<Option<TableGrowth>> {
    let size = crate::disk::disk_size(disk)?;
    if size % SECTOR != 0 || size < 64 * SECTOR {
        return Ok(None);
    }
    let sectors = size / SECTOR;
    let head = read_at(disk, 1024, 0)?;
    if &head[512..520] == b"EFI PART" {
        grow_gpt(disk, &head, sectors, root)
    } else {
        Ok(None)
    }
}

/// The last sector a partition ending on a whole MiB may take, at or before `last`.
fn aligned_end(last: u64) -> u64 {
    ((last + 1) / ALIGN * ALIGN).saturating_sub(1)
}

/// A GPT header, checked: its own CRC and the span it describes.
struct GptHeader {
    raw: Vec<u8>,
    size: usize,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
}

impl GptHeader {
    fn read(sector: &[u8]) -> Option<GptHeader> {
        if &sector[..8] != b"EFI PART" {
            return None;
        }
        let size = le32(sector, 12) as usize;
        if !(92..=512).contains(&size) {
            return None;
        }
        let mut raw = sector[..512].to_vec();
        let crc = le32(&raw, 16);
        put32(&mut raw, 16, 0);
        if crc32fast::hash(&raw[..size]) != crc {
            return None;
        }
        put32(&mut raw, 16, crc);
        let (count, entry_size) = (le32(&raw, 80), le32(&raw, 84));
        if !(128..=4096).contains(&entry_size) || count == 0 || count > 4096 {
            return None;
        }
        Some(GptHeader {
            entries_lba: le64(&raw, 72),
            raw,
            size,
            count,
            entry_size,
        })
    }

    fn entries_len(&self) -> usize {
        self.count as usize * self.entry_size as usize
    }

    fn seal(&mut self) {
        put32(&mut self.raw, 16, 0);
        let crc = crc32fast::hash(&self.raw[..self.size]);
        put32(&mut self.raw, 16, crc);
    }
}

fn grow_gpt(disk: &File, head: &[u8], sectors: u64, root: u32) -> io::Result<Option<TableGrowth>> {
    let Some(mut primary) = GptHeader::read(&head[512..1024]) else {
        return Ok(None);
    };
    let (my_lba, old_backup, first_usable, old_last_usable) = (
        le64(&primary.raw, 24),
        le64(&primary.raw, 32),
        le64(&primary.raw, 40),
        le64(&primary.raw, 48),
    );
    let entry_sectors = (primary.entries_len() as u64).div_ceil(SECTOR);
    let last_lba = sectors - 1;
    if my_lba != 1
        || primary.entries_lba < 2
        || primary.entries_lba + entry_sectors > first_usable
        || old_backup > last_lba
        || old_last_usable >= old_backup
        || first_usable > old_last_usable
    {
        return Ok(None);
    }
    let mut entries = read_at(disk, primary.entries_len(), primary.entries_lba * SECTOR)?;
    if crc32fast::hash(&entries) != le32(&primary.raw, 88) {
        return Ok(None);
    }
    // A protective MBR covers the whole disk (or 2 TiB); a hybrid one is left alone.
    let mut mbr = head[..512].to_vec();
    let protective = mbr[510..512] == [0x55, 0xAA]
        && mbr[446 + 4] == 0xEE
        && (1..4).all(|i| mbr[446 + 16 * i + 4] == 0);
    if !protective {
        return Ok(None);
    }

    let backup_entries_lba = last_lba - entry_sectors;
    let last_usable = backup_entries_lba - 1;
    if old_backup == last_lba || last_usable <= old_last_usable {
        return Ok(None);
    }
    // The root grows if it is the last partition and the disk has a whole MiB more for it.
    let entry_size = primary.entry_size as usize;
    let span = |e: &[u8]| (le64(e, 32), le64(e, 40));
    let used = |e: &[u8]| e[..16] != [0u8; 16];
    // Partitions lie within the old usable range, or the table is not one to move.
    if entries
        .chunks(entry_size)
        .any(|e| used(e) && (span(e).0 < first_usable || span(e).1 > old_last_usable))
    {
        return Ok(None);
    }
    let mut root_growth = None;
    let root_index = (root as usize).wrapping_sub(1);
    if root_index < primary.count as usize {
        let at = root_index * entry_size;
        let (first, last) = span(&entries[at..at + entry_size]);
        let alone_at_end = entries
            .chunks(entry_size)
            .enumerate()
            .all(|(i, e)| i == root_index || !used(e) || span(e).1 < first);
        let new_last = aligned_end(last_usable);
        if used(&entries[at..at + entry_size]) && alone_at_end && new_last >= last + ALIGN {
            put64(&mut entries, at + 40, new_last);
            root_growth = Some(((last - first + 1) * SECTOR, (new_last - first + 1) * SECTOR));
        }
    }
    let entries_crc = crc32fast::hash(&entries);

    put64(&mut primary.raw, 32, last_lba);
    put64(&mut primary.raw, 48, last_usable);
    put32(&mut primary.raw, 88, entries_crc);
    primary.seal();
    let mut backup = GptHeader {
        raw: primary.raw.clone(),
        ..primary
    };
    put64(&mut backup.raw, 24, last_lba);
    put64(&mut backup.raw, 32, 1);
    put64(&mut backup.raw, 72, backup_entries_lba);
    backup.seal();
    let mbr_len = (sectors - 1).min(u64::from(u32::MAX)) as u32;
    put32(&mut mbr, 446 + 12, mbr_len);

    // The backup first, then the primary: a table cut off halfway still has a primary that
    // checks. The old backup header, now inside the space the root may take, is cleared.
    disk.write_all_at(&entries, backup_entries_lba * SECTOR)?;
    disk.write_all_at(&backup.raw, last_lba * SECTOR)?;
    disk.sync_data()?;
    disk.write_all_at(&entries, primary.entries_lba * SECTOR)?;
    let mut first = mbr;
    first.extend_from_slice(&primary.raw);
    disk.write_all_at(&first, 0)?;
    // (Unless it lies in the new backup's entries: a disk grown by less than their length.)
    if old_backup < backup_entries_lba {
        disk.write_all_at(&[0u8; SECTOR as usize], old_backup * SECTOR)?;
    }
    disk.sync_data()?;
    Ok(Some(TableGrowth {
        table_moved: true,
        root: root_growth,
    }))
}

/// The size in bytes of the filesystem whose superblock is read from `dev` (its block size
/// with it), from the superblock itself.
fn filesystem_size(dev: &File, fs: FsType) -> io::Result<Option<(u64, u64)>> {
    Ok(match fs {
        FsType::Ext4 => {
            let sb = read_at(dev, 1024, 1024)?;
            let block = 1024u64 << le32(&sb, 24).min(6);
            let mut blocks = u64::from(le32(&sb, 4));
            // INCOMPAT_64BIT: the count's high half.
            if le32(&sb, 0x60) & 0x80 != 0 {
                blocks |= u64::from(le32(&sb, 0x150)) << 32;
            }
            blocks.checked_mul(block).map(|size| (size, block))
        }
        FsType::Xfs => {
            let sb = read_at(dev, 512, 0)?;
            let block = u64::from(u32::from_be_bytes(sb[4..8].try_into().expect("4 bytes")));
            let blocks = u64::from_be_bytes(sb[8..16].try_into().expect("8 bytes"));
            (block.is_power_of_two() && block >= 512).then(|| (blocks.saturating_mul(block), block))
        }
        FsType::Btrfs => {
            let sb = read_at(dev, 4096, 0x10000)?;
            // One device: its size in the superblock's device item.
            (le64(&sb, 0x88) == 1).then(|| (le64(&sb, 0xd1), 4096))
        }
    })
}

#[repr(C)]
struct XfsGrowfsData {
    newblocks: u64,
    imaxpct: u32,
}
nix::ioctl_write_ptr!(xfs_growfs_data, b'X', 110, XfsGrowfsData);

#[repr(C)]
struct BtrfsVolArgs {
    fd: i64,
    name: [u8; 4088],
}
nix::ioctl_write_ptr!(btrfs_resize, 0x94, 3, BtrfsVolArgs);

/// How much smaller than its device a filesystem is before it is grown.
const SLACK: u64 = 1 << 20;

/// Grows the XFS or btrfs filesystem mounted at `root` (whose device is `dev`) to fill the
/// device when it is at least a MiB smaller; says from what to what. Online, by the
/// filesystem's own ioctl (`CAP_SYS_ADMIN`), so nothing parses the image's filesystem but the
/// kernel that mounted it. ext4 is grown before it is mounted: see [`grow_ext4`].
pub fn grow_filesystem(
    root: BorrowedFd<'_>,
    dev: &File,
    fs: FsType,
) -> io::Result<Option<(u64, u64)>> {
    if fs == FsType::Ext4 {
        return Ok(None);
    }
    let device = crate::disk::disk_size(dev)?;
    let Some((size, block)) = filesystem_size(dev, fs)? else {
        return Ok(None);
    };
    if device < size.saturating_add(SLACK) {
        return Ok(None);
    }
    let blocks = device / block;
    // SAFETY: each ioctl is given a live descriptor of the mounted filesystem and a pointer to
    // an argument of the layout the kernel defines for it, which outlives the call.
    let result = unsafe {
        match fs {
            FsType::Xfs => {
                let imaxpct = u32::from(read_at(dev, 512, 0)?[127]);
                xfs_growfs_data(
                    root.as_raw_fd(),
                    &XfsGrowfsData {
                        newblocks: blocks,
                        imaxpct,
                    },
                )
            }
            FsType::Btrfs | FsType::Ext4 => {
                let mut args = BtrfsVolArgs {
                    fd: 0,
                    name: [0; 4088],
                };
                args.name[..3].copy_from_slice(b"max");
                btrfs_resize(root.as_raw_fd(), &args)
            }
        }
    };
    result.map_err(io::Error::from)?;
    Ok(Some((size, blocks * block)))
}

/// Grows the ext4 filesystem on the block device `device` (not mounted) to fill it when it is
/// at least a MiB smaller, and returns a line for the build's log. Online growth of ext4 needs
/// `CAP_SYS_RESOURCE`, which the daemon does not keep; offline, e2fsprogs' `e2fsck -f -p`
/// (which `resize2fs` asks for first) and `resize2fs` parse the user's filesystem, so they run
/// as the owner's sandboxed id in the boot test's sandbox, with that device alone (see
/// [`crate::bootvm::run_tool`]). A filesystem they will not grow (errors `e2fsck` does not
/// repair by itself) keeps its size, which the line says.
pub async fn grow_ext4(
    daemon: &crate::Daemon,
    device: &std::path::Path,
    owner: u32,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Option<String>, crate::error::Failure> {
    use crate::bootvm::{Program, Tool};
    use crate::error::Failure;
    let path = device.to_owned();
    let sizes = crate::error::blocking(move || {
        let dev =
            File::open(&path).map_err(|e| Failure::io(format!("opening {}", path.display()), e))?;
        let device_size =
            crate::disk::disk_size(&dev).map_err(|e| Failure::io("reading the root's size", e))?;
        let fs = filesystem_size(&dev, FsType::Ext4)
            .map_err(|e| Failure::io("reading the root filesystem", e))?;
        let rdev = nix::sys::stat::fstat(dev.as_raw_fd())
            .map_err(|e| Failure::io("reading the root's device", io::Error::from(e)))?
            .st_rdev;
        Ok((device_size, fs.map(|(size, _)| size), rdev))
    })
    .await?;
    let (device_size, Some(from), rdev) = sizes else {
        return Ok(None);
    };
    if device_size < from.saturating_add(SLACK) {
        return Ok(None);
    }
    let uid = crate::bootvm::vm_uid(daemon, owner)?;
    let kept = |what: &str, code: i32, said: &str| {
        let last = said.lines().last().unwrap_or("");
        Some(format!(
            "amidala: warning: the root filesystem keeps its size ({} MiB; its disk gives it {} \
             MiB): {what} exited with status {code}: {last}",
            from >> 20,
            device_size >> 20
        ))
    };
    let tool = Tool {
        program: Program::E2fsck,
        args: &["-f", "-p", "/dev/disk"],
        disk: Some(rdev),
        source: None,
        out: None,
        limit: None,
        timeout: None,
    };
    let (code, said) = crate::bootvm::run_tool(daemon, uid, &tool, cancel).await?;
    // 0, or 1 and 2 (errors corrected) alone.
    if code & !3 != 0 {
        return Ok(kept("e2fsck -f -p", code, &said));
    }
    let tool = Tool {
        program: Program::Resize2fs,
        args: &["/dev/disk"],
        disk: Some(rdev),
        source: None,
        out: None,
        limit: None,
        timeout: None,
    };
    let (code, said) = crate::bootvm::run_tool(daemon, uid, &tool, cancel).await?;
    if code != 0 {
        return Ok(kept("resize2fs", code, &said));
    }
    let path = device.to_owned();
    let to = crate::error::blocking(move || {
        let dev =
            File::open(&path).map_err(|e| Failure::io(format!("opening {}", path.display()), e))?;
        filesystem_size(&dev, FsType::Ext4)
            .map_err(|e| Failure::io("reading the root filesystem", e))
    })
    .await?
    .map_or(from, |(size, _)| size);
    Ok(Some(format!(
        "amidala: grew the root filesystem from {} to {} MiB, the space its disk gives it",
        from >> 20,
        to >> 20
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    /// A GPT as `sfdisk` writes it, for a disk of `sectors`, with partitions (first, last).
    fn gpt(f: &File, sectors: u64, parts: &[(u64, u64)]) {
        let mut entries = vec![0u8; 128 * 128];
        for (i, &(first, last)) in parts.iter().enumerate() {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[..16].copy_from_slice(&[0x11; 16]);
            e[16..32].copy_from_slice(&[i as u8 + 1; 16]);
            put64(e, 32, first);
            put64(e, 40, last);
        }
        let last_lba = sectors - 1;
        let mut h = vec![0u8; 512];
        h[..8].copy_from_slice(b"EFI PART");
        put32(&mut h, 8, 0x0001_0000);
        put32(&mut h, 12, 92);
        put64(&mut h, 24, 1);
        put64(&mut h, 32, last_lba);
        put64(&mut h, 40, 34);
        put64(&mut h, 48, last_lba - 33);
        put64(&mut h, 72, 2);
        put32(&mut h, 80, 128);
        put32(&mut h, 84, 128);
        put32(&mut h, 88, crc32fast::hash(&entries));
        let mut primary = GptHeader::read_unchecked(&h);
        primary.seal();
        let mut backup = primary.raw.clone();
        put64(&mut backup, 24, last_lba);
        put64(&mut backup, 32, 1);
        put64(&mut backup, 72, last_lba - 32);
        let mut backup = GptHeader::read_unchecked(&backup);
        backup.seal();
        let mut mbr = vec![0u8; 512];
        mbr[446 + 4] = 0xEE;
        put32(&mut mbr, 446 + 8, 1);
        put32(&mut mbr, 446 + 12, (sectors - 1) as u32);
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        f.write_all_at(&mbr, 0).unwrap();
        f.write_all_at(&primary.raw, 512).unwrap();
        f.write_all_at(&entries, 1024).unwrap();
        f.write_all_at(&entries, (last_lba - 32) * 512).unwrap();
        f.write_all_at(&backup.raw, last_lba * 512).unwrap();
    }

    impl GptHeader {
        fn read_unchecked(sector: &[u8]) -> GptHeader {
            GptHeader {
                raw: sector[..512].to_vec(),
                size: 92,
                entries_lba: le64(sector, 72),
                count: le32(sector, 80),
                entry_size: le32(sector, 84),
            }
        }
    }

    /// The table as read back, checked as firmware would check it.
    fn check(f: &File) -> (Vec<(u64, u64)>, u64) {
        let size = crate::disk::disk_size(f).unwrap();
        let last_lba = size / 512 - 1;
        let primary = GptHeader::read(&read_at(f, 512, 512).unwrap()).expect("primary checks");
        let backup =
            GptHeader::read(&read_at(f, 512, last_lba * 512).unwrap()).expect("backup checks");
        assert_eq!(le64(&primary.raw, 32), last_lba);
        assert_eq!(le64(&backup.raw, 24), last_lba);
        assert_eq!(le64(&backup.raw, 32), 1);
        let entries = read_at(f, primary.entries_len(), primary.entries_lba * 512).unwrap();
        let copy = read_at(f, backup.entries_len(), backup.entries_lba * 512).unwrap();
        assert_eq!(entries, copy);
        assert_eq!(crc32fast::hash(&entries), le32(&primary.raw, 88));
        assert_eq!(crc32fast::hash(&copy), le32(&backup.raw, 88));
        let last_usable = le64(&primary.raw, 48);
        assert_eq!(last_usable, le64(&backup.raw, 48));
        assert!(backup.entries_lba > last_usable);
        let parts = entries
            .chunks(128)
            .filter(|e| e[..16] != [0; 16])
            .map(|e| (le64(e, 32), le64(e, 40)))
            .collect::<Vec<_>>();
        for &(_, last) in &parts {
            assert!(last <= last_usable);
        }
        (parts, last_usable)
    }

    #[test]
    fn a_longer_disk_gets_its_table_at_the_end_and_the_last_root_grows() {
        let f = disk(64 << 20);
        let sectors = (64u64 << 20) / 512;
        gpt(&f, sectors, &[(2048, 4095), (4096, sectors - 2049)]);
        // Nothing to do on a disk its table already fits.
        assert_eq!(grow_table(&f, 2).unwrap(), None);
        f.set_len(256 << 20).unwrap();
        let grown = grow_table(&f, 2).unwrap().expect("grown");
        assert!(grown.table_moved);
        let (parts, last_usable) = check(&f);
        assert_eq!(parts[0], (2048, 4095), "the other partition untouched");
        assert_eq!(parts[1].0, 4096);
        assert_eq!((parts[1].1 + 1) % 2048, 0, "ends on a MiB");
        assert!(last_usable - parts[1].1 < 2048);
        assert_eq!(
            grown.root,
            Some((
                (sectors - 2049 - 4096 + 1) * 512,
                (parts[1].1 - 4096 + 1) * 512
            ))
        );
        // The old backup header is gone from the middle of the disk.
        assert_ne!(
            &read_at(&f, 8, (sectors - 1) * 512).unwrap()[..],
            b"EFI PART"
        );
        // Once is enough.
        assert_eq!(grow_table(&f, 2).unwrap(), None);
        // The protective MBR covers the disk.
        assert_eq!(
            le32(&read_at(&f, 512, 0).unwrap(), 446 + 12) as u64,
            (256u64 << 20) / 512 - 1
        );
        // Grown by less than the entries' length, the new backup overlaps the old one's
        // place: it checks all the same.
        f.set_len((256 << 20) + 8192).unwrap();
        assert!(grow_table(&f, 2).unwrap().expect("moved").table_moved);
        check(&f);
    }

    #[test]
    fn a_root_that_is_not_last_keeps_its_size_and_bad_tables_are_left_alone() {
        let sectors = (64u64 << 20) / 512;
        let f = disk(64 << 20);
        gpt(&f, sectors, &[(2048, 40959), (40960, 61439)]);
        f.set_len(128 << 20).unwrap();
        let grown = grow_table(&f, 1).unwrap().expect("the table moved");
        assert_eq!(grown.root, None);
        let (parts, _) = check(&f);
        assert_eq!(parts, vec![(2048, 40959), (40960, 61439)]);

        // No root partition (0): the table moves, nothing grows, nothing breaks.
        let f = disk(64 << 20);
        gpt(&f, sectors, &[(2048, 4095)]);
        f.set_len(128 << 20).unwrap();
        assert_eq!(grow_table(&f, 0).unwrap().unwrap().root, None);

        // A partition outside the table's usable range: the table is not the kind to move.
        let f = disk(64 << 20);
        gpt(&f, sectors, &[(2048, 4095), (sectors - 20, sectors - 2)]);
        f.set_len(128 << 20).unwrap();
        assert_eq!(grow_table(&f, 1).unwrap(), None);

        // A header whose checksum fails is not rewritten.
        let f = disk(64 << 20);
        gpt(&f, sectors, &[(2048, 4095)]);
        f.write_all_at(&[0xFF], 512 + 60).unwrap();
        f.set_len(128 << 20).unwrap();
        let before = read_at(&f, 2048, 0).unwrap();
        assert_eq!(grow_table(&f, 1).unwrap(), None);
        assert_eq!(read_at(&f, 2048, 0).unwrap(), before);
    }

    #[test]
    fn an_mbr_is_left_as_it_is() {
        let f = disk(64 << 20);
        let mut mbr = vec![0u8; 512];
        mbr[446 + 4] = 0x83;
        put32(&mut mbr, 446 + 8, 2048);
        put32(&mut mbr, 446 + 12, 8192);
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        f.write_all_at(&mbr, 0).unwrap();
        assert_eq!(grow_table(&f, 1).unwrap(), None);
        assert_eq!(read_at(&f, 512, 0).unwrap(), mbr);
    }
}
