//! The Abide device agent as a library: what runs on the device around the pure engine of
//! `abide-core` — configuration, the state file, the audit log, slots, the install pipeline,
//! the boot step and the health gate.

pub mod api;
pub mod app;
pub mod audit;
pub mod backup;
pub mod book;
pub mod boot;
pub mod command;
pub mod config;
pub mod daemon;
pub mod device;
mod error;
pub mod fleet;
pub mod health;
pub mod hooks;
pub mod index;
pub mod init;
pub mod install;
mod json_file;
pub mod lock;
pub mod metrics;
pub mod room;
pub mod running;
pub mod scheduled;
pub mod selfupdate;
pub mod shared;
pub mod slots;
pub mod state;
pub mod trust;

pub use error::{AgentError, Result};
