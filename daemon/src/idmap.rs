//! Idmapped mounts: a view of a filesystem in which the owners of its files are translated
//! (Linux 5.12; ext4, xfs, btrfs, tmpfs from 6.3, and others).
//!
//! A build's workspace is shown through one: the user's files appear as root's, everyone
//! else's as nobody's. The kernel then gives the provisioner, root in its image, no more over
//! the workspace than its user has: its capabilities count only for files whose owner and
//! group are mapped (`privileged_wrt_inode_uidgid`), so a file of another user is read only
//! if others may read it, whatever root can elsewhere; and whatever it writes is owned by the
//! user, because root is written back as the user's uid. A chown to any other owner fails
//! (`EOVERFLOW`: no mapping). An import's sandbox writes its image through one too, with the
//! image's owners mapped to a range of ids no one on the host has.
//!
//! The mapping is a user namespace's (`uid_map`, `gid_map`); its processes are not used. The
//! new mount API does the rest: `open_tree` clones the workspace's mount (as a detached tree,
//! in the caller's mount namespace), `mount_setattr` sets the mapping and flags on it, and
//! `move_mount` attaches it where it is to be seen.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::{fork, ForkResult};

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
#[derive(Debug, Default)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_IDMAP: u64 = 0x10_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A user namespace whose `uid_map` and `gid_map` are the given lines (`INSIDE OUTSIDE
/// COUNT`), for the mapping of idmapped mounts. The namespace is made by a child process,
/// which exits once the namespace has been opened: the returned descriptor keeps it.
///
/// Forks: only for single-threaded processes (the executor and import helpers are).
pub fn user_namespace(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (done_r, done_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the caller is single-threaded (see above); the child only calls unshare, write,
    // read and _exit.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop((ready_r, done_w));
            // SAFETY: plain system calls on descriptors of this process, then _exit.
            unsafe {
                let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
                libc::write(ready_w.as_raw_fd(), [u8::from(ok)].as_ptr().cast(), 1);
                let mut byte = 0u8;
                libc::read(done_r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0)
            }
        }
        ForkResult::Parent { child } => {
            drop((ready_w, done_r));
            let result = (|| {
                let mut ok = [0u8];
                nix::unistd::read(ready_r.as_raw_fd(), &mut ok)?;
                if ok[0] != 1 {
                    return Err(io::Error::other(
                        "the child could not make a user namespace",
                    ));
                }
                let proc = format!("/proc/{child}");
                std::fs::write(format!("{proc}/uid_map"), uid_map)
                    .map_err(|e| io::Error::new(e.kind(), format!("writing uid_map: {e}")))?;
                std::fs::write(format!("{proc}/gid_map"), gid_map)
                    .map_err(|e| io::Error::new(e.kind(), format!("writing gid_map: {e}")))?;
                let ns = std::fs::File::open(format!("{proc}/ns/user"))?;
                Ok(OwnedFd::from(ns))
            })();
            // Closing the pipe lets the child go.
            drop(done_w);
            let _ = nix::sys::wait::waitpid(child, None);
            result
        }
    }
}

/// A detached copy of the mount `dir` is on, rooted at `dir` (not its submounts), in the
/// caller's mount namespace; `dir` must be of that namespace.
pub fn clone_tree(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: open_tree reads the empty path during the call; `dir` is an open descriptor.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets the attributes `set` (`MOUNT_ATTR_*`) on the detached tree `tree`, with the mapping
/// of `userns` if `set` holds `MOUNT_ATTR_IDMAP`.
pub fn set_attrs(tree: BorrowedFd<'_>, set: u64, userns: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        userns_fd: userns.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..MountAttr::default()
    };
    // SAFETY: mount_setattr reads `attr` (of the size given) and the empty path during the
    // call; `tree` is an open descriptor.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attaches the detached tree `tree` on `target`, in the caller's mount namespace.
pub fn attach(tree: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: move_mount reads both paths during the call; `tree` is an open descriptor.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Attaches on `target` a view of the mount `dir` is on (rooted at `dir`) with the mapping of
/// `userns` and the further attributes `attrs`.
pub fn attach_mapped(
    dir: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    attrs: u64,
    target: &Path,
) -> io::Result<()> {
    let tree = clone_tree(dir)?;
    set_attrs(tree.as_fd(), MOUNT_ATTR_IDMAP | attrs, Some(userns))?;
    attach(tree.as_fd(), target)
}

/// The attributes of a build's workspace mount: never setuid or device files, read-only unless
/// asked, and the user's ownership mapped (see the module) unless the user is root, whose
/// rights are the host's anyway.
pub fn workspace_attrs(read_write: bool, mapped: bool) -> u64 {
    let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    if !read_write {
        attrs |= MOUNT_ATTR_RDONLY;
    }
    if mapped {
        attrs |= MOUNT_ATTR_IDMAP;
    }
    attrs
}

/// The `uid_map` and `gid_map` lines that show `uid`'s files as owned by host id `root` (the
/// build's root: host 0, or the base of its user namespace's range), and write that root's new
/// files as `uid`'s and `gid`'s: on-disk `uid` is in-namespace `uid`, which maps to `root`.
pub fn user_as_root(uid: u32, gid: u32, root: u32) -> (String, String) {
    (format!("{uid} {root} 1\n"), format!("{gid} {root} 1\n"))
}

/// The name of the filesystem type of `fd`'s filesystem, for messages.
pub fn fs_type_name(fd: BorrowedFd<'_>) -> String {
    match nix::sys::statfs::fstatfs(fd) {
        Ok(st) => {
            let magic = st.filesystem_type().0 as u64;
            match magic {
                0xEF53 => "ext4".into(),
                0x5846_5342 => "xfs".into(),
                0x9123_683E => "btrfs".into(),
                0x0102_1994 => "tmpfs".into(),
                0x6969 => "nfs".into(),
                0x794C_7630 => "overlayfs".into(),
                0x6573_5546 => "fuse".into(),
                0xFF53_4D42 | 0xFE53_4D42 => "cifs".into(),
                0x0102_1997 => "9p".into(),
                other => format!("type {other:#x}"),
            }
        }
        Err(e) => format!("unknown ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_is_never_setuid_and_read_only_unless_asked() {
        let ro = workspace_attrs(false, true);
        assert_eq!(
            ro,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_IDMAP
        );
        let rw = workspace_attrs(true, true);
        assert_eq!(rw & MOUNT_ATTR_RDONLY, 0);
        assert_ne!(
            rw & (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_IDMAP),
            0
        );
        assert_eq!(
            workspace_attrs(true, false) & MOUNT_ATTR_IDMAP,
            0,
            "root's own"
        );
        assert_eq!(
            user_as_root(1000, 100, 0),
            ("1000 0 1\n".into(), "100 0 1\n".into())
        );
        assert_eq!(
            user_as_root(1000, 100, 3_000_000),
            ("1000 3000000 1\n".into(), "100 3000000 1\n".into())
        );
    }
}
