//! `system.toml`: the device's configuration, parsed into validated settings. Relative paths
//! are relative to the file's directory. An error names the file, the key and what was
//! expected.

use std::path::{Path, PathBuf};

use abide_core::{Group, HealthPolicy};
use abide_fs::persist::read_bounded;
use jiff::SignedDuration;
use serde::Deserialize;

use crate::error::{AgentError, Result};

/// The default configuration path.
pub const DEFAULT_PATH: &str = "/etc/abide/system.toml";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    product: String,
    compatible: String,
    state_dir: Option<PathBuf>,
    state_reserve: Option<String>,
    #[serde(default)]
    paranoid: bool,
    trust: PathBuf,
    reboot: Option<Vec<String>>,
    bootloader: RawBootloader,
    #[serde(rename = "group")]
    groups: Vec<RawGroup>,
    #[serde(default)]
    health: RawHealth,
    server: Option<RawServer>,
    #[serde(default, rename = "window")]
    windows: Vec<RawWindow>,
    #[serde(default)]
    hooks: crate::hooks::RawHooks,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    self_update: RawSelfUpdate,
    #[serde(default)]
    download: RawDownload,
    #[serde(default, rename = "app")]
    apps: Vec<RawApp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: String,
    releases: PathBuf,
    link: PathBuf,
    data: PathBuf,
    #[serde(default)]
    services: Vec<String>,
    control: Option<String>,
    backups: Option<u32>,
    backup_dir: Option<PathBuf>,
    after_backup: Option<String>,
    migrate: Option<String>,
    timeout: Option<String>,
    deadline: Option<String>,
    grace: Option<String>,
    capacity: Option<String>,
    #[serde(default, rename = "check")]
    checks: Vec<RawCheck>,
}

/// What a rollback does with the data the application wrote after its backup (`after_backup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterBackup {
    /// It is deleted once the backup is back (recorded in the audit log).
    Discard,
    /// It is kept beside the restored data directory, as `DATA.rolled-back-ID` (the default).
    Keep,
}

/// An application updated on directory slots without a reboot (`[[app]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AppSettings {
    /// Its name: bundles carry it as the slot class of their one component of kind `app`.
    pub name: String,
    /// The directory holding one directory per release.
    pub releases: PathBuf,
    /// The symbolic link switched atomically to the running release.
    pub link: PathBuf,
    /// The application's data directory.
    pub data: PathBuf,
    /// The services stopped before the backup and started after the switch, in this order.
    pub services: Vec<String>,
    /// The command that stops and starts them: `CONTROL stop SERVICE`, `CONTROL start SERVICE`
    /// (default `systemctl`).
    pub control: String,
    /// How many backups of the data are kept (default 3).
    pub backups: usize,
    /// Where the backups are (default `STATE_DIR/backups/NAME`).
    pub backup_dir: PathBuf,
    /// What a rollback does with the data written after the backup.
    pub after_backup: AfterBackup,
    /// The migration command, run after the switch and before the services start.
    pub migrate: Option<String>,
    /// How long a service command or the migration may run (default 5 minutes).
    pub timeout: SignedDuration,
    /// The health gate's deadline and grace period after the services started.
    pub health: HealthPolicy,
    /// The most bytes of files a release may unpack.
    pub capacity: Option<u64>,
    /// The checks of the health gate.
    pub checks: Vec<Check>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSelfUpdate {
    binary: Option<PathBuf>,
    deadline: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDownload {
    min_rate: Option<String>,
    window: Option<String>,
}

/// How slow a schedule's download from a URL may be (`[download]`): every `window` must bring
/// at least `min_rate` bytes per second on average, or the schedule fails — a server that drips
/// a byte now and then does not hold a schedule in progress for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadSettings {
    /// Bytes per second, on average over each window (default 1K; 0: no minimum).
    pub min_rate: u64,
    /// The window the rate is measured over (default 60 s).
    pub window: std::time::Duration,
}

/// How the agent updates itself (`[self_update]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfUpdateSettings {
    /// The agent's binary (default: the running executable).
    pub binary: PathBuf,
    /// How long a new agent has to answer on its API socket (default 60 s).
    pub deadline: SignedDuration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
    group: Option<String>,
    tcp: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    metrics_file: Option<PathBuf>,
}

/// The default path of the agent's API socket.
pub const DEFAULT_SOCKET: &str = "/run/abide/agent.sock";

/// The agent's local API (`[api]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// The Unix socket (mode 0660).
    pub socket: PathBuf,
    /// The socket's group, if set (a name or a number).
    pub group: Option<String>,
    /// The TCP listener with mutual TLS, if set.
    pub tcp: Option<TcpApi>,
    /// A file the agent keeps its metrics in for node-exporter's textfile collector.
    pub metrics_file: Option<PathBuf>,
}

/// The API on TCP: where, the agent's certificate and key, and the CA client certificates
/// must come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpApi {
    /// The address to listen on (`host:port`).
    pub listen: std::net::SocketAddr,
    /// The agent's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA whose certificates clients must present (PEM).
    pub client_ca: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    url: String,
    enroll_token_file: Option<PathBuf>,
    device_id: Option<String>,
    poll_interval: Option<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Vec<String>,
    start: String,
    end: String,
    zone: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootloader {
    backend: String,
    path: PathBuf,
    redundant_path: Option<PathBuf>,
    env_size: Option<usize>,
    cmdline: Option<PathBuf>,
    tries: Option<u8>,
    max_trial_boots: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    #[serde(rename = "slot")]
    slots: Vec<RawSlot>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    class: String,
    path: PathBuf,
    kind: Option<String>,
    link: Option<PathBuf>,
    capacity: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    deadline: Option<String>,
    grace: Option<String>,
    #[serde(default, rename = "check")]
    checks: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: String,
    kind: String,
    command: Option<String>,
    path: Option<PathBuf>,
    address: Option<String>,
    url: Option<String>,
    ca_file: Option<PathBuf>,
    status: Option<u16>,
    body: Option<String>,
    unit: Option<String>,
    process: Option<String>,
    seconds: Option<u64>,
    timeout: Option<String>,
    retries: Option<u32>,
    interval: Option<String>,
    critical: Option<bool>,
}

/// Which bootloader backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The simulated bootloader (a JSON file).
    Sim,
    /// GRUB's environment block.
    Grub,
    /// GPT partition attributes (ChromeOS style) on the disk at `boot_path`; the booted group
    /// comes from the kernel command line in `cmdline`.
    Gpt {
        /// The kernel command line file.
        cmdline: PathBuf,
    },
    /// systemd-boot entry files in the EFI system partition mounted at `boot_path`; the
    /// booted group comes from the kernel command line in `cmdline`.
    SystemdBoot {
        /// The kernel command line file.
        cmdline: PathBuf,
    },
    /// The U-Boot environment: one copy, or two redundant ones, of `size` bytes.
    Uboot {
        /// The second copy, if the environment is redundant.
        redundant: Option<PathBuf>,
        /// The size of a copy.
        size: usize,
    },
}

/// What a slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A regular file holding an image (written in place, never grown).
    Image,
    /// A block device or partition.
    Block,
    /// A directory; the component is a tar archive unpacked into it, and the slot's `link`
    /// (a symlink) is switched atomically to the booted group's directory.
    Dir,
}

/// One slot of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Its class (`rootfs`, `kernel`, …): which components it takes.
    pub class: String,
    /// Where it is.
    pub path: PathBuf,
    /// What it is.
    pub kind: SlotKind,
    /// For a directory slot: the symlink that points at the booted group's directory.
    pub link: Option<PathBuf>,
    /// For a directory slot: the most bytes of files an archive may unpack into it (no limit
    /// but the file system's when `None`).
    pub capacity: Option<u64>,
}

/// A slot group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotGroup {
    /// Its name.
    pub name: Group,
    /// Its slots.
    pub slots: Vec<Slot>,
}

/// What a health check looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A command run through `sh -c`; exit status 0 passes.
    Command(String),
    /// A file exists.
    File(PathBuf),
    /// A TCP port accepts a connection.
    Tcp(String),
    /// The system has been up at least this many seconds.
    Uptime(u64),
    /// An HTTP GET answers with this status (and, if given, a body containing this text).
    Http {
        /// The URL, http:// or https://.
        url: String,
        /// The CA an https:// endpoint's certificate is checked against (else the system's
        /// roots).
        ca_file: Option<PathBuf>,
        /// The expected status.
        status: u16,
        /// Text the body must contain.
        body: Option<String>,
    },
    /// A systemd unit is active (`systemctl is-active`).
    Systemd(String),
    /// A process of this name runs (`/proc/*/comm`).
    Process(String),
}

/// One health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Its name.
    pub name: String,
    /// What it checks.
    pub kind: CheckKind,
    /// How long one attempt may take.
    pub timeout: SignedDuration,
    /// How many attempts after the first.
    pub retries: u32,
    /// The pause between attempts.
    pub interval: SignedDuration,
    /// Whether a failure rolls back at once.
    pub critical: bool,
}

/// The fleet server the agent checks in with (`[server]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Its base URL, `http://host:port`.
    pub url: String,
    /// The file holding the enrolment token (read once, at enrolment).
    pub enroll_token_file: Option<PathBuf>,
    /// The device's id in the fleet.
    pub device_id: String,
    /// Seconds between check-ins (jittered; the server may ask for another interval).
    pub poll_interval: SignedDuration,
    /// The CA certificates (PEM) that vouch for an https:// server; the system's roots when
    /// none is given.
    pub ca_file: Option<PathBuf>,
    /// The device's client certificate and its key (PEM), for servers that ask for one.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

/// A maintenance window of the device itself (`[[window]]`): activation and reboot only while
/// it, and the group's window from the server, are open.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceWindow {
    /// Days and times.
    pub window: abide_core::window::Window,
    /// The IANA time zone the times are in.
    pub zone: jiff::tz::TimeZone,
    /// As written, for messages.
    pub text: String,
}

impl DeviceWindow {
    /// Whether the window is open at `now` (in its own zone, so daylight saving time moves it
    /// with the local clock).
    pub fn is_open(&self, now: jiff::Timestamp) -> bool {
        let local = now.to_zoned(self.zone.clone());
        let weekday = local.weekday().to_monday_zero_offset() as u8;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        self.window.contains(weekday, minute)
    }

    /// Parses `days`, `start`, `end` and `zone` as the server's windows are written.
    pub fn parse(
        days: &[String],
        start: &str,
        end: &str,
        zone: &str,
    ) -> std::result::Result<DeviceWindow, String> {
        let window =
            abide_core::window::Window::parse(days, start, end).map_err(|e| e.to_string())?;
        let tz = jiff::tz::TimeZone::get(zone)
            .map_err(|_| format!("zone {zone:?}: not an IANA time zone on this system"))?;
        Ok(DeviceWindow {
            window,
            zone: tz,
            text: format!("{} {start}-{end} {zone}", days.join(",")),
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The product.
    pub product: String,
    /// The hardware id bundles must list.
    pub compatible: abide_bundle::HardwareId,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Space that must stay free in the state directory's file system after an install.
    pub state_reserve: u64,
    /// How much an install hashes: the signed stored bytes (default), or with `paranoid =
    /// true` every chunk's content and every component digest as well.
    pub bundle_checks: abide_bundle::chunks::Checks,
    /// The trust root file.
    pub trust: PathBuf,
    /// The reboot command; none on a simulated device.
    pub reboot: Option<Vec<String>>,
    /// The bootloader backend.
    pub backend: Backend,
    /// The backend's file.
    pub boot_path: PathBuf,
    /// Boot limits for trials.
    pub boot_policy: abide_core::transaction::BootPolicy,
    /// The slot groups (two).
    pub groups: Vec<SlotGroup>,
    /// The health gate's time limits.
    pub health: HealthPolicy,
    /// The health checks.
    pub checks: Vec<Check>,
    /// The kernel command line the running group is read from (`abide.group=`): the
    /// `bootloader.cmdline` key, or `/proc/cmdline` for every real backend; none for `sim`
    /// unless set.
    pub cmdline: Option<PathBuf>,
    /// The fleet server, if the device belongs to a fleet.
    pub server: Option<ServerSettings>,
    /// The device's own maintenance windows (none: any time the group's window allows).
    pub windows: Vec<DeviceWindow>,
    /// The hooks run at the steps of a transaction (`[hooks]`).
    pub hooks: crate::hooks::Hooks,
    /// The agent's local API (`[api]`).
    pub api: ApiSettings,
    /// How the agent updates itself (`[self_update]`).
    pub self_update: SelfUpdateSettings,
    /// How slow a URL download may be (`[download]`).
    pub download: DownloadSettings,
    /// The applications updated on directory slots (`[[app]]`).
    pub apps: Vec<AppSettings>,
}

impl Config {
    /// Reads and validates the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let bytes = read_bounded(path, 1 << 20)?;
        let text = String::from_utf8(bytes).map_err(|_| err(path, "the file is not UTF-8 text"))?;
        Config::parse(path, &text)
    }

    /// Validates configuration text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| err(path, e.to_string().trim_end()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Absolute, so that links and messages do not depend on the working directory.
        let base = &std::path::absolute(base).unwrap_or_else(|_| base.to_owned());
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let compatible = abide_bundle::HardwareId::parse("compatible", &raw.compatible, 64)
            .map_err(|e| err(path, &format!("key `compatible`: {e}")))?;
        abide_bundle::Name::parse("product", &raw.product, 64)
            .map_err(|e| err(path, &format!("key `product`: {e}")))?;
        let backend = match raw.bootloader.backend.as_str() {
            "sim" => Backend::Sim,
            "grub" => Backend::Grub,
            "gpt" => Backend::Gpt {
                cmdline: resolve(raw.bootloader.cmdline.as_deref().unwrap_or(Path::new("/proc/cmdline"))),
            },
            "systemd-boot" => Backend::SystemdBoot {
                cmdline: resolve(raw.bootloader.cmdline.as_deref().unwrap_or(Path::new("/proc/cmdline"))),
            },
            "uboot" => Backend::Uboot {
                redundant: raw.bootloader.redundant_path.as_deref().map(resolve),
                size: raw
                    .bootloader
                    .env_size
                    .filter(|s| (64..=(1 << 20)).contains(s))
                    .ok_or_else(|| {
                        err(path, "key `bootloader.env_size`: the uboot backend needs the size of a copy, 64 bytes to 1 MiB")
                    })?,
            },
            other => {
                return Err(err(
                    path,
                    &format!("key `bootloader.backend`: expected \"sim\", \"grub\", \"uboot\", \"gpt\" or \"systemd-boot\", found {other:?}"),
                ));
            }
        };
        let tries = raw.bootloader.tries.unwrap_or(1);
        if !(1..=abide_boot::MAX_TRIES).contains(&tries) {
            return Err(err(
                path,
                &format!(
                    "key `bootloader.tries`: expected 1 to {}, found {tries}",
                    abide_boot::MAX_TRIES
                ),
            ));
        }
        let mut groups = Vec::new();
        for (i, g) in raw.groups.iter().enumerate() {
            let name = Group::new(&g.name)
                .map_err(|e| err(path, &format!("key `group[{i}].name`: {e}")))?;
            let mut slots = Vec::new();
            for (j, s) in g.slots.iter().enumerate() {
                let kind = match s.kind.as_deref().unwrap_or("image") {
                    "image" => SlotKind::Image,
                    "block" => SlotKind::Block,
                    "dir" => SlotKind::Dir,
                    other => {
                        return Err(err(
                            path,
                            &format!(
                                "key `group[{i}].slot[{j}].kind`: expected \"image\", \"block\" or \"dir\", found {other:?}"
                            ),
                        ));
                    }
                };
                let capacity = match (&s.capacity, kind) {
                    (None, _) => None,
                    (Some(text), SlotKind::Dir) => Some(parse_size(text).map_err(|e| {
                        err(path, &format!("key `group[{i}].slot[{j}].capacity`: {e}"))
                    })?),
                    (Some(_), _) => {
                        return Err(err(
                            path,
                            &format!(
                                "key `group[{i}].slot[{j}].capacity`: only a directory slot has one (an image or block slot holds what its size holds)"
                            ),
                        ));
                    }
                };
                slots.push(Slot {
                    class: s.class.clone(),
                    path: resolve(&s.path),
                    kind,
                    link: s.link.as_deref().map(resolve),
                    capacity,
                });
            }
            groups.push(SlotGroup { name, slots });
        }
        if groups.len() != 2 || groups[0].name == groups[1].name {
            return Err(err(
                path,
                "key `group`: expected exactly two groups with different names",
            ));
        }
        if backend != Backend::Sim
            && groups
                .iter()
                .any(|g| !["A", "B"].contains(&g.name.as_str()))
        {
            return Err(err(
                path,
                "key `group`: the grub, uboot, gpt and systemd-boot backends need the groups to be named A and B",
            ));
        }
        let duration = |key: &str, value: &Option<String>, default: SignedDuration| {
            duration(path, key, value, default)
        };
        let defaults = HealthPolicy::default();
        let health = HealthPolicy {
            deadline: duration("health.deadline", &raw.health.deadline, defaults.deadline)?,
            grace: duration("health.grace", &raw.health.grace, defaults.grace)?,
        };
        let checks = parse_checks(path, "health.check", &raw.health.checks, &resolve)?;
        let state_reserve = match &raw.state_reserve {
            None => 16 << 20,
            Some(text) => {
                parse_size(text).map_err(|e| err(path, &format!("key `state_reserve`: {e}")))?
            }
        };
        let server = match raw.server {
            None => None,
            Some(sv) => {
                if !(sv.url.starts_with("http://") || sv.url.starts_with("https://"))
                    || sv.url.len() < 10
                {
                    return Err(err(
                        path,
                        &format!(
                            "key `server.url`: expected an http:// or https:// URL, found {:?}",
                            sv.url
                        ),
                    ));
                }
                let device_id = match sv.device_id {
                    Some(id) => id,
                    None => read_bounded(Path::new("/etc/hostname"), 256)
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                        .ok_or_else(|| err(path, "key `server.device_id`: required where /etc/hostname gives no name"))?,
                };
                if !(1..=64).contains(&device_id.len())
                    || !device_id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                {
                    return Err(err(
                        path,
                        &format!(
                            "key `server.device_id`: expected 1 to 64 of A-Z a-z 0-9 . _ -, found {device_id:?}"
                        ),
                    ));
                }
                let poll_interval = duration(
                    "server.poll_interval",
                    &sv.poll_interval,
                    SignedDuration::from_secs(60),
                )?;
                if poll_interval < SignedDuration::from_millis(100) {
                    return Err(err(path, "key `server.poll_interval`: at least 100ms"));
                }
                let client_identity = match (&sv.client_cert, &sv.client_key) {
                    (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
                    (None, None) => None,
                    _ => {
                        return Err(err(
                            path,
                            "keys `server.client_cert` and `server.client_key`: give both or neither",
                        ));
                    }
                };
                if (sv.ca_file.is_some() || client_identity.is_some())
                    && !sv.url.starts_with("https://")
                {
                    return Err(err(
                        path,
                        "key `server.url`: ca_file and a client certificate need an https:// URL",
                    ));
                }
                Some(ServerSettings {
                    url: sv.url.trim_end_matches('/').to_owned(),
                    enroll_token_file: sv.enroll_token_file.as_deref().map(resolve),
                    device_id,
                    poll_interval,
                    ca_file: sv.ca_file.as_deref().map(resolve),
                    client_identity,
                })
            }
        };
        let mut windows = Vec::new();
        for (i, w) in raw.windows.iter().enumerate() {
            windows.push(
                DeviceWindow::parse(&w.days, &w.start, &w.end, &w.zone)
                    .map_err(|e| err(path, &format!("key `window[{i}]`: {e}")))?,
            );
        }
        let cmdline = match (&backend, &raw.bootloader.cmdline) {
            (_, Some(c)) => Some(resolve(c)),
            (Backend::Sim, None) => None,
            (_, None) => Some(PathBuf::from("/proc/cmdline")),
        };
        let hooks = crate::hooks::Hooks::from_raw(raw.hooks).map_err(|e| err(path, &e))?;
        let api = {
            let a = &raw.api;
            let tcp = match (&a.tcp, &a.cert, &a.key, &a.client_ca) {
                (None, None, None, None) => None,
                (Some(listen), Some(cert), Some(key), Some(ca)) => Some(TcpApi {
                    listen: listen.parse().map_err(|_| {
                        err(
                            path,
                            &format!("key `api.tcp`: expected an address and port such as 0.0.0.0:7443, found {listen:?}"),
                        )
                    })?,
                    cert: resolve(cert),
                    key: resolve(key),
                    client_ca: resolve(ca),
                }),
                _ => {
                    return Err(err(
                        path,
                        "keys `api.tcp`, `api.cert`, `api.key`, `api.client_ca`: give all four (the TCP API always uses mutual TLS) or none",
                    ));
                }
            };
            if let Some(g) = &a.group
                && (g.is_empty() || g.len() > 64 || g.contains([':', '\n', '\0']))
            {
                return Err(err(
                    path,
                    &format!("key `api.group`: not a group name or number: {g:?}"),
                ));
            }
            let socket = resolve(a.socket.as_deref().unwrap_or(Path::new(DEFAULT_SOCKET)));
            // sun_path holds 108 bytes with its terminating NUL.
            if socket.as_os_str().len() > 107 {
                return Err(err(
                    path,
                    "key `api.socket`: a socket path is at most 107 bytes",
                ));
            }
            ApiSettings {
                socket,
                group: a.group.clone(),
                tcp,
                metrics_file: a.metrics_file.as_deref().map(resolve),
            }
        };
        let self_update = SelfUpdateSettings {
            binary: match &raw.self_update.binary {
                Some(b) => resolve(b),
                None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/abide")),
            },
            deadline: duration(
                "self_update.deadline",
                &raw.self_update.deadline,
                SignedDuration::from_secs(60),
            )?,
        };
        if self_update.deadline < SignedDuration::from_secs(1) {
            return Err(err(path, "key `self_update.deadline`: at least 1s"));
        }
        let download = DownloadSettings {
            min_rate: match &raw.download.min_rate {
                None => 1 << 10,
                Some(text) => parse_size(text)
                    .map_err(|e| err(path, &format!("key `download.min_rate`: {e}")))?,
            },
            window: duration(
                "download.window",
                &raw.download.window,
                SignedDuration::from_secs(60),
            )?
            .unsigned_abs(),
        };
        if download.window < std::time::Duration::from_secs(1) {
            return Err(err(path, "key `download.window`: at least 1s"));
        }
        let state_dir = raw
            .state_dir
            .as_deref()
            .map_or_else(|| PathBuf::from("/var/lib/abide"), resolve);
        let mut apps: Vec<AppSettings> = Vec::new();
        for (i, a) in raw.apps.iter().enumerate() {
            let key = |k: &str| format!("app[{i}].{k}");
            abide_bundle::Name::parse("app", &a.name, 64)
                .map_err(|e| err(path, &format!("key `{}`: {e}", key("name"))))?;
            if apps.iter().any(|o| o.name == a.name) {
                return Err(err(
                    path,
                    &format!("key `{}`: {:?} names two applications", key("name"), a.name),
                ));
            }
            for (j, service) in a.services.iter().enumerate() {
                if service.is_empty()
                    || service.len() > 256
                    || !service
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"@._:-\\".contains(&b))
                {
                    return Err(err(
                        path,
                        &format!(
                            "key `{}`: expected a unit name (A-Z a-z 0-9 @ . _ : - \\), found {service:?}",
                            key(&format!("services[{j}]"))
                        ),
                    ));
                }
            }
            if groups
                .iter()
                .flat_map(|g| &g.slots)
                .any(|slot| slot.class == a.name)
            {
                return Err(err(
                    path,
                    &format!(
                        "key `{}`: {:?} is also the class of a slot of the groups; a bundle for it would be ambiguous",
                        key("name"),
                        a.name
                    ),
                ));
            }
            let backups = a.backups.unwrap_or(3);
            if !(1..=100).contains(&backups) {
                return Err(err(
                    path,
                    &format!(
                        "key `{}`: expected 1 to 100, found {backups}",
                        key("backups")
                    ),
                ));
            }
            let after_backup = match a.after_backup.as_deref().unwrap_or("keep") {
                "keep" => AfterBackup::Keep,
                "discard" => AfterBackup::Discard,
                other => {
                    return Err(err(
                        path,
                        &format!(
                            "key `{}`: expected \"keep\" or \"discard\", found {other:?}",
                            key("after_backup")
                        ),
                    ));
                }
            };
            for (k, v) in [("control", &a.control), ("migrate", &a.migrate)] {
                if v.as_ref().is_some_and(|c| c.trim().is_empty()) {
                    return Err(err(
                        path,
                        &format!(
                            "key `{}`: expected a command, found an empty string",
                            key(k)
                        ),
                    ));
                }
            }
            let defaults = HealthPolicy::default();
            let data = lexical(&resolve(&a.data));
            let releases = lexical(&resolve(&a.releases));
            let link = lexical(&resolve(&a.link));
            if data.starts_with(&releases) || releases.starts_with(&data) || link.starts_with(&data)
            {
                return Err(err(
                    path,
                    &format!(
                        "keys `{}`, `{}`, `{}`: the data directory, the releases and the link must not hold one another",
                        key("data"),
                        key("releases"),
                        key("link")
                    ),
                ));
            }
            apps.push(AppSettings {
                name: a.name.clone(),
                services: a.services.clone(),
                control: a.control.clone().unwrap_or_else(|| "systemctl".to_owned()),
                backups: backups as usize,
                backup_dir: a
                    .backup_dir
                    .as_deref()
                    .map_or_else(|| state_dir.join("backups").join(&a.name), resolve),
                after_backup,
                migrate: a.migrate.clone(),
                timeout: duration(&key("timeout"), &a.timeout, SignedDuration::from_mins(5))?,
                health: HealthPolicy {
                    deadline: duration(&key("deadline"), &a.deadline, defaults.deadline)?,
                    grace: duration(&key("grace"), &a.grace, defaults.grace)?,
                },
                capacity: match &a.capacity {
                    None => None,
                    Some(text) => Some(
                        parse_size(text)
                            .map_err(|e| err(path, &format!("key `{}`: {e}", key("capacity"))))?,
                    ),
                },
                checks: parse_checks(path, &key("check"), &a.checks, &resolve)?,
                data,
                releases,
                link,
            });
        }
        Ok(Config {
            apps,
            self_update,
            download,
            api,
            cmdline,
            server,
            windows,
            hooks,
            path: path.to_owned(),
            product: raw.product,
            compatible,
            state_dir,
            state_reserve,
            bundle_checks: abide_bundle::chunks::Checks::paranoid(raw.paranoid),
            trust: resolve(&raw.trust),
            reboot: raw.reboot,
            backend,
            boot_path: resolve(&raw.bootloader.path),
            boot_policy: abide_core::transaction::BootPolicy {
                tries,
                max_trial_boots: raw.bootloader.max_trial_boots.unwrap_or(3),
            },
            groups,
            health,
            checks,
        })
    }

    /// The group called `name`.
    pub fn group(&self, name: &Group) -> Option<&SlotGroup> {
        self.groups.iter().find(|g| &g.name == name)
    }

    /// The group names.
    pub fn group_names(&self) -> Vec<Group> {
        self.groups.iter().map(|g| g.name.clone()).collect()
    }

    /// The application called `name`.
    pub fn app(&self, name: &str) -> Option<&AppSettings> {
        self.apps.iter().find(|a| a.name == name)
    }
}

/// `path` with `.` and `..` taken out by reading them (no link is followed), so that paths
/// compare as the names they are.
pub fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn err(path: &Path, what: &str) -> AgentError {
    AgentError::Config {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M"))?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?}: the unit is K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `[[health.check]]` or `[[app.check]]` entries (`prefix` names them in errors), validated.
fn parse_checks(
    path: &Path,
    prefix: &str,
    raw: &[RawCheck],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = |k: &str| format!("{prefix}[{i}].{k}");
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| {
                err(
                    path,
                    &format!("key `{}`: required for kind {:?}", key(k), c.kind),
                )
            })
        };
        let kind = match c.kind.as_str() {
            "command" => CheckKind::Command(need(c.command.clone(), "command")?),
            "file" => {
                CheckKind::File(resolve(&c.path.clone().ok_or_else(|| {
                    err(path, &format!("key `{}`: required", key("path")))
                })?))
            }
            "tcp" => CheckKind::Tcp(need(c.address.clone(), "address")?),
            "http" => {
                let url = need(c.url.clone(), "url")?;
                let valid = reqwest::Url::parse(&url).is_ok_and(|u| {
                    matches!(u.scheme(), "http" | "https") && u.host_str().is_some()
                });
                if !valid {
                    return Err(err(
                        path,
                        &format!(
                            "key `{}`: expected an http:// or https:// URL, found {url:?}",
                            key("url")
                        ),
                    ));
                }
                if c.ca_file.is_some() && !url.starts_with("https://") {
                    return Err(err(
                        path,
                        &format!("key `{}`: a CA file needs an https:// URL", key("ca_file")),
                    ));
                }
                CheckKind::Http {
                    url,
                    ca_file: c.ca_file.as_deref().map(resolve),
                    status: c.status.unwrap_or(200),
                    body: c.body.clone(),
                }
            }
            "systemd" => CheckKind::Systemd(need(c.unit.clone(), "unit")?),
            "process" => CheckKind::Process(need(c.process.clone(), "process")?),
            "uptime" => CheckKind::Uptime(
                c.seconds
                    .ok_or_else(|| err(path, &format!("key `{}`: required", key("seconds"))))?,
            ),
            other => {
                return Err(err(
                    path,
                    &format!(
                        "key `{}`: expected one of command, http, tcp, systemd, process, file, uptime, found {other:?}",
                        key("kind")
                    ),
                ));
            }
        };
        checks.push(Check {
            name: c.name.clone(),
            kind,
            timeout: duration(
                path,
                &key("timeout"),
                &c.timeout,
                SignedDuration::from_secs(30),
            )?,
            retries: c.retries.unwrap_or(0),
            interval: duration(
                path,
                &key("interval"),
                &c.interval,
                SignedDuration::from_secs(5),
            )?,
            critical: c.critical.unwrap_or(true),
        });
    }
    Ok(checks)
}

/// A duration key: `default` when absent.
fn duration(
    path: &Path,
    key: &str,
    value: &Option<String>,
    default: SignedDuration,
) -> Result<SignedDuration> {
    match value {
        None => Ok(default),
        Some(text) => abide_core::duration::parse(text)
            .ok()
            .and_then(|d| SignedDuration::try_from(d).ok())
            .ok_or_else(|| err(path, &format!("key `{key}`: expected a duration like \"30s\", \"1h30m\" or seconds (\"90\"), found {text:?}"))),
    }
}
