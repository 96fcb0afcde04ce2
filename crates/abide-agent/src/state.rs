//! The device state file (`STATE_DIR/state.json`): the running version, the anti-rollback
//! counter, what each group holds, the current or last transaction, and the quarantine.
//! Replaced atomically on every change (I6).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abide_boot::persist::{read_bounded, write_atomic};
use abide_core::{Group, Quarantine, Transaction};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// Everything the agent remembers between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The committed version the device runs.
    pub version: Version,
    /// The anti-rollback counter.
    pub security_version: u64,
    /// The version each group holds, if known.
    pub groups: BTreeMap<Group, Option<Version>>,
    /// The current or last transaction.
    pub transaction: Option<Transaction>,
    /// Versions rolled back here.
    pub quarantine: Quarantine,
}

impl DeviceState {
    /// The state file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// Reads the state file.
    pub fn load(state_dir: &Path) -> Result<DeviceState> {
        let path = DeviceState::path(state_dir);
        let bytes = read_bounded(&path, 1 << 20)?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
            path,
            what: format!("not a device state: {e}"),
        })
    }

    /// Replaces the state file atomically.
    pub fn store(&self, state_dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        bytes.push(b'\n');
        write_atomic(&DeviceState::path(state_dir), &bytes, 0o644)?;
        Ok(())
    }
}
