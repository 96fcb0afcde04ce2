//! `abide bundle`: create, sign, info, verify and extract.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use abide_bundle::{
    BundleReader, BundleSpec, BundleWriter, Chunking, ExpirationEnforcement, HardwareId, Limits,
    Manifest, Name, Policy, SecretKey, add_signature,
};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use crate::Output;
use crate::key::load_secret;
use crate::trust::load_trust;
use abide_fs::persist::AtomicFile;

#[derive(Subcommand)]
pub enum BundleCommand {
    /// Make a signed bundle from component files.
    Create {
        /// Product name.
        #[arg(long)]
        product: String,
        /// Release version (SemVer).
        #[arg(long)]
        version: String,
        /// Anti-rollback counter.
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// A hardware id the bundle may be installed on (repeat).
        #[arg(long = "compatible")]
        compatible: Vec<String>,
        /// NAME=PATH[,kind=KIND][,slot=CLASS]; kind and slot default to NAME (repeat).
        #[arg(long = "component", required = true)]
        components: Vec<String>,
        /// A secret key to sign with (repeat).
        #[arg(long = "sign", required = true)]
        signers: Vec<PathBuf>,
        /// When the bundle stops being accepted (RFC 3339).
        #[arg(long)]
        expires: Option<Timestamp>,
        /// An install hook by name (repeat).
        #[arg(long = "hook")]
        hooks: Vec<String>,
        /// zstd level for chunks.
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// The average chunk size (a power of two from 256 B, as 64K or 256K); chunks are cut
        /// between a quarter and four times it, at most 1 MiB. Larger chunks compress better;
        /// smaller ones let chunk reuse find more of a release in the running one.
        #[arg(long, default_value = "64K")]
        chunk_size: String,
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature to a bundle (threshold signing by separate people).
    Sign {
        /// The bundle.
        file: PathBuf,
        /// The secret key to sign with.
        #[arg(long)]
        key: PathBuf,
    },
    /// Show a bundle's manifest and signatures without trusting them.
    Info {
        /// The bundle.
        file: PathBuf,
    },
    /// Check a bundle completely: signatures, threshold, expiry, hardware, anti-rollback, and
    /// every stored byte of every chunk against the signed chunk tables (what they decompress
    /// to follows from them); with --paranoid also every chunk's content against its name and
    /// every component against its digest.
    Verify {
        /// The bundle (`-` reads standard input).
        file: PathBuf,
        /// The trust root.
        #[arg(long)]
        trust: PathBuf,
        /// The hardware id the bundle must list.
        #[arg(long)]
        compatible: Option<String>,
        /// The lowest acceptable security version.
        #[arg(long, default_value_t = 0)]
        min_security_version: u64,
        /// Hash the content too (three passes): catches a bug of the writer that made the
        /// bundle, or of the decompressor.
        #[arg(long)]
        paranoid: bool,
    },
    /// Write one component's verified content to a file.
    Extract {
        /// The bundle (`-` reads standard input).
        file: PathBuf,
        /// The trust root.
        #[arg(long)]
        trust: PathBuf,
        /// The component to extract.
        #[arg(long)]
        component: String,
        /// The hardware id the bundle must list.
        #[arg(long)]
        compatible: Option<String>,
        /// The lowest acceptable security version.
        #[arg(long, default_value_t = 0)]
        min_security_version: u64,
        /// Where to write it; nothing appears there unless all of it verified.
        #[arg(long)]
        out: PathBuf,
        /// Hash the content too, as `verify --paranoid`.
        #[arg(long)]
        paranoid: bool,
    },
}

pub fn run(command: BundleCommand, out: Output) -> Result<()> {
    match command {
        BundleCommand::Create {
            product,
            version,
            security_version,
            compatible,
            components,
            signers,
            expires,
            hooks,
            level,
            chunk_size,
            out: path,
        } => create(
            CreateArgs {
                product,
                version,
                security_version,
                compatible,
                components,
                signers,
                expires,
                hooks,
                level,
                chunk_size,
                path,
            },
            out,
        ),
        BundleCommand::Sign { file, key } => sign(file, &key, &out),
        BundleCommand::Info { file } => info(file, &out),
        BundleCommand::Verify {
            file,
            trust,
            compatible,
            min_security_version,
            paranoid,
        } => verify(
            file,
            &trust,
            compatible,
            min_security_version,
            paranoid,
            &out,
        ),
        BundleCommand::Extract {
            file,
            trust,
            component,
            compatible,
            min_security_version,
            out: path,
            paranoid,
        } => {
            let trust = load_trust(&trust, ExpirationEnforcement::Safe)?;
            let compatible = parse_compatible(compatible)?;
            let policy = policy(&trust, compatible.as_ref(), min_security_version);
            extract(&file, &policy, component, path, paranoid, &out)
        }
    }
}

/// What `abide bundle sign` did.
#[derive(Serialize)]
struct Signed {
    file: PathBuf,
    key: String,
}

/// `abide bundle sign`: adds a signature, the file replaced atomically.
fn sign(file: PathBuf, key: &Path, out: &Output) -> Result<()> {
    let key = load_secret(key)?;
    let mut src = open_input(&file)?;
    let mut target = AtomicFile::create(&file, 0o644)?;
    let mut writer = io::BufWriter::with_capacity(1 << 20, target.file());
    add_signature(&mut src, &key, &mut writer, Limits::default())
        .with_context(|| format!("signing {}", file.display()))?;
    drop(writer);
    target.commit()?;
    let signed = Signed {
        file,
        key: key.public().id().to_string(),
    };
    out.print(&signed, || {
        format!("{} signed by key {}", signed.file.display(), signed.key)
    })
}

/// What `abide bundle info` read (nothing of it checked).
#[derive(Serialize)]
struct Info {
    file: PathBuf,
    manifest: Value,
    signatures: Vec<String>,
    data_start: u64,
}

/// `abide bundle info`: the manifest and the signers' key ids, unchecked.
fn info(file: PathBuf, out: &Output) -> Result<()> {
    let reader = BundleReader::open(open_input(&file)?, Limits::default())
        .with_context(|| format!("reading {}", file.display()))?;
    let manifest = reader
        .manifest_unverified()
        .with_context(|| format!("reading the manifest of {}", file.display()))?;
    let info = Info {
        file,
        manifest: manifest_json(&manifest),
        signatures: reader
            .signatures()
            .iter()
            .map(|s| abide_bundle::KeyId::of_bytes(&s.public).to_string())
            .collect(),
        data_start: reader.header().data_start(),
    };
    out.print(&info, || {
        format!(
            "{}\nsignatures (unchecked): {}",
            describe(&manifest),
            info.signatures.join(", ")
        )
    })
}

/// What `abide bundle verify` checked.
#[derive(Serialize)]
struct Verified {
    ok: bool,
    file: PathBuf,
    manifest: Value,
    signers: Vec<String>,
    threshold: usize,
    paranoid: bool,
}

/// `abide bundle verify`: signatures, policy and every stored byte (with `paranoid`, every
/// chunk and component digest too).
fn verify(
    file: PathBuf,
    trust: &Path,
    compatible: Option<String>,
    min_security_version: u64,
    paranoid: bool,
    out: &Output,
) -> Result<()> {
    let trust = load_trust(trust, ExpirationEnforcement::Safe)?;
    let compatible = parse_compatible(compatible)?;
    let policy = policy(&trust, compatible.as_ref(), min_security_version);
    let checks = abide_bundle::chunks::Checks::paranoid(paranoid);
    let mut bundle = BundleReader::open(open_input(&file)?, Limits::default())
        .and_then(|r| r.verify(&policy))
        .and_then(|mut b| {
            b.set_checks(checks);
            b.verify_rest().map(|()| b)
        })
        .with_context(|| format!("verifying {}", file.display()))?;
    let manifest = bundle.manifest().clone();
    let signers: Vec<String> = bundle.signers().iter().map(ToString::to_string).collect();
    bundle.finish()?;
    let verified = Verified {
        ok: true,
        file,
        manifest: manifest_json(&manifest),
        signers,
        threshold: trust.threshold(),
        paranoid,
    };
    out.print(&verified, || {
        format!(
            "ok: {} {} verified ({} of {} needed signatures, {} component(s), {})",
            manifest.product,
            manifest.version,
            verified.signers.len(),
            verified.threshold,
            manifest.components.len(),
            if paranoid {
                "every stored byte, chunk and component digest checked"
            } else {
                "every stored byte checked against the signed chunk tables"
            }
        )
    })
}

/// What `abide bundle extract` wrote.
#[derive(Serialize)]
struct Extracted {
    ok: bool,
    component: String,
    out: PathBuf,
    size: u64,
    digest: String,
}

/// `abide bundle extract`: one component, verified, written to `path` (which appears only if
/// all of it verified).
fn extract(
    file: &Path,
    policy: &Policy<'_>,
    component: String,
    path: PathBuf,
    paranoid: bool,
    out: &Output,
) -> Result<()> {
    let mut bundle = BundleReader::open(open_input(file)?, Limits::default())
        .and_then(|r| r.verify(policy))
        .with_context(|| format!("verifying {}", file.display()))?;
    bundle.set_checks(abide_bundle::chunks::Checks::paranoid(paranoid));
    let index = bundle
        .manifest()
        .components
        .iter()
        .position(|c| c.name.as_str() == component)
        .ok_or_else(|| abide_bundle::Error::UnknownComponent {
            name: component.clone(),
        })?;
    for _ in 0..index {
        bundle.skip_component()?;
    }
    let mut target = AtomicFile::create(&path, 0o644)?;
    let mut writer = io::BufWriter::with_capacity(1 << 20, target.file());
    let (size, digest) = bundle
        .read_component(&mut |data| writer.write_all(data))
        .map(|c| (c.size, c.digest))
        .with_context(|| format!("extracting {component} from {}", file.display()))?;
    writer.flush().context("writing the extracted content")?;
    drop(writer);
    // Dropping `target` on any error above removed the partial file.
    target.commit()?;
    let extracted = Extracted {
        ok: true,
        component,
        out: path,
        size,
        digest: digest.to_hex(),
    };
    out.print(&extracted, || {
        format!(
            "{}: {} bytes written to {} (sha256 {})",
            extracted.component,
            extracted.size,
            extracted.out.display(),
            digest
        )
    })
}

/// `--chunk-size AVG`: cut between AVG/4 and 4×AVG (at most 1 MiB).
fn chunking(text: &str) -> Result<Chunking> {
    let avg = abide_agent::config::parse_size(text)
        .ok()
        .and_then(|s| u32::try_from(s).ok())
        .filter(|s| s.is_power_of_two() && (256..=256 << 10).contains(s))
        .with_context(|| {
            format!("--chunk-size {text:?}: expected a power of two from 256 to 256K, as 64K")
        })?;
    Ok(Chunking {
        min_size: avg / 4,
        avg_size: avg,
        max_size: (avg * 4).min(1 << 20),
    })
}

fn parse_compatible(compatible: Option<String>) -> Result<Option<HardwareId>> {
    let max = Limits::default().max_name_len;
    Ok(compatible
        .map(|c| HardwareId::parse("--compatible", &c, max))
        .transpose()?)
}

/// The policy of `verify` and `extract`: expiry always enforced, at the current time.
fn policy<'a>(
    trust: &'a abide_bundle::TrustRoot,
    compatible: Option<&'a HardwareId>,
    min_security_version: u64,
) -> Policy<'a> {
    Policy {
        trust,
        now: Timestamp::now(),
        expiration: ExpirationEnforcement::Safe,
        compatible,
        min_security_version,
    }
}

struct CreateArgs {
    product: String,
    version: String,
    security_version: u64,
    compatible: Vec<String>,
    components: Vec<String>,
    signers: Vec<PathBuf>,
    expires: Option<Timestamp>,
    hooks: Vec<String>,
    level: i32,
    chunk_size: String,
    path: PathBuf,
}

/// One `--component NAME=PATH[,kind=KIND][,slot=CLASS]` argument, validated.
struct ComponentArg {
    name: Name,
    kind: Name,
    slot: Name,
    path: PathBuf,
}

fn parse_component(arg: &str, max: usize) -> Result<ComponentArg> {
    let (name, rest) = arg.split_once('=').with_context(|| {
        format!("--component {arg:?}: expected NAME=PATH[,kind=KIND][,slot=CLASS]")
    })?;
    let mut parts: Vec<&str> = rest.split(',').collect();
    let (mut kind, mut slot) = (None, None);
    while parts.len() > 1 {
        let last = parts[parts.len() - 1];
        if let Some(k) = last.strip_prefix("kind=") {
            kind.get_or_insert(k);
        } else if let Some(s) = last.strip_prefix("slot=") {
            slot.get_or_insert(s);
        } else {
            break;
        }
        parts.pop();
    }
    let path = parts.join(",");
    if path.is_empty() {
        bail!("--component {arg:?}: the path is empty");
    }
    let name = Name::parse("--component name", name, max)?;
    Ok(ComponentArg {
        kind: Name::parse("--component kind", kind.unwrap_or(name.as_str()), max)?,
        slot: Name::parse("--component slot", slot.unwrap_or(name.as_str()), max)?,
        name,
        path: PathBuf::from(path),
    })
}

fn create(args: CreateArgs, out: Output) -> Result<()> {
    // Stage one: validate every argument before touching the file system.
    let max = Limits::default().max_name_len;
    let spec = BundleSpec {
        product: Name::parse("--product", &args.product, max)?,
        compatible: args
            .compatible
            .iter()
            .map(|c| HardwareId::parse("--compatible", c, max))
            .collect::<Result<_, _>>()?,
        version: semver::Version::parse(&args.version)
            .with_context(|| format!("--version {:?} is not a SemVer version", args.version))?,
        security_version: args.security_version,
        created: Timestamp::now(),
        expires: args.expires,
        hooks: args
            .hooks
            .iter()
            .map(|h| Name::parse("--hook", h, max))
            .collect::<Result<_, _>>()?,
        chunking: chunking(&args.chunk_size)?,
        level: args.level,
    };
    let components = args
        .components
        .iter()
        .map(|c| parse_component(c, max))
        .collect::<Result<Vec<_>>>()?;
    // Stage two: open everything, then write.
    let signers: Vec<SecretKey> = args
        .signers
        .iter()
        .map(|p| load_secret(p))
        .collect::<Result<_>>()?;
    let mut inputs = Vec::new();
    for c in &components {
        let file = File::open(&c.path)
            .with_context(|| format!("opening component {} at {}", c.name, c.path.display()))?;
        inputs.push(file);
    }
    let mut target = AtomicFile::create(&args.path, 0o644)?;
    let spool = AtomicFile::create(&args.path.with_extension("abide-spool"), 0o600)?;
    let mut spool_file = spool_handle(spool)?;
    let mut writer = BundleWriter::new(spec, &mut spool_file.1)?;
    for (c, input) in components.into_iter().zip(inputs) {
        let mut input = BufReader::with_capacity(1 << 20, input);
        writer
            .add_component(c.name.clone(), c.kind, c.slot, &mut input)
            .with_context(|| format!("adding component {} from {}", c.name, c.path.display()))?;
    }
    // Unbuffered: `finish` writes the head in one piece and copies the spool file to file.
    let manifest = writer.finish(&signers.iter().collect::<Vec<_>>(), target.file())?;
    target.commit()?;
    drop(spool_file);
    let signer_ids: Vec<String> = signers
        .iter()
        .map(|k| k.public().id().to_string())
        .collect();
    let answer = Created {
        file: &args.path,
        manifest: manifest_json(&manifest),
        signers: signer_ids,
    };
    out.print(&answer, || {
        format!(
            "{}\nwritten to {}",
            describe(&manifest),
            args.path.display()
        )
    })?;
    Ok(())
}

/// The spool is a temporary file that never becomes a bundle: keep the guard (which removes it
/// when dropped) beside a second handle used for reading and writing.
fn spool_handle(mut spool: AtomicFile) -> Result<(AtomicFile, File)> {
    let handle = spool.file().try_clone().context("opening the spool")?;
    Ok((spool, handle))
}

fn open_input(path: &Path) -> Result<Box<dyn Read>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(BufReader::with_capacity(
            1 << 20,
            io::stdin().lock(),
        )));
    }
    // Unbuffered: the reader asks for whole chunks, which land straight in their buffers.
    let file = crate::on_file("opening", path, File::open(path))?;
    Ok(Box::new(file))
}

/// `abide bundle create`: the file written, its manifest and who signed it.
#[derive(serde::Serialize)]
struct Created<'a> {
    file: &'a Path,
    manifest: Value,
    signers: Vec<String>,
}

fn manifest_json(m: &Manifest) -> Value {
    let bytes = m.to_canonical().expect("a validated manifest encodes");
    serde_json::from_slice(&bytes).expect("canonical JSON parses")
}

fn describe(m: &Manifest) -> String {
    let mut text = format!(
        "{} {} (security version {}), compatible with [{}], created {}",
        m.product,
        m.version,
        m.security_version,
        m.compatible
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        abide_bundle::time::format_time(m.created)
    );
    if let Some(e) = m.expires {
        text.push_str(&format!(", expires {}", abide_bundle::time::format_time(e)));
    }
    for c in &m.components {
        text.push_str(&format!(
            "\n  {} (kind {}, slot {}): {} bytes in {} chunks, {} stored, sha256 {}",
            c.name,
            c.kind,
            c.slot_class,
            c.size,
            c.chunk_table.count,
            c.chunk_table.data_size,
            c.digest
        ));
    }
    text
}
