//! The crash matrix (I6, I7): the install and the boot step are cut short at every crash
//! point (a process abort, as a power loss), then the simulated device is powered on and
//! must converge — booting a good group, the transaction committed, rolled back, or failed
//! before activation with the old group untouched — with its state file and audit log
//! intact, and the same bundle installable again. Then the same with `kill -9` at random
//! moments (200 runs with ABIDE_SLOW_TESTS=1, 20 otherwise).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abide_bundle::Digest;
use serde_json::Value;

use crate::device::{Sim, field};
use crate::json;

const ABIDE: &str = env!("CARGO_BIN_EXE_abide");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs abide in `dir` with crash settings; returns whether it exited normally.
fn run(dir: &Path, args: &[&str], env: &[(&str, String)]) -> bool {
    let mut cmd = Command::new(ABIDE);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.status().unwrap().code().is_some()
}

fn trace(dir: &Path, args: &[&str]) -> Vec<String> {
    let file = dir.join("trace.txt");
    let _ = std::fs::remove_file(&file);
    assert!(run(
        dir,
        args,
        &[("ABIDE_CRASH_TRACE", file.display().to_string())]
    ));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    text.lines().map(str::to_owned).collect()
}

fn slot_a(dir: &Path) -> Digest {
    Digest::of(&std::fs::read(dir.join("dev/slots/rootfs.A.img")).unwrap())
}

/// Powers the crashed device on and checks I1–I8; returns the final state.
fn recover_and_check(
    dir: &Path,
    slot_a_before: Digest,
    counter_before: u64,
    force_reinstall: bool,
) -> String {
    let v = json(dir, "sim reboot dev", 0);
    let cycles = v["cycles"].as_array().unwrap().len();
    assert!(
        cycles <= 3,
        "converged within 3 power cycles, took {cycles}: {v}"
    );
    let s = &v["status"];
    let state = field(s, "state").to_owned();
    let booted = field(s, "booted");
    assert_eq!(
        booted,
        field(s, "good"),
        "the device runs its known-good group: {s}"
    );
    // I1: group A was the fallback throughout and was never written.
    assert_eq!(
        slot_a(dir),
        slot_a_before,
        "the known-good group was written ({state})"
    );
    match state.as_str() {
        "committed" => {
            assert_eq!((booted, field(s, "version")), ("B", "2.0.0"));
            assert_eq!(s["security_version"], 2, "the counter rose at commit");
        }
        "idle" | "failed" | "rolled_back" => {
            assert_eq!((booted, field(s, "version")), ("A", "1.0.0"), "{s}");
            assert_eq!(
                s["security_version"], counter_before,
                "I4: no commit, no counter change"
            );
            if state == "rolled_back" {
                assert!(
                    s["quarantine"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|q| q == "2.0.0"),
                    "I8: {s}"
                );
            }
        }
        other => panic!("the device did not converge: {other} {s}"),
    }
    // I5, I6: the state file parses (status above) and the audit log verifies.
    json(dir, "log verify --config dev/system.toml", 0);
    // The next install of the same bundle still succeeds (forced past a quarantine).
    if state != "committed" {
        let cmd = if force_reinstall || state == "rolled_back" {
            "install 2.0.0.abide --force --config dev/system.toml"
        } else {
            "install 2.0.0.abide --config dev/system.toml"
        };
        json(dir, cmd, 0);
        let v = json(dir, "sim reboot dev", 0);
        assert_eq!(field(&v["status"], "state"), "committed", "{v}");
    }
    state
}

fn setup() -> (Sim, PathBuf) {
    let sim = Sim::new(Some("true"));
    sim.bundle("2.0.0", 2, 21);
    let template = sim.path("template");
    copy_dir(&sim.path("dev"), &template.join("dev"));
    std::fs::copy(sim.path("2.0.0.abide"), template.join("2.0.0.abide")).unwrap();
    (sim, template)
}

#[test]
fn a_crash_at_every_point_of_an_install_or_a_boot_converges() {
    let (sim, template) = setup();
    let cases = sim.path("cases");
    let before = slot_a(&template);

    // The durable steps of an install, and of the power-on that follows it.
    let install_points = trace(
        &copy_to(&template, &cases.join("trace-install")),
        &["install", "2.0.0.abide", "--config", "dev/system.toml"],
    );
    let installed = cases.join("trace-boot");
    copy_to(&template, &installed);
    assert!(run(
        &installed,
        &["install", "2.0.0.abide", "--config", "dev/system.toml"],
        &[]
    ));
    let boot_points = trace(&installed, &["sim", "reboot", "dev"]);
    assert!(
        install_points.len() >= 20 && boot_points.len() >= 10,
        "{install_points:?} {boot_points:?}"
    );

    let mut outcomes = std::collections::BTreeMap::new();
    for (k, point) in install_points.iter().enumerate() {
        let dir = copy_to(&template, &cases.join(format!("install-{k}")));
        let finished = run(
            &dir,
            &["install", "2.0.0.abide", "--config", "dev/system.toml"],
            &[("ABIDE_CRASH_AT", k.to_string())],
        );
        assert!(!finished, "crash point {k} ({point}) was not reached");
        let state = recover_and_check(&dir, before, 0, false);
        assert_ne!(
            state, "rolled_back",
            "a crash during the install is not a failed trial ({point})"
        );
        *outcomes.entry(format!("install → {state}")).or_insert(0) += 1;
    }
    for (k, point) in boot_points.iter().enumerate() {
        let dir = copy_to(&template, &cases.join(format!("boot-{k}")));
        assert!(run(
            &dir,
            &["install", "2.0.0.abide", "--config", "dev/system.toml"],
            &[]
        ));
        let finished = run(
            &dir,
            &["sim", "reboot", "dev"],
            &[("ABIDE_CRASH_AT", k.to_string())],
        );
        assert!(
            !finished,
            "crash point {k} ({point}) of the boot was not reached"
        );
        let state = recover_and_check(&dir, before, 0, true);
        *outcomes.entry(format!("boot → {state}")).or_insert(0) += 1;
    }
    eprintln!(
        "crash matrix: {} install points and {} boot points, outcomes {outcomes:?}",
        install_points.len(),
        boot_points.len()
    );
}

fn copy_to(template: &Path, dir: &Path) -> PathBuf {
    copy_dir(template, dir);
    dir.to_owned()
}

#[test]
fn kill_9_at_random_moments_converges() {
    let runs = if std::env::var_os("ABIDE_SLOW_TESTS").is_some() {
        200
    } else {
        20
    };
    let (sim, template) = setup();
    let before = slot_a(&template);
    // How long an install takes here, to spread the kills over it.
    let timing = copy_to(&template, &sim.path("timing"));
    let start = Instant::now();
    assert!(run(
        &timing,
        &["install", "2.0.0.abide", "--config", "dev/system.toml"],
        &[]
    ));
    let span = start.elapsed().as_micros() as u64 + 1;
    let mut rng = abide_testkit::SplitMix(99);
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..runs {
        let dir = copy_to(&template, &sim.path(&format!("kill-{i}")));
        let mut child = Command::new(ABIDE)
            .args(["install", "2.0.0.abide", "--config", "dev/system.toml"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.next_u64() % (span + span / 4)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let state = recover_and_check(&dir, before, 0, false);
        let killed = if status.code().is_some() {
            "finished"
        } else {
            "killed"
        };
        *outcomes.entry(format!("{killed} → {state}")).or_insert(0) += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let _: Option<Value> = None;
    eprintln!("kill -9: {runs} runs over {span} µs installs, outcomes {outcomes:?}");
}
