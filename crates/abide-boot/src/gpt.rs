//! The `gpt` backend: ChromeOS/Bottlerocket-style boot selection in the GUID partition table
//! of a disk or disk image. Each slot group has a partition (named `abide-A`, `abide-B`)
//! whose attribute bits 48–51 hold its priority, 52–55 its tries left, and 56 its
//! "successful" flag; the firmware boots the highest-priority partition that is successful
//! or has tries left, taking one try from an unsuccessful one before it starts it.
//!
//! The table is loaded, edited in memory, and written in one step: both entry arrays and
//! both headers with their CRC32s, the backup copy first, so a power loss in the middle leaves
//! one valid copy (firmware and tools fall back to the backup when the primary is damaged).
//! Sectors are 512 bytes. Which group booted comes from the kernel command line
//! (`abide.group=A`), as the firmware records nothing.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use abide_core::Group;

use crate::backend::{BootError, Bootloader};
use crate::state::BootState;
use abide_fs::persist::IoError;

const SECTOR: u64 = 512;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;

/// A partition's boot attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptPrio(pub u64);

impl GptPrio {
    /// Priority, 0 (never boot) to 15.
    pub fn priority(self) -> u8 {
        ((self.0 >> PRIORITY_SHIFT) & 0xf) as u8
    }
    /// Tries left, 0 to 15.
    pub fn tries(self) -> u8 {
        ((self.0 >> TRIES_SHIFT) & 0xf) as u8
    }
    /// Whether it booted successfully.
    pub fn successful(self) -> bool {
        self.0 & SUCCESSFUL_BIT != 0
    }
    /// The same attributes with the boot bits replaced (other bits kept).
    pub fn with(self, priority: u8, tries: u8, successful: bool) -> GptPrio {
        let mask = (0xffu64 << PRIORITY_SHIFT) | SUCCESSFUL_BIT;
        let bits = (u64::from(priority & 0xf) << PRIORITY_SHIFT)
            | (u64::from(tries & 0xf) << TRIES_SHIFT)
            | if successful { SUCCESSFUL_BIT } else { 0 };
        GptPrio((self.0 & !mask) | bits)
    }
    /// Whether the firmware may boot it.
    pub fn bootable(self) -> bool {
        self.priority() > 0 && (self.successful() || self.tries() > 0)
    }
}

/// A GPT as read from a disk: both headers and both entry arrays.
#[derive(Debug, Clone)]
pub struct GptTable {
    primary: Vec<u8>,
    backup: Vec<u8>,
    entries: Vec<u8>,
    entry_size: usize,
    primary_entries_lba: u64,
    backup_entries_lba: u64,
    backup_lba: u64,
}

fn header_crc(header: &[u8]) -> u32 {
    let size = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as usize;
    let mut h = header[..size.min(header.len())].to_vec();
    h[16..20].fill(0);
    crc32fast::hash(&h)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl GptTable {
    /// Reads and checks the table; the backup copy is used when the primary is damaged.
    pub fn read(disk: &File, path: &Path) -> Result<GptTable, BootError> {
        let bad = |what: String| BootError::Inconsistent {
            path: path.to_owned(),
            what,
        };
        let read_at = |lba: u64, len: usize| -> Result<Vec<u8>, BootError> {
            let mut buf = vec![0u8; len];
            disk.read_exact_at(&mut buf, lba * SECTOR)
                .map_err(|source| IoError {
                    op: "reading the partition table of",
                    path: path.to_owned(),
                    source,
                })?;
            Ok(buf)
        };
        let check = |header: &[u8]| -> Result<(u64, usize, u32, u32), String> {
            if &header[..8] != SIGNATURE {
                return Err("no GPT signature".into());
            }
            let size = u32_at(header, 12) as usize;
            if !(92..=SECTOR as usize).contains(&size) || header_crc(header) != u32_at(header, 16) {
                return Err("header CRC mismatch".into());
            }
            let (count, entry_size) = (u32_at(header, 80), u32_at(header, 84) as usize);
            if entry_size < 128 || count == 0 || count > 1024 {
                return Err("unusual entry array".into());
            }
            Ok((u64_at(header, 72), entry_size, count, u32_at(header, 88)))
        };
        let primary = read_at(1, SECTOR as usize)?;
        let (backup_lba, header) = match check(&primary) {
            Ok(_) => (u64_at(&primary, 32), primary.clone()),
            Err(_) => {
                let size = disk.metadata().map(|m| m.len()).unwrap_or(0);
                let lba = size / SECTOR - 1;
                (lba, read_at(lba, SECTOR as usize)?)
            }
        };
        let (entries_lba, entry_size, count, entries_crc) =
            check(&header).map_err(|e| bad(format!("partition table: {e}")))?;
        let entries = read_at(entries_lba, entry_size * count as usize)?;
        if crc32fast::hash(&entries) != entries_crc {
            return Err(bad("partition table: entry array CRC mismatch".into()));
        }
        let backup = read_at(backup_lba, SECTOR as usize)?;
        let backup_entries_lba = check(&backup)
            .map(|(lba, ..)| lba)
            .unwrap_or(backup_lba - (entries.len() as u64).div_ceil(SECTOR));
        let primary_entries_lba = 2;
        // A damaged copy is rebuilt from the good one: the same fields, with its own position,
        // its partner's and its entry array's swapped in.
        let rebuild = |from: &[u8], current: u64, alternate: u64, entries_at: u64| {
            let mut h = from.to_vec();
            h[24..32].copy_from_slice(&current.to_le_bytes());
            h[32..40].copy_from_slice(&alternate.to_le_bytes());
            h[72..80].copy_from_slice(&entries_at.to_le_bytes());
            h
        };
        let primary = if check(&primary).is_ok() {
            primary
        } else {
            rebuild(&backup, 1, backup_lba, primary_entries_lba)
        };
        let backup = if check(&backup).is_ok() {
            backup
        } else {
            rebuild(&primary, backup_lba, 1, backup_entries_lba)
        };
        Ok(GptTable {
            primary,
            backup,
            entries,
            entry_size,
            primary_entries_lba,
            backup_entries_lba,
            backup_lba,
        })
    }

    /// The index of the partition named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.entries.chunks(self.entry_size).position(|e| {
            let utf16: Vec<u16> = e[56..128]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            String::from_utf16_lossy(&utf16) == name
        })
    }

    /// The attributes of partition `index`.
    pub fn attributes(&self, index: usize) -> GptPrio {
        GptPrio(u64_at(&self.entries, index * self.entry_size + 48))
    }

    /// Sets the attributes of partition `index` (in memory).
    pub fn set_attributes(&mut self, index: usize, prio: GptPrio) {
        let at = index * self.entry_size + 48;
        self.entries[at..at + 8].copy_from_slice(&prio.0.to_le_bytes());
    }

    /// Writes both copies: backup entries and header, then primary entries and header.
    pub fn write(&mut self, disk: &File, path: &Path) -> Result<(), BootError> {
        let crc = crc32fast::hash(&self.entries);
        let io = |source| IoError {
            op: "writing the partition table of",
            path: path.to_owned(),
            source,
        };
        for (header, entries_lba, header_lba) in [
            (&mut self.backup, self.backup_entries_lba, self.backup_lba),
            (&mut self.primary, self.primary_entries_lba, 1),
        ] {
            header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            header[..8].copy_from_slice(SIGNATURE);
            header[88..92].copy_from_slice(&crc.to_le_bytes());
            let hc = header_crc(header);
            header[16..20].copy_from_slice(&hc.to_le_bytes());
            disk.write_all_at(&self.entries, entries_lba * SECTOR)
                .map_err(io)?;
            disk.write_all_at(header, header_lba * SECTOR).map_err(io)?;
            abide_fs::persist::fsync(disk, path)?;
            abide_fs::crash::point("gpt:copy-written", &path.to_string_lossy());
        }
        Ok(())
    }
}

/// The GPT backend for the disk (or image) at `path`.
#[derive(Debug, Clone)]
pub struct GptBootloader {
    path: PathBuf,
    cmdline: PathBuf,
    groups: Vec<Group>,
}

impl GptBootloader {
    /// The backend for `disk`, with the groups' partitions named `abide-GROUP`, reading the
    /// booted group from the kernel command line at `cmdline` (normally `/proc/cmdline`).
    pub fn new(disk: &Path, cmdline: &Path, groups: &[Group]) -> GptBootloader {
        GptBootloader {
            path: disk.to_owned(),
            cmdline: cmdline.to_owned(),
            groups: groups.to_vec(),
        }
    }

    fn open(&self, write: bool) -> Result<File, BootError> {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.path)
            .map_err(|source| {
                BootError::Io(IoError {
                    op: "opening",
                    path: self.path.clone(),
                    source,
                })
            })
    }

    fn index(&self, table: &GptTable, g: &Group) -> Result<usize, BootError> {
        table
            .find(&format!("abide-{g}"))
            .ok_or_else(|| BootError::Inconsistent {
                path: self.path.clone(),
                what: format!("no partition named abide-{g}"),
            })
    }
}

impl Bootloader for GptBootloader {
    fn name(&self) -> &'static str {
        "gpt"
    }

    fn load(&self) -> Result<BootState, BootError> {
        let table = GptTable::read(&self.open(false)?, &self.path)?;
        let mut prios = Vec::new();
        for g in &self.groups {
            prios.push((g.clone(), table.attributes(self.index(&table, g)?)));
        }
        let mut order: Vec<(Group, GptPrio)> = prios.clone();
        // Highest priority first; an unsuccessful partition with tries is the trial, not the
        // default, so the known-good order puts successful ones first.
        order.sort_by_key(|(_, p)| {
            (
                std::cmp::Reverse(p.successful()),
                std::cmp::Reverse(p.priority()),
            )
        });
        let trial = prios
            .iter()
            .filter(|(_, p)| p.bootable() && !p.successful())
            .max_by_key(|(_, p)| p.priority())
            .map(|(g, p)| (g.clone(), p.tries().min(crate::state::MAX_TRIES)));
        let bootable: BTreeMap<Group, bool> = prios
            .iter()
            .map(|(g, p)| (g.clone(), p.bootable() || p.priority() > 0))
            .collect();
        let booted = crate::state::booted_from(&self.cmdline);
        Ok(BootState {
            order: order.into_iter().map(|(g, _)| g).collect(),
            trial,
            bootable,
            booted,
        })
    }

    fn store(&self, state: &BootState) -> Result<(), BootError> {
        let disk = self.open(true)?;
        let mut table = GptTable::read(&disk, &self.path)?;
        let ranked: Vec<&Group> = state
            .order
            .iter()
            .filter(|g| state.bootable.get(*g).copied().unwrap_or(false))
            .collect();
        for g in &self.groups {
            let i = self.index(&table, g)?;
            let old = table.attributes(i);
            let new = match &state.trial {
                Some((t, n)) if t == g => old.with(15, *n, false),
                _ => match ranked.iter().position(|r| *r == g) {
                    // Bootable groups by rank: 2 for the default, 1 for the next.
                    Some(rank) => old.with(2u8.saturating_sub(rank as u8).max(1), 0, true),
                    None => old.with(0, 0, false),
                },
            };
            table.set_attributes(i, new);
        }
        table.write(&disk, &self.path)
    }
}
