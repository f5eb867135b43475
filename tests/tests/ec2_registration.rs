//! What a build's snapshot and image may be, on EC2 (moto behind tests/ec2_proxy.py): a
//! snapshot is taken as a source by its tags only once the build that made it has succeeded,
//! and an image name EC2 would refuse is refused before anything is made.

use amidala_tests::{field, Ec2Emulator, Env, AWS_ENV};
use serde_json::json;

/// Issue 16, point 7: a build's snapshot carries its tags from its creation (EC2 tags it as it
/// is made), so until the build has registered its image it is marked as not (yet) a
/// successful build's (`amidala:failed-build`), and a build started meanwhile with `--from`
/// those tags takes the older snapshot.
#[test]
fn ec2_a_snapshot_is_a_source_only_once_its_build_has_succeeded() {
    let ec2 = Ec2Emulator::start();
    let env = Env::start_with(&ec2.daemon_config("loop", ""), &AWS_ENV);
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // RegisterImage held back: the first build's snapshot exists, its image not yet.
    ec2.configure(json!({"latency": {"RegisterImage": 8}}));
    let first = env.spawn_client(
        &ws,
        &[
            "build",
            "--json",
            "--snapshot-tag",
            "amidala=base",
            "--",
            "/bin/true",
        ],
    );
    let building = env.build_in_phase("register");
    let snapshot = env.build_record(&building)["snapshot_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshot yet: {}", env.build_record(&building)))
        .to_owned();
    let tags = ec2.snapshot_tags(&snapshot);
    assert_eq!(tags["amidala"], "base", "{tags:?}");
    assert_eq!(tags["amidala:failed-build"], building, "{tags:?}");
    ec2.configure(json!({"latency": {}}));
    let second = env.amidala_in(&ws, &["build", "--json", "--", "/bin/true"]);
    assert!(
        second
            .stderr
            .contains(&format!("amidala: starting from {base} ")),
        "the base, not {snapshot} of the build still registering: {}",
        second.stderr
    );
    second.json();
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(field(&done, "snapshot_id"), snapshot);
    // Succeeded: a source now.
    let tags = ec2.snapshot_tags(&snapshot);
    assert!(!tags.contains_key("amidala:failed-build"), "{tags:?}");
    let third = env.amidala_in(&ws, &["build", "--json", "--", "/bin/true"]);
    assert!(
        third
            .stderr
            .contains(&format!("amidala: starting from {snapshot} ")),
        "{}",
        third.stderr
    );
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}

/// Issue 16, point 6: AMI names are unique in a region; the README's `--name "system {date}"`
/// on the second build of a day is refused in the resolve phase, before a volume is made.
#[test]
fn ec2_a_name_an_image_has_already_is_refused_before_anything_is_made() {
    let ec2 = Ec2Emulator::start();
    let env = Env::start_with(&ec2.daemon_config("loop", ""), &AWS_ENV);
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let first = env.build(&ws, &["--name", "system {date}", "--", "/bin/true"]);
    let (volumes, snapshots) = (ec2.calls("CreateVolume"), ec2.calls("CreateSnapshot"));
    let second = env.amidala_in(
        &ws,
        &["build", "--name", "system {date}", "--", "/bin/true"],
    );
    let err = second.err();
    assert!(
        err.contains("failed in phase resolve")
            && err.contains(&format!("image {} is named", field(&first, "image_id")))
            && err.contains("put {build} or {time} in the name"),
        "{}",
        second.stderr
    );
    assert_eq!(ec2.calls("CreateVolume"), volumes, "no volume was made");
    assert_eq!(
        ec2.calls("CreateSnapshot"),
        snapshots,
        "no snapshot was made"
    );
    // Another name is taken.
    env.build(&ws, &["--name", "system {date} {time}", "--", "/bin/true"]);
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}
