//! The agent updates itself. A bundle whose one component is of kind `agent` carries a new
//! `abide` binary. It is verified like any bundle (signatures, trust root, hardware, expiry,
//! the device's product) and must be newer than the agent that runs (`STATE_DIR/agent.json`,
//! else the running binary's own version). Then:
//!
//! 1. the new binary is written beside the configured one (`[self_update] binary`) and synced,
//!    its chunks and digest checked as it is written;
//! 2. the running binary is kept as `BINARY.prev` (a hard link: its bytes stay where they are);
//! 3. `STATE_DIR/self-update.json` records the trial (`trying`: from, to, the agent's process
//!    id, since when, the deadline, its arguments), and the audit log the step;
//! 4. the new binary is renamed over the old one (and the directory synced);
//! 5. a watchdog is started from the previous binary (`abide self-update-watch`), and the
//!    agent re-executes itself: the same process, now running the new binary.
//!
//! The watchdog gives the new agent until the deadline to answer `Status` on its API socket
//! from that process, started after the switch. If it does, the trial is committed. If the
//! new agent exits first, or does not answer in time (it is then killed), the watchdog puts the
//! previous binary back (a hard link renamed into place) and runs it as the agent. Either way
//! the agent that runs next records the outcome in the audit log (`self-update-commit`,
//! `self-update-failed` with the reason) and ends the schedule that asked for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use abide_bundle::{BundleReader, Manifest};
use abide_core::selfupdate::{Seen, Trial, TrialState, Watch};
use abide_fs::persist::{AtomicFile, IoError, read_bounded, sync_dir, write_atomic};
use jiff::Timestamp;
use serde_json::json;

use crate::config::Config;
use crate::device::Device;
use crate::error::{AgentError, Result};

/// The trial's record in `state_dir` (its states and transitions are
/// `abide_core::selfupdate::Trial`'s).
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("self-update.json")
}

/// The trial under way or not yet reported, if there is one.
pub fn load(state_dir: &Path) -> Result<Option<Trial>> {
    crate::json_file::load(&path(state_dir), "self-update record", None)
}

/// Replaces the record atomically.
pub fn store(trial: &Trial, state_dir: &Path) -> Result<()> {
    crate::json_file::store(&path(state_dir), trial, 0o600)
}

/// The trial as the agent's round sees it.
pub fn view(state_dir: &Path) -> Result<Option<abide_core::agent::TrialView>> {
    Ok(load(state_dir)?.map(|t| abide_core::agent::TrialView {
        state: t.state,
        alive: alive(t.pid),
    }))
}

/// The version of the agent that runs: the last one a self-update committed, else the
/// binary's own.
pub fn agent_version(state_dir: &Path) -> String {
    read_bounded(&state_dir.join("agent.json"), 4096)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

/// Whether the agent can replace itself: the directory of its binary (`[self_update] binary`)
/// is writable (a read-only root is not).
pub fn can_replace(config: &Config) -> bool {
    config
        .self_update
        .binary
        .parent()
        .is_some_and(|dir| rustix::fs::access(dir, rustix::fs::Access::WRITE_OK).is_ok())
}

/// Whether a bundle carries the agent: one component, of kind `agent`.
pub fn is_agent_bundle(manifest: &Manifest) -> bool {
    abide_core::fleet::release_kind(manifest).0 == abide_fleet_json::ReleaseKind::Agent
}

/// `BINARY.prev`.
pub fn previous(binary: &Path) -> PathBuf {
    let mut name = binary.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_owned();
    move |source| IoError { op, path, source }
}

/// Verifies the agent bundle `bundle` (its head already read), writes the new binary, keeps
/// the previous one, records the trial, starts the watchdog and re-executes the agent. Returns
/// only on failure; a refusal changes nothing.
pub fn apply<S: abide_bundle::Source>(
    device: &mut Device,
    bundle: BundleReader<S>,
    schedule: Option<&str>,
    now: Timestamp,
) -> Result<std::convert::Infallible> {
    let config = device.config.clone();
    let state = device.state()?;
    let mut bundle = crate::trust::admit(
        &config,
        state.security_version,
        now,
        |policy| bundle.verify(policy),
        |b| b.manifest(),
    )?;
    let manifest = bundle.manifest().clone();
    let from = agent_version(&config.state_dir);
    let newer = from
        .parse::<semver::Version>()
        .is_ok_and(|f| manifest.version > f);
    if !newer {
        return Err(AgentError::SelfUpdate {
            what: format!(
                "agent {} is not newer than the running agent {from}",
                manifest.version
            ),
        });
    }
    let binary = config.self_update.binary.clone();
    let prev = previous(&binary);
    check_directory(&binary)?;
    // 1. The new binary, beside the old one, checked as it is written.
    let mut file = AtomicFile::create(&binary, 0o755)?;
    // The binary that will run as the agent is small: every hash, not only the signed bytes.
    bundle.set_checks(abide_bundle::chunks::Checks::Every);
    let mut out = std::io::BufWriter::new(file.file());
    bundle.read_component(&mut |data| std::io::Write::write_all(&mut out, data))?;
    std::io::Write::flush(&mut out).map_err(io("writing", &binary))?;
    drop(out);
    bundle.finish()?;
    // 2. The running binary is kept (a hard link to its bytes).
    let _ = std::fs::remove_file(&prev);
    std::fs::hard_link(&binary, &prev).map_err(io("keeping the previous agent as", &prev))?;
    sync_dir(binary.parent().unwrap_or(Path::new(".")))?;
    // 3. The trial is recorded before anything switches.
    let trial = Trial::begin(
        &from,
        &manifest.version.to_string(),
        binary.clone(),
        std::process::id(),
        now,
        config.self_update.deadline.as_secs().max(1) as u64,
        std::env::args().skip(1).collect(),
        schedule.map(str::to_owned),
    );
    store(&trial, &config.state_dir)?;
    device.record(
        now,
        "self-update",
        json!({"from": from, "to": trial.to, "binary": binary, "deadline": trial.deadline,
               "schedule": schedule}),
    )?;
    // 4. The switch.
    if let Err(e) = file.commit() {
        fail(
            &config,
            trial,
            &format!("putting the new agent in place: {e}"),
        )?;
        return Err(e.into());
    }
    // 5. The watchdog, from the previous binary, then the new binary in this process.
    let spawned = std::process::Command::new(&prev)
        .args(["self-update-watch", "--config"])
        .arg(&config.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn();
    if let Err(e) = spawned {
        restore(&binary)?;
        fail(&config, trial, &format!("starting the watchdog: {e}"))?;
        return Err(io("starting the watchdog", &prev)(e).into());
    }
    tracing::info!(from = %trial.from, to = %trial.to, "running the new agent");
    let e = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(&binary).args(&trial.args),
    );
    // exec returns only when it failed: the previous binary goes back (the watchdog sees this
    // process answer as the old agent only after its deadline, and finds the trial ended).
    restore(&binary)?;
    fail(&config, trial, &format!("running the new agent: {e}"))?;
    Err(io("running", &binary)(e).into())
}

/// Refuses to replace a binary whose directory anyone but its owner (root or the agent's
/// user) may write: such a user could plant or swap files there between the steps of the
/// switch, or put their own binary in place of the previous one the watchdog runs.
fn check_directory(binary: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = binary
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let meta = std::fs::metadata(dir).map_err(io("reading the agent's directory", dir))?;
    let me = rustix::process::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let why = if mode & 0o002 != 0 {
        Some("anyone may write it".to_owned())
    } else if mode & 0o020 != 0 && meta.gid() != 0 {
        Some(format!("group {} may write it", meta.gid()))
    } else if meta.uid() != 0 && meta.uid() != me {
        Some(format!("it belongs to user {}", meta.uid()))
    } else {
        None
    };
    match why {
        Some(why) => Err(AgentError::SelfUpdate {
            what: format!(
                "the agent's directory {} (mode {mode:o}) is not safe to update in: {why}; make it writable by root (or the agent's user) only",
                dir.display()
            ),
        }),
        None => Ok(()),
    }
}

/// Puts `BINARY.prev` back as `BINARY` (a hard link renamed into place).
fn restore(binary: &Path) -> Result<()> {
    let prev = previous(binary);
    let mut temp = binary.as_os_str().to_owned();
    temp.push(".restore");
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    std::fs::hard_link(&prev, &temp).map_err(io("restoring the previous agent from", &prev))?;
    std::fs::rename(&temp, binary).map_err(io("restoring the previous agent as", binary))?;
    sync_dir(binary.parent().unwrap_or(Path::new(".")))?;
    Ok(())
}

fn fail(config: &Config, mut trial: Trial, reason: &str) -> Result<()> {
    trial.fail(reason).map_err(|e| AgentError::SelfUpdate {
        what: e.to_string(),
    })?;
    store(&trial, &config.state_dir)
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// The watchdog (`abide self-update-watch`), run from the previous binary: waits for the new
/// agent to answer from its process, else kills it, restores the previous binary and becomes
/// the agent. Returns when the trial is committed; on failure it does not return (it runs the
/// previous agent) unless that fails.
pub fn watch(config: &Config) -> Result<()> {
    let Some(trial) = load(&config.state_dir)? else {
        return Ok(());
    };
    if trial.state != TrialState::Trying {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting a runtime for", &config.path))?;
    let reason = loop {
        let answered = rt.block_on(async {
            let Ok(Ok(mut client)) = tokio::time::timeout(
                Duration::from_secs(1),
                abide_agent_api::transport::connect_unix(&config.api.socket),
            )
            .await
            else {
                return false;
            };
            let Ok(Ok(status)) = tokio::time::timeout(
                Duration::from_secs(2),
                client.status(abide_agent_api::StatusRequest {}),
            )
            .await
            else {
                return false;
            };
            let s = status.into_inner();
            s.pid == trial.pid
                && s.started
                    .parse::<Timestamp>()
                    .is_ok_and(|started| started >= trial.since)
        });
        let seen = Seen {
            answered,
            alive: alive(trial.pid),
        };
        match trial.watch(seen, Timestamp::now()) {
            Watch::Wait => std::thread::sleep(Duration::from_millis(200)),
            Watch::Commit => {
                let mut t = trial.clone();
                t.commit().map_err(|e| AgentError::SelfUpdate {
                    what: e.to_string(),
                })?;
                store(&t, &config.state_dir)?;
                return Ok(());
            }
            Watch::Fail(reason) => break reason,
            Watch::Kill(reason) => {
                // The reason first: under systemd, this watchdog may not outlive the new agent.
                let mut t = trial.clone();
                t.reason = Some(reason.clone());
                store(&t, &config.state_dir)?;
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(trial.pid as i32).expect("a process id"),
                    rustix::process::Signal::KILL,
                );
                break reason;
            }
        }
    };
    restore(&trial.binary)?;
    fail(config, trial.clone(), &reason)?;
    if std::env::var_os("INVOCATION_ID").is_some() {
        // Under systemd the unit restarts the agent (now the previous binary) itself.
        return Ok(());
    }
    let e = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(&trial.binary).args(&trial.args),
    );
    Err(io("running the previous agent", &trial.binary)(e).into())
}

/// Before the agent starts (`abide self-update-recover`, the systemd unit's `ExecStartPre`): a
/// trial whose process is gone without a verdict (the new agent exited, or was killed, and the
/// watchdog did not finish) is failed and the previous binary put back. Returns whether it
/// did.
pub fn recover(config: &Config) -> Result<bool> {
    let Some(trial) = load(&config.state_dir)? else {
        return Ok(false);
    };
    let Some(reason) = trial.orphaned(alive(trial.pid)) else {
        return Ok(false);
    };
    restore(&trial.binary)?;
    fail(config, trial, &reason)?;
    Ok(true)
}

/// Settles an ended trial: records the outcome in the audit log (the new version becomes the
/// agent's if it was kept), ends the schedule that asked for it, and removes the record.
pub fn settle(device: &mut Device, shared: &crate::shared::Shared) -> Result<()> {
    let state_dir = device.config.state_dir.clone();
    let Some(trial) = load(&state_dir)? else {
        return Ok(());
    };
    let settled = trial.settle().map_err(|e| AgentError::SelfUpdate {
        what: e.to_string(),
    })?;
    let now = shared.clock.now();
    if settled.kept {
        write_atomic(
            &state_dir.join("agent.json"),
            json!({"version": trial.to}).to_string().as_bytes(),
            0o644,
        )?;
        tracing::info!(from = %trial.from, to = %trial.to, "the new agent is kept");
    } else {
        tracing::warn!(to = %trial.to, reason = ?trial.reason, "the new agent failed; the previous one runs");
    }
    device.record(
        now,
        settled.event,
        if settled.kept {
            json!({"from": trial.from, "to": trial.to})
        } else {
            json!({"from": trial.from, "to": trial.to, "reason": trial.reason})
        },
    )?;
    if let Some((id, failed)) = &settled.schedule {
        shared.with_book(|b| {
            if let Some(s) = b.get_mut(id) {
                s.version = Some(trial.to.clone());
                match failed {
                    None => s.complete(now),
                    Some(reason) => {
                        let _ = s.fail(now, reason);
                    }
                }
            }
        })?;
    }
    std::fs::remove_file(path(&state_dir)).map_err(io("removing", &path(&state_dir)))?;
    sync_dir(&state_dir)?;
    Ok(())
}
