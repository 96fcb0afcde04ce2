//! A device: its configuration, bootloader backend, state file and audit log, and the one
//! place where engine actions are carried out and every change is recorded.
//!
//! The order of every step: the audit record (I5), then the bootloader, then the state file.
//! The bootloader goes before the state file so that after a crash between the two the
//! bootloader is at most one step ahead, which `Transaction::booted` resolves (I7): a target
//! that boots was activated; a target made unbootable is never booted (I2).

use abide_boot::{BootState, Bootloader, GrubBootloader, SimBootloader};
use abide_core::{Action, Group, Transaction, TxState};
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::audit::AuditLog;
use crate::config::{Backend, Config};
use crate::error::{AgentError, Result};
use crate::lock::{Contention, DeviceLock};
use crate::state::DeviceRecord;

/// An opened device.
pub struct Device {
    /// Its configuration.
    pub config: Config,
    bootloader: Box<dyn Bootloader>,
    /// None when opened read-only.
    audit: Option<AuditLog>,
    _lock: Option<DeviceLock>,
}

impl Device {
    /// Opens the device described by `config` to change it: takes the state directory's lock
    /// (failing with `busy` while another process holds it) and opens the audit log
    /// (repairing a torn last record if there is one).
    pub fn open(config: Config) -> Result<Device> {
        Device::open_as_writer(config, Contention::Fail)
    }

    /// [`Device::open`] for an install: the audit log must be whole, and is not repaired (a
    /// missing log or a torn last record is refused with nothing changed).
    pub fn open_intact(config: Config) -> Result<Device> {
        Device::open_with(config, Contention::Fail, AuditLog::open_intact)
    }

    /// [`Device::open`], waiting for the lock instead of failing (the boot step, the agent).
    pub fn open_waiting(config: Config) -> Result<Device> {
        Device::open_as_writer(config, Contention::Wait)
    }

    /// Opens the device to look at it: no lock, no write anywhere (works on a read-only state
    /// directory); [`Device::record`] and [`Device::commit_step`] refuse.
    pub fn open_read_only(config: Config) -> Result<Device> {
        let bootloader = backend(&config);
        Ok(Device {
            config,
            bootloader,
            audit: None,
            _lock: None,
        })
    }

    fn open_as_writer(config: Config, contention: Contention) -> Result<Device> {
        Device::open_with(config, contention, AuditLog::open)
    }

    /// Takes the lock, then opens the audit log with `open_log`.
    fn open_with(
        config: Config,
        contention: Contention,
        open_log: fn(
            &std::path::Path,
        ) -> std::result::Result<
            (AuditLog, crate::audit::OpenReport),
            crate::audit::AuditError,
        >,
    ) -> Result<Device> {
        let lock = DeviceLock::take(&config.state_dir, contention)?;
        let bootloader = backend(&config);
        let log = config.state_dir.join("audit.log");
        let (audit, _) = crate::room::with_reserve(&config.state_dir, || Ok(open_log(&log)?))?;
        crate::room::keep_reserve(&config.state_dir);
        Ok(Device {
            config,
            bootloader,
            audit: Some(audit),
            _lock: Some(lock),
        })
    }

    /// The audit log's signed head (None when opened read-only).
    pub fn audit_head(&self) -> Option<abide_fleet_json::AuditHead> {
        self.audit.as_ref().and_then(AuditLog::signed_head)
    }

    /// The bootloader backend.
    pub fn bootloader(&self) -> &dyn Bootloader {
        self.bootloader.as_ref()
    }

    /// The device state.
    pub fn state(&self) -> Result<DeviceRecord> {
        DeviceRecord::load(&self.config.state_dir)
    }

    /// Appends an audit record and makes it durable.
    pub fn record(&mut self, now: Timestamp, event: &str, details: Value) -> Result<()> {
        let details = match details {
            Value::Object(map) => map,
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        let audit = self.audit.as_mut().ok_or_else(|| AgentError::State {
            path: self.config.state_dir.clone(),
            what: "the device was opened read-only".into(),
        })?;
        let state_dir = &self.config.state_dir;
        crate::room::with_reserve(state_dir, || {
            Ok(audit.append(now, event, details.clone())?)
        })?;
        Ok(())
    }

    /// Records a transaction's change (audit, then state file), then carries out the actions
    /// the engine returned, in order. Returns whether a reboot was asked for.
    pub fn commit_step(
        &mut self,
        now: Timestamp,
        state: &mut DeviceRecord,
        tx: &Transaction,
        actions: &[Action],
    ) -> Result<bool> {
        let mut details = json!({"transaction": tx.id, "version": tx.version.to_string(), "state": tx.state.name(),
                                 "target": tx.target.as_str()});
        match &tx.state {
            abide_core::TxState::RolledBack { reason } => {
                details["reason"] = json!(reason.to_string());
                details["reason_kind"] = json!(reason.kind());
            }
            abide_core::TxState::Failed { reason } => details["reason"] = json!(reason.to_string()),
            _ => {}
        }
        if tx.gate == abide_core::Gate::Manual {
            details["gate"] = json!("manual");
        }
        self.record(now, event(&tx.state), details)?;
        state.transaction = Some(tx.clone());
        let mut reboot = false;
        let mut boot: Option<BootState> = None;
        for action in actions {
            match action {
                Action::MarkUnbootable { .. }
                | Action::TryNext { .. }
                | Action::MarkGood { .. } => {
                    let s = match boot.as_mut() {
                        Some(s) => s,
                        None => boot.insert(self.bootloader.load()?),
                    };
                    s.apply(action)
                        .map_err(|e| abide_boot::BootError::Inconsistent {
                            path: self.config.boot_path.clone(),
                            what: e.to_string(),
                        })?;
                    if let Action::MarkGood { group } = action {
                        state.version = tx.version.clone();
                        state.groups.insert(group.clone(), Some(tx.version.clone()));
                    }
                }
                Action::RaiseSecurityVersion { to } => {
                    state.security_version = state.security_version.max(*to)
                }
                Action::Quarantine { version, reason } => {
                    state.quarantine.add(version, reason, now)
                }
                Action::RunHealthGate => {}
                Action::Reboot => reboot = true,
            }
        }
        if let Some(s) = boot {
            self.bootloader.store(&s)?;
        }
        state.store(&self.config.state_dir)?;
        // Once a commit or a rollback is durable: its hook (a failure is recorded, and
        // changes nothing; after a crash right here it may run again on the next step).
        let hook = match &tx.state {
            TxState::Committed { .. } => Some((crate::hooks::Hook::PostCommit, None)),
            TxState::RolledBack { reason } => {
                Some((crate::hooks::Hook::OnRollback, Some(reason.to_string())))
            }
            _ => None,
        };
        if let Some((hook, reason)) = hook {
            let context = crate::hooks::Context {
                transaction: tx.id.clone(),
                version: tx.version.to_string(),
                from_version: state
                    .groups
                    .get(&tx.good)
                    .cloned()
                    .flatten()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                target: tx.target.to_string(),
                good: tx.good.to_string(),
                reason,
            };
            crate::hooks::run(self, hook, &context, now)?;
        }
        Ok(reboot)
    }

    /// Moves the current transaction with `step` (one of the engine's transitions) and carries
    /// out its actions; `what` names the step in the error when there is no transaction.
    /// Returns the transaction and whether a reboot was asked for.
    pub fn advance(
        &mut self,
        now: Timestamp,
        what: &'static str,
        step: impl FnOnce(&mut Transaction) -> abide_core::Result<Vec<Action>>,
    ) -> Result<(Transaction, bool)> {
        let mut state = self.state()?;
        let mut tx = state
            .transaction
            .clone()
            .ok_or(AgentError::NoTransaction(what))?;
        let actions = step(&mut tx)?;
        let reboot = self.commit_step(now, &mut state, &tx, &actions)?;
        Ok((tx, reboot))
    }

    /// Runs the configured reboot command, if there is one (a simulated device has none).
    pub fn reboot(&self) -> Result<()> {
        let Some((program, args)) = self
            .config
            .reboot
            .as_deref()
            .and_then(<[String]>::split_first)
        else {
            return Ok(());
        };
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .map_err(|source| abide_fs::persist::IoError {
                op: "running the reboot command",
                path: program.into(),
                source,
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(AgentError::State {
                path: self.config.path.clone(),
                what: format!("the reboot command {program} failed: {status}"),
            })
        }
    }

    /// The group that booted (as the running kernel's command line says, else as the
    /// bootloader recorded) and the known-good group.
    pub fn groups(&self) -> Result<(Option<Group>, Option<Group>)> {
        let s = self.bootloader.load()?;
        let booted = crate::running::from_cmdline(&self.config).or(s.booted.clone());
        Ok((booted, s.good().cloned()))
    }
}

/// The audit event for a transaction reaching `state`.
pub fn event(state: &TxState) -> &'static str {
    match state {
        TxState::Downloading => "begin",
        TxState::Staged => "stage",
        TxState::Activated { .. } => "activate",
        TxState::Trial { .. } => "trial",
        TxState::Committed { .. } => "commit",
        TxState::Failed { .. } => "fail",
        TxState::RolledBack { .. } => "rollback",
    }
}

/// The bootloader backend a configuration names.
fn backend(config: &Config) -> Box<dyn Bootloader> {
    Box::new(Configured {
        inner: raw_backend(config),
        groups: config.group_names(),
        path: config.boot_path.clone(),
    })
}

/// A backend whose loaded state must name only the configured groups: a state file damaged
/// into naming others (or none) is the bootloader's error, before anything acts on it.
struct Configured {
    inner: Box<dyn Bootloader>,
    groups: Vec<abide_core::Group>,
    path: std::path::PathBuf,
}

impl Bootloader for Configured {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn load(&self) -> std::result::Result<abide_boot::BootState, abide_boot::BootError> {
        let state = self.inner.load()?;
        let known = |g: &abide_core::Group| self.groups.contains(g);
        let named = state
            .order
            .iter()
            .chain(state.trial.as_ref().map(|(g, _)| g))
            .chain(state.bootable.keys())
            .chain(state.booted.as_ref());
        if let Some(stranger) = named.into_iter().find(|g| !known(g)) {
            return Err(abide_boot::BootError::Inconsistent {
                path: self.path.clone(),
                what: format!(
                    "the bootloader's state names group {stranger}, which system.toml does not configure"
                ),
            });
        }
        if let Some(missing) = self.groups.iter().find(|g| !state.order.contains(g)) {
            return Err(abide_boot::BootError::Inconsistent {
                path: self.path.clone(),
                what: format!("the bootloader's boot order leaves out group {missing}"),
            });
        }
        Ok(state)
    }

    fn store(
        &self,
        state: &abide_boot::BootState,
    ) -> std::result::Result<(), abide_boot::BootError> {
        self.inner.store(state)
    }
}

fn raw_backend(config: &Config) -> Box<dyn Bootloader> {
    match config.backend.clone() {
        Backend::Sim => Box::new(SimBootloader::new(&config.boot_path)),
        Backend::Grub => Box::new(GrubBootloader::new(&config.boot_path)),
        Backend::Gpt { cmdline } => Box::new(abide_boot::GptBootloader::new(
            &config.boot_path,
            &cmdline,
            &config.group_names(),
        )),
        Backend::SystemdBoot { cmdline } => Box::new(abide_boot::SystemdBootBootloader::new(
            &config.boot_path,
            &cmdline,
            &config.group_names(),
        )),
        Backend::Uboot { redundant, size } => {
            let copies: Vec<_> = std::iter::once(config.boot_path.clone())
                .chain(redundant.clone())
                .collect();
            Box::new(abide_boot::UbootBootloader::new(&copies, size))
        }
    }
}
