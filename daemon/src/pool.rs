//! The warm pool: volumes made and attached ahead of time from the newest snapshot carrying a
//! tag, so that a build from that snapshot skips its volume and attach phases and starts
//! mounting at once.
//!
//! Each `[[warm_pool]]` of the configuration is a lane: a source tag and how many volumes to
//! keep ready. One task keeps every lane full: it resolves the tag, throws away volumes of an
//! older snapshot when a newer one appears, and makes what is missing. It runs when a volume
//! is taken, when a build or an import may have made a snapshot, and every `refresh_secs`
//! (a snapshot made by someone else, on EC2); a lane it could not fill (its snapshot still
//! pending, a failure) it tries again after 1 s, then 2, 4, ... up to `refresh_secs`. On shutdown it detaches and deletes every volume
//! it holds.
//!
//! A pool volume is made exactly like a build's, for a build id of its own that no build ever
//! has (the volume's "holder"), and carries the owner `amidala-pool`. While the pool holds it,
//! `gc` counts its holder as live; after a crash nothing holds it, and recovery collects it like
//! any other leftover. A build that takes a volume adopts it (the provider renames or retags it
//! as the build's), and only then does the pool forget the holder.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amidala::proto::{Source, Tag};
use serde::Deserialize;
use tokio::sync::Notify;

use crate::error::Failure;
use crate::ids::new_id;
use crate::provider::{Attachment, Volume};
use crate::Daemon;

/// The owner recorded on pool volumes until a build adopts them.
pub const POOL_OWNER: &str = "amidala-pool";
/// Most volumes one lane may keep.
pub const MAX_POOL_VOLUMES: usize = 16;

/// One `[[warm_pool]]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The source tag (`KEY=VALUE`) of the builds this lane serves.
    pub from: String,
    /// Volumes kept ready (default 1).
    #[serde(default = "one")]
    pub volumes: usize,
    /// Seconds between checks for a newer snapshot with the tag (default 60).
    #[serde(default = "sixty")]
    pub refresh_secs: u64,
}

fn one() -> usize {
    1
}

fn sixty() -> u64 {
    60
}

impl PoolConfig {
    pub fn validate(&self) -> Result<Tag, String> {
        let tag: Tag = self
            .from
            .parse()
            .map_err(|e| format!("warm_pool: from: {e}"))?;
        if self.volumes == 0 || self.volumes > MAX_POOL_VOLUMES {
            return Err(format!(
                "warm_pool {}: volumes must be 1 to {MAX_POOL_VOLUMES}, got {}",
                self.from, self.volumes
            ));
        }
        if self.refresh_secs == 0 {
            return Err(format!(
                "warm_pool {}: refresh_secs must be at least 1",
                self.from
            ));
        }
        Ok(tag)
    }
}

/// A volume made and attached ahead of time.
#[derive(Debug)]
pub struct Warm {
    /// The build id the volume was made for, which no build has.
    pub holder: String,
    pub snapshot: String,
    pub volume: Volume,
    pub attachment: Attachment,
}

impl Warm {
    /// Detaches and deletes the volume.
    pub async fn remove(self, provider: &dyn crate::provider::Provider) -> Result<(), Failure> {
        provider.detach(&self.volume, self.attachment).await?;
        provider.delete_volume(self.volume).await
    }
}

#[derive(Debug)]
struct Lane {
    from: Tag,
    want: usize,
    refresh: Duration,
    /// The snapshot the ready volumes were made from.
    snapshot: Mutex<Option<String>>,
    ready: Mutex<Vec<Warm>>,
}

/// The warm pool of a daemon (empty without `[[warm_pool]]` sections).
#[derive(Debug)]
pub struct Pool {
    lanes: Vec<Lane>,
    wake: Notify,
    /// Holders of the volumes being made, ready, or taken but not yet adopted.
    held: Mutex<HashSet<String>>,
}

impl Pool {
    /// A pool with one lane per (validated) configuration.
    pub fn new(configs: &[PoolConfig]) -> Result<Pool, String> {
        let mut lanes = Vec::new();
        for c in configs {
            let from = c.validate()?;
            if lanes.iter().any(|l: &Lane| l.from == from) {
                return Err(format!("warm_pool {from} is configured twice"));
            }
            lanes.push(Lane {
                from,
                want: c.volumes,
                refresh: Duration::from_secs(c.refresh_secs),
                snapshot: Mutex::new(None),
                ready: Mutex::new(Vec::new()),
            });
        }
        Ok(Pool {
            lanes,
            wake: Notify::new(),
            held: Mutex::new(HashSet::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Whether `build` is the holder of a volume of the pool (for gc).
    pub fn holds(&self, build: &str) -> bool {
        self.held.lock().expect("pool lock").contains(build)
    }

    /// Asks the pool to look again (a volume was taken, a snapshot made).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A ready volume of `snapshot` whose root filesystem is where a build asking for
    /// `partition` wants it. The holder stays held until [`forget`](Self::forget).
    pub fn take(&self, snapshot: &str, partition: Option<u32>) -> Option<Warm> {
        let taken = self.lanes.iter().find_map(|lane| {
            let mut ready = lane.ready.lock().expect("pool lock");
            let at = ready.iter().position(|w| {
                w.snapshot == snapshot
                    && partition.is_none_or(|p| w.attachment.partition == Some(p))
            })?;
            Some(ready.remove(at))
        });
        if taken.is_some() {
            self.wake();
        }
        taken
    }

    /// Ends the pool's hold on a taken volume, once its build has adopted it (or removed it).
    pub fn forget(&self, holder: &str) {
        self.held.lock().expect("pool lock").remove(holder);
    }

    /// Ready volumes, for the log and tests.
    pub fn ready(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.ready.lock().expect("pool lock").len())
            .sum()
    }
}

/// Keeps every lane full until shutdown, then empties the pool.
pub async fn run(daemon: Arc<Daemon>) {
    let pool = &daemon.pool;
    if pool.is_empty() {
        return;
    }
    let refresh = pool.lanes.iter().map(|l| l.refresh).min().expect("a lane");
    // A lane that could not be filled (no completed snapshot with its tag yet, a failure) is
    // tried again soon, then less and less often, up to the refresh interval.
    let first_retry = Duration::from_secs(1).min(refresh);
    let mut retry = first_retry;
    while !daemon.shutdown.is_cancelled() {
        let mut settled = true;
        for lane in &pool.lanes {
            settled &= fill(&daemon, lane).await;
        }
        let pause = if settled {
            retry = first_retry;
            refresh
        } else {
            let pause = retry;
            retry = (retry * 2).min(refresh);
            pause
        };
        tokio::select! {
            () = pool.wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = daemon.shutdown.cancelled() => {}
        }
    }
    for lane in &pool.lanes {
        let stale = std::mem::take(&mut *lane.ready.lock().expect("pool lock"));
        for warm in stale {
            discard(&daemon, warm).await;
        }
    }
    tracing::info!("warm pool drained");
}

/// Brings one lane to the newest snapshot with its tag and to its size; says whether it got
/// there.
async fn fill(daemon: &Daemon, lane: &Lane) -> bool {
    let provider = &daemon.provider;
    let newest = match provider
        .resolve(
            &Source::Tag(lane.from.clone()),
            crate::provider::Viewer::PUBLISHED,
        )
        .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(from = %lane.from, error = %e, "warm pool: no source");
            None
        }
    };
    let current = lane.snapshot.lock().expect("pool lock").clone();
    if newest.as_ref().map(|s| &s.id) != current.as_ref() {
        let stale = std::mem::take(&mut *lane.ready.lock().expect("pool lock"));
        if !stale.is_empty() {
            tracing::info!(from = %lane.from, volumes = stale.len(), "warm pool: the source changed, discarding volumes of the older snapshot");
        }
        for warm in stale {
            discard(daemon, warm).await;
        }
        *lane.snapshot.lock().expect("pool lock") = newest.as_ref().map(|s| s.id.clone());
    }
    let Some(snapshot) = newest else {
        return false;
    };
    while lane.ready.lock().expect("pool lock").len() < lane.want && !daemon.shutdown.is_cancelled()
    {
        let holder = new_id("bld");
        daemon
            .pool
            .held
            .lock()
            .expect("pool lock")
            .insert(holder.clone());
        match make(daemon, &snapshot, &holder).await {
            Ok((volume, attachment)) => {
                tracing::info!(from = %lane.from, snapshot = %snapshot.id, volume = %volume.id, "warm pool: volume ready");
                lane.ready.lock().expect("pool lock").push(Warm {
                    holder,
                    snapshot: snapshot.id.clone(),
                    volume,
                    attachment,
                });
            }
            Err(e) => {
                daemon.pool.forget(&holder);
                tracing::warn!(from = %lane.from, snapshot = %snapshot.id, error = %e, "warm pool: could not make a volume; trying again later");
                return false;
            }
        }
    }
    true
}

/// A volume of `snapshot`, attached.
async fn make(
    daemon: &Daemon,
    snapshot: &crate::catalog::SnapshotRecord,
    holder: &str,
) -> Result<(Volume, Attachment), Failure> {
    let provider = &daemon.provider;
    let volume = provider
        .create_volume(snapshot, None, holder, POOL_OWNER)
        .await?;
    match provider.attach(&volume, None).await {
        Ok(attachment) => Ok((volume, attachment)),
        Err(e) => {
            if let Err(undo) = provider.delete_volume(volume).await {
                tracing::error!(error = %undo, "warm pool: deleting a volume that did not attach");
            }
            Err(e)
        }
    }
}

/// Detaches and deletes a pool volume.
async fn discard(daemon: &Daemon, warm: Warm) {
    let id = warm.volume.id.clone();
    let holder = warm.holder.clone();
    match warm.remove(daemon.provider.as_ref()).await {
        Ok(()) => tracing::info!(volume = %id, "warm pool: volume deleted"),
        // Still held by no one: gc and recovery find it.
        Err(e) => tracing::error!(volume = %id, error = %e, "warm pool: could not remove a volume"),
    }
    daemon.pool.forget(&holder);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Vec<PoolConfig> {
        #[derive(Deserialize)]
        struct File {
            warm_pool: Vec<PoolConfig>,
        }
        toml::from_str::<File>(text).unwrap().warm_pool
    }

    #[test]
    fn lanes_are_validated() {
        let ok = config("[[warm_pool]]\nfrom = \"amidala=base\"\nvolumes = 2\n");
        assert_eq!(ok[0].refresh_secs, 60);
        let pool = Pool::new(&ok).unwrap();
        assert!(!pool.is_empty());
        assert_eq!(pool.ready(), 0);
        assert!(pool.take("snap-0", None).is_none());

        let bad = |text: &str| Pool::new(&config(text)).unwrap_err();
        assert!(bad("[[warm_pool]]\nfrom = \"base\"\n").contains("KEY=VALUE"));
        assert!(bad("[[warm_pool]]\nfrom = \"a=b\"\nvolumes = 0\n").contains("1 to 16"));
        assert!(bad("[[warm_pool]]\nfrom = \"a=b\"\nvolumes = 17\n").contains("1 to 16"));
        assert!(
            bad("[[warm_pool]]\nfrom = \"a=b\"\n[[warm_pool]]\nfrom = \"a=b\"\n").contains("twice")
        );
        assert!(
            toml::from_str::<toml::Value>("[[warm_pool]]\nfrom = \"a=b\"\nsize = 1\n").is_ok_and(
                |v| {
                    v.get("warm_pool")
                        .cloned()
                        .map(|p| p.try_into::<Vec<PoolConfig>>().is_err())
                        .unwrap_or(false)
                }
            )
        );
    }

    #[test]
    fn held_volumes_are_live_until_forgotten() {
        let pool = Pool::new(&config("[[warm_pool]]\nfrom = \"a=b\"\n")).unwrap();
        pool.held.lock().unwrap().insert("bld-1".into());
        assert!(pool.holds("bld-1"));
        pool.forget("bld-1");
        assert!(!pool.holds("bld-1"));
    }
}
