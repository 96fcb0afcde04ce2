//! The web page at `/`: releases, rollouts with their stage progress and device states, the
//! failing devices with their reasons, and the pause/resume/advance/abort/rollback controls.
//! Server-rendered HTML with plain forms and no JavaScript. An admin token is entered once;
//! the session it opens keeps its role (the controls need operator or more) and is named by a
//! random id in an HttpOnly, SameSite=Strict cookie (so another site cannot post the forms);
//! the page is written with maud, which escapes every value it writes.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::Server;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

const COOKIE: &str = "abide_admin";

/// The session id in the request's `Cookie` headers (parsed by the `cookie` crate).
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_owned())
}

/// The session cookie: `id` for `max_age` (an empty id and no age end it), HttpOnly,
/// SameSite=Strict, for the whole site, and `Secure` when the server speaks HTTPS.
fn session_cookie(server: &Server, id: &str, max_age: std::time::Duration) -> String {
    cookie::Cookie::build((COOKIE, id.to_owned()))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .path("/")
        .secure(server.config.tls.is_some())
        .max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
        ))
        .build()
        .to_string()
}

/// Who is signed in by the session whose cookie the request carries, if it is signed in and
/// not expired. The cookie holds a random session id (never a token); the database keeps its
/// SHA-256, expiry, and the role and id of the token it signed in with.
pub async fn session(server: &Server, headers: &HeaderMap) -> ApiResult<Option<Caller>> {
    let Some(id) = cookie_token(headers).filter(|t| t.len() == 64) else {
        return Ok(None);
    };
    let row: Option<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT expires_at, role, token_id FROM web_sessions WHERE id_hash = $1")
            .bind(crate::sha256_hex(id.as_bytes()))
            .fetch_optional(&server.db.read)
            .await?;
    match row {
        Some((expires_at, role, token_id)) if expires_at > crate::clock::now_ms() => {
            Ok(Some(Caller {
                role: role.parse().map_err(|e: String| {
                    ApiError::from(sqlx::Error::Decode(
                        format!("web_sessions: column role: {e}").into(),
                    ))
                })?,
                actor: token_id.map_or_else(|| "admin".to_owned(), |t| format!("token:{t}")),
            }))
        }
        _ => Ok(None),
    }
}

const STYLE: &str = r#"
body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; }
.status { font-weight: bold; padding: .1em .5em; border-radius: .3em; background: #eee; }
.running { background: #d7ecff; } .paused { background: #ffe9b3; } .completed { background: #d5f5d5; }
.aborted, .rolled_back { background: #f6d0d0; }
.bar { display: flex; height: 1em; width: 20em; background: #eee; border-radius: .2em; overflow: hidden; }
.ok { background: #3a3; } .bad { background: #c33; } .busy { background: #e9a21c; }
.rollout { border: 1px solid #ccc; border-radius: .4em; padding: .6em 1em; margin: 1em 0; }
form.inline { display: inline; } button { margin-right: .3em; }
.reason { color: #833; }
"#;

/// A whole page around `body`; every value maud writes is escaped.
fn page(title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                meta name="viewport" content="width=device-width, initial-scale=1";
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
    .into_string()
}

fn login(message: &str) -> String {
    page(
        "Abide fleet: sign in",
        html! {
            h1 { "Abide fleet" }
            p { (message) }
            form method="post" action="/ui/login" {
                label { "Admin token " input type="password" name="token" size="60" autofocus; }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A page that says what went wrong, with a way back.
fn problem(message: &str) -> String {
    page(
        "Abide fleet",
        html! {
            h1 { "Abide fleet" }
            p.reason { (message) }
            p { a href="/" { "Back" } }
        },
    )
}

/// The sign-in form.
#[derive(serde::Deserialize)]
struct SignIn {
    #[serde(default)]
    token: String,
}

/// `GET /`: the page, or the sign-in form.
pub async fn index(State(server): State<Server>, headers: HeaderMap) -> ApiResult<Response> {
    let Some(caller) = session(&server, &headers).await? else {
        return Ok(Html(login(
            "Enter an admin token (the server wrote the first to DATA/admin.token).",
        ))
        .into_response());
    };
    Ok(Html(render(&server, &caller).await?).into_response())
}

/// The page for a signed-in `caller`: the controls only for operators and admins.
async fn render(server: &Server, caller: &Caller) -> ApiResult<String> {
    let states = crate::devices::count_by_state_read(server).await?;
    let total: i64 = states.iter().map(|(_, n)| n).sum();
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM rollouts ORDER BY created_at DESC, id LIMIT 20")
            .fetch_all(&server.db.read)
            .await?;
    let mut rollouts = Vec::with_capacity(ids.len());
    for (id,) in &ids {
        rollouts.push(crate::rollouts::status_of(server, id).await?);
    }
    let failing: Vec<(&str, &abide_fleet_json::FailingDevice)> = rollouts
        .iter()
        .flat_map(|s| s.failing.iter().map(move |f| (s.id.as_str(), f)))
        .take(200)
        .collect();
    let releases = crate::releases::newest(&server.db.read, 50).await?;
    let controls = caller.role >= abide_fleet_json::Role::Operator;
    let body = html! {
        h1 { "Abide fleet" }
        p {
            (total) " devices"
            @for (state, n) in &states { " · " (n) " " (state) }
            " · " a href="/metrics" { "metrics" }
            " · signed in as " (caller.role)
        }
        h2 { "Rollouts" }
        @if rollouts.is_empty() { p { "No rollouts yet." } }
        @for s in &rollouts {
            div.rollout id=(s.id) {
                p {
                    b { (s.id) } " of release " (s.release) " "
                    span class={ "status " (s.status.as_str()) } { (s.status.as_str()) }
                    @if let Some(r) = &s.reason { " " span.reason { (r) } }
                }
                p {
                    (s.devices) " devices: " (s.committed) " committed, " (s.failed) " failed, "
                    (s.in_progress) " in progress, " (s.pending) " pending"
                    @if let Some(p) = &s.prestage {
                        "; " (s.staged_share) "% staged (activation waits for " (p) ")"
                    }
                }
                table {
                    tr { th { "stage" } th { "share" } th { "soak" } th { "devices" } th { "progress" } th { "states" } }
                    @for st in &s.stages {
                        @let n = st.devices.max(1) as f64;
                        @let (ok, bad) = (st.committed as f64, st.failed as f64);
                        @let pending = st.states.get("pending").copied().unwrap_or(0) as f64;
                        @let busy = (n - ok - bad - pending).max(0.0);
                        tr {
                            td { (st.index) @if st.current { " (current)" } }
                            td { (st.percent) "%" }
                            td { (st.soak_seconds) "s" }
                            td { (st.devices) }
                            td {
                                div.bar {
                                    div.ok style=(format!("width:{:.1}%", 100.0 * ok / n)) {}
                                    div.bad style=(format!("width:{:.1}%", 100.0 * bad / n)) {}
                                    div.busy style=(format!("width:{:.1}%", 100.0 * busy / n)) {}
                                }
                            }
                            td {
                                @for (i, (k, v)) in st.states.iter().enumerate() {
                                    @if i > 0 { ", " }
                                    (v) " " (k)
                                }
                            }
                        }
                    }
                }
                @if controls {
                    p {
                        @for a in s.status.actions() {
                            form.inline method="post" action=(format!("/ui/rollouts/{}/{a}", s.id)) {
                                button type="submit" name="action" value=(a) { (a) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Failing devices" }
        @if failing.is_empty() {
            p { "None." }
        } @else {
            table {
                tr { th { "device" } th { "rollout" } th { "state" } th { "reason" } }
                @for (rollout, f) in &failing {
                    tr {
                        td { (f.device) } td { (rollout) } td { (f.state) }
                        td.reason { (f.reason.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        h2 { "Releases" }
        table {
            tr { th { "id" } th { "product" } th { "version" } th { "security version" } th { "size" } th { "uploaded" } }
            @for r in &releases {
                tr {
                    td { (r.id) } td { (r.product) } td { (r.version) } td { (r.security_version) }
                    td { (r.size) } td { (r.created_at) }
                }
            }
        }
        form method="post" action="/ui/logout" { p { button type="submit" { "Sign out" } } }
    };
    Ok(page("Abide fleet", body))
}

fn redirect(to: &str, cookie: Option<String>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    r.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")),
    );
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// `POST /ui/login`: checks the token and keeps it in the cookie.
pub async fn sign_in(State(server): State<Server>, body: Bytes) -> Response {
    let form = serde_urlencoded::from_bytes::<SignIn>(&body).unwrap_or(SignIn {
        token: String::new(),
    });
    let token = form.token.trim();
    let caller = if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) {
        crate::auth::caller_of(&server, token).await.ok()
    } else {
        None
    };
    let Some(caller) = caller else {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login("That is not an admin token.")),
        )
            .into_response();
    };
    let token_id = caller.actor.strip_prefix("token:").map(str::to_owned);
    let id = crate::random_hex(32);
    let now = crate::clock::now_ms();
    let ttl = i64::try_from(server.config.session_ttl.as_millis()).unwrap_or(i64::MAX);
    let stored = async {
        sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&server.db.pool)
            .await?;
        sqlx::query(
            "INSERT INTO web_sessions (id_hash, created_at, expires_at, role, token_id) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(crate::sha256_hex(id.as_bytes()))
        .bind(now)
        .bind(now.saturating_add(ttl))
        .bind(caller.role.as_str())
        .bind(token_id)
        .execute(&server.db.pool)
        .await
    };
    if let Err(e) = stored.await {
        return ApiError::from(e).into_response();
    }
    redirect(
        "/",
        Some(session_cookie(&server, &id, server.config.session_ttl)),
    )
}

/// `POST /ui/logout`: the session ends (its cookie no longer signs anyone in).
pub async fn sign_out(State(server): State<Server>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_token(&headers) {
        let ended = sqlx::query("DELETE FROM web_sessions WHERE id_hash = $1")
            .bind(crate::sha256_hex(id.as_bytes()))
            .execute(&server.db.pool)
            .await;
        if let Err(e) = ended {
            return ApiError::from(e).into_response();
        }
    }
    redirect(
        "/",
        Some(session_cookie(&server, "", std::time::Duration::ZERO)),
    )
}

/// `POST /ui/rollouts/{id}/{action}`: a control button.
pub async fn control(
    State(server): State<Server>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let caller = match session(&server, &headers).await {
        Ok(Some(caller)) if caller.role >= abide_fleet_json::Role::Operator => caller,
        Ok(Some(Caller { role, .. })) => {
            return (
                StatusCode::FORBIDDEN,
                Html(problem(&format!(
                    "This sign-in's role is {role}; the controls need operator or more."
                ))),
            )
                .into_response();
        }
        Ok(None) => {
            return (StatusCode::UNAUTHORIZED, Html(login("Sign in first."))).into_response();
        }
        Err(e) => return e.into_response(),
    };
    match crate::rollouts::apply_action(&server, &caller, &id, &action).await {
        Ok(_) => redirect(
            &format!(
                "/#{}",
                id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "")
            ),
            None,
        ),
        Err(e) => (e.status, Html(problem(&e.message))).into_response(),
    }
}
