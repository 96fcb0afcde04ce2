//! Who may call what: every route of the API × every role and kind of credential, with the
//! exact status each gets; admin tokens made, listed and revoked; roles on the web page.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::{Backend, Harness, on_both};

on_both!(
    every_route_answers_every_role_and_credential_with_the_exact_status_and_refusals_change_nothing,
    an_admin_token_acts_under_its_own_name_and_stops_working_when_revoked,
    a_viewer_session_on_the_web_page_sees_but_cannot_press_the_controls,
);

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// No Authorization header.
    Nobody,
    /// A bearer token that is nothing.
    Garbage,
    /// An enrolled device's credential.
    Device,
    /// An enrolment token presented as a bearer token.
    Enrolment,
    /// The metrics token.
    Metrics,
    /// An admin token of role viewer.
    Viewer,
    /// An admin token of role operator.
    Operator,
    /// An admin token of role admin.
    AdminRole,
    /// The first start's `admin.token`.
    FirstAdmin,
    /// An admin token of role admin, revoked.
    Revoked,
}

const EVERYONE: [Who; 10] = [
    Who::Nobody,
    Who::Garbage,
    Who::Device,
    Who::Enrolment,
    Who::Metrics,
    Who::Viewer,
    Who::Operator,
    Who::AdminRole,
    Who::FirstAdmin,
    Who::Revoked,
];

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nothing.
    Public,
    /// The metrics token or any admin token.
    Metrics,
    /// An admin token of this role or more.
    Role(abide_fleet_json::Role),
    /// A device credential.
    Device,
    /// A device it was given to (a device asking for another release gets 403), or any admin
    /// token.
    DeviceOrViewer,
}

fn role_of(who: Who) -> Option<abide_fleet_json::Role> {
    use abide_fleet_json::Role;
    match who {
        Who::Viewer => Some(Role::Viewer),
        Who::Operator => Some(Role::Operator),
        Who::AdminRole | Who::FirstAdmin => Some(Role::Admin),
        _ => None,
    }
}

/// The status `who` gets from a route needing `need` whose handler answers `ok` to those
/// who may call it.
fn expected(need: Need, who: Who, ok: StatusCode) -> StatusCode {
    let role = role_of(who);
    match need {
        Need::Public => ok,
        Need::Metrics if role.is_some() || who == Who::Metrics => ok,
        Need::Role(r) => match role {
            Some(have) if have >= r => ok,
            Some(_) => StatusCode::FORBIDDEN,
            None => StatusCode::UNAUTHORIZED,
        },
        Need::Device if who == Who::Device => ok,
        Need::DeviceOrViewer if role.is_some() => ok,
        Need::DeviceOrViewer if who == Who::Device => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// Row counts of every table (what a refusal must leave alone).
async fn rows(h: &Harness) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in [
        "settings",
        "releases",
        "enroll_tokens",
        "admin_tokens",
        "web_sessions",
        "devices",
        "reports",
        "audit",
        "device_tags",
        "rollouts",
        "rollout_devices",
        "quarantine",
        "groups",
        "leases",
        "trust_roots",
    ] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&h.server.db.pool)
                .await
                .unwrap();
        out.push((table, n));
    }
    out
}

/// Makes an admin token of `role` with the first admin's token; returns (token, id).
async fn admin_token(h: &Harness, name: &str, role: &str) -> (String, String) {
    let admin = h.admin.clone();
    let r = h
        .json(
            Method::POST,
            "/api/v1/admin-tokens",
            Some(&admin),
            json!({"name": name, "role": role}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    (
        r.json()["token"].as_str().unwrap().to_owned(),
        r.json()["id"].as_str().unwrap().to_owned(),
    )
}

/// Revokes admin token `id` with the first admin's token `first`; the answer must be 200.
async fn revoke_admin_token(h: &Harness, first: &str, id: &str) -> crate::Answer {
    let r = h
        .call(
            Method::DELETE,
            &format!("/api/v1/admin-tokens/{id}"),
            Some(first),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    r
}

/// Whether the route template `template` (`/api/v1/rollouts/{id}`) matches `path`.
fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

/// The API routes the server's router declares (read from its source).
fn declared_routes() -> Vec<String> {
    let source = include_str!("../../src/lib.rs");
    let mut out = Vec::new();
    for piece in source.split(".route(").skip(1) {
        let literal = piece.trim_start().trim_start_matches('"');
        let path = &literal[..literal.find('"').unwrap()];
        if path.starts_with("/api/") || path == "/metrics" {
            out.push(path.to_owned());
        }
    }
    out
}

async fn every_route_answers_every_role_and_credential_with_the_exact_status_and_refusals_change_nothing(
    backend: Backend,
) {
    use abide_fleet_json::Role;
    let h = Harness::new(backend).await;
    let first = h.admin.clone();
    let device = h.enroll("gw-1", "lab").await;
    let metrics = std::fs::read_to_string(h.server.config.data.join("metrics.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (viewer, _) = admin_token(&h, "dashboard", "viewer").await;
    let (operator, _) = admin_token(&h, "on-call", "operator").await;
    let (admin, _) = admin_token(&h, "release-manager", "admin").await;
    let (revoked, revoked_id) = admin_token(&h, "former", "admin").await;
    revoke_admin_token(&h, &first, &revoked_id).await;
    let enrolment = h
        .json(
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&first),
            json!({"group": "lab", "uses": 5}),
        )
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bundle = abide_testkit::Fixture::default().build(&[&abide_testkit::key(0)]);
    let r = h
        .call(
            Method::POST,
            "/api/v1/releases",
            Some(&first),
            &[],
            bundle.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    let release = r.json()["id"].as_str().unwrap().to_owned();
    let credential = |who: Who| -> Option<String> {
        match who {
            Who::Nobody => None,
            Who::Garbage => Some("abide-nonsense".into()),
            Who::Device => Some(device.clone()),
            Who::Enrolment => Some(enrolment.clone()),
            Who::Metrics => Some(metrics.clone()),
            Who::Viewer => Some(viewer.clone()),
            Who::Operator => Some(operator.clone()),
            Who::AdminRole => Some(admin.clone()),
            Who::FirstAdmin => Some(first.clone()),
            Who::Revoked => Some(revoked.clone()),
        }
    };
    let checkin = json!({"nonce": "00112233445566778899aabbccddeeff", "version": "1.0.0",
                         "booted": "A", "good": "A", "state": "idle", "health": "healthy"});
    let (viewer_role, operator_role, admin_role) = (
        Need::Role(Role::Viewer),
        Need::Role(Role::Operator),
        Need::Role(Role::Admin),
    );
    let body = |v: serde_json::Value| v.to_string().into_bytes();
    // (method, path, body, what it needs, what those who may call it get). Bodies that would
    // change something twice name what does not exist (a 404 proves the handler was reached).
    let routes: Vec<(Method, String, Vec<u8>, Need, StatusCode)> = vec![
        (
            Method::GET,
            "/api/v1/health".into(),
            vec![],
            Need::Public,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/server-key".into(),
            vec![],
            Need::Public,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/metrics".into(),
            vec![],
            Need::Metrics,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/releases".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/releases".into(),
            bundle.clone(),
            admin_role,
            StatusCode::CONFLICT,
        ),
        (
            Method::GET,
            format!("/api/v1/releases/{release}"),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::GET,
            format!("/api/v1/releases/{release}/bundle"),
            vec![],
            Need::DeviceOrViewer,
            StatusCode::OK,
        ),
        (
            Method::GET,
            format!("/api/v1/releases/{release}/deltas"),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            format!("/api/v1/releases/{release}/deltas"),
            body(json!({"from": "r-none"})),
            admin_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/api/v1/deltas".into(),
            b"not a delta".to_vec(),
            admin_role,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::GET,
            format!("/api/v1/releases/{release}/deltas/r-none"),
            vec![],
            Need::DeviceOrViewer,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/enroll-tokens".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens".into(),
            body(json!({"group": "lab"})),
            admin_role,
            StatusCode::CREATED,
        ),
        (
            Method::DELETE,
            "/api/v1/enroll-tokens/t-none".into(),
            vec![],
            admin_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/admin-tokens".into(),
            vec![],
            admin_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/admin-tokens".into(),
            body(json!({"name": "ci", "role": "viewer"})),
            admin_role,
            StatusCode::CREATED,
        ),
        (
            Method::DELETE,
            "/api/v1/admin-tokens/at-none".into(),
            vec![],
            admin_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/devices".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/devices/gw-none/revoke".into(),
            body(json!({})),
            operator_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/rollouts".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/rollouts".into(),
            body(json!({"release": "r-none", "stages": "100", "group": "lab"})),
            operator_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/rollouts/ro-none".into(),
            vec![],
            viewer_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/api/v1/rollouts/ro-none/pause".into(),
            vec![],
            operator_role,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/api/v1/groups/lab".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::PUT,
            "/api/v1/groups/lab".into(),
            body(json!({"max_unavailable": 2})),
            admin_role,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/trust".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/trust".into(),
            b"{}".to_vec(),
            admin_role,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::GET,
            "/api/v1/audit".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/audit/verify".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/audit/head".into(),
            vec![],
            viewer_role,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/device/enroll".into(),
            body(json!({})),
            Need::Public,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/v1/device/checkin".into(),
            body(checkin),
            Need::Device,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/device/report".into(),
            b"{}".to_vec(),
            Need::Device,
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/api/v1/device/lease".into(),
            b"{}".to_vec(),
            Need::Device,
            StatusCode::OK,
        ),
        (
            Method::DELETE,
            "/api/v1/device/lease".into(),
            vec![],
            Need::Device,
            StatusCode::OK,
        ),
    ];
    // The table covers every route the router declares.
    let declared = declared_routes();
    assert!(declared.len() >= 20, "{declared:?}");
    for template in declared {
        assert!(
            routes.iter().any(|(_, path, ..)| matches(&template, path)),
            "{template} is not in the table"
        );
    }
    let mut checked = 0;
    for (method, path, body, need, ok) in &routes {
        for who in EVERYONE {
            let before = rows(&h).await;
            let r = h
                .call(
                    method.clone(),
                    path,
                    credential(who).as_deref(),
                    &[("content-type", "application/json")],
                    body.clone(),
                )
                .await;
            let want = expected(*need, who, *ok);
            assert_eq!(
                r.status,
                want,
                "{method} {path} as {who:?}: {}",
                String::from_utf8_lossy(&r.body)
            );
            if want == StatusCode::UNAUTHORIZED || want == StatusCode::FORBIDDEN {
                assert_eq!(
                    rows(&h).await,
                    before,
                    "{method} {path} as {who:?} changed nothing"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes.len() * EVERYONE.len());
}

async fn an_admin_token_acts_under_its_own_name_and_stops_working_when_revoked(backend: Backend) {
    let h = Harness::new(backend).await;
    let first = h.admin.clone();
    let (operator, id) = admin_token(&h, "on-call", "operator").await;
    // Bad requests change nothing.
    for bad in [
        json!({"name": "on call", "role": "operator"}),
        json!({"name": "x", "role": "superuser"}),
        json!({"name": "", "role": "viewer"}),
    ] {
        let before = rows(&h).await;
        let r = h
            .json(
                Method::POST,
                "/api/v1/admin-tokens",
                Some(&first),
                bad.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.json());
        assert_eq!(rows(&h).await, before);
    }
    // An operator cannot make itself an admin.
    let r = h
        .json(
            Method::POST,
            "/api/v1/admin-tokens",
            Some(&operator),
            json!({"name": "me", "role": "admin"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "role");
    // Its actions are audited under its id.
    let r = h
        .json(
            Method::POST,
            "/api/v1/devices/gw-none/revoke",
            Some(&operator),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    h.enroll("gw-1", "lab").await;
    let r = h
        .json(
            Method::POST,
            "/api/v1/devices/gw-1/revoke",
            Some(&operator),
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let audit = h
        .call(Method::GET, "/api/v1/audit", Some(&operator), &[], vec![])
        .await
        .json();
    let actors: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        actors.contains(&("admin".into(), "admin-token.create".into())),
        "{actors:?}"
    );
    assert!(
        actors.contains(&(format!("token:{id}"), "device.revoke".into())),
        "{actors:?}"
    );
    // Listed without its secret.
    let list = h
        .call(
            Method::GET,
            "/api/v1/admin-tokens",
            Some(&first),
            &[],
            vec![],
        )
        .await;
    assert_eq!(list.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&list.body).into_owned();
    assert!(!text.contains(&operator), "no secret in the list");
    assert_eq!(list.json()[0]["name"], "on-call");
    assert_eq!(list.json()[0]["role"], "operator");
    assert!(list.json()[0]["revoked_at"].is_null());
    // Revoked: refused from the next request on.
    let r = revoke_admin_token(&h, &first, &id).await;
    assert!(r.json()["revoked_at"].is_string());
    let r = h
        .call(Method::GET, "/api/v1/devices", Some(&operator), &[], vec![])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A second revocation changes nothing and is not audited twice.
    let audits = rows(&h).await;
    revoke_admin_token(&h, &first, &id).await;
    assert_eq!(rows(&h).await, audits);
}

async fn rollout_status(h: &Harness, admin: &str, rollout: &str) -> String {
    h.call(
        Method::GET,
        &format!("/api/v1/rollouts/{rollout}"),
        Some(admin),
        &[],
        vec![],
    )
    .await
    .json()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Signs in on the web page with `token`; returns the cookie.
async fn sign_in(h: &Harness, token: &str) -> String {
    let r = h
        .call(
            Method::POST,
            "/ui/login",
            None,
            &[("content-type", "application/x-www-form-urlencoded")],
            format!("token={token}").into_bytes(),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::SEE_OTHER,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let cookie = r.headers["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

async fn a_viewer_session_on_the_web_page_sees_but_cannot_press_the_controls(backend: Backend) {
    let h = Harness::new(backend).await;
    let first = h.admin.clone();
    let (viewer, _) = admin_token(&h, "wall", "viewer").await;
    let (operator, operator_id) = admin_token(&h, "on-call", "operator").await;
    h.enroll("gw-1", "lab").await;
    let bundle = abide_testkit::Fixture::default().build(&[&abide_testkit::key(0)]);
    let release = h
        .call(Method::POST, "/api/v1/releases", Some(&first), &[], bundle)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let rollout = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&first),
            json!({"release": release, "stages": "100", "group": "lab"}),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = rollout_status(&h, &first, &rollout).await;
    let cookie = sign_in(&h, &viewer).await;
    let page = h
        .call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&page.body).into_owned();
    assert!(text.contains(&rollout));
    assert!(
        !text.contains(&format!("/ui/rollouts/{rollout}/pause")),
        "a viewer is shown no controls"
    );
    let press = h
        .call(
            Method::POST,
            &format!("/ui/rollouts/{rollout}/pause"),
            None,
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(press.status, StatusCode::FORBIDDEN);
    assert_eq!(
        rollout_status(&h, &first, &rollout).await,
        before,
        "the viewer paused nothing"
    );
    // An operator's session may; and its sessions end when its token is revoked.
    let cookie = sign_in(&h, &operator).await;
    let page = h
        .call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
        .await;
    assert!(String::from_utf8_lossy(&page.body).contains(&format!("/ui/rollouts/{rollout}/pause")));
    let press = h
        .call(
            Method::POST,
            &format!("/ui/rollouts/{rollout}/pause"),
            None,
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(
        press.status,
        StatusCode::SEE_OTHER,
        "{}",
        String::from_utf8_lossy(&press.body)
    );
    assert_eq!(rollout_status(&h, &first, &rollout).await, "paused");
    revoke_admin_token(&h, &first, &operator_id).await;
    let press = h
        .call(
            Method::POST,
            &format!("/ui/rollouts/{rollout}/resume"),
            None,
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(press.status, StatusCode::UNAUTHORIZED);
    assert_eq!(rollout_status(&h, &first, &rollout).await, "paused");
}
