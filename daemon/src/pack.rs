//! A directory import's first step, run with the importing user's own credentials (uid, gid
//! and groups, as the daemon saw their client): the directory the client handed over, read
//! with the user's rights and written as a tar stream (owners, modes, times, links, device
//! nodes, extended attributes, holes of sparse files) for the import's sandbox to unpack.
//!
//! It holds nothing of the daemon's: the directory (descriptor 3) and its standard streams.
//! The user may do what they like with this process; it is theirs, and what it writes is
//! untrusted, as any archive a user imports.
//!
//! `amidalad-exec __pack count` prints the [`Usage`] the stream will need (what the files
//! hold, holes not counted) as one JSON line; `__pack tar` writes the stream to stdout.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;
use std::rc::Rc;

use nix::fcntl::OFlag;

use crate::unpack::Usage;

/// The argument that makes `amidalad-exec` the packer.
pub const PACK_ARG: &str = "__pack";
/// The descriptor of the directory in the packer.
pub const DIR_FD: RawFd = 3;
const BLOCK: u64 = 4096;

/// Entry point of `amidalad-exec __pack count|tar`.
pub fn main(mode: &OsStr) -> ! {
    let result = match mode.to_str() {
        Some("count") => walk(|_| Ok(()), true).map(|usage| {
            let mut line = serde_json::to_vec(&usage).expect("usage serializes");
            line.push(b'\n');
            let _ = io::stdout().write_all(&line);
        }),
        Some("tar") => {
            let out = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
            let mut builder = tar::Builder::new(out);
            builder.mode(tar::HeaderMode::Complete);
            walk(|entry| entry.append(&mut builder), false)
                .and_then(|_| builder.into_inner().map(drop).map_err(|e| e.to_string()))
        }
        _ => Err("usage: __pack count|tar".into()),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

/// One entry of the tree, as it is appended.
struct Entry<'a> {
    /// Relative to the directory, `.` for the directory itself.
    path: PathBuf,
    /// `/proc/self/fd/<parent>/<name>`, to read the entry's metadata and attributes without
    /// following it if it is a symbolic link.
    at: PathBuf,
    meta: std::fs::Metadata,
    /// The first path of a file with several links, for the later ones.
    link_to: Option<PathBuf>,
    parent: &'a OwnedFd,
    name: OsString,
}

fn open_at(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
    Ok(crate::sys::open_at(dir.as_fd(), name, flags)?)
}

/// Walks the directory of [`DIR_FD`] depth-first, calling `each` on every entry (parents
/// before children), and returns what the entries hold. `count_only`: files are not read.
fn walk(
    mut each: impl FnMut(&Entry<'_>) -> Result<(), String>,
    count_only: bool,
) -> Result<Usage, String> {
    // SAFETY: the daemon passes the directory as this descriptor, for the packer's life.
    let root = Rc::new(unsafe { OwnedFd::from_raw_fd(DIR_FD) });
    let mut usage = Usage::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut pending: Vec<(Rc<OwnedFd>, OsString, PathBuf)> = Vec::new();
    let mut visit = |parent: &Rc<OwnedFd>,
                     name: &OsStr,
                     path: PathBuf,
                     pending: &mut Vec<(Rc<OwnedFd>, OsString, PathBuf)>|
     -> Result<(), String> {
        let at = PathBuf::from(format!("/proc/self/fd/{}", parent.as_raw_fd())).join(name);
        let meta =
            std::fs::symlink_metadata(&at).map_err(|e| format!("{}: {e}", path.display()))?;
        let link_to = if meta.is_file() && meta.nlink() > 1 {
            match links.get(&(meta.dev(), meta.ino())) {
                Some(first) => Some(first.clone()),
                None => {
                    links.insert((meta.dev(), meta.ino()), path.clone());
                    None
                }
            }
        } else {
            None
        };
        usage.inodes += 1;
        usage.saw(&path, meta.is_file());
        if link_to.is_none() {
            usage.bytes += if meta.is_file() {
                // What the file holds (its blocks), not its length: holes stay holes.
                (meta.blocks() * 512).min(meta.len().div_ceil(BLOCK) * BLOCK)
            } else {
                BLOCK
            };
        }
        let is_dir = meta.is_dir();
        let entry = Entry {
            path: path.clone(),
            at,
            meta,
            link_to,
            parent,
            name: name.to_owned(),
        };
        if !count_only {
            each(&entry)?;
        }
        if is_dir {
            pending.push((parent.clone(), name.to_owned(), path));
        }
        Ok(())
    };
    visit(&root, OsStr::new("."), PathBuf::from("."), &mut pending)?;
    while let Some((parent, name, path)) = pending.pop() {
        let dir = Rc::new(
            open_at(&parent, &name, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let mut names: Vec<OsString> = nix::dir::Dir::from_fd(
            nix::unistd::dup(dir.as_raw_fd()).map_err(|e| format!("{}: {e}", path.display()))?,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
        // The same tree gives the same archive.
        names.sort();
        for child in names.into_iter().rev() {
            let child_path = if path.as_os_str() == "." {
                PathBuf::from(&child)
            } else {
                path.join(&child)
            };
            visit(&dir, &child, child_path, &mut pending)?;
        }
    }
    Ok(usage)
}

impl Entry<'_> {
    fn fail(&self, e: impl std::fmt::Display) -> String {
        format!("{}: {e}", self.path.display())
    }

    /// The entry's extended attributes that a user may read (`trusted.*` needs privilege),
    /// as PAX records.
    fn xattrs(&self) -> Vec<(String, Vec<u8>)> {
        let Ok(path) = CString::new(self.at.as_os_str().as_bytes()) else {
            return Vec::new();
        };
        let mut names = vec![0u8; 64 * 1024];
        // SAFETY: llistxattr writes at most `names.len()` bytes into `names`.
        let n = unsafe { libc::llistxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n <= 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for name in names[..n as usize]
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
        {
            let Ok(cname) = CString::new(name) else {
                continue;
            };
            let mut value = vec![0u8; 64 * 1024];
            // SAFETY: lgetxattr writes at most `value.len()` bytes into `value`.
            let len = unsafe {
                libc::lgetxattr(
                    path.as_ptr(),
                    cname.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if len >= 0 {
                value.truncate(len as usize);
                out.push((
                    format!("SCHILY.xattr.{}", String::from_utf8_lossy(name)),
                    value,
                ));
            }
        }
        out
    }

    fn append<W: Write>(&self, builder: &mut tar::Builder<W>) -> Result<(), String> {
        let xattrs = self.xattrs();
        if !xattrs.is_empty() {
            builder
                .append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|e| self.fail(e))?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&self.meta, tar::HeaderMode::Complete);
        let kind = self.meta.file_type();
        if let Some(first) = &self.link_to {
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            return builder
                .append_link(&mut header, &self.path, first)
                .map_err(|e| self.fail(e));
        }
        if kind.is_symlink() {
            let target = std::fs::read_link(&self.at).map_err(|e| self.fail(e))?;
            return builder
                .append_link(&mut header, &self.path, target)
                .map_err(|e| self.fail(e));
        }
        if kind.is_file() {
            let file = File::from(
                open_at(self.parent, &self.name, OFlag::O_RDONLY | OFlag::O_NONBLOCK)
                    .map_err(|e| self.fail(e))?,
            );
            let regions = data_regions(&file, self.meta.len()).map_err(|e| self.fail(e))?;
            // The probes moved the descriptor's position.
            (&file)
                .seek(io::SeekFrom::Start(0))
                .map_err(|e| self.fail(e))?;
            let whole = regions.len() == 1 && regions[0] == (0, self.meta.len());
            if whole || self.meta.len() == 0 {
                // What the header says, even if the file grows meanwhile.
                return builder
                    .append_data(&mut header, &self.path, file.take(self.meta.len()))
                    .map_err(|e| self.fail(e));
            }
            return append_sparse(builder, header, &self.path, file, &regions, self.meta.len())
                .map_err(|e| self.fail(e));
        }
        // Directories, device nodes, FIFOs: the header says it all (sockets are skipped).
        if kind.is_socket() {
            return Ok(());
        }
        if kind.is_char_device() || kind.is_block_device() {
            // The tar crate leaves device numbers at 0.
            let rdev = self.meta.rdev();
            let major = nix::sys::stat::major(rdev) as u32;
            let minor = nix::sys::stat::minor(rdev) as u32;
            header
                .set_device_major(major)
                .and_then(|()| header.set_device_minor(minor))
                .map_err(|e| self.fail(e))?;
        }
        builder
            .append_data(&mut header, &self.path, io::empty())
            .map_err(|e| self.fail(e))
    }
}

/// The data regions of `file` (offset, length), by SEEK_DATA and SEEK_HOLE.
fn data_regions(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut regions = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(at) => at,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole)?.min(len as i64);
        regions.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(regions)
}

/// Appends a file with holes as a GNU sparse entry: its map in the header (and extension
/// headers for more than four regions), then the regions' data.
fn append_sparse<W: Write>(
    builder: &mut tar::Builder<W>,
    mut header: tar::Header,
    path: &std::path::Path,
    file: File,
    regions: &[(u64, u64)],
    len: u64,
) -> io::Result<()> {
    // An empty region at the end records the file's length when it ends in a hole.
    let mut map: Vec<(u64, u64)> = regions.to_vec();
    if map.last().is_none_or(|&(at, n)| at + n < len) {
        map.push((len, 0));
    }
    let data: u64 = regions.iter().map(|r| r.1).sum();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_size(data);
    let (first, rest) = map.split_at(map.len().min(4));
    {
        let gnu = header.as_gnu_mut().expect("a GNU header");
        gnu.set_real_size(len);
        for (slot, &(at, n)) in gnu.sparse.iter_mut().zip(first) {
            slot.set_offset(at);
            slot.set_length(n);
        }
        gnu.set_is_extended(!rest.is_empty());
    }
    let mut extensions = Vec::new();
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(at, n)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(at);
            slot.set_length(n);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        extensions.extend_from_slice(ext.as_bytes());
    }
    let data = Regions {
        file: &file,
        regions,
        region: 0,
        done: 0,
    };
    builder.append_data(&mut header, path, io::Cursor::new(extensions).chain(data))
}

/// The data of a file's regions, one after the other, read by offset.
struct Regions<'a> {
    file: &'a File,
    regions: &'a [(u64, u64)],
    region: usize,
    /// Bytes of the current region read so far.
    done: u64,
}

impl Read for Regions<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        while let Some(&(at, len)) = self.regions.get(self.region) {
            if self.done == len {
                self.region += 1;
                self.done = 0;
                continue;
            }
            let want = buf.len().min((len - self.done) as usize);
            let n = self.file.read_at(&mut buf[..want], at + self.done)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was read",
                ));
            }
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}
