//! The device commands: install, boot, status, health, mark-good, mark-bad, rollback, log.

use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};

use abide_agent::audit::AuditLog;
use abide_agent::boot::boot;
use abide_agent::config::Config;
use abide_agent::device::Device;
use abide_agent::health::SystemClock;
use abide_agent::install::install;
use abide_bundle::{Source, Stream};
use abide_core::Force;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use crate::Output;
use crate::schedule::Api;

/// Where the device's configuration is: `--config F` anywhere on the command line (`abide
/// --config F status` or `abide status --config F`), else `ABIDE_CONFIG`, else the default.
#[derive(Args, Clone)]
pub struct ConfigArg {
    /// The device configuration (device commands).
    #[arg(
        long,
        global = true,
        env = "ABIDE_CONFIG",
        default_value = abide_agent::config::DEFAULT_PATH
    )]
    pub config: PathBuf,
}

/// The `abide log` subcommands.
#[derive(Subcommand)]
pub enum LogCommand {
    /// Check the hash chain and the head's signature by the device key: any edit, deletion,
    /// reordering or truncation is found.
    Verify {
        /// Also check that the log still holds this checkpoint: a signed head kept elsewhere
        /// (JSON, as `abide log head --json` prints it or the fleet server shows it in
        /// `abide fleet devices --json` under `audit_head`). Finds a rewrite by someone who
        /// holds the device key.
        #[arg(long, value_name = "FILE")]
        against: Option<std::path::PathBuf>,
    },
    /// Print the log's signed head (a checkpoint to keep elsewhere).
    Head,
}

/// The `abide device` subcommands.
#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Set the device up once: check the slots and the state directory, write the
    /// bootloader's first variables (the running group known-good, the other not bootable)
    /// and the first state file.
    Init {
        /// The version the running group holds.
        #[arg(long)]
        version: String,
        /// The running group (default: abide.group= on the kernel command line, or the block
        /// slot mounted at /).
        #[arg(long)]
        group: Option<String>,
        /// Replace an existing state file (its record of updates and quarantine is lost).
        #[arg(long)]
        force: bool,
    },
}

/// `abide device …`.
pub fn run_device(command: DeviceCommand, config: &Path, out: Output) -> Result<()> {
    match command {
        DeviceCommand::Init {
            version,
            group,
            force,
        } => {
            let version: semver::Version = version
                .parse()
                .with_context(|| format!("--version {version:?} is not SemVer"))?;
            let group = group
                .as_deref()
                .map(abide_core::Group::new)
                .transpose()
                .context("--group")?;
            let config = Config::load(config)?;
            let done = abide_agent::init::init(
                config,
                &abide_agent::init::InitOptions {
                    version,
                    group,
                    force,
                },
            )?;
            out.print(&done, || {
                format!(
                    "set up: group {} runs {} and is known-good; group {} is not bootable until an install",
                    done.group, done.version, done.other
                )
            })?;
            Ok(())
        }
    }
}

/// Opens the device a configuration describes to change it (`busy` while another process
/// changes it).
pub fn open(config: &Path) -> Result<Device> {
    let config = Config::load(config)?;
    Ok(Device::open(config)?)
}

/// [`open`] for an install: a damaged audit log is refused, not repaired.
pub fn open_intact(config: &Path) -> Result<Device> {
    let config = Config::load(config)?;
    Ok(Device::open_intact(config)?)
}

/// Opens the device to change it, waiting for another process to finish first.
pub fn open_waiting(config: &Path) -> Result<Device> {
    let config = Config::load(config)?;
    Ok(Device::open_waiting(config)?)
}

/// Opens the device to look at it: no lock and no write (a read-only state directory works).
pub fn open_read_only(config: &Path) -> Result<Device> {
    let config = Config::load(config)?;
    Ok(Device::open_read_only(config)?)
}

/// `abide install`: the transaction it began and what it read.
#[derive(Serialize)]
struct Installed<'a> {
    transaction: &'a str,
    version: String,
    target: &'a str,
    state: &'static str,
    reboot: bool,
    bundle_bytes_read: u64,
    reused_chunks: u64,
    reused_bytes: u64,
    hooks: &'a [abide_agent::hooks::HookRun],
}

/// `abide boot`: what the boot step did, and the applications it recovered.
#[derive(Serialize)]
struct Booted<'a> {
    #[serde(flatten)]
    outcome: &'a abide_agent::boot::BootOutcome,
    apps: Vec<crate::app::OutcomeView<'a>>,
}

/// `abide mark-good`, `abide mark-bad`, `abide rollback`.
#[derive(Serialize)]
struct Decided<'a> {
    transaction: &'a str,
    state: &'static str,
    reboot: bool,
}

/// `abide log verify`.
#[derive(Serialize)]
struct LogVerified {
    ok: bool,
    records: usize,
    signed: bool,
}

/// `abide install`.
pub fn run_install(
    config: &Path,
    bundle: &Path,
    no_reboot: bool,
    force: bool,
    paranoid: bool,
    gate: abide_core::Gate,
    out: Output,
) -> Result<()> {
    let mut device = open_intact(config)?;
    if paranoid {
        device.config.bundle_checks = abide_bundle::chunks::Checks::Every;
    }
    let mut src: Box<dyn Source> = if bundle.as_os_str() == "-" {
        Box::new(Stream(BufReader::with_capacity(
            1 << 20,
            io::stdin().lock(),
        )))
    } else {
        Box::new(SeekableFile(
            File::open(bundle).with_context(|| format!("opening {}", bundle.display()))?,
        ))
    };
    let force = if force { Force::Yes } else { Force::No };
    let bar = progress(!out.is_json() && io::stderr().is_terminal(), false);
    let done = install(
        &mut device,
        &mut src,
        force,
        gate,
        &Timestamp::now,
        &mut |d, t| {
            bar.set_length(t);
            bar.set_position(d);
        },
    )
    .with_context(|| format!("installing {}", bundle.display()));
    bar.abandon();
    if !bar.is_hidden() {
        eprintln!();
    }
    let done = done?;
    let tx = &done.transaction;
    let reboot = done.reboot && !no_reboot && device.config.reboot.is_some();
    let read = done.bundle_bytes - done.reused.skipped;
    let answer = Installed {
        transaction: &tx.id,
        version: tx.version.to_string(),
        target: tx.target.as_str(),
        state: tx.state.name(),
        reboot,
        bundle_bytes_read: read,
        reused_chunks: done.reused.chunks,
        reused_bytes: done.reused.bytes,
        hooks: &done.hooks,
    };
    out.print(&answer, || {
            let mut text = format!(
                "{} installed into group {} and activated for a trial ({}); {read} bundle bytes read, {} bytes reused from group {}",
                tx.version, tx.target, tx.id, done.reused.bytes, tx.good
            );
            for h in done.hooks.iter().filter(|h| !h.ok) {
                text.push_str(&format!(
                    "\nwarning: the {} hook failed ({}): {}",
                    h.hook, h.ended, h.output
                ));
            }
            text
        },
    )?;
    if reboot {
        device.reboot()?;
    }
    Ok(())
}

/// `abide boot`.
pub fn run_boot(config: &Path, out: Output) -> Result<bool> {
    let mut device = open_waiting(config)?;
    let outcome = boot(&mut device, &SystemClock)?;
    // An application update a power cut interrupted is undone (or its restore finished).
    let apps = abide_agent::app::recover(&mut device, &SystemClock)?;
    let answer = Booted {
        outcome: &outcome,
        apps: apps.iter().map(crate::app::OutcomeView::of).collect(),
    };
    out.print(&answer, || {
        format!(
            "booted {}; transaction {}{}",
            outcome.booted.as_deref().unwrap_or("?"),
            outcome.state.unwrap_or("none"),
            if outcome.reboot { "; rebooting" } else { "" }
        )
    })?;
    if outcome.reboot {
        device.reboot()?;
    }
    Ok(outcome.reboot)
}

/// The status of a device, read from its files (for `abide sim`).
#[cfg(feature = "sim")]
pub fn status_view(device: &Device) -> Result<crate::schedule::StatusView> {
    Ok(crate::schedule::status_view(&abide_agent::api::status(
        device,
    )?))
}

/// `abide status`: from the agent when it runs, else from the device's files.
pub fn run_status(config: &Path, out: Output) -> Result<()> {
    let status = Api::ask(
        config,
        |api| api.call(|mut c| async move { c.status(abide_agent_api::StatusRequest {}).await }),
        || Ok(abide_agent::api::status(&open_read_only(config)?)?),
    )?;
    let view = crate::schedule::status_view(&status);
    out.print(&view, || view.to_string())?;
    Ok(())
}

/// `abide health`: the checks run now, by the agent when it runs, else here.
pub fn run_health(config: &Path, out: Output) -> Result<()> {
    let health = Api::ask(
        config,
        |api| {
            api.call(
                |mut c| async move { c.get_health(abide_agent_api::GetHealthRequest {}).await },
            )
        },
        || {
            Ok(abide_agent::api::health(
                &open_read_only(config)?,
                &SystemClock,
            )?)
        },
    )?;
    out.print(&health, || {
        health
            .checks
            .iter()
            .map(|r| {
                format!(
                    "{} {}: {} {}",
                    if r.critical { "critical" } else { "optional" },
                    r.name,
                    r.outcome,
                    r.detail
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    if !health.healthy {
        return Err(crate::Reported("health checks failed").into());
    }
    Ok(())
}

/// `abide rollback`: through the agent when it runs, else here.
pub fn run_rollback(config: &Path, reason: &str, out: Output) -> Result<()> {
    let Some(mut api) = Api::connect(config)? else {
        return run_decide(config, false, reason, out);
    };
    let reason = reason.to_owned();
    let done = api.call(|mut c| async move {
        c.trigger_rollback(abide_agent_api::TriggerRollbackRequest { reason })
            .await
    })?;
    out.print(&done, || {
        format!("transaction {} is {}", done.transaction, done.state)
    })?;
    Ok(())
}

/// `abide history`: every rollback the audit log records, newest first.
pub fn run_history(config: &Path, out: Output) -> Result<()> {
    let history = Api::ask(
        config,
        |api| {
            api.call(|mut c| async move {
                c.get_rollback_history(abide_agent_api::GetRollbackHistoryRequest {})
                    .await
            })
        },
        || Ok(abide_agent::api::rollback_history(&Config::load(config)?)?),
    )?;
    out.print(&history.rollbacks, || {
        if history.rollbacks.is_empty() {
            return "no rollbacks".to_owned();
        }
        history
            .rollbacks
            .iter()
            .map(|r| {
                let what = if r.app.is_empty() {
                    r.version.clone()
                } else {
                    format!("{} {}", r.app, r.version)
                };
                format!("{} {what} {} {}", r.time, r.transaction, r.reason)
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(())
}

/// `abide mark-good`, `abide mark-bad`, `abide rollback`.
pub fn run_decide(config: &Path, good: bool, reason: &str, out: Output) -> Result<()> {
    let mut device = open(config)?;
    let now = Timestamp::now();
    let (tx, reboot) = if good {
        device.advance(now, "mark good", |tx| tx.mark_good(now))?
    } else {
        device.advance(now, "roll back", |tx| tx.rollback(now, reason))?
    };
    let answer = Decided {
        transaction: &tx.id,
        state: tx.state.name(),
        reboot,
    };
    out.print(&answer, || {
        format!("transaction {} is {}", tx.id, tx.state.name())
    })?;
    if reboot {
        device.reboot()?;
    }
    Ok(())
}

/// A saved audit head (JSON, as `abide log head --json` and `abide fleet audit --head --json`
/// print it): a checkpoint to verify a log against.
pub fn read_audit_head(file: &Path) -> Result<abide_fleet_json::AuditHead> {
    let bytes = abide_fs::persist::read_bounded(file, 64 << 10)?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not an audit head (seq, hash, key, signature)",
            file.display()
        )
    })
}

/// `abide log`, `abide log verify [--against FILE]` and `abide log head`.
pub fn run_log(config: &Path, command: Option<LogCommand>, out: Output) -> Result<()> {
    let config = Config::load(config)?;
    let path = config.state_dir.join("audit.log");
    match command {
        Some(LogCommand::Verify { against }) => {
            let records = match against {
                Some(file) => AuditLog::verify_against(&path, &read_audit_head(&file)?)?,
                None => AuditLog::verify(&path)?,
            };
            let signed = AuditLog::is_signed(&path)?;
            let answer = LogVerified {
                ok: true,
                records: records.len(),
                signed,
            };
            out.print(&answer, || {
                    if signed {
                        format!("ok: {} records, hash chain and signed head intact", records.len())
                    } else {
                        format!(
                            "ok: {} records, hash chain intact; the head is not signed yet (the device key is made once the kernel's random source is ready)",
                            records.len()
                        )
                    }
                },
            )?;
            return Ok(());
        }
        Some(LogCommand::Head) => {
            let head = AuditLog::head(&path)?;
            out.print(&head, || {
                format!(
                    "record {} {} (device key {})",
                    head.seq, head.hash, head.key
                )
            })?;
            return Ok(());
        }
        None => {}
    }
    let records = AuditLog::verify(&path)?;
    out.print(&records, || {
        records
            .iter()
            .map(|r| {
                format!(
                    "{:>4} {} {:<9} {}",
                    r.seq,
                    r.time,
                    r.event,
                    Value::Object(r.details.clone())
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok(())
}

/// A bundle file: a source that passes over chunks by seeking.
pub struct SeekableFile(pub File);

impl Read for SeekableFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Source for SeekableFile {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let here = self.0.stream_position()?;
        let end = self.0.seek(SeekFrom::End(0))?;
        let to = here.saturating_add(n).min(end);
        self.0.seek(SeekFrom::Start(to))?;
        Ok(to - here)
    }
}

/// A progress bar on standard error, for terminals only (not with `--json`, not when standard
/// error is a file or a pipe): `{msg}` if given, then bytes, rate and time left.
pub fn progress(on: bool, msg: bool) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        None,
        indicatif::ProgressDrawTarget::stderr_with_hz(10),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(if msg {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
        } else {
            "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
        })
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}
