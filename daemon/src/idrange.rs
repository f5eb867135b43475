//! The host ids of members' builds: each member's provisioners are root of user namespaces
//! whose ids 0 to 65 535 are a range of 65 536 host ids of that member's alone.
//!
//! A range is given to a member at their first build and kept (`id-ranges.json` in the state
//! directory, root's): the ids a build leaves anywhere (a file made through a descriptor handed
//! into it) stay that member's, and no two members' builds ever share ids. Were they to share
//! them, the kernel's checks of signals, ptrace and `/proc/PID/root` (which compare host ids,
//! whatever the namespace) would let one member's build into another's image and workspace.
//! The ranges lie in `[build_id_base, build_id_base + 65536 × build_id_ranges)`, ids no host user
//! or group may have (checked at start against the passwd, group, subuid and subgid files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Failure;
use amidala::proto::ErrorCode;

/// Ids in one range.
pub const RANGE: u32 = crate::unpack::MAPPED_IDS as u32;

const FILE: &str = "id-ranges.json";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Ranges {
    /// uid → index of the range.
    users: BTreeMap<u32, u32>,
}

/// The ranges given so far, and where they are kept.
#[derive(Debug)]
pub struct IdRanges {
    path: PathBuf,
    first: u32,
    count: u32,
    given: Mutex<Ranges>,
}

impl IdRanges {
    /// The ranges of the state directory `state`, among `count` ranges from host id `first`.
    pub fn open(state: &Path, first: u32, count: u32) -> std::io::Result<IdRanges> {
        let path = state.join(FILE);
        let given = match crate::store::read_json::<Ranges>(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ranges::default(),
            Err(e) => return Err(e),
        };
        if let Some((uid, index)) = given.users.iter().find(|(_, &i)| i >= count) {
            return Err(std::io::Error::other(format!(
                "{}: uid {uid} has range {index}, beyond build_id_ranges = {count}",
                path.display()
            )));
        }
        Ok(IdRanges {
            path,
            first,
            count,
            given: Mutex::new(given),
        })
    }

    /// The first host id of `uid`'s range, given now if it has none (and kept on disk before
    /// it is used).
    pub fn base_of(&self, uid: u32) -> Result<u32, Failure> {
        let mut given = self.given.lock().expect("id ranges lock");
        let index = match given.users.get(&uid) {
            Some(&index) => index,
            None => {
                let taken: std::collections::BTreeSet<u32> =
                    given.users.values().copied().collect();
                let index = (0..self.count)
                    .find(|i| !taken.contains(i))
                    .ok_or_else(|| {
                        Failure::new(
                            ErrorCode::LimitExceeded,
                            format!(
                                "every one of the {} id ranges of builds is some member's \
                             (build_id_ranges): ask an admin for more",
                                self.count
                            ),
                        )
                    })?;
                given.users.insert(uid, index);
                if let Err(e) = crate::store::write_json(&self.path, &*given) {
                    given.users.remove(&uid);
                    return Err(Failure::io("keeping the build's id range", e));
                }
                index
            }
        };
        Ok(self.first + index * RANGE)
    }
}

/// Host users and groups (from passwd, group, subuid and subgid files) whose ids fall in
/// `ids`, one line each: none may, or their owner would own builds' files.
pub fn holders_in(ids: std::ops::Range<u64>, files: &[(&Path, IdFile)]) -> Vec<String> {
    let inside = |id: u64, n: u64| id < ids.end && id + n > ids.start;
    let mut found = Vec::new();
    for (path, kind) in files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let fields: Vec<&str> = line.split(':').collect();
            let (id, n) = match kind {
                IdFile::Passwd | IdFile::Group => (fields.get(2), Some("1")),
                IdFile::Sub => (fields.get(1), fields.get(2).copied()),
            };
            let (Some(Ok(id)), Some(Ok(n))) = (id.map(|s| s.parse::<u64>()), n.map(str::parse))
            else {
                continue;
            };
            if inside(id, n) {
                found.push(format!("{}: {}", path.display(), fields[0]));
            }
        }
    }
    found
}

/// The kind of an id file, for [`holders_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdFile {
    /// `name:x:ID:...` (passwd and group).
    Passwd,
    Group,
    /// `name:FIRST:COUNT` (subuid and subgid).
    Sub,
}

/// The host's id files.
pub fn host_id_files() -> [(&'static Path, IdFile); 4] {
    [
        (Path::new("/etc/passwd"), IdFile::Passwd),
        (Path::new("/etc/group"), IdFile::Group),
        (Path::new("/etc/subuid"), IdFile::Sub),
        (Path::new("/etc/subgid"), IdFile::Sub),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_keeps_a_range_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let ranges = IdRanges::open(dir.path(), 0x7000_0000, 2).unwrap();
        let alice = ranges.base_of(1000).unwrap();
        let bob = ranges.base_of(1001).unwrap();
        assert_eq!(alice, 0x7000_0000);
        assert_eq!(bob, 0x7000_0000 + RANGE);
        assert_eq!(ranges.base_of(1000).unwrap(), alice, "kept");
        let full = ranges.base_of(1002).unwrap_err();
        assert_eq!(full.code, ErrorCode::LimitExceeded);
        assert!(full.message.contains("build_id_ranges"), "{}", full.message);
        // Kept across restarts.
        let again = IdRanges::open(dir.path(), 0x7000_0000, 2).unwrap();
        assert_eq!(again.base_of(1001).unwrap(), bob);
        assert!(
            IdRanges::open(dir.path(), 0x7000_0000, 1).is_err(),
            "fewer ranges"
        );
    }

    #[test]
    fn host_ids_in_the_ranges_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let subuid = dir.path().join("subuid");
        std::fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nodd:x:1879048200:1::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(&subuid, "alice:100000:65536\nbob:1879000000:100000\n").unwrap();
        let files = [
            (passwd.as_path(), IdFile::Passwd),
            (subuid.as_path(), IdFile::Sub),
        ];
        let found = holders_in(0x7000_0000..0x7001_0000, &files);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].ends_with(": odd") && found[1].ends_with(": bob"),
            "{found:?}"
        );
        assert!(holders_in(0x7100_0000..0x7101_0000, &files).is_empty());
    }
}
