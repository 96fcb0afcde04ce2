//! `abide agent`: the device daemon, with or without a fleet server. It is the executor of
//! `abide_core::agent::next`: each round gathers the situation (the self-update trial, the
//! applications, the transaction, the schedules, the windows, the fleet's answer), asks for the
//! command, and carries it out, reading time from one clock. Network calls run on a Tokio
//! runtime; the install pipeline and every durable step run on the calling thread, as
//! `abide install` runs them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use abide_client::{ClientError, DeviceClient};
use abide_core::agent::{self, Answer, Apps, By, Command, Fleet, PartState, Situation};
use abide_core::fleet::{Offer, Part, WindowState};
use abide_core::{CheckOutcome, FailReason, Force, TxState};
use abide_fleet_json::{Assignment, CheckinRequest, Health};
use jiff::Timestamp;
use serde_json::json;

use crate::config::{Config, DeviceWindow, ServerSettings};
use crate::device::Device;
use crate::error::{AgentError, Result};
use crate::fleet::source::{HttpSource, Meter};
use crate::fleet::store::{Enrolment, FleetState};
use crate::health::{Clock, Running, SystemClock, run_each};
use crate::scheduled::Next;
use crate::shared::Shared;

/// How often an agent without a fleet server looks at its schedules (an API call wakes it at
/// once).
const LOCAL_INTERVAL: Duration = Duration::from_secs(5);

/// How the agent runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Stop as soon as there is nothing to do (instead of polling on).
    pub once: bool,
}

/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The device must restart now (after an activation or a fleet rollback); the reboot
    /// command has been run if the configuration has one.
    Reboot,
    /// Nothing to do (`--once`).
    Idle,
}

/// The agent of the device configured at `config_path`.
pub struct Agent {
    config_path: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    /// The fleet link, when system.toml has a `[server]`.
    fleet: Option<Link>,
    failures: u32,
    /// Whether the applications were looked after since the agent started (what a crash left
    /// behind is tidied once).
    apps_checked: bool,
}

/// The agent's link to its fleet server.
struct Link {
    server: ServerSettings,
    http: reqwest::Client,
    client: Option<DeviceClient>,
    /// The interval the server asked for at the last check-in.
    suggested: Option<Duration>,
}

impl Agent {
    /// Reads the configuration; the agent checks in with a fleet server when it has a
    /// `[server]` section, and carries out the device's own schedules in any case.
    pub fn new(config_path: &Path) -> Result<Agent> {
        Agent::with_clock(config_path, Arc::new(SystemClock))
    }

    /// [`Agent::new`] with the clock schedules and windows are read against (tests move it).
    pub fn with_clock(config_path: &Path, clock: Arc<dyn Clock + Send + Sync>) -> Result<Agent> {
        let config = Config::load(config_path)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|source| abide_fs::persist::IoError {
                op: "starting the network runtime for",
                path: config_path.to_owned(),
                source,
            })?;
        let fleet = match config.server.clone() {
            Some(server) => {
                let http = abide_client::tls::http_client(
                    &server.url,
                    server.ca_file.as_deref(),
                    server
                        .client_identity
                        .as_ref()
                        .map(|(c, k)| (c.as_path(), k.as_path())),
                )?;
                Some(Link {
                    server,
                    http,
                    client: None,
                    suggested: None,
                })
            }
            None => None,
        };
        abide_client::tls::install_crypto_provider();
        Ok(Agent {
            config_path: config_path.to_owned(),
            rt,
            shared: Shared::new(config, clock)?,
            fleet,
            failures: 0,
            apps_checked: false,
        })
    }

    /// What the agent shares with its API (tests drive schedules through it).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Starts the local API: the Unix socket, and TCP with mutual TLS if configured. Call
    /// once, before [`Agent::run`].
    pub fn serve(&self) -> Result<()> {
        let api = &self.shared.config.api;
        let service = Arc::new(crate::api::service::Service::new(self.shared.clone()));
        let metrics: abide_agent_api::transport::MetricsText = {
            let shared = self.shared.clone();
            Arc::new(move || crate::metrics::render(&shared))
        };
        let _guard = self.rt.enter();
        let setting = |e: abide_agent_api::ApiError| AgentError::Config {
            path: self.config_path.clone(),
            what: format!("[api]: {e}"),
        };
        let files = raise_file_limit();
        let limits = connection_limits(files);
        tracing::info!(
            files,
            per_listener = limits.total,
            per_peer = limits.per_peer,
            "API connection limits"
        );
        let unix = abide_agent_api::transport::bind_unix(&api.socket, api.group.as_deref())
            .map_err(setting)?;
        self.rt.spawn(abide_agent_api::transport::serve_unix(
            unix,
            service.clone(),
            metrics.clone(),
            limits,
        ));
        tracing::info!(socket = %api.socket.display(), "serving the local API");
        if let Some(tcp) = &api.tcp {
            let tls = abide_agent_api::transport::server_tls(&tcp.cert, &tcp.key, &tcp.client_ca)
                .map_err(setting)?;
            let listener = std::net::TcpListener::bind(tcp.listen)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|source| abide_fs::persist::IoError {
                    op: "listening for the API on",
                    path: tcp.listen.to_string().into(),
                    source,
                })?;
            tracing::info!(addr = %tcp.listen, "serving the local API with mutual TLS");
            self.rt.spawn(abide_agent_api::transport::serve_tls(
                listener, tls, service, metrics, limits,
            ));
        }
        Ok(())
    }

    /// Runs until the device must reboot, or (with `once`) until there is nothing to do.
    pub fn run(&mut self, options: &Options) -> Result<Exit> {
        loop {
            let round = self.round();
            self.write_metrics();
            match round {
                Ok(Some(exit)) => {
                    self.shared.drain();
                    return Ok(exit);
                }
                Ok(None) => {
                    self.failures = 0;
                    continue;
                }
                Err(Wait::Idle) => {
                    self.failures = 0;
                    if options.once {
                        return Ok(Exit::Idle);
                    }
                }
                Err(Wait::Failed(e)) => {
                    self.failures += 1;
                    tracing::warn!(error = %e, failures = self.failures, "round failed; backing off");
                    if options.once && self.failures >= 3 {
                        return Err(e);
                    }
                }
            }
            self.shared.wait(self.pause());
        }
    }

    /// Keeps the metrics file for node-exporter's textfile collector, if one is configured
    /// (replaced atomically; a failure is logged, never fatal).
    fn write_metrics(&self) {
        let Some(path) = &self.shared.config.api.metrics_file else {
            return;
        };
        let text = crate::metrics::render(&self.shared);
        if let Err(e) = abide_fs::persist::write_atomic(path, text.as_bytes(), 0o644) {
            tracing::warn!(error = %e, "writing the metrics file");
        }
    }

    fn pause(&self) -> Duration {
        let interval = self.fleet.as_ref().map_or(LOCAL_INTERVAL, |l| {
            l.suggested.unwrap_or(l.server.poll_interval.unsigned_abs())
        });
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("the system's random source works");
        pause(interval, self.failures, u16::from_le_bytes(r))
    }

    fn open(&self) -> Result<(Device, FleetState)> {
        let device = Device::open_waiting(Config::load(&self.config_path)?)?;
        let fleet = FleetState::load(&device.config.state_dir)?;
        Ok((device, fleet))
    }

    /// Enrols once (the enrolment is kept in the state directory), then reuses it.
    fn client(&mut self, device: &Device, fleet: &mut FleetState) -> Result<DeviceClient> {
        let link = self
            .fleet
            .as_mut()
            .expect("only a fleet round needs a client");
        if let Some(c) = &link.client {
            return Ok(c.clone());
        }
        let client =
            match &fleet.enrolment {
                Some(e) => DeviceClient::restore(
                    &link.http,
                    &link.server.url,
                    &e.device_id,
                    &e.credential,
                    &e.server_key,
                    &e.group,
                )?,
                None => {
                    let file = link.server.enroll_token_file.as_ref().ok_or_else(|| {
                        AgentError::Config {
                            path: self.config_path.clone(),
                            what: "key `server.enroll_token_file`: needed to enrol this device"
                                .into(),
                        }
                    })?;
                    let token = abide_fs::persist::read_bounded(file, 4096)?;
                    let token = String::from_utf8_lossy(&token).trim().to_owned();
                    let c = self.rt.block_on(DeviceClient::enroll(
                        &link.http,
                        &link.server.url,
                        &token,
                        &link.server.device_id,
                        &device.config.product,
                        &[device.config.compatible.to_string()],
                    ))?;
                    fleet.enrolment = Some(Enrolment {
                        server: link.server.url.clone(),
                        device_id: c.id.clone(),
                        credential: c.credential().to_owned(),
                        server_key: c.server_key_hex(),
                        group: c.group.clone(),
                    });
                    fleet.store(&device.config.state_dir)?;
                    tracing::info!(device = %c.id, group = %c.group, "enrolled");
                    c
                }
            };
        link.client = Some(client.clone());
        Ok(client)
    }

    /// One round: gathers the situation, asks `abide_core::agent::next` for the command and
    /// carries it out; a check-in's answer is part of the situation, so the round asks again
    /// after one. `Ok(None)` when another round should follow at once.
    fn round(&mut self) -> std::result::Result<Option<Exit>, Wait> {
        let (mut device, mut fleet) = self.open()?;
        let mut answer: Option<(Assignment, Option<Offer>)> = None;
        let mut client: Option<DeviceClient> = None;
        loop {
            let now = self.shared.clock.now();
            let state = device.state()?;
            let book = self.shared.book();
            let app_transaction = book
                .in_progress()
                .and_then(|s| crate::scheduled::app_transaction(&device.config, s));
            let apps = if !self.apps_checked || crate::app::interrupted(&device.config)? {
                Apps::Interrupted
            } else {
                Apps::Settled
            };
            let part = match &answer {
                Some((_, Some(offer))) if !offer.part.is_os() => {
                    Some(part_state(&device.config, offer, &fleet.ledger)?)
                }
                _ => None,
            };
            let situation = Situation {
                now,
                trial: crate::selfupdate::view(&device.config.state_dir)?,
                apps,
                running: &state.version,
                transaction: state.transaction.as_ref(),
                schedules: &book.schedules,
                app_transaction: app_transaction.as_ref(),
                windows: crate::scheduled::windows(&device.config.windows, now),
                fleet: match (&self.fleet, &answer) {
                    (None, _) => Fleet::Absent,
                    (Some(_), None) => Fleet::Unknown,
                    (Some(_), Some((a, offer))) => Fleet::Answered(Answer {
                        offer: offer.as_ref(),
                        group_window: group_window(a, now),
                        quarantined: offer
                            .as_ref()
                            .is_some_and(|o| state.quarantine.get(&o.version).is_some()),
                        lease: fleet.ledger.lease(),
                        part: part.as_ref(),
                    }),
                },
            };
            let command = agent::next(&situation);
            tracing::debug!(?command, "decided");
            match command {
                Command::Wait(why) => {
                    tracing::debug!(?why, "nothing to do now");
                    return Err(Wait::Idle);
                }
                Command::FailTrial => {
                    crate::selfupdate::recover(&device.config)?;
                    return Ok(None);
                }
                Command::SettleTrial => {
                    let trial = crate::selfupdate::load(&device.config.state_dir)?;
                    crate::selfupdate::settle(&mut device, &self.shared)?;
                    // A fleet release of the agent reports how its trial ended; a new agent
                    // that did not come up is reported by the old one, which runs again.
                    if let Some(t) = trial
                        && fleet.ledger.end_trial(&t)
                    {
                        fleet.store(&device.config.state_dir)?;
                    }
                    return Ok(None);
                }
                Command::RecoverApps => {
                    crate::scheduled::recover_apps(&self.shared, &mut device)?;
                    self.apps_checked = true;
                    return Ok(None);
                }
                Command::Follow => crate::scheduled::follow(&self.shared, &device)?,
                Command::Abandon(reason) => {
                    let cancelled = reason == FailReason::Cancelled;
                    let tx = crate::install::abandon(&mut device, now, reason)?;
                    if cancelled {
                        tracing::info!(transaction = %tx.id, "cancelled before activation; the target stays unbootable");
                    }
                    return Ok(None);
                }
                Command::Activate(By::Schedule(id)) => {
                    return match crate::scheduled::activate(&self.shared, &mut device, &id)? {
                        Next::Reboot => Ok(Some(Exit::Reboot)),
                        Next::Again => Ok(None),
                    };
                }
                Command::Start(id) => {
                    crate::scheduled::start(&self.shared, self.rt.handle(), &mut device, &id)?;
                    return Ok(None);
                }
                Command::CheckIn => {
                    let c = self.client(&device, &mut fleet)?;
                    answer = Some(self.check_in(&c, &mut device, &mut fleet)?);
                    client = Some(c);
                }
                Command::Stage => {
                    let (a, offer) = answer.take().expect("staging follows a check-in");
                    let client = client.expect("a check-in made the client");
                    let offer = offer.expect("staging needs an offer");
                    let release = a.release.expect("an offer comes from a release");
                    fleet.ledger.stage(&offer);
                    fleet.store(&device.config.state_dir)?;
                    let _ = self.flush(&client, &mut fleet, &mut device);
                    let url = format!(
                        "{}{}",
                        self.fleet.as_ref().expect("a fleet round").server.url,
                        release.url
                    );
                    let id =
                        crate::scheduled::fleet_schedule(&self.shared, &url, &offer.rollout_id)?;
                    if !offer.part.is_os() {
                        return self.carry_out(
                            &client,
                            &mut device,
                            &mut fleet,
                            &offer,
                            &release,
                            &id,
                        );
                    }
                    let before = device.state()?.transaction.map(|t| t.id);
                    let staged = self.stage(&mut device, &client, &release, &id);
                    crate::scheduled::staged(
                        &self.shared,
                        &device,
                        &id,
                        before.as_deref(),
                        staged.as_ref().err(),
                    )?;
                    staged?;
                    return Ok(None);
                }
                Command::AskLease => {
                    let client = client.as_ref().expect("a check-in made the client");
                    if !self.rt.block_on(client.lease())? {
                        tracing::info!("reboot lease refused for now");
                        return Err(Wait::Idle);
                    }
                    fleet.ledger.lease = true;
                    fleet.store(&device.config.state_dir)?;
                    tracing::info!("reboot lease granted");
                    return Ok(None);
                }
                Command::ReleaseLease => {
                    let client = client.as_ref().expect("a check-in made the client");
                    self.rt.block_on(client.release_lease())?;
                    fleet.ledger.lease = false;
                    fleet.store(&device.config.state_dir)?;
                    tracing::info!("reboot lease given back");
                    return Ok(None);
                }
                Command::Activate(By::Fleet) => {
                    let client = client.expect("a check-in made the client");
                    let (tx, reboot) = crate::install::activate(&mut device, now)?;
                    tracing::info!(version = %tx.version, target = %tx.target, "activated");
                    return self.after_change(&client, &mut device, reboot);
                }
                Command::RollBack => {
                    let client = client.expect("a check-in made the client");
                    let (tx, reboot) = device.advance(now, "roll back", |tx| {
                        tx.rollback(now, "fleet-wide rollback")
                    })?;
                    tracing::info!(version = %tx.version, "rolled back by the fleet");
                    return self.after_change(&client, &mut device, reboot);
                }
            }
        }
    }

    /// Reports what changed, checks in with the true inventory, verifies the assignment and
    /// takes the trust roots it delivers.
    fn check_in(
        &mut self,
        client: &DeviceClient,
        device: &mut Device,
        fleet: &mut FleetState,
    ) -> std::result::Result<(Assignment, Option<Offer>), Wait> {
        let state = device.state()?;
        if fleet.ledger.note(state.transaction.as_ref()) {
            fleet.store(&device.config.state_dir)?;
        }
        // An application update the fleet assigned that a restart cut short was finished by
        // the recovery: its outcome is reported now.
        note_app(device, fleet)?;
        self.flush(client, fleet, device)?;
        let inventory = inventory(device, &state)?;
        let now = self.shared.clock.now();
        let assignment = match self.rt.block_on(client.checkin(inventory, now)) {
            Ok(a) => a,
            Err(ClientError::BadAssignment(why)) => {
                tracing::warn!(%why, "assignment refused");
                device.record(now, "assignment-refused", json!({"reason": why}))?;
                return Err(Wait::Failed(AgentError::Server(
                    ClientError::BadAssignment(why),
                )));
            }
            Err(e) => return Err(Wait::Failed(e.into())),
        };
        *self.shared.last_checkin.lock().expect("not poisoned") = Some(now);
        if let Some(link) = self.fleet.as_mut() {
            link.suggested = assignment.poll_seconds.map(Duration::from_secs);
        }
        if !assignment.trust.is_empty() {
            self.rotate_trust(device, &assignment.trust)?;
        }
        let offer = Offer::of(&assignment);
        Ok((assignment, offer))
    }

    /// Carries out an application's or the agent's release to its end, as its fleet schedule
    /// `schedule`, and reports how it ended. The agent's re-executes the process on success;
    /// its trial is reported when it is settled. A download that broke off is tried again;
    /// a refused bundle or an ended update is reported once and not tried again.
    fn carry_out(
        &mut self,
        client: &DeviceClient,
        device: &mut Device,
        fleet: &mut FleetState,
        offer: &Offer,
        release: &abide_fleet_json::AssignedRelease,
        schedule: &str,
    ) -> std::result::Result<Option<Exit>, Wait> {
        let meter = Arc::new(Meter::default());
        let src = HttpSource::new(
            self.rt.handle().clone(),
            client.clone(),
            &release.url,
            release.size,
            meter,
        );
        tracing::info!(version = %release.version, part = ?offer.part, "carrying out a fleet release");
        let done = crate::scheduled::carry_out(&self.shared, device, schedule, src);
        note_app(device, fleet)?;
        if let Err(e) = &done
            && e.is_refusal()
            && fleet.ledger.end(
                abide_fleet_json::ReportStatus::Failed,
                Some(format!("{}: {e}", e.code())),
            )
        {
            fleet.store(&device.config.state_dir)?;
        }
        let _ = self.flush(client, fleet, device);
        done?;
        Ok(None)
    }

    /// Reports the change (best effort: the queue keeps what the server did not take) and
    /// reboots if the engine asked for it.
    fn after_change(
        &mut self,
        client: &DeviceClient,
        device: &mut Device,
        reboot: bool,
    ) -> std::result::Result<Option<Exit>, Wait> {
        let mut fleet = FleetState::load(&device.config.state_dir)?;
        if fleet.ledger.note(device.state()?.transaction.as_ref()) {
            fleet.store(&device.config.state_dir)?;
        }
        let _ = self.flush(client, &mut fleet, device);
        if !reboot {
            return Ok(None);
        }
        device.reboot()?;
        Ok(Some(Exit::Reboot))
    }

    /// Downloads the release straight into the target group and stages it: from the delta the
    /// assignment offers when the device runs the version it was made from (the server offers
    /// one only when it is the smallest download), else from the bundle, reading only the
    /// chunks the running group lacks. A delta the running slots do not match is refused before
    /// anything changes; one whose output fails a check partway (a running slot changed behind
    /// its intact chunk index, or a damaged copy of the delta) has left the target unbootable.
    /// Either way the bundle is used instead, and the audit log says why (`delta-fallback`).
    fn stage(
        &mut self,
        device: &mut Device,
        client: &DeviceClient,
        release: &abide_fleet_json::AssignedRelease,
        schedule: &str,
    ) -> Result<()> {
        let running = device.state()?.version.to_string();
        if let Some(delta) = release.delta.as_ref().filter(|d| d.from_version == running) {
            match self.fetch(device, client, release, &delta.url, delta.size, schedule) {
                Err(AgentError::Bundle(e)) if delta_content_failed(&e) => {
                    tracing::warn!(error = %e, "the delta does not fit the running slots; downloading the bundle");
                    device.record(
                        self.shared.clock.now(),
                        "delta-fallback",
                        json!({"release": release.release_id, "url": delta.url,
                               "code": e.code(), "reason": e.to_string(), "bundle": release.url}),
                    )?;
                }
                done => return done,
            }
        }
        self.fetch(
            device,
            client,
            release,
            &release.url,
            release.size,
            schedule,
        )
    }

    /// [`Agent::stage`] from the file at `url` (a bundle or a delta) of `size` bytes.
    fn fetch(
        &mut self,
        device: &mut Device,
        client: &DeviceClient,
        release: &abide_fleet_json::AssignedRelease,
        url: &str,
        size: u64,
        schedule: &str,
    ) -> Result<()> {
        let meter = Arc::new(Meter::default());
        let watched = self.shared.book().get(schedule).cloned();
        let mut src = HttpSource::new(
            self.rt.handle().clone(),
            client.clone(),
            url,
            size,
            meter.clone(),
        );
        // While the download runs, keep checking in with its progress: a withdrawn assignment
        // stops it.
        let watcher = {
            let (client, meter, clock) = (client.clone(), meter.clone(), self.shared.clock.clone());
            let (release_id, total) = (release.release_id.clone(), size);
            let every = self
                .fleet
                .as_ref()
                .expect("fleet downloads have a link")
                .server
                .poll_interval;
            let mut inventory = inventory(device, &device.state()?)?;
            inventory.state = abide_fleet_json::DeviceState::Downloading;
            let started = Instant::now();
            self.rt.spawn(async move {
                loop {
                    tokio::time::sleep(every.unsigned_abs()).await;
                    let fetched = meter.fetched.load(Ordering::Relaxed);
                    let mut req = inventory.clone();
                    req.progress = Some(abide_fleet_json::Progress {
                        release_id: release_id.clone(),
                        bytes: meter.consumed.load(Ordering::Relaxed),
                        total,
                        fetched,
                        rate: (fetched as f64 / started.elapsed().as_secs_f64().max(1e-3)) as u64,
                    });
                    if let Ok(a) = client.checkin(req, clock.now()).await
                        && a.release
                            .as_ref()
                            .is_none_or(|r| r.release_id != release_id)
                    {
                        meter.cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            })
        };
        let started = Instant::now();
        let mut last = Instant::now();
        let mut last_event = Instant::now();
        let shared = self.shared.clone();
        let clock = self.shared.clock.clone();
        tracing::info!(version = %release.version, url, bytes = size, "downloading into the target group");
        let result = crate::install::stage(
            device,
            &mut src,
            Force::No,
            abide_core::Gate::Automatic,
            &|| clock.now(),
            &mut |done, total| {
                if let Some(s) = &watched
                    && (last_event.elapsed() >= Duration::from_millis(250) || done == total)
                {
                    last_event = Instant::now();
                    shared.progress(s, done, total);
                }
                if last.elapsed() >= Duration::from_secs(2) {
                    last = Instant::now();
                    let secs = started.elapsed().as_secs_f64().max(1e-3);
                    tracing::info!(
                        written = done,
                        total,
                        fetched = meter.fetched.load(Ordering::Relaxed),
                        mb_per_s = format!(
                            "{:.1}",
                            meter.fetched.load(Ordering::Relaxed) as f64 / secs / 1e6
                        ),
                        "downloading"
                    );
                }
            },
        );
        watcher.abort();
        let fetched = meter.fetched.load(Ordering::Relaxed);
        let resumed = meter.resumed.load(Ordering::Relaxed);
        match result {
            Ok(out) => {
                tracing::info!(
                    version = %out.transaction.version,
                    fetched,
                    resumed,
                    reused_bytes = out.reused.bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "staged"
                );
                device.record(
                    self.shared.clock.now(),
                    "download",
                    json!({"release": release.release_id, "url": url, "fetched": fetched, "resumed": resumed,
                           "reused_bytes": out.reused.bytes, "bundle_bytes": size,
                           "needed": size.saturating_sub(out.reused.skipped)}),
                )?;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, fetched, "staging failed");
                Err(e)
            }
        }
    }

    /// Takes the trust roots the server delivered; a refused one is audited and changes
    /// nothing.
    fn rotate_trust(&self, device: &mut Device, bodies: &[String]) -> Result<()> {
        let now = self.shared.clock.now();
        let rotation = crate::trust::accept(&device.config, bodies, now)?;
        if rotation.from != rotation.to {
            tracing::info!(from = rotation.from, to = rotation.to, "trust root rotated");
            device.record(
                now,
                "trust-rotate",
                json!({"from": rotation.from, "to": rotation.to}),
            )?;
        }
        if let Some(e) = rotation.refused {
            tracing::warn!(error = %e, "trust root refused");
            device.record(
                now,
                "trust-refused",
                json!({"code": e.code(), "reason": e.to_string(), "holding": rotation.to}),
            )?;
        }
        Ok(())
    }

    /// Sends queued reports in order; stops at the first the server did not answer.
    fn flush(
        &self,
        client: &DeviceClient,
        fleet: &mut FleetState,
        device: &mut Device,
    ) -> Result<()> {
        while let Some(report) = fleet.ledger.outbox.first().cloned() {
            match self.rt.block_on(client.report(&report)) {
                Ok(_) => {}
                Err(ClientError::Refused {
                    status, message, ..
                }) if (400..500).contains(&status) && status != 401 && status != 429 => {
                    // The server will never take it: recorded here, not retried forever.
                    device.record(
                        self.shared.clock.now(),
                        "report-refused",
                        json!({"seq": report.seq, "status": report.status, "reason": message}),
                    )?;
                }
                Err(e) => return Err(e.into()),
            }
            fleet.ledger.outbox.remove(0);
            fleet.store(&device.config.state_dir)?;
        }
        Ok(())
    }
}

/// The pause before the next round: `interval` (the server's, if it asked for one) with
/// ±20 % jitter drawn from `random`, doubled for each of `failures` failed rounds in a row, at
/// most 16 times the interval.
pub fn pause(interval: Duration, failures: u32, random: u16) -> Duration {
    let jitter = 0.8 + 0.4 * f64::from(random) / f64::from(u16::MAX);
    let factor = f64::from(1u32 << failures.min(4));
    interval.mul_f64(factor * jitter)
}

/// Why a round ended without asking for another at once.
enum Wait {
    /// Nothing to do until the next check-in.
    Idle,
    /// Something failed; back off.
    Failed(AgentError),
}

impl<E: Into<AgentError>> From<E> for Wait {
    fn from(e: E) -> Wait {
        Wait::Failed(e.into())
    }
}

/// What the device truly is: its groups as the bootloader has them, its version, its
/// transaction's state and its health (the configured checks; `unknown` during a trial, whose
/// gate decides).
fn inventory(device: &Device, state: &crate::state::DeviceRecord) -> Result<CheckinRequest> {
    let (booted, good) = device.groups()?;
    let tx = state.transaction.as_ref();
    let on_trial =
        tx.is_some_and(|t| matches!(t.state, TxState::Activated { .. } | TxState::Trial { .. }));
    let health = if on_trial {
        Health::Unknown
    } else {
        let group = booted.as_ref().map(ToString::to_string).unwrap_or_default();
        let version = state.version.to_string();
        let running = Running {
            version: &version,
            transaction: None,
        };
        // A `fleet` check is this very check-in: the others say how the device is.
        let checks: Vec<_> = device
            .config
            .checks
            .iter()
            .filter(|c| !matches!(c.kind, crate::config::CheckKind::Fleet(_)))
            .cloned()
            .collect();
        let results = run_each(&checks, running, &group, &SystemClock);
        if results.iter().all(|r| r.outcome == CheckOutcome::Pass) {
            Health::Healthy
        } else if results.iter().any(|r| {
            r.criticality == abide_core::Criticality::Critical && r.outcome != CheckOutcome::Pass
        }) {
            Health::Unhealthy
        } else {
            Health::Degraded
        }
    };
    Ok(CheckinRequest {
        nonce: String::new(),
        version: state.version.to_string(),
        booted: booted.map(|g| g.to_string()),
        good: good.map(|g| g.to_string()),
        state: abide_core::fleet::device_state(tx),
        health: Some(health),
        trust_version: Some(crate::trust::version(&device.config)?),
        progress: None,
        audit_head: device.audit_head(),
        apps: crate::app::states(&device.config)?
            .into_iter()
            .map(|(app, st)| abide_fleet_json::InstalledApp {
                name: app.name.clone(),
                version: st.current.and_then(|r| r.version).map(|v| v.to_string()),
            })
            .collect(),
        agent: Some(abide_fleet_json::AgentInventory {
            version: crate::selfupdate::agent_version(&device.config.state_dir),
            self_update: crate::selfupdate::can_replace(&device.config),
        }),
    })
}

/// What the device has of the application or agent `offer` replaces.
fn part_state(
    config: &Config,
    offer: &Offer,
    ledger: &abide_core::fleet::Ledger,
) -> Result<PartState> {
    let ended = ledger.has_ended(&offer.release_id);
    Ok(match &offer.part {
        Part::Os => PartState::default(),
        Part::App(name) => match config.app(name) {
            None => PartState::default(),
            Some(app) => {
                let st = crate::app::AppState::load(&config.state_dir, name)?;
                PartState {
                    running: st.current.and_then(|r| r.version),
                    present: true,
                    quarantined: st.quarantine.get(&offer.version).is_some(),
                    ended,
                    needs_lease: app.lease,
                }
            }
        },
        Part::Agent => PartState {
            running: crate::selfupdate::agent_version(&config.state_dir)
                .parse()
                .ok(),
            present: crate::selfupdate::can_replace(config),
            quarantined: false,
            ended,
            needs_lease: false,
        },
    })
}

/// Queues the report of the assigned application release's update if it ended
/// (`Ledger::end_app`).
fn note_app(device: &Device, fleet: &mut FleetState) -> Result<()> {
    let Some(Part::App(name)) = fleet.ledger.assigned.as_ref().map(|a| a.part.clone()) else {
        return Ok(());
    };
    if let Some(tx) = crate::app::AppState::load(&device.config.state_dir, &name)?.transaction
        && fleet.ledger.end_app(&tx)
    {
        fleet.store(&device.config.state_dir)?;
    }
    Ok(())
}

/// The group's window, from the assignment: open if it has none; one that cannot be read
/// counts as closed.
fn group_window(a: &Assignment, now: Timestamp) -> WindowState {
    let open = a.window.as_ref().is_none_or(|w| {
        DeviceWindow::parse(&w.days, &w.start, &w.end, &w.zone).is_ok_and(|w| w.is_open(now))
    });
    if open {
        WindowState::Open
    } else {
        WindowState::Closed
    }
}

/// Descriptors kept for the agent's own work (its files, slots, downloads, hooks) whatever
/// the API's clients do.
pub const RESERVED_FILES: u64 = 256;

/// Raises the soft limit on open files to the hard limit (systemd starts services with a soft
/// limit of 1,024) and returns the limit in force.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The API's connection limits for a process that may open `files` descriptors: the two
/// listeners' connections (and root's own, which count apart) stay clear of the
/// [`RESERVED_FILES`].
pub fn connection_limits(files: u64) -> abide_agent_api::transport::ConnectionLimits {
    let mut limits = abide_agent_api::transport::ConnectionLimits::default();
    let room = files.saturating_sub(RESERVED_FILES + limits.per_peer as u64) / 2;
    limits.total = limits.total.min(room.max(1) as usize);
    limits
}

/// Whether applying a delta failed on what it produced (the running slots do not hold the
/// content it was made against, or the delta's bytes are damaged): the full bundle, checked
/// chunk by chunk on its own, can still be installed. Refusals of the release itself
/// (signatures, policy) and failures of the device are not such failures.
fn delta_content_failed(e: &abide_bundle::Error) -> bool {
    matches!(
        e.code(),
        "delta-base" | "chunk-digest" | "chunk-corrupt" | "component-digest" | "decompression-bomb"
    )
}
