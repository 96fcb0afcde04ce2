//! `abide fleet`: the fleet server's admin commands and the fleet simulator.

use std::path::PathBuf;

use abide_client::AdminClient;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::Output;

mod show;

/// `abide fleet` arguments.
#[derive(Args)]
pub struct FleetArgs {
    /// The server, `http://host:port`.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8440")]
    server: String,
    /// A file holding the admin token (the server writes DATA/admin.token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// For an https:// server: the CA certificate (PEM) that vouches for it (default: the
    /// system's roots).
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Releases.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Enrolment tokens.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(TokenCommand),
    /// Admin tokens with a role: viewer (reads), operator (rollouts, devices), admin
    /// (everything: releases, tokens, groups, trust, roles).
    #[command(subcommand, name = "admin-token")]
    AdminToken(AdminTokenCommand),
    /// One device.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Enrolled devices.
    Devices {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
    },
    /// Rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Group settings: lease limits and the maintenance window.
    #[command(subcommand)]
    Group(GroupCommand),
    /// The fleet's trust root: publish its successor, which devices take at their next
    /// check-in.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// The audit trail.
    Audit {
        /// Check the hash chain and the head's signature by the server instead of listing it.
        #[arg(long)]
        verify: bool,
        /// With --verify: also check that the trail still holds this checkpoint (a head saved
        /// from `abide fleet audit --head --json`): finds a rewrite by someone who holds the
        /// server's key.
        #[arg(long, value_name = "FILE", requires = "verify")]
        against: Option<PathBuf>,
        /// Print the trail's head, signed by the server (a checkpoint to keep elsewhere).
        #[arg(long, conflicts_with = "verify")]
        head: bool,
    },
    /// A load generator: many simulated devices in one process whose outcomes are synthetic.
    ///
    /// They enrol, check in, verify assignments, take leases and report through the same
    /// decisions and transaction engine as real devices, but install nothing: a trial commits
    /// or rolls back by a random draw (--fail-rate). For devices that really install, boot and
    /// run their health gate, use `abide sim init --server` and `abide sim run`. Not in the
    /// device build.
    #[cfg(feature = "simulate")]
    Simulate {
        /// The enrolment token they use.
        #[arg(long)]
        enroll_token: String,
        /// How many.
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Their product.
        #[arg(long, default_value = "acme-gateway")]
        product: String,
        /// Their hardware id.
        #[arg(long, default_value = "acme-gw")]
        compatible: String,
        /// The version they run at first.
        #[arg(long, default_value = "1.0.0")]
        version: String,
        /// Probability that an update rolls back, as 0.1 or 10%.
        #[arg(long, default_value = "0")]
        fail_rate: String,
        /// Time between a device's check-ins (5, 5s, 500ms; 0: as fast as answered).
        #[arg(long, default_value = "5s")]
        poll: String,
        /// How long to run (30s, 10m, …).
        #[arg(long, default_value = "60s")]
        duration: String,
        /// Device ids are PREFIX-N.
        #[arg(long, default_value = "sim")]
        prefix: String,
        /// Stop once every device committed this version or rolled it back.
        #[arg(long)]
        until_version: Option<String>,
        /// Write every report sent (the ledger) to this file as JSON.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Upload a bundle (the server verifies it against the fleet trust root).
    Upload {
        /// The bundle file.
        file: PathBuf,
    },
    /// List releases.
    List,
    /// Have the server make the delta from one release to another (it makes them by itself
    /// after each upload from the releases its devices run).
    Delta {
        /// The release devices run (id).
        #[arg(long)]
        from: String,
        /// The release to update them to (id).
        #[arg(long)]
        to: String,
    },
    /// Upload a delta made elsewhere (`abide delta create`): the server checks it against
    /// the two releases it names, then offers it like one it made.
    #[command(name = "delta-upload")]
    DeltaUpload {
        /// The delta file.
        file: PathBuf,
    },
    /// The deltas to a release, and which of them devices are given.
    Deltas {
        /// The release (id).
        release: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create an enrolment token.
    Create {
        /// The group devices join.
        #[arg(long)]
        group: String,
        /// Tags they get (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// How long it is valid (7d by default).
        #[arg(long)]
        expires: Option<String>,
        /// How many devices may enrol with it (1 by default).
        #[arg(long)]
        uses: Option<u64>,
        /// The only device ids it enrols (repeatable).
        #[arg(long = "device-id")]
        device_ids: Vec<String>,
        /// A pattern device ids must match (`*` any run, `?` one character).
        #[arg(long)]
        device_id_pattern: Option<String>,
        /// The product devices must be.
        #[arg(long)]
        product: Option<String>,
    },
    /// List the enrolment tokens (without their secrets).
    List,
    /// Revoke an enrolment token: it enrols no more devices.
    Revoke {
        /// The token's id (t-…).
        id: String,
    },
}

#[derive(Subcommand)]
enum AdminTokenCommand {
    /// Create an admin token (its secret is printed once).
    Create {
        /// Who or what holds it; the audit trail names its actions `token:ID`.
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: abide_fleet_json::Role,
    },
    /// List the admin tokens made here (without their secrets).
    List,
    /// Revoke an admin token: every server process refuses it from the next request, and its
    /// web sessions end.
    Revoke {
        /// The token's id (at-…).
        id: String,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Revoke a device's credential: every server process refuses it within seconds.
    Revoke {
        /// The device id.
        id: String,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Create a rollout.
    Create {
        /// The release id.
        #[arg(long)]
        release: String,
        /// Stages, as 5:24h,25:24h,100.
        #[arg(long)]
        stages: String,
        /// Failure threshold, as 10%.
        #[arg(long, default_value = "10%")]
        failure_threshold: String,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Only devices with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// After how long an unfinished device counts as failed (4h by default).
        #[arg(long)]
        unresponsive_after: Option<String>,
        /// Stage every targeted device first, and activate (stage by stage) only once this
        /// share of them is staged, as 80%.
        #[arg(long)]
        prestage: Option<String>,
    },
    /// A rollout's status with per-stage counts.
    Status {
        /// The rollout id.
        id: String,
    },
    /// List rollouts.
    List,
    /// Pause a rollout.
    Pause {
        /// The rollout id.
        id: String,
    },
    /// Resume a paused rollout (accepting the failures that paused it).
    Resume {
        /// The rollout id.
        id: String,
    },
    /// Start the next stage now (skipping the soak).
    Advance {
        /// The rollout id.
        id: String,
    },
    /// Stop giving the release to more devices.
    Abort {
        /// The rollout id.
        id: String,
    },
    /// Fleet-wide rollback: trials roll back, committed devices get the previous release.
    Rollback {
        /// The rollout id.
        id: String,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Publish the next trust root (version N+1, signed by a threshold of version N's keys and
    /// of its own, as `abide trust rotate` makes it).
    Publish {
        /// The trust root file.
        file: PathBuf,
    },
    /// The current trust root: version, threshold and key ids.
    Show,
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Set a group's lease limits and maintenance window.
    Set {
        /// The group.
        group: String,
        /// At most this many devices updating at once.
        #[arg(long)]
        max_unavailable: Option<u32>,
        /// At least this many healthy devices stay up.
        #[arg(long)]
        quorum: Option<u32>,
        /// The window, as sat,sun@02:00-04:00/Europe/Berlin.
        #[arg(long)]
        window: Option<String>,
    },
    /// A group's settings, members and leases.
    Show {
        /// The group.
        group: String,
    },
}

fn parse_window(text: &str) -> Result<abide_fleet_json::GroupWindow> {
    let bad = || {
        anyhow::anyhow!(
            "--window {text:?}: expected DAYS@HH:MM-HH:MM/ZONE, as sat,sun@02:00-04:00/Europe/Berlin"
        )
    };
    let (days, rest) = text.split_once('@').ok_or_else(bad)?;
    let (times, zone) = rest.split_once('/').ok_or_else(bad)?;
    let (start, end) = times.split_once('-').ok_or_else(bad)?;
    Ok(abide_fleet_json::GroupWindow {
        days: days.split(',').map(str::to_owned).collect(),
        start: start.to_owned(),
        end: end.to_owned(),
        zone: zone.to_owned(),
    })
}

/// Runs an `abide fleet` command.
pub fn run(args: FleetArgs, out: Output) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args, out))
}

/// `abide fleet simulate`: the run's summary, marked as synthetic (nothing was installed).
#[cfg(feature = "simulate")]
#[derive(serde::Serialize)]
struct Simulated<'a> {
    synthetic: bool,
    #[serde(flatten)]
    summary: &'a abide_client::simulate::Summary,
}

async fn run_async(args: FleetArgs, out: Output) -> Result<()> {
    #[cfg(feature = "simulate")]
    {
        if let FleetCommand::Simulate {
            enroll_token,
            devices,
            product,
            compatible,
            version,
            fail_rate,
            poll,
            duration,
            prefix,
            until_version,
            ledger,
        } = args.command
        {
            let fail_rate = if fail_rate.trim().ends_with('%') {
                f64::from(abide_core::rollout::parse_percent(&fail_rate)?) / 10_000.0
            } else {
                fail_rate
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| (0.0..=1.0).contains(f))
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--fail-rate {fail_rate:?}: expected 0 to 1, or a percentage as 10%"
                        )
                    })?
            };
            let poll = abide_core::duration::parse(&poll)
                .with_context(|| format!("--poll {poll:?}"))?
                .as_secs_f64();
            let duration = abide_core::duration::parse(&duration)
                .with_context(|| format!("--duration {duration:?}"))?;
            let summary = abide_client::simulate::run(abide_client::simulate::Options {
                server: args.server,
                enroll_token,
                devices,
                product,
                compatible,
                version,
                fail_rate,
                poll,
                duration,
                prefix,
                stop_at_version: until_version,
            })
            .await?;
            if let Some(path) = ledger {
                crate::on_file(
                    "writing",
                    &path,
                    std::fs::write(&path, serde_json::to_vec_pretty(&summary.ledger)?),
                )?;
            }
            let answer = Simulated {
                synthetic: true,
                summary: &summary,
            };
            out.print(&answer, || {
                format!(
                    "synthetic outcomes (nothing installed): {} devices, {:.1} s: {} check-ins ({:.0}/s), {} reports, {} committed, {} rolled back, {} lease refusals, {} errors{}",
                    summary.enrolled,
                    summary.seconds,
                    summary.checkins,
                    summary.checkins_per_second,
                    summary.reports,
                    summary.committed,
                    summary.rolled_back,
                    summary.lease_refusals,
                    summary.errors,
                    summary.error_samples.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
                )
            })?;
            return Ok(());
        }
    }
    let token_file = args
        .token_file
        .context("admin commands need --token-file (the server writes DATA/admin.token)")?;
    let token = crate::on_file("reading", &token_file, std::fs::read_to_string(&token_file))?;
    let http = abide_client::tls::http_client(&args.server, args.ca_file.as_deref(), None)?;
    let admin = abide_client::AdminClient::with_client(http, &args.server, &token);
    match args.command {
        #[cfg(feature = "simulate")]
        FleetCommand::Simulate { .. } => unreachable!("handled above"),
        FleetCommand::Release(cmd) => release(&admin, cmd, &out).await,
        FleetCommand::Trust(cmd) => trust(&admin, cmd, &out).await,
        FleetCommand::EnrollToken(cmd) => enroll_token(&admin, cmd, &out).await,
        FleetCommand::AdminToken(cmd) => admin_token(&admin, cmd, &out).await,
        FleetCommand::Device(DeviceCommand::Revoke { id }) => {
            let r: abide_fleet_json::DeviceRevoked = admin
                .post(
                    &format!("/api/v1/devices/{id}/revoke"),
                    &serde_json::json!({}),
                )
                .await?;
            out.answer(&r)
        }
        FleetCommand::Devices { group, state } => {
            let query: Vec<String> = [("group", group), ("state", state)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                .collect();
            let path = if query.is_empty() {
                "/api/v1/devices".to_owned()
            } else {
                format!("/api/v1/devices?{}", query.join("&"))
            };
            let r: Vec<abide_fleet_json::DeviceView> = admin.get(&path).await?;
            out.table(&r)
        }
        FleetCommand::Rollout(cmd) => rollout(&admin, cmd, &out).await,
        FleetCommand::Group(cmd) => group(&admin, cmd, &out).await,
        FleetCommand::Audit {
            verify,
            against,
            head,
        } => audit(&admin, verify, against, head, &out).await,
    }
}

/// A file's bytes, for an upload.
fn read(file: &std::path::Path) -> Result<Vec<u8>> {
    crate::on_file("reading", file, std::fs::read(file))
}

/// `abide fleet release …`.
async fn release(admin: &AdminClient, cmd: ReleaseCommand, out: &Output) -> Result<()> {
    match cmd {
        ReleaseCommand::Upload { file } => out.answer(&admin.upload(read(&file)?).await?),
        ReleaseCommand::List => {
            let r: Vec<abide_fleet_json::Release> = admin.get("/api/v1/releases").await?;
            out.table(&r)
        }
        ReleaseCommand::Delta { from, to } => {
            let d: abide_fleet_json::Delta = admin
                .post(
                    &format!("/api/v1/releases/{to}/deltas"),
                    &abide_fleet_json::DeltaRequest { from },
                )
                .await?;
            out.answer(&d)
        }
        ReleaseCommand::DeltaUpload { file } => {
            let d: abide_fleet_json::Delta = admin.post_raw("/api/v1/deltas", read(&file)?).await?;
            out.answer(&d)
        }
        ReleaseCommand::Deltas { release } => {
            let r: Vec<abide_fleet_json::Delta> = admin
                .get(&format!("/api/v1/releases/{release}/deltas"))
                .await?;
            out.table(&r)
        }
    }
}

/// `abide fleet trust …`.
async fn trust(admin: &AdminClient, cmd: TrustCommand, out: &Output) -> Result<()> {
    let (view, published) = match cmd {
        TrustCommand::Publish { file } => {
            (admin.post_raw("/api/v1/trust", read(&file)?).await?, true)
        }
        TrustCommand::Show => (admin.get("/api/v1/trust").await?, false),
    };
    out.answer(&show::Trust { view, published })
}

/// `abide fleet enroll-token …`.
async fn enroll_token(admin: &AdminClient, cmd: TokenCommand, out: &Output) -> Result<()> {
    match cmd {
        TokenCommand::Create {
            group,
            tags,
            expires,
            uses,
            device_ids,
            device_id_pattern,
            product,
        } => {
            let expires_in = expires
                .map(|e| abide_core::rollout::parse_duration(&e))
                .transpose()?;
            let r: abide_fleet_json::EnrollToken = admin
                .post(
                    "/api/v1/enroll-tokens",
                    &abide_fleet_json::EnrollTokenRequest {
                        group,
                        tags,
                        expires_in,
                        uses,
                        device_ids,
                        device_id_pattern,
                        product,
                    },
                )
                .await?;
            out.answer(&r)
        }
        TokenCommand::List => {
            let r: Vec<abide_fleet_json::EnrollTokenView> =
                admin.get("/api/v1/enroll-tokens").await?;
            out.table(&r)
        }
        TokenCommand::Revoke { id } => {
            let r: abide_fleet_json::EnrollTokenView =
                admin.delete(&format!("/api/v1/enroll-tokens/{id}")).await?;
            out.answer(&r)
        }
    }
}

/// `abide fleet admin-token …`.
async fn admin_token(admin: &AdminClient, cmd: AdminTokenCommand, out: &Output) -> Result<()> {
    match cmd {
        AdminTokenCommand::Create { name, role } => {
            let r: abide_fleet_json::AdminToken = admin
                .post(
                    "/api/v1/admin-tokens",
                    &abide_fleet_json::AdminTokenRequest { name, role },
                )
                .await?;
            out.answer(&r)
        }
        AdminTokenCommand::List => {
            let r: Vec<abide_fleet_json::AdminTokenView> =
                admin.get("/api/v1/admin-tokens").await?;
            out.table(&r)
        }
        AdminTokenCommand::Revoke { id } => {
            let r: abide_fleet_json::AdminTokenView =
                admin.delete(&format!("/api/v1/admin-tokens/{id}")).await?;
            out.answer(&r)
        }
    }
}

/// `abide fleet rollout …`.
async fn rollout(admin: &AdminClient, cmd: RolloutCommand, out: &Output) -> Result<()> {
    let r = match cmd {
        RolloutCommand::Create {
            release,
            stages,
            failure_threshold,
            group,
            tag,
            unresponsive_after,
            prestage,
        } => {
            admin
                .create_rollout(&abide_fleet_json::RolloutRequest {
                    release,
                    stages,
                    failure_threshold: Some(failure_threshold),
                    group,
                    tag,
                    unresponsive_after,
                    prestage,
                })
                .await?
        }
        RolloutCommand::Status { id } => admin.rollout(&id).await?,
        RolloutCommand::List => return out.table(&admin.rollouts().await?),
        RolloutCommand::Pause { id } => admin.rollout_action(&id, "pause").await?,
        RolloutCommand::Resume { id } => admin.rollout_action(&id, "resume").await?,
        RolloutCommand::Advance { id } => admin.rollout_action(&id, "advance").await?,
        RolloutCommand::Abort { id } => admin.rollout_action(&id, "abort").await?,
        RolloutCommand::Rollback { id } => admin.rollout_action(&id, "rollback").await?,
    };
    out.answer(&r)
}

/// `abide fleet group …`.
async fn group(admin: &AdminClient, cmd: GroupCommand, out: &Output) -> Result<()> {
    match cmd {
        GroupCommand::Set {
            group,
            max_unavailable,
            quorum,
            window,
        } => {
            let window = window.as_deref().map(parse_window).transpose()?;
            let r: abide_fleet_json::GroupView = admin
                .put(
                    &format!("/api/v1/groups/{group}"),
                    &abide_fleet_json::GroupSettings {
                        max_unavailable,
                        quorum,
                        window,
                    },
                )
                .await?;
            out.answer(&show::GroupSet(r))
        }
        GroupCommand::Show { group } => {
            let r: abide_fleet_json::GroupView =
                admin.get(&format!("/api/v1/groups/{group}")).await?;
            out.answer(&r)
        }
    }
}

/// `abide fleet audit`: the trail as a table, its signed head, or its verification (against a
/// checkpoint kept elsewhere, if given); a trail that does not verify is an error.
async fn audit(
    admin: &AdminClient,
    verify: bool,
    against: Option<PathBuf>,
    head: bool,
    out: &Output,
) -> Result<()> {
    if head {
        let r: abide_fleet_json::AuditHead = admin.get("/api/v1/audit/head").await?;
        return out.answer(&r);
    }
    if verify {
        let path = match against {
            Some(file) => {
                let head = crate::device::read_audit_head(&file)?;
                let key: abide_fleet_json::ServerKey = admin.get("/api/v1/server-key").await?;
                if key.key != head.key {
                    bail!(
                        "{}: the checkpoint was signed by key {}, not this server's {}",
                        file.display(),
                        head.key,
                        key.key
                    );
                }
                format!("/api/v1/audit/verify?seq={}&hash={}", head.seq, head.hash)
            }
            None => "/api/v1/audit/verify".to_owned(),
        };
        let r: abide_fleet_json::AuditVerify = admin.get(&path).await?;
        out.answer(&r)?;
        if !r.ok {
            bail!("the audit trail does not verify");
        }
        return Ok(());
    }
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let rows: Vec<abide_fleet_json::AuditRecord> = admin
            .get(&format!("/api/v1/audit?after={after}&limit=1000"))
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.seq;
        all.extend(rows);
    }
    out.table(&all)
}
