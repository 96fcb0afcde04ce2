//! Deltas on the server: made after an upload from the release devices run (and on request),
//! offered in the assignment of a device that runs that release only when smaller than both the
//! bundle and its missing chunks, and served to the devices the release is assigned to.

use abide_testkit::{Fixture, image, key};
use axum::http::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::rollouts::checkin;
use crate::{Backend, Harness, on_both};

on_both!(deltas_are_made_on_upload_offered_when_smallest_and_served_to_assigned_devices);

/// A release of `version` whose root file system is the base image with `edits` rewritten
/// stretches; returns its id.
async fn release(h: &Harness, version: &'static str, edits: usize) -> String {
    let mut root = image(700_000, 1);
    for k in 0..edits {
        for b in root[100_000 + k * 200_000..160_000 + k * 200_000]
            .iter_mut()
            .step_by(89)
        {
            *b = b.wrapping_add(1);
        }
    }
    let bundle = Fixture {
        version,
        components: vec![
            ("rootfs", "rootfs", "rootfs", root),
            ("app", "app", "appfs", image(90_000, 2)),
        ],
        ..Fixture::default()
    }
    .build(&[&key(0)]);
    h.upload(bundle).await
}

async fn deltas_are_made_on_upload_offered_when_smallest_and_served_to_assigned_devices(
    backend: Backend,
) {
    let h = Harness::new(backend).await;
    let gw = h.enroll("gw-0", "lab").await;
    let other = h.enroll("gw-1", "elsewhere").await;
    checkin(&h, &gw, "1.3.0").await;
    // Check-ins reach the devices table in batches; this one now.
    abide_server::devices::flush_last_seen(&h.server)
        .await
        .unwrap();
    let old = release(&h, "1.3.0", 0).await;
    let new = release(&h, "1.4.0", 2).await;
    // The upload of 1.4.0 makes the delta from 1.3.0, which gw-0 runs, in the background.
    let path = format!("/api/v1/releases/{new}/deltas");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let listed = loop {
        let l = h.get(&path).await;
        assert_eq!(l.status, StatusCode::OK, "{}", l.json());
        if l.json().as_array().is_some_and(|a| !a.is_empty()) {
            break l.json();
        }
        assert!(std::time::Instant::now() < deadline, "no delta was made");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let d = &listed[0];
    assert_eq!(
        (d["from_release"].as_str(), d["to_release"].as_str()),
        (Some(old.as_str()), Some(new.as_str()))
    );
    assert_eq!(
        (d["from_version"].as_str(), d["to_version"].as_str()),
        (Some("1.3.0"), Some("1.4.0"))
    );
    let (size, chunks, full) = (
        d["size"].as_u64().unwrap(),
        d["chunks_size"].as_u64().unwrap(),
        d["full_size"].as_u64().unwrap(),
    );
    assert!(size < chunks && chunks < full, "{d}");
    assert_eq!(d["offered"], true, "{d}");
    let audit = h.get("/api/v1/audit").await.json().to_string();
    assert!(audit.contains("delta.create"), "{audit}");

    // Assigned 1.4.0, a device running 1.3.0 is offered the delta; one running anything else
    // is not.
    let r = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin.clone()),
            json!({"release": new, "stages": "100", "group": "lab"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    let a = checkin(&h, &gw, "1.3.0").await;
    let offered = &a["delta"];
    assert_eq!(offered["from_version"], "1.3.0", "{a}");
    assert_eq!(offered["size"], size, "{a}");
    assert_eq!(offered["sha256"], d["sha256"], "{a}");
    assert!(checkin(&h, &gw, "1.2.0").await["delta"].is_null());

    // The device gets the delta, whole or by range; a device it is not assigned to does not.
    let url = offered["url"].as_str().unwrap();
    let whole = h.call(Method::GET, url, Some(&gw), &[], vec![]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len() as u64, size);
    let digest = abide_bundle::digest::encode_hex(&Sha256::digest(&whole.body));
    assert_eq!(Some(digest.as_str()), d["sha256"].as_str());
    assert_eq!(&whole.body[..8], b"\x89ABDLT\r\n");
    let part = h
        .call(
            Method::GET,
            url,
            Some(&gw),
            &[("range", "bytes=8-15")],
            vec![],
        )
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, whole.body[8..16]);
    let refused = h.call(Method::GET, url, Some(&other), &[], vec![]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "not-assigned");

    // Made on request: the same pair gives the same delta; a release with the same content
    // (only the version differs) gets a delta larger than its missing chunks, not offered.
    let same = release(&h, "1.4.1", 0).await;
    let again = h
        .json(
            Method::POST,
            &path,
            Some(&h.admin.clone()),
            json!({"from": old}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.json());
    assert_eq!(again.json()["sha256"], d["sha256"]);
    let useless = h
        .json(
            Method::POST,
            &format!("/api/v1/releases/{same}/deltas"),
            Some(&h.admin.clone()),
            json!({"from": old}),
        )
        .await;
    assert_eq!(useless.status, StatusCode::CREATED, "{}", useless.json());
    let u = useless.json();
    assert_eq!(u["offered"], false, "{u}");
    assert!(u["size"].as_u64() > u["chunks_size"].as_u64(), "{u}");
    // Bad requests change nothing.
    for (body, to, status, code) in [
        (
            json!({"from": new}),
            new.as_str(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta-releases",
        ),
        (
            json!({"from": "r-nothing"}),
            new.as_str(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
    ] {
        let r = h
            .json(
                Method::POST,
                &format!("/api/v1/releases/{to}/deltas"),
                Some(&h.admin.clone()),
                body,
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{}",
            r.json()
        );
    }
    assert_eq!(h.get(&path).await.json().as_array().unwrap().len(), 1);

    // A delta made elsewhere is uploaded to a server that holds both releases: checked by
    // applying it to the old release, then stored and offered the same way.
    let h2 = Harness::with(backend, |c| c.deltas_on_upload = false).await;
    let upload = |bytes: Vec<u8>| {
        let h2 = &h2;
        async move {
            h2.call(
                Method::POST,
                "/api/v1/deltas",
                Some(&h2.admin.clone()),
                &[],
                bytes,
            )
            .await
        }
    };
    let early = upload(whole.body.clone()).await;
    assert_eq!(
        (early.status, early.code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "delta-releases"),
        "{}",
        early.json()
    );
    assert_eq!(release(&h2, "1.3.0", 0).await, old);
    assert_eq!(release(&h2, "1.4.0", 2).await, new);
    let mut damaged = whole.body.clone();
    let at = damaged.len() - 10;
    damaged[at] ^= 0x40;
    let bad = upload(damaged).await;
    assert_eq!(
        bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        bad.json()
    );
    assert!(
        ["chunk-digest", "chunk-corrupt", "chunk-table-digest"].contains(&bad.code().as_str()),
        "{}",
        bad.json()
    );
    assert_eq!(h2.get(&path).await.json(), json!([]));
    let up = upload(whole.body.clone()).await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.json());
    let u = up.json();
    for key in ["sha256", "size", "chunks_size", "full_size", "offered"] {
        assert_eq!(u[key], d[key], "{key}: {u} against {d}");
    }
    let again = upload(whole.body.clone()).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.json());
    let audit = h2.get("/api/v1/audit").await.json().to_string();
    assert!(audit.contains("delta.upload"), "{audit}");
    let leftover: Vec<_> = std::fs::read_dir(h2.dir.path().join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
}
