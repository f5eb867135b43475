//! Provisioner plugins: loading and refusing them, an out-of-tree plugin in a real build, and
//! plugin faults that fail only their own build (root, real daemon and client).

use amidala_tests::{field, Env, Mounted};

const PROBE: &str = "libamidala_test_probe.so";

/// The arguments of a build by the probe provisioner with `marker=x` and `option`.
fn probe_build(option: &str) -> [&str; 7] {
    [
        "build",
        "--provisioner",
        "probe",
        "--opt",
        "marker=x",
        "--opt",
        option,
    ]
}

#[test]
fn an_out_of_tree_plugin_is_listed_and_runs_in_a_build() {
    let env = Env::start_full("", &[], &[(PROBE, "probe.so", 0o644)]);
    let plugins = env.amidala(&["plugins", "--json"]).json();
    let probe = plugins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "probe")
        .expect("probe loaded");
    assert_eq!(
        probe["options"][0],
        serde_json::json!({"name": "marker", "description": "text written into /root/probe", "required": true})
    );
    let help = env.amidala(&["build", "--provisioner", "probe", "--help-options"]);
    assert!(
        help.ok().contains("--opt marker=... (required)"),
        "{}",
        help.stdout
    );

    let base = env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let spec = env.dir.path().join("spec.toml");
    std::fs::write(&spec, "[provisioner]\nname = \"probe\"\n[provisioner.options]\nmarker = \"from the spec\"\nmode = \"ok\"\n").unwrap();
    let run = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--spec",
            spec.to_str().unwrap(),
            "--opt",
            "marker=from the flag",
            "--name",
            "probe-{build}",
            "--",
            "ignored",
        ],
    );
    let result = run.json();
    assert!(
        run.stderr.contains("probe wrote /root/probe"),
        "{}",
        run.stderr
    );
    let build = field(&result, "build_id");
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    let probe = out.read("/root/probe");
    for line in [
        "marker=from the flag".to_owned(),
        format!("build={build}"),
        format!("source={base}"),
        format!("image=probe-{build}"),
        "workspace=/workspace".to_owned(),
        "cwd=/workspace".to_owned(),
        format!("env AMIDALA_BUILD_ID={build}"),
        format!("env AMIDALA_SOURCE_SNAPSHOT={base}"),
        "env AMIDALA_WORKSPACE=/workspace".to_owned(),
    ] {
        assert!(probe.lines().any(|l| l == line), "{line:?} in:\n{probe}");
    }
    assert!(
        !probe.contains("RUST_LOG"),
        "the daemon's environment does not reach the plugin:\n{probe}"
    );

    let bad_spec = env.dir.path().join("bad.toml");
    std::fs::write(
        &bad_spec,
        "[provisioner]\nname = \"probe\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let refused = env.amidala_in(&ws, &["build", "--spec", bad_spec.to_str().unwrap()]);
    assert!(
        refused.err().contains("unknown field `colour`") && refused.stderr.contains("line 3"),
        "{}",
        refused.stderr
    );
    drop(out);
    env.assert_no_leaks();
}

#[test]
fn untrusted_mismatched_and_duplicate_plugins_are_refused_with_reasons() {
    let env = Env::start_full(
        "",
        &[],
        &[
            ("libamidala_test_old_abi.so", "old-abi.so", 0o644),
            (PROBE, "probe-group-writable.so", 0o664),
            ("libamidala_shell.so", "zz-second-shell.so", 0o644),
        ],
    );
    let plugins = env.amidala(&["plugins", "--json"]).json();
    let names: Vec<&str> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["shell"],
        "only the trusted, matching, first shell plugin"
    );
    let paths: Vec<&str> = plugins
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(paths[0].ends_with("/libamidala_shell.so"), "{paths:?}");
    let log = env.daemon_log();
    assert!(
        log.contains("old-abi.so: plugin speaks ABI version 99, amidalad speaks 1"),
        "{log}"
    );
    assert!(
        log.contains("probe-group-writable.so: writable by group or others (mode 664)"),
        "{log}"
    );
    assert!(
        log.contains("a plugin of that name is already loaded"),
        "{log}"
    );
}

#[test]
fn invalid_options_fail_before_any_resource_exists() {
    let env = Env::start_full("", &[], &[(PROBE, "probe.so", 0o644)]);
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let unknown = env.amidala_in(&ws, &probe_build("colour=red"));
    assert!(
        unknown
            .err()
            .contains("provisioner probe: unknown option \"colour\" (known: marker, mode)"),
        "{}",
        unknown.stderr
    );
    let missing = env.amidala_in(&ws, &["build", "--provisioner", "probe"]);
    assert!(
        missing.err().contains("option \"marker\" is required"),
        "{}",
        missing.stderr
    );
    let shell_option = env.amidala_in(&ws, &["build", "--opt", "colour=red", "--", "true"]);
    assert!(
        shell_option
            .err()
            .contains("provisioner shell: unknown option \"colour\""),
        "{}",
        shell_option.stderr
    );
    // Refused before the build existed: no build, no volume, no snapshot beyond the base.
    assert_eq!(
        env.amidala(&["list", "--json"]).json(),
        serde_json::json!([])
    );
    assert_eq!(
        env.amidala(&["snapshots", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    env.assert_no_leaks();
}

#[test]
fn plugin_faults_fail_only_their_own_build() {
    let env = Env::start_full("", &[], &[(PROBE, "probe.so", 0o644)]);
    env.import_busybox();
    let ws = env.workspace("ws", &[]);

    // A build that runs while the faulty ones fail.
    let good = env.spawn_build_sh(&ws, "sleep 2; echo fine > /root/fine");
    let faulty: Vec<_> = ["panic", "segfault", "abort"]
        .iter()
        .map(|mode| {
            let child = env.spawn_client(&ws, &probe_build(&format!("mode={mode}")));
            (mode, child)
        })
        .collect();
    for (mode, child) in faulty {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode}: {err}");
        let expected = match *mode {
            "panic" => "provisioner failed: provisioner panicked: probe panics while provisioning",
            "segfault" => "provisioner was killed by signal 11",
            _ => "provisioner was killed by signal 6",
        };
        assert!(
            err.contains("failed in phase provision") && err.contains(expected),
            "{mode}: {err}"
        );
    }
    // Faults while validating: refused before any resource, the daemon unharmed.
    for (mode, expected) in [
        (
            "validate-panic",
            "provisioner panicked: probe panics while validating",
        ),
        (
            "validate-segfault",
            "provisioner probe crashed while validating the build",
        ),
    ] {
        let out = env.amidala_in(&ws, &probe_build(&format!("mode={mode}")));
        assert!(out.err().contains(expected), "{mode}: {}", out.stderr);
    }
    let out = good.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(image.read("/root/fine"), "fine\n");
    drop(image);
    env.amidala(&["list"]).ok();
    env.assert_no_leaks();
}
