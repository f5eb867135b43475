//! Finding and removing what builds left behind: build cgroups (and whatever still runs in
//! them), mounts and loop devices of the state directory in the host's namespace, boot tests'
//! instances (ec2) and volumes the provider made for builds of this host, snapshots of failed
//! builds, and partial files.
//!
//! Everything is first listed, and only then is each thing checked against the builds that
//! are live at that moment: a build is registered before it makes anything, so whatever a
//! listing shows of a build that is not registered when the check runs is garbage. Files of
//! the state directory (staging trees, partial snapshots) are looked at only when no build and
//! no import runs, since a running one may be writing them.
//!
//! The same code serves `amidala gc` and recovery at start, where nothing is live yet and
//! snapshots of failed builds are kept.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use amidala::proto::GcItem;

use crate::cgroup;
use crate::error::{blocking, Failure};
use crate::provider::{BootInstance, BuildVolume, FAILED_BUILD_TAG};
use crate::Daemon;

/// What to look for.
#[derive(Debug, Clone, Copy)]
pub struct Scope {
    /// Snapshots tagged as made by failed builds (gc removes them; recovery keeps them).
    pub failed_snapshots: bool,
    /// List only.
    pub dry_run: bool,
}

#[derive(Debug)]
enum Thing {
    Cgroup(PathBuf),
    Mount(PathBuf),
    Loop(PathBuf),
    Instance(BootInstance),
    Volume(BuildVolume),
    Snapshot(String),
    File(PathBuf),
    Dir(PathBuf),
}

#[derive(Debug)]
struct Found {
    thing: Thing,
    build: Option<String>,
    detail: String,
}

/// Finds what builds left behind and, unless `scope.dry_run`, removes it. A failure to list is
/// an error; a failure to remove one thing is reported with that thing.
pub async fn collect(daemon: &Daemon, scope: Scope) -> Result<Vec<GcItem>, Failure> {
    let state_dir = daemon.catalog.root().to_owned();
    let cgroups = daemon.cgroups.clone();
    let known: std::collections::HashSet<String> = daemon
        .catalog
        .builds()
        .map_err(|e| Failure::io("reading the catalog", e))?
        .into_iter()
        .map(|r| r.id)
        .collect();

    // Found by the host name an older amidala tagged it with: this daemon's only if its build
    // is in the catalog (another builder may have the same host name).
    let ours = |by_host_name: bool, build: &Option<String>| {
        !by_host_name || build.as_ref().is_some_and(|b| known.contains(b))
    };

    // 1. Listings.
    let mut found = {
        let state_dir = state_dir.clone();
        let known = known.clone();
        blocking(move || {
            let mut found = Vec::new();
            if let Some(h) = &cgroups {
                for id in h
                    .build_ids()
                    .map_err(|e| Failure::io("listing build cgroups", e))?
                {
                    // Only this daemon's builds: other daemons may share the parent cgroup.
                    if known.contains(&id) {
                        // Its v2 cgroup first: removing it kills what runs in the build.
                        for dir in h.build_dirs(&id) {
                            found.push(Found {
                                thing: Thing::Cgroup(dir),
                                build: Some(id.clone()),
                                detail: "cgroup of a build that is not running".into(),
                            });
                        }
                    }
                }
            }
            for mount_point in mounts_under(&state_dir)
                .map_err(|e| Failure::io("reading /proc/self/mountinfo", e))?
            {
                // A build's copy of a partition (see crate::bootparts) is that build's.
                let build = mount_point
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(crate::bootparts::build_of_copy)
                    .map(str::to_owned);
                found.push(Found {
                    thing: Thing::Mount(mount_point),
                    build,
                    detail: "mounted in the host's namespace".into(),
                });
            }
            for (device, backing) in loops_under(&state_dir) {
                found.push(Found {
                    build: None,
                    detail: format!("backed by {}", backing.display()),
                    thing: Thing::Loop(device),
                });
            }
            Ok(found)
        })
        .await?
    };
    let mut volumes = daemon.provider.build_volumes().await?;
    volumes.retain(|v| ours(v.by_host_name, &v.build));
    let by_volume: HashMap<&str, &BuildVolume> =
        volumes.iter().map(|v| (v.id.as_str(), v)).collect();
    for item in &mut found {
        if let Thing::Loop(_) = item.thing {
            // The volume's listing says whose it is (a loop device whose volume is gone
            // belongs to nobody).
            let backing = item.detail.trim_start_matches("backed by ");
            if let Some(v) =
                volume_in(Path::new(backing)).and_then(|id| by_volume.get(id.as_str()).copied())
            {
                item.build = v.build.clone();
            }
        }
    }
    // Instances before volumes: a boot test's instance holds its volume until it is terminated.
    for i in daemon.provider.boot_instances().await? {
        if !ours(i.by_host_name, &i.build) {
            continue;
        }
        found.push(Found {
            build: i.build.clone(),
            detail: i.state.clone(),
            thing: Thing::Instance(i),
        });
    }
    for v in &volumes {
        found.push(Found {
            build: v.build.clone(),
            detail: v.state.clone(),
            thing: Thing::Volume(v.clone()),
        });
    }
    if scope.failed_snapshots {
        for s in daemon.provider.list_snapshots().await? {
            if let Some(build) = s.tags.get(FAILED_BUILD_TAG) {
                found.push(Found {
                    build: Some(build.clone()),
                    detail: "snapshot of a failed build".into(),
                    thing: Thing::Snapshot(s.id),
                });
            }
        }
    }

    // 2. Checks against what is live now.
    let busy = !daemon.builds.lock().expect("builds lock").is_empty() || daemon.imports.any();
    if !busy {
        let local = daemon.provider.name() == "local";
        let catalog = daemon.catalog.clone();
        found.extend(
            blocking(move || {
                stray_files(&catalog, local)
                    .map_err(|e| Failure::io("reading the state directory", e))
            })
            .await?,
        );
    }
    let importing = daemon.imports.any();
    {
        let live = daemon.builds.lock().expect("builds lock");
        found.retain(|f| {
            if matches!(f.thing, Thing::Snapshot(_)) {
                return true;
            }
            match &f.build {
                Some(b) if live.contains_key(b) || daemon.pool.holds(b) => false,
                // An `amidala boot-test` running now.
                Some(b)
                    if daemon
                        .boot_tests
                        .lock()
                        .expect("boot tests lock")
                        .contains(b) =>
                {
                    false
                }
                Some(b) if b.starts_with("import-") => !importing,
                // Whose it is is not known: only when nothing runs.
                None => !busy || matches!(f.thing, Thing::Mount(_)),
                Some(_) => true,
            }
        });
    }

    // 3. Removal, in an order that frees each thing before what it holds.
    let mut items = Vec::new();
    for f in found {
        let (kind, id) = match &f.thing {
            Thing::Cgroup(p) => ("cgroup", p.display().to_string()),
            Thing::Mount(p) => ("mount", p.display().to_string()),
            Thing::Loop(p) => ("loop-device", p.display().to_string()),
            Thing::Instance(i) => ("instance", i.id.clone()),
            Thing::Volume(v) => ("volume", v.id.clone()),
            Thing::Snapshot(id) => ("snapshot", id.clone()),
            Thing::File(p) | Thing::Dir(p) => ("file", p.display().to_string()),
        };
        let error = if scope.dry_run {
            None
        } else {
            remove(daemon, f.thing).await.err().map(|e| e.message)
        };
        if let Some(e) = &error {
            tracing::error!(kind, id, error = %e, "gc: could not remove");
        } else if !scope.dry_run {
            tracing::info!(kind, id, build = ?f.build, "gc: removed");
        }
        items.push(GcItem {
            kind: kind.to_owned(),
            id,
            build: f.build,
            detail: f.detail,
            removed: !scope.dry_run && error.is_none(),
            error,
        });
    }
    Ok(items)
}

async fn remove(daemon: &Daemon, thing: Thing) -> Result<(), Failure> {
    match thing {
        Thing::Cgroup(dir) => {
            blocking(move || cgroup::remove(&dir).map_err(|e| Failure::io("removing", e))).await
        }
        Thing::Mount(p) => {
            blocking(move || {
                nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| Failure::io(format!("unmounting {}", p.display()), e))
            })
            .await
        }
        Thing::Loop(p) => {
            blocking(move || {
                crate::loopdev::detach_path(&p)
                    .map_err(|e| Failure::io(format!("detaching {}", p.display()), e))
            })
            .await
        }
        Thing::Instance(i) => daemon.provider.reclaim_instance(&i).await,
        Thing::Volume(v) => daemon.provider.reclaim_volume(&v).await,
        Thing::Snapshot(id) => daemon.provider.delete_snapshot(&id).await,
        Thing::File(p) => blocking(move || crate::provider::remove_if_present(&p)).await,
        Thing::Dir(p) => {
            blocking(move || {
                // Staging trees are never mounted; mount points are emptied by their namespace's
                // end, so a plain rmdir suffices for those (and refuses anything else).
                let result = if p.parent().and_then(Path::file_name) == Some("mnt".as_ref()) {
                    fs::remove_dir(&p)
                } else {
                    fs::remove_dir_all(&p)
                };
                result.map_err(|e| Failure::io(format!("removing {}", p.display()), e))
            })
            .await
        }
    }
}

/// The volume id of a volume file (`…/volumes/<id>.img`).
fn volume_in(backing: &Path) -> Option<String> {
    if backing.parent()?.file_name()? != "volumes" {
        return None;
    }
    Some(backing.file_stem()?.to_str()?.to_owned())
}

/// Mount points under `dir` in this (the host's) mount namespace, deepest first.
fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(cgroup::unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Loop devices whose backing file is under `dir`.
fn loops_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = PathBuf::from(backing.trim_end().trim_end_matches(" (deleted)"));
        if backing.starts_with(dir) {
            found.push((PathBuf::from("/dev").join(&name), backing));
        }
    }
    found.sort();
    found
}

/// Partial and orphaned files of the state directory, looked for only when nothing runs:
/// staging trees in `tmp/`, mount points in `mnt/`, partial snapshots, and (local provider)
/// snapshot files without a record.
fn stray_files(catalog: &crate::catalog::Catalog, local: bool) -> std::io::Result<Vec<Found>> {
    let mut found = Vec::new();
    for (dir, detail) in [
        (catalog.tmp_dir(), "staging left by an import"),
        (
            catalog.root().join("mnt"),
            "mount point of a build that is not running",
        ),
    ] {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            found.push(Found {
                thing: if entry.file_type()?.is_dir() {
                    Thing::Dir(path)
                } else {
                    Thing::File(path)
                },
                build: None,
                detail: detail.into(),
            });
        }
    }
    for entry in fs::read_dir(catalog.snapshots_dir())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(crate::store::TMP_PREFIX) {
            found.push(Found {
                thing: Thing::File(path),
                build: None,
                detail: "partial snapshot".into(),
            });
        } else if let Some(id) = name.strip_suffix(".img") {
            if local && catalog.get_snapshot(id)?.is_none() {
                found.push(Found {
                    thing: Thing::File(path),
                    build: None,
                    detail: "snapshot data without a record".into(),
                });
            }
        }
    }
    Ok(found)
}

/// A one-line summary.
pub fn describe(items: &[GcItem]) -> String {
    let removed = items.iter().filter(|i| i.removed).count();
    let failed = items.iter().filter(|i| i.error.is_some()).count();
    format!(
        "{} found, {removed} removed, {failed} could not be removed",
        items.len()
    )
}
