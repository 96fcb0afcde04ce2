//! Making bundles: cutting components into content-defined chunks, compressing them in
//! parallel, and writing header, manifest, signatures and data in one pass.
//!
//! The compressed chunks go to a spool (a temporary file the caller provides) while the
//! components are read, because the manifest, which comes first in the bundle, records the
//! stored size and chunk table digest of every component.

use std::io::{self, Read, Seek, SeekFrom, Write};

use jiff::Timestamp;
use sha2::{Digest as _, Sha256};
use std::sync::{Arc, mpsc};
use std::thread;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{ChunkEntry, Header, SignatureEntry};
use crate::keys::{MANIFEST_DOMAIN, SecretKey};
use crate::limits::Limits;
use crate::manifest::{ChunkTableRef, Chunking, Component, Manifest};
use crate::name::{HardwareId, Name};
use crate::pipeline::ordered_map;

/// What a new bundle says about itself.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    /// The product.
    pub product: Name,
    /// Hardware ids it may be installed on.
    pub compatible: Vec<HardwareId>,
    /// The release version.
    pub version: semver::Version,
    /// The anti-rollback counter.
    pub security_version: u64,
    /// When it is made.
    pub created: Timestamp,
    /// When it expires, if ever.
    pub expires: Option<Timestamp>,
    /// Install hooks by name.
    pub hooks: Vec<Name>,
    /// Chunking parameters for every component.
    pub chunking: Chunking,
    /// zstd compression level (1 to 19).
    pub level: i32,
}

/// Builds a bundle component by component.
pub struct BundleWriter<S> {
    spec: BundleSpec,
    spool: S,
    components: Vec<Component>,
    tables: Vec<Vec<u8>>,
    offset: u64,
}

/// How much of the input to hold for chunking at once.
const READ_BLOCK: usize = 4 << 20;

impl<S: Read + Write + Seek> BundleWriter<S> {
    /// Starts a bundle; compressed chunks are spooled to `spool`, which must be empty.
    pub fn new(spec: BundleSpec, spool: S) -> Result<BundleWriter<S>> {
        let c = spec.chunking;
        let ok = fastcdc::v2020::MINIMUM_MIN <= c.min_size
            && c.min_size <= c.avg_size
            && c.avg_size <= c.max_size
            && c.min_size <= fastcdc::v2020::MINIMUM_MAX
            && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&c.avg_size)
            && c.avg_size.is_power_of_two()
            && (fastcdc::v2020::MAXIMUM_MIN..=Limits::default().max_chunk_size)
                .contains(&c.max_size);
        if !ok {
            return Err(Error::InvalidArgument {
                what: format!(
                    "chunking {c:?}: need min <= avg <= max, avg a power of two from 256 B to 4 MiB, max at most 1 MiB"
                ),
            });
        }
        if !(1..=19).contains(&spec.level) {
            return Err(Error::InvalidArgument {
                what: format!("compression level {} is not 1 to 19", spec.level),
            });
        }
        Ok(BundleWriter {
            spec,
            spool,
            components: Vec::new(),
            tables: Vec::new(),
            offset: 0,
        })
    }

    /// Reads `content` to its end and adds it as a component.
    pub fn add_component(
        &mut self,
        name: Name,
        kind: Name,
        slot_class: Name,
        content: &mut dyn Read,
    ) -> Result<&Component> {
        if self.components.iter().any(|c| c.name == name) {
            return Err(Error::InvalidArgument {
                what: format!("component {name} is given twice"),
            });
        }
        let chunking = self.spec.chunking;
        let level = self.spec.level;
        let mut cutter = Cutter::new(chunking);
        let mut size = 0u64;
        let mut table = Vec::new();
        let mut stored_total = 0u64;
        let spool = &mut self.spool;
        // The whole-component digest is sequential work: it runs on a thread of its own while
        // this thread cuts chunks and the pool compresses them.
        let (hash_tx, hash_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(64);
        let (whole, written) = thread::scope(|scope| {
            let hasher = scope.spawn(move || {
                let mut whole = Sha256::new();
                for chunk in hash_rx {
                    whole.update(chunk.as_slice());
                }
                Digest(whole.finalize().into())
            });
            let (cutter, size) = (&mut cutter, &mut size);
            let written = ordered_map(
                || {
                    let compressor =
                        zstd::bulk::Compressor::new(level).map_err(|source| Error::Io {
                            what: "starting a zstd compressor",
                            source,
                        })?;
                    Ok((compressor, None))
                },
                |(compressor, zeros): &mut (zstd::bulk::Compressor, Option<ZeroChunk>),
                 _,
                 (chunk, zero): (Arc<Vec<u8>>, bool)| {
                    // Free space in a file system image is long runs of zeros, cut into
                    // chunks of one length: those are named and compressed once per worker.
                    if let Some(z) = zeros.as_ref().filter(|z| zero && z.length == chunk.len()) {
                        return Ok((z.digest, z.stored_digest, z.length as u32, z.stored.clone()));
                    }
                    let mut stored =
                        Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk.len()));
                    compressor
                        .compress_to_buffer(&chunk, &mut stored)
                        .map_err(|source| Error::Io {
                            what: "compressing a chunk",
                            source,
                        })?;
                    let digest = Digest::of(&chunk);
                    if stored.len() >= chunk.len() {
                        // Incompressible: store it raw, named once (see `ChunkEntry::is_raw`).
                        return Ok((digest, digest, chunk.len() as u32, chunk.to_vec()));
                    }
                    let stored_digest = Digest::of(&stored);
                    if zero {
                        *zeros = Some(ZeroChunk {
                            length: chunk.len(),
                            digest,
                            stored_digest,
                            stored: stored.clone(),
                        });
                    }
                    Ok((digest, stored_digest, chunk.len() as u32, stored))
                },
                move |_| {
                    let Some((chunk, zero)) = cutter.next(content)? else {
                        return Ok(None);
                    };
                    *size += chunk.len() as u64;
                    let chunk = Arc::new(chunk);
                    hash_tx.send(Arc::clone(&chunk)).map_err(|_| Error::Io {
                        what: "hashing the component",
                        source: io::Error::other("the hashing thread stopped"),
                    })?;
                    Ok(Some((chunk, zero)))
                },
                |_, (digest, stored_digest, length, stored)| {
                    ChunkEntry {
                        digest,
                        stored_digest,
                        length,
                        stored_length: stored.len() as u32,
                    }
                    .encode_into(&mut table);
                    stored_total += stored.len() as u64;
                    spool.write_all(&stored).map_err(|source| Error::Io {
                        what: "writing the spool",
                        source,
                    })
                },
            );
            (
                hasher.join().expect("the hashing thread does not panic"),
                written,
            )
        });
        written?;
        let chunk_table = ChunkTableRef {
            digest: Digest::of(&table),
            count: (table.len() / crate::format::CHUNK_ENTRY_LEN) as u64,
            offset: self.offset,
            data_size: stored_total,
        };
        self.offset = chunk_table.end();
        self.components.push(Component {
            name,
            kind,
            slot_class,
            size,
            digest: whole,
            chunking,
            chunk_table,
        });
        self.tables.push(table);
        Ok(self.components.last().expect("just pushed"))
    }

    /// Signs the manifest with every key in `keys` and writes the whole bundle to `out`.
    ///
    /// With `S` and `W` both files, the chunk data moves from spool to bundle inside the kernel.
    pub fn finish<W: Write>(mut self, keys: &[&SecretKey], out: &mut W) -> Result<Manifest> {
        let manifest = Manifest {
            product: self.spec.product,
            compatible: self.spec.compatible,
            version: self.spec.version,
            security_version: self.spec.security_version,
            created: self.spec.created,
            expires: self.spec.expires,
            components: self.components,
            hooks: self.spec.hooks,
        };
        manifest.validate(&Limits::default())?;
        let manifest_bytes = manifest.to_canonical()?;
        let mut signatures: Vec<SignatureEntry> = Vec::new();
        for key in keys {
            let public = *key.public().as_bytes();
            if signatures.iter().any(|s| s.public == public) {
                continue;
            }
            signatures.push(SignatureEntry {
                public,
                signature: key.sign(MANIFEST_DOMAIN, &manifest_bytes),
            });
        }
        let io_err = |source| Error::Io {
            what: "writing the bundle",
            source,
        };
        write_head(out, &manifest_bytes, &signatures)?;
        self.spool.seek(SeekFrom::Start(0)).map_err(io_err)?;
        for (component, table) in manifest.components.iter().zip(&self.tables) {
            out.write_all(table).map_err(io_err)?;
            let want = component.chunk_table.data_size;
            let copied = io::copy(&mut (&mut self.spool).take(want), out).map_err(io_err)?;
            if copied != want {
                return Err(io_err(io::Error::other(
                    "the spool is shorter than what was written to it",
                )));
            }
        }
        out.flush().map_err(io_err)?;
        Ok(manifest)
    }
}

/// Writes header, manifest and signature entries.
pub fn write_head(
    out: &mut dyn Write,
    manifest: &[u8],
    signatures: &[SignatureEntry],
) -> Result<()> {
    let header = Header {
        manifest_len: u32::try_from(manifest.len())
            .map_err(|_| Error::limit("manifest length", manifest.len() as u64, u32::MAX.into()))?,
        signature_count: signatures.len() as u32,
    };
    let mut head = Vec::with_capacity(header.data_start() as usize);
    head.extend_from_slice(&header.encode());
    head.extend_from_slice(manifest);
    for s in signatures {
        head.extend_from_slice(&s.encode());
    }
    out.write_all(&head).map_err(|source| Error::Io {
        what: "writing the bundle",
        source,
    })
}

/// Adds a signature by `key` to the bundle read from `src`, writing the result to `out`.
/// The data section is copied unchanged; the key must not have signed already.
pub fn add_signature(
    src: &mut dyn Read,
    key: &SecretKey,
    out: &mut dyn Write,
    limits: Limits,
) -> Result<()> {
    let reader = crate::read::BundleReader::open(src, limits.clone())?;
    // The manifest must at least be well formed before anyone puts their name under it.
    reader.manifest_unverified()?;
    let public = *key.public().as_bytes();
    if reader.signatures().iter().any(|s| s.public == public) {
        return Err(Error::DuplicateSignature {
            key: key.public().id(),
        });
    }
    if reader.signatures().len() as u32 >= limits.max_signatures {
        return Err(Error::limit(
            "signature count",
            reader.signatures().len() as u64 + 1,
            limits.max_signatures.into(),
        ));
    }
    let mut signatures = reader.signatures().to_vec();
    signatures.push(SignatureEntry {
        public,
        signature: key.sign(MANIFEST_DOMAIN, reader.manifest_bytes()),
    });
    let manifest = reader.manifest_bytes().to_vec();
    write_head(out, &manifest, &signatures)?;
    let mut rest = reader.into_source();
    io::copy(&mut rest, out).map_err(|source| Error::Io {
        what: "copying the bundle data",
        source,
    })?;
    out.flush().map_err(|source| Error::Io {
        what: "writing the bundle",
        source,
    })
}

/// A chunk of zeros as it was named and compressed, kept to answer the next one of its length.
struct ZeroChunk {
    length: usize,
    digest: Digest,
    stored_digest: Digest,
    stored: Vec<u8>,
}

/// Whether every byte of `data` is zero: 512 bytes at a time (the compiler vectorises the
/// fold), stopping at the first block that is not.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(512)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Cuts a stream into FastCDC chunks, holding at most [`READ_BLOCK`] bytes of it.
struct Cutter {
    chunking: Chunking,
    masks: (u64, u64),
    /// Where FastCDC cuts a run of at least `max_size` zeros: its cut depends only on the
    /// bytes it reads, so it is found once and reused without hashing the zeros again.
    zero_cut: Option<usize>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Cutter {
    fn new(chunking: Chunking) -> Cutter {
        // Normalization level 1, as fastcdc's `StreamCDC::new` uses.
        let bits = fastcdc::v2020::logarithm2(chunking.avg_size) as usize;
        let masks = (
            fastcdc::v2020::MASKS[bits + 1],
            fastcdc::v2020::MASKS[bits - 1],
        );
        Cutter {
            chunking,
            masks,
            zero_cut: None,
            buf: vec![0u8; READ_BLOCK.max(chunking.max_size as usize * 2)],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// The next chunk, and whether it lies in a run of at least `max_size` zeros (then it is
    /// all zeros).
    fn next(&mut self, src: &mut dyn Read) -> Result<Option<(Vec<u8>, bool)>> {
        let max = self.chunking.max_size as usize;
        if self.end - self.start < max && !self.eof {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            while self.end < self.buf.len() && !self.eof {
                match src.read(&mut self.buf[self.end..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(Error::Io {
                            what: "reading component content",
                            source,
                        });
                    }
                }
            }
        }
        if self.start == self.end {
            return Ok(None);
        }
        let window = &self.buf[self.start..self.end];
        let zeros = window.len() >= max && is_zero(&window[..max]);
        let len = match (zeros, self.zero_cut) {
            (true, Some(len)) => len,
            _ => {
                let (mask_s, mask_l) = self.masks;
                let (_, len) = fastcdc::v2020::cut(
                    window,
                    self.chunking.min_size as usize,
                    self.chunking.avg_size as usize,
                    max,
                    mask_s,
                    mask_l,
                    mask_s << 1,
                    mask_l << 1,
                );
                if zeros {
                    self.zero_cut = Some(len);
                }
                len
            }
        };
        let chunk = window[..len].to_vec();
        self.start += len;
        Ok(Some((chunk, zeros)))
    }
}
