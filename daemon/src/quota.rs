//! Each member's share of the builder's storage: the bytes of their snapshots (as the provider
//! counts them: a local snapshot's disk size, an EBS snapshot's volume size), of the volumes of
//! their running builds, and of their builds' records and logs, against `[limits]
//! user_quota`. Admins have none.

use amidala::proto::{owner_uid, ErrorCode};

use crate::error::Failure;
use crate::provider::Viewer;
use crate::Daemon;

/// What `uid` may still take, `None` for no limit (an admin, or no quota configured).
pub async fn left(daemon: &Daemon, viewer: Viewer) -> Result<Option<u64>, Failure> {
    let (Some(quota), Some(uid)) = (daemon.config.limits.user_quota, viewer.uid) else {
        return Ok(None);
    };
    if viewer.admin {
        return Ok(None);
    }
    Ok(Some(quota.saturating_sub(used(daemon, uid).await?)))
}

/// Bytes `uid` has: snapshots, the volumes of their running builds, and their builds' records
/// and logs.
async fn used(daemon: &Daemon, uid: u32) -> Result<u64, Failure> {
    let snapshots: u64 = daemon
        .provider
        .list_snapshots()
        .await?
        .iter()
        .filter(|s| owner_uid(&s.tags) == Some(uid))
        .map(|s| s.size)
        .sum();
    let volumes: u64 = daemon
        .builds
        .lock()
        .expect("builds lock")
        .values()
        .filter(|b| b.owner_uid == uid)
        .map(|b| b.volume_bytes())
        .sum();
    let catalog = daemon.catalog.clone();
    let builds = crate::error::blocking(move || {
        catalog
            .build_bytes_of(uid)
            .map_err(|e| Failure::io("reading the build records", e))
    })
    .await?;
    Ok(snapshots + volumes + builds)
}

/// Refuses `need` more bytes for `viewer` if their quota does not leave them.
pub async fn check(daemon: &Daemon, viewer: Viewer, need: u64, what: &str) -> Result<(), Failure> {
    let Some(left) = left(daemon, viewer).await? else {
        return Ok(());
    };
    if need > left {
        let quota = daemon.config.limits.user_quota.unwrap_or_default();
        return Err(Failure::new(
            ErrorCode::LimitExceeded,
            format!(
                "{what} needs {} MiB, and your snapshots, running builds and build logs leave {} \
                 MiB of your quota of {} MiB ([limits] user_quota): delete images, snapshots or \
                 builds you no longer need (amidala delete ID)",
                need.div_ceil(1 << 20),
                left >> 20,
                quota >> 20
            ),
        ));
    }
    Ok(())
}
