//! The device's side of the fleet, as a pure decision: from what the server assigned (already
//! verified), the device's transaction, its maintenance windows and its reboot lease, the next
//! step the agent takes. The agent (`abide agent`) and the fleet simulator both ask
//! [`decide`] after every event and carry out what it says; nothing here does I/O.
//!
//! The order of an update: download and stage at any time (the target stays unbootable), then
//! — only inside the window and while holding a lease — activate and reboot; the boot step and
//! the health gate own the trial; after it ends the lease is given back. What a device reports
//! is a function of its transaction ([`status`]), so a report is due whenever that changes.

use abide_fleet_json::{AssignedAction, Assignment, DeviceState, ReleaseKind, ReportStatus};
use semver::Version;

use crate::transaction::{FailReason, Transaction, TxState};

/// What the server asks of the device, from a verified assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The release id.
    pub release_id: String,
    /// The rollout that assigns it.
    pub rollout_id: String,
    /// The release's version.
    pub version: Version,
    /// Install it, stage it only, or end a trial of it (a fleet-wide rollback).
    pub kind: AssignedAction,
    /// What it replaces: the operating system, an application, or the agent.
    pub part: Part,
}

/// What a release replaces on the device.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// The operating system, in the A/B slot groups.
    #[default]
    Os,
    /// The application of `[[app]]` with this name.
    App(String),
    /// The agent itself.
    Agent,
}

impl Part {
    /// Whether it is the operating system.
    pub fn is_os(&self) -> bool {
        *self == Part::Os
    }
}

impl Offer {
    /// The offer of a verified assignment: none if it assigns no release, or one whose
    /// version does not parse.
    pub fn of(assignment: &Assignment) -> Option<Offer> {
        let r = assignment.release.as_ref()?;
        Some(Offer {
            release_id: r.release_id.clone(),
            rollout_id: r.rollout_id.clone(),
            version: r.version.parse().ok()?,
            kind: r.action,
            part: match r.kind {
                ReleaseKind::Os => Part::Os,
                ReleaseKind::App => Part::App(r.app.clone()?),
                ReleaseKind::Agent => Part::Agent,
            },
        })
    }
}

/// What a verified manifest carries: one component of kind `agent` is the agent, one of kind
/// `app` the application its slot class names; anything else is the operating system. The
/// server files each release under it; the device tells an agent bundle by it.
pub fn release_kind(manifest: &abide_bundle::Manifest) -> (ReleaseKind, Option<String>) {
    match manifest.components.as_slice() {
        [c] if c.kind.as_str() == "agent" => (ReleaseKind::Agent, None),
        [c] if c.kind.as_str() == "app" => (ReleaseKind::App, Some(c.slot_class.to_string())),
        _ => (ReleaseKind::Os, None),
    }
}

/// Whether the device holds a reboot lease from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// It holds none.
    None,
    /// It holds one.
    Held,
}

/// Whether activation may happen now: the group's window (from the assignment) and the
/// device's own windows must both be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Every window that applies is open (or none applies).
    Open,
    /// A window that applies is closed.
    Closed,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The verified assignment's release, if any.
    pub offer: Option<&'a Offer>,
    /// The committed version the device runs.
    pub running: &'a Version,
    /// Whether the offered version is quarantined here (I8: never installed again unforced).
    pub quarantined: bool,
    /// The device's current or last transaction.
    pub transaction: Option<&'a Transaction>,
    /// The windows.
    pub window: WindowState,
    /// The lease.
    pub lease: Lease,
}

/// The agent's next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until the next check-in.
    Idle,
    /// Download the offered release into the target group and stage it (any time).
    Stage,
    /// A download that a stopped agent left behind: end it as interrupted, then decide again.
    Abandon,
    /// A staged release the server no longer assigns: cancel it (the target stays unbootable).
    Cancel,
    /// Staged, but a window is closed: wait for it.
    WaitForWindow,
    /// Staged and the window is open: ask the server for a reboot lease.
    AskLease,
    /// Staged, window open, lease held: hand the target to the bootloader and reboot.
    Activate,
    /// The fleet rolls back the release on trial here: end the trial on the known-good group.
    RollBack,
    /// The transaction ended: give the lease back.
    ReleaseLease,
}

/// The next step; see the module documentation.
pub fn decide(v: &View<'_>) -> Step {
    let tx = v.transaction;
    let on_trial = tx.is_some_and(|t| matches!(t.state, TxState::Trial { .. }));
    if let Some(t) = tx
        && matches!(t.state, TxState::Activated { .. } | TxState::Trial { .. })
    {
        // The bootloader and the health gate own a trial; only the fleet may end it early.
        return match v.offer {
            Some(o) if o.kind == AssignedAction::Rollback && on_trial && o.version == t.version => {
                Step::RollBack
            }
            _ => Step::Idle,
        };
    }
    if v.lease == Lease::Held && tx.is_none_or(|t| t.state.is_terminal()) {
        return Step::ReleaseLease;
    }
    if let Some(t) = tx
        && matches!(t.state, TxState::Downloading)
    {
        return Step::Abandon;
    }
    let staged = tx.filter(|t| matches!(t.state, TxState::Staged));
    let Some(offer) = v.offer.filter(|o| o.kind != AssignedAction::Rollback) else {
        // Without an assignment a staged release waits: a paused rollout may resume.
        return Step::Idle;
    };
    if let Some(t) = staged {
        if t.version != offer.version {
            return Step::Cancel;
        }
        if offer.kind == AssignedAction::Stage {
            return Step::Idle;
        }
        return match (v.window, v.lease) {
            (WindowState::Closed, _) => Step::WaitForWindow,
            (WindowState::Open, Lease::None) => Step::AskLease,
            (WindowState::Open, Lease::Held) => Step::Activate,
        };
    }
    if offer.version == *v.running || v.quarantined {
        return Step::Idle;
    }
    // A bundle the device refused is not fetched again and again; a download that broke off
    // (network, I/O, a restart) or was stopped (the assignment withdrawn) is tried again.
    if let Some(t) = tx
        && t.version == offer.version
        && matches!(
            t.state,
            TxState::Failed {
                reason: FailReason::Refused { .. }
            }
        )
    {
        return Step::Idle;
    }
    Step::Stage
}

/// What an application or agent offer finds on the device, for [`decide_part`].
#[derive(Debug, Clone, Copy)]
pub struct PartView<'a> {
    /// The offer (of an application or the agent).
    pub offer: &'a Offer,
    /// The version of the application or agent that runs; none for an application never
    /// updated.
    pub running: Option<&'a Version>,
    /// Whether the device has the application (always, for the agent).
    pub present: bool,
    /// Whether the offered version was rolled back here.
    pub quarantined: bool,
    /// Whether this release's update already ended here, whatever the outcome: it is not
    /// tried again (a new release, or a fleet-wide rollback's, is).
    pub ended: bool,
    /// Whether its restart makes the device unavailable (`[[app]] lease = true`).
    pub needs_lease: bool,
    /// The operating system's transaction is activated or on trial: its gate comes first.
    pub os_busy: bool,
    /// The windows.
    pub window: WindowState,
    /// The lease.
    pub lease: Lease,
}

/// The next step for an application or agent offer. Its update has no separate activation:
/// downloading it ([`Step::Stage`]) carries it out to its end — an application's health gate,
/// the agent's self-update trial — so the window must be open, and the lease held where the
/// application asks for one, before it starts. A fleet-wide rollback of such a release is an
/// install of the previous one, which the server assigns once the device reported.
pub fn decide_part(v: &PartView<'_>) -> Step {
    if v.os_busy {
        return Step::Idle;
    }
    let wanted = v.offer.kind == AssignedAction::Install
        && v.present
        && !v.quarantined
        && !v.ended
        && v.running != Some(&v.offer.version);
    if !wanted {
        return match v.lease {
            Lease::Held => Step::ReleaseLease,
            Lease::None => Step::Idle,
        };
    }
    match (v.window, v.needs_lease, v.lease) {
        (WindowState::Closed, _, _) => Step::WaitForWindow,
        (WindowState::Open, true, Lease::None) => Step::AskLease,
        _ => Step::Stage,
    }
}

/// What an application's update reports once it ended: `committed` after its health gate;
/// `rolled_back` when a step failed or a restart interrupted one, with the step and whether the
/// data came back from the backup; `failed` when it was given up before its first step.
/// `None` while it runs.
pub fn app_outcome(tx: &crate::app::AppTransaction) -> Option<(ReportStatus, Option<String>)> {
    use crate::app::AppStep;
    let reason = tx.reason.as_deref().unwrap_or("no reason given");
    let step = tx.reason_kind.as_deref().unwrap_or("unknown");
    let data = match tx.step {
        AppStep::Committed => return Some((ReportStatus::Committed, None)),
        AppStep::Failed if step == "abandoned" => {
            return Some((ReportStatus::Failed, Some(reason.to_owned())));
        }
        AppStep::RolledBack => "its data restored from the backup",
        AppStep::Failed => "its data untouched",
        _ => return None,
    };
    // A restart's recovery names the step it interrupted in the reason itself.
    let failed = if step == "interrupted" {
        reason.to_owned()
    } else {
        format!("step {step} failed: {reason}")
    };
    Some((
        ReportStatus::RolledBack,
        Some(format!("{failed}; the previous release runs, {data}")),
    ))
}

/// What the agent's self-update trial reports once it was settled: `committed`, or
/// `rolled_back` when the new agent did not come up (the previous one reports it).
pub fn trial_outcome(trial: &crate::selfupdate::Trial) -> Option<(ReportStatus, Option<String>)> {
    use crate::selfupdate::TrialState;
    match trial.state {
        TrialState::Trying => None,
        TrialState::Committed => Some((ReportStatus::Committed, None)),
        TrialState::Failed => Some((
            ReportStatus::RolledBack,
            Some(format!(
                "the new agent {} did not come up ({}); agent {} runs again",
                trial.to,
                trial.reason.as_deref().unwrap_or("no reason given"),
                trial.from
            )),
        )),
    }
}

/// What a transaction in `state` reports, with the reason of a failure or rollback.
pub fn status(state: &TxState) -> (ReportStatus, Option<String>) {
    match state {
        TxState::Downloading => (ReportStatus::Downloading, None),
        TxState::Staged => (ReportStatus::Staged, None),
        TxState::Activated { .. } => (ReportStatus::Rebooting, None),
        TxState::Trial { .. } => (ReportStatus::Trial, None),
        TxState::Committed { .. } => (ReportStatus::Committed, None),
        TxState::Failed { reason } => (ReportStatus::Failed, Some(reason.to_string())),
        TxState::RolledBack { reason } => (ReportStatus::RolledBack, Some(reason.to_string())),
    }
}

/// The state a device whose last transaction is `tx` gives in its check-in inventory.
pub fn device_state(tx: Option<&Transaction>) -> DeviceState {
    match tx.map(|t| &t.state) {
        None => DeviceState::Idle,
        Some(TxState::Downloading) => DeviceState::Downloading,
        Some(TxState::Staged) => DeviceState::Staged,
        Some(TxState::Activated { .. }) => DeviceState::Activated,
        Some(TxState::Trial { .. }) => DeviceState::Trial,
        Some(TxState::Committed { .. }) => DeviceState::Committed,
        Some(TxState::Failed { .. }) => DeviceState::Failed,
        Some(TxState::RolledBack { .. }) => DeviceState::RolledBack,
    }
}

/// The release and rollout a device's transaction carries out for the fleet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assigned {
    /// The release's version.
    pub version: String,
    /// The release id.
    pub release_id: String,
    /// The rollout id.
    pub rollout_id: String,
    /// What it replaces.
    #[serde(default, skip_serializing_if = "Part::is_os")]
    pub part: Part,
}

/// A report to make about the fleet's update, and the key that says it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The transaction and the status reported, remembered so that each is reported once.
    pub key: (String, String),
    /// The report (its sequence number is given when it is queued).
    pub request: abide_fleet_json::ReportRequest,
}

/// The report the transaction's state makes, if it is about the release the fleet assigned and
/// was not reported yet (`reported`: the key of the last report). The download is reported as
/// it starts ([`Ledger::stage`]), and a download the fleet stopped by withdrawing the release
/// is not a failure to report.
pub fn report(
    tx: Option<&Transaction>,
    assigned: Option<&Assigned>,
    reported: Option<&(String, String)>,
) -> Option<Report> {
    let (tx, assigned) = (tx?, assigned?);
    if !assigned.part.is_os()
        || assigned.version != tx.version.to_string()
        || matches!(
            tx.state,
            TxState::Downloading
                | TxState::Failed {
                    reason: FailReason::Cancelled
                }
        )
    {
        return None;
    }
    let (status, reason) = status(&tx.state);
    let key = (tx.id.clone(), status.as_str().to_owned());
    if reported == Some(&key) {
        return None;
    }
    let seconds = match &tx.state {
        TxState::Staged => Some(tx.updated.duration_since(tx.started).as_secs_f64()),
        _ => None,
    };
    Some(Report {
        key,
        request: abide_fleet_json::ReportRequest {
            seq: 0,
            status,
            release_id: Some(assigned.release_id.clone()),
            rollout_id: Some(assigned.rollout_id.clone()),
            reason: reason.map(|r| r.chars().take(1000).collect()),
            seconds,
        },
    })
}

/// What a device keeps about its part in the fleet's updates, in its state directory: the
/// release being installed, whether it holds a reboot lease, and the reports not yet
/// acknowledged, in order, with their sequence numbers.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    /// The release being installed, by version.
    pub assigned: Option<Assigned>,
    /// Whether a reboot lease is held.
    pub lease: bool,
    /// The sequence number of the next new report (from 1).
    pub next_seq: u64,
    /// The last transaction state reported: (transaction id, status).
    pub reported: Option<(String, String)>,
    /// Reports not yet acknowledged, oldest first.
    pub outbox: Vec<abide_fleet_json::ReportRequest>,
    /// The application or agent release whose update ended here (reported once, not tried
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

impl Ledger {
    /// An empty ledger: nothing assigned, no lease, the first report numbered 1.
    pub fn new() -> Ledger {
        Ledger {
            next_seq: 1,
            ..Ledger::default()
        }
    }

    /// The lease, for [`decide`].
    pub fn lease(&self) -> Lease {
        if self.lease { Lease::Held } else { Lease::None }
    }

    /// Queues `report` with the next sequence number.
    pub fn queue(&mut self, mut report: abide_fleet_json::ReportRequest) {
        report.seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.push(report);
    }

    /// Starts carrying out `offer`: it is the release assigned, and its download is reported.
    pub fn stage(&mut self, offer: &Offer) {
        self.assigned = Some(Assigned {
            version: offer.version.to_string(),
            release_id: offer.release_id.clone(),
            rollout_id: offer.rollout_id.clone(),
            part: offer.part.clone(),
        });
        self.queue(abide_fleet_json::ReportRequest {
            seq: 0,
            status: ReportStatus::Downloading,
            release_id: Some(offer.release_id.clone()),
            rollout_id: Some(offer.rollout_id.clone()),
            reason: None,
            seconds: None,
        });
    }

    /// Whether the update of the application or agent release `release_id` ended here.
    pub fn has_ended(&self, release_id: &str) -> bool {
        self.ended.as_deref() == Some(release_id)
    }

    /// The assigned application or agent release's update ended with `status`: queues its one
    /// report (an update already ended is not reported again); returns whether it did.
    pub fn end(&mut self, status: ReportStatus, reason: Option<String>) -> bool {
        let Some(a) = self.assigned.clone().filter(|a| !a.part.is_os()) else {
            return false;
        };
        if self.has_ended(&a.release_id) {
            return false;
        }
        self.ended = Some(a.release_id.clone());
        self.queue(abide_fleet_json::ReportRequest {
            seq: 0,
            status,
            release_id: Some(a.release_id),
            rollout_id: Some(a.rollout_id),
            reason: reason.map(|r| r.chars().take(1000).collect()),
            seconds: None,
        });
        true
    }

    /// The assigned application release's update `tx` ended: its one report ([`app_outcome`]);
    /// a transaction of another application or version, or one still running, reports nothing.
    pub fn end_app(&mut self, tx: &crate::app::AppTransaction) -> bool {
        let ours = self.assigned.as_ref().is_some_and(|a| {
            a.part == Part::App(tx.app.clone())
                && tx
                    .release
                    .version
                    .as_ref()
                    .map(ToString::to_string)
                    .as_ref()
                    == Some(&a.version)
        });
        match app_outcome(tx).filter(|_| ours) {
            Some((status, reason)) => self.end(status, reason),
            None => false,
        }
    }

    /// The assigned agent release's self-update `trial` was settled: its one report
    /// ([`trial_outcome`]); a trial of another version reports nothing.
    pub fn end_trial(&mut self, trial: &crate::selfupdate::Trial) -> bool {
        let ours = self
            .assigned
            .as_ref()
            .is_some_and(|a| a.part == Part::Agent && a.version == trial.to);
        match trial_outcome(trial).filter(|_| ours) {
            Some((status, reason)) => self.end(status, reason),
            None => false,
        }
    }

    /// Queues the report the transaction's state makes ([`report`]), if one is due; returns
    /// whether one was.
    pub fn note(&mut self, tx: Option<&Transaction>) -> bool {
        match report(tx, self.assigned.as_ref(), self.reported.as_ref()) {
            Some(r) => {
                self.queue(r.request);
                self.reported = Some(r.key);
                true
            }
            None => false,
        }
    }
}
