//! The self-update trial as tables: every transition from every state (a refused one changes
//! nothing), the watchdog's decision at each kind of look, and what settling records.

use abide_core::selfupdate::{Seen, Trial, TrialState, Watch};
use expect_test::expect;

use crate::at;

fn trial(state: TrialState) -> Trial {
    let mut t = Trial::begin(
        "1.0.0",
        "1.1.0",
        "/usr/bin/abide".into(),
        4242,
        at(0),
        60,
        vec!["agent".into()],
        Some("s3".into()),
    );
    t.state = state;
    t
}

const STATES: [TrialState; 3] = [
    TrialState::Trying,
    TrialState::Committed,
    TrialState::Failed,
];

#[test]
fn every_transition_from_every_state() {
    let mut out = String::new();
    for state in STATES {
        for (name, op) in [
            (
                "commit",
                (|t: &mut Trial| t.commit()) as fn(&mut Trial) -> _,
            ),
            ("fail", |t: &mut Trial| t.fail("it exited")),
        ] {
            let mut t = trial(state);
            let before = t.clone();
            let result = op(&mut t);
            match result {
                Ok(()) => out.push_str(&format!(
                    "{} --{name}--> {} {:?}\n",
                    state.name(),
                    t.state.name(),
                    t.reason
                )),
                Err(e) => {
                    assert_eq!(t, before, "a refused transition changes nothing");
                    out.push_str(&format!("{} --{name}--> refused: {e}\n", state.name()));
                }
            }
        }
        let settled = trial(state).settle();
        out.push_str(&format!(
            "{} --settle--> {}\n",
            state.name(),
            match settled {
                Ok(s) => format!("{} kept={} schedule={:?}", s.event, s.kept, s.schedule),
                Err(e) => format!("refused: {e}"),
            }
        ));
    }
    expect![[r#"
        trying --commit--> committed None
        trying --fail--> failed Some("it exited")
        trying --settle--> refused: cannot settle a self-update trial that is trying
        committed --commit--> refused: cannot commit a self-update trial that is committed
        committed --fail--> refused: cannot fail a self-update trial that is committed
        committed --settle--> self-update-commit kept=true schedule=Some(("s3", None))
        failed --commit--> refused: cannot commit a self-update trial that is failed
        failed --fail--> refused: cannot fail a self-update trial that is failed
        failed --settle--> self-update-failed kept=false schedule=Some(("s3", Some("the new agent did not come up")))
    "#]]
    .assert_eq(&out);
}

#[test]
fn the_watchdog_commits_an_answer_fails_an_exit_and_kills_at_the_deadline() {
    let t = trial(TrialState::Trying);
    assert_eq!(t.deadline_at(), at(1));
    let mut out = String::new();
    for (answered, alive, minute) in [
        (true, true, 0),
        (true, true, 5),
        (false, false, 0),
        (false, true, 0),
        (false, true, 1),
        (false, true, 2),
        (true, false, 2),
    ] {
        let w = t.watch(
            Seen { answered, alive },
            at(minute) + jiff::SignedDuration::from_secs(1),
        );
        out.push_str(&format!(
            "answered={answered} alive={alive} minute {minute} => {w:?}\n"
        ));
    }
    for state in [TrialState::Committed, TrialState::Failed] {
        assert_eq!(
            trial(state).watch(
                Seen {
                    answered: false,
                    alive: false
                },
                at(9)
            ),
            Watch::Wait,
            "an ended trial is not watched"
        );
    }
    expect![[r#"
        answered=true alive=true minute 0 => Commit
        answered=true alive=true minute 5 => Commit
        answered=false alive=false minute 0 => Fail("the new agent exited before it answered on its API socket")
        answered=false alive=true minute 0 => Wait
        answered=false alive=true minute 1 => Kill("the new agent did not answer on its API socket within 60s; it was killed")
        answered=false alive=true minute 2 => Kill("the new agent did not answer on its API socket within 60s; it was killed")
        answered=true alive=false minute 2 => Commit
    "#]]
    .assert_eq(&out);
}

#[test]
fn a_trial_whose_process_is_gone_without_a_verdict_is_orphaned() {
    let mut out = String::new();
    for state in STATES {
        for alive in [true, false] {
            let mut t = trial(state);
            out.push_str(&format!(
                "{} alive={alive} => {:?}\n",
                state.name(),
                t.orphaned(alive)
            ));
            t.reason = Some("killed at the deadline".into());
            if let Some(why) = t.orphaned(alive) {
                out.push_str(&format!("  with a reason recorded => {why}\n"));
            }
        }
    }
    expect![[r#"
        trying alive=true => None
        trying alive=false => Some("the new agent exited before it answered on its API socket")
          with a reason recorded => killed at the deadline
        committed alive=true => None
        committed alive=false => None
        failed alive=true => None
        failed alive=false => None
    "#]]
    .assert_eq(&out);
}
