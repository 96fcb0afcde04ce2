//! The agent's local API end to end: a real `abide agent` serving its socket (and TCP with
//! mutual TLS), the `abide` command as its client, schedules carried out on simulated devices
//! and surviving agent restarts, and a window that opens in the test's future (clock
//! injected into an agent run in-process).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abide_agent::daemon::{Agent, Exit, Options};
use abide_agent::health::Clock;
use abide_core::schedule::{Origin, Rollback, Schedule, Source, When};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::device::Sim;
use crate::{abide_args, json_args};

/// `abide agent` on the simulated device, serving its socket; killed when dropped.
pub(crate) struct Running {
    child: Option<Child>,
}

impl Running {
    pub(crate) fn start(sim: &Sim) -> Running {
        let child = Command::new(env!("CARGO_BIN_EXE_abide"))
            .args(["agent", "--json", "--config", "dev/system.toml"])
            .current_dir(&sim.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("abide agent starts");
        let socket = sim.path("dev/agent.sock");
        wait("the agent's socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        Running { child: Some(child) }
    }

    /// The number of threads the agent runs now.
    fn threads(&self) -> usize {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits for the agent to stop by itself (after an activation) and returns its JSON.
    fn exits(mut self) -> Value {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `abide ARGS --config dev/system.toml --json` on the device, expecting exit code `exit`.
pub(crate) fn dev(sim: &Sim, args: &[&str], exit: i32) -> Value {
    let mut all = args.to_vec();
    all.extend(["--config", "dev/system.toml"]);
    json_args(&sim.dir, &all, exit)
}

/// `abide schedule watch ID --json` on a schedule that ended without completing: exit 1, its
/// events as JSON lines (the last one saying how it ended) and the code on standard error.
fn watch_ended(sim: &Sim, id: &str) -> (Value, String) {
    let out = abide_args(
        &sim.dir,
        &[
            "schedule",
            "watch",
            id,
            "--json",
            "--config",
            "dev/system.toml",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "watch {id}: {stderr}");
    let last: Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .expect("an event"),
    )
    .unwrap();
    let code = stderr
        .lines()
        .find_map(|l| l.strip_prefix("abide: error ["))
        .and_then(|l| l.split_once(']'))
        .map(|(code, _)| code.to_owned())
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    (last, code)
}

pub(crate) fn schedule(sim: &Sim, id: &str) -> Value {
    dev(sim, &["schedule", "status", id], 0)
}

fn error_of(v: &Value) -> String {
    format!(
        "{}: {}",
        v["error"]["code"].as_str().unwrap_or_default(),
        v["error"]["message"].as_str().unwrap_or_default()
    )
}

/// `GET /metrics` over the agent's socket (HTTP/2 with prior knowledge), which must equal
/// what `abide metrics` prints.
pub(crate) fn metrics(sim: &Sim) -> String {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let text = rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(sim.path("dev/agent.sock"))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("http://agent/metrics")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    });
    let cli = dev(sim, &["metrics"], 0);
    let cli = cli["text"].as_str().unwrap();
    // Two readings a moment apart: equal but for nothing (no clock in the text).
    assert_eq!(cli, text);
    text
}

pub(crate) fn sha256_of(path: &Path) -> String {
    abide_bundle::Digest::of(&std::fs::read(path).unwrap()).to_string()
}

#[test]
fn the_socket_belongs_to_the_api_group_and_an_unknown_group_stops_the_agent() {
    use std::os::unix::fs::MetadataExt;
    let sim = Sim::new(None);
    // A group every Debian system has, by name, as /etc/group numbers it.
    let group = std::fs::read_to_string("/etc/group").unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("daemon:x:"))
        .and_then(|rest| rest.split(':').next())
        .expect("a daemon group")
        .parse()
        .unwrap();
    let config = sim.path("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[api]\n", "[api]\ngroup = \"daemon\"\n"),
    )
    .unwrap();
    let agent = Running::start(&sim);
    let meta = std::fs::metadata(sim.path("dev/agent.sock")).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (gid, 0o660));
    drop(agent);
    // A group that does not exist: the agent does not start, and says which key.
    std::fs::write(
        &config,
        text.replace("[api]\n", "[api]\ngroup = \"no-such-group\"\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["agent", "--config", "dev/system.toml"])
        .current_dir(&sim.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("api.group") && stderr.contains("no-such-group"),
        "{stderr}"
    );
}

#[test]
fn health_checks_that_time_out_leave_no_process_and_no_thread_of_the_agent_behind() {
    // A check that starts a child and hangs: each call times out after 0.3 s.
    let sim = Sim::new(Some("sleep 300 & echo $! >> PIDS; sleep 299"));
    let config = sim.path("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("timeout = \"30s\"", "timeout = \"0.3s\"")
            .replace("PIDS", sim.path("pids").to_str().unwrap()),
    )
    .unwrap();
    let agent = Running::start(&sim);
    let h = dev(&sim, &["health"], 3);
    assert!(
        h["checks"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out")
            || h.to_string().contains("timed out"),
        "{h}"
    );
    let before = agent.threads();
    for _ in 0..20 {
        dev(&sim, &["health"], 3);
    }
    assert_eq!(
        agent.threads(),
        before,
        "threads after 20 timed-out health checks"
    );
    let pids = std::fs::read_to_string(sim.path("pids")).unwrap();
    assert_eq!(pids.lines().count(), 21, "{pids}");
    let since = Instant::now();
    let alive = || {
        pids.lines()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
                })
            })
            .count()
    };
    while alive() > 0 && since.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(alive(), 0, "children of the timed-out checks still run");
}

#[test]
fn schedules_through_the_socket_update_the_device_and_survive_an_agent_restart() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 7);
    let untouched = sim.fingerprint();

    // Without the agent, scheduling says so; what works offline still does.
    let v = dev(&sim, &["schedule", "list"], 3);
    assert!(
        error_of(&v).starts_with("agent-not-running: the agent is not running"),
        "{v}"
    );
    assert_eq!(dev(&sim, &["status"], 0)["state"], "idle");

    let agent = Running::start(&sim);
    let mode = std::fs::metadata(sim.path("dev/agent.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "the socket is owner and group only");

    // Bad requests are refused with what was wrong, and make no schedule.
    let v = dev(
        &sim,
        &["schedule", "update", "--source", "missing.abide"],
        1,
    );
    assert!(
        error_of(&v).starts_with("invalid-argument: ") && error_of(&v).contains("no such file"),
        "{v}"
    );
    let v = dev(
        &sim,
        &["schedule", "update", "--source", &b, "--at", "next tuesday"],
        1,
    );
    assert!(error_of(&v).contains("RFC 3339"), "{v}");
    let v = dev(
        &sim,
        &["schedule", "update", "--source", &b, "--in-window"],
        1,
    );
    assert!(
        error_of(&v).starts_with("failed-precondition: ")
            && error_of(&v).contains("no maintenance window"),
        "{v}"
    );
    let v = dev(
        &sim,
        &["schedule", "update", "--source", &b, "--sha256", "abc"],
        1,
    );
    assert!(error_of(&v).contains("64 hex digits"), "{v}");
    assert_eq!(dev(&sim, &["schedule", "list"], 0), serde_json::json!([]));

    // A schedule for later survives the agent's restart, and is cancelled before it starts.
    let s1 = dev(
        &sim,
        &[
            "schedule",
            "update",
            "--source",
            &b,
            "--at",
            "2099-01-01T00:00:00Z",
        ],
        0,
    );
    assert_eq!(
        (s1["id"].as_str(), s1["state"].as_str(), s1["when"].as_str()),
        (Some("s1"), Some("pending"), Some("at"))
    );
    drop(agent);
    let agent = Running::start(&sim);
    let listed = dev(&sim, &["schedule", "list"], 0);
    assert_eq!(listed[0]["id"], "s1");
    assert_eq!(listed[0]["state"], "pending");
    assert_eq!(listed[0]["at"], "2099-01-01T00:00:00Z");
    let v = dev(&sim, &["schedule", "cancel", "s1"], 0);
    assert_eq!(v["state"], "cancelled");
    let v = dev(&sim, &["schedule", "cancel", "s1"], 1);
    assert!(
        error_of(&v).contains("cannot cancel a schedule that is cancelled"),
        "{v}"
    );
    let v = dev(&sim, &["schedule", "cancel", "s9"], 1);
    assert!(error_of(&v).starts_with("not-found: "), "{v}");
    let (last, code) = watch_ended(&sim, "s1");
    assert_eq!(
        (last["state"].as_str(), code.as_str()),
        (Some("cancelled"), "schedule-cancelled")
    );
    assert_eq!(sim.fingerprint(), untouched);

    // A bundle that is not the one pinned fails the schedule before anything changes.
    let v = dev(
        &sim,
        &[
            "schedule",
            "update",
            "--source",
            &b,
            "--sha256",
            &"0".repeat(64),
        ],
        0,
    );
    assert_eq!(v["id"], "s2");
    wait("s2 to fail", || {
        schedule_if_up(&sim, "s2").is_some_and(|v| v["state"] == "failed")
    });
    let s2 = schedule(&sim, "s2");
    assert!(
        s2["reason"].as_str().unwrap().contains("sha256 mismatch"),
        "{s2}"
    );
    let (last, code) = watch_ended(&sim, "s2");
    assert_eq!(
        (last["state"].as_str(), code.as_str()),
        (Some("failed"), "schedule-failed")
    );
    assert_eq!(sim.fingerprint(), untouched);

    // The right one goes through: watched until the device restarts into it.
    let sha = sha256_of(&sim.path(&b));
    let v = dev(
        &sim,
        &["schedule", "update", "--source", &b, "--sha256", &sha],
        0,
    );
    assert_eq!(v["id"], "s3");
    let out = abide_args(
        &sim.dir,
        &[
            "schedule",
            "watch",
            "s3",
            "--json",
            "--config",
            "dev/system.toml",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["transaction_state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"downloading"), "{events:?}");
    assert_eq!(states.last(), Some(&"activated"), "{events:?}");
    let last_progress = events.iter().rfind(|e| e["total"] != 0).unwrap();
    assert_eq!(last_progress["bytes"], last_progress["total"]);
    assert_eq!(agent.exits()["exit"], "reboot");

    let v = json_args(&sim.dir, &["sim", "reboot", "dev"], 0);
    assert_eq!(v["status"]["state"], "committed");
    let _agent = Running::start(&sim);
    let s3 = schedule(&sim, "s3");
    assert_eq!(
        (
            s3["state"].as_str(),
            s3["version"].as_str(),
            s3["sha256"].as_str()
        ),
        (Some("completed"), Some("2.0.0"), Some(sha.as_str()))
    );
    let status = dev(&sim, &["status"], 0);
    assert_eq!(
        (status["version"].as_str(), status["state"].as_str()),
        (Some("2.0.0"), Some("committed"))
    );
    let text = metrics(&sim);
    for line in [
        "abide_agent_schedules{state=\"completed\"} 1",
        "abide_agent_schedules{state=\"failed\"} 1",
        "abide_agent_schedules{state=\"cancelled\"} 1",
        "abide_agent_transaction_state{state=\"committed\"} 1",
        "abide_agent_reboot_to_healthy_seconds ",
        "abide_agent_download_seconds ",
        "abide_agent_audit_log_ok 1",
    ] {
        assert!(text.contains(line), "{line} in {text}");
    }
}

#[test]
fn status_health_and_history_read_the_files_when_the_agent_goes_away_without_answering() {
    // Something holds the socket but closes every connection before answering: an agent that
    // is going away as it restarts. The questions that only read are answered from the
    // device's files; a command that changes something says the agent failed.
    let sim = Sim::new(None);
    let socket = sim.path("dev/agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let status = dev(&sim, &["status"], 0);
    assert_eq!(
        (status["state"].as_str(), status["version"].as_str()),
        (Some("idle"), Some("1.0.0")),
        "{status}"
    );
    assert_eq!(dev(&sim, &["history"], 0), serde_json::json!([]));
    let health = dev(&sim, &["health"], 0);
    assert_eq!(health["healthy"], true, "{health}");
    let refused = dev(&sim, &["schedule", "list"], 3);
    assert_eq!(refused["error"]["code"], "agent", "{refused}");
}

#[test]
fn a_manual_trial_waits_for_the_operator_and_rollback_and_history_go_through_the_agent() {
    // The health check fails: an automatic gate would roll back at once.
    let sim = Sim::new(Some("test \"$ABIDE_VERSION\" = 1.0.0"));
    let b = sim.bundle("2.0.0", 1, 8);
    let agent = Running::start(&sim);
    let v = dev(
        &sim,
        &["schedule", "update", "--source", &b, "--no-auto-rollback"],
        0,
    );
    assert_eq!(v["rollback"], "manual");
    assert_eq!(agent.exits()["exit"], "reboot");
    let v = json_args(&sim.dir, &["sim", "reboot", "dev"], 0);
    assert_eq!(v["status"]["state"], "trial", "{v}");

    let _agent = Running::start(&sim);
    let h = dev(&sim, &["health"], 3);
    assert_eq!(h["healthy"], false);
    assert_eq!(h["checks"][0]["outcome"], "fail");
    assert_eq!(schedule(&sim, "s1")["state"], "in_progress");
    // Activated: too late to cancel, roll back instead.
    let v = dev(&sim, &["schedule", "cancel", "s1"], 1);
    assert!(
        error_of(&v).starts_with("failed-precondition: ")
            && error_of(&v).contains("roll back instead"),
        "{v}"
    );
    let v = dev(&sim, &["rollback", "--reason", "the screen stays dark"], 0);
    assert_eq!(
        (v["state"].as_str(), v["reboot"].as_bool()),
        (Some("rolled_back"), Some(true))
    );
    wait("s1 to follow the rollback", || {
        schedule(&sim, "s1")["state"] == "rolled_back"
    });
    let (last, code) = watch_ended(&sim, "s1");
    assert_eq!(
        (last["state"].as_str(), code.as_str()),
        (Some("rolled_back"), "schedule-rolled-back")
    );
    assert!(
        schedule(&sim, "s1")["reason"]
            .as_str()
            .unwrap()
            .contains("the screen stays dark")
    );
    let history = dev(&sim, &["history"], 0);
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["version"], "2.0.0");
    assert_eq!(history[0]["reason"], "operator: the screen stays dark");
    assert!(metrics(&sim).contains("abide_agent_rollbacks_total{reason=\"operator\"} 1"));
    drop(_agent);
    // Offline, the history reads the same from the audit log, whose chain is checked first.
    assert_eq!(dev(&sim, &["history"], 0), history);
    let log = sim.path("dev/state/audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &log,
        text.replacen("the screen stays dark", "the screen stays lit", 1),
    )
    .unwrap();
    let v = dev(&sim, &["history"], 3);
    assert_eq!(v["error"]["code"], "audit", "{v}");
    std::fs::write(&log, text).unwrap();
    let v = json_args(&sim.dir, &["sim", "reboot", "dev"], 0);
    assert_eq!(v["status"]["booted"], "A");
}

/// Serves `body` over HTTP, `pace` bytes every 20 ms.
pub(crate) fn slow_server(body: Vec<u8>, pace: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/bundle.abide", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut req = [0u8; 4096];
                let _ = conn.read(&mut req);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for piece in body.chunks(pace) {
                    if conn.write_all(piece).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    url
}

/// Schedules an update from `url`, which must fail within 20 seconds; returns the schedule.
fn fails_within_20s(sim: &Sim, url: &str) -> Value {
    let started = Instant::now();
    dev(sim, &["schedule", "update", "--source", url], 0);
    wait("s1 to fail", || schedule(sim, "s1")["state"] == "failed");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    schedule(sim, "s1")
}

#[test]
fn a_url_that_drips_its_bundle_fails_the_schedule_at_the_minimum_rate() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 13);
    // 50 bytes a second: far under 1 KiB/s over a 2-second window.
    let url = slow_server(std::fs::read(sim.path(&b)).unwrap(), 1);
    let config = sim.path("dev/system.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[download]\nmin_rate = \"1K\"\nwindow = \"2s\"\n");
    std::fs::write(&config, text).unwrap();
    let a_before = sha256_of(&sim.path("dev/slots/rootfs.A.img"));
    let _agent = Running::start(&sim);
    let s1 = fails_within_20s(&sim, &url);
    let reason = s1["reason"].as_str().unwrap();
    assert!(
        reason.contains("under the minimum of 1024 bytes/s ([download] min_rate)"),
        "{s1}"
    );
    // Nothing was activated: no trial, group A runs on untouched.
    let boot: Value =
        serde_json::from_slice(&std::fs::read(sim.path("dev/boot.json")).unwrap()).unwrap();
    assert_eq!(
        (&boot["trial"], &boot["booted"]),
        (&Value::Null, &Value::from("A")),
        "{boot}"
    );
    assert_eq!(sha256_of(&sim.path("dev/slots/rootfs.A.img")), a_before);
    assert_ne!(dev(&sim, &["status"], 0)["state"], "activated");
}

/// Serves `body` over HTTP after `pause` of silence following the response's head.
fn paused_server(body: Vec<u8>, pause: Duration) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/bundle.abide", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let _ = conn.read(&mut [0u8; 4096]);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                std::thread::sleep(pause);
                let _ = conn.write_all(&body);
            });
        }
    });
    url
}

#[test]
fn a_silent_url_fails_at_the_window_and_with_no_minimum_a_pause_is_waited_out() {
    let with = |download: &str| {
        let sim = Sim::new(None);
        let config = sim.path("dev/system.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\n[download]\n{download}"));
        std::fs::write(&config, text).unwrap();
        sim
    };
    // A server that answers and then sends nothing: measured as one that sends too little.
    let sim = with("min_rate = \"1K\"\nwindow = \"2s\"\n");
    let b = sim.bundle("2.0.0", 1, 15);
    let url = paused_server(
        std::fs::read(sim.path(&b)).unwrap(),
        Duration::from_secs(3600),
    );
    let agent = Running::start(&sim);
    let s1 = fails_within_20s(&sim, &url);
    assert!(
        s1["reason"]
            .as_str()
            .unwrap()
            .contains("brought 0 bytes in the last 2 s, under the minimum of 1024 bytes/s"),
        "{s1}"
    );
    drop(agent);
    // With no minimum, three seconds of silence over one-second windows are waited out.
    let sim = with("min_rate = \"0\"\nwindow = \"1s\"\n");
    let b = sim.bundle("2.0.0", 1, 16);
    let url = paused_server(std::fs::read(sim.path(&b)).unwrap(), Duration::from_secs(3));
    let agent = Running::start(&sim);
    dev(&sim, &["schedule", "update", "--source", &url], 0);
    assert_eq!(
        agent.exits()["exit"],
        "reboot",
        "the bundle came and was activated"
    );
}

#[test]
fn a_schedule_cancelled_mid_download_stops_and_activates_nothing() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 9);
    let url = slow_server(std::fs::read(sim.path(&b)).unwrap(), 8 << 10);
    let a_before = sha256_of(&sim.path("dev/slots/rootfs.A.img"));
    let _agent = Running::start(&sim);
    let v = dev(&sim, &["schedule", "update", "--source", &url], 0);
    assert_eq!(v["source_kind"], "url");
    wait("the download to start", || {
        dev(&sim, &["status"], 0)["state"] == "downloading"
    });
    // While the download holds the device, a change through the API is answered busy.
    let v = dev(&sim, &["rollback", "--reason", "now"], 3);
    assert_eq!(v["error"]["code"], "busy", "{v}");
    let v = dev(&sim, &["schedule", "cancel", "s1"], 0);
    assert_eq!(v["state"], "cancelled");
    wait("the download to stop", || {
        dev(&sim, &["status"], 0)["state"] == "failed"
    });
    let status = dev(&sim, &["status"], 0);
    assert_eq!(status["reason"], "cancelled", "{status}");
    assert_eq!(status["version"], "1.0.0");
    // The bootloader boots A, the target B is not bootable (it never was made so during
    // the download), and the running slot is untouched.
    let boot: Value =
        serde_json::from_slice(&std::fs::read(sim.path("dev/boot.json")).unwrap()).unwrap();
    assert_eq!(
        (
            boot["bootable"]["A"].as_bool(),
            boot["bootable"]["B"].as_bool(),
            boot["booted"].as_str()
        ),
        (Some(true), Some(false), Some("A")),
        "{boot}"
    );
    assert_eq!(sha256_of(&sim.path("dev/slots/rootfs.A.img")), a_before);
    let s1 = schedule(&sim, "s1");
    assert_eq!(s1["state"], "cancelled");
    assert_eq!(s1["transaction"], status["transaction"]);
}

#[test]
fn a_bundle_from_a_url_that_is_not_the_one_pinned_is_abandoned_before_activation() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 12);
    let url = slow_server(std::fs::read(sim.path(&b)).unwrap(), 256 << 10);
    let a_before = sha256_of(&sim.path("dev/slots/rootfs.A.img"));
    let _agent = Running::start(&sim);
    let v = dev(
        &sim,
        &[
            "schedule",
            "update",
            "--source",
            &url,
            "--sha256",
            &"ab".repeat(32),
        ],
        0,
    );
    assert_eq!(v["sha256"], "ab".repeat(32));
    wait("s1 to fail", || schedule(&sim, "s1")["state"] == "failed");
    let s1 = schedule(&sim, "s1");
    assert!(
        s1["reason"].as_str().unwrap().contains("sha256 mismatch"),
        "{s1}"
    );
    let status = dev(&sim, &["status"], 0);
    assert_eq!(
        (status["state"].as_str(), status["version"].as_str()),
        (Some("failed"), Some("1.0.0"))
    );
    assert!(
        status["reason"]
            .as_str()
            .unwrap()
            .contains("[sha256-mismatch]"),
        "{status}"
    );
    let boot: Value =
        serde_json::from_slice(&std::fs::read(sim.path("dev/boot.json")).unwrap()).unwrap();
    assert_eq!(boot["bootable"]["B"], false, "{boot}");
    assert_eq!(sha256_of(&sim.path("dev/slots/rootfs.A.img")), a_before);
    // Every event of every schedule, to a watcher of all of them: the next one, pinned right.
    let sha = sha256_of(&sim.path(&b));
    let socket = sim.path("dev/agent.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt.block_on(async {
        let mut c = abide_agent_api::transport::connect_unix(&socket)
            .await
            .unwrap();
        c.watch_progress(abide_agent_api::WatchProgressRequest {
            schedule: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    dev(
        &sim,
        &["schedule", "update", "--source", &url, "--sha256", &sha],
        0,
    );
    let seen = rt.block_on(async {
        let mut seen = Vec::new();
        while let Ok(Ok(Some(e))) =
            tokio::time::timeout(Duration::from_secs(60), events.message()).await
        {
            let done = e.transaction_state == "activated";
            seen.push((e.schedule, e.state, e.transaction_state));
            if done {
                break;
            }
        }
        seen
    });
    assert_eq!(
        seen.first().map(|e| e.1.as_str()),
        Some("pending"),
        "{seen:?}"
    );
    assert!(seen.iter().all(|e| e.0 == "s2"), "{seen:?}");
    assert_eq!(
        seen.last().map(|e| (e.1.as_str(), e.2.as_str())),
        Some(("in_progress", "activated"))
    );
}

/// A clock the test moves.
struct TestClock(Mutex<Timestamp>);

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
    fn sleep(&self, d: SignedDuration) {
        let mut t = self.0.lock().unwrap();
        *t = t.checked_add(d).unwrap();
    }
}

#[test]
fn a_schedule_for_the_next_window_waits_for_it_then_activates() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 10);
    let config = sim.path("dev/system.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "[api]\nsocket = \"agent.sock\"\n",
        "[api]\nsocket = \"agent.sock\"\nmetrics_file = \"textfile/abide.prom\"\n",
    );
    std::fs::create_dir(sim.path("dev/textfile")).unwrap();
    text.push_str(
        "\n[[window]]\ndays = [\"sat\"]\nstart = \"02:00\"\nend = \"04:00\"\nzone = \"UTC\"\n",
    );
    std::fs::write(&config, text).unwrap();
    // Friday 2026-12-04 23:00 UTC: the window opens three hours later.
    let clock = Arc::new(TestClock(Mutex::new(
        "2026-12-04T23:00:00Z".parse().unwrap(),
    )));
    let mut agent = Agent::with_clock(&config, clock.clone()).unwrap();
    let shared = agent.shared();
    let now = clock.now();
    shared
        .with_book(|book| {
            let s = Schedule::new(
                &book.next_id(),
                Source::File(sim.path(&b).to_string_lossy().into_owned()),
                None,
                When::InWindow,
                Rollback::Automatic,
                Origin::Operator,
                now,
            )
            .unwrap();
            book.add(s);
        })
        .unwrap();
    let once = Options { once: true };
    assert_eq!(agent.run(&once).unwrap(), Exit::Idle);
    assert_eq!(shared.book().get("s1").unwrap().state.name(), "pending");
    // The textfile collector's file is kept after every round.
    let prom = std::fs::read_to_string(sim.path("dev/textfile/abide.prom")).unwrap();
    assert!(
        prom.contains("abide_agent_schedules{state=\"pending\"} 1"),
        "{prom}"
    );
    // The classic text format node-exporter's textfile collector reads: typed, no `# EOF`.
    assert!(
        prom.contains("# TYPE abide_agent_schedules gauge") && !prom.contains("# EOF"),
        "{prom}"
    );
    assert_eq!(dev(&sim, &["status"], 0)["state"], "idle");

    *clock.0.lock().unwrap() = "2026-12-05T02:30:00Z".parse().unwrap();
    assert_eq!(agent.run(&once).unwrap(), Exit::Reboot);
    let s = shared.book().get("s1").unwrap().clone();
    assert_eq!(s.state.name(), "in_progress");
    let status = dev(&sim, &["status"], 0);
    assert_eq!(
        (status["state"].as_str(), status["target_version"].as_str()),
        (Some("activated"), Some("2.0.0"))
    );
    assert_eq!(s.transaction.as_deref(), status["transaction"].as_str());
    // The schedules file holds it: a restarted agent sees the same.
    let again = Agent::with_clock(&config, clock).unwrap();
    assert_eq!(again.shared().book().get("s1"), Some(&s));
}

/// Serves the device's API on a free TCP port of 127.0.0.1 with mutual TLS as well (a CA
/// `api-ca` in `dev/` and the agent's certificate `agent.pem` from it), with `extra` lines in
/// `[api]`; returns the port and the CA.
fn tcp_api(sim: &Sim, extra: &str) -> (u16, crate::agent::TestCa) {
    let dir = sim.path("dev");
    let ca = crate::agent::TestCa::new(&dir, "api-ca");
    ca.issue(&dir, "agent", "agent", &["localhost"]);
    let port = crate::fleet::free_port();
    let config = sim.path("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[api]\nsocket = \"agent.sock\"\n",
        &format!(
            "[api]\nsocket = \"agent.sock\"\n{extra}tcp = \"127.0.0.1:{port}\"\ncert = \"agent.pem\"\nkey = \"agent.key\"\nclient_ca = \"api-ca.pem\"\n"
        ),
    );
    std::fs::write(&config, text).unwrap();
    (port, ca)
}

/// Holds `n` idle connections to the Unix socket `socket` and to `tcp` each, as user and group
/// `nobody`/`nogroup` (a member of the socket's group who is not root), until killed.
fn idle_connections(socket: &Path, tcp: &str, n: usize) -> Child {
    let script = format!(
        "import resource, socket, sys, time\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
         held = []\n\
         for i in range({n}):\n\
         \x20   u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         \x20   u.connect({socket:?})\n\
         \x20   held.append(u)\n\
         \x20   t = socket.create_connection(({host:?}, {port}))\n\
         \x20   held.append(t)\n\
         print('ready', flush=True)\n\
         time.sleep(3600)\n",
        socket = socket.display().to_string(),
        host = tcp.split(':').next().unwrap(),
        port = tcp.split(':').nth(1).unwrap(),
    );
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv and python3 run");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    if line.trim() != "ready" {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("the idle clients: {}", String::from_utf8_lossy(&out.stderr));
    }
    child
}

#[test]
fn idle_clients_on_the_socket_and_the_tcp_port_do_not_starve_the_agent() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 14);
    let dir = sim.path("dev");
    let (port, _) = tcp_api(&sim, "group = \"nogroup\"\n");
    // The socket's directory may be entered by its group's members.
    for d in [sim.dir.clone(), dir.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    // The agent under systemd's default limit of 1,024 open files, soft and hard.
    let child = Command::new("sh")
        .args(["-c", "ulimit -n 1024 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_abide"))
        .args(["agent", "--json", "--config", "dev/system.toml"])
        .current_dir(&sim.dir)
        .env("ABIDE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let agent = Running { child: Some(child) };
    let socket = sim.path("dev/agent.sock");
    wait("the agent's socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // A client that connects to the TCP port and never begins its TLS handshake.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let opened = Instant::now();
    // A schedule due in a few seconds, then 1,100 idle clients on each listener.
    let due = Timestamp::now() + SignedDuration::from_secs(15);
    let at = due.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    dev(
        &sim,
        &["schedule", "update", "--source", &b, "--at", &at],
        0,
    );
    let mut clients = idle_connections(&socket, &format!("127.0.0.1:{port}"), 1100);
    // Root's own client is answered at once, through the socket.
    let asked = Instant::now();
    let status = dev(&sim, &["status"], 0);
    assert_eq!(status["version"], "1.0.0", "{status}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    // The silent client is cut off when its handshake's 10 s are up.
    silent
        .set_read_timeout(Some(Duration::from_secs(14)))
        .unwrap();
    let read = silent.read(&mut [0u8; 16]);
    let after = opened.elapsed();
    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(13),
        "closed after {after:?}"
    );
    // The schedule runs on time: activated, and the agent exits to reboot.
    let out = agent.exits();
    let late = Timestamp::now().duration_since(due);
    assert_eq!(out["exit"], "reboot", "{out}");
    assert!(
        late < SignedDuration::from_secs(10),
        "the schedule ran {late} after it was due"
    );
    let _ = clients.kill();
    let _ = clients.wait();
}

#[test]
fn the_api_over_tcp_needs_a_client_certificate_from_its_ca() {
    let sim = Sim::new(None);
    // Two audit records to read back: an older release refused, twice.
    let older = sim.bundle("0.9.0", 0, 11);
    for _ in 0..2 {
        assert_eq!(
            dev(&sim, &["install", &older], 1)["error"]["code"],
            "older-version"
        );
    }
    let dir = sim.path("dev");
    let (port, ca) = tcp_api(&sim, "");
    ca.issue(&dir, "operator", "operator", &[]);
    let other = crate::agent::TestCa::new(&dir, "other-ca");
    other.issue(&dir, "stranger", "stranger", &[]);
    let _agent = Running::start(&sim);
    let addr = format!("127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = |identity: Option<(&str, &str)>| {
        let identity = identity.map(|(c, k)| (dir.join(c), dir.join(k)));
        let tls = abide_client::tls::client_config(
            Some(&dir.join("api-ca.pem")),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap();
        rt.block_on(async {
            let mut client = abide_agent_api::transport::connect_tls(&addr, "localhost", tls)
                .await
                .map_err(|e| e.to_string())?;
            client
                .status(abide_agent_api::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.to_string())
        })
    };
    let ok = status(Some(("operator.pem", "operator.key"))).unwrap();
    assert_eq!((ok.version.as_str(), ok.state.as_str()), ("1.0.0", "idle"));
    // The audit log through the API: the chain checked, `after` and `limit` honoured.
    let log = rt.block_on(async {
        let tls = abide_client::tls::client_config(
            Some(&dir.join("api-ca.pem")),
            Some((&dir.join("operator.pem"), &dir.join("operator.key"))),
        )
        .unwrap();
        let mut client = abide_agent_api::transport::connect_tls(&addr, "localhost", tls)
            .await
            .unwrap();
        let all = client
            .get_audit_log(abide_agent_api::GetAuditLogRequest { after: 0, limit: 0 })
            .await
            .unwrap()
            .into_inner()
            .records;
        let last = client
            .get_audit_log(abide_agent_api::GetAuditLogRequest { after: 0, limit: 1 })
            .await
            .unwrap()
            .into_inner()
            .records;
        let none = client
            .get_audit_log(abide_agent_api::GetAuditLogRequest {
                after: all.len() as u64,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        (all, last, none)
    });
    let (all, last, none) = log;
    assert!(!all.is_empty());
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=all.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].seq, all.len() as u64);
    assert!(none.is_empty());
    assert!(status(None).is_err(), "no client certificate");
    assert!(
        status(Some(("stranger.pem", "stranger.key"))).is_err(),
        "a certificate from another CA"
    );
    // The socket serves the same at the same time.
    assert_eq!(dev(&sim, &["status"], 0)["version"], "1.0.0");
}

/// The agent's process on the device, as it answers `abide status`.
fn agent_of(sim: &Sim) -> Option<(u32, String)> {
    let out = abide_args(
        &sim.dir,
        &["status", "--json", "--config", "dev/system.toml"],
    );
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let a = &v["agent"];
    Some((a["pid"].as_u64()? as u32, a["version"].as_str()?.to_owned()))
}

/// The schedule `id`, or None while no agent answers (it is being replaced).
fn schedule_if_up(sim: &Sim, id: &str) -> Option<Value> {
    let out = abide_args(
        &sim.dir,
        &[
            "schedule",
            "status",
            id,
            "--json",
            "--config",
            "dev/system.toml",
        ],
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// An agent bundle (one component of kind `agent`) with `file` as the new binary.
fn agent_bundle(sim: &Sim, file: &str, version: &str) -> String {
    let out = format!("agent-{file}-{version}.abide");
    crate::ok(
        &sim.dir,
        &format!(
            "bundle create --product gw --version {version} --compatible gw-1 \
             --component agent={file},kind=agent --sign a.key --out {out}"
        ),
    );
    out
}

/// The device's agent runs from its own copy, `dev/bin/abide`, which it may replace (a 3 s
/// deadline, and `extra` appended to system.toml); beside it the binaries agent bundles carry:
/// `exits` (exits 3 at start) and `good` (this build, marked `good_version`).
/// Returns the copy's path and the agent started from it.
fn self_updating(sim: &Sim, extra: &str, good_version: &str) -> (std::path::PathBuf, Child) {
    std::fs::create_dir(sim.path("dev/bin")).unwrap();
    let bin = sim.path("dev/bin/abide");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_abide"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_abide"), &bin).unwrap();
    }
    let config = sim.path("dev/system.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[self_update]\nbinary = \"bin/abide\"\ndeadline = \"3s\"\n");
    text.push_str(extra);
    std::fs::write(&config, text).unwrap();
    std::fs::write(sim.path("exits"), "#!/bin/sh\nexit 3\n").unwrap();
    let mut good = std::fs::read(env!("CARGO_BIN_EXE_abide")).unwrap();
    good.extend_from_slice(format!("\n# abide agent {good_version}\n").as_bytes());
    std::fs::write(sim.path("good"), &good).unwrap();
    let agent = Command::new(&bin)
        .args(["agent", "--json", "--config", "dev/system.toml"])
        .current_dir(&sim.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (bin, agent)
}

#[test]
fn a_new_agent_that_answers_is_kept_and_one_that_exits_or_hangs_is_replaced_by_the_old() {
    use std::os::unix::fs::MetadataExt;
    let sim = Sim::new(None);
    let (bin, mut first) = self_updating(&sim, "", "0.2.0");
    std::fs::write(sim.path("hangs"), "#!/bin/sh\nexec sleep 600\n").unwrap();
    let original = std::fs::metadata(&bin).unwrap().ino();
    wait("the agent", || agent_of(&sim).is_some());
    let (pid, version) = agent_of(&sim).unwrap();
    assert_eq!((pid, version.as_str()), (first.id(), "0.1.0"));

    // `abide install` leaves an agent bundle to the agent.
    let direct = agent_bundle(&sim, "exits", "0.2.0");
    let v = dev(&sim, &["install", &direct], 1);
    assert_eq!(v["error"]["code"], "self-update", "{v}");
    assert_eq!(std::fs::metadata(&bin).unwrap().ino(), original);
    // An older or equal agent is refused, and nothing changes.
    let same = agent_bundle(&sim, "exits", "0.1.0");
    let v = dev(&sim, &["schedule", "update", "--source", &same], 0);
    wait("s1 to fail", || schedule(&sim, "s1")["state"] == "failed");
    assert!(
        schedule(&sim, "s1")["reason"]
            .as_str()
            .unwrap()
            .contains("not newer than the running agent 0.1.0"),
        "{v}"
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().ino(), original);

    // A new agent that exits at once: the old one comes back, in a new process, and says why.
    // A damaged one is refused by the bundle checks, and nothing changes.
    let mut damaged = std::fs::read(sim.path(&direct)).unwrap();
    let at = damaged.len() - 8;
    damaged[at] ^= 0xff;
    std::fs::write(sim.path("agent-damaged.abide"), damaged).unwrap();
    dev(
        &sim,
        &["schedule", "update", "--source", "agent-damaged.abide"],
        0,
    );
    wait("s2 to fail", || schedule(&sim, "s2")["state"] == "failed");
    let s2 = schedule(&sim, "s2");
    assert!(s2["reason"].as_str().unwrap().contains("chunk"), "{s2}");
    assert_eq!(std::fs::metadata(&bin).unwrap().ino(), original);
    assert_eq!(agent_of(&sim).unwrap().0, pid, "the same agent runs on");

    let exits = direct;
    dev(&sim, &["schedule", "update", "--source", &exits], 0);
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(3), "the process ran the new binary");
    wait("s3 to fail", || {
        schedule_if_up(&sim, "s3").is_some_and(|v| v["state"] == "failed")
    });
    let exited = schedule(&sim, "s3");
    assert!(
        exited["reason"]
            .as_str()
            .unwrap()
            .contains("exited before it answered"),
        "{exited}"
    );
    assert_eq!(
        std::fs::metadata(&bin).unwrap().ino(),
        original,
        "the old binary is back"
    );
    let (restored, version) = agent_of(&sim).unwrap();
    assert_ne!(restored, pid);
    assert_eq!(version, "0.1.0");

    // One that hangs: killed at the deadline, the old one back.
    let hangs = agent_bundle(&sim, "hangs", "0.2.0");
    dev(&sim, &["schedule", "update", "--source", &hangs], 0);
    wait("s4 to fail", || {
        schedule_if_up(&sim, "s4").is_some_and(|v| v["state"] == "failed")
    });
    let hung = schedule(&sim, "s4");
    assert!(
        hung["reason"]
            .as_str()
            .unwrap()
            .contains("did not answer on its API socket within 3s"),
        "{hung}"
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().ino(), original);
    let (restored, version) = agent_of(&sim).unwrap();
    assert_eq!(version, "0.1.0");

    // In a directory others may write — anyone, a group other than root's, or another user
    // who owns it — no update is tried: they could swap the files.
    let good = agent_bundle(&sim, "good", "0.2.0");
    let dir = sim.path("dev/bin");
    let before = std::fs::read_dir(&dir).unwrap().count();
    let nobody = Some(65534);
    for (n, (mode, owner, group, says)) in [
        (0o777, None, None, "anyone may write it"),
        (0o775, None, nobody, "group 65534 may write it"),
        (0o755, nobody, None, "it belongs to user 65534"),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&dir, owner.or(Some(0)), group.or(Some(0))).unwrap();
        dev(&sim, &["schedule", "update", "--source", &good], 0);
        let id = format!("s{}", 5 + n);
        wait(&format!("{id} to fail"), || {
            schedule_if_up(&sim, &id).is_some_and(|v| v["state"] == "failed")
        });
        let unsafe_dir = schedule(&sim, &id);
        assert!(
            unsafe_dir["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("is not safe to update in: {says}")),
            "{unsafe_dir}"
        );
        assert_eq!(std::fs::metadata(&bin).unwrap().ino(), original);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            before,
            "nothing written"
        );
    }
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The temporary names cannot be guessed: the names the agent's process id once gave, all
    // taken beforehand, do not stop it.
    for n in 0..=1000 {
        std::fs::write(dir.join(format!(".abide.tmp-{restored}-{n}")), "planted").unwrap();
    }

    // A good one answers in time and stays; the previous binary is kept beside it.
    dev(&sim, &["schedule", "update", "--source", &good], 0);
    wait("s8 to complete", || {
        schedule_if_up(&sim, "s8").is_some_and(|v| v["state"] == "completed")
    });
    let (now, version) = agent_of(&sim).unwrap();
    assert_eq!(
        (now, version.as_str()),
        (restored, "0.2.0"),
        "the same process, re-executed"
    );
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(sim.path("good")).unwrap()
    );
    assert_eq!(
        std::fs::metadata(sim.path("dev/bin/abide.prev"))
            .unwrap()
            .ino(),
        original
    );
    let log = dev(&sim, &["log"], 0);
    let events: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .filter(|e| e.starts_with("self-update"))
        .collect();
    assert_eq!(
        events,
        [
            "self-update",
            "self-update-failed",
            "self-update",
            "self-update-failed",
            "self-update",
            "self-update-commit"
        ]
    );
    let _ = Command::new("kill").arg(now.to_string()).status();
}

#[test]
fn a_trial_whose_new_agent_is_gone_without_a_verdict_is_failed_and_the_old_binary_put_back() {
    use std::os::unix::fs::MetadataExt;
    // As the systemd unit's ExecStartPre finds it after the new agent died and took its
    // watchdog with it: the trial still `trying`, its process gone, the new binary in place.
    let sim = Sim::new(None);
    std::fs::create_dir(sim.path("dev/bin")).unwrap();
    let bin = sim.path("dev/bin/abide");
    std::fs::write(sim.path("dev/bin/abide.prev"), "#!/bin/sh\necho old\n").unwrap();
    std::fs::write(&bin, "#!/bin/sh\nexit 3\n").unwrap();
    let old = std::fs::metadata(sim.path("dev/bin/abide.prev"))
        .unwrap()
        .ino();
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let trial = serde_json::json!({
        "state": "trying", "from": "0.1.0", "to": "0.2.0", "binary": bin, "pid": pid,
        "since": "2026-12-01T00:00:00Z", "deadline": 3, "args": ["agent"],
        "reason": "the new agent did not answer on its API socket within 3s; it was killed"
    });
    std::fs::write(sim.path("dev/state/self-update.json"), trial.to_string()).unwrap();
    let v = dev(&sim, &["self-update-recover"], 0);
    assert_eq!(v["recovered"], true);
    assert_eq!(
        std::fs::metadata(&bin).unwrap().ino(),
        old,
        "the previous binary is back"
    );
    let record: Value =
        serde_json::from_slice(&std::fs::read(sim.path("dev/state/self-update.json")).unwrap())
            .unwrap();
    assert_eq!(record["state"], "failed");
    assert_eq!(dev(&sim, &["self-update-recover"], 0)["recovered"], false);
    // The agent that starts next records the failure with its reason and clears the record.
    let _agent = Running::start(&sim);
    wait("the failure to be recorded", || {
        !sim.path("dev/state/self-update.json").exists()
    });
    let log = dev(&sim, &["log"], 0);
    let failed = log
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["event"] == "self-update-failed")
        .expect("a self-update-failed record");
    assert_eq!(
        failed["details"]["reason"],
        "the new agent did not answer on its API socket within 3s; it was killed"
    );
}

/// An agent release by fleet rollout: one whose new agent exits at start is put back by the
/// watchdog and reported `rolled_back` by the old agent; a good one commits, its version in
/// the check-ins; each is carried out once.
#[test]
fn an_agent_release_travels_by_rollout_and_the_old_agent_reports_a_broken_one() {
    agent_release_by_rollout(None);
}

#[test]
fn an_agent_release_travels_by_rollout_on_postgresql() {
    let pg = abide_testkit::pg::Postgres::start();
    agent_release_by_rollout(Some(&pg.url()));
}

fn agent_release_by_rollout(db: Option<&str>) {
    use crate::agent::{Fleet, agent_once, device_of};
    let sim = Sim::new(None);
    let f = Fleet::start(&sim.dir, db, &[]);
    let token = f.token("lab");
    let server = format!(
        "\n[server]\nurl = {:?}\ndevice_id = \"gw-agent\"\npoll_interval = \"200ms\"\nenroll_token_file = {:?}\n",
        f.url,
        token.to_str().unwrap()
    );
    let (bin, mut first) = self_updating(&sim, &server, "0.3.0");
    let agent_seen = || {
        f.cmd(&["devices"])
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == "gw-agent").cloned())
            .map(|d| d["agent"].clone())
            .unwrap_or(Value::Null)
    };
    wait("the device to check in", || {
        agent_seen()["version"] == "0.1.0"
    });
    assert_eq!(agent_seen()["self_update"], true);
    // A device whose agent cannot replace itself (its binary's directory is not there to
    // write in) is left out of agent rollouts.
    let fixed_agent = device_of(&sim.dir, "gw-fixed", &f.url, &token, "gw-1");
    let fixed_config = fixed_agent.join("system.toml");
    let text = std::fs::read_to_string(&fixed_config).unwrap();
    std::fs::write(
        &fixed_config,
        format!("{text}\n[self_update]\nbinary = \"/nonexistent/abide\"\n"),
    )
    .unwrap();
    agent_once(&sim.dir, &fixed_agent, 0);

    let ro_of = |file: &str, version: &str| {
        let release = f.upload(&sim.path(&agent_bundle(&sim, file, version)));
        assert_eq!(release["kind"], "agent", "{release}");
        let ro = f.rollout(&release, "100", "lab", &["--failure-threshold", "50%"]);
        assert_eq!(
            (&ro["devices"], &ro["left_out"]),
            (
                &serde_json::json!(1),
                &serde_json::json!([{"reason": "no-self-update", "devices": 1}])
            ),
            "{ro}"
        );
        ro
    };
    let status = |ro: &Value| f.cmd(&["rollout", "status", ro["id"].as_str().unwrap()]);
    let broken = ro_of("exits", "0.2.0");
    assert_eq!(first.wait().unwrap().code(), Some(3), "the new binary ran");
    wait("the broken agent to be reported", || {
        status(&broken)["failed"] == 1
    });
    let failing = &status(&broken)["failing"][0];
    assert_eq!(failing["state"], "rolled_back", "{failing}");
    assert!(
        failing["reason"]
            .as_str()
            .unwrap()
            .starts_with("the new agent 0.2.0 did not come up"),
        "{failing}"
    );
    let (pid, version) = agent_of(&sim).unwrap();
    assert_eq!(version, "0.1.0", "the old agent runs again");

    let fixed = ro_of("good", "0.3.0");
    wait("the new agent to commit", || {
        status(&fixed)["committed"] == 1
    });
    let (now, version) = agent_of(&sim).unwrap();
    assert_eq!(
        (now, version.as_str()),
        (pid, "0.3.0"),
        "re-executed in place"
    );
    wait("its version in the check-ins", || {
        agent_seen()["version"] == "0.3.0"
    });
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(sim.path("good")).unwrap()
    );
    // Each was carried out once.
    let log = dev(&sim, &["log"], 0);
    let tries = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["event"] == "self-update")
        .count();
    assert_eq!(tries, 2, "{log}");
    let _ = Command::new("kill").arg(now.to_string()).status();
}
