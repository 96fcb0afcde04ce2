//! Checking and decoding a component's chunks: stored bytes against their digest, then
//! decompression bounded by the declared length; with [`Checks::Every`] also the content
//! against the chunk's name and the whole-component digest over everything, in order.
//!
//! One hash pass is enough for safety: once a chunk's stored bytes match the signed chunk
//! table, what they decompress to is fixed (zstd decoding is deterministic, and its length is
//! checked), so hashing the content again can only catch a bug in the writer that made the
//! bundle or in the decompressor. [`Checks::Every`] is for that: the fleet server checks every
//! upload with it, so a bundle a fleet serves has passed every hash once.
//!
//! A raw chunk (stored digest equal to its name) is its own content: one hash checks it and
//! nothing is decompressed. Chunks whose table entries repeat (the zero-filled free space of a file system image, say)
//! are decoded once: a later copy's stored bytes are still hashed and compared, and since equal
//! stored bytes decompress to equal content, the content checked the first time is reused.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::ChunkEntry;
use crate::manifest::Component;
use crate::pipeline::{BufferPool, ordered_map};
use crate::read::Counted;
use crate::source::Source;

/// How much a reader hashes beyond the signed stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Checks {
    /// Each chunk's stored bytes against the signed chunk table, before the decompressor sees
    /// them (one SHA-256 pass; the content follows from them).
    #[default]
    Stored,
    /// Also each decompressed chunk against its name and the component against its digest
    /// (three passes): catches a writer's or a decompressor's bug.
    Every,
}

impl Checks {
    /// [`Checks::Every`] when `paranoid` (the `--paranoid` flag, `paranoid = true`), else
    /// [`Checks::Stored`].
    pub fn paranoid(paranoid: bool) -> Checks {
        if paranoid {
            Checks::Every
        } else {
            Checks::Stored
        }
    }
}

/// Most distinct repeated chunks kept decoded at once (each at most the chunk size limit).
const REPEAT_CACHE: usize = 16;

/// Reads, checks and hands to `sink` every chunk of `component`, then checks its digest.
pub(crate) fn read_chunks<R: Read>(
    src: &mut Counted<R>,
    component: &Component,
    table: &[ChunkEntry],
    checks: Checks,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<()> {
    let pool = BufferPool::default();
    let mut produce = |index: usize| -> Result<Option<Item>> {
        let Some(entry) = table.get(index) else {
            return Ok(None);
        };
        let mut stored = pool.take(entry.stored_length as usize);
        stored.resize(entry.stored_length as usize, 0);
        src.read_exact_as(&mut stored, "chunk data")?;
        Ok(Some(Item::Stored(stored)))
    };
    decode_all(component, table, checks, &pool, &mut produce, sink)
}

/// How many local chunk results the reader may hold ahead of the chunk it hands on.
const LOCAL_AHEAD: usize = 32;

/// What [`read_chunks_reusing`] took from where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Chunks taken from the local copy.
    pub chunks: u64,
    /// Their content bytes.
    pub bytes: u64,
    /// Stored bundle bytes passed over for them.
    pub skipped: u64,
}

/// [`read_chunks`], taking each chunk from `local` when it offers content with the chunk's
/// name, and then passing over the chunk's stored bytes.
pub(crate) fn read_chunks_reusing<R: Source>(
    src: &mut Counted<R>,
    component: &Component,
    table: &[ChunkEntry],
    checks: Checks,
    local: &(dyn Fn(&ChunkEntry, &mut Vec<u8>) -> bool + Sync),
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<Reuse> {
    let pool = BufferPool::default();
    let mut reuse = Reuse::default();
    // A thread of its own fetches local copies ahead, in table order, and keeps only those
    // that hash to the chunk's name; this thread then passes over or reads each chunk's
    // stored bytes, in order. Its buffers come from the pool the other threads return
    // theirs to, so memory stays that of the pipeline window.
    let (local_tx, local_rx) = std::sync::mpsc::sync_channel::<Option<Vec<u8>>>(LOCAL_AHEAD);
    let pool = &pool;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for entry in table {
                let mut buf = pool.take(entry.length as usize);
                let content = if local(entry, &mut buf)
                    && buf.len() == entry.length as usize
                    && Digest::of(&buf) == entry.digest
                {
                    Some(buf)
                } else {
                    pool.give(buf);
                    None
                };
                if local_tx.send(content).is_err() {
                    break;
                }
            }
        });
        // The local results known so far, in table order: they say how many of the next
        // chunks must be read from the bundle in one run (a hint for network sources).
        let mut ahead: std::collections::VecDeque<Option<Vec<u8>>> = Default::default();
        let mut produce = |index: usize| -> Result<Option<Item>> {
            let Some(entry) = table.get(index) else {
                return Ok(None);
            };
            if ahead.is_empty() {
                let next = local_rx.recv().map_err(|_| Error::Io {
                    what: "reading local chunks",
                    source: io::Error::other("the local chunk reader stopped"),
                })?;
                ahead.push_back(next);
            }
            // Bounded like the channel, so memory stays that of the pipeline window.
            while ahead.len() < LOCAL_AHEAD {
                match local_rx.try_recv() {
                    Ok(next) => ahead.push_back(next),
                    Err(_) => break,
                }
            }
            let fetched = ahead.pop_front().expect("filled above");
            if let Some(content) = fetched {
                src.skip_as(entry.stored_length.into(), "chunk data")?;
                reuse.chunks += 1;
                reuse.bytes += content.len() as u64;
                reuse.skipped += u64::from(entry.stored_length);
                return Ok(Some(Item::Local(content)));
            }
            let run: u64 = u64::from(entry.stored_length)
                + ahead
                    .iter()
                    .zip(&table[index + 1..])
                    .take_while(|(local, _)| local.is_none())
                    .map(|(_, e)| u64::from(e.stored_length))
                    .sum::<u64>();
            src.inner.will_read(run);
            let mut stored = pool.take(entry.stored_length as usize);
            stored.resize(entry.stored_length as usize, 0);
            src.read_exact_as(&mut stored, "chunk data")?;
            Ok(Some(Item::Stored(stored)))
        };
        let decoded = decode_all(component, table, checks, pool, &mut produce, sink);
        // Dropping the receiver stops the fetcher if decoding ended early.
        drop(local_rx);
        decoded
    })?;
    Ok(reuse)
}

/// A chunk on its way to the workers.
enum Item {
    /// Stored bytes from the bundle, to be checked and decoded.
    Stored(Vec<u8>),
    /// Content already checked against the chunk's name.
    Local(Vec<u8>),
}

fn decode_all(
    component: &Component,
    table: &[ChunkEntry],
    checks: Checks,
    pool: &BufferPool,
    produce: &mut dyn FnMut(usize) -> Result<Option<Item>>,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<()> {
    let repeats = Repeats::new(table);
    let every = checks == Checks::Every;
    // The whole-component digest is sequential work: a thread of its own does it while this
    // thread reads and hands on, and the workers check and decode. Without it (one pass)
    // there is no such thread: the content goes straight back to the pool.
    let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(16);
    let (actual, decoded) = std::thread::scope(|scope| {
        let hasher = every.then(|| {
            scope.spawn(move || {
                let mut whole = Sha256::new();
                for content in hash_rx {
                    whole.update(content.as_slice());
                    if let Ok(buf) = Arc::try_unwrap(content) {
                        pool.give(buf);
                    }
                }
                Digest(whole.finalize().into())
            })
        });
        let decoded = ordered_map(
            || {
                zstd::bulk::Decompressor::new().map_err(|source| Error::Io {
                    what: "starting a zstd decompressor",
                    source,
                })
            },
            |decompressor, index, item: Item| {
                let entry = &table[index];
                let stored = match item {
                    Item::Local(content) => return Ok(Arc::new(content)),
                    Item::Stored(stored) => stored,
                };
                if entry.is_raw() {
                    // The stored bytes are the content: one hash checks both.
                    return check_stored(component, index, entry, &stored)
                        .map(|()| Arc::new(stored));
                }
                let result = check_stored(component, index, entry, &stored).and_then(|()| {
                    if let Some(content) = repeats.get(entry) {
                        return Ok(content);
                    }
                    let mut content = pool.take(entry.length as usize);
                    decode_into(decompressor, component, index, entry, &stored, &mut content)?;
                    if every {
                        check_name(component, index, entry, &content)?;
                    }
                    Ok(Arc::new(content))
                });
                pool.give(stored);
                result
            },
            produce,
            |index, content: Arc<Vec<u8>>| {
                let written = sink(&content).map_err(|source| Error::Io {
                    what: "writing component content",
                    source,
                });
                repeats.offer(&table[index], &content);
                if every {
                    hash_tx.send(content).map_err(|_| Error::Io {
                        what: "hashing the component",
                        source: io::Error::other("the hashing thread stopped"),
                    })?;
                } else if let Ok(buf) = Arc::try_unwrap(content) {
                    pool.give(buf);
                }
                written
            },
        );
        drop(hash_tx);
        (
            hasher.map(|h| h.join().expect("the hashing thread does not panic")),
            decoded,
        )
    });
    decoded?;
    if let Some(actual) = actual
        && actual != component.digest
    {
        return Err(Error::ComponentDigest {
            component: component.name.to_string(),
            expected: component.digest,
            actual,
        });
    }
    Ok(())
}

/// Checks one stored chunk against its stored digest, decompresses it into at most its
/// declared length, and checks the content against the chunk's name.
pub fn open_chunk(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    component: &Component,
    index: usize,
    entry: &ChunkEntry,
    stored: &[u8],
) -> Result<Vec<u8>> {
    check_stored(component, index, entry, stored)?;
    if entry.is_raw() {
        return Ok(stored.to_vec());
    }
    let mut content = Vec::new();
    decode_into(decompressor, component, index, entry, stored, &mut content)?;
    check_name(component, index, entry, &content)?;
    Ok(content)
}

/// Checks that the stored bytes are the ones the (signed) chunk table names, before any
/// decompressor sees them. For a raw chunk this also checks its content.
fn check_stored(
    component: &Component,
    index: usize,
    entry: &ChunkEntry,
    stored: &[u8],
) -> Result<()> {
    if Digest::of(stored) != entry.stored_digest {
        return Err(Error::StoredDigest {
            component: component.name.to_string(),
            index,
            expected: entry.stored_digest,
        });
    }
    Ok(())
}

/// Decompresses checked stored bytes into `content` (its old bytes are dropped) and checks the
/// length.
fn decode_into(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    component: &Component,
    index: usize,
    entry: &ChunkEntry,
    stored: &[u8],
    content: &mut Vec<u8>,
) -> Result<()> {
    let declared = entry.length as usize;
    content.clear();
    content.reserve(declared);
    // zstd writes into the vector's spare capacity and never past it. The capacity is at least
    // the declared length and, for reused buffers, at most the largest chunk seen, so memory
    // stays bounded; output past the declared length is refused below.
    match decompressor.decompress_to_buffer(stored, content) {
        Ok(n) if n == declared => {}
        Ok(n) if n > declared => {
            return Err(Error::DecompressionBomb {
                component: component.name.to_string(),
                index,
                declared: entry.length,
            });
        }
        Ok(n) => {
            return Err(Error::ChunkCorrupt {
                component: component.name.to_string(),
                index,
                what: format!("decompresses to {n} bytes, the table says {declared}"),
            });
        }
        Err(_) if expands_past(stored, declared) => {
            return Err(Error::DecompressionBomb {
                component: component.name.to_string(),
                index,
                declared: entry.length,
            });
        }
        Err(e) => {
            return Err(Error::ChunkCorrupt {
                component: component.name.to_string(),
                index,
                what: format!("not a valid zstd frame: {e}"),
            });
        }
    }
    Ok(())
}

/// Checks decompressed content against the chunk's name.
fn check_name(
    component: &Component,
    index: usize,
    entry: &ChunkEntry,
    content: &[u8],
) -> Result<()> {
    if Digest::of(content) != entry.digest {
        return Err(Error::ChunkDigest {
            component: component.name.to_string(),
            index,
            expected: entry.digest,
        });
    }
    Ok(())
}

/// Whether `stored` decompresses to more than `declared` bytes; reads at most `declared` + 1.
fn expands_past(stored: &[u8], declared: usize) -> bool {
    let Ok(decoder) = zstd::stream::read::Decoder::with_buffer(stored) else {
        return false;
    };
    let mut limited = decoder.take(declared as u64 + 1);
    let mut buf = [0u8; 16 << 10];
    let mut total = 0usize;
    loop {
        match limited.read(&mut buf) {
            Ok(0) | Err(_) => return total > declared,
            Ok(n) => total += n,
        }
    }
}

/// What identifies a chunk's content completely: stored digest, name and length.
type RepeatKey = (Digest, Digest, u32);

/// Decoded content of chunks that occur more than once in a table, kept for their repeats.
struct Repeats {
    wanted: HashSet<RepeatKey>,
    cache: Mutex<HashMap<RepeatKey, Arc<Vec<u8>>>>,
}

impl Repeats {
    fn new(table: &[ChunkEntry]) -> Repeats {
        let mut keys: Vec<RepeatKey> = table.iter().map(key).collect();
        keys.sort_unstable();
        let wanted = keys
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        Repeats {
            wanted,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The checked content of an earlier chunk with the same entry, if kept.
    fn get(&self, entry: &ChunkEntry) -> Option<Arc<Vec<u8>>> {
        let k = key(entry);
        if !self.wanted.contains(&k) {
            return None;
        }
        self.cache.lock().ok()?.get(&k).cloned()
    }

    /// Keeps checked content of a repeated entry, up to [`REPEAT_CACHE`] of them.
    fn offer(&self, entry: &ChunkEntry, content: &Arc<Vec<u8>>) {
        let k = key(entry);
        if !self.wanted.contains(&k) {
            return;
        }
        if let Ok(mut cache) = self.cache.lock()
            && cache.len() < REPEAT_CACHE
        {
            cache.entry(k).or_insert_with(|| Arc::clone(content));
        }
    }
}

fn key(e: &ChunkEntry) -> RepeatKey {
    (e.stored_digest, e.digest, e.length)
}
