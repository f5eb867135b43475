//! Harness for amidala's end-to-end tests: the real `amidalad` and `amidala` binaries talking
//! over the real socket, with real loop devices, mounts and namespaces. Needs root; without
//! it the tests fail (they are never skipped).
//!
//! Each [`Env`] has a private directory holding the daemon's state, socket and plugins, so
//! tests run in parallel. Dropping an `Env` stops its daemon, and releases any loop device or
//! mount still pointing into the directory, so a failing test never leaves the host dirty.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The phases of a build that make or undo something, in order (cleanup follows).
pub const PHASES: [&str; 9] = [
    "resolve",
    "volume",
    "attach",
    "mount",
    "provision",
    "unmount",
    "detach",
    "snapshot",
    "register",
];

/// Where cargo put the binaries of this workspace, `target/<profile>`: the directory of the
/// running executable, or its parent for a test executable (which lives in `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

/// Fails (never skips) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (loop devices, mounts, namespaces); run them as root"
    );
}

/// The string `key` of a JSON object, or a panic naming what is missing.
#[track_caller]
pub fn field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// The first frame the daemon sends on `stream` before closing it (read for at most 20 s;
/// whatever arrived by then counts).
pub fn first_answer(
    stream: &mut std::os::unix::net::UnixStream,
) -> Option<amidala::proto::Response> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    let mut decoder = amidala::proto::FrameDecoder::new();
    decoder.push(&received);
    decoder
        .next_frame()
        .unwrap()
        .map(|body| amidala::proto::decode(&body).unwrap())
}

/// A finished command's output, as text.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "command should have failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stderr
    }

    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs a command and collects its output.
#[track_caller]
pub fn run(cmd: &mut Command) -> Run {
    Run::from(
        cmd.output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}")),
    )
}

/// One daemon with its own state directory, socket and plugin directory.
#[derive(Debug)]
pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub plugins: PathBuf,
    daemon: Option<Child>,
    /// A network namespace to run the daemon in, instead of the host's.
    netns: Option<PathBuf>,
    /// The daemon's extra environment, for restarts.
    vars: Vec<(String, String)>,
    /// A program (and its arguments) that starts the daemon, such as systemd-socket-activate.
    launcher: Vec<String>,
}

impl Env {
    /// Starts a daemon with the shell provisioner and the local provider.
    pub fn start() -> Env {
        Env::start_with("", &[])
    }

    /// Starts a daemon with the shell provisioner, `config` as its configuration file and
    /// `env` added to its environment.
    pub fn start_with(config: &str, vars: &[(&str, &str)]) -> Env {
        Env::start_full(config, vars, &[])
    }

    /// Like [`start_with`](Self::start_with), with more plugin files in the plugin directory:
    /// (library file name in the target directory, name to install it as, mode).
    pub fn start_full(
        config: &str,
        vars: &[(&str, &str)],
        extra_plugins: &[(&str, &str, u32)],
    ) -> Env {
        Env::try_start_in(None, config, vars, extra_plugins).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`start_full`](Self::start_full), with the environment's directory made under
    /// `parent` (default: the system's temporary directory), and the daemon's failure to start
    /// (its exit status and log) returned rather than panicked on.
    pub fn try_start_in(
        parent: Option<&Path>,
        config: &str,
        vars: &[(&str, &str)],
        extra_plugins: &[(&str, &str, u32)],
    ) -> Result<Env, String> {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("amidala-test-")
            .tempdir_in(parent.map_or_else(std::env::temp_dir, Path::to_owned))
            .expect("temporary directory");
        // The daemon checks that plugin directories are root-owned and not writable by others.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let plugins = dir.path().join("plugins");
        fs::create_dir(&plugins).unwrap();
        fs::set_permissions(&plugins, fs::Permissions::from_mode(0o755)).unwrap();
        let shell = bin_dir().join("libamidala_shell.so");
        assert!(
            shell.exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            shell.display()
        );
        fs::copy(&shell, plugins.join("libamidala_shell.so")).unwrap();
        fs::set_permissions(
            plugins.join("libamidala_shell.so"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        for (library, name, mode) in extra_plugins {
            let dest = plugins.join(name);
            fs::copy(bin_dir().join(library), &dest).unwrap();
            fs::set_permissions(&dest, fs::Permissions::from_mode(*mode)).unwrap();
        }
        let mut env = Env {
            state: dir.path().join("state"),
            socket: dir.path().join("amidala.sock"),
            plugins,
            dir,
            daemon: None,
            netns: None,
            vars: env_vars(vars),
            launcher: Vec::new(),
        };
        fs::write(env.dir.path().join("amidalad.toml"), config).unwrap();
        env.try_spawn_daemon(env.vars.clone())?;
        Ok(env)
    }

    /// Kills the daemon with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again (after [`kill9`](Self::kill9) or [`stop`](Self::stop)); its
    /// log goes on in the same file.
    pub fn restart(&mut self) {
        self.spawn_daemon(self.vars.clone());
    }

    /// Stops the daemon and starts it again through `launcher` (a program that runs the
    /// daemon's command line given after its own arguments), with `vars` added.
    pub fn restart_through(&mut self, launcher: &[&str], vars: &[(&str, &str)]) {
        self.stop();
        self.launcher = launcher.iter().map(|s| s.to_string()).collect();
        self.vars.extend(env_vars(vars));
        self.spawn_daemon(self.vars.clone());
    }

    /// Starts a daemon like [`start_with`](Self::start_with) `config`, in the network
    /// namespace `netns`.
    pub fn start_in(netns: &Netns, config: &str) -> Env {
        let mut env = Env::start_with(config, &[]);
        env.stop();
        env.netns = Some(netns.path.clone());
        env.spawn_daemon(env.vars.clone());
        env
    }

    fn spawn_daemon(&mut self, vars: Vec<(String, String)>) {
        self.try_spawn_daemon(vars)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the daemon and waits until it listens; if it exits first, or does not listen
    /// within 20 s, says so with its log.
    fn try_spawn_daemon(&mut self, vars: Vec<(String, String)>) -> Result<(), String> {
        let log_path = self.dir.path().join("daemon.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = match self.launcher.split_first() {
            None => Command::new(bin_dir().join("amidalad")),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin_dir().join("amidalad"));
                cmd
            }
        };
        if let Some(netns) = &self.netns {
            let ns = fs::File::open(netns).unwrap();
            // SAFETY: setns(2) is async-signal-safe; the descriptor is open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd
            .arg("--config")
            .arg(self.dir.path().join("amidalad.toml"))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--plugin-dir")
            .arg(&self.plugins)
            // Debug logs unless the caller's variables say otherwise (the benchmarks do).
            .env("RUST_LOG", "debug")
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting amidalad");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                return Err(format!(
                    "amidalad exited ({status}) at start:\n{}",
                    self.daemon_log()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "amidalad did not listen within 20s:\n{}",
                    self.daemon_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// A build's record as its journal holds it on disk: the last of its lines (one per
    /// change) that is complete.
    #[track_caller]
    pub fn build_record(&self, id: &str) -> serde_json::Value {
        let path = self.state.join("builds").join(format!("{id}.json"));
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let last = serde_json::Deserializer::from_str(&text)
            .into_iter::<serde_json::Value>()
            .map_while(Result::ok)
            .last();
        last.unwrap_or_else(|| panic!("no record in {}: {text:?}", path.display()))
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The client, run in `cwd`.
    pub fn amidala_in(&self, cwd: &Path, args: &[&str]) -> Run {
        run(Command::new(bin_dir().join("amidala"))
            .current_dir(cwd)
            .env("AMIDALA_SOCKET", &self.socket)
            .args(args))
    }

    /// The client, run in the test's directory.
    pub fn amidala(&self, args: &[&str]) -> Run {
        self.amidala_in(self.dir.path(), args)
    }

    /// A command for the client, to run in the background.
    pub fn amidala_command(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_dir().join("amidala"));
        cmd.current_dir(cwd)
            .env("AMIDALA_SOCKET", &self.socket)
            .args(args);
        cmd
    }

    /// The client started in the background in `cwd`, its output piped.
    pub fn spawn_client(&self, cwd: &Path, args: &[&str]) -> Child {
        self.amidala_command(cwd, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting amidala")
    }

    /// `amidala build --json -- /bin/sh -c SCRIPT` started in the background in `workspace`.
    pub fn spawn_build_sh(&self, workspace: &Path, script: &str) -> Child {
        self.spawn_client(
            workspace,
            &["build", "--json", "--", "/bin/sh", "-c", script],
        )
    }

    /// Imports a fresh busybox root filesystem as the base (tagged `amidala=base`), published
    /// (as root, an admin): every user's builds and the warm pool may start from it. Returns
    /// the snapshot id.
    #[track_caller]
    pub fn import_busybox(&self) -> String {
        self.import(&self.busybox_rootfs("rootfs"), &["--publish"])
    }

    /// A fresh busybox root filesystem tree in the test directory.
    pub fn busybox_rootfs(&self, name: &str) -> PathBuf {
        let dest = self.dir.path().join(name);
        run(Command::new(repo_dir().join("tests/make-busybox-rootfs.sh")).arg(&dest)).ok();
        dest
    }

    /// A workspace directory holding `files`.
    pub fn workspace(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        for (file, content) in files {
            fs::write(dir.join(file), content).unwrap();
        }
        dir
    }

    /// Imports `src` and returns the snapshot id.
    #[track_caller]
    pub fn import(&self, src: &Path, extra: &[&str]) -> String {
        let src = src.to_str().unwrap();
        let mut args = vec!["base", "import", src];
        args.extend_from_slice(extra);
        let run = self.amidala(&args);
        let id = run.ok().trim().to_owned();
        assert!(
            id.starts_with("snap-"),
            "unexpected import output {id:?}\n{}",
            run.stderr
        );
        id
    }

    /// Runs a build in `workspace` and returns its `--json` result.
    #[track_caller]
    pub fn build(&self, workspace: &Path, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["build", "--json"];
        all.extend_from_slice(args);
        self.amidala_in(workspace, &all).json()
    }

    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.state.join("snapshots").join(format!("{id}.img"))
    }

    /// The id of the first running build the daemon lists in phase `phase` (`provision`,
    /// ...), once there is one (within 60 s).
    #[track_caller]
    pub fn build_in_phase(&self, phase: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = self.amidala(&["list", "--json"]).json();
            if let Some(b) = list
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["phase"] == phase && b["state"] == "running")
            {
                return b["id"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no build is running in phase {phase}: {list}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "amidalad did not stop within 60s of SIGTERM:\n{}",
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything of this environment still held by the kernel or left in the state
    /// directory: loop devices, mounts (in any namespace), volumes, mount points, staging.
    pub fn leaks(&self) -> Vec<String> {
        let root = self.dir.path().to_str().unwrap().to_owned();
        let mut leaks = Vec::new();
        for (device, backing) in loop_devices() {
            if backing.starts_with(&root) {
                leaks.push(format!("loop device {device} on {backing}"));
            }
        }
        for (pid, line) in mounts_mentioning(&root) {
            leaks.push(format!("mount seen by pid {pid}: {line}"));
        }
        for sub in ["volumes", "mnt", "tmp", "ec2-loop/volumes"] {
            for entry in fs::read_dir(self.state.join(sub)).into_iter().flatten() {
                leaks.push(format!(
                    "left in {sub}/: {}",
                    entry.unwrap().path().display()
                ));
            }
        }
        for id in build_cgroups() {
            if self
                .state
                .join("builds")
                .join(format!("{id}.json"))
                .exists()
            {
                leaks.push(format!("the cgroup of build {id}"));
            }
        }
        for entry in fs::read_dir(self.state.join("snapshots"))
            .into_iter()
            .flatten()
        {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                leaks.push(format!("partial snapshot file {name}"));
            }
        }
        leaks
    }

    /// Asserts [`leaks`](Self::leaks) is empty, waiting briefly for the kernel to finish
    /// releasing what a just-ended build let go of.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let leaks = self.leaks();
            if leaks.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "leaked:\n{}\ndaemon log:\n{}",
                leaks.join("\n"),
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        // Whatever happened, give the host back what this test took.
        let root = self.dir.path().to_str().unwrap().to_owned();
        for (_, line) in mounts_mentioning(&root) {
            if let Some(target) = line.split(' ').nth(4) {
                let _ = Command::new("umount").arg("-l").arg(target).status();
            }
        }
        for (device, backing) in loop_devices() {
            if backing.starts_with(&root) {
                let _ = Command::new("losetup").arg("-d").arg(&device).status();
            }
        }
        if !std::thread::panicking() {
            if let Err(e) = stopped {
                std::panic::resume_unwind(e);
            }
            self.assert_no_leaks();
        }
    }
}

fn env_vars(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Ids of the build cgroups under this process's own cgroup, where the daemons the tests
/// start make them.
pub fn build_cgroups() -> Vec<String> {
    static HIERARCHY: std::sync::OnceLock<Option<amidalad::cgroup::Hierarchy>> =
        std::sync::OnceLock::new();
    HIERARCHY
        .get_or_init(|| amidalad::cgroup::Hierarchy::discover().ok())
        .as_ref()
        .map(|h| h.build_ids().expect("listing build cgroups"))
        .unwrap_or_default()
}

/// A network namespace made for one test with `ip netns add`, its loopback up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        require_root();
        let name = format!("amidala-{tag}-{}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name])).ok();
        let ns = Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        run(Command::new("ip").args(["-n", &self.name]).args(args)).ok();
    }

    /// Answers every HTTP request to port 80 of `addrs`, in this namespace, with `body`, for
    /// as long as the test process lives.
    pub fn serve_http(&self, addrs: &[std::net::IpAddr], body: &'static str) {
        let ns = fs::File::open(&self.path).unwrap();
        let addrs = addrs.to_vec();
        let (ready, bound) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // A thread's network namespace is its own: this one moves, the test stays.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listeners: Vec<_> = addrs
                .iter()
                .map(|a| std::net::TcpListener::bind((*a, 80)).expect("binding port 80"))
                .collect();
            ready.send(()).unwrap();
            for listener in listeners {
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    for mut stream in listener.incoming().flatten() {
                        let mut request = [0u8; 1024];
                        let _ = stream.read(&mut request);
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                });
            }
        });
        bound.recv().expect("the server thread binds");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Attached loop devices and their backing files.
pub fn loop_devices() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) {
            out.push((format!("/dev/{name}"), backing.trim().to_owned()));
        }
    }
    out
}

/// Mount table lines, of any process's namespace, that mention `path`.
pub fn mounts_mentioning(path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(table) = fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        for line in table.lines() {
            if line.contains(path) && seen.insert(line.to_owned()) {
                out.push((pid.clone(), line.to_owned()));
            }
        }
    }
    out
}

/// A disk image mounted read-only for inspection; unmounted (and its loop device released)
/// on drop.
#[derive(Debug)]
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    #[track_caller]
    pub fn new(image: &Path, offset: u64) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("amidala-inspect-")
            .tempdir()
            .unwrap();
        run(Command::new("mount")
            .arg("-o")
            .arg(format!("loop,ro,offset={offset}"))
            .arg(image)
            .arg(dir.path()))
        .ok();
        Mounted { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    #[track_caller]
    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel))
            .unwrap_or_else(|e| panic!("reading {rel} in the image: {e}"))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).symlink_metadata().is_ok()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let device = run(Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--mountpoint"])
            .arg(self.dir.path()))
        .stdout
        .trim()
        .to_owned();
        // Busy for a moment if something (a concurrent test's scan) looks inside: retry.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        // The loop device mount made is released by the kernel after the unmount, a moment
        // later on recent kernels: detach it now and wait, so that no leak check sees it.
        let Some(name) = device.strip_prefix("/dev/") else {
            return;
        };
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(&device)
            .stderr(Stdio::null())
            .status();
        let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while backing.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The moto server venv (made by tests/install-deps.sh).
pub fn moto_venv() -> PathBuf {
    std::env::var_os("AMIDALA_MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/amidala-tests/moto-venv"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited at start ({status})");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 30s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The credentials the tests give the daemon and the SDK: moto accepts any.
pub const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A moto server (a real EC2 API emulator) on 127.0.0.1, behind tests/ec2_proxy.py, which adds
/// EC2's state delays, throttling and injected errors on request. One per test, so every test
/// starts from an empty account.
#[derive(Debug)]
pub struct Ec2Emulator {
    moto: Child,
    proxy: Child,
    pub endpoint: String,
    pub runtime: tokio::runtime::Runtime,
    pub instance_id: String,
}

pub const REGION: &str = "us-east-1";
pub const ZONE: &str = "us-east-1a";

impl Ec2Emulator {
    pub fn start() -> Ec2Emulator {
        let venv = moto_venv();
        let moto_bin = venv.join("bin/moto_server");
        assert!(
            moto_bin.exists(),
            "{} is missing: run tests/install-deps.sh",
            moto_bin.display()
        );
        let (moto_port, proxy_port) = (free_port(), free_port());
        let mut moto = Command::new(&moto_bin)
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .env("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        wait_for_port(moto_port, &mut moto, "moto_server");
        let mut proxy = Command::new(venv.join("bin/python"))
            .arg(repo_dir().join("tests/ec2_proxy.py"))
            .arg(proxy_port.to_string())
            .arg(format!("http://127.0.0.1:{moto_port}"))
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the EC2 proxy");
        wait_for_port(proxy_port, &mut proxy, "ec2_proxy.py");
        let mut emulator = Ec2Emulator {
            moto,
            proxy,
            endpoint: format!("http://127.0.0.1:{proxy_port}"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            instance_id: String::new(),
        };
        // The builder instance that the daemon attaches volumes to.
        emulator.instance_id = emulator.launch_builder();
        emulator
    }

    /// Starts a builder instance in [`ZONE`]; returns its id.
    pub fn launch_builder(&self) -> String {
        let run = self
            .runtime
            .block_on(
                self.client(REGION)
                    .run_instances()
                    .image_id("ami-12345678")
                    .min_count(1)
                    .max_count(1)
                    .placement(
                        aws_sdk_ec2::types::Placement::builder()
                            .availability_zone(ZONE)
                            .build(),
                    )
                    .send(),
            )
            .expect("RunInstances");
        run.instances()[0].instance_id().unwrap().to_owned()
    }

    /// An SDK client for `region`, through the proxy.
    pub fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// The daemon configuration for this emulator, with `extra` appended to the [ec2] section.
    pub fn daemon_config(&self, data_plane: &str, extra: &str) -> String {
        format!(
            "provider = \"ec2\"\n[ec2]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\ninstance_id = \"{}\"\navailability_zone = \"{ZONE}\"\ndata_plane = \"{data_plane}\"\n{extra}\n",
            self.endpoint, self.instance_id
        )
    }

    fn control(&self, method: &str, path: &str, body: &str) -> String {
        use std::io::{Read, Write};
        let port: u16 = self.endpoint.rsplit(':').next().unwrap().parse().unwrap();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(stream, "{method} {path} HTTP/1.1\r\nHost: proxy\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default()
    }

    /// Sets emulation knobs; see tests/ec2_proxy.py.
    pub fn configure(&self, config: serde_json::Value) {
        self.control("POST", "/_proxy/config", &config.to_string());
    }

    /// Calls of each EC2 action so far.
    pub fn calls(&self, action: &str) -> u64 {
        self.stats()["calls"][action].as_u64().unwrap_or(0)
    }

    /// The proxy's counters: `calls` {Action: count}, `latency_secs` {Action: seconds of
    /// latency injected}.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.control("GET", "/_proxy/stats", "")).unwrap()
    }

    /// Calls of all EC2 actions so far.
    pub fn total_calls(&self) -> u64 {
        let stats: serde_json::Value =
            serde_json::from_str(&self.control("GET", "/_proxy/stats", "")).unwrap();
        stats["calls"]
            .as_object()
            .map_or(0, |calls| calls.values().filter_map(|v| v.as_u64()).sum())
    }

    /// Volumes that carry amidala's tags, with their states.
    pub fn amidala_volumes(&self) -> Vec<(String, String)> {
        let out = self
            .runtime
            .block_on(self.client(REGION).describe_volumes().send())
            .unwrap();
        out.volumes()
            .iter()
            .filter(|v| {
                v.tags()
                    .iter()
                    .any(|t| t.key().is_some_and(|k| k.starts_with("amidala:")))
            })
            .map(|v| {
                (
                    v.volume_id().unwrap().to_owned(),
                    v.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The device names the builder instance maps.
    pub fn instance_mappings(&self) -> Vec<String> {
        let out = self
            .runtime
            .block_on(
                self.client(REGION)
                    .describe_instances()
                    .instance_ids(&self.instance_id)
                    .send(),
            )
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.device_name().map(str::to_owned))
            .collect()
    }

    /// The actions of the EC2 calls the proxy received so far, in their order.
    pub fn order(&self) -> Vec<String> {
        self.stats()["order"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Instances that boot tests started (tagged `amidala:role = boot-test`), whatever their
    /// state.
    pub fn boot_instances(&self) -> Vec<aws_sdk_ec2::types::Instance> {
        let out = self
            .runtime
            .block_on(
                self.client(REGION)
                    .describe_instances()
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("tag:amidala:role")
                            .values("boot-test")
                            .build(),
                    )
                    .send(),
            )
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .cloned()
            .collect()
    }

    /// The boot tests' instances of build `build`.
    pub fn boot_instances_of(&self, build: &str) -> Vec<aws_sdk_ec2::types::Instance> {
        self.boot_instances()
            .into_iter()
            .filter(|i| {
                i.tags()
                    .iter()
                    .any(|t| t.key() == Some("amidala:build") && t.value() == Some(build))
            })
            .collect()
    }

    /// Waits (up to `secs`) for a boot test's instance of `build` to be running; returns its id.
    #[track_caller]
    pub fn running_boot_instance(&self, build: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(i) = self.boot_instances_of(build).iter().find(|i| {
                i.state().and_then(|s| s.name())
                    == Some(&aws_sdk_ec2::types::InstanceStateName::Running)
            }) {
                return i.instance_id().unwrap().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no running boot-test instance of {build}: {:?}",
                self.boot_instances_of(build)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The state of instance `id`.
    pub fn instance_state(&self, id: &str) -> String {
        let out = self
            .runtime
            .block_on(
                self.client(REGION)
                    .describe_instances()
                    .instance_ids(id)
                    .send(),
            )
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
            })
            .unwrap_or_default()
    }

    /// Images of build `build` (registered, not deregistered).
    pub fn images_of(&self, build: &str) -> Vec<String> {
        let out = self
            .runtime
            .block_on(
                self.client(REGION)
                    .describe_images()
                    .owners("self")
                    .filters(
                        aws_sdk_ec2::types::Filter::builder()
                            .name("tag:amidala:build")
                            .values(build)
                            .build(),
                    )
                    .send(),
            )
            .unwrap();
        out.images()
            .iter()
            .filter_map(|i| i.image_id().map(str::to_owned))
            .collect()
    }

    /// Asserts the EC2 side holds nothing of a build: no amidala volume, no attachment, no
    /// boot test's instance that is not terminated.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        let instances: Vec<(String, String)> = self
            .boot_instances()
            .iter()
            .filter_map(|i| {
                let state = i.state().and_then(|s| s.name())?.as_str().to_owned();
                (state != "terminated").then(|| (i.instance_id().unwrap().to_owned(), state))
            })
            .collect();
        assert_eq!(instances, vec![], "boot-test instances left");
        assert_eq!(self.amidala_volumes(), vec![], "volumes left");
        assert_eq!(
            self.instance_mappings(),
            vec!["/dev/sda1".to_owned()],
            "attachments left"
        );
    }

    /// A completed snapshot made outside amidala (a volume, snapshotted, deleted), with `tags`.
    pub fn make_snapshot(&self, tags: &[(&str, &str)]) -> String {
        use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
        let client = self.client(REGION);
        let volume = self
            .runtime
            .block_on(
                client
                    .create_volume()
                    .availability_zone(ZONE)
                    .size(1)
                    .send(),
            )
            .unwrap();
        let volume_id = volume.volume_id().unwrap();
        let mut call = client.create_snapshot().volume_id(volume_id);
        if !tags.is_empty() {
            let mut spec = TagSpecification::builder().resource_type(ResourceType::Snapshot);
            for (k, v) in tags {
                spec = spec.tags(Tag::builder().key(*k).value(*v).build());
            }
            call = call.tag_specifications(spec.build());
        }
        let snapshot = self.runtime.block_on(call.send()).unwrap();
        self.runtime
            .block_on(client.delete_volume().volume_id(volume_id).send())
            .unwrap();
        snapshot.snapshot_id().unwrap().to_owned()
    }

    /// Tags of a snapshot.
    pub fn snapshot_tags(&self, id: &str) -> std::collections::BTreeMap<String, String> {
        let out = self
            .runtime
            .block_on(
                self.client(REGION)
                    .describe_snapshots()
                    .snapshot_ids(id)
                    .send(),
            )
            .unwrap();
        out.snapshots()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect()
    }
}

impl Drop for Ec2Emulator {
    fn drop(&mut self) {
        for child in [&mut self.proxy, &mut self.moto] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Debian root filesystem with ansible-core (made by tests/install-deps.sh).
pub fn debian_rootfs() -> PathBuf {
    let path = std::env::var_os("AMIDALA_DEBIAN_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/amidala-tests/debian-bookworm-ansible"));
    assert!(
        path.join("usr/bin/ansible-playbook").exists(),
        "{} has no ansible-playbook: run tests/install-deps.sh",
        path.display()
    );
    path
}

/// The bootable Debian root filesystem (cloud kernel, systemd, udev) of the boot tests, made
/// by tests/install-deps.sh with tests/make-debian-boot-rootfs.sh.
pub fn debian_boot_rootfs() -> PathBuf {
    let path = std::env::var_os("AMIDALA_DEBIAN_BOOT_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/amidala-tests/debian-bookworm-boot"));
    assert!(
        path.join("boot").read_dir().is_ok_and(|mut d| d.any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("vmlinuz-"))),
        "{} has no kernel: run tests/install-deps.sh",
        path.display()
    );
    path
}

/// The arm64 tree that boots (tests/make-arm64-boot-tree.sh, made by tests/install-deps.sh):
/// `$AMIDALA_ARM64_BOOT_TREE`, by default under /var/cache/amidala-tests.
pub fn arm64_boot_tree() -> PathBuf {
    let path = std::env::var_os("AMIDALA_ARM64_BOOT_TREE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/amidala-tests/arm64-boot"));
    assert!(
        path.join("bin/busybox").is_file(),
        "{} has no arm64 tree: run tests/install-deps.sh",
        path.display()
    );
    path
}

/// QEMU processes running on this host (pid and command line).
pub fn qemu_processes() -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with("qemu-system") {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Presses Ctrl-C on a client (SIGINT) and waits for it to end: its exit status and stderr.
pub fn interrupt(client: Child) -> (Option<i32>, String) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = client.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The uid of `user`.
pub fn uid_of(user: &str) -> u32 {
    run(Command::new("id").args(["-u", user]))
        .ok()
        .trim()
        .parse()
        .unwrap()
}

/// `tests/escape-probe.c`, compiled statically (once per test process), for builds to run.
pub fn escape_probe() -> PathBuf {
    static PROBE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let out = bin_dir().join("escape-probe");
            let tmp = bin_dir().join(format!("escape-probe.{}", std::process::id()));
            run(Command::new("gcc")
                .args(["-static", "-O2", "-Wall", "-o"])
                .arg(&tmp)
                .arg(repo_dir().join("tests/escape-probe.c")))
            .ok();
            fs::rename(&tmp, &out).unwrap();
            out
        })
        .clone()
}

/// `program` run as `user`, with that user's groups (`setpriv`).
pub fn as_user(user: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .arg(program);
    cmd
}

/// Groups `amidala` and `amidala-admin` (when missing) and users made for a test, removed
/// again when it ends, whatever happened.
#[derive(Debug)]
pub struct Accounts {
    users: Vec<&'static str>,
}

/// The accounts of the tests of this process: how many [`Accounts`] are alive, and the groups
/// the first of them made (removed by the last). Tests of one binary run in parallel threads,
/// and the shadow tools lock /etc/passwd and /etc/group: one change at a time.
static ACCOUNTS: std::sync::Mutex<(usize, Vec<&'static str>)> =
    std::sync::Mutex::new((0, Vec::new()));

impl Accounts {
    /// Makes each user (no home, shell /bin/sh) with its supplementary groups (`a,b`, or "").
    pub fn create(users: &[(&'static str, &str)]) -> Accounts {
        let mut shared = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        if shared.0 == 0 {
            for group in ["amidala", "amidala-admin"] {
                let exists = Command::new("getent")
                    .args(["group", group])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success();
                if !exists {
                    run(Command::new("groupadd").arg(group)).ok();
                    shared.1.push(group);
                }
            }
        }
        shared.0 += 1;
        let mut accounts = Accounts { users: vec![] };
        for (user, groups) in users {
            let _ = Command::new("userdel")
                .arg(user)
                .stderr(Stdio::null())
                .status();
            let mut add = Command::new("useradd");
            add.args(["-M", "-U", "-s", "/bin/sh"]);
            if !groups.is_empty() {
                add.args(["-G", groups]);
            }
            run(add.arg(user)).ok();
            accounts.users.push(user);
        }
        accounts
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        let mut shared = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).status();
        }
        shared.0 -= 1;
        if shared.0 == 0 {
            for group in std::mem::take(&mut shared.1) {
                let _ = Command::new("groupdel").arg(group).status();
            }
        }
    }
}

/// Writes the partition table `layout` (sfdisk's script) on `disk`.
#[track_caller]
pub fn sfdisk(disk: &Path, layout: &str) {
    use std::io::Write;
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(layout.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
}

/// A GPT disk whose image mounts partitions at /boot and /boot/efi: 1 BIOS boot, 2 `/boot`
/// (ext4, label `BOOT`, holding `vmlinuz-old` and `efi/`), 3 the ESP (FAT16, serial
/// `0BAD-CAFE`, label `ESP`, holding `EFI/BOOT/BOOTX64.EFI`), 4 the root (ext4), whose fstab
/// names them by label and UUID and whose own `/boot` holds `under-the-mount`.
#[derive(Debug)]
pub struct BootDisk {
    pub disk: PathBuf,
    pub boot_at: u64,
    pub esp_at: u64,
    pub root_at: u64,
}

impl BootDisk {
    /// Makes it in `dir` from the tree `rootfs` (changed: its fstab and /boot).
    pub fn make(dir: &Path, rootfs: &Path) -> BootDisk {
        fs::write(
            rootfs.join("etc/fstab"),
            "LABEL=BOOT /boot ext4 defaults 0 2\nUUID=0bad-cafe /boot/efi vfat umask=0077 0 1\n",
        )
        .unwrap();
        fs::create_dir_all(rootfs.join("boot")).unwrap();
        fs::write(rootfs.join("boot/under-the-mount"), "root's /boot\n").unwrap();
        let boot_tree = dir.join("boot-tree");
        fs::create_dir_all(boot_tree.join("efi")).unwrap();
        fs::write(boot_tree.join("vmlinuz-old"), "old kernel\n").unwrap();
        let (root_img, boot_img) = (dir.join("root.img"), dir.join("boot.img"));
        for (img, size, tree, label) in [
            (&root_img, "80M", &rootfs.to_path_buf(), "ROOT"),
            (&boot_img, "16M", &boot_tree, "BOOT"),
        ] {
            run(Command::new("truncate").arg("-s").arg(size).arg(img)).ok();
            run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
                .arg(tree)
                .arg(img))
            .ok();
        }
        // 1: BIOS boot, 2: /boot (ext4), 3: the ESP (FAT16), 4: the root.
        let (boot_at, esp_at, root_at) = (2u64 << 20, 18u64 << 20, 34u64 << 20);
        let disk = dir.join("disk.img");
        run(Command::new("truncate").arg("-s").arg("116M").arg(&disk)).ok();
        let layout = "label: gpt\n\
            start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n\
            start=4096, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
            start=36864, size=32768, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
            start=69632, size=163840, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n";
        sfdisk(&disk, layout);
        for (img, at) in [(&boot_img, boot_at), (&root_img, root_at)] {
            run(Command::new("dd")
                .arg(format!("if={}", img.display()))
                .arg(format!("of={}", disk.display()))
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={}", at >> 20)))
            .ok();
        }
        let esp = |image: &Path| format!("{}@@{esp_at}", image.display());
        let mtools = |args: &[&str]| {
            run(Command::new(args[0]).args(&args[1..])).ok();
        };
        mtools(&[
            "mformat",
            "-i",
            &esp(&disk),
            "-T",
            "32768",
            "-H",
            "36864",
            "-N",
            "0BADCAFE",
            "-v",
            "ESP",
            "::",
        ]);
        mtools(&["mmd", "-i", &esp(&disk), "::/EFI", "::/EFI/BOOT"]);
        let loader = dir.join("BOOTX64.EFI");
        fs::write(&loader, "the loader\n").unwrap();
        mtools(&[
            "mcopy",
            "-i",
            &esp(&disk),
            loader.to_str().unwrap(),
            "::/EFI/BOOT/BOOTX64.EFI",
        ]);
        BootDisk {
            disk,
            boot_at,
            esp_at,
            root_at,
        }
    }
}
