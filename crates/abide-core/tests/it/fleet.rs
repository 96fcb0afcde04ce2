//! The device's side of the fleet as a table: (offer, transaction, window, lease) → next step.

use abide_core::fleet::{
    Assigned, Lease, Ledger, Offer, Part, PartView, Step, View, WindowState, app_outcome, decide,
    decide_part, device_state, report, status,
};
use abide_core::{FailReason, RollbackReason, Transaction, TxState};
use abide_fleet_json::{AssignedAction, ReportStatus};
use expect_test::expect;

use crate::{at, tx};

fn offer(version: &str, kind: AssignedAction) -> Offer {
    Offer {
        release_id: format!("r-{version}"),
        rollout_id: "ro-1".into(),
        version: version.parse().unwrap(),
        kind,
        part: Part::Os,
    }
}

#[test]
fn the_next_step_for_every_kind_of_situation() {
    use AssignedAction::{Install, Rollback as RollBack, Stage};
    use TxState::*;
    let trial = Trial {
        since: at(1),
        boots: 1,
        degraded_since: None,
    };
    let refused = Failed {
        reason: FailReason::Refused {
            code: "bad-signature".into(),
            detail: "x".into(),
        },
    };
    let broke = Failed {
        reason: FailReason::Io {
            detail: "connection reset".into(),
        },
    };
    let rolled = RolledBack {
        reason: RollbackReason::BootFailed,
    };
    let (open, closed) = (WindowState::Open, WindowState::Closed);
    let (none, held) = (Lease::None, Lease::Held);
    type Case = (
        &'static str,
        Option<Offer>,
        Option<Transaction>,
        bool,
        WindowState,
        Lease,
    );
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("nothing assigned, nothing going on", None, None, false, open, none),
        ("assigned the running version", Some(offer("1.0.0", Install)), None, false, open, none),
        ("assigned a new version", Some(offer("2.0.0", Install)), None, false, closed, none),
        ("assigned a quarantined version", Some(offer("2.0.0", Install)), None, true, open, none),
        ("new version after an older commit", Some(offer("2.0.0", Install)), Some(tx("1.5.0", Committed { at: at(1) })), false, open, none),
        ("a download a stopped agent left", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Downloading)), false, open, none),
        ("staged, window closed", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Staged)), false, closed, none),
        ("staged, window open, no lease", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Staged)), false, open, none),
        ("staged, window open, lease held", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Staged)), false, open, held),
        ("staged, window closed, lease held", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Staged)), false, closed, held),
        ("staged, assignment withdrawn", None, Some(tx("2.0.0", Staged)), false, open, none),
        ("staged another version than assigned", Some(offer("3.0.0", Install)), Some(tx("2.0.0", Staged)), false, open, none),
        ("activated: rebooting", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Activated { tries: 1 })), false, open, held),
        ("on trial", Some(offer("2.0.0", Install)), Some(tx("2.0.0", trial.clone())), false, open, held),
        ("on trial, fleet rolls it back", Some(offer("2.0.0", RollBack)), Some(tx("2.0.0", trial.clone())), false, open, held),
        ("on trial, rollback of another version", Some(offer("1.9.0", RollBack)), Some(tx("2.0.0", trial.clone())), false, open, held),
        ("committed, lease held", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Committed { at: at(2) })), false, open, held),
        ("rolled back, lease held", Some(offer("2.0.0", Install)), Some(tx("2.0.0", rolled.clone())), true, open, held),
        ("rolled back, lease given back", Some(offer("2.0.0", Install)), Some(tx("2.0.0", rolled.clone())), true, open, none),
        ("bundle refused before", Some(offer("2.0.0", Install)), Some(tx("2.0.0", refused.clone())), false, open, none),
        ("download broke off before", Some(offer("2.0.0", Install)), Some(tx("2.0.0", broke.clone())), false, open, none),
        ("download stopped by a withdrawal, offered again", Some(offer("2.0.0", Install)), Some(tx("2.0.0", Failed { reason: FailReason::Cancelled })), false, open, none),
        ("fleet rollback, not on trial", Some(offer("2.0.0", RollBack)), None, false, open, none),
        ("prestage: not staged yet", Some(offer("2.0.0", Stage)), None, false, open, none),
        ("prestage: staged, window open", Some(offer("2.0.0", Stage)), Some(tx("2.0.0", Staged)), false, open, none),
        ("prestage: staged another version", Some(offer("3.0.0", Stage)), Some(tx("2.0.0", Staged)), false, open, none),
        ("prestage: the running version", Some(offer("1.0.0", Stage)), None, false, open, none),
    ];
    let running: semver::Version = "1.0.0".parse().unwrap();
    let mut out = String::new();
    for (what, offer, transaction, quarantined, window, lease) in &cases {
        let step: Step = decide(&View {
            offer: offer.as_ref(),
            running: &running,
            quarantined: *quarantined,
            transaction: transaction.as_ref(),
            window: *window,
            lease: *lease,
        });
        out.push_str(&format!("{what} => {step:?}\n"));
    }
    expect![[r#"
        nothing assigned, nothing going on => Idle
        assigned the running version => Idle
        assigned a new version => Stage
        assigned a quarantined version => Idle
        new version after an older commit => Stage
        a download a stopped agent left => Abandon
        staged, window closed => WaitForWindow
        staged, window open, no lease => AskLease
        staged, window open, lease held => Activate
        staged, window closed, lease held => WaitForWindow
        staged, assignment withdrawn => Idle
        staged another version than assigned => Cancel
        activated: rebooting => Idle
        on trial => Idle
        on trial, fleet rolls it back => RollBack
        on trial, rollback of another version => Idle
        committed, lease held => ReleaseLease
        rolled back, lease held => ReleaseLease
        rolled back, lease given back => Idle
        bundle refused before => Idle
        download broke off before => Stage
        download stopped by a withdrawal, offered again => Stage
        fleet rollback, not on trial => Idle
        prestage: not staged yet => Stage
        prestage: staged, window open => Idle
        prestage: staged another version => Cancel
        prestage: the running version => Idle
    "#]]
    .assert_eq(&out);
}

#[test]
fn every_transaction_state_has_its_report() {
    let mut out = String::new();
    for state in [
        TxState::Downloading,
        TxState::Staged,
        TxState::Activated { tries: 1 },
        TxState::Trial {
            since: at(0),
            boots: 1,
            degraded_since: None,
        },
        TxState::Committed { at: at(1) },
        TxState::Failed {
            reason: FailReason::Cancelled,
        },
        TxState::RolledBack {
            reason: RollbackReason::BootFailed,
        },
    ] {
        let (s, reason) = status(&state);
        let t = tx("2.0.0", state.clone());
        let inventory = device_state(Some(&t));
        out.push_str(&format!(
            "{} => {} {reason:?} (inventory {inventory})\n",
            state.name(),
            s.as_str()
        ));
    }
    out.push_str(&format!("none => (inventory {})\n", device_state(None)));
    expect![[r#"
        downloading => downloading None (inventory downloading)
        staged => staged None (inventory staged)
        activated => rebooting None (inventory activated)
        trial => trial None (inventory trial)
        committed => committed None (inventory committed)
        failed => failed Some("cancelled") (inventory failed)
        rolled_back => rolled_back Some("the new system did not boot; the bootloader fell back") (inventory rolled_back)
        none => (inventory idle)
    "#]]
    .assert_eq(&out);
}

#[test]
fn each_state_of_the_assigned_release_is_reported_once_and_a_withdrawal_not_at_all() {
    let assigned = Assigned {
        version: "2.0.0".into(),
        release_id: "r-2.0.0".into(),
        rollout_id: "ro-1".into(),
        part: Part::Os,
    };
    let mut ledger = Ledger::new();
    ledger.stage(&offer("2.0.0", AssignedAction::Install));
    assert_eq!(ledger.assigned.as_ref(), Some(&assigned));
    let mut out = String::new();
    for state in [
        TxState::Downloading,
        TxState::Staged,
        TxState::Staged,
        TxState::Activated { tries: 1 },
        TxState::Committed { at: at(1) },
    ] {
        let mut t = tx("2.0.0", state);
        t.updated = at(3);
        let queued = ledger.note(Some(&t));
        out.push_str(&format!("{} => {queued}\n", t.state.name()));
    }
    let withdrawn = tx(
        "2.0.0",
        TxState::Failed {
            reason: FailReason::Cancelled,
        },
    );
    out.push_str(&format!("withdrawn => {}\n", ledger.note(Some(&withdrawn))));
    let other = tx("3.0.0", TxState::Staged);
    out.push_str(&format!(
        "another version => {:?}\n",
        report(Some(&other), Some(&assigned), None)
    ));
    for r in &ledger.outbox {
        out.push_str(&format!(
            "#{} {} {:?} {:?}\n",
            r.seq,
            r.status,
            r.release_id.as_deref(),
            r.seconds
        ));
    }
    expect![[r#"
        downloading => false
        staged => true
        staged => false
        activated => true
        committed => true
        withdrawn => false
        another version => None
        #1 downloading Some("r-2.0.0") None
        #2 staged Some("r-2.0.0") Some(180.0)
        #3 rebooting Some("r-2.0.0") None
        #4 committed Some("r-2.0.0") None
    "#]]
    .assert_eq(&out);
}

/// The wire enums' names are one rule for both directions: serde's JSON name, strum's string
/// and the parse of it agree for every value, in snake_case.
#[test]
fn every_wire_name_is_the_same_in_json_in_text_and_back() {
    use abide_fleet_json::{DeviceState, Health, ReportStatus, RolloutState};
    fn check<T>(all: &[T], as_str: fn(T) -> &'static str, parse: fn(&str) -> Option<T>) -> String
    where
        T: Copy + PartialEq + std::fmt::Debug + serde::Serialize,
    {
        all.iter()
            .map(|v| {
                let text = as_str(*v);
                assert_eq!(serde_json::to_string(v).unwrap(), format!("{text:?}"));
                assert_eq!(parse(text), Some(*v));
                text
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
    let names = [
        check(ReportStatus::ALL, ReportStatus::as_str, ReportStatus::parse),
        check(DeviceState::ALL, DeviceState::as_str, DeviceState::parse),
        check(Health::ALL, Health::as_str, Health::parse),
        check(
            AssignedAction::ALL,
            AssignedAction::as_str,
            AssignedAction::parse,
        ),
        check(RolloutState::ALL, RolloutState::as_str, RolloutState::parse),
    ];
    expect![[r#"
        downloading staged rebooting trial committed failed rolled_back
        idle downloading staged activated trial committed rolled_back failed
        healthy degraded unhealthy unknown
        install stage rollback
        waiting prestaging running paused completed aborted rolled_back"#]]
    .assert_eq(&names.join("\n"));
    assert_eq!(ReportStatus::parse("Rolled_Back"), None, "names are exact");
}

#[test]
fn an_application_or_agent_offer_is_carried_out_in_its_window_under_a_lease_where_asked_once() {
    use Lease::{Held, None as NoLease};
    use WindowState::{Closed, Open};
    let app = Offer {
        part: Part::App("web".into()),
        ..offer("2.0.0", AssignedAction::Install)
    };
    let v1: semver::Version = "1.0.0".parse().unwrap();
    let v2: semver::Version = "2.0.0".parse().unwrap();
    let base = PartView {
        offer: &app,
        running: Some(&v1),
        present: true,
        quarantined: false,
        ended: false,
        needs_lease: false,
        os_busy: false,
        window: Open,
        lease: NoLease,
    };
    let staged = AssignedAction::Stage;
    let rollback = AssignedAction::Rollback;
    let stage_offer = Offer {
        kind: staged,
        ..app.clone()
    };
    let rollback_offer = Offer {
        kind: rollback,
        ..app.clone()
    };
    let cases: Vec<(&str, PartView<'_>, Step)> = vec![
        ("due, window open, no lease needed", base, Step::Stage),
        (
            "window closed",
            PartView {
                window: Closed,
                ..base
            },
            Step::WaitForWindow,
        ),
        (
            "needs a lease",
            PartView {
                needs_lease: true,
                ..base
            },
            Step::AskLease,
        ),
        (
            "needs a lease and holds it",
            PartView {
                needs_lease: true,
                lease: Held,
                ..base
            },
            Step::Stage,
        ),
        (
            "already runs it",
            PartView {
                running: Some(&v2),
                ..base
            },
            Step::Idle,
        ),
        (
            "already runs it, lease held",
            PartView {
                running: Some(&v2),
                lease: Held,
                ..base
            },
            Step::ReleaseLease,
        ),
        (
            "never updated",
            PartView {
                running: None,
                ..base
            },
            Step::Stage,
        ),
        (
            "does not have it",
            PartView {
                present: false,
                ..base
            },
            Step::Idle,
        ),
        (
            "rolled back here",
            PartView {
                quarantined: true,
                ..base
            },
            Step::Idle,
        ),
        (
            "ended here",
            PartView {
                ended: true,
                ..base
            },
            Step::Idle,
        ),
        (
            "ended here, lease held",
            PartView {
                ended: true,
                lease: Held,
                ..base
            },
            Step::ReleaseLease,
        ),
        (
            "OS on trial",
            PartView {
                os_busy: true,
                lease: Held,
                ..base
            },
            Step::Idle,
        ),
        (
            "stage only",
            PartView {
                offer: &stage_offer,
                ..base
            },
            Step::Idle,
        ),
        (
            "fleet rollback",
            PartView {
                offer: &rollback_offer,
                ..base
            },
            Step::Idle,
        ),
    ];
    for (what, view, want) in cases {
        assert_eq!(decide_part(&view), want, "{what}");
    }
}

#[test]
fn an_application_update_reports_its_failed_step_and_whether_the_data_came_back() {
    use abide_core::app::{AppOp, AppRelease, AppStep, AppTransaction};
    let tx = |step: AppStep, kind: Option<&str>| AppTransaction {
        id: "a-1".into(),
        op: AppOp::Update,
        app: "web".into(),
        release: AppRelease {
            dir: "2.0.0".into(),
            version: Some("2.0.0".parse().unwrap()),
        },
        previous: None,
        security_version: 0,
        backup: None,
        step,
        reason: kind.map(|_| "check http failed".to_owned()),
        reason_kind: kind.map(str::to_owned),
        started: at(0),
        updated: at(1),
    };
    let seen: Vec<String> = [
        tx(AppStep::Started, None),
        tx(AppStep::Committed, None),
        tx(AppStep::RolledBack, Some("health")),
        tx(AppStep::Failed, Some("backup")),
        tx(AppStep::Failed, Some("abandoned")),
        AppTransaction {
            reason: Some("interrupted while switched".into()),
            ..tx(AppStep::RolledBack, Some("interrupted"))
        },
    ]
    .iter()
    .map(|t| match app_outcome(t) {
        None => format!("{}: none", t.step.name()),
        Some((s, r)) => format!(
            "{}: {} {}",
            t.step.name(),
            s.as_str(),
            r.unwrap_or_default()
        ),
    })
    .collect();
    expect![[r#"
        [
            "started: none",
            "committed: committed ",
            "rolled_back: rolled_back step health failed: check http failed; the previous release runs, its data restored from the backup",
            "failed: rolled_back step backup failed: check http failed; the previous release runs, its data untouched",
            "failed: failed check http failed",
            "rolled_back: rolled_back interrupted while switched; the previous release runs, its data restored from the backup",
        ]
    "#]]
    .assert_debug_eq(&seen);
}

#[test]
fn an_application_or_agent_release_ends_with_one_report_and_the_os_reports_none_for_it() {
    let app = Offer {
        part: Part::App("web".into()),
        ..offer("2.0.0", AssignedAction::Install)
    };
    let mut ledger = Ledger::new();
    ledger.stage(&app);
    assert_eq!(
        ledger.outbox.len(),
        1,
        "the download is reported as it starts"
    );
    // An OS transaction of the same version is not this release's.
    let os = tx("2.0.0", TxState::Staged);
    assert!(!ledger.note(Some(&os)));
    assert!(!ledger.has_ended("r-2.0.0"));
    assert!(ledger.end(ReportStatus::Committed, None));
    assert!(ledger.has_ended("r-2.0.0"));
    assert!(!ledger.end(ReportStatus::Committed, None), "reported once");
    let last = ledger.outbox.last().unwrap();
    assert_eq!(
        (last.seq, last.status, last.release_id.as_deref()),
        (2, ReportStatus::Committed, Some("r-2.0.0"))
    );
    // The OS's releases never end this way: their transaction reports.
    let mut os_ledger = Ledger::new();
    os_ledger.stage(&offer("3.0.0", AssignedAction::Install));
    assert!(!os_ledger.end(ReportStatus::Committed, None));
}

#[test]
fn only_the_assigned_application_or_agent_release_ends_the_ledgers_update() {
    use abide_core::app::{AppOp, AppRelease, AppStep, AppTransaction};
    use abide_core::selfupdate::{Trial, TrialState};
    let app_tx = |app: &str, version: &str, step: AppStep| AppTransaction {
        id: "a-1".into(),
        op: AppOp::Update,
        app: app.into(),
        release: AppRelease {
            dir: version.into(),
            version: Some(version.parse().unwrap()),
        },
        previous: None,
        security_version: 0,
        backup: None,
        step,
        reason: None,
        reason_kind: None,
        started: at(0),
        updated: at(1),
    };
    let mut ledger = Ledger::new();
    ledger.stage(&Offer {
        part: Part::App("web".into()),
        ..offer("2.0.0", AssignedAction::Install)
    });
    assert!(
        !ledger.end_app(&app_tx("db", "2.0.0", AppStep::Committed)),
        "another application"
    );
    assert!(
        !ledger.end_app(&app_tx("web", "1.9.0", AppStep::Committed)),
        "another version"
    );
    assert!(
        !ledger.end_app(&app_tx("web", "2.0.0", AppStep::Started)),
        "still running"
    );
    assert!(ledger.end_app(&app_tx("web", "2.0.0", AppStep::Committed)));
    assert!(
        !ledger.end_app(&app_tx("web", "2.0.0", AppStep::Committed)),
        "once"
    );

    let trial = |to: &str, state: TrialState| Trial {
        state,
        from: "1.0.0".into(),
        to: to.into(),
        binary: "/usr/bin/abide".into(),
        pid: 1,
        since: at(0),
        deadline: 60,
        args: Vec::new(),
        schedule: None,
        reason: Some("exited with status 1".into()),
    };
    let mut ledger = Ledger::new();
    ledger.stage(&Offer {
        part: Part::Agent,
        ..offer("2.0.0", AssignedAction::Install)
    });
    assert!(
        !ledger.end_trial(&trial("2.1.0", TrialState::Failed)),
        "another version"
    );
    assert!(
        !ledger.end_trial(&trial("2.0.0", TrialState::Trying)),
        "still trying"
    );
    assert!(ledger.end_trial(&trial("2.0.0", TrialState::Failed)));
    let last = ledger.outbox.last().unwrap();
    assert_eq!(last.status, ReportStatus::RolledBack);
    assert_eq!(
        last.reason.as_deref(),
        Some("the new agent 2.0.0 did not come up (exited with status 1); agent 1.0.0 runs again")
    );
}
