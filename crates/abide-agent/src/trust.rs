//! The device's trust root: the one in the configuration (`trust = …`, shipped with the
//! system), or, once the fleet rotated it, `STATE_DIR/trust.json`, the newest root the device
//! accepted. A successor is accepted only as the rotation rule allows (version N+1, signed by a
//! threshold of N's keys and of its own), and stored atomically; anything else is refused and
//! changes nothing.

use std::path::PathBuf;

use abide_bundle::{ExpirationEnforcement, Limits, TrustRoot};
use abide_fs::persist::{read_bounded, write_atomic};
use jiff::Timestamp;

use crate::config::Config;
use crate::error::Result;

/// Where the root the device holds is.
pub fn path(config: &Config) -> PathBuf {
    let rotated = config.state_dir.join("trust.json");
    if rotated.exists() {
        rotated
    } else {
        config.trust.clone()
    }
}

/// The bytes of the root the device holds.
pub fn bytes(config: &Config) -> Result<Vec<u8>> {
    Ok(read_bounded(
        &path(config),
        Limits::default().max_trust_bytes,
    )?)
}

/// The root the device holds, as it stands at `now` (an expired one is refused).
pub fn root(config: &Config, now: Timestamp) -> Result<TrustRoot> {
    Ok(TrustRoot::load(
        &bytes(config)?,
        now,
        ExpirationEnforcement::Safe,
        &Limits::default(),
    )?)
}

/// The admission every bundle and delta passes on this device before anything else about it
/// is looked at: the root the device holds at `now`, the policy under it (signatures, expiry,
/// the hardware id, a security version not below `security_version`), `verify` run under
/// that policy, and the product of what it verified (`manifest` finds its manifest).
pub fn admit<V>(
    config: &Config,
    security_version: u64,
    now: Timestamp,
    verify: impl FnOnce(&abide_bundle::Policy<'_>) -> std::result::Result<V, abide_bundle::Error>,
    manifest: impl FnOnce(&V) -> &abide_bundle::Manifest,
) -> Result<V> {
    let trust = root(config, now)?;
    let verified = verify(&policy(config, &trust, security_version, now))?;
    check_product(config, manifest(&verified))?;
    Ok(verified)
}

/// Refuses a bundle made for another product than this device's (`wrong-product`).
fn check_product(config: &Config, manifest: &abide_bundle::Manifest) -> Result<()> {
    if manifest.product.as_str() != config.product {
        return Err(crate::error::AgentError::WrongProduct {
            bundle: manifest.product.to_string(),
            device: config.product.clone(),
        });
    }
    Ok(())
}

/// What a bundle for this device must satisfy under `trust` at `now`: signatures, expiry, the
/// device's hardware id, and a security version not below the device's counter.
fn policy<'a>(
    config: &'a Config,
    trust: &'a TrustRoot,
    security_version: u64,
    now: Timestamp,
) -> abide_bundle::Policy<'a> {
    abide_bundle::Policy {
        trust,
        now,
        expiration: ExpirationEnforcement::Safe,
        compatible: Some(&config.compatible),
        min_security_version: security_version,
    }
}

/// The version of the root the device holds (an expired root still has a version).
pub fn version(config: &Config) -> Result<u64> {
    let root = TrustRoot::load(
        &bytes(config)?,
        Timestamp::now(),
        ExpirationEnforcement::Unsafe,
        &Limits::default(),
    )?;
    Ok(root.version())
}

/// What [`accept`] did.
#[derive(Debug)]
pub struct Rotation {
    /// The version held before.
    pub from: u64,
    /// The version held now.
    pub to: u64,
    /// Why the first root that was not taken was refused, if one was.
    pub refused: Option<crate::AgentError>,
}

/// Takes the successors in `bodies` (oldest first) one by one, each stored before the next is
/// looked at; stops at the first that does not follow.
pub fn accept(config: &Config, bodies: &[String], now: Timestamp) -> Result<Rotation> {
    let limits = Limits::default();
    let mut current =
        TrustRoot::load(&bytes(config)?, now, ExpirationEnforcement::Unsafe, &limits)?;
    let from = current.version();
    let mut refused = None;
    for body in bodies {
        let next = TrustRoot::load(body.as_bytes(), now, ExpirationEnforcement::Safe, &limits)
            .and_then(|next| current.verify_successor(&next).map(|()| next));
        match next {
            Ok(next) => {
                write_atomic(&config.state_dir.join("trust.json"), body.as_bytes(), 0o644)?;
                current = next;
            }
            Err(e) => {
                refused = Some(e.into());
                break;
            }
        }
    }
    Ok(Rotation {
        from,
        to: current.version(),
        refused,
    })
}
