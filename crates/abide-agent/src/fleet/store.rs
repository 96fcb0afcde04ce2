//! `STATE_DIR/fleet.json` (mode 0600: it holds the credential): the device's enrolment (id,
//! credential, group, the server key it pinned), which release each version it installs came
//! from, whether it holds a reboot lease, and the reports not yet acknowledged, in order, with
//! their sequence numbers. Replaced atomically on every change (I6), so a report queued before
//! a reboot or a power cut is still sent after it, once.

use std::path::{Path, PathBuf};

use abide_core::fleet::Ledger;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The format version this code writes; a newer one is refused.
pub const FORMAT: u32 = 1;

/// The device's enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// The server it enrolled with.
    pub server: String,
    /// Its id.
    pub device_id: String,
    /// Its credential.
    pub credential: String,
    /// The server's assignment-signing key, hex, pinned at enrolment.
    pub server_key: String,
    /// Its group.
    pub group: String,
}

/// Everything the agent keeps about the fleet: its enrolment, and the ledger of its part in
/// the fleet's updates (`abide_core::fleet::Ledger`: the release assigned, the lease, the
/// reports not yet acknowledged), whose fields sit beside the enrolment in the file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FleetState {
    /// The file format.
    pub format: u32,
    /// The enrolment, once enrolled.
    pub enrolment: Option<Enrolment>,
    /// The release assigned, the lease, the reports.
    #[serde(flatten)]
    pub ledger: Ledger,
}

impl FleetState {
    /// The file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("fleet.json")
    }

    /// Reads the file; a missing one is a device that never enrolled.
    pub fn load(state_dir: &Path) -> Result<FleetState> {
        let state =
            crate::json_file::load(&FleetState::path(state_dir), "fleet state", Some(FORMAT))?;
        Ok(state.unwrap_or(FleetState {
            format: FORMAT,
            enrolment: None,
            ledger: Ledger::new(),
        }))
    }

    /// Replaces the file atomically, readable by its owner only.
    pub fn store(&self, state_dir: &Path) -> Result<()> {
        crate::json_file::store(&FleetState::path(state_dir), self, 0o600)
    }
}
