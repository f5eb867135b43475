//! The ec2 provider through the real daemon and client (root), every EC2 call made for real
//! against moto server, with the loop data plane keyed by EC2 ids so image contents can be
//! checked. tests/ec2_proxy.py adds what moto does not model: state delays, throttling, errors.

use amidala_tests::{field, Ec2Emulator, Env, Mounted, AWS_ENV, REGION};
use serde_json::json;

fn start(emulator: &Ec2Emulator, data_plane: &str, extra: &str) -> Env {
    Env::start_with(&emulator.daemon_config(data_plane, extra), &AWS_ENV)
}

#[test]
fn ec2_build_registers_an_image_holding_what_the_provisioner_wrote() {
    let ec2 = Ec2Emulator::start();
    let env = start(&ec2, "loop", "");
    let base = env.import_busybox();
    assert_eq!(ec2.snapshot_tags(&base)["amidala"], "base");
    ec2.assert_no_leaks();

    let ws = env.workspace("ws", &[("input.txt", "from the workspace\n")]);
    let result = env.build(
        &ws,
        &[
            "--name",
            "system {date} {build}",
            "--tag",
            "role=system",
            "--snapshot-tag",
            "amidala=system",
            "--copy-to",
            "us-west-2,eu-west-1",
            "--share-with",
            "123456789012",
            "--",
            "/bin/sh",
            "-c",
            "cp /workspace/input.txt /root/copied.txt; echo ec2 > /root/built.txt",
        ],
    );
    let (build, image, snapshot) = (
        field(&result, "build_id"),
        field(&result, "image_id"),
        field(&result, "snapshot_id"),
    );
    ec2.assert_no_leaks();

    // The EC2 side: the image, its tags, its launch permission, its copies; the snapshot's tags.
    let client = ec2.client(REGION);
    let images = ec2
        .runtime
        .block_on(client.describe_images().image_ids(image).send())
        .unwrap();
    let ami = &images.images()[0];
    assert!(
        ami.name().unwrap().starts_with("system ") && ami.name().unwrap().ends_with(build),
        "{:?}",
        ami.name()
    );
    let tags: std::collections::BTreeMap<_, _> = ami
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags["role"], "system");
    assert_eq!(tags["amidala:build"], build);
    assert_eq!(tags["amidala:snapshot"], snapshot);
    assert_eq!(tags["amidala:owner"], "root");
    let permission = ec2
        .runtime
        .block_on(
            client
                .describe_image_attribute()
                .image_id(image)
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send(),
        )
        .unwrap();
    assert!(
        permission
            .launch_permissions()
            .iter()
            .any(|p| p.user_id() == Some("123456789012")),
        "{permission:?}"
    );
    for region in ["us-west-2", "eu-west-1"] {
        let copies = ec2
            .runtime
            .block_on(ec2.client(region).describe_images().owners("self").send())
            .unwrap();
        let copy = copies
            .images()
            .iter()
            .find(|i| i.name() == ami.name())
            .unwrap_or_else(|| panic!("no copy in {region}"));
        assert!(
            copy.tags()
                .iter()
                .any(|t| t.key() == Some("amidala:build") && t.value() == Some(build)),
            "tags copied to {region}"
        );
    }
    let snap_tags = ec2.snapshot_tags(snapshot);
    assert_eq!(snap_tags["amidala"], "system");
    assert_eq!(snap_tags["amidala:build"], build);
    assert_eq!(snap_tags["amidala:source-snapshot"], base);
    assert_eq!(snap_tags["amidala:provisioner"], "shell");
    assert_eq!(snap_tags["amidala:owner"], "root");

    // The content, through the loop data plane's copy of the snapshot.
    let out = Mounted::new(
        &env.state
            .join("ec2-loop/snapshots")
            .join(format!("{snapshot}.img")),
        0,
    );
    assert_eq!(out.read("/root/copied.txt"), "from the workspace\n");
    assert_eq!(out.read("/root/built.txt"), "ec2\n");
    assert!(!out.exists("/usr/sbin/policy-rc.d") && !out.exists("/workspace"));
    drop(out);

    // Listings come from EC2; layering picks the output up by its tag.
    let listed = env.amidala(&["images", "--json"]).json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == image && i["snapshot_id"] == snapshot),
        "{listed}"
    );
    let listed = env.amidala(&["snapshots", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let app = env.build(
        &ws,
        &[
            "--from",
            "amidala=system",
            "--",
            "/bin/sh",
            "-c",
            "test -f /root/built.txt",
        ],
    );
    assert_eq!(
        ec2.snapshot_tags(field(&app, "snapshot_id"))["amidala:source-snapshot"],
        snapshot
    );
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_waits_through_state_delays_and_throttling() {
    let ec2 = Ec2Emulator::start();
    let env = start(&ec2, "loop", "");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    ec2.configure(json!({
        "volume_creating_secs": 1.5,
        "snapshot_pending_secs": 1.5,
        "throttle": {"CreateVolume": 2, "DescribeSnapshots": 2},
    }));
    let (creates, polls) = (ec2.calls("CreateVolume"), ec2.calls("DescribeVolumes"));
    let before = ec2.total_calls();
    let result = env.build(&ws, &["--", "/bin/true"]);
    assert!(result["image_id"].is_string());
    // The build counts every request it sent, retries included, as EC2 saw them.
    let sent = ec2.total_calls() - before;
    let log = env
        .amidala(&["logs", field(&result, "build_id")])
        .ok()
        .to_owned();
    assert!(
        log.contains(&format!("amidala: {sent} EC2 requests")),
        "{sent} requests: {log}"
    );
    assert_eq!(
        ec2.calls("CreateVolume") - creates,
        3,
        "two throttled CreateVolume calls were retried"
    );
    assert!(
        ec2.calls("DescribeVolumes") - polls > 3,
        "the creating volume was polled until available"
    );
    ec2.configure(json!({"volume_creating_secs": 0, "snapshot_pending_secs": 0}));
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_failures_clean_up_after_themselves() {
    let ec2 = Ec2Emulator::start();
    let env = start(
        &ec2,
        "loop",
        "[ec2.timeouts]\nvolume_available = 2\nsnapshot = 2\n",
    );
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[]);

    // No snapshot with the tag.
    let err = env.amidala_in(&ws, &["build", "--from", "nosuch=tag", "--", "/bin/true"]);
    assert!(
        err.err().contains("failed in phase resolve") && err.stderr.contains("tagged nosuch=tag"),
        "{}",
        err.stderr
    );
    ec2.assert_no_leaks();

    // A snapshot that is not completed yet.
    ec2.configure(json!({"snapshot_pending_secs": -1}));
    let pending = ec2.make_snapshot(&[]);
    let err = env.amidala_in(&ws, &["build", "--source", &pending, "--", "/bin/true"]);
    assert!(
        err.err()
            .contains(&format!("snapshot {pending} is pending, not completed")),
        "{}",
        err.stderr
    );
    ec2.configure(json!({"snapshot_pending_secs": 0}));
    ec2.assert_no_leaks();

    // A volume that never becomes available: the deadline passes, the volume is deleted.
    ec2.configure(json!({"volume_creating_secs": -1}));
    let err = env.amidala_in(&ws, &["build", "--source", &base, "--", "/bin/true"]);
    let stderr = err.err();
    assert!(
        stderr.contains("failed in phase volume")
            && stderr.contains("timed out after 2s waiting for volume vol-")
            && stderr.contains("to become available"),
        "{stderr}"
    );
    ec2.configure(json!({"volume_creating_secs": 0}));
    ec2.assert_no_leaks();

    // RegisterImage fails after the snapshot: the snapshot stays, tagged, and the error says so.
    ec2.configure(json!({"fail": {"RegisterImage": {"code": "InvalidParameterValue", "message": "emulated failure"}}}));
    let err = env.amidala_in(&ws, &["build", "--source", &base, "--", "/bin/true"]);
    let stderr = err.err();
    assert!(
        stderr.contains("failed in phase register")
            && stderr.contains("InvalidParameterValue: emulated failure"),
        "{stderr}"
    );
    let kept = stderr
        .split("snapshot ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .filter(|s| s.starts_with("snap-"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let build = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("amidala: build ")
                .and_then(|r| r.strip_suffix(" accepted"))
        })
        .unwrap();
    assert_eq!(ec2.snapshot_tags(kept)["amidala:build"], build);
    ec2.configure(json!({"fail": {}}));
    ec2.assert_no_leaks();

    // And the daemon still builds.
    assert!(env.build(&ws, &["--source", &base, "--", "/bin/true"])["image_id"].is_string());
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_device_that_never_appears_is_detached_and_deleted() {
    let ec2 = Ec2Emulator::start();
    // The ebs data plane against an emulator: AttachVolume succeeds, no device ever appears.
    let env = start(
        &ec2,
        "ebs",
        "device_names = [\"/dev/sdw\"]\n[ec2.timeouts]\ndevice = 2\n",
    );
    // Made outside amidala, so no user's: builds start from it by tag once it is published.
    let snapshot = ec2.make_snapshot(&[("amidala", "base"), ("amidala:published", "true")]);
    let ws = env.workspace("ws", &[]);
    let err = env.amidala_in(&ws, &["build", "--", "/bin/true"]);
    let stderr = err.err();
    assert!(
        stderr.contains("failed in phase attach")
            && stderr.contains("waiting for the block device of volume vol-")
            && stderr.contains("(/dev/sdw) to appear"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&snapshot),
        "started from the tagged snapshot: {stderr}"
    );
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_off_ec2_without_settings_says_which_to_set() {
    let ec2 = Ec2Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("amidalad.toml");
    std::fs::write(
        &config,
        format!(
            "provider = \"ec2\"\n[ec2]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\n",
            ec2.endpoint
        ),
    )
    .unwrap();
    let out = amidala_tests::run(
        std::process::Command::new(amidala_tests::bin_dir().join("amidalad"))
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .envs(AWS_ENV)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9"),
    );
    let err = out.err();
    assert!(
        err.contains("instance metadata")
            && err.contains("set instance_id and availability_zone in the [ec2] section"),
        "{err}"
    );
}
