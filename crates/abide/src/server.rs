//! `abide server`: the fleet server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::Output;

/// `abide server` arguments.
#[derive(Args)]
pub struct ServerArgs {
    /// The data directory: bundles, keys, the admin token, the SQLite database.
    #[arg(long)]
    data: PathBuf,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8440")]
    listen: SocketAddr,
    /// A PostgreSQL URL (`postgres://user@host:port/db`); SQLite in the data directory if absent.
    #[arg(long)]
    db: Option<String>,
    /// The fleet trust root uploads are verified against (default DATA/trust.json).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept device client certificates issued by this CA (PEM); a certificate's common name
    /// must be the device id of the credential it comes with.
    #[arg(long, requires = "tls_cert")]
    device_ca: Option<PathBuf>,
    /// Refuse device requests that come without a device certificate.
    #[arg(long, requires = "device_ca")]
    require_device_cert: bool,
    /// Tell devices to check in at this interval (as 30s or 5m), whatever their own setting.
    #[arg(long)]
    device_poll: Option<String>,
    /// Enrolment attempts one client address may make per minute (and at once).
    #[arg(long, default_value_t = 30)]
    enroll_rate: u32,
    /// Connections one client address may hold open; more are closed as they are accepted.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_address: u32,
    /// How long a client may take to send a request's head, or stay idle between requests
    /// (as 10s).
    #[arg(long, default_value = "10s")]
    header_timeout: String,
    /// How long a client may take to send a request's body (uploads: to send more of it).
    #[arg(long, default_value = "30s")]
    body_timeout: String,
    /// A device counts towards its group's quorum only if it checked in as healthy within
    /// this time (as 15m).
    #[arg(long, default_value = "15m")]
    health_fresh: String,
    /// How often /metrics re-reads the fleet's aggregates while it is scraped (0: at every
    /// scrape); a scrape serves the latest reading.
    #[arg(long, default_value = "10s")]
    metrics_refresh: String,
    /// Do not make deltas after an upload (from the releases devices run to the new one);
    /// `abide fleet delta create` still makes them on request.
    #[arg(long)]
    no_deltas_on_upload: bool,
}

/// The limits the server holds to, as `abide server --json` prints them at start.
#[derive(serde::Serialize)]
struct Settings {
    header_timeout_s: u64,
    body_timeout_s: u64,
    enroll_rate: u32,
    max_connections_per_address: usize,
    health_fresh_s: u64,
    metrics_refresh_s: u64,
    device_poll_s: Option<u64>,
}

/// Runs the server until it is stopped.
pub fn run(args: ServerArgs, out: Output) -> Result<()> {
    crate::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut config = abide_server::Config::new(&args.data);
        config.db = args.db;
        config.device_poll = args
            .device_poll
            .as_deref()
            .map(|t| {
                abide_core::rollout::parse_duration(t)
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .with_context(|| format!("--device-poll {t:?}: expected 1s to 24h"))
            })
            .transpose()?;
        config.trust = args.trust;
        config.deltas_on_upload = !args.no_deltas_on_upload;
        config.enroll_per_minute = args.enroll_rate;
        config.max_connections_per_address = args.max_connections_per_address as usize;
        let seconds = |flag: &str, t: &str| {
            abide_core::rollout::parse_duration(t)
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(std::time::Duration::from_secs)
                .with_context(|| format!("{flag} {t:?}: expected 1s to 1h"))
        };
        config.header_timeout = seconds("--header-timeout", &args.header_timeout)?;
        config.body_timeout = seconds("--body-timeout", &args.body_timeout)?;
        config.metrics_refresh = abide_core::duration::parse(&args.metrics_refresh)
            .ok()
            .filter(|d| *d <= std::time::Duration::from_secs(3600))
            .with_context(|| {
                format!(
                    "--metrics-refresh {:?}: expected 0 to 1h",
                    args.metrics_refresh
                )
            })?;
        config.health_fresh = abide_core::rollout::parse_duration(&args.health_fresh)
            .ok()
            .filter(|s| (1..=7 * 86_400).contains(s))
            .map(std::time::Duration::from_secs)
            .with_context(|| {
                format!("--health-fresh {:?}: expected 1s to 7d", args.health_fresh)
            })?;
        config.tls = match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(abide_server::tls::TlsConfig {
                cert,
                key,
                device_ca: args.device_ca,
                require_device_cert: args.require_device_cert,
            }),
            _ => None,
        };
        let tls = config
            .tls
            .as_ref()
            .map(abide_server::tls::server_config)
            .transpose()
            .context("setting up TLS")?;
        let settings = Settings {
            header_timeout_s: config.header_timeout.as_secs(),
            body_timeout_s: config.body_timeout.as_secs(),
            enroll_rate: config.enroll_per_minute,
            max_connections_per_address: config.max_connections_per_address,
            health_fresh_s: config.health_fresh.as_secs(),
            metrics_refresh_s: config.metrics_refresh.as_secs(),
            device_poll_s: config.device_poll,
        };
        let (server, notes) = abide_server::Server::start(config)
            .await
            .context("starting the server")?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let key = abide_server::public_key(&server).to_hex();
        /// What `abide server` started with.
        #[derive(serde::Serialize)]
        struct Started<'a, S: serde::Serialize> {
            listening: String,
            data: &'a std::path::Path,
            server_key: &'a str,
            notes: &'a [String],
            settings: &'a S,
        }
        let started = Started {
            listening: addr.to_string(),
            data: &args.data,
            server_key: &key,
            notes: &notes.lines,
            settings: &settings,
        };
        out.print(&started, || {
                let mut text: Vec<String> = notes.lines.clone();
                text.push(format!("assignment signing key: {key}"));
                text.push(format!(
                    "limits: header timeout {}s, body timeout {}s, {} enrolment attempts a minute and {} connections per address; quorum counts devices healthy within {}s",
                    settings.header_timeout_s,
                    settings.body_timeout_s,
                    settings.enroll_rate,
                    settings.max_connections_per_address,
                    settings.health_fresh_s
                ));
                let scheme = if tls.is_some() { "https" } else { "http" };
                text.push(format!("abide server listening on {scheme}://{addr}"));
                text.join("\n")
        })?;
        match tls {
            Some(tls) => abide_server::tls::serve_tls(server, listener, tls).await,
            None => abide_server::serve(server, listener).await,
        }
        .context("serving")
    })
}
