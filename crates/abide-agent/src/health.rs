//! Running the health gate: each configured check with its timeout, retries and interval,
//! until `abide_core::health::verdict` decides.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::Duration;

use abide_core::{CheckOutcome, CheckResult, Criticality, Transaction, TxState, Verdict, verdict};
use jiff::{SignedDuration, Timestamp};

use crate::config::{Check, CheckKind, Config};

/// Time as the gate sees it: real on a device, simulated in tests.
pub trait Clock {
    /// Now.
    fn now(&self) -> Timestamp;
    /// Waits.
    fn sleep(&self, d: SignedDuration);
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn sleep(&self, d: SignedDuration) {
        std::thread::sleep(Duration::try_from(d).unwrap_or_default());
    }
}

/// What the checks run on: command checks see it as `ABIDE_VERSION` and `ABIDE_TRANSACTION`.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    /// The version running now (the trial's during a trial).
    pub version: &'a str,
    /// The transaction on trial, if there is one.
    pub transaction: Option<&'a str>,
}

impl<'a> Running<'a> {
    /// A trial of `tx`.
    pub fn trial(tx: &'a Transaction, version: &'a str) -> Running<'a> {
        Running {
            version,
            transaction: Some(&tx.id),
        }
    }
}

/// Runs every check of `[health]` once (with its retries) and returns the results.
pub fn run_checks(
    config: &Config,
    running: Running<'_>,
    group: &str,
    clock: &dyn Clock,
) -> Vec<CheckResult> {
    run_each(&config.checks, running, group, clock)
}

/// Runs each of `checks` once (with its retries) and returns the results.
pub fn run_each(
    checks: &[Check],
    running: Running<'_>,
    group: &str,
    clock: &dyn Clock,
) -> Vec<CheckResult> {
    checks
        .iter()
        .map(|c| CheckResult {
            name: c.name.clone(),
            criticality: if c.critical {
                Criticality::Critical
            } else {
                Criticality::NonCritical
            },
            outcome: run_check(c, running, group, clock),
        })
        .collect()
}

/// Runs the gate for a trial until it decides.
pub fn run_gate(config: &Config, tx: &Transaction, clock: &dyn Clock) -> Verdict {
    let TxState::Trial {
        since,
        mut degraded_since,
        ..
    } = tx.state
    else {
        return Verdict::Wait {
            degraded_since: None,
        };
    };
    let pause = config
        .checks
        .iter()
        .map(|c| c.interval)
        .min()
        .unwrap_or(SignedDuration::from_secs(5));
    loop {
        let version = tx.version.to_string();
        let results = run_checks(
            config,
            Running::trial(tx, &version),
            tx.target.as_str(),
            clock,
        );
        match verdict(&config.health, since, degraded_since, &results, clock.now()) {
            Verdict::Wait { degraded_since: d } => {
                degraded_since = d;
                clock.sleep(pause);
            }
            decided => return decided,
        }
    }
}

fn run_check(check: &Check, running: Running<'_>, group: &str, clock: &dyn Clock) -> CheckOutcome {
    let mut last = String::new();
    for attempt in 0..=check.retries {
        if attempt > 0 {
            clock.sleep(check.interval);
        }
        match run_once(check, running, group) {
            Ok(()) => return CheckOutcome::Pass,
            Err(why) => last = why,
        }
    }
    CheckOutcome::Fail(last)
}

fn run_once(check: &Check, running: Running<'_>, group: &str) -> Result<(), String> {
    let timeout = Duration::try_from(check.timeout).unwrap_or(Duration::from_secs(30));
    match &check.kind {
        CheckKind::Command(cmd) => {
            let env = [
                ("ABIDE_VERSION", running.version.to_string()),
                ("ABIDE_GROUP", group.to_owned()),
                (
                    "ABIDE_TRANSACTION",
                    running.transaction.unwrap_or_default().to_owned(),
                ),
            ];
            match crate::command::run(cmd, &env, timeout)? {
                (crate::command::Ended::Exited(status), _) if status.success() => Ok(()),
                (crate::command::Ended::TimedOut(t), _) => {
                    Err(format!("timed out after {}s", t.as_secs()))
                }
                (crate::command::Ended::Exited(status), out) => {
                    let out: String = out
                        .chars()
                        .skip(out.chars().count().saturating_sub(200))
                        .collect();
                    Err(format!(
                        "{status}{}{out}",
                        if out.is_empty() { "" } else { ": " }
                    ))
                }
            }
        }
        CheckKind::File(path) => {
            if path.exists() {
                Ok(())
            } else {
                Err(format!("{} does not exist", path.display()))
            }
        }
        CheckKind::Tcp(address) => {
            let addr = address
                .to_socket_addrs()
                .map_err(|e| format!("{address}: {e}"))?
                .next()
                .ok_or_else(|| format!("{address} resolves to nothing"))?;
            TcpStream::connect_timeout(&addr, timeout)
                .map(|_| ())
                .map_err(|e| format!("{address}: {e}"))
        }
        CheckKind::Http {
            url,
            ca_file,
            status,
            body,
        } => http_check(url, ca_file.as_deref(), *status, body.as_deref(), timeout),
        CheckKind::Systemd(unit) => {
            let out = Command::new("systemctl")
                .args(["is-active", unit])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run systemctl: {e}"))?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{unit} is {state}"))
            }
        }
        CheckKind::Process(name) => {
            let running = std::fs::read_dir("/proc")
                .map_err(|e| format!("/proc: {e}"))?
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .any(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == name)
                });
            if running {
                Ok(())
            } else {
                Err(format!("no process named {name}"))
            }
        }
        CheckKind::Fleet(probe) => fleet_check(probe, group, timeout),
        CheckKind::Uptime(seconds) => {
            let text = std::fs::read_to_string("/proc/uptime")
                .map_err(|e| format!("/proc/uptime: {e}"))?;
            let up: f64 = text
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or("unreadable /proc/uptime")?;
            if up >= *seconds as f64 {
                Ok(())
            } else {
                Err(format!("up {up:.0}s, need {seconds}s"))
            }
        }
    }
}

/// Bodies are read up to this many bytes (an endpoint that streams forever is cut there).
const MAX_HTTP_BODY: usize = 1 << 20;

/// A GET of `url` within `timeout` (HTTP/1.1 or HTTP/2, TLS checked against `ca_file` or the
/// system's roots, chunked bodies: reqwest): the status must be `status` and, if `body` is
/// given, the first [`MAX_HTTP_BODY`] bytes of the body must contain it. It runs on a thread of its own, so that it may be called from inside
/// or outside an async runtime.
fn http_check(
    url: &str,
    ca_file: Option<&std::path::Path>,
    status: u16,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let client =
        abide_client::tls::http_client(url, ca_file, None).map_err(|e| format!("{url}: {e}"))?;
    let get = async {
        let mut resp = client
            .get(url)
            .header(reqwest::header::USER_AGENT, "abide")
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        let code = resp.status().as_u16();
        if code != status {
            return Err(format!("{url} answered {code}, expected {status}"));
        }
        let Some(want) = body else { return Ok(()) };
        let mut content = Vec::new();
        while content.len() < MAX_HTTP_BODY
            && let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("{url}: {}", chain(&e)))?
        {
            content.extend_from_slice(&chunk);
        }
        content.truncate(MAX_HTTP_BODY);
        if String::from_utf8_lossy(&content).contains(want) {
            Ok(())
        } else {
            Err(format!("{url}: the body does not contain {want:?}"))
        }
    };
    on_own_runtime(url, timeout, get)
}

/// A check-in with the fleet server from this boot, with the device's own credential, its
/// answer verified against the server key pinned at enrolment: the network, TLS, the server
/// and the enrolment all work. It says the device is on trial of the target group `group`; the
/// answer is otherwise left to the agent.
fn fleet_check(
    probe: &crate::config::FleetProbe,
    group: &str,
    timeout: Duration,
) -> Result<(), String> {
    let server = &probe.server;
    let url = server.url.as_str();
    let enrolment = crate::fleet::store::FleetState::load(&probe.state_dir)
        .map_err(|e| e.to_string())?
        .enrolment
        .ok_or("not enrolled with the fleet server yet")?;
    let record = crate::state::DeviceRecord::load(&probe.state_dir).map_err(|e| e.to_string())?;
    let tx = record.transaction.as_ref();
    let http = abide_client::tls::http_client(
        url,
        server.ca_file.as_deref(),
        server
            .client_identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let client = abide_client::DeviceClient::restore(
        &http,
        url,
        &enrolment.device_id,
        &enrolment.credential,
        &enrolment.server_key,
        &enrolment.group,
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let request = abide_fleet_json::CheckinRequest {
        nonce: String::new(),
        version: record.version.to_string(),
        booted: Some(group.to_owned()),
        good: tx.map(|t| t.good.to_string()),
        state: abide_core::fleet::device_state(tx),
        health: Some(abide_fleet_json::Health::Unknown),
        trust_version: None,
        progress: None,
        audit_head: None,
        apps: Vec::new(),
        agent: None,
    };
    on_own_runtime(url, timeout, async {
        client
            .checkin(request, Timestamp::now())
            .await
            .map(|_| ())
            .map_err(|e| format!("{url}: {}", chain(&e)))
    })
}

/// Runs `work` on a runtime of its own, on a thread of its own (so that a check may be run from
/// inside or outside an async runtime), for at most `timeout`; `what` names it in errors.
fn on_own_runtime(
    what: &str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<(), String>> + Send,
) -> Result<(), String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("{what}: starting a runtime: {e}"))?;
                rt.block_on(async {
                    tokio::time::timeout(timeout, work)
                        .await
                        .unwrap_or_else(|_| Err(format!("{what}: no answer within {timeout:?}")))
                })
            })
            .join()
            .unwrap_or_else(|_| Err(format!("{what}: the check panicked")))
    })
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
