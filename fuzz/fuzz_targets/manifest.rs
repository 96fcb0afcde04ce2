//! Fuzzes the manifest parser: no panic on any input, and whatever parses re-encodes to exactly
//! the bytes it came from (canonical form is a bijection).
#![no_main]

use abide_bundle::{Limits, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data, &Limits::default()) {
        let again = manifest.to_canonical().expect("a parsed manifest encodes");
        assert_eq!(again, data, "a parsed manifest re-encodes to other bytes");
    }
});
