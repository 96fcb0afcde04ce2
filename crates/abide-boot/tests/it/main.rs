//! Bootloader formats against files made by the real tools, and the backends against the
//! reference firmware rule.

mod backends;
mod gpt;
mod grubenv;
mod grubscript;
mod uboot;
mod ubootscript;

/// A file from `tests/data`.
pub fn data(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name),
    )
    .unwrap()
}
