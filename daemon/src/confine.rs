//! What a provisioner may do: the capabilities it keeps, the system calls it may not make,
//! and the parts of `/proc` and `/sys` it may not see or change.
//!
//! The provisioner is root in its image and nothing more. The baseline is the container
//! runtimes' default (Docker's capability set and seccomp profile, Kubernetes' masked and
//! read-only `/proc` paths), narrowed where a provisioner has no use for what a container
//! might: no `CAP_MKNOD` (a device node is a way to the host's disks), no `CAP_NET_RAW` unless
//! the policy grants it (packet sockets see every user's traffic on the host's network), and
//! never `CAP_DAC_READ_SEARCH` (with it, `open_by_handle_at` opens any file of a mounted
//! filesystem by its inode number: the "shocker" escape).
//!
//! The filter is a deny list over an allow-by-default filter, as the runtimes' profiles are in
//! effect: it refuses (EPERM) what reaches beyond the image or is a known way to attack the
//! kernel, and leaves the rest to the capabilities. It is built with libseccomp, which knows
//! every architecture's system call numbers: the 32-bit x86 calls of an i386 image are filtered
//! too, and calls of any other ABI (x32) fail.

use caps::Capability;
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};

/// What a provisioner keeps: Docker's default capabilities without `CAP_MKNOD` and
/// `CAP_NET_RAW` (which [`Allowances::net_raw`] adds back). Enough to install packages, set
/// owners, modes and file capabilities, switch users, bind low ports and chroot, in the image.
pub const PROVISIONER_CAPS: [Capability; 12] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
];

/// What the daemon itself needs beyond what its provisioners keep: mounts, namespaces, loop
/// devices and BPF programs (`CAP_SYS_ADMIN`), device nodes of a build's `/dev` and of
/// imports (`CAP_MKNOD`), a build's loopback and attaching network filters
/// (`CAP_NET_ADMIN`).
pub const DAEMON_CAPS: [Capability; 3] = [
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_ADMIN,
];

/// What the policy lets a build have beyond the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allowances {
    /// `CAP_NET_RAW` and packet sockets (never with `--network no-metadata`).
    pub net_raw: bool,
    /// New user namespaces (`unshare`/`clone` with `CLONE_NEWUSER`).
    pub user_namespaces: bool,
}

impl Allowances {
    /// The capabilities a provisioner keeps.
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut keep = PROVISIONER_CAPS.to_vec();
        if self.net_raw {
            keep.push(Capability::CAP_NET_RAW);
        }
        keep
    }
}

/// System calls a provisioner never needs, refused with EPERM: kernel modules and kexec,
/// BPF and perf, keyrings (the host root user's keyring is shared by every root process),
/// file handles, mounts and namespaces of others, swap, accounting, quotas, raw I/O ports,
/// the kernel log, io_uring and userfaultfd (the kernel's most exploited interfaces), and the
/// obsolete calls Docker refuses too.
pub const REFUSED_CALLS: &[&str] = &[
    "open_by_handle_at",
    "name_to_handle_at",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "bpf",
    "perf_event_open",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "setns",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "ioperm",
    "iopl",
    "syslog",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "vm86",
    "vm86old",
];

const CLONE_NEWUSER: u64 = libc::CLONE_NEWUSER as u64;

/// The seccomp filter of a build's provisioner, built before it starts (so that a failure is
/// the executor's to report) and loaded by [`load`] in the provisioner process.
pub fn provisioner_filter(allow: &Allowances) -> Result<ScmpFilterContext, String> {
    fn e(what: &str) -> impl FnOnce(libseccomp::error::SeccompError) -> String + '_ {
        move |err| format!("seccomp: {what}: {err}")
    }
    let mut filter = ScmpFilterContext::new(ScmpAction::Allow).map_err(e("a seccomp filter"))?;
    // Loaded while the process still has CAP_SYS_ADMIN, so without no_new_privs: setuid
    // programs of the image (su, sudo) keep working for the provisioner's scripts.
    filter
        .set_ctl_nnp(false)
        .map_err(e("the filter's no_new_privs"))?;
    // Calls of an ABI the filter does not know (x32) fail rather than pass unfiltered.
    filter
        .set_act_badarch(ScmpAction::Errno(libc::ENOSYS))
        .map_err(e("the filter's foreign-ABI action"))?;
    // A binary tree of the calls rather than a list: each call of the build passes it.
    filter
        .set_ctl_optimize(2)
        .map_err(e("the filter's optimisation"))?;
    if ScmpArch::native() == ScmpArch::X8664 {
        // i386 images: their 32-bit calls are filtered with their own numbers.
        filter
            .add_arch(ScmpArch::X86)
            .map_err(e("adding the i386 ABI"))?;
    }
    let deny = ScmpAction::Errno(libc::EPERM);
    for name in REFUSED_CALLS {
        // Calls an architecture lacks (vm86 on x86-64) are skipped for it by libseccomp; a
        // name it does not know at all is not a call of this kernel's either.
        let Ok(call) = libseccomp::ScmpSyscall::from_name(name) else {
            continue;
        };
        filter
            .add_rule(deny, call)
            .map_err(e(&format!("refusing {name}")))?;
    }
    if !allow.user_namespaces {
        for name in ["unshare", "clone"] {
            let call = libseccomp::ScmpSyscall::from_name(name).map_err(e(name))?;
            filter
                .add_rule_conditional(
                    deny,
                    call,
                    &[ScmpArgCompare::new(
                        0,
                        ScmpCompareOp::MaskedEqual(CLONE_NEWUSER),
                        CLONE_NEWUSER,
                    )],
                )
                .map_err(e(&format!("refusing {name} of user namespaces")))?;
        }
    }
    // clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes the C
    // library fall back to clone, whose flags are checked above (Docker does the same).
    let clone3 = libseccomp::ScmpSyscall::from_name("clone3").map_err(e("clone3"))?;
    filter
        .add_rule(ScmpAction::Errno(libc::ENOSYS), clone3)
        .map_err(e("refusing clone3"))?;
    if !allow.net_raw {
        let socket = libseccomp::ScmpSyscall::from_name("socket").map_err(e("socket"))?;
        filter
            .add_rule_conditional(
                deny,
                socket,
                &[ScmpArgCompare::new(
                    0,
                    ScmpCompareOp::Equal,
                    libc::AF_PACKET as u64,
                )],
            )
            .map_err(e("refusing packet sockets"))?;
    }
    // The build's /dev has its own disk's loop device (read-only: see the executor's
    // populate_dev), whose ioctls check no capability for some commands (LOOP_CLR_FD).
    refuse_loop_ioctls(&mut filter).map_err(e("refusing loop device ioctls"))?;
    Ok(filter)
}

/// Adds to `filter` a rule refusing (EPERM) every loop device ioctl, `LOOP_*`: `_IO(0x4C, n)`,
/// type `'L'` in bits 8 to 15 of the command. The loop devices a sandboxed program is given
/// are the daemon's: their offset, size, flags and backing file are not the program's to
/// change, and `LOOP_CLR_FD` would let it detach one (to be taken by another build) with only
/// read access to the node.
pub fn refuse_loop_ioctls(
    filter: &mut ScmpFilterContext,
) -> Result<(), libseccomp::error::SeccompError> {
    let ioctl = libseccomp::ScmpSyscall::from_name("ioctl")?;
    filter
        .add_rule_conditional(
            ScmpAction::Errno(libc::EPERM),
            ioctl,
            &[ScmpArgCompare::new(
                1,
                ScmpCompareOp::MaskedEqual(0xff00),
                0x4c00,
            )],
        )
        .map(drop)
}

/// Loads `filter` into this process (and so into all it will start).
pub fn load(filter: &ScmpFilterContext) -> Result<(), String> {
    filter
        .load()
        .map_err(|e| format!("loading the seccomp filter: {e}"))
}

/// Drops every capability but `keep` from each set of this process (bounding, inheritable,
/// effective, permitted, ambient), so that neither it nor anything it runs can have more.
pub fn keep_only(keep: &[Capability]) -> Result<(), String> {
    // Those this kernel knows: dropping one it does not is an error, and it has none of them.
    // Set by set, the bounding set first: dropping from it takes CAP_SETPCAP, which may be
    // among those dropped from the effective set.
    let dropped: Vec<Capability> = caps::runtime::thread_all_supported()
        .into_iter()
        .filter(|cap| !keep.contains(cap))
        .collect();
    for set in [
        caps::CapSet::Bounding,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        for &cap in &dropped {
            caps::drop(None, set, cap)
                .map_err(|err| format!("dropping {cap} from the {set:?} set: {err}"))?;
        }
    }
    caps::clear(None, caps::CapSet::Ambient)
        .map_err(|e| format!("clearing ambient capabilities: {e}"))
}

/// Paths of a build's `/proc` and `/sys` that are hidden (an empty read-only file or
/// directory over them): the runtimes' masked paths, and the kernel log.
pub const MASKED: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/kmsg",
    "proc/latency_stats",
    "proc/sched_debug",
    "proc/scsi",
    "proc/sysrq-trigger",
    "proc/timer_list",
    "proc/timer_stats",
    "sys/devices/virtual/powercap",
    "sys/firmware",
];

/// Paths of a build's `/proc` that are read-only (the kernel's settings are the host's).
pub const READ_ONLY: &[&str] = &["proc/bus", "proc/fs", "proc/irq", "proc/sys"];

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter's rules, as libseccomp's pseudo filter code.
    fn rules(allow: &Allowances) -> String {
        let filter = provisioner_filter(allow).unwrap();
        let out = tempfile::tempfile().unwrap();
        filter.export_pfc(&out).unwrap();
        use std::io::{Read, Seek};
        let mut out = out;
        out.rewind().unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn the_filter_refuses_what_reaches_beyond_the_image() {
        let text = rules(&Allowances::default());
        for call in [
            "open_by_handle_at",
            "keyctl",
            "add_key",
            "request_key",
            "init_module",
            "kexec_load",
            "bpf",
            "perf_event_open",
            "mount",
            "setns",
            "unshare",
            "clone3",
            "socket",
            "io_uring_setup",
            "userfaultfd",
        ] {
            assert!(
                text.contains(&format!("# filter for syscall \"{call}\"")),
                "{call}:\n{text}"
            );
        }
        assert!(text.contains("ERRNO(1)"), "EPERM:\n{text}");
        assert!(
            text.contains("ERRNO(38)"),
            "ENOSYS for clone3 and foreign ABIs:\n{text}"
        );
        if ScmpArch::native() == ScmpArch::X8664 {
            assert!(
                text.contains("x86"),
                "the i386 ABI is filtered too:\n{text}"
            );
        }
        // What the policy allows is not refused.
        let open = rules(&Allowances {
            net_raw: true,
            user_namespaces: true,
        });
        for call in ["unshare", "socket"] {
            assert!(
                !open.contains(&format!("# filter for syscall \"{call}\"")),
                "{call}:\n{open}"
            );
        }
        assert!(open.contains("# filter for syscall \"keyctl\""));
    }

    #[test]
    fn the_capability_baseline_is_dockers_without_mknod_and_net_raw() {
        let base = Allowances::default().capabilities();
        for cap in [
            Capability::CAP_MKNOD,
            Capability::CAP_NET_RAW,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_NET_ADMIN,
        ] {
            assert!(!base.contains(&cap), "{cap}");
        }
        assert!(base.contains(&Capability::CAP_CHOWN));
        let raw = Allowances {
            net_raw: true,
            ..Allowances::default()
        };
        assert!(raw.capabilities().contains(&Capability::CAP_NET_RAW));
    }
}
