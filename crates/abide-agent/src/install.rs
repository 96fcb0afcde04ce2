//! The install pipeline: verify the bundle and everything about this device before anything
//! changes; then make the target unbootable, stream each component into its slot with every
//! chunk checked, verify each component digest, and hand the target to the bootloader for a
//! trial.

use abide_bundle::chunks::Reuse;
use abide_bundle::delta::{DeltaReader, Kind, VerifiedDelta};
use abide_bundle::source::Peeked;
use abide_bundle::{BundleReader, Limits, Source};
use abide_core::{FailReason, Force, Gate, Installed, Transaction, TxState, admit};

use crate::hooks::Hook;
use jiff::Timestamp;
use serde_json::json;

use crate::config::Slot;
use crate::device::Device;
use crate::error::{AgentError, Result};
use crate::index::SlotChunks;
use crate::slots::{SlotWriter, capacity};

/// How an install ends for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallOutcome {
    /// The transaction, now activated.
    pub transaction: Transaction,
    /// Whether the engine asked for a reboot (the caller runs the reboot command if there is
    /// one and `--no-reboot` was not given).
    pub reboot: bool,
    /// What was copied from the running group instead of read from the bundle.
    pub reused: Reuse,
    /// Bundle bytes consumed, read or passed over.
    pub bundle_bytes: u64,
    /// The post-install hook's run, if one is configured.
    pub hooks: Vec<crate::hooks::HookRun>,
}

/// Installs the bundle read from `src` into the group that is not the known-good one and
/// activates it for a trial: [`stage`], then [`activate`].
pub fn install(
    device: &mut Device,
    src: &mut dyn Source,
    force: Force,
    gate: Gate,
    now: &dyn Fn() -> Timestamp,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<InstallOutcome> {
    let staged = stage(device, src, force, gate, now, progress)?;
    let (transaction, reboot) = activate(device, now())?;
    Ok(InstallOutcome {
        transaction,
        reboot,
        reused: staged.reused,
        bundle_bytes: staged.bundle_bytes,
        hooks: staged.hooks,
    })
}

/// How a stage ends for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    /// The transaction, now staged.
    pub transaction: Transaction,
    /// What was copied from the running group instead of read from the bundle.
    pub reused: Reuse,
    /// Bundle bytes consumed, read or passed over.
    pub bundle_bytes: u64,
    /// The post-install hook's run, if one is configured.
    pub hooks: Vec<crate::hooks::HookRun>,
}

/// Hands the staged transaction's target to the bootloader for a trial; returns it and
/// whether the engine asked for a reboot.
/// The pre-reboot hook runs first: if it fails, the target is abandoned, still unbootable,
/// and the error carries the hook's output.
pub fn activate(device: &mut Device, now: Timestamp) -> Result<(Transaction, bool)> {
    let state = device.state()?;
    if let Some(tx) = state
        .transaction
        .as_ref()
        .filter(|tx| tx.state == TxState::Staged)
    {
        let context = crate::hooks::Context {
            transaction: tx.id.clone(),
            version: tx.version.to_string(),
            from_version: state.version.to_string(),
            target: tx.target.to_string(),
            good: tx.good.to_string(),
            reason: None,
        };
        if let Some(run) = crate::hooks::run(device, Hook::PreReboot, &context, now)?
            && !run.ok
        {
            let e = run.error();
            abandon(
                device,
                now,
                FailReason::Refused {
                    code: e.code().to_owned(),
                    detail: e.to_string(),
                },
            )?;
            return Err(e);
        }
    }
    let policy = device.config.boot_policy;
    device.advance(now, "activate", |tx| tx.activate(now, policy))
}

/// Ends an install that has not been activated: `reason` says why (a download a stopped
/// process left behind is [`FailReason::Interrupted`]; a withdrawn one is cancelled). The
/// target stays unbootable.
pub fn abandon(device: &mut Device, now: Timestamp, reason: FailReason) -> Result<Transaction> {
    Ok(device.advance(now, "abandon", |tx| tx.fail(now, reason))?.0)
}

/// Verifies the bundle read from `src`, writes it into the group that is not the known-good
/// one, and stages it (every digest verified, the target still unbootable); `progress` hears
/// (bytes written, bytes in all) as it goes; `gate` says what will end its trial. A refusal before the first change is recorded in
/// the audit log and changes no slot, no bootloader variable and no counter (I9).
pub fn stage(
    device: &mut Device,
    src: &mut dyn Source,
    force: Force,
    gate: Gate,
    now: &dyn Fn() -> Timestamp,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StageOutcome> {
    let mut state = device.state()?;
    if let Some(tx) = &state.transaction
        && !tx.state.is_terminal()
    {
        return Err(AgentError::Busy {
            id: tx.id.clone(),
            state: tx.state.name(),
        });
    }
    let planned = plan(device, &state, src, force, now());
    let (mut bundle, version, security_version, slots) = match planned {
        Ok(p) => p,
        Err(e) if e.is_refusal() => return Err(refused(device, now(), e)?),
        Err(e) => return Err(e),
    };
    let boot = device.bootloader().load()?;
    let good = boot.good().cloned().ok_or_else(|| AgentError::State {
        path: device.config.boot_path.clone(),
        what: "the bootloader has no bootable group".into(),
    })?;
    let target = device
        .config
        .group_names()
        .into_iter()
        .find(|g| *g != good)
        .expect("two groups");
    // Unique against the last transaction too (two installs of one version in one second).
    let base = format!("tx-{}-{version}", now().as_second());
    let id = match state.transaction.as_ref().map(|t| t.id.as_str()) {
        Some(last) if last == base || last.starts_with(&format!("{base}-")) => {
            let n = last
                .strip_prefix(&format!("{base}-r"))
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(1);
            format!("{base}-r{}", n + 1)
        }
        _ => base,
    };
    let context = crate::hooks::Context {
        transaction: id.clone(),
        version: version.to_string(),
        from_version: state.version.to_string(),
        target: target.to_string(),
        good: good.to_string(),
        reason: None,
    };
    // The pre-install hook: after every check, before anything changes; its failure is a
    // refusal like any other.
    if let Some(run) = crate::hooks::run(device, Hook::PreInstall, &context, now())?
        && !run.ok
    {
        return Err(refused(device, now(), run.error())?);
    }

    // From here on, every step is recorded and durable before the next (I5).
    let (mut tx, actions) =
        Transaction::begin(&id, version, security_version, good, target.clone(), now())?;
    tx.gate = gate;
    device.commit_step(now(), &mut state, &tx, &actions)?;
    let group = device.config.group(&target).expect("configured").clone();
    let good_group = device.config.group(&tx.good).expect("configured").clone();
    let state_dir = device.config.state_dir.clone();
    let mut reused = Reuse::default();
    bundle.set_checks(device.config.bundle_checks);
    let total: u64 = bundle.manifest().components.iter().map(|c| c.size).sum();
    let mut done = 0u64;
    let written = (|| -> Result<()> {
        // The target's chunk indexes go before its first byte changes.
        crate::index::remove(
            &state_dir,
            &target,
            &group
                .slots
                .iter()
                .map(|s| s.class.clone())
                .collect::<Vec<_>>(),
        )?;
        for class in &slots {
            let slot = group
                .slots
                .iter()
                .find(|s| &s.class == class)
                .expect("planned");
            // Chunks the running group's slot of the same class holds are copied from it
            // (read-only: the known-good group is never opened for writing, I1).
            let local = good_group
                .slots
                .iter()
                .find(|s| &s.class == class)
                .filter(|s| s.kind != crate::config::SlotKind::Dir)
                .and_then(|s| SlotChunks::open(&state_dir, &tx.good, class, &s.path));
            let mut writer = SlotWriter::open(slot)?;
            let mut sink = |data: &[u8]| {
                done += data.len() as u64;
                progress(done, total);
                writer.write(data)
            };
            let read = match &mut bundle {
                Opened::Bundle(b) => b.read_chunk_table().and_then(|table| {
                    let r = b.read_chunks_reusing(
                        &table,
                        &|entry, buf| local.as_ref().is_some_and(|l| l.read_into(entry, buf)),
                        &mut sink,
                    )?;
                    Ok((table, r))
                }),
                Opened::Delta(d) => d.read_tables().and_then(|(table, _)| {
                    let a = d.apply(
                        &table,
                        local.as_ref().map(|l| l as &dyn abide_bundle::delta::Base),
                        &mut sink,
                    )?;
                    let r = Reuse {
                        chunks: a.copied_chunks,
                        bytes: a.copied_bytes,
                        skipped: 0,
                    };
                    Ok((table, r))
                }),
            };
            let (table, r) = match read {
                Ok(r) => r,
                // A writer that stopped (a refused archive entry, a full disk) says why.
                Err(e) => {
                    writer.finish()?;
                    return Err(e.into());
                }
            };
            writer.finish()?;
            if slot.kind != crate::config::SlotKind::Dir {
                crate::index::write(&state_dir, &target, class, &table)?;
            }
            reused.chunks += r.chunks;
            reused.bytes += r.bytes;
            reused.skipped += r.skipped;
        }
        bundle.finish()?;
        Ok(())
    })();
    let bundle_bytes = bundle.position();
    if let Err(e) = written {
        let reason = match &e {
            // The source was told to stop (the fleet withdrew the release): not a failure of
            // the bundle or of the device.
            AgentError::Bundle(abide_bundle::Error::Io { source, .. })
                if source
                    .get_ref()
                    .is_some_and(|e| e.is::<crate::fleet::source::Stopped>()) =>
            {
                FailReason::Cancelled
            }
            AgentError::Bundle(b) if b.code() != "io" => FailReason::Refused {
                code: b.code().to_owned(),
                detail: b.to_string(),
            },
            other => FailReason::Io {
                detail: other.to_string(),
            },
        };
        let actions = tx.fail(now(), reason)?;
        device.commit_step(now(), &mut state, &tx, &actions)?;
        return Err(e);
    }
    let actions = tx.staged(now())?;
    device.commit_step(now(), &mut state, &tx, &actions)?;
    // The post-install hook: its failure is recorded and reported, and changes nothing.
    let hooks = crate::hooks::run(device, Hook::PostInstall, &context, now())?
        .into_iter()
        .collect();
    Ok(StageOutcome {
        transaction: tx,
        reused,
        bundle_bytes,
        hooks,
    })
}

/// Records a refusal (a check failed before anything changed) in the audit log and gives the
/// error back.
fn refused(device: &mut Device, now: Timestamp, e: AgentError) -> Result<AgentError> {
    device.record(
        now,
        "refuse",
        json!({"code": e.code(), "detail": e.to_string()}),
    )?;
    Ok(e)
}

/// What an install reads: a bundle, or a delta against the running group.
enum Opened<S> {
    Bundle(Box<abide_bundle::VerifiedBundle<S>>),
    Delta(Box<VerifiedDelta<S>>),
}

impl<S: Source> Opened<S> {
    fn manifest(&self) -> &abide_bundle::Manifest {
        match self {
            Opened::Bundle(b) => b.manifest(),
            Opened::Delta(d) => d.manifest(),
        }
    }

    fn set_checks(&mut self, checks: abide_bundle::chunks::Checks) {
        match self {
            Opened::Bundle(b) => b.set_checks(checks),
            Opened::Delta(d) => d.set_checks(checks),
        }
    }

    fn position(&self) -> u64 {
        match self {
            Opened::Bundle(b) => b.position(),
            Opened::Delta(d) => d.position(),
        }
    }

    fn finish(&mut self) -> abide_bundle::Result<()> {
        match self {
            Opened::Bundle(b) => b.finish(),
            Opened::Delta(d) => d.finish(),
        }
    }
}

type Plan<'a> = (
    Opened<Peeked<&'a mut dyn Source>>,
    semver::Version,
    u64,
    Vec<String>,
);

/// Every check that needs no change: signatures and policy, product, quarantine and version
/// order, and a slot of the right class and size for every component in the target group.
fn plan<'a>(
    device: &Device,
    state: &crate::state::DeviceRecord,
    src: &'a mut dyn Source,
    force: Force,
    now: Timestamp,
) -> Result<Plan<'a>> {
    let config = &device.config;
    let limits = Limits::default();
    let (kind, src) = Peeked::new(src).map_err(|source| abide_bundle::Error::Io {
        what: "reading the bundle",
        source,
    })?;
    let bundle = crate::trust::admit(
        config,
        state.security_version,
        now,
        |policy| {
            Ok(match kind {
                Some(Kind::Delta) => {
                    Opened::Delta(Box::new(DeltaReader::open(src, limits)?.verify(policy)?))
                }
                _ => Opened::Bundle(Box::new(BundleReader::open(src, limits)?.verify(policy)?)),
            })
        },
        |b| b.manifest(),
    )?;
    let manifest = bundle.manifest().clone();
    if crate::selfupdate::is_agent_bundle(&manifest) {
        return Err(AgentError::SelfUpdate {
            what: "a bundle that carries the agent is installed by the running agent: `abide schedule update --source FILE`".into(),
        });
    }
    if crate::app::is_app_bundle(config, &manifest) {
        return Err(AgentError::App {
            app: manifest.components[0].slot_class.to_string(),
            what: "an application bundle is installed from a file (`abide install FILE`) or by a schedule (`abide schedule update`)".into(),
        });
    }
    let installed = Installed {
        version: state.version.clone(),
        security_version: state.security_version,
    };
    admit(
        &installed,
        &manifest.version,
        manifest.security_version,
        &state.quarantine,
        force,
    )?;
    let boot = device.bootloader().load()?;
    let good = boot.good().cloned();
    let target = config
        .group_names()
        .into_iter()
        .find(|g| Some(g) != good.as_ref())
        .expect("two groups");
    let group = config.group(&target).expect("configured");
    crate::running::check(config, &boot, group)?;
    let mut classes = Vec::new();
    for c in &manifest.components {
        let slot: &Slot = group
            .slots
            .iter()
            .find(|s| s.class == c.slot_class.as_str())
            .ok_or_else(|| AgentError::NoSlot {
                group: target.to_string(),
                class: c.slot_class.to_string(),
                component: c.name.to_string(),
            })?;
        if classes.contains(&slot.class) {
            return Err(AgentError::NoSlot {
                group: target.to_string(),
                class: format!("{} (a second component for the same slot)", slot.class),
                component: c.name.to_string(),
            });
        }
        let cap = capacity(slot)?;
        if c.size > cap {
            return Err(AgentError::TooSmall {
                component: c.name.to_string(),
                size: c.size,
                slot: slot.path.clone(),
                capacity: cap,
            });
        }
        if let Opened::Delta(d) = &bundle {
            check_base(device, d, c, slot, good.as_ref())?;
        }
        classes.push(slot.class.clone());
    }
    // The state directory takes a chunk index per slot, the state file and the audit records.
    let needed: u64 = manifest
        .components
        .iter()
        .map(|c| c.chunk_table.count * 36 + 8)
        .sum::<u64>()
        + (256 << 10);
    // Inodes: a chunk index per slot, the state file's temporary copy and the audit head's.
    crate::room::ensure(
        &config.state_dir,
        crate::room::Need {
            bytes: needed,
            reserve: config.state_reserve,
            inodes: manifest.components.len() as u64 + 2,
            what: "the install's state files",
        },
    )?;
    Ok((bundle, manifest.version, manifest.security_version, classes))
}

/// A delta applies only where the running group's slot of the component's class holds
/// exactly the content the delta was made against (by its chunk list), and only to a slot
/// whose content is one file or device: checked before anything changes.
fn check_base<S: Source>(
    device: &Device,
    delta: &VerifiedDelta<S>,
    component: &abide_bundle::Component,
    target: &Slot,
    good: Option<&abide_core::Group>,
) -> Result<()> {
    let refuse = |what: String| {
        Err(AgentError::Bundle(abide_bundle::Error::DeltaBase {
            component: component.name.to_string(),
            what,
        }))
    };
    let class = component.slot_class.as_str();
    if target.kind == crate::config::SlotKind::Dir {
        return refuse(format!(
            "slot class {class} is a directory slot, which a delta cannot be applied to; install the full bundle"
        ));
    }
    let Some(base) = delta.head().base(class) else {
        return Ok(());
    };
    let config = &device.config;
    let held = good
        .and_then(|g| config.group(g).map(|grp| (g, grp)))
        .and_then(|(g, grp)| {
            let slot = grp.slots.iter().find(|s| s.class == class)?;
            SlotChunks::open(&config.state_dir, g, class, &slot.path)
        });
    match held {
        Some(h) if h.digest() == base.index => Ok(()),
        Some(_) => refuse(format!(
            "the delta was made against version {} and the running slot of class {class} holds other content; install the full bundle",
            delta.head().from.version
        )),
        None => refuse(format!(
            "the delta was made against version {} and the running group has no chunk index for slot class {class}; install the full bundle",
            delta.head().from.version
        )),
    }
}
