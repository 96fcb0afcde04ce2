//! Abide's decision logic, free of I/O: what a device does next given what happened.
//!
//! Nothing here reads a clock, touches a file, sleeps or spawns: the current time comes in as
//! an argument, and decisions come out as values (a new state and the [`Action`]s to take, in
//! order). The agent performs the actions and makes them durable; tests drive this crate with
//! tables of inputs and expected outputs.

pub mod agent;
pub mod app;
pub mod duration;
mod error;
pub mod fleet;
pub mod health;
pub mod lease;
pub mod quarantine;
pub mod rollout;
pub mod schedule;
pub mod selfupdate;
pub mod transaction;
pub mod window;

pub use error::{Error, Result};
pub use health::{CheckOutcome, CheckResult, Criticality, HealthPolicy, Verdict, verdict};
pub use quarantine::{Force, Installed, Quarantine, QuarantineEntry, admit};
pub use transaction::{
    Action, BootPolicy, BootReport, FailReason, Gate, Group, RollbackReason, Transaction, TxState,
};
