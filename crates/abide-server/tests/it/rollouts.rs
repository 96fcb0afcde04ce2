//! Rollouts through the API, with devices checking in and reporting: stages advance only as
//! specified, failures pause, quarantine holds, abort and fleet-wide rollback do what they say,
//! unresponsive devices count as failed, leases keep their limits.

use abide_core::rollout::{cutoff, place};
use abide_server::clock::now_ms;
use abide_server::rollouts::tick;
use abide_testkit::{Fixture, key};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Backend, Harness, on_both};

on_both!(
    a_rollout_moves_through_its_stages_as_devices_commit,
    failures_over_the_threshold_pause_and_quarantine_holds,
    abort_and_fleet_wide_rollback,
    unresponsive_devices_count_as_failed,
    a_device_that_keeps_checking_in_while_its_window_is_closed_is_not_unresponsive,
    the_quorum_counts_only_devices_heard_from_recently,
    a_rollout_that_targets_no_device_waits,
    operator_actions_and_their_refusals,
    leases_keep_max_unavailable_and_quorum,
    a_corrupt_stored_rollout_is_an_error_not_a_completed_rollout,
);

const HOUR: i64 = 3_600_000;

/// Uploads a release of `version` with `security`; returns its id.
async fn release(h: &Harness, version: &'static str, security: u64) -> String {
    let bundle = Fixture {
        version,
        security_version: security,
        ..Fixture::default()
    }
    .build(&[&key(0)]);
    h.upload(bundle).await
}

/// A device's check-in; returns the assignment's release part.
pub(crate) async fn checkin(h: &Harness, cred: &str, version: &str) -> Value {
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(cred),
            json!({"nonce": "0123456789abcdef0123", "version": version, "state": "idle", "health": "healthy"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let a: Value = serde_json::from_str(r.json()["payload"].as_str().unwrap()).unwrap();
    a["release"].clone()
}

async fn report(h: &Harness, cred: &str, seq: u64, status: &str, a: &Value, reason: Option<&str>) {
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/report",
            Some(cred),
            json!({"seq": seq, "status": status, "rollout_id": a["rollout_id"], "release_id": a["release_id"], "reason": reason}),
        )
        .await;
    assert_eq!(r.json()["outcome"], "recorded", "{}", r.json());
}

/// The whole good path of a device given `a`: downloading … committed.
async fn update(h: &Harness, cred: &str, a: &Value) {
    for (seq, s) in ["downloading", "staged", "rebooting", "trial", "committed"]
        .iter()
        .enumerate()
    {
        report(h, cred, seq as u64 + 1, s, a, None).await;
    }
}

async fn create(h: &Harness, body: Value) -> Value {
    let r = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin.clone()),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
    r.json()
}

async fn status(h: &Harness, id: &str) -> Value {
    h.get(&format!("/api/v1/rollouts/{id}")).await.json()
}

async fn act(h: &Harness, id: &str, action: &str) -> (StatusCode, Value) {
    let r = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/{action}"),
            Some(&h.admin.clone()),
            &[],
            vec![],
        )
        .await;
    (r.status, r.json())
}

/// Enrols `n` devices `gw-0` … into `group`, each checked in at 1.3.0.
async fn fleet(h: &Harness, n: usize, group: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("{group}-{i}");
        let cred = h.enroll(&id, group).await;
        checkin(h, &cred, "1.3.0").await;
        out.push((id, cred));
    }
    out
}

async fn a_rollout_moves_through_its_stages_as_devices_commit(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    let devices = fleet(&h, 20, "lab").await;
    let others = fleet(&h, 3, "prod").await;
    let ro = create(&h, json!({"release": rel, "stages": "10:1h,50:0s,100", "failure_threshold": "10%", "group": "lab"})).await;
    let id = ro["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            ro["status"].as_str(),
            ro["devices"].as_u64(),
            ro["stage"].as_u64()
        ),
        (Some("running"), Some(20), Some(1))
    );
    let mut done = std::collections::BTreeSet::new();
    let t0 = now_ms();
    for (stage, percent, decide_at, next) in [
        (1, 10u8, t0 + HOUR, "advance"),
        (2, 50, t0 + HOUR, "advance"),
        (3, 100, t0 + HOUR, "complete"),
    ] {
        // Exactly the devices whose place is below the stage's cut-off get the release.
        for (dev, cred) in &devices {
            let a = checkin(&h, cred, if done.contains(dev) { "1.4.0" } else { "1.3.0" }).await;
            let inside = place(&id, dev) < cutoff(percent);
            if done.contains(dev) {
                assert!(a.is_null(), "{dev} already committed");
                continue;
            }
            assert_eq!(
                !a.is_null(),
                inside,
                "stage {stage}: {dev} at place {}",
                place(&id, dev)
            );
            if inside {
                assert_eq!(
                    (
                        a["release_id"].as_str(),
                        a["action"].as_str(),
                        a["version"].as_str()
                    ),
                    (Some(rel.as_str()), Some("install"), Some("1.4.0"))
                );
                assert_eq!(a["url"], format!("/api/v1/releases/{rel}/bundle"));
                update(&h, cred, &a).await;
                done.insert(dev.clone());
            }
        }
        for (_, cred) in &others {
            assert!(
                checkin(&h, cred, "1.3.0").await.is_null(),
                "prod is not targeted"
            );
        }
        if stage == 1 {
            // Soak: not before an hour has passed since the stage started.
            let early = tick(&h.server, t0 + HOUR / 2).await.unwrap();
            assert_eq!(early[0].what, "wait");
            assert_eq!(status(&h, &id).await["stage"], 1);
        }
        let decided = tick(&h.server, decide_at + i64::from(stage) * 10)
            .await
            .unwrap();
        assert_eq!(decided[0].what, next, "stage {stage}");
    }
    let s = status(&h, &id).await;
    assert_eq!(
        (
            s["status"].as_str(),
            s["committed"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some("completed"), Some(20), Some(0))
    );
    let per_stage: u64 = s["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| st["devices"].as_u64().unwrap())
        .sum();
    assert_eq!(per_stage, 20, "{s}");
    let audit = h.get("/api/v1/audit").await.json();
    let decisions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["actor"] == "server")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["rollout.advance", "rollout.advance", "rollout.complete"],
        "each decision once"
    );
    // A later tick changes nothing.
    assert!(tick(&h.server, t0 + 10 * HOUR).await.unwrap().is_empty());
}

async fn failures_over_the_threshold_pause_and_quarantine_holds(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    let devices = fleet(&h, 20, "lab").await;
    let ro = create(
        &h,
        json!({"release": rel, "stages": "50:0s,100", "failure_threshold": "10%"}),
    )
    .await;
    let id = ro["id"].as_str().unwrap().to_owned();
    let inside: Vec<&(String, String)> = devices
        .iter()
        .filter(|(d, _)| place(&id, d) < cutoff(50))
        .collect();
    assert!(
        inside.len() >= 3,
        "enough devices in the first stage: {}",
        inside.len()
    );
    // Two of the first stage roll back (over 10%), the rest commit.
    let mut rolled_back = Vec::new();
    for (i, (dev, cred)) in inside.iter().enumerate() {
        let a = checkin(&h, cred, "1.3.0").await;
        if i < 2 {
            report(&h, cred, 1, "trial", &a, None).await;
            report(
                &h,
                cred,
                2,
                "rolled_back",
                &a,
                Some("health check api failed"),
            )
            .await;
            rolled_back.push((dev.clone(), cred.clone()));
        } else {
            update(&h, cred, &a).await;
        }
    }
    let d = tick(&h.server, now_ms()).await.unwrap();
    assert_eq!(d[0].what, "pause");
    let s = status(&h, &id).await;
    assert_eq!(s["status"], "paused");
    let reason = s["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("2 of {} devices failed", inside.len()))
            && reason.contains("10.0% allowed"),
        "{reason}"
    );
    assert_eq!(s["failing"].as_array().unwrap().len(), 2);
    assert_eq!(s["failing"][0]["reason"], "health check api failed");
    // Paused: nobody outside the first stage was offered the release, nobody is now.
    for (dev, cred) in &devices {
        if place(&id, dev) >= cutoff(50) {
            assert!(checkin(&h, cred, "1.3.0").await.is_null());
        }
    }
    // Resume accepts those failures; the rest of the fleet updates; the rolled-back devices
    // are never offered the release again, even by a new rollout of it.
    let (code, resumed) = act(&h, &id, "resume").await;
    assert_eq!(
        (code, resumed["status"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    assert_eq!(tick(&h.server, now_ms()).await.unwrap()[0].what, "advance");
    for (dev, cred) in &devices {
        let a = checkin(&h, cred, "1.3.0").await;
        if rolled_back.iter().any(|(d, _)| d == dev) {
            assert!(a.is_null(), "{dev} is quarantined for {rel}");
        } else if place(&id, dev) >= cutoff(50) {
            update(&h, cred, &a).await;
        }
    }
    assert_eq!(tick(&h.server, now_ms()).await.unwrap()[0].what, "complete");
    let again = create(&h, json!({"release": rel, "stages": "100"})).await;
    let states = &again["stages"][0]["states"];
    assert_eq!(states["skipped"], 2, "{again}");
    for (_, cred) in &rolled_back {
        assert!(checkin(&h, cred, "1.3.0").await.is_null());
    }
}

async fn abort_and_fleet_wide_rollback(backend: Backend) {
    let h = Harness::new(backend).await;
    let old = release(&h, "1.3.0", 5).await;
    let rel = release(&h, "1.4.0", 5).await;
    let devices = fleet(&h, 6, "lab").await;
    let ro = create(&h, json!({"release": rel, "stages": "100"})).await;
    let id = ro["id"].as_str().unwrap().to_owned();
    // Device 0 commits, device 1 is in its trial, device 2 only downloaded.
    let a: Vec<Value> = {
        let mut v = Vec::new();
        for (_, cred) in &devices[..3] {
            v.push(checkin(&h, cred, "1.3.0").await);
        }
        v
    };
    update(&h, &devices[0].1, &a[0]).await;
    report(&h, &devices[1].1, 1, "trial", &a[1], None).await;
    report(&h, &devices[2].1, 1, "downloading", &a[2], None).await;
    // Abort: no new device gets it.
    let (code, s) = act(&h, &id, "abort").await;
    assert_eq!(
        (code, s["status"].as_str()),
        (StatusCode::OK, Some("aborted"))
    );
    assert!(checkin(&h, &devices[4].1, "1.3.0").await.is_null());
    // Fleet-wide rollback: the trial rolls back, the committed device gets 1.3.0 again.
    let (code, s) = act(&h, &id, "rollback").await;
    assert_eq!(
        (code, s["status"].as_str()),
        (StatusCode::OK, Some("rolled_back"))
    );
    let trial = checkin(&h, &devices[1].1, "1.3.0").await;
    assert_eq!(
        (trial["action"].as_str(), trial["release_id"].as_str()),
        (Some("rollback"), Some(old.as_str()))
    );
    let committed = checkin(&h, &devices[0].1, "1.4.0").await;
    assert_eq!(
        (
            committed["action"].as_str(),
            committed["release_id"].as_str(),
            committed["version"].as_str()
        ),
        (Some("install"), Some(old.as_str()), Some("1.3.0"))
    );
    // Once it runs 1.3.0 again it is left alone; devices that never started get nothing.
    report(&h, &devices[0].1, 6, "committed", &committed, None).await;
    assert!(checkin(&h, &devices[0].1, "1.3.0").await.is_null());
    assert!(checkin(&h, &devices[5].1, "1.3.0").await.is_null());
    assert_eq!(act(&h, &id, "resume").await.0, StatusCode::CONFLICT);

    // Where the release raised the security version, committed devices cannot go back.
    let secure = release(&h, "1.5.0", 6).await;
    let ro2 = create(&h, json!({"release": secure, "stages": "100"})).await;
    let id2 = ro2["id"].as_str().unwrap().to_owned();
    let (dev, cred) = &devices[3];
    let a = checkin(&h, cred, "1.3.0").await;
    assert_eq!(a["release_id"].as_str(), Some(secure.as_str()), "{dev}");
    update(&h, cred, &a).await;
    act(&h, &id2, "rollback").await;
    assert!(
        checkin(&h, cred, "1.5.0").await.is_null(),
        "security version 6 cannot go back to 5"
    );
}

async fn unresponsive_devices_count_as_failed(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    let devices = fleet(&h, 4, "lab").await;
    let ro = create(&h, json!({"release": rel, "stages": "100", "failure_threshold": "30%", "unresponsive_after": "4h"})).await;
    let id = ro["id"].as_str().unwrap().to_owned();
    // Two update, one takes the release and goes silent, one never checks in again.
    for (_, cred) in &devices[..2] {
        let a = checkin(&h, cred, "1.3.0").await;
        update(&h, cred, &a).await;
    }
    let silent = checkin(&h, &devices[2].1, "1.3.0").await;
    report(&h, &devices[2].1, 1, "downloading", &silent, None).await;
    assert_eq!(
        tick(&h.server, now_ms() + 3 * HOUR).await.unwrap()[0].what,
        "wait"
    );
    assert_eq!(
        tick(&h.server, now_ms() + 5 * HOUR).await.unwrap()[0].what,
        "pause"
    );
    let s = status(&h, &id).await;
    assert_eq!(
        (s["failed"].as_u64(), s["status"].as_str()),
        (Some(2), Some("paused")),
        "{s}"
    );
    let reasons: Vec<&str> = s["failing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons.contains(&"no result in time") && reasons.contains(&"did not check in"),
        "{reasons:?}"
    );
}

async fn a_rollout_that_targets_no_device_waits(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    fleet(&h, 2, "prod").await;
    let ro = create(&h, json!({"release": rel, "stages": "100", "group": "lab"})).await;
    let id = ro["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (ro["status"].as_str(), ro["devices"].as_u64()),
        (Some("waiting"), Some(0))
    );
    assert_eq!(
        tick(&h.server, now_ms() + 100 * HOUR).await.unwrap()[0].what,
        "wait"
    );
    assert_eq!(status(&h, &id).await["status"], "waiting");
    // A device enrolling into the group later joins at its place.
    let cred = h.enroll("lab-late", "lab").await;
    assert_eq!(status(&h, &id).await["devices"], 1);
    tick(&h.server, now_ms()).await.unwrap();
    assert_eq!(status(&h, &id).await["status"], "running");
    let a = checkin(&h, &cred, "1.3.0").await;
    assert_eq!(a["rollout_id"].as_str(), Some(id.as_str()));
    update(&h, &cred, &a).await;
    assert_eq!(tick(&h.server, now_ms()).await.unwrap()[0].what, "complete");
}

async fn operator_actions_and_their_refusals(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    fleet(&h, 3, "lab").await;
    let admin = h.admin.clone();
    for (body, why) in [
        (
            json!({"release": rel, "stages": "5:24h,50"}),
            "must reach 100%",
        ),
        (
            json!({"release": rel, "stages": "5,100"}),
            "needs a soak time",
        ),
        (
            json!({"release": rel, "stages": "100", "failure_threshold": "200%"}),
            "failure_threshold",
        ),
        (
            json!({"release": rel, "stages": "100", "group": "a b"}),
            "group",
        ),
        (
            json!({"release": rel, "stages": "100", "unresponsive_after": "0s"}),
            "unresponsive_after",
        ),
        (json!({"release": "r-none", "stages": "100"}), "no release"),
        (json!({"release": rel}), "stages"),
    ] {
        let r = h
            .json(Method::POST, "/api/v1/rollouts", Some(&admin), body.clone())
            .await;
        assert!(r.status.is_client_error(), "{body}");
        assert!(
            r.json()["error"]["message"].as_str().unwrap().contains(why),
            "{body}: {}",
            r.json()
        );
    }
    let ro = create(&h, json!({"release": rel, "stages": "10:24h,50:24h,100"})).await;
    let id = ro["id"].as_str().unwrap().to_owned();
    assert_eq!(act(&h, &id, "resume").await.0, StatusCode::CONFLICT);
    let (code, s) = act(&h, &id, "pause").await;
    assert_eq!(
        (code, s["status"].as_str(), s["reason"].as_str()),
        (
            StatusCode::OK,
            Some("paused"),
            Some("paused by an operator")
        )
    );
    assert_eq!(act(&h, &id, "pause").await.0, StatusCode::CONFLICT);
    let (_, s) = act(&h, &id, "advance").await;
    assert_eq!(
        (s["status"].as_str(), s["stage"].as_u64()),
        (Some("running"), Some(2)),
        "advance skips the soak and resumes"
    );
    act(&h, &id, "advance").await;
    let (code, e) = act(&h, &id, "advance").await;
    assert_eq!(code, StatusCode::CONFLICT, "{e}");
    assert_eq!(act(&h, &id, "explode").await.0, StatusCode::NOT_FOUND);
    assert_eq!(act(&h, "ro-none", "pause").await.0, StatusCode::NOT_FOUND);
    assert_eq!(act(&h, &id, "abort").await.1["status"], "aborted");
    assert_eq!(act(&h, &id, "abort").await.0, StatusCode::CONFLICT);
    let listed = h.get("/api/v1/rollouts").await.json();
    assert_eq!(listed[0]["id"], id);
    let r = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/pause"),
            None,
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

async fn leases_keep_max_unavailable_and_quorum(backend: Backend) {
    let h = Harness::new(backend).await;
    let admin = h.admin.clone();
    let devices = fleet(&h, 4, "cluster").await;
    let put = |body: Value| {
        let h = &h;
        let admin = admin.clone();
        async move {
            h.json(Method::PUT, "/api/v1/groups/cluster", Some(&admin), body)
                .await
        }
    };
    assert_eq!(
        put(json!({"max_unavailable": 1, "quorum": 2})).await.status,
        StatusCode::OK
    );
    let lease = |cred: String, body: Value| {
        let h = &h;
        async move {
            h.json(Method::POST, "/api/v1/device/lease", Some(&cred), body)
                .await
        }
    };
    let first = lease(devices[0].1.clone(), json!({})).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.json());
    let second = lease(devices[1].1.clone(), json!({})).await;
    assert_eq!(
        (second.status, second.code()),
        (StatusCode::CONFLICT, "lease-refused".into())
    );
    assert!(
        second.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_unavailable 1")
    );
    // Asking again extends; giving it back lets the next one in.
    assert_eq!(
        lease(devices[0].1.clone(), json!({})).await.status,
        StatusCode::OK
    );
    let r = h
        .call(
            Method::DELETE,
            "/api/v1/device/lease",
            Some(&devices[0].1),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.json()["released"], true);
    assert_eq!(
        lease(devices[1].1.clone(), json!({})).await.status,
        StatusCode::OK
    );
    h.call(
        Method::DELETE,
        "/api/v1/device/lease",
        Some(&devices[1].1),
        &[],
        vec![],
    )
    .await;
    // Quorum: with two members unhealthy, taking a third down would leave one.
    put(json!({"max_unavailable": 3, "quorum": 2})).await;
    for (_, cred) in &devices[2..] {
        h.json(Method::POST, "/api/v1/device/checkin", Some(cred),
               json!({"nonce": "0123456789abcdef0123", "version": "1.3.0", "state": "idle", "health": "unhealthy"})).await;
    }
    let q = lease(devices[0].1.clone(), json!({})).await;
    assert_eq!(q.code(), "lease-refused");
    assert!(
        q.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quorum 2"),
        "{}",
        q.json()
    );
    // An expired lease is reclaimed.
    put(json!({"max_unavailable": 1})).await;
    assert_eq!(
        lease(devices[2].1.clone(), json!({"duration": "1s"}))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        lease(devices[3].1.clone(), json!({})).await.code(),
        "lease-refused"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        lease(devices[3].1.clone(), json!({})).await.status,
        StatusCode::OK
    );
    let g = h.get("/api/v1/groups/cluster").await.json();
    assert_eq!(
        (g["members"].as_u64(), g["leases"].as_array().map(Vec::len)),
        (Some(4), Some(1)),
        "{g}"
    );
    // Bad settings and bad requests change nothing.
    for body in [
        json!({"max_unavailable": 0}),
        json!({"window": {"days": ["mon"], "start": "25:00", "end": "04:00", "zone": "UTC"}}),
        json!({"window": {"days": ["someday"], "start": "02:00", "end": "04:00", "zone": "UTC"}}),
        json!({"window": {"days": ["mon"], "start": "02:00", "end": "04:00", "zone": "Mars/Olympus"}}),
    ] {
        assert_eq!(
            put(body.clone()).await.status,
            StatusCode::BAD_REQUEST,
            "{body}"
        );
    }
    assert_eq!(
        lease(devices[0].1.clone(), json!({"duration": "2d"}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // A window travels with assignments.
    let window =
        json!({"days": ["sat", "sun"], "start": "02:00", "end": "04:00", "zone": "Europe/Berlin"});
    assert_eq!(put(json!({"window": window})).await.status, StatusCode::OK);
    // Every answer carries the group's window, with or without a release.
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&devices[1].1),
            json!({"nonce": "0123456789abcdef0123", "version": "1.3.0", "state": "idle"}),
        )
        .await;
    let a: Value = serde_json::from_str(r.json()["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        (a["release"].clone(), a["window"].clone()),
        (Value::Null, window.clone())
    );
    let rel = release(&h, "1.4.0", 5).await;
    create(&h, json!({"release": rel, "stages": "100"})).await;
    let r = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&devices[0].1),
            json!({"nonce": "0123456789abcdef0123", "version": "1.3.0", "state": "idle"}),
        )
        .await;
    let a: Value = serde_json::from_str(r.json()["payload"].as_str().unwrap()).unwrap();
    assert_eq!(a["window"], window);
    // Leases only inside the window: one that opens in two hours refuses, one around now grants.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let hhmm = |h: i64| {
        let t = now
            .checked_add(jiff::SignedDuration::from_hours(h))
            .unwrap();
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    let all = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    h.call(
        Method::DELETE,
        "/api/v1/device/lease",
        Some(&devices[3].1),
        &[],
        vec![],
    )
    .await;
    put(json!({"window": {"days": all, "start": hhmm(2), "end": hhmm(3), "zone": "UTC"}})).await;
    let closed = lease(devices[0].1.clone(), json!({})).await;
    assert_eq!(closed.code(), "lease-refused");
    assert!(
        closed.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maintenance window"),
        "{}",
        closed.json()
    );
    put(json!({"window": {"days": all, "start": hhmm(-1), "end": hhmm(1), "zone": "UTC"}})).await;
    assert_eq!(
        lease(devices[0].1.clone(), json!({})).await.status,
        StatusCode::OK
    );
}

async fn a_corrupt_stored_rollout_is_an_error_not_a_completed_rollout(backend: Backend) {
    let h = Harness::new(backend).await;
    let rel = release(&h, "1.4.0", 5).await;
    fleet(&h, 2, "lab").await;
    let ro = create(
        &h,
        json!({"release": rel, "stages": "50:1h,100", "group": "lab"}),
    )
    .await;
    let id = ro["id"].as_str().unwrap().to_owned();
    // A damaged stages column: once read as "no stages", which completed the rollout.
    sqlx::query("UPDATE rollouts SET stages = 'not json' WHERE id = $1")
        .bind(&id)
        .execute(&h.server.db.pool)
        .await
        .unwrap();
    let r = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin.clone()),
            &[],
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    let decided = tick(&h.server, now_ms() + 100 * HOUR).await.unwrap();
    assert_eq!(decided[0].what, "error");
    let (status,): (String,) = sqlx::query_as("SELECT status FROM rollouts WHERE id = $1")
        .bind(&id)
        .fetch_one(&h.server.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "running", "a corrupt rollout is not decided");
}

/// Unresponsive counts from a device's last contact: a staged device that keeps checking in
/// while its group's window is closed is shown as waiting for the window, not failed; a silent
/// one is unresponsive.
async fn a_device_that_keeps_checking_in_while_its_window_is_closed_is_not_unresponsive(
    backend: Backend,
) {
    let h = Harness::new(backend).await;
    // A window that is closed now: it opens two hours from now, for an hour.
    let hour = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .hour();
    let window = json!({"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                        "start": format!("{:02}:00", (hour + 2) % 24),
                        "end": format!("{:02}:00", (hour + 3) % 24), "zone": "UTC"});
    let admin = h.admin.clone();
    let r = h
        .json(
            Method::PUT,
            "/api/v1/groups/lab",
            Some(&admin),
            json!({"window": window}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    let rel = release(&h, "1.4.0", 5).await;
    let devices = fleet(&h, 2, "lab").await;
    let ro = create(
        &h,
        json!({"release": rel, "stages": "100", "failure_threshold": "60%", "unresponsive_after": "2s"}),
    )
    .await;
    let id = ro["id"].as_str().unwrap().to_owned();
    let (waiting, silent) = (&devices[0].1, &devices[1].1);
    let a = checkin(&h, waiting, "1.3.0").await;
    report(&h, waiting, 1, "downloading", &a, None).await;
    report(&h, waiting, 2, "staged", &a, None).await;
    let b = checkin(&h, silent, "1.3.0").await;
    report(&h, silent, 1, "downloading", &b, None).await;
    // Past the 2 s, the waiting device has kept checking in; the silent one has not.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(3500);
    while std::time::Instant::now() < until {
        checkin(&h, waiting, "1.3.0").await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    tick(&h.server, now_ms()).await.unwrap();
    let s = status(&h, &id).await;
    assert_eq!(s["failed"], 1, "{s}");
    assert_eq!(s["failing"][0]["device"], devices[1].0.as_str(), "{s}");
    assert_eq!(s["failing"][0]["reason"], "no result in time");
    assert_eq!(
        (&s["staged"], &s["waiting_for_window"]),
        (&json!(1), &json!(1)),
        "{s}"
    );
    assert_eq!(s["status"], "running", "{s}");
}

/// A lease keeps a quorum of devices that are healthy as last heard and were heard from
/// within `health_fresh`: a device gone silent does not count.
async fn the_quorum_counts_only_devices_heard_from_recently(backend: Backend) {
    let mut h = Harness::new(backend).await;
    let mut config = h.server.config.clone();
    config.health_fresh = std::time::Duration::from_secs(1);
    h.server = abide_server::Server::start(config).await.unwrap().0;
    let devices = fleet(&h, 3, "lab").await;
    let admin = h.admin.clone();
    let r = h
        .json(
            Method::PUT,
            "/api/v1/groups/lab",
            Some(&admin),
            json!({"quorum": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json());
    for (_, cred) in &devices {
        checkin(&h, cred, "1.3.0").await;
    }
    let lease = |cred: String| {
        let h = &h;
        async move {
            h.json(Method::POST, "/api/v1/device/lease", Some(&cred), json!({}))
                .await
        }
    };
    let give_back = |cred: String| {
        let h = &h;
        async move {
            h.call(
                Method::DELETE,
                "/api/v1/device/lease",
                Some(&cred),
                &[],
                vec![],
            )
            .await
        }
    };
    let (a, b, c) = (&devices[0].1, &devices[1].1, &devices[2].1);
    assert_eq!(lease(a.clone()).await.status, StatusCode::OK);
    give_back(a.clone()).await;
    // C goes silent; B keeps checking in.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(1600);
    while std::time::Instant::now() < until {
        checkin(&h, b, "1.3.0").await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    checkin(&h, b, "1.3.0").await;
    let refused = lease(a.clone()).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.json());
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only 1 other devices of group lab heard from as healthy in the last 1 s"),
        "{}",
        refused.json()
    );
    // C is back: the quorum holds again.
    checkin(&h, c, "1.3.0").await;
    assert_eq!(lease(a.clone()).await.status, StatusCode::OK);
}
