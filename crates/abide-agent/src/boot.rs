//! The boot-time step (`abide boot`): read what the bootloader booted, advance the
//! transaction, run the health gate during a trial, and commit or roll back.

use abide_core::{Action, BootReport};
use serde::Serialize;

use crate::device::Device;
use crate::error::Result;
use crate::health::{Clock, run_gate};

/// What the boot step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootOutcome {
    /// The group that booted.
    pub booted: Option<String>,
    /// The transaction's state afterwards, if there is one.
    pub state: Option<&'static str>,
    /// Whether the device must restart (a failed trial goes back to the known-good group).
    pub reboot: bool,
}

/// Runs the boot step.
pub fn boot(device: &mut Device, clock: &dyn Clock) -> Result<BootOutcome> {
    let mut state = device.state()?;
    let boot_state = device.bootloader().load()?;
    // The running kernel's own word (abide.group= on its command line) wins over the
    // bootloader's variables, which can be stale after a power cut.
    let booted = match crate::running::from_cmdline(&device.config) {
        Some(running) => {
            if boot_state.booted.as_ref().is_some_and(|b| *b != running) {
                device.record(
                    clock.now(),
                    "bootloader-disagrees",
                    serde_json::json!({"bootloader": boot_state.booted.as_ref().map(|g| g.to_string()),
                                       "running": running.to_string()}),
                )?;
            }
            Some(running)
        }
        None => boot_state.booted.clone(),
    };
    let mut outcome = BootOutcome {
        booted: booted.as_ref().map(ToString::to_string),
        state: state.transaction.as_ref().map(|t| t.state.name()),
        reboot: false,
    };
    if let Some(group) = &booted {
        switch_links(&device.config, group)?;
    }
    let (Some(booted), Some(mut tx)) = (booted, state.transaction.clone()) else {
        return Ok(outcome);
    };
    if tx.state.is_terminal() {
        return Ok(outcome);
    }
    let report = BootReport {
        booted,
        target_bootable: boot_state
            .bootable
            .get(&tx.target)
            .copied()
            .unwrap_or(false),
    };
    let actions = tx.booted(clock.now(), &report, device.config.boot_policy)?;
    let mut reboot = device.commit_step(clock.now(), &mut state, &tx, &actions)?;
    if actions.contains(&Action::RunHealthGate) {
        let verdict = run_gate(&device.config, &tx, clock);
        let actions = tx.health(clock.now(), verdict)?;
        reboot |= device.commit_step(clock.now(), &mut state, &tx, &actions)?;
    }
    outcome.state = Some(tx.state.name());
    outcome.reboot = reboot;
    Ok(outcome)
}

/// Points the link of every directory slot at the booted group's directory.
pub fn switch_links(config: &crate::config::Config, booted: &abide_core::Group) -> Result<()> {
    let Some(group) = config.group(booted) else {
        return Ok(());
    };
    for slot in &group.slots {
        if let Some(link) = &slot.link {
            point_link(link, &slot.path)?;
        }
    }
    Ok(())
}

/// Points the symbolic link `link` at `target`, atomically: a new link renamed over the old
/// one (never a moment without a link), then the directory synced. Nothing changes when it
/// already points there.
pub fn point_link(link: &std::path::Path, target: &std::path::Path) -> Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = link.with_file_name(format!(".{name}.abide-tmp"));
    let io = |op: &'static str, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| abide_fs::persist::IoError { op, path, source }
    };
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(target, &temp).map_err(io("creating link", &temp))?;
    std::fs::rename(&temp, link).map_err(io("switching link", link))?;
    abide_fs::persist::sync_dir(link.parent().unwrap_or(std::path::Path::new(".")))?;
    Ok(())
}
