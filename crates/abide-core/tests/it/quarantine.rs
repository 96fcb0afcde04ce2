//! Admission: anti-rollback always, quarantine and version order unless forced.

use abide_core::{Force, Installed, Quarantine, admit};

use crate::at;

#[test]
fn admission_table() {
    let installed = Installed {
        version: "2.0.0".parse().unwrap(),
        security_version: 5,
    };
    let mut q = Quarantine::default();
    q.add(&"2.1.0".parse().unwrap(), "health check api failed", at(0));
    q.add(
        &"2.1.0".parse().unwrap(),
        "a later reason is not kept",
        at(9),
    );
    // (version, security version, force) → result code
    let table = [
        ("2.0.1", 5, Force::No, "ok"),
        ("2.0.0", 5, Force::No, "ok"),
        ("3.0.0", 9, Force::No, "ok"),
        ("2.0.1", 4, Force::No, "downgrade"),
        ("2.0.1", 4, Force::Yes, "downgrade"),
        ("1.9.0", 5, Force::No, "older-version"),
        ("1.9.0", 5, Force::Yes, "ok"),
        ("2.1.0", 6, Force::No, "quarantined"),
        ("2.1.0", 6, Force::Yes, "ok"),
    ];
    for (version, sv, force, want) in table {
        let got = match admit(&installed, &version.parse().unwrap(), sv, &q, force) {
            Ok(()) => "ok",
            Err(e) => e.code(),
        };
        assert_eq!(got, want, "{version} sv {sv} {force:?}");
    }
    let entry = q.get(&"2.1.0".parse().unwrap()).unwrap();
    assert_eq!(entry.reason, "health check api failed");
    assert_eq!(q.versions().collect::<Vec<_>>(), ["2.1.0"]);
}
