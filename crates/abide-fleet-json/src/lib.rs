//! The JSON the fleet server, its devices and the `abide fleet` command exchange. Plain data:
//! no I/O, no validation beyond what serde does (the server checks every field it uses).
//!
//! Times are RFC 3339 strings in UTC. Unknown fields are refused on requests, so a misspelt
//! key is an error rather than a silent default.

use serde::{Deserialize, Serialize};

/// The domain separator of an assignment signature: the server signs
/// `abide-assignment-v1` followed by the exact `payload` bytes.
pub const ASSIGNMENT_DOMAIN: &[u8] = b"abide-assignment-v1";

/// Defines a wire enum: its variants, named on the wire in snake_case (serde and strum derive
/// both directions from the variant names, one rule for all), with `ALL`, `as_str` and `parse`.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize,
            strum::IntoStaticStr, strum::EnumString, strum::Display, strum::VariantArray,
        )]
        #[serde(rename_all = "snake_case")]
        #[strum(serialize_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &[$name] = <$name as strum::VariantArray>::VARIANTS;

            /// Its name on the wire.
            pub fn as_str(self) -> &'static str {
                self.into()
            }

            /// The value named `text` on the wire.
            pub fn parse(text: &str) -> Option<$name> {
                text.parse().ok()
            }
        }
    };
}

wire_enum! {
    /// A step of an update, as a device reports it.
    ReportStatus {
        /// Content is streaming into the target group.
        Downloading,
        /// Every digest verified; waiting to activate.
        Staged,
        /// Activated; rebooting into the target.
        Rebooting,
        /// Booted into the target; the health gate decides.
        Trial,
        /// The health gate passed on the new system.
        Committed,
        /// Ended before activation (a reason is required).
        Failed,
        /// The trial failed; back on the previous system (a reason is required).
        RolledBack,
    }
}

impl ReportStatus {
    /// Whether a report of this status must say why.
    pub fn needs_reason(self) -> bool {
        matches!(self, ReportStatus::Failed | ReportStatus::RolledBack)
    }
}

wire_enum! {
    /// A device's own transaction state, in its check-in inventory.
    DeviceState {
        /// No transaction, or none since the device started.
        Idle,
        /// Content is streaming into the target group.
        Downloading,
        /// Staged, waiting to activate.
        Staged,
        /// Activated, rebooting.
        Activated,
        /// On trial.
        Trial,
        /// The last update committed.
        Committed,
        /// The last update rolled back.
        RolledBack,
        /// The last update ended before activation.
        Failed,
    }
}

wire_enum! {
    /// A device's health, from its checks.
    Health {
        /// Every check passes.
        Healthy,
        /// A non-critical check fails.
        Degraded,
        /// A critical check fails.
        Unhealthy,
        /// Not known (during a trial, whose gate decides).
        Unknown,
    }
}

wire_enum! {
    /// What a release carries, read by the server from its signed manifest.
    ReleaseKind {
        /// The operating system: the slots of the A/B groups.
        Os,
        /// One application of the devices' `[[app]]` (one component of kind `app`, whose slot
        /// class names the application).
        App,
        /// The agent itself (one component of kind `agent`), installed by its self-update trial.
        Agent,
    }
}

// The wire enums' derives are shared by the macro; only this one has a default.
#[allow(clippy::derivable_impls)]
impl Default for ReleaseKind {
    fn default() -> ReleaseKind {
        ReleaseKind::Os
    }
}

impl ReleaseKind {
    /// Whether it is the operating system (the kind left out of the JSON).
    pub fn is_os(&self) -> bool {
        *self == ReleaseKind::Os
    }
}

wire_enum! {
    /// What a device is to do with an assigned release.
    AssignedAction {
        /// Download, stage, and activate in its windows under a lease.
        Install,
        /// Download and stage only (the rollout stages every device before it activates any).
        Stage,
        /// Install the previous release; a trial rolls back instead.
        Rollback,
    }
}

wire_enum! {
    /// Where a rollout is.
    RolloutState {
        /// It targets no device yet.
        Waiting,
        /// Every targeted device stages; activation waits for the prestage share.
        Prestaging,
        /// Its current stage is being rolled out.
        Running,
        /// Stopped, with the reason (too many failures, or an operator).
        Paused,
        /// Every stage done.
        Completed,
        /// Stopped for good by an operator.
        Aborted,
        /// Rolled back across the fleet.
        RolledBack,
    }
}

impl RolloutState {
    /// The operator actions this state allows, as the API names them.
    pub fn actions(self) -> &'static [&'static str] {
        match self {
            RolloutState::Running | RolloutState::Waiting => {
                &["pause", "advance", "abort", "rollback"]
            }
            RolloutState::Prestaging => &["pause", "abort"],
            RolloutState::Paused => &["resume", "advance", "abort", "rollback"],
            RolloutState::Completed | RolloutState::Aborted => &["rollback"],
            RolloutState::RolledBack => &[],
        }
    }
}

/// A group's settings (`PUT /api/v1/groups/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    /// At most this many devices hold a lease at once (unlimited when absent).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// At least this many healthy devices stay without a lease.
    #[serde(default)]
    pub quorum: Option<u32>,
    /// Activation and reboot only inside this window.
    #[serde(default)]
    pub window: Option<GroupWindow>,
}

/// A group as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// Its name.
    pub group: String,
    /// Its settings.
    pub settings: GroupSettings,
    /// Enrolled devices in it (absent in the answer to a change).
    #[serde(default)]
    pub members: Option<u64>,
    /// Of those, healthy at their last check-in (absent in the answer to a change).
    #[serde(default)]
    pub healthy: Option<u64>,
    /// The leases held now.
    #[serde(default)]
    pub leases: Vec<LeaseView>,
}

/// A reboot lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The device holding it.
    pub device: String,
    /// When it runs out.
    pub expires_at: String,
}

/// The answer to a lease request that was granted (a refusal is a 409 `lease-refused`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// Always true.
    pub granted: bool,
    /// The device's group.
    pub group: String,
    /// When it runs out unless extended.
    pub expires_at: String,
}

/// The answer to giving a lease back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReleased {
    /// Whether a lease was held.
    pub released: bool,
}

/// The fleet's current trust root, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustView {
    /// Its version.
    pub version: u64,
    /// How many distinct keys must sign.
    pub threshold: usize,
    /// The key ids.
    pub keys: Vec<String>,
}

/// An admin's request for a rollout (`POST /api/v1/rollouts`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The release id.
    pub release: String,
    /// The stages, as `5:24h,25:24h,100`.
    pub stages: String,
    /// The failure threshold, as `10%` (the default).
    #[serde(default)]
    pub failure_threshold: Option<String>,
    /// Only devices of this group.
    #[serde(default)]
    pub group: Option<String>,
    /// Only devices with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// After how long a device that has not finished counts as failed (default `4h`).
    #[serde(default)]
    pub unresponsive_after: Option<String>,
    /// Stage every targeted device first; activate (stage by stage) only once this share of
    /// them (`80%`) is staged.
    #[serde(default)]
    pub prestage: Option<String>,
}

/// A rollout as the admin API, `abide fleet` and the web page show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Its id.
    pub id: String,
    /// The release it rolls out.
    pub release: String,
    /// Where it is.
    pub status: RolloutState,
    /// Why it is paused or stopped.
    pub reason: Option<String>,
    /// The targeted group.
    pub group: Option<String>,
    /// The targeted tag.
    pub tag: Option<String>,
    /// The current stage, from 1.
    pub stage: u64,
    /// Every stage with its devices.
    pub stages: Vec<StageView>,
    /// The failure threshold, as `10%`.
    pub failure_threshold: String,
    /// Targeted devices.
    pub devices: u64,
    /// Of those, committed.
    pub committed: u64,
    /// Failed, rolled back or unresponsive.
    pub failed: u64,
    /// Assigned and not finished.
    pub in_progress: u64,
    /// Not yet assigned.
    pub pending: u64,
    /// The devices that failed, with their reasons.
    pub failing: Vec<FailingDevice>,
    /// When the current stage started.
    pub stage_started_at: String,
    /// When the rollout was created.
    pub created_at: String,
    /// With prestaging: the share that must be staged before activation, as `90%`.
    pub prestage: Option<String>,
    /// Devices staged (and not yet further).
    pub staged: u64,
    /// Staged or already running the release, percent of the devices taking part.
    pub staged_share: f64,
    /// Of the staged devices, those whose group's maintenance window is closed now (they
    /// activate when it opens; windows kept on the device alone show as staged).
    #[serde(default)]
    pub waiting_for_window: u64,
    /// Devices of the group or tag the rollout does not target, by reason: `no-app` (an
    /// application release for an application the device does not have), `no-self-update`
    /// (an agent release for a device whose agent cannot replace itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<LeftOut>,
}

/// Devices a rollout leaves out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeftOut {
    /// `no-app` or `no-self-update`.
    pub reason: String,
    /// How many.
    pub devices: u64,
}

/// One stage of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageView {
    /// Its number, from 1.
    pub index: u64,
    /// Its cumulative share of the targeted devices.
    pub percent: u8,
    /// How long it soaks before the next stage.
    pub soak_seconds: u64,
    /// Its devices (those not in an earlier stage).
    pub devices: u64,
    /// Its devices by state.
    pub states: std::collections::BTreeMap<String, u64>,
    /// Of those, committed.
    pub committed: u64,
    /// Failed, rolled back or unresponsive.
    pub failed: u64,
    /// Whether it is the rollout's current stage.
    pub current: bool,
}

/// A device that failed in a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingDevice {
    /// The device.
    pub device: String,
    /// `failed`, `rolled_back` or `unresponsive`.
    pub state: String,
    /// Why.
    pub reason: Option<String>,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A machine-readable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code (`unauthorized`, `bad-request`, `bundle-refused`, the bundle check's own
    /// code, …).
    pub code: String,
    /// What was wrong, for a person.
    pub message: String,
}

/// A release: a verified bundle the server holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Its id (derived from the bundle's SHA-256).
    pub id: String,
    /// The product the bundle is for.
    pub product: String,
    /// The release version.
    pub version: String,
    /// The bundle's anti-rollback counter.
    pub security_version: u64,
    /// The hardware ids it may be installed on.
    pub compatible: Vec<String>,
    /// The bundle's size in bytes.
    pub size: u64,
    /// SHA-256 of the whole bundle file, hex.
    pub sha256: String,
    /// When it was uploaded.
    pub created_at: String,
    /// What it carries.
    #[serde(default, skip_serializing_if = "ReleaseKind::is_os")]
    pub kind: ReleaseKind,
    /// The application, for an application release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// A delta between two releases of one product, held by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    /// The release devices run.
    pub from_release: String,
    /// Its version.
    pub from_version: String,
    /// The release the delta makes.
    pub to_release: String,
    /// Its version.
    pub to_version: String,
    /// SHA-256 of the delta file, hex.
    pub sha256: String,
    /// The delta's size in bytes.
    pub size: u64,
    /// The new release's bundle size.
    pub full_size: u64,
    /// What a device running `from_release` reads of the bundle by chunk reuse instead (the
    /// head, the chunk tables and the chunks the old release lacks, from the signed sizes).
    pub chunks_size: u64,
    /// Whether devices running `from_release` are given the delta: only when it is smaller
    /// than both other ways.
    pub offered: bool,
    /// When it was made or uploaded.
    pub created_at: String,
}

/// An admin's request for the server to make a delta to a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaRequest {
    /// The release the delta starts from (a release id).
    pub from: String,
}

/// An admin's request for an enrolment token. A token gives its group and its tags to the
/// devices that enrol with it (a device cannot add its own), and can be bound to the device ids
/// it may enrol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EnrollTokenRequest {
    /// The group devices enrolled with it join.
    pub group: String,
    /// Tags they get.
    #[serde(default)]
    pub tags: Vec<String>,
    /// How long the token is valid, in seconds (default 7 days).
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// How many devices may enrol with it (default 1).
    #[serde(default)]
    pub uses: Option<u64>,
    /// The only device ids it enrols, if not empty.
    #[serde(default)]
    pub device_ids: Vec<String>,
    /// A pattern the device id must match (`*` any run of characters, `?` one), if given.
    #[serde(default)]
    pub device_id_pattern: Option<String>,
    /// The product the device must say it is, if given.
    #[serde(default)]
    pub product: Option<String>,
}

/// An enrolment token as the server keeps it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenView {
    /// Its id.
    pub id: String,
    /// The group.
    pub group: String,
    /// The tags.
    pub tags: Vec<String>,
    /// How many devices may enrol with it.
    pub uses: u64,
    /// How many did.
    pub used: u64,
    /// The only device ids it enrols (all if empty).
    pub device_ids: Vec<String>,
    /// The pattern device ids must match, if any.
    pub device_id_pattern: Option<String>,
    /// The product devices must be, if any.
    pub product: Option<String>,
    /// When it was made.
    pub created_at: String,
    /// When it stops working.
    pub expires_at: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
}

/// An enrolment token, as created (the secret `token` is shown only here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// The secret devices present.
    pub token: String,
    /// The token's settings.
    #[serde(flatten)]
    pub view: EnrollTokenView,
}

/// What an admin token may do. Each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: releases, devices, rollouts, groups, tokens, trust, audit, metrics.
    Viewer,
    /// A viewer who also starts, pauses, resumes, advances, aborts and rolls back rollouts and
    /// revokes devices.
    Operator,
    /// An operator who also uploads releases, makes and revokes enrolment tokens, sets groups,
    /// publishes trust roots and makes and revokes admin tokens.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// Its name: `viewer`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a role (viewer, operator or admin)"))
    }
}

/// A request for an admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenRequest {
    /// Who or what holds it (1 to 64 of `A-Z a-z 0-9 . _ -`); shown in the audit trail.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// An admin token as the server keeps it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenView {
    /// Its id.
    pub id: String,
    /// Its holder's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made.
    pub created_at: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
}

/// An admin token, as created (the secret `token` is shown only here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    /// The secret: `Authorization: Bearer TOKEN`.
    pub token: String,
    /// The token's settings.
    #[serde(flatten)]
    pub view: AdminTokenView,
}

/// The head of an audit log, signed: the last record's sequence number and hash. A device
/// signs its own with its device key (reported with every check-in); the server signs its
/// trail's with its assignment-signing key. Kept elsewhere, it is a checkpoint: a log that no
/// longer holds record `seq` with hash `hash` was rewritten or cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    /// The last record's sequence number (0: no records).
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// The public key that signed (hex).
    pub key: String,
    /// Ed25519 over [`AuditHead::message`] under the domain [`AuditHead::DEVICE_DOMAIN`] or
    /// [`AuditHead::SERVER_DOMAIN`] (hex).
    pub signature: String,
}

impl AuditHead {
    /// The signature domain of a device's audit head.
    pub const DEVICE_DOMAIN: &'static [u8] = b"abide-device-audit-head-v1";
    /// The signature domain of the server's audit head.
    pub const SERVER_DOMAIN: &'static [u8] = b"abide-server-audit-head-v1";

    /// What is signed: `SEQ "\n" HASH`.
    pub fn message(seq: u64, hash: &str) -> Vec<u8> {
        format!("{seq}\n{hash}").into_bytes()
    }
}

/// A device's enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrolment token.
    pub token: String,
    /// The device's id (unique in the fleet).
    pub device_id: String,
    /// Its product.
    pub product: String,
    /// Its hardware ids.
    pub compatible: Vec<String>,
    /// Its group: must be the token's, if given.
    #[serde(default)]
    pub group: Option<String>,
    /// More tags, besides the token's.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What an enrolled device gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The device id.
    pub device_id: String,
    /// The device's credential: `Authorization: Bearer CREDENTIAL` on every device request.
    pub credential: String,
    /// The server's assignment-signing public key, hex.
    pub server_key: String,
    /// The group the device joined.
    pub group: String,
}

/// A device's check-in: a fresh nonce and its inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    /// A fresh random value (16 to 64 hex digits) the signed answer must carry.
    pub nonce: String,
    /// The running version.
    pub version: String,
    /// The booted slot group.
    #[serde(default)]
    pub booted: Option<String>,
    /// The known-good slot group.
    #[serde(default)]
    pub good: Option<String>,
    /// The device's transaction state.
    pub state: DeviceState,
    /// Its health.
    #[serde(default)]
    pub health: Option<Health>,
    /// The version of the trust root it holds; the answer carries the published roots after
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_version: Option<u64>,
    /// Download progress of the release it is staging, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Its audit log's signed head; the server keeps the latest and refuses one that goes back,
    /// changes a record it already saw, or is signed by another key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_head: Option<AuditHead>,
    /// The applications of its `[[app]]` and the version each runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<InstalledApp>,
    /// The agent that checks in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInventory>,
}

/// An application a device has, in its check-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledApp {
    /// Its name (`[[app]] name`).
    pub name: String,
    /// The version it runs; none before its first update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The agent that checks in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInventory {
    /// The version of the agent release it runs (the binary's own version before the first
    /// self-update).
    pub version: String,
    /// Whether it can replace itself: `[self_update]` names its binary.
    pub self_update: bool,
}

/// How far a download is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// The release being downloaded.
    pub release_id: String,
    /// Bundle bytes consumed so far (fetched or passed over as already held).
    pub bytes: u64,
    /// The bundle's size.
    pub total: u64,
    /// Bytes fetched from the server so far.
    pub fetched: u64,
    /// Bytes per second fetched, over the download so far.
    pub rate: u64,
}

/// The answer to a check-in: an [`Assignment`] as exact JSON bytes and the server's signature
/// over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAssignment {
    /// The assignment's JSON text, exactly as signed.
    pub payload: String,
    /// Ed25519 signature over [`ASSIGNMENT_DOMAIN`] ‖ payload, hex.
    pub signature: String,
    /// The signing key's id.
    pub key_id: String,
}

/// What a device should do, bound to the device and the check-in that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The device it is for.
    pub device_id: String,
    /// The nonce of the check-in it answers.
    pub nonce: String,
    /// When it was made.
    pub issued_at: String,
    /// After this the device must not act on it.
    pub expires_at: String,
    /// The release to install, or none.
    pub release: Option<AssignedRelease>,
    /// The maintenance window of the device's group, if it has one.
    pub window: Option<GroupWindow>,
    /// Trust roots published after the one the device holds, oldest first, as their exact
    /// JSON texts; the device checks each against the one before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<String>,
    /// The check-in interval the server asks for, in seconds; it wins over the device's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_seconds: Option<u64>,
}

/// The release an assignment points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedRelease {
    /// The release id.
    pub release_id: String,
    /// The rollout that assigns it.
    pub rollout_id: String,
    /// Its version.
    pub version: String,
    /// Its security version.
    pub security_version: u64,
    /// Where to download the bundle (a path on the server).
    pub url: String,
    /// SHA-256 of the bundle file, hex.
    pub sha256: String,
    /// Its size.
    pub size: u64,
    /// What to do with it.
    pub action: AssignedAction,
    /// A delta from the release the device runs, when it is the smallest download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<AssignedDelta>,
    /// What it carries: the operating system (left out), an application or the agent.
    #[serde(default, skip_serializing_if = "ReleaseKind::is_os")]
    pub kind: ReleaseKind,
    /// The application, for an application release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

/// A delta an assignment offers: the device uses it if it runs `from_version` and falls back
/// to the bundle if its running slots turn out to hold other content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedDelta {
    /// The version it was made from.
    pub from_version: String,
    /// Where to download it (a path on the server).
    pub url: String,
    /// SHA-256 of the delta file, hex.
    pub sha256: String,
    /// Its size.
    pub size: u64,
}

/// A maintenance window: activation and reboot only on these days between these times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupWindow {
    /// Days of the week (`mon` … `sun`).
    pub days: Vec<String>,
    /// Start, `HH:MM`.
    pub start: String,
    /// End, `HH:MM` (before the start: the window crosses midnight).
    pub end: String,
    /// IANA time zone.
    pub zone: String,
}

/// A device's report of a step of its update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// The device's sequence number for this report, from 1, one more for each new report.
    pub seq: u64,
    /// The step.
    pub status: ReportStatus,
    /// The release it is about.
    #[serde(default)]
    pub release_id: Option<String>,
    /// The rollout it is about.
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// Why (required for `failed` and `rolled_back`).
    #[serde(default)]
    pub reason: Option<String>,
    /// How long the step took, in seconds (download, apply, reboot-to-healthy).
    #[serde(default)]
    pub seconds: Option<f64>,
}

/// What became of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportResponse {
    /// The sequence number.
    pub seq: u64,
    /// `recorded`, or `duplicate` (already recorded: nothing changed).
    pub outcome: String,
}

/// A device as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Its id.
    pub id: String,
    /// Its group.
    pub group: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Its product.
    pub product: String,
    /// The running version (as last reported).
    pub version: Option<String>,
    /// Its update status (`pending`, `downloading`, …, `committed`, `failed`, `rolled_back`),
    /// or its own transaction state before it reported any.
    pub state: String,
    /// The reason of a failure or rollback.
    pub reason: Option<String>,
    /// The booted group.
    pub booted: Option<String>,
    /// Its health.
    pub health: Option<String>,
    /// When it last checked in.
    pub last_seen: Option<String>,
    /// How far its download is, while it downloads.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// When its credential was revoked, if it was.
    #[serde(default)]
    pub revoked_at: Option<String>,
    /// The latest signed head of its audit log the server accepted: a checkpoint for
    /// `abide log verify --against`.
    #[serde(default)]
    pub audit_head: Option<AuditHead>,
    /// Its applications and their versions, from its check-ins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<InstalledApp>,
    /// Its agent, from its check-ins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentInventory>,
}

/// A device whose credential was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRevoked {
    /// The device.
    pub id: String,
    /// When.
    pub revoked_at: String,
}

/// One record of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its place in the chain, from 1.
    pub seq: u64,
    /// When.
    pub at: String,
    /// Who: `admin`, `device:ID`, `server`.
    pub actor: String,
    /// What (`release.upload`, `device.enroll`, `device.report`, `rollout.pause`, …).
    pub action: String,
    /// The details, as JSON.
    pub details: serde_json::Value,
    /// The previous record's hash, hex.
    pub prev: String,
    /// This record's hash, hex.
    pub hash: String,
}

/// The result of checking the audit chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerify {
    /// Whether every record links to the one before and hashes right, the head names the last
    /// record and carries a valid signature, and (when given) the checkpoint is in the chain.
    pub ok: bool,
    /// How many records were checked.
    pub records: u64,
    /// The first record that does not, if any.
    pub first_bad: Option<u64>,
    /// What is wrong with it.
    pub problem: Option<String>,
}

/// The server's assignment- and audit-signing key (`GET /api/v1/server-key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKey {
    /// The ed25519 public key, hex.
    pub key: String,
    /// Its key id.
    pub key_id: String,
}
