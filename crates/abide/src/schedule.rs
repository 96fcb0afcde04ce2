//! The agent's local API from the command line: `abide schedule …`, and `abide status`,
//! `abide health`, `abide rollback`, `abide history` through the agent's socket when it runs
//! (read from the device's files directly when it does not; scheduling needs the agent).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use abide_agent::config::Config;
use abide_agent_api as pb;
use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::Output;

/// `abide schedule …`.
#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Schedule an update from a URL or a file on the device.
    Update {
        /// An http:// or https:// URL, or a path to a bundle on the device.
        #[arg(long)]
        source: String,
        /// The SHA-256 the bundle file must have (64 hex digits).
        #[arg(long)]
        sha256: Option<String>,
        /// Start at this time (RFC 3339, such as 2026-12-24T02:00:00Z) instead of now.
        #[arg(long, conflicts_with = "in_window")]
        at: Option<String>,
        /// Start in the device's next maintenance window (`[[window]]` in system.toml).
        #[arg(long)]
        in_window: bool,
        /// The trial waits for `abide mark-good` or `abide mark-bad` instead of the health
        /// gate.
        #[arg(long)]
        no_auto_rollback: bool,
    },
    /// One schedule: ID, or else the one in progress (or the newest).
    Status {
        /// The schedule's id (`s1`, …).
        id: Option<String>,
    },
    /// Every schedule the device keeps, newest first.
    List,
    /// Cancel a pending schedule, or one in progress before activation (its download stops;
    /// the target stays unbootable).
    Cancel {
        /// The schedule's id.
        id: String,
    },
    /// Follow a schedule's download, install and state changes until it ends.
    Watch {
        /// The schedule's id.
        id: String,
    },
}

/// An error the agent answered with: `code` names the gRPC status (`invalid-argument`,
/// `not-found`, `failed-precondition`: the request was refused and nothing changed; `busy`:
/// the device is busy, try again), or `agent-not-running`; or, for `abide schedule watch`, how
/// the watched schedule ended when it did not complete (`schedule-failed`,
/// `schedule-rolled-back`, `schedule-cancelled`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiRefusal {
    /// The code `abide` prints.
    pub code: &'static str,
    /// What the agent said.
    pub message: String,
}

impl ApiRefusal {
    fn of(status: &tonic::Status) -> ApiRefusal {
        let code = match status.code() {
            tonic::Code::InvalidArgument => "invalid-argument",
            tonic::Code::NotFound => "not-found",
            tonic::Code::FailedPrecondition => "failed-precondition",
            tonic::Code::Unavailable => "busy",
            _ => "agent",
        };
        ApiRefusal {
            code,
            message: status.message().to_owned(),
        }
    }

    /// Whether the request was refused (exit code 1) rather than failed (3).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.code,
            "invalid-argument" | "not-found" | "failed-precondition"
        ) || self.code.starts_with("schedule-")
    }
}

/// The agent's API over its socket.
pub struct Api {
    rt: tokio::runtime::Runtime,
    client: pb::Client,
}

impl Api {
    /// Connects to the agent of the device `config` describes; `None` when no agent runs
    /// (no socket, or nobody listening on it).
    pub fn connect(config: &Path) -> Result<Option<Api>> {
        let socket = socket(config)?;
        if !socket.exists() {
            return Ok(None);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")?;
        let client = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                pb::transport::connect_unix(&socket),
            )
            .await
        });
        match client {
            Ok(Ok(client)) => Ok(Some(Api { rt, client })),
            Ok(Err(pb::ApiError::Io { source, .. }))
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Ok(Err(e)) => Err(ApiRefusal {
                code: "agent",
                message: format!("the agent at {} did not answer: {e}", socket.display()),
            }
            .into()),
            Err(_) => Err(ApiRefusal {
                code: "agent",
                message: format!("the agent at {} does not answer", socket.display()),
            }
            .into()),
        }
    }

    /// A question that only reads: asked of the agent when it runs, answered from the device's
    /// own files when no agent runs or when the agent goes away before it answers (it restarts
    /// after an update, a self-update or a reboot of a simulated device). A refusal stands.
    pub fn ask<T>(
        config: &Path,
        agent: impl FnOnce(&mut Api) -> Result<T>,
        files: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if let Ok(Some(mut api)) = Api::connect(config) {
            match agent(&mut api) {
                Ok(answer) => return Ok(answer),
                Err(e)
                    if e.downcast_ref::<ApiRefusal>()
                        .is_some_and(|r| !r.is_refusal()) => {}
                Err(e) => return Err(e),
            }
        }
        files()
    }

    /// Connects, or says clearly that the agent is not running.
    pub fn require(config: &Path) -> Result<Api> {
        match Api::connect(config)? {
            Some(api) => Ok(api),
            None => Err(ApiRefusal {
                code: "agent-not-running",
                message: format!(
                    "the agent is not running (no one answers on {}): start it (`systemctl start abide-agent`, or `abide agent`)",
                    socket(config)?.display()
                ),
            }
            .into()),
        }
    }

    /// Runs one call.
    pub fn call<T, F>(&mut self, f: impl FnOnce(pb::Client) -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        match self.rt.block_on(f(client)) {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(ApiRefusal::of(&s).into()),
        }
    }
}

/// The API socket the configuration names.
fn socket(config: &Path) -> Result<PathBuf> {
    Ok(Config::load(config)?.api.socket)
}

fn schedule_line(s: &pb::Schedule) -> String {
    let mut line = format!("{} {} {} {}", s.id, s.state, s.source_kind, s.source);
    if !s.version.is_empty() {
        line.push_str(&format!(" version {}", s.version));
    }
    match s.when.as_str() {
        "at" => line.push_str(&format!(" at {}", s.at)),
        "in-window" => line.push_str(" in the next window"),
        _ => {}
    }
    if s.origin == "fleet" {
        line.push_str(&format!(" (rollout {})", s.rollout));
    }
    if !s.reason.is_empty() {
        line.push_str(&format!(": {}", s.reason));
    }
    line
}

/// `abide schedule …`.
pub fn run(command: ScheduleCommand, config: &Path, out: Output) -> Result<()> {
    let mut api = Api::require(config)?;
    match command {
        ScheduleCommand::Update {
            source,
            sha256,
            at,
            in_window,
            no_auto_rollback,
        } => {
            // A relative path means the caller's directory; the agent needs it whole.
            let source = if source.contains("://") || source.starts_with('/') {
                source
            } else {
                std::path::absolute(&source)
                    .with_context(|| format!("--source {source:?}"))?
                    .to_string_lossy()
                    .into_owned()
            };
            let request = pb::ScheduleUpdateRequest {
                source,
                sha256: sha256.unwrap_or_default(),
                at: at.unwrap_or_default(),
                in_window,
                no_auto_rollback,
            };
            let s = api.call(|mut c| async move { c.schedule_update(request).await })?;
            out.print(&s, || format!("scheduled {}", schedule_line(&s)))?;
        }
        ScheduleCommand::Status { id } => {
            let s =
                match id {
                    Some(id) => api.call(|mut c| async move {
                        c.get_schedule(pb::GetScheduleRequest { id }).await
                    })?,
                    None => {
                        let all = api.call(|mut c| async move {
                            c.list_schedules(pb::ListSchedulesRequest {}).await
                        })?;
                        all.schedules
                            .iter()
                            .find(|s| s.state == "in_progress")
                            .or(all.schedules.first())
                            .cloned()
                            .context("the device has no schedules")?
                    }
                };
            out.print(&s, || schedule_line(&s))?;
        }
        ScheduleCommand::List => {
            let all = api
                .call(|mut c| async move { c.list_schedules(pb::ListSchedulesRequest {}).await })?;
            out.print(&all.schedules, || {
                all.schedules
                    .iter()
                    .map(schedule_line)
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        ScheduleCommand::Cancel { id } => {
            let s = api.call(|mut c| async move {
                c.cancel_schedule(pb::CancelScheduleRequest { id }).await
            })?;
            out.print(&s, || format!("cancelled {}", schedule_line(&s)))?;
        }
        ScheduleCommand::Watch { id } => watch(&mut api, id, out)?,
    }
    Ok(())
}

/// `abide schedule watch ID`: a progress bar on a terminal, a line per change otherwise, a
/// JSON line per event with `--json`. Exits 0 when the schedule completes (or its target was
/// activated and the device restarts into it), 1 when it fails, rolls back or is cancelled.
fn watch(api: &mut Api, id: String, out: Output) -> Result<()> {
    let bar_on = !out.is_json() && std::io::stderr().is_terminal();
    let bar = crate::device::progress(bar_on, true);
    let mut last: Option<pb::ProgressEvent> = None;
    let rt = &api.rt;
    let mut client = api.client.clone();
    let result: Result<()> = rt.block_on(async {
        let mut stream = client
            .watch_progress(pb::WatchProgressRequest {
                schedule: id.clone(),
            })
            .await
            .map_err(|s| ApiRefusal::of(&s))?
            .into_inner();
        let mut said = String::new();
        loop {
            match stream.message().await {
                Ok(Some(e)) => {
                    let phase = if e.transaction_state.is_empty() {
                        e.state.clone()
                    } else {
                        format!("{} ({})", e.state, e.transaction_state)
                    };
                    if out.is_json() {
                        println!("{}", serde_json::to_string(&e).expect("plain data"));
                    } else if bar_on {
                        bar.set_message(phase.clone());
                        if e.total > 0 {
                            bar.set_length(e.total);
                            bar.set_position(e.bytes);
                        }
                    } else if phase != said {
                        println!("{} {phase}", e.schedule);
                        said = phase;
                    }
                    last = Some(e);
                }
                Ok(None) => return Ok(()),
                // The agent went away: the device restarts after an activation.
                Err(s)
                    if s.code() == tonic::Code::Unknown || s.code() == tonic::Code::Unavailable =>
                {
                    return Ok(());
                }
                Err(s) => return Err(ApiRefusal::of(&s).into()),
            }
        }
    });
    bar.finish_and_clear();
    result?;
    let Some(e) = last else {
        bail!("no progress from the agent");
    };
    if !out.is_json() {
        let mut text = format!("{} {}", e.schedule, e.state);
        if e.transaction_state == "activated" {
            text.push_str(": activated; the device restarts into the new version for its trial");
        }
        if !e.reason.is_empty() {
            text.push_str(&format!(": {}", e.reason));
        }
        println!("{text}");
    }
    match (e.state.as_str(), e.transaction_state.as_str()) {
        ("completed", _) | ("in_progress", "activated" | "trial") => Ok(()),
        (state, _) if abide_agent::api::service::is_terminal(state) => {
            let code = match state {
                "cancelled" => "schedule-cancelled",
                "rolled_back" => "schedule-rolled-back",
                _ => "schedule-failed",
            };
            let mut message = format!("schedule {} ended {state}", e.schedule);
            if !e.reason.is_empty() {
                message.push_str(&format!(": {}", e.reason));
            }
            // The events (the last one with the state) are the command's output already.
            Err(anyhow::Error::new(ApiRefusal { code, message })
                .context(crate::Reported("abide schedule watch")))
        }
        _ => bail!(
            "the agent stopped answering while schedule {} was {}",
            e.schedule,
            e.state
        ),
    }
}

/// `abide metrics`: the agent's metrics.
pub fn run_metrics(config: &Path, out: Output) -> Result<()> {
    let mut api = Api::require(config)?;
    let m = api.call(|mut c| async move { c.get_metrics(pb::GetMetricsRequest {}).await })?;
    out.print(&m, || m.text.trim_end().to_owned())?;
    Ok(())
}

/// `abide status` as JSON: the keys it always had (null where there is nothing), plus the
/// schedule in progress and the agent's version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusView {
    /// The group booted.
    pub booted: Option<String>,
    /// The known-good group.
    pub good: Option<String>,
    /// The last transaction's state (`idle` without one).
    pub state: String,
    /// The committed version.
    pub version: String,
    /// The security counter.
    pub security_version: u64,
    /// The current or last transaction.
    pub transaction: Option<String>,
    /// Versions rolled back here.
    pub quarantine: Vec<String>,
    /// The schedule in progress.
    pub schedule: Option<String>,
    /// Whether the device checks in with a fleet.
    pub fleet: bool,
    /// The agent that answered, if one did.
    pub agent: Option<AgentView>,
    /// The transaction's target group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The version it installs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Why it failed or rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The running agent that answered `abide status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentView {
    /// Its version.
    pub version: String,
    /// Its process.
    pub pid: u32,
    /// When it started.
    pub started: String,
}

/// The status as `abide status` shows it.
pub fn status_view(s: &pb::Status) -> StatusView {
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    let in_transaction = !s.transaction.is_empty();
    StatusView {
        booted: opt(&s.booted),
        good: opt(&s.good),
        state: s.state.clone(),
        version: s.version.clone(),
        security_version: s.security_version,
        transaction: opt(&s.transaction),
        quarantine: s.quarantine.clone(),
        schedule: opt(&s.schedule),
        fleet: s.fleet,
        agent: (s.pid != 0).then(|| AgentView {
            version: s.agent_version.clone(),
            pid: s.pid,
            started: s.started.clone(),
        }),
        target: in_transaction.then(|| s.target.clone()),
        target_version: in_transaction.then(|| s.target_version.clone()),
        reason: opt(&s.reason),
    }
}

impl std::fmt::Display for StatusView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".to_owned());
        write!(
            f,
            "running {} on group {} (known-good {}); transaction: {}",
            self.version,
            or(&self.booted),
            or(&self.good),
            self.state
        )?;
        if let Some(r) = &self.reason {
            write!(f, " ({r})")?;
        }
        if let Some(s) = &self.schedule {
            write!(f, "; schedule {s} in progress")?;
        }
        Ok(())
    }
}
