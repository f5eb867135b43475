//! What an import's sandbox does with the user's archive: decompress it, read its entries,
//! and either measure them (the first pass, which sizes the image) or unpack them into the
//! image's root (the second).
//!
//! This is the only code that parses an import's data, and it runs only in the sandbox of
//! [`crate::importer`]: an unprivileged process (ids of a range no host user has, in a user
//! namespace of its own), pivoted into the new image's filesystem, without network, under a
//! seccomp allow-list of file system calls. It writes through the kernel's filesystem driver
//! into an image the daemon made and sized: no tool that parses the archive (mke2fs's `-d` had
//! a heap overflow on long paths) ever runs with privilege, and what it writes cannot outgrow
//! the filesystem it was given.
//!
//! Device nodes and FIFOs are not made here (a user namespace may not make devices): they are
//! listed, and the importer makes them afterwards, from the list, in the image.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use serde::{Deserialize, Serialize};

/// How an archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Gzip,
    Xz,
}

/// The most memory the xz decoder may use (xz -9 needs 65 MiB; a stream asking for more is
/// refused, not allowed to exhaust the sandbox).
const XZ_MEMLIMIT: u64 = 512 << 20;
/// Owners an image's files may have: the ids the sandbox's user namespace maps.
pub const MAPPED_IDS: u64 = 65536;
/// Device nodes and FIFOs an archive may hold.
pub const MAX_SPECIAL: usize = 65536;
/// The longest path of an entry, in bytes (the kernel's own limit).
pub const MAX_PATH: usize = 4095;
const BLOCK: u64 = 4096;

/// Space a tree takes: bytes of data rounded to blocks (sparse files count what they hold, not
/// their length), and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
    /// The tree holds a kernel and an initramfs where amidala looks for them
    /// ([`crate::bootcfg::boot_file`]): it can be made a bootable disk.
    #[serde(default)]
    pub kernel: bool,
    #[serde(default)]
    pub initramfs: bool,
}

impl Usage {
    /// Notes what the entry at `path` (relative to the tree's root) is to booting.
    pub fn saw(&mut self, path: &Path, regular_file: bool) {
        if regular_file {
            match crate::bootcfg::boot_file(path) {
                Some(true) => self.kernel = true,
                Some(false) => self.initramfs = true,
                None => {}
            }
        }
    }

    /// Whether the tree can be made a bootable disk.
    pub fn bootable(&self) -> bool {
        self.kernel && self.initramfs
    }
}

/// A device node or FIFO for the importer to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Special {
    /// Relative to the image's root, plain components.
    pub path: PathBuf,
    pub kind: SpecialKind,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialKind {
    Char,
    Block,
    Fifo,
}

/// What unpacking did besides writing files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unpacked {
    pub specials: Vec<Special>,
    /// Extended attributes the sandbox may not set (`security.*` but capabilities,
    /// `trusted.*`): skipped, and said so.
    pub skipped_xattrs: u64,
    pub entries: u64,
}

/// Reads a file from its start by offset (`pread`), not by the descriptor's shared position,
/// which its owner could move under us.
#[derive(Debug)]
pub struct Positioned {
    file: File,
    pos: u64,
}

impl Positioned {
    pub fn new(file: File) -> Positioned {
        Positioned { file, pos: 0 }
    }
}

impl Read for Positioned {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The archive in `input`, decompressed.
pub fn decompressed<'a>(
    input: impl Read + 'a,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    let input = io::BufReader::with_capacity(1 << 16, input);
    Ok(match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMLIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(io::Error::other)?;
            Box::new(liblzma::read::XzDecoder::new_stream(input, stream))
        }
    })
}

/// An entry's path, relative and plain: leading `/` and `.` dropped, `..` refused, bounded.
fn entry_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("a path with a NUL byte".into());
    }
    if raw.len() > MAX_PATH {
        return Err(format!(
            "a path of {} bytes (at most {MAX_PATH}): {}…",
            raw.len(),
            String::from_utf8_lossy(&raw[..64])
        ));
    }
    let mut path = PathBuf::new();
    for part in Path::new(OsStr::from_bytes(raw)).components() {
        match part {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(format!(
                    "{}: a path with `..`, which would leave the image",
                    String::from_utf8_lossy(raw)
                ))
            }
            Component::Normal(p) => path.push(p),
        }
    }
    Ok(path)
}

/// An error about the entry at `path`.
fn at(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Refuses an entry of a sparse file in the POSIX (PAX) formats, which the tar reader does
/// not expand: it would be unpacked as its encoded form, under another name.
fn refuse_pax_sparse(entry: &mut tar::Entry<'_, impl Read>, path: &Path) -> Result<(), String> {
    let sparse = match entry.pax_extensions() {
        Ok(Some(mut extensions)) => extensions.any(|e| {
            e.ok()
                .and_then(|e| e.key().ok().map(|k| k.starts_with("GNU.sparse.")))
                .unwrap_or(false)
        }),
        _ => false,
    };
    let encoded_name = path
        .components()
        .any(|c| c.as_os_str().as_bytes().starts_with(b"GNUSparseFile."));
    if sparse || encoded_name {
        return Err(at(
            path,
            "a sparse file in the POSIX format (GNU tar's -S with --xattrs or --format=posix), \
             which amidala does not read: make the archive without -S, or with --format=gnu",
        ));
    }
    Ok(())
}

/// The owner of an entry, if the sandbox can give it: ids up to [`MAPPED_IDS`].
fn owner(header: &tar::Header, path: &Path) -> Result<(u32, u32), String> {
    let uid = header.uid().map_err(|e| at(path, e))?;
    let gid = header.gid().map_err(|e| at(path, e))?;
    if uid >= MAPPED_IDS || gid >= MAPPED_IDS {
        return Err(at(
            path,
            format!(
                "owned by uid {uid} and gid {gid}: an import keeps owners 0 to {}",
                MAPPED_IDS - 1
            ),
        ));
    }
    Ok((uid as u32, gid as u32))
}

/// Measures the archive: what its entries hold, and how many there are; fails as soon as they
/// hold more than `budget` bytes. Checks every entry as unpacking would (paths, owners,
/// kinds), so that a bad archive is refused before anything is made.
pub fn scan(archive: impl Read, budget: u64) -> Result<Usage, String> {
    let mut usage = Usage::default();
    let mut specials = 0usize;
    for_each_entry(archive, |entry, path, _| {
        let header = entry.header();
        let kind = header.entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            specials += 1;
            if specials > MAX_SPECIAL {
                return Err(format!(
                    "more than {MAX_SPECIAL} device nodes and FIFOs in the archive"
                ));
            }
        }
        // What the entry's data takes (a sparse member: its data, not its length).
        let size = header.entry_size().map_err(|e| at(&path, e))?;
        usage.inodes += 1;
        usage.saw(&path, kind.is_file());
        usage.bytes = usage
            .bytes
            .saturating_add(size.div_ceil(BLOCK) * BLOCK)
            .saturating_add(if kind.is_dir() { BLOCK } else { 0 });
        if usage.bytes > budget {
            return Err(format!(
                "the archive holds more than {} MiB, what this import may take (free space in the \
                 state directory, your quota)",
                budget >> 20
            ));
        }
        Ok(())
    })?;
    Ok(usage)
}

/// Calls `each` on every entry of the archive that is not refused (paths, owners, POSIX sparse
/// files: see [`scan`]), with its checked path and owner.
fn for_each_entry<R: Read>(
    archive: R,
    mut each: impl FnMut(&mut tar::Entry<'_, R>, PathBuf, (u32, u32)) -> Result<(), String>,
) -> Result<(), String> {
    let mut archive = tar::Archive::new(archive);
    for entry in archive
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let path = entry_path(&entry.path_bytes())?;
        refuse_pax_sparse(&mut entry, &path)?;
        let owner = owner(entry.header(), &path)?;
        each(&mut entry, path, owner)?;
    }
    Ok(())
}

/// Unpacks the archive into the directory `root` (the image's root, which the sandbox is
/// pivoted into), keeping owners, modes, times, hard and symbolic links, holes, and the
/// extended attributes the sandbox may set. Device nodes and FIFOs are listed for the
/// importer. A later entry of a path replaces an earlier one, as tar does.
///
/// Entries are made relative to directory descriptors, the parent of the last entry kept:
/// a tree thousands of directories deep costs each entry one step, not its depth. Symbolic
/// links on the way are followed, as tar follows them; they cannot lead out of the image,
/// which is all the sandbox can see.
pub fn unpack(archive: impl Read, root: &Path) -> Result<Unpacked, String> {
    let mut done = Unpacked::default();
    let mut tree = Tree::open(root).map_err(|e| format!("opening the image: {e}"))?;
    // Directories' times, set at the end: what is made in them changes them.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    // Checked here too: the archive may differ from the one the scan measured.
    for_each_entry(archive, |entry, path, (uid, gid)| {
        done.entries += 1;
        let header = entry.header().clone();
        let mode = header.mode().map_err(|e| at(&path, e))? & 0o7777;
        let mtime = header.mtime().map_or(0, |t| t as i64);
        let kind = header.entry_type();
        let special = if kind.is_character_special() {
            Some(SpecialKind::Char)
        } else if kind.is_block_special() {
            Some(SpecialKind::Block)
        } else if kind.is_fifo() {
            Some(SpecialKind::Fifo)
        } else {
            None
        };
        if let Some(kind) = special {
            if path.as_os_str().is_empty() {
                return Err("a device node as the image's root".into());
            }
            if done.specials.len() >= MAX_SPECIAL {
                return Err(format!(
                    "more than {MAX_SPECIAL} device nodes and FIFOs in the archive"
                ));
            }
            done.specials.push(Special {
                kind,
                major: header.device_major().ok().flatten().unwrap_or(0),
                minor: header.device_minor().ok().flatten().unwrap_or(0),
                mode,
                uid,
                gid,
                mtime,
                path,
            });
            return Ok(());
        }
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            return Ok(());
        }
        let xattrs: Vec<(String, Vec<u8>)> = match entry.pax_extensions() {
            Ok(Some(extensions)) => extensions
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let key = e.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_owned();
                    Some((key, e.value_bytes().to_vec()))
                })
                .collect(),
            _ => Vec::new(),
        };
        let link = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .filter(|l| !l.is_empty());
        let made = if kind.is_dir() {
            tree.dir(&path, uid, gid, mode).map(|()| {
                dir_times.push((path.clone(), mtime));
                None
            })
        } else if kind.is_symlink() {
            let target = link.ok_or_else(|| at(&path, "a symbolic link to nothing"))?;
            tree.symlink(&path, &target, uid, gid, mtime).map(|()| None)
        } else if kind.is_hard_link() {
            let target = link.ok_or_else(|| at(&path, "a hard link to nothing"))?;
            tree.hard_link(&path, &entry_path(&target)?).map(|()| None)
        } else if kind.is_gnu_sparse() {
            // The tar reader knows where the holes are, and seeks over them.
            tree.sparse_file(&path, entry, uid, gid, mode, mtime)
                .map(Some)
        } else {
            // Regular files, and (as POSIX says) any kind not known.
            tree.file(&path, entry, uid, gid, mode, mtime).map(Some)
        };
        let file = made.map_err(|e| at(&path, e))?;
        for (name, value) in xattrs {
            let set = match &file {
                Some(file) => set_xattr_fd(file.as_raw_fd(), &name, &value),
                None => tree.set_xattr(&path, &name, &value),
            };
            match set {
                Ok(()) => {}
                // What a user namespace may not set (SELinux labels, trusted.*): skipped.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM | libc::EOPNOTSUPP | libc::EACCES)
                    ) && !name.starts_with("user.") =>
                {
                    done.skipped_xattrs += 1
                }
                Err(e) => return Err(at(&path, format!("setting {name}: {e}"))),
            }
        }
        Ok(())
    })?;
    for (path, mtime) in dir_times.iter().rev() {
        tree.set_times(path, *mtime).map_err(|e| at(path, e))?;
    }
    Ok(done)
}

/// The image's tree, as the unpacker walks it: its root, and the directory of the last entry.
struct Tree {
    root: OwnedFd,
    /// The directory `.0` (relative to the root) and its descriptor.
    last: Option<(PathBuf, OwnedFd)>,
}

/// The directory `name` of `dir`; a symbolic link is followed, as tar follows links on the
/// way to an entry (the sandbox sees nothing but the image for it to lead to).
fn dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes what is at `name` in `dir`, unless it is a directory and `keep_dir`.
fn clear(dir: BorrowedFd<'_>, name: &OsStr, keep_dir: bool) -> io::Result<()> {
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) => {
            let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
            if is_dir && keep_dir {
                return Ok(());
            }
            let flag = if is_dir {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            Ok(unlinkat(Some(dir.as_raw_fd()), name, flag)?)
        }
    }
}

impl Tree {
    fn open(root: &Path) -> io::Result<Tree> {
        Ok(Tree {
            root: crate::sys::open_dir(root)?,
            last: None,
        })
    }

    /// The directory `dir` of the image, made (root's, 0755, as tar makes the directories an
    /// archive implies) where it is missing.
    fn parent(&mut self, dir: &Path) -> io::Result<BorrowedFd<'_>> {
        let hit = matches!(&self.last, Some((path, _)) if path == dir);
        if !hit {
            // From the last directory if this one is below it, else from the root.
            let (mut fd, rest): (OwnedFd, &Path) = match &self.last {
                Some((path, fd)) if dir.starts_with(path) => {
                    (fd.try_clone()?, dir.strip_prefix(path).expect("a prefix"))
                }
                _ => (self.root.try_clone()?, dir),
            };
            for part in rest.iter() {
                fd = match dir_at(fd.as_fd(), part) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        nix::sys::stat::mkdirat(
                            Some(fd.as_raw_fd()),
                            part,
                            Mode::from_bits_truncate(0o755),
                        )?;
                        dir_at(fd.as_fd(), part)?
                    }
                    other => other?,
                };
            }
            self.last = Some((dir.to_owned(), fd));
        }
        Ok(self.last.as_ref().expect("just set").1.as_fd())
    }

    /// The directory holding `path` and `path`'s name in it (the root for the root itself).
    fn place<'a>(&mut self, path: &'a Path) -> io::Result<(BorrowedFd<'_>, &'a OsStr)> {
        match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok((self.parent(parent)?, name)),
            _ => Ok((self.root.as_fd(), OsStr::new("."))),
        }
    }

    fn owner_and_mode(
        dir: BorrowedFd<'_>,
        name: &OsStr,
        uid: u32,
        gid: u32,
        mode: Option<u32>,
    ) -> io::Result<()> {
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            name,
            Some(uid.into()),
            Some(gid.into()),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        // After the owner, which clears setuid and setgid bits.
        if let Some(mode) = mode {
            nix::sys::stat::fchmodat(
                Some(dir.as_raw_fd()),
                name,
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
        }
        Ok(())
    }

    fn dir(&mut self, path: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
        let (dir, name) = self.place(path)?;
        if name != "." {
            clear(dir, name, true)?;
            match nix::sys::stat::mkdirat(
                Some(dir.as_raw_fd()),
                name,
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Self::owner_and_mode(dir, name, uid, gid, Some(mode))
    }

    fn symlink(
        &mut self,
        path: &Path,
        target: &[u8],
        uid: u32,
        gid: u32,
        mtime: i64,
    ) -> io::Result<()> {
        let (dir, name) = self.place(path)?;
        clear(dir, name, false)?;
        nix::unistd::symlinkat(OsStr::from_bytes(target), Some(dir.as_raw_fd()), name)?;
        Self::owner_and_mode(dir, name, uid, gid, None)?;
        Self::times(dir, name, mtime)
    }

    fn hard_link(&mut self, path: &Path, target: &Path) -> io::Result<()> {
        let root = self.root.try_clone()?;
        let (dir, name) = self.place(path)?;
        clear(dir, name, false)?;
        nix::unistd::linkat(
            Some(root.as_raw_fd()),
            target,
            Some(dir.as_raw_fd()),
            Path::new(name),
            AtFlags::empty(),
        )?;
        Ok(())
    }

    /// A regular file with `data`'s content; blocks of zeros stay holes.
    fn file(
        &mut self,
        path: &Path,
        data: &mut impl Read,
        uid: u32,
        gid: u32,
        mode: u32,
        mtime: i64,
    ) -> io::Result<File> {
        let (dir, name) = self.place(path)?;
        clear(dir, name, false)?;
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut block = vec![0u8; BLOCK as usize];
        let mut at = 0u64;
        loop {
            let n = read_full(data, &mut block)?;
            if n == 0 {
                break;
            }
            if block[..n].iter().any(|&b| b != 0) {
                file.write_all_at(&block[..n], at)?;
            }
            at += n as u64;
        }
        file.set_len(at)?;
        nix::unistd::fchown(file.as_raw_fd(), Some(uid.into()), Some(gid.into()))?;
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
        let time = nix::sys::time::TimeSpec::new(mtime, 0);
        nix::sys::stat::futimens(file.as_raw_fd(), &time, &time)?;
        Ok(file)
    }

    /// A file of a GNU sparse entry: its data written where the entry's map says, by the tar
    /// reader, the holes left as holes (a 1 TiB file of one byte is one block).
    fn sparse_file(
        &mut self,
        path: &Path,
        entry: &mut tar::Entry<'_, impl Read>,
        uid: u32,
        gid: u32,
        mode: u32,
        mtime: i64,
    ) -> io::Result<File> {
        let (dir, name) = self.place(path)?;
        clear(dir, name, false)?;
        // The reader takes a path: the name, in the directory made the working one (the
        // sandbox has no /proc for a path through a descriptor).
        nix::unistd::fchdir(dir.as_raw_fd())?;
        entry
            .unpack(Path::new(name))
            .map_err(|e| io::Error::new(e.kind(), chain(&e)))?;
        Self::owner_and_mode(dir, name, uid, gid, Some(mode))?;
        Self::times(dir, name, mtime)?;
        Ok(File::from(crate::sys::open_at(dir, name, OFlag::O_RDONLY)?))
    }

    fn times(dir: BorrowedFd<'_>, name: &OsStr, mtime: i64) -> io::Result<()> {
        Ok(crate::sys::set_times_at(dir, name, mtime)?)
    }

    fn set_times(&mut self, path: &Path, mtime: i64) -> io::Result<()> {
        let (dir, name) = self.place(path)?;
        Self::times(dir, name, mtime)
    }

    fn set_xattr(&mut self, path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let (dir, file) = self.place(path)?;
        nix::unistd::fchdir(dir.as_raw_fd())?;
        set_xattr(Path::new(file), name, value)
    }
}

/// An error with its causes, `a: b: c` (the tar reader's errors say what failed, their
/// causes why).
fn chain(e: &io::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Fills `buf` from `data` as far as it goes; the bytes read.
fn read_full(data: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match data.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn set_xattr_fd(fd: i32, name: &str, value: &[u8]) -> io::Result<()> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))?;
    // SAFETY: fsetxattr reads the C string and `value` during the call only.
    let rc = unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))?;
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))?;
    // SAFETY: lsetxattr reads the two C strings and `value` during the call only.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_cksum();
            tar.append_data(&mut header, path, *data).unwrap();
        }
        tar.into_inner().unwrap()
    }

    #[test]
    fn paths_stay_inside_and_are_bounded() {
        assert_eq!(
            entry_path(b"./etc/passwd").unwrap(),
            PathBuf::from("etc/passwd")
        );
        assert_eq!(entry_path(b"/etc//x/").unwrap(), PathBuf::from("etc/x"));
        assert!(entry_path(b"etc/../../x").unwrap_err().contains("`..`"));
        assert!(entry_path(&[b'a'; 5000])
            .unwrap_err()
            .contains("5000 bytes"));
    }

    #[test]
    fn the_scan_counts_data_and_stops_at_the_budget() {
        let data = vec![1u8; 10_000];
        let tar = archive(&[("a", &data), ("b", b"x")]);
        let usage = scan(&tar[..], 1 << 20).unwrap();
        assert_eq!(
            usage,
            Usage {
                bytes: 3 * 4096 + 4096,
                inodes: 2,
                ..Usage::default()
            }
        );
        let err = scan(&tar[..], 8192).unwrap_err();
        assert!(err.contains("holds more than"), "{err}");
        // A member with an owner the sandbox cannot give is refused, by name.
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_uid(100_000);
        header.set_gid(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "usr/bin/x", &b""[..])
            .unwrap();
        let err = scan(&builder.into_inner().unwrap()[..], 1 << 20).unwrap_err();
        assert!(err.contains("usr/bin/x: owned by uid 100000"), "{err}");
    }

    #[test]
    fn specials_are_listed_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Char);
        header.set_device_major(1).unwrap();
        header.set_device_minor(3).unwrap();
        header.set_mode(0o666);
        header.set_size(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "dev/null", &b""[..])
            .unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "etc/hi", &b"hi"[..])
            .unwrap();
        let done = unpack(&builder.into_inner().unwrap()[..], dir.path()).unwrap();
        assert_eq!(done.entries, 2);
        assert_eq!(done.specials.len(), 1);
        assert_eq!(done.specials[0].path, PathBuf::from("dev/null"));
        assert_eq!((done.specials[0].major, done.specials[0].minor), (1, 3));
        assert!(!dir.path().join("dev/null").exists());
        assert_eq!(std::fs::read(dir.path().join("etc/hi")).unwrap(), b"hi");
    }
}
