//! The device state file (`STATE_DIR/state.json`): the running version, the anti-rollback
//! counter, what each group holds, the current or last transaction, and the quarantine.
//! Replaced atomically on every change (I6).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abide_core::{Group, Quarantine, Transaction};
use abide_fs::persist::{read_bounded, write_atomic};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// The state file format this code writes. A file without a format is format 1 (the format
/// before the field existed); a newer one is refused, never guessed at.
pub const FORMAT: u32 = 1;

fn format_one() -> u32 {
    1
}

/// Everything the agent remembers between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The file format ([`FORMAT`]).
    #[serde(default = "format_one")]
    pub format: u32,
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

impl DeviceRecord {
    /// The state file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// Reads the state file.
    pub fn load(state_dir: &Path) -> Result<DeviceRecord> {
        let path = DeviceRecord::path(state_dir);
        let bytes = read_bounded(&path, 1 << 20)?;
        // The format first, so that a newer file is named as such rather than as damaged.
        #[derive(Deserialize)]
        struct Format {
            #[serde(default = "format_one")]
            format: u32,
        }
        let format = serde_json::from_slice::<Format>(&bytes).map(|f| f.format);
        if let Ok(f) = format
            && f != FORMAT
        {
            return Err(AgentError::State {
                path,
                what: format!(
                    "state file format {f}; this abide reads format {FORMAT} (was it written by a newer abide?)"
                ),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
            path,
            what: format!("not a device state: {e}"),
        })
    }

    /// Replaces the state file atomically.
    pub fn store(&self, state_dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        bytes.push(b'\n');
        // A full disk gives back the reserve for it (crate::room).
        crate::room::with_reserve(state_dir, || {
            Ok(write_atomic(&DeviceRecord::path(state_dir), &bytes, 0o644)?)
        })
    }
}
