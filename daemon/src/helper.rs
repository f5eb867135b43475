//! The program a build's executor and a plugin's validator run as: `amidalad-exec`, a small
//! binary of the same build holding only their code (no runtime, no AWS SDK), or else amidalad
//! itself.
//!
//! Every build starts both. A process of amidalad (26 MB, 43 000 relocations) takes 1.07 ms of
//! CPU to start and exit, one of amidalad-exec (under 1 MB) 0.53 ms, and more page faults over
//! its life; with eight no-op builds at once on two CPUs, CPU time is what limits them.
//!
//! The helper is looked for next to amidalad and in `../libexec/amidala/` (the package's
//! `/usr/libexec/amidala/`), opened once at start and run through that descriptor
//! (`/proc/self/fd/N`), as amidalad runs itself through `/proc/self/exe`: a package upgrade
//! that replaces the file under a running daemon does not give it an executor of another
//! version. A helper that root does not own, that others may write, or that is not of this
//! build (its `--version` line) is not used, with a warning: the daemon runs itself instead.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The helper's file name.
pub const NAME: &str = "amidalad-exec";

/// The version of what amidalad and its executor and validator say to each other (the
/// executor's spec and reports, the validator's verdict); changed with any of them.
const PROTOCOL: u32 = 2;

/// What the program runs as when no helper is used.
const SELF: &str = "/proc/self/exe";

/// The descriptor of the helper in use and the path that runs it.
static PROGRAM: OnceLock<(Option<OwnedFd>, PathBuf)> = OnceLock::new();

/// What `amidalad-exec --version` prints: amidalad uses a helper that prints its own.
pub fn version_line() -> String {
    format!("{NAME} {} (protocol {PROTOCOL})", env!("CARGO_PKG_VERSION"))
}

/// Becomes the executor (`__executor BUILD`), a validator (`__validate PLUGIN`), an import
/// helper (`__import`) or a directory's packer (`__pack count|tar`) if the command line says so, and never returns then; returns otherwise. The first thing amidalad
/// and amidalad-exec do.
pub fn run_if_asked() {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next()) {
        (Some(a), _) if a == crate::executor::EXECUTOR_ARG => {
            name_process(c"amidalad-exec");
            crate::executor::main()
        }
        (Some(a), Some(plugin)) if a == crate::plugins::VALIDATOR_ARG => {
            name_process(c"amidalad-valid");
            crate::plugins::validator_main(Path::new(&plugin))
        }
        (Some(a), _) if a == crate::importer::IMPORT_ARG => {
            name_process(c"amidalad-import");
            crate::importer::main()
        }
        (Some(a), _) if a == crate::bootvm::BOOTVM_ARG => {
            name_process(c"amidalad-bootvm");
            crate::bootvm::helper_main()
        }
        (Some(a), Some(mode)) if a == crate::pack::PACK_ARG => {
            name_process(c"amidalad-pack");
            crate::pack::main(&mode)
        }
        _ => {}
    }
}

/// Names the process in `ps` and `top`, which would show the file name it was executed as:
/// `64` for `/proc/self/fd/64`, `exe` for `/proc/self/exe`.
fn name_process(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
}

/// The program to execute as the executor or a validator (`argv[0]` says which).
pub fn program() -> &'static Path {
    PROGRAM
        .get_or_init(|| (None, PathBuf::from(SELF)))
        .1
        .as_path()
}

/// Finds and checks the helper, once, at the daemon's start; logs which program it runs.
pub fn init() {
    let program = match find() {
        Some((fd, path)) => {
            tracing::info!(helper = %path.display(), "executor and validators run as the helper");
            let run = proc_fd_path(&fd);
            (Some(fd), run)
        }
        None => (None, PathBuf::from(SELF)),
    };
    if PROGRAM.set(program).is_err() {
        tracing::debug!("helper already chosen");
    }
}

fn proc_fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The first usable helper of the candidates, as a descriptor and the path it was found at.
fn find() -> Option<(OwnedFd, PathBuf)> {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell where amidalad is: running itself as executor");
            return None;
        }
    };
    let dir = exe.parent()?;
    let candidates = [dir.join(NAME), dir.join("../libexec/amidala").join(NAME)];
    for path in candidates {
        match open_checked(&path) {
            Ok(Some(fd)) => return Some((fd, path)),
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(helper = %path.display(), "{why}: not used; amidalad runs itself as executor and validator, which costs each build more CPU time")
            }
        }
    }
    tracing::info!(
        "no {NAME} next to amidalad or in ../libexec/amidala: amidalad runs itself as executor and validator"
    );
    None
}

/// The helper at `path` opened, if it exists and is one to run; why not, if it is not.
fn open_checked(path: &Path) -> Result<Option<OwnedFd>, String> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    crate::plugins::check_trusted_metadata(path, &meta).map_err(|e| e.to_string())?;
    // Kept above the numbers a child's standard streams and passed descriptors are given
    // (0 to 3) before it executes the program through this one.
    let fd = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64))
        .map_err(|e| format!("duplicating its descriptor: {e}"))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let output = std::process::Command::new(proc_fd_path(&fd))
        .arg("--version")
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running it: {e}"))?;
    let said = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || said.trim() != version_line() {
        return Err(format!(
            "it is not of this build: it says {:?}, amidalad expects {:?}",
            said.trim(),
            version_line()
        ));
    }
    Ok(Some(fd))
}
