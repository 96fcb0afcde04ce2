//! Configuration errors name the file, the key and what was expected; paths resolve against
//! the file's directory.

use std::path::Path;

use abide_agent::config::{Backend, CheckKind, Config};

const GOOD: &str = r#"
product = "gw"
compatible = "gw-1"
state_dir = "state"
trust = "/etc/abide/trust.json"
reboot = ["systemctl", "reboot"]

[bootloader]
backend = "uboot"
path = "env.0"
redundant_path = "env.1"
env_size = 8192
tries = 2

[[group]]
name = "A"
[[group.slot]]
class = "rootfs"
path = "/dev/mmcblk0p2"
kind = "block"

[[group]]
name = "B"
[[group.slot]]
class = "rootfs"
path = "/dev/mmcblk0p3"
kind = "block"

[health]
deadline = "3m"
grace = "30s"

[[health.check]]
name = "api"
kind = "tcp"
address = "127.0.0.1:8080"
retries = 5
interval = "2s"
"#;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(Path::new("/etc/abide/system.toml"), text).map_err(|e| e.to_string())
}

#[test]
fn a_full_configuration_validates() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.state_dir, Path::new("/etc/abide/state"));
    assert_eq!(c.api.socket, Path::new("/run/abide/agent.sock"));
    assert_eq!(c.api.tcp, None);
    assert_eq!(
        c.backend,
        Backend::Uboot {
            redundant: Some("/etc/abide/env.1".into()),
            size: 8192
        }
    );
    assert_eq!(c.boot_policy.tries, 2);
    assert_eq!(c.health.deadline.as_secs(), 180);
    assert_eq!(c.checks[0].kind, CheckKind::Tcp("127.0.0.1:8080".into()));
    assert!(c.checks[0].critical);
    assert_eq!(
        c.reboot.as_deref(),
        Some(&["systemctl".to_owned(), "reboot".to_owned()][..])
    );
    // Durations as the command line takes them: units, compound, or bare seconds.
    for (text, secs) in [("\"3m\"", 180), ("\"1m30s\"", 90), ("\"90\"", 90)] {
        let c = parse(&GOOD.replace("deadline = \"3m\"", &format!("deadline = {text}"))).unwrap();
        assert_eq!(c.health.deadline.as_secs(), secs, "{text}");
    }
}

#[test]
fn the_systemd_boot_backend_takes_the_esp_and_the_command_line() {
    let text = GOOD.replace(
        "backend = \"uboot\"\npath = \"env.0\"\nredundant_path = \"env.1\"\nenv_size = 8192",
        "backend = \"systemd-boot\"\npath = \"/boot/efi\"",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.boot_path, Path::new("/boot/efi"));
    assert_eq!(
        c.backend,
        Backend::SystemdBoot {
            cmdline: "/proc/cmdline".into()
        }
    );
    let c = parse(&text.replace(
        "path = \"/boot/efi\"",
        "path = \"esp\"\ncmdline = \"cmdline\"",
    ))
    .unwrap();
    assert_eq!(
        (c.boot_path.as_path(), c.backend),
        (
            Path::new("/etc/abide/esp"),
            Backend::SystemdBoot {
                cmdline: "/etc/abide/cmdline".into()
            }
        )
    );
}

#[test]
fn errors_name_the_file_the_key_and_the_expectation() {
    for (edit, expected) in [
        (
            GOOD.replace("backend = \"uboot\"", "backend = \"lilo\""),
            "key `bootloader.backend`: expected \"sim\", \"grub\", \"uboot\", \"gpt\" or \"systemd-boot\"",
        ),
        (
            GOOD.replace("env_size = 8192", ""),
            "key `bootloader.env_size`",
        ),
        (
            GOOD.replace("tries = 2", "tries = 9"),
            "key `bootloader.tries`: expected 1 to 3",
        ),
        (
            GOOD.replace("name = \"B\"", "name = \"A\""),
            "key `group`: expected exactly two groups",
        ),
        (
            GOOD.replace("name = \"B\"", "name = \"C\""),
            "need the groups to be named A and B",
        ),
        (
            GOOD.replace("kind = \"tcp\"", "kind = \"ping\""),
            "key `health.check[0].kind`: expected \"command\", \"http\", \"tcp\", \"systemd\", \"process\", \"file\", \"uptime\" or \"fleet\", found \"ping\"",
        ),
        (
            GOOD.replace("interval = \"2s\"", "interval = \"soon\""),
            "key `health.check[0].interval`: expected a duration",
        ),
        (
            GOOD.replace("compatible = \"gw-1\"", "compatible = \"gw/1\""),
            "key `compatible`",
        ),
        (
            GOOD.replace("kind = \"block\"", "kind = \"tape\""),
            "key `group[0].slot[0].kind`: expected \"image\", \"block\" or \"dir\", found \"tape\"",
        ),
        (
            GOOD.replace("product = \"gw\"", "product = \"gw\"\nstate_reserve = \"lots\""),
            "key `state_reserve`: \"lots\" is not a size like 512M",
        ),
        (
            GOOD.replace("tries = 2", "tries = \"two\""),
            "key `bootloader.tries`: invalid type: string \"two\", expected u8",
        ),
        (
            GOOD.replace("product = \"gw\"", "product = \"gw\"\n[oops"),
            "line ",
        ),
        (
            GOOD.replace("product = \"gw\"", "product = \"gw\"\ncolour = \"blue\""),
            "unknown field `colour`",
        ),
        (
            format!("{GOOD}\n[api]\ntcp = \"0.0.0.0:7443\"\ncert = \"api.pem\"\n"),
            "keys `api.tcp`, `api.cert`, `api.key`, `api.client_ca`: give all four",
        ),
        (
            format!(
                "{GOOD}\n[api]\ntcp = \"port 7443\"\ncert = \"a\"\nkey = \"k\"\nclient_ca = \"c\"\n"
            ),
            "key `api.tcp`: expected an address and port",
        ),
        (
            format!(
                "{GOOD}\n[api]\nsocket = \"/run/{}/agent.sock\"\n",
                "x".repeat(120)
            ),
            "key `api.socket`: a socket path is at most 107 bytes",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\nafter_backup = \"shred\"\n"),
            "key `app[0].after_backup`: expected \"keep\" or \"discard\", found \"shred\"",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\nbackups = 0\n"),
            "key `app[0].backups`: expected 1 to 100, found 0",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\nservices = [\"web; rm -rf /\"]\n"),
            "key `app[0].services[0]`: expected a unit name",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\n").replace("name = \"web\"", "name = \"rootfs\""),
            "key `app[0].name`: \"rootfs\" is also the class of a slot of the groups",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\n").replace("/var/lib/web", "/opt/web/releases/data"),
            "must not hold one another",
        ),
        (
            format!("{GOOD}\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\n[[app.check]]\nname = \"up\"\nkind = \"tcp\"\n"),
            "key `app[0].check[0].address`: required for kind \"tcp\"",
        ),
        (
            GOOD.replace("kind = \"tcp\"", "kind = \"fleet\""),
            "key `health.check[0].kind`: a \"fleet\" check checks in with the fleet server: it belongs in [[health.check]] with a [server]",
        ),
        (
            format!("{GOOD}\n[server]\nurl = \"https://fleet.example.net\"\ndevice_id = \"gw-1\"\n[[app]]\nname = \"web\"\nreleases = \"/opt/web/releases\"\nlink = \"/opt/web/current\"\ndata = \"/var/lib/web\"\n[[app.check]]\nname = \"up\"\nkind = \"fleet\"\n"),
            "key `app[0].check[0].kind`: a \"fleet\" check checks in with the fleet server",
        ),
        (
            format!("{GOOD}\n[download]\nmin_rate = \"fast\"\n"),
            "key `download.min_rate`",
        ),
        (
            format!("{GOOD}\n[download]\nwindow = \"0.5s\"\n"),
            "key `download.window`: at least 1s",
        ),
    ] {
        let err = parse(&edit).unwrap_err();
        assert!(err.starts_with("/etc/abide/system.toml: "), "{err}");
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
    }
}

#[test]
fn the_running_group_is_read_from_the_kernel_command_line_and_mounts_from_mountinfo() {
    use abide_agent::running::mounted_at;
    use abide_boot::cmdline_group;
    assert_eq!(
        cmdline_group("BOOT_IMAGE=/vmlinuz root=/dev/vda2 abide.group=B ro").map(|g| g.to_string()),
        Some("B".into())
    );
    assert_eq!(cmdline_group("root=/dev/vda2 ro quiet"), None);
    assert_eq!(cmdline_group("abide.group=../x"), None, "not a group name");
    let mountinfo = "\
22 1 254:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
24 22 254:1 / /boot rw,relatime shared:2 - ext4 /dev/vda1 rw
";
    assert_eq!(mounted_at(mountinfo, (254, 2)).as_deref(), Some("/"));
    assert_eq!(mounted_at(mountinfo, (254, 1)).as_deref(), Some("/boot"));
    assert_eq!(mounted_at(mountinfo, (254, 3)), None);
}

#[test]
fn an_install_whose_target_is_the_mounted_root_or_is_mounted_is_refused() {
    use abide_agent::running::check_mounts;
    let dir = tempfile::tempdir().unwrap();
    // Two block slots: device nodes with numbers of their own (nothing behind them is read).
    for (name, minor) in [("a.blk", "250"), ("b.blk", "251")] {
        let made = std::process::Command::new("mknod")
            .arg(dir.path().join(name))
            .args(["b", "7", minor])
            .status()
            .expect("mknod runs");
        assert!(made.success(), "mknod {name} (the tests run as root)");
    }
    let config = abide_agent::config::Config::parse(
        &dir.path().join("system.toml"),
        "product = \"gw\"\ncompatible = \"gw-1\"\nstate_dir = \"state\"\ntrust = \"trust.json\"\n\
         [bootloader]\nbackend = \"sim\"\npath = \"boot.json\"\n\
         [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\nkind = \"block\"\npath = \"a.blk\"\n\
         [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\nkind = \"block\"\npath = \"b.blk\"\n",
    )
    .unwrap();
    let group = |name: &str| abide_core::Group::new(name).unwrap();
    // The bootloader's variables say B booted and A is the target.
    let boot = abide_boot::BootState {
        order: vec![group("B"), group("A")],
        trial: None,
        bootable: [(group("A"), true), (group("B"), true)].into(),
        booted: Some(group("B")),
    };
    let target = config.group(&group("A")).unwrap();
    let table = |lines: &[&str]| {
        let mut text = String::from("23 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n");
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        text
    };
    // Nothing of ours mounted, or B (the running group) at /: the install may go on.
    check_mounts(&config, &boot, target, &table(&[])).unwrap();
    check_mounts(
        &config,
        &boot,
        target,
        &table(&["22 1 7:251 / / rw - ext4 /dev/loop251 rw"]),
    )
    .unwrap();
    // A's slot is the root file system: the variables are stale, A runs and is the target.
    let err = check_mounts(
        &config,
        &boot,
        target,
        &table(&["22 1 7:250 / / rw - ext4 /dev/loop250 rw"]),
    )
    .unwrap_err();
    assert_eq!(err.code(), "running-group", "{err}");
    assert!(
        err.to_string().contains("group B booted")
            && err.to_string().contains("the block slot mounted at /"),
        "{err}"
    );
    // A's slot is mounted elsewhere: in use.
    let err = check_mounts(
        &config,
        &boot,
        target,
        &table(&[
            "22 1 7:251 / / rw - ext4 /dev/loop251 rw",
            "40 22 7:250 / /mnt/old rw - ext4 /dev/loop250 rw",
        ]),
    )
    .unwrap_err();
    assert_eq!(err.code(), "target-in-use", "{err}");
    assert!(err.to_string().contains("mounted at /mnt/old"), "{err}");
}

#[test]
fn check_ins_are_jittered_and_back_off_up_to_a_cap() {
    use abide_agent::daemon::pause;
    use std::time::Duration;
    let minute = Duration::from_secs(60);
    // ±20 % around the interval, whatever the draw.
    assert_eq!(pause(minute, 0, 0), Duration::from_secs(48));
    assert_eq!(pause(minute, 0, u16::MAX), Duration::from_secs(72));
    let mid = pause(minute, 0, u16::MAX / 2);
    assert!(
        mid > Duration::from_secs(59) && mid < Duration::from_secs(61),
        "{mid:?}"
    );
    // Doubling after each failure in a row, capped at 16 times.
    assert_eq!(pause(minute, 1, 0), Duration::from_secs(96));
    assert_eq!(pause(minute, 4, 0), Duration::from_secs(768));
    assert_eq!(pause(minute, 30, 0), pause(minute, 4, 0));
}

#[test]
fn a_client_certificate_needs_its_key_and_an_https_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("system.toml");
    let base = "product = \"gw\"\ncompatible = \"gw-1\"\ntrust = \"trust.json\"\n\
        [bootloader]\nbackend = \"sim\"\npath = \"boot.json\"\n\
        [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"a.img\"\n\
        [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"b.img\"\n";
    for (server, why) in [
        (
            "[server]\nurl = \"https://fleet:8440\"\ndevice_id = \"gw\"\nclient_cert = \"c.pem\"\n",
            "give both or neither",
        ),
        (
            "[server]\nurl = \"http://fleet:8440\"\ndevice_id = \"gw\"\nca_file = \"ca.pem\"\n",
            "need an https:// URL",
        ),
    ] {
        let err = abide_agent::config::Config::parse(&path, &format!("{base}{server}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    let ok = "[server]\nurl = \"https://fleet:8440\"\ndevice_id = \"gw\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n";
    let config = abide_agent::config::Config::parse(&path, &format!("{base}{ok}")).unwrap();
    assert!(config.server.unwrap().client_identity.is_some());
}

/// A simulated device's configuration in `dir` whose trust root is `root`.
fn holding(dir: &std::path::Path, root: &abide_bundle::TrustRoot) -> abide_agent::config::Config {
    std::fs::write(dir.join("trust.json"), root.to_file_bytes().unwrap()).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    abide_agent::config::Config::parse(
        &dir.join("system.toml"),
        "product = \"gw\"\ncompatible = \"gw-1\"\nstate_dir = \"state\"\ntrust = \"trust.json\"\n\
         [bootloader]\nbackend = \"sim\"\npath = \"boot.json\"\n\
         [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"a.img\"\n\
         [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"b.img\"\n",
    )
    .unwrap()
}

/// A trust root's file as text, as the server delivers it.
fn body(root: &abide_bundle::TrustRoot) -> String {
    String::from_utf8(root.to_file_bytes().unwrap()).unwrap()
}

#[test]
fn a_delivered_trust_root_is_taken_only_along_its_chain() {
    use abide_testkit::{key, trust};
    let dir = tempfile::tempdir().unwrap();
    let v1 = trust(&[0, 1], 1);
    let config = holding(dir.path(), &v1);
    let now = jiff::Timestamp::now();
    // Signed by keys the device does not trust yet: refused, nothing stored.
    let foreign = trust(&[5, 6], 1)
        .rotate(vec![key(5).public()], 1, None, &[&key(5), &key(6)])
        .unwrap();
    let r = abide_agent::trust::accept(&config, &[body(&foreign)], now).unwrap();
    assert_eq!((r.from, r.to), (1, 1));
    assert!(r.refused.is_some());
    assert!(!dir.path().join("state/trust.json").exists());
    // Version 2, by a threshold of the old and of the new keys, is taken; a version 3 signed
    // by a key version 2 dropped is refused, and version 2 stays.
    let v2 = v1
        .rotate(
            vec![key(1).public(), key(2).public()],
            1,
            None,
            &[&key(0), &key(2)],
        )
        .unwrap();
    // (rotate() would refuse to make it; create() signs whatever it is given.)
    let bad_v3 =
        abide_bundle::TrustRoot::create(3, vec![key(3).public()], 1, None, &[&key(0), &key(3)])
            .unwrap();
    let r = abide_agent::trust::accept(&config, &[body(&v2), body(&bad_v3)], now).unwrap();
    assert_eq!((r.from, r.to), (1, 2), "{:?}", r.refused);
    assert!(r.refused.is_some());
    assert_eq!(
        std::fs::read(dir.path().join("state/trust.json")).unwrap(),
        v2.to_file_bytes().unwrap()
    );
    assert_eq!(abide_agent::trust::version(&config).unwrap(), 2);
}

#[test]
fn a_device_whose_trust_root_lapsed_takes_its_successor() {
    use abide_testkit::key;
    let dir = tempfile::tempdir().unwrap();
    let lapsed = abide_bundle::TrustRoot::create(
        1,
        vec![key(0).public(), key(1).public()],
        2,
        Some("2026-01-01T00:00:00Z".parse().unwrap()),
        &[&key(0), &key(1)],
    )
    .unwrap();
    let config = holding(dir.path(), &lapsed);
    let now = jiff::Timestamp::now();
    // Signed by one of the lapsed root's two keys: still not enough.
    let short =
        abide_bundle::TrustRoot::create(2, vec![key(2).public()], 1, None, &[&key(0), &key(2)])
            .unwrap();
    let r = abide_agent::trust::accept(&config, &[body(&short)], now).unwrap();
    assert_eq!((r.from, r.to), (1, 1));
    assert_eq!(r.refused.unwrap().code(), "signature-threshold");
    // Signed by both, and by its own key: taken, although version 1 has expired.
    let next = abide_bundle::TrustRoot::create(
        2,
        vec![key(2).public()],
        1,
        None,
        &[&key(0), &key(1), &key(2)],
    )
    .unwrap();
    let r = abide_agent::trust::accept(&config, &[body(&next)], now).unwrap();
    assert_eq!((r.from, r.to), (1, 2), "{:?}", r.refused);
    assert_eq!(abide_agent::trust::version(&config).unwrap(), 2);
}

#[test]
fn a_url_download_must_bring_1_kib_a_second_over_each_minute_unless_configured() {
    let d = parse(GOOD).unwrap().download;
    assert_eq!(
        (d.min_rate, d.window),
        (1024, std::time::Duration::from_secs(60))
    );
    let d = parse(&format!(
        "{GOOD}\n[download]\nmin_rate = \"0\"\nwindow = \"5m\"\n"
    ))
    .unwrap()
    .download;
    assert_eq!(
        (d.min_rate, d.window),
        (0, std::time::Duration::from_secs(300))
    );
}

/// The daemon and the schedules it carries out read the time from the agent's clock only (so
/// tests move it, windows included): no direct read of the system clock in their sources.
#[test]
fn the_daemon_reads_time_from_its_one_clock() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in ["daemon.rs", "scheduled.rs", "shared.rs"] {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        for call in ["Timestamp::now", "SystemTime::now", "Zoned::now"] {
            assert!(!text.contains(call), "{file} calls {call}");
        }
    }
}

#[test]
fn sizes_are_powers_of_1024() {
    use abide_agent::config::parse_size;
    assert_eq!(parse_size("16M"), Ok(16 << 20));
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("4k"), Ok(4096));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    assert!(parse_size("16MB").unwrap_err().contains("K, M, G or T"));
    assert!(parse_size("M").unwrap_err().contains("not a size"));
    assert!(
        parse_size("99999999999T")
            .unwrap_err()
            .contains("too large")
    );
}
