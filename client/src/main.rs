//! `amidala`: the unprivileged command-line client of `amidalad`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use amidala::proto::{
    parse_size, BuildInfo, BuildSpec, ImportSpec, Request, Response, Source, Tag,
};
use amidala::{unexpected, Client, ClientError, DEFAULT_SOCKET};

/// Bake machine images from tagged disk snapshots.
#[derive(Debug, Parser)]
#[command(name = "amidala", version, about, propagate_version = true)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, env = "AMIDALA_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

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
    /// directory at /workspace, then snapshot the volume and register an image.
    Build(Box<BuildArgs>),
    /// List builds.
    List(JsonFlag),
    /// Show one build.
    Status {
        id: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Print a build's log.
    Logs {
        id: String,
        /// Follow the log until the build ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel a build and wait for its teardown.
    Cancel { id: String },
    /// List images.
    Images(JsonFlag),
    /// List snapshots.
    Snapshots(JsonFlag),
    /// List the provisioner plugins the daemon has loaded.
    Plugins(JsonFlag),
    /// Print the client's and the daemon's versions.
    Version,
    /// Find what builds left behind and no live build holds (cgroups, mounts, loop devices,
    /// volumes, snapshots of failed builds, partial files) and remove it (admins only).
    Gc {
        /// List only; remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        json: JsonFlag,
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
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct BuildArgs {
    /// Start from the newest snapshot with this tag.
    #[arg(long, value_name = "K=V", conflicts_with = "source")]
    from: Option<Tag>,
    /// Start from this snapshot.
    #[arg(long, value_name = "SNAPSHOT_ID")]
    source: Option<String>,
    /// The provisioner plugin (default: the spec file's, else shell).
    #[arg(long)]
    provisioner: Option<String>,
    /// A build spec file (TOML) with a [provisioner] section: name, and options.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// Print the options the provisioner takes, and build nothing.
    #[arg(long)]
    help_options: bool,
    /// The image name; {date}, {time} and {build} are replaced (default amidala-{build}).
    #[arg(long)]
    name: Option<String>,
    /// Tag the image.
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
    /// Print the build's id and return at once; the build goes on (follow it with `amidala
    /// logs -f ID`). Without it, Ctrl-C or a lost connection cancels the build.
    #[arg(long)]
    detach: bool,
    /// The provisioner's network: host (default), no-metadata (the host's network without
    /// the instance metadata service) or none (loopback only: no network, no metadata).
    #[arg(long, value_name = "host|no-metadata|none")]
    network: Option<String>,
    /// Mount the daemon's package cache NAME (see `[caches]` in amidalad.toml) into the image,
    /// kept between your builds (repeatable).
    #[arg(long = "cache", value_name = "NAME")]
    caches: Vec<String>,
    /// An option for the provisioner (repeatable).
    #[arg(long = "opt", value_name = "KEY=VALUE", value_parser = parse_option)]
    options: Vec<(String, String)>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// The command to run inside the image, with /workspace as its working directory.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("amidala: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn connect(socket: &Path) -> Result<Client> {
    Ok(Client::connect(socket)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let socket = cli.socket;
    match cli.command {
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
                    json,
                },
        } => import(&socket, &src, tags, size, json.json),
        Command::Build(args) => build(&socket, *args),
        Command::List(json) => {
            let builds = match connect(&socket)?.call(&Request::List)? {
                Response::Builds(builds) => builds,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
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
        Command::Status { id, json } => {
            let build = match connect(&socket)?.call(&Request::Status { id })? {
                Response::Build(build) => build,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
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
                match client.recv()? {
                    Response::Phase { phase } => println!("==> {phase}"),
                    Response::Log { line } => println!("{line}"),
                    Response::Accepted { build_id } => println!("==> build {build_id} accepted"),
                    Response::Finished(result) => {
                        println!("==> finished: image {}", result.image_id);
                        break;
                    }
                    Response::Failed(failure) => {
                        println!("==> failed in phase {}: {}", failure.phase, failure.message);
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
                    eprintln!("build {} is {}", build.id, build.state.as_str());
                }
                other => return Err(unexpected(other).into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { dry_run, json } => {
            let items = match connect(&socket)?.call(&Request::Gc { dry_run })? {
                Response::Collected { items, .. } => items,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
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
        Command::Images(json) => {
            let images = match connect(&socket)?.call(&Request::Images)? {
                Response::Images(images) => images,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
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
        Command::Snapshots(json) => {
            let snapshots = match connect(&socket)?.call(&Request::Snapshots)? {
                Response::Snapshots(snapshots) => snapshots,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
                print_json(&snapshots)?;
            } else {
                print_table(
                    &["ID", "CREATED", "SIZE", "TAGS", "PATH"],
                    snapshots.iter().map(|s| {
                        vec![
                            s.id.clone(),
                            s.created.clone(),
                            s.size.to_string(),
                            format_tags(&s.tags),
                            s.path.clone().unwrap_or_default(),
                        ]
                    }),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins(json) => {
            let plugins = match connect(&socket)?.call(&Request::Plugins)? {
                Response::Plugins(plugins) => plugins,
                other => return Err(unexpected(other).into()),
            };
            if json.json {
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
            println!("amidala {}", env!("CARGO_PKG_VERSION"));
            match connect(&socket)?.call(&Request::Version)? {
                Response::Version {
                    daemon,
                    protocol,
                    provider,
                } => println!("amidalad {daemon} (protocol {protocol}, provider {provider})"),
                other => return Err(unexpected(other).into()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn import(
    socket: &Path,
    src: &Path,
    tags: Vec<Tag>,
    size: Option<u64>,
    json: bool,
) -> Result<ExitCode> {
    // Opened here, with the user's own rights; the daemon never opens a path we name.
    let source = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut client = connect(socket)?;
    let spec = ImportSpec {
        tags,
        size,
        source_name: src.display().to_string(),
    };
    client.send(&Request::ImportBase(spec), Some(source.as_fd()))?;
    drop(source);
    loop {
        match client.recv() {
            Ok(Response::Log { line }) => eprintln!("{line}"),
            Ok(Response::Imported(snapshot)) => {
                if json {
                    print_json(&snapshot)?;
                } else {
                    println!("{}", snapshot.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(ClientError::Daemon(err)) => {
                bail!("base import refused ({}): {}", err.code, err.message)
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The `[provisioner]` section of a build spec file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    #[serde(default)]
    provisioner: SpecProvisioner,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecProvisioner {
    name: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

fn read_spec(path: &Path) -> Result<SpecFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))
}

fn help_options(socket: &Path, name: &str) -> Result<ExitCode> {
    let plugins = match connect(socket)?.call(&Request::Plugins)? {
        Response::Plugins(plugins) => plugins,
        other => return Err(unexpected(other).into()),
    };
    let plugin = plugins
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| anyhow!("no provisioner named {name:?} is loaded"))?;
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

fn build(socket: &Path, args: BuildArgs) -> Result<ExitCode> {
    let spec_file = match &args.spec {
        Some(path) => read_spec(path)?,
        None => SpecFile::default(),
    };
    let provisioner = args
        .provisioner
        .or(spec_file.provisioner.name)
        .unwrap_or_else(|| "shell".to_owned());
    if args.help_options {
        return help_options(socket, &provisioner);
    }
    let mut options = spec_file.provisioner.options;
    options.extend(args.options);
    let source = match (args.from, args.source) {
        (_, Some(id)) => Source::Snapshot(id),
        (Some(tag), None) => Source::Tag(tag),
        (None, None) => Source::Tag(Tag {
            key: "amidala".into(),
            value: "base".into(),
        }),
    };
    let spec = BuildSpec {
        source,
        provisioner,
        command: args.command,
        options,
        name: args.name,
        image_tags: args.tags,
        snapshot_tags: args.snapshot_tags,
        partition: args.partition,
        workspace_rw: args.workspace_rw,
        size: args.size,
        arch: args.arch,
        boot_mode: args.boot_mode,
        copy_to: args.copy_to,
        share_with: args.share_with,
        network: args.network,
        detach: args.detach,
        timeout: args.timeout,
        caches: args.caches,
    };
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
                    println!("{id}");
                    eprintln!("amidala: build {id} goes on; follow it with `amidala logs -f {id}`");
                    return Ok(ExitCode::SUCCESS);
                }
                eprintln!("amidala: build {id} accepted");
                *accepted.lock().expect("lock") = Some(id.clone());
                build_id = Some(id);
            }
            Ok(Response::Phase { phase }) => eprintln!("==> {phase}"),
            Ok(Response::Log { line }) => eprintln!("{line}"),
            Ok(Response::Finished(result)) => {
                if args.json {
                    print_json(&result)?;
                } else {
                    println!("{}", result.image_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Failed(failure)) => {
                if args.json {
                    print_json(&failure)?;
                }
                bail!(
                    "build {} failed in phase {}: {}",
                    failure.build_id,
                    failure.phase,
                    failure.message
                );
            }
            Ok(other) => return Err(unexpected(other).into()),
            Err(ClientError::Daemon(err)) => bail!("build refused ({}): {}", err.code, err.message),
            Err(ClientError::Closed) => {
                return Err(anyhow!(
                    "amidalad closed the connection before build {} ended",
                    build_id.as_deref().unwrap_or("(not yet accepted)")
                ))
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Blocks SIGINT in this thread (and so in those it starts) and waits for it in a thread of
/// its own: the first asks the daemon to cancel the build (once it is accepted; before, there
/// is nothing to wait for), the second exits at once (the closed connection cancels it too).
fn watch_interrupts(socket: PathBuf, accepted: Arc<Mutex<Option<String>>>) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGINT")?;
    std::thread::spawn(move || {
        let mut asked = false;
        while let Ok(Signal::SIGINT) = set.wait() {
            let id = accepted.lock().expect("lock").clone();
            match id {
                Some(id) if !asked => {
                    asked = true;
                    eprintln!("amidala: cancelling build {id} (Ctrl-C again to stop waiting for its teardown)");
                    let socket = socket.clone();
                    std::thread::spawn(move || {
                        match connect(&socket)
                            .and_then(|mut c| Ok(c.call(&Request::Cancel { id })?))
                        {
                            Ok(_) => {}
                            Err(e) => eprintln!("amidala: cancelling: {e:#}"),
                        }
                    });
                }
                _ => std::process::exit(130),
            }
        }
    });
    Ok(())
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
