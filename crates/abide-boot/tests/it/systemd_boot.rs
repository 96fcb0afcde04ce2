//! The systemd-boot backend on an ESP directory: `bootctl` (systemd-boot's own tool, run on a
//! bind mount in a private mount namespace) lists the entries with the counters and the default
//! the backend meant; systemd-boot's rule on the file names (bad entries last, ids in
//! descending version order, a try taken by a rename before the boot) chooses as the reference
//! rule for every state the engine makes; a power loss between two renames leaves the old
//! choice or the new one; broken set-ups are refused without a rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use abide_boot::systemd_boot::EntryName;
use abide_boot::{BootState, Bootloader, SystemdBootBootloader};
use abide_core::{Action, Group};

fn g(name: &str) -> Group {
    Group::new(name).unwrap()
}

/// An ESP with loader.conf, A's entry known-good and B's a fallback, and their kernels.
fn esp(dir: &Path) -> PathBuf {
    let esp = dir.join("esp");
    std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
    std::fs::write(
        esp.join("loader/loader.conf"),
        "timeout 0\ndefault abide-*\n",
    )
    .unwrap();
    for (group, rank) in [("A", 2), ("B", 1)] {
        std::fs::create_dir_all(esp.join(group)).unwrap();
        std::fs::write(esp.join(group).join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(
            esp.join(format!("loader/entries/abide-{rank}-{group}.conf")),
            format!(
                "title Abide {group}\nlinux /{group}/vmlinuz\noptions root=PARTLABEL=rootfs-{group} abide.group={group} quiet\n"
            ),
        )
        .unwrap();
    }
    // An entry of another system, which `default abide-*` keeps out of the choice.
    std::fs::write(
        esp.join("loader/entries/zz-rescue.conf"),
        "title Rescue\nlinux /A/vmlinuz\noptions rescue\n",
    )
    .unwrap();
    esp
}

fn listing(esp: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(esp.join("loader/entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// What `bootctl list` says: per entry its `abide.group`, tries left (if counted), and which
/// one is the default.
#[derive(Debug, PartialEq)]
struct Listed {
    default: Option<Group>,
    tries: BTreeMap<Group, Option<u32>>,
}

fn bootctl(esp: &Path) -> Listed {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$1" && exec bootctl --esp-path="$1" --boot-path="$1" list --no-pager"#)
        .arg("sh")
        .arg(esp)
        .env("SYSTEMD_RELAX_ESP_CHECKS", "1")
        .output()
        .expect("unshare and bootctl run (scripts/deps installs systemd-boot)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bootctl list: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listed = Listed {
        default: None,
        tries: BTreeMap::new(),
    };
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
        };
        let Some(group) = field("options").and_then(|o| {
            o.split_whitespace()
                .find_map(|w| w.strip_prefix("abide.group="))
        }) else {
            continue;
        };
        let tries = field("tries").map(|t| {
            t.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("tries: N left")
        });
        if field("title").is_some_and(|t| t.contains("(default)")) {
            assert_eq!(listed.default, None, "one default: {text}");
            listed.default = Some(g(group));
        }
        listed.tries.insert(g(group), tries);
    }
    listed
}

/// The counter in an entry file name: `NAME+LEFT[-DONE].conf`.
fn counter(file: &str) -> (String, Option<(u32, u32)>) {
    let stem = file.strip_suffix(".conf").unwrap();
    match stem.rsplit_once('+') {
        None => (stem.to_owned(), None),
        Some((id, c)) => {
            let (l, d) = c.split_once('-').unwrap_or((c, "0"));
            (
                id.to_owned(),
                Some((l.parse().unwrap(), d.parse().unwrap())),
            )
        }
    }
}

/// Version comparison of entry ids as systemd-boot does it for these names: runs of digits by
/// value, everything else byte by byte, case-insensitively.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.to_ascii_lowercase().chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, run)) if *d == digit => run.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    }
    for (x, y) in parts(a).iter().zip(parts(b).iter()) {
        let ord = match (x.0 && y.0, x, y) {
            (true, x, y) => x.1.parse::<u64>().unwrap().cmp(&y.1.parse().unwrap()),
            (false, x, y) => x.1.cmp(&y.1),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    parts(a).len().cmp(&parts(b).len())
}

/// An entry file: its name, its id (the name without counter and suffix), its counter.
type EntryFile = (String, String, Option<(u32, u32)>);

/// systemd-boot at power-on: among the entries matching `abide-*`, bad ones (no tries left)
/// sorted last and the rest by id in descending version order, the first is booted; one with
/// tries left is renamed with a try taken before it starts. The kernel command line of the
/// booted entry is written to `cmdline`.
fn sd_boot_power_on(esp: &Path, cmdline: &Path) -> Option<Group> {
    let dir = esp.join("loader/entries");
    let mut entries: Vec<EntryFile> = listing(esp)
        .into_iter()
        .filter(|f| f.starts_with("abide-"))
        .map(|f| {
            let (id, c) = counter(&f);
            (f, id, c)
        })
        .collect();
    entries.sort_by(|x, y| {
        let bad = |c: &Option<(u32, u32)>| matches!(c, Some((0, _)));
        bad(&x.2)
            .cmp(&bad(&y.2))
            .then_with(|| version_cmp(&y.1, &x.1))
    });
    let (file, id, count) = entries.first()?.clone();
    let mut booted = dir.join(&file);
    if let Some((left, done)) = count.filter(|(l, _)| *l > 0) {
        let renamed = dir.join(format!("{id}+{}-{}.conf", left - 1, done + 1));
        std::fs::rename(&booted, &renamed).unwrap();
        booted = renamed;
    }
    let options = std::fs::read_to_string(&booted)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("options ").map(str::to_owned))
        .unwrap();
    std::fs::write(cmdline, &options).unwrap();
    options
        .split_whitespace()
        .find_map(|w| w.strip_prefix("abide.group="))
        .map(g)
}

/// The states the engine makes: a known-good group, and no trial or a trial of another
/// bootable group.
fn engine_states() -> Vec<BootState> {
    crate::engine_states()
        .into_iter()
        .filter(|s| s.good().is_some() && s.trial.as_ref().is_none_or(|(t, _)| Some(t) != s.good()))
        .collect()
}

#[test]
fn entry_names_read_and_write_as_systemd_boot_counts() {
    for (file, rank, group, count) in [
        ("abide-2-A.conf", 2, "A", None),
        ("abide-3-B+3.conf", 3, "B", Some((3, 0))),
        ("abide-3-B+2-1.conf", 3, "B", Some((2, 1))),
        ("abide-0-B+0.conf", 0, "B", Some((0, 0))),
        ("abide-0-long-name+0-12.conf", 0, "long-name", Some((0, 12))),
    ] {
        let e = EntryName::parse(file).unwrap_or_else(|| panic!("{file}"));
        assert_eq!(
            (e.rank, e.group.as_str(), e.counter),
            (rank, group, count),
            "{file}"
        );
        assert_eq!(e.file_name(), file);
    }
    for file in [
        "abide-A.conf",
        "abide-22-A.conf",
        "abide-x-A.conf",
        "abide-2-A+.conf",
        "abide-2-A+1-.conf",
        "abide-2-A+x.conf",
        "abide-2-A",
        "other-2-A.conf",
        "abide-2-../x.conf",
    ] {
        assert_eq!(EntryName::parse(file), None, "{file}");
    }
}

#[test]
fn bootctl_lists_the_counters_and_the_default_the_backend_meant() {
    let dir = tempfile::tempdir().unwrap();
    let esp = esp(dir.path());
    let cmdline = dir.path().join("cmdline");
    std::fs::write(&cmdline, "abide.group=A").unwrap();
    let sd = SystemdBootBootloader::new(&esp, &cmdline, &[g("A"), g("B")]);
    let s = sd.load().unwrap();
    assert_eq!((s.good(), s.booted.clone()), (Some(&g("A")), Some(g("A"))));
    assert_eq!(bootctl(&esp).default, Some(g("A")));
    let mut checked = 0;
    for state in engine_states() {
        sd.store(&state).unwrap();
        let listed = bootctl(&esp);
        let mut reference = state.clone();
        let want = reference.firmware_select();
        assert_eq!(listed.default, want, "bootctl's default for {state:?}");
        for group in [g("A"), g("B")] {
            let tries = match &state.trial {
                Some((t, n)) if *t == group => Some(u32::from(*n)),
                _ if !state.bootable[&group] => Some(0),
                _ => None,
            };
            assert_eq!(listed.tries[&group], tries, "{group} in {state:?}");
        }
        let chosen = sd_boot_power_on(&esp, &cmdline);
        assert_eq!(chosen, want, "systemd-boot's choice for {state:?}");
        let after = sd.load().unwrap();
        assert_eq!(
            after.trial, reference.trial,
            "trial after booting {state:?}"
        );
        assert_eq!(
            after.good(),
            reference.good(),
            "good after booting {state:?}"
        );
        assert_eq!(after.booted, reference.booted);
        checked += 1;
    }
    // 2 orders × (4 trial settings with both bootable + 1 with one bootable × 2).
    assert_eq!(checked, 12, "every state the engine makes");
}

#[test]
fn trial_fallback_and_commit_under_systemd_boots_rule() {
    let dir = tempfile::tempdir().unwrap();
    let esp = esp(dir.path());
    let cmdline = dir.path().join("cmdline");
    let sd = SystemdBootBootloader::new(&esp, &cmdline, &[g("A"), g("B")]);
    let power_on = |b: &dyn Bootloader| {
        assert_eq!(b.name(), "systemd-boot");
        sd_boot_power_on(&esp, &cmdline)
    };
    crate::backends::round_trip(&sd, &power_on);
    // The committed B is the only entry without a counter besides the fallback A.
    let names = listing(&esp);
    assert!(names.contains(&"abide-2-B.conf".to_owned()), "{names:?}");
    assert!(names.contains(&"abide-1-A.conf".to_owned()), "{names:?}");
}

#[test]
fn a_power_loss_between_renames_leaves_the_old_choice_or_the_new() {
    let actions = [
        Action::MarkUnbootable { group: g("A") },
        Action::MarkUnbootable { group: g("B") },
        Action::TryNext {
            group: g("A"),
            tries: 2,
        },
        Action::TryNext {
            group: g("B"),
            tries: 3,
        },
        Action::MarkGood { group: g("A") },
        Action::MarkGood { group: g("B") },
    ];
    let mut steps = 0;
    for old in engine_states() {
        for action in &actions {
            let mut new = old.clone();
            new.apply(action).unwrap();
            // The engine never leaves no group to boot, nor puts the known-good group on trial.
            if new.good().is_none()
                || new
                    .trial
                    .as_ref()
                    .is_some_and(|(t, _)| Some(t) == new.good())
            {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let esp = esp(dir.path());
            let cmdline = dir.path().join("cmdline");
            let sd = SystemdBootBootloader::new(&esp, &cmdline, &[g("A"), g("B")]);
            sd.store(&old).unwrap();
            let outcome = |s: &BootState| {
                let mut s = s.clone();
                let good = s.good().cloned();
                (s.firmware_select(), good)
            };
            let (was, will) = (outcome(&sd.load().unwrap()), outcome(&new));
            let plan = SystemdBootBootloader::plan(&sd.entries().unwrap(), &new);
            for (from, to) in plan {
                let entries = esp.join("loader/entries");
                std::fs::rename(entries.join(from.file_name()), entries.join(to.file_name()))
                    .unwrap();
                let now = outcome(&sd.load().unwrap());
                assert!(
                    now == was || now == will,
                    "{action:?} from {old:?}: after renaming {} to {} the choice is {now:?}, \
                     neither {was:?} nor {will:?}",
                    from.file_name(),
                    to.file_name()
                );
                steps += 1;
            }
            assert_eq!(
                outcome(&sd.load().unwrap()),
                will,
                "{action:?} from {old:?}"
            );
        }
    }
    assert!(steps > 40, "renames checked: {steps}");
}

/// A change to the ESP (breaking it, or mending it).
type Edit<'a> = Box<dyn Fn() + 'a>;

#[test]
fn broken_set_ups_are_refused_and_nothing_is_renamed() {
    let dir = tempfile::tempdir().unwrap();
    let esp = esp(dir.path());
    let cmdline = dir.path().join("cmdline");
    let sd = SystemdBootBootloader::new(&esp, &cmdline, &[g("A"), g("B")]);
    let mut trial = sd.load().unwrap();
    trial
        .apply(&Action::TryNext {
            group: g("B"),
            tries: 3,
        })
        .unwrap();
    let conf = esp.join("loader/loader.conf");
    let entries = esp.join("loader/entries");
    let cases: Vec<(&str, Edit, Edit)> = vec![
        (
            "found `default debian-*`",
            Box::new(|| std::fs::write(&conf, "default debian-*\n").unwrap()),
            Box::new(|| std::fs::write(&conf, "default abide-*\n").unwrap()),
        ),
        (
            "found no default line",
            Box::new(|| std::fs::write(&conf, "timeout 3\n").unwrap()),
            Box::new(|| std::fs::write(&conf, "default abide-*\n").unwrap()),
        ),
        (
            "must carry `abide.group=B`",
            Box::new(|| {
                std::fs::write(entries.join("abide-1-B.conf"), "options abide.group=A\n").unwrap()
            }),
            Box::new(|| {
                std::fs::write(entries.join("abide-1-B.conf"), "options abide.group=B\n").unwrap()
            }),
        ),
        (
            "two entries for group A",
            Box::new(|| {
                std::fs::write(entries.join("abide-0-A+0.conf"), "options abide.group=A\n").unwrap()
            }),
            Box::new(|| std::fs::remove_file(entries.join("abide-0-A+0.conf")).unwrap()),
        ),
        (
            "no entry for group B",
            Box::new(|| {
                std::fs::rename(entries.join("abide-1-B.conf"), entries.join("B.conf")).unwrap()
            }),
            Box::new(|| {
                std::fs::rename(entries.join("B.conf"), entries.join("abide-1-B.conf")).unwrap()
            }),
        ),
    ];
    for (message, break_it, mend) in cases {
        break_it();
        let before = listing(&esp);
        let load = sd.load().unwrap_err().to_string();
        let store = sd.store(&trial).unwrap_err().to_string();
        assert!(load.contains(message), "{message}: {load}");
        assert!(store.contains(message), "{message}: {store}");
        assert_eq!(listing(&esp), before, "{message}: nothing renamed");
        mend();
    }
    sd.store(&trial).unwrap();
    assert_eq!(sd.load().unwrap().trial, Some((g("B"), 3)));
}

/// A power cut during a rename on FAT can leave the new name written before the file's size:
/// an empty entry beside the old one. systemd-boot skips it (no `linux` line); so does Abide,
/// and its next store removes it.
#[test]
fn an_empty_entry_left_by_an_interrupted_rename_is_skipped_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let esp = esp(dir.path());
    let cmdline = dir.path().join("cmdline");
    let sd = SystemdBootBootloader::new(&esp, &cmdline, &[g("A"), g("B")]);
    let before = sd.load().unwrap();
    let entries = esp.join("loader/entries");
    std::fs::write(entries.join("abide-3-B+1.conf"), "").unwrap();
    assert_eq!(
        sd.load().unwrap(),
        before,
        "the empty entry changes nothing"
    );
    let mut trial = before.clone();
    trial
        .apply(&Action::TryNext {
            group: g("B"),
            tries: 1,
        })
        .unwrap();
    sd.store(&trial).unwrap();
    assert_eq!(
        listing(&esp),
        ["abide-2-A.conf", "abide-3-B+1.conf", "zz-rescue.conf"]
    );
    assert!(
        std::fs::read_to_string(entries.join("abide-3-B+1.conf"))
            .unwrap()
            .contains("abide.group=B"),
        "the renamed entry, not the empty leftover"
    );
    assert_eq!(sd.load().unwrap().trial, Some((g("B"), 1)));
}
