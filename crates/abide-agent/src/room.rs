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
    let fs = rustix::fs::statvfs(dir).map_err(|e| abide_boot::persist::IoError {
        op: "measuring free space in",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    let inodes = (fs.f_files > 0).then_some(fs.f_favail);
    Ok((inodes, fs.f_bavail.saturating_mul(fs.f_frsize)))
}

/// Refuses when `needed` more inodes would leave fewer than [`INODE_RESERVE`] free on the file
/// system of `dir`; `what` says what needs them.
pub fn inodes(dir: &Path, needed: u64, what: &str) -> Result<()> {
    match free(dir)?.0 {
        Some(free) if free < needed.saturating_add(INODE_RESERVE) => Err(AgentError::NoInodes {
            dir: dir.to_owned(),
            free,
            what: format!("{what} needs {needed} more"),
            reserve: INODE_RESERVE,
        }),
        _ => Ok(()),
    }
}

/// Refuses when the file system of `dir` has less than `bytes` free, or fewer than
/// [`INODE_RESERVE`] inodes.
pub fn bytes_and_inodes(dir: &Path, bytes: u64) -> Result<()> {
    let (_, available) = free(dir)?;
    if available < bytes {
        return Err(AgentError::NoSpace {
            dir: dir.to_owned(),
            available,
            needed: 0,
            reserve: bytes,
        });
    }
    inodes(dir, 0, "what a failure and its recovery write")
}

/// Refuses when the file system of `dir` has fewer than `needed` bytes free.
pub fn bytes(dir: &Path, needed: u64) -> Result<()> {
    let (_, available) = free(dir)?;
    if available < needed {
        return Err(AgentError::NoSpace {
            dir: dir.to_owned(),
            available,
            needed,
            reserve: 0,
        });
    }
    Ok(())
}
