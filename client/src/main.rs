//! `amidala`: the unprivileged command-line client of `amidalad`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use amidala::proto::{
    parse_size, BootTestSpec, BuildFailure, BuildInfo, BuildPlan, BuildSpec, ImportSpec, Request,
    Response, Source, Tag,
};
use amidala::{unexpected, Client, ClientError, DEFAULT_SOCKET};

mod progress;
mod remote;
mod spec;

/// Bake machine images from tagged disk snapshots.
#[derive(Debug, Parser)]
#[command(
    name = "amidala",
    version,
    about,
    propagate_version = true,
    after_long_help = EXIT_CODES_HELP
)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, env = "AMIDALA_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Print results, listings and errors as JSON on stdout (`logs`: one event per line).
    #[arg(long, global = true)]
    json: bool,

    /// Show no progress and no build output: only the result and errors.
    #[arg(short, long, global = true)]
    quiet: bool,

    /// Run the command on this builder host, through ssh (`$AMIDALA_SSH`, default ssh): the
    /// current directory is sent along as the workspace.
    #[arg(long, global = true, env = "AMIDALA_HOST", value_name = "[USER@]HOST")]
    host: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage base snapshots.
    Base {
        #[command(subcommand)]
        command: BaseCommand,
    },
    /// Bake an image: run CMD in a chroot on a volume made from a snapshot, with the current
    /// directory at /workspace, then snapshot the volume and register an image. Reads
    /// amidala.toml in the current directory, if there is one; options override it.
    Build(Box<BuildArgs>),
    /// Check a build (its spec file and options) and print what it would do, making nothing.
    Validate(Box<ValidateArgs>),
    /// List builds.
    List,
    /// Show one build.
    Status { id: String },
    /// Print a build's log.
    Logs {
        id: String,
        /// Follow the log until the build ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a build and wait for its teardown.
    Cancel { id: String },
    /// Delete images, snapshots and builds of yours (admins: anyone's): an image is
    /// deregistered and its snapshot deleted (unless another image uses it or it is not
    /// yours); a snapshot is deleted if no image uses it; a finished build's record and log
    /// are removed. All count against your quota.
    Delete {
        /// Image (ami-...), snapshot (snap-...) or build (bld-...) ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Copy the disk image (raw) of a snapshot, or of an image's snapshot, of yours or
    /// published, into FILE; holes stay holes.
    Export {
        /// An image (ami-...) or snapshot (snap-...) id.
        id: String,
        /// The file to write; it must not exist, unless --force.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Boot an image or snapshot of yours (admins: anyone's) in a VM as `build --boot-test`
    /// does, its serial console on stderr, and say whether it booted (local provider: QEMU,
    /// KVM where it works, else TCG). Ctrl-C stops it.
    BootTest {
        /// An image (ami-...) or snapshot (snap-...) id.
        id: String,
        /// The firmware: bios, uefi or bios+uefi (default: what the image was made for).
        #[arg(long, value_name = "bios|uefi|bios+uefi")]
        firmware: Option<String>,
        /// Text on the serial console that shows the image booted (default: a login prompt).
        #[arg(long, value_name = "TEXT")]
        marker: Option<String>,
        /// How long each boot may take (default: the daemon's, 5 minutes).
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
        timeout: Option<u64>,
    },
    /// Boot an image or snapshot of yours (admins: anyone's) in a VM on a throw-away overlay,
    /// its serial console on this terminal, to look at what a build made (local provider:
    /// QEMU, as the boot test runs it). Ctrl-] leaves (the VM is stopped).
    Run {
        /// An image (ami-...) or snapshot (snap-...) id.
        id: String,
        /// The firmware: bios or uefi (default: the first the image was made for).
        #[arg(long, value_name = "bios|uefi")]
        firmware: Option<String>,
    },
    /// List images.
    Images,
    /// List snapshots.
    Snapshots,
    /// List the provisioner plugins the daemon has loaded.
    Plugins,
    /// Print the client's and the daemon's versions.
    Version,
    /// Find what builds left behind and no live build holds (cgroups, mounts, loop devices,
    /// volumes, snapshots of failed builds, partial files) and remove it (admins only).
    Gc {
        /// List only; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script, e.g. `amidala completions bash >
    /// /usr/share/bash-completion/completions/amidala`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `amidala man | man -l -`.
    Man,
}

#[derive(Debug, Subcommand)]
enum BaseCommand {
    /// Make a snapshot from a directory, a rootfs tarball (.tar, .tar.gz, .tar.xz) or a raw
    /// disk image (a whole-disk filesystem or an MBR/GPT partitioned disk).
    Import {
        /// The source; opened by this client, so it needs only your read access.
        src: PathBuf,
        /// Tags of the snapshot (default amidala=base).
        #[arg(long = "tag", value_name = "K=V")]
        tags: Vec<Tag>,
        /// Size of the snapshot, e.g. 2G (default: what the content needs).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Publish the snapshot at once for every member's builds (admins only; see `base
        /// publish`).
        #[arg(long)]
        publish: bool,
        /// Make a directory or tarball a bootable disk (GPT, GRUB for legacy BIOS and UEFI,
        /// fstab and kernel command line by UUID, serial console): `auto` if the tree holds a
        /// kernel and an initramfs, `yes` (it must), `no` (one ext4 filesystem, as a tree
        /// without a kernel is).
        #[arg(long, value_name = "auto|yes|no", default_value = "auto", value_parser = parse_boot)]
        boot: BootChoice,
    },
    /// Publish a snapshot (admins only): every member's builds may then start from it, by id
    /// or by its tags. A tag resolves among the caller's own snapshots and the published ones.
    Publish {
        /// The snapshot (snap-...).
        snapshot: String,
    },
    /// Take a snapshot's publication back (admins only).
    Unpublish {
        /// The snapshot (snap-...).
        snapshot: String,
    },
}

/// `--boot auto|yes|no` of `base import`.
#[derive(Debug, Clone, Copy)]
struct BootChoice(Option<bool>);

fn parse_boot(s: &str) -> Result<BootChoice, String> {
    match s {
        "auto" => Ok(BootChoice(None)),
        "yes" => Ok(BootChoice(Some(true))),
        "no" => Ok(BootChoice(Some(false))),
        other => Err(format!("{other:?}: auto, yes or no")),
    }
}

/// What makes a build's spec: the spec file and the options that override it.
#[derive(Debug, Args)]
struct SpecArgs {
    /// The build spec file (TOML; default: amidala.toml in the current directory, if any).
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Ignore amidala.toml in the current directory.
    #[arg(long, conflicts_with = "spec")]
    no_spec: bool,
    /// Start from the newest snapshot with this tag (default amidala=base).
    #[arg(long, value_name = "K=V", conflicts_with = "source")]
    from: Option<Tag>,
    /// Start from this snapshot.
    #[arg(long, value_name = "SNAPSHOT_ID")]
    source: Option<String>,
    /// The provisioner plugin (default: the spec file's, else shell).
    #[arg(long)]
    provisioner: Option<String>,
    /// The image name; {date}, {time} and {build} are replaced (default amidala-{build}).
    #[arg(long)]
    name: Option<String>,
    /// Tag the image (added to the spec file's tags).
    #[arg(long = "tag", value_name = "K=V")]
    tags: Vec<Tag>,
    /// Tag the output snapshot, so a later `--from K=V` starts from it.
    #[arg(long = "snapshot-tag", value_name = "K=V")]
    snapshot_tags: Vec<Tag>,
    /// The partition (1-based) that holds the root filesystem (default: found automatically).
    #[arg(long)]
    partition: Option<u32>,
    /// Mount the workspace read-write (default read-only).
    #[arg(long)]
    workspace_rw: bool,
    /// Volume size, e.g. 20G: the volume is the larger of this and the snapshot.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Image architecture: i386, x86_64 or arm64 (default: read from the image's /bin/sh).
    #[arg(long)]
    arch: Option<String>,
    /// Boot mode: legacy-bios, uefi or uefi-preferred (ec2; default: EC2's default).
    #[arg(long)]
    boot_mode: Option<String>,
    /// Copy the image to these regions (ec2), e.g. eu-west-1,us-east-2.
    #[arg(long, value_name = "REGION,...", value_delimiter = ',')]
    copy_to: Vec<String>,
    /// Let these accounts launch the image (ec2), e.g. 123456789012.
    #[arg(long, value_name = "ACCOUNT,...", value_delimiter = ',')]
    share_with: Vec<String>,
    /// Stop the provisioner and fail the build if it runs longer than this (90, 90s, 15m, 2h).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    timeout: Option<u64>,
    /// The provisioner's network: host, no-metadata (the host's network without the instance
    /// metadata service) or none (loopback only: no network, no metadata). Default: the
    /// daemon's policy (no-metadata unless configured); members may use only what it allows.
    #[arg(long, value_name = "host|no-metadata|none")]
    network: Option<String>,
    /// Mount the daemon's package cache NAME (see `[caches]` in amidalad.toml) into the image,
    /// kept between your builds (repeatable).
    #[arg(long = "cache", value_name = "NAME")]
    caches: Vec<String>,
    /// Boot the new image in a VM before it is registered (local provider: QEMU, KVM where it
    /// works, else TCG); a build whose image does not boot fails, its snapshot kept.
    #[arg(long)]
    boot_test: bool,
    /// The boot test's firmware: bios, uefi or bios+uefi (default: what the image was made
    /// for). Implies --boot-test.
    #[arg(long, value_name = "bios|uefi|bios+uefi")]
    boot_firmware: Option<String>,
    /// Text on the serial console that shows the image booted (default: a login prompt).
    /// Implies --boot-test.
    #[arg(long, value_name = "TEXT")]
    boot_marker: Option<String>,
    /// How long each boot may take (default: the daemon's, 5 minutes). Implies --boot-test.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    boot_timeout: Option<u64>,
    /// An option for the provisioner (repeatable; added to the spec file's options).
    #[arg(long = "opt", value_name = "KEY=VALUE", value_parser = parse_option)]
    options: Vec<(String, String)>,
    /// The command to run inside the image, with /workspace as its working directory
    /// (default: the spec file's `command`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct BuildArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Print the options the provisioner takes, and build nothing.
    #[arg(long)]
    help_options: bool,
    /// Print the build's id and return at once; the build goes on (follow it with `amidala
    /// logs -f ID`). Without it, Ctrl-C or a lost connection cancels the build.
    #[arg(long)]
    detach: bool,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Check only what needs no daemon (the spec file and the options), not the source
    /// snapshot, the provisioner, the policy or the daemon's caches.
    #[arg(long)]
    offline: bool,
}

const EXIT_CODES_HELP: &str = "\
Exit status:
  0    success
  1    the build or the operation failed (a phase of the build, gc unable to remove something)
  2    bad input: the command line, the spec file, or a request the daemon found invalid
       (a malformed option, an unknown provisioner, no such build or snapshot)
  3    amidalad cannot be reached (not running, no access to its socket, another protocol
       version, the connection lost)
  4    refused: not allowed, a limit reached, the daemon shutting down
  130  the build was cancelled (Ctrl-C, amidala cancel)";

/// The exit statuses, as `EXIT_CODES_HELP` describes them.
mod status {
    pub const FAILED: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const CANCELLED: u8 = 130;
}

/// A mistake in the command line or the spec file (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

/// A build that ran and failed (exit status 1, or 130 when it was cancelled).
#[derive(Debug, thiserror::Error)]
#[error("build {} failed in phase {}: {}", .0.build_id, .0.phase, .0.message)]
struct BuildFailed(BuildFailure);

/// An error whose JSON form was already printed.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Reported(anyhow::Error);

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == remote::REMOTE_ARG) {
        return remote::serve();
    }
    let cli = Cli::parse_from(&argv);
    let json = cli.json;
    let result = match cli.host.clone() {
        Some(host) => on_host(&host, cli, &argv),
        None => run(cli),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let code = exit_status(&err);
            eprintln!("amidala: {err:#}");
            if json && err.downcast_ref::<Reported>().is_none() {
                let (kind, message) = match daemon_error(&err) {
                    Some(reply) => (reply.code.as_str().to_owned(), reply.message.clone()),
                    None => (error_kind(code).to_owned(), format!("{err:#}")),
                };
                let value = serde_json::json!({
                    "error": { "code": kind, "message": message, "exit_status": code }
                });
                println!("{value:#}");
            }
            ExitCode::from(code)
        }
    }
}

/// The daemon's refusal behind an error, if it is one.
fn daemon_error(err: &anyhow::Error) -> Option<&amidala::proto::ErrorReply> {
    err.chain()
        .find_map(|e| match e.downcast_ref::<ClientError>() {
            Some(ClientError::Daemon(reply)) => Some(reply),
            _ => None,
        })
}

/// The exit status an error calls for.
fn exit_status(err: &anyhow::Error) -> u8 {
    use amidala::proto::ErrorCode as C;
    for cause in err.chain() {
        if let Some(Reported(inner)) = cause.downcast_ref::<Reported>() {
            return exit_status(inner);
        }
        if let Some(failed) = cause.downcast_ref::<BuildFailed>() {
            return if failed.0.code == C::Cancelled {
                status::CANCELLED
            } else {
                status::FAILED
            };
        }
        if cause.downcast_ref::<BadInput>().is_some() {
            return status::BAD_INPUT;
        }
        if cause.downcast_ref::<remote::Unreachable>().is_some() {
            return status::UNREACHABLE;
        }
        match cause.downcast_ref::<ClientError>() {
            Some(ClientError::Daemon(reply)) => {
                return match reply.code {
                    C::BadFrame
                    | C::FrameTooLarge
                    | C::BadRequest
                    | C::InvalidArgument
                    | C::NotFound
                    | C::NoSnapshot
                    | C::UnknownProvisioner => status::BAD_INPUT,
                    C::PermissionDenied | C::LimitExceeded | C::ShuttingDown => status::REFUSED,
                    C::ProtocolMismatch => status::UNREACHABLE,
                    C::Cancelled => status::CANCELLED,
                    _ => status::FAILED,
                }
            }
            Some(
                ClientError::Connect { .. }
                | ClientError::ProtocolMismatch { .. }
                | ClientError::Closed
                | ClientError::Io(_)
                | ClientError::Frame(_),
            ) => return status::UNREACHABLE,
            Some(ClientError::Unexpected(_)) => return status::FAILED,
            None => {}
        }
    }
    status::FAILED
}

/// The `code` of a JSON error that is not the daemon's.
fn error_kind(status: u8) -> &'static str {
    match status {
        status::BAD_INPUT => "bad_input",
        status::UNREACHABLE => "unreachable",
        status::REFUSED => "refused",
        status::CANCELLED => "cancelled",
        _ => "failed",
    }
}

/// Runs the command on `host` through ssh (see [`remote`]); commands that need no daemon
/// run here.
fn on_host(host: &str, cli: Cli, argv: &[std::ffi::OsString]) -> Result<ExitCode> {
    if host.is_empty() || host.starts_with('-') {
        return Err(BadInput(format!("--host {host:?} is not a [USER@]HOST")).into());
    }
    let args = remote::forwarded_args(argv).map_err(|e| BadInput(format!("{e:#}")))?;
    let upload_spec = |spec: &SpecArgs| -> Result<()> {
        // The spec file goes along with the workspace, so it must be in it.
        if let Some(path) = &spec.spec {
            let inside = path.components().all(|c| {
                matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
            if !inside {
                return Err(BadInput(format!(
                    "--spec {} with --host: the spec file must be in the current directory or \
                     below it, which is sent to the builder (a relative path without ..)",
                    path.display()
                ))
                .into());
            }
        }
        Ok(())
    };
    let (upload, source) = match &cli.command {
        Command::Completions { .. } | Command::Man => return run(cli),
        Command::Run { .. } => {
            return Err(BadInput(
                "run with --host: the console needs the terminal, which --host uses to talk to \
                 the builder; log in to it instead (ssh -t HOST amidala run ID)"
                    .into(),
            )
            .into())
        }
        Command::Export { .. } => {
            return Err(BadInput(
                "export with --host: the file would be written on the builder, in a scratch \
                 directory removed when the command ends; run amidala export on the builder \
                 (ssh HOST amidala export ID -o FILE) and copy the file from there"
                    .into(),
            )
            .into())
        }
        Command::Build(build) => {
            if build.detach {
                return Err(BadInput(
                    "--detach with --host: the workspace sent to the builder lives as long as \
                     the command; leave the build attached (or run amidala on the builder)"
                        .into(),
                )
                .into());
            }
            upload_spec(&build.spec)?;
            (remote::Upload::Workspace, None)
        }
        Command::Validate(validate) => {
            upload_spec(&validate.spec)?;
            (remote::Upload::Workspace, None)
        }
        Command::Base {
            command: BaseCommand::Import { src, .. },
        } => {
            let text = src
                .to_str()
                .ok_or_else(|| BadInput(format!("{src:?} is not UTF-8")))?;
            let arg = args
                .iter()
                .enumerate()
                .skip_while(|(_, a)| *a != "import")
                .skip(1)
                .find(|(i, a)| {
                    *a == text && !matches!(args[i - 1].as_str(), "--tag" | "--size" | "--socket")
                })
                .map(|(i, _)| i)
                .ok_or_else(|| BadInput(format!("cannot find {text:?} in the command line")))?;
            // Opened here first, so that a mistake is reported before ssh starts.
            drop(open_source(src)?);
            (
                remote::Upload::Source {
                    arg,
                    name: text.to_owned(),
                },
                Some(src.clone()),
            )
        }
        _ => (remote::Upload::None, None),
    };
    remote::run(host, args, upload, source.as_deref(), cli.quiet)
}

fn connect(socket: &Path) -> Result<Client> {
    Ok(Client::connect(socket)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let Cli {
        socket,
        json,
        quiet,
        command,
        host: _,
    } = cli;
    let out = Output { json, quiet };
    match command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "amidala", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            // amidala(1), then a page per command, amidala-build(1) and so on, one after the
            // other (`man -l -` shows them in turn).
            let command = <Cli as clap::CommandFactory>::command();
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(command.clone()).render(&mut out)?;
            for sub in command.get_subcommands() {
                let page = sub.clone().name(format!("amidala-{}", sub.get_name()));
                clap_mangen::Man::new(page).render(&mut out)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Base {
            command:
                BaseCommand::Import {
                    src,
                    tags,
                    size,
                    publish,
                    boot,
                },
        } => import(&socket, out, &src, tags, size, publish, boot.0),
        Command::Base {
            command: BaseCommand::Publish { snapshot },
        } => set_published(&socket, out, snapshot, true),
        Command::Base {
            command: BaseCommand::Unpublish { snapshot },
        } => set_published(&socket, out, snapshot, false),
        Command::Delete { ids } => {
            let mut client = connect(&socket)?;
            let mut removed = Vec::new();
            for id in ids {
                match client.call(&Request::Delete { id })? {
                    Response::Deleted { ids } => {
                        if !json {
                            for id in &ids {
                                println!("deleted {id}");
                            }
                        }
                        removed.extend(ids);
                    }
                    other => return Err(unexpected(other).into()),
                }
            }
            if json {
                print_json(&serde_json::json!({ "deleted": removed }))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { id, output, force } => export(&socket, out, &id, &output, force),
        Command::BootTest {
            id,
            firmware,
            marker,
            timeout,
        } => {
            let test = BootTestSpec {
                firmware,
                marker,
                timeout,
            };
            boot_test(&socket, out, id, test)
        }
        Command::Run { id, firmware } => run_console(&socket, out, id, firmware),
        Command::Build(args) => build(&socket, out, *args),
        Command::Validate(args) => validate(&socket, out, *args),
        Command::List => {
            let builds = match connect(&socket)?.call(&Request::List)? {
                Response::Builds(builds) => builds,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&builds)?;
            } else {
                print_table(
                    &[
                        "ID",
                        "STATE",
                        "PHASE",
                        "OWNER",
                        "PROVISIONER",
                        "CREATED",
                        "IMAGE",
                    ],
                    builds.iter().map(|b| {
                        vec![
                            b.id.clone(),
                            b.state.as_str().to_owned(),
                            b.phase.map(|p| p.to_string()).unwrap_or_default(),
                            b.owner_uid.to_string(),
                            b.provisioner.clone(),
                            b.created.clone(),
                            b.image_id.clone().unwrap_or_default(),
                        ]
                    }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { id } => {
            let build = match connect(&socket)?.call(&Request::Status { id })? {
                Response::Build(build) => build,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&build)?;
            } else {
                print_status(&build);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { id, follow } => {
            let mut client = connect(&socket)?;
            client.send(&Request::Logs { id, follow }, None)?;
            loop {
                let event = client.recv()?;
                if json && !matches!(event, Response::LogEnd) {
                    println!("{}", serde_json::to_string(&event)?);
                }
                match event {
                    Response::Phase { .. } | Response::Log { .. } | Response::Accepted { .. }
                        if json => {}
                    Response::Phase { phase } => println!("==> {phase}"),
                    Response::Log { line } => println!("{line}"),
                    Response::Accepted { build_id } => println!("==> build {build_id} accepted"),
                    Response::Finished(result) => {
                        if !json {
                            println!("==> finished: image {}", result.image_id);
                        }
                        break;
                    }
                    Response::Failed(failure) => {
                        if !json {
                            println!("==> failed in phase {}: {}", failure.phase, failure.message);
                        }
                        break;
                    }
                    Response::LogEnd => break,
                    other => return Err(unexpected(other).into()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id } => {
            match connect(&socket)?.call(&Request::Cancel { id })? {
                Response::Build(build) => {
                    if json {
                        print_json(&build)?;
                    } else {
                        eprintln!("build {} is {}", build.id, build.state.as_str());
                    }
                }
                other => return Err(unexpected(other).into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { dry_run } => {
            let items = match connect(&socket)?.call(&Request::Gc { dry_run })? {
                Response::Collected { items, .. } => items,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&items)?;
            } else if items.is_empty() {
                eprintln!("nothing to collect");
            } else {
                print_table(
                    &["KIND", "ID", "BUILD", "DETAIL", "RESULT"],
                    items.iter().map(|i| {
                        vec![
                            i.kind.clone(),
                            i.id.clone(),
                            i.build.clone().unwrap_or_default(),
                            i.detail.clone(),
                            match (&i.error, i.removed) {
                                (Some(e), _) => format!("failed: {e}"),
                                (None, true) => "removed".into(),
                                (None, false) => "found".into(),
                            },
                        ]
                    }),
                );
            }
            let failed = items.iter().filter(|i| i.error.is_some()).count();
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Images => {
            let images = match connect(&socket)?.call(&Request::Images)? {
                Response::Images(images) => images,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&images)?;
            } else {
                print_table(
                    &["ID", "NAME", "SNAPSHOT", "CREATED", "TAGS"],
                    images.iter().map(|i| {
                        vec![
                            i.id.clone(),
                            i.name.clone(),
                            i.snapshot_id.clone(),
                            i.created.clone(),
                            format_tags(&i.tags),
                        ]
                    }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshots => {
            let snapshots = match connect(&socket)?.call(&Request::Snapshots)? {
                Response::Snapshots(snapshots) => snapshots,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&snapshots)?;
            } else {
                print_table(
                    &["ID", "CREATED", "SIZE", "OWNER", "TAGS", "PATH"],
                    snapshots.iter().map(|s| {
                        vec![
                            s.id.clone(),
                            s.created.clone(),
                            s.size.to_string(),
                            format!(
                                "{}{}",
                                s.owner().unwrap_or("-"),
                                if s.published() { " (published)" } else { "" }
                            ),
                            format_tags(&s.tags),
                            s.path.clone().unwrap_or_default(),
                        ]
                    }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins => {
            let plugins = match connect(&socket)?.call(&Request::Plugins)? {
                Response::Plugins(plugins) => plugins,
                other => return Err(unexpected(other).into()),
            };
            if json {
                print_json(&plugins)?;
            } else {
                print_table(
                    &["NAME", "VERSION", "DESCRIPTION", "OPTIONS", "PATH"],
                    plugins.iter().map(|p| {
                        let options: Vec<String> = p
                            .options
                            .iter()
                            .map(|o| {
                                format!("{}{}", o.name, if o.required { " (required)" } else { "" })
                            })
                            .collect();
                        vec![
                            p.name.clone(),
                            p.version.clone(),
                            p.description.clone(),
                            options.join(", "),
                            p.path.clone(),
                        ]
                    }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            let client = env!("CARGO_PKG_VERSION");
            if !json {
                println!("amidala {client}");
            }
            match connect(&socket)?.call(&Request::Version)? {
                Response::Version {
                    daemon,
                    protocol,
                    provider,
                } => {
                    if json {
                        print_json(&serde_json::json!({
                            "client": client,
                            "daemon": daemon,
                            "protocol": protocol,
                            "provider": provider,
                        }))?;
                    } else {
                        println!("amidalad {daemon} (protocol {protocol}, provider {provider})");
                    }
                }
                other => return Err(unexpected(other).into()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// How results and progress are printed.
#[derive(Debug, Clone, Copy)]
struct Output {
    json: bool,
    quiet: bool,
}

fn set_published(
    socket: &Path,
    out: Output,
    snapshot: String,
    published: bool,
) -> Result<ExitCode> {
    match connect(socket)?.call(&Request::Publish {
        snapshot,
        published,
    })? {
        Response::Snapshot(info) => {
            if out.json {
                print_json(&info)?;
            } else {
                println!("{} ({})", info.id, info.whose());
            }
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(other).into()),
    }
}

/// `amidala export`: the daemon hands over a read-only descriptor of the disk image, and this
/// client, with the user's own rights, writes the copy (the daemon never writes a path a
/// client names).
fn export(socket: &Path, out: Output, id: &str, output: &Path, force: bool) -> Result<ExitCode> {
    let mut client = connect(socket)?;
    client.send(&Request::Export { id: id.to_owned() }, None)?;
    let (info, fd) = match client.recv_with_fd()? {
        (Response::Export(info), Some(fd)) => (info, fd),
        (Response::Export(_), None) => {
            return Err(anyhow::anyhow!(
                "amidalad sent no disk image with its answer"
            ))
        }
        (other, _) => return Err(unexpected(other).into()),
    };
    let source = File::from(fd);
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    // Private to the user first: a disk image may hold anything.
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let target = options
        .open(output)
        .map_err(|e| BadInput(format!("creating {}: {e}", output.display())))?;
    let written =
        copy_sparse(&source, &target).with_context(|| format!("writing {}", output.display()))?;
    target
        .sync_all()
        .with_context(|| format!("syncing {}", output.display()))?;
    if out.json {
        print_json(&serde_json::json!({
            "snapshot": info,
            "file": output.display().to_string(),
            "size": info.size,
            "data_bytes": written,
        }))?;
    } else if !out.quiet {
        eprintln!(
            "amidala: wrote {} ({}, {} of data) from {} ({})",
            output.display(),
            human_size(info.size),
            human_size(written),
            info.id,
            info.whose()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies `src` into `dst` region by region, leaving holes where `src` has them; returns the
/// bytes of data copied.
fn copy_sparse(src: &File, dst: &File) -> Result<u64> {
    use nix::unistd::{lseek, Whence};
    let len = src.metadata()?.len();
    dst.set_len(0)?;
    dst.set_len(len)?;
    let mut copied = 0;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(src.as_raw_fd(), pos, Whence::SeekData) {
            Ok(at) => at,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole)?;
        let (mut from, mut to) = (data, data);
        while from < hole {
            let chunk = ((hole - from) as usize).min(1 << 30);
            let n = nix::fcntl::copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk)?;
            if n == 0 {
                anyhow::bail!("the disk image ended early");
            }
            copied += n as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

fn import(
    socket: &Path,
    out: Output,
    src: &Path,
    tags: Vec<Tag>,
    size: Option<u64>,
    publish: bool,
    boot: Option<bool>,
) -> Result<ExitCode> {
    // Opened here, with the user's own rights; the daemon never opens a path we name.
    let source = open_source(src)?;
    let mut client = connect(socket)?;
    let spec = ImportSpec {
        tags,
        size,
        publish,
        source_name: src.display().to_string(),
        boot,
    };
    client.send(&Request::ImportBase(spec), Some(source.as_fd()))?;
    drop(source);
    loop {
        match client.recv() {
            Ok(Response::Log { line }) => {
                if !out.quiet {
                    eprintln!("{line}");
                }
            }
            Ok(Response::Imported(snapshot)) => {
                if out.json {
                    print_json(&snapshot)?;
                } else {
                    println!("{}", snapshot.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(err @ ClientError::Daemon(_)) => {
                return Err(anyhow::Error::from(err).context("base import refused"))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

fn boot_test(socket: &Path, out: Output, id: String, test: BootTestSpec) -> Result<ExitCode> {
    let mut client = connect(socket)?;
    client.send(&Request::BootTest { id, test }, None)?;
    loop {
        match client.recv() {
            Ok(Response::Log { line }) => {
                if !out.quiet {
                    eprintln!("{line}");
                }
            }
            Ok(Response::BootTested { id, detail }) => {
                if out.json {
                    print_json(
                        &serde_json::json!({ "id": id, "boot_test": "passed", "detail": detail }),
                    )?;
                } else {
                    println!("{id} booted: {detail}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(err @ ClientError::Daemon(_)) => {
                return Err(anyhow::Error::from(err).context("boot test failed"))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The byte that leaves a run's console (Ctrl-], as telnet's and virsh's).
const LEAVE: u8 = 0x1d;

/// The terminal in raw mode while it lives (keys go to the guest as typed, Ctrl-C too), as it
/// was again when dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn new() -> RawTerminal {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal(None);
        }
        RawTerminal(Some(saved))
    }

    /// A line of the client's own, said where the terminal's cursor is.
    fn say(&self, line: &str) {
        if self.0.is_some() {
            eprint!("\r\n{line}\r\n");
        } else {
            eprintln!("{line}");
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// `amidala run`: the VM's console on this terminal until the run ends. Ctrl-] (on the
/// terminal or in what stdin brings) leaves: the daemon stops the VM, then says so.
fn run_console(
    socket: &Path,
    out: Output,
    id: String,
    firmware: Option<String>,
) -> Result<ExitCode> {
    use std::io::{Read, Write};
    let mut client = connect(socket)?;
    client.send(
        &Request::Run {
            id: id.clone(),
            firmware,
        },
        None,
    )?;
    let firmware = match client.recv() {
        Ok(Response::Running { firmware, .. }) => firmware,
        Ok(other) => return Err(unexpected(other).into()),
        Err(err @ ClientError::Daemon(_)) => {
            return Err(anyhow::Error::from(err).context("run refused"))
        }
        Err(err) => return Err(err.into()),
    };
    let terminal = RawTerminal::new();
    if !out.quiet {
        terminal.say(&format!(
            "amidala: the serial console of {id} ({firmware}); Ctrl-] leaves and stops the VM"
        ));
    }
    // Keys to the guest, from a thread of their own; the end of stdin is not the end of the
    // run (the guest may still be writing), Ctrl-] is.
    let mut keys = client.writer()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let typed = &buf[..n];
            let (send, leave) = match typed.iter().position(|&b| b == LEAVE) {
                Some(at) => (&typed[..at], true),
                None => (typed, false),
            };
            if !send.is_empty()
                && keys
                    .send(&Request::Input {
                        data: send.to_vec(),
                    })
                    .is_err()
            {
                return;
            }
            if leave {
                let _ = keys.shutdown_write();
                return;
            }
        }
    });
    let mut stdout = std::io::stdout().lock();
    loop {
        match client.recv() {
            Ok(Response::Console { data }) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Ok(Response::Log { line }) => {
                if !out.quiet {
                    terminal.say(&line);
                }
            }
            Ok(Response::RunEnded { why }) => {
                drop(terminal);
                if out.json {
                    print_json(&serde_json::json!({ "id": id, "ended": why }))?;
                } else if !out.quiet {
                    eprintln!("\namidala: the run of {id} ended: {why}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(err @ ClientError::Daemon(_)) => {
                return Err(anyhow::Error::from(err).context("run failed"))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Opens an import's source for reading: a directory, a regular file or a block device.
/// Opened without blocking, so that a FIFO (whose open waits for a writer) is refused rather
/// than waited on for ever, and checked before anything is sent.
fn open_source(src: &Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(src)
        .map_err(|e| BadInput(format!("opening {}: {e}", src.display())))?;
    let kind = file
        .metadata()
        .map_err(|e| BadInput(format!("reading {}: {e}", src.display())))?
        .file_type();
    if !(kind.is_dir() || kind.is_file() || kind.is_block_device()) {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a character device"
        };
        return Err(BadInput(format!(
            "{} is {what}: amidala imports directories, regular files and block devices",
            src.display()
        ))
        .into());
    }
    let flags = nix::fcntl::fcntl(file.as_fd().as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .context("reading the source's flags")?;
    let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(
        file.as_fd().as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(blocking),
    )
    .context("setting the source's flags")?;
    Ok(file)
}

/// The build `args` ask for: the spec file's, overridden by the options; and the spec file read.
fn build_spec(args: SpecArgs) -> Result<(BuildSpec, Option<PathBuf>)> {
    let path = spec::find(args.spec.as_deref(), args.no_spec, Path::new("."));
    let file = match &path {
        Some(path) => spec::SpecFile::load(path).map_err(|e| BadInput(format!("{e:#}")))?,
        None => spec::SpecFile::default(),
    };
    let source = match (args.source, args.from, file.source, file.from) {
        (Some(id), _, _, _) => Source::Snapshot(id),
        (None, Some(tag), _, _) => Source::Tag(tag),
        (None, None, Some(id), _) => Source::Snapshot(id),
        (None, None, None, Some(tag)) => Source::Tag(tag),
        (None, None, None, None) => Source::Tag(Tag {
            key: "amidala".into(),
            value: "base".into(),
        }),
    };
    let mut options = file.provisioner.options;
    options.extend(args.options);
    let or_file =
        |given: Vec<String>, file: Vec<String>| if given.is_empty() { file } else { given };
    let spec = BuildSpec {
        source,
        provisioner: args
            .provisioner
            .or(file.provisioner.name)
            .unwrap_or_else(|| "shell".to_owned()),
        command: if args.command.is_empty() {
            file.command.unwrap_or_default()
        } else {
            args.command
        },
        options,
        name: args.name.or(file.name),
        image_tags: merge_tags(file.tags, args.tags),
        snapshot_tags: merge_tags(file.snapshot_tags, args.snapshot_tags),
        partition: args.partition.or(file.partition),
        workspace_rw: args.workspace_rw || file.workspace_rw.unwrap_or(false),
        size: args.size.or(file.size),
        arch: args.arch.or(file.arch),
        boot_mode: args.boot_mode.or(file.boot_mode),
        copy_to: or_file(args.copy_to, file.copy_to),
        share_with: or_file(args.share_with, file.share_with),
        network: args.network.or(file.network),
        detach: false,
        timeout: args.timeout.or(file.timeout),
        caches: or_file(args.caches, file.caches),
        boot_test: boot_test_spec(
            args.boot_test || file.boot_test.unwrap_or(false),
            args.boot_firmware.or(file.boot_firmware),
            args.boot_marker.or(file.boot_marker),
            args.boot_timeout.or(file.boot_timeout),
        ),
    };
    Ok((spec, path))
}

/// The boot test asked for, if any: by `--boot-test` or any of its settings.
fn boot_test_spec(
    asked: bool,
    firmware: Option<String>,
    marker: Option<String>,
    timeout: Option<u64>,
) -> Option<BootTestSpec> {
    (asked || firmware.is_some() || marker.is_some() || timeout.is_some()).then_some(BootTestSpec {
        firmware,
        marker,
        timeout,
    })
}

/// The spec file's tags with those given as options: an option replaces a tag of its key.
fn merge_tags(file: Vec<Tag>, given: Vec<Tag>) -> Vec<Tag> {
    let mut tags: Vec<Tag> = file
        .into_iter()
        .filter(|t| !given.iter().any(|g| g.key == t.key))
        .collect();
    tags.extend(given);
    tags
}

fn help_options(socket: &Path, name: &str) -> Result<ExitCode> {
    let plugins = match connect(socket)?.call(&Request::Plugins)? {
        Response::Plugins(plugins) => plugins,
        other => return Err(unexpected(other).into()),
    };
    let plugin = plugins
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| BadInput(format!("no provisioner named {name:?} is loaded")))?;
    println!("{} {}: {}", plugin.name, plugin.version, plugin.description);
    if plugin.options.is_empty() {
        println!("options: none");
    }
    for option in &plugin.options {
        let required = if option.required { " (required)" } else { "" };
        println!(
            "  --opt {}=...{required}\n      {}",
            option.name, option.description
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(socket: &Path, out: Output, args: ValidateArgs) -> Result<ExitCode> {
    let (spec, path) = build_spec(args.spec)?;
    amidala::proto::validate_build_options(&spec).map_err(|e| BadInput(e.to_string()))?;
    amidala::proto::validate_user_tags("image tags", &spec.image_tags)
        .and_then(|()| amidala::proto::validate_user_tags("snapshot tags", &spec.snapshot_tags))
        .map_err(|e| BadInput(e.to_string()))?;
    let spec_file = path.as_ref().map(|p| p.display().to_string());
    if args.offline {
        if out.json {
            print_json(
                &serde_json::json!({ "spec_file": spec_file, "spec": spec, "checked_by_daemon": false }),
            )?;
        } else {
            print_plan(spec_file.as_deref(), &spec, None);
            eprintln!("amidala: the spec is well-formed (--offline: the daemon did not check the source, the provisioner and its options, the policy and the caches)");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let plan = match connect(socket)?.call(&Request::Validate(spec)) {
        Ok(Response::Plan(plan)) => plan,
        Ok(other) => return Err(unexpected(other).into()),
        Err(err @ ClientError::Daemon(_)) => {
            return Err(anyhow::Error::from(err).context("the build would be refused"))
        }
        Err(err) => return Err(err.into()),
    };
    if out.json {
        print_json(
            &serde_json::json!({ "spec_file": spec_file, "plan": plan, "checked_by_daemon": true }),
        )?;
    } else {
        print_plan(spec_file.as_deref(), &plan.spec, Some(&plan));
        if !out.quiet {
            eprintln!("amidala: the build would run; nothing was made");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a build would do, for `amidala validate`.
fn print_plan(spec_file: Option<&str>, spec: &BuildSpec, plan: Option<&BuildPlan>) {
    let row = |key: &str, value: &str| {
        if !value.is_empty() {
            println!("{:<15}{value}", format!("{key}:"));
        }
    };
    let list = |items: &[String]| items.join(", ");
    let tags = |tags: &[Tag]| {
        tags.iter()
            .map(Tag::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    row("spec file", spec_file.unwrap_or("(none)"));
    match plan {
        Some(plan) => {
            let s = &plan.source_snapshot;
            row(
                "source",
                &format!(
                    "{} → {} ({}; created {}, {})",
                    spec.source,
                    s.id,
                    s.whose(),
                    s.created,
                    human_size(s.size)
                ),
            );
            row(
                "provisioner",
                &format!("{} {}", spec.provisioner, plan.provisioner_version),
            );
        }
        None => {
            row("source", &spec.source.to_string());
            row("provisioner", &spec.provisioner);
        }
    }
    row("command", &spec.command.join(" "));
    row(
        "options",
        &spec
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    match plan {
        Some(plan) => {
            row(
                "volume",
                &format!(
                    "{} ({} provider)",
                    human_size(plan.volume_size),
                    plan.provider
                ),
            );
            row(
                "image",
                &format!("{} (for build {})", plan.image_name, plan.example_build_id),
            );
        }
        None => {
            row("volume", &spec.size.map(human_size).unwrap_or_default());
            row("image", spec.name.as_deref().unwrap_or("amidala-{build}"));
        }
    }
    row("image tags", &tags(&spec.image_tags));
    row("snapshot tags", &tags(&spec.snapshot_tags));
    row("arch", spec.arch.as_deref().unwrap_or_default());
    row("boot mode", spec.boot_mode.as_deref().unwrap_or_default());
    row("copy to", &list(&spec.copy_to));
    row("share with", &list(&spec.share_with));
    row(
        "workspace",
        if spec.workspace_rw {
            ". at /workspace, read-write"
        } else {
            ". at /workspace, read-only"
        },
    );
    row(
        "network",
        spec.network.as_deref().unwrap_or("(the daemon's default)"),
    );
    row("caches", &list(&spec.caches));
    row(
        "timeout",
        &spec.timeout.map(|t| format!("{t}s")).unwrap_or_default(),
    );
}

fn human_size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

fn build(socket: &Path, out: Output, args: BuildArgs) -> Result<ExitCode> {
    let (mut spec, path) = build_spec(args.spec)?;
    if args.help_options {
        return help_options(socket, &spec.provisioner);
    }
    spec.detach = args.detach;
    let mut progress = progress::Progress::new(progress::Mode::detect(out.quiet));
    if let Some(path) = &path {
        progress.line(&format!("amidala: building from {}", path.display()));
    }
    // The workspace is the directory we are in, opened by us and handed over as a descriptor.
    let workspace = File::open(".").context("opening the current directory as the workspace")?;
    let detach = spec.detach;
    // Ctrl-C cancels the build and waits for its teardown; a second one stops waiting.
    let accepted: Arc<Mutex<Option<String>>> = Arc::default();
    if !detach {
        watch_interrupts(socket.to_owned(), accepted.clone())?;
    }
    let mut client = connect(socket)?;
    client.send(&Request::Build(spec), Some(workspace.as_fd()))?;
    drop(workspace);
    let mut build_id = None;
    loop {
        match client.recv() {
            Ok(Response::Accepted { build_id: id }) => {
                if detach {
                    if out.json {
                        print_json(&serde_json::json!({ "build_id": id }))?;
                    } else {
                        println!("{id}");
                    }
                    if !out.quiet {
                        eprintln!(
                            "amidala: build {id} goes on; follow it with `amidala logs -f {id}`"
                        );
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                progress.line(&format!("amidala: build {id} accepted"));
                *accepted.lock().expect("lock") = Some(id.clone());
                build_id = Some(id);
            }
            Ok(Response::Phase { phase }) => progress.phase(phase),
            Ok(Response::Log { line }) => progress.line(&line),
            Ok(Response::Finished(result)) => {
                progress.finish(
                    true,
                    &format!("build {} made image {}", result.build_id, result.image_id),
                );
                if out.json {
                    print_json(&result)?;
                } else {
                    println!("{}", result.image_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Failed(failure)) => {
                progress.finish(false, &format!("build {} failed", failure.build_id));
                let failed = anyhow::Error::from(BuildFailed(failure.clone()));
                if out.json {
                    print_json(&failure)?;
                    return Err(Reported(failed).into());
                }
                return Err(failed);
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(err @ ClientError::Daemon(_)) => {
                return Err(anyhow::Error::from(err).context("build refused"))
            }
            Err(ClientError::Closed) => {
                return Err(anyhow::Error::from(ClientError::Closed).context(format!(
                    "build {} did not end",
                    build_id.as_deref().unwrap_or("(not yet accepted)")
                )))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Blocks SIGINT in this thread (and so in those it starts) and calls `handle` in a thread of
/// its own for each Ctrl-C, with how many there were so far (1 for the first).
fn on_interrupts(mut handle: impl FnMut(u32) + Send + 'static) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGINT")?;
    std::thread::spawn(move || {
        let mut count = 0;
        while let Ok(Signal::SIGINT) = set.wait() {
            count += 1;
            handle(count);
        }
    });
    Ok(())
}

/// Ctrl-C during a build: the first asks the daemon to cancel the build (once it is accepted;
/// before, there is nothing to wait for), the second exits at once (the closed connection
/// cancels it too).
fn watch_interrupts(socket: PathBuf, accepted: Arc<Mutex<Option<String>>>) -> Result<()> {
    let mut asked = false;
    on_interrupts(move |_| {
        let id = accepted.lock().expect("lock").clone();
        match id {
            Some(id) if !asked => {
                asked = true;
                eprintln!(
                    "amidala: cancelling build {id} (Ctrl-C again to stop waiting for its teardown)"
                );
                let socket = socket.clone();
                std::thread::spawn(move || {
                    match connect(&socket).and_then(|mut c| Ok(c.call(&Request::Cancel { id })?)) {
                        Ok(_) => {}
                        Err(e) => eprintln!("amidala: cancelling: {e:#}"),
                    }
                });
            }
            _ => std::process::exit(130),
        }
    })
}

fn parse_timeout(s: &str) -> Result<u64, String> {
    amidala::proto::parse_duration(s).map_err(|e| e.0)
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("option {s:?} is not of the form KEY=VALUE")),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn format_tags(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn print_status(b: &BuildInfo) {
    println!("id:              {}", b.id);
    println!("state:           {}", b.state.as_str());
    if let Some(phase) = b.phase {
        println!("phase:           {phase}");
    }
    println!("owner uid:       {}", b.owner_uid);
    println!("provisioner:     {}", b.provisioner);
    println!("command:         {}", b.command.join(" "));
    println!("source:          {}", b.source);
    if let Some(s) = &b.source_snapshot {
        println!("source snapshot: {s}");
    }
    println!("created:         {}", b.created);
    if let Some(f) = &b.finished {
        println!("finished:        {f}");
    }
    if let Some(i) = &b.image_id {
        println!("image:           {i}");
    }
    if let Some(s) = &b.snapshot_id {
        println!("snapshot:        {s}");
    }
    if let Some(e) = &b.error {
        println!("error:           {} ({}): {}", e.phase, e.code, e.message);
    }
}
