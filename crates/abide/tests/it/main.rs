//! The `abide` command end to end: real processes, real files, the JSON and exit codes that
//! scripts rely on.

mod agent;
mod app;
mod bundle;
mod crash;
mod delta;
mod device;
mod fleet;
mod hooks;
mod hostile;
mod keys;
mod schedule;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs `abide` with the white-space separated `args` in `dir`.
pub fn abide(dir: &Path, args: &str) -> Output {
    abide_args(dir, &args.split_whitespace().collect::<Vec<_>>())
}

/// Runs `abide` with `args` in `dir`.
pub fn abide_args(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_abide"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("abide runs")
}

/// Runs `abide` and insists that it succeeds; returns its standard output.
pub fn ok(dir: &Path, args: &str) -> String {
    let out = abide(dir, args);
    assert!(
        out.status.success(),
        "abide {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Runs `abide ARGS --json` (white-space separated), expects exit code `exit`, and returns
/// the parsed JSON.
pub fn json(dir: &Path, args: &str, exit: i32) -> serde_json::Value {
    json_args(dir, &args.split_whitespace().collect::<Vec<_>>(), exit)
}

/// [`json`] with the arguments as a list.
pub fn json_args(dir: &Path, args: &[&str], exit: i32) -> serde_json::Value {
    failure_args(dir, args, exit).0
}

/// Runs `abide ARGS --json`, expects exit code `exit`, and returns the parsed JSON and, for a
/// failure, the code of the one line `abide: error [CODE]: MESSAGE` it wrote to standard error.
/// Every failure is checked for what README promises: that line, and when the JSON is an
/// error, `"ok": false` with the same code and a message.
pub fn failure_args(dir: &Path, args: &[&str], exit: i32) -> (serde_json::Value, Option<String>) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = abide_args(dir, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(exit),
        "abide {all:?}: stderr {stderr}"
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "abide {all:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    if exit == 0 {
        return (value, None);
    }
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("abide: error ["))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "abide {all:?}: one error line on stderr: {stderr}"
    );
    let (code, message) = lines[0]
        .strip_prefix("abide: error [")
        .and_then(|l| l.split_once("]: "))
        .unwrap_or_else(|| panic!("abide {all:?}: the error line is {:?}", lines[0]));
    assert!(!message.trim().is_empty(), "abide {all:?}: {stderr}");
    if let Some(error) = value.get("error") {
        assert_eq!(value["ok"], false, "abide {all:?}: {value}");
        assert_eq!(error["code"], code, "abide {all:?}: {value} / {stderr}");
        assert_eq!(
            error["message"], message,
            "abide {all:?}: {value} / {stderr}"
        );
    }
    (value, Some(code.to_owned()))
}

/// [`failure_args`] with white-space separated arguments.
pub fn failure(dir: &Path, args: &str, exit: i32) -> (serde_json::Value, Option<String>) {
    failure_args(dir, &args.split_whitespace().collect::<Vec<_>>(), exit)
}

/// A fresh directory with keys a, b, c and a 1-of-2 trust root over a and b.
pub fn workspace() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_owned();
    for k in ["a", "b", "c"] {
        ok(&dir, &format!("key generate --out {k}"));
    }
    ok(
        &dir,
        "trust init --key a.pub --key b.pub --threshold 1 --sign a.key --out trust.json",
    );
    (tmp, dir)
}

/// Names in `dir` other than the white-space separated `known` ones: what a failed command
/// left behind.
pub fn leftovers(dir: &Path, known: &str) -> Vec<String> {
    let known: Vec<&str> = known.split_whitespace().collect();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !known.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}
