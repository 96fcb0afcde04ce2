//! The error type of the core: a transition asked for in a state that does not allow it, or an
//! install that the admission policy refuses.

/// What the core refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A transition was asked for in a state where it cannot happen.
    #[error("cannot {transition} a transaction that is {state}")]
    InvalidTransition {
        /// The transition asked for.
        transition: &'static str,
        /// The state the transaction is in.
        state: &'static str,
    },
    /// A self-update trial transition was asked for in a state where it cannot happen.
    #[error("cannot {transition} a self-update trial that is {state}")]
    InvalidTrialTransition {
        /// The transition asked for.
        transition: &'static str,
        /// The state the trial is in.
        state: &'static str,
    },
    /// The version was rolled back on this device before (I8).
    #[error(
        "version {version} is quarantined on this device: it was rolled back ({reason}); force to install it again"
    )]
    Quarantined {
        /// The version.
        version: String,
        /// Why it was rolled back.
        reason: String,
    },
    /// The bundle's security version is below the device's counter (anti-rollback).
    #[error("downgrade: security version {offered} is below the device's {current}")]
    Downgrade {
        /// The offered security version.
        offered: u64,
        /// The device's counter.
        current: u64,
    },
    /// The offered version is older than the running one.
    #[error("version {offered} is older than the running {running}; force to install it")]
    OlderVersion {
        /// The offered version.
        offered: String,
        /// The running version.
        running: String,
    },
    /// A group name is not acceptable.
    #[error("bad group name {0:?}")]
    BadGroup(String),
}

impl Error {
    /// The stable machine code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidTransition { .. } | Error::InvalidTrialTransition { .. } => {
                "invalid-transition"
            }
            Error::Quarantined { .. } => "quarantined",
            Error::Downgrade { .. } => "downgrade",
            Error::OlderVersion { .. } => "older-version",
            Error::BadGroup(_) => "bad-name",
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
