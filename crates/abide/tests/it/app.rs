//! Application updates on directory slots (`[[app]]`), end to end through the command: the
//! services stopped and started through a control command, the data directory backed up,
//! the release link switched, the migration run, the health gate; a failure at any step puts
//! the previous release and its data back byte for byte; `abide backup list|restore`; and a
//! crash at every step of the backup, the switch and the restore converges to one release and
//! the data that belongs to it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use abide_bundle::Digest;
use serde_json::Value;

use crate::crash::{copy_dir, run, trace};
use crate::device::Sim;
use crate::{failure, json, ok};

const ABIDE: &str = env!("CARGO_BIN_EXE_abide");

/// The control command: logs each call, and a started service leaves a marker (and writes to
/// the data directory, as a running application does).
const CTL: &str = r#"#!/bin/sh
echo "$1 $2" >> ctl.log
case "$1" in
  start)
    if [ -f fail-start ]; then echo "cannot start $2" >&2; exit 1; fi
    touch "running.$2"
    echo "$2 started on $(cat app/current/VERSION)" >> app/data/service.log ;;
  stop)
    if [ -f fail-stop ]; then echo "cannot stop $2" >&2; exit 1; fi
    rm -f "running.$2" ;;
esac
"#;

/// A simulated device with one application, `web`, all paths relative to the workspace.
struct App {
    sim: Sim,
}

impl App {
    fn new(extra: &str) -> App {
        let sim = Sim::new(None);
        let dir = &sim.dir;
        std::fs::write(dir.join("ctl.sh"), CTL).unwrap();
        // Real data: nested directories, a binary file, modes, a symbolic link.
        let data = dir.join("app/data");
        std::fs::create_dir_all(data.join("db/tables")).unwrap();
        std::fs::write(
            data.join("db/tables/users"),
            abide_testkit::image(70_000, 7),
        )
        .unwrap();
        std::fs::write(data.join("settings.conf"), "mode = fast\n").unwrap();
        std::fs::set_permissions(
            data.join("settings.conf"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::symlink("db/tables/users", data.join("users")).unwrap();
        let config = dir.join("dev/system.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            r#"
[[app]]
name = "web"
releases = "../app/releases"
link = "../app/current"
data = "../app/data"
services = ["web.service", "worker.service"]
control = "sh ctl.sh"
backups = 3
migrate = "sh \"$ABIDE_RELEASE/migrate.sh\""
timeout = "5s"
deadline = "10s"
{extra}
[[app.check]]
name = "answers"
kind = "command"
command = "sh app/current/check.sh"
timeout = "5s"
"#
        ));
        std::fs::write(&config, text).unwrap();
        App { sim }
    }

    /// Services that only mark themselves running (what they would write differs from run
    /// to run).
    fn quiet(&self) {
        let ctl = CTL.replace(
            "    echo \"$2 started on $(cat app/current/VERSION)\" >> app/data/service.log ;;",
            "    ;;",
        );
        assert_ne!(ctl, CTL);
        std::fs::write(self.dir().join("ctl.sh"), ctl).unwrap();
    }

    /// A device whose services only mark themselves running, with release 1.0.0 committed.
    fn at_1_0_0() -> App {
        App::at_1_0_0_with("")
    }

    /// [`App::at_1_0_0`] with `extra` keys for its `[[app]]`.
    fn at_1_0_0_with(extra: &str) -> App {
        let app = App::new(extra);
        app.quiet();
        let v1 = app.bundle("1.0.0", GOOD, MIGRATE);
        assert_eq!(app.install(&v1, 0)["state"], "committed");
        app
    }

    fn dir(&self) -> &Path {
        &self.sim.dir
    }

    /// A release bundle: `check` is its health check's script, `migrate` its migration.
    fn bundle(&self, version: &str, check: &str, migrate: &str) -> String {
        self.bundle_sv(version, 0, check, migrate)
    }

    /// [`App::bundle`] with a security version.
    fn bundle_sv(&self, version: &str, security: u64, check: &str, migrate: &str) -> String {
        let rel = self.dir().join(format!("rel-{version}"));
        std::fs::create_dir_all(rel.join("bin")).unwrap();
        std::fs::write(rel.join("VERSION"), version).unwrap();
        std::fs::write(rel.join("bin/web"), abide_testkit::image(50_000, 3)).unwrap();
        std::fs::write(rel.join("check.sh"), check).unwrap();
        std::fs::write(rel.join("migrate.sh"), migrate).unwrap();
        let tar = self.dir().join(format!("web-{version}.tar"));
        let made = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&rel)
            .arg(".")
            .status()
            .unwrap();
        assert!(made.success());
        let out = format!("web-{version}.abide");
        ok(
            self.dir(),
            &format!(
                "bundle create --product gw --version {version} --security-version {security} \
                 --compatible gw-1 --component web=web-{version}.tar,kind=app,slot=web \
                 --sign a.key --out {out}"
            ),
        );
        out
    }

    fn install(&self, bundle: &str, exit: i32) -> Value {
        json(
            self.dir(),
            &format!("install {bundle} --config dev/system.toml"),
            exit,
        )
    }

    /// [`App::install`] of an update that ends on the previous release (exit 4): its JSON and
    /// the code on standard error.
    fn install_ended(&self, bundle: &str) -> (Value, String) {
        let (v, code) = failure(
            self.dir(),
            &format!("install {bundle} --config dev/system.toml"),
            4,
        );
        (v, code.expect("a failure has a code"))
    }

    fn status(&self) -> Value {
        json(self.dir(), "app status web --config dev/system.toml", 0)["apps"][0].clone()
    }

    /// The release directory the link points at.
    fn running(&self) -> String {
        let target = std::fs::read_link(self.dir().join("app/current")).unwrap();
        assert!(target.is_relative(), "the link is relative: {target:?}");
        target.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn version(&self) -> String {
        std::fs::read_to_string(self.dir().join("app/current/VERSION")).unwrap()
    }

    fn data(&self) -> Tree {
        tree(&self.dir().join("app/data"))
    }

    fn services_running(&self) -> bool {
        ["web.service", "worker.service"]
            .iter()
            .all(|s| self.dir().join(format!("running.{s}")).exists())
    }
}

const GOOD: &str = "exit 0\n";
const BAD: &str = "echo 'no answer on :8080'; exit 1\n";
const MIGRATE: &str =
    "echo \"migrated to $ABIDE_VERSION from $ABIDE_FROM_VERSION\" >> \"$ABIDE_DATA/migrations\"\n";

/// `data` as the services of release 1.0.0 leave it after they were started once more: their
/// log in the data directory has two more lines, the rest is as it was.
fn restarted(data: &Tree, dir: &Path) -> Tree {
    let mut data = data.clone();
    let log = std::fs::read_to_string(dir.join("app/data/service.log")).unwrap();
    let before = log
        .strip_suffix("web.service started on 1.0.0\nworker.service started on 1.0.0\n")
        .unwrap_or_else(|| panic!("the services started on 1.0.0 last: {log}"));
    assert_eq!(
        data["service.log"],
        format!("file 644 {}", Digest::of(before.as_bytes())),
        "the log up to the restart is the backup's"
    );
    data.insert(
        "service.log".into(),
        format!("file 644 {}", Digest::of(log.as_bytes())),
    );
    data
}

/// A directory tree as it matters: each path's kind, mode and content (or link target).
type Tree = BTreeMap<String, String>;

fn tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(
                    name,
                    format!("link {}", std::fs::read_link(&path).unwrap().display()),
                );
            } else if meta.is_dir() {
                out.insert(name, format!("dir {mode:o}"));
                walk(root, &path, out);
            } else {
                let digest = Digest::of(&std::fs::read(&path).unwrap());
                out.insert(name, format!("file {mode:o} {digest}"));
            }
        }
    }
    let mut out = Tree::new();
    let mode = std::fs::metadata(root).unwrap().permissions().mode() & 0o7777;
    out.insert(".".into(), format!("dir {mode:o}"));
    walk(root, root, &mut out);
    out
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn an_update_keeps_the_data_and_a_failed_one_puts_the_release_and_its_data_back_byte_for_byte() {
    let app = App::new("");
    let dir = app.dir();
    // The first release: no link yet, so nothing to go back to; it commits.
    let v1 = app.bundle("1.0.0", GOOD, MIGRATE);
    let first = app.install(&v1, 0);
    assert_eq!(first["state"], "committed", "{first}");
    assert_eq!(app.version(), "1.0.0");
    assert!(app.services_running());
    assert_eq!(
        std::fs::read_to_string(dir.join("ctl.log")).unwrap(),
        "stop worker.service\nstop web.service\nstart web.service\nstart worker.service\n",
        "stopped in reverse order, started in order"
    );
    let data = std::fs::read_to_string(dir.join("app/data/migrations")).unwrap();
    assert_eq!(data, "migrated to 1.0.0 from \n");
    let release1 = app.running();
    let data1 = app.data();
    assert!(data1.contains_key("users") && data1["settings.conf"].starts_with("file 640"));

    // A release whose health check fails after its migration wrote to the data.
    let v2 = app.bundle("2.0.0", BAD, MIGRATE);
    let (failed, code) = app.install_ended(&v2);
    assert_eq!(failed["state"], "rolled_back", "{failed}");
    assert_eq!(code, "app-rolled-back");
    assert!(
        failed["reason"].as_str().unwrap().contains("answers")
            && failed["reason"]
                .as_str()
                .unwrap()
                .contains("no answer on :8080"),
        "the reason names the check and what it said: {failed}"
    );
    assert_eq!(app.running(), release1);
    assert_eq!(app.version(), "1.0.0");
    assert_eq!(
        app.data(),
        restarted(&data1, dir),
        "the data is the backup's, byte for byte (and what the restarted services wrote)"
    );
    assert!(app.services_running(), "the previous release runs again");
    // The data written after the backup is kept beside the data directory.
    let kept = PathBuf::from(failed["kept"].as_str().unwrap());
    assert_eq!(
        kept,
        dir.join(format!(
            "app/data.rolled-back-{}",
            failed["transaction"].as_str().unwrap()
        ))
    );
    let kept_migrations = std::fs::read_to_string(kept.join("migrations")).unwrap();
    assert!(
        kept_migrations.ends_with("migrated to 2.0.0 from 1.0.0\n"),
        "{kept_migrations}"
    );
    assert!(
        std::fs::read_to_string(kept.join("service.log"))
            .unwrap()
            .contains("started on 2.0.0"),
        "what the new release wrote is there too"
    );
    // The failed release is gone; the running one stays.
    assert_eq!(names(&dir.join("app/releases")), vec![release1.clone()]);
    let s = app.status();
    assert_eq!(s["version"], "1.0.0");
    assert_eq!(s["quarantine"][0], "2.0.0");
    assert_eq!(s["transaction"]["step"], "rolled_back");
    // Quarantined: refused with nothing changed.
    let data1r = app.data();
    let refused = app.install(&v2, 1);
    assert_eq!(refused["error"]["code"], "quarantined");
    assert_eq!(app.data(), data1r);

    // The backups: the data of each update's previous release, checked by digest.
    let list = json(dir, "backup list --app web --config dev/system.toml", 0);
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{list}");
    let b2 = &backups[1];
    assert_eq!(b2["release"]["version"], "1.0.0");
    assert_eq!(b2["transaction"], failed["transaction"]);
    let file = std::fs::read(b2["file"].as_str().unwrap()).unwrap();
    assert_eq!(b2["sha256"], Digest::of(&file).to_string());
    assert_eq!(b2["size"], file.len());
    assert!(file.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "a zstd frame");

    // A good release commits and keeps the data, migrated.
    let v3 = app.bundle("2.1.0", GOOD, MIGRATE);
    let good = app.install(&v3, 0);
    assert_eq!(good["state"], "committed", "{good}");
    assert_eq!(app.version(), "2.1.0");
    let data3 = app.data();
    assert_eq!(
        std::fs::read_to_string(dir.join("app/data/migrations")).unwrap(),
        "migrated to 1.0.0 from \nmigrated to 2.1.0 from 1.0.0\n"
    );
    assert_eq!(data3["users"], data1["users"]);

    // An operator puts back the backup taken before 2.1.0: its data and its release.
    let b3 = good["backup"]["id"].as_str().unwrap().to_owned();
    let restored = json(
        dir,
        &format!("backup restore {b3} --config dev/system.toml"),
        0,
    );
    assert_eq!(restored["state"], "restored", "{restored}");
    assert_eq!(app.running(), release1);
    assert_eq!(app.data(), restarted(&data1r, dir));
    let aside = PathBuf::from(restored["kept"].as_str().unwrap());
    assert_eq!(
        tree(&aside)["migrations"],
        data3["migrations"],
        "the data it replaced is kept"
    );
    assert!(app.services_running());
    assert_eq!(app.status()["version"], "1.0.0");

    // A restore of a damaged backup, or of one that does not exist, changes nothing.
    let b1 = backups[0]["file"].as_str().unwrap().to_owned();
    let mut bytes = std::fs::read(&b1).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&b1, bytes).unwrap();
    let before = (app.data(), app.running());
    let e = json(
        dir,
        &format!(
            "backup restore {} --config dev/system.toml",
            backups[0]["id"].as_str().unwrap()
        ),
        1,
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("damaged"),
        "{e}"
    );
    let e = json(dir, "backup restore web-99 --config dev/system.toml", 1);
    assert_eq!(e["error"]["code"], "app");
    assert_eq!((app.data(), app.running()), before);
    // A backup of an application system.toml no longer has: no-app, nothing changed.
    let config = std::fs::read_to_string(dir.join("dev/system.toml")).unwrap();
    std::fs::write(
        dir.join("dev/system.toml"),
        config.replace("name = \"web\"", "name = \"shop\""),
    )
    .unwrap();
    let e = json(
        dir,
        &format!("backup restore {b3} --config dev/system.toml"),
        1,
    );
    assert_eq!(e["error"]["code"], "no-app", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("\"web\""),
        "{e}"
    );
    std::fs::write(dir.join("dev/system.toml"), config).unwrap();
    assert_eq!((app.data(), app.running()), before);
    json(dir, "log verify --config dev/system.toml", 0);
}

#[test]
fn a_failing_step_ends_on_the_previous_release_and_data_and_backups_are_kept_n_deep() {
    let app = App::new("after_backup = \"discard\"");
    let dir = app.dir();
    app.quiet();
    let v1 = app.bundle("1.0.0", GOOD, MIGRATE);
    assert_eq!(app.install(&v1, 0)["state"], "committed");
    let release1 = app.running();
    let data1 = app.data();

    // A migration that fails half-way: rolled back, its half-written data discarded.
    let half =
        "echo half-done >> \"$ABIDE_DATA/migrations\"; echo 'schema 7 unknown' >&2; exit 3\n";
    let v2 = app.bundle("2.0.0", GOOD, half);
    let e = app.install(&v2, 4);
    assert_eq!(e["state"], "rolled_back", "{e}");
    assert!(
        e["reason"].as_str().unwrap().contains("schema 7 unknown"),
        "{e}"
    );
    assert_eq!(e["kept"], Value::Null, "discarded, as configured");
    assert_eq!(
        (app.running(), app.data()),
        (release1.clone(), data1.clone())
    );
    assert!(
        !names(&dir.join("app"))
            .iter()
            .any(|n| n.contains("rolled-back")),
        "{:?}",
        names(&dir.join("app"))
    );
    let audit = std::fs::read_to_string(dir.join("dev/state/audit.log")).unwrap();
    assert!(
        audit.contains("\"after_backup\":\"discard\""),
        "the discarded data is named in the audit log"
    );

    // A service that does not stop: failed before the switch; the data never changed and the
    // stopped services are started again.
    std::fs::write(dir.join("fail-stop"), "").unwrap();
    let v3 = app.bundle("2.1.0", GOOD, MIGRATE);
    std::fs::remove_file(dir.join("running.worker.service")).unwrap();
    let (e, code) = app.install_ended(&v3);
    assert_eq!(e["state"], "failed", "{e}");
    assert_eq!(code, "app-failed");
    assert!(e["reason"].as_str().unwrap().contains("cannot stop"), "{e}");
    assert_eq!(
        (app.running(), app.data()),
        (release1.clone(), data1.clone())
    );
    std::fs::remove_file(dir.join("fail-stop")).unwrap();

    // A bundle for an application the device does not have is no application's: the groups
    // have no slot of its class either. Refused, nothing changed.
    let tar = dir.join("web-2.1.0.tar");
    std::fs::copy(&tar, dir.join("other.tar")).unwrap();
    ok(
        dir,
        "bundle create --product gw --version 9.0.0 --compatible gw-1 --component db=other.tar,kind=app,slot=db --sign a.key --out db.abide",
    );
    let e = app.install("db.abide", 1);
    assert_eq!(e["error"]["code"], "no-slot", "{e}");
    assert_eq!(
        (app.running(), app.data()),
        (release1.clone(), data1.clone())
    );

    // A migration that damages the backup it was given: the previous release comes back on
    // the data as it is (a damaged backup is never unpacked over it), and the audit log says so.
    let spoil =
        "printf x >> \"$ABIDE_BACKUP\"; echo spoiled >> \"$ABIDE_DATA/migrations\"; exit 1\n";
    let v4 = app.bundle("2.1.1", GOOD, spoil);
    let e = app.install(&v4, 4);
    assert_eq!(e["state"], "rolled_back", "{e}");
    assert_eq!(app.running(), release1);
    assert!(
        std::fs::read_to_string(dir.join("app/data/migrations"))
            .unwrap()
            .ends_with("spoiled\n")
    );
    let audit = std::fs::read_to_string(dir.join("dev/state/audit.log")).unwrap();
    assert!(audit.contains("app-restore-skipped") && audit.contains("is damaged"));
    std::fs::write(dir.join("app/data/migrations"), "migrated to 1.0.0 from \n").unwrap();
    assert_eq!(app.data(), data1);

    // An archive entry that would leave the release directory: refused, nothing left behind.
    std::fs::create_dir_all(dir.join("evil/inner")).unwrap();
    std::fs::write(dir.join("evil/outside"), "x").unwrap();
    let made = Command::new("tar")
        .args(["-cPf", "../evil.tar", "../outside"])
        .current_dir(dir.join("evil/inner"))
        .status()
        .unwrap();
    assert!(made.success());
    ok(
        dir,
        "bundle create --product gw --version 2.1.2 --compatible gw-1 --component web=evil/evil.tar,kind=app,slot=web --sign a.key --out evil.abide",
    );
    let e = app.install("evil.abide", 1);
    assert_eq!(e["error"]["code"], "bad-archive", "{e}");
    assert_eq!(names(&dir.join("app/releases")), vec![release1.clone()]);
    assert_eq!(
        (app.running(), app.data()),
        (release1.clone(), data1.clone())
    );

    // Good updates: backups are kept three deep (the default).
    for v in ["2.2.0", "2.3.0", "2.4.0", "2.5.0"] {
        let b = app.bundle(v, GOOD, MIGRATE);
        assert_eq!(app.install(&b, 0)["state"], "committed");
    }
    let list = json(dir, "backup list --config dev/system.toml", 0);
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{list}");
    let files = names(&dir.join("dev/state/backups/web"));
    assert_eq!(files.len(), 3, "{files:?}");
    // The releases kept: the running one and those the kept backups belong to.
    assert_eq!(
        names(&dir.join("app/releases")).len(),
        4,
        "{:?}",
        names(&dir.join("app/releases"))
    );

    // The application's own version order and security counter.
    let e = app.install(&v1, 1);
    assert_eq!(e["error"]["code"], "older-version", "{e}");
    let secure = app.bundle_sv("3.0.0", 5, GOOD, MIGRATE);
    assert_eq!(app.install(&secure, 0)["state"], "committed");
    assert_eq!(app.status()["security_version"], 5);
    let below = app.bundle_sv("3.1.0", 4, GOOD, MIGRATE);
    let e = app.install(&below, 1);
    assert_eq!(e["error"]["code"], "downgrade", "{e}");
    let forced = json(
        dir,
        &format!("install {below} --force --config dev/system.toml"),
        1,
    );
    assert_eq!(
        forced["error"]["code"], "downgrade",
        "never below the counter, even forced"
    );
    assert_eq!(app.version(), "3.0.0");
}

/// Kills process `root`, everything it started, and their process groups (a command runs in
/// a group of its own), the way systemd kills a unit's cgroup.
fn kill_tree(root: u32) {
    let parents: Vec<(u32, u32, i32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let mut fields = rest.split_whitespace().skip(1);
            let ppid = fields.next()?.parse().ok()?;
            let pgid = fields.next()?.parse().ok()?;
            Some((pid, ppid, pgid))
        })
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(parents.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    for (pid, _, pgid) in parents.iter().filter(|p| tree.contains(&p.0)) {
        if let Some(group) = rustix::process::Pid::from_raw(*pgid) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        if let Some(p) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

/// After a crash: the next start (`abide boot`, as after a power cut) must leave the
/// application on one of `allowed` (release, its data), ended, its services running, the
/// audit log whole. `allowed` holds (version, data). Returns which.
fn converged(dir: &Path, allowed: &[(String, Tree)], what: &str) -> usize {
    let boot = json(dir, "boot --config dev/system.toml", 0);
    let status = json(dir, "app status web --config dev/system.toml", 0)["apps"][0].clone();
    let step = status["transaction"]["step"]
        .as_str()
        .unwrap_or("none")
        .to_owned();
    assert!(
        ["committed", "failed", "rolled_back", "restored"].contains(&step.as_str()),
        "{what}: not ended: {status} {boot}"
    );
    let release = std::fs::read_link(dir.join("app/current"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let running = std::fs::read_to_string(dir.join("app/current/VERSION")).unwrap();
    let data = tree(&dir.join("app/data"));
    let found = allowed
        .iter()
        .position(|(v, d)| *v == running && *d == data)
        .unwrap_or_else(|| {
            panic!(
                "{what}: release {running} with data {data:?} is none of the allowed {allowed:?}; boot {boot}; status {status}"
            )
        });
    assert_eq!(
        status["release"], release,
        "{what}: the state says what runs"
    );
    assert_eq!(
        status["version"], running,
        "{what}: the state says what runs"
    );
    for s in ["web.service", "worker.service"] {
        assert!(
            dir.join(format!("running.{s}")).exists(),
            "{what}: {s} runs"
        );
    }
    assert!(
        !names(&dir.join("app/releases"))
            .iter()
            .any(|n| n.starts_with(".staging")),
        "{what}: no half-unpacked release is left"
    );
    json(dir, "log verify --config dev/system.toml", 0);
    found
}

#[test]
fn a_crash_at_every_step_of_backup_switch_and_restore_converges_to_one_release_and_its_data() {
    // The data a started service writes would differ between runs; services here only mark
    // themselves running.
    let app = App::at_1_0_0();
    let dir = app.dir();
    let bad = app.bundle("2.0.0", BAD, MIGRATE);
    let good = app.bundle("2.1.0", GOOD, MIGRATE);
    let data1 = app.data();
    let outside = tempfile::tempdir().unwrap();
    let template = outside.path().join("template");
    let cases = outside.path().join("cases");
    copy_dir(dir, &template.join("w"));
    // What a good update ends on when it commits.
    let probe = cases.join("probe");
    copy_dir(&template.join("w"), &probe);
    let install = |b: &str| {
        vec![
            "install".to_owned(),
            b.to_owned(),
            "--config".into(),
            "dev/system.toml".into(),
        ]
    };
    let args_good = install(&good);
    let args_bad = install(&bad);
    assert!(run(&probe, &argv(&args_good), &[]));
    let data2 = tree(&probe.join("app/data"));
    assert_ne!(data1, data2);

    let mut seen = BTreeMap::<String, usize>::new();
    let mut matrix = |name: &str, args: &[String], allowed: &[(String, Tree)]| {
        let t = trace(
            &case_in(&template, &cases, &format!("{name}-trace")),
            &argv(args),
        );
        assert!(t.iter().any(|p| p.starts_with("app:step")), "{t:?}");
        for (k, point) in t.iter().enumerate() {
            let case = case_in(&template, &cases, &format!("{name}-{k}"));
            let exited = run(&case, &argv(args), &[("ABIDE_CRASH_AT", k.to_string())]);
            assert!(!exited, "{name}: cut at {k} ({point})");
            let which = converged(&case, allowed, &format!("{name} cut at {k} ({point})"));
            *seen.entry(format!("{name}->{which}")).or_default() += 1;
            std::fs::remove_dir_all(&case).unwrap();
        }
        t
    };
    let bad_points = matrix("bad", &args_bad, &[("1.0.0".to_owned(), data1.clone())]);
    let good_points = matrix(
        "good",
        &args_good,
        &[
            ("1.0.0".to_owned(), data1.clone()),
            ("2.1.0".to_owned(), data2.clone()),
        ],
    );
    // Every durable step of the backup, the switch and the restore was cut.
    let has = |t: &[String], p: &str| t.iter().any(|x| x.starts_with(p));
    for p in [
        "backup:archive-written",
        "app:step backed_up",
        "app:step restoring",
        "app:set-aside",
        "backup:unpacked",
        "app:restore-rename",
    ] {
        assert!(has(&bad_points, p), "{p} in {bad_points:?}");
    }
    assert!(has(&good_points, "app:step started"), "{good_points:?}");
    // Cut early, a good update is undone; cut after its commit is recorded, it stays.
    assert!(
        seen.contains_key("good->0") && seen.contains_key("good->1"),
        "{seen:?}"
    );

    // An operator's restore, cut anywhere: the restore is finished or never began.
    let list = json(&probe, "backup list --config dev/system.toml", 0);
    let id = list["backups"].as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    copy_dir(&probe, &template.join("restore"));
    let restore = vec![
        "backup".to_owned(),
        "restore".into(),
        id,
        "--config".into(),
        "dev/system.toml".into(),
    ];
    let t = trace(
        &case_of(&template.join("restore"), &cases, "restore-trace"),
        &argv(&restore),
    );
    assert!(t.len() > 5, "{t:?}");
    for (k, point) in t.iter().enumerate() {
        let case = case_of(&template.join("restore"), &cases, &format!("restore-{k}"));
        assert!(!run(
            &case,
            &argv(&restore),
            &[("ABIDE_CRASH_AT", k.to_string())]
        ));
        converged(
            &case,
            &[
                ("2.1.0".to_owned(), data2.clone()),
                ("1.0.0".to_owned(), data1.clone()),
            ],
            &format!("restore cut at {k} ({point})"),
        );
        std::fs::remove_dir_all(&case).unwrap();
    }
}

fn argv(a: &[String]) -> Vec<&str> {
    a.iter().map(String::as_str).collect()
}

fn case_in(template: &Path, cases: &Path, name: &str) -> PathBuf {
    case_of(&template.join("w"), cases, name)
}

fn case_of(from: &Path, cases: &Path, name: &str) -> PathBuf {
    let case = cases.join(name);
    let _ = std::fs::remove_dir_all(&case);
    copy_dir(from, &case);
    case
}

#[test]
fn kill_9_during_the_migration_and_the_health_gate_is_undone_by_the_next_start() {
    let app = App::at_1_0_0();
    let dir = app.dir();
    let data1 = app.data();
    // A slow migration and a slow check: the process is killed (with its children) while one
    // of them runs.
    let slow_migrate = "echo step1 >> \"$ABIDE_DATA/migrations\"; sleep 0.4; echo step2 >> \"$ABIDE_DATA/migrations\"\n";
    let v2 = app.bundle("2.0.0", "sleep 0.5; exit 0\n", slow_migrate);
    let mut interrupted = Vec::new();
    for (i, delay_ms) in [150u64, 350, 650, 800].into_iter().enumerate() {
        let case = dir.join(format!("kill-{i}"));
        let _ = std::fs::remove_dir_all(&case);
        copy_subset(dir, &case);
        let mut child = Command::new(ABIDE)
            .args(["install", &v2, "--config", "dev/system.toml"])
            .current_dir(&case)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // Every process of the install, as systemd kills the unit's cgroup (or a power cut
        // does): its group and the groups its commands run in.
        kill_tree(child.id());
        let _ = child.wait();
        let which = converged(
            &case,
            &[("1.0.0".to_owned(), data1.clone())],
            &format!("killed after {delay_ms} ms"),
        );
        assert_eq!(which, 0);
        let status = json(&case, "app status web --config dev/system.toml", 0);
        let reason = status["apps"][0]["transaction"]["reason"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        interrupted.push(reason);
    }
    // Most kills land in the migration or the gate (the earliest may land before the update
    // began): the next start found the update cut short and rolled it back.
    let mid = interrupted
        .iter()
        .filter(|r| {
            [
                "interrupted while switched",
                "interrupted while migrated",
                "interrupted while started",
            ]
            .contains(&r.as_str())
        })
        .count();
    assert!(mid >= 2, "{interrupted:?}");
}

/// Copies the device, the application and the bundles of `dir` into `case`.
fn copy_subset(dir: &Path, case: &Path) {
    std::fs::create_dir_all(case).unwrap();
    for name in names(dir) {
        if name.starts_with("kill-") || name.starts_with("rel-") {
            continue;
        }
        let from = dir.join(&name);
        let meta = std::fs::symlink_metadata(&from).unwrap();
        if meta.is_dir() {
            copy_dir(&from, &case.join(&name));
        } else {
            std::fs::copy(&from, case.join(&name)).unwrap();
        }
    }
}

#[test]
fn an_application_update_scheduled_through_the_agent_commits_or_rolls_back_and_is_counted() {
    use crate::schedule::{Running, dev, metrics, schedule, slow_server, wait};
    let app = App::at_1_0_0();
    let good = app.sim.path(&app.bundle("2.0.0", GOOD, MIGRATE));
    let bad = app.sim.path(&app.bundle("2.1.0", BAD, MIGRATE));
    let _agent = Running::start(&app.sim);
    // Schedules the bundle at `source` and waits for the schedule to end as `end`.
    let run_to = |source: &Path, end: &str| {
        let s = dev(
            &app.sim,
            &["schedule", "update", "--source", source.to_str().unwrap()],
            0,
        );
        let id = s["id"].as_str().unwrap().to_owned();
        wait(&format!("schedule {id} to end {end}"), || {
            schedule(&app.sim, &id)["state"] == end
        });
        schedule(&app.sim, &id)
    };
    let s1 = run_to(&good, "completed");
    assert!(
        s1["transaction"].as_str().unwrap().starts_with("app-"),
        "{s1}"
    );
    assert_eq!(s1["version"], "2.0.0");
    assert_eq!(app.version(), "2.0.0");
    assert!(app.services_running());

    let s2 = run_to(&bad, "rolled_back");
    assert!(s2["reason"].as_str().unwrap().contains("answers"), "{s2}");
    assert_eq!(app.version(), "2.0.0");
    assert!(app.services_running());
    // The rollback is in the history (through the agent) and in the metrics.
    let history = dev(&app.sim, &["history"], 0);
    let last = &history[0];
    assert_eq!(
        (last["app"].as_str(), last["version"].as_str()),
        (Some("web"), Some("2.1.0")),
        "{history}"
    );
    // From a URL whose bundle is not the one pinned: every byte hashed before the first step;
    // the staged release is given up, the application untouched.
    let slow = app.bundle("2.2.0", GOOD, MIGRATE);
    let url = slow_server(std::fs::read(app.sim.path(&slow)).unwrap(), 64 << 10);
    let s3 = dev(
        &app.sim,
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
    let id3 = s3["id"].as_str().unwrap().to_owned();
    wait("the mismatched update to fail", || {
        schedule(&app.sim, &id3)["state"] == "failed"
    });
    let s3 = schedule(&app.sim, &id3);
    assert!(s3["reason"].as_str().unwrap().contains("sha256"), "{s3}");
    assert_eq!(app.version(), "2.0.0");
    assert!(
        !names(&app.sim.path("app/releases"))
            .iter()
            .any(|n| n.ends_with("2.2.0") || n.starts_with(".staging")),
        "{:?}",
        names(&app.sim.path("app/releases"))
    );
    // Once its first step ran, an application update can no longer be cancelled.
    let slow_migration = "sleep 2; echo slow >> \"$ABIDE_DATA/migrations\"\n";
    let b = app.sim.path(&app.bundle("2.3.0", GOOD, slow_migration));
    let s4 = dev(
        &app.sim,
        &["schedule", "update", "--source", b.to_str().unwrap()],
        0,
    );
    let id4 = s4["id"].as_str().unwrap().to_owned();
    wait("the migration to run", || {
        app.status()["transaction"]["step"] == "switched"
    });
    let refused = dev(&app.sim, &["schedule", "cancel", &id4], 1);
    assert_eq!(refused["error"]["code"], "failed-precondition", "{refused}");
    wait("the slow update to complete", || {
        schedule(&app.sim, &id4)["state"] == "completed"
    });
    assert_eq!(app.version(), "2.3.0");
    let text = metrics(&app.sim);
    assert!(
        text.contains("abide_agent_app_rollbacks_total{app=\"web\",reason=\"health\"} 1"),
        "{text}"
    );
}

#[test]
fn a_first_install_cut_anywhere_leaves_the_original_data_or_the_release_committed() {
    let app = App::new("");
    app.quiet();
    let dir = app.dir();
    let v1 = app.bundle("1.0.0", GOOD, MIGRATE);
    let data0 = app.data();
    let outside = tempfile::tempdir().unwrap();
    let template = outside.path().join("template");
    copy_dir(dir, &template);
    let args = ["install", v1.as_str(), "--config", "dev/system.toml"];
    let t = trace(&case_of(&template, outside.path(), "trace"), &args);
    let mut committed = 0;
    for (k, point) in t.iter().enumerate() {
        let case = case_of(&template, outside.path(), &format!("cut-{k}"));
        assert!(!run(&case, &args, &[("ABIDE_CRASH_AT", k.to_string())]));
        json(&case, "app recover --config dev/system.toml", 0);
        let what = format!("cut at {k} ({point})");
        let releases = if case.join("app/releases").exists() {
            names(&case.join("app/releases"))
        } else {
            Vec::new()
        };
        match std::fs::read_to_string(case.join("app/current/VERSION")) {
            Ok(v) => {
                assert_eq!(v, "1.0.0", "{what}");
                assert_eq!(releases.len(), 1, "{what}: {releases:?}");
                assert_eq!(
                    std::fs::read_to_string(case.join("app/data/migrations")).unwrap(),
                    "migrated to 1.0.0 from \n",
                    "{what}"
                );
                committed += 1;
            }
            Err(_) => {
                assert!(
                    std::fs::symlink_metadata(case.join("app/current")).is_err(),
                    "{what}: no link"
                );
                assert!(releases.is_empty(), "{what}: {releases:?} left behind");
                assert_eq!(tree(&case.join("app/data")), data0, "{what}");
            }
        }
        json(&case, "log verify --config dev/system.toml", 0);
        std::fs::remove_dir_all(&case).unwrap();
    }
    assert!(
        committed > 0 && committed < t.len(),
        "{committed} of {}",
        t.len()
    );
}

#[test]
fn a_link_that_is_not_a_symbolic_link_or_leads_elsewhere_is_refused_before_anything_changes() {
    let app = App::new("");
    app.quiet();
    let dir = app.dir();
    std::fs::create_dir_all(dir.join("app/current")).unwrap();
    std::fs::write(dir.join("app/current/VERSION"), "hand-made").unwrap();
    let v1 = app.bundle("1.0.0", GOOD, MIGRATE);
    let data = app.data();
    // The install is refused with code `app` and a message saying why; the data is untouched.
    let refused = |why: &str| {
        let e = app.install(&v1, 1);
        assert_eq!(e["error"]["code"], "app", "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(why), "{e}");
        assert_eq!(app.data(), data);
    };
    refused("is not a symbolic link");
    assert!(!dir.join("ctl.log").exists(), "no service was touched");
    assert!(
        !dir.join("app/releases").exists() || names(&dir.join("app/releases")).is_empty(),
        "nothing unpacked"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("app/current/VERSION")).unwrap(),
        "hand-made"
    );
    // A link that points outside the releases directory: refused the same way.
    std::fs::rename(dir.join("app/current"), dir.join("app/elsewhere")).unwrap();
    std::os::unix::fs::symlink("elsewhere", dir.join("app/current")).unwrap();
    refused("which is not a directory in");
    assert_eq!(
        std::fs::read_link(dir.join("app/current")).unwrap(),
        Path::new("elsewhere")
    );
}

#[test]
fn an_update_that_would_fill_its_file_system_is_refused_before_the_application_is_touched() {
    let app = App::at_1_0_0();
    let dir = app.dir().to_owned();
    // 2,930 empty files (they fit in 3,000 with almost nothing to spare), and one file of 6 MiB.
    let many = dir.join("rel-2.0.0/many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..2930 {
        std::fs::write(many.join(format!("f{i}")), "").unwrap();
    }
    let many = app.bundle("2.0.0", GOOD, MIGRATE);
    std::fs::create_dir_all(dir.join("rel-2.1.0")).unwrap();
    std::fs::write(dir.join("rel-2.1.0/big"), abide_testkit::image(6 << 20, 9)).unwrap();
    let big = app.bundle("2.1.0", GOOD, MIGRATE);
    let release = app.running();
    let abide = ABIDE;
    for (bundle, fs, state_too) in [
        // A file system with 3,000 files holding the application and the state directory.
        (&many, "size=64m,nr_inodes=3000", true),
        // One of 4 MiB holding the application.
        (&big, "size=4m", false),
    ] {
        std::fs::write(dir.join("ctl.log"), "").unwrap();
        let state = if state_too {
            "mkdir fs/state; cp -a dev/state/. fs/state/; mount --bind fs/state dev/state"
        } else {
            "true"
        };
        let script = format!(
            "set -e; mkdir -p fs; mount -t tmpfs -o {fs} tmpfs fs; mkdir fs/app; cp -a app/. fs/app/; \
             mount --bind fs/app app; {state}; \
             {abide} install {bundle} --config dev/system.toml --json > out.json || echo $? > rc; \
             ls -a app/releases > releases.txt; readlink app/current > link.txt; \
             {abide} app status web --config dev/system.toml --json > status.json; \
             {abide} log verify --config dev/system.toml --json > verify.json"
        );
        let out = app.sim.in_mount_namespace(&script);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        assert!(
            out.status.success(),
            "{bundle}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            read("out.json")
        );
        let v: Value = serde_json::from_str(&read("out.json")).unwrap();
        assert_eq!(read("rc").trim(), "1", "{bundle}: {v}");
        assert_eq!(v["error"]["code"], "no-space", "{bundle}: {v}");
        // Nothing of the application was touched: no service stopped, the link as it was, no
        // release or staging directory left, and the device's records whole.
        assert_eq!(read("ctl.log"), "", "{bundle}");
        assert!(app.services_running());
        assert!(
            read("link.txt").trim().ends_with(&release),
            "{}",
            read("link.txt")
        );
        let releases: Vec<String> = read("releases.txt")
            .lines()
            .filter(|l| !matches!(*l, "." | ".."))
            .map(str::to_owned)
            .collect();
        assert_eq!(releases, std::slice::from_ref(&release), "{bundle}");
        let status: Value = serde_json::from_str(&read("status.json")).unwrap();
        assert_eq!(status["apps"][0]["version"], "1.0.0", "{status}");
        let verify: Value = serde_json::from_str(&read("verify.json")).unwrap();
        assert_eq!(verify["ok"], true, "{verify}");
        std::fs::remove_file(dir.join("rc")).unwrap();
    }
}

#[test]
fn a_file_system_filled_at_any_step_of_an_update_ends_on_a_release_with_its_services_running() {
    let app = App::at_1_0_0();
    let template = app.dir().to_owned();
    let config = template.join("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("state_reserve = \"1M\"\n{text}")).unwrap();
    let v2 = app.bundle("2.0.0", GOOD, MIGRATE);
    let work = tempfile::tempdir().unwrap();
    let points = trace(
        &{
            let d = work.path().join("trace");
            copy_dir(&template, &d);
            d
        },
        &["install", &v2, "--config", "dev/system.toml"],
    )
    .len();
    assert!(points > 10, "{points} crash points");
    let abide = ABIDE;
    let mut outcomes = std::collections::BTreeMap::new();
    for (kind, k) in ["bytes", "inodes"]
        .into_iter()
        .flat_map(|kind| (0..points).map(move |k| (kind, k)))
    {
        let d = work.path().join(format!("fill-{kind}-{k}"));
        copy_dir(&template, &d);
        std::fs::write(d.join("ctl.log"), "").unwrap();
        let script = format!(
            "set -e; mkdir fs; mount -t tmpfs -o size=32m,nr_inodes=2000 tmpfs fs; \
             mkdir fs/app fs/state; cp -a app/. fs/app/; cp -a dev/state/. fs/state/; \
             mount --bind fs/app app; mount --bind fs/state dev/state; \
             ABIDE_FILL={kind} ABIDE_FILL_AT={k} ABIDE_FILL_DIR=$PWD/app {abide} install {v2} --config dev/system.toml --json > out.json || true; \
             {abide} app recover --config dev/system.toml --json > recover.json 2> recover.err || echo $? > recover.rc; \
             {abide} app status web --config dev/system.toml --json > status.json; \
             {abide} log verify --config dev/system.toml --json > verify.json || true; \
             cat app/current/VERSION > version.txt"
        );
        crate::crash::in_mount_namespace(&d, &script, &format!("{kind} filled at {k}"));
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        assert_eq!(
            read("recover.rc"),
            "",
            "{kind} filled at {k}: recover failed: {}",
            read("recover.err")
        );
        let status: Value = serde_json::from_str(&read("status.json")).unwrap();
        let version = read("version.txt");
        assert!(
            ["1.0.0", "2.0.0"].contains(&version.as_str()),
            "{kind} filled at {k}: {version}"
        );
        assert_eq!(
            status["apps"][0]["version"],
            version.as_str(),
            "{kind} filled at {k}: {status}"
        );
        let running = ["web.service", "worker.service"]
            .iter()
            .all(|s| d.join(format!("running.{s}")).exists());
        assert!(
            running,
            "{kind} filled at {k}: services stopped: {}",
            read("ctl.log")
        );
        let verify: Value = serde_json::from_str(&read("verify.json")).unwrap_or(Value::Null);
        assert_eq!(verify["ok"], true, "{kind} filled at {k}: {verify}");
        *outcomes.entry(format!("{kind}: {version}")).or_insert(0) += 1;
    }
    eprintln!("filled at each of {points} points: {outcomes:?}");
    for kind in ["bytes", "inodes"] {
        assert!(
            outcomes.contains_key(&format!("{kind}: 1.0.0")),
            "a full disk never made the update go back: {outcomes:?}"
        );
    }
}

/// A fleet rollout of an application release: the agent carries it out as a local update under
/// a reboot lease (`lease = true`) and reports `committed` after the health gate; a failing
/// release is reported `rolled_back` with the failed step and the data restored, and not tried
/// again; a refused one `failed`; one a killed agent left in its migration is finished by the
/// next start and reported then; a device without the application is left out.
#[test]
fn an_application_release_travels_by_rollout_and_reports_its_outcome() {
    app_release_by_rollout(None);
}

#[test]
fn an_application_release_travels_by_rollout_on_postgresql() {
    let pg = abide_testkit::pg::Postgres::start();
    app_release_by_rollout(Some(&pg.url()));
}

fn app_release_by_rollout(db: Option<&str>) {
    use crate::agent::{Fleet, agent_once, device_of};
    let app = App::at_1_0_0_with("lease = true\n");
    let dir = app.dir().to_owned();
    let f = Fleet::start(&dir, db, &[]);
    let token = f.token("lab");
    let config = dir.join("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[server]\nurl = {:?}\ndevice_id = \"gw-app\"\npoll_interval = \"200ms\"\nenroll_token_file = {:?}\n",
            f.url,
            token.to_str().unwrap()
        ),
    )
    .unwrap();
    // A second device of the group, of the same hardware, has no `web`.
    let plain = device_of(&dir, "gw-plain", &f.url, &token, "gw-1");
    // Each enrols and tells what it has.
    agent_once(&dir, &dir.join("dev"), 0);
    agent_once(&dir, &plain, 0);
    let devices = f.cmd(&["devices"]);
    assert_eq!(devices.as_array().unwrap().len(), 2, "{devices}");

    let good = app.sim.path(&app.bundle("2.0.0", GOOD, MIGRATE));
    let release = f.upload(&good);
    assert_eq!(
        (release["kind"].as_str(), release["app"].as_str()),
        (Some("app"), Some("web")),
        "{release}"
    );
    // Such a release has no staged step to wait in: a prestaged rollout of it is refused.
    let admin = dir.join("server/admin.token");
    let refused = crate::abide_args(
        &dir,
        &[
            "fleet",
            "--server",
            &f.url,
            "--token-file",
            admin.to_str().unwrap(),
            "rollout",
            "create",
            "--release",
            release["id"].as_str().unwrap(),
            "--stages",
            "100",
            "--group",
            "lab",
            "--prestage",
            "50%",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("prestage"),
        "{stderr}"
    );
    let ro = f.rollout(&release, "100", "lab", &[]);
    assert_eq!(ro["devices"], 1, "{ro}");
    assert_eq!(
        ro["left_out"],
        serde_json::json!([{"reason": "no-app", "devices": 1}]),
        "{ro}"
    );
    agent_once(&dir, &dir.join("dev"), 0);
    assert_eq!(app.version(), "2.0.0");
    assert!(app.services_running());
    let id = ro["id"].as_str().unwrap();
    let status = f.cmd(&["rollout", "status", id]);
    assert_eq!(status["committed"], 1, "{status}");
    // The update ran under a reboot lease, given back once it was reported.
    let audit = f.cmd(&["audit"]);
    let trail: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["actor"] == "device:gw-app")
        .map(|r| {
            let status = r["details"]["status"].as_str().unwrap_or_default();
            format!("{} {status}", r["action"].as_str().unwrap())
        })
        .filter(|a| !a.starts_with("device.enrol"))
        .collect();
    assert_eq!(
        trail,
        [
            "lease.grant ",
            "device.report downloading",
            "device.report committed",
            "lease.release "
        ],
        "{audit}"
    );
    // The OS did not move: the device's version is its OS's.
    let dev = f.cmd(&["devices"]);
    let gw = dev
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "gw-app")
        .unwrap();
    assert_eq!(gw["version"], "1.0.0", "{dev}");

    // A release whose health check fails: rolled back, data back byte for byte, reported so.
    let with_data = app.data();
    let bad = app.sim.path(&app.bundle("2.1.0", BAD, MIGRATE));
    // Each later release, rolled out to the one device.
    let roll_out = |bundle: &Path| {
        f.rollout(
            &f.upload(bundle),
            "100",
            "lab",
            &["--failure-threshold", "50%"],
        )
    };
    let first_failing = |ro: &Value| {
        f.cmd(&["rollout", "status", ro["id"].as_str().unwrap()])["failing"][0].clone()
    };
    let ro = roll_out(&bad);
    agent_once(&dir, &dir.join("dev"), 0);
    assert_eq!(app.version(), "2.0.0");
    assert!(app.services_running());
    assert_eq!(
        app.data(),
        with_data,
        "the data is the backup's, byte for byte"
    );
    let failing = first_failing(&ro);
    assert_eq!(failing["state"], "rolled_back", "{failing}");
    let reason = failing["reason"].as_str().unwrap();
    assert!(
        reason.contains("step health failed") && reason.contains("data restored from the backup"),
        "{reason}"
    );
    // Not tried again on the next rounds.
    let last = app.status()["transaction"]["id"].clone();
    agent_once(&dir, &dir.join("dev"), 0);
    assert_eq!(app.status()["transaction"]["id"], last);
    assert_eq!(app.version(), "2.0.0");

    // An older release is refused by the device: reported `failed`, nothing changes.
    let older = app.sim.path(&app.bundle("1.5.0", GOOD, MIGRATE));
    let ro = roll_out(&older);
    agent_once(&dir, &dir.join("dev"), 0);
    assert_eq!(first_failing(&ro)["state"], "failed");
    assert_eq!(app.status()["transaction"]["id"], last);
    assert_eq!(app.version(), "2.0.0");

    // The agent killed while the migration runs: its next start puts 2.0.0 and its data back
    // and reports the update rolled back, interrupted.
    let with_data = app.data();
    let slow = "sleep 30\n";
    let slow = app.sim.path(&app.bundle("2.2.0", GOOD, slow));
    let ro = roll_out(&slow);
    // In its own process group, which is killed whole with the migration it runs.
    let mut agent = Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(["agent", "--once", "--config", "dev/system.toml"])
        .current_dir(&dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::schedule::wait("the migration to run", || {
        app.status()["transaction"]["step"] == "switched"
    });
    kill_tree(agent.id());
    let _ = agent.wait();
    agent_once(&dir, &dir.join("dev"), 0);
    assert_eq!(app.version(), "2.0.0");
    assert!(app.services_running());
    assert_eq!(app.data(), with_data);
    let failing = first_failing(&ro);
    let reason = failing["reason"].as_str().unwrap_or_default();
    assert_eq!(failing["state"], "rolled_back", "{failing}");
    assert!(
        reason.starts_with("interrupted while switched")
            && reason.contains("data restored from the backup"),
        "{reason}"
    );
}
