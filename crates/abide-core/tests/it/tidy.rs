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

/// Every sync of a file, directory or file system goes through `abide_fs::persist`, so that the
/// crash tests' power-loss model (`abide_fs::powerloss`) sees every one: a sync made elsewhere
/// would be invisible to it, and the model would call durable what is not.
#[test]
fn every_sync_goes_through_abide_fs() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = 0;
    for krate in std::fs::read_dir(&crates).unwrap() {
        let krate = krate.unwrap();
        let name = krate.file_name().to_string_lossy().into_owned();
        if name == "abide-fs" || name == "abide-testkit" {
            continue;
        }
        let src = krate.path().join("src");
        if !src.is_dir() {
            continue;
        }
        check_sources(&src, &[".sync_all()", ".sync_data()", "fs::syncfs("]);
        checked += 1;
    }
    assert!(checked >= 8, "{checked} crates checked");
}
