//! The database: SQLite in the data directory by default, PostgreSQL when several server
//! processes share one. Both are reached through sqlx's `Any` driver with the same SQL (`$N`
//! parameters, `BIGINT` and `TEXT` columns, times as Unix milliseconds); the few statements
//! that differ ask [`Db::dialect`].
//!
//! SQLite gets one connection that writes (writes are serialized anyway, and a single writer
//! never sees `SQLITE_BUSY`) and a few read-only ones for the hot reads of check-ins, WAL
//! journaling and `synchronous = FULL`, so a committed write survives a power loss.
//! PostgreSQL gets a pool; decisions that must happen once take row locks.
//!
//! The schema is created and upgraded at start by the migrations below, run by sqlx's migrator
//! (each once, in its own transaction, recorded with its checksum in `_sqlx_migrations`; on
//! PostgreSQL under an advisory lock, so several starting processes migrate once). A database
//! made before the migrator recorded its versions in `schema_migrations`; those are recorded
//! as applied once, and that table is dropped.

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};

/// Which SQL dialect the database speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connected, migrated database.
#[derive(Clone, Debug)]
pub struct Db {
    /// The connection pool (on SQLite: the one connection that writes).
    pub pool: AnyPool,
    /// Connections for reads that need not see the writer's open transaction (on SQLite:
    /// read-only connections that run beside the writer, as WAL allows; on PostgreSQL: the
    /// same pool).
    pub read: AnyPool,
    /// Its dialect.
    pub dialect: Dialect,
}

/// The schema, in order: (version, SQL). Never edit an applied migration (the migrator refuses
/// a checksum that changed); add a new one.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE releases (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    security_version BIGINT NOT NULL,
    compatible TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE enroll_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    grp TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    credential_hash TEXT NOT NULL,
    product TEXT NOT NULL,
    compatible TEXT NOT NULL,
    grp TEXT NOT NULL,
    tags TEXT NOT NULL,
    version TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    booted TEXT,
    good TEXT,
    health TEXT,
    last_seen BIGINT,
    last_seq BIGINT NOT NULL,
    enrolled_at BIGINT NOT NULL
);
CREATE INDEX devices_grp ON devices (grp);
CREATE TABLE reports (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    status TEXT NOT NULL,
    release_id TEXT,
    rollout_id TEXT,
    reason TEXT,
    millis BIGINT,
    at BIGINT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    details TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#,
    ),
    (
        2,
        r#"
CREATE TABLE device_tags (
    device_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE INDEX device_tags_tag ON device_tags (tag);
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    release_id TEXT NOT NULL,
    grp TEXT,
    tag TEXT,
    stages TEXT NOT NULL,
    threshold_bp BIGINT NOT NULL,
    failure_baseline BIGINT NOT NULL,
    unresponsive_ms BIGINT NOT NULL,
    stage BIGINT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    stage_started_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    place BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    from_version TEXT,
    assigned_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX rollout_devices_place ON rollout_devices (rollout_id, place);
CREATE INDEX rollout_devices_device ON rollout_devices (device_id);
CREATE TABLE quarantine (
    device_id TEXT NOT NULL,
    release_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (device_id, release_id)
);
CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    max_unavailable BIGINT,
    quorum BIGINT,
    maintenance TEXT
);
CREATE TABLE leases (
    device_id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    granted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
"#,
    ),
    (
        3,
        r#"
CREATE TABLE trust_roots (
    version BIGINT PRIMARY KEY,
    body TEXT NOT NULL,
    published_at BIGINT NOT NULL
);
ALTER TABLE devices ADD COLUMN progress TEXT;
ALTER TABLE rollouts ADD COLUMN prestage_bp BIGINT;
"#,
    ),
    (
        4,
        // Enrolment tokens get a use limit (tokens made before it may enrol one more device),
        // bindings to device ids and a product, and revocation.
        r#"
ALTER TABLE enroll_tokens ADD COLUMN max_uses BIGINT NOT NULL DEFAULT 1;
ALTER TABLE enroll_tokens ADD COLUMN used BIGINT NOT NULL DEFAULT 0;
ALTER TABLE enroll_tokens ADD COLUMN device_ids TEXT NOT NULL DEFAULT '[]';
ALTER TABLE enroll_tokens ADD COLUMN device_id_pattern TEXT;
ALTER TABLE enroll_tokens ADD COLUMN product TEXT;
ALTER TABLE enroll_tokens ADD COLUMN revoked_at BIGINT;
"#,
    ),
    (
        5,
        // A device's credential can be revoked.
        r#"
ALTER TABLE devices ADD COLUMN revoked_at BIGINT;
"#,
    ),
    (
        6,
        // Web page sign-ins: a random session id in the cookie, its SHA-256 here.
        r#"
CREATE TABLE web_sessions (
    id_hash TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
"#,
    ),
    (
        7,
        // Admin tokens with a role, besides the first start's `admin.token` (role admin); a
        // web session keeps the role of the token it signed in with.
        r#"
CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
ALTER TABLE web_sessions ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE web_sessions ADD COLUMN token_id TEXT;
"#,
    ),
    (
        8,
        // Signed audit heads: the server's own (signed with its key on every append) and the
        // latest each device reported (JSON of abide_fleet_json::AuditHead).
        r#"
ALTER TABLE audit_head ADD COLUMN signature TEXT;
ALTER TABLE devices ADD COLUMN audit_head TEXT;
"#,
    ),
    (
        9,
        // /metrics' aggregates read these indexes instead of the tables.
        r#"
CREATE INDEX devices_state ON devices (state);
CREATE INDEX reports_status_millis ON reports (status, millis);
CREATE INDEX rollout_devices_state ON rollout_devices (rollout_id, state);
"#,
    ),
    (
        10,
        // Deltas between releases (files in DATA/deltas, named by their SHA-256); chunks_size
        // is what a device running from_release reads of to_release's bundle by chunk reuse.
        r#"
CREATE TABLE deltas (
    from_release TEXT NOT NULL REFERENCES releases (id),
    to_release TEXT NOT NULL REFERENCES releases (id),
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    chunks_size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (from_release, to_release)
);
CREATE INDEX deltas_to ON deltas (to_release);
"#,
    ),
    (
        11,
        // Releases of applications and of the agent: the kind read from the signed manifest;
        // what each device has of them (JSON of its check-in's apps and agent); how many
        // devices a rollout left out and why (JSON of abide_fleet_json::LeftOut).
        r#"
ALTER TABLE releases ADD COLUMN kind TEXT NOT NULL DEFAULT 'os';
ALTER TABLE releases ADD COLUMN app TEXT;
ALTER TABLE devices ADD COLUMN apps TEXT;
ALTER TABLE devices ADD COLUMN agent TEXT;
ALTER TABLE rollouts ADD COLUMN left_out TEXT;
"#,
    ),
];

/// What can be revoked: the tables with a `revoked_at` column.
#[derive(Debug, Clone, Copy)]
pub enum Revocable {
    /// `devices`.
    Device,
    /// `enroll_tokens`.
    EnrollToken,
    /// `admin_tokens`.
    AdminToken,
}

/// Marks row `id` of `what` revoked now, inside `tx`; whether this revoked it (false if it
/// was revoked already or is not there).
pub async fn revoke(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    what: Revocable,
    id: &str,
) -> Result<bool, sqlx::Error> {
    let table = match what {
        Revocable::Device => "devices",
        Revocable::EnrollToken => "enroll_tokens",
        Revocable::AdminToken => "admin_tokens",
    };
    let changed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"
    )))
    .bind(crate::clock::now_ms())
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(changed.rows_affected() > 0)
}

/// Decodes a JSON column of `row` (as `releases r-1`): a value that does not decode is an
/// error naming the row and the column, never a silent default.
pub fn json_column<T: serde::de::DeserializeOwned>(
    row: &str,
    column: &str,
    text: &str,
) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| {
        sqlx::Error::Decode(format!("{row}: column {column} does not decode: {e}").into())
    })
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no database Abide speaks.
    #[error(
        "--db {0}: expected postgres://… or sqlite://… (or nothing, for SQLite in the data directory)"
    )]
    Url(String),
    /// The database refused or failed.
    #[error("{what}: {source}")]
    Sql {
        /// What was being done.
        what: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
}

impl Db {
    /// Connects to `url`, or to SQLite at `DATA/abide.db` when there is none, and applies the
    /// migrations not yet applied.
    pub async fn open(url: Option<&str>, data: &Path) -> Result<Db, DbError> {
        install_default_drivers();
        let url = match url {
            Some(u) => u.to_owned(),
            None => format!("sqlite://{}?mode=rwc", data.join("abide.db").display()),
        };
        let dialect = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(DbError::Url(url));
        };
        let sql = |what: &str| {
            let what = what.to_owned();
            move |source| DbError::Sql { what, source }
        };
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(30));
        let pool = match dialect {
            Dialect::Sqlite => options
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await
                .map_err(sql(&format!("opening the SQLite database {url}")))?,
            Dialect::Postgres => options
                .max_connections(16)
                .connect(&url)
                .await
                .map_err(sql("connecting to PostgreSQL"))?,
        };
        let mut db = Db {
            read: pool.clone(),
            pool,
            dialect,
        };
        db.migrate().await.map_err(sql("migrating the schema"))?;
        if dialect == Dialect::Sqlite {
            let read_url = url.replace("mode=rwc", "mode=ro");
            db.read = AnyPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(30))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA busy_timeout = 10000;").await?;
                        Ok(())
                    })
                })
                .connect(&read_url)
                .await
                .map_err(sql(&format!(
                    "opening the SQLite database {read_url} for reading"
                )))?;
        }
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), sqlx::Error> {
        use sqlx::SqlSafeStr as _;
        use sqlx::migrate::{Migrate as _, Migration, MigrationType, Migrator};
        let migrations: Vec<Migration> = MIGRATIONS
            .iter()
            .map(|(version, script)| {
                Migration::new(
                    *version,
                    format!("abide schema {version}").into(),
                    MigrationType::Simple,
                    sqlx::AssertSqlSafe(*script).into_sql_str(),
                    false,
                )
            })
            .collect();
        let migrator = Migrator::with_migrations(migrations.clone());
        let table = "_sqlx_migrations";
        let mut conn = self.pool.acquire().await?;
        conn.lock().await?;
        let bridged = async {
            let old: i64 = sqlx::query_scalar(match self.dialect {
                Dialect::Sqlite => {
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
                }
                Dialect::Postgres => {
                    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
                }
            })
            .fetch_one(&mut *conn)
            .await?;
            if old == 0 {
                return Ok::<(), sqlx::Error>(());
            }
            conn.ensure_migrations_table(table).await?;
            let recorded: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
                .fetch_all(&mut *conn)
                .await?;
            let applied: Vec<i64> = conn
                .list_applied_migrations(table)
                .await?
                .into_iter()
                .map(|m| m.version)
                .collect();
            for m in migrations
                .iter()
                .filter(|m| recorded.contains(&m.version) && !applied.contains(&m.version))
            {
                conn.skip(table, m).await?;
            }
            conn.execute("DROP TABLE schema_migrations").await?;
            Ok(())
        }
        .await;
        conn.unlock().await?;
        bridged?;
        drop(conn);
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// A read-only transaction whose queries all see the database as of its first one, so
    /// that reads of several tables agree while writers go on: on PostgreSQL `REPEATABLE
    /// READ`; on SQLite a read transaction on a read connection (WAL keeps its snapshot).
    pub async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        let mut tx = self.read.begin().await?;
        if self.dialect == Dialect::Postgres {
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .await?;
        }
        Ok(tx)
    }

    /// ` FOR UPDATE` on PostgreSQL (a row lock for the rest of the transaction); nothing on
    /// SQLite, whose single connection already serializes every transaction.
    pub fn for_update(&self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }
}
