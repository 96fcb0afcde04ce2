//! `xtask bench-delta`: what an update from an old to a new real root file system image costs
//! to download and to apply, for Abide and its peers, side by side on the pairs that
//! `scripts/real-images` builds (point update, kernel bump).
//!
//! Per pair: bytes downloaded, apply time and peak memory of Abide's full bundle and of its
//! chunk reuse (an install onto a device whose running group holds the old image) and of its
//! delta (`abide delta create`, installed onto that device), next to
//! `zstd -3` of the new image, casync (the new chunk store's chunks the old store lacks, plus
//! the index), `xdelta3 -9 -B <size>` and `zstd -19 --long=31 --patch-from`. Every apply is
//! checked: its output is the new image byte for byte.

use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::{Measure, run, run_after};

/// `xtask bench-delta [--dir DIR] [--level N] [--chunk-size SIZE]` (DIR: where
/// scripts/real-images put the images; the level and chunk size are those both bundles are
/// made with, as `abide bundle create` takes them).
pub fn bench(args: &[String]) -> Result<()> {
    let mut dir = "target/real-images".to_owned();
    let mut made_with = String::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--dir", Some(v)) => dir = v.clone(),
            ("--level", Some(v)) if v.parse::<u8>().is_ok() => {
                made_with.push_str(&format!(" --level {v}"))
            }
            ("--chunk-size", Some(v)) if v.chars().all(|c| c.is_ascii_alphanumeric()) => {
                made_with.push_str(&format!(" --chunk-size {v}"))
            }
            _ => {
                return Err(crate::usage(anyhow::anyhow!(
                    "usage: xtask bench-delta [--dir DIR] [--level N] [--chunk-size SIZE]"
                )));
            }
        }
    }
    if !made_with.is_empty() {
        println!("both bundles made with{made_with}");
    }
    let dir = std::fs::canonicalize(&dir)
        .with_context(|| format!("{dir}: run scripts/real-images first"))?;
    let abide = std::fs::canonicalize("target/release/abide")
        .context("build the release binary first: cargo build --release -p abide")?;
    for tool in ["casync", "xdelta3", "zstd"] {
        ensure!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()?
                .status
                .success(),
            "{tool} is not installed (apt-get install {tool})"
        );
    }
    let w = dir.join("work");
    std::fs::create_dir_all(&w)?;
    let sh = |s: &str| {
        s.replace("{a}", &abide.display().to_string())
            .replace("{d}", &dir.display().to_string())
            .replace("{w}", &w.display().to_string())
            .replace("{made_with}", &made_with)
    };
    run(
        "keys",
        &sh(
            "rm -f {w}/k.key {w}/k.pub && {a} key generate --out {w}/k >/dev/null && \
             {a} trust init --key {w}/k.pub --threshold 1 --sign {w}/k.key --out {w}/trust.json >/dev/null",
        ),
        1,
    )?;
    for pair in ["point", "kernel"] {
        let old = dir.join(format!("{pair}-old.img"));
        let new = dir.join(format!("{pair}-new.img"));
        ensure!(
            old.exists() && new.exists(),
            "{}: run scripts/real-images first",
            old.display()
        );
        let size = std::fs::metadata(&new)?.len();
        let sh = |s: &str| {
            sh(s)
                .replace("{o}", &old.display().to_string())
                .replace("{n}", &new.display().to_string())
                .replace("{s}", &size.to_string())
                .replace("{m}", &(size / (1 << 20) + 16).to_string())
        };
        let check = |label: &str, out: &str| -> Result<()> {
            let same = std::process::Command::new("cmp")
                .args(["-s", out, &new.display().to_string()])
                .status()?
                .success();
            ensure!(same, "{label}: the applied image differs from the new one");
            Ok(())
        };
        let len = |p: &str| -> Result<u64> { Ok(std::fs::metadata(sh(p))?.len()) };
        // Abide: the two bundles, a device running the old one, the new one installed.
        run(
            "bundles",
            &sh(
                "{a} bundle create --product bench --version 1.0.0 --compatible bench-board --component rootfs={o} \
                   --sign {w}/k.key --out {w}/old.abide{made_with} >/dev/null && \
                 {a} bundle create --product bench --version 2.0.0 --compatible bench-board --component rootfs={n} \
                   --sign {w}/k.key --out {w}/new.abide{made_with} >/dev/null",
            ),
            1,
        )?;
        let device = sh(
            "rm -rf {w}/dev && {a} sim init {w}/dev --trust {w}/trust.json --product bench --compatible bench-board \
               --slot-size {m}M >/dev/null && {a} install {w}/old.abide --no-reboot --config {w}/dev/system.toml >/dev/null && \
             {a} sim reboot {w}/dev >/dev/null && cat {o} {n} {w}/new.abide > /dev/null",
        );
        let fresh = sh(
            "rm -rf {w}/dev && {a} sim init {w}/dev --trust {w}/trust.json --product bench --compatible bench-board \
               --slot-size {m}M >/dev/null",
        );
        let full = run_after(
            "abide full install",
            &fresh,
            &sh("{a} install {w}/new.abide --no-reboot --config {w}/dev/system.toml >/dev/null"),
            1,
        )?;
        let reuse = run_after(
            "abide chunk reuse",
            &device,
            &sh(
                "{a} install {w}/new.abide --no-reboot --config {w}/dev/system.toml --json > {w}/reuse.json",
            ),
            1,
        )?;
        let reused: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.join("reuse.json"))?)?;
        let reuse_bytes = reused["bundle_bytes_read"].as_u64().context("bytes read")?;
        // The installed slot is the new image.
        let target = reused["target"].as_str().context("target")?.to_owned();
        let slot = w.join(format!("dev/slots/rootfs.{target}.img"));
        run(
            "check the slot",
            &format!(
                "head -c {size} {} | cmp -s - {}",
                slot.display(),
                new.display()
            ),
            1,
        )?;
        // The delta from the old bundle to the new, applied on the device running the old.
        let dmake = run(
            "abide delta create",
            &sh(
                "{a} delta create --from {w}/old.abide --to {w}/new.abide --out {w}/d.abide >/dev/null",
            ),
            1,
        )?;
        let delta_bytes = len("{w}/d.abide")?;
        let delta = run_after(
            "abide delta",
            &format!(
                "{device} && cat {} > /dev/null",
                w.join("d.abide").display()
            ),
            &sh(
                "{a} install {w}/d.abide --no-reboot --config {w}/dev/system.toml --json > {w}/delta.json",
            ),
            1,
        )?;
        let applied: serde_json::Value =
            serde_json::from_slice(&std::fs::read(w.join("delta.json"))?)?;
        let target = applied["target"].as_str().context("target")?.to_owned();
        let slot = w.join(format!("dev/slots/rootfs.{target}.img"));
        run(
            "check the slot after the delta",
            &format!(
                "head -c {size} {} | cmp -s - {}",
                slot.display(),
                new.display()
            ),
            1,
        )?;
        // zstd -3 of the image: the plain compressed download.
        run("zstd -3", &sh("zstd -3 -T0 -q -f {n} -o {w}/new.zst"), 1)?;
        let zst = len("{w}/new.zst")?;
        // casync: the chunks of the new store the old store lacks, and the index.
        run(
            "casync make",
            &sh(
                "rm -rf {w}/ca-old {w}/ca-new && casync make --store={w}/ca-old {w}/old.caibx {o} >/dev/null && \
                 casync make --store={w}/ca-new {w}/new.caibx {n} >/dev/null",
            ),
            1,
        )?;
        let casync_bytes =
            store_difference(&w.join("ca-old"), &w.join("ca-new"))? + len("{w}/new.caibx")?;
        let casync = run(
            "casync extract",
            &sh(
                "rm -f {w}/ca.out && casync extract --store={w}/ca-new --seed={o} {w}/new.caibx {w}/ca.out",
            ),
            1,
        )?;
        check("casync", &sh("{w}/ca.out"))?;
        // xdelta3.
        let xmake = run(
            "xdelta3 -e",
            &sh("xdelta3 -9 -B {s} -e -f -s {o} {n} {w}/x.vcdiff"),
            1,
        )?;
        let x = len("{w}/x.vcdiff")?;
        let xapply = run(
            "xdelta3 -d",
            &sh("xdelta3 -B {s} -d -f -s {o} {w}/x.vcdiff {w}/x.out"),
            1,
        )?;
        check("xdelta3", &sh("{w}/x.out"))?;
        // zstd --patch-from.
        let zmake = run(
            "zstd --patch-from",
            &sh("zstd -19 -T0 --long=31 -q -f --patch-from={o} {n} -o {w}/z.patch"),
            1,
        )?;
        let z = len("{w}/z.patch")?;
        let zapply = run(
            "zstd -d --patch-from",
            &sh(
                "zstd -d --long=31 --memory=2048MB -q -f --patch-from={o} {w}/z.patch -o {w}/z.out",
            ),
            1,
        )?;
        check("zstd --patch-from", &sh("{w}/z.out"))?;
        let full_bytes = len("{w}/new.abide")?;
        let mib = |m: &Measure| {
            m.peak_kib.map_or("n/a".to_owned(), |k| {
                format!("{:.1} MiB", k as f64 / 1024.0)
            })
        };
        println!(
            "\n{pair}: {} -> {} ({:.0} MiB)",
            old.display(),
            new.display(),
            size as f64 / (1 << 20) as f64
        );
        println!(
            "{:<36} {:>12} {:>10} {:>12} {:>11}",
            "what", "download MB", "apply s", "apply peak", "create peak"
        );
        let mb = |b: u64| b as f64 / 1e6;
        for (what, bytes, apply, create) in [
            ("abide full bundle", full_bytes, Some(&full), None),
            ("abide chunk reuse", reuse_bytes, Some(&reuse), None),
            ("abide delta", delta_bytes, Some(&delta), Some(&dmake)),
            ("zstd -3 of the image", zst, None, None),
            (
                "casync (missing chunks + index)",
                casync_bytes,
                Some(&casync),
                None,
            ),
            ("xdelta3 -9 -B size", x, Some(&xapply), Some(&xmake)),
            (
                "zstd -19 --long=31 --patch-from",
                z,
                Some(&zapply),
                Some(&zmake),
            ),
        ] {
            println!(
                "{what:<36} {:>12.1} {:>10} {:>12} {:>11}",
                mb(bytes),
                apply.map_or("-".into(), |m| format!("{:.2}", m.seconds)),
                apply.map_or("-".into(), mib),
                create.map_or("-".into(), mib),
            );
        }
        println!(
            "delta: {:.2}x min(xdelta3, zstd --patch-from), {:.2}x casync, {:.3}x the full bundle; create {:.1} s",
            delta_bytes as f64 / x.min(z) as f64,
            delta_bytes as f64 / casync_bytes as f64,
            delta_bytes as f64 / full_bytes as f64,
            dmake.seconds
        );
        println!(
            "chunk reuse: {:.2}x casync, {:.2}x xdelta3, {:.2}x zstd --patch-from; full bundle {:.3}x zstd -3",
            reuse_bytes as f64 / casync_bytes as f64,
            reuse_bytes as f64 / x as f64,
            reuse_bytes as f64 / z as f64,
            full_bytes as f64 / zst as f64
        );
        for f in ["ca.out", "x.out", "z.out", "x.vcdiff", "z.patch", "d.abide"] {
            let _ = std::fs::remove_file(w.join(f));
        }
    }
    Ok(())
}

/// The bytes of the chunk files in `new` that `old` does not hold (by name).
fn store_difference(old: &Path, new: &Path) -> Result<u64> {
    fn chunks(store: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
        let mut out = std::collections::BTreeMap::new();
        for sub in std::fs::read_dir(store)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sub.path())? {
                let f = f?;
                out.insert(
                    f.file_name().to_string_lossy().into_owned(),
                    f.metadata()?.len(),
                );
            }
        }
        Ok(out)
    }
    let (old, new) = (chunks(old)?, chunks(new)?);
    Ok(new
        .iter()
        .filter(|(name, _)| !old.contains_key(*name))
        .map(|(_, len)| len)
        .sum())
}
