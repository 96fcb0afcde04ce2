//! Releases: bundles uploaded by the admin, verified against the fleet trust root before they
//! are accepted, stored under their SHA-256 (`DATA/releases/SHA256.abide`: no name from a
//! request ever becomes a path), and served with HTTP Range.

use std::io::SeekFrom;

use abide_bundle::{BundleReader, ExpirationEnforcement, Limits, Policy, Stream};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult};

/// A row of `releases`.
struct Row {
    id: String,
    sha256: String,
    product: String,
    version: String,
    security_version: i64,
    /// A JSON array of strings.
    compatible: String,
    size: i64,
    created_at: i64,
    /// `os`, `app` or `agent`.
    kind: String,
    /// The application, for an application release.
    app: Option<String>,
}

/// The columns of a [`Row`], in the order [`Row::insert`] binds them.
const COLUMNS: &str =
    "id, sha256, product, version, security_version, compatible, size, created_at, kind, app";

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Row {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(Row {
            id: row.try_get("id")?,
            sha256: row.try_get("sha256")?,
            product: row.try_get("product")?,
            version: row.try_get("version")?,
            security_version: row.try_get("security_version")?,
            compatible: row.try_get("compatible")?,
            size: row.try_get("size")?,
            created_at: row.try_get("created_at")?,
            kind: row.try_get("kind")?,
            app: row.try_get("app")?,
        })
    }
}

impl Row {
    /// Inserts the row unless its id is taken; whether it was inserted.
    async fn insert(&self, tx: &mut sqlx::Transaction<'static, sqlx::Any>) -> sqlx::Result<bool> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO releases ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING"
        )))
        .bind(&self.id)
        .bind(&self.sha256)
        .bind(&self.product)
        .bind(&self.version)
        .bind(self.security_version)
        .bind(&self.compatible)
        .bind(self.size)
        .bind(self.created_at)
        .bind(&self.kind)
        .bind(&self.app)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl TryFrom<Row> for abide_fleet_json::Release {
    type Error = sqlx::Error;
    fn try_from(row: Row) -> Result<Self, sqlx::Error> {
        let compatible = crate::db::json_column(
            &format!("release {}", row.id),
            "compatible",
            &row.compatible,
        )?;
        let kind = abide_fleet_json::ReleaseKind::parse(&row.kind).ok_or_else(|| {
            sqlx::Error::Decode(format!("release {}: kind {:?}", row.id, row.kind).into())
        })?;
        Ok(abide_fleet_json::Release {
            id: row.id,
            product: row.product,
            version: row.version,
            security_version: row.security_version as u64,
            compatible,
            size: row.size as u64,
            sha256: row.sha256,
            created_at: rfc3339(row.created_at),
            kind,
            app: row.app,
        })
    }
}

/// The release `id`, if there is one.
pub async fn find(server: &Server, id: &str) -> ApiResult<Option<abide_fleet_json::Release>> {
    Ok(find_with(&server.db.pool, id).await?)
}

/// The release `id`, read inside a transaction.
pub async fn find_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &str,
) -> Result<Option<abide_fleet_json::Release>, sqlx::Error> {
    find_with(&mut **tx, id).await
}

async fn find_with<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    e: E,
    id: &str,
) -> Result<Option<abide_fleet_json::Release>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM releases WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(e)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// The `limit` newest releases, newest first.
pub async fn newest(
    pool: &sqlx::AnyPool,
    limit: i64,
) -> Result<Vec<abide_fleet_json::Release>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM releases ORDER BY created_at DESC, id LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// `GET /api/v1/server-key`: the assignment-signing public key (devices pin it).
pub async fn server_key(State(server): State<Server>) -> Json<abide_fleet_json::ServerKey> {
    let key = crate::public_key(&server);
    Json(abide_fleet_json::ServerKey {
        key: key.to_hex(),
        key_id: key.id().to_string(),
    })
}

/// Removes a temporary file when dropped, unless it was kept.
pub(crate) struct TempFile(pub(crate) Option<std::path::PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes an upload's body (a `what`: bundle or delta) to a temporary file in `DATA/tmp`,
/// bounded by the largest bundle the server accepts, and fsyncs it; returns the file's guard
/// (it is removed unless kept), its path, its SHA-256 and its size.
pub(crate) async fn receive(
    server: &Server,
    mut body: Body,
    what: &str,
) -> ApiResult<(TempFile, std::path::PathBuf, String, u64)> {
    let tmp_path = server
        .config
        .data
        .join("tmp")
        .join(format!("upload-{}", crate::random_hex(12)));
    let guard = TempFile(Some(tmp_path.clone()));
    let mut file = tokio::fs::File::create(&tmp_path)
        .await
        .map_err(|e| ApiError::internal("creating the upload file", e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        size += data.len() as u64;
        if size > server.config.max_bundle {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "the {what} is larger than this server accepts ({} bytes)",
                    server.config.max_bundle
                ),
            ));
        }
        hasher.update(&data);
        file.write_all(&data)
            .await
            .map_err(|e| ApiError::internal("writing the upload", e))?;
    }
    if size == 0 {
        return Err(ApiError::bad_request(format!(
            "the request body is empty: send the {what} file"
        )));
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal("writing the upload", e))?;
    let file = file.into_std().await;
    let synced = tmp_path.clone();
    tokio::task::spawn_blocking(move || abide_fs::persist::fsync(&file, &synced))
        .await
        .map_err(|e| ApiError::internal("syncing the upload", e))?
        .map_err(|e| ApiError::internal("syncing the upload", e))?;
    let sha256 = abide_bundle::digest::encode_hex(&hasher.finalize());
    Ok((guard, tmp_path, sha256, size))
}

/// `POST /api/v1/releases`: the body is a bundle. It is written to a temporary file while its
/// SHA-256 is computed, fsynced, verified completely (signatures against the trust root, every
/// chunk and digest), then renamed to its content address and recorded. A refused bundle gets
/// 422 with the verification's code and leaves nothing behind.
pub async fn upload(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    body: Body,
) -> ApiResult<(StatusCode, Json<abide_fleet_json::Release>)> {
    let (mut guard, tmp_path, sha256, size) = receive(&server, body, "bundle").await?;
    let verify_path = tmp_path.clone();
    let trust = crate::trust::current(&server).await?;
    let checked = {
        tokio::task::spawn_blocking(
            move || -> Result<abide_bundle::Manifest, abide_bundle::Error> {
                let file = std::fs::File::open(&verify_path).map_err(|source| {
                    abide_bundle::Error::Io {
                        what: "reading the upload",
                        source,
                    }
                })?;
                let policy = Policy {
                    trust: &trust,
                    now: jiff::Timestamp::now(),
                    expiration: ExpirationEnforcement::Safe,
                    compatible: None,
                    min_security_version: 0,
                };
                let mut bundle = BundleReader::open(
                    Stream(std::io::BufReader::with_capacity(1 << 20, file)),
                    Limits::default(),
                )?
                .verify(&policy)?;
                // Every hash, once, here: devices check only the signed stored bytes, so a
                // writer's bug (content that does not match its chunk's name or its component's
                // digest) is caught before a fleet installs it.
                bundle.set_checks(abide_bundle::chunks::Checks::Every);
                bundle.verify_rest()?;
                Ok(bundle.manifest().clone())
            },
        )
        .await
        .map_err(|e| ApiError::internal("verifying the upload", e))?
    };
    let manifest = checked.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("the bundle was refused: {e}"),
        )
    })?;
    let id = format!("r-{}", &sha256[..16]);
    if let Some(existing) = find(&server, &id).await? {
        return Err(ApiError::conflict(format!(
            "this bundle is already release {} ({} {})",
            existing.id, existing.product, existing.version
        )));
    }
    let target = server
        .config
        .data
        .join("releases")
        .join(format!("{sha256}.abide"));
    tokio::fs::rename(&tmp_path, &target)
        .await
        .map_err(|e| ApiError::internal("storing the bundle", e))?;
    guard.0 = None;
    abide_fs::persist::sync_dir(&server.config.data.join("releases"))
        .map_err(|e| ApiError::internal("storing the bundle", e))?;
    let compatible: Vec<String> = manifest
        .compatible
        .iter()
        .map(ToString::to_string)
        .collect();
    let (kind, app) = abide_core::fleet::release_kind(&manifest);
    let row = Row {
        kind: kind.as_str().to_owned(),
        app,
        id: id.clone(),
        sha256: sha256.clone(),
        product: manifest.product.to_string(),
        version: manifest.version.to_string(),
        security_version: manifest.security_version as i64,
        compatible: serde_json::to_string(&compatible).expect("strings serialize"),
        size: size as i64,
        created_at: now_ms(),
    };
    let mut tx = server.db.pool.begin().await?;
    if !row.insert(&mut tx).await? {
        return Err(ApiError::conflict(format!(
            "this bundle is already release {id}"
        )));
    }
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "release.upload",
        serde_json::json!({"release": id, "product": row.product, "version": row.version, "sha256": sha256, "size": size}),
    )
    .await?;
    tx.commit().await?;
    if server.config.deltas_on_upload {
        tokio::spawn(crate::deltas::for_running(
            server.clone(),
            id,
            row.product.clone(),
        ));
    }
    Ok((StatusCode::CREATED, Json(row.try_into()?)))
}

/// `GET /api/v1/releases`.
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<Vec<abide_fleet_json::Release>>> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM releases ORDER BY created_at, id"
    )))
    .fetch_all(&server.db.pool)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(TryInto::try_into)
            .collect::<Result<_, _>>()?,
    ))
}

/// `GET /api/v1/releases/{id}`.
pub async fn show(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<abide_fleet_json::Release>> {
    find(&server, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no release {id}")))
}

/// A `Range` header that names no single range inside the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRange;

/// A single byte range of a `size`-byte file: `Ok(None)` for the whole file.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, BadRange> {
    let Some(h) = header else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(BadRange)?;
    if spec.contains(',') {
        return Err(BadRange);
    }
    let (a, b) = spec.split_once('-').ok_or(BadRange)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| BadRange);
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(BadRange);
            }
            (size.saturating_sub(n), size.checked_sub(1).ok_or(BadRange)?)
        }
        (false, true) => (num(a)?, size.checked_sub(1).ok_or(BadRange)?),
        (false, false) => (num(a)?, num(b)?.min(size.saturating_sub(1))),
        (true, true) => return Err(BadRange),
    };
    if start > end || start >= size {
        return Err(BadRange);
    }
    Ok(Some((start, end)))
}

/// `GET /api/v1/releases/{id}/bundle`, for the admin or any enrolled device, with
/// `Range: bytes=A-B` (one range) answered 206, and 416 for a range outside the file.
pub async fn download(
    State(server): State<Server>,
    headers: HeaderMap,
    peer: Option<axum::Extension<crate::tls::PeerIdentity>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let device = if crate::auth::caller(&server, &headers).await.is_err() {
        Some(crate::auth::device(&server, &headers, peer.as_deref()).await?)
    } else {
        None
    };
    let rel = find(&server, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {id}")))?;
    // A device gets only what a rollout gives it: its release, or in a fleet-wide rollback
    // the release it ran before.
    if let Some(device) = device {
        if !crate::rollouts::gives(&server, &device, &rel.id, None).await? {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not-assigned",
                format!("release {} is not assigned to device {device}", rel.id),
            ));
        }
    }
    let path = server
        .config
        .data
        .join("releases")
        .join(format!("{}.abide", rel.sha256));
    serve(&path, rel.size, &rel.sha256, &headers, "bundle").await
}

/// Answers a download of the `size`-byte file at `path` (a bundle or a delta, `what`), whole
/// or one `Range`, with its SHA-256 as the ETag.
pub async fn serve(
    path: &std::path::Path,
    size: u64,
    sha256: &str,
    headers: &HeaderMap,
    what: &str,
) -> ApiResult<Response> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| {
        ApiError::internal(
            "opening a stored file (server processes that share a database must share the data directory)",
            format!("{}: {e}", path.display()),
        )
    })?;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = parse_range(range, size).map_err(|BadRange| {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range",
            format!("expected one range inside the {size}-byte {what}, as bytes=START-END"),
        )
    });
    let range = match range {
        Ok(r) => r,
        Err(e) => {
            let mut resp = e.into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            return Ok(resp);
        }
    };
    let (status, start, len) = match range {
        None => (StatusCode::OK, 0, size),
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
    };
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::internal("reading a stored file", e))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.abide.bundle"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{sha256}\"")).expect("hex"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {}-{}/{size}", start, start + len - 1))
                .expect("ascii"),
        );
    }
    Ok(resp)
}
