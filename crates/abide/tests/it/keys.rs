//! Keys and trust roots through the command line.

use std::os::unix::fs::PermissionsExt;

use crate::{abide, json, ok, workspace};

#[test]
fn key_generate_writes_a_private_secret_and_never_overwrites() {
    let (_tmp, dir) = workspace();
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("a.key"), 0o600);
    assert_eq!(mode("a.pub"), 0o644);
    let before = std::fs::read(dir.join("a.key")).unwrap();
    let out = abide(&dir, "key generate --out a");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(dir.join("a.key")).unwrap(), before);
    let v = json(&dir, "key generate --out d", 0);
    assert_eq!(v["id"].as_str().unwrap().len(), 32);
}

#[test]
fn trust_init_refuses_a_zero_threshold_and_writes_nothing() {
    let (_tmp, dir) = workspace();
    let v = json(
        &dir,
        "trust init --key a.pub --threshold 0 --sign a.key --out zero.json",
        1,
    );
    assert_eq!(v["error"]["code"], "bad-trust-root");
    assert!(!dir.join("zero.json").exists());
    let v = json(
        &dir,
        "trust init --key a.pub --key b.pub --threshold 2 --sign a.key --out t2.json",
        1,
    );
    assert_eq!(v["error"]["code"], "signature-threshold");
    assert!(!dir.join("t2.json").exists());
}

#[test]
fn trust_rotation_needs_old_and_new_thresholds() {
    let (_tmp, dir) = workspace();
    // Only new keys sign: the old root's threshold is not met.
    let v = json(
        &dir,
        "trust rotate --from trust.json --key c.pub --threshold 1 --sign c.key --out t2.json",
        1,
    );
    assert_eq!(v["error"]["code"], "signature-threshold");
    assert!(v["error"]["message"].as_str().unwrap().contains("old"));
    assert!(!dir.join("t2.json").exists());
    // Only old keys sign: the new root's threshold is not met.
    let v = json(
        &dir,
        "trust rotate --from trust.json --key c.pub --threshold 1 --sign a.key --out t2.json",
        1,
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("new"));
    let v = json(
        &dir,
        "trust rotate --from trust.json --key c.pub --threshold 1 --sign a.key --sign c.key --out t2.json",
        0,
    );
    assert_eq!(v["version"], 2);
    let v = json(&dir, "trust verify --from trust.json t2.json", 0);
    assert_eq!(v["ok"], true);
    // Version 2 does not follow itself, and version 1 does not follow version 2.
    assert_eq!(
        json(&dir, "trust verify --from t2.json t2.json", 1)["error"]["code"],
        "trust-rotation"
    );
    assert_eq!(
        json(&dir, "trust verify --from t2.json trust.json", 1)["error"]["code"],
        "trust-rotation"
    );
    // A bundle signed by the new key verifies under the new root only.
    std::fs::write(dir.join("img"), b"content").unwrap();
    ok(
        &dir,
        "bundle create --product p --version 1.0.0 --component rootfs=img --sign c.key --out c.abide",
    );
    json(&dir, "bundle verify c.abide --trust t2.json", 0);
    let v = json(&dir, "bundle verify c.abide --trust trust.json", 1);
    assert_eq!(v["error"]["code"], "untrusted-key");
}

#[test]
fn an_expired_trust_root_is_refused() {
    let (_tmp, dir) = workspace();
    ok(
        &dir,
        "trust init --key a.pub --threshold 1 --expires 2020-01-01T00:00:00Z --sign a.key --out old.json",
    );
    assert_eq!(
        json(&dir, "trust verify old.json", 1)["error"]["code"],
        "trust-expired"
    );
    // A root that lapsed can still be rotated: it says whose signatures its successor needs.
    let v = json(
        &dir,
        "trust rotate --from old.json --key c.pub --threshold 1 --sign c.key --out next.json",
        1,
    );
    assert_eq!(v["error"]["code"], "signature-threshold", "{v}");
    let v = json(
        &dir,
        "trust rotate --from old.json --key c.pub --threshold 1 --sign a.key --sign c.key --out next.json",
        0,
    );
    assert_eq!(v["version"], 2);
    let v = json(&dir, "trust verify --from old.json next.json", 0);
    assert_eq!(
        (v["ok"].as_bool(), v["version"].as_u64()),
        (Some(true), Some(2))
    );
}

#[test]
fn usage_errors_exit_2() {
    let (_tmp, dir) = workspace();
    assert_eq!(abide(&dir, "bundle verify").status.code(), Some(2));
    assert_eq!(abide(&dir, "no-such-command").status.code(), Some(2));
    let out = abide(&dir, "bundle verify missing.abide --trust trust.json");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.abide"));
}

#[test]
fn a_key_file_that_is_not_a_key_is_refused_with_bad_key_and_writes_nothing() {
    let (_tmp, dir) = workspace();
    std::fs::write(dir.join("img"), b"content").unwrap();
    // A public key of the wrong length, and a secret key file holding a public key.
    std::fs::write(dir.join("short.pub"), "abide-public-key ed25519 00ff\n").unwrap();
    std::fs::copy(dir.join("a.pub"), dir.join("swapped.key")).unwrap();
    for (args, name) in [
        (
            "trust init --key short.pub --threshold 1 --sign a.key --out t.json",
            "short.pub",
        ),
        (
            "bundle create --product p --version 1.0.0 --component rootfs=img --sign swapped.key --out x.abide",
            "swapped.key",
        ),
    ] {
        let v = json(&dir, args, 1);
        assert_eq!(v["error"]["code"], "bad-key", "{args}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(name),
            "{args}: {v}"
        );
    }
    assert!(!dir.join("t.json").exists() && !dir.join("x.abide").exists());
}

#[test]
fn a_file_that_cannot_be_read_is_named_with_what_was_done_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.abide");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["bundle", "info", missing],
        vec!["delta", "info", missing],
        vec!["delta", "verify", missing, "--trust", missing],
    ] {
        let (value, code) = crate::failure_args(dir.path(), &args, 3);
        assert_eq!(code.as_deref(), Some("error"), "{args:?}");
        let message = value["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(missing) && message.contains("No such file"),
            "{args:?}: {message}"
        );
    }
}
