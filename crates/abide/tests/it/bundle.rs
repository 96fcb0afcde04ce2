//! Bundles through the command line: the round trip, threshold signing, and every attack of
//! the corpus refused with its code and nothing left behind.

use std::io::Write;
use std::process::{Command, Stdio};

use abide_testkit::corpus::{COMPATIBLE, MIN_SECURITY_VERSION, attacks, policy_inputs};

use crate::{abide, abide_args, json, json_args, leftovers, ok, workspace};

#[test]
fn create_verify_info_sign_extract_round_trip() {
    let (_tmp, dir) = workspace();
    let rootfs = abide_testkit::image(3 << 20, 11);
    let app = abide_testkit::image(100_000, 12);
    std::fs::write(dir.join("rootfs.img"), &rootfs).unwrap();
    std::fs::write(dir.join("app,v2.img"), &app).unwrap();
    let v = json(
        &dir,
        "bundle create --product acme-gw --version 2.1.0 --security-version 3 --compatible acme-gw-1 --component rootfs=rootfs.img --component app=app,v2.img,kind=app,slot=appfs --sign a.key --out r.abide",
        0,
    );
    let m = &v["manifest"];
    assert_eq!(m["version"], "2.1.0");
    assert_eq!(m["security_version"], 3);
    assert_eq!(m["components"][0]["kind"], "rootfs");
    assert_eq!(m["components"][0]["slot_class"], "rootfs");
    assert_eq!(m["components"][1]["kind"], "app");
    assert_eq!(m["components"][1]["slot_class"], "appfs");
    assert_eq!(m["components"][1]["size"], app.len() as u64);
    assert_eq!(
        m["components"][0]["digest"],
        abide_bundle::Digest::of(&rootfs).to_hex()
    );

    let v = json(
        &dir,
        "bundle verify r.abide --trust trust.json --compatible acme-gw-1",
        0,
    );
    assert_eq!(v["ok"], true);
    assert_eq!(v["signers"].as_array().unwrap().len(), 1);
    let v = json(&dir, "bundle info r.abide", 0);
    assert_eq!(v["manifest"]["product"], "acme-gw");
    assert_eq!(v["signatures"].as_array().unwrap().len(), 1);

    // Threshold 2: a second person adds a signature.
    ok(
        &dir,
        "trust init --key a.pub --key b.pub --threshold 2 --sign a.key --sign b.key --out t2.json",
    );
    assert_eq!(
        json(&dir, "bundle verify r.abide --trust t2.json", 1)["error"]["code"],
        "signature-threshold"
    );
    ok(&dir, "bundle sign r.abide --key b.key");
    json(&dir, "bundle verify r.abide --trust t2.json", 0);
    assert_eq!(
        json(&dir, "bundle sign r.abide --key b.key", 1)["error"]["code"],
        "duplicate-signature"
    );

    let v = json(
        &dir,
        "bundle extract r.abide --trust t2.json --component app --out app.out",
        0,
    );
    assert_eq!(v["size"], app.len() as u64);
    assert_eq!(std::fs::read(dir.join("app.out")).unwrap(), app);
    ok(
        &dir,
        "bundle extract r.abide --trust t2.json --component rootfs --out rootfs.out",
    );
    assert_eq!(std::fs::read(dir.join("rootfs.out")).unwrap(), rootfs);
    let v = json(
        &dir,
        "bundle extract r.abide --trust t2.json --component kernel --out k.out",
        1,
    );
    assert_eq!(v["error"]["code"], "unknown-component");

    // Policy failures through the flags.
    let v = json(
        &dir,
        "bundle verify r.abide --trust t2.json --compatible other",
        1,
    );
    assert_eq!(v["error"]["code"], "incompatible");
    let v = json(
        &dir,
        "bundle verify r.abide --trust t2.json --min-security-version 4",
        1,
    );
    assert_eq!(v["error"]["code"], "downgrade");
}

#[test]
fn verify_reads_a_stream_from_standard_input() {
    let (_tmp, dir) = workspace();
    std::fs::write(dir.join("img"), abide_testkit::image(500_000, 3)).unwrap();
    ok(
        &dir,
        "bundle create --product p --version 1.0.0 --component rootfs=img --sign a.key --out s.abide",
    );
    let bytes = std::fs::read(dir.join("s.abide")).unwrap();
    for (input, code) in [
        (bytes.clone(), Some(0)),
        (bytes[..bytes.len() - 3].to_vec(), Some(1)),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_abide"))
            .args(["bundle", "verify", "-", "--trust", "trust.json"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            code,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_is_written() {
    let (_tmp, dir) = workspace();
    std::fs::write(dir.join("img"), b"x").unwrap();
    for (args, code) in [
        (vec!["--component", "../x=img"], "bad-name"),
        (vec!["--component", "rootfs=img,slot=a/b"], "bad-name"),
        (
            vec!["--component", "rootfs=img", "--product", "a b"],
            "bad-name",
        ),
        (
            vec!["--component", "rootfs=img", "--compatible", "x/y"],
            "bad-name",
        ),
    ] {
        let mut all = vec![
            "bundle",
            "create",
            "--version",
            "1.0.0",
            "--sign",
            "a.key",
            "--out",
            "x.abide",
        ];
        if !args.contains(&"--product") {
            all.extend(["--product", "p"]);
        }
        all.extend(args.iter());
        assert_eq!(json_args(&dir, &all, 1)["error"]["code"], code, "{all:?}");
        assert!(leftovers(&dir, "a.key a.pub b.key b.pub c.key c.pub trust.json img").is_empty());
    }
    let out = abide(
        &dir,
        "bundle create --product p --version one --component rootfs=img --sign a.key --out x.abide",
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SemVer"));
    assert!(!dir.join("x.abide").exists());
    for size in ["100K", "512K", "128", "lots"] {
        let out = abide(
            &dir,
            &format!(
                "bundle create --product p --version 1.0.0 --component rootfs=img --sign a.key --chunk-size {size} --out x.abide"
            ),
        );
        assert_eq!(out.status.code(), Some(3), "--chunk-size {size}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--chunk-size"),
            "--chunk-size {size}"
        );
        assert!(!dir.join("x.abide").exists());
    }
}

#[test]
fn the_chunk_size_is_chosen_at_create_and_recorded_in_the_manifest() {
    let (_tmp, dir) = workspace();
    std::fs::write(dir.join("img"), abide_testkit::image(4 << 20, 5)).unwrap();
    let mut counts = Vec::new();
    for (size, avg) in [("64K", 65536), ("256K", 262144)] {
        let v = json(
            &dir,
            &format!(
                "bundle create --product p --version 1.0.0 --component rootfs=img --sign a.key --chunk-size {size} --out {size}.abide"
            ),
            0,
        );
        let c = &v["manifest"]["components"][0];
        assert_eq!(
            (
                &c["chunking"]["min_size"],
                &c["chunking"]["avg_size"],
                &c["chunking"]["max_size"]
            ),
            (
                &serde_json::json!(avg / 4),
                &serde_json::json!(avg),
                &serde_json::json!(avg * 4)
            ),
            "{c}"
        );
        counts.push(c["chunk_table"]["count"].as_u64().unwrap());
        json(
            &dir,
            &format!("bundle verify {size}.abide --trust trust.json"),
            0,
        );
    }
    assert!(
        counts[1] * 2 < counts[0],
        "chunks at 64K and 256K: {counts:?}"
    );
}

#[test]
fn every_corpus_attack_is_refused_by_verify_and_extract_leaves_nothing() {
    // (A writer's bug — content that does not hash to its chunk's name — only with --paranoid.)
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for threshold in [1, 2] {
        let root = abide_testkit::trust(&[0, 1], threshold);
        std::fs::write(
            dir.join(format!("trust{threshold}.json")),
            root.to_file_bytes().unwrap(),
        )
        .unwrap();
    }
    let min = MIN_SECURITY_VERSION.to_string();
    let mut wrong = Vec::new();
    let attacks = attacks();
    for attack in &attacks {
        let (_, threshold) = policy_inputs(attack);
        let file = format!("{}.abide", attack.name);
        std::fs::write(dir.join(&file), &attack.bytes).unwrap();
        let trust = format!("trust{threshold}.json");
        let policy = [
            "--trust",
            trust.as_str(),
            "--compatible",
            COMPATIBLE,
            "--min-security-version",
            min.as_str(),
        ];
        let mut args = vec!["bundle", "verify", file.as_str()];
        args.extend(policy);
        if attack.writer_bug {
            // The default single pass installs what the signers signed; --paranoid hashes
            // the content too and refuses a writer's bug.
            let v = json_args(dir, &args, 0);
            assert_eq!(v["paranoid"], false, "{}", attack.name);
            args.push("--paranoid");
        }
        let v = json_args(dir, &args, 1);
        if v["error"]["code"] != attack.code {
            wrong.push(format!(
                "{}: verify said {}, expected {}",
                attack.name, v["error"], attack.code
            ));
        }
        for component in ["rootfs", "app"] {
            let mut args = vec![
                "bundle",
                "extract",
                file.as_str(),
                "--component",
                component,
                "--out",
                "out.img",
            ];
            args.extend(policy);
            if attack.writer_bug {
                args.push("--paranoid");
            }
            let out = abide_args(dir, &args);
            // Attacks on one component leave the other intact: extracting it may succeed.
            if out.status.success() {
                std::fs::remove_file(dir.join("out.img")).unwrap();
                continue;
            }
            let left = leftovers(dir, &format!("trust1.json trust2.json {file}"));
            if !left.is_empty() {
                wrong.push(format!(
                    "{}: extract of {component} left {left:?}",
                    attack.name
                ));
            }
        }
        std::fs::remove_file(dir.join(&file)).unwrap();
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    eprintln!("{} attacks refused through the command line", attacks.len());
}

#[test]
fn extract_of_a_damaged_component_leaves_nothing_even_after_partial_output() {
    let (_tmp, dir) = workspace();
    std::fs::write(dir.join("img"), abide_testkit::image(2 << 20, 8)).unwrap();
    ok(
        &dir,
        "bundle create --product p --version 1.0.0 --component rootfs=img --sign a.key --out g.abide",
    );
    // Damage the last chunk: most of the content has been written out before the failure.
    let mut bytes = std::fs::read(dir.join("g.abide")).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    std::fs::write(dir.join("g.abide"), &bytes).unwrap();
    let v = json(
        &dir,
        "bundle extract g.abide --trust trust.json --component rootfs --out r.out",
        1,
    );
    assert_eq!(v["error"]["code"], "chunk-digest");
    assert_eq!(
        leftovers(
            &dir,
            "a.key a.pub b.key b.pub c.key c.pub trust.json img g.abide"
        ),
        Vec::<String>::new()
    );
}

#[test]
fn an_independent_reader_written_from_the_spec_agrees() {
    // scripts/second-reader.py was written from docs/bundle-format.md alone: it must accept
    // what abide writes, find the same layout, and refuse a changed byte.
    let (_tmp, dir) = workspace();
    let mut random = vec![0u8; 300_000];
    let mut rng = abide_testkit::SplitMix(77);
    random.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
    std::fs::write(dir.join("random.img"), &random).unwrap();
    std::fs::write(dir.join("mixed.img"), abide_testkit::image(400_000, 13)).unwrap();
    ok(
        &dir,
        "bundle create --product p --version 3.0.0-rc.1 --component app=random.img \
         --component rootfs=mixed.img --sign a.key --sign b.key --out s.abide",
    );
    let reader = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/second-reader.py"
    );
    let run = |file: &str| {
        Command::new("python3")
            .arg(reader)
            .arg(dir.join(file))
            .output()
            .expect("python3 runs")
    };
    let out = run("s.abide");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let info = json(&dir, "bundle info s.abide", 0);
    assert_eq!(seen["version"], info["manifest"]["version"]);
    assert_eq!(seen["signers"], info["signatures"]);
    assert_eq!(seen["components"][0]["size"], 300_000);
    // The random component is stored raw throughout, so the reader checked its digest too.
    assert_eq!(
        seen["components"][0]["raw"],
        seen["components"][0]["chunks"]
    );
    let mut bytes = std::fs::read(dir.join("s.abide")).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(dir.join("t.abide"), &bytes).unwrap();
    assert!(!run("t.abide").status.success());
}
