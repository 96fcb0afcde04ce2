//! `xtask bench-fleet`: the fleet server under load.
//!
//! 1. Check-ins per second: `abide server` (the release binary, its own process) on SQLite and
//!    on PostgreSQL, 10,000 enrolled devices, 64 concurrent clients checking in as fast as the
//!    server answers — side by side with the same clients calling the server's no-op endpoint
//!    (`/api/v1/health`) in the same run. Check-ins verify the device credential, look up the
//!    device's assignment, sign the answer, and record last-seen (written durably, coalesced).
//! 2. A 100,000-device rollout through all its stages (in-process, SQLite and PostgreSQL): the
//!    devices are written to the database in bulk, the rollout is created through the API, and
//!    each stage's devices are marked committed in bulk before the stage is decided; the time
//!    of each decision and the process's peak memory are printed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tower::ServiceExt as _;

struct Opts {
    devices: usize,
    seconds: f64,
    rollout: usize,
    clients: usize,
    /// `checkins`, `rollout`, or both when empty.
    only: String,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        devices: 10_000,
        seconds: 10.0,
        rollout: 100_000,
        clients: 64,
        only: String::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("each option takes a value")?;
        match a.as_str() {
            "--devices" => o.devices = v.parse().with_context(|| format!("{a} {v:?}"))?,
            "--seconds" => o.seconds = v.parse().with_context(|| format!("{a} {v:?}"))?,
            "--rollout" => o.rollout = v.parse().with_context(|| format!("{a} {v:?}"))?,
            "--clients" => o.clients = v.parse().with_context(|| format!("{a} {v:?}"))?,
            "--only" if matches!(v.as_str(), "checkins" | "rollout") => o.only = v.clone(),
            _ => bail!(
                "usage: xtask bench-fleet [--devices N] [--seconds S] [--rollout N] [--clients N] [--only checkins|rollout]"
            ),
        }
    }
    Ok(o)
}

pub(crate) fn peak_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// An `abide server` process, killed when dropped.
pub(crate) struct ServerProcess(pub(crate) Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `abide` (the release binary) as a server on `data` (and database `db`) on a free
/// loopback port, with limits for a load generator whose devices all come from one address;
/// returns it and its URL once it answers.
pub(crate) async fn start_server(
    abide: &Path,
    data: &Path,
    db: Option<&str>,
    http: &reqwest::Client,
) -> Result<(ServerProcess, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = Command::new(abide);
    cmd.args(["server", "--data"])
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--enroll-rate",
            "10000000",
            "--max-connections-per-address",
            "100000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(db) = db {
        cmd.args(["--db", db]);
    }
    let server = ServerProcess(cmd.spawn()?);
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while http
        .get(format!("{base}/api/v1/health"))
        .send()
        .await
        .is_err()
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, base))
}

pub(crate) fn trust(dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("trust.json"),
        abide_testkit::trust(&[0], 1).to_file_bytes()?,
    )?;
    Ok(())
}

/// Runs `work` from `clients` tasks for `seconds`; returns completed calls per second.
async fn rate<F, Fut>(clients: usize, seconds: f64, work: F) -> (f64, u64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let work = Arc::new(work);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (work, done, failed) = (work.clone(), done.clone(), failed.clone());
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                if work(c, i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let n = done.load(Ordering::Relaxed);
    (
        n as f64 / started.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

async fn checkins(o: &Opts, db: &str) -> Result<()> {
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    let dir = tempfile::tempdir()?;
    trust(dir.path())?;
    let pg = (db == "postgres").then(abide_testkit::pg::Postgres::start);
    abide_client::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let (server, base) = start_server(
        &abide,
        dir.path(),
        pg.as_ref().map(abide_testkit::pg::Postgres::url).as_deref(),
        &http,
    )
    .await?;
    let pid = server.0.id().to_string();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let admin = abide_client::AdminClient::new(&base, &token);
    let t: abide_fleet_json::EnrollToken = admin
        .post(
            "/api/v1/enroll-tokens",
            &abide_fleet_json::EnrollTokenRequest {
                group: "bench".into(),
                uses: Some(o.devices as u64),
                ..Default::default()
            },
        )
        .await?;
    let enroll = t.token;
    let enrolled = Instant::now();
    let mut devices = Vec::with_capacity(o.devices);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < o.devices || !pending.is_empty() {
        while next < o.devices && pending.len() < 64 {
            let (http, base, enroll) = (http.clone(), base.clone(), enroll.clone());
            pending.spawn(async move {
                abide_client::DeviceClient::enroll(
                    &http,
                    &base,
                    &enroll,
                    &format!("d-{next}"),
                    "acme-gateway",
                    &["acme-gw".to_owned()],
                )
                .await
            });
            next += 1;
        }
        if let Some(d) = pending.join_next().await {
            devices.push(d??);
        }
    }
    let enrol_secs = enrolled.elapsed().as_secs_f64();
    let devices = Arc::new(devices);
    let n = devices.len() as u64;
    let clients = o.clients as u64;
    // Warm up, then measure both endpoints in the same run.
    let d = devices.clone();
    rate(o.clients, 1.0, move |c, i| {
        let d = d.clone();
        async move {
            d[((c as u64 + i * clients) % n) as usize]
                .checkin(idle_inventory(), jiff::Timestamp::now())
                .await
                .is_ok()
        }
    })
    .await;
    let d = devices.clone();
    let (checkin_rate, checkin_failed) = rate(o.clients, o.seconds, move |c, i| {
        let d = d.clone();
        async move {
            d[((c as u64 + i * clients) % n) as usize]
                .checkin(idle_inventory(), jiff::Timestamp::now())
                .await
                .is_ok()
        }
    })
    .await;
    let url = format!("{base}/api/v1/health");
    let (noop_rate, noop_failed) = rate(o.clients, o.seconds, move |_, _| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            match http.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    // Last-seen is durable: every device's last check-in time is in the database.
    let listed: Vec<abide_fleet_json::DeviceView> = admin.get("/api/v1/devices").await?;
    let seen = listed.iter().filter(|d| d.last_seen.is_some()).count();
    println!(
        "{db:<10} {:>7} devices (enrolled in {enrol_secs:.1} s)  check-in {checkin_rate:>8.0}/s ({checkin_failed} failed)  no-op {noop_rate:>8.0}/s ({noop_failed} failed)  ratio {:.2}  devices with last-seen {seen}  server peak RSS {:.1} MiB",
        devices.len(),
        checkin_rate / noop_rate,
        peak_rss_kib(&pid) as f64 / 1024.0
    );
    drop(server);
    drop(pg);
    Ok(())
}

async fn rollout(o: &Opts, db: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    trust(dir.path())?;
    let pg = (db == "postgres").then(abide_testkit::pg::Postgres::start);
    let mut config = abide_server::Config::new(dir.path());
    config.db = pg.as_ref().map(abide_testkit::pg::Postgres::url);
    let (server, _) = abide_server::Server::start(config).await?;
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?
        .trim()
        .to_owned();
    let call = |method: &str, path: &str, body: Vec<u8>| {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {admin}"))
            .body(axum::body::Body::from(body))
            .expect("a request");
        abide_server::app(server.clone()).oneshot(req)
    };
    let bundle = abide_testkit::Fixture::default().build(&[&abide_testkit::key(0)]);
    let up = call("POST", "/api/v1/releases", bundle).await?;
    let body = axum::body::to_bytes(up.into_body(), 1 << 20).await?;
    let rel: serde_json::Value = serde_json::from_slice(&body)?;
    let rel = rel["id"].as_str().context("release id")?.to_owned();
    // The devices, in bulk (enrolling 100,000 through the API is not what is measured here).
    let inserted = Instant::now();
    let mut tx = server.db.pool.begin().await?;
    for chunk in (0..o.rollout).collect::<Vec<_>>().chunks(500) {
        let mut sql = String::from(
            "INSERT INTO devices (id, credential_hash, product, compatible, grp, tags, version, state, last_seq, enrolled_at) VALUES ",
        );
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("('r-{i}', 'x', 'acme-gateway', '[\"acme-gw\"]', 'fleet', '[]', '1.0.0', 'idle', 0, 0)"))
            .collect();
        sql.push_str(&values.join(", "));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let insert_secs = inserted.elapsed().as_secs_f64();
    let created = Instant::now();
    let resp = call(
        "POST",
        "/api/v1/rollouts",
        serde_json::json!({"release": rel, "stages": "1:0s,10:0s,50:0s,100", "failure_threshold": "5%"})
            .to_string()
            .into_bytes(),
    )
    .await?;
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20).await?;
    let ro: serde_json::Value = serde_json::from_slice(&body)?;
    let id = ro["id"].as_str().context("rollout id")?.to_owned();
    let create_secs = created.elapsed().as_secs_f64();
    let mut decisions = Vec::new();
    for percent in [1u8, 10, 50, 100] {
        let last = (i128::from(abide_core::rollout::cutoff(percent)) - 1) as i64;
        sqlx::query("UPDATE rollout_devices SET state = 'committed' WHERE rollout_id = $1 AND place <= $2 AND state = 'pending'")
            .bind(&id)
            .bind(last)
            .execute(&server.db.pool)
            .await?;
        let d = abide_server::rollouts::tick(&server, abide_server::clock::now_ms()).await?;
        let d = d.first().context("a decision")?;
        decisions.push(format!(
            "{percent}% {} in {:.0} ms",
            d.what,
            d.seconds * 1000.0
        ));
    }
    let status = abide_server::rollouts::status_of(&server, &id).await?;
    // `/metrics` over the whole fleet: each device reported staged, rebooting and committed
    // (with durations), in bulk as above; then scrapes through the router, timed.
    let mut tx = server.db.pool.begin().await?;
    for chunk in (0..o.rollout).collect::<Vec<_>>().chunks(300) {
        let mut sql = String::from(
            "INSERT INTO reports (device_id, seq, status, release_id, rollout_id, millis, at) VALUES ",
        );
        let values: Vec<String> = chunk
            .iter()
            .flat_map(|i| {
                let (rel, id) = (&rel, &id);
                ["staged", "rebooting", "committed"]
                    .iter()
                    .enumerate()
                    .map(move |(k, s)| {
                        format!(
                            "('r-{i}', {}, '{s}', '{rel}', '{id}', {}, 0)",
                            k + 1,
                            (i * 37 + k * 1000) % 600_000
                        )
                    })
            })
            .collect();
        sql.push_str(&values.join(", "));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    // The first scrape reads the aggregates; the next ones are served the latest reading
    // while the background refresh re-reads it (timed on its own: `render`).
    let mut scrapes = Vec::new();
    let mut size = 0;
    for _ in 0..101 {
        let t = Instant::now();
        let resp = call("GET", "/metrics", Vec::new()).await?;
        anyhow::ensure!(resp.status().is_success(), "/metrics: {}", resp.status());
        size = axum::body::to_bytes(resp.into_body(), 16 << 20)
            .await?
            .len();
        scrapes.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let first = scrapes.remove(0);
    scrapes.sort_by(f64::total_cmp);
    let mut renders = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        abide_server::metrics::render(&server)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        renders.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    renders.sort_by(f64::total_cmp);
    println!(
        "{db:<10} /metrics over {} devices and {} reports: a scrape {:.2} ms median, {:.2} ms max (100 scrapes, {size} bytes); the first scrape and each background refresh (every 10 s while scraped) read the aggregates in {first:.0} ms / {:.0} ms median",
        o.rollout,
        3 * o.rollout,
        scrapes[scrapes.len() / 2],
        scrapes[scrapes.len() - 1],
        renders[renders.len() / 2]
    );
    println!(
        "{db:<10} {} devices (written in {insert_secs:.1} s), rollout created in {create_secs:.2} s; decisions: {}; final status {} with {} committed; peak RSS {:.1} MiB",
        o.rollout,
        decisions.join(", "),
        status.status,
        status.committed,
        peak_rss_kib("self") as f64 / 1024.0
    );
    drop(pg);
    Ok(())
}

/// `xtask bench-fleet`.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if o.only != "rollout" {
            println!(
                "check-ins: {} devices, {} clients, {} s per endpoint; the server is target/release/abide on this machine's 2 cores, shared with the clients",
                o.devices, o.clients, o.seconds
            );
            for db in ["sqlite", "postgres"] {
                checkins(&o, db).await?;
            }
        }
        if o.only != "checkins" {
            println!("rollout: {} devices through stages 1%, 10%, 50%, 100%", o.rollout);
            for db in ["sqlite", "postgres"] {
                rollout(&o, db).await?;
            }
        }
        Ok(())
    })
}

/// What an idle device at 1.0.0 on group A sends.
fn idle_inventory() -> abide_fleet_json::CheckinRequest {
    abide_fleet_json::CheckinRequest {
        nonce: String::new(),
        version: "1.0.0".into(),
        booted: Some("A".into()),
        good: Some("A".into()),
        state: abide_fleet_json::DeviceState::Idle,
        health: Some(abide_fleet_json::Health::Healthy),
        trust_version: None,
        progress: None,
        audit_head: None,
        apps: Vec::new(),
        agent: None,
    }
}
