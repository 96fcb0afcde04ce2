//! A model of what a disk holds after a power cut, for the crash tests.
//!
//! A process that is killed keeps everything it wrote: the kernel's page cache survives it. A
//! power cut does not. This module models the strict case the code must survive: **only what
//! was synced survives** — a file holds what it held at its last successful fsync (a file never
//! synced since it was created is empty), and a directory holds the entries it had at its last
//! successful directory fsync (a rename, a create, an unlink not followed by one is lost).
//! Writes that reached the disk without a sync are treated as lost; the real disk may keep
//! them, which only makes it kinder than the model.
//!
//! Every fsync, fdatasync, directory fsync and syncfs of Abide goes through [`crate::persist`],
//! which calls this module. With `ABIDE_POWERLOSS_LOG=DIR` in the environment each successful
//! sync appends what it made durable to `DIR/log` (a file's content is copied to `DIR/blobs`);
//! [`materialize`] then builds, from a [`Snapshot`] taken before the run and that log, the
//! directory tree the disk would hold had the power failed at the moment the process stopped.
//! Each sync is named by its site, the place in the source that asked for it
//! (`crates/abide-fs/src/persist.rs:120`); with `ABIDE_POWERLOSS_SKIP=SITE`, the syncs of that
//! site are not performed, as if the line were deleted, so a test can show that deleting any
//! one of them is noticed.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock};

/// What identifies a file or directory across renames: its inode number and birth time (an
/// inode number alone is reused once a file is deleted).
pub type Key = String;

fn key_of(meta: &fs::Metadata) -> Key {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}.{}", meta.ino(), born)
}

struct Plan {
    log: RwLock<Option<PathBuf>>,
    skip: Option<String>,
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| Plan {
        log: RwLock::new(std::env::var_os("ABIDE_POWERLOSS_LOG").map(Into::into)),
        skip: std::env::var("ABIDE_POWERLOSS_SKIP").ok(),
    })
}

fn log_dir() -> Option<PathBuf> {
    plan().log.read().expect("not poisoned").clone()
}

/// Records this process's syncs to `dir` from now on (as `ABIDE_POWERLOSS_LOG=DIR` does from
/// the start), or stops recording. For tests of the model itself; the setting is the
/// process's.
pub fn record_to(dir: Option<&Path>) {
    *plan().log.write().expect("not poisoned") = dir.map(Path::to_owned);
}

/// A sync about to happen at `site`, when a test asked for the model.
pub(crate) struct Begun {
    /// Its number in this process.
    pub(crate) n: usize,
    /// Where in the source it was asked for.
    pub(crate) site: String,
    /// Whether it is to be left out.
    pub(crate) skip: bool,
}

/// A sync is about to happen at `site`; `None` unless a test asked for the model.
pub(crate) fn begin(site: &std::panic::Location<'_>) -> Option<Begun> {
    static SYNCS: AtomicUsize = AtomicUsize::new(0);
    let plan = plan();
    if plan.skip.is_none() && log_dir().is_none() {
        return None;
    }
    let site = format!("{}:{}", site.file(), site.line());
    Some(Begun {
        n: SYNCS.fetch_add(1, Ordering::SeqCst),
        skip: plan.skip.as_deref() == Some(site.as_str()),
        site,
    })
}

fn append(line: &str) {
    let Some(dir) = log_dir() else { return };
    // The log is the test's, not the device's: a failure to write it fails the test's check,
    // not the device's operation.
    if let Ok(mut f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
    {
        let _ = f.write_all(line.as_bytes());
    }
}

fn escape(path: &Path) -> String {
    path.to_string_lossy()
        .replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
}

/// Sync `b` of the open `file` (at `path`) succeeded: its content as of now is durable.
pub(crate) fn file_synced(b: &Begun, file: &File, path: &Path) {
    let n = b.n;
    let Some(dir) = log_dir() else { return };
    let Ok(meta) = file.metadata() else { return };
    let key = key_of(&meta);
    let blob = dir.join("blobs").join(format!("{n}-{key}"));
    let _ = fs::create_dir_all(dir.join("blobs"));
    // Read through /proc so that a file opened for writing only can be copied.
    let copied = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .and_then(|mut from| io::copy(&mut from, &mut File::create(&blob)?));
    if copied.is_ok() {
        append(&format!(
            "F\t{n}\t{}\t{key}\t{}\t{}\n",
            b.site,
            meta.mode() & 0o7777,
            escape(path)
        ));
    }
}

/// Sync `b` of the directory `dir` succeeded: its entries as of now are durable.
pub(crate) fn dir_synced(b: &Begun, dir: &Path) {
    if log_dir().is_none() {
        return;
    }
    let Ok(meta) = fs::metadata(dir) else { return };
    let mut line = format!("D\t{}\t{}\t{}\t{}", b.n, b.site, key_of(&meta), escape(dir));
    for (name, entry) in entries(dir) {
        line.push('\t');
        line.push_str(&entry.encode(&name));
    }
    line.push('\n');
    append(&line);
}

/// Sync `b`, a syncfs through `dir`, succeeded: every file and directory under `dir` is
/// durable as of now (the rest of the file system too, which the model does not credit).
pub(crate) fn tree_synced(b: &Begun, dir: &Path) {
    if log_dir().is_none() {
        return;
    }
    dir_synced(b, dir);
    for (name, entry) in entries(dir) {
        let path = dir.join(&name);
        match entry {
            Entry::Dir(_) => tree_synced(b, &path),
            Entry::File(..) => {
                if let Ok(f) = File::open(&path) {
                    file_synced(b, &f, &path);
                }
            }
            Entry::Link(_) => {}
        }
    }
}

/// A directory entry as the model keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A regular file: its key and permission bits.
    File(Key, u32),
    /// A directory: its key.
    Dir(Key),
    /// A symbolic link: its target (a link's content is its directory entry).
    Link(PathBuf),
}

impl Entry {
    fn encode(&self, name: &str) -> String {
        let name = name.replace('\\', "\\\\").replace('\t', "\\t");
        match self {
            Entry::File(k, mode) => format!("f:{k}:{mode}:{name}"),
            Entry::Dir(k) => format!("d:{k}:0:{name}"),
            Entry::Link(t) => format!("l:{}:0:{name}", escape(t).replace(':', "\\c")),
        }
    }

    fn decode(text: &str) -> Option<(String, Entry)> {
        let mut parts = text.splitn(4, ':');
        let (kind, key, mode, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let name = unescape(name);
        let entry = match kind {
            "f" => Entry::File(key.to_owned(), mode.parse().ok()?),
            "d" => Entry::Dir(key.to_owned()),
            "l" => Entry::Link(unescape(&key.replace("\\c", ":")).into()),
            _ => return None,
        };
        Some((name, entry))
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn entries(dir: &Path) -> Vec<(String, Entry)> {
    let mut out = Vec::new();
    let Ok(read) = fs::read_dir(dir) else {
        return out;
    };
    for e in read.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let entry = if meta.file_type().is_symlink() {
            match fs::read_link(e.path()) {
                Ok(t) => Entry::Link(t),
                Err(_) => continue,
            }
        } else if meta.is_dir() {
            Entry::Dir(key_of(&meta))
        } else {
            Entry::File(key_of(&meta), meta.mode() & 0o7777)
        };
        out.push((name, entry));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A tree as it stood before the run: every directory's entries and where each file's content
/// can be read (a copy of the tree made before the run, since the run changes files in place).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    root: Key,
    dirs: HashMap<Key, Vec<(String, Entry)>>,
    content: HashMap<Key, PathBuf>,
}

impl Snapshot {
    /// Reads the tree at `root`, whose files' contents are also at the same relative paths
    /// under `copy` (untouched by the run).
    pub fn take(root: &Path, copy: &Path) -> io::Result<Snapshot> {
        let mut snapshot = Snapshot {
            root: key_of(&fs::metadata(root)?),
            ..Snapshot::default()
        };
        snapshot.walk(root, copy)?;
        Ok(snapshot)
    }

    fn walk(&mut self, dir: &Path, copy: &Path) -> io::Result<()> {
        let key = key_of(&fs::metadata(dir)?);
        let list = entries(dir);
        for (name, entry) in &list {
            match entry {
                Entry::Dir(_) => self.walk(&dir.join(name), &copy.join(name))?,
                Entry::File(k, _) => {
                    self.content.insert(k.clone(), copy.join(name));
                }
                Entry::Link(_) => {}
            }
        }
        self.dirs.insert(key, list);
        Ok(())
    }
}

/// What [`materialize`] found in the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    /// File syncs read from the log.
    pub file_syncs: usize,
    /// Directory syncs read from the log.
    pub dir_syncs: usize,
}

/// One sync of a run, as the log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// Its number in its process.
    pub n: usize,
    /// `F` for a file, `D` for a directory.
    pub kind: char,
    /// Where in the source it was asked for (`file:line`), what `ABIDE_POWERLOSS_SKIP` names.
    pub site: String,
    /// What was synced.
    pub path: PathBuf,
}

/// The syncs the log at `log_dir` records, in order.
pub fn syncs(log_dir: &Path) -> io::Result<Vec<Sync>> {
    let mut out = Vec::new();
    for line in read_log(log_dir)? {
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 5 {
            continue;
        }
        let (Some(kind), Ok(n)) = (fields[0].chars().next(), fields[1].parse()) else {
            continue;
        };
        let path = unescape(if kind == 'F' { fields[5] } else { fields[4] }).into();
        out.push(Sync {
            n,
            kind,
            site: fields[2].to_owned(),
            path,
        });
    }
    Ok(out)
}

fn read_log(log_dir: &Path) -> io::Result<Vec<String>> {
    match File::open(log_dir.join("log")) {
        Ok(f) => io::BufReader::new(f).lines().collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Builds at `out` (which must not exist) the tree the disk holds if the power failed now:
/// the `before` tree with only what the log at `log_dir` says was synced applied. Files a
/// durable directory names but whose content was never synced are empty.
pub fn materialize(before: &Snapshot, log_dir: &Path, out: &Path) -> io::Result<Durable> {
    let mut dirs = before.dirs.clone();
    let mut content: HashMap<Key, PathBuf> = before.content.clone();
    let mut durable = Durable::default();
    for line in read_log(log_dir)? {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.first().copied() {
            Some("F") if fields.len() >= 6 => {
                content.insert(
                    fields[3].to_owned(),
                    log_dir
                        .join("blobs")
                        .join(format!("{}-{}", fields[1], fields[3])),
                );
                durable.file_syncs += 1;
            }
            Some("D") if fields.len() >= 5 => {
                let list = fields[5..]
                    .iter()
                    .filter_map(|e| Entry::decode(e))
                    .collect();
                dirs.insert(fields[3].to_owned(), list);
                durable.dir_syncs += 1;
            }
            _ => {}
        }
    }
    build(&before.root, &dirs, &content, out, 0)?;
    Ok(durable)
}

fn build(
    key: &Key,
    dirs: &HashMap<Key, Vec<(String, Entry)>>,
    content: &HashMap<Key, PathBuf>,
    out: &Path,
    depth: usize,
) -> io::Result<()> {
    if depth > 64 {
        return Err(io::Error::other("directories nested deeper than 64"));
    }
    fs::create_dir(out)?;
    for (name, entry) in dirs.get(key).map(Vec::as_slice).unwrap_or_default() {
        let path = out.join(name);
        match entry {
            // A directory whose own entries were never synced is empty.
            Entry::Dir(k) => build(k, dirs, content, &path, depth + 1)?,
            Entry::File(k, mode) => {
                match content.get(k) {
                    Some(from) => {
                        fs::copy(from, &path)?;
                    }
                    None => {
                        File::create(&path)?;
                    }
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
            }
            Entry::Link(target) => std::os::unix::fs::symlink(target, &path)?,
        }
    }
    Ok(())
}
