//! Application updates: a release of an application is unpacked into a directory of its own
//! and a symbolic link is switched to it, with the application's services stopped and its
//! data backed up around the switch. No reboot: the whole update runs in one process, and
//! a crash anywhere leaves a step the next start finishes or undoes.
//!
//! ```text
//! Staged → Stopped → BackedUp → Switched → Migrated → Started → Committed
//!    ↘        ↘         ↘           ↘          ↘          ↘
//!     Restoring{data: false} → Failed   Restoring{data: true} → RolledBack
//! ```
//!
//! Before the switch nothing the application reads has changed, so a failure only starts the
//! previous release again (`Failed`). From the switch on, the migration hook and the new
//! release may have written to the data directory, so a failure also puts the backup back
//! (`RolledBack`). An operator's restore of a backup is the same `Restoring{data: true}` step
//! on its own, ending `Restored`.
//!
//! Pure like the transaction engine: `now` is an argument, a refused transition changes
//! nothing, and the agent carries out each step and records it before the next.

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How every application transaction's id begins (`app-SECONDS-VERSION`, `app-SECONDS-restore-…`).
pub const ID_PREFIX: &str = "app-";

/// A release directory of an application and the version it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRelease {
    /// The version (none for a release that was there before Abide managed the application).
    pub version: Option<Version>,
    /// The directory's name in the application's releases directory.
    pub dir: String,
}

/// Where an application transaction is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum AppStep {
    /// The new release is unpacked and verified in its own directory; nothing else changed.
    Staged,
    /// The application's services are stopped.
    Stopped,
    /// The data directory is in a backup.
    BackedUp,
    /// The link points at the new release.
    Switched,
    /// The migration hook ran (or there is none).
    Migrated,
    /// The services run the new release; the health gate decides.
    Started,
    /// The new release and its data stay.
    Committed,
    /// The previous release is being put back, with the backed-up data when `data`.
    Restoring {
        /// Whether the data directory is restored from the backup.
        data: bool,
    },
    /// Ended before the switch: the previous release runs, its data untouched.
    Failed,
    /// Ended after the switch: the previous release runs on the data of the backup.
    RolledBack,
    /// An operator's restore of a backup is done.
    Restored,
}

impl AppStep {
    /// Its name (`staged`, `restoring`, `rolled_back`, …).
    pub fn name(&self) -> &'static str {
        match self {
            AppStep::Staged => "staged",
            AppStep::Stopped => "stopped",
            AppStep::BackedUp => "backed_up",
            AppStep::Switched => "switched",
            AppStep::Migrated => "migrated",
            AppStep::Started => "started",
            AppStep::Committed => "committed",
            AppStep::Restoring { .. } => "restoring",
            AppStep::Failed => "failed",
            AppStep::RolledBack => "rolled_back",
            AppStep::Restored => "restored",
        }
    }

    /// Whether the transaction has ended.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            AppStep::Committed | AppStep::Failed | AppStep::RolledBack | AppStep::Restored
        )
    }
}

/// What an application transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppOp {
    /// Installs a new release.
    Update,
    /// Puts a backup (and the release it was taken from) back, at an operator's request.
    Restore,
}

/// One update or restore of one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppTransaction {
    /// Its id (also the new release's directory name for an update).
    pub id: String,
    /// What it does.
    pub op: AppOp,
    /// The application.
    pub app: String,
    /// The release it installs (an update) or puts back (a restore).
    pub release: AppRelease,
    /// The release that ran before, which a failure puts back (none on a first install).
    pub previous: Option<AppRelease>,
    /// The security version the new release carries: the application's counter rises to it
    /// at commit.
    #[serde(default)]
    pub security_version: u64,
    /// The backup of the data directory: taken by an update, put back by a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Where it is.
    #[serde(flatten)]
    pub step: AppStep,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What failed, as a word for metrics: `stop`, `backup`, `switch`, `migration`, `start`,
    /// `health`, `interrupted` (a crash), `abandoned` (before the first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_kind: Option<String>,
    /// When it began.
    pub started: Timestamp,
    /// When it last changed.
    pub updated: Timestamp,
}

impl AppTransaction {
    /// An update of `app` to `release`, staged (unpacked and verified), from `previous`.
    pub fn update(
        id: &str,
        app: &str,
        release: AppRelease,
        previous: Option<AppRelease>,
        security_version: u64,
        now: Timestamp,
    ) -> AppTransaction {
        AppTransaction {
            id: id.to_owned(),
            op: AppOp::Update,
            app: app.to_owned(),
            release,
            previous,
            security_version,
            backup: None,
            step: AppStep::Staged,
            reason: None,
            reason_kind: None,
            started: now,
            updated: now,
        }
    }

    /// An operator's restore of `backup`, taken from `release`, while `current` runs.
    pub fn restore(
        id: &str,
        app: &str,
        backup: &str,
        release: AppRelease,
        current: Option<AppRelease>,
        reason: &str,
        now: Timestamp,
    ) -> AppTransaction {
        AppTransaction {
            id: id.to_owned(),
            op: AppOp::Restore,
            app: app.to_owned(),
            release,
            previous: current,
            security_version: 0,
            backup: Some(backup.to_owned()),
            step: AppStep::Restoring { data: true },
            reason: Some(reason.to_owned()),
            reason_kind: Some("operator".to_owned()),
            started: now,
            updated: now,
        }
    }

    /// The release that runs once the transaction ends: the new one when committed, else the
    /// one put back.
    pub fn outcome(&self) -> Option<&AppRelease> {
        match (self.op, &self.step) {
            (AppOp::Update, AppStep::Committed) | (AppOp::Restore, _) => Some(&self.release),
            _ => self.previous.as_ref(),
        }
    }

    /// The release [`AppStep::Restoring`] puts back: the previous one for an update, the
    /// backup's for a restore.
    pub fn restore_to(&self) -> Option<&AppRelease> {
        match self.op {
            AppOp::Update => self.previous.as_ref(),
            AppOp::Restore => Some(&self.release),
        }
    }

    /// The services are stopped.
    pub fn stopped(&mut self, now: Timestamp) -> Result<()> {
        self.step_to("stop", &AppStep::Staged, AppStep::Stopped, now)
    }

    /// The data directory is in backup `backup`.
    pub fn backed_up(&mut self, backup: &str, now: Timestamp) -> Result<()> {
        self.step_to("back up", &AppStep::Stopped, AppStep::BackedUp, now)?;
        self.backup = Some(backup.to_owned());
        Ok(())
    }

    /// The link points at the new release.
    pub fn switched(&mut self, now: Timestamp) -> Result<()> {
        self.step_to("switch", &AppStep::BackedUp, AppStep::Switched, now)
    }

    /// The migration hook ran.
    pub fn migrated(&mut self, now: Timestamp) -> Result<()> {
        self.step_to("migrate", &AppStep::Switched, AppStep::Migrated, now)
    }

    /// The services are started on the new release.
    pub fn started_services(&mut self, now: Timestamp) -> Result<()> {
        self.step_to("start", &AppStep::Migrated, AppStep::Started, now)
    }

    /// The health gate passed.
    pub fn commit(&mut self, now: Timestamp) -> Result<()> {
        self.step_to("commit", &AppStep::Started, AppStep::Committed, now)
    }

    /// A step failed (or was interrupted) for `reason`: from here on the previous release is
    /// put back, with the backed-up data once the switch may have let anything write to it.
    pub fn fail(&mut self, reason: &str, now: Timestamp) -> Result<()> {
        let (data, kind) = match self.step {
            AppStep::Staged => (false, "stop"),
            AppStep::Stopped => (false, "backup"),
            AppStep::BackedUp => (false, "switch"),
            AppStep::Switched => (true, "migration"),
            AppStep::Migrated => (true, "start"),
            AppStep::Started => (true, "health"),
            _ => return Err(self.invalid("fail")),
        };
        self.step = AppStep::Restoring { data };
        self.reason = Some(reason.to_owned());
        self.reason_kind = Some(kind.to_owned());
        self.updated = now;
        Ok(())
    }

    /// A staged update is given up before its first step (a cancel, a bundle that is not the
    /// one pinned): nothing ran, so nothing is restored.
    pub fn abandon(&mut self, reason: &str, now: Timestamp) -> Result<()> {
        self.step_to("abandon", &AppStep::Staged, AppStep::Failed, now)?;
        self.reason = Some(reason.to_owned());
        self.reason_kind = Some("abandoned".to_owned());
        Ok(())
    }

    /// The restore step is done.
    pub fn restored(&mut self, now: Timestamp) -> Result<()> {
        let AppStep::Restoring { data } = self.step else {
            return Err(self.invalid("finish restoring"));
        };
        self.step = match (self.op, data) {
            (AppOp::Restore, _) => AppStep::Restored,
            (AppOp::Update, true) => AppStep::RolledBack,
            (AppOp::Update, false) => AppStep::Failed,
        };
        self.updated = now;
        Ok(())
    }

    /// After a restart of the agent: a transaction cut short before it ended cannot know what
    /// the interrupted step did, so it is failed (and goes on restoring); one that was
    /// restoring goes on restoring. Returns whether it changed.
    pub fn recover(&mut self, now: Timestamp) -> bool {
        if self.step.is_terminal() || matches!(self.step, AppStep::Restoring { .. }) {
            return false;
        }
        let reason = format!("interrupted while {}", self.step.name().replace('_', " "));
        let failed = self.fail(&reason, now).is_ok();
        self.reason_kind = Some("interrupted".to_owned());
        failed
    }

    fn step_to(
        &mut self,
        transition: &'static str,
        from: &AppStep,
        to: AppStep,
        now: Timestamp,
    ) -> Result<()> {
        if self.step != *from {
            return Err(self.invalid(transition));
        }
        self.step = to;
        self.updated = now;
        Ok(())
    }

    fn invalid(&self, transition: &'static str) -> Error {
        Error::InvalidTransition {
            transition,
            state: self.step.name(),
        }
    }
}
