//! Behaviour of the bundle format: round trips, the corpus of attacks, trust roots, and
//! properties over random input.

mod corpus;
mod delta;
mod props;
mod roundtrip;
mod tidy;
mod trust;

use abide_bundle::{BundleReader, ExpirationEnforcement, HardwareId, Limits, Policy, TrustRoot};

/// Verifies `bytes` completely (every component and the end of the stream) with the corpus
/// policy and returns the manifest or the error.
pub fn verify(bytes: &[u8], trust: &TrustRoot) -> abide_bundle::Result<abide_bundle::Manifest> {
    verify_with(bytes, trust, abide_bundle::chunks::Checks::default())
}

/// [`verify`], hashing as `checks` says.
pub fn verify_with(
    bytes: &[u8],
    trust: &TrustRoot,
    checks: abide_bundle::chunks::Checks,
) -> abide_bundle::Result<abide_bundle::Manifest> {
    let hw = HardwareId::parse("hw", abide_testkit::corpus::COMPATIBLE, 64).unwrap();
    let policy = Policy {
        trust,
        now: abide_testkit::now(),
        expiration: ExpirationEnforcement::Safe,
        compatible: Some(&hw),
        min_security_version: abide_testkit::corpus::MIN_SECURITY_VERSION,
    };
    let mut bundle = BundleReader::open(bytes, Limits::default())?.verify(&policy)?;
    bundle.set_checks(checks);
    bundle.verify_rest()?;
    Ok(bundle.manifest().clone())
}

/// The policy with no hardware or security-version requirement, at the test time.
pub fn any_device(trust: &TrustRoot) -> Policy<'_> {
    Policy {
        trust,
        now: abide_testkit::now(),
        expiration: ExpirationEnforcement::Safe,
        compatible: None,
        min_security_version: 0,
    }
}
