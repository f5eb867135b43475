//! `amidala base import`: a directory, a rootfs tarball or a raw disk image becomes a snapshot.
//!
//! The source reaches the daemon as a descriptor the client opened, never as a path. No
//! privileged process parses what it holds:
//!
//! - a tarball (plain, gzip or xz, recognised by its first bytes) is read, decompressed and
//!   unpacked only by the import's sandbox ([`crate::importer`], [`crate::unpack`]): an
//!   unprivileged process of ids no host user has, in namespaces of its own, with a seccomp
//!   allow-list. A first pass measures what the archive holds (files' data, not the lengths of
//!   sparse ones), against what the import may take ([`Bounds`]: the state directory's free
//!   space and the user's quota); the daemon then makes an empty ext4 filesystem of that size
//!   (mkfs sees no byte of the user's), and a second pass unpacks the archive into it through
//!   the kernel, which cannot let it outgrow the filesystem. With `--size`, the first pass is
//!   skipped. Owners, modes, times, links, file capabilities and device nodes are kept;
//! - a directory is read by a process with the user's own credentials ([`crate::pack`]),
//!   which measures it, then writes it as a tar stream for the same sandbox;
//! - a raw disk image (a whole-disk ext4/xfs/btrfs filesystem, or an MBR/GPT disk with one
//!   in a partition) is copied as it is, holes kept, and grown to `--size` if that is larger;
//!   the daemon reads its partition table and superblock magic itself (bounds-checked Rust);
//! - a qcow2 image is converted to a raw one by `qemu-img` in the boot test's sandbox
//!   ([`crate::bootvm::run_tool`]: an id of the owner's range, no capabilities, the source and
//!   the new image as two loop devices and nothing else of the host's), then treated as a raw
//!   disk image. Its header is read first (bounds-checked Rust): one that names other files
//!   (a backing file, an external data file) or is encrypted is refused.
//!
//! The image file is root's (0600, in a directory of root's) from its first byte, and no
//! process of the user's ever holds it open: its filesystem is written through a loop device
//! and a mount in the helper's namespace. The snapshot file is renamed into place before its
//! catalog record is written; on any failure nothing is left behind.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use amidala::proto::{
    validate_source_name, validate_user_tags, ErrorCode, ImportSpec, Tag, BOOT_ARCH_TAG, BOOT_TAG,
    OWNER_TAG, OWNER_UID_TAG, PUBLISHED_TAG,
};

use crate::catalog::SnapshotRecord;
use crate::disk;
use crate::error::{blocking, Failure};
use crate::ids::new_id;
use crate::importer::{Job, Outcome, Task, IMPORT_ARG, INPUT_FD};
use crate::pack::PACK_ARG;
use crate::provider::{copy_to_new_within, Keep, Provider, SnapshotMeta};

/// Largest snapshot size accepted (EBS's own limit is 64 TiB; a local file this large is a typo).
pub const MAX_SIZE: u64 = 16 << 40;
const MIB: u64 = 1 << 20;

/// The peer the import is for.
#[derive(Debug, Clone)]
pub struct Requester {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as the client process held them.
    pub groups: Vec<u32>,
}

/// What an import may take: the space it may fill (free space of the state directory beyond
/// its reserve, the user's quota) and where its sandbox's ids start.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub bytes: u64,
    pub id_base: u32,
    /// Most seconds each pass may take.
    pub timeout: std::time::Duration,
    /// Of the free space and the quota, what other imports in flight had claimed when
    /// `bytes` was measured (see [`crate::claims`]).
    pub claimed: u64,
}

impl Bounds {
    /// The refusal of `what` (which names the source and how much it would take).
    fn refuse(&self, what: std::fmt::Arguments) -> Failure {
        let claimed = match self.claimed {
            0 => String::new(),
            claimed => format!(
                ", less the {} MiB imports in flight have claimed",
                claimed.div_ceil(MIB)
            ),
        };
        Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "{what} is more than this import may take ({} MiB: the state directory's free \
                 space beyond its reserve, and your quota{claimed})",
                self.bytes / MIB
            ),
        )
    }
}

/// What kind of source a descriptor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Directory,
    Tar(Compression),
    RawDisk,
    /// A qcow2 image (QEMU's format, the one most distributions publish cloud images in).
    Qcow2,
}

pub use crate::unpack::{Compression, Usage};

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
    if head.starts_with(disk::QCOW2_MAGIC) {
        return Ok(Ok(SourceKind::Qcow2));
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

/// Imports `source` as a new snapshot with the daemon's provider, staged in its catalog's
/// temporary directory. `note` receives progress lines for the client.
pub async fn import(
    daemon: &crate::Daemon,
    spec: ImportSpec,
    source: OwnedFd,
    requester: Requester,
    bounds: Bounds,
    in_flight: &crate::claims::InFlight,
    note: impl Fn(String),
) -> Result<SnapshotRecord, Failure> {
    validate_source_name(&spec.source_name)?;
    validate_user_tags("tags", &spec.tags)?;
    let provider: &dyn Provider = daemon.provider.as_ref();
    let staging_dir = daemon.catalog.tmp_dir();
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
    let result = make_image(
        daemon, kind, &source, &spec, &requester, bounds, in_flight, &work, &image, &note,
    )
    .await;
    // The boot loader's files, made by the daemon from the host's GRUB.
    for file in ["BOOTX64.EFI", "BOOTAA64.EFI", "core.img"] {
        let _ = fs::remove_file(work.join("grub").join(file));
    }
    // Mount points of the import's helper, mounted only in its own namespace, which is gone:
    // empty directories here, removed one by one (never recursively).
    for dir in [
        work.join("raw"),
        work.join("view"),
        work.join("grub"),
        work.clone(),
    ] {
        let _ = fs::remove_dir(dir);
    }
    let (boot, arch) = match result {
        Ok((_, boot, arch)) => (boot, arch),
        Err(e) => {
            let _ = fs::remove_file(&image);
            return Err(e);
        }
    };

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
    tags.insert(BOOT_TAG.into(), boot.into());
    if let Some(arch) = arch {
        tags.insert(BOOT_ARCH_TAG.into(), arch.name().into());
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

/// Makes the image file; returns its size, how it boots (the [`BOOT_TAG`] value) and, for a
/// bootable disk amidala made, for which machine ([`BOOT_ARCH_TAG`]).
#[allow(clippy::too_many_arguments)]
async fn make_image(
    daemon: &crate::Daemon,
    kind: SourceKind,
    source: &File,
    spec: &ImportSpec,
    requester: &Requester,
    bounds: Bounds,
    in_flight: &crate::claims::InFlight,
    work: &Path,
    image: &Path,
    note: &impl Fn(String),
) -> Result<(u64, &'static str, Option<crate::bootcfg::Arch>), Failure> {
    let compression = match kind {
        SourceKind::RawDisk | SourceKind::Qcow2 => {
            if spec.boot.is_some() {
                return Err(Failure::invalid(
                    "--boot is for directories and tarballs: a disk image is imported as it is, \
                     its own boot loader included",
                ));
            }
            let size = if kind == SourceKind::Qcow2 {
                convert_qcow2(
                    daemon, source, spec, requester, bounds, in_flight, image, note,
                )
                .await?
            } else {
                copy_disk(daemon, source, spec, bounds, in_flight, image, note).await?
            };
            let boot = File::open(image)
                .and_then(|f| crate::bootdisk::boot_modes(&f))
                .map_err(|e| Failure::io("reading the snapshot", e))?;
            return Ok((size, boot, None));
        }
        SourceKind::Directory => Compression::None,
        SourceKind::Tar(compression) => compression,
    };
    let cloned = || {
        source
            .try_clone()
            .map_err(|e| Failure::io("reading the source", e))
    };
    fs::DirBuilder::new()
        .mode(0o700)
        .create(work)
        .map_err(|e| Failure::io("creating the import's directory", e))?;
    for dir in ["raw", "view"] {
        fs::create_dir(work.join(dir))
            .map_err(|e| Failure::io("creating the import's directory", e))?;
    }
    // 1. What the content holds, so that the image is made to its size (unless --size says),
    // and whether it holds a kernel (unless --boot says what to do).
    let measure = spec.size.is_none() || spec.boot.is_none();
    let usage = match measure {
        false => Usage::default(),
        true => {
            note(format!("amidala: measuring {}", spec.source_name));
            let usage = match kind {
                SourceKind::Directory => {
                    let counted = run_packer(requester, cloned()?, "count", None, bounds).await?;
                    serde_json::from_slice::<Usage>(&counted).map_err(|_| {
                        Failure::invalid("reading the directory: the packer said nothing usable")
                    })?
                }
                _ => {
                    let job = helper_job(
                        Task::Scan {
                            budget: bounds.bytes,
                        },
                        compression,
                        true,
                        bounds,
                        work,
                    );
                    match run_helper(&job, OwnedFd::from(cloned()?), bounds).await? {
                        Outcome::Scanned(usage) => usage,
                        other => return Err(refused(other, &spec.source_name)),
                    }
                }
            };
            usage
        }
    };
    let bootable = spec.boot.unwrap_or(usage.bootable());
    if spec.boot == Some(true) && measure && !usage.bootable() {
        return Err(Failure::invalid(format!(
            "{}: --boot yes, but the tree holds no kernel ({}) with an initramfs ({})",
            spec.source_name,
            "/boot/vmlinuz-VERSION or /lib/modules/VERSION/vmlinuz",
            "/boot/initrd.img-VERSION or /boot/initramfs-VERSION.img"
        )));
    }
    if bootable {
        if let Some(missing) = crate::bootdisk::missing_tools() {
            return Err(Failure::new(
                ErrorCode::Io,
                format!(
                    "{}: the tree holds a kernel, and this host cannot make bootable disks: it \
                     lacks {missing} (or import with --boot no)",
                    spec.source_name
                ),
            ));
        }
    }
    // The root filesystem's size: --size is the whole disk's, partitions included.
    let around = if bootable {
        crate::bootdisk::ROOT_START + crate::bootdisk::TAIL
    } else {
        0
    };
    let requested = match spec.size {
        Some(size) if size <= around => {
            return Err(Failure::invalid(format!(
                "--size {} MiB is too small for a bootable disk, whose partitions before and \
                 after the root filesystem take {} MiB",
                size / MIB,
                around / MIB
            )))
        }
        other => other.map(|size| size - around),
    };
    let size = filesystem_size(usage, requested, bootable)?;
    let layout = bootable.then(|| crate::bootdisk::Layout::new(size));
    // What the image file will take: the filesystem's size with --size (the archive was not
    // measured; the kernel keeps it within), else what the content holds and the
    // filesystem's own structures (the image file is sparse: the rest is never written);
    // and the boot loader with its modules (about 10 MiB).
    let takes = match spec.size {
        Some(_) => size + around,
        None => usage.bytes + usage.bytes / 20 + usage.inodes * 512 + 16 * MIB,
    } + if bootable { 12 * MIB } else { 0 };
    if takes > bounds.bytes {
        return Err(bounds.refuse(format_args!(
            "{}: {} MiB",
            spec.source_name,
            takes.div_ceil(MIB)
        )));
    }
    // Claimed: what was measured. (A tree changed between the two passes can take more, up
    // to the filesystem's size; claiming that would refuse imports that fit, since its room
    // is never written otherwise.)
    daemon
        .imports
        .claim(daemon, in_flight, takes, false, image, &spec.source_name)
        .await?;
    // 2. An empty filesystem of that size (in partition 3 of a new GPT disk if bootable): mkfs
    // sees no byte of the user's.
    note(format!(
        "amidala: unpacking {}{} into a {} MiB ext4 filesystem{}",
        spec.source_name,
        if measure {
            format!(
                " ({} MiB in {} files)",
                usage.bytes.div_ceil(MIB),
                usage.inodes
            )
        } else {
            String::new()
        },
        size / MIB,
        if bootable {
            " on a bootable GPT disk"
        } else {
            ""
        }
    ));
    let placement = Placement {
        offset: if bootable {
            crate::bootdisk::ROOT_START
        } else {
            0
        },
        size,
        disk_size: layout.as_ref().map_or(size, |l| l.disk_size()),
        inodes: usage.inodes,
        uuid: layout.as_ref().map(|l| l.root_uuid.clone()),
    };
    {
        let (image, placement) = (image.to_owned(), placement.clone());
        blocking(move || empty_filesystem(&image, &placement)).await?;
    }
    // 3. The sandbox unpacks the content into it, through the kernel; the helper then writes
    // the boot menu and fstab (if bootable).
    let device = {
        let (image, offset) = (image.to_owned(), placement.offset);
        let len = if bootable { size } else { 0 };
        blocking(move || {
            crate::loopdev::LoopDevice::attach(&image, offset, len, false)
                .map_err(|e| Failure::io("attaching the new image", e))
        })
        .await?
    };
    let task = Task::Unpack {
        device: device.path().to_owned(),
        mount_dir: work.join("raw"),
        boot: layout.as_ref().map(|l| crate::bootcfg::Setup {
            root_uuid: l.root_uuid.clone(),
            esp_uuid: l.esp_uuid(),
            arches: crate::bootdisk::installable(),
        }),
    };
    let unpacked = match kind {
        SourceKind::Directory => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Failure::io("making a pipe", e))?;
            let job = helper_job(task, compression, false, bounds, work);
            let packer = run_packer(requester, cloned()?, "tar", Some(write), bounds);
            let helper = run_helper(&job, read, bounds);
            let (packed, unpacked) = tokio::join!(packer, helper);
            match (packed, unpacked) {
                (Ok(_), unpacked) => unpacked,
                // The sandbox stopped reading (the filesystem full, say): its error says why,
                // the packer's only that its pipe broke.
                (Err(e), Ok(failed @ Outcome::Failed(_))) if e.message.contains("Broken pipe") => {
                    Ok(failed)
                }
                // The packer's own error says what it could not read.
                (Err(e), Ok(Outcome::Failed(_)) | Err(_)) => Err(e),
                (Err(e), Ok(_)) => Err(e),
            }
        }
        _ => {
            let job = helper_job(task, compression, true, bounds, work);
            run_helper(&job, OwnedFd::from(cloned()?), bounds).await
        }
    };
    let released = blocking(move || {
        device
            .wait_unused(crate::provider::RELEASE_TIMEOUT)
            .and_then(|()| device.detach(crate::provider::RELEASE_TIMEOUT))
            .map_err(|e| Failure::io("detaching the new image", e))
    })
    .await;
    let boot = match unpacked? {
        Outcome::Unpacked {
            entries,
            specials,
            skipped_xattrs,
            discarded,
            boot,
        } => {
            released?;
            note(format!("amidala: unpacked {entries} entries"));
            if specials > 0 {
                note(format!("amidala: made {specials} device nodes and FIFOs"));
            }
            if skipped_xattrs > 0 {
                note(format!(
                    "amidala: skipped {skipped_xattrs} extended attributes an import may not set \
                     (security labels, trusted.*)"
                ));
            }
            if !discarded {
                note("amidala: the image's free blocks could not be discarded".into());
            }
            if let Some(done) = &boot {
                note(format!(
                    "amidala: boot menu for {} kernel {}{}",
                    done.arch.name(),
                    done.kernels.join(", "),
                    if done.wrote_fstab {
                        "; /etc/fstab written (root and ESP by UUID)"
                    } else {
                        "; the tree's own /etc/fstab kept"
                    }
                ));
            }
            boot
        }
        other => return Err(refused(other, &spec.source_name)),
    };
    // 4. The partition table, with the root partition's type of the kernel's architecture, and
    // the boot loader: for legacy BIOS and UEFI on x86-64, UEFI on arm64.
    if let Some(mut layout) = layout {
        let done = boot.ok_or_else(|| {
            Failure::new(
                ErrorCode::Internal,
                "the import's helper did not make the tree bootable",
            )
        })?;
        layout.arch = done.arch;
        note(
            match layout.arch {
                crate::bootcfg::Arch::X86_64 => "amidala: installing GRUB for legacy BIOS and UEFI",
                crate::bootcfg::Arch::Arm64 => "amidala: installing GRUB for UEFI (arm64)",
            }
            .into(),
        );
        let (image, dir, size) = (image.to_owned(), work.join("grub"), layout.disk_size());
        blocking(move || {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Failure::io("creating the boot loader's directory", e))?;
            crate::bootdisk::partition(&image, &layout)?;
            crate::bootdisk::install_loader(&image, &layout, &dir)
        })
        .await?;
        return Ok((size, done.arch.boot_modes(), Some(done.arch)));
    }
    Ok((size, "none", None))
}

/// The refusal of an import whose pass did not succeed.
fn refused(outcome: Outcome, name: &str) -> Failure {
    match outcome {
        Outcome::Failed(why) if why.contains("holds more than") => Failure::new(
            ErrorCode::LimitExceeded,
            format!("{name}: not imported: {why}"),
        ),
        Outcome::Failed(why) => Failure::invalid(format!("{name}: not imported: {why}")),
        other => Failure::new(
            ErrorCode::Internal,
            format!("the import helper answered {other:?}"),
        ),
    }
}

fn helper_job(
    task: Task,
    compression: Compression,
    positioned: bool,
    bounds: Bounds,
    work: &Path,
) -> Job {
    Job {
        task,
        compression,
        positioned,
        id_base: bounds.id_base,
        view_dir: work.join("view"),
    }
}

/// Runs a pass of the import helper on `input` (the archive, descriptor 3) and returns what
/// it says.
async fn run_helper(job: &Job, input: OwnedFd, bounds: Bounds) -> Result<Outcome, Failure> {
    use tokio::io::AsyncWriteExt;
    let mut child = crate::spawn::spawn(&crate::spawn::Spec {
        program: crate::helper::program().as_os_str(),
        args: vec!["amidalad-import".as_ref(), IMPORT_ARG.as_ref()],
        env: vec![("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        pass: Some((input.as_fd(), INPUT_FD)),
        cgroup: None,
        creds: None,
        stdout: None,
    })
    .map_err(|e| Failure::io("starting the import helper", e))?;
    drop(input);
    let mut stdin = child.stdin.take().expect("piped");
    let job = serde_json::to_vec(job).expect("jobs serialize");
    stdin
        .write_all(&job)
        .await
        .map_err(|e| Failure::io("sending the import helper its job", e))?;
    drop(stdin);
    let (status, out, err) = collect(child, bounds.timeout, "the import").await?;
    serde_json::from_slice::<Outcome>(&out).map_err(|_| {
        let err = String::from_utf8_lossy(&err);
        Failure::new(
            ErrorCode::Internal,
            format!(
                "the import helper ended ({status}) without an answer: {}",
                err.trim().lines().last().unwrap_or("")
            ),
        )
    })
}

/// Runs the packer with the requester's credentials on the directory `dir`: `count` returns
/// what it printed, `tar` writes the stream to `out`.
async fn run_packer(
    requester: &Requester,
    dir: File,
    mode: &str,
    out: Option<OwnedFd>,
    bounds: Bounds,
) -> Result<Vec<u8>, Failure> {
    let mut child = crate::spawn::spawn(&crate::spawn::Spec {
        program: crate::helper::program().as_os_str(),
        args: vec!["amidalad-pack".as_ref(), PACK_ARG.as_ref(), mode.as_ref()],
        env: vec![("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        pass: Some((dir.as_fd(), crate::pack::DIR_FD)),
        cgroup: None,
        creds: Some(crate::spawn::Creds {
            uid: requester.uid,
            gid: requester.gid,
            groups: requester.groups.clone(),
        }),
        stdout: out.as_ref().map(|fd| fd.as_fd()),
    })
    .map_err(|e| Failure::io("starting the directory's reader", e))?;
    drop((dir, out));
    drop(child.stdin.take());
    let (status, said, err) = collect(child, bounds.timeout, "reading the directory").await?;
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(Failure::invalid(format!(
            "reading the directory with your rights: {}",
            err.trim().lines().last().unwrap_or("it failed")
        )));
    }
    Ok(said)
}

/// What a child says (at most 1 MiB on stdout, 64 KiB on stderr) until it ends, and how it
/// ended; past `timeout`, it is killed and `what` did not finish.
async fn collect(
    mut child: crate::spawn::Child,
    timeout: std::time::Duration,
    what: &str,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), Failure> {
    use tokio::io::AsyncReadExt;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut stdout = child.stdout.take().expect("piped").take(1 << 20);
    let mut stderr = child.stderr.take().expect("piped").take(64 << 10);
    let read = tokio::time::timeout(timeout, async {
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e)
    })
    .await;
    let io = |e| Failure::io(format!("{what}: waiting for its process"), e);
    match read {
        Ok(read) => {
            read.map_err(io)?;
            let status = child.wait().await.map_err(io)?;
            Ok((status, out, err))
        }
        Err(_) => {
            child.kill().await.map_err(io)?;
            Err(Failure::new(
                ErrorCode::Timeout,
                format!(
                    "{what} did not finish within {} s ([limits] import_timeout)",
                    timeout.as_secs()
                ),
            ))
        }
    }
}

/// Where the root filesystem goes in a new image file.
#[derive(Debug, Clone)]
struct Placement {
    /// Its offset in the file and its size.
    offset: u64,
    size: u64,
    /// The file's size.
    disk_size: u64,
    /// Inodes it must have room for, at least.
    inodes: u64,
    /// Its UUID (else mkfs chooses).
    uuid: Option<String>,
}

/// A new, empty ext4 filesystem placed as `at` says in the new (sparse) file `image` (root's,
/// 0600); a bootable disk's partition table is written once the tree's kernel has told its
/// architecture.
fn empty_filesystem(image: &Path, at: &Placement) -> Result<(), Failure> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(|e| Failure::io(format!("creating {}", image.display()), e))?;
    out.set_len(at.disk_size)
        .map_err(|e| Failure::io("sizing the image", e))?;
    // The default of one inode per 16 KiB, or more for a tree of many small files.
    let inodes = (at.size / 16384).max(at.inodes + at.inodes / 4 + 1024);
    let mut mkfs = std::process::Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", crate::bootcfg::ROOT_LABEL, "-E"])
        .arg(format!("root_owner=0:0,nodiscard,offset={}", at.offset))
        .arg("-N")
        .arg(inodes.to_string());
    if let Some(uuid) = &at.uuid {
        mkfs.args(["-U", uuid]);
    }
    let output = mkfs
        .arg(image)
        .arg(format!("{}k", at.size / 1024))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Failure::io("running mkfs.ext4 (is e2fsprogs installed?)", e))?;
    if !output.status.success() {
        return Err(Failure::new(
            ErrorCode::Io,
            format!(
                "mkfs.ext4 failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// The room a bootable tree's filesystem gets for a kernel update (the file is sparse: room
/// never written costs nothing).
const KERNEL_UPDATE_ROOM: u64 = 512 * MIB;

/// A raw disk image, copied as it is (holes kept), after checking it fits.
async fn copy_disk(
    daemon: &crate::Daemon,
    source: &File,
    spec: &ImportSpec,
    bounds: Bounds,
    in_flight: &crate::claims::InFlight,
    image: &Path,
    note: &impl Fn(String),
) -> Result<u64, Failure> {
    note(format!("amidala: copying disk image {}", spec.source_name));
    let src = source
        .try_clone()
        .map_err(|e| Failure::io("reading the source", e))?;
    let (want, name) = (spec.size, spec.source_name.clone());
    // What it holds (its data regions), against what the import may take, and claimed.
    let (src, len, size, data) = blocking(move || {
        let len = disk::disk_size(&src).map_err(|e| Failure::io("reading the source", e))?;
        let size = disk_size_wanted(want, len, &name)?;
        let data = disk::data_bytes(&src, len).map_err(|e| Failure::io("reading the source", e))?;
        if data > bounds.bytes {
            return Err(bounds.refuse(format_args!("{name}: {} MiB of data", data / MIB)));
        }
        Ok((src, len, size, data))
    })
    .await?;
    daemon
        .imports
        .claim(daemon, in_flight, data, false, image, &spec.source_name)
        .await?;
    // The copy is measured against the claim.
    let bounds = Bounds {
        bytes: data,
        ..bounds
    };
    let (image, name) = (image.to_owned(), spec.source_name.clone());
    blocking(move || {
        // The copy writes no more than was claimed, whatever the source holds by then.
        copy_to_new_within(&src, &image, 0o600, Keep::Durable, Some(bounds.bytes)).map_err(
            |e| match e.kind() {
                io::ErrorKind::FileTooLarge => bounds.refuse(format_args!(
                    "{name} changed while it was copied: more than {} MiB of data",
                    bounds.bytes / MIB
                )),
                _ => Failure::io("copying the disk image", e),
            },
        )?;
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .map_err(|e| Failure::io("opening the snapshot", e))?;
        finish_disk(
            &out,
            len,
            size,
            bounds,
            &name,
            "changed while it was copied",
        )
    })
    .await
    .map(|(size, grown)| {
        if let Some(said) = grown {
            note(said);
        }
        size
    })
}

/// The size of the disk made of an image of `len` bytes: `--size` (`want`) if given, which
/// may not be smaller.
fn disk_size_wanted(want: Option<u64>, len: u64, name: &str) -> Result<u64, Failure> {
    if let Some(want) = want.filter(|&w| w < len) {
        return Err(Failure::invalid(format!(
            "--size {want} is smaller than the disk image ({len} bytes)"
        )));
    }
    let size = want.unwrap_or(len).max(len);
    if size > MAX_SIZE {
        return Err(Failure::invalid(format!(
            "{name}: a disk of {size} bytes is larger than the limit of 16 TiB"
        )));
    }
    Ok(size)
}

/// Finishes the copy `out` of a disk image of `len` bytes as a disk of `size`: sized, its data
/// measured against the import's bounds (`changed` says how a copy can hold more than was
/// measured), its root filesystem found and, on a longer disk, its partition table and root
/// partition grown. Returns the size and what growth says.
fn finish_disk(
    out: &File,
    len: u64,
    size: u64,
    bounds: Bounds,
    name: &str,
    changed: &str,
) -> Result<(u64, Option<String>), Failure> {
    out.set_len(size)
        .and_then(|()| out.sync_all())
        .map_err(|e| Failure::io("sizing the snapshot", e))?;
    // Measured on the copy: the source is the user's, who may have filled it in since it was
    // measured (or compressed it).
    let copied = disk::data_bytes(out, size).map_err(|e| Failure::io("reading the snapshot", e))?;
    if copied > bounds.bytes {
        return Err(bounds.refuse(format_args!(
            "{name} {changed}: {} MiB of data",
            copied / MIB
        )));
    }
    let root = disk::locate_root(out, None).map_err(|e| {
        Failure::invalid(format!("the disk image has no usable root filesystem: {e}"))
    })?;
    // A longer disk: its table to the end and the root partition with it; the filesystem
    // is grown by the first build (mounted: see crate::grow::grow_filesystem).
    let mut grown = None;
    if let (Some(n), true) = (root.partition, size > len) {
        let growth = crate::grow::grow_table(out, n)
            .map_err(|e| Failure::io("growing the partition table to the disk", e))?;
        grown = growth.map(|g| g.describe(n));
    }
    Ok((size, grown))
}

/// Converts the qcow2 image `source` into the new raw image file `image` with `qemu-img`,
/// sandboxed as the boot test's QEMU is, as an id of the owner's range; returns the disk's
/// size.
#[allow(clippy::too_many_arguments)]
async fn convert_qcow2(
    daemon: &crate::Daemon,
    source: &File,
    spec: &ImportSpec,
    requester: &Requester,
    bounds: Bounds,
    in_flight: &crate::claims::InFlight,
    image: &Path,
    note: &impl Fn(String),
) -> Result<u64, Failure> {
    use crate::bootvm::{Program, Tool};
    use crate::loopdev::LoopDevice;
    use std::os::unix::fs::OpenOptionsExt;
    let name = spec.source_name.clone();
    if !Path::new(crate::bootvm::QEMU_IMG).exists() {
        return Err(Failure::new(
            ErrorCode::Io,
            format!(
                "{name}: this host cannot convert qcow2 images: it lacks {} (package \
                 qemu-utils)",
                crate::bootvm::QEMU_IMG
            ),
        ));
    }
    let src = source
        .try_clone()
        .map_err(|e| Failure::io("reading the source", e))?;
    let header =
        blocking(move || disk::read_qcow2(&src).map_err(|e| Failure::io("reading the source", e)))
            .await?
            .map_err(|why| Failure::invalid(format!("{name}: not imported: {why}")))?;
    let len = header.virtual_size;
    let size = disk_size_wanted(spec.size, len, &name)?;
    // Its clusters may expand to the whole disk it holds (many entries may name one cluster):
    // that is claimed, or what is left if less, and the conversion is stopped past it.
    let claimed = daemon
        .imports
        .claim(daemon, in_flight, len, true, image, &name)
        .await?;
    let bounds = Bounds {
        bytes: claimed.min(bounds.bytes),
        ..bounds
    };
    note(format!(
        "amidala: converting qcow2 image {name} (a disk of {} MiB) with qemu-img",
        len.div_ceil(MIB)
    ));
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(image)
        .map_err(|e| Failure::io("creating the snapshot", e))?;
    out.set_len(len)
        .map_err(|e| Failure::io("sizing the snapshot", e))?;
    // The source and the new image as block devices, the only files the sandbox is given:
    // the source read-only.
    let (src, path, label) = (
        source
            .try_clone()
            .map_err(|e| Failure::io("reading the source", e))?,
        image.to_owned(),
        name.clone(),
    );
    let (from, to) = blocking(move || {
        let from = LoopDevice::attach_file(&src, Path::new(&label), 0, 0, true)
            .map_err(|e| Failure::io("attaching the qcow2 image", e))?;
        let to = LoopDevice::attach(&path, 0, 0, false)
            .map_err(|e| Failure::io("attaching the new image", e))?;
        Ok((from, to))
    })
    .await?;
    let rdev = |dev: &LoopDevice| {
        nix::sys::stat::stat(dev.path())
            .map(|st| st.st_rdev)
            .map_err(|e| {
                Failure::io(
                    format!("reading {}", dev.path().display()),
                    io::Error::from(e),
                )
            })
    };
    let ran = match (rdev(&from), rdev(&to)) {
        (Ok(from_dev), Ok(to_dev)) => {
            let uid = crate::bootvm::vm_uid(daemon, requester.uid)?;
            let tool = Tool {
                program: Program::QemuImg,
                // -n: the new image exists (and reads as zeros, which are not written: it
                // stays sparse); -m 1: one request at a time, within the sandbox's processes.
                args: &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    "-n",
                    "--target-is-zero",
                    // Written past the loop device's cache, so that what it has written is
                    // what the output's size shows (and a stop leaves nothing to flush).
                    "-t",
                    "none",
                    "-m",
                    "1",
                    "/dev/source",
                    "/dev/disk",
                ],
                disk: Some(to_dev),
                source: Some(from_dev),
                out: None,
                limit: Some((&out, bounds.bytes)),
                timeout: Some((bounds.timeout, "[limits] import_timeout")),
            };
            crate::bootvm::run_tool(daemon, uid, &tool, &daemon.shutdown).await
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    // Both released before the image is read again (qemu-img does not flush: the detach
    // writes what it left in the device's cache).
    let released = blocking(move || {
        let released = to.detach(Duration::from_secs(10));
        from.detach(Duration::from_secs(10))
            .and(released)
            .map_err(|e| Failure::io("detaching the conversion's loop devices", e))
    })
    .await;
    let (code, said) = ran.map_err(|f| {
        if f.code == ErrorCode::LimitExceeded {
            bounds.refuse(format_args!(
                "{name}: not imported (qemu-img was stopped): the data of the disk it holds"
            ))
        } else {
            f
        }
    })?;
    released?;
    if code != 0 {
        let last = said.lines().last().unwrap_or("").trim();
        return Err(Failure::invalid(format!(
            "{name}: not imported: qemu-img could not convert it (exit status {code}): {last}"
        )));
    }
    let name = spec.source_name.clone();
    blocking(move || finish_disk(&out, len, size, bounds, &name, "converted"))
        .await
        .map(|(size, grown)| {
            if let Some(said) = grown {
                note(said);
            }
            size
        })
}

/// A filesystem size that holds `usage` with room to spare, or the requested size if it does.
pub fn filesystem_size(
    usage: Usage,
    requested: Option<u64>,
    bootable: bool,
) -> Result<u64, Failure> {
    // A bootable tree gets room for a kernel update besides: dpkg unpacks the new kernel's
    // modules beside the old ones, and the initramfs is made again beside the old one.
    let update = if bootable { KERNEL_UPDATE_ROOM } else { 0 };
    let needed = (usage.bytes + usage.bytes / 5 + usage.inodes * 512 + 64 * MIB + update)
        .div_ceil(MIB)
        * MIB;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sizes_leave_room_and_honour_requests() {
        let usage = Usage {
            bytes: 100 * MIB,
            inodes: 1000,
            ..Usage::default()
        };
        let auto = filesystem_size(usage, None, false).unwrap();
        assert_eq!(
            filesystem_size(usage, None, true).unwrap(),
            auto + KERNEL_UPDATE_ROOM
        );
        assert!(auto >= 120 * MIB && auto % MIB == 0, "{auto}");
        assert_eq!(
            filesystem_size(usage, Some(1 << 30), false).unwrap(),
            1 << 30
        );
        let err = filesystem_size(usage, Some(10 * MIB), false).unwrap_err();
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
        assert_eq!(sniff(&f).unwrap().unwrap(), SourceKind::Qcow2);
        assert!(sniff(&tempfile::tempfile().unwrap())
            .unwrap()
            .unwrap_err()
            .contains("empty"));
    }
}
