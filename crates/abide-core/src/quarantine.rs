//! Quarantine (DESIGN I8): versions rolled back on this device are not installed again unless
//! an operator forces it; and the admission policy that applies it with anti-rollback.

use std::collections::BTreeMap;

use jiff::Timestamp;
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Whether an operator overrides the quarantine and the version order. It never overrides the
/// security version counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Force {
    /// The normal rules apply.
    No,
    /// The operator insists.
    Yes,
}

/// The versions rolled back on this device, with why and when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    entries: BTreeMap<String, QuarantineEntry>,
}

/// Why and when a version was quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The rollback reason, as text.
    pub reason: String,
    /// When it was rolled back.
    pub at: Timestamp,
}

impl Quarantine {
    /// Records that `version` was rolled back for `reason` at `at` (the first reason is kept).
    pub fn add(&mut self, version: &Version, reason: &str, at: Timestamp) {
        self.entries
            .entry(version.to_string())
            .or_insert(QuarantineEntry {
                reason: reason.to_owned(),
                at,
            });
    }

    /// The entry for `version`, if it is quarantined.
    pub fn get(&self, version: &Version) -> Option<&QuarantineEntry> {
        self.entries.get(&version.to_string())
    }

    /// The quarantined versions.
    pub fn versions(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

/// What the device runs now, for deciding whether an offered bundle may be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The running (known-good) version.
    pub version: Version,
    /// The anti-rollback counter (the highest committed security version).
    pub security_version: u64,
}

/// Decides whether a bundle of `version` and `security_version` may be installed: never below
/// the security counter; not a quarantined version and not older than the running one unless
/// forced. Reinstalling the running version is allowed (a repair).
pub fn admit(
    installed: &Installed,
    version: &Version,
    security_version: u64,
    quarantine: &Quarantine,
    force: Force,
) -> Result<()> {
    if security_version < installed.security_version {
        return Err(Error::Downgrade {
            offered: security_version,
            current: installed.security_version,
        });
    }
    if force == Force::Yes {
        return Ok(());
    }
    if let Some(entry) = quarantine.get(version) {
        return Err(Error::Quarantined {
            version: version.to_string(),
            reason: entry.reason.clone(),
        });
    }
    if *version < installed.version {
        return Err(Error::OlderVersion {
            offered: version.to_string(),
            running: installed.version.to_string(),
        });
    }
    Ok(())
}
