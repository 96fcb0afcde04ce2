//! The device's side of the fleet: enrolment, check-ins with the device's true inventory,
//! verified assignments, downloads straight into the target slot over HTTP Range requests,
//! activation in maintenance windows under a reboot lease, and reports queued durably until
//! the server has them. The decisions are `abide_core::fleet::decide`; this module carries
//! them out (`agent::run` is the `abide agent` daemon).

pub mod agent;
pub mod source;
pub mod store;
