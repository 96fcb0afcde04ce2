//! The Abide device agent as a library: what runs on the device around the pure engine of
//! `abide-core` — so far the audit log; the install pipeline, the boot step and the health
//! gate build on it.

pub mod audit;
