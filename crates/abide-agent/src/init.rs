//! `abide device init`: sets up a real device once. It checks the configuration's slots and
//! state directory, then writes the bootloader's first variables (the running group known-good
//! and booted, the other group not bootable until an install verified it) and the first state
//! file, and records it in the audit log. It refuses to run again unless forced: the state it
//! would replace is the device's memory of its updates.

use abide_boot::BootState;
use abide_core::{Group, Quarantine};
use jiff::Timestamp;
use semver::Version;
use serde_json::json;

use crate::config::{Config, SlotKind};
use crate::device::Device;
use crate::error::{AgentError, Result};
use crate::state::{DeviceRecord, FORMAT};

/// How to initialise.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The version the running group holds.
    pub version: Version,
    /// The running group; from the kernel command line (`abide.group=`) or the block slot
    /// mounted at `/` when `None`.
    pub group: Option<Group>,
    /// Replace an existing state file.
    pub force: bool,
}

/// What was set up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Initialized {
    /// The running, known-good group.
    pub group: String,
    /// The other group, not bootable until an install.
    pub other: String,
    /// The version recorded for the running group.
    pub version: String,
    /// Each slot with its capacity in bytes (directories: none).
    pub slots: Vec<(String, Option<u64>)>,
}

/// Sets the device up; see the module documentation. Checks everything before it writes.
pub fn init(config: Config, options: &InitOptions) -> Result<Initialized> {
    let refuse = |what: String| AgentError::Config {
        path: config.path.clone(),
        what,
    };
    let running = match &options.group {
        Some(g) => g.clone(),
        None => crate::running::from_cmdline(&config)
            .or_else(|| crate::running::from_root(&config))
            .ok_or_else(|| {
                refuse(
                    "which group runs? The kernel command line has no abide.group= and no block slot is mounted at /; say it with --group".into(),
                )
            })?,
    };
    let other = config
        .group_names()
        .into_iter()
        .find(|g| *g != running)
        .ok_or_else(|| {
            refuse(format!(
                "group {running} is not one of the configured groups"
            ))
        })?;
    if config.group(&running).is_none() {
        return Err(refuse(format!(
            "group {running} is not one of the configured groups"
        )));
    }
    let mut slots = Vec::new();
    for group in &config.groups {
        for slot in &group.slots {
            let meta = std::fs::metadata(&slot.path).map_err(|e| {
                refuse(format!(
                    "group {} slot {} ({}): {e}",
                    group.name,
                    slot.class,
                    slot.path.display()
                ))
            })?;
            let capacity = match slot.kind {
                SlotKind::Dir => {
                    if !meta.is_dir() {
                        return Err(refuse(format!(
                            "slot {} is kind dir but {} is not a directory",
                            slot.class,
                            slot.path.display()
                        )));
                    }
                    None
                }
                _ => Some(crate::slots::capacity(slot)?),
            };
            slots.push((slot.path.display().to_string(), capacity));
        }
    }
    let state_path = DeviceRecord::path(&config.state_dir);
    if state_path.exists() && !options.force {
        return Err(AgentError::Initialized { path: state_path });
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|source| abide_fs::persist::IoError {
        op: "creating the state directory",
        path: config.state_dir.clone(),
        source,
    })?;
    // Checked; now written: the audit record, the bootloader, the state file.
    let mut device = Device::open(config)?;
    let now = Timestamp::now();
    device.record(
        now,
        "init",
        json!({"group": running.to_string(), "version": options.version.to_string(), "forced": options.force}),
    )?;
    let mut boot = BootState::new(&[running.clone(), other.clone()]);
    boot.bootable.insert(other.clone(), false);
    boot.booted = Some(running.clone());
    device.bootloader().store(&boot)?;
    DeviceRecord {
        format: FORMAT,
        version: options.version.clone(),
        security_version: 0,
        groups: [
            (running.clone(), Some(options.version.clone())),
            (other.clone(), None),
        ]
        .into_iter()
        .collect(),
        transaction: None,
        quarantine: Quarantine::default(),
    }
    .store(&device.config.state_dir)?;
    Ok(Initialized {
        group: running.to_string(),
        other: other.to_string(),
        version: options.version.to_string(),
        slots,
    })
}
