//! The systemd side: the units pass `systemd-analyze verify`, and the daemon serves a socket
//! systemd passes it (socket activation, here by `systemd-socket-activate`, which starts the
//! daemon on the first connection) and says it is ready (sd_notify) only once it serves.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use amidala_tests::{bin_dir, field, repo_dir, run, Env};

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["amidalad.service", "amidalad.socket"] {
        let text = std::fs::read_to_string(repo_dir().join("systemd").join(unit)).unwrap();
        // Verified against the binary just built, where the package would install it.
        let text = text.replace(
            "/usr/bin/amidalad",
            bin_dir().join("amidalad").to_str().unwrap(),
        );
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(dir.path().join("amidalad.socket"))
        .arg(dir.path().join("amidalad.service")));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("amidalad."))
        .collect();
    assert!(complaints.is_empty(), "{}", out.stderr);
}

#[test]
fn a_socket_systemd_passes_is_served_and_readiness_is_notified() {
    let mut env = Env::start();
    let notify_path = env.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let socket = env.socket.to_str().unwrap().to_owned();
    // systemd-socket-activate binds the socket, waits for a connection, then runs the daemon
    // with the socket as descriptor 3 (LISTEN_FDS=1, LISTEN_PID its own pid), passing on only
    // the environment it is told to.
    env.restart_through(
        &[
            "systemd-socket-activate",
            "-l",
            &socket,
            "-E",
            "NOTIFY_SOCKET",
        ],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    // The harness's own connection started it; requests are served.
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let result = env.build(&ws, &["--", "true"]);
    assert!(field(&result, "image_id").starts_with("ami-"));
    let log = env.daemon_log();
    assert!(log.contains("serving the socket systemd passed"), "{log}");

    // READY=1 came, once.
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message}");

    // On SIGTERM it says it is stopping, and leaves systemd's socket where it is.
    env.stop();
    let n = notify.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message}");
    assert!(env.socket.exists(), "the socket is systemd's to remove");
    std::fs::remove_file(&env.socket).unwrap();
}
