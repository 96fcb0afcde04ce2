//! Who is asking: an admin token (a bearer token whose SHA-256 the database holds, with a
//! [`Role`]: viewer, operator or admin) or an enrolled device (a bearer credential
//! `DEVICE_ID:SECRET`, whose secret's SHA-256 is stored with the device). Missing or unknown
//! credentials get 401, a role too small for the route 403; handlers take [`Viewer`],
//! [`Operator`], [`Admin`] or [`Device`] as an argument, so none runs before its check.

use axum::http::HeaderMap;

use abide_fleet_json::Role;

use crate::Server;
use crate::error::{ApiError, ApiResult};

fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("no Authorization header"))?
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer TOKEN"))
}

/// Compares two hex digests without stopping at the first difference.
pub fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Who is asking with an admin token, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What the token may do.
    pub role: Role,
    /// How the audit trail names them: `admin` (the first start's `admin.token`) or
    /// `token:ID` (a token made with `abide fleet admin-token create`).
    pub actor: String,
}

/// Reads an admin token's role: the first start's `admin.token` is `admin`; others are looked
/// up (by SHA-256) in `admin_tokens` on every request, so a revocation counts at once in every
/// server process.
pub async fn caller(server: &Server, headers: &HeaderMap) -> ApiResult<Caller> {
    caller_of(server, bearer(headers)?).await
}

/// [`caller`] for a token already taken from its request (the web page's sign-in form).
pub async fn caller_of(server: &Server, token: &str) -> ApiResult<Caller> {
    let hash = crate::sha256_hex(token.as_bytes());
    if same_digest(&hash, &server.admin_hash) {
        return Ok(Caller {
            role: Role::Admin,
            actor: "admin".into(),
        });
    }
    let row: Option<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT id, role, revoked_at FROM admin_tokens WHERE token_hash = $1")
            .bind(&hash)
            .fetch_optional(&server.db.read)
            .await?;
    match row {
        None => Err(ApiError::unauthorized("not an admin token")),
        Some((id, _, Some(_))) => Err(ApiError::unauthorized(format!(
            "admin token {id} was revoked"
        ))),
        Some((id, role, None)) => Ok(Caller {
            role: role.parse().map_err(|e: String| {
                ApiError::from(sqlx::Error::Decode(
                    format!("admin_tokens {id}: column role: {e}").into(),
                ))
            })?,
            actor: format!("token:{id}"),
        }),
    }
}

/// Checks that the request carries an admin token whose role is at least `need`: 401 without
/// one, 403 when its role is less.
pub async fn require(server: &Server, headers: &HeaderMap, need: Role) -> ApiResult<Caller> {
    let caller = caller(server, headers).await?;
    if caller.role < need {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "role",
            format!(
                "this token's role is {}; this needs {need} or more",
                caller.role
            ),
        ));
    }
    Ok(caller)
}

macro_rules! role_extractor {
    ($name:ident, $role:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name(pub Caller);

        impl axum::extract::FromRequestParts<Server> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                server: &Server,
            ) -> Result<Self, ApiError> {
                require(server, &parts.headers, $role).await.map($name)
            }
        }

        impl std::ops::Deref for $name {
            type Target = Caller;
            fn deref(&self) -> &Caller {
                &self.0
            }
        }
    };
}

role_extractor!(
    Viewer,
    Role::Viewer,
    "A handler argument: the request carries an admin token of any role."
);
role_extractor!(
    Operator,
    Role::Operator,
    "A handler argument: the request carries an admin token whose role is operator or admin."
);
role_extractor!(
    Admin,
    Role::Admin,
    "A handler argument: the request carries an admin token whose role is admin."
);

/// A handler argument: an enrolled device's id, from its credential and the connection's
/// client certificate (see [`device`]).
#[derive(Debug, Clone)]
pub struct EnrolledDevice(pub String);

impl axum::extract::FromRequestParts<Server> for EnrolledDevice {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        server: &Server,
    ) -> Result<Self, ApiError> {
        let peer = parts.extensions.get::<crate::tls::PeerIdentity>();
        device(server, &parts.headers, peer)
            .await
            .map(EnrolledDevice)
    }
}

/// Checks the token for `/metrics`: the metrics token, an admin token of any role, or the web
/// page's sign-in (so its link works).
pub async fn metrics(server: &Server, headers: &HeaderMap) -> ApiResult<()> {
    if crate::web::session(server, headers).await?.is_some() {
        return Ok(());
    }
    let token = bearer(headers)?;
    if same_digest(&crate::sha256_hex(token.as_bytes()), &server.metrics_hash) {
        return Ok(());
    }
    caller(server, headers)
        .await
        .map(|_| ())
        .map_err(|_| ApiError::unauthorized("not the metrics token or an admin token"))
}

/// Whether `id` may be a device id: 1 to 128 of `A-Z a-z 0-9 . _ -`, starting with a letter or
/// digit, never `..`.
pub fn valid_device_id(id: &str) -> bool {
    crate::devices::valid_name(id, 128, b".-_")
}

/// Checks that a connection's client certificate, if it has one, names device `id`; and that
/// there is one if the server requires it.
pub fn check_peer(
    server: &Server,
    id: &str,
    peer: Option<&crate::tls::PeerIdentity>,
) -> ApiResult<()> {
    let required = server
        .config
        .tls
        .as_ref()
        .is_some_and(|t| t.require_device_cert);
    match peer.and_then(|p| p.0.as_deref()) {
        Some(name) if name != id => Err(ApiError::forbidden(format!(
            "the client certificate is for device {name}, not {id}"
        ))),
        Some(_) => Ok(()),
        None if required => Err(ApiError::forbidden(
            "this server requires a device certificate (a client certificate whose common name is the device id)",
        )),
        None => Ok(()),
    }
}

/// Forgets a device that is no longer in the database (its cached credential stops working)
/// and returns the answer its requests get: 401.
pub fn forget_device(server: &Server, id: &str) -> ApiError {
    server.credentials.write().expect("not poisoned").remove(id);
    ApiError::unauthorized("unknown device credential")
}

/// Checks a device credential (and the connection's client certificate, see [`check_peer`])
/// and returns the device id.
pub async fn device(
    server: &Server,
    headers: &HeaderMap,
    peer: Option<&crate::tls::PeerIdentity>,
) -> ApiResult<String> {
    let credential = bearer(headers)?;
    let (id, secret) = credential
        .split_once(':')
        .filter(|(id, _)| valid_device_id(id))
        .ok_or_else(|| ApiError::unauthorized("not a device credential"))?;
    let presented = crate::sha256_hex(secret.as_bytes());
    // A device's credential and group never change once enrolled, so they are kept once read;
    // a revocation empties the cache (at once in this process, within seconds in the others:
    // `watch_revocations_forever`).
    let cached = server
        .credentials
        .read()
        .expect("not poisoned")
        .get(id)
        .cloned();
    let (hash, _group) = match cached {
        Some(known) => known,
        None => {
            let row: Option<(String, String, Option<i64>)> = sqlx::query_as(
                "SELECT credential_hash, grp, revoked_at FROM devices WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&server.db.read)
            .await?;
            let Some((hash, group, revoked)) = row else {
                return Err(ApiError::unauthorized("unknown device credential"));
            };
            if revoked.is_some() {
                return Err(ApiError::unauthorized(
                    "the device's credential was revoked",
                ));
            }
            let known = (hash, group);
            let mut cache = server.credentials.write().expect("not poisoned");
            if cache.len() < 1_000_000 {
                cache.insert(id.to_owned(), known.clone());
            }
            known
        }
    };
    if same_digest(&presented, &hash) {
        check_peer(server, id, peer)?;
        Ok(id.to_owned())
    } else {
        Err(ApiError::unauthorized("unknown device credential"))
    }
}

/// Empties the credential cache whenever the number of revoked devices changes, checked every
/// `every`: another server process's revocation takes effect here within that time.
pub async fn watch_revocations_forever(server: Server, every: std::time::Duration) {
    let mut seen: Option<i64> = None;
    loop {
        let revoked: Result<i64, sqlx::Error> =
            sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE revoked_at IS NOT NULL")
                .fetch_one(&server.db.read)
                .await;
        match revoked {
            Ok(n) if seen != Some(n) => {
                // The first reading clears too: entries cached before it may predate a
                // revocation it counts.
                server.credentials.write().expect("not poisoned").clear();
                seen = Some(n);
            }
            Ok(_) => {}
            Err(e) => {
                // Unknown: forget every cached credential rather than trust a stale one.
                tracing::warn!(error = %e, "reading revocations");
                server.credentials.write().expect("not poisoned").clear();
            }
        }
        tokio::time::sleep(every).await;
    }
}
