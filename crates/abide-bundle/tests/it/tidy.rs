//! Conventions kept by a test rather than by memory: the bundle crate does no I/O and reads no
//! clock, and every source file says what it is for.

use std::path::Path;

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    assert!(out.len() >= 10, "found the sources");
    out
}

#[test]
fn the_bundle_crate_does_no_io_and_reads_no_clock() {
    let forbidden = [
        "std::fs",
        "std::net",
        "File::",
        "SystemTime",
        "Instant::",
        "Timestamp::now",
        "std::env",
        "getrandom",
        "println!",
        "eprintln!",
    ];
    for (name, text) in sources() {
        for word in forbidden {
            assert!(!text.contains(word), "{name} uses {word}");
        }
    }
}

#[test]
fn every_source_file_starts_with_a_doc_line() {
    for (name, text) in sources() {
        assert!(
            text.starts_with("//! "),
            "{name} does not start with a //! line"
        );
    }
}
