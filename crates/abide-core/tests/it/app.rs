//! Application transactions (`abide_core::app`): the order of the steps, what a failure at
//! each one restores, and how a restart carries an interrupted one on.

use abide_core::Result;
use abide_core::app::{AppRelease, AppStep, AppTransaction};
use abide_core::schedule::{Origin, Rollback, Schedule, ScheduleState, Source, When};
use jiff::Timestamp;

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn release(v: &str, dir: &str) -> AppRelease {
    AppRelease {
        version: Some(v.parse().unwrap()),
        dir: dir.into(),
    }
}

fn update() -> AppTransaction {
    AppTransaction::update(
        "app-1-2.0.0",
        "web",
        release("2.0.0", "app-1-2.0.0"),
        Some(release("1.0.0", "app-0-1.0.0")),
        2,
        t(0),
    )
}

/// Runs `steps` of the happy path, then fails; returns the step it ends on after the
/// restore and the release that runs.
fn fail_after(steps: usize) -> (AppStep, Option<String>) {
    let mut tx = update();
    let path: [fn(&mut AppTransaction) -> Result<()>; 5] = [
        |tx| tx.stopped(t(1)),
        |tx| tx.backed_up("web-1", t(2)),
        |tx| tx.switched(t(3)),
        |tx| tx.migrated(t(4)),
        |tx| tx.started_services(t(5)),
    ];
    for step in &path[..steps] {
        step(&mut tx).unwrap();
    }
    tx.fail("health: down", t(6)).unwrap();
    tx.restored(t(7)).unwrap();
    (tx.step.clone(), tx.outcome().map(|r| r.dir.clone()))
}

#[test]
fn a_failure_before_the_switch_leaves_the_data_and_one_after_it_restores_the_backup() {
    let ends: Vec<_> = (0..=5).map(fail_after).collect();
    let previous = Some("app-0-1.0.0".to_owned());
    assert_eq!(
        ends,
        vec![
            (AppStep::Failed, previous.clone()),
            (AppStep::Failed, previous.clone()),
            (AppStep::Failed, previous.clone()),
            (AppStep::RolledBack, previous.clone()),
            (AppStep::RolledBack, previous.clone()),
            (AppStep::RolledBack, previous),
        ]
    );
}

#[test]
fn steps_go_in_order_and_a_refused_one_changes_nothing() {
    let mut tx = update();
    let before = tx.clone();
    assert!(tx.switched(t(1)).is_err(), "no switch before the backup");
    assert!(tx.commit(t(1)).is_err());
    assert!(tx.restored(t(1)).is_err(), "nothing is being restored");
    assert_eq!(tx, before);
    let mut given_up = tx.clone();
    given_up.abandon("cancelled", t(1)).unwrap();
    assert_eq!(given_up.step, AppStep::Failed);
    assert_eq!(given_up.outcome().unwrap().dir, "app-0-1.0.0");
    tx.stopped(t(1)).unwrap();
    tx.backed_up("web-3", t(2)).unwrap();
    tx.switched(t(3)).unwrap();
    tx.migrated(t(4)).unwrap();
    tx.started_services(t(5)).unwrap();
    assert!(
        tx.abandon("late", t(6)).is_err(),
        "only a staged update is abandoned"
    );
    tx.commit(t(6)).unwrap();
    assert_eq!(tx.outcome().unwrap().dir, "app-1-2.0.0");
    assert_eq!(tx.backup.as_deref(), Some("web-3"));
    let done = tx.clone();
    assert!(tx.fail("late", t(7)).is_err(), "a committed update stays");
    assert!(!tx.recover(t(7)));
    assert_eq!(tx, done);
}

#[test]
fn a_restart_fails_an_interrupted_step_and_goes_on_with_a_restore() {
    let mut tx = update();
    tx.stopped(t(1)).unwrap();
    tx.backed_up("web-1", t(2)).unwrap();
    tx.switched(t(3)).unwrap();
    assert!(tx.recover(t(4)));
    assert_eq!(tx.step, AppStep::Restoring { data: true });
    assert_eq!(tx.reason.as_deref(), Some("interrupted while switched"));
    assert!(!tx.recover(t(5)), "restoring goes on as it is");
    tx.restored(t(6)).unwrap();
    assert_eq!(tx.step, AppStep::RolledBack);

    let mut restore = AppTransaction::restore(
        "app-9-restore",
        "web",
        "web-1",
        release("1.0.0", "app-0-1.0.0"),
        Some(release("2.0.0", "app-1-2.0.0")),
        "operator request",
        t(0),
    );
    assert!(!restore.recover(t(1)));
    assert_eq!(restore.restore_to().unwrap().dir, "app-0-1.0.0");
    restore.restored(t(2)).unwrap();
    assert_eq!(restore.step, AppStep::Restored);
    assert_eq!(restore.outcome().unwrap().dir, "app-0-1.0.0");
}

#[test]
fn the_record_keeps_its_field_names() {
    let mut tx = update();
    tx.stopped(t(1)).unwrap();
    tx.fail("stop: exit status 1", t(2)).unwrap();
    let v = serde_json::to_value(&tx).unwrap();
    assert_eq!(v["step"], "restoring");
    assert_eq!(v["data"], false);
    assert_eq!(v["op"], "update");
    assert_eq!(v["release"]["dir"], "app-1-2.0.0");
    assert_eq!(v["previous"]["version"], "1.0.0");
    let back: AppTransaction = serde_json::from_value(v).unwrap();
    assert_eq!(back, tx);
}
#[test]
fn a_schedule_follows_its_application_transaction_to_its_end() {
    let mut s = Schedule::new(
        "s1",
        Source::parse("/srv/web-2.abide").unwrap(),
        None,
        When::Now,
        Rollback::Automatic,
        Origin::Operator,
        t(0),
    )
    .unwrap();
    s.start(t(1)).unwrap();
    let mut tx = update();
    s.follow_app(t(2), &tx);
    assert_eq!(
        s.state,
        ScheduleState::InProgress {
            transaction: Some("app-1-2.0.0".into())
        }
    );
    tx.stopped(t(3)).unwrap();
    tx.backed_up("web-1", t(3)).unwrap();
    tx.switched(t(3)).unwrap();
    tx.fail("migration: exit status: 1", t(4)).unwrap();
    tx.restored(t(5)).unwrap();
    s.follow_app(t(6), &tx);
    assert_eq!(
        s.state,
        ScheduleState::RolledBack {
            reason: "migration: exit status: 1".into()
        }
    );
    assert_eq!(s.transaction.as_deref(), Some("app-1-2.0.0"));
}
