//! Bootloader formats against files made by the real tools, and the backends against the
//! reference firmware rule.

mod backends;
mod grubenv;
mod grubscript;
mod uboot;
