//! Properties over random input: round trips for random component sets, every single-byte
//! change refused, and arbitrary bytes never panic the reader.

use abide_bundle::{BundleReader, Chunking, ExpirationEnforcement, Limits, Manifest, Policy};
use abide_testkit::{Fixture, key, trust};
use proptest::prelude::*;

const NAMES: [&str; 4] = ["rootfs", "kernel", "app", "config"];

fn small_chunking() -> Chunking {
    Chunking {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_component_sets_round_trip(
        contents in prop::collection::vec((0u64..1000, 0usize..40_000), 1..4),
    ) {
        let components: Vec<_> = contents
            .iter()
            .enumerate()
            .map(|(i, &(seed, len))| (NAMES[i], NAMES[i], NAMES[i], abide_testkit::image(len, seed)))
            .collect();
        let fixture = Fixture { components: components.clone(), chunking: small_chunking(), ..Fixture::default() };
        let bytes = fixture.build(&[&key(0)]);
        let t = trust(&[0], 1);
        let policy = Policy { trust: &t, now: abide_testkit::now(), expiration: ExpirationEnforcement::Safe,
                              compatible: None, min_security_version: 0 };
        let mut bundle = BundleReader::open(bytes.as_slice(), Limits::default()).unwrap().verify(&policy).unwrap();
        for (name, _, _, want) in &components {
            let mut got = Vec::new();
            let c = bundle.read_component(&mut |d| { got.extend_from_slice(d); Ok(()) }).unwrap();
            prop_assert_eq!(c.name.as_str(), *name);
            prop_assert_eq!(&got, want);
        }
        bundle.finish().unwrap();
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = crate::verify(&data, &trust(&[0], 1));
        let _ = Manifest::parse(&data, &Limits::default());
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_head_never_panic(tail in prop::collection::vec(any::<u8>(), 0..8192)) {
        let bytes = small_bundle();
        let parts = abide_testkit::parts::Parts::split(&bytes);
        let mut forged = bytes[..parts.data_start(1)].to_vec();
        forged.extend_from_slice(&tail);
        prop_assert!(crate::verify(&forged, &trust(&[0], 1)).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_single_byte_change_is_refused(at in any::<prop::sample::Index>(), delta in 1u8..=255) {
        let bytes = small_bundle();
        let mut bad = bytes.clone();
        let i = at.index(bad.len());
        bad[i] = bad[i].wrapping_add(delta);
        let err = crate::verify(&bad, &trust(&[0, 1], 1));
        prop_assert!(err.is_err(), "changing byte {} of {} was accepted", i, bytes.len());
    }
}

#[test]
fn every_byte_of_a_small_bundle_is_covered() {
    // Exhaustively: each byte position, flipped, is refused.
    let bytes = small_bundle();
    let t = trust(&[0, 1], 1);
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x01;
        assert!(
            crate::verify(&bad, &t).is_err(),
            "flipping byte {i} of {} was accepted",
            bytes.len()
        );
    }
}

fn small_bundle() -> Vec<u8> {
    Fixture {
        components: vec![
            (
                "rootfs",
                "rootfs",
                "rootfs",
                abide_testkit::image(20_000, 3),
            ),
            ("app", "app", "app", abide_testkit::image(3_000, 4)),
        ],
        chunking: small_chunking(),
        ..Fixture::default()
    }
    .build(&[&key(0)])
}
