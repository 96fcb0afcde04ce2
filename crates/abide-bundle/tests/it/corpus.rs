//! Every attack in the corpus is refused by the check it targets, and the base bundle passes.

use std::collections::BTreeMap;

use abide_testkit::corpus::{attacks, base, policy_inputs};

use abide_bundle::chunks::Checks;

use crate::{verify, verify_with};

#[test]
fn the_base_bundle_passes_the_corpus_policy() {
    let manifest = verify(&base(), &abide_testkit::trust(&[0, 1], 1)).unwrap();
    assert_eq!(manifest.components.len(), 2);
}

#[test]
fn every_attack_is_refused_with_its_own_code() {
    let attacks = attacks();
    assert!(
        attacks.len() >= 40,
        "the corpus has {} attacks",
        attacks.len()
    );
    let mut wrong = Vec::new();
    let mut codes = BTreeMap::new();
    for attack in &attacks {
        let (keys, threshold) = policy_inputs(attack);
        let trust = abide_testkit::trust(keys, threshold);
        // Every attack but a writer's bug is refused by the default single pass; every one by
        // the check of every hash, with the same code.
        if !attack.writer_bug
            && let Err(e) = verify_with(&attack.bytes, &trust, Checks::Stored)
            && e.code() != attack.code
        {
            wrong.push(format!(
                "{}: refused by one pass as {} ({e}), expected {}",
                attack.name,
                e.code(),
                attack.code
            ));
        }
        if attack.writer_bug {
            match verify_with(&attack.bytes, &trust, Checks::Stored) {
                Ok(_) => {}
                Err(e) => wrong.push(format!(
                    "{}: a writer's bug refused by one pass ({e}): is a hash pass back?",
                    attack.name
                )),
            }
        }
        match verify_with(&attack.bytes, &trust, Checks::Every) {
            Ok(_) => wrong.push(format!("{}: accepted", attack.name)),
            Err(e) if e.code() != attack.code => wrong.push(format!(
                "{}: refused as {} ({e}), expected {}",
                attack.name,
                e.code(),
                attack.code
            )),
            Err(_) => *codes.entry(attack.code).or_insert(0) += 1,
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The corpus exercises every check, not one check many times.
    for code in [
        "truncated",
        "bad-format",
        "non-canonical",
        "limit-exceeded",
        "bad-name",
        "unsigned",
        "untrusted-key",
        "bad-signature",
        "signature-threshold",
        "expired",
        "incompatible",
        "downgrade",
        "chunk-table-digest",
        "size-mismatch",
        "chunk-corrupt",
        "decompression-bomb",
        "chunk-digest",
        "component-digest",
    ] {
        assert!(codes.contains_key(code), "no attack is refused as {code}");
    }
    let names: std::collections::BTreeSet<_> = attacks.iter().map(|a| &a.name).collect();
    assert_eq!(names.len(), attacks.len(), "attack names are unique");
}
