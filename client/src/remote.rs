//! `amidala --host [USER@]HOST COMMAND ...`: the same command, run on a builder host through
//! the system's ssh, for people whose workspace is on a laptop.
//!
//! The daemon takes the workspace (and an import's source) as a descriptor opened by the user,
//! and descriptors do not cross ssh. So the client runs `amidala __remote` on the builder, as
//! the ssh user, and sends it over ssh's stdin, in frames: a header (the command line), then
//! the upload (the workspace as a tar stream, or the import's source), then control bytes
//! (`C`: the user pressed Ctrl-C). The remote side unpacks the upload into a private temporary
//! directory, runs the command there with the builder's own `amidala`, which talks to the local
//! daemon socket as usual, and removes the directory when the command ends. Output and the
//! exit status come back through ssh.
//!
//! The daemon sees the ssh user as the peer of its socket, so the builder's policy applies to
//! them as to anyone logged in there.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// The argument that makes `amidala` the remote end of `--host`.
pub const REMOTE_ARG: &str = "__remote";

/// The ssh command, split by the shell like `GIT_SSH_COMMAND` (default `ssh`).
const SSH_VAR: &str = "AMIDALA_SSH";
/// The builder's client, run through ssh (default `amidala`, found on the builder's PATH).
const REMOTE_COMMAND_VAR: &str = "AMIDALA_REMOTE_COMMAND";

/// The largest header frame and upload chunk.
const MAX_FRAME: usize = 1 << 20;
/// Control byte: cancel (the user pressed Ctrl-C).
const CANCEL: u8 = b'C';

/// The builder cannot be reached, or has no amidala (exit status 3, like an unreachable daemon).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(String);

/// The first frame: what to run on the builder.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    /// The command line, without `--host`.
    args: Vec<String>,
    upload: Upload,
}

/// What follows the header.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Upload {
    /// Nothing: the command needs no files.
    None,
    /// The current directory, as a tar stream; the command runs in its unpacked copy.
    Workspace,
    /// An import's source (a file, or a directory sent as a tar archive), stored in a
    /// temporary file whose path replaces the argument at `arg`.
    Source { arg: usize, name: String },
}

/// The command line to send: ours without `--host` and its value (they come before `--`).
pub fn forwarded_args(argv: &[OsString]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg
            .to_str()
            .ok_or_else(|| anyhow!("an argument is not UTF-8: {arg:?}"))?;
        if arg == "--" {
            out.push(arg.to_owned());
            for rest in args.by_ref() {
                out.push(
                    rest.to_str()
                        .ok_or_else(|| anyhow!("an argument is not UTF-8: {rest:?}"))?
                        .to_owned(),
                );
            }
            break;
        }
        if arg == "--host" {
            args.next();
        } else if !arg.starts_with("--host=") {
            out.push(arg.to_owned());
        }
    }
    Ok(out)
}

/// Runs `args` on `host` through ssh, uploading what `upload` says; returns the remote exit
/// status. `source` is the import's source for [`Upload::Source`].
pub fn run(
    host: &str,
    args: Vec<String>,
    upload: Upload,
    source: Option<&Path>,
    quiet: bool,
) -> Result<ExitCode> {
    let ssh = std::env::var(SSH_VAR).unwrap_or_else(|_| "ssh".to_owned());
    let remote = std::env::var(REMOTE_COMMAND_VAR).unwrap_or_else(|_| "amidala".to_owned());
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        // exec: the child is ssh itself, which a second Ctrl-C stops.
        .arg(format!("exec {ssh} \"$@\""))
        .arg(&ssh)
        // No terminal on the builder: stdin carries the upload.
        .args(["-T", "--", host])
        .arg(format!("{} {REMOTE_ARG}", shell_quote(&remote)))
        .stdin(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls are made: signal(2).
    unsafe {
        command.pre_exec(|| {
            // ssh leaves an ignored SIGINT ignored: Ctrl-C is ours, sent on as a cancel, so
            // that the build's teardown still streams back.
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGINT,
                nix::sys::signal::SigHandler::SigIgn,
            )?;
            Ok(())
        })
    };
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {ssh} (set {SSH_VAR} for another ssh command)"))?;
    let link = Arc::new(Link {
        stdin: Mutex::new(child.stdin.take()),
        uploaded: AtomicBool::new(false),
    });
    watch_interrupts(link.clone(), child.id())?;
    let sent = send(&link, &Header { args, upload }, source, quiet);
    if sent.is_err() {
        // The builder would wait for the rest of the upload: the end of its input tells it
        // there is none.
        link.stdin.lock().expect("lock").take();
    }
    link.uploaded.store(true, Ordering::SeqCst);
    let status = child.wait().context("waiting for ssh")?;
    link.stdin.lock().expect("lock").take();
    let code = exit_code(status);
    match code {
        255 => {
            return Err(Unreachable(format!(
                "ssh to {host} failed (exit status 255; its message is above); check that \
                 `{ssh} {host}` works, or set {SSH_VAR}"
            ))
            .into())
        }
        127 => {
            return Err(Unreachable(format!(
                "{remote:?} was not found on {host}: install amidala there, or set \
                 {REMOTE_COMMAND_VAR} to its path"
            ))
            .into())
        }
        _ => {}
    }
    if let Err(e) = sent {
        let builder_gone = e.chain().any(|c| {
            c.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
        });
        // A builder that stopped reading said why (above) and exited with its status; a
        // failure here (a file that cannot be read) is ours to report.
        if !builder_gone || code == 0 {
            return Err(e.context(format!("sending to {host}")));
        }
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// A process's exit status as a shell reports it: its code, or 128 + the signal that ended it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Quotes `s` for a POSIX shell (ssh runs the remote command through the user's shell).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// ssh's stdin, and whether the upload is over (control bytes may only follow it).
struct Link {
    stdin: Mutex<Option<ChildStdin>>,
    uploaded: AtomicBool,
}

/// The first Ctrl-C sends a cancel to the builder (its client cancels the build and waits for
/// the teardown, which we see); the second, or one during the upload, stops ssh and exits.
fn watch_interrupts(link: Arc<Link>, ssh: u32) -> Result<()> {
    crate::on_interrupts(move |count| {
        // Without the lock: the upload may hold it, blocked on a pipe ssh does not read (while
        // it asks for a password, say).
        if count > 1 || !link.uploaded.load(Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(ssh as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            std::process::exit(130);
        }
        eprintln!("amidala: cancelling on the builder (Ctrl-C again to stop waiting)");
        if let Ok(mut stdin) = link.stdin.try_lock() {
            if let Some(stdin) = stdin.as_mut() {
                let _ = stdin.write_all(&[CANCEL]).and_then(|()| stdin.flush());
            }
        }
    })
}

/// Writes the header, the upload and the end-of-upload mark.
fn send(link: &Arc<Link>, header: &Header, source: Option<&Path>, quiet: bool) -> Result<()> {
    let mut out = Frames {
        link: link.clone(),
        buf: Vec::with_capacity(MAX_FRAME),
        bytes: 0,
    };
    out.frame(&serde_json::to_vec(header)?)?;
    match (&header.upload, source) {
        (Upload::None, _) => {}
        (Upload::Workspace, _) => {
            let mut tar = tar::Builder::new(&mut out);
            tar.follow_symlinks(false);
            tar.append_dir_all(".", ".")
                .context("packing the current directory to send it")?;
            tar.finish()?;
        }
        (Upload::Source { .. }, Some(path)) => {
            if std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .is_dir()
            {
                // A directory travels as a tar archive, ownership and modes kept; the daemon
                // imports archives as it imports directories.
                let mut tar = tar::Builder::new(&mut out);
                tar.follow_symlinks(false);
                tar.append_dir_all(".", path)
                    .with_context(|| format!("packing {}", path.display()))?;
                tar.finish()?;
            } else {
                let mut file = std::fs::File::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                io::copy(&mut file, &mut out)
                    .with_context(|| format!("sending {}", path.display()))?;
            }
        }
        (Upload::Source { .. }, None) => unreachable!("a source upload names its source"),
    }
    out.flush()?;
    let bytes = out.bytes;
    out.frame(&[])?;
    if header.upload != Upload::None && !quiet {
        eprintln!(
            "amidala: sent {:.1} MiB to the builder",
            bytes as f64 / f64::from(1 << 20)
        );
    }
    Ok(())
}

/// A writer of length-prefixed frames to ssh's stdin.
struct Frames {
    link: Arc<Link>,
    buf: Vec<u8>,
    bytes: u64,
}

impl Frames {
    fn frame(&mut self, body: &[u8]) -> io::Result<()> {
        let mut stdin = self.link.stdin.lock().expect("lock");
        let stdin = stdin
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        stdin.write_all(&(body.len() as u32).to_be_bytes())?;
        stdin.write_all(body)?;
        stdin.flush()
    }
}

impl Write for Frames {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.bytes += n as u64;
        if self.buf.len() == MAX_FRAME {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            self.frame(&buf)?;
            self.buf = buf;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Reads one frame; `None` at the end of the input.
fn read_frame(input: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let mut body = vec![0; len];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

/// The upload's frames as one stream, ending at the empty frame.
struct Upstream<R> {
    input: R,
    chunk: Vec<u8>,
    at: usize,
    done: bool,
}

impl<R: Read> Read for Upstream<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match read_frame(&mut self.input)? {
                Some(chunk) if chunk.is_empty() => self.done = true,
                Some(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upload ended early",
                    ))
                }
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl<R: Read> Upstream<R> {
    /// Reads what is left of the upload (a tar reader stops before the padding at its end).
    fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(drop)
    }
}

/// `amidala __remote`: the builder's end. Reads the header and the upload from stdin, runs the
/// command, and passes a cancel (or the local end going away) on to it as SIGINT.
pub fn serve() -> ExitCode {
    match serve_inner() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("amidala (on the builder): {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve_inner() -> Result<ExitCode> {
    let mut stdin = io::stdin().lock();
    let (scratch, cwd, args) = receive(&mut stdin)?;
    // The rest of the input (buffered or not) is the control stream.
    drop(stdin);
    let child = Command::new(std::env::current_exe().context("finding this program")?)
        .args(&args)
        // The builder's own setting must not send the command on again.
        .env_remove("AMIDALA_HOST")
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .spawn()
        .context("starting amidala")?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // A cancel, or the end of the input (ssh went away): both are a Ctrl-C for the command,
    // which cancels a build and waits for its teardown.
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        loop {
            let read = io::stdin().read(&mut byte);
            if !matches!(read, Ok(1)) || byte[0] == CANCEL {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            }
            if !matches!(read, Ok(1)) {
                return;
            }
        }
    });
    let mut child = child;
    let status = child.wait().context("waiting for amidala")?;
    remove_scratch(scratch);
    Ok(ExitCode::from(u8::try_from(exit_code(status)).unwrap_or(1)))
}

/// Removes the scratch directory, also where the upload kept a directory's mode without
/// write permission (a read-only tree in the workspace).
fn remove_scratch(scratch: tempfile::TempDir) {
    fn writable(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                writable(&entry.path());
            }
        }
    }
    writable(scratch.path());
    if let Err(e) = scratch.close() {
        eprintln!("amidala (on the builder): removing the scratch directory: {e}");
    }
}

/// Reads the header and the upload: the scratch directory (removed when dropped), the
/// directory to run in and the command line.
fn receive(stdin: &mut impl Read) -> Result<(tempfile::TempDir, PathBuf, Vec<String>)> {
    let header = read_frame(stdin)?.ok_or_else(|| anyhow!("no command was sent"))?;
    let header: Header = serde_json::from_slice(&header).context("reading the command")?;
    let mut args = header.args;
    // Private to this user (0700), removed when the command ends. Not in XDG_RUNTIME_DIR,
    // a small tmpfs: a workspace can be large.
    let base = std::env::temp_dir();
    let scratch = tempfile::Builder::new()
        .prefix("amidala-remote-")
        .tempdir_in(&base)
        .with_context(|| format!("making a temporary directory in {}", base.display()))?;
    let mut upstream = Upstream {
        input: stdin,
        chunk: Vec::new(),
        at: 0,
        done: false,
    };
    let mut cwd = scratch.path().to_owned();
    match &header.upload {
        Upload::None => {}
        Upload::Workspace => {
            cwd = scratch.path().join("workspace");
            std::fs::create_dir(&cwd)?;
            let mut archive = tar::Archive::new(&mut upstream);
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive
                .unpack(&cwd)
                .context("unpacking the workspace sent")?;
        }
        Upload::Source { arg, name } => {
            let file_name = Path::new(name)
                .components()
                .next_back()
                .and_then(|c| match c {
                    Component::Normal(n) => Some(n.to_owned()),
                    _ => None,
                })
                .unwrap_or_else(|| "source".into());
            let path = scratch.path().join(file_name);
            let mut file = std::fs::File::create(&path)?;
            io::copy(&mut upstream, &mut file).context("receiving the source")?;
            let slot = args
                .get_mut(*arg)
                .ok_or_else(|| anyhow!("the source argument {arg} is not in the command"))?;
            *slot = path.to_str().context("a non-UTF-8 path")?.to_owned();
        }
    }
    upstream.drain()?;
    Ok((scratch, cwd, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_option_is_not_sent() {
        let argv: Vec<OsString> = [
            "amidala",
            "--host",
            "me@builder",
            "--json",
            "build",
            "--host=x",
            "--",
            "--host",
            "y",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            forwarded_args(&argv).unwrap(),
            ["--json", "build", "--", "--host", "y"]
        );
    }

    #[test]
    fn frames_carry_an_upload_of_any_size() {
        let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..(3 * MAX_FRAME + 17)).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || {
            let mut w = writer;
            for chunk in data.chunks(MAX_FRAME / 3 + 5) {
                let mut framed = (chunk.len() as u32).to_be_bytes().to_vec();
                framed.extend_from_slice(chunk);
                w.write_all(&framed).unwrap();
            }
            w.write_all(&0u32.to_be_bytes()).unwrap();
            w.write_all(&[CANCEL]).unwrap();
        });
        let mut up = Upstream {
            input: reader,
            chunk: Vec::new(),
            at: 0,
            done: false,
        };
        let mut got = Vec::new();
        up.read_to_end(&mut got).unwrap();
        assert_eq!(got, expected);
        writer.join().unwrap();
        // What follows the upload is the control stream.
        let mut byte = [0u8; 1];
        up.input.read_exact(&mut byte).unwrap();
        assert_eq!(byte[0], CANCEL);
    }

    #[test]
    fn quoting_survives_the_remote_shell() {
        let quoted = shell_quote("/opt/it's here/amidala");
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {quoted}"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "/opt/it's here/amidala"
        );
    }
}
