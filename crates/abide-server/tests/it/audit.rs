//! Signed audit heads: the server's trail is anchored by its key and by checkpoints kept
//! elsewhere; a device's reported head may only move forward under the device's key.

use abide_bundle::SecretKey;
use abide_fleet_json::AuditHead;
use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::{Backend, Harness, on_both};

on_both!(
    a_trail_rewritten_in_the_database_is_found_by_its_signature_or_its_checkpoint,
    a_device_audit_head_only_moves_forward_under_the_device_key,
    the_trail_verifies_while_records_are_appended,
);

/// Rewrites every record of the server's trail after changing the second one's details, as
/// someone with the database but not the server's key would; returns the new head.
async fn rewrite_trail(h: &Harness) -> (i64, String) {
    let rows: Vec<(i64, i64, String, String, String)> =
        sqlx::query_as("SELECT seq, at, actor, action, details FROM audit ORDER BY seq")
            .fetch_all(&h.server.db.pool)
            .await
            .unwrap();
    let mut prev = "0".repeat(64);
    for (seq, at, actor, action, mut details) in rows {
        if seq == 2 {
            details = json!({"forged": true}).to_string();
        }
        let hash = abide_server::sha256_hex(
            format!("{prev}\n{seq}\n{at}\n{actor}\n{action}\n{details}").as_bytes(),
        );
        sqlx::query("UPDATE audit SET details = $1, prev = $2, hash = $3 WHERE seq = $4")
            .bind(&details)
            .bind(&prev)
            .bind(&hash)
            .bind(seq)
            .execute(&h.server.db.pool)
            .await
            .unwrap();
        prev = hash;
    }
    let seq: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM audit")
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
        .bind(&prev)
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    (seq, prev)
}

async fn verify(h: &Harness, query: &str) -> serde_json::Value {
    let admin = h.admin.clone();
    let r = h
        .call(
            Method::GET,
            &format!("/api/v1/audit/verify{query}"),
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    r.json()
}

async fn a_trail_rewritten_in_the_database_is_found_by_its_signature_or_its_checkpoint(
    backend: Backend,
) {
    let h = Harness::new(backend).await;
    for d in ["gw-1", "gw-2", "gw-3"] {
        h.enroll(d, "lab").await;
    }
    let admin = h.admin.clone();
    let head: AuditHead = serde_json::from_value(
        h.call(Method::GET, "/api/v1/audit/head", Some(&admin), &[], vec![])
            .await
            .json(),
    )
    .unwrap();
    assert!(head.seq >= 3, "{head:?}");
    assert_eq!(verify(&h, "").await["ok"], true);
    let checkpoint = format!("?seq={}&hash={}", head.seq, head.hash);
    assert_eq!(verify(&h, &checkpoint).await["ok"], true);
    // A checkpoint the trail does not hold.
    let v = verify(&h, &format!("?seq={}&hash={}", head.seq, "2".repeat(64))).await;
    assert_eq!(v["ok"], false, "{v}");
    let v = verify(&h, &format!("?seq={}&hash={}", head.seq + 5, head.hash)).await;
    assert_eq!(v["ok"], false, "{v}");

    // Every record and the head rewritten without the key: the signature says so.
    let (seq, hash) = rewrite_trail(&h).await;
    let v = verify(&h, "").await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("server's signature"),
        "{v}"
    );
    // With the server's key too: the trail verifies alone, but not against the checkpoint.
    let key = SecretKey::from_file_text(
        &std::fs::read_to_string(h.server.config.data.join("server.key")).unwrap(),
    )
    .unwrap();
    let signature = key.sign(
        AuditHead::SERVER_DOMAIN,
        &AuditHead::message(seq as u64, &hash),
    );
    sqlx::query("UPDATE audit_head SET signature = $1 WHERE id = 1")
        .bind(abide_bundle::digest::encode_hex(&signature))
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    assert_eq!(verify(&h, "").await["ok"], true);
    let v = verify(&h, &checkpoint).await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problem"].as_str().unwrap().contains("rewritten"), "{v}");
    // A half checkpoint is a bad request.
    let r = h
        .call(
            Method::GET,
            "/api/v1/audit/verify?seq=3",
            Some(&admin),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

async fn the_trail_verifies_while_records_are_appended(backend: Backend) {
    let h = Harness::new(backend).await;
    // A trail long enough that reading it takes a while.
    let append = |server: abide_server::Server, from: u32, to: u32| async move {
        for i in from..to {
            let mut tx = server.db.pool.begin().await.unwrap();
            abide_server::audit::append(&server, &mut tx, "test", "append", json!({"i": i}))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    append(h.server.clone(), 0, 1500).await;
    // Verified again and again while another task appends: each check sees one moment of the
    // trail, never a chain that ends before its head.
    let writer = tokio::spawn(append(h.server.clone(), 1500, 4000));
    let mut checks = 0;
    while !writer.is_finished() {
        let v = verify(&h, "").await;
        assert_eq!(v["ok"], true, "check {checks}: {v}");
        assert!(v["records"].as_u64().unwrap() >= 1500, "{v}");
        checks += 1;
    }
    writer.await.unwrap();
    assert!(checks >= 3, "only {checks} checks ran beside the appends");
    let v = verify(&h, "").await;
    assert_eq!(
        (v["ok"].as_bool(), v["records"].as_u64().map(|r| r >= 4000)),
        (Some(true), Some(true)),
        "{v}"
    );
}

fn signed(key: &SecretKey, seq: u64, hash: &str) -> AuditHead {
    AuditHead {
        seq,
        hash: hash.to_owned(),
        key: key.public().to_hex(),
        signature: abide_bundle::digest::encode_hex(
            &key.sign(AuditHead::DEVICE_DOMAIN, &AuditHead::message(seq, hash)),
        ),
    }
}

async fn checkin(h: &Harness, credential: &str, head: &AuditHead) -> StatusCode {
    let body = json!({"nonce": "00112233445566778899aabbccddeeff", "version": "1.0.0",
                      "booted": "A", "good": "A", "state": "idle", "health": "healthy",
                      "audit_head": head});
    h.json(
        Method::POST,
        "/api/v1/device/checkin",
        Some(credential),
        body,
    )
    .await
    .status
}

async fn kept(h: &Harness) -> Option<AuditHead> {
    let admin = h.admin.clone();
    let devices = h
        .call(Method::GET, "/api/v1/devices", Some(&admin), &[], vec![])
        .await
        .json();
    serde_json::from_value(devices[0]["audit_head"].clone()).unwrap()
}

async fn refusals(h: &Harness) -> Vec<String> {
    let admin = h.admin.clone();
    let audit = h
        .call(Method::GET, "/api/v1/audit", Some(&admin), &[], vec![])
        .await
        .json();
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "device.audit-head-refused")
        .map(|r| r["details"]["reason"].as_str().unwrap().to_owned())
        .collect()
}

async fn a_device_audit_head_only_moves_forward_under_the_device_key(backend: Backend) {
    let h = Harness::new(backend).await;
    let device = h.enroll("gw-1", "lab").await;
    let (key, other) = (abide_testkit::key(5), abide_testkit::key(6));
    let h5 = signed(&key, 5, &"5".repeat(64));
    assert_eq!(checkin(&h, &device, &h5).await, StatusCode::OK);
    assert_eq!(kept(&h).await, Some(h5.clone()));
    // Forward: kept.
    let h7 = signed(&key, 7, &"7".repeat(64));
    assert_eq!(checkin(&h, &device, &h7).await, StatusCode::OK);
    assert_eq!(kept(&h).await, Some(h7.clone()));
    // Back, the same record changed, another key: the check-in is answered, the head is not
    // kept, and each refusal is recorded once.
    for (head, reason) in [
        (signed(&key, 6, &"6".repeat(64)), "cut off"),
        (signed(&key, 7, &"8".repeat(64)), "rewritten"),
        (signed(&other, 9, &"9".repeat(64)), "not the device's key"),
    ] {
        for _ in 0..2 {
            assert_eq!(checkin(&h, &device, &head).await, StatusCode::OK);
        }
        assert_eq!(kept(&h).await, Some(h7.clone()));
        let r = refusals(&h).await;
        assert!(r.last().unwrap().contains(reason), "{r:?}");
    }
    assert_eq!(refusals(&h).await.len(), 3);
    // A signature that does not verify: 400, and nothing of the check-in is kept.
    let mut forged = signed(&key, 8, &"8".repeat(64));
    forged.hash = "a".repeat(64);
    let before: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap();
    assert_eq!(checkin(&h, &device, &forged).await, StatusCode::BAD_REQUEST);
    assert_eq!(kept(&h).await, Some(h7));
    let after: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap();
    assert_eq!(before, after);
}
