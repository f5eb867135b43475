//! `amidala base import`: a directory, a rootfs tarball or a raw disk image becomes a snapshot.
//!
//! The source reaches the daemon as a descriptor the client opened, never as a path:
//!
//! - a directory is copied into a new ext4 filesystem by `mkfs.ext4 -d`, run with the
//!   client's uid and gid, so it reads only what the client may read; ownership and modes
//!   are kept as they are in the directory;
//! - a tarball (plain, gzip or xz, recognised by content) is unpacked by root into a private
//!   staging directory, keeping the ownership, modes and xattrs the archive records, then
//!   copied into a new ext4 filesystem;
//! - a raw disk image (a whole-disk ext4/xfs/btrfs filesystem, or an MBR/GPT disk with one
//!   in a partition) is copied as it is, holes kept, and grown to `--size` if that is larger.
//!
//! The snapshot file is written under a temporary name and renamed into place before its
//! catalog record is written; on any failure nothing is left behind.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use amidala::proto::{
    validate_source_name, validate_user_tags, ErrorCode, ImportSpec, Tag, OWNER_TAG, OWNER_UID_TAG,
    PUBLISHED_TAG,
};

use crate::catalog::SnapshotRecord;
use crate::disk;
use crate::error::{blocking, Failure};
use crate::ids::new_id;
use crate::provider::{copy_to_new, Keep, Provider, SnapshotMeta};

/// Largest snapshot size accepted (EBS's own limit is 64 TiB; a local file this large is a typo).
pub const MAX_SIZE: u64 = 16 << 40;
const MIB: u64 = 1 << 20;

/// The peer the import is for.
#[derive(Debug, Clone, Copy)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
}

/// What kind of source a descriptor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Directory,
    Tar(Compression),
    RawDisk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Xz,
}

/// Recognises a regular file by its first bytes; says what it is not, and why, if it is none
/// of the sources amidala takes.
pub fn sniff(file: &File) -> io::Result<Result<SourceKind, String>> {
    let mut head = vec![0u8; 1024];
    let n = read_at_most(file, &mut head)?;
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Ok(SourceKind::Tar(Compression::Gzip)));
    }
    if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        return Ok(Ok(SourceKind::Tar(Compression::Xz)));
    }
    if head.get(257..262) == Some(b"ustar") {
        return Ok(Ok(SourceKind::Tar(Compression::None)));
    }
    if disk::detect_fs(file, 0)?.is_some() {
        return Ok(Ok(SourceKind::RawDisk));
    }
    let size = disk::disk_size(file)?;
    let looks_partitioned =
        head.get(510..512) == Some(&[0x55, 0xAA]) || head.get(512..520) == Some(b"EFI PART");
    match disk::read_partitions(file, size) {
        Ok(Some(_)) => return Ok(Ok(SourceKind::RawDisk)),
        Err(e) if looks_partitioned => {
            return Ok(Err(format!(
                "it has a partition table, and the table is invalid: {e}"
            )))
        }
        Ok(None) | Err(_) => {}
    }
    let known: &[(&[u8], &str)] = &[
        (
            b"QFI\xfb",
            "a qcow2 image: make it raw first (qemu-img convert -O raw)",
        ),
        (
            b"BZh",
            "bzip2-compressed: amidala takes .tar, .tar.gz and .tar.xz",
        ),
        (
            &[0x28, 0xb5, 0x2f, 0xfd],
            "zstd-compressed: amidala takes .tar, .tar.gz and .tar.xz",
        ),
        (
            b"PK\x03\x04",
            "a zip archive: amidala takes .tar, .tar.gz and .tar.xz",
        ),
    ];
    let what = known
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
        .map(|(_, what)| format!("it is {what}"));
    Ok(Err(what.unwrap_or_else(|| {
        if n == 0 {
            "it is empty".to_owned()
        } else {
            "it is neither a tar archive (.tar, .tar.gz, .tar.xz) nor a disk image holding an \
             ext4, xfs or btrfs filesystem or a partition table"
                .to_owned()
        }
    })))
}

fn read_at_most(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Imports `source` as a new snapshot. `note` receives progress lines for the client.
pub async fn import(
    provider: &dyn Provider,
    staging_dir: &Path,
    spec: ImportSpec,
    source: OwnedFd,
    requester: Requester,
    note: impl Fn(String),
) -> Result<SnapshotRecord, Failure> {
    validate_source_name(&spec.source_name)?;
    validate_user_tags("tags", &spec.tags)?;
    if let Some(size) = spec.size {
        if size > MAX_SIZE {
            return Err(Failure::invalid(format!(
                "--size {size} is larger than the limit of 16 TiB"
            )));
        }
    }
    let source = File::from(source);
    let meta = source
        .metadata()
        .map_err(|e| Failure::io("reading the source", e))?;
    let kind = if meta.is_dir() {
        SourceKind::Directory
    } else if meta.file_type().is_file() || meta.file_type().is_block_device() {
        let sniffed = {
            let source = source
                .try_clone()
                .map_err(|e| Failure::io("reading the source", e))?;
            blocking(move || sniff(&source).map_err(|e| Failure::io("reading the source", e)))
                .await?
        };
        sniffed
            .map_err(|why| Failure::invalid(format!("{}: not imported: {why}", spec.source_name)))?
    } else {
        return Err(Failure::invalid(format!(
            "{} is not a directory or a regular file",
            spec.source_name
        )));
    };

    let job = new_id("import");
    let work = staging_dir.join(&job);
    let image = staging_dir.join(format!("{job}.img"));
    let result = make_image(kind, &source, &spec, requester, &work, &image, &note).await;
    if work.exists() {
        // A staging tree: never mounted, so a recursive removal cannot reach anything else.
        let _ = fs::remove_dir_all(&work);
    }
    if let Err(e) = result {
        let _ = fs::remove_file(&image);
        return Err(e);
    }

    let mut tags: BTreeMap<String, String> = if spec.tags.is_empty() {
        [("amidala".to_owned(), "base".to_owned())].into()
    } else {
        spec.tags
            .iter()
            .map(|Tag { key, value }| (key.clone(), value.clone()))
            .collect()
    };
    let owner = crate::build::owner_name(requester.uid);
    tags.insert(OWNER_TAG.into(), owner.clone());
    tags.insert(OWNER_UID_TAG.into(), requester.uid.to_string());
    if spec.publish {
        tags.insert(PUBLISHED_TAG.into(), "true".into());
    }
    note(format!(
        "amidala: storing the image as a {} snapshot",
        provider.name()
    ));
    provider
        .import_image(
            image,
            SnapshotMeta {
                tags,
                owner_uid: requester.uid,
                build_id: None,
                source_snapshot: None,
                description: format!("amidala base import of {} by {owner}", spec.source_name),
            },
        )
        .await
}

async fn make_image(
    kind: SourceKind,
    source: &File,
    spec: &ImportSpec,
    requester: Requester,
    work: &Path,
    image: &Path,
    note: &impl Fn(String),
) -> Result<u64, Failure> {
    match kind {
        SourceKind::RawDisk => {
            note(format!("amidala: copying disk image {}", spec.source_name));
            let src = source
                .try_clone()
                .map_err(|e| Failure::io("reading the source", e))?;
            let (image, want) = (image.to_owned(), spec.size);
            blocking(move || {
                let len = src
                    .metadata()
                    .map_err(|e| Failure::io("reading the source", e))?
                    .len();
                if let Some(want) = want.filter(|&w| w < len) {
                    return Err(Failure::invalid(format!(
                        "--size {want} is smaller than the disk image ({len} bytes)"
                    )));
                }
                copy_to_new(&src, &image, 0o600, Keep::Durable)
                    .map_err(|e| Failure::io("copying the disk image", e))?;
                let out = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&image)
                    .map_err(|e| Failure::io("opening the snapshot", e))?;
                let size = want.unwrap_or(len).max(len);
                out.set_len(size)
                    .and_then(|()| out.sync_all())
                    .map_err(|e| Failure::io("sizing the snapshot", e))?;
                disk::locate_root(&out, None).map_err(|e| {
                    Failure::invalid(format!("the disk image has no usable root filesystem: {e}"))
                })?;
                Ok(size)
            })
            .await
        }
        SourceKind::Directory => {
            let src = source
                .try_clone()
                .map_err(|e| Failure::io("reading the source", e))?;
            let usage = blocking(move || {
                tree_usage(&PathBuf::from(format!("/proc/self/fd/{}", src.as_raw_fd())))
            })
            .await?;
            let size = filesystem_size(usage, spec.size)?;
            note(format!(
                "amidala: copying directory {} ({} MiB in {} files) into a {} MiB ext4 filesystem",
                spec.source_name,
                usage.bytes.div_ceil(MIB),
                usage.inodes,
                size / MIB
            ));
            mkfs_from(
                OwnedFd::from(
                    source
                        .try_clone()
                        .map_err(|e| Failure::io("reading the source", e))?,
                ),
                image,
                size,
                Some(requester),
            )
            .await?;
            Ok(size)
        }
        SourceKind::Tar(compression) => {
            note(format!(
                "amidala: unpacking {} ({compression:?})",
                spec.source_name
            ));
            let mut src = source
                .try_clone()
                .map_err(|e| Failure::io("reading the source", e))?;
            let staging = work.join("root");
            let staging2 = staging.clone();
            let usage = blocking(move || {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(staging2.parent().expect("has parent"))
                    .map_err(|e| Failure::io("creating the staging directory", e))?;
                fs::create_dir(&staging2)
                    .map_err(|e| Failure::io("creating the staging directory", e))?;
                src.rewind()
                    .map_err(|e| Failure::io("reading the archive", e))?;
                let reader: Box<dyn Read> = match compression {
                    Compression::None => Box::new(io::BufReader::new(src)),
                    Compression::Gzip => {
                        Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(src)))
                    }
                    Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(
                        io::BufReader::new(src),
                    )),
                };
                let mut archive = tar::Archive::new(reader);
                archive.set_preserve_permissions(true);
                archive.set_preserve_ownerships(true);
                archive.set_preserve_mtime(true);
                archive.set_unpack_xattrs(true);
                archive.set_overwrite(true);
                archive
                    .unpack(&staging2)
                    .map_err(|e| Failure::invalid(format!("unpacking the archive: {e}")))?;
                tree_usage(&staging2)
            })
            .await?;
            let size = filesystem_size(usage, spec.size)?;
            note(format!(
                "amidala: copying {} MiB in {} files into a {} MiB ext4 filesystem",
                usage.bytes.div_ceil(MIB),
                usage.inodes,
                size / MIB
            ));
            let dir = File::open(&staging)
                .map_err(|e| Failure::io("opening the staging directory", e))?;
            mkfs_from(OwnedFd::from(dir), image, size, None).await?;
            Ok(size)
        }
    }
}

/// Space a tree takes: bytes rounded to blocks, and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

fn tree_usage(root: &Path) -> Result<Usage, Failure> {
    let mut usage = Usage::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries =
            fs::read_dir(&dir).map_err(|e| Failure::io(format!("reading {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Failure::io(format!("reading {}", dir.display()), e))?;
            let meta = entry
                .metadata()
                .map_err(|e| Failure::io(format!("reading {}", entry.path().display()), e))?;
            usage.inodes += 1;
            usage.bytes += meta.size().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// A filesystem size that holds `usage` with room to spare, or the requested size if it does.
pub fn filesystem_size(usage: Usage, requested: Option<u64>) -> Result<u64, Failure> {
    let needed =
        (usage.bytes + usage.bytes / 5 + usage.inodes * 512 + 64 * MIB).div_ceil(MIB) * MIB;
    match requested {
        Some(size) if size < needed => Err(Failure::invalid(format!(
            "--size {} MiB is too small for the content, which needs about {} MiB",
            size / MIB,
            needed / MIB
        ))),
        Some(size) => Ok(size.div_ceil(MIB) * MIB),
        None => Ok(needed),
    }
}

/// Runs `mkfs.ext4 -d` from the directory `dir` into a new file `image` of `size` bytes; as
/// the requester if given (the file is theirs while mkfs runs, root's afterwards).
async fn mkfs_from(
    dir: OwnedFd,
    image: &Path,
    size: u64,
    as_user: Option<Requester>,
) -> Result<(), Failure> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(|e| Failure::io(format!("creating {}", image.display()), e))?;
    out.set_len(size)
        .map_err(|e| Failure::io("sizing the snapshot", e))?;
    let user = as_user.filter(|r| r.uid != 0);
    if let Some(r) = user {
        nix::unistd::fchown(out.as_raw_fd(), Some(r.uid.into()), Some(r.gid.into()))
            .map_err(|e| Failure::io("handing the image to mkfs", e))?;
    }
    let (src_fd, out_fd) = (dir.as_raw_fd(), out.as_raw_fd());
    let mut cmd = std::process::Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-L",
        "rootfs",
        "-E",
        "root_owner=0:0",
        "-d",
        "/proc/self/fd/3",
        "/proc/self/fd/4",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(r) = user {
        cmd.uid(r.uid).gid(r.gid);
    }
    // SAFETY: between fork and exec only dup2, which is async-signal-safe, on descriptors that
    // stay open until the command has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(src_fd, 3), (out_fd, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let output = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Failure::io("running mkfs.ext4 (is e2fsprogs installed?)", e))?;
    drop(dir);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Failure::new(
            ErrorCode::Io,
            format!("mkfs.ext4 failed ({}): {}", output.status, stderr.trim()),
        ));
    }
    if user.is_some() {
        nix::unistd::fchown(out.as_raw_fd(), Some(0.into()), Some(0.into()))
            .map_err(|e| Failure::io("taking back the image", e))?;
    }
    nix::sys::stat::fchmod(
        out.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Failure::io("setting the snapshot's mode", e))?;
    out.sync_all()
        .map_err(|e| Failure::io("syncing the snapshot", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sizes_leave_room_and_honour_requests() {
        let usage = Usage {
            bytes: 100 * MIB,
            inodes: 1000,
        };
        let auto = filesystem_size(usage, None).unwrap();
        assert!(auto >= 120 * MIB && auto % MIB == 0, "{auto}");
        assert_eq!(filesystem_size(usage, Some(1 << 30)).unwrap(), 1 << 30);
        let err = filesystem_size(usage, Some(10 * MIB)).unwrap_err();
        assert!(err.message.contains("too small"), "{}", err.message);
    }

    #[test]
    fn sources_are_recognised_by_content() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0x1f, 0x8b, 8, 0]).unwrap();
        assert_eq!(sniff(&f).unwrap(), Ok(SourceKind::Tar(Compression::Gzip)));
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0xFD, b'7', b'z', b'X', b'Z', 0]).unwrap();
        assert_eq!(sniff(&f).unwrap(), Ok(SourceKind::Tar(Compression::Xz)));
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(1);
        header.set_cksum();
        tar.append_data(&mut header, "x", &b"y"[..]).unwrap();
        let f = tempfile::tempfile().unwrap();
        (&f).write_all(&tar.into_inner().unwrap()).unwrap();
        assert_eq!(sniff(&f).unwrap(), Ok(SourceKind::Tar(Compression::None)));
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        assert!(sniff(&f)
            .unwrap()
            .unwrap_err()
            .contains("neither a tar archive"));
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x53, 0xEF], 1080).unwrap();
        assert_eq!(sniff(&f).unwrap(), Ok(SourceKind::RawDisk));
        // A partition table that is there but wrong is said to be so, with its fault.
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let mut entry = [0u8; 16];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
        f.write_all_at(&entry, 446).unwrap();
        f.write_all_at(&[0x55, 0xAA], 510).unwrap();
        let why = sniff(&f).unwrap().unwrap_err();
        assert!(
            why.contains("the table is invalid") && why.contains("beyond the end of the disk"),
            "{why}"
        );
        let f = tempfile::tempfile().unwrap();
        (&f).write_all(b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(sniff(&f).unwrap().unwrap_err().contains("qcow2"));
        assert!(sniff(&tempfile::tempfile().unwrap())
            .unwrap()
            .unwrap_err()
            .contains("empty"));
    }
}
