//! The fleet simulator: many virtual devices in one process that enrol, check in, verify
//! their signed assignments, take reboot leases, and report the whole lifecycle of an update
//! (downloading, staged, rebooting, trial, then committed, or rolled back with probability
//! `fail_rate`). It needs no slots: the bundle is probed with a range request, not installed.
//! It is both the load generator of the benchmarks and the driver of the rollout tests; its
//! ledger of reports is what tests compare with the server's database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use abide_proto::ReportRequest;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::{ClientError, Device};

/// How to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server, `http://host:port`.
    pub server: String,
    /// The enrolment token.
    pub enroll_token: String,
    /// How many devices.
    pub devices: usize,
    /// Their product.
    pub product: String,
    /// Their hardware id.
    pub compatible: String,
    /// The version they start at.
    pub version: String,
    /// The probability that an update fails its trial and rolls back, 0 to 1.
    pub fail_rate: f64,
    /// Seconds between a device's check-ins (0: as fast as the server answers).
    pub poll: f64,
    /// How long to run.
    pub duration: Duration,
    /// Device ids are `PREFIX-N`.
    pub prefix: String,
    /// Stop early once every device has run `stop_at_version` (committed it) or rolled it back.
    pub stop_at_version: Option<String>,
}

/// One report as sent and what the server said.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The device.
    pub device: String,
    /// Its sequence number.
    pub seq: u64,
    /// The status.
    pub status: String,
    /// The release.
    pub release: Option<String>,
    /// `recorded` or `duplicate`.
    pub outcome: String,
}

/// What a run did.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Devices enrolled.
    pub enrolled: u64,
    /// Check-ins answered and verified.
    pub checkins: u64,
    /// Check-ins per second over the run.
    pub checkins_per_second: f64,
    /// Reports recorded.
    pub reports: u64,
    /// Updates committed.
    pub committed: u64,
    /// Updates rolled back.
    pub rolled_back: u64,
    /// Lease requests the server refused (retried later).
    pub lease_refusals: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first few failures.
    pub error_samples: Vec<String>,
    /// Seconds the run took.
    pub seconds: f64,
    /// Every report, in the order sent per device.
    pub ledger: Vec<Entry>,
}

#[derive(Default)]
struct Tally {
    checkins: AtomicU64,
    reports: AtomicU64,
    committed: AtomicU64,
    rolled_back: AtomicU64,
    lease_refusals: AtomicU64,
    errors: AtomicU64,
    samples: Mutex<Vec<String>>,
    ledger: Mutex<Vec<Entry>>,
    finished: AtomicU64,
}

impl Tally {
    async fn error(&self, e: &ClientError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().await;
        if s.len() < 10 {
            s.push(e.to_string());
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Sim {
    device: Device,
    version: String,
    seq: u64,
    state: &'static str,
    rng: Rng,
    refused: Vec<String>,
}

impl Sim {
    async fn report(
        &mut self,
        tally: &Tally,
        status: &str,
        a: &abide_proto::AssignedRelease,
        reason: Option<&str>,
        seconds: Option<f64>,
    ) -> Result<(), ClientError> {
        self.seq += 1;
        let r = ReportRequest {
            seq: self.seq,
            status: status.into(),
            release_id: Some(a.release_id.clone()),
            rollout_id: Some(a.rollout_id.clone()),
            reason: reason.map(str::to_owned),
            seconds,
        };
        // A report the server did not acknowledge is sent again with the same sequence
        // number (the server records it once), so none is lost when the server restarts.
        let mut attempt = 0;
        let recorded = loop {
            match self.device.report(&r).await {
                Ok(recorded) => break recorded,
                Err(ClientError::Http { .. }) if attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        tally.reports.fetch_add(1, Ordering::Relaxed);
        tally.ledger.lock().await.push(Entry {
            device: self.device.id.clone(),
            seq: self.seq,
            status: status.into(),
            release: Some(a.release_id.clone()),
            outcome: if recorded { "recorded" } else { "duplicate" }.into(),
        });
        Ok(())
    }

    /// One poll: check in, and if there is something to do, do all of it.
    async fn step(&mut self, tally: &Tally, fail_rate: f64) -> Result<(), ClientError> {
        let a = self
            .device
            .checkin(
                abide_proto::CheckinRequest {
                    nonce: String::new(),
                    version: self.version.clone(),
                    booted: None,
                    good: None,
                    state: self.state.into(),
                    health: Some("healthy".into()),
                    trust_version: None,
                    progress: None,
                },
                jiff::Timestamp::now(),
            )
            .await?;
        tally.checkins.fetch_add(1, Ordering::Relaxed);
        let Some(r) = a.release else { return Ok(()) };
        if r.action == "rollback" {
            if self.state == "trial" {
                self.report(tally, "rolled_back", &r, Some("fleet-wide rollback"), None)
                    .await?;
                self.state = "rolled_back";
            }
            return Ok(());
        }
        if r.version == self.version || self.refused.contains(&r.release_id) {
            return Ok(());
        }
        let started = Instant::now();
        self.report(tally, "downloading", &r, None, None).await?;
        self.device.fetch(&r.url, 0, r.size.min(64)).await?;
        self.report(
            tally,
            "staged",
            &r,
            None,
            Some(started.elapsed().as_secs_f64()),
        )
        .await?;
        if !self.device.lease().await? {
            tally.lease_refusals.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.report(tally, "rebooting", &r, None, Some(0.0)).await?;
        self.report(tally, "trial", &r, None, None).await?;
        if self.rng.next() < fail_rate {
            self.report(
                tally,
                "rolled_back",
                &r,
                Some("simulated: health check failed in the trial"),
                None,
            )
            .await?;
            self.refused.push(r.release_id.clone());
            self.state = "rolled_back";
            tally.rolled_back.fetch_add(1, Ordering::Relaxed);
        } else {
            self.report(
                tally,
                "committed",
                &r,
                None,
                Some(started.elapsed().as_secs_f64()),
            )
            .await?;
            self.version = r.version.clone();
            self.state = "committed";
            tally.committed.fetch_add(1, Ordering::Relaxed);
        }
        self.device.release_lease().await
    }

    fn done(&self, target: &Option<String>) -> bool {
        target
            .as_ref()
            .is_some_and(|v| &self.version == v || self.state == "rolled_back")
    }
}

/// Runs the simulation until `duration` has passed (or every device reached
/// `stop_at_version`).
pub async fn run(opts: Options) -> Result<Summary, ClientError> {
    crate::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|error| crate::http("building the HTTP client", &error))?;
    let tally = Arc::new(Tally::default());
    // Enrol with bounded concurrency.
    let mut sims = Vec::with_capacity(opts.devices);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0usize;
    while next < opts.devices || !pending.is_empty() {
        while next < opts.devices && pending.len() < 32 {
            let (http, o, i) = (http.clone(), opts.clone(), next);
            pending.spawn(async move {
                Device::enroll(
                    &http,
                    &o.server,
                    &o.enroll_token,
                    &format!("{}-{i}", o.prefix),
                    &o.product,
                    std::slice::from_ref(&o.compatible),
                )
                .await
            });
            next += 1;
        }
        if let Some(done) = pending.join_next().await {
            let device = done.expect("enrolment task does not panic")?;
            let mut seed = [0u8; 8];
            getrandom::fill(&mut seed).expect("the system's random source works");
            sims.push(Sim {
                device,
                version: opts.version.clone(),
                seq: 0,
                state: "idle",
                rng: Rng(u64::from_le_bytes(seed)),
                refused: Vec::new(),
            });
        }
    }
    let enrolled = sims.len() as u64;
    let run_started = Instant::now();
    let deadline = run_started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let n = sims.len().max(1);
    for (i, mut sim) in sims.into_iter().enumerate() {
        let tally = Arc::clone(&tally);
        let o = opts.clone();
        tasks.spawn(async move {
            // Spread the first check-ins over one poll interval.
            let offset = Duration::from_secs_f64(o.poll * i as f64 / n as f64);
            tokio::time::sleep(offset).await;
            let mut finished = false;
            while Instant::now() < deadline {
                let t = Instant::now();
                if let Err(e) = sim.step(&tally, o.fail_rate).await {
                    tally.error(&e).await;
                }
                if !finished && sim.done(&o.stop_at_version) {
                    finished = true;
                    tally.finished.fetch_add(1, Ordering::Relaxed);
                }
                if o.stop_at_version.is_some()
                    && tally.finished.load(Ordering::Relaxed) as usize == n
                {
                    break;
                }
                let wait = Duration::from_secs_f64(o.poll).saturating_sub(t.elapsed());
                if !wait.is_zero() {
                    tokio::time::sleep(
                        wait.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let seconds = run_started.elapsed().as_secs_f64();
    let checkins = tally.checkins.load(Ordering::Relaxed);
    let mut ledger = std::mem::take(&mut *tally.ledger.lock().await);
    ledger.sort_by(|a, b| (a.device.as_str(), a.seq).cmp(&(b.device.as_str(), b.seq)));
    Ok(Summary {
        enrolled,
        checkins,
        checkins_per_second: checkins as f64 / seconds.max(1e-9),
        reports: tally.reports.load(Ordering::Relaxed),
        committed: tally.committed.load(Ordering::Relaxed),
        rolled_back: tally.rolled_back.load(Ordering::Relaxed),
        lease_refusals: tally.lease_refusals.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        error_samples: tally.samples.lock().await.clone(),
        seconds,
        ledger,
    })
}
