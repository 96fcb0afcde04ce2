//! `xtask bench-create`: what `abide bundle create` costs beside `zstd -3`, on the real root file
//! system images `scripts/real-images` builds, page cache warm.
//!
//! 1. Time: `--rounds` rounds (10 by default) on `point-new` and on `kernel-new`, each running
//!    `zstd -3 -T0`, `zstd -3 -T1` and `abide bundle create` one after the other; the medians
//!    of wall and CPU time (user + system, from `/usr/bin/time`) and the median of each round's
//!    ratio to `zstd -3 -T0` (the machine's speed can wander within minutes, so only ratios
//!    within a round compare).
//! 2. Size: `point-new` made into bundles at other levels and chunk sizes, each size ÷
//!    `zstd -3`'s output, with create's time (one run) ÷ the median `zstd -3 -T0` time.
//! 3. What compressing 64 KiB pieces alone costs whatever the format: `point-new` cut into fixed
//!    64 KiB blocks, each compressed as its own frame at levels 3 and 8, without and with a
//!    dictionary `zstd --train` makes from the same blocks (110 KB and 1 MiB; the dictionary's
//!    own size not counted), ÷ `zstd -3`'s output.

use anyhow::{Context, Result, ensure};

use crate::{Measure, run};

struct Opts {
    dir: String,
    rounds: usize,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        dir: "target/real-images".into(),
        rounds: 10,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => o.dir = v.clone(),
            "--rounds" => o.rounds = v.parse().with_context(|| format!("{flag} {v:?}"))?,
            _ => anyhow::bail!("usage: xtask bench-create [--dir DIR] [--rounds N]"),
        }
    }
    ensure!(o.rounds >= 1, "--rounds: at least 1");
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cpu(m: &Measure) -> f64 {
    m.cpu.map_or(f64::NAN, |(u, s)| u + s)
}

/// `xtask bench-create [--dir DIR] [--rounds N]`.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    let dir = std::fs::canonicalize(&o.dir)
        .with_context(|| format!("{}: run scripts/real-images first", o.dir))?;
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    let w = dir.join("create");
    std::fs::create_dir_all(&w)?;
    let sh = |s: &str| {
        s.replace("{a}", &abide.display().to_string())
            .replace("{w}", &w.display().to_string())
    };
    run(
        "keys",
        &sh("rm -f {w}/k.key {w}/k.pub && {a} key generate --out {w}/k >/dev/null"),
        1,
    )?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "abide bundle create beside zstd -3: {} rounds, {cores} cores",
        o.rounds
    );
    let mut zstd_t0_median = f64::NAN;
    for image in ["point-new", "kernel-new"] {
        let img = dir.join(format!("{image}.img"));
        ensure!(
            img.exists(),
            "{}: run scripts/real-images first",
            img.display()
        );
        let sh = |s: &str| sh(s).replace("{i}", &img.display().to_string());
        run("warm", &sh("cat {i} > /dev/null"), 1)?;
        let mut rows: [(&str, Vec<f64>, Vec<f64>); 3] = [
            ("zstd -3 -T0", Vec::new(), Vec::new()),
            ("zstd -3 -T1", Vec::new(), Vec::new()),
            ("abide bundle create", Vec::new(), Vec::new()),
        ];
        let (mut wall_ratio, mut cpu_ratio) = (Vec::new(), Vec::new());
        for _ in 0..o.rounds {
            let t0 = run(
                "zstd -3 -T0",
                &sh("zstd -3 -T0 -q -f {i} -o {w}/image.zst"),
                1,
            )?;
            let t1 = run(
                "zstd -3 -T1",
                &sh("zstd -3 -T1 -q -f {i} -o {w}/image.zst"),
                1,
            )?;
            let c = run(
                "abide bundle create",
                &sh(
                    "{a} bundle create --product bench --version 1.0.0 --component rootfs={i} \
                     --sign {w}/k.key --out {w}/image.abide >/dev/null",
                ),
                1,
            )?;
            for (row, m) in rows.iter_mut().zip([&t0, &t1, &c]) {
                row.1.push(m.seconds);
                row.2.push(cpu(m));
            }
            wall_ratio.push(c.seconds / t0.seconds);
            cpu_ratio.push(cpu(&c) / cpu(&t0));
        }
        let size = std::fs::metadata(&img)?.len();
        println!(
            "\n{image} ({:.0} MiB): medians of {} rounds",
            size as f64 / (1 << 20) as f64,
            o.rounds
        );
        println!("{:<22} {:>8} {:>8}", "command", "wall s", "CPU s");
        for (name, wall, cpu) in &rows {
            println!(
                "{name:<22} {:>8.3} {:>8.2}",
                median(wall.clone()),
                median(cpu.clone())
            );
        }
        println!(
            "abide bundle create / zstd -3 -T0, median of the rounds' ratios: wall {:.2}, CPU {:.2}",
            median(wall_ratio),
            median(cpu_ratio)
        );
        if image == "point-new" {
            zstd_t0_median = median(rows[0].1.clone());
        }
    }

    // Sizes on point-new.
    let img = dir.join("point-new.img");
    let sh = |s: &str| sh(s).replace("{i}", &img.display().to_string());
    run("zstd -3", &sh("zstd -3 -T0 -q -f {i} -o {w}/image.zst"), 1)?;
    let zst = std::fs::metadata(w.join("image.zst"))?.len();
    println!("\npoint-new: zstd -3 output {zst} bytes");
    println!(
        "{:<38} {:>13} {:>10} {:>22}",
        "abide bundle create", "bytes", "/ zstd -3", "time / zstd -3 -T0"
    );
    for (level, chunk) in [
        (3, "64K"),
        (3, "128K"),
        (3, "256K"),
        (5, "64K"),
        (6, "64K"),
        (7, "64K"),
        (8, "64K"),
        (9, "64K"),
        (12, "64K"),
        (5, "256K"),
    ] {
        let m = run(
            "abide bundle create",
            &sh(&format!(
                "{{a}} bundle create --product bench --version 1.0.0 --component rootfs={{i}} \
                 --level {level} --chunk-size {chunk} --sign {{w}}/k.key --out {{w}}/sized.abide >/dev/null"
            )),
            1,
        )?;
        let bytes = std::fs::metadata(w.join("sized.abide"))?.len();
        println!(
            "{:<38} {bytes:>13} {:>10.3} {:>22.2}",
            format!("--level {level} --chunk-size {chunk}"),
            bytes as f64 / zst as f64,
            m.seconds / zstd_t0_median
        );
    }

    // Fixed 64 KiB blocks, each compressed alone.
    let image = std::fs::read(&img)?;
    let mut dicts = vec![("no dictionary".to_owned(), Vec::new())];
    for (name, max) in [("110 KB", 112_640), ("1 MiB", 1 << 20)] {
        run(
            "zstd --train",
            &sh(&format!(
                "zstd --train -q -f -B65536 --maxdict={max} {{i}} -o {{w}}/dict"
            )),
            1,
        )?;
        dicts.push((
            format!("a {name} dictionary"),
            std::fs::read(w.join("dict"))?,
        ));
    }
    println!("\npoint-new as fixed 64 KiB blocks, each compressed alone (dictionary not counted):");
    println!("{:<34} {:>13} {:>10}", "", "bytes", "/ zstd -3");
    for level in [3, 8] {
        for (name, dict) in &dicts {
            let mut c = zstd::bulk::Compressor::with_dictionary(level, dict)?;
            let mut total = 0u64;
            for block in image.chunks(64 << 10) {
                total += c.compress(block)?.len() as u64;
            }
            println!(
                "{:<34} {total:>13} {:>10.3}",
                format!("level {level}, {name}"),
                total as f64 / zst as f64
            );
        }
    }
    Ok(())
}
