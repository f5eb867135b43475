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
