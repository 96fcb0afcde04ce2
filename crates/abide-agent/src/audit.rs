//! The audit log (DESIGN I5): an append-only file of hash-chained records, one JSON object a
//! line, each made durable before the step it records is followed by another.
//!
//! A record is `{"seq":N,"time":…,"event":…,"details":{…},"prev":H(N-1),"hash":H(N)}` where
//! `H(N)` is the SHA-256 of the canonical JSON of the record without `hash`, and `H(0)` is 64
//! zeros. A separate head file (`NAME.head`, replaced atomically after every append) holds the
//! last sequence number and hash, signed with the device key (`device.key` beside the log,
//! made at the first open once the kernel's random source is ready, mode 0600; its public half
//! in `device.pub`), so that cutting records off the end is detected too, and a rewrite of
//! every record and the head needs the key. Making the key never waits for entropy (the boot
//! step runs early): until it exists, heads are unsigned, and the log says so.
//! [`AuditLog::verify`] finds any edit, deletion, reordering or truncation; a last record torn
//! by a crash mid-append is reported and cut away on [`AuditLog::open`], keeping every record
//! before it.
//!
//! Against someone who holds the device key (root on the device) the anchor is off the
//! device: the agent reports the signed head with every check-in, the server keeps the latest
//! and refuses one that goes back or changes a record it saw, and [`AuditLog::verify_against`]
//! checks the log against such a checkpoint.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use abide_bundle::{PublicKey, SecretKey};
use abide_fleet_json::AuditHead;
use abide_fs::persist::{IoError, read_bounded, write_atomic, write_new};
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
    /// Ed25519 by the device key over `AuditHead::message` (hex); absent only in heads written
    /// before devices had keys (signed at the next open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

impl Head {
    /// A head, signed if there is a key.
    fn signed(seq: u64, hash: String, key: Option<&SecretKey>) -> Head {
        let signature = key.map(|k| {
            abide_bundle::digest::encode_hex(
                &k.sign(AuditHead::DEVICE_DOMAIN, &AuditHead::message(seq, &hash)),
            )
        });
        Head {
            seq,
            hash,
            signature,
        }
    }

    fn signature_is_valid(&self, key: &PublicKey) -> bool {
        self.signature
            .as_deref()
            .and_then(abide_bundle::digest::decode_hex)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .is_some_and(|sig| {
                key.verify(
                    AuditHead::DEVICE_DOMAIN,
                    &AuditHead::message(self.seq, &self.hash),
                    &sig,
                )
            })
    }
}

/// The device key beside the log at `path`: read, or made (`device.key`, mode 0600, and
/// `device.pub`) if there is none — unless the kernel's random source is not ready yet (early
/// in a first boot without a hardware random source), when there is no key for now.
/// Also says whether it was made just now.
fn device_key(path: &Path) -> Result<(Option<SecretKey>, bool), AuditError> {
    let dir = parent(path);
    let (secret, public) = (dir.join("device.key"), dir.join("device.pub"));
    let mut made = false;
    let key = match read_bounded(&secret, 4096) {
        Ok(bytes) => SecretKey::from_file_text(&String::from_utf8_lossy(&bytes)).map_err(|e| {
            AuditError::Broken {
                path: path.to_owned(),
                what: format!("{}: {e}", secret.display()),
            }
        })?,
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            match rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::NONBLOCK) {
                Ok(32) => {}
                Ok(_) | Err(rustix::io::Errno::AGAIN) => return Ok((None, false)),
                Err(e) => {
                    return Err(IoError {
                        op: "drawing a device key for",
                        path: secret,
                        source: e.into(),
                    }
                    .into());
                }
            }
            let key = SecretKey::from_seed(seed);
            write_new(&secret, key.to_file_text().as_bytes(), 0o600)?;
            made = true;
            key
        }
        Err(e) => return Err(e.into()),
    };
    let text = key.public().to_file_text();
    if read_bounded(&public, 4096).ok().as_deref() != Some(text.as_bytes()) {
        write_atomic(&public, text.as_bytes(), 0o644)?;
    }
    Ok((Some(key), made))
}

/// The device's public key, from `device.pub` beside the log at `path`; None if the device
/// has none yet.
fn device_public_if_any(path: &Path) -> Result<Option<PublicKey>, AuditError> {
    match read_bounded(&parent(path).join("device.pub"), 4096) {
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => device_public(path).map(Some),
    }
}

/// The device's public key, from `device.pub` beside the log at `path`.
fn device_public(path: &Path) -> Result<PublicKey, AuditError> {
    let file = parent(path).join("device.pub");
    let bytes = read_bounded(&file, 4096).map_err(|e| AuditError::Broken {
        path: path.to_owned(),
        what: format!("the device's public key, which signs the head, is not readable: {e}"),
    })?;
    PublicKey::from_file_text(&String::from_utf8_lossy(&bytes)).map_err(|e| AuditError::Broken {
        path: path.to_owned(),
        what: format!("{}: {e}", file.display()),
    })
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What opening the log found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records in the log.
    pub records: u64,
    /// Bytes of a torn last record that were cut away, if any.
    pub repaired_torn_bytes: Option<u64>,
}

/// Whether opening the log may repair it (cut a torn last record away, start a missing log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    Allowed,
    Refused,
}

/// An audit log opened for appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head: Head,
    /// None until the kernel's random source was ready for a new key.
    key: Option<SecretKey>,
}

impl AuditLog {
    /// [`AuditLog::open`] for a step that may not repair the log (an install): a log that is
    /// missing while its head says it was written, or a torn last record, is refused, and the
    /// log is left as it is (the boot step repairs it, as after the power cut that tore it). A
    /// device that never wrote a record has neither, and its log is started.
    pub fn open_intact(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        AuditLog::open_as(path, Repair::Refused)
    }

    /// Opens (or creates) the log at `path`: verifies it against its head, cuts away a torn
    /// last record, and positions for appending.
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        AuditLog::open_as(path, Repair::Allowed)
    }

    fn open_as(path: &Path, repair: Repair) -> Result<(AuditLog, OpenReport), AuditError> {
        if repair == Repair::Refused && !path.exists() && head_path(path).exists() {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: "the log is missing; nothing was changed (the boot step, `abide boot`, starts a new one, and `abide log verify` checks it against its head)".into(),
            });
        }
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
        if complete < bytes.len() && repair == Repair::Refused {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: format!(
                    "the last record is torn ({} bytes without an end); nothing was changed (the boot step, `abide boot`, cuts it away)",
                    bytes.len() - complete
                ),
            });
        }
        if complete < bytes.len() {
            // A crash mid-append leaves a line without its newline: never a whole record.
            file.set_len(complete as u64).map_err(|source| IoError {
                op: "cutting the torn last record of",
                path: path.to_owned(),
                source,
            })?;
            abide_fs::persist::fsync(&file, path)?;
            repaired = Some((bytes.len() - complete) as u64);
            bytes.truncate(complete);
        }
        let records = check(path, &bytes)?;
        let (key, made) = device_key(path)?;
        let head = records.last().map_or_else(
            || Head::signed(0, GENESIS.to_owned(), key.as_ref()),
            |r| Head::signed(r.seq, r.hash.clone(), key.as_ref()),
        );
        let public = key.as_ref().map(SecretKey::public);
        let on_disk = read_head(path)?;
        let signed = check_head(
            path,
            &records,
            public.as_ref(),
            on_disk.as_ref(),
            on_disk.as_ref(),
        )?;
        let lags = !records.is_empty()
            && on_disk.is_none_or(|h| (h.seq, &h.hash) != (head.seq, &head.hash));
        // An unsigned head written before the key was made (a cut between making the key and
        // signing the head leaves one) is signed now; one written after is a rewrite.
        let older_than_key = || {
            let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            matches!(
                (modified(&head_path(path)), modified(&parent(path).join("device.key"))),
                (Some(h), Some(k)) if h <= k
            )
        };
        let legacy = signed == Signed::No && key.is_some() && (made || older_than_key());
        if signed == Signed::No && key.is_some() && !legacy {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: "its head is not signed while the device has a key (the head was rewritten)"
                    .into(),
            });
        }
        if legacy || lags {
            // A head from before the device had a key (made just now), or one a cut left a
            // record behind: the chain verified; sign the last record now.
            write_atomic(
                &head_path(path),
                &serde_json::to_vec(&head).expect("serializes"),
                0o644,
            )?;
        }
        // A log created here is not made durable by a directory sync of its own: an empty log
        // lost to a power cut is no loss, and the first append's head, renamed into this same
        // directory and synced there, makes the log's name durable with its first record. (The
        // crash tests delete each sync in turn; this one changed no outcome.)
        Ok((
            AuditLog {
                path: path.to_owned(),
                head,
                key,
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
        let before = file.metadata().map_err(|e| io("reading", e))?.len();
        abide_fs::crash::point("audit:before-append", "");
        if let Err(e) = file.write_all(&line) {
            // A line cut short by a full disk is taken back: the log stays whole, and the
            // record can be appended again.
            let _ = file.set_len(before);
            return Err(io("appending to", e).into());
        }
        abide_fs::persist::fsync(&file, &self.path)?;
        abide_fs::crash::point("audit:after-fsync", "");
        let head = Head::signed(record.seq, record.hash.clone(), self.key.as_ref());
        let written = write_atomic(
            &head_path(&self.path),
            &serde_json::to_vec(&head).expect("serializes"),
            0o644,
        );
        self.head = head;
        match written {
            // The record is durable; a head the disk had no room for follows with the next
            // record or at the next open (a head behind its log is one a cut left).
            Err(e) if crate::room::is_full_io(&e.source) => Ok(record),
            Err(e) => Err(e.into()),
            Ok(()) => Ok(record),
        }
    }

    /// Reads and verifies the whole log at `path`; a torn last record is reported as an
    /// error here (opening the log repairs it).
    /// A device that never wrote a record has no log and no head: that is an empty log. A
    /// missing log whose head names records is a deletion.
    ///
    /// The agent may append while this reads (the record, then the head): the head is read
    /// before and after the log, and a last record still being written when the log was read
    /// (the log has grown since) is left out.
    pub fn verify(path: &Path) -> Result<Vec<Record>, AuditError> {
        let before = read_head(path)?;
        let mut bytes = match read_bounded(path, 1 << 30) {
            Ok(bytes) => bytes,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let after = read_head(path)?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let grown = || std::fs::metadata(path).is_ok_and(|m| m.len() > bytes.len() as u64);
        if complete < bytes.len() && grown() {
            bytes.truncate(complete);
        }
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let torn = bytes.len() - complete;
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: format!(
                    "the last record is torn ({torn} bytes without an end); opening the log repairs it"
                ),
            });
        }
        let records = check(path, &bytes)?;
        let key = if records.is_empty() {
            None
        } else {
            device_public_if_any(path)?
        };
        let signed = check_head(
            path,
            &records,
            key.as_ref(),
            before.as_ref(),
            after.as_ref(),
        )?;
        if key.is_some() && signed == Signed::No {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: "its head is not signed while the device has a key (the head was rewritten)"
                    .into(),
            });
        }
        if key.is_none() && signed == Signed::Yes && after.is_some() {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: "its head is signed but the device's public key (device.pub) is gone".into(),
            });
        }
        Ok(records)
    }

    /// Whether the log at `path` is anchored by a device key (`device.pub` exists); until the
    /// first open with the kernel's random source ready, it is not.
    pub fn is_signed(path: &Path) -> Result<bool, AuditError> {
        Ok(device_public_if_any(path)?.is_some())
    }

    /// Verifies the log at `path` as [`AuditLog::verify`] does, and that it still holds the
    /// checkpoint `head` (a signed head kept elsewhere, such as the one the fleet server
    /// accepted last): record `head.seq` with `head.hash`, under the same device key. A log
    /// rewritten by someone holding the device key verifies on its own but not against a
    /// checkpoint taken before.
    pub fn verify_against(path: &Path, head: &AuditHead) -> Result<Vec<Record>, AuditError> {
        let broken = |what: String| AuditError::Broken {
            path: path.to_owned(),
            what,
        };
        let records = Self::verify(path)?;
        let key = PublicKey::from_hex(&head.key)
            .map_err(|e| broken(format!("the checkpoint's key: {e}")))?;
        let checkpoint = Head {
            seq: head.seq,
            hash: head.hash.clone(),
            signature: Some(head.signature.clone()),
        };
        if !checkpoint.signature_is_valid(&key) {
            return Err(broken(
                "the checkpoint's signature does not verify under its key".into(),
            ));
        }
        if head.seq > 0 && device_public(path)? != key {
            return Err(broken(
                "the log's device key is not the one that signed the checkpoint (the key was replaced)".into(),
            ));
        }
        let held = head
            .seq
            .checked_sub(1)
            .map(|i| records.get(i as usize).map(|r| r.hash.as_str()));
        match held {
            None if head.hash == GENESIS => Ok(records),
            Some(Some(hash)) if hash == head.hash => Ok(records),
            Some(None) => Err(broken(format!(
                "the checkpoint names record {}, the log has {} (records were cut off)",
                head.seq,
                records.len()
            ))),
            _ => Err(broken(format!(
                "record {} is not the one the checkpoint names (the log was rewritten)",
                head.seq
            ))),
        }
    }

    /// The signed head of the log at `path`, read without opening the log for writing; the
    /// log is verified first.
    pub fn head(path: &Path) -> Result<AuditHead, AuditError> {
        let records = Self::verify(path)?;
        let key = device_public(path)?;
        let head: Head = match read_bounded(&head_path(path), 4096) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuditError::Broken {
                path: path.to_owned(),
                what: format!("its head file is not readable: {e}"),
            })?,
            Err(e) => return Err(e.into()),
        };
        if head.seq != records.len() as u64 {
            return Err(AuditError::Broken {
                path: path.to_owned(),
                what: "its head lags its last record (a cut during an append); the next open signs a new one".into(),
            });
        }
        Ok(AuditHead {
            seq: head.seq,
            hash: head.hash,
            key: key.to_hex(),
            signature: head.signature.unwrap_or_default(),
        })
    }

    /// The signed head, as the agent reports it; None while the device has no key.
    pub fn signed_head(&self) -> Option<AuditHead> {
        let key = self.key.as_ref()?;
        Some(AuditHead {
            seq: self.head.seq,
            hash: self.head.hash.clone(),
            key: key.public().to_hex(),
            signature: self.head.signature.clone()?,
        })
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

/// Whether a head carried a signature (checked when a key is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signed {
    Yes,
    No,
}

/// The head file, if there is one.
fn read_head(path: &Path) -> Result<Option<Head>, AuditError> {
    match read_bounded(&head_path(path), 4096) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AuditError::Broken {
                path: path.to_owned(),
                what: format!("its head file is not readable: {e}"),
            }),
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The head file may lag the log by one record (a crash between the append and the head
/// update) but never lead it, and must name a record that is there. With `key`, a signature
/// the head carries must verify under it; whether it carried one is returned.
///
/// `before` is the head read before the log and `after` the one read after it (the same head
/// when nothing appends meanwhile): records appended while the log was read are then neither
/// taken for records cut off (`before` names a record the log holds) nor for records added
/// without a head (the log holds at most one record more than `after` names).
fn check_head(
    path: &Path,
    records: &[Record],
    key: Option<&PublicKey>,
    before: Option<&Head>,
    after: Option<&Head>,
) -> Result<Signed, AuditError> {
    let last = records.len() as u64;
    let names = |h: &Head| {
        h.seq
            .checked_sub(1)
            .and_then(|i| records.get(i as usize))
            .is_some_and(|r| r.hash == h.hash)
    };
    let stale = |seq: u64| AuditError::Broken {
        path: path.to_owned(),
        what: format!(
            "its head says record {seq} was written, the log has {last} (records were cut off the end or the head is stale)"
        ),
    };
    // Nothing cut off: the head read first names a record the log holds (or none).
    if let Some(h) = before
        && !(h.seq == 0 || h.seq <= last && names(h))
    {
        return Err(stale(h.seq));
    }
    // Nothing added without a head: at most one record beyond the head read last.
    let Some(after) = after else {
        return if last <= 1 {
            Ok(Signed::Yes)
        } else {
            Err(AuditError::Broken {
                path: path.to_owned(),
                what: format!("its head file is missing, the log has {last} records"),
            })
        };
    };
    if !(after.seq == 0 && last <= 1 || last <= after.seq + 1 && (after.seq > last || names(after)))
    {
        return Err(stale(after.seq));
    }
    let forged = [before, Some(after)]
        .into_iter()
        .flatten()
        .any(|h| key.is_some_and(|key| h.signature.is_some() && !h.signature_is_valid(key)));
    if forged {
        return Err(AuditError::Broken {
            path: path.to_owned(),
            what:
                "its head's signature does not verify under the device key (the head was rewritten)"
                    .into(),
        });
    }
    Ok(if after.signature.is_some() {
        Signed::Yes
    } else {
        Signed::No
    })
}

fn head_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".head");
    PathBuf::from(s)
}
