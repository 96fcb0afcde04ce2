//! The `grub` backend: the boot state in GRUB's environment block, with the counting done by
//! GRUB itself through the shipped script `grub/abide.cfg` (see that file for the variables).
//! Groups are `A` and `B`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abide_core::Group;

use crate::backend::{BootError, Bootloader};
use crate::grubenv::GrubEnv;
use crate::state::{BootState, MAX_TRIES};
use abide_fs::persist::{overwrite_in_place, read_bounded, write_new};

/// The GRUB script that implements the boot counting; install it beside grub.cfg.
pub const SCRIPT: &str = include_str!("../grub/abide.cfg");

/// A GRUB installation whose environment block is at `path`.
#[derive(Debug, Clone)]
pub struct GrubBootloader {
    path: PathBuf,
    groups: [Group; 2],
}

impl GrubBootloader {
    /// The backend for the block at `path`.
    pub fn new(path: &Path) -> GrubBootloader {
        GrubBootloader {
            path: path.to_owned(),
            groups: [
                Group::new("A").expect("valid"),
                Group::new("B").expect("valid"),
            ],
        }
    }

    /// The state an environment block describes.
    pub fn state_of(&self, env: &GrubEnv) -> Result<BootState, BootError> {
        env_to_state(&self.path, &self.groups, |name| env.get(name))
    }

    /// Writes `state` into `env` (in memory).
    pub fn fill(&self, env: &mut GrubEnv, state: &BootState) -> Result<(), BootError> {
        state_to_env(&self.groups, state, |name, value| {
            env.set(name, value).map_err(|source| BootError::Grub {
                path: self.path.clone(),
                source,
            })
        })
    }

    fn read_env(&self) -> Result<GrubEnv, BootError> {
        read_env(&self.path)
    }

    /// The block that names the known-good group for when grubenv cannot be read:
    /// `abide-good.env` beside it (the script loads it from `${prefix}`).
    pub fn fallback_path(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or(Path::new("."))
            .join("abide-good.env")
    }

    /// The state the fallback block describes: its group known-good and booted (GRUB boots
    /// it when grubenv is lost), the other not bootable, no trial.
    fn fallback_state(&self) -> Result<BootState, BootError> {
        let env = read_env(&self.fallback_path())?;
        let mut state = env_to_state(&self.fallback_path(), &self.groups, |n| env.get(n))?;
        state.trial = None;
        state.booted = state.good().cloned();
        Ok(state)
    }

    /// Rewrites the fallback block if it does not name `state`'s known-good group yet.
    fn store_fallback(&self, state: &BootState) -> Result<(), BootError> {
        let Some(good) = state.good() else {
            return Ok(());
        };
        let path = self.fallback_path();
        let mut wanted = BootState::new(&self.groups);
        wanted.order = std::iter::once(good.clone())
            .chain(self.groups.iter().filter(|g| *g != good).cloned())
            .collect();
        for g in &self.groups {
            wanted.bootable.insert(g.clone(), g == good);
        }
        let (mut env, exists) = match read_env(&path) {
            Ok(env) => (env, true),
            Err(BootError::Io(e)) if e.source.kind() == std::io::ErrorKind::NotFound => {
                (GrubEnv::default(), false)
            }
            // A damaged fallback is rewritten whole (in place, its size kept).
            Err(BootError::Grub { .. }) => (GrubEnv::default(), true),
            Err(e) => return Err(e),
        };
        let current = env_to_state(&path, &self.groups, |n| env.get(n)).ok();
        if exists && current.as_ref().and_then(BootState::good) == Some(good) {
            return Ok(());
        }
        state_to_env(&self.groups, &wanted, |name, value| {
            env.set(name, value).map_err(|source| BootError::Grub {
                path: path.clone(),
                source,
            })
        })?;
        let block = env.to_block().map_err(|source| BootError::Grub {
            path: path.clone(),
            source,
        })?;
        if exists {
            overwrite_in_place(&path, &block)?;
        } else {
            write_new(&path, &block, 0o644)?;
        }
        Ok(())
    }
}

fn read_env(path: &Path) -> Result<GrubEnv, BootError> {
    let bytes = read_bounded(path, 64 << 10)?;
    GrubEnv::parse(&bytes).map_err(|source| BootError::Grub {
        path: path.to_owned(),
        source,
    })
}

impl Bootloader for GrubBootloader {
    fn name(&self) -> &'static str {
        "grub"
    }

    /// The state in grubenv; when grubenv cannot be read (missing or damaged), what GRUB then
    /// boots: the known-good group of the fallback block.
    fn load(&self) -> Result<BootState, BootError> {
        match self.read_env() {
            Ok(env) => self.state_of(&env),
            Err(lost @ (BootError::Grub { .. } | BootError::Io(_))) => {
                self.fallback_state().map_err(|_| lost)
            }
            Err(e) => Err(e),
        }
    }

    /// Rewrites the block in place (same inode, same size, fsynced), as GRUB's own tools do:
    /// GRUB reads the file's blocks without replaying the file system's journal, so a block
    /// renamed into place could stay invisible to it after a power cut. A missing block is
    /// created (as `grub-editenv create` would) with the default size.
    fn store(&self, state: &BootState) -> Result<(), BootError> {
        // The fallback first: before a store can start writing the group it names (the
        // install's first store marks its target unbootable), it names the new known-good one.
        self.store_fallback(state)?;
        // Other variables in the block (GRUB's own, like saved_entry) are kept; a damaged
        // block is rewritten whole, in place.
        let (mut env, exists) = match self.read_env() {
            Ok(env) => (env, true),
            Err(BootError::Io(e)) if e.source.kind() == std::io::ErrorKind::NotFound => {
                (GrubEnv::default(), false)
            }
            Err(BootError::Grub { .. }) => (GrubEnv::default(), true),
            Err(e) => return Err(e),
        };
        self.fill(&mut env, state)?;
        let block = env.to_block().map_err(|source| BootError::Grub {
            path: self.path.clone(),
            source,
        })?;
        if exists {
            overwrite_in_place(&self.path, &block)?;
        } else {
            write_new(&self.path, &block, 0o644)?;
        }
        Ok(())
    }
}

/// Reads a boot state from the variables both the GRUB and the U-Boot backends use
/// (`ABIDE_ORDER`, `ABIDE_<G>_OK`, `ABIDE_<G>_TRY`, `ABIDE_BOOTED`); `path` names the medium in
/// errors.
pub fn env_to_state<'a>(
    path: &Path,
    groups: &[Group; 2],
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<BootState, BootError> {
    let bad = |what: String| BootError::Inconsistent {
        path: path.to_owned(),
        what,
    };
    let order: Vec<Group> = match get("ABIDE_ORDER") {
        None => groups.to_vec(),
        Some(text) => text
            .split_whitespace()
            .map(Group::new)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?,
    };
    let mut sorted = order.clone();
    sorted.sort();
    if sorted != groups {
        return Err(bad(format!(
            "ABIDE_ORDER must name A and B once each, not {order:?}"
        )));
    }
    let mut bootable = BTreeMap::new();
    let mut trial = None;
    for g in groups {
        // Unset is not bootable, as the boot scripts read it: a group is bootable only when
        // its variable says so (`abide device init` writes them).
        let ok = match get(&format!("ABIDE_{g}_OK")) {
            Some("1") => true,
            None | Some("0") => false,
            Some(other) => return Err(bad(format!("ABIDE_{g}_OK is {other:?}, not 0 or 1"))),
        };
        let tries = match get(&format!("ABIDE_{g}_TRY")) {
            None | Some("") => 0,
            Some(t) => t
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= MAX_TRIES)
                .ok_or_else(|| bad(format!("ABIDE_{g}_TRY is {t:?}, not 0 to {MAX_TRIES}")))?,
        };
        bootable.insert(g.clone(), ok);
        // The boot scripts take the first bootable group with boots left as on trial.
        if trial.is_none() && ok && tries > 0 {
            trial = Some((g.clone(), tries));
        }
    }
    let booted = match get("ABIDE_BOOTED") {
        None | Some("") => None,
        Some(g) => Some(Group::new(g).map_err(|e| bad(e.to_string()))?),
    };
    Ok(BootState {
        order,
        trial,
        bootable,
        booted,
    })
}

/// Writes a boot state as the variables of [`env_to_state`].
pub fn state_to_env(
    groups: &[Group; 2],
    state: &BootState,
    mut set: impl FnMut(&str, &str) -> Result<(), BootError>,
) -> Result<(), BootError> {
    let order = state
        .order
        .iter()
        .map(Group::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    set("ABIDE_ORDER", &order)?;
    for g in groups {
        let ok = state.bootable.get(g).copied().unwrap_or(false);
        let tries = match &state.trial {
            Some((t, n)) if t == g => *n,
            _ => 0,
        };
        set(&format!("ABIDE_{g}_OK"), if ok { "1" } else { "0" })?;
        set(&format!("ABIDE_{g}_TRY"), &tries.to_string())?;
    }
    set(
        "ABIDE_BOOTED",
        state.booted.as_ref().map_or("", Group::as_str),
    )
}
