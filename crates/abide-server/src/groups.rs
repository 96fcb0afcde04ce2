//! Device groups' settings and reboot leases (the FleetLock idea).
//!
//! A group may set `max_unavailable` (how many of its devices may hold a lease at once) and
//! `quorum` (how many healthy devices must stay up), and a maintenance window that check-in
//! answers carry. A device asks for a lease before it activates and reboots; it is granted
//! only if fewer than `max_unavailable` leases are held in its group and at least `quorum`
//! healthy members remain without one. The decision runs under the group row's lock, so
//! several server processes never grant past the limits; expired leases are reclaimed first.

use abide_fleet_json::{
    GroupSettings, GroupView, GroupWindow, LeaseGrant, LeaseReleased, LeaseView,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use abide_core::lease::{LeaseAsk, LeaseDecision, LeaseRefusal, WindowNow};

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult, parse_json};

/// Checks a maintenance window: known days, `HH:MM` times, an IANA zone this machine knows.
pub fn check_window(w: &GroupWindow) -> ApiResult<()> {
    abide_core::window::Window::parse(&w.days, &w.start, &w.end)
        .map_err(|e| ApiError::bad_request(format!("window: {e}")))?;
    jiff::tz::TimeZone::get(&w.zone).map_err(|e| {
        ApiError::bad_request(format!(
            "window.zone {:?}: not a known IANA time zone ({e})",
            w.zone
        ))
    })?;
    Ok(())
}

/// Whether the window is open at `now`, in the window's own time zone (so daylight saving time
/// moves it with the local clock).
/// The group window `w` and `now` (Unix milliseconds) in its zone, for
/// [`abide_core::lease::decide`]; a window that no longer parses (its zone gone from the
/// system's time zone database) is an error, not an open or a closed window.
fn window_now(w: &GroupWindow, now: i64) -> ApiResult<WindowNow> {
    let window = abide_core::window::Window::parse(&w.days, &w.start, &w.end)
        .map_err(|e| ApiError::internal("reading the group window", e))?;
    let tz = jiff::tz::TimeZone::get(&w.zone)
        .map_err(|e| ApiError::internal("reading the group window's zone", e))?;
    let local = jiff::Timestamp::from_millisecond(now)
        .map_err(|e| ApiError::internal("reading the clock", e))?
        .to_zoned(tz);
    Ok(WindowNow {
        window,
        weekday: local.weekday().to_monday_zero_offset() as u8,
        minute: local.hour() as u16 * 60 + local.minute() as u16,
    })
}

/// Whether the window `w` is open at `now`.
pub fn window_open(w: &GroupWindow, now: jiff::Timestamp) -> bool {
    let (Ok(window), Ok(tz)) = (
        abide_core::window::Window::parse(&w.days, &w.start, &w.end),
        jiff::tz::TimeZone::get(&w.zone),
    ) else {
        return false;
    };
    let local = now.to_zoned(tz);
    window.contains(
        local.weekday().to_monday_zero_offset() as u8,
        local.hour() as u16 * 60 + local.minute() as u16,
    )
}

async fn load(server: &Server, name: &str) -> ApiResult<GroupSettings> {
    let row: Option<(Option<i64>, Option<i64>, Option<String>)> =
        sqlx::query_as("SELECT max_unavailable, quorum, maintenance FROM groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&server.db.pool)
            .await?;
    Ok(
        row.map_or_else(GroupSettings::default, |(m, q, w)| GroupSettings {
            max_unavailable: m.map(|m| m as u32),
            quorum: q.map(|q| q as u32),
            window: w.and_then(|w| serde_json::from_str(&w).ok()),
        }),
    )
}

/// `PUT /api/v1/groups/{name}` (admin): replaces the group's settings.
pub async fn set(
    State(server): State<Server>,
    caller: crate::auth::Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<GroupView>> {
    crate::devices::check_group(&name)?;
    let s: GroupSettings = parse_json(&body)?;
    if let Some(w) = &s.window {
        check_window(w)?;
    }
    if s.max_unavailable == Some(0) {
        return Err(ApiError::bad_request(
            "max_unavailable: 0 would never let a device update; leave it out for no limit",
        ));
    }
    let mut tx = server.db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO groups (name, max_unavailable, quorum, maintenance) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET max_unavailable = $2, quorum = $3, maintenance = $4",
    )
    .bind(&name)
    .bind(s.max_unavailable.map(i64::from))
    .bind(s.quorum.map(i64::from))
    .bind(
        s.window
            .as_ref()
            .map(|w| serde_json::to_string(w).expect("plain data")),
    )
    .execute(&mut *tx)
    .await?;
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "group.set",
        serde_json::json!({"group": name, "settings": s}),
    )
    .await?;
    tx.commit().await?;
    // This process sees the new window at once; others within two seconds.
    server.windows.write().expect("not poisoned").0 = i64::MIN;
    Ok(Json(GroupView {
        group: name,
        settings: s,
        members: None,
        healthy: None,
        leases: Vec::new(),
    }))
}

/// `GET /api/v1/groups/{name}` (viewer): settings, members, healthy members, leases.
pub async fn show(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Path(name): Path<String>,
) -> ApiResult<Json<GroupView>> {
    // A read writes nothing: check-ins not yet written are laid over the rows.
    let settings = load(&server, &name).await?;
    let devices: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id, health FROM devices WHERE grp = $1")
            .bind(&name)
            .fetch_all(&server.db.read)
            .await?;
    let members = devices.len() as i64;
    let healthy = crate::devices::health_now(&server, devices)
        .iter()
        .filter(|h| h.as_deref() == Some("healthy"))
        .count() as i64;
    let leases: Vec<(String, i64)> = sqlx::query_as(
        "SELECT device_id, expires_at FROM leases WHERE grp = $1 AND expires_at > $2 ORDER BY device_id",
    )
    .bind(&name)
    .bind(now_ms())
    .fetch_all(&server.db.pool)
    .await?;
    Ok(Json(GroupView {
        group: name,
        settings,
        members: Some(members as u64),
        healthy: Some(healthy as u64),
        leases: leases
            .into_iter()
            .map(|(device, e)| LeaseView {
                device,
                expires_at: rfc3339(e),
            })
            .collect(),
    }))
}

/// The maintenance window of a device's group, from the windows read at most two seconds ago.
pub async fn window_of_device(server: &Server, device: &str) -> ApiResult<Option<GroupWindow>> {
    let group = server
        .credentials
        .read()
        .expect("not poisoned")
        .get(device)
        .map(|(_, g)| g.clone());
    let group = match group {
        Some(g) => g,
        None => {
            let row: Option<(String,)> = sqlx::query_as("SELECT grp FROM devices WHERE id = $1")
                .bind(device)
                .fetch_optional(&server.db.read)
                .await?;
            match row {
                Some((g,)) => g,
                None => return Ok(None),
            }
        }
    };
    let now = crate::clock::now_ms();
    let fresh = server.windows.read().expect("not poisoned").0 > now - 2000;
    if !fresh {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, maintenance FROM groups WHERE maintenance IS NOT NULL")
                .fetch_all(&server.db.read)
                .await?;
        let map = rows
            .into_iter()
            .filter_map(|(g, w)| Some((g, serde_json::from_str(&w).ok()?)))
            .collect();
        *server.windows.write().expect("not poisoned") = (now, map);
    }
    Ok(server
        .windows
        .read()
        .expect("not poisoned")
        .1
        .get(&group)
        .cloned())
}

/// What a lease request may carry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// How long the lease lasts (default `30m`, at most `24h`).
    #[serde(default)]
    pub duration: Option<String>,
}

/// `POST /api/v1/device/lease` (device): a reboot lease, or 409 `lease-refused` with the reason.
pub async fn acquire(
    State(server): State<Server>,
    crate::auth::EnrolledDevice(device): crate::auth::EnrolledDevice,
    body: Bytes,
) -> ApiResult<Json<LeaseGrant>> {
    let req: LeaseRequest = if body.is_empty() {
        LeaseRequest::default()
    } else {
        parse_json(&body)?
    };
    let seconds = abide_core::rollout::parse_duration(req.duration.as_deref().unwrap_or("30m"))
        .map_err(|e| ApiError::bad_request(format!("duration: {e}")))?;
    if !(1..=86_400).contains(&seconds) {
        return Err(ApiError::bad_request("duration: 1s to 24h"));
    }
    // Health from check-ins not yet written counts too.
    crate::devices::flush_last_seen(&server).await?;
    let now = now_ms();
    let mut tx = server.db.pool.begin().await?;
    let row: Option<(String,)> = sqlx::query_as("SELECT grp FROM devices WHERE id = $1")
        .bind(&device)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((group,)) = row else {
        return Err(crate::auth::forget_device(&server, &device));
    };
    sqlx::query("INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(&group)
        .execute(&mut *tx)
        .await?;
    let (max_unavailable, quorum, maintenance): (Option<i64>, Option<i64>, Option<String>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT max_unavailable, quorum, maintenance FROM groups WHERE name = $1{}",
            server.db.for_update()
        )))
        .bind(&group)
        .fetch_one(&mut *tx)
        .await?;
    let expired: Vec<(String,)> =
        sqlx::query_as("SELECT device_id FROM leases WHERE grp = $1 AND expires_at <= $2")
            .bind(&group)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
    if !expired.is_empty() {
        sqlx::query("DELETE FROM leases WHERE grp = $1 AND expires_at <= $2")
            .bind(&group)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = expired.into_iter().map(|(d,)| d).collect();
        crate::audit::append(
            &server,
            &mut tx,
            "server",
            "lease.reclaim",
            serde_json::json!({"group": group, "devices": ids}),
        )
        .await?;
    }
    let expires = now + seconds as i64 * 1000;
    let held: Option<(i64,)> = sqlx::query_as("SELECT expires_at FROM leases WHERE device_id = $1")
        .bind(&device)
        .fetch_optional(&mut *tx)
        .await?;
    if held.is_none() {
        let (leased,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM leases WHERE grp = $1")
            .bind(&group)
            .fetch_one(&mut *tx)
            .await?;
        // Healthy as last heard, and heard recently: a device silent for longer than
        // `health_fresh` may be down, and does not count towards the quorum.
        let fresh_since =
            now - i64::try_from(server.config.health_fresh.as_millis()).unwrap_or(i64::MAX);
        let (healthy_free,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM devices d WHERE d.grp = $1 AND d.health = 'healthy' AND d.id <> $2 \
             AND d.last_seen >= $3 AND d.revoked_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.device_id = d.id)",
        )
        .bind(&group)
        .bind(&device)
        .bind(fresh_since)
        .fetch_one(&mut *tx)
        .await?;
        let window: Option<GroupWindow> = maintenance
            .map(|w| crate::db::json_column(&format!("groups {group}"), "maintenance", &w))
            .transpose()?;
        let ask = LeaseAsk {
            held: false,
            window: window.as_ref().map(|w| window_now(w, now)).transpose()?,
            leased: leased.max(0) as u64,
            max_unavailable: max_unavailable.map(|m| m.max(0) as u64),
            healthy_others: healthy_free.max(0) as u64,
            quorum: quorum.map(|q| q.max(0) as u64),
        };
        let refused = match abide_core::lease::decide(&ask) {
            LeaseDecision::Grant | LeaseDecision::Renew => None,
            LeaseDecision::Refuse(LeaseRefusal::WindowClosed) => {
                let w = window.as_ref().expect("a closed window exists");
                Some(format!(
                    "group {group}'s maintenance window ({} {}-{} {}) is closed",
                    w.days.join(","),
                    w.start,
                    w.end,
                    w.zone
                ))
            }
            LeaseDecision::Refuse(LeaseRefusal::Unavailable { leased, max }) => Some(format!(
                "{leased} of group {group}'s devices already hold a lease (max_unavailable {max})"
            )),
            LeaseDecision::Refuse(LeaseRefusal::Quorum { healthy, quorum }) => Some(format!(
                "only {healthy} other devices of group {group} heard from as healthy in the last {} s would stay up (quorum {quorum})",
                server.config.health_fresh.as_secs()
            )),
        };
        if let Some(why) = refused {
            tx.rollback().await?;
            return Err(ApiError::new(StatusCode::CONFLICT, "lease-refused", why));
        }
        sqlx::query(
            "INSERT INTO leases (device_id, grp, granted_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&device)
        .bind(&group)
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query("UPDATE leases SET expires_at = $2 WHERE device_id = $1")
            .bind(&device)
            .bind(expires)
            .execute(&mut *tx)
            .await?;
    }
    crate::audit::append(
        &server,
        &mut tx,
        &format!("device:{device}"),
        if held.is_none() {
            "lease.grant"
        } else {
            "lease.extend"
        },
        serde_json::json!({"group": group, "expires_at": rfc3339(expires)}),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(LeaseGrant {
        granted: true,
        group,
        expires_at: rfc3339(expires),
    }))
}

/// `DELETE /api/v1/device/lease` (device): gives the lease back (after commit or rollback).
pub async fn release(
    State(server): State<Server>,
    crate::auth::EnrolledDevice(device): crate::auth::EnrolledDevice,
) -> ApiResult<Json<LeaseReleased>> {
    let mut tx = server.db.pool.begin().await?;
    let gone = sqlx::query("DELETE FROM leases WHERE device_id = $1")
        .bind(&device)
        .execute(&mut *tx)
        .await?;
    if gone.rows_affected() > 0 {
        crate::audit::append(
            &server,
            &mut tx,
            &format!("device:{device}"),
            "lease.release",
            serde_json::json!({}),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Json(LeaseReleased {
        released: gone.rows_affected() > 0,
    }))
}
