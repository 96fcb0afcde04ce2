//! `abide server` against clients that hold connections: a real server process whose file
//! descriptors are limited, and a thousand idle clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::fleet::{ServerProcess, data_dir, free_port};
use crate::workspace;

/// GET /api/v1/health from `source`; whether it answered 200.
fn health_from(source: &str, port: u16) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let Ok(mut s) = socket.connect(addr).await else {
            return false;
        };
        if s.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer));
        matches!(read.await, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200")
    })
}

#[test]
fn health_answers_while_a_thousand_idle_clients_connect_to_a_server_with_256_file_descriptors() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let port = free_port();
    let child = Command::new("sh")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_abide"))
        .args(["server", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // The default of 64 connections per address.
        .args(["--header-timeout", "60s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !health_from("127.0.0.2", port) {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "{limits}"
    );
    // A thousand clients from one address that say nothing: the first 64 are held (until the
    // header timeout), every later one is closed as it is accepted.
    let mut held = Vec::new();
    let mut closed = 0;
    for i in 0..1000 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if i < 64 {
            held.push(s);
            continue;
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        if matches!(s.read(&mut buf), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 936);
    // Meanwhile health answers to another address, at once, and the held ones stay open.
    let asked = Instant::now();
    assert!(health_from("127.0.0.2", port));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "an idle connection within its header timeout stays open"
        );
    }
    // One of the held clients asks: answered on its own connection.
    held[0]
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    held[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = held[0].read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(server);
}

#[test]
fn a_server_started_without_limits_keeps_the_documented_defaults() {
    use std::io::BufRead;
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["server", "--json", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let server = ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // The start's JSON says what the server holds to.
    let mut text = String::new();
    let started: serde_json::Value = loop {
        assert!(stdout.read_line(&mut text).unwrap() > 0, "no JSON: {text}");
        if let Ok(v) = serde_json::from_str(&text) {
            break v;
        }
    };
    assert_eq!(
        started["settings"],
        serde_json::json!({"header_timeout_s": 10, "body_timeout_s": 30, "enroll_rate": 30,
                           "max_connections_per_address": 64, "health_fresh_s": 900,
                           "metrics_refresh_s": 10, "device_poll_s": null}),
        "{started}"
    );
    // 30 enrolment attempts a minute from one address: the 31st is refused.
    let mut refused = Vec::new();
    for i in 1..=31 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(
            b"POST /api/v1/device/enroll HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 2\r\nconnection: close\r\n\r\n{}",
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        if answer.starts_with("HTTP/1.1 429") {
            assert!(answer.contains("at most 30 a minute"), "{answer}");
            refused.push(i);
        }
    }
    assert_eq!(refused, [31]);
    // An idle connection is closed after 10 s without a request head, not before.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let opened = Instant::now();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let read = idle.read(&mut buf);
    let after = opened.elapsed();
    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(15),
        "closed after {after:?}"
    );
    drop(server);
}

#[test]
fn enrolment_tokens_are_made_listed_and_revoked_from_the_command_line() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let server = crate::fleet::start_server(&data, free_port(), None);
    let admin = data.join("admin.token");
    let fleet = |args: &[&str]| crate::fleet::fleet(&dir, &server.url, &admin, args);
    let made = fleet(&[
        "enroll-token",
        "create",
        "--group",
        "lab",
        "--tag",
        "canary",
        "--uses",
        "2",
        "--device-id-pattern",
        "gw-*",
        "--product",
        "acme-gateway",
        "--expires",
        "1h",
    ]);
    assert!(made["token"].as_str().unwrap().starts_with("abide-enroll-"));
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            &made["uses"],
            &made["used"],
            &made["device_id_pattern"],
            &made["product"],
            &made["tags"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(0),
            &serde_json::json!("gw-*"),
            &serde_json::json!("acme-gateway"),
            &serde_json::json!(["canary"])
        )
    );
    let bound = fleet(&[
        "enroll-token",
        "create",
        "--group",
        "lab",
        "--device-id",
        "gw-1",
        "--device-id",
        "gw-2",
    ]);
    assert_eq!(
        (&bound["uses"], &bound["device_ids"]),
        (&serde_json::json!(1), &serde_json::json!(["gw-1", "gw-2"]))
    );
    let list = fleet(&["enroll-token", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list[0].get("token").is_none());
    let revoked = fleet(&["enroll-token", "revoke", &id]);
    assert_eq!(revoked["id"], id.as_str());
    assert!(revoked["revoked_at"].as_str().is_some());
    let list = fleet(&["enroll-token", "list"]);
    assert!(list[0]["revoked_at"].as_str().is_some());
    assert!(list[1]["revoked_at"].is_null());
    // A device enrolled with the bound token, then revoked from the command line.
    let body = serde_json::json!({"token": bound["token"], "device_id": "gw-1",
                                  "product": "acme-gateway", "compatible": ["acme-gw"]})
    .to_string();
    let port = server
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /api/v1/device/enroll HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let revoked = fleet(&["device", "revoke", "gw-1"]);
    assert_eq!(revoked["id"], "gw-1");
    let devices = fleet(&["devices"]);
    assert_eq!(devices[0]["revoked_at"], revoked["revoked_at"]);
    let missing = crate::json_args(
        &dir,
        &[
            "fleet",
            "--server",
            &server.url,
            "--token-file",
            admin.to_str().unwrap(),
            "device",
            "revoke",
            "gw-9",
        ],
        3,
    );
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no device gw-9"),
        "{missing}"
    );
}

#[test]
fn admin_tokens_with_roles_are_made_used_and_revoked_from_the_command_line() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let server = crate::fleet::start_server(&data, free_port(), None);
    let admin = data.join("admin.token");
    let fleet = |args: &[&str]| crate::fleet::fleet(&dir, &server.url, &admin, args);
    let made = fleet(&[
        "admin-token",
        "create",
        "--name",
        "dashboard",
        "--role",
        "viewer",
    ]);
    assert!(made["token"].as_str().unwrap().starts_with("abide-viewer-"));
    assert_eq!(
        (&made["name"], &made["role"]),
        (&"dashboard".into(), &"viewer".into())
    );
    let id = made["id"].as_str().unwrap().to_owned();
    let viewer = dir.join("viewer.token");
    std::fs::write(&viewer, made["token"].as_str().unwrap()).unwrap();
    // The viewer reads, and is refused a change with the role it lacks.
    let as_viewer = |args: &[&str], code: i32| {
        let mut all = vec![
            "fleet",
            "--server",
            &server.url,
            "--token-file",
            viewer.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        crate::json_args(&dir, &all, code)
    };
    assert_eq!(as_viewer(&["devices"], 0), serde_json::json!([]));
    let refused = as_viewer(&["enroll-token", "create", "--group", "lab"], 3);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("role is viewer"),
        "{refused}"
    );
    assert_eq!(fleet(&["enroll-token", "list"]), serde_json::json!([]));
    // A bad role is refused before anything is sent.
    let bad = crate::abide_args(
        &dir,
        &[
            "fleet",
            "--server",
            &server.url,
            "--token-file",
            admin.to_str().unwrap(),
            "admin-token",
            "create",
            "--name",
            "x",
            "--role",
            "root",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("\"root\" is not a role"), "{stderr}");
    let list = fleet(&["admin-token", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(list[0].get("token").is_none());
    let revoked = fleet(&["admin-token", "revoke", &id]);
    assert!(revoked["revoked_at"].as_str().is_some());
    let refused = as_viewer(&["devices"], 3);
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{refused}"
    );
}
