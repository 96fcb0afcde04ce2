//! Trust roots: thresholds, distinct key material, expiry and rotation.

use abide_bundle::{ExpirationEnforcement, Limits, SecretKey, TrustRoot};
use abide_testkit::{Fixture, key, now, trust};

use crate::verify;

fn load_bytes(bytes: &[u8]) -> abide_bundle::Result<TrustRoot> {
    TrustRoot::load(
        bytes,
        now(),
        ExpirationEnforcement::Safe,
        &Limits::default(),
    )
}

/// The file of `root` as JSON, for editing.
fn file_json(root: &TrustRoot) -> serde_json::Value {
    serde_json::from_slice(&root.to_file_bytes().unwrap()).unwrap()
}

fn load(root: &TrustRoot) -> abide_bundle::Result<TrustRoot> {
    load_bytes(&root.to_file_bytes().unwrap())
}

#[test]
fn a_threshold_of_zero_or_above_the_key_count_is_refused() {
    let keys = vec![key(0).public(), key(1).public()];
    let err = TrustRoot::create(1, keys.clone(), 0, None, &[&key(0)]).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root");
    assert!(err.to_string().contains("threshold of 0"), "{err}");
    let err = TrustRoot::create(1, keys, 3, None, &[&key(0)]).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root");
}

#[test]
fn the_same_key_material_counts_once() {
    let err = TrustRoot::create(
        1,
        vec![key(0).public(), key(0).public()],
        2,
        None,
        &[&key(0)],
    )
    .unwrap_err();
    assert_eq!(err.code(), "bad-trust-root");
    // A hand-edited file listing one key twice is refused on load as well.
    let root = trust(&[0, 1], 1);
    let text = String::from_utf8(root.to_file_bytes().unwrap()).unwrap();
    let k1 = key(1).public();
    let forged = text
        .replace(&k1.to_hex(), &key(0).public().to_hex())
        .replace(k1.id().as_str(), key(0).public().id().as_str());
    let err = load_bytes(forged.as_bytes()).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root", "{err}");
    assert!(err.to_string().contains("listed twice"), "{err}");
    // So is one whose author listed a key twice and signed it properly: two entries of one key
    // must not meet a threshold of two.
    let listed_twice = signed_file(
        &serde_json::json!({
            "type": "abide-trust",
            "version": 1,
            "threshold": 2,
            "keys": [key_entry(0), key_entry(0)],
        }),
        &[0],
    );
    let err = load_bytes(&listed_twice).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root", "{err}");
    assert!(err.to_string().contains("listed twice"), "{err}");
}

/// A trust root's `keys` entry for test key `n`.
fn key_entry(n: u8) -> serde_json::Value {
    let public = key(n).public();
    serde_json::json!({"id": public.id().as_str(), "public": public.to_hex()})
}

/// A trust root file: `signed` as given, signed properly by the test keys `signers`.
fn signed_file(signed: &serde_json::Value, signers: &[u8]) -> Vec<u8> {
    let message = abide_bundle::canonical::to_canonical("trust root", signed).unwrap();
    let signatures: Vec<serde_json::Value> = signers
        .iter()
        .map(|&n| {
            let sig = key(n).sign(abide_bundle::keys::TRUST_DOMAIN, &message);
            let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({"key": key(n).public().id().as_str(), "sig": hex})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({"signed": signed, "signatures": signatures})).unwrap()
}

#[test]
fn a_key_id_that_does_not_match_its_key_is_refused() {
    // Properly signed, so nothing but the id check can refuse it: key 1's id beside key 0.
    let mut entry = key_entry(0);
    entry["id"] = key(1).public().id().as_str().into();
    let file = signed_file(
        &serde_json::json!({"type": "abide-trust", "version": 1, "threshold": 1, "keys": [entry]}),
        &[0],
    );
    let err = load_bytes(&file).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root", "{err}");
    assert!(
        err.to_string().contains("does not match its public key"),
        "{err}"
    );
    // The same file with the right id loads: the id was the only thing wrong.
    let file = signed_file(
        &serde_json::json!({"type": "abide-trust", "version": 1, "threshold": 1,
                            "keys": [key_entry(0)]}),
        &[0],
    );
    load_bytes(&file).unwrap();
}

#[test]
fn an_expired_root_still_counts_for_its_successor() {
    let lapsed = TrustRoot::create(
        1,
        vec![key(0).public(), key(1).public()],
        2,
        Some("2026-01-01T00:00:00Z".parse().unwrap()),
        &[&key(0), &key(1)],
    )
    .unwrap();
    assert_eq!(load(&lapsed).unwrap_err().code(), "trust-expired");
    // Read as old material, it still says whose signatures the next version needs.
    let old = TrustRoot::load(
        &lapsed.to_file_bytes().unwrap(),
        now(),
        ExpirationEnforcement::Unsafe,
        &Limits::default(),
    )
    .unwrap();
    let signers = [key(0), key(1), key(2)];
    let next = old
        .rotate(
            vec![key(2).public()],
            1,
            None,
            &signers.iter().collect::<Vec<_>>(),
        )
        .unwrap();
    let next = load(&next).unwrap();
    old.verify_successor(&next).unwrap();
    // Its threshold still holds: one of its two keys is not enough.
    let one = [key(0), key(2)];
    let err = old
        .rotate(
            vec![key(2).public()],
            1,
            None,
            &one.iter().collect::<Vec<_>>(),
        )
        .unwrap_err();
    assert_eq!(err.code(), "signature-threshold", "{err}");
}

#[test]
fn a_self_signature_below_threshold_is_refused() {
    let keys = vec![key(0).public(), key(1).public()];
    let err = TrustRoot::create(1, keys, 2, None, &[&key(0), &key(0)]).unwrap_err();
    assert_eq!(err.code(), "signature-threshold");
    // Stripping a signature from a valid 2-of-2 file makes it unloadable.
    let root = trust(&[0, 1], 2);
    let mut value = file_json(&root);
    value["signatures"].as_array_mut().unwrap().pop();
    let err = load_bytes(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.code(), "signature-threshold");
}

#[test]
fn an_edited_trust_root_is_refused() {
    let root = trust(&[0, 1], 1);
    let mut value = file_json(&root);
    value["signed"]["threshold"] = 2.into();
    let err = load_bytes(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.code(), "signature-threshold");
    value["signed"]["threshold"] = 0.into();
    let err = load_bytes(&serde_json::to_vec(&value).unwrap()).unwrap_err();
    assert_eq!(err.code(), "bad-trust-root");
}

#[test]
fn an_expired_trust_root_is_refused() {
    let root = TrustRoot::create(
        1,
        vec![key(0).public()],
        1,
        Some("2026-01-01T00:00:00Z".parse().unwrap()),
        &[&key(0)],
    )
    .unwrap();
    assert_eq!(load(&root).unwrap_err().code(), "trust-expired");
    let unsafe_load = TrustRoot::load(
        &root.to_file_bytes().unwrap(),
        now(),
        ExpirationEnforcement::Unsafe,
        &Limits::default(),
    );
    assert!(unsafe_load.is_ok());
}

#[test]
fn rotation_needs_a_threshold_of_the_old_keys_and_of_the_new_keys() {
    let old = trust(&[0, 1, 2], 2);
    let new_keys = vec![key(3).public(), key(4).public()];
    let signers = |ns: &[u8]| ns.iter().map(|&n| key(n)).collect::<Vec<SecretKey>>();
    let rotate = |ns: &[u8]| {
        let s = signers(ns);
        old.rotate(new_keys.clone(), 2, None, &s.iter().collect::<Vec<_>>())
    };
    let err = rotate(&[0, 3, 4]).unwrap_err();
    assert_eq!(err.code(), "signature-threshold");
    assert!(err.to_string().contains("old"), "{err}");
    let err = rotate(&[0, 1, 3]).unwrap_err();
    assert_eq!(err.code(), "signature-threshold");
    assert!(err.to_string().contains("new"), "{err}");
    let next = rotate(&[0, 1, 3, 4]).unwrap();
    assert_eq!(next.version(), 2);
    let loaded = load(&next).unwrap();
    old.verify_successor(&loaded).unwrap();
    // Skipping a version or going back is refused.
    let s = signers(&[3, 4]);
    let third = loaded
        .rotate(
            vec![key(3).public(), key(4).public()],
            2,
            None,
            &s.iter().collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(
        old.verify_successor(&third).unwrap_err().code(),
        "trust-rotation"
    );
    assert_eq!(
        loaded.verify_successor(&old).unwrap_err().code(),
        "trust-rotation"
    );
    // Bundles signed by the new keys verify under the new root only.
    let bundle = Fixture::default().build(&[&key(3), &key(4)]);
    verify(&bundle, &loaded).unwrap();
    assert_eq!(verify(&bundle, &old).unwrap_err().code(), "untrusted-key");
}
