//! The U-Boot environment against `mkenvimage` (u-boot-tools) and `fw_printenv`/`fw_setenv`
//! (libubootenv-tool), and the power-safety of redundant copies.

use std::path::{Path, PathBuf};
use std::process::Command;

use abide_boot::ubootenv::{UbootEnv, UbootEnvError, select};
use abide_boot::{Bootloader, UbootBootloader};
use abide_core::{Action, Group};

use crate::data;

const SIZE: usize = 0x2000;

fn g(name: &str) -> Group {
    Group::new(name).unwrap()
}

/// `fw_printenv -c CONFIG` (libubootenv-tool; `scripts/deps` installs it).
fn fw(tool: &str, config: &Path, args: &[&str]) -> String {
    let out = Command::new(tool)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} runs (scripts/deps installs libubootenv-tool): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn redundant_pair(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let a = dir.join("env.0");
    let b = dir.join("env.1");
    std::fs::write(&a, data("uboot-redundant.bin")).unwrap();
    std::fs::write(&b, vec![0xffu8; SIZE]).unwrap();
    let config = dir.join("fw_env.config");
    std::fs::write(
        &config,
        format!(
            "{} 0x0 {SIZE:#x}\n{} 0x0 {SIZE:#x}\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    (vec![a, b], config)
}

#[test]
fn images_made_by_mkenvimage_decode() {
    let (single, _) = UbootEnv::decode(&data("uboot-single.bin"), false).unwrap();
    let (redundant, flag) = UbootEnv::decode(&data("uboot-redundant.bin"), true).unwrap();
    assert_eq!(single, redundant);
    assert_eq!(flag, 1);
    assert_eq!(single.vars["bootcmd"], "run abide_select; boot");
    assert_eq!(single.vars["ABIDE_ORDER"], "B A");
    // Our encoding holds the same variables (in U-Boot's sorted order, where mkenvimage keeps
    // its input's order) in a copy of the same size.
    let ours = single.encode(SIZE, false, 0).unwrap();
    assert_eq!(ours.len(), SIZE);
    assert_eq!(UbootEnv::decode(&ours, false).unwrap().0, single);
    let ours = redundant.encode(SIZE, true, 1).unwrap();
    assert_eq!(ours[4], 1);
    assert!(UbootEnv::decode(&ours, true).unwrap() == (redundant, 1));
    let mut damaged = data("uboot-single.bin");
    damaged[100] ^= 1;
    assert_eq!(UbootEnv::decode(&damaged, false), Err(UbootEnvError::Crc));
}

#[test]
fn the_backend_and_fw_printenv_agree_through_a_trial_and_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (copies, config) = redundant_pair(dir.path());
    let uboot = UbootBootloader::new(&copies, SIZE);
    let s = uboot.load().unwrap();
    assert_eq!(s.good(), Some(&g("B")));
    assert_eq!(s.trial, Some((g("A"), 2)));
    let mut s = s;
    s.apply(&Action::MarkGood { group: g("A") }).unwrap();
    uboot.store(&s).unwrap();
    let listed = fw("fw_printenv", &config, &[]);
    assert!(
        listed.contains("ABIDE_ORDER=A B\n") && listed.contains("ABIDE_A_TRY=0\n"),
        "{listed}"
    );
    assert!(
        listed.contains("bootcmd=run abide_select; boot\n"),
        "other variables are kept: {listed}"
    );
    // fw_setenv writes the other copy; we read its change back, and our next write goes to
    // the copy it did not use.
    fw("fw_setenv", &config, &["ABIDE_B_OK", "0"]);
    let s = uboot.load().unwrap();
    assert!(!s.bootable[&g("B")]);
    let (_, which, flag) = uboot.read().unwrap();
    let mut s = s;
    s.apply(&Action::TryNext {
        group: g("B"),
        tries: 3,
    })
    .unwrap();
    uboot.store(&s).unwrap();
    let (_, which2, flag2) = uboot.read().unwrap();
    assert_eq!((which2, flag2), (1 - which, flag.wrapping_add(1)));
    assert_eq!(fw("fw_printenv", &config, &["-n", "ABIDE_B_TRY"]), "3\n");
    assert_eq!(uboot.load().unwrap().trial, Some((g("B"), 3)));
}

#[test]
fn a_write_cut_short_leaves_the_old_state() {
    let dir = tempfile::tempdir().unwrap();
    let (copies, _) = redundant_pair(dir.path());
    let uboot = UbootBootloader::new(&copies, SIZE);
    let old = uboot.load().unwrap();
    let (env, current, flag) = uboot.read().unwrap();
    // A power loss halfway through writing the next copy: its CRC cannot match.
    let mut next = env.clone();
    next.vars.insert("ABIDE_ORDER".into(), "A B".into());
    let bytes = next.encode(SIZE, true, flag.wrapping_add(1)).unwrap();
    let other = &copies[1 - current];
    let mut torn = std::fs::read(other).unwrap();
    torn[..40].copy_from_slice(&bytes[..40]);
    std::fs::write(other, &torn).unwrap();
    assert_eq!(uboot.load().unwrap(), old);
    // Flags wrap: 0 is newer than 255.
    let e = UbootEnv::default();
    let (a, b) = (
        e.encode(64, true, 255).unwrap(),
        e.encode(64, true, 0).unwrap(),
    );
    assert_eq!(select(&a, &b).unwrap().0, 1);
    assert_eq!(select(&b, &a).unwrap().0, 0);
    assert_eq!(
        select(&[0u8; 64], &[0u8; 64]).unwrap_err(),
        UbootEnvError::NoValidCopy
    );
}

#[test]
fn a_single_copy_round_trips_through_fw_setenv() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env");
    std::fs::write(&path, data("uboot-single.bin")).unwrap();
    let config = dir.path().join("fw_env.config");
    std::fs::write(&config, format!("{} 0x0 {SIZE:#x}\n", path.display())).unwrap();
    let uboot = UbootBootloader::new(std::slice::from_ref(&path), SIZE);
    let mut s = uboot.load().unwrap();
    s.apply(&Action::MarkUnbootable { group: g("A") }).unwrap();
    uboot.store(&s).unwrap();
    assert_eq!(fw("fw_printenv", &config, &["-n", "ABIDE_A_OK"]), "0\n");
    fw("fw_setenv", &config, &["ABIDE_BOOTED", "B"]);
    assert_eq!(uboot.load().unwrap().booted, Some(g("B")));
}
