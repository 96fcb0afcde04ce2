//! Backups of an application's data directory: a tar archive compressed with zstd, written
//! atomically into the application's backup directory (`[[app]] backup_dir`, default
//! `STATE_DIR/backups/NAME`) and recorded in `STATE_DIR/backups.json` with the release and
//! version the data belonged to, the transaction that took it, its size and the SHA-256 of
//! the archive file. The newest `backups` of each application are kept.
//!
//! A backup is checked against its SHA-256 before anything is restored from it, and restored
//! into a new directory beside the data directory, synced, then renamed into place: the data
//! directory is always either the old data or the whole backup.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use abide_core::app::AppRelease;
use abide_fs::persist::{AtomicFile, IoError, sync_dir, syncfs};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::AppSettings;
use crate::error::{AgentError, Result};

/// The format of `backups.json`.
const FORMAT: u32 = 1;

/// One backup of one application's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// Its id (`NAME-N`).
    pub id: String,
    /// The application.
    pub app: String,
    /// The release the data belonged to when it was taken.
    pub release: Option<AppRelease>,
    /// The transaction that took it.
    pub transaction: String,
    /// The archive.
    pub file: PathBuf,
    /// The SHA-256 of the archive file (lowercase hex).
    pub sha256: String,
    /// The archive's size in bytes.
    pub size: u64,
    /// The bytes of the files in it.
    pub data_bytes: u64,
    /// When it was taken.
    pub created: Timestamp,
}

/// Every backup on the device, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backups {
    format: u32,
    /// The number the next backup's id takes.
    next: u64,
    /// The backups.
    pub backups: Vec<Backup>,
}

impl Default for Backups {
    fn default() -> Self {
        Backups {
            format: FORMAT,
            next: 1,
            backups: Vec::new(),
        }
    }
}

impl Backups {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("backups.json")
    }

    /// Reads `STATE_DIR/backups.json` (none yet: no backups).
    pub fn load(state_dir: &Path) -> Result<Backups> {
        Ok(
            crate::json_file::load(&Backups::path(state_dir), "backup list", Some(FORMAT))?
                .unwrap_or_default(),
        )
    }

    /// Replaces the file atomically.
    pub fn store(&self, state_dir: &Path) -> Result<()> {
        crate::json_file::store(&Backups::path(state_dir), self, 0o600)
    }

    /// The backup `id`.
    pub fn get(&self, id: &str) -> Option<&Backup> {
        self.backups.iter().find(|b| b.id == id)
    }

    /// Takes the next id for `app`.
    fn take_id(&mut self, app: &str) -> String {
        let id = format!("{app}-{}", self.next);
        self.next += 1;
        id
    }

    /// Forgets all but the newest `app.backups` of `app` and deletes their archives; returns
    /// the ids forgotten.
    pub fn prune(&mut self, app: &AppSettings) -> Vec<String> {
        let mine = self.backups.iter().filter(|b| b.app == app.name).count();
        let mut excess = mine.saturating_sub(app.backups);
        let mut gone = Vec::new();
        self.backups.retain(|b| {
            if b.app == app.name && excess > 0 {
                excess -= 1;
                let _ = std::fs::remove_file(&b.file);
                gone.push(b.id.clone());
                false
            } else {
                true
            }
        });
        gone
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_owned();
    move |source| IoError { op, path, source }
}

/// Counts and hashes what goes to the file.
struct Hashing<'a> {
    file: BufWriter<&'a mut File>,
    hash: Sha256,
    size: u64,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Archives `app`'s data directory (created empty if there is none) for `transaction`, the
/// data of `release`; the archive is synced and renamed into place, then recorded.
pub fn take(
    state_dir: &Path,
    app: &AppSettings,
    release: Option<&AppRelease>,
    transaction: &str,
    now: Timestamp,
) -> Result<Backup> {
    let mut book = Backups::load(state_dir)?;
    let id = book.take_id(&app.name);
    std::fs::create_dir_all(&app.backup_dir).map_err(io("creating", &app.backup_dir))?;
    if !app.data.exists() {
        std::fs::create_dir_all(&app.data).map_err(io("creating", &app.data))?;
    }
    let target = app.backup_dir.join(format!("{id}.tar.zst"));
    let mut file = AtomicFile::create(&target, 0o600)?;
    let mut data_bytes = 0u64;
    let (sha256, size) = {
        let hashing = Hashing {
            file: BufWriter::with_capacity(1 << 20, file.file()),
            hash: Sha256::new(),
            size: 0,
        };
        let encoder =
            zstd::stream::write::Encoder::new(hashing, 3).map_err(io("compressing", &target))?;
        let mut tar = tar::Builder::new(encoder);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        append_tree(&mut tar, &app.data, Path::new("."), &mut data_bytes)
            .map_err(io("archiving", &app.data))?;
        let encoder = tar.into_inner().map_err(io("archiving", &app.data))?;
        let mut hashing = encoder.finish().map_err(io("compressing", &target))?;
        hashing.flush().map_err(io("writing", &target))?;
        (
            abide_bundle::digest::encode_hex(&hashing.hash.finalize()),
            hashing.size,
        )
    };
    abide_fs::crash::point("backup:archive-written", &id);
    file.commit()?;
    let backup = Backup {
        id,
        app: app.name.clone(),
        release: release.cloned(),
        transaction: transaction.to_owned(),
        file: target,
        sha256,
        size,
        data_bytes,
        created: now,
    };
    book.backups.push(backup.clone());
    book.store(state_dir)?;
    Ok(backup)
}

/// Adds the tree at `dir` as `name` and everything under it, in name order (so the same data
/// gives the same archive), links as links.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
    bytes: &mut u64,
) -> std::io::Result<()> {
    tar.append_path_with_name(dir, name)?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let inner = name.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            append_tree(tar, &path, &inner, bytes)?;
        } else {
            if kind.is_file() {
                *bytes += entry.metadata()?.len();
            }
            tar.append_path_with_name(&path, &inner)?;
        }
    }
    Ok(())
}

/// Whether the archive of `backup` still has its SHA-256.
pub fn check(backup: &Backup) -> Result<()> {
    let file = File::open(&backup.file).map_err(io("opening backup", &backup.file))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(io("reading backup", &backup.file))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let found = abide_bundle::digest::encode_hex(&hash.finalize());
    if found != backup.sha256 {
        return Err(AgentError::App {
            app: backup.app.clone(),
            what: format!(
                "backup {} is damaged: {} has SHA-256 {found}, recorded {}",
                backup.id,
                backup.file.display(),
                backup.sha256
            ),
        });
    }
    Ok(())
}

/// Unpacks `backup` into the new directory `into` (what is there is removed first) and syncs
/// it: permissions and times as archived, owners too when running as root.
pub fn unpack(backup: &Backup, into: &Path) -> Result<()> {
    if into.exists() {
        std::fs::remove_dir_all(into).map_err(io("removing", into))?;
    }
    std::fs::create_dir_all(into).map_err(io("creating", into))?;
    let file = File::open(&backup.file).map_err(io("opening backup", &backup.file))?;
    let decoder =
        zstd::stream::read::Decoder::new(file).map_err(io("reading backup", &backup.file))?;
    let mut archive = tar::Archive::new(decoder);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(rustix::process::geteuid().is_root());
    archive.set_overwrite(true);
    archive
        .unpack(into)
        .map_err(io("restoring backup into", into))?;
    abide_fs::crash::point("backup:unpacked", &backup.id);
    syncfs(into)?;
    sync_dir(into.parent().unwrap_or(Path::new(".")))?;
    Ok(())
}
