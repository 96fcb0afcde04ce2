//! Fuzzes the bundle reader end to end: open, verify against a fixed trust root, read every
//! component. No panic, no hang, memory bounded by the limits.
#![no_main]

use abide_bundle::{BundleReader, ExpirationEnforcement, Limits, Policy, SecretKey, TrustRoot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_seed([1; 32]);
    let trust = TrustRoot::create(1, vec![key.public()], 1, None, &[&key]).expect("trust root");
    let policy = Policy {
        trust: &trust,
        now: "2026-11-29T00:00:00Z".parse().expect("time"),
        expiration: ExpirationEnforcement::Safe,
        compatible: None,
        min_security_version: 0,
    };
    let Ok(reader) = BundleReader::open(data, Limits::default()) else { return };
    let _ = reader.manifest_unverified();
    if let Ok(mut bundle) = reader.verify(&policy) {
        let _ = bundle.verify_rest();
    }
});
