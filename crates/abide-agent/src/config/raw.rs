//! The shape of `system.toml` as serde reads it: every key typed (durations, sizes and words
//! are parsed as they are read, so an error names the key), before the checks that look at
//! several keys at once (`sections`).

use std::path::PathBuf;

use jiff::SignedDuration;
use serde::Deserialize;

use super::{AfterBackup, SlotKind, parse_size};

/// A duration key's value: `"30s"`, `"1h30m"`, or seconds (`"90"`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) SignedDuration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Dur, D::Error> {
        let text = String::deserialize(d)?;
        abide_core::duration::parse(&text)
            .ok()
            .and_then(|d| SignedDuration::try_from(d).ok())
            .map(Dur)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "expected a duration like \"30s\", \"1h30m\" or seconds (\"90\"), found {text:?}"
                ))
            })
    }
}

/// A size key's value: bytes, or a number with K, M, G or T ([`parse_size`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        let text = String::deserialize(d)?;
        parse_size(&text)
            .map(Size)
            .map_err(serde::de::Error::custom)
    }
}

/// The `backend` key of `[bootloader]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BackendKind {
    Sim,
    Grub,
    Uboot,
    Gpt,
    SystemdBoot,
}

words!(BackendKind {
    Sim = "sim",
    Grub = "grub",
    Uboot = "uboot",
    Gpt = "gpt",
    SystemdBoot = "systemd-boot",
});

/// The `kind` key of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CheckKindName {
    Command,
    Http,
    Tcp,
    Systemd,
    Process,
    File,
    Uptime,
    Fleet,
}

words!(CheckKindName {
    Command = "command",
    Http = "http",
    Tcp = "tcp",
    Systemd = "systemd",
    Process = "process",
    File = "file",
    Uptime = "uptime",
    Fleet = "fleet",
});

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) product: String,
    pub(super) compatible: String,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) state_reserve: Option<Size>,
    #[serde(default)]
    pub(super) paranoid: bool,
    pub(super) trust: PathBuf,
    pub(super) reboot: Option<Vec<String>>,
    pub(super) bootloader: RawBootloader,
    #[serde(rename = "group")]
    pub(super) groups: Vec<RawGroup>,
    #[serde(default)]
    pub(super) health: RawHealth,
    pub(super) server: Option<RawServer>,
    #[serde(default, rename = "window")]
    pub(super) windows: Vec<RawWindow>,
    #[serde(default)]
    pub(super) hooks: crate::hooks::RawHooks,
    #[serde(default)]
    pub(super) api: RawApi,
    #[serde(default)]
    pub(super) self_update: RawSelfUpdate,
    #[serde(default)]
    pub(super) download: RawDownload,
    #[serde(default, rename = "app")]
    pub(super) apps: Vec<RawApp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) name: String,
    pub(super) releases: PathBuf,
    pub(super) link: PathBuf,
    pub(super) data: PathBuf,
    #[serde(default)]
    pub(super) services: Vec<String>,
    pub(super) control: Option<String>,
    pub(super) backups: Option<u32>,
    pub(super) backup_dir: Option<PathBuf>,
    pub(super) after_backup: Option<AfterBackup>,
    pub(super) migrate: Option<String>,
    pub(super) timeout: Option<Dur>,
    pub(super) deadline: Option<Dur>,
    pub(super) grace: Option<Dur>,
    pub(super) capacity: Option<Size>,
    #[serde(default)]
    pub(super) lease: bool,
    #[serde(default, rename = "check")]
    pub(super) checks: Vec<RawCheck>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSelfUpdate {
    pub(super) binary: Option<PathBuf>,
    pub(super) deadline: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDownload {
    pub(super) min_rate: Option<Size>,
    pub(super) window: Option<Dur>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) socket: Option<PathBuf>,
    pub(super) group: Option<String>,
    pub(super) tcp: Option<String>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) metrics_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) url: String,
    pub(super) enroll_token_file: Option<PathBuf>,
    pub(super) device_id: Option<String>,
    pub(super) poll_interval: Option<Dur>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWindow {
    pub(super) days: Vec<String>,
    pub(super) start: String,
    pub(super) end: String,
    pub(super) zone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBootloader {
    pub(super) backend: BackendKind,
    pub(super) path: PathBuf,
    pub(super) redundant_path: Option<PathBuf>,
    pub(super) env_size: Option<usize>,
    pub(super) cmdline: Option<PathBuf>,
    pub(super) tries: Option<u8>,
    pub(super) max_trial_boots: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: String,
    #[serde(rename = "slot")]
    pub(super) slots: Vec<RawSlot>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlot {
    pub(super) class: String,
    pub(super) path: PathBuf,
    pub(super) kind: Option<SlotKind>,
    pub(super) link: Option<PathBuf>,
    pub(super) capacity: Option<Size>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) deadline: Option<Dur>,
    pub(super) grace: Option<Dur>,
    #[serde(default, rename = "check")]
    pub(super) checks: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheck {
    pub(super) name: String,
    pub(super) kind: CheckKindName,
    pub(super) command: Option<String>,
    pub(super) path: Option<PathBuf>,
    pub(super) address: Option<String>,
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) status: Option<u16>,
    pub(super) body: Option<String>,
    pub(super) unit: Option<String>,
    pub(super) process: Option<String>,
    pub(super) seconds: Option<u64>,
    pub(super) timeout: Option<Dur>,
    pub(super) retries: Option<u32>,
    pub(super) interval: Option<Dur>,
    pub(super) critical: Option<bool>,
}
