//! Durable file replacement (DESIGN I6): write a temporary file beside the target, fsync it,
//! rename it over the target, fsync the directory. A failed fsync is an error, never retried.
//!
//! Files a bootloader reads are the exception ([`overwrite_in_place`]): firmware reads the
//! blocks the file system's metadata pointed at when it was last written home, and does not
//! replay a journal, so a renamed-in file may be invisible to it after a power cut while Linux
//! sees it. Those files keep their inode and blocks and are rewritten in place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file operation that failed, with the path and the step.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct IoError {
    /// What was being done (`creating`, `fsync of`, `renaming`, …).
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The system's error.
    #[source]
    pub source: io::Error,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IoError {
    let path = path.to_owned();
    move |source| IoError { op, path, source }
}

/// A file being written in place of `target`; it appears there only on [`AtomicFile::commit`],
/// and the temporary file is removed if it is dropped before that.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Creates the temporary file beside `target` with permission bits `mode`.
    pub fn create(target: &Path, mode: u32) -> Result<AtomicFile, IoError> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| IoError {
                op: "naming a file for",
                path: target.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the path does not name a file",
                ),
            })?;
        let dir = parent(target);
        let mut attempt = 0u32;
        loop {
            let temp = dir.join(format!(".{name}.tmp-{}", unpredictable()));
            match OpenOptions::new()
                .write(true)
                .read(true)
                .create_new(true)
                .mode(mode)
                .open(&temp)
            {
                Ok(file) => {
                    return Ok(AtomicFile {
                        target: target.to_owned(),
                        temp,
                        file: Some(file),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                    attempt += 1
                }
                Err(e) => return Err(io_err("creating", &temp)(e)),
            }
        }
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// fsyncs the file, renames it over the target and fsyncs the directory.
    pub fn commit(mut self) -> Result<(), IoError> {
        let file = self.file.take().expect("present until commit");
        fsync(&file, &self.temp)?;
        drop(file);
        crate::crash::point("persist:before-rename", &self.target.to_string_lossy());
        fs::rename(&self.temp, &self.target)
            .map_err(io_err("renaming into place", &self.target))?;
        crate::crash::point("persist:after-rename", &self.target.to_string_lossy());
        sync_dir(parent(&self.target))
    }

    /// fsyncs the file and links it at the target only if nothing is there yet.
    pub fn commit_new(mut self) -> Result<(), IoError> {
        let file = self.file.take().expect("present until commit");
        fsync(&file, &self.temp)?;
        drop(file);
        // A hard link fails if the target appeared meanwhile, where a rename would replace it.
        let linked =
            fs::hard_link(&self.temp, &self.target).map_err(io_err("creating", &self.target));
        let _ = fs::remove_file(&self.temp);
        linked?;
        sync_dir(parent(&self.target))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// 64 bits nobody else can guess, for a temporary file's name: someone who may write the
/// directory cannot plant the names beforehand and so make every write fail. Keyed by the
/// standard library's per-process random hash keys (from the kernel, never blocking for
/// entropy), over the process id and the time.
fn unpredictable() -> String {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Atomically replaces `target` with `bytes`.
pub fn write_atomic(target: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    let mut file = AtomicFile::create(target, mode)?;
    file.file()
        .write_all(bytes)
        .map_err(io_err("writing", target))?;
    file.commit()
}

/// Rewrites the existing file `target` in place with `bytes` of exactly its current length,
/// then fsyncs it: the same inode and the same blocks, as GRUB's `save_env` and
/// `grub-editenv` do, so a bootloader that reads the blocks directly sees the new content
/// once the fsync returned. A file of another length is refused unchanged (the blocks a
/// bootloader found must not move or grow).
pub fn overwrite_in_place(target: &Path, bytes: &[u8]) -> Result<(), IoError> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .write(true)
        .open(target)
        .map_err(io_err("opening for an in-place write", target))?;
    let len = file
        .metadata()
        .map_err(io_err("reading the size of", target))?
        .len();
    if len != bytes.len() as u64 {
        return Err(IoError {
            op: "rewriting in place",
            path: target.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the file holds {len} bytes and the new content {}: its size must not change",
                    bytes.len()
                ),
            ),
        });
    }
    crate::crash::point("persist:before-overwrite", &target.to_string_lossy());
    file.write_all_at(bytes, 0)
        .map_err(io_err("writing in place", target))?;
    fsync(&file, target)?;
    crate::crash::point("persist:after-overwrite", &target.to_string_lossy());
    Ok(())
}

/// Creates `target` with `bytes` only if nothing is there yet (a key is never replaced).
pub fn write_new(target: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(IoError {
            op: "refusing to overwrite",
            path: target.to_owned(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "it already exists"),
        });
    }
    let mut file = AtomicFile::create(target, mode)?;
    file.file()
        .write_all(bytes)
        .map_err(io_err("writing", target))?;
    file.commit_new()
}

/// Runs the sync `sync` asked for at `site`, then has the power-loss model record what it
/// made durable (`record`); a sync a test deleted (`ABIDE_POWERLOSS_SKIP`) does neither.
fn synced(
    site: &std::panic::Location<'_>,
    sync: impl FnOnce() -> Result<(), IoError>,
    record: impl FnOnce(&crate::powerloss::Begun),
) -> Result<(), IoError> {
    let begun = crate::powerloss::begin(site);
    if begun.as_ref().is_some_and(|b| b.skip) {
        return Ok(());
    }
    sync()?;
    if let Some(b) = begun {
        record(&b);
    }
    Ok(())
}

/// fsyncs the open `file` (at `path`): its data and metadata are durable when this returns.
/// Every sync of Abide goes through here or the functions below, so the crash tests'
/// power-loss model ([`crate::powerloss`]) sees each, named by the line that asked for it.
#[track_caller]
pub fn fsync(file: &File, path: &Path) -> Result<(), IoError> {
    synced(
        std::panic::Location::caller(),
        || file.sync_all().map_err(io_err("fsync of", path)),
        |b| crate::powerloss::file_synced(b, file, path),
    )
}

/// fdatasyncs the open `file` (at `path`): its data (and its size) are durable when this
/// returns.
#[track_caller]
pub fn fdatasync(file: &File, path: &Path) -> Result<(), IoError> {
    synced(
        std::panic::Location::caller(),
        || file.sync_data().map_err(io_err("fdatasync of", path)),
        |b| crate::powerloss::file_synced(b, file, path),
    )
}

/// fsyncs a file by path: its data and its metadata (on FAT, its directory entry).
#[track_caller]
pub fn sync_file(path: &Path) -> Result<(), IoError> {
    let file = File::open(path).map_err(io_err("opening for fsync", path))?;
    fsync(&file, path)
}

/// fsyncs a directory, so that a rename, create or unlink in it is durable.
#[track_caller]
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    synced(
        std::panic::Location::caller(),
        || {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync of directory", dir))
        },
        |b| crate::powerloss::dir_synced(b, dir),
    )
}

/// Syncs the whole file system `dir` is on (syncfs): every file and directory under `dir` is
/// durable when this returns.
#[track_caller]
pub fn syncfs(dir: &Path) -> Result<(), IoError> {
    synced(
        std::panic::Location::caller(),
        || {
            let handle = File::open(dir).map_err(io_err("opening", dir))?;
            rustix::fs::syncfs(&handle).map_err(|e| IoError {
                op: "syncing the file system of",
                path: dir.to_owned(),
                source: e.into(),
            })
        },
        |b| crate::powerloss::tree_synced(b, dir),
    )
}

/// Reads a whole file, refusing one larger than `max` bytes.
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, IoError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    if bytes.len() > max {
        return Err(IoError {
            op: "reading",
            path: path.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {max} bytes"),
            ),
        });
    }
    Ok(bytes)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
