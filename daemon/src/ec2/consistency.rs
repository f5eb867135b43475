//! EC2's eventual consistency: for a while after CreateVolume, CreateSnapshot, RegisterImage or
//! CopyImage, calls naming the new id (Describe*, CreateTags, DeleteTags, deletes) may answer
//! `InvalidVolume.NotFound`, `InvalidSnapshot.NotFound` or `InvalidAMIID.NotFound`.
//!
//! The provider remembers when it made each id ([`Made`]). A NotFound of an id it made less
//! than the window (`[ec2.timeouts] consistency`) ago means "not yet": waits poll on, tags are
//! sent again. A delete is different: once the id was seen to exist (a call naming it
//! succeeded), or once the window has passed, NotFound means the resource is gone, and the
//! delete is done (a retried delete whose first answer was lost meets exactly that). A volume
//! that recovery or gc lists, made less than the window ago by its CreateTime (by this daemon
//! before a crash, say), counts as made then ([`Made::made_ago`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The error codes EC2 answers for an id it does not know (yet).
const NOT_FOUND: [&str; 3] = [
    "InvalidVolume.NotFound",
    "InvalidSnapshot.NotFound",
    "InvalidAMIID.NotFound",
];

/// Whether `code` is EC2's NotFound for a volume, snapshot or image.
pub fn is_not_found(code: Option<&str>) -> bool {
    code.is_some_and(|c| NOT_FOUND.contains(&c))
}

#[derive(Debug, Clone, Copy)]
struct MadeId {
    at: Instant,
    /// A call naming it succeeded: EC2 has known it since.
    seen: bool,
}

/// The ids this daemon made within the window, and when.
#[derive(Debug)]
pub struct Made {
    window: Duration,
    ids: Mutex<HashMap<String, MadeId>>,
}

impl Made {
    pub fn new(window: Duration) -> Made {
        Made {
            window,
            ids: Mutex::new(HashMap::new()),
        }
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, MadeId>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `id` was just made (ids older than the window are forgotten meanwhile).
    pub fn made(&self, id: &str) {
        let now = Instant::now();
        let mut ids = self.ids();
        ids.retain(|_, m| now.duration_since(m.at) < self.window);
        ids.insert(
            id.to_owned(),
            MadeId {
                at: now,
                seen: false,
            },
        );
    }

    /// Notes that `id`, found in a listing, was made `age` ago (by this daemon before it
    /// restarted, say), unless it is known already or older than the window.
    pub fn made_ago(&self, id: &str, age: Duration) {
        if age >= self.window {
            return;
        }
        if let Some(at) = Instant::now().checked_sub(age) {
            self.ids()
                .entry(id.to_owned())
                .or_insert(MadeId { at, seen: false });
        }
    }

    /// Notes that a call naming `id` succeeded.
    pub fn seen(&self, id: &str) {
        if let Some(m) = self.ids().get_mut(id) {
            m.seen = true;
        }
    }

    /// Forgets `id` (deleted).
    pub fn forget(&self, id: &str) {
        self.ids().remove(id);
    }

    /// How much of the window is left in which a NotFound of `id` means "not yet": for a wait
    /// or a tag, the rest of the window since it was made; for a delete, the same unless it
    /// was seen to exist. Zero for an id this daemon did not make (or made long ago).
    pub fn not_yet_for(&self, id: &str, deleting: bool) -> Duration {
        match self.ids().get(id) {
            Some(m) if !(deleting && m.seen) => self.window.saturating_sub(m.at.elapsed()),
            _ => Duration::ZERO,
        }
    }

    /// Whether a NotFound of `id` now means "not yet" (see [`Made::not_yet_for`]).
    pub fn not_yet(&self, id: &str, deleting: bool) -> bool {
        !self.not_yet_for(id, deleting).is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_codes() {
        assert!(is_not_found(Some("InvalidVolume.NotFound")));
        assert!(is_not_found(Some("InvalidSnapshot.NotFound")));
        assert!(is_not_found(Some("InvalidAMIID.NotFound")));
        assert!(!is_not_found(Some("InvalidAMIID.Malformed")));
        assert!(!is_not_found(None));
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_not_yet_within_the_window_and_for_deletes_only_until_seen() {
        let made = Made::new(Duration::from_secs(60));
        assert!(!made.not_yet("vol-1", false), "not made here");
        made.made("vol-1");
        assert!(made.not_yet("vol-1", false) && made.not_yet("vol-1", true));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(made.not_yet_for("vol-1", true), Duration::from_secs(40));
        made.seen("vol-1");
        assert!(
            made.not_yet("vol-1", false),
            "a poll may still meet a lagging replica"
        );
        assert!(
            !made.not_yet("vol-1", true),
            "seen, then not found: deleted"
        );
        made.made("snap-1");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!made.not_yet("snap-1", false) && !made.not_yet("snap-1", true));
        made.made("ami-1");
        assert!(made.ids().get("vol-1").is_none(), "old ids are forgotten");
        made.made_ago("vol-2", Duration::from_secs(50));
        assert_eq!(made.not_yet_for("vol-2", true), Duration::from_secs(10));
        made.made_ago("vol-3", Duration::from_secs(60));
        assert!(!made.not_yet("vol-3", false), "listed, made long ago");
        made.seen("ami-1");
        made.made_ago("ami-1", Duration::ZERO);
        assert!(
            !made.not_yet("ami-1", true),
            "known already: kept as it was"
        );
        made.forget("ami-1");
        assert!(!made.not_yet("ami-1", false));
    }
}
