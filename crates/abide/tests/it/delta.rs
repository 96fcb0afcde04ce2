//! `abide delta create` and `abide install` of a delta on a simulated device: the new release
//! lands byte for byte from a small file, and a device that does not run the release the delta
//! was made from refuses it before anything changes.

use crate::device::{Sim, field};
use crate::{json, ok};

/// Bundles 2.0.0 and 3.0.0 of one image with a rebuilt stretch and an insertion, and 1.5.0 of
/// unrelated content; returns 3.0.0's image.
fn releases(sim: &Sim) -> Vec<u8> {
    let v2 = abide_testkit::image(2_000_000, 40);
    let mut v3 = v2.clone();
    for b in v3[500_000..800_000].iter_mut().step_by(61) {
        *b = b.wrapping_add(3);
    }
    v3.splice(1_200_000..1_200_000, b"a few bytes more".iter().copied());
    std::fs::write(sim.path("v2.img"), &v2).unwrap();
    std::fs::write(sim.path("v3.img"), &v3).unwrap();
    std::fs::write(sim.path("other.img"), abide_testkit::image(2_000_000, 41)).unwrap();
    for (v, img) in [
        ("2.0.0", "v2.img"),
        ("3.0.0", "v3.img"),
        ("1.5.0", "other.img"),
    ] {
        ok(
            &sim.dir,
            &format!(
                "bundle create --product gw --version {v} --compatible gw-1 --component rootfs={img} --sign a.key --out {v}.abide"
            ),
        );
    }
    v3
}

#[test]
fn a_delta_installs_the_new_release_byte_for_byte_and_a_device_running_another_refuses_it_untouched()
 {
    let sim = Sim::new(None);
    let v3 = releases(&sim);
    let made = json(
        &sim.dir,
        "delta create --from 2.0.0.abide --to 3.0.0.abide --out d.abide",
        0,
    );
    let full = std::fs::metadata(sim.path("3.0.0.abide")).unwrap().len();
    let size = std::fs::metadata(sim.path("d.abide")).unwrap().len();
    assert_eq!(made["size"], size);
    assert_eq!(made["full_size"], full);
    assert!(made["patches"].as_u64().unwrap() > 0, "{made}");
    assert!(
        size * 8 < full,
        "the delta is {size} bytes, the bundle {full}"
    );
    let not_a_bundle = json(&sim.dir, "bundle verify d.abide --trust trust.json", 1);
    assert!(
        not_a_bundle["error"]["message"]
            .as_str()
            .unwrap()
            .contains("an Abide delta, not a bundle"),
        "{not_a_bundle}"
    );
    let info = json(&sim.dir, "delta info d.abide", 0);
    assert_eq!(info["from"]["version"], "2.0.0", "{info}");
    assert_eq!(info["to"]["version"], "3.0.0", "{info}");
    assert_eq!(info["components"][0]["name"], "rootfs", "{info}");

    // The device runs 1.0.0 (no content of 2.0.0): refused before anything changes, and the
    // refusal is in the audit log.
    let before = sim.fingerprint();
    let refused = json(&sim.dir, "install d.abide --config dev/system.toml", 1);
    assert_eq!(refused["error"]["code"], "delta-base", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2.0.0"),
        "{refused}"
    );
    assert_eq!(sim.fingerprint(), before);
    let log = std::fs::read_to_string(sim.path("dev/state/audit.log")).unwrap();
    assert!(log.contains("delta-base"), "{log}");

    // Running 1.5.0 (other content, a chunk index of its own): refused the same way.
    json(&sim.dir, "install 1.5.0.abide --config dev/system.toml", 0);
    json(&sim.dir, "sim reboot dev", 0);
    let before = sim.fingerprint();
    let refused = json(&sim.dir, "install d.abide --config dev/system.toml", 1);
    assert_eq!(refused["error"]["code"], "delta-base", "{refused}");
    assert_eq!(sim.fingerprint(), before);

    // Running 2.0.0: the delta installs, the trial commits, and the slot is 3.0.0's image.
    json(&sim.dir, "install 2.0.0.abide --config dev/system.toml", 0);
    json(&sim.dir, "sim reboot dev", 0);
    let done = json(&sim.dir, "install d.abide --config dev/system.toml", 0);
    assert_eq!(done["bundle_bytes_read"], size, "{done}");
    assert!(
        done["reused_bytes"].as_u64().unwrap() > v3.len() as u64 / 2,
        "{done}"
    );
    let target = field(&done, "target").to_owned();
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(
        (field(&v["status"], "state"), field(&v["status"], "booted")),
        ("committed", target.as_str())
    );
    assert_eq!(sim.status()["version"], "3.0.0");
    let slot = std::fs::read(sim.path(&format!("dev/slots/rootfs.{target}.img"))).unwrap();
    assert_eq!(&slot[..v3.len()], &v3[..]);
}

#[test]
fn a_delta_passes_the_paranoid_checks_and_a_damaged_one_fails_the_transaction_with_the_target_unbootable()
 {
    let sim = Sim::new(None);
    let v3 = releases(&sim);
    ok(
        &sim.dir,
        "delta create --from 2.0.0.abide --to 3.0.0.abide --out d.abide --level 3",
    );
    json(&sim.dir, "install 2.0.0.abide --config dev/system.toml", 0);
    json(&sim.dir, "sim reboot dev", 0);
    // One byte of the last patch frame changed: the patch's output no longer matches the
    // signed chunk names, the transaction fails and the known-good group runs on.
    let mut damaged = std::fs::read(sim.path("d.abide")).unwrap();
    let at = damaged.len() - 20;
    damaged[at] ^= 0x01;
    std::fs::write(sim.path("bad.abide"), &damaged).unwrap();
    // `abide delta verify` checks the layout alone, or with --from every chunk it makes.
    let ok_layout = json(&sim.dir, "delta verify d.abide --trust trust.json", 0);
    assert_eq!(
        (
            ok_layout["checked"].as_str(),
            ok_layout["to_version"].as_str()
        ),
        (Some("layout"), Some("3.0.0"))
    );
    let applied = json(
        &sim.dir,
        "delta verify d.abide --trust trust.json --from 2.0.0.abide",
        0,
    );
    assert_eq!(applied["checked"], "applied", "{applied}");
    let other = json(
        &sim.dir,
        "delta verify d.abide --trust trust.json --from 1.5.0.abide",
        1,
    );
    assert_eq!(other["error"]["code"], "delta-base", "{other}");
    json(&sim.dir, "delta verify bad.abide --trust trust.json", 0);
    let bad = json(
        &sim.dir,
        "delta verify bad.abide --trust trust.json --from 2.0.0.abide",
        1,
    );
    let code = bad["error"]["code"].as_str().unwrap();
    assert!(code == "chunk-digest" || code == "chunk-corrupt", "{bad}");
    assert!(
        crate::leftovers(&sim.dir, "")
            .iter()
            .all(|f| !f.contains("spool"))
    );
    let failed = json(&sim.dir, "install bad.abide --config dev/system.toml", 1);
    let code = failed["error"]["code"].as_str().unwrap();
    assert!(
        code == "chunk-digest" || code == "chunk-corrupt",
        "{failed}"
    );
    let status = sim.status();
    assert_eq!(status["version"], "2.0.0", "{status}");
    let v = json(&sim.dir, "sim reboot dev", 0);
    assert_eq!(field(&v["status"], "version"), "2.0.0", "{v}");
    // The intact delta, with every hash checked.
    let done = json(
        &sim.dir,
        "install d.abide --paranoid --config dev/system.toml",
        0,
    );
    let target = field(&done, "target").to_owned();
    json(&sim.dir, "sim reboot dev", 0);
    let slot = std::fs::read(sim.path(&format!("dev/slots/rootfs.{target}.img"))).unwrap();
    assert_eq!(&slot[..v3.len()], &v3[..]);
}

#[test]
fn a_delta_for_a_directory_slot_is_refused_before_anything_changes() {
    let sim = Sim::new(None);
    let config = std::fs::read_to_string(sim.path("dev/system.toml")).unwrap();
    let with_app = ["A", "B"].iter().fold(config.clone(), |c, g| {
        c.replace(
            &format!("path = \"slots/rootfs.{g}.img\"\n"),
            &format!(
                "path = \"slots/rootfs.{g}.img\"\n[[group.slot]]\nclass = \"app\"\nkind = \"dir\"\npath = \"apps/{g}\"\n"
            ),
        )
    });
    assert_ne!(with_app, config);
    std::fs::write(sim.path("dev/system.toml"), with_app).unwrap();
    std::fs::write(sim.path("root.img"), abide_testkit::image(500_000, 8)).unwrap();
    for v in ["2.0.0", "3.0.0"] {
        let made = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import tarfile, io\nwith tarfile.open('app-{v}.tar', 'w') as t:\n    i = tarfile.TarInfo('bin/app'); d = b'app {v}' * 1000; i.size = len(d); t.addfile(i, io.BytesIO(d))\n"
            ))
            .current_dir(&sim.dir)
            .status()
            .unwrap();
        assert!(made.success());
        ok(
            &sim.dir,
            &format!(
                "bundle create --product gw --version {v} --compatible gw-1 --component rootfs=root.img \
                 --component app=app-{v}.tar,kind=app,slot=app --sign a.key --out {v}.abide"
            ),
        );
    }
    json(&sim.dir, "install 2.0.0.abide --config dev/system.toml", 0);
    json(&sim.dir, "sim reboot dev", 0);
    ok(
        &sim.dir,
        "delta create --from 2.0.0.abide --to 3.0.0.abide --out d.abide",
    );
    let before = sim.fingerprint();
    let refused = json(&sim.dir, "install d.abide --config dev/system.toml", 1);
    assert_eq!(refused["error"]["code"], "delta-base", "{refused}");
    assert!(
        field(&refused["error"], "message").contains("directory slot"),
        "{refused}"
    );
    assert_eq!(sim.fingerprint(), before);
}
