//! Application updates on directory slots, without a reboot (`[[app]]` in system.toml).
//!
//! A bundle whose one component's slot class names an application of the device (`[[app]]
//! name`) carries a release of it, as a tar archive (its kind is conventionally `app`). It is verified like any bundle (signatures,
//! trust root, hardware, expiry, product; the application's own version order, security
//! counter and quarantine), unpacked into `RELEASES/.staging-ID` with every chunk checked,
//! synced and renamed to `RELEASES/ID`: until then nothing the application uses changed. Then,
//! each step recorded in the audit log and `STATE_DIR/apps/NAME.json` before the next
//! (`abide_core::app` decides the order):
//!
//! 1. the services are stopped (`CONTROL stop SERVICE`, in reverse order);
//! 2. the data directory is backed up (tar + zstd, [`crate::backup`]);
//! 3. the link is switched to the new release (a new link renamed over the old one);
//! 4. the migration command runs;
//! 5. the services start (`CONTROL start SERVICE`);
//! 6. the checks of `[[app.check]]` run until they pass (commit) or fail, or the deadline.
//!
//! A failure before the switch starts the previous release again (`failed`; the data was not
//! touched). A failure from the switch on restores: services stopped, the data written since
//! the backup moved aside (`DATA.rolled-back-ID`, kept or deleted as `after_backup` says), the
//! backup unpacked beside the data directory and renamed into place, the link switched back,
//! the services started (`rolled_back`, the version quarantined for this application). Every
//! step of the restore can be done again, so a crash during it is finished by the next start;
//! a crash anywhere before the commit is recorded is undone the same way ([`recover`]).

use std::path::{Path, PathBuf};

use abide_bundle::{BundleReader, Manifest, Source};
use abide_core::app::{AppOp, AppRelease, AppStep, AppTransaction, ID_PREFIX};
use abide_core::{CheckResult, Force, Installed, Quarantine, Verdict, admit, verdict};
use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backup::{self, Backup, Backups};
use crate::boot::point_link;
use crate::config::{AfterBackup, AppSettings, Slot, SlotKind};
use crate::device::Device;
use crate::error::{AgentError, Result};
use crate::health::Clock;

/// The format of an application's state file.
const FORMAT: u32 = 1;

/// Whether a bundle carries a release of one of the device's applications: its one
/// component's slot class names an `[[app]]` (no slot of a group has that class: the
/// configuration refuses the ambiguity).
pub fn is_app_bundle(config: &crate::config::Config, manifest: &Manifest) -> bool {
    matches!(manifest.components.as_slice(), [c] if config.app(c.slot_class.as_str()).is_some())
}

/// What the device remembers about one application (`STATE_DIR/apps/NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppState {
    format: u32,
    /// The release that runs (none before the first update).
    pub current: Option<AppRelease>,
    /// The application's anti-rollback counter (raised at commit).
    pub security_version: u64,
    /// Versions rolled back here.
    pub quarantine: Quarantine,
    /// The current or last transaction.
    pub transaction: Option<AppTransaction>,
}

impl AppState {
    fn path(state_dir: &Path, app: &str) -> PathBuf {
        state_dir.join("apps").join(format!("{app}.json"))
    }

    /// Reads the state of `app` (none yet: nothing installed by Abide).
    pub fn load(state_dir: &Path, app: &str) -> Result<AppState> {
        Ok(crate::json_file::load(
            &AppState::path(state_dir, app),
            "application state",
            Some(FORMAT),
        )?
        .unwrap_or(AppState {
            format: FORMAT,
            current: None,
            security_version: 0,
            quarantine: Quarantine::default(),
            transaction: None,
        }))
    }

    fn store(&self, state_dir: &Path, app: &str) -> Result<()> {
        let dir = state_dir.join("apps");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        crate::json_file::store(&AppState::path(state_dir, app), self, 0o600)
    }
}

/// How an application update or restore ended.
#[derive(Debug, Clone, Serialize)]
pub struct AppOutcome {
    /// The application.
    pub app: String,
    /// The transaction, ended.
    pub transaction: AppTransaction,
    /// The backup it took or put back.
    pub backup: Option<Backup>,
    /// Where the data written after the backup was kept, if it was.
    pub kept: Option<PathBuf>,
    /// The last results of the health checks.
    pub checks: Vec<abide_agent_api::CheckResult>,
}

impl AppOutcome {
    /// `Ok` when the update committed or the restore finished; else the error that says it
    /// ended on the previous release, and why.
    pub fn into_result(self) -> Result<AppOutcome> {
        match self.transaction.step {
            AppStep::Committed | AppStep::Restored => Ok(self),
            ref step => Err(AgentError::AppNotCommitted {
                app: self.app.clone(),
                version: self
                    .transaction
                    .release
                    .version
                    .as_ref()
                    .map_or_else(|| "?".to_owned(), Version::to_string),
                state: step.name(),
                reason: self.transaction.reason.clone().unwrap_or_default(),
            }),
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> abide_fs::persist::IoError {
    let path = path.to_owned();
    move |source| abide_fs::persist::IoError { op, path, source }
}

/// Updates an application from the bundle `reader` (its head read, not yet verified) and
/// returns how it ended: committed, failed before the switch, or rolled back. A refusal
/// changes nothing.
pub fn install<S: Source>(
    device: &mut Device,
    reader: BundleReader<S>,
    force: Force,
    clock: &dyn Clock,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<AppOutcome> {
    let staged = stage(device, reader, force, clock, progress)?;
    carry_on(device, staged, clock)
}

/// An update whose new release is unpacked and verified in its directory; nothing the
/// application uses has changed yet.
pub struct Staged {
    app: AppSettings,
    state: AppState,
}

impl Staged {
    /// The transaction.
    pub fn transaction(&self) -> &AppTransaction {
        self.state.transaction.as_ref().expect("staged")
    }
}

/// Recovers what a crash interrupted, checks everything that needs no change, and unpacks the
/// new release; a refusal is recorded in the audit log and changes nothing.
pub fn stage<S: Source>(
    device: &mut Device,
    reader: BundleReader<S>,
    force: Force,
    clock: &dyn Clock,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Staged> {
    recover(device, clock)?;
    match begin(device, reader, force, clock, progress) {
        Ok((app, state)) => Ok(Staged { app, state }),
        Err(e) if e.is_refusal() => {
            device.record(
                clock.now(),
                "refuse",
                json!({"code": e.code(), "detail": e.to_string()}),
            )?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Carries a staged update through to its commit or its rollback.
pub fn carry_on(device: &mut Device, staged: Staged, clock: &dyn Clock) -> Result<AppOutcome> {
    drive(device, &staged.app, staged.state, clock)
}

/// Ends a staged update for `reason` before its first step (its release directory is
/// removed; the application was not touched).
pub fn abandon(
    device: &mut Device,
    mut staged: Staged,
    reason: &str,
    clock: &dyn Clock,
) -> Result<AppOutcome> {
    let mut tx = staged.transaction().clone();
    tx.abandon(reason, clock.now())?;
    persist(
        device,
        &staged.app,
        &mut staged.state,
        &tx,
        clock.now(),
        json!({}),
    )?;
    carry_on(device, staged, clock)
}

/// Every check that needs no change, then the new release unpacked into its directory; the
/// transaction begins staged.
fn begin<S: Source>(
    device: &mut Device,
    reader: BundleReader<S>,
    force: Force,
    clock: &dyn Clock,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(AppSettings, AppState)> {
    let config = device.config.clone();
    let unverified = reader.manifest_unverified()?;
    let component = match unverified.components.as_slice() {
        [c] => c.clone(),
        _ => {
            return Err(AgentError::App {
                app: "?".into(),
                what: "an application bundle has exactly one component".into(),
            });
        }
    };
    let app = config
        .app(component.slot_class.as_str())
        .cloned()
        .ok_or_else(|| AgentError::NoApp {
            app: component.slot_class.to_string(),
        })?;
    let mut state = AppState::load(&config.state_dir, &app.name)?;
    if let Some(tx) = state.transaction.as_ref().filter(|t| !t.step.is_terminal()) {
        return Err(AgentError::Busy {
            id: tx.id.clone(),
            state: tx.step.name(),
        });
    }
    let now = clock.now();
    let mut bundle = crate::trust::admit(
        &config,
        state.security_version,
        now,
        |policy| reader.verify(policy),
        |b| b.manifest(),
    )?;
    let manifest = bundle.manifest().clone();
    let installed = Installed {
        version: state
            .current
            .as_ref()
            .and_then(|r| r.version.clone())
            .unwrap_or(Version::new(0, 0, 0)),
        security_version: state.security_version,
    };
    admit(
        &installed,
        &manifest.version,
        manifest.security_version,
        &state.quarantine,
        force,
    )?;
    let previous = match &state.current {
        Some(r) => Some(r.clone()),
        None => running_release(&app)?,
    };
    std::fs::create_dir_all(&app.releases).map_err(io("creating", &app.releases))?;
    let base = format!("{ID_PREFIX}{}-{}", now.as_second(), manifest.version);
    let mut id = base.clone();
    let mut n = 1;
    while app.releases.join(&id).exists() || state.transaction.as_ref().is_some_and(|t| t.id == id)
    {
        n += 1;
        id = format!("{base}-r{n}");
    }
    let staging = app.releases.join(format!(".staging-{id}"));
    let slot = Slot {
        class: app.name.clone(),
        path: staging.clone(),
        kind: SlotKind::Dir,
        link: None,
        capacity: app.capacity,
    };
    let unpacked = (|| -> Result<()> {
        bundle.set_checks(config.bundle_checks);
        let total = component.size;
        let mut writer = crate::slots::SlotWriter::open(&slot)?;
        let mut done = 0u64;
        let read = bundle.read_component(&mut |data| {
            done += data.len() as u64;
            progress(done, total);
            writer.write(data)
        });
        let written = writer.finish();
        read?;
        written?;
        bundle.finish()?;
        Ok(())
    })();
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // Before the first step that touches the application: room for what the update, or its
    // failure and recovery, must write — in the state directory (records, state files), beside
    // the releases (the link switched and switched back) and for the data (its backup). A
    // release that leaves too little is removed again, with the application untouched.
    let room = [
        (&config.state_dir, config.state_reserve),
        (&app.releases, 0),
        (&app.backup_dir, 0),
        (&app.data, 0),
    ]
    .into_iter()
    .filter(|(dir, _)| dir.exists())
    .try_for_each(|(dir, reserve)| {
        let need = crate::room::Need {
            bytes: 0,
            reserve,
            inodes: 0,
            what: "what a failure and its recovery write",
        };
        crate::room::ensure(dir, need)
    });
    if let Err(e) = room {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let dir = app.releases.join(&id);
    std::fs::rename(&staging, &dir).map_err(io("putting the release in place", &dir))?;
    abide_fs::persist::sync_dir(&app.releases)?;
    let tx = AppTransaction::update(
        &id,
        &app.name,
        AppRelease {
            version: Some(manifest.version.clone()),
            dir: id.clone(),
        },
        previous,
        manifest.security_version,
        clock.now(),
    );
    persist(device, &app, &mut state, &tx, clock.now(), json!({}))?;
    Ok((app, state))
}

/// The release the link points at before Abide managed the application: a directory in the
/// releases directory (its version unknown), or none when there is no link yet.
fn running_release(app: &AppSettings) -> Result<Option<AppRelease>> {
    let meta = match std::fs::symlink_metadata(&app.link) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", &app.link)(e).into()),
    };
    let bad = |what: String| AgentError::App {
        app: app.name.clone(),
        what,
    };
    if !meta.file_type().is_symlink() {
        return Err(bad(format!(
            "{} is not a symbolic link (Abide switches releases by replacing it)",
            app.link.display()
        )));
    }
    let target = std::fs::read_link(&app.link).map_err(io("reading", &app.link))?;
    let target = crate::config::lexical(&app.link.parent().unwrap_or(Path::new(".")).join(target));
    match (target.parent(), target.file_name()) {
        (Some(parent), Some(name)) if parent == app.releases => Ok(Some(AppRelease {
            version: None,
            dir: name.to_string_lossy().into_owned(),
        })),
        _ => Err(bad(format!(
            "{} points at {}, which is not a directory in {}",
            app.link.display(),
            target.display(),
            app.releases.display()
        ))),
    }
}

/// Records the transaction's step: the audit record first, then the application's state file
/// (at the end: the release that runs, the counter at a commit, the quarantine at a
/// rollback).
fn persist(
    device: &mut Device,
    app: &AppSettings,
    state: &mut AppState,
    tx: &AppTransaction,
    now: Timestamp,
    extra: serde_json::Value,
) -> Result<()> {
    let mut details = json!({"app": app.name, "transaction": tx.id, "op": tx.op, "step": tx.step.name(),
                             "release": tx.release.dir,
                             "version": tx.release.version.as_ref().map(Version::to_string),
                             "previous": tx.previous.as_ref().map(|p| &p.dir)});
    if let Some(reason) = &tx.reason {
        details["reason"] = json!(reason);
        details["reason_kind"] = json!(tx.reason_kind);
    }
    if let Some(b) = &tx.backup {
        details["backup"] = json!(b);
    }
    if let serde_json::Value::Object(more) = extra {
        details.as_object_mut().expect("an object").extend(more);
    }
    device.record(
        now,
        &format!("app-{}", tx.step.name().replace('_', "-")),
        details,
    )?;
    state.transaction = Some(tx.clone());
    match tx.step {
        AppStep::Committed => {
            state.current = tx.outcome().cloned();
            state.security_version = state.security_version.max(tx.security_version);
        }
        AppStep::RolledBack | AppStep::Failed | AppStep::Restored => {
            state.current = tx.outcome().cloned();
            if tx.step == AppStep::RolledBack
                && let Some(v) = &tx.release.version
            {
                state
                    .quarantine
                    .add(v, tx.reason.as_deref().unwrap_or(""), now);
            }
        }
        _ => {}
    }
    let state_dir = &device.config.state_dir;
    crate::room::with_reserve(state_dir, || state.store(state_dir, &app.name))
}

/// Carries the transaction of `state` on from its step to its end.
fn drive(
    device: &mut Device,
    app: &AppSettings,
    mut state: AppState,
    clock: &dyn Clock,
) -> Result<AppOutcome> {
    let mut tx = state.transaction.clone().expect("a transaction to drive");
    let mut checks = Vec::new();
    let mut kept = None;
    let state_dir = device.config.state_dir.clone();
    while !tx.step.is_terminal() {
        abide_fs::crash::point("app:step", tx.step.name());
        let now = clock.now();
        let mut extra = json!({});
        let done: std::result::Result<(), String> = match tx.step.clone() {
            AppStep::Staged => services(device, app, &tx, "stop", clock)
                .map(|()| tx.stopped(now).expect("from staged")),
            AppStep::Stopped => {
                backup::take(&state_dir, app, tx.previous.as_ref(), &tx.id, clock.now())
                    .map(|b| {
                        extra =
                            json!({"sha256": b.sha256, "size": b.size, "data_bytes": b.data_bytes});
                        tx.backed_up(&b.id, clock.now()).expect("from stopped");
                    })
                    .map_err(|e| format!("backing up {}: {e}", app.data.display()))
            }
            AppStep::BackedUp => point_link(&app.link, &link_target(app, &tx.release.dir))
                .map(|()| tx.switched(clock.now()).expect("from backed up"))
                .map_err(|e| format!("switching {}: {e}", app.link.display())),
            AppStep::Switched => migrate(device, app, &tx, clock)
                .map(|()| tx.migrated(clock.now()).expect("from switched")),
            AppStep::Migrated => services(device, app, &tx, "start", clock)
                .map(|()| tx.started_services(clock.now()).expect("from migrated")),
            AppStep::Started => {
                let (passed, results) = gate(app, &tx, clock);
                checks = results;
                passed.map(|()| tx.commit(clock.now()).expect("from started"))
            }
            AppStep::Restoring { data } => {
                let aside = restore(device, app, &tx, data, clock)?;
                if let Some(a) = &aside {
                    extra = json!({"set_aside": a, "after_backup": app.after_backup});
                }
                kept = aside.filter(|_| app.after_backup == AfterBackup::Keep);
                tx.restored(clock.now())?;
                Ok(())
            }
            AppStep::Committed | AppStep::Failed | AppStep::RolledBack | AppStep::Restored => {
                unreachable!("the loop ends at a terminal step")
            }
        };
        if let Err(reason) = done {
            tracing::warn!(app = %app.name, step = tx.step.name(), %reason, "application update failed");
            // Putting the previous release back must not wait for room: the reserve is
            // given back to the file system now (it is made again at the next change).
            crate::room::release_reserve(&state_dir);
            tx.fail(&reason, clock.now())?;
        }
        persist(device, app, &mut state, &tx, clock.now(), extra)?;
    }
    tidy(app, &state_dir, Some(&tx), kept.as_deref())?;
    let backup = match &tx.backup {
        Some(id) => Backups::load(&state_dir)?.get(id).cloned(),
        None => None,
    };
    Ok(AppOutcome {
        app: app.name.clone(),
        transaction: tx,
        backup,
        kept,
        checks: crate::api::check_views(&checks),
    })
}

/// Runs `CONTROL ACTION SERVICE` for each service (stopped in reverse order); the first that
/// fails ends the step. Each run is in the audit log.
fn services(
    device: &mut Device,
    app: &AppSettings,
    tx: &AppTransaction,
    action: &str,
    clock: &dyn Clock,
) -> std::result::Result<(), String> {
    let mut order: Vec<&String> = app.services.iter().collect();
    if action == "stop" {
        order.reverse();
    }
    for service in order {
        let command = format!("{} {action} {service}", app.control);
        let env = [
            ("ABIDE_APP", app.name.clone()),
            ("ABIDE_SERVICE", service.clone()),
            ("ABIDE_TRANSACTION", tx.id.clone()),
        ];
        let ended = run(&command, &env, app);
        let _ = device.record(
            clock.now(),
            if ended.is_ok() {
                "app-service"
            } else {
                "app-service-failed"
            },
            json!({"app": app.name, "transaction": tx.id, "service": service, "action": action,
                   "ended": ended.as_ref().map_or_else(|e| e.clone(), |o| o.clone())}),
        );
        if let Err(why) = ended {
            return Err(format!("{action} {service}: {why}"));
        }
    }
    Ok(())
}

/// Runs a command of the application's with its time limit: `Ok` with the end of its output
/// when it exits 0, else how it ended and the end of its output.
fn run(
    command: &str,
    env: &[(&str, String)],
    app: &AppSettings,
) -> std::result::Result<String, String> {
    let timeout = std::time::Duration::try_from(app.timeout).unwrap_or_default();
    match crate::command::run(command, env, timeout) {
        Ok((crate::command::Ended::Exited(status), output)) if status.success() => Ok(output),
        Ok((crate::command::Ended::Exited(status), output)) => {
            Err(with_output(status.to_string(), &output))
        }
        Ok((crate::command::Ended::TimedOut(t), output)) => Err(with_output(
            format!("timed out after {}s and was killed", t.as_secs()),
            &output,
        )),
        Err(why) => Err(why),
    }
}

fn with_output(ended: String, output: &str) -> String {
    if output.is_empty() {
        ended
    } else {
        format!("{ended}: {output}")
    }
}

/// The migration command, if there is one, with the update's details in its environment.
fn migrate(
    device: &mut Device,
    app: &AppSettings,
    tx: &AppTransaction,
    clock: &dyn Clock,
) -> std::result::Result<(), String> {
    let Some(command) = &app.migrate else {
        return Ok(());
    };
    let version = |r: Option<&AppRelease>| {
        r.and_then(|r| r.version.as_ref())
            .map(Version::to_string)
            .unwrap_or_default()
    };
    let backup = tx.backup.as_ref().and_then(|id| {
        Backups::load(&device.config.state_dir)
            .ok()?
            .get(id)
            .cloned()
    });
    let env = [
        ("ABIDE_HOOK", "migrate".to_owned()),
        ("ABIDE_APP", app.name.clone()),
        ("ABIDE_TRANSACTION", tx.id.clone()),
        ("ABIDE_VERSION", version(Some(&tx.release))),
        ("ABIDE_FROM_VERSION", version(tx.previous.as_ref())),
        (
            "ABIDE_RELEASE",
            app.releases.join(&tx.release.dir).display().to_string(),
        ),
        ("ABIDE_DATA", app.data.display().to_string()),
        (
            "ABIDE_BACKUP",
            backup
                .map(|b| b.file.display().to_string())
                .unwrap_or_default(),
        ),
    ];
    let ended = run(command, &env, app);
    let _ = device.record(
        clock.now(),
        if ended.is_ok() { "hook" } else { "hook-failed" },
        json!({"hook": "migrate", "app": app.name, "transaction": tx.id,
               "ended": ended.as_ref().map_or_else(|e| e.clone(), |o| o.clone())}),
    );
    ended.map(|_| ()).map_err(|why| format!("migration: {why}"))
}

/// Runs the application's checks until the gate decides.
fn gate(
    app: &AppSettings,
    tx: &AppTransaction,
    clock: &dyn Clock,
) -> (std::result::Result<(), String>, Vec<CheckResult>) {
    let since = clock.now();
    let mut degraded_since = None;
    let version = tx
        .release
        .version
        .as_ref()
        .map(Version::to_string)
        .unwrap_or_default();
    let pause = app
        .checks
        .iter()
        .map(|c| c.interval)
        .min()
        .unwrap_or(jiff::SignedDuration::from_secs(5));
    loop {
        let results = crate::health::run_each(
            &app.checks,
            crate::health::Running {
                version: &version,
                transaction: Some(&tx.id),
            },
            &app.name,
            clock,
        );
        match verdict(&app.health, since, degraded_since, &results, clock.now()) {
            Verdict::Commit => return (Ok(()), results),
            Verdict::RollBack(reason) => return (Err(reason.to_string()), results),
            Verdict::Wait { degraded_since: d } => {
                degraded_since = d;
                clock.sleep(pause);
            }
        }
    }
}

/// The restore step, every part of which can be done again after a crash: services stopped;
/// with `data`, the data written since the backup moved aside and the backup put in its place;
/// the link back on the release to restore; services started. Returns where the data it
/// replaced was moved.
fn restore(
    device: &mut Device,
    app: &AppSettings,
    tx: &AppTransaction,
    data: bool,
    clock: &dyn Clock,
) -> Result<Option<PathBuf>> {
    // A service that does not stop is recorded; the restore goes on (the previous release
    // must come back).
    let _ = services(device, app, tx, "stop", clock);
    let mut kept = None;
    if data {
        let aside = aside(app, tx);
        let book = Backups::load(&device.config.state_dir)?;
        let backup = tx.backup.as_deref().and_then(|id| book.get(id));
        let usable = match backup {
            Some(b) if aside.exists() => Ok(b),
            Some(b) => backup::check(b).map(|()| b),
            None => Err(AgentError::App {
                app: app.name.clone(),
                what: format!("backup {:?} is not in the backup list", tx.backup),
            }),
        };
        match usable {
            Ok(backup) => {
                let parent = app.data.parent().unwrap_or(Path::new("."));
                if !aside.exists() {
                    abide_fs::crash::point("app:set-aside", &app.name);
                    if app.data.exists() {
                        std::fs::rename(&app.data, &aside)
                            .map_err(io("moving aside", &app.data))?;
                    } else {
                        std::fs::create_dir(&aside).map_err(io("creating", &aside))?;
                    }
                    abide_fs::persist::sync_dir(parent)?;
                }
                if !app.data.exists() {
                    let name = app.data.file_name().unwrap_or_default().to_string_lossy();
                    let temp = app.data.with_file_name(format!(".{name}.abide-restore"));
                    backup::unpack(backup, &temp)?;
                    abide_fs::crash::point("app:restore-rename", &app.name);
                    std::fs::rename(&temp, &app.data).map_err(io("restoring", &app.data))?;
                    abide_fs::persist::sync_dir(parent)?;
                }
                kept = Some(aside);
            }
            Err(e) => {
                // The data stays as it is: the previous release still comes back.
                device.record(
                    clock.now(),
                    "app-restore-skipped",
                    json!({"app": app.name, "transaction": tx.id, "detail": e.to_string()}),
                )?;
            }
        }
    }
    match tx.restore_to() {
        Some(r) => point_link(&app.link, &link_target(app, &r.dir))?,
        None => {
            if std::fs::symlink_metadata(&app.link).is_ok() {
                std::fs::remove_file(&app.link).map_err(io("removing", &app.link))?;
                abide_fs::persist::sync_dir(app.link.parent().unwrap_or(Path::new(".")))?;
            }
        }
    }
    if tx.restore_to().is_some() {
        let _ = services(device, app, tx, "start", clock);
    }
    Ok(kept)
}

/// What the link holds to point at release directory `dir`: the path from the link's own
/// directory, so that the tree can be moved or seen from a chroot as a whole.
fn link_target(app: &AppSettings, dir: &str) -> PathBuf {
    let from: Vec<_> = app
        .link
        .parent()
        .unwrap_or(Path::new("/"))
        .components()
        .collect();
    let to = app.releases.join(dir);
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut target = PathBuf::new();
    for _ in common..from.len() {
        target.push("..");
    }
    for c in &to[common..] {
        target.push(c);
    }
    target
}

/// Where a restore moves the data it replaces.
fn aside(app: &AppSettings, tx: &AppTransaction) -> PathBuf {
    let name = app.data.file_name().unwrap_or_default().to_string_lossy();
    let label = match tx.op {
        AppOp::Update => "rolled-back",
        AppOp::Restore => "before-restore",
    };
    app.data.with_file_name(format!("{name}.{label}-{}", tx.id))
}

/// After a transaction ended (or at a start, `tx` the last one if there is one): the data set
/// aside is deleted when `after_backup = "discard"`, old backups beyond the number kept are
/// deleted, and release directories Abide made (or began to unpack) that neither run, nor ran
/// before, nor belong to a kept backup are removed.
fn tidy(
    app: &AppSettings,
    state_dir: &Path,
    tx: Option<&AppTransaction>,
    kept: Option<&Path>,
) -> Result<()> {
    if let Some(tx) = tx
        && app.after_backup == AfterBackup::Discard
        && kept.is_none()
    {
        let aside = aside(app, tx);
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io("removing", &aside))?;
        }
    }
    let mut book = Backups::load(state_dir)?;
    if !book.prune(app).is_empty() {
        book.store(state_dir)?;
    }
    let mut keep: Vec<String> = book
        .backups
        .iter()
        .filter(|b| b.app == app.name)
        .filter_map(|b| b.release.as_ref().map(|r| r.dir.clone()))
        .collect();
    if let Some(tx) = tx {
        keep.extend(tx.outcome().map(|r| r.dir.clone()));
        keep.extend(tx.previous.as_ref().map(|r| r.dir.clone()));
    }
    // Whatever the link points at stays, whoever put it there.
    keep.extend(
        std::fs::read_link(&app.link)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned())),
    );
    let Ok(listing) = std::fs::read_dir(&app.releases) else {
        return Ok(());
    };
    for entry in listing.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(ID_PREFIX) || name.starts_with(".staging-");
        if ours && !keep.contains(&name) {
            std::fs::remove_dir_all(entry.path()).map_err(io("removing", &entry.path()))?;
        }
    }
    Ok(())
}

/// Whether an application's update had not ended when the agent stopped (its state holds a
/// transaction that is not terminal).
pub fn interrupted(config: &crate::config::Config) -> Result<bool> {
    for app in &config.apps {
        let state = AppState::load(&config.state_dir, &app.name)?;
        if state.transaction.is_some_and(|t| !t.step.is_terminal()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Finishes or undoes what a crash interrupted, for every application: a transaction that
/// had not ended is failed and restored ([`AppTransaction::recover`]); a restore goes on.
/// Returns how each that was carried on ended.
pub fn recover(device: &mut Device, clock: &dyn Clock) -> Result<Vec<AppOutcome>> {
    let mut ended = Vec::new();
    for app in device.config.apps.clone() {
        let mut state = AppState::load(&device.config.state_dir, &app.name)?;
        let Some(mut tx) = state.transaction.clone() else {
            // A first update cut short before it began leaves at most a release directory.
            tidy(&app, &device.config.state_dir, None, None)?;
            continue;
        };
        if tx.step.is_terminal() {
            // What a crash after the end left behind (data set aside to be discarded).
            tidy(&app, &device.config.state_dir, Some(&tx), None)?;
            continue;
        }
        let now = clock.now();
        crate::room::release_reserve(&device.config.state_dir);
        if tx.recover(now) {
            persist(
                device,
                &app,
                &mut state,
                &tx,
                now,
                json!({"recovered": true}),
            )?;
        }
        ended.push(drive(device, &app, state, clock)?);
    }
    Ok(ended)
}

/// An operator puts backup `id` back: the data from it, and the release it was taken from
/// (still in the releases directory). The backup is checked before anything changes.
pub fn restore_backup(
    device: &mut Device,
    id: &str,
    reason: &str,
    clock: &dyn Clock,
) -> Result<AppOutcome> {
    recover(device, clock)?;
    let book = Backups::load(&device.config.state_dir)?;
    let backup = book.get(id).cloned().ok_or_else(|| AgentError::App {
        app: id.split('-').next().unwrap_or("?").to_owned(),
        what: format!("there is no backup {id:?} (`abide backup list` shows them)"),
    })?;
    let app = device
        .config
        .app(&backup.app)
        .cloned()
        .ok_or_else(|| AgentError::NoApp {
            app: backup.app.clone(),
        })?;
    let mut state = AppState::load(&device.config.state_dir, &app.name)?;
    let release = match (&backup.release, &state.current) {
        (Some(r), _) => r.clone(),
        (None, Some(current)) => current.clone(),
        (None, None) => {
            return Err(AgentError::App {
                app: app.name.clone(),
                what: format!("backup {id} belongs to no release and none runs"),
            });
        }
    };
    if !app.releases.join(&release.dir).is_dir() {
        return Err(AgentError::App {
            app: app.name.clone(),
            what: format!(
                "the release backup {id} was taken from, {}, is no longer in {}",
                release.dir,
                app.releases.display()
            ),
        });
    }
    backup::check(&backup)?;
    let now = clock.now();
    let tx_id = format!("{ID_PREFIX}{}-restore-{id}", now.as_second());
    let tx = AppTransaction::restore(
        &tx_id,
        &app.name,
        id,
        release,
        state.current.clone(),
        reason,
        now,
    );
    persist(device, &app, &mut state, &tx, now, json!({}))?;
    drive(device, &app, state, clock)
}

/// The application transaction `id`, if one of the applications has it as its current or
/// last one.
pub fn transaction(config: &crate::config::Config, id: &str) -> Option<AppTransaction> {
    config.apps.iter().find_map(|a| {
        AppState::load(&config.state_dir, &a.name)
            .ok()?
            .transaction
            .filter(|t| t.id == id)
    })
}

/// Every application's state, for `abide app status`.
pub fn states(config: &crate::config::Config) -> Result<Vec<(AppSettings, AppState)>> {
    config
        .apps
        .iter()
        .map(|a| Ok((a.clone(), AppState::load(&config.state_dir, &a.name)?)))
        .collect()
}
