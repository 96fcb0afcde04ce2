//! Scenarios through the transaction state machine, one line per step:
//! `step => state [actions]`, or `step => refused: why`. A refused step changes nothing.

use abide_core::transaction::BootPolicy;
use abide_core::{BootReport, FailReason, Group, RollbackReason, Transaction, TxState, Verdict};
use expect_test::{Expect, expect};

use crate::at;

enum Step {
    Staged,
    Activate,
    Boot(&'static str),
    Health(Verdict),
    MarkGood,
    Rollback,
    Fail,
    Cancel,
    /// The operator decides the trial (`--no-auto-rollback`).
    Manual,
}

fn check(steps: &[Step], expect: Expect) {
    let (mut tx, actions) = Transaction::begin(
        "tx-1",
        "2.0.0".parse().unwrap(),
        7,
        Group::new("A").unwrap(),
        Group::new("B").unwrap(),
        at(0),
    )
    .unwrap();
    let mut out = format!("begin => {} {actions:?}\n", tx.state.name());
    let policy = BootPolicy::default();
    for (i, step) in steps.iter().enumerate() {
        let now = at(i as i64 + 1);
        let before = tx.clone();
        let (label, result) = match step {
            Step::Staged => ("staged".to_owned(), tx.staged(now)),
            Step::Activate => ("activate".to_owned(), tx.activate(now, policy)),
            Step::Boot(g) => {
                // As the bootloader holds it: the target is bootable from activation until a
                // rollback.
                let target_bootable = matches!(
                    tx.state,
                    TxState::Activated { .. } | TxState::Trial { .. } | TxState::Committed { .. }
                );
                let report = BootReport {
                    booted: Group::new(g).unwrap(),
                    target_bootable,
                };
                (format!("boot {g}"), tx.booted(now, &report, policy))
            }
            Step::Health(v) => (format!("health {v:?}"), tx.health(now, v.clone())),
            Step::MarkGood => ("mark-good".to_owned(), tx.mark_good(now)),
            Step::Rollback => ("rollback".to_owned(), tx.rollback(now, "by hand")),
            Step::Fail => (
                "fail".to_owned(),
                tx.fail(
                    now,
                    FailReason::Io {
                        detail: "disk full".into(),
                    },
                ),
            ),
            Step::Cancel => ("cancel".to_owned(), tx.cancel(now)),
            Step::Manual => {
                tx.gate = abide_core::Gate::Manual;
                ("manual gate".to_owned(), Ok(Vec::new()))
            }
        };
        match result {
            Ok(actions) => out.push_str(&format!("{label} => {} {actions:?}\n", tx.state.name())),
            Err(e) => {
                assert_eq!(tx, before, "a refused step changed the transaction");
                out.push_str(&format!("{label} => refused: {e}\n"));
            }
        }
    }
    if let abide_core::TxState::RolledBack { reason } = &tx.state {
        out.push_str(&format!("reason: {reason}\n"));
    }
    expect.assert_eq(&out);
}

#[test]
fn a_healthy_update_commits_and_raises_the_counter_only_then() {
    check(
        &[
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::Health(Verdict::Commit),
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial [RunHealthGate]
            health Commit => committed [MarkGood { group: Group("B") }, RaiseSecurityVersion { to: 7 }]
        "#]],
    );
}

#[test]
fn a_failed_critical_check_rolls_back_and_quarantines() {
    check(
        &[
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::Health(Verdict::RollBack(RollbackReason::HealthCheck {
                check: "api".into(),
                detail: "exit status 1".into(),
            })),
            Step::Boot("A"),
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial [RunHealthGate]
            health RollBack(HealthCheck { check: "api", detail: "exit status 1" }) => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "health check api failed: exit status 1" }, Reboot]
            boot A => rolled_back []
            reason: health check api failed: exit status 1
        "#]],
    );
}

#[test]
fn a_system_that_never_boots_is_rolled_back_by_the_bootloader() {
    // The trial group panics before user space; the bootloader's counter runs out and it boots
    // A. The agent only learns of it on A, and needs no reboot.
    check(
        &[Step::Staged, Step::Activate, Step::Boot("A")],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot A => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "the new system did not boot; the bootloader fell back" }]
            reason: the new system did not boot; the bootloader fell back
        "#]],
    );
}

#[test]
fn a_trial_that_keeps_rebooting_is_a_boot_loop() {
    check(
        &[
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::Boot("B"),
            Step::Boot("B"),
            Step::Boot("B"),
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial [RunHealthGate]
            boot B => trial [RunHealthGate]
            boot B => trial [RunHealthGate]
            boot B => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "boot loop: the new system booted 4 times without a verdict" }, Reboot]
            reason: boot loop: the new system booted 4 times without a verdict
        "#]],
    );
}

#[test]
fn a_manual_trial_waits_for_the_operator_and_the_boot_counter_still_ends_a_loop() {
    check(
        &[
            Step::Manual,
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::MarkGood,
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            manual gate => downloading []
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial []
            mark-good => committed [MarkGood { group: Group("B") }, RaiseSecurityVersion { to: 7 }]
        "#]],
    );
    check(
        &[
            Step::Manual,
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::Boot("B"),
            Step::Boot("B"),
            Step::Boot("B"),
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            manual gate => downloading []
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial []
            boot B => trial []
            boot B => trial []
            boot B => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "boot loop: the new system booted 4 times without a verdict" }, Reboot]
            reason: boot loop: the new system booted 4 times without a verdict
        "#]],
    );
    check(
        &[Step::Manual, Step::Staged, Step::Activate, Step::Boot("A")],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            manual gate => downloading []
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot A => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "the new system did not boot; the bootloader fell back" }]
            reason: the new system did not boot; the bootloader fell back
        "#]],
    );
}

#[test]
fn a_restart_during_the_install_fails_it_without_touching_the_good_group() {
    check(
        &[Step::Boot("A"), Step::Activate, Step::Staged],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            boot A => failed []
            activate => refused: cannot activate a transaction that is failed
            staged => refused: cannot stage a transaction that is failed
        "#]],
    );
}

#[test]
fn a_bootloader_one_step_ahead_of_the_state_file_converges() {
    // A crash after the bootloader was told to try B but before the state file said so: the
    // target boots while the transaction still says staged, and the trial goes on from there.
    let (mut tx, _) = Transaction::begin(
        "tx-2",
        "2.0.0".parse().unwrap(),
        7,
        Group::new("A").unwrap(),
        Group::new("B").unwrap(),
        at(0),
    )
    .unwrap();
    tx.staged(at(1)).unwrap();
    let mut ahead = tx.clone();
    let report = BootReport {
        booted: Group::new("B").unwrap(),
        target_bootable: true,
    };
    assert_eq!(
        ahead.booted(at(2), &report, BootPolicy::default()).unwrap(),
        [abide_core::Action::RunHealthGate]
    );
    assert_eq!(ahead.state.name(), "trial");
    // The same crash, and the trial then failed to boot: the bootloader fell back to A.
    let mut fell_back = tx.clone();
    let report = BootReport {
        booted: Group::new("A").unwrap(),
        target_bootable: true,
    };
    fell_back
        .booted(at(2), &report, BootPolicy::default())
        .unwrap();
    assert_eq!(
        fell_back.state,
        abide_core::TxState::RolledBack {
            reason: RollbackReason::BootFailed
        }
    );
    // A crash before activation reached the bootloader: the install was interrupted.
    let report = BootReport {
        booted: Group::new("A").unwrap(),
        target_bootable: false,
    };
    tx.booted(at(2), &report, BootPolicy::default()).unwrap();
    assert_eq!(
        tx.state,
        abide_core::TxState::Failed {
            reason: FailReason::Interrupted
        }
    );
}

#[test]
fn transitions_out_of_order_are_refused_and_change_nothing() {
    check(
        &[
            Step::Activate,
            Step::Health(Verdict::Commit),
            Step::MarkGood,
            Step::Rollback,
            Step::Staged,
            Step::Staged,
            Step::Health(Verdict::Commit),
            Step::Activate,
            Step::Fail,
            Step::Cancel,
            Step::Boot("B"),
            Step::MarkGood,
            Step::MarkGood,
            Step::Rollback,
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            activate => refused: cannot activate a transaction that is downloading
            health Commit => refused: cannot apply a health verdict to a transaction that is downloading
            mark-good => refused: cannot mark good a transaction that is downloading
            rollback => refused: cannot roll back a transaction that is downloading
            staged => staged []
            staged => refused: cannot stage a transaction that is staged
            health Commit => refused: cannot apply a health verdict to a transaction that is staged
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            fail => refused: cannot fail a transaction that is activated
            cancel => refused: cannot fail a transaction that is activated
            boot B => trial [RunHealthGate]
            mark-good => committed [MarkGood { group: Group("B") }, RaiseSecurityVersion { to: 7 }]
            mark-good => refused: cannot mark good a transaction that is committed
            rollback => refused: cannot roll back a transaction that is committed
        "#]],
    );
}

#[test]
fn operators_can_cancel_fail_and_roll_back() {
    check(
        &[Step::Cancel],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            cancel => failed []
        "#]],
    );
    check(
        &[Step::Staged, Step::Fail],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            fail => failed []
        "#]],
    );
    check(
        &[Step::Staged, Step::Activate, Step::Rollback],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            rollback => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "operator: by hand" }]
            reason: operator: by hand
        "#]],
    );
    check(
        &[
            Step::Staged,
            Step::Activate,
            Step::Boot("B"),
            Step::Health(Verdict::Wait {
                degraded_since: None,
            }),
            Step::Rollback,
        ],
        expect![[r#"
            begin => downloading [MarkUnbootable { group: Group("B") }]
            staged => staged []
            activate => activated [TryNext { group: Group("B"), tries: 1 }, Reboot]
            boot B => trial [RunHealthGate]
            health Wait { degraded_since: None } => trial []
            rollback => rolled_back [MarkUnbootable { group: Group("B") }, Quarantine { version: Version { major: 2, minor: 0, patch: 0 }, reason: "operator: by hand" }, Reboot]
            reason: operator: by hand
        "#]],
    );
}

#[test]
fn the_known_good_group_is_never_the_target() {
    let a = Group::new("A").unwrap();
    let err =
        Transaction::begin("tx", "1.0.0".parse().unwrap(), 0, a.clone(), a, at(0)).unwrap_err();
    assert_eq!(err.code(), "invalid-transition");
    for bad in ["", "a/b", "..", "seventeen-chars-x", "a b"] {
        assert_eq!(Group::new(bad).unwrap_err().code(), "bad-name", "{bad:?}");
    }
}

#[test]
fn the_state_file_form_round_trips() {
    let (mut tx, _) = Transaction::begin(
        "tx-9",
        "1.2.3".parse().unwrap(),
        2,
        Group::new("A").unwrap(),
        Group::new("B").unwrap(),
        at(0),
    )
    .unwrap();
    tx.staged(at(1)).unwrap();
    tx.activate(at(2), BootPolicy::default()).unwrap();
    tx.booted(
        at(3),
        &BootReport {
            booted: Group::new("B").unwrap(),
            target_bootable: true,
        },
        BootPolicy::default(),
    )
    .unwrap();
    let json = serde_json::to_string(&tx).unwrap();
    expect![[r#"{"id":"tx-9","version":"1.2.3","security_version":2,"good":"A","target":"B","started":"2026-12-23T04:26:40Z","updated":"2026-12-23T04:29:40Z","state":"trial","since":"2026-12-23T04:29:40Z","boots":1,"degraded_since":null}"#]]
        .assert_eq(&json);
    let back: Transaction = serde_json::from_str(&json).unwrap();
    assert_eq!(back, tx);
    assert!(serde_json::from_str::<Transaction>(&json.replace("\"B\"", "\"../B\"")).is_err());
}
