//! Loop devices: a file (or a region of it) as a block device.
//!
//! Devices are configured with `LO_FLAGS_AUTOCLEAR`, so the kernel releases one by itself once
//! the last holder (our descriptor, a mount) is gone: if the daemon dies, nothing stays
//! attached. [`LoopDevice::detach`] releases it explicitly and waits until the kernel has.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u64 = 7;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8 and later).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device; detached on drop if [`detach`](Self::detach) was not called.
#[derive(Debug)]
pub struct LoopDevice {
    device: Option<File>,
    number: u32,
    path: PathBuf,
    /// Written through (flushed before it is released); a read-only one is not flushed, so
    /// that a source on a filesystem that stalls (FUSE, NFS) cannot hold its release up.
    writable: bool,
}

/// Detaches the loop device at `path` (`/dev/loopN`), whoever attached it. A device still
/// mounted is released by the kernel once unmounted.
pub fn detach_path(path: &Path) -> io::Result<()> {
    let device = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: LOOP_CLR_FD takes no argument; `device` is an open loop device descriptor.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        // ENXIO: it was free already.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

impl LoopDevice {
    /// Attaches `len` bytes of `backing` from `offset` (`len` 0: to the end).
    pub fn attach(
        backing: &Path,
        offset: u64,
        len: u64,
        read_only: bool,
    ) -> io::Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)
            .map_err(|e| with_context(e, format!("opening {}", backing.display())))?;
        Self::attach_file(&file, backing, offset, len, read_only)
    }

    /// Attaches `len` bytes of the open `file` (named `backing` in the device's status) from
    /// `offset`; read-only if `read_only` (which a file opened only for reading must be).
    pub fn attach_file(
        file: &File,
        backing: &Path,
        offset: u64,
        len: u64,
        read_only: bool,
    ) -> io::Result<LoopDevice> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| with_context(e, "opening /dev/loop-control".into()))?;
        let mut name = [0u8; 64];
        let bytes = backing.as_os_str().as_encoded_bytes();
        let n = bytes.len().min(63);
        name[..n].copy_from_slice(&bytes[..n]);
        // Another process may take the free device between our asking and configuring it.
        for _ in 0..64 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; `control` is an open descriptor.
            let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            let number = u32::try_from(number).map_err(|_| {
                with_context(
                    io::Error::last_os_error(),
                    "finding a free loop device".into(),
                )
            })?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            ensure_node(&path, number)?;
            let device = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| with_context(e, format!("opening {}", path.display())))?;
            let config = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: offset,
                    lo_sizelimit: len,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is (repr(C),
            // same layout as <linux/loop.h>), alive for the call; both descriptors are open.
            let rc = unsafe {
                libc::ioctl(
                    device.as_raw_fd(),
                    LOOP_CONFIGURE,
                    &config as *const LoopConfig,
                )
            };
            if rc == 0 {
                return Ok(LoopDevice {
                    device: Some(device),
                    number,
                    path,
                    writable: !read_only,
                });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
                return Err(with_context(
                    err,
                    format!("configuring {} for {}", path.display(), backing.display()),
                ));
            }
        }
        Err(io::Error::other("no free loop device after 64 attempts"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until nothing holds the device exclusively (a mounted filesystem does), so its
    /// data has reached the backing file.
    pub fn wait_unused(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                .open(&self.path)
            {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(with_context(
                        e,
                        format!("waiting for {} to be unmounted", self.path.display()),
                    ))
                }
            }
        }
    }

    /// Detaches the device and waits until the kernel has released it. What was written
    /// through the device and still sits in its page cache (a writer that did not flush, and
    /// did not close the device last, leaves it there) is written to the backing file first.
    pub fn detach(mut self, timeout: Duration) -> io::Result<()> {
        if let (Some(device), true) = (&self.device, self.writable) {
            device
                .sync_all()
                .map_err(|e| with_context(e, format!("flushing {}", self.path.display())))?;
        }
        self.clear()?;
        let backing = PathBuf::from(format!("/sys/block/loop{}/loop/backing_file", self.number));
        let deadline = Instant::now() + timeout;
        while backing.exists() {
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} still attached {timeout:?} after detaching",
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn clear(&mut self) -> io::Result<()> {
        let Some(device) = self.device.take() else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument; `device` is an open loop device descriptor.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) };
        let result = if rc == 0 {
            Ok(())
        } else {
            match Errno::last() {
                // Already cleared (autoclear raced us): nothing to do.
                Errno::ENXIO => Ok(()),
                e => Err(with_context(
                    e.into(),
                    format!("detaching {}", self.path.display()),
                )),
            }
        };
        drop(device);
        result
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            tracing::warn!(device = %self.path.display(), error = %e, "detaching loop device on drop");
        }
    }
}

/// Makes sure `/dev/loopN` exists: devtmpfs creates it, but not every /dev is devtmpfs.
fn ensure_node(path: &Path, number: u32) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => return Ok(()),
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a block device",
                    path.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return match mknod(
                    path,
                    SFlag::S_IFBLK,
                    Mode::from_bits_truncate(0o660),
                    makedev(LOOP_MAJOR, number.into()),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => Ok(()),
                    Err(e) => Err(with_context(
                        e.into(),
                        format!("creating {}", path.display()),
                    )),
                };
            }
            Err(e) => return Err(e),
        }
    }
}

fn with_context(err: io::Error, what: String) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn structs_match_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<super::LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<super::LoopConfig>(), 304);
    }
}
