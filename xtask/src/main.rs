//! Project automation. `cargo run --release -p xtask -- bench-bundle` measures `abide bundle
//! create` and `abide bundle verify` on a generated image side by side with `zstd` and
//! `openssl` baselines run on the same files in the same run; `bench-install` measures
//! `abide install`; `bench-fleet` measures the fleet server (see fleet.rs); `bench-agent` the
//! device agent (see agent.rs).

mod agent;
mod create;
mod delta;
mod fleet;
mod fleet_http;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// A mistake in the command line: printed as a message and exit code 2, never with a
/// backtrace.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Marks an error in parsing the command line as a [`Usage`] error.
pub(crate) fn usage(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Usage(format!("{e:#}")))
}

/// Runs the task; a usage error exits 2, any other error 1, each as one message on standard
/// error (whatever `RUST_BACKTRACE` says).
fn main() -> std::process::ExitCode {
    match task() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<Usage>() => {
            eprintln!("xtask: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn task() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench-bundle") => bench_bundle(&args[1..]),
        Some("bench-install") => bench_install(&args[1..]),
        Some("bench-fleet") => fleet::bench(&args[1..]),
        Some("bench-fleet-http") => fleet_http::bench(&args[1..]),
        Some("bench-agent") => agent::bench(&args[1..]),
        Some("bench-delta") => delta::bench(&args[1..]),
        Some("bench-create") => create::bench(&args[1..]),
        _ => Err(usage(anyhow::anyhow!(
            "usage: xtask bench-bundle [--size MIB] [--runs N] [--dir DIR] [--image all|ext4|mixed]\n       xtask bench-install [--size MIB] [--runs N] [--dir DIR]\n       xtask bench-fleet [--devices N] [--seconds S] [--rollout N] [--clients N] [--only checkins|rollout]\n       xtask bench-fleet-http [--devices N] [--poll DURATION] [--fail-rate P]\n       xtask bench-agent [--size MIB] [--change PCT] [--abide PATH] [--dir DIR]\n       xtask bench-delta [--dir DIR] [--level N] [--chunk-size SIZE]\n       xtask bench-create [--dir DIR] [--rounds N]"
        ))),
    }
}

struct Options {
    image: String,
    size_mib: usize,
    runs: usize,
    dir: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        image: "all".into(),
        size_mib: 1024,
        runs: 3,
        dir: PathBuf::from("target/bench"),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => o.size_mib = value.parse().context("--size takes MiB")?,
            "--runs" => o.runs = value.parse().context("--runs takes a number")?,
            "--dir" => o.dir = PathBuf::from(value),
            "--image" if ["all", "ext4", "mixed"].contains(&value.as_str()) => {
                o.image = value.clone()
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(o)
}

/// One timed command: best wall time of `runs`, the CPU time (user, system) of that run, and
/// the peak RSS of the last run (all from `/usr/bin/time` where it is installed).
struct Measure {
    seconds: f64,
    peak_kib: Option<u64>,
    cpu: Option<(f64, f64)>,
}

impl Measure {
    /// "user/sys" CPU seconds, or "n/a".
    fn cpu_text(&self) -> String {
        self.cpu
            .map_or("n/a".to_owned(), |(u, s)| format!("{u:.2}/{s:.2}"))
    }
}

fn run(label: &str, script: &str, runs: usize) -> Result<Measure> {
    run_after(label, "true", script, runs)
}

/// Like [`run`], with an untimed `setup` script before each timed run.
fn run_after(label: &str, setup: &str, script: &str, runs: usize) -> Result<Measure> {
    let mut best = f64::INFINITY;
    let mut peak = None;
    let mut cpu = None;
    for _ in 0..runs {
        let prepared = Command::new("bash")
            .args(["-c", setup])
            .output()
            .with_context(|| format!("preparing {label}"))?;
        if !prepared.status.success() {
            bail!(
                "preparing {label} failed: {}",
                String::from_utf8_lossy(&prepared.stderr)
            );
        }
        let has_time = Path::new("/usr/bin/time").exists();
        let mut cmd = if has_time {
            let mut c = Command::new("/usr/bin/time");
            c.args(["-f", "%M %U %S", "bash", "-c", script]);
            c
        } else {
            let mut c = Command::new("bash");
            c.args(["-c", script]);
            c
        };
        let start = Instant::now();
        let out = cmd.output().with_context(|| format!("running {label}"))?;
        let elapsed = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{label} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let time: Vec<&str> = if has_time {
            stderr
                .lines()
                .last()
                .unwrap_or("")
                .split_whitespace()
                .collect()
        } else {
            Vec::new()
        };
        if let [m, u, s] = time[..] {
            peak = m.parse().ok();
            if elapsed < best {
                cpu = u.parse().ok().zip(s.parse().ok());
            }
        }
        best = best.min(elapsed);
    }
    Ok(Measure {
        seconds: best,
        peak_kib: peak,
        cpu,
    })
}

fn bench_bundle(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    std::fs::create_dir_all(&o.dir)?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let size = o.size_mib << 20;
    let d = dir.display().to_string();
    let a = abide.display().to_string();
    let sh = |s: &str| s.replace("{d}", &d).replace("{a}", &a);
    for f in ["k.key", "k.pub"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    run(
        "keys",
        &sh(
            "{a} key generate --out {d}/k >/dev/null && {a} trust init --key {d}/k.pub --threshold 1 --sign {d}/k.key --out {d}/trust.json >/dev/null",
        ),
        1,
    )?;
    println!(
        "abide bundle benchmark: {} MiB images, best of {} runs, {} cores",
        o.size_mib,
        o.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // An ext4 file system image of this machine's shared libraries: real binaries, text and
    // free space, as a root file system image is.
    let fs = dir.join(format!("ext4-{}m.img", o.size_mib));
    let ext4 = o.image != "mixed";
    if ext4 && !fs.exists() {
        run(
            "mke2fs",
            &format!(
                // A partly populated image (the tree did not fit) must not be reused.
                "mke2fs -q -F -t ext4 -b 4096 -E root_owner=0:0 -d /usr/lib/x86_64-linux-gnu {0} {1}M || {{ rm -f {0}; exit 1; }}",
                fs.display(),
                o.size_mib
            ),
            1,
        )?;
    }
    if ext4 {
        bench_image(
            "ext4 image of /usr/lib/x86_64-linux-gnu",
            &fs,
            &dir,
            &sh,
            o.runs,
        )?;
    }
    if o.image == "ext4" {
        return Ok(());
    }

    // A synthetic mix of short runs (1 to 48 KiB) of random bytes, zeros and repetitive text,
    // interleaved finer than a chunk: no chunk is all random or all zero, so abide's raw and
    // repeated chunks never apply. The hard case.
    let mixed = dir.join(format!("mixed-{}m.img", o.size_mib));
    if std::fs::metadata(&mixed).map(|m| m.len() as usize).ok() != Some(size) {
        let mut f = std::fs::File::create(&mixed)?;
        for (i, block) in (0..size).step_by(64 << 20).enumerate() {
            f.write_all(&abide_testkit::image(
                (64 << 20).min(size - block),
                i as u64,
            ))?;
        }
        f.sync_all()?;
    }
    bench_image("synthetic fine-grained mix", &mixed, &dir, &sh, o.runs)?;
    Ok(())
}

fn bench_image(
    label: &str,
    img: &Path,
    dir: &Path,
    sh: &dyn Fn(&str) -> String,
    runs: usize,
) -> Result<()> {
    let i = img.display().to_string();
    let sh = |s: &str| sh(s).replace("{i}", &i);
    let size = std::fs::metadata(img)?.len();
    // Warm the page cache so every command reads from memory.
    run("warm", &sh("cat {i} > /dev/null"), 1)?;
    let zstd1 = run(
        "zstd -3 -T1",
        &sh("zstd -3 -T1 -q -f {i} -o {d}/image.zst"),
        runs,
    )?;
    // All cores, as `bundle create` uses them: the fair baseline.
    let zstd = run(
        "zstd -3 -T0",
        &sh("zstd -3 -T0 -q -f {i} -o {d}/image.zst"),
        runs,
    )?;
    let zstd_sync = run(
        "zstd -3 -T0 + fsync",
        &sh("zstd -3 -T0 -q -f {i} -o {d}/image.zst && sync {d}/image.zst"),
        runs,
    )?;
    let create = run(
        "abide bundle create",
        &sh(
            "{a} bundle create --product bench --version 1.0.0 --component rootfs={i} --sign {d}/k.key --out {d}/image.abide >/dev/null",
        ),
        runs,
    )?;
    let sha = run(
        "openssl dgst -sha256",
        &sh("openssl dgst -sha256 {i} >/dev/null"),
        runs,
    )?;
    let unzstd = run("zstd -d", &sh("zstd -d -c {d}/image.zst > /dev/null"), runs)?;
    // The same two jobs on every core, as verify's worker pool runs: SHA-256 of the image's two
    // halves at once, and pzstd's parallel decompression of a multi-frame file (made untimed).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    run(
        "halves and frames",
        &sh(&format!(
            "rm -f {{d}}/part.* && split -n {cores} {{i}} {{d}}/part. && \
             pzstd -3 -p {cores} -q -f {{i}} -o {{d}}/image.pzst && cat {{d}}/part.* {{d}}/image.pzst > /dev/null"
        )),
        1,
    )?;
    let sha_all = run(
        "openssl dgst -sha256 of each part at once",
        &sh("for p in {d}/part.*; do openssl dgst -sha256 $p > /dev/null & done; wait"),
        runs,
    )?;
    let unzstd_all = run(
        "pzstd -d",
        &sh(&format!(
            "pzstd -d -p {cores} -q -c {{d}}/image.pzst > /dev/null"
        )),
        runs,
    )?;
    let verify = run(
        "abide bundle verify",
        &sh("{a} bundle verify {d}/image.abide --trust {d}/trust.json >/dev/null"),
        runs,
    )?;
    let paranoid = run(
        "abide bundle verify --paranoid",
        &sh("{a} bundle verify {d}/image.abide --trust {d}/trust.json --paranoid >/dev/null"),
        runs,
    )?;

    let mb = size as f64 / 1e6;
    let rate = |m: &Measure| mb / m.seconds;
    let mem = |m: &Measure| {
        m.peak_kib.map_or("n/a".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    let bundle = std::fs::metadata(dir.join("image.abide"))?.len() as f64 / 1e6;
    let zst = std::fs::metadata(dir.join("image.zst"))?.len() as f64 / 1e6;
    println!(
        "\n{label}: {mb:.0} MB; bundle {bundle:.1} MB, zstd -3 output {zst:.1} MB ({:.3}x, target <= 1.05)",
        bundle / zst
    );
    println!(
        "{:<44} {:>9} {:>11} {:>12} {:>13}",
        "command", "seconds", "MB/s", "peak RSS", "CPU user/sys"
    );
    let sha_all_name = format!("openssl dgst -sha256, {cores} parts at once");
    let unzstd_all_name = format!("pzstd -d -p {cores} (multi-frame)");
    for (name, m) in [
        ("zstd -3 -T1 (baseline)", &zstd1),
        ("zstd -3 -T0 (baseline)", &zstd),
        ("zstd -3 -T0 + fsync (baseline)", &zstd_sync),
        ("abide bundle create (with fsync)", &create),
        ("openssl dgst -sha256 (baseline)", &sha),
        ("zstd -d (baseline)", &unzstd),
        (sha_all_name.as_str(), &sha_all),
        (unzstd_all_name.as_str(), &unzstd_all),
        ("abide bundle verify", &verify),
        ("abide bundle verify --paranoid", &paranoid),
    ] {
        println!(
            "{name:<44} {:>9.3} {:>11.0} {:>12} {:>13}",
            m.seconds,
            rate(m),
            mem(m),
            m.cpu_text()
        );
    }
    let floor = rate(&sha).min(rate(&unzstd));
    let floor_all = rate(&sha_all).min(rate(&unzstd_all));
    println!(
        "create: {:.2}x the time of zstd -3 -T0 (target <= 1.0x), {:.2}x of zstd -3 -T0 + fsync, {:.2}x of zstd -3 -T1",
        create.seconds / zstd.seconds,
        create.seconds / zstd_sync.seconds,
        create.seconds / zstd1.seconds
    );
    println!(
        "verify: {:.0} MB/s = {:.2} x min(openssl sha256 {:.0}, zstd -d {:.0}) (target >= 1.0); --paranoid {:.0} MB/s = {:.2} x",
        rate(&verify),
        rate(&verify) / floor,
        rate(&sha),
        rate(&unzstd),
        rate(&paranoid),
        rate(&paranoid) / floor
    );
    println!(
        "verify on all {cores} cores, as its worker pool runs: {:.2} x min(openssl sha256 of {cores} parts at once {:.0}, pzstd -d {:.0}); --paranoid {:.2} x",
        rate(&verify) / floor_all,
        rate(&sha_all),
        rate(&unzstd_all),
        rate(&paranoid) / floor_all
    );
    Ok(())
}

/// `abide install` of an ext4 image into an image-file slot of a simulated device, side by
/// side with `zstd -dc > slot; sync`, `cp` + fsync and `zstd -dc | tee >(openssl dgst -sha256)
/// > slot; sync` on the same files.
fn bench_install(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    std::fs::create_dir_all(&o.dir)?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let d = dir.display().to_string();
    let a = abide.display().to_string();
    let size = o.size_mib;
    let img = dir.join(format!("ext4-{size}m.img"));
    if !img.exists() {
        run(
            "mke2fs",
            &format!(
                "mke2fs -q -F -t ext4 -b 4096 -E root_owner=0:0 -d /usr/lib/x86_64-linux-gnu {0} {size}M || {{ rm -f {0}; exit 1; }}",
                img.display()
            ),
            1,
        )?;
    }
    let sh = |s: &str| {
        s.replace("{d}", &d)
            .replace("{a}", &a)
            .replace("{i}", &img.display().to_string())
            .replace("{s}", &size.to_string())
    };
    run(
        "keys",
        &sh(
            "rm -f {d}/ik.key {d}/ik.pub && {a} key generate --out {d}/ik >/dev/null && \
             {a} trust init --key {d}/ik.pub --threshold 1 --sign {d}/ik.key --out {d}/itrust.json >/dev/null && \
             {a} bundle create --product bench --version 2.0.0 --compatible bench-board --component rootfs={i} \
               --sign {d}/ik.key --out {d}/install.abide >/dev/null && zstd -3 -T0 -q -f {i} -o {d}/install.zst",
        ),
        1,
    )?;
    run(
        "warm",
        &sh("cat {i} {d}/install.abide {d}/install.zst > /dev/null"),
        1,
    )?;
    let fresh_device = sh(
        "rm -rf {d}/dev && {a} sim init {d}/dev --trust {d}/itrust.json --product bench --compatible bench-board \
        --slot-size $(( {s} + 64 ))M >/dev/null",
    );
    let fresh_slot = sh("rm -f {d}/slot.raw && truncate -s $(( {s} + 64 ))M {d}/slot.raw");
    let runs = o.runs;
    let unzstd = run("zstd -d", &sh("zstd -dc {d}/install.zst > /dev/null"), runs)?;
    let cp = run_after(
        "cp + fsync",
        &fresh_slot,
        &sh("cp {i} {d}/slot.raw && sync {d}/slot.raw"),
        runs,
    )?;
    let unzstd_sync = run_after(
        "zstd -d + fsync",
        &fresh_slot,
        &sh("zstd -dc {d}/install.zst > {d}/slot.raw && sync {d}/slot.raw"),
        runs,
    )?;
    // Decompress, hash with the fastest hasher on the machine, write, sync.
    let pipeline = run_after(
        "zstd | tee >(openssl dgst -sha256) > slot; sync",
        &fresh_slot,
        &sh(
            "zstd -dc {d}/install.zst | tee >(openssl dgst -sha256 > /dev/null) > {d}/slot.raw; sync {d}/slot.raw",
        ),
        runs,
    )?;
    let install = run_after(
        "abide install",
        &fresh_device,
        &sh("{a} install {d}/install.abide --no-reboot --config {d}/dev/system.toml > /dev/null"),
        runs,
    )?;
    let paranoid = run_after(
        "abide install --paranoid",
        &fresh_device,
        &sh(
            "{a} install {d}/install.abide --no-reboot --paranoid --config {d}/dev/system.toml > /dev/null",
        ),
        runs,
    )?;
    // The delta case: the same image with 5% of it (one run in the middle) changed, installed
    // onto a device whose running group holds the original.
    let changed = dir.join(format!("ext4-{size}m-5pct.img"));
    if !changed.exists() {
        let mut bytes = std::fs::read(&img)?;
        let (start, len) = (bytes.len() / 2, bytes.len() / 20);
        let mut rng = abide_testkit::SplitMix(7);
        bytes[start..start + len]
            .iter_mut()
            .for_each(|b| *b = rng.next_u64() as u8);
        std::fs::write(&changed, &bytes)?;
    }
    run(
        "delta bundle",
        &sh(&format!(
            "{{a}} bundle create --product bench --version 3.0.0 --compatible bench-board --component rootfs={} \
               --sign {{d}}/ik.key --out {{d}}/delta.abide >/dev/null",
            changed.display()
        )),
        1,
    )?;
    let delta_setup = format!(
        "{fresh_device} && {}",
        sh(
            "{a} install {d}/install.abide --no-reboot --config {d}/dev/system.toml >/dev/null && {a} sim reboot {d}/dev >/dev/null"
        )
    );
    let delta = run_after(
        "abide install (5% changed)",
        &delta_setup,
        &sh(
            "{a} install {d}/delta.abide --no-reboot --config {d}/dev/system.toml --json > {d}/delta.json",
        ),
        runs,
    )?;
    let delta_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("delta.json"))?)?;
    let delta_read = delta_json["bundle_bytes_read"].as_u64().unwrap_or(0) as f64 / 1e6;
    let delta_size = std::fs::metadata(dir.join("delta.abide"))?.len() as f64 / 1e6;

    let mb = std::fs::metadata(&img)?.len() as f64 / 1e6;
    let rate = |m: &Measure| mb / m.seconds;
    let mem = |m: &Measure| {
        m.peak_kib.map_or("n/a".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    println!(
        "abide install benchmark: ext4 image of /usr/lib/x86_64-linux-gnu, {mb:.0} MB, into an image-file slot; best of {runs}"
    );
    println!(
        "{:<48} {:>9} {:>11} {:>12} {:>13}",
        "command", "seconds", "MB/s", "peak RSS", "CPU user/sys"
    );
    for (name, m) in [
        ("zstd -d to /dev/null (baseline)", &unzstd),
        ("zstd -dc > slot; sync (baseline)", &unzstd_sync),
        ("cp + fsync (baseline)", &cp),
        ("zstd -dc | tee >(openssl sha256) > slot; sync", &pipeline),
        ("abide install (verify, write, fsync)", &install),
        ("abide install --paranoid", &paranoid),
        ("abide install, 5% changed (delta)", &delta),
    ] {
        println!(
            "{name:<48} {:>9.3} {:>11.0} {:>12} {:>13}",
            m.seconds,
            rate(m),
            mem(m),
            m.cpu_text()
        );
    }
    let floor = rate(&cp).min(rate(&unzstd_sync));
    println!(
        "install: {:.0} MB/s = {:.2} x min(cp + fsync {:.0}, zstd -d + fsync {:.0}) (target >= 0.80); {:.2}x the shell pipeline; --paranoid {:.2} x",
        rate(&install),
        rate(&install) / floor,
        rate(&cp),
        rate(&unzstd_sync),
        pipeline.seconds / install.seconds,
        rate(&paranoid) / floor
    );
    println!(
        "delta: {delta_read:.1} MB of the {delta_size:.0} MB bundle read ({:.1}%), {:.3} s ({:.2}x faster than a full install)",
        100.0 * delta_read / delta_size,
        delta.seconds,
        install.seconds / delta.seconds
    );
    Ok(())
}
