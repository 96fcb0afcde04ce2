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

/// Gives the enum `$name` its words (`word()`, one table both ways) and deserializes it from
/// one of them, saying which it takes when it finds another.
macro_rules! words {
    ($name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        impl $name {
            /// Every value, in the order its words are listed.
            pub(in crate::config) const ALL: &[$name] = &[$($name::$variant),+];

            /// Its word in system.toml.
            pub(in crate::config) fn word(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<$name, D::Error> {
                let text = String::deserialize(d)?;
                $name::ALL.iter().copied().find(|v| v.word() == text).ok_or_else(|| {
                    let words: Vec<&str> = $name::ALL.iter().map(|v| v.word()).collect();
                    serde::de::Error::custom(format!(
                        "expected {}, found {text:?}",
                        $crate::config::one_of(&words)
                    ))
                })
            }
        }
    };
}

/// `"a", "b" or "c"`.
fn one_of(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

mod raw;
mod sections;

use raw::RawConfig;

/// What a rollback does with the data the application wrote after its backup (`after_backup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterBackup {
    /// It is deleted once the backup is back (recorded in the audit log).
    Discard,
    /// It is kept beside the restored data directory, as `DATA.rolled-back-ID` (the default).
    Keep,
}

words!(AfterBackup {
    Keep = "keep",
    Discard = "discard",
});

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
    /// Whether restarting it makes the device unavailable, so that a fleet rollout of it
    /// holds a reboot lease while it updates (`lease = true`; default false).
    pub lease: bool,
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

words!(SlotKind {
    Image = "image",
    Block = "block",
    Dir = "dir",
});

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
    /// The fleet server answers a check-in from this boot (`kind = "fleet"`).
    Fleet(Box<FleetProbe>),
}

/// What a `fleet` check needs: the server, and the state directory that holds the device's
/// enrolment (its credential and the server key it pinned) and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetProbe {
    /// `[server]`.
    pub server: ServerSettings,
    /// The state directory.
    pub state_dir: PathBuf,
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

    /// Validates configuration text that came from `path`: serde reads every key as its type
    /// (an error names the key), then each section's checks that look at several keys run
    /// (`sections`).
    pub fn parse(path: &Path, text: &str) -> Result<Config> {
        // The file's syntax first (an error says where, by line), then its keys as their types
        // (an error names the key).
        let table: toml::Table =
            toml::from_str(text).map_err(|e| err(path, e.to_string().trim_end()))?;
        let mut raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                if key == "." {
                    err(path, inner.message())
                } else {
                    err(path, &format!("key `{key}`: {}", inner.message()))
                }
            })?;
        let cx = sections::Ctx::new(path);
        let resolve = |p: &Path| cx.resolve(p);
        let compatible = abide_bundle::HardwareId::parse("compatible", &raw.compatible, 64)
            .map_err(|e| err(path, &format!("key `compatible`: {e}")))?;
        abide_bundle::Name::parse("product", &raw.product, 64)
            .map_err(|e| err(path, &format!("key `product`: {e}")))?;
        let (backend, tries) = sections::bootloader(&cx, &raw.bootloader)?;
        let groups = sections::groups(&cx, &raw.groups, &backend)?;
        let defaults = HealthPolicy::default();
        let health = HealthPolicy {
            deadline: raw.health.deadline.map_or(defaults.deadline, |d| d.0),
            grace: raw.health.grace.map_or(defaults.grace, |d| d.0),
        };
        let state_reserve = raw.state_reserve.map_or(16 << 20, |s| s.0);
        let server = sections::server(&cx, raw.server.take())?;
        let state_dir = raw
            .state_dir
            .as_deref()
            .map_or_else(|| PathBuf::from("/var/lib/abide"), resolve);
        let probe = server.clone().map(|server| FleetProbe {
            server,
            state_dir: state_dir.clone(),
        });
        let checks = sections::parse_checks(
            path,
            "health.check",
            &raw.health.checks,
            &resolve,
            probe.as_ref(),
        )?;
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
        let api = sections::api(&cx, &raw.api)?;
        let self_update = SelfUpdateSettings {
            binary: match &raw.self_update.binary {
                Some(b) => resolve(b),
                None => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/abide")),
            },
            deadline: raw
                .self_update
                .deadline
                .map_or(SignedDuration::from_secs(60), |d| d.0),
        };
        if self_update.deadline < SignedDuration::from_secs(1) {
            return Err(err(path, "key `self_update.deadline`: at least 1s"));
        }
        let download = DownloadSettings {
            min_rate: raw.download.min_rate.map_or(1 << 10, |s| s.0),
            window: raw
                .download
                .window
                .map_or(SignedDuration::from_secs(60), |d| d.0)
                .unsigned_abs(),
        };
        if download.window < std::time::Duration::from_secs(1) {
            return Err(err(path, "key `download.window`: at least 1s"));
        }
        let apps = sections::apps(&cx, &raw.apps, &groups, &state_dir)?;
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
