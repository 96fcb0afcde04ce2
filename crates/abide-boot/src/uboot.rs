//! The `uboot` backend: the boot state in the U-Boot environment (one copy in a file, or two
//! redundant copies), with the same variables as the GRUB backend (`ABIDE_ORDER`,
//! `ABIDE_<G>_OK`, `ABIDE_<G>_TRY`, `ABIDE_BOOTED`); `uboot/abide.env` is the U-Boot script
//! that counts boots in U-Boot. Other variables in the environment are kept.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use abide_core::Group;

use crate::backend::{BootError, Bootloader};
use crate::grub::{env_to_state, state_to_env};
use crate::state::BootState;
use crate::ubootenv::{UbootEnv, UbootEnvError, select};
use abide_fs::persist::{IoError, overwrite_in_place, read_bounded};

/// The U-Boot script that implements the counting (set as `bootcmd` or run from it).
pub const SCRIPT: &str = include_str!("../uboot/abide.env");

/// A U-Boot environment in one file, or in two files holding redundant copies.
#[derive(Debug, Clone)]
pub struct UbootBootloader {
    copies: Vec<PathBuf>,
    size: usize,
    groups: [Group; 2],
}

impl UbootBootloader {
    /// The environment in `copies` (one or two files) of `size` bytes each.
    pub fn new(copies: &[PathBuf], size: usize) -> UbootBootloader {
        UbootBootloader {
            copies: copies.to_vec(),
            size,
            groups: [
                Group::new("A").expect("valid"),
                Group::new("B").expect("valid"),
            ],
        }
    }

    fn err(&self, source: UbootEnvError) -> BootError {
        BootError::Inconsistent {
            path: self.copies[0].clone(),
            what: format!("U-Boot environment: {source}"),
        }
    }

    /// The current environment, which copy it is in, and its flag.
    pub fn read(&self) -> Result<(UbootEnv, usize, u8), BootError> {
        let read = |p: &Path| read_bounded(p, self.size);
        match self.copies.as_slice() {
            [one] => {
                let (env, _) = UbootEnv::decode(&read(one)?, false).map_err(|e| self.err(e))?;
                Ok((env, 0, 0))
            }
            [a, b] => {
                let (which, env, flag) = select(&read(a)?, &read(b)?).map_err(|e| self.err(e))?;
                Ok((env, which, flag))
            }
            _ => Err(self.err(UbootEnvError::NoValidCopy)),
        }
    }
}

impl Bootloader for UbootBootloader {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn load(&self) -> Result<BootState, BootError> {
        let (env, _, _) = self.read()?;
        env_to_state(&self.copies[0], &self.groups, |name| {
            env.vars.get(name).map(String::as_str)
        })
    }

    fn store(&self, state: &BootState) -> Result<(), BootError> {
        let (mut env, current, flag) = self.read()?;
        state_to_env(&self.groups, state, |name, value| {
            env.vars.insert(name.to_owned(), value.to_owned());
            Ok(())
        })?;
        if self.copies.len() == 1 {
            // In place, as fw_setenv does: U-Boot reads the copy's blocks (a raw offset, or a
            // file on a FAT or ext4 partition without replaying a journal), never a rename.
            let bytes = env.encode(self.size, false, 0).map_err(|e| self.err(e))?;
            overwrite_in_place(&self.copies[0], &bytes)?;
            return Ok(());
        }
        // Write the other copy with the next flag, in place, and make it durable: until then
        // the current copy is the valid, newer one.
        let target = &self.copies[1 - current];
        let bytes = env
            .encode(self.size, true, flag.wrapping_add(1))
            .map_err(|e| self.err(e))?;
        let io = |op, source| IoError {
            op,
            path: target.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|e| io("opening", e))?;
        abide_fs::crash::point("uboot:before-write", &target.to_string_lossy());
        file.write_all(&bytes).map_err(|e| io("writing", e))?;
        abide_fs::persist::fsync(&file, target)?;
        abide_fs::crash::point("uboot:after-fsync", &target.to_string_lossy());
        Ok(())
    }
}
