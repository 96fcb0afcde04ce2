//! Rollout math, shared by the server and its tools: stages, a device's stable place in a
//! rollout's order, and the decision a stage takes from its devices' states. Pure: counts and
//! times in, a decision out.
//!
//! A device's place is the first 63 bits of SHA-256 over the rollout id and the device id, so
//! it never changes and does not depend on which other devices exist. A stage of P percent
//! holds the devices whose place is below P % of 2^63; stages are cumulative, so a device in
//! the 5 % stage is also in the 25 % one.

use serde::{Deserialize, Serialize};

/// One stage: the share of the targeted devices it reaches, and how long it must soak once
/// its devices are done before the next stage starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Cumulative percentage of targeted devices, 1 to 100.
    pub percent: u8,
    /// Soak time in seconds.
    pub soak: u64,
}

/// Why stage or threshold text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// Stage text that does not parse or does not make sense.
    #[error("stages {text:?}: {what}")]
    Stages {
        /// The text.
        text: String,
        /// What is wrong.
        what: String,
    },
    /// A duration that does not parse, or is longer than 366 days.
    #[error("duration {0:?}: expected whole seconds up to 366 days, as 90, 90s, 1h30m, 24h or 7d")]
    Duration(String),
    /// A percentage that does not parse.
    #[error("percentage {0:?}: expected 0 to 100, as 10% or 2.5%")]
    Percent(String),
}

/// Parses a duration of whole seconds up to 366 days (`90`, `90s`, `1h30m`, `24h`, `7d`; see
/// [`crate::duration`]) into seconds.
pub fn parse_duration(text: &str) -> Result<u64, RolloutError> {
    crate::duration::parse_secs(text)
        .ok()
        .filter(|s| *s <= 366 * 86_400)
        .ok_or_else(|| RolloutError::Duration(text.to_owned()))
}

/// Parses `5:24h,25:24h,100`: each stage `PERCENT:SOAK`, the last may omit its soak (0);
/// percentages rise strictly and the last is 100.
pub fn parse_stages(text: &str) -> Result<Vec<Stage>, RolloutError> {
    let bad = |what: String| RolloutError::Stages {
        text: text.to_owned(),
        what,
    };
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    if parts.is_empty() || parts.len() > 20 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad("expected 1 to 20 stages separated by commas".into()));
    }
    let mut stages: Vec<Stage> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let (percent, soak) = match part.split_once(':') {
            Some((p, s)) => (p, parse_duration(s).map_err(|e| bad(e.to_string()))?),
            None if i + 1 == parts.len() => (*part, 0),
            None => {
                return Err(bad(format!(
                    "stage {part:?} needs a soak time, as {part}:24h"
                )));
            }
        };
        let percent: u8 = percent
            .trim()
            .trim_end_matches('%')
            .parse()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| bad(format!("{percent:?} is not a percentage from 1 to 100")))?;
        if stages.last().is_some_and(|s| s.percent >= percent) {
            return Err(bad("percentages must rise from stage to stage".into()));
        }
        stages.push(Stage { percent, soak });
    }
    if stages.last().map(|s| s.percent) != Some(100) {
        return Err(bad("the last stage must reach 100%".into()));
    }
    Ok(stages)
}

/// Parses `10%`, `2.5%` or `10` into basis points (hundredths of a percent).
pub fn parse_percent(text: &str) -> Result<u32, RolloutError> {
    let v: f64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| RolloutError::Percent(text.to_owned()))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(RolloutError::Percent(text.to_owned()));
    }
    Ok((v * 100.0).round() as u32)
}

/// A device's place in a rollout's order: 0 to 2^63 − 1.
pub fn place(rollout: &str, device: &str) -> u64 {
    let d =
        abide_bundle::Digest::of(format!("abide-rollout-order-v1\n{rollout}\n{device}").as_bytes());
    u64::from_be_bytes(d.0[..8].try_into().expect("8 bytes")) >> 1
}

/// The places below this are in a stage of `percent` percent.
pub fn cutoff(percent: u8) -> u64 {
    ((1u128 << 63) * u128::from(percent.min(100)) / 100) as u64
}

/// A stage's devices by how far they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// All devices in the stage (cumulative).
    pub total: u64,
    /// Committed (or already running the release).
    pub committed: u64,
    /// Failed, rolled back, or unresponsive.
    pub failed: u64,
    /// Not to be updated (quarantined for this release).
    pub skipped: u64,
    /// Failures an operator accepted by resuming: they no longer count against the threshold.
    #[serde(default)]
    pub accepted: u64,
}

impl Counts {
    /// Devices that reached an end.
    pub fn terminal(&self) -> u64 {
        self.committed + self.failed + self.skipped
    }
}

/// What a running rollout's current stage does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not yet: devices are still updating or the soak has not passed.
    Wait,
    /// Start the next stage.
    Advance,
    /// The last stage is done: the rollout is complete.
    Complete,
    /// Too many failures: pause, with this reason.
    Pause(String),
}

/// The decision for stage `index` (0-based) of `stages`, started at `started_ms`, at `now_ms`,
/// with `counts` for its devices and the failure threshold in basis points. A stage pauses as
/// soon as its failures (less those an operator accepted) exceed the threshold (of its
/// devices); it advances once every device reached an end and the soak passed.
pub fn decide(
    stages: &[Stage],
    index: usize,
    started_ms: i64,
    now_ms: i64,
    counts: Counts,
    threshold_bp: u32,
) -> Decision {
    let Some(stage) = stages.get(index) else {
        return Decision::Complete;
    };
    let failing = counts.failed.saturating_sub(counts.accepted);
    if counts.total > 0
        && u128::from(failing) * 10_000 > u128::from(threshold_bp) * u128::from(counts.total)
    {
        return Decision::Pause(format!(
            "stage {} ({}%): {} of {} devices failed ({:.1}% > {:.1}% allowed)",
            index + 1,
            stage.percent,
            failing,
            counts.total,
            100.0 * failing as f64 / counts.total as f64,
            f64::from(threshold_bp) / 100.0
        ));
    }
    if counts.terminal() < counts.total {
        return Decision::Wait;
    }
    let soaked = now_ms.saturating_sub(started_ms) >= (stage.soak as i64).saturating_mul(1000);
    match (soaked, index + 1 == stages.len()) {
        (false, _) => Decision::Wait,
        (true, true) => Decision::Complete,
        (true, false) => Decision::Advance,
    }
}
