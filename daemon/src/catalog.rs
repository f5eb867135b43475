//! The local catalog: snapshots, images and builds as one JSON record each, written
//! atomically (see [`crate::store`]), plus the files they describe.
//!
//! Layout under the state directory:
//!
//! ```text
//! catalog/snapshots/snap-….json   snapshot records          snapshots/snap-….img  their disks
//! catalog/images/ami-….json       image records
//! builds/bld-….json               build records (journals: one   builds/bld-….log  event logs
//!                                 line per change, the last counts)
//! volumes/vol-….img               volumes of running builds
//! mnt/bld-…/                      mount points (mounted only inside a build's namespace)
//! tmp/                            staging of imports
//! ```
//!
//! A snapshot's data file is written completely (and synced) before its record, so a record
//! never names a missing or partial file.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use amidala::proto::{
    BuildFailure, BuildInfo, BuildSpec, BuildState, ImageInfo, Phase, SnapshotInfo, Tag,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::store;

/// A snapshot: an immutable raw disk image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub id: String,
    pub created: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
    pub size: u64,
    pub owner_uid: u32,
    pub build_id: Option<String>,
    pub source_snapshot: Option<String>,
}

/// A registered image, pointing at its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub id: String,
    pub name: String,
    pub created: DateTime<Utc>,
    pub tags: BTreeMap<String, String>,
    pub snapshot_id: String,
    pub build_id: Option<String>,
    pub owner_uid: u32,
}

/// A build, rewritten at every phase: what it was asked, where it is, what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRecord {
    pub id: String,
    pub owner_uid: u32,
    pub owner_pid: Option<i32>,
    pub state: BuildState,
    pub phase: Option<Phase>,
    pub spec: BuildSpec,
    pub source_snapshot: Option<String>,
    pub created: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    pub image_id: Option<String>,
    pub snapshot_id: Option<String>,
    pub error: Option<BuildFailure>,
    /// Resources held, for recovery after a crash.
    pub volume_id: Option<String>,
    pub device: Option<String>,
}

pub fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl BuildRecord {
    pub fn info(&self) -> BuildInfo {
        BuildInfo {
            id: self.id.clone(),
            state: self.state,
            phase: self.phase,
            owner_uid: self.owner_uid,
            provisioner: self.spec.provisioner.clone(),
            command: self.spec.command.clone(),
            source: self.spec.source.clone(),
            source_snapshot: self.source_snapshot.clone(),
            created: rfc3339(&self.created),
            finished: self.finished.as_ref().map(rfc3339),
            image_id: self.image_id.clone(),
            snapshot_id: self.snapshot_id.clone(),
            error: self.error.clone(),
        }
    }
}

/// The newest snapshot carrying `tag`: latest creation time, ties broken by the larger id.
pub fn newest_with_tag<'a>(
    snapshots: impl IntoIterator<Item = &'a SnapshotRecord>,
    tag: &Tag,
) -> Option<&'a SnapshotRecord> {
    snapshots
        .into_iter()
        .filter(|s| s.tags.get(&tag.key) == Some(&tag.value))
        .max_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)))
}

/// The catalog under one state directory.
#[derive(Debug, Clone)]
pub struct Catalog {
    root: PathBuf,
    /// The snapshot records by id, read from disk on first use and then kept up to date by
    /// this catalog's own writes: the daemon that opened it is the state directory's only
    /// writer (it holds its lock). Every build resolves its source among all of them, and
    /// reading hundreds of records from disk for each build cost more than a no-op build.
    /// `None` until read, and again after a write whose outcome on disk is unknown.
    snapshots: Arc<Mutex<Option<BTreeMap<String, SnapshotRecord>>>>,
    /// The owner and bytes (record and log) of each finished build seen by
    /// [`build_bytes_of`](Self::build_bytes_of): a finished build's files no longer change, so
    /// a quota check reads only the records of builds it has not seen finished.
    finished_builds: Arc<Mutex<BTreeMap<String, (u32, u64)>>>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog under `state_dir`, and removes temporary files
    /// that a crash during a write left behind.
    pub fn open(state_dir: &Path) -> io::Result<Catalog> {
        let catalog = Catalog {
            root: state_dir.to_owned(),
            snapshots: Arc::default(),
            finished_builds: Arc::default(),
        };
        // Root's alone: snapshots, images and logs are their owners' (who get them through
        // the daemon), and the lock file must be out of everyone else's reach.
        check_state_dir(&catalog.root)?;
        for (dir, mode) in [
            ("", 0o700),
            ("catalog", 0o700),
            ("catalog/snapshots", 0o700),
            ("catalog/images", 0o700),
            ("snapshots", 0o700),
            ("builds", 0o700),
            ("volumes", 0o700),
            ("mnt", 0o700),
            ("tmp", 0o700),
        ] {
            let path = catalog.root.join(dir);
            DirBuilder::new().recursive(true).mode(mode).create(&path)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        for dir in ["catalog/snapshots", "catalog/images", "builds", "snapshots"] {
            store::remove_stale_tmp(&catalog.root.join(dir))?;
        }
        Ok(catalog)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.img"))
    }

    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.img"))
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn mount_dir(&self, build_id: &str) -> PathBuf {
        self.root.join("mnt").join(build_id)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn build_log(&self, id: &str) -> PathBuf {
        self.root.join("builds").join(format!("{id}.log"))
    }

    fn record(&self, kind: &str, id: &str) -> PathBuf {
        self.root.join(kind).join(format!("{id}.json"))
    }

    /// A temporary name in the snapshots directory for the disk image of snapshot `id`, to be
    /// filled and then stored with [`commit_snapshot`](Self::commit_snapshot).
    pub fn snapshot_staging_file(&self, id: &str) -> PathBuf {
        self.snapshots_dir()
            .join(format!("{}{id}.img", store::TMP_PREFIX))
    }

    /// Stores a snapshot: its complete disk image `staged` moves to its final name, durably,
    /// and only then is its record written. On failure neither is left behind.
    pub fn commit_snapshot(&self, staged: &Path, record: &SnapshotRecord) -> io::Result<()> {
        let dst = self.snapshot_file(&record.id);
        if let Err(e) =
            fs::rename(staged, &dst).and_then(|()| store::sync_dir(&self.snapshots_dir()))
        {
            let _ = fs::remove_file(staged);
            let _ = fs::remove_file(&dst);
            return Err(e);
        }
        self.put_snapshot(record).inspect_err(|_| {
            let _ = fs::remove_file(&dst);
        })
    }

    pub fn put_snapshot(&self, record: &SnapshotRecord) -> io::Result<()> {
        let mut index = self.snapshots.lock().expect("snapshot index lock");
        let written = store::write_json(&self.record("catalog/snapshots", &record.id), record);
        Self::keep_index(&mut index, &written, |all| {
            all.insert(record.id.clone(), record.clone());
        });
        written
    }

    pub fn delete_snapshot_record(&self, id: &str) -> io::Result<()> {
        let mut index = self.snapshots.lock().expect("snapshot index lock");
        let deleted = match fs::remove_file(self.record("catalog/snapshots", id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => store::sync_dir(&self.root.join("catalog/snapshots")),
        };
        Self::keep_index(&mut index, &deleted, |all| {
            all.remove(id);
        });
        deleted
    }

    /// After a write to the snapshot records: `change` the index as the write changed the
    /// disk, or, if the write failed (it may have happened in part), forget the index so that
    /// the next use reads the disk again.
    fn keep_index(
        index: &mut Option<BTreeMap<String, SnapshotRecord>>,
        written: &io::Result<()>,
        change: impl FnOnce(&mut BTreeMap<String, SnapshotRecord>),
    ) {
        match (written, index.as_mut()) {
            (Ok(()), Some(all)) => change(all),
            (Ok(()), None) => {}
            (Err(_), _) => *index = None,
        }
    }

    /// The snapshot index, read from disk if it is not in memory.
    fn snapshot_index(
        &self,
    ) -> io::Result<MutexGuard<'_, Option<BTreeMap<String, SnapshotRecord>>>> {
        let mut index = self.snapshots.lock().expect("snapshot index lock");
        if index.is_none() {
            let all: Vec<SnapshotRecord> = store::list_json(&self.root.join("catalog/snapshots"))?;
            *index = Some(all.into_iter().map(|s| (s.id.clone(), s)).collect());
        }
        Ok(index)
    }

    /// The newest snapshot carrying `tag` among those `usable` says may be a build's source.
    pub fn newest_snapshot_with_tag(
        &self,
        tag: &Tag,
        usable: impl Fn(&SnapshotRecord) -> bool,
    ) -> io::Result<Option<SnapshotRecord>> {
        let index = self.snapshot_index()?;
        let all = index.as_ref().expect("read above");
        Ok(newest_with_tag(all.values().filter(|s| usable(s)), tag).cloned())
    }

    pub fn get_snapshot(&self, id: &str) -> io::Result<Option<SnapshotRecord>> {
        read_optional(&self.record("catalog/snapshots", id))
    }

    /// Every snapshot record, by id.
    pub fn snapshots(&self) -> io::Result<Vec<SnapshotRecord>> {
        let index = self.snapshot_index()?;
        Ok(index
            .as_ref()
            .expect("read above")
            .values()
            .cloned()
            .collect())
    }

    pub fn put_image(&self, record: &ImageRecord) -> io::Result<()> {
        store::write_json(&self.record("catalog/images", &record.id), record)
    }

    /// Removes an image's record (one already gone is not an error).
    pub fn delete_image(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.record("catalog/images", id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => store::sync_dir(&self.root.join("catalog/images")),
        }
    }

    pub fn images(&self) -> io::Result<Vec<ImageRecord>> {
        store::list_json(&self.root.join("catalog/images"))
    }

    /// Starts the journal of a new build: its record, appended to on each change.
    pub fn create_build_journal(&self, record: &BuildRecord) -> io::Result<store::Journal> {
        store::Journal::create(&self.record("builds", &record.id), record)
    }

    pub fn put_build(&self, record: &BuildRecord) -> io::Result<()> {
        store::write_json(&self.record("builds", &record.id), record)
    }

    pub fn get_build(&self, id: &str) -> io::Result<Option<BuildRecord>> {
        read_optional(&self.record("builds", id))
    }

    pub fn builds(&self) -> io::Result<Vec<BuildRecord>> {
        store::list_json(&self.root.join("builds"))
    }

    /// Bytes the records and logs of `uid`'s builds take.
    pub fn build_bytes_of(&self, uid: u32) -> io::Result<u64> {
        let dir = self.root.join("builds");
        let mut ids = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".json") {
                if !name.starts_with(store::TMP_PREFIX) {
                    ids.insert(id.to_owned());
                }
            }
        }
        let mut finished = self.finished_builds.lock().expect("build usage lock");
        finished.retain(|id, _| ids.contains(id));
        let mut bytes = 0;
        for id in &ids {
            if let Some(&(owner, size)) = finished.get(id) {
                if owner == uid {
                    bytes += size;
                }
                continue;
            }
            let Ok(Some(record)) = self.get_build(id) else {
                continue;
            };
            let size: u64 = [self.record("builds", id), self.build_log(id)]
                .iter()
                .map(|path| fs::metadata(path).map(|m| m.len()).unwrap_or(0))
                .sum();
            if record.finished.is_some() {
                finished.insert(id.clone(), (record.owner_uid, size));
            }
            if record.owner_uid == uid {
                bytes += size;
            }
        }
        Ok(bytes)
    }

    /// Removes a finished build's record and log (the record last: a crash between leaves a
    /// record whose log is gone, which reads as an empty log).
    pub fn delete_build(&self, id: &str) -> io::Result<()> {
        for path in [self.build_log(id), self.record("builds", id)] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        store::sync_dir(&self.root.join("builds"))
    }

    pub fn snapshot_info(&self, s: &SnapshotRecord) -> SnapshotInfo {
        SnapshotInfo {
            id: s.id.clone(),
            tags: s.tags.clone(),
            created: rfc3339(&s.created),
            size: s.size,
            path: Some(self.snapshot_file(&s.id).display().to_string()),
        }
    }
}

impl ImageRecord {
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            tags: self.tags.clone(),
            created: rfc3339(&self.created),
            snapshot_id: self.snapshot_id.clone(),
            build_id: self.build_id.clone(),
        }
    }
}

/// Refuses a state directory that is a symbolic link or belongs to someone other than root:
/// whoever owns it could change what the daemon trusts.
fn check_state_dir(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(root) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symbolic link; give the real directory",
            root.display()
        ))),
        Ok(meta) if !meta.is_dir() => Err(io::Error::other(format!(
            "{} is not a directory",
            root.display()
        ))),
        Ok(meta) if meta.uid() != 0 && nix::unistd::geteuid().is_root() => Err(io::Error::other(
            format!("{} belongs to uid {}, not root", root.display(), meta.uid()),
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn read_optional<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match store::read_json(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn snap(id: &str, secs: i64, tags: &[(&str, &str)]) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            created: Utc.timestamp_opt(secs, 0).unwrap(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            size: 1,
            owner_uid: 0,
            build_id: None,
            source_snapshot: None,
        }
    }

    #[test]
    fn newest_by_time_then_id() {
        let tag: Tag = "amidala=base".parse().unwrap();
        let all = [
            snap("snap-a", 10, &[("amidala", "base")]),
            snap("snap-c", 20, &[("amidala", "base")]),
            snap("snap-b", 20, &[("amidala", "base")]),
            snap("snap-z", 99, &[("amidala", "system")]),
        ];
        assert_eq!(newest_with_tag(&all, &tag).unwrap().id, "snap-c");
        assert!(newest_with_tag(&all, &"amidala=app".parse().unwrap()).is_none());
        assert!(newest_with_tag(&all[..0], &tag).is_none());
    }

    #[test]
    fn records_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let s = snap("snap-0123456789abcdef0", 5, &[("k", "v")]);
        catalog.put_snapshot(&s).unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        assert_eq!(catalog.get_snapshot(&s.id).unwrap(), Some(s.clone()));
        assert_eq!(catalog.snapshots().unwrap(), vec![s]);
        assert_eq!(catalog.get_snapshot("snap-missing").unwrap(), None);
    }

    #[test]
    fn the_snapshot_index_follows_the_catalogs_writes() {
        let dir = tempfile::tempdir().unwrap();
        let tag: Tag = "amidala=base".parse().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let old = snap("snap-a", 10, &[("amidala", "base")]);
        catalog.put_snapshot(&old).unwrap();
        let newest = |c: &Catalog| c.newest_snapshot_with_tag(&tag, |_| true).unwrap();
        assert_eq!(newest(&catalog), Some(old.clone()));
        // Read once, then kept: writes through the catalog (or a clone of it) show at once.
        let new = snap("snap-b", 20, &[("amidala", "base")]);
        catalog.clone().put_snapshot(&new).unwrap();
        assert_eq!(newest(&catalog), Some(new.clone()));
        assert_eq!(
            catalog
                .newest_snapshot_with_tag(&tag, |s| s.id != "snap-b")
                .unwrap(),
            Some(old.clone())
        );
        let retagged = snap("snap-b", 20, &[("amidala", "system")]);
        catalog.put_snapshot(&retagged).unwrap();
        assert_eq!(newest(&catalog), Some(old.clone()));
        catalog.delete_snapshot_record("snap-a").unwrap();
        assert_eq!(newest(&catalog), None);
        assert_eq!(catalog.snapshots().unwrap(), vec![retagged.clone()]);
        // A write that fails makes the next use read the disk.
        fs::remove_dir_all(dir.path().join("catalog/snapshots")).unwrap();
        assert!(catalog.put_snapshot(&old).is_err());
        assert!(catalog.snapshots().unwrap().is_empty());
        // What another catalog wrote is seen by one that had not read the disk yet.
        fs::create_dir(dir.path().join("catalog/snapshots")).unwrap();
        catalog.put_snapshot(&old).unwrap();
        assert_eq!(newest(&Catalog::open(dir.path()).unwrap()), Some(old));
    }
}
