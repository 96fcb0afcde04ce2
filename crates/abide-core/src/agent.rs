//! The agent's whole round as one decision: from what the events so far established (the
//! self-update trial's record, the applications' and the device's transactions, the
//! schedules, the windows, the fleet's answer to the check-in), the one command to carry out
//! next. The daemon (`abide agent`) and the fleet simulator are two executors of [`next`]: each
//! gathers a [`Situation`], carries out the [`Command`], and asks again.
//!
//! The order, highest first:
//!
//! 1. a new agent on trial: nothing starts until its watchdog decides; a trial whose process is
//!    gone without a verdict is failed; an ended trial is settled (recorded, its schedule ended);
//! 2. an application update a crash interrupted is undone or finished;
//! 3. a download a stopped agent left behind is ended as interrupted;
//! 4. the schedule in progress follows the transaction that carries it out ([`follow`]);
//! 5. the staged target of a cancelled schedule is abandoned;
//! 6. a schedule an operator made on the device: activated once staged (in its window, if it
//!    asks for one); while it runs, the fleet's assignment waits;
//! 7. the oldest due schedule starts, when no transaction is under way;
//! 8. the fleet: check in, then [`crate::fleet::decide`] on its answer.
//!
//! Nothing here does I/O: `now` is part of the situation.

use jiff::Timestamp;
use semver::Version;

use crate::app::AppTransaction;
use crate::fleet::{self, Lease, Offer, PartView, Step, View, WindowState};
use crate::schedule::{Origin, Schedule, ScheduleState, When};
use crate::selfupdate::TrialState;
use crate::transaction::{FailReason, Transaction, TxState};

/// The self-update trial, as the round finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialView {
    /// Its state.
    pub state: TrialState,
    /// Whether the process that runs the new agent is alive.
    pub alive: bool,
}

/// The applications' updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apps {
    /// None is under way, or each ended.
    Settled,
    /// One was under way when the agent stopped.
    Interrupted,
}

/// The device's own maintenance windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// It has none: a schedule for the window never starts; the fleet's activation is not held.
    None,
    /// One is open.
    Open,
    /// It has some, all closed.
    Closed,
}

/// What the round knows of the fleet.
#[derive(Debug, Clone, Copy)]
pub enum Fleet<'a> {
    /// The device has no fleet server.
    Absent,
    /// It has one and has not checked in this round.
    Unknown,
    /// The server answered the check-in with this (verified) assignment.
    Answered(Answer<'a>),
}

/// The fleet's answer, as [`fleet::decide`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The release assigned, if any.
    pub offer: Option<&'a Offer>,
    /// The group's window (from the assignment).
    pub group_window: WindowState,
    /// Whether the offered version of the operating system is quarantined here.
    pub quarantined: bool,
    /// The reboot lease.
    pub lease: Lease,
    /// What an application or agent offer finds on the device; none is as a device without
    /// the application (the offer is not for it).
    pub part: Option<&'a PartState>,
}

/// What the device has of the application or agent an offer replaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartState {
    /// The version that runs; none for an application never updated.
    pub running: Option<Version>,
    /// Whether the device has the application (or its agent can replace itself).
    pub present: bool,
    /// Whether the offered version was rolled back here.
    pub quarantined: bool,
    /// Whether this release's update already ended here.
    pub ended: bool,
    /// Whether the application's restart needs a reboot lease (`[[app]] lease = true`).
    pub needs_lease: bool,
}

/// Everything [`next`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// The time.
    pub now: Timestamp,
    /// The self-update trial's record, if there is one.
    pub trial: Option<TrialView>,
    /// The applications' updates.
    pub apps: Apps,
    /// The committed version the device runs.
    pub running: &'a Version,
    /// The device's current or last transaction.
    pub transaction: Option<&'a Transaction>,
    /// The schedules, oldest first.
    pub schedules: &'a [Schedule],
    /// The application transaction the schedule in progress names, if it names one.
    pub app_transaction: Option<&'a AppTransaction>,
    /// The device's own windows.
    pub windows: Windows,
    /// The fleet.
    pub fleet: Fleet<'a>,
}

/// Who asked for an activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum By {
    /// An operator's schedule on the device.
    Schedule(String),
    /// The fleet's assignment (the lease is held).
    Fleet,
}

/// Why the round waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing to do until the next check-in or tick.
    Nothing,
    /// A new agent is on trial; its watchdog decides.
    AgentOnTrial,
    /// Staged; a window is closed.
    Window,
    /// An operator's schedule is carried out first; the fleet's assignment waits.
    Schedule,
}

/// The agent's next command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Nothing now.
    Wait(Wait),
    /// The new agent's process is gone without a verdict: put the previous binary back and
    /// fail the trial.
    FailTrial,
    /// The trial ended: record its outcome, end its schedule, remove the record.
    SettleTrial,
    /// Undo (or finish) the applications' interrupted updates.
    RecoverApps,
    /// The schedule in progress is out of step with its transaction: [`follow`] it.
    Follow,
    /// End the transaction, which never became bootable, for this reason.
    Abandon(FailReason),
    /// Hand the staged target to the bootloader (then reboot).
    Activate(By),
    /// Start this pending schedule and stage its bundle.
    Start(String),
    /// Check in with the fleet server.
    CheckIn,
    /// Download the fleet's offer into the target group and stage it; an application's or
    /// the agent's is carried out to its end (health gate, self-update trial).
    Stage,
    /// Ask the server for a reboot lease.
    AskLease,
    /// Give the reboot lease back.
    ReleaseLease,
    /// End the trial on the known-good group: the fleet rolls the release back.
    RollBack,
}

/// The next command; see the module documentation for the order.
pub fn next(s: &Situation<'_>) -> Command {
    if let Some(t) = s.trial {
        return match (t.state, t.alive) {
            (TrialState::Trying, true) => Command::Wait(Wait::AgentOnTrial),
            (TrialState::Trying, false) => Command::FailTrial,
            (TrialState::Committed | TrialState::Failed, _) => Command::SettleTrial,
        };
    }
    if s.apps == Apps::Interrupted {
        return Command::RecoverApps;
    }
    let tx = s.transaction;
    let staged = tx.filter(|t| t.state == TxState::Staged);
    if tx.is_some_and(|t| t.state == TxState::Downloading) {
        return Command::Abandon(FailReason::Interrupted);
    }
    if let Some(o) = in_progress(s.schedules) {
        let mut followed = o.clone();
        follow(&mut followed, tx, s.app_transaction, s.now);
        if followed != *o {
            return Command::Follow;
        }
    }
    if let Some(t) = staged
        && s.schedules.iter().any(|x| {
            matches!(&x.state, ScheduleState::Cancelled { transaction: Some(id) } if *id == t.id)
        })
    {
        return Command::Abandon(FailReason::Cancelled);
    }
    let in_progress = in_progress(s.schedules);
    let operator = in_progress.filter(|x| x.origin == Origin::Operator);
    if let Some(o) = operator {
        let ready = staged.is_some_and(|t| o.transaction.as_ref() == Some(&t.id));
        if ready && (o.when != When::InWindow || s.windows == Windows::Open) {
            return Command::Activate(By::Schedule(o.id.clone()));
        }
    } else if in_progress.is_none()
        && tx.is_none_or(|t| t.state.is_terminal())
        && let Some(due) = due(s.schedules, s.now, s.windows == Windows::Open)
    {
        return Command::Start(due.id.clone());
    }
    let answer = match s.fleet {
        Fleet::Absent => return Command::Wait(Wait::Nothing),
        Fleet::Unknown => return Command::CheckIn,
        Fleet::Answered(a) => a,
    };
    if operator.is_some() {
        return Command::Wait(Wait::Schedule);
    }
    let window = match (answer.group_window, s.windows) {
        (WindowState::Open, Windows::None | Windows::Open) => WindowState::Open,
        _ => WindowState::Closed,
    };
    let absent = PartState::default();
    let step = match answer.offer {
        Some(offer) if !offer.part.is_os() => {
            let part = answer.part.unwrap_or(&absent);
            fleet::decide_part(&PartView {
                offer,
                running: part.running.as_ref(),
                present: part.present,
                quarantined: part.quarantined,
                ended: part.ended,
                needs_lease: part.needs_lease,
                os_busy: tx.is_some_and(|t| {
                    matches!(t.state, TxState::Activated { .. } | TxState::Trial { .. })
                }),
                window,
                lease: answer.lease,
            })
        }
        _ => fleet::decide(&View {
            offer: answer.offer,
            running: s.running,
            quarantined: answer.quarantined,
            transaction: tx,
            window,
            lease: answer.lease,
        }),
    };
    match step {
        Step::Idle => Command::Wait(Wait::Nothing),
        Step::WaitForWindow => Command::Wait(Wait::Window),
        Step::Stage => Command::Stage,
        Step::Abandon => Command::Abandon(FailReason::Interrupted),
        Step::Cancel => Command::Abandon(FailReason::Cancelled),
        Step::AskLease => Command::AskLease,
        Step::Activate => Command::Activate(By::Fleet),
        Step::RollBack => Command::RollBack,
        Step::ReleaseLease => Command::ReleaseLease,
    }
}

/// The schedule being carried out, if one is.
pub fn in_progress(schedules: &[Schedule]) -> Option<&Schedule> {
    schedules
        .iter()
        .find(|x| matches!(x.state, ScheduleState::InProgress { .. }))
}

/// The oldest pending schedule that is due at `now` (`window_open`: whether one of the
/// device's windows is open).
pub fn due(schedules: &[Schedule], now: Timestamp, window_open: bool) -> Option<&Schedule> {
    schedules.iter().find(|x| x.due(now, window_open))
}

/// The schedule in progress follows what carries it out: the application transaction it
/// names (`app_tx`), else the device's transaction `tx` if it names that one; a schedule that
/// names none was started, but the agent stopped before its install began, so it fails.
pub fn follow(
    schedule: &mut Schedule,
    tx: Option<&Transaction>,
    app_tx: Option<&AppTransaction>,
    now: Timestamp,
) {
    if !matches!(schedule.state, ScheduleState::InProgress { .. }) {
        return;
    }
    if let Some(a) = app_tx.filter(|a| schedule.transaction.as_ref() == Some(&a.id)) {
        schedule.follow_app(now, a);
        return;
    }
    match tx {
        Some(t) if schedule.transaction.as_ref() == Some(&t.id) => {
            schedule.follow(now, &t.id, &t.state);
        }
        _ if schedule.transaction.is_none() => {
            let _ = schedule.fail(now, "interrupted by a restart before the install began");
        }
        _ => {}
    }
}
