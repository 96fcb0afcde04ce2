//! The agent's error type: each variant says which check or step failed and carries what it
//! is about; `code()` is the stable machine code.

use std::path::PathBuf;

use abide_fs::persist::IoError;

use crate::audit::AuditError;

/// What the agent refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is wrong.
    #[error("{}: {what}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The key and what was expected.
        what: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The bootloader backend failed.
    #[error(transparent)]
    Boot(#[from] abide_boot::BootError),
    /// The bundle was refused.
    #[error(transparent)]
    Bundle(#[from] abide_bundle::Error),
    /// The engine refused (quarantine, downgrade, a transition out of order).
    #[error(transparent)]
    Core(#[from] abide_core::Error),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The bundle is for another product.
    #[error("wrong product: the bundle is for {bundle:?}, this device is {device:?}")]
    WrongProduct {
        /// The bundle's product.
        bundle: String,
        /// The device's product.
        device: String,
    },
    /// Another transaction is under way.
    #[error(
        "transaction {id} is {state}; finish it (reboot, mark-good or rollback) before another install"
    )]
    Busy {
        /// Its id.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// An archive for a directory slot holds an entry it may not unpack.
    #[error("bad archive for slot {}: {what}", slot.display())]
    BadArchive {
        /// The directory slot.
        slot: PathBuf,
        /// The entry and what is wrong with it.
        what: String,
    },
    /// The target group has no slot for a component.
    #[error("group {group} has no slot of class {class} for component {component}")]
    NoSlot {
        /// The target group.
        group: String,
        /// The slot class asked for.
        class: String,
        /// The component.
        component: String,
    },
    /// A component does not fit its slot.
    #[error("component {component} is {size} bytes but slot {} holds {capacity}", slot.display())]
    TooSmall {
        /// The component.
        component: String,
        /// Its size.
        size: u64,
        /// The slot.
        slot: PathBuf,
        /// The slot's capacity.
        capacity: u64,
    },
    /// A file system has too few free inodes (files) for what must be written there.
    #[error("no free files: {} has {free} free inodes; {what}, and {reserve} must stay free", dir.display())]
    NoInodes {
        /// A directory on the file system.
        dir: PathBuf,
        /// Free inodes.
        free: u64,
        /// What needed them.
        what: String,
        /// What must stay free.
        reserve: u64,
    },
    /// The state directory's file system has too little free space.
    #[error("no space: {} has {available} bytes free; the install needs {needed} bytes there and {reserve} must stay free", dir.display())]
    NoSpace {
        /// The state directory.
        dir: PathBuf,
        /// Free bytes.
        available: u64,
        /// Bytes the install writes there.
        needed: u64,
        /// Bytes that must stay free.
        reserve: u64,
    },
    /// `abide device init` found a state file already.
    #[error("{}: the device is already set up (its state would be lost); --force replaces it", path.display())]
    Initialized {
        /// The state file.
        path: PathBuf,
    },
    /// The running system contradicts the bootloader's state.
    #[error("{what}")]
    RunningGroup {
        /// What disagrees.
        what: String,
    },
    /// A slot of the target group is in use by the running system.
    #[error("refusing to write {}: {what}", slot.display())]
    TargetInUse {
        /// The slot.
        slot: PathBuf,
        /// How it is in use.
        what: String,
    },
    /// Another process is changing the device.
    #[error("{}: another abide process is changing this device (the agent, an install, a boot step); try again when it is done", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The fleet server refused a request or could not be reached.
    #[error(transparent)]
    Server(#[from] abide_client::ClientError),
    /// No transaction to act on.
    #[error("there is no transaction to {0}")]
    NoTransaction(&'static str),
    /// A bundle carrying the agent was refused.
    #[error("self-update refused: {what}")]
    SelfUpdate {
        /// Why.
        what: String,
    },
    /// A pre-hook failed, which stops the step it comes before.
    #[error("the {hook} hook failed ({ended}){}{output}", if output.is_empty() { "" } else { ": " })]
    HookFailed {
        /// The hook.
        hook: &'static str,
        /// How it ended.
        ended: String,
        /// The end of what it printed.
        output: String,
    },
    /// An application update or restore was refused or could not go on.
    #[error("application {app}: {what}")]
    App {
        /// The application.
        app: String,
        /// What is wrong.
        what: String,
    },
    /// A bundle for an application this device does not have.
    #[error(
        "no application {app:?} in system.toml (a [[app]] with that name takes the bundle's component)"
    )]
    NoApp {
        /// The application the bundle names.
        app: String,
    },
    /// An application update ran and ended on the previous release.
    #[error("application {app}: {version} {state}: {reason}")]
    AppNotCommitted {
        /// The application.
        app: String,
        /// The version tried.
        version: String,
        /// `failed` or `rolled_back`.
        state: &'static str,
        /// Why.
        reason: String,
    },
    /// The device state file is damaged.
    #[error("{}: {what}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

impl AgentError {
    /// The stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Config { .. } => "config",
            AgentError::Io(_) => "io",
            AgentError::Boot(_) => "bootloader",
            AgentError::Bundle(e) => e.code(),
            AgentError::Core(e) => e.code(),
            AgentError::Audit(_) => "audit",
            AgentError::WrongProduct { .. } => "wrong-product",
            AgentError::Busy { .. } => "busy",
            AgentError::NoSlot { .. } => "no-slot",
            AgentError::BadArchive { .. } => "bad-archive",
            AgentError::TooSmall { .. } => "slot-too-small",
            AgentError::NoSpace { .. } | AgentError::NoInodes { .. } => "no-space",
            AgentError::NoTransaction(_) => "no-transaction",
            AgentError::HookFailed { .. } => "hook-failed",
            AgentError::SelfUpdate { .. } => "self-update",
            AgentError::State { .. } => "state",
            AgentError::App { .. } => "app",
            AgentError::NoApp { .. } => "no-app",
            AgentError::AppNotCommitted { state, .. } => {
                if *state == "failed" {
                    "app-failed"
                } else {
                    "app-rolled-back"
                }
            }
            AgentError::Server(_) => "server",
            AgentError::Locked { .. } => "busy",
            AgentError::RunningGroup { .. } => "running-group",
            AgentError::Initialized { .. } => "initialized",
            AgentError::TargetInUse { .. } => "target-in-use",
        }
    }

    /// Whether the error is a refusal of the input (as opposed to a failure of the device).
    pub fn is_refusal(&self) -> bool {
        match self {
            AgentError::Bundle(e) => e.code() != "io",
            AgentError::Io(_)
            | AgentError::Boot(_)
            | AgentError::Audit(_)
            | AgentError::State { .. }
            | AgentError::AppNotCommitted { .. }
            | AgentError::Server(_) => false,
            _ => true,
        }
    }
}

/// The result type of the agent.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;
