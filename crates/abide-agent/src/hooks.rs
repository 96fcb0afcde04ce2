//! Hooks: commands from `[hooks]` in system.toml, run at the steps of a transaction with a
//! time limit and the transaction's details in their environment.
//!
//! `pre-install` runs after every check of an install passed and before anything changes;
//! `pre-reboot` before the target is handed to the bootloader for its trial. A pre-hook that
//! fails (a non-zero exit, a timeout, a command that cannot start) stops its step cleanly: the
//! install is refused with nothing changed, or the staged target is abandoned unbootable,
//! and the error carries the hook's output. `post-install` (once the target is staged),
//! `post-commit` and `on-rollback` run after their step is durable; their failures are
//! recorded in the audit log and reported, and change nothing. Every run is in the audit log
//! (`hook`, with its exit and the end of its output).
//!
//! The environment: `ABIDE_HOOK`, `ABIDE_TRANSACTION`, `ABIDE_VERSION` (the version being
//! installed), `ABIDE_FROM_VERSION` (the version the known-good group runs), `ABIDE_TARGET_GROUP`,
//! `ABIDE_GOOD_GROUP`, `ABIDE_STATE_DIR`, and for `on-rollback` `ABIDE_REASON`.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{AgentError, Result};

/// The steps a hook runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before an install changes anything (every check passed).
    PreInstall,
    /// Once the target is staged (every digest verified).
    PostInstall,
    /// Before the target is handed to the bootloader for its trial (and the reboot).
    PreReboot,
    /// Once a trial is committed.
    PostCommit,
    /// Once a trial or an activated install is rolled back.
    OnRollback,
}

impl Hook {
    /// Its key in `[hooks]`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreInstall => "pre-install",
            Hook::PostInstall => "post-install",
            Hook::PreReboot => "pre-reboot",
            Hook::PostCommit => "post-commit",
            Hook::OnRollback => "on-rollback",
        }
    }

    /// Whether its failure stops the step it comes before.
    pub fn is_pre(self) -> bool {
        matches!(self, Hook::PreInstall | Hook::PreReboot)
    }
}

/// The configured hooks.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The command of each configured hook (run through `sh -c`).
    pub commands: Vec<(Hook, String)>,
    /// How long each may run before it is killed and counts as failed (default 60 s).
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            commands: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// `[hooks]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawHooks {
    timeout: Option<String>,
    pre_install: Option<String>,
    post_install: Option<String>,
    pre_reboot: Option<String>,
    post_commit: Option<String>,
    on_rollback: Option<String>,
}

impl Hooks {
    /// Validates `[hooks]`; the error names the key.
    pub(crate) fn from_raw(raw: RawHooks) -> std::result::Result<Hooks, String> {
        let timeout = match raw.timeout {
            None => Hooks::default().timeout,
            Some(t) => abide_core::duration::parse(&t)
                .ok()
                .filter(|d| (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(d))
                .ok_or_else(|| format!("key `hooks.timeout`: expected 1s to 1h, found {t:?}"))?,
        };
        let mut commands = Vec::new();
        for (hook, command) in [
            (Hook::PreInstall, raw.pre_install),
            (Hook::PostInstall, raw.post_install),
            (Hook::PreReboot, raw.pre_reboot),
            (Hook::PostCommit, raw.post_commit),
            (Hook::OnRollback, raw.on_rollback),
        ] {
            match command {
                Some(c) if c.trim().is_empty() => {
                    return Err(format!(
                        "key `hooks.{}`: expected a command, found an empty string",
                        hook.name()
                    ));
                }
                Some(c) => commands.push((hook, c)),
                None => {}
            }
        }
        Ok(Hooks { commands, timeout })
    }

    fn command(&self, hook: Hook) -> Option<&str> {
        self.commands
            .iter()
            .find(|(h, _)| *h == hook)
            .map(|(_, c)| c.as_str())
    }
}

/// The transaction a hook runs for.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Its id.
    pub transaction: String,
    /// The version being installed.
    pub version: String,
    /// The version the known-good group runs.
    pub from_version: String,
    /// The group being installed into.
    pub target: String,
    /// The known-good group.
    pub good: String,
    /// Why it was rolled back (`on-rollback`).
    pub reason: Option<String>,
}

/// How a hook ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookRun {
    /// The hook (`pre-install`, …).
    pub hook: &'static str,
    /// Whether it exited with status 0 in time.
    pub ok: bool,
    /// How it ended (`exit status: 3`, `timed out after 5s`, …).
    pub ended: String,
    /// The end of what it printed.
    pub output: String,
}

impl HookRun {
    /// The error a failed pre-hook stops its step with.
    pub fn error(&self) -> AgentError {
        AgentError::HookFailed {
            hook: self.hook,
            ended: self.ended.clone(),
            output: self.output.clone(),
        }
    }
}

/// Runs `hook` if it is configured and records the run in the audit log; `None` when it is
/// not configured.
pub fn run(
    device: &mut Device,
    hook: Hook,
    context: &Context,
    now: Timestamp,
) -> Result<Option<HookRun>> {
    let Some(command) = device.config.hooks.command(hook).map(str::to_owned) else {
        return Ok(None);
    };
    let mut env = vec![
        ("ABIDE_HOOK", hook.name().to_owned()),
        ("ABIDE_TRANSACTION", context.transaction.clone()),
        ("ABIDE_VERSION", context.version.clone()),
        ("ABIDE_FROM_VERSION", context.from_version.clone()),
        ("ABIDE_TARGET_GROUP", context.target.clone()),
        ("ABIDE_GOOD_GROUP", context.good.clone()),
        (
            "ABIDE_STATE_DIR",
            device.config.state_dir.display().to_string(),
        ),
    ];
    if let Some(reason) = &context.reason {
        env.push(("ABIDE_REASON", reason.clone()));
    }
    let (ok, ended, output) = match crate::command::run(&command, &env, device.config.hooks.timeout)
    {
        Ok((crate::command::Ended::Exited(status), output)) => {
            (status.success(), status.to_string(), output)
        }
        Ok((crate::command::Ended::TimedOut(t), output)) => (
            false,
            format!("timed out after {}s and was killed", t.as_secs()),
            output,
        ),
        Err(why) => (false, why, String::new()),
    };
    let run = HookRun {
        hook: hook.name(),
        ok,
        ended,
        output,
    };
    device.record(
        now,
        if ok { "hook" } else { "hook-failed" },
        serde_json::json!({"hook": run.hook, "transaction": context.transaction, "ended": run.ended,
                           "output": run.output, "stops": hook.is_pre()}),
    )?;
    Ok(Some(run))
}
