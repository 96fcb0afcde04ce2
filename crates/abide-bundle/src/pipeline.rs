//! An ordered parallel map: items produced in order on the caller's thread, worked on by a
//! pool of threads, and consumed again in order on the caller's thread.
//!
//! Chunk compression (when creating) and chunk decompression plus hashing (when verifying) run
//! through it, so the sequential parts (reading, the whole-component hash, writing) overlap
//! with the per-chunk work on the other cores. At most `window` items are in flight, so memory
//! is bounded by `window` times the largest item whatever the size of the input.

use std::collections::BTreeMap;
use std::sync::{Mutex, mpsc};
use std::thread;

use crate::error::{Error, Result};

/// The number of worker threads: the machine's parallelism, at most 8.
pub fn worker_count() -> usize {
    thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
}

/// Runs `work` over the items that `produce` yields (until it yields `None`), handing each
/// result to `consume` in production order. Stops at the first error from any of the three.
pub fn ordered_map<I, O, S>(
    init: impl Fn() -> Result<S> + Sync,
    work: impl Fn(&mut S, usize, I) -> Result<O> + Sync,
    mut produce: impl FnMut(usize) -> Result<Option<I>>,
    mut consume: impl FnMut(usize, O) -> Result<()>,
) -> Result<()>
where
    I: Send,
    O: Send,
{
    let workers = worker_count();
    let window = workers * 16;
    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, I)>(window);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, Result<O>)>();
    thread::scope(|scope| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let (job_rx, init, work) = (&job_rx, &init, &work);
            scope.spawn(move || {
                let mut state = match init() {
                    Ok(state) => state,
                    Err(e) => {
                        let _ = done_tx.send((usize::MAX, Err(e)));
                        return;
                    }
                };
                loop {
                    let job = job_rx
                        .lock()
                        .map_err(|_| ())
                        .and_then(|rx| rx.recv().map_err(|_| ()));
                    let Ok((index, item)) = job else { break };
                    if done_tx
                        .send((index, work(&mut state, index, item)))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        // `job_tx` moves into this closure and is dropped when it returns, which lets the
        // workers finish even when it returns early with an error.
        let mut drive = move || -> Result<()> {
            let (mut next_in, mut next_out, mut exhausted) = (0usize, 0usize, false);
            let mut pending = BTreeMap::new();
            loop {
                while !exhausted && next_in - next_out < window {
                    match produce(next_in)? {
                        Some(item) => {
                            job_tx.send((next_in, item)).map_err(|_| worker_gone())?;
                            next_in += 1;
                        }
                        None => exhausted = true,
                    }
                }
                if exhausted && next_out == next_in {
                    return Ok(());
                }
                let (index, result) = done_rx.recv().map_err(|_| worker_gone())?;
                pending.insert(index, result?);
                while let Some(out) = pending.remove(&next_out) {
                    consume(next_out, out)?;
                    next_out += 1;
                }
            }
        };
        drive()
    })
}

/// Buffers handed back after use, so a long run reuses a few allocations instead of faulting
/// in fresh pages for every chunk.
#[derive(Default)]
pub struct BufferPool(Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// An empty buffer with at least `capacity` bytes of room.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self
            .0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    /// Returns a buffer for reuse (the pool keeps a bounded number).
    pub fn give(&self, buf: Vec<u8>) {
        if let Ok(mut pool) = self.0.lock()
            && pool.len() < 64
        {
            pool.push(buf);
        }
    }
}

fn worker_gone() -> Error {
    Error::Io {
        what: "chunk worker",
        source: std::io::Error::other("a worker thread stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_and_errors_stop_the_run() {
        let mut seen = Vec::new();
        ordered_map(
            || Ok(()),
            |_, _, x: u64| Ok(x * x),
            |i| Ok((i < 1000).then_some(i as u64)),
            |i, y| {
                seen.push((i, y));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.len(), 1000);
        assert!(seen.iter().all(|&(i, y)| y == (i as u64) * (i as u64)));

        let err = ordered_map(
            || Ok(()),
            |_, i, _: ()| {
                if i == 17 {
                    Err(Error::bad_format("seventeen"))
                } else {
                    Ok(())
                }
            },
            |i| Ok((i < 100).then_some(())),
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "bad format: seventeen");
    }
}
