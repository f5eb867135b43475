//! `amidala --host USER@HOST`: the client on a "laptop" (root here, in a workspace of its own)
//! reaches a "builder" through a real sshd on 127.0.0.1, logging in as a real unprivileged
//! user in group amidala, whose builder-side client talks to the real daemon.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amidala_tests::{bin_dir, field, run, uid_of, Accounts, Env, Mounted, Run};

const USER: &str = "amidala-t-remote";

/// An sshd of the test's own on 127.0.0.1, letting `USER` in with a key made for it.
struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    log: PathBuf,
}

impl Sshd {
    fn start(dir: &Path) -> Sshd {
        let keygen = |name: &str| {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name)))
            .ok();
        };
        keygen("host_key");
        keygen("user_key");
        fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        fs::set_permissions(
            dir.join("authorized_keys"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile none\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin no\nAllowUsers {USER}\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting sshd (openssh-server; tests/install-deps.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Sshd {
            child,
            port,
            key: dir.join("user_key"),
            log,
        }
    }

    /// `AMIDALA_SSH` for this sshd.
    fn ssh_command(&self) -> String {
        format!(
            "ssh -p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR",
            self.port,
            self.key.display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A builder reached through ssh: the daemon, sshd, the user, and the builder's client.
struct Builder {
    env: Env,
    sshd: Sshd,
    client: PathBuf,
    _accounts: Accounts,
    // Last: released once the rest is gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// The tests of this file share the user and the groups: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Builder {
    fn start() -> Builder {
        let serial = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let accounts = Accounts::create(&[(USER, "amidala")]);
        // useradd locks the new account ("!" for a password), and an sshd without PAM lets
        // no locked account in; "*" is no password, unlocked: the key is the only way in.
        run(Command::new("usermod").args(["-p", "*", USER])).ok();
        let env = Env::start();
        let client = env.dir.path().join("amidala");
        fs::copy(bin_dir().join("amidala"), &client).unwrap();
        fs::set_permissions(&client, fs::Permissions::from_mode(0o755)).unwrap();
        let sshd = Sshd::start(env.dir.path());
        Builder {
            env,
            sshd,
            client,
            _accounts: accounts,
            _serial: serial,
        }
    }

    /// The laptop's client, in `cwd`, with `--host` to the builder.
    fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_dir().join("amidala"));
        cmd.current_dir(cwd)
            .env_remove("AMIDALA_SOCKET")
            .env("AMIDALA_SSH", self.sshd.ssh_command())
            .env("AMIDALA_REMOTE_COMMAND", &self.client)
            .args(["--host", &format!("{USER}@127.0.0.1"), "--socket"])
            .arg(&self.env.socket)
            .args(args);
        cmd
    }

    fn run(&self, cwd: &Path, args: &[&str]) -> Run {
        let out = run(&mut self.command(cwd, args));
        if out.code != Some(0) {
            eprintln!(
                "sshd log:\n{}",
                fs::read_to_string(&self.sshd.log).unwrap_or_default()
            );
        }
        out
    }

    /// Asserts that the builder side left no scratch directory in /tmp.
    #[track_caller]
    fn assert_no_scratch_left(&self) {
        let left: Vec<PathBuf> = fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("amidala-remote-"))
                    && std::os::unix::fs::MetadataExt::uid(&fs::metadata(p).unwrap())
                        == uid_of(USER)
            })
            .collect();
        assert!(left.is_empty(), "left on the builder: {left:?}");
    }
}

#[test]
fn a_laptop_imports_and_builds_on_a_builder_through_ssh() {
    amidala_tests::require_root();
    let builder = Builder::start();
    let laptop = builder.env.dir.path().join("laptop");
    fs::create_dir(&laptop).unwrap();

    // A base from a directory on the laptop: sent as a tar archive, ownership kept.
    let rootfs = builder.env.busybox_rootfs("laptop/rootfs");
    let import = builder.run(
        &laptop,
        &[
            "base",
            "import",
            rootfs.to_str().unwrap(),
            "--tag",
            "amidala=base",
        ],
    );
    let base = import.ok().trim().to_owned();
    assert!(base.starts_with("snap-"), "{base}");

    // A workspace with a spec file and an executable script: modes travel too.
    let ws = laptop.join("ws");
    fs::create_dir(&ws).unwrap();
    fs::write(ws.join("input.txt"), "from the laptop\n").unwrap();
    fs::write(
        ws.join("run.sh"),
        "#!/bin/sh\nset -e\ncp /workspace/input.txt /root/copied.txt\necho remote-says-hello\n",
    )
    .unwrap();
    fs::set_permissions(ws.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    // A read-only tree keeps its mode on the builder, whose scratch copy is still removed.
    fs::create_dir(ws.join("vendored")).unwrap();
    fs::write(ws.join("vendored/lib.txt"), "kept as it is\n").unwrap();
    fs::set_permissions(ws.join("vendored"), fs::Permissions::from_mode(0o555)).unwrap();
    fs::write(
        ws.join("amidala.toml"),
        "name = \"remote-{build}\"\ncommand = [\"./run.sh\"]\n",
    )
    .unwrap();
    let validated = builder.run(&ws, &["validate"]);
    assert!(
        validated.ok().contains(&format!("→ {base}")),
        "{}",
        validated.stdout
    );
    let built = builder.run(&ws, &["build", "--json"]);
    let result = built.json();
    assert!(
        built.stderr.contains("remote-says-hello"),
        "{}",
        built.stderr
    );
    assert!(
        built.stderr.contains("MiB to the builder"),
        "{}",
        built.stderr
    );
    let build = field(&result, "build_id");

    // The build is the ssh user's: the builder's policy applies to who logged in.
    let status = builder.run(&laptop, &["status", "--json", build]).json();
    assert_eq!(status["owner_uid"], uid_of(USER));
    assert_eq!(status["source_snapshot"], base.as_str());
    let list = builder.run(&laptop, &["list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let image = Mounted::new(Path::new(field(&result, "snapshot_path")), 0);
    assert_eq!(image.read("root/copied.txt"), "from the laptop\n");
    drop(image);

    // Exit statuses come back: no such build is bad input.
    let missing = builder.run(&laptop, &["status", "bld-00000000000000000"]);
    assert_eq!(missing.code, Some(2), "{}", missing.stderr);
    builder.assert_no_scratch_left();
    builder.env.assert_no_leaks();
}

#[test]
fn ctrl_c_on_the_laptop_cancels_the_build_on_the_builder() {
    amidala_tests::require_root();
    let builder = Builder::start();
    builder.env.import_busybox();
    let ws = builder.env.workspace("ws", &[("input.txt", "x")]);
    let client = builder
        .command(
            &ws,
            &["build", "--", "/bin/sh", "-c", "echo started; sleep 60"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = builder.env.build_in_phase("provision");
    let (code, stderr) = amidala_tests::interrupt(client);
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("cancelling"), "{stderr}");
    let status = builder.env.amidala(&["status", "--json", &id]).json();
    assert_eq!(status["state"], "cancelled", "{status}");
    builder.assert_no_scratch_left();
    builder.env.assert_no_leaks();
}

#[test]
fn what_cannot_work_remotely_says_why() {
    amidala_tests::require_root();
    let builder = Builder::start();
    let ws = builder.env.workspace("ws", &[]);
    // No sshd there: unreachable, 3.
    let closed = run(builder.command(&ws, &["list"]).env(
        "AMIDALA_SSH",
        "ssh -p 1 -o BatchMode=yes -o ConnectTimeout=5",
    ));
    assert_eq!(closed.code, Some(3), "{}", closed.stderr);
    assert!(
        closed
            .stderr
            .contains("ssh to amidala-t-remote@127.0.0.1 failed"),
        "{}",
        closed.stderr
    );
    // No amidala on the builder: unreachable, 3, and what to set.
    let absent = run(builder
        .command(&ws, &["list"])
        .env("AMIDALA_REMOTE_COMMAND", "/nonexistent/amidala"));
    assert_eq!(absent.code, Some(3), "{}", absent.stderr);
    assert!(
        absent.stderr.contains("AMIDALA_REMOTE_COMMAND"),
        "{}",
        absent.stderr
    );
    // A detached build would lose its workspace; a spec file outside it is not sent.
    let detached = builder.run(&ws, &["build", "--detach", "--", "true"]);
    assert_eq!(detached.code, Some(2), "{}", detached.stderr);
    assert!(
        detached.stderr.contains("--detach with --host"),
        "{}",
        detached.stderr
    );
    // An export would write its file into the builder's scratch directory, then lose it.
    let export = builder.run(&ws, &["export", "snap-0123456789abcdef0", "-o", "disk.img"]);
    assert_eq!(export.code, Some(2), "{}", export.stderr);
    assert!(
        export.stderr.contains("export with --host"),
        "{}",
        export.stderr
    );
    assert!(!ws.join("disk.img").exists());
    // What cannot be sent (a socket in the workspace) fails the command here, at once, and
    // the builder, told the upload ended, leaves nothing.
    let sockets = builder.env.workspace("sockets", &[("file", "x")]);
    let _listener = std::os::unix::net::UnixListener::bind(sockets.join("a.sock")).unwrap();
    let unsendable = builder.run(&sockets, &["build", "--", "true"]);
    assert_eq!(unsendable.code, Some(1), "{}", unsendable.stderr);
    assert!(
        unsendable.stderr.contains("packing the current directory"),
        "{}",
        unsendable.stderr
    );
    builder.assert_no_scratch_left();
    let outside = builder.run(&ws, &["build", "--spec", "../amidala.toml"]);
    assert_eq!(outside.code, Some(2), "{}", outside.stderr);
    assert!(
        outside.stderr.contains("must be in the current directory"),
        "{}",
        outside.stderr
    );
    builder.env.assert_no_leaks();
}
