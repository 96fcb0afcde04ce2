//! Rollout math: stage text, stable places, cumulative stages, and the stage decision table.

use abide_core::rollout::{
    Counts, Decision, Stage, cutoff, decide, parse_duration, parse_percent, parse_stages, place,
};

#[test]
fn stages_parse_as_written_and_bad_ones_say_why() {
    assert_eq!(
        parse_stages("5:24h,25:24h,100").unwrap(),
        [
            Stage {
                percent: 5,
                soak: 86_400
            },
            Stage {
                percent: 25,
                soak: 86_400
            },
            Stage {
                percent: 100,
                soak: 0
            }
        ]
    );
    assert_eq!(
        parse_stages("10%:30m, 100:0s").unwrap(),
        [
            Stage {
                percent: 10,
                soak: 1800
            },
            Stage {
                percent: 100,
                soak: 0
            }
        ]
    );
    for (text, why) in [
        ("", "1 to 20 stages"),
        ("5:24h,,100", "1 to 20 stages"),
        ("5,100", "needs a soak time"),
        ("5:1y,100", "duration"),
        ("0:1h,100", "percentage from 1 to 100"),
        ("50:1h,20:1h,100", "must rise"),
        ("5:1h,50", "must reach 100%"),
        ("101", "percentage from 1 to 100"),
    ] {
        let err = parse_stages(text).unwrap_err().to_string();
        assert!(err.contains(why), "{text:?}: {err}");
    }
    assert_eq!(parse_duration("0s").unwrap(), 0);
    assert_eq!(parse_duration("7d").unwrap(), 604_800);
    assert!(
        parse_duration("-1h").is_err()
            && parse_duration("h").is_err()
            && parse_duration("400d").is_err()
    );
    assert_eq!(parse_percent("10%").unwrap(), 1000);
    assert_eq!(parse_percent("2.5").unwrap(), 250);
    assert!(parse_percent("101%").is_err() && parse_percent("ten").is_err());
}

#[test]
fn places_are_stable_spread_and_stages_cumulative() {
    assert_eq!(place("ro-1", "gw-1"), place("ro-1", "gw-1"));
    assert_ne!(place("ro-1", "gw-1"), place("ro-2", "gw-1"));
    let places: Vec<u64> = (0..10_000)
        .map(|i| place("ro-1", &format!("gw-{i}")))
        .collect();
    assert!(places.iter().all(|p| *p < 1 << 63));
    for percent in [5u8, 25, 50] {
        let n = places.iter().filter(|p| **p < cutoff(percent)).count();
        let want = 100 * usize::from(percent);
        assert!(n.abs_diff(want) < want / 5 + 30, "{percent}%: {n} of 10000");
    }
    // Cumulative: everyone in 5% is in 25%; 100% is everyone.
    assert!(
        places
            .iter()
            .filter(|p| **p < cutoff(5))
            .all(|p| *p < cutoff(25))
    );
    assert_eq!(places.iter().filter(|p| **p < cutoff(100)).count(), 10_000);
}

#[test]
fn the_stage_decision_table() {
    let stages = parse_stages("10:1h,50:0s,100").unwrap();
    let hour = 3_600_000;
    let c = |total, committed, failed| Counts {
        total,
        committed,
        failed,
        ..Counts::default()
    };
    for (index, now, counts, threshold, want) in [
        // Devices still updating: wait, whatever the time.
        (0, 2 * hour, c(10, 9, 0), 1000, Decision::Wait),
        // All done but the soak has not passed.
        (0, hour / 2, c(10, 10, 0), 1000, Decision::Wait),
        // All done and soaked.
        (0, hour, c(10, 10, 0), 1000, Decision::Advance),
        // Failures at the threshold are allowed; one more pauses at once.
        (0, hour, c(10, 9, 1), 1000, Decision::Advance),
        (
            0,
            0,
            c(10, 3, 2),
            1000,
            Decision::Pause("stage 1 (10%): 2 of 10 devices failed (20.0% > 10.0% allowed)".into()),
        ),
        // A stage without devices passes after its soak.
        (0, hour, c(0, 0, 0), 0, Decision::Advance),
        // A zero soak advances as soon as all are done.
        (1, 0, c(50, 50, 0), 0, Decision::Advance),
        // The last stage completes.
        (2, 0, c(100, 99, 0), 1000, Decision::Wait),
        (
            2,
            0,
            Counts {
                total: 100,
                committed: 99,
                skipped: 1,
                ..Counts::default()
            },
            1000,
            Decision::Complete,
        ),
        (3, 0, c(0, 0, 0), 0, Decision::Complete),
        // Failures an operator accepted by resuming count as ended, not against the threshold.
        (
            1,
            0,
            Counts {
                total: 50,
                committed: 45,
                failed: 5,
                accepted: 4,
                ..Counts::default()
            },
            1000,
            Decision::Advance,
        ),
        (
            1,
            0,
            Counts {
                total: 50,
                committed: 40,
                failed: 10,
                accepted: 4,
                ..Counts::default()
            },
            1000,
            Decision::Pause("stage 2 (50%): 6 of 50 devices failed (12.0% > 10.0% allowed)".into()),
        ),
    ] {
        assert_eq!(
            decide(&stages, index, 0, now, counts, threshold),
            want,
            "stage {index} at {now} with {counts:?}"
        );
    }
}
