//! The U-Boot environment (the `fw_env` format `fw_printenv`, `fw_setenv` and U-Boot itself
//! read): a CRC32 of the data, with redundant copies a flag byte, then `name=value` strings
//! each ended by NUL, an empty string, and padding (0xff) to the copy's size.
//!
//! With two copies, the one to use is the valid one (CRC matches) with the newer flag, as U-Boot
//! decides: 255 → 0 wraps, otherwise the higher wins. A write goes to the other copy with the
//! next flag, so until it is complete the old copy stays valid and is the one read: a power
//! loss in the middle of a write leaves the old or the new whole state, never a mix.

use std::collections::BTreeMap;

/// What can be wrong with an environment copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UbootEnvError {
    /// The copy is smaller than its header.
    #[error("a U-Boot environment copy of {0} bytes is too small")]
    TooSmall(usize),
    /// The CRC does not match the data.
    #[error("CRC mismatch: the copy is damaged or was never written")]
    Crc,
    /// Neither copy is valid.
    #[error("no valid copy of the U-Boot environment")]
    NoValidCopy,
    /// A variable is malformed.
    #[error("malformed variable {0:?}")]
    Variable(String),
    /// A name or value U-Boot could not read back.
    #[error(
        "bad U-Boot variable {0:?}: names hold no '=' or NUL and are not empty; values hold no NUL"
    )]
    Bad(String),
    /// The variables do not fit.
    #[error("the variables need {need} bytes but the copy holds {size}")]
    Full {
        /// Bytes needed.
        need: usize,
        /// The data size.
        size: usize,
    },
}

/// One decoded environment copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UbootEnv {
    /// The variables (U-Boot keeps them sorted).
    pub vars: BTreeMap<String, String>,
}

impl UbootEnv {
    /// Decodes a copy of `bytes.len()` bytes; `redundant` says whether it has the flag byte.
    /// Returns the variables and the flag (0 without redundancy).
    pub fn decode(bytes: &[u8], redundant: bool) -> Result<(UbootEnv, u8), UbootEnvError> {
        let header = header_len(redundant);
        if bytes.len() <= header {
            return Err(UbootEnvError::TooSmall(bytes.len()));
        }
        let crc = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let data = &bytes[header..];
        if crc32fast::hash(data) != crc {
            return Err(UbootEnvError::Crc);
        }
        let flag = if redundant { bytes[4] } else { 0 };
        let mut vars = BTreeMap::new();
        for entry in data.split(|&b| b == 0) {
            if entry.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(entry);
            let (name, value) = text
                .split_once('=')
                .ok_or_else(|| UbootEnvError::Variable(text.to_string()))?;
            vars.insert(name.to_owned(), value.to_owned());
        }
        Ok((UbootEnv { vars }, flag))
    }

    /// Encodes into a copy of `size` bytes with `flag` (ignored without redundancy).
    pub fn encode(&self, size: usize, redundant: bool, flag: u8) -> Result<Vec<u8>, UbootEnvError> {
        let header = header_len(redundant);
        let mut data = Vec::new();
        for (name, value) in &self.vars {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(UbootEnvError::Bad(name.clone()));
            }
            data.extend_from_slice(name.as_bytes());
            data.push(b'=');
            data.extend_from_slice(value.as_bytes());
            data.push(0);
        }
        data.push(0);
        let room = size.saturating_sub(header);
        if data.len() > room {
            return Err(UbootEnvError::Full {
                need: data.len(),
                size: room,
            });
        }
        data.resize(room, 0xff);
        let mut out = crc32fast::hash(&data).to_le_bytes().to_vec();
        if redundant {
            out.push(flag);
        }
        out.extend_from_slice(&data);
        Ok(out)
    }
}

/// Which of two redundant copies is current: the valid one with the newer flag.
/// Returns (index, env, flag).
pub fn select(a: &[u8], b: &[u8]) -> Result<(usize, UbootEnv, u8), UbootEnvError> {
    match (UbootEnv::decode(a, true), UbootEnv::decode(b, true)) {
        (Ok((ea, fa)), Ok((eb, fb))) => {
            let b_newer = (fa == 255 && fb == 0) || (fb > fa && !(fb == 255 && fa == 0));
            Ok(if b_newer { (1, eb, fb) } else { (0, ea, fa) })
        }
        (Ok((ea, fa)), Err(_)) => Ok((0, ea, fa)),
        (Err(_), Ok((eb, fb))) => Ok((1, eb, fb)),
        (Err(_), Err(_)) => Err(UbootEnvError::NoValidCopy),
    }
}

fn header_len(redundant: bool) -> usize {
    if redundant { 5 } else { 4 }
}
