//! The web page at `/`: releases, rollouts with their stage progress and device states, the
//! failing devices with their reasons, and the pause/resume/advance/abort/rollback controls.
//! Server-rendered HTML with plain forms and no JavaScript. An admin token is entered once;
//! the session it opens keeps its role (the controls need operator or more) and is named by a
//! random id in an HttpOnly, SameSite=Strict cookie (so another site cannot post the forms);
//! every value shown is HTML-escaped.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use crate::Server;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

const COOKIE: &str = "abide_admin";

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            kv.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
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

/// The cookie's attributes: `Secure` when the server speaks HTTPS.
fn cookie_attributes(server: &Server) -> &'static str {
    if server.config.tls.is_some() {
        "HttpOnly; SameSite=Strict; Path=/; Secure"
    } else {
        "HttpOnly; SameSite=Strict; Path=/"
    }
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 2em; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; }}
.status {{ font-weight: bold; padding: .1em .5em; border-radius: .3em; background: #eee; }}
.running {{ background: #d7ecff; }} .paused {{ background: #ffe9b3; }} .completed {{ background: #d5f5d5; }}
.aborted, .rolled_back {{ background: #f6d0d0; }}
.bar {{ display: flex; height: 1em; width: 20em; background: #eee; border-radius: .2em; overflow: hidden; }}
.ok {{ background: #3a3; }} .bad {{ background: #c33; }} .busy {{ background: #e9a21c; }}
.rollout {{ border: 1px solid #ccc; border-radius: .4em; padding: .6em 1em; margin: 1em 0; }}
form.inline {{ display: inline; }} button {{ margin-right: .3em; }}
.reason {{ color: #833; }}
</style></head><body>
{body}
</body></html>"#
    )
}

fn login(message: &str) -> String {
    page(
        "Abide fleet: sign in",
        &format!(
            r#"<h1>Abide fleet</h1>
<p>{}</p>
<form method="post" action="/ui/login">
<label>Admin token <input type="password" name="token" size="60" autofocus></label>
<button type="submit">Sign in</button>
</form>"#,
            escape(message)
        ),
    )
}

/// Percent-decoding of one form value.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `GET /`: the page, or the sign-in form.
pub async fn index(State(server): State<Server>, headers: HeaderMap) -> ApiResult<Response> {
    if session(&server, &headers).await?.is_none() {
        return Ok(Html(login(
            "Enter an admin token (the server wrote the first to DATA/admin.token).",
        ))
        .into_response());
    }
    Ok(Html(render(&server).await?).into_response())
}

async fn render(server: &Server) -> ApiResult<String> {
    let mut body = String::from("<h1>Abide fleet</h1>\n");
    let states = crate::devices::count_by_state(server).await?;
    let total: i64 = states.iter().map(|(_, n)| n).sum();
    let _ = write!(body, "<p>{total} devices");
    for (s, n) in &states {
        let _ = write!(body, " · {} {}", n, escape(s));
    }
    body.push_str(" · <a href=\"/metrics\">metrics</a></p>\n");

    body.push_str("<h2>Rollouts</h2>\n");
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM rollouts ORDER BY created_at DESC, id LIMIT 20")
            .fetch_all(&server.db.pool)
            .await?;
    if ids.is_empty() {
        body.push_str("<p>No rollouts yet.</p>\n");
    }
    let mut failing = Vec::new();
    for (id,) in &ids {
        let s = crate::rollouts::status_of(server, id).await?;
        let status = s.status.as_str();
        let _ = write!(
            body,
            "<div class=\"rollout\" id=\"{id}\"><p><b>{id}</b> of release {rel} <span class=\"status {status}\">{status}</span>{reason}</p>\n<p>{devices} devices: {committed} committed, {failed} failed, {busy} in progress, {pending} pending{prestage}</p>\n<table><tr><th>stage</th><th>share</th><th>soak</th><th>devices</th><th>progress</th><th>states</th></tr>\n",
            id = escape(id),
            rel = escape(&s.release),
            reason = s
                .reason
                .as_deref()
                .map(|r| format!(" <span class=\"reason\">{}</span>", escape(r)))
                .unwrap_or_default(),
            devices = s.devices,
            committed = s.committed,
            failed = s.failed,
            busy = s.in_progress,
            pending = s.pending,
            prestage = s
                .prestage
                .as_deref()
                .map(|p| format!(
                    "; {}% staged (activation waits for {})",
                    s.staged_share,
                    escape(p)
                ))
                .unwrap_or_default(),
        );
        for st in &s.stages {
            let n = st.devices.max(1) as f64;
            let ok = st.committed as f64;
            let bad = st.failed as f64;
            let pending = st.states.get("pending").copied().unwrap_or(0) as f64;
            let busy = (n - ok - bad - pending).max(0.0);
            let states: Vec<String> = st
                .states
                .iter()
                .map(|(k, v)| format!("{} {}", v, escape(k)))
                .collect();
            let _ = writeln!(
                body,
                "<tr><td>{}{}</td><td>{}%</td><td>{}s</td><td>{}</td><td><div class=\"bar\"><div class=\"ok\" style=\"width:{:.1}%\"></div><div class=\"bad\" style=\"width:{:.1}%\"></div><div class=\"busy\" style=\"width:{:.1}%\"></div></div></td><td>{}</td></tr>",
                st.index,
                if st.current { " (current)" } else { "" },
                st.percent,
                st.soak_seconds,
                st.devices,
                100.0 * ok / n,
                100.0 * bad / n,
                100.0 * busy / n,
                states.join(", ")
            );
        }
        body.push_str("</table>\n<p>");
        for a in s.status.actions() {
            let _ = write!(
                body,
                "<form class=\"inline\" method=\"post\" action=\"/ui/rollouts/{}/{a}\"><button type=\"submit\" name=\"action\" value=\"{a}\">{a}</button></form>",
                escape(id)
            );
        }
        body.push_str("</p></div>\n");
        for f in s.failing {
            failing.push((id.clone(), f));
        }
    }

    body.push_str("<h2>Failing devices</h2>\n");
    if failing.is_empty() {
        body.push_str("<p>None.</p>\n");
    } else {
        body.push_str(
            "<table><tr><th>device</th><th>rollout</th><th>state</th><th>reason</th></tr>\n",
        );
        for (rollout, f) in failing.iter().take(200) {
            let _ = writeln!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
                escape(&f.device),
                escape(rollout),
                escape(&f.state),
                escape(f.reason.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</table>\n");
    }

    body.push_str("<h2>Releases</h2>\n<table><tr><th>id</th><th>product</th><th>version</th><th>security version</th><th>size</th><th>uploaded</th></tr>\n");
    let releases: Vec<(String, String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT id, product, version, security_version, size, created_at FROM releases ORDER BY created_at DESC, id LIMIT 50",
    )
    .fetch_all(&server.db.pool)
    .await?;
    for (id, product, version, security, size, at) in releases {
        let _ = writeln!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{security}</td><td>{size}</td><td>{}</td></tr>",
            escape(&id),
            escape(&product),
            escape(&version),
            crate::clock::rfc3339(at)
        );
    }
    body.push_str("</table>\n<form method=\"post\" action=\"/ui/logout\"><p><button type=\"submit\">Sign out</button></p></form>\n");
    Ok(page("Abide fleet", &body))
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
    let token = form_value(&body, "token").unwrap_or_default();
    let token = token.trim();
    let caller = if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) {
        let mut headers = HeaderMap::new();
        match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(v) => {
                headers.insert(header::AUTHORIZATION, v);
                crate::auth::caller(&server, &headers).await.ok()
            }
            Err(_) => None,
        }
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
        Some(format!(
            "{COOKIE}={id}; {}; Max-Age={}",
            cookie_attributes(&server),
            server.config.session_ttl.as_secs()
        )),
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
        Some(format!(
            "{COOKIE}=; {}; Max-Age=0",
            cookie_attributes(&server)
        )),
    )
}

/// `POST /ui/rollouts/{id}/{action}`: a control button.
pub async fn control(
    State(server): State<Server>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let caller = match session(&server, &headers).await {
        Ok(Some(caller)) if caller.role >= abide_proto::Role::Operator => caller,
        Ok(Some(Caller { role, .. })) => {
            return (
                StatusCode::FORBIDDEN,
                Html(page(
                    "Abide fleet",
                    &format!(
                        "<h1>Abide fleet</h1><p class=\"reason\">This sign-in's role is {role}; the controls need operator or more.</p><p><a href=\"/\">Back</a></p>"
                    ),
                )),
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
        Err(e) => (
            e.status,
            Html(page(
                "Abide fleet",
                &format!(
                    "<h1>Abide fleet</h1><p class=\"reason\">{}</p><p><a href=\"/\">Back</a></p>",
                    escape(&e.message)
                ),
            )),
        )
            .into_response(),
    }
}
