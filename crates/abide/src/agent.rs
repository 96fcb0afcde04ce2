//! `abide agent`: the device daemon in the foreground (run by `dist/systemd/abide-agent.service`).

use abide_agent::daemon::{Agent, Exit, Options};
use anyhow::Result;
use clap::Args;

use crate::Output;

#[derive(Args)]
pub struct AgentArgs {
    /// Stop when there is nothing to do, instead of polling on (for scripts and tests).
    #[arg(long)]
    once: bool,
}

pub fn run(args: AgentArgs, config: &std::path::Path, out: Output) -> Result<()> {
    crate::init_logging();
    let mut agent = Agent::new(config)?;
    agent.serve()?;
    let exit = agent.run(&Options { once: args.once })?;
    let what = match exit {
        Exit::Reboot => "reboot",
        Exit::Idle => "idle",
    };
    out.print(&Stopped { exit: what }, || format!("agent stopped: {what}"))?;
    Ok(())
}

/// `abide agent --once`: why the agent stopped (`reboot` or `idle`).
#[derive(serde::Serialize)]
struct Stopped {
    exit: &'static str,
}
