//! Providers: where snapshots, volumes and images live, and how a volume becomes a block device
//! on this host. Every provider goes through the same phases; the build runner
//! ([`crate::build`]) drives them and tears down in reverse on failure.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use amidala::proto::{validate_id, ErrorCode, Source};
use async_trait::async_trait;
use chrono::Utc;

use crate::catalog::{newest_with_tag, Catalog, ImageRecord, SnapshotRecord};
use crate::disk::{self, FsType};
use crate::error::{blocking, Failure};
use crate::ids::new_id;
use crate::loopdev::LoopDevice;

/// A writable volume made from a snapshot.
#[derive(Debug, Clone)]
pub struct Volume {
    pub id: String,
}

/// A volume attached to this host as a block device holding the root filesystem.
#[derive(Debug)]
pub struct Attachment {
    pub device: PathBuf,
    pub fs: FsType,
    pub partition: Option<u32>,
    loop_device: Option<LoopDevice>,
}

/// What a new snapshot records about where it came from.
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    pub tags: BTreeMap<String, String>,
    pub owner_uid: u32,
    pub build_id: Option<String>,
    pub source_snapshot: Option<String>,
}

/// What a new image records.
#[derive(Debug, Clone)]
pub struct ImageMeta {
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub owner_uid: u32,
    pub build_id: Option<String>,
}

#[async_trait]
pub trait Provider: Send + Sync + Debug {
    fn name(&self) -> &'static str;
    /// The snapshot a build starts from.
    async fn resolve(&self, source: &Source) -> Result<SnapshotRecord, Failure>;
    /// A new volume with the snapshot's content.
    async fn create_volume(&self, snapshot: &SnapshotRecord) -> Result<Volume, Failure>;
    /// Attaches the volume and finds its root filesystem (`partition`, or found automatically).
    async fn attach(&self, volume: &Volume, partition: Option<u32>) -> Result<Attachment, Failure>;
    /// Detaches, once nothing has the device mounted.
    async fn detach(&self, attachment: Attachment) -> Result<(), Failure>;
    /// A snapshot of the (detached) volume.
    async fn snapshot(
        &self,
        volume: &Volume,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure>;
    /// Registers an image of the snapshot.
    async fn register(
        &self,
        snapshot: &SnapshotRecord,
        meta: ImageMeta,
    ) -> Result<ImageRecord, Failure>;
    /// Deletes the volume.
    async fn delete_volume(&self, volume: Volume) -> Result<(), Failure>;
    /// Where the snapshot's disk image can be read on this host, if it is a file.
    fn snapshot_path(&self, snapshot_id: &str) -> Option<PathBuf>;
}

/// How long a detached device may take to be released by the kernel.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// The local provider: snapshots and volumes are raw image files under the state directory,
/// attached as loop devices.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    catalog: Catalog,
}

impl LocalProvider {
    pub fn new(catalog: Catalog) -> LocalProvider {
        LocalProvider { catalog }
    }
}

/// Copies `src` into a new file at `dst` (created exclusively, mode `mode`); on failure
/// nothing is left at `dst`.
pub fn copy_to_new(
    src: &File,
    dst: &std::path::Path,
    mode: u32,
) -> std::io::Result<disk::CopyMethod> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)?;
    let result = disk::copy_file(src, &out);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn resolve(&self, source: &Source) -> Result<SnapshotRecord, Failure> {
        let catalog = self.catalog.clone();
        let source = source.clone();
        blocking(move || match &source {
            Source::Snapshot(id) => {
                validate_id("snap", id)?;
                catalog
                    .get_snapshot(id)
                    .map_err(|e| Failure::io("reading the catalog", e))?
                    .ok_or_else(|| {
                        Failure::new(ErrorCode::NotFound, format!("snapshot {id} does not exist"))
                    })
            }
            Source::Tag(tag) => {
                let all = catalog
                    .snapshots()
                    .map_err(|e| Failure::io("reading the catalog", e))?;
                newest_with_tag(&all, tag).cloned().ok_or_else(|| {
                    Failure::new(
                        ErrorCode::NoSnapshot,
                        format!(
                            "no snapshot is tagged {tag} (make one with `amidala base import`)"
                        ),
                    )
                })
            }
        })
        .await
    }

    async fn create_volume(&self, snapshot: &SnapshotRecord) -> Result<Volume, Failure> {
        let id = new_id("vol");
        let src = self.catalog.snapshot_file(&snapshot.id);
        let dst = self.catalog.volume_file(&id);
        blocking(move || {
            let src_file = File::open(&src)
                .map_err(|e| Failure::io(format!("opening {}", src.display()), e))?;
            let method = copy_to_new(&src_file, &dst, 0o600).map_err(|e| {
                Failure::io(format!("copying {} to {}", src.display(), dst.display()), e)
            })?;
            tracing::debug!(volume = %id, ?method, "volume created");
            Ok(Volume { id })
        })
        .await
    }

    async fn attach(&self, volume: &Volume, partition: Option<u32>) -> Result<Attachment, Failure> {
        let path = self.catalog.volume_file(&volume.id);
        blocking(move || {
            let file = File::open(&path)
                .map_err(|e| Failure::io(format!("opening {}", path.display()), e))?;
            let root = disk::locate_root(&file, partition).map_err(Failure::invalid)?;
            drop(file);
            let device = LoopDevice::attach(&path, root.offset, root.size, false)
                .map_err(|e| Failure::io("attaching a loop device", e))?;
            Ok(Attachment {
                device: device.path().to_owned(),
                fs: root.fs,
                partition: root.partition,
                loop_device: Some(device),
            })
        })
        .await
    }

    async fn detach(&self, mut attachment: Attachment) -> Result<(), Failure> {
        let Some(device) = attachment.loop_device.take() else {
            return Ok(());
        };
        blocking(move || {
            device
                .wait_unused(RELEASE_TIMEOUT)
                .map_err(|e| Failure::io("detaching", e))?;
            device
                .detach(RELEASE_TIMEOUT)
                .map_err(|e| Failure::io("detaching", e))
        })
        .await
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        let catalog = self.catalog.clone();
        let src = catalog.volume_file(&volume.id);
        blocking(move || {
            let id = new_id("snap");
            let file = File::open(&src)
                .map_err(|e| Failure::io(format!("opening {}", src.display()), e))?;
            let size = file
                .metadata()
                .map_err(|e| Failure::io("reading the volume size", e))?
                .len();
            let staged = catalog.snapshot_staging_file(&id);
            copy_to_new(&file, &staged, 0o644)
                .map_err(|e| Failure::io(format!("copying {} to a snapshot", src.display()), e))?;
            let record = SnapshotRecord {
                id,
                created: Utc::now(),
                tags: meta.tags,
                size,
                owner_uid: meta.owner_uid,
                build_id: meta.build_id,
                source_snapshot: meta.source_snapshot,
            };
            catalog
                .commit_snapshot(&staged, &record)
                .map_err(|e| Failure::io("storing the snapshot", e))?;
            Ok(record)
        })
        .await
    }

    async fn register(
        &self,
        snapshot: &SnapshotRecord,
        meta: ImageMeta,
    ) -> Result<ImageRecord, Failure> {
        let catalog = self.catalog.clone();
        let snapshot_id = snapshot.id.clone();
        blocking(move || {
            let record = ImageRecord {
                id: new_id("ami"),
                name: meta.name,
                created: Utc::now(),
                tags: meta.tags,
                snapshot_id,
                build_id: meta.build_id,
                owner_uid: meta.owner_uid,
            };
            catalog
                .put_image(&record)
                .map_err(|e| Failure::io("writing the image record", e))?;
            Ok(record)
        })
        .await
    }

    async fn delete_volume(&self, volume: Volume) -> Result<(), Failure> {
        let path = self.catalog.volume_file(&volume.id);
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Failure::io(format!("deleting {}", path.display()), e)),
        })
        .await
    }

    fn snapshot_path(&self, snapshot_id: &str) -> Option<PathBuf> {
        Some(self.catalog.snapshot_file(snapshot_id))
    }
}
