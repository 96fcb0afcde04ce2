//! The agent end to end: a real `abide server` and simulated devices run by `abide sim run`
//! (power on, boot step, agent) as separate processes, each installing into its own slots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use abide_bundle::digest::Digest;
use serde_json::Value;

use crate::fleet::{data_dir, fleet, free_port, start_server, wait_for_devices};
use crate::{json_args, ok, workspace};

/// The image every release carries (versions differ, content does not need to).
pub(crate) const IMAGE_LEN: usize = 1_500_000;

/// A bundle of `version` of the product `gw` for board `gw-board`, signed by key a.
pub(crate) fn release_bundle(dir: &Path, version: &str, seed: u64) -> PathBuf {
    let image = dir.join(format!("image-{seed}.img"));
    if !image.exists() {
        std::fs::write(&image, abide_testkit::image(IMAGE_LEN, seed)).unwrap();
    }
    ok(
        dir,
        &format!(
            "bundle create --product gw --version {version} --security-version 1 \
             --compatible gw-board --component rootfs={} --sign a.key --out v{version}.abide",
            image.display()
        ),
    );
    dir.join(format!("v{version}.abide"))
}

/// A simulated device `name` in `dir` set up for the fleet at `url`; its health check fails
/// on any 3.x version.
pub(crate) fn device(dir: &Path, name: &str, url: &str, token_file: &Path) -> PathBuf {
    device_of(dir, name, url, token_file, "gw-board")
}

/// [`device`] of the hardware `compatible`.
pub(crate) fn device_of(
    dir: &Path,
    name: &str,
    url: &str,
    token_file: &Path,
    compatible: &str,
) -> PathBuf {
    json_args(
        dir,
        &[
            "sim",
            "init",
            name,
            "--trust",
            "trust.json",
            "--product",
            "gw",
            "--compatible",
            compatible,
            "--version",
            "1.0.0",
            "--slot-size",
            "4M",
            "--health-command",
            "case \"$ABIDE_VERSION\" in 3.*) exit 1;; esac",
            "--server",
            url,
            "--enroll-token-file",
            token_file.to_str().unwrap(),
            "--poll",
            "200ms",
        ],
        0,
    );
    dir.join(name)
}

/// A running `abide server` (SQLite, or the database `db`) with the workspace's trust root, and
/// the admin commands against it.
pub(crate) struct Fleet {
    server: Option<crate::fleet::ServerProcess>,
    pub(crate) url: String,
    admin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Fleet {
    pub(crate) fn start(dir: &Path, db: Option<&str>, extra: &[&str]) -> Fleet {
        let data = data_dir(dir, "server");
        let port = free_port();
        let server = crate::fleet::start_server_with(&data, port, db, extra);
        Fleet {
            url: server.url.clone(),
            server: Some(server),
            admin: data.join("admin.token"),
            dir: dir.to_owned(),
            data,
            port,
        }
    }

    /// Stops the server (kill).
    fn stop(&mut self) {
        self.server = None;
    }

    /// Starts it again on the same port and data (SQLite).
    fn restart(&mut self) {
        self.server = Some(start_server(&self.data, self.port, None));
    }

    /// `abide fleet ARGS --json`.
    pub(crate) fn cmd(&self, args: &[&str]) -> Value {
        fleet(&self.dir, &self.url, &self.admin, args)
    }

    /// An enrolment token for `group`, written to DIR/GROUP.token.
    pub(crate) fn token(&self, group: &str) -> PathBuf {
        let created = self.cmd(&["enroll-token", "create", "--group", group, "--uses", "100"]);
        let path = self.dir.join(format!("{group}.token"));
        std::fs::write(&path, created["token"].as_str().unwrap()).unwrap();
        path
    }

    /// Uploads `bundle`; returns the release.
    pub(crate) fn upload(&self, bundle: &Path) -> Value {
        self.cmd(&["release", "upload", bundle.to_str().unwrap()])
    }

    /// A rollout of `release` (as uploaded) to `group` with `stages` and more arguments.
    pub(crate) fn rollout(
        &self,
        release: &Value,
        stages: &str,
        group: &str,
        more: &[&str],
    ) -> Value {
        let id = release["id"].as_str().unwrap();
        let mut args = vec![
            "rollout",
            "create",
            "--release",
            id,
            "--stages",
            stages,
            "--group",
            group,
        ];
        args.extend_from_slice(more);
        self.cmd(&args)
    }
}

/// `abide sim run DIR` in the background, logging to DIR.log.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sim_run(dir: &Path, device: &Path) -> Running {
    let log = std::fs::File::create(device.with_extension("log")).unwrap();
    Running(
        Command::new(env!("CARGO_BIN_EXE_abide"))
            .args(["sim", "run"])
            .arg(device)
            .current_dir(dir)
            .env("ABIDE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("abide sim run starts"),
    )
}

/// `abide install BUNDLE --config DEVICE/system.toml --json`, expecting exit code `exit`.
fn install(dir: &Path, device: &Path, bundle: &Path, exit: i32) -> Value {
    let config = device.join("system.toml");
    json_args(
        dir,
        &[
            "install",
            bundle.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        exit,
    )
}

/// `abide status --config DEVICE/system.toml --json`.
fn status(dir: &Path, device: &Path) -> Value {
    let config = device.join("system.toml");
    json_args(dir, &["status", "--config", config.to_str().unwrap()], 0)
}

/// `abide schedule list --json` on the device, or None while its agent is not running (between
/// its restarts).
fn schedules(dir: &Path, device: &Path) -> Option<Value> {
    let config = device.join("system.toml");
    let out = crate::abide_args(
        dir,
        &[
            "schedule",
            "list",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Waits until `done` holds, or fails with `what` and the device logs.
fn wait(what: &str, seconds: u64, devices: &[PathBuf], mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        if Instant::now() > deadline {
            let logs: Vec<String> = devices
                .iter()
                .map(|d| {
                    let log = std::fs::read_to_string(d.with_extension("log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    format!(
                        "{}:\n{}",
                        d.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The SHA-256 of the first `len` bytes of `slot`.
fn slot_digest(slot: &Path, len: usize) -> String {
    let bytes = std::fs::read(slot).unwrap();
    Digest::of(&bytes[..len]).to_hex()
}

fn server_device<'a>(devices: &'a Value, id: &str) -> &'a Value {
    devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("device {id} is not on the server: {devices}"))
}

#[test]
fn sim_devices_commit_a_staged_rollout_and_roll_back_a_failing_release_which_pauses() {
    rollout_and_failing_release(None);
}

#[test]
fn the_same_on_postgresql() {
    let pg = abide_testkit::pg::Postgres::start();
    rollout_and_failing_release(Some(&pg.url()));
}

fn rollout_and_failing_release(db: Option<&str>) {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, db, &[]);
    let (url, admin) = (f.url.clone(), f.admin.clone());
    let upload = |version: &str, seed: u64| f.upload(&release_bundle(&dir, version, seed));
    let rollout = |release: &Value, stages: &str, group: &str| {
        f.rollout(release, stages, group, &["--failure-threshold", "10%"])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let rollout_status = |id: &str| f.cmd(&["rollout", "status", id]);
    let good = upload("2.0.0", 1);
    // Three devices in group lab, two in group canary.
    for group in ["lab", "canary"] {
        let enroll = f.cmd(&["enroll-token", "create", "--group", group, "--uses", "100"]);
        let token = enroll["token"].as_str().unwrap();
        std::fs::write(dir.join(format!("{group}.token")), token).unwrap();
    }
    let devices: Vec<PathBuf> = (1..=5)
        .map(|i| {
            let group = if i <= 3 { "lab" } else { "canary" };
            let token = dir.join(format!("{group}.token"));
            device(&dir, &format!("gw-{i}"), &url, &token)
        })
        .collect();
    let _running: Vec<Running> = devices.iter().map(|d| sim_run(&dir, d)).collect();
    wait_for_devices(&dir, &url, &admin, &[], 5);
    // The inventory is the device's own: booted A, known-good A, healthy.
    wait("check-ins with inventories", 30, &devices, || {
        let listed = f.cmd(&["devices"]);
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["booted"] == "A" && d["health"] == "healthy")
    });

    let rollouts = [
        rollout(&good, "50:1s,100", "lab"),
        rollout(&good, "100", "canary"),
    ];
    wait("every device to commit 2.0.0", 90, &devices, || {
        rollouts
            .iter()
            .all(|ro| rollout_status(ro)["status"] == "completed")
    });
    let image = std::fs::read(dir.join("image-1.img")).unwrap();
    let want = Digest::of(&image).to_hex();
    let listed = f.cmd(&["devices"]);
    for d in &devices {
        let s = status(&dir, d);
        assert_eq!(
            (
                s["version"].as_str(),
                s["booted"].as_str(),
                s["state"].as_str()
            ),
            (Some("2.0.0"), Some("B"), Some("committed")),
            "{s}"
        );
        let slot = d.join("slots/rootfs.B.img");
        assert_eq!(slot_digest(&slot, IMAGE_LEN), want, "{}", slot.display());
        let id = d.file_name().unwrap().to_str().unwrap();
        let on_server = server_device(&listed, id);
        assert_eq!(
            (on_server["state"].as_str(), on_server["version"].as_str()),
            (Some("committed"), Some("2.0.0"))
        );
        assert_eq!(on_server["booted"], "B", "{on_server}");
    }

    // 3.0.0 fails its health check: the canaries roll back by themselves, say why, and the
    // rollout pauses with that reason.
    let bad = upload("3.0.0", 2);
    let ro = rollout(&bad, "100", "canary");
    wait("the failing rollout to pause", 90, &devices, || {
        rollout_status(&ro)["status"] == "paused"
    });
    // It pauses at the first failure over its threshold, which withdraws the release from the
    // other canary: each canary rolls back by itself with the reason, or never leaves 2.0.0.
    // A canary that rolled back is settled once it has rebooted into its known-good group (the
    // state is written before that reboot).
    let canaries = &devices[3..];
    wait("the canaries to settle", 60, &devices, || {
        canaries.iter().all(|d| {
            let s = status(&dir, d);
            match s["state"].as_str() {
                Some("downloading" | "activated" | "trial") => false,
                Some("rolled_back") => s["booted"] == s["good"],
                _ => true,
            }
        })
    });
    let mut rolled = Vec::new();
    for d in canaries {
        let local = status(&dir, d);
        assert_eq!(local["version"], "2.0.0", "{local}");
        if local["state"] == "rolled_back" {
            assert_eq!(local["booted"], "B", "{local}");
            assert_eq!(local["quarantine"][0], "3.0.0");
            rolled.push(d.file_name().unwrap().to_str().unwrap().to_owned());
        }
    }
    assert!(!rolled.is_empty(), "no canary rolled back");
    wait("the server to show the rollbacks", 30, &devices, || {
        rollout_status(&ro)["failed"] == rolled.len()
    });
    let listed = f.cmd(&["devices"]);
    for id in &rolled {
        let d = server_device(&listed, id);
        assert_eq!(
            (d["state"].as_str(), d["version"].as_str()),
            (Some("rolled_back"), Some("2.0.0")),
            "{d}"
        );
        assert!(d["reason"].as_str().unwrap().contains("health"), "{d}");
    }
    let st = rollout_status(&ro);
    assert!(
        st["reason"].as_str().unwrap().contains("devices failed ("),
        "the pause says why: {st}"
    );
    assert!(
        st["failing"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["reason"].as_str().unwrap().contains("health check")),
        "{st}"
    );
    // The lab group did not move.
    for d in &devices[..3] {
        assert_eq!(status(&dir, d)["version"], "2.0.0");
    }
    // Each device's log holds the signed head the server kept from its check-ins (a
    // checkpoint), and the server's trail holds its own signed head.
    let listed = f.cmd(&["devices"]);
    for d in &devices {
        let id = d.file_name().unwrap().to_str().unwrap();
        let head = &server_device(&listed, id)["audit_head"];
        assert!(head["seq"].as_u64().unwrap() >= 3, "{head}");
        let file = dir.join(format!("{id}.head.json"));
        std::fs::write(&file, head.to_string()).unwrap();
        let config = d.join("system.toml");
        let v = json_args(
            &dir,
            &[
                "log",
                "verify",
                "--against",
                file.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            0,
        );
        assert_eq!(v["ok"], true, "{v}");
    }
    let head = f.cmd(&["audit", "--head"]);
    let file = dir.join("server.head.json");
    std::fs::write(&file, head.to_string()).unwrap();
    let v = f.cmd(&["audit", "--verify", "--against", file.to_str().unwrap()]);
    assert_eq!(v["ok"], true, "{v}");
}

/// The UTC time of day `m` minutes from now, as HH:MM.
fn hhmm_from_now(m: i64) -> String {
    let t = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_mins(m))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    format!("{:02}:{:02}", t.hour(), t.minute())
}

/// A device's `[[window]]` in UTC from `from` to `to` minutes after now, on every day.
fn window_from_now(from: i64, to: i64) -> String {
    format!(
        "\n[[window]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
         start = \"{}\"\nend = \"{}\"\nzone = \"UTC\"\n",
        hhmm_from_now(from),
        hhmm_from_now(to)
    )
}

/// A group's `--window` in UTC from `from` to `to` minutes after now, on every day.
fn group_window_from_now(from: i64, to: i64) -> String {
    format!(
        "mon,tue,wed,thu,fri,sat,sun@{}-{}/UTC",
        hhmm_from_now(from),
        hhmm_from_now(to)
    )
}

#[test]
fn a_device_whose_window_is_closed_stages_and_activates_only_once_it_opens() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let (url, admin) = (f.url.clone(), f.admin.clone());
    let bundle = release_bundle(&dir, "2.0.0", 1);
    let release = f.upload(&bundle);
    let token = f.token("lab");
    let dev = device(&dir, "gw-w", &url, &token);
    let config = dev.join("system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}{}", window_from_now(120, 180))).unwrap();
    let _running = sim_run(&dir, &dev);
    wait_for_devices(&dir, &url, &admin, &[], 1);
    let ro = f.rollout(&release, "100", "lab", &[]);
    let devices = [dev.clone()];
    wait("the device to stage", 60, &devices, || {
        f.cmd(&["devices"])[0]["state"] == "staged"
    });
    // Several check-ins later it is still staged: the target is not bootable, nothing rebooted.
    std::thread::sleep(Duration::from_millis(1500));
    let s = status(&dir, &dev);
    assert_eq!(
        (
            s["state"].as_str(),
            s["booted"].as_str(),
            s["version"].as_str()
        ),
        (Some("staged"), Some("A"), Some("1.0.0")),
        "{s}"
    );
    let boot: Value =
        serde_json::from_slice(&std::fs::read(dev.join("boot.json")).unwrap()).unwrap();
    assert_eq!(boot["bootable"]["B"], false, "{boot}");
    // Through the agent's API the assignment is a schedule of the fleet's, in progress, which
    // only the fleet can cancel.
    let listed = schedules(&dir, &dev).expect("the agent answers");
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(
        (
            listed[0]["origin"].as_str(),
            listed[0]["rollout"].as_str(),
            listed[0]["state"].as_str(),
            listed[0]["version"].as_str()
        ),
        (
            Some("fleet"),
            ro["id"].as_str(),
            Some("in_progress"),
            Some("2.0.0")
        ),
        "{listed}"
    );
    let config_arg = config.to_str().unwrap();
    let refused = json_args(
        &dir,
        &["schedule", "cancel", "s1", "--config", config_arg],
        1,
    );
    assert_eq!(refused["error"]["code"], "failed-precondition", "{refused}");
    // The device's window opens, but its group's (from the assignment) is closed: it waits.
    f.cmd(&[
        "group",
        "set",
        "lab",
        "--window",
        &group_window_from_now(120, 180),
    ]);
    // Replaced atomically, as an editor would, so the agent never reads half a file.
    let next = dev.join("system.toml.new");
    std::fs::write(&next, format!("{text}{}", window_from_now(-60, 60))).unwrap();
    std::fs::rename(&next, &config).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(status(&dir, &dev)["state"], "staged");
    // Both open: it activates, reboots and commits.
    f.cmd(&[
        "group",
        "set",
        "lab",
        "--window",
        &group_window_from_now(-60, 60),
    ]);
    wait("the device to commit", 60, &devices, || {
        status(&dir, &dev)["state"] == "committed"
    });
    wait("the fleet's schedule to complete", 30, &devices, || {
        schedules(&dir, &dev).is_some_and(|l| l[0]["state"] == "completed")
    });
    // Its report follows.
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    wait("the server to count the commit", 30, &devices, || {
        f.cmd(&["rollout", "status", &ro_id])["committed"] == 1
    });
}

/// `abide agent --once --config DEVICE/system.toml --json`, expecting exit code `exit`.
pub(crate) fn agent_once(dir: &Path, device: &Path, exit: i32) -> Value {
    let config = device.join("system.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["agent", "--once", "--json", "--config"])
        .arg(&config)
        .current_dir(dir)
        .env("ABIDE_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(exit),
        "abide agent --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// A device `name` behind a slow link (a pacing proxy) with `release` rolled out to its group
/// lab, and `abide agent --once` running on it, caught in the middle of its download:
/// (device, agent, rollout).
fn slow_download(dir: &Path, f: &Fleet, release: &Value, name: &str) -> (PathBuf, Child, Value) {
    let token = f.token("lab");
    let proxy = CuttingProxy::start(&f.url, Vec::new(), Some(Duration::from_millis(60)));
    let dev = device(dir, name, &proxy.url, &token);
    agent_once(dir, &dev, 0);
    let ro = f.rollout(release, "100", "lab", &[]);
    let agent = agent_once_in_background(dir, &dev);
    wait(
        "the download to start",
        30,
        std::slice::from_ref(&dev),
        || status(dir, &dev)["state"] == "downloading",
    );
    // The proxy's thread keeps serving after the handle goes.
    drop(proxy);
    (dev, agent, ro)
}

/// The device's last `download` audit record (`abide log --json`).
fn last_download(dir: &Path, device: &Path) -> Value {
    let log = json_args(
        dir,
        &[
            "log",
            "--config",
            device.join("system.toml").to_str().unwrap(),
        ],
        0,
    );
    log.as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["event"] == "download")
        .expect("a download record")
        .clone()
}

/// Waits for a background agent and insists it succeeded.
fn succeeded(agent: Child) {
    let out = agent.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `abide agent --once` on `device`, started and left running.
fn agent_once_in_background(dir: &Path, device: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["agent", "--once", "--json", "--config"])
        .arg(device.join("system.toml"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("abide agent starts")
}

/// The device's reports as the server recorded them, in the order of its audit trail.
fn reports_on_server(dir: &Path, url: &str, admin: &Path, device: &str) -> Vec<(u64, String)> {
    let audit = fleet(dir, url, admin, &["audit"]);
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "device.report" && r["actor"] == format!("device:{device}"))
        .map(|r| {
            (
                r["details"]["seq"].as_u64().unwrap(),
                r["details"]["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn reports_made_while_the_server_is_away_arrive_in_order_once_it_returns() {
    let (_tmp, dir) = workspace();
    let mut f = Fleet::start(&dir, None, &[]);
    let (url, admin) = (f.url.clone(), f.admin.clone());
    let bundle = release_bundle(&dir, "2.0.0", 1);
    let release = f.upload(&bundle);
    let token = f.token("lab");
    let dev = device(&dir, "gw-off", &url, &token);
    assert_eq!(
        agent_once(&dir, &dev, 0)["exit"],
        "idle",
        "enrolled, nothing assigned"
    );
    f.rollout(&release, "100", "lab", &[]);
    // Downloaded, staged, leased, activated: the agent hands over to a reboot.
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    assert_eq!(status(&dir, &dev)["state"], "activated");
    f.stop();

    // The server is away: the device reboots, its gate commits, the report waits on disk.
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(status(&dir, &dev)["state"], "committed");
    agent_once(&dir, &dev, 3);
    // The enrolment (with its credential) is readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.join("state/fleet.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let fleet_state: Value =
        serde_json::from_slice(&std::fs::read(dev.join("state/fleet.json")).unwrap()).unwrap();
    assert!(fleet_state["enrolment"]["credential"].is_string());
    assert!(fleet_state["enrolment"]["server_key"].is_string());
    let queued: Vec<&str> = fleet_state["outbox"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(queued, ["committed"], "{fleet_state}");

    // Back: the queued report arrives, once, after the ones before it.
    f.restart();
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle");
    let seen = reports_on_server(&dir, &url, &admin, "gw-off");
    let statuses: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        statuses,
        ["downloading", "staged", "rebooting", "committed"]
    );
    let seqs: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    // A second run sends nothing again.
    agent_once(&dir, &dev, 0);
    assert_eq!(reports_on_server(&dir, &url, &admin, "gw-off").len(), 4);
    let listed = f.cmd(&["devices"]);
    assert_eq!(
        (listed[0]["state"].as_str(), listed[0]["version"].as_str()),
        (Some("committed"), Some("2.0.0"))
    );
}

/// A request's head (as text) and its body (by Content-Length) from `conn`; none if the
/// connection ends first.
fn read_request(conn: &mut std::net::TcpStream) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let len: usize = header_of(&text, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((text, body))
}

/// The value of header `name` in a request head.
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// A TCP proxy in front of the server that cuts bundle downloads: each answer to a range
/// request is forwarded up to the next cut offset (counted in bundle bytes) and the connection
/// is then closed in the middle of the body. Every request gets `connection: close`, so each
/// one has its own connection. Counts the bundle bytes it forwarded.
struct CuttingProxy {
    url: String,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts_made: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CuttingProxy {
    fn start(upstream: &str, cuts: Vec<u64>, pace: Option<Duration>) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let forwarded = Arc::new(AtomicU64::new(0));
        let cuts_made = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(Mutex::new(cuts));
        let (fwd, made) = (forwarded.clone(), cuts_made.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let (upstream, fwd, made, pending) =
                    (upstream.clone(), fwd.clone(), made.clone(), pending.clone());
                std::thread::spawn(move || {
                    let Some((text, body)) = read_request(&mut client) else {
                        return;
                    };
                    let header = |name: &str| header_of(&text, name);
                    let range_start: Option<u64> = header("range").and_then(|r| {
                        r.trim_start_matches("bytes=")
                            .split('-')
                            .next()?
                            .parse()
                            .ok()
                    });
                    let mut rewritten: String = text
                        .trim_end_matches("\r\n")
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .map(|l| format!("{l}\r\n"))
                        .collect();
                    rewritten.push_str("connection: close\r\n\r\n");
                    let Ok(mut server) = TcpStream::connect(&upstream) else {
                        return;
                    };
                    if server.write_all(rewritten.as_bytes()).is_err()
                        || server.write_all(&body).is_err()
                    {
                        return;
                    }
                    // The answer, forwarded as it comes: its head as is, then the body, cut
                    // where a cut falls; with a pace, one piece per pause.
                    let mut answer = Vec::new();
                    let mut buf = [0u8; 16 << 10];
                    let mut body_at: Option<usize> = None;
                    let mut written = 0usize;
                    loop {
                        let n = server.read(&mut buf).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        answer.extend_from_slice(&buf[..n]);
                        if body_at.is_none()
                            && let Some(p) = answer.windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            body_at = Some(p + 4);
                        }
                        let mut limit = answer.len();
                        let mut cut_here = false;
                        if let (Some(start), Some(at)) = (range_start, body_at) {
                            let end = start + (answer.len() - at) as u64;
                            let mut cuts = pending.lock().unwrap();
                            if let Some(i) = cuts.iter().position(|c| (start..end).contains(c)) {
                                let cut = cuts.remove(i);
                                limit = at + (cut - start) as usize;
                                cut_here = true;
                            }
                        }
                        if client.write_all(&answer[written..limit]).is_err() {
                            return;
                        }
                        if let (Some(_), Some(at)) = (range_start, body_at) {
                            fwd.fetch_add((limit - written.max(at)) as u64, Ordering::Relaxed);
                        }
                        written = limit;
                        if cut_here {
                            made.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        if range_start.is_some()
                            && let Some(p) = pace
                        {
                            std::thread::sleep(p);
                        }
                    }
                });
            }
        });
        CuttingProxy {
            url,
            forwarded,
            cuts_made,
        }
    }
}

#[test]
fn a_download_cut_at_many_offsets_resumes_and_fetches_each_byte_about_once() {
    use std::sync::atomic::Ordering;
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let url = f.url.clone();
    let bundle = release_bundle(&dir, "2.0.0", 7);
    let size = std::fs::metadata(&bundle).unwrap().len();
    let release = f.upload(&bundle);
    f.token("lab");
    // Cuts in the header and manifest, the signatures and the chunk table (the first few KiB),
    // and spread through the chunks, each at an odd offset (inside a chunk).
    let mut cuts: Vec<u64> = vec![7, 90, 333, 700, 1001, 1500, 2049, 2600, 3100, 4000];
    cuts.extend((1..16).map(|k| size * k / 16 + 777));
    let n_cuts = cuts.len() as u64;
    let proxy = CuttingProxy::start(&url, cuts, None);
    let dev = device(&dir, "gw-cut", &proxy.url, &dir.join("lab.token"));
    agent_once(&dir, &dev, 0);
    f.rollout(&release, "100", "lab", &[]);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    assert_eq!(
        proxy.cuts_made.load(Ordering::Relaxed),
        n_cuts,
        "every cut happened"
    );
    let fetched = proxy.forwarded.load(Ordering::Relaxed);
    assert!(
        fetched as f64 <= 1.1 * size as f64,
        "fetched {fetched} bytes of a {size}-byte bundle"
    );
    let image = std::fs::read(dir.join("image-7.img")).unwrap();
    let slot = dev.join("slots/rootfs.B.img");
    assert_eq!(slot_digest(&slot, IMAGE_LEN), Digest::of(&image).to_hex());
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(status(&dir, &dev)["state"], "committed");
    // The device's audit log has the download with its resumptions.
    let download = last_download(&dir, &dev);
    assert!(
        download["details"]["resumed"].as_u64().unwrap() >= n_cuts,
        "{download}"
    );
}

/// A stand-in for the fleet server that enrols any device, pins key 1 as the server key, and
/// answers every check-in with an assignment spoiled as `mode` says (each offering a release,
/// so acting on it would start an install).
fn spoiling_server(mode: std::sync::Arc<std::sync::Mutex<&'static str>>) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let server_key = abide_testkit::key(1);
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let Some((text, body)) = read_request(&mut conn) else {
                continue;
            };
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let answer = if text.starts_with("POST /api/v1/device/enroll") {
                serde_json::json!({"device_id": request["device_id"], "credential": "c-1",
                                   "server_key": server_key.public().to_hex(), "group": "lab"})
            } else if text.starts_with("POST /api/v1/device/checkin") {
                let mode = *mode.lock().unwrap();
                let now = jiff::Timestamp::now();
                let hour = jiff::SignedDuration::from_hours(1);
                let payload = serde_json::json!({
                    "device_id": if mode == "foreign" { "someone-else" } else { "gw-spoiled" },
                    "nonce": if mode == "replayed" { "00112233445566778899aabbccddeeff".into() } else { request["nonce"].clone() },
                    "issued_at": now.to_string(),
                    "expires_at": if mode == "stale" { (now - hour).to_string() } else { (now + hour).to_string() },
                    "release": {"release_id": "r-1", "rollout_id": "ro-1", "version": "2.0.0",
                                "security_version": 1, "url": "/api/v1/releases/r-1/bundle",
                                "sha256": "00", "size": 1000, "action": "install"},
                    "window": null,
                })
                .to_string();
                let signer = if mode == "wrong-key" {
                    abide_testkit::key(2)
                } else {
                    abide_testkit::key(1)
                };
                let signature = signer.sign(b"abide-assignment-v1", payload.as_bytes());
                serde_json::json!({"payload": payload,
                                   "signature": abide_bundle::digest::encode_hex(&signature),
                                   "key_id": signer.public().id().as_str()})
            } else {
                serde_json::json!({"seq": 1, "outcome": "recorded"})
            };
            let answer = answer.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    url
}

#[test]
fn stale_replayed_foreign_and_badly_signed_assignments_are_refused_audited_and_change_nothing() {
    let (_tmp, dir) = workspace();
    let mode = std::sync::Arc::new(std::sync::Mutex::new("good"));
    let url = spoiling_server(mode.clone());
    std::fs::write(dir.join("any.token"), "abide-enroll-x").unwrap();
    let dev = device(&dir, "gw-spoiled", &url, &dir.join("any.token"));
    let snapshot = || {
        [
            "state/state.json",
            "boot.json",
            "slots/rootfs.B.img",
            "state/fleet.json",
        ]
        .map(|f| Digest::of(&std::fs::read(dev.join(f)).unwrap_or_default()).to_hex())
    };
    for (spoil, why) in [
        ("stale", "expired"),
        ("replayed", "replayed"),
        ("foreign", "another device"),
        ("wrong-key", "not the server's"),
    ] {
        *mode.lock().unwrap() = spoil;
        let before = (spoil != "stale").then(snapshot);
        let log_before = std::fs::read_to_string(dev.join("state/audit.log")).unwrap_or_default();
        agent_once(&dir, &dev, 3);
        if let Some(before) = before {
            assert_eq!(snapshot(), before, "{spoil}: something changed");
        }
        let log = std::fs::read_to_string(dev.join("state/audit.log")).unwrap();
        let new: Vec<&str> = log[log_before.len()..].lines().collect();
        assert!(!new.is_empty(), "{spoil}: nothing audited");
        for line in &new {
            assert!(
                line.contains("assignment-refused") && line.contains(why),
                "{spoil}: {line}"
            );
        }
        let s = status(&dir, &dev);
        assert_eq!(
            (s["state"].as_str(), s["version"].as_str()),
            (Some("idle"), Some("1.0.0")),
            "{spoil}"
        );
    }
    let verified = json_args(
        &dir,
        &[
            "log",
            "verify",
            "--config",
            dev.join("system.toml").to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(verified["ok"], true);
}

#[test]
fn an_install_while_the_agent_installs_is_busy_and_changes_nothing() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let bundle = release_bundle(&dir, "2.0.0", 1);
    let other = release_bundle(&dir, "9.0.0", 2);
    let release = f.upload(&bundle);
    // A slow link: the download takes a few seconds.
    let (dev, agent, _) = slow_download(&dir, &f, &release, "gw-busy");
    let devices = [dev.clone()];
    // The server sees the download's progress.
    let size = std::fs::metadata(&bundle).unwrap().len();
    wait("progress on the server", 30, &devices, || {
        let d = f.cmd(&["devices"]);
        let p = &d[0]["progress"];
        p["total"] == size && p["fetched"].as_u64().is_some_and(|n| n > 0 && n < size)
    });
    let refused = install(&dir, &dev, &other, 1);
    assert_eq!(refused["error"]["code"], "busy", "{refused}");
    succeeded(agent);
    let s = status(&dir, &dev);
    assert_eq!(
        (s["state"].as_str(), s["target_version"].as_str()),
        (Some("activated"), Some("2.0.0")),
        "{s}"
    );
    let image = std::fs::read(dir.join("image-1.img")).unwrap();
    let slot = dev.join("slots/rootfs.B.img");
    assert_eq!(slot_digest(&slot, IMAGE_LEN), Digest::of(&image).to_hex());
    let log = std::fs::read_to_string(dev.join("state/audit.log")).unwrap();
    assert!(
        !log.contains("9.0.0"),
        "the refused install left a trace: {log}"
    );
}

#[test]
fn a_trust_root_rotated_on_the_server_reaches_the_device_which_then_trusts_only_the_new_keys() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let (url, admin) = (f.url.clone(), f.admin.clone());
    let token = f.token("lab");
    let dev = device(&dir, "gw-rot", &url, &token);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle");

    // Version 2 drops key a and adds key c: signed by a (old) and c (new).
    ok(
        &dir,
        "trust rotate --from trust.json --key b.pub --key c.pub --threshold 1 \
         --sign a.key --sign c.key --out trust-v2.json",
    );
    // A root that skips a version, or is not signed by the current keys, is refused.
    ok(
        &dir,
        "trust rotate --from trust-v2.json --key c.pub --threshold 1 --sign c.key --out trust-v3.json",
    );
    let skipped = json_args(
        &dir,
        &[
            "fleet",
            "--server",
            &url,
            "--token-file",
            admin.to_str().unwrap(),
            "trust",
            "publish",
            "trust-v3.json",
        ],
        3,
    );
    assert!(
        skipped["error"]["message"]
            .as_str()
            .unwrap()
            .contains("trust-rotation"),
        "{skipped}"
    );
    let published = f.cmd(&["trust", "publish", "trust-v2.json"]);
    assert_eq!(published["version"], 2);
    assert_eq!(f.cmd(&["trust", "show"])["version"], 2);

    // The device takes it at its next check-in and records it.
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle");
    let held = std::fs::read(dev.join("state/trust.json")).unwrap();
    assert_eq!(held, std::fs::read(dir.join("trust-v2.json")).unwrap());
    let log = std::fs::read_to_string(dev.join("state/audit.log")).unwrap();
    assert!(
        log.contains("trust-rotate") && log.contains("\"to\":2"),
        "{log}"
    );

    let image = dir.join("image-r.img");
    std::fs::write(&image, abide_testkit::image(IMAGE_LEN, 11)).unwrap();
    let make = |version: &str, key: &str| {
        ok(
            &dir,
            &format!(
                "bundle create --product gw --version {version} --security-version 1 \
                 --compatible gw-board --component rootfs={} --sign {key}.key --out by-{key}.abide",
                image.display()
            ),
        );
        dir.join(format!("by-{key}.abide"))
    };
    // Signed only by the removed key: the device and the server refuse it.
    let by_a = make("2.0.0", "a");
    let refused = install(&dir, &dev, &by_a, 1);
    assert_eq!(refused["error"]["code"], "untrusted-key", "{refused}");
    let upload = json_args(
        &dir,
        &[
            "fleet",
            "--server",
            &url,
            "--token-file",
            admin.to_str().unwrap(),
            "release",
            "upload",
            by_a.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        upload["error"]["message"]
            .as_str()
            .unwrap()
            .contains("untrusted-key"),
        "{upload}"
    );
    // Signed by the new key: it goes through the fleet and commits.
    let by_c = make("2.1.0", "c");
    let release = f.upload(&by_c);
    f.rollout(&release, "100", "lab", &[]);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    ok(&dir, &format!("sim reboot {}", dev.display()));
    let s = status(&dir, &dev);
    assert_eq!(
        (s["state"].as_str(), s["version"].as_str()),
        (Some("committed"), Some("2.1.0")),
        "{s}"
    );
}

/// A CA and certificates it signs, written as PEM files into `dir`: `NAME.pem`, `NAME.key`.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
        }
    }

    pub fn issue(&self, dir: &Path, name: &str, cn: &str, san: &[&str]) {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(san.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn over_https_with_a_device_certificate_the_agent_enrols_checks_in_and_updates() {
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let ca = TestCa::new(&dir, "fleet-ca");
    ca.issue(&dir, "server", "abide server", &["127.0.0.1"]);
    ca.issue(&dir, "gw-tls", "gw-tls", &[]);
    ca.issue(&dir, "other", "someone-else", &[]);
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["server", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--tls-cert", "server.pem", "--tls-key", "server.key"])
        .args(["--device-ca", "fleet-ca.pem", "--require-device-cert"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let admin = data.join("admin.token");
    let admin_cmd = |args: &[&str], exit: i32| {
        let mut all = vec![
            "fleet",
            "--server",
            &url,
            "--ca-file",
            "fleet-ca.pem",
            "--token-file",
        ];
        all.push(admin.to_str().unwrap());
        all.extend_from_slice(args);
        json_args(&dir, &all, exit)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(admin.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let enroll = admin_cmd(
        &["enroll-token", "create", "--group", "lab", "--uses", "100"],
        0,
    );
    std::fs::write(dir.join("lab.token"), enroll["token"].as_str().unwrap()).unwrap();
    let bundle = release_bundle(&dir, "2.0.0", 3);
    let release = admin_cmd(&["release", "upload", bundle.to_str().unwrap()], 0);

    let dev = device(&dir, "gw-tls", &url, &dir.join("lab.token"));
    let config = dev.join("system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let with_cert = |name: &str| {
        format!(
            "{text}ca_file = \"../fleet-ca.pem\"\nclient_cert = \"../{name}.pem\"\nclient_key = \"../{name}.key\"\n"
        )
    };
    // Another device's certificate: the server refuses, nothing is enrolled.
    std::fs::write(&config, with_cert("other")).unwrap();
    agent_once(&dir, &dev, 3);
    assert!(!dev.join("state/fleet.json").exists());
    // Its own: enrolled, and the update goes through over HTTPS.
    std::fs::write(&config, with_cert("gw-tls")).unwrap();
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle");
    admin_cmd(
        &[
            "rollout",
            "create",
            "--release",
            release["id"].as_str().unwrap(),
            "--stages",
            "100",
            "--group",
            "lab",
        ],
        0,
    );
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle");
    let listed = admin_cmd(&["devices"], 0);
    assert_eq!(
        (listed[0]["state"].as_str(), listed[0]["version"].as_str()),
        (Some("committed"), Some("2.0.0")),
        "{listed}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `abide_checkins_total` from the server's /metrics (read with the metrics token).
fn checkins(f: &Fleet) -> u64 {
    use std::io::{Read, Write};
    let token = std::fs::read_to_string(f.data.join("metrics.token")).unwrap();
    let mut s = std::net::TcpStream::connect(f.url.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nauthorization: Bearer {}\r\n\r\n",
        token.trim()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("abide_checkins_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the metric is there")
}

#[test]
fn the_check_in_interval_the_server_asks_for_wins_over_the_devices_own() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &["--device-poll", "3s"]);
    let url = f.url.clone();
    let token = f.token("lab");
    // The device's own interval is 200ms: 20 check-ins in 4 seconds; the server's, 3s: 2 or 3.
    let dev = device(&dir, "gw-poll", &url, &token);
    let before = checkins(&f);
    let running = sim_run(&dir, &dev);
    // From its first check-in (which brings the server's interval) on, 4 seconds.
    wait("the first check-in", 30, std::slice::from_ref(&dev), || {
        checkins(&f) > before
    });
    let first = checkins(&f);
    std::thread::sleep(Duration::from_secs(4));
    drop(running);
    let n = checkins(&f) - first;
    assert!(n <= 2, "{n} check-ins in 4 seconds after the first");
}

#[test]
fn with_prestage_no_device_activates_until_the_share_is_staged() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let url = f.url.clone();
    let bundle = release_bundle(&dir, "2.0.0", 1);
    let release = f.upload(&bundle);
    f.token("lab");
    let devices: Vec<PathBuf> = (1..=3)
        .map(|i| device(&dir, &format!("gw-p{i}"), &url, &dir.join("lab.token")))
        .collect();
    for d in &devices {
        agent_once(&dir, d, 0);
    }
    let ro = f.rollout(&release, "50:0s,100", "lab", &["--prestage", "100%"]);
    assert_eq!(ro["status"], "prestaging", "{ro}");
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    // Two of the three run: they stage, and wait.
    let mut running: Vec<Running> = devices[..2].iter().map(|d| sim_run(&dir, d)).collect();
    wait("two devices staged", 60, &devices, || {
        let st = f.cmd(&["rollout", "status", &ro_id]);
        st["staged"] == 2
    });
    std::thread::sleep(Duration::from_millis(1500));
    let st = f.cmd(&["rollout", "status", &ro_id]);
    assert_eq!(st["status"], "prestaging", "{st}");
    assert_eq!(st["staged_share"], 66.7, "{st}");
    for d in &devices[..2] {
        let s = status(&dir, d);
        assert_eq!(
            (s["state"].as_str(), s["booted"].as_str()),
            (Some("staged"), Some("A")),
            "{s}"
        );
    }
    // The third stages too: activation begins, stage by stage, and all commit.
    running.push(sim_run(&dir, &devices[2]));
    wait("the rollout to complete", 90, &devices, || {
        f.cmd(&["rollout", "status", &ro_id])["status"] == "completed"
    });
    for d in &devices {
        assert_eq!(status(&dir, d)["state"], "committed");
    }
    let audit = f.cmd(&["audit"]);
    let start = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "rollout.start")
        .expect("the rollout started");
    assert_eq!(
        (
            start["details"]["staged"].as_i64(),
            start["details"]["of"].as_i64()
        ),
        (Some(3), Some(3))
    );
}

#[test]
fn an_update_fetches_only_the_chunks_the_running_group_lacks() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let url = f.url.clone();
    f.token("lab");
    let proxy = CuttingProxy::start(&url, Vec::new(), None);
    let dev = device(&dir, "gw-delta", &proxy.url, &dir.join("lab.token"));
    // 2.0.0 installed from a file and committed: group B holds it, with its chunk index.
    let v2 = release_bundle(&dir, "2.0.0", 5);
    let config = dev.join("system.toml");
    ok(
        &dir,
        &format!("install {} --config {}", v2.display(), config.display()),
    );
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(status(&dir, &dev)["version"], "2.0.0");
    // 2.1.0: the same image with 5 % of it changed in one place.
    let mut image = std::fs::read(dir.join("image-5.img")).unwrap();
    let (from, len) = (IMAGE_LEN / 3, IMAGE_LEN / 20);
    for (i, b) in image[from..from + len].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(dir.join("image-6.img"), &image).unwrap();
    let v21 = release_bundle(&dir, "2.1.0", 6);
    let size = std::fs::metadata(&v21).unwrap().len();
    let release = f.upload(&v21);
    agent_once(&dir, &dev, 0);
    f.rollout(&release, "100", "lab", &[]);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    let fetched = proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        fetched * 4 < size,
        "fetched {fetched} bytes of a {size}-byte bundle for a 5 % change"
    );
    // The new image is in group A, byte for byte, and commits.
    let slot = dev.join("slots/rootfs.A.img");
    assert_eq!(slot_digest(&slot, IMAGE_LEN), Digest::of(&image).to_hex());
    ok(&dir, &format!("sim reboot {}", dev.display()));
    let s = status(&dir, &dev);
    assert_eq!(
        (s["version"].as_str(), s["booted"].as_str()),
        (Some("2.1.0"), Some("A")),
        "{s}"
    );
}

#[test]
fn a_paused_rollout_stops_a_running_download_cleanly_and_a_resumed_one_completes_it() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let release = f.upload(&release_bundle(&dir, "2.0.0", 1));
    // A slow link, so the pause comes in the middle of the download.
    let (dev, agent, ro) = slow_download(&dir, &f, &release, "gw-stop");
    let ro_id = ro["id"].as_str().unwrap().to_owned();
    f.cmd(&["rollout", "pause", &ro_id]);
    succeeded(agent);
    // Stopped: the target is not bootable, nothing was reported as a failure.
    let s = status(&dir, &dev);
    assert_eq!(
        (s["state"].as_str(), s["booted"].as_str()),
        (Some("failed"), Some("A")),
        "{s}"
    );
    assert!(s["reason"].as_str().unwrap().contains("cancelled"), "{s}");
    let boot: Value =
        serde_json::from_slice(&std::fs::read(dev.join("boot.json")).unwrap()).unwrap();
    assert_eq!(boot["bootable"]["B"], false, "{boot}");
    let st = f.cmd(&["rollout", "status", &ro_id]);
    assert_eq!(
        st["failed"], 0,
        "a withdrawn download is not a failure: {st}"
    );
    // Resumed: the device downloads again and activates.
    f.cmd(&["rollout", "resume", &ro_id]);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(status(&dir, &dev)["state"], "committed");
}

#[test]
fn a_device_running_the_old_release_downloads_only_the_delta_and_lands_on_the_new_image() {
    use std::sync::atomic::Ordering;
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let old = f.upload(&release_bundle(&dir, "2.0.0", 7));
    // 2.1.0: the same image with two stretches rebuilt and a few bytes inserted.
    let mut image = abide_testkit::image(IMAGE_LEN, 7);
    for b in image[200_000..320_000].iter_mut().step_by(53) {
        *b = b.wrapping_add(1);
    }
    image.splice(900_000..900_000, b"2.1.0 adds this".iter().copied());
    for b in image[1_100_000..1_150_000].iter_mut().step_by(41) {
        *b ^= 0x20;
    }
    image.truncate(IMAGE_LEN);
    std::fs::write(dir.join("image-21.img"), &image).unwrap();
    ok(
        &dir,
        "bundle create --product gw --version 2.1.0 --security-version 1 --compatible gw-board \
         --component rootfs=image-21.img --sign a.key --out v2.1.0.abide",
    );
    let new = f.upload(&dir.join("v2.1.0.abide"));
    let token = f.token("lab");
    let proxy = CuttingProxy::start(&f.url, Vec::new(), None);
    let dev = device(&dir, "gw-delta", &proxy.url, &token);
    // Two more devices whose running slots get damaged outside Abide after they commit 2.0.0,
    // behind their intact chunk indexes: one where 2.1.0 keeps the old content (the delta
    // copies those chunks), one where 2.1.0 changed it (the delta's patch reads it). A third
    // loses its chunk index, so the delta is refused before anything changes.
    let damaged: Vec<(PathBuf, CuttingProxy, Option<std::ops::Range<usize>>)> = [
        ("gw-damaged", Some(1_300_000..1_400_000)),
        ("gw-damaged-patch", Some(1_100_000..1_150_000)),
        ("gw-no-index", None),
    ]
    .into_iter()
    .map(|(name, range)| {
        let proxy = CuttingProxy::start(&f.url, Vec::new(), None);
        (device(&dir, name, &proxy.url, &token), proxy, range)
    })
    .collect();
    agent_once(&dir, &dev, 0);
    for (d, _, _) in &damaged {
        agent_once(&dir, d, 0);
    }
    f.rollout(&old, "100", "lab", &[]);
    for d in std::iter::once(&dev).chain(damaged.iter().map(|(d, _, _)| d)) {
        assert_eq!(agent_once(&dir, d, 0)["exit"], "reboot");
        ok(&dir, &format!("sim reboot {}", d.display()));
        assert_eq!(status(&dir, d)["version"], "2.0.0");
    }
    for (d, _, range) in &damaged {
        let booted = status(&dir, d)["booted"].as_str().unwrap().to_owned();
        let Some(range) = range else {
            std::fs::remove_file(d.join(format!("state/chunks/{booted}.rootfs.idx"))).unwrap();
            continue;
        };
        let running = d.join(format!("slots/rootfs.{booted}.img"));
        let mut bytes = std::fs::read(&running).unwrap();
        for b in &mut bytes[range.clone()] {
            *b ^= 0x5a;
        }
        std::fs::write(&running, &bytes).unwrap();
    }

    // The operator makes the delta offline and uploads it; asked to make it, the server finds
    // that one (it would have made the same file: deltas are made deterministically).
    let (old_id, new_id) = (old["id"].as_str().unwrap(), new["id"].as_str().unwrap());
    ok(
        &dir,
        "delta create --from v2.0.0.abide --to v2.1.0.abide --out offline.abide",
    );
    let uploaded = f.cmd(&[
        "release",
        "delta-upload",
        dir.join("offline.abide").to_str().unwrap(),
    ]);
    assert_eq!(uploaded["offered"], true, "{uploaded}");
    let delta = f.cmd(&["release", "delta", "--from", old_id, "--to", new_id]);
    assert_eq!(delta["sha256"], uploaded["sha256"], "{delta}");
    assert_eq!(
        std::fs::metadata(dir.join("offline.abide")).unwrap().len(),
        delta["size"].as_u64().unwrap()
    );
    let listed = f.cmd(&["release", "deltas", new_id]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["sha256"] == delta["sha256"]),
        "{listed}"
    );
    let size = delta["size"].as_u64().unwrap();
    f.rollout(&new, "100", "lab", &[]);
    let before = proxy.forwarded.load(Ordering::Relaxed);
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    let fetched = proxy.forwarded.load(Ordering::Relaxed) - before;
    assert_eq!(
        fetched, size,
        "fetched {fetched} bytes; the delta is {size}"
    );
    assert!(size < delta["chunks_size"].as_u64().unwrap(), "{delta}");
    ok(&dir, &format!("sim reboot {}", dev.display()));
    let s = status(&dir, &dev);
    assert_eq!(
        (s["state"].as_str(), s["version"].as_str()),
        (Some("committed"), Some("2.1.0")),
        "{s}"
    );
    let booted = s["booted"].as_str().unwrap();
    let slot = dev.join(format!("slots/rootfs.{booted}.img"));
    assert_eq!(slot_digest(&slot, IMAGE_LEN), Digest::of(&image).to_hex());
    let download = last_download(&dir, &dev);
    assert!(
        download["details"]["url"]
            .as_str()
            .unwrap()
            .contains("/deltas/"),
        "{download}"
    );

    // The damaged devices take the delta too, find (partway, or before anything changes) that
    // their running slot does not hold what it was made against, and fall back to the bundle's
    // chunks: committed, byte for byte, with the fallback and its reason in the audit log.
    for (d, proxy, _) in &damaged {
        let before = proxy.forwarded.load(Ordering::Relaxed);
        let once = agent_once(&dir, d, 0);
        assert_eq!(once["exit"], "reboot", "{}: {once}", d.display());
        let fetched = proxy.forwarded.load(Ordering::Relaxed) - before;
        assert!(fetched > 0, "{}", d.display());
        let download = last_download(&dir, d);
        let url = download["details"]["url"].as_str().unwrap();
        assert!(!url.contains("/deltas/"), "{download}");
        let log = json_args(
            &dir,
            &["log", "--config", d.join("system.toml").to_str().unwrap()],
            0,
        );
        let fell_back = log
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["event"] == "delta-fallback")
            .unwrap_or_else(|| panic!("no delta-fallback record: {log}"));
        assert!(
            fell_back["details"]["url"]
                .as_str()
                .unwrap()
                .contains("/deltas/"),
            "{fell_back}"
        );
        if d.ends_with("gw-no-index") {
            assert_eq!(fell_back["details"]["code"], "delta-base", "{fell_back}");
            assert!(
                fell_back["details"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("no chunk index"),
                "{fell_back}"
            );
        }
        ok(&dir, &format!("sim reboot {}", d.display()));
        let s = status(&dir, d);
        assert_eq!(
            (s["state"].as_str(), s["version"].as_str()),
            (Some("committed"), Some("2.1.0")),
            "{}: {s}",
            d.display()
        );
        let slot = d.join(format!(
            "slots/rootfs.{}.img",
            s["booted"].as_str().unwrap()
        ));
        assert_eq!(slot_digest(&slot, IMAGE_LEN), Digest::of(&image).to_hex());
        json_args(
            &dir,
            &[
                "log",
                "verify",
                "--config",
                d.join("system.toml").to_str().unwrap(),
            ],
            0,
        );
    }
}

/// The fleet simulator is an executor of the agent's own machine (`abide_core::agent::next`):
/// on the same rollouts, its devices report the very steps real agents report — for a release
/// that commits, and for one whose health check fails and rolls back.
#[test]
fn the_simulator_reports_the_same_steps_as_real_agents_on_the_same_rollouts() {
    let (_tmp, dir) = workspace();
    let f = Fleet::start(&dir, None, &[]);
    let (lab, canary) = (f.token("lab"), f.token("canary"));
    let real = [
        device(&dir, "gw-1", &f.url, &lab),
        device(&dir, "gw-2", &f.url, &canary),
    ];
    let _running: Vec<Running> = real.iter().map(|d| sim_run(&dir, d)).collect();
    let simulated = |token: &Path, fail_rate: &str, prefix: &str, until: &str| {
        let token = std::fs::read_to_string(token).unwrap();
        crate::fleet::simulate(
            &dir,
            &f.url,
            &token,
            &[
                "--devices",
                "1",
                "--product",
                "gw",
                "--compatible",
                "gw-board",
                "--version",
                "1.0.0",
                "--fail-rate",
                fail_rate,
                "--poll",
                "200ms",
                "--duration",
                "120s",
                "--prefix",
                prefix,
                "--until-version",
                until,
            ],
            &dir.join(format!("{prefix}.ledger.json")),
        )
    };
    let sims = [
        simulated(&lab, "0", "sim-ok", "2.0.0"),
        simulated(&canary, "1", "sim-bad", "3.0.0"),
    ];
    wait_for_devices(&dir, &f.url, &f.admin, &[], 4);
    let good = f.upload(&release_bundle(&dir, "2.0.0", 1));
    let bad = f.upload(&release_bundle(&dir, "3.0.0", 2));
    f.rollout(&good, "100", "lab", &[]);
    // Both canaries fail; the threshold lets the rollout run to its end rather than pause
    // (and withdraw the release) at the first failure.
    f.rollout(&bad, "100", "canary", &["--failure-threshold", "100%"]);
    for sim in sims {
        let summary = crate::fleet::finish(sim);
        assert_eq!(summary["errors"], 0, "{summary}");
    }
    let state = |id: &str| {
        let listed = f.cmd(&["devices"]);
        let d = server_device(&listed, id);
        (
            d["state"].as_str().map(str::to_owned),
            d["version"].as_str().map(str::to_owned),
        )
    };
    wait("the real devices to end their updates", 90, &real, || {
        state("gw-1") == (Some("committed".into()), Some("2.0.0".into()))
            && state("gw-2").0.as_deref() == Some("rolled_back")
    });
    let steps = |id: &str| -> Vec<String> {
        reports_on_server(&dir, &f.url, &f.admin, id)
            .into_iter()
            .map(|(_, status)| status)
            .collect()
    };
    assert_eq!(
        steps("gw-1"),
        ["downloading", "staged", "rebooting", "committed"]
    );
    assert_eq!(steps("sim-ok-0"), steps("gw-1"));
    assert_eq!(
        steps("gw-2"),
        ["downloading", "staged", "rebooting", "rolled_back"]
    );
    assert_eq!(steps("sim-bad-0"), steps("gw-2"));
}

/// A `fleet` health check: the trial commits once the server answers a check-in from the new
/// system; a new system that cannot reach the server rolls back by itself, and the server
/// hears `rolled_back` once the old system is back. (Without the check, the same trial with the
/// server away commits: `reports_made_while_the_server_is_away_arrive_in_order_once_it_returns`.)
#[test]
fn a_trial_commits_only_once_the_fleet_server_answers_a_check_in_from_it() {
    let (_tmp, dir) = workspace();
    let mut f = Fleet::start(&dir, None, &[]);
    let token = f.token("lab");
    let dev = device(&dir, "gw-net", &f.url, &token);
    let config = dev.join("system.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("deadline = \"5m\"", "deadline = \"1m\"\ngrace = \"3s\"");
    std::fs::write(
        &config,
        format!(
            "{text}\n[[health.check]]\nname = \"fleet\"\nkind = \"fleet\"\ntimeout = \"2s\"\ninterval = \"500ms\"\ncritical = false\n"
        ),
    )
    .unwrap();
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "idle", "enrolled");

    // The server answers: the trial commits.
    f.rollout(
        &f.upload(&release_bundle(&dir, "2.0.0", 1)),
        "100",
        "lab",
        &[],
    );
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    ok(&dir, &format!("sim reboot {}", dev.display()));
    assert_eq!(status(&dir, &dev)["state"], "committed");
    assert_eq!(status(&dir, &dev)["version"], "2.0.0");

    // The new system cannot reach it: the trial rolls back by itself.
    let ro = f.rollout(
        &f.upload(&release_bundle(&dir, "2.1.0", 2)),
        "100",
        "lab",
        &["--failure-threshold", "50%"],
    );
    assert_eq!(agent_once(&dir, &dev, 0)["exit"], "reboot");
    f.stop();
    ok(&dir, &format!("sim reboot {}", dev.display()));
    let s = status(&dir, &dev);
    assert_eq!(
        (s["state"].as_str(), s["version"].as_str()),
        (Some("rolled_back"), Some("2.0.0")),
        "{s}"
    );
    // Back: the old system reports it, with the check that failed.
    f.restart();
    agent_once(&dir, &dev, 0);
    let rollout = f.cmd(&["rollout", "status", ro["id"].as_str().unwrap()]);
    let failing = &rollout["failing"][0];
    assert_eq!(failing["state"], "rolled_back", "{rollout}");
    assert!(
        failing["reason"].as_str().unwrap().contains("fleet"),
        "{rollout}"
    );
}
