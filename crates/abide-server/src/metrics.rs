//! `/metrics` in the Prometheus text format. Everything but the check-in counter is read from
//! the database, so any server process of a fleet answers for the whole fleet; the check-in
//! counter is this process's own (Prometheus sums it over the processes).
//!
//! A scrape does not scan the fleet: the database's aggregates (which read every device and
//! report) are rendered at the first scrape, then refreshed in the background every
//! `metrics_refresh` (10 s) for as long as scrapes keep coming (five minutes after the last,
//! the refreshing stops); a scrape serves the latest rendering, and
//! `abide_metrics_age_seconds` says how old it is.
//!
//! Names: `abide_devices` (by state), `abide_checkins_total`, `abide_reports_total` (by
//! status), `abide_rollbacks_total`, `abide_rollout_devices` (by rollout and state),
//! `abide_rollout_success_ratio` (by rollout), and the histograms `abide_download_seconds`,
//! `abide_apply_seconds` and `abide_reboot_to_healthy_seconds`, from the durations devices
//! report with `staged`, `rebooting` and `committed`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::Server;
use crate::error::ApiResult;

/// Counters kept in the process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Check-ins answered.
    pub checkins: AtomicU64,
}

/// The aggregates as last rendered, shared by scrapes.
#[derive(Debug, Default)]
pub struct Snapshot(std::sync::Mutex<SnapshotState>);

#[derive(Debug, Default)]
struct SnapshotState {
    /// When the aggregates were read, and their text.
    text: Option<(Instant, String)>,
    /// The last scrape.
    last_scrape: Option<Instant>,
    /// Whether the background refresh runs.
    refreshing: bool,
}

/// How long after the last scrape the background refresh goes on.
const KEEP: Duration = Duration::from_secs(300);

const BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn histogram(
    server: &Server,
    out: &mut String,
    name: &str,
    help: &str,
    status: &str,
) -> ApiResult<()> {
    let mut cases = String::new();
    for (i, b) in BUCKETS.iter().enumerate() {
        let _ = write!(
            cases,
            "CAST(SUM(CASE WHEN millis <= {} THEN 1 ELSE 0 END) AS BIGINT) AS b{i}, ",
            (b * 1000.0) as i64
        );
    }
    let sql = format!(
        "SELECT {cases}COUNT(*), CAST(COALESCE(SUM(millis), 0) AS BIGINT) FROM reports WHERE status = $1 AND millis IS NOT NULL"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(status)
        .fetch_one(&server.db.read)
        .await?;
    use sqlx::Row as _;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, b) in BUCKETS.iter().enumerate() {
        let n: Option<i64> = row.try_get(i)?;
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", n.unwrap_or(0));
    }
    let count: i64 = row.try_get(BUCKETS.len())?;
    let sum: i64 = row.try_get(BUCKETS.len() + 1)?;
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1000.0);
    let _ = writeln!(out, "{name}_count {count}");
    Ok(())
}

/// Renders the metrics read from the database (every device and report: see the module
/// documentation for how often).
pub async fn render(server: &Server) -> ApiResult<String> {
    let mut out = String::new();
    let states = crate::devices::count_by_state_read(server).await?;
    out.push_str("# HELP abide_devices Enrolled devices by state.\n# TYPE abide_devices gauge\n");
    for (state, n) in &states {
        let _ = writeln!(out, "abide_devices{{state=\"{}\"}} {n}", label(state));
    }
    let reports: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM reports GROUP BY status ORDER BY status")
            .fetch_all(&server.db.read)
            .await?;
    out.push_str("# HELP abide_reports_total Reports recorded, by status.\n# TYPE abide_reports_total counter\n");
    let mut rollbacks = 0;
    for (status, n) in &reports {
        let _ = writeln!(
            out,
            "abide_reports_total{{status=\"{}\"}} {n}",
            label(status)
        );
        if status == "rolled_back" {
            rollbacks = *n;
        }
    }
    let _ = writeln!(
        out,
        "# HELP abide_rollbacks_total Updates devices rolled back.\n# TYPE abide_rollbacks_total counter\nabide_rollbacks_total {rollbacks}"
    );
    let per_rollout: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT rollout_id, state, COUNT(*) FROM rollout_devices GROUP BY rollout_id, state ORDER BY rollout_id, state",
    )
    .fetch_all(&server.db.read)
    .await?;
    out.push_str("# HELP abide_rollout_devices Devices of each rollout by state.\n# TYPE abide_rollout_devices gauge\n");
    let mut ratio: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
    for (rollout, state, n) in &per_rollout {
        let _ = writeln!(
            out,
            "abide_rollout_devices{{rollout=\"{}\",state=\"{}\"}} {n}",
            label(rollout),
            label(state)
        );
        let e = ratio.entry(rollout).or_default();
        if state == "committed" {
            e.0 += n;
        } else if crate::rollouts::FAILED.contains(&state.as_str()) {
            e.1 += n;
        }
    }
    out.push_str("# HELP abide_rollout_success_ratio Committed devices over committed and failed ones, per rollout.\n# TYPE abide_rollout_success_ratio gauge\n");
    for (rollout, (ok, failed)) in ratio {
        if ok + failed > 0 {
            let _ = writeln!(
                out,
                "abide_rollout_success_ratio{{rollout=\"{}\"}} {}",
                label(rollout),
                ok as f64 / (ok + failed) as f64
            );
        }
    }
    histogram(
        server,
        &mut out,
        "abide_download_seconds",
        "Time from the start of a download to staged.",
        "staged",
    )
    .await?;
    histogram(
        server,
        &mut out,
        "abide_apply_seconds",
        "Time to apply a staged update before its reboot.",
        "rebooting",
    )
    .await?;
    histogram(
        server,
        &mut out,
        "abide_reboot_to_healthy_seconds",
        "Time from the update's start to a committed trial.",
        "committed",
    )
    .await?;
    Ok(out)
}

/// The aggregates for a scrape at `now`: the latest rendering while scrapes keep the
/// background refresh going, else rendered now. Returns the text and when it was read.
async fn aggregates(server: &Server, now: Instant) -> ApiResult<(Instant, String)> {
    let refresh = server.config.metrics_refresh;
    let kept = {
        let mut s = server.metrics.0.lock().expect("not poisoned");
        s.last_scrape = Some(now);
        s.text
            .clone()
            .filter(|(at, _)| !refresh.is_zero() && now.duration_since(*at) < KEEP)
    };
    let got = match kept {
        Some(kept) => kept,
        None => {
            let text = render(server).await?;
            let at = Instant::now();
            server.metrics.0.lock().expect("not poisoned").text = Some((at, text.clone()));
            (at, text)
        }
    };
    if !refresh.is_zero() {
        let start = {
            let mut s = server.metrics.0.lock().expect("not poisoned");
            !std::mem::replace(&mut s.refreshing, true)
        };
        if start {
            tokio::spawn(refresh_while_scraped(server.clone(), refresh));
        }
    }
    Ok(got)
}

/// Renders the aggregates every `every` until no scrape came for [`KEEP`].
async fn refresh_while_scraped(server: Server, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let idle = {
            let s = server.metrics.0.lock().expect("not poisoned");
            s.last_scrape.is_none_or(|t| t.elapsed() > KEEP)
        };
        if idle {
            server.metrics.0.lock().expect("not poisoned").refreshing = false;
            return;
        }
        match render(&server).await {
            Ok(text) => {
                server.metrics.0.lock().expect("not poisoned").text = Some((Instant::now(), text));
            }
            Err(e) => tracing::warn!(error = %e.message, "refreshing /metrics"),
        }
    }
}

/// `GET /metrics`, for the metrics token (`DATA/metrics.token`, or an admin token). Its
/// queries run on the read connections, beside the writer, not on it.
pub async fn metrics(
    State(server): State<Server>,
    headers: axum::http::HeaderMap,
) -> ApiResult<impl IntoResponse> {
    crate::auth::metrics(&server, &headers).await?;
    let now = Instant::now();
    let (at, mut text) = aggregates(&server, now).await?;
    let _ = writeln!(
        text,
        "# HELP abide_checkins_total Check-ins this server process answered.\n# TYPE abide_checkins_total counter\nabide_checkins_total {}",
        server.counters.checkins.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        text,
        "# HELP abide_metrics_age_seconds How long ago the values read from the database were read.\n# TYPE abide_metrics_age_seconds gauge\nabide_metrics_age_seconds {:.3}",
        now.saturating_duration_since(at).as_secs_f64()
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
