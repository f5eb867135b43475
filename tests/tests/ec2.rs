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

/// What a Debian guest's serial console shows up to its login prompt.
const BOOTED: &str = "[    0.000000] Linux version 6.1.0-50-cloud-amd64\n\
    [    1.020000] Run /init as init process\n\
    Welcome to Debian GNU/Linux 12 (bookworm)!\n\
    \n\
    Debian GNU/Linux 12 debian ttyS0\n\
    \n\
    debian login: ";

/// The build id a failed build's client printed.
fn build_of(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("amidala: build ")
                .and_then(|r| r.strip_suffix(" accepted"))
        })
        .unwrap_or_else(|| panic!("no build id in {stderr}"))
        .to_owned()
}

/// Tags of an EC2 resource listing.
fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> std::collections::BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The snapshot build `build` made, with its tags.
fn snapshot_of(
    ec2: &Ec2Emulator,
    build: &str,
) -> (String, std::collections::BTreeMap<String, String>) {
    let out = ec2
        .runtime
        .block_on(
            ec2.client(REGION)
                .describe_snapshots()
                .owner_ids("self")
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:amidala:build")
                        .values(build)
                        .build(),
                )
                .send(),
        )
        .unwrap();
    let snapshot = &out.snapshots()[0];
    (
        snapshot.snapshot_id().unwrap().to_owned(),
        tag_map(snapshot.tags()),
    )
}

/// The boot test's calls from its RunInstances on, repeats folded: what the build asked EC2
/// in which order.
fn boot_calls(order: &[String]) -> Vec<&str> {
    let from = order
        .iter()
        .position(|a| a == "RunInstances")
        .expect("a RunInstances");
    let mut folded: Vec<&str> = Vec::new();
    for action in &order[from..] {
        if [
            "RunInstances",
            "DescribeInstances",
            "DescribeInstanceStatus",
            "GetConsoleOutput",
            "TerminateInstances",
        ]
        .contains(&action.as_str())
            && folded.last() != Some(&action.as_str())
        {
            folded.push(action);
        }
    }
    folded
}

#[test]
fn ec2_boot_test_boots_an_instance_of_the_image_and_always_terminates_it() {
    let ec2 = Ec2Emulator::start();
    let env = start(&ec2, "loop", "");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);

    // EC2 boots an AMI with its own boot mode only: a firmware it is not registered for is
    // refused before anything is made.
    let launches = ec2.calls("RunInstances");
    let refused = env.amidala_in(
        &ws,
        &[
            "build",
            "--boot-test",
            "--boot-firmware",
            "uefi",
            "--boot-mode",
            "legacy-bios",
            "--",
            "/bin/true",
        ],
    );
    let stderr = refused.err();
    assert!(
        stderr.contains(
            "--boot-firmware uefi: on EC2 an image boots only with the firmware of its boot mode"
        ) && stderr.contains("--boot-mode uefi"),
        "{stderr}"
    );
    assert_eq!(ec2.calls("RunInstances"), launches, "nothing started");
    assert!(
        ec2.calls("CreateVolume") == 1,
        "only the import's volume was made"
    );

    // A guest that boots slowly, as on EC2: pending, then status checks initializing, the
    // console's lines coming over two seconds; RunInstances' first answer is lost (the SDK
    // retries with the same client token).
    ec2.configure(json!({
        "instance_pending_secs": 1.5,
        "instance_status_initializing_secs": 1.5,
        "instance_shutting_down_secs": 1,
        "console_output": BOOTED,
        "console_reveal_secs": 2,
        "lose": {"RunInstances": 1},
    }));
    let before = ec2.order().len();
    let result = env.build(
        &ws,
        &["--boot-test", "--boot-firmware", "bios", "--", "/bin/true"],
    );
    let (build, image, snapshot) = (
        field(&result, "build_id"),
        field(&result, "image_id"),
        field(&result, "snapshot_id"),
    );
    let order = ec2.order()[before..].to_vec();

    // Passed: the image says so, the snapshot is a source again.
    let out = ec2
        .runtime
        .block_on(ec2.client(REGION).describe_images().image_ids(image).send())
        .unwrap();
    let tags = tag_map(out.images()[0].tags());
    assert_eq!(tags["amidala:boot-test"], "passed", "{tags:?}");
    let detail = &tags["amidala:boot-test-detail"];
    assert!(
        detail.starts_with("ec2 t3.micro bios ") && detail.ends_with('s'),
        "{detail}"
    );
    assert!(
        !ec2.snapshot_tags(snapshot)
            .contains_key("amidala:failed-build"),
        "{:?}",
        ec2.snapshot_tags(snapshot)
    );

    // One instance (the lost answer's retry started none), as asked for, terminated.
    let instances = ec2.boot_instances_of(build);
    assert_eq!(instances.len(), 1, "{instances:?}");
    let instance = &instances[0];
    let id = instance.instance_id().unwrap();
    assert_eq!(ec2.instance_state(id), "terminated");
    assert_eq!(instance.image_id(), Some(image));
    assert_eq!(instance.instance_type().unwrap().as_str(), "t3.micro");
    assert_eq!(
        instance
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required")
    );
    let itags = tag_map(instance.tags());
    assert_eq!(itags["amidala:role"], "boot-test");
    assert_eq!(itags["amidala:owner"], "root");
    assert_eq!(
        itags["amidala:host"], ec2.instance_id,
        "the builder's instance id"
    );
    let client = ec2.client(REGION);
    let builder = ec2
        .runtime
        .block_on(
            client
                .describe_instances()
                .instance_ids(&ec2.instance_id)
                .send(),
        )
        .unwrap();
    let builder_subnet = builder.reservations()[0].instances()[0]
        .subnet_id()
        .unwrap()
        .to_owned();
    assert_eq!(instance.subnet_id(), Some(builder_subnet.as_str()));
    let shutdown = ec2
        .runtime
        .block_on(
            client
                .describe_instance_attribute()
                .instance_id(id)
                .attribute(
                    aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior,
                )
                .send(),
        )
        .unwrap();
    assert_eq!(
        shutdown
            .instance_initiated_shutdown_behavior()
            .and_then(|v| v.value()),
        Some("terminate")
    );
    // Its security group: this host's, without any rule in or out.
    let groups: Vec<String> = instance
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let group = ec2
        .runtime
        .block_on(
            client
                .describe_security_groups()
                .group_ids(&groups[0])
                .send(),
        )
        .unwrap();
    let group = &group.security_groups()[0];
    assert_eq!(
        group.group_name().unwrap(),
        format!("amidala-boot-test-{}", ec2.instance_id),
        "{group:?}"
    );
    assert!(group.ip_permissions().is_empty(), "{group:?}");
    assert!(group.ip_permissions_egress().is_empty(), "{group:?}");

    // The calls, in order: started, running awaited, status checks and console polled,
    // terminated, terminated awaited.
    let calls = boot_calls(&order);
    assert_eq!(
        &calls[..4],
        [
            "RunInstances",
            "DescribeInstances",
            "DescribeInstanceStatus",
            "GetConsoleOutput"
        ],
        "{order:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| **c == "TerminateInstances").count(),
        1,
        "{order:?}"
    );
    let terminate = calls
        .iter()
        .position(|c| *c == "TerminateInstances")
        .unwrap();
    assert!(calls[..terminate].contains(&"GetConsoleOutput"));
    assert!(
        calls[terminate + 1..]
            .iter()
            .all(|c| *c == "DescribeInstances")
            && calls.len() > terminate + 1,
        "terminated awaited: {order:?}"
    );
    let ran = order
        .iter()
        .position(|a| a == "DescribeInstanceStatus")
        .unwrap();
    let run = order.iter().position(|a| a == "RunInstances").unwrap();
    assert!(
        order[run..ran]
            .iter()
            .filter(|a| *a == "DescribeInstances")
            .count()
            >= 2,
        "pending was polled: {order:?}"
    );
    assert!(
        order
            .iter()
            .filter(|a| *a == "DescribeInstanceStatus")
            .count()
            >= 2,
        "initializing status checks were polled: {order:?}"
    );
    assert_eq!(
        order.iter().filter(|a| *a == "RunInstances").count(),
        2,
        "{order:?}"
    );

    // The console in the build's log, each line once.
    let log = env.amidala(&["logs", build]).ok().to_owned();
    for line in [
        "console: Welcome to Debian GNU/Linux 12 (bookworm)!",
        "console: debian login: ",
    ] {
        assert_eq!(log.matches(line).count(), 1, "{line:?} once in {log}");
    }
    assert!(
        log.contains(&format!("amidala: boot test: instance {id} terminated")),
        "{log}"
    );

    // `amidala boot-test` of the image: another instance, terminated; a snapshot is refused.
    let tested = env.amidala(&["boot-test", image, "--timeout", "60"]);
    assert!(
        tested
            .ok()
            .starts_with(&format!("{image} booted: ec2 t3.micro bios ")),
        "{}",
        tested.stderr
    );
    assert!(
        tested.stderr.contains("console: debian login: "),
        "{}",
        tested.stderr
    );
    let all = ec2.boot_instances();
    assert_eq!(all.len(), 2, "{all:?}");
    let refused = env.amidala(&["boot-test", snapshot]);
    assert!(
        refused
            .err()
            .contains("on EC2 an image boots, not a snapshot"),
        "{}",
        refused.stderr
    );
    assert_eq!(ec2.boot_instances().len(), 2);
    // The host's security group was made once and found again.
    let named = ec2
        .runtime
        .block_on(
            client
                .describe_security_groups()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("group-name")
                        .values(group.group_name().unwrap())
                        .build(),
                )
                .send(),
        )
        .unwrap();
    assert_eq!(named.security_groups().len(), 1);
    assert!(all
        .iter()
        .all(|i| i.security_groups()[0].group_id() == Some(groups[0].as_str())));
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_boot_test_that_fails_deregisters_the_image_and_keeps_the_snapshot() {
    let ec2 = Ec2Emulator::start();
    let env = start(&ec2, "loop", "");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    ec2.configure(json!({
        "console_output": "[    0.000000] Linux version 6.1.0\n[    1.500000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n",
    }));
    let failed = env.amidala_in(
        &ws,
        &[
            "build",
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--",
            "/bin/true",
        ],
    );
    let stderr = failed.err();
    let build = build_of(stderr);
    assert!(
        stderr.contains("boot test (ec2 t3.micro, bios) failed: the kernel panicked")
            && stderr.contains("  [    1.500000] Kernel panic - not syncing: VFS")
            && stderr.contains("was deregistered"),
        "{stderr}"
    );
    let status = env.amidala(&["status", "--json", &build]).json();
    assert_eq!(status["error"]["phase"], "boot_test", "{status}");
    assert_eq!(status["error"]["code"], "boot_test_failed", "{status}");
    assert_eq!(ec2.images_of(&build), Vec::<String>::new(), "deregistered");
    let (snapshot, tags) = snapshot_of(&ec2, &build);
    assert_eq!(tags["amidala:failed-build"], build, "{snapshot}: {tags:?}");
    let instances = ec2.boot_instances_of(&build);
    assert_eq!(instances.len(), 1);
    assert_eq!(
        ec2.instance_state(instances[0].instance_id().unwrap()),
        "terminated"
    );
    ec2.assert_no_leaks();

    // An instance that does not start: the image goes all the same.
    ec2.configure(json!({
        "console_output": BOOTED,
        "fail": {"RunInstances": {"code": "InsufficientInstanceCapacity", "message": "emulated: no t3.micro"}},
    }));
    let failed = env.amidala_in(
        &ws,
        &[
            "build",
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--",
            "/bin/true",
        ],
    );
    let stderr = failed.err();
    let build = build_of(stderr);
    assert!(
        stderr.contains("RunInstances: InsufficientInstanceCapacity: emulated: no t3.micro")
            && stderr.contains("was deregistered"),
        "{stderr}"
    );
    assert_eq!(ec2.images_of(&build), Vec::<String>::new());
    assert_eq!(snapshot_of(&ec2, &build).1["amidala:failed-build"], build);
    ec2.configure(json!({"fail": {}}));

    // A guest that never shows a sign: the time limit, with what the console showed.
    ec2.configure(
        json!({"console_output": "[    0.000000] Linux version 6.1.0\nstill starting\n"}),
    );
    let failed = env.amidala_in(
        &ws,
        &[
            "build",
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--boot-timeout",
            "10",
            "--",
            "/bin/true",
        ],
    );
    let stderr = failed.err();
    assert!(
        stderr.contains("no boot signal within 10 s; the console's last lines:")
            && stderr.contains("  still starting"),
        "{stderr}"
    );
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_boot_test_instance_is_terminated_on_cancel_ctrl_c_and_after_a_crash() {
    let ec2 = Ec2Emulator::start();
    let mut env = start(&ec2, "loop", "");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // A guest that shows nothing: the test waits until it is stopped.
    ec2.configure(json!({"console_output": "", "instance_shutting_down_secs": 1}));
    let args = [
        "build",
        "--boot-test",
        "--boot-firmware",
        "bios",
        "--",
        "/bin/true",
    ];

    // amidala cancel.
    let client = env
        .amidala_command(&ws, &args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let build = env.build_in_phase("boot_test");
    let instance = ec2.running_boot_instance(&build, 60);
    env.amidala(&["cancel", &build]).ok();
    let out = client.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cancelled"),
        "{stderr}"
    );
    assert_eq!(ec2.instance_state(&instance), "terminated", "{stderr}");
    assert_eq!(
        env.amidala(&["status", "--json", &build]).json()["state"],
        "cancelled"
    );
    assert_eq!(ec2.images_of(&build), Vec::<String>::new());
    assert_eq!(snapshot_of(&ec2, &build).1["amidala:failed-build"], build);
    ec2.assert_no_leaks();

    // Ctrl-C of the client.
    let client = env.spawn_client(&ws, &args);
    let build = env.build_in_phase("boot_test");
    let instance = ec2.running_boot_instance(&build, 60);
    let (code, stderr) = amidala_tests::interrupt(client);
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(ec2.instance_state(&instance), "terminated", "{stderr}");
    assert_eq!(ec2.images_of(&build), Vec::<String>::new());
    ec2.assert_no_leaks();

    // kill -9 of the daemon while the instance runs: recovery terminates it at the restart
    // and deregisters the untested image.
    let client = env.spawn_client(&ws, &args);
    let build = env.build_in_phase("boot_test");
    let instance = ec2.running_boot_instance(&build, 60);
    let image = ec2.images_of(&build);
    assert_eq!(image.len(), 1, "registered before it boots");
    env.kill9();
    let _ = client.wait_with_output();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        ec2.instance_state(&instance),
        "running",
        "the kill left it running"
    );
    env.restart();
    // Answered once recovery is over.
    let status = env.amidala(&["status", "--json", &build]).json();
    assert_eq!(ec2.instance_state(&instance), "terminated");
    assert_eq!(ec2.images_of(&build), Vec::<String>::new());
    assert_eq!(
        status["error"]["message"], "interrupted by daemon restart",
        "{status}"
    );
    assert_eq!(snapshot_of(&ec2, &build).1["amidala:failed-build"], build);
    assert!(
        env.daemon_log()
            .contains("recovery: deregistered the image of an interrupted boot test"),
        "{}",
        env.daemon_log()
    );
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

#[test]
fn ec2_gc_terminates_boot_test_instances_of_builds_that_are_not_running() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let ec2 = Ec2Emulator::start();
    let env = start(&ec2, "loop", "");
    // Answered once the daemon's recovery is over (which would take what follows for its own).
    let first = env.amidala(&["gc", "--dry-run", "--json"]).json();
    assert_eq!(first, json!([]), "{first}");
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // A build this daemon's catalog records.
    let failed = build_of(env.amidala_in(&ws, &["build", "--", "/bin/false"]).err());
    let client = ec2.client(REGION);
    // A boot test's instance of a build that is gone, as a crash leaves it, and one of another
    // builder's, which is not this daemon's to remove; and two that an older amidala tagged
    // with the host name: of a build of this daemon's (its own), and of a build it does not
    // know (perhaps of another builder with the same host name: left alone).
    let launch = |host: &str, build: &str| {
        let tags = |kind| {
            TagSpecification::builder()
                .resource_type(kind)
                .tags(Tag::builder().key("amidala:build").value(build).build())
                .tags(Tag::builder().key("amidala:host").value(host).build())
                .tags(
                    Tag::builder()
                        .key("amidala:role")
                        .value("boot-test")
                        .build(),
                )
                .build()
        };
        let out = ec2
            .runtime
            .block_on(
                client
                    .run_instances()
                    .image_id("ami-12345678")
                    .min_count(1)
                    .max_count(1)
                    .tag_specifications(tags(ResourceType::Instance))
                    .tag_specifications(tags(ResourceType::Volume))
                    .send(),
            )
            .unwrap();
        out.instances()[0].instance_id().unwrap().to_owned()
    };
    let dead = launch(&ec2.instance_id, "bld-00000000000000dead");
    let other = launch("i-0123456789abcdef0", "bld-00000000000000dead");
    let legacy_ours = launch(&host, &failed);
    let legacy_unknown = launch(&host, "bld-00000000000000dead");

    let listed = env.amidala(&["gc", "--dry-run", "--json"]).json();
    let items = listed.as_array().unwrap();
    let mut found: Vec<(&str, &str)> = items
        .iter()
        .filter(|i| i["kind"] == "instance")
        .map(|i| (i["id"].as_str().unwrap(), i["build"].as_str().unwrap()))
        .collect();
    found.sort();
    let mut expected = vec![
        (dead.as_str(), "bld-00000000000000dead"),
        (legacy_ours.as_str(), failed.as_str()),
    ];
    expected.sort();
    assert_eq!(found, expected, "{listed}");
    assert!(
        items.iter().any(|i| i["kind"] == "volume"
            && i["detail"]
                .as_str()
                .unwrap()
                .starts_with("root volume of a boot-test instance")),
        "its volume: {listed}"
    );
    assert_eq!(
        ec2.instance_state(&dead),
        "running",
        "a dry run removes nothing"
    );

    let removed = env.amidala(&["gc", "--json"]).json();
    assert!(
        removed
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["removed"] == true),
        "{removed}"
    );
    assert_eq!(ec2.instance_state(&dead), "terminated");
    assert_eq!(ec2.instance_state(&legacy_ours), "terminated");
    assert_eq!(
        ec2.instance_state(&other),
        "running",
        "another builder's is left alone"
    );
    assert_eq!(
        ec2.instance_state(&legacy_unknown),
        "running",
        "one tagged with the host name, of a build this daemon does not know, is left alone"
    );
    assert_eq!(
        ec2.instance_state(&ec2.instance_id),
        "running",
        "the builder is left alone"
    );
    let again = env.amidala(&["gc", "--dry-run", "--json"]).json();
    assert!(
        !again
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "instance"),
        "{again}"
    );
    ec2.runtime
        .block_on(
            client
                .terminate_instances()
                .instance_ids(&other)
                .instance_ids(&legacy_unknown)
                .send(),
        )
        .unwrap();
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

/// EC2's eventual consistency (issue 16): for a while after a create, calls naming the new id
/// answer NotFound. A build waits through it, tags on creation (no CreateTags on the new image
/// or its copy), and its undoing (a deleted volume, a tagged snapshot, a deregistered image)
/// is not lost to it.
#[test]
fn ec2_new_ids_that_ec2_does_not_know_yet_are_waited_for_and_undone() {
    let ec2 = Ec2Emulator::start();
    let env = start(
        &ec2,
        "loop",
        "[ec2.timeouts]\nvolume_available = 2\nsnapshot = 2\n",
    );
    ec2.configure(json!({"not_found_secs": {"volume": 1, "snapshot": 1, "image": 1}}));
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let tags_before = ec2.calls("CreateTags");
    let result = env.build(
        &ws,
        &[
            "--tag",
            "role=system",
            "--copy-to",
            "us-west-2",
            "--",
            "/bin/true",
        ],
    );
    let (build, image) = (field(&result, "build_id"), field(&result, "image_id"));
    assert_eq!(
        ec2.calls("CreateTags") - tags_before,
        0,
        "the image and its copy are tagged on creation"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let described = ec2
        .runtime
        .block_on(ec2.client(REGION).describe_images().image_ids(image).send())
        .unwrap();
    let tags = tag_map(described.images()[0].tags());
    assert_eq!(tags["role"], "system", "{tags:?}");
    assert_eq!(tags["amidala:build"], build, "{tags:?}");
    let copies = ec2
        .runtime
        .block_on(
            ec2.client("us-west-2")
                .describe_images()
                .owners("self")
                .send(),
        )
        .unwrap();
    assert!(
        copies.images().iter().any(|i| {
            let tags = tag_map(i.tags());
            tags.get("amidala:build").map(String::as_str) == Some(build)
                && tags.get("role").map(String::as_str) == Some("system")
        }),
        "the copy's tags: {copies:?}"
    );
    ec2.assert_no_leaks();

    // A volume that never becomes available and that EC2 does not know yet when the wait
    // gives up: its DeleteVolume is sent again until EC2 knows it.
    ec2.configure(json!({"volume_creating_secs": -1, "not_found_secs": {"volume": 4}}));
    let err = env.amidala_in(&ws, &["build", "--source", &base, "--", "/bin/true"]);
    let stderr = err.err();
    assert!(
        stderr.contains("failed in phase volume")
            && stderr.contains("timed out after 2s waiting for volume vol-"),
        "{stderr}"
    );
    ec2.configure(json!({"volume_creating_secs": 0, "not_found_secs": {}}));
    ec2.assert_no_leaks();

    // A snapshot that does not complete in time, unknown to EC2 a while longer: it is kept,
    // and its failed-build tag is not lost.
    ec2.configure(json!({"snapshot_pending_secs": -1, "not_found_secs": {"snapshot": 4}}));
    let err = env.amidala_in(&ws, &["build", "--source", &base, "--", "/bin/true"]);
    let stderr = err.err();
    let build = build_of(stderr);
    assert!(
        stderr.contains("failed in phase snapshot")
            && stderr.contains("timed out after 2s waiting for snapshot snap-"),
        "{stderr}"
    );
    ec2.configure(json!({"snapshot_pending_secs": 0, "not_found_secs": {}}));
    std::thread::sleep(std::time::Duration::from_secs(4));
    let (_, tags) = snapshot_of(&ec2, &build);
    assert_eq!(
        tags.get("amidala:failed-build"),
        Some(&build),
        "the failed build's snapshot is tagged: {tags:?}"
    );
    ec2.assert_no_leaks();

    // An image whose wait fails while EC2 does not know it yet: deregistered all the same.
    ec2.configure(json!({
        "not_found_secs": {"image": 3},
        // The first DescribeImages (the resolve phase's check of the image's name) passes.
        "fail": {"DescribeImages": {"code": "UnauthorizedOperation", "message": "emulated", "after": 1}},
    }));
    let err = env.amidala_in(&ws, &["build", "--source", &base, "--", "/bin/true"]);
    let stderr = err.err();
    let build = build_of(stderr);
    assert!(
        stderr.contains("failed in phase register") && stderr.contains("emulated"),
        "{stderr}"
    );
    ec2.configure(json!({"fail": {}, "not_found_secs": {}}));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(ec2.images_of(&build), Vec::<String>::new(), "image left");
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

/// Two builders with the same host name (one image for the fleet) share an account: neither
/// takes the other's live volume for its own (issue 16). Resources carry the builder's
/// instance id in `amidala:host`. A cleanup's DeleteVolume answered NotFound is done.
#[test]
fn ec2_builders_with_one_host_name_leave_each_others_volumes_alone() {
    let ec2 = Ec2Emulator::start();
    let a = start(&ec2, "loop", "");
    a.import_busybox();
    // A second builder instance, its daemon on this same host (so with the same host name).
    let other = ec2.launch_builder();
    let b = Env::start_with(
        &ec2.daemon_config("loop", "")
            .replace(&ec2.instance_id, &other),
        &AWS_ENV,
    );
    let ws = a.workspace("ws", &[]);
    let client = a.spawn_build_sh(&ws, "while [ ! -e /workspace/go ]; do sleep 0.1; done");
    let build = a.build_in_phase("provision");
    let volumes = ec2.amidala_volumes();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let out = ec2
        .runtime
        .block_on(
            ec2.client(REGION)
                .describe_volumes()
                .volume_ids(&volumes[0].0)
                .send(),
        )
        .unwrap();
    let tags = tag_map(out.volumes()[0].tags());
    assert_eq!(tags["amidala:build"], build);
    assert_eq!(
        tags["amidala:host"], ec2.instance_id,
        "tagged with the builder's instance id"
    );

    let listed = b.amidala(&["gc", "--json"]).json();
    assert_eq!(
        listed,
        json!([]),
        "the other builder's gc took what is not its own"
    );
    // The answer of its DeleteVolume is lost and the SDK sends it again: EC2's NotFound for
    // the volume it just deleted means done, not a failed cleanup.
    ec2.configure(json!({"lose": {"DeleteVolume": 1}}));
    let deletes = ec2.calls("DeleteVolume");
    std::fs::write(ws.join("go"), "").unwrap();
    let out = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ec2.calls("DeleteVolume") - deletes,
        2,
        "the lost DeleteVolume was sent again"
    );
    ec2.assert_no_leaks();
    a.assert_no_leaks();
    b.assert_no_leaks();
}

/// A daemon killed right after CreateVolume knows nothing of the volume when it starts again,
/// and EC2 may still answer NotFound for it: recovery, which found it by its tags, deletes it
/// once EC2 knows it rather than taking the NotFound for "gone" (issue 16).
#[test]
fn ec2_a_volume_ec2_does_not_know_yet_is_deleted_by_recovery_after_a_crash() {
    let ec2 = Ec2Emulator::start();
    let mut env = start(&ec2, "loop", "");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    ec2.configure(json!({"volume_creating_secs": -1, "not_found_secs": {"volume": 6}}));
    let creates = ec2.calls("CreateVolume");
    let client = env.spawn_build_sh(&ws, "true");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ec2.calls("CreateVolume") == creates {
        assert!(std::time::Instant::now() < deadline, "no CreateVolume");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    env.kill9();
    drop(client.wait_with_output());
    ec2.configure(json!({"volume_creating_secs": 0}));
    let volumes = ec2.amidala_volumes();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    env.restart();
    // The NotFound window is over: what EC2 still holds was left behind.
    let left = std::time::Instant::now() + std::time::Duration::from_secs(7);
    while std::time::Instant::now() < left {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}
