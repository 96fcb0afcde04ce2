//! The one interface every bootloader backend implements: load the state, store it whole.
//!
//! Backends translate between [`BootState`] and their bootloader's own format. Edits happen in
//! memory on the loaded state ([`BootState::apply`]); [`Bootloader::store`] writes it in one
//! durable step.

use std::path::PathBuf;

use crate::grubenv::GrubEnvError;
use crate::state::BootState;
use abide_fs::persist::IoError;

/// What a backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading or writing the medium failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The GRUB environment block is malformed.
    #[error("{path}: {source}")]
    Grub {
        /// The block's file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: GrubEnvError,
    },
    /// The stored state does not describe the configured groups.
    #[error("{path}: {what}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A bootloader backend.
pub trait Bootloader {
    /// The backend's name (`grub`, `sim`, …).
    fn name(&self) -> &'static str;
    /// Reads the bootloader's state.
    fn load(&self) -> Result<BootState, BootError>;
    /// Writes `state` in one durable, atomic step.
    fn store(&self, state: &BootState) -> Result<(), BootError>;
}
