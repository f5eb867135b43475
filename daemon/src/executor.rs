//! The executor: a single-threaded process, one per build, that mounts the image, runs the
//! provisioner inside it and unmounts it again.
//!
//! The daemon starts it as `amidalad __executor BUILD_ID` (a re-exec of its own binary, so the
//! two can never be of different versions) with:
//!
//! - stdin: the [`ExecutorSpec`] as one JSON line; then [`IN_CGROUPS`] once the daemon has
//!   moved it into the build's v1 cgroups (at once where there are none), then end of file;
//! - stdout: [`Report`]s as JSON lines, for the daemon;
//! - stderr: the provisioner's output (its stdout and stderr), for the build log;
//! - fd 3: the workspace directory, as the client opened it.
//!
//! The privileged steps, in order:
//!
//! 1. Ask to be killed with the daemon (`PR_SET_PDEATHSIG`); load the plugin.
//! 2. Unshare a mount namespace and a PID namespace; make every mount private, so nothing
//!    done here is seen by the host. Every mount of the build lives in namespaces owned by
//!    this process and its child: if they die, the kernel unmounts everything.
//! 3. Mount the root filesystem on the build's mount point.
//! 4. Prepare the image through directory descriptors opened without following symlinks:
//!    mount points present, the host's resolv.conf in (the image's own kept aside), service
//!    starts blocked by a policy-rc.d.
//! 5. Fork the provisioner, PID 1 of the new PID namespace. It unshares a further mount
//!    namespace, mounts the workspace (read-only unless asked), proc, sys (read-only), a
//!    private /dev and devpts, pivots into the image and detaches the host's tree; for a
//!    member's build (the image then seen through an idmapped mount) it enters a user
//!    namespace of its own and becomes its root, so that its capabilities reach the image and
//!    nothing of the host's. It closes every inherited descriptor, drops capabilities that
//!    reach beyond the image from its bounding set, scrubs its environment and calls the
//!    plugin.
//! 6. Wait for it. On SIGTERM (cancel) kill it. Its exit also kills every process it left in
//!    its PID namespace, and ends its mount namespace with all the mounts made in step 5.
//! 7. Restore the image's files, unmount the root filesystem and report.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use amidala::proto::Phase;
use amidala_plugin::BuildInfo;
use libseccomp::ScmpFilterContext;
use nix::errno::Errno;
use nix::fcntl::{renameat, AtFlags, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::stat::{fstatat, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, getppid, pivot_root, unlinkat, ForkResult, Pid, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::idmap;
use crate::plugins::Plugin;
use crate::workspace::Workspace;

/// What the daemon writes to an executor once it is in every cgroup of its build.
pub const IN_CGROUPS: &[u8] = b"in cgroups\n";

/// The argument that makes `amidalad` an executor.
pub const EXECUTOR_ARG: &str = "__executor";
pub use crate::workspace::{Owner, WORKSPACE_FD};

/// What the daemon tells an executor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    /// The block device holding the root filesystem.
    pub device: PathBuf,
    /// Its filesystem type, as the kernel names it.
    pub fs_type: String,
    /// An empty directory to mount it on (visible only inside this executor's namespace).
    pub mount_dir: PathBuf,
    pub workspace_rw: bool,
    /// Whose build it is: the workspace is shown with their rights.
    pub owner: Owner,
    /// Give the provisioner a network namespace of its own with only a loopback interface.
    #[serde(default)]
    pub isolate_network: bool,
    /// What the policy grants the provisioner beyond the baseline (see [`crate::confine`]).
    pub allow: crate::confine::Allowances,
    pub plugin_path: PathBuf,
    pub build: BuildInfo,
    /// The host's resolv.conf, to put in the image while provisioning.
    pub resolv_conf: Option<String>,
    /// Package caches to bind-mount into the image.
    #[serde(default)]
    pub caches: Vec<CacheMount>,
    /// For a member's build: the provisioner is root of a user namespace of its own, whose
    /// ids 0 to 65 535 are host ids `id_base` and up (see [`crate::sandbox::id_maps`]), and it
    /// sees the image through an idmapped mount with the same mapping, so that the image's
    /// root is its root and nothing else on the host is. `None`: root's builds, whose
    /// provisioner is host root (with the baseline's capabilities).
    #[serde(default)]
    pub id_base: Option<u32>,
    /// The disk's other partitions, which the image's fstab may mount at `/boot` and
    /// `/boot/efi` (see [`crate::bootparts`]).
    #[serde(default)]
    pub boot_partitions: Vec<crate::bootparts::BootPartition>,
}

/// A host directory mounted on a directory of the image while provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheMount {
    pub host: PathBuf,
    /// Relative to the image's root, plain components (checked with the configuration).
    pub target: String,
}

/// What an executor tells the daemon, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Report {
    /// A phase began.
    Phase(Phase),
    /// A note for the build log.
    Note(String),
    /// What was read from the image before provisioning.
    Inspected { architecture: Option<String> },
    /// The provisioner finished.
    Provisioned(Outcome),
    /// A step failed; teardown follows (and is reported) if anything was set up.
    Failed { phase: Phase, message: String },
    /// Everything is unmounted and restored.
    Done,
}

/// How the provisioner ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    Exited(i32),
    Signalled(i32),
    /// The plugin reported an error instead of an exit status.
    Error(String),
}

/// What the provisioner process writes to its result pipe before exiting.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChildResult {
    /// The plugin process exited with this status.
    Status(i32),
    /// The plugin process was killed by this signal.
    Signalled(i32),
    SetupFailed(String),
    PluginError(String),
}

fn send_result(pipe: RawFd, result: &ChildResult) {
    let mut line = serde_json::to_vec(result).expect("results serialize");
    line.push(b'\n');
    // SAFETY: `pipe` is the result pipe's write end, open in this process; a short or failed
    // write leaves the parent without a result, which it reports.
    unsafe { libc::write(pipe, line.as_ptr().cast(), line.len()) };
}

/// PID 1 of the build's PID namespace: sets up the provisioner's view of the image, forks the
/// plugin process, reaps every orphan until the plugin process ends, and reports how it ended.
/// When PID 1 exits, the kernel kills whatever the provisioner left running in the namespace.
/// (The plugin does not run as PID 1 itself: the kernel drops the signals PID 1 sends itself
/// without a handler, so a plugin that aborts would not die as it should.)
fn init_process(
    spec: &ExecutorSpec,
    plugin: &Plugin,
    pipe: RawFd,
    filter: &ScmpFilterContext,
    workspace: &Workspace,
    userns: Option<&OwnedFd>,
    boot: &crate::bootparts::Mounted,
) -> i32 {
    if let Err(message) = child_setup(spec, pipe, filter, workspace, userns, boot) {
        send_result(pipe, &ChildResult::SetupFailed(message));
        return 125;
    }
    // SAFETY: this process is single-threaded (it was forked from the single-threaded
    // executor and started no thread), so the child may run arbitrary code.
    match unsafe { fork() } {
        Err(e) => {
            send_result(
                pipe,
                &ChildResult::SetupFailed(format!("forking the plugin process: {e}")),
            );
            125
        }
        Ok(ForkResult::Child) => {
            let code = match plugin.provision(&spec.build) {
                Ok(status) => status,
                Err(e) => {
                    send_result(pipe, &ChildResult::PluginError(e.message));
                    125
                }
            };
            let _ = io::stdout().flush();
            code
        }
        Ok(ForkResult::Parent { child }) => loop {
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                    send_result(pipe, &ChildResult::Status(code));
                    break code;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    send_result(pipe, &ChildResult::Signalled(sig as i32));
                    break 128 + sig as i32;
                }
                // An orphan reparented to us, reaped; or an interrupted wait.
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    send_result(
                        pipe,
                        &ChildResult::SetupFailed(format!("waiting for the plugin process: {e}")),
                    );
                    break 125;
                }
            }
        },
    }
}

const RESOLV_SAVED: &str = ".resolv.conf.amidala-saved";
const POLICY_SAVED: &str = ".policy-rc.d.amidala-saved";
const POLICY_RC_D: &str =
    "#!/bin/sh\n# Written by amidala for the duration of a build: no service starts.\nexit 101\n";
const MOUNT_POINTS: [&str; 4] = ["proc", "sys", "dev", "workspace"];
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigterm(_: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is our own child's.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

struct Failure {
    phase: Phase,
    message: String,
}

fn fail<E: std::fmt::Display>(
    phase: Phase,
    what: impl std::fmt::Display,
) -> impl FnOnce(E) -> Failure {
    move |e| Failure {
        phase,
        message: format!("{what}: {e}"),
    }
}

fn report(r: &Report) {
    let mut line = serde_json::to_vec(r).expect("reports serialize");
    line.push(b'\n');
    let mut out = io::stdout().lock();
    // The daemon going away is handled by PR_SET_PDEATHSIG; nothing to do about a write error.
    let _ = out.write_all(&line);
    let _ = out.flush();
}

/// Entry point of `amidalad __executor`.
pub fn main() -> ! {
    let code = match run() {
        Ok(()) => 0,
        Err(f) => {
            report(&Report::Failed {
                phase: f.phase,
                message: f.message,
            });
            1
        }
    };
    std::process::exit(code)
}

fn run() -> Result<(), Failure> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(fail(Phase::Mount, "setting the parent-death signal"))?;
    if getppid() == Pid::from_raw(1) {
        return Err(Failure {
            phase: Phase::Mount,
            message: "the daemon exited before the executor started".into(),
        });
    }
    let mut input = Vec::new();
    io::stdin()
        .lock()
        .read_until(b'\n', &mut input)
        .map_err(fail(Phase::Mount, "reading the executor spec"))?;
    let spec: ExecutorSpec =
        serde_json::from_slice(&input).map_err(fail(Phase::Mount, "decoding the executor spec"))?;
    let plugin =
        Plugin::load(&spec.plugin_path).map_err(fail(Phase::Mount, "loading the provisioner"))?;

    report(&Report::Phase(Phase::Mount));
    // The workspace descriptor's mount belongs to the daemon's namespace, the only one its
    // mount can be cloned in: its views are made here, before the build's own namespaces.
    // SAFETY: the daemon passes the workspace as this descriptor, open for the executor's life.
    let dir = unsafe { BorrowedFd::borrow_raw(WORKSPACE_FD) };
    let userns = spec
        .id_base
        .map(|base| {
            let maps = crate::sandbox::id_maps(base);
            idmap::user_namespace(&maps, &maps)
        })
        .transpose()
        .map_err(fail(
            Phase::Mount,
            "making the provisioner's user namespace",
        ))?;
    let workspace = Workspace::prepare(
        dir,
        spec.owner,
        spec.workspace_rw,
        spec.id_base.unwrap_or(0),
    )
    .map_err(|message| Failure {
        phase: Phase::Mount,
        message,
    })?;
    // Mounts, processes, host name and System V IPC of the build are its own.
    let mut namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if spec.isolate_network {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    unshare(namespaces).map_err(fail(Phase::Mount, "creating namespaces"))?;
    if spec.isolate_network {
        loopback_up().map_err(fail(Phase::Mount, "bringing up the loopback interface"))?;
    }
    crate::sys::make_mounts_private().map_err(fail(Phase::Mount, "making mounts private"))?;
    let mounting = format!(
        "mounting {} ({}) on {}",
        spec.device.display(),
        spec.fs_type,
        spec.mount_dir.display()
    );
    // Device nodes in the image stay inert while building: no way to the host's disks.
    match root_disk_name(&spec) {
        // Under the name the build's /dev gives its disk (see populate_dev).
        Some(name) => crate::sys::mount_as(
            &spec.device,
            &name,
            &spec.mount_dir,
            &spec.fs_type,
            root_mount_data(&spec.fs_type),
            idmap::MOUNT_ATTR_NODEV,
        )
        .map_err(|e| Failure {
            phase: Phase::Mount,
            message: format!("{mounting}: {e}"),
        })?,
        None => mount(
            Some(&spec.device),
            &spec.mount_dir,
            Some(spec.fs_type.as_str()),
            MsFlags::MS_NODEV,
            root_mount_data(&spec.fs_type),
        )
        .map_err(fail(Phase::Mount, mounting))?,
    }

    grow_root(&spec);
    let result = with_root_mounted(&spec, &plugin, &workspace, userns.as_ref());

    report(&Report::Phase(Phase::Unmount));
    if result.is_ok() && !can_discard(&spec.device) {
        report(&Report::Note(
            "amidala: the volume's device cannot discard blocks: blocks of files the build \
             deleted stay in the snapshot"
                .into(),
        ));
    }
    let unmounted = unmount_root(&spec.mount_dir);
    result?;
    unmounted?;
    report(&Report::Done);
    Ok(())
}

fn with_root_mounted(
    spec: &ExecutorSpec,
    plugin: &Plugin,
    workspace: &Workspace,
    userns: Option<&OwnedFd>,
) -> Result<(), Failure> {
    let mut prepared = Prepared::new(spec)?;
    let mut boot = mount_boot_partitions(spec, prepared.root.as_fd())?;
    let started = now_secs();
    let provisioned = provision(spec, plugin, workspace, userns, &boot);
    end_build_output();
    if let Ok(outcome) = &provisioned {
        report(&Report::Provisioned(outcome.clone()));
    }
    let restored = prepared.restore();
    if matches!(provisioned, Ok(Outcome::Exited(0))) && restored.is_ok() {
        refresh_boot_menu(spec, prepared.root.as_fd());
    }
    let unmounted = boot.unmount(&spec.mount_dir).map_err(|message| Failure {
        phase: Phase::Unmount,
        message,
    });
    // Every process of the build is gone (its PID namespace with them): what it left in the
    // user's workspace is checked now.
    let scrubbed = match workspace.scrub(started) {
        Ok(0) => Ok(()),
        Ok(n) => {
            report(&Report::Note(format!(
                "amidala: cleared the setuid and setgid bits and file capabilities of {n} files \
                 the build left in the workspace"
            )));
            Ok(())
        }
        Err(message) => Err(Failure {
            phase: Phase::Unmount,
            message,
        }),
    };
    provisioned?;
    restored?;
    unmounted?;
    scrubbed
}

/// Mounts the partitions the image's fstab mounts at `/boot` and `/boot/efi` (see
/// [`crate::bootparts`]), read before anything of the image has run.
fn mount_boot_partitions(
    spec: &ExecutorSpec,
    root: BorrowedFd<'_>,
) -> Result<crate::bootparts::Mounted, Failure> {
    if spec.boot_partitions.is_empty() {
        return Ok(crate::bootparts::Mounted::default());
    }
    let fstab = match crate::bootcfg::read_file(root, "etc/fstab", 1 << 20) {
        Ok(text) => text,
        Err(e) => {
            report(&Report::Note(format!(
                "amidala: warning: /etc/fstab could not be read ({e}): /boot and /boot/efi are \
                 not mounted during the build"
            )));
            None
        }
    };
    crate::bootparts::mount_all(
        fstab.as_deref(),
        &spec.boot_partitions,
        &spec.mount_dir,
        root,
        &|said| report(&Report::Note(said)),
    )
    .map_err(|message| Failure {
        phase: Phase::Mount,
        message,
    })
}

/// Grows the mounted root filesystem to fill its device (a disk made longer, its root
/// partition grown with it: see [`crate::grow`]); said in the log. A filesystem that cannot
/// grow keeps its size, which the log says too: the build goes on with the space it had.
fn grow_root(spec: &ExecutorSpec) {
    let Some(fs) = fs_type_of(spec) else {
        return;
    };
    let grown = File::open(&spec.device).and_then(|device| {
        let root = File::open(&spec.mount_dir)?;
        crate::grow::grow_filesystem(root.as_fd(), &device, fs)
    });
    match grown {
        Ok(Some((from, to))) => report(&Report::Note(format!(
            "amidala: grew the root filesystem from {} to {} MiB, the space its disk gives it",
            from >> 20,
            to >> 20,
        ))),
        Ok(None) => {}
        Err(e) => report(&Report::Note(format!(
            "amidala: warning: the root filesystem could not be grown to fill its device \
             ({e}); it keeps its size"
        ))),
    }
}

fn fs_type_of(spec: &ExecutorSpec) -> Option<crate::disk::FsType> {
    match spec.fs_type.as_str() {
        "ext4" => Some(crate::disk::FsType::Ext4),
        "xfs" => Some(crate::disk::FsType::Xfs),
        "btrfs" => Some(crate::disk::FsType::Btrfs),
        _ => None,
    }
}

/// The name the build knows its root filesystem's device by: `/dev/disk/by-uuid/UUID`, as
/// udev names it on a machine. The root is mounted under that name (so that the mount's
/// source, which `grub-probe` and with it `update-grub` read, is a device the build's `/dev`
/// has, not the builder's `/dev/loopN`) and the build's `/dev` has a read-only node of the
/// device there. `None` (mounted as `/dev/loopN`, no node) when the UUID cannot be read.
fn root_disk_name(spec: &ExecutorSpec) -> Option<String> {
    let fs = fs_type_of(spec)?;
    // btrfs registers devices kernel-wide by fsid and name: two builds from one base mounting
    // it under one name would be given one filesystem.
    if fs == crate::disk::FsType::Btrfs {
        return None;
    }
    let device = File::open(&spec.device).ok()?;
    let uuid = crate::disk::fs_uuid(&device, 0, fs).ok()??;
    Some(format!("/dev/disk/by-uuid/{uuid}"))
}

/// Closes the build's output (descriptor 2, which the provisioner's processes were given as
/// their stdout and stderr): they are all gone with their PID namespace, whose init exits
/// only after every other process in it has. The daemon reads the output and the reports on
/// two pipes; the end of this one tells it that all of the output is read, so that the log
/// shows it before the phase reported next. Whatever this process itself might still print
/// on stderr goes with its reports (and is logged by the daemon as an unreadable report).
fn end_build_output() {
    let _ = nix::unistd::dup2(1, 2);
}

/// Writes amidala's boot menu again for the kernels the build left (see [`crate::bootcfg`]);
/// a menu that is not amidala's is left alone. Said in the log; a failure to write it too,
/// which the boot test would show.
fn refresh_boot_menu(spec: &ExecutorSpec, root: BorrowedFd<'_>) {
    if spec.fs_type != "ext4" {
        return;
    }
    let uuid = match std::fs::File::open(&spec.device).and_then(|d| crate::bootcfg::ext4_uuid(&d)) {
        Ok(Some(uuid)) => uuid,
        _ => return,
    };
    match crate::bootcfg::refresh(root, &uuid) {
        Ok(Some(said)) => report(&Report::Note(said)),
        Ok(None) => {}
        Err(why) => report(&Report::Note(format!(
            "amidala: warning: the boot menu could not be written again: {why}"
        ))),
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The mount option that discards the blocks of every file the build deletes as its
/// deletion is committed (on a loop device: holes punched in the volume's file), so that what
/// the build deleted does not travel in the snapshot. The last commit is made by the unmount,
/// which waits for its discards. A build that deletes nothing pays nothing, unlike a trim of
/// all free space after the build (`FITRIM`), whose cost grows with the volume's size.
/// Blocks the source snapshot had free are holes already, or the source's own.
///
/// XFS also gets `nouuid`: it refuses to mount a filesystem whose UUID a mounted one has, and
/// every build of one base (and a builder whose own root was made from the same image) mounts
/// a copy of the same filesystem.
pub(crate) fn root_mount_data(fs_type: &str) -> Option<&'static str> {
    match fs_type {
        "ext4" => Some("discard"),
        "xfs" => Some("discard,nouuid"),
        // Not btrfs's default "async", which drops what is pending at unmount.
        "btrfs" => Some("discard=sync"),
        _ => None,
    }
}

/// Whether the block device `device` can discard (the kernel's `discard_max_bytes`); `true`
/// where that cannot be read, since nothing is known against it.
fn can_discard(device: &Path) -> bool {
    let Some(name) = std::fs::canonicalize(device)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_owned()))
    else {
        return true;
    };
    let limit = Path::new("/sys/class/block")
        .join(name)
        .join("queue/discard_max_bytes");
    std::fs::read_to_string(limit).map_or(true, |text| text.trim() != "0")
}

fn unmount_root(dir: &Path) -> Result<(), Failure> {
    // Anything the provisioner left is dead (its PID namespace is gone), so the filesystem is
    // idle; a short retry covers the kernel finishing the namespace's teardown.
    crate::bootparts::unmount_idle(dir).map_err(fail(
        Phase::Unmount,
        format!("unmounting {}", dir.display()),
    ))
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> nix::Result<OwnedFd> {
    crate::sys::open_at(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// The directory `rel` (components separated by `/`) below `dir`, following no symlink.
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, rel: &str) -> nix::Result<OwnedFd> {
    let mut current = open_dir_at(dir, ".")?;
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        current = open_dir_at(current.as_fd(), part)?;
    }
    Ok(current)
}

/// Whether `name` exists in `dir`, without following a symlink.
fn exists_at(dir: BorrowedFd<'_>, name: &str) -> nix::Result<bool> {
    match fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn create_at(dir: BorrowedFd<'_>, name: &str, mode: u32, content: &[u8]) -> io::Result<()> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    // SAFETY: openat just returned this descriptor, and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(content)?;
    // The mode given to openat is filtered by the umask; set it exactly.
    nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
    Ok(())
}

/// Brings up `lo` in this (new) network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this descriptor, and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `request` and writes its flags into it;
    // `request` is a valid ifreq for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS just filled.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above, SIOCSIFFLAGS reads `request` during the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The architecture of the image's `/bin/sh`, following its symlinks inside the image only.
fn image_architecture(root: BorrowedFd<'_>) -> Option<String> {
    let mut file =
        File::from(crate::sys::open_in_root(root, Path::new("bin/sh"), libc::O_RDONLY).ok()?);
    let mut header = [0u8; 64];
    file.read_exact(&mut header).ok()?;
    crate::disk::elf_arch(&header).map(str::to_owned)
}

/// A file of the image replaced for the duration of the build.
struct Replaced {
    dir: OwnedFd,
    name: &'static str,
    saved_as: &'static str,
    had_original: bool,
    shown: &'static str,
}

impl Replaced {
    fn install(
        dir: OwnedFd,
        name: &'static str,
        saved_as: &'static str,
        mode: u32,
        content: &[u8],
        shown: &'static str,
    ) -> Result<Replaced, Failure> {
        let had_original = exists_at(dir.as_fd(), name)
            .map_err(fail(Phase::Mount, format!("looking at {shown}")))?;
        if had_original {
            renameat(Some(dir.as_raw_fd()), name, Some(dir.as_raw_fd()), saved_as)
                .map_err(fail(Phase::Mount, format!("setting {shown} aside")))?;
        }
        let replaced = Replaced {
            dir,
            name,
            saved_as,
            had_original,
            shown,
        };
        if let Err(e) = create_at(replaced.dir.as_fd(), name, mode, content) {
            let _ = replaced.restore();
            return Err(fail(Phase::Mount, format!("writing {shown}"))(e));
        }
        Ok(replaced)
    }

    fn restore(self) -> Result<(), Failure> {
        let dir = Some(self.dir.as_raw_fd());
        // Whatever is there now (ours, or what the provisioner made of it) goes.
        match unlinkat(dir, self.name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => {
                return Err(fail(
                    Phase::Unmount,
                    format!("removing the build's {}", self.shown),
                )(e))
            }
        }
        if self.had_original {
            renameat(dir, self.saved_as, dir, self.name).map_err(fail(
                Phase::Unmount,
                format!("restoring the image's {}", self.shown),
            ))?;
        }
        Ok(())
    }
}

/// What was changed in the image before provisioning, to undo afterwards.
struct Prepared {
    root: OwnedFd,
    /// Directories amidala made in the image, relative to its root, parents first.
    created_dirs: Vec<String>,
    replaced: Vec<Replaced>,
}

impl Prepared {
    fn new(spec: &ExecutorSpec) -> Result<Prepared, Failure> {
        let root = nix::fcntl::open(
            &spec.mount_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail(Phase::Mount, "opening the image root"))?;
        // SAFETY: open just returned this descriptor, and nothing else owns it.
        let root = unsafe { OwnedFd::from_raw_fd(root) };
        let mut prepared = Prepared {
            root,
            created_dirs: Vec::new(),
            replaced: Vec::new(),
        };
        if let Err(e) = prepared.fill(spec) {
            let _ = prepared.restore();
            return Err(e);
        }
        Ok(prepared)
    }

    fn fill(&mut self, spec: &ExecutorSpec) -> Result<(), Failure> {
        report(&Report::Inspected {
            architecture: image_architecture(self.root.as_fd()),
        });
        for name in MOUNT_POINTS {
            match open_dir_at(self.root.as_fd(), name) {
                Ok(_) => {}
                Err(Errno::ENOENT) => {
                    nix::sys::stat::mkdirat(Some(self.root.as_raw_fd()), name, Mode::from_bits_truncate(0o755))
                        .map_err(fail(Phase::Mount, format!("creating /{name} in the image")))?;
                    self.created_dirs.push(name.to_owned());
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(Failure {
                        phase: Phase::Mount,
                        message: format!("/{name} in the image is a symlink or not a directory; amidala mounts on it and will not follow it"),
                    })
                }
                Err(e) => return Err(fail(Phase::Mount, format!("opening /{name} in the image"))(e)),
            }
        }
        for cache in &spec.caches {
            self.make_dirs(&cache.target)?;
        }
        if let Some(resolv) = &spec.resolv_conf {
            match open_dir_at(self.root.as_fd(), "etc") {
                Ok(etc) => self.replaced.push(Replaced::install(
                    etc,
                    "resolv.conf",
                    RESOLV_SAVED,
                    0o644,
                    resolv.as_bytes(),
                    "/etc/resolv.conf",
                )?),
                Err(e) => report(&Report::Note(format!(
                    "amidala: not installing resolv.conf: /etc in the image: {e}"
                ))),
            }
        }
        match open_dir_at(self.root.as_fd(), "usr").and_then(|usr| open_dir_at(usr.as_fd(), "sbin"))
        {
            Ok(sbin) => self.replaced.push(Replaced::install(
                sbin,
                "policy-rc.d",
                POLICY_SAVED,
                0o755,
                POLICY_RC_D.as_bytes(),
                "/usr/sbin/policy-rc.d",
            )?),
            Err(e) => report(&Report::Note(format!(
                "amidala: not installing policy-rc.d: /usr/sbin in the image: {e}"
            ))),
        }
        Ok(())
    }

    /// Makes the directory `rel` of the image and its missing parents, refusing to follow a
    /// symlink on the way (an image's symlink must never lead a mount outside it).
    fn make_dirs(&mut self, rel: &str) -> Result<(), Failure> {
        let mut dir = open_path_at(self.root.as_fd(), ".")
            .map_err(fail(Phase::Mount, "opening the image root"))?;
        let mut path = String::new();
        for part in rel.split('/') {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            let next = match open_dir_at(dir.as_fd(), part) {
                Err(Errno::ENOENT) => {
                    nix::sys::stat::mkdirat(
                        Some(dir.as_raw_fd()),
                        part,
                        Mode::from_bits_truncate(0o755),
                    )
                    .map_err(fail(Phase::Mount, format!("creating /{path} in the image")))?;
                    self.created_dirs.push(path.clone());
                    open_dir_at(dir.as_fd(), part)
                }
                other => other,
            };
            dir = next.map_err(|e| match e {
                Errno::ELOOP | Errno::ENOTDIR => Failure {
                    phase: Phase::Mount,
                    message: format!("/{path} in the image is a symlink or not a directory; amidala mounts a cache on /{rel} and will not follow it"),
                },
                e => fail(Phase::Mount, format!("opening /{path} in the image"))(e),
            })?;
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<(), Failure> {
        let mut first_error = None;
        while let Some(r) = self.replaced.pop() {
            if let Err(e) = r.restore() {
                first_error.get_or_insert(e);
            }
        }
        while let Some(name) = self.created_dirs.pop() {
            // Through the image's own directories, never a symlink the provisioner made.
            let (parent, last) = name.rsplit_once('/').unwrap_or(("", name.as_str()));
            let removed = open_path_at(self.root.as_fd(), parent).and_then(|parent| {
                unlinkat(Some(parent.as_raw_fd()), last, UnlinkatFlags::RemoveDir)
            });
            match removed {
                Ok(()) | Err(Errno::ENOENT) => {}
                // The provisioner put something of its own there (a parent of a cache's
                // directory, say): it is part of the image now.
                Err(Errno::ENOTEMPTY) => report(&Report::Note(format!(
                    "amidala: kept /{name}, which amidala created for a mount: the provisioner put files in it"
                ))),
                Err(e) => {
                    first_error.get_or_insert(fail(
                        Phase::Unmount,
                        format!("removing /{name}, which amidala created"),
                    )(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            report(&Report::Note(format!("amidala: {}", e.message)));
        }
    }
}

fn provision(
    spec: &ExecutorSpec,
    plugin: &Plugin,
    workspace: &Workspace,
    userns: Option<&OwnedFd>,
    boot: &crate::bootparts::Mounted,
) -> Result<Outcome, Failure> {
    await_cgroups()?;
    report(&Report::Phase(Phase::Provision));
    let filter = crate::confine::provisioner_filter(&spec.allow).map_err(|message| Failure {
        phase: Phase::Provision,
        message,
    })?;
    let (result_read, result_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(fail(Phase::Provision, "creating the result pipe"))?;
    // SAFETY: this process is single-threaded (the executor never starts a thread), so the
    // child may run arbitrary code after fork.
    match unsafe { fork() }.map_err(fail(Phase::Provision, "forking the provisioner"))? {
        ForkResult::Child => {
            drop(result_read);
            let code = init_process(
                spec,
                plugin,
                result_write.as_raw_fd(),
                &filter,
                workspace,
                userns,
                boot,
            );
            // SAFETY: _exit ends the process without running the executor's exit handlers
            // (both the plugin process and PID 1 end here).
            unsafe { libc::_exit(code & 0xff) }
        }
        ForkResult::Parent { child } => {
            drop(result_write);
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            let action = SigAction::new(
                SigHandler::Handler(on_sigterm),
                SaFlags::empty(),
                SigSet::empty(),
            );
            // SAFETY: the handler only calls kill(2), which is async-signal-safe.
            unsafe { signal::sigaction(Signal::SIGTERM, &action) }
                .map_err(fail(Phase::Provision, "installing the SIGTERM handler"))?;
            let status = loop {
                match waitpid(child, None) {
                    Ok(status) => break status,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(fail(Phase::Provision, "waiting for the provisioner")(e)),
                }
            };
            CHILD.store(0, Ordering::SeqCst);
            let mut text = String::new();
            let _ = File::from(result_read).read_to_string(&mut text);
            // The first line is the plugin process's error, if it reported one; else PID 1's
            // account of how the plugin process ended.
            let first = text.lines().next().map(serde_json::from_str::<ChildResult>);
            match (first, status) {
                (Some(Ok(ChildResult::SetupFailed(message))), _) => Err(Failure {
                    phase: Phase::Provision,
                    message: format!("setting up the provisioner: {message}"),
                }),
                (Some(Ok(ChildResult::PluginError(message))), _) => Ok(Outcome::Error(message)),
                (Some(Ok(ChildResult::Signalled(sig))), _) => Ok(Outcome::Signalled(sig)),
                (Some(Ok(ChildResult::Status(code))), _) => Ok(Outcome::Exited(code)),
                // PID 1 itself was killed (a cancel kills it with SIGKILL).
                (_, WaitStatus::Signaled(_, sig, _)) => Ok(Outcome::Signalled(sig as i32)),
                (_, other) => Err(Failure {
                    phase: Phase::Provision,
                    message: format!("provisioner ended unexpectedly: {other:?}"),
                }),
            }
        }
    }
}

/// Waits for the daemon's word that this process is in every cgroup of the build (the rest of
/// stdin, after the spec): nothing of the build may start outside its limits.
fn await_cgroups() -> Result<(), Failure> {
    let mut word = Vec::new();
    io::stdin()
        .lock()
        .take(IN_CGROUPS.len() as u64 + 1)
        .read_to_end(&mut word)
        .map_err(fail(Phase::Mount, "waiting to be in the build's cgroups"))?;
    if word != IN_CGROUPS {
        return Err(Failure {
            phase: Phase::Mount,
            message: "the daemon did not put the executor into the build's cgroups".into(),
        });
    }
    Ok(())
}

fn errno_context(what: impl std::fmt::Display) -> impl FnOnce(Errno) -> String {
    move |e| format!("{what}: {e}")
}

/// Runs in the provisioner process (PID 1 of the build's PID namespace) before the plugin.
/// One step of setting up the provisioner's view of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SetupStep {
    /// `mount(source, <image>/target, fstype, flags, data)`; `source` "." is the workspace
    /// (our working directory), `None` a remount.
    Mount {
        source: Option<&'static str>,
        target: &'static str,
        fstype: Option<&'static str>,
        flags: MsFlags,
        data: Option<String>,
        what: &'static str,
    },
    /// The workspace's view (read-only unless asked, with the user's rights: see
    /// [`crate::workspace`]) attached on `<image>/workspace`.
    Workspace,
    /// Device nodes, directories and links in the fresh /dev.
    PopulateDev,
    /// `<image>/target`, if it exists, bound onto itself read-only.
    ReadOnly(&'static str),
    /// `<image>/target`, if it exists, hidden: a file under a read-only /dev/null, a
    /// directory under an empty read-only tmpfs.
    Mask(&'static str),
}

/// What the provisioner sees, in the order it is set up: a plan rather than code, so the
/// flags are checked by unit tests without root. `root` is the host id of the provisioner's
/// root (0, or its user namespace's base): the fresh /dev, its ptys and shared memory are
/// that root's.
fn provisioner_mounts(root: u32) -> Vec<SetupStep> {
    use SetupStep::{Mask, Mount, PopulateDev, ReadOnly, Workspace};
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut plan = vec![
        Workspace,
        Mount {
            source: Some("proc"),
            target: "proc",
            fstype: Some("proc"),
            flags: nosuid_nodev_noexec,
            data: None,
            what: "mounting /proc",
        },
        Mount {
            source: Some("sysfs"),
            target: "sys",
            fstype: Some("sysfs"),
            flags: nosuid_nodev_noexec | MsFlags::MS_RDONLY,
            data: None,
            what: "mounting /sys",
        },
        Mount {
            source: Some("tmpfs"),
            target: "dev",
            fstype: Some("tmpfs"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some(format!("mode=755,size=16m,uid={root},gid={root}")),
            what: "mounting /dev",
        },
        PopulateDev,
    ];
    // Kernel settings are the host's: readable, not writable. And what the runtimes hide
    // (sysrq, kcore, the kernel log, timers, keys, firmware) hidden. After /dev: the masks
    // need /dev/null.
    plan.extend(crate::confine::READ_ONLY.iter().map(|&p| ReadOnly(p)));
    plan.extend(crate::confine::MASKED.iter().map(|&p| Mask(p)));
    plan.extend([
        Mount {
            source: Some("devpts"),
            target: "dev/pts",
            fstype: Some("devpts"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // The image's tty group (5), as the provisioner's namespace numbers it.
            data: Some(format!(
                "newinstance,ptmxmode=0666,mode=620,gid={}",
                root + 5
            )),
            what: "mounting /dev/pts",
        },
        Mount {
            source: Some("tmpfs"),
            target: "dev/shm",
            fstype: Some("tmpfs"),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some(format!("mode=1777,uid={root},gid={root}")),
            what: "mounting /dev/shm",
        },
    ]);
    plan
}

/// Runs in the provisioner process (PID 1 of the build's PID namespace) before the plugin.
fn child_setup(
    spec: &ExecutorSpec,
    keep: RawFd,
    filter: &ScmpFilterContext,
    workspace: &Workspace,
    userns: Option<&OwnedFd>,
    boot: &crate::bootparts::Mounted,
) -> Result<(), String> {
    let root = &spec.mount_dir;
    let root_id = spec.id_base.filter(|_| userns.is_some()).unwrap_or(0);
    // The build's own disks, as their mounts name them.
    let mut disks: Vec<(String, u64)> = root_disk_name(spec)
        .zip(nix::sys::stat::stat(&spec.device).ok().map(|st| st.st_rdev))
        .into_iter()
        .collect();
    disks.extend(boot.disks());
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(errno_context("creating the provisioner's mount namespace"))?;
    crate::sys::make_mounts_private().map_err(errno_context("making mounts private"))?;
    if let Some(userns) = userns {
        // The boot partitions mounted on the image, before its mapped view covers them.
        let mut below = Vec::new();
        for (rel, part) in &boot.mounts {
            let fd = File::open(root.join(rel)).map_err(|e| format!("opening /{rel}: {e}"))?;
            below.push((rel, part.copy.is_some(), fd));
        }
        // The image as the provisioner's namespace sees it: its owners 0 to 65 535 are the
        // namespace's, everything else on the host no one's it knows.
        let image = File::open(root).map_err(|e| format!("opening the image's root: {e}"))?;
        idmap::attach_mapped(image.as_fd(), userns.as_fd(), 0, root)
            .map_err(|e| format!("mapping the image's owners into the build's namespace: {e}"))?;
        // Mapped as the root is; a copy's files (the copier's, an id of the same range) as
        // they are.
        let attrs = idmap::MOUNT_ATTR_NOSUID | idmap::MOUNT_ATTR_NODEV;
        for (rel, copy, fd) in below {
            let target = root.join(rel);
            if copy {
                idmap::clone_tree(fd.as_fd()).and_then(|tree| idmap::attach(tree.as_fd(), &target))
            } else {
                idmap::attach_mapped(fd.as_fd(), userns.as_fd(), attrs, &target)
            }
            .map_err(|e| format!("mounting /{rel} in the build's namespace: {e}"))?;
        }
    }
    for step in provisioner_mounts(root_id) {
        match step {
            SetupStep::Workspace => idmap::attach(workspace.view.as_fd(), &root.join("workspace"))
                .map_err(|e| format!("mounting the workspace: {e}"))?,
            SetupStep::Mount {
                source,
                target,
                fstype,
                flags,
                data,
                what,
            } => mount(source, &root.join(target), fstype, flags, data.as_deref())
                .map_err(errno_context(what))?,
            SetupStep::PopulateDev => populate_dev(&root.join("dev"), root_id, &disks)?,
            SetupStep::ReadOnly(target) => {
                if root.join(target).exists() {
                    read_only_bind(&root.join(target), &root.join(target))?
                }
            }
            SetupStep::Mask(target) => mask(&root.join(target), &root.join("dev/null"))?,
        }
    }

    // Package caches: their directories in the image were made (never through a symlink)
    // before provisioning, and nothing of the image has run since.
    for cache in &spec.caches {
        let target = root.join(&cache.target);
        if let Some(userns) = userns {
            // Root's directory, seen as the namespace's root's (and written as root's).
            let host = File::open(&cache.host)
                .map_err(|e| format!("opening the cache for /{}: {e}", cache.target))?;
            idmap::attach_mapped(
                host.as_fd(),
                userns.as_fd(),
                idmap::MOUNT_ATTR_NOSUID | idmap::MOUNT_ATTR_NODEV,
                &target,
            )
            .map_err(|e| format!("mounting the cache on /{}: {e}", cache.target))?;
            continue;
        }
        mount(
            Some(&cache.host),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(errno_context(format!(
            "mounting the cache on /{}",
            cache.target
        )))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(errno_context(format!(
            "setting the flags of the cache on /{}",
            cache.target
        )))?;
    }

    // Into the image; the host's tree is detached and unreachable from here on.
    std::env::set_current_dir(root).map_err(|e| format!("entering the image: {e}"))?;
    pivot_root(".", ".").map_err(errno_context("pivoting into the image"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(errno_context("detaching the host's tree"))?;
    std::env::set_current_dir("/").map_err(|e| format!("entering /: {e}"))?;
    if let Some(userns) = userns {
        enter_user_namespace(userns.as_fd())?;
    }
    // Killed with the executor (set after the credentials change, which clears it): a build
    // never outlives the process that unmounts and reports it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(errno_context("setting PID 1's parent-death signal"))?;

    // Standard streams: stdin empty, stdout and stderr the build log. Nothing else inherited.
    let null = File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
    nix::unistd::dup2(null.as_raw_fd(), 0).map_err(errno_context("redirecting stdin"))?;
    nix::unistd::dup2(2, 1).map_err(errno_context("redirecting stdout"))?;
    drop(null);
    // All but the result pipe, which is close-on-exec: the provisioner's programs never get it.
    close_range(3, keep as u32 - 1);
    close_range(keep as u32 + 1, u32::MAX);

    std::env::set_current_dir(&spec.build.workspace)
        .map_err(|e| format!("entering {}: {e}", spec.build.workspace))?;
    // The filter first, while CAP_SYS_ADMIN still lets it be loaded without no_new_privs;
    // then every capability but the provisioner's baseline, from every set.
    crate::confine::load(filter)?;
    crate::confine::keep_only(&spec.allow.capabilities())?;
    scrub_environment(&spec.build);
    Ok(())
}

/// Makes this process root of the build's user namespace: every mount is made (the mount
/// namespace stays the host root's, so nothing in the build can change it), and from here on
/// its capabilities count only in that namespace and over files whose owners it maps. A
/// descriptor of a host file handed into the build (over a socket in the workspace, say) is
/// then opened with no more rights than any other user's: host root's files are not the
/// namespace's.
fn enter_user_namespace(userns: BorrowedFd<'_>) -> Result<(), String> {
    nix::sched::setns(userns, CloneFlags::CLONE_NEWUSER)
        .map_err(errno_context("entering the build's user namespace"))?;
    let root_gid = nix::unistd::Gid::from_raw(0);
    let root_uid = nix::unistd::Uid::from_raw(0);
    nix::unistd::setgroups(&[]).map_err(errno_context("clearing supplementary groups"))?;
    nix::unistd::setresgid(root_gid, root_gid, root_gid)
        .map_err(errno_context("becoming the namespace's root group"))?;
    nix::unistd::setresuid(root_uid, root_uid, root_uid)
        .map_err(errno_context("becoming the namespace's root"))?;
    // PID 1 holds what the build must not hand on (the result pipe, the daemon's memory
    // copied at fork): not open to ptrace or /proc/1/fd from the build's ids, whatever
    // fs.suid_dumpable says.
    // SAFETY: prctl with PR_SET_DUMPABLE and plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "making PID 1 undumpable: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Binds `source` onto `target` and makes that mount read-only, nosuid, nodev and noexec.
fn read_only_bind(source: &Path, target: &Path) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(errno_context(format!("binding {}", target.display())))?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(errno_context(format!(
        "making {} read-only",
        target.display()
    )))
}

/// Hides `target` if it exists: a file under `null` (read-only), a directory under an empty
/// read-only tmpfs.
fn mask(target: &Path, null: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,nr_inodes=1,mode=555"),
        )
        .map_err(errno_context(format!("hiding {}", target.display()))),
        Ok(_) => read_only_bind(null, target),
        Err(_) => Ok(()),
    }
}

/// Makes the build's device nodes, directories and links in `dev`, owned by host id `owner`
/// (the provisioner's root), and `disk` (its name under `/dev`, as [`root_disk_name`] gives
/// it, and device number): the build's root filesystem's device, for the boot tooling
/// (`grub-probe` reads the filesystem's UUID from it). That node and its directories are the
/// host's root's, mode 0444: the provisioner, root of a user namespace that does not map the
/// host's root, may read its own filesystem's device but not write it, change its mode or
/// remove it, and the loop device's own ioctls are refused it by its seccomp filter
/// ([`crate::confine::refuse_loop_ioctls`]).
fn populate_dev(dev: &Path, owner: u32, disks: &[(String, u64)]) -> Result<(), String> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(errno_context(format!("creating /dev/{name}")))?;
        nix::sys::stat::fchmodat(
            None,
            &path,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(errno_context(format!("setting the mode of /dev/{name}")))?;
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(dev.join(dir)).map_err(|e| format!("creating /dev/{dir}: {e}"))?;
    }
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| format!("creating /dev/{link}: {e}"))?;
    }
    for (name, rdev) in disks {
        let rel = name.strip_prefix("/dev/").unwrap_or(name);
        let node = dev.join(rel);
        if let Some(parent) = node.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| format!("creating the directory of {name}: {e}"))?;
        }
        mknod(
            &node,
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o444),
            *rdev,
        )
        .map_err(errno_context(format!("creating {name}")))?;
        nix::sys::stat::fchmodat(
            None,
            &node,
            Mode::from_bits_truncate(0o444),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(errno_context(format!("setting the mode of {name}")))?;
    }
    if owner != 0 {
        let id = Some(nix::unistd::Uid::from_raw(owner));
        let gid = Some(nix::unistd::Gid::from_raw(owner));
        for entry in std::fs::read_dir(dev).map_err(|e| format!("reading /dev: {e}"))? {
            let path = entry.map_err(|e| format!("reading /dev: {e}"))?.path();
            if path.file_name() == Some(std::ffi::OsStr::new("disk")) {
                continue;
            }
            nix::unistd::fchownat(None, &path, id, gid, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(
                errno_context(format!("giving {} to the build's root", path.display())),
            )?;
        }
    }
    Ok(())
}

/// Closes descriptors `first..=last`; nothing in the provisioner process uses them any more
/// (the plugin library is mapped, not held open).
pub(crate) fn close_range(first: u32, last: u32) {
    if first > last {
        return;
    }
    // SAFETY: close_range only closes descriptors, none of which is owned by a live Rust value
    // in this process (see the caller).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc != 0 {
        // Kernels before 5.9: close one by one.
        for fd in first..=last.min(4096) {
            // SAFETY: as above; closing a descriptor that is not open is harmless (EBADF).
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

fn scrub_environment(build: &BuildInfo) {
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for (key, value) in [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("HOME", "/root"),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", "/bin/sh"),
        ("LANG", "C.UTF-8"),
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("AMIDALA", "1"),
        ("AMIDALA_BUILD_ID", &build.build_id),
        ("AMIDALA_SOURCE_SNAPSHOT", &build.source_snapshot),
        ("AMIDALA_IMAGE_NAME", &build.image_name),
        ("AMIDALA_WORKSPACE", &build.workspace),
    ] {
        std::env::set_var(key, value);
    }
}

/// Splits the executor's report stream; used by the daemon.
pub fn parse_report(line: &[u8]) -> Result<Report, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provisioner_sees_its_workspace_and_a_read_only_sys() {
        let plan = provisioner_mounts(0);
        let flags_of = |target: &str| -> Vec<MsFlags> {
            plan.iter()
                .filter_map(|s| match s {
                    SetupStep::Mount {
                        target: t, flags, ..
                    } if *t == target => Some(*flags),
                    _ => None,
                })
                .collect()
        };
        // The workspace's view (its flags: crate::idmap's tests) comes first, before /proc.
        assert_eq!(plan[0], SetupStep::Workspace);
        assert!(flags_of("sys")[0]
            .contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV));
        assert!(flags_of("proc")[0]
            .contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC));
        assert!(flags_of("dev")[0].contains(MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC));
        // /dev is populated after its tmpfs is mounted and before devpts and shm go on it.
        let position = |step: &SetupStep| plan.iter().position(|s| s == step).unwrap();
        let dev = plan
            .iter()
            .position(|s| matches!(s, SetupStep::Mount { target: "dev", .. }))
            .unwrap();
        let pts = plan
            .iter()
            .position(|s| {
                matches!(
                    s,
                    SetupStep::Mount {
                        target: "dev/pts",
                        ..
                    }
                )
            })
            .unwrap();
        assert!(dev < position(&SetupStep::PopulateDev) && position(&SetupStep::PopulateDev) < pts);
        // /proc is mounted before it is locked down, and the masks need /dev/null.
        let proc = plan
            .iter()
            .position(|s| matches!(s, SetupStep::Mount { target: "proc", .. }))
            .unwrap();
        assert!(proc < position(&SetupStep::ReadOnly("proc/sys")));
        assert!(
            position(&SetupStep::PopulateDev) < position(&SetupStep::Mask("proc/sysrq-trigger"))
        );
        for masked in [
            "proc/sysrq-trigger",
            "proc/kcore",
            "proc/kmsg",
            "proc/keys",
            "proc/timer_list",
            "sys/firmware",
        ] {
            assert!(plan.contains(&SetupStep::Mask(masked)), "{masked}");
        }
        for read_only in ["proc/sys", "proc/irq", "proc/bus", "proc/fs"] {
            assert!(
                plan.contains(&SetupStep::ReadOnly(read_only)),
                "{read_only}"
            );
        }
    }

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Phase(Phase::Mount),
            Report::Provisioned(Outcome::Exited(3)),
            Report::Failed {
                phase: Phase::Unmount,
                message: "x".into(),
            },
            Report::Done,
        ] {
            let line = serde_json::to_vec(&r).unwrap();
            assert_eq!(parse_report(&line).unwrap(), r);
        }
    }
}
