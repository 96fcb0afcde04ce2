//! The crash matrix (I6, I7): the install and the boot step are cut short at every crash
//! point, then the simulated device is powered on and must converge — booting a good group,
//! the transaction committed with the new group whole, rolled back, or failed before
//! activation with the old group untouched — with its state file and audit log intact, and
//! the same bundle installable again.
//!
//! Each cut is checked twice: as the process abort leaves the files (the page cache kept, as
//! after a crash of the process), and as a power cut leaves the disk — only what was synced
//! (`abide_fs::powerloss`: files as of their last fsync, directories as of their last
//! directory fsync). Then the proof that the second model has teeth: each sync of the install
//! and of the boot is left out in turn, and some cut must then break an invariant. Last,
//! `kill -9` at random moments (200 runs with ABIDE_SLOW_TESTS=1, 20 otherwise).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abide_bundle::Digest;
use abide_fs::powerloss::{self, Snapshot};
use serde_json::Value;

use crate::device::{Sim, field};
use crate::json;

const ABIDE: &str = env!("CARGO_BIN_EXE_abide");

/// Copies the tree at `from` to `to`, symbolic links as links.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::metadata(from).unwrap().permissions()).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs abide in `dir` with crash settings; returns whether it exited normally.
pub(crate) fn run(dir: &Path, args: &[&str], env: &[(&str, String)]) -> bool {
    let mut cmd = Command::new(ABIDE);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.status().unwrap().code().is_some()
}

/// The crash points `args` passes through.
pub(crate) fn trace(dir: &Path, args: &[&str]) -> Vec<String> {
    let file = dir.join("trace.txt");
    let _ = std::fs::remove_file(&file);
    assert!(run(
        dir,
        args,
        &[("ABIDE_CRASH_TRACE", file.display().to_string())]
    ));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    text.lines().map(str::to_owned).collect()
}

fn slot_a(dir: &Path) -> Digest {
    Digest::of(&std::fs::read(dir.join("dev/slots/rootfs.A.img")).unwrap())
}

/// What a converged device must hold: group A as it was, and group B's image when it runs B.
#[derive(Clone, Copy)]
struct Expect {
    slot_a: Digest,
    /// The new image's length and digest (the slot is larger; the rest is not the image's).
    image_b: (usize, Digest),
}

fn slot_b_image(dir: &Path, len: usize) -> Digest {
    let bytes = std::fs::read(dir.join("dev/slots/rootfs.B.img")).unwrap();
    Digest::of(&bytes[..len.min(bytes.len())])
}

/// Powers the crashed device on and checks I1–I8; returns the final state.
fn recover_and_check(
    dir: &Path,
    expect: Expect,
    counter_before: u64,
    force_reinstall: bool,
) -> String {
    let slot_a_before = expect.slot_a;
    let v = json(dir, "sim reboot dev", 0);
    let cycles = v["cycles"].as_array().unwrap().len();
    assert!(
        cycles <= 3,
        "converged within 3 power cycles, took {cycles}: {v}"
    );
    let s = &v["status"];
    let state = field(s, "state").to_owned();
    let booted = field(s, "booted");
    assert_eq!(
        booted,
        field(s, "good"),
        "the device runs its known-good group: {s}"
    );
    // I1: group A was the fallback throughout and was never written.
    assert_eq!(
        slot_a(dir),
        slot_a_before,
        "the known-good group was written ({state})"
    );
    match state.as_str() {
        "committed" => {
            assert_eq!((booted, field(s, "version")), ("B", "2.0.0"));
            assert_eq!(s["security_version"], 2, "the counter rose at commit");
            assert_eq!(
                slot_b_image(dir, expect.image_b.0),
                expect.image_b.1,
                "the committed group holds the new image whole"
            );
        }
        "idle" | "failed" | "rolled_back" => {
            assert_eq!((booted, field(s, "version")), ("A", "1.0.0"), "{s}");
            assert_eq!(
                s["security_version"], counter_before,
                "I4: no commit, no counter change"
            );
            if state == "rolled_back" {
                assert!(
                    s["quarantine"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|q| q == "2.0.0"),
                    "I8: {s}"
                );
            }
        }
        other => panic!("the device did not converge: {other} {s}"),
    }
    // I5, I6: the state file parses (status above) and the audit log verifies.
    json(dir, "log verify --config dev/system.toml", 0);
    // The next install of the same bundle still succeeds (forced past a quarantine).
    if state != "committed" {
        let cmd = if force_reinstall || state == "rolled_back" {
            "install 2.0.0.abide --force --config dev/system.toml"
        } else {
            "install 2.0.0.abide --config dev/system.toml"
        };
        json(dir, cmd, 0);
        let v = json(dir, "sim reboot dev", 0);
        assert_eq!(field(&v["status"], "state"), "committed", "{v}");
    }
    state
}

fn setup() -> (Sim, PathBuf, Expect) {
    let sim = Sim::new(Some("true"));
    sim.bundle("2.0.0", 2, 21);
    let template = sim.path("template");
    copy_dir(&sim.path("dev"), &template.join("dev"));
    std::fs::copy(sim.path("2.0.0.abide"), template.join("2.0.0.abide")).unwrap();
    let image = std::fs::read(sim.path("img-2.0.0")).unwrap();
    let expect = Expect {
        slot_a: slot_a(&template),
        image_b: (image.len(), Digest::of(&image)),
    };
    (sim, template, expect)
}

/// A copy of the template whose syncs are recorded from here on.
struct Case {
    dir: PathBuf,
    log: PathBuf,
    before: Snapshot,
}

impl Case {
    fn new(template: &Path, dir: &Path) -> Case {
        copy_dir(template, dir);
        let log = dir.with_extension("powerloss");
        std::fs::create_dir_all(&log).unwrap();
        Case {
            before: Snapshot::take(dir, template).unwrap(),
            dir: dir.to_owned(),
            log,
        }
    }

    /// Runs abide in the case with its syncs recorded, cut at crash point `crash_at` (if any)
    /// and leaving out the syncs of the site `skip` (if any); returns whether it exited
    /// normally.
    fn run(&self, args: &[&str], crash_at: Option<usize>, skip: Option<&str>) -> bool {
        let mut env = vec![("ABIDE_POWERLOSS_LOG", self.log.display().to_string())];
        if let Some(k) = crash_at {
            env.push(("ABIDE_CRASH_AT", k.to_string()));
        }
        if let Some(site) = skip {
            env.push(("ABIDE_POWERLOSS_SKIP", site.to_owned()));
        }
        run(&self.dir, args, &env)
    }

    /// The disk as a power cut now would leave it: only what was synced.
    fn power_cut(&self) -> PathBuf {
        let out = self.dir.with_extension("cut");
        powerloss::materialize(&self.before, &self.log, &out).unwrap();
        out
    }
}

const INSTALL: [&str; 4] = ["install", "2.0.0.abide", "--config", "dev/system.toml"];
const BOOT: [&str; 3] = ["sim", "reboot", "dev"];

#[test]
fn a_crash_or_a_power_cut_at_every_point_of_an_install_or_a_boot_converges() {
    let (sim, template, expect) = setup();
    let cases = sim.path("cases");

    // The durable steps of an install, and of the power-on that follows it.
    let install_points = trace(&copy_to(&template, &cases.join("trace-install")), &INSTALL);
    let installed = cases.join("trace-boot");
    copy_to(&template, &installed);
    assert!(run(&installed, &INSTALL, &[]));
    let boot_points = trace(&installed, &BOOT);
    assert!(
        install_points.len() >= 20 && boot_points.len() >= 10,
        "{install_points:?} {boot_points:?}"
    );

    let mut outcomes = std::collections::BTreeMap::new();
    for (k, point) in install_points.iter().enumerate() {
        let case = Case::new(&template, &cases.join(format!("install-{k}")));
        let finished = case.run(&INSTALL, Some(k), None);
        assert!(!finished, "crash point {k} ({point}) was not reached");
        for (model, dir) in [("crash", case.dir.clone()), ("power cut", case.power_cut())] {
            let state = recover_and_check(&dir, expect, 0, false);
            assert_ne!(
                state, "rolled_back",
                "a {model} during the install is not a failed trial ({point})"
            );
            *outcomes
                .entry(format!("install, {model} → {state}"))
                .or_insert(0) += 1;
        }
    }
    for (k, point) in boot_points.iter().enumerate() {
        let case = Case::new(&template, &cases.join(format!("boot-{k}")));
        assert!(case.run(&INSTALL, None, None));
        let finished = case.run(&BOOT, Some(k), None);
        assert!(
            !finished,
            "crash point {k} ({point}) of the boot was not reached"
        );
        for (model, dir) in [("crash", case.dir.clone()), ("power cut", case.power_cut())] {
            let state = recover_and_check(&dir, expect, 0, true);
            *outcomes
                .entry(format!("boot, {model} → {state}"))
                .or_insert(0) += 1;
        }
    }
    // A power cut right after a finished install, and after a finished boot: what they
    // finished is kept, and the update commits.
    let case = Case::new(&template, &cases.join("finished-install"));
    assert!(case.run(&INSTALL, None, None));
    assert_eq!(
        recover_and_check(&case.power_cut(), expect, 0, false),
        "committed"
    );
    let case = Case::new(&template, &cases.join("finished-boot"));
    assert!(case.run(&INSTALL, None, None));
    assert!(case.run(&BOOT, None, None));
    assert_eq!(
        recover_and_check(&case.power_cut(), expect, 0, false),
        "committed"
    );
    eprintln!(
        "crash matrix: {} install points and {} boot points, outcomes {outcomes:?}",
        install_points.len(),
        boot_points.len()
    );
}

/// Runs `check` and returns its panic message, if it panicked.
fn violation(check: impl FnOnce() + std::panic::UnwindSafe) -> Option<String> {
    std::panic::catch_unwind(check).err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    })
}

/// Whether leaving out the syncs of `site` in `args` (run after `setup_args`, if given) lets
/// some power cut break an invariant: a cut right after the run, which must keep what the run
/// finished (the device then commits), or a cut at any of its crash points, after which the
/// device must converge as always.
fn a_cut_catches_it(
    template: &Path,
    dir: &Path,
    expect: Expect,
    setup_args: Option<&[&str]>,
    args: &[&str],
    points: usize,
    site: &str,
) -> Option<String> {
    // After the run first, then from the last crash point back: a missing sync usually shows
    // where everything that should be durable is relied on.
    let cuts = std::iter::once(None).chain((0..points).rev().map(Some));
    for (i, crash_at) in cuts.enumerate() {
        let case = Case::new(template, &dir.join(i.to_string()));
        if let Some(setup) = setup_args {
            assert!(case.run(setup, None, None));
        }
        let finished = case.run(args, crash_at, Some(site));
        let cut = case.power_cut();
        let force = setup_args.is_some();
        let broken = violation(move || {
            let state = recover_and_check(&cut, expect, 0, force);
            if finished {
                assert_eq!(state, "committed", "the finished run was kept");
            }
        });
        if let Some(why) = broken {
            return Some(format!("cut at {crash_at:?}: {why}"));
        }
    }
    None
}

#[test]
fn deleting_any_one_sync_of_the_install_or_the_boot_breaks_an_invariant_after_a_power_cut() {
    let (sim, template, expect) = setup();
    let work = sim.path("mutations");
    // The sync sites and crash points of a whole install, and of the boot after it.
    let booted = Case::new(&template, &work.join("booted"));
    assert!(booted.run(&INSTALL, None, None));
    let install_syncs = powerloss::syncs(&booted.log).unwrap();
    assert!(booted.run(&BOOT, None, None));
    let boot_syncs = powerloss::syncs(&booted.log).unwrap()[install_syncs.len()..].to_vec();
    let installed = copy_to(&template, &work.join("trace-install"));
    let install_points = trace(&installed, &INSTALL).len();
    let boot_points = trace(&installed, &BOOT).len();
    let sites = |syncs: &[powerloss::Sync]| {
        let mut sites: Vec<String> = syncs.iter().map(|s| s.site.clone()).collect();
        sites.sort();
        sites.dedup();
        sites
    };
    let (install_sites, boot_sites) = (sites(&install_syncs), sites(&boot_syncs));
    assert!(
        install_sites.len() >= 4 && boot_sites.len() >= 3,
        "{install_sites:?} {boot_sites:?}"
    );

    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let (mut caught, mut unnoticed) = (Vec::new(), Vec::new());
    let runs = install_sites
        .iter()
        .map(|s| ("install", s, None, &INSTALL[..], install_points))
        .chain(
            boot_sites
                .iter()
                .map(|s| ("boot", s, Some(&INSTALL[..]), &BOOT[..], boot_points)),
        );
    for (i, (what, site, setup_args, args, points)) in runs.enumerate() {
        let dir = work.join(format!("site-{i}"));
        match a_cut_catches_it(&template, &dir, expect, setup_args, args, points, site) {
            Some(why) => caught.push(format!("{what}, without {site}: {why}")),
            None => unnoticed.push(site.clone()),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A sync the install makes that a later sync of the same directory covers there (the
    // directory sync of a file created only if absent, as the device key is) must still be
    // noticed where nothing follows it: `abide key generate`, whose keys must survive.
    let keygen = ["key", "generate", "--out", "fresh"];
    let made = Case::new(&template, &work.join("keygen"));
    assert!(made.run(&keygen, None, None));
    for site in sites(&powerloss::syncs(&made.log).unwrap()) {
        let case = Case::new(&template, &work.join(format!("keygen-{}", caught.len())));
        assert!(case.run(&keygen, None, Some(&site)));
        let cut = case.power_cut();
        let kept = |name: &str, tag: &str| {
            std::fs::read_to_string(cut.join(name)).is_ok_and(|t| t.starts_with(tag))
        };
        if !(kept("fresh.key", "abide-secret-key") && kept("fresh.pub", "abide-public-key")) {
            caught.push(format!(
                "key generate, without {site}: cut at None: the new key did not survive"
            ));
            unnoticed.retain(|u| *u != site);
        }
    }
    std::panic::set_hook(hook);
    eprintln!("each deleted sync and the power cut that caught it:");
    for c in &caught {
        eprintln!("  {}", c.lines().next().unwrap_or(""));
    }
    assert!(
        unnoticed.is_empty(),
        "syncs whose deletion no power cut notices: {unnoticed:#?}"
    );
}

/// Runs the shell `script` in `dir` in a private mount namespace and insists it succeeds.
pub(crate) fn in_mount_namespace(dir: &Path, script: &str, what: &str) {
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script])
        .current_dir(dir)
        .output()
        .expect("unshare runs (scripts/deps)");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_to(template: &Path, dir: &Path) -> PathBuf {
    copy_dir(template, dir);
    dir.to_owned()
}

#[test]
fn kill_9_at_random_moments_converges() {
    let runs = if std::env::var_os("ABIDE_SLOW_TESTS").is_some() {
        200
    } else {
        20
    };
    let (sim, template, expect) = setup();
    // How long an install takes here, to spread the kills over it.
    let timing = copy_to(&template, &sim.path("timing"));
    let start = Instant::now();
    assert!(run(
        &timing,
        &["install", "2.0.0.abide", "--config", "dev/system.toml"],
        &[]
    ));
    let span = start.elapsed().as_micros() as u64 + 1;
    let mut rng = abide_testkit::SplitMix(99);
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..runs {
        let dir = copy_to(&template, &sim.path(&format!("kill-{i}")));
        let mut child = Command::new(ABIDE)
            .args(["install", "2.0.0.abide", "--config", "dev/system.toml"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Spread over the install and a quarter past it: run i in the i-th of `runs` equal
        // stretches, at a random moment inside it.
        let stretch = (span + span / 4) / runs;
        std::thread::sleep(Duration::from_micros(
            i * stretch + rng.next_u64() % stretch.max(1),
        ));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // Where the kill left the transaction, read from the files before the power-on.
        let left = json(&dir, "status --config dev/system.toml", 0)["state"]
            .as_str()
            .unwrap()
            .to_owned();
        let state = recover_and_check(&dir, expect, 0, false);
        let killed = if status.code().is_some() {
            "finished"
        } else {
            "killed"
        };
        *outcomes
            .entry(format!("{killed} in {left} → {state}"))
            .or_insert(0) += 1;
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("kill -9: {runs} runs over {span} µs installs, outcomes {outcomes:?}");
    // The kills reached into the install: some left a transaction part-way, which the
    // power-on then had to settle.
    let mid_install: u32 = outcomes
        .iter()
        .filter(|(k, _)| {
            k.starts_with("killed in downloading") || k.starts_with("killed in staged")
        })
        .map(|(_, n)| *n)
        .sum();
    assert!(
        mid_install >= 2,
        "no kill landed in the middle of an install: {outcomes:?}"
    );
}

#[test]
fn a_state_directory_filled_at_any_step_of_an_install_converges_without_a_hand() {
    let (sim, template, expect) = setup();
    let config = template.join("dev/system.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("state_reserve = \"1M\"\n{text}")).unwrap();
    let install = ["install", "2.0.0.abide", "--config", "dev/system.toml"];
    let points = trace(&copy_to(&template, &sim.path("fill-trace")), &install).len();
    assert!(points > 10, "{points} crash points");
    let mut outcomes = std::collections::BTreeMap::new();
    for (kind, k) in ["bytes", "inodes"]
        .into_iter()
        .flat_map(|kind| (0..points).map(move |k| (kind, k)))
    {
        let d = copy_to(&template, &sim.path(&format!("fill-{kind}-{k}")));
        // The state directory on a small file system of its own, filled (bytes, then inodes)
        // at the k-th durable step; then the power cycle that must settle it.
        let script = format!(
            "set -e; mkdir fs; mount -t tmpfs -o size=16m,nr_inodes=500 tmpfs fs; \
             cp -a dev/state/. fs/; mount --bind fs dev/state; \
             ABIDE_FILL={kind} ABIDE_FILL_AT={k} ABIDE_FILL_DIR=$PWD/dev/state {ABIDE} {} --json > out.json || true; \
             {ABIDE} sim reboot dev --json > reboot.json 2> reboot.err || echo $? > reboot.rc; \
             {ABIDE} status --config dev/system.toml --json > status.json; \
             {ABIDE} log verify --config dev/system.toml --json > verify.json || true",
            install.join(" ")
        );
        in_mount_namespace(&d, &script, &format!("{kind} filled at {k}"));
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        assert_eq!(
            read("reboot.rc"),
            "",
            "{kind} filled at {k}: the power cycle failed: {}",
            read("reboot.err")
        );
        let s: Value = serde_json::from_str(&read("status.json")).unwrap();
        let (state, booted) = (field(&s, "state"), field(&s, "booted"));
        assert_eq!(booted, field(&s, "good"), "{kind} filled at {k}: {s}");
        match state {
            "committed" => assert_eq!(
                (booted, field(&s, "version")),
                ("B", "2.0.0"),
                "{kind} filled at {k}: {s}"
            ),
            _ => assert_eq!(
                (booted, field(&s, "version")),
                ("A", "1.0.0"),
                "{kind} filled at {k}: {s}"
            ),
        }
        assert_eq!(
            slot_a(&d),
            expect.slot_a,
            "{kind} filled at {k}: the known-good group was written"
        );
        let verify: Value = serde_json::from_str(&read("verify.json")).unwrap_or(Value::Null);
        assert_eq!(verify["ok"], true, "{kind} filled at {k}: {verify}");
        *outcomes.entry(format!("{kind}: {state}")).or_insert(0) += 1;
        std::fs::remove_dir_all(&d).unwrap();
    }
    eprintln!("state directory filled at each of {points} points: {outcomes:?}");
}
