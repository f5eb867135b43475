//! One build, phase by phase: resolve → volume → attach → mount → provision → unmount →
//! detach → snapshot → register → cleanup. A failure in any phase tears down what the earlier
//! ones made, in reverse; the volume is always deleted.
//!
//! Every event of a build (phase, output line, result) is appended to its log file, which is
//! what the client that started the build and any `amidala logs -f` follow. The build never
//! waits for a client, however slow.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amidala::proto::{
    BootTestSpec, BuildFailure, BuildResult, BuildState, ErrorCode, Phase, Response, BOOT_ARCH_TAG,
    BOOT_TAG, BOOT_TEST_DETAIL_TAG, BOOT_TEST_TAG, OWNER_TAG, OWNER_UID_TAG,
};
use amidala_plugin::BuildInfo as PluginBuildInfo;
use chrono::Utc;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalog::{BuildRecord, Catalog, ImageRecord, SnapshotRecord};
use crate::ec2::wait::{cancellable, counted};
use crate::error::{blocking, Failure};
use crate::executor::{CacheMount, ExecutorSpec, Outcome, Report, EXECUTOR_ARG, WORKSPACE_FD};
use crate::provider::{Attachment, ImageMeta, SnapshotMeta, Volume, FAILED_BUILD_TAG};
use crate::Daemon;

/// How long the provisioner's last output may take to be read once it has ended.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Longest line of provisioner output kept as one log line; longer ones are split.
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// Where the provisioner finds the user's build directory.
pub const WORKSPACE: &str = "/workspace";

/// How far a build's log has been written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogProgress {
    pub len: u64,
    pub done: bool,
}

/// A build's event log: JSON lines of [`Response`] events, appended whole.
///
/// The provisioner's output is kept up to `limit` bytes of log (`[limits] build_log`); past it
/// its lines are dropped, once with a line that says so, and the build goes on. Phases and the
/// build's end are always written: they are few and small.
#[derive(Debug)]
pub struct EventLog {
    file: Mutex<LogFile>,
    progress: watch::Sender<LogProgress>,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    len: u64,
    limit: u64,
    /// Whether output has been dropped (and the line saying so written).
    full: bool,
}

impl EventLog {
    pub fn create(path: &Path, limit: u64) -> std::io::Result<EventLog> {
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        Ok(EventLog {
            file: Mutex::new(LogFile {
                file,
                len: 0,
                limit,
                full: false,
            }),
            progress: watch::Sender::new(LogProgress {
                len: 0,
                done: false,
            }),
        })
    }

    pub fn append(&self, event: &Response) {
        let line = |event: &Response| {
            let mut line = serde_json::to_vec(event).expect("events serialize");
            line.push(b'\n');
            line
        };
        let mut bytes = line(event);
        let mut log = self.file.lock().expect("log lock");
        if matches!(event, Response::Log { .. }) && log.len + bytes.len() as u64 > log.limit {
            if log.full {
                return;
            }
            log.full = true;
            bytes = line(&Response::Log {
                line: format!(
                    "amidala: the build's output passed {} of log ([limits] build_log): the \
                     rest is not kept; the build goes on",
                    size_text(log.limit)
                ),
            });
        }
        match log.file.write_all(&bytes) {
            Ok(()) => {
                log.len += bytes.len() as u64;
                let len = log.len;
                self.progress.send_modify(|p| p.len = len);
            }
            Err(e) => tracing::error!(error = %e, "writing a build log"),
        }
    }

    pub fn finish(&self) {
        let guard = self.file.lock().expect("log lock");
        let _ = guard.file.sync_data();
        self.progress.send_modify(|p| p.done = true);
    }

    pub fn subscribe(&self) -> watch::Receiver<LogProgress> {
        self.progress.subscribe()
    }
}

/// `bytes` for people: in MiB, or KiB below one.
fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// A build the daemon is running (or has queued).
#[derive(Debug)]
pub struct BuildHandle {
    pub id: String,
    pub owner_uid: u32,
    /// The primary group of the client that asked for the build (not recorded: only a running
    /// build needs it, for its workspace).
    pub owner_gid: u32,
    /// Whose snapshots its source may be: the owner's role when they asked.
    pub viewer: crate::provider::Viewer,
    /// The size of its volume, once it has one (its owner's quota counts it).
    volume_bytes: AtomicU64,
    pub cancel: CancellationToken,
    pub log: EventLog,
    record: Mutex<BuildRecord>,
    /// The record on disk; its lock is taken with `record`'s held, so that the journal gets
    /// the changes in their order.
    journal: Mutex<crate::store::Journal>,
    catalog: Catalog,
}

type PhaseResult<T> = Result<T, (Phase, Failure)>;

trait At<T> {
    fn at(self, phase: Phase) -> PhaseResult<T>;
}

impl<T> At<T> for Result<T, Failure> {
    fn at(self, phase: Phase) -> PhaseResult<T> {
        self.map_err(|f| (phase, f))
    }
}

impl BuildHandle {
    /// Registers a new build: its record and its log exist before it is acknowledged.
    pub fn create(
        catalog: &Catalog,
        record: BuildRecord,
        owner_gid: u32,
        viewer: crate::provider::Viewer,
        log_limit: u64,
    ) -> Result<BuildHandle, Failure> {
        let state_error = |what: &str, e: std::io::Error| {
            let full = e.raw_os_error() == Some(libc::ENOSPC);
            Failure::io(
                format!("{what} in {}", catalog.root().display()),
                if full {
                    format!("{e}: the state directory is full")
                } else {
                    e.to_string()
                },
            )
        };
        let log_path = catalog.build_log(&record.id);
        let log = EventLog::create(&log_path, log_limit)
            .map_err(|e| state_error("creating the build log", e))?;
        let journal = match catalog.create_build_journal(&record) {
            Ok(journal) => journal,
            Err(e) => {
                let _ = std::fs::remove_file(&log_path);
                return Err(state_error("writing the build record", e));
            }
        };
        Ok(BuildHandle {
            id: record.id.clone(),
            owner_uid: record.owner_uid,
            owner_gid,
            viewer,
            volume_bytes: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            log,
            record: Mutex::new(record),
            journal: Mutex::new(journal),
            catalog: catalog.clone(),
        })
    }

    /// The bytes of its volume (0 before it has one).
    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes.load(Ordering::Relaxed)
    }

    pub fn record(&self) -> BuildRecord {
        self.record.lock().expect("record lock").clone()
    }

    /// Changes the record and writes it (the build's journal); a failure to write is logged.
    fn update(&self, f: impl FnOnce(&mut BuildRecord)) {
        let _ = self.try_update(f);
    }

    /// Like [`update`](Self::update), returning the failure.
    fn try_update(&self, f: impl FnOnce(&mut BuildRecord)) -> std::io::Result<()> {
        let mut record = self.record.lock().expect("record lock");
        f(&mut record);
        let mut journal = self.journal.lock().expect("journal lock");
        journal.write(&*record).inspect_err(|e| {
            tracing::error!(build = %self.id, error = %e, "writing the build record");
        })
    }

    /// Enters a phase that does new work: refused once the build is cancelled.
    fn enter(&self, phase: Phase) -> PhaseResult<()> {
        if self.cancel.is_cancelled() {
            return Err((phase, Failure::new(ErrorCode::Cancelled, "build cancelled")));
        }
        // New work only with its journal written: what it will hold must be findable after
        // a crash.
        self.try_update(|r| r.phase = Some(phase)).map_err(|e| {
            (
                phase,
                Failure::io(
                    format!(
                        "recording the {phase} phase in {}",
                        self.catalog.root().display()
                    ),
                    e,
                ),
            )
        })?;
        tracing::info!(build = %self.id, %phase, "phase");
        self.log.append(&Response::Phase { phase });
        Ok(())
    }

    /// Enters a phase that undoes work (or one the executor reports): runs whatever happened
    /// before. Recorded as [`progress`](Self::progress).
    fn enter_teardown(&self, phase: Phase) {
        tracing::info!(build = %self.id, %phase, "phase");
        self.progress(|r| r.phase = Some(phase));
        self.log.append(&Response::Phase { phase });
    }

    /// Changes the record in memory only, where `status` and `list` read a live build; it
    /// reaches the disk with the next journal write. What recovery does not need: it finds a
    /// build's volume, devices, mounts, processes and snapshots by their names and tags,
    /// whatever the record says. What it needs (the build exists and is not finished; which
    /// phase that makes something it entered; how it ended) is written and synced at once.
    fn progress(&self, f: impl FnOnce(&mut BuildRecord)) {
        f(&mut self.record.lock().expect("record lock"));
    }

    pub fn note(&self, line: impl Into<String>) {
        self.log.append(&Response::Log { line: line.into() });
    }
}

fn cancel_message(daemon: &Daemon) -> &'static str {
    if daemon.shutdown.is_cancelled() {
        "build cancelled: amidalad is shutting down"
    } else {
        "build cancelled"
    }
}

/// Runs a build to its end, recording the result; never fails itself.
pub async fn run(daemon: Arc<Daemon>, handle: Arc<BuildHandle>, workspace: OwnedFd) {
    let outcome = async {
        let _slot = tokio::select! {
            slot = daemon.scheduler.acquire(handle.owner_uid) => slot.map_err(|_| (Phase::Queued, Failure::new(ErrorCode::ShuttingDown, "amidalad is shutting down")))?,
            () = handle.cancel.cancelled() => return Err((Phase::Queued, Failure::new(ErrorCode::Cancelled, cancel_message(&daemon)))),
        };
        handle.progress(|r| r.state = BuildState::Running);
        execute(&daemon, &handle, workspace).await
    };
    let calls = Arc::new(AtomicU64::new(0));
    let outcome = counted(calls.clone(), outcome).await;
    let calls = calls.load(Ordering::Relaxed);
    if calls > 0 {
        handle.note(format!("amidala: {calls} EC2 requests"));
    }
    let finished = Utc::now();
    match outcome {
        Ok(result) => {
            tracing::info!(build = %handle.id, image = %result.image_id, "build succeeded");
            handle.update(|r| {
                r.state = BuildState::Succeeded;
                r.phase = None;
                r.finished = Some(finished);
                r.image_id = Some(result.image_id.clone());
                r.snapshot_id = Some(result.snapshot_id.clone());
                r.volume_id = None;
                r.device = None;
            });
            handle.log.append(&Response::Finished(result));
        }
        Err((phase, mut failure)) => {
            if failure.code == ErrorCode::Cancelled {
                failure.message = cancel_message(&daemon).to_owned();
            }
            tracing::warn!(build = %handle.id, %phase, code = %failure.code, error = ?failure.message, "build failed");
            let report = BuildFailure {
                build_id: handle.id.clone(),
                phase,
                code: failure.code,
                message: failure.message,
                exit_status: failure.exit_status,
            };
            handle.update(|r| {
                r.state = if report.code == ErrorCode::Cancelled {
                    BuildState::Cancelled
                } else {
                    BuildState::Failed
                };
                r.phase = Some(phase);
                r.finished = Some(finished);
                r.error = Some(report.clone());
                r.volume_id = None;
                r.device = None;
            });
            handle.log.append(&Response::Failed(report));
        }
    }
    handle.log.finish();
    // Its snapshot may be the newest with a tag the warm pool serves.
    daemon.pool.wake();
    daemon
        .builds
        .lock()
        .expect("builds lock")
        .remove(&handle.id);
}

async fn execute(
    daemon: &Daemon,
    handle: &BuildHandle,
    workspace: OwnedFd,
) -> PhaseResult<BuildResult> {
    let provider = &daemon.provider;
    let record = handle.record();
    let spec = &record.spec;
    handle.enter(Phase::Resolve)?;
    let source = provider
        .resolve(&spec.source, handle.viewer)
        .await
        .at(Phase::Resolve)?;
    // A name the image cannot have is said now, not after the provisioner and the snapshot.
    let name = image_name(spec.name.as_deref(), &handle.id, &record.created)
        .map_err(|e| Failure::invalid(format!("--name: {e}")))
        .at(Phase::Resolve)?;
    if let Some(taken) = provider.image_named(&name).await.at(Phase::Resolve)? {
        return Err((
            Phase::Resolve,
            Failure::invalid(format!(
                "--name: image {taken} is named {name:?} already, and the {} provider's image \
                 names are unique (EC2's in each region and account): put {{build}} or {{time}} \
                 in the name",
                provider.name()
            )),
        ));
    }
    handle.note(format!(
        "amidala: starting from {} ({})",
        source.id,
        amidala::proto::whose(&source.tags)
    ));
    handle.progress(|r| r.source_snapshot = Some(source.id.clone()));
    if let Some(test) = &spec.boot_test {
        if let Some(list) = &test.firmware {
            // An arm64 image boots with UEFI only: said now, not after the build.
            let firmware = crate::bootvm::Firmware::parse_list(list).map_err(Failure::invalid);
            crate::bootvm::arch_of(&source.tags)
                .and_then(|arch| crate::bootvm::check_firmware(arch, &firmware?))
                .map_err(|e| (Phase::Resolve, e))?;
        }
        if test.firmware.is_none() && source.tags.get(BOOT_TAG).map(String::as_str) == Some("none")
        {
            return Err((
                Phase::Resolve,
                Failure::invalid(format!(
                    "--boot-test: {} cannot boot: it was imported from a tree without a kernel \
                     (amidala:boot = none); import a tree with a kernel and an initramfs",
                    source.id
                )),
            ));
        }
    }

    handle.enter(Phase::Volume)?;
    // Within its owner's quota, the volume counted as the owner's until the build ends (its
    // snapshot then).
    let bytes = provider.volume_size(source.size, spec.size);
    crate::quota::check(daemon, handle.viewer, bytes, "the build's volume")
        .await
        .at(Phase::Volume)?;
    handle
        .volume_bytes
        .store(bytes, std::sync::atomic::Ordering::Relaxed);
    // A volume of the warm pool, if one is of this snapshot and the size is the snapshot's.
    let warm = spec
        .size
        .is_none()
        .then(|| daemon.pool.take(&source.id, spec.partition))
        .flatten();
    // The pool's hold on the volume lasts as long as the build: gc may have listed it under
    // its pool name, and must not take it for a leftover before the build ends.
    let _held = warm.as_ref().map(|w| PoolHold(daemon, w.holder.clone()));
    let (volume, attached) = match warm {
        Some(warm) => {
            let (volume, attachment) = adopt(daemon, handle, warm).await.at(Phase::Volume)?;
            (volume, Some(attachment))
        }
        None => {
            let volume = cancellable(
                handle.cancel.clone(),
                provider.create_volume(
                    &source,
                    spec.size,
                    &handle.id,
                    &owner_name(handle.owner_uid),
                ),
            )
            .await
            .at(Phase::Volume)?;
            (volume, None)
        }
    };
    handle.progress(|r| r.volume_id = Some(volume.id.clone()));

    // A build changes the image's files, not its disk's layout: it boots as its source did.
    let source_boot: BTreeMap<String, String> = [BOOT_TAG, BOOT_ARCH_TAG]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), source.tags.get(key)?.clone())))
        .collect();
    let result = with_volume(
        daemon,
        handle,
        &source.id,
        source_boot,
        &volume,
        attached,
        workspace,
    )
    .await;

    handle.enter_teardown(Phase::Cleanup);
    let volume_id = volume.id.clone();
    let cleaned = provider.delete_volume(volume).await.at(Phase::Cleanup);
    if cleaned.is_ok() {
        handle.note(format!("amidala: deleted volume {volume_id}"));
    }
    let result = result?;
    cleaned?;
    Ok(result)
}

/// Ends the warm pool's hold on a volume it gave a build.
struct PoolHold<'a>(&'a Daemon, String);

impl Drop for PoolHold<'_> {
    fn drop(&mut self) {
        self.0.pool.forget(&self.1);
    }
}

/// Makes a warm pool volume the build's; on failure, removes it.
async fn adopt(
    daemon: &Daemon,
    handle: &BuildHandle,
    warm: crate::pool::Warm,
) -> Result<(Volume, Attachment), Failure> {
    let provider = &daemon.provider;
    let id = warm.volume.id.clone();
    match provider
        .adopt_volume(
            warm.volume.clone(),
            &handle.id,
            &owner_name(handle.owner_uid),
        )
        .await
    {
        Ok(volume) => {
            handle.note(format!(
                "amidala: volume {} from the warm pool, attached",
                volume.id
            ));
            Ok((volume, warm.attachment))
        }
        Err(e) => {
            if let Err(undo) = warm.remove(provider.as_ref()).await {
                tracing::error!(volume = %id, error = %undo, "removing a pool volume that could not be adopted");
            }
            Err(e)
        }
    }
}

async fn with_volume(
    daemon: &Daemon,
    handle: &BuildHandle,
    source: &str,
    source_boot: BTreeMap<String, String>,
    volume: &Volume,
    attached: Option<Attachment>,
    workspace: OwnedFd,
) -> PhaseResult<BuildResult> {
    let provider = &daemon.provider;
    let record = handle.record();
    let spec = &record.spec;
    if let Err(e) = handle.enter(Phase::Attach) {
        if let Some(attachment) = attached {
            let _ = provider.detach(volume, attachment).await;
        }
        return Err(e);
    }
    let attachment = match attached {
        Some(attachment) => attachment,
        None => cancellable(
            handle.cancel.clone(),
            provider.attach(volume, spec.partition),
        )
        .await
        .at(Phase::Attach)?,
    };
    handle.progress(|r| r.device = Some(attachment.device.display().to_string()));
    if let Some(grown) = &attachment.grown {
        handle.note(grown.clone());
    }
    if let Some(n) = attachment.partition {
        handle.note(format!(
            "amidala: root filesystem ({}) on partition {n}",
            attachment.fs.kernel_name()
        ));
    }

    let provisioned = match grow_ext4(daemon, handle, &attachment).await {
        Ok(()) => match copy_boot_partitions(daemon, handle, &attachment).await {
            Ok(copies) => {
                let provisioned =
                    provision(daemon, handle, &attachment, source, workspace, &copies).await;
                match provisioned {
                    Ok(arch) => write_boot_copies_back(daemon, handle, &copies)
                        .await
                        .map(|()| arch),
                    Err(e) => Err(e),
                }
                // The copies' tmpfs unmounted here (dropped), before the volume is detached.
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };

    handle.enter_teardown(Phase::Detach);
    let device = attachment.device.display().to_string();
    let detached = provider.detach(volume, attachment).await.at(Phase::Detach);
    if detached.is_ok() {
        handle.note(format!("amidala: detached volume {} ({device})", volume.id));
    }
    handle.progress(|r| r.device = None);
    let detected_arch = provisioned?;
    detached?;

    let owner = owner_name(handle.owner_uid);
    let mut snapshot_tags: BTreeMap<String, String> = spec
        .snapshot_tags
        .iter()
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    snapshot_tags.insert("amidala:build".into(), handle.id.clone());
    snapshot_tags.insert("amidala:source-snapshot".into(), source.to_owned());
    snapshot_tags.insert(OWNER_TAG.into(), owner.clone());
    snapshot_tags.insert(OWNER_UID_TAG.into(), handle.owner_uid.to_string());
    snapshot_tags.insert("amidala:provisioner".into(), spec.provisioner.clone());
    snapshot_tags.extend(source_boot.clone());
    // The snapshot is made with its tags (EC2 tags it as it makes it), so it is marked as not
    // yet a successful build's from the start, and taken by no build as a source by those tags
    // until this build has registered its image (and passed its boot test) and unmarked it.
    snapshot_tags.insert(FAILED_BUILD_TAG.into(), handle.id.clone());
    handle.enter(Phase::Snapshot)?;
    let meta = SnapshotMeta {
        tags: snapshot_tags,
        owner_uid: handle.owner_uid,
        build_id: Some(handle.id.clone()),
        source_snapshot: Some(source.to_owned()),
        description: format!("amidala build {} from {source}", handle.id),
    };
    let snapshot = cancellable(handle.cancel.clone(), provider.snapshot(volume, meta))
        .await
        .at(Phase::Snapshot)?;
    handle.progress(|r| r.snapshot_id = Some(snapshot.id.clone()));

    let mut image_tags = source_boot.clone();
    let registered = match &spec.boot_test {
        // Ec2: the image must exist to boot.
        Some(test) if provider.boots_images() => {
            boot_registered(
                daemon,
                handle,
                &record,
                &snapshot,
                source,
                detected_arch,
                image_tags,
                test,
            )
            .await
        }
        boot_test_asked => {
            let tested = match boot_test_asked {
                Some(test) => boot_test(daemon, handle, &snapshot, &source_boot, test)
                    .await
                    .map(|detail| {
                        image_tags.insert(BOOT_TEST_TAG.to_owned(), "passed".to_owned());
                        image_tags.insert(BOOT_TEST_DETAIL_TAG.to_owned(), detail);
                    })
                    .map_err(|(phase, f)| (phase, kept_snapshot(f, &snapshot.id))),
                None => Ok(()),
            };
            match tested {
                Ok(()) => {
                    let image = register(
                        daemon,
                        handle,
                        &record,
                        &snapshot,
                        source,
                        detected_arch,
                        image_tags,
                        true,
                    )
                    .await?;
                    // The build has succeeded: its snapshot is a source from now on.
                    match provider
                        .untag_snapshot(&snapshot.id, FAILED_BUILD_TAG)
                        .await
                    {
                        Ok(()) => Ok(image),
                        Err(f) => Err((
                            Phase::Register,
                            undo_image(daemon, handle, &image.id, &snapshot.id, f).await,
                        )),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    if registered.is_err() {
        // Kept, but never to be taken as the source of a build by its tags (marked from its
        // creation; again, in case a failure came after the mark was taken off).
        let tags = [(FAILED_BUILD_TAG.to_owned(), handle.id.clone())].into();
        if let Err(e) = provider.tag_snapshot(&snapshot.id, &tags).await {
            tracing::error!(build = %handle.id, snapshot = %snapshot.id, error = %e, "tagging the snapshot of a failed build");
        }
    }
    let image = registered?;
    Ok(BuildResult {
        build_id: handle.id.clone(),
        image_id: image.id,
        snapshot_path: provider
            .snapshot_path(&snapshot.id)
            .map(|p| p.display().to_string()),
        snapshot_id: snapshot.id,
    })
}

/// `publish`: shared and copied now (else later, once a boot test of the image passed).
#[allow(clippy::too_many_arguments)]
async fn register(
    daemon: &Daemon,
    handle: &BuildHandle,
    record: &BuildRecord,
    snapshot: &SnapshotRecord,
    source: &str,
    detected_arch: Option<String>,
    amidala_tags: BTreeMap<String, String>,
    publish: bool,
) -> PhaseResult<ImageRecord> {
    let provider = &daemon.provider;
    let spec = &record.spec;
    let owner = owner_name(handle.owner_uid);
    let mut image_tags: BTreeMap<String, String> = spec
        .image_tags
        .iter()
        .map(|t| (t.key.clone(), t.value.clone()))
        .collect();
    image_tags.extend(amidala_tags);
    image_tags.insert("amidala:build".into(), handle.id.clone());
    image_tags.insert(OWNER_TAG.into(), owner);
    image_tags.insert(OWNER_UID_TAG.into(), handle.owner_uid.to_string());
    handle
        .enter(Phase::Register)
        .map_err(|(phase, f)| (phase, kept_snapshot(f, &snapshot.id)))?;
    let meta = ImageMeta {
        name: image_name(spec.name.as_deref(), &handle.id, &record.created)
            .map_err(|e| (Phase::Register, Failure::from(e)))?,
        description: format!("amidala build {} from {source}", handle.id),
        tags: image_tags,
        owner_uid: handle.owner_uid,
        build_id: Some(handle.id.clone()),
        architecture: spec.arch.clone().or(detected_arch),
        boot_mode: spec.boot_mode.clone(),
        // Shared and copied only once it booted, where the test comes after registering.
        copy_to: if publish {
            spec.copy_to.clone()
        } else {
            Vec::new()
        },
        share_with: if publish {
            spec.share_with.clone()
        } else {
            Vec::new()
        },
    };
    cancellable(handle.cancel.clone(), provider.register(snapshot, meta))
        .await
        .map_err(|f| kept_snapshot(f, &snapshot.id))
        .at(Phase::Register)
}

/// The boot test of a build's snapshot: each firmware asked for (else each the image was made
/// for) boots it in turn. Returns what the image's detail tag says: firmware, time, accelerator.
async fn boot_test(
    daemon: &Daemon,
    handle: &BuildHandle,
    snapshot: &SnapshotRecord,
    boot: &BTreeMap<String, String>,
    test: &BootTestSpec,
) -> PhaseResult<String> {
    handle.enter(Phase::BootTest)?;
    let arch = crate::bootvm::arch_of(boot).at(Phase::BootTest)?;
    let image = daemon
        .provider
        .snapshot_path(&snapshot.id)
        .ok_or_else(|| {
            Failure::invalid(format!(
                "the {} provider cannot boot-test images yet",
                daemon.provider.name()
            ))
        })
        .at(Phase::BootTest)?;
    let console = |line: String| handle.note(line);
    let passed = tokio::select! {
        passed = crate::bootvm::boot_all(
            daemon,
            handle.owner_uid,
            &image,
            boot.get(BOOT_TAG).map(String::as_str),
            arch,
            test,
            &console,
        ) => passed,
        () = handle.cancel.cancelled() => Err(Failure::new(ErrorCode::Cancelled, "build cancelled")),
    }
    .at(Phase::BootTest)?;
    Ok(crate::bootvm::detail(&passed))
}

/// The boot test of a provider that boots registered images (ec2): the snapshot marked as a
/// failed build's while it is tested, the image registered (not shared or copied yet), booted;
/// passed, the image is tagged so, shared and copied, and the snapshot's mark removed; failed,
/// the image is deregistered and the snapshot kept, marked.
#[allow(clippy::too_many_arguments)]
async fn boot_registered(
    daemon: &Daemon,
    handle: &BuildHandle,
    record: &BuildRecord,
    snapshot: &SnapshotRecord,
    source: &str,
    detected_arch: Option<String>,
    image_tags: BTreeMap<String, String>,
    test: &BootTestSpec,
) -> PhaseResult<ImageRecord> {
    let provider = &daemon.provider;
    // The snapshot is not a source for a build by its tags until the image booted (marked
    // since its creation).
    let mut image = register(
        daemon,
        handle,
        record,
        snapshot,
        source,
        detected_arch,
        image_tags,
        false,
    )
    .await?;
    handle.note(format!(
        "amidala: registered image {} to boot-test it",
        image.id
    ));
    let console = |line: String| handle.note(line);
    let tested = async {
        handle.enter(Phase::BootTest)?;
        let detail = provider
            .boot_image(crate::provider::BootJob {
                image_id: &image.id,
                job_id: &handle.id,
                owner: &owner_name(handle.owner_uid),
                test,
                default_timeout: daemon.config.boot_test.timeout,
                cancel: &handle.cancel,
                console: &console,
            })
            .await
            .at(Phase::BootTest)?;
        let tags: BTreeMap<String, String> = [
            (BOOT_TEST_TAG.to_owned(), "passed".to_owned()),
            (BOOT_TEST_DETAIL_TAG.to_owned(), detail),
        ]
        .into();
        provider
            .tag_image(&image.id, &tags)
            .await
            .at(Phase::BootTest)?;
        image.tags.extend(tags);
        provider
            .untag_snapshot(&snapshot.id, FAILED_BUILD_TAG)
            .await
            .at(Phase::BootTest)?;
        let spec = &record.spec;
        provider
            .publish_image(
                &image,
                &format!("amidala build {} from {source}", handle.id),
                &spec.copy_to,
                &spec.share_with,
            )
            .await
            .at(Phase::Register)
    }
    .await;
    match tested {
        Ok(()) => Ok(image),
        Err((phase, failure)) => Err((
            phase,
            undo_image(daemon, handle, &image.id, &snapshot.id, failure).await,
        )),
    }
}

/// After `failure` of a build whose image `image` was registered: the image deregistered (or
/// the failure says it could not be, and how to remove it); the snapshot is kept, marked.
async fn undo_image(
    daemon: &Daemon,
    handle: &BuildHandle,
    image: &str,
    snapshot: &str,
    mut failure: Failure,
) -> Failure {
    failure.message = match daemon.provider.deregister_image(image).await {
        Ok(()) => {
            handle.note(format!("amidala: deregistered image {image}"));
            format!(
                "{} (image {image} was deregistered; snapshot {snapshot} is kept, tagged \
                 {FAILED_BUILD_TAG})",
                failure.message
            )
        }
        Err(e) => {
            tracing::error!(build = %handle.id, image = %image, error = %e, "deregistering the image of a failed build");
            format!(
                "{} (image {image} could NOT be deregistered: {}; `amidala delete {image}` \
                 removes it; snapshot {snapshot} is kept, tagged {FAILED_BUILD_TAG})",
                failure.message, e.message
            )
        }
    };
    failure
}

fn kept_snapshot(mut failure: Failure, snapshot: &str) -> Failure {
    failure.message = format!(
        "{} (snapshot {snapshot} was made and is kept)",
        failure.message
    );
    failure
}

/// The image name: `requested` (a template, see [`expand_image_name`]) or `amidala-{build}`,
/// with dates and times of `created`, the build's creation.
pub fn image_name(
    requested: Option<&str>,
    build_id: &str,
    created: &chrono::DateTime<Utc>,
) -> Result<String, amidala::proto::ValidationError> {
    let date = created.format("%Y-%m-%d").to_string();
    let time = created.format("%H%M%S").to_string();
    amidala::proto::expand_image_name(
        requested.unwrap_or("amidala-{build}"),
        build_id,
        &date,
        &time,
    )
}

/// The user name of `uid`, or the number if it has none.
pub fn owner_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// What the provisioner is told about its build.
pub fn plugin_build_info(record: &BuildRecord, source_snapshot: &str) -> PluginBuildInfo {
    PluginBuildInfo {
        build_id: record.id.clone(),
        source_snapshot: source_snapshot.to_owned(),
        image_name: image_name(record.spec.name.as_deref(), &record.id, &record.created)
            .unwrap_or_else(|_| format!("amidala-{}", record.id)),
        workspace: WORKSPACE.to_owned(),
        command: record.spec.command.clone(),
        options: record.spec.options.clone(),
    }
}

/// The mount, provision and unmount phases, carried out by an executor process. Returns the
/// architecture of the image's /bin/sh, if it could be read.
async fn provision(
    daemon: &Daemon,
    handle: &BuildHandle,
    attachment: &Attachment,
    source: &str,
    workspace: OwnedFd,
    copies: &[crate::bootparts::Copy],
) -> PhaseResult<Option<String>> {
    let record = handle.record();
    let plugin = daemon
        .plugins
        .get(&record.spec.provisioner)
        .ok_or_else(|| {
            (
                Phase::Mount,
                Failure::new(
                    ErrorCode::UnknownProvisioner,
                    format!(
                        "provisioner {} is no longer loaded",
                        record.spec.provisioner
                    ),
                ),
            )
        })?;
    let mount_dir = daemon.catalog.mount_dir(&handle.id);
    std::fs::create_dir(&mount_dir).map_err(|e| {
        (
            Phase::Mount,
            Failure::io(format!("creating {}", mount_dir.display()), e),
        )
    })?;
    let caches = cache_mounts(daemon, handle.owner_uid, &record.spec.caches)
        .map_err(|f| (Phase::Mount, f))?;
    let id_base = match handle.owner_uid {
        0 => None,
        // A small file written once per member, at their first build.
        uid => Some(
            daemon
                .id_ranges
                .base_of(uid)
                .map_err(|f| (Phase::Mount, f))?,
        ),
    };
    let spec = ExecutorSpec {
        caches,
        device: attachment.device.clone(),
        fs_type: attachment.fs.kernel_name().to_owned(),
        mount_dir: mount_dir.clone(),
        workspace_rw: record.spec.workspace_rw,
        owner: crate::executor::Owner {
            uid: handle.owner_uid,
            gid: handle.owner_gid,
        },
        isolate_network: record.spec.network.as_deref() == Some("none"),
        allow: crate::confine::Allowances {
            // A packet socket would send frames past the cgroup filter of no-metadata.
            net_raw: daemon.config.policy.net_raw
                && record.spec.network.as_deref() != Some("no-metadata"),
            user_namespaces: daemon.config.policy.user_namespaces,
        },
        plugin_path: plugin.path.clone(),
        build: plugin_build_info(&record, source),
        resolv_conf: std::fs::read("/etc/resolv.conf")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        // A member's provisioner is root of its own user namespace, not of the host, with
        // host ids of that member's alone (see crate::idrange).
        id_base,
        boot_partitions: attachment
            .others
            .iter()
            .map(|other| {
                let mut part = other.part.clone();
                part.copy = copies
                    .iter()
                    .find(|c| c.number == part.number)
                    .map(|c| c.dir.clone());
                part
            })
            .collect(),
    };
    let result = in_cgroup(daemon, handle, &spec, workspace).await;
    // Only ever mounted inside the executor's namespace, which is gone: a plain rmdir, never
    // a recursive removal.
    if let Err(e) = std::fs::remove_dir(&mount_dir) {
        tracing::warn!(dir = %mount_dir.display(), error = %e, "removing the mount point");
    }
    result
}

/// The host directories of the caches a build asked for, made if missing:
/// `state/caches/<uid>/<name>`, each user's apart (`caches/` and `caches/<uid>` root-only).
fn cache_mounts(daemon: &Daemon, uid: u32, names: &[String]) -> Result<Vec<CacheMount>, Failure> {
    use std::os::unix::fs::DirBuilderExt;
    let mut mounts = Vec::new();
    for name in names {
        let target =
            daemon.config.caches.get(name).ok_or_else(|| {
                Failure::invalid(format!("--cache {name}: no such cache any more"))
            })?;
        let user_dir = daemon.catalog.root().join("caches").join(uid.to_string());
        let host = user_dir.join(name);
        for (dir, mode) in [
            (user_dir.parent().expect("caches/"), 0o700),
            (&user_dir, 0o700),
            (&host, 0o755),
        ] {
            match std::fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Failure::io(format!("creating {}", dir.display()), e)),
            }
        }
        mounts.push(CacheMount {
            host,
            target: target.trim_start_matches('/').to_owned(),
        });
    }
    Ok(mounts)
}

/// Runs the executor in a cgroup of the build's own, where the host has cgroup v2, with the
/// metadata service filtered out for `--network no-metadata`; removes the cgroup afterwards,
/// killing whatever the provisioner left running in it.
async fn in_cgroup(
    daemon: &Daemon,
    handle: &BuildHandle,
    spec: &ExecutorSpec,
    workspace: OwnedFd,
) -> PhaseResult<Option<String>> {
    let Some(hierarchy) = &daemon.cgroups else {
        return run_executor(handle, spec, workspace, None).await;
    };
    let limits = &daemon.config.limits;
    let cgroup = crate::cgroup::BuildCgroup::create(
        hierarchy,
        &handle.id,
        crate::cgroup::BuildLimits {
            memory: limits.build_memory,
            pids: limits.build_pids,
        },
    )
    .map_err(|e| (Phase::Mount, Failure::io("making the build's cgroup", e)))?;
    let setup = (|| {
        if handle.record().spec.network.as_deref() == Some("no-metadata") {
            cgroup.deny_egress(&crate::cgroup::METADATA_V4, &crate::cgroup::METADATA_V6)?;
        }
        Ok::<_, std::io::Error>(CgroupFiles {
            dir: File::open(cgroup.dir())?,
            procs: cgroup.procs_file()?,
            v1: cgroup.v1_procs_files()?,
        })
    })();
    let result = match setup {
        Ok(files) => run_executor(handle, spec, workspace, Some(files)).await,
        Err(e) => Err((
            Phase::Mount,
            Failure::io("setting up the build's cgroup", e),
        )),
    };
    let dir = cgroup.dir().to_owned();
    if let Err(e) = blocking(move || cgroup.remove().map_err(|e| Failure::io("cleanup", e))).await {
        tracing::warn!(build = %handle.id, cgroup = %dir.display(), error = %e.message, "removing the build's cgroup");
    }
    result
}

/// An ext4 root smaller than its grown disk grows before it is mounted (see
/// [`crate::grow::grow_ext4`]); XFS and btrfs grow once mounted, in the executor.
async fn grow_ext4(
    daemon: &Daemon,
    handle: &BuildHandle,
    attachment: &Attachment,
) -> PhaseResult<()> {
    if attachment.fs != crate::disk::FsType::Ext4 {
        return Ok(());
    }
    let said = crate::grow::grow_ext4(daemon, &attachment.device, handle.owner_uid, &handle.cancel)
        .await
        .at(Phase::Attach)?;
    if let Some(said) = said {
        handle.note(said);
    }
    Ok(())
}

/// Copies out the disk's FAT partitions where this kernel cannot mount vfat (see
/// [`crate::bootparts`]): the image's fstab, read by the executor, says whether the build sees
/// one at `/boot/efi`. One larger than [`crate::bootparts::MAX_COPY`] is not copied (said).
async fn copy_boot_partitions(
    daemon: &Daemon,
    handle: &BuildHandle,
    attachment: &Attachment,
) -> PhaseResult<Vec<crate::bootparts::Copy>> {
    // One FAT partition at most, the ESP if the disk types one: it costs its size in memory.
    let mut fats: Vec<_> = attachment
        .others
        .iter()
        .filter_map(|o| o.fat.clone().map(|fat| (o, fat)))
        .collect();
    fats.sort_by_key(|(o, _)| !o.esp);
    fats.truncate(1);
    if fats.is_empty() || crate::bootparts::kernel_mounts("vfat") {
        return Ok(Vec::new());
    }
    let uid = crate::bootvm::vm_uid(daemon, handle.owner_uid).at(Phase::Mount)?;
    let mut copies = Vec::new();
    for (other, fat) in fats {
        if other.size > crate::bootparts::MAX_COPY {
            handle.note(format!(
                "amidala: warning: partition {} (vfat, which this host's kernel cannot mount) is \
                 {} MiB, more than the {} MiB amidala copies for a build: it is not given to \
                 the build",
                other.part.number,
                other.size >> 20,
                crate::bootparts::MAX_COPY >> 20
            ));
            continue;
        }
        let copy = crate::bootparts::Copy::take(
            daemon,
            &handle.id,
            uid,
            other.part.number,
            &other.part.device,
            (other.start, other.size),
            fat,
            &handle.cancel,
        )
        .await
        .at(Phase::Mount)?;
        copies.push(copy);
    }
    Ok(copies)
}

/// Writes back the copies the build changed, after a provisioner that succeeded.
async fn write_boot_copies_back(
    daemon: &Daemon,
    handle: &BuildHandle,
    copies: &[crate::bootparts::Copy],
) -> PhaseResult<()> {
    if copies.is_empty() {
        return Ok(());
    }
    let uid = crate::bootvm::vm_uid(daemon, handle.owner_uid).at(Phase::Unmount)?;
    for copy in copies {
        if let Some(said) = copy
            .write_back(daemon, uid, &handle.cancel)
            .await
            .at(Phase::Unmount)?
        {
            handle.note(said);
        }
    }
    Ok(())
}

/// What the executor needs of its cgroups to be born in them.
struct CgroupFiles {
    dir: File,
    procs: File,
    /// `cgroup.procs` of its v1 cgroups (hybrid hosts' memory and pids controllers).
    v1: Vec<File>,
}

async fn run_executor(
    handle: &BuildHandle,
    spec: &ExecutorSpec,
    workspace: OwnedFd,
    cgroup: Option<CgroupFiles>,
) -> PhaseResult<Option<String>> {
    let mut phase = Phase::Mount;
    // Born in the build's cgroup (see crate::spawn), with the workspace as descriptor 3.
    let mut child = crate::spawn::spawn(&crate::spawn::Spec {
        program: crate::helper::program().as_os_str(),
        args: vec![
            "amidalad-executor".as_ref(),
            EXECUTOR_ARG.as_ref(),
            handle.id.as_ref(),
        ],
        env: vec![("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")],
        pass: Some((workspace.as_fd(), WORKSPACE_FD)),
        cgroup: cgroup.as_ref().map(|c| (c.dir.as_fd(), c.procs.as_fd())),
        creds: None,
        stdout: None,
    })
    .map_err(|e| (phase, Failure::io("starting the executor", e)))?;
    drop(workspace);
    let v1 = cgroup.map(|c| c.v1).unwrap_or_default();
    let mut input = serde_json::to_vec(spec).expect("executor spec serializes");
    input.push(b'\n');
    let mut stdin = child.stdin.take().expect("piped");
    if let Err(e) = stdin.write_all(&input).await {
        let _ = child.kill().await;
        return Err((phase, Failure::io("sending the executor its spec", e)));
    }
    // The executor's v1 cgroups (hybrid hosts' memory and pids controllers), joined while it
    // mounts the image: moving a process waits for an RCU grace period (10-20 ms), which a
    // process born in its cgroup does not, but clone3 can be born in a v2 cgroup only. The
    // executor starts nothing of the build's before the word that it is in them (see
    // crate::executor::await_cgroups); the pid is its own until it is reaped, after this.
    let pid = child.pid();
    let placed = async move {
        let joined = blocking(move || {
            for procs in &v1 {
                (&*procs)
                    .write_all(pid.to_string().as_bytes())
                    .map_err(|e| Failure::io("moving the executor into the build's cgroups", e))?;
            }
            Ok(())
        })
        .await;
        if joined.is_ok() {
            let _ = stdin.write_all(crate::executor::IN_CGROUPS).await;
        }
        // Without the word, the executor ends before it provisions.
        drop(stdin);
        joined.err()
    };

    let stderr = child.stderr.take().expect("piped");
    // Set when the output has ended: the executor closes it once the provisioner's processes
    // are gone (see crate::executor::end_build_output).
    let (output_ended, mut output_done) = watch::channel(false);
    // Set when the executor's reports have ended (it has exited, or is about to).
    let (reports_ended, mut reports_done) = watch::channel(false);
    let output = async {
        let mut reader = BufReader::new(stderr);
        let read = async {
            while let Ok(Some(line)) = read_bounded_line(&mut reader, MAX_LOG_LINE).await {
                handle.note(String::from_utf8_lossy(&line).into_owned());
            }
        };
        // A process outside the build given the output's descriptor (over a socket) could
        // hold it open for ever: once the executor is done, the rest is not waited for.
        let abandoned = async {
            let _ = reports_done.wait_for(|ended| *ended).await;
            tokio::time::sleep(OUTPUT_DRAIN).await;
        };
        tokio::select! {
            () = read => {}
            () = abandoned => handle.note(
                "amidala: the build's output was still open after the build ended (a process \
                 outside the build holds it): the rest of it is not logged",
            ),
        }
        let _ = output_ended.send(true);
    };
    let limit = handle.record().spec.timeout.map(Duration::from_secs);
    let mut timed_out = false;
    let reports = async {
        let mut reader = BufReader::new(child.stdout.take().expect("piped")).lines();
        // Set when provisioning begins, if the build has a --timeout.
        let deadline = tokio::time::sleep(Duration::MAX);
        tokio::pin!(deadline);
        let mut armed = false;
        let mut outcome = None;
        let mut architecture = None;
        let mut failed = None;
        let mut done = false;
        let mut killed = false;
        loop {
            tokio::select! {
                line = reader.next_line() => match line {
                    Ok(Some(line)) => match crate::executor::parse_report(line.as_bytes()) {
                        Ok(Report::Phase(p)) => {
                            // The output and the reports come on two pipes: what the
                            // provisioner printed is logged before the phase after it.
                            // Bounded, should a process the executor knows nothing of hold
                            // the output open.
                            if phase == Phase::Provision {
                                let _ = tokio::time::timeout(
                                    OUTPUT_DRAIN,
                                    output_done.wait_for(|ended| *ended),
                                )
                                .await;
                            }
                            phase = p;
                            handle.enter_teardown(p);
                            if let (Phase::Provision, Some(limit)) = (p, limit) {
                                deadline.as_mut().reset(tokio::time::Instant::now() + limit);
                                armed = true;
                            }
                        }
                        Ok(Report::Note(text)) => handle.note(text),
                        Ok(Report::Provisioned(o)) => outcome = Some(o),
                        Ok(Report::Failed { phase: p, message }) => {
                            failed.get_or_insert((p, message));
                        }
                        Ok(Report::Done) => done = true,
                        Ok(Report::Inspected { architecture: arch }) => architecture = arch,
                        Err(e) => tracing::error!(build = %handle.id, error = %e, line, "unreadable executor report"),
                    },
                    Ok(None) | Err(_) => break,
                },
                () = &mut deadline, if armed && !killed && phase == Phase::Provision => {
                    killed = true;
                    timed_out = true;
                    handle.note(format!("amidala: the provisioner ran past --timeout {}s: stopping it", limit.unwrap_or_default().as_secs()));
                    let _ = child.signal(libc::SIGTERM);
                }
                () = handle.cancel.cancelled(), if !killed => {
                    killed = true;
                    handle.note("amidala: cancelling: stopping the provisioner");
                    let _ = child.signal(libc::SIGTERM);
                }
            }
        }
        let _ = reports_ended.send(true);
        (outcome, architecture, failed, done)
    };
    let ((outcome, architecture, failed, done), (), misplaced) =
        tokio::join!(reports, output, placed);
    let status = child
        .wait()
        .await
        .map_err(|e| (phase, Failure::io("waiting for the executor", e)))?;

    // (A build cancelled at once may have ended before it could be moved: cancelled, then.)
    if let Some(failure) = misplaced.filter(|_| !handle.cancel.is_cancelled()) {
        return Err((Phase::Mount, failure));
    }
    if let Some((p, message)) = failed {
        let code = if handle.cancel.is_cancelled() {
            ErrorCode::Cancelled
        } else {
            ErrorCode::Io
        };
        return Err((p, Failure::new(code, message)));
    }
    if handle.cancel.is_cancelled() {
        return Err((phase, Failure::new(ErrorCode::Cancelled, "build cancelled")));
    }
    if timed_out {
        let secs = limit.unwrap_or_default().as_secs();
        return Err((
            Phase::Provision,
            Failure::new(
                ErrorCode::Timeout,
                format!("the provisioner did not finish within --timeout {secs}s and was stopped"),
            ),
        ));
    }
    let provision_failure = |message: String, exit_status| {
        let mut f = Failure::new(ErrorCode::ProvisionerFailed, message);
        f.exit_status = exit_status;
        Err((Phase::Provision, f))
    };
    match (outcome, done) {
        (Some(Outcome::Exited(0)), true) if status.success() => Ok(architecture),
        (Some(Outcome::Exited(code)), _) if code != 0 => {
            provision_failure(format!("provisioner exited with status {code}"), Some(code))
        }
        (Some(Outcome::Signalled(sig)), _) => {
            provision_failure(format!("provisioner was killed by signal {sig}"), None)
        }
        (Some(Outcome::Error(message)), _) => {
            provision_failure(format!("provisioner failed: {message}"), None)
        }
        _ => Err((
            phase,
            Failure::new(
                ErrorCode::Internal,
                format!("executor ended ({status}) without finishing the {phase} phase"),
            ),
        )),
    }
}

/// Reads one line of at most `max` bytes (longer lines are split), without its newline.
pub async fn read_bounded_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let take = buf.len().min(max - line.len());
        if let Some(nl) = buf[..take].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..nl]);
            reader.consume(nl + 1);
            return Ok(Some(line));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if line.len() == max {
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_lines_split_long_ones() {
        let mut r = BufReader::new(&b"ab\ncdefg\n\nhij"[..]);
        let mut got = Vec::new();
        while let Some(l) = read_bounded_line(&mut r, 3).await.unwrap() {
            got.push(String::from_utf8(l).unwrap());
        }
        assert_eq!(got, vec!["ab", "cde", "fg", "", "hij"]);
    }

    #[test]
    fn default_image_name_is_valid() {
        let now = Utc::now();
        let name = image_name(None, &crate::ids::new_id("bld"), &now).unwrap();
        amidala::proto::validate_image_name(&name).unwrap();
        assert_eq!(image_name(Some("web"), "bld-x", &now).unwrap(), "web");
    }
}
