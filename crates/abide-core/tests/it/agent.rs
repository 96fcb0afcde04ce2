//! The agent's round as a table: (trial, applications, transaction, schedules, windows, fleet)
//! → the one command it carries out next. Each line is a situation the daemon meets; several
//! are reached today only end to end (a cancelled schedule's staged target, an operator's
//! schedule holding the fleet back, a trial whose process is gone).

use abide_core::agent::{
    Answer, Apps, By, Command, Fleet, Situation, TrialView, Wait, Windows, follow, next,
};
use abide_core::fleet::{Lease, Offer, WindowState};
use abide_core::schedule::{Origin, Rollback, Schedule, ScheduleState, Source, When};
use abide_core::selfupdate::TrialState;
use abide_core::{FailReason, Transaction, TxState};
use abide_fleet_json::AssignedAction;
use expect_test::expect;

use crate::{at, tx};

fn schedule(id: &str, when: When, origin: Origin, state: ScheduleState) -> Schedule {
    let mut s = Schedule::new(
        id,
        Source::parse("https://updates.example.net/gw.abide").unwrap(),
        None,
        when,
        Rollback::Automatic,
        origin,
        at(0),
    )
    .unwrap();
    if let ScheduleState::InProgress { transaction } = &state {
        s.transaction = transaction.clone();
    }
    s.state = state;
    s
}

fn in_progress(origin: Origin, when: When, transaction: Option<&str>) -> Schedule {
    schedule(
        "s1",
        when,
        origin,
        ScheduleState::InProgress {
            transaction: transaction.map(str::to_owned),
        },
    )
}

fn fleet_origin() -> Origin {
    Origin::Fleet {
        rollout: "ro-1".into(),
    }
}

/// One situation: every field has a quiet default, the case names what differs.
#[derive(Clone)]
struct Case {
    trial: Option<TrialView>,
    apps: Apps,
    tx: Option<Transaction>,
    schedules: Vec<Schedule>,
    windows: Windows,
    fleet: Option<Option<(Option<Offer>, WindowState, Lease)>>,
}

impl Default for Case {
    fn default() -> Case {
        Case {
            trial: None,
            apps: Apps::Settled,
            tx: None,
            schedules: Vec::new(),
            windows: Windows::None,
            fleet: None,
        }
    }
}

fn offer(version: &str) -> Option<Offer> {
    Some(Offer {
        release_id: format!("r-{version}"),
        rollout_id: "ro-1".into(),
        version: version.parse().unwrap(),
        kind: AssignedAction::Install,
        part: abide_core::fleet::Part::Os,
    })
}

fn run(c: &Case) -> Command {
    let running: semver::Version = "1.0.0".parse().unwrap();
    let fleet = match &c.fleet {
        None => Fleet::Absent,
        Some(None) => Fleet::Unknown,
        Some(Some((offer, window, lease))) => Fleet::Answered(Answer {
            offer: offer.as_ref(),
            group_window: *window,
            quarantined: false,
            lease: *lease,
            part: None,
        }),
    };
    next(&Situation {
        now: at(10),
        trial: c.trial,
        apps: c.apps,
        running: &running,
        transaction: c.tx.as_ref(),
        schedules: &c.schedules,
        app_transaction: None,
        windows: c.windows,
        fleet,
    })
}

#[test]
fn the_order_of_work_in_a_round() {
    let trying = |alive| {
        Some(TrialView {
            state: TrialState::Trying,
            alive,
        })
    };
    let ended = Some(TrialView {
        state: TrialState::Failed,
        alive: false,
    });
    let downloading = Some(tx("2.0.0", TxState::Downloading));
    let staged = Some(tx("2.0.0", TxState::Staged));
    let committed = Some(tx("2.0.0", TxState::Committed { at: at(5) }));
    let activated = Some(tx("2.0.0", TxState::Activated { tries: 1 }));
    let operator_staged = vec![in_progress(Origin::Operator, When::Now, Some("tx-1"))];
    let operator_in_window = vec![in_progress(Origin::Operator, When::InWindow, Some("tx-1"))];
    let fleet_staged = vec![in_progress(fleet_origin(), When::Now, Some("tx-1"))];
    let pending_now = vec![schedule(
        "s2",
        When::Now,
        Origin::Operator,
        ScheduleState::Pending,
    )];
    let pending_later = vec![schedule(
        "s2",
        When::At(at(20)),
        Origin::Operator,
        ScheduleState::Pending,
    )];
    let pending_in_window = vec![schedule(
        "s2",
        When::InWindow,
        Origin::Operator,
        ScheduleState::Pending,
    )];
    let cancelled = vec![schedule(
        "s1",
        When::Now,
        Origin::Operator,
        ScheduleState::Cancelled {
            transaction: Some("tx-1".into()),
        },
    )];
    let answered = |o: Option<Offer>, lease| Some(Some((o, WindowState::Open, lease)));
    let group_closed = Some(Some((offer("2.0.0"), WindowState::Closed, Lease::Held)));
    #[rustfmt::skip]
    let cases: Vec<(&str, Case)> = vec![
        ("nothing, no fleet", Case::default()),
        ("nothing, fleet not asked yet", Case { fleet: Some(None), ..Case::default() }),
        ("new agent on trial, its process alive", Case { trial: trying(true), tx: downloading.clone(), apps: Apps::Interrupted, fleet: Some(None), ..Case::default() }),
        ("new agent on trial, its process gone", Case { trial: trying(false), apps: Apps::Interrupted, ..Case::default() }),
        ("trial ended", Case { trial: ended, apps: Apps::Interrupted, ..Case::default() }),
        ("an application update interrupted", Case { apps: Apps::Interrupted, tx: downloading.clone(), ..Case::default() }),
        ("a download a stopped agent left", Case { tx: downloading.clone(), schedules: cancelled.clone(), ..Case::default() }),
        ("the cancelled schedule's target is staged", Case { tx: staged.clone(), schedules: cancelled.clone(), fleet: answered(offer("2.0.0"), Lease::Held), ..Case::default() }),
        ("a schedule in progress, its transaction committed", Case { tx: committed.clone(), schedules: operator_staged.clone(), ..Case::default() }),
        ("a schedule in progress that never began", Case { schedules: vec![in_progress(Origin::Operator, When::Now, None)], ..Case::default() }),
        ("operator's schedule staged", Case { tx: staged.clone(), schedules: operator_staged.clone(), fleet: Some(None), ..Case::default() }),
        ("operator's schedule staged for a closed window", Case { tx: staged.clone(), schedules: operator_in_window.clone(), windows: Windows::Closed, ..Case::default() }),
        ("operator's schedule staged for an open window", Case { tx: staged.clone(), schedules: operator_in_window.clone(), windows: Windows::Open, ..Case::default() }),
        ("operator's schedule for a window, device has none", Case { tx: staged.clone(), schedules: operator_in_window.clone(), windows: Windows::None, ..Case::default() }),
        ("operator's schedule waits for its window, fleet not asked", Case { tx: staged.clone(), schedules: operator_in_window.clone(), windows: Windows::Closed, fleet: Some(None), ..Case::default() }),
        ("operator's schedule on trial, fleet offers another", Case { tx: activated.clone(), schedules: operator_staged.clone(), fleet: answered(offer("3.0.0"), Lease::Held), ..Case::default() }),
        ("a due schedule", Case { schedules: pending_now.clone(), fleet: answered(offer("3.0.0"), Lease::None), ..Case::default() }),
        ("a due schedule after a commit", Case { tx: committed.clone(), schedules: pending_now.clone(), ..Case::default() }),
        ("a due schedule while a trial runs", Case { tx: activated.clone(), schedules: pending_now.clone(), ..Case::default() }),
        ("a schedule for later", Case { schedules: pending_later.clone(), ..Case::default() }),
        ("a schedule for the window, window open", Case { schedules: pending_in_window.clone(), windows: Windows::Open, ..Case::default() }),
        ("a schedule for the window, no windows", Case { schedules: pending_in_window.clone(), windows: Windows::None, ..Case::default() }),
        ("fleet: a new release", Case { fleet: answered(offer("2.0.0"), Lease::None), ..Case::default() }),
        ("fleet: staged, no lease", Case { tx: staged.clone(), schedules: fleet_staged.clone(), fleet: answered(offer("2.0.0"), Lease::None), ..Case::default() }),
        ("fleet: staged, lease held", Case { tx: staged.clone(), schedules: fleet_staged.clone(), fleet: answered(offer("2.0.0"), Lease::Held), ..Case::default() }),
        ("fleet: staged, own windows closed", Case { tx: staged.clone(), schedules: fleet_staged.clone(), windows: Windows::Closed, fleet: answered(offer("2.0.0"), Lease::Held), ..Case::default() }),
        ("fleet: staged, group window closed", Case { tx: staged.clone(), schedules: fleet_staged.clone(), windows: Windows::Open, fleet: group_closed, ..Case::default() }),
        ("fleet: staged, another version offered", Case { tx: staged.clone(), schedules: fleet_staged.clone(), fleet: answered(offer("3.0.0"), Lease::None), ..Case::default() }),
        ("fleet: committed, lease held", Case { tx: committed.clone(), fleet: answered(offer("2.0.0"), Lease::Held), ..Case::default() }),
    ];
    let mut out = String::new();
    for (what, case) in &cases {
        out.push_str(&format!("{what} => {:?}\n", run(case)));
    }
    expect![[r#"
        nothing, no fleet => Wait(Nothing)
        nothing, fleet not asked yet => CheckIn
        new agent on trial, its process alive => Wait(AgentOnTrial)
        new agent on trial, its process gone => FailTrial
        trial ended => SettleTrial
        an application update interrupted => RecoverApps
        a download a stopped agent left => Abandon(Interrupted)
        the cancelled schedule's target is staged => Abandon(Cancelled)
        a schedule in progress, its transaction committed => Follow
        a schedule in progress that never began => Follow
        operator's schedule staged => Activate(Schedule("s1"))
        operator's schedule staged for a closed window => Wait(Nothing)
        operator's schedule staged for an open window => Activate(Schedule("s1"))
        operator's schedule for a window, device has none => Wait(Nothing)
        operator's schedule waits for its window, fleet not asked => CheckIn
        operator's schedule on trial, fleet offers another => Wait(Schedule)
        a due schedule => Start("s2")
        a due schedule after a commit => Start("s2")
        a due schedule while a trial runs => Wait(Nothing)
        a schedule for later => Wait(Nothing)
        a schedule for the window, window open => Start("s2")
        a schedule for the window, no windows => Wait(Nothing)
        fleet: a new release => Stage
        fleet: staged, no lease => AskLease
        fleet: staged, lease held => Activate(Fleet)
        fleet: staged, own windows closed => Wait(Window)
        fleet: staged, group window closed => Wait(Window)
        fleet: staged, another version offered => Abandon(Cancelled)
        fleet: committed, lease held => ReleaseLease
    "#]]
    .assert_eq(&out);
    // The fleet's own table is the last word once the device has nothing of its own to do.
    let c = Case {
        fleet: answered(offer("2.0.0"), Lease::None),
        ..Case::default()
    };
    assert_eq!(run(&c), Command::Stage);
    assert_eq!(
        run(&Case {
            tx: staged.clone(),
            schedules: operator_staged,
            ..Case::default()
        }),
        Command::Activate(By::Schedule("s1".into()))
    );
    assert_eq!(
        run(&Case {
            trial: trying(true),
            ..Case::default()
        }),
        Command::Wait(Wait::AgentOnTrial)
    );
    assert_eq!(
        run(&Case {
            tx: downloading,
            ..Case::default()
        }),
        Command::Abandon(FailReason::Interrupted)
    );
}

#[test]
fn a_schedule_follows_what_carries_it_out_and_one_that_never_began_fails() {
    let mut out = String::new();
    let cases: Vec<(&str, Schedule, Option<Transaction>)> = vec![
        (
            "staged",
            in_progress(Origin::Operator, When::Now, Some("tx-1")),
            Some(tx("2.0.0", TxState::Staged)),
        ),
        (
            "committed",
            in_progress(Origin::Operator, When::Now, Some("tx-1")),
            Some(tx("2.0.0", TxState::Committed { at: at(3) })),
        ),
        (
            "withdrawn",
            in_progress(fleet_origin(), When::Now, Some("tx-1")),
            Some(tx(
                "2.0.0",
                TxState::Failed {
                    reason: FailReason::Cancelled,
                },
            )),
        ),
        (
            "another transaction",
            in_progress(Origin::Operator, When::Now, Some("tx-0")),
            Some(tx("2.0.0", TxState::Committed { at: at(3) })),
        ),
        (
            "never began",
            in_progress(Origin::Operator, When::Now, None),
            None,
        ),
        (
            "pending",
            schedule("s1", When::Now, Origin::Operator, ScheduleState::Pending),
            Some(tx("2.0.0", TxState::Committed { at: at(3) })),
        ),
    ];
    for (what, mut s, t) in cases {
        follow(&mut s, t.as_ref(), None, at(9));
        out.push_str(&format!("{what} => {:?} {:?}\n", s.state, s.transaction));
    }
    expect![[r#"
        staged => InProgress { transaction: Some("tx-1") } Some("tx-1")
        committed => Completed Some("tx-1")
        withdrawn => Cancelled { transaction: Some("tx-1") } Some("tx-1")
        another transaction => InProgress { transaction: Some("tx-0") } Some("tx-0")
        never began => Failed { reason: "interrupted by a restart before the install began" } None
        pending => Pending None
    "#]]
    .assert_eq(&out);
}
