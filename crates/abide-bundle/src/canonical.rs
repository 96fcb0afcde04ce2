//! Canonical JSON: the one byte encoding of a JSON value that signatures are made over.
//!
//! Objects have their keys sorted by their UTF-8 bytes and each key once; there is no white
//! space outside strings; numbers are integers written in shortest decimal form; strings escape
//! only `"`, `\` and control characters (as `\b \f \n \r \t` or `\u00XX`) and are otherwise raw
//! UTF-8. A document is canonical when it is byte-for-byte equal to the re-encoding of its parse.

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Encodes a value in canonical form. Fails if the value holds a non-integer number.
pub fn to_canonical<T: Serialize>(document: &'static str, value: &T) -> Result<Vec<u8>> {
    let value =
        serde_json::to_value(value).map_err(|e| Error::bad_format(format!("{document}: {e}")))?;
    encode(document, &value)
}

fn encode(document: &'static str, value: &Value) -> Result<Vec<u8>> {
    check_integers(document, value)?;
    // serde_json's Map is a BTreeMap (no `preserve_order` feature in this tree), so keys come out
    // sorted, and its compact writer emits exactly the string escapes described above.
    serde_json::to_vec(value).map_err(|e| Error::bad_format(format!("{document}: {e}")))
}

fn check_integers(document: &'static str, value: &Value) -> Result<()> {
    match value {
        Value::Number(n) if !(n.is_u64() || n.is_i64()) => Err(Error::NonCanonical {
            document,
            what: format!("number {n} is not an integer"),
        }),
        Value::Array(items) => items.iter().try_for_each(|v| check_integers(document, v)),
        Value::Object(map) => map.values().try_for_each(|v| check_integers(document, v)),
        _ => Ok(()),
    }
}

/// Parses `bytes` as JSON and checks they are canonical: returns the parsed value.
///
/// Non-canonical input (white space, unsorted or duplicate keys, other escapes, fractions or
/// exponents) is refused with [`Error::NonCanonical`] naming the first byte that differs.
pub fn parse_canonical(document: &'static str, bytes: &[u8]) -> Result<Value> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Error::NonCanonical {
        document,
        what: format!("not valid JSON: {e}"),
    })?;
    let again = encode(document, &value)?;
    if again != bytes {
        let at = again
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(again.len().min(bytes.len()));
        return Err(Error::NonCanonical {
            document,
            what: format!(
                "byte {at} differs from the canonical encoding (sorted unique keys, no white space, integer numbers)"
            ),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_documents_are_accepted_and_others_refused() {
        let ok = br#"{"a":1,"b":[true,null,"x\n\u0001y"],"c":{"d":-2}}"#;
        assert!(parse_canonical("manifest", ok).is_ok());
        for bad in [
            &br#"{"b":1,"a":2}"#[..],
            br#"{"a":1,"a":1}"#,
            br#"{"a": 1}"#,
            br#"{"a":1.0}"#,
            br#"{"a":1e3}"#,
            br#"{"a":"\u0061"}"#,
            br#"{"a":"\/"}"#,
            b"{\"a\":1}\n",
            br#"{"a":01}"#,
        ] {
            let err = parse_canonical("manifest", bad).unwrap_err();
            assert_eq!(
                err.code(),
                "non-canonical",
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
