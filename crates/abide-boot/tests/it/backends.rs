//! Each backend through a trial that commits, one that the firmware falls back from, and a
//! refused edit; the stored state reads back the same.

use abide_boot::{BootState, Bootloader, GrubBootloader, SimBootloader, StateError};
use abide_core::{Action, Group};

fn g(name: &str) -> Group {
    Group::new(name).unwrap()
}

pub(crate) fn round_trip(
    backend: &dyn Bootloader,
    power_on: &dyn Fn(&dyn Bootloader) -> Option<Group>,
) {
    let mut s = backend.load().unwrap();
    assert_eq!(s.good(), Some(&g("A")));
    // Install into B: unbootable first, then a trial of one boot.
    s.apply(&Action::MarkUnbootable { group: g("B") }).unwrap();
    backend.store(&s).unwrap();
    assert_eq!(
        power_on(backend),
        Some(g("A")),
        "an unbootable target is never booted"
    );
    let mut s = backend.load().unwrap();
    s.apply(&Action::TryNext {
        group: g("B"),
        tries: 1,
    })
    .unwrap();
    backend.store(&s).unwrap();
    assert_eq!(power_on(backend), Some(g("B")), "the trial boots once");
    assert_eq!(backend.load().unwrap().booted, Some(g("B")));
    assert_eq!(
        power_on(backend),
        Some(g("A")),
        "a trial that never committed falls back"
    );
    // A second trial that commits.
    let mut s = backend.load().unwrap();
    s.apply(&Action::TryNext {
        group: g("B"),
        tries: 2,
    })
    .unwrap();
    backend.store(&s).unwrap();
    assert_eq!(power_on(backend), Some(g("B")));
    let mut s = backend.load().unwrap();
    s.apply(&Action::MarkGood { group: g("B") }).unwrap();
    backend.store(&s).unwrap();
    assert_eq!(backend.load().unwrap().good(), Some(&g("B")));
    assert_eq!(power_on(backend), Some(g("B")));
    assert_eq!(
        power_on(backend),
        Some(g("B")),
        "a committed group keeps booting"
    );
    // Refused edits change nothing.
    let before = backend.load().unwrap();
    let mut s = before.clone();
    assert_eq!(
        s.apply(&Action::TryNext {
            group: g("C"),
            tries: 1
        }),
        Err(StateError::UnknownGroup(g("C")))
    );
    assert_eq!(
        s.apply(&Action::TryNext {
            group: g("A"),
            tries: 4
        }),
        Err(StateError::Tries(4))
    );
    assert_eq!(s, before);
}

/// GRUB has no firmware here: a power-on runs the reference rule on the stored block, as the
/// shipped script does (the script's equivalence is tested in grubscript.rs).
fn grub_power_on(backend: &dyn Bootloader) -> Option<Group> {
    let mut s: BootState = backend.load().unwrap();
    let chosen = s.firmware_select();
    backend.store(&s).unwrap();
    chosen
}

#[test]
fn sim_backend_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot.json");
    let sim = SimBootloader::init(&path, &[g("A"), g("B")]).unwrap();
    let power_on = |b: &dyn Bootloader| {
        assert_eq!(b.name(), "sim");
        SimBootloader::new(&path).power_on().unwrap()
    };
    round_trip(&sim, &power_on);
}

#[test]
fn grub_backend_round_trip_keeps_other_variables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let status = std::process::Command::new("grub-editenv")
        .arg(&path)
        .args(["create"])
        .status()
        .expect("grub-editenv is installed (scripts/deps)");
    assert!(status.success());
    std::process::Command::new("grub-editenv")
        .arg(&path)
        .args(["set", "saved_entry=1"])
        .status()
        .unwrap();
    let grub = GrubBootloader::new(&path);
    // A fresh block names no group bootable, for the backend as for the GRUB script: the
    // first variables come from `abide device init`, here written the same way.
    assert_eq!(grub.load().unwrap().good(), None);
    grub.store(&BootState::new(&[g("A"), g("B")])).unwrap();
    round_trip(&grub, &grub_power_on);
    let listed = std::process::Command::new("grub-editenv")
        .arg(&path)
        .arg("list")
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains("saved_entry=1"), "{listed}");
    assert!(listed.contains("ABIDE_ORDER=B A"), "{listed}");
}

#[test]
fn a_damaged_grub_block_is_reported_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let mut env = abide_boot::GrubEnv::default();
    env.set("ABIDE_ORDER", "A A").unwrap();
    std::fs::write(&path, env.to_block().unwrap()).unwrap();
    let err = GrubBootloader::new(&path).load().unwrap_err();
    assert!(
        err.to_string().contains("ABIDE_ORDER must name A and B"),
        "{err}"
    );
    env.set("ABIDE_ORDER", "A B").unwrap();
    env.set("ABIDE_B_TRY", "7").unwrap();
    std::fs::write(&path, env.to_block().unwrap()).unwrap();
    let err = GrubBootloader::new(&path).load().unwrap_err();
    assert!(err.to_string().contains("ABIDE_B_TRY"), "{err}");
}
