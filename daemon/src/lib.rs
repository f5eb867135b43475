//! `amidalad`: the root-owned daemon of amidala. It alone mounts, chroots and makes images;
//! unprivileged `amidala` clients ask it over a Unix socket.
//!
//! - [`server`]: the socket, peer credentials, the protocol;
//! - [`build`]: a build's phases and their teardown;
//! - [`executor`]: the per-build process that owns the build's namespaces and mounts;
//! - [`provider`]: where snapshots, volumes and images live (local files and loop devices);
//! - [`import`]: base snapshots from directories, tarballs and disk images;
//! - [`catalog`], [`store`]: crash-safe records; [`disk`], [`loopdev`]: disks and devices;
//! - [`plugins`]: provisioner plugins.

pub mod bootcfg;
pub mod bootdisk;
pub mod bootparts;
pub mod bootvm;
pub mod build;
pub mod catalog;
pub mod cgroup;
pub mod claims;
pub mod config;
pub mod confine;
pub mod disk;
pub mod ec2;
pub mod error;
pub mod executor;
pub mod gc;
pub mod grow;
pub mod helper;
pub mod idmap;
pub mod idrange;
pub mod ids;
pub mod import;
pub mod importer;
pub mod loopdev;
pub mod pack;
pub mod plugins;
pub mod policy;
pub mod pool;
pub mod provider;
pub mod quota;
pub mod sandbox;
pub mod schedule;
pub mod server;
pub mod spawn;
pub mod store;
pub mod sys;
pub mod unpack;
pub mod workspace;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use amidala::proto::{BuildFailure, BuildState, ErrorCode, Response};
use anyhow::{bail, Context, Result};
use chrono::Utc;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::build::BuildHandle;
use crate::catalog::Catalog;
use crate::config::{Config, ProviderKind};
use crate::plugins::Plugins;
use crate::provider::{LocalProvider, Provider};

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub catalog: Catalog,
    pub provider: Arc<dyn Provider>,
    pub plugins: Plugins,
    /// Who may do what.
    pub policy: policy::Policy,
    /// Open connections, by uid.
    pub connections: Mutex<HashMap<u32, usize>>,
    /// Builds queued or running, by id.
    pub builds: Mutex<HashMap<String, Arc<BuildHandle>>>,
    /// The build slots and their fair queue.
    pub scheduler: Arc<schedule::Scheduler>,
    /// Cancelled on SIGTERM or SIGINT.
    pub shutdown: CancellationToken,
    /// Builds and imports, awaited on shutdown so their teardown completes.
    pub build_tasks: TaskTracker,
    /// Where builds' cgroups are made; `None` without a cgroup v2 hierarchy, where builds run
    /// without one and `--network no-metadata` is refused.
    pub cgroups: Option<cgroup::Hierarchy>,
    /// Base imports running now, and the space they claimed.
    pub imports: Arc<claims::Ledger>,
    /// Volumes made ahead of time (`[[warm_pool]]`).
    pub pool: pool::Pool,
    /// Whose host ids members' builds run as.
    pub id_ranges: idrange::IdRanges,
    /// The ids of `amidala boot-test` requests running now (gc leaves their instances alone).
    pub boot_tests: Mutex<std::collections::HashSet<String>>,
}

/// Drops, from every set of this (still single-threaded) process, the capabilities neither the
/// daemon nor any build needs: it keeps what a provisioner may keep
/// ([`confine::PROVISIONER_CAPS`], and `CAP_NET_RAW` if the policy grants it to builds) and
/// what the daemon and its executors use themselves ([`confine::DAEMON_CAPS`]). Threads and
/// processes started afterwards inherit the reduced sets. Returns what is kept.
pub fn drop_capabilities(net_raw: bool) -> Result<caps::CapsHashSet> {
    let mut keep: Vec<caps::Capability> = confine::Allowances {
        net_raw,
        user_namespaces: false,
    }
    .capabilities();
    keep.extend(confine::DAEMON_CAPS);
    confine::keep_only(&keep).map_err(anyhow::Error::msg)?;
    caps::read(None, caps::CapSet::Effective).context("reading capabilities")
}

/// Starts the daemon and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("amidalad must run as root: it mounts filesystems and sets up loop devices");
    }
    let catalog = Catalog::open(&config.state_dir)
        .with_context(|| format!("opening the state directory {}", config.state_dir.display()))?;
    let cgroups = match cgroup::Hierarchy::discover() {
        Ok(mut h) => {
            for why in h.prepare_limits() {
                tracing::warn!("builds are not limited by {why}");
            }
            let limiters: Vec<String> = h
                .limiters()
                .iter()
                .map(|l| match &l.v1_dir {
                    None => format!("{:?} (v2)", l.controller),
                    Some(dir) => format!("{:?} (v1, {})", l.controller, dir.display()),
                })
                .collect();
            tracing::info!(limiters = %limiters.join(", "), "build cgroups");
            Some(h)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup v2 hierarchy: builds run without a cgroup of their own, and --network no-metadata is refused");
            None
        }
    };
    let provider: Arc<dyn Provider> = match config.provider {
        ProviderKind::Local => Arc::new(LocalProvider::new(catalog.clone())),
        ProviderKind::Ec2 => Arc::new(
            ec2::Ec2Provider::new(&config.ec2, &config.state_dir)
                .await
                .context("starting the ec2 provider")?,
        ),
    };
    helper::init();
    let plugins = Plugins::load_dir(&config.plugin_dir);
    if plugins.names().is_empty() {
        tracing::warn!(dir = %config.plugin_dir.display(), "no provisioner plugin loaded: builds will be refused");
    }
    // Only one daemon per state directory: recovery would take another's builds for dead.
    let _lock = lock_state_dir(&config.state_dir)?;
    let (listener, activated) = listener(&config.socket)?;
    tracing::info!(
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        provider = provider.name(),
        max_builds = config.max_builds,
        plugins = ?plugins.names(),
        "amidalad ready"
    );
    let policy = policy::Policy::new(config.policy.clone());
    let pool = pool::Pool::new(&config.warm_pool).map_err(anyhow::Error::msg)?;
    // Ids of sandboxes and builds are no host user's or group's: whoever had one would own
    // what builds leave, and could signal and trace them.
    let files = idrange::host_id_files();
    let holders: Vec<String> = config
        .sandbox_ids()
        .into_iter()
        .flat_map(|ids| idrange::holders_in(ids, &files))
        .collect();
    if !holders.is_empty() {
        bail!(
            "host users or groups have ids of builds' or imports' sandboxes (build_id_base, \
             import_id_base): {}",
            holders.join(", ")
        );
    }
    let id_ranges = idrange::IdRanges::open(
        &config.state_dir,
        config.build_id_base,
        config.build_id_ranges,
    )
    .context("reading the id ranges of builds")?;
    let daemon = Arc::new(Daemon {
        scheduler: schedule::Scheduler::new(
            config.max_builds,
            config.limits.running_builds_per_user(config.max_builds),
        ),
        config,
        catalog,
        provider,
        plugins,
        policy,
        builds: Mutex::new(HashMap::new()),
        connections: Mutex::new(HashMap::new()),
        shutdown: CancellationToken::new(),
        build_tasks: TaskTracker::new(),
        cgroups,
        imports: Arc::new(claims::Ledger::default()),
        pool,
        id_ranges,
        boot_tests: Mutex::new(std::collections::HashSet::new()),
    });
    recover(&daemon)
        .await
        .context("recovering from the previous run")?;
    tracing::info!("serving");
    // Ready only now: the socket accepts, and recovery is over.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "telling systemd we are ready");
    }
    // The pool starts after recovery, which would take its volumes for leftovers.
    daemon.build_tasks.spawn(pool::run(daemon.clone()));

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = daemon.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(server::handle_connection(daemon.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            () = daemon.shutdown.cancelled() => break,
        }
    }

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Stop accepting, cancel what runs, let every teardown finish.
    drop(listener);
    // A socket systemd passed is systemd's: it stays, and the next connection starts us.
    if !activated {
        let _ = fs::remove_file(&daemon.config.socket);
    }
    let running: Vec<_> = daemon
        .builds
        .lock()
        .expect("builds lock")
        .values()
        .cloned()
        .collect();
    if !running.is_empty() {
        tracing::info!(
            builds = running.len(),
            "cancelling builds and waiting for their teardown"
        );
    }
    for handle in running {
        handle.cancel.cancel();
    }
    daemon.scheduler.close();
    daemon.build_tasks.close();
    daemon.build_tasks.wait().await;
    tracing::info!("amidalad stopped");
    Ok(())
}

/// Cleans up after a daemon that died, before serving: whatever still runs of its builds is
/// killed, their mounts, loop devices, boot tests' instances and volumes are removed (see
/// [`gc`]), an image registered for a boot test that did not pass (ec2) is deregistered,
/// snapshots they finished are kept but tagged as made by a failed build, and each build is
/// marked failed,
/// "interrupted by daemon restart". A step that fails is logged and recovery goes on: the
/// daemon serves, and `amidala gc` can finish the job.
async fn recover(daemon: &Daemon) -> Result<()> {
    let interrupted: Vec<_> = daemon
        .catalog
        .builds()
        .context("reading the catalog")?
        .into_iter()
        .filter(|r| !r.state.is_terminal())
        .collect();
    let scope = gc::Scope {
        failed_snapshots: false,
        dry_run: false,
    };
    match gc::collect(daemon, scope).await {
        Ok(items) if items.is_empty() => {}
        Ok(items) => tracing::warn!("recovery: {}", gc::describe(&items)),
        Err(e) => {
            tracing::error!(error = %e, "recovery: could not look for leftovers; run amidala gc")
        }
    }
    if interrupted.is_empty() {
        return Ok(());
    }
    // Finished work is kept: a snapshot an interrupted build made (but no image uses) is
    // tagged so that it is never taken as a source by tag, and gc may remove it.
    let snapshots = daemon.provider.list_snapshots().await;
    let mut images = daemon.provider.list_images().await;
    if let (Ok(snapshots), Ok(images)) = (&snapshots, &mut images) {
        // An image whose build did not end (its snapshot still marked as not yet a
        // successful build's, as every build's snapshot is until the build has registered
        // its image and passed its boot test) goes, as it would have had the build failed.
        let untested: Vec<String> = images
            .iter()
            .filter(|i| {
                let build = i.tags.get("amidala:build");
                build.is_some_and(|b| interrupted.iter().any(|r| &r.id == b))
                    && i.tags
                        .get(amidala::proto::BOOT_TEST_TAG)
                        .map(String::as_str)
                        != Some("passed")
                    && snapshots.iter().any(|s| {
                        s.id == i.snapshot_id && s.tags.get(provider::FAILED_BUILD_TAG) == build
                    })
            })
            .map(|i| i.id.clone())
            .collect();
        for id in untested {
            match daemon.provider.deregister_image(&id).await {
                Ok(()) => {
                    tracing::warn!(image = %id, "recovery: deregistered the image of an interrupted boot test");
                    images.retain(|i| i.id != id);
                }
                Err(e) => {
                    tracing::error!(image = %id, error = %e, "recovery: could not deregister the image of an interrupted boot test")
                }
            }
        }
    }
    match (snapshots, images) {
        (Ok(snapshots), Ok(images)) => {
            for record in &interrupted {
                for s in snapshots.iter().filter(|s| {
                    s.tags.get("amidala:build") == Some(&record.id)
                        && !s.tags.contains_key(provider::FAILED_BUILD_TAG)
                        && !images.iter().any(|i| i.snapshot_id == s.id)
                }) {
                    let tags = [(provider::FAILED_BUILD_TAG.to_owned(), record.id.clone())].into();
                    match daemon.provider.tag_snapshot(&s.id, &tags).await {
                        Ok(()) => {
                            tracing::warn!(build = %record.id, snapshot = %s.id, "recovery: kept the snapshot of an interrupted build")
                        }
                        Err(e) => {
                            tracing::error!(build = %record.id, snapshot = %s.id, error = %e, "recovery: could not tag a snapshot")
                        }
                    }
                }
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "recovery: could not list snapshots and images");
        }
    }
    for mut record in interrupted {
        tracing::warn!(build = %record.id, phase = ?record.phase, "marking a build interrupted by a daemon restart as failed");
        let failure = BuildFailure {
            build_id: record.id.clone(),
            phase: record.phase.unwrap_or(amidala::proto::Phase::Queued),
            code: ErrorCode::Internal,
            message: "interrupted by daemon restart".into(),
            exit_status: None,
        };
        // The log ends as a build's log does, for `amidala logs` to show.
        if let Ok(mut log) = fs::OpenOptions::new()
            .append(true)
            .open(daemon.catalog.build_log(&record.id))
        {
            let mut line =
                serde_json::to_vec(&Response::Failed(failure.clone())).expect("events serialize");
            line.push(b'\n');
            let _ = io::Write::write_all(&mut log, &line);
        }
        record.error = Some(failure);
        record.state = BuildState::Failed;
        record.finished = Some(Utc::now());
        record.volume_id = None;
        record.device = None;
        daemon
            .catalog
            .put_build(&record)
            .context("writing a build record")?;
    }
    Ok(())
}

/// Takes an exclusive lock on `state_dir/lock`, held as long as the returned file is open.
///
/// The state directory is root's alone (0700, see [`Catalog::open`]), so no one else can open
/// the lock file and hold a lock on it to keep the daemon from starting. A lock file that
/// someone else may have opened (one an older amidalad made readable by all, or not root's)
/// is replaced by a new one first: an old descriptor on the old file locks nothing.
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = state_dir.join("lock");
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() && meta.uid() == 0 && meta.mode() & 0o077 == 0 => {}
        Ok(meta) => {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o7777), uid = meta.uid(), "replacing a lock file others may have opened");
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!("another amidalad is using {} ({e})", state_dir.display())
    })
}

/// Binds the socket as `root:amidala 0660` (`root:root` where the group does not exist),
/// replacing a stale socket but never a live daemon's.
/// The socket to serve: the one systemd passed (socket activation: `LISTEN_PID` is ours and
/// `LISTEN_FDS` is 1), else our own, bound at `path`. Says which.
fn listener(path: &Path) -> Result<(UnixListener, bool)> {
    // Read, never unset: changing the environment of a running multi-threaded process is
    // unsound, and what the daemon starts gets an environment of its own anyway.
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: usize = match std::env::var("LISTEN_FDS") {
        Ok(n) if ours => n
            .parse()
            .with_context(|| format!("LISTEN_FDS={n} is not a number"))?,
        _ => 0,
    };
    let fd = match count {
        0 => return Ok((bind_socket(path)?, false)),
        // SD_LISTEN_FDS_START
        1 => 3,
        more => {
            bail!("systemd passed {more} sockets; amidalad serves one (a single ListenStream=)")
        }
    };
    // SAFETY: systemd passed this descriptor to this process for it to own; nothing else here
    // knows of it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // Never inherited by what the daemon starts.
    nix::fcntl::fcntl(
        owned.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("setting close-on-exec on the socket systemd passed")?;
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .context("the descriptor systemd passed is not a socket")?;
    let kind = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::SockType)
        .context("the descriptor systemd passed is not a socket")?;
    let std_listener = std::os::unix::net::UnixListener::from(owned);
    let local = std_listener
        .local_addr()
        .context("the socket systemd passed is not a Unix socket")?;
    if !listening || kind != nix::sys::socket::SockType::Stream {
        bail!("the socket systemd passed is not a listening stream socket (ListenStream=)");
    }
    std_listener.set_nonblocking(true)?;
    tracing::info!(socket = ?local.as_pathname(), "serving the socket systemd passed");
    Ok((UnixListener::from_std(std_listener)?, true))
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another amidalad is already listening on {}",
                    path.display()
                );
            }
            fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    }
    // Created 0660 from the start: no window in which others could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("binding {}", path.display()))?;
    let group = nix::unistd::Group::from_name("amidala").ok().flatten();
    if let Some(group) = &group {
        nix::unistd::chown(path, Some(0.into()), Some(group.gid))
            .with_context(|| format!("giving {} to group amidala", path.display()))?;
    } else {
        tracing::warn!("group amidala does not exist: only root can use the socket");
    }
    Ok(listener)
}
