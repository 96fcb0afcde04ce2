//! The GPT backend on disk images made by `sgdisk` (gdisk): attributes read and written as
//! sgdisk sees them, CRCs kept right (`sgdisk -v`), a damaged primary table recovered from the
//! backup, and the ChromeOS firmware rule over the attributes agreeing with the reference rule
//! for every boot state.

use std::path::Path;
use std::process::Command;

use abide_boot::gpt::{GptPrio, GptTable};
use abide_boot::{BootState, Bootloader, GptBootloader};
use abide_core::{Action, Group};

fn g(name: &str) -> Group {
    Group::new(name).unwrap()
}

fn sgdisk(args: &[&str], disk: &Path) -> String {
    let out = Command::new("sgdisk")
        .args(args)
        .arg(disk)
        .output()
        .expect("sgdisk runs (scripts/deps installs gdisk)");
    assert!(
        out.status.success(),
        "sgdisk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A 20 MiB image with partitions abide-A and abide-B, A successful at priority 2.
fn disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    sgdisk(
        &[
            "-o",
            "-n",
            "1:2048:+4M",
            "-c",
            "1:abide-A",
            "-n",
            "2:0:+4M",
            "-c",
            "2:abide-B",
        ],
        &path,
    );
    sgdisk(&["-A", "1:set:56", "-A", "1:set:49"], &path);
    path
}

fn attributes(disk: &Path, n: u32) -> u64 {
    let info = sgdisk(&["-i", &n.to_string()], disk);
    let hex = info
        .lines()
        .find_map(|l| l.strip_prefix("Attribute flags: "))
        .expect("attribute flags");
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// The ChromeOS firmware rule on the partition attributes: the highest-priority partition that
/// is successful or has tries left; an unsuccessful one loses a try before it boots.
fn chromeos_boot(disk: &Path) -> Option<Group> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut table = GptTable::read(&file, disk).unwrap();
    let parts: Vec<(Group, usize)> = ["A", "B"]
        .iter()
        .map(|n| (g(n), table.find(&format!("abide-{n}")).unwrap()))
        .collect();
    let (group, index) = parts
        .iter()
        .filter(|(_, i)| table.attributes(*i).bootable())
        .max_by_key(|(_, i)| (table.attributes(*i).priority(), std::cmp::Reverse(*i)))?
        .clone();
    let p = table.attributes(index);
    if !p.successful() {
        table.set_attributes(index, p.with(p.priority(), p.tries() - 1, false));
        table.write(&file, disk).unwrap();
    }
    Some(group)
}

#[test]
fn attributes_as_sgdisk_sees_them_and_a_valid_table_after_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    let cmdline = dir.path().join("cmdline");
    std::fs::write(&cmdline, "root=PARTUUID=x abide.group=A quiet").unwrap();
    let gpt = GptBootloader::new(&disk, &cmdline, &[g("A"), g("B")]);
    let s = gpt.load().unwrap();
    assert_eq!(
        (s.good(), s.booted.as_ref()),
        (Some(&g("A")), Some(&g("A")))
    );
    let mut s = s;
    s.apply(&Action::MarkUnbootable { group: g("B") }).unwrap();
    gpt.store(&s).unwrap();
    assert_eq!(GptPrio(attributes(&disk, 2)).priority(), 0);
    s.apply(&Action::TryNext {
        group: g("B"),
        tries: 2,
    })
    .unwrap();
    gpt.store(&s).unwrap();
    let b = GptPrio(attributes(&disk, 2));
    assert_eq!((b.priority(), b.tries(), b.successful()), (15, 2, false));
    assert!(
        sgdisk(&["-v"], &disk).contains("No problems found"),
        "{}",
        sgdisk(&["-v"], &disk)
    );
    assert_eq!(gpt.load().unwrap().trial, Some((g("B"), 2)));
    s.apply(&Action::MarkGood { group: g("B") }).unwrap();
    gpt.store(&s).unwrap();
    let (a, b) = (GptPrio(attributes(&disk, 1)), GptPrio(attributes(&disk, 2)));
    assert_eq!(
        (b.priority(), b.successful(), a.priority(), a.successful()),
        (2, true, 1, true)
    );
    assert!(sgdisk(&["-v"], &disk).contains("No problems found"));
    assert_eq!(gpt.load().unwrap().good(), Some(&g("B")));
}

#[test]
fn a_damaged_primary_table_is_read_from_the_backup_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    let gpt = GptBootloader::new(&disk, &dir.path().join("none"), &[g("A"), g("B")]);
    let before = gpt.load().unwrap();
    // A power loss in the middle of writing the primary header.
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[512 + 40] ^= 0xff;
    std::fs::write(&disk, &bytes).unwrap();
    assert_eq!(gpt.load().unwrap(), before);
    gpt.store(&before).unwrap();
    assert!(
        sgdisk(&["-v"], &disk).contains("No problems found"),
        "{}",
        sgdisk(&["-v"], &disk)
    );
}

#[test]
fn the_chromeos_rule_on_the_attributes_chooses_as_the_reference_rule() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(dir.path());
    let cmdline = dir.path().join("cmdline");
    let gpt = GptBootloader::new(&disk, &cmdline, &[g("A"), g("B")]);
    let mut checked = 0;
    for order in [[g("A"), g("B")], [g("B"), g("A")]] {
        for (a_ok, b_ok) in [(true, true), (true, false), (false, true)] {
            for trial in [None, Some(("A", 1)), Some(("B", 1)), Some(("B", 3))] {
                let mut state = BootState::new(&order);
                state.bootable.insert(g("A"), a_ok);
                state.bootable.insert(g("B"), b_ok);
                state.trial = trial.map(|(t, n)| (g(t), n));
                if state
                    .trial
                    .as_ref()
                    .is_some_and(|(t, _)| !state.bootable[t] || Some(t) == state.good())
                {
                    continue;
                }
                gpt.store(&state).unwrap();
                let chosen = chromeos_boot(&disk);
                let mut reference = state.clone();
                let want = reference.firmware_select();
                assert_eq!(chosen, want, "choice for {state:?}");
                std::fs::write(
                    &cmdline,
                    format!("abide.group={}", chosen.as_ref().map_or("", Group::as_str)),
                )
                .unwrap();
                let after = gpt.load().unwrap();
                assert_eq!(
                    after.trial, reference.trial,
                    "trial after booting from {state:?}"
                );
                assert_eq!(
                    after.good(),
                    reference.good(),
                    "known-good after booting from {state:?}"
                );
                checked += 1;
            }
        }
    }
    // 2 orders × 3 bootable combinations × 4 trial settings, less trials of an unbootable or
    // of the known-good group.
    assert_eq!(checked, 9, "every state the engine can make");
}
