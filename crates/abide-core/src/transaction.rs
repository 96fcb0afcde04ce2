//! The transaction state machine (DESIGN "Transaction states"): one update attempt on one
//! device, from the first byte written to committed, failed or rolled back.
//!
//! ```text
//! Downloading → Staged → Activated → Trial → Committed
//!      ↘           ↘          ↘         ↘
//!       Failed      Failed     RolledBack(reason)
//! ```
//!
//! Each transition is a method that checks the state it may start from, updates the
//! transaction, and returns the [`Action`]s the agent must take, in order. A refused
//! transition changes nothing. The agent appends every change to the audit log and makes it
//! durable before it performs the actions (I5).

use std::fmt;

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::health::Verdict;

/// A slot group name, such as `A` or `B`: 1 to 16 ASCII letters, digits, `-` or `_`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Group(String);

impl Group {
    /// Validates a group name.
    pub fn new(name: &str) -> Result<Group> {
        let ok = (1..=16).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(Group(name.to_owned()))
        } else {
            Err(Error::BadGroup(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Group {
    type Error = Error;
    fn try_from(s: String) -> Result<Group> {
        Group::new(&s)
    }
}

impl From<Group> for String {
    fn from(g: Group) -> String {
        g.0
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a transaction ended before activation. The target group was never made bootable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FailReason {
    /// The bundle failed a check while it was being installed.
    Refused {
        /// The check's machine code.
        code: String,
        /// What it said.
        detail: String,
    },
    /// Writing the target failed.
    Io {
        /// What failed.
        detail: String,
    },
    /// The device restarted before the install finished.
    Interrupted,
    /// An operator cancelled the install.
    Cancelled,
}

/// Why a trial ended on the known-good group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RollbackReason {
    /// A critical health check failed.
    HealthCheck {
        /// The check.
        check: String,
        /// What it reported.
        detail: String,
    },
    /// Non-critical checks kept failing past the grace period.
    Degraded {
        /// The failing checks.
        checks: Vec<String>,
    },
    /// The health gate was still undecided at its deadline.
    Deadline,
    /// The bootloader fell back to the known-good group: the trial never reached the agent
    /// within its tries (a kernel panic, a hang, a crash before user space).
    BootFailed,
    /// The trial group kept rebooting without a verdict.
    BootLoop {
        /// How many times it booted.
        boots: u32,
    },
    /// An operator rolled back.
    Operator {
        /// The operator's reason.
        reason: String,
    },
}

impl RollbackReason {
    /// Its kind as a word (`health-check`, `degraded`, `deadline`, `boot-failed`,
    /// `boot-loop`, `operator`): the metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            RollbackReason::HealthCheck { .. } => "health-check",
            RollbackReason::Degraded { .. } => "degraded",
            RollbackReason::Deadline => "deadline",
            RollbackReason::BootFailed => "boot-failed",
            RollbackReason::BootLoop { .. } => "boot-loop",
            RollbackReason::Operator { .. } => "operator",
        }
    }
}

/// What ends a trial.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gate {
    /// The health gate commits or rolls back (the default).
    #[default]
    Automatic,
    /// An operator does (`mark-good`, `mark-bad`, `rollback`); the bootloader's boot counter
    /// still ends a trial that does not boot or keeps rebooting.
    Manual,
}

impl Gate {
    fn is_automatic(&self) -> bool {
        *self == Gate::Automatic
    }
}

impl fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RollbackReason::HealthCheck { check, detail } => {
                write!(f, "health check {check} failed: {detail}")
            }
            RollbackReason::Degraded { checks } => {
                write!(f, "degraded past the grace period: {}", checks.join(", "))
            }
            RollbackReason::Deadline => f.write_str("health gate undecided at its deadline"),
            RollbackReason::BootFailed => {
                f.write_str("the new system did not boot; the bootloader fell back")
            }
            RollbackReason::BootLoop { boots } => write!(
                f,
                "boot loop: the new system booted {boots} times without a verdict"
            ),
            RollbackReason::Operator { reason } => write!(f, "operator: {reason}"),
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Refused { code, detail } => write!(f, "refused [{code}]: {detail}"),
            FailReason::Io { detail } => write!(f, "I/O: {detail}"),
            FailReason::Interrupted => f.write_str("interrupted by a restart before activation"),
            FailReason::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Where a transaction is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TxState {
    /// The target is unbootable and content is streaming into it.
    Downloading,
    /// Every component digest verified; the target is still unbootable.
    Staged,
    /// The bootloader will try the target on the next boot(s); the known-good group is the
    /// fallback.
    Activated {
        /// How many boots the bootloader tries.
        tries: u8,
    },
    /// Booted into the target; the health gate decides.
    Trial {
        /// When the trial first booted (the gate's deadline counts from here).
        since: Timestamp,
        /// How many times the target has booted in this trial.
        boots: u32,
        /// Since when non-critical checks have been failing, if they are.
        degraded_since: Option<Timestamp>,
    },
    /// Health passed; the target is the known-good group.
    Committed {
        /// When.
        at: Timestamp,
    },
    /// Ended before activation.
    Failed {
        /// Why.
        reason: FailReason,
    },
    /// The trial failed and the device runs the previous group.
    RolledBack {
        /// Why.
        reason: RollbackReason,
    },
}

impl TxState {
    /// The state's name as `abide status` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            TxState::Downloading => "downloading",
            TxState::Staged => "staged",
            TxState::Activated { .. } => "activated",
            TxState::Trial { .. } => "trial",
            TxState::Committed { .. } => "committed",
            TxState::Failed { .. } => "failed",
            TxState::RolledBack { .. } => "rolled_back",
        }
    }

    /// Whether the transaction has ended.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TxState::Committed { .. } | TxState::Failed { .. } | TxState::RolledBack { .. }
        )
    }
}

/// What the agent must do, in order, after a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Make the group unbootable (before its first byte is written: I2; after a failed trial).
    MarkUnbootable {
        /// The group.
        group: Group,
    },
    /// Have the bootloader try `group` for `tries` boots, the known-good group as fallback.
    TryNext {
        /// The group.
        group: Group,
        /// The boot counter.
        tries: u8,
    },
    /// Make the group the known-good default.
    MarkGood {
        /// The group.
        group: Group,
    },
    /// Raise the anti-rollback counter (only ever at commit: I4).
    RaiseSecurityVersion {
        /// The new counter.
        to: u64,
    },
    /// Quarantine the version (I8).
    Quarantine {
        /// The version.
        version: Version,
        /// Why.
        reason: String,
    },
    /// Run the health gate.
    RunHealthGate,
    /// Restart the machine.
    Reboot,
}

/// What the bootloader says about the boot that just happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootReport {
    /// The group that booted.
    pub booted: Group,
    /// Whether the bootloader holds the target as bootable: it does from activation until a
    /// rollback, and never before activation (I2).
    pub target_bootable: bool,
}

/// Limits on a trial's boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPolicy {
    /// How many boots the bootloader gives the target before it falls back (default 1).
    pub tries: u8,
    /// How many times the target may reach the agent within one trial without a verdict
    /// before the trial counts as a boot loop (default 3).
    pub max_trial_boots: u32,
}

impl Default for BootPolicy {
    fn default() -> Self {
        BootPolicy {
            tries: 1,
            max_trial_boots: 3,
        }
    }
}

/// One update attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// Its id.
    pub id: String,
    /// The version being installed.
    pub version: Version,
    /// Its security version.
    pub security_version: u64,
    /// The known-good group when it began: the fallback, never written (I1).
    pub good: Group,
    /// The group being written and tried.
    pub target: Group,
    /// When it began.
    pub started: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
    /// What ends its trial.
    #[serde(default, skip_serializing_if = "Gate::is_automatic")]
    pub gate: Gate,
    /// Where it is.
    #[serde(flatten)]
    pub state: TxState,
}

impl Transaction {
    /// Begins an install of `version` into `target`; `good` stays the fallback. The first
    /// action makes the target unbootable before anything is written to it (I2).
    pub fn begin(
        id: &str,
        version: Version,
        security_version: u64,
        good: Group,
        target: Group,
        now: Timestamp,
    ) -> Result<(Transaction, Vec<Action>)> {
        if good == target {
            return Err(Error::InvalidTransition {
                transition: "install into the known-good group of",
                state: "idle",
            });
        }
        let tx = Transaction {
            id: id.to_owned(),
            version,
            security_version,
            good,
            target: target.clone(),
            started: now,
            updated: now,
            gate: Gate::Automatic,
            state: TxState::Downloading,
        };
        Ok((tx, vec![Action::MarkUnbootable { group: target }]))
    }

    /// All content is written and every digest verified.
    pub fn staged(&mut self, now: Timestamp) -> Result<Vec<Action>> {
        self.expect("stage", |s| matches!(s, TxState::Downloading))?;
        self.set(TxState::Staged, now);
        Ok(Vec::new())
    }

    /// Hands the verified target to the bootloader for `policy.tries` boots, then reboots.
    pub fn activate(&mut self, now: Timestamp, policy: BootPolicy) -> Result<Vec<Action>> {
        self.expect("activate", |s| matches!(s, TxState::Staged))?;
        let tries = policy.tries.max(1);
        self.set(TxState::Activated { tries }, now);
        Ok(vec![
            Action::TryNext {
                group: self.target.clone(),
                tries,
            },
            Action::Reboot,
        ])
    }

    /// The install stopped before activation.
    pub fn fail(&mut self, now: Timestamp, reason: FailReason) -> Result<Vec<Action>> {
        self.expect("fail", |s| {
            matches!(s, TxState::Downloading | TxState::Staged)
        })?;
        self.set(TxState::Failed { reason }, now);
        Ok(Vec::new())
    }

    /// The machine booted: advance according to what the bootloader booted.
    ///
    /// The agent stores bootloader changes before the state file, so after a crash the
    /// bootloader may be one step ahead: a `Staged` transaction whose target booted was
    /// activated, and one whose target is bootable but did not boot was activated and fell
    /// back. In `Activated` or `Trial`, booting the target starts (or continues) the trial,
    /// and booting the known-good group means the bootloader fell back. An install whose
    /// target was never made bootable was interrupted. Ended transactions do not change.
    pub fn booted(
        &mut self,
        now: Timestamp,
        report: &BootReport,
        policy: BootPolicy,
    ) -> Result<Vec<Action>> {
        let on_target = report.booted == self.target;
        match self.state.clone() {
            TxState::Staged | TxState::Activated { .. } if on_target => {
                self.set_trial(now, now, 1, None);
                Ok(self.gate_actions())
            }
            TxState::Staged if report.target_bootable => {
                Ok(self.roll_back(now, RollbackReason::BootFailed, false))
            }
            TxState::Downloading | TxState::Staged => {
                self.set(
                    TxState::Failed {
                        reason: FailReason::Interrupted,
                    },
                    now,
                );
                Ok(Vec::new())
            }
            TxState::Trial {
                since,
                boots,
                degraded_since,
            } if on_target => {
                let boots = boots.saturating_add(1);
                if boots > policy.max_trial_boots {
                    return Ok(self.roll_back(now, RollbackReason::BootLoop { boots }, true));
                }
                self.set_trial(now, since, boots, degraded_since);
                Ok(self.gate_actions())
            }
            TxState::Activated { .. } | TxState::Trial { .. } => {
                // The bootloader already runs the known-good group: no reboot needed.
                Ok(self.roll_back(now, RollbackReason::BootFailed, false))
            }
            TxState::Committed { .. } | TxState::Failed { .. } | TxState::RolledBack { .. } => {
                Ok(Vec::new())
            }
        }
    }

    /// Applies the health gate's verdict to a trial.
    pub fn health(&mut self, now: Timestamp, verdict: Verdict) -> Result<Vec<Action>> {
        let TxState::Trial { since, boots, .. } = self.state else {
            return Err(self.invalid("apply a health verdict to"));
        };
        Ok(match verdict {
            Verdict::Commit => self.commit(now),
            Verdict::RollBack(reason) => self.roll_back(now, reason, true),
            Verdict::Wait { degraded_since } => {
                self.set_trial(now, since, boots, degraded_since);
                Vec::new()
            }
        })
    }

    /// An operator declares the trial good.
    pub fn mark_good(&mut self, now: Timestamp) -> Result<Vec<Action>> {
        self.expect("mark good", |s| matches!(s, TxState::Trial { .. }))?;
        Ok(self.commit(now))
    }

    /// An operator ends an activated or trial transaction on the known-good group.
    pub fn rollback(&mut self, now: Timestamp, reason: &str) -> Result<Vec<Action>> {
        let reboot = match self.state {
            TxState::Activated { .. } => false,
            TxState::Trial { .. } => true,
            _ => return Err(self.invalid("roll back")),
        };
        let reason = RollbackReason::Operator {
            reason: reason.to_owned(),
        };
        Ok(self.roll_back(now, reason, reboot))
    }

    /// An operator cancels an install that has not been activated.
    pub fn cancel(&mut self, now: Timestamp) -> Result<Vec<Action>> {
        self.fail(now, FailReason::Cancelled)
    }

    fn commit(&mut self, now: Timestamp) -> Vec<Action> {
        self.set(TxState::Committed { at: now }, now);
        vec![
            Action::MarkGood {
                group: self.target.clone(),
            },
            Action::RaiseSecurityVersion {
                to: self.security_version,
            },
        ]
    }

    /// A trial's boot runs the health gate, unless an operator decides.
    fn gate_actions(&self) -> Vec<Action> {
        match self.gate {
            Gate::Automatic => vec![Action::RunHealthGate],
            Gate::Manual => Vec::new(),
        }
    }

    fn roll_back(&mut self, now: Timestamp, reason: RollbackReason, reboot: bool) -> Vec<Action> {
        let text = reason.to_string();
        self.set(TxState::RolledBack { reason }, now);
        let mut actions = vec![
            Action::MarkUnbootable {
                group: self.target.clone(),
            },
            Action::Quarantine {
                version: self.version.clone(),
                reason: text,
            },
        ];
        if reboot {
            actions.push(Action::Reboot);
        }
        actions
    }

    fn set_trial(
        &mut self,
        now: Timestamp,
        since: Timestamp,
        boots: u32,
        degraded_since: Option<Timestamp>,
    ) {
        self.set(
            TxState::Trial {
                since,
                boots,
                degraded_since,
            },
            now,
        );
    }

    fn set(&mut self, state: TxState, now: Timestamp) {
        self.state = state;
        self.updated = now;
    }

    fn expect(&self, transition: &'static str, allowed: impl Fn(&TxState) -> bool) -> Result<()> {
        if allowed(&self.state) {
            Ok(())
        } else {
            Err(self.invalid(transition))
        }
    }

    fn invalid(&self, transition: &'static str) -> Error {
        Error::InvalidTransition {
            transition,
            state: self.state.name(),
        }
    }
}
