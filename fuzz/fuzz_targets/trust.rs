//! Fuzzes the trust root loader: no panic on any input.
#![no_main]

use abide_bundle::{ExpirationEnforcement, Limits, TrustRoot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = "2026-11-29T00:00:00Z".parse().expect("time");
    let _ = TrustRoot::load(data, now, ExpirationEnforcement::Safe, &Limits::default());
});
