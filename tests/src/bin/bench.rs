//! `amidala-bench`: amidala's benchmarks (issue 7), run by `tests/bench.sh`. Real components
//! only: the real daemon and client binaries of this build, real loop devices and mounts, a
//! real moto server. Needs root.
//!
//! Sections (all by default; `--only`/`--skip` choose):
//!
//! 1. `local`: a no-op build (`amidala build -- true`) from a 1 GiB and a 16 GiB base holding
//!    the same data, on the default filesystem of the state directory and on XFS (reflink=1)
//!    made on a loop device, against `tests/bench-script.sh` doing the same steps by hand;
//! 2. `ec2`: a no-op build against moto with EC2's state delays emulated: wall time, the
//!    emulated delays, amidala's overhead (the difference) and the EC2 calls it made;
//! 3. `concurrent`: eight no-op builds at once against one (and the script, eight at once
//!    against one);
//! 4. `first-output`: from starting `amidala build` to the provisioner's first line of output,
//!    local and ec2, cold and with a warm pool;
//! 5. `daemon`: the daemon's idle RSS and the round trip of a status request;
//! 6. `isolation`: what showing the workspace with its user's rights costs (a no-op build by a
//!    member, whose workspace is idmapped and, read-write, scrubbed afterwards, against one by
//!    root, whose workspace is shown as it is, the way every workspace was before), with a
//!    10 MiB and a 1 GiB workspace; and what the provisioner's seccomp filter costs a build
//!    that runs 10 000 short processes;
//! 7. `boot`: `base import` of the bootable Debian tree against `mkfs.ext4 -d` of the same
//!    tree alone; the boot test, legacy BIOS and UEFI, from QEMU's start to the boot signal
//!    (the login prompt), against QEMU alone booting the same disk as root, unsandboxed, to
//!    the same prompt, with the accelerator named; and a whole build with `--boot-test`
//!    against the same build without it. Boots are slow under TCG: at most 3 runs.
//!
//! Prints medians of `--runs` runs (default 5), where the time of a build goes (its phases, as
//! the client sees them arrive), and a table of the results against their targets. It is a
//! measurement: it exits 0 whether targets are met or not, 1 if something broke.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amidala::proto::{Request, Response};
use amidala_tests::{repo_dir, run, Ec2Emulator, Env, AWS_ENV};
use serde_json::json;

/// The daemon's log level in the benchmarks: what a deployed daemon would log.
const DAEMON_VARS: [(&str, &str); 1] = [("RUST_LOG", "info")];

const SECTIONS: [(&str, &str); 7] = [
    (
        "local",
        "1. local no-op build vs a shell script; 1G and 16G bases; default fs and XFS",
    ),
    (
        "ec2",
        "2. ec2 no-op build against moto with emulated delays: overhead and calls",
    ),
    ("concurrent", "3. eight concurrent no-op builds against one"),
    (
        "first-output",
        "4. time to the provisioner's first output, cold and with a warm pool",
    ),
    (
        "daemon",
        "5. the daemon's idle RSS and the round trip of a status request",
    ),
    (
        "isolation",
        "6. the workspace with its user's rights, and the seccomp filter: their cost",
    ),
    (
        "boot",
        "7. bootable import, boot test (BIOS, UEFI) and a build with it: their cost",
    ),
];

const USAGE: &str =
    "usage: amidala-bench [--runs N] [--requests N] [--only SECTION,...] [--skip SECTION,...]

  --runs N          runs of each measurement; medians are printed (default 5)
  --requests N      status requests for the round-trip percentiles (default 2000)
  --only LIST       run only these sections (comma-separated)
  --skip LIST       run all sections but these

sections:";

#[derive(Debug)]
struct Opts {
    runs: usize,
    requests: usize,
    sections: Vec<&'static str>,
}

fn section_names(list: &str) -> Result<Vec<&'static str>, String> {
    list.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            SECTIONS
                .iter()
                .map(|(name, _)| *name)
                .find(|name| *name == s)
                .ok_or_else(|| format!("unknown section {s:?}"))
        })
        .collect()
}

fn parse_args() -> Result<Opts, String> {
    let mut opts = Opts {
        runs: 5,
        requests: 2000,
        sections: SECTIONS.iter().map(|(name, _)| *name).collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--runs" => {
                opts.runs = value("--runs")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?;
                if opts.runs == 0 {
                    return Err("--runs must be at least 1".into());
                }
            }
            "--requests" => {
                opts.requests = value("--requests")?
                    .parse()
                    .map_err(|e| format!("--requests: {e}"))?;
                if opts.requests < 100 {
                    return Err("--requests must be at least 100".into());
                }
            }
            "--only" => opts.sections = section_names(&value("--only")?)?,
            "--skip" => {
                let skip = section_names(&value("--skip")?)?;
                opts.sections.retain(|s| !skip.contains(s));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                for (name, what) in SECTIONS {
                    println!("  {name:<14}{what}");
                }
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// Interruption: Ctrl-C or SIGTERM stops the bench at the next run, unwinding through the
// guards so that every daemon, mount and loop device is released.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; handlers
        // are reset to the default in the children we exec.
        unsafe { sigaction(signal, &action) }.expect("installing a signal handler");
    }
}

/// Unwinds (through the guards) if the bench was asked to stop.
fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted");
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Met,
    NotMet,
    /// A measurement without a target of its own.
    Info,
    /// Could not be measured (the reason is the value).
    NotAvailable,
    /// The section broke before measuring it.
    Broke,
}

impl Verdict {
    fn of(met: bool) -> Verdict {
        if met {
            Verdict::Met
        } else {
            Verdict::NotMet
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::Info => "",
            Verdict::NotAvailable => "n/a",
            Verdict::Broke => "BROKE",
        }
    }
}

#[derive(Debug)]
struct Row {
    section: &'static str,
    what: String,
    value: String,
    target: String,
    verdict: Verdict,
}

#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
    /// Phase breakdowns: (configuration, segment → seconds of each run).
    phases: Vec<(String, Phases)>,
    /// Details printed under the table.
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        let row = Row {
            section,
            what: what.into(),
            value: value.into(),
            target: target.into(),
            verdict,
        };
        eprintln!(
            "bench: [{}] {}: {} {}",
            row.section,
            row.what,
            row.value,
            row.verdict.text()
        );
        self.rows.push(row);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    assert!(n > 0, "the median of nothing");
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0 < p ≤ 100) by the nearest-rank method.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(s: f64) -> String {
    format!("{s:.3} s")
}

fn ms(s: f64) -> String {
    format!("{:.3} ms", s * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Timing builds.

/// Segments of a build's wall time, in order of first appearance, each with its durations.
#[derive(Debug, Default)]
struct Phases(Vec<(String, Vec<f64>)>);

impl Phases {
    fn add(&mut self, build: &TimedBuild) {
        for (name, d) in build.segments() {
            match self.0.iter_mut().find(|(n, _)| *n == name) {
                Some((_, all)) => all.push(d),
                None => self.0.push((name, vec![d])),
            }
        }
    }
}

/// One `amidala build`, timed from the client's start to its exit, with the moment each
/// phase announcement (and a marker line of output) reached the client.
#[derive(Debug)]
struct TimedBuild {
    wall: f64,
    /// (event, seconds since the client started): "accepted" and the phases.
    marks: Vec<(String, f64)>,
    /// When the marker line arrived, if asked for and seen.
    marker: Option<f64>,
}

impl TimedBuild {
    /// The wall time cut at each mark: "client to accepted" (the client's start, connect,
    /// hello, the daemon's checks), "accepted to resolve", then each phase until the next
    /// (the last one, cleanup, until the client has the result and exits).
    fn segments(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        let mut prev = ("client start to accepted".to_owned(), 0.0);
        for (name, at) in &self.marks {
            let label = if prev.0 == "accepted" {
                "accepted to first phase".to_owned()
            } else {
                prev.0.clone()
            };
            out.push((label, at - prev.1));
            prev = (name.clone(), *at);
        }
        out.push((prev.0, self.wall - prev.1));
        out
    }
}

/// Starts `amidala build --json ARGS` in `cwd`; returns the child and its start time.
fn start_build(env: &Env, cwd: &Path, args: &[&str]) -> (std::process::Child, Instant) {
    let mut all = vec!["build", "--json"];
    all.extend_from_slice(args);
    let start = Instant::now();
    let child = env
        .amidala_command(cwd, &all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting amidala build");
    (child, start)
}

/// Follows a started build to its end; says why if it failed.
fn finish_build(
    mut child: std::process::Child,
    start: Instant,
    marker: Option<&str>,
) -> Result<TimedBuild, String> {
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let mut marks = Vec::new();
    let mut seen = None;
    let mut stderr = String::new();
    // The client prints phases ("==> PHASE") and the provisioner's output on stderr, a line at
    // a time, as the daemon streams them.
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let at = start.elapsed().as_secs_f64();
        let Ok(line) = line else { break };
        if let Some(phase) = line.strip_prefix("==> ") {
            marks.push((phase.to_owned(), at));
        } else if line.starts_with("amidala: build ") && line.ends_with(" accepted") {
            marks.push(("accepted".to_owned(), at));
        }
        if seen.is_none() && marker == Some(line.as_str()) {
            seen = Some(at);
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().expect("waiting for amidala build");
    let wall = start.elapsed().as_secs_f64();
    let stdout = reader.join().expect("the stdout reader");
    if !status.success() {
        return Err(format!(
            "amidala build failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ));
    }
    Ok(TimedBuild {
        wall,
        marks,
        marker: seen,
    })
}

/// Panics with `error` and the end of the daemon's log.
fn build_failed(env: &Env, error: &str) -> ! {
    let log = env.daemon_log();
    let lines: Vec<&str> = log.lines().collect();
    panic!(
        "{error}\nthe daemon's log, last lines:\n{}",
        lines[lines.len().saturating_sub(40)..].join("\n")
    );
}

fn timed_build(env: &Env, cwd: &Path, args: &[&str]) -> TimedBuild {
    let (child, start) = start_build(env, cwd, args);
    finish_build(child, start, None).unwrap_or_else(|e| build_failed(env, &e))
}

/// Starts a daemon (info logs) with its directory under `parent`; panics with its log if it
/// does not start.
fn start_env(parent: Option<&Path>, config: &str, vars: &[(&str, &str)]) -> Env {
    Env::try_start_in(parent, config, vars, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn local_env(parent: Option<&Path>, config: &str) -> Env {
    start_env(parent, config, &DAEMON_VARS)
}

/// The raw disk image of each snapshot, from `amidala snapshots --json`.
fn snapshot_path(env: &Env, id: &str) -> PathBuf {
    let all = env.amidala(&["snapshots", "--json"]).json();
    let snapshot = all
        .as_array()
        .expect("a list of snapshots")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("snapshot {id} is not listed: {all}"));
    PathBuf::from(
        snapshot["path"]
            .as_str()
            .unwrap_or_else(|| panic!("snapshot {id} has no path: {snapshot}")),
    )
}

/// The type and source of the filesystem holding `path`.
fn fs_of(path: &Path) -> (String, String) {
    let out = run(Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,SOURCE", "--target"])
        .arg(path));
    let text = out.ok().trim().to_owned();
    let mut parts = text.split_whitespace();
    (
        parts.next().unwrap_or("?").to_owned(),
        parts.next().unwrap_or("?").to_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// XFS on a loop device.

/// An XFS filesystem (reflink=1) made on a loop device over a sparse file in the system's
/// temporary directory and mounted; unmounted, detached and deleted on drop, whatever
/// happened.
#[derive(Debug)]
struct XfsMount {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl XfsMount {
    fn new(size: u64) -> XfsMount {
        let dir = tempfile::Builder::new()
            .prefix("amidala-bench-xfs-")
            .tempdir()
            .expect("a temporary directory");
        let mut xfs = XfsMount {
            mnt: dir.path().join("mnt"),
            dir,
            device: None,
            mounted: false,
        };
        let image = xfs.dir.path().join("xfs.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("making the XFS backing file");
        let device = run(Command::new("losetup").arg("-f").arg("--show").arg(&image))
            .ok()
            .trim()
            .to_owned();
        xfs.device = Some(device.clone());
        run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1", &device])).ok();
        fs::create_dir(&xfs.mnt).unwrap();
        run(Command::new("mount").arg(&device).arg(&xfs.mnt)).ok();
        xfs.mounted = true;
        // The daemon wants the directories above its plugins not writable by others.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&xfs.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        xfs
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted {
            let mut unmounted = false;
            for _ in 0..25 {
                let status = Command::new("umount").arg(&self.mnt).status();
                if status.is_ok_and(|s| s.success()) {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !unmounted {
                eprintln!("bench: {} is busy; detaching it lazily", self.mnt.display());
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(device) = &self.device {
            let _ = Command::new("losetup").arg("-d").arg(device).status();
        }
        // The directory (and the backing file) go with `self.dir`.
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Local no-op builds against the script.

/// Runs tests/bench-script.sh once; returns its wall time and deletes what it made.
fn script_run(snapshot: &Path, work: &Path, sync: bool) -> f64 {
    script_runs(snapshot, &[work.to_owned()], sync)
}

/// Runs tests/bench-script.sh once in each of `works` (directories), all at once; returns the
/// wall time until the last ends, and deletes what they made. Panics if one fails.
fn script_runs(snapshot: &Path, works: &[PathBuf], sync: bool) -> f64 {
    let outs: Vec<PathBuf> = works.iter().map(|w| w.join("snapshot-out.img")).collect();
    let start = Instant::now();
    let children: Vec<_> = works
        .iter()
        .zip(&outs)
        .map(|(work, out)| {
            let mut cmd = Command::new("bash");
            cmd.arg(repo_dir().join("tests/bench-script.sh"));
            if sync {
                cmd.arg("--sync");
            }
            cmd.arg(snapshot)
                .arg(work)
                .arg(out)
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            cmd.spawn().expect("starting tests/bench-script.sh")
        })
        .collect();
    let results: Vec<_> = children
        .into_iter()
        .map(|child| child.wait_with_output().expect("waiting for the script"))
        .collect();
    let wall = start.elapsed().as_secs_f64();
    for result in results {
        assert!(
            result.status.success(),
            "tests/bench-script.sh failed ({}): {}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        );
    }
    for out in outs {
        fs::remove_file(&out).expect("removing the script's snapshot");
    }
    wall
}

fn local_section(opts: &Opts, report: &mut Report) {
    const S: &str = "1";
    for on_xfs in [false, true] {
        check_interrupted();
        // Declared first, dropped last: the daemon stops before its filesystem goes.
        let xfs = on_xfs.then(|| XfsMount::new(64 << 30));
        let env = local_env(xfs.as_ref().map(|x| x.mnt.as_path()), "");
        let (fs_type, _) = fs_of(env.dir.path());
        let fs_label = if on_xfs {
            format!("{fs_type} (reflink=1, loop)")
        } else {
            fs_type.clone()
        };
        eprintln!(
            "bench: [1] state directory {} on {fs_label}",
            env.state.display()
        );
        let rootfs = env.busybox_rootfs("rootfs");
        let bases: Vec<(&str, String)> = ["1G", "16G"]
            .into_iter()
            .map(|size| {
                let tag = format!("bench={size}");
                (size, env.import(&rootfs, &["--size", size, "--tag", &tag]))
            })
            .collect();
        let ws = env.workspace("ws", &[]);
        let work = env.dir.path().join("script");
        fs::create_dir(&work).unwrap();
        let files: Vec<PathBuf> = bases
            .iter()
            .map(|(_, id)| snapshot_path(&env, id))
            .collect();
        // Warm-up, not counted: the first runs load what later ones find cached.
        for ((_, id), file) in bases.iter().zip(&files) {
            for _ in 0..2 {
                timed_build(&env, &ws, &["--source", id, "--", "true"]);
                script_run(file, &work, false);
            }
        }
        // Per base: amidala's, the script's and the script's with fsync wall times.
        let mut times = vec![(Vec::new(), Vec::new(), Vec::new()); bases.len()];
        let mut phases: Vec<Phases> = bases.iter().map(|_| Phases::default()).collect();
        for _ in 0..opts.runs {
            // Interleaved, bases and methods alike, so that drift on the host weighs on all.
            for (i, (id, file)) in bases.iter().map(|(_, id)| id).zip(&files).enumerate() {
                check_interrupted();
                let build = timed_build(&env, &ws, &["--source", id, "--", "true"]);
                phases[i].add(&build);
                times[i].0.push(build.wall);
                times[i].1.push(script_run(file, &work, false));
                times[i].2.push(script_run(file, &work, true));
            }
        }
        let mut medians = Vec::new();
        for (((size, _), (amidala, script, synced)), phases) in bases.iter().zip(&times).zip(phases)
        {
            let (a, s, y) = (median(amidala), median(script), median(synced));
            let ratio = a / s;
            report.row(
                S,
                format!("no-op build, {size} base, {fs_label}"),
                format!(
                    "amidala {}, script {} ({} with fsync), {ratio:.2}x",
                    secs(a),
                    secs(s),
                    secs(y)
                ),
                "<= 1.3x the script",
                Verdict::of(ratio <= 1.3),
            );
            report
                .phases
                .push((format!("local {size} {fs_type}"), phases));
            medians.push((a, s));
        }
        let (amidala, script) = (medians[1].0 / medians[0].0, medians[1].1 / medians[0].1);
        let value = format!("amidala {amidala:.2}x, script {script:.2}x");
        if on_xfs {
            report.row(
                S,
                format!("16G/1G base, {fs_label}"),
                value,
                "<= 1.1x on XFS",
                Verdict::of(amidala <= 1.1),
            );
        } else {
            report.row(
                S,
                format!("16G/1G base, {fs_label}"),
                value,
                "(target on XFS)",
                Verdict::Info,
            );
        }
        drop(env);
        drop(xfs);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. ec2 against moto.

/// EC2's state delays and call latencies, as the proxy emulates them in section 2.
const VOLUME_CREATING_SECS: f64 = 2.0;
const SNAPSHOT_PENDING_SECS: f64 = 3.0;
const LATENCY_SECS: f64 = 0.2;
/// Calls that start a change: each answers only after `LATENCY_SECS`.
const SLOW_ACTIONS: [&str; 6] = [
    "CreateVolume",
    "AttachVolume",
    "DetachVolume",
    "CreateSnapshot",
    "RegisterImage",
    "DeleteVolume",
];

fn counter(stats: &serde_json::Value, kind: &str, action: &str) -> f64 {
    stats[kind][action].as_f64().unwrap_or(0.0)
}

/// Sets the proxy's delays and latencies (they apply to what is made from now on: the base,
/// imported before, is complete).
fn emulate_ec2_delays(ec2: &Ec2Emulator) {
    let latency: serde_json::Map<String, serde_json::Value> = SLOW_ACTIONS
        .iter()
        .map(|a| (a.to_string(), json!(LATENCY_SECS)))
        .collect();
    ec2.configure(json!({
        "volume_creating_secs": VOLUME_CREATING_SECS,
        "snapshot_pending_secs": SNAPSHOT_PENDING_SECS,
        "latency": latency,
    }));
}

fn ec2_section(opts: &Opts, report: &mut Report) {
    const S: &str = "2";
    let ec2 = Ec2Emulator::start();
    let mut vars: Vec<(&str, &str)> = AWS_ENV.to_vec();
    vars.extend(DAEMON_VARS);
    let env = start_env(None, &ec2.daemon_config("loop", ""), &vars);
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);
    // Warm-up without delays: the daemon's SDK client, moto's first answers.
    timed_build(&env, &ws, &["--", "true"]);
    emulate_ec2_delays(&ec2);
    let (mut walls, mut delays, mut overheads, mut totals) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_action: Vec<std::collections::BTreeMap<String, u64>> = Vec::new();
    let mut phases = Phases::default();
    for _ in 0..opts.runs {
        check_interrupted();
        let before = ec2.stats();
        let build = timed_build(&env, &ws, &["--", "true"]);
        let after = ec2.stats();
        let mut calls = std::collections::BTreeMap::new();
        let mut latency = 0.0;
        for action in after["calls"].as_object().expect("calls").keys() {
            let n = counter(&after, "calls", action) - counter(&before, "calls", action);
            if n > 0.0 {
                calls.insert(action.clone(), n as u64);
            }
            latency +=
                counter(&after, "latency_secs", action) - counter(&before, "latency_secs", action);
        }
        let created = |action: &str| calls.get(action).copied().unwrap_or(0) as f64;
        let delay = VOLUME_CREATING_SECS * created("CreateVolume")
            + SNAPSHOT_PENDING_SECS * created("CreateSnapshot")
            + latency;
        walls.push(build.wall);
        delays.push(delay);
        overheads.push(build.wall - delay);
        totals.push(calls.values().sum::<u64>() as f64);
        per_action.push(calls);
        phases.add(&build);
    }
    report.phases.push(("ec2 (moto)".into(), phases));
    report.row(
        S,
        "ec2 no-op build, wall",
        secs(median(&walls)),
        "",
        Verdict::Info,
    );
    report.row(
        S,
        "ec2 emulated delays",
        secs(median(&delays)),
        "",
        Verdict::Info,
    );
    report.notes.push(format!(
        "2: emulated: volumes creating for {VOLUME_CREATING_SECS} s, snapshots pending for \
         {SNAPSHOT_PENDING_SECS} s, {LATENCY_SECS} s of latency on each call of {}",
        SLOW_ACTIONS.join(", ")
    ));
    let overhead = median(&overheads);
    report.row(
        S,
        "ec2 amidala overhead (wall - delays)",
        secs(overhead),
        "<= 1 s",
        Verdict::of(overhead <= 1.0),
    );
    let calls = per_action
        .iter()
        .map(|c| {
            c.iter()
                .map(|(a, n)| format!("{a} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect::<Vec<_>>();
    let same = calls.windows(2).all(|w| w[0] == w[1]);
    report.row(
        S,
        "ec2 calls per build",
        format!(
            "{}{}",
            median(&totals),
            if same { "" } else { " (median; runs differ)" },
        ),
        "",
        Verdict::Info,
    );
    for (i, c) in calls.iter().enumerate() {
        if i == 0 || !same {
            report
                .notes
                .push(format!("2: EC2 calls of build {}: {c}", i + 1));
        }
    }
    drop(env);
    ec2.assert_no_leaks();
}

// ---------------------------------------------------------------------------------------------
// 3. Eight concurrent builds against one.

fn concurrent_section(opts: &Opts, report: &mut Report) {
    const S: &str = "3";
    const N: usize = 8;
    // All builds are root's here: its share of the slots is all of them.
    let env = local_env(
        None,
        &format!("max_builds = {N}\n[limits]\nmax_running_builds_per_user = {N}\n"),
    );
    let rootfs = env.busybox_rootfs("rootfs");
    let base = env.import(&rootfs, &["--size", "1G"]);
    let ws = env.workspace("ws", &[]);
    timed_build(&env, &ws, &["--", "true"]);
    // The script by hand (with the fsyncs amidala does), alone and eight at once on the same
    // snapshot: how far the minimal steps themselves go on this machine.
    let snapshot = snapshot_path(&env, &base);
    let works: Vec<PathBuf> = (0..N)
        .map(|i| env.workspace(&format!("script-{i}"), &[]))
        .collect();
    let (mut script_one, mut script_many) = (Vec::new(), Vec::new());
    let (mut one, mut many) = (Vec::new(), Vec::new());
    // CPU time the whole host spent (all processes and the kernel) during the builds.
    let (mut cpu_one, mut cpu_many) = (0.0, 0.0);
    let mut phases = Phases::default();
    for _ in 0..opts.runs {
        check_interrupted();
        let busy = host_cpu_seconds();
        one.push(timed_build(&env, &ws, &["--", "true"]).wall);
        cpu_one += host_cpu_seconds() - busy;
        let busy = host_cpu_seconds();
        let (wall, builds) = builds_at_once(&env, &ws, &["--", "true"], N);
        builds.iter().for_each(|build| phases.add(build));
        many.push(wall);
        cpu_many += host_cpu_seconds() - busy;
    }
    // After amidala's runs, so that what the kernel does after a script (writeback, deferred
    // releases) is not counted in a build's CPU time.
    for _ in 0..opts.runs {
        check_interrupted();
        script_one.push(script_run(&snapshot, &works[0], true));
        script_many.push(script_runs(&snapshot, &works, true));
    }
    report
        .phases
        .push((format!("local 1G, {N} at once"), phases));
    let (a, b) = (median(&one), median(&many));
    report.row(
        S,
        format!("{N} concurrent no-op builds / 1 (max_builds = {N})"),
        format!("1: {}, {N}: {}, {:.2}x", secs(a), secs(b), b / a),
        "",
        Verdict::Info,
    );
    let (sa, sb) = (median(&script_one), median(&script_many));
    report.row(
        S,
        format!("the script by hand (with fsync), {N} at once / 1"),
        format!("1: {}, {N}: {}, {:.2}x", secs(sa), secs(sb), sb / sa),
        "",
        Verdict::Info,
    );
    // Whether the CPUs were the limit: a no-op build is nearly all CPU work (processes,
    // namespaces, mounts), so eight cannot take less than eight builds' CPU time over the
    // machine's CPUs.
    let runs = opts.runs as f64;
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (per_build, per_build_many) = (cpu_one / runs, cpu_many / runs / N as f64);
    let busy_share = cpu_many / (many.iter().sum::<f64>() * nproc);
    report.row(
        S,
        format!("host CPU per no-op build, alone / {N} at once"),
        format!(
            "{} / {}; CPUs {:.0}% busy during the {N}; CPU floor for {N} on {nproc} CPUs: {:.2}x",
            secs(per_build),
            secs(per_build_many),
            busy_share * 100.0,
            N as f64 * per_build / nproc / a
        ),
        "",
        Verdict::Info,
    );
    // What row 3 is meant to show, that amidala serialises nothing: (a) the eight no-op builds
    // take no more than the CPU time they need (eight builds' worth over the CPUs, and never
    // less than one build's wall time) allows, and (b) eight builds that wait (a provisioner
    // sleeping 2 s, which costs no CPU) overlap their waits, taking about as long as one.
    let floor = (N as f64 * per_build / nproc).max(a);
    report.row(
        S,
        format!("{N} concurrent no-op builds / the CPU floor"),
        format!(
            "{N}: {}, floor {} ({N} x {} of CPU on {nproc} CPUs), {:.2}x",
            secs(b),
            secs(floor),
            secs(per_build),
            b / floor
        ),
        "<= 1.15x the CPU floor",
        Verdict::of(b / floor <= 1.15),
    );
    const SLEEP: [&str; 4] = ["--", "/bin/sh", "-c", "sleep 2"];
    let (mut slept_one, mut slept_many) = (Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        check_interrupted();
        slept_one.push(timed_build(&env, &ws, &SLEEP).wall);
        slept_many.push(builds_at_once(&env, &ws, &SLEEP, N).0);
    }
    let (a, b) = (median(&slept_one), median(&slept_many));
    report.row(
        S,
        format!("{N} concurrent builds that sleep 2 s / 1"),
        format!("1: {}, {N}: {}, {:.2}x", secs(a), secs(b), b / a),
        "<= 1.2x",
        Verdict::of(b / a <= 1.2),
    );
}

/// `n` builds of `args` started at once and followed to their ends: the wall time from the first
/// start to the last end, and each build's phases.
fn builds_at_once(env: &Env, ws: &Path, args: &[&str], n: usize) -> (f64, Vec<TimedBuild>) {
    let start = Instant::now();
    let started: Vec<_> = (0..n).map(|_| start_build(env, ws, args)).collect();
    let followers: Vec<_> = started
        .into_iter()
        .map(|(child, at)| std::thread::spawn(move || finish_build(child, at, None)))
        .collect();
    let builds = followers
        .into_iter()
        .map(
            |follower| match follower.join().expect("a concurrent build") {
                Ok(build) => build,
                Err(e) => build_failed(env, &e),
            },
        )
        .collect();
    (start.elapsed().as_secs_f64(), builds)
}

/// Seconds of CPU time spent by the whole host so far (all CPUs, everything but idle and
/// iowait), from /proc/stat (in USER_HZ ticks: 10 ms).
fn host_cpu_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("the cpu line");
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4].contains(i))
        .map(|(_, t)| t)
        .sum();
    // /proc/stat counts in USER_HZ, which Linux fixes at 100 for user space.
    busy / 100.0
}

// ---------------------------------------------------------------------------------------------
// 4. Time to first output.

const FIRST_OUTPUT: [&str; 4] = ["--", "/bin/sh", "-c", "echo first; true"];

fn time_to_first_output(env: &Env, ws: &Path) -> f64 {
    let (child, start) = start_build(env, ws, &FIRST_OUTPUT);
    let build = finish_build(child, start, Some("first")).unwrap_or_else(|e| build_failed(env, &e));
    build
        .marker
        .expect("the provisioner's line \"first\" reached the client")
}

/// Pool volumes made so far: the daemon's "warm pool: volume ready" log lines (info level).
fn pool_volumes_made(env: &Env) -> usize {
    env.daemon_log().matches("warm pool: volume ready").count()
}

/// Waits until the pool has made `count` volumes in all, for at most `timeout`.
fn wait_for_pool(env: &Env, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pool_volumes_made(env) >= count {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Volumes of the warm pool of section 4.
const POOL: usize = 2;

fn first_output_section(opts: &Opts, report: &mut Report) {
    for ec2 in [false, true] {
        for pool in [false, true] {
            check_interrupted();
            first_output(opts, report, ec2, pool);
        }
    }
}

/// Time to first output with the local or the ec2 provider (against moto, with section 2's
/// delays), without or with a warm pool.
fn first_output(opts: &Opts, report: &mut Report, on_ec2: bool, pool: bool) {
    const S: &str = "4";
    let provider = if on_ec2 { "ec2" } else { "local" };
    let (what, target) = if pool {
        (
            format!("first output, {provider}, warm pool ({POOL} volumes)"),
            "<= 1 s",
        )
    } else {
        (format!("first output, {provider}, cold"), "")
    };
    // Declared first, dropped last: the daemon stops before the emulator.
    let ec2 = on_ec2.then(Ec2Emulator::start);
    let mut config = ec2
        .as_ref()
        .map(|e| e.daemon_config("loop", ""))
        .unwrap_or_default();
    if pool {
        // The warm pool: volumes made ahead from the newest snapshot tagged amidala=base.
        config.push_str(&format!(
            "[[warm_pool]]\nfrom = \"amidala=base\"\nvolumes = {POOL}\n"
        ));
    }
    let mut vars = DAEMON_VARS.to_vec();
    if on_ec2 {
        vars.extend(AWS_ENV);
    }
    let env = match Env::try_start_in(None, &config, &vars, &[]) {
        Ok(env) => env,
        Err(e) if pool && e.contains("warm_pool") => {
            report.row(
                S,
                what,
                "n/a (daemon refused the warm_pool config)",
                target,
                Verdict::NotAvailable,
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let rootfs = env.busybox_rootfs("rootfs");
    // Published: the warm pool serves what every user may start from.
    env.import(&rootfs, &["--size", "1G", "--publish"]);
    let ws = env.workspace("ws", &[]);
    if let Some(ec2) = &ec2 {
        emulate_ec2_delays(ec2);
    }
    let mut times = Vec::new();
    if pool {
        // Each build takes a volume and the pool makes one in its place: before each build,
        // wait until the pool is full again.
        let mut full = wait_for_pool(&env, POOL, Duration::from_secs(60));
        for run in 0..opts.runs {
            check_interrupted();
            times.push(time_to_first_output(&env, &ws));
            full &= wait_for_pool(&env, POOL + run + 1, Duration::from_secs(60));
        }
        let t = median(&times);
        report.row(
            S,
            what,
            if full {
                secs(t)
            } else {
                format!("{} (the pool was not seen full again within 60 s)", secs(t))
            },
            target,
            Verdict::of(t <= 1.0),
        );
    } else {
        if !on_ec2 {
            // Warm-up, not counted.
            time_to_first_output(&env, &ws);
        }
        for _ in 0..opts.runs {
            check_interrupted();
            times.push(time_to_first_output(&env, &ws));
        }
        report.row(S, what, secs(median(&times)), target, Verdict::Info);
    }
    drop(env);
    drop(ec2);
}

// ---------------------------------------------------------------------------------------------
// 5. The daemon: idle RSS, status round trips.

fn vm_rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib / 1024.0
}

fn status_of(client: &mut amidala::Client, request: &Request) {
    match client.call(request) {
        Ok(Response::Build(_)) => {}
        other => panic!("unexpected answer to a status request: {other:?}"),
    }
}

/// p50 and p99 of `n` round trips made by `once`.
fn round_trips(n: usize, mut once: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 20 {
        once();
    }
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            once();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (percentile(&times, 50.0), percentile(&times, 99.0))
}

fn daemon_section(opts: &Opts, report: &mut Report) {
    const S: &str = "5";
    let env = local_env(None, "");
    let pid = env.daemon_pid().expect("the daemon runs");
    let started = vm_rss_mib(pid);
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);
    let build = env.build(&ws, &["--", "true"]);
    let id = build["build_id"].as_str().expect("a build id").to_owned();
    let request = Request::Status { id };
    // A few requests of each kind a client makes.
    let mut client = amidala::Client::connect(&env.socket).expect("connecting");
    for r in [
        Request::Version,
        Request::Plugins,
        Request::List,
        Request::Snapshots,
        Request::Images,
    ] {
        client.call(&r).expect("a request");
    }
    status_of(&mut client, &request);
    drop(client);
    std::thread::sleep(Duration::from_secs(1));
    let idle = vm_rss_mib(pid);
    report.row(
        S,
        "daemon idle RSS (after an import, a build, requests)",
        format!("{idle:.1} MiB (at start {started:.1} MiB)"),
        "<= 20 MiB",
        Verdict::of(idle <= 20.0),
    );

    let n = opts.requests;
    let mut client = amidala::Client::connect(&env.socket).expect("connecting");
    let (p50, p99) = round_trips(n, || status_of(&mut client, &request));
    drop(client);
    report.row(
        S,
        format!("status round trip, one connection ({n})"),
        format!("p50 {}, p99 {}", ms(p50), ms(p99)),
        "p99 <= 2 ms",
        Verdict::of(p99 <= 0.002),
    );
    let (p50, p99) = round_trips(n, || {
        let mut client = amidala::Client::connect(&env.socket).expect("connecting");
        status_of(&mut client, &request);
    });
    report.row(
        S,
        format!("connect + hello + status ({n})"),
        format!("p50 {}, p99 {}", ms(p50), ms(p99)),
        "p99 <= 2 ms",
        Verdict::of(p99 <= 0.002),
    );
    let after = vm_rss_mib(pid);
    report.row(
        S,
        format!("daemon RSS after {} more requests", 2 * (n + n / 20)),
        format!("{after:.1} MiB"),
        "",
        Verdict::Info,
    );
}

// ---------------------------------------------------------------------------------------------

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn machine(load_at_start: &str) -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let tmp = std::env::temp_dir();
    let (fs_type, source) = fs_of(&tmp);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kib| format!("{:.1} GiB", kib / 1048576.0));
    format!(
        "machine: {nproc} CPUs ({cpu}), {mem} RAM, kernel {kernel}; load average {load_at_start} \
         at the start, {} at the end\n\
         filesystems: state directories in {} on {fs_type} ({source}); XFS: mkfs.xfs -m reflink=1 \
         on a loop device over a sparse file there",
        load_average(),
        tmp.display()
    )
}

fn print_phases(phases: &[(String, Phases)]) {
    if phases.is_empty() {
        return;
    }
    let mut names: Vec<String> = Vec::new();
    for (_, p) in phases {
        for (name, _) in &p.0 {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    println!();
    println!(
        "Where a no-op build's time goes (medians, seconds, as the client sees each step begin):"
    );
    let width = names.iter().map(String::len).max().unwrap_or(0);
    let mut header = format!("{:<width$}", "");
    for (config, _) in phases {
        let _ = write!(header, "  {config:>16}");
    }
    println!("{}", header.trim_end());
    let mut totals = vec![0.0; phases.len()];
    for name in &names {
        let mut line = format!("{name:<width$}");
        for (i, (_, p)) in phases.iter().enumerate() {
            match p.0.iter().find(|(n, _)| n == name) {
                Some((_, all)) => {
                    let m = median(all);
                    totals[i] += m;
                    let _ = write!(line, "  {m:>16.3}");
                }
                None => {
                    let _ = write!(line, "  {:>16}", "-");
                }
            }
        }
        println!("{line}");
    }
    let mut line = format!("{:<width$}", "(sum of medians)");
    for t in totals {
        let _ = write!(line, "  {t:>16.3}");
    }
    println!("{line}");
}

fn print_table(report: &Report) {
    let header = ["#", "measure", "value", "target", "result"];
    let cells: Vec<[String; 5]> = report
        .rows
        .iter()
        .map(|r| {
            [
                r.section.to_owned(),
                r.what.clone(),
                r.value.clone(),
                r.target.clone(),
                r.verdict.text().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Bootable images.

/// QEMU alone, as root and without amidala's sandbox, booting `disk` (x86-64's, or `arm64`'s)
/// with `firmware` and `accel` until its console shows a login prompt (or `marker`): seconds
/// from its start.
fn qemu_alone(
    disk: &Path,
    arm64: bool,
    firmware: &str,
    accel: &str,
    marker: Option<&str>,
    work: &Path,
) -> f64 {
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-machine",
        if arm64 { "virt" } else { "q35" },
        "-m",
        "1024",
        "-smp",
        "1",
        "-serial",
        "stdio",
        "-device",
        "virtio-blk-pci,drive=disk",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("-drive".into());
    args.push(format!(
        "if=none,id=disk,file={},format=raw,read-only=on,snapshot=on",
        disk.display()
    ));
    if accel == "kvm" {
        args.extend(["-accel", "kvm", "-cpu", "host"].map(String::from));
    } else {
        args.extend(["-accel", "tcg,tb-size=256"].map(String::from));
        if arm64 {
            args.extend(["-cpu", "cortex-a72"].map(String::from));
        }
    }
    if firmware == "uefi" {
        let (code, vars_from) = if arm64 {
            (
                "/usr/share/AAVMF/AAVMF_CODE.fd",
                "/usr/share/AAVMF/AAVMF_VARS.fd",
            )
        } else {
            (
                "/usr/share/OVMF/OVMF_CODE_4M.fd",
                "/usr/share/OVMF/OVMF_VARS_4M.fd",
            )
        };
        let vars = work.join("vars.fd");
        fs::copy(vars_from, &vars).unwrap();
        args.push("-drive".into());
        args.push(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={code}"
        ));
        args.push("-drive".into());
        args.push(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ));
    }
    let start = Instant::now();
    let qemu = if arm64 {
        "qemu-system-aarch64"
    } else {
        "qemu-system-x86_64"
    };
    let mut child = Command::new(qemu)
        .args(&args)
        .env("TMPDIR", work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {qemu}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let booted = loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break None,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                let tail =
                    String::from_utf8_lossy(&seen[seen.len().saturating_sub(200)..]).into_owned();
                let signal = match marker {
                    Some(marker) => tail.contains(marker),
                    None => tail.trim_end().ends_with(" login:"),
                };
                if signal {
                    break Some(start.elapsed().as_secs_f64());
                }
                if start.elapsed() > Duration::from_secs(600) {
                    break None;
                }
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    booted
        .unwrap_or_else(|| panic!("QEMU alone did not reach its boot signal ({firmware}, {accel})"))
}

/// The seconds and accelerator of `firmware`'s passed boot test, from a build's log.
fn boot_test_seconds(log: &str, firmware: &str) -> (f64, String) {
    let prefix = format!("amidala: boot test ({firmware}, ");
    log.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .find_map(|rest| {
            let (accel, rest) = rest.split_once(") passed in ")?;
            Some((rest.strip_suffix(" s")?.parse().ok()?, accel.to_owned()))
        })
        .unwrap_or_else(|| panic!("no passed {firmware} boot test in the log:\n{log}"))
}

fn boot_section(opts: &Opts, report: &mut Report) {
    const S: &str = "7";
    let runs = opts.runs.min(3);
    let tree = amidala_tests::debian_boot_rootfs();
    let env = local_env(None, "");
    let ws = env.workspace("ws", &[]);
    let work = env.dir.path().join("bench-boot");
    fs::create_dir(&work).unwrap();
    // The import, against mkfs.ext4 -d of the same tree into a file of the same size: both
    // with the tree in the page cache (read once first, untimed: the first of them to run
    // would otherwise pay for reading it from disk), three runs even if the boots get fewer
    // (an import takes seconds).
    // (Through a pipe: GNU tar reads no file for an archive that is /dev/null.)
    run(Command::new("sh")
        .args(["-c", "tar -C \"$1\" -cf - . | cat >/dev/null", "sh"])
        .arg(&tree))
    .ok();
    let (mut imports, mut mkfs, mut base) = (Vec::new(), Vec::new(), String::new());
    for run_no in 0..opts.runs.max(3) {
        check_interrupted();
        let start = Instant::now();
        let id = env.import(&tree, &["--tag", &format!("bench=boot{run_no}")]);
        imports.push(start.elapsed().as_secs_f64());
        let size = fs::metadata(snapshot_path(&env, &id)).unwrap().len();
        base = id;
        let file = work.join("mkfs.img");
        let _ = fs::remove_file(&file);
        let start = Instant::now();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&file)
            .arg(format!("{}k", (size - (67 << 20)) / 1024)))
        .ok();
        mkfs.push(start.elapsed().as_secs_f64());
        fs::remove_file(&file).unwrap();
    }
    let (i, m) = (median(&imports), median(&mkfs));
    report.row(
        S,
        "base import of the Debian tree, bootable (GPT, GRUB BIOS+UEFI)",
        format!(
            "amidala {}, mkfs.ext4 -d alone {}, {:.2}x",
            secs(i),
            secs(m),
            i / m
        ),
        "<= 2x mkfs.ext4 -d",
        Verdict::of(i / m <= 2.0),
    );
    // The boot test against QEMU alone, and the build with it against the build without it.
    let disk = snapshot_path(&env, &base);
    let mut with_test = Vec::new();
    let mut without = Vec::new();
    let mut tests: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
    let mut accel = String::new();
    for _ in 0..runs {
        check_interrupted();
        without.push(timed_build(&env, &ws, &["--source", &base, "--", "true"]).wall);
        let (child, start) =
            start_build(&env, &ws, &["--source", &base, "--boot-test", "--", "true"]);
        let out = child.wait_with_output().unwrap();
        let wall = start.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            build_failed(&env, &log);
        }
        with_test.push(wall);
        for (k, firmware) in ["bios", "uefi"].into_iter().enumerate() {
            let (seconds, a) = boot_test_seconds(&log, firmware);
            accel = a;
            tests[k].0.push(seconds);
            tests[k]
                .1
                .push(qemu_alone(&disk, false, firmware, &accel, None, &work));
        }
    }
    for (k, firmware) in ["BIOS", "UEFI"].into_iter().enumerate() {
        let (t, q) = (median(&tests[k].0), median(&tests[k].1));
        report.row(
            S,
            format!("boot test, {firmware}, {accel}: QEMU start to login prompt"),
            format!("amidala {}, QEMU alone {}, {:.2}x", secs(t), secs(q), t / q),
            "<= 1.1x QEMU alone",
            Verdict::of(t / q <= 1.1),
        );
    }
    let (w, n) = (median(&with_test), median(&without));
    report.row(
        S,
        format!("no-op build with --boot-test (BIOS+UEFI, {accel})"),
        format!("{} against {} without, +{}", secs(w), secs(n), secs(w - n)),
        "(information)",
        Verdict::Info,
    );
    // arm64: the small arm64 tree imported and boot-tested (`amidala boot-test`, UEFI in
    // QEMU's arm64 machine, TCG on an x86 host), against QEMU alone booting the same disk to
    // the same marker.
    const MARKER: &str = "amidala-arm64-init: up on aarch64";
    let arm64 = amidala_tests::arm64_boot_tree();
    let (mut imports, mut tested, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    let mut accel = String::new();
    for run_no in 0..runs {
        check_interrupted();
        let start = Instant::now();
        let id = env.import(&arm64, &["--tag", &format!("bench=arm64-{run_no}")]);
        imports.push(start.elapsed().as_secs_f64());
        let out = env.amidala(&["boot-test", &id, "--marker", MARKER]);
        if out.code != Some(0) {
            build_failed(&env, &out.stderr);
        }
        let (seconds, a) = boot_test_seconds(&out.stderr, "uefi");
        accel = a;
        tested.push(seconds);
        let disk = snapshot_path(&env, &id);
        alone.push(qemu_alone(&disk, true, "uefi", &accel, Some(MARKER), &work));
    }
    let (t, q) = (median(&tested), median(&alone));
    report.row(
        S,
        format!("arm64 boot test, UEFI, {accel}: QEMU start to the init's marker"),
        format!("amidala {}, QEMU alone {}, {:.2}x", secs(t), secs(q), t / q),
        "<= 1.1x QEMU alone",
        Verdict::of(t / q <= 1.1),
    );
    report.row(
        S,
        "base import of the arm64 tree, bootable (GPT, GRUB arm64-efi)",
        secs(median(&imports)),
        "(information)",
        Verdict::Info,
    );
}

// ---------------------------------------------------------------------------------------------
// 6. The cost of isolation.

/// A member of group amidala for the benchmark, made and removed by it.
const BENCH_USER: &str = "amidala-bench";

/// A no-op build run as `user` (through setpriv, for root as for the member), timed.
fn build_as(env: &Env, user: &str, ws: &Path, rw: bool) -> f64 {
    let mut args = vec!["build", "--json"];
    if rw {
        args.push("--workspace-rw");
    }
    args.extend(["--", "true"]);
    let start = Instant::now();
    let out = amidala_tests::as_user(user, amidala_tests::bin_dir().join("amidala"))
        .args(&args)
        .current_dir(ws)
        .env("AMIDALA_SOCKET", &env.socket)
        .output()
        .expect("running amidala build");
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        build_failed(env, &String::from_utf8_lossy(&out.stderr));
    }
    wall
}

/// A workspace of `files` files of 1 MiB each, owned by `user`.
fn workspace_of(env: &Env, name: &str, files: usize, size: usize, user: &str) -> PathBuf {
    let ws = env.workspace(name, &[]);
    let block = vec![7u8; size];
    for i in 0..files {
        fs::write(ws.join(format!("f{i:04}")), &block).expect("writing the workspace");
    }
    run(Command::new("chown")
        .args(["-R", &format!("{user}:{user}")])
        .arg(&ws))
    .ok();
    ws
}

const SECCOMP_RUN: &str = "__seccomp-run";

/// `amidala-bench __seccomp-run CMD...`: loads the provisioner's seccomp filter (as a build
/// with the default policy has it) and executes CMD. Runs before anything starts a thread.
fn seccomp_run(cmd: &[String]) -> ! {
    use std::os::unix::process::CommandExt;
    let filter = amidalad::confine::provisioner_filter(&amidalad::confine::Allowances::default())
        .unwrap_or_else(|e| panic!("{e}"));
    amidalad::confine::load(&filter).unwrap_or_else(|e| panic!("{e}"));
    let err = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    panic!("executing {}: {err}", cmd[0]);
}

fn isolation_section(opts: &Opts, report: &mut Report) {
    const S: &str = "6";
    let _accounts = amidala_tests::Accounts::create(&[(BENCH_USER, "amidala")]);
    let env = local_env(None, "[limits]\nmax_running_builds_per_user = 8\n");
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &["--size", "1G", "--publish"]);
    // The scrub after a read-write build looks at every file: many small files cost it most.
    for (label, files, size) in [
        ("10 MiB", 10, 1 << 20),
        ("1 GiB", 1024, 1 << 20),
        ("20 000 files of 4 KiB", 20_000, 4096),
    ] {
        for rw in [false, true] {
            let mode = if rw { "read-write" } else { "read-only" };
            let name = |who: &str| format!("ws-{files}-{rw}-{who}");
            let mine = workspace_of(&env, &name("member"), files, size, BENCH_USER);
            let roots = workspace_of(&env, &name("root"), files, size, "root");
            // One of each first: caches warm, and the ratio compares like with like.
            build_as(&env, "root", &roots, rw);
            build_as(&env, BENCH_USER, &mine, rw);
            let (mut plain, mut mapped) = (Vec::new(), Vec::new());
            for _ in 0..opts.runs {
                check_interrupted();
                plain.push(build_as(&env, "root", &roots, rw));
                mapped.push(build_as(&env, BENCH_USER, &mine, rw));
            }
            let (plain, mapped) = (median(&plain), median(&mapped));
            report.row(
                S,
                format!("no-op build, {label} workspace, {mode}: member / root"),
                format!(
                    "member (idmapped{}) {}, root (as it is) {}, {:.2}x",
                    if rw { ", scrubbed" } else { "" },
                    secs(mapped),
                    secs(plain),
                    mapped / plain
                ),
                "",
                Verdict::Info,
            );
            let _ = fs::remove_dir_all(&mine);
            let _ = fs::remove_dir_all(&roots);
        }
    }
    drop(env);

    // The filter's cost: 10 000 short processes (busybox, statically linked) under it,
    // against the same without it.
    let script = "i=0; while [ $i -lt 10000 ]; do busybox true; i=$((i+1)); done";
    let bench = std::env::current_exe().expect("the bench's own path");
    let time = |filtered: bool| {
        let mut cmd = if filtered {
            let mut cmd = Command::new(&bench);
            cmd.arg(SECCOMP_RUN);
            cmd
        } else {
            Command::new("env")
        };
        cmd.args(["busybox", "sh", "-c", script]);
        let start = Instant::now();
        let status = cmd.status().expect("running the loop");
        assert!(status.success(), "the loop failed");
        start.elapsed().as_secs_f64()
    };
    time(false);
    time(true);
    let (mut bare, mut filtered) = (Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        check_interrupted();
        bare.push(time(false));
        filtered.push(time(true));
    }
    let (bare, filtered) = (median(&bare), median(&filtered));
    report.row(
        S,
        "10 000 short processes: with the seccomp filter / without",
        format!(
            "with {}, without {}, {:.2}x ({:.1} µs more a process)",
            secs(filtered),
            secs(bare),
            filtered / bare,
            (filtered - bare) / 10_000.0 * 1e6
        ),
        "",
        Verdict::Info,
    );
}

fn main() {
    // The seccomp row's runner: load the provisioner's filter, then become the command.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SECCOMP_RUN) {
        seccomp_run(&args[2..]);
    }
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("amidala-bench: {e}\n{USAGE}");
            for (name, what) in SECTIONS {
                eprintln!("  {name:<14}{what}");
            }
            std::process::exit(2);
        }
    };
    amidala_tests::require_root();
    catch_signals();
    eprintln!(
        "amidala-bench: binaries from {}, {} runs each, sections {}",
        amidala_tests::bin_dir().display(),
        opts.runs,
        opts.sections.join(",")
    );
    let load_at_start = load_average();
    let mut report = Report::default();
    let mut broke = false;
    for (name, what) in SECTIONS {
        if !opts.sections.contains(&name) {
            continue;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprintln!("bench: section {what}");
        let section: fn(&Opts, &mut Report) = match name {
            "local" => local_section,
            "ec2" => ec2_section,
            "concurrent" => concurrent_section,
            "first-output" => first_output_section,
            "daemon" => daemon_section,
            "isolation" => isolation_section,
            _ => boot_section,
        };
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| section(&opts, &mut report)));
        if let Err(panic) = outcome {
            broke = true;
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panicked");
            let first_line = message.lines().next().unwrap_or_default();
            report.row(
                &what[..1],
                format!("section {name}"),
                first_line.chars().take(100).collect::<String>(),
                "",
                Verdict::Broke,
            );
        }
        eprintln!(
            "bench: section {name} took {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    print_phases(&report.phases);
    println!();
    println!("{}", machine(&load_at_start));
    println!(
        "amidala-bench, medians of {} runs (section 5: {} requests)",
        opts.runs, opts.requests
    );
    print_table(&report);
    for note in &report.notes {
        println!("{note}");
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("amidala-bench: interrupted");
        std::process::exit(130);
    }
    if broke {
        eprintln!("amidala-bench: a section broke (see above); its rows are incomplete");
        std::process::exit(1);
    }
}
