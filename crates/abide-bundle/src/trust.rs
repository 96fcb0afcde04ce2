//! The trust root: which keys may sign bundles, how many must agree, and how it rotates.
//!
//! A trust root file (`trust.json`) is `{"signed": {...}, "signatures": [...]}`. The signatures
//! are over `abide-trust-v1` followed by the canonical JSON of `signed`. A trust root is
//! self-signed by a threshold of its own keys; version N+1 is accepted in place of version N only
//! when it is also signed by a threshold of version N's keys.

use std::collections::{BTreeSet, HashSet};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::canonical::to_canonical;
use crate::digest::{decode_hex, encode_hex};
use crate::error::{Error, Result};
use crate::keys::{KeyId, PublicKey, SecretKey, TRUST_DOMAIN};
use crate::limits::Limits;
use crate::time::{ExpirationEnforcement, format_time, parse_time};

const TRUST_TYPE: &str = "abide-trust";

/// A validated trust root.
#[derive(Debug, Clone)]
pub struct TrustRoot {
    version: u64,
    threshold: usize,
    expires: Option<Timestamp>,
    keys: Vec<PublicKey>,
    signatures: Vec<RawSignature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    signed: RawSigned,
    signatures: Vec<RawSignature>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigned {
    #[serde(rename = "type")]
    kind: String,
    version: u64,
    threshold: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    keys: Vec<RawKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    public: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    key: String,
    sig: String,
}

impl TrustRoot {
    /// Makes trust root `version` over `keys`, signed by `signers`.
    ///
    /// Refuses a threshold of 0, a threshold above the number of keys, duplicate key material,
    /// and signers that do not reach the threshold of the new keys.
    pub fn create(
        version: u64,
        keys: Vec<PublicKey>,
        threshold: usize,
        expires: Option<Timestamp>,
        signers: &[&SecretKey],
    ) -> Result<TrustRoot> {
        let mut root = TrustRoot {
            version,
            threshold,
            expires,
            keys,
            signatures: Vec::new(),
        };
        root.check_shape()?;
        let message = root.signed_bytes()?;
        let mut seen = HashSet::new();
        for signer in signers {
            if seen.insert(signer.public()) {
                root.signatures.push(RawSignature {
                    key: signer.public().id().to_string(),
                    sig: encode_hex(&signer.sign(TRUST_DOMAIN, &message)),
                });
            }
        }
        let valid = root.count_valid(&root.keys, &message);
        if valid < threshold {
            return Err(Error::SignatureThreshold {
                valid,
                threshold,
                role: "",
            });
        }
        Ok(root)
    }

    /// Parses and checks a trust root file: shape, self-signature threshold and expiry.
    pub fn load(
        bytes: &[u8],
        now: Timestamp,
        expiration: ExpirationEnforcement,
        limits: &Limits,
    ) -> Result<TrustRoot> {
        if bytes.len() > limits.max_trust_bytes {
            return Err(Error::limit(
                "trust root bytes",
                bytes.len() as u64,
                limits.max_trust_bytes as u64,
            ));
        }
        let raw: RawTrust = serde_json::from_slice(bytes).map_err(|e| Error::BadTrust {
            what: format!("not a trust root: {e}"),
        })?;
        if raw.signed.kind != TRUST_TYPE {
            return Err(Error::BadTrust {
                what: format!("type is {:?}, expected {TRUST_TYPE:?}", raw.signed.kind),
            });
        }
        if raw.signed.keys.len() > limits.max_trust_keys {
            return Err(Error::limit(
                "trust root keys",
                raw.signed.keys.len() as u64,
                limits.max_trust_keys as u64,
            ));
        }
        if raw.signatures.len() > limits.max_trust_keys * 2 {
            return Err(Error::limit(
                "trust root signatures",
                raw.signatures.len() as u64,
                limits.max_trust_keys as u64 * 2,
            ));
        }
        let mut keys = Vec::with_capacity(raw.signed.keys.len());
        for key in &raw.signed.keys {
            let public = PublicKey::from_hex(&key.public).map_err(|e| Error::BadTrust {
                what: e.to_string(),
            })?;
            if public.id().as_str() != key.id {
                return Err(Error::BadTrust {
                    what: format!(
                        "key id {} does not match its public key (id {})",
                        key.id,
                        public.id()
                    ),
                });
            }
            keys.push(public);
        }
        let expires = raw
            .signed
            .expires
            .as_deref()
            .map(|s| parse_time("trust root expires", s))
            .transpose()
            .map_err(|e| Error::BadTrust {
                what: e.to_string(),
            })?;
        let root = TrustRoot {
            version: raw.signed.version,
            threshold: usize::try_from(raw.signed.threshold).unwrap_or(usize::MAX),
            expires,
            keys,
            signatures: raw.signatures,
        };
        root.check_shape()?;
        let message = root.signed_bytes()?;
        let valid = root.count_valid(&root.keys, &message);
        if valid < root.threshold {
            return Err(Error::SignatureThreshold {
                valid,
                threshold: root.threshold,
                role: "",
            });
        }
        if let (ExpirationEnforcement::Safe, Some(expires)) = (expiration, root.expires)
            && expires <= now
        {
            return Err(Error::TrustExpired {
                expires: format_time(expires),
            });
        }
        Ok(root)
    }

    /// Checks that `next` may replace `self`: version exactly one higher, signed by a threshold
    /// of this root's keys and by a threshold of its own keys.
    pub fn verify_successor(&self, next: &TrustRoot) -> Result<()> {
        if Some(next.version) != self.version.checked_add(1) {
            return Err(Error::TrustRotation {
                what: format!(
                    "version {} does not follow version {}",
                    next.version, self.version
                ),
            });
        }
        let message = next.signed_bytes()?;
        let old = next.count_valid(&self.keys, &message);
        if old < self.threshold {
            return Err(Error::SignatureThreshold {
                valid: old,
                threshold: self.threshold,
                role: "old ",
            });
        }
        let new = next.count_valid(&next.keys, &message);
        if new < next.threshold {
            return Err(Error::SignatureThreshold {
                valid: new,
                threshold: next.threshold,
                role: "new ",
            });
        }
        Ok(())
    }

    /// Makes the successor of this root: version + 1 over `keys`, signed by `signers`, and
    /// checked with [`TrustRoot::verify_successor`].
    pub fn rotate(
        &self,
        keys: Vec<PublicKey>,
        threshold: usize,
        expires: Option<Timestamp>,
        signers: &[&SecretKey],
    ) -> Result<TrustRoot> {
        let version = self
            .version
            .checked_add(1)
            .ok_or_else(|| Error::TrustRotation {
                what: "version cannot rise further".into(),
            })?;
        let mut next = TrustRoot {
            version,
            threshold,
            expires,
            keys,
            signatures: Vec::new(),
        };
        next.check_shape()?;
        let message = next.signed_bytes()?;
        let mut seen = HashSet::new();
        for signer in signers {
            if seen.insert(signer.public()) {
                next.signatures.push(RawSignature {
                    key: signer.public().id().to_string(),
                    sig: encode_hex(&signer.sign(TRUST_DOMAIN, &message)),
                });
            }
        }
        self.verify_successor(&next)?;
        Ok(next)
    }

    /// The trust root file's bytes (pretty-printed JSON; the signatures cover the canonical
    /// encoding of `signed`, not this layout).
    pub fn to_file_bytes(&self) -> Result<Vec<u8>> {
        let raw = RawTrust {
            signed: self.raw_signed(),
            signatures: self.signatures.clone(),
        };
        let mut out = serde_json::to_vec_pretty(&raw).map_err(|e| Error::BadTrust {
            what: e.to_string(),
        })?;
        out.push(b'\n');
        Ok(out)
    }

    /// The version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many distinct keys must sign.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// When the root expires, if ever.
    pub fn expires(&self) -> Option<Timestamp> {
        self.expires
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Whether `key` is one of the trusted keys.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    fn check_shape(&self) -> Result<()> {
        if self.version == 0 {
            return Err(Error::BadTrust {
                what: "version must be at least 1".into(),
            });
        }
        if self.threshold == 0 {
            return Err(Error::BadTrust {
                what: "a threshold of 0 would trust anything and is refused".into(),
            });
        }
        let distinct: HashSet<_> = self.keys.iter().collect();
        if distinct.len() != self.keys.len() {
            return Err(Error::BadTrust {
                what: "the same key material is listed twice".into(),
            });
        }
        if self.threshold > self.keys.len() {
            return Err(Error::BadTrust {
                what: format!(
                    "threshold {} is more than the {} keys",
                    self.threshold,
                    self.keys.len()
                ),
            });
        }
        Ok(())
    }

    fn raw_signed(&self) -> RawSigned {
        RawSigned {
            kind: TRUST_TYPE.into(),
            version: self.version,
            threshold: self.threshold as u64,
            expires: self.expires.map(format_time),
            keys: self
                .keys
                .iter()
                .map(|k| RawKey {
                    id: k.id().to_string(),
                    public: k.to_hex(),
                })
                .collect(),
        }
    }

    fn signed_bytes(&self) -> Result<Vec<u8>> {
        to_canonical("trust root", &self.raw_signed())
    }

    /// How many distinct keys of `keys` made a valid signature over `message`.
    fn count_valid(&self, keys: &[PublicKey], message: &[u8]) -> usize {
        let mut counted = BTreeSet::new();
        for sig in &self.signatures {
            let Some(key) = keys.iter().find(|k| k.id().as_str() == sig.key) else {
                continue;
            };
            let Some(bytes) = decode_hex(&sig.sig).and_then(|b| <[u8; 64]>::try_from(b).ok())
            else {
                continue;
            };
            if key.verify(TRUST_DOMAIN, message, &bytes) {
                counted.insert(*key.as_bytes());
            }
        }
        counted.len()
    }

    /// The ids of this root's keys.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(PublicKey::id).collect()
    }
}
