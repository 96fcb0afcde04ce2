//! `abide app` and `abide backup`: the applications of `[[app]]` in system.toml, updated on
//! directory slots without a reboot, and the backups of their data.

use std::fs::File;
use std::io::{self, IsTerminal};
use std::path::Path;

use abide_agent::app::{AppOutcome, AppState};
use abide_agent::backup::{Backup, Backups};
use abide_agent::health::SystemClock;
use abide_bundle::{BundleReader, Limits};
use abide_core::Force;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

use crate::Output;
use crate::device::{SeekableFile, open, open_read_only, progress};

/// `abide app …`.
#[derive(Subcommand)]
pub enum AppCommand {
    /// Each application: the release and version that run, the last transaction.
    Status {
        /// Only this application.
        name: Option<String>,
    },
    /// Finish or undo what a crash interrupted (an update is rolled back, a restore goes on);
    /// the agent and `abide boot` do this by themselves.
    Recover,
}

/// `abide backup …`.
#[derive(Subcommand)]
pub enum BackupCommand {
    /// The backups of the applications' data, oldest first.
    List {
        /// Only this application's.
        #[arg(long)]
        app: Option<String>,
    },
    /// Put a backup back: the application's services stopped, its data replaced by the
    /// backup's (the data it replaces kept or discarded as `after_backup` says), its release
    /// switched back to the one the backup was taken from, the services started.
    Restore {
        /// The backup's id (`abide backup list`).
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "operator request")]
        reason: String,
    },
}

/// Whether the bundle file at `path` carries a release of an application of the device
/// configured at `config`.
pub fn is_app_bundle(config: &Path, path: &Path) -> bool {
    let Ok(config) = abide_agent::config::Config::load(config) else {
        return false;
    };
    File::open(path)
        .ok()
        .and_then(|f| BundleReader::open(SeekableFile(f), Limits::default()).ok())
        .and_then(|r| r.manifest_unverified().ok())
        .is_some_and(|m| abide_agent::app::is_app_bundle(&config, &m))
}

/// `abide install APP.abide`: the whole update, to its commit or its rollback.
pub fn run_install(
    config: &Path,
    bundle: &Path,
    force: bool,
    paranoid: bool,
    out: Output,
) -> Result<()> {
    let mut device = crate::device::open_intact(config)?;
    if paranoid {
        device.config.bundle_checks = abide_bundle::chunks::Checks::Every;
    }
    let file = crate::on_file("opening", bundle, File::open(bundle))?;
    let reader = BundleReader::open(SeekableFile(file), Limits::default())
        .map_err(abide_agent::AgentError::from)
        .with_context(|| format!("installing {}", bundle.display()))?;
    let force = if force { Force::Yes } else { Force::No };
    let bar = progress(!out.is_json() && io::stderr().is_terminal(), false);
    let done = abide_agent::app::install(&mut device, reader, force, &SystemClock, &mut |d, t| {
        bar.set_length(t);
        bar.set_position(d);
    });
    bar.finish_and_clear();
    let done = done.with_context(|| format!("installing {}", bundle.display()))?;
    report(done, out)
}

/// Prints how an update or restore ended; an update that did not commit is an error (exit 4)
/// after its outcome was printed.
fn report(done: AppOutcome, out: Output) -> Result<()> {
    let tx = &done.transaction;
    out.print(&OutcomeView::of(&done), || {
        let version = |r: Option<&abide_core::app::AppRelease>| {
            r.map(|r| {
                r.version
                    .as_ref()
                    .map_or_else(|| r.dir.clone(), ToString::to_string)
            })
            .unwrap_or_else(|| "nothing".to_owned())
        };
        let mut text = format!(
            "{}: {} {} ({}); runs {}",
            done.app,
            version(Some(&tx.release)),
            tx.step.name().replace('_', " "),
            tx.id,
            version(tx.outcome())
        );
        if let Some(reason) = &tx.reason {
            text.push_str(&format!("\nreason: {reason}"));
        }
        if let Some(b) = &done.backup {
            text.push_str(&format!(
                "\nbackup {}: {} ({} bytes)",
                b.id,
                b.file.display(),
                b.size
            ));
        }
        if let Some(k) = &done.kept {
            text.push_str(&format!(
                "\nthe data written after the backup is kept in {}",
                k.display()
            ));
        }
        text
    })?;
    done.into_result()
        .map(|_| ())
        .map_err(|e| anyhow::Error::new(e).context(crate::Reported("not committed")))
}

/// How an update or restore ended, as `abide app update|restore|recover` and `abide boot`
/// answer it.
#[derive(Serialize)]
pub struct OutcomeView<'a> {
    app: &'a str,
    transaction: &'a str,
    op: abide_core::app::AppOp,
    state: &'static str,
    version: Option<String>,
    release: &'a str,
    running: Option<&'a str>,
    reason: Option<&'a str>,
    backup: Option<&'a Backup>,
    kept: Option<&'a std::path::Path>,
    checks: &'a [abide_agent_api::CheckResult],
}

impl<'a> OutcomeView<'a> {
    /// The view of `done`.
    pub fn of(done: &'a AppOutcome) -> Self {
        let tx = &done.transaction;
        OutcomeView {
            app: &done.app,
            transaction: &tx.id,
            op: tx.op,
            state: tx.step.name(),
            version: tx.release.version.as_ref().map(ToString::to_string),
            release: &tx.release.dir,
            running: tx.outcome().map(|r| r.dir.as_str()),
            reason: tx.reason.as_deref(),
            backup: done.backup.as_ref(),
            kept: done.kept.as_deref(),
            checks: &done.checks,
        }
    }
}

/// `abide backup list`.
#[derive(Serialize)]
struct BackupList<'a> {
    backups: Vec<&'a Backup>,
}

/// `abide app …`.
pub fn run_app(command: AppCommand, config: &Path, out: Output) -> Result<()> {
    match command {
        AppCommand::Status { name } => {
            let device = open_read_only(config)?;
            let mut apps = Vec::new();
            for (app, state) in abide_agent::app::states(&device.config)? {
                if name.as_ref().is_some_and(|n| *n != app.name) {
                    continue;
                }
                apps.push(status_json(&app, &state));
            }
            if let Some(n) = &name
                && apps.is_empty()
            {
                return Err(abide_agent::AgentError::NoApp { app: n.clone() }.into());
            }
            let answer = AppsStatus { apps };
            out.print(&answer, || {
                answer
                    .apps
                    .iter()
                    .map(|a| {
                        format!(
                            "{}: {} ({}), last transaction {} {}",
                            a.name,
                            a.version.as_deref().unwrap_or("unknown version"),
                            a.release.as_deref().unwrap_or("no release"),
                            a.transaction.as_ref().map_or("none", |t| t.id.as_str()),
                            a.transaction.as_ref().map_or("", |t| t.step.name()),
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        AppCommand::Recover => {
            let mut device = open(config)?;
            let ended = abide_agent::app::recover(&mut device, &SystemClock)?;
            let recovered: Vec<_> = ended.iter().map(OutcomeView::of).collect();
            out.print(&crate::Recovered { recovered }, || {
                if ended.is_empty() {
                    "nothing to recover".to_owned()
                } else {
                    ended
                        .iter()
                        .map(|d| {
                            format!(
                                "{}: {} {}",
                                d.app,
                                d.transaction.id,
                                d.transaction.step.name()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            })?;
            Ok(())
        }
    }
}

/// `abide app status`.
#[derive(serde::Serialize)]
struct AppsStatus {
    apps: Vec<AppStatus>,
}

/// One application in `abide app status`.
#[derive(serde::Serialize)]
struct AppStatus {
    name: String,
    version: Option<String>,
    release: Option<String>,
    link: std::path::PathBuf,
    data: std::path::PathBuf,
    releases: std::path::PathBuf,
    security_version: u64,
    quarantine: Vec<String>,
    transaction: Option<abide_core::app::AppTransaction>,
}

fn status_json(app: &abide_agent::config::AppSettings, state: &AppState) -> AppStatus {
    AppStatus {
        name: app.name.clone(),
        version: state
            .current
            .as_ref()
            .and_then(|r| r.version.as_ref())
            .map(ToString::to_string),
        release: state.current.as_ref().map(|r| r.dir.clone()),
        link: app.link.clone(),
        data: app.data.clone(),
        releases: app.releases.clone(),
        security_version: state.security_version,
        quarantine: state.quarantine.versions().map(|v| v.to_string()).collect(),
        transaction: state.transaction.clone(),
    }
}

/// `abide backup …`.
pub fn run_backup(command: BackupCommand, config: &Path, out: Output) -> Result<()> {
    match command {
        BackupCommand::List { app } => {
            let device = open_read_only(config)?;
            if let Some(a) = &app
                && device.config.app(a).is_none()
            {
                return Err(abide_agent::AgentError::NoApp { app: a.clone() }.into());
            }
            let book = Backups::load(&device.config.state_dir)?;
            let backups: Vec<_> = book
                .backups
                .iter()
                .filter(|b| app.as_ref().is_none_or(|a| *a == b.app))
                .collect();
            let answer = BackupList { backups };
            out.print(&answer, || {
                let backups = &answer.backups;
                if backups.is_empty() {
                    return "no backups".to_owned();
                }
                backups
                    .iter()
                    .map(|b| {
                        format!(
                            "{}  {}  {}  {} bytes  sha256 {}  {}",
                            b.id,
                            b.created,
                            b.release
                                .as_ref()
                                .and_then(|r| r.version.as_ref())
                                .map_or_else(|| "?".to_owned(), ToString::to_string),
                            b.size,
                            b.sha256,
                            b.file.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            Ok(())
        }
        BackupCommand::Restore { id, reason } => {
            let mut device = open(config)?;
            let done = abide_agent::app::restore_backup(&mut device, &id, &reason, &SystemClock)?;
            report(done, out)
        }
    }
}
