//! Shared builder hosts: real unprivileged users, made by the test, run the real client as
//! themselves against the real daemon: who may build, list, read, follow and cancel what.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amidala_tests::{as_user, bin_dir, field, run, uid_of, Accounts, BootDisk, Env, Mounted, Run};
use std::os::unix::fs::FileTypeExt;

const MEMBER: &str = "amidala-t-alice";
const OTHER_MEMBER: &str = "amidala-t-bob";
const ADMIN: &str = "amidala-t-admin";
const OUTSIDER: &str = "amidala-t-eve";

struct Host {
    env: Env,
    client: PathBuf,
}

impl Host {
    /// The environment, with a copy of the client every user may run.
    fn new(env: Env) -> Host {
        let client = env.dir.path().join("amidala");
        fs::copy(bin_dir().join("amidala"), &client).unwrap();
        Host { env, client }
    }

    /// The client run as `user` (with that user's groups), in `cwd`.
    fn command(&self, user: &str, cwd: &Path, args: &[&str]) -> Command {
        let mut cmd = as_user(user, &self.client);
        cmd.args(args)
            .current_dir(cwd)
            .env("AMIDALA_SOCKET", &self.env.socket);
        cmd
    }

    fn run_as(&self, user: &str, cwd: &Path, args: &[&str]) -> Run {
        run(&mut self.command(user, cwd, args))
    }

    fn as_user(&self, user: &str, args: &[&str]) -> Run {
        self.run_as(user, self.env.dir.path(), args)
    }

    /// A workspace owned by `user`.
    fn workspace(&self, user: &str) -> PathBuf {
        let dir = self.env.workspace(&format!("ws-{user}"), &[("who", user)]);
        run(Command::new("chown")
            .args(["-R", &format!("{user}:{user}")])
            .arg(&dir))
        .ok();
        dir
    }

    fn spawn_build(&self, user: &str, script: &str) -> Child {
        let ws = self.workspace(user);
        self.command(
            user,
            &ws,
            &["build", "--json", "--", "/bin/sh", "-c", script],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    }

    /// The id of `user`'s build once it is provisioning.
    fn running_build_of(&self, user: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = self.as_user(user, &["list", "--json"]).json();
            if let Some(b) = list
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["state"] == "running" && b["phase"] == "provision")
            {
                return b["id"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{user} has no running build: {list}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn denied(run: &Run, what: &str) {
    let err = run.err();
    assert!(
        err.contains("permission_denied") && err.contains(what),
        "expected a refusal of {what}: {err}"
    );
}

#[test]
fn the_permission_matrix_with_real_users() {
    let _accounts = Accounts::create(&[
        (MEMBER, "amidala"),
        (OTHER_MEMBER, "amidala"),
        (ADMIN, "amidala,amidala-admin"),
        (OUTSIDER, ""),
    ]);
    // A shared builder's policy: members' recipes never get the instance metadata service.
    let env = Env::start_with(
        "[policy]\ndefault_network = \"no-metadata\"\nnetworks = [\"no-metadata\", \"none\"]\n",
        &[],
    );
    let client = env.dir.path().join("amidala");
    fs::copy(bin_dir().join("amidala"), &client).unwrap();
    fs::set_permissions(&client, fs::Permissions::from_mode(0o755)).unwrap();
    let host = Host { env, client };
    host.env.import_busybox();
    let socket_mode = fs::metadata(&host.env.socket).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(socket_mode.mode() & 0o777, 0o660);
    assert_eq!(
        socket_mode.gid(),
        run(Command::new("getent").args(["group", "amidala"]))
            .ok()
            .split(':')
            .nth(2)
            .unwrap()
            .parse::<u32>()
            .unwrap()
    );

    // A non-member cannot reach the daemon at all: the socket is the first gate.
    let outsider = host.as_user(OUTSIDER, &["list"]);
    let err = outsider.err();
    assert!(
        err.contains(host.env.socket.to_str().unwrap())
            && err.contains("Permission denied")
            && err.contains("members of group amidala"),
        "{err}"
    );

    // The network policy: members may not ask for the host's network; admins may.
    let ws = host.workspace(MEMBER);
    denied(
        &host.run_as(MEMBER, &ws, &["build", "--network", "host", "--", "true"]),
        "--network host refused: builds may use only no-metadata, none",
    );

    // Two members build at once; each sees and touches only their own build.
    let alice = host.spawn_build(MEMBER, "sleep 3; cp /workspace/who /root/built-by");
    let bob = host.spawn_build(OTHER_MEMBER, "sleep 3; cp /workspace/who /root/built-by");
    let alice_build = host.running_build_of(MEMBER);
    let bob_build = host.running_build_of(OTHER_MEMBER);
    for (user, own, other) in [
        (MEMBER, &alice_build, &bob_build),
        (OTHER_MEMBER, &bob_build, &alice_build),
    ] {
        let list = host.as_user(user, &["list", "--json"]).json();
        let ids: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![own.as_str()], "{user} lists only their own build");
        host.as_user(user, &["status", own]).ok();
        denied(
            &host.as_user(user, &["status", other]),
            "reading another user's build",
        );
        denied(
            &host.as_user(user, &["logs", other]),
            "reading another user's build",
        );
        denied(
            &host.as_user(user, &["logs", "-f", other]),
            "reading another user's build",
        );
        denied(
            &host.as_user(user, &["cancel", other]),
            "cancelling another user's build",
        );
    }
    // Admins and root see everything.
    for user in [ADMIN, "root"] {
        let list = host.as_user(user, &["list", "--json"]).json();
        assert_eq!(list.as_array().unwrap().len(), 2, "{user}: {list}");
        host.as_user(user, &["status", &alice_build]).ok();
        host.as_user(user, &["logs", &bob_build]).ok();
    }
    for (child, user) in [(alice, MEMBER), (bob, OTHER_MEMBER)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let images = host.as_user(user, &["images", "--json"]).json();
        let image = images
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == field(&result, "image_id"))
            .unwrap();
        assert_eq!(image["tags"]["amidala:owner"], user);
        assert_eq!(image["tags"]["amidala:owner-uid"], uid_of(user).to_string());
        let snapshots = host.as_user(user, &["snapshots", "--json"]).json();
        let snapshot = snapshots
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == field(&result, "snapshot_id"))
            .unwrap();
        assert_eq!(snapshot["tags"]["amidala:owner"], user);
    }

    // Cancelling: not another member's build; your own, and an admin any.
    let alice = host.spawn_build(MEMBER, "sleep 300");
    let alice_build = host.running_build_of(MEMBER);
    denied(
        &host.as_user(OTHER_MEMBER, &["cancel", &alice_build]),
        "cancelling another user's build",
    );
    let cancelled = host.as_user(ADMIN, &["cancel", &alice_build]);
    assert!(
        cancelled.ok().is_empty() && cancelled.stderr.contains("is cancelled"),
        "{}",
        cancelled.stderr
    );
    assert!(!alice.wait_with_output().unwrap().status.success());
    let bob = host.spawn_build(OTHER_MEMBER, "sleep 300");
    let bob_build = host.running_build_of(OTHER_MEMBER);
    host.as_user(OTHER_MEMBER, &["cancel", &bob_build]).ok();
    assert!(!bob.wait_with_output().unwrap().status.success());

    // Refusals are in the daemon's log with who asked.
    let log = host.env.daemon_log();
    let bob_uid = uid_of(OTHER_MEMBER);
    assert!(
        log.lines().any(|l| l.contains("refused")
            && l.contains(&format!("uid={bob_uid}"))
            && l.contains("cancelling another user's build")),
        "{log}"
    );
    // gc: admins and root only.
    denied(
        &host.as_user(MEMBER, &["gc", "--dry-run"]),
        "collecting garbage refused: only admins",
    );
    denied(&host.as_user(MEMBER, &["gc"]), "collecting garbage");
    let outsider = host.as_user(OUTSIDER, &["gc", "--dry-run"]);
    assert!(
        outsider.err().contains("Permission denied"),
        "{}",
        outsider.stderr
    );
    host.as_user(ADMIN, &["gc", "--dry-run"]).ok();
    host.env.amidala(&["gc", "--dry-run"]).ok();

    // Admins may use any network.
    let ws = host.workspace(ADMIN);
    host.run_as(ADMIN, &ws, &["build", "--network", "host", "--", "true"])
        .ok();
    host.env.assert_no_leaks();
}

/// Issue 14, point 12: no one but root can reach the state directory's lock, and a lock file an
/// older daemon left open to all, held by a non-member, does not keep the daemon from starting.
#[test]
fn a_non_member_cannot_keep_the_daemon_from_starting() {
    const STRANGER: &str = "amidala-t-mallory";
    let _accounts = Accounts::create(&[(STRANGER, "")]);
    let mut env = Env::start();
    env.stop();
    use std::os::unix::fs::MetadataExt;
    let state_mode = fs::metadata(&env.state).unwrap().mode() & 0o7777;
    assert_eq!(state_mode, 0o700, "the state directory is root's alone");
    let lock = env.state.join("lock");
    assert_eq!(fs::metadata(&lock).unwrap().mode() & 0o7777, 0o600);
    // As an older daemon left them: everyone may open the lock file.
    fs::set_permissions(&env.state, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&lock, fs::Permissions::from_mode(0o644)).unwrap();
    let mut holder = as_user(STRANGER, "flock")
        .args(["--shared", "--nonblock"])
        .arg(&lock)
        .args(["sh", "-c", "echo locked; exec sleep 60"])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // Once it says so, the stranger holds a shared lock on the old file.
    let mut said = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(said, "locked\n", "the stranger could not take the lock");
    env.restart();
    env.amidala(&["version"]).ok();
    assert_eq!(fs::metadata(&env.state).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(fs::metadata(&lock).unwrap().mode() & 0o7777, 0o600);
    // And now the stranger cannot even open it.
    let open = run(as_user(STRANGER, "cat").arg(&lock));
    assert!(open.err().contains("Permission denied"), "{}", open.stderr);
    // flock and the sleep it started, as a group.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(holder.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = holder.wait();
}

/// Issue 14, points 1 to 3: a member's build sees the workspace with the member's rights and
/// writes to it only as the member: no host file they cannot read (from their own workspace or
/// from `/etc`), no file owned by root or anyone else left behind, no setuid file, no device
/// node, no file-handle escape; its own disk's device (in `/dev/disk/by-uuid`, for GRUB's
/// tools) it may read, not write, detach, change or remove.
#[test]
fn a_build_sees_the_workspace_with_its_users_rights() {
    const ALICE: &str = "amidala-t-ws-alice";
    const BOB: &str = "amidala-t-ws-bob";
    let _accounts = Accounts::create(&[(ALICE, "amidala"), (BOB, "amidala")]);
    let env = Env::start();
    let host = Host::new(env);
    host.env.import_busybox();
    let ws = host.workspace(ALICE);
    use std::os::unix::fs::MetadataExt;
    let owner = |path: &Path, user: &str, mode: u32| {
        run(Command::new("chown")
            .arg(format!("{user}:{user}"))
            .arg(path))
        .ok();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    fs::write(ws.join("mine"), "alice's\n").unwrap();
    owner(&ws.join("mine"), ALICE, 0o600);
    fs::write(ws.join("root-secret"), "root's\n").unwrap();
    owner(&ws.join("root-secret"), "root", 0o600);
    fs::write(ws.join("bob-secret"), "bob's\n").unwrap();
    owner(&ws.join("bob-secret"), BOB, 0o640);
    fs::create_dir(ws.join("root-dir")).unwrap();
    owner(&ws.join("root-dir"), "root", 0o755);
    fs::copy(amidala_tests::escape_probe(), ws.join("escape-probe")).unwrap();
    owner(&ws.join("escape-probe"), ALICE, 0o755);

    let attempt = |name: &str, command: &str| {
        format!("if ( {command} ) >/dev/null 2>&1; then echo '{name} worked'; else echo '{name} refused'; fi >> /root/report\n")
    };
    let read_only: String = [
        attempt("read-own-file", "cat /workspace/mine"),
        attempt("read-roots-file", "cat /workspace/root-secret"),
        attempt("read-bobs-file", "cat /workspace/bob-secret"),
        attempt("write-read-only", "touch /workspace/new"),
        "/workspace/escape-probe handle /workspace >> /root/report\n".into(),
        // The build's own disk, which its /dev has for the boot tooling: readable only.
        "/workspace/escape-probe disk >> /root/report\n".into(),
    ]
    .concat();
    let out = host.run_as(
        ALICE,
        &ws,
        &["build", "--json", "--", "/bin/sh", "-c", &read_only],
    );
    let result = out.json();
    let image = Mounted::new(&host.env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(
        image.read("/root/report"),
        "read-own-file worked\nread-roots-file refused\nread-bobs-file refused\n\
         write-read-only refused\nopen_by_handle_at errno 1 (Operation not permitted)\n\
         disk-read ok\ndisk-ext4-magic ok\ndisk-write errno 13 (Permission denied)\n\
         LOOP_GET_STATUS64 errno 1 (Operation not permitted)\n\
         LOOP_CLR_FD errno 1 (Operation not permitted)\n\
         disk-chmod errno 1 (Operation not permitted)\n\
         disk-unlink errno 13 (Permission denied)\n"
    );
    drop(image);

    // The issue's own probes: /etc and / as workspaces.
    let shadow = host.run_as(
        ALICE,
        Path::new("/etc"),
        &["build", "--", "cat", "/workspace/shadow"],
    );
    assert!(
        shadow.err().contains("provisioner exited with status 1")
            && shadow.stderr.contains("Permission denied"),
        "{}",
        shadow.stderr
    );
    assert!(!shadow.stderr.contains("root:"), "{}", shadow.stderr);
    let root = host.run_as(
        ALICE,
        Path::new("/"),
        &["build", "--", "ls", "/workspace/root"],
    );
    assert!(root.err().contains("Permission denied"), "{}", root.stderr);

    // Read-write: whatever root in the build does, the host gets files of alice's only.
    let read_write: String = [
        attempt(
            "setuid-root-copy",
            "cp /bin/busybox /workspace/rs && chown 0:0 /workspace/rs && chmod 4755 /workspace/rs",
        ),
        attempt(
            "chown-to-bob",
            "touch /workspace/given && chown 1234 /workspace/given",
        ),
        attempt("write-in-roots-dir", "touch /workspace/root-dir/x"),
        attempt("overwrite-roots-file", "echo x > /workspace/root-secret"),
        attempt("mknod", "mknod /workspace/null c 1 3"),
        attempt(
            "setgid-dir-file",
            "mkdir /workspace/d && touch /workspace/d/f && chmod 2755 /workspace/d/f",
        ),
    ]
    .concat();
    let out = host.run_as(
        ALICE,
        &ws,
        &[
            "build",
            "--json",
            "--workspace-rw",
            "--",
            "/bin/sh",
            "-c",
            &read_write,
        ],
    );
    let log = out.stderr.clone();
    let result = out.json();
    let image = Mounted::new(&host.env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(
        image.read("/root/report"),
        "setuid-root-copy worked\nchown-to-bob refused\nwrite-in-roots-dir refused\n\
         overwrite-roots-file refused\nmknod refused\nsetgid-dir-file worked\n"
    );
    drop(image);
    assert!(
        log.contains("cleared the setuid and setgid bits and file capabilities of 2 files"),
        "{log}\n{}",
        run(Command::new("ls").arg("-lRn").arg(&ws)).stdout
    );
    let alice = amidala_tests::uid_of(ALICE);
    for entry in walk(&ws) {
        let meta = fs::symlink_metadata(&entry).unwrap();
        let name = entry.strip_prefix(&ws).unwrap().display().to_string();
        if ["root-secret", "root-dir", "bob-secret"].contains(&name.as_str()) {
            continue;
        }
        assert_eq!(meta.uid(), alice, "{name} is alice's");
        assert_eq!(
            meta.mode() & 0o6000,
            0,
            "{name} is neither setuid nor setgid"
        );
        assert!(
            !meta.file_type().is_char_device() && !meta.file_type().is_block_device(),
            "{name}"
        );
    }
    assert_eq!(
        fs::read_to_string(ws.join("root-secret")).unwrap(),
        "root's\n"
    );
    assert!(!ws.join("root-dir/x").exists());
    assert!(ws.join("rs").exists(), "the copy was made, as alice's");
    host.env.assert_no_leaks();
}

/// Issue 14, points 1 and 3, the class rather than the probe: a descriptor of a host file handed
/// into a member's build (a host process of theirs passes it over a Unix socket in the
/// workspace) opens nothing the member could not open. The provisioner is root only of a user
/// namespace of its own: root's files on the host are no more its than another user's, and the
/// daemon's socket, passed as an `O_PATH` descriptor, does not let it in as root. And each
/// member's builds run as host ids of their own: the host's `/proc` handed in does not lead
/// into another member's running build (`/proc/PID/root`, which same ids would open).
#[test]
fn a_descriptor_handed_into_a_build_opens_nothing_its_user_could_not() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    const CAROL: &str = "amidala-t-fd-carol";
    const DAVE: &str = "amidala-t-fd-dave";
    let _accounts = Accounts::create(&[(CAROL, "amidala"), (DAVE, "amidala")]);
    let env = Env::start();
    let host = Host::new(env);
    host.env.import_busybox();
    let ws = host.workspace(CAROL);
    fs::copy(amidala_tests::escape_probe(), ws.join("escape-probe")).unwrap();
    let listener = UnixListener::bind(ws.join("pass.sock")).unwrap();
    run(Command::new("chown")
        .arg(format!("{CAROL}:{CAROL}"))
        .arg(ws.join("escape-probe"))
        .arg(ws.join("pass.sock")))
    .ok();
    // Another member's build, running, with a secret in its image.
    let dave = host.spawn_build(
        DAVE,
        "echo dave > /root/secret; chmod 600 /root/secret; sleep 30",
    );
    let dave_id = host.running_build_of(DAVE);
    let find_dave = || {
        for entry in fs::read_dir("/proc").ok()?.flatten() {
            let path = entry.path();
            let status = fs::read_to_string(path.join("status")).unwrap_or_default();
            let uid: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse().ok())
                .unwrap_or(0);
            // Dave's, not another test's build's: in the cgroup named after his build.
            let cgroup = fs::read_to_string(path.join("cgroup")).unwrap_or_default();
            if status.starts_with("Name:\tsleep") && uid >= 0x7000_0000 && cgroup.contains(&dave_id)
            {
                return path.file_name()?.to_str().map(str::to_owned);
            }
        }
        None
    };
    // Running once its build is, but maybe not yet at its sleep.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dave_pid = loop {
        match find_dave() {
            Some(pid) => break pid,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("dave's provisioner, running as dave's build ids, never started"),
        }
    };
    // What the member's process hands in: the host's root directory, the daemon's socket, and
    // the host's /proc.
    let handed = [
        fs::File::open("/").unwrap(),
        nix::fcntl::open(
            &host.env.socket,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(|fd| {
            // SAFETY: open just returned this descriptor, owned by nobody else.
            unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .unwrap(),
        fs::File::open("/proc").unwrap(),
    ];
    let sender = std::thread::spawn(move || {
        for fd in &handed {
            let (conn, _) = listener.accept().unwrap();
            nix::sys::socket::sendmsg::<()>(
                conn.as_raw_fd(),
                &[std::io::IoSlice::new(b"x")],
                &[nix::sys::socket::ControlMessage::ScmRights(&[
                    fd.as_raw_fd()
                ])],
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .unwrap();
        }
    });
    // Root of its image all the same: its files keep the owners the build gives them.
    let script = format!(
        "/workspace/escape-probe recvfd /workspace/pass.sock etc/passwd etc/shadow; \
         /workspace/escape-probe recvfd-connect /workspace/pass.sock; \
         /workspace/escape-probe recvfd /workspace/pass.sock {dave_pid}/root/root/secret; \
         touch /root/given && chown 1234:2345 /root/given && chmod 4755 /root/given && \
         echo ok > /dev/null && echo \"root-in-image $(id -u):$(stat -c %u /etc/passwd)\""
    );
    let out = host.run_as(
        CAROL,
        &ws,
        &["build", "--json", "--", "/bin/sh", "-c", &script],
    );
    let result = out.json();
    sender.join().unwrap();
    host.as_user(DAVE, &["cancel", &dave_id]).ok();
    let _ = dave.wait_with_output();
    let image = Mounted::new(&host.env.snapshot_file(field(&result, "snapshot_id")), 0);
    use std::os::unix::fs::MetadataExt;
    let given = fs::symlink_metadata(image.path("/root/given")).unwrap();
    assert_eq!(
        (given.uid(), given.gid(), given.mode() & 0o7777),
        (1234, 2345, 0o4755)
    );
    let passwd = fs::symlink_metadata(image.path("/etc/passwd")).unwrap();
    assert_eq!(passwd.uid(), 0, "the image's own files are untouched");
    drop(image);
    let log = &out.stderr;
    assert!(log.contains("root-in-image 0:0"), "{log}");
    assert!(log.contains("received ok"), "{log}");
    // The descriptor works, for what anyone may read...
    assert!(
        log.contains("open etc/passwd ok") && log.contains("first-line root:"),
        "{log}"
    );
    // ...and for nothing more.
    assert!(log.contains("open etc/shadow errno 13"), "{log}");
    assert!(log.contains("connect-passed errno 13"), "{log}");
    assert!(
        log.contains(&format!("open {dave_pid}/root/root/secret errno 13")),
        "{log}"
    );
    assert!(!log.contains("first-line dave"), "{log}");
    host.env.assert_no_leaks();
}

/// Every path below `dir`, not following symlinks.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// Issue 14, points 5 and 6: a tag resolves among the caller's own snapshots and the published
/// ones, never another member's (a member's trojan base is no one else's); snapshots, images
/// and logs are their owners', on disk and through the socket, and the blocks of files a
/// build deleted do not travel in its snapshot.
#[test]
fn bases_snapshots_and_logs_are_their_owners() {
    const ALICE: &str = "amidala-t-own-alice";
    const MALLORY: &str = "amidala-t-own-mallory";
    let _accounts = Accounts::create(&[(ALICE, "amidala"), (MALLORY, "amidala")]);
    let env = Env::start();
    let host = Host::new(env);
    // The admin's published base.
    let base = host.env.import_busybox();
    // Mallory's trojan base, newer, tagged as everyone's default.
    let trojan = host.env.busybox_rootfs("trojan");
    fs::write(trojan.join("root/trojan"), "mallory was here\n").unwrap();
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&trojan)).ok();
    let poisoned = host.as_user(MALLORY, &["base", "import", trojan.to_str().unwrap()]);
    let poisoned = poisoned.ok().trim().to_owned();
    assert!(poisoned.starts_with("snap-"), "{poisoned}");
    // Publishing is for admins.
    let refused = host.as_user(MALLORY, &["base", "publish", &poisoned]);
    assert!(
        refused.err().contains("permission_denied"),
        "{}",
        refused.stderr
    );

    // Alice's default build, and what validate says it would use: the published base.
    let ws = host.workspace(ALICE);
    let plan = host.run_as(ALICE, &ws, &["validate", "--", "true"]);
    assert!(
        plan.ok().contains(&format!("→ {base} (root's, published;")),
        "{}",
        plan.stdout
    );
    // A secret written, synced to the volume, and deleted: it must not travel.
    let script = "a=SECRET; b=$(echo 7f3a); echo \"$a-$b-data\" > /root/secret; sync; \
                  rm /root/secret; sync; test ! -e /root/trojan";
    let out = host.run_as(
        ALICE,
        &ws,
        &["build", "--json", "--", "/bin/sh", "-c", script],
    );
    let log = out.stderr.clone();
    let alice_result = out.json();
    assert!(
        log.contains(&format!("starting from {base} (root's, published)")),
        "{log}"
    );
    let alice_snapshot = field(&alice_result, "snapshot_id").to_owned();
    let alice_build = field(&alice_result, "build_id").to_owned();
    let file = host.env.snapshot_file(&alice_snapshot);
    let bytes = fs::read(&file).unwrap();
    assert!(
        !bytes.windows(16).any(|w| w == b"SECRET-7f3a-data"),
        "the deleted secret is in the snapshot file"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    // Mallory's own build starts from her own newest base; root's (an admin's) does not.
    let mine = host.run_as(
        MALLORY,
        &host.workspace(MALLORY),
        &["build", "--", "test", "-e", "/root/trojan"],
    );
    assert!(
        mine.ok().starts_with("ami-")
            && mine
                .stderr
                .contains(&format!("starting from {poisoned} ({MALLORY}'s)")),
        "{}",
        mine.stderr
    );
    let root_build = host
        .env
        .build(&ws, &["--", "/bin/sh", "-c", "test ! -e /root/trojan"]);
    assert!(root_build["image_id"].is_string());

    // Through the socket: Mallory sees her snapshots and the published ones, not Alice's.
    let listed = host.as_user(MALLORY, &["snapshots", "--json"]).json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&base.as_str()) && ids.contains(&poisoned.as_str()),
        "{listed}"
    );
    assert!(!ids.contains(&alice_snapshot.as_str()), "{listed}");
    let images = host.as_user(MALLORY, &["images", "--json"]).json();
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["tags"]["amidala:owner"] == MALLORY),
        "{images}"
    );
    let target = host.env.dir.path().join("exports");
    fs::create_dir(&target).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o1777)).unwrap();
    let stolen = target.join("stolen.img");
    let export = host.as_user(
        MALLORY,
        &["export", &alice_snapshot, "-o", stolen.to_str().unwrap()],
    );
    assert!(
        export.err().contains("not_found") && export.stderr.contains("neither yours nor published"),
        "{}",
        export.stderr
    );
    assert!(!stolen.exists());
    let logs = host.as_user(MALLORY, &["logs", &alice_build]);
    assert!(logs.err().contains("permission_denied"), "{}", logs.stderr);
    // On disk: neither the snapshot file nor the log can be read by another user.
    for path in [
        file.clone(),
        host.env
            .state
            .join("builds")
            .join(format!("{alice_build}.log")),
    ] {
        let read = run(as_user(MALLORY, "cat").arg(&path));
        assert!(
            read.err().contains("Permission denied"),
            "{}",
            path.display()
        );
    }

    // Alice gets her own image's disk through the daemon, as a file of hers.
    let own = target.join("alice.img");
    host.as_user(
        ALICE,
        &[
            "export",
            field(&alice_result, "image_id"),
            "-o",
            own.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(fs::metadata(&own).unwrap().uid(), uid_of(ALICE));
    assert_eq!(
        fs::read(&own).unwrap(),
        bytes,
        "the copy is the snapshot's disk"
    );
    let again = host.as_user(
        ALICE,
        &["export", &alice_snapshot, "-o", own.to_str().unwrap()],
    );
    assert!(again.err().contains("File exists"), "{}", again.stderr);

    // And deletes it: the image and its snapshot go; Mallory cannot delete what is not hers.
    let refused = host.as_user(MALLORY, &["delete", field(&alice_result, "image_id")]);
    assert!(refused.err().contains("not_found"), "{}", refused.stderr);
    let deleted = host.as_user(ALICE, &["delete", field(&alice_result, "image_id")]);
    assert_eq!(
        deleted.ok(),
        format!(
            "deleted {}\ndeleted {alice_snapshot}\n",
            field(&alice_result, "image_id")
        )
    );
    assert!(!file.exists());
    assert!(!host
        .as_user(ALICE, &["snapshots"])
        .ok()
        .contains(&alice_snapshot));
    host.env.assert_no_leaks();
}

/// Descriptors of the processes of `uid`: (pid, what each refers to).
fn descriptors_of(uid: u32) -> Vec<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if fs::metadata(entry.path()).map(|m| m.uid()).ok() != Some(uid) {
            continue;
        }
        for fd in fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = fs::read_link(fd.path()) {
                out.push((pid.clone(), target.display().to_string()));
            }
        }
    }
    out
}

/// Issue 14, point 8: no process of the importing user ever holds the new image (no file of
/// the state directory, no loop device): the directory is read by a process of theirs, the
/// image is written by the sandbox through the kernel.
#[test]
fn an_import_gives_its_user_no_handle_on_the_snapshot() {
    const IMPORTER: &str = "amidala-t-importer";
    let _accounts = Accounts::create(&[(IMPORTER, "amidala")]);
    let env = Env::start();
    let host = Host::new(env);
    let tree = host.env.busybox_rootfs("big-tree");
    // Enough data for the import to last a while, read by the user's own process.
    run(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", tree.join("root/blob").display()))
        .args(["bs=1M", "count=192", "status=none"]))
    .ok();
    run(Command::new("chown")
        .args(["-R", &format!("{IMPORTER}:{IMPORTER}")])
        .arg(&tree))
    .ok();
    let uid = uid_of(IMPORTER);
    let mut import = host
        .command(
            IMPORTER,
            host.env.dir.path(),
            &["base", "import", tree.to_str().unwrap()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = host.env.state.display().to_string();
    let mut seen = Vec::new();
    while import.try_wait().unwrap().is_none() {
        seen.extend(descriptors_of(uid));
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = import.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        seen.iter().any(|(_, t)| t.contains("big-tree")),
        "the user's processes were seen reading the tree: {seen:?}"
    );
    let held: Vec<_> = seen
        .iter()
        .filter(|(_, t)| t.starts_with(&state) || t.starts_with("/dev/loop"))
        .collect();
    assert!(held.is_empty(), "the user held the image: {held:?}");
    let write = run(as_user(IMPORTER, "sh").arg("-c").arg(format!(
        "echo x >> {}",
        host.env.snapshot_file(&snapshot).display()
    )));
    assert!(
        write.err().contains("Permission denied"),
        "{}",
        write.stderr
    );
    host.env.assert_no_leaks();
}

/// Issue 14, point 13: one member's builds cannot keep another's waiting (a fair queue, and a
/// share of the slots each), a member cannot ask for an endless build, and each member's
/// snapshots and volumes stay within a quota.
#[test]
fn no_member_starves_another_or_fills_the_disk() {
    const GREEDY: &str = "amidala-t-greedy";
    const PATIENT: &str = "amidala-t-patient";
    let _accounts = Accounts::create(&[(GREEDY, "amidala"), (PATIENT, "amidala")]);
    let env = Env::start_with(
        "max_builds = 2\n[limits]\nmax_builds_per_user = 8\nmax_running_builds_per_user = 1\n\
         build_timeout = 600\nmax_build_timeout = 600\nuser_quota = \"150M\"\n",
        &[],
    );
    let host = Host::new(env);
    host.env.import_busybox();

    // The greedy member queues four long builds: one runs, three wait, a slot stays free.
    let greedy: Vec<Child> = (0..4)
        .map(|_| host.spawn_build(GREEDY, "sleep 300"))
        .collect();
    host.running_build_of(GREEDY);
    // The patient member's build runs at once, not after the greedy one's.
    let ws = host.workspace(PATIENT);
    let started = Instant::now();
    host.run_as(PATIENT, &ws, &["build", "--", "true"]).ok();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?} behind another member's builds",
        started.elapsed()
    );
    let list = host.as_user(GREEDY, &["list", "--json"]).json();
    let running = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "running")
        .count();
    assert_eq!(
        running, 1,
        "one build of the greedy member's at a time: {list}"
    );
    for child in greedy {
        let id = child.id();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(id as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = child.wait_with_output();
    }

    // No endless builds for members.
    let endless = host.run_as(PATIENT, &ws, &["build", "--timeout", "2h", "--", "true"]);
    assert!(
        endless.err().contains("limit_exceeded") && endless.stderr.contains("max_build_timeout"),
        "{}",
        endless.stderr
    );

    // The quota: an import of their own (68 MiB) fits, a second does not, nor a build of it
    // whose volume would pass the quota; deleting frees the space.
    let tree = host.env.busybox_rootfs("patient-tree");
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&tree)).ok();
    let own = host.as_user(
        PATIENT,
        &["base", "import", tree.to_str().unwrap(), "--tag", "mine=1"],
    );
    let own = own.ok().trim().to_owned();
    let second = host.as_user(PATIENT, &["base", "import", tree.to_str().unwrap()]);
    assert!(
        second.err().contains("limit_exceeded") && second.stderr.contains("quota"),
        "{}",
        second.stderr
    );
    let over = host.run_as(PATIENT, &ws, &["build", "--from", "mine=1", "--", "true"]);
    assert!(
        over.err().contains("failed in phase volume") && over.stderr.contains("user_quota"),
        "{}",
        over.stderr
    );
    host.as_user(PATIENT, &["delete", &own]).ok();
    host.as_user(PATIENT, &["base", "import", tree.to_str().unwrap()])
        .ok();
    host.env.assert_no_leaks();
}

/// A member's qcow2 image is converted by qemu-img as an id of that member's range, and the
/// conversion stops when what it writes passes the member's quota (a compressed qcow2 image
/// can hold far more than its own size), leaving nothing behind.
#[test]
fn a_members_qcow2_import_is_converted_within_their_quota() {
    const MEMBER: &str = "amidala-t-qcow2";
    let _accounts = Accounts::create(&[(MEMBER, "amidala")]);
    let env = Env::start_with("[limits]\nuser_quota = \"48M\"\n", &[]);
    let host = Host::new(env);
    let dir = host.env.dir.path();
    // A disk whose filesystem holds 64 MiB of data that compresses to almost nothing.
    let tree = dir.join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("data"), "amidala ".repeat(8 << 20)).unwrap();
    let (raw, small, big) = (
        dir.join("raw.img"),
        dir.join("small.qcow2"),
        dir.join("big.qcow2"),
    );
    for (file, size, content) in [
        (&raw, "96M", Some(&tree)),
        (&dir.join("empty.img"), "32M", None),
    ] {
        run(Command::new("truncate").arg("-s").arg(size).arg(file)).ok();
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F"]);
        if let Some(tree) = content {
            mkfs.arg("-d").arg(tree);
        }
        run(mkfs.arg(file)).ok();
    }
    for (from, to) in [(&raw, &big), (&dir.join("empty.img"), &small)] {
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(from)
            .arg(to))
        .ok();
    }
    run(Command::new("chmod").arg("a+r").arg(&small).arg(&big)).ok();
    assert!(fs::metadata(&big).unwrap().len() < 8 << 20);

    let over = host.as_user(MEMBER, &["base", "import", big.to_str().unwrap()]);
    assert!(
        // Stopped while converting, or refused once converted (the output is measured every
        // 250 ms while qemu-img runs, and a fast conversion can finish in between).
        over.err().contains("limit_exceeded")
            && over.stderr.contains("big.qcow2")
            && over.stderr.contains("your quota"),
        "{}",
        over.stderr
    );
    host.env.assert_no_leaks();
    let snapshots = host.as_user(MEMBER, &["snapshots", "--json"]).json();
    assert_eq!(snapshots, serde_json::json!([]));
    // A small one fits, and is the member's.
    let id = host.as_user(MEMBER, &["base", "import", small.to_str().unwrap()]);
    let id = id.ok().trim().to_owned();
    let snapshots = host.as_user(MEMBER, &["snapshots", "--json"]).json();
    assert_eq!(snapshots[0]["id"], id.as_str(), "{snapshots}");
    host.env.assert_no_leaks();
}

/// Imports in flight claim what they will write: a member's imports running at once cannot
/// together pass their quota (each was bounded by the whole of it before), and an import whose
/// client has gone runs to its end and counts until then.
#[test]
fn a_members_imports_in_flight_claim_their_space_until_they_end() {
    const MEMBER: &str = "amidala-t-claims";
    let _accounts = Accounts::create(&[(MEMBER, "amidala")]);
    let env = Env::start_with(
        "[limits]\nuser_quota = \"700M\"\nmax_imports_per_user = 2\n",
        &[],
    );
    let host = Host::new(env);
    let dir = host.env.dir.path();
    // A: a tree of 500 MiB (it claims what its filesystem will take, and takes seconds to
    // unpack); B: a raw disk holding 250 MiB, which fits the quota alone.
    let tree = dir.join("tree");
    fs::create_dir(&tree).unwrap();
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(tree.join("data"), vec![7u8; 500 << 20]).unwrap();
    let content = dir.join("content");
    fs::create_dir(&content).unwrap();
    fs::write(content.join("data"), vec![9u8; 250 << 20]).unwrap();
    let disk = dir.join("disk.img");
    run(Command::new("truncate").arg("-s").arg("300M").arg(&disk)).ok();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&disk))
    .ok();
    fs::remove_dir_all(&content).unwrap();
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o644)).unwrap();

    let mut first = host
        .command(MEMBER, dir, &["base", "import", tree.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Its claim is made before it unpacks: once it says so, its client goes away.
    let mut said = std::io::BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut said, &mut line).unwrap();
        assert!(n > 0, "the first import ended before it unpacked");
        if line.contains("amidala: unpacking") {
            break;
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let second = host.as_user(MEMBER, &["base", "import", disk.to_str().unwrap()]);
    assert!(
        second.err().contains("limit_exceeded")
            && second.stderr.contains("imports in flight have claimed"),
        "{}",
        second.stderr
    );
    // The first runs to its end without its client.
    let deadline = Instant::now() + Duration::from_secs(300);
    let snapshot = loop {
        let snapshots = host.as_user(MEMBER, &["snapshots", "--json"]).json();
        if let Some(s) = snapshots.as_array().unwrap().first() {
            break s["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the first import never ended");
        std::thread::sleep(Duration::from_millis(250));
    };
    // Its snapshot now counts as such; without it, the second fits.
    // (Its claim goes when its task has ended, just after the snapshot is in the catalog.)
    host.as_user(MEMBER, &["delete", &snapshot]).ok();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let id = host.as_user(MEMBER, &["base", "import", disk.to_str().unwrap()]);
        if !id.stderr.contains("imports in flight have claimed") || Instant::now() > deadline {
            break id;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(id.ok().trim().starts_with("snap-"), "{}", id.stdout);
    host.env.assert_no_leaks();
}

#[test]
fn a_builds_output_is_bounded_and_counts_against_its_owners_quota() {
    // Point 13: a build that prints without end fills no disk: its log stops at build_log,
    // and logs count against their owner's quota until the owner deletes the build.
    const CHATTY: &str = "amidala-t-chatty";
    const NEIGHBOUR: &str = "amidala-t-neighbour";
    let _accounts = Accounts::create(&[(CHATTY, "amidala"), (NEIGHBOUR, "amidala")]);
    let probe = Env::start();
    probe.import_busybox();
    let size = probe.amidala(&["snapshots", "--json"]).json()[0]["size"]
        .as_u64()
        .unwrap();
    drop(probe);
    // Room for two snapshots of the base and 512 KiB more.
    let quota = 2 * size + (512 << 10);
    let env = Env::start_with(
        &format!("[limits]\nbuild_log = \"1M\"\nuser_quota = {quota}\n"),
        &[],
    );
    let host = Host::new(env);
    host.env.import_busybox();
    let ws = host.workspace(CHATTY);
    // A build is not deleted while it runs.
    let sleeper = host.spawn_build(CHATTY, "sleep 60");
    let running = host.running_build_of(CHATTY);
    let busy = host.as_user(CHATTY, &["delete", &running]);
    assert!(busy.err().contains("cancel it first"), "{}", busy.stderr);
    host.as_user(CHATTY, &["cancel", &running]).ok();
    let _ = sleeper.wait_with_output();

    let noisy = "yes | head -c 3000000; echo end";
    let chatty = host
        .run_as(
            CHATTY,
            &ws,
            &["build", "--json", "--", "/bin/sh", "-c", noisy],
        )
        .json();
    let id = field(&chatty, "build_id").to_owned();
    let log = host.env.state.join("builds").join(format!("{id}.log"));
    let len = fs::metadata(&log).unwrap().len();
    // Past the limit: only the line that says so, the last phases and the build's end.
    assert!(
        (1 << 20) - (1 << 10) < len && len <= (1 << 20) + (4 << 10),
        "the log holds {len} bytes, against a build_log of 1 MiB"
    );
    let shown = host.as_user(CHATTY, &["logs", &id]);
    assert!(
        shown.ok().contains("[limits] build_log") && !shown.ok().contains("\nend\n"),
        "{}",
        shown.stderr
    );

    // Its snapshot and its 1 MiB of log leave less than a volume of the base.
    let over = host.run_as(CHATTY, &ws, &["build", "--", "true"]);
    assert!(
        over.err().contains("failed in phase volume") && over.stderr.contains("build logs"),
        "{}",
        over.stderr
    );
    // Only its owner (or an admin) deletes a build.
    denied(
        &host.as_user(NEIGHBOUR, &["delete", &id]),
        "reading another user's build",
    );
    let deleted = host.as_user(CHATTY, &["delete", &id]);
    assert!(
        deleted.ok().contains(&format!("deleted {id}")),
        "{}",
        deleted.stdout
    );
    assert!(!log.exists(), "the log is gone");
    let gone = host.as_user(CHATTY, &["status", &id]);
    assert!(gone.err().contains("does not exist"), "{}", gone.stderr);
    host.run_as(CHATTY, &ws, &["build", "--", "true"]).ok();
    host.env.assert_no_leaks();
}

/// A member's build sees the partitions its image's fstab mounts at /boot and /boot/efi as
/// its own root's (the boot partition mapped into the build's namespace as the root is, the
/// ESP's copy writable by it), and what it writes there lands in the member's image.
#[test]
fn a_members_build_writes_its_boot_partitions() {
    const MEMBER: &str = "amidala-t-boot";
    let _accounts = Accounts::create(&[(MEMBER, "amidala")]);
    let env = Env::start();
    let host = Host::new(env);
    let rootfs = host.env.busybox_rootfs("rootfs");
    let BootDisk {
        disk,
        boot_at,
        esp_at,
        ..
    } = BootDisk::make(host.env.dir.path(), &rootfs);
    run(Command::new("chmod").arg("a+r").arg(&disk)).ok();
    let base = host.as_user(MEMBER, &["base", "import", disk.to_str().unwrap()]);
    let base = base.ok().trim().to_owned();
    let ws = host.workspace(MEMBER);
    let built = host.run_as(
        MEMBER,
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--",
            "/bin/sh",
            "-c",
            "set -e
             test \"$(stat -c %u /boot/vmlinuz-old)\" = 0
             echo new kernel > /boot/vmlinuz-new
             chown 0:0 /boot/vmlinuz-new
             cp /boot/efi/EFI/BOOT/BOOTX64.EFI /boot/efi/EFI/BOOT/fallback.efi
             mknod /boot/null c 1 3 2>/dev/null && exit 9 || true",
        ],
    );
    let result = built.json();
    let snap = host.env.snapshot_file(field(&result, "snapshot_id"));
    let boot = Mounted::new(&snap, boot_at);
    assert_eq!(boot.read("/vmlinuz-new"), "new kernel\n");
    // Written as the build's root: host root's on the partition, as in any image.
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&fs::metadata(boot.path("/vmlinuz-new")).unwrap()),
        0
    );
    drop(boot);
    let fallback = run(Command::new("mtype").args([
        "-i",
        &format!("{}@@{esp_at}", snap.display()),
        "::/EFI/BOOT/fallback.efi",
    ]))
    .ok()
    .to_owned();
    assert_eq!(fallback, "the loader\n");
    host.env.assert_no_leaks();
}
