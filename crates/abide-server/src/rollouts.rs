//! Rollouts: a release targeted at the devices of a group and/or tag, moved through stages
//! gated by what the devices report.
//!
//! Every targeted device has a row in `rollout_devices` with its stable place (see
//! [`abide_core::rollout::place`]) from the moment the rollout is created or the device
//! enrols, so stage counts are one indexed query. A device of the current stage gets the
//! release on its next check-in; its reports move its row; [`tick`] decides each running
//! rollout's stage under a row lock, so with several server processes a stage advances once.
//!
//! Statuses: `waiting` (targets no device yet), `prestaging` (with `prestage`: every targeted
//! device downloads and stages, and no one activates until the given share is staged),
//! `running`, `paused` (with the reason), `completed`, `aborted`, `rolled_back`.

use abide_core::rollout::{self, Counts, Decision, Stage};
use abide_fleet_json::{
    AgentInventory, AssignedAction, AssignedRelease, CheckinRequest, FailingDevice, InstalledApp,
    LeftOut, ReleaseKind, RolloutState, RolloutStatus, StageView,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sqlx::{Any, Transaction};

use crate::Server;
use crate::clock::{now_ms, rfc3339};
use crate::error::{ApiError, ApiResult, parse_json};

/// Device states that end a device's part in a rollout.
pub const TERMINAL: &[&str] = &[
    "committed",
    "failed",
    "rolled_back",
    "unresponsive",
    "skipped",
];
/// Of those, the ones that count as failures.
pub const FAILED: &[&str] = &["failed", "rolled_back", "unresponsive"];

fn sql_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A rollout as stored.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Its id.
    pub id: String,
    /// The release.
    pub release_id: String,
    /// The targeted group.
    pub group: Option<String>,
    /// The targeted tag.
    pub tag: Option<String>,
    /// Its stages.
    pub stages: Vec<Stage>,
    /// Failure threshold, basis points.
    pub threshold_bp: u32,
    /// Failures already accepted by an operator's resume, in the current stage.
    pub failure_baseline: i64,
    /// After how long a device that has not finished counts as failed.
    pub unresponsive_ms: i64,
    /// The current stage (0-based).
    pub stage: usize,
    /// Its status.
    pub status: String,
    /// Why it is paused (or was stopped).
    pub reason: Option<String>,
    /// When the current stage started.
    pub stage_started_at: i64,
    /// When it was created.
    pub created_at: i64,
    /// With prestaging: the share of targeted devices (basis points) that must be staged
    /// before the first stage activates; every targeted device stages first.
    pub prestage_bp: Option<u32>,
    /// Devices of the group or tag left out when it was created, by reason.
    pub left_out: Vec<LeftOut>,
}

/// The columns of a [`Rollout`].
const COLUMNS: &str = "id, release_id, grp, tag, stages, threshold_bp, failure_baseline, unresponsive_ms, stage, status, reason, stage_started_at, created_at, prestage_bp, left_out";

/// A stored rollout; a column that does not decode is an error (never "no stages").
impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for Rollout {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        let id: String = row.try_get("id")?;
        let stages: String = row.try_get("stages")?;
        let stages: Vec<Stage> =
            crate::db::json_column(&format!("rollout {id}"), "stages", &stages)?;
        if stages.is_empty() {
            return Err(sqlx::Error::Decode(
                format!("rollout {id}: column stages is empty").into(),
            ));
        }
        Ok(Rollout {
            id,
            release_id: row.try_get("release_id")?,
            group: row.try_get("grp")?,
            tag: row.try_get("tag")?,
            stages,
            threshold_bp: row.try_get::<i64, _>("threshold_bp")? as u32,
            failure_baseline: row.try_get("failure_baseline")?,
            unresponsive_ms: row.try_get("unresponsive_ms")?,
            stage: row.try_get::<i64, _>("stage")? as usize,
            status: row.try_get("status")?,
            reason: row.try_get("reason")?,
            stage_started_at: row.try_get("stage_started_at")?,
            created_at: row.try_get("created_at")?,
            prestage_bp: row
                .try_get::<Option<i64>, _>("prestage_bp")?
                .map(|b| b as u32),
            left_out: match row.try_get::<Option<String>, _>("left_out")? {
                Some(text) => crate::db::json_column(
                    &format!("rollout {}", row.try_get::<String, _>("id")?),
                    "left_out",
                    &text,
                )?,
                None => Vec::new(),
            },
        })
    }
}

/// Loads a rollout inside `tx`, locking its row on PostgreSQL.
pub async fn load_locked(
    server: &Server,
    tx: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<Option<Rollout>, sqlx::Error> {
    let row: Option<Rollout> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rollouts WHERE id = $1{}",
        server.db.for_update()
    )))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// A device the rollout may target.
struct Candidate {
    id: String,
    /// The version it runs of what the release replaces (the OS, the application, the agent).
    version: Option<String>,
}

/// What a device runs of what a release of `kind` (for application `app`) replaces: its OS
/// version `os`, the application's version in `apps`, or its agent's version; `Err` with the
/// reason it is left out when it does not have the application (`no-app`) or its agent cannot
/// replace itself (`no-self-update`).
fn part_version(
    kind: ReleaseKind,
    app: Option<&str>,
    os: Option<String>,
    apps: &[InstalledApp],
    agent: Option<&AgentInventory>,
) -> Result<Option<String>, &'static str> {
    match kind {
        ReleaseKind::Os => Ok(os),
        ReleaseKind::App => apps
            .iter()
            .find(|a| Some(a.name.as_str()) == app)
            .map(|a| a.version.clone())
            .ok_or("no-app"),
        ReleaseKind::Agent => agent
            .filter(|a| a.self_update)
            .map(|a| Some(a.version.clone()))
            .ok_or("no-self-update"),
    }
}

/// The enrolled devices a release's rollout to `group`/`tag` targets: same product, a shared
/// hardware id, the group, the tag.
async fn candidates(
    tx: &mut Transaction<'static, Any>,
    release: &abide_fleet_json::Release,
    group: Option<&str>,
    tag: Option<&str>,
    only: Option<&str>,
) -> Result<(Vec<Candidate>, Vec<LeftOut>), sqlx::Error> {
    type Found = (
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Found> = sqlx::query_as(
        "SELECT d.id, d.compatible, d.version, d.apps, d.agent FROM devices d WHERE d.product = $1 \
         AND ($2 = '' OR d.grp = $2) \
         AND ($3 = '' OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_id = d.id AND t.tag = $3)) \
         AND ($4 = '' OR d.id = $4)",
    )
    .bind(&release.product)
    .bind(group.unwrap_or(""))
    .bind(tag.unwrap_or(""))
    .bind(only.unwrap_or(""))
    .fetch_all(&mut **tx)
    .await?;
    let mut out = Vec::new();
    let mut left_out = std::collections::BTreeMap::<&str, u64>::new();
    for (id, compatible, version, apps, agent) in rows {
        let ids: Vec<String> =
            crate::db::json_column(&format!("device {id}"), "compatible", &compatible)?;
        if !ids.iter().any(|c| release.compatible.contains(c)) {
            continue;
        }
        // The inventory as stored from the device's check-in (JSON of its `apps`, `agent`).
        let apps: Vec<InstalledApp> = apps
            .and_then(|a| serde_json::from_str(&a).ok())
            .unwrap_or_default();
        let agent: Option<AgentInventory> = agent.and_then(|a| serde_json::from_str(&a).ok());
        match part_version(
            release.kind,
            release.app.as_deref(),
            version,
            &apps,
            agent.as_ref(),
        ) {
            Ok(version) => out.push(Candidate { id, version }),
            Err(reason) => *left_out.entry(reason).or_default() += 1,
        }
    }
    let left_out = left_out
        .into_iter()
        .map(|(reason, devices)| LeftOut {
            reason: reason.to_owned(),
            devices,
        })
        .collect();
    Ok((out, left_out))
}

/// Adds `devices` to rollout `r` (ignoring ones already in it), 500 rows per statement.
async fn add_devices(
    tx: &mut Transaction<'static, Any>,
    r: &Rollout,
    release: &abide_fleet_json::Release,
    devices: &[Candidate],
    now: i64,
) -> Result<(), sqlx::Error> {
    let quarantined: std::collections::HashSet<String> =
        sqlx::query_as::<_, (String,)>("SELECT device_id FROM quarantine WHERE release_id = $1")
            .bind(&r.release_id)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .map(|(d,)| d)
            .collect();
    for chunk in devices.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO rollout_devices (rollout_id, device_id, place, state, reason, updated_at) VALUES ",
        );
        for k in 0..chunk.len() {
            let b = k * 6;
            if k > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6
            ));
        }
        sql.push_str(" ON CONFLICT (rollout_id, device_id) DO NOTHING");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for d in chunk {
            let (state, reason) = if quarantined.contains(&d.id) {
                ("skipped", Some("rolled this release back before"))
            } else if d.version.as_deref() == Some(release.version.as_str()) {
                ("committed", Some("already running this release"))
            } else {
                ("pending", None)
            };
            q = q
                .bind(r.id.clone())
                .bind(d.id.clone())
                .bind(rollout::place(&r.id, &d.id) as i64)
                .bind(state)
                .bind(reason)
                .bind(now);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Puts a newly enrolled device into every unfinished rollout that targets it.
pub async fn enrol_device(
    tx: &mut Transaction<'static, Any>,
    device: &str,
) -> Result<(), sqlx::Error> {
    let rows: Vec<Rollout> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rollouts WHERE status IN ('waiting', 'prestaging', 'running', 'paused')"
    )))
    .fetch_all(&mut **tx)
    .await?;
    for r in rows {
        let Some(release) = crate::releases::find_in(tx, &r.release_id).await? else {
            continue;
        };
        let (found, _) = candidates(
            tx,
            &release,
            r.group.as_deref(),
            r.tag.as_deref(),
            Some(device),
        )
        .await?;
        add_devices(tx, &r, &release, &found, now_ms()).await?;
    }
    Ok(())
}

/// `POST /api/v1/rollouts` (operator).
pub async fn create(
    State(server): State<Server>,
    caller: crate::auth::Operator,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RolloutStatus>)> {
    let req: abide_fleet_json::RolloutRequest = parse_json(&body)?;
    let stages =
        rollout::parse_stages(&req.stages).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let threshold = rollout::parse_percent(req.failure_threshold.as_deref().unwrap_or("10%"))
        .map_err(|e| ApiError::bad_request(format!("failure_threshold: {e}")))?;
    let unresponsive = rollout::parse_duration(req.unresponsive_after.as_deref().unwrap_or("4h"))
        .map_err(|e| ApiError::bad_request(format!("unresponsive_after: {e}")))?;
    if unresponsive == 0 {
        return Err(ApiError::bad_request(
            "unresponsive_after: must be more than 0s",
        ));
    }
    for (field, v) in [("group", &req.group), ("tag", &req.tag)] {
        if let Some(v) = v.as_deref().filter(|v| !crate::devices::valid_label(v, 64)) {
            return Err(ApiError::bad_request(format!("{field} {v:?}: not a name")));
        }
    }
    let prestage_bp = req
        .prestage
        .as_deref()
        .map(|p| {
            rollout::parse_percent(p)
                .ok()
                .filter(|bp| *bp > 0)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "prestage {p:?}: expected a share above 0%, as 80%"
                    ))
                })
        })
        .transpose()?;
    let release = crate::releases::find(&server, &req.release)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {}", req.release)))?;
    if prestage_bp.is_some() && !release.kind.is_os() {
        return Err(ApiError::bad_request(format!(
            "prestage: release {} is an {} release, which has no staged step to wait in (it is carried out whole in the device's window)",
            release.id,
            release.kind.as_str()
        )));
    }
    let now = now_ms();
    let mut r = Rollout {
        id: format!("ro-{}", crate::random_hex(6)),
        release_id: release.id.clone(),
        group: req.group,
        tag: req.tag,
        stages,
        threshold_bp: threshold,
        failure_baseline: 0,
        unresponsive_ms: unresponsive as i64 * 1000,
        stage: 0,
        status: "waiting".into(),
        reason: None,
        stage_started_at: now,
        created_at: now,
        prestage_bp,
        left_out: Vec::new(),
    };
    let mut tx = server.db.pool.begin().await?;
    let (found, left_out) = candidates(
        &mut tx,
        &release,
        r.group.as_deref(),
        r.tag.as_deref(),
        None,
    )
    .await?;
    r.left_out = left_out;
    if !found.is_empty() {
        r.status = if r.prestage_bp.is_some() {
            "prestaging"
        } else {
            "running"
        }
        .into();
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rollouts ({COLUMNS}, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
    )))
    .bind(&r.id)
    .bind(&r.release_id)
    .bind(&r.group)
    .bind(&r.tag)
    .bind(serde_json::to_string(&r.stages).expect("plain data"))
    .bind(i64::from(r.threshold_bp))
    .bind(0i64)
    .bind(r.unresponsive_ms)
    .bind(0i64)
    .bind(&r.status)
    .bind(&r.reason)
    .bind(now)
    .bind(now)
    .bind(r.prestage_bp.map(i64::from))
    .bind((!r.left_out.is_empty()).then(|| serde_json::to_string(&r.left_out).expect("plain data")))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    add_devices(&mut tx, &r, &release, &found, now).await?;
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        "rollout.create",
        serde_json::json!({"rollout": r.id, "release": r.release_id, "stages": r.stages,
            "failure_threshold_bp": r.threshold_bp, "group": r.group, "tag": r.tag, "devices": found.len(),
            "prestage_bp": r.prestage_bp, "left_out": r.left_out}),
    )
    .await?;
    tx.commit().await?;
    let status = status_of(&server, &r.id).await?;
    Ok((StatusCode::CREATED, Json(status)))
}

/// A rollout's status with per-stage counts and its failing devices.
pub async fn status_of(server: &Server, id: &str) -> ApiResult<RolloutStatus> {
    let row: Option<Rollout> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rollouts WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&server.db.pool)
    .await?;
    let r = row.ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    let status = RolloutState::parse(&r.status).ok_or_else(|| {
        ApiError::internal(
            "reading the rollout",
            format!("rollout {id}: status {:?} is not a rollout state", r.status),
        )
    })?;
    let rows: Vec<(i64, String, String, Option<String>)> = sqlx::query_as(
        "SELECT place, state, device_id, reason FROM rollout_devices WHERE rollout_id = $1 ORDER BY place",
    )
    .bind(id)
    .fetch_all(&server.db.pool)
    .await?;
    let mut stages = Vec::new();
    let mut lower = 0u64;
    for (i, s) in r.stages.iter().enumerate() {
        let upper = rollout::cutoff(s.percent);
        let mut states = std::collections::BTreeMap::<String, u64>::new();
        for (place, state, _, _) in &rows {
            if (lower..upper).contains(&(*place as u64)) {
                *states.entry(state.clone()).or_default() += 1;
            }
        }
        stages.push(StageView {
            index: i as u64 + 1,
            percent: s.percent,
            soak_seconds: s.soak,
            devices: states.values().sum(),
            committed: states.get("committed").copied().unwrap_or(0),
            failed: FAILED
                .iter()
                .map(|f| states.get(*f).copied().unwrap_or(0))
                .sum(),
            current: i == r.stage
                && matches!(
                    status,
                    RolloutState::Running
                        | RolloutState::Paused
                        | RolloutState::Waiting
                        | RolloutState::Prestaging
                ),
            states,
        });
        lower = upper;
    }
    let failing = rows
        .iter()
        .filter(|(_, state, _, _)| FAILED.contains(&state.as_str()))
        .map(|(_, state, device, reason)| FailingDevice {
            device: device.clone(),
            state: state.clone(),
            reason: reason.clone(),
        })
        .collect();
    let count = |want: &[&str]| {
        rows.iter()
            .filter(|(_, s, _, _)| want.contains(&s.as_str()))
            .count() as u64
    };
    // Staged devices whose group's maintenance window is closed now wait for it.
    let mut waiting_for_window = 0;
    let now = jiff::Timestamp::now();
    for (_, state, device, _) in &rows {
        if state == "staged"
            && crate::groups::window_of_device(server, device)
                .await?
                .is_some_and(|w| !crate::groups::window_open(&w, now))
        {
            waiting_for_window += 1;
        }
    }
    let devices = rows.len() as u64;
    let taking_part = devices - count(&["skipped"]);
    let staged_share = if taking_part == 0 {
        0.0
    } else {
        (count(&["staged", "committed"]) as f64 / taking_part as f64 * 1000.0).round() / 10.0
    };
    Ok(RolloutStatus {
        id: r.id,
        release: r.release_id,
        status,
        reason: r.reason,
        group: r.group,
        tag: r.tag,
        stage: r.stage as u64 + 1,
        stages,
        failure_threshold: format!("{}%", f64::from(r.threshold_bp) / 100.0),
        devices,
        committed: count(&["committed"]),
        failed: count(FAILED),
        in_progress: devices - count(TERMINAL) - count(&["pending"]),
        pending: count(&["pending"]),
        failing,
        stage_started_at: rfc3339(r.stage_started_at),
        created_at: rfc3339(r.created_at),
        prestage: r
            .prestage_bp
            .map(|bp| format!("{}%", f64::from(bp) / 100.0)),
        staged: count(&["staged"]),
        staged_share,
        waiting_for_window,
        left_out: r.left_out,
    })
}

/// `GET /api/v1/rollouts/{id}` (viewer).
pub async fn show(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutStatus>> {
    Ok(Json(status_of(&server, &id).await?))
}

/// `GET /api/v1/rollouts` (viewer): every rollout's status, newest first.
pub async fn list(
    State(server): State<Server>,
    _caller: crate::auth::Viewer,
) -> ApiResult<Json<Vec<RolloutStatus>>> {
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM rollouts ORDER BY created_at DESC, id")
            .fetch_all(&server.db.pool)
            .await?;
    let mut out = Vec::new();
    for (id,) in ids {
        out.push(status_of(&server, &id).await?);
    }
    Ok(Json(out))
}

async fn set_status(
    tx: &mut Transaction<'static, Any>,
    id: &str,
    status: &str,
    reason: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE rollouts SET status = $2, reason = $3, updated_at = $4 WHERE id = $1")
        .bind(id)
        .bind(status)
        .bind(reason)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The highest place in the rollout's current stage, as the database stores places (a stage
/// of 100 % ends at 2^63 − 1, the highest place there is).
fn last_place(r: &Rollout) -> i64 {
    let cutoff = rollout::cutoff(r.stages.get(r.stage).map_or(100, |s| s.percent));
    (i128::from(cutoff) - 1) as i64
}

async fn stage_counts(
    tx: &mut Transaction<'static, Any>,
    r: &Rollout,
) -> Result<Counts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, COUNT(*) FROM rollout_devices WHERE rollout_id = $1 AND place <= $2 GROUP BY state",
    )
    .bind(&r.id)
    .bind(last_place(r))
    .fetch_all(&mut **tx)
    .await?;
    let mut c = Counts::default();
    for (state, n) in rows {
        let n = n as u64;
        c.total += n;
        match state.as_str() {
            "committed" => c.committed += n,
            "skipped" => c.skipped += n,
            s if FAILED.contains(&s) => c.failed += n,
            _ => {}
        }
    }
    Ok(c)
}

/// One decision about a rollout, for the log, the audit trail and the benchmark.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The rollout.
    pub rollout: String,
    /// What happened (`advance`, `complete`, `pause`, `start`, `wait`).
    pub what: String,
    /// How long the decision took, in seconds.
    pub seconds: f64,
}

/// Decides every waiting or running rollout at `now`: devices past their time become
/// unresponsive, then the stage waits, advances, completes, or pauses. Each rollout is decided
/// in its own transaction holding its row lock.
pub async fn tick(server: &Server, now: i64) -> ApiResult<Vec<Decided>> {
    // Last contacts first: whether a device is unresponsive depends on them.
    crate::devices::flush_last_seen(server).await?;
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM rollouts WHERE status IN ('waiting', 'prestaging', 'running') ORDER BY created_at",
    )
    .fetch_all(&server.db.pool)
    .await?;
    let mut out = Vec::new();
    for (id,) in ids {
        let started = std::time::Instant::now();
        let mut tx = server.db.pool.begin().await?;
        // A rollout whose row does not decode is not decided (and says so in the log); the
        // others are.
        let mut r = match load_locked(server, &mut tx, &id).await {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e @ sqlx::Error::Decode(_)) => {
                tracing::error!(rollout = %id, error = %e, "a stored rollout does not decode");
                out.push(Decided {
                    rollout: id,
                    what: "error".into(),
                    seconds: started.elapsed().as_secs_f64(),
                });
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let what = decide_one(server, &mut tx, &mut r, now).await?;
        tx.commit().await?;
        out.push(Decided {
            rollout: id,
            what,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(out)
}

async fn decide_one(
    server: &Server,
    tx: &mut Transaction<'static, Any>,
    r: &mut Rollout,
    now: i64,
) -> Result<String, sqlx::Error> {
    if !matches!(r.status.as_str(), "waiting" | "prestaging" | "running") {
        return Ok("none".into());
    }
    let (targeted,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM rollout_devices WHERE rollout_id = $1")
            .bind(&r.id)
            .fetch_one(&mut **tx)
            .await?;
    if targeted == 0 {
        return Ok("wait".into());
    }
    if r.status == "waiting" && r.prestage_bp.is_some() {
        set_status(tx, &r.id, "prestaging", None, now).await?;
        r.status = "prestaging".into();
    }
    if r.status == "prestaging" {
        let (ready, total) = staged_share(tx, &r.id).await?;
        let bp = i64::from(r.prestage_bp.unwrap_or(0));
        if total == 0 || ready * 10_000 < bp * total {
            return Ok("wait".into());
        }
        let details =
            serde_json::json!({"rollout": r.id, "devices": targeted, "staged": ready, "of": total});
        start(server, tx, r, now, details).await?;
        return Ok("start".into());
    }
    if r.status == "waiting" {
        let details = serde_json::json!({"rollout": r.id, "devices": targeted});
        start(server, tx, r, now, details).await?;
    }
    let cutoff = last_place(r);
    let limit = now - r.unresponsive_ms;
    let terminal = sql_list(TERMINAL);
    // A device assigned before its stage began (it prestaged) counts from the stage's start.
    // Unresponsive is counted from a device's last contact: one that keeps checking in (while
    // it waits for its maintenance window, say) is not failed.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE rollout_devices SET state = 'unresponsive', reason = 'no result in time', updated_at = $3 \
         WHERE rollout_id = $1 AND place <= $2 AND state NOT IN ({terminal}) AND state <> 'pending' AND assigned_at < $4 AND $5 < $4 \
         AND device_id IN (SELECT id FROM devices WHERE last_seen IS NULL OR last_seen < $4)"
    )))
    .bind(&r.id)
    .bind(cutoff)
    .bind(now)
    .bind(limit)
    .bind(r.stage_started_at)
    .execute(&mut **tx)
    .await?;
    if r.stage_started_at < limit {
        sqlx::query(
            "UPDATE rollout_devices SET state = 'unresponsive', reason = 'did not check in', updated_at = $3 \
             WHERE rollout_id = $1 AND place <= $2 AND state = 'pending' \
             AND device_id IN (SELECT id FROM devices WHERE last_seen IS NULL OR last_seen < $4)",
        )
        .bind(&r.id)
        .bind(cutoff)
        .bind(now)
        .bind(limit)
        .execute(&mut **tx)
        .await?;
    }
    let mut counts = stage_counts(tx, r).await?;
    counts.accepted = r.failure_baseline as u64;
    let decision = rollout::decide(
        &r.stages,
        r.stage,
        r.stage_started_at,
        now,
        counts,
        r.threshold_bp,
    );
    let what = match decision {
        Decision::Wait => return Ok("wait".into()),
        Decision::Advance => {
            let moved = sqlx::query(
                "UPDATE rollouts SET stage = stage + 1, stage_started_at = $2, failure_baseline = 0, updated_at = $2 \
                 WHERE id = $1 AND stage = $3 AND status = 'running'",
            )
            .bind(&r.id)
            .bind(now)
            .bind(r.stage as i64)
            .execute(&mut **tx)
            .await?;
            if moved.rows_affected() != 1 {
                return Ok("none".into());
            }
            "advance"
        }
        Decision::Complete => {
            set_status(tx, &r.id, "completed", None, now).await?;
            "complete"
        }
        Decision::Pause(ref reason) => {
            set_status(tx, &r.id, "paused", Some(reason), now).await?;
            "pause"
        }
    };
    let reason = match &decision {
        Decision::Pause(reason) => Some(reason.clone()),
        _ => None,
    };
    tracing::info!(rollout = %r.id, stage = r.stage + 1, decision = what, ?counts, "rollout decided");
    crate::audit::append(
        server,
        tx,
        "server",
        &format!("rollout.{what}"),
        serde_json::json!({"rollout": r.id, "stage": r.stage + 1, "counts": counts, "reason": reason}),
    )
    .await?;
    Ok(what.into())
}

/// Starts the first stage now.
async fn start(
    server: &Server,
    tx: &mut Transaction<'static, Any>,
    r: &mut Rollout,
    now: i64,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE rollouts SET status = 'running', stage_started_at = $2, updated_at = $2 WHERE id = $1")
        .bind(&r.id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    r.status = "running".into();
    r.stage_started_at = now;
    crate::audit::append(server, tx, "server", "rollout.start", details).await
}

/// How many targeted devices are ready to activate (staged, or already running the release)
/// of all that take part (not skipped).
async fn staged_share(
    tx: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('staged', 'committed') THEN 1 ELSE 0 END), 0), \
                COALESCE(SUM(CASE WHEN state <> 'skipped' THEN 1 ELSE 0 END), 0) \
         FROM rollout_devices WHERE rollout_id = $1",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await
}

/// `POST /api/v1/rollouts/{id}/{action}` (operator): `pause`, `resume`, `advance`, `abort`,
/// `rollback`. A transition the rollout's status does not allow is a 409.
pub async fn act(
    State(server): State<Server>,
    caller: crate::auth::Operator,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<RolloutStatus>> {
    Ok(Json(apply_action(&server, &caller, &id, &action).await?))
}

/// Carries out an operator's action on a rollout (`caller` already checked) and returns its
/// new status.
pub async fn apply_action(
    server: &Server,
    caller: &crate::auth::Caller,
    id: &str,
    action: &str,
) -> ApiResult<RolloutStatus> {
    let server = server.clone();
    let (id, action) = (id.to_owned(), action.to_owned());
    let now = now_ms();
    let mut tx = server.db.pool.begin().await?;
    let r = load_locked(&server, &mut tx, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    let refuse =
        |verb: &str| ApiError::conflict(format!("a {} rollout cannot be {verb}", r.status));
    let mut details = serde_json::json!({"rollout": id, "from": r.status});
    match action.as_str() {
        "pause" => {
            if !matches!(r.status.as_str(), "running" | "waiting" | "prestaging") {
                return Err(refuse("paused"));
            }
            set_status(&mut tx, &id, "paused", Some("paused by an operator"), now).await?;
        }
        "resume" => {
            if r.status != "paused" {
                return Err(refuse("resumed"));
            }
            // The failures that paused it are accepted; new ones count from here. A rollout
            // paused while it prestaged goes back to prestaging until its share is staged.
            let counts = stage_counts(&mut tx, &r).await?;
            let (ready, total) = staged_share(&mut tx, &id).await?;
            let back = match r.prestage_bp {
                Some(bp) if r.stage == 0 && ready * 10_000 < i64::from(bp) * total => "prestaging",
                _ => "running",
            };
            sqlx::query("UPDATE rollouts SET status = $4, reason = NULL, failure_baseline = $2, updated_at = $3 WHERE id = $1")
                .bind(&id)
                .bind(counts.failed as i64)
                .bind(now)
                .bind(back)
                .execute(&mut *tx)
                .await?;
            details["accepted_failures"] = serde_json::json!(counts.failed);
        }
        "advance" => {
            if !matches!(r.status.as_str(), "running" | "paused" | "waiting") {
                return Err(refuse("advanced"));
            }
            if r.stage + 1 >= r.stages.len() {
                return Err(ApiError::conflict("the rollout is at its last stage"));
            }
            sqlx::query(
                "UPDATE rollouts SET stage = stage + 1, stage_started_at = $2, failure_baseline = 0, status = 'running', reason = NULL, updated_at = $2 WHERE id = $1",
            )
            .bind(&id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            details["stage"] = serde_json::json!(r.stage + 2);
        }
        "abort" => {
            if !matches!(
                r.status.as_str(),
                "running" | "paused" | "waiting" | "prestaging"
            ) {
                return Err(refuse("aborted"));
            }
            set_status(&mut tx, &id, "aborted", Some("aborted by an operator"), now).await?;
        }
        "rollback" => {
            if !matches!(
                r.status.as_str(),
                "running" | "paused" | "completed" | "aborted"
            ) {
                return Err(refuse("rolled back"));
            }
            set_status(
                &mut tx,
                &id,
                "rolled_back",
                Some("fleet-wide rollback by an operator"),
                now,
            )
            .await?;
        }
        other => {
            return Err(ApiError::not_found(format!(
                "no rollout action {other:?}: expected pause, resume, advance, abort or rollback"
            )));
        }
    }
    crate::audit::append(
        &server,
        &mut tx,
        &caller.actor,
        &format!("rollout.{action}"),
        details,
    )
    .await?;
    tx.commit().await?;
    status_of(&server, &id).await
}

/// A device's row in a rollout, with the rollout and its release.
struct AssignRow {
    rollout_id: String,
    stage: i64,
    /// The rollout's stages, JSON.
    stages: String,
    status: String,
    release_id: String,
    security_version: i64,
    version: String,
    sha256: String,
    size: i64,
    state: String,
    place: i64,
    from_version: Option<String>,
    prestage_bp: Option<i64>,
    kind: String,
    app: Option<String>,
}

impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for AssignRow {
    fn from_row(row: &'r sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(AssignRow {
            rollout_id: row.try_get("rollout_id")?,
            stage: row.try_get("stage")?,
            stages: row.try_get("stages")?,
            status: row.try_get("status")?,
            release_id: row.try_get("release_id")?,
            security_version: row.try_get("security_version")?,
            version: row.try_get("version")?,
            sha256: row.try_get("sha256")?,
            size: row.try_get("size")?,
            state: row.try_get("state")?,
            place: row.try_get("place")?,
            from_version: row.try_get("from_version")?,
            prestage_bp: row.try_get("prestage_bp")?,
            kind: row.try_get("kind")?,
            app: row.try_get("app")?,
        })
    }
}

/// The release a device should act on now, if any (newest rollout first). The first time a
/// device of the current stage is given a release its row becomes `assigned`.
pub async fn assignment(
    server: &Server,
    device: &str,
    checkin: &CheckinRequest,
    now: i64,
) -> ApiResult<Option<AssignedRelease>> {
    let rows: Vec<AssignRow> = sqlx::query_as(
        "SELECT r.id AS rollout_id, r.stage, r.stages, r.status, rel.id AS release_id, rel.security_version, rel.version, \
                rel.sha256, rel.size, rd.state, rd.place, rd.from_version, r.prestage_bp, rel.kind, rel.app \
         FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id JOIN releases rel ON rel.id = r.release_id \
         WHERE rd.device_id = $1 AND r.status IN ('prestaging', 'running', 'rolled_back') ORDER BY r.created_at DESC",
    )
    .bind(device)
    .fetch_all(&server.db.read)
    .await?;
    for AssignRow {
        rollout_id,
        stage,
        stages,
        status,
        release_id,
        security_version: security,
        version: rel_version,
        sha256,
        size,
        state,
        place,
        from_version: from,
        prestage_bp: prestage,
        kind,
        app,
    } in rows
    {
        let stages: Vec<Stage> =
            crate::db::json_column(&format!("rollout {rollout_id}"), "stages", &stages)?;
        let kind = ReleaseKind::parse(&kind).unwrap_or_default();
        // What the device runs of what the release replaces, from this check-in.
        let version = part_version(
            kind,
            app.as_deref(),
            Some(checkin.version.clone()),
            &checkin.apps,
            checkin.agent.as_ref(),
        )
        .ok()
        .flatten();
        let version = version.as_deref().unwrap_or("");
        let assigned = |release_id: String,
                        version: String,
                        security: i64,
                        sha256: String,
                        size: i64,
                        action: AssignedAction| AssignedRelease {
            url: format!("/api/v1/releases/{release_id}/bundle"),
            release_id,
            rollout_id: rollout_id.clone(),
            version,
            security_version: security as u64,
            sha256,
            size: size as u64,
            action,
            delta: None,
            kind,
            app: app.clone(),
        };
        if status == "rolled_back" {
            let Some(prev) = from.as_deref() else {
                continue;
            };
            if !matches!(
                state.as_str(),
                "assigned" | "downloading" | "staged" | "rebooting" | "trial" | "committed"
            ) {
                continue;
            }
            let previous: Option<(String, i64, String, i64)> = sqlx::query_as(
                "SELECT p.id, p.security_version, p.sha256, p.size FROM releases p JOIN releases n ON n.product = p.product \
                 AND n.kind = p.kind AND COALESCE(n.app, '') = COALESCE(p.app, '') \
                 WHERE n.id = $1 AND p.version = $2 ORDER BY p.created_at DESC LIMIT 1",
            )
            .bind(&release_id)
            .bind(prev)
            .fetch_optional(&server.db.pool)
            .await?;
            let Some((pid, psec, psha, psize)) = previous else {
                continue;
            };
            if state == "committed" && psec < security {
                // The device raised its security counter on commit: it cannot go back.
                continue;
            }
            if state == "committed" && version == prev {
                continue;
            }
            let action = if state == "committed" {
                AssignedAction::Install
            } else {
                AssignedAction::Rollback
            };
            return Ok(Some(assigned(
                pid,
                prev.to_owned(),
                psec,
                psha,
                psize,
                action,
            )));
        }
        if TERMINAL.contains(&state.as_str()) {
            continue;
        }
        // With prestaging every targeted device stages; only the current stage's activate.
        let cutoff = rollout::cutoff(stages.get(stage as usize).map_or(100, |s| s.percent));
        let action = if status == "prestaging" || (place as u64) >= cutoff {
            if prestage.is_none() {
                continue;
            }
            AssignedAction::Stage
        } else {
            AssignedAction::Install
        };
        let quarantined: Option<(i64,)> =
            sqlx::query_as("SELECT at FROM quarantine WHERE device_id = $1 AND release_id = $2")
                .bind(device)
                .bind(&release_id)
                .fetch_optional(&server.db.pool)
                .await?;
        if quarantined.is_some() {
            sqlx::query("UPDATE rollout_devices SET state = 'skipped', reason = 'rolled this release back before', updated_at = $3 WHERE rollout_id = $1 AND device_id = $2")
                .bind(&rollout_id)
                .bind(device)
                .bind(now)
                .execute(&server.db.pool)
                .await?;
            continue;
        }
        if state == "pending" {
            sqlx::query(
                "UPDATE rollout_devices SET state = 'assigned', assigned_at = $3, from_version = $4, updated_at = $3 \
                 WHERE rollout_id = $1 AND device_id = $2 AND state = 'pending'",
            )
            .bind(&rollout_id)
            .bind(device)
            .bind(now)
            .bind(version)
            .execute(&server.db.pool)
            .await?;
        }
        let mut given = assigned(release_id, rel_version, security, sha256, size, action);
        if kind.is_os() {
            given.delta = crate::deltas::offer(server, &given.release_id, version).await?;
        }
        return Ok(Some(given));
    }
    Ok(None)
}

/// Whether a rollout (`rollout`, or any) gives `device` the release `release`: the rollout's
/// own release, or, once it is rolled back, the release the device ran before it. Downloads
/// and reports are checked against this.
pub async fn gives(
    server: &Server,
    device: &str,
    release: &str,
    rollout: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let found: Option<(i64,)> = sqlx::query_as(
        "SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
         WHERE rd.device_id = $1 AND ($3 = '' OR r.id = $3) \
           AND (r.release_id = $2 OR (r.status = 'rolled_back' AND EXISTS \
             (SELECT 1 FROM releases p JOIN releases n ON n.product = p.product \
              AND n.kind = p.kind AND COALESCE(n.app, '') = COALESCE(p.app, '') \
              WHERE n.id = r.release_id AND p.id = $2 AND p.version = rd.from_version))) LIMIT 1",
    )
    .bind(device)
    .bind(release)
    .bind(rollout.unwrap_or(""))
    .fetch_optional(&server.db.pool)
    .await?;
    Ok(found.is_some())
}

/// Moves a device's row in a rollout after a report (the newest report only).
pub async fn on_report(
    tx: &mut Transaction<'static, Any>,
    device: &str,
    rollout_id: &str,
    release_id: Option<&str>,
    status: abide_fleet_json::ReportStatus,
    reason: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let row: Option<(String,)> = sqlx::query_as("SELECT release_id FROM rollouts WHERE id = $1")
        .bind(rollout_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some((rollout_release,)) = row else {
        return Ok(());
    };
    // A report about another release in this rollout is the fleet-wide rollback's reinstall.
    let state = if status == abide_fleet_json::ReportStatus::Committed
        && release_id.is_some_and(|r| r != rollout_release)
    {
        "reverted"
    } else {
        status.as_str()
    };
    sqlx::query("UPDATE rollout_devices SET state = $3, reason = $4, updated_at = $5 WHERE rollout_id = $1 AND device_id = $2")
        .bind(rollout_id)
        .bind(device)
        .bind(state)
        .bind(reason)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Decides the rollouts every second, for as long as the server runs.
pub async fn tick_forever(server: Server) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        if let Err(e) = tick(&server, now_ms()).await {
            tracing::error!(error = %e.message, "deciding rollouts");
        }
    }
}
