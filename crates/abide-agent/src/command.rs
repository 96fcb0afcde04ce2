//! Running a configured shell command (a health check, a hook) with a time limit, keeping the
//! end of what it printed.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of a command's output is kept (its end).
pub const OUTPUT_KEPT: usize = 4096;

/// How a command ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited with this status.
    Exited(ExitStatus),
    /// It ran past its time limit and was killed.
    TimedOut(Duration),
}

/// Runs `cmd` through `sh -c` with `env` added, standard input closed, for at most `timeout`;
/// returns how it ended and the end of its standard output and error (together, as written).
/// A command that cannot be started is an error.
pub fn run(
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<(Ended, String), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    // Read the output while the command runs, keeping only its end: a command that writes more
    // than a pipe holds must not block on a full pipe and time out.
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        let tail = tail.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                let mut t = tail.lock().expect("not poisoned");
                t.extend_from_slice(&buf[..n]);
                let excess = t.len().saturating_sub(OUTPUT_KEPT);
                t.drain(..excess);
            }
        })
    })
    .collect();
    let start = Instant::now();
    let ended = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ended::Exited(status),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Ended::TimedOut(timeout);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    };
    // The output ends when the command's last process closes it; one it left running in the
    // background is not waited for long.
    let waited = Instant::now();
    while readers.iter().any(|r| !r.is_finished()) && waited.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = String::from_utf8_lossy(&tail.lock().expect("not poisoned"))
        .trim()
        .to_owned();
    Ok((ended, output))
}
