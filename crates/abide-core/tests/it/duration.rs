//! One duration syntax everywhere: bare seconds or jiff's friendly format.

use abide_core::duration::{parse, parse_secs};
use abide_core::rollout::parse_duration;
use expect_test::expect;

#[test]
fn durations_parse_the_same_with_units_or_as_bare_seconds() {
    let mut out = String::new();
    for text in [
        "90", "90s", "1m30s", "1h30m", " 2d ", "0.5", "500ms", "1.5h", "0", "0s", "", "-5s", "5x",
        "abc", "1h 30m",
    ] {
        let parsed = match parse(text) {
            Ok(d) => format!("{d:?}"),
            Err(e) => format!("error: {e}"),
        };
        let secs = match parse_secs(text) {
            Ok(s) => s.to_string(),
            Err(_) => "-".into(),
        };
        out.push_str(&format!("{text:?} -> {parsed} | whole seconds {secs}\n"));
    }
    expect![[r#"
        "90" -> 90s | whole seconds 90
        "90s" -> 90s | whole seconds 90
        "1m30s" -> 90s | whole seconds 90
        "1h30m" -> 5400s | whole seconds 5400
        " 2d " -> 172800s | whole seconds 172800
        "0.5" -> 500ms | whole seconds -
        "500ms" -> 500ms | whole seconds -
        "1.5h" -> 5400s | whole seconds 5400
        "0" -> 0ns | whole seconds 0
        "0s" -> 0ns | whole seconds 0
        "" -> error: duration "": expected seconds (90, 0.5) or a duration with units (90s, 1h30m, 500ms, 7d) | whole seconds -
        "-5s" -> error: duration "-5s": expected seconds (90, 0.5) or a duration with units (90s, 1h30m, 500ms, 7d) | whole seconds -
        "5x" -> error: duration "5x": expected seconds (90, 0.5) or a duration with units (90s, 1h30m, 500ms, 7d) | whole seconds -
        "abc" -> error: duration "abc": expected seconds (90, 0.5) or a duration with units (90s, 1h30m, 500ms, 7d) | whole seconds -
        "1h 30m" -> 5400s | whole seconds 5400
    "#]]
    .assert_eq(&out);
    // Stage soaks and the other flags that take whole seconds cap at 366 days.
    assert_eq!(parse_duration("24h"), Ok(86_400));
    assert_eq!(parse_duration("90"), Ok(90));
    assert!(parse_duration("367d").is_err());
    assert!(parse_duration("0.5").is_err());
}
