//! A simulated device end to end through the command: a good update commits; a failing health
//! check, a kernel panic and an undecided health gate each end on the old group, rolled back
//! with the reason; quarantine, downgrades and bundles for other devices are refused with
//! slots, bootloader state and counters byte-identical.

use std::path::{Path, PathBuf};

use abide_bundle::Digest;
use serde_json::Value;

use crate::{json, ok, workspace};

pub struct Sim {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Sim {
    pub fn new(health: Option<&str>) -> Sim {
        let (tmp, dir) = workspace();
        let mut args = vec![
            "sim",
            "init",
            "dev",
            "--trust",
            "trust.json",
            "--product",
            "gw",
            "--compatible",
            "gw-1",
            "--version",
            "1.0.0",
            "--slot-size",
            "4M",
        ];
        if let Some(h) = health {
            args.extend(["--health-command", h]);
        }
        crate::json_args(&dir, &args, 0);
        Sim { _tmp: tmp, dir }
    }

    pub fn bundle(&self, version: &str, security_version: u64, seed: u64) -> String {
        let img = format!("img-{version}");
        std::fs::write(self.dir.join(&img), abide_testkit::image(1_500_000, seed)).unwrap();
        let out = format!("{version}.abide");
        ok(
            &self.dir,
            &format!(
                "bundle create --product gw --version {version} --security-version {security_version} --compatible gw-1 \
                 --component rootfs={img} --sign a.key --out {out}"
            ),
        );
        out
    }

    pub fn status(&self) -> Value {
        json(&self.dir, "status --config dev/system.toml", 0)
    }

    /// Digests of everything a refusal must leave alone.
    pub fn fingerprint(&self) -> Vec<(String, Digest)> {
        [
            "dev/slots/rootfs.A.img",
            "dev/slots/rootfs.B.img",
            "dev/boot.json",
            "dev/state/state.json",
        ]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                Digest::of(&std::fs::read(self.dir.join(f)).unwrap()),
            )
        })
        .collect()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// Runs the shell `script` in the device's workspace, in a private mount namespace (its
    /// mounts are gone when it ends).
    pub fn in_mount_namespace(&self, script: &str) -> std::process::Output {
        std::process::Command::new("unshare")
            .args(["-m", "sh", "-c", script])
            .current_dir(&self.dir)
            .output()
            .expect("unshare runs (scripts/deps)")
    }
}

pub fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn a_good_update_goes_through_a_trial_and_commits() {
    let sim = Sim::new(Some(
        "test \"$ABIDE_GROUP\" = B && test -n \"$ABIDE_TRANSACTION\" && test \"$ABIDE_VERSION\" = 2.0.0",
    ));
    let s = sim.status();
    assert_eq!(
        (
            field(&s, "booted"),
            field(&s, "good"),
            field(&s, "state"),
            field(&s, "version")
        ),
        ("A", "A", "idle", "1.0.0")
    );
    assert_eq!(s["transaction"], Value::Null);
    let b = sim.bundle("2.0.0", 3, 1);
    let v = json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    assert_eq!(
        (field(&v, "state"), field(&v, "target")),
        ("activated", "B")
    );
    let s = sim.status();
    assert_eq!(
        (
            field(&s, "state"),
            field(&s, "booted"),
            field(&s, "version")
        ),
        ("activated", "A", "1.0.0")
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    let s = &v["status"];
    assert_eq!(
        (
            field(s, "booted"),
            field(s, "good"),
            field(s, "state"),
            field(s, "version")
        ),
        ("B", "B", "committed", "2.0.0")
    );
    assert_eq!(s["security_version"], 3, "the counter rises at commit");
    // The slot holds the image, as sha256sum would see it.
    let img = std::fs::read(sim.path("img-2.0.0")).unwrap();
    let slot = std::fs::read(sim.path("dev/slots/rootfs.B.img")).unwrap();
    assert_eq!(&slot[..img.len()], &img[..]);
    // Later power cycles keep running it.
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(field(&v["status"], "booted"), "B");
    let log = json(&sim.dir, "log --config dev/system.toml", 0);
    let events: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["begin", "stage", "activate", "trial", "commit"]);
    assert_eq!(
        json(&sim.dir, "log verify --config dev/system.toml", 0)["records"],
        5
    );
    assert_eq!(
        json(&sim.dir, "log verify --config dev/system.toml", 0)["signed"],
        true
    );
    // The signed head is a checkpoint the log is verified against; a changed one is refused.
    let head = json(&sim.dir, "log head --config dev/system.toml", 0);
    assert_eq!(head["seq"], 5);
    std::fs::write(sim.path("head.json"), head.to_string()).unwrap();
    assert_eq!(
        json(
            &sim.dir,
            "log verify --against head.json --config dev/system.toml",
            0
        )["ok"],
        true
    );
    let mut changed = head.clone();
    changed["hash"] = serde_json::json!("0".repeat(64));
    std::fs::write(sim.path("head.json"), changed.to_string()).unwrap();
    let refused = json(
        &sim.dir,
        "log verify --against head.json --config dev/system.toml",
        3,
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("checkpoint's signature"),
        "{refused}"
    );
}

#[test]
fn a_failing_health_check_rolls_back_and_the_version_is_quarantined() {
    let sim = Sim::new(Some("test \"$ABIDE_VERSION\" != 2.0.0"));
    let b = sim.bundle("2.0.0", 0, 2);
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    let s = &v["status"];
    assert_eq!(
        (
            field(s, "booted"),
            field(s, "good"),
            field(s, "state"),
            field(s, "version")
        ),
        ("A", "A", "rolled_back", "1.0.0")
    );
    assert!(
        field(s, "reason").contains("health check command failed"),
        "{s}"
    );
    assert_eq!(
        v["cycles"].as_array().unwrap().len(),
        2,
        "the failed trial rebooted into A by itself"
    );
    // The rolled-back version is refused from now on, and the refusal changes nothing.
    let before = sim.fingerprint();
    let v = json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        1,
    );
    assert_eq!(v["error"]["code"], "quarantined");
    assert_eq!(sim.fingerprint(), before);
    // An operator can force it.
    json(
        &sim.dir,
        &format!("install {b} --force --config dev/system.toml"),
        0,
    );
}

#[test]
fn a_new_system_that_panics_is_rolled_back_by_the_boot_counter() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 0, 3);
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    let v = json(&sim.dir, "sim reboot dev --panic 5", 0);
    let cycles = v["cycles"].as_array().unwrap();
    assert_eq!(cycles[0]["panic"], true);
    assert_eq!(cycles[0]["booted"], "B");
    assert_eq!(
        cycles.len(),
        2,
        "one try, then the bootloader fell back: {cycles:?}"
    );
    let s = &v["status"];
    assert_eq!(
        (field(s, "booted"), field(s, "state"), field(s, "version")),
        ("A", "rolled_back", "1.0.0")
    );
    assert!(field(s, "reason").contains("bootloader fell back"), "{s}");
}

#[test]
fn a_trial_whose_health_gate_never_decides_rolls_back_at_the_deadline() {
    let sim = Sim::new(None);
    // A non-critical check that keeps failing, a grace period longer than the deadline: the
    // gate stays undecided until the deadline.
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap()
        + "\n[health]\ndeadline = \"2s\"\ngrace = \"1h\"\n\n[[health.check]]\nname = \"metrics\"\nkind = \"file\"\n\
           path = \"never-there\"\ncritical = false\ninterval = \"500ms\"\n";
    std::fs::write(sim.path("dev/system.toml"), config).unwrap();
    let b = sim.bundle("2.0.0", 0, 4);
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    let s = &v["status"];
    assert_eq!(
        (field(s, "booted"), field(s, "state")),
        ("A", "rolled_back")
    );
    assert!(field(s, "reason").contains("deadline"), "{s}");
}

#[test]
fn downgrades_and_bundles_for_other_devices_change_nothing() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 4, 5);
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    json(&sim.dir, "sim reboot dev", 0);
    let before = sim.fingerprint();
    let older = sim.bundle("1.5.0", 4, 6);
    assert_eq!(
        json(
            &sim.dir,
            &format!("install {older} --config dev/system.toml"),
            1
        )["error"]["code"],
        "older-version"
    );
    let insecure = sim.bundle("3.0.0", 3, 7);
    assert_eq!(
        json(
            &sim.dir,
            &format!("install {insecure} --config dev/system.toml"),
            1
        )["error"]["code"],
        "downgrade"
    );
    assert_eq!(
        json(
            &sim.dir,
            &format!("install {insecure} --force --config dev/system.toml"),
            1
        )["error"]["code"],
        "downgrade",
        "force never overrides the security counter"
    );
    std::fs::write(sim.path("other.img"), b"x").unwrap();
    ok(
        &sim.dir,
        "bundle create --product other --version 9.0.0 --security-version 4 --compatible gw-1 --component rootfs=other.img --sign a.key --out p.abide",
    );
    assert_eq!(
        json(&sim.dir, "install p.abide --config dev/system.toml", 1)["error"]["code"],
        "wrong-product"
    );
    ok(
        &sim.dir,
        "bundle create --product gw --version 9.0.0 --security-version 4 --compatible gw-2 --component rootfs=other.img --sign a.key --out h.abide",
    );
    assert_eq!(
        json(&sim.dir, "install h.abide --config dev/system.toml", 1)["error"]["code"],
        "incompatible"
    );
    ok(
        &sim.dir,
        "bundle create --product gw --version 9.0.0 --security-version 4 --compatible gw-1 --component rootfs=other.img --sign c.key --out u.abide",
    );
    assert_eq!(
        json(&sim.dir, "install u.abide --config dev/system.toml", 1)["error"]["code"],
        "untrusted-key"
    );
    let big = sim.path("big.img");
    std::fs::write(&big, vec![7u8; 5 << 20]).unwrap();
    ok(
        &sim.dir,
        "bundle create --product gw --version 9.0.0 --security-version 4 --compatible gw-1 --component rootfs=big.img --sign a.key --out big.abide",
    );
    let v = json(&sim.dir, "install big.abide --config dev/system.toml", 1);
    assert_eq!(v["error"]["code"], "slot-too-small");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("5242880 bytes but slot"),
        "{v}"
    );
    assert_eq!(sim.fingerprint(), before);
    let log = json(&sim.dir, "log --config dev/system.toml", 0);
    let refusals = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["event"] == "refuse")
        .count();
    assert_eq!(refusals, 7, "every refusal is in the audit log");
}

#[test]
fn a_corrupt_bundle_fails_the_transaction_before_activation_and_the_old_group_runs_on() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 0, 8);
    let mut bytes = std::fs::read(sim.path(&b)).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    std::fs::write(sim.path("bad.abide"), &bytes).unwrap();
    let v = json(&sim.dir, "install bad.abide --config dev/system.toml", 1);
    assert_eq!(v["error"]["code"], "chunk-digest");
    let s = sim.status();
    assert_eq!((field(&s, "state"), field(&s, "good")), ("failed", "A"));
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (
            field(&v["status"], "booted"),
            field(&v["status"], "version")
        ),
        ("A", "1.0.0")
    );
    // The same bundle, intact, installs afterwards.
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    assert_eq!(
        field(&json(&sim.dir, "sim reboot dev", 0)["status"], "state"),
        "committed"
    );
}

#[test]
fn operators_can_commit_or_roll_back_a_trial_by_hand() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 0, 9);
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
    assert_eq!(
        json(&sim.dir, "mark-good --config dev/system.toml", 1)["error"]["code"],
        "invalid-transition"
    );
    let v = json(
        &sim.dir,
        "rollback --reason maintenance --config dev/system.toml",
        0,
    );
    assert_eq!(v["state"], "rolled_back");
    let s = sim.status();
    assert!(field(&s, "reason").contains("maintenance"));
    assert_eq!(json(&sim.dir, "sim reboot dev", 0)["status"]["booted"], "A");
    let _ = Path::new("");
}

#[test]
fn the_shipped_systemd_unit_runs_the_boot_step_with_the_default_config() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../dist/systemd/abide-boot.service"
    ))
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/bin/abide");
    assert_eq!(
        &args[1..],
        ["boot", "--config", abide_agent::config::DEFAULT_PATH]
    );
    assert!(unit.contains("Type=oneshot"));
    // The arguments parse: the command accepts them (here against a sim device's config).
    let sim = Sim::new(None);
    json(&sim.dir, "boot --config dev/system.toml", 0);
}

#[test]
fn a_delta_update_reads_only_the_changed_chunks_and_survives_a_damaged_running_slot() {
    let sim = Sim::new(None);
    let v2 = abide_testkit::image(3_000_000, 40);
    let mut v3 = v2.clone();
    let (mid, changed) = (v3.len() / 2, v3.len() / 20);
    for b in &mut v3[mid..mid + changed] {
        *b = b.wrapping_add(1);
    }
    std::fs::write(sim.path("v2.img"), &v2).unwrap();
    std::fs::write(sim.path("v3.img"), &v3).unwrap();
    for v in ["2.0.0", "3.0.0", "3.1.0"] {
        let img = if v == "2.0.0" { "v2.img" } else { "v3.img" };
        ok(
            &sim.dir,
            &format!(
                "bundle create --product gw --version {v} --compatible gw-1 --component rootfs={img} --sign a.key --out {v}.abide"
            ),
        );
    }
    let first = json(&sim.dir, "install 2.0.0.abide --config dev/system.toml", 0);
    assert_eq!(
        first["reused_bytes"], 0,
        "group A holds nothing indexed yet"
    );
    json(&sim.dir, "sim reboot dev", 0);
    let size = std::fs::metadata(sim.path("3.0.0.abide")).unwrap().len();
    let delta = json(&sim.dir, "install 3.0.0.abide --config dev/system.toml", 0);
    let read = delta["bundle_bytes_read"].as_u64().unwrap();
    assert!(
        read * 100 < size * 20,
        "a 5% change read {read} of {size} bundle bytes"
    );
    assert!(
        delta["reused_bytes"].as_u64().unwrap() > (v3.len() as u64) * 8 / 10,
        "{delta}"
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (field(&v["status"], "state"), field(&v["status"], "booted")),
        ("committed", "A")
    );
    let slot = std::fs::read(sim.path("dev/slots/rootfs.A.img")).unwrap();
    assert_eq!(&slot[..v3.len()], &v3[..]);

    // The running slot (A) damaged outside Abide: the damaged chunks no longer match their
    // names, so they come from the bundle instead, and the result is still exact.
    let mut running = std::fs::read(sim.path("dev/slots/rootfs.A.img")).unwrap();
    for b in &mut running[100_000..400_000] {
        *b ^= 0x5a;
    }
    std::fs::write(sim.path("dev/slots/rootfs.A.img"), &running).unwrap();
    let again = json(&sim.dir, "install 3.1.0.abide --config dev/system.toml", 0);
    assert!(
        again["bundle_bytes_read"].as_u64().unwrap() > read,
        "{again}"
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (field(&v["status"], "state"), field(&v["status"], "booted")),
        ("committed", "B")
    );
    let slot = std::fs::read(sim.path("dev/slots/rootfs.B.img")).unwrap();
    assert_eq!(&slot[..v3.len()], &v3[..]);
}

#[test]
fn an_install_that_would_fill_the_state_directory_is_refused_with_the_numbers() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 0, 50);
    // Keep 4 PiB free: no file system here has that much.
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap();
    std::fs::write(
        sim.path("dev/system.toml"),
        format!("state_reserve = \"4096T\"\n{config}"),
    )
    .unwrap();
    let before = sim.fingerprint();
    let v = json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        1,
    );
    assert_eq!(v["error"]["code"], "no-space");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("bytes free") && message.contains("4503599627370496 must stay free"),
        "{message}"
    );
    assert_eq!(sim.fingerprint(), before);
    // The default reserve is 16M: a state directory on a 12 MiB file system (a tmpfs in a
    // private mount namespace, holding a copy of the state) refuses the same bundle.
    std::fs::write(sim.path("dev/system.toml"), &config).unwrap();
    let abide = env!("CARGO_BIN_EXE_abide");
    let script = format!(
        "set -e; cp -a dev/state saved; mount -t tmpfs -o size=12m tmpfs dev/state; \
         cp -a saved/. dev/state/; {abide} install {b} --config dev/system.toml --json"
    );
    // The install in a private namespace, refused for want of room: its JSON error.
    let refused = |script: &str| -> Value {
        let out = sim.in_mount_namespace(script);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["error"]["code"], "no-space", "{v}");
        v
    };
    let v = refused(&script);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(" 16777216 must stay free"),
        "{v}"
    );
    std::fs::remove_dir_all(sim.path("saved")).unwrap();
    assert_eq!(sim.fingerprint(), before);
    // Files count as well as bytes: a state directory on a file system with room for only 30
    // more refuses the same bundle, before anything changes.
    let script = format!(
        "set -e; n=$(find dev/state | wc -l); cp -a dev/state saved; \
         mount -t tmpfs -o size=64m,nr_inodes=$((n + 30)) tmpfs dev/state; \
         cp -a saved/. dev/state/; {abide} install {b} --config dev/system.toml --json"
    );
    let v = refused(&script);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("free inodes")
            && v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("64 must stay free"),
        "{v}"
    );
    std::fs::remove_dir_all(sim.path("saved")).unwrap();
    assert_eq!(sim.fingerprint(), before);
    // With room for the default reserve the same bundle installs.
    json(
        &sim.dir,
        &format!("install {b} --config dev/system.toml"),
        0,
    );
}

#[test]
fn a_directory_slot_is_unpacked_and_its_link_follows_the_booted_group() {
    let sim = Sim::new(Some("test \"$ABIDE_VERSION\" != 3.0.0"));
    // Two slot classes per group: the rootfs image and an application directory whose link
    // points at the booted group's copy.
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap();
    let with_app = config
        .replace(
            "path = \"slots/rootfs.A.img\"\n",
            "path = \"slots/rootfs.A.img\"\n[[group.slot]]\nclass = \"app\"\nkind = \"dir\"\npath = \"apps/A\"\nlink = \"current-app\"\n",
        )
        .replace(
            "path = \"slots/rootfs.B.img\"\n",
            "path = \"slots/rootfs.B.img\"\n[[group.slot]]\nclass = \"app\"\nkind = \"dir\"\npath = \"apps/B\"\nlink = \"current-app\"\n",
        );
    assert_ne!(with_app, config);
    std::fs::write(sim.path("dev/system.toml"), with_app).unwrap();
    std::fs::write(sim.path("img"), abide_testkit::image(300_000, 60)).unwrap();
    let python = |script: &str| {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .current_dir(&sim.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Archives made with Python's tarfile: one per version, and a hostile one.
    python(
        "import tarfile, io\n\
         for v in ['2.0.0', '3.0.0']:\n\
         \x20   with tarfile.open(f'app-{v}.tar', 'w') as t:\n\
         \x20       for name, data in [('bin/app', f'app {v}'.encode()), ('etc/app.conf', b'port=8080')]:\n\
         \x20           i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))\n\
         def evil(name, *makes):\n\
         \x20   with tarfile.open(name, 'w') as t:\n\
         \x20       good = tarfile.TarInfo('bin/app'); good.size = 2; t.addfile(good, io.BytesIO(b'ok'))\n\
         \x20       for make in makes:\n\
         \x20           i = make(); t.addfile(i, io.BytesIO(b'evil') if i.isreg() else None)\n\
         def reg(n):\n\
         \x20   i = tarfile.TarInfo(n); i.size = 4; return i\n\
         def link(n, target, kind):\n\
         \x20   i = tarfile.TarInfo(n); i.type = kind; i.linkname = target; return i\n\
         def special(n, kind):\n\
         \x20   i = tarfile.TarInfo(n); i.type = kind; i.devmajor = 1; i.devminor = 3; return i\n\
         evil('dotdot.tar', lambda: reg('../../escaped'))\n\
         evil('absolute.tar', lambda: reg('/tmp/abide-escaped'))\n\
         evil('symlink.tar', lambda: link('etc/out', '../../../escaped', tarfile.SYMTYPE))\n\
         evil('abs-symlink.tar', lambda: link('etc/passwd', '/etc/passwd', tarfile.SYMTYPE))\n\
         evil('hardlink.tar', lambda: link('etc/hard', '../escaped', tarfile.LNKTYPE))\n\
         evil('chardev.tar', lambda: special('dev/null', tarfile.CHRTYPE))\n\
         evil('fifo.tar', lambda: special('run/fifo', tarfile.FIFOTYPE))\n\
         evil('chain.tar', lambda: link('x/up', '..', tarfile.SYMTYPE),\n\
         \x20    lambda: link('x/up/x/up/x/up/esc', '../../../../../..', tarfile.SYMTYPE),\n\
         \x20    lambda: reg('x/up/x/up/x/up/esc/escaped'))\n\
         evil('climb.tar', lambda: link('esc', 'd/../../escaped', tarfile.SYMTYPE), lambda: link('d', '.', tarfile.SYMTYPE))\n\
         evil('through.tar', lambda: link('etc/lnk', '../bin', tarfile.SYMTYPE), lambda: reg('etc/lnk/app'))\n\
         evil('hard-through.tar', lambda: link('up', '.', tarfile.SYMTYPE), lambda: link('etc/h', 'up/bin/app', tarfile.LNKTYPE))\n\
         with tarfile.open('big.tar', 'w') as t:\n\
         \x20   i = tarfile.TarInfo('data/big'); i.size = 5000; t.addfile(i, io.BytesIO(bytes(5000)))\n",
    );
    for v in ["2.0.0", "3.0.0"] {
        ok(
            &sim.dir,
            &format!(
                "bundle create --product gw --version {v} --compatible gw-1 --component rootfs=img \
                 --component app=app-{v}.tar --sign a.key --out {v}.abide"
            ),
        );
    }
    json(&sim.dir, "install 2.0.0.abide --config dev/system.toml", 0);
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (field(&v["status"], "state"), field(&v["status"], "booted")),
        ("committed", "B")
    );
    let link = sim.path("dev/current-app");
    assert_eq!(std::fs::read_link(&link).unwrap(), sim.path("dev/apps/B"));
    assert_eq!(
        std::fs::read_to_string(link.join("bin/app")).unwrap(),
        "app 2.0.0"
    );
    // 3.0.0 fails its health check: during the trial the link pointed at A's copy; after the
    // rollback it points at B's again.
    json(&sim.dir, "install 3.0.0.abide --config dev/system.toml", 0);
    assert_eq!(
        std::fs::read_to_string(sim.path("dev/apps/A/bin/app")).unwrap(),
        "app 3.0.0"
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (field(&v["status"], "state"), field(&v["status"], "booted")),
        ("rolled_back", "B")
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), sim.path("dev/apps/B"));
    assert_eq!(
        std::fs::read_to_string(link.join("bin/app")).unwrap(),
        "app 2.0.0"
    );
    // An archive with an entry that is not allowed refuses the whole component: exit 1,
    // `bad-archive`, nothing activated, the running group's link and files untouched.
    let status = || json(&sim.dir, "status --config dev/system.toml", 0);
    for (n, (archive, says)) in [
        ("dotdot", "leaves the slot"),
        ("absolute", "leaves the slot"),
        ("symlink", "a link to ../../../escaped leaves the slot"),
        ("abs-symlink", "a link to /etc/passwd leaves the slot"),
        ("hardlink", "a link to ../escaped leaves the slot"),
        ("chardev", "a character device may not be unpacked"),
        ("fifo", "a FIFO may not be unpacked"),
        (
            "chain",
            "x/up/x/up/x/up/esc: its path goes through the symbolic link x/up",
        ),
        (
            "climb",
            "esc: a link to d/../../escaped climbs back up after it descends",
        ),
        (
            "through",
            "etc/lnk/app: its path goes through the symbolic link etc/lnk",
        ),
        (
            "hard-through",
            "a link to up/bin/app goes through the symbolic link up",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let version = format!("4.{n}.0");
        ok(
            &sim.dir,
            &format!(
                "bundle create --product gw --version {version} --compatible gw-1 --component rootfs=img \
                 --component app={archive}.tar --sign a.key --out {version}.abide"
            ),
        );
        let before = status();
        let v = json(
            &sim.dir,
            &format!("install {version}.abide --config dev/system.toml"),
            1,
        );
        assert_eq!(v["error"]["code"], "bad-archive", "{archive}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{archive}: {message}");
        let after = status();
        assert_eq!(
            (
                field(&after, "booted"),
                field(&after, "good"),
                field(&after, "version")
            ),
            (
                field(&before, "booted"),
                field(&before, "good"),
                field(&before, "version")
            ),
            "{archive}"
        );
        assert_eq!(
            field(&after, "state"),
            "failed",
            "{archive}: nothing activated"
        );
        assert_eq!(std::fs::read_link(&link).unwrap(), sim.path("dev/apps/B"));
        assert_eq!(
            std::fs::read_to_string(link.join("bin/app")).unwrap(),
            "app 2.0.0"
        );
        assert!(
            !sim.path("escaped").exists()
                && !sim.path("dev/escaped").exists()
                && !sim.path("dev/apps/escaped").exists()
                && !std::path::Path::new("/tmp/abide-escaped").exists(),
            "{archive}"
        );
    }
    // A directory slot's capacity from config is checked while unpacking.
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap();
    std::fs::write(
        sim.path("dev/system.toml"),
        config.replace(
            "link = \"current-app\"\n",
            "link = \"current-app\"\ncapacity = \"4K\"\n",
        ),
    )
    .unwrap();
    ok(
        &sim.dir,
        "bundle create --product gw --version 5.0.0 --compatible gw-1 --component rootfs=img \
         --component app=big.tar --sign a.key --out 5.0.0.abide",
    );
    let v = json(&sim.dir, "install 5.0.0.abide --config dev/system.toml", 1);
    assert_eq!(v["error"]["code"], "bad-archive", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than the slot's capacity of 4096"),
        "{v}"
    );
    assert_eq!(std::fs::read_link(&link).unwrap(), sim.path("dev/apps/B"));
}

#[test]
fn read_only_commands_work_on_a_read_only_state_directory_and_write_nothing() {
    let sim = Sim::new(None);
    let state = sim.dir.join("dev/state");
    let abide = env!("CARGO_BIN_EXE_abide");
    // A private mount namespace with the state directory bound read-only over itself.
    let script = format!(
        "set -e; mount --bind {s} {s}; mount -o remount,bind,ro {s}; \
         ! touch {s}/probe 2>/dev/null; \
         {abide} status --config dev/system.toml --json; \
         {abide} health --config dev/system.toml --json; \
         {abide} log verify --config dev/system.toml --json",
        s = state.display()
    );
    let out = sim.in_mount_namespace(&script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("\"version\": \"1.0.0\""), "{text}");
    assert!(
        !state.join("lock").exists(),
        "a read-only command took the lock"
    );
}

#[test]
fn a_state_file_of_a_newer_format_is_refused_by_name() {
    let sim = Sim::new(None);
    let path = sim.dir.join("dev/state/state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(state["format"], 1);
    state["format"] = 2.into();
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    let err = json(&sim.dir, "status --config dev/system.toml", 3);
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("format 2") && message.contains("newer abide"),
        "{message}"
    );
    let bundle = sim.bundle("2.0.0", 1, 3);
    let err = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        3,
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("format 2")
    );
    // A file from before the format field reads as format 1.
    state.as_object_mut().unwrap().remove("format");
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    assert_eq!(sim.status()["version"], "1.0.0");
}

#[test]
fn an_install_the_running_system_contradicts_is_refused_before_anything_is_written() {
    let sim = Sim::new(None);
    let dev = sim.dir.join("dev");
    let bundle = sim.bundle("2.0.0", 1, 4);
    // A GRUB device whose environment block is stale: it says B is known-good and booted,
    // while the kernel that runs was booted from A (a block renamed into place that GRUB
    // never saw, after a power cut).
    let grubenv = dev.join("grubenv");
    let editenv = |args: &[&str]| {
        let ok = std::process::Command::new("grub-editenv")
            .arg(&grubenv)
            .args(args)
            .status()
            .expect("grub-editenv runs (scripts/deps)")
            .success();
        assert!(ok);
    };
    editenv(&["create"]);
    editenv(&[
        "set",
        "ABIDE_ORDER=B A",
        "ABIDE_A_OK=1",
        "ABIDE_B_OK=1",
        "ABIDE_A_TRY=0",
        "ABIDE_B_TRY=0",
        "ABIDE_BOOTED=B",
    ]);
    std::fs::write(
        dev.join("cmdline"),
        "root=/dev/vda2 ro abide.group=A quiet\n",
    )
    .unwrap();
    let config = std::fs::read_to_string(dev.join("system.toml"))
        .unwrap()
        .replace(
            "backend = \"sim\"\npath = \"boot.json\"",
            "backend = \"grub\"\npath = \"grubenv\"\ncmdline = \"cmdline\"",
        );
    std::fs::write(dev.join("system.toml"), config).unwrap();
    let digests = || {
        [
            "grubenv",
            "slots/rootfs.A.img",
            "slots/rootfs.B.img",
            "state/state.json",
        ]
        .map(|f| Digest::of(&std::fs::read(dev.join(f)).unwrap()).to_hex())
    };
    let before = digests();
    let refused = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml --no-reboot"),
        1,
    );
    assert_eq!(refused["error"]["code"], "running-group", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("group B booted") && message.contains("group A"),
        "{message}"
    );
    assert_eq!(digests(), before, "a refused install changed something");
    // `abide status` and the boot step tell what runs, from the running kernel, and the boot
    // step records the disagreement.
    assert_eq!(sim.status()["booted"], "A");
    let booted = json(&sim.dir, "boot --config dev/system.toml", 0);
    assert_eq!(booted["booted"], "A", "{booted}");
    let log = std::fs::read_to_string(dev.join("state/audit.log")).unwrap();
    assert!(log.contains("bootloader-disagrees"), "{log}");
    // When the running system agrees with the bootloader, the install goes into A.
    std::fs::write(
        dev.join("cmdline"),
        "root=/dev/vda3 ro abide.group=B quiet\n",
    )
    .unwrap();
    let done = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml --no-reboot"),
        0,
    );
    assert_eq!(done["target"], "A", "{done}");
}

#[test]
fn device_init_sets_up_a_real_device_once() {
    let (_tmp, dir) = crate::workspace();
    let dev = dir.join("gw");
    std::fs::create_dir_all(dev.join("boot")).unwrap();
    std::fs::create_dir_all(dev.join("slots")).unwrap();
    std::fs::copy(dir.join("trust.json"), dev.join("trust.json")).unwrap();
    std::fs::write(dev.join("cmdline"), "root=/dev/vda2 ro abide.group=A\n").unwrap();
    std::fs::write(
        dev.join("system.toml"),
        "product = \"gw\"\ncompatible = \"gw-1\"\nstate_dir = \"state\"\ntrust = \"trust.json\"\n\n\
         [bootloader]\nbackend = \"grub\"\npath = \"boot/grubenv\"\ncmdline = \"cmdline\"\n\n\
         [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"slots/a.img\"\n\n\
         [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"slots/b.img\"\n",
    )
    .unwrap();
    let init = |extra: &str, exit: i32| {
        json(
            &dir,
            &format!("device init --config gw/system.toml --version 1.0.0 {extra}"),
            exit,
        )
    };
    // A slot that is not there: refused, naming it, and nothing written.
    std::fs::write(dev.join("slots/a.img"), vec![0u8; 4 << 20]).unwrap();
    let missing = init("", 1);
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("slots/b.img"),
        "{missing}"
    );
    assert!(!dev.join("state").exists() && !dev.join("boot/grubenv").exists());
    std::fs::write(dev.join("slots/b.img"), vec![0u8; 4 << 20]).unwrap();
    let done = init("", 0);
    assert_eq!(
        (done["group"].as_str(), done["other"].as_str()),
        (Some("A"), Some("B"))
    );
    // The first variables, as GRUB's own tool reads them: A known-good and booted, B not
    // bootable.
    let listed = std::process::Command::new("grub-editenv")
        .arg(dev.join("boot/grubenv"))
        .arg("list")
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    for var in [
        "ABIDE_ORDER=A B",
        "ABIDE_A_OK=1",
        "ABIDE_B_OK=0",
        "ABIDE_BOOTED=A",
    ] {
        assert!(listed.contains(var), "{var} in {listed}");
    }
    let status = json(&dir, "status --config gw/system.toml", 0);
    assert_eq!(
        (
            status["booted"].as_str(),
            status["good"].as_str(),
            status["version"].as_str()
        ),
        (Some("A"), Some("A"), Some("1.0.0"))
    );
    // Not twice, unless forced.
    let again = init("", 1);
    assert_eq!(again["error"]["code"], "initialized", "{again}");
    init("--force", 0);
    // And the device installs into B.
    let img = dir.join("img");
    std::fs::write(&img, abide_testkit::image(1_000_000, 3)).unwrap();
    ok(
        &dir,
        &format!(
            "bundle create --product gw --version 2.0.0 --compatible gw-1 --component rootfs={} \
             --sign a.key --out v2.abide",
            img.display()
        ),
    );
    let installed = json(
        &dir,
        "install v2.abide --config gw/system.toml --no-reboot",
        0,
    );
    assert_eq!(installed["target"], "B", "{installed}");
}

/// A file shipped in `dist/` (or elsewhere in the repository).
fn shipped(path: &str) -> (std::path::PathBuf, String) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{path}: {e}"));
    (p, text)
}

#[test]
fn the_shipped_device_files_are_what_they_say() {
    // The agent's unit runs the agent with the default configuration, after the boot step.
    let (_, unit) = shipped("dist/systemd/abide-agent.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert_eq!(
        exec.split_whitespace().collect::<Vec<_>>(),
        [
            "/usr/bin/abide",
            "agent",
            "--config",
            abide_agent::config::DEFAULT_PATH
        ]
    );
    assert!(unit.contains("After=abide-boot.service"));
    assert!(unit.lines().any(|l| l == "LimitNOFILE=16384"), "{unit}");
    // The example system.toml is a valid configuration for block slots under GRUB.
    let (path, text) = shipped("dist/config/system.toml");
    let config = abide_agent::config::Config::parse(&path, &text).unwrap();
    assert_eq!(config.backend, abide_agent::config::Backend::Grub);
    assert!(config.groups.iter().all(|g| {
        g.slots
            .iter()
            .all(|s| s.kind == abide_agent::config::SlotKind::Block)
    }));
    assert!(config.server.is_some() && config.windows.len() == 1);
    // A trial commits only once the fleet server answers a check-in from it.
    assert!(
        config
            .checks
            .iter()
            .any(|c| matches!(c.kind, abide_agent::config::CheckKind::Fleet(_)) && !c.critical)
    );
    // grub.cfg and abide.cfg are GRUB script that grub-script-check accepts; grub.cfg sources
    // abide.cfg and defines the two entries abide.cfg chooses between, each telling the
    // kernel its group.
    let (grub_cfg, grub) = shipped("dist/grub/grub.cfg");
    let (abide_cfg, abide) = shipped("crates/abide-boot/grub/abide.cfg");
    for file in [&grub_cfg, &abide_cfg] {
        let checked = std::process::Command::new("grub-script-check")
            .arg(file)
            .status()
            .expect("grub-script-check runs (scripts/deps installs grub-common)");
        assert!(checked.success(), "{}", file.display());
    }
    assert!(grub.contains("source ${prefix}/abide.cfg"));
    for g in ["A", "B"] {
        assert!(abide.contains(&format!("set default=\"abide-{g}\"")));
        let entry = grub
            .split("menuentry")
            .find(|e| e.contains(&format!("--id abide-{g} ")))
            .unwrap_or_else(|| panic!("no menu entry abide-{g}"));
        let linux = entry
            .lines()
            .find(|l| l.trim().starts_with("linux "))
            .unwrap();
        assert!(linux.contains(&format!("abide.group={g}")), "{linux}");
    }
    // The U-Boot script runs the selection and passes the chosen group to the kernel.
    let (_, boot_cmd) = shipped("dist/uboot/boot.cmd");
    assert!(boot_cmd.lines().any(|l| l.trim() == "run abide_select"));
    assert!(boot_cmd.contains("abide.group=${abide_group}"));
}

#[test]
fn the_config_is_found_before_or_after_the_command_and_from_abide_config() {
    let sim = Sim::new(None);
    let after = json(&sim.dir, "status --config dev/system.toml", 0);
    let before = json(&sim.dir, "--config dev/system.toml status", 0);
    assert_eq!(before, after);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["status", "--json"])
        .env("ABIDE_CONFIG", "dev/system.toml")
        .current_dir(&sim.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_env: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_env, after);
    // The flag wins over the variable.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["--config", "dev/system.toml", "status", "--json"])
        .env("ABIDE_CONFIG", "nowhere.toml")
        .current_dir(&sim.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_draws_a_progress_bar_on_a_terminal_and_nothing_in_a_pipe() {
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 4);
    // On a terminal (`script` gives the command one): the bar, full at the end.
    let cmd = format!(
        "{} install {b} --config dev/system.toml --no-reboot",
        env!("CARGO_BIN_EXE_abide")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(&sim.dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script runs");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(
        tty.contains(&format!("[{}]", "=".repeat(30))) && tty.contains("ETA"),
        "no full progress bar on the terminal: {tty:?}"
    );
    assert!(tty.contains("installed into group B"), "{tty:?}");
    // In a pipe (and with --json): no bar, nothing but the answer.
    let sim = Sim::new(None);
    let b = sim.bundle("2.0.0", 1, 4);
    let out = crate::abide(
        &sim.dir,
        &format!("install {b} --config dev/system.toml --no-reboot"),
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("ETA") && !err.contains("[="), "{err:?}");
}

#[test]
fn a_writers_bug_is_installed_as_signed_by_one_pass_and_refused_by_paranoid() {
    // A bundle signed by a trusted key whose chunks, in the signed table's order, are not
    // the content its component digest names (two chunks swapped, table and data alike).
    let sim = Sim::new(None);
    std::fs::write(
        sim.path("dev/trust.json"),
        abide_testkit::trust(&[0], 1).to_file_bytes().unwrap(),
    )
    .unwrap();
    let fixture = abide_testkit::Fixture {
        product: "gw",
        version: "2.0.0",
        compatible: vec!["gw-1"],
        components: vec![(
            "rootfs",
            "rootfs",
            "rootfs",
            abide_testkit::image(1_500_000, 9),
        )],
        ..Default::default()
    };
    let mut parts = abide_testkit::parts::Parts::split(&fixture.build(&[&abide_testkit::key(0)]));
    let c = &mut parts.components[0];
    c.table.swap(0, 1);
    c.chunks.swap(0, 1);
    parts.fix_layout();
    std::fs::write(
        sim.path("bug.abide"),
        parts.assemble(&[&abide_testkit::key(0)]),
    )
    .unwrap();
    // --paranoid hashes the content: the transaction fails before activation, the old group
    // runs on.
    let v = json(
        &sim.dir,
        "install bug.abide --config dev/system.toml --no-reboot --paranoid",
        1,
    );
    assert_eq!(v["error"]["code"], "component-digest", "{v}");
    let s = sim.status();
    assert_eq!(
        (field(&s, "state"), field(&s, "good"), field(&s, "version")),
        ("failed", "A", "1.0.0")
    );
    // So does `paranoid = true` in system.toml.
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap();
    std::fs::write(
        sim.path("dev/paranoid.toml"),
        format!("paranoid = true\n{config}"),
    )
    .unwrap();
    let v = json(
        &sim.dir,
        "install bug.abide --config dev/paranoid.toml --no-reboot",
        1,
    );
    assert_eq!(v["error"]["code"], "component-digest", "{v}");
    // One pass checks only the signed stored bytes: it installs what the signers signed.
    let v = json(
        &sim.dir,
        "install bug.abide --config dev/system.toml --no-reboot",
        0,
    );
    assert_eq!(field(&v, "state"), "activated");
}

#[test]
fn a_step_of_a_transaction_with_none_is_refused_with_no_transaction_and_changes_nothing() {
    let sim = Sim::new(None);
    let before = sim.fingerprint();
    for cmd in ["mark-good", "mark-bad"] {
        let v = json(&sim.dir, &format!("{cmd} --config dev/system.toml"), 1);
        assert_eq!(v["error"]["code"], "no-transaction", "{cmd}: {v}");
        assert_eq!(sim.fingerprint(), before, "{cmd}");
    }
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

#[test]
fn an_install_into_a_mounted_target_is_refused_with_target_in_use_and_writes_nothing() {
    let sim = Sim::new(None);
    let bundle = sim.bundle("2.0.0", 1, 4);
    // The slots as block devices: loop devices over the simulated device's image files, B
    // with a file system on it.
    let a = Loop::attach(&sim.path("dev/slots/rootfs.A.img"));
    let b = Loop::attach(&sim.path("dev/slots/rootfs.B.img"));
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", &b.0])
        .status()
        .expect("mkfs.ext4 runs");
    assert!(made.success());
    let config = std::fs::read_to_string(sim.path("dev/system.toml"))
        .unwrap()
        .replace(
            "path = \"slots/rootfs.A.img\"",
            &format!("kind = \"block\"\npath = \"{}\"", a.0),
        )
        .replace(
            "path = \"slots/rootfs.B.img\"",
            &format!("kind = \"block\"\npath = \"{}\"", b.0),
        );
    std::fs::write(sim.path("dev/system.toml"), config).unwrap();
    std::fs::create_dir(sim.path("mnt")).unwrap();
    let before = sim.fingerprint();
    // In a private mount namespace, B (the target) is mounted while the install runs.
    let abide = env!("CARGO_BIN_EXE_abide");
    let script = format!(
        "set -e; mount -o ro {b} mnt; {abide} install {bundle} --config dev/system.toml --no-reboot --json",
        b = b.0
    );
    let out = sim.in_mount_namespace(&script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "target-in-use", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&b.0) && message.contains("mnt"),
        "{message}"
    );
    assert!(
        stderr.contains("abide: error [target-in-use]: "),
        "{stderr}"
    );
    assert_eq!(
        sim.fingerprint(),
        before,
        "a refused install changed something"
    );
    // Not mounted, the same install goes into B.
    let done = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml --no-reboot"),
        0,
    );
    assert_eq!(done["target"], "B", "{done}");
}

#[test]
fn an_install_refuses_a_damaged_audit_log_or_boot_state_and_leaves_them_as_they_are() {
    let sim = Sim::new(None);
    let bundle = sim.bundle("2.0.0", 1, 4);
    let bad = sim.bundle("0.9.0", 1, 5);
    // A first refusal writes the log (a downgrade, recorded).
    json(
        &sim.dir,
        &format!("install {bad} --config dev/system.toml"),
        1,
    );
    let log = sim.path("dev/state/audit.log");
    let whole = std::fs::read(&log).unwrap();
    assert!(!whole.is_empty());
    let files = |sim: &Sim| -> Vec<(String, Vec<u8>)> {
        [
            "dev/state/audit.log",
            "dev/state/audit.log.head",
            "dev/boot.json",
            "dev/state/state.json",
        ]
        .iter()
        .map(|f| {
            (
                f.to_string(),
                std::fs::read(sim.path(f)).unwrap_or_default(),
            )
        })
        .collect()
    };
    // A torn last record (a power cut mid-append): refused, not cut away.
    let mut torn = whole.clone();
    torn.extend_from_slice(b"{\"seq\":99,\"ev");
    std::fs::write(&log, &torn).unwrap();
    let before = (files(&sim), sim.fingerprint());
    for b in [&bundle, &bad] {
        let v = json(
            &sim.dir,
            &format!("install {b} --config dev/system.toml"),
            3,
        );
        assert_eq!(v["error"]["code"], "audit", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("torn"),
            "{v}"
        );
        assert_eq!((files(&sim), sim.fingerprint()), before, "{b}");
    }
    // A deleted log whose head remains: refused, no new log made.
    std::fs::remove_file(&log).unwrap();
    let v = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        3,
    );
    assert_eq!(v["error"]["code"], "audit", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("missing"),
        "{v}"
    );
    assert!(!log.exists(), "a new log was made");
    // The boot step repairs a torn record; then the install goes on.
    std::fs::write(&log, &torn).unwrap();
    json(&sim.dir, "boot --config dev/system.toml", 0);
    json(&sim.dir, "log verify --config dev/system.toml", 0);

    // A boot state that names a group system.toml does not have, or leaves one out: the
    // bootloader's error, and nothing changes.
    let boot = sim.path("dev/boot.json");
    let good = std::fs::read_to_string(&boot).unwrap();
    for (damaged, says) in [
        (
            good.replace("\"booted\": \"A\"", "\"booted\": \"C\""),
            "names group C",
        ),
        (
            "{\"order\": [\"A\"], \"trial\": null, \"bootable\": {\"A\": true}, \"booted\": \"A\"}"
                .to_owned(),
            "leaves out group B",
        ),
        ("{\"order\": [\"A\"".to_owned(), "not a sim boot state"),
    ] {
        assert_ne!(damaged, good);
        std::fs::write(&boot, &damaged).unwrap();
        let before = files(&sim);
        let v = json(
            &sim.dir,
            &format!("install {bundle} --config dev/system.toml"),
            3,
        );
        assert_eq!(v["error"]["code"], "bootloader", "{damaged}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{damaged}: {v}"
        );
        assert_eq!(files(&sim)[2..], before[2..], "{damaged}");
    }
    std::fs::write(&boot, &good).unwrap();
    json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        0,
    );
}
