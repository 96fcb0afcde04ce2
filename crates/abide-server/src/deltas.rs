//! Deltas between releases: made by the server from two releases it holds (on request, and
//! after each upload from every release its devices run), stored under their SHA-256
//! (`DATA/deltas/SHA256.abide`), offered in a device's assignment when it runs the old release
//! and the delta is smaller than both the full bundle and the chunks it lacks (from the signed
//! sizes), and served with HTTP Range.
//!
//! A delta needs no key: its head is the new bundle's signed head, and a device checks every
//! chunk it writes against the new release's signed chunk names (docs/bundle-format.md).

use abide_bundle::delta_write::DeltaOptions;
use abide_bundle::{BundleReader, Limits, Stream};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult};

/// A row of `deltas`, with the two releases' versions and the new bundle's size.
struct Row {
    from_release: String,
    from_version: String,
    to_release: String,
    to_version: String,
    sha256: String,
    size: i64,
    full_size: i64,
    chunks_size: i64,
    created_at: i64,
}

const SELECT: &str = "SELECT d.from_release, f.version AS from_version, d.to_release, t.version AS to_version, \
     d.sha256, d.size, t.size AS full_size, d.chunks_size, d.created_at \
     FROM deltas d JOIN releases f ON f.id = d.from_release JOIN releases t ON t.id = d.to_release";

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Row {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(Row {
            from_release: row.try_get("from_release")?,
            from_version: row.try_get("from_version")?,
            to_release: row.try_get("to_release")?,
            to_version: row.try_get("to_version")?,
            sha256: row.try_get("sha256")?,
            size: row.try_get("size")?,
            full_size: row.try_get("full_size")?,
            chunks_size: row.try_get("chunks_size")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

impl Row {
    /// Offered to a device running the old release only when it is the smallest download.
    fn offered(&self) -> bool {
        self.size < self.full_size && self.size < self.chunks_size
    }
}

impl From<Row> for abide_fleet_json::Delta {
    fn from(row: Row) -> Self {
        abide_fleet_json::Delta {
            offered: row.offered(),
            from_release: row.from_release,
            from_version: row.from_version,
            to_release: row.to_release,
            to_version: row.to_version,
            sha256: row.sha256,
            size: row.size as u64,
            full_size: row.full_size as u64,
            chunks_size: row.chunks_size as u64,
            created_at: rfc3339(row.created_at),
        }
    }
}

async fn find(server: &Server, from: &str, to: &str) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE d.from_release = $1 AND d.to_release = $2"
    )))
    .bind(from)
    .bind(to)
    .fetch_optional(&server.db.pool)
    .await
}

/// The delta a device running `version` is given with release `to`, if one is the smallest
/// download.
pub async fn offer(
    server: &Server,
    to: &str,
    version: &str,
) -> Result<Option<abide_fleet_json::AssignedDelta>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE d.to_release = $1 AND f.version = $2 ORDER BY d.size"
    )))
    .bind(to)
    .bind(version)
    .fetch_all(&server.db.read)
    .await?;
    Ok(rows
        .into_iter()
        .find(Row::offered)
        .map(|r| abide_fleet_json::AssignedDelta {
            url: format!(
                "/api/v1/releases/{}/deltas/{}",
                r.to_release, r.from_release
            ),
            from_version: r.from_version,
            sha256: r.sha256,
            size: r.size as u64,
        }))
}

/// Makes (or finds) the delta from release `from` to release `to`, both held by the server;
/// `actor` is recorded in the audit trail.
pub async fn make(
    server: &Server,
    from: &str,
    to: &str,
    actor: &str,
) -> ApiResult<abide_fleet_json::Delta> {
    if let Some(row) = find(server, from, to).await? {
        return Ok(row.into());
    }
    let (Some(old), Some(new)) = (
        crate::releases::find(server, from).await?,
        crate::releases::find(server, to).await?,
    ) else {
        return Err(ApiError::not_found(format!(
            "release {from} or {to} is not on this server"
        )));
    };
    if old.id == new.id || old.product != new.product {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta-releases",
            format!(
                "a delta goes between two releases of one product: {} is {} {}, {} is {} {}",
                old.id, old.product, old.version, new.id, new.product, new.version
            ),
        ));
    }
    let data = server.config.data.clone();
    let (old_sha, new_sha) = (old.sha256.clone(), new.sha256.clone());
    let (sha256, stats) = tokio::task::spawn_blocking(move || build(&data, &old_sha, &new_sha))
        .await
        .map_err(|e| ApiError::internal("making a delta", e))??;
    record(
        server,
        Stored {
            from: &old.id,
            to: &new.id,
            sha256: &sha256,
            size: stats.size,
            chunks_size: stats.chunks_size,
        },
        actor,
        "delta.create",
    )
    .await?;
    find(server, &old.id, &new.id)
        .await?
        .map(Into::into)
        .ok_or_else(|| ApiError::internal("making a delta", "the row is not there"))
}

/// A delta file stored in `DATA/deltas`, to be recorded.
struct Stored<'a> {
    from: &'a str,
    to: &'a str,
    sha256: &'a str,
    size: u64,
    chunks_size: u64,
}

/// Records a stored delta and its audit entry (`action`, by `actor`) in one transaction;
/// whether it was new (a delta for the pair already there is left as it is).
async fn record(server: &Server, d: Stored<'_>, actor: &str, action: &str) -> ApiResult<bool> {
    let mut tx = server.db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO deltas (from_release, to_release, sha256, size, chunks_size, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (from_release, to_release) DO NOTHING",
    )
    .bind(d.from)
    .bind(d.to)
    .bind(d.sha256)
    .bind(d.size as i64)
    .bind(d.chunks_size as i64)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    let new = inserted.rows_affected() == 1;
    if new {
        crate::audit::append(
            server,
            &mut tx,
            actor,
            action,
            serde_json::json!({"from": d.from, "to": d.to, "sha256": d.sha256, "size": d.size,
                               "chunks_size": d.chunks_size}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(new)
}

/// Makes the delta between the stored bundles `old` and `new` (by SHA-256) into
/// `DATA/deltas/SHA256.abide`; returns its SHA-256 and what it holds. Both bundles passed
/// every check on upload; the spools and the partial delta are removed whatever happens.
fn build(
    data: &std::path::Path,
    old: &str,
    new: &str,
) -> ApiResult<(String, abide_bundle::delta_write::DeltaStats)> {
    let fail = |what: &'static str| move |e: std::io::Error| ApiError::internal(what, e);
    let open = |sha: &str| -> ApiResult<_> {
        let path = data.join("releases").join(format!("{sha}.abide"));
        let file = std::fs::File::open(&path).map_err(fail("opening a stored bundle"))?;
        let reader = BundleReader::open(
            Stream(std::io::BufReader::with_capacity(1 << 20, file)),
            Limits::default(),
        )
        .map_err(|e| ApiError::internal("reading a stored bundle", e))?;
        let head = reader.head_bytes();
        let bundle = reader
            .without_signatures()
            .map_err(|e| ApiError::internal("reading a stored bundle", e))?;
        Ok((bundle, head))
    };
    let tmp = data.join("tmp");
    let mut temps = Vec::new();
    let temp = |temps: &mut Vec<crate::releases::TempFile>| {
        let path = tmp.join(format!("upload-delta-{}", crate::random_hex(12)));
        temps.push(crate::releases::TempFile(Some(path.clone())));
        path
    };
    let out_path = temp(&mut temps);
    let mut out = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&out_path)
        .map_err(fail("creating a delta"))?;
    let mut spools = Vec::new();
    let stats = abide_bundle::delta_write::make(
        open(old)?,
        open(new)?,
        &mut |_| {
            let path = temp(&mut spools);
            std::fs::File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
        },
        &DeltaOptions::default(),
        &mut std::io::BufWriter::with_capacity(1 << 20, &mut out),
    )
    .map_err(|e| ApiError::internal("making a delta", e))?;
    drop(spools);
    abide_fs::persist::fsync(&out, &out_path)
        .map_err(|e| ApiError::internal("storing a delta", e))?;
    let sha256 = {
        use sha2::Digest as _;
        use std::io::{Read as _, Seek as _};
        out.rewind().map_err(fail("hashing a delta"))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = out.read(&mut buf).map_err(fail("hashing a delta"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        abide_bundle::digest::encode_hex(&h.finalize())
    };
    let dir = data.join("deltas");
    std::fs::create_dir_all(&dir).map_err(fail("storing a delta"))?;
    std::fs::rename(&out_path, dir.join(format!("{sha256}.abide")))
        .map_err(fail("storing a delta"))?;
    temps[0].0 = None;
    abide_fs::persist::sync_dir(&dir).map_err(|e| ApiError::internal("storing a delta", e))?;
    Ok((sha256, stats))
}

/// After release `to` is uploaded: a delta to it from every other release of its product that
/// enrolled devices run. Runs in the background; a failure is logged (devices then download
/// chunks as before).
pub async fn for_running(server: Server, to: String, product: String) {
    let from: Result<Vec<(String,)>, sqlx::Error> = sqlx::query_as(
        "SELECT DISTINCT r.id FROM releases r JOIN devices d ON d.version = r.version AND d.product = r.product \
         WHERE r.product = $1 AND r.id <> $2 AND d.revoked_at IS NULL",
    )
    .bind(&product)
    .bind(&to)
    .fetch_all(&server.db.pool)
    .await;
    let from = match from {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(release = %to, error = %e, "listing the releases devices run");
            return;
        }
    };
    for (id,) in from {
        match make(&server, &id, &to, "server").await {
            Ok(row) => {
                tracing::info!(from = %id, to = %to, size = row.size, offered = row.offered, "delta made")
            }
            Err(e) => tracing::error!(from = %id, to = %to, error = ?e, "making a delta"),
        }
    }
}

/// `POST /api/v1/releases/{id}/deltas` with `{"from": RELEASE}`: makes the delta (or finds the
/// one there is).
pub async fn create(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    Path(to): Path<String>,
    Json(req): Json<abide_fleet_json::DeltaRequest>,
) -> ApiResult<(StatusCode, Json<abide_fleet_json::Delta>)> {
    let delta = make(&server, &req.from, &to, &caller.actor).await?;
    Ok((StatusCode::CREATED, Json(delta)))
}

/// `GET /api/v1/releases/{id}/deltas`: the deltas to a release, smallest first.
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Path(to): Path<String>,
) -> ApiResult<Json<Vec<abide_fleet_json::Delta>>> {
    if crate::releases::find(&server, &to).await?.is_none() {
        return Err(ApiError::not_found(format!("no release {to}")));
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE d.to_release = $1 ORDER BY d.size, d.from_release"
    )))
    .bind(&to)
    .fetch_all(&server.db.pool)
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// `GET /api/v1/releases/{id}/deltas/{from}`: the delta file, for an admin or a device the
/// release is assigned to, with `Range` as for bundles.
pub async fn download(
    State(server): State<Server>,
    headers: HeaderMap,
    peer: Option<axum::Extension<crate::tls::PeerIdentity>>,
    Path((to, from)): Path<(String, String)>,
) -> ApiResult<Response> {
    let device = if crate::auth::caller(&server, &headers).await.is_err() {
        Some(crate::auth::device(&server, &headers, peer.as_deref()).await?)
    } else {
        None
    };
    // A device learns nothing about the deltas of a release it is not given.
    if let Some(device) = device
        && !crate::rollouts::gives(&server, &device, &to, None).await?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-assigned",
            format!("release {to} is not assigned to device {device}"),
        ));
    }
    let row = find(&server, &from, &to)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no delta from {from} to {to}")))?;
    let path = server
        .config
        .data
        .join("deltas")
        .join(format!("{}.abide", row.sha256));
    crate::releases::serve(&path, row.size as u64, &row.sha256, &headers, "delta").await
}

/// The release of `product` and `version` whose manifest has the SHA-256 `manifest`: its id
/// and the SHA-256 of its bundle.
async fn release_by_manifest(
    server: &Server,
    product: &str,
    version: &str,
    manifest: abide_bundle::Digest,
) -> ApiResult<Option<(String, String)>> {
    let candidates: Vec<(String, String)> =
        sqlx::query_as("SELECT id, sha256 FROM releases WHERE product = $1 AND version = $2")
            .bind(product)
            .bind(version)
            .fetch_all(&server.db.pool)
            .await?;
    for (id, sha) in candidates {
        let path = server
            .config
            .data
            .join("releases")
            .join(format!("{sha}.abide"));
        let digest = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).ok()?;
            let reader = BundleReader::open(Stream(file), Limits::default()).ok()?;
            Some(abide_bundle::Digest::of(reader.manifest_bytes()))
        })
        .await
        .map_err(|e| ApiError::internal("reading a stored bundle", e))?;
        if digest == Some(manifest) {
            return Ok(Some((id, sha)));
        }
    }
    Ok(None)
}

/// Applies the delta at `delta` to the stored bundle `old` (by SHA-256), every chunk checked
/// against the new release's signed names; returns what chunk reuse would read instead (the
/// delta's `chunks_size`).
fn check_upload(
    data: &std::path::Path,
    old: &str,
    delta: &std::path::Path,
    trust: &abide_bundle::TrustRoot,
) -> Result<u64, abide_bundle::Error> {
    use abide_bundle::delta::DeltaReader;
    let io = |what: &'static str| move |source| abide_bundle::Error::Io { what, source };
    let file = std::fs::File::open(data.join("releases").join(format!("{old}.abide")))
        .map_err(io("opening a stored bundle"))?;
    let reader = BundleReader::open(
        Stream(std::io::BufReader::with_capacity(1 << 20, file)),
        Limits::default(),
    )?;
    let head = reader.head_bytes();
    let file = std::fs::File::open(delta).map_err(io("opening the upload"))?;
    let delta = DeltaReader::open(
        Stream(std::io::BufReader::with_capacity(1 << 20, file)),
        Limits::default(),
    )?
    .verify(&abide_bundle::Policy {
        trust,
        now: jiff::Timestamp::now(),
        expiration: abide_bundle::ExpirationEnforcement::Safe,
        compatible: None,
        min_security_version: 0,
    })?;
    let mut spools = Vec::new();
    let tmp = data.join("tmp");
    abide_bundle::delta_write::check((reader.without_signatures()?, head), delta, &mut |_| {
        let path = tmp.join(format!("upload-spool-{}", crate::random_hex(12)));
        spools.push(crate::releases::TempFile(Some(path.clone())));
        std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    })
}

/// `POST /api/v1/deltas`: the body is a delta made elsewhere (`abide delta create`). It is
/// verified against the fleet trust root (the new release's signatures), matched to the two
/// releases it names by their manifests, and applied to the old release's content with every
/// chunk checked, before it is stored and offered like one the server made. A refused delta
/// gets 422 with the check's code and leaves nothing behind.
pub async fn upload(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<abide_fleet_json::Delta>)> {
    let (mut guard, tmp, sha256, size) = crate::releases::receive(&server, body, "delta").await?;
    let trust = crate::trust::current(&server).await?;
    let refused = |e: abide_bundle::Error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.code(),
            format!("the delta was refused: {e}"),
        )
    };
    let (path, t) = (tmp.clone(), trust.clone());
    let (head, product) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|source| abide_bundle::Error::Io {
            what: "reading the upload",
            source,
        })?;
        let d = abide_bundle::delta::DeltaReader::open(
            Stream(std::io::BufReader::new(file)),
            Limits::default(),
        )?
        .verify(&abide_bundle::Policy {
            trust: &t,
            now: jiff::Timestamp::now(),
            expiration: abide_bundle::ExpirationEnforcement::Safe,
            compatible: None,
            min_security_version: 0,
        })?;
        Ok::<_, abide_bundle::Error>((d.head().clone(), d.manifest().product.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal("verifying the upload", e))?
    .map_err(refused)?;
    let to = release_by_manifest(
        &server,
        &product,
        &head.to_version.to_string(),
        head.to_manifest,
    )
    .await?;
    let from = release_by_manifest(
        &server,
        &product,
        &head.from.version.to_string(),
        head.from.manifest,
    )
    .await?;
    let (Some((to, _)), Some((from, from_sha))) = (to, from) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta-releases",
            format!(
                "the delta goes from {product} {} to {}: upload both releases first",
                head.from.version, head.to_version
            ),
        ));
    };
    if find(&server, &from, &to).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "there is a delta from {from} to {to} already"
        )));
    }
    let (data, path) = (server.config.data.clone(), tmp.clone());
    let chunks_size =
        tokio::task::spawn_blocking(move || check_upload(&data, &from_sha, &path, &trust))
            .await
            .map_err(|e| ApiError::internal("checking the upload", e))?
            .map_err(refused)?;
    let dir = server.config.data.join("deltas");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::internal("storing the delta", e))?;
    tokio::fs::rename(&tmp, dir.join(format!("{sha256}.abide")))
        .await
        .map_err(|e| ApiError::internal("storing the delta", e))?;
    guard.0 = None;
    abide_fs::persist::sync_dir(&dir).map_err(|e| ApiError::internal("storing the delta", e))?;
    let stored = Stored {
        from: &from,
        to: &to,
        sha256: &sha256,
        size,
        chunks_size,
    };
    if !record(&server, stored, &caller.actor, "delta.upload").await? {
        return Err(ApiError::conflict(format!(
            "there is a delta from {from} to {to} already"
        )));
    }
    let row = find(&server, &from, &to)
        .await?
        .ok_or_else(|| ApiError::internal("storing the delta", "the row is not there"))?;
    Ok((StatusCode::CREATED, Json(row.into())))
}
