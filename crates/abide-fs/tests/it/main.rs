//! The power-loss model: what it keeps is exactly what was synced.

use std::fs;
use std::io::Write;
use std::path::Path;

use abide_fs::persist;
use abide_fs::powerloss::{self, Snapshot};

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

#[test]
fn after_a_power_cut_only_what_was_synced_is_on_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, copy, log, out) = (
        tmp.path().join("root"),
        tmp.path().join("copy"),
        tmp.path().join("log"),
        tmp.path().join("out"),
    );
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("a.txt"), "old").unwrap();
    fs::write(root.join("b.txt"), "keep").unwrap();
    fs::write(root.join("sub/s.txt"), "sub").unwrap();
    copy_dir(&root, &copy);
    let before = Snapshot::take(&root, &copy).unwrap();
    fs::create_dir_all(&log).unwrap();
    powerloss::record_to(Some(&log));

    // Atomic replacement: durable.
    persist::write_atomic(&root.join("a.txt"), b"new", 0o644).unwrap();
    // In place with an fsync: durable; then an unsynced in-place write: lost.
    persist::overwrite_in_place(&root.join("b.txt"), b"KEEP").unwrap();
    fs::write(root.join("b.txt"), "LOST").unwrap();
    // In a directory never synced: a file never synced, and one synced without its directory.
    fs::write(root.join("sub/never.txt"), "never").unwrap();
    let mut f = fs::File::create(root.join("sub/no-dir-sync.txt")).unwrap();
    f.write_all(b"data").unwrap();
    persist::fsync(&f, &root.join("sub/no-dir-sync.txt")).unwrap();
    fs::remove_file(root.join("sub/s.txt")).unwrap();
    // A name made durable by a directory sync, its content never synced: empty.
    fs::write(root.join("empty.txt"), "unsynced content").unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
    persist::sync_dir(&root).unwrap();
    // A rename after the last directory sync: lost.
    fs::rename(root.join("a.txt"), root.join("moved.txt")).unwrap();
    // A directory slot made durable by syncfs.
    fs::create_dir_all(root.join("app/bin")).unwrap();
    fs::write(root.join("app/bin/run"), "#!/bin/sh\n").unwrap();
    persist::sync_dir(&root).unwrap();
    persist::syncfs(&root.join("app")).unwrap();
    powerloss::record_to(None);

    let durable = powerloss::materialize(&before, &log, &out).unwrap();
    assert_eq!(read(&out.join("moved.txt")), Some("new".into()));
    assert_eq!(
        read(&out.join("a.txt")),
        None,
        "the last sync saw the rename"
    );
    assert_eq!(read(&out.join("b.txt")), Some("KEEP".into()));
    assert_eq!(read(&out.join("sub/never.txt")), None);
    assert_eq!(read(&out.join("sub/no-dir-sync.txt")), None);
    assert_eq!(
        read(&out.join("sub/s.txt")),
        Some("sub".into()),
        "an unlink without a directory sync is lost"
    );
    assert_eq!(read(&out.join("empty.txt")), Some(String::new()));
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("a.txt"));
    assert_eq!(read(&out.join("app/bin/run")), Some("#!/bin/sh\n".into()));
    assert!(
        durable.file_syncs >= 4 && durable.dir_syncs >= 4,
        "{durable:?}"
    );

    // The same run cut before the second directory sync: the rename and the new directory
    // are not there.
    let syncs = powerloss::syncs(&log).unwrap();
    let second_dir_sync = syncs
        .iter()
        .filter(|s| s.kind == 'D' && s.path == root)
        .nth(1)
        .unwrap()
        .n;
    let cut = tmp.path().join("cut-log");
    fs::create_dir_all(cut.join("blobs")).unwrap();
    let text = fs::read_to_string(log.join("log")).unwrap();
    let kept: String = text
        .lines()
        .filter(|l| l.split('\t').nth(1).unwrap().parse::<usize>().unwrap() < second_dir_sync)
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(cut.join("log"), kept).unwrap();
    for b in fs::read_dir(log.join("blobs")).unwrap() {
        let b = b.unwrap();
        fs::copy(b.path(), cut.join("blobs").join(b.file_name())).unwrap();
    }
    let earlier = tmp.path().join("earlier");
    powerloss::materialize(&before, &cut, &earlier).unwrap();
    assert_eq!(read(&earlier.join("a.txt")), Some("new".into()));
    assert_eq!(read(&earlier.join("moved.txt")), None);
    assert!(!earlier.join("app").exists());
}
