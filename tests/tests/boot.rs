//! Images that boot: a real Debian tree (cloud kernel, systemd, udev) imported as a bootable
//! disk, built, and booted by the boot test in QEMU with legacy BIOS and with UEFI; kernel
//! changes inside a build; a broken image refused; the original tool's workflow from a root
//! tarball to an application image that boots.
//!
//! QEMU runs under KVM where KVM can run the guest and under TCG where it cannot (these
//! machines' nested KVM): the tests pass either way. Boots are slow under TCG (about 40 s), so
//! the tests of this file take turns, and boot only as often as they need.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use amidala_tests::{field, run, Env, Mounted};

/// One boot at a time: two cores, and a guest under TCG takes one.
static BOOTS: Mutex<()> = Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    BOOTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The image's tags, as `amidala images` lists them.
fn image_tags(env: &Env, image: &str) -> serde_json::Value {
    let images = env.amidala(&["images", "--json"]).json();
    images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == image)
        .unwrap_or_else(|| panic!("no image {image} in {images}"))["tags"]
        .clone()
}

/// The snapshot's record, as `amidala snapshots` lists it.
fn snapshot(env: &Env, id: &str) -> serde_json::Value {
    let all = env.amidala(&["snapshots", "--json"]).json();
    all.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no snapshot {id} in {all}"))
        .clone()
}

/// No VM of this test is left running, and nothing else of the environment.
#[track_caller]
fn assert_nothing_left(env: &Env) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !amidala_tests::qemu_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(amidala_tests::qemu_processes(), Vec::<String>::new());
    env.assert_no_leaks();
}

/// The root partition (3) of a bootable disk, mounted read-only.
fn root_of(image: &std::path::Path) -> Mounted {
    Mounted::new(image, 66 << 20)
}

#[test]
fn a_debian_tree_becomes_a_disk_that_boots_with_bios_and_uefi() {
    let _turn = take_turn();
    let env = Env::start();
    let tree = amidala_tests::debian_boot_rootfs();
    let imported = env.amidala(&[
        "base",
        "import",
        tree.to_str().unwrap(),
        "--tag",
        "os=debian",
    ]);
    let base = imported.ok().trim().to_owned();
    assert!(
        imported.stderr.contains("on a bootable GPT disk")
            && imported
                .stderr
                .contains("installing GRUB for legacy BIOS and UEFI"),
        "{}",
        imported.stderr
    );
    assert_eq!(snapshot(&env, &base)["tags"]["amidala:boot"], "bios+uefi");

    // The disk: a GPT with the BIOS boot partition, the ESP and the root, and a valid backup.
    let disk = env.snapshot_file(&base);
    let table = run(Command::new("sfdisk").arg("--dump").arg(&disk))
        .ok()
        .to_owned();
    for part in [
        "start=        2048, size=        2048, type=21686148-6449-6E6F-744E-656564454649",
        "start=        4096, size=      131072, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "start=      135168,",
        "type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ] {
        assert!(table.contains(part), "{part} not in\n{table}");
    }
    run(Command::new("sfdisk").arg("--verify").arg(&disk)).ok();
    // GRUB's boot sector in the MBR, its core image in partition 1, BOOTX64.EFI on the ESP.
    let bytes = fs::read(&disk).unwrap();
    let boot_img = fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
    assert_eq!(&bytes[..0x5c], &boot_img[..0x5c], "GRUB's boot sector");
    assert_eq!(&bytes[0x5c..0x64], &2048u64.to_le_bytes());
    assert_eq!(&bytes[510..512], &[0x55, 0xAA]);
    assert_eq!(
        &bytes[(1 << 20) + 0x1f4..(1 << 20) + 0x1fc],
        &2049u64.to_le_bytes()
    );
    let esp = format!("{}@@{}", disk.display(), 2 << 20);
    let listing = run(Command::new("mdir").args(["-i", &esp, "-b", "::/EFI/BOOT"]))
        .ok()
        .to_owned();
    assert!(listing.contains("BOOTX64.EFI"), "{listing}");
    let esp_info = run(Command::new("blkid")
        .args(["-p", "-O", &(2u64 << 20).to_string()])
        .arg(&disk))
    .ok()
    .to_owned();
    assert!(
        esp_info.contains("TYPE=\"vfat\"") && esp_info.contains("VERSION=\"FAT32\""),
        "{esp_info}"
    );
    // The menu and fstab name the root filesystem by its UUID, with the serial console.
    let root_info = run(Command::new("blkid")
        .args(["-p", "-o", "export", "-O", &(66u64 << 20).to_string()])
        .arg(&disk))
    .ok()
    .to_owned();
    let uuid = root_info
        .lines()
        .find_map(|l| l.strip_prefix("UUID="))
        .unwrap_or_else(|| panic!("{root_info}"))
        .to_owned();
    {
        let root = root_of(&disk);
        let menu = root.read("/boot/grub/grub.cfg");
        assert!(
            menu.starts_with("# amidala: this menu is written by amidala"),
            "{menu}"
        );
        assert!(
            menu.contains(&format!(
                "root=UUID={uuid} ro console=tty0 console=ttyS0,115200"
            )),
            "{menu}"
        );
        let fstab = root.read("/etc/fstab");
        assert!(fstab.contains(&format!("UUID={uuid} / ext4")), "{fstab}");
        assert!(fstab.contains("/boot/efi vfat"), "{fstab}");
        assert!(root.path("/boot/efi").is_dir());
    }

    // A build with the boot test: both firmware the image was made for, in QEMU.
    let ws = env.workspace("ws", &[]);
    let built = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--from",
            "os=debian",
            "--boot-test",
            "--",
            "/bin/sh",
            "-c",
            "echo built > /etc/built-by-amidala",
        ],
    );
    let result = built.json();
    let log = &built.stderr;
    for firmware in ["bios", "uefi"] {
        assert!(
            log.contains(&format!("boot test ({firmware}, kvm) passed"))
                || log.contains(&format!("boot test ({firmware}, tcg) passed")),
            "{log}"
        );
    }
    // The serial console reached the build's log: GRUB, the kernel, the login prompt.
    assert!(
        log.contains("console: ") && log.contains("Linux version"),
        "{log}"
    );
    assert!(log.contains("amidala-boot login:"), "{log}");
    // The guest's disk is writable (its writes go to the overlay): its root was remounted
    // read-write.
    assert!(log.contains("re-mounted"), "{log}");
    assert!(!log.contains("Failed to start systemd-remount-fs"), "{log}");
    if log.contains("KVM cannot run this guest") {
        assert!(log.contains("(bios, tcg) passed"), "{log}");
    }
    let tags = image_tags(&env, field(&result, "image_id"));
    assert_eq!(tags["amidala:boot-test"], "passed", "{tags}");
    assert_eq!(tags["amidala:boot"], "bios+uefi", "{tags}");
    let detail = tags["amidala:boot-test-detail"].as_str().unwrap();
    assert!(
        detail.starts_with("bios ") && detail.contains(", uefi "),
        "{detail}"
    );
    // The boot test never changed the image: the guest wrote to an overlay.
    let out = root_of(&env.snapshot_file(field(&result, "snapshot_id")));
    assert_eq!(out.read("/etc/built-by-amidala"), "built\n");
    assert_eq!(
        out.read("/etc/machine-id"),
        fs::read_to_string(tree.join("etc/machine-id")).unwrap(),
        "the guest's first boot wrote its machine id into the image"
    );
    drop(out);
    // `amidala run` of the image: the guest's console on the client's stdout, the keys from
    // its stdin; Ctrl-] leaves, and the VM is stopped before the client ends.
    let image = field(&result, "image_id");
    let mut client = env
        .amidala_command(env.dir.path(), &["run", image, "--firmware", "bios"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keys = client.stdin.take().unwrap();
    let console = Console::read(client.stdout.take().unwrap());
    console.wait_for("amidala-boot login:");
    // What is typed reaches the guest's getty: it asks for root's password.
    keys.write_all(b"root\n").unwrap();
    console.wait_for("Password:");
    keys.write_all(&[0x1d]).unwrap();
    let ended = client.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{said}");
    assert!(
        said.contains(&format!("the run of {image} ended: the client went away")),
        "{said}"
    );
    assert!(amidala_tests::qemu_processes().is_empty());
    assert_nothing_left(&env);
}

/// What a client's stdout shows, read on a thread of its own.
struct Console(std::sync::Mutex<(std::sync::mpsc::Receiver<Vec<u8>>, Vec<u8>)>);

impl Console {
    fn read(mut from: impl std::io::Read + Send + 'static) -> Console {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Console(std::sync::Mutex::new((rx, Vec::new())))
    }

    /// Waits (five minutes at most: a boot under TCG) until the output shows `text`.
    #[track_caller]
    fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let mut guard = self.0.lock().unwrap();
        let (rx, shown) = &mut *guard;
        while !String::from_utf8_lossy(shown).contains(text) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(bytes) => shown.extend_from_slice(&bytes),
                Err(_) => panic!(
                    "the console never showed {text:?}: {}",
                    String::from_utf8_lossy(shown)
                ),
            }
        }
    }
}

#[test]
fn a_build_that_changes_the_kernel_boots_what_it_left() {
    let _turn = take_turn();
    let env = Env::start();
    let base = env.import(&amidala_tests::debian_boot_rootfs(), &[]);
    let ws = env.workspace(
        "ws",
        &[(
            "kernel.sh",
            // The kernel's own package reinstalled (its postinst makes the initramfs again),
            // the initramfs regenerated, and a kernel of a newer version put beside it.
            "set -e\n\
             dpkg -i /var/cache/apt/archives/linux-image-*.deb\n\
             update-initramfs -u\n\
             v=$(ls /boot | sed -n 's/^vmlinuz-//p' | head -n1)\n\
             cp /boot/vmlinuz-$v /boot/vmlinuz-6.99.0-1-amidala\n\
             cp /boot/initrd.img-$v /boot/initrd.img-6.99.0-1-amidala\n\
             cp /boot/efi/EFI/BOOT/BOOTX64.EFI /boot/efi/EFI/BOOT/fallback.efi\n",
        )],
    );
    let built = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--boot-test",
            "--boot-firmware",
            "uefi",
            "--",
            "/bin/sh",
            "/workspace/kernel.sh",
        ],
    );
    let result = built.json();
    let log = &built.stderr;
    assert!(
        log.contains("update-initramfs: Generating /boot/initrd.img-"),
        "{log}"
    );
    assert!(
        log.contains("amidala: boot menu written for kernel 6.99.0-1-amidala, 6.1."),
        "{log}"
    );
    // The ESP is at /boot/efi, as the image's fstab says; a copy, written back, where this
    // kernel cannot mount vfat: the firmware boots from the partition as rewritten.
    assert!(
        log.contains("amidala: mounted partition 2 (vfat) at /boot/efi")
            || log.contains("amidala: wrote the build's /boot/efi ("),
        "{log}"
    );
    // GRUB's menu on the console has the new kernel first, and it is the one booted.
    assert!(log.contains("*Linux 6.99.0-1-amidala"), "{log}");
    assert!(!log.contains("(bios,"), "only UEFI was asked for: {log}");
    assert!(log.contains("amidala-boot login:"), "{log}");
    let out = root_of(&env.snapshot_file(field(&result, "snapshot_id")));
    let menu = out.read("/boot/grub/grub.cfg");
    let first = menu.find("menuentry").unwrap();
    assert!(
        menu[first..].starts_with("menuentry 'Linux 6.99.0-1-amidala'"),
        "{menu}"
    );
    drop(out);
    // amidala's ESP is partition 2, at 2 MiB.
    let snap = env.snapshot_file(field(&result, "snapshot_id"));
    let listed = run(Command::new("mdir").args([
        "-b",
        "-i",
        &format!("{}@@{}", snap.display(), 2 << 20),
        "::/EFI/BOOT",
    ]))
    .ok()
    .to_owned();
    assert!(
        listed.contains("BOOTX64.EFI") && listed.contains("fallback.efi"),
        "{listed}"
    );
    assert_nothing_left(&env);
}

/// An image with Debian's own GRUB: a build installs grub-pc (whose postinst runs update-grub),
/// reinstalls the kernel (whose hook runs it again) and runs update-grub itself, in the
/// contained chroot. GRUB's tools find the build's disk by the name its root is mounted under
/// (`/dev/disk/by-uuid/UUID`, not the builder's loop device), the menu they write names the
/// root by UUID, amidala leaves a menu it did not write alone, and the image boots from it.
#[test]
fn update_grub_in_a_build_writes_a_menu_that_boots() {
    let _turn = take_turn();
    let env = Env::start();
    let base = env.import(&amidala_tests::debian_boot_rootfs(), &[]);
    let ws = env.workspace(
        "ws",
        &[(
            "grub.sh",
            "set -e\n\
             export DEBIAN_FRONTEND=noninteractive\n\
             # What a cloud image's build says: no disk to install GRUB on, a serial console.\n\
             echo 'grub-pc grub-pc/install_devices_empty boolean true' | debconf-set-selections\n\
             mkdir -p /etc/default/grub.d\n\
             printf '%s\\n' 'GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200\"' \
               'GRUB_CMDLINE_LINUX_DEFAULT=\"\"' 'GRUB_TERMINAL=\"console serial\"' \
               'GRUB_TIMEOUT=1' > /etc/default/grub.d/serial.cfg\n\
             dpkg -i /var/cache/amidala-grub/*.deb\n\
             echo \"grub-probe: $(grub-probe --target=device /)\"\n\
             dpkg -i /var/cache/apt/archives/linux-image-6*.deb\n\
             update-initramfs -u\n\
             update-grub\n",
        )],
    );
    let built = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--boot-test",
            "--boot-firmware",
            "bios",
            // Room for GRUB and a second initramfs.
            "--size",
            "2G",
            "--",
            "/bin/sh",
            "/workspace/grub.sh",
        ],
    );
    let result = built.json();
    let log = &built.stderr;
    assert!(!log.contains("canonical path"), "{log}");
    assert!(log.contains("grub-probe: /dev/disk/by-uuid/"), "{log}");
    assert!(log.contains("Generating grub configuration file"), "{log}");
    assert!(
        log.contains("Found linux image: /boot/vmlinuz-6.1."),
        "{log}"
    );
    assert!(
        !log.contains("boot menu written"),
        "amidala leaves GRUB's menu alone: {log}"
    );
    // Booted from GRUB's menu (its entry's title on the serial console) to the login prompt.
    assert!(log.contains("Debian GNU/Linux"), "{log}");
    assert!(log.contains("amidala-boot login:"), "{log}");
    let out = root_of(&env.snapshot_file(field(&result, "snapshot_id")));
    let menu = out.read("/boot/grub/grub.cfg");
    assert!(
        menu.contains("### BEGIN /etc/grub.d/10_linux ###"),
        "{menu}"
    );
    let fstab = out.read("/etc/fstab");
    let uuid = fstab
        .lines()
        .find_map(|l| {
            l.strip_prefix("UUID=")
                .filter(|l| l.split_whitespace().nth(1) == Some("/"))
        })
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no root by UUID in {fstab}"));
    assert!(menu.contains(&format!("root=UUID={uuid} ")), "{menu}");
    assert!(!menu.contains("/dev/"), "no device of the builder: {menu}");
    drop(out);
    assert_nothing_left(&env);
}

#[test]
fn an_image_that_does_not_boot_fails_its_build_and_is_not_registered() {
    let _turn = take_turn();
    let env = Env::start();
    let base = env.import(&amidala_tests::debian_boot_rootfs(), &[]);
    let ws = env.workspace("ws", &[]);
    let failed = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--boot-timeout",
            "4m",
            "--",
            "/bin/sh",
            "-c",
            "rm /boot/vmlinuz-*",
        ],
    );
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    let error: serde_json::Value = serde_json::from_str(&failed.stdout).unwrap();
    assert_eq!(error["phase"], "boot_test", "{error}");
    assert_eq!(error["code"], "boot_test_failed", "{error}");
    let message = error["message"].as_str().unwrap();
    // Said why, with the console's last lines, and which snapshot is kept.
    assert!(
        message.contains("GRUB could not boot the kernel"),
        "{message}"
    );
    assert!(message.contains("the console's last lines"), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(
        failed
            .stderr
            .contains("holds no kernel with an initramfs any more"),
        "{}",
        failed.stderr
    );
    let kept = message
        .split_whitespace()
        .find(|w| w.starts_with("snap-"))
        .unwrap_or_else(|| panic!("{message}"));
    let kept = snapshot(&env, kept);
    assert!(
        kept["tags"]["amidala:failed-build"]
            .as_str()
            .unwrap()
            .starts_with("bld-"),
        "{kept}"
    );
    let images = env.amidala(&["images", "--json"]).json();
    assert_eq!(images.as_array().unwrap().len(), 0, "{images}");
    assert_nothing_left(&env);

    // Cancelled during its boot test: QEMU goes with the build.
    let client = env.spawn_client(
        &ws,
        &["build", "--source", &base, "--boot-test", "--", "/bin/true"],
    );
    env.build_in_phase("boot_test");
    let deadline = Instant::now() + Duration::from_secs(30);
    while amidala_tests::qemu_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(amidala_tests::qemu_processes().len(), 1);
    // While its image is tested, the snapshot is no source for builds by its tags.
    let snapshots = env.amidala(&["snapshots", "--json"]).json();
    assert!(
        snapshots
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["tags"]["amidala:failed-build"]
                .as_str()
                .is_some_and(|b| b.starts_with("bld-"))
                && s["tags"]["amidala:source-snapshot"] == base.as_str()
                && s["tags"]["amidala:build"] == s["tags"]["amidala:failed-build"]),
        "{snapshots}"
    );
    let (code, stderr) = amidala_tests::interrupt(client);
    assert_eq!(code, Some(130), "{stderr}");
    assert_nothing_left(&env);
}

/// An arm64 tree (Debian's arm64 cloud kernel and a busybox initramfs) on this x86 builder: a
/// disk for UEFI only, with arm64's root partition type and `EFI/BOOT/BOOTAA64.EFI` made from
/// the host's arm64 GRUB, booted by the boot test in QEMU's arm64 machine with AAVMF (TCG: KVM
/// runs only the host's own architecture) to the marker its init prints.
#[test]
fn an_arm64_tree_becomes_a_uefi_disk_that_boots_on_an_arm64_machine() {
    let _turn = take_turn();
    let env = Env::start();
    let tree = amidala_tests::arm64_boot_tree();
    let imported = env.amidala(&["base", "import", tree.to_str().unwrap()]);
    let base = imported.ok().trim().to_owned();
    assert!(
        imported.stderr.contains("boot menu for arm64 kernel 6.1.")
            && imported.stderr.contains("installing GRUB for UEFI (arm64)"),
        "{}",
        imported.stderr
    );
    let tags = &snapshot(&env, &base)["tags"];
    assert_eq!(tags["amidala:boot"], "uefi", "{tags}");
    assert_eq!(tags["amidala:boot-arch"], "arm64", "{tags}");

    let disk = env.snapshot_file(&base);
    let table = run(Command::new("sfdisk").arg("--dump").arg(&disk))
        .ok()
        .to_owned();
    assert!(
        table.contains("type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
        "arm64's root partition type: {table}"
    );
    run(Command::new("sfdisk").arg("--verify").arg(&disk)).ok();
    // No boot code in the MBR (UEFI only); BOOTAA64.EFI on the ESP, a PE for arm64 (0xAA64).
    let bytes = fs::read(&disk).unwrap();
    assert!(bytes[..440].iter().all(|&b| b == 0), "no BIOS boot code");
    let esp = format!("{}@@{}", disk.display(), 2 << 20);
    let listing = run(Command::new("mdir").args(["-i", &esp, "-b", "::/EFI/BOOT"]))
        .ok()
        .to_owned();
    assert!(
        listing.contains("BOOTAA64.EFI") && !listing.contains("BOOTX64.EFI"),
        "{listing}"
    );
    let efi = env.dir.path().join("BOOTAA64.EFI");
    run(Command::new("mcopy")
        .args(["-i", &esp, "::/EFI/BOOT/BOOTAA64.EFI"])
        .arg(&efi))
    .ok();
    let pe = fs::read(&efi).unwrap();
    let at = u32::from_le_bytes(pe[0x3c..0x40].try_into().unwrap()) as usize;
    assert_eq!(&pe[at..at + 4], b"PE\0\0");
    assert_eq!(&pe[at + 4..at + 6], &0xAA64u16.to_le_bytes(), "an arm64 PE");
    {
        let root = root_of(&disk);
        let menu = root.read("/boot/grub/grub.cfg");
        assert!(
            menu.contains("linux /boot/vmlinuz-6.1.") && !menu.contains("console="),
            "{menu}"
        );
        assert!(
            root.exists("/boot/grub/arm64-efi/normal.mod") && !root.exists("/boot/grub/i386-pc"),
            "arm64's GRUB modules only"
        );
    }

    // Legacy BIOS is refused for what the image is, before any VM.
    let bios = env.amidala(&["boot-test", &base, "--firmware", "bios"]);
    assert_eq!(bios.code, Some(2), "{}", bios.stderr);
    assert!(bios.stderr.contains("UEFI only"), "{}", bios.stderr);
    let ws = env.workspace("ws", &[]);
    let build = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            &base,
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--",
            "/bin/true",
        ],
    );
    assert!(build.err().contains("UEFI only"), "{}", build.stderr);

    // The boot test: GRUB from the ESP, the menu from the root, the kernel and its initramfs.
    let tested = env.amidala(&[
        "boot-test",
        &base,
        "--marker",
        "amidala-arm64-init: up on aarch64",
    ]);
    let log = &tested.stderr;
    tested.ok();
    assert!(log.contains("boot test (uefi, tcg)"), "{log}");
    assert!(log.contains("Linux version 6.1."), "{log}");
    assert!(log.contains("amidala-arm64-init: up on aarch64"), "{log}");
    let tags = &snapshot(&env, &base)["tags"];
    assert_eq!(tags["amidala:boot-test"], "passed", "{tags}");
    assert_nothing_left(&env);
}

#[test]
fn a_tree_without_a_kernel_imports_as_before_and_cannot_be_boot_tested() {
    // Its turn too: it checks that no VM runs.
    let _turn = take_turn();
    // A member, made before the daemon starts (which gives group amidala its socket).
    const MEMBER: &str = "amidala-t-boot-mallory";
    let _accounts = amidala_tests::Accounts::create(&[(MEMBER, "amidala")]);
    let env = Env::start();
    let rootfs = env.busybox_rootfs("rootfs");
    let base = env.import(&rootfs, &[]);
    assert_eq!(snapshot(&env, &base)["tags"]["amidala:boot"], "none");
    // One ext4 filesystem, the whole disk, as before.
    let info = run(Command::new("blkid")
        .arg("-p")
        .arg(env.snapshot_file(&base)))
    .ok()
    .to_owned();
    assert!(info.contains("TYPE=\"ext4\""), "{info}");
    // A --size too small for the content: the sandbox's reason, not the reader's broken pipe.
    fs::write(rootfs.join("big"), vec![7u8; 96 << 20]).unwrap();
    let full = env.amidala(&[
        "base",
        "import",
        rootfs.to_str().unwrap(),
        "--size",
        "80M",
        "--boot",
        "no",
    ]);
    assert!(
        full.err().contains("No space left on device"),
        "{}",
        full.stderr
    );
    fs::remove_file(rootfs.join("big")).unwrap();
    let refused = env.amidala(&["base", "import", rootfs.to_str().unwrap(), "--boot", "yes"]);
    assert!(
        refused
            .err()
            .contains("--boot yes, but the tree holds no kernel"),
        "{}",
        refused.stderr
    );
    let ws = env.workspace("ws", &[]);
    let failed = env.amidala_in(
        &ws,
        &["build", "--source", &base, "--boot-test", "--", "/bin/true"],
    );
    assert!(
        failed
            .err()
            .contains("cannot boot: it was imported from a tree without a kernel"),
        "{}",
        failed.stderr
    );
    let bad = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            &base,
            "--boot-firmware",
            "coreboot",
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("--boot-firmware"), "{}", bad.stderr);
    // `amidala boot-test` of it: refused for what it is, before any VM; another member may not
    // boot-test root's snapshot even once it is published.
    let own = env.amidala(&["boot-test", &base]);
    assert_eq!(own.code, Some(2), "{}", own.stderr);
    assert!(own.stderr.contains("cannot boot"), "{}", own.stderr);
    let run_it = env.amidala(&["run", &base]);
    assert_eq!(run_it.code, Some(2), "{}", run_it.stderr);
    assert!(run_it.stderr.contains("cannot boot"), "{}", run_it.stderr);
    env.amidala(&["base", "publish", &base]).ok();
    let client = env.dir.path().join("amidala");
    fs::copy(amidala_tests::bin_dir().join("amidala"), &client).unwrap();
    for command in ["boot-test", "run"] {
        let theirs = run(amidala_tests::as_user(MEMBER, &client)
            .args([command, &base, "--firmware", "bios"])
            .current_dir(env.dir.path())
            .env("AMIDALA_SOCKET", &env.socket));
        assert_eq!(theirs.code, Some(2), "{command}: {}", theirs.stderr);
        assert!(
            theirs.stderr.contains("neither yours nor published"),
            "{command}: {}",
            theirs.stderr
        );
    }
    assert!(amidala_tests::qemu_processes().is_empty());
    env.assert_no_leaks();
}

#[test]
fn the_original_workflow_from_a_root_tarball_to_an_application_image_that_boots() {
    let _turn = take_turn();
    let env = Env::start();
    // The root filesystem tarball the 2013 tool's users started from.
    let tarball = env.dir.path().join("debian-root.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-cf"])
        .arg(&tarball)
        .arg("-C")
        .arg(amidala_tests::debian_boot_rootfs())
        .arg("."))
    .ok();
    let base = env.import(&tarball, &[]);
    assert_eq!(snapshot(&env, &base)["tags"]["amidala:boot"], "bios+uefi");
    let ws = env.workspace("ws", &[]);
    // The system layer grows the disk to 3 GiB (issue 15, point 2): the GPT moves to the end,
    // the root partition and its filesystem grow, and the space is there to use.
    let grown = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--from",
            "amidala=base",
            "--size",
            "3G",
            "--snapshot-tag",
            "amidala=system",
            "--",
            "/bin/sh",
            "-c",
            "echo system > /etc/system-layer && fallocate -l 2G /var/tmp/fill && rm /var/tmp/fill",
        ],
    );
    let system = grown.json();
    assert!(
        grown.stderr.contains("grew partition 3 (the root) from")
            && grown.stderr.contains("to 3005 MiB to fill the disk")
            && grown.stderr.contains("grew the root filesystem from"),
        "{}",
        grown.stderr
    );
    let verified = run(Command::new("sgdisk")
        .arg("-v")
        .arg(env.snapshot_file(field(&system, "snapshot_id"))));
    assert!(
        verified.ok().contains("No problems found"),
        "{}",
        verified.stdout
    );
    let built = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--from",
            "amidala=system",
            "--boot-test",
            "--boot-firmware",
            "bios",
            "--",
            "/bin/sh",
            "-c",
            "test -f /etc/system-layer && echo app > /etc/app-layer",
        ],
    );
    let app = built.json();
    assert!(
        built.stderr.contains("amidala-boot login:"),
        "{}",
        built.stderr
    );
    let tags = image_tags(&env, field(&app, "image_id"));
    assert_eq!(tags["amidala:boot-test"], "passed", "{tags}");
    assert_eq!(
        snapshot(&env, field(&app, "snapshot_id"))["tags"]["amidala:source-snapshot"],
        field(&system, "snapshot_id")
    );
    let out = root_of(&env.snapshot_file(field(&app, "snapshot_id")));
    assert_eq!(out.read("/etc/app-layer"), "app\n");
    drop(out);
    // `amidala boot-test` of an existing image, the grown system layer's, with UEFI: the image
    // is tagged with what it showed.
    let system_image = field(&system, "image_id");
    let before = image_tags(&env, system_image);
    assert!(before.get("amidala:boot-test").is_none(), "{before}");
    let tested = env.amidala(&["boot-test", system_image, "--firmware", "uefi"]);
    assert!(
        tested.ok().contains(" booted: uefi "),
        "{}\n{}",
        tested.stdout,
        tested.stderr
    );
    assert!(
        tested.stderr.contains("amidala-boot login:"),
        "{}",
        tested.stderr
    );
    let after = image_tags(&env, system_image);
    assert_eq!(after["amidala:boot-test"], "passed", "{after}");
    let detail = after["amidala:boot-test-detail"].as_str().unwrap();
    assert!(detail.starts_with("uefi "), "{detail}");
    assert_nothing_left(&env);
}
