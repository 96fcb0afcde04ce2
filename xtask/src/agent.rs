//! `xtask bench-agent`: the device agent against a real server on loopback.
//!
//! - bytes on the wire for one idle check-in (request and answer, counted by a forwarding
//!   proxy between agent and server);
//! - an update of a SIZE MiB image of which CHANGE % differs from the running one: bytes the
//!   agent fetched against the bundle's size, and its wall time from check-in to activated,
//!   side by side with the baseline on an identical device: `curl` of the whole bundle to a
//!   file, then `abide install` of that file (which reuses the running group's chunks too);
//! - the agent's resident memory while idle between check-ins.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

struct Opts {
    size_mib: usize,
    change_pct: f64,
    abide: String,
    dir: String,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        size_mib: 256,
        change_pct: 5.0,
        abide: "target/release/abide".into(),
        dir: "target/bench-agent".into(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--size" => o.size_mib = v.parse().with_context(|| format!("{flag} {v:?}"))?,
            "--change" => o.change_pct = v.parse().with_context(|| format!("{flag} {v:?}"))?,
            "--abide" => o.abide = v.clone(),
            "--dir" => o.dir = v.clone(),
            _ => bail!(
                "usage: xtask bench-agent [--size MIB] [--change PCT] [--abide PATH] [--dir DIR]"
            ),
        }
    }
    Ok(o)
}

/// Forwards connections to `upstream`, counting the bytes both ways.
fn counting_proxy(upstream: String) -> Result<(String, Arc<AtomicU64>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let bytes = Arc::new(AtomicU64::new(0));
    let counted = bytes.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 << 10];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                counted.fetch_add(n as u64, Ordering::Relaxed);
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok((url, bytes))
}

fn sh(script: &str) -> Result<String> {
    let out = Command::new("bash").args(["-c", script]).output()?;
    if !out.status.success() {
        bail!(
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the benchmark.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse(args).map_err(crate::usage)?;
    let abide = std::fs::canonicalize(&o.abide).with_context(|| {
        format!(
            "{}: build it first (cargo build --release -p abide)",
            o.abide
        )
    })?;
    let a = abide.display().to_string();
    let server_bin = std::fs::canonicalize("target/release/abide")
        .context("the server runs from target/release/abide: cargo build --release -p abide")?;
    let _ = std::fs::remove_dir_all(&o.dir);
    std::fs::create_dir_all(&o.dir)?;
    let dir = std::fs::canonicalize(&o.dir)?;
    let d = dir.display().to_string();
    let size = o.size_mib << 20;

    // Two images: v2 differs from v1 in CHANGE % of its bytes, in 16 places.
    let mut image = abide_testkit::image(size, 42);
    std::fs::write(dir.join("v1.img"), &image)?;
    let changed = (size as f64 * o.change_pct / 100.0) as usize;
    let mut rng = abide_testkit::SplitMix(7);
    for k in 0..16 {
        let at = size / 16 * k + size / 64;
        for b in &mut image[at..at + changed / 16] {
            *b = rng.next_u64() as u8;
        }
    }
    std::fs::write(dir.join("v2.img"), &image)?;
    drop(image);
    sh(&format!(
        "cd {d} && {a} key generate --out k >/dev/null && \
         {a} trust init --key k.pub --threshold 1 --sign k.key --out trust.json >/dev/null && \
         for v in 1 2; do {a} bundle create --product bench --version $v.0.0 --security-version 1 \
           --compatible bench-board --component rootfs=v$v.img --sign k.key --out v$v.abide >/dev/null; done && \
         mkdir -p server && cp trust.json server/"
    ))?;
    let bundle_size = std::fs::metadata(dir.join("v2.abide"))?.len();

    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let _server = Killed(
        Command::new(&server_bin)
            .args(["server", "--data", &format!("{d}/server"), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("ABIDE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let url = format!("http://127.0.0.1:{port}");
    let s = server_bin.display();
    let fleet = format!("{s} fleet --server {url} --token-file {d}/server/admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    while sh(&format!("{fleet} release list")).is_err() {
        if Instant::now() > deadline {
            bail!("the server did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sh(&format!(
        "{fleet} enroll-token create --group lab --uses 2 > {d}/lab.token"
    ))?;
    let (proxy, wire) = counting_proxy(format!("127.0.0.1:{port}"))?;

    // Two identical devices with 1.0.0 committed in group B: one updates through the agent,
    // the other by curl and abide install.
    let slot = o.size_mib + 64;
    for dev in ["agent", "curl"] {
        sh(&format!(
            "cd {d} && {a} sim init {dev} --trust trust.json --product bench --compatible bench-board \
             --version 0.9.0 --slot-size {slot}M --server {proxy} --enroll-token-file lab.token --poll 1s >/dev/null && \
             {a} install v1.abide --config {dev}/system.toml >/dev/null && {a} sim reboot {dev} >/dev/null"
        ))?;
    }
    let once = |dev: &str| {
        sh(&format!(
            "cd {d} && ABIDE_LOG=warn {a} agent --once --config {dev}/system.toml"
        ))
    };
    once("agent")?; // enrols
    once("agent")?; // a first check-in, so the next one is steady-state
    wire.store(0, Ordering::Relaxed);
    once("agent")?;
    let idle = wire.load(Ordering::Relaxed);

    sh(&format!("{fleet} release upload {d}/v2.abide >/dev/null"))?;
    let release = sh(&format!(
        "{fleet} release list --json | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r[\"version\"] == \"2.0.0\"][0][\"id\"])'"
    ))?;
    let release = release.trim();
    sh(&format!(
        "{fleet} rollout create --release {release} --stages 100 --group lab >/dev/null"
    ))?;
    sh(&format!(
        "sync; cat {d}/v2.abide {d}/agent/slots/* {d}/curl/slots/* > /dev/null"
    ))?;
    wire.store(0, Ordering::Relaxed);
    let t = Instant::now();
    let exit = once("agent")?;
    let agent_seconds = t.elapsed().as_secs_f64();
    let agent_bytes = wire.load(Ordering::Relaxed);
    if !exit.contains("reboot") {
        bail!("the agent did not activate: {exit}");
    }
    // What the agent had to fetch: the bundle less the chunks it passed over.
    let needed: u64 = sh(&format!(
        "{a} log --json --config {d}/agent/system.toml | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r[\"event\"] == \"download\"][-1][\"details\"][\"needed\"])'"
    ))?
    .trim()
    .parse()?;

    // The baseline: the whole bundle with curl, then a local install of the file.
    let token = std::fs::read_to_string(dir.join("server/admin.token"))?;
    let t = Instant::now();
    sh(&format!(
        "curl -sf -H 'authorization: Bearer {}' -o {d}/v2.copy {url}/api/v1/releases/{release}/bundle",
        token.trim()
    ))?;
    let curl_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    sh(&format!(
        "{a} install {d}/v2.copy --no-reboot --config {d}/curl/system.toml >/dev/null"
    ))?;
    let install_seconds = t.elapsed().as_secs_f64();
    // The strongest delta baseline: a patch made for exactly this pair of images (zstd
    // --patch-from, long-distance matching), which the server would have to prepare for every
    // version a device might run; its bytes, and the time to apply it on the device.
    sh(&format!(
        "zstd -q -f -T0 --long=31 --patch-from={d}/v1.img {d}/v2.img -o {d}/v2.patch.zst"
    ))?;
    let patch_bytes = std::fs::metadata(dir.join("v2.patch.zst"))?.len();
    let t = Instant::now();
    sh(&format!(
        "zstd -q -f -d --long=31 --patch-from={d}/v1.img {d}/v2.patch.zst -o {d}/patched.img && \
         cmp {d}/patched.img {d}/v2.img && sync {d}/patched.img"
    ))?;
    let patch_seconds = t.elapsed().as_secs_f64();
    let same = sh(&format!(
        "cmp -n {size} {d}/agent/slots/rootfs.A.img {d}/v2.img && cmp -n {size} {d}/curl/slots/rootfs.A.img {d}/v2.img && echo same"
    ))?;

    // Idle memory: the daemon between check-ins.
    let agent = Killed(
        Command::new(&abide)
            .args(["agent", "--config", &format!("{d}/curl/system.toml")])
            .env("ABIDE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(5));
    let rss = rss_kib(agent.0.id(), "VmRSS:");
    let hwm = rss_kib(agent.0.id(), "VmHWM:");
    drop(agent);

    let binary = std::fs::metadata(&abide)?.len();
    println!("binary {a}: {binary} bytes ({:.2} MB)", binary as f64 / 1e6);
    println!("idle check-in on the wire (request + answer, TCP payload): {idle} bytes");
    println!(
        "update of a {} MiB image, {:.1} % changed ({} bytes bundle):",
        o.size_mib, o.change_pct, bundle_size
    );
    println!(
        "  abide agent (download into the slot, verify, stage, activate): {agent_seconds:.2} s, {agent_bytes} bytes on the wire ({:.1} % of the bundle; the chunks it lacked: {needed} bytes, so {:.3}x of what was needed)",
        100.0 * agent_bytes as f64 / bundle_size as f64,
        agent_bytes as f64 / needed as f64
    );
    println!(
        "  curl of the bundle + abide install of the file:                {:.2} s ({curl_seconds:.2} + {install_seconds:.2}), {bundle_size} bytes downloaded",
        curl_seconds + install_seconds
    );
    println!(
        "  zstd --patch-from patch for exactly this pair (made ahead on the server):      {patch_bytes} bytes ({:.1} % of the bundle), applied in {patch_seconds:.2} s",
        100.0 * patch_bytes as f64 / bundle_size as f64
    );
    println!("  both slots hold the new image: {}", same.trim() == "same");
    println!("agent idle resident memory: {rss} KiB (peak {hwm} KiB)");
    Ok(())
}
