//! The checks of `system.toml` that look at more than one key, one function per section:
//! what serde cannot say by the type of a single value (a uboot backend needs its copy's size,
//! the TCP API all four of its keys, an application's directories must not hold one another).

use std::path::{Path, PathBuf};

use abide_core::{Group, HealthPolicy};
use abide_fs::persist::read_bounded;
use jiff::SignedDuration;

use super::raw::{
    BackendKind, CheckKindName, RawApi, RawApp, RawBootloader, RawCheck, RawGroup, RawServer, Size,
};
use super::{
    AfterBackup, ApiSettings, AppSettings, Backend, Check, CheckKind, DEFAULT_SOCKET,
    ServerSettings, Slot, SlotGroup, SlotKind, TcpApi, err, lexical,
};
use crate::error::Result;

/// Where the file is (errors name it) and the directory its relative paths are resolved
/// against (absolute, so that links and messages do not depend on the working directory).
pub(super) struct Ctx<'a> {
    pub(super) path: &'a Path,
    base: PathBuf,
}

impl Ctx<'_> {
    /// The context of the file at `path`.
    pub(super) fn new(path: &Path) -> Ctx<'_> {
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Ctx {
            path,
            base: std::path::absolute(base).unwrap_or_else(|_| base.to_owned()),
        }
    }

    /// `p` relative to the file's directory, unless it is absolute.
    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }
}

/// `[bootloader]`: the backend and the boot attempts a trial gets.
pub(super) fn bootloader(cx: &Ctx<'_>, raw: &RawBootloader) -> Result<(Backend, u8)> {
    let path = cx.path;
    let resolve = |p: &Path| cx.resolve(p);
    let backend = match raw.backend {
        BackendKind::Sim => Backend::Sim,
        BackendKind::Grub => Backend::Grub,
        BackendKind::Gpt => Backend::Gpt {
            cmdline: resolve(raw.cmdline.as_deref().unwrap_or(Path::new("/proc/cmdline"))),
        },
        BackendKind::SystemdBoot => Backend::SystemdBoot {
            cmdline: resolve(raw.cmdline.as_deref().unwrap_or(Path::new("/proc/cmdline"))),
        },
        BackendKind::Uboot => Backend::Uboot {
            redundant: raw.redundant_path.as_deref().map(resolve),
            size: raw
                .env_size
                .filter(|s| (64..=(1 << 20)).contains(s))
                .ok_or_else(|| {
                    err(path, "key `bootloader.env_size`: the uboot backend needs the size of a copy, 64 bytes to 1 MiB")
                })?,
        },
    };
    let tries = raw.tries.unwrap_or(1);
    if !(1..=abide_boot::MAX_TRIES).contains(&tries) {
        return Err(err(
            path,
            &format!(
                "key `bootloader.tries`: expected 1 to {}, found {tries}",
                abide_boot::MAX_TRIES
            ),
        ));
    }
    Ok((backend, tries))
}

/// `[[group]]`: exactly two, with their slots; named A and B for a real bootloader.
pub(super) fn groups(cx: &Ctx<'_>, raw: &[RawGroup], backend: &Backend) -> Result<Vec<SlotGroup>> {
    let path = cx.path;
    let resolve = |p: &Path| cx.resolve(p);
    let mut groups = Vec::new();
    for (i, g) in raw.iter().enumerate() {
        let name =
            Group::new(&g.name).map_err(|e| err(path, &format!("key `group[{i}].name`: {e}")))?;
        let mut slots = Vec::new();
        for (j, s) in g.slots.iter().enumerate() {
            let kind = s.kind.unwrap_or(SlotKind::Image);
            let capacity = match (s.capacity, kind) {
                (None, _) => None,
                (Some(Size(n)), SlotKind::Dir) => Some(n),
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
    if *backend != Backend::Sim
        && groups
            .iter()
            .any(|g| !["A", "B"].contains(&g.name.as_str()))
    {
        return Err(err(
            path,
            "key `group`: the grub, uboot, gpt and systemd-boot backends need the groups to be named A and B",
        ));
    }
    Ok(groups)
}

/// `[server]`, if there is one.
pub(super) fn server(cx: &Ctx<'_>, server: Option<RawServer>) -> Result<Option<ServerSettings>> {
    let path = cx.path;
    let resolve = |p: &Path| cx.resolve(p);
    let server = match server {
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
                    .ok_or_else(|| {
                        err(
                            path,
                            "key `server.device_id`: required where /etc/hostname gives no name",
                        )
                    })?,
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
            let poll_interval = sv
                .poll_interval
                .map_or(SignedDuration::from_secs(60), |d| d.0);
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
    Ok(server)
}

/// `[api]`.
pub(super) fn api(cx: &Ctx<'_>, a: &RawApi) -> Result<ApiSettings> {
    let path = cx.path;
    let resolve = |p: &Path| cx.resolve(p);
    let api = {
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
    Ok(api)
}

/// `[[app]]`: each application, checked against the groups' slot classes and the others.
pub(super) fn apps(
    cx: &Ctx<'_>,
    raw: &[RawApp],
    groups: &[SlotGroup],
    state_dir: &Path,
) -> Result<Vec<AppSettings>> {
    let path = cx.path;
    let resolve = |p: &Path| cx.resolve(p);
    let mut apps: Vec<AppSettings> = Vec::new();
    for (i, a) in raw.iter().enumerate() {
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
        let after_backup = a.after_backup.unwrap_or(AfterBackup::Keep);
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
        if data.starts_with(&releases) || releases.starts_with(&data) || link.starts_with(&data) {
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
            timeout: a.timeout.map_or(SignedDuration::from_mins(5), |d| d.0),
            health: HealthPolicy {
                deadline: a.deadline.map_or(defaults.deadline, |d| d.0),
                grace: a.grace.map_or(defaults.grace, |d| d.0),
            },
            capacity: a.capacity.map(|s| s.0),
            lease: a.lease,
            checks: parse_checks(path, &key("check"), &a.checks, &resolve, None)?,
            data,
            releases,
            link,
        });
    }
    Ok(apps)
}

/// `[[health.check]]` or `[[app.check]]` entries (`prefix` names them in errors), validated;
/// `fleet` is what a `fleet` check needs, where one may stand.
pub(super) fn parse_checks(
    path: &Path,
    prefix: &str,
    raw: &[RawCheck],
    resolve: &dyn Fn(&Path) -> PathBuf,
    fleet: Option<&crate::config::FleetProbe>,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        let key = |k: &str| format!("{prefix}[{i}].{k}");
        let need = |v: Option<String>, k: &str| {
            v.ok_or_else(|| {
                err(
                    path,
                    &format!("key `{}`: required for kind {:?}", key(k), c.kind.word()),
                )
            })
        };
        let kind = match c.kind {
            CheckKindName::Command => CheckKind::Command(need(c.command.clone(), "command")?),
            CheckKindName::File => {
                CheckKind::File(resolve(&c.path.clone().ok_or_else(|| {
                    err(path, &format!("key `{}`: required", key("path")))
                })?))
            }
            CheckKindName::Tcp => CheckKind::Tcp(need(c.address.clone(), "address")?),
            CheckKindName::Http => {
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
            CheckKindName::Systemd => CheckKind::Systemd(need(c.unit.clone(), "unit")?),
            CheckKindName::Process => CheckKind::Process(need(c.process.clone(), "process")?),
            CheckKindName::Uptime => CheckKind::Uptime(
                c.seconds
                    .ok_or_else(|| err(path, &format!("key `{}`: required", key("seconds"))))?,
            ),
            CheckKindName::Fleet => CheckKind::Fleet(Box::new(fleet.cloned().ok_or_else(|| {
                err(
                    path,
                    &format!(
                        "key `{}`: a \"fleet\" check checks in with the fleet server: it belongs in [[health.check]] with a [server]",
                        key("kind")
                    ),
                )
            })?)),
        };
        checks.push(Check {
            name: c.name.clone(),
            kind,
            timeout: c.timeout.map_or(SignedDuration::from_secs(30), |d| d.0),
            retries: c.retries.unwrap_or(0),
            interval: c.interval.map_or(SignedDuration::from_secs(5), |d| d.0),
            critical: c.critical.unwrap_or(true),
        });
    }
    Ok(checks)
}
