//! A bundle read from the fleet server with HTTP Range requests, as a [`Source`] for the
//! install pipeline: no temporary copy, every byte checked by the pipeline before it is
//! written. Chunks the running group already holds are passed over without being fetched.
//! The reader says how many bytes it will read in a row ([`Source::will_read`]: the chunks the
//! running group lacks, up to the next one it has), and exactly that is asked for. A request
//! that breaks off is resumed from the first byte not yet received, after a pause that doubles
//! with each failure in a row (100 ms up to 10 s, each with random jitter of up to as much
//! again, so that devices cut off together do not come back together); only a run of
//! failures without progress gives up.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use abide_bundle::Source;
use abide_client::DeviceClient;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The largest range asked for at once; after a pass-over the window starts small again, so
/// that bytes fetched past the next passed-over chunk stay few.
const MAX_WINDOW: u64 = 4 << 20;
const MIN_WINDOW: u64 = 64 << 10;

/// Failures in a row without a byte of progress before the download gives up.
pub const MAX_FAILURES: u32 = 8;

/// The pauses before resuming, one per failure in a row; `None` after [`MAX_FAILURES`].
fn resumes() -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_factor(2.0)
        .with_max_times(MAX_FAILURES as usize)
        .with_jitter()
        .build()
}

/// The error a download stopped on purpose ends with ([`Meter::cancel`]); not `Interrupted`,
/// which readers retry.
#[derive(Debug, thiserror::Error)]
#[error("the download was stopped (the fleet withdrew the release, or an operator cancelled it)")]
pub struct Stopped;

/// Counters a download shares with whoever watches it.
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes received from the server.
    pub fetched: AtomicU64,
    /// Bytes handed to the pipeline or passed over.
    pub consumed: AtomicU64,
    /// Requests that broke off and were resumed.
    pub resumed: AtomicU64,
    /// Set to stop the download (the assignment was withdrawn, or the agent stops).
    pub cancel: AtomicBool,
}

/// A bundle on the server, read by ranges.
pub struct HttpSource {
    rt: tokio::runtime::Handle,
    device: DeviceClient,
    url: String,
    size: u64,
    /// The offset of the first byte in `buf[at..]`.
    pos: u64,
    buf: Vec<u8>,
    at: usize,
    window: u64,
    /// The reader said it will read every byte up to here ([`Source::will_read`]).
    hinted_end: u64,
    meter: Arc<Meter>,
    resumes: ExponentialBackoff,
}

impl HttpSource {
    /// The bundle at `url` (a path on the server) of `size` bytes; call from a thread that may
    /// block (not from inside the runtime `rt`).
    pub fn new(
        rt: tokio::runtime::Handle,
        device: DeviceClient,
        url: &str,
        size: u64,
        meter: Arc<Meter>,
    ) -> HttpSource {
        HttpSource {
            rt,
            device,
            url: url.to_owned(),
            size,
            pos: 0,
            buf: Vec::new(),
            at: 0,
            window: MIN_WINDOW,
            hinted_end: 0,
            meter,
            resumes: resumes(),
        }
    }

    /// Fetches the next window into `buf`, resuming a request that breaks off: exactly the
    /// run the reader said it will read, when it said so; otherwise a window that grows
    /// while nothing is passed over.
    fn fill(&mut self) -> io::Result<()> {
        let start = self.pos;
        let hinted = self.hinted_end > start;
        let want = if hinted {
            (self.hinted_end - start).min(MAX_WINDOW)
        } else {
            self.window
        };
        let len = want.min(self.size - start);
        self.buf.clear();
        self.at = 0;
        while (self.buf.len() as u64) < len {
            if self.meter.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other(Stopped));
            }
            let from = start + self.buf.len() as u64;
            let want = len - self.buf.len() as u64;
            let before = self.buf.len();
            let result = self.rt.block_on(async {
                let mut resp = self.device.range(&self.url, from, want).await?;
                while let Some(piece) =
                    resp.chunk()
                        .await
                        .map_err(|e| abide_client::ClientError::Http {
                            what: format!("GET {}", self.url),
                            detail: e.to_string(),
                        })?
                {
                    if self.meter.cancel.load(Ordering::Relaxed) {
                        // Checked again at the top of the loop, which stops the download.
                        break;
                    }
                    let room = (want as usize).saturating_sub(self.buf.len() - before);
                    let take = piece.len().min(room);
                    self.buf.extend_from_slice(&piece[..take]);
                    self.meter.fetched.fetch_add(take as u64, Ordering::Relaxed);
                }
                Ok::<(), abide_client::ClientError>(())
            });
            let progressed = self.buf.len() > before;
            let complete = self.buf.len() as u64 >= len;
            if self.meter.cancel.load(Ordering::Relaxed) && !complete {
                continue;
            }
            match result {
                Ok(()) if complete => break,
                outcome => {
                    if progressed {
                        self.resumes = resumes();
                    }
                    self.meter.resumed.fetch_add(1, Ordering::Relaxed);
                    let why = match outcome {
                        Err(e) => e.to_string(),
                        Ok(()) => "the answer ended early".to_owned(),
                    };
                    let Some(pause) = self.resumes.next() else {
                        return Err(io::Error::other(format!(
                            "downloading {} at byte {from}: {why} ({MAX_FAILURES} tries in a row)",
                            self.url
                        )));
                    };
                    tracing::warn!(url = %self.url, offset = from, %why, ?pause, "download broke off; resuming");
                    std::thread::sleep(pause);
                }
            }
        }
        if !hinted {
            self.window = (self.window * 2).min(MAX_WINDOW);
        }
        Ok(())
    }
}

impl Read for HttpSource {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            if self.pos >= self.size || out.is_empty() {
                return Ok(0);
            }
            self.fill()?;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        self.pos += n as u64;
        self.meter.consumed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Source for HttpSource {
    fn will_read(&mut self, n: u64) {
        self.hinted_end = self.pos + n;
    }

    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let n = n.min(self.size - self.pos);
        let buffered = (self.buf.len() - self.at) as u64;
        if n <= buffered {
            self.at += n as usize;
        } else {
            // Past what was fetched: drop it, and start the next window small.
            self.buf.clear();
            self.at = 0;
            self.window = MIN_WINDOW;
        }
        self.pos += n;
        self.meter.consumed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_double_from_100_ms_to_10_s_with_jitter_and_end_after_max_failures() {
        let pauses: Vec<Duration> = resumes().collect();
        assert_eq!(pauses.len(), MAX_FAILURES as usize);
        let mut base = Duration::from_millis(100);
        for p in &pauses {
            // Jitter adds up to the pause itself, never takes away.
            assert!(
                *p >= base && *p <= base * 2,
                "{p:?} outside [{base:?}, {:?}]",
                base * 2
            );
            base = (base * 2).min(Duration::from_secs(10));
        }
        // Two runs do not pause alike: devices cut off together come back apart.
        let again: Vec<Duration> = resumes().collect();
        assert_ne!(pauses, again);
    }
}
