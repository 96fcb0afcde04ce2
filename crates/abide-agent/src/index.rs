//! The chunk index of each installed slot (`STATE_DIR/chunks/GROUP.CLASS.idx`): the names and
//! lengths of the chunks a slot holds, in order, so that the next install can copy the chunks
//! the running group already has instead of reading them from the bundle (delta updates).
//!
//! Layout: the 8 bytes `ABIDX\0\0\x01`, then per chunk its SHA-256 (32 bytes) and length (u32
//! LE). An index is removed before its slot is written and written after the slot's fsync, so
//! it never describes content that is not there; a reused chunk is still checked against its
//! name before it is used.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use abide_bundle::Digest;
use abide_bundle::format::ChunkEntry;
use abide_core::Group;
use abide_fs::persist::{IoError, read_bounded, sync_dir, write_atomic};

use crate::error::Result;

const MAGIC: &[u8; 8] = b"ABIDX\0\0\x01";

fn path(state_dir: &Path, group: &Group, class: &str) -> PathBuf {
    state_dir
        .join("chunks")
        .join(format!("{group}.{class}.idx"))
}

/// Removes the indexes of every slot of `group` (before any of them is written).
pub fn remove(state_dir: &Path, group: &Group, classes: &[String]) -> Result<()> {
    let dir = state_dir.join("chunks");
    let mut removed = false;
    for class in classes {
        match std::fs::remove_file(path(state_dir, group, class)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IoError {
                    op: "removing the chunk index",
                    path: path(state_dir, group, class),
                    source,
                }
                .into());
            }
        }
    }
    if removed {
        sync_dir(&dir)?;
    }
    Ok(())
}

/// Records the chunks now in the slot of `group` and `class`.
pub fn write(state_dir: &Path, group: &Group, class: &str, table: &[ChunkEntry]) -> Result<()> {
    let dir = state_dir.join("chunks");
    std::fs::create_dir_all(&dir).map_err(|source| IoError {
        op: "creating",
        path: dir.clone(),
        source,
    })?;
    let mut bytes = MAGIC.to_vec();
    for e in table {
        bytes.extend_from_slice(&e.digest.0);
        bytes.extend_from_slice(&e.length.to_le_bytes());
    }
    write_atomic(&path(state_dir, group, class), &bytes, 0o644)?;
    Ok(())
}

/// The chunks of a slot, by name: where each is in the slot.
pub struct SlotChunks {
    file: File,
    at: HashMap<Digest, (u64, u32)>,
    digest: Digest,
}

impl SlotChunks {
    /// Loads the index of the slot of `group` and `class` and opens the slot read-only; `None`
    /// when there is no (readable) index.
    pub fn open(state_dir: &Path, group: &Group, class: &str, slot: &Path) -> Option<SlotChunks> {
        let bytes = read_bounded(&path(state_dir, group, class), 256 << 20).ok()?;
        let body = bytes.strip_prefix(MAGIC.as_slice())?;
        if body.len() % 36 != 0 {
            return None;
        }
        let mut at = HashMap::with_capacity(body.len() / 36);
        let mut offset = 0u64;
        for e in body.chunks_exact(36) {
            let digest = Digest(e[..32].try_into().expect("32 bytes"));
            let length = u32::from_le_bytes(e[32..].try_into().expect("4 bytes"));
            at.entry(digest).or_insert((offset, length));
            offset += u64::from(length);
        }
        let file = File::open(slot).ok()?;
        Some(SlotChunks {
            file,
            at,
            digest: Digest::of(body),
        })
    }

    /// The SHA-256 of the chunk list (what a delta names as the content it was made against).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Puts the content the slot holds for `entry` into `buf` and says whether it did: only
    /// if the index knows the chunk and the slot could be read (unchecked: the reader checks
    /// it against the chunk's name).
    pub fn read_into(&self, entry: &ChunkEntry, buf: &mut Vec<u8>) -> bool {
        let Some(&(offset, length)) = self.at.get(&entry.digest) else {
            return false;
        };
        if length != entry.length {
            return false;
        }
        buf.resize(length as usize, 0);
        self.file.read_exact_at(buf, offset).is_ok()
    }
}

impl abide_bundle::delta::ReadAt for SlotChunks {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

impl abide_bundle::delta::Base for SlotChunks {
    fn chunk(&self, entry: &ChunkEntry, buf: &mut Vec<u8>) -> bool {
        self.read_into(entry, buf)
    }
}
