//! The `sim` backend: the boot state in a JSON file, and a firmware step that picks the group
//! by exactly the rules the real bootloaders follow ([`BootState::firmware_select`]). Tests and
//! `abide demo` reboot through it.

use std::path::{Path, PathBuf};

use abide_core::Group;

use crate::backend::{BootError, Bootloader};
use crate::state::BootState;
use abide_fs::persist::{read_bounded, write_atomic};

/// A simulated bootloader whose "NVRAM" is a file.
#[derive(Debug, Clone)]
pub struct SimBootloader {
    path: PathBuf,
}

impl SimBootloader {
    /// The simulated bootloader keeping its state at `path`.
    pub fn new(path: &Path) -> SimBootloader {
        SimBootloader {
            path: path.to_owned(),
        }
    }

    /// Creates the state file for `groups` (the first is the default).
    pub fn init(path: &Path, groups: &[Group]) -> Result<SimBootloader, BootError> {
        let sim = SimBootloader::new(path);
        sim.store(&BootState::new(groups))?;
        Ok(sim)
    }

    /// One power-on: the firmware picks a group, records it and its counter, and returns it.
    pub fn power_on(&self) -> Result<Option<Group>, BootError> {
        let mut state = self.load()?;
        let chosen = state.firmware_select();
        self.store(&state)?;
        Ok(chosen)
    }
}

impl Bootloader for SimBootloader {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn load(&self) -> Result<BootState, BootError> {
        let bytes = read_bounded(&self.path, 64 << 10)?;
        serde_json::from_slice(&bytes).map_err(|e| BootError::Inconsistent {
            path: self.path.clone(),
            what: format!("not a sim boot state: {e}"),
        })
    }

    fn store(&self, state: &BootState) -> Result<(), BootError> {
        let mut bytes = serde_json::to_vec_pretty(state).expect("boot state serializes");
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes, 0o644)?;
        Ok(())
    }
}
