//! Faults, injected for real: the daemon killed with SIGKILL inside each phase of a build (local
//! provider, and ec2 against moto with EC2's latencies and state delays emulated), the client
//! killed or interrupted, a provisioner that hangs past its timeout or leaves daemons behind.
//! After each: nothing leaked, the build marked as it should be, and the next build succeeds.
//!
//! The kill suite prints a table: fault × phase × provider → the phase the build's journal
//! held when the daemon died, what leaked, whether the next build succeeded.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use amidala_tests::{field, Ec2Emulator, Env, AWS_ENV, PHASES};
use serde_json::json;

/// Spins on the build's event log until `phase` begins (or the build ends); returns whether
/// the phase was seen. Spinning rather than sleeping: local phases can be short.
fn wait_for_phase(env: &Env, build: &str, phase: &str, timeout: Duration) -> bool {
    let log = env.state.join("builds").join(format!("{build}.log"));
    let needle = format!("{{\"phase\":{{\"phase\":\"{phase}\"}}}}");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(text) = fs::read_to_string(&log) {
            if text.contains(&needle) {
                return true;
            }
            if text.contains("{\"finished\":") || text.contains("{\"failed\":") {
                return false;
            }
        }
        std::hint::spin_loop();
    }
    false
}

/// What one injected fault left.
struct Row {
    provider: &'static str,
    fault: &'static str,
    phase: String,
    journaled: String,
    leaks: Vec<String>,
    /// Why the next build failed, if it did.
    next_error: Option<String>,
}

/// Prints the table, then asserts that nothing leaked and every next build succeeded.
fn report(rows: &[Row]) {
    print_table(rows);
    for r in rows {
        assert!(
            r.leaks.is_empty(),
            "{} {} {}: {:?}",
            r.provider,
            r.fault,
            r.phase,
            r.leaks
        );
        assert!(
            r.next_error.is_none(),
            "{} {} {}: the next build failed: {}",
            r.provider,
            r.fault,
            r.phase,
            r.next_error.as_deref().unwrap_or_default()
        );
    }
}

fn next_build_error(next: &amidala_tests::Run) -> Option<String> {
    (next.code != Some(0)).then(|| format!("{}{}", next.stdout, next.stderr))
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<9} {:<8} {:<10} {:<28} {:>6}  next build",
        "provider", "fault", "phase", "journal at death", "leaks"
    );
    for r in rows {
        println!(
            "{:<9} {:<8} {:<10} {:<28} {:>6}  {}",
            r.provider,
            r.fault,
            r.phase,
            r.journaled,
            r.leaks.len(),
            if r.next_error.is_none() {
                "succeeded"
            } else {
                "FAILED"
            }
        );
        for leak in &r.leaks {
            println!("    leaked: {leak}");
        }
    }
}

/// Kills the daemon inside `phase` of a build, restarts it and checks what it left.
fn kill_in_phase(
    env: &mut Env,
    ws: &Path,
    provider: &'static str,
    phase: &'static str,
    extra_leaks: &dyn Fn() -> Vec<String>,
) -> Row {
    let started = env.amidala_in(
        ws,
        &[
            "build",
            "--detach",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1; echo built > /root/built",
        ],
    );
    let build = started.ok().trim().to_owned();
    assert!(
        wait_for_phase(env, &build, phase, Duration::from_secs(60)),
        "{provider}: build {build} never entered {phase}:\n{}",
        fs::read_to_string(env.state.join("builds").join(format!("{build}.log")))
            .unwrap_or_default()
    );
    env.kill9();
    // What the journal held at the moment of death.
    let record = env.build_record(&build);
    let journaled = match record["state"].as_str() {
        Some("running") | Some("queued") => record["phase"].as_str().unwrap_or("?").to_owned(),
        Some(state) => format!("({state} before the kill)"),
        None => "?".into(),
    };
    env.restart();
    let status = env.amidala(&["status", "--json", &build]).json();
    if !journaled.starts_with('(') {
        assert_eq!(status["state"], "failed", "{status}");
        assert_eq!(
            status["error"]["message"], "interrupted by daemon restart",
            "{status}"
        );
    }
    let logs = env.amidala(&["logs", &build]);
    assert!(
        logs.ok().contains("interrupted by daemon restart") || journaled.starts_with('('),
        "the log ends with the reason: {}",
        logs.stdout
    );
    let mut leaks = env.leaks();
    leaks.extend(extra_leaks());
    let next = env.amidala_in(ws, &["build", "--json", "--", "true"]);
    Row {
        provider,
        fault: "kill -9",
        phase: phase.to_owned(),
        journaled,
        leaks,
        next_error: next_build_error(&next),
    }
}

/// The id of the build whose log appears in `env` that is not in `known`.
fn new_build(env: &Env, known: &[String], timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(id) = build_logs(env).into_iter().find(|id| !known.contains(id)) {
            return id;
        }
        assert!(Instant::now() < deadline, "no new build appeared");
        std::hint::spin_loop();
    }
}

fn build_logs(env: &Env) -> Vec<String> {
    fs::read_dir(env.state.join("builds"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".log").map(str::to_owned)
        })
        .collect()
}

/// Interrupts the client (Ctrl-C) inside `phase` of its build and checks what is left once it
/// has returned.
fn interrupt_in_phase(
    env: &mut Env,
    ws: &Path,
    provider: &'static str,
    phase: &'static str,
    extra_leaks: &dyn Fn() -> Vec<String>,
) -> Row {
    let known = build_logs(env);
    let client = env.spawn_client(
        ws,
        &[
            "build",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1; echo built > /root/built",
        ],
    );
    let build = new_build(env, &known, Duration::from_secs(30));
    assert!(
        wait_for_phase(env, &build, phase, Duration::from_secs(60)),
        "{provider}: build {build} never entered {phase}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let record = env.build_record(&build);
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A Ctrl-C before the client read the daemon's acceptance ends it at once (130); the
    // closed connection then cancels the build. Otherwise, once the client has returned, the
    // teardown is over.
    let early = out.status.code() == Some(130);
    if early {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ["running", "queued"].contains(
            &env.amidala(&["status", "--json", &build]).json()["state"]
                .as_str()
                .unwrap(),
        ) {
            assert!(
                Instant::now() < deadline,
                "build {build} goes on without its client"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut leaks = env.leaks();
    leaks.extend(extra_leaks());
    let status = env.amidala(&["status", "--json", &build]).json();
    let journaled = format!(
        "{} -> {}",
        record["phase"].as_str().unwrap_or("?"),
        status["state"].as_str().unwrap_or("?")
    );
    if status["state"] == "cancelled" && !early {
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("cancelling build {build}")),
            "{stderr}"
        );
    }
    let next = env.amidala_in(ws, &["build", "--json", "--", "true"]);
    Row {
        provider,
        fault: "Ctrl-C",
        phase: phase.to_owned(),
        journaled,
        leaks,
        next_error: next_build_error(&next),
    }
}

/// After the suite, gc removes the snapshots kept from interrupted builds, and then finds
/// nothing.
fn gc_finds_nothing_after(env: &Env) {
    let first = env.amidala(&["gc", "--json"]).json();
    for item in first.as_array().unwrap() {
        assert_eq!(
            item["kind"], "snapshot",
            "only kept snapshots of failed builds are left: {first}"
        );
        assert_eq!(item["removed"], true, "{first}");
    }
    let again = env.amidala(&["gc", "--dry-run", "--json"]).json();
    assert_eq!(again, json!([]), "gc finds nothing after the suite");
}

#[test]
fn kill_the_daemon_in_every_phase_local() {
    let mut env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let mut rows = Vec::new();
    for phase in PHASES {
        rows.push(kill_in_phase(&mut env, &ws, "local", phase, &Vec::new));
    }
    for phase in PHASES {
        rows.push(interrupt_in_phase(&mut env, &ws, "local", phase, &Vec::new));
    }
    report(&rows);
    gc_finds_nothing_after(&env);
    env.assert_no_leaks();
}

#[test]
fn kill_the_daemon_in_every_phase_ec2() {
    let ec2 = Ec2Emulator::start();
    let mut env = Env::start_with(&ec2.daemon_config("loop", ""), &AWS_ENV);
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // EC2's delays, stretched so that each phase lasts long enough to die in: volumes are
    // `creating` and snapshots `pending` for a while, and the calls of the short phases
    // answer slowly. And EC2's eventual consistency: what was just made is unknown to the
    // calls naming it for a while (issue 16).
    ec2.configure(json!({
        "volume_creating_secs": 1,
        "snapshot_pending_secs": 1,
        "not_found_secs": {"volume": 2, "snapshot": 2, "image": 2},
        "latency": {
            "DescribeSnapshots": 0.3,
            "AttachVolume": 1,
            "DetachVolume": 1,
            "RegisterImage": 1,
        }
    }));
    let leaks = || {
        let mut found: Vec<String> = ec2
            .amidala_volumes()
            .into_iter()
            .map(|(id, state)| format!("volume {id} ({state})"))
            .collect();
        if ec2.instance_mappings() != vec!["/dev/sda1".to_owned()] {
            found.push(format!("attachments {:?}", ec2.instance_mappings()));
        }
        found
    };
    let mut rows = Vec::new();
    for phase in PHASES {
        rows.push(kill_in_phase(&mut env, &ws, "ec2", phase, &leaks));
    }
    for phase in PHASES {
        rows.push(interrupt_in_phase(&mut env, &ws, "ec2", phase, &leaks));
    }
    report(&rows);
    for r in &rows {
        assert!(
            !r.journaled.starts_with('('),
            "{} {}: the kill came too late ({})",
            r.provider,
            r.phase,
            r.journaled
        );
    }
    gc_finds_nothing_after(&env);
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

fn state_of(env: &Env, build: &str) -> serde_json::Value {
    env.amidala(&["status", "--json", build]).json()
}

#[test]
fn a_client_that_goes_away_cancels_its_build_unless_detached() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);

    // Killed (a lost SSH session is no gentler): the build is cancelled and torn down.
    let mut client = env.spawn_client(&ws, &["build", "--", "sleep", "300"]);
    let build = env.build_in_phase("provision");
    client.kill().unwrap();
    client.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&env, &build)["state"] == "running" {
        assert!(
            Instant::now() < deadline,
            "the build goes on without its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = state_of(&env, &build);
    assert_eq!(status["state"], "cancelled", "{status}");
    env.assert_no_leaks();
    let logs = env.amidala(&["logs", &build]).ok().to_owned();
    assert!(logs.contains("the client went away"), "{logs}");

    // Detached: the client returns the id at once, the build goes on, logs -f follows it.
    let started = env.amidala_in(
        &ws,
        &[
            "build",
            "--detach",
            "--",
            "/bin/sh",
            "-c",
            "sleep 1; echo detached-ok",
        ],
    );
    let build = started.ok().trim().to_owned();
    assert!(build.starts_with("bld-"), "{}", started.stdout);
    let followed = env.amidala(&["logs", "-f", &build]);
    assert!(
        followed.ok().contains("detached-ok") && followed.stdout.contains("finished: image"),
        "{}",
        followed.stdout
    );
    assert_eq!(state_of(&env, &build)["state"], "succeeded");
    env.assert_no_leaks();
}

#[test]
fn ctrl_c_cancels_and_waits_for_the_teardown() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let client = env.spawn_client(&ws, &["build", "--", "sleep", "300"]);
    let build = env.build_in_phase("provision");
    let (code, stderr) = amidala_tests::interrupt(client);
    assert_eq!(code, Some(130), "{stderr}");
    for expected in [
        format!("cancelling build {build}"),
        "detached volume".to_owned(),
        "deleted volume".to_owned(),
        "build cancelled".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} in:\n{stderr}");
    }
    // The client ended after the teardown, not before: nothing is left by then.
    assert!(env.leaks().is_empty(), "{:?}", env.leaks());
    assert_eq!(state_of(&env, &build)["state"], "cancelled");
}

#[test]
fn a_provisioner_past_its_timeout_is_stopped() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let started = Instant::now();
    let run = env.amidala_in(&ws, &["build", "--timeout", "2s", "--", "sleep", "300"]);
    let err = run.err();
    assert!(err.contains("did not finish within --timeout 2s"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let refused = env.amidala_in(&ws, &["build", "--timeout", "0", "--", "true"]);
    assert!(
        refused.err().contains("not between 1s and 7d"),
        "{}",
        refused.stderr
    );
    env.assert_no_leaks();
}

/// Whether a process whose command line contains `needle` runs on the host.
fn running(needle: &str) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|e| {
        fs::read(e.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
            .unwrap_or(false)
    })
}

#[test]
fn whatever_the_provisioner_leaves_running_is_killed_before_unmount() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // A service started the way packages start them: setsid, and a double fork, with its
    // working directory and an open file in the image (which would keep it busy).
    let script = "cd /root; setsid sleep 4711 < /dev/null > /root/held 2>&1 & \
                  (sh -c 'cd /tmp; exec sleep 4712' < /dev/null > /dev/null 2>&1 &) ; \
                  sleep 0.2; echo started";
    let result = env.build(&ws, &["--", "/bin/sh", "-c", script]);
    assert!(field(&result, "image_id").starts_with("ami-"));
    assert!(
        !running("sleep 4711") && !running("sleep 4712"),
        "daemons outlived the build"
    );
    env.assert_no_leaks();
}

#[test]
fn a_full_state_directory_fails_clearly_and_loses_nothing() {
    let mut env = Env::start();
    env.stop();
    let state = env.state.to_str().unwrap().to_owned();
    amidala_tests::run(std::process::Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        "size=48m",
        "amidala-full",
        &state,
    ]))
    .ok();
    env.restart();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let before = env.build(&ws, &["--", "true"]);
    let snapshots = env.amidala(&["snapshots", "--json"]).json();

    // Fill it up.
    let filler = env.state.join("filler");
    let _ = amidala_tests::run(
        std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M"])
            .arg(format!("of={}", filler.display())),
    );
    for args in [
        vec!["build", "--", "/bin/sh", "-c", "echo more > /root/more"],
        vec!["build", "--detach", "--", "true"],
    ] {
        let run = env.amidala_in(&ws, &args);
        let err = run.err();
        assert!(
            err.contains("No space left on device") || err.contains("no space"),
            "a clear error: {err}"
        );
    }
    // Nothing lost: the catalog reads as before, every record whole.
    assert_eq!(env.amidala(&["snapshots", "--json"]).json(), snapshots);
    let builds = env.amidala(&["list", "--json"]).json();
    let first = builds
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == field(&before, "build_id"))
        .unwrap();
    assert_eq!(first["state"], "succeeded");
    for b in builds.as_array().unwrap() {
        assert!(
            b["state"] != "running" && b["state"] != "queued",
            "a build left hanging: {b}"
        );
    }
    let leaks: Vec<String> = env
        .leaks()
        .into_iter()
        .filter(|l| !l.contains("amidala-full")) // the test's own tmpfs
        .collect();
    assert!(leaks.is_empty(), "{leaks:?}");

    // Room for the journal but not for the volume: the build fails in its volume phase, and
    // leaves no partial volume.
    fs::remove_file(&filler).unwrap();
    let free = nix::sys::statvfs::statvfs(&env.state).unwrap();
    let room = free.blocks_available() * free.fragment_size();
    amidala_tests::run(std::process::Command::new("fallocate").args([
        "-l",
        &(room - 256 * 1024).to_string(),
        filler.to_str().unwrap(),
    ]))
    .ok();
    let run = env.amidala_in(&ws, &["build", "--json", "--", "true"]);
    assert!(
        run.err().contains("No space left on device"),
        "{}",
        run.stderr
    );
    let failure: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(failure["phase"], "volume", "{}", run.stdout);
    let leaks: Vec<String> = env
        .leaks()
        .into_iter()
        .filter(|l| !l.contains("amidala-full"))
        .collect();
    assert!(leaks.is_empty(), "{leaks:?}");

    // Room again: builds succeed.
    fs::remove_file(&filler).unwrap();
    env.build(&ws, &["--", "true"]);
    env.stop();
    amidala_tests::run(std::process::Command::new("umount").arg(&state)).ok();
}
