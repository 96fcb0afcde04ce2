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

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::ApiResult;

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
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(seq)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
    Ok(())
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

type Row = (i64, i64, String, String, String, String, String);

/// `GET /api/v1/audit`: records in order.
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Query(page): Query<Page>,
) -> ApiResult<Json<Vec<abide_proto::AuditRecord>>> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, at, actor, action, details, prev, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(page.after.unwrap_or(0))
    .bind(page.limit.unwrap_or(1000).clamp(1, 1000))
    .fetch_all(&server.db.pool)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(
                |(seq, at, actor, action, details, prev, hash)| abide_proto::AuditRecord {
                    seq: seq as u64,
                    at: rfc3339(at),
                    actor,
                    action,
                    details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                    prev,
                    hash,
                },
            )
            .collect(),
    ))
}

/// Checks the whole chain: each record's hash, its link to the one before, gapless sequence
/// numbers, and that the head names the last record.
pub async fn check(server: &Server) -> Result<abide_proto::AuditVerify, sqlx::Error> {
    let mut prev = "0".repeat(64);
    let mut expected = 1i64;
    let mut after = 0i64;
    let bad = |seq: i64, problem: String, records: i64| abide_proto::AuditVerify {
        ok: false,
        records: records as u64,
        first_bad: Some(seq as u64),
        problem: Some(problem),
    };
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, at, actor, action, details, prev, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT 5000",
        )
        .bind(after)
        .fetch_all(&server.db.pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for (seq, at, actor, action, details, p, hash) in rows {
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
            prev = hash;
            expected += 1;
            after = seq;
        }
    }
    let (head_seq, head_hash): (i64, String) =
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&server.db.pool)
            .await?;
    if head_seq != expected - 1 || head_hash != prev {
        return Ok(bad(
            expected,
            format!(
                "the chain ends at record {} but its head names record {head_seq}: records were removed from the end",
                expected - 1
            ),
            expected - 1,
        ));
    }
    Ok(abide_proto::AuditVerify {
        ok: true,
        records: (expected - 1) as u64,
        first_bad: None,
        problem: None,
    })
}

/// `GET /api/v1/audit/verify`.
pub async fn verify(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<abide_proto::AuditVerify>> {
    Ok(Json(check(&server).await?))
}
