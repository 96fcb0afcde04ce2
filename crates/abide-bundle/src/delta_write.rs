//! Making deltas: which old bytes each run of new chunks is compressed against, and the
//! delta file itself (layout in [`crate::delta`]).
//!
//! The plan follows the chunks both releases share. Walking the new chunk table, each chunk
//! the old release also holds is an *anchor*: it fixes where the new content stands in the
//! old (the occurrence nearest to where the last anchor says it should be, so repeated chunks
//! such as zero-filled blocks do not mislead it). A run of chunks the old release lacks sits
//! between two anchors, and the old bytes between the same two anchors are what it most
//! likely changed from: a rebuilt library in the file system image, an inode table, a
//! directory block. That stretch, widened by a margin and cut to the reference limit, is the
//! run's reference. Long runs are split; each piece takes its share of the stretch.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};

use crate::delta::{
    BaseComponent, DeltaFrom, DeltaHead, PATCH_ENTRY_LEN, Patch, ReadAt, encode_header,
    index_digest,
};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{ChunkEntry, HEADER_LEN, Header};
use crate::limits::{Limits, stored_bound};
use crate::manifest::Manifest;
use crate::pipeline::ordered_map;

/// How a delta is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaOptions {
    /// zstd level of the patches (1 to 19; default 19).
    pub level: i32,
    /// Most content one patch produces (default 8 MiB, at most the reader's limit).
    pub max_patch_content: u32,
    /// Longest reference of one patch (default 16 MiB, at most the reader's limit).
    pub max_prefix: u32,
    /// Old bytes added on each side of the stretch between two anchors (default 256 KiB).
    pub margin: u32,
}

impl Default for DeltaOptions {
    fn default() -> Self {
        DeltaOptions {
            level: 19,
            max_patch_content: 8 << 20,
            max_prefix: 16 << 20,
            margin: 256 << 10,
        }
    }
}

/// A patch before its frame is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedPatch {
    /// The first new chunk it produces.
    pub first: u32,
    /// How many chunks.
    pub count: u32,
    /// Where its reference starts in the old content.
    pub prefix_offset: u64,
    /// The reference's length.
    pub prefix_len: u32,
}

/// Plans the patches of one component: every new chunk `old` lacks is in exactly one, and
/// each names the old bytes it is compressed against. `old` is `None` when the old release
/// filled no slot of this class (the patches then have no reference).
pub fn plan(
    old: Option<&[ChunkEntry]>,
    new: &[ChunkEntry],
    options: &DeltaOptions,
) -> Vec<PlannedPatch> {
    let old = old.unwrap_or(&[]);
    let mut old_start = Vec::with_capacity(old.len() + 1);
    let mut at = 0u64;
    for e in old {
        old_start.push(at);
        at += u64::from(e.length);
    }
    let old_size = at;
    let mut where_old: HashMap<Digest, Vec<u64>> = HashMap::new();
    for (e, &start) in old.iter().zip(&old_start) {
        where_old.entry(e.digest).or_default().push(start);
    }
    // Where each new chunk starts in the old content: the chosen occurrence of an anchor, or
    // for a chunk the old release lacks, the place the last anchor predicts.
    let mut new_start = Vec::with_capacity(new.len());
    let mut at = 0u64;
    for e in new {
        new_start.push(at);
        at += u64::from(e.length);
    }
    let mut drift: i128 = 0;
    let mut anchor: Vec<Option<u64>> = Vec::with_capacity(new.len());
    let mut drift_at: Vec<i128> = Vec::with_capacity(new.len());
    for (e, &start) in new.iter().zip(&new_start) {
        drift_at.push(drift);
        let chosen = where_old.get(&e.digest).map(|occ| {
            let want = (i128::from(start) + drift).clamp(0, i128::from(old_size)) as u64;
            let k = occ.partition_point(|&o| o < want);
            let candidates = [k.checked_sub(1), Some(k)];
            candidates
                .into_iter()
                .flatten()
                .filter_map(|k| occ.get(k).copied())
                .min_by_key(|&o| o.abs_diff(want))
                .expect("an occurrence")
        });
        if let Some(o) = chosen {
            drift = i128::from(o) - i128::from(start);
        }
        anchor.push(chosen);
    }
    let mut patches = Vec::new();
    let mut i = 0usize;
    while i < new.len() {
        if anchor[i].is_some() {
            i += 1;
            continue;
        }
        let s = i;
        while i < new.len() && anchor[i].is_none() {
            i += 1;
        }
        let e = i;
        let run_start = new_start[s];
        let run_len = new_start.get(e).copied().unwrap_or(at) - run_start;
        // The stretch of old bytes between the anchors around the run.
        let predicted = (i128::from(run_start) + drift_at[s]).clamp(0, i128::from(old_size)) as u64;
        let lo = match s.checked_sub(1) {
            Some(p) => anchor[p].expect("an anchor") + u64::from(new[p].length),
            None => predicted,
        };
        let hi = match anchor.get(e) {
            Some(Some(o)) => *o,
            _ => lo.saturating_add(run_len).min(old_size),
        };
        let (lo, stretch) = if hi >= lo && hi - lo <= run_len.saturating_mul(4) + (4 << 20) {
            (lo, hi - lo)
        } else {
            // The anchors disagree (content moved): take as much old content as the run,
            // where the run should be.
            (predicted, run_len)
        };
        // Split into pieces of at most `max_patch_content`, each with its share of the stretch.
        let mut a = s;
        while a < e {
            let mut b = a;
            let mut content = 0u64;
            while b < e
                && content + u64::from(new[b].length) <= u64::from(options.max_patch_content)
            {
                content += u64::from(new[b].length);
                b += 1;
            }
            if b == a {
                b = a + 1;
            }
            let share = |x: u64| -> u64 {
                if run_len == 0 {
                    return lo;
                }
                lo + ((u128::from(x - run_start) * u128::from(stretch)) / u128::from(run_len))
                    as u64
            };
            let piece_end = new_start.get(b).copied().unwrap_or(at);
            let from = share(new_start[a]).saturating_sub(options.margin.into());
            let to = share(piece_end)
                .saturating_add(options.margin.into())
                .min(old_size);
            let (mut from, mut len) = (from.min(old_size), to.saturating_sub(from));
            if len > u64::from(options.max_prefix) {
                // Keep the middle of the stretch.
                from += (len - u64::from(options.max_prefix)) / 2;
                len = options.max_prefix.into();
            }
            if old.is_empty() {
                (from, len) = (0, 0);
            }
            patches.push(PlannedPatch {
                first: a as u32,
                count: (b - a) as u32,
                prefix_offset: from,
                prefix_len: len as u32,
            });
            a = b;
        }
    }
    patches
}

/// A release read out for making deltas: its head, manifest and chunk tables, and each
/// component's content in a spool of the caller's (a file).
pub struct Loaded<F> {
    /// The head exactly as stored.
    pub head: Vec<u8>,
    /// The manifest.
    pub manifest: Manifest,
    /// The chunk tables.
    pub tables: Vec<Vec<ChunkEntry>>,
    /// The content, one spool per component.
    pub content: Vec<Positional<F>>,
}

impl<F: Write> Loaded<F> {
    /// Reads every component of `bundle` (already verified, or opened without signatures by
    /// a tool whose output is verified again) with every hash checked, into the spools
    /// `spool` opens, one per component.
    pub fn read<R: std::io::Read>(
        mut bundle: crate::read::VerifiedBundle<R>,
        head: Vec<u8>,
        spool: &mut dyn FnMut(&crate::manifest::Component) -> std::io::Result<F>,
    ) -> Result<Loaded<F>> {
        bundle.set_checks(crate::chunks::Checks::Every);
        let manifest = bundle.manifest().clone();
        let mut tables = Vec::new();
        let mut content = Vec::new();
        for c in &manifest.components {
            let mut file = spool(c).map_err(|source| Error::Io {
                what: "creating a spool",
                source,
            })?;
            let table = bundle.read_chunk_table()?;
            let mut writer = std::io::BufWriter::with_capacity(1 << 20, &mut file);
            bundle.read_chunks(&table, &mut |data| writer.write_all(data))?;
            writer.flush().map_err(|source| Error::Io {
                what: "writing a spool",
                source,
            })?;
            drop(writer);
            tables.push(table);
            content.push(Positional(file));
        }
        bundle.finish()?;
        Ok(Loaded {
            head,
            manifest,
            tables,
            content,
        })
    }
}

/// Applies `delta` to the content of `old`, the bundle it was made from (read out into the
/// spools `spool` opens, every hash checked), with every chunk checked against the new
/// release's signed names, to its end; returns what a device running `old` would read of
/// the new bundle by chunk reuse instead (head, chunk tables, the chunks `old` lacks). How a
/// tool or a server checks a delta before handing it to devices.
pub fn check<R1, R2, F>(
    old: (crate::read::VerifiedBundle<R1>, Vec<u8>),
    mut delta: crate::delta::VerifiedDelta<R2>,
    spool: &mut dyn FnMut(&crate::manifest::Component) -> std::io::Result<F>,
) -> Result<u64>
where
    R1: std::io::Read,
    R2: std::io::Read,
    F: Write + std::os::unix::fs::FileExt,
{
    use crate::delta::{Base, TableBase};
    let old = Loaded::read(old.0, old.1, spool)?;
    let mut bases = Vec::new();
    for ((c, table), content) in old
        .manifest
        .components
        .iter()
        .zip(&old.tables)
        .zip(old.content)
    {
        let held: std::collections::HashSet<Digest> = table.iter().map(|e| e.digest).collect();
        bases.push((c.slot_class.clone(), TableBase::new(content, table), held));
    }
    let mut chunks_size = delta.bundle_head_len();
    for c in delta.manifest().components.clone() {
        let (table, _) = delta.read_tables()?;
        let base = bases.iter().find(|(class, ..)| *class == c.slot_class);
        chunks_size += (table.len() * crate::format::CHUNK_ENTRY_LEN) as u64
            + table
                .iter()
                .filter(|e| base.is_none_or(|(_, _, held)| !held.contains(&e.digest)))
                .map(|e| u64::from(e.stored_length))
                .sum::<u64>();
        delta.apply(
            &table,
            base.map(|(_, b, _)| b as &dyn Base),
            &mut |_| Ok(()),
        )?;
    }
    delta.finish()?;
    Ok(chunks_size)
}

/// Content read by position from anything that can (a file the caller opened).
pub struct Positional<F>(pub F);

impl<F: std::os::unix::fs::FileExt> ReadAt for Positional<F> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// One release as a delta is made from it.
pub struct Release<'a> {
    /// The bundle's head exactly as stored: header, manifest and signatures.
    pub head: &'a [u8],
    /// Its manifest.
    pub manifest: &'a Manifest,
    /// Each component's chunk table, in manifest order.
    pub tables: &'a [Vec<ChunkEntry>],
    /// Each component's content, in manifest order.
    pub content: &'a [&'a (dyn ReadAt + Sync)],
}

impl Release<'_> {
    fn manifest_bytes(&self) -> Result<&[u8]> {
        let fixed: &[u8; HEADER_LEN] = self
            .head
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| Error::bad_format("bundle head shorter than its header"))?;
        let header = Header::decode(fixed, &Limits::default())?;
        if header.data_start() != self.head.len() as u64 {
            return Err(Error::InvalidArgument {
                what: "the bundle head is not exactly header, manifest and signatures".into(),
            });
        }
        Ok(&self.head[HEADER_LEN..HEADER_LEN + header.manifest_len as usize])
    }
}

/// What making a delta produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Patches written.
    pub patches: u64,
    /// New content they produce.
    pub patched_bytes: u64,
    /// Their frames' bytes.
    pub frame_bytes: u64,
    /// Old bytes they refer to (what a device reads for them).
    pub prefix_bytes: u64,
    /// New content taken from the old release's chunks by name.
    pub copied_bytes: u64,
    /// The delta's length.
    pub size: u64,
    /// What a device running the old release reads of the new bundle by chunk reuse instead:
    /// its head, its chunk tables and the stored bytes of the chunks the old release lacks.
    pub chunks_size: u64,
}

/// Reads both bundles out (every hash checked) into spools `spool` opens, one per component,
/// and writes the delta from `old` to `new` to `out`: the whole of making a delta from two
/// bundle files. The bundles are already verified, or opened without signatures by a caller
/// whose output is verified again (devices verify the signatures a delta carries).
pub fn make<R1, R2, F, W>(
    old: (crate::read::VerifiedBundle<R1>, Vec<u8>),
    new: (crate::read::VerifiedBundle<R2>, Vec<u8>),
    spool: &mut dyn FnMut(&crate::manifest::Component) -> std::io::Result<F>,
    options: &DeltaOptions,
    out: &mut W,
) -> Result<DeltaStats>
where
    R1: std::io::Read,
    R2: std::io::Read,
    F: Write + std::os::unix::fs::FileExt + Sync,
    W: Write + Seek,
{
    let old = Loaded::read(old.0, old.1, spool)?;
    let new = Loaded::read(new.0, new.1, spool)?;
    fn content<F: std::os::unix::fs::FileExt + Sync>(l: &Loaded<F>) -> Vec<&(dyn ReadAt + Sync)> {
        l.content
            .iter()
            .map(|c| c as &(dyn ReadAt + Sync))
            .collect()
    }
    let (oc, nc) = (content(&old), content(&new));
    create(
        &Release {
            head: &old.head,
            manifest: &old.manifest,
            tables: &old.tables,
            content: &oc,
        },
        &Release {
            head: &new.head,
            manifest: &new.manifest,
            tables: &new.tables,
            content: &nc,
        },
        options,
        out,
    )
}

/// Writes the delta that turns `old` into `new` to `out` (which must be empty).
pub fn create<W: Write + Seek>(
    old: &Release<'_>,
    new: &Release<'_>,
    options: &DeltaOptions,
    out: &mut W,
) -> Result<DeltaStats> {
    let limits = Limits::default();
    if !(1..=19).contains(&options.level) {
        return Err(Error::InvalidArgument {
            what: format!("compression level {} is not 1 to 19", options.level),
        });
    }
    if options.max_patch_content == 0
        || options.max_patch_content > limits.max_patch_content
        || options.max_prefix > limits.max_patch_prefix
    {
        return Err(Error::InvalidArgument {
            what: format!(
                "patches of at most {} bytes against at most {} old bytes: the limits are {} and {}",
                options.max_patch_content,
                options.max_prefix,
                limits.max_patch_content,
                limits.max_patch_prefix
            ),
        });
    }
    let io = |what: &'static str| move |source| Error::Io { what, source };
    let old_bases: Vec<BaseComponent> = old
        .manifest
        .components
        .iter()
        .zip(old.tables)
        .map(|(c, t)| BaseComponent {
            slot_class: c.slot_class.clone(),
            size: c.size,
            index: index_digest(t),
        })
        .collect();
    let plans: Vec<Vec<PlannedPatch>> = new
        .manifest
        .components
        .iter()
        .zip(new.tables)
        .map(|(c, table)| {
            let base = old
                .manifest
                .components
                .iter()
                .position(|o| o.slot_class == c.slot_class);
            plan(base.map(|k| old.tables[k].as_slice()), table, options)
        })
        .collect();
    let head = DeltaHead {
        from: DeltaFrom {
            manifest: Digest::of(old.manifest_bytes()?),
            version: old.manifest.version.clone(),
            components: old_bases,
        },
        to_manifest: Digest::of(new.manifest_bytes()?),
        to_version: new.manifest.version.clone(),
        components: new
            .manifest
            .components
            .iter()
            .zip(&plans)
            .map(|(c, p)| (c.name.clone(), p.len() as u64))
            .collect(),
    }
    .to_canonical()?;
    let mut stats = DeltaStats::default();
    out.write_all(&encode_header(head.len() as u32))
        .map_err(io("writing the delta"))?;
    out.write_all(&head).map_err(io("writing the delta"))?;
    out.write_all(new.head).map_err(io("writing the delta"))?;
    for (k, (component, table)) in new.manifest.components.iter().zip(new.tables).enumerate() {
        let base = old
            .manifest
            .components
            .iter()
            .position(|o| o.slot_class == component.slot_class);
        let mut bytes = Vec::with_capacity(table.len() * crate::format::CHUNK_ENTRY_LEN);
        for e in table {
            e.encode_into(&mut bytes);
        }
        out.write_all(&bytes).map_err(io("writing the delta"))?;
        let planned = &plans[k];
        let table_at = out.stream_position().map_err(io("writing the delta"))?;
        out.write_all(&vec![0u8; planned.len() * PATCH_ENTRY_LEN])
            .map_err(io("writing the delta"))?;
        let mut starts = Vec::with_capacity(table.len() + 1);
        let mut at = 0u64;
        for e in table {
            starts.push(at);
            at += u64::from(e.length);
        }
        starts.push(at);
        let mut entries = Vec::with_capacity(planned.len());
        let content = new.content[k];
        let old_content = base.map(|b| old.content[b]);
        ordered_map(
            || Ok(()),
            |(), _, p: PlannedPatch| {
                let from = starts[p.first as usize];
                let len = starts[(p.first + p.count) as usize] - from;
                let mut run = vec![0u8; len as usize];
                content
                    .read_at(from, &mut run)
                    .map_err(io("reading the new content"))?;
                let mut prefix = vec![0u8; p.prefix_len as usize];
                if let Some(old_content) = old_content {
                    old_content
                        .read_at(p.prefix_offset, &mut prefix)
                        .map_err(io("reading the old content"))?;
                }
                let frame = compress(options.level, &prefix, &run)?;
                Ok((p, frame, len))
            },
            {
                let mut next = planned.iter();
                move |_| Ok(next.next().copied())
            },
            |_, (p, frame, len): (PlannedPatch, Vec<u8>, u64)| {
                if frame.len() > stored_bound(len as u32) as usize {
                    return Err(Error::InvalidArgument {
                        what: format!(
                            "patch for chunks {}..+{} came out too long",
                            p.first, p.count
                        ),
                    });
                }
                out.write_all(&frame).map_err(io("writing the delta"))?;
                stats.patches += 1;
                stats.patched_bytes += len;
                stats.frame_bytes += frame.len() as u64;
                stats.prefix_bytes += u64::from(p.prefix_len);
                entries.push(Patch {
                    first: p.first,
                    count: p.count,
                    prefix_offset: p.prefix_offset,
                    prefix_len: p.prefix_len,
                    frame_len: frame.len() as u32,
                });
                Ok(())
            },
        )?;
        let end = out.stream_position().map_err(io("writing the delta"))?;
        let mut encoded = Vec::with_capacity(entries.len() * PATCH_ENTRY_LEN);
        for p in &entries {
            p.encode_into(&mut encoded);
        }
        out.seek(SeekFrom::Start(table_at))
            .map_err(io("writing the delta"))?;
        out.write_all(&encoded).map_err(io("writing the delta"))?;
        out.seek(SeekFrom::Start(end))
            .map_err(io("writing the delta"))?;
        stats.copied_bytes += component.size - planned_content(table, planned);
        let held: std::collections::HashSet<Digest> = base
            .map(|b| old.tables[b].iter().map(|e| e.digest).collect())
            .unwrap_or_default();
        stats.chunks_size += (table.len() * crate::format::CHUNK_ENTRY_LEN) as u64
            + table
                .iter()
                .filter(|e| !held.contains(&e.digest))
                .map(|e| u64::from(e.stored_length))
                .sum::<u64>();
    }
    stats.chunks_size += new.head.len() as u64;
    out.flush().map_err(io("writing the delta"))?;
    stats.size = out.stream_position().map_err(io("writing the delta"))?;
    Ok(stats)
}

fn planned_content(table: &[ChunkEntry], planned: &[PlannedPatch]) -> u64 {
    planned
        .iter()
        .flat_map(|p| &table[p.first as usize..(p.first + p.count) as usize])
        .map(|e| u64::from(e.length))
        .sum()
}

/// One patch frame: `run` compressed at `level` against `prefix`, with a window that reaches
/// back over the whole reference.
fn compress(level: i32, prefix: &[u8], run: &[u8]) -> Result<Vec<u8>> {
    use zstd::zstd_safe::{CParameter, get_error_name};
    let fail = |c| Error::Io {
        what: "compressing a patch",
        source: std::io::Error::other(get_error_name(c)),
    };
    // A context per patch: it borrows the reference for as long as it lives.
    let mut cctx = zstd::zstd_safe::CCtx::create();
    let span = (prefix.len() + run.len()).max(1 << 10) as u64;
    let window = (64 - (span - 1).leading_zeros()).clamp(10, 26);
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::WindowLog(window))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false))
        .map_err(fail)?;
    if !prefix.is_empty() {
        cctx.ref_prefix(prefix).map_err(fail)?;
    }
    let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(run.len()));
    cctx.compress2(&mut frame, run).map_err(fail)?;
    Ok(frame)
}
