//! Bounds and hostile clients: silent and half-frame clients are dropped and block nobody;
//! connections and builds per user are capped, with typed errors (root, real daemon).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use amidala::proto::{self, Request, Response};
use amidala_tests::{first_answer, Env};

const LIMITS: &str =
    "[limits]\nrequest_timeout = 1\nmax_builds_per_user = 1\nmax_connections_per_user = 3\n";

/// What the daemon says before closing a connection that sent `bytes` and then nothing.
fn answer_to(socket: &std::path::Path, bytes: &[u8]) -> Option<Response> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(bytes).unwrap();
    first_answer(&mut stream)
}

fn greeted(socket: &std::path::Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(
            &proto::encode_frame(&Request::Hello {
                protocol: proto::PROTOCOL_VERSION,
                client: "limits test".into(),
            })
            .unwrap(),
        )
        .unwrap();
    // The daemon's hello: the connection is counted by then.
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).unwrap();
    let mut body = vec![0; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut body).unwrap();
    assert!(matches!(
        proto::decode::<Response>(&body).unwrap(),
        Response::Hello { .. }
    ));
    stream
}

#[test]
fn silent_and_half_frame_clients_are_dropped_and_block_nobody() {
    let env = Env::start_with(LIMITS, &[]);
    // Two idle clients hold connections while a third is served at once.
    let silent = UnixStream::connect(&env.socket).unwrap();
    let mut half = UnixStream::connect(&env.socket).unwrap();
    half.write_all(&[0, 0]).unwrap();
    env.amidala(&["list"]).ok();
    for (name, mut stream) in [("silent", silent), ("half a frame", half)] {
        match first_answer(&mut stream) {
            Some(Response::Error(e)) => assert!(
                e.message.contains("no complete request within 1s"),
                "{name}: {e:?}"
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
    match answer_to(&env.socket, &[0, 0, 0, 9, b'{']) {
        Some(Response::Error(e)) => assert_eq!(e.code, proto::ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    env.amidala(&["list"]).ok();
}

#[test]
fn connections_and_builds_per_user_are_capped() {
    let env = Env::start_with(LIMITS, &[]);
    // Three connections open (greeted, idle): the fourth is refused with the reason.
    let open: Vec<UnixStream> = (0..3).map(|_| greeted(&env.socket)).collect();
    let refused = env.amidala(&["list"]);
    assert!(
        refused.err().contains("limit_exceeded")
            && refused.stderr.contains("connections open; the limit is 3"),
        "{}",
        refused.stderr
    );
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.amidala(&["list"]).code != Some(0) {
        assert!(Instant::now() < deadline, "connections were not released");
        std::thread::sleep(Duration::from_millis(50));
    }

    // One build per user at a time.
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let first = env
        .amidala_command(&ws, &["build", "--", "/bin/sh", "-c", "sleep 300"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let list = env.amidala(&["list", "--json"]).json();
        if let Some(b) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["state"] == "running")
        {
            break b["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let second = env.amidala_in(&ws, &["build", "--", "/bin/true"]);
    assert!(
        second.err().contains("limit_exceeded")
            && second
                .stderr
                .contains("you have 1 builds queued or running; the limit is 1"),
        "{}",
        second.stderr
    );
    env.amidala(&["cancel", &id]).ok();
    assert!(!first.wait_with_output().unwrap().status.success());
    assert!(
        env.build(&ws, &["--", "/bin/true"])["image_id"].is_string(),
        "a slot again once the first ended"
    );
    env.assert_no_leaks();
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Issue 14, point 10: a message whose control data carries more descriptors than a request
/// may (and more than the daemon's buffer holds, so that the kernel truncates it) costs the
/// daemon none of them, and its connection is closed at once.
#[test]
fn descriptors_beyond_the_limit_are_closed_not_leaked() {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let env = Env::start_with(LIMITS, &[]);
    let pid = env.daemon_pid().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    // SCM_RIGHTS takes at most 253 descriptors a message.
    let many: Vec<std::fs::File> = (0..250).map(|_| null.try_clone().unwrap()).collect();
    let raw: Vec<i32> = many.iter().map(|f| f.as_raw_fd()).collect();
    let hello = proto::encode_frame(&Request::Hello {
        protocol: proto::PROTOCOL_VERSION,
        client: "fd test".into(),
    })
    .unwrap();
    env.amidala(&["version"]).ok();
    let before = open_fds(pid);
    for (round, count) in [250usize, 3, 250, 2, 250]
        .into_iter()
        .cycle()
        .take(60)
        .enumerate()
    {
        let mut stream = UnixStream::connect(&env.socket).unwrap();
        let cmsg = [ControlMessage::ScmRights(&raw[..count])];
        let frame = if round % 2 == 0 {
            &hello[..]
        } else {
            &hello[..3]
        };
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[std::io::IoSlice::new(frame)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        if count > 2 {
            // Refused with the reason, and the connection closed at once (well within the
            // request timeout of 1 s, which a daemon waiting for more would reach).
            let started = Instant::now();
            match first_answer(&mut stream) {
                Some(Response::Error(e)) => {
                    assert!(e.message.contains("more than 2 descriptors"), "{e:?}")
                }
                other => panic!("{count} descriptors: {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_millis(900));
        }
    }
    // Give the daemon a moment to finish with the last connections, then count again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = open_fds(pid);
        if after <= before + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon holds {after} descriptors, {before} before 60 hostile messages"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    env.amidala(&["version"]).ok();
}

/// Issue 14, point 11: a connection beyond a user's share is refused at once, before the
/// client says anything, instead of being held until the request timeout; and no number of
/// connections keeps the daemon from answering (the total is bounded too).
#[test]
fn connections_beyond_the_limits_are_refused_at_once() {
    let env = Env::start_with(
        "[limits]\nrequest_timeout = 60\nmax_connections_per_user = 4\nmax_connections = 8\n",
        &[],
    );
    let held: Vec<UnixStream> = (0..4).map(|_| greeted(&env.socket)).collect();
    let mut refused = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let mut stream = UnixStream::connect(&env.socket).unwrap();
        match first_answer(&mut stream) {
            Some(Response::Error(e)) => {
                assert_eq!(e.code, proto::ErrorCode::LimitExceeded);
                assert!(e.message.contains("the limit is 4"), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "refused after {:?}: held until the request timeout",
            started.elapsed()
        );
        refused.push(stream);
    }
    // The client says what the limit is, even when the daemon closed before its hello.
    let run = env.amidala(&["version"]);
    assert!(
        run.err().contains("limit_exceeded") && run.stderr.contains("connections open"),
        "{}",
        run.stderr
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.amidala(&["version"]).code != Some(0) {
        assert!(Instant::now() < deadline, "connections were not released");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The configuration must leave room for more than one user.
    let mut bad = Env::start();
    bad.stop();
    std::fs::write(
        bad.dir.path().join("amidalad.toml"),
        "[limits]\nmax_connections_per_user = 8\nmax_connections = 8\n",
    )
    .unwrap();
    let out = std::process::Command::new(amidala_tests::bin_dir().join("amidalad"))
        .arg("--config")
        .arg(bad.dir.path().join("amidalad.toml"))
        .arg("--state-dir")
        .arg(&bad.state)
        .arg("--socket")
        .arg(&bad.socket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("less than max_connections"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 14, point 13: a fork bomb and a memory hog fail their own build only (per-build
/// `pids.max` and memory limit), while another build runs beside them; a build that asks for
/// no timeout gets the default one.
#[test]
fn a_fork_bomb_and_a_memory_hog_fail_their_own_build_only() {
    let env = Env::start_with(
        "max_builds = 4\n[limits]\nbuild_pids = 64\nbuild_memory = \"96M\"\nbuild_timeout = 20\nmax_running_builds_per_user = 4\n",
        &[],
    );
    env.import_busybox();
    let ws = env.workspace("ws", &[]);
    let bomb = env.spawn_client(
        &ws,
        &[
            "build",
            "--timeout",
            "8",
            "--",
            "/bin/sh",
            "-c",
            "f() { f | f & }; f; sleep 60",
        ],
    );
    let hog = env.spawn_client(
        &ws,
        &[
            "build",
            "--",
            "/bin/sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=400M count=1",
        ],
    );
    // Meanwhile, a build beside them, and the host's own processes, are fine.
    std::thread::sleep(Duration::from_secs(2));
    let beside = env.build(
        &ws,
        &[
            "--",
            "/bin/sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do true & done; wait",
        ],
    );
    assert!(beside["image_id"].is_string(), "{beside}");
    let host = std::process::Command::new("true").status().unwrap();
    assert!(host.success(), "the host can still fork");
    let bomb = bomb.wait_with_output().unwrap();
    let bomb_err = String::from_utf8_lossy(&bomb.stderr);
    assert!(
        !bomb.status.success() && bomb_err.contains("timeout") && bomb_err.contains("can't fork"),
        "{bomb_err}"
    );
    let hog = hog.wait_with_output().unwrap();
    let hog_err = String::from_utf8_lossy(&hog.stderr);
    assert!(
        !hog.status.success() && hog_err.contains("failed in phase provision"),
        "{hog_err}"
    );
    // No --timeout: the default of 20 s applies.
    let started = Instant::now();
    let slow = env.amidala_in(&ws, &["build", "--", "sleep", "120"]);
    assert!(
        slow.err().contains("did not finish within --timeout 20s"),
        "{}",
        slow.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(100));
    env.assert_no_leaks();
}
