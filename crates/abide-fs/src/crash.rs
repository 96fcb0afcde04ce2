//! Crash points: the places where a power loss must be survivable, made reachable by tests.
//!
//! Every durable step calls [`point`] with a name. With `ABIDE_CRASH_TRACE=FILE` in the
//! environment, each call appends its name to FILE (so a test learns the sequence of durable
//! steps of an operation); with `ABIDE_CRASH_AT=K`, the K-th call (counting from 0) aborts the
//! process on the spot — no destructors, no flushing — as a power loss would; with
//! `ABIDE_FILL_AT=K` and `ABIDE_FILL_DIR=DIR` the K-th call fills DIR's file system and the
//! process goes on. Without those variables a point costs one cached environment lookup.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Plan {
    trace: Option<std::path::PathBuf>,
    crash_at: Option<usize>,
    /// With `ABIDE_FILL_AT=K` and `ABIDE_FILL_DIR=DIR`: the K-th call fills DIR's file system
    /// (its bytes, its inodes, or with `ABIDE_FILL=bytes|inodes` only one of them) and the
    /// process goes on, as when something else filled the disk at that moment.
    fill_at: Option<(usize, std::path::PathBuf)>,
    fill: Option<String>,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| Plan {
        trace: std::env::var_os("ABIDE_CRASH_TRACE").map(Into::into),
        crash_at: std::env::var("ABIDE_CRASH_AT")
            .ok()
            .and_then(|v| v.parse().ok()),
        fill_at: std::env::var("ABIDE_FILL_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .zip(std::env::var_os("ABIDE_FILL_DIR").map(Into::into)),
        fill: std::env::var("ABIDE_FILL").ok(),
    })
}

/// Fills the file system of `dir`: its bytes (one file written until a write fails), its
/// inodes (empty files made until one cannot be), or both, as `what` says (`bytes`, `inodes`,
/// or anything else for both).
fn fill(dir: &std::path::Path, what: Option<&str>) {
    if what != Some("inodes")
        && let Ok(mut f) = std::fs::File::create(dir.join(".fill-bytes"))
    {
        let block = vec![0x5au8; 64 << 10];
        for size in [64 << 10, 4096, 512, 1] {
            while f.write_all(&block[..size]).is_ok() {}
        }
    }
    if what != Some("bytes") {
        let mut n = 0u64;
        while std::fs::File::create(dir.join(format!(".fill-{n}"))).is_ok() {
            n += 1;
        }
    }
}

/// A durable step (`name`, about `detail`) is about to happen or just happened; see the
/// module documentation.
pub fn point(name: &str, detail: &str) {
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let plan = plan();
    if plan.trace.is_none() && plan.crash_at.is_none() && plan.fill_at.is_none() {
        return;
    }
    let n = HITS.fetch_add(1, Ordering::SeqCst);
    if let Some(path) = &plan.trace
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{name} {detail}");
    }
    if plan.crash_at == Some(n) {
        std::process::abort();
    }
    if let Some((_, dir)) = plan.fill_at.as_ref().filter(|(at, _)| *at == n) {
        fill(dir, plan.fill.as_deref());
    }
}
