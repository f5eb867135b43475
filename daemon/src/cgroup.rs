//! A cgroup (v2) for each build, under the daemon's own: `<daemon's cgroup>/amidala-<build id>`.
//!
//! The kernel then knows every process of a build, whatever the provisioner does (`setsid`,
//! double forks), so a build's processes can all be killed at once (`cgroup.kill`), also by
//! recovery after the daemon itself died. And a BPF program attached to the cgroup filters
//! the build's traffic: `--network no-metadata` drops every packet a build sends to the
//! instance metadata service while leaving it the host's network.
//!
//! The provisioner cannot leave its cgroup or lift the filter: moving a process needs write
//! access to a `cgroup.procs` file, and no cgroup filesystem is mounted in a build (mounting
//! one needs CAP_SYS_ADMIN); detaching a program needs CAP_BPF or CAP_SYS_ADMIN and
//! CAP_NET_ADMIN, all three dropped from the provisioner's bounding set.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The instance metadata service's addresses: IPv4, and IPv6 on Nitro instances.
pub const METADATA_V4: [Ipv4Addr; 1] = [Ipv4Addr::new(169, 254, 169, 254)];
pub const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];

/// Prefix of the names of build cgroups.
pub const PREFIX: &str = "amidala-";

/// Where the daemon creates its builds' cgroups: its own cgroup in the v2 hierarchy, and, for
/// the controllers that limit a build's memory and processes, wherever the host has them.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    dir: PathBuf,
    limits: Vec<Limiter>,
}

/// A controller that limits builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    /// The file holding the limit, in v2 and in v1.
    fn limit_file(self, v2: bool) -> &'static str {
        match (self, v2) {
            (Controller::Memory, true) => "memory.max",
            (Controller::Memory, false) => "memory.limit_in_bytes",
            (Controller::Pids, _) => "pids.max",
        }
    }
}

/// Where a controller's limits of builds are set: in the build's v2 cgroup, or in a cgroup of
/// the build's own under the daemon's in the controller's v1 hierarchy (hybrid hosts, where
/// memory and pids are not in the unified tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limiter {
    pub controller: Controller,
    /// `None`: the v2 build cgroup; else the daemon's cgroup of the v1 hierarchy.
    pub v1_dir: Option<PathBuf>,
}

/// A build's limits: bytes of memory, number of processes and threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildLimits {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
}

impl BuildLimits {
    fn of(&self, controller: Controller) -> Option<u64> {
        match controller {
            Controller::Memory => self.memory,
            Controller::Pids => self.pids,
        }
    }
}

impl Hierarchy {
    /// Finds the daemon's own cgroup v2 directory (a unified or hybrid hierarchy), checking
    /// that it can make sub-cgroups there.
    pub fn discover() -> io::Result<Hierarchy> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = cgroup2_mount(&mountinfo).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no cgroup2 filesystem is mounted")
        })?;
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let path = own_cgroup(&own).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "this process has no cgroup v2 path in /proc/self/cgroup",
            )
        })?;
        let dir = mount.join(path.trim_start_matches('/'));
        let meta = fs::metadata(dir.join("cgroup.procs"))?;
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a cgroup",
                dir.display()
            )));
        }
        // A probe: the hierarchy may be mounted read-only (in a container, say).
        let probe = dir.join(format!("{PREFIX}probe-{}", std::process::id()));
        fs::create_dir(&probe).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot make cgroups under {}: {e}", dir.display()),
            )
        })?;
        fs::remove_dir(&probe)?;
        let mut hierarchy = Hierarchy {
            dir,
            limits: Vec::new(),
        };
        hierarchy.limits = hierarchy.find_limiters(&mountinfo, &own);
        Ok(hierarchy)
    }

    /// Where each limiting controller is, without changing anything: enabled for the build
    /// cgroups in the v2 tree, else the daemon's cgroup of its v1 hierarchy.
    fn find_limiters(&self, mountinfo: &str, own: &str) -> Vec<Limiter> {
        let enabled =
            fs::read_to_string(self.dir.join("cgroup.subtree_control")).unwrap_or_default();
        let mut found = Vec::new();
        for controller in [Controller::Memory, Controller::Pids] {
            if enabled.split_whitespace().any(|c| c == controller.name()) {
                found.push(Limiter {
                    controller,
                    v1_dir: None,
                });
            } else if let Some(dir) = v1_dir(mountinfo, own, controller.name()) {
                found.push(Limiter {
                    controller,
                    v1_dir: Some(dir),
                });
            }
        }
        found
    }

    /// Makes the limiting controllers available to build cgroups, for the daemon: enables
    /// those its v2 cgroup has but does not pass on (which needs the cgroup to hold no process:
    /// where the daemon is its only one, as a systemd service with `Delegate=yes` is, it moves
    /// itself into a leaf `amidalad` first). Returns what builds cannot be limited by, and why.
    pub fn prepare_limits(&mut self) -> Vec<String> {
        let available = fs::read_to_string(self.dir.join("cgroup.controllers")).unwrap_or_default();
        let mut missing = Vec::new();
        for controller in [Controller::Memory, Controller::Pids] {
            if self.limits.iter().any(|l| l.controller == controller) {
                continue;
            }
            if !available.split_whitespace().any(|c| c == controller.name()) {
                missing.push(format!(
                    "{}: neither amidalad's v2 cgroup {} nor a v1 hierarchy has it",
                    controller.name(),
                    self.dir.display()
                ));
                continue;
            }
            match self.enable(controller) {
                Ok(()) => self.limits.push(Limiter {
                    controller,
                    v1_dir: None,
                }),
                Err(e) => missing.push(format!("{}: {e}", controller.name())),
            }
        }
        missing
    }

    fn enable(&self, controller: Controller) -> io::Result<()> {
        let control = self.dir.join("cgroup.subtree_control");
        let write = || fs::write(&control, format!("+{}", controller.name()));
        match write() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let procs = fs::read_to_string(self.dir.join("cgroup.procs"))?;
                let ours = std::process::id().to_string();
                if procs.lines().any(|p| p.trim() != ours) {
                    return Err(io::Error::other(format!(
                        "{} holds other processes than amidalad, so it cannot pass controllers \
                         on (run amidalad as a systemd service with Delegate=yes)",
                        self.dir.display()
                    )));
                }
                let leaf = self.dir.join("amidalad");
                match fs::create_dir(&leaf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                fs::write(leaf.join("cgroup.procs"), &ours)?;
                write()
            }
            other => other,
        }
    }

    /// The controllers builds are limited by (for the log).
    pub fn limiters(&self) -> &[Limiter] {
        &self.limits
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup of build `id`.
    pub fn build_dir(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{PREFIX}{id}"))
    }

    /// The cgroups of build `id` that exist: its v2 cgroup and those of v1 hierarchies.
    pub fn build_dirs(&self, id: &str) -> Vec<PathBuf> {
        std::iter::once(self.build_dir(id))
            .chain(
                self.limits
                    .iter()
                    .filter_map(|l| l.v1_dir.as_ref())
                    .map(|dir| dir.join(format!("{PREFIX}{id}"))),
            )
            .filter(|dir| dir.is_dir())
            .collect()
    }

    /// Build ids of the build cgroups that exist now (in the v2 tree and the v1 hierarchies).
    pub fn build_ids(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        let v1 = self.limits.iter().filter_map(|l| l.v1_dir.as_deref());
        for dir in std::iter::once(self.dir.as_path()).chain(v1) {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                if let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(PREFIX))
                {
                    if entry.file_type()?.is_dir() {
                        ids.push(id.to_owned());
                    }
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The daemon's cgroup in the v1 hierarchy of `controller`, if one is mounted, from
/// mountinfo's and /proc/self/cgroup's texts.
fn v1_dir(mountinfo: &str, own: &str, controller: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fields = right.split(' ');
        if fields.next()? != "cgroup" {
            return None;
        }
        let options = fields.nth(1)?;
        if !options.split(',').any(|o| o == controller) {
            return None;
        }
        Some(PathBuf::from(unescape_mountinfo(left.split(' ').nth(4)?)))
    })?;
    let path = own.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    let dir = mount.join(path.trim_start_matches('/'));
    dir.join("cgroup.procs").is_file().then_some(dir)
}

/// The mount point of the cgroup2 filesystem, from mountinfo's text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// Mountinfo escapes space, tab, newline and backslash as octal.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The v2 path (`0::/path`) from /proc/self/cgroup's text.
fn own_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// One build's cgroup, and its cgroups in the v1 hierarchies of the limiting controllers.
#[derive(Debug)]
pub struct BuildCgroup {
    dir: PathBuf,
    v1: Vec<PathBuf>,
}

impl BuildCgroup {
    /// Makes the cgroups of build `id`, with `limits`.
    pub fn create(hierarchy: &Hierarchy, id: &str, limits: BuildLimits) -> io::Result<BuildCgroup> {
        let mkdir = |dir: &Path| {
            fs::create_dir(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("creating cgroup {}: {e}", dir.display()))
            })
        };
        let dir = hierarchy.build_dir(id);
        mkdir(&dir)?;
        let mut cgroup = BuildCgroup {
            dir,
            v1: Vec::new(),
        };
        for limiter in &hierarchy.limits {
            let Some(limit) = limits.of(limiter.controller) else {
                continue;
            };
            let place = match &limiter.v1_dir {
                None => cgroup.dir.clone(),
                Some(parent) => {
                    let dir = parent.join(format!("{PREFIX}{id}"));
                    // Dropped with `cgroup` (removed) if what follows fails.
                    mkdir(&dir)?;
                    cgroup.v1.push(dir.clone());
                    dir
                }
            };
            let file = place.join(limiter.controller.limit_file(limiter.v1_dir.is_none()));
            fs::write(&file, limit.to_string()).map_err(|e| {
                io::Error::new(e.kind(), format!("writing {}: {e}", file.display()))
            })?;
        }
        Ok(cgroup)
    }

    /// The `cgroup.procs` files of its v1 cgroups, for the daemon to write the executor's pid
    /// to before the executor starts anything of the build's (its v2 cgroup it is born in).
    pub fn v1_procs_files(&self) -> io::Result<Vec<fs::File>> {
        self.v1
            .iter()
            .map(|dir| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            })
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens `cgroup.procs` for a child to write "0" to between fork and exec, which moves
    /// it (and so all it will start) into this cgroup.
    pub fn procs_file(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    /// Keeps the build from reaching `v4` and `v6`: `connect` and `sendmsg` to them fail at
    /// once with EPERM, and every packet to them that gets past those is dropped.
    pub fn deny_egress(&self, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> io::Result<()> {
        let cgroup = fs::File::open(&self.dir)?;
        let packets = bpf::load(bpf::Hook::Egress, &bpf::deny_packets_to(v4, v6))?;
        bpf::attach(&cgroup, &packets, bpf::Hook::Egress)?;
        // An IPv6 socket reaches IPv4 addresses by their mapped form (::ffff:a.b.c.d).
        let v6_and_mapped: Vec<Ipv6Addr> = v6
            .iter()
            .copied()
            .chain(v4.iter().map(Ipv4Addr::to_ipv6_mapped))
            .collect();
        for hook in [bpf::Hook::Connect4, bpf::Hook::Sendmsg4] {
            bpf::attach(&cgroup, &bpf::load(hook, &bpf::deny_sockaddr4(v4))?, hook)?;
        }
        for hook in [bpf::Hook::Connect6, bpf::Hook::Sendmsg6] {
            let prog = bpf::load(hook, &bpf::deny_sockaddr6(&v6_and_mapped))?;
            bpf::attach(&cgroup, &prog, hook)?;
        }
        Ok(())
    }

    /// Kills every process in the cgroup and removes it, and its v1 cgroups.
    pub fn remove(mut self) -> io::Result<()> {
        let v1 = std::mem::take(&mut self.v1);
        let dir = std::mem::take(&mut self.dir);
        let mut result = remove(&dir);
        for dir in v1 {
            if let Err(e) = remove(&dir) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

impl Drop for BuildCgroup {
    /// A cgroup not removed (its making failed halfway) is removed now.
    fn drop(&mut self) {
        for dir in std::iter::once(&self.dir).chain(&self.v1) {
            if !dir.as_os_str().is_empty() {
                let _ = remove(dir);
            }
        }
    }
}

/// Kills whatever still runs in the cgroup at `dir` and removes it; a cgroup that does not
/// exist is not an error.
pub fn remove(dir: &Path) -> io::Result<()> {
    for attempt in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 99 => {
                kill_all(dir)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("removing cgroup {}: {e}", dir.display()),
                ))
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// SIGKILLs every process in the cgroup at `dir`: `cgroup.kill` where the kernel has it
/// (5.14), else each pid of `cgroup.procs`.
pub fn kill_all(dir: &Path) -> io::Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
    {
        Ok(mut f) => return f.write_all(b"1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(())
}

/// Whether the cgroup at `dir` holds a process.
pub fn populated(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// A path as a C string, for calls made where allocating is not allowed.
pub fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// Just enough of the bpf(2) system call to load and attach cgroup filters, with the
/// programs assembled here: a few dozen instructions do not call for a BPF toolchain.
mod bpf {
    use super::*;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const FUNC_SKB_LOAD_BYTES: i32 = 26;

    /// Where a program is attached: `BPF_CGROUP_*` attach types.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Hook {
        /// Every packet sent (`cgroup_skb`).
        Egress = 1,
        /// connect(2) and sendmsg(2) to an address (`cgroup_sock_addr`).
        Connect4 = 10,
        Connect6 = 11,
        Sendmsg4 = 14,
        Sendmsg6 = 15,
    }

    impl Hook {
        fn prog_type(self) -> u32 {
            match self {
                Hook::Egress => BPF_PROG_TYPE_CGROUP_SKB,
                _ => BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            }
        }
    }

    /// `struct bpf_sock_addr`: the destination, in network byte order.
    const SOCK_ADDR_IP4: i16 = 4;
    const SOCK_ADDR_IP6: i16 = 8;

    // Instruction classes, sizes, modes, operations and sources.
    const LDX: u8 = 0x01;
    const JMP: u8 = 0x05;
    const JMP32: u8 = 0x06;
    const ALU64: u8 = 0x07;
    const W: u8 = 0x00;
    const MEM: u8 = 0x60;
    const K: u8 = 0x00;
    const X: u8 = 0x08;
    const ADD: u8 = 0x00;
    const MOV: u8 = 0xb0;
    const JA: u8 = 0x00;
    const JEQ: u8 = 0x10;
    const JNE: u8 = 0x50;
    const CALL: u8 = 0x80;
    const EXIT: u8 = 0x90;

    /// `struct __sk_buff`'s `protocol`: the frame's EtherType, in network byte order.
    const SKB_PROTOCOL: i16 = 16;
    /// Destination addresses in the IPv4 and IPv6 headers (a cgroup egress program sees the
    /// packet from its network header on).
    const IPV4_DST: i32 = 16;
    const IPV6_DST: i32 = 24;

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Insn {
        code: u8,
        /// dst in the low nibble, src in the high one.
        regs: u8,
        off: i16,
        imm: i32,
    }

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        }
    }

    /// Instructions with jumps to labels, resolved by `finish`.
    #[derive(Default)]
    struct Asm {
        insns: Vec<Insn>,
        jumps: Vec<(usize, Label)>,
        labels: Vec<Option<usize>>,
    }

    #[derive(Clone, Copy)]
    struct Label(usize);

    impl Asm {
        fn label(&mut self) -> Label {
            self.labels.push(None);
            Label(self.labels.len() - 1)
        }
        fn bind(&mut self, l: Label) {
            self.labels[l.0] = Some(self.insns.len());
        }
        fn emit(&mut self, i: Insn) {
            self.insns.push(i);
        }
        fn jump(&mut self, i: Insn, to: Label) {
            self.jumps.push((self.insns.len(), to));
            self.insns.push(i);
        }
        fn finish(mut self) -> Vec<Insn> {
            for (at, label) in &self.jumps {
                let target = self.labels[label.0].expect("every label is bound");
                self.insns[*at].off =
                    i16::try_from(target as isize - *at as isize - 1).expect("a short program");
            }
            self.insns
        }
    }

    /// A word of an address as a program loads it from memory.
    fn word(bytes: &[u8]) -> i32 {
        i32::from_ne_bytes(bytes.try_into().expect("four bytes"))
    }

    /// Returns 1 (allow) or, from `deny`, 0.
    fn verdicts(a: &mut Asm, allow: Label, deny: Label) {
        a.bind(allow);
        a.emit(insn(ALU64 | MOV | K, 0, 0, 0, 1));
        a.emit(insn(JMP | EXIT, 0, 0, 0, 0));
        a.bind(deny);
        a.emit(insn(ALU64 | MOV | K, 0, 0, 0, 0));
        a.emit(insn(JMP | EXIT, 0, 0, 0, 0));
    }

    /// Jumps to `deny` if the 16 bytes at `base + off` in the memory `reg` points to are one
    /// of `addrs`.
    fn match_v6(a: &mut Asm, reg: u8, off: i16, addrs: &[Ipv6Addr], deny: Label) {
        for addr in addrs {
            let next = a.label();
            for (i, chunk) in addr.octets().chunks(4).enumerate() {
                a.emit(insn(LDX | MEM | W, 2, reg, off + 4 * i as i16, 0));
                a.jump(insn(JMP32 | JNE | K, 2, 0, 0, word(chunk)), next);
            }
            a.jump(insn(JMP | JA, 0, 0, 0, 0), deny);
            a.bind(next);
        }
    }

    /// A connect4/sendmsg4 program refusing (EPERM) the destinations `v4`.
    pub fn deny_sockaddr4(v4: &[Ipv4Addr]) -> Vec<Insn> {
        let mut a = Asm::default();
        let (allow, deny) = (a.label(), a.label());
        a.emit(insn(LDX | MEM | W, 2, 1, SOCK_ADDR_IP4, 0));
        for addr in v4 {
            a.jump(insn(JMP32 | JEQ | K, 2, 0, 0, word(&addr.octets())), deny);
        }
        verdicts(&mut a, allow, deny);
        a.finish()
    }

    /// A connect6/sendmsg6 program refusing (EPERM) the destinations `v6`.
    pub fn deny_sockaddr6(v6: &[Ipv6Addr]) -> Vec<Insn> {
        let mut a = Asm::default();
        let (allow, deny) = (a.label(), a.label());
        match_v6(&mut a, 1, SOCK_ADDR_IP6, v6, deny);
        verdicts(&mut a, allow, deny);
        a.finish()
    }

    /// A cgroup_skb program that drops (returns 0 for) IPv4 and IPv6 packets to the given
    /// destinations and passes (returns 1 for) everything else.
    pub fn deny_packets_to(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Vec<Insn> {
        let mut a = Asm::default();
        let (allow, deny, ipv4, ipv6) = (a.label(), a.label(), a.label(), a.label());
        a.emit(insn(ALU64 | MOV | X, 6, 1, 0, 0)); // r6 = skb
        a.emit(insn(LDX | MEM | W, 2, 6, SKB_PROTOCOL, 0)); // r2 = skb->protocol
        let ethertype = |t: u16| i32::from(t.to_be());
        a.jump(insn(JMP | JEQ | K, 2, 0, 0, ethertype(0x0800)), ipv4);
        a.jump(insn(JMP | JEQ | K, 2, 0, 0, ethertype(0x86dd)), ipv6);
        verdicts(&mut a, allow, deny);
        // r0 = bpf_skb_load_bytes(skb, offset, r10 - 16, len); on error, pass the packet.
        let load = |a: &mut Asm, offset: i32, len: i32| {
            a.emit(insn(ALU64 | MOV | X, 1, 6, 0, 0));
            a.emit(insn(ALU64 | MOV | K, 2, 0, 0, offset));
            a.emit(insn(ALU64 | MOV | X, 3, 10, 0, 0));
            a.emit(insn(ALU64 | ADD | K, 3, 0, 0, -16));
            a.emit(insn(ALU64 | MOV | K, 4, 0, 0, len));
            a.emit(insn(JMP | CALL, 0, 0, 0, FUNC_SKB_LOAD_BYTES));
            a.jump(insn(JMP | JNE | K, 0, 0, 0, 0), allow);
        };
        a.bind(ipv4);
        load(&mut a, IPV4_DST, 4);
        a.emit(insn(LDX | MEM | W, 2, 10, -16, 0));
        for addr in v4 {
            a.jump(insn(JMP32 | JEQ | K, 2, 0, 0, word(&addr.octets())), deny);
        }
        a.jump(insn(JMP | JA, 0, 0, 0, 0), allow);
        a.bind(ipv6);
        load(&mut a, IPV6_DST, 16);
        match_v6(&mut a, 10, -16, v6, deny);
        a.jump(insn(JMP | JA, 0, 0, 0, 0), allow);
        a.finish()
    }

    /// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `expected_attach_type`.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// `union bpf_attr` as BPF_PROG_ATTACH reads it.
    #[repr(C)]
    struct ProgAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }

    fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` for
        // `cmd`, and its size is passed with it; the kernel reads at most that many bytes
        // and writes nothing back for the commands used here.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Loads `program` for `hook`; on a verifier refusal, the error carries the verifier's
    /// log.
    pub fn load(hook: Hook, program: &[Insn]) -> io::Result<OwnedFd> {
        let license = c"MIT";
        let mut name = [0u8; 16];
        name[..15].copy_from_slice(b"amidala_nometa\0");
        let mut log = vec![0u8; 0];
        for log_level in [0u32, 1] {
            if log_level == 1 {
                log = vec![0u8; 64 * 1024];
            }
            let mut attr = ProgLoad {
                prog_type: hook.prog_type(),
                insn_cnt: program.len() as u32,
                insns: program.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level,
                log_size: log.len() as u32,
                log_buf: if log.is_empty() {
                    0
                } else {
                    log.as_mut_ptr() as u64
                },
                kern_version: 0,
                prog_flags: 0,
                prog_name: name,
                prog_ifindex: 0,
                expected_attach_type: hook as u32,
            };
            match sys_bpf(BPF_PROG_LOAD, &mut attr) {
                // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
                Err(e) if log_level == 1 || e.raw_os_error() != Some(libc::EACCES) => {
                    let verifier = String::from_utf8_lossy(&log);
                    let verifier = verifier.trim_end_matches('\0').trim();
                    return Err(io::Error::new(
                        e.kind(),
                        if verifier.is_empty() {
                            format!("loading the network filter (bpf): {e}")
                        } else {
                            format!("loading the network filter (bpf): {e}: {verifier}")
                        },
                    ));
                }
                Err(_) => {} // again, with the verifier's log
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Attaches `prog` at `hook` of the cgroup open as `cgroup`, for all its processes;
    /// descendants cannot attach programs of their own there.
    pub fn attach(cgroup: &fs::File, prog: &OwnedFd, hook: Hook) -> io::Result<()> {
        let mut attr = ProgAttach {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type: hook as u32,
            attach_flags: 0,
            replace_bpf_fd: 0,
        };
        sys_bpf(BPF_PROG_ATTACH, &mut attr)
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("attaching the network filter: {e}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn jumps_land_on_their_labels() {
            let p = deny_packets_to(&METADATA_V4, &METADATA_V6);
            // Every jump stays inside the program, and it ends with an exit or a jump.
            for (i, insn) in p.iter().enumerate() {
                let class = insn.code & 0x07;
                let op = insn.code & 0xf0;
                if (class == JMP || class == JMP32) && op != CALL && op != EXIT {
                    let target = i as isize + 1 + insn.off as isize;
                    assert!(
                        (0..p.len() as isize).contains(&target),
                        "jump {i} to {target}"
                    );
                }
            }
            // 169.254.169.254 is compared as the word the program reads from memory.
            assert!(p
                .iter()
                .any(|i| i.code == JMP32 | JEQ | K && i.imm.to_ne_bytes() == [169, 254, 169, 254]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_hierarchies_of_limiting_controllers() {
        let mountinfo =
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let own = "8:pids:/\n4:memory:/process_api/x\n0::/\n";
        // Only those whose cgroup directory exists (on this host: none of these, probably).
        let found = |c| v1_dir(mountinfo, own, c);
        for (c, dir) in [
            ("memory", "/sys/fs/cgroup/memory/process_api/x"),
            ("pids", "/sys/fs/cgroup/pids"),
        ] {
            assert_eq!(
                found(c),
                Path::new(dir)
                    .join("cgroup.procs")
                    .is_file()
                    .then(|| PathBuf::from(dir)),
                "{c}"
            );
        }
        assert_eq!(found("cpu"), None, "not mounted");
        assert_eq!(
            v1_dir(mountinfo, "0::/\n", "memory"),
            None,
            "no v1 path of ours"
        );
    }

    #[test]
    fn finds_the_unified_hierarchy() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let spaced = "36 35 0:31 / /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/cg two")));
        assert_eq!(cgroup2_mount("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"), None);
        assert_eq!(
            own_cgroup("1:cpu:/\n0::/system.slice/amidalad.service\n"),
            Some("/system.slice/amidalad.service")
        );
    }
}
