//! A build's `/workspace`: the user's directory, seen with the user's rights.
//!
//! The client hands the daemon a directory descriptor it opened itself. The executor does not
//! bind-mount it as it is (the provisioner is root, and would read and write it with root's
//! rights: a workspace of `/etc` would give it `/etc/shadow`); it shows it through an
//! idmapped mount ([`crate::idmap`]) in which the user's files are root's and everyone else's
//! nobody's. Root in the build then reads a file of another user only if others may, cannot
//! use `CAP_DAC_OVERRIDE` or `CAP_FOWNER` on it, writes new files as the user, and cannot give a
//! file to anyone else (`EOVERFLOW`). Device nodes cannot be made (no `CAP_MKNOD`) and the mount
//! is `nosuid,nodev`.
//!
//! What the kernel still lets an owner do, the build can do to the user's files: set the
//! setuid and setgid bits (to the user's own ids) and write file capabilities (which the
//! idmapping stores as owned by the user's uid, so that they grant nothing outside a user
//! namespace of the user's). A user may do as much to their own files, but a recipe should not
//! leave a setuid binary in someone's home unasked: after a read-write build, every file the
//! build changed (its ctime is later than the build's start) loses its setuid and setgid bits
//! and file capabilities. This is done through the same kind of idmapped view, so that it can
//! touch nothing the build could not.
//!
//! The user root is the exception: the workspace is shown as it is (root's rights are the
//! host's anyway), only `nosuid,nodev`, and not scrubbed.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstatat, SFlag};

use crate::idmap;

/// The descriptor number of the workspace in the executor.
pub const WORKSPACE_FD: RawFd = 3;

/// The workspace's views, made in the daemon's mount namespace (where its descriptor's mount
/// is) before the build's own.
#[derive(Debug)]
pub struct Workspace {
    /// The view the provisioner gets, to attach on the image's `/workspace`.
    pub view: OwnedFd,
    /// A read-write view of the same kind for the scrub after a read-write build.
    scrub_view: Option<OwnedFd>,
}

/// The owner of a build, as the daemon saw its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Workspace {
    /// The views of the workspace at `dir` for a build of `owner` whose root is host id
    /// `root` (0, or the base of the provisioner's user namespace). The scrub's view shows
    /// the user's files as host root's, for the executor, which is.
    pub fn prepare(
        dir: BorrowedFd<'_>,
        owner: Owner,
        read_write: bool,
        root: u32,
    ) -> Result<Workspace, String> {
        let mapped = owner.uid != 0;
        let view = |read_write: bool, root: u32| -> Result<OwnedFd, String> {
            let userns = if mapped {
                let (uids, gids) = idmap::user_as_root(owner.uid, owner.gid, root);
                Some(
                    idmap::user_namespace(&uids, &gids)
                        .map_err(|e| format!("making the workspace's id mapping: {e}"))?,
                )
            } else {
                None
            };
            let tree = idmap::clone_tree(dir).map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => "the workspace is not in amidalad's mount namespace (a \
                                       client in a container cannot hand one over): build from a \
                                       directory of the host"
                    .to_owned(),
                _ => format!("cloning the workspace's mount: {e}"),
            })?;
            let attrs = idmap::workspace_attrs(read_write, mapped);
            idmap::set_attrs(tree.as_fd(), attrs, userns.as_ref().map(|u| u.as_fd())).map_err(
                |e| match e.raw_os_error() {
                    Some(libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP) if mapped => format!(
                        "the workspace's filesystem ({}) cannot show it with your rights: it does \
                         not support idmapped mounts ({e}); build from a directory on ext4, xfs, \
                         btrfs or tmpfs",
                        idmap::fs_type_name(dir)
                    ),
                    _ => format!("setting the workspace's mount attributes: {e}"),
                },
            )?;
            Ok(tree)
        };
        Ok(Workspace {
            view: view(read_write, root)?,
            scrub_view: if read_write && mapped {
                Some(view(true, 0)?)
            } else {
                None
            },
        })
    }

    /// After a read-write build: clears the setuid and setgid bits and file capabilities of
    /// every file the build changed (ctime at or after `since`, seconds since the epoch).
    /// Returns how many files it cleared.
    pub fn scrub(&self, since: i64) -> Result<usize, String> {
        let Some(view) = &self.scrub_view else {
            return Ok(0);
        };
        scrub_tree(view.as_fd(), since).map_err(|e| format!("checking the workspace: {e}"))
    }
}

const PRIVILEGE_BITS: u32 = 0o6000;

/// Whether the file at `proc_path` (a `/proc/self/fd/N` link) has file capabilities.
fn has_file_caps(proc_path: &CString) -> bool {
    // SAFETY: getxattr with a valid C path and a null buffer of size 0 only returns the size.
    let n = unsafe {
        libc::getxattr(
            proc_path.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n >= 0
}

/// Walks the tree of `root` (one filesystem, no symlink followed) and scrubs the regular files
/// changed since `since`. Directories are opened one level at a time: the descriptors held are
/// those of the directories whose entries are still to be walked.
fn scrub_tree(root: BorrowedFd<'_>, since: i64) -> io::Result<usize> {
    // A mount's descriptor (from open_tree) is a path, not an open directory: one to read.
    let root = Rc::new(crate::sys::open_at(
        root,
        OsStr::new("."),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
    )?);
    let device = nix::sys::stat::fstat(root.as_raw_fd())?.st_dev;
    let mut pending: Vec<(Rc<OwnedFd>, std::ffi::OsString)> = Vec::new();
    let mut cleared = 0;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop().or_else(|| {
        pending.pop().and_then(|(parent, name)| {
            crate::sys::open_at(parent.as_fd(), &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .ok()
                .map(Rc::new)
        })
    }) {
        let mut entries = nix::dir::Dir::from_fd(nix::unistd::dup(dir.as_raw_fd())?)?;
        for entry in entries.iter() {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let st = match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFDIR {
                if st.st_dev == device {
                    pending.push((dir.clone(), name.to_owned()));
                }
                continue;
            }
            if kind != SFlag::S_IFREG || st.st_ctime < since {
                continue;
            }
            cleared += usize::from(scrub_file(dir.as_fd(), name)?);
        }
    }
    Ok(cleared)
}

/// Clears the setuid and setgid bits and file capabilities of the regular file `name` in
/// `dir`, if it has any; whether it had. Acts on the file opened (`O_PATH`, not following a
/// symlink), never on what a name resolves to later.
fn scrub_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let file = match crate::sys::open_at(dir, name, OFlag::O_PATH) {
        Ok(file) => file,
        Err(Errno::ENOENT | Errno::ELOOP) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let st = nix::sys::stat::fstat(file.as_raw_fd())?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Ok(false);
    }
    let link = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("no NUL");
    let caps = has_file_caps(&link);
    if st.st_mode & PRIVILEGE_BITS == 0 && !caps {
        return Ok(false);
    }
    // Changing the owner (to the owner it has: root, in this view) is what makes the kernel
    // drop file capabilities and the setuid bit.
    // SAFETY: fchownat with AT_EMPTY_PATH on an open O_PATH descriptor and an empty path.
    let rc = unsafe {
        libc::fchownat(
            file.as_raw_fd(),
            c"".as_ptr(),
            0,
            libc::gid_t::MAX,
            libc::AT_EMPTY_PATH,
        )
    };
    Errno::result(rc)?;
    // And whatever setgid bit is left (one without group execute), on the opened file.
    // SAFETY: chmod of the magic link of an open descriptor: the opened file itself.
    let rc = unsafe { libc::chmod(link.as_ptr(), (st.st_mode & 0o1777) as libc::mode_t) };
    Errno::result(rc)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_scrub_clears_privileges_of_changed_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let old = root.join("old-setuid");
        std::fs::write(&old, "x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 1;
        std::thread::sleep(std::time::Duration::from_millis(1100));
        for (path, mode) in [
            ("a/b/setuid", 0o4755),
            ("a/setgid", 0o2750),
            ("plain", 0o755),
        ] {
            std::fs::write(root.join(path), "x").unwrap();
            std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("a/link")).unwrap();
        let fd = std::fs::File::open(root).unwrap();
        assert_eq!(scrub_tree(fd.as_fd(), since).unwrap(), 2);
        let mode = |p: &str| {
            std::fs::symlink_metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("a/b/setuid"), 0o755);
        assert_eq!(mode("a/setgid"), 0o750);
        assert_eq!(mode("plain"), 0o755);
        assert_eq!(mode("old-setuid"), 0o4755, "not changed by the build");
        assert_ne!(
            std::fs::metadata("/etc/passwd")
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o1777
        );
    }
}
