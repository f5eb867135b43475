//! A provisioner is root in its image and must not reach the host or other builds: the
//! classic escapes, tried from inside a real build, each recorded and asserted blocked.

use std::fs;

use amidala_tests::{escape_probe, field, Env, Mounted, Netns};

/// Each line: NAME and a command that succeeds only if the escape worked.
const ATTEMPTS: &str = r#"
mount-tmpfs        mount -t tmpfs none /tmp
mount-proc-again   mount -t proc proc /tmp
remount-root-rw    mount -o remount,rw /workspace
mknod-host-disk    mknod /tmp/disk b 254 0
sysrq              echo h > /proc/sysrq-trigger
sysctl             cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness
kcore              head -c 1 /proc/kcore | grep -q .
host-marker        test -e "$HOST_MARKER"
proc1-root         test -e "/proc/1/root$HOST_MARKER"
dotdot-walk        cd /workspace/../../../../../.. && test -e ".$HOST_MARKER"
chroot-walk        mkdir -p /tmp/jail/bin && cp /bin/busybox /tmp/jail/bin/ && chroot /tmp/jail /bin/busybox test -e "../../../..$HOST_MARKER"
signal-daemon      kill -0 "$DAEMON_PID"
see-host-pids      test "$(ls /proc | grep -c '^[0-9][0-9]*$')" -gt 20
loop-devices       ls /dev | grep -q loop
other-workspace    test -e "$OTHER_WORKSPACE/secret"
write-workspace    touch /workspace/written
"#;

fn script() -> String {
    let mut s = String::from("report=/root/escapes\n: > $report\n");
    for line in ATTEMPTS.lines().filter(|l| !l.trim().is_empty()) {
        let (name, command) = line.split_once(' ').unwrap();
        s.push_str(&format!(
            "if ( {} ) >/dev/null 2>&1; then echo '{name} ESCAPED'; else echo '{name} blocked'; fi >> $report\n",
            command.trim()
        ));
    }
    s.push_str("grep CapBnd /proc/self/status >> $report\nhostname amidala-build-hostname 2>/dev/null || true; echo \"hostname $(hostname)\" >> $report\n");
    s
}

#[test]
fn classic_escapes_fail_from_inside_a_provisioner() {
    let env = Env::start();
    env.import_busybox();
    let marker = env.dir.path().join("host-marker");
    fs::write(&marker, "the host's\n").unwrap();
    let other = env.workspace("other", &[("secret", "another user's\n")]);
    let ws = env.workspace("ws", &[]);
    let host_name = nix::unistd::gethostname().unwrap();
    let script = script();
    let args = [
        "build",
        "--json",
        "--opt",
        &format!("env.HOST_MARKER={}", marker.display()),
        "--opt",
        &format!("env.DAEMON_PID={}", env.daemon_pid().unwrap()),
        "--opt",
        &format!("env.OTHER_WORKSPACE={}", other.display()),
        "--opt",
        &format!("inline={script}"),
    ];
    let result = env.amidala_in(&ws, &args).json();
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    let report = out.read("/root/escapes");
    let attempts = ATTEMPTS.lines().filter(|l| !l.trim().is_empty()).count();
    let blocked = report.lines().filter(|l| l.ends_with(" blocked")).count();
    assert_eq!(blocked, attempts, "every escape blocked:\n{report}");
    assert!(!report.contains("ESCAPED"), "{report}");

    // The bounding set lacks what reaches beyond the image.
    let bounding = report
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    let bounding = u64::from_str_radix(bounding, 16).unwrap();
    for (name, bit) in [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_MODULE", 16),
        ("CAP_SYS_RAWIO", 17),
        ("CAP_SYS_PTRACE", 19),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_SYS_BOOT", 22),
        ("CAP_SYS_TIME", 25),
        ("CAP_MKNOD", 27),
        ("CAP_MAC_ADMIN", 33),
    ] {
        assert_eq!(
            bounding & (1 << bit),
            0,
            "{name} in the bounding set {bounding:x}"
        );
    }
    assert!(
        bounding & (1 << 0) != 0,
        "CAP_CHOWN kept: installing packages needs it"
    );
    // The host name is not the build's to change (no CAP_SYS_ADMIN), and it has its own
    // UTS namespace besides: the host's name is untouched either way.
    assert!(report.contains("\nhostname "), "{report}");
    assert_eq!(
        nix::unistd::gethostname().unwrap(),
        host_name,
        "the host's name is untouched"
    );
    assert_eq!(fs::read_to_string(&marker).unwrap(), "the host's\n");
    assert!(!ws.join("written").exists());
    drop(out);
    env.assert_no_leaks();
}

/// Capability sets of a task, from /proc: (effective, bounding).
fn capabilities(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    (field("CapEff:"), field("CapBnd:"))
}

#[test]
fn the_daemon_keeps_only_the_capabilities_its_work_needs() {
    let env = Env::start();
    let pid = env.daemon_pid().unwrap();
    let tasks: Vec<_> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    assert!(tasks.len() > 1, "the runtime's threads are there too");
    for task in tasks {
        let (effective, bounding) = capabilities(&fs::read_to_string(task.join("status")).unwrap());
        for (name, bit) in [
            ("CAP_DAC_READ_SEARCH", 2),
            ("CAP_NET_RAW", 13),
            ("CAP_IPC_LOCK", 14),
            ("CAP_SYS_MODULE", 16),
            ("CAP_SYS_RAWIO", 17),
            ("CAP_SYS_PTRACE", 19),
            ("CAP_SYS_BOOT", 22),
            ("CAP_SYS_NICE", 23),
            ("CAP_SYS_RESOURCE", 24),
            ("CAP_SYS_TIME", 25),
            ("CAP_MAC_ADMIN", 33),
            ("CAP_PERFMON", 38),
            ("CAP_BPF", 39),
        ] {
            assert_eq!(
                effective & (1 << bit),
                0,
                "{}: {name} effective",
                task.display()
            );
            assert_eq!(
                bounding & (1 << bit),
                0,
                "{}: {name} in the bounding set",
                task.display()
            );
        }
        for (name, bit) in [
            ("CAP_SYS_ADMIN", 21),
            ("CAP_MKNOD", 27),
            ("CAP_NET_ADMIN", 12),
            ("CAP_CHOWN", 0),
            ("CAP_SETUID", 7),
        ] {
            assert_ne!(
                effective & (1 << bit),
                0,
                "{}: {name} is needed",
                task.display()
            );
        }
    }
    assert!(
        env.daemon_log()
            .contains("capabilities dropped but for those kept"),
        "{}",
        env.daemon_log()
    );
}

#[test]
fn a_build_without_network_has_only_its_own_loopback() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let script = "grep : /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /root/interfaces; \
                  ip link show lo | grep -q UP && echo up > /root/lo";
    let isolated = env.build(&ws, &["--network", "none", "--", "/bin/sh", "-c", script]);
    let out = Mounted::new(&env.snapshot_file(field(&isolated, "snapshot_id")), 0);
    assert_eq!(out.read("/root/interfaces"), "lo\n", "nothing but loopback");
    assert_eq!(out.read("/root/lo"), "up\n");
    drop(out);
    let host = env.build(&ws, &["--", "/bin/sh", "-c", script]);
    let out = Mounted::new(&env.snapshot_file(field(&host, "snapshot_id")), 0);
    assert!(
        out.read("/root/interfaces").lines().count() > 1,
        "the host's network by default"
    );
    drop(out);
    let refused = env.amidala_in(&ws, &["build", "--network", "bridge", "--", "true"]);
    assert!(
        refused
            .err()
            .contains("--network \"bridge\" is not one of host, no-metadata, none"),
        "{}",
        refused.stderr
    );
    env.assert_no_leaks();
}

#[test]
fn no_metadata_keeps_the_network_but_not_the_metadata_service() {
    // A network of the test's own in which the metadata addresses exist and answer, next to
    // an address that is not the metadata service's.
    let ns = Netns::new("imds");
    ns.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "fd00:ec2::254/128",
        "dev",
        "lo",
        "nodad",
    ]);
    ns.ip(&["addr", "add", "10.254.0.1/32", "dev", "lo"]);
    let addrs = ["169.254.169.254", "fd00:ec2::254", "10.254.0.1"].map(|a| a.parse().unwrap());
    ns.serve_http(&addrs, "role-credentials");
    // The policy grants CAP_NET_RAW, which no-metadata must take away regardless.
    let env = Env::start_in(&ns, "[policy]\nnet_raw = true\n");
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    // busybox's static wget crashes looking up "http" without NSS libraries: plain nc.
    let script = "for addr in 169.254.169.254 fd00:ec2::254 10.254.0.1; do \
                    reply=$(printf 'GET /latest/meta-data/ HTTP/1.0\\r\\n\\r\\n' \
                            | nc -w 5 $addr 80 2>>/root/errors); rc=$?; \
                    case \"$reply\" in \
                      *role-credentials) echo \"role-credentials $rc\" >> /root/fetched;; \
                      *) echo \"nothing $rc\" >> /root/fetched;; \
                    esac; \
                  done; \
                  grep CapBnd /proc/self/status | cut -f2 > /root/capbnd";
    let fetched = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--", "/bin/sh", "-c", script]);
        let result = env.build(&ws, &all);
        let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
        let bounding = u64::from_str_radix(out.read("/root/capbnd").trim(), 16).unwrap();
        let errors = fs::read_to_string(out.path("/root/errors")).unwrap_or_default();
        (out.read("/root/fetched"), bounding, errors)
    };

    // The test can fail: with the host's network (which only admins, root here, may ask
    // for), all three answer.
    let (host, host_caps, _) = fetched(&["--network", "host"]);
    assert_eq!(
        host,
        "role-credentials 0\nrole-credentials 0\nrole-credentials 0\n"
    );
    const NET_RAW: u64 = 1 << 13;
    assert_ne!(
        host_caps & NET_RAW,
        0,
        "CAP_NET_RAW is kept where the policy grants it"
    );
    // no-metadata is the default network.
    let (default, _, _) = fetched(&[]);

    let (filtered, filtered_caps, errors) = fetched(&["--network", "no-metadata"]);
    let lines: Vec<&str> = filtered.lines().collect();
    assert_eq!(lines.len(), 3, "{filtered}");
    assert!(
        !lines[0].contains("role-credentials") && !lines[0].ends_with(" 0"),
        "169.254.169.254 is out of reach: {filtered}"
    );
    assert!(
        !lines[1].contains("role-credentials") && !lines[1].ends_with(" 0"),
        "fd00:ec2::254 is out of reach: {filtered}"
    );
    assert_eq!(
        errors.matches("Operation not permitted").count(),
        2,
        "refused at once, not left to time out: {errors}"
    );
    assert_eq!(
        lines[2], "role-credentials 0",
        "the rest of the network is not"
    );
    assert_eq!(
        filtered_caps & NET_RAW,
        0,
        "no packet sockets to go around the filter"
    );
    assert_eq!(default, filtered, "the default network is no-metadata");
    // The filter went with the build: the next build with the host's network reaches it all.
    assert_eq!(fetched(&["--network", "host"]).0, host);
    env.assert_no_leaks();
}

/// Issue 14, points 3 and 9: the calls a provisioner never needs are refused by the seccomp
/// filter (the file-handle escape, keyrings, user namespaces, BPF, ...), and what the
/// container runtimes hide of /proc is hidden or read-only.
#[test]
fn refused_calls_and_hidden_proc_paths() {
    let env = Env::start();
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    fs::copy(escape_probe(), ws.join("escape-probe")).unwrap();
    let script = "/workspace/escape-probe calls > /root/calls; \
                  /workspace/escape-probe handle /workspace > /root/handle; \
                  for f in timer_list keys kcore sched_debug; do \
                    echo \"$f $(cat /proc/$f 2>/dev/null | wc -c)\"; done > /root/hidden; \
                  for f in irq/default_smp_affinity sys/kernel/hostname; do \
                    if ( cat /proc/$f > /proc/$f ) 2>/dev/null; then echo \"$f WRITTEN\"; \
                    else echo \"$f read-only\"; fi; done > /root/readonly; \
                  grep -E '^Cap(Bnd|Eff)' /proc/self/status > /root/caps";
    let result = env.build(&ws, &["--", "/bin/sh", "-c", script]);
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    let calls = out.read("/root/calls");
    let lines: Vec<&str> = calls.lines().collect();
    assert!(lines.len() >= 16, "{calls}");
    for line in &lines {
        let (name, result) = line.split_once(' ').unwrap();
        let expected = if name == "clone3" {
            "errno 38 (Function not implemented)"
        } else {
            "errno 1 (Operation not permitted)"
        };
        assert_eq!(result, expected, "{name}:\n{calls}");
    }
    let handle = out.read("/root/handle");
    assert_eq!(
        handle, "open_by_handle_at errno 1 (Operation not permitted)\n",
        "the shocker escape"
    );
    assert_eq!(
        out.read("/root/hidden"),
        "timer_list 0\nkeys 0\nkcore 0\nsched_debug 0\n"
    );
    assert_eq!(
        out.read("/root/readonly"),
        "irq/default_smp_affinity read-only\nsys/kernel/hostname read-only\n"
    );
    let caps = out.read("/root/caps");
    const DAC_READ_SEARCH: u64 = 1 << 2;
    const NET_RAW: u64 = 1 << 13;
    for line in caps.lines() {
        let bits = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(bits & (DAC_READ_SEARCH | NET_RAW), 0, "{line}");
    }
    drop(out);
    env.assert_no_leaks();
}

/// Issue 14, point 7: with the host's network, a build cannot capture another build's traffic
/// (no CAP_NET_RAW, no packet sockets) unless the policy grants raw sockets, which shows the
/// test can fail.
#[test]
fn a_build_cannot_capture_another_builds_traffic() {
    for (policy, expected) in [("", "refused"), ("[policy]\nnet_raw = true\n", "seen")] {
        let env = Env::start_with(policy, &[]);
        env.import_busybox();
        let ws = env.workspace("ws", &[]);
        fs::copy(escape_probe(), ws.join("escape-probe")).unwrap();
        let marker = format!("amidala-secret-{}", std::process::id());
        // Another build talks on the host's network for a while...
        let talker = env.spawn_client(
            &ws,
            &[
                "build",
                "--network",
                "host",
                "--",
                "/workspace/escape-probe",
                "send",
                &marker,
                "30",
            ],
        );
        // ... while this one listens to every interface.
        let script = format!("/workspace/escape-probe capture {marker} 20 > /root/capture 2>&1");
        let result = env.build(&ws, &["--network", "host", "--", "/bin/sh", "-c", &script]);
        let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
        let capture = out.read("/root/capture");
        drop(out);
        let _ = amidala_tests::interrupt(talker);
        match expected {
            "refused" => assert_eq!(
                capture, "packet-socket errno 1 (Operation not permitted)\n",
                "default policy"
            ),
            _ => assert!(
                capture.contains("packet-socket ok") && capture.contains("capture seen"),
                "net_raw = true: {capture}"
            ),
        }
        env.assert_no_leaks();
    }
}
