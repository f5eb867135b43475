//! The import helper: `amidalad-exec __import`, root, one per pass of a directory or tarball
//! import. It prepares what only root can (the image's filesystem mounted, an idmapped view of
//! it for the sandbox, the sandbox's namespaces), runs the sandbox that parses the archive
//! ([`crate::unpack`], confined by [`crate::sandbox`]), and afterwards makes the device nodes
//! the archive listed and discards the image's free blocks.
//!
//! - stdin: the [`Job`], JSON, then end of file;
//! - stdout: one [`Outcome`] line;
//! - descriptor 3: the archive (the user's tarball, read by offset, or the pipe of the packer
//!   that reads a directory with the user's rights).
//!
//! Nothing here reads the archive. The image file itself is never open in any process the
//! user could reach: the daemon attached it to a loop device before starting this helper, and
//! the sandbox writes through the kernel's filesystem into the mounted image.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use serde::{Deserialize, Serialize};

use crate::idmap;
use crate::unpack::{Compression, Special, SpecialKind, Unpacked, Usage};

/// The argument that makes `amidalad-exec` the import helper.
pub const IMPORT_ARG: &str = "__import";
/// The archive's descriptor in the helper and the sandbox.
pub const INPUT_FD: RawFd = 3;
/// Where the sandbox writes its result.
const RESULT_FD: RawFd = 4;

/// What the daemon asks of a pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub task: Task,
    pub compression: Compression,
    /// The archive is a file read by offset from its start (else a pipe, read as it comes).
    pub positioned: bool,
    /// The host id in-namespace 0 of the sandbox is (see [`crate::sandbox`]).
    pub id_base: u32,
    /// An empty directory: the sandbox's root (the image's idmapped view, or an empty tmpfs).
    pub view_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Task {
    /// Measure the archive, failing once it holds more than `budget` bytes.
    Scan { budget: u64 },
    /// Unpack it into the (empty) ext4 filesystem on `device`, mounted on `mount_dir`; with
    /// `boot`, then make the tree bootable ([`crate::bootcfg::set_up`]).
    Unpack {
        device: PathBuf,
        mount_dir: PathBuf,
        #[serde(default)]
        boot: Option<crate::bootcfg::Setup>,
    },
}

/// What a pass did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    Scanned(Usage),
    Unpacked {
        entries: u64,
        specials: u64,
        skipped_xattrs: u64,
        /// Whether the free blocks could be discarded (holes in the image file).
        discarded: bool,
        /// What was done to make the tree bootable, if asked.
        #[serde(default)]
        boot: Option<crate::bootcfg::Done>,
    },
    Failed(String),
}

/// What the sandbox tells the helper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum SandboxResult {
    Scanned(Usage),
    Unpacked(Unpacked),
    Failed(String),
}

/// Entry point of `amidalad-exec __import`.
pub fn main() -> ! {
    let outcome = match run() {
        Ok(outcome) => outcome,
        Err(message) => Outcome::Failed(message),
    };
    let mut line = serde_json::to_vec(&outcome).expect("outcomes serialize");
    line.push(b'\n');
    let _ = io::stdout().write_all(&line);
    std::process::exit(0)
}

fn e(what: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

fn run() -> Result<Outcome, String> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    let mut input = Vec::new();
    io::stdin()
        .read_to_end(&mut input)
        .map_err(|err| format!("reading the job: {err}"))?;
    let job: Job =
        serde_json::from_slice(&input).map_err(|err| format!("decoding the job: {err}"))?;
    // Mounts made here are this helper's alone, and go with it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(e("making a mount namespace"))?;
    crate::sys::make_mounts_private().map_err(e("making mounts private"))?;
    let maps = crate::sandbox::id_maps(job.id_base);
    let userns = idmap::user_namespace(&maps, &maps)
        .map_err(|err| format!("making the sandbox's user namespace: {err}"))?;
    match &job.task {
        Task::Scan { budget } => {
            // An empty, read-only root: the scan writes nothing.
            mount(
                Some("tmpfs"),
                &job.view_dir,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k,mode=555"),
            )
            .map_err(e("mounting the sandbox's root"))?;
            let view = crate::sys::open_dir(&job.view_dir)
                .map_err(|err| format!("opening the sandbox's root: {err}"))?;
            Ok(match sandboxed(&job, userns.as_fd(), view.as_fd())? {
                SandboxResult::Scanned(usage) if *budget >= usage.bytes => Outcome::Scanned(usage),
                SandboxResult::Scanned(_) => {
                    Outcome::Failed("the archive holds more than its budget".into())
                }
                SandboxResult::Failed(why) => Outcome::Failed(why),
                SandboxResult::Unpacked(_) => {
                    Outcome::Failed("the sandbox unpacked in a scan".into())
                }
            })
        }
        Task::Unpack {
            device,
            mount_dir,
            boot,
        } => {
            mount(
                Some(device.as_path()),
                mount_dir,
                Some("ext4"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                // The image is new and reads as zeros: nothing to zero in the background.
                Some("noinit_itable"),
            )
            .map_err(e(&format!("mounting {}", device.display())))?;
            let root = crate::sys::open_dir(mount_dir)
                .map_err(|err| format!("opening the image: {err}"))?;
            // The sandbox's view: the image with its owners 0 to 65535 shown as the sandbox's
            // ids, so that in-namespace root's chown to 1000 stores 1000.
            idmap::attach_mapped(
                root.as_fd(),
                userns.as_fd(),
                idmap::MOUNT_ATTR_NOSUID | idmap::MOUNT_ATTR_NODEV,
                &job.view_dir,
            )
            .map_err(|err| format!("making the sandbox's view of the image: {err}"))?;
            let result = crate::sys::open_dir(&job.view_dir)
                .map_err(|err| format!("opening the sandbox's view: {err}"))
                .and_then(|view| sandboxed(&job, userns.as_fd(), view.as_fd()));
            let _ = umount2(&job.view_dir, MntFlags::MNT_DETACH);
            let outcome = match result? {
                SandboxResult::Unpacked(done) => {
                    let specials = make_specials(root.as_fd(), &done.specials)?;
                    // Root's, in the image only: every path resolved inside it.
                    let boot = match boot {
                        Some(setup) => {
                            let done = crate::bootcfg::set_up(root.as_fd(), setup)?;
                            crate::bootcfg::install_modules(
                                root.as_fd(),
                                Path::new(crate::bootdisk::GRUB_LIB),
                                done.arch,
                            )?;
                            Some(done)
                        }
                        None => None,
                    };
                    let discarded = crate::disk::discard_free_blocks(root.as_fd()).is_ok();
                    Outcome::Unpacked {
                        entries: done.entries,
                        specials,
                        skipped_xattrs: done.skipped_xattrs,
                        discarded,
                        boot,
                    }
                }
                SandboxResult::Failed(why) => Outcome::Failed(why),
                SandboxResult::Scanned(_) => {
                    Outcome::Failed("the sandbox scanned in an unpack".into())
                }
            };
            drop(root);
            umount2(mount_dir, MntFlags::empty()).map_err(e("unmounting the image"))?;
            Ok(outcome)
        }
    }
}

/// Runs the sandbox on the archive and returns what it says (a sandbox that dies says that).
fn sandboxed(
    job: &Job,
    userns: BorrowedFd<'_>,
    root: BorrowedFd<'_>,
) -> Result<SandboxResult, String> {
    let (result_r, result_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(e("making a pipe"))?;
    // SAFETY: this helper is single-threaded; the child runs the sandbox and exits.
    match unsafe { fork() }.map_err(e("forking the sandbox"))? {
        ForkResult::Child => {
            drop(result_r);
            let code = sandbox_process(job, userns, root, result_w);
            // SAFETY: _exit ends the child without the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(result_w);
            let mut text = String::new();
            // Bounded: a list of specials at most, and the sandbox is not trusted.
            let _ = File::from(result_r)
                .take(64 << 20)
                .read_to_string(&mut text);
            let status = loop {
                match waitpid(child, None) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match serde_json::from_str::<SandboxResult>(text.trim()) {
                Ok(result) => Ok(result),
                Err(_) => Err(match status {
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        format!("the import's sandbox was killed by {signal} (out of memory, or a fault parsing the archive)")
                    }
                    other => format!("the import's sandbox ended without a result ({other:?})"),
                }),
            }
        }
    }
}

/// The sandbox's two processes: this one joins the sandbox's namespaces, its child (the first
/// of the new PID namespace) is confined and does the work. Returns the exit status.
fn sandbox_process(
    job: &Job,
    userns: BorrowedFd<'_>,
    root: BorrowedFd<'_>,
    result: OwnedFd,
) -> i32 {
    let report = |result_fd: RawFd, r: &SandboxResult| {
        let line = serde_json::to_vec(r).expect("results serialize");
        // SAFETY: a write of a buffer of this process to a descriptor it holds.
        unsafe { libc::write(result_fd, line.as_ptr().cast(), line.len()) };
    };
    if let Err(why) = crate::sandbox::enter(userns, root) {
        report(result.as_raw_fd(), &SandboxResult::Failed(why));
        return 1;
    }
    // The work runs as the first process of the new PID namespace.
    // SAFETY: single-threaded (forked from the single-threaded helper).
    match unsafe { fork() } {
        Err(err) => {
            report(
                result.as_raw_fd(),
                &SandboxResult::Failed(format!("forking: {err}")),
            );
            1
        }
        Ok(ForkResult::Child) => {
            if nix::unistd::dup2(result.as_raw_fd(), RESULT_FD).is_err() {
                return 1;
            }
            let outcome = match crate::sandbox::confine(&[INPUT_FD, RESULT_FD, 2]) {
                Ok(()) => work(job),
                Err(why) => SandboxResult::Failed(why),
            };
            report(RESULT_FD, &outcome);
            0
        }
        Ok(ForkResult::Parent { child }) => {
            drop(result);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return code,
                    Ok(WaitStatus::Signaled(_, signal, _)) => {
                        // Said by the helper: the result pipe is closed without a result.
                        let _ = signal;
                        return 1;
                    }
                    Err(Errno::EINTR) | Ok(_) => continue,
                    Err(_) => return 1,
                }
            }
        }
    }
}

/// In the confined sandbox: the archive read, decompressed, and measured or unpacked.
fn work(job: &Job) -> SandboxResult {
    // SAFETY: the daemon passes the archive as this descriptor, for the helper's life.
    let input = File::from(unsafe { OwnedFd::from_raw_fd(INPUT_FD) });
    let raw: Box<dyn Read> = if job.positioned {
        Box::new(crate::unpack::Positioned::new(input))
    } else {
        Box::new(input)
    };
    let archive = match crate::unpack::decompressed(raw, job.compression) {
        Ok(archive) => archive,
        Err(err) => return SandboxResult::Failed(format!("decompressing the archive: {err}")),
    };
    match &job.task {
        Task::Scan { budget } => match crate::unpack::scan(archive, *budget) {
            Ok(usage) => SandboxResult::Scanned(usage),
            Err(why) => SandboxResult::Failed(why),
        },
        Task::Unpack { .. } => match crate::unpack::unpack(archive, Path::new("/")) {
            Ok(done) => SandboxResult::Unpacked(done),
            Err(why) => SandboxResult::Failed(why),
        },
    }
}

/// Makes the device nodes and FIFOs the archive listed, in the image (never outside it: their
/// directories are resolved within it), with their owners, modes and times. Returns how many.
fn make_specials(root: BorrowedFd<'_>, specials: &[Special]) -> Result<u64, String> {
    for special in specials.iter().take(crate::unpack::MAX_SPECIAL) {
        let fail = |err: &dyn std::fmt::Display| format!("{}: {err}", special.path.display());
        let plain = special
            .path
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        let (Some(parent), Some(name)) = (special.path.parent(), special.path.file_name()) else {
            return Err(fail(&"not a path of a file"));
        };
        if !plain {
            return Err(fail(&"not a plain relative path"));
        }
        let dir = crate::sys::open_in_root(root, parent, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|err| fail(&err))?;
        let kind = match special.kind {
            SpecialKind::Char => SFlag::S_IFCHR,
            SpecialKind::Block => SFlag::S_IFBLK,
            SpecialKind::Fifo => SFlag::S_IFIFO,
        };
        // What the archive put there before (tar's rule: a later entry wins).
        match nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(err) => return Err(fail(&err)),
        }
        nix::sys::stat::mknodat(
            Some(dir.as_raw_fd()),
            name,
            kind,
            Mode::from_bits_truncate(special.mode & 0o777),
            nix::sys::stat::makedev(special.major.into(), special.minor.into()),
        )
        .map_err(|err| fail(&err))?;
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            name,
            Some(special.uid.into()),
            Some(special.gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|err| fail(&err))?;
        // The node made just now, in an image nothing else writes: no symlink to follow.
        nix::sys::stat::fchmodat(
            Some(dir.as_raw_fd()),
            name,
            Mode::from_bits_truncate(special.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|err| fail(&err))?;
        crate::sys::set_times_at(dir.as_fd(), name, special.mtime).map_err(|err| fail(&err))?;
    }
    Ok(specials.len() as u64)
}
