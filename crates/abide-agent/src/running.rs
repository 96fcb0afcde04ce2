//! What the running system says about itself, checked before an install writes anything: the
//! group the kernel was booted from (`abide.group=` on its command line, which the boot
//! scripts set) must be the group the bootloader's variables say booted, and must not be the
//! target; no slot of the target may be mounted. A bootloader state that disagrees with the
//! running system (a stale environment block read after a power cut, say) would otherwise
//! make the install choose the running root as its target.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use abide_boot::BootState;
use abide_core::Group;

use crate::config::{Config, SlotGroup, SlotKind};
use crate::error::{AgentError, Result};

/// Where the block device `dev` (major, minor) is mounted, from `/proc/self/mountinfo` text.
pub fn mounted_at(mountinfo: &str, dev: (u64, u64)) -> Option<String> {
    let want = format!("{}:{}", dev.0, dev.1);
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let id = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        (id == want).then(|| mount_point.to_owned())
    })
}

/// The group the running kernel was booted from, by its command line, if it says.
pub fn from_cmdline(config: &Config) -> Option<Group> {
    abide_boot::booted_from(config.cmdline.as_ref()?)
}

fn device_numbers(rdev: u64) -> (u64, u64) {
    (
        u64::from(rustix::fs::major(rdev)),
        u64::from(rustix::fs::minor(rdev)),
    )
}

/// The group whose block slot is mounted at `/`, if one is.
pub fn from_root(config: &Config) -> Option<Group> {
    root_group(
        config,
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
    )
}

/// The group whose block slot holds the mounted root file system, if one does.
fn root_group(config: &Config, mountinfo: &str) -> Option<Group> {
    let root = mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(4) == Some(&"/")).then(|| fields.get(2).map(|d| d.to_string()))?
    })?;
    config.groups.iter().find_map(|g| {
        g.slots
            .iter()
            .filter(|s| s.kind == SlotKind::Block)
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .filter(|m| m.file_type().is_block_device())
            .any(|m| {
                let (major, minor) = device_numbers(m.rdev());
                format!("{major}:{minor}") == root
            })
            .then(|| g.name.clone())
    })
}

/// Refuses an install into `target` that the running system contradicts; see the module
/// documentation. Changes nothing.
pub fn check(config: &Config, boot: &BootState, target: &SlotGroup) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    check_mounts(config, boot, target, &mountinfo)
}

/// [`check`] with the mount table given as `/proc/self/mountinfo` text.
pub fn check_mounts(
    config: &Config,
    boot: &BootState,
    target: &SlotGroup,
    mountinfo: &str,
) -> Result<()> {
    let refuse = |what: String| AgentError::RunningGroup { what };
    // The kernel command line first; else the block slot the root file system is on.
    let from_cmdline = config.cmdline.as_ref().and_then(|path| {
        Some((
            abide_boot::booted_from(path)?,
            format!("abide.group= on {}", path.display()),
        ))
    });
    let running = from_cmdline.or_else(|| {
        root_group(config, mountinfo).map(|g| (g, "the block slot mounted at /".to_owned()))
    });
    if let Some((running, source)) = running {
        if let Some(booted) = &boot.booted
            && *booted != running
        {
            return Err(refuse(format!(
                "the bootloader's variables say group {booted} booted, but the running system is group {running} ({source}): the bootloader state is stale or was changed; nothing is installed until they agree"
            )));
        }
        if running == target.name {
            return Err(refuse(format!(
                "group {running} is running ({source}) and would be the target: the bootloader's known-good group is not the one running"
            )));
        }
    }
    for slot in target.slots.iter().filter(|s| s.kind == SlotKind::Block) {
        let Ok(meta) = std::fs::metadata(&slot.path) else {
            continue;
        };
        if !meta.file_type().is_block_device() {
            continue;
        }
        if let Some(at) = mounted_at(mountinfo, device_numbers(meta.rdev())) {
            return Err(AgentError::TargetInUse {
                slot: slot.path.clone(),
                what: format!("it is mounted at {at}"),
            });
        }
    }
    Ok(())
}
