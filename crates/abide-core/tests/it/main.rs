//! The core's decisions as tables: (state, input, now) → (state, actions).

// The tests read files and clocks; the library may not (clippy.toml).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod agent;
mod app;
mod duration;
mod fleet;
mod health;
mod lease;
mod quarantine;
mod rollout;
mod schedule;
mod selfupdate;
mod tidy;
mod transaction;
mod window;

use jiff::Timestamp;

/// Minute `m` of the test day.
pub fn at(m: i64) -> Timestamp {
    Timestamp::from_second(1_798_000_000 + m * 60).unwrap()
}
