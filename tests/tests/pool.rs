//! The warm pool: volumes made (and attached) ahead of time from the newest snapshot with a
//! tag, taken by builds from that snapshot, refilled, refreshed when a newer snapshot appears,
//! left alone by gc while held, drained on shutdown and collected after a crash.

use std::time::{Duration, Instant};

use amidala_tests::{field, Ec2Emulator, Env, AWS_ENV};

const POOL: &str = "[[warm_pool]]\nfrom = \"amidala=base\"\nvolumes = 1\nrefresh_secs = 1\n";

/// Waits until the daemon has logged `count` ready pool volumes in all.
fn wait_ready(env: &Env, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = env.daemon_log();
        if log.matches("warm pool: volume ready").count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not make volume {count}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn build_log(env: &Env, build: &str) -> String {
    env.amidala(&["logs", build]).ok().to_owned()
}

#[test]
fn builds_take_warm_volumes_and_the_pool_refills_and_refreshes() {
    let mut env = Env::start_with(POOL, &[]);
    let rootfs = env.busybox_rootfs("rootfs");
    let first = env.import(&rootfs, &["--publish"]);
    wait_ready(&env, 1);

    // While the pool holds a volume (and its loop device), gc finds nothing.
    assert_eq!(
        env.amidala(&["gc", "--dry-run", "--json"]).json(),
        serde_json::json!([]),
        "gc leaves the pool's volume alone"
    );

    let ws = env.workspace("ws", &[]);
    let result = env.build(&ws, &["--", "/bin/sh", "-c", "echo warm > /root/warm"]);
    let build = field(&result, "build_id");
    let log = build_log(&env, build);
    assert!(log.contains("from the warm pool"), "{log}");
    assert!(log.contains(&format!("starting from {first}")), "{log}");
    let image = amidala_tests::Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(image.read("root/warm"), "warm\n");
    drop(image);

    // Refilled after the take.
    wait_ready(&env, 2);

    // A build with its own size cannot use a pool volume.
    let sized = env.build(&ws, &["--size", "256M", "--", "true"]);
    let log = build_log(&env, field(&sized, "build_id"));
    assert!(!log.contains("from the warm pool"), "{log}");

    // A newer base with the tag: the pool discards the older volume and makes one of it.
    let second = env.import(&rootfs, &["--publish"]);
    wait_ready(&env, 3);
    let result = env.build(&ws, &["--", "true"]);
    let log = build_log(&env, field(&result, "build_id"));
    assert!(log.contains(&format!("starting from {second}")), "{log}");
    assert!(log.contains("from the warm pool"), "{log}");
    assert!(
        env.daemon_log()
            .contains("discarding volumes of the older snapshot"),
        "{}",
        env.daemon_log()
    );

    // Shutdown drains the pool: nothing left (the Env checks loop devices, mounts, files).
    wait_ready(&env, 4);
    env.stop();
    assert!(env.daemon_log().contains("warm pool drained"));
    env.assert_no_leaks();
}

#[test]
fn after_a_crash_recovery_collects_the_pool_volume_and_the_pool_is_remade() {
    let mut env = Env::start_with(POOL, &[]);
    env.import_busybox();
    wait_ready(&env, 1);
    env.kill9();
    assert!(
        !env.leaks().is_empty(),
        "the pool held a volume when killed"
    );
    env.restart();
    wait_ready(&env, 2);
    let log = env.daemon_log();
    assert!(log.contains("recovery:"), "{log}");
    // One volume, the new pool's: the old one was collected.
    let volumes: Vec<_> = std::fs::read_dir(env.state.join("volumes"))
        .unwrap()
        .collect();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let ws = env.workspace("ws", &[]);
    let result = env.build(&ws, &["--", "true"]);
    assert!(build_log(&env, field(&result, "build_id")).contains("from the warm pool"));
    env.stop();
    env.assert_no_leaks();
}

#[test]
fn ec2_pool_volumes_are_attached_ahead_and_adopted_by_the_build() {
    let ec2 = Ec2Emulator::start();
    let config = format!("{}{POOL}", ec2.daemon_config("loop", ""));
    let mut env = Env::start_with(&config, &AWS_ENV);
    env.import_busybox();
    wait_ready(&env, 1);
    // Made and attached ahead: one amidala volume, in use, attached to the builder.
    let volumes = ec2.amidala_volumes();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0].1, "in-use", "{volumes:?}");
    assert_eq!(ec2.instance_mappings().len(), 2, "the root and the pool's");

    let attaches = ec2.calls("AttachVolume");
    let ws = env.workspace("ws", &[]);
    let result = env.build(&ws, &["--", "true"]);
    let build = field(&result, "build_id");
    assert!(build_log(&env, build).contains("from the warm pool"));
    wait_ready(&env, 2);
    // The build attached nothing itself; the pool attached one more for the refill.
    assert_eq!(ec2.calls("AttachVolume"), attaches + 1);
    // The adopted volume carried the build's id (CreateTags), and was deleted with the build.
    assert!(ec2.calls("CreateTags") >= 1);
    let volumes = ec2.amidala_volumes();
    assert_eq!(
        volumes.len(),
        1,
        "only the refilled pool volume: {volumes:?}"
    );

    env.stop();
    ec2.assert_no_leaks();
    env.assert_no_leaks();
}
