//! ed25519 signing keys, their text files, key ids and the domain-separated signing messages.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::digest::{Digest, decode_hex, encode_hex};
use crate::error::{Error, Result};

/// The prefix of every message signed over a bundle manifest.
pub const MANIFEST_DOMAIN: &[u8] = b"abide-manifest-v1";
/// The prefix of every message signed over the `signed` part of a trust root.
pub const TRUST_DOMAIN: &[u8] = b"abide-trust-v1";

const SECRET_TAG: &str = "abide-secret-key ed25519 ";
const PUBLIC_TAG: &str = "abide-public-key ed25519 ";

/// The id of a public key: the first 16 bytes of the SHA-256 of its 32 bytes, in hex.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// The id of `public`.
    pub fn of(public: &PublicKey) -> KeyId {
        KeyId::of_bytes(public.as_bytes())
    }

    /// The id of 32 public key bytes, whether or not they are a valid key.
    pub fn of_bytes(public: &[u8; 32]) -> KeyId {
        KeyId(encode_hex(&Digest::of(public).0[..16]))
    }

    /// The id as 32 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// A public key from its 32 bytes, refusing bytes that are not a valid curve point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublicKey> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| Error::BadKey {
            what: "32 bytes that are not an ed25519 public key".into(),
        })?;
        Ok(PublicKey(bytes))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<PublicKey> {
        let bytes = decode_hex(s)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Error::BadKey {
                what: "a public key must be 64 hex digits".into(),
            })?;
        PublicKey::from_bytes(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        KeyId::of(self)
    }

    /// Parses a `.pub` file: `abide-public-key ed25519 <64 hex digits>` and a newline.
    pub fn from_file_text(text: &str) -> Result<PublicKey> {
        let hex = text
            .strip_suffix('\n')
            .unwrap_or(text)
            .strip_prefix(PUBLIC_TAG)
            .ok_or_else(|| Error::BadKey {
                what: format!("a public key file starts with {PUBLIC_TAG:?}"),
            })?;
        PublicKey::from_hex(hex)
    }

    /// The text of a `.pub` file.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_TAG}{}\n", self.to_hex())
    }

    /// Checks a signature over `domain` + `message` with the strict rules (no malleable or
    /// small-order encodings).
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        key.verify_strict(&[domain, message].concat(), &signature)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

/// An ed25519 secret key. Its bytes never appear in `Debug` output.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// The key derived from a 32-byte seed (which the caller draws from the OS).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// Parses a `.key` file: `abide-secret-key ed25519 <64 hex digits>` and a newline.
    pub fn from_file_text(text: &str) -> Result<SecretKey> {
        let hex = text
            .strip_suffix('\n')
            .unwrap_or(text)
            .strip_prefix(SECRET_TAG)
            .ok_or_else(|| Error::BadKey {
                what: format!("a secret key file starts with {SECRET_TAG:?}"),
            })?;
        let seed = decode_hex(hex)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Error::BadKey {
                what: "a secret key must be 64 hex digits".into(),
            })?;
        Ok(SecretKey::from_seed(seed))
    }

    /// The text of a `.key` file.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_TAG}{}\n", encode_hex(self.0.as_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `domain` + `message`.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> [u8; 64] {
        self.0.sign(&[domain, message].concat()).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_signatures_are_domain_separated() {
        let key = SecretKey::from_seed([7; 32]);
        let again = SecretKey::from_file_text(&key.to_file_text()).unwrap();
        let public = PublicKey::from_file_text(&key.public().to_file_text()).unwrap();
        assert_eq!(again.public(), public);
        let sig = key.sign(MANIFEST_DOMAIN, b"{}");
        assert!(public.verify(MANIFEST_DOMAIN, b"{}", &sig));
        assert!(!public.verify(TRUST_DOMAIN, b"{}", &sig));
        assert!(!public.verify(MANIFEST_DOMAIN, b"{ }", &sig));
        assert_eq!(
            PublicKey::from_file_text("ed25519 00").unwrap_err().code(),
            "bad-key"
        );
        assert_eq!(public.id().as_str().len(), 32);
    }
}
