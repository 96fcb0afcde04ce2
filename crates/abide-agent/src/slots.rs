//! Writing components into slots: image files and block devices are written in place from
//! offset 0 by a thread of their own, so writing and writeback overlap the verification of the
//! next chunks; data is flushed to the device every 64 MiB along the way and fsynced at the
//! end. A slot is opened for writing only once the engine made its group unbootable, and only
//! ever in the target group (I1).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use abide_fs::persist::IoError;

use crate::config::Slot;
use crate::error::{AgentError, Result};

/// Bytes handed to the writing thread at a time.
const BLOCK: usize = 4 << 20;
/// Blocks in flight between the verifier and the writing thread (memory: QUEUE × BLOCK).
const QUEUE: usize = 4;
/// Data is pushed to the device every this many bytes, so the final fsync is short.
const FLUSH_EVERY: u64 = 64 << 20;

/// How many bytes `slot` can hold: the file's length (an image file is never grown) or the
/// block device's size.
pub fn capacity(slot: &Slot) -> Result<u64> {
    if slot.kind == crate::config::SlotKind::Dir {
        // A directory takes what its file system holds; the archive's size is checked as it
        // unpacks.
        return Ok(u64::MAX);
    }
    let mut file = File::open(&slot.path).map_err(io("opening slot", &slot.path))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io("measuring slot", &slot.path))?;
    Ok(size)
}

/// A slot open for writing.
pub struct SlotWriter {
    path: PathBuf,
    block: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    thread: Option<JoinHandle<Result<u64>>>,
    written: u64,
}

impl SlotWriter {
    /// Opens `slot` for writing from its start.
    pub fn open(slot: &Slot) -> Result<SlotWriter> {
        let (tx, rx) = sync_channel(QUEUE);
        let path = slot.path.clone();
        let capacity = slot.capacity.unwrap_or(u64::MAX);
        let thread = if slot.kind == crate::config::SlotKind::Dir {
            std::thread::Builder::new()
                .name("abide-slot-unpacker".into())
                .spawn(move || unpack_blocks(rx, &path, capacity))
        } else {
            let file = OpenOptions::new()
                .write(true)
                .open(&slot.path)
                .map_err(io("opening slot for writing", &slot.path))?;
            std::thread::Builder::new()
                .name("abide-slot-writer".into())
                .spawn(move || write_blocks(file, rx, &path).map_err(Into::into))
        }
        .map_err(io("starting the writer for", &slot.path))?;
        Ok(SlotWriter {
            path: slot.path.clone(),
            block: Vec::with_capacity(BLOCK),
            tx: Some(tx),
            thread: Some(thread),
            written: 0,
        })
    }

    /// Appends verified content.
    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let before = self.written;
        self.written += data.len() as u64;
        while !data.is_empty() {
            let take = (BLOCK - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK {
                self.send()?;
            }
        }
        if before == 0 || before >> 20 != self.written >> 20 {
            abide_fs::crash::point("slot:write", "");
        }
        Ok(())
    }

    fn send(&mut self) -> std::io::Result<()> {
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let tx = self.tx.as_ref().expect("open until finish");
        // A send fails only when the writer stopped on an error, which `finish` reports.
        tx.send(block)
            .map_err(|_| std::io::Error::other("the slot writer stopped"))
    }

    /// Writes what is left, waits for the writer, fsyncs; returns the bytes written.
    pub fn finish(mut self) -> Result<u64> {
        if !self.block.is_empty() {
            let _ = self.send();
        }
        drop(self.tx.take());
        let written = self
            .thread
            .take()
            .expect("open until finish")
            .join()
            .map_err(|_| IoError {
                op: "writing slot",
                path: self.path.clone(),
                source: std::io::Error::other("the slot writer panicked"),
            })??;
        debug_assert_eq!(written, self.written);
        Ok(self.written)
    }
}

impl Drop for SlotWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_blocks(mut file: File, rx: Receiver<Vec<u8>>, path: &Path) -> Result<u64, IoError> {
    let mut written = 0u64;
    let mut flushed = 0u64;
    for block in rx {
        file.write_all(&block).map_err(io("writing slot", path))?;
        written += block.len() as u64;
        if written - flushed >= FLUSH_EVERY {
            abide_fs::persist::fdatasync(&file, path)?;
            flushed = written;
        }
    }
    abide_fs::crash::point("slot:before-fsync", "");
    abide_fs::persist::fsync(&file, path)?;
    abide_fs::crash::point("slot:after-fsync", "");
    Ok(written)
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IoError + 'a {
    move |source| IoError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Unpacks a tar archive arriving in blocks into the directory `dir`, which is emptied first.
/// Every entry is checked before it is unpacked, and one that is not allowed refuses the whole
/// archive ([`check_entry`]); the files' sizes together must stay within `capacity`. The file
/// system is synced at the end.
fn unpack_blocks(rx: Receiver<Vec<u8>>, dir: &Path, capacity: u64) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(io("creating slot", dir))?;
    for entry in std::fs::read_dir(dir).map_err(io("reading slot", dir))? {
        let path = entry.map_err(io("reading slot", dir))?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io("emptying slot", &path))?;
    }
    let mut reader = BlockReader {
        rx,
        block: Vec::new(),
        at: 0,
        total: 0,
    };
    let bad = |what: String| AgentError::BadArchive {
        slot: dir.to_owned(),
        what,
    };
    let mut archive = tar::Archive::new(&mut reader);
    archive.set_overwrite(true);
    let mut unpacked = 0u64;
    let mut links = Links::default();
    for entry in archive
        .entries()
        .map_err(io("reading the archive for", dir))?
    {
        let mut entry = entry.map_err(io("reading the archive for", dir))?;
        let name = entry
            .path()
            .map_err(io("reading the archive for", dir))?
            .into_owned();
        check_entry(&name, &entry, &mut links)
            .map_err(|why| bad(format!("{}: {why}", name.display())))?;
        // Room for the entry, files and bytes, before it is written: a full file system
        // would otherwise stop the unpacking with no room left for what follows.
        crate::room::ensure(
            dir,
            crate::room::Need {
                bytes: entry.header().size().unwrap_or(0),
                reserve: 0,
                inodes: u64::from(entry.header().entry_type() != tar::EntryType::Link),
                what: "unpacking the archive",
            },
        )?;
        unpacked = unpacked.saturating_add(entry.header().size().unwrap_or(u64::MAX));
        if unpacked > capacity {
            return Err(bad(format!(
                "{}: the files reach {unpacked} bytes, more than the slot's capacity of {capacity}",
                name.display()
            )));
        }
        if !entry
            .unpack_in(dir)
            .map_err(io("unpacking into slot", dir))?
        {
            return Err(bad(format!(
                "{}: would land outside the slot",
                name.display()
            )));
        }
    }
    // The end-of-archive padding: read what is left so the sender never waits.
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(io("reading the archive for", dir))?;
    abide_fs::crash::point("slot:before-fsync", "");
    abide_fs::persist::syncfs(dir)?;
    abide_fs::crash::point("slot:after-fsync", "");
    Ok(reader.total)
}

/// The symbolic links an archive made so far, by their paths in the slot.
#[derive(Default)]
struct Links(std::collections::HashSet<std::path::PathBuf>);

impl Links {
    /// The first link among the directories `path` goes through (its own last part is not
    /// gone through), if any.
    fn crossed(&self, path: &Path) -> Option<std::path::PathBuf> {
        let mut at = std::path::PathBuf::new();
        let parts: Vec<_> = normal_parts(path).collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            at.push(part);
            if self.0.contains(&at) {
                return Some(at);
            }
        }
        None
    }
}

/// The named parts of a relative path (`.` left out).
fn normal_parts(path: &Path) -> impl Iterator<Item = &std::ffi::OsStr> {
    path.components().filter_map(|c| match c {
        std::path::Component::Normal(n) => Some(n),
        _ => None,
    })
}

/// Whether an archive entry may be unpacked into a slot, judged as the file system will resolve
/// it: a relative path without `..` that goes through no symbolic link the archive made; a
/// regular file, a directory, or a link that stays inside the slot — a symbolic link whose
/// target climbs (`..`) only before it descends, and no higher than its own directory; a hard
/// link to a path below the slot that goes through no link. No device nodes, FIFOs or other
/// special files. A symbolic link is remembered in `links` for the entries after it.
///
/// Whatever the order of the entries, a target checked this way stays inside: its climb is over
/// real directories (an entry's directories are never links), and each link it may descend
/// through was itself checked to stay inside.
fn check_entry<R: std::io::Read>(
    name: &Path,
    entry: &tar::Entry<'_, R>,
    links: &mut Links,
) -> Result<(), String> {
    use std::path::Component;
    let inside = |p: &Path| {
        p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    };
    if name.as_os_str().is_empty() || !inside(name) {
        return Err("an absolute path or one with `..` leaves the slot".into());
    }
    if let Some(link) = links.crossed(name) {
        return Err(format!(
            "its path goes through the symbolic link {}",
            link.display()
        ));
    }
    let kind = entry.header().entry_type();
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory => Ok(()),
        tar::EntryType::Symlink => {
            let target = link_target(entry)?;
            let leaves = || format!("a link to {} leaves the slot", target.display());
            let mut depth = name.parent().map_or(0, |p| normal_parts(p).count());
            let mut descended = false;
            for c in target.components() {
                match c {
                    Component::Normal(_) => descended = true,
                    Component::CurDir => {}
                    Component::ParentDir if descended => {
                        return Err(format!(
                            "a link to {} climbs back up after it descends, which a link on its way could send anywhere",
                            target.display()
                        ));
                    }
                    Component::ParentDir if depth > 0 => depth -= 1,
                    _ => return Err(leaves()),
                }
            }
            links.0.insert(normal_parts(name).collect());
            Ok(())
        }
        tar::EntryType::Link => {
            let target = link_target(entry)?;
            if target.as_os_str().is_empty() || !inside(&target) {
                return Err(format!("a link to {} leaves the slot", target.display()));
            }
            match links.crossed(&target) {
                Some(link) => Err(format!(
                    "a link to {} goes through the symbolic link {}",
                    target.display(),
                    link.display()
                )),
                None => Ok(()),
            }
        }
        other => Err(format!(
            "a {} may not be unpacked into a slot",
            match other {
                tar::EntryType::Char => "character device",
                tar::EntryType::Block => "block device",
                tar::EntryType::Fifo => "FIFO",
                _ => "special entry",
            }
        )),
    }
}

/// The target a link entry names.
fn link_target<R: std::io::Read>(entry: &tar::Entry<'_, R>) -> Result<std::path::PathBuf, String> {
    entry
        .link_name()
        .ok()
        .flatten()
        .map(|t| t.into_owned())
        .ok_or_else(|| "a link without a target".to_owned())
}

/// Blocks from the verifier, read as one stream.
struct BlockReader {
    rx: Receiver<Vec<u8>>,
    block: Vec<u8>,
    at: usize,
    total: u64,
}

impl std::io::Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.block.len() {
            match self.rx.recv() {
                Ok(block) => {
                    self.total += block.len() as u64;
                    self.block = block;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
