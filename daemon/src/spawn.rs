//! Starting a build's executor already inside the build's cgroup: clone3(2) with
//! `CLONE_INTO_CGROUP`, and a pidfd to wait for it and signal it.
//!
//! Moving a running process into a cgroup (writing `cgroup.procs`) takes the kernel's
//! cgroup-wide threadgroup lock for writing, which waits for an RCU grace period: 8 to 20 ms on
//! the hosts measured, a quarter of a no-op local build, serialised over every build of the
//! host. A process born in the cgroup takes no such lock. Kernels before 5.7 have no
//! `CLONE_INTO_CGROUP`: there the child moves itself by writing `cgroup.procs` before it
//! executes anything, as before. clone3 itself needs Linux 5.3.
//!
//! The child runs, between clone3 and execve, only async-signal-safe calls (dup2, fcntl,
//! write, execve, _exit) on memory prepared before the clone: the daemon is multi-threaded.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const P_PIDFD: libc::idtype_t = 3;

/// `struct clone_args` of `<linux/sched.h>`, up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Debug, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What to run.
#[derive(Debug)]
pub struct Spec<'a> {
    pub program: &'a OsStr,
    /// argv, argv[0] included.
    pub args: Vec<&'a OsStr>,
    /// The whole environment.
    pub env: Vec<(&'a str, &'a str)>,
    /// A descriptor the child gets as number `fd.1`, without close-on-exec.
    pub pass: Option<(BorrowedFd<'a>, RawFd)>,
    /// The cgroup directory to start in, and its `cgroup.procs` (the fallback).
    pub cgroup: Option<(BorrowedFd<'a>, BorrowedFd<'a>)>,
    /// The credentials to run with (a user's: uid, gid and supplementary groups), instead of
    /// the daemon's.
    pub creds: Option<Creds>,
    /// A descriptor to be the child's stdout, instead of a pipe to the caller.
    pub stdout: Option<BorrowedFd<'a>>,
}

/// A user's credentials, for a child that acts with their rights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A running child, with pipes on its standard streams. Killed and reaped on drop if it was
/// not waited for.
#[derive(Debug)]
pub struct Child {
    pidfd: AsyncFd<OwnedFd>,
    pid: u32,
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    status: Option<ExitStatus>,
}

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Starts `spec`; its stdin, stdout and stderr are pipes to the returned [`Child`].
pub fn spawn(spec: &Spec<'_>) -> io::Result<Child> {
    // Everything the child touches is made now: it may not allocate.
    let program = cstring(spec.program.as_bytes())?;
    let args: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()?;
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    if let Some((_, to)) = spec.pass {
        if to <= 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a passed descriptor may not take the number of a standard stream",
            ));
        }
    }
    // Every descriptor the child moves or writes to lies above the numbers it moves them to,
    // so that no dup2 in the child overwrites another of them.
    let floor = spec.pass.map_or(3, |(_, to)| to + 1).max(3);
    let lift = |fd: OwnedFd| -> io::Result<OwnedFd> {
        if fd.as_raw_fd() >= floor {
            return Ok(fd);
        }
        let high = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))?;
        // SAFETY: fcntl just returned this new descriptor, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(high) })
    };
    let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
        let (r, w) = pipe_pair()?;
        Ok((lift(r)?, lift(w)?))
    };
    let (stdin_r, stdin_w) = pipe()?;
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    // The child writes its errno here if it cannot exec; exec closes it.
    let (err_r, err_w) = pipe()?;

    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_PIDFD,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    let mut procs: RawFd = -1;
    if let Some((dir, procs_file)) = spec.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
        procs = procs_file.as_raw_fd();
    }
    let pass = spec.pass.map(|(fd, to)| (fd.as_raw_fd(), to));
    // A given stdout is lifted like the pipes, so that the dup2s cannot overwrite it.
    let given_stdout = spec
        .stdout
        .map(|fd| -> io::Result<OwnedFd> {
            let high =
                nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor))?;
            // SAFETY: fcntl just returned this new descriptor, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(high) })
        })
        .transpose()?;
    let fds = [
        (stdin_r.as_raw_fd(), 0),
        (
            given_stdout
                .as_ref()
                .map_or(stdout_w.as_raw_fd(), |fd| fd.as_raw_fd()),
            1,
        ),
        (stderr_w.as_raw_fd(), 2),
    ];
    let creds = spec.creds.as_ref().map(|c| {
        let groups: Vec<libc::gid_t> = c.groups.clone();
        (c.uid, c.gid, groups)
    });
    // A child that takes a user's credentials closes every descriptor it does not need before
    // it does (it is the user's from then on): all above its standard streams and passed
    // descriptor but the error pipe and the program's own, if it runs through /proc/self/fd.
    let program_fd: RawFd = spec
        .program
        .to_str()
        .and_then(|p| p.strip_prefix("/proc/self/fd/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    let mut keep = [err_w.as_raw_fd(), program_fd];
    keep.sort_unstable();
    let err_fd = err_w.as_raw_fd();

    let mut moved_by_hand = false;
    let pid = loop {
        // The cgroup the child joins by hand, where it could not be born in it. Made here: the
        // child may not allocate.
        let joined: Vec<RawFd> = moved_by_hand.then_some(procs).into_iter().collect();
        // SAFETY: clone3 with a valid clone_args of the size given; without CLONE_VM the child
        // gets a copy of this address space and, until execve, runs only the async-signal-safe
        // calls below on memory made before the clone.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                std::ptr::addr_of_mut!(args),
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            // SAFETY: in the child: see above; every pointer is to memory of the parent's copy.
            unsafe {
                child(
                    &joined,
                    &fds,
                    pass,
                    creds
                        .as_ref()
                        .map(|(u, g, groups)| (*u, *g, groups.as_slice(), keep)),
                    err_fd,
                    &program,
                    &argv,
                    &envp,
                )
            }
        }
        if pid > 0 {
            break pid;
        }
        let e = io::Error::last_os_error();
        // A kernel without CLONE_INTO_CGROUP (before 5.7): the child moves itself.
        if args.flags & CLONE_INTO_CGROUP != 0
            && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG))
        {
            args.flags &= !CLONE_INTO_CGROUP;
            args.cgroup = 0;
            moved_by_hand = true;
            continue;
        }
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Err(io::Error::other(
                "amidalad needs Linux 5.3 or later (clone3)",
            ));
        }
        return Err(e);
    };
    // SAFETY: clone3 stored a new pidfd, owned by nobody else, for the child it made.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((stdin_r, stdout_w, stderr_w, err_w, given_stdout));
    // Exec closed the error pipe (EOF), or the child wrote why it could not.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let exec_error = loop {
        match nix::unistd::read(err_r.as_raw_fd(), &mut errno[got..]) {
            Ok(0) if got == 0 => break None,
            Ok(0) => break Some(io::Error::other("the child reported a truncated error")),
            Ok(n) => {
                got += n;
                if got == errno.len() {
                    break Some(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Some(e.into()),
        }
    };
    if let Some(e) = exec_error {
        kill_and_reap(pidfd.as_fd());
        return Err(e);
    }
    let wrapped = (|| -> io::Result<_> {
        Ok((
            pipe::Sender::from_owned_fd(stdin_w)?,
            pipe::Receiver::from_owned_fd(stdout_r)?,
            pipe::Receiver::from_owned_fd(stderr_r)?,
        ))
    })();
    let (stdin, stdout, stderr) = match wrapped {
        Ok(pipes) => pipes,
        Err(e) => {
            kill_and_reap(pidfd.as_fd());
            return Err(e);
        }
    };
    let guard = pidfd.try_clone()?;
    // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd drops it.
    match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
        Ok(pidfd) => Ok(Child {
            pidfd,
            pid: pid as u32,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
            status: None,
        }),
        Err(e) => {
            kill_and_reap(guard.as_fd());
            Err(e.into_parts().1)
        }
    }
}

/// Sends `signal` to the process of `pidfd`.
fn send_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends SIGKILL through `pidfd` and reaps the process, waiting for it.
fn kill_and_reap(pidfd: BorrowedFd<'_>) {
    let _ = send_signal(pidfd, libc::SIGKILL);
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid on a pidfd we hold, writing into `info`.
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// The child's side, up to execve. Never returns.
///
/// # Safety
/// Only in the child of clone3, with pointers valid in its copy of the address space.
#[allow(clippy::too_many_arguments)]
unsafe fn child(
    join: &[RawFd],
    fds: &[(RawFd, RawFd); 3],
    pass: Option<(RawFd, RawFd)>,
    creds: Option<(u32, u32, &[libc::gid_t], [RawFd; 2])>,
    err: RawFd,
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let fail = |err: RawFd| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: write and _exit are async-signal-safe; the buffer is on this stack.
        unsafe {
            libc::write(err, errno.to_ne_bytes().as_ptr().cast(), 4);
            libc::_exit(127)
        }
    };
    // SAFETY: async-signal-safe calls on descriptors open in this process (see `spawn`).
    unsafe {
        for &procs in join {
            if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                fail(err);
            }
        }
        for &(from, to) in fds {
            if libc::dup2(from, to) < 0 {
                fail(err);
            }
        }
        if let Some((from, to)) = pass {
            if from == to {
                if libc::fcntl(from, libc::F_SETFD, 0) != 0 {
                    fail(err);
                }
            } else if libc::dup2(from, to) < 0 {
                fail(err);
            }
        }
        // Raw system calls, not the C library's wrappers: those would signal the parent's
        // threads, which this copy of its memory still lists, to change their credentials too.
        if let Some((uid, gid, groups, keep)) = creds {
            let first = pass.map_or(3, |(_, to)| to + 1);
            let mut from = first;
            for kept in keep.into_iter().filter(|&k| k >= first) {
                if kept > from {
                    libc::syscall(
                        libc::SYS_close_range,
                        from as libc::c_uint,
                        (kept - 1) as libc::c_uint,
                        0u32,
                    );
                }
                from = kept + 1;
            }
            libc::syscall(
                libc::SYS_close_range,
                from as libc::c_uint,
                libc::c_uint::MAX,
                0u32,
            );
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                fail(err);
            }
        }
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    fail(err)
}

impl Child {
    /// Sends `signal` to the child, unless it has been reaped (its pid may be another's then;
    /// the pidfd never is).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        send_signal(self.pidfd.get_ref().as_fd(), signal)
    }

    /// Reaps the child if it has ended; `blocking` waits for it.
    fn try_reap(&mut self, blocking: bool) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | if blocking { 0 } else { libc::WNOHANG };
        // SAFETY: waitid on our own pidfd, writing into `info`.
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                self.pidfd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                flags,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: waitid filled `info` for a child (si_pid 0: none had ended, with WNOHANG).
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        let raw = match code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => status | 0x80,
            _ => status,
        };
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok(Some(status))
    }

    /// Waits for the child to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_reap(false)? {
                return Ok(status);
            }
            // A pidfd is readable once its process has ended.
            let mut ready = self.pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    /// Kills the child and reaps it.
    pub async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        self.wait().await
    }

    /// The child's pid: its own until it is reaped (by [`Child::wait`] or on drop).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.get_ref().as_fd()
    }
}

impl Drop for Child {
    /// Kills the child if it was not waited for, and reaps it off the async threads (a child
    /// stuck in the kernel, on a hung device, must not hold a runtime thread).
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.signal(libc::SIGKILL);
        match self.pidfd.get_ref().try_clone() {
            Ok(pidfd) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || kill_and_reap(pidfd.as_fd()));
                }
                Err(_) => kill_and_reap(pidfd.as_fd()),
            },
            Err(_) => {
                let _ = self.try_reap(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(args: &'a [&'a str]) -> Spec<'a> {
        Spec {
            program: OsStr::new(args[0]),
            args: args.iter().map(OsStr::new).collect(),
            env: vec![("PATH", "/usr/bin:/bin"), ("GREETING", "hello")],
            pass: None,
            cgroup: None,
            creds: None,
            stdout: None,
        }
    }

    #[tokio::test]
    async fn runs_with_pipes_environment_and_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut child = spawn(&spec(&[
            "/bin/sh",
            "-c",
            "read x; echo \"$GREETING $x\"; echo err >&2; exit 3",
        ]))
        .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"world\n").await.unwrap();
        drop(stdin);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(out, "hello world\n");
        assert_eq!(err, "err\n");
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test]
    async fn kill_and_missing_programs() {
        let mut child = spawn(&spec(&["/bin/sleep", "30"])).unwrap();
        let status = child.kill().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let err = spawn(&spec(&["/nonexistent/program"])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }
}
