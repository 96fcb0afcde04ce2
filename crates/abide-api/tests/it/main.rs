//! Tests of the API crate.
