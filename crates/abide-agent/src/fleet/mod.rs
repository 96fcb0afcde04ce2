//! The device's side of the fleet: enrolment, check-ins with the device's true inventory,
//! verified assignments, downloads straight into the target slot over HTTP Range requests,
//! activation in maintenance windows under a reboot lease, and reports queued durably until
//! the server has them. The decisions are `abide_core::agent::next`; the daemon
//! (`crate::daemon`) carries them out with these parts.

pub mod source;
pub mod store;
