//! Package caches: a host directory of the daemon's, per user, mounted into the image for the
//! builds that ask for it, kept between builds and never left in the image.

use amidala_tests::{field, Env, Mounted};

const CONFIG: &str = "[caches]\napt = \"/var/cache/apt/archives\"\n";

#[test]
fn a_cache_keeps_files_between_builds_and_stays_out_of_the_image() {
    let env = Env::start_with(CONFIG, &[]);
    let rootfs = env.busybox_rootfs("rootfs");
    assert!(!rootfs.join("var/cache/apt").exists(), "the base lacks it");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);

    let first = env.build(
        &ws,
        &[
            "--cache",
            "apt",
            "--",
            "/bin/sh",
            "-c",
            "grep -q ' /var/cache/apt/archives ' /proc/self/mountinfo && echo one > /var/cache/apt/archives/pkg.deb",
        ],
    );
    let host = env.state.join("caches/0/apt/pkg.deb");
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "one\n");
    // The image holds neither the file nor the directories amidala made for the mount.
    let image = Mounted::new(&env.snapshot_file(field(&first, "snapshot_id")), 0);
    assert!(
        !image.exists("var/cache/apt"),
        "made for the mount, removed"
    );
    drop(image);

    // The next build of this user finds it; a build without --cache does not.
    let second = env.amidala_in(
        &ws,
        &[
            "build",
            "--cache",
            "apt",
            "--",
            "cat",
            "/var/cache/apt/archives/pkg.deb",
        ],
    );
    second.ok();
    assert!(second.stderr.contains("one"), "{}", second.stderr);
    env.build(
        &ws,
        &[
            "--",
            "/bin/sh",
            "-c",
            "test ! -e /var/cache/apt/archives/pkg.deb",
        ],
    );

    // Unknown names are refused before anything is made, naming what exists.
    let bad = env.amidala_in(&ws, &["build", "--cache", "pip", "--", "true"]);
    assert_ne!(bad.code, Some(0));
    assert!(
        bad.stderr.contains("--cache pip") && bad.stderr.contains("apt"),
        "{}",
        bad.stderr
    );
    let bad = env.amidala_in(&ws, &["build", "--cache", "../x", "--", "true"]);
    assert!(bad.stderr.contains("cache name"), "{}", bad.stderr);
    env.assert_no_leaks();
}

#[test]
fn a_symlink_in_the_image_never_leads_a_cache_mount_out_of_it() {
    let env = Env::start_with(CONFIG, &[]);
    let rootfs = env.busybox_rootfs("rootfs");
    std::fs::create_dir_all(rootfs.join("var")).unwrap();
    std::os::unix::fs::symlink("/etc", rootfs.join("var/cache")).unwrap();
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);
    let existed = std::path::Path::new("/etc/apt/archives").exists();
    let run = env.amidala_in(&ws, &["build", "--cache", "apt", "--", "true"]);
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("/var/cache in the image is a symlink"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::path::Path::new("/etc/apt/archives").exists(),
        existed,
        "nothing made on the host"
    );
    env.assert_no_leaks();
}
