//! `abide delta`: make a delta between two bundles, and describe one.

use std::io::BufReader;
use std::path::PathBuf;

use abide_bundle::Limits;
use abide_bundle::delta::DeltaReader;
use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

use crate::Output;
#[cfg(feature = "delta-create")]
use {
    abide_bundle::delta_write::{DeltaOptions, make as make_delta},
    abide_bundle::{BundleReader, ExpirationEnforcement, TrustRoot},
    abide_fs::persist::AtomicFile,
    std::path::Path,
};

#[derive(Subcommand)]
pub enum DeltaCommand {
    #[cfg(feature = "delta-create")]
    /// Make a delta that turns a device running OLD into one running NEW: NEW's signed head
    /// and chunk tables, and each chunk OLD lacks as a patch against OLD's bytes.
    Create {
        /// The bundle the devices run.
        #[arg(long)]
        from: PathBuf,
        /// The bundle to update them to.
        #[arg(long)]
        to: PathBuf,
        /// The delta file to write.
        #[arg(long)]
        out: PathBuf,
        /// Check both bundles' signatures against this trust root first (devices check NEW's
        /// in any case).
        #[arg(long)]
        trust: Option<PathBuf>,
        /// zstd level of the patches (1 to 19).
        #[arg(long, default_value_t = 19)]
        level: i32,
    },
    /// Check a delta: the new release's signatures against a trust root, the delta's layout,
    /// and with --from every chunk it makes, applied to the old bundle's content.
    Verify {
        /// The delta file.
        file: PathBuf,
        /// The trust root.
        #[arg(long)]
        trust: PathBuf,
        /// The bundle the delta was made from: apply the delta to its content and check every
        /// chunk against the new release's chunk table.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Describe a delta: what it was made from and for, and its patches.
    Info {
        /// The delta file.
        file: PathBuf,
    },
}

pub fn run(command: DeltaCommand, out: Output) -> Result<()> {
    match command {
        #[cfg(feature = "delta-create")]
        DeltaCommand::Create {
            from,
            to,
            out: path,
            trust,
            level,
        } => {
            let trust = trust
                .map(|t| crate::trust::load_trust(&t, ExpirationEnforcement::Safe))
                .transpose()?;
            let options = DeltaOptions {
                level,
                ..DeltaOptions::default()
            };
            let stats = make(&from, &to, &path, trust.as_ref(), &options)?;
            let full = crate::on_file("reading", &to, std::fs::metadata(&to))?.len();
            /// What `abide delta create` made.
            #[derive(serde::Serialize)]
            struct Made<'a> {
                ok: bool,
                file: &'a Path,
                size: u64,
                full_size: u64,
                patches: u64,
                patched_bytes: u64,
                frame_bytes: u64,
                prefix_bytes: u64,
                copied_bytes: u64,
            }
            let made = Made {
                ok: true,
                file: &path,
                size: stats.size,
                full_size: full,
                patches: stats.patches,
                patched_bytes: stats.patched_bytes,
                frame_bytes: stats.frame_bytes,
                prefix_bytes: stats.prefix_bytes,
                copied_bytes: stats.copied_bytes,
            };
            out.print(&made, || {
                    format!(
                        "{}: {} bytes ({:.1} % of the {} byte bundle): {} patches make {} bytes from {} bytes of frames against {} old bytes; {} bytes are copied from the running slot",
                        path.display(),
                        stats.size,
                        100.0 * stats.size as f64 / full.max(1) as f64,
                        full,
                        stats.patches,
                        stats.patched_bytes,
                        stats.frame_bytes,
                        stats.prefix_bytes,
                        stats.copied_bytes
                    )
            })
        }
        DeltaCommand::Verify { file, trust, from } => verify(&file, &trust, from.as_deref(), out),
        DeltaCommand::Info { file } => {
            let f = crate::on_file("opening", &file, std::fs::File::open(&file))?;
            let reader = DeltaReader::open(BufReader::new(f), Limits::default())
                .with_context(|| format!("reading {}", file.display()))?;
            let head = reader.head();
            let manifest = reader.bundle().manifest_unverified()?;
            let info = Info {
                file: &file,
                from: Old {
                    version: head.from.version.to_string(),
                    manifest: head.from.manifest.to_hex(),
                    components: head
                        .from
                        .components
                        .iter()
                        .map(|b| Base {
                            slot_class: b.slot_class.as_str(),
                            size: b.size,
                            index: b.index.to_hex(),
                        })
                        .collect(),
                },
                to: New {
                    version: head.to_version.to_string(),
                    manifest: head.to_manifest.to_hex(),
                    product: manifest.product.as_str(),
                },
                components: head
                    .components
                    .iter()
                    .map(|(name, patches)| Patches {
                        name: name.as_str(),
                        patches: *patches,
                    })
                    .collect(),
            };
            out.print(&info, || {
                format!(
                    "delta from {} {} to {} {} ({} components, {} patches)",
                    manifest.product,
                    head.from.version,
                    manifest.product,
                    head.to_version,
                    head.components.len(),
                    head.components.iter().map(|(_, p)| p).sum::<u64>()
                )
            })?;
            Ok(())
        }
    }
}

#[cfg(feature = "delta-create")]
/// Makes the delta from the bundle at `from` to the one at `to` into `path` (atomically);
/// each bundle's content is spooled beside `path` while it is made.
pub fn make(
    from: &Path,
    to: &Path,
    path: &Path,
    trust: Option<&TrustRoot>,
    options: &DeltaOptions,
) -> Result<abide_bundle::delta_write::DeltaStats> {
    type Opened = (
        abide_bundle::VerifiedBundle<BufReader<std::fs::File>>,
        Vec<u8>,
    );
    let open = |bundle: &Path| -> Result<Opened> {
        let f = crate::on_file("opening", bundle, std::fs::File::open(bundle))?;
        let reader = BundleReader::open(BufReader::with_capacity(1 << 20, f), Limits::default())
            .with_context(|| format!("reading {}", bundle.display()))?;
        let head = reader.head_bytes();
        let verified = match trust {
            Some(trust) => reader.verify(&abide_bundle::Policy {
                trust,
                now: jiff::Timestamp::now(),
                expiration: ExpirationEnforcement::Unsafe,
                compatible: None,
                min_security_version: 0,
            }),
            None => reader.without_signatures(),
        }
        .with_context(|| format!("verifying {}", bundle.display()))?;
        Ok((verified, head))
    };
    let (old, new) = (open(from)?, open(to)?);
    let mut spools = Vec::new();
    let mut target = AtomicFile::create(path, 0o644)?;
    let stats = make_delta(
        old,
        new,
        &mut |c| {
            let mut spool = AtomicFile::create(
                &path.with_extension(format!("{}-{}.spool", spools.len(), c.name)),
                0o600,
            )
            .map_err(std::io::Error::other)?;
            let handle = spool.file().try_clone()?;
            // The guard removes the spool file when the delta is done (or fails).
            spools.push(spool);
            Ok(handle)
        },
        options,
        &mut std::io::BufWriter::with_capacity(1 << 20, target.file()),
    )
    .with_context(|| format!("making the delta {}", path.display()))?;
    target.commit()?;
    Ok(stats)
}

/// `abide delta info`: the head of a delta.
#[derive(Serialize)]
struct Info<'a> {
    file: &'a std::path::Path,
    from: Old<'a>,
    to: New<'a>,
    components: Vec<Patches<'a>>,
}

/// The release a delta was made against.
#[derive(Serialize)]
struct Old<'a> {
    version: String,
    manifest: String,
    components: Vec<Base<'a>>,
}

/// One slot's content in the release a delta was made against.
#[derive(Serialize)]
struct Base<'a> {
    slot_class: &'a str,
    size: u64,
    index: String,
}

/// The release a delta makes.
#[derive(Serialize)]
struct New<'a> {
    version: String,
    manifest: String,
    product: &'a str,
}

/// One component of the new release and how many patches make it.
#[derive(Serialize)]
struct Patches<'a> {
    name: &'a str,
    patches: u64,
}

/// `abide delta verify`.
#[derive(Serialize)]
struct Verified<'a> {
    ok: bool,
    file: &'a std::path::Path,
    from_version: String,
    to_version: String,
    checked: &'static str,
    signers: Vec<String>,
}

/// `abide delta verify`.
fn verify(
    file: &std::path::Path,
    trust: &std::path::Path,
    from: Option<&std::path::Path>,
    out: Output,
) -> Result<()> {
    let trust = crate::trust::load_trust(trust, abide_bundle::ExpirationEnforcement::Safe)?;
    let policy = abide_bundle::Policy {
        trust: &trust,
        now: jiff::Timestamp::now(),
        expiration: abide_bundle::ExpirationEnforcement::Safe,
        compatible: None,
        min_security_version: 0,
    };
    let f = crate::on_file("opening", file, std::fs::File::open(file))?;
    let mut delta = DeltaReader::open(
        abide_bundle::Stream(BufReader::with_capacity(1 << 20, f)),
        Limits::default(),
    )
    .and_then(|d| d.verify(&policy))
    .with_context(|| format!("verifying {}", file.display()))?;
    let (head, signers) = (delta.head().clone(), delta.signers().to_vec());
    match from {
        // Applied to the old bundle's content, spooled beside the delta.
        Some(from) => {
            let f = crate::on_file("opening", from, std::fs::File::open(from))?;
            let reader = abide_bundle::BundleReader::open(
                abide_bundle::Stream(BufReader::with_capacity(1 << 20, f)),
                Limits::default(),
            )
            .with_context(|| format!("reading {}", from.display()))?;
            let old_head = reader.head_bytes();
            let old = reader
                .verify(&policy)
                .with_context(|| format!("verifying {}", from.display()))?;
            let mut spools = Vec::new();
            abide_bundle::delta_write::check((old, old_head), delta, &mut |c| {
                let mut spool = abide_fs::persist::AtomicFile::create(
                    &file.with_extension(format!("{}-{}.spool", spools.len(), c.name)),
                    0o600,
                )
                .map_err(std::io::Error::other)?;
                let handle = spool.file().try_clone()?;
                // The guard removes the spool file when the check is done (or fails).
                spools.push(spool);
                Ok(handle)
            })
            .with_context(|| format!("applying {} to {}", file.display(), from.display()))?;
        }
        // The layout only: every table, every frame there, nothing after the last.
        None => {
            for _ in 0..delta.manifest().components.len() {
                delta
                    .read_tables()
                    .and_then(|_| delta.skip_component())
                    .with_context(|| format!("verifying {}", file.display()))?;
            }
            delta
                .finish()
                .with_context(|| format!("verifying {}", file.display()))?;
        }
    }
    let checked = if from.is_some() { "applied" } else { "layout" };
    let answer = Verified {
        ok: true,
        file,
        from_version: head.from.version.to_string(),
        to_version: head.to_version.to_string(),
        checked,
        signers: signers.iter().map(ToString::to_string).collect(),
    };
    out.print(&answer, || {
        format!(
            "{}: a delta from {} to {}, signed as the release; {}",
            file.display(),
            head.from.version,
            head.to_version,
            if from.is_some() {
                "every chunk it makes from the old bundle matches the new release"
            } else {
                "its layout is sound (give --from OLD.abide to check every chunk it makes)"
            }
        )
    })?;
    Ok(())
}
