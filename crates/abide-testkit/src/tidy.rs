//! Conventions kept by tests rather than by memory: which source files may do I/O, and that
//! every file says what it is for.

use std::path::Path;

/// Words whose presence means a file does I/O, reads a clock, or prints.
pub const IO_AND_CLOCK: &[&str] = &[
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
    "tokio",
    "thread::sleep",
];

/// The `.rs` files under `dir` and its subdirectories, as (path below `dir`, text).
pub fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).expect("source directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path
                    .strip_prefix(dir)
                    .expect("below dir")
                    .to_string_lossy()
                    .into_owned();
                out.push((name, std::fs::read_to_string(&path).expect("source")));
            }
        }
    }
    out.sort();
    out
}

/// Panics naming the first file under `dir` that uses one of `forbidden` or does not start
/// with a `//!` line.
pub fn check_sources(dir: &Path, forbidden: &[&str]) {
    let files = sources(dir);
    assert!(!files.is_empty(), "no sources in {}", dir.display());
    for (name, text) in files {
        assert!(
            text.starts_with("//! "),
            "{name} does not start with a //! line"
        );
        for word in forbidden {
            assert!(!text.contains(word), "{name} uses {word}");
        }
    }
}
