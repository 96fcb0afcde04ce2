//! The GRUB environment block against Debian's `grub-editenv`: a block it wrote parses to what
//! it lists, and a block written here reads back through it, edits included.

use std::path::Path;

use crate::data;
use std::process::Command;

use abide_boot::{GrubEnv, GrubEnvError};
use expect_test::expect;

/// Runs grub-editenv (Debian's grub-common; `scripts/deps` installs it).
fn editenv(file: &Path, args: &[&str]) -> String {
    let out = Command::new("grub-editenv")
        .arg(file)
        .args(args)
        .output()
        .expect("grub-editenv is installed (scripts/deps installs grub-common)");
    assert!(
        out.status.success(),
        "grub-editenv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn listing(env: &GrubEnv) -> String {
    env.vars()
        .iter()
        .map(|(n, v)| format!("{n}={v}\n"))
        .collect()
}

#[test]
fn a_block_written_by_grub_editenv_parses() {
    let env = GrubEnv::parse(&data("grubenv-debian-2.06")).unwrap();
    expect![[r#"
        ABIDE_ORDER=A B
        ABIDE_B_TRY=1
        saved_entry=abide-B
        path=C:\boot
    "#]]
    .assert_eq(&listing(&env));
    assert_eq!(env.to_block().unwrap().len(), 1024);
}

#[test]
fn blocks_round_trip_through_grub_editenv_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("grubenv");
    // Written here, read and edited there.
    let mut env = GrubEnv::default();
    env.set("ABIDE_ORDER", "B A").unwrap();
    env.set("ABIDE_A_TRY", "0").unwrap();
    env.set("odd", "back\\slash\nnew line = and # hash")
        .unwrap();
    std::fs::write(&file, env.to_block().unwrap()).unwrap();
    assert_eq!(editenv(&file, &["list"]), listing(&env));
    editenv(&file, &["set", "ABIDE_A_TRY=3", "added=yes"]);
    editenv(&file, &["unset", "ABIDE_ORDER"]);
    // Edited there, read here.
    let back = GrubEnv::parse(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(back.get("ABIDE_A_TRY"), Some("3"));
    assert_eq!(back.get("added"), Some("yes"));
    assert_eq!(back.get("ABIDE_ORDER"), None);
    assert_eq!(back.get("odd"), Some("back\\slash\nnew line = and # hash"));
    assert_eq!(editenv(&file, &["list"]), listing(&back));
}

#[test]
fn what_grub_could_not_read_back_is_refused_and_changes_nothing() {
    let mut env = GrubEnv::default();
    env.set("a", "1").unwrap();
    let before = env.clone();
    for name in ["", "a=b", "#x", "a b", "nul\0"] {
        assert_eq!(env.set(name, "v"), Err(GrubEnvError::Name(name.into())));
    }
    assert_eq!(env.set("b", "x\0y"), Err(GrubEnvError::Value("b".into())));
    let err = env.set("big", &"x".repeat(1000)).unwrap_err();
    assert!(matches!(err, GrubEnvError::Full { .. }), "{err}");
    assert_eq!(env, before);
    assert_eq!(
        GrubEnv::parse(b"# not a grub block\n"),
        Err(GrubEnvError::Signature)
    );
    assert_eq!(
        GrubEnv::parse(b"# GRUB Environment Block\nnovalue\n####"),
        Err(GrubEnvError::Line { line: 2 })
    );
}

/// The grub backend keeps `abide-good.env` naming the known-good group; with grubenv damaged
/// or missing it reads what GRUB then boots (that group, no trial), and its next store
/// rewrites a damaged grubenv in place.
#[test]
fn a_lost_grubenv_is_read_as_the_fallback_block_says_and_rewritten_in_place() {
    use abide_boot::{BootState, Bootloader, GrubBootloader};
    use abide_core::{Action, Group};
    use std::os::unix::fs::MetadataExt;
    let g = |n: &str| Group::new(n).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let grub = GrubBootloader::new(&path);
    // B committed: known-good B, A a fallback, then A on trial.
    let mut state = BootState::new(&[g("B"), g("A")]);
    state.booted = Some(g("B"));
    grub.store(&state).unwrap();
    let fallback = GrubEnv::parse(&std::fs::read(grub.fallback_path()).unwrap()).unwrap();
    assert_eq!(
        (
            fallback.get("ABIDE_ORDER"),
            fallback.get("ABIDE_B_OK"),
            fallback.get("ABIDE_A_OK")
        ),
        (Some("B A"), Some("1"), Some("0"))
    );
    state
        .apply(&Action::TryNext {
            group: g("A"),
            tries: 1,
        })
        .unwrap();
    grub.store(&state).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    // Damaged: GRUB boots B from the fallback, and so the backend reads.
    std::fs::write(&path, vec![b'x'; 1024]).unwrap();
    let lost = grub.load().unwrap();
    assert_eq!(lost.good(), Some(&g("B")));
    assert_eq!(
        (lost.trial.clone(), lost.booted.clone()),
        (None, Some(g("B")))
    );
    assert_eq!(lost.bootable.get(&g("A")), Some(&false));
    // The next store rewrites it whole, in the same inode.
    grub.store(&lost).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    assert_eq!(grub.load().unwrap(), lost);
    // Missing: the same.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(grub.load().unwrap().good(), Some(&g("B")));
}
