//! The crash model for files a bootloader reads: after a power cut the bootloader sees only
//! what reached the disk at the place it looks, which is the inode and blocks the file had
//! (GRUB and U-Boot read ext4 and FAT without replaying a journal or following a rename that
//! sits in one). The model: the "firmware" opens the file before the write and reads through
//! that handle after it; it must see every stored state, at once, in the same inode.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use abide_boot::grubenv::GrubEnv;
use abide_boot::{Bootloader, GrubBootloader, UbootBootloader};
use abide_core::{Action, Group};

use crate::{data, engine_states};

fn g(name: &str) -> Group {
    Group::new(name).unwrap()
}

/// What firmware that found `held` before the write reads now.
fn firmware_read(held: &mut File) -> Vec<u8> {
    let mut bytes = Vec::new();
    held.seek(SeekFrom::Start(0)).unwrap();
    held.read_to_end(&mut bytes).unwrap();
    bytes
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn grub_sees_every_state_the_backend_stores_in_the_blocks_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let mut env = GrubEnv::default();
    env.set("saved_entry", "abide-A").unwrap();
    env.set("ABIDE_ORDER", "A B").unwrap();
    env.set("ABIDE_A_OK", "1").unwrap();
    env.set("ABIDE_B_OK", "1").unwrap();
    std::fs::write(&path, env.to_block().unwrap()).unwrap();
    let (ino, mut held) = (inode(&path), File::open(&path).unwrap());
    let grub = GrubBootloader::new(&path);
    for state in engine_states() {
        grub.store(&state).unwrap();
        let seen = GrubEnv::parse(&firmware_read(&mut held)).unwrap();
        assert_eq!(
            grub.state_of(&seen).unwrap(),
            state,
            "GRUB reads a stale block"
        );
        assert_eq!(inode(&path), ino, "the block moved to another inode");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        assert_eq!(seen.get("saved_entry"), Some("abide-A"));
    }
}

#[test]
fn a_block_of_another_size_is_kept_at_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    // grub-editenv keeps whatever size a block has; so does the backend.
    let mut env = GrubEnv::new(2048);
    env.set("ABIDE_ORDER", "B A").unwrap();
    std::fs::write(&path, env.to_block().unwrap()).unwrap();
    let grub = GrubBootloader::new(&path);
    let mut s = grub.load().unwrap();
    s.apply(&Action::MarkUnbootable { group: g("A") }).unwrap();
    grub.store(&s).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2048);
    assert_eq!(grub.load().unwrap(), s);
}

#[test]
fn a_u_boot_environment_in_one_file_is_rewritten_in_its_blocks() {
    const SIZE: usize = 0x2000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uboot.env");
    std::fs::write(&path, data("uboot-single.bin")).unwrap();
    let (ino, mut held) = (inode(&path), File::open(&path).unwrap());
    let uboot = UbootBootloader::new(std::slice::from_ref(&path), SIZE);
    for state in engine_states() {
        uboot.store(&state).unwrap();
        let (seen, _) =
            abide_boot::ubootenv::UbootEnv::decode(&firmware_read(&mut held), false).unwrap();
        assert_eq!(
            seen.vars["ABIDE_ORDER"],
            state
                .order
                .iter()
                .map(Group::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert_eq!(uboot.load().unwrap(), state);
        assert_eq!(inode(&path), ino, "the environment moved to another inode");
    }
}

/// The model tells a rename from an in-place write: a block renamed into place (how the grub
/// backend once wrote) leaves the firmware reading the old block.
#[test]
fn the_model_catches_a_block_renamed_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let mut env = GrubEnv::default();
    env.set("ABIDE_ORDER", "A B").unwrap();
    std::fs::write(&path, env.to_block().unwrap()).unwrap();
    let mut held = File::open(&path).unwrap();
    env.set("ABIDE_ORDER", "B A").unwrap();
    abide_fs::persist::write_atomic(&path, &env.to_block().unwrap(), 0o644).unwrap();
    let seen = GrubEnv::parse(&firmware_read(&mut held)).unwrap();
    assert_eq!(
        seen.get("ABIDE_ORDER"),
        Some("A B"),
        "the firmware's view is stale"
    );
}

#[test]
fn a_missing_block_is_created_and_refused_edits_leave_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let grub = GrubBootloader::new(&path);
    let state = engine_states().remove(0);
    grub.store(&state).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
    assert_eq!(grub.load().unwrap(), state);
    // A block that is not a GRUB block is refused, not overwritten.
    std::fs::write(&path, b"not a block").unwrap();
    assert!(grub.store(&state).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a block");
}
