//! The `abide` command: argument parsing and glue over the Abide libraries.
//!
//! Exit codes: 0 success; 1 a check refused the input (the error names it); 2 the command line
//! is wrong; 3 anything else (a file could not be read or written, …); 4 an application
//! update ran and ended on the previous release (failed or rolled back).

mod agent;
mod app;
mod bundle;
mod delta;
mod device;
#[cfg(feature = "admin")]
mod fleet;
mod key;
mod schedule;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "sim")]
mod sim;
mod trust;

use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Abide: all-or-nothing software updates for machines nobody can walk up to.
#[derive(Parser)]
#[command(name = "abide", version, about)]
struct Cli {
    /// Print machine-readable JSON on standard output (errors too).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    config: device::ConfigArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signing keys.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Trust roots: which keys sign bundles, and their rotation.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// Bundles: create, sign, inspect, verify, extract.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Deltas: a bundle expressed against the release the devices run, byte by byte.
    #[command(subcommand)]
    Delta(delta::DeltaCommand),
    /// The fleet server: releases, devices, rollouts, audit trail.
    #[cfg(feature = "server")]
    Server(server::ServerArgs),
    /// The fleet server's admin commands, and the fleet simulator.
    #[cfg(feature = "admin")]
    Fleet(fleet::FleetArgs),
    /// The device agent: enrols with the fleet server of `[server]` in system.toml, checks in,
    /// downloads assigned releases straight into the target group, activates them in the
    /// maintenance window under a reboot lease, and reports every step; carries out the
    /// updates scheduled on the device; serves the local API (`[api]`).
    Agent(agent::AgentArgs),
    /// Install a bundle into the group that is not the known-good one and activate it; a
    /// bundle of an application (`[[app]]`) is installed on its directory slot to its commit
    /// or rollback, without a reboot.
    Install {
        /// The bundle (`-` reads standard input).
        bundle: PathBuf,
        /// Do not run the reboot command after activating.
        #[arg(long)]
        no_reboot: bool,
        /// Install even a quarantined or older version (never below the security counter).
        #[arg(long)]
        force: bool,
        /// Hash every chunk's content and every component too, not only the signed stored
        /// bytes (as `paranoid = true` in system.toml).
        #[arg(long)]
        paranoid: bool,
        /// The trial waits for `abide mark-good` or `abide mark-bad` instead of the health
        /// gate (the bootloader's boot counter still ends a trial that does not come up).
        #[arg(long)]
        no_auto_rollback: bool,
    },
    /// The boot-time step: advance the transaction after a boot and run the health gate.
    Boot,
    /// The device's groups, version and transaction.
    Status,
    /// Run the health checks once and show the results.
    Health,
    /// Commit the trial by hand.
    MarkGood,
    /// Declare the trial bad: roll back to the known-good group.
    MarkBad,
    /// Roll an activated or trial transaction back to the known-good group.
    Rollback {
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "operator request")]
        reason: String,
    },
    /// Every rollback on this device, with its reason, newest first.
    History,
    /// The agent's metrics (Prometheus text; with --json, {"text": ...}).
    Metrics,
    /// The watchdog of a self-update: started by the agent from its previous binary, it keeps
    /// the new agent if it answers on its API socket in time, else puts the previous one back
    /// and runs it.
    #[command(hide = true)]
    SelfUpdateWatch,
    /// Before the agent starts (the systemd unit's ExecStartPre): a self-update whose new
    /// agent is gone without a verdict is failed and the previous binary put back.
    #[command(hide = true)]
    SelfUpdateRecover,
    /// Updates scheduled on the device through the agent: from a URL or a file, now, at a
    /// time or in the next maintenance window.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// The audit log.
    Log {
        #[command(subcommand)]
        command: Option<device::LogCommand>,
    },
    /// Applications updated on directory slots without a reboot (`[[app]]`).
    #[command(subcommand)]
    App(app::AppCommand),
    /// Backups of the applications' data: list them, put one back.
    #[command(subcommand)]
    Backup(app::BackupCommand),
    /// Simulated devices.
    #[cfg(feature = "sim")]
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Set up a real device.
    #[command(subcommand)]
    Device(device::DeviceCommand),
}

/// Where output goes: human text or one JSON document.
#[derive(Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// Whether output is JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `value` as JSON (straight from its type), or `text` for people.
    pub fn print<T: serde::Serialize + ?Sized>(
        &self,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            let text = text();
            if !text.is_empty() {
                println!("{text}");
            }
        }
        Ok(())
    }
}

/// `--json` when a command failed: `{"ok": false, "error": {"code", "message"}}`.
#[derive(serde::Serialize)]
struct Failure<'a> {
    ok: bool,
    error: FailureError<'a>,
}

#[derive(serde::Serialize)]
struct FailureError<'a> {
    code: &'a str,
    message: &'a str,
}

/// `result`, an I/O operation `op` on `path`, with an error that names both
/// (`opening /x: No such file or directory`).
pub fn on_file<T>(
    op: &str,
    path: &std::path::Path,
    result: std::io::Result<T>,
) -> anyhow::Result<T> {
    anyhow::Context::with_context(result, || format!("{op} {}", path.display()))
}

/// `abide self-update-recover` and `abide app recover`: what was finished or undone.
#[derive(serde::Serialize)]
pub struct Recovered<T> {
    /// One entry per transaction recovered.
    pub recovered: T,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    let config = cli.config.config.as_path();
    let result = match cli.command {
        Command::Key(c) => key::run(c, out),
        Command::Trust(c) => trust::run(c, out),
        Command::Bundle(c) => bundle::run(c, out),
        Command::Delta(c) => delta::run(c, out),
        Command::Install {
            bundle,
            no_reboot,
            force,
            paranoid,
            no_auto_rollback,
        } => {
            let gate = if no_auto_rollback {
                abide_core::Gate::Manual
            } else {
                abide_core::Gate::Automatic
            };
            if bundle.as_os_str() != "-" && app::is_app_bundle(config, &bundle) {
                app::run_install(config, &bundle, force, paranoid, out)
            } else {
                device::run_install(config, &bundle, no_reboot, force, paranoid, gate, out)
            }
        }
        Command::Boot => device::run_boot(config, out).map(|_| ()),
        Command::Status => device::run_status(config, out),
        Command::Health => device::run_health(config, out),
        Command::MarkGood => device::run_decide(config, true, "", out),
        Command::MarkBad => device::run_decide(config, false, "marked bad by an operator", out),
        Command::Rollback { reason } => device::run_rollback(config, &reason, out),
        Command::History => device::run_history(config, out),
        Command::Metrics => schedule::run_metrics(config, out),
        Command::SelfUpdateRecover => abide_agent::config::Config::load(config)
            .and_then(|c| abide_agent::selfupdate::recover(&c))
            .map_err(anyhow::Error::from)
            .and_then(|done| out.print(&Recovered { recovered: done }, String::new)),
        Command::SelfUpdateWatch => {
            init_logging();
            abide_agent::config::Config::load(config)
                .and_then(|c| abide_agent::selfupdate::watch(&c))
                .map_err(Into::into)
        }
        Command::Schedule(c) => schedule::run(c, config, out),
        Command::Log { command } => device::run_log(config, command, out),
        Command::App(c) => app::run_app(c, config, out),
        Command::Backup(c) => app::run_backup(c, config, out),
        #[cfg(feature = "sim")]
        Command::Sim(c) => sim::run(c, out),
        Command::Device(c) => device::run_device(c, config, out),
        Command::Agent(a) => agent::run(a, config, out),
        #[cfg(feature = "server")]
        Command::Server(a) => server::run(a, out),
        #[cfg(feature = "admin")]
        Command::Fleet(a) => fleet::run(a, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err, out),
    }
}

/// Logs to standard error; `ABIDE_LOG=debug|info|warn|error` (default info).
pub fn init_logging() {
    use tracing_subscriber::filter::LevelFilter;
    let max = match std::env::var("ABIDE_LOG").as_deref() {
        Ok("debug") => LevelFilter::DEBUG,
        Ok("warn") => LevelFilter::WARN,
        Ok("error") => LevelFilter::ERROR,
        _ => LevelFilter::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(max)
        .with_writer(std::io::stderr)
        .try_init();
}

/// An error whose result was already printed as the command's JSON (`abide health` with a
/// failing check): only the line on standard error and the exit code follow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Reported(pub &'static str);

/// Prints the error as one line on standard error (and as JSON with `--json`) and picks the
/// exit code: 1 when a check refused the input, 3 otherwise.
fn report(err: &anyhow::Error, out: Output) -> ExitCode {
    let bundle = err
        .chain()
        .find_map(|e| e.downcast_ref::<abide_bundle::Error>())
        .map(|e| (e.code(), e.code() != "io"));
    let agent = err
        .chain()
        .find_map(|e| e.downcast_ref::<abide_agent::AgentError>())
        .map(|e| (e.code(), e.is_refusal()));
    let api = err
        .chain()
        .find_map(|e| e.downcast_ref::<schedule::ApiRefusal>())
        .map(|e| (e.code, e.is_refusal()));
    let agent = api.or(agent);
    let check = agent.or(bundle).filter(|(_, refusal)| *refusal);
    let code = agent.or(bundle).map_or("error", |(code, _)| code);
    let message = format!("{err:#}").replace('\n', " ");
    eprintln!("abide: error [{code}]: {message}");
    let reported =
        err.downcast_ref::<Reported>().is_some() || err.chain().any(|e| e.is::<Reported>());
    if out.json && !reported {
        let failure = Failure {
            ok: false,
            error: FailureError {
                code,
                message: &message,
            },
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&failure).expect("plain data serializes")
        );
    }
    let ended = matches!(code, "app-failed" | "app-rolled-back");
    ExitCode::from(if ended {
        4
    } else if check.is_some() {
        1
    } else {
        3
    })
}
