//! The Debian package (issue 8), end to end on this host: `tests/build-deb.sh` packages what
//! `cargo build` built; the package's files, modes, conffiles, maintainer scripts and Depends are
//! checked; `dpkg -i` installs it here; then everything runs as on a builder host, from what the
//! package installed only: its groups and directories, its units (`systemd-analyze verify` at
//! their installed paths; the socket enabled, the service not), the installed daemon started the
//! way the installed amidalad.socket starts it (`systemd-socket-activate` on its ListenStream,
//! with its SocketGroup and SocketMode, readiness on a NOTIFY_SOCKET, no flags: the installed
//! configuration and the default paths), and an unprivileged member of group amidala importing a
//! base and baking an image with /usr/bin/amidala. Then the daemon stops, `dpkg --purge`, and
//! nothing of the package may be left: files, state, unit symlinks, mounts, loop devices.
//!
//! It installs on the host, so it refuses to run (fails, naming why) where a package amidala, or
//! anything at the package's paths, already exists; whatever happens, it purges what it
//! installed and removes the user (and the groups, if it made them) before it ends.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amidala_tests::{
    bin_dir, field, loop_devices, mounts_mentioning, repo_dir, require_root, run, Mounted, Run,
};

const PACKAGE: &str = "amidala";
/// The unprivileged member of group amidala the test makes.
const USER: &str = "amidala-t-deb";
const GROUPS: [&str; 2] = ["amidala", "amidala-admin"];
const STATE: &str = "/var/lib/amidala";
/// systemd's PATH for services; the unit sets no other.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const UNIT_DIR: &str = "/usr/lib/systemd/system";

/// The regular files the package holds besides the manual pages (one per page `amidala man`
/// prints, mode 0644), with their modes.
const FILES: [(&str, u32); 17] = [
    ("/usr/bin/amidala", 0o755),
    ("/usr/bin/amidalad", 0o755),
    ("/usr/libexec/amidala/amidalad-exec", 0o755),
    ("/usr/lib/amidala/plugins/libamidala_shell.so", 0o644),
    ("/usr/lib/amidala/plugins/libamidala_chef.so", 0o644),
    ("/usr/lib/amidala/plugins/libamidala_ansible.so", 0o644),
    ("/usr/lib/systemd/system/amidalad.service", 0o644),
    ("/usr/lib/systemd/system/amidalad.socket", 0o644),
    ("/usr/lib/sysusers.d/amidala.conf", 0o644),
    ("/usr/lib/tmpfiles.d/amidala.conf", 0o644),
    ("/etc/amidala/amidalad.toml", 0o644),
    ("/usr/share/bash-completion/completions/amidala", 0o644),
    ("/usr/share/zsh/vendor-completions/_amidala", 0o644),
    ("/usr/share/fish/vendor_completions.d/amidala.fish", 0o644),
    ("/usr/share/doc/amidala/README.md", 0o644),
    ("/usr/share/doc/amidala/LICENSE", 0o644),
    ("/usr/share/doc/amidala/copyright", 0o644),
];

/// Files installed as they are in the repository.
const FROM_REPO: [(&str, &str); 7] = [
    (
        "/usr/lib/systemd/system/amidalad.service",
        "systemd/amidalad.service",
    ),
    (
        "/usr/lib/systemd/system/amidalad.socket",
        "systemd/amidalad.socket",
    ),
    (
        "/usr/lib/sysusers.d/amidala.conf",
        "systemd/amidala.sysusers.conf",
    ),
    (
        "/usr/lib/tmpfiles.d/amidala.conf",
        "systemd/amidala.tmpfiles.conf",
    ),
    ("/etc/amidala/amidalad.toml", "systemd/amidalad.toml"),
    ("/usr/share/doc/amidala/README.md", "README.md"),
    ("/usr/share/doc/amidala/LICENSE", "LICENSE"),
];

/// Where a package amidala, installed or not, would have left something.
const PACKAGE_PATHS: [&str; 9] = [
    "/usr/bin/amidala",
    "/usr/bin/amidalad",
    "/usr/libexec/amidala",
    "/usr/lib/amidala",
    "/etc/amidala",
    STATE,
    "/run/amidala",
    "/usr/lib/systemd/system/amidalad.service",
    "/etc/systemd/system/sockets.target.wants/amidalad.socket",
];

/// dpkg's status of the package (`install ok installed`, `deinstall ok config-files`, ...), or
/// None if dpkg does not know it.
fn package_status() -> Option<String> {
    let out = run(Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", PACKAGE])
        .stderr(Stdio::null()));
    (out.code == Some(0) && !out.stdout.trim().is_empty() && !out.stdout.contains("not-installed"))
        .then(|| out.stdout.trim().to_owned())
}

fn group_exists(group: &str) -> bool {
    Command::new("getent")
        .args(["group", group])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// What the test changed on the host, undone on drop whatever happened: the daemon stopped, any
/// mount or loop device of the state directory released, the package purged, the user deleted,
/// and the groups deleted if the package made them here.
struct Host {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    socket: Option<PathBuf>,
    groups_made: Vec<&'static str>,
    user_made: bool,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::Builder::new()
            .prefix("amidala-package-")
            .tempdir()
            .unwrap();
        // The unprivileged user reaches its workspace and the base's tarball in here.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Host {
            dir,
            daemon: None,
            socket: None,
            groups_made: GROUPS.into_iter().filter(|g| !group_exists(g)).collect(),
            user_made: false,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and waits (60 s at most, then SIGKILL); removes the
    /// socket, as systemd does when the socket unit stops.
    fn stop_daemon(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(mut child) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    result = Err(format!(
                        "amidalad did not stop within 60s of SIGTERM:\n{}",
                        self.log()
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(socket) = self.socket.take() {
            let _ = fs::remove_file(socket);
        }
        result
    }

    /// The installed client, run as the unprivileged user with that user's groups, in `cwd`,
    /// with the default socket.
    fn as_user(&self, cwd: &Path, args: &[&str]) -> Run {
        run(Command::new("setpriv")
            .args(["--reuid", USER, "--regid", USER, "--init-groups", "--"])
            .arg("/usr/bin/amidala")
            .args(args)
            .current_dir(cwd)
            .env_clear()
            .env("PATH", SERVICE_PATH))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let stopped = self.stop_daemon();
        for (_, line) in mounts_mentioning(STATE) {
            if let Some(target) = line.split(' ').nth(4) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        for (device, backing) in loop_devices() {
            if backing.starts_with(STATE) {
                let _ = Command::new("losetup").arg("-d").arg(&device).status();
            }
        }
        if package_status().is_some() {
            let _ = Command::new("dpkg")
                .args(["--purge", PACKAGE])
                .stdout(Stdio::null())
                .status();
        }
        if self.user_made {
            let _ = Command::new("userdel").arg(USER).status();
        }
        for group in &self.groups_made {
            let _ = Command::new("groupdel").arg(group).status();
        }
        if !std::thread::panicking() {
            if let Err(e) = stopped {
                panic!("{e}");
            }
        }
    }
}

/// Fails, saying why, where the package or anything at its paths is already on this host: the
/// test would purge someone's install.
fn refuse_a_host_with_amidala() {
    if let Some(status) = package_status() {
        panic!(
            "a package {PACKAGE} is already known to dpkg on this host ({status}): this test \
             installs and purges its own, so it does not run here; remove it first \
             (dpkg --purge {PACKAGE}) or run the test on another machine"
        );
    }
    for path in PACKAGE_PATHS {
        assert!(
            fs::symlink_metadata(path).is_err(),
            "{path} exists: amidala seems installed on this host by hand; this test installs \
             and purges the package, so it does not run here (remove amidala's files first)"
        );
    }
    for tool in [
        "dpkg-deb",
        "systemd-analyze",
        "systemd-socket-activate",
        "setpriv",
        "useradd",
    ] {
        assert!(
            run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).code == Some(0),
            "{tool} is missing: run tests/install-deps.sh"
        );
    }
}

/// Builds the package with tests/build-deb.sh from the binaries of this test's profile, in
/// this test's target directory. Returns the .deb's path.
fn build_deb() -> PathBuf {
    let bins = bin_dir();
    let profile = match bins.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory in {}", bins.display()),
    }
    .to_owned();
    let target_dir = bins.parent().unwrap();
    let started = Instant::now();
    let out = run(Command::new(repo_dir().join("tests/build-deb.sh"))
        .args(["--profile", &profile, "--no-build", "--", "--fast"])
        .env("CARGO_TARGET_DIR", target_dir));
    let stdout = out.ok();
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-deb.sh printed the path"),
    );
    assert!(
        deb.is_file() && deb.starts_with(target_dir.join("debian")),
        "{}: not the package, in {}/debian\n{}",
        deb.display(),
        target_dir.display(),
        out.stderr
    );
    eprintln!(
        "built {} in {:.1}s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    deb
}

/// The manual pages `amidala man` prints, by name (amidala, amidala-build, ...).
fn manual_pages() -> Vec<String> {
    let man = run(Command::new(bin_dir().join("amidala")).arg("man"));
    man.ok()
        .lines()
        .filter_map(|l| l.strip_prefix(".TH "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The package's files, modes, owners, control data and maintainer scripts.
fn check_contents(deb: &Path) {
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    let listing = listing.ok();
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        // -rw-r--r-- 0/0   372 2026-11-25 00:00 ./usr/lib/systemd/system/amidalad.socket
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "{line}");
        let (mode, owner, path) = (fields[0], fields[1], &fields[5][1..]);
        assert_eq!(owner, "0/0", "owned by root: {line}");
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{line}");
            continue;
        }
        let expected = FILES
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, m)| *m)
            .unwrap_or(0o644);
        let expected = if expected == 0o755 {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, expected, "{line}");
        files.insert(path.to_owned());
    }
    let mut expected: BTreeSet<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
    let pages = manual_pages();
    assert!(pages.len() > 5, "amidala man printed {pages:?}");
    for page in &pages {
        expected.insert(format!("/usr/share/man/man1/{page}.1.gz"));
    }
    assert_eq!(
        files, expected,
        "the package's files (left) against those expected (right)\n{listing}"
    );

    let field_of = |name: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))
            .ok()
            .trim()
            .to_owned()
    };
    assert_eq!(field_of("Package"), PACKAGE);
    let depends = field_of("Depends");
    for needed in [
        "e2fsprogs",
        "libc6",
        "libseccomp2",
        "fdisk",
        "mtools",
        "grub-pc-bin",
        "grub-efi-amd64-bin",
    ] {
        assert!(
            depends.split(',').any(|d| d.trim().starts_with(needed)),
            "Depends: {depends} lacks {needed}"
        );
    }
    assert_eq!(
        field_of("Suggests"),
        "openssh-client",
        "amidala --host runs ssh"
    );
    assert_eq!(
        field_of("Recommends"),
        "qemu-system-x86, ovmf, qemu-utils",
        "the boot test runs QEMU; qcow2 imports, qemu-img"
    );
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(deb)
        .arg("conffiles"));
    assert_eq!(
        conffiles.ok().lines().collect::<Vec<_>>(),
        ["/etc/amidala/amidalad.toml"]
    );
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(deb)
        .arg(control.path().join("DEBIAN")))
    .ok();
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.path().join("DEBIAN").join(script);
        let mode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("no {script} in the package: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{script}");
        let from_repo = fs::read(repo_dir().join("systemd/deb").join(script)).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            from_repo,
            "{script} as in systemd/deb"
        );
    }
}

/// After `dpkg -i`: the files in place, the groups, the directories, the units enabled as
/// intended and passing `systemd-analyze verify` where they are installed.
fn check_installed() {
    let status = package_status();
    assert_eq!(status.as_deref(), Some("install ok installed"));
    for (installed, in_repo) in FROM_REPO {
        assert_eq!(
            fs::read(installed).unwrap_or_else(|e| panic!("{installed}: {e}")),
            fs::read(repo_dir().join(in_repo)).unwrap(),
            "{installed} is {in_repo}"
        );
    }
    for binary in ["amidala", "amidalad"] {
        let version = run(Command::new(format!("/usr/bin/{binary}")).arg("--version"));
        assert!(
            version.ok().contains(env!("CARGO_PKG_VERSION")),
            "{binary} --version: {}",
            version.stdout
        );
    }
    for group in GROUPS {
        assert!(group_exists(group), "postinst made no group {group}");
    }
    for (dir, mode) in [(STATE, 0o700), ("/run/amidala", 0o755)] {
        let meta = fs::metadata(dir).unwrap_or_else(|e| panic!("postinst made no {dir}: {e}"));
        assert!(meta.is_dir() && meta.uid() == 0, "{dir}");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir}");
    }
    // Enabled as deb-systemd-helper does it without a running systemd: the socket, not the
    // service (the socket starts it).
    let wants = Path::new("/etc/systemd/system/sockets.target.wants/amidalad.socket");
    let link = fs::read_link(wants).unwrap_or_else(|e| panic!("{}: {e}", wants.display()));
    assert!(
        link.ends_with("systemd/system/amidalad.socket"),
        "{}",
        link.display()
    );
    assert!(
        fs::symlink_metadata("/etc/systemd/system/multi-user.target.wants/amidalad.service")
            .is_err(),
        "the service is not enabled by the package"
    );
    let verify = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("{UNIT_DIR}/amidalad.socket"))
        .arg(format!("{UNIT_DIR}/amidalad.service")));
    assert_eq!(verify.code, Some(0), "{}{}", verify.stdout, verify.stderr);
    let complaints: Vec<&str> = verify
        .stderr
        .lines()
        .filter(|l| l.contains("amidalad."))
        .collect();
    assert!(complaints.is_empty(), "{}", verify.stderr);
    // The completions and manual pages work where they are.
    let bash = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/amidala && complete -p amidala",
    ]));
    assert!(bash.ok().contains("_amidala"), "{}", bash.stdout);
    let page = run(Command::new("zcat").arg("/usr/share/man/man1/amidala-build.1.gz"));
    assert!(page.ok().contains(".TH amidala-build 1"), "{}", page.stdout);
    assert!(page.stdout.contains("no\\-metadata"), "{}", page.stdout);
}

/// `KEY=value` of a unit file (the first).
fn unit_value(unit: &str, key: &str) -> String {
    let path = format!("{UNIT_DIR}/{unit}");
    let text = fs::read_to_string(&path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {path}"))
        .trim()
        .to_owned()
}

#[test]
fn the_package_installs_bakes_an_image_as_a_member_and_purges_clean() {
    require_root();
    refuse_a_host_with_amidala();
    let started = Instant::now();

    let deb = build_deb();
    check_contents(&deb);

    let mut host = Host::new();
    let install = run(Command::new("dpkg").arg("-i").arg(&deb));
    install.ok();
    check_installed();

    // The daemon as amidalad.socket and amidalad.service start it: systemd-socket-activate
    // binds the unit's ListenStream and runs the unit's ExecStart (no flags: the installed
    // configuration, the default state and plugin directories) on the first connection.
    let listen = unit_value("amidalad.socket", "ListenStream");
    assert_eq!(
        listen,
        amidala::DEFAULT_SOCKET,
        "the client's default socket"
    );
    let exec = unit_value("amidalad.service", "ExecStart");
    assert_eq!(exec, "/usr/bin/amidalad");
    let socket_group = unit_value("amidalad.socket", "SocketGroup");
    let socket_mode = u32::from_str_radix(&unit_value("amidalad.socket", "SocketMode"), 8).unwrap();
    let notify_path = host.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = fs::File::create(host.dir.path().join("daemon.log")).unwrap();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &listen, "-E", "NOTIFY_SOCKET"])
        .args(exec.split_whitespace())
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    host.socket = Some(PathBuf::from(&listen));
    host.daemon = Some(cmd.spawn().expect("starting systemd-socket-activate"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::symlink_metadata(&listen).is_err() {
        if let Some(status) = host.daemon.as_mut().unwrap().try_wait().unwrap() {
            panic!("systemd-socket-activate exited ({status}):\n{}", host.log());
        }
        assert!(Instant::now() < deadline, "{listen} not bound in 20s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What systemd does with SocketUser=root, SocketGroup= and SocketMode=.
    let gid = nix::unistd::Group::from_name(&socket_group)
        .unwrap()
        .unwrap_or_else(|| panic!("no group {socket_group}"))
        .gid;
    nix::unistd::chown(listen.as_str(), Some(0.into()), Some(gid)).unwrap();
    fs::set_permissions(&listen, fs::Permissions::from_mode(socket_mode)).unwrap();

    // An unprivileged member of group amidala.
    let _ = Command::new("userdel")
        .arg(USER)
        .stderr(Stdio::null())
        .status();
    run(Command::new("useradd").args(["-M", "-U", "-s", "/bin/sh", "-G", "amidala", USER])).ok();
    host.user_made = true;
    let ws = host.dir.path().join("ws");
    fs::create_dir(&ws).unwrap();
    fs::write(
        ws.join("build.sh"),
        "#!/bin/sh\nset -e\necho baked from the package > /etc/amidala-package-test\n",
    )
    .unwrap();
    run(Command::new("chown")
        .args(["-R", &format!("{USER}:{USER}")])
        .arg(&ws))
    .ok();
    // The busybox base, as a tarball the user may read (a rootfs tree has root-only parts).
    let rootfs = host.dir.path().join("rootfs");
    run(Command::new(repo_dir().join("tests/make-busybox-rootfs.sh")).arg(&rootfs)).ok();
    let tarball = host.dir.path().join("base.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tarball)
        .arg("."))
    .ok();
    fs::set_permissions(&tarball, fs::Permissions::from_mode(0o644)).unwrap();

    // The first connection starts the daemon, which says when it is ready.
    let version = host.as_user(&ws, &["version"]);
    assert!(
        version.code == Some(0),
        "amidala version as {USER}: {}{}\ndaemon log:\n{}",
        version.stdout,
        version.stderr,
        host.log()
    );
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no readiness notification: {e}\ndaemon log:\n{}",
            host.log()
        )
    });
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");
    assert!(
        host.log().contains("serving the socket systemd passed"),
        "{}",
        host.log()
    );

    // The three provisioners, from the installed plugin directory.
    let plugins = host.as_user(&ws, &["plugins", "--json"]).json();
    let mut names = Vec::new();
    for plugin in plugins.as_array().unwrap() {
        assert!(
            field(plugin, "path").starts_with("/usr/lib/amidala/plugins/"),
            "{plugin}"
        );
        names.push(field(plugin, "name").to_owned());
    }
    names.sort();
    assert_eq!(names, ["ansible", "chef", "shell"], "{plugins}");

    // Import a base and bake an image, as the member.
    let import = host.as_user(&ws, &["base", "import", tarball.to_str().unwrap()]);
    let snapshot = import.ok().trim().to_owned();
    assert!(
        snapshot.starts_with("snap-"),
        "{snapshot:?} {}",
        import.stderr
    );
    let build = host.as_user(&ws, &["build", "--json", "--", "/bin/sh", "build.sh"]);
    assert!(
        build.code == Some(0),
        "build as {USER}: {}{}\ndaemon log:\n{}",
        build.stdout,
        build.stderr,
        host.log()
    );
    // The installed daemon ran the build's executor and the plugin's validator as the
    // package's helper, not as itself.
    assert!(
        host.log().contains(
            "executor and validators run as the helper helper=/usr/bin/../libexec/amidala/amidalad-exec"
        ),
        "the installed helper is not used:\n{}",
        host.log()
    );
    let result = build.json();
    let image = field(&result, "image_id").to_owned();
    let image_snapshot = field(&result, "snapshot_id").to_owned();
    assert!(image.starts_with("ami-"), "{result}");
    let images = host.as_user(&ws, &["images", "--json"]).json();
    let listed = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == image.as_str())
        .unwrap_or_else(|| panic!("{image} not listed: {images}"));
    assert_eq!(listed["tags"]["amidala:owner"], USER);
    assert!(Path::new(STATE)
        .join("catalog/images")
        .join(format!("{image}.json"))
        .is_file());
    let disk = Path::new(STATE)
        .join("snapshots")
        .join(format!("{image_snapshot}.img"));
    {
        let mounted = Mounted::new(&disk, 0);
        assert_eq!(
            mounted.read("/etc/amidala-package-test"),
            "baked from the package\n"
        );
    }

    // The daemon stops as on `systemctl stop`, saying so, and leaves nothing in use.
    let pid = host.daemon.as_ref().unwrap().id();
    host.stop_daemon().unwrap();
    let n = notify.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "amidalad {pid} is gone"
    );
    assert_eq!(mounts_mentioning(STATE), vec![], "mounts left");
    let loops: Vec<_> = loop_devices()
        .into_iter()
        .filter(|(_, backing)| backing.starts_with(STATE))
        .collect();
    assert_eq!(loops, vec![], "loop devices left");

    // Purge: nothing of the package is left, but the groups (files may still be theirs).
    let listed = run(Command::new("dpkg").args(["-L", PACKAGE]));
    let listed: Vec<String> = listed.ok().lines().map(str::to_owned).collect();
    let purge = run(Command::new("dpkg").args(["--purge", PACKAGE]));
    purge.ok();
    assert!(
        purge.stderr.contains(&format!("removing {STATE}")),
        "{}",
        purge.stderr
    );
    assert_eq!(package_status(), None, "dpkg still knows {PACKAGE}");
    for path in &listed {
        let Ok(meta) = fs::symlink_metadata(path) else {
            continue;
        };
        // Directories the package shares with others (/usr/bin, /usr/share/man/man1, ...)
        // stay; its own go.
        assert!(
            meta.is_dir() && !path.contains("amidala"),
            "{path} is left after the purge"
        );
    }
    for path in PACKAGE_PATHS {
        assert!(fs::symlink_metadata(path).is_err(), "{path} is left");
    }
    for dir in [
        "/etc/systemd/system",
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/var/lib/systemd/deb-systemd-helper-masked",
    ] {
        let found = run(Command::new("find").args([dir, "-name", "*amidala*"]));
        assert_eq!(found.stdout, "", "left in {dir}");
    }
    assert_eq!(mounts_mentioning(STATE), vec![], "mounts left");
    for group in GROUPS {
        assert!(group_exists(group), "purge keeps the group {group}");
    }
    drop(host);
    eprintln!(
        "the package test took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
