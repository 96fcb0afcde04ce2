//! The device's side of the fleet, as a pure decision: from what the server assigned (already
//! verified), the device's transaction, its maintenance windows and its reboot lease, the next
//! step the agent takes. The agent (`abide agent`) and the fleet simulator both ask
//! [`decide`] after every event and carry out what it says; nothing here does I/O.
//!
//! The order of an update: download and stage at any time (the target stays unbootable), then
//! — only inside the window and while holding a lease — activate and reboot; the boot step and
//! the health gate own the trial; after it ends the lease is given back. What a device reports
//! is a function of its transaction ([`status`]), so a report is due whenever that changes.

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
    /// Install it, or end a trial of it (a fleet-wide rollback).
    pub kind: OfferKind,
}

/// What an [`Offer`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferKind {
    /// Download, stage, and activate in the window.
    Install,
    /// Download and stage only (a rollout that stages the fleet before it activates anyone).
    Stage,
    /// Roll a trial of this release back (the fleet rolls it back).
    RollBack,
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
            Some(o) if o.kind == OfferKind::RollBack && on_trial && o.version == t.version => {
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
    let Some(offer) = v.offer.filter(|o| o.kind != OfferKind::RollBack) else {
        // Without an assignment a staged release waits: a paused rollout may resume.
        return Step::Idle;
    };
    if let Some(t) = staged {
        if t.version != offer.version {
            return Step::Cancel;
        }
        if offer.kind == OfferKind::Stage {
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

/// What a device reports about an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Content is streaming into the target.
    Downloading,
    /// Every digest verified; waiting to activate.
    Staged,
    /// Activated; the machine is rebooting into the target.
    Rebooting,
    /// Booted into the target; the health gate decides.
    Trial,
    /// The health gate passed on the new system.
    Committed,
    /// Ended before activation.
    Failed,
    /// The trial failed; the device runs the previous group.
    RolledBack,
}

impl Status {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Downloading => "downloading",
            Status::Staged => "staged",
            Status::Rebooting => "rebooting",
            Status::Trial => "trial",
            Status::Committed => "committed",
            Status::Failed => "failed",
            Status::RolledBack => "rolled_back",
        }
    }
}

/// What a transaction in `state` reports, with the reason of a failure or rollback.
pub fn status(state: &TxState) -> (Status, Option<String>) {
    match state {
        TxState::Downloading => (Status::Downloading, None),
        TxState::Staged => (Status::Staged, None),
        TxState::Activated { .. } => (Status::Rebooting, None),
        TxState::Trial { .. } => (Status::Trial, None),
        TxState::Committed { .. } => (Status::Committed, None),
        TxState::Failed { reason } => (Status::Failed, Some(reason.to_string())),
        TxState::RolledBack { reason } => (Status::RolledBack, Some(reason.to_string())),
    }
}
