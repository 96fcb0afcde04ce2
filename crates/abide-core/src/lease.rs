//! The reboot-lease decision, the server's side of keeping a group up while its devices
//! reboot: may a device that asks take a lease now? Pure: the caller reads the counts in the
//! transaction that records the grant, and converts `now` into the group window's civil time
//! (see [`crate::window`]).

use crate::window::Window;

/// The group's maintenance window and the current time in its zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowNow {
    /// The window.
    pub window: Window,
    /// Today, Monday = 0, in the window's zone.
    pub weekday: u8,
    /// The minute of the day now, in the window's zone.
    pub minute: u16,
}

/// What the server knows when a device asks for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAsk {
    /// The device already holds a lease (it asks to extend it).
    pub held: bool,
    /// The group's maintenance window, if it has one.
    pub window: Option<WindowNow>,
    /// Leases the group's devices hold now (expired ones already taken back).
    pub leased: u64,
    /// At most this many of the group's devices may hold a lease at once.
    pub max_unavailable: Option<u64>,
    /// The group's other devices heard from recently as healthy and holding no lease.
    pub healthy_others: u64,
    /// At least this many of them must stay up.
    pub quorum: Option<u64>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// A new lease.
    Grant,
    /// The lease the device holds, extended (no limit is checked again: it counts already).
    Renew,
    /// No lease, and why.
    Refuse(LeaseRefusal),
}

/// Why a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// The group's maintenance window is closed.
    WindowClosed,
    /// `leased` devices hold a lease already, the most the group allows.
    Unavailable {
        /// Leases held.
        leased: u64,
        /// The group's `max_unavailable`.
        max: u64,
    },
    /// Only `healthy` other devices would stay up, fewer than the group's quorum.
    Quorum {
        /// Healthy other devices.
        healthy: u64,
        /// The group's quorum.
        quorum: u64,
    },
}

/// Decides; the checks run in order: the window, then `max_unavailable`, then the quorum.
pub fn decide(ask: &LeaseAsk) -> LeaseDecision {
    if ask.held {
        return LeaseDecision::Renew;
    }
    if let Some(w) = &ask.window
        && !w.window.contains(w.weekday, w.minute)
    {
        return LeaseDecision::Refuse(LeaseRefusal::WindowClosed);
    }
    if let Some(max) = ask.max_unavailable
        && ask.leased >= max
    {
        return LeaseDecision::Refuse(LeaseRefusal::Unavailable {
            leased: ask.leased,
            max,
        });
    }
    if let Some(quorum) = ask.quorum
        && ask.healthy_others < quorum
    {
        return LeaseDecision::Refuse(LeaseRefusal::Quorum {
            healthy: ask.healthy_others,
            quorum,
        });
    }
    LeaseDecision::Grant
}
