//! The one error type of the bundle crate, with a stable machine code per failed check.

use std::io;

use crate::digest::Digest;
use crate::keys::KeyId;

/// Everything that can go wrong while reading, writing or verifying a bundle or a trust root.
///
/// Each variant names the check that failed and carries what it is about; [`Error::code`] gives
/// the stable machine code that `--json` output and scripts rely on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the input or writing the output failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The input ended before a structure was complete.
    #[error("truncated: {what} ends early at byte {offset}")]
    Truncated {
        /// The structure that was being read.
        what: &'static str,
        /// The byte offset where the input ended.
        offset: u64,
    },
    /// The input is not laid out as the format requires.
    #[error("bad format: {what}")]
    BadFormat {
        /// What is wrong.
        what: String,
    },
    /// A signed JSON document is not in canonical form.
    #[error("non-canonical {document}: {what}")]
    NonCanonical {
        /// Which document.
        document: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A size or count read from the input is larger than the configured [`crate::Limits`].
    #[error("limit exceeded: {what} is {value}, the limit is {limit}")]
    LimitExceeded {
        /// The quantity that is too large.
        what: String,
        /// Its value in the input.
        value: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// A name that may reach a file system is not acceptable.
    #[error("bad name in {field}: {value:?} {reason}")]
    BadName {
        /// The field holding the name.
        field: String,
        /// The offending value (shortened if long).
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The bundle carries no signature at all.
    #[error("unsigned: the bundle carries no signature")]
    Unsigned,
    /// No signature on the bundle is by a key the trust root knows.
    #[error("untrusted key: no signature is by a key of the trust root (signed by {keys:?})")]
    UntrustedKey {
        /// The ids of the keys that did sign.
        keys: Vec<KeyId>,
    },
    /// A signature does not verify: by a trusted key, or by any key in a bundle a trusted key
    /// signed.
    #[error("bad signature: the signature by key {key} does not verify")]
    BadSignature {
        /// The key whose signature failed.
        key: KeyId,
    },
    /// Fewer distinct trusted keys signed than the threshold needs.
    #[error(
        "signature threshold not met: {valid} distinct {role}key(s) signed, {threshold} needed"
    )]
    SignatureThreshold {
        /// Distinct keys with a valid signature.
        valid: usize,
        /// How many are needed.
        threshold: usize,
        /// Which key set was counted (`""`, `"old "`, `"new "`).
        role: &'static str,
    },
    /// The bundle is past its expiry time.
    #[error("expired: the bundle expired at {expires}")]
    Expired {
        /// When it expired.
        expires: String,
    },
    /// The trust root is past its expiry time.
    #[error("trust root expired at {expires}")]
    TrustExpired {
        /// When it expired.
        expires: String,
    },
    /// The trust root itself is malformed or inconsistent.
    #[error("bad trust root: {what}")]
    BadTrust {
        /// What is wrong.
        what: String,
    },
    /// A trust root does not follow from its predecessor.
    #[error("trust rotation refused: {what}")]
    TrustRotation {
        /// What is wrong.
        what: String,
    },
    /// A key file is malformed.
    #[error("bad key: {what}")]
    BadKey {
        /// What is wrong.
        what: String,
    },
    /// The bundle is not made for this hardware.
    #[error("incompatible: {compatible:?} is not among the bundle's compatible ids {bundle:?}")]
    Incompatible {
        /// The hardware id asked for.
        compatible: String,
        /// The ids the bundle lists.
        bundle: Vec<String>,
    },
    /// The bundle's security version is below the minimum (anti-rollback).
    #[error("downgrade: security version {security_version} is below the minimum {minimum}")]
    Downgrade {
        /// The bundle's security version.
        security_version: u64,
        /// The minimum accepted.
        minimum: u64,
    },
    /// A component's chunk table does not match the digest in the manifest.
    #[error("chunk table digest mismatch in component {component}")]
    ChunkTableDigest {
        /// The component.
        component: String,
    },
    /// Sizes declared in the manifest and the chunk table disagree.
    #[error("size mismatch in component {component}: {what}")]
    SizeMismatch {
        /// The component.
        component: String,
        /// What disagrees.
        what: String,
    },
    /// A chunk's stored bytes are not a valid compressed chunk.
    #[error("corrupt chunk {index} of component {component}: {what}")]
    ChunkCorrupt {
        /// The component.
        component: String,
        /// The chunk's index in its table.
        index: usize,
        /// What is wrong.
        what: String,
    },
    /// A chunk decompresses to more bytes than its table entry declares.
    #[error(
        "decompression bomb: chunk {index} of component {component} expands past its declared {declared} bytes"
    )]
    DecompressionBomb {
        /// The component.
        component: String,
        /// The chunk's index in its table.
        index: usize,
        /// The declared length.
        declared: u32,
    },
    /// A chunk's content does not hash to its name.
    #[error("chunk digest mismatch: chunk {index} of component {component} is not {expected}")]
    ChunkDigest {
        /// The component.
        component: String,
        /// The chunk's index in its table.
        index: usize,
        /// The digest the table names.
        expected: Digest,
    },
    /// A chunk's stored bytes do not hash to the digest its table entry gives them.
    #[error(
        "chunk digest mismatch: the stored bytes of chunk {index} of component {component} are not {expected}"
    )]
    StoredDigest {
        /// The component.
        component: String,
        /// The chunk's index in its table.
        index: usize,
        /// The digest the table gives.
        expected: Digest,
    },
    /// A component's whole content does not hash to the manifest's digest.
    #[error("component digest mismatch: {component} is {actual}, the manifest says {expected}")]
    ComponentDigest {
        /// The component.
        component: String,
        /// The digest in the manifest.
        expected: Digest,
        /// The digest of the content.
        actual: Digest,
    },
    /// No component of that name is in the bundle.
    #[error("no component named {name:?} in the bundle")]
    UnknownComponent {
        /// The name asked for.
        name: String,
    },
    /// The key already signed this bundle.
    #[error("duplicate signature: key {key} already signed this bundle")]
    DuplicateSignature {
        /// The key.
        key: KeyId,
    },
    /// An argument given by the caller is not usable.
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
    /// A delta is made against content this device does not hold (another release, or a
    /// slot whose chunks differ), or cannot be applied to the slot it is for.
    #[error("delta base mismatch in {component}: {what}")]
    DeltaBase {
        /// The component (or slot class) concerned.
        component: String,
        /// What does not match.
        what: String,
    },
}

impl Error {
    /// The stable machine code of the failed check (`truncated`, `signature-threshold`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Truncated { .. } => "truncated",
            Error::BadFormat { .. } => "bad-format",
            Error::NonCanonical { .. } => "non-canonical",
            Error::LimitExceeded { .. } => "limit-exceeded",
            Error::BadName { .. } => "bad-name",
            Error::Unsigned => "unsigned",
            Error::UntrustedKey { .. } => "untrusted-key",
            Error::BadSignature { .. } => "bad-signature",
            Error::SignatureThreshold { .. } => "signature-threshold",
            Error::Expired { .. } => "expired",
            Error::TrustExpired { .. } => "trust-expired",
            Error::BadTrust { .. } => "bad-trust-root",
            Error::TrustRotation { .. } => "trust-rotation",
            Error::BadKey { .. } => "bad-key",
            Error::Incompatible { .. } => "incompatible",
            Error::Downgrade { .. } => "downgrade",
            Error::ChunkTableDigest { .. } => "chunk-table-digest",
            Error::SizeMismatch { .. } => "size-mismatch",
            Error::ChunkCorrupt { .. } => "chunk-corrupt",
            Error::DecompressionBomb { .. } => "decompression-bomb",
            Error::ChunkDigest { .. } | Error::StoredDigest { .. } => "chunk-digest",
            Error::ComponentDigest { .. } => "component-digest",
            Error::UnknownComponent { .. } => "unknown-component",
            Error::DuplicateSignature { .. } => "duplicate-signature",
            Error::InvalidArgument { .. } => "invalid-argument",
            Error::DeltaBase { .. } => "delta-base",
        }
    }

    pub(crate) fn bad_format(what: impl Into<String>) -> Self {
        Error::BadFormat { what: what.into() }
    }

    pub(crate) fn limit(what: impl Into<String>, value: u64, limit: u64) -> Self {
        Error::LimitExceeded {
            what: what.into(),
            value,
            limit,
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
