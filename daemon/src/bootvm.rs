//! The boot test of the local provider: the image booted in QEMU, its serial console read
//! until the guest shows that it booted.
//!
//! QEMU parses a disk a user made, so it never runs as root and sees almost nothing of the
//! host. The daemon starts the helper `amidalad-exec __bootvm` (root) with the image open
//! read-only as descriptor 3 and a [`VmJob`] on stdin; the helper
//!
//! 1. unshares mount, network (no network: the guest has none), IPC, UTS and PID namespaces,
//!    forks the PID namespace's first process (the helper itself waits for it and exits with
//!    its status; whatever the program forks ends with it) and makes its mounts private;
//! 2. mounts a size-bounded tmpfs as the VM's root: the host's `/usr` bound read-only (QEMU,
//!    its libraries, SeaBIOS and OVMF live there), `/dev` with `null`, `zero`, `random`,
//!    `urandom` and, for KVM, a `kvm` node of the VM's user alone, `/tmp` and `/var/tmp`
//!    (where QEMU keeps the copy-on-write overlay of `-snapshot`: the image itself is opened
//!    read-only and never changes) and `/vm` (UEFI's variable store, a copy);
//! 3. pivots into it and detaches the host's tree, closes every other descriptor, takes the
//!    VM's host id (no groups, no capabilities, no new privileges) and executes QEMU with its
//!    own seccomp sandbox on (`-sandbox on,…`), memory and CPUs bounded (`-m`, `-smp`,
//!    TCG's translation cache).
//!
//! QEMU's serial console is its stdout, read by the daemon line by line into the build's log;
//! the test passes when a line shows the boot signal (a login prompt, `NAME login:`, or the
//! user's marker) and fails on a sign of a failed boot (a kernel panic, the initramfs's or
//! systemd's emergency shell, GRUB's rescue prompt or an error it waits on), QEMU's exit, or
//! the time limit. QEMU is killed at the end of every test: the overlay goes with it.
//!
//! KVM is used where `/dev/kvm` exists and can run the guest. A KVM that cannot is seen by
//! what it does: QEMU reports an emulation failure (nested KVM on some hosts stops on
//! `cmpxchg16b` or `xrstor`), or the guest's kernel has not printed its first line 20 s after
//! QEMU started (nested KVM emulating the firmware's and GRUB's real-mode code so slowly it
//! never gets there, counted only once the same guest boots under TCG). The test runs again
//! under TCG, QEMU's emulator, saying so in the log, and the owner's later boot tests start
//! under TCG until the daemon restarts: a guest is its owner's to make, so it decides nothing
//! for anyone else's.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amidala::proto::ErrorCode;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::bootcfg::Arch;
use crate::error::Failure;

/// The argument that makes `amidalad-exec` the boot test's helper.
pub const BOOTVM_ARG: &str = "__bootvm";
/// The image's descriptor in the helper and in QEMU.
const IMAGE_FD: RawFd = 3;
/// Where QEMU finds its firmware.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// arm64 guests: QEMU's `virt` machine with UEFI (AAVMF, EDK2's build for it).
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";
const QEMU_ARM64: &str = "/usr/bin/qemu-system-aarch64";
/// QEMU's disk image tool (package qemu-utils), for qcow2 imports.
pub const QEMU_IMG: &str = "/usr/bin/qemu-img";
/// How long KVM has to show the guest's kernel starting before it is judged unable to run it.
const KVM_TRIAL: Duration = Duration::from_secs(20);
/// Lines of the console kept for the error of a failed test.
pub(crate) const TAIL_LINES: usize = 25;
/// The longest console line written to the log (longer ones are cut).
const LINE_MAX: usize = 400;

/// Which firmware boots the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS).
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    /// The firmware of a `bios`, `uefi` or `bios+uefi` list (an image's [`amidala::proto::BOOT_TAG`]
    /// or a user's `--boot-firmware`).
    pub fn parse_list(list: &str) -> Result<Vec<Firmware>, String> {
        let mut out = Vec::new();
        for name in list.split(['+', ',']) {
            let f = match name.trim() {
                "bios" => Firmware::Bios,
                "uefi" => Firmware::Uefi,
                other => {
                    return Err(format!(
                        "{other:?} is not a firmware: bios, uefi or bios+uefi"
                    ))
                }
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        Ok(out)
    }
}

/// How QEMU accelerates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM where it works, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The daemon's settings of boot tests (`[boot_test]` in its configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub accel: Accel,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Seconds a boot may take unless the build says otherwise, and the most it may say.
    pub timeout: u64,
    pub max_timeout: u64,
    /// Seconds an `amidala run` VM may run.
    pub max_run: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            accel: Accel::Auto,
            memory_mib: 1024,
            cpus: 1,
            timeout: 300,
            max_timeout: 1800,
            max_run: 3600,
        }
    }
}

/// What boot tests learnt of KVM, per owner of the images booted: a guest is its owner's to
/// make, and may behave differently under KVM, so what one owner's guests show decides only
/// that owner's later boot tests (until the daemon restarts).
static KVM_BROKEN_FOR: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn kvm_broken_for(owner: u32) -> bool {
    KVM_BROKEN_FOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&owner)
}

fn remember_kvm_broken(owner: u32) {
    let mut owners = KVM_BROKEN_FOR.lock().unwrap_or_else(|e| e.into_inner());
    if !owners.contains(&owner) && owners.len() < 65536 {
        owners.push(owner);
    }
}

/// Whether `program` is an executable file in the daemon's PATH directories.
pub fn on_path(program: &str) -> bool {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .any(|dir| {
        nix::unistd::access(
            &Path::new(dir).join(program),
            nix::unistd::AccessFlags::X_OK,
        )
        .is_ok()
    })
}

/// The UEFI firmware QEMU boots `arch`'s guests with: its code and its variable store.
fn uefi_files(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => (OVMF_CODE, OVMF_VARS),
        Arch::Arm64 => (AAVMF_CODE, AAVMF_VARS),
    }
}

/// What the host lacks to boot `arch`'s images with `firmware`, by package.
pub fn missing(arch: Arch, firmware: &[Firmware]) -> Option<String> {
    let mut missing = Vec::new();
    let (code, vars) = uefi_files(arch);
    let (qemu, packages) = match arch {
        Arch::X86_64 => (
            QEMU,
            [
                "qemu-system-x86_64 (package qemu-system-x86)",
                "UEFI firmware for QEMU (package ovmf)",
            ],
        ),
        Arch::Arm64 => (
            QEMU_ARM64,
            [
                "qemu-system-aarch64 (package qemu-system-arm)",
                "UEFI firmware for QEMU's arm64 machine (package qemu-efi-aarch64)",
            ],
        ),
    };
    if !Path::new(qemu).exists() {
        missing.push(packages[0]);
    }
    if firmware.contains(&Firmware::Uefi) && !(Path::new(code).exists() && Path::new(vars).exists())
    {
        missing.push(packages[1]);
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The machine a snapshot or image boots on, by its [`amidala::proto::BOOT_ARCH_TAG`].
pub fn arch_of(tags: &std::collections::BTreeMap<String, String>) -> Result<Arch, Failure> {
    Arch::of_tag(tags.get(amidala::proto::BOOT_ARCH_TAG).map(String::as_str))
        .map_err(Failure::invalid)
}

/// Refuses a firmware `arch` has not: arm64 boots with UEFI only.
pub fn check_firmware(arch: Arch, firmware: &[Firmware]) -> Result<(), Failure> {
    if arch == Arch::Arm64 && firmware.contains(&Firmware::Bios) {
        return Err(Failure::invalid(
            "the image is an arm64 one (amidala:boot-arch = arm64), which boots with UEFI only: \
             legacy BIOS is x86's",
        ));
    }
    Ok(())
}

/// Whether KVM can run `arch`'s guests here at all: only the host's own architecture (another
/// one is emulated by TCG).
fn kvm_for(arch: Arch, settings: &Settings, owner: u32) -> bool {
    arch == Arch::host()
        && match settings.accel {
            Accel::Tcg => false,
            Accel::Kvm => true,
            Accel::Auto => Path::new("/dev/kvm").exists() && !kvm_broken_for(owner),
        }
}

/// One boot to test.
#[derive(Debug, Clone)]
pub struct Test<'a> {
    pub firmware: Firmware,
    /// The machine QEMU emulates.
    pub arch: Arch,
    /// What shows the guest booted, else a login prompt.
    pub marker: Option<&'a str>,
    pub timeout: Duration,
    /// The host id QEMU runs as.
    pub uid: u32,
    /// The uid of the image's owner (whose guests decide whether KVM is used for them).
    pub owner: u32,
    /// An empty directory may be made here (root's) as the VM's root mount point.
    pub staging: &'a Path,
}

/// A passed test.
#[derive(Debug, Clone)]
pub struct Passed {
    pub firmware: Firmware,
    pub accel: &'static str,
    /// From QEMU's start to the boot signal.
    pub seconds: f64,
}

/// Checks a boot test asked for, before anything is made.
pub fn check_test(
    test: &amidala::proto::BootTestSpec,
    settings: &Settings,
    provider: &str,
) -> Result<(), Failure> {
    // Local: QEMU boots the snapshot before it is registered. Ec2: an instance of the
    // registered AMI (see crate::ec2::boot), whose firmware the provider checks against the
    // AMI's boot mode.
    if provider != "local" && provider != "ec2" {
        return Err(Failure::invalid(format!(
            "--boot-test: the {provider} provider cannot boot-test images"
        )));
    }
    if let Some(list) = &test.firmware {
        Firmware::parse_list(list)
            .map_err(|why| Failure::invalid(format!("--boot-firmware: {why}")))?;
    }
    if let Some(marker) = &test.marker {
        if marker.trim().is_empty() || marker.len() > 200 || marker.chars().any(char::is_control) {
            return Err(Failure::invalid(
                "--boot-marker must be 1 to 200 characters of text, without control characters",
            ));
        }
    }
    if let Some(t) = test.timeout {
        if t < 10 || t > settings.max_timeout {
            return Err(Failure::invalid(format!(
                "--boot-timeout {t} s: it must be at least 10 s and at most {} s ([boot_test] \
                 max_timeout)",
                settings.max_timeout
            )));
        }
    }
    Ok(())
}

/// The host id QEMU runs as for `owner`'s boot tests: the last of the owner's build range (a
/// member's VMs then share ids only with that member's own builds), or for root's builds the
/// last of the import sandbox's range.
pub fn vm_uid(daemon: &crate::Daemon, owner: u32) -> Result<u32, Failure> {
    let last = crate::idrange::RANGE - 1;
    Ok(match owner {
        0 => daemon.config.import_id_base + last,
        uid => daemon.id_ranges.base_of(uid)? + last,
    })
}

/// Boots the image file `image` with each firmware `test` asks for, else each the image
/// was made for (`boot`, its [`amidala::proto::BOOT_TAG`]), on a machine of `arch`; stops at
/// the first that fails.
pub async fn boot_all(
    daemon: &crate::Daemon,
    owner: u32,
    image: &Path,
    made_for: Option<&str>,
    arch: Arch,
    test: &amidala::proto::BootTestSpec,
    console: &(dyn Fn(String) + Sync),
) -> Result<Vec<Passed>, Failure> {
    let firmware = match (&test.firmware, made_for) {
        (Some(list), _) => Firmware::parse_list(list).map_err(Failure::invalid)?,
        (None, Some("none")) => return Err(Failure::invalid(
            "the image cannot boot: it was imported from a tree without a kernel (amidala:boot \
                 = none); import a tree with a kernel and an initramfs, or name the firmware with \
                 --boot-firmware",
        )),
        (None, Some(list)) => Firmware::parse_list(list).map_err(Failure::invalid)?,
        (None, None) => {
            return Err(Failure::invalid(
                "the image does not say how it boots (no amidala:boot tag): name the firmware \
                 with --boot-firmware bios|uefi",
            ))
        }
    };
    check_firmware(arch, &firmware)?;
    let settings = &daemon.config.boot_test;
    let file = std::fs::File::open(image)
        .map_err(|e| Failure::io(format!("opening {}", image.display()), e))?;
    let staging = daemon.catalog.tmp_dir();
    let uid = vm_uid(daemon, owner)?;
    let mut passed = Vec::new();
    for firmware in firmware {
        let one = Test {
            firmware,
            arch,
            marker: test.marker.as_deref(),
            timeout: Duration::from_secs(test.timeout.unwrap_or(settings.timeout)),
            uid,
            owner,
            staging: &staging,
        };
        let p = boot(&file, &one, settings, console).await?;
        console(format!(
            "amidala: boot test ({}, {}) passed in {:.1} s",
            p.firmware.name(),
            p.accel,
            p.seconds
        ));
        passed.push(p);
    }
    Ok(passed)
}

/// What an image's [`amidala::proto::BOOT_TEST_DETAIL_TAG`] says of passed tests, e.g.
/// `bios 61.2s tcg, uefi 62.0s tcg`.
pub fn detail(passed: &[Passed]) -> String {
    passed
        .iter()
        .map(|p| format!("{} {:.1}s {}", p.firmware.name(), p.seconds, p.accel))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the helper is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmJob {
    /// An empty directory: the VM's root is mounted on it.
    pub root_dir: PathBuf,
    pub uid: u32,
    /// Make `/dev/kvm` for the VM.
    pub kvm: bool,
    /// Copy OVMF's variable store to `/vm/vars.fd`.
    pub uefi: bool,
    /// What is executed.
    #[serde(default)]
    pub program: Program,
    /// Its arguments.
    pub args: Vec<String>,
    /// A block device made `/dev/disk` in the VM's root (its `dev_t`), the VM's user's alone.
    #[serde(default)]
    pub disk: Option<u64>,
    /// A block device made `/dev/source` in the VM's root, readable by the VM's user alone.
    #[serde(default)]
    pub source: Option<u64>,
    /// A host directory, the VM's user's, bound at `/out` (nosuid, nodev, noexec): where a tool
    /// writes files for the daemon or reads them from.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// The daemon's pid: the helper's parent, else the daemon has gone.
    #[serde(default)]
    pub parent: u32,
    /// The program's stdin is what follows the job on the helper's (`amidala run`: the user's
    /// keystrokes for the serial console), not `/dev/null`.
    #[serde(default)]
    pub console_input: bool,
}

/// The programs the helper executes: QEMU for a boot test, e2fsprogs' checker and resizer for
/// a grown ext4 filesystem (see [`crate::grow`]), `qemu-img` for a qcow2 image imported (see
/// [`crate::import`]), mtools' formatter and copier for an EFI system partition given to a
/// build as a copy (see [`crate::espcopy`]). Named, not given as paths: the helper runs
/// nothing else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Program {
    #[default]
    Qemu,
    QemuArm64,
    E2fsck,
    Resize2fs,
    QemuImg,
    Mformat,
    Mcopy,
}

impl Program {
    fn path(self) -> &'static str {
        match self {
            Program::Qemu => QEMU,
            Program::QemuArm64 => QEMU_ARM64,
            Program::E2fsck => "/usr/sbin/e2fsck",
            Program::Resize2fs => "/usr/sbin/resize2fs",
            Program::QemuImg => QEMU_IMG,
            Program::Mformat => "/usr/bin/mformat",
            Program::Mcopy => "/usr/bin/mcopy",
        }
    }
}

/// The helper's root directory: only ever mounted in the helper's namespace, so an empty
/// directory once the helper is gone, removed then.
struct RootDir(PathBuf);

impl Drop for RootDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Starts the helper (named `name` in `ps`) on `job`, its root a new directory in `staging`,
/// with `image` as its descriptor [`IMAGE_FD`] if given.
async fn start_helper(
    staging: &Path,
    mut job: VmJob,
    name: &str,
    image: Option<&std::fs::File>,
) -> Result<(crate::spawn::Child, RootDir), Failure> {
    use tokio::io::AsyncWriteExt;
    job.root_dir = staging.join(crate::ids::new_id("vm"));
    job.parent = std::process::id();
    std::fs::create_dir(&job.root_dir)
        .map_err(|e| Failure::io(format!("creating {}", job.root_dir.display()), e))?;
    let dir = RootDir(job.root_dir.clone());
    let mut child = crate::spawn::spawn(&crate::spawn::Spec {
        program: crate::helper::program().as_os_str(),
        args: vec![name.as_ref(), BOOTVM_ARG.as_ref()],
        env: vec![("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        pass: image.map(|image| (image.as_fd(), IMAGE_FD)),
        cgroup: None,
        creds: None,
        stdout: None,
    })
    .map_err(|e| Failure::io(format!("starting {name}"), e))?;
    let mut stdin = child.stdin.take().expect("piped");
    // One line of JSON (it holds no newline): what follows is the program's, if anything.
    let mut line = serde_json::to_vec(&job).expect("jobs serialize");
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .map_err(|e| Failure::io(format!("sending {name} its job"), e))?;
    if job.console_input {
        child.stdin = Some(stdin);
    }
    Ok((child, dir))
}

/// Reads `stream` to its end, keeping at most `max` bytes of it.
async fn read_bounded(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    kept: &mut Vec<u8>,
    max: usize,
) {
    let mut buf = vec![0u8; 8192];
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        let room = max.saturating_sub(kept.len()).min(n);
        kept.extend_from_slice(&buf[..room]);
    }
}

/// Stops the helper and what it runs: SIGTERM, on which it kills its PID namespace and
/// returns only once every process in it has gone (so nothing holds the disk or the image
/// after this); SIGKILL if it has not within 10 s.
async fn stop(child: &mut crate::spawn::Child) {
    let _ = child.signal(libc::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The helper's exit status when it could not start the program (not the program's own).
const HELPER_FAILED: i32 = 125;

/// A run of a tool in the helper's sandbox ([`run_tool`]).
#[derive(Debug)]
pub struct Tool<'a> {
    pub program: Program,
    pub args: &'a [&'a str],
    /// The block device made `/dev/disk`, the tool's to read and write, if any.
    pub disk: Option<u64>,
    /// The block device made `/dev/source`, the tool's to read, if any.
    pub source: Option<u64>,
    /// A directory of the tool's user bound at `/out`, if any.
    pub out: Option<&'a Path>,
    /// A file that must not come to take more than this many bytes (the tool is stopped and
    /// the run fails with `limit_exceeded` when it does), if any.
    pub limit: Option<(&'a std::fs::File, u64)>,
    /// How long it may run, and the setting that says so; default: `[boot_test]
    /// max_timeout`.
    pub timeout: Option<(Duration, &'static str)>,
}

/// Runs one of the tools ([`Program::E2fsck`], [`Program::Resize2fs`], [`Program::QemuImg`],
/// [`Program::Mformat`], [`Program::Mcopy`])
/// in the helper's sandbox, as `uid` (see [`vm_uid`]): the tool parses a disk or filesystem a
/// user made, so it gets what QEMU gets and the tool's block devices alone. Returns its exit
/// status and what it printed (bounded). Ends it, and says so, when `cancel` fires.
pub async fn run_tool(
    daemon: &crate::Daemon,
    uid: u32,
    tool: &Tool<'_>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(i32, String), Failure> {
    let program = tool.program;
    let job = VmJob {
        root_dir: PathBuf::new(),
        uid,
        kvm: false,
        uefi: false,
        program,
        args: tool.args.iter().map(|a| a.to_string()).collect(),
        disk: tool.disk,
        source: tool.source,
        out: tool.out.map(Path::to_path_buf),
        parent: 0,
        console_input: false,
    };
    let (mut child, _dir) =
        start_helper(&daemon.catalog.tmp_dir(), job, "amidalad-tool", None).await?;
    // Read to the end (what passes 64 KiB is dropped, never left to fill the pipe), within
    // the boot test's longest time.
    let (mut said, mut complained) = (Vec::new(), Vec::new());
    let (out, err) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let read = async {
        tokio::join!(
            read_bounded(out, &mut said, 64 << 10),
            read_bounded(err, &mut complained, 64 << 10)
        );
    };
    let (limit, setting) = tool.timeout.unwrap_or((
        Duration::from_secs(daemon.config.boot_test.max_timeout),
        "[boot_test] max_timeout",
    ));
    tokio::select! {
        () = read => {}
        () = outgrows(tool.limit) => {
            stop(&mut child).await;
            let max = tool.limit.map_or(0, |(_, max)| max);
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!("{} wrote more than the {} MiB this may take", program.path(), max >> 20),
            ));
        }
        () = cancel.cancelled() => {
            stop(&mut child).await;
            return Err(Failure::new(ErrorCode::Cancelled, "build cancelled"));
        }
        () = tokio::time::sleep(limit) => {
            stop(&mut child).await;
            return Err(Failure::new(
                ErrorCode::Timeout,
                format!("{} did not end within {} s ({setting})", program.path(), limit.as_secs()),
            ));
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| Failure::io(format!("waiting for {}", program.path()), e))?;
    if status.code() == Some(HELPER_FAILED) {
        let why = String::from_utf8_lossy(&complained);
        return Err(Failure::io(
            format!("setting up the sandbox of {}", program.path()),
            std::io::Error::other(why.trim().to_owned()),
        ));
    }
    said.extend_from_slice(&complained);
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
    Ok((code, String::from_utf8_lossy(&said).trim().to_owned()))
}

/// Returns once `limit`'s file takes more than its bytes (checked four times a second); never
/// without a limit.
async fn outgrows(limit: Option<(&std::fs::File, u64)>) {
    use std::os::unix::fs::MetadataExt;
    let Some((file, max)) = limit else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if file.metadata().is_ok_and(|m| m.blocks() * 512 > max) {
            return;
        }
    }
}

/// The QEMU that emulates `arch`.
fn qemu_of(arch: Arch) -> Program {
    match arch {
        Arch::X86_64 => Program::Qemu,
        Arch::Arm64 => Program::QemuArm64,
    }
}

/// QEMU's command line for a test: x86-64's `q35` machine with SeaBIOS or OVMF, arm64's `virt`
/// machine with AAVMF (a Cortex-A72 under TCG: QEMU's `max` CPU emulates pointer
/// authentication slowly).
fn qemu_args(firmware: Firmware, arch: Arch, kvm: bool, settings: &Settings) -> Vec<String> {
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-machine",
        match arch {
            Arch::X86_64 => "q35",
            Arch::Arm64 => "virt",
        },
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-add-fd",
        "fd=3,set=1,opaque=image",
        "-drive",
        // snapshot=on: the image (a read-only descriptor) is the backing file of an overlay the
        // guest writes to; `read-only=on` would make the guest's disk read-only too.
        "if=none,id=disk,file=/dev/fdset/1,format=raw,snapshot=on",
        "-device",
        "virtio-blk-pci,drive=disk",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if kvm {
        args.extend(["-accel", "kvm", "-cpu", "host"].map(String::from));
    } else {
        // The translation cache bounded (MiB): QEMU's own memory, besides the guest's.
        args.extend(["-accel", "tcg,tb-size=256"].map(String::from));
        if arch == Arch::Arm64 {
            args.extend(["-cpu", "cortex-a72"].map(String::from));
        }
    }
    args.extend([
        "-m".to_owned(),
        settings.memory_mib.to_string(),
        "-smp".to_owned(),
        settings.cpus.to_string(),
    ]);
    if firmware == Firmware::Uefi {
        let (code, _) = uefi_files(arch);
        args.extend([
            "-drive".to_owned(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
            "-drive".to_owned(),
            "if=pflash,format=raw,unit=1,file=/vm/vars.fd".to_owned(),
        ]);
    }
    args
}

/// What a console line says about the boot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sign {
    Booted,
    Failed(&'static str),
}

/// Reads a console line (complete or not yet) for the boot signal or a failure.
pub(crate) fn read_sign(line: &str, marker: Option<&str>) -> Option<Sign> {
    let failures: &[(&str, &str)] = &[
        ("Kernel panic", "the kernel panicked"),
        (
            "You are in emergency mode",
            "systemd went into emergency mode",
        ),
        (
            "Give root password for maintenance",
            "systemd went into emergency mode",
        ),
        (
            "Dropping to a shell",
            "the initramfs could not mount the root filesystem",
        ),
        ("grub rescue>", "GRUB could not load its modules or menu"),
        (
            "Press any key to continue",
            "GRUB could not boot the kernel",
        ),
        ("No bootable device", "the firmware found nothing to boot"),
        (
            "Boot failed: not a bootable disk",
            "the firmware found nothing to boot",
        ),
    ];
    if let Some((_, why)) = failures.iter().find(|(text, _)| line.contains(text)) {
        return Some(Sign::Failed(why));
    }
    let booted = match marker {
        Some(marker) => line.contains(marker),
        None => {
            let line = line.trim_end();
            line.ends_with(" login:") && !line.contains("Last login")
        }
    };
    booted.then_some(Sign::Booted)
}

/// A console line as the log shows it: escape sequences and control characters removed.
pub(crate) fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte; other escapes: ESC and one character.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c == '\t' || !c.is_control() {
            out.push(c);
        }
    }
    if out.len() > LINE_MAX {
        let mut cut = LINE_MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// How one run of QEMU ended.
enum Ended {
    Booted(f64),
    Failed(String),
    /// KVM could not run the guest: what QEMU said, and whether that needs the same guest
    /// booting under TCG to confirm it (the kernel had not started in time, or QEMU ended
    /// before the console showed anything).
    KvmBroken(String, bool),
}

/// Boots `image` (opened read-only) as `test` says; `console` receives each console line.
pub async fn boot(
    image: &std::fs::File,
    test: &Test<'_>,
    settings: &Settings,
    console: &(dyn Fn(String) + Sync),
) -> Result<Passed, Failure> {
    let firmware = [test.firmware];
    check_firmware(test.arch, &firmware)?;
    if let Some(missing) = missing(test.arch, &firmware) {
        return Err(Failure::new(
            ErrorCode::Io,
            format!("this host cannot run boot tests: it lacks {missing}"),
        ));
    }
    let kvm_usable = kvm_for(test.arch, settings, test.owner);
    let started = Instant::now();
    let mut kvm = kvm_usable;
    // A guest slow under KVM makes KVM unusable for the daemon's later tests only if it then
    // boots under TCG: one whose kernel never starts says nothing about KVM.
    let mut stalled_under_kvm = false;
    loop {
        let accel = if kvm { "kvm" } else { "tcg" };
        console(format!(
            "amidala: boot test ({}, {accel}): starting QEMU",
            test.firmware.name()
        ));
        let left = test.timeout.saturating_sub(started.elapsed());
        match run_qemu(image, test, settings, kvm, left, console).await? {
            Ended::Booted(seconds) => {
                if !kvm && stalled_under_kvm {
                    remember_kvm_broken(test.owner);
                }
                return Ok(Passed {
                    firmware: test.firmware,
                    accel,
                    seconds,
                });
            }
            Ended::Failed(why) => {
                return Err(Failure::new(
                    ErrorCode::BootTestFailed,
                    format!(
                        "boot test ({}, {accel}) failed: {why}",
                        test.firmware.name()
                    ),
                ))
            }
            Ended::KvmBroken(said, stalled) if settings.accel == Accel::Auto => {
                if stalled {
                    stalled_under_kvm = true;
                } else {
                    remember_kvm_broken(test.owner);
                }
                console(format!(
                    "amidala: KVM cannot run this guest on this host ({said}): booting again \
                     under TCG, QEMU's emulator, which is slower"
                ));
                kvm = false;
            }
            Ended::KvmBroken(said, _) => {
                return Err(Failure::new(
                    ErrorCode::BootTestFailed,
                    format!(
                        "boot test: KVM cannot run the guest ([boot_test] accel = \"kvm\"): {said}"
                    ),
                ))
            }
        }
    }
}

/// One run of QEMU, until it shows a sign, ends, or `limit` passes.
async fn run_qemu(
    image: &std::fs::File,
    test: &Test<'_>,
    settings: &Settings,
    kvm: bool,
    limit: Duration,
    console: &(dyn Fn(String) + Sync),
) -> Result<Ended, Failure> {
    let job = VmJob {
        root_dir: PathBuf::new(),
        uid: test.uid,
        kvm,
        uefi: test.firmware == Firmware::Uefi,
        program: qemu_of(test.arch),
        args: qemu_args(test.firmware, test.arch, kvm, settings),
        disk: None,
        source: None,
        out: None,
        parent: 0,
        console_input: false,
    };
    let started = Instant::now();
    let (mut child, _dir) = start_helper(test.staging, job, "amidalad-bootvm", Some(image)).await?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped").take(64 << 10);
    let mut said = Vec::new();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut line: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let deadline = tokio::time::Instant::now() + limit;
    let mut err_buf = vec![0u8; 4096];
    let mut err_open = true;
    // Under KVM, the kernel's first line is due within seconds; a KVM that cannot run the
    // guest's firmware and boot loader (nested KVM emulating real mode) is judged by it.
    let mut kernel_seen = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let ended = loop {
        tokio::select! {
            _ = tick.tick(), if kvm && !kernel_seen => {
                if started.elapsed() > KVM_TRIAL {
                    break Ended::KvmBroken(format!(
                        "the guest's kernel had not started after {} s",
                        KVM_TRIAL.as_secs()
                    ), true);
                }
            }
            read = stdout.read(&mut buf) => {
                let n = read.map_err(|e| Failure::io("reading the console", e))?;
                if n == 0 {
                    break ended_without_sign(&said, &tail, kvm && !kernel_seen);
                }
                let mut sign = None;
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let text = clean(&line);
                        line.clear();
                        sign = sign.or_else(|| read_sign(&text, test.marker));
                        kernel_seen |= text.contains("Linux version") || text.starts_with("[    0.");
                        if !text.trim().is_empty() {
                            console(format!("console: {text}"));
                            if tail.len() == TAIL_LINES {
                                tail.pop_front();
                            }
                            tail.push_back(text);
                        }
                    } else if line.len() < 4 * LINE_MAX {
                        line.push(b);
                    }
                }
                // A prompt ends without a newline.
                if sign.is_none() && !line.is_empty() {
                    let text = clean(&line);
                    sign = read_sign(&text, test.marker);
                    if sign.is_some() {
                        console(format!("console: {text}"));
                        tail.push_back(text);
                    }
                }
                match sign {
                    Some(Sign::Booted) => break Ended::Booted(started.elapsed().as_secs_f64()),
                    Some(Sign::Failed(why)) => break Ended::Failed(with_tail(why, &tail)),
                    None => {}
                }
            }
            read = stderr.read(&mut err_buf), if err_open => {
                match read {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => {
                        said.extend_from_slice(&err_buf[..n]);
                        let text = String::from_utf8_lossy(&said);
                        if kvm && (text.contains("KVM internal error") || text.contains("emulation failure")) {
                            break Ended::KvmBroken(first_line(&text), false);
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                break Ended::Failed(with_tail(
                    &format!("no boot signal within {} s", limit.as_secs()),
                    &tail,
                ));
            }
        }
    };
    // The VM and its overlay are done with, whatever the guest is doing.
    stop(&mut child).await;
    Ok(ended)
}

/// What an `amidala run` VM shows its user.
#[derive(Debug)]
pub enum Shown {
    /// A line of the daemon's: the accelerator, a restart under TCG.
    Note(String),
    /// Bytes of the serial console, as the guest wrote them.
    Console(Vec<u8>),
}

/// The firmware `amidala run` boots with: `asked`, else the first the image was made for.
pub fn run_firmware(asked: Option<&str>, made_for: Option<&str>) -> Result<Firmware, Failure> {
    let list = match (asked, made_for) {
        (Some(asked), _) => asked,
        (None, Some("none")) => {
            return Err(Failure::invalid(
                "the image cannot boot: it was imported from a tree without a kernel \
                 (amidala:boot = none)",
            ))
        }
        (None, Some(made_for)) => made_for,
        (None, None) => {
            return Err(Failure::invalid(
                "the image does not say how it boots (no amidala:boot tag): name the firmware \
                 with --firmware bios|uefi",
            ))
        }
    };
    match Firmware::parse_list(list)
        .map_err(|why| Failure::invalid(format!("--firmware: {why}")))?[..]
    {
        [one] => Ok(one),
        [first, _] if asked.is_none() => Ok(first),
        _ => Err(Failure::invalid(
            "--firmware: a run boots with one firmware, bios or uefi",
        )),
    }
}

/// `amidala run`: boots `image` with `firmware` on a throw-away overlay, as a boot test does
/// (the same sandbox, memory and CPUs, KVM where it works), with the serial console connected
/// to the user: what `input` brings is typed on it, what the guest writes goes to `shown`
/// (bounded: a user who does not read holds the guest's console up, never the daemon's
/// memory). Ends when the guest powers off or reboots, the user goes away (`input` or `shown`
/// closes) or `[boot_test] max_run` passes, and says which.
pub async fn run_console(
    daemon: &crate::Daemon,
    owner: u32,
    image: &Path,
    firmware: Firmware,
    arch: Arch,
    input: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    shown: &tokio::sync::mpsc::Sender<Shown>,
) -> Result<String, Failure> {
    use tokio::io::AsyncWriteExt;
    const GONE: &str = "the client went away";
    check_firmware(arch, &[firmware])?;
    if let Some(missing) = missing(arch, &[firmware]) {
        return Err(Failure::new(
            ErrorCode::Io,
            format!("this host cannot run VMs: it lacks {missing}"),
        ));
    }
    let settings = &daemon.config.boot_test;
    let file = std::fs::File::open(image)
        .map_err(|e| Failure::io(format!("opening {}", image.display()), e))?;
    let uid = vm_uid(daemon, owner)?;
    let mut kvm = kvm_for(arch, settings, owner);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(settings.max_run);
    loop {
        let accel = if kvm { "kvm" } else { "tcg" };
        let note = Shown::Note(format!(
            "amidala: booting {} ({}, {accel}) on a throw-away overlay",
            image.file_name().unwrap_or_default().to_string_lossy(),
            firmware.name()
        ));
        if shown.send(note).await.is_err() {
            return Ok(GONE.to_owned());
        }
        let job = VmJob {
            root_dir: PathBuf::new(),
            uid,
            kvm,
            uefi: firmware == Firmware::Uefi,
            program: qemu_of(arch),
            args: qemu_args(firmware, arch, kvm, settings),
            disk: None,
            source: None,
            out: None,
            parent: 0,
            console_input: true,
        };
        let staging = daemon.catalog.tmp_dir();
        let started = Instant::now();
        let (mut child, _dir) = start_helper(&staging, job, "amidalad-run", Some(&file)).await?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped").take(64 << 10);
        let (mut buf, mut err_buf) = (vec![0u8; 16 << 10], vec![0u8; 4096]);
        let mut said = Vec::new();
        let mut err_open = true;
        // The kernel's first line, looked for in what the console showed last.
        let mut recent: Vec<u8> = Vec::new();
        let mut kernel_seen = false;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let broken = loop {
            tokio::select! {
                _ = tick.tick(), if kvm && !kernel_seen => {
                    if started.elapsed() > KVM_TRIAL {
                        break format!("the guest's kernel had not started after {} s", KVM_TRIAL.as_secs());
                    }
                }
                read = stdout.read(&mut buf) => {
                    let n = read.map_err(|e| Failure::io("reading the console", e))?;
                    if n == 0 {
                        let said = String::from_utf8_lossy(&said);
                        if kvm && (said.contains("KVM internal error") || said.contains("emulation failure")) {
                            remember_kvm_broken(owner);
                            break first_line(&said);
                        }
                        stop(&mut child).await;
                        return Ok(match first_line(&said) {
                            s if s.is_empty() => "the guest powered off or rebooted".to_owned(),
                            s => format!("QEMU ended: {s}"),
                        });
                    }
                    if kvm && !kernel_seen {
                        recent.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&recent);
                        kernel_seen = text.contains("Linux version") || text.contains("[    0.");
                        let keep = recent.len().saturating_sub(64);
                        recent.drain(..keep);
                    }
                    match tokio::time::timeout_at(deadline, shown.send(Shown::Console(buf[..n].to_vec()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => {
                            stop(&mut child).await;
                            return Ok(GONE.to_owned());
                        }
                        Err(_) => {
                            stop(&mut child).await;
                            return Ok(ran_out(settings.max_run));
                        }
                    }
                }
                read = stderr.read(&mut err_buf), if err_open => match read {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => {
                        said.extend_from_slice(&err_buf[..n]);
                        let text = String::from_utf8_lossy(&said);
                        if kvm && (text.contains("KVM internal error") || text.contains("emulation failure")) {
                            remember_kvm_broken(owner);
                            break first_line(&text);
                        }
                    }
                },
                typed = input.recv() => match typed {
                    // QEMU gone: its console's end says so next.
                    // What QEMU does not take within seconds is dropped, as a terminal drops
                    // what a stuck line cannot carry: the console stays the user's to leave.
                    Some(bytes) => {
                        let _ = tokio::time::timeout(Duration::from_secs(5), stdin.write_all(&bytes)).await;
                    }
                    None => {
                        stop(&mut child).await;
                        return Ok(GONE.to_owned());
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    stop(&mut child).await;
                    return Ok(ran_out(settings.max_run));
                }
            }
        };
        stop(&mut child).await;
        if settings.accel != Accel::Auto {
            return Err(Failure::new(
                ErrorCode::Io,
                format!("KVM cannot run the guest ([boot_test] accel = \"kvm\"): {broken}"),
            ));
        }
        let note = Shown::Note(format!(
            "amidala: KVM cannot run this guest on this host ({broken}): booting again under \
             TCG, QEMU's emulator, which is slower"
        ));
        if shown.send(note).await.is_err() {
            return Ok(GONE.to_owned());
        }
        kvm = false;
    }
}

fn ran_out(max_run: u64) -> String {
    format!("the VM ran for {max_run} s, the most a run may ([boot_test] max_run)")
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.contains("warning:"))
        .unwrap_or("")
        .to_owned()
}

/// How QEMU's end without a sign reads. `before_kernel_under_kvm`: it ran with KVM and the
/// guest's kernel had not started; if the console had shown nothing either, QEMU may have
/// failed to run any guest there (some hosts' KVM refuses QEMU's CPU model: `failed to set
/// MSR 0x10a`), which the same guest booting under TCG then confirms.
fn ended_without_sign(
    said: &[u8],
    tail: &VecDeque<String>,
    before_kernel_under_kvm: bool,
) -> Ended {
    let said = String::from_utf8_lossy(said);
    let why = match first_line(&said) {
        s if s.is_empty() => {
            "QEMU ended before the guest booted (it powered off or reset)".to_owned()
        }
        s => format!("QEMU ended before the guest booted: {s}"),
    };
    if said.contains("KVM internal error") || said.contains("emulation failure") {
        return Ended::KvmBroken(first_line(&said), false);
    }
    if before_kernel_under_kvm && tail.is_empty() {
        return Ended::KvmBroken(why, true);
    }
    Ended::Failed(with_tail(&why, tail))
}

pub(crate) fn with_tail(why: &str, tail: &VecDeque<String>) -> String {
    if tail.is_empty() {
        return format!("{why}; the console showed nothing");
    }
    let last: Vec<&str> = tail.iter().map(String::as_str).collect();
    format!("{why}; the console's last lines:\n  {}", last.join("\n  "))
}

/// Entry point of `amidalad-exec __bootvm`: makes the VM's root and executes QEMU in it as
/// the VM's user. Writes why it failed to stderr if it cannot.
pub fn helper_main() -> ! {
    let why = match helper() {
        Ok(never) => match never {},
        Err(why) => why,
    };
    eprintln!("amidalad-bootvm: {why}");
    std::process::exit(HELPER_FAILED)
}

fn e(what: &str) -> impl FnOnce(nix::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Binds the host's `source` on `target`, read-only, nosuid and nodev.
fn bind_read_only(source: &str, target: &Path) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(e(&format!("binding {source}")))?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(e(&format!("making {source} read-only")))
}

/// What the tools (e2fsprogs, qemu-img, mtools) may use beyond the sandbox they share with
/// QEMU (which has its own seccomp sandbox): 4 GiB of address space, 64 processes of their id
/// (qemu-img 256: its I/O threads), and no loop device ioctl (`/dev/disk` is a loop device;
/// its offset and flags are the daemon's).
fn confine_tool(program: Program) -> Result<(), String> {
    use libseccomp::{ScmpAction, ScmpFilterContext};
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_AS, 4 << 30, 4 << 30).map_err(e("bounding memory"))?;
    // qemu-img's I/O thread pool alone may start 64 threads (each counts as a process).
    let processes = if program == Program::QemuImg { 256 } else { 64 };
    setrlimit(Resource::RLIMIT_NPROC, processes, processes).map_err(e("bounding processes"))?;
    let seccomp = |what: &str, err: libseccomp::error::SeccompError| format!("{what}: {err}");
    let mut filter = ScmpFilterContext::new(ScmpAction::Allow)
        .map_err(|err| seccomp("a seccomp filter", err))?;
    crate::confine::refuse_loop_ioctls(&mut filter)
        .map_err(|err| seccomp("refusing loop ioctls", err))?;
    filter
        .load()
        .map_err(|err| seccomp("loading the seccomp filter", err))
}

/// The PID namespace's first process, for [`kill_first`].
static FIRST: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_first(_: libc::c_int) {
    let pid = FIRST.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is the waiter's own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn helper() -> Result<std::convert::Infallible, String> {
    use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    // The job is the first line of stdin, read a byte at a time: what follows it is the
    // program's (a buffered reader could take some of it).
    let mut input = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match nix::unistd::read(0, &mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) if input.len() < 1 << 20 => input.push(byte[0]),
            Ok(1) => return Err("the job is longer than 1 MiB".into()),
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => {}
            Err(err) => return Err(format!("reading the job: {err}")),
        }
    }
    let job: VmJob =
        serde_json::from_slice(&input).map_err(|err| format!("decoding the job: {err}"))?;
    if job.uid == 0 {
        return Err("QEMU never runs as root".into());
    }
    // The daemon that started this may have ended before the parent-death signal was set.
    if std::os::unix::process::parent_id() != job.parent {
        return Err("the daemon ended before the helper started".into());
    }
    use nix::sched::CloneFlags;
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(e("making the VM's namespaces"))?;
    // The program is the first process of a PID namespace of its own: when it ends, whatever
    // it started ends with it, so nothing it forked keeps the image or the disk open once
    // the daemon has moved on (a loop device is another build's after this one's).
    // The child learns that this process is gone (its parent-death signal may be set too late
    // for that) from the end of this pipe.
    let (alive, alive_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(e("making the VM's first process's pipe"))?;
    // SIGTERM (the daemon's word to stop) is held until the waiter's handler knows the child.
    let term = nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGTERM);
    term.thread_block().map_err(e("blocking SIGTERM"))?;
    // SAFETY: this process is single-threaded (it was just executed and starts no thread), so
    // the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(e("forking the VM's first process"))? {
        nix::unistd::ForkResult::Child => {
            drop(alive_w);
            term.thread_unblock().map_err(e("unblocking SIGTERM"))?;
        }
        nix::unistd::ForkResult::Parent { child } => {
            // On SIGTERM the namespace is killed; waitpid returns once its first process has
            // ended, which is after every other process in it has.
            FIRST.store(child.as_raw(), std::sync::atomic::Ordering::SeqCst);
            let action = nix::sys::signal::SigAction::new(
                nix::sys::signal::SigHandler::Handler(kill_first),
                nix::sys::signal::SaFlags::empty(),
                nix::sys::signal::SigSet::empty(),
            );
            // SAFETY: the handler only calls kill(2), which is async-signal-safe.
            let _ =
                unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGTERM, &action) };
            let _ = term.thread_unblock();
            // The streams and the image are the child's: the daemon sees their end when the
            // namespace's processes have all gone.
            drop(alive);
            for fd in [0, 1, 2, IMAGE_FD] {
                let _ = nix::unistd::close(fd);
            }
            let code = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => break code,
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break 1,
                }
            };
            std::process::exit(code)
        }
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    crate::sys::make_mounts_private().map_err(e("making mounts private"))?;
    let root = &job.root_dir;
    // Bounded: the overlay of the guest's writes, UEFI's variables, QEMU's few files.
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("size=1g,nr_inodes=4096,mode=755"),
    )
    .map_err(e("mounting the VM's root"))?;
    let mkdir = |name: &str, mode: u32| {
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(root.join(name))
            .map_err(|err| format!("making /{name}: {err}"))
    };
    for (name, mode) in [
        ("usr", 0o755),
        ("dev", 0o755),
        ("tmp", 0o700),
        ("var", 0o755),
        ("var/tmp", 0o700),
        ("vm", 0o700),
    ] {
        mkdir(name, mode)?;
    }
    if let Some(out) = &job.out {
        mkdir("out", 0o700)?;
        let target = root.join("out");
        mount(
            Some(out),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(e("binding /out"))?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(e("making /out nosuid, nodev and noexec"))?;
    }
    bind_read_only("/usr", &root.join("usr"))?;
    // The host's top-level links into /usr (merged /usr), or its own directories.
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(name);
        match std::fs::read_link(&host) {
            Ok(target) => symlink(&target, root.join(name))
                .map_err(|err| format!("linking /{name}: {err}"))?,
            Err(_) if host.is_dir() => {
                mkdir(name, 0o755)?;
                bind_read_only(&host.to_string_lossy(), &root.join(name))?;
            }
            Err(_) => {}
        }
    }
    let mut nodes = vec![
        ("null", 1, 3, 0o666),
        ("zero", 1, 5, 0o666),
        ("random", 1, 8, 0o666),
        ("urandom", 1, 9, 0o666),
    ];
    if job.kvm {
        nodes.push(("kvm", 10, 232, 0o600));
    }
    let mut nodes: Vec<_> = nodes
        .into_iter()
        .map(|(name, major, minor, mode)| {
            let kind = nix::sys::stat::SFlag::S_IFCHR;
            (name, kind, nix::sys::stat::makedev(major, minor), mode)
        })
        .collect();
    if let Some(dev) = job.disk {
        nodes.push(("disk", nix::sys::stat::SFlag::S_IFBLK, dev, 0o600));
    }
    if let Some(dev) = job.source {
        nodes.push(("source", nix::sys::stat::SFlag::S_IFBLK, dev, 0o400));
    }
    for (name, kind, dev, mode) in nodes {
        let path = root.join("dev").join(name);
        nix::sys::stat::mknod(
            &path,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            dev,
        )
        .map_err(e(&format!("making /dev/{name}")))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|err| format!("making /dev/{name}: {err}"))?;
        if matches!(name, "kvm" | "disk" | "source") {
            std::os::unix::fs::chown(&path, Some(job.uid), Some(job.uid))
                .map_err(|err| format!("giving /dev/{name} to the VM: {err}"))?;
        }
    }
    if job.uefi {
        let (_, vars) = uefi_files(match job.program {
            Program::QemuArm64 => Arch::Arm64,
            _ => Arch::X86_64,
        });
        std::fs::copy(vars, root.join("vm/vars.fd"))
            .map_err(|err| format!("copying {vars}: {err}"))?;
        std::os::unix::fs::chown(root.join("vm/vars.fd"), Some(job.uid), Some(job.uid))
            .map_err(|err| format!("giving UEFI's variables to the VM: {err}"))?;
    }
    for dir in ["tmp", "var/tmp", "vm"] {
        std::os::unix::fs::chown(root.join(dir), Some(job.uid), Some(job.uid))
            .map_err(|err| format!("giving /{dir} to the VM: {err}"))?;
    }
    // Into the VM's root; the host's tree detached.
    nix::unistd::chdir(root).map_err(e("entering the VM's root"))?;
    nix::unistd::pivot_root(".", ".").map_err(e("pivoting into the VM's root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(e("detaching the host's tree"))?;
    nix::unistd::chdir("/").map_err(e("entering /"))?;
    // stdin: nothing (the job is read), or what the daemon sends the console; stdout: the
    // console, for the daemon; stderr: QEMU's messages. Nothing else open but the image.
    if !job.console_input {
        let null = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(e("opening /dev/null"))?;
        nix::unistd::dup2(null, 0).map_err(e("redirecting stdin"))?;
    }
    // The VM's user: no groups, no capabilities (all ids non-zero), no way to gain any.
    let id = nix::unistd::Uid::from_raw(job.uid);
    let gid = nix::unistd::Gid::from_raw(job.uid);
    nix::unistd::setgroups(&[]).map_err(e("dropping groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(e("taking the VM's group"))?;
    nix::unistd::setresuid(id, id, id).map_err(e("taking the VM's user"))?;
    // The change of credentials cleared the parent-death signal: the program dies with the
    // helper's first process, which dies with the daemon (and the namespace's others with
    // the program).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(e("setting the parent-death signal"))?;
    // Nothing is ever written: EOF if the first process is gone, else "would block".
    if nix::unistd::read(alive.as_raw_fd(), &mut [0u8; 1]) != Err(nix::errno::Errno::EAGAIN) {
        return Err("the daemon ended before the program started".into());
    }
    drop(alive);
    crate::executor::close_range(IMAGE_FD as u32 + 1, u32::MAX);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(e("refusing core dumps"))?;
    nix::sys::prctl::set_no_new_privs().map_err(e("setting no_new_privs"))?;
    if !matches!(job.program, Program::Qemu | Program::QemuArm64) {
        confine_tool(job.program)?;
    }
    let path = job.program.path();
    let program = CString::new(path).expect("no NUL");
    let name = path.rsplit('/').next().unwrap_or(path);
    let mut argv = vec![CString::new(name).expect("no NUL")];
    for arg in &job.args {
        argv.push(CString::new(arg.as_str()).map_err(|_| "an argument with a NUL byte")?);
    }
    let env = [
        CString::new("PATH=/usr/bin").expect("no NUL"),
        CString::new("TMPDIR=/tmp").expect("no NUL"),
    ];
    let err = nix::unistd::execve(&program, &argv, &env).unwrap_err();
    Err(format!("executing {path}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_that_ends_under_kvm_before_the_guest_shows_anything_is_kvms_fault() {
        let msr = b"qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n";
        let empty = VecDeque::new();
        assert!(matches!(
            ended_without_sign(msr, &empty, true),
            Ended::KvmBroken(why, true) if why.contains("failed to set MSR")
        ));
        // Under TCG, or once the kernel ran or the console showed something: the guest's.
        assert!(matches!(
            ended_without_sign(msr, &empty, false),
            Ended::Failed(_)
        ));
        let shown = VecDeque::from(["SeaBIOS (version 1.16)".to_owned()]);
        assert!(matches!(
            ended_without_sign(b"", &shown, true),
            Ended::Failed(_)
        ));
        assert!(matches!(
            ended_without_sign(
                b"KVM internal error. Suberror: 1\nemulation failure\n",
                &shown,
                true
            ),
            Ended::KvmBroken(_, false)
        ));
    }

    #[test]
    fn console_lines_show_how_the_boot_went() {
        assert_eq!(read_sign("amidala-boot login: ", None), Some(Sign::Booted));
        assert_eq!(
            read_sign("Debian GNU/Linux 12 amidala-boot ttyS0", None),
            None
        );
        assert_eq!(read_sign("Last login: Mon on ttyS0", None), None);
        assert_eq!(
            read_sign(
                "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs",
                None
            ),
            Some(Sign::Failed("the kernel panicked"))
        );
        assert_eq!(
            read_sign(
                "You are in emergency mode. After logging in, type ...",
                None
            ),
            Some(Sign::Failed("systemd went into emergency mode"))
        );
        assert_eq!(
            read_sign("ready: hello", Some("ready: hello")),
            Some(Sign::Booted)
        );
        assert_eq!(read_sign("amidala-boot login:", Some("ready")), None);
    }

    #[test]
    fn console_text_is_cleaned_for_the_log() {
        assert_eq!(
            clean(b"\x1b[0;32m  OK  \x1b[0m] Reached target \x07Multi-User\r"),
            "  OK  ] Reached target Multi-User"
        );
        let long = vec![b'x'; 1000];
        assert!(clean(&long).chars().count() <= LINE_MAX + 1);
    }

    #[test]
    fn firmware_lists_parse() {
        assert_eq!(
            Firmware::parse_list("bios+uefi").unwrap(),
            [Firmware::Bios, Firmware::Uefi]
        );
        assert_eq!(Firmware::parse_list("uefi").unwrap(), [Firmware::Uefi]);
        assert!(Firmware::parse_list("none").is_err());
    }

    #[test]
    fn qemu_gets_the_image_read_only_with_an_overlay_and_no_network() {
        let args = qemu_args(Firmware::Uefi, Arch::X86_64, false, &Settings::default()).join(" ");
        assert!(
            args.contains("file=/dev/fdset/1,format=raw,snapshot=on"),
            "{args}"
        );
        assert!(!args.contains("read-only=on"), "{args}");
        assert!(args.contains("-nodefaults"), "{args}");
        assert!(!args.contains("-netdev"), "{args}");
        assert!(args.contains("tcg,tb-size=256"), "{args}");
        assert!(args.contains(OVMF_CODE), "{args}");
        assert!(args.contains("-machine q35"), "{args}");
        let args = qemu_args(Firmware::Bios, Arch::X86_64, true, &Settings::default()).join(" ");
        assert!(
            args.contains("-accel kvm") && !args.contains("pflash"),
            "{args}"
        );
        let args = qemu_args(Firmware::Uefi, Arch::Arm64, false, &Settings::default()).join(" ");
        assert!(
            args.contains("-machine virt") && args.contains("-cpu cortex-a72"),
            "{args}"
        );
        assert!(
            args.contains(AAVMF_CODE) && !args.contains(OVMF_CODE),
            "{args}"
        );
        assert!(
            args.contains("file=/dev/fdset/1,format=raw,snapshot=on"),
            "{args}"
        );
        assert!(check_firmware(Arch::Arm64, &[Firmware::Bios]).is_err());
        assert!(check_firmware(Arch::Arm64, &[Firmware::Uefi]).is_ok());
        // KVM runs the host's own architecture only.
        let kvm = Settings {
            accel: Accel::Kvm,
            ..Settings::default()
        };
        assert!(kvm_for(Arch::host(), &kvm, 1000));
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Arm64,
            Arch::Arm64 => Arch::X86_64,
        };
        assert!(!kvm_for(other, &kvm, 1000));
    }
}
