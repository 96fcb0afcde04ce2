//! `abide sim`: simulated devices with two image-file slot groups and the `sim` bootloader, and
//! their power cycles.

use std::path::{Path, PathBuf};

use abide_agent::boot::boot;
use abide_agent::health::SystemClock;
use abide_agent::state::DeviceRecord;
use abide_boot::SimBootloader;
use abide_core::{Group, Quarantine};
use abide_fs::persist::write_atomic;
use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::Output;
use crate::device::{open_read_only, open_waiting, status_view};

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum SimCommand {
    /// Make a simulated device in DIR: groups A and B with one rootfs image slot each, the sim
    /// bootloader, and version V committed in group A.
    Init {
        /// The device directory (created).
        dir: PathBuf,
        /// The trust root bundles must be signed under.
        #[arg(long)]
        trust: PathBuf,
        /// The product.
        #[arg(long, default_value = "sim-device")]
        product: String,
        /// The hardware id.
        #[arg(long, default_value = "sim-board")]
        compatible: String,
        /// The version installed in group A.
        #[arg(long, default_value = "1.0.0")]
        version: String,
        /// The size of each slot (bytes, or with K, M or G).
        #[arg(long, default_value = "64M")]
        slot_size: String,
        /// A critical health check run through `sh -c`.
        #[arg(long)]
        health_command: Option<String>,
        /// The fleet server the device's agent checks in with (`abide sim run` runs it).
        #[arg(long)]
        server: Option<String>,
        /// The enrolment token (a file; copied into the device directory, mode 0600).
        #[arg(long, requires = "server")]
        enroll_token_file: Option<PathBuf>,
        /// The device's id in the fleet (default: the directory's name).
        #[arg(long, requires = "server")]
        device_id: Option<String>,
        /// Time between the agent's check-ins.
        #[arg(long, default_value = "1s", requires = "server")]
        poll: String,
    },
    /// Run a simulated device's whole life until stopped: power on (the sim firmware), `abide
    /// boot` (the health gate), then the agent until it reboots the device, and again.
    Run {
        /// The device directory (made by `abide sim init --server`).
        dir: PathBuf,
        /// Stop after this many power cycles.
        #[arg(long)]
        max_boots: Option<u32>,
    },
    /// One power cycle: the sim firmware picks a group and `abide boot` runs; a failed trial's
    /// reboot is carried out too, until the device is steady.
    Reboot {
        /// The device directory.
        dir: PathBuf,
        /// The next N boots of a trial group die before user space (a kernel panic).
        #[arg(long, default_value_t = 0)]
        panic: u32,
    },
}

pub fn run(command: SimCommand, out: Output) -> Result<()> {
    match command {
        SimCommand::Init {
            dir,
            trust,
            product,
            compatible,
            version,
            slot_size,
            health_command,
            server,
            enroll_token_file,
            device_id,
            poll,
        } => {
            let fleet = server.map(|url| FleetArgs {
                url,
                token: enroll_token_file,
                device_id,
                poll,
            });
            init(
                &dir,
                &trust,
                &product,
                &compatible,
                &version,
                &slot_size,
                health_command.as_deref(),
                fleet.as_ref(),
                out,
            )
        }
        SimCommand::Reboot { dir, panic } => reboot(&dir, panic, out),
        SimCommand::Run { dir, max_boots } => run_device(&dir, max_boots, out),
    }
}

/// The fleet settings of a simulated device.
pub struct FleetArgs {
    url: String,
    token: Option<PathBuf>,
    device_id: Option<String>,
    poll: String,
}

#[allow(clippy::too_many_arguments)]
fn init(
    dir: &Path,
    trust: &Path,
    product: &str,
    compatible: &str,
    version: &str,
    slot_size: &str,
    health_command: Option<&str>,
    fleet: Option<&FleetArgs>,
    out: Output,
) -> Result<()> {
    // Validate everything before creating anything.
    let version: semver::Version = version
        .parse()
        .with_context(|| format!("--version {version:?} is not SemVer"))?;
    let size = parse_size(slot_size)?;
    let trust_bytes = crate::on_file("reading", trust, std::fs::read(trust))?;
    if dir.exists()
        && crate::on_file("reading", dir, std::fs::read_dir(dir))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let mut config = format!(
        "# A simulated Abide device: two slot groups with one image-file rootfs slot each.\n\
         product = {product:?}\ncompatible = {compatible:?}\nstate_dir = \"state\"\ntrust = \"trust.json\"\n\n\
         [bootloader]\nbackend = \"sim\"\npath = \"boot.json\"\n\n\
         [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"slots/rootfs.A.img\"\n\n\
         [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"slots/rootfs.B.img\"\n\n\
         [api]\nsocket = \"agent.sock\"\n"
    );
    if let Some(cmd) = health_command {
        config.push_str(&format!(
            "\n[health]\ndeadline = \"5m\"\n\n[[health.check]]\nname = \"command\"\nkind = \"command\"\ncommand = {cmd:?}\ntimeout = \"30s\"\ncritical = true\n"
        ));
    }
    let mut token = None;
    if let Some(f) = fleet {
        let id = match &f.device_id {
            Some(id) => id.clone(),
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("the device directory has no name to use as the device id")?,
        };
        config.push_str(&format!(
            "\n[server]\nurl = {:?}\ndevice_id = {id:?}\npoll_interval = {:?}\n",
            f.url, f.poll
        ));
        if let Some(t) = &f.token {
            token = Some(crate::on_file("reading", t, std::fs::read(t))?);
            config.push_str("enroll_token_file = \"enroll.token\"\n");
        }
    }
    // The text must be a valid configuration before it is written.
    abide_agent::config::Config::parse(&dir.join("system.toml"), &config)?;
    for sub in ["slots", "state"] {
        let d = dir.join(sub);
        crate::on_file("creating", &d, std::fs::create_dir_all(&d))?;
    }
    for g in ["A", "B"] {
        let path = dir.join(format!("slots/rootfs.{g}.img"));
        let f = crate::on_file("creating", &path, std::fs::File::create(&path))?;
        f.set_len(size)?;
        abide_fs::persist::fsync(&f, &path)?;
    }
    write_atomic(&dir.join("trust.json"), &trust_bytes, 0o644)?;
    if let Some(t) = &token {
        write_atomic(&dir.join("enroll.token"), t, 0o600)?;
    }
    let (a, b) = (Group::new("A")?, Group::new("B")?);
    let sim = SimBootloader::init(&dir.join("boot.json"), &[a.clone(), b.clone()])?;
    sim.power_on()?;
    DeviceRecord {
        format: abide_agent::state::FORMAT,
        version: version.clone(),
        security_version: 0,
        groups: [(a, Some(version.clone())), (b, None)]
            .into_iter()
            .collect(),
        transaction: None,
        quarantine: Quarantine::default(),
    }
    .store(&dir.join("state"))?;
    // Room held back for a failure on a full disk, as a real device gets at `device init`.
    abide_agent::room::keep_reserve(&dir.join("state"));
    write_atomic(&dir.join("system.toml"), config.as_bytes(), 0o644)?;
    /// What `abide sim init` made.
    #[derive(serde::Serialize)]
    struct Made<'a> {
        dir: &'a Path,
        version: String,
        config: PathBuf,
    }
    let made = Made {
        dir,
        version: version.to_string(),
        config: dir.join("system.toml"),
    };
    out.print(&made, || {
        format!(
            "simulated device in {} running {version} on group A",
            dir.display()
        )
    })
}

/// One power cycle of `abide sim reboot`: the group the firmware chose, and either a kernel
/// panic on it or what the boot step did.
#[derive(serde::Serialize)]
struct Cycle {
    booted: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    panic: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reboot: Option<bool>,
}

/// What `abide sim reboot` and `abide sim run` end with.
#[derive(serde::Serialize)]
struct Settled {
    #[serde(skip_serializing_if = "Option::is_none")]
    cycles: Option<Vec<Cycle>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boots: Option<u32>,
    status: crate::schedule::StatusView,
}

fn reboot(dir: &Path, panic: u32, out: Output) -> Result<()> {
    let config = dir.join("system.toml");
    let sim = SimBootloader::new(&dir.join("boot.json"));
    let mut panics_left = panic;
    let mut cycles = Vec::new();
    for _ in 0..16 {
        let chosen = sim
            .power_on()?
            .context("the sim firmware found no bootable group")?;
        let device = open_read_only(&config)?;
        let state = device.state()?;
        let on_trial = state
            .transaction
            .as_ref()
            .is_some_and(|t| !t.state.is_terminal() && t.target == chosen);
        if on_trial && panics_left > 0 {
            panics_left -= 1;
            cycles.push(Cycle {
                booted: chosen.to_string(),
                panic: true,
                state: None,
                reboot: None,
            });
            continue;
        }
        drop(device);
        let mut device = open_waiting(&config)?;
        let outcome = boot(&mut device, &SystemClock)?;
        cycles.push(Cycle {
            booted: chosen.to_string(),
            panic: false,
            state: Some(serde_json::to_value(outcome.state)?),
            reboot: Some(outcome.reboot),
        });
        if !outcome.reboot {
            let status = status_view(&device)?;
            let n = cycles.len();
            let settled = Settled {
                cycles: Some(cycles),
                boots: None,
                status,
            };
            return out.print(&settled, || {
                format!("{n} power cycle(s); {}", settled.status)
            });
        }
    }
    bail!("the device did not settle within 16 power cycles")
}

/// `abide sim run`: power on, boot step, agent until it reboots the device; again.
fn run_device(dir: &Path, max_boots: Option<u32>, out: Output) -> Result<()> {
    crate::init_logging();
    let config = dir.join("system.toml");
    let sim = SimBootloader::new(&dir.join("boot.json"));
    let mut boots = 0u32;
    loop {
        if max_boots.is_some_and(|m| boots >= m) {
            let device = open_read_only(&config)?;
            let settled = Settled {
                cycles: None,
                boots: Some(boots),
                status: status_view(&device)?,
            };
            return out.print(&settled, || {
                format!("{boots} power cycle(s); {}", settled.status)
            });
        }
        boots += 1;
        let chosen = sim
            .power_on()?
            .context("the sim firmware found no bootable group")?;
        let mut device = open_waiting(&config)?;
        let outcome = boot(&mut device, &SystemClock)?;
        eprintln!(
            "sim: power on {boots}: booted {chosen}; transaction {}",
            outcome.state.unwrap_or("none")
        );
        drop(device);
        if outcome.reboot {
            continue;
        }
        let mut agent = abide_agent::daemon::Agent::new(&config)?;
        agent.serve()?;
        agent.run(&abide_agent::daemon::Options { once: false })?;
    }
}

fn parse_size(text: &str) -> Result<u64> {
    abide_agent::config::parse_size(text)
        .ok()
        .filter(|&s| s > 0)
        .with_context(|| format!("--slot-size {text:?}: expected a size like 64M"))
}
