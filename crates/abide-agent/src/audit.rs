//! The audit log (DESIGN I5): an append-only file of hash-chained records, one JSON object a
//! line, each made durable before the step it records is followed by another.
//!
//! A record is `{"seq":N,"time":…,"event":…,"details":{…},"prev":H(N-1),"hash":H(N)}` where
//! `H(N)` is the SHA-256 of the canonical JSON of the record without `hash`, and `H(0)` is 64
//! zeros. A separate head file (`NAME.head`, replaced atomically after every append) holds the
//! last sequence number and hash, so that cutting records off the end is detected too.
//! [`AuditLog::verify`] finds any edit, deletion, reordering or truncation; a last record torn
//! by a crash mid-append is reported and cut away on [`AuditLog::open`], keeping every record
//! before it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use abide_boot::persist::{IoError, read_bounded, write_atomic};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What can go wrong with the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Reading or writing failed; an fsync failure is never retried.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The log does not verify.
    #[error("audit log {path} does not verify: {what}")]
    Broken {
        /// The log file.
        path: PathBuf,
        /// The first problem found.
        what: String,
    },
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its position, from 1.
    pub seq: u64,
    /// When it was written.
    pub time: Timestamp,
    /// What happened (`stage`, `activate`, `trial`, `commit`, `rollback`, `refuse`, …).
    pub event: String,
    /// The event's details.
    pub details: Map<String, Value>,
    /// The previous record's hash.
    pub prev: String,
    /// This record's hash.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// What opening the log found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records in the log.
    pub records: u64,
    /// Bytes of a torn last record that were cut away, if any.
    pub repaired_torn_bytes: Option<u64>,
}

/// An audit log opened for appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head: Head,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`: verifies it against its head, cuts away a torn
    /// last record, and positions for appending.
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| IoError {
                op: "opening",
                path: path.to_owned(),
                source,
            })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|source| IoError {
            op: "reading",
            path: path.to_owned(),
            source,
        })?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut repaired = None;
        if complete < bytes.len() {
            // A crash mid-append leaves a line without its newline: never a whole record.
            file.set_len(complete as u64).map_err(|source| IoError {
                op: "cutting the torn last record of",
                path: path.to_owned(),
                source,
            })?;
            abide_boot::persist::fsync(&file, path)?;
            repaired = Some((bytes.len() - complete) as u64);
            bytes.truncate(complete);
        }
        let records = check(path, &bytes)?;
        let head = records.last().map_or(
            Head {
                seq: 0,
                hash: GENESIS.to_owned(),
            },
            |r| Head {
                seq: r.seq,
                hash: r.hash.clone(),
            },
        );
        check_head(path, &records)?;
        // A log created here is not made durable by a directory sync of its own: an empty log
        // lost to a power cut is no loss, and the first append's head, renamed into this same
        // directory and synced there, makes the log's name durable with its first record. (The
        // crash tests delete each sync in turn; this one changed no outcome.)
        Ok((
            AuditLog {
                path: path.to_owned(),
                head,
            },
            OpenReport {
                records: records.len() as u64,
                repaired_torn_bytes: repaired,
            },
        ))
    }

    /// Appends a record and makes it durable (the line fsynced, then the head replaced
    /// atomically) before returning.
    pub fn append(
        &mut self,
        time: Timestamp,
        event: &str,
        details: Map<String, Value>,
    ) -> Result<Record, AuditError> {
        let mut record = Record {
            seq: self.head.seq + 1,
            time,
            event: event.to_owned(),
            details,
            prev: self.head.hash.clone(),
            hash: String::new(),
        };
        record.hash = hash_of(&record);
        let mut line = serde_json::to_vec(&record).expect("records serialize");
        line.push(b'\n');
        let io = |op, source| IoError {
            op,
            path: self.path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io("opening", e))?;
        abide_boot::crash::point("audit:before-append", "");
        file.write_all(&line).map_err(|e| io("appending to", e))?;
        abide_boot::persist::fsync(&file, &self.path)?;
        abide_boot::crash::point("audit:after-fsync", "");
        let head = Head {
            seq: record.seq,
            hash: record.hash.clone(),
        };
        write_atomic(
            &head_path(&self.path),
            &serde_json::to_vec(&head).expect("serializes"),
            0o644,
        )?;
        self.head = head;
        Ok(record)
    }

    /// Reads and verifies the whole log at `path`; a torn last record is reported as an
    /// error here (opening the log repairs it).
    /// A device that never wrote a record has no log and no head: that is an empty log. A
    /// missing log whose head names records is a deletion.
    pub fn verify(path: &Path) -> Result<Vec<Record>, AuditError> {
        let bytes = match read_bounded(path, 1 << 30) {
            Ok(bytes) => bytes,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let torn = bytes.len() - bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: format!(
                    "the last record is torn ({torn} bytes without an end); opening the log repairs it"
                ),
            });
        }
        let records = check(path, &bytes)?;
        check_head(path, &records)?;
        Ok(records)
    }

    /// The number of records.
    pub fn len(&self) -> u64 {
        self.head.seq
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.head.seq == 0
    }
}

/// The hash of a record: SHA-256 of its canonical JSON without `hash`.
pub fn hash_of(record: &Record) -> String {
    let mut value = serde_json::to_value(record).expect("records serialize");
    value.as_object_mut().expect("an object").remove("hash");
    // serde_json's maps are sorted and its compact form has no white space: canonical.
    let bytes = serde_json::to_vec(&value).expect("serializes");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check(path: &Path, bytes: &[u8]) -> Result<Vec<Record>, AuditError> {
    let broken = |what: String| AuditError::Broken {
        path: path.to_owned(),
        what,
    };
    let mut records = Vec::new();
    let mut prev = GENESIS.to_owned();
    for (i, line) in bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let n = i as u64 + 1;
        let record: Record = serde_json::from_slice(line)
            .map_err(|e| broken(format!("line {n} is not a record: {e}")))?;
        if record.seq != n {
            return Err(broken(format!(
                "line {n} has sequence number {} (a record was removed or moved)",
                record.seq
            )));
        }
        if record.prev != prev {
            return Err(broken(format!(
                "record {n} does not follow the record before it"
            )));
        }
        if hash_of(&record) != record.hash {
            return Err(broken(format!(
                "record {n} was changed after it was written"
            )));
        }
        prev = record.hash.clone();
        records.push(record);
    }
    Ok(records)
}

/// The head file may lag the log by one record (a crash between the append and the head
/// update) but never lead it, and must name a record that is there.
fn check_head(path: &Path, records: &[Record]) -> Result<(), AuditError> {
    let head_file = head_path(path);
    let head: Head = match read_bounded(&head_file, 4096) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuditError::Broken {
            path: path.to_owned(),
            what: format!("its head file is not readable: {e}"),
        })?,
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound && records.len() <= 1 => {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let last = records.len() as u64;
    let named = head
        .seq
        .checked_sub(1)
        .and_then(|i| records.get(i as usize));
    let ok = head.seq == 0 && last <= 1
        || (head.seq <= last && last <= head.seq + 1 && named.is_some_and(|r| r.hash == head.hash));
    if !ok {
        return Err(AuditError::Broken {
            path: path.to_owned(),
            what: format!(
                "its head says record {} was written, the log has {last} (records were cut off the end or the head is stale)",
                head.seq
            ),
        });
    }
    Ok(())
}

fn head_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".head");
    PathBuf::from(s)
}
