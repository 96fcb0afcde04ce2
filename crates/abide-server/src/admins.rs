//! Admin tokens with a role (`viewer`, `operator`, `admin`; see [`abide_fleet_json::Role`]), made,
//! listed and revoked by an admin. The first start's `admin.token` is role admin and is not
//! listed here. A token's secret is shown once, at creation; the database keeps its SHA-256.

use abide_fleet_json::{AdminToken, AdminTokenRequest, AdminTokenView, Role};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::Server;
use crate::auth::Admin;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult, parse_json};

/// A row of `admin_tokens`, without the hash.
struct TokenRow {
    id: String,
    name: String,
    role: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, name, role, created_at, revoked_at";

impl<'r> sqlx::FromRow<'r, AnyRow> for TokenRow {
    fn from_row(row: &'r AnyRow) -> Result<Self, sqlx::Error> {
        Ok(TokenRow {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            role: row.try_get("role")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }
}

impl TryFrom<TokenRow> for AdminTokenView {
    type Error = sqlx::Error;
    fn try_from(row: TokenRow) -> Result<Self, sqlx::Error> {
        let role = row.role.parse::<Role>().map_err(|e| {
            sqlx::Error::Decode(format!("admin_tokens {}: column role: {e}", row.id).into())
        })?;
        Ok(AdminTokenView {
            id: row.id,
            name: row.name,
            role,
            created_at: rfc3339(row.created_at),
            revoked_at: row.revoked_at.map(rfc3339),
        })
    }
}

fn check_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "name {name:?}: expected 1 to 64 of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// `POST /api/v1/admin-tokens` (admin): a new token with a role; its secret is in the answer
/// and nowhere else.
pub async fn create(
    State(server): State<Server>,
    caller: Admin,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<AdminToken>)> {
    let req: AdminTokenRequest = parse_json(&body)?;
    check_name(&req.name)?;
    let id = format!("at-{}", crate::random_hex(8));
    let token = format!("abide-{}-{}", req.role, crate::random_hex(32));
    let now = now_ms();
    let mut tx = server.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO admin_tokens (id, name, role, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(req.role.as_str())
    .bind(crate::sha256_hex(token.as_bytes()))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "admin-token.create",
        serde_json::json!({"token_id": id, "name": req.name, "role": req.role}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(AdminToken {
            token,
            view: AdminTokenView {
                id,
                name: req.name,
                role: req.role,
                created_at: rfc3339(now),
                revoked_at: None,
            },
        }),
    ))
}

/// `GET /api/v1/admin-tokens` (admin): every token made here, without its secret.
pub async fn list(
    State(server): State<Server>,
    _caller: Admin,
) -> ApiResult<Json<Vec<AdminTokenView>>> {
    let rows: Vec<TokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM admin_tokens ORDER BY created_at, id"
    )))
    .fetch_all(&server.db.read)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(AdminTokenView::try_from)
            .collect::<Result<_, _>>()?,
    ))
}

/// `DELETE /api/v1/admin-tokens/{id}` (admin): the token stops working at once, in every
/// server process (tokens are looked up on every request), and its web sessions end.
pub async fn revoke(
    State(server): State<Server>,
    caller: Admin,
    Path(id): Path<String>,
) -> ApiResult<Json<AdminTokenView>> {
    let mut tx = server.db.pool.begin().await?;
    let changed = crate::db::revoke(&mut tx, crate::db::Revocable::AdminToken, &id).await?;
    let row: Option<TokenRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM admin_tokens WHERE id = $1"
    )))
    .bind(&id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::not_found(format!("no admin token {id}")));
    };
    if changed {
        sqlx::query("DELETE FROM web_sessions WHERE token_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        crate::audit::append(
            &server,
            &mut tx,
            &caller.actor,
            "admin-token.revoke",
            serde_json::json!({"token_id": id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Json(AdminTokenView::try_from(row)?))
}
