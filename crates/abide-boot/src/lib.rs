//! Abide's bootloader side: the on-disk formats bootloaders keep their state in, and (to come)
//! the backends that tell each bootloader which slot group to try and read back what it booted.
//!
//! Formats parse from bytes and serialize to bytes; the caller reads and writes the medium.

pub mod grubenv;

pub use grubenv::{GrubEnv, GrubEnvError};
