//! The agent's local API (`abide_agent_api`, gRPC): the views it answers with, built from the
//! device's files the same way whether the agent serves them or the `abide` command reads them
//! itself while no agent runs, and the service (`service`) the agent serves on its socket.

pub mod service;

use abide_agent_api as pb;
use abide_core::schedule::{Origin, Rollback, Schedule, ScheduleState, Source, When};
use abide_core::{CheckOutcome, Criticality, TxState};

use crate::audit::AuditLog;
use crate::config::Config;
use crate::device::Device;
use crate::error::Result;
use crate::health::{Clock, Running, run_checks};

/// The device's status (`Status`; `abide status`).
pub fn status(device: &Device) -> Result<pb::Status> {
    let state = device.state()?;
    let (booted, good) = device.groups()?;
    let tx = state.transaction.as_ref();
    let reason = tx
        .and_then(|t| match &t.state {
            TxState::RolledBack { reason } => Some(reason.to_string()),
            TxState::Failed { reason } => Some(reason.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(pb::Status {
        version: state.version.to_string(),
        booted: booted.map(|g| g.to_string()).unwrap_or_default(),
        good: good.map(|g| g.to_string()).unwrap_or_default(),
        state: tx.map_or("idle", |t| t.state.name()).to_owned(),
        security_version: state.security_version,
        transaction: tx.map(|t| t.id.clone()).unwrap_or_default(),
        target: tx.map(|t| t.target.to_string()).unwrap_or_default(),
        target_version: tx.map(|t| t.version.to_string()).unwrap_or_default(),
        reason,
        quarantine: state.quarantine.versions().map(str::to_owned).collect(),
        schedule: String::new(),
        agent_version: crate::selfupdate::agent_version(&device.config.state_dir),
        fleet: device.config.server.is_some(),
        pid: 0,
        started: String::new(),
    })
}

/// Runs the configured checks now (`GetHealth`; `abide health`): on the trial's version during
/// a trial, else on the committed one.
pub fn health(device: &Device, clock: &dyn Clock) -> Result<pb::Health> {
    let state = device.state()?;
    let (booted, _) = device.groups()?;
    let group = booted.map(|g| g.to_string()).unwrap_or_default();
    let trial = state
        .transaction
        .as_ref()
        .filter(|t| matches!(t.state, TxState::Trial { .. }));
    let version = trial.map_or(&state.version, |t| &t.version).to_string();
    let running = Running {
        version: &version,
        transaction: trial.map(|t| t.id.as_str()),
    };
    let results = run_checks(&device.config, running, &group, clock);
    let checks = check_views(&results);
    Ok(pb::Health {
        healthy: results.iter().all(|r| r.outcome == CheckOutcome::Pass),
        checks,
    })
}

/// The results of health checks as the API and the CLI show them.
pub fn check_views(results: &[abide_core::CheckResult]) -> Vec<pb::CheckResult> {
    results
        .iter()
        .map(|r| {
            let (outcome, detail) = match &r.outcome {
                CheckOutcome::Pass => ("pass", String::new()),
                CheckOutcome::Fail(d) => ("fail", d.clone()),
                CheckOutcome::Pending => ("pending", String::new()),
            };
            pb::CheckResult {
                name: r.name.clone(),
                critical: r.criticality == Criticality::Critical,
                outcome: outcome.to_owned(),
                detail,
            }
        })
        .collect()
}

/// Every rollback the audit log records, newest first (`GetRollbackHistory`; `abide
/// history`). The log's hash chain is checked first.
pub fn rollback_history(config: &Config) -> Result<pb::RollbackHistory> {
    let records = AuditLog::verify(&config.state_dir.join("audit.log"))?;
    let text = |r: &crate::audit::Record, k: &str| {
        r.details
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Ok(pb::RollbackHistory {
        rollbacks: records
            .iter()
            .rev()
            .filter(|r| r.event == "rollback" || r.event == "app-rolled-back")
            .map(|r| pb::Rollback {
                time: r.time.to_string(),
                transaction: text(r, "transaction"),
                version: text(r, "version"),
                reason: text(r, "reason"),
                app: text(r, "app"),
            })
            .collect(),
    })
}

/// The audit log's records after `after`, the newest `limit` of them (0: all), once its hash
/// chain is checked (`GetAuditLog`).
pub fn audit_log(config: &Config, after: u64, limit: u32) -> Result<pb::AuditLog> {
    let records = AuditLog::verify(&config.state_dir.join("audit.log"))?;
    let mut records: Vec<_> = records.into_iter().filter(|r| r.seq > after).collect();
    if limit > 0 && records.len() > limit as usize {
        records.drain(..records.len() - limit as usize);
    }
    Ok(pb::AuditLog {
        records: records
            .into_iter()
            .map(|r| pb::AuditRecord {
                seq: r.seq,
                time: r.time.to_string(),
                event: r.event,
                details: serde_json::Value::Object(r.details).to_string(),
                hash: r.hash,
            })
            .collect(),
    })
}

/// A schedule as the API shows it.
pub fn schedule(s: &Schedule) -> pb::Schedule {
    let (source_kind, source) = match &s.source {
        Source::Url(u) => ("url", u.clone()),
        Source::File(f) => ("file", f.clone()),
    };
    let (when, at) = match s.when {
        When::Now => ("now", String::new()),
        When::At(t) => ("at", t.to_string()),
        When::InWindow => ("in-window", String::new()),
    };
    let (origin, rollout) = match &s.origin {
        Origin::Operator => ("operator", String::new()),
        Origin::Fleet { rollout } => ("fleet", rollout.clone()),
    };
    let (transaction, reason) = match &s.state {
        ScheduleState::InProgress { transaction } | ScheduleState::Cancelled { transaction } => {
            (transaction.clone().unwrap_or_default(), String::new())
        }
        ScheduleState::Failed { reason } | ScheduleState::RolledBack { reason } => {
            (String::new(), reason.clone())
        }
        ScheduleState::Pending | ScheduleState::Completed => (String::new(), String::new()),
    };
    pb::Schedule {
        id: s.id.clone(),
        source_kind: source_kind.to_owned(),
        source,
        sha256: s.sha256.clone().unwrap_or_default(),
        when: when.to_owned(),
        at,
        rollback: match s.rollback {
            Rollback::Automatic => "automatic",
            Rollback::Manual => "manual",
        }
        .to_owned(),
        origin: origin.to_owned(),
        rollout,
        created: s.created.to_string(),
        updated: s.updated.to_string(),
        state: s.state.name().to_owned(),
        transaction: s.transaction.clone().unwrap_or(transaction),
        reason,
        version: s.version.clone().unwrap_or_default(),
    }
}
