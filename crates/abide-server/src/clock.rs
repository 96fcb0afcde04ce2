//! Time as the server stores it (Unix milliseconds) and shows it (RFC 3339, UTC).

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// A stored time as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{:.0}", t))
        .unwrap_or_else(|_| "invalid-time".to_owned())
}
