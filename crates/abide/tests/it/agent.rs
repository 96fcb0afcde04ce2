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
            "gw-board",
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

/// `abide status --config DEVICE/system.toml --json`.
fn status(dir: &Path, device: &Path) -> Value {
    let config = device.join("system.toml");
    json_args(dir, &["status", "--config", config.to_str().unwrap()], 0)
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
    let (_tmp, dir) = workspace();
    let data = data_dir(&dir, "server");
    let server = start_server(&data, free_port(), None);
    let (url, admin) = (server.url.clone(), data.join("admin.token"));
    let upload = |version: &str, seed: u64| {
        let bundle = release_bundle(&dir, version, seed);
        fleet(
            &dir,
            &url,
            &admin,
            &["release", "upload", bundle.to_str().unwrap()],
        )["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let rollout = |release: &str, stages: &str, group: &str| {
        fleet(
            &dir,
            &url,
            &admin,
            &[
                "rollout",
                "create",
                "--release",
                release,
                "--stages",
                stages,
                "--failure-threshold",
                "10%",
                "--group",
                group,
            ],
        )["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let rollout_status = |id: &str| fleet(&dir, &url, &admin, &["rollout", "status", id]);
    let good = upload("2.0.0", 1);
    // Three devices in group lab, two in group canary.
    for group in ["lab", "canary"] {
        let enroll = fleet(
            &dir,
            &url,
            &admin,
            &["enroll-token", "create", "--group", group],
        );
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
        let listed = fleet(&dir, &url, &admin, &["devices"]);
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
    let listed = fleet(&dir, &url, &admin, &["devices"]);
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
    let listed = fleet(&dir, &url, &admin, &["devices"]);
    let rolled: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "rolled_back")
        .collect();
    let ids: Vec<&str> = rolled.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gw-4", "gw-5"], "{listed}");
    for d in &rolled {
        assert!(d["reason"].as_str().unwrap().contains("health"), "{d}");
        assert_eq!(d["version"], "2.0.0", "{d}");
        let local = status(&dir, &dir.join(d["id"].as_str().unwrap()));
        assert_eq!(
            (
                local["state"].as_str(),
                local["version"].as_str(),
                local["booted"].as_str()
            ),
            (Some("rolled_back"), Some("2.0.0"), Some("B")),
            "{local}"
        );
        assert_eq!(local["quarantine"][0], "3.0.0");
    }
    let st = rollout_status(&ro);
    assert!(
        st.to_string().contains("failed"),
        "the pause says why: {st}"
    );
    // The lab group did not move.
    for d in &devices[..3] {
        assert_eq!(status(&dir, d)["version"], "2.0.0");
    }
}
