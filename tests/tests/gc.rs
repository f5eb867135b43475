//! `amidala gc`: what builds left behind is found, listed, and removed; what live builds hold
//! is not touched.

use std::fs;
use std::process::Command;

use amidala_tests::{field, run, Env};

#[test]
fn gc_finds_and_removes_leftovers_but_not_what_live_builds_hold() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let done = env.build(&ws, &["--", "true"]);
    let done_id = field(&done, "build_id").to_owned();
    assert_eq!(
        env.amidala(&["gc", "--dry-run", "--json"]).json(),
        serde_json::json!([]),
        "a clean host has nothing to collect"
    );

    // Leftovers of every kind, as a crash outside amidala's control could leave them.
    let volume = env.state.join("volumes/vol-00000000000000abc.img");
    fs::write(&volume, vec![0u8; 1 << 20]).unwrap();
    let device = run(Command::new("losetup").args(["-f", "--show"]).arg(&volume))
        .ok()
        .trim()
        .to_owned();
    let mount_point = env.state.join("mnt/bld-00000000000000abc");
    fs::create_dir(&mount_point).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "leftover"])
        .arg(&mount_point))
    .ok();
    let cgroup = amidalad::cgroup::Hierarchy::discover()
        .unwrap()
        .build_dir(&done_id);
    fs::create_dir(&cgroup).unwrap();
    fs::write(
        env.state.join("tmp/import-00000000000000abc.img"),
        "partial",
    )
    .unwrap();
    fs::write(
        env.state.join("snapshots/.tmp-snap-00000000000000abc.img"),
        "partial",
    )
    .unwrap();

    // And a live build, which gc must leave alone.
    let live = env.spawn_build_sh(&ws, "sleep 2; echo ok > /root/ok");
    std::thread::sleep(std::time::Duration::from_millis(500));

    let listed = env.amidala(&["gc", "--dry-run", "--json"]).json();
    let kinds: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["kind"].as_str().unwrap(), i["id"].as_str().unwrap()))
        .collect();
    for expected in [
        ("cgroup", cgroup.to_str().unwrap()),
        ("mount", mount_point.to_str().unwrap()),
        ("loop-device", device.as_str()),
        ("volume", "vol-00000000000000abc"),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} in {listed}");
    }
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["removed"] == false));
    assert!(
        volume.exists() && cgroup.exists(),
        "a dry run removes nothing"
    );
    // While a build runs, the state directory's files are not looked at.
    assert!(!kinds.iter().any(|(k, _)| *k == "file"), "{listed}");

    let removed = env.amidala(&["gc", "--json"]).json();
    assert!(
        removed
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["removed"] == true),
        "{removed}"
    );
    assert!(!volume.exists() && !cgroup.exists());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(mount_point.to_str().unwrap()), "unmounted");
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        device.trim_start_matches("/dev/")
    );
    assert!(
        !std::path::Path::new(&backing).exists(),
        "{device} detached"
    );
    let out = live.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the live build went on: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Now that nothing runs, the partial files are found too; then nothing is left.
    let files = env.amidala(&["gc", "--json"]).json();
    let ids: Vec<&str> = files
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.iter()
            .any(|i| i.ends_with("import-00000000000000abc.img")),
        "{files}"
    );
    assert!(
        ids.iter()
            .any(|i| i.ends_with(".tmp-snap-00000000000000abc.img")),
        "{files}"
    );
    assert!(
        ids.iter().any(|i| i.ends_with("bld-00000000000000abc")),
        "{files}"
    );
    assert_eq!(
        env.amidala(&["gc", "--dry-run", "--json"]).json(),
        serde_json::json!([])
    );
    env.assert_no_leaks();
}
