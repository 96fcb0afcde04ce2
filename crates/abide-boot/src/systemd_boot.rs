//! The `systemd-boot` backend: boot counting in the names of Boot Loader Specification entry
//! files (systemd's Automatic Boot Assessment).
//!
//! Each slot group has one entry file in `ESP/loader/entries`, named
//! `abide-RANK-GROUP[+LEFT[-DONE]].conf`. systemd-boot sorts entries with no tries left
//! ("bad") last and the rest by their id in descending version order, so the digit `RANK`
//! decides which entry is its default: 3 for a trial, 2 for the known-good group, 1 for a
//! bootable fallback, 0 (with `+0`, bad) for an unbootable group. Before it starts an entry
//! with tries left it renames it `+LEFT-1-DONE+1`, so a trial that never commits turns bad by
//! itself and the known-good entry becomes the default again. An entry without a counter has
//! booted well.
//!
//! `loader.conf` must say `default abide-*`, so that entries of other systems never outrank
//! Abide's; the backend refuses to work otherwise. `systemd-bless-boot.service` must be masked:
//! Abide's health gate, not boot-complete.target, decides that a trial is good. Which group
//! booted comes from the kernel command line (`abide.group=A`), which every entry's `options`
//! line must carry.
//!
//! A change renames at most one entry per group, each rename followed by a directory fsync,
//! demotions first: a power loss between two renames leaves the old choice or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abide_core::Group;

use crate::backend::{BootError, Bootloader};
use crate::state::{BootState, MAX_TRIES};
use abide_fs::persist::{IoError, read_bounded, sync_dir, sync_file};

/// The rank of a trial entry.
pub const RANK_TRIAL: u8 = 3;
/// The rank of the known-good entry.
pub const RANK_GOOD: u8 = 2;
/// The rank of a bootable fallback entry.
pub const RANK_FALLBACK: u8 = 1;
/// The rank of an unbootable entry.
pub const RANK_OFF: u8 = 0;

const MAX_ENTRY_FILE: usize = 64 << 10;

/// The parsed name of one of Abide's entry files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    /// Its rank, 0 to 9.
    pub rank: u8,
    /// The slot group it boots.
    pub group: Group,
    /// The boot counter: tries left and tries done, if the entry has one.
    pub counter: Option<(u32, u32)>,
}

impl EntryName {
    /// Parses `abide-RANK-GROUP[+LEFT[-DONE]].conf`; `None` for any other name.
    pub fn parse(file: &str) -> Option<EntryName> {
        let stem = file.strip_suffix(".conf")?;
        let (id, counter) = match stem.rsplit_once('+') {
            Some((id, counter)) => {
                let (left, done) = match counter.split_once('-') {
                    Some((l, d)) => (l, Some(d)),
                    None => (counter, None),
                };
                let number = |s: &str| -> Option<u32> {
                    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| s.parse().ok())?
                };
                let done = match done {
                    Some(d) => number(d)?,
                    None => 0,
                };
                (id, Some((number(left)?, done)))
            }
            None => (stem, None),
        };
        let rest = id.strip_prefix("abide-")?;
        let (rank, group) = rest.split_once('-')?;
        if rank.len() != 1 {
            return None;
        }
        let rank = rank.bytes().next().filter(u8::is_ascii_digit)? - b'0';
        Some(EntryName {
            rank,
            group: Group::new(group).ok()?,
            counter,
        })
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        let base = format!("abide-{}-{}", self.rank, self.group);
        match self.counter {
            None => format!("{base}.conf"),
            Some((left, 0)) => format!("{base}+{left}.conf"),
            Some((left, done)) => format!("{base}+{left}-{done}.conf"),
        }
    }

    /// Whether systemd-boot counts it as bad (no tries left): sorted last, never the default
    /// while another entry is not bad.
    pub fn bad(&self) -> bool {
        matches!(self.counter, Some((0, _)))
    }

    /// The order systemd-boot lists Abide's entries in (the first is its default): bad ones
    /// last, the rest by id in descending version order, which for these names is the rank
    /// and then the group name, both descending.
    pub fn boot_order_key(&self) -> (bool, std::cmp::Reverse<u8>, std::cmp::Reverse<String>) {
        (
            self.bad(),
            std::cmp::Reverse(self.rank),
            std::cmp::Reverse(self.group.as_str().to_ascii_lowercase()),
        )
    }

    /// The same entry with the boot counter as `counter` says, keeping tries done when the
    /// tries left do not change (so a state stored again renames nothing).
    fn retarget(&self, rank: u8, counter: Option<u32>) -> EntryName {
        let counter = match (counter, self.counter) {
            (None, _) => None,
            (Some(left), Some((l, done))) if l == left => Some((left, done)),
            (Some(left), _) => Some((left, 0)),
        };
        EntryName {
            rank,
            group: self.group.clone(),
            counter,
        }
    }
}

/// The backend for an EFI system partition.
#[derive(Debug, Clone)]
pub struct SystemdBootBootloader {
    esp: PathBuf,
    cmdline: PathBuf,
    groups: Vec<Group>,
}

impl SystemdBootBootloader {
    /// The backend for the ESP mounted at `esp`, reading the booted group from the kernel
    /// command line at `cmdline` (normally `/proc/cmdline`).
    pub fn new(esp: &Path, cmdline: &Path, groups: &[Group]) -> SystemdBootBootloader {
        SystemdBootBootloader {
            esp: esp.to_owned(),
            cmdline: cmdline.to_owned(),
            groups: groups.to_vec(),
        }
    }

    /// The entries directory.
    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader").join("entries")
    }

    fn inconsistent(&self, path: &Path, what: String) -> BootError {
        BootError::Inconsistent {
            path: path.to_owned(),
            what,
        }
    }

    fn check_loader_conf(&self) -> Result<(), BootError> {
        let path = self.esp.join("loader").join("loader.conf");
        let text = read_bounded(&path, MAX_ENTRY_FILE)?;
        let text = String::from_utf8_lossy(&text);
        let default = text.lines().find_map(|l| {
            let l = l.trim();
            let (key, value) = l.split_once(char::is_whitespace)?;
            (key == "default").then(|| value.trim().to_owned())
        });
        match default.as_deref() {
            Some("abide-*" | "abide-*.conf") => Ok(()),
            found => Err(self.inconsistent(
                &path,
                format!(
                    "expected the line `default abide-*`, so that systemd-boot's default is \
                     chosen among Abide's entries, found {}",
                    found.map_or("no default line".to_owned(), |f| format!("`default {f}`"))
                ),
            )),
        }
    }

    /// Abide's entries, one per configured group, each checked to carry `abide.group=GROUP`
    /// on its options line.
    pub fn entries(&self) -> Result<BTreeMap<Group, EntryName>, BootError> {
        let dir = self.entries_dir();
        let listing = std::fs::read_dir(&dir).map_err(|source| IoError {
            op: "listing",
            path: dir.clone(),
            source,
        })?;
        let mut found: BTreeMap<Group, EntryName> = BTreeMap::new();
        for item in listing {
            let item = item.map_err(|source| IoError {
                op: "listing",
                path: dir.clone(),
                source,
            })?;
            let Some(entry) = item.file_name().to_str().and_then(EntryName::parse) else {
                continue;
            };
            if !self.groups.contains(&entry.group) {
                continue;
            }
            let path = dir.join(entry.file_name());
            let text = read_bounded(&path, MAX_ENTRY_FILE)?;
            if text.is_empty() {
                // The new name of a rename that a power cut interrupted on FAT, written before
                // the file's size was: systemd-boot skips an entry without a `linux` line, and
                // so does Abide; the next store removes it.
                continue;
            }
            if let Some(other) = found.get(&entry.group) {
                return Err(self.inconsistent(
                    &dir,
                    format!(
                        "two entries for group {}: {} and {}",
                        entry.group,
                        other.file_name(),
                        entry.file_name()
                    ),
                ));
            }
            let wanted = format!("abide.group={}", entry.group);
            let carries = String::from_utf8_lossy(&text).lines().any(|l| {
                l.trim()
                    .strip_prefix("options")
                    .is_some_and(|o| o.split_whitespace().any(|w| w == wanted))
            });
            if !carries {
                return Err(self.inconsistent(
                    &path,
                    format!(
                        "its `options` line must carry `{wanted}`, which tells Abide what booted"
                    ),
                ));
            }
            found.insert(entry.group.clone(), entry);
        }
        for g in &self.groups {
            if !found.contains_key(g) {
                return Err(self.inconsistent(
                    &dir,
                    format!(
                        "no entry for group {g} (a file named abide-RANK-{g}.conf, RANK 0 to 3)"
                    ),
                ));
            }
        }
        Ok(found)
    }

    /// Removes the empty entry files of Abide's groups that `entries` skipped (left by an
    /// interrupted rename), so that a later rename cannot meet them.
    fn remove_empty(&self, entries: &BTreeMap<Group, EntryName>) -> Result<(), BootError> {
        let dir = self.entries_dir();
        let listing = std::fs::read_dir(&dir).map_err(|source| IoError {
            op: "listing",
            path: dir.clone(),
            source,
        })?;
        for item in listing.flatten() {
            let Some(entry) = item.file_name().to_str().and_then(EntryName::parse) else {
                continue;
            };
            let empty = item.metadata().is_ok_and(|m| m.is_file() && m.len() == 0);
            if empty && entries.get(&entry.group) != Some(&entry) {
                let path = dir.join(entry.file_name());
                std::fs::remove_file(&path).map_err(|source| IoError {
                    op: "removing the empty boot entry",
                    path,
                    source,
                })?;
                sync_dir(&dir)?;
            }
        }
        Ok(())
    }

    /// The renames that take the entries `current` to `state`, in the order that keeps every
    /// step the old choice or the new one: entries that lose rank first.
    pub fn plan(
        current: &BTreeMap<Group, EntryName>,
        state: &BootState,
    ) -> Vec<(EntryName, EntryName)> {
        let good = state.good();
        let mut renames: Vec<(EntryName, EntryName)> = current
            .iter()
            .map(|(g, old)| {
                let bootable = state.bootable.get(g).copied().unwrap_or(false);
                let new = match &state.trial {
                    Some((t, n)) if t == g && bootable => {
                        old.retarget(RANK_TRIAL, Some(u32::from(*n)))
                    }
                    _ if !bootable => old.retarget(RANK_OFF, Some(0)),
                    _ if good == Some(g) => old.retarget(RANK_GOOD, None),
                    _ => old.retarget(RANK_FALLBACK, None),
                };
                (old.clone(), new)
            })
            .filter(|(old, new)| old != new)
            .collect();
        renames.sort_by_key(|(old, new)| (new.rank >= old.rank, new.rank));
        renames
    }
}

impl Bootloader for SystemdBootBootloader {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn load(&self) -> Result<BootState, BootError> {
        self.check_loader_conf()?;
        let entries = self.entries()?;
        let mut listed: Vec<&EntryName> = entries.values().collect();
        listed.sort_by_key(|e| e.boot_order_key());
        let trial = listed
            .iter()
            .find(|e| e.rank > RANK_OFF && e.counter.is_some_and(|(left, _)| left > 0))
            .map(|e| {
                let left = e.counter.map_or(0, |(l, _)| l);
                (e.group.clone(), left.min(u32::from(MAX_TRIES)) as u8)
            });
        // Known-good order: entries that booted well (no counter) first, in systemd-boot's
        // order; a trial or an exhausted one after them.
        let mut order = listed.clone();
        order.sort_by_key(|e| (e.counter.is_some(), e.boot_order_key()));
        let booted = crate::state::booted_from(&self.cmdline);
        Ok(BootState {
            order: order.iter().map(|e| e.group.clone()).collect(),
            trial,
            bootable: entries
                .iter()
                .map(|(g, e)| (g.clone(), e.rank > RANK_OFF))
                .collect(),
            booted,
        })
    }

    fn store(&self, state: &BootState) -> Result<(), BootError> {
        self.check_loader_conf()?;
        let dir = self.entries_dir();
        let entries = self.entries()?;
        self.remove_empty(&entries)?;
        for (old, new) in Self::plan(&entries, state) {
            let (from, to) = (dir.join(old.file_name()), dir.join(new.file_name()));
            abide_fs::crash::point("systemd-boot:before-rename", &to.to_string_lossy());
            std::fs::rename(&from, &to).map_err(|source| IoError {
                op: "renaming the boot entry",
                path: from.clone(),
                source,
            })?;
            // On FAT the size and first cluster of a file live in its directory entry, and
            // Linux writes the renamed entry with them only when the file itself is written
            // back: a directory fsync alone leaves an empty entry on the disk, which
            // systemd-boot skips (seen after a power cut: both entries empty, no bootable
            // entry). Syncing the file writes its entry.
            sync_file(&to)?;
            sync_dir(&dir)?;
        }
        Ok(())
    }
}
