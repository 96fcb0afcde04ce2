//! Durations as people write them, the same in every flag and configuration key: jiff's
//! friendly format (`90s`, `1h30m`, `500ms`, `2d`, `1.5h`; a day is 24 hours) or bare seconds
//! (`90`, `0.5`).

use std::time::Duration;

/// A duration that does not parse, or is negative.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "duration {0:?}: expected seconds (90, 0.5) or a duration with units (90s, 1h30m, 500ms, 7d)"
)]
pub struct DurationError(pub String);

/// Parses `text` into a non-negative duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError(text.to_owned());
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let seconds: f64 = t.parse().map_err(|_| bad())?;
        return Duration::try_from_secs_f64(seconds).map_err(|_| bad());
    }
    // A span, so that days count (as 24 hours: a duration here is elapsed time).
    let span: jiff::Span = t.parse().map_err(|_| bad())?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|_| bad())?;
    if d.is_negative() {
        return Err(bad());
    }
    Duration::try_from(d).map_err(|_| bad())
}

/// [`parse`], in whole seconds: a fraction of a second is refused.
pub fn parse_secs(text: &str) -> Result<u64, DurationError> {
    let d = parse(text)?;
    if d.subsec_nanos() != 0 {
        return Err(DurationError(text.to_owned()));
    }
    Ok(d.as_secs())
}
