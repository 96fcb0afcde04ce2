//! Test keys, bundle fixtures and the corpus of hostile bundles used by Abide's tests.
//!
//! Everything here is deterministic: keys come from fixed seeds and images from a seeded
//! generator, so a failing test fails the same way every time.

pub mod corpus;
pub mod parts;
pub mod pg;
pub mod tidy;

use std::io::Cursor;

use abide_bundle::{BundleSpec, BundleWriter, Chunking, HardwareId, Name, SecretKey, TrustRoot};
use jiff::Timestamp;

/// The test key with number `n` (seeded from `n`, never random).
pub fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n.wrapping_add(1); 32])
}

/// A trust root version 1 over the test keys `keys` with `threshold`, self-signed by all of them.
pub fn trust(keys: &[u8], threshold: usize) -> TrustRoot {
    let secrets: Vec<SecretKey> = keys.iter().map(|&n| key(n)).collect();
    TrustRoot::create(
        1,
        secrets.iter().map(SecretKey::public).collect(),
        threshold,
        None,
        &secrets.iter().collect::<Vec<_>>(),
    )
    .expect("a valid test trust root")
}

/// `len` bytes of image-like content from `seed`: runs of random bytes, zeros and text, so
/// it both compresses and chunks like a real file system image.
pub fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(len);
    const WORDS: &[&str] = &[
        "usr", "lib", "systemd", "config", "abide", "kernel", "module", "0x7f", "=", "\n",
    ];
    while out.len() < len {
        let run = 1 + (rng.next_u64() % (48 << 10)) as usize;
        let end = (out.len() + run).min(len);
        match rng.next_u64() % 4 {
            0 => out.resize(end, 0),
            1 => {
                while out.len() < end {
                    let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
                    let take = w.len().min(end - out.len());
                    out.extend_from_slice(&w[..take]);
                }
            }
            _ => {
                while out.len() < end {
                    out.push(rng.next_u64() as u8);
                }
            }
        }
    }
    out
}

/// A small deterministic random number generator (SplitMix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What a fixture bundle says about itself.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// Product name.
    pub product: &'static str,
    /// Version.
    pub version: &'static str,
    /// Security version.
    pub security_version: u64,
    /// Hardware ids.
    pub compatible: Vec<&'static str>,
    /// Expiry.
    pub expires: Option<Timestamp>,
    /// (name, kind, slot class, content) per component.
    pub components: Vec<(&'static str, &'static str, &'static str, Vec<u8>)>,
    /// Chunking parameters.
    pub chunking: Chunking,
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture {
            product: "acme-gateway",
            version: "1.4.0",
            security_version: 5,
            compatible: vec!["acme-gw", "acme-gw-rev2"],
            expires: Some("2100-01-01T00:00:00Z".parse().expect("a time")),
            components: vec![
                ("rootfs", "rootfs", "rootfs", image(700_000, 1)),
                ("app", "app", "appfs", image(90_000, 2)),
            ],
            chunking: Chunking {
                min_size: 4 << 10,
                avg_size: 16 << 10,
                max_size: 64 << 10,
            },
        }
    }
}

impl Fixture {
    /// Builds the bundle in memory, signed by `signers`.
    pub fn build(&self, signers: &[&SecretKey]) -> Vec<u8> {
        let max = 64;
        let spec = BundleSpec {
            product: Name::parse("product", self.product, max).expect("valid"),
            compatible: self
                .compatible
                .iter()
                .map(|c| HardwareId::parse("compatible", c, max).expect("valid"))
                .collect(),
            version: semver::Version::parse(self.version).expect("valid"),
            security_version: self.security_version,
            created: "2026-11-01T12:00:00Z".parse().expect("a time"),
            expires: self.expires,
            hooks: Vec::new(),
            chunking: self.chunking,
            level: 3,
        };
        let mut writer = BundleWriter::new(spec, Cursor::new(Vec::new())).expect("valid spec");
        for (name, kind, slot, content) in &self.components {
            writer
                .add_component(
                    Name::parse("name", name, max).expect("valid"),
                    Name::parse("kind", kind, max).expect("valid"),
                    Name::parse("slot", slot, max).expect("valid"),
                    &mut content.as_slice(),
                )
                .expect("in-memory write");
        }
        let mut out = Vec::new();
        writer.finish(signers, &mut out).expect("in-memory write");
        out
    }
}

/// The time tests verify at.
pub fn now() -> Timestamp {
    "2026-11-29T00:00:00Z".parse().expect("a time")
}
