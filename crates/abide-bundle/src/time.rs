//! Timestamps as the formats write them (RFC 3339, UTC, whole seconds) and expiry policy.

use jiff::Timestamp;

use crate::error::{Error, Result};

/// Whether expiry times are enforced. Only tools that inspect old material use `Unsafe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpirationEnforcement {
    /// Refuse expired bundles and trust roots.
    Safe,
    /// Accept them (for inspection only, never for installing).
    Unsafe,
}

/// Parses an RFC 3339 time that must be written in canonical form: UTC, `Z`, whole seconds.
pub fn parse_time(field: &str, s: &str) -> Result<Timestamp> {
    let t: Timestamp = s
        .parse()
        .map_err(|e| Error::bad_format(format!("{field}: {s:?} is not an RFC 3339 time: {e}")))?;
    if format_time(t) != s {
        return Err(Error::bad_format(format!(
            "{field}: {s:?} is not written as UTC whole seconds (like 2026-01-31T12:00:00Z)"
        )));
    }
    Ok(t)
}

/// Writes a time as RFC 3339 UTC with whole seconds.
pub fn format_time(t: Timestamp) -> String {
    let whole = Timestamp::from_second(t.as_second()).unwrap_or(t);
    whole.to_string()
}
