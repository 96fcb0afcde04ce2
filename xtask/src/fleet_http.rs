//! `xtask bench-fleet-http`: a whole staged rollout to 100,000 simulated devices over HTTP.
//!
//! Two `abide server` processes (the release binary) share one PostgreSQL and one data
//! directory. The devices are multiplexed in this process (`abide_client::simulate`, the
//! load generator behind `abide fleet simulate`), half on each server: they enrol with one
//! token, check in, take reboot leases and report through the API as real agents do; their
//! trials commit or roll back by a random draw. Once all are enrolled, a rollout of 10 %
//! then the rest is created; the run ends when every device committed or rolled back.
//!
//! Checked, not only timed: every device's final state on the server is the last status the
//! simulator's ledger holds for it; the reports table holds exactly the ledger's reports (none
//! lost, none doubled); each stage was decided once. Printed: wall time, check-ins per second,
//! each server's peak RSS, and the database's size.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::fleet::{ServerProcess, peak_rss_kib, start_server};

struct Opts {
    devices: usize,
    poll: f64,
    fail_rate: f64,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        devices: 100_000,
        poll: 20.0,
        fail_rate: 0.002,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().context("each option takes a value")?;
        match a.as_str() {
            "--devices" => o.devices = v.parse().with_context(|| format!("{a} {v:?}"))?,
            "--poll" => o.poll = abide_core::duration::parse(v)?.as_secs_f64(),
            "--fail-rate" => o.fail_rate = v.parse().with_context(|| format!("{a} {v:?}"))?,
            _ => bail!(
                "usage: xtask bench-fleet-http [--devices N] [--poll DURATION] [--fail-rate P]"
            ),
        }
    }
    ensure!(o.devices >= 20, "--devices: at least 20");
    Ok(o)
}

async fn run(o: Opts) -> Result<()> {
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    let dir = tempfile::tempdir()?;
    crate::fleet::trust(dir.path())?;
    let pg = abide_testkit::pg::Postgres::start();
    let url = pg.url();
    abide_client::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    // The first process writes the admin token and the signing key; the second shares them.
    let (s1, url1) = start_server(&abide, dir.path(), Some(&url), &http).await?;
    let (s2, url2) = start_server(&abide, dir.path(), Some(&url), &http).await?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let admin = abide_client::AdminClient::new(&url1, token.trim());
    let bundle = abide_testkit::Fixture::default().build(&[&abide_testkit::key(0)]);
    let release: serde_json::Value = admin.post_raw("/api/v1/releases", bundle).await?;
    let release = release["id"].as_str().context("release id")?.to_owned();
    let _: serde_json::Value = abide_client::AdminClient::new(&url2, token.trim())
        .put(
            "/api/v1/groups/fleet",
            &serde_json::json!({"max_unavailable": o.devices / 10}),
        )
        .await?;
    let t: abide_fleet_json::EnrollToken = admin
        .post(
            "/api/v1/enroll-tokens",
            &abide_fleet_json::EnrollTokenRequest {
                group: "fleet".into(),
                uses: Some(o.devices as u64),
                ..Default::default()
            },
        )
        .await?;
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&url).await?;
    let half = o.devices / 2;
    let sim = |server: &str, devices: usize, prefix: &str| abide_client::simulate::Options {
        server: server.to_owned(),
        enroll_token: t.token.clone(),
        devices,
        product: "acme-gateway".into(),
        compatible: "acme-gw".into(),
        version: "1.0.0".into(),
        fail_rate: o.fail_rate,
        poll: o.poll,
        duration: Duration::from_secs(3 * 3600),
        prefix: prefix.into(),
        stop_at_version: Some("1.4.0".into()),
    };
    println!(
        "{} simulated devices over HTTP, half on each of two abide server processes sharing one PostgreSQL 15; poll {} s, fail rate {}",
        o.devices, o.poll, o.fail_rate
    );
    let started = Instant::now();
    let one = tokio::spawn(abide_client::simulate::run(sim(&url1, half, "one")));
    let two = tokio::spawn(abide_client::simulate::run(sim(
        &url2,
        o.devices - half,
        "two",
    )));
    // The rollout once every device is enrolled (a rollout targets the devices it finds).
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
            .fetch_one(&db)
            .await?;
        if n as usize == o.devices {
            break;
        }
        ensure!(
            !one.is_finished() && !two.is_finished(),
            "a simulator stopped during enrolment"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let enrolled = started.elapsed().as_secs_f64();
    let rollout_started = Instant::now();
    let ro: serde_json::Value = admin
        .post(
            "/api/v1/rollouts",
            &serde_json::json!({"release": release, "stages": "10:0s,100", "group": "fleet",
                                "failure_threshold": "5%"}),
        )
        .await?;
    let rollout = ro["id"].as_str().context("rollout id")?.to_owned();
    let (a, b) = (one.await??, two.await??);
    let wall = rollout_started.elapsed().as_secs_f64();
    let mib = |s: &ServerProcess| peak_rss_kib(&s.0.id().to_string()) as f64 / 1024.0;
    let rss = (mib(&s1), mib(&s2));

    // The ledger against the server's records.
    let ledger: Vec<_> = a.ledger.iter().chain(&b.ledger).collect();
    let mut sent: BTreeMap<(String, u64), usize> = BTreeMap::new();
    let mut last: BTreeMap<&str, (u64, &str)> = BTreeMap::new();
    for e in &ledger {
        *sent.entry((e.device.clone(), e.seq)).or_default() += 1;
        let l = last.entry(e.device.as_str()).or_insert((0, ""));
        if e.seq >= l.0 {
            *l = (e.seq, e.status.as_str());
        }
    }
    let doubled = sent.values().filter(|n| **n > 1).count();
    let recorded: Vec<(String, i64)> = sqlx::query_as("SELECT device_id, seq FROM reports")
        .fetch_all(&db)
        .await?;
    let recorded: BTreeMap<(String, u64), ()> = recorded
        .into_iter()
        .map(|(d, s)| ((d, s as u64), ()))
        .collect();
    let lost = sent.keys().filter(|k| !recorded.contains_key(*k)).count();
    let unsent = recorded.keys().filter(|k| !sent.contains_key(*k)).count();
    let states: Vec<(String, String)> = sqlx::query_as("SELECT id, state FROM devices")
        .fetch_all(&db)
        .await?;
    let mismatched: Vec<String> = states
        .iter()
        .filter(|(id, state)| last.get(id.as_str()).map(|l| l.1) != Some(state.as_str()))
        .map(|(id, state)| format!("{id}: server {state}, ledger {:?}", last.get(id.as_str())))
        .collect();
    let decisions: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, details FROM audit WHERE action LIKE 'rollout.%' ORDER BY seq",
    )
    .fetch_all(&db)
    .await?;
    let mut per_stage: BTreeMap<String, usize> = BTreeMap::new();
    for (action, details) in &decisions {
        let d: serde_json::Value = serde_json::from_str(details)?;
        if d["rollout"] == rollout.as_str() || d["rollout_id"] == rollout.as_str() {
            *per_stage
                .entry(format!("{action}@{}", d["stage"]))
                .or_default() += 1;
        }
    }
    let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&db)
        .await?;
    let checkins = a.checkins + b.checkins;
    let (committed, rolled_back) = (a.committed + b.committed, a.rolled_back + b.rolled_back);
    println!(
        "enrolment {enrolled:.1} s ({:.0}/s); rollout to the last device {wall:.1} s; {checkins} check-ins ({:.0}/s over the rollout), {} reports; {committed} committed, {rolled_back} rolled back; errors {} (retried)",
        o.devices as f64 / enrolled,
        checkins as f64 / wall,
        ledger.len(),
        a.errors + b.errors
    );
    println!(
        "servers' peak RSS {:.1} MiB and {:.1} MiB; PostgreSQL database {:.1} MiB; the load generator (this process) peaked at {:.1} MiB",
        rss.0,
        rss.1,
        size as f64 / (1 << 20) as f64,
        peak_rss_kib(&std::process::id().to_string()) as f64 / 1024.0
    );
    println!("decisions: {per_stage:?}");
    let samples: Vec<&String> = a
        .error_samples
        .iter()
        .chain(&b.error_samples)
        .take(6)
        .collect();
    if !samples.is_empty() {
        println!("first errors (each retried): {samples:?}");
    }
    println!(
        "ledger vs server: {} reports sent, {} recorded; lost {lost}, doubled {doubled}, recorded but not acknowledged {unsent}; device states differing {}",
        sent.len(),
        recorded.len(),
        mismatched.len()
    );
    ensure!(
        lost == 0 && doubled == 0 && unsent == 0,
        "reports lost or doubled"
    );
    ensure!(
        mismatched.is_empty(),
        "device states differ: {:?}",
        &mismatched[..mismatched.len().min(5)]
    );
    ensure!(
        committed + rolled_back == o.devices as u64,
        "not every device finished"
    );
    ensure!(
        per_stage.values().all(|n| *n == 1) && per_stage.len() >= 2,
        "a stage was decided more than once, or not at all: {per_stage:?}"
    );
    drop((s1, s2, pg));
    Ok(())
}

/// `xtask bench-fleet-http`.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(o))
}
