//! Providers: where snapshots, volumes and images live, and how a volume becomes a block device
//! on this host. Every provider goes through the same phases; the build runner
//! ([`crate::build`]) drives them and tears down in reverse on failure.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use amidala::proto::{
    is_published, validate_id, BootTestSpec, BuildSpec, ErrorCode, ImageInfo, SnapshotInfo, Source,
};
use async_trait::async_trait;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, ImageRecord, SnapshotRecord};
use crate::disk::{self, FsType};
use crate::error::{blocking, Failure};
use crate::ids::new_id;
use crate::loopdev::LoopDevice;

/// How long a detached device may take to be released by the kernel.
/// The tag marking a snapshot made by a build that then failed (its value: the build id).
/// Such snapshots are kept, never chosen by tag as a build's source, and removed by `gc`.
pub const FAILED_BUILD_TAG: &str = "amidala:failed-build";

/// A volume a provider made for a build on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildVolume {
    pub id: String,
    /// The build it was made for, where known.
    pub build: Option<String>,
    /// Its state as the provider says it (`available`, `in-use`, `file`, ...).
    pub state: String,
    /// Found by the host name an older amidala tagged it with, which builders may share
    /// (ec2, see [`crate::ec2::HOST_TAG`]): this daemon's only if its build is in the catalog.
    pub by_host_name: bool,
}

pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// A boot test of a registered image by a provider that boots images, not snapshots (see
/// [`Provider::boots_images`]).
pub struct BootJob<'a> {
    pub image_id: &'a str,
    /// The build (or `amidala boot-test` request) whose tags the test's machine carries.
    pub job_id: &'a str,
    /// The owner's user name, for the owner tag.
    pub owner: &'a str,
    pub test: &'a BootTestSpec,
    /// Seconds the boot may take when `test` does not say (`[boot_test] timeout`).
    pub default_timeout: u64,
    /// Ends the test early; the machine is stopped all the same.
    pub cancel: &'a CancellationToken,
    /// Receives the lines of the build's log: `console: …` lines and amidala's own.
    pub console: &'a (dyn Fn(String) + Sync),
}

impl Debug for BootJob<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootJob")
            .field("image_id", &self.image_id)
            .field("job_id", &self.job_id)
            .field("owner", &self.owner)
            .field("test", &self.test)
            .finish_non_exhaustive()
    }
}

/// A machine a provider started for a boot test on this host that still exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInstance {
    pub id: String,
    /// The build (or boot-test request) it was started for, where known.
    pub build: Option<String>,
    /// Its state as the provider says it (`running`, `shutting-down`, ...).
    pub state: String,
    /// As [`BuildVolume::by_host_name`].
    pub by_host_name: bool,
}

/// A writable volume made from a snapshot.
#[derive(Debug, Clone)]
pub struct Volume {
    pub id: String,
}

/// A volume attached to this host, with its root filesystem on a block device.
#[derive(Debug)]
pub struct Attachment {
    /// The loop device holding the root filesystem (the whole volume, or one partition).
    pub device: PathBuf,
    pub fs: FsType,
    pub partition: Option<u32>,
    /// What attaching grew of the disk's partition table, for the build's log.
    pub grown: Option<String>,
    /// The disk's other partitions that hold a filesystem, which the image's fstab may mount
    /// at `/boot` and `/boot/efi` (see [`crate::bootparts`]).
    pub others: Vec<OtherPartition>,
    loop_device: Option<LoopDevice>,
    /// What the provider holds until the volume is detached (ec2: the device name).
    pub extra: Option<Box<dyn Any + Send + Sync>>,
}

/// A partition of the disk besides the root's that holds a filesystem, attached as a loop
/// device of its own.
#[derive(Debug)]
pub struct OtherPartition {
    pub part: crate::bootparts::BootPartition,
    /// Where it lies on the disk, in bytes.
    pub start: u64,
    pub size: u64,
    /// Its FAT volume, if it is one.
    pub fat: Option<disk::Fat>,
    /// Typed as an EFI system partition.
    pub esp: bool,
    loop_device: LoopDevice,
}

/// Most partitions besides the root attached for a build: an image mounts `/boot` and
/// `/boot/efi` from them, and each costs a loop device (and, for a copied ESP, memory).
pub const MAX_OTHERS: usize = 4;

/// The partitions of the partitioned disk `file` but `root` that hold a filesystem amidala
/// recognises, each attached (from the disk at `path`) as a loop device. One that overlaps the
/// root or another is left out: the same blocks mounted twice would be two filesystems
/// writing one; so are those past the first [`MAX_OTHERS`].
fn attach_others(
    file: &File,
    path: &Path,
    root: &disk::RootLocation,
) -> Result<Vec<OtherPartition>, Failure> {
    let size = disk::disk_size(file).map_err(|e| Failure::io("reading the disk", e))?;
    let parts = match disk::read_partitions(file, size) {
        Ok(Some((_, parts))) => parts,
        _ => return Ok(Vec::new()),
    };
    let overlaps = |p: &disk::Partition, start: u64, size: u64| {
        p.start < start.saturating_add(size) && start < p.start.saturating_add(p.size)
    };
    let mut others: Vec<OtherPartition> = Vec::new();
    for p in parts.iter().filter(|p| Some(p.number) != root.partition) {
        if others.len() == MAX_OTHERS {
            tracing::warn!(
                partition = p.number,
                "partitions past the first {MAX_OTHERS} besides the root are not attached"
            );
            break;
        }
        // A root's size of 0 is the rest of the disk.
        let root_size = if root.size == 0 { u64::MAX } else { root.size };
        if overlaps(p, root.offset, root_size)
            || others.iter().any(|o| overlaps(p, o.start, o.size))
        {
            tracing::warn!(
                partition = p.number,
                "a partition that overlaps another is not attached"
            );
            continue;
        }
        let read = |e| Failure::io(format!("reading partition {}", p.number), e);
        let (fs_type, uuid, label, fat) = match disk::detect_fs(file, p.start).map_err(read)? {
            Some(fs) => (
                fs.kernel_name(),
                disk::fs_uuid(file, p.start, fs).map_err(read)?,
                match fs {
                    FsType::Ext4 => disk::ext4_label(file, p.start).map_err(read)?,
                    _ => None,
                },
                None,
            ),
            None => match disk::fat_volume(file, p.start).map_err(read)? {
                Some(fat) => ("vfat", Some(fat.uuid.clone()), fat.label.clone(), Some(fat)),
                None => continue,
            },
        };
        let loop_device = LoopDevice::attach(path, p.start, p.size, false)
            .map_err(|e| Failure::io(format!("attaching partition {}", p.number), e))?;
        others.push(OtherPartition {
            part: crate::bootparts::BootPartition {
                number: p.number,
                device: loop_device.path().to_owned(),
                fs_type: fs_type.to_owned(),
                uuid,
                partuuid: p.unique.clone(),
                label,
                copy: None,
            },
            start: p.start,
            size: p.size,
            fat,
            esp: p.esp,
            loop_device,
        });
    }
    Ok(others)
}

impl Attachment {
    /// Finds the root filesystem on `disk` (a file or a block device) and attaches it, or the
    /// partition holding it, as a loop device with an offset.
    /// A disk longer than its partition table gets the table moved to its end and the root
    /// partition, if it is the last, grown to fill it (see [`crate::grow`]).
    pub fn root_of(disk: &Path, partition: Option<u32>) -> Result<Attachment, Failure> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(disk)
            .map_err(|e| Failure::io(format!("opening {}", disk.display()), e))?;
        let mut root = disk::locate_root(&file, partition).map_err(Failure::invalid)?;
        let mut grown = None;
        if let Some(n) = root.partition {
            let growth = crate::grow::grow_table(&file, n)
                .map_err(|e| Failure::io("growing the partition table to the disk", e))?;
            if let Some(growth) = growth {
                grown = Some(growth.describe(n));
                root = disk::locate_root(&file, Some(n)).map_err(Failure::invalid)?;
            }
        }
        let others = match root.partition {
            Some(_) => attach_others(&file, disk, &root)?,
            None => Vec::new(),
        };
        drop(file);
        let device = LoopDevice::attach(disk, root.offset, root.size, false)
            .map_err(|e| Failure::io("attaching a loop device", e))?;
        Ok(Attachment {
            device: device.path().to_owned(),
            fs: root.fs,
            partition: root.partition,
            grown,
            others,
            loop_device: Some(device),
            extra: None,
        })
    }

    /// Waits until nothing has the root filesystem mounted, then releases the loop device.
    /// Returns what the provider still holds.
    pub fn release_loop(mut self) -> Result<Option<Box<dyn Any + Send + Sync>>, Failure> {
        for other in std::mem::take(&mut self.others) {
            let device = other.loop_device;
            device
                .wait_unused(RELEASE_TIMEOUT)
                .and_then(|()| device.detach(RELEASE_TIMEOUT))
                .map_err(|e| Failure::io("detaching", e))?;
        }
        if let Some(device) = self.loop_device.take() {
            device
                .wait_unused(RELEASE_TIMEOUT)
                .map_err(|e| Failure::io("detaching", e))?;
            device
                .detach(RELEASE_TIMEOUT)
                .map_err(|e| Failure::io("detaching", e))?;
        }
        Ok(self.extra.take())
    }
}

/// What a new snapshot records about where it came from.
#[derive(Debug, Clone)]
pub struct SnapshotMeta {
    pub tags: BTreeMap<String, String>,
    pub owner_uid: u32,
    pub build_id: Option<String>,
    pub source_snapshot: Option<String>,
    pub description: String,
}

/// What a new image records.
#[derive(Debug, Clone)]
pub struct ImageMeta {
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub owner_uid: u32,
    pub build_id: Option<String>,
    /// `i386`, `x86_64` or `arm64`, if known.
    pub architecture: Option<String>,
    pub boot_mode: Option<String>,
    pub copy_to: Vec<String>,
    pub share_with: Vec<String>,
}

#[async_trait]
pub trait Provider: Send + Sync + Debug {
    fn name(&self) -> &'static str;
    /// Refuses build options this provider cannot honour, before anything is made.
    fn check_options(&self, spec: &BuildSpec) -> Result<(), Failure>;
    /// The size in bytes of a volume made from a snapshot of `snapshot_size` bytes with the
    /// requested `size`: the larger of the two.
    fn volume_size(&self, snapshot_size: u64, size: Option<u64>) -> u64 {
        size.map_or(snapshot_size, |s| s.max(snapshot_size))
    }
    /// The snapshot a build of `viewer`'s starts from (see [`Viewer`]).
    async fn resolve(&self, source: &Source, viewer: Viewer) -> Result<SnapshotRecord, Failure>;
    /// A new volume with the snapshot's content, of at least `size` bytes.
    async fn create_volume(
        &self,
        snapshot: &SnapshotRecord,
        size: Option<u64>,
        build_id: &str,
        owner: &str,
    ) -> Result<Volume, Failure>;
    /// Attaches the volume and finds its root filesystem (`partition`, or found automatically).
    async fn attach(&self, volume: &Volume, partition: Option<u32>) -> Result<Attachment, Failure>;
    /// Detaches, once nothing has the root filesystem mounted.
    async fn detach(&self, volume: &Volume, attachment: Attachment) -> Result<(), Failure>;
    /// A snapshot of the (detached) volume. The build deletes the volume right after, so a
    /// provider may take the volume's content for the snapshot instead of copying it (the
    /// local provider moves the file): the volume may be gone when this returns.
    async fn snapshot(
        &self,
        volume: &Volume,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure>;
    /// Registers an image of the snapshot (and copies and shares it, where the provider can).
    async fn register(
        &self,
        snapshot: &SnapshotRecord,
        meta: ImageMeta,
    ) -> Result<ImageRecord, Failure>;
    /// Deletes the volume.
    async fn delete_volume(&self, volume: Volume) -> Result<(), Failure>;
    /// Makes a volume made for another build id (a warm pool volume, attached or not) the
    /// volume of `build_id` and `owner`, as if [`create_volume`](Self::create_volume) had made
    /// it for them. Returns it under its (possibly new) id.
    async fn adopt_volume(
        &self,
        volume: Volume,
        build_id: &str,
        owner: &str,
    ) -> Result<Volume, Failure>;
    /// Stores a complete raw disk image made by `base import` as a new snapshot; the file at
    /// `staged` is consumed, whatever the outcome.
    async fn import_image(
        &self,
        staged: PathBuf,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure>;
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, Failure>;
    async fn list_images(&self) -> Result<Vec<ImageInfo>, Failure>;
    /// The id of an image already named `name`, where the provider's image names must be
    /// unique (ec2: among the account's images in the region); `None` where they need not be.
    async fn image_named(&self, _name: &str) -> Result<Option<String>, Failure> {
        Ok(None)
    }
    /// Where the snapshot's disk image can be read on this host, if it is a file.
    fn snapshot_path(&self, snapshot_id: &str) -> Option<PathBuf>;
    /// The volumes made for builds on this host that still exist.
    async fn build_volumes(&self) -> Result<Vec<BuildVolume>, Failure>;
    /// Detaches `volume` from this host if it is attached, and deletes it.
    async fn reclaim_volume(&self, volume: &BuildVolume) -> Result<(), Failure>;
    /// Adds `tags` to a snapshot.
    async fn tag_snapshot(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure>;
    /// Removes the tag `key` from a snapshot.
    async fn untag_snapshot(&self, id: &str, key: &str) -> Result<(), Failure>;
    /// Adds `tags` to an image.
    async fn tag_image(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure>;
    /// Deregisters an image (its snapshot stays).
    async fn deregister_image(&self, id: &str) -> Result<(), Failure>;
    /// Deletes a snapshot no image uses.
    async fn delete_snapshot(&self, id: &str) -> Result<(), Failure>;

    /// Whether its boot test boots a registered image (ec2: an instance of the AMI, which must
    /// exist to boot) rather than the snapshot's disk before the image is registered (local:
    /// QEMU on the snapshot's file).
    fn boots_images(&self) -> bool {
        false
    }
    /// Boots the registered image as `job` says; whatever the outcome, also when `job.cancel`
    /// fires, the machine is stopped before this returns. Returns what the image's
    /// [`amidala::proto::BOOT_TEST_DETAIL_TAG`] says.
    async fn boot_image(&self, job: BootJob<'_>) -> Result<String, Failure> {
        Err(Failure::invalid(format!(
            "the {} provider boot-tests snapshots, not images ({})",
            self.name(),
            job.image_id
        )))
    }
    /// Shares the image and copies it to other regions, where the provider can: what
    /// [`register`](Self::register) does with `meta.copy_to` and `meta.share_with`, done later
    /// (once the image's boot test passed).
    async fn publish_image(
        &self,
        _image: &ImageRecord,
        _description: &str,
        _copy_to: &[String],
        _share_with: &[String],
    ) -> Result<(), Failure> {
        Ok(())
    }
    /// The boot tests' machines of this host that still exist (not yet terminated).
    async fn boot_instances(&self) -> Result<Vec<BootInstance>, Failure> {
        Ok(Vec::new())
    }
    /// Stops (terminates) a boot test's machine; one already gone is done.
    async fn reclaim_instance(&self, _instance: &BootInstance) -> Result<(), Failure> {
        Ok(())
    }
}

/// Whether a build may start from `tags`' snapshot when it asks for a tag: not if the snapshot
/// is what a failed build left.
pub fn usable_as_source(tags: &BTreeMap<String, String>) -> bool {
    !tags.contains_key(FAILED_BUILD_TAG)
}

/// The owner of a snapshot no user of amidala made (one made outside it, on EC2): no uid is.
pub const NO_OWNER: u32 = u32::MAX;

/// Whose snapshots a lookup is for: ownership is part of resolution. A user's tag resolves
/// among their own snapshots and those an admin published, never another user's: one member's
/// import tagged `amidala=base` is no one else's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    /// `None`: published snapshots only (the warm pool, which serves every user).
    pub uid: Option<u32>,
    /// Admins may name (by id) any snapshot; their tags resolve as a member's do.
    pub admin: bool,
}

impl Viewer {
    /// What the warm pool may serve: published snapshots.
    pub const PUBLISHED: Viewer = Viewer {
        uid: None,
        admin: false,
    };

    /// Whether a tag of this viewer may resolve to a snapshot of `owner` with `tags`.
    pub fn resolves_to(&self, owner: u32, tags: &BTreeMap<String, String>) -> bool {
        usable_as_source(tags) && (self.uid == Some(owner) || is_published(tags))
    }

    /// Whether this viewer may see, build from, or export a snapshot of `owner` with `tags`
    /// that it names.
    pub fn may_use(&self, owner: u32, tags: &BTreeMap<String, String>) -> bool {
        self.admin || self.uid == Some(owner) || is_published(tags)
    }

    /// Whether this viewer may change or delete what `owner` owns.
    pub fn owns(&self, owner: u32) -> bool {
        self.admin || self.uid == Some(owner)
    }
}

/// The refusal of a snapshot `id` the viewer may not use: said as if it did not exist, so that
/// ids of others' snapshots are not confirmed.
pub fn not_yours(kind: &str, id: &str) -> Failure {
    Failure::new(
        ErrorCode::NotFound,
        format!("{kind} {id} does not exist, or is neither yours nor published"),
    )
}

/// No snapshot of the viewer's, or published, has `tag`.
pub fn no_snapshot_tagged(tag: &amidala::proto::Tag, place: &str) -> Failure {
    Failure::new(
        ErrorCode::NoSnapshot,
        format!(
            "no snapshot{place} of yours or published by an admin is tagged {tag} (import one \
             with `amidala base import`, or ask an admin to publish one: `amidala base publish \
             ID`)"
        ),
    )
}

/// Whether a copy must reach the disk before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Synced: it must survive a crash (a snapshot, say).
    Durable,
    /// Not synced: a crash makes it garbage anyway (a build's volume, which recovery deletes).
    Scratch,
}

/// Copies `src` into a new file at `dst` (created exclusively, mode `mode`), synced if `keep`
/// says so; on failure nothing is left at `dst`.
pub fn copy_to_new(
    src: &File,
    dst: &Path,
    mode: u32,
    keep: Keep,
) -> std::io::Result<disk::CopyMethod> {
    copy_to_new_within(src, dst, mode, keep, None)
}

/// [`copy_to_new`], writing at most `budget` bytes of data (see [`disk::copy_file_within`]).
pub fn copy_to_new_within(
    src: &File,
    dst: &Path,
    mode: u32,
    keep: Keep,
    budget: Option<u64>,
) -> std::io::Result<disk::CopyMethod> {
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)?;
    let result = disk::copy_file_within(src, &out, budget).and_then(|method| {
        if keep == Keep::Durable {
            out.sync_all()?;
        }
        Ok(method)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Grows the file at `path` to `size` bytes if it is smaller (a bigger disk, not a bigger
/// filesystem).
pub fn grow(path: &Path, size: Option<u64>) -> Result<(), Failure> {
    let Some(size) = size else {
        return Ok(());
    };
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Failure::io(format!("opening {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Failure::io("reading the volume size", e))?
        .len();
    if size > len {
        file.set_len(size)
            .map_err(|e| Failure::io("growing the volume", e))?;
    }
    Ok(())
}

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

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn check_options(&self, spec: &BuildSpec) -> Result<(), Failure> {
        for (flag, given) in [
            ("--copy-to", !spec.copy_to.is_empty()),
            ("--share-with", !spec.share_with.is_empty()),
            ("--boot-mode", spec.boot_mode.is_some()),
        ] {
            if given {
                return Err(Failure::invalid(format!(
                    "{flag} needs the ec2 provider; this daemon runs the local one"
                )));
            }
        }
        Ok(())
    }

    async fn resolve(&self, source: &Source, viewer: Viewer) -> Result<SnapshotRecord, Failure> {
        let catalog = self.catalog.clone();
        let source = source.clone();
        blocking(move || match &source {
            Source::Snapshot(id) => {
                validate_id("snap", id)?;
                catalog
                    .get_snapshot(id)
                    .map_err(|e| Failure::io("reading the catalog", e))?
                    .filter(|s| viewer.may_use(s.owner_uid, &s.tags))
                    .ok_or_else(|| not_yours("snapshot", id))
            }
            Source::Tag(tag) => {
                let newest = catalog
                    .newest_snapshot_with_tag(tag, |s| viewer.resolves_to(s.owner_uid, &s.tags))
                    .map_err(|e| Failure::io("reading the catalog", e))?;
                newest.ok_or_else(|| no_snapshot_tagged(tag, ""))
            }
        })
        .await
    }

    async fn create_volume(
        &self,
        snapshot: &SnapshotRecord,
        size: Option<u64>,
        build_id: &str,
        _owner: &str,
    ) -> Result<Volume, Failure> {
        // One volume per build, named after it, so that the build a volume file belongs to is
        // known from its name alone (recovery and gc need that).
        let id = volume_of_build(build_id);
        let src = self.catalog.snapshot_file(&snapshot.id);
        let dst = self.catalog.volume_file(&id);
        blocking(move || {
            let src_file = File::open(&src)
                .map_err(|e| Failure::io(format!("opening {}", src.display()), e))?;
            // Not synced: a volume does not outlive a crash (recovery deletes it), and the
            // snapshot a build makes of it is synced then.
            let method = copy_to_new(&src_file, &dst, 0o600, Keep::Scratch).map_err(|e| {
                Failure::io(format!("copying {} to {}", src.display(), dst.display()), e)
            })?;
            if let Err(e) = grow(&dst, size) {
                let _ = std::fs::remove_file(&dst);
                return Err(e);
            }
            tracing::debug!(volume = %id, ?method, "volume created");
            Ok(Volume { id })
        })
        .await
    }

    async fn attach(&self, volume: &Volume, partition: Option<u32>) -> Result<Attachment, Failure> {
        let path = self.catalog.volume_file(&volume.id);
        blocking(move || Attachment::root_of(&path, partition)).await
    }

    async fn detach(&self, _volume: &Volume, attachment: Attachment) -> Result<(), Failure> {
        blocking(move || attachment.release_loop().map(drop)).await
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
            let staged = catalog.snapshot_staging_file(&id);
            take_volume(&src, &staged)
                .map_err(|e| Failure::io(format!("making {} a snapshot", src.display()), e))?;
            store_snapshot(&catalog, id, &staged, meta)
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
        blocking(move || remove_if_present(&path)).await
    }

    async fn adopt_volume(
        &self,
        volume: Volume,
        build_id: &str,
        _owner: &str,
    ) -> Result<Volume, Failure> {
        // The name says whose it is; a loop device on it follows the rename.
        let id = volume_of_build(build_id);
        let (from, to) = (
            self.catalog.volume_file(&volume.id),
            self.catalog.volume_file(&id),
        );
        blocking(move || {
            std::fs::rename(&from, &to).map_err(|e| {
                Failure::io(
                    format!("renaming {} to {}", from.display(), to.display()),
                    e,
                )
            })
        })
        .await?;
        Ok(Volume { id })
    }

    async fn import_image(
        &self,
        staged: PathBuf,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        let catalog = self.catalog.clone();
        blocking(move || {
            let id = new_id("snap");
            // Staged in the state directory's tmp/, on the same filesystem: a rename.
            let in_place = catalog.snapshot_staging_file(&id);
            std::fs::rename(&staged, &in_place).map_err(|e| {
                let _ = std::fs::remove_file(&staged);
                Failure::io("moving the imported image into place", e)
            })?;
            store_snapshot(&catalog, id, &in_place, meta)
        })
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, Failure> {
        let catalog = self.catalog.clone();
        blocking(move || {
            let mut snapshots = catalog
                .snapshots()
                .map_err(|e| Failure::io("reading the catalog", e))?;
            snapshots.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            Ok(snapshots.iter().map(|s| catalog.snapshot_info(s)).collect())
        })
        .await
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, Failure> {
        let catalog = self.catalog.clone();
        blocking(move || {
            let mut images = catalog
                .images()
                .map_err(|e| Failure::io("reading the catalog", e))?;
            images.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
            Ok(images.iter().map(ImageRecord::info).collect())
        })
        .await
    }

    fn snapshot_path(&self, snapshot_id: &str) -> Option<PathBuf> {
        Some(self.catalog.snapshot_file(snapshot_id))
    }

    async fn build_volumes(&self) -> Result<Vec<BuildVolume>, Failure> {
        let dir = self.catalog.volumes_dir();
        blocking(move || {
            let mut volumes = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| Failure::io("reading volumes/", e))? {
                let name = entry
                    .map_err(|e| Failure::io("reading volumes/", e))?
                    .file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                    continue;
                };
                volumes.push(BuildVolume {
                    build: build_of_volume(id),
                    id: id.to_owned(),
                    state: "file".into(),
                    by_host_name: false,
                });
            }
            volumes.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(volumes)
        })
        .await
    }

    async fn reclaim_volume(&self, volume: &BuildVolume) -> Result<(), Failure> {
        let path = self.catalog.volume_file(&volume.id);
        blocking(move || remove_if_present(&path)).await
    }

    async fn tag_snapshot(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure> {
        let (catalog, id, tags) = (self.catalog.clone(), id.to_owned(), tags.clone());
        blocking(move || {
            let mut record = catalog
                .get_snapshot(&id)
                .map_err(|e| Failure::io("reading the catalog", e))?
                .ok_or_else(|| {
                    Failure::new(ErrorCode::NotFound, format!("snapshot {id} does not exist"))
                })?;
            record.tags.extend(tags);
            catalog
                .put_snapshot(&record)
                .map_err(|e| Failure::io("writing the snapshot record", e))
        })
        .await
    }

    async fn untag_snapshot(&self, id: &str, key: &str) -> Result<(), Failure> {
        let (catalog, id, key) = (self.catalog.clone(), id.to_owned(), key.to_owned());
        blocking(move || {
            let mut record = catalog
                .get_snapshot(&id)
                .map_err(|e| Failure::io("reading the catalog", e))?
                .ok_or_else(|| {
                    Failure::new(ErrorCode::NotFound, format!("snapshot {id} does not exist"))
                })?;
            if record.tags.remove(&key).is_none() {
                return Ok(());
            }
            catalog
                .put_snapshot(&record)
                .map_err(|e| Failure::io("writing the snapshot record", e))
        })
        .await
    }

    async fn tag_image(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure> {
        let (catalog, id, tags) = (self.catalog.clone(), id.to_owned(), tags.clone());
        blocking(move || {
            let mut record = catalog
                .images()
                .map_err(|e| Failure::io("reading the catalog", e))?
                .into_iter()
                .find(|i| i.id == id)
                .ok_or_else(|| {
                    Failure::new(ErrorCode::NotFound, format!("image {id} does not exist"))
                })?;
            record.tags.extend(tags);
            catalog
                .put_image(&record)
                .map_err(|e| Failure::io("writing the image record", e))
        })
        .await
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Failure> {
        let (catalog, id) = (self.catalog.clone(), id.to_owned());
        blocking(move || {
            catalog
                .delete_image(&id)
                .map_err(|e| Failure::io("deleting the image record", e))
        })
        .await
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Failure> {
        let (catalog, id) = (self.catalog.clone(), id.to_owned());
        blocking(move || {
            let images = catalog
                .images()
                .map_err(|e| Failure::io("reading the catalog", e))?;
            if let Some(image) = images.iter().find(|i| i.snapshot_id == id) {
                return Err(Failure::invalid(format!(
                    "snapshot {id} is used by image {}",
                    image.id
                )));
            }
            // The record first: a data file without a record is found and removed by gc.
            catalog
                .delete_snapshot_record(&id)
                .map_err(|e| Failure::io("deleting the snapshot record", e))?;
            remove_if_present(&catalog.snapshot_file(&id))
        })
        .await
    }
}

/// The (local) volume of build `bld-…`: `vol-…` with the same digits.
pub fn volume_of_build(build_id: &str) -> String {
    format!("vol-{}", build_id.strip_prefix("bld-").unwrap_or(build_id))
}

/// The build a local volume was made for.
pub fn build_of_volume(volume_id: &str) -> Option<String> {
    volume_id
        .strip_prefix("vol-")
        .map(|digits| format!("bld-{digits}"))
}

/// Makes the detached volume file at `volume` the snapshot staged at `staged`: synced,
/// root's alone (0600) as snapshots are, and moved, not copied (the build deletes its volume next,
/// so nothing of a no-op build is written twice). Copied if the two are on different
/// filesystems. On failure the volume is where it was and nothing is at `staged`.
fn take_volume(volume: &Path, staged: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let file = File::open(volume)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    // Synced before it is renamed: a rename of unsynced data can leave neither after a power
    // loss (XFS, ext4 without auto_da_alloc).
    file.sync_all()?;
    match std::fs::rename(volume, staged) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_to_new(&file, staged, 0o600, Keep::Durable).map(drop)
        }
        other => other,
    }
}

/// Records the complete disk image at `staged` as snapshot `id`.
fn store_snapshot(
    catalog: &Catalog,
    id: String,
    staged: &Path,
    meta: SnapshotMeta,
) -> Result<SnapshotRecord, Failure> {
    let size = std::fs::metadata(staged)
        .map_err(|e| Failure::io("reading the snapshot size", e))?
        .len();
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
        .commit_snapshot(staged, &record)
        .map_err(|e| Failure::io("storing the snapshot", e))?;
    Ok(record)
}

/// Removes a file; one already gone is fine.
pub fn remove_if_present(path: &Path) -> Result<(), Failure> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Failure::io(format!("deleting {}", path.display()), e)),
    }
}
