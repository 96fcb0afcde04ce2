//! `/metrics` in the OpenMetrics text format, encoded by prometheus-client from one collector.
//! Everything but the check-in counter is read from the database, so any server process of a
//! fleet answers for the whole fleet; the check-in counter is this process's own (Prometheus
//! sums it over the processes).
//!
//! A scrape does not scan the fleet: the database's aggregates (which read every device and
//! report) are read at the first scrape, then refreshed in the background every
//! `metrics_refresh` (10 s) for as long as scrapes keep coming (five minutes after the last,
//! the refreshing stops); a scrape encodes the latest reading, and `abide_metrics_age_seconds`
//! says how old it is.
//!
//! Names: `abide_devices` (by state), `abide_checkins_total`, `abide_reports_total` (by
//! status), `abide_rollbacks_total`, `abide_rollout_devices` (by rollout and state),
//! `abide_rollout_success_ratio` (by rollout), and the histograms `abide_download_seconds`,
//! `abide_apply_seconds` and `abide_reboot_to_healthy_seconds`, from the durations devices
//! report with `staged`, `rebooting` and `committed`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::Server;
use crate::error::{ApiError, ApiResult};

/// Counters kept in the process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Check-ins answered.
    pub checkins: AtomicU64,
}

/// The aggregates as last read, shared by scrapes.
#[derive(Debug, Default)]
pub struct Snapshot(std::sync::Mutex<SnapshotState>);

#[derive(Debug, Default)]
struct SnapshotState {
    /// When the aggregates were read, and what they were.
    read: Option<(Instant, Arc<Aggregates>)>,
    /// The last scrape.
    last_scrape: Option<Instant>,
    /// Whether the background refresh runs.
    refreshing: bool,
}

/// How long after the last scrape the background refresh goes on.
const KEEP: Duration = Duration::from_secs(300);

/// The histograms' upper bounds, in seconds.
const BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// What `/metrics` reads from the database: the fleet's counts and the durations devices
/// reported.
#[derive(Debug, Default)]
pub struct Aggregates {
    devices: Vec<(String, i64)>,
    reports: Vec<(String, i64)>,
    rollbacks: i64,
    rollout_devices: Vec<(String, String, i64)>,
    success: Vec<(String, f64)>,
    histograms: Vec<Histogram>,
}

/// A histogram of the durations reported with one status.
#[derive(Debug)]
struct Histogram {
    name: &'static str,
    help: &'static str,
    /// (upper bound, observations in this bucket alone), the last bound +Inf (f64::MAX).
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

async fn histogram(
    server: &Server,
    name: &'static str,
    help: &'static str,
    status: &str,
) -> ApiResult<Histogram> {
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
    let count: i64 = row.try_get(BUCKETS.len())?;
    let sum: i64 = row.try_get(BUCKETS.len() + 1)?;
    // The database counts cumulatively; the encoder wants each bucket's own.
    let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
    let mut below = 0u64;
    for (i, b) in BUCKETS.iter().enumerate() {
        let cumulative = row.try_get::<Option<i64>, _>(i)?.unwrap_or(0).max(0) as u64;
        buckets.push((*b, cumulative.saturating_sub(below)));
        below = cumulative;
    }
    let count = count.max(0) as u64;
    // The encoder writes the bound f64::MAX as +Inf.
    buckets.push((f64::MAX, count.saturating_sub(below)));
    Ok(Histogram {
        name,
        help,
        buckets,
        count,
        sum: sum as f64 / 1000.0,
    })
}

/// Reads the aggregates from the database (every device and report: see the module
/// documentation for how often).
pub async fn render(server: &Server) -> ApiResult<Aggregates> {
    let devices = crate::devices::count_by_state_read(server).await?;
    let reports: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM reports GROUP BY status ORDER BY status")
            .fetch_all(&server.db.read)
            .await?;
    let rollbacks = reports
        .iter()
        .filter(|(status, _)| status == "rolled_back")
        .map(|(_, n)| *n)
        .sum();
    let rollout_devices: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT rollout_id, state, COUNT(*) FROM rollout_devices GROUP BY rollout_id, state ORDER BY rollout_id, state",
    )
    .fetch_all(&server.db.read)
    .await?;
    let mut ratio: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
    for (rollout, state, n) in &rollout_devices {
        let e = ratio.entry(rollout).or_default();
        if state == "committed" {
            e.0 += n;
        } else if crate::rollouts::FAILED.contains(&state.as_str()) {
            e.1 += n;
        }
    }
    let success = ratio
        .into_iter()
        .filter(|(_, (ok, failed))| ok + failed > 0)
        .map(|(r, (ok, failed))| (r.to_owned(), ok as f64 / (ok + failed) as f64))
        .collect();
    let histograms = vec![
        histogram(
            server,
            "abide_download_seconds",
            "Time from the start of a download to staged.",
            "staged",
        )
        .await?,
        histogram(
            server,
            "abide_apply_seconds",
            "Time to apply a staged update before its reboot.",
            "rebooting",
        )
        .await?,
        histogram(
            server,
            "abide_reboot_to_healthy_seconds",
            "Time from the update's start to a committed trial.",
            "committed",
        )
        .await?,
    ];
    Ok(Aggregates {
        devices: devices.into_iter().collect(),
        reports,
        rollbacks,
        rollout_devices,
        success,
        histograms,
    })
}

/// One scrape's metrics: the aggregates as read, with this process's check-ins and how old
/// the aggregates are.
#[derive(Debug)]
struct Scrape {
    aggregates: Arc<Aggregates>,
    checkins: u64,
    age: f64,
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let a = &self.aggregates;
        let mut m = e.encode_descriptor(
            "abide_devices",
            "Enrolled devices by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in &a.devices {
            m.encode_family(&[("state", state.as_str())])?
                .encode_gauge(n)?;
        }
        let mut m = e.encode_descriptor(
            "abide_checkins",
            "Check-ins this server process answered.",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&self.checkins, None)?;
        let mut m = e.encode_descriptor(
            "abide_reports",
            "Reports recorded, by status.",
            None,
            MetricType::Counter,
        )?;
        for (status, n) in &a.reports {
            m.encode_family(&[("status", status.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&(n.max(&0).unsigned_abs()), None)?;
        }
        e.encode_descriptor(
            "abide_rollbacks",
            "Updates devices rolled back.",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, u64>(&a.rollbacks.max(0).unsigned_abs(), None)?;
        let mut m = e.encode_descriptor(
            "abide_rollout_devices",
            "Devices of each rollout by state.",
            None,
            MetricType::Gauge,
        )?;
        for (rollout, state, n) in &a.rollout_devices {
            m.encode_family(&[("rollout", rollout.as_str()), ("state", state.as_str())])?
                .encode_gauge(n)?;
        }
        let mut m = e.encode_descriptor(
            "abide_rollout_success_ratio",
            "Committed devices over committed and failed ones, per rollout.",
            None,
            MetricType::Gauge,
        )?;
        for (rollout, ratio) in &a.success {
            m.encode_family(&[("rollout", rollout.as_str())])?
                .encode_gauge(ratio)?;
        }
        for h in &a.histograms {
            e.encode_descriptor(h.name, h.help, None, MetricType::Histogram)?
                .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
        }
        e.encode_descriptor(
            "abide_metrics_age_seconds",
            "How long ago the values read from the database were read.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&self.age)?;
        Ok(())
    }
}

/// The aggregates for a scrape at `now`: the latest reading while scrapes keep the
/// background refresh going, else read now. Returns them and when they were read.
async fn aggregates(server: &Server, now: Instant) -> ApiResult<(Instant, Arc<Aggregates>)> {
    let refresh = server.config.metrics_refresh;
    let kept = {
        let mut s = server.metrics.0.lock().expect("not poisoned");
        s.last_scrape = Some(now);
        s.read
            .clone()
            .filter(|(at, _)| !refresh.is_zero() && now.duration_since(*at) < KEEP)
    };
    let got = match kept {
        Some(kept) => kept,
        None => {
            let read = Arc::new(render(server).await?);
            let at = Instant::now();
            server.metrics.0.lock().expect("not poisoned").read = Some((at, read.clone()));
            (at, read)
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
            Ok(read) => {
                server.metrics.0.lock().expect("not poisoned").read =
                    Some((Instant::now(), Arc::new(read)));
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
    let (at, aggregates) = aggregates(&server, now).await?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        aggregates,
        checkins: server.counters.checkins.load(Ordering::Relaxed),
        age: now.saturating_duration_since(at).as_secs_f64(),
    }));
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| ApiError::internal("encoding the metrics", e))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}
