//! The core does no I/O, reads no clock, sleeps and spawns nothing, and every source file says
//! what it is for: checked in its sources, in its dependencies, and in the machine code the
//! compiler made of it.

use std::path::{Path, PathBuf};

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

/// Calls that do I/O, read a clock or the environment, sleep, spawn or print, as the names of
/// the functions they end in (demangled).
const IMPURE_SYMBOLS: &[&str] = &[
    "std::fs::",
    "std::net::",
    "std::os::",
    "std::process::",
    "std::thread::",
    "std::env::",
    "std::io::stdio::",
    "std::io::Write",
    "std::time::SystemTime::now",
    "std::time::Instant::now",
    "std::sys::",
    "jiff::timestamp::Timestamp::now",
    "jiff::zoned::Zoned::now",
    "jiff::tz::",
    "getrandom",
    "rand::",
    "tokio::",
    "libc::",
    "rustix::",
    "clock_gettime",
    "open64",
];

/// The newest compiled library `lib{name}-*.rlib` beside this test's executable.
fn rlib(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let prefix = format!("lib{name}-");
    std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "rlib")
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&prefix)
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no {prefix}*.rlib in {}", deps.display()))
}

/// The impure calls `rlib`'s object code makes: the undefined symbols (what it calls in other
/// crates) that match [`IMPURE_SYMBOLS`].
fn impure_calls(rlib: &Path) -> Vec<String> {
    let out = std::process::Command::new("nm")
        .args(["--demangle", "--undefined-only", "--format=posix"])
        .arg(rlib)
        .output()
        .expect("nm runs (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() > 10,
        "nm read no symbols: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found: Vec<String> = text
        .lines()
        .filter_map(|l| l.rsplit_once(" U").map(|(name, _)| name.trim().to_owned()))
        .filter(|name| IMPURE_SYMBOLS.iter().any(|s| name.contains(s)))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// What the compiler made of the core calls nothing that does I/O or reads a clock, whatever
/// the source spells (an alias, a `use` in a nested module, a macro). The same scan finds such
/// calls in the test kit, which reads files, so it does see them where they are.
#[test]
fn the_core_machine_code_calls_no_io_clock_or_thread() {
    let core = rlib("abide_core");
    let calls = impure_calls(&core);
    assert!(calls.is_empty(), "{} calls {calls:#?}", core.display());
    let testkit = impure_calls(&rlib("abide_testkit"));
    assert!(
        testkit.iter().any(|c| c.contains("std::fs::")),
        "the scan finds no file I/O in the test kit: {testkit:#?}"
    );
}

/// The core's dependencies are the bundle format, the fleet's wire types and four libraries
/// that do no I/O: a new one
/// (an async runtime, a database, a random source) is a decision to make here, in the open.
#[test]
fn the_core_depends_only_on_pure_libraries() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let mut in_deps = false;
    let mut deps = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
        } else if in_deps && !line.is_empty() && !line.starts_with('#') {
            deps.push(line.split(['.', ' ', '=']).next().unwrap().to_owned());
        }
    }
    deps.sort();
    assert_eq!(
        deps,
        [
            "abide-bundle",
            "abide-fleet-json",
            "jiff",
            "semver",
            "serde",
            "thiserror"
        ]
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
    assert_eq!(ours("abide-fleet-json"), set(&[]));
    // The agent's local API is its .proto, the generated code and the transports: no crate of
    // ours.
    assert_eq!(ours("abide-agent-api"), set(&[]));
    // The core decides on the fleet's wire enums themselves: no copy of them to convert.
    assert_eq!(
        ours("abide-core"),
        set(&["abide-bundle", "abide-fleet-json"])
    );
    assert_eq!(ours("abide-boot"), set(&["abide-core", "abide-fs"]));
    let server = ours("abide-server");
    for device in ["abide-boot", "abide-agent", "abide-client"] {
        assert!(!server.contains(device), "abide-server depends on {device}");
    }
    assert!(
        !ours("abide-agent").contains("abide-server"),
        "the agent never depends on the server"
    );
    // An edge is drawn where it is used: no crate hands on another crate of ours under its own
    // name (uses of it would hide behind the re-export).
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut reexports = Vec::new();
    for krate in std::fs::read_dir(&crates).unwrap().flatten() {
        for (file, text) in abide_testkit::tidy::sources(&krate.path().join("src")) {
            for line in text
                .lines()
                .filter(|l| l.trim_start().starts_with("pub use abide_"))
            {
                reexports.push(format!(
                    "{}/src/{file}: {}",
                    krate.file_name().to_string_lossy(),
                    line.trim()
                ));
            }
        }
    }
    assert!(reexports.is_empty(), "{reexports:#?}");
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

/// ARCHITECTURE.md's code map names every source file of every crate (and of xtask) in that
/// crate's part of the map; only the crate roots (`lib.rs`, `main.rs`, `mod.rs`) may go
/// unnamed.
#[test]
fn the_code_map_names_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let map = text
        .split("## Code map")
        .nth(1)
        .and_then(|t| t.split("```").nth(1))
        .expect("a code map in a ``` block");
    // A crate's part: from its line (two spaces, or none for xtask) to the next such line.
    let part = |name: &str| -> String {
        let mut lines = map.lines().skip_while(|l| {
            !(l.starts_with(&format!("  {name} ")) || l.starts_with(&format!("{name} ")))
        });
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("{name} is not in the code map"));
        let rest: Vec<&str> = lines
            .take_while(|l| l.starts_with("   ") || l.is_empty())
            .collect();
        format!("{first}\n{}", rest.join("\n"))
    };
    let mut crates: Vec<(String, PathBuf)> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().join("src"),
            )
        })
        .collect();
    crates.push(("xtask".into(), root.join("xtask/src")));
    let mut missing = Vec::new();
    for (name, src) in crates {
        let part = part(&name);
        for (file, _) in abide_testkit::tidy::sources(&src) {
            let base = file.rsplit('/').next().unwrap();
            if !["lib.rs", "main.rs", "mod.rs"].contains(&base) && !part.contains(base) {
                missing.push(format!("{name}/src/{file}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's code map: {missing:?}"
    );
}
