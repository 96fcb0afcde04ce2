//! Schedules carried out on the device: the commands of the agent's round
//! (`abide_core::agent::next`) that concern them — recover the applications, follow the
//! schedule in progress, activate a staged one, start a due one — as the daemon carries them
//! out. A schedule reads its bundle from a file (its SHA-256, if pinned, checked before
//! anything changes) or streams it from a URL (the SHA-256 checked over every byte before
//! activation; a mismatch abandons the target, which was never bootable).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use abide_bundle::Source as BundleSource;
use abide_core::agent::Windows;
use abide_core::schedule::{Rollback, Schedule, ScheduleState, Source, When};
use abide_core::{FailReason, Force, Gate};
use sha2::{Digest, Sha256};

use crate::config::{Config, DeviceWindow};
use crate::device::Device;
use crate::error::{AgentError, Result};
use crate::fleet::source::Stopped;
use crate::shared::Shared;

/// What a command asks of the agent's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Something changed: run another round at once.
    Again,
    /// The device must restart (a schedule was activated).
    Reboot,
}

/// Undoes (or finishes) the applications' updates a crash interrupted; each schedule one
/// carried out follows how it ended.
pub fn recover_apps(shared: &Shared, device: &mut Device) -> Result<()> {
    for done in crate::app::recover(device, shared.clock.as_ref())? {
        let now = shared.clock.now();
        shared.with_book(|b| {
            if let Some(s) = b.in_progress_mut()
                && s.transaction.as_deref() == Some(done.transaction.id.as_str())
            {
                s.follow_app(now, &done.transaction);
            }
        })?;
    }
    Ok(())
}

/// The application transaction schedule `s` names, if it names one.
pub fn app_transaction(config: &Config, s: &Schedule) -> Option<abide_core::app::AppTransaction> {
    s.transaction
        .as_deref()
        .filter(|t| t.starts_with(abide_core::app::ID_PREFIX))
        .and_then(|t| crate::app::transaction(config, t))
}

/// The schedule in progress follows what carries it out (`abide_core::agent::follow`), under
/// the schedules' lock so that a cancel made meanwhile is seen.
pub fn follow(shared: &Shared, device: &Device) -> Result<()> {
    let tx = device.state()?.transaction;
    let now = shared.clock.now();
    shared.with_book(|b| {
        if let Some(s) = b.in_progress_mut() {
            let app_tx = app_transaction(&device.config, s);
            abide_core::agent::follow(s, tx.as_ref(), app_tx.as_ref(), now);
        }
    })
}

/// The device's own windows at `now`.
pub fn windows(windows: &[DeviceWindow], now: jiff::Timestamp) -> Windows {
    if windows.is_empty() {
        Windows::None
    } else if windows.iter().any(|w| w.is_open(now)) {
        Windows::Open
    } else {
        Windows::Closed
    }
}

/// Activates the staged transaction of schedule `id`, under the schedules' lock so that a
/// cancel either comes first (and the target is abandoned) or finds it activated (and is
/// refused).
pub fn activate(shared: &Shared, device: &mut Device, id: &str) -> Result<Next> {
    let now = shared.clock.now();
    let reboot = shared.with_book(|b| -> Result<Option<bool>> {
        let Some(s) = b
            .get_mut(id)
            .filter(|s| matches!(s.state, ScheduleState::InProgress { .. }))
        else {
            return Ok(None);
        };
        let done = crate::install::activate(device, now);
        let tx = device.state()?.transaction;
        if let Some(t) = &tx {
            s.follow(now, &t.id, &t.state);
        }
        let (tx, reboot) = done?;
        tracing::info!(schedule = %id, version = %tx.version, target = %tx.target, "activated");
        // The schedule stays in progress; watchers hear that its transaction moved on.
        shared.progress(s, 0, 0);
        Ok(Some(reboot))
    })??;
    match reboot {
        Some(true) => {
            device.reboot()?;
            Ok(Next::Reboot)
        }
        _ => Ok(Next::Again),
    }
}

/// Starts schedule `id` and stages its bundle; the schedule follows the transaction, or fails
/// with the reason if none began.
pub fn start(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    device: &mut Device,
    id: &str,
) -> Result<()> {
    let now = shared.clock.now();
    let Some(s) = shared.with_book(|b| {
        let s = b.get_mut(id)?;
        s.start(now).ok()?;
        Some(s.clone())
    })?
    else {
        return Ok(());
    };
    shared.stop.store(false, Ordering::SeqCst);
    tracing::info!(schedule = %s.id, source = ?s.source, "starting a scheduled update");
    let before = device.state()?.transaction.map(|t| t.id);
    let gate = match s.rollback {
        Rollback::Automatic => Gate::Automatic,
        Rollback::Manual => Gate::Manual,
    };
    let result = stage(shared, rt, device, &s, gate);
    staged(shared, device, id, before.as_deref(), result.as_ref().err())?;
    if let Err(e) = result {
        tracing::warn!(schedule = %id, error = %e, "the scheduled update failed");
    }
    Ok(())
}

/// Carries out the fleet's schedule `id` — an application's or the agent's release — from
/// `src`, the release's bundle on the server, as a schedule's bundle is carried out: the
/// schedule follows what it did, or fails with the reason.
pub fn carry_out(
    shared: &Shared,
    device: &mut Device,
    id: &str,
    src: crate::fleet::source::HttpSource,
) -> Result<()> {
    let Some(s) = shared.book().get(id).cloned() else {
        return Ok(());
    };
    let before = device.state()?.transaction.map(|t| t.id);
    let reader = Reader {
        shared,
        body: Body::Fleet(Box::new(src)),
        check: None,
    };
    let result = stage_from(shared, device, &s, reader, Gate::Automatic);
    staged(shared, device, id, before.as_deref(), result.as_ref().err())?;
    result
}

/// Opens the schedule's source and stages what it reads.
fn stage(
    shared: &Shared,
    rt: &tokio::runtime::Handle,
    device: &mut Device,
    s: &Schedule,
    gate: Gate,
) -> Result<()> {
    let src = Reader::open(shared, rt, s)?;
    stage_from(shared, device, s, src, gate)
}

/// Stages what `src` reads for schedule `s`: an agent bundle runs the self-update, an
/// application's its update to the end, anything else is staged into the target group.
fn stage_from(
    shared: &Shared,
    device: &mut Device,
    s: &Schedule,
    mut src: Reader<'_>,
    gate: Gate,
) -> Result<()> {
    // The head says whether the bundle carries the agent itself.
    let head = match abide_bundle::BundleReader::open(&mut src, abide_bundle::Limits::default()) {
        Ok(reader) => {
            if reader
                .manifest_unverified()
                .is_ok_and(|m| crate::selfupdate::is_agent_bundle(&m))
            {
                let now = shared.clock.now();
                return match crate::selfupdate::apply(device, reader, Some(&s.id), now) {
                    Ok(never) => match never {},
                    Err(e) if e.is_refusal() => {
                        device.record(
                            now,
                            "refuse",
                            serde_json::json!({"code": e.code(), "detail": e.to_string()}),
                        )?;
                        Err(e)
                    }
                    Err(e) => Err(e),
                };
            }
            if reader
                .manifest_unverified()
                .is_ok_and(|m| crate::app::is_app_bundle(&device.config, &m))
            {
                let clock = shared.clock.clone();
                let mut last = Instant::now();
                let staged = crate::app::stage(
                    device,
                    reader,
                    Force::No,
                    clock.as_ref(),
                    &mut |done, total| {
                        if last.elapsed() >= Duration::from_millis(250) || done == total {
                            last = Instant::now();
                            shared.progress(s, done, total);
                        }
                    },
                )?;
                return update_app(shared, device, s, src.finish(), staged);
            }
            reader.head_bytes()
        }
        Err(e) => {
            let e = AgentError::from(e);
            device.record(
                shared.clock.now(),
                "refuse",
                serde_json::json!({"code": e.code(), "detail": e.to_string()}),
            )?;
            return Err(e);
        }
    };
    let mut replay = Replay {
        head: io::Cursor::new(head),
        rest: &mut src,
    };
    let mut last = Instant::now();
    let clock = shared.clock.clone();
    let staged = crate::install::stage(
        device,
        &mut replay,
        Force::No,
        gate,
        &|| clock.now(),
        &mut |done, total| {
            if last.elapsed() >= Duration::from_millis(250) || done == total {
                last = Instant::now();
                shared.progress(s, done, total);
            }
        },
    )?;
    if let Err(detail) = src.finish() {
        let now = shared.clock.now();
        crate::install::abandon(
            device,
            now,
            FailReason::Refused {
                code: "sha256-mismatch".into(),
                detail: detail.clone(),
            },
        )?;
        return Err(AgentError::State {
            path: device.config.state_dir.clone(),
            what: detail,
        });
    }
    tracing::info!(schedule = %s.id, version = %staged.transaction.version, "staged");
    Ok(())
}

/// Carries out a schedule whose bundle is an application's: staged (a URL's pinned SHA-256
/// checked over every byte before anything switches), then — unless the schedule was cancelled
/// meanwhile — driven to its commit or rollback; the schedule follows the transaction.
fn update_app(
    shared: &Shared,
    device: &mut Device,
    s: &Schedule,
    pinned: std::result::Result<(), String>,
    staged: crate::app::Staged,
) -> Result<()> {
    let clock = shared.clock.clone();
    let id = staged.transaction().id.clone();
    let version = staged
        .transaction()
        .release
        .version
        .as_ref()
        .map(ToString::to_string);
    // Under the schedules' lock: a cancel comes before (the update is abandoned) or finds the
    // schedule carried out by the transaction (and is refused).
    let cancelled = shared.with_book(|b| {
        let Some(book_s) = b.get_mut(&s.id) else {
            return true;
        };
        book_s.version = version.clone();
        if matches!(book_s.state, ScheduleState::Cancelled { .. }) {
            book_s.transaction = Some(id.clone());
            return true;
        }
        book_s.follow_app(clock.now(), staged.transaction());
        false
    })?;
    let done = match (pinned, cancelled) {
        (Err(detail), _) => crate::app::abandon(
            device,
            staged,
            &format!("sha256-mismatch: {detail}"),
            clock.as_ref(),
        )?,
        (Ok(()), true) => crate::app::abandon(device, staged, "cancelled", clock.as_ref())?,
        (Ok(()), false) => {
            shared.progress(s, 0, 0);
            crate::app::carry_on(device, staged, clock.as_ref())?
        }
    };
    let now = clock.now();
    shared.with_book(|b| {
        if let Some(book_s) = b.get_mut(&s.id) {
            book_s.follow_app(now, &done.transaction);
        }
    })?;
    if let Some(book_s) = shared.book().get(&s.id) {
        shared.progress(book_s, 0, 0);
    }
    tracing::info!(schedule = %s.id, app = %done.app, state = done.transaction.step.name(), "application update ended");
    Ok(())
}

/// A schedule's bundle as the install pipeline reads it.
struct Reader<'a> {
    shared: &'a Shared,
    body: Body<'a>,
    /// The pinned SHA-256 and the hash of what was read so far (URLs only: a file is checked
    /// whole before the install starts).
    check: Option<(String, Sha256)>,
}

enum Body<'a> {
    File(File),
    /// A fleet release on the server, by Range requests.
    Fleet(Box<crate::fleet::source::HttpSource>),
    Url {
        rt: &'a tokio::runtime::Handle,
        response: Box<reqwest::Response>,
        buf: bytes::Bytes,
        pace: Pace,
    },
}

/// The minimum download rate of `[download]`, measured window by window.
struct Pace {
    settings: crate::config::DownloadSettings,
    url: String,
    since: std::time::Instant,
    bytes: u64,
}

impl Pace {
    /// How long the current window has left.
    fn left(&self) -> std::time::Duration {
        self.settings.window.saturating_sub(self.since.elapsed())
    }

    /// Counts `n` bytes; at the end of a window, fails if it brought too few.
    fn count(&mut self, n: usize) -> io::Result<()> {
        self.bytes += n as u64;
        if !self.left().is_zero() {
            return Ok(());
        }
        let window = self.settings.window.as_secs_f64();
        let needed = (self.settings.min_rate as f64 * window) as u64;
        if self.bytes < needed {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the download from {} brought {} bytes in the last {window:.0} s, under the minimum of {} bytes/s ([download] min_rate)",
                    self.url, self.bytes, self.settings.min_rate
                ),
            ));
        }
        self.since = std::time::Instant::now();
        self.bytes = 0;
        Ok(())
    }
}

impl<'a> Reader<'a> {
    fn open(
        shared: &'a Shared,
        rt: &'a tokio::runtime::Handle,
        s: &Schedule,
    ) -> Result<Reader<'a>> {
        match &s.source {
            Source::File(path) => {
                let io = |op: &'static str| {
                    move |source| abide_fs::persist::IoError {
                        op,
                        path: path.into(),
                        source,
                    }
                };
                let mut file = File::open(path).map_err(io("opening"))?;
                if let Some(want) = &s.sha256 {
                    let mut hasher = Sha256::new();
                    let mut buf = vec![0; 1 << 20];
                    loop {
                        if shared.stop.load(Ordering::SeqCst) {
                            return Err(io("reading")(io::Error::other(Stopped)).into());
                        }
                        let n = file.read(&mut buf).map_err(io("reading"))?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                    }
                    let got = abide_bundle::Digest(hasher.finalize().into()).to_hex();
                    if &got != want {
                        return Err(AgentError::State {
                            path: path.into(),
                            what: format!(
                                "sha256 mismatch: the schedule expects {want}, the file has {got}; nothing was changed"
                            ),
                        });
                    }
                    file.seek(SeekFrom::Start(0)).map_err(io("reading"))?;
                }
                Ok(Reader {
                    shared,
                    body: Body::File(file),
                    check: None,
                })
            }
            Source::Url(url) => {
                let http = abide_client::tls::http_client(url, None, None)?;
                // Futures with timeouts are made inside the runtime.
                let response = rt
                    .block_on(async { http.get(url).send().await })
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| AgentError::State {
                        path: url.into(),
                        what: format!("fetching the bundle: {e}"),
                    })?;
                Ok(Reader {
                    shared,
                    body: Body::Url {
                        rt,
                        response: Box::new(response),
                        buf: bytes::Bytes::new(),
                        pace: Pace {
                            settings: shared.config.download,
                            url: url.clone(),
                            since: std::time::Instant::now(),
                            bytes: 0,
                        },
                    },
                    check: s.sha256.clone().map(|h| (h, Sha256::new())),
                })
            }
        }
    }

    /// Reads what is left and checks the pinned SHA-256 of a URL's bundle.
    fn finish(&mut self) -> std::result::Result<(), String> {
        if self.check.is_none() {
            return Ok(());
        }
        io::copy(self, &mut io::sink())
            .map_err(|e| format!("reading the rest of the bundle: {e}"))?;
        let (want, hasher) = self.check.take().expect("checked above");
        let got = abide_bundle::Digest(hasher.finalize().into()).to_hex();
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "sha256 mismatch: the schedule expects {want}, the bundle downloaded has {got}; the target was abandoned, never bootable"
            ))
        }
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.shared.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other(Stopped));
        }
        let n = match &mut self.body {
            Body::File(f) => f.read(out)?,
            Body::Fleet(src) => src.read(out)?,
            Body::Url {
                rt,
                response,
                buf,
                pace,
            } => {
                while buf.is_empty() {
                    // Waiting no longer than the window has left: a server that sends nothing
                    // is measured as one that sends too little.
                    let wait = if pace.settings.min_rate == 0 {
                        std::time::Duration::MAX
                    } else {
                        pace.left().max(std::time::Duration::from_millis(1))
                    };
                    match rt.block_on(async { tokio::time::timeout(wait, response.chunk()).await })
                    {
                        Ok(Ok(Some(chunk))) => {
                            pace.count(chunk.len())?;
                            *buf = chunk;
                        }
                        Ok(Ok(None)) => return Ok(0),
                        Ok(Err(e)) => return Err(io::Error::other(e)),
                        Err(_) => pace.count(0)?,
                    }
                }
                let n = out.len().min(buf.len());
                out[..n].copy_from_slice(&buf[..n]);
                *buf = buf.slice(n..);
                n
            }
        };
        if let Some((_, h)) = &mut self.check {
            h.update(&out[..n]);
        }
        Ok(n)
    }
}

impl BundleSource for Reader<'_> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        match &mut self.body {
            Body::File(f) => {
                let here = f.stream_position()?;
                let end = f.seek(SeekFrom::End(0))?;
                let to = here.saturating_add(n).min(end);
                f.seek(SeekFrom::Start(to))?;
                Ok(to - here)
            }
            Body::Fleet(src) => src.skip(n),
            // Every byte of a URL's bundle goes through the hash.
            Body::Url { .. } => io::copy(&mut self.take(n), &mut io::sink()),
        }
    }

    fn will_read(&mut self, n: u64) {
        if let Body::Fleet(src) = &mut self.body {
            src.will_read(n);
        }
    }
}

/// A source whose first bytes were read already (the bundle's head): they are read again,
/// then the rest.
struct Replay<'a, S> {
    head: io::Cursor<Vec<u8>>,
    rest: &'a mut S,
}

impl<S: Read> Read for Replay<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if (self.head.position() as usize) < self.head.get_ref().len() {
            return self.head.read(out);
        }
        self.rest.read(out)
    }
}

impl<S: BundleSource> BundleSource for Replay<'_, S> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let left = self.head.get_ref().len() as u64 - self.head.position();
        let from_head = n.min(left);
        self.head.set_position(self.head.position() + from_head);
        Ok(from_head + self.rest.skip(n - from_head)?)
    }

    fn will_read(&mut self, n: u64) {
        let left = self.head.get_ref().len() as u64 - self.head.position();
        self.rest.will_read(n.saturating_sub(left));
    }
}

/// Records a fleet assignment being carried out as a schedule (origin fleet, in progress):
/// returns its id.
pub fn fleet_schedule(shared: &Shared, url: &str, rollout: &str) -> Result<String> {
    let now = shared.clock.now();
    shared.with_book(|b| {
        let mut s = Schedule::new(
            &b.next_id(),
            Source::Url(url.to_owned()),
            None,
            When::Now,
            Rollback::Automatic,
            abide_core::schedule::Origin::Fleet {
                rollout: rollout.to_owned(),
            },
            now,
        )
        .expect("no SHA-256 to refuse");
        s.start(now).expect("a new schedule is pending");
        let id = s.id.clone();
        b.add(s);
        id
    })
}

/// After a stage (a schedule's, or a fleet download): schedule `id` follows the transaction
/// that began (one other than `before`) — a schedule cancelled meanwhile keeps its id, so that
/// its staged target is abandoned — or fails with `error` if none began.
pub fn staged(
    shared: &Shared,
    device: &Device,
    id: &str,
    before: Option<&str>,
    error: Option<&AgentError>,
) -> Result<()> {
    let tx = device
        .state()?
        .transaction
        .filter(|t| Some(t.id.as_str()) != before);
    let now = shared.clock.now();
    shared.with_book(|b| {
        let Some(s) = b.get_mut(id) else { return };
        match (&tx, error) {
            (Some(t), _) => {
                s.transaction = Some(t.id.clone());
                s.version = Some(t.version.to_string());
                s.follow(now, &t.id, &t.state);
                if let ScheduleState::Cancelled { transaction } = &mut s.state {
                    *transaction = Some(t.id.clone());
                }
            }
            (None, Some(e)) => {
                let _ = s.fail(now, &e.to_string());
            }
            (None, None) => {}
        }
    })
}
