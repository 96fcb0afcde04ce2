//! The health verdict policy as a table.

use abide_core::{CheckOutcome, CheckResult, Criticality, HealthPolicy, Verdict, verdict};
use expect_test::expect;

use crate::at;

fn check(name: &str, critical: bool, outcome: &str) -> CheckResult {
    CheckResult {
        name: name.to_owned(),
        criticality: if critical {
            Criticality::Critical
        } else {
            Criticality::NonCritical
        },
        outcome: match outcome {
            "pass" => CheckOutcome::Pass,
            "pending" => CheckOutcome::Pending,
            other => CheckOutcome::Fail(other.to_owned()),
        },
    }
}

/// Checks as (name, critical, outcome), degraded since minute, now minute.
type Row = (
    &'static [(&'static str, bool, &'static str)],
    Option<i64>,
    i64,
);

#[test]
fn verdicts() {
    // (checks as name:critical:outcome, degraded since minute, now minute) → verdict.
    // The trial began at minute 0; deadline 5 min, grace 2 min.
    let table: &[Row] = &[
        (&[], None, 0),
        (&[("api", true, "pass"), ("disk", false, "pass")], None, 1),
        (&[("api", true, "exit 1"), ("disk", false, "pass")], None, 1),
        (
            &[("api", true, "pending"), ("disk", false, "pass")],
            None,
            1,
        ),
        (
            &[("api", true, "pending"), ("disk", false, "pass")],
            None,
            5,
        ),
        (&[("api", true, "pass"), ("disk", false, "full")], None, 1),
        (
            &[("api", true, "pass"), ("disk", false, "full")],
            Some(1),
            2,
        ),
        (
            &[("api", true, "pass"), ("disk", false, "full")],
            Some(1),
            3,
        ),
        (
            &[("api", true, "pending"), ("disk", false, "pass")],
            Some(1),
            2,
        ),
        (
            &[("api", true, "exit 1"), ("disk", false, "full")],
            Some(0),
            9,
        ),
    ];
    let mut out = String::new();
    for (checks, degraded, now) in table {
        let results: Vec<_> = checks.iter().map(|&(n, c, o)| check(n, c, o)).collect();
        let v = verdict(
            &HealthPolicy::default(),
            at(0),
            degraded.map(at),
            &results,
            at(*now),
        );
        let shown = match v {
            Verdict::Wait { degraded_since } => {
                format!(
                    "wait, degraded since minute {:?}",
                    degraded_since.map(|t| (t.as_second() - at(0).as_second()) / 60)
                )
            }
            other => format!("{other:?}"),
        };
        out.push_str(&format!(
            "{checks:?} degraded {degraded:?} at {now} => {shown}\n"
        ));
    }
    expect![[r#"
        [] degraded None at 0 => Commit
        [("api", true, "pass"), ("disk", false, "pass")] degraded None at 1 => Commit
        [("api", true, "exit 1"), ("disk", false, "pass")] degraded None at 1 => RollBack(HealthCheck { check: "api", detail: "exit 1" })
        [("api", true, "pending"), ("disk", false, "pass")] degraded None at 1 => wait, degraded since minute None
        [("api", true, "pending"), ("disk", false, "pass")] degraded None at 5 => RollBack(Deadline)
        [("api", true, "pass"), ("disk", false, "full")] degraded None at 1 => wait, degraded since minute Some(1)
        [("api", true, "pass"), ("disk", false, "full")] degraded Some(1) at 2 => wait, degraded since minute Some(1)
        [("api", true, "pass"), ("disk", false, "full")] degraded Some(1) at 3 => RollBack(Degraded { checks: ["disk"] })
        [("api", true, "pending"), ("disk", false, "pass")] degraded Some(1) at 2 => wait, degraded since minute None
        [("api", true, "exit 1"), ("disk", false, "full")] degraded Some(0) at 9 => RollBack(HealthCheck { check: "api", detail: "exit 1" })
    "#]]
    .assert_eq(&out);
}
