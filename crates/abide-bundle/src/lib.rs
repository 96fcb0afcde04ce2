//! The Abide bundle format: one signed file holding a manifest and the content of one or more
//! components, cut into content-defined, compressed, content-addressed chunks.
//!
//! This crate does no I/O of its own: it reads through [`std::io::Read`] and writes through
//! [`std::io::Write`] values its caller opens, and takes the current time as an argument.
//! `docs/bundle-format.md` is the byte-level specification.

pub mod canonical;
pub mod chunks;
pub mod delta;
pub mod delta_write;
pub mod digest;
mod error;
pub mod format;
pub mod keys;
mod limits;
pub mod manifest;
pub mod name;
pub mod pipeline;
pub mod read;
pub mod source;
pub mod time;
pub mod trust;
pub mod write;

pub use digest::Digest;
pub use error::{Error, Result};
pub use keys::{KeyId, PublicKey, SecretKey};
pub use limits::{Limits, stored_bound};
pub use manifest::{Chunking, Component, Manifest};
pub use name::{HardwareId, Name};
pub use read::{BundleReader, Policy, VerifiedBundle};
pub use source::{Source, Stream};
pub use time::ExpirationEnforcement;
pub use trust::TrustRoot;
pub use write::{BundleSpec, BundleWriter, add_signature};
