//! Devices: enrolment tokens, enrolment, check-ins with signed answers, and reports.
//!
//! A check-in writes nothing at once: the device's last-seen time and inventory go into
//! [`LastSeen`], which a background task writes in one transaction every half second (and the
//! admin views write before they read), so check-ins stay cheap at scale. Reports are written
//! at once, in a transaction that also appends the audit record: a report with a sequence
//! number already recorded changes nothing and says `duplicate`; an older report arriving
//! after a newer one is recorded but does not change the device's current state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use abide_bundle::{HardwareId, Name};
use abide_fleet_json::{
    Assignment, CheckinRequest, EnrollRequest, EnrollResponse, EnrollToken, EnrollTokenRequest,
    EnrollTokenView, ReportRequest, ReportResponse, ReportStatus, SignedAssignment,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;

use crate::Server;
use crate::auth::valid_device_id;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult, parse_json};

/// Whether `s` is a short name (a group, a tag, a version): 1 to `max` of
/// `A-Z a-z 0-9 . _ - :`, starting with a letter or digit, never `..` — so neither `.`, `..`
/// nor a path can be one.
pub fn valid_label(s: &str, max: usize) -> bool {
    valid_name(s, max, b".-_:")
}

/// Whether `s` is 1 to `max` letters, digits and bytes of `also`, starting with a letter or
/// digit and never holding `..`: the names the server stores and puts in paths (labels here,
/// device ids in `auth.rs`).
pub fn valid_name(s: &str, max: usize, also: &[u8]) -> bool {
    (1..=max).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || also.contains(&b))
}

fn check_tags(tags: &[String]) -> ApiResult<()> {
    if tags.len() > 32 {
        return Err(ApiError::bad_request("at most 32 tags"));
    }
    match tags.iter().find(|t| !valid_label(t, 64)) {
        Some(t) => Err(ApiError::bad_request(format!(
            "tag {t:?}: expected 1 to 64 of A-Z a-z 0-9 . _ - :, starting with a letter or digit, without .."
        ))),
        None => Ok(()),
    }
}

pub(crate) fn check_group(group: &str) -> ApiResult<()> {
    if valid_label(group, 64) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "group {group:?}: expected 1 to 64 of A-Z a-z 0-9 . _ - :, starting with a letter or digit, without .."
        )))
    }
}

/// The most devices one enrolment token may enrol.
const MAX_TOKEN_USES: u64 = 1_000_000;

/// Whether `id` matches `pattern`: `*` any run of characters, `?` any one (wildmatch).
pub fn id_matches(pattern: &str, id: &str) -> bool {
    wildmatch::WildMatch::new(pattern).matches(id)
}

/// `POST /api/v1/enroll-tokens` (admin): a token devices enrol with into a group.
pub async fn create_token(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<EnrollToken>)> {
    let req: EnrollTokenRequest = parse_json(&body)?;
    check_group(&req.group)?;
    check_tags(&req.tags)?;
    let ttl = req.expires_in.unwrap_or(7 * 86_400);
    if !(60..=366 * 86_400).contains(&ttl) {
        return Err(ApiError::bad_request(
            "expires_in: expected 60 seconds to 366 days",
        ));
    }
    let uses = req.uses.unwrap_or(1);
    if !(1..=MAX_TOKEN_USES).contains(&uses) {
        return Err(ApiError::bad_request(format!(
            "uses: expected 1 to {MAX_TOKEN_USES}"
        )));
    }
    if req.device_ids.len() > 10_000 {
        return Err(ApiError::bad_request("device_ids: at most 10000"));
    }
    if let Some(bad) = req.device_ids.iter().find(|d| !valid_device_id(d)) {
        return Err(ApiError::bad_request(format!(
            "device_ids: {bad:?} is not a device id (1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit, without ..)"
        )));
    }
    if let Some(p) = &req.device_id_pattern {
        let ok = (1..=128).contains(&p.len())
            && p.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*' | b'?')
            });
        if !ok {
            return Err(ApiError::bad_request(format!(
                "device_id_pattern {p:?}: expected 1 to 128 of A-Z a-z 0-9 . _ - and the wildcards * ?"
            )));
        }
    }
    if let Some(p) = &req.product {
        Name::parse("product", p, 64)
            .map_err(|e| ApiError::bad_request(format!("product: {e}")))?;
    }
    let id = format!("t-{}", crate::random_hex(8));
    let token = format!("abide-enroll-{}", crate::random_hex(24));
    let created_at = now_ms();
    let expires_at = created_at + ttl as i64 * 1000;
    let mut tx = server.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO enroll_tokens (id, token_hash, grp, tags, created_at, expires_at, max_uses, used, device_ids, device_id_pattern, product) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, $10)",
    )
    .bind(&id)
    .bind(crate::sha256_hex(token.as_bytes()))
    .bind(&req.group)
    .bind(serde_json::to_string(&req.tags).expect("strings serialize"))
    .bind(created_at)
    .bind(expires_at)
    .bind(uses as i64)
    .bind(serde_json::to_string(&req.device_ids).expect("strings serialize"))
    .bind(&req.device_id_pattern)
    .bind(&req.product)
    .execute(&mut *tx)
    .await?;
    let view = EnrollTokenView {
        id,
        group: req.group,
        tags: req.tags,
        uses,
        used: 0,
        device_ids: req.device_ids,
        device_id_pattern: req.device_id_pattern,
        product: req.product,
        created_at: rfc3339(created_at),
        expires_at: rfc3339(expires_at),
        revoked_at: None,
    };
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "enroll-token.create",
        serde_json::to_value(&view).expect("serializes"),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(EnrollToken { token, view })))
}

/// A row of `enroll_tokens`, without the token's hash.
struct TokenRow {
    id: String,
    group: String,
    /// A JSON array of strings.
    tags: String,
    created_at: i64,
    expires_at: i64,
    max_uses: i64,
    used: i64,
    /// A JSON array of strings.
    device_ids: String,
    device_id_pattern: Option<String>,
    product: Option<String>,
    revoked_at: Option<i64>,
}

/// The columns of a [`TokenRow`].
macro_rules! token_columns {
    () => {
        "id, grp, tags, created_at, expires_at, max_uses, used, device_ids, device_id_pattern, product, revoked_at"
    };
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for TokenRow {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(TokenRow {
            id: row.try_get("id")?,
            group: row.try_get("grp")?,
            tags: row.try_get("tags")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            max_uses: row.try_get("max_uses")?,
            used: row.try_get("used")?,
            device_ids: row.try_get("device_ids")?,
            device_id_pattern: row.try_get("device_id_pattern")?,
            product: row.try_get("product")?,
            revoked_at: row.try_get("revoked_at")?,
        })
    }
}

impl TryFrom<TokenRow> for EnrollTokenView {
    type Error = sqlx::Error;
    fn try_from(row: TokenRow) -> Result<Self, sqlx::Error> {
        let name = format!("enroll_tokens {}", row.id);
        Ok(EnrollTokenView {
            tags: crate::db::json_column(&name, "tags", &row.tags)?,
            device_ids: crate::db::json_column(&name, "device_ids", &row.device_ids)?,
            id: row.id,
            group: row.group,
            uses: row.max_uses.max(0) as u64,
            used: row.used.max(0) as u64,
            device_id_pattern: row.device_id_pattern,
            product: row.product,
            created_at: rfc3339(row.created_at),
            expires_at: rfc3339(row.expires_at),
            revoked_at: row.revoked_at.map(rfc3339),
        })
    }
}

/// `GET /api/v1/enroll-tokens` (viewer): every token, without its secret.
pub async fn list_tokens(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<Vec<EnrollTokenView>>> {
    let rows: Vec<TokenRow> = sqlx::query_as(concat!(
        "SELECT ",
        token_columns!(),
        " FROM enroll_tokens ORDER BY created_at, id"
    ))
    .fetch_all(&server.db.read)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?,
    ))
}

/// `DELETE /api/v1/enroll-tokens/{id}` (admin): the token enrols no more devices (those it
/// enrolled stay).
pub async fn revoke_token(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Json<EnrollTokenView>> {
    let mut tx = server.db.pool.begin().await?;
    let changed = crate::db::revoke(&mut tx, crate::db::Revocable::EnrollToken, &id).await?;
    let row: Option<TokenRow> = sqlx::query_as(concat!(
        "SELECT ",
        token_columns!(),
        " FROM enroll_tokens WHERE id = $1"
    ))
    .bind(&id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::not_found(format!("no enrolment token {id}")));
    };
    if changed {
        crate::audit::append(
            &server,
            &mut tx,
            &caller.actor,
            "enroll-token.revoke",
            serde_json::json!({"token_id": id}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Json(row.try_into()?))
}

/// Records a refused enrolment with a known token, then returns the refusal.
async fn refused(server: &Server, token_id: &str, device_id: &str, e: ApiError) -> ApiError {
    let record = async {
        let mut tx = server.db.pool.begin().await?;
        crate::audit::append(
            server,
            &mut tx,
            "enrolment",
            "device.enroll-refused",
            serde_json::json!({"token_id": token_id, "device_id": device_id, "reason": e.message}),
        )
        .await?;
        tx.commit().await
    };
    match record.await {
        Ok(()) => e,
        Err(db) => ApiError::from(db),
    }
}

/// `POST /api/v1/device/enroll`: a device with a valid token gets a credential. An id that is
/// already enrolled is refused (re-enrolment would hand the device's identity to whoever holds
/// a token). Attempts are rate-limited per client address; the token's group and tags are the
/// device's (it cannot add its own), its bindings (device ids, pattern, product) are checked,
/// and each enrolment uses it up by one, in the transaction that adds the device.
pub async fn enroll(
    State(server): State<Server>,
    peer: Option<axum::Extension<crate::tls::PeerIdentity>>,
    remote: Option<axum::Extension<crate::limit::Remote>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<EnrollResponse>)> {
    let ip = crate::limit::Remote::ip(remote.as_deref());
    if let Err(wait) = server.enrolments.take(ip) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            format!(
                "too many enrolment attempts from {ip} (at most {} a minute); retry in {wait} s",
                server.config.enroll_per_minute
            ),
        ));
    }
    let req: EnrollRequest = parse_json(&body)?;
    crate::auth::check_peer(&server, &req.device_id, peer.as_deref())?;
    let row: Option<TokenRow> = sqlx::query_as(concat!(
        "SELECT ",
        token_columns!(),
        " FROM enroll_tokens WHERE token_hash = $1"
    ))
    .bind(crate::sha256_hex(req.token.as_bytes()))
    .fetch_optional(&server.db.pool)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::unauthorized("unknown enrolment token"));
    };
    let expires_at = row.expires_at;
    let token: EnrollTokenView = row.try_into()?;
    if let Err(e) = check_enrolment(&token, expires_at, &req) {
        return Err(refused(&server, &token.id, &req.device_id, e).await);
    }
    let secret = crate::random_hex(32);
    let mut tx = server.db.pool.begin().await?;
    let taken = sqlx::query(
        "UPDATE enroll_tokens SET used = used + 1 WHERE id = $1 AND used < max_uses AND revoked_at IS NULL",
    )
    .bind(&token.id)
    .execute(&mut *tx)
    .await?;
    if taken.rows_affected() == 0 {
        drop(tx);
        let e = ApiError::forbidden(format!(
            "the enrolment token {} is used up ({} of {} devices enrolled)",
            token.id, token.uses, token.uses
        ));
        return Err(refused(&server, &token.id, &req.device_id, e).await);
    }
    let inserted = sqlx::query(
        "INSERT INTO devices (id, credential_hash, product, compatible, grp, tags, state, last_seq, enrolled_at) \
         VALUES ($1, $2, $3, $4, $5, $6, 'idle', 0, $7) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&req.device_id)
    .bind(crate::sha256_hex(secret.as_bytes()))
    .bind(&req.product)
    .bind(serde_json::to_string(&req.compatible).expect("strings serialize"))
    .bind(&token.group)
    .bind(serde_json::to_string(&token.tags).expect("strings serialize"))
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        drop(tx);
        let e = ApiError::conflict(format!("device {} is already enrolled", req.device_id));
        return Err(refused(&server, &token.id, &req.device_id, e).await);
    }
    for tag in &token.tags {
        sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2)")
            .bind(&req.device_id)
            .bind(tag)
            .execute(&mut *tx)
            .await?;
    }
    // Unfinished rollouts that target the device take it in at its place.
    crate::rollouts::enrol_device(&mut tx, &req.device_id).await?;
    crate::audit::append(
        &server,
        &mut tx,
        &format!("device:{}", req.device_id),
        "device.enroll",
        serde_json::json!({"token_id": token.id, "group": token.group, "tags": token.tags, "product": req.product}),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            credential: format!("{}:{secret}", req.device_id),
            device_id: req.device_id,
            server_key: crate::public_key(&server).to_hex(),
            group: token.group,
        }),
    ))
}

/// Everything an enrolment must satisfy before it uses the token up.
fn check_enrolment(token: &EnrollTokenView, expires_at: i64, req: &EnrollRequest) -> ApiResult<()> {
    if token.revoked_at.is_some() {
        return Err(ApiError::forbidden(format!(
            "the enrolment token {} was revoked",
            token.id
        )));
    }
    if expires_at <= now_ms() {
        return Err(ApiError::forbidden(format!(
            "the enrolment token expired at {}",
            token.expires_at
        )));
    }
    if !valid_device_id(&req.device_id) {
        return Err(ApiError::bad_request(format!(
            "device_id {:?}: expected 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit, without ..",
            req.device_id
        )));
    }
    if !token.device_ids.is_empty() && !token.device_ids.contains(&req.device_id) {
        return Err(ApiError::forbidden(format!(
            "the enrolment token {} does not enrol device {}",
            token.id, req.device_id
        )));
    }
    if let Some(p) = token
        .device_id_pattern
        .as_deref()
        .filter(|p| !id_matches(p, &req.device_id))
    {
        return Err(ApiError::forbidden(format!(
            "device id {} does not match the enrolment token's pattern {p}",
            req.device_id
        )));
    }
    if let Some(g) = req.group.as_deref().filter(|g| *g != token.group) {
        return Err(ApiError::forbidden(format!(
            "this token enrols into group {}, not {g}",
            token.group
        )));
    }
    Name::parse("product", &req.product, 64)
        .map_err(|e| ApiError::bad_request(format!("product: {e}")))?;
    if let Some(p) = token.product.as_deref().filter(|p| *p != req.product) {
        return Err(ApiError::forbidden(format!(
            "the enrolment token enrols product {p}, not {}",
            req.product
        )));
    }
    if req.compatible.is_empty() || req.compatible.len() > 16 {
        return Err(ApiError::bad_request(
            "compatible: expected 1 to 16 hardware ids",
        ));
    }
    for c in &req.compatible {
        HardwareId::parse("compatible", c, 64)
            .map_err(|e| ApiError::bad_request(format!("compatible: {e}")))?;
    }
    if let Some(t) = req.tags.iter().find(|t| !token.tags.contains(t)) {
        return Err(ApiError::forbidden(format!(
            "tag {t:?}: a device's tags come from its enrolment token ({})",
            if token.tags.is_empty() {
                "none".to_owned()
            } else {
                token.tags.join(", ")
            }
        )));
    }
    Ok(())
}

/// A device's inventory from its latest check-in, not yet written.
#[derive(Debug, Clone)]
struct Seen {
    at: i64,
    version: String,
    booted: Option<String>,
    good: Option<String>,
    state: abide_fleet_json::DeviceState,
    health: Option<abide_fleet_json::Health>,
    progress: Option<abide_fleet_json::Progress>,
}

/// What each device has of applications and the agent (the JSON of its check-in's `apps` and
/// `agent`), as this process last stored or read it: a change is stored at once, and the
/// device joins the unfinished rollouts of application and agent releases it now qualifies
/// for.
#[derive(Debug, Default)]
pub struct Inventories(Mutex<HashMap<String, Inventory>>);

/// The JSON of a check-in's `apps` (none when empty) and `agent`.
type Inventory = (Option<String>, Option<String>);

/// Stores the device's applications and agent if they changed, and puts it into the unfinished
/// rollouts it now qualifies for. A check-in that names no agent (the boot step's `fleet`
/// check, a simulated device) says nothing of them and changes nothing.
async fn keep_inventory(server: &Server, id: &str, req: &CheckinRequest) -> ApiResult<()> {
    if req.agent.is_none() && req.apps.is_empty() {
        return Ok(());
    }
    let apps =
        (!req.apps.is_empty()).then(|| serde_json::to_string(&req.apps).expect("plain data"));
    let agent = req
        .agent
        .as_ref()
        .map(|a| serde_json::to_string(a).expect("plain data"));
    let now = (apps, agent);
    let known = server
        .inventories
        .0
        .lock()
        .expect("not poisoned")
        .get(id)
        .cloned();
    // After a start, what is stored stands for what this process knew.
    let known = match known {
        Some(k) => k,
        None => sqlx::query_as::<_, Inventory>("SELECT apps, agent FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&server.db.read)
            .await?
            .unwrap_or_default(),
    };
    if known != now {
        let mut tx = server.db.pool.begin().await?;
        sqlx::query("UPDATE devices SET apps = $2, agent = $3 WHERE id = $1")
            .bind(id)
            .bind(&now.0)
            .bind(&now.1)
            .execute(&mut *tx)
            .await?;
        crate::rollouts::enrol_device(&mut tx, id).await?;
        tx.commit().await?;
    }
    server
        .inventories
        .0
        .lock()
        .expect("not poisoned")
        .insert(id.to_owned(), now);
    Ok(())
}

/// Check-ins waiting to be written, by device.
#[derive(Debug, Default)]
pub struct LastSeen(Mutex<HashMap<String, Seen>>);

impl LastSeen {
    /// The check-ins not yet written, for reads that show them without writing them.
    fn snapshot(&self) -> HashMap<String, Seen> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// The health of `devices` (id, health as written), with this process's check-ins not yet
/// written laid over them: what a read shows without writing anything.
pub fn health_now(server: &Server, devices: Vec<(String, Option<String>)>) -> Vec<Option<String>> {
    let pending = server.last_seen.snapshot();
    devices
        .into_iter()
        .map(|(id, health)| match pending.get(&id) {
            Some(seen) => seen.health.map(|h| h.as_str().to_owned()),
            None => health,
        })
        .collect()
}

/// Writes the pending check-ins in one transaction.
pub async fn flush_last_seen(server: &Server) -> ApiResult<usize> {
    let pending: Vec<(String, Seen)> = {
        let mut map = server.last_seen.0.lock().expect("not poisoned");
        map.drain().collect()
    };
    if pending.is_empty() {
        return Ok(0);
    }
    let mut tx = server.db.pool.begin().await?;
    let mut gone = Vec::new();
    for (id, s) in &pending {
        let updated = sqlx::query(
            "UPDATE devices SET last_seen = $2, version = $3, booted = $4, good = $5, health = $6, \
             state = CASE WHEN last_seq = 0 THEN $7 ELSE state END, progress = $8 WHERE id = $1",
        )
        .bind(id)
        .bind(s.at)
        .bind(&s.version)
        .bind(&s.booted)
        .bind(&s.good)
        .bind(s.health.map(|h| h.as_str()))
        .bind(s.state.as_str())
        .bind(
            s.progress
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("plain data")),
        )
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            gone.push(id);
        }
    }
    tx.commit().await?;
    // A device no longer in the database is no longer authenticated from the cache.
    for id in gone {
        crate::auth::forget_device(server, id);
    }
    Ok(pending.len())
}

/// Writes pending check-ins every half second, for as long as the server runs.
pub async fn flush_last_seen_forever(server: Server) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if let Err(e) = flush_last_seen(&server).await {
            tracing::error!(error = %e.message, "writing last-seen times");
        }
    }
}

fn check_inventory(req: &CheckinRequest) -> ApiResult<()> {
    if !(16..=64).contains(&req.nonce.len()) || !req.nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(
            "nonce: expected 16 to 64 hex digits, fresh for each check-in",
        ));
    }
    if !valid_label(&req.version, 64) {
        return Err(ApiError::bad_request(format!(
            "version {:?}: not a version",
            req.version
        )));
    }
    if let Some(p) = &req.progress
        && (!valid_label(&p.release_id, 64) || p.bytes > p.total)
    {
        return Err(ApiError::bad_request(
            "progress: expected a release id and bytes no more than total",
        ));
    }
    for app in &req.apps {
        if !valid_label(&app.name, 64)
            || app.version.as_deref().is_some_and(|v| !valid_label(v, 64))
        {
            return Err(ApiError::bad_request(format!(
                "apps: {:?} is not an application name and version",
                app.name
            )));
        }
    }
    if req
        .agent
        .as_ref()
        .is_some_and(|a| !valid_label(&a.version, 64))
    {
        return Err(ApiError::bad_request("agent.version: not a version"));
    }
    for (field, v) in [("booted", &req.booted), ("good", &req.good)] {
        if let Some(v) = v.as_deref().filter(|v| !valid_label(v, 32)) {
            return Err(ApiError::bad_request(format!(
                "{field} {v:?}: expected a short name"
            )));
        }
    }
    Ok(())
}

/// `POST /api/v1/device/checkin`: records the inventory (coalesced) and answers the device's
/// assignment, signed, bound to its id and nonce, valid for a few minutes.
pub async fn checkin(
    State(server): State<Server>,
    crate::auth::EnrolledDevice(id): crate::auth::EnrolledDevice,
    body: Bytes,
) -> ApiResult<Json<SignedAssignment>> {
    let req: CheckinRequest = parse_json(&body)?;
    check_inventory(&req)?;
    if let Some(head) = &req.audit_head {
        crate::audit::check_device_head(head)?;
        crate::audit::keep_device_head(&server, &id, head).await?;
    }
    keep_inventory(&server, &id, &req).await?;
    let now = now_ms();
    server.last_seen.0.lock().expect("not poisoned").insert(
        id.clone(),
        Seen {
            at: now,
            version: req.version.clone(),
            booted: req.booted.clone(),
            good: req.good.clone(),
            state: req.state,
            health: req.health,
            progress: req.progress.clone(),
        },
    );
    server
        .counters
        .checkins
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let release = crate::rollouts::assignment(&server, &id, &req, now).await?;
    let window = crate::groups::window_of_device(&server, &id).await?;
    let trust = match req.trust_version {
        Some(v) => crate::trust::after(&server, v).await?,
        None => Vec::new(),
    };
    let assignment = Assignment {
        device_id: id,
        nonce: req.nonce,
        issued_at: rfc3339(now),
        expires_at: rfc3339(now + server.config.assignment_ttl * 1000),
        release,
        window,
        trust,
        poll_seconds: server.config.device_poll,
    };
    Ok(Json(sign(&server, &assignment)))
}

/// Signs an assignment.
pub fn sign(server: &Server, assignment: &Assignment) -> SignedAssignment {
    let payload = serde_json::to_string(assignment).expect("plain data serializes");
    let signature = server
        .signing
        .sign(abide_fleet_json::ASSIGNMENT_DOMAIN, payload.as_bytes());
    SignedAssignment {
        payload,
        signature: abide_bundle::digest::encode_hex(&signature),
        key_id: server.signing.public().id().to_string(),
    }
}

/// `POST /api/v1/device/report`.
pub async fn report(
    State(server): State<Server>,
    crate::auth::EnrolledDevice(id): crate::auth::EnrolledDevice,
    body: Bytes,
) -> ApiResult<Json<ReportResponse>> {
    let req: ReportRequest = parse_json(&body)?;
    if req.seq == 0 || req.seq > i64::MAX as u64 {
        return Err(ApiError::bad_request("seq: expected 1 or more"));
    }
    let needs_reason = req.status.needs_reason();
    match req.reason.as_deref() {
        None | Some("") if needs_reason => {
            return Err(ApiError::bad_request(format!(
                "a {} report needs a reason",
                req.status
            )));
        }
        Some(r) if r.len() > 1024 => {
            return Err(ApiError::bad_request("reason: at most 1024 bytes"));
        }
        _ => {}
    }
    for (field, v) in [
        ("release_id", &req.release_id),
        ("rollout_id", &req.rollout_id),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !valid_label(v, 64)) {
            return Err(ApiError::bad_request(format!("{field} {v:?}: not an id")));
        }
    }
    if req.seconds.is_some_and(|s| !(0.0..=1e7).contains(&s)) {
        return Err(ApiError::bad_request("seconds: expected 0 to 10^7"));
    }
    // A report is about a release a rollout gave this device (its own, or in a fleet-wide
    // rollback the one it ran before), or about none: anything else is refused, so no report
    // can set a version the device was not given.
    if req.release_id.is_some() || req.rollout_id.is_some() {
        let (Some(release), Some(rollout)) = (&req.release_id, &req.rollout_id) else {
            return Err(ApiError::bad_request(
                "release_id and rollout_id: give both or neither",
            ));
        };
        if !crate::rollouts::gives(&server, &id, release, Some(rollout)).await? {
            return Err(ApiError::conflict(format!(
                "release {release} was not assigned to device {id} by rollout {rollout}"
            )));
        }
    }
    let seq = req.seq as i64;
    let mut tx = server.db.pool.begin().await?;
    let row: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT last_seq FROM devices WHERE id = $1{}",
        server.db.for_update()
    )))
    .bind(&id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((last_seq,)) = row else {
        return Err(crate::auth::forget_device(&server, &id));
    };
    let inserted = sqlx::query(
        "INSERT INTO reports (device_id, seq, status, release_id, rollout_id, reason, millis, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (device_id, seq) DO NOTHING",
    )
    .bind(&id)
    .bind(seq)
    .bind(req.status.as_str())
    .bind(&req.release_id)
    .bind(&req.rollout_id)
    .bind(&req.reason)
    // Milliseconds as an integer: the same column type on both databases.
    .bind(req.seconds.map(|s| (s * 1000.0).round() as i64))
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(Json(ReportResponse {
            seq: req.seq,
            outcome: "duplicate".into(),
        }));
    }
    if seq > last_seq {
        sqlx::query("UPDATE devices SET state = $2, reason = $3, last_seq = $4 WHERE id = $1")
            .bind(&id)
            .bind(req.status.as_str())
            .bind(&req.reason)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        // A committed OS release is what the device runs now (an application's or the
        // agent's is in its next check-in's inventory).
        if let (Some(release), ReportStatus::Committed) = (&req.release_id, req.status) {
            sqlx::query(
                "UPDATE devices SET version = (SELECT version FROM releases WHERE id = $2) \
                 WHERE id = $1 AND EXISTS (SELECT 1 FROM releases WHERE id = $2 AND kind = 'os')",
            )
            .bind(&id)
            .bind(release)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(rollout) = &req.rollout_id {
            crate::rollouts::on_report(
                &mut tx,
                &id,
                rollout,
                req.release_id.as_deref(),
                req.status,
                req.reason.as_deref(),
                now_ms(),
            )
            .await?;
        }
    }
    // A device that rolled a release back is never offered it again (an older report,
    // replayed, changes nothing but the record).
    if let (true, Some(release), ReportStatus::RolledBack) =
        (seq > last_seq, &req.release_id, req.status)
    {
        sqlx::query(
            "INSERT INTO quarantine (device_id, release_id, at) VALUES ($1, $2, $3) \
             ON CONFLICT (device_id, release_id) DO NOTHING",
        )
        .bind(&id)
        .bind(release)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    }
    crate::audit::append(
        &server,
        &mut tx,
        &format!("device:{id}"),
        "device.report",
        serde_json::json!({"seq": req.seq, "status": req.status, "release": req.release_id,
                           "rollout": req.rollout_id, "reason": req.reason, "current": seq > last_seq}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(ReportResponse {
        seq: req.seq,
        outcome: "recorded".into(),
    }))
}

/// Enrolled devices by state as last written (at most half a second old), on the read
/// connections: what `/metrics` and the web page show, without touching the writer.
pub async fn count_by_state_read(server: &Server) -> ApiResult<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, COUNT(*) FROM devices GROUP BY state ORDER BY state")
            .fetch_all(&server.db.read)
            .await?,
    )
}

/// Filters of the device list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Only this group.
    pub group: Option<String>,
    /// Only this state.
    pub state: Option<String>,
}

/// A row of `devices` as the list reads it.
struct DeviceRow {
    id: String,
    group: String,
    tags: String,
    product: String,
    version: Option<String>,
    state: String,
    reason: Option<String>,
    booted: Option<String>,
    health: Option<String>,
    last_seen: Option<i64>,
    progress: Option<String>,
    revoked_at: Option<i64>,
    last_seq: i64,
    audit_head: Option<String>,
    /// JSON of its check-in's `apps`.
    apps: Option<String>,
    /// JSON of its check-in's `agent`.
    agent: Option<String>,
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for DeviceRow {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(DeviceRow {
            id: row.try_get("id")?,
            group: row.try_get("grp")?,
            tags: row.try_get("tags")?,
            product: row.try_get("product")?,
            version: row.try_get("version")?,
            state: row.try_get("state")?,
            reason: row.try_get("reason")?,
            booted: row.try_get("booted")?,
            health: row.try_get("health")?,
            last_seen: row.try_get("last_seen")?,
            progress: row.try_get("progress")?,
            revoked_at: row.try_get("revoked_at")?,
            last_seq: row.try_get("last_seq")?,
            audit_head: row.try_get("audit_head")?,
            apps: row.try_get("apps")?,
            agent: row.try_get("agent")?,
        })
    }
}

/// `GET /api/v1/devices?group=G&state=S` (viewer).
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Query(filter): Query<Filter>,
) -> ApiResult<Json<Vec<abide_fleet_json::DeviceView>>> {
    // A read writes nothing: check-ins not yet written are laid over the rows, on the read
    // connections.
    let pending = server.last_seen.snapshot();
    let rows: Vec<DeviceRow> = sqlx::query_as(
        "SELECT id, grp, tags, product, version, state, reason, booted, health, last_seen, progress, revoked_at, last_seq, audit_head, apps, agent FROM devices \
         WHERE ($1 = '' OR grp = $1) ORDER BY id",
    )
    .bind(filter.group.unwrap_or_default())
    .fetch_all(&server.db.read)
    .await?;
    let mut devices = Vec::with_capacity(rows.len());
    for mut row in rows {
        let name = format!("devices {}", row.id);
        let tags = crate::db::json_column(&name, "tags", &row.tags)?;
        let mut progress = row
            .progress
            .map(|p| crate::db::json_column(&name, "progress", &p))
            .transpose()?;
        let audit_head = row
            .audit_head
            .map(|h| crate::db::json_column(&name, "audit_head", &h))
            .transpose()?;
        let apps = row
            .apps
            .map(|a| crate::db::json_column(&name, "apps", &a))
            .transpose()?
            .unwrap_or_default();
        let agent = row
            .agent
            .map(|a| crate::db::json_column(&name, "agent", &a))
            .transpose()?;
        if let Some(seen) = pending.get(&row.id) {
            // As `flush_last_seen` will write it.
            row.last_seen = Some(seen.at);
            row.version = Some(seen.version.clone());
            row.booted.clone_from(&seen.booted);
            row.health = seen.health.map(|h| h.as_str().to_owned());
            progress.clone_from(&seen.progress);
            if row.last_seq == 0 {
                row.state = seen.state.as_str().to_owned();
            }
        }
        if filter.state.as_deref().is_some_and(|s| s != row.state) {
            continue;
        }
        devices.push(abide_fleet_json::DeviceView {
            id: row.id,
            group: row.group,
            tags,
            product: row.product,
            version: row.version,
            state: row.state,
            reason: row.reason,
            booted: row.booted,
            health: row.health,
            last_seen: row.last_seen.map(rfc3339),
            progress,
            revoked_at: row.revoked_at.map(rfc3339),
            audit_head,
            apps,
            agent,
        });
    }
    Ok(Json(devices))
}

/// `POST /api/v1/devices/{id}/revoke` (operator): the device's credential stops working (in
/// every server process within seconds), its reboot lease is given back; its record stays, and
/// its id cannot be enrolled again.
pub async fn revoke(
    State(server): State<Server>,
    caller: crate::auth::Operator,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Json<abide_fleet_json::DeviceRevoked>> {
    let mut tx = server.db.pool.begin().await?;
    let changed = crate::db::revoke(&mut tx, crate::db::Revocable::Device, &id).await?;
    let row: Option<(Option<i64>,)> =
        sqlx::query_as("SELECT revoked_at FROM devices WHERE id = $1")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((Some(revoked_at),)) = row else {
        return Err(ApiError::not_found(format!("no device {id}")));
    };
    if changed {
        sqlx::query("DELETE FROM leases WHERE device_id = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        crate::audit::append(
            &server,
            &mut tx,
            &caller.actor,
            "device.revoke",
            serde_json::json!({"device": id}),
        )
        .await?;
    }
    tx.commit().await?;
    server
        .credentials
        .write()
        .expect("not poisoned")
        .remove(&id);
    Ok(Json(abide_fleet_json::DeviceRevoked {
        id,
        revoked_at: rfc3339(revoked_at),
    }))
}
