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

/// Mounts the filesystem of the block device `device` on the directory `target` (both paths
/// of this mount namespace) under the name `name`, an absolute path: what
/// `/proc/self/mountinfo` shows as the mount's source, and so where tools that find a
/// filesystem's device through it (GRUB's `grub-probe`) look for the device, in a root where
/// a node of that device is made at `name` (see the executor's `/dev/disk`). `options` are
/// the filesystem's (`discard`, `discard=sync`, `nouuid`); `attrs` the mount's (`MOUNT_ATTR_*`).
///
/// The kernel keeps the source as it was given and looks it up in the caller's root, so the
/// filesystem is made while this process's root is a tmpfs over `target` holding a node of
/// `device` at `name`; the tmpfs is unmounted again before the filesystem is attached on
/// `target`. For single-threaded processes (the executor): the root is every thread's.
pub fn mount_as(
    device: &Path,
    name: &str,
    target: &Path,
    fstype: &str,
    options: Option<&str>,
    attrs: u64,
) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(device)?;
    let relative = name.strip_prefix('/').filter(|r| {
        !r.is_empty()
            && Path::new(r)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    let (Some(relative), true) = (relative, meta.file_type().is_block_device()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot mount {} as {name}", device.display()),
        ));
    };
    mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=700,size=64k,nr_inodes=64"),
    )?;
    let made = (|| {
        let node = target.join(relative);
        if let Some(parent) = node.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            meta.rdev(),
        )?;
        // Made with `target` as this process's root for the moment (no thread can do it for
        // the executor: it is in a PID namespace of its own), then the root and the working
        // directory given back, whatever happened.
        let root = open_dir(Path::new("/"))?;
        let cwd = open_dir(Path::new("."))?;
        nix::unistd::chroot(target)?;
        let made = make_filesystem(name, fstype, options, attrs);
        let back = nix::unistd::fchdir(root.as_raw_fd())
            .and_then(|()| nix::unistd::chroot("."))
            .and_then(|()| nix::unistd::fchdir(cwd.as_raw_fd()));
        if let Err(e) = back {
            // Nothing this process did after this would be where it thinks.
            eprintln!("amidala: could not give back the executor's root: {e}");
            std::process::abort();
        }
        made
    })();
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)?;
    crate::idmap::attach(std::os::fd::AsFd::as_fd(&made?), target)
}

/// For [`mount_as`], with the root it made: the filesystem made from the device at `source`
/// and returned as a detached mount.
fn make_filesystem(
    source: &str,
    fstype: &str,
    options: Option<&str>,
    attrs: u64,
) -> io::Result<OwnedFd> {
    let cstring = |s: &str| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
    };
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let fstype = cstring(fstype)?;
    // SAFETY: fsopen reads the name during the call.
    let context =
        check(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen just returned this descriptor; nothing else owns it.
    let context = unsafe { OwnedFd::from_raw_fd(context as RawFd) };
    let set = |cmd: libc::c_uint, key: Option<&str>, value: Option<&str>| -> io::Result<()> {
        let key = key.map(cstring).transpose()?;
        let value = value.map(cstring).transpose()?;
        // SAFETY: fsconfig reads the strings (or null pointers) during the call; `context` is
        // an open filesystem context.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                cmd,
                key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr()),
                value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        })
        .map(drop)
    };
    set(FSCONFIG_SET_STRING, Some("source"), Some(source))?;
    for option in options.unwrap_or("").split(',').filter(|o| !o.is_empty()) {
        match option.split_once('=') {
            Some((key, value)) => set(FSCONFIG_SET_STRING, Some(key), Some(value))?,
            None => set(FSCONFIG_SET_FLAG, Some(option), None)?,
        }
    }
    set(FSCONFIG_CMD_CREATE, None, None)?;
    // SAFETY: fsmount takes the context's descriptor and two flag words.
    let mounted = check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            attrs,
        )
    })?;
    // SAFETY: fsmount just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(mounted as RawFd) })
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
