//! [`Shared`]: what the local API's handlers and the agent's loop hold together — the
//! schedules (every change stored before it is answered), the signal that stops a running
//! download, the wake-up of the loop, and the stream of progress events.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use abide_agent_api as pb;
use abide_core::schedule::{Schedule, ScheduleState};
use jiff::Timestamp;
use tokio::sync::broadcast;

use crate::book::Book;
use crate::config::Config;
use crate::error::Result;
use crate::health::Clock;
use crate::state::DeviceRecord;

/// What the API's handlers and the agent's loop share.
pub struct Shared {
    /// The device's configuration, as the agent started with it.
    pub config: Config,
    /// The agent's clock.
    pub clock: Arc<dyn Clock + Send + Sync>,
    book: Mutex<Book>,
    /// Set to stop the running schedule's download.
    pub stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    progress: broadcast::Sender<pb::ProgressEvent>,
    /// The last successful check-in with the fleet server.
    pub last_checkin: Mutex<Option<Timestamp>>,
    /// When this agent process started.
    pub started: Timestamp,
}

impl Shared {
    /// Loads the device's schedules.
    pub fn new(config: Config, clock: Arc<dyn Clock + Send + Sync>) -> Result<Arc<Shared>> {
        let book = Book::load(&config.state_dir)?;
        Ok(Arc::new(Shared {
            config,
            started: clock.now(),
            clock,
            book: Mutex::new(book),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            progress: broadcast::channel(256).0,
            last_checkin: Mutex::new(None),
        }))
    }

    /// A copy of the schedules.
    pub fn book(&self) -> Book {
        self.book.lock().expect("not poisoned").clone()
    }

    /// Changes the schedules under their lock: `f`'s changes are stored (atomically) before
    /// anyone else sees them, and each schedule that changed is announced to watchers. If
    /// storing fails, nothing changed.
    pub fn with_book<R>(&self, f: impl FnOnce(&mut Book) -> R) -> Result<R> {
        let mut book = self.book.lock().expect("not poisoned");
        let before = book.clone();
        let r = f(&mut book);
        if *book != before {
            if let Err(e) = book.store(&self.config.state_dir) {
                *book = before;
                return Err(e);
            }
            let tx = DeviceRecord::load(&self.config.state_dir)
                .ok()
                .and_then(|s| s.transaction);
            for s in &book.schedules {
                if before.get(&s.id) != Some(s) {
                    self.emit(event(s, tx.as_ref(), 0, 0, self.clock.now()));
                }
            }
        }
        Ok(r)
    }

    /// Announces the running schedule's progress: `bytes` of `total` read.
    pub fn progress(&self, schedule: &Schedule, bytes: u64, total: u64) {
        let tx = DeviceRecord::load(&self.config.state_dir)
            .ok()
            .and_then(|s| s.transaction);
        self.emit(event(schedule, tx.as_ref(), bytes, total, self.clock.now()));
    }

    /// Gives watchers a moment to hear the last events before the agent stops for a reboot.
    pub fn drain(&self) {
        if self.progress.receiver_count() > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A receiver of the progress events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::ProgressEvent> {
        self.progress.subscribe()
    }

    fn emit(&self, event: pb::ProgressEvent) {
        // No receiver is no watcher: nothing to do.
        let _ = self.progress.send(event);
    }

    /// Wakes the agent's loop (a schedule was added or cancelled).
    pub fn wake(&self) {
        let (flag, cv) = &self.wake;
        *flag.lock().expect("not poisoned") = true;
        cv.notify_all();
    }

    /// Waits up to `d`, or until [`Shared::wake`].
    pub fn wait(&self, d: Duration) {
        let (flag, cv) = &self.wake;
        let mut woken = flag.lock().expect("not poisoned");
        if !*woken {
            woken = cv.wait_timeout(woken, d).expect("not poisoned").0;
        }
        *woken = false;
    }
}

/// A progress event for `schedule` at `now`; `tx` is the device's transaction (shown only if it
/// is the schedule's).
pub fn event(
    schedule: &Schedule,
    tx: Option<&abide_core::Transaction>,
    bytes: u64,
    total: u64,
    now: Timestamp,
) -> pb::ProgressEvent {
    let tx = tx.filter(|t| {
        schedule.transaction.as_deref() == Some(t.id.as_str())
            || matches!(schedule.state, ScheduleState::InProgress { .. })
    });
    let view = crate::api::schedule(schedule);
    pb::ProgressEvent {
        time: now.to_string(),
        schedule: schedule.id.clone(),
        state: view.state,
        transaction: tx.map(|t| t.id.clone()).unwrap_or(view.transaction),
        transaction_state: tx.map(|t| t.state.name().to_owned()).unwrap_or_default(),
        bytes,
        total,
        reason: view.reason,
    }
}
