//! The agent's metrics in the Prometheus text format: served on the API socket (`GET
//! /metrics`, and `GetMetrics`) and, with `[api] metrics_file`, kept in a file for
//! node-exporter's textfile collector. Durations come from the audit log (the record of every
//! step), so they survive restarts and agree with `abide log`.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::audit::AuditLog;
use crate::shared::Shared;
use crate::state::DeviceRecord;

/// Every schedule state, for a complete `abide_agent_schedules` family.
const SCHEDULE_STATES: [&str; 6] = [
    "pending",
    "in_progress",
    "completed",
    "failed",
    "rolled_back",
    "cancelled",
];

/// The metrics now.
pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let config = &shared.config;
    family(
        &mut out,
        "abide_agent_info",
        "gauge",
        "The agent's version and whether it belongs to a fleet.",
    );
    let _ = writeln!(
        out,
        "abide_agent_info{{version=\"{}\",fleet=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        config.server.is_some()
    );
    if let Some(t) = *shared.last_checkin.lock().expect("not poisoned") {
        family(
            &mut out,
            "abide_agent_last_checkin_timestamp_seconds",
            "gauge",
            "When the agent last checked in with the fleet server (Unix time).",
        );
        let _ = writeln!(
            out,
            "abide_agent_last_checkin_timestamp_seconds {}",
            t.as_millisecond() as f64 / 1000.0
        );
    }

    let log = AuditLog::verify(&config.state_dir.join("audit.log"));
    family(
        &mut out,
        "abide_agent_audit_log_ok",
        "gauge",
        "1 when the audit log's hash chain checks out, else 0.",
    );
    let _ = writeln!(out, "abide_agent_audit_log_ok {}", u8::from(log.is_ok()));
    let records = log.unwrap_or_default();
    let times = Phases::of(&records);
    for (name, help, value) in [
        (
            "abide_agent_download_seconds",
            "The last install from its start to staged: the bundle read and the target written, in one streaming pass.",
            times.download,
        ),
        (
            "abide_agent_apply_seconds",
            "The last install from staged to activated: the post-install and pre-reboot hooks and the bootloader's write.",
            times.apply,
        ),
        (
            "abide_agent_reboot_to_healthy_seconds",
            "The last committed update from activation to commit: the reboot, the trial boot and the health gate.",
            times.healthy,
        ),
    ] {
        if let Some(v) = value {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
    }
    let mut rollbacks: BTreeMap<String, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.event == "rollback") {
        let kind = r
            .details
            .get("reason_kind")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        *rollbacks.entry(kind.to_owned()).or_default() += 1;
    }
    family(
        &mut out,
        "abide_agent_rollbacks_total",
        "counter",
        "Trials that ended on the known-good group, by reason.",
    );
    for (kind, n) in &rollbacks {
        let _ = writeln!(out, "abide_agent_rollbacks_total{{reason=\"{kind}\"}} {n}");
    }

    let mut app_rollbacks: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.event == "app-rolled-back") {
        let text = |k: &str| {
            r.details
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("unknown")
                .to_owned()
        };
        *app_rollbacks
            .entry((text("app"), text("reason_kind")))
            .or_default() += 1;
    }
    family(
        &mut out,
        "abide_agent_app_rollbacks_total",
        "counter",
        "Application updates that ended on the previous release and its data, by application and reason.",
    );
    for ((app, kind), n) in &app_rollbacks {
        let _ = writeln!(
            out,
            "abide_agent_app_rollbacks_total{{app=\"{app}\",reason=\"{kind}\"}} {n}"
        );
    }

    let book = shared.book();
    family(
        &mut out,
        "abide_agent_schedules",
        "gauge",
        "Schedules the device keeps, by state.",
    );
    for state in SCHEDULE_STATES {
        let n = book
            .schedules
            .iter()
            .filter(|s| s.state.name() == state)
            .count();
        let _ = writeln!(out, "abide_agent_schedules{{state=\"{state}\"}} {n}");
    }
    if let Ok(state) = DeviceRecord::load(&config.state_dir) {
        family(
            &mut out,
            "abide_agent_transaction_state",
            "gauge",
            "1 for the state of the device's last transaction (idle when there is none).",
        );
        let name = state
            .transaction
            .as_ref()
            .map_or("idle", |t| t.state.name());
        let _ = writeln!(out, "abide_agent_transaction_state{{state=\"{name}\"}} 1");
        family(
            &mut out,
            "abide_agent_security_version",
            "gauge",
            "The device's anti-rollback counter.",
        );
        let _ = writeln!(
            out,
            "abide_agent_security_version {}",
            state.security_version
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The durations of the last install's phases, from the audit log.
#[derive(Debug, Default, PartialEq)]
struct Phases {
    download: Option<f64>,
    apply: Option<f64>,
    healthy: Option<f64>,
}

impl Phases {
    fn of(records: &[crate::audit::Record]) -> Phases {
        let mut began: BTreeMap<&str, jiff::Timestamp> = BTreeMap::new();
        let mut staged: BTreeMap<&str, jiff::Timestamp> = BTreeMap::new();
        let mut activated: BTreeMap<&str, jiff::Timestamp> = BTreeMap::new();
        let mut phases = Phases::default();
        let secs = |a: jiff::Timestamp, b: jiff::Timestamp| b.duration_since(a).as_secs_f64();
        for r in records {
            let Some(tx) = r.details.get("transaction").and_then(|v| v.as_str()) else {
                continue;
            };
            match r.event.as_str() {
                "begin" => {
                    began.insert(tx, r.time);
                }
                "stage" => {
                    staged.insert(tx, r.time);
                    phases.download = began.get(tx).map(|&b| secs(b, r.time));
                }
                "activate" => {
                    activated.insert(tx, r.time);
                    phases.apply = staged.get(tx).map(|&s| secs(s, r.time));
                }
                "commit" => {
                    phases.healthy = activated.get(tx).map(|&a| secs(a, r.time));
                }
                _ => {}
            }
        }
        phases
    }
}
