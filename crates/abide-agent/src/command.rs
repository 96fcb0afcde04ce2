//! Running a configured shell command (a health check, a hook, a migration) with a time limit,
//! keeping the end of what it printed.
//!
//! The command runs in a process group of its own, and the whole group is killed when the
//! command ends or runs out of time: a `sleep 300` it started in the background does not outlive
//! it. Its output is read by the calling thread (one `poll` loop over both pipes), so no reader
//! thread is left behind either, whatever the command's children do with the pipes.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

/// How much of a command's output is kept (its end).
pub const OUTPUT_KEPT: usize = 4096;

/// How long the output is still read after the command's group was killed (what was written
/// before it died).
const DRAIN: Duration = Duration::from_millis(200);

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
/// Every process of its group is gone when this returns. A command that cannot be started is
/// an error.
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
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    let mut output = Output {
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        tail: Vec::new(),
    };
    let start = Instant::now();
    let ended = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(Ended::Exited(status)),
            Ok(None) if start.elapsed() >= timeout => break Ok(Ended::TimedOut(timeout)),
            Ok(None) => output.read_for(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    // The command's group goes with it: what it left running, and the shell itself on a
    // timeout. Then the rest of the output, until the pipes close (or briefly, if a process
    // that left the group still holds them; the pipes are closed here either way).
    kill_group(&mut child);
    let drained = Instant::now();
    while output.open() && drained.elapsed() < DRAIN {
        output.read_for(Duration::from_millis(10));
    }
    let tail = String::from_utf8_lossy(&output.tail).trim().to_owned();
    Ok((ended?, tail))
}

/// Kills every process of the child's group and reaps the child.
fn kill_group(child: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        // The group may be gone already (ESRCH): nothing is left of it then.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.wait();
}

/// The command's two pipes and the end of what came through them.
struct Output {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    tail: Vec<u8>,
}

impl Output {
    fn open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Waits up to `wait` for output and reads what there is; a pipe at its end is closed.
    fn read_for(&mut self, wait: Duration) {
        if !self.open() {
            std::thread::sleep(wait);
            return;
        }
        let readable = {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(2);
            if let Some(s) = &self.stdout {
                fds.push(PollFd::new(s, PollFlags::IN));
            }
            if let Some(s) = &self.stderr {
                fds.push(PollFd::new(s, PollFlags::IN));
            }
            let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
                tv_sec: 0,
                tv_nsec: 10_000_000,
            });
            if rustix::event::poll(&mut fds, Some(&timeout)).is_err() {
                return;
            }
            fds.iter()
                .map(|f| !f.revents().is_empty())
                .collect::<Vec<bool>>()
        };
        let mut ready = readable.into_iter();
        if self.stdout.is_some() && ready.next() == Some(true) {
            read_some(&mut self.stdout, &mut self.tail);
        }
        if self.stderr.is_some() && ready.next() == Some(true) {
            read_some(&mut self.stderr, &mut self.tail);
        }
    }
}

/// Reads what one pipe has into `tail`, keeping its last [`OUTPUT_KEPT`] bytes; closes the pipe
/// at its end or on an error.
fn read_some<R: Read + AsFd>(pipe: &mut Option<R>, tail: &mut Vec<u8>) {
    let Some(p) = pipe.as_mut() else {
        return;
    };
    let mut buf = [0u8; 8192];
    match p.read(&mut buf) {
        Ok(0) | Err(_) => *pipe = None,
        Ok(n) => {
            tail.extend_from_slice(&buf[..n]);
            let excess = tail.len().saturating_sub(OUTPUT_KEPT);
            tail.drain(..excess);
        }
    }
}
