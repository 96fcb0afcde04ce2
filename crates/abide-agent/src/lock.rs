//! One device, one writer: every command that changes the device (the agent, `abide install`,
//! `mark-good`, `rollback`, `boot`) holds an exclusive `flock` on `STATE_DIR/lock` while it
//! does. The lock is the kernel's: it goes away with the process, so a crash never leaves it
//! held. Read-only commands take no lock.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{FlockOperation, flock};

use crate::error::{AgentError, Result};

/// What to do when another process holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contention {
    /// Wait until it is free.
    Wait,
    /// Fail at once with `busy`.
    Fail,
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct DeviceLock {
    _file: File,
}

impl DeviceLock {
    /// Takes the lock of the state directory `state_dir`.
    pub fn take(state_dir: &Path, contention: Contention) -> Result<DeviceLock> {
        let path = state_dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| abide_fs::persist::IoError {
                op: "opening the lock",
                path: path.clone(),
                source,
            })?;
        let op = match contention {
            Contention::Wait => FlockOperation::LockExclusive,
            Contention::Fail => FlockOperation::NonBlockingLockExclusive,
        };
        match flock(&file, op) {
            Ok(()) => Ok(DeviceLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(AgentError::Locked { path }),
            Err(e) => Err(abide_fs::persist::IoError {
                op: "locking",
                path,
                source: e.into(),
            }
            .into()),
        }
    }
}
