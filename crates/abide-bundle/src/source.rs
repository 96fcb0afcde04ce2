//! Where a bundle's bytes come from: anything readable front to back. A source that can seek
//! passes over the bytes a reader does not need (the chunks a device already has) without
//! reading them; any other source reads and discards them.

use std::io::{self, Read};

/// A bundle's bytes.
pub trait Source: Read {
    /// Passes over up to `n` bytes and returns how many there were.
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut self.take(n), &mut io::sink())
    }

    /// A hint: the reader will read the next `n` bytes, every one of them (and may pass over
    /// what follows). A source that fetches ahead, over a network, fetches that much and no
    /// more; others ignore it.
    fn will_read(&mut self, n: u64) {
        let _ = n;
    }
}

impl Source for &[u8] {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let k = (n as usize).min(self.len());
        *self = &self[k..];
        Ok(k as u64)
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip(n)
    }

    fn will_read(&mut self, n: u64) {
        (**self).will_read(n)
    }
}

impl<S: Source + ?Sized> Source for Box<S> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip(n)
    }

    fn will_read(&mut self, n: u64) {
        (**self).will_read(n)
    }
}

/// Any reader as a source that skips by reading.
pub struct Stream<R>(pub R);

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> Source for Stream<R> {}
