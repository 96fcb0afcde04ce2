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

/// A source whose first bytes were read to see what it holds, and are read again.
pub struct Peeked<S> {
    head: [u8; 8],
    len: usize,
    at: usize,
    inner: S,
}

impl<S: Source> Peeked<S> {
    /// Reads up to eight bytes of `inner` and says whether they begin a bundle or a delta.
    pub fn new(mut inner: S) -> io::Result<(Option<crate::delta::Kind>, Peeked<S>)> {
        let mut head = [0u8; 8];
        let mut len = 0;
        while len < head.len() {
            match inner.read(&mut head[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let kind = crate::delta::Kind::of(&head[..len]);
        Ok((
            kind,
            Peeked {
                head,
                len,
                at: 0,
                inner,
            },
        ))
    }
}

impl<S: Source> Read for Peeked<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at < self.len {
            let n = buf.len().min(self.len - self.at);
            buf[..n].copy_from_slice(&self.head[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl<S: Source> Source for Peeked<S> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let held = ((self.len - self.at) as u64).min(n);
        self.at += held as usize;
        Ok(held + self.inner.skip(n - held)?)
    }

    fn will_read(&mut self, n: u64) {
        let held = (self.len - self.at) as u64;
        self.inner.will_read(n.saturating_sub(held));
    }
}
