//! Abide's bootloader side: the state bootloaders keep (in their own on-disk formats), the
//! backends that tell each bootloader which slot group to try and read back what it booted
//! (durable files come from `abide-fs`, which its users name themselves).
//!
//! A backend loads a [`BootState`], the engine's actions edit it in memory
//! ([`BootState::apply`]), and the backend stores it in one atomic step.

pub mod backend;
pub mod gpt;
pub mod grub;
pub mod grubenv;
pub mod sim;
pub mod state;
pub mod systemd_boot;
pub mod uboot;
pub mod ubootenv;

pub use backend::{BootError, Bootloader};
pub use gpt::GptBootloader;
pub use grub::GrubBootloader;
pub use grubenv::{GrubEnv, GrubEnvError};
pub use sim::SimBootloader;
pub use state::{BootState, MAX_TRIES, StateError, booted_from, cmdline_group};
pub use systemd_boot::SystemdBootBootloader;
pub use uboot::UbootBootloader;
