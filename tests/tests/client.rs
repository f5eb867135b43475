//! The client as people use it: spec files (`amidala.toml`), `amidala validate`, progress on a
//! terminal and off it, `--quiet`, `--json` and the exit statuses, against the real daemon.

use std::process::Command;

use amidala_tests::{field, require_root, run, Env};

/// How many snapshots, images and builds the daemon has, to show that something made nothing.
fn inventory(env: &Env) -> (usize, usize, usize) {
    let count = |what: &str| {
        env.amidala(&[what, "--json"])
            .json()
            .as_array()
            .map_or(0, Vec::len)
    };
    (count("snapshots"), count("images"), count("list"))
}

/// The image or snapshot `id` as `amidala images` or `amidala snapshots` lists it.
#[track_caller]
fn listed(env: &Env, what: &str, id: &serde_json::Value) -> serde_json::Value {
    let all = env.amidala(&[what, "--json"]).json();
    all.as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == *id)
        .unwrap_or_else(|| panic!("{id} in {what}: {all}"))
        .clone()
}

const SPEC: &str = r#"# The spec of a test build.
name = "spec-{build}"
tags = { role = "web", team = "ops" }
snapshot_tags = { amidala = "web" }
timeout = "10m"
command = ["/bin/sh", "-c", "echo from-the-spec > /root/spec.txt; echo spec-says-hello"]

[provisioner]
name = "shell"
"#;

#[test]
fn a_spec_file_makes_the_build_and_flags_override_it() {
    require_root();
    let env = Env::start();
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[("amidala.toml", SPEC)]);

    // `amidala build` with no arguments builds what amidala.toml says.
    let run = env.amidala_in(&ws, &["build", "--json"]);
    let result = run.json();
    assert!(
        run.stderr.contains("building from amidala.toml"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("spec-says-hello"), "{}", run.stderr);
    let build = field(&result, "build_id");
    let image = listed(&env, "images", &result["image_id"]);
    assert_eq!(image["name"], format!("spec-{build}"));
    assert_eq!(image["tags"]["role"], "web");
    assert_eq!(image["tags"]["team"], "ops");
    let snapshot = listed(&env, "snapshots", &result["snapshot_id"]);
    assert_eq!(snapshot["tags"]["amidala"], "web");
    let status = env.amidala(&["status", "--json", build]).json();
    assert_eq!(status["source_snapshot"], base.as_str());
    // Its log as JSON lines: every event an object, the phases in order, the result last.
    let logs = env.amidala(&["logs", "--json", build]);
    let events: Vec<serde_json::Value> = logs
        .ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let phases: Vec<&str> = events
        .iter()
        .filter_map(|e| e["phase"]["phase"].as_str())
        .collect();
    assert_eq!(
        &phases[..amidala_tests::PHASES.len()],
        amidala_tests::PHASES
    );
    assert!(events.iter().any(|e| e["log"]["line"] == "spec-says-hello"));
    assert_eq!(events.last().unwrap()["finished"]["build_id"], build);

    // Options override the file: the name, one tag, the command; the rest stays.
    let run = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--name",
            "flagged-{build}",
            "--tag",
            "role=db",
            "--",
            "/bin/sh",
            "-c",
            "echo flag-says-hello",
        ],
    );
    let result = run.json();
    assert!(run.stderr.contains("flag-says-hello"), "{}", run.stderr);
    assert!(!run.stderr.contains("spec-says-hello"), "{}", run.stderr);
    let build = field(&result, "build_id");
    let image = listed(&env, "images", &result["image_id"]);
    assert_eq!(image["name"], format!("flagged-{build}"));
    assert_eq!(image["tags"]["role"], "db");
    assert_eq!(image["tags"]["team"], "ops");

    // --no-spec ignores the file: the shell provisioner then has no command to run.
    let refused = env.amidala_in(&ws, &["build", "--no-spec"]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    env.assert_no_leaks();
}

#[test]
fn a_bad_spec_file_names_its_line_and_makes_nothing() {
    require_root();
    let env = Env::start();
    env.import_busybox();
    let before = inventory(&env);
    let ws = env.workspace(
        "ws",
        &[(
            "amidala.toml",
            "name = \"x-{build}\"\n\n[provisioner]\nname = \"shell\"\nopts = { a = \"b\" }\n",
        )],
    );
    for args in [&["build"][..], &["validate"], &["validate", "--offline"]] {
        let run = env.amidala_in(&ws, args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("amidala.toml") && run.stderr.contains("line 5"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("unknown field `opts`"),
            "{}",
            run.stderr
        );
    }
    // A malformed value, found by the daemon-free checks too.
    std::fs::write(ws.join("amidala.toml"), "size = \"lots\"\n").unwrap();
    let run = env.amidala_in(&ws, &["validate", "--offline"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("line 1"), "{}", run.stderr);
    // A spec file that is not there.
    let run = env.amidala_in(&ws, &["build", "--spec", "missing.toml"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("missing.toml"), "{}", run.stderr);
    assert_eq!(inventory(&env), before);
    env.assert_no_leaks();
}

#[test]
fn validate_says_what_a_build_would_do_and_makes_nothing() {
    require_root();
    let env = Env::start();
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[("amidala.toml", SPEC)]);
    let before = inventory(&env);

    let run = env.amidala_in(&ws, &["validate", "--size", "64M"]);
    let text = run.ok();
    for expected in [
        "spec file:     amidala.toml",
        &format!("newest snapshot tagged amidala=base → {base}"),
        "provisioner:   shell ",
        "image:         spec-bld-",
        "image tags:    role=web, team=ops",
        "snapshot tags: amidala=web",
        "network:       no-metadata",
        "timeout:       600s",
        "(local provider)",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    let plan = env.amidala_in(&ws, &["validate", "--json"]).json();
    assert_eq!(plan["checked_by_daemon"], true);
    assert_eq!(plan["plan"]["source_snapshot"]["id"], base.as_str());
    assert_eq!(plan["plan"]["provider"], "local");
    assert_eq!(plan["plan"]["spec"]["network"], "no-metadata");
    let example = field(&plan["plan"], "example_build_id");
    assert_eq!(plan["plan"]["image_name"], format!("spec-{example}"));

    // What the daemon refuses, validate reports the same way, with the status of bad input.
    for (args, says) in [
        (&["validate", "--provisioner", "nosuch"][..], "nosuch"),
        (
            &["validate", "--from", "amidala=nothing"],
            "amidala=nothing",
        ),
        (&["validate", "--cache", "apt"], "--cache apt"),
        (&["validate", "--network", "bogus"], "bogus"),
    ] {
        let run = env.amidala_in(&ws, args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
    assert_eq!(inventory(&env), before);
    env.assert_no_leaks();
}

#[test]
fn exit_statuses_and_json_errors() {
    require_root();
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // A build that fails: 1, and the failure as JSON on stdout.
    let run = env.amidala_in(&ws, &["build", "--json", "--", "/bin/sh", "-c", "exit 3"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let failure: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(failure["phase"], "provision");
    assert_eq!(failure["exit_status"], 3);
    // No such build: bad input, 2.
    let run = env.amidala(&["status", "--json", "bld-00000000000000000"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let error: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(error["error"]["code"], "not_found");
    assert_eq!(error["error"]["exit_status"], 2);
    // A command line clap refuses: 2.
    assert_eq!(env.amidala(&["build", "--size", "huge"]).code, Some(2));
    // No daemon there: 3, with what to do next.
    let run = amidala_tests::run(
        Command::new(amidala_tests::bin_dir().join("amidala"))
            .args(["--json", "list", "--socket"])
            .arg(env.dir.path().join("no-such.sock")),
    );
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert!(
        run.stderr.contains("is amidalad running?"),
        "{}",
        run.stderr
    );
    let error: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(error["error"]["code"], "unreachable");
    // Not allowed: gc by a user who is no admin is refused, 4 (tests/users.rs has the
    // matrix; here only the status). Root is an admin, so a refusal needs a policy: a build
    // beyond the per-user limit is the simplest refusal root can meet.
    let limited = Env::start_with("[limits]\nmax_builds_per_user = 1\n", &[]);
    limited.import_busybox();
    let ws = limited.workspace("ws", &[]);
    let first = limited.spawn_client(&ws, &["build", "--json", "--", "/bin/sh", "-c", "sleep 30"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while limited
        .amidala(&["list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first build never showed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = limited.amidala_in(&ws, &["build", "--", "true"]);
    assert_eq!(second.code, Some(4), "{}", second.stderr);
    assert!(second.stderr.contains("limit"), "{}", second.stderr);
    // validate says so too: the build would be refused.
    let validated = limited.amidala_in(&ws, &["validate", "--", "true"]);
    assert_eq!(validated.code, Some(4), "{}", validated.stderr);
    // Cancelling the first: the client that waited for it exits 130.
    let id = field(&limited.amidala(&["list", "--json"]).json()[0], "id").to_owned();
    limited.amidala(&["cancel", &id]).ok();
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let failure: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(failure["code"], "cancelled");
    limited.assert_no_leaks();
    env.assert_no_leaks();
}

/// Runs the client in a pseudo-terminal (util-linux `script`), as a person would, and returns
/// what the terminal received.
fn on_a_terminal(env: &Env, cwd: &std::path::Path, args: &str, vars: &[(&str, &str)]) -> String {
    let client = amidala_tests::bin_dir().join("amidala");
    let mut cmd = Command::new("script");
    cmd.current_dir(cwd)
        .env("AMIDALA_SOCKET", &env.socket)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .args([
            "-qefc",
            &format!("{} {args}", client.display()),
            "/dev/null",
        ]);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    run(&mut cmd).ok().to_owned()
}

#[test]
fn progress_on_a_terminal_plain_lines_off_it_and_quiet() {
    require_root();
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let script = "-- /bin/sh -c 'echo line-one; sleep 0.5; echo line-two'";

    // A terminal: each phase done with its time, the output, a spinner, colour.
    let tty = on_a_terminal(&env, &ws, &format!("build {script}"), &[]);
    for phase in amidala_tests::PHASES {
        assert!(
            tty.contains(&format!("✓\x1b[0m {phase:<10} ")),
            "{phase} done, in colour:\n{tty:?}"
        );
    }
    assert!(
        tty.contains("line-one") && tty.contains("line-two"),
        "{tty:?}"
    );
    assert!(tty.contains("made image ami-"), "{tty:?}");
    assert!(
        ['⠋', '⠙', '⠹'].iter().any(|c| tty.contains(*c)),
        "a spinner:\n{tty:?}"
    );
    assert!(!tty.contains("==> "), "{tty:?}");
    // NO_COLOR: the same without escapes of colour.
    let plain_tty = on_a_terminal(&env, &ws, &format!("build {script}"), &[("NO_COLOR", "1")]);
    assert!(plain_tty.contains("✓ provision  "), "{plain_tty:?}");
    assert!(!plain_tty.contains("\x1b[32m"), "{plain_tty:?}");

    // Not a terminal: plain lines a script can match.
    let run = env.amidala_in(&ws, &["build", "--", "/bin/sh", "-c", "echo line-one"]);
    run.ok();
    assert!(
        run.stderr.contains("==> provision\nline-one\n"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains('\x1b'), "{:?}", run.stderr);

    // --quiet: the image id on stdout, nothing on stderr.
    let run = env.amidala_in(
        &ws,
        &["build", "--quiet", "--", "/bin/sh", "-c", "echo line-one"],
    );
    assert!(run.ok().trim().starts_with("ami-"), "{}", run.stdout);
    assert_eq!(run.stderr, "");
    env.assert_no_leaks();
}
