//! Validated names: strings from untrusted input that may become file names or identifiers.

use std::fmt;

use crate::error::{Error, Result};

/// A name that is safe to use as a single file-name component: component names, kinds, slot
/// classes, products and hooks.
///
/// It is 1 to `max_len` bytes of ASCII letters, digits, `.`, `_` and `-`, starts with a letter
/// or digit, and never contains `..`; so it holds no `/`, `\`, NUL, white space or path trick.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Validates `value` as a name for `field`, at most `max_len` bytes long.
    pub fn parse(field: &str, value: &str, max_len: usize) -> Result<Name> {
        check(field, value, max_len, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })?;
        if value.contains("..") {
            return Err(bad(field, value, "contains \"..\""));
        }
        Ok(Name(value.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A hardware compatibility id such as `acme-gw,rev2` or `vendor:board-1`.
///
/// Like [`Name`] but `,`, `:` and `+` are allowed too; still no `/`, `\`, NUL or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HardwareId(String);

impl HardwareId {
    /// Validates `value` as a hardware id for `field`, at most `max_len` bytes long.
    pub fn parse(field: &str, value: &str, max_len: usize) -> Result<HardwareId> {
        check(field, value, max_len, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ',' | ':' | '+')
        })?;
        if value.contains("..") {
            return Err(bad(field, value, "contains \"..\""));
        }
        Ok(HardwareId(value.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check(field: &str, value: &str, max_len: usize, allowed: impl Fn(char) -> bool) -> Result<()> {
    if value.is_empty() {
        return Err(bad(field, value, "is empty"));
    }
    if value.len() > max_len {
        return Err(Error::BadName {
            field: field.to_owned(),
            value: shorten(value),
            reason: "is too long",
        });
    }
    if value.contains('\0') {
        return Err(bad(field, value, "contains NUL"));
    }
    if value.contains('/') || value.contains('\\') {
        return Err(bad(field, value, "contains a path separator"));
    }
    if !value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(bad(field, value, "must start with a letter or digit"));
    }
    if let Some(c) = value.chars().find(|&c| !allowed(c)) {
        return Err(Error::BadName {
            field: field.to_owned(),
            value: shorten(value),
            reason: if c.is_whitespace() || c.is_control() {
                "contains white space or a control character"
            } else {
                "contains a character outside [A-Za-z0-9._-]"
            },
        });
    }
    Ok(())
}

fn bad(field: &str, value: &str, reason: &'static str) -> Error {
    Error::BadName {
        field: field.to_owned(),
        value: shorten(value),
        reason,
    }
}

fn shorten(value: &str) -> String {
    value.chars().take(80).collect()
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for HardwareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_a_directory_are_refused() {
        for bad in [
            "", "..", "a/b", "a\\b", "a\0b", ".hidden", "a..b", "-x", "a b", "é", "x\n",
        ] {
            let err = Name::parse("component", bad, 64).unwrap_err();
            assert_eq!(err.code(), "bad-name", "{bad:?}");
        }
        assert_eq!(
            Name::parse("c", &"a".repeat(65), 64).unwrap_err().code(),
            "bad-name"
        );
        for good in ["rootfs", "app.v2", "a_b-c", "0", &"a".repeat(64)] {
            assert_eq!(Name::parse("component", good, 64).unwrap().as_str(), good);
        }
        assert!(HardwareId::parse("compatible", "acme,gw:rev2+x", 64).is_ok());
        assert!(HardwareId::parse("compatible", "acme/gw", 64).is_err());
    }
}
