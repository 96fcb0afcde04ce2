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
}

/// Runs the server until it is stopped.
pub fn run(args: ServerArgs, out: Output) -> Result<()> {
    // Logs to standard error; ABIDE_LOG=debug|info|warn|error (default info).
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut config = abide_server::Config::new(&args.data);
        config.db = args.db;
        config.trust = args.trust;
        let (server, notes) = abide_server::Server::start(config)
            .await
            .context("starting the server")?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let key = abide_server::public_key(&server).to_hex();
        out.print(
            &serde_json::json!({"listening": addr.to_string(), "data": args.data,
                                "server_key": key, "notes": notes.lines}),
            || {
                let mut text: Vec<String> = notes.lines.clone();
                text.push(format!("assignment signing key: {key}"));
                text.push(format!("abide server listening on http://{addr}"));
                text.join("\n")
            },
        );
        abide_server::serve(server, listener)
            .await
            .context("serving")
    })
}
