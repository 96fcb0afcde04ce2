//! The `abide` command: argument parsing and glue over the Abide libraries.
//!
//! Exit codes: 0 success; 1 a check refused the input (the error names it); 2 the command line
//! is wrong; 3 anything else (a file could not be read or written, …).

mod bundle;
mod key;
mod trust;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Abide: all-or-nothing software updates for machines nobody can walk up to.
#[derive(Parser)]
#[command(name = "abide", version, about)]
struct Cli {
    /// Print machine-readable JSON on standard output (errors too).
    #[arg(long, global = true)]
    json: bool,
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
}

/// Where output goes: human text or one JSON document.
#[derive(Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// Prints `value` as JSON, or `text` for people.
    pub fn print(&self, value: &serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).expect("JSON values serialize")
            );
        } else {
            let text = text();
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    let result = match cli.command {
        Command::Key(c) => key::run(c, out),
        Command::Trust(c) => trust::run(c, out),
        Command::Bundle(c) => bundle::run(c, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err, out),
    }
}

/// Prints the error as one line on standard error (and as JSON with `--json`) and picks the
/// exit code: 1 when a check refused the input, 3 otherwise.
fn report(err: &anyhow::Error, out: Output) -> ExitCode {
    let check = err
        .chain()
        .find_map(|e| e.downcast_ref::<abide_bundle::Error>())
        .filter(|e| e.code() != "io");
    let code = check.map_or("error", abide_bundle::Error::code);
    let message = format!("{err:#}").replace('\n', " ");
    eprintln!("abide: error [{code}]: {message}");
    if out.json {
        let value = serde_json::json!({"ok": false, "error": {"code": code, "message": message}});
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON values serialize")
        );
    }
    ExitCode::from(if check.is_some() { 1 } else { 3 })
}
