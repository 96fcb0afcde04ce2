//! `abide trust`: making, rotating and checking trust roots.

use std::path::{Path, PathBuf};

use abide_bundle::{ExpirationEnforcement, Limits, TrustRoot};
use anyhow::{Context, Result};
use clap::Subcommand;
use jiff::Timestamp;

use crate::Output;
use crate::key::{load_public, load_secret};
use abide_fs::persist::{read_bounded, write_atomic};

#[derive(Subcommand)]
pub enum TrustCommand {
    /// Make trust root version 1, self-signed by a threshold of its keys.
    Init {
        /// A public key file to trust (repeat for several).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct keys must sign a bundle.
        #[arg(long)]
        threshold: usize,
        /// When the trust root stops being accepted (RFC 3339).
        #[arg(long)]
        expires: Option<Timestamp>,
        /// A secret key file to sign with (repeat; at least the threshold).
        #[arg(long = "sign", required = true)]
        signers: Vec<PathBuf>,
        /// Where to write the trust root.
        #[arg(long)]
        out: PathBuf,
    },
    /// Make the next version of a trust root, signed by a threshold of the old and of the new keys.
    Rotate {
        /// The current trust root.
        #[arg(long)]
        from: PathBuf,
        /// A public key file of the new root (repeat).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The new threshold.
        #[arg(long)]
        threshold: usize,
        /// When the new root expires (RFC 3339).
        #[arg(long)]
        expires: Option<Timestamp>,
        /// Secret key files to sign with: enough old keys and enough new keys.
        #[arg(long = "sign", required = true)]
        signers: Vec<PathBuf>,
        /// Where to write the new trust root.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a trust root, and with --from that it may replace the one given there.
    Verify {
        /// The trust root it must follow from.
        #[arg(long)]
        from: Option<PathBuf>,
        /// The trust root to check.
        file: PathBuf,
    },
}

pub fn run(command: TrustCommand, out: Output) -> Result<()> {
    match command {
        TrustCommand::Init {
            keys,
            threshold,
            expires,
            signers,
            out: path,
        } => {
            let keys = keys
                .iter()
                .map(|p| load_public(p))
                .collect::<Result<Vec<_>>>()?;
            let signers = signers
                .iter()
                .map(|p| load_secret(p))
                .collect::<Result<Vec<_>>>()?;
            let root = TrustRoot::create(
                1,
                keys,
                threshold,
                expires,
                &signers.iter().collect::<Vec<_>>(),
            )
            .context("making the trust root")?;
            write_atomic(&path, &root.to_file_bytes()?, 0o644)?;
            print_root(out, &root, &path)
        }
        TrustCommand::Rotate {
            from,
            keys,
            threshold,
            expires,
            signers,
            out: path,
        } => {
            let old = load_trust(&from, ExpirationEnforcement::Unsafe)?;
            let keys = keys
                .iter()
                .map(|p| load_public(p))
                .collect::<Result<Vec<_>>>()?;
            let signers = signers
                .iter()
                .map(|p| load_secret(p))
                .collect::<Result<Vec<_>>>()?;
            let root = old
                .rotate(
                    keys,
                    threshold,
                    expires,
                    &signers.iter().collect::<Vec<_>>(),
                )
                .context("rotating the trust root")?;
            write_atomic(&path, &root.to_file_bytes()?, 0o644)?;
            print_root(out, &root, &path)
        }
        TrustCommand::Verify { from, file } => {
            let root = load_trust(&file, ExpirationEnforcement::Safe)?;
            if let Some(from) = &from {
                let old = load_trust(from, ExpirationEnforcement::Unsafe)?;
                old.verify_successor(&root).with_context(|| {
                    format!("{} does not follow {}", file.display(), from.display())
                })?;
            }
            let answer = RootView {
                ok: Some(true),
                file: None,
                ..RootView::of(&root)
            };
            out.print(&answer, || match &from {
                Some(from) => {
                    format!("ok: version {} follows {}", root.version(), from.display())
                }
                None => format!("ok: trust root version {}", root.version()),
            })?;
            Ok(())
        }
    }
}

/// Loads and checks a trust root file.
pub fn load_trust(path: &Path, expiration: ExpirationEnforcement) -> Result<TrustRoot> {
    let limits = Limits::default();
    let bytes = read_bounded(path, limits.max_trust_bytes)?;
    TrustRoot::load(&bytes, Timestamp::now(), expiration, &limits)
        .with_context(|| format!("trust root {}", path.display()))
}

/// A trust root as `abide trust create|rotate|verify` answer it.
#[derive(serde::Serialize)]
struct RootView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    version: u64,
    threshold: usize,
    keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a Path>,
}

impl<'a> RootView<'a> {
    fn of(root: &'a TrustRoot) -> Self {
        RootView {
            ok: None,
            version: root.version(),
            threshold: root.threshold(),
            keys: root
                .key_ids()
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect(),
            file: None,
        }
    }
}

fn print_root(out: Output, root: &TrustRoot, path: &Path) -> Result<()> {
    let answer = RootView {
        file: Some(path),
        ..RootView::of(root)
    };
    out.print(&answer, || {
        format!(
            "trust root version {} ({} of {} keys) written to {}",
            root.version(),
            root.threshold(),
            root.keys().len(),
            path.display()
        )
    })
}
