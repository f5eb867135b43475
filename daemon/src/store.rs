//! Crash-safe files: a record is written whole to a temporary file, synced, and renamed over
//! its name, and the directory is synced, so a reader sees the old record or the new one,
//! never a part of one.

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
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
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

/// Reads a JSON record.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
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
