//! Small system-call helpers shared by the executor, the import helper and its sandbox, the
//! packer and the workspace scrub: descriptors opened without following what a user may have
//! put in the way, and private mount propagation.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

/// Makes every mount of this mount namespace private, so that nothing mounted or unmounted
/// here propagates to the namespace it was copied from (the host's).
pub fn make_mounts_private() -> nix::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

/// The directory at `path`, opened for reading.
pub fn open_dir(path: &Path) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `name` in `dir`, opened with `flags`, never through a symbolic link as its last component.
pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &(impl AsRef<std::ffi::OsStr> + ?Sized),
    flags: OFlag,
) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name.as_ref(),
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `RESOLVE_IN_ROOT` and `RESOLVE_NO_MAGICLINKS` of openat2(2).
const RESOLVE_IN_ROOT: u64 = 0x10;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

/// `struct open_how` of `<linux/openat2.h>`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `path` of the tree whose root is `root`, opened with `flags`, its symbolic links resolved
/// as if `root` were `/` (an image's absolute links stay in the image, `..` stops at its root),
/// and no magic link of /proc followed.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    let path = CString::new(if bytes.is_empty() {
        b".".as_slice()
    } else {
        bytes
    })
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads the path and `how` (of the size passed) during the call only;
    // `root` is an open directory descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets the access and modification times of `name` in `dir` (not following a symbolic link
/// there) to `mtime`, seconds since the epoch.
pub fn set_times_at(dir: BorrowedFd<'_>, name: &std::ffi::OsStr, mtime: i64) -> nix::Result<()> {
    let time = nix::sys::time::TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        Some(dir.as_raw_fd()),
        name,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
}
