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

/// A transaction from A to B of `version`, in `state`.
pub fn tx(version: &str, state: abide_core::TxState) -> abide_core::Transaction {
    let (mut t, _) = abide_core::Transaction::begin(
        "tx-1",
        version.parse().unwrap(),
        1,
        abide_core::Group::new("A").unwrap(),
        abide_core::Group::new("B").unwrap(),
        at(0),
    )
    .unwrap();
    t.state = state;
    t
}
