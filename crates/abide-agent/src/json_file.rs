//! The agent's JSON files in the state directory (fleet.json, schedules.json,
//! self-update.json): read within a size limit, a missing file being no file, the format
//! version checked first so that a file from a newer abide is named as such; replaced
//! atomically (temp, fsync, rename, directory fsync).

use std::path::Path;

use abide_fs::persist::{read_bounded, write_atomic};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{AgentError, Result};

/// Reads `path` as a `what` of format `format` (`None`: no format field to check); `Ok(None)`
/// when there is no file.
pub fn load<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    format: Option<u32>,
) -> Result<Option<T>> {
    let bytes = match read_bounded(path, 4 << 20) {
        Ok(b) => b,
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if let Some(want) = format {
        let found = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["format"].as_u64());
        if let Some(f) = found
            && f != u64::from(want)
        {
            return Err(AgentError::State {
                path: path.to_owned(),
                what: format!(
                    "format {f} is not the format {want} this abide reads (written by a newer version?)"
                ),
            });
        }
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| AgentError::State {
            path: path.to_owned(),
            what: format!("not a {what}: {e}"),
        })
}

/// Replaces `path` with `value` atomically, with `mode`.
pub fn store<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("plain data");
    bytes.push(b'\n');
    write_atomic(path, &bytes, mode)?;
    Ok(())
}
