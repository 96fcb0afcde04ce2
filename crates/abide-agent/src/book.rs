//! The device's schedules, kept in `STATE_DIR/schedules.json` (replaced atomically, so they
//! survive restarts and power cuts): the updates operators asked for on the device and the
//! fleet's assignments the agent carries out. Their lifecycle is
//! `abide_core::schedule::Schedule`; this file stores them and picks the one to run.

use std::path::{Path, PathBuf};

use abide_core::schedule::{Schedule, ScheduleState};
use serde::{Deserialize, Serialize};

use crate::error::Result;

const FORMAT: u32 = 1;

/// Ended schedules kept for `abide schedule list` (the oldest are dropped first).
pub const KEEP_ENDED: usize = 100;

/// Every schedule the device keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    format: u32,
    /// The number of the next schedule's id (`s1`, `s2`, …).
    next: u64,
    /// Oldest first.
    pub schedules: Vec<Schedule>,
}

impl Default for Book {
    fn default() -> Book {
        Book {
            format: FORMAT,
            next: 1,
            schedules: Vec::new(),
        }
    }
}

impl Book {
    /// The file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("schedules.json")
    }

    /// Reads the file; a missing one is a device without schedules.
    pub fn load(state_dir: &Path) -> Result<Book> {
        Ok(
            crate::json_file::load(&Book::path(state_dir), "schedule list", Some(FORMAT))?
                .unwrap_or_default(),
        )
    }

    /// Replaces the file atomically.
    pub fn store(&self, state_dir: &Path) -> Result<()> {
        crate::json_file::store(&Book::path(state_dir), self, 0o600)
    }

    /// The id the next schedule gets.
    pub fn next_id(&self) -> String {
        format!("s{}", self.next)
    }

    /// Adds a schedule made with [`Book::next_id`], dropping the oldest ended ones past
    /// [`KEEP_ENDED`].
    pub fn add(&mut self, schedule: Schedule) {
        self.next += 1;
        self.schedules.push(schedule);
        let ended = self
            .schedules
            .iter()
            .filter(|s| s.state.is_terminal())
            .count();
        let mut drop = ended.saturating_sub(KEEP_ENDED);
        self.schedules.retain(|s| {
            if drop > 0 && s.state.is_terminal() {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }

    /// The schedule `id`.
    pub fn get(&self, id: &str) -> Option<&Schedule> {
        self.schedules.iter().find(|s| s.id == id)
    }

    /// The schedule `id`, to change.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Schedule> {
        self.schedules.iter_mut().find(|s| s.id == id)
    }

    /// The schedule being carried out, if one is.
    pub fn in_progress(&self) -> Option<&Schedule> {
        abide_core::agent::in_progress(&self.schedules)
    }

    /// The oldest pending schedule that is due at `now` (`window_open`: whether the device's
    /// maintenance window is open), as the agent's round picks it.
    pub fn due(&self, now: jiff::Timestamp, window_open: bool) -> Option<&Schedule> {
        abide_core::agent::due(&self.schedules, now, window_open)
    }

    /// The schedule being carried out, to change.
    pub fn in_progress_mut(&mut self) -> Option<&mut Schedule> {
        self.schedules
            .iter_mut()
            .find(|s| matches!(s.state, ScheduleState::InProgress { .. }))
    }
}
