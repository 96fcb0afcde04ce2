//! Room on the file systems a change writes to, checked before the step that would use it up:
//! the files (inodes) as well as the bytes. What a failure and its recovery must write — audit
//! records, the state files' temporary copies, a link switched back — needs a few of each, so a
//! reserve stays free: an update never fills a file system so far that it cannot end on the
//! previous release by itself.

use std::path::Path;

use crate::error::{AgentError, Result};

/// Inodes kept free on every file system an update writes to.
pub const INODE_RESERVE: u64 = 64;

/// What `statvfs` says of the file system holding `dir`: free inodes (`None` where the file
/// system has no inode count) and free bytes.
fn free(dir: &Path) -> Result<(Option<u64>, u64)> {
    let fs = rustix::fs::statvfs(dir).map_err(|e| abide_fs::persist::IoError {
        op: "measuring free space in",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let inodes = (fs.f_files > 0).then_some(fs.f_favail);
    Ok((inodes, fs.f_bavail.saturating_mul(fs.f_frsize)))
}

/// What a step needs of a file system: `bytes` to write, with `reserve` bytes more to stay
/// free, and `inodes` files to make, with [`INODE_RESERVE`] more to stay free; `what` names the
/// step in the refusal.
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    /// Bytes the step writes.
    pub bytes: u64,
    /// Bytes that must stay free besides.
    pub reserve: u64,
    /// Files (inodes) the step makes.
    pub inodes: u64,
    /// What needs them.
    pub what: &'a str,
}

/// Refuses, with `no-space`, a step whose [`Need`] the file system of `dir` cannot meet (one
/// `statvfs`).
pub fn ensure(dir: &Path, need: Need<'_>) -> Result<()> {
    let (inodes, available) = free(dir)?;
    if available < need.bytes.saturating_add(need.reserve) {
        return Err(AgentError::NoSpace {
            dir: dir.to_owned(),
            available,
            needed: need.bytes,
            reserve: need.reserve,
        });
    }
    match inodes {
        Some(free) if free < need.inodes.saturating_add(INODE_RESERVE) => {
            Err(AgentError::NoInodes {
                dir: dir.to_owned(),
                free,
                what: format!("{} needs {} more", need.what, need.inodes),
                reserve: INODE_RESERVE,
            })
        }
        _ => Ok(()),
    }
}

/// The reserve in the state directory: a megabyte and [`INODE_RESERVE`] inodes held back, so
/// that what a failure and its recovery must write (audit records, state files, a link switched
/// back, a small data directory unpacked from its backup) can be written when something else
/// filled the disk in the middle of a change.
const RESERVE: &str = "reserve";

/// The bytes the reserve holds.
pub const RESERVE_BYTES: usize = 1 << 20;

/// Makes the reserve in `state_dir` if it is missing and the file system has room to spare for
/// it (best effort: without room, the device goes on without one and tries at its next
/// change).
pub fn keep_reserve(state_dir: &Path) {
    let dir = state_dir.join(RESERVE);
    let spare = Need {
        bytes: RESERVE_BYTES as u64,
        reserve: 3 * RESERVE_BYTES as u64,
        inodes: 2 * INODE_RESERVE,
        what: "the reserve",
    };
    if dir.join("bytes").exists() || ensure(state_dir, spare).is_err() {
        return;
    }
    let made = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        for i in 0..INODE_RESERVE {
            std::fs::File::create(dir.join(format!("i{i}")))?;
        }
        // Named last: a reserve is whole when its bytes are there.
        abide_fs::persist::write_atomic(&dir.join("bytes"), &vec![0u8; RESERVE_BYTES], 0o600)
            .map_err(std::io::Error::other)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Gives the reserve back to the file system; whether there was one.
pub fn release_reserve(state_dir: &Path) -> bool {
    std::fs::remove_dir_all(state_dir.join(RESERVE)).is_ok()
}

/// Runs `f`; if it fails because a file system is full and the reserve was there, gives the
/// reserve back and runs it once more. `f` must change nothing when it fails.
pub fn with_reserve<T>(state_dir: &Path, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    match f() {
        Err(e) if is_full(&e) && release_reserve(state_dir) => f(),
        done => done,
    }
}

/// Whether `e` says a file system is full (no bytes or no inodes left).
pub fn is_full(e: &AgentError) -> bool {
    if matches!(e, AgentError::NoSpace { .. } | AgentError::NoInodes { .. }) {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>().is_some_and(is_full_io) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Whether an I/O error says its file system is full (ENOSPC, or EDQUOT: a quota's end).
pub fn is_full_io(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(28 | 122))
}
