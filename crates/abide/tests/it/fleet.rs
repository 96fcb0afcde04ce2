//! The fleet end to end with real processes: `abide server` on SQLite or PostgreSQL, the
//! admin commands, and `abide fleet simulate` driving devices through a rollout. The
//! simulator's ledger of acknowledged reports is compared with the server's audit trail: none
//! lost, none counted twice — with two server processes on one PostgreSQL, and across a
//! `kill -9` of the server in the middle of a rollout.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{json_args, ok, workspace};

/// A running `abide server`.
pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) url: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /api/v1/health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

pub(crate) fn start_server(data: &Path, port: u16, db: Option<&str>) -> ServerProcess {
    start_server_with(data, port, db, &[])
}

/// [`start_server`] with more arguments.
pub(crate) fn start_server_with(
    data: &Path,
    port: u16,
    db: Option<&str>,
    extra: &[&str],
) -> ServerProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_abide"));
    cmd.args(["server", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // Every simulated device comes from this one address.
        .args(["--enroll-rate", "10000"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(db) = db {
        cmd.args(["--db", db]);
    }
    let child = cmd.spawn().expect("abide server starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(port) {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    ServerProcess {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// A server data directory `name` in `dir`, holding the workspace's trust root.
pub(crate) fn data_dir(dir: &Path, name: &str) -> PathBuf {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(dir.join("trust.json"), data.join("trust.json")).unwrap();
    data
}

/// Waits until `abide fleet devices ARGS` lists `n` devices.
pub(crate) fn wait_for_devices(dir: &Path, server: &str, token: &Path, args: &[&str], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut all = vec!["devices"];
    all.extend_from_slice(args);
    while fleet(dir, server, token, &all).as_array().unwrap().len() < n {
        assert!(Instant::now() < deadline, "devices did not enrol");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `abide fleet --server URL --token-file TOKEN ARGS --json`.
pub(crate) fn fleet(dir: &Path, server: &str, token: &Path, args: &[&str]) -> Value {
    let mut all = vec!["fleet", "--server", server, "--token-file"];
    let token = token.to_str().unwrap();
    all.push(token);
    all.extend_from_slice(args);
    json_args(dir, &all, 0)
}

/// Starts `abide fleet simulate` in the background.
pub(crate) fn simulate(
    dir: &Path,
    server: &str,
    token: &str,
    args: &[&str],
    ledger: &Path,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_abide"))
        .args([
            "fleet",
            "--server",
            server,
            "simulate",
            "--enroll-token",
            token,
            "--json",
            "--ledger",
        ])
        .arg(ledger)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the simulator starts")
}

pub(crate) fn finish(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "simulate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A bundle of `version` of the simulated product, signed by key a.
fn bundle(dir: &Path, version: &str) -> PathBuf {
    let image = dir.join("image.img");
    if !image.exists() {
        std::fs::write(&image, abide_testkit::image(300_000, 9)).unwrap();
    }
    ok(
        dir,
        &format!(
            "bundle create --product acme-gateway --version {version} --compatible acme-gw \
             --component rootfs=image.img --sign a.key --out v{version}.abide"
        ),
    );
    dir.join(format!("v{version}.abide"))
}

/// Every report the server recorded, from its audit trail: (device, seq) → count.
pub(crate) fn recorded_reports(
    dir: &Path,
    server: &str,
    token: &Path,
) -> BTreeMap<(String, u64), usize> {
    let audit = fleet(dir, server, token, &["audit"]);
    let mut seen = BTreeMap::new();
    for r in audit.as_array().unwrap() {
        if r["action"] == "device.report" {
            let device = r["actor"]
                .as_str()
                .unwrap()
                .trim_start_matches("device:")
                .to_owned();
            let seq = r["details"]["seq"].as_u64().unwrap();
            *seen.entry((device, seq)).or_insert(0) += 1;
        }
    }
    seen
}

/// The simulator's acknowledged reports, checked against the server's: the same set, each once.
fn ledger_matches(ledger: &Path, recorded: &BTreeMap<(String, u64), usize>) -> usize {
    let ledger: Value = serde_json::from_slice(&std::fs::read(ledger).unwrap()).unwrap();
    let mut sent = BTreeMap::new();
    for e in ledger.as_array().unwrap() {
        let key = (
            e["device"].as_str().unwrap().to_owned(),
            e["seq"].as_u64().unwrap(),
        );
        *sent.entry(key).or_insert(0usize) += 1;
    }
    assert!(
        recorded.values().all(|n| *n == 1),
        "a report was counted twice"
    );
    assert!(
        sent.values().all(|n| *n == 1),
        "the simulator sent a sequence number twice"
    );
    let missing: Vec<_> = sent.keys().filter(|k| !recorded.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not recorded: {missing:?}"
    );
    sent.len()
}

/// How many of each server decision the audit trail holds, and the most leases held at once.
fn decisions(dir: &Path, server: &str, token: &Path) -> (BTreeMap<String, usize>, usize) {
    let audit = fleet(dir, server, token, &["audit"]);
    let mut count = BTreeMap::new();
    let mut held = std::collections::BTreeSet::new();
    let mut most = 0;
    for r in audit.as_array().unwrap() {
        let action = r["action"].as_str().unwrap();
        if action.starts_with("rollout.") {
            let stage = r["details"]["stage"].as_u64().unwrap_or(0);
            *count.entry(format!("{action}@{stage}")).or_insert(0) += 1;
        }
        let device = r["actor"].as_str().unwrap().to_owned();
        match action {
            "lease.grant" => {
                held.insert(device);
                most = most.max(held.len());
            }
            "lease.release" => {
                held.remove(&device);
            }
            "lease.reclaim" => {
                for d in r["details"]["devices"].as_array().unwrap() {
                    held.remove(&format!("device:{}", d.as_str().unwrap()));
                }
            }
            _ => {}
        }
    }
    (count, most)
}

#[test]
fn a_rollout_through_the_command_line_and_simulated_devices() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let server = start_server(&data, free_port(), None);
    let token = data.join("admin.token");
    let url = server.url.clone();
    let release = fleet(
        &dir,
        &url,
        &token,
        &["release", "upload", bundle(&dir, "2.0.0").to_str().unwrap()],
    );
    let id = release["id"].as_str().unwrap().to_owned();
    assert_eq!(
        fleet(&dir, &url, &token, &["release", "list"])[0]["id"],
        id.as_str()
    );
    let enroll = fleet(
        &dir,
        &url,
        &token,
        &["enroll-token", "create", "--group", "lab", "--uses", "100"],
    );
    let enroll_token = enroll["token"].as_str().unwrap().to_owned();
    assert!(enroll["id"].as_str().unwrap().starts_with("t-"));
    let ledger = dir.join("ledger.json");
    let sim = simulate(
        &dir,
        &url,
        &enroll_token,
        &[
            "--devices",
            "24",
            "--version",
            "1.0.0",
            "--poll",
            "0.3",
            "--duration",
            "60s",
            "--until-version",
            "2.0.0",
            "--fail-rate",
            "0",
        ],
        &ledger,
    );
    wait_for_devices(&dir, &url, &token, &["--group", "lab"], 24);
    let ro = fleet(
        &dir,
        &url,
        &token,
        &[
            "rollout",
            "create",
            "--release",
            &id,
            "--stages",
            "10:0s,50:0s,100",
            "--failure-threshold",
            "10%",
            "--group",
            "lab",
        ],
    );
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    assert_eq!(ro["status"], "running");
    let summary = finish(sim);
    assert_eq!(
        summary["synthetic"], true,
        "the simulator says its outcomes are synthetic"
    );
    assert_eq!(
        (
            summary["enrolled"].as_u64(),
            summary["committed"].as_u64(),
            summary["errors"].as_u64()
        ),
        (Some(24), Some(24), Some(0)),
        "{summary}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = fleet(&dir, &url, &token, &["rollout", "status", &ro_id]);
        if s["status"] == "completed" {
            assert_eq!(
                (s["committed"].as_u64(), s["failed"].as_u64()),
                (Some(24), Some(0))
            );
            let per_stage: u64 = s["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|st| st["devices"].as_u64().unwrap())
                .sum();
            assert_eq!(per_stage, 24);
            break;
        }
        assert!(Instant::now() < deadline, "not completed: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let devices = fleet(&dir, &url, &token, &["devices", "--state", "committed"]);
    assert_eq!(devices.as_array().unwrap().len(), 24);
    // For people, the same typed answers: a list is a table with a header and a row per
    // element, columns aligned; a rollout is its summary line and a line per stage.
    let human = |args: &[&str]| {
        let mut all = vec![
            "fleet",
            "--server",
            &url,
            "--token-file",
            token.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = crate::abide_args(&dir, &all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = human(&["devices", "--state", "committed"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 25, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "GROUP", "VERSION", "STATE", "REASON", "LAST_SEEN"]
    );
    let state_at = lines[0].find("STATE").unwrap();
    for row in &lines[1..] {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            (cells[1], cells[2], cells[3], cells[4]),
            ("lab", "2.0.0", "committed", "-"),
            "{row}"
        );
        assert_eq!(
            &row[state_at..state_at + 9],
            "committed",
            "aligned: {table}"
        );
    }
    let status = human(&["rollout", "status", &ro_id]);
    assert!(
        status.starts_with(&format!("rollout {ro_id} of release {id}: completed")),
        "{status}"
    );
    assert_eq!(
        status
            .lines()
            .filter(|l| l.trim_start().starts_with("stage "))
            .count(),
        3
    );
    for d in devices.as_array().unwrap() {
        assert_eq!(
            (d["group"].as_str(), d["version"].as_str()),
            (Some("lab"), Some("2.0.0")),
            "{d}"
        );
        assert!(d["id"].as_str().unwrap().starts_with("sim-"));
    }
    let recorded = recorded_reports(&dir, &url, &token);
    assert_eq!(ledger_matches(&ledger, &recorded), recorded.len());
    // downloading, staged, rebooting, committed: the boot step's health gate ends the trial
    // before the agent reports again, as on a real device.
    assert_eq!(recorded.len(), 24 * 4, "four reports per device");
    let (count, _) = decisions(&dir, &url, &token);
    assert_eq!(count.get("rollout.advance@1"), Some(&1), "{count:?}");
    assert_eq!(count.get("rollout.advance@2"), Some(&1), "{count:?}");
    assert_eq!(count.get("rollout.complete@3"), Some(&1), "{count:?}");
    assert_eq!(
        fleet(&dir, &url, &token, &["audit", "--verify"])["ok"],
        true
    );
    // A failing release pauses itself in its first stage; the reason names the failures.
    let bad = fleet(
        &dir,
        &url,
        &token,
        &["release", "upload", bundle(&dir, "3.0.0").to_str().unwrap()],
    );
    let ro = fleet(
        &dir,
        &url,
        &token,
        &[
            "rollout",
            "create",
            "--release",
            bad["id"].as_str().unwrap(),
            "--stages",
            "50:0s,100",
            "--failure-threshold",
            "20%",
            "--group",
            "canary",
        ],
    );
    let canary = fleet(
        &dir,
        &url,
        &token,
        &[
            "enroll-token",
            "create",
            "--group",
            "canary",
            "--uses",
            "100",
        ],
    );
    let bad_ledger = dir.join("ledger-bad.json");
    let sim = simulate(
        &dir,
        &url,
        canary["token"].as_str().unwrap(),
        &[
            "--devices",
            "10",
            "--prefix",
            "canary",
            "--version",
            "2.0.0",
            "--poll",
            "0.3",
            "--duration",
            "8s",
            "--fail-rate",
            "1",
        ],
        &bad_ledger,
    );
    finish(sim);
    let s = fleet(
        &dir,
        &url,
        &token,
        &["rollout", "status", ro["id"].as_str().unwrap()],
    );
    assert_eq!(s["status"], "paused", "{s}");
    assert!(
        s["reason"].as_str().unwrap().contains("devices failed"),
        "{s}"
    );
    assert!(
        s["failing"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("simulated"),
        "{s}"
    );
    // Admin commands with a wrong token are refused.
    std::fs::write(dir.join("wrong.token"), "abide-admin-wrong\n").unwrap();
    let out = crate::abide_args(
        &dir,
        &[
            "fleet",
            "--server",
            &url,
            "--token-file",
            dir.join("wrong.token").to_str().unwrap(),
            "release",
            "list",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        err["error"]["message"].as_str().unwrap().contains("401"),
        "{err}"
    );
}

#[test]
fn two_server_processes_on_one_postgres_decide_once_and_keep_the_lease_limits() {
    let pg = abide_testkit::pg::Postgres::start();
    let db = pg.url();
    let (_tmp, dir) = workspace();
    // Both processes serve one data directory (the bundles, the signing key, the admin token:
    // on a shared volume in production) and one database.
    let d1 = data_dir(&dir, "shared");
    let s1 = start_server(&d1, free_port(), Some(&db));
    let s2 = start_server(&d1, free_port(), Some(&db));
    let token = d1.join("admin.token");
    let release = fleet(
        &dir,
        &s1.url,
        &token,
        &["release", "upload", bundle(&dir, "2.0.0").to_str().unwrap()],
    );
    fleet(
        &dir,
        &s2.url,
        &token,
        &["group", "set", "lab", "--max-unavailable", "2"],
    );
    let enroll = fleet(
        &dir,
        &s1.url,
        &token,
        &["enroll-token", "create", "--group", "lab", "--uses", "100"],
    );
    let t = enroll["token"].as_str().unwrap().to_owned();
    let (l1, l2) = (dir.join("l1.json"), dir.join("l2.json"));
    // Durations as units or bare seconds, the same as everywhere.
    let common = [
        "--devices",
        "20",
        "--version",
        "1.0.0",
        "--poll",
        "200ms",
        "--duration",
        "90",
        "--until-version",
        "2.0.0",
    ];
    let a = simulate(
        &dir,
        &s1.url,
        &t,
        &[&common[..], &["--prefix", "one"]].concat(),
        &l1,
    );
    let b = simulate(
        &dir,
        &s2.url,
        &t,
        &[&common[..], &["--prefix", "two"]].concat(),
        &l2,
    );
    wait_for_devices(&dir, &s2.url, &token, &[], 40);
    fleet(
        &dir,
        &s2.url,
        &token,
        &[
            "rollout",
            "create",
            "--release",
            release["id"].as_str().unwrap(),
            "--stages",
            "10:0s,30:0s,60:0s,100",
        ],
    );
    let (sa, sb) = (finish(a), finish(b));
    assert_eq!(
        (sa["committed"].as_u64(), sb["committed"].as_u64()),
        (Some(20), Some(20)),
        "{sa} {sb}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (count, most) = decisions(&dir, &s1.url, &token);
    for stage in 1..=3 {
        assert_eq!(
            count.get(&format!("rollout.advance@{stage}")),
            Some(&1),
            "stage {stage}: {count:?}"
        );
    }
    assert_eq!(count.get("rollout.complete@4"), Some(&1), "{count:?}");
    assert!(
        most <= 2,
        "{most} leases held at once in a group with max_unavailable 2"
    );
    assert!(most >= 1);
    let recorded = recorded_reports(&dir, &s1.url, &token);
    let sent = ledger_matches(&l1, &recorded) + ledger_matches(&l2, &recorded);
    assert_eq!(
        sent,
        recorded.len(),
        "every recorded report was acknowledged to a device"
    );
    assert_eq!(
        fleet(&dir, &s2.url, &token, &["audit", "--verify"])["ok"],
        true
    );
    drop((s1, s2));
}

#[test]
fn a_kill_9_of_the_server_mid_rollout_loses_and_doubles_nothing() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let port = free_port();
    let mut server = start_server(&data, port, None);
    let url = server.url.clone();
    let token = data.join("admin.token");
    let release = fleet(
        &dir,
        &url,
        &token,
        &["release", "upload", bundle(&dir, "2.0.0").to_str().unwrap()],
    );
    let enroll = fleet(
        &dir,
        &url,
        &token,
        &["enroll-token", "create", "--group", "lab", "--uses", "100"],
    );
    let ledger = dir.join("ledger.json");
    let sim = simulate(
        &dir,
        &url,
        enroll["token"].as_str().unwrap(),
        &[
            "--devices",
            "30",
            "--version",
            "1.0.0",
            "--poll",
            "0.3",
            "--duration",
            "90s",
            "--until-version",
            "2.0.0",
        ],
        &ledger,
    );
    wait_for_devices(&dir, &url, &token, &[], 30);
    let ro = fleet(
        &dir,
        &url,
        &token,
        &[
            "rollout",
            "create",
            "--release",
            release["id"].as_str().unwrap(),
            "--stages",
            "20:1s,60:1s,100",
        ],
    );
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    // Wait until the rollout is under way, then kill the server without warning.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = fleet(&dir, &url, &token, &["rollout", "status", &ro_id]);
        if s["committed"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    server = start_server(&data, port, None);
    let summary = finish(sim);
    assert_eq!(summary["committed"].as_u64(), Some(30), "{summary}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = fleet(&dir, &url, &token, &["rollout", "status", &ro_id]);
        if s["status"] == "completed" {
            assert_eq!(s["committed"].as_u64(), Some(30));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not continue: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recorded = recorded_reports(&dir, &url, &token);
    assert_eq!(ledger_matches(&ledger, &recorded), recorded.len());
    let (count, _) = decisions(&dir, &url, &token);
    assert_eq!(
        (
            count.get("rollout.advance@1"),
            count.get("rollout.advance@2")
        ),
        (Some(&1), Some(&1)),
        "{count:?}"
    );
    assert_eq!(
        fleet(&dir, &url, &token, &["audit", "--verify"])["ok"],
        true
    );
    drop(server);
}
