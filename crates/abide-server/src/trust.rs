//! Trust root rotation: an operator publishes the fleet's next trust root (version N+1, signed
//! by a threshold of version N's keys and of its own), the server checks it against the
//! current one and keeps the chain in the database; uploads are verified against the newest
//! root, and a device whose check-in names an older version gets the roots after it, which it
//! checks link by link itself before it stores them.

use abide_bundle::{ExpirationEnforcement, Limits, TrustRoot};
use abide_fleet_json::TrustView;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;

use crate::Server;
use crate::clock::now_ms;
use crate::error::{ApiError, ApiResult};

/// How many roots one check-in answer carries at most (a device further behind catches up
/// over several check-ins).
pub const MAX_PER_ANSWER: i64 = 8;

/// The newest trust root: the last one published, or the one the server started with.
pub async fn current(server: &Server) -> ApiResult<TrustRoot> {
    let row: Option<(String,)> =
        sqlx::query_as("SELECT body FROM trust_roots ORDER BY version DESC LIMIT 1")
            .fetch_optional(&server.db.read)
            .await?;
    match row {
        None => Ok(server.trust.clone()),
        Some((body,)) => TrustRoot::load(
            body.as_bytes(),
            jiff::Timestamp::now(),
            ExpirationEnforcement::Unsafe,
            &Limits::default(),
        )
        .map_err(|e| ApiError::internal("reading the stored trust root", e)),
    }
}

/// The published roots after `version`, oldest first, as their exact JSON texts.
pub async fn after(server: &Server, version: u64) -> ApiResult<Vec<String>> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT body FROM trust_roots WHERE version > $1 ORDER BY version LIMIT $2")
            .bind(i64::try_from(version).unwrap_or(i64::MAX))
            .bind(MAX_PER_ANSWER)
            .fetch_all(&server.db.read)
            .await?;
    Ok(rows.into_iter().map(|(b,)| b).collect())
}

/// `POST /api/v1/trust` (admin): the body is the next trust root.
pub async fn publish(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TrustView>)> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the trust root is not UTF-8 text"))?;
    let refused = |e: abide_bundle::Error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("the trust root was refused: {e}"),
        )
    };
    let next = TrustRoot::load(
        &body,
        jiff::Timestamp::now(),
        ExpirationEnforcement::Safe,
        &Limits::default(),
    )
    .map_err(refused)?;
    let mut tx = server.db.pool.begin().await?;
    // Checked against the newest root stored; the primary key refuses a second root of the
    // same version, so of two publishers racing only one link is stored.
    let current = current(&server).await?;
    current.verify_successor(&next).map_err(refused)?;
    let inserted = sqlx::query(
        "INSERT INTO trust_roots (version, body, published_at) VALUES ($1, $2, $3) \
         ON CONFLICT (version) DO NOTHING",
    )
    .bind(next.version() as i64)
    .bind(text)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::conflict(format!(
            "trust root version {} is already published",
            next.version()
        )));
    }
    let keys: Vec<String> = next.keys().iter().map(|k| k.id().to_string()).collect();
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "trust.publish",
        serde_json::json!({"version": next.version(), "threshold": next.threshold(), "keys": keys}),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(&next))))
}

/// `GET /api/v1/trust` (viewer): the current trust root's version, threshold and keys.
pub async fn show(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<TrustView>> {
    Ok(Json(view(&current(&server).await?)))
}

fn view(root: &TrustRoot) -> TrustView {
    TrustView {
        version: root.version(),
        threshold: root.threshold(),
        keys: root.keys().iter().map(|k| k.id().to_string()).collect(),
    }
}
