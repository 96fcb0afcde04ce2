//! The fleet simulator, a load generator with synthetic outcomes: many virtual devices in one
//! process that enrol, check in, verify their signed assignments, take reboot leases, and
//! report the whole lifecycle of an update. Each is an executor of the same machine as the real
//! agent (`abide_core::agent::next`), with the same transaction engine and the same report
//! ledger (`abide_core::fleet::Ledger`), but installs nothing: the bundle is probed with one
//! range request, and a trial commits or rolls back by a random draw (`fail_rate`). Real devices, simulated or not, are `abide sim run`. Its ledger of
//! reports is what tests compare with the server's database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use abide_core::agent::{self, Answer, Apps, Command, Situation, Windows};
use abide_core::fleet::{self, Ledger, Offer, WindowState};
use abide_core::{
    Action, BootPolicy, BootReport, FailReason, Group, Quarantine, RollbackReason, Transaction,
    TxState, Verdict,
};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::{ClientError, DeviceClient};

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
    /// DeviceClient ids are `PREFIX-N`.
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
    /// Every report, in the order sent per device (not in the summary's JSON: `abide fleet
    /// simulate --ledger FILE` writes it to its own file).
    #[serde(skip)]
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
    device: DeviceClient,
    /// The committed version.
    version: semver::Version,
    /// The current or last transaction, driven through the engine's own transitions.
    tx: Option<Transaction>,
    quarantine: Quarantine,
    /// The known-good group, A or B.
    good: Group,
    /// The release assigned, the lease and the reports not yet acknowledged, kept as a real
    /// device keeps them.
    ledger: Ledger,
    /// Transactions begun, for their ids.
    begun: u64,
    rng: Rng,
}

impl Sim {
    /// Sends the reports not yet acknowledged, in order. One the server did not acknowledge
    /// is sent again with the same sequence number (the server records it once), so none is
    /// lost when the server restarts or is too busy: a few quick retries, then it stays
    /// queued for the next poll.
    async fn flush(&mut self, tally: &Tally) -> Result<(), ClientError> {
        while let Some(r) = self.ledger.outbox.first().cloned() {
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
            self.ledger.outbox.remove(0);
            tally.reports.fetch_add(1, Ordering::Relaxed);
            tally.ledger.lock().await.push(Entry {
                device: self.device.id.clone(),
                seq: r.seq,
                status: r.status.as_str().to_owned(),
                release: r.release_id.clone(),
                outcome: if recorded { "recorded" } else { "duplicate" }.into(),
            });
        }
        Ok(())
    }

    fn target(&self) -> Group {
        Group::new(if self.good.as_str() == "A" { "B" } else { "A" }).expect("valid")
    }

    /// One poll: the reports still queued, then the commands `abide_core::agent::next` gives,
    /// one after another, until it says to wait. A reboot ends the round (the next one checks
    /// in again, as a real device does after it restarts).
    async fn step(&mut self, tally: &Tally, fail_rate: f64) -> Result<(), ClientError> {
        self.flush(tally).await?;
        let mut answer: Option<(abide_fleet_json::Assignment, Option<Offer>)> = None;
        for _ in 0..16 {
            let now = jiff::Timestamp::now();
            let command = agent::next(&Situation {
                now,
                trial: None,
                apps: Apps::Settled,
                running: &self.version,
                transaction: self.tx.as_ref(),
                schedules: &[],
                app_transaction: None,
                windows: Windows::None,
                fleet: match &answer {
                    None => agent::Fleet::Unknown,
                    Some((_, offer)) => agent::Fleet::Answered(Answer {
                        offer: offer.as_ref(),
                        group_window: WindowState::Open,
                        quarantined: offer
                            .as_ref()
                            .is_some_and(|o| self.quarantine.get(&o.version).is_some()),
                        lease: self.ledger.lease(),
                        // A simulated device has no applications and does not replace its
                        // agent: such releases do not target it.
                        part: None,
                    }),
                },
            });
            let engine = |e: abide_core::Error| ClientError::BadAssignment(e.to_string());
            match command {
                Command::CheckIn => {
                    let a = self
                        .device
                        .checkin(
                            abide_fleet_json::CheckinRequest {
                                nonce: String::new(),
                                version: self.version.to_string(),
                                booted: Some(self.good.to_string()),
                                good: Some(self.good.to_string()),
                                state: fleet::device_state(self.tx.as_ref()),
                                health: Some(abide_fleet_json::Health::Healthy),
                                trust_version: None,
                                progress: None,
                                audit_head: None,
                                apps: Vec::new(),
                                agent: None,
                            },
                            now,
                        )
                        .await?;
                    tally.checkins.fetch_add(1, Ordering::Relaxed);
                    let offer = Offer::of(&a);
                    answer = Some((a, offer));
                }
                Command::Stage => {
                    let (a, offer) = answer.as_ref().expect("staging follows a check-in");
                    let (o, r) = (
                        offer.as_ref().expect("an offer"),
                        a.release.as_ref().expect("a release"),
                    );
                    self.ledger.stage(o);
                    self.begun += 1;
                    let id = format!("tx-sim-{}-{}", self.begun, o.version);
                    let (tx, _) = Transaction::begin(
                        &id,
                        o.version.clone(),
                        r.security_version,
                        self.good.clone(),
                        self.target(),
                        now,
                    )
                    .map_err(engine)?;
                    self.tx = Some(tx);
                    let _ = self.flush(tally).await;
                    let fetched = self.download(&r.url, r.size).await;
                    let tx = self.tx.as_mut().expect("begun");
                    let now = jiff::Timestamp::now();
                    match &fetched {
                        Ok(()) => tx.staged(now).map(drop),
                        Err(e) => tx
                            .fail(
                                now,
                                FailReason::Io {
                                    detail: e.to_string(),
                                },
                            )
                            .map(drop),
                    }
                    .map_err(engine)?;
                    self.ledger.note(self.tx.as_ref());
                    self.flush(tally).await?;
                    fetched?;
                }
                Command::Abandon(reason) => {
                    let tx = self.tx.as_mut().expect("a transaction");
                    tx.fail(now, reason).map_err(engine)?;
                    self.ledger.note(self.tx.as_ref());
                    self.flush(tally).await?;
                }
                Command::AskLease => {
                    if !self.device.lease().await? {
                        tally.lease_refusals.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    self.ledger.lease = true;
                }
                Command::ReleaseLease => {
                    self.device.release_lease().await?;
                    self.ledger.lease = false;
                }
                Command::Activate(_) => {
                    let tx = self.tx.as_mut().expect("staged");
                    tx.activate(now, BootPolicy::default()).map_err(engine)?;
                    self.ledger.note(self.tx.as_ref());
                    let _ = self.flush(tally).await;
                    self.reboot(tally, fail_rate);
                    answer = None;
                    self.flush(tally).await?;
                }
                Command::RollBack => {
                    let tx = self.tx.as_mut().expect("on trial");
                    let actions = tx.rollback(now, "fleet-wide rollback").map_err(engine)?;
                    self.apply(&actions, now);
                    tally.rolled_back.fetch_add(1, Ordering::Relaxed);
                    self.ledger.note(self.tx.as_ref());
                    answer = None;
                    self.flush(tally).await?;
                }
                // A simulated device has no schedules, applications or agent trial.
                Command::Wait(_)
                | Command::FailTrial
                | Command::SettleTrial
                | Command::RecoverApps
                | Command::Follow
                | Command::Start(_) => break,
            }
        }
        Ok(())
    }

    /// The simulated download of the transaction's bundle: one range request proves it is
    /// served. Like the agent's download, it is retried with back-off before it fails (and the
    /// transaction with it).
    async fn download(&mut self, url: &str, size: u64) -> Result<(), ClientError> {
        let mut attempt = 0u32;
        while let Err(e) = self.device.fetch(url, 0, size.min(64)).await {
            attempt += 1;
            if attempt >= 20 {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
        Ok(())
    }

    /// The simulated reboot into an activated target and its trial: the target boots (the boot
    /// step's report), the gate decides by a random draw (`fail_rate`), and the outcome is
    /// reported.
    fn reboot(&mut self, tally: &Tally, fail_rate: f64) {
        let now = jiff::Timestamp::now();
        let policy = BootPolicy::default();
        let Some(tx) = self.tx.as_mut() else { return };
        let booted = BootReport {
            booted: tx.target.clone(),
            target_bootable: true,
        };
        // The boot step's health gate decides before the agent runs again: as on a real
        // device, the next report is the trial's outcome.
        if tx.booted(now, &booted, policy).is_err() {
            return;
        }
        let verdict = if self.rng.next() < fail_rate {
            Verdict::RollBack(RollbackReason::HealthCheck {
                check: "simulated".into(),
                detail: "synthetic failure drawn by the simulator".into(),
            })
        } else {
            Verdict::Commit
        };
        let tx = self.tx.as_mut().expect("on trial");
        let Ok(actions) = tx.health(now, verdict) else {
            return;
        };
        self.apply(&actions, now);
        if matches!(
            self.tx.as_ref().map(|t| &t.state),
            Some(TxState::Committed { .. })
        ) {
            tally.committed.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.rolled_back.fetch_add(1, Ordering::Relaxed);
        }
        self.ledger.note(self.tx.as_ref());
    }

    /// The engine's actions on the simulated device: a commit moves the good group and the
    /// version, a rollback quarantines.
    fn apply(&mut self, actions: &[Action], now: jiff::Timestamp) {
        for a in actions {
            match a {
                Action::MarkGood { group } => {
                    self.good = group.clone();
                    if let Some(tx) = &self.tx {
                        self.version = tx.version.clone();
                    }
                }
                Action::Quarantine { version, reason } => self.quarantine.add(version, reason, now),
                _ => {}
            }
        }
    }

    fn done(&self, target: &Option<String>) -> bool {
        target.as_ref().is_some_and(|v| {
            self.version.to_string() == *v
                || self.tx.as_ref().is_some_and(|t| {
                    t.version.to_string() == *v && matches!(t.state, TxState::RolledBack { .. })
                })
        })
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
                DeviceClient::enroll(
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
                version: opts.version.parse().map_err(|e| {
                    ClientError::BadAssignment(format!("--version {}: {e}", opts.version))
                })?,
                tx: None,
                quarantine: Quarantine::default(),
                good: Group::new("A").expect("valid"),
                ledger: Ledger::new(),
                begun: 0,
                rng: Rng(u64::from_le_bytes(seed)),
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
