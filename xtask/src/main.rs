//! Project automation. `cargo run --release -p xtask -- bench-bundle` measures `abide bundle
//! create` and `abide bundle verify` on a generated image side by side with `zstd` and
//! `openssl` baselines run on the same files in the same run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench-bundle") => bench_bundle(&args[1..]),
        _ => bail!("usage: xtask bench-bundle [--size MIB] [--runs N] [--dir DIR]"),
    }
}

struct Options {
    size_mib: usize,
    runs: usize,
    dir: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
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
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(o)
}

/// One timed command: best wall time of `runs` and the peak RSS of the last run.
struct Measure {
    seconds: f64,
    peak_kib: Option<u64>,
}

fn run(label: &str, script: &str, runs: usize) -> Result<Measure> {
    let mut best = f64::INFINITY;
    let mut peak = None;
    for _ in 0..runs {
        let has_time = Path::new("/usr/bin/time").exists();
        let mut cmd = if has_time {
            let mut c = Command::new("/usr/bin/time");
            c.args(["-f", "%M", "sh", "-c", script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let start = Instant::now();
        let out = cmd.output().with_context(|| format!("running {label}"))?;
        let elapsed = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("{label} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        best = best.min(elapsed);
        if has_time {
            peak = String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok());
        }
    }
    Ok(Measure {
        seconds: best,
        peak_kib: peak,
    })
}

fn bench_bundle(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    std::fs::create_dir_all(&o.dir)?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let img = dir.join("image.img");
    let size = o.size_mib << 20;
    if std::fs::metadata(&img).map(|m| m.len() as usize).ok() != Some(size) {
        eprintln!(
            "generating a {} MiB image (random, zero and text runs) at {}",
            o.size_mib,
            img.display()
        );
        let mut f = std::fs::File::create(&img)?;
        for (i, block) in (0..size).step_by(64 << 20).enumerate() {
            f.write_all(&abide_testkit::image(
                (64 << 20).min(size - block),
                i as u64,
            ))?;
        }
        f.sync_all()?;
    }
    let d = dir.display();
    let a = abide.display();
    let sh = |s: &str| {
        s.replace("{d}", &d.to_string())
            .replace("{a}", &a.to_string())
    };
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
    // Warm the page cache so every command reads from memory.
    run("warm", &sh("cat {d}/image.img > /dev/null"), 1)?;
    let runs = o.runs;
    let zstd = run(
        "zstd -3 -T1",
        &sh("zstd -3 -T1 -q -f {d}/image.img -o {d}/image.zst"),
        runs,
    )?;
    let zstd_sync = run(
        "zstd -3 -T1 + fsync",
        &sh("zstd -3 -T1 -q -f {d}/image.img -o {d}/image.zst && sync {d}/image.zst"),
        runs,
    )?;
    let create = run(
        "abide bundle create",
        &sh(
            "{a} bundle create --product bench --version 1.0.0 --component rootfs={d}/image.img --sign {d}/k.key --out {d}/image.abide >/dev/null",
        ),
        runs,
    )?;
    let sha = run(
        "openssl dgst -sha256",
        &sh("openssl dgst -sha256 {d}/image.img >/dev/null"),
        runs,
    )?;
    let unzstd = run("zstd -d", &sh("zstd -d -c {d}/image.zst > /dev/null"), runs)?;
    let verify = run(
        "abide bundle verify",
        &sh("{a} bundle verify {d}/image.abide --trust {d}/trust.json >/dev/null"),
        runs,
    )?;

    let mb = size as f64 / 1e6;
    let rate = |m: &Measure| mb / m.seconds;
    let mem = |m: &Measure| {
        m.peak_kib.map_or("n/a".to_owned(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    let stored = std::fs::metadata(dir.join("image.abide"))?.len() as f64 / 1e6;
    let zst = std::fs::metadata(dir.join("image.zst"))?.len() as f64 / 1e6;
    println!(
        "image: {} MiB; bundle {stored:.0} MB, zstd -3 output {zst:.0} MB; best of {runs} runs; cores: {}",
        o.size_mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>9} {:>11} {:>12}",
        "command", "seconds", "MB/s", "peak RSS"
    );
    for (name, m) in [
        ("zstd -3 -T1 (baseline)", &zstd),
        ("zstd -3 -T1 + fsync (baseline)", &zstd_sync),
        ("abide bundle create (with fsync)", &create),
        ("openssl dgst -sha256 (baseline)", &sha),
        ("zstd -d (baseline)", &unzstd),
        ("abide bundle verify", &verify),
    ] {
        println!(
            "{name:<34} {:>9.3} {:>11.0} {:>12}",
            m.seconds,
            rate(m),
            mem(m)
        );
    }
    let floor = rate(&sha).min(rate(&unzstd));
    println!(
        "create / zstd -3: {:.2}x (target <= 1.5x); create / (zstd -3 + fsync): {:.2}x",
        create.seconds / zstd.seconds,
        create.seconds / zstd_sync.seconds
    );
    println!(
        "verify: {:.0} MB/s = {:.2} x min(sha256 {:.0}, zstd -d {:.0}) (target >= 0.80)",
        rate(&verify),
        rate(&verify) / floor,
        rate(&sha),
        rate(&unzstd)
    );
    Ok(())
}
