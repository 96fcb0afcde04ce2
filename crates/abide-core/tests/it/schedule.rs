//! Scenarios through the schedule state machine, one line per step: `step => state`, or
//! `step => refused: why`. A refused step changes nothing.

use abide_core::schedule::{Origin, Rollback, Schedule, ScheduleError, Source, When};
use abide_core::{FailReason, RollbackReason, TxState};
use expect_test::{Expect, expect};

use crate::at;

enum Step {
    /// Asks whether it is due at minute N with the window open or closed.
    Due(i64, bool),
    Start,
    Follow(TxState),
    Fail,
    Cancel(Option<TxState>),
}

fn check(when: When, steps: Vec<Step>, expect: Expect) {
    let mut s = Schedule::new(
        "s-1",
        Source::parse("https://updates.example.net/gw-2.0.0.abide").unwrap(),
        None,
        when,
        Rollback::Automatic,
        Origin::Operator,
        at(0),
    )
    .unwrap();
    let mut out = format!("new => {}\n", s.state.name());
    for (i, step) in steps.into_iter().enumerate() {
        let now = at(i as i64 + 1);
        let before = s.clone();
        let (label, result): (String, Result<String, ScheduleError>) = match step {
            Step::Due(t, open) => (
                format!(
                    "due at minute {t}, window {}",
                    if open { "open" } else { "closed" }
                ),
                Ok(s.due(at(t), open).to_string()),
            ),
            Step::Start => ("start".into(), s.start(now).map(|()| String::new())),
            Step::Follow(tx) => {
                s.follow(now, "tx-9", &tx);
                (format!("follow {}", tx.name()), Ok(String::new()))
            }
            Step::Fail => (
                "fail".into(),
                s.fail(now, "sha256 differs").map(|()| String::new()),
            ),
            Step::Cancel(tx) => (
                format!(
                    "cancel ({})",
                    tx.as_ref().map_or("no transaction", |t| t.name())
                ),
                s.cancel(now, tx.as_ref()).map(|stop| {
                    if stop {
                        "stop the download".into()
                    } else {
                        String::new()
                    }
                }),
            ),
        };
        match result {
            Ok(note) => {
                let detail = match &s.state {
                    abide_core::schedule::ScheduleState::InProgress {
                        transaction: Some(t),
                    } => {
                        format!(" ({t})")
                    }
                    abide_core::schedule::ScheduleState::Failed { reason }
                    | abide_core::schedule::ScheduleState::RolledBack { reason } => {
                        format!(" ({reason})")
                    }
                    _ => String::new(),
                };
                let note = if note.is_empty() {
                    note
                } else {
                    format!(" [{note}]")
                };
                out.push_str(&format!("{label} => {}{detail}{note}\n", s.state.name()));
            }
            Err(e) => {
                assert_eq!(s, before, "a refused step changed the schedule");
                out.push_str(&format!("{label} => refused: {e}\n"));
            }
        }
    }
    expect.assert_eq(&out);
}

#[test]
fn a_schedule_waits_for_its_time_then_follows_its_transaction_to_the_end() {
    check(
        When::At(at(100)),
        vec![
            Step::Due(99, true),
            Step::Due(100, false),
            Step::Start,
            Step::Start,
            Step::Follow(TxState::Downloading),
            Step::Follow(TxState::Activated { tries: 1 }),
            Step::Follow(TxState::Committed { at: at(5) }),
            Step::Due(200, true),
            Step::Cancel(None),
        ],
        expect![[r#"
            new => pending
            due at minute 99, window open => pending [false]
            due at minute 100, window closed => pending [true]
            start => in_progress
            start => refused: cannot start a schedule that is in_progress
            follow downloading => in_progress (tx-9)
            follow activated => in_progress (tx-9)
            follow committed => completed
            due at minute 200, window open => completed [false]
            cancel (no transaction) => refused: cannot cancel a schedule that is completed
        "#]],
    );
}

#[test]
fn in_the_window_only_when_it_is_open_and_rollbacks_and_failures_keep_their_reason() {
    check(
        When::InWindow,
        vec![
            Step::Due(1_000_000, false),
            Step::Due(1, true),
            Step::Start,
            Step::Follow(TxState::RolledBack {
                reason: RollbackReason::BootFailed,
            }),
        ],
        expect![[r#"
            new => pending
            due at minute 1000000, window closed => pending [false]
            due at minute 1, window open => pending [true]
            start => in_progress
            follow rolled_back => rolled_back (the new system did not boot; the bootloader fell back)
        "#]],
    );
    check(
        When::Now,
        vec![
            Step::Due(0, false),
            Step::Start,
            Step::Follow(TxState::Failed {
                reason: FailReason::Io {
                    detail: "disk full".into(),
                },
            }),
            Step::Fail,
        ],
        expect![[r#"
            new => pending
            due at minute 0, window closed => pending [true]
            start => in_progress
            follow failed => failed (I/O: disk full)
            fail => refused: cannot fail a schedule that is failed
        "#]],
    );
    check(
        When::Now,
        vec![Step::Start, Step::Fail],
        expect![[r#"
            new => pending
            start => in_progress
            fail => failed (sha256 differs)
        "#]],
    );
}

#[test]
fn cancelled_before_start_or_mid_download_but_not_once_activated() {
    check(
        When::InWindow,
        vec![Step::Cancel(None), Step::Start],
        expect![[r#"
            new => pending
            cancel (no transaction) => cancelled
            start => refused: cannot start a schedule that is cancelled
        "#]],
    );
    check(
        When::Now,
        vec![
            Step::Start,
            Step::Follow(TxState::Downloading),
            Step::Cancel(Some(TxState::Downloading)),
            Step::Follow(TxState::Failed {
                reason: FailReason::Cancelled,
            }),
        ],
        expect![[r#"
            new => pending
            start => in_progress
            follow downloading => in_progress (tx-9)
            cancel (downloading) => cancelled [stop the download]
            follow failed => cancelled
        "#]],
    );
    check(
        When::Now,
        vec![
            Step::Start,
            Step::Cancel(Some(TxState::Activated { tries: 1 })),
            Step::Follow(TxState::Failed {
                reason: FailReason::Cancelled,
            }),
        ],
        expect![[r#"
            new => pending
            start => in_progress
            cancel (activated) => refused: cannot cancel (it is activated: roll back instead) a schedule that is in_progress
            follow failed => cancelled
        "#]],
    );
}

#[test]
fn sources_and_digests_are_checked_when_a_schedule_is_made() {
    let cases = [
        "https://u.example/x.abide",
        "http://10.0.0.1:8080/x",
        "/data/x.abide",
        "x.abide",
        "ftp://u/x",
        "https://u/a b",
    ];
    let got: Vec<String> = cases
        .iter()
        .map(|c| match Source::parse(c) {
            Ok(s) => format!("{s:?}"),
            Err(e) => e.to_string(),
        })
        .collect();
    expect![[r#"
        [
            "Url(\"https://u.example/x.abide\")",
            "Url(\"http://10.0.0.1:8080/x\")",
            "File(\"/data/x.abide\")",
            "source \"x.abide\": expected an http:// or https:// URL or an absolute file path",
            "source \"ftp://u/x\": expected an http:// or https:// URL or an absolute file path",
            "source \"https://u/a b\": expected an http:// or https:// URL or an absolute file path",
        ]
    "#]]
    .assert_debug_eq(&got);
    let make = |h: &str| {
        Schedule::new(
            "s",
            Source::File("/x".into()),
            Some(h),
            When::Now,
            Rollback::Manual,
            Origin::Fleet {
                rollout: "ro-1".into(),
            },
            at(0),
        )
        .map(|s| s.sha256.unwrap())
    };
    assert_eq!(make(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
    assert_eq!(
        make("abc").unwrap_err().to_string(),
        "sha256 \"abc\": expected 64 hex digits"
    );
    // A schedule survives a round trip through its stored form.
    let s = Schedule::new(
        "s-2",
        Source::Url("https://u/x".into()),
        None,
        When::At(at(5)),
        Rollback::Manual,
        Origin::Operator,
        at(0),
    )
    .unwrap();
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
}
