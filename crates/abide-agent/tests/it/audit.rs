//! The audit log finds every edit, deletion, reordering and truncation, and a torn last record
//! is reported and repaired without losing the records before it.

use std::path::Path;

use abide_agent::audit::{AuditLog, Record, hash_of};
use jiff::Timestamp;
use serde_json::{Map, Value, json};

fn details(n: u64) -> Map<String, Value> {
    json!({"transaction": "tx-1", "step": n, "note": "état ✓"})
        .as_object()
        .unwrap()
        .clone()
}

fn write_log(path: &Path, n: u64) {
    let (mut log, report) = AuditLog::open(path).unwrap();
    assert_eq!(report.repaired_torn_bytes, None);
    let start = log.len();
    for i in 1..=n {
        let t = Timestamp::from_second(1_800_000_000 + i as i64).unwrap();
        let r = log.append(t, "stage", details(i)).unwrap();
        assert_eq!(r.seq, start + i);
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn set_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn broken(path: &Path) -> String {
    AuditLog::verify(path).unwrap_err().to_string()
}

#[test]
fn a_log_verifies_and_grows_across_reopenings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 3);
    write_log(&path, 2);
    let records = AuditLog::verify(&path).unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(records[3].prev, records[2].hash);
    assert_eq!(records[0].details["note"], "état ✓");
}

#[test]
fn an_edit_a_deletion_a_reordering_and_a_truncation_are_each_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 5);
    let good = lines(&path);

    let mut edited = good.clone();
    edited[2] = edited[2].replace("\"step\":3", "\"step\":9");
    set_lines(&path, &edited);
    assert!(
        broken(&path).contains("record 3 was changed"),
        "{}",
        broken(&path)
    );

    let mut deleted = good.clone();
    deleted.remove(1);
    set_lines(&path, &deleted);
    assert!(
        broken(&path).contains("line 2 has sequence number 3"),
        "{}",
        broken(&path)
    );

    let mut swapped = good.clone();
    swapped.swap(1, 2);
    set_lines(&path, &swapped);
    assert!(
        broken(&path).contains("sequence number"),
        "{}",
        broken(&path)
    );

    // Re-chaining an edited record does not help: the next one no longer follows it.
    let mut rechained = good.clone();
    let mut r: Record = serde_json::from_str(&rechained[2]).unwrap();
    r.details.insert("step".into(), json!(9));
    r.hash = hash_of(&r);
    rechained[2] = serde_json::to_string(&r).unwrap();
    set_lines(&path, &rechained);
    assert!(
        broken(&path).contains("record 4 does not follow"),
        "{}",
        broken(&path)
    );

    let mut cut = good.clone();
    cut.truncate(3);
    set_lines(&path, &cut);
    assert!(
        broken(&path).contains("cut off the end"),
        "{}",
        broken(&path)
    );

    set_lines(&path, &good);
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 5);
}

#[test]
fn a_torn_last_record_is_reported_then_repaired_keeping_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 4);
    // A crash in the middle of the fifth append: part of a line, no head update.
    let mut bytes = std::fs::read(&path).unwrap();
    let torn = br#"{"seq":5,"time":"2027-01-15T08:00:05Z","eve"#;
    bytes.extend_from_slice(torn);
    std::fs::write(&path, &bytes).unwrap();
    assert!(broken(&path).contains("torn"), "{}", broken(&path));
    let (mut log, report) = AuditLog::open(&path).unwrap();
    assert_eq!(report.records, 4);
    assert_eq!(report.repaired_torn_bytes, Some(torn.len() as u64));
    log.append(
        Timestamp::from_second(1_800_000_100).unwrap(),
        "commit",
        Map::new(),
    )
    .unwrap();
    let records = AuditLog::verify(&path).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(records[4].event, "commit");
}

#[test]
fn a_head_one_record_behind_is_a_crash_between_two_fsyncs_not_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 2);
    let head = std::fs::read(dir.path().join("audit.log.head")).unwrap();
    write_log(&path, 1);
    // Put the old head back: the log is one record ahead, as after a crash before the head
    // was replaced.
    std::fs::write(dir.path().join("audit.log.head"), &head).unwrap();
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 3);
    let (log, _) = AuditLog::open(&path).unwrap();
    assert_eq!(log.len(), 3);
}

#[test]
fn no_log_is_an_empty_log_but_a_deleted_log_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 0);
    write_log(&path, 3);
    std::fs::remove_file(&path).unwrap();
    let err = AuditLog::verify(&path).unwrap_err().to_string();
    assert!(err.contains("record 3 was written"), "{err}");
}

/// Rewrites every record from the second on after changing its details, so the chain links
/// again; returns the new last record.
fn rewrite_all(path: &Path) -> Record {
    let mut prev = None::<String>;
    let mut out = Vec::new();
    for (i, line) in lines(path).iter().enumerate() {
        let mut r: Record = serde_json::from_str(line).unwrap();
        if let Some(p) = &prev {
            r.prev = p.clone();
        }
        if i == 1 {
            r.details.insert("step".into(), json!(99));
        }
        r.hash = hash_of(&r);
        prev = Some(r.hash.clone());
        out.push(r);
    }
    set_lines(
        path,
        &out.iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect::<Vec<_>>(),
    );
    out.pop().unwrap()
}

fn head_file(path: &Path) -> std::path::PathBuf {
    path.with_file_name("audit.log.head")
}

#[test]
fn a_rewrite_of_every_record_and_the_head_is_found_without_the_device_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 4);
    let signed = AuditLog::verify(&path).unwrap();
    assert_eq!(signed.len(), 4);
    assert!(
        std::fs::metadata(dir.path().join("device.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap()
            == 0o600
    );
    let old_head: Value =
        serde_json::from_slice(&std::fs::read(head_file(&path)).unwrap()).unwrap();
    let last = rewrite_all(&path);
    // The head rewritten to name the new last record, keeping the old signature, or none.
    let mut forged = old_head.clone();
    forged["hash"] = json!(last.hash);
    std::fs::write(head_file(&path), forged.to_string()).unwrap();
    assert!(
        broken(&path).contains("signature does not verify under the device key"),
        "{}",
        broken(&path)
    );
    forged.as_object_mut().unwrap().remove("signature");
    std::fs::write(head_file(&path), forged.to_string()).unwrap();
    assert!(broken(&path).contains("not signed"), "{}", broken(&path));
}

#[test]
fn a_rewrite_with_the_device_key_verifies_alone_but_not_against_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 3);
    let checkpoint = AuditLog::open(&path).unwrap().0.signed_head().unwrap();
    assert_eq!(checkpoint.seq, 3);
    AuditLog::verify_against(&path, &checkpoint).unwrap();
    write_log(&path, 2);
    assert_eq!(
        AuditLog::verify_against(&path, &checkpoint).unwrap().len(),
        5,
        "a log that grew still holds the checkpoint"
    );
    // Someone with the key rewrites the log and signs a new head: it verifies on its own.
    rewrite_all(&path);
    std::fs::remove_file(head_file(&path)).unwrap();
    std::fs::write(&path, {
        let mut l = lines(&path);
        l.truncate(1);
        l.iter().map(|l| format!("{l}\n")).collect::<String>()
    })
    .unwrap();
    write_log(&path, 4);
    AuditLog::verify(&path).unwrap();
    let err = AuditLog::verify_against(&path, &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("record 3 is not the one the checkpoint names"),
        "{err}"
    );
    // Cut below the checkpoint (by someone with the key: one record kept, one appended).
    let mut l = lines(&path);
    l.truncate(1);
    set_lines(&path, &l);
    std::fs::remove_file(head_file(&path)).unwrap();
    write_log(&path, 1);
    let err = AuditLog::verify_against(&path, &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the log has 2 (records were cut off)"),
        "{err}"
    );
    // A new key (the device's replaced, the log made again from nothing).
    for f in ["device.key", "device.pub", "audit.log", "audit.log.head"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    write_log(&path, 3);
    let err = AuditLog::verify_against(&path, &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(err.contains("key was replaced"), "{err}");
    // A checkpoint whose signature was changed is no checkpoint.
    let mut bad = checkpoint.clone();
    bad.hash = "1".repeat(64);
    let err = AuditLog::verify_against(&path, &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint's signature"), "{err}");
}

#[test]
fn a_head_from_before_devices_had_keys_is_signed_when_the_log_is_next_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path, 2);
    let mut head: Value =
        serde_json::from_slice(&std::fs::read(head_file(&path)).unwrap()).unwrap();
    head.as_object_mut().unwrap().remove("signature");
    std::fs::write(head_file(&path), head.to_string()).unwrap();
    for f in ["device.key", "device.pub"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    // Unsigned and without a key: verifies, and says it is not anchored.
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 2);
    assert!(!AuditLog::is_signed(&path).unwrap());
    let (log, _) = AuditLog::open(&path).unwrap();
    assert!(AuditLog::is_signed(&path).unwrap());
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 2);
    assert_eq!(Some(AuditLog::head(&path).unwrap()), log.signed_head());
    // Once there is a key, an unsigned head is a rewritten one; a signed head without the
    // public key is a removed key.
    let _ = std::fs::read(head_file(&path)).unwrap();
    std::fs::write(head_file(&path), head.to_string()).unwrap();
    assert!(
        broken(&path).contains("not signed while the device has a key"),
        "{}",
        broken(&path)
    );
    let err = AuditLog::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("not signed while the device has a key"),
        "{err}"
    );
    // Unless it is older than the key: a cut between making the key and signing the head.
    let key_made = std::fs::metadata(dir.path().join("device.key"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(head_file(&path))
        .unwrap()
        .set_modified(key_made - std::time::Duration::from_secs(10))
        .unwrap();
    AuditLog::open(&path).unwrap();
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 2);
    let signed_head = std::fs::read(head_file(&path)).unwrap();
    std::fs::write(head_file(&path), signed_head).unwrap();
    std::fs::remove_file(dir.path().join("device.pub")).unwrap();
    assert!(
        broken(&path).contains("device.pub) is gone"),
        "{}",
        broken(&path)
    );
}

#[test]
fn a_log_verifies_while_the_agent_appends_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // Long enough that checking the records takes a while, so that appends land between the
    // reads of the log and of its head.
    write_log(&path, 2000);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut log, _) = AuditLog::open(&path).unwrap();
            for i in 0..300 {
                log.append(Timestamp::now(), "check-in", details(i))
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut checks = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let records = AuditLog::verify(&path)
                .unwrap_or_else(|e| panic!("check {checks} beside the appends: {e}"));
            assert!(records.len() >= 2000);
            checks += 1;
        }
        writer.join().unwrap();
        assert!(checks >= 3, "only {checks} checks ran beside the appends");
    });
    assert_eq!(AuditLog::verify(&path).unwrap().len(), 2300);
}
