//! The health verdict policy (DESIGN "Health gate"): from the latest result of every check,
//! the time the trial began and the current time, decide commit, roll back or wait.

use jiff::{SignedDuration, Timestamp};

use crate::transaction::RollbackReason;

/// Whether a failing check rolls back at once or only degrades the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criticality {
    /// A failure rolls back at once.
    Critical,
    /// A failure marks the device degraded; degraded past the grace period rolls back.
    NonCritical,
}

/// The latest outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// It passed.
    Pass,
    /// It failed (after its retries), with what it said.
    Fail(String),
    /// It has not finished (still within its retries).
    Pending,
}

/// One check's latest result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name from the configuration.
    pub name: String,
    /// Whether it is critical.
    pub criticality: Criticality,
    /// Its latest outcome.
    pub outcome: CheckOutcome,
}

/// The gate's time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// After this long from the trial's first boot, an undecided gate rolls back (default 5 min).
    pub deadline: SignedDuration,
    /// A degraded trial rolls back after this long (default 2 min).
    pub grace: SignedDuration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            deadline: SignedDuration::from_mins(5),
            grace: SignedDuration::from_mins(2),
        }
    }
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed.
    Commit,
    /// Roll back, for this reason.
    RollBack(RollbackReason),
    /// Not decided yet; `degraded_since` is when non-critical failures began, if they did.
    Wait {
        /// Since when the device is degraded.
        degraded_since: Option<Timestamp>,
    },
}

/// Decides the trial: a critical failure rolls back at once; all passing commits; failing
/// non-critical checks degrade the device, and degraded past `grace` rolls back; anything
/// still undecided at `deadline` after `since` rolls back.
pub fn verdict(
    policy: &HealthPolicy,
    since: Timestamp,
    degraded_since: Option<Timestamp>,
    results: &[CheckResult],
    now: Timestamp,
) -> Verdict {
    if let Some((check, detail)) = results
        .iter()
        .find_map(|r| match (&r.criticality, &r.outcome) {
            (Criticality::Critical, CheckOutcome::Fail(detail)) => {
                Some((r.name.clone(), detail.clone()))
            }
            _ => None,
        })
    {
        return Verdict::RollBack(RollbackReason::HealthCheck { check, detail });
    }
    if results.iter().all(|r| r.outcome == CheckOutcome::Pass) {
        return Verdict::Commit;
    }
    let degraded: Vec<String> = results
        .iter()
        .filter(|r| matches!(r.outcome, CheckOutcome::Fail(_)))
        .map(|r| r.name.clone())
        .collect();
    let degraded_since = if degraded.is_empty() {
        None
    } else {
        Some(degraded_since.unwrap_or(now))
    };
    if let Some(start) = degraded_since
        && now.duration_since(start) >= policy.grace
    {
        return Verdict::RollBack(RollbackReason::Degraded { checks: degraded });
    }
    if now.duration_since(since) >= policy.deadline {
        return Verdict::RollBack(RollbackReason::Deadline);
    }
    Verdict::Wait { degraded_since }
}
