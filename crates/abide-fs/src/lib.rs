//! Abide's durable files, a leaf crate every other crate that writes state builds on: atomic
//! replacement (temp, fsync, rename, directory fsync), rewrites in place for files a bootloader
//! reads, bounded reads, and the crash points the crash tests stop at.

pub mod crash;
pub mod persist;
pub mod powerloss;
