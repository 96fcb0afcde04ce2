//! Schedules: an update asked for on the device — from a URL or a file, optionally pinned to
//! the SHA-256 of the bundle, to start now, at a time, or in the next maintenance window, with
//! automatic rollback or with the trial left to an operator — and its life:
//!
//! ```text
//! Pending → InProgress → Completed | Failed | RolledBack | Cancelled
//!        ↘ Cancelled
//! ```
//!
//! Pure like the transaction engine: `now` and whether the window is open are arguments; a
//! refused transition changes nothing. While in progress a schedule follows the transaction
//! that carries it out ([`Schedule::follow`]): a commit completes it, a rollback or a failed
//! install ends it with the reason. The agent persists schedules (they survive reboots) and
//! runs the one that is due.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::transaction::{FailReason, TxState};

/// Where the bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "location", rename_all = "kebab-case")]
pub enum Source {
    /// An `http://` or `https://` URL.
    Url(String),
    /// An absolute path on the device.
    File(String),
}

impl Source {
    /// A URL when `text` has an `http://` or `https://` scheme, else an absolute file path.
    pub fn parse(text: &str) -> Result<Source, ScheduleError> {
        if text.starts_with("http://") || text.starts_with("https://") {
            if text.len() > 2048 || text.chars().any(char::is_whitespace) {
                return Err(ScheduleError::Source(text.to_owned()));
            }
            return Ok(Source::Url(text.to_owned()));
        }
        if !text.starts_with('/') || text.contains('\0') || text.len() > 4096 {
            return Err(ScheduleError::Source(text.to_owned()));
        }
        Ok(Source::File(text.to_owned()))
    }
}

/// When it may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "at", rename_all = "kebab-case")]
pub enum When {
    /// As soon as the agent sees it.
    Now,
    /// From this time on.
    At(Timestamp),
    /// In the next maintenance window (the device's and its group's).
    InWindow,
}

/// What ends the trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rollback {
    /// The health gate commits or rolls back by itself (the default).
    Automatic,
    /// The trial waits for an operator's `mark-good` or `mark-bad`.
    Manual,
}

/// Who asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Origin {
    /// An operator on the device.
    Operator,
    /// The fleet: a rollout's assignment.
    Fleet {
        /// The rollout.
        rollout: String,
    },
}

/// Where a schedule is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ScheduleState {
    /// Waiting for its time.
    Pending,
    /// Being carried out by a transaction.
    InProgress {
        /// The transaction, once it began.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transaction: Option<String>,
    },
    /// Its transaction committed.
    Completed,
    /// The install failed before activation.
    Failed {
        /// Why.
        reason: String,
    },
    /// The trial ended on the known-good group.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// An operator cancelled it before anything was activated.
    Cancelled {
        /// The transaction that had begun, if one had: the agent abandons it (its target
        /// stays unbootable).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transaction: Option<String>,
    },
}

impl ScheduleState {
    /// Its name (`pending`, `in_progress`, …).
    pub fn name(&self) -> &'static str {
        match self {
            ScheduleState::Pending => "pending",
            ScheduleState::InProgress { .. } => "in_progress",
            ScheduleState::Completed => "completed",
            ScheduleState::Failed { .. } => "failed",
            ScheduleState::RolledBack { .. } => "rolled_back",
            ScheduleState::Cancelled { .. } => "cancelled",
        }
    }

    /// Whether it has ended.
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            ScheduleState::Pending | ScheduleState::InProgress { .. }
        )
    }
}

/// Why a schedule or a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not a URL with an http(s) scheme nor an absolute path.
    #[error("source {0:?}: expected an http:// or https:// URL or an absolute file path")]
    Source(String),
    /// Not 64 hex digits.
    #[error("sha256 {0:?}: expected 64 hex digits")]
    Sha256(String),
    /// A transition from a state it cannot start in.
    #[error("cannot {transition} a schedule that is {state}")]
    InvalidTransition {
        /// The transition asked for.
        transition: &'static str,
        /// The state it is in.
        state: &'static str,
    },
}

/// One scheduled update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its id.
    pub id: String,
    /// Where the bundle comes from.
    pub source: Source,
    /// The SHA-256 the bundle must have (lowercase hex), if pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// When it may start.
    pub when: When,
    /// What ends its trial.
    pub rollback: Rollback,
    /// Who asked for it.
    pub origin: Origin,
    /// When it was made.
    pub created: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
    /// The transaction that carried it out, once one began (kept after it ends).
    #[serde(
        default,
        rename = "carried_out_by",
        skip_serializing_if = "Option::is_none"
    )]
    pub transaction: Option<String>,
    /// The version it installs, once the bundle's manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where it is.
    #[serde(flatten)]
    pub state: ScheduleState,
}

impl Schedule {
    /// A pending schedule; the SHA-256, if given, is normalised to lowercase.
    pub fn new(
        id: &str,
        source: Source,
        sha256: Option<&str>,
        when: When,
        rollback: Rollback,
        origin: Origin,
        now: Timestamp,
    ) -> Result<Schedule, ScheduleError> {
        let sha256 = sha256
            .map(|h| {
                if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
                    Ok(h.to_ascii_lowercase())
                } else {
                    Err(ScheduleError::Sha256(h.to_owned()))
                }
            })
            .transpose()?;
        Ok(Schedule {
            id: id.to_owned(),
            source,
            sha256,
            when,
            rollback,
            origin,
            created: now,
            updated: now,
            transaction: None,
            version: None,
            state: ScheduleState::Pending,
        })
    }

    /// Whether it should start now: pending, and its time has come (for [`When::InWindow`]:
    /// the window is open).
    pub fn due(&self, now: Timestamp, window_open: bool) -> bool {
        self.state == ScheduleState::Pending
            && match self.when {
                When::Now => true,
                When::At(t) => t <= now,
                When::InWindow => window_open,
            }
    }

    /// The agent starts carrying it out.
    pub fn start(&mut self, now: Timestamp) -> Result<(), ScheduleError> {
        self.expect("start", |s| matches!(s, ScheduleState::Pending))?;
        self.set(ScheduleState::InProgress { transaction: None }, now);
        Ok(())
    }

    /// Follows the transaction that carries it out: records its id while it runs, and ends
    /// the schedule as the transaction ends. Only a schedule in progress follows.
    pub fn follow(&mut self, now: Timestamp, transaction: &str, state: &TxState) {
        if !matches!(self.state, ScheduleState::InProgress { .. }) {
            return;
        }
        self.transaction = Some(transaction.to_owned());
        let next = match state {
            TxState::Committed { .. } => ScheduleState::Completed,
            TxState::Failed {
                reason: FailReason::Cancelled,
            } => ScheduleState::Cancelled {
                transaction: Some(transaction.to_owned()),
            },
            TxState::Failed { reason } => ScheduleState::Failed {
                reason: reason.to_string(),
            },
            TxState::RolledBack { reason } => ScheduleState::RolledBack {
                reason: reason.to_string(),
            },
            _ => ScheduleState::InProgress {
                transaction: Some(transaction.to_owned()),
            },
        };
        if next != self.state {
            self.set(next, now);
        }
    }

    /// Follows the application transaction that carries it out, as [`Schedule::follow`] does a
    /// transaction of the device's.
    pub fn follow_app(&mut self, now: Timestamp, tx: &crate::app::AppTransaction) {
        use crate::app::AppStep;
        if !matches!(self.state, ScheduleState::InProgress { .. }) {
            return;
        }
        self.transaction = Some(tx.id.clone());
        let reason = tx.reason.clone().unwrap_or_default();
        let next = match tx.step {
            AppStep::Committed | AppStep::Restored => ScheduleState::Completed,
            AppStep::Failed => ScheduleState::Failed { reason },
            AppStep::RolledBack => ScheduleState::RolledBack { reason },
            _ => ScheduleState::InProgress {
                transaction: Some(tx.id.clone()),
            },
        };
        if next != self.state {
            self.set(next, now);
        }
    }

    /// It ended well without a transaction of the device's (the agent updated itself).
    pub fn complete(&mut self, now: Timestamp) {
        if matches!(self.state, ScheduleState::InProgress { .. }) {
            self.set(ScheduleState::Completed, now);
        }
    }

    /// The install failed before a transaction began (the source could not be read, the
    /// bundle was refused, its SHA-256 differs).
    pub fn fail(&mut self, now: Timestamp, reason: &str) -> Result<(), ScheduleError> {
        self.expect("fail", |s| matches!(s, ScheduleState::InProgress { .. }))?;
        self.set(
            ScheduleState::Failed {
                reason: reason.to_owned(),
            },
            now,
        );
        Ok(())
    }

    /// An operator cancels it: while pending, or in progress as long as its transaction has
    /// activated nothing (`transaction` is that transaction's state, if one began). Returns
    /// whether a running download must be stopped. After activation it is too late: roll back
    /// instead.
    pub fn cancel(
        &mut self,
        now: Timestamp,
        transaction: Option<&TxState>,
    ) -> Result<bool, ScheduleError> {
        let stop = match (&self.state, transaction) {
            (ScheduleState::Pending, _) => false,
            (ScheduleState::InProgress { .. }, None | Some(TxState::Downloading)) => true,
            (ScheduleState::InProgress { .. }, Some(TxState::Staged)) => true,
            (ScheduleState::InProgress { .. }, Some(_)) => {
                return Err(ScheduleError::InvalidTransition {
                    transition: "cancel (it is activated: roll back instead)",
                    state: self.state.name(),
                });
            }
            _ => {
                return Err(ScheduleError::InvalidTransition {
                    transition: "cancel",
                    state: self.state.name(),
                });
            }
        };
        let transaction = match &self.state {
            ScheduleState::InProgress { transaction } => transaction.clone(),
            _ => None,
        };
        self.set(ScheduleState::Cancelled { transaction }, now);
        Ok(stop)
    }

    fn expect(
        &self,
        transition: &'static str,
        ok: impl Fn(&ScheduleState) -> bool,
    ) -> Result<(), ScheduleError> {
        if ok(&self.state) {
            Ok(())
        } else {
            Err(ScheduleError::InvalidTransition {
                transition,
                state: self.state.name(),
            })
        }
    }

    fn set(&mut self, state: ScheduleState, now: Timestamp) {
        self.state = state;
        self.updated = now;
    }
}
