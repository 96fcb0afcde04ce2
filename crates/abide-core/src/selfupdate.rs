//! The agent's self-update trial as a state machine: a new agent binary is put in place and
//! run; a watchdog started from the previous binary gives it until a deadline to answer on its
//! API socket. The record (`STATE_DIR/self-update.json`, kept by the agent) moves
//!
//! ```text
//!   begin ──▶ trying ──commit (it answered)──────────────────▶ committed ──settle──▶ (removed)
//!               │
//!               └──fail (it exited, missed the deadline, ──▶ failed ─────settle──▶ (removed)
//!                        or could not be put in place)
//! ```
//!
//! A transition asked for where it may not start is refused and changes nothing. What the
//! watchdog does at each look ([`Trial::watch`]) and what the agent does with a record it finds
//! ([`Trial::settle`]) are decisions made here; the agent carries them out.

use std::path::PathBuf;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The trial's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Where it is.
    pub state: TrialState,
    /// The agent's version before.
    pub from: String,
    /// The version tried.
    pub to: String,
    /// The binary replaced.
    pub binary: PathBuf,
    /// The process that runs the new binary.
    pub pid: u32,
    /// When the new binary was put in place.
    pub since: Timestamp,
    /// How long the new agent has to answer, in seconds.
    pub deadline: u64,
    /// The agent's arguments (the previous binary is started with them again).
    pub args: Vec<String>,
    /// The schedule that asked for it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where a trial is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialState {
    /// The new agent runs; the watchdog waits for it to answer.
    Trying,
    /// The new agent answered in time: it stays.
    Committed,
    /// The previous binary was put back.
    Failed,
}

impl TrialState {
    /// Its name, as the record spells it.
    pub fn name(self) -> &'static str {
        match self {
            TrialState::Trying => "trying",
            TrialState::Committed => "committed",
            TrialState::Failed => "failed",
        }
    }
}

/// What the watchdog saw at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// The new agent answered `Status` from the trial's process, started after the switch.
    pub answered: bool,
    /// The trial's process runs (a zombie does not).
    pub alive: bool,
}

/// What the watchdog does after a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// Not decided yet: look again.
    Wait,
    /// The new agent stays: [`Trial::commit`].
    Commit,
    /// The new agent is gone: put the previous binary back and [`Trial::fail`].
    Fail(String),
    /// The deadline passed: record the reason, kill the new agent, then as [`Watch::Fail`].
    Kill(String),
}

/// What the agent records when it settles an ended trial, and what becomes of the schedule
/// that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The audit record's event: `self-update-commit` or `self-update-failed`.
    pub event: &'static str,
    /// Whether the new version is now the agent's (`STATE_DIR/agent.json`).
    pub kept: bool,
    /// The schedule to end, and how: `None` completes it, `Some(reason)` fails it.
    pub schedule: Option<(String, Option<String>)>,
}

/// Why a trial fails when its process is gone and no one said why.
pub const EXITED: &str = "the new agent exited before it answered on its API socket";

impl Trial {
    /// A trial of version `to` just put in place, run by process `pid`.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        from: &str,
        to: &str,
        binary: PathBuf,
        pid: u32,
        since: Timestamp,
        deadline: u64,
        args: Vec<String>,
        schedule: Option<String>,
    ) -> Trial {
        Trial {
            state: TrialState::Trying,
            from: from.to_owned(),
            to: to.to_owned(),
            binary,
            pid,
            since,
            deadline: deadline.max(1),
            args,
            schedule,
            reason: None,
        }
    }

    /// When the new agent must have answered.
    pub fn deadline_at(&self) -> Timestamp {
        self.since + SignedDuration::from_secs(i64::try_from(self.deadline).unwrap_or(i64::MAX))
    }

    /// The new agent answered in time: it stays.
    pub fn commit(&mut self) -> Result<()> {
        self.expect("commit")?;
        self.state = TrialState::Committed;
        Ok(())
    }

    /// The new agent did not come up (`reason` says how); the previous binary is back.
    pub fn fail(&mut self, reason: &str) -> Result<()> {
        self.expect("fail")?;
        self.state = TrialState::Failed;
        self.reason = Some(reason.to_owned());
        Ok(())
    }

    /// The watchdog's decision after a look at `now`: an answer commits, a process gone fails,
    /// a deadline passed kills; otherwise it waits.
    pub fn watch(&self, seen: Seen, now: Timestamp) -> Watch {
        if self.state != TrialState::Trying {
            return Watch::Wait;
        }
        if seen.answered {
            Watch::Commit
        } else if !seen.alive {
            Watch::Fail(EXITED.to_owned())
        } else if now > self.deadline_at() {
            Watch::Kill(format!(
                "the new agent did not answer on its API socket within {}s; it was killed",
                self.deadline
            ))
        } else {
            Watch::Wait
        }
    }

    /// Whether the trial is under way in a process that is gone without a verdict (the
    /// watchdog did not finish): it is failed with the reason recorded, if any.
    pub fn orphaned(&self, alive: bool) -> Option<String> {
        (self.state == TrialState::Trying && !alive)
            .then(|| self.reason.clone().unwrap_or_else(|| EXITED.to_owned()))
    }

    /// What the agent records for an ended trial before it removes the record.
    pub fn settle(&self) -> Result<Settlement> {
        let kept = match self.state {
            TrialState::Committed => true,
            TrialState::Failed => false,
            TrialState::Trying => {
                return Err(Error::InvalidTrialTransition {
                    transition: "settle",
                    state: self.state.name(),
                });
            }
        };
        Ok(Settlement {
            event: if kept {
                "self-update-commit"
            } else {
                "self-update-failed"
            },
            kept,
            schedule: self.schedule.clone().map(|id| {
                let failed = (!kept).then(|| {
                    self.reason
                        .clone()
                        .unwrap_or_else(|| "the new agent did not come up".to_owned())
                });
                (id, failed)
            }),
        })
    }

    fn expect(&self, transition: &'static str) -> Result<()> {
        if self.state == TrialState::Trying {
            Ok(())
        } else {
            Err(Error::InvalidTrialTransition {
                transition,
                state: self.state.name(),
            })
        }
    }
}
