//! The bootloader state every backend maps onto, the edits the transaction engine asks for,
//! and the firmware's rule for choosing a group: the reference the real backends (and the GRUB
//! script) are tested against.

use std::collections::BTreeMap;

use abide_core::{Action, Group};
use serde::{Deserialize, Serialize};

/// The most boots a trial may be given (GRUB script has no arithmetic, so its counter is an
/// explicit chain of this length).
pub const MAX_TRIES: u8 = 3;

/// What the bootloader knows: which groups there are in priority order, which is on trial
/// with how many boots left, which are unbootable, and what it booted last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootState {
    /// The groups in priority order: the first bootable one is the default (known-good).
    pub order: Vec<Group>,
    /// The group on trial, if any, and its boots left.
    pub trial: Option<(Group, u8)>,
    /// Per group, whether it may boot at all.
    pub bootable: BTreeMap<Group, bool>,
    /// The group the firmware booted last, as the bootloader recorded it.
    pub booted: Option<Group>,
}

/// Why a boot state edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The group is not one of the bootloader's.
    #[error("group {0} is not configured in the bootloader")]
    UnknownGroup(Group),
    /// A trial count outside 1..=MAX_TRIES.
    #[error("a trial gets 1 to {MAX_TRIES} boots, not {0}")]
    Tries(u8),
}

impl BootState {
    /// A fresh state: `groups` in order, all bootable, no trial, nothing booted yet.
    pub fn new(groups: &[Group]) -> BootState {
        BootState {
            order: groups.to_vec(),
            trial: None,
            bootable: groups.iter().map(|g| (g.clone(), true)).collect(),
            booted: None,
        }
    }

    /// The known-good group: the first bootable group in priority order.
    pub fn good(&self) -> Option<&Group> {
        self.order
            .iter()
            .find(|g| self.bootable.get(*g).copied().unwrap_or(false))
    }

    /// Applies one bootloader action of the transaction engine (in memory). Actions that are
    /// not about the bootloader are ignored.
    pub fn apply(&mut self, action: &Action) -> Result<(), StateError> {
        match action {
            Action::MarkUnbootable { group } => {
                self.known(group)?;
                self.bootable.insert(group.clone(), false);
                if self.trial.as_ref().is_some_and(|(g, _)| g == group) {
                    self.trial = None;
                }
            }
            Action::TryNext { group, tries } => {
                self.known(group)?;
                if !(1..=MAX_TRIES).contains(tries) {
                    return Err(StateError::Tries(*tries));
                }
                self.bootable.insert(group.clone(), true);
                self.trial = Some((group.clone(), *tries));
            }
            Action::MarkGood { group } => {
                self.known(group)?;
                self.bootable.insert(group.clone(), true);
                self.order.retain(|g| g != group);
                self.order.insert(0, group.clone());
                if self.trial.as_ref().is_some_and(|(g, _)| g == group) {
                    self.trial = None;
                }
            }
            Action::RaiseSecurityVersion { .. }
            | Action::Quarantine { .. }
            | Action::RunHealthGate
            | Action::Reboot => {}
        }
        Ok(())
    }

    /// The firmware's choice at power-on, and the state it leaves: a bootable trial group with
    /// boots left is booted and its counter decremented before it starts (so a crash during
    /// that boot still uses up the try); otherwise the first bootable group in order. `None`
    /// when no group is bootable.
    pub fn firmware_select(&mut self) -> Option<Group> {
        let chosen = match self.trial.take() {
            Some((group, left))
                if left > 0 && self.bootable.get(&group).copied().unwrap_or(false) =>
            {
                // The last boot of a trial ends it: the next power-on falls back by itself.
                self.trial = (left > 1).then(|| (group.clone(), left - 1));
                Some(group)
            }
            _ => self.good().cloned(),
        };
        self.booted = chosen.clone();
        chosen
    }

    fn known(&self, group: &Group) -> Result<(), StateError> {
        if self.order.contains(group) {
            Ok(())
        } else {
            Err(StateError::UnknownGroup(group.clone()))
        }
    }
}

/// The group named by `abide.group=` on a kernel command line (the boot scripts put it there):
/// the first such word, if it names a valid group.
pub fn cmdline_group(cmdline: &str) -> Option<Group> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("abide.group="))
        .and_then(|g| Group::new(g).ok())
}

/// [`cmdline_group`] of the kernel command line in the file at `path` (`/proc/cmdline`), if it
/// can be read.
pub fn booted_from(path: &std::path::Path) -> Option<Group> {
    cmdline_group(&std::fs::read_to_string(path).ok()?)
}
