//! The partitions of a build's disk besides its root that the image's `/etc/fstab` mounts at
//! `/boot` and `/boot/efi`: mounted there while the provisioner runs, so that a kernel or boot
//! loader package writes where the image's own boot will look.
//!
//! The daemon attaches every other partition of the disk that holds a filesystem (see
//! [`crate::provider::Attachment`]) and describes them to the executor ([`BootPartition`]).
//! The executor reads the image's fstab once the root is mounted, before anything of the image
//! has run, and mounts the partitions it names (by `UUID=`, `PARTUUID=`, `LABEL=` or their
//! `/dev/disk/by-*` paths) on directories it reaches without following a symlink.
//!
//! A filesystem this host's kernel cannot mount (vfat, on a kernel built without it) is given
//! as a copy instead: its files are read out by mtools in the boot test's sandbox, as an id
//! of the build's owner's range (mtools parses what the user made, so never as root), into a
//! tmpfs as large as the partition, which the build sees at the mount point. If the build
//! succeeded and changed the copy, the partition is formatted again (same serial, so the
//! fstab's `UUID=` still names it, same label) and the copy written into it, by mtools in the
//! same sandbox.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstatat, SFlag};
use serde::{Deserialize, Serialize};

use crate::error::Failure;

/// Where an image's fstab may mount a partition that amidala mounts during a build, parents
/// first.
pub const TARGETS: [&str; 2] = ["/boot", "/boot/efi"];

/// A partition of the build's disk other than the root's, holding a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPartition {
    pub number: u32,
    /// Its loop device.
    pub device: PathBuf,
    /// The filesystem type, as the kernel names it.
    pub fs_type: String,
    pub uuid: Option<String>,
    pub partuuid: Option<String>,
    pub label: Option<String>,
    /// Where the kernel cannot mount `fs_type`: a directory of the daemon's holding a copy of
    /// its files, which the build is given in its place.
    #[serde(default)]
    pub copy: Option<PathBuf>,
}

impl BootPartition {
    /// Whether the fstab source `source` names this partition.
    fn is_named_by(&self, source: &str) -> bool {
        let value = |prefixes: [&str; 2]| {
            prefixes
                .iter()
                .find_map(|p| source.strip_prefix(p))
                .map(|v| v.trim_matches('"'))
        };
        let same = |ours: &Option<String>, theirs: Option<&str>, fold: bool| match (ours, theirs) {
            (Some(ours), Some(theirs)) if fold => ours.eq_ignore_ascii_case(theirs),
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => false,
        };
        same(&self.uuid, value(["UUID=", "/dev/disk/by-uuid/"]), true)
            || same(
                &self.partuuid,
                value(["PARTUUID=", "/dev/disk/by-partuuid/"]),
                true,
            )
            || same(&self.label, value(["LABEL=", "/dev/disk/by-label/"]), false)
    }
}

/// What the fstab `text` mounts of `parts` at [`TARGETS`], parents first: (target, partition)
/// pairs, and a warning for each entry at a target that names none of them. An entry marked
/// `noauto` is not mounted by the image's own boot either, and is left alone.
pub fn from_fstab<'a>(
    text: &str,
    parts: &'a [BootPartition],
) -> (Vec<(&'static str, &'a BootPartition)>, Vec<String>) {
    let (mut found, mut warnings) = (Vec::new(), Vec::new());
    for target in TARGETS {
        let entry = text.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next().filter(|s| !s.starts_with('#'))?;
            let at = fields.next()?;
            let options = fields.nth(1).unwrap_or("defaults");
            (at.trim_end_matches('/') == target && !options.split(',').any(|o| o == "noauto"))
                .then_some(source)
        });
        let Some(source) = entry else { continue };
        match parts.iter().find(|p| p.is_named_by(source)) {
            Some(part) => found.push((target, part)),
            None => warnings.push(format!(
                "amidala: warning: /etc/fstab mounts {source} at {target}, which is no partition \
                 of this disk: {target} is not mounted during the build"
            )),
        }
    }
    (found, warnings)
}

/// The partitions mounted during the build, in the executor's mount namespace.
#[derive(Debug, Default)]
pub struct Mounted {
    /// (target relative to the image's root, partition) in mount order.
    pub mounts: Vec<(String, BootPartition)>,
}

impl Mounted {
    /// The `/dev/disk/by-uuid` names and device numbers of the partitions mounted from their
    /// devices (not copies), for the build's `/dev`.
    pub fn disks(&self) -> Vec<(String, u64)> {
        self.mounts
            .iter()
            .filter(|(_, p)| p.copy.is_none() && p.fs_type != "btrfs")
            .filter_map(|(_, p)| {
                let rdev = nix::sys::stat::stat(&p.device).ok()?.st_rdev;
                Some((format!("/dev/disk/by-uuid/{}", p.uuid.as_ref()?), rdev))
            })
            .collect()
    }

    /// Unmounts them, children first; the first error.
    pub fn unmount(&mut self, root: &Path) -> Result<(), String> {
        let mut first = None;
        while let Some((rel, _)) = self.mounts.pop() {
            if let Err(e) = unmount_idle(&root.join(&rel)) {
                first.get_or_insert(format!("unmounting /{rel}: {e}"));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Unmounts `dir`, retrying briefly while the kernel finishes a PID namespace's teardown.
pub fn unmount_idle(dir: &Path) -> nix::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match umount2(dir, MntFlags::empty()) {
            Err(Errno::EBUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            done => return done,
        }
    }
}

/// Mounts what the image's fstab (`fstab`, its text if it has one) mounts at [`TARGETS`] of
/// `parts`, on the image mounted at `root` (open as `root_fd`), saying each in `note`.
/// A target that is missing, or reached through a symlink, is not mounted (said as a
/// warning); a partition that cannot be mounted fails the build.
pub fn mount_all(
    fstab: Option<&str>,
    parts: &[BootPartition],
    root: &Path,
    root_fd: BorrowedFd<'_>,
    note: &dyn Fn(String),
) -> Result<Mounted, String> {
    let mut mounted = Mounted::default();
    let Some(fstab) = fstab else {
        return Ok(mounted);
    };
    let (found, warnings) = from_fstab(fstab, parts);
    warnings.into_iter().for_each(note);
    for (target, part) in found {
        let rel = target.trim_start_matches('/');
        // Nothing of the image has run yet: a directory reached without a symlink stays one
        // until the mount is made.
        match crate::executor::open_path_at(root_fd, rel) {
            Ok(_) => {}
            Err(e) => {
                note(format!(
                    "amidala: warning: {target} in the image ({e}): partition {} is not mounted \
                     there during the build",
                    part.number
                ));
                continue;
            }
        }
        let path = root.join(rel);
        let attrs = crate::idmap::MOUNT_ATTR_NODEV | crate::idmap::MOUNT_ATTR_NOSUID;
        // Not btrfs under a shared name (see crate::executor's root_disk_name).
        let uuid = part.uuid.as_ref().filter(|_| part.fs_type != "btrfs");
        let done = match (&part.copy, uuid) {
            (Some(copy), _) => bind(copy, &path).map(|()| {
                format!(
                    "amidala: {target}: partition {} ({}, which this host's kernel cannot \
                     mount) given as a copy of its files, written back after the build if it \
                     changed",
                    part.number, part.fs_type
                )
            }),
            (None, uuid) => {
                // XFS: as the root is (see crate::executor's root_mount_data).
                let data = (part.fs_type == "xfs").then_some("nouuid");
                let mounted = match uuid {
                    Some(uuid) => crate::sys::mount_as(
                        &part.device,
                        &format!("/dev/disk/by-uuid/{uuid}"),
                        &path,
                        &part.fs_type,
                        data,
                        attrs,
                    ),
                    None => mount(
                        Some(&part.device),
                        &path,
                        Some(part.fs_type.as_str()),
                        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                        data,
                    )
                    .map_err(std::io::Error::from),
                };
                mounted
                    .map(|()| {
                        format!(
                            "amidala: mounted partition {} ({}) at {target}, as /etc/fstab says",
                            part.number, part.fs_type
                        )
                    })
                    .map_err(|e| e.to_string())
            }
        };
        match done {
            Ok(said) => {
                note(said);
                mounted.mounts.push((rel.to_owned(), part.clone()));
            }
            Err(e) => {
                let _ = mounted.unmount(root);
                return Err(format!(
                    "mounting partition {} ({}) at {target}, as /etc/fstab says: {e}",
                    part.number, part.fs_type
                ));
            }
        }
    }
    Ok(mounted)
}

/// Binds the directory `from` on `to`, nosuid and nodev.
fn bind(from: &Path, to: &Path) -> Result<(), String> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .and_then(|()| {
            mount(
                None::<&str>,
                to,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            )
        })
        .map_err(|e| e.to_string())
}

/// Whether this host's kernel can mount filesystems of type `fs` (`/proc/filesystems`).
pub fn kernel_mounts(fs: &str) -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|list| {
        list.lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    })
}

/// One entry of a copy's tree: its path, whether a directory, its length and modification
/// time; what says whether the build changed the copy.
type Entry = (Vec<u8>, bool, u64, i64, i64);

/// What a tree [`list_tree`] walks may hold (an ESP holds tens of files a few levels deep;
/// the build made this one, so it is bounded before the daemon holds its listing): entries,
/// levels, directories open at once, and bytes of paths.
const TREE_ENTRIES: usize = 16384;
const TREE_DEPTH: usize = 32;
const TREE_OPEN_DIRS: usize = 1024;
const TREE_PATH_BYTES: usize = 8 << 20;

/// Walks the tree of `dir` (no symlink followed, one filesystem) and lists it, sorted; with
/// `owner`, gives every entry to that id (the build's processes are gone: nothing races).
/// Anything but directories and regular files (which a FAT filesystem cannot hold) is an
/// error naming it.
pub fn list_tree(dir: &Path, owner: Option<u32>) -> Result<Vec<Entry>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| format!("opening the copy: {e}"))?
        .into();
    let root = Rc::new(root);
    let mut entries = Vec::new();
    let mut pending: Vec<(Rc<OwnedFd>, Vec<u8>)> = vec![(root, Vec::new())];
    let mut path_bytes = 0usize;
    let too_much = |what: &str| {
        format!(
            "the build left more in the copy than a boot partition holds: {what} (at most \
             {TREE_ENTRIES} entries, {TREE_DEPTH} levels, {TREE_OPEN_DIRS} directories in one \
             and {} MiB of paths)",
            TREE_PATH_BYTES >> 20
        )
    };
    while let Some((fd, prefix)) = pending.pop() {
        let mut listing = nix::dir::Dir::from_fd(
            nix::unistd::dup(fd.as_raw_fd()).map_err(|e| format!("reading the copy: {e}"))?,
        )
        .map_err(|e| format!("reading the copy: {e}"))?;
        for entry in listing.iter() {
            let entry = entry.map_err(|e| format!("reading the copy: {e}"))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let mut path = prefix.clone();
            path.push(b'/');
            path.extend_from_slice(name.as_bytes());
            path_bytes += path.len();
            if entries.len() >= TREE_ENTRIES || path_bytes > TREE_PATH_BYTES {
                return Err(too_much("too many entries"));
            }
            let shown = String::from_utf8_lossy(&path).into_owned();
            let st = fstatat(Some(fd.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| format!("reading {shown}: {e}"))?;
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            let is_dir = kind == SFlag::S_IFDIR;
            if !is_dir && kind != SFlag::S_IFREG {
                return Err(format!(
                    "the build left {shown}, which is neither a file nor a directory: a FAT \
                     filesystem cannot hold it"
                ));
            }
            if let Some(id) = owner {
                nix::unistd::fchownat(
                    Some(fd.as_raw_fd()),
                    name,
                    Some(id.into()),
                    Some(id.into()),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| format!("giving {shown} to the copier: {e}"))?;
                // Read and written by the copier alone (the tmpfs is its, mode 0700).
                let mode = if is_dir { 0o700 } else { 0o600 };
                let file = crate::sys::open_at(fd.as_fd(), name, OFlag::O_PATH)
                    .map_err(|e| format!("opening {shown}: {e}"))?;
                std::fs::set_permissions(
                    format!("/proc/self/fd/{}", file.as_raw_fd()),
                    std::os::unix::fs::PermissionsExt::from_mode(mode),
                )
                .map_err(|e| format!("setting the mode of {shown}: {e}"))?;
            }
            entries.push((
                path.clone(),
                is_dir,
                st.st_size as u64,
                st.st_mtime,
                st.st_mtime_nsec,
            ));
            if is_dir {
                if path.iter().filter(|&&b| b == b'/').count() > TREE_DEPTH {
                    return Err(too_much(&format!("{shown} is too deep")));
                }
                if pending.len() >= TREE_OPEN_DIRS {
                    return Err(too_much("too many directories"));
                }
                let sub =
                    crate::sys::open_at(fd.as_fd(), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                        .map_err(|e| format!("opening {shown}: {e}"))?;
                pending.push((Rc::new(sub), path));
            }
        }
    }
    entries.sort();
    Ok(entries)
}

/// The largest partition given as a copy (the copy is held in memory, a tmpfs).
pub const MAX_COPY: u64 = 1 << 30;

/// The name of the directory under the state's `tmp/` of build `build`'s copy of partition
/// `number`, which [`build_of_copy`] reads back (gc leaves a running build's copy alone).
pub fn copy_dir_name(build: &str, number: u32) -> String {
    format!("{build}-esp{number}")
}

/// The build whose copy the directory `name` is, if it is one.
pub fn build_of_copy(name: &str) -> Option<&str> {
    let (build, n) = name.rsplit_once("-esp")?;
    (build.starts_with("bld-") && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then_some(build)
}

/// A FAT partition's files, copied out for a build: a tmpfs of the daemon's (the copier's,
/// mode 0700) in the state's `tmp/`, unmounted and removed when dropped.
#[derive(Debug)]
pub struct Copy {
    pub dir: PathBuf,
    pub number: u32,
    /// Its loop device, and its place and length on the disk.
    device: PathBuf,
    start: u64,
    size: u64,
    fat: crate::disk::Fat,
    /// The tree as copied out.
    before: Vec<Entry>,
}

impl Drop for Copy {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.dir, MntFlags::MNT_DETACH) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting a partition's copy");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The device number of the block device `path`.
fn rdev(path: &Path) -> Result<u64, Failure> {
    nix::sys::stat::stat(path)
        .map(|st| st.st_rdev)
        .map_err(|e| {
            Failure::io(
                format!("reading {}", path.display()),
                std::io::Error::from(e),
            )
        })
}

/// The last line of what a tool said, for an error.
fn last_line(said: &str) -> &str {
    said.lines().last().unwrap_or("(it said nothing)")
}

impl Copy {
    /// Copies the files of the FAT partition `number` (`fat`, at `start` for `size` bytes, on
    /// the loop device `device`) out for build `build`, by mcopy as `uid` in the sandbox.
    #[allow(clippy::too_many_arguments)]
    pub async fn take(
        daemon: &crate::Daemon,
        build: &str,
        uid: u32,
        number: u32,
        device: &Path,
        (start, size): (u64, u64),
        fat: crate::disk::Fat,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Copy, Failure> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = daemon.catalog.tmp_dir().join(copy_dir_name(build, number));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Failure::io("making the directory of a partition's copy", e))?;
        // Room for what the partition holds, and for files of less than a page each.
        let options = format!(
            "size={},nr_inodes=65536,mode=700,uid={uid},gid={uid}",
            size + (16 << 20)
        );
        if let Err(e) = mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(options.as_str()),
        ) {
            let _ = std::fs::remove_dir(&dir);
            return Err(Failure::io(
                "mounting the tmpfs of a partition's copy",
                std::io::Error::from(e),
            ));
        }
        let mut copy = Copy {
            dir,
            number,
            device: device.to_owned(),
            start,
            size,
            fat,
            before: Vec::new(),
        };
        let tool = crate::bootvm::Tool {
            program: crate::bootvm::Program::Mcopy,
            args: &["-s", "-p", "-m", "-n", "-i", "/dev/source", "::/", "/out/"],
            disk: None,
            source: Some(rdev(device)?),
            out: Some(&copy.dir),
            limit: None,
            timeout: None,
        };
        let (code, said) = crate::bootvm::run_tool(daemon, uid, &tool, cancel).await?;
        if code != 0 {
            return Err(Failure::invalid(format!(
                "partition {number} (vfat) could not be read: mcopy exited with status {code}: {}",
                last_line(&said)
            )));
        }
        let dir = copy.dir.clone();
        copy.before =
            crate::error::blocking(move || list_tree(&dir, None).map_err(Failure::invalid)).await?;
        Ok(copy)
    }

    /// Writes the copy back into its partition if the build changed it, as `uid` in the
    /// sandbox: the partition formatted again with its serial and label, the tree copied in.
    /// What it did, for the build's log.
    pub async fn write_back(
        &self,
        daemon: &crate::Daemon,
        uid: u32,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<String>, Failure> {
        let dir = self.dir.clone();
        let after = crate::error::blocking(move || {
            list_tree(&dir, Some(uid)).map_err(|e| {
                Failure::invalid(format!("the copy of /boot/efi cannot be written back: {e}"))
            })
        })
        .await?;
        if after == self.before {
            return Ok(None);
        }
        let number = self.number;
        let disk = Some(rdev(&self.device)?);
        let serial = format!("{:08X}", self.fat.serial);
        let sectors = (self.size / 512).to_string();
        let hidden = (self.start / 512).to_string();
        let mut args = vec![
            "-i",
            "/dev/disk",
            "-N",
            &serial,
            "-T",
            &sectors,
            "-H",
            &hidden,
        ];
        if self.fat.fat32 {
            args.push("-F");
        }
        if let Some(label) = &self.fat.label {
            args.extend(["-v", label.as_str()]);
        }
        args.push("::");
        let tool = crate::bootvm::Tool {
            program: crate::bootvm::Program::Mformat,
            args: &args,
            disk,
            source: None,
            out: None,
            limit: None,
            timeout: None,
        };
        let (code, said) = crate::bootvm::run_tool(daemon, uid, &tool, cancel).await?;
        if code != 0 {
            return Err(Failure::io(
                format!("formatting partition {number} to write the build's /boot/efi back"),
                std::io::Error::other(format!(
                    "mformat exited with status {code}: {}",
                    last_line(&said)
                )),
            ));
        }
        // The top level's entries, as the copier sees them (`/out/NAME`).
        let tops: Vec<String> = after
            .iter()
            .filter(|e| e.0.iter().filter(|&&b| b == b'/').count() == 1)
            .map(|e| format!("/out{}", String::from_utf8_lossy(&e.0)))
            .collect();
        let files = after.iter().filter(|e| !e.1).count();
        if !tops.is_empty() {
            let mut args = vec!["-s", "-p", "-m", "-D", "o", "-i", "/dev/disk"];
            args.extend(tops.iter().map(String::as_str));
            args.push("::/");
            let tool = crate::bootvm::Tool {
                program: crate::bootvm::Program::Mcopy,
                args: &args,
                disk,
                source: None,
                out: Some(&self.dir),
                limit: None,
                timeout: None,
            };
            let (code, said) = crate::bootvm::run_tool(daemon, uid, &tool, cancel).await?;
            if code != 0 {
                return Err(Failure::new(
                    amidala::proto::ErrorCode::LimitExceeded,
                    format!(
                        "the build's /boot/efi could not be written back into partition {number}                          ({} MiB): mcopy exited with status {code}: {}",
                        self.size >> 20,
                        last_line(&said)
                    ),
                ));
            }
        }
        Ok(Some(format!(
            "amidala: wrote the build's /boot/efi ({files} files) back into partition {number}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, uuid: &str, partuuid: &str, label: Option<&str>) -> BootPartition {
        BootPartition {
            number,
            device: PathBuf::from(format!("/dev/loop{number}")),
            fs_type: "vfat".into(),
            uuid: Some(uuid.into()),
            partuuid: Some(partuuid.into()),
            label: label.map(Into::into),
            copy: None,
        }
    }

    #[test]
    fn fstabs_name_boot_partitions_by_uuid_partuuid_or_label() {
        let parts = [
            part(
                2,
                "ABCD-1234",
                "11111111-2222-3333-4444-555555555555",
                Some("UEFI"),
            ),
            part(
                3,
                "0e7c-aa",
                "66666666-2222-3333-4444-555555555555",
                Some("BOOT"),
            ),
        ];
        // amidala's own fstab; Debian's cloud image's (PARTUUID); Ubuntu's (LABEL).
        let (found, warnings) = from_fstab(
            "UUID=r / ext4 rw 0 1\nUUID=abcd-1234 /boot/efi vfat umask=0077 0 2\n",
            &parts,
        );
        assert_eq!(found, vec![("/boot/efi", &parts[0])]);
        assert!(warnings.is_empty());
        let (found, _) = from_fstab(
            "PARTUUID=11111111-2222-3333-4444-555555555555 /boot/efi vfat defaults 0 0\n",
            &parts,
        );
        assert_eq!(found, vec![("/boot/efi", &parts[0])]);
        let (found, _) = from_fstab(
            "LABEL=UEFI\t/boot/efi/ vfat umask=0077 0 1\nLABEL=BOOT /boot ext4 defaults 0 2\n",
            &parts,
        );
        assert_eq!(found, vec![("/boot", &parts[1]), ("/boot/efi", &parts[0])]);
        // Commented, noauto, another disk's, a label in the wrong case: not mounted.
        let (found, warnings) = from_fstab(
            "#UUID=ABCD-1234 /boot/efi vfat defaults 0 0\n\
             LABEL=BOOT /boot ext4 noauto 0 2\n\
             UUID=FFFF-0000 /boot/efi vfat defaults 0 0\n\
             LABEL=uefi /boot/efi vfat defaults 0 0\n",
            &parts,
        );
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("UUID=FFFF-0000"), "{warnings:?}");
    }

    #[test]
    fn copies_are_named_by_their_build() {
        let name = copy_dir_name("bld-0123abcd", 15);
        assert_eq!(build_of_copy(&name), Some("bld-0123abcd"));
        assert_eq!(build_of_copy("import-1234"), None);
        assert_eq!(build_of_copy("bld-12-esp"), None);
    }

    #[test]
    fn a_copys_tree_is_listed_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("EFI/BOOT")).unwrap();
        std::fs::write(dir.path().join("EFI/BOOT/BOOTX64.EFI"), b"grub").unwrap();
        let listed = list_tree(dir.path(), None).unwrap();
        let names: Vec<_> = listed
            .iter()
            .map(|e| String::from_utf8_lossy(&e.0).into_owned())
            .collect();
        assert_eq!(names, ["/EFI", "/EFI/BOOT", "/EFI/BOOT/BOOTX64.EFI"]);
        assert_eq!(listed, list_tree(dir.path(), None).unwrap());
        std::fs::write(dir.path().join("EFI/BOOT/BOOTX64.EFI"), b"grub2").unwrap();
        assert_ne!(listed, list_tree(dir.path(), None).unwrap());
        std::os::unix::fs::symlink("/etc", dir.path().join("EFI/etc")).unwrap();
        let why = list_tree(dir.path(), None).unwrap_err();
        assert!(why.contains("/EFI/etc") && why.contains("FAT"), "{why}");
    }

    #[test]
    fn a_copys_tree_is_bounded_before_its_listing_is_held() {
        // A chain of directories deeper than a boot partition's (the daemon would hold every
        // prefix of it), and more entries than one holds.
        let dir = tempfile::tempdir().unwrap();
        let deep: std::path::PathBuf = (0..TREE_DEPTH + 2).map(|_| "d").collect();
        std::fs::create_dir_all(dir.path().join(&deep)).unwrap();
        let why = list_tree(dir.path(), None).unwrap_err();
        assert!(why.contains("too deep"), "{why}");
        let wide = tempfile::tempdir().unwrap();
        for i in 0..=TREE_ENTRIES {
            std::fs::write(wide.path().join(i.to_string()), b"").unwrap();
        }
        let why = list_tree(wide.path(), None).unwrap_err();
        assert!(why.contains("too many entries"), "{why}");
    }
}
