//! The sandbox an import's archive is parsed in (see [`crate::unpack`], [`crate::importer`]).
//!
//! In order:
//!
//! 1. [`enter`]: join a user namespace that maps in-namespace ids 0 to 65535 to a range of host
//!    ids no host user has (`import_id_base` ...), and become its root: host uid and gid
//!    `import_id_base`, no supplementary groups. No host user can signal, trace or read the
//!    memory or descriptors of such a process (another uid), and its capabilities count only in
//!    its namespace: for files whose owners are mapped, the image's alone.
//! 2. Unshare mount, PID, network, IPC and UTS namespaces (its own, owned by that user
//!    namespace): no network at all, no view of other processes.
//! 3. [`confine`], in the new PID namespace's first process: pivot into the image (the only
//!    filesystem it can reach), keep only the capabilities unpacking uses, no core dumps, not
//!    dumpable, no new privileges, bounded memory and descriptors, and a seccomp allow-list of
//!    the system calls of reading an archive and writing files: no exec, no fork, no sockets.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};

use caps::Capability;
use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
use nix::mount::{umount2, MntFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// What unpacking needs in its namespace: owners, modes (setuid bits included), times of
/// files it did not make, and file capabilities.
const KEEP: [Capability; 5] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETFCAP,
];

/// The most memory the sandbox may map (the xz decoder's limit and buffers fit well within).
const ADDRESS_SPACE: u64 = 4 << 30;
/// The most descriptors it may hold.
const DESCRIPTORS: u64 = 256;

fn e(what: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Enters the directory `root` (opened by the helper, which can reach it: the sandbox could
/// not walk the host's root-only directories to it), joins `userns` as its root and unshares
/// the namespaces of the sandbox (step 1 and 2 of the module); the new mount namespace keeps
/// the working directory, on its copy of `root`'s mount. The caller then forks: the child is
/// the first process of the new PID namespace, and calls [`confine`].
pub fn enter(userns: BorrowedFd<'_>, root: BorrowedFd<'_>) -> Result<(), String> {
    nix::unistd::fchdir(root.as_raw_fd()).map_err(e("entering the image"))?;
    setns(userns, CloneFlags::CLONE_NEWUSER).map_err(e("joining the sandbox's user namespace"))?;
    nix::unistd::setgroups(&[]).map_err(e("dropping supplementary groups"))?;
    let root_gid = nix::unistd::Gid::from_raw(0);
    let root_uid = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(e("taking the sandbox's gid"))?;
    nix::unistd::setresuid(root_uid, root_uid, root_uid).map_err(e("taking the sandbox's uid"))?;
    // A change of credentials clears the parent-death signal: set again.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS,
    )
    .map_err(e("making the sandbox's namespaces"))
}

/// Step 3 of the module, in the first process of the sandbox's PID namespace: the working
/// directory (see [`enter`]) becomes its root directory and the filter is loaded. Descriptors
/// other than those `keep` names are closed.
pub fn confine(keep: &[i32]) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    crate::sys::make_mounts_private().map_err(e("making mounts private"))?;
    // The working directory's mount came with the copy of the helper's mount namespace, so it
    // is locked there, and pivot_root refuses a locked new root: a clone of it (not locked),
    // attached on top of it and entered, is the new root.
    let here = nix::fcntl::open(
        ".",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(e("opening the image"))?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let here = unsafe { std::os::fd::OwnedFd::from_raw_fd(here) };
    let tree = crate::idmap::clone_tree(std::os::fd::AsFd::as_fd(&here))
        .map_err(|err| format!("cloning the image's mount: {err}"))?;
    crate::idmap::attach(std::os::fd::AsFd::as_fd(&tree), std::path::Path::new("."))
        .map_err(|err| format!("attaching the image's mount: {err}"))?;
    nix::unistd::fchdir(tree.as_raw_fd()).map_err(e("entering the image's mount"))?;
    drop((here, tree));
    nix::unistd::pivot_root(".", ".").map_err(e("pivoting into the image"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(e("detaching the host's tree"))?;
    std::env::set_current_dir("/").map_err(|err| format!("entering /: {err}"))?;
    for fd in 0..DESCRIPTORS as i32 * 4 {
        if !keep.contains(&fd) {
            // SAFETY: closing descriptors no Rust value of this process owns (the caller
            // keeps only those in `keep`); a descriptor not open gives EBADF.
            unsafe { libc::close(fd) };
        }
    }
    for (resource, limit) in [
        (nix::sys::resource::Resource::RLIMIT_AS, ADDRESS_SPACE),
        (nix::sys::resource::Resource::RLIMIT_NOFILE, DESCRIPTORS),
        (nix::sys::resource::Resource::RLIMIT_CORE, 0),
    ] {
        nix::sys::resource::setrlimit(resource, limit, limit)
            .map_err(e(&format!("limiting {resource:?}")))?;
    }
    nix::sys::prctl::set_dumpable(false).map_err(e("making the sandbox undumpable"))?;
    crate::confine::keep_only(&KEEP)?;
    nix::sys::prctl::set_no_new_privs().map_err(e("setting no_new_privs"))?;
    filter()?
        .load()
        .map_err(|err| format!("loading the seccomp filter: {err}"))
}

/// The system calls of reading an archive and writing files; everything else fails (EPERM).
const ALLOWED: &[&str] = &[
    // Files and directories.
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "lseek",
    "close",
    "openat",
    "open",
    "newfstatat",
    "fstat",
    "stat",
    "lstat",
    "statx",
    "getdents64",
    "mkdirat",
    "mkdir",
    "symlinkat",
    "symlink",
    "linkat",
    "link",
    "unlinkat",
    "unlink",
    "rmdir",
    "renameat",
    "renameat2",
    "rename",
    "fchownat",
    "fchown",
    "lchown",
    "chown",
    "fchmodat",
    "fchmod",
    "chmod",
    "utimensat",
    "futimesat",
    "utimes",
    "utime",
    "fsetxattr",
    "lsetxattr",
    "setxattr",
    "fgetxattr",
    "lgetxattr",
    "getxattr",
    "flistxattr",
    "llistxattr",
    "listxattr",
    "readlinkat",
    "readlink",
    "ftruncate",
    "truncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "fcntl",
    "dup",
    "dup2",
    "dup3",
    "getcwd",
    "fchdir",
    "chdir",
    "access",
    "faccessat",
    "faccessat2",
    "umask",
    // Memory, signals, time, exit.
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "futex",
    "getrandom",
    "clock_gettime",
    "gettimeofday",
    "exit",
    "exit_group",
    "getpid",
    "gettid",
    "sched_yield",
    "prlimit64",
    "sched_getaffinity",
];

fn filter() -> Result<ScmpFilterContext, String> {
    let fail =
        |err: libseccomp::error::SeccompError| format!("the sandbox's seccomp filter: {err}");
    let mut filter = ScmpFilterContext::new(ScmpAction::Errno(libc::EPERM)).map_err(fail)?;
    filter
        .set_act_badarch(ScmpAction::KillProcess)
        .map_err(fail)?;
    for name in ALLOWED {
        // A name this architecture lacks (open, stat on arm64) is not one of its calls.
        if let Ok(call) = ScmpSyscall::from_name(name) {
            filter.add_rule(ScmpAction::Allow, call).map_err(fail)?;
        }
    }
    Ok(filter)
}

/// The `uid_map` and `gid_map` of the sandbox: in-namespace 0 to 65535 as host `base` to
/// `base + 65535`.
pub fn id_maps(base: u32) -> String {
    format!("0 {base} {}\n", crate::unpack::MAPPED_IDS)
}
