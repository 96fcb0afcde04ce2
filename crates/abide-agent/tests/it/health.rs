//! Each kind of health check against something real: a command with the trial's environment,
//! an HTTP endpoint, a TCP port, a process, a file; retries and timeouts.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use abide_agent::config::Config;
use abide_agent::health::{Clock, Running, run_checks};
use abide_core::{CheckOutcome, Group, Transaction};
use jiff::{SignedDuration, Timestamp};

/// A clock that only moves when slept on.
struct FakeClock(AtomicU64);

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + self.0.load(Ordering::SeqCst) as i64).unwrap()
    }
    fn sleep(&self, d: SignedDuration) {
        self.0
            .fetch_add(d.as_secs().max(1) as u64, Ordering::SeqCst);
    }
}

fn config(checks: &str) -> Config {
    let text = format!(
        "product = \"p\"\ncompatible = \"c\"\ntrust = \"t.json\"\n[bootloader]\nbackend = \"sim\"\npath = \"b.json\"\n\
         [[group]]\nname = \"A\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"a.img\"\n\
         [[group]]\nname = \"B\"\n[[group.slot]]\nclass = \"rootfs\"\npath = \"b.img\"\n{checks}"
    );
    Config::parse(Path::new("/tmp/system.toml"), &text).unwrap()
}

/// Serves `answers` HTTP requests on a free port, each with `reply`.
fn http_server(reply: &'static str, answers: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(answers) {
            let mut stream = stream.unwrap();
            // Read the whole request before answering, so closing does not reset the
            // connection under the client.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
    });
    addr
}

fn outcomes(config: &Config, tx: Option<&Transaction>) -> Vec<(String, CheckOutcome)> {
    let clock = FakeClock(AtomicU64::new(0));
    let version = tx.map(|t| t.version.to_string()).unwrap_or_default();
    let running = Running {
        version: &version,
        transaction: tx.map(|t| t.id.as_str()),
    };
    run_checks(config, running, "B", &clock)
        .into_iter()
        .map(|r| (r.name, r.outcome))
        .collect()
}

#[test]
fn command_checks_see_the_trial() {
    let (tx, _) = Transaction::begin(
        "tx-7",
        "2.1.0".parse().unwrap(),
        0,
        Group::new("A").unwrap(),
        Group::new("B").unwrap(),
        Timestamp::UNIX_EPOCH,
    )
    .unwrap();
    let c = config(
        "[[health.check]]\nname = \"env\"\nkind = \"command\"\n\
         command = 'test \"$ABIDE_VERSION $ABIDE_GROUP $ABIDE_TRANSACTION\" = \"2.1.0 B tx-7\"'\n\
         [[health.check]]\nname = \"fails\"\nkind = \"command\"\ncommand = 'echo broken >&2; exit 3'\nretries = 2\n\
         [[health.check]]\nname = \"hangs\"\nkind = \"command\"\ncommand = 'sleep 30'\ntimeout = \"200ms\"\n",
    );
    let got = outcomes(&c, Some(&tx));
    assert_eq!(got[0].1, CheckOutcome::Pass);
    assert_eq!(
        got[1].1,
        CheckOutcome::Fail("exit status: 3: broken".into())
    );
    assert!(
        matches!(&got[2].1, CheckOutcome::Fail(d) if d.contains("timed out")),
        "{got:?}"
    );
}

#[test]
fn http_checks_look_at_the_status_and_the_body() {
    let ok = http_server("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nstatus=ok", 2);
    let down = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n", 1);
    let c = config(&format!(
        "[[health.check]]\nname = \"up\"\nkind = \"http\"\nurl = \"http://{ok}/health\"\nbody = \"status=ok\"\n\
         [[health.check]]\nname = \"wrong-body\"\nkind = \"http\"\nurl = \"http://{ok}/\"\nbody = \"ready\"\n\
         [[health.check]]\nname = \"down\"\nkind = \"http\"\nurl = \"http://{down}/\"\n"
    ));
    let got = outcomes(&c, None);
    assert_eq!(got[0].1, CheckOutcome::Pass, "{got:?}");
    assert!(
        matches!(&got[1].1, CheckOutcome::Fail(d) if d.contains("does not contain")),
        "{got:?}"
    );
    assert!(
        matches!(&got[2].1, CheckOutcome::Fail(d) if d.contains("answered 503")),
        "{got:?}"
    );
}

/// A body sent in chunks (the text it must contain split across two of them) is read whole.
#[test]
fn an_http_check_reads_a_chunked_body() {
    let chunked = http_server(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstatus=\r\n2\r\nok\r\n0\r\n\r\n",
        2,
    );
    let c = config(&format!(
        "[[health.check]]\nname = \"chunked\"\nkind = \"http\"\nurl = \"http://{chunked}/\"\nbody = \"status=ok\"\n\
         [[health.check]]\nname = \"absent\"\nkind = \"http\"\nurl = \"http://{chunked}/\"\nbody = \"status=down\"\n"
    ));
    let got = outcomes(&c, None);
    assert_eq!(got[0].1, CheckOutcome::Pass, "{got:?}");
    assert!(
        matches!(&got[1].1, CheckOutcome::Fail(d) if d.contains("does not contain")),
        "{got:?}"
    );
}

/// An https:// endpoint is checked against the check's `ca_file`: a certificate from that CA
/// passes, the same endpoint checked against another CA fails and says why.
#[test]
fn an_https_check_trusts_its_ca_file_and_nothing_else() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        Issuer::new(params, key)
    };
    let (ours, other) = (ca("ours"), ca("other"));
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ours)
        .unwrap();
    drop(other);
    std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    // A TLS server that answers every connection with a chunked body.
    let mut server = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket, ssl, sys\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
             ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n\
             print(s.getsockname()[1], flush=True)\n\
             while True:\n\
             \x20   conn, _ = s.accept()\n\
             \x20   try:\n\
             \x20       c = ctx.wrap_socket(conn, server_side=True)\n\
             \x20       c.recv(65536)\n\
             \x20       c.sendall(b'HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\nConnection: close\\r\\n\\r\\n9\\r\\nstatus=ok\\r\\n0\\r\\n\\r\\n')\n\
             \x20       c.close()\n\
             \x20   except Exception:\n\
             \x20       conn.close()\n",
        )
        .arg(dir.path().join("server.pem"))
        .arg(dir.path().join("server.key"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().unwrap()),
        &mut port,
    )
    .unwrap();
    let port = port.trim();
    let c = config(&format!(
        "[[health.check]]\nname = \"tls\"\nkind = \"http\"\nurl = \"https://127.0.0.1:{port}/health\"\nca_file = \"{}\"\nbody = \"status=ok\"\n\
         [[health.check]]\nname = \"stranger\"\nkind = \"http\"\nurl = \"https://127.0.0.1:{port}/health\"\nca_file = \"{}\"\n",
        dir.path().join("ours.pem").display(),
        dir.path().join("other.pem").display(),
    ));
    let got = outcomes(&c, None);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(got[0].1, CheckOutcome::Pass, "{got:?}");
    assert!(
        matches!(&got[1].1, CheckOutcome::Fail(d) if d.contains("certificate")),
        "{got:?}"
    );
}

#[test]
fn tcp_process_and_file_checks() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let me = std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_owned();
    let c = config(&format!(
        "[[health.check]]\nname = \"port\"\nkind = \"tcp\"\naddress = \"{open}\"\n\
         [[health.check]]\nname = \"closed\"\nkind = \"tcp\"\naddress = \"{closed}\"\n\
         [[health.check]]\nname = \"me\"\nkind = \"process\"\nprocess = \"{me}\"\n\
         [[health.check]]\nname = \"ghost\"\nkind = \"process\"\nprocess = \"no-such-daemon\"\n\
         [[health.check]]\nname = \"file\"\nkind = \"file\"\npath = \"/proc/self/status\"\n\
         [[health.check]]\nname = \"no-file\"\nkind = \"file\"\npath = \"/nonexistent\"\ncritical = false\n"
    ));
    let got: Vec<bool> = outcomes(&c, None)
        .into_iter()
        .map(|(_, o)| o == CheckOutcome::Pass)
        .collect();
    assert_eq!(got, [true, false, true, false, true, false]);
    drop(listener);
}

/// A check that writes far more than a pipe holds to standard error: it is not blocked (and
/// killed at its timeout), it passes or fails by its exit status, and a failure's reason is the
/// end of what it wrote.
#[test]
fn a_check_that_writes_10_mib_to_stderr_is_judged_by_its_exit_status() {
    let c = config(
        "[[health.check]]\nname = \"chatty\"\nkind = \"command\"\n\
         command = 'head -c 10485760 /dev/zero | tr \"\\\\0\" x >&2; exit 0'\ntimeout = \"20s\"\n\
         [[health.check]]\nname = \"chatty-fails\"\nkind = \"command\"\n\
         command = 'head -c 10485760 /dev/zero | tr \"\\\\0\" y >&2; echo the end >&2; exit 4'\ntimeout = \"20s\"\n",
    );
    let started = std::time::Instant::now();
    let got = outcomes(&c, None);
    assert_eq!(got[0].1, CheckOutcome::Pass, "{got:?}");
    match &got[1].1 {
        CheckOutcome::Fail(why) => {
            assert!(why.starts_with("exit status: 4: "), "{why}");
            assert!(why.ends_with("yyyythe end"), "{why}");
            assert!(why.len() < 300, "bounded: {} bytes", why.len());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// Whether process `pid` has ended (gone, or a zombie waiting for whoever reaps orphans),
/// allowing a killed process a moment to finish dying.
fn ended(pid: &str) -> bool {
    let dead = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    };
    let since = std::time::Instant::now();
    while !dead() {
        if since.elapsed() > std::time::Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

#[test]
fn a_command_that_times_out_or_ends_leaves_no_process_of_its_own_behind() {
    use abide_agent::command::{Ended, run};
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // Children in the background, one of them with the pipes, and a shell that waits on them.
    let script = format!(
        "sleep 300 & echo $! > {p}; (sleep 301; echo late) & echo $! >> {p}; echo started; wait",
        p = pids.display()
    );
    let started = std::time::Instant::now();
    let (ended_as, output) = run(&script, &[], std::time::Duration::from_millis(500)).unwrap();
    assert!(matches!(ended_as, Ended::TimedOut(_)), "{ended_as:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(output, "started");
    let listed = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(listed.lines().count(), 2, "{listed}");
    for pid in listed.lines() {
        assert!(ended(pid), "process {pid} of the command outlived it");
    }
    // A command that exits at once but leaves a child running does not leave it either.
    let (ended_as, _) = run(
        &format!("sleep 302 & echo $! > {}", pids.display()),
        &[],
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        matches!(ended_as, Ended::Exited(s) if s.success()),
        "{ended_as:?}"
    );
    let pid = std::fs::read_to_string(&pids).unwrap();
    let pid = pid.trim();
    assert!(
        ended(pid),
        "process {pid} outlived its command: {:?}",
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
    );
}
