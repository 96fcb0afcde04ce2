//! The Abide fleet server: releases (verified bundles served with HTTP Range), enrolment of
//! devices, signed check-ins, idempotent reports, and a hash-chained audit trail, over SQLite
//! or PostgreSQL.
//!
//! [`Server::start`] opens the data directory and the database and returns the shared state;
//! [`app`] is the whole HTTP API as an axum `Router`, which tests drive in-process and
//! [`serve`] binds to a socket. Everything that matters lives in the database, so several
//! processes can serve one PostgreSQL database.

pub mod admins;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod db;
pub mod deltas;
pub mod devices;
pub mod error;
pub mod groups;
pub mod guard;
pub mod limit;
pub mod metrics;
pub mod releases;
pub mod rollouts;
pub mod tls;
pub mod trust;
pub mod web;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use abide_bundle::{ExpirationEnforcement, Limits, PublicKey, SecretKey, TrustRoot};
use abide_fs::persist::write_new;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::db::Db;

/// How the server is started.
#[derive(Debug, Clone)]
pub struct Config {
    /// The data directory: bundles, keys, the admin token, and the SQLite database.
    pub data: PathBuf,
    /// A database URL (`postgres://…`); SQLite in `data` when `None`.
    pub db: Option<String>,
    /// The fleet trust root; `data/trust.json` when `None`.
    pub trust: Option<PathBuf>,
    /// The largest bundle an upload may carry.
    pub max_bundle: u64,
    /// How long a signed assignment is valid, in seconds.
    pub assignment_ttl: i64,
    /// HTTPS (and device certificates), if configured.
    pub tls: Option<tls::TlsConfig>,
    /// The check-in interval devices are told to keep, in seconds (their own when `None`).
    pub device_poll: Option<u64>,
    /// How long a client may take to send a request's head (and to finish a TLS handshake),
    /// and stay idle between requests, before its connection is closed.
    pub header_timeout: std::time::Duration,
    /// Enrolment attempts a client address may make per minute (and at once).
    pub enroll_per_minute: u32,
    /// Connections one client address may hold open at once; more are closed at accept.
    pub max_connections_per_address: usize,
    /// How long a client may take to send the body of a request (uploads: to send more of it).
    pub body_timeout: std::time::Duration,
    /// How recent a device's last healthy check-in must be to count towards a group's quorum.
    pub health_fresh: std::time::Duration,
    /// How long a web page sign-in lasts.
    pub session_ttl: std::time::Duration,
    /// How often `/metrics` re-reads its aggregates while it is scraped (zero: at every
    /// scrape).
    pub metrics_refresh: std::time::Duration,
    /// Whether an upload is followed by deltas to it from the releases devices run.
    pub deltas_on_upload: bool,
}

impl Config {
    /// Defaults for `data`: SQLite, `data/trust.json`, bundles up to 16 GiB, assignments valid
    /// for 10 minutes.
    pub fn new(data: &Path) -> Config {
        Config {
            data: data.to_owned(),
            db: None,
            trust: None,
            max_bundle: 16 << 30,
            assignment_ttl: 600,
            tls: None,
            device_poll: None,
            header_timeout: std::time::Duration::from_secs(10),
            enroll_per_minute: 30,
            max_connections_per_address: 64,
            body_timeout: std::time::Duration::from_secs(30),
            health_fresh: std::time::Duration::from_secs(15 * 60),
            session_ttl: std::time::Duration::from_secs(12 * 3600),
            metrics_refresh: std::time::Duration::from_secs(10),
            deltas_on_upload: true,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// A file in the data directory.
    #[error(transparent)]
    Io(#[from] abide_fs::persist::IoError),
    /// The trust root or the signing key.
    #[error("{0}")]
    Setup(String),
}

/// The state every request shares.
#[derive(Clone)]
pub struct Server(pub Arc<Inner>);

/// What [`Server`] holds.
pub struct Inner {
    /// The configuration.
    pub config: Config,
    /// The database.
    pub db: Db,
    /// The fleet trust root bundles are verified against.
    pub trust: TrustRoot,
    /// The key that signs assignments.
    pub signing: SecretKey,
    /// SHA-256 of the admin token, hex.
    pub admin_hash: String,
    /// SHA-256 of the metrics token (`/metrics` only), hex.
    pub metrics_hash: String,
    /// Device check-ins whose last-seen time is not yet written (coalesced).
    pub last_seen: devices::LastSeen,
    /// What each device has of applications and the agent, as this process last stored it.
    pub inventories: devices::Inventories,
    /// This process's counters.
    pub counters: metrics::Counters,
    /// `/metrics`' aggregates as last read.
    pub metrics: metrics::Snapshot,
    /// Device credential hashes and groups already read (they never change), by device id.
    pub credentials: std::sync::RwLock<std::collections::HashMap<String, (String, String)>>,
    /// Enrolment attempts by client address (a token bucket each).
    pub enrolments: limit::Buckets,
    /// Connections open by client address.
    pub connections: limit::Connections,
    /// The groups' maintenance windows as last read, and when (they change rarely; a check-in
    /// reads them from here, at most two seconds old).
    pub windows: std::sync::RwLock<(
        i64,
        std::collections::HashMap<String, abide_fleet_json::GroupWindow>,
    )>,
    /// The audit head each device last reported, as kept or refused (a check-in whose head is
    /// unchanged touches no row).
    pub audit_heads: std::sync::Mutex<std::collections::HashMap<String, (u64, String)>>,
}

impl std::ops::Deref for Server {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What the start did that the operator should know.
#[derive(Debug, Default)]
pub struct StartNotes {
    /// Lines to print.
    pub lines: Vec<String>,
}

impl Server {
    /// Opens the data directory and the database; on the first start writes the admin token
    /// (`admin.token`, mode 0600) and the assignment-signing key (`server.key`, mode 0600).
    pub async fn start(config: Config) -> Result<(Server, StartNotes), StartError> {
        let mut notes = StartNotes::default();
        let data = &config.data;
        for dir in [data.clone(), data.join("releases"), data.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|source| abide_fs::persist::IoError {
                op: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        let db = Db::open(config.db.as_deref(), data).await?;
        clean_uploads(&data.join("tmp"), db.dialect)?;
        let trust_path = config
            .trust
            .clone()
            .unwrap_or_else(|| data.join("trust.json"));
        let trust_bytes = std::fs::read(&trust_path).map_err(|e| {
            StartError::Setup(format!(
                "{}: {e}: the server verifies every uploaded bundle against the fleet's trust root; \
                 put it there or pass --trust FILE",
                trust_path.display()
            ))
        })?;
        let trust = TrustRoot::load(
            &trust_bytes,
            jiff::Timestamp::now(),
            ExpirationEnforcement::Safe,
            &Limits::default(),
        )
        .map_err(|e| StartError::Setup(format!("{}: {e}", trust_path.display())))?;
        let admin_hash = token(&db, data, "admin", &mut notes).await?;
        let metrics_hash = token(&db, data, "metrics", &mut notes).await?;
        let signing = signing_key(&db, data, &mut notes).await?;
        let enroll_per_minute = config.enroll_per_minute;
        let server = Server(Arc::new(Inner {
            config,
            db,
            trust,
            signing,
            admin_hash,
            metrics_hash,
            last_seen: devices::LastSeen::default(),
            inventories: devices::Inventories::default(),
            counters: metrics::Counters::default(),
            metrics: metrics::Snapshot::default(),
            credentials: Default::default(),
            enrolments: limit::Buckets::new(enroll_per_minute),
            connections: Default::default(),
            windows: std::sync::RwLock::new((i64::MIN, Default::default())),
            audit_heads: Default::default(),
        }));
        audit::sign_unsigned_head(&server)
            .await
            .map_err(|source| db::DbError::Sql {
                what: "signing the audit trail's head".into(),
                source,
            })?;
        Ok((server, notes))
    }
}

/// `bytes` random bytes, hex.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).expect("the system's random source works");
    abide_bundle::digest::encode_hex(&b)
}

/// SHA-256 of `text`, hex.
pub fn sha256_hex(text: &[u8]) -> String {
    abide_bundle::Digest::of(text).to_string()
}

async fn setting(db: &Db, key: &str) -> Result<Option<String>, StartError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = $1")
        .bind(key)
        .fetch_optional(&db.pool)
        .await
        .map_err(|source| db::DbError::Sql {
            what: format!("reading setting {key}"),
            source,
        })?;
    Ok(row.map(|(v,)| v))
}

/// Records `value` unless another process recorded one first; returns the one that counts.
async fn set_setting_once(db: &Db, key: &str, value: &str) -> Result<String, StartError> {
    sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
        .bind(key)
        .bind(value)
        .execute(&db.pool)
        .await
        .map_err(|source| db::DbError::Sql {
            what: format!("writing setting {key}"),
            source,
        })?;
    Ok(setting(db, key).await?.unwrap_or_default())
}

/// The `name` token (`admin`, `metrics`): its SHA-256 from the database, or on the first start
/// a new token written to `DATA/NAME.token` (mode 0600).
async fn token(
    db: &Db,
    data: &Path,
    name: &str,
    notes: &mut StartNotes,
) -> Result<String, StartError> {
    let path = data.join(format!("{name}.token"));
    let key = format!("{name}_token_sha256");
    if let Some(hash) = setting(db, &key).await? {
        let here = std::fs::read_to_string(&path).ok();
        if here.as_deref().map(|t| sha256_hex(t.trim().as_bytes())) != Some(hash.clone()) {
            notes.lines.push(format!(
                "{name} token: set by the server that first used this database; {} does not hold it",
                path.display()
            ));
        }
        return Ok(hash);
    }
    let token = format!("abide-{name}-{}", random_hex(32));
    let hash = sha256_hex(token.as_bytes());
    write_new(&path, format!("{token}\n").as_bytes(), 0o600)?;
    let counted = set_setting_once(db, &key, &hash).await?;
    if counted != hash {
        let _ = std::fs::remove_file(&path);
        notes.lines.push(format!(
            "{name} token: another server process set it first; use its {name}.token"
        ));
    } else {
        notes.lines.push(format!(
            "{name} token written to {} (mode 0600)",
            path.display()
        ));
    }
    Ok(counted)
}

async fn signing_key(
    db: &Db,
    data: &Path,
    notes: &mut StartNotes,
) -> Result<SecretKey, StartError> {
    let path = data.join("server.key");
    let recorded = setting(db, "server_public_key").await?;
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_file_text(&text)
            .map_err(|e| StartError::Setup(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(public) = recorded {
                return Err(StartError::Setup(format!(
                    "{} is missing: this database's devices trust the signing key {public}; copy \
                     server.key from the server that created it",
                    path.display()
                )));
            }
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("the system's random source works");
            let key = SecretKey::from_seed(seed);
            write_new(&path, key.to_file_text().as_bytes(), 0o600)?;
            write_new(
                &data.join("server.pub"),
                key.public().to_file_text().as_bytes(),
                0o644,
            )?;
            notes.lines.push(format!(
                "assignment signing key written to {} (public key {})",
                path.display(),
                key.public().to_hex()
            ));
            key
        }
        Err(e) => {
            return Err(StartError::Setup(format!("{}: {e}", path.display())));
        }
    };
    let public = key.public().to_hex();
    let counted = set_setting_once(db, "server_public_key", &public).await?;
    if counted != public {
        return Err(StartError::Setup(format!(
            "{}: its public key {public} is not the one this database's devices trust ({counted})",
            path.display()
        )));
    }
    Ok(key)
}

/// Removes what uploads cut short by a crash left in `tmp` (only the server's own
/// `upload-*` files): all of them with SQLite, whose one server process owns the directory;
/// with PostgreSQL, where several processes may share it, those untouched for an hour.
fn clean_uploads(tmp: &Path, dialect: db::Dialect) -> Result<(), StartError> {
    let entries = std::fs::read_dir(tmp).map_err(|source| abide_fs::persist::IoError {
        op: "listing",
        path: tmp.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("upload-") {
            continue;
        }
        let stale = dialect == db::Dialect::Sqlite
            || entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if stale {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| abide_fs::persist::IoError {
                op: "removing a partial upload",
                path,
                source,
            })?;
        }
    }
    Ok(())
}

/// The server's public key, as devices pin it.
pub fn public_key(server: &Server) -> PublicKey {
    server.signing.public()
}

/// The whole HTTP API.
pub fn app(server: Server) -> Router {
    let json_limit = DefaultBodyLimit::max(64 << 10);
    Router::new()
        .route(
            "/api/v1/health",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route("/api/v1/server-key", get(releases::server_key))
        .route("/metrics", get(metrics::metrics))
        .route("/", get(web::index))
        .route("/ui/login", post(web::sign_in).layer(json_limit))
        .route("/ui/logout", post(web::sign_out))
        .route("/ui/rollouts/{id}/{action}", post(web::control))
        .route(
            "/api/v1/releases",
            post(releases::upload)
                .layer(DefaultBodyLimit::disable())
                .get(releases::list),
        )
        .route("/api/v1/releases/{id}", get(releases::show))
        .route("/api/v1/releases/{id}/bundle", get(releases::download))
        .route(
            "/api/v1/releases/{id}/deltas",
            post(deltas::create).layer(json_limit).get(deltas::list),
        )
        .route("/api/v1/releases/{id}/deltas/{from}", get(deltas::download))
        .route(
            "/api/v1/deltas",
            post(deltas::upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/v1/enroll-tokens",
            post(devices::create_token)
                .layer(json_limit)
                .get(devices::list_tokens),
        )
        .route(
            "/api/v1/enroll-tokens/{id}",
            axum::routing::delete(devices::revoke_token),
        )
        .route(
            "/api/v1/admin-tokens",
            post(admins::create).layer(json_limit).get(admins::list),
        )
        .route(
            "/api/v1/admin-tokens/{id}",
            axum::routing::delete(admins::revoke),
        )
        .route(
            "/api/v1/device/enroll",
            post(devices::enroll).layer(json_limit),
        )
        .route(
            "/api/v1/device/checkin",
            post(devices::checkin).layer(json_limit),
        )
        .route(
            "/api/v1/device/report",
            post(devices::report).layer(json_limit),
        )
        .route("/api/v1/devices", get(devices::list))
        .route("/api/v1/devices/{id}/revoke", post(devices::revoke))
        .route(
            "/api/v1/rollouts",
            post(rollouts::create).layer(json_limit).get(rollouts::list),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::show))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route(
            "/api/v1/groups/{name}",
            axum::routing::put(groups::set)
                .layer(json_limit)
                .get(groups::show),
        )
        .route(
            "/api/v1/device/lease",
            post(groups::acquire)
                .delete(groups::release)
                .layer(json_limit),
        )
        .route(
            "/api/v1/trust",
            post(trust::publish).layer(json_limit).get(trust::show),
        )
        .route("/api/v1/audit", get(audit::list))
        .route("/api/v1/audit/verify", get(audit::verify))
        .route("/api/v1/audit/head", get(audit::show_head))
        .fallback(|| async { error::ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            guard::guard,
        ))
        .with_state(server)
}

/// Serves [`app`] on `listener` until the process is stopped, writing coalesced last-seen
/// times in the background. A connection that sends no complete request head within
/// `header_timeout` (or stays idle that long between requests) is closed; a failed accept
/// (out of file descriptors, say) is waited out, not fatal.
pub async fn serve(server: Server, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    spawn_background(&server);
    let router = app(server.clone());
    loop {
        let (tcp, remote, held) = accept(&server, &listener).await;
        let (router, timeout) = (router.clone(), server.config.header_timeout);
        tokio::spawn(async move {
            serve_connection(tcp, router, timeout, remote).await;
            drop(held);
        });
    }
}

/// The next connection whose address may hold one more (others are dropped as they are
/// accepted), counted until the returned [`limit::Held`] is dropped. A failed accept (out of
/// file descriptors, say) is waited out, not fatal.
pub(crate) async fn accept(
    server: &Server,
    listener: &tokio::net::TcpListener,
) -> (tokio::net::TcpStream, std::net::SocketAddr, limit::Held) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(held) = server
            .connections
            .hold(remote.ip(), server.config.max_connections_per_address)
        {
            return (tcp, remote, held);
        }
    }
}

/// Serves one HTTP/1.1 connection with the header-read timeout, each request carrying the
/// client's address ([`limit::Remote`]).
pub(crate) async fn serve_connection<I>(
    io: I,
    router: Router,
    header_timeout: std::time::Duration,
    remote: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::ServiceExt::map_request(
        router,
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(limit::Remote(remote));
            request
        },
    );
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        )
        .await;
}

/// Starts the background work: coalesced last-seen writes and the rollout decisions.
pub fn spawn_background(server: &Server) {
    let flusher = server.clone();
    tokio::spawn(async move { devices::flush_last_seen_forever(flusher).await });
    let decider = server.clone();
    tokio::spawn(async move { rollouts::tick_forever(decider).await });
    let watcher = server.clone();
    tokio::spawn(async move {
        auth::watch_revocations_forever(watcher, std::time::Duration::from_secs(2)).await
    });
}
