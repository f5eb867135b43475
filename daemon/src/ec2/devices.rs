//! Where an attached EBS volume appears on this host, and which device names are free.
//!
//! The allocator is the daemon's: a name is held from before AttachVolume until the detach
//! has finished, so concurrent builds never ask EC2 for the same name. A name is also skipped
//! if the instance's block device mappings or the local device nodes already use it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The default attach names, `/dev/sdf` to `/dev/sdp`, as EC2 recommends for EBS volumes.
pub fn default_device_names() -> Vec<String> {
    ('f'..='p').map(|c| format!("/dev/sd{c}")).collect()
}

/// The letters that identify a device name whatever its prefix: `/dev/sdf`, `sdf`,
/// `/dev/xvdf` are all `f`.
pub fn device_key(name: &str) -> String {
    let base = name.trim_start_matches("/dev/");
    base.strip_prefix("xvd")
        .or_else(|| base.strip_prefix("sd"))
        .unwrap_or(base)
        .to_owned()
}

/// Hands out device names; see the module documentation.
#[derive(Debug)]
pub struct DeviceAllocator {
    names: Vec<String>,
    held: Arc<Mutex<BTreeSet<String>>>,
}

/// A device name held for one attachment; released when dropped.
#[derive(Debug)]
pub struct DeviceLease {
    pub name: String,
    held: Arc<Mutex<BTreeSet<String>>>,
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        self.held
            .lock()
            .expect("allocator lock")
            .remove(&device_key(&self.name));
    }
}

impl DeviceAllocator {
    pub fn new(names: Vec<String>) -> DeviceAllocator {
        DeviceAllocator {
            names,
            held: Arc::default(),
        }
    }

    /// The first name that nobody holds, the instance does not map (`mapped`, as
    /// DescribeInstances reports) and no local node uses (`node_exists`).
    pub fn allocate(
        &self,
        mapped: &[String],
        node_exists: impl Fn(&str) -> bool,
    ) -> Option<DeviceLease> {
        let mapped: BTreeSet<String> = mapped.iter().map(|m| device_key(m)).collect();
        let mut held = self.held.lock().expect("allocator lock");
        for name in &self.names {
            let key = device_key(name);
            if held.contains(&key) || mapped.contains(&key) {
                continue;
            }
            if node_exists(&format!("/dev/sd{key}")) || node_exists(&format!("/dev/xvd{key}")) {
                continue;
            }
            held.insert(key);
            return Some(DeviceLease {
                name: name.clone(),
                held: self.held.clone(),
            });
        }
        None
    }
}

/// The volume id an NVMe controller serial names: EBS puts `vol0123…` (no dash) there.
pub fn volume_id_from_serial(serial: &str) -> Option<String> {
    let serial = serial.trim();
    let hex = serial
        .strip_prefix("vol-")
        .or_else(|| serial.strip_prefix("vol"))?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("vol-{hex}"))
}

/// The block device of `volume_id` attached as `device_name`, if it has appeared: the NVMe
/// namespace whose controller serial names the volume (Nitro), else `/dev/xvdX` (Xen), else
/// `/dev/sdX`.
pub fn find_device(
    sys_block: &Path,
    dev: &Path,
    volume_id: &str,
    device_name: &str,
) -> Option<PathBuf> {
    if let Ok(entries) = std::fs::read_dir(sys_block) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("nvme") {
                continue;
            }
            let serial =
                std::fs::read_to_string(entry.path().join("device/serial")).unwrap_or_default();
            if volume_id_from_serial(&serial).as_deref() == Some(volume_id) {
                return Some(dev.join(name));
            }
        }
    }
    let key = device_key(device_name);
    [format!("xvd{key}"), format!("sd{key}")]
        .into_iter()
        .map(|n| dev.join(n))
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_compared_whatever_their_prefix() {
        assert_eq!(device_key("/dev/sdf"), "f");
        assert_eq!(device_key("/dev/xvdf"), "f");
        assert_eq!(device_key("xvdba"), "ba");
        assert_eq!(default_device_names().len(), 11);
    }

    #[test]
    fn allocation_skips_mapped_held_and_present_names() {
        let alloc = DeviceAllocator::new(default_device_names());
        // The instance maps its root and one data volume (recorded DescribeInstances answer).
        let mapped = vec!["/dev/xvda".to_owned(), "/dev/sdf".to_owned()];
        let a = alloc.allocate(&mapped, |_| false).unwrap();
        assert_eq!(a.name, "/dev/sdg");
        let b = alloc.allocate(&mapped, |n| n == "/dev/xvdh").unwrap();
        assert_eq!(b.name, "/dev/sdi", "h exists as a local node");
        drop(a);
        let c = alloc.allocate(&mapped, |_| false).unwrap();
        assert_eq!(c.name, "/dev/sdg", "released on drop");
        let all: Vec<DeviceLease> =
            std::iter::from_fn(|| alloc.allocate(&mapped, |_| false)).collect();
        assert_eq!(all.len(), 11 - 3, "f mapped, g and i held");
        assert!(alloc.allocate(&mapped, |_| false).is_none(), "all taken");
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let alloc = Arc::new(DeviceAllocator::new(default_device_names()));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let alloc = alloc.clone();
                std::thread::spawn(move || alloc.allocate(&[], |_| false).unwrap())
            })
            .collect();
        let leases: Vec<DeviceLease> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let names: BTreeSet<&str> = leases.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names.len(), 8);
    }

    #[test]
    fn nvme_serials_name_volumes() {
        assert_eq!(
            volume_id_from_serial("vol0123456789abcdef0  \n").as_deref(),
            Some("vol-0123456789abcdef0")
        );
        assert_eq!(
            volume_id_from_serial("vol-0123456789abcdef0").as_deref(),
            Some("vol-0123456789abcdef0")
        );
        assert_eq!(
            volume_id_from_serial("AWS1234567890ABCDEF"),
            None,
            "instance store"
        );
        assert_eq!(volume_id_from_serial("vol"), None);
    }

    #[test]
    fn devices_are_found_by_serial_then_name() {
        let root = tempfile::tempdir().unwrap();
        let (sys, dev) = (root.path().join("sys"), root.path().join("dev"));
        std::fs::create_dir_all(sys.join("nvme1n1/device")).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(sys.join("nvme1n1/device/serial"), "vol0aaaaaaaaaaaaaaaa1\n").unwrap();
        assert_eq!(
            find_device(&sys, &dev, "vol-0aaaaaaaaaaaaaaaa1", "/dev/sdf"),
            Some(dev.join("nvme1n1"))
        );
        assert_eq!(
            find_device(&sys, &dev, "vol-0bbbbbbbbbbbbbbbb2", "/dev/sdg"),
            None
        );
        std::fs::write(dev.join("xvdg"), "").unwrap();
        assert_eq!(
            find_device(&sys, &dev, "vol-0bbbbbbbbbbbbbbbb2", "/dev/sdg"),
            Some(dev.join("xvdg"))
        );
    }
}
