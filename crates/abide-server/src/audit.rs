//! The server's audit trail: every admin action and device event, appended to the `audit`
//! table in the same transaction as the change it records, each record holding the hash of
//! the one before. `audit_head` holds the last sequence number and hash; appending locks it, so
//! records from several server processes still form one chain.
//!
//! A record's hash is SHA-256 over `prev ‖ "\n" ‖ seq ‖ "\n" ‖ at ‖ "\n" ‖ actor ‖ "\n" ‖ action
//! ‖ "\n" ‖ details`, with `details` the stored JSON text.

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use sqlx::{Any, Transaction};

use abide_fleet_json::AuditHead;

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult};

fn record_hash(prev: &str, seq: i64, at: i64, actor: &str, action: &str, details: &str) -> String {
    crate::sha256_hex(format!("{prev}\n{seq}\n{at}\n{actor}\n{action}\n{details}").as_bytes())
}

/// Appends a record inside `tx`.
pub async fn append(
    server: &Server,
    tx: &mut Transaction<'static, Any>,
    actor: &str,
    action: &str,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let (seq, prev): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT seq, hash FROM audit_head WHERE id = 1{}",
        server.db.for_update()
    )))
    .fetch_one(&mut **tx)
    .await?;
    let (seq, at, details) = (seq + 1, now_ms(), details.to_string());
    let hash = record_hash(&prev, seq, at, actor, action, &details);
    sqlx::query(
        "INSERT INTO audit (seq, at, actor, action, details, prev, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(seq)
    .bind(at)
    .bind(actor)
    .bind(action)
    .bind(&details)
    .bind(&prev)
    .bind(&hash)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2, signature = $3 WHERE id = 1")
        .bind(seq)
        .bind(&hash)
        .bind(head_signature(server, seq, &hash))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The server's signature over its audit head (hex).
fn head_signature(server: &Server, seq: i64, hash: &str) -> String {
    abide_bundle::digest::encode_hex(&server.signing.sign(
        AuditHead::SERVER_DOMAIN,
        &AuditHead::message(seq as u64, hash),
    ))
}

/// Signs the head of a trail kept before heads were signed, once its chain verifies (at
/// start). A trail that does not verify is left unsigned, and `check` keeps saying so.
pub async fn sign_unsigned_head(server: &Server) -> Result<(), sqlx::Error> {
    let (seq, hash, signature): (i64, String, Option<String>) =
        sqlx::query_as("SELECT seq, hash, signature FROM audit_head WHERE id = 1")
            .fetch_one(&server.db.pool)
            .await?;
    if signature.is_some() || !check(server, None).await?.ok_before_signature {
        return Ok(());
    }
    sqlx::query(
        "UPDATE audit_head SET signature = $1 WHERE id = 1 AND seq = $2 AND signature IS NULL",
    )
    .bind(head_signature(server, seq, &hash))
    .bind(seq)
    .execute(&server.db.pool)
    .await?;
    Ok(())
}

/// The trail's head, signed by the server.
pub async fn head(server: &Server) -> Result<AuditHead, sqlx::Error> {
    let (seq, hash, signature): (i64, String, Option<String>) =
        sqlx::query_as("SELECT seq, hash, signature FROM audit_head WHERE id = 1")
            .fetch_one(&server.db.read)
            .await?;
    Ok(AuditHead {
        seq: seq as u64,
        hash,
        key: server.signing.public().to_hex(),
        signature: signature.unwrap_or_default(),
    })
}

/// `GET /api/v1/audit/head` (viewer): the trail's signed head, a checkpoint to keep
/// elsewhere and check later with `GET /api/v1/audit/verify?seq=N&hash=H`.
pub async fn show_head(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<AuditHead>> {
    Ok(Json(head(&server).await?))
}

/// Which records to list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// The first sequence number (default 1).
    pub after: Option<i64>,
    /// At most this many (default and maximum 1000).
    pub limit: Option<i64>,
}

/// A row of `audit`.
struct Row {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    details: String,
    prev: String,
    hash: String,
}

/// The columns of a [`Row`].
const COLUMNS: &str = "seq, at, actor, action, details, prev, hash";

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Row {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(Row {
            seq: row.try_get("seq")?,
            at: row.try_get("at")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            details: row.try_get("details")?,
            prev: row.try_get("prev")?,
            hash: row.try_get("hash")?,
        })
    }
}

impl From<Row> for abide_fleet_json::AuditRecord {
    /// Details that are not JSON (only a tampered row) read as `null`; `verify` names the row.
    fn from(r: Row) -> Self {
        abide_fleet_json::AuditRecord {
            seq: r.seq as u64,
            at: rfc3339(r.at),
            actor: r.actor,
            action: r.action,
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
            prev: r.prev,
            hash: r.hash,
        }
    }
}

/// `GET /api/v1/audit`: records in order.
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Query(page): Query<Page>,
) -> ApiResult<Json<Vec<abide_fleet_json::AuditRecord>>> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"
    )))
    .bind(page.after.unwrap_or(0))
    .bind(page.limit.unwrap_or(1000).clamp(1, 1000))
    .fetch_all(&server.db.pool)
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// A checkpoint to check the trail against: a head kept from before.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Its record's sequence number.
    pub seq: Option<u64>,
    /// Its record's hash.
    pub hash: Option<String>,
}

/// What [`check`] found.
pub struct Checked {
    /// The answer.
    pub verify: abide_fleet_json::AuditVerify,
    /// Whether everything but the head's signature was right.
    pub ok_before_signature: bool,
}

/// Checks the whole chain: each record's hash, its link to the one before, gapless sequence
/// numbers, that the head names the last record and carries the server's signature, and that
/// the trail still holds the `checkpoint`'s record, if one is given. Records and head are read
/// from one snapshot, so records appended during the check do not read as a rewritten trail.
pub async fn check(
    server: &Server,
    checkpoint: Option<(u64, &str)>,
) -> Result<Checked, sqlx::Error> {
    let mut prev = "0".repeat(64);
    let mut expected = 1i64;
    let mut after = 0i64;
    let mut at_checkpoint = None;
    let bad = |seq: i64, problem: String, records: i64| Checked {
        verify: abide_fleet_json::AuditVerify {
            ok: false,
            records: records as u64,
            first_bad: Some(seq as u64),
            problem: Some(problem),
        },
        ok_before_signature: false,
    };
    // One snapshot for the records and the head: appends go on meanwhile.
    let mut snapshot = server.db.snapshot().await?;
    loop {
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM audit WHERE seq > $1 ORDER BY seq LIMIT 5000"
        )))
        .bind(after)
        .fetch_all(&mut *snapshot)
        .await?;
        if rows.is_empty() {
            break;
        }
        for Row {
            seq,
            at,
            actor,
            action,
            details,
            prev: p,
            hash,
        } in rows
        {
            if seq != expected {
                return Ok(bad(
                    expected,
                    format!("record {expected} is missing"),
                    seq - 1,
                ));
            }
            if p != prev {
                return Ok(bad(seq, "does not link to the record before".into(), seq));
            }
            if record_hash(&p, seq, at, &actor, &action, &details) != hash {
                return Ok(bad(seq, "its content does not match its hash".into(), seq));
            }
            if checkpoint.is_some_and(|(s, _)| s == seq as u64) {
                at_checkpoint = Some(hash.clone());
            }
            prev = hash;
            expected += 1;
            after = seq;
        }
    }
    let last = expected - 1;
    let (head_seq, head_hash, signature): (i64, String, Option<String>) =
        sqlx::query_as("SELECT seq, hash, signature FROM audit_head WHERE id = 1")
            .fetch_one(&mut *snapshot)
            .await?;
    snapshot.rollback().await?;
    if head_seq != last || head_hash != prev {
        return Ok(bad(
            expected,
            format!(
                "the chain ends at record {last} but its head names record {head_seq}: records were removed from the end"
            ),
            last,
        ));
    }
    if let Some((seq, hash)) = checkpoint {
        let held = if seq == 0 {
            Some("0".repeat(64))
        } else {
            at_checkpoint
        };
        match held {
            None => {
                return Ok(bad(
                    seq as i64,
                    format!("the checkpoint names record {seq}, the trail has {last}"),
                    last,
                ));
            }
            Some(h) if h != hash => {
                return Ok(bad(
                    seq as i64,
                    "it is not the record the checkpoint names: the trail was rewritten".into(),
                    last,
                ));
            }
            Some(_) => {}
        }
    }
    let signed = AuditHead {
        seq: last as u64,
        hash: prev,
        key: server.signing.public().to_hex(),
        signature: signature.unwrap_or_default(),
    };
    if !head_signature_is_valid(&signed, AuditHead::SERVER_DOMAIN) {
        let mut checked = bad(
            last,
            "the head does not carry the server's signature: the trail and its head were rewritten"
                .into(),
            last,
        );
        checked.ok_before_signature = true;
        return Ok(checked);
    }
    Ok(Checked {
        verify: abide_fleet_json::AuditVerify {
            ok: true,
            records: last as u64,
            first_bad: None,
            problem: None,
        },
        ok_before_signature: true,
    })
}

/// `GET /api/v1/audit/verify[?seq=N&hash=H]` (viewer): checks the trail, against a
/// checkpoint (a head from `GET /api/v1/audit/head`) if one is given.
pub async fn verify(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Query(checkpoint): Query<Checkpoint>,
) -> ApiResult<Json<abide_fleet_json::AuditVerify>> {
    let checkpoint = match (checkpoint.seq, checkpoint.hash.as_deref()) {
        (None, None) => None,
        (Some(seq), Some(hash)) if is_hex(hash, 64) => Some((seq, hash)),
        _ => {
            return Err(ApiError::bad_request(
                "a checkpoint is seq=N and hash=H (64 hex digits), both",
            ));
        }
    };
    Ok(Json(check(&server, checkpoint).await?.verify))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `head` is well formed and its signature verifies under its key with `domain`.
pub fn head_signature_is_valid(head: &AuditHead, domain: &[u8]) -> bool {
    let key = abide_bundle::digest::decode_hex(&head.key)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| abide_bundle::PublicKey::from_bytes(b).ok());
    let signature = abide_bundle::digest::decode_hex(&head.signature)
        .and_then(|b| <[u8; 64]>::try_from(b).ok());
    match (key, signature) {
        (Some(key), Some(sig)) if is_hex(&head.hash, 64) => {
            key.verify(domain, &AuditHead::message(head.seq, &head.hash), &sig)
        }
        _ => false,
    }
}

/// Checks the form and signature of the audit head a device reports (before anything of its
/// check-in is kept): 400 if it is not a head signed by the key it names.
pub fn check_device_head(head: &AuditHead) -> ApiResult<()> {
    if !is_hex(&head.hash, 64) || !is_hex(&head.key, 64) || !is_hex(&head.signature, 128) {
        return Err(ApiError::bad_request(
            "audit_head: expected hash (64 hex digits), key (64) and signature (128)",
        ));
    }
    if head.seq > i64::MAX as u64 || !head_signature_is_valid(head, AuditHead::DEVICE_DOMAIN) {
        return Err(ApiError::bad_request(
            "audit_head: the signature does not verify under the key it names",
        ));
    }
    Ok(())
}

/// Keeps the signed audit head device `id` reported (already checked by
/// [`check_device_head`]) if it extends the one kept before: same key, and a later record or
/// the same record. A head that goes back, changes a record the server saw, or is signed by
/// another key is not kept; it is recorded (`device.audit-head-refused`, once per head) — the
/// device's log was cut, rewritten or its key replaced.
pub async fn keep_device_head(server: &Server, id: &str, head: &AuditHead) -> ApiResult<()> {
    let seen = (head.seq, head.hash.clone());
    if server
        .audit_heads
        .lock()
        .expect("not poisoned")
        .get(id)
        .is_some_and(|s| *s == seen)
    {
        return Ok(());
    }
    let mut tx = server.db.pool.begin().await?;
    let kept: Option<(Option<String>,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT audit_head FROM devices WHERE id = $1{}",
        server.db.for_update()
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let kept: Option<AuditHead> = kept
        .and_then(|(h,)| h)
        .map(|h| crate::db::json_column(&format!("devices {id}"), "audit_head", &h))
        .transpose()?;
    let refusal = match &kept {
        Some(k) if k.key != head.key => Some(format!(
            "signed by key {}, not the device's key {}",
            head.key, k.key
        )),
        Some(k) if head.seq < k.seq => Some(format!(
            "it names record {}, the server saw record {} (records were cut off)",
            head.seq, k.seq
        )),
        Some(k) if head.seq == k.seq && head.hash != k.hash => Some(format!(
            "record {} is not the one the server saw (the log was rewritten)",
            head.seq
        )),
        Some(k) if k == head => None,
        _ => {
            sqlx::query("UPDATE devices SET audit_head = $1 WHERE id = $2")
                .bind(serde_json::to_string(head).expect("plain data serializes"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            None
        }
    };
    if let Some(reason) = &refusal {
        append(
            server,
            &mut tx,
            &format!("device:{id}"),
            "device.audit-head-refused",
            serde_json::json!({"device_id": id, "seq": head.seq, "hash": head.hash, "reason": reason}),
        )
        .await?;
    }
    tx.commit().await?;
    server
        .audit_heads
        .lock()
        .expect("not poisoned")
        .insert(id.to_owned(), seen);
    Ok(())
}
