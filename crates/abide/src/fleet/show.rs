//! How `abide fleet` shows the server's answers to people: a line for each kind of answer
//! ([`Answer`]) and a table for each kind of list ([`Row`], printed by comfy-table). With
//! `--json` the same typed values are printed as they came, so both views come from one value.

use abide_fleet_json::{
    AdminToken, AdminTokenView, AuditHead, AuditRecord, AuditVerify, Delta, DeviceRevoked,
    DeviceView, EnrollToken, EnrollTokenView, GroupView, Release, RolloutStatus, TrustView,
};
use serde::Serialize;

use crate::Output;

/// A single answer, as a line (or a few) for people.
pub trait Answer: Serialize {
    /// The text.
    fn text(&self) -> String;
}

/// An element of a list, as a row of a table for people.
pub trait Row: Serialize {
    /// The column headers.
    const COLUMNS: &'static [&'static str];
    /// The cells, one per column.
    fn cells(&self) -> Vec<String>;
}

impl Output {
    /// Prints `answer` as JSON, or its text for people.
    pub fn answer<T: Answer>(&self, answer: &T) -> anyhow::Result<()> {
        self.print(answer, || answer.text())
    }

    /// Prints `rows` as a JSON array, or as a table for people.
    pub fn table<R: Row>(&self, rows: &[R]) -> anyhow::Result<()> {
        self.print(&rows, || {
            let mut table = comfy_table::Table::new();
            table
                .load_preset(comfy_table::presets::NOTHING)
                .set_header(R::COLUMNS.iter().map(|c| c.to_uppercase()));
            for r in rows {
                table.add_row(r.cells());
            }
            for column in table.column_iter_mut() {
                column.set_padding((0, 2));
            }
            table.trim_fmt()
        })
    }
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

impl Answer for Release {
    fn text(&self) -> String {
        format!(
            "release {}: {} {} (security version {}), {} bytes",
            self.id, self.product, self.version, self.security_version, self.size
        )
    }
}

impl Row for Release {
    const COLUMNS: &'static [&'static str] = &[
        "id",
        "product",
        "version",
        "security_version",
        "size",
        "created_at",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.product.clone(),
            self.version.clone(),
            self.security_version.to_string(),
            self.size.to_string(),
            self.created_at.clone(),
        ]
    }
}

impl Answer for Delta {
    fn text(&self) -> String {
        format!(
            "delta {} {} -> {} {}: {} bytes (the bundle {}, its missing chunks {}){}",
            self.from_release,
            self.from_version,
            self.to_release,
            self.to_version,
            self.size,
            self.full_size,
            self.chunks_size,
            if self.offered {
                ", given to devices"
            } else {
                ", not the smallest: not given"
            }
        )
    }
}

impl Row for Delta {
    const COLUMNS: &'static [&'static str] = &[
        "from_release",
        "from_version",
        "to_version",
        "size",
        "chunks_size",
        "full_size",
        "offered",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.from_release.clone(),
            self.from_version.clone(),
            self.to_version.clone(),
            self.size.to_string(),
            self.chunks_size.to_string(),
            self.full_size.to_string(),
            self.offered.to_string(),
        ]
    }
}

/// A trust root as published (`published`) or shown; its JSON is the root's.
#[derive(Serialize)]
pub struct Trust {
    /// The root.
    #[serde(flatten)]
    pub view: TrustView,
    /// Whether it was just published.
    #[serde(skip)]
    pub published: bool,
}

impl Answer for Trust {
    fn text(&self) -> String {
        format!(
            "trust root version {}{}: threshold {} of {}",
            self.view.version,
            if self.published { " published" } else { "" },
            self.view.threshold,
            self.view.keys.join(", ")
        )
    }
}

impl Answer for EnrollToken {
    fn text(&self) -> String {
        self.token.clone()
    }
}

impl Row for EnrollTokenView {
    const COLUMNS: &'static [&'static str] =
        &["id", "group", "uses", "used", "expires_at", "revoked_at"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.group.clone(),
            self.uses.to_string(),
            self.used.to_string(),
            self.expires_at.clone(),
            or_dash(self.revoked_at.as_deref()),
        ]
    }
}

impl Answer for EnrollTokenView {
    fn text(&self) -> String {
        format!(
            "revoked {} ({} of {} uses made)",
            self.id, self.used, self.uses
        )
    }
}

impl Answer for AdminToken {
    fn text(&self) -> String {
        self.token.clone()
    }
}

impl Row for AdminTokenView {
    const COLUMNS: &'static [&'static str] = &["id", "name", "role", "created_at", "revoked_at"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.name.clone(),
            self.role.to_string(),
            self.created_at.clone(),
            or_dash(self.revoked_at.as_deref()),
        ]
    }
}

impl Answer for AdminTokenView {
    fn text(&self) -> String {
        format!("revoked {} ({}, {})", self.id, self.name, self.role)
    }
}

impl Answer for DeviceRevoked {
    fn text(&self) -> String {
        format!("revoked {} at {}", self.id, self.revoked_at)
    }
}

impl Row for DeviceView {
    const COLUMNS: &'static [&'static str] =
        &["id", "group", "version", "state", "reason", "last_seen"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.group.clone(),
            or_dash(self.version.as_deref()),
            self.state.clone(),
            or_dash(self.reason.as_deref()),
            or_dash(self.last_seen.as_deref()),
        ]
    }
}

impl Answer for RolloutStatus {
    fn text(&self) -> String {
        let s = self;
        let mut text = format!(
            "rollout {} of release {}: {}{} — stage {} of {}, {} devices: {} committed, {} failed, {} in progress, {} pending",
            s.id,
            s.release,
            s.status,
            s.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            s.stage,
            s.stages.len(),
            s.devices,
            s.committed,
            s.failed,
            s.in_progress,
            s.pending,
        );
        if let Some(p) = &s.prestage {
            text.push_str(&format!(
                "\n  prestage: activation waits for {p} staged; {}% staged ({} devices)",
                s.staged_share, s.staged
            ));
        }
        for st in &s.stages {
            text.push_str(&format!(
                "\n  stage {} ({}%, soak {}s): {} devices, {} committed, {} failed{}",
                st.index,
                st.percent,
                st.soak_seconds,
                st.devices,
                st.committed,
                st.failed,
                if st.current { "  <- current" } else { "" }
            ));
        }
        for f in &s.failing {
            text.push_str(&format!(
                "\n  failing: {} {}: {}",
                f.device,
                f.state,
                f.reason.as_deref().unwrap_or("")
            ));
        }
        text
    }
}

impl Row for RolloutStatus {
    const COLUMNS: &'static [&'static str] = &[
        "id",
        "release",
        "status",
        "stage",
        "devices",
        "committed",
        "failed",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.release.clone(),
            self.status.to_string(),
            self.stage.to_string(),
            self.devices.to_string(),
            self.committed.to_string(),
            self.failed.to_string(),
        ]
    }
}

impl Answer for GroupView {
    fn text(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// A group's settings just changed.
#[derive(Serialize)]
#[serde(transparent)]
pub struct GroupSet(pub GroupView);

impl Answer for GroupSet {
    fn text(&self) -> String {
        format!(
            "group {}: {}",
            self.0.group,
            serde_json::to_string(&self.0.settings).unwrap_or_default()
        )
    }
}

impl Answer for AuditHead {
    fn text(&self) -> String {
        format!(
            "record {} {} (server key {})",
            self.seq, self.hash, self.key
        )
    }
}

impl Answer for AuditVerify {
    fn text(&self) -> String {
        if self.ok {
            format!(
                "ok: {} audit records, the hash chain is intact",
                self.records
            )
        } else {
            format!(
                "audit trail damaged at record {}: {}",
                self.first_bad.unwrap_or(0),
                self.problem.as_deref().unwrap_or("")
            )
        }
    }
}

impl Row for AuditRecord {
    const COLUMNS: &'static [&'static str] = &["seq", "at", "actor", "action", "details"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.at.clone(),
            self.actor.clone(),
            self.action.clone(),
            self.details.to_string(),
        ]
    }
}
