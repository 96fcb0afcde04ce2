//! Bootloader formats against files made by the real tools.

mod grubenv;
