//! Every endpoint: what it answers, what it refuses, and that a refusal changes nothing.

use abide_bundle::PublicKey;
use abide_testkit::{Fixture, key};
use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::{Backend, Harness, on_both};

on_both!(
    a_database_from_before_the_migrator_is_upgraded_in_place,
    first_start_writes_the_admin_token_and_the_signing_key,
    releases_are_verified_stored_and_served_with_ranges,
    enrolment_and_signed_check_ins,
    reports_are_idempotent_and_ordered,
    the_audit_chain_verifies_and_finds_tampering,
    hostile_requests_get_4xx_and_change_nothing,
    removed_devices_get_401_and_old_reports_do_not_quarantine,
    reports_about_releases_not_assigned_are_refused,
    partial_uploads_left_by_a_crash_are_removed_at_start,
    idle_and_slow_clients_are_cut_off_and_health_answers_meanwhile,
);

/// A release (the default fixture bundle) and a rollout of it to `group`: (release, rollout).
async fn rolled_out(h: &Harness, group: &str) -> (String, String) {
    let bundle = abide_testkit::Fixture::default().build(&[&abide_testkit::key(0)]);
    let admin = h.admin.clone();
    let r = h
        .call(Method::POST, "/api/v1/releases", Some(&admin), &[], bundle)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    let release = r.json()["id"].as_str().unwrap().to_owned();
    let ro = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&admin),
            json!({"release": release, "stages": "100", "group": group}),
        )
        .await;
    assert_eq!(ro.status, StatusCode::CREATED, "{}", ro.json());
    (release, ro.json()["id"].as_str().unwrap().to_owned())
}

async fn count(h: &Harness, table: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap();
    n
}

async fn first_start_writes_the_admin_token_and_the_signing_key(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::new(backend).await;
    for f in ["admin.token", "server.key"] {
        let mode = std::fs::metadata(h.dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(h.admin.starts_with("abide-admin-"));
    assert_eq!(h.get("/api/v1/releases").await.status, StatusCode::OK);
    let wrong = h
        .call(
            Method::GET,
            "/api/v1/releases",
            Some("abide-admin-00"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized".into())
    );
    // A second start on the same data directory and database keeps both.
    let key_before = std::fs::read(h.dir.path().join("server.key")).unwrap();
    let mut config = abide_server::Config::new(h.dir.path());
    config.db = h.pg.as_ref().map(abide_testkit::pg::Postgres::url);
    if matches!(backend, Backend::Postgres) {
        // A second process with its own directory: it must be given the key.
        let other = tempfile::tempdir().unwrap();
        crate::trust_file(other.path());
        let mut c2 = abide_server::Config::new(other.path());
        c2.db = config.db.clone();
        let err = abide_server::Server::start(c2.clone())
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("copy server.key"), "{err}");
        std::fs::copy(
            h.dir.path().join("server.key"),
            other.path().join("server.key"),
        )
        .unwrap();
        let (second, notes) = abide_server::Server::start(c2).await.unwrap();
        assert_eq!(second.admin_hash, h.server.admin_hash);
        assert!(
            notes.lines.iter().any(|l| l.contains("does not hold it")),
            "{:?}",
            notes.lines
        );
    }
    let (again, _) = abide_server::Server::start(config).await.unwrap();
    assert_eq!(again.admin_hash, h.server.admin_hash);
    assert_eq!(
        std::fs::read(h.dir.path().join("server.key")).unwrap(),
        key_before
    );
}

async fn releases_are_verified_stored_and_served_with_ranges(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let bundle = Fixture::default().build(&[&key(0)]);
    let up = h
        .call(
            Method::POST,
            "/api/v1/releases",
            Some(&admin),
            &[],
            bundle.clone(),
        )
        .await;
    assert_eq!(
        up.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    let rel = up.json();
    let id = rel["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            rel["product"].as_str(),
            rel["version"].as_str(),
            rel["security_version"].as_u64()
        ),
        (Some("acme-gateway"), Some("1.4.0"), Some(5))
    );
    assert_eq!(rel["size"].as_u64(), Some(bundle.len() as u64));
    assert_eq!(rel["compatible"], json!(["acme-gw", "acme-gw-rev2"]));
    // Stored under its digest, nothing left in tmp.
    let stored = h
        .dir
        .path()
        .join("releases")
        .join(format!("{}.abide", rel["sha256"].as_str().unwrap()));
    assert_eq!(std::fs::read(&stored).unwrap(), bundle);
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("tmp")).unwrap().count(),
        0
    );
    let listed = h.get("/api/v1/releases").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(h.get(&format!("/api/v1/releases/{id}")).await.json(), rel);
    // The same bundle again: a conflict, nothing new.
    let again = h
        .call(
            Method::POST,
            "/api/v1/releases",
            Some(&admin),
            &[],
            bundle.clone(),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    // Refused bundles: 422 with the verification's code; no row, no file.
    let audit_before = count(&h, "audit").await;
    let unsigned_by_fleet = Fixture::default().build(&[&key(7)]);
    let mut flipped = bundle.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 1;
    // A writer's bug (signed, every stored byte as the table says, the content not what its
    // names and digests say) is caught here, where every hash is checked once for the fleet.
    let writer_bugs = abide_testkit::corpus::attacks()
        .into_iter()
        .filter(|a| a.writer_bug)
        .map(|a| (a.bytes, a.code));
    for (bytes, code) in [(unsigned_by_fleet, "untrusted-key"), (flipped, "")]
        .into_iter()
        .chain(writer_bugs)
    {
        let r = h
            .call(Method::POST, "/api/v1/releases", Some(&admin), &[], bytes)
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.json());
        if !code.is_empty() {
            assert_eq!(r.code(), code, "{}", r.json());
        }
        assert!(!r.code().is_empty());
    }
    assert_eq!(count(&h, "releases").await, 1);
    assert_eq!(count(&h, "audit").await, audit_before);
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("releases"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("tmp")).unwrap().count(),
        0
    );
    // Downloads: whole, ranges, a device may too, strangers may not.
    let path = format!("/api/v1/releases/{id}/bundle");
    let whole = h.call(Method::GET, &path, Some(&admin), &[], vec![]).await;
    assert_eq!(
        (whole.status, whole.body.len()),
        (StatusCode::OK, bundle.len())
    );
    assert_eq!(whole.body, bundle);
    assert_eq!(whole.headers["accept-ranges"], "bytes");
    let n = bundle.len();
    for (range, want) in [
        ("bytes=10-19".to_owned(), 10..20),
        ("bytes=-16".to_owned(), n - 16..n),
        (format!("bytes={}-", n - 5), n - 5..n),
        (format!("bytes=0-{}", n + 100), 0..n),
    ] {
        let part = h
            .call(
                Method::GET,
                &path,
                Some(&admin),
                &[("range", &range)],
                vec![],
            )
            .await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(part.body, &bundle[want.clone()], "{range}");
        assert_eq!(
            part.headers["content-range"].to_str().unwrap(),
            format!("bytes {}-{}/{n}", want.start, want.end - 1)
        );
    }
    for bad in [
        format!("bytes={n}-"),
        "bytes=5-2".into(),
        "bytes=0-1,4-5".into(),
        "lines=1-2".into(),
        "bytes=-0".into(),
    ] {
        let r = h
            .call(Method::GET, &path, Some(&admin), &[("range", &bad)], vec![])
            .await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(
            r.headers["content-range"].to_str().unwrap(),
            format!("bytes */{n}")
        );
    }
    // A device gets a bundle only once a rollout targets it with that release.
    let device = h.enroll("gw-1", "lab").await;
    let unassigned = h.call(Method::GET, &path, Some(&device), &[], vec![]).await;
    assert_eq!(
        (unassigned.status, unassigned.code()),
        (StatusCode::FORBIDDEN, "not-assigned".to_owned())
    );
    let ro = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&admin),
            json!({"release": id, "stages": "100", "group": "lab"}),
        )
        .await;
    assert_eq!(ro.status, StatusCode::CREATED, "{}", ro.json());
    let by_device = h.call(Method::GET, &path, Some(&device), &[], vec![]).await;
    assert_eq!(by_device.body, bundle);
    let stranger = h.call(Method::GET, &path, None, &[], vec![]).await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    let missing = h
        .call(
            Method::GET,
            "/api/v1/releases/r-0000/bundle",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

async fn enrolment_and_signed_check_ins(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let t = h
        .json(
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            json!({"group": "lab", "tags": ["rack-1"], "uses": 5}),
        )
        .await;
    assert_eq!(t.status, StatusCode::CREATED);
    let token = t.json()["token"].as_str().unwrap().to_owned();
    assert!(t.json()["id"].as_str().unwrap().starts_with("t-"));
    let enroll = |id: &str, extra: serde_json::Value| {
        let mut body = json!({"token": token, "device_id": id, "product": "acme-gateway",
                              "compatible": ["acme-gw"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let e = h
        .json(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            enroll("gw-1", json!({})),
        )
        .await;
    assert_eq!(e.status, StatusCode::CREATED, "{}", e.json());
    let credential = e.json()["credential"].as_str().unwrap().to_owned();
    let server_key = PublicKey::from_hex(e.json()["server_key"].as_str().unwrap()).unwrap();
    assert_eq!(e.json()["group"], "lab");
    // The key devices pin is the one the server publishes.
    let published = h
        .call(Method::GET, "/api/v1/server-key", None, &[], vec![])
        .await
        .json();
    assert_eq!(published["key"], e.json()["server_key"]);
    let devices_before = count(&h, "devices").await;
    for (body, status) in [
        (enroll("gw-1", json!({})), StatusCode::CONFLICT),
        (
            enroll("gw-2", json!({"token": "abide-enroll-nope"})),
            StatusCode::UNAUTHORIZED,
        ),
        (
            enroll("gw-2", json!({"group": "prod"})),
            StatusCode::FORBIDDEN,
        ),
        (enroll("../etc", json!({})), StatusCode::BAD_REQUEST),
        (
            enroll("gw-2", json!({"product": "a/b"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            enroll("gw-2", json!({"compatible": []})),
            StatusCode::BAD_REQUEST,
        ),
        // A device's tags come from its token.
        (
            enroll("gw-2", json!({"tags": ["prod"]})),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let r = h
            .json(Method::POST, "/api/v1/device/enroll", None, body.clone())
            .await;
        assert_eq!(r.status, status, "{body}: {}", r.json());
    }
    assert_eq!(count(&h, "devices").await, devices_before);
    // A check-in answers a signed assignment bound to the device and its nonce.
    let nonce = "00112233445566778899aabbccddeeff";
    let c = h
        .json(Method::POST, "/api/v1/device/checkin", Some(&credential),
              json!({"nonce": nonce, "version": "1.3.0", "booted": "A", "good": "A", "state": "idle", "health": "healthy"}))
        .await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.json());
    let signed = c.json();
    let payload = signed["payload"].as_str().unwrap();
    let sig_hex = signed["signature"].as_str().unwrap();
    let sig: [u8; 64] = abide_bundle::digest::decode_hex(sig_hex)
        .unwrap()
        .try_into()
        .unwrap();
    assert!(server_key.verify(
        abide_fleet_json::ASSIGNMENT_DOMAIN,
        payload.as_bytes(),
        &sig
    ));
    let mut tampered = payload.replace("gw-1", "gw-9");
    assert!(!server_key.verify(
        abide_fleet_json::ASSIGNMENT_DOMAIN,
        tampered.as_bytes(),
        &sig
    ));
    tampered.clear();
    let a: abide_fleet_json::Assignment = serde_json::from_str(payload).unwrap();
    assert_eq!((a.device_id.as_str(), a.nonce.as_str()), ("gw-1", nonce));
    assert!(a.expires_at > a.issued_at);
    assert_eq!(a.release, None);
    // The inventory shows in the device list (last-seen written before the list is read).
    let list = h.get("/api/v1/devices").await.json();
    let d = &list[0];
    assert_eq!(
        (
            d["id"].as_str(),
            d["group"].as_str(),
            d["version"].as_str(),
            d["state"].as_str()
        ),
        (Some("gw-1"), Some("lab"), Some("1.3.0"), Some("idle"))
    );
    assert_eq!(d["tags"], json!(["rack-1"]));
    assert!(d["last_seen"].as_str().is_some());
    assert_eq!(h.get("/api/v1/devices?group=prod").await.json(), json!([]));
    assert_eq!(
        h.get("/api/v1/devices?group=lab&state=idle")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Bad check-ins.
    for body in [
        json!({"nonce": "short", "version": "1.3.0", "state": "idle"}),
        json!({"nonce": nonce, "version": "1.3.0", "state": "sleeping"}),
        json!({"nonce": nonce, "version": "", "state": "idle"}),
        json!({"nonce": nonce, "version": "1.3.0", "state": "idle", "extra": 1}),
    ] {
        let r = h
            .json(
                Method::POST,
                "/api/v1/device/checkin",
                Some(&credential),
                body.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let forged = credential.replace("gw-1:", "gw-2:");
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&forged),
            json!({"nonce": nonce, "version": "1", "state": "idle"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&admin),
            json!({"nonce": nonce, "version": "1", "state": "idle"}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "the admin token is not a device credential"
    );
}

async fn reports_are_idempotent_and_ordered(backend: Backend) {
    let h = Harness::new(backend).await;
    let a = h.enroll("gw-a", "lab").await;
    let b = h.enroll("gw-b", "lab").await;
    let (rel, ro) = rolled_out(&h, "lab").await;
    let report = |cred: String, body: serde_json::Value| {
        let h = &h;
        async move {
            h.json(Method::POST, "/api/v1/device/report", Some(&cred), body)
                .await
        }
    };
    let r = report(
        a.clone(),
        json!({"seq": 1, "status": "downloading", "release_id": rel, "rollout_id": ro}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["outcome"].as_str()),
        (StatusCode::OK, Some("recorded"))
    );
    let r = report(
        a.clone(),
        json!({"seq": 1, "status": "downloading", "release_id": rel, "rollout_id": ro}),
    )
    .await;
    assert_eq!(r.json()["outcome"], "duplicate");
    assert_eq!(count(&h, "reports").await, 1);
    // Out of order: 3 before 2; the device's state is the newest.
    let r = report(
        a.clone(),
        json!({"seq": 3, "status": "committed", "seconds": 12.5}),
    )
    .await;
    assert_eq!(r.json()["outcome"], "recorded");
    let r = report(a.clone(), json!({"seq": 2, "status": "trial"})).await;
    assert_eq!(r.json()["outcome"], "recorded");
    let devices = h.get("/api/v1/devices?state=committed").await.json();
    assert_eq!(devices.as_array().unwrap().len(), 1);
    assert_eq!(devices[0]["id"], "gw-a");
    // A failure needs a reason; a bad status or seq is refused; nothing recorded.
    for body in [
        json!({"seq": 4, "status": "failed"}),
        json!({"seq": 4, "status": "rolled_back", "reason": ""}),
        json!({"seq": 4, "status": "exploded"}),
        json!({"seq": 0, "status": "trial"}),
        json!({"seq": -1, "status": "trial"}),
        json!({"seq": 4, "status": "trial", "seconds": -3.0}),
        json!({"seq": 4, "status": "trial", "release_id": "../../x"}),
    ] {
        let r = report(a.clone(), body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
    }
    assert_eq!(count(&h, "reports").await, 3);
    // Device B reports for itself only: its reports do not touch A.
    let r = report(
        b.clone(),
        json!({"seq": 1, "status": "rolled_back", "reason": "health check api failed"}),
    )
    .await;
    assert_eq!(r.json()["outcome"], "recorded");
    let a_state = h.get("/api/v1/devices?state=committed").await.json();
    assert_eq!(a_state[0]["id"], "gw-a");
    let b_state = h.get("/api/v1/devices?state=rolled_back").await.json();
    assert_eq!(
        (b_state[0]["id"].as_str(), b_state[0]["reason"].as_str()),
        (Some("gw-b"), Some("health check api failed"))
    );
    let forged = b.replace("gw-b:", "gw-a:");
    let r = report(forged, json!({"seq": 9, "status": "failed", "reason": "x"})).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(count(&h, "reports").await, 4);
}

async fn the_audit_chain_verifies_and_finds_tampering(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let bundle = Fixture::default().build(&[&key(1)]);
    assert_eq!(
        h.call(Method::POST, "/api/v1/releases", Some(&admin), &[], bundle)
            .await
            .status,
        StatusCode::CREATED
    );
    let dev = h.enroll("gw-1", "lab").await;
    for seq in 1..=3 {
        h.json(
            Method::POST,
            "/api/v1/device/report",
            Some(&dev),
            json!({"seq": seq, "status": "trial"}),
        )
        .await;
    }
    let records = h.get("/api/v1/audit").await.json();
    let actions: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "release.upload",
            "enroll-token.create",
            "device.enroll",
            "device.report",
            "device.report",
            "device.report"
        ]
    );
    assert_eq!(records[2]["actor"], "device:gw-1");
    assert_eq!(records[1]["prev"], records[0]["hash"]);
    let v = h.get("/api/v1/audit/verify").await.json();
    assert_eq!(
        (v["ok"].as_bool(), v["records"].as_u64()),
        (Some(true), Some(6)),
        "{v}"
    );
    let paged = h.get("/api/v1/audit?after=4&limit=1").await.json();
    assert_eq!(paged[0]["seq"], 5);
    let original = h.get("/api/v1/audit").await.json();
    // An edit of a record's details.
    sqlx::query("UPDATE audit SET details = '{\"seq\":2,\"status\":\"committed\"}' WHERE seq = 5")
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    let v = h.get("/api/v1/audit/verify").await.json();
    assert_eq!(
        (v["ok"].as_bool(), v["first_bad"].as_u64()),
        (Some(false), Some(5)),
        "{v}"
    );
    // Put the edit back; then the last record removed (truncation): found through the head.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE audit SET details = '{}' WHERE seq = 5",
        original[4]["details"].to_string().replace('\'', "''")
    )))
    .execute(&h.server.db.pool)
    .await
    .unwrap();
    assert_eq!(h.get("/api/v1/audit/verify").await.json()["ok"], true);
    sqlx::query("DELETE FROM audit WHERE seq = 6")
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    let v = h.get("/api/v1/audit/verify").await.json();
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("removed from the end"),
        "{v}"
    );
    // A record removed from the middle.
    sqlx::query("DELETE FROM audit WHERE seq = 3")
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    let v = h.get("/api/v1/audit/verify").await.json();
    assert_eq!(
        (v["ok"].as_bool(), v["first_bad"].as_u64()),
        (Some(false), Some(3)),
        "{v}"
    );
    assert_eq!(
        h.call(Method::GET, "/api/v1/audit", None, &[], vec![])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

async fn hostile_requests_get_4xx_and_change_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let dev = h.enroll("gw-1", "lab").await;
    let before: Vec<i64> = {
        let mut v = Vec::new();
        for t in ["releases", "devices", "reports", "audit", "enroll_tokens"] {
            v.push(count(&h, t).await);
        }
        v
    };
    let huge = vec![b'{'; 200 << 10];
    let cases: Vec<(Method, &str, Option<&str>, Vec<u8>)> = vec![
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"not json".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"{\"group\": 5}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"{\"group\": \"a/b\"}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"{\"group\": \"lab\", \"tags\": [\"\"]}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"{\"group\": \"lab\", \"expires_in\": 1}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"{\"group\": \"lab\", \"expires_in\": -5}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            b"[]".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&admin),
            huge.clone(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            None,
            b"{\"group\": \"lab\"}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/enroll-tokens",
            Some(&dev),
            b"{\"group\": \"lab\"}".to_vec(),
        ),
        (Method::POST, "/api/v1/device/enroll", None, b"".to_vec()),
        (
            Method::POST,
            "/api/v1/device/enroll",
            None,
            b"{\"token\": null}".to_vec(),
        ),
        (Method::POST, "/api/v1/device/enroll", None, huge.clone()),
        (
            Method::POST,
            "/api/v1/device/checkin",
            Some(&dev),
            b"{".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/checkin",
            Some(&dev),
            huge.clone(),
        ),
        (
            Method::POST,
            "/api/v1/device/checkin",
            Some("gw-1"),
            b"{}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/checkin",
            Some(":"),
            b"{}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/checkin",
            Some("../../x:y"),
            b"{}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            Some(&dev),
            b"{\"seq\": \"1\", \"status\": \"trial\"}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            Some(&dev),
            b"{\"seq\": 1.5, \"status\": \"trial\"}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            Some(&dev),
            b"{\"seq\": 99999999999999999999, \"status\": \"trial\"}".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            Some(&dev),
            format!(
                "{{\"seq\": 1, \"status\": \"failed\", \"reason\": \"{}\"}}",
                "x".repeat(5000)
            )
            .into_bytes(),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            None,
            b"{\"seq\": 1, \"status\": \"trial\"}".to_vec(),
        ),
        (Method::POST, "/api/v1/releases", Some(&admin), b"".to_vec()),
        (
            Method::POST,
            "/api/v1/releases",
            Some(&admin),
            b"ABIDE but not a bundle".to_vec(),
        ),
        (
            Method::POST,
            "/api/v1/releases",
            Some(&dev),
            Fixture::default().build(&[&key(0)]),
        ),
        (
            Method::POST,
            "/api/v1/releases",
            None,
            Fixture::default().build(&[&key(0)]),
        ),
        (
            Method::GET,
            "/api/v1/releases/..%2F..%2Fadmin.token/bundle",
            Some(&admin),
            vec![],
        ),
        (
            Method::GET,
            "/api/v1/releases/../../admin.token",
            Some(&admin),
            vec![],
        ),
        (
            Method::GET,
            "/api/v1/devices?group=lab&colour=blue",
            Some(&admin),
            vec![],
        ),
        (Method::GET, "/api/v1/audit?after=x", Some(&admin), vec![]),
        (Method::GET, "/api/v1/nothing-here", Some(&admin), vec![]),
        (Method::DELETE, "/api/v1/releases", Some(&admin), vec![]),
        (Method::PUT, "/api/v1/device/report", Some(&dev), vec![]),
    ];
    assert!(cases.len() >= 30);
    for (method, path, auth, body) in cases {
        let shown = format!(
            "{method} {path} {}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        let r = h
            .call(
                method,
                path,
                auth,
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert!(r.status.is_client_error(), "{shown}: {}", r.status);
    }
    let mut after = Vec::new();
    for t in ["releases", "devices", "reports", "audit", "enroll_tokens"] {
        after.push(count(&h, t).await);
    }
    assert_eq!(
        after, before,
        "releases, devices, reports, audit, tokens unchanged"
    );
    assert_eq!(
        std::fs::read_dir(h.dir.path().join("tmp")).unwrap().count(),
        0
    );
}

async fn reports_about_releases_not_assigned_are_refused(backend: Backend) {
    let h = Harness::new(backend).await;
    let (rel, ro) = rolled_out(&h, "lab").await;
    // A device outside the rollout's group claims to have committed its release.
    let outsider = h.enroll("gw-out", "elsewhere").await;
    let before = count(&h, "reports").await;
    for body in [
        json!({"seq": 1, "status": "committed", "release_id": rel, "rollout_id": ro}),
        json!({"seq": 1, "status": "committed", "release_id": "r-0000000000000000", "rollout_id": ro}),
        json!({"seq": 1, "status": "committed", "release_id": rel, "rollout_id": "ro-unknown"}),
    ] {
        let r = h
            .json(
                Method::POST,
                "/api/v1/device/report",
                Some(&outsider),
                body.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{body}: {}", r.json());
    }
    let half = h
        .json(
            Method::POST,
            "/api/v1/device/report",
            Some(&outsider),
            json!({"seq": 1, "status": "committed", "release_id": rel}),
        )
        .await;
    assert_eq!(half.status, StatusCode::BAD_REQUEST);
    assert_eq!(count(&h, "reports").await, before);
    let devices = h.get("/api/v1/devices").await.json();
    let out = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "gw-out")
        .unwrap();
    assert!(
        out["version"].is_null() || out["version"] != "1.2.0",
        "{out}"
    );
    assert_ne!(out["state"], "committed", "{out}");
}

async fn removed_devices_get_401_and_old_reports_do_not_quarantine(backend: Backend) {
    let h = Harness::new(backend).await;
    let cred = h.enroll("gw-x", "lab").await;
    let (rel, ro) = rolled_out(&h, "lab").await;
    let report = |seq: u64, body: serde_json::Value| {
        let (h, cred) = (&h, cred.clone());
        async move {
            let mut body = body;
            body["seq"] = seq.into();
            h.json(Method::POST, "/api/v1/device/report", Some(&cred), body)
                .await
        }
    };
    // An older rolled_back report, arriving after a newer one, is recorded and changes
    // nothing else: no quarantine.
    assert_eq!(
        report(2, json!({"status": "committed"})).await.status,
        StatusCode::OK
    );
    let old = report(
        1,
        json!({"status": "rolled_back", "release_id": rel, "rollout_id": ro, "reason": "replayed"}),
    )
    .await;
    assert_eq!(old.json()["outcome"], "recorded");
    assert_eq!(count(&h, "quarantine").await, 0);
    let current = report(
        3,
        json!({"status": "rolled_back", "release_id": rel, "rollout_id": ro, "reason": "health"}),
    )
    .await;
    assert_eq!(current.json()["outcome"], "recorded");
    assert_eq!(count(&h, "quarantine").await, 1);

    // The device is removed from the database: its requests get 401, never 5xx.
    let checkin = || {
        let (h, cred) = (&h, cred.clone());
        async move {
            h.json(
                Method::POST,
                "/api/v1/device/checkin",
                Some(&cred),
                json!({"nonce": "0123456789abcdef0123", "version": "1.0.0", "state": "idle"}),
            )
            .await
            .status
        }
    };
    assert_eq!(checkin().await, StatusCode::OK);
    for table in ["reports", "quarantine", "device_tags", "rollout_devices"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE device_id = 'gw-x'"
        )))
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    }
    sqlx::query("DELETE FROM devices WHERE id = 'gw-x'")
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    let r = report(4, json!({"status": "trial"})).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json());
    let lease = h
        .json(Method::POST, "/api/v1/device/lease", Some(&cred), json!({}))
        .await;
    assert_eq!(lease.status, StatusCode::UNAUTHORIZED, "{}", lease.json());
    abide_server::devices::flush_last_seen(&h.server)
        .await
        .unwrap();
    assert_eq!(checkin().await, StatusCode::UNAUTHORIZED);
}

async fn partial_uploads_left_by_a_crash_are_removed_at_start(backend: Backend) {
    let h = Harness::new(backend).await;
    let tmp = h.server.config.data.join("tmp");
    std::fs::write(tmp.join("upload-0123456789ab"), b"half a bundle").unwrap();
    std::fs::write(tmp.join("notes.txt"), b"not the server's").unwrap();
    let config = h.server.config.clone();
    let (again, _) = abide_server::Server::start(config).await.unwrap();
    drop(again);
    // SQLite: the one server process owns tmp, so every partial upload goes at once; with
    // PostgreSQL (shared data directories) only those untouched for an hour.
    let left = tmp.join("upload-0123456789ab").exists();
    assert_eq!(left, matches!(backend, Backend::Postgres));
    assert!(tmp.join("notes.txt").exists());
}

async fn idle_and_slow_clients_are_cut_off_and_health_answers_meanwhile(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new(backend).await;
    let mut config = h.server.config.clone();
    config.header_timeout = std::time::Duration::from_secs(1);
    let (server, _) = abide_server::Server::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(abide_server::serve(server, listener));
    // 60 clients that say nothing, and one that starts a request and stalls.
    let mut idle = Vec::new();
    for _ in 0..60 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/v1/heal").await.unwrap();
    // Meanwhile health answers.
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // After the timeout every one of them is closed by the server.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    idle.push(slow);
    for mut s in idle {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("the server closed the connection")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    serving.abort();
}

/// A database made before sqlx's migrator: the versions it applied recorded in
/// `schema_migrations`, statements run one by one.
async fn old_database(url: &str, upto: i64) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    sqlx::query(
        "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for (version, script) in abide_server::db::MIGRATIONS
        .iter()
        .filter(|(v, _)| *v <= upto)
    {
        for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, 0)")
            .bind(version)
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("INSERT INTO groups (name, max_unavailable) VALUES ('kept', 3)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

async fn a_database_from_before_the_migrator_is_upgraded_in_place(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    crate::trust_file(dir.path());
    let pg = matches!(backend, Backend::Postgres).then(abide_testkit::pg::Postgres::start);
    let url = pg.as_ref().map_or_else(
        || {
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("abide.db").display()
            )
        },
        abide_testkit::pg::Postgres::url,
    );
    old_database(&url, 7).await;
    for start in 0..2 {
        let mut config = abide_server::Config::new(dir.path());
        config.db = pg.as_ref().map(abide_testkit::pg::Postgres::url);
        let (server, _) = abide_server::Server::start(config).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&server.db.pool)
                .await
                .unwrap();
        let all: Vec<i64> = abide_server::db::MIGRATIONS
            .iter()
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(versions, all, "start {start}");
        let kept: i64 =
            sqlx::query_scalar("SELECT max_unavailable FROM groups WHERE name = 'kept'")
                .fetch_one(&server.db.pool)
                .await
                .unwrap();
        assert_eq!(kept, 3, "the data stays");
        // The migration after the old ones ran: the audit head has its signature column.
        let signed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM audit_head WHERE signature IS NOT NULL")
                .fetch_one(&server.db.pool)
                .await
                .unwrap();
        assert_eq!(signed, 1);
        assert!(
            sqlx::query("SELECT 1 FROM schema_migrations")
                .fetch_optional(&server.db.pool)
                .await
                .is_err(),
            "the old table is gone"
        );
        server.db.pool.close().await;
    }
}
