//! What base imports in flight will take. An import claims the bytes it is about to write
//! before it writes them (a tree: what its measured content takes in the new filesystem; a raw
//! disk: its data; a qcow2 image: the disk it holds, or what is left if that is less, since
//! its clusters may expand to all of it), and the claim counts against the state directory's
//! free space and its owner's quota until the import has ended, whether its client stays or
//! not. Without claims, imports running at once were each bounded by the whole free space and
//! the whole quota, and could together take both several times over.
//!
//! The claims are checked one at a time. Each check sums the other imports' claims before it
//! reads the free space and the quota's use, and an import's claim goes only after its
//! snapshot is in the catalog (where the quota counts it) and its staged file has become that
//! snapshot: whatever the moment, another import's bytes are seen at least once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amidala::proto::ErrorCode;

use crate::error::Failure;
use crate::provider::Viewer;
use crate::Daemon;

const MIB: u64 = 1 << 20;

/// The imports in flight and what they claimed.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<Vec<Entry>>,
    /// One check at a time (see the module's documentation).
    checking: tokio::sync::Mutex<()>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    viewer: Viewer,
    claim: u64,
    /// The file the import writes: what it holds already is in the free space read.
    staged: Option<PathBuf>,
}

/// An import in flight; it ends (and its claim goes) when this is dropped.
#[derive(Debug)]
pub struct InFlight {
    ledger: Arc<Ledger>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ledger.lock().retain(|e| e.id != self.id);
    }
}

/// What an import may take now, and what limits it.
#[derive(Debug, Clone, Copy)]
pub struct Available {
    pub bytes: u64,
    free: u64,
    reserve: u64,
    /// Claimed by the other imports in flight: of the free space, and of the quota.
    others_space: u64,
    others_quota: u64,
    /// What the quota leaves, if there is one.
    quota_left: Option<u64>,
}

impl Available {
    /// What other imports have claimed of what limits this one.
    pub fn claimed(&self) -> u64 {
        self.others_space.max(self.others_quota)
    }

    /// The refusal of any import: nothing is left.
    pub fn no_import_fits(&self, root: &Path) -> Failure {
        if let Some(left) = self.quota_left.filter(|&l| l <= self.others_quota) {
            return Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "what your quota leaves ({} MiB) is claimed by your imports in flight: no \
                     import fits until they end",
                    left / MIB
                ),
            );
        }
        let others = match self.others_space {
            0 => String::new(),
            claimed => format!(
                ", and imports in flight have claimed {} MiB",
                claimed.div_ceil(MIB)
            ),
        };
        Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "the state directory {} has {} MiB free, within its reserve of {} MiB \
                 ([limits] min_free_space){others}: no import fits",
                root.display(),
                self.free >> 20,
                self.reserve >> 20
            ),
        )
    }

    /// The refusal of `want` bytes, said with what limits them.
    fn refuse(&self, what: &str, want: u64) -> Failure {
        let others = match (self.others_space, self.others_quota) {
            (0, 0) => String::new(),
            (space, quota) => format!(
                "; imports in flight have claimed {} MiB of the free space and {} MiB of your \
                 quota",
                space.div_ceil(MIB),
                quota.div_ceil(MIB)
            ),
        };
        Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "{what}: {} MiB is more than this import may take now ({} MiB: the state \
                 directory's {} MiB free beyond its reserve of {} MiB, and your quota{others})",
                want.div_ceil(MIB),
                self.bytes / MIB,
                self.free.saturating_sub(self.reserve) / MIB,
                self.reserve / MIB
            ),
        )
    }
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an import is in flight (gc leaves staged files alone while one is).
    pub fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Starts an import of `viewer`'s, refused when they have `max` in flight already (admins
    /// have no such limit).
    pub fn enter(self: &Arc<Self>, viewer: Viewer, max: usize) -> Result<InFlight, Failure> {
        let mut entries = self.lock();
        let theirs = entries
            .iter()
            .filter(|e| e.viewer.uid == viewer.uid)
            .count();
        if !viewer.admin && theirs >= max {
            return Err(Failure::new(
                ErrorCode::LimitExceeded,
                format!(
                    "you have {theirs} base imports in flight, the most one user may have \
                     ([limits] max_imports_per_user); an import runs to its end even when its \
                     client has gone"
                ),
            ));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        entries.push(Entry {
            id,
            viewer,
            claim: 0,
            staged: None,
        });
        Ok(InFlight {
            ledger: self.clone(),
            id,
        })
    }

    /// The other imports' claims: of the free space, what they have not written yet; of
    /// `viewer`'s quota, all of theirs (their files are counted by no quota until they are
    /// snapshots).
    fn others(&self, me: u64, viewer: Viewer) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let claims: Vec<(u64, bool, Option<PathBuf>)> = self
            .lock()
            .iter()
            .filter(|e| e.id != me)
            .map(|e| (e.claim, e.viewer.uid == viewer.uid, e.staged.clone()))
            .collect();
        let (mut space, mut quota) = (0u64, 0u64);
        for (claim, same, staged) in claims {
            let written = staged
                .and_then(|p| std::fs::symlink_metadata(p).ok())
                .map_or(0, |m| m.blocks() * 512);
            space = space.saturating_add(claim.saturating_sub(written));
            if same {
                quota = quota.saturating_add(claim);
            }
        }
        (space, quota)
    }

    fn viewer_of(&self, me: &InFlight) -> Viewer {
        self.lock()
            .iter()
            .find(|e| e.id == me.id)
            .map(|e| e.viewer)
            .expect("an import in flight is in the ledger")
    }

    /// What `me` may take now: the state directory's free space beyond its reserve and its
    /// owner's quota, less what the other imports in flight have claimed of them.
    pub async fn available(&self, daemon: &Daemon, me: &InFlight) -> Result<Available, Failure> {
        let viewer = self.viewer_of(me);
        let (others_space, others_quota) = self.others(me.id, viewer);
        let limits = &daemon.config.limits;
        let (free, total) = free_space(daemon.catalog.root())?;
        let reserve = limits.min_free_space.unwrap_or((total / 20).min(1 << 30));
        let mut bytes = free
            .saturating_sub(reserve)
            .saturating_sub(others_space)
            .min(crate::import::MAX_SIZE);
        let quota_left = crate::quota::left(daemon, viewer).await?;
        if let Some(left) = quota_left {
            if left == 0 {
                // Said the quota's way: what is used, and what to do.
                crate::quota::check(daemon, viewer, 1, "an import").await?;
            }
            bytes = bytes.min(left.saturating_sub(others_quota));
        }
        Ok(Available {
            bytes,
            free,
            reserve,
            others_space,
            others_quota,
            quota_left,
        })
    }

    /// Claims `want` bytes for `me`, which writes them to `staged` (`what` names the source
    /// and what it holds, for the refusal). With `at_most`, claims what is left if that is
    /// less (refused only when nothing is); returns the bytes claimed.
    pub async fn claim(
        &self,
        daemon: &Daemon,
        me: &InFlight,
        want: u64,
        at_most: bool,
        staged: &Path,
        what: &str,
    ) -> Result<u64, Failure> {
        let _one_at_a_time = self.checking.lock().await;
        let available = self.available(daemon, me).await?;
        let claim = match (want <= available.bytes, at_most) {
            (true, _) => want,
            (false, true) if available.bytes > 0 => available.bytes,
            _ => return Err(available.refuse(what, want)),
        };
        if let Some(entry) = self.lock().iter_mut().find(|e| e.id == me.id) {
            entry.claim = claim;
            entry.staged = Some(staged.to_owned());
        }
        Ok(claim)
    }
}

/// Bytes free for the daemon on the filesystem of `dir`, and its size.
fn free_space(dir: &Path) -> Result<(u64, u64), Failure> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Failure::io(format!("reading the free space of {}", dir.display()), e))?;
    let block = stat.fragment_size() as u64;
    Ok((
        stat.blocks_available() as u64 * block,
        stat.blocks() as u64 * block,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(uid: u32) -> Viewer {
        Viewer {
            uid: Some(uid),
            admin: false,
        }
    }

    #[test]
    fn a_member_has_at_most_so_many_imports_in_flight_and_an_ended_one_frees_its_place() {
        let ledger = Arc::new(Ledger::default());
        let first = ledger.enter(member(1000), 2).unwrap();
        let _second = ledger.enter(member(1000), 2).unwrap();
        let refused = ledger.enter(member(1000), 2).unwrap_err();
        assert_eq!(refused.code, ErrorCode::LimitExceeded);
        assert!(
            refused.message.contains("max_imports_per_user"),
            "{refused}"
        );
        // Another member's, and an admin's, are theirs to count.
        let _other = ledger.enter(member(1001), 2).unwrap();
        let admin = Viewer {
            uid: Some(0),
            admin: true,
        };
        let _a = ledger.enter(admin, 0).unwrap();
        assert_eq!(ledger.lock().len(), 4);
        drop(first);
        assert_eq!(ledger.lock().len(), 3);
        ledger.enter(member(1000), 2).unwrap();
    }

    #[test]
    fn others_claims_count_against_the_space_less_what_they_wrote_and_wholly_against_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let staged = dir.path().join("staged");
        std::fs::write(&staged, vec![1u8; 1 << 20]).unwrap();
        let ledger = Arc::new(Ledger::default());
        let me = ledger.enter(member(1000), 4).unwrap();
        let mine_too = ledger.enter(member(1000), 4).unwrap();
        let theirs = ledger.enter(member(1001), 4).unwrap();
        for (who, claim) in [(&mine_too, 8 << 20), (&theirs, 4 << 20)] {
            let mut entries = ledger.lock();
            let e = entries.iter_mut().find(|e| e.id == who.id).unwrap();
            e.claim = claim;
            e.staged = Some(staged.clone());
        }
        let (space, quota) = ledger.others(me.id, member(1000));
        // 1 MiB of each is written already (the free space shows it).
        let written = std::fs::symlink_metadata(&staged).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let written = written.unwrap();
        assert!(written >= 1 << 20);
        assert_eq!(space, (8 << 20) - written + (4 << 20) - written);
        assert_eq!(quota, 8 << 20);
        drop(theirs);
        assert_eq!(ledger.others(me.id, member(1000)).0, (8 << 20) - written);
    }
}
