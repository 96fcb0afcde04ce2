//! The binary layout: header, signature entries and chunk table entries.
//!
//! ```text
//! header      magic (8) | format u16 LE | flags u16 LE (0) | manifest_len u32 LE | signature_count u32 LE
//! manifest    manifest_len bytes of canonical JSON
//! signatures  signature_count × (public key 32 | ed25519 signature 64)
//! data        per component, in manifest order: chunk table, then its chunks
//! chunk table count × (SHA-256 of the chunk 32 | SHA-256 of its stored bytes 32 | length u32 LE | stored_length u32 LE)
//! chunk       one zstd frame of stored_length bytes that decompresses to length bytes, or, when
//!             the entry's two digests are equal, the content itself (a raw chunk)
//! ```

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::keys::PublicKey;
use crate::limits::Limits;

/// The first eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"\x89ABIDE\r\n";
/// The binary layout version this code reads and writes.
pub const LAYOUT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Length of one signature entry.
pub const SIGNATURE_ENTRY_LEN: usize = 96;
/// Length of one chunk table entry.
pub const CHUNK_ENTRY_LEN: usize = 72;

/// The fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Length of the manifest in bytes.
    pub manifest_len: u32,
    /// Number of signature entries.
    pub signature_count: u32,
}

impl Header {
    /// Decodes and bounds-checks a header.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header> {
        if bytes[..8] == crate::delta::DELTA_MAGIC {
            return Err(Error::bad_format(
                "an Abide delta, not a bundle (abide delta verify checks deltas)",
            ));
        }
        if bytes[..8] != MAGIC {
            return Err(Error::bad_format("not an Abide bundle (wrong magic)"));
        }
        let layout = u16::from_le_bytes([bytes[8], bytes[9]]);
        if layout != LAYOUT_VERSION {
            return Err(Error::bad_format(format!(
                "bundle layout version {layout} is not supported (expected {LAYOUT_VERSION})"
            )));
        }
        let flags = u16::from_le_bytes([bytes[10], bytes[11]]);
        if flags != 0 {
            return Err(Error::bad_format(format!(
                "unknown header flags {flags:#06x}"
            )));
        }
        let manifest_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let signature_count = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        if manifest_len == 0 {
            return Err(Error::bad_format("empty manifest"));
        }
        if manifest_len > limits.max_manifest_bytes {
            return Err(Error::limit(
                "manifest length",
                manifest_len.into(),
                limits.max_manifest_bytes.into(),
            ));
        }
        if signature_count > limits.max_signatures {
            return Err(Error::limit(
                "signature count",
                signature_count.into(),
                limits.max_signatures.into(),
            ));
        }
        Ok(Header {
            manifest_len,
            signature_count,
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.signature_count.to_le_bytes());
        out
    }

    /// Offset of the data section from the start of the bundle.
    pub fn data_start(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.manifest_len)
            + u64::from(self.signature_count) * SIGNATURE_ENTRY_LEN as u64
    }
}

/// One signature over the manifest, with the public key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    /// The 32 bytes of the signer's public key (not yet checked to be a valid point).
    pub public: [u8; 32],
    /// The signature.
    pub signature: [u8; 64],
}

impl SignatureEntry {
    /// Decodes one entry.
    pub fn decode(bytes: &[u8; SIGNATURE_ENTRY_LEN]) -> SignatureEntry {
        SignatureEntry {
            public: bytes[..32].try_into().expect("32 bytes"),
            signature: bytes[32..].try_into().expect("64 bytes"),
        }
    }

    /// Encodes one entry.
    pub fn encode(&self) -> [u8; SIGNATURE_ENTRY_LEN] {
        let mut out = [0u8; SIGNATURE_ENTRY_LEN];
        out[..32].copy_from_slice(&self.public);
        out[32..].copy_from_slice(&self.signature);
        out
    }

    /// The signer's key, if the bytes are a valid key.
    pub fn key(&self) -> Option<PublicKey> {
        PublicKey::from_bytes(self.public).ok()
    }
}

/// One chunk table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// SHA-256 of the uncompressed chunk: the chunk's name.
    pub digest: Digest,
    /// SHA-256 of the stored (compressed) bytes, checked before they reach the decompressor.
    pub stored_digest: Digest,
    /// Uncompressed length.
    pub length: u32,
    /// Stored (compressed) length.
    pub stored_length: u32,
}

impl ChunkEntry {
    /// Whether the chunk is stored raw: its stored bytes are its content, which the writer
    /// chooses when compression would not make it smaller. The two digests are then equal.
    pub fn is_raw(&self) -> bool {
        self.stored_digest == self.digest
    }

    /// Decodes one entry.
    pub fn decode(bytes: &[u8]) -> ChunkEntry {
        ChunkEntry {
            digest: Digest(bytes[..32].try_into().expect("32 bytes")),
            stored_digest: Digest(bytes[32..64].try_into().expect("32 bytes")),
            length: u32::from_le_bytes(bytes[64..68].try_into().expect("4 bytes")),
            stored_length: u32::from_le_bytes(bytes[68..72].try_into().expect("4 bytes")),
        }
    }

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.stored_digest.0);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.stored_length.to_le_bytes());
    }
}
