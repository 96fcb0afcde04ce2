//! The core does no I/O, reads no clock, sleeps and spawns nothing, and every source file says
//! what it is for.

use std::path::Path;

use abide_testkit::tidy::{IO_AND_CLOCK, check_sources};

#[test]
fn the_core_is_pure() {
    let mut forbidden = IO_AND_CLOCK.to_vec();
    forbidden.extend(["std::thread", "std::process", "std::io"]);
    check_sources(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &forbidden,
    );
}

/// The `abide-*` crates a crate's `[dependencies]` name.
fn ours(krate: &str) -> std::collections::BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut in_deps = false;
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && line.starts_with("abide-") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// The crate graph as ARCHITECTURE.md draws it: the pure crates depend on nothing of ours but
/// the bundle format, the durable-file crate on nothing of ours, the bootloader crate on core
/// and files only, and the fleet server never on the device's crates.
#[test]
fn the_crate_graph_is_as_architecture_draws_it() {
    let set = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
    assert_eq!(ours("abide-bundle"), set(&[]));
    assert_eq!(ours("abide-fs"), set(&[]));
    assert_eq!(ours("abide-proto"), set(&[]));
    assert_eq!(ours("abide-core"), set(&["abide-bundle"]));
    assert_eq!(ours("abide-boot"), set(&["abide-core", "abide-fs"]));
    let server = ours("abide-server");
    for device in ["abide-boot", "abide-agent", "abide-client"] {
        assert!(!server.contains(device), "abide-server depends on {device}");
    }
    assert!(
        !ours("abide-agent").contains("abide-server"),
        "the agent never depends on the server"
    );
}
