//! Hooks from `[hooks]` in system.toml on a simulated device: a failing or hanging pre-hook
//! stops its step with nothing changed and its output in the error; post-hooks see the
//! transaction in their environment, and their failures are reported without changing the
//! outcome.

use std::time::{Duration, Instant};

use crate::device::{Sim, field};
use crate::json;

/// Appends `[hooks]` with `lines` to the device's system.toml.
fn hooks(sim: &Sim, lines: &str) {
    let path = sim.path("dev/system.toml");
    let mut config = std::fs::read_to_string(&path).unwrap();
    if let Some(at) = config.find("\n[hooks]") {
        config.truncate(at + 1);
    }
    config.push_str(&format!("\n[hooks]\n{lines}\n"));
    std::fs::write(path, config).unwrap();
}

#[test]
fn a_failing_or_hanging_pre_install_hook_refuses_the_install_and_changes_nothing() {
    let sim = Sim::new(None);
    let bundle = sim.bundle("2.0.0", 1, 3);
    hooks(
        &sim,
        r#"pre-install = "echo checking $ABIDE_VERSION from $ABIDE_FROM_VERSION into $ABIDE_TARGET_GROUP; exit 3""#,
    );
    let before = sim.fingerprint();
    let refused = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        1,
    );
    assert_eq!(refused["error"]["code"], "hook-failed", "{refused}");
    let message = field(&refused["error"], "message");
    assert!(
        message.contains("pre-install") && message.contains("checking 2.0.0 from 1.0.0 into B"),
        "{message}"
    );
    assert_eq!(sim.fingerprint(), before);
    let log = std::fs::read_to_string(sim.path("dev/state/audit.log")).unwrap();
    assert!(
        log.contains("\"hook-failed\"") && log.contains("\"refuse\""),
        "{log}"
    );

    // A hook that does not finish is killed at the time limit and counts as failed.
    hooks(&sim, "timeout = \"1s\"\npre-install = \"sleep 30\"");
    let started = Instant::now();
    let refused = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        1,
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(refused["error"]["code"], "hook-failed", "{refused}");
    assert!(
        field(&refused["error"], "message").contains("timed out after 1s"),
        "{refused}"
    );
    assert_eq!(sim.fingerprint(), before);

    // A bad [hooks] section is a configuration error that names the key.
    hooks(&sim, "pre-instal = \"true\"");
    let bad = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        1,
    );
    assert_eq!(bad["error"]["code"], "config", "{bad}");
    assert!(
        field(&bad["error"], "message").contains("pre-instal"),
        "{bad}"
    );
    assert_eq!(sim.fingerprint(), before);
}

#[test]
fn a_failing_pre_reboot_hook_abandons_the_staged_target_unbootable() {
    let sim = Sim::new(None);
    let bundle = sim.bundle("2.0.0", 1, 3);
    hooks(&sim, r#"pre-reboot = "echo not now >&2; exit 4""#);
    let refused = json(
        &sim.dir,
        &format!("install {bundle} --config dev/system.toml"),
        1,
    );
    assert_eq!(refused["error"]["code"], "hook-failed", "{refused}");
    assert!(
        field(&refused["error"], "message").contains("not now"),
        "{refused}"
    );
    let status = sim.status();
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        field(&status, "reason").contains("pre-reboot hook failed"),
        "{status}"
    );
    // The target was never activated: the next power cycle boots the old group.
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (
            field(&v["status"], "booted"),
            field(&v["status"], "version")
        ),
        ("A", "1.0.0")
    );
}

#[test]
fn post_hooks_see_the_transaction_and_their_failures_are_reported_without_changing_the_outcome() {
    let sim = Sim::new(Some("case \"$ABIDE_VERSION\" in 3.*) exit 1;; esac"));
    let v2 = sim.bundle("2.0.0", 1, 3);
    let v3 = sim.bundle("3.0.0", 1, 4);
    let out = sim.path("hooks.log");
    let state_dirs = sim.path("state-dirs.log");
    let record = |hook: &str| {
        format!(
            r#"{hook} = "echo {hook} $ABIDE_HOOK $ABIDE_TRANSACTION $ABIDE_VERSION $ABIDE_FROM_VERSION $ABIDE_TARGET_GROUP $ABIDE_GOOD_GROUP [$ABIDE_REASON] >> {}; echo $ABIDE_STATE_DIR >> {}""#,
            out.display(),
            state_dirs.display()
        )
    };
    hooks(
        &sim,
        &format!(
            "{}\n{}\n{}\n{}\npost-install = \"echo post-install broke; exit 1\"",
            record("pre-install"),
            record("pre-reboot"),
            record("post-commit"),
            record("on-rollback")
        ),
    );
    let done = json(
        &sim.dir,
        &format!("install {v2} --config dev/system.toml"),
        0,
    );
    let tx = field(&done, "transaction").to_owned();
    assert_eq!(done["hooks"][0]["hook"], "post-install", "{done}");
    assert_eq!(done["hooks"][0]["ok"], false, "{done}");
    assert_eq!(done["hooks"][0]["output"], "post-install broke", "{done}");
    assert_eq!(done["state"], "activated", "{done}");
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(field(&v["status"], "state"), "committed");
    // A failing health check rolls 3.0.0 back; on-rollback hears why.
    json(
        &sim.dir,
        &format!("install {v3} --config dev/system.toml"),
        0,
    );
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(field(&v["status"], "state"), "rolled_back", "{v}");
    let log = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 6, "{log}");
    assert_eq!(
        lines[0],
        format!("pre-install pre-install {tx} 2.0.0 1.0.0 B A []")
    );
    assert_eq!(
        lines[1],
        format!("pre-reboot pre-reboot {tx} 2.0.0 1.0.0 B A []")
    );
    assert_eq!(
        lines[2],
        format!("post-commit post-commit {tx} 2.0.0 1.0.0 B A []")
    );
    assert!(lines[3].starts_with("pre-install pre-install tx-"), "{log}");
    assert!(lines[3].ends_with("3.0.0 2.0.0 A B []"), "{log}");
    assert!(lines[5].starts_with("on-rollback on-rollback tx-"), "{log}");
    assert!(
        lines[5].contains("3.0.0") && lines[5].contains("health"),
        "{log}"
    );
    // Each hook was told the state directory, as an absolute path.
    let state_dir = std::fs::canonicalize(sim.path("dev/state")).unwrap();
    let told = std::fs::read_to_string(&state_dirs).unwrap();
    assert_eq!(
        told.lines()
            .map(|l| std::fs::canonicalize(l).unwrap_or_default())
            .collect::<Vec<_>>(),
        vec![state_dir; 6],
        "{told}"
    );
    assert!(told.lines().all(|l| l.starts_with('/')), "{told}");
    let audit = std::fs::read_to_string(sim.path("dev/state/audit.log")).unwrap();
    assert!(
        audit.contains("\"hook-failed\"") && audit.contains("post-install broke"),
        "{audit}"
    );
    // Every run is in the audit log, the ones that passed too: six passed, post-install
    // failed twice.
    let events = |e: &str| audit.matches(&format!("\"event\":\"{e}\"")).count();
    assert_eq!((events("hook"), events("hook-failed")), (6, 2), "{audit}");
}
