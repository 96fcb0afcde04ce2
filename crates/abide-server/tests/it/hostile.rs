//! Hostile clients: enrolment tokens that cannot be abused, rate limits, credentials checked
//! before a body is read, slow bodies cut off. Every refusal is checked to change nothing.

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Backend, Harness, on_both};

on_both!(
    an_enrolment_token_enrols_as_many_devices_as_it_may_and_no_more,
    an_enrolment_token_binds_device_ids_product_and_tags,
    a_revoked_token_enrols_no_more,
    a_revoked_device_is_refused_everywhere_and_its_id_stays_taken,
);

/// Group names, tags and device ids that could be read as paths (`.`, `..`, or one
/// percent-encoded) are refused with 400, and nothing is made.
#[test]
fn names_that_are_paths_are_refused_and_make_nothing() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        let admin = h.admin.clone();
        for path in [
            "/api/v1/groups/..",
            "/api/v1/groups/%2e%2e",
            "/api/v1/groups/.",
            "/api/v1/groups/.hidden",
            "/api/v1/groups/a..b",
            "/api/v1/groups/%2Fetc",
        ] {
            let r = h.json(Method::PUT, path, Some(&admin), json!({})).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.json());
            assert!(
                r.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("starting with a letter or digit"),
                "{path}: {}",
                r.json()
            );
        }
        let groups = || async {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM groups")
                .fetch_one(&h.server.db.pool)
                .await
                .unwrap();
            n
        };
        assert_eq!(groups().await, 0);
        // The same syntax holds for an enrolment token's group and tags, and a device's id.
        for body in [
            json!({"group": ".."}),
            json!({"group": "lab", "tags": [".."]}),
            json!({"group": "lab", "tags": ["ok", ".x"]}),
            json!({"group": "lab", "device_ids": [".."]}),
        ] {
            let r = h
                .json(
                    Method::POST,
                    "/api/v1/enroll-tokens",
                    Some(&admin),
                    body.clone(),
                )
                .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.json());
        }
        let (t, _) = token(&h, json!({"group": "lab"})).await;
        for id in ["..", "a..b", "-gw"] {
            let (status, body) = enroll(&h, &t, id, json!({})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{id}: {body}");
        }
        // A good name still makes a group.
        let r = h
            .json(
                Method::PUT,
                "/api/v1/groups/lab-2.east",
                Some(&admin),
                json!({}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json());
        assert_eq!(groups().await, 1);
    });
}

async fn token(h: &Harness, body: serde_json::Value) -> (String, String) {
    let admin = h.admin.clone();
    let t = h
        .json(Method::POST, "/api/v1/enroll-tokens", Some(&admin), body)
        .await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.json());
    (
        t.json()["token"].as_str().unwrap().to_owned(),
        t.json()["id"].as_str().unwrap().to_owned(),
    )
}

async fn enroll(
    h: &Harness,
    token: &str,
    id: &str,
    extra: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    let mut body = json!({"token": token, "device_id": id, "product": "acme-gateway",
                          "compatible": ["acme-gw"]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = h
        .json(Method::POST, "/api/v1/device/enroll", None, body)
        .await;
    (r.status, r.json())
}

async fn count(h: &Harness, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap()
}

/// A device's check-in: healthy, running `version` in group A.
fn checkin_body(version: &str) -> serde_json::Value {
    json!({"nonce": "00112233445566778899aabbccddeeff", "version": version,
           "booted": "A", "good": "A", "state": "idle", "health": "healthy"})
}

/// How many audit records have `action`.
async fn audited(h: &Harness, action: &str) -> i64 {
    count(
        h,
        &format!("SELECT COUNT(*) FROM audit WHERE action = '{action}'"),
    )
    .await
}

fn message(v: &serde_json::Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn an_enrolment_token_enrols_as_many_devices_as_it_may_and_no_more(backend: Backend) {
    let h = Harness::new(backend).await;
    // By default a token enrols one device.
    let (once, once_id) = token(&h, json!({"group": "lab"})).await;
    assert_eq!(
        enroll(&h, &once, "gw-1", json!({})).await.0,
        StatusCode::CREATED
    );
    let (status, body) = enroll(&h, &once, "gw-2", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message(&body).contains("used up (1 of 1"), "{body}");
    assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, 1);
    // Twelve devices at once on a token for five: exactly five get in.
    let (five, five_id) = token(&h, json!({"group": "lab", "uses": 5})).await;
    let mut racing = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (server, five) = (h.server.clone(), five.clone());
        racing.spawn(async move {
            let body = json!({"token": five, "device_id": format!("race-{i}"),
                              "product": "acme-gateway", "compatible": ["acme-gw"]});
            let req = axum::http::Request::post("/api/v1/device/enroll")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.to_string()))
                .unwrap();
            tower::ServiceExt::oneshot(abide_server::app(server), req)
                .await
                .unwrap()
                .status()
        });
    }
    let statuses: Vec<StatusCode> = racing.join_all().await;
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::FORBIDDEN)
        .count();
    assert_eq!((created, refused), (5, 7), "{statuses:?}");
    assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, 6);
    // The list shows each token's uses, without its secret.
    let list = h.get("/api/v1/enroll-tokens").await.json();
    let used: Vec<(String, u64, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert!(t.get("token").is_none(), "no secret in the list: {t}");
            (
                t["id"].as_str().unwrap().to_owned(),
                t["used"].as_u64().unwrap(),
                t["uses"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(used, vec![(once_id, 1, 1), (five_id, 5, 5)]);
    // Refusals with a known token are in the audit trail.
    assert_eq!(audited(&h, "device.enroll-refused").await, 8);
}

async fn an_enrolment_token_binds_device_ids_product_and_tags(backend: Backend) {
    let h = Harness::new(backend).await;
    let (bound, _) = token(
        &h,
        json!({"group": "prod", "tags": ["canary"], "uses": 10, "device_ids": ["gw-7"]}),
    )
    .await;
    let (pattern, _) = token(
        &h,
        json!({"group": "edge", "uses": 10, "device_id_pattern": "edge-??-*", "product": "acme-gateway"}),
    )
    .await;
    let before = count(&h, "SELECT COUNT(*) FROM devices").await;
    let used_before = count(
        &h,
        "SELECT CAST(COALESCE(SUM(used), 0) AS BIGINT) FROM enroll_tokens",
    )
    .await;
    for (token, id, extra, status, says) in [
        // Another id than the token names: it cannot squat a real device's id.
        (
            &bound,
            "gw-9",
            json!({}),
            StatusCode::FORBIDDEN,
            "does not enrol device gw-9",
        ),
        // Tags come from the token only.
        (
            &bound,
            "gw-7",
            json!({"tags": ["prod"]}),
            StatusCode::FORBIDDEN,
            "come from its enrolment token",
        ),
        (
            &pattern,
            "edge-1-a",
            json!({}),
            StatusCode::FORBIDDEN,
            "does not match the enrolment token's pattern",
        ),
        (
            &pattern,
            "edge-01-a",
            json!({"product": "other"}),
            StatusCode::FORBIDDEN,
            "enrols product acme-gateway",
        ),
        (
            &pattern,
            "edge-01-a",
            json!({"group": "prod"}),
            StatusCode::FORBIDDEN,
            "enrols into group edge",
        ),
    ] {
        let (got, body) = enroll(&h, token, id, extra.clone()).await;
        assert_eq!(got, status, "{id} {extra}: {body}");
        assert!(message(&body).contains(says), "{id} {extra}: {body}");
    }
    assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, before);
    assert_eq!(
        count(
            &h,
            "SELECT CAST(COALESCE(SUM(used), 0) AS BIGINT) FROM enroll_tokens"
        )
        .await,
        used_before
    );
    // What the token allows goes through, with the token's group and tags.
    assert_eq!(
        enroll(&h, &bound, "gw-7", json!({})).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        enroll(&h, &pattern, "edge-01-a", json!({})).await.0,
        StatusCode::CREATED
    );
    let devices = h.get("/api/v1/devices").await.json();
    let gw7 = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "gw-7")
        .unwrap();
    assert_eq!(
        (gw7["group"].as_str(), &gw7["tags"]),
        (Some("prod"), &json!(["canary"]))
    );
    // gw-9, whose id the bound token could not take, enrols with its own.
    let (own, _) = token(&h, json!({"group": "prod", "device_ids": ["gw-9"]})).await;
    assert_eq!(
        enroll(&h, &own, "gw-9", json!({})).await.0,
        StatusCode::CREATED
    );
    // A token's bindings are checked when it is made.
    let admin = h.admin.clone();
    for bad in [
        json!({"group": "lab", "uses": 0}),
        json!({"group": "lab", "uses": 2_000_000}),
        json!({"group": "lab", "device_ids": ["../x"]}),
        json!({"group": "lab", "device_id_pattern": "gw/*"}),
        json!({"group": "lab", "product": "a b"}),
    ] {
        let r = h
            .json(
                Method::POST,
                "/api/v1/enroll-tokens",
                Some(&admin),
                bad.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.json());
    }
}

async fn a_revoked_token_enrols_no_more(backend: Backend) {
    let h = Harness::new(backend).await;
    let (t, id) = token(&h, json!({"group": "lab", "uses": 10})).await;
    assert_eq!(
        enroll(&h, &t, "gw-1", json!({})).await.0,
        StatusCode::CREATED
    );
    let path = format!("/api/v1/enroll-tokens/{id}");
    let r = h.call(Method::DELETE, &path, None, &[], vec![]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let admin = h.admin.clone();
    let r = h
        .call(Method::DELETE, &path, Some(&admin), &[], vec![])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    assert!(r.json()["revoked_at"].as_str().is_some());
    assert_eq!(r.json()["used"], 1);
    let (status, body) = enroll(&h, &t, "gw-2", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message(&body).contains("was revoked"), "{body}");
    assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, 1);
    // Revoking again changes nothing; an unknown token is 404.
    let again = h
        .call(Method::DELETE, &path, Some(&admin), &[], vec![])
        .await;
    assert_eq!(again.json()["revoked_at"], r.json()["revoked_at"]);
    let none = h
        .call(
            Method::DELETE,
            "/api/v1/enroll-tokens/t-nope",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert_eq!(audited(&h, "enroll-token.revoke").await, 1);
}

#[test]
fn enrolment_attempts_are_rate_limited_per_address() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        let mut config = h.server.config.clone();
        config.enroll_per_minute = 5;
        let (server, _) = abide_server::Server::start(config).await.unwrap();
        let h = Harness { server, ..h };
        let (good, _) = token(&h, json!({"group": "lab"})).await;
        for i in 0..5 {
            let (status, _) = enroll(&h, "abide-enroll-guess", &format!("gw-{i}"), json!({})).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        // The sixth attempt is refused before anything is looked at, even with a good token.
        let (status, body) = enroll(&h, &good, "gw-9", json!({})).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert!(
            message(&body).contains("(at most 5 a minute); retry in 12 s"),
            "{body}"
        );
        assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, 0);
        assert_eq!(
            count(
                &h,
                "SELECT CAST(COALESCE(SUM(used), 0) AS BIGINT) FROM enroll_tokens"
            )
            .await,
            0
        );
    });
}

/// A server on a real socket with `body_timeout`.
async fn listening(
    h: &Harness,
    body_timeout: Duration,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let mut config = h.server.config.clone();
    config.body_timeout = body_timeout;
    let (server, _) = abide_server::Server::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(abide_server::serve(server, listener)))
}

/// Sends `head` (and nothing more) and reads what comes back within `wait`: the answer, and
/// whether the server closed the connection.
async fn half_request(addr: std::net::SocketAddr, head: &str, wait: Duration) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[test]
fn credentials_are_checked_before_a_body_is_read() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        let (addr, serving) = listening(&h, Duration::from_secs(60)).await;
        // Each announces a 10 MB body and sends none: the answer comes at once, not after the
        // body (which would take the 60 s body timeout).
        for (path, auth) in [
            ("/api/v1/rollouts", ""),
            (
                "/api/v1/releases",
                "authorization: Bearer not-the-admin\r\n",
            ),
            ("/api/v1/enroll-tokens", ""),
            (
                "/api/v1/device/report",
                "authorization: Bearer gw-1:nope\r\n",
            ),
            ("/api/v1/device/checkin", ""),
            ("/api/v1/trust", ""),
        ] {
            let started = Instant::now();
            let head = format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
            );
            let (answer, closed) = half_request(addr, &head, Duration::from_secs(5)).await;
            assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
            assert!(
                closed,
                "{path}: the connection is closed, the body never read"
            );
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{path}: {:?}",
                started.elapsed()
            );
        }
        serving.abort();
    });
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_cut_off_and_changes_nothing() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        let (addr, serving) = listening(&h, Duration::from_secs(1)).await;
        let admin = h.admin.clone();
        // A JSON body of which 10 of 100 bytes arrive.
        let head = format!(
            "POST /api/v1/rollouts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"release\""
        );
        let started = Instant::now();
        let (answer, closed) = half_request(addr, &head, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(closed);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        // An upload that stops sending: cut off after a second without data, no release and
        // no partial file left.
        let head = format!(
            "POST /api/v1/releases HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-length: 1000000\r\n\r\nABIDE"
        );
        let (answer, closed) = half_request(addr, &head, Duration::from_secs(5)).await;
        assert!(
            closed,
            "the stalled upload's connection is closed: {answer}"
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
        assert_eq!(count(&h, "SELECT COUNT(*) FROM releases").await, 0);
        assert_eq!(count(&h, "SELECT COUNT(*) FROM rollouts").await, 0);
        let tmp: Vec<_> = std::fs::read_dir(h.dir.path().join("tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "{tmp:?}");
        serving.abort();
    });
}

#[test]
fn a_bucket_allows_its_burst_then_its_rate() {
    let clock = governor::clock::FakeRelativeClock::default();
    let b = abide_server::limit::Buckets::with_clock(6, clock.clone());
    let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    for _ in 0..6 {
        assert_eq!(b.take(ip), Ok(()));
    }
    assert_eq!(b.take(ip), Err(10), "one more every 10 s");
    let other = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(b.take(other), Ok(()), "another address has its own bucket");
    clock.advance(Duration::from_secs(4));
    assert_eq!(b.take(ip), Err(6), "the wait counts down");
    clock.advance(Duration::from_secs(6));
    assert_eq!(b.take(ip), Ok(()));
    assert!(b.take(ip).is_err());
    let none = abide_server::limit::Buckets::with_clock(0, clock);
    assert_eq!(none.take(ip), Err(60), "0 a minute allows none");
}

#[test]
fn connections_are_counted_until_dropped() {
    let c = abide_server::limit::Connections::default();
    let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let a = c.hold(ip, 2).unwrap();
    let _b = c.hold(ip, 2).unwrap();
    assert!(c.hold(ip, 2).is_none());
    drop(a);
    assert!(c.hold(ip, 2).is_some());
}

async fn a_revoked_device_is_refused_everywhere_and_its_id_stays_taken(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let device = h.enroll("gw-1", "lab").await;
    let other = h.enroll("gw-2", "lab").await;
    let checkin = checkin_body("1.0.0");
    let c = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&device),
            checkin.clone(),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    let lease = h
        .json(
            Method::POST,
            "/api/v1/device/lease",
            Some(&device),
            json!({}),
        )
        .await;
    assert_eq!(lease.status, StatusCode::OK, "{}", lease.json());
    // Only the admin revokes.
    let r = h
        .call(
            Method::POST,
            "/api/v1/devices/gw-1/revoke",
            Some(&other),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = h
        .call(
            Method::POST,
            "/api/v1/devices/gw-1/revoke",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let revoked_at = r.json()["revoked_at"].as_str().unwrap().to_owned();
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM leases").await,
        0,
        "its lease is given back"
    );
    // Every device route refuses its credential now (it was in the cache).
    for (method, path, body) in [
        (Method::POST, "/api/v1/device/checkin", checkin.clone()),
        (Method::POST, "/api/v1/device/report", json!({})),
        (Method::POST, "/api/v1/device/lease", json!({})),
    ] {
        let r = h.json(method, path, Some(&device), body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            message(&r.json()).contains("revoked"),
            "{path}: {}",
            r.json()
        );
    }
    // The other device is not affected.
    let c = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&other),
            checkin.clone(),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    // The record stays, marked; the id cannot be enrolled again.
    let list = h.get("/api/v1/devices").await.json();
    let gw1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "gw-1")
        .unwrap();
    assert_eq!(gw1["revoked_at"], revoked_at.as_str());
    let (t, _) = token(&h, json!({"group": "lab"})).await;
    assert_eq!(
        enroll(&h, &t, "gw-1", json!({})).await.0,
        StatusCode::CONFLICT
    );
    // Revoking again changes nothing; an unknown device is 404.
    let again = h
        .call(
            Method::POST,
            "/api/v1/devices/gw-1/revoke",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(again.json()["revoked_at"], revoked_at.as_str());
    let none = h
        .call(
            Method::POST,
            "/api/v1/devices/gw-9/revoke",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    // A revoked device does not count towards its group's quorum (it checked in healthy
    // before it was revoked).
    let r = h
        .json(
            Method::PUT,
            "/api/v1/groups/lab",
            Some(&admin),
            json!({"quorum": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let refused = h
        .json(
            Method::POST,
            "/api/v1/device/lease",
            Some(&other),
            json!({}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.json());
    assert_eq!(audited(&h, "device.revoke").await, 1);
}

/// Two server processes on one PostgreSQL: a device revoked through one is refused by the
/// other, which had its credential cached, within seconds.
#[test]
fn a_revocation_reaches_the_other_server_process_within_seconds() {
    crate::run(async {
        let h = Harness::new(Backend::Postgres).await;
        let (second, _) = abide_server::Server::start(h.server.config.clone())
            .await
            .unwrap();
        abide_server::spawn_background(&second);
        let h2 = Harness {
            server: second,
            dir: tempfile::tempdir().unwrap(),
            admin: h.admin.clone(),
            pg: None,
        };
        let device = h.enroll("gw-1", "lab").await;
        let checkin = checkin_body("1.0.0");
        let c = h2
            .json(
                Method::POST,
                "/api/v1/device/checkin",
                Some(&device),
                checkin.clone(),
            )
            .await;
        assert_eq!(
            c.status,
            StatusCode::OK,
            "the second process caches the credential"
        );
        let admin = h.admin.clone();
        let r = h
            .call(
                Method::POST,
                "/api/v1/devices/gw-1/revoke",
                Some(&admin),
                &[],
                vec![],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let revoked = Instant::now();
        loop {
            let c = h2
                .json(
                    Method::POST,
                    "/api/v1/device/checkin",
                    Some(&device),
                    checkin.clone(),
                )
                .await;
            if c.status == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(5),
                "still accepted after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(h2);
    });
}

/// A body larger than any JSON route takes is refused before any handler sees it, also on the
/// routes anyone may call.
#[test]
fn an_oversized_body_is_refused_before_any_handler() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        for path in ["/api/v1/device/enroll", "/ui/login"] {
            let r = h
                .call(Method::POST, path, None, &[], vec![b'x'; 100 << 10])
                .await;
            assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        }
        assert_eq!(count(&h, "SELECT COUNT(*) FROM devices").await, 0);
    });
}

/// Reads never write: the device list, a group's view and `/metrics` show check-ins not yet
/// written without writing them (the writer is left to the coalescing flusher).
#[test]
fn reads_show_pending_check_ins_without_writing_them() {
    crate::run(async {
        let h = Harness::new(Backend::Sqlite).await;
        let device = h.enroll("gw-1", "lab").await;
        let checkin = checkin_body("1.3.0");
        let c = h
            .json(
                Method::POST,
                "/api/v1/device/checkin",
                Some(&device),
                checkin,
            )
            .await;
        assert_eq!(c.status, StatusCode::OK);
        let written = || async {
            count(
                &h,
                "SELECT COUNT(*) FROM devices WHERE id = 'gw-1' AND version = '1.3.0'",
            )
            .await
        };
        assert_eq!(written().await, 0, "not written yet");
        let list = h.get("/api/v1/devices").await.json();
        assert_eq!(
            (list[0]["version"].as_str(), list[0]["health"].as_str()),
            (Some("1.3.0"), Some("healthy"))
        );
        assert!(list[0]["last_seen"].as_str().is_some());
        let idle = h.get("/api/v1/devices?state=idle").await.json();
        assert_eq!(idle.as_array().unwrap().len(), 1);
        let group = h.get("/api/v1/groups/lab").await.json();
        assert_eq!(
            (&group["members"], &group["healthy"]),
            (&json!(1), &json!(1))
        );
        let metrics = h.get("/metrics").await;
        assert_eq!(metrics.status, StatusCode::OK);
        assert_eq!(written().await, 0, "the reads wrote nothing");
        abide_server::devices::flush_last_seen(&h.server)
            .await
            .unwrap();
        assert_eq!(written().await, 1);
    });
}
