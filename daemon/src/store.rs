//! Crash-safe files: a record is written whole to a temporary file, synced, and renamed over
//! its name, and the directory is synced, so a reader sees the old record or the new one,
//! never a part of one. A record that changes often (a running build's) is a [`Journal`]
//! instead: each change appends the whole record as one more line and syncs it, and readers
//! take the last complete one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

/// Prefix of temporary files; readers skip them and start-up removes them.
pub const TMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically and durably: a reader, or the next start after a crash
/// or a power loss, sees the old content or the new, never a part. The new file's data is
/// synced before it replaces the old (on XFS, or ext4 without auto_da_alloc, a power loss
/// after renaming unsynced data could leave neither), and the directory after.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("record paths have a parent");
    let name = path.file_name().expect("record paths have a name");
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        name.to_string_lossy(),
        crate::ids::new_id("w")
    ));
    let result = (|| {
        // Root's alone: records say who built what, from what, and how it failed.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as pretty JSON and writes it atomically and durably.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Reads a JSON record: the file's last complete JSON value (a [`Journal`] holds one per
/// change, a record written by [`write_json`] one).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = fs::read(path)?;
    last_value(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// The last of the JSON values in `bytes`, one after the other. What follows the last complete
/// one and does not parse is a crash in the middle of an append, and is skipped.
fn last_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    let mut last = None;
    for value in serde_json::Deserializer::from_slice(bytes).into_iter::<T>() {
        match value {
            Ok(value) => last = Some(value),
            Err(e) => return last.ok_or(e),
        }
    }
    last.ok_or_else(|| serde::de::Error::custom("no record in the file"))
}

/// A record kept as an append-only journal: each [`write`](Self::write) appends the whole
/// record as one line of JSON and syncs its data. No new file, rename or directory sync per
/// change (each costs the filesystem an inode, and a sync of the directory), and a crash in
/// the middle of an append leaves a partial last line that [`read_json`] skips: a reader sees
/// the record before the change or after it, never a part of one.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// `None` after a failed append: the next write replaces the file whole.
    file: Option<File>,
}

impl Journal {
    /// Creates the journal at `path`, which must not exist, holding `value`, durably.
    pub fn create<T: Serialize>(path: &Path, value: &T) -> io::Result<Journal> {
        let line = json_line(value)?;
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let dir = path.parent().expect("record paths have a parent");
        let written = file
            .write_all(&line)
            .and_then(|()| file.sync_data())
            .and_then(|()| sync_dir(dir));
        if let Err(e) = written {
            let _ = fs::remove_file(path);
            return Err(e);
        }
        Ok(Journal {
            path: path.to_owned(),
            file: Some(file),
        })
    }

    /// Appends `value` as the record's new content, durably.
    pub fn write<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        let line = json_line(value)?;
        if let Some(file) = &mut self.file {
            let appended = file.write_all(&line).and_then(|()| file.sync_data());
            if appended.is_err() {
                self.file = None;
            }
            return appended;
        }
        // After a failed append the file may end in a part of a line that a later append
        // would bury, and a failed sync is reported once: start a new file.
        write_atomic(&self.path, &line)?;
        self.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }
}

/// `value` as one line of JSON.
fn json_line<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// Every `*.json` record in `dir` (none if `dir` does not exist), skipping temporary files.
pub fn list_json<T: DeserializeOwned>(dir: &Path) -> io::Result<Vec<T>> {
    let mut out = Vec::new();
    for path in json_files(dir)? {
        match read_json(&path) {
            Ok(v) => out.push(v),
            // A record we cannot read is reported, not fatal: the others stay usable.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable record")
            }
        }
    }
    Ok(out)
}

fn json_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with(TMP_PREFIX) && name.ends_with(".json") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Removes temporary files a crash left in `dir`.
pub fn remove_stale_tmp(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
            && entry.file_type()?.is_file()
        {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_json(&path, &vec![1, 2]).unwrap();
        write_json(&path, &vec![3]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![3]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("r.json")]);
    }

    #[test]
    fn a_journal_reads_as_its_last_complete_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.json");
        let mut journal = Journal::create(&path, &vec![1]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![1]);
        journal.write(&vec![1, 2]).unwrap();
        journal.write(&vec![1, 2, 3]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![1, 2, 3]);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3);
        // A crash in the middle of an append: the partial line is skipped.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"[1,2,3,").unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![1, 2, 3]);
        // Or zeros where the data never reached the disk.
        file.write_all(&[0; 16]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![1, 2, 3]);
        // After a failed append, the next write replaces the file whole.
        journal.file = None;
        journal.write(&vec![4]).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "[4]\n");
        journal.write(&vec![5]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&path).unwrap(), vec![5]);
        // A journal is made once; an existing file is not touched.
        fs::write(dir.path().join("k.json"), b"7").unwrap();
        assert!(Journal::create(&dir.path().join("k.json"), &8).is_err());
        assert_eq!(read_json::<i32>(&dir.path().join("k.json")).unwrap(), 7);
        // Nothing but a partial record, or nothing at all, is an error.
        fs::write(dir.path().join("l.json"), b"[1,").unwrap();
        assert!(read_json::<Vec<i32>>(&dir.path().join("l.json")).is_err());
        fs::write(dir.path().join("m.json"), b"").unwrap();
        assert!(read_json::<Vec<i32>>(&dir.path().join("m.json")).is_err());
    }

    #[test]
    fn listing_skips_temporaries_and_broken_records() {
        let dir = tempfile::tempdir().unwrap();
        write_json(&dir.path().join("a.json"), &1).unwrap();
        fs::write(dir.path().join(".tmp-b.json-x"), b"2").unwrap();
        fs::write(dir.path().join("c.json"), b"{half").unwrap();
        assert_eq!(list_json::<i32>(dir.path()).unwrap(), vec![1]);
        assert_eq!(remove_stale_tmp(dir.path()).unwrap(), 1);
        assert!(list_json::<i32>(&dir.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}
