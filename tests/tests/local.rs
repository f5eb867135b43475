//! The whole bake on the local provider, through the real daemon and client (root).

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amidala::proto::{self, Response};
use amidala_tests::{field, run, BootDisk, Env, Mounted};

/// The content the busybox image ships in /etc/resolv.conf.
const IMAGE_RESOLV: &str = "# resolv.conf of the busybox test image\nnameserver 192.0.2.53\n";

#[test]
fn build_writes_what_the_provisioner_wrote_and_leaves_no_trace() {
    let env = Env::start();
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[("input.txt", "from the workspace\n")]);
    let script = "set -e
        echo built > /root/built.txt
        cp /workspace/input.txt /root/copied.txt
        cat /etc/resolv.conf > /root/resolv-during
        rc=0; /usr/sbin/policy-rc.d || rc=$?; echo $rc > /root/policy-during
        if touch /workspace/probe 2>/dev/null; then echo rw; else echo ro; fi > /root/workspace-mode
        pwd > /root/cwd
        echo \"$AMIDALA_BUILD_ID\" > /root/build-id
        echo provisioner-says-hello";
    let run = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--tag",
            "role=test",
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
    );
    let result = run.json();
    assert!(
        run.stderr.contains("provisioner-says-hello"),
        "output streamed:\n{}",
        run.stderr
    );
    for phase in amidala_tests::PHASES.iter().chain(&["cleanup"]) {
        assert!(
            run.stderr.contains(&format!("==> {phase}\n")),
            "phase {phase} reported:\n{}",
            run.stderr
        );
    }
    let (build, image, snapshot) = (
        field(&result, "build_id"),
        field(&result, "image_id"),
        field(&result, "snapshot_id"),
    );
    proto::validate_id("ami", image).unwrap();
    proto::validate_id("snap", snapshot).unwrap();
    assert_ne!(snapshot, base);
    assert_eq!(
        field(&result, "snapshot_path"),
        env.snapshot_file(snapshot).to_str().unwrap()
    );

    {
        let out = Mounted::new(&env.snapshot_file(snapshot), 0);
        assert_eq!(out.read("/root/built.txt"), "built\n");
        assert_eq!(out.read("/root/copied.txt"), "from the workspace\n");
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        assert_eq!(
            out.read("/root/resolv-during"),
            host_resolv,
            "the host's resolv.conf during the build"
        );
        assert_eq!(
            out.read("/root/policy-during"),
            "101\n",
            "service starts blocked during the build"
        );
        assert_eq!(out.read("/root/workspace-mode"), "ro\n");
        assert_eq!(out.read("/root/cwd"), "/workspace\n");
        assert_eq!(out.read("/root/build-id").trim(), build);
        assert_eq!(
            out.read("/etc/resolv.conf"),
            IMAGE_RESOLV,
            "the image's own resolv.conf is back"
        );
        assert!(!out.exists("/usr/sbin/policy-rc.d"), "policy-rc.d removed");
        assert!(
            !out.exists("/workspace"),
            "no /workspace left (the image had none)"
        );
        assert!(!out.exists("/etc/.resolv.conf.amidala-saved"));
        assert!(!out.exists("/usr/sbin/.policy-rc.d.amidala-saved"));
    }
    assert!(!ws.join("probe").exists());

    let images = env.amidala(&["images", "--json"]).json();
    let listed = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == image)
        .expect("image listed");
    assert_eq!(listed["snapshot_id"], snapshot);
    assert_eq!(listed["tags"]["role"], "test");
    assert_eq!(listed["tags"]["amidala:build"], build);
    let snapshots = env.amidala(&["snapshots", "--json"]).json();
    let listed = snapshots
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == snapshot)
        .expect("snapshot listed");
    assert_eq!(listed["tags"]["amidala:source-snapshot"], base);
    assert!(
        listed["tags"].get("amidala").is_none(),
        "the base tag is not inherited: {listed}"
    );
    assert_eq!(
        listed["path"],
        env.snapshot_file(snapshot).to_str().unwrap()
    );
    assert!(listed["created"].as_str().unwrap().ends_with('Z'));

    let status = env.amidala(&["status", "--json", build]).json();
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["image_id"], image);
    assert_eq!(status["source_snapshot"], base);
    let list = env.amidala(&["list", "--json"]).json();
    assert!(list.as_array().unwrap().iter().any(|b| b["id"] == build));
    let logs = env.amidala(&["logs", build]);
    assert!(
        logs.ok().contains("provisioner-says-hello"),
        "{}",
        logs.stdout
    );
    assert!(logs.stdout.contains(&format!("finished: image {image}")));
    env.assert_no_leaks();
}

#[test]
fn tarballs_of_every_kind_import() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    for (name, flag) in [("root.tar", ""), ("root.tar.gz", "z"), ("root.tar.xz", "J")] {
        let tarball = env.dir.path().join(name);
        run(Command::new("tar")
            .arg(format!("-c{flag}f"))
            .arg(&tarball)
            .arg("-C")
            .arg(&rootfs)
            .arg("."))
        .ok();
        let snap = env.import(
            &tarball,
            &["--tag", &format!("from={name}"), "--size", "96M"],
        );
        let listed = env.amidala(&["snapshots", "--json"]).json();
        let record = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == snap.as_str())
            .unwrap()
            .clone();
        assert_eq!(record["tags"]["from"], name);
        assert!(
            record["tags"].get("amidala").is_none(),
            "explicit tags replace the default: {record}"
        );
        assert_eq!(record["size"], 96 << 20);
        let image = Mounted::new(&env.snapshot_file(&snap), 0);
        assert_eq!(image.read("/etc/resolv.conf"), IMAGE_RESOLV);
        let busybox = fs::metadata(image.path("/bin/busybox")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(
            (busybox.uid(), busybox.permissions().mode() & 0o777),
            (0, 0o755),
            "ownership and mode kept"
        );
        assert_eq!(
            fs::read_link(image.path("/bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
    }
    // One build from the last of them, picked by its tag.
    let ws = env.workspace("ws", &[]);
    let result = env.build(
        &ws,
        &[
            "--from",
            "from=root.tar.xz",
            "--",
            "/bin/sh",
            "-c",
            "echo xz > /root/from",
        ],
    );
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(out.read("/root/from"), "xz\n");
    drop(out);
    env.assert_no_leaks();
}

/// A GPT disk: partition 1 a small unformatted one (like BIOS boot), partition 2 the root.
fn partitioned_disk(env: &Env, rootfs: &Path) -> (std::path::PathBuf, u64) {
    let part = env.dir.path().join("part.img");
    let disk = env.dir.path().join("disk.img");
    run(Command::new("truncate").arg("-s").arg("80M").arg(&part)).ok();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(rootfs)
        .arg(&part))
    .ok();
    run(Command::new("truncate").arg("-s").arg("96M").arg(&disk)).ok();
    let layout = "label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\nstart=4096, size=163840, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    amidala_tests::sfdisk(&disk, layout);
    let offset = 4096 * 512;
    run(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={}", offset >> 20)))
    .ok();
    (disk, offset)
}

#[test]
fn partitioned_raw_image_builds_on_its_root_partition() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let (disk, offset) = partitioned_disk(&env, &rootfs);
    let base = env.import(&disk, &["--tag", "kind=gpt"]);
    let table = |path: &Path| {
        let out = run(Command::new("sfdisk").arg("-d").arg(path));
        out.ok()
            .lines()
            .filter(|l| !l.starts_with("device:"))
            .map(|l| l.replace(path.to_str().unwrap(), "DISK"))
            .collect::<Vec<_>>()
    };
    let ws = env.workspace("ws", &[]);

    // Partition 1 holds no filesystem: refused at attach, nothing left behind.
    let refused = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            &base,
            "--partition",
            "1",
            "--",
            "/bin/true",
        ],
    );
    let err = refused.err();
    assert!(
        err.contains("failed in phase attach") && err.contains("partition 1 holds no"),
        "{err}"
    );
    env.assert_no_leaks();

    let result = env.build(
        &ws,
        &[
            "--from",
            "kind=gpt",
            "--",
            "/bin/sh",
            "-c",
            "echo on-partition-2 > /root/p.txt",
        ],
    );
    let snap = field(&result, "snapshot_id");
    assert_eq!(
        table(&env.snapshot_file(snap)),
        table(&disk),
        "the partition table is kept"
    );
    let out = Mounted::new(&env.snapshot_file(snap), offset);
    assert_eq!(out.read("/root/p.txt"), "on-partition-2\n");
    assert_eq!(out.read("/etc/resolv.conf"), IMAGE_RESOLV);
    drop(out);
    let explicit = env.build(
        &ws,
        &[
            "--source",
            snap,
            "--partition",
            "2",
            "--",
            "/bin/sh",
            "-c",
            "test -f /root/p.txt",
        ],
    );
    assert!(explicit["image_id"].is_string());
    env.assert_no_leaks();
}

/// Issue 15, point 3: the partitions an image's fstab mounts at /boot (ext4, named by label)
/// and /boot/efi (vfat, by UUID) are there while the provisioner runs, and what it writes
/// there lands in them. A kernel with vfat mounts the ESP; one without (these machines) gives
/// the build a copy, written back (same serial and label) only when the build changed it.
#[test]
fn the_boot_partitions_an_fstab_names_are_mounted_during_the_build() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let BootDisk {
        disk,
        boot_at,
        esp_at,
        root_at,
    } = BootDisk::make(env.dir.path(), &rootfs);
    let esp = |image: &Path| format!("{}@@{esp_at}", image.display());
    let base = env.import(&disk, &[]);
    let ws = env.workspace("ws", &[]);
    let vfat = fs::read_to_string("/proc/filesystems")
        .unwrap()
        .contains("\tvfat\n");

    let built = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--",
            "/bin/sh",
            "-c",
            "set -e
             cat /boot/vmlinuz-old /boot/efi/EFI/BOOT/BOOTX64.EFI > /root/seen
             test ! -e /boot/under-the-mount
             ls /dev/disk/by-uuid > /root/disks
             echo new kernel > /boot/vmlinuz-new
             mkdir /boot/efi/EFI/debian
             echo menu > /boot/efi/EFI/debian/grub.cfg",
        ],
    );
    let log = &built.stderr;
    let result = built.json();
    assert!(
        log.contains("amidala: mounted partition 2 (ext4) at /boot, as /etc/fstab says"),
        "{log}"
    );
    if vfat {
        assert!(
            log.contains("amidala: mounted partition 3 (vfat) at /boot/efi"),
            "{log}"
        );
    } else {
        assert!(log.contains("/boot/efi: partition 3 (vfat, which this host's kernel cannot mount) given as a copy"), "{log}");
        assert!(
            log.contains("amidala: wrote the build's /boot/efi (2 files) back into partition 3"),
            "{log}"
        );
    }
    let snap = env.snapshot_file(field(&result, "snapshot_id"));
    let root = Mounted::new(&snap, root_at);
    assert_eq!(root.read("/root/seen"), "old kernel\nthe loader\n");
    // The build's /dev has the partitions mounted from their devices by UUID.
    assert_eq!(
        root.read("/root/disks").lines().count(),
        if vfat { 3 } else { 2 },
        "{}",
        root.read("/root/disks")
    );
    assert!(
        !root.exists("/boot/vmlinuz-new"),
        "written into the boot partition, not the root"
    );
    assert_eq!(root.read("/boot/under-the-mount"), "root's /boot\n");
    drop(root);
    let boot = Mounted::new(&snap, boot_at);
    assert_eq!(boot.read("/vmlinuz-new"), "new kernel\n");
    drop(boot);
    let read_esp = |image: &Path, path: &str| {
        run(Command::new("mtype").args(["-i", &esp(image), path]))
            .ok()
            .to_owned()
    };
    assert_eq!(read_esp(&snap, "::/EFI/debian/grub.cfg"), "menu\n");
    assert_eq!(read_esp(&snap, "::/EFI/BOOT/BOOTX64.EFI"), "the loader\n");
    let info = run(Command::new("mdir").args(["-i", &esp(&snap), "::/"]))
        .ok()
        .to_owned();
    assert!(
        info.contains("Volume in drive : is ESP") && info.contains("Serial Number is 0BAD-CAFE"),
        "{info}"
    );
    env.assert_no_leaks();

    // A build that leaves the ESP alone leaves its bytes alone; one that leaves what FAT cannot
    // hold fails, leaving nothing behind.
    let esp_bytes = |image: &Path| {
        let all = fs::read(image).unwrap();
        all[esp_at as usize..(esp_at + (16 << 20)) as usize].to_vec()
    };
    let before = esp_bytes(&snap);
    let again = env.build(
        &ws,
        &[
            "--source",
            field(&result, "snapshot_id"),
            "--",
            "/bin/sh",
            "-c",
            "ls /boot/efi/EFI",
        ],
    );
    assert!(
        esp_bytes(&env.snapshot_file(field(&again, "snapshot_id"))) == before,
        "the ESP was rewritten"
    );
    let bad = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            &base,
            "--",
            "/bin/ln",
            "-s",
            "/etc",
            "/boot/efi/etc",
        ],
    );
    let err = bad.err();
    if !vfat {
        assert!(
            err.contains("/etc, which is neither a file nor a directory"),
            "{err}"
        );
    }
    env.assert_no_leaks();
}

/// Issue 15, point 2: a qcow2 image (compressed, as distributions publish them) imports as
/// the disk it holds, converted by qemu-img in a sandbox, holes kept, and can grow; one that
/// names another file or does not convert is refused, leaving nothing behind.
#[test]
fn a_qcow2_image_imports_as_the_disk_it_holds() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let (disk, offset) = partitioned_disk(&env, &rootfs);
    let qcow2 = env.dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&disk)
        .arg(&qcow2))
    .ok();

    let import = env.amidala(&["base", "import", qcow2.to_str().unwrap()]);
    let base = import.ok().trim().to_owned();
    assert!(
        import.stderr.contains("converting qcow2 image"),
        "{}",
        import.stderr
    );
    let file = env.snapshot_file(&base);
    assert_eq!(std::fs::read(&file).unwrap(), std::fs::read(&disk).unwrap());
    let meta = std::fs::metadata(&file).unwrap();
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "holes kept: {} of {} bytes written",
        meta.blocks() * 512,
        meta.len()
    );
    env.assert_no_leaks();

    // Grown at import: its GPT to the end, its root partition with it; and it builds.
    let import = env.amidala(&[
        "base",
        "import",
        qcow2.to_str().unwrap(),
        "--size",
        "160M",
        "--tag",
        "kind=qcow2",
    ]);
    let grown = import.ok().trim().to_owned();
    assert!(
        import
            .stderr
            .contains("grew partition 2 (the root) from 80 to 157 MiB"),
        "{}",
        import.stderr
    );
    gpt_verified(&env.snapshot_file(&grown));
    let ws = env.workspace("ws", &[]);
    let result = env.build(
        &ws,
        &[
            "--from",
            "kind=qcow2",
            "--",
            "/bin/sh",
            "-c",
            "echo q > /root/q",
        ],
    );
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), offset);
    assert_eq!(out.read("/root/q"), "q\n");
    drop(out);

    // An overlay naming its backing file: refused before qemu-img opens anything.
    let overlay = env.dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&qcow2)
        .arg(&overlay))
    .ok();
    let refused = env.amidala(&["base", "import", overlay.to_str().unwrap()]);
    let err = refused.err();
    assert!(err.contains("with a backing file"), "{err}");
    // Cut short: qemu-img's error, and nothing left (no snapshot, no loop device).
    let cut = env.dir.path().join("cut.qcow2");
    let bytes = std::fs::read(&qcow2).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let failed = env.amidala(&["base", "import", cut.to_str().unwrap()]);
    let err = failed.err();
    assert!(err.contains("qemu-img could not convert it"), "{err}");
    let snapshots = env.amidala(&["snapshots", "--json"]).json();
    assert_eq!(snapshots.as_array().map(Vec::len), Some(3), "{snapshots}");
    env.assert_no_leaks();
}

/// Bytes of the filesystem mounted at `dir` (statvfs: blocks × fragment size).
fn filesystem_bytes(dir: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    st.blocks() as u64 * st.fragment_size() as u64
}

/// `sgdisk -v` of a disk: what it says when the GPT has no problem.
fn gpt_verified(disk: &Path) -> String {
    let out = run(Command::new("sgdisk").arg("-v").arg(disk));
    let said = out.ok().to_owned();
    assert!(said.contains("No problems found"), "{said}");
    said
}

/// Issue 15, point 2: a disk made longer (`--size` on import or build) gets its GPT moved to
/// its end, its root partition (the last) grown and its root filesystem grown online (ext4 in
/// a partition, ext4 and XFS on a whole disk); the space is there for the build to use.
#[test]
fn a_longer_disk_gets_its_table_partition_and_filesystem_grown() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let (disk, offset) = partitioned_disk(&env, &rootfs);
    let ws = env.workspace("ws", &[]);

    // Import, 96 MiB → 160 MiB: the table moves and partition 2 grows with the disk.
    let import = env.amidala(&[
        "base",
        "import",
        disk.to_str().unwrap(),
        "--size",
        "160M",
        "--tag",
        "kind=grown",
    ]);
    let base = import.ok().trim().to_owned();
    assert!(
        import
            .stderr
            .contains("grew partition 2 (the root) from 80 to 157 MiB"),
        "{}",
        import.stderr
    );
    gpt_verified(&env.snapshot_file(&base));

    // The first build grows the filesystem into its partition, and can fill it.
    let fill = "dd if=/dev/zero of=/root/fill bs=1M count=100 2>/dev/null && rm /root/fill && \
                echo filled";
    let said = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--from",
            "kind=grown",
            "--",
            "/bin/sh",
            "-c",
            fill,
        ],
    );
    let result = said.json();
    assert!(
        said.stderr
            .contains("grew the root filesystem from 80 to 157 MiB")
            && said.stderr.contains("filled"),
        "{}",
        said.stderr
    );
    let snap = field(&result, "snapshot_id").to_owned();
    let out = Mounted::new(&env.snapshot_file(&snap), offset);
    assert!(filesystem_bytes(&out.path("/")) > 130 << 20);
    drop(out);

    // A build with --size grows all three again; a build without it changes nothing.
    let said = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &snap,
            "--size",
            "256M",
            "--",
            "/bin/true",
        ],
    );
    let grown = said.json();
    assert!(
        said.stderr
            .contains("grew partition 2 (the root) from 157 to 253 MiB")
            && said
                .stderr
                .contains("grew the root filesystem from 157 to 253 MiB"),
        "{}",
        said.stderr
    );
    let grown_snap = field(&grown, "snapshot_id").to_owned();
    let verified = gpt_verified(&env.snapshot_file(&grown_snap));
    assert!(!verified.contains("backup header"), "{verified}");
    let out = Mounted::new(&env.snapshot_file(&grown_snap), offset);
    assert!(filesystem_bytes(&out.path("/")) > 220 << 20);
    drop(out);
    let said = env.amidala_in(&ws, &["build", "--source", &grown_snap, "--", "/bin/true"]);
    said.ok();
    assert!(!said.stderr.contains("grew"), "{}", said.stderr);

    // Whole-disk filesystems: ext4 (the busybox tree's import) and XFS (made here).
    let ext4 = env.import(&rootfs, &["--tag", "kind=ext4"]);
    let said = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &ext4,
            "--size",
            "200M",
            "--",
            "/bin/true",
        ],
    );
    let result = said.json();
    assert!(
        said.stderr.contains("grew the root filesystem from") && said.stderr.contains("to 200 MiB"),
        "{}",
        said.stderr
    );
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert!(filesystem_bytes(&out.path("/")) > 170 << 20);
    drop(out);

    let xfs = xfs_image(&env, &rootfs);
    let xfs_base = env.import(&xfs, &["--tag", "kind=xfs"]);
    let said = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &xfs_base,
            "--size",
            "512M",
            "--",
            "/bin/true",
        ],
    );
    let result = said.json();
    assert!(
        said.stderr
            .contains("grew the root filesystem from 320 to 512 MiB"),
        "{}",
        said.stderr
    );
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    let xfs_bytes = filesystem_bytes(&out.path("/"));
    assert!(xfs_bytes > 400 << 20, "{xfs_bytes}");
    drop(out);
    env.assert_no_leaks();
}

/// A 320 MiB whole-disk XFS image in the test's directory holding `rootfs`.
fn xfs_image(env: &Env, rootfs: &Path) -> std::path::PathBuf {
    let xfs = env.dir.path().join("xfs.img");
    fs::File::create(&xfs).unwrap().set_len(320 << 20).unwrap();
    run(Command::new("mkfs.xfs").arg("-q").arg(&xfs)).ok();
    let mnt = env.dir.path().join("xfs-mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&xfs)
        .arg(&mnt))
    .ok();
    let copied = run(Command::new("cp").arg("-a").arg(rootfs.join(".")).arg(&mnt));
    run(Command::new("umount").arg(&mnt)).ok();
    copied.ok();
    xfs
}

/// Issue 16, point 9: XFS refuses to mount a second filesystem with a UUID already mounted, and
/// every build of one base mounts a copy of the same filesystem: two builds of an XFS base at
/// once both succeed (their roots are mounted with `nouuid`).
#[test]
fn two_builds_of_one_xfs_base_run_at_once() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let xfs = xfs_image(&env, &rootfs);
    let base = env.import(&xfs, &["--tag", "kind=xfs"]);
    let ws = env.workspace("ws", &[]);
    // The first holds its mount until the second has mounted its own (or failed to).
    let build = |script: &str| {
        vec![
            "build".to_owned(),
            "--json".to_owned(),
            "--source".to_owned(),
            base.clone(),
            "--".to_owned(),
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
        ]
    };
    let first_args = build("echo first up; sleep 8; echo first done");
    let mut first = env.spawn_client(
        &ws,
        &first_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let stderr = first.stderr.take().unwrap();
    let (up, is_up) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("first up") {
                let _ = up.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    is_up
        .recv_timeout(Duration::from_secs(60))
        .expect("the first build's provisioner started");
    let second_args = build("echo second ran");
    let second = env.amidala_in(
        &ws,
        &second_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(second.stderr.contains("second ran"), "{}", second.stderr);
    second.json();
    let status = first.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("first done"), "{log}");
    env.assert_no_leaks();
}

#[test]
fn failing_provisioner_fails_the_build_with_its_status() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let run = env.amidala_in(
        &ws,
        &["build", "--", "/bin/sh", "-c", "echo about-to-fail; exit 3"],
    );
    let err = run.err();
    assert!(run.stdout.is_empty(), "no image id printed: {}", run.stdout);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("failed in phase provision") && last.contains("exited with status 3"),
        "one-line error naming phase and cause: {last}"
    );
    assert!(err.contains("about-to-fail"));
    let build = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("amidala: build ")
                .and_then(|r| r.strip_suffix(" accepted"))
        })
        .unwrap();
    let status = env.amidala(&["status", "--json", build]).json();
    assert_eq!(status["state"], "failed");
    assert_eq!(status["error"]["phase"], "provision");
    assert_eq!(status["error"]["code"], "provisioner_failed");
    assert_eq!(status["error"]["exit_status"], 3);
    assert_eq!(
        env.amidala(&["images", "--json"]).json(),
        serde_json::json!([]),
        "no image registered"
    );
    assert_eq!(
        env.amidala(&["snapshots", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "no snapshot made"
    );

    let missing = env.amidala_in(&ws, &["build", "--", "/no/such/program"]);
    assert!(
        missing.err().contains("failed in phase provision"),
        "{}",
        missing.stderr
    );
    env.assert_no_leaks();
}

#[test]
fn layers_chain_base_system_app_by_tags() {
    let env = Env::start();
    let base = env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let system = env.build(
        &ws,
        &[
            "--snapshot-tag",
            "amidala=system",
            "--name",
            "system image",
            "--",
            "/bin/sh",
            "-c",
            "echo system > /etc/layer-system",
        ],
    );
    let system_snap = field(&system, "snapshot_id").to_owned();
    // A newer system build: the app build must start from this one, the newest.
    let system2 = env.build(
        &ws,
        &[
            "--snapshot-tag",
            "amidala=system",
            "--",
            "/bin/sh",
            "-c",
            "echo system2 > /etc/layer-system",
        ],
    );
    let system2_snap = field(&system2, "snapshot_id").to_owned();
    let app = env.build(
        &ws,
        &[
            "--from",
            "amidala=system",
            "--snapshot-tag",
            "amidala=app",
            "--",
            "/bin/sh",
            "-c",
            "test -f /etc/layer-system && echo app > /etc/layer-app",
        ],
    );
    let app_snap = field(&app, "snapshot_id");

    let snapshots = env.amidala(&["snapshots", "--json"]).json();
    let by_id = |id: &str| {
        snapshots
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_id(&system_snap)["tags"]["amidala:source-snapshot"],
        base.as_str()
    );
    assert_eq!(
        by_id(app_snap)["tags"]["amidala:source-snapshot"],
        system2_snap.as_str()
    );
    assert_eq!(by_id(app_snap)["tags"]["amidala"], "app");
    let images = env.amidala(&["images", "--json"]).json();
    assert!(images
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["name"] == "system image"));

    let out = Mounted::new(&env.snapshot_file(app_snap), 0);
    assert_eq!(out.read("/etc/layer-system"), "system2\n");
    assert_eq!(out.read("/etc/layer-app"), "app\n");
    drop(out);
    let base_image = Mounted::new(&env.snapshot_file(&base), 0);
    assert!(
        !base_image.exists("/etc/layer-system"),
        "the base snapshot is untouched"
    );
    drop(base_image);
    env.assert_no_leaks();
}

#[test]
fn eight_builds_at_once_have_distinct_results() {
    // Eight at once: more loop devices than the host has at boot, all running together
    // (one user, so their share of the slots is raised to all of them).
    let env = Env::start_with(
        "max_builds = 8\n[limits]\nmax_running_builds_per_user = 8\n",
        &[],
    );
    env.import_busybox();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let ws = env.workspace(&format!("ws{i}"), &[("id", &format!("build-{i}\n"))]);
            let script =
                format!("cp /workspace/id /root/mark-{i}; sleep 3; ls /root > /root/listing");
            env.spawn_client(&ws, &["build", "--json", "--", "/bin/sh", "-c", &script])
        })
        .collect();
    // The most builds seen provisioning at once, until all have ended.
    let mut most = 0;
    loop {
        let list = env.amidala(&["list", "--json"]).json();
        let builds = list.as_array().unwrap();
        let provisioning = builds
            .iter()
            .filter(|b| b["state"] == "running" && b["phase"] == "provision")
            .count();
        most = most.max(provisioning);
        if builds.len() == 8
            && builds
                .iter()
                .all(|b| b["state"] != "running" && b["state"] != "queued")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let results: Vec<serde_json::Value> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    let mut ids: Vec<&str> = results.iter().map(|r| field(r, "image_id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "eight distinct images");
    assert_eq!(most, 8, "all eight were provisioning at one moment");
    for result in &results {
        let out = Mounted::new(&env.snapshot_file(field(result, "snapshot_id")), 0);
        let listing = out.read("/root/listing");
        let marks: Vec<&str> = listing.lines().filter(|l| l.starts_with("mark-")).collect();
        assert_eq!(
            marks.len(),
            1,
            "each image holds only its own build's file: {listing}"
        );
        let i = marks[0].trim_start_matches("mark-");
        assert_eq!(out.read(&format!("/root/mark-{i}")), format!("build-{i}\n"));
    }
    env.assert_no_leaks();
}

fn raw_exchange(socket: &Path, bytes: &[u8]) -> Option<Response> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(bytes).unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    amidala_tests::first_answer(&mut stream)
}

fn error_code(response: Option<Response>) -> proto::ErrorCode {
    match response {
        Some(Response::Error(e)) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn bad_input_is_refused_clearly_and_the_daemon_keeps_serving() {
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);

    let no_tag = env.amidala_in(&ws, &["build", "--from", "nosuch=tag", "--", "/bin/true"]);
    let err = no_tag.err();
    assert!(
        err.contains("failed in phase resolve")
            && err.contains("no snapshot of yours or published by an admin is tagged nosuch=tag"),
        "{err}"
    );
    let missing = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            "snap-00000000000000000",
            "--",
            "/bin/true",
        ],
    );
    assert!(
        missing.err().contains(
            "snapshot snap-00000000000000000 does not exist, or is neither yours nor published"
        ),
        "{}",
        missing.stderr
    );
    let malformed_id = env.amidala_in(
        &ws,
        &["build", "--source", "../../etc/passwd", "--", "/bin/true"],
    );
    assert!(
        malformed_id.err().contains("is not a valid id"),
        "{}",
        malformed_id.stderr
    );
    let provisioner = env.amidala_in(
        &ws,
        &["build", "--provisioner", "nosuch", "--", "/bin/true"],
    );
    assert!(
        provisioner
            .err()
            .contains("no provisioner named \"nosuch\""),
        "{}",
        provisioner.stderr
    );
    let no_command = env.amidala_in(&ws, &["build"]);
    assert!(
        no_command.err().contains("needs a command"),
        "{}",
        no_command.stderr
    );
    let bad_tag = env.amidala_in(
        &ws,
        &["build", "--tag", "amidala:build=x", "--", "/bin/true"],
    );
    assert!(bad_tag.err().contains("reserves"), "{}", bad_tag.stderr);
    let bad_name = env.amidala_in(&ws, &["build", "--name", "a;b", "--", "/bin/true"]);
    assert!(bad_name.err().contains("image name"), "{}", bad_name.stderr);
    let not_an_image = env.dir.path().join("notes.txt");
    fs::write(&not_an_image, "just text\n").unwrap();
    let import = env.amidala(&["base", "import", not_an_image.to_str().unwrap()]);
    assert!(
        import
            .err()
            .contains("notes.txt: not imported: it is neither a tar archive"),
        "{}",
        import.stderr
    );
    // Issue 14, point 14: a partition table that is there but wrong is named as the fault.
    let bad_table = env.dir.path().join("bad-table.img");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&bad_table).unwrap();
        f.set_len(1 << 20).unwrap();
        let mut entry = [0u8; 16];
        entry[4] = 0x83;
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
        f.write_all_at(&entry, 446).unwrap();
        f.write_all_at(&[0x55, 0xAA], 510).unwrap();
    }
    let import = env.amidala(&["base", "import", bad_table.to_str().unwrap()]);
    assert!(
        import.err().contains("the table is invalid")
            && import.stderr.contains("lies beyond the end of the disk"),
        "{}",
        import.stderr
    );
    // Issue 14, point 1: a workspace descriptor that proves no read access (O_PATH, as one
    // may have for a directory nobody may list) is refused.
    {
        use std::os::fd::{AsFd, FromRawFd, OwnedFd};
        let locked = env.dir.path().join("locked");
        fs::create_dir(&locked).unwrap();
        fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let path = nix::fcntl::open(
            &locked,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        // SAFETY: open just returned this descriptor; nothing else owns it.
        let path = unsafe { OwnedFd::from_raw_fd(path) };
        let spec: proto::BuildSpec = serde_json::from_value(serde_json::json!({
            "source": {"tag": {"key": "amidala", "value": "base"}},
            "provisioner": "shell",
            "command": ["true"],
        }))
        .unwrap();
        let mut client = amidala::Client::connect(&env.socket).unwrap();
        client
            .send(&proto::Request::Build(spec), Some(path.as_fd()))
            .unwrap();
        match client.recv() {
            Err(amidala::ClientError::Daemon(e)) => {
                assert_eq!(e.code, proto::ErrorCode::InvalidArgument);
                assert!(
                    e.message.contains("opened for reading (not O_PATH"),
                    "{e:?}"
                );
            }
            other => panic!("an O_PATH workspace: {other:?}"),
        }
    }
    // A FIFO is refused by the client at once, not waited on for a writer.
    let fifo = env.dir.path().join("a-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let started = std::time::Instant::now();
    let import = env.amidala(&["base", "import", fifo.to_str().unwrap()]);
    assert!(import.err().contains("is a FIFO"), "{}", import.stderr);
    assert_eq!(import.code, Some(2));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // A source name that would forge a line of the daemon's log is refused.
    let forged = env.dir.path().join("x\nERROR forged line");
    fs::write(&forged, "x").unwrap();
    let import = env.amidala(&["base", "import", forged.to_str().unwrap()]);
    assert!(
        import.err().contains("contains a control character"),
        "{}",
        import.stderr
    );
    assert!(
        !env.daemon_log()
            .lines()
            .any(|l| l.starts_with("ERROR forged line")),
        "{}",
        env.daemon_log()
    );
    let too_small = env.amidala(&["base", "import", rootfs.to_str().unwrap(), "--size", "1M"]);
    assert!(
        too_small.err().contains("too small"),
        "{}",
        too_small.stderr
    );
    env.assert_no_leaks();

    // Malformed, oversized and truncated frames: an error, then that connection closes.
    let mut garbage = 9u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"not json!");
    assert_eq!(
        error_code(raw_exchange(&env.socket, &garbage)),
        proto::ErrorCode::BadFrame
    );
    let unknown = proto::encode_frame(
        &serde_json::json!({"hello": {"protocol": 1, "client": "x", "evil": true}}),
    )
    .unwrap();
    assert_eq!(
        error_code(raw_exchange(&env.socket, &unknown)),
        proto::ErrorCode::BadFrame
    );
    let oversized = ((proto::MAX_FRAME + 1) as u32).to_be_bytes();
    assert_eq!(
        error_code(raw_exchange(&env.socket, &oversized)),
        proto::ErrorCode::FrameTooLarge
    );
    let mut truncated = proto::encode_frame(&proto::Request::List).unwrap();
    truncated.truncate(truncated.len() - 2);
    assert_eq!(
        error_code(raw_exchange(&env.socket, &truncated)),
        proto::ErrorCode::BadFrame
    );
    let skipped_hello = proto::encode_frame(&proto::Request::List).unwrap();
    assert_eq!(
        error_code(raw_exchange(&env.socket, &skipped_hello)),
        proto::ErrorCode::BadRequest
    );
    let wrong_version = proto::encode_frame(&proto::Request::Hello {
        protocol: 99,
        client: "x".into(),
    })
    .unwrap();
    assert_eq!(
        error_code(raw_exchange(&env.socket, &wrong_version)),
        proto::ErrorCode::ProtocolMismatch
    );

    // The daemon is still serving, and still builds.
    env.amidala(&["list"]).ok();
    let result = env.build(&ws, &["--", "/bin/true"]);
    assert!(result["image_id"].is_string());
    env.assert_no_leaks();
}

#[test]
fn an_unreachable_daemon_is_reported_with_the_socket_path() {
    let missing = std::env::temp_dir().join("amidala-no-such-daemon.sock");
    let out = run(Command::new(amidala_tests::bin_dir().join("amidala"))
        .arg("--socket")
        .arg(&missing)
        .arg("list"));
    let err = out.err();
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("is amidalad running?"),
        "{err}"
    );
}

#[test]
fn cancel_and_sigterm_tear_builds_down() {
    let mut env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);

    // amidala cancel: the build stops in provision, the client reports it, nothing is left.
    let client = env
        .amidala_command(
            &ws,
            &["build", "--", "/bin/sh", "-c", "sleep 300 & sleep 300"],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = env.build_in_phase("provision");
    let cancelled = env.amidala(&["cancel", &id]);
    assert!(
        cancelled.ok().is_empty() && cancelled.stderr.contains("is cancelled"),
        "{}",
        cancelled.stderr
    );
    let out = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cancelled"), "{err}");
    assert_eq!(
        env.amidala(&["status", "--json", &id]).json()["state"],
        "cancelled"
    );
    env.assert_no_leaks();

    // SIGTERM: the daemon stops taking work, tears the running build down and exits.
    let client = env
        .amidala_command(&ws, &["build", "--", "/bin/sh", "-c", "sleep 300"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = env.build_in_phase("provision");
    let started = Instant::now();
    env.stop();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped promptly"
    );
    let out = client.wait_with_output().unwrap();
    assert!(!out.status.success());
    let record = env.build_record(&id);
    assert_eq!(record["state"], "cancelled");
    assert!(record["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    assert!(!env.socket.exists(), "socket removed on exit");
    env.assert_no_leaks();
}

/// amidalad runs a build's executor and the plugin's validator as amidalad-exec, the small
/// helper next to it; as itself where that is missing, not root's alone to change, or of
/// another build. The build works either way, and the daemon's log says which ran, and why.
#[test]
fn the_executor_runs_as_the_helper_or_else_as_amidalad() {
    let mut env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[]);
    let helper = amidala_tests::bin_dir().join("amidalad-exec");
    let using = "executor and validators run as the helper";
    assert!(
        env.daemon_log()
            .contains(&format!("{using} helper={}", helper.display())),
        "{}",
        env.daemon_log()
    );
    let built = env.build(&ws, &["--", "true"]);
    assert!(field(&built, "image_id").starts_with("ami-"), "{built}");

    // amidalad alone in a directory of its own, with helpers it must not run.
    let dir = tempfile::Builder::new()
        .prefix("amidala-helper-")
        .tempdir()
        .unwrap();
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let daemon = dir.path().join("amidalad");
    if fs::hard_link(amidala_tests::bin_dir().join("amidalad"), &daemon).is_err() {
        fs::copy(amidala_tests::bin_dir().join("amidalad"), &daemon).unwrap();
    }
    let fake = dir.path().join("amidalad-exec");
    let launcher = format!("shift; exec {} \"$@\"", daemon.display());
    let cases: [(&str, u32, &str); 3] = [
        ("", 0, "no amidalad-exec next to amidalad"),
        (
            "#!/bin/sh\necho 'amidalad-exec 0.0.0 (protocol 0)'\n",
            0o755,
            "it is not of this build",
        ),
        ("copy", 0o775, "writable by group or others"),
    ];
    for (content, mode, why) in cases {
        let _ = fs::remove_file(&fake);
        match content {
            "" => {}
            "copy" => {
                fs::copy(&helper, &fake).unwrap();
            }
            script => fs::write(&fake, script).unwrap(),
        }
        if mode != 0 {
            fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        }
        let before = env.daemon_log().len();
        env.restart_through(&["/bin/sh", "-c", &launcher, "sh"], &[]);
        let log = env.daemon_log()[before..].to_owned();
        assert!(
            log.contains(why) && !log.contains(using),
            "{why}: the daemon's log says:\n{log}"
        );
        // Run as amidalad itself, the build is the same.
        let built = env.build(&ws, &["--", "true"]);
        assert!(
            field(&built, "image_id").starts_with("ami-"),
            "{why}: {built}"
        );
    }
    env.stop();
    env.assert_no_leaks();
}

/// A root tree as debootstrap leaves one: device nodes, a FIFO, setuid files, file
/// capabilities, owners other than root, hard links, a sparse file, extended attributes.
fn rich_tree(env: &Env) -> std::path::PathBuf {
    let tree = env.busybox_rootfs("rich");
    let sh = |script: &str| {
        run(Command::new("sh").arg("-ec").arg(script).current_dir(&tree)).ok();
    };
    sh("mknod -m 666 dev/null c 1 3
        mknod -m 600 dev/initctl p
        cp bin/busybox usr/bin/su-like && chmod 4755 usr/bin/su-like
        cp bin/busybox usr/bin/ping-like && setcap cap_net_raw+ep usr/bin/ping-like
        mkdir -p home/u && echo private > home/u/file && chown -R 1234:2345 home/u && chmod 640 home/u/file
        echo linked > etc/hard1 && ln etc/hard1 etc/hard2
        truncate -s 100M var/sparse && printf data | dd of=var/sparse bs=1 seek=50000000 conv=notrunc 2>/dev/null
        python3 -c \"import os; os.setxattr('etc/hostname', 'user.comment', b'kept')\"");
    tree
}

/// Asserts an image holds what [`rich_tree`] put in it (its extended attributes and file
/// capabilities if `xattrs`, its sparse file sparse if `holes`).
fn assert_rich(image: &Mounted, xattrs: bool, holes: bool) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let null = fs::symlink_metadata(image.path("/dev/null")).unwrap();
    assert!(null.file_type().is_char_device(), "a device node");
    assert_eq!(
        (null.rdev() >> 8, null.rdev() & 0xff, null.mode() & 0o7777),
        (1, 3, 0o666)
    );
    assert!(fs::symlink_metadata(image.path("/dev/initctl"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::metadata(image.path("/usr/bin/su-like")).unwrap().mode() & 0o7777,
        0o4755
    );
    if xattrs {
        let caps = run(Command::new("getcap").arg(image.path("/usr/bin/ping-like")));
        assert!(caps.ok().contains("cap_net_raw=ep"), "{}", caps.stdout);
        let comment = run(Command::new("python3")
            .arg("-c")
            .arg("import os, sys; print(os.getxattr(sys.argv[1], 'user.comment').decode())")
            .arg(image.path("/etc/hostname")));
        assert_eq!(comment.ok(), "kept\n");
    }
    let file = fs::metadata(image.path("/home/u/file")).unwrap();
    assert_eq!(
        (file.uid(), file.gid(), file.mode() & 0o777),
        (1234, 2345, 0o640)
    );
    assert_eq!(
        fs::metadata(image.path("/etc/hard1")).unwrap().ino(),
        fs::metadata(image.path("/etc/hard2")).unwrap().ino()
    );
    let sparse = fs::metadata(image.path("/var/sparse")).unwrap();
    assert_eq!(sparse.len(), 100 << 20);
    if holes {
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "holes stay holes: {} blocks",
            sparse.blocks()
        );
    }
}

/// Issue 14, point 4: directories and tarballs are unpacked by the sandbox, not by a privileged
/// tool, and keep everything a root tree holds.
#[test]
fn root_trees_keep_what_they_hold_through_the_sandbox() {
    let env = Env::start();
    let tree = rich_tree(&env);
    let from_dir = env.import(&tree, &[]);
    let image = Mounted::new(&env.snapshot_file(&from_dir), 0);
    assert_rich(&image, true, true);
    drop(image);
    // GNU tar keeps extended attributes in the POSIX format, and holes in its own.
    let tar = |name: &str, flags: &[&str]| {
        let tarball = env.dir.path().join(name);
        run(Command::new("tar")
            .args(flags)
            .arg(&tarball)
            .arg("-C")
            .arg(&tree)
            .arg("."))
        .ok();
        tarball
    };
    let posix = env.import(
        &tar(
            "rich-posix.tar.gz",
            &["--xattrs", "--xattrs-include=*", "-czf"],
        ),
        &[],
    );
    let image = Mounted::new(&env.snapshot_file(&posix), 0);
    assert_rich(&image, true, false);
    drop(image);
    let gnu = env.import(
        &tar("rich-gnu.tar.xz", &["--format=gnu", "-S", "-cJf"]),
        &[],
    );
    let image = Mounted::new(&env.snapshot_file(&gnu), 0);
    assert_rich(&image, false, true);
    drop(image);
    // Sized by what the tree holds (the 100 MiB sparse file holds 4 bytes).
    for snap in [&from_dir, &gnu] {
        let size = fs::metadata(env.snapshot_file(snap)).unwrap().len();
        assert!(size < 96 << 20, "{snap}: {size} bytes");
    }
    // A sparse file in the POSIX format is refused by name, not unpacked as its encoding.
    let refused = env.amidala(&[
        "base",
        "import",
        tar("rich-pax-sparse.tar", &["--xattrs", "-S", "-cf"])
            .to_str()
            .unwrap(),
    ]);
    assert!(
        refused.err().contains("a sparse file in the POSIX format"),
        "{}",
        refused.stderr
    );
    env.assert_no_leaks();
}

/// A GNU tar archive at `path` of one sparse file of `apparent` bytes holding one byte.
fn gnu_sparse_bomb(path: &Path, apparent: u64) {
    // One byte of data at the end of an `apparent`-byte sparse file, by GNU tar itself.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge");
    let f = fs::File::create(&file).unwrap();
    f.set_len(apparent).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"x", apparent - 1).unwrap();
    run(Command::new("tar")
        .args(["--format=gnu", "-S", "-cf"])
        .arg(path)
        .arg("-C")
        .arg(dir.path())
        .arg("huge"))
    .ok();
}

/// Issue 14, points 4 and 14: a 1500-deep tree (which made mke2fs corrupt its heap) imports;
/// a tiny archive of a 1 TiB sparse file makes a small snapshot, not a 1.2 TiB one; an xz
/// bomb that holds more than the import may take is refused while it is measured, before
/// anything is made; nothing is left behind.
#[test]
fn deep_trees_import_and_size_bombs_are_bounded() {
    let free = nix::sys::statvfs::statvfs(&std::env::temp_dir()).unwrap();
    let free = free.blocks_available() as u64 * free.fragment_size() as u64;
    // Imports here may take at most 512 MiB.
    let reserve = free.saturating_sub(512 << 20);
    let env = Env::start_with(&format!("[limits]\nmin_free_space = {reserve}\n"), &[]);

    let deep = env.dir.path().join("deep.tar");
    {
        let mut tar = tar::Builder::new(fs::File::create(&deep).unwrap());
        let path = "d/".repeat(1500) + "bottom";
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, &path, &b"deep\n"[..]).unwrap();
        tar.finish().unwrap();
    }
    let snap = env.import(&deep, &[]);
    let image = Mounted::new(&env.snapshot_file(&snap), 0);
    assert_eq!(image.read(&("d/".repeat(1500) + "bottom")), "deep\n");
    drop(image);

    let sparse = env.dir.path().join("sparse-bomb.tar");
    gnu_sparse_bomb(&sparse, 1 << 40);
    assert!(fs::metadata(&sparse).unwrap().len() < 64 << 10);
    let snap = env.import(&sparse, &[]);
    let size = fs::metadata(env.snapshot_file(&snap)).unwrap().len();
    assert!(
        size < 128 << 20,
        "a snapshot of {size} bytes for a 1-byte file"
    );
    let image = Mounted::new(&env.snapshot_file(&snap), 0);
    assert_eq!(fs::metadata(image.path("huge")).unwrap().len(), 1 << 40);
    drop(image);

    // 2 GiB of zeros, compressed to a few hundred KiB.
    let bomb = env.dir.path().join("bomb.tar.xz");
    run(Command::new("sh")
        .arg("-ec")
        .arg(format!(
            "cd {} && truncate -s 2G zeros && tar --format=gnu -cf - zeros | xz -1 -T0 > {} && rm zeros",
            env.dir.path().display(),
            bomb.display()
        )))
    .ok();
    assert!(fs::metadata(&bomb).unwrap().len() < 1 << 20);
    let before: Vec<_> = fs::read_dir(env.state.join("snapshots")).unwrap().collect();
    let refused = env.amidala(&["base", "import", bomb.to_str().unwrap()]);
    assert!(
        refused.err().contains("limit_exceeded") && refused.stderr.contains("holds more than"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stderr.contains("unpacking"),
        "refused while it was measured, before an image was made: {}",
        refused.stderr
    );
    assert_eq!(
        fs::read_dir(env.state.join("snapshots")).unwrap().count(),
        before.len()
    );
    env.assert_no_leaks();
}
