//! Durable file replacement: write a temporary file beside the target, fsync it, rename it
//! over the target, fsync the directory. A failed fsync is an error, never retried.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A file being written in place of `target`; it appears there only on [`AtomicFile::commit`],
/// and the temporary file is removed if it is dropped before that.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Creates the temporary file with permission bits `mode`.
    pub fn create(target: &Path, mode: u32) -> Result<AtomicFile> {
        let dir = parent(target);
        let name = target
            .file_name()
            .with_context(|| format!("{} does not name a file", target.display()))?;
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).context("reading random bytes")?;
        let temp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            abide_bundle::digest::encode_hex(&suffix)
        ));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        Ok(AtomicFile {
            target: target.to_owned(),
            temp,
            file: Some(file),
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until commit")
    }

    /// fsyncs the file, renames it over the target and fsyncs the directory.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("present until commit");
        file.sync_all()
            .with_context(|| format!("fsync of {}", self.temp.display()))?;
        drop(file);
        fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "renaming {} to {}",
                self.temp.display(),
                self.target.display()
            )
        })?;
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

/// Atomically replaces `target` with `bytes`.
pub fn write_atomic(target: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = AtomicFile::create(target, mode)?;
    file.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    file.commit()
}

/// Creates `target` with `bytes` only if nothing is there yet (never replaces a key).
pub fn write_new(target: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if fs::symlink_metadata(target).is_ok() {
        anyhow::bail!(
            "{} already exists; refusing to overwrite it",
            target.display()
        );
    }
    let mut file = AtomicFile::create(target, mode)?;
    file.file()
        .write_all(bytes)
        .with_context(|| format!("writing {}", target.display()))?;
    let f = file.file.take().expect("present");
    f.sync_all()
        .with_context(|| format!("fsync of {}", file.temp.display()))?;
    drop(f);
    // A hard link fails if the target appeared meanwhile, where a rename would replace it.
    let linked = fs::hard_link(&file.temp, target);
    let _ = fs::remove_file(&file.temp);
    linked.with_context(|| format!("creating {}", target.display()))?;
    sync_dir(parent(target))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads a whole file with a bound on its size.
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, max as u64 + 1), &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > max {
        anyhow::bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(bytes)
}
