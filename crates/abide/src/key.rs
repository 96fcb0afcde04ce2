//! `abide key`: generating ed25519 signing keys.

use std::path::PathBuf;

use abide_bundle::SecretKey;
use anyhow::{Context, Result};
use clap::Subcommand;

use crate::Output;
use abide_fs::persist::{read_bounded, write_new};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Generate a key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Generate {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: KeyCommand, out: Output) -> Result<()> {
    match command {
        KeyCommand::Generate { out: prefix } => {
            let secret_path = with_suffix(&prefix, "key");
            let public_path = with_suffix(&prefix, "pub");
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).context("reading random bytes from the OS")?;
            let key = SecretKey::from_seed(seed);
            let public = key.public();
            write_new(&secret_path, key.to_file_text().as_bytes(), 0o600)?;
            write_new(&public_path, public.to_file_text().as_bytes(), 0o644)?;
            /// What `abide key generate` wrote.
            #[derive(serde::Serialize)]
            struct Generated<'a> {
                id: String,
                public: String,
                secret_file: &'a std::path::Path,
                public_file: &'a std::path::Path,
            }
            let generated = Generated {
                id: public.id().to_string(),
                public: public.to_hex(),
                secret_file: &secret_path,
                public_file: &public_path,
            };
            out.print(&generated, || {
                format!(
                    "key {} written to {} and {}",
                    public.id(),
                    secret_path.display(),
                    public_path.display()
                )
            })
        }
    }
}

fn with_suffix(prefix: &std::path::Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads a secret key file.
pub fn load_secret(path: &std::path::Path) -> Result<SecretKey> {
    let text = read_bounded(path, 4096)?;
    let text =
        String::from_utf8(text).with_context(|| format!("{} is not text", path.display()))?;
    SecretKey::from_file_text(&text)
        .with_context(|| format!("reading secret key {}", path.display()))
}

/// Reads a public key file.
pub fn load_public(path: &std::path::Path) -> Result<abide_bundle::PublicKey> {
    let text = read_bounded(path, 4096)?;
    let text =
        String::from_utf8(text).with_context(|| format!("{} is not text", path.display()))?;
    abide_bundle::PublicKey::from_file_text(&text)
        .with_context(|| format!("reading public key {}", path.display()))
}
