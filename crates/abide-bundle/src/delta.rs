//! Deltas: a bundle's content expressed against one exact older release, byte by byte.
//!
//! A delta carries the new bundle's head (header, manifest and signatures) and chunk tables
//! exactly as signed, so a device verifies it with the same trust root and policy as the
//! bundle itself. For the chunks the old release lacks it carries *patches*: one zstd frame per
//! run of such chunks, compressed with a stretch of the old release's content as a raw prefix
//! (`ZSTD_CCtx_refPrefix`), so whatever the old content shares with the new, byte by byte,
//! costs a few bytes. Every other chunk the device copies from its running slot by name.
//!
//! Nothing a delta adds is trusted: every chunk a patch produces, and every chunk copied from
//! the running slot, is hashed against its name in the signed chunk table before it is handed
//! on, so a delta can make a device write the new release or nothing. The delta names the old
//! content it was made against (the digest of each slot's chunk list, as the device's chunk
//! index records it); a device whose running slot differs refuses it before writing
//! ([`Error::DeltaBase`]). Memory is bounded by [`Limits`]: one patch's content, one prefix
//! and one frame at a time. `docs/bundle-format.md` ("Deltas") is the byte-level
//! specification; [`crate::delta_write`] makes them.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::canonical::{parse_canonical, to_canonical};
use crate::chunks::Checks;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::ChunkEntry;
use crate::limits::{Limits, stored_bound};
use crate::manifest::{Component, Manifest};
use crate::name::Name;
use crate::read::{BundleReader, Counted, Policy, VerifiedBundle};
use crate::source::Source;

/// The first eight bytes of every delta.
pub const DELTA_MAGIC: [u8; 8] = *b"\x89ABDLT\r\n";
/// The delta layout version this code reads and writes.
pub const DELTA_LAYOUT_VERSION: u16 = 1;
/// Length of the fixed delta header.
pub const DELTA_HEADER_LEN: usize = 16;
/// Length of one patch entry.
pub const PATCH_ENTRY_LEN: usize = 24;

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A bundle (`\x89ABIDE\r\n`).
    Bundle,
    /// A delta (`\x89ABDLT\r\n`).
    Delta,
}

impl Kind {
    /// The kind named by the first eight bytes of a file, if any.
    pub fn of(magic: &[u8]) -> Option<Kind> {
        if magic.starts_with(&crate::format::MAGIC) {
            Some(Kind::Bundle)
        } else if magic.starts_with(&DELTA_MAGIC) {
            Some(Kind::Delta)
        } else {
            None
        }
    }
}

/// The old content a delta was made against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaFrom {
    /// SHA-256 of the old bundle's manifest bytes.
    pub manifest: Digest,
    /// The old release's version.
    pub version: semver::Version,
    /// Per slot class the old release filled: what it held.
    pub components: Vec<BaseComponent>,
}

/// One slot's content in the old release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseComponent {
    /// The slot class (the running group's slot of this class holds the content).
    pub slot_class: Name,
    /// Its length in bytes.
    pub size: u64,
    /// SHA-256 of its chunk list: per chunk its name (32 bytes) and length (u32 LE), in order
    /// — the body of the device's chunk index of that slot.
    pub index: Digest,
}

/// The head of a delta: canonical JSON, not signed (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHead {
    /// What the delta was made against.
    pub from: DeltaFrom,
    /// SHA-256 of the new bundle's manifest bytes (the manifest the delta carries).
    pub to_manifest: Digest,
    /// The new release's version.
    pub to_version: semver::Version,
    /// Per component of the new bundle, in manifest order: its name and number of patches.
    pub components: Vec<(Name, u64)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHead {
    format: u64,
    from: RawFrom,
    to: RawTo,
    components: Vec<RawComponent>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrom {
    manifest: String,
    version: String,
    components: Vec<RawBase>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    slot_class: String,
    size: u64,
    index: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    manifest: String,
    version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    name: String,
    patches: u64,
}

impl DeltaHead {
    /// The canonical bytes of the head.
    pub fn to_canonical(&self) -> Result<Vec<u8>> {
        let raw = RawHead {
            format: 1,
            from: RawFrom {
                manifest: self.from.manifest.to_hex(),
                version: self.from.version.to_string(),
                components: self
                    .from
                    .components
                    .iter()
                    .map(|b| RawBase {
                        slot_class: b.slot_class.to_string(),
                        size: b.size,
                        index: b.index.to_hex(),
                    })
                    .collect(),
            },
            to: RawTo {
                manifest: self.to_manifest.to_hex(),
                version: self.to_version.to_string(),
            },
            components: self
                .components
                .iter()
                .map(|(name, patches)| RawComponent {
                    name: name.to_string(),
                    patches: *patches,
                })
                .collect(),
        };
        to_canonical("delta head", &raw)
    }

    /// Parses canonical head bytes, every value validated against `limits`.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<DeltaHead> {
        let value = parse_canonical("delta head", bytes)?;
        let raw: RawHead = serde_json::from_value(value)
            .map_err(|e| Error::bad_format(format!("delta head: {e}")))?;
        if raw.format != 1 {
            return Err(Error::bad_format(format!(
                "delta head: format {} is not supported (expected 1)",
                raw.format
            )));
        }
        let version = |field: &str, s: &str| {
            semver::Version::parse(s)
                .map_err(|e| Error::bad_format(format!("delta head: {field}: {e}")))
        };
        if raw.from.components.len() > limits.max_components
            || raw.components.len() > limits.max_components
        {
            return Err(Error::limit(
                "delta head components",
                raw.from.components.len().max(raw.components.len()) as u64,
                limits.max_components as u64,
            ));
        }
        let mut bases = Vec::with_capacity(raw.from.components.len());
        for b in raw.from.components {
            let slot_class = Name::parse(
                "delta head from.components.slot_class",
                &b.slot_class,
                limits.max_name_len,
            )?;
            if bases
                .iter()
                .any(|x: &BaseComponent| x.slot_class == slot_class)
            {
                return Err(Error::bad_format(format!(
                    "delta head: slot class {slot_class} is listed twice in from.components"
                )));
            }
            if b.size > limits.max_component_size {
                return Err(Error::limit(
                    format!("delta head size of base {slot_class}"),
                    b.size,
                    limits.max_component_size,
                ));
            }
            bases.push(BaseComponent {
                slot_class,
                size: b.size,
                index: Digest::parse_hex("delta head from.components.index", &b.index)?,
            });
        }
        let components = raw
            .components
            .into_iter()
            .map(|c| {
                Ok((
                    Name::parse("delta head components.name", &c.name, limits.max_name_len)?,
                    c.patches,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeltaHead {
            from: DeltaFrom {
                manifest: Digest::parse_hex("delta head from.manifest", &raw.from.manifest)?,
                version: version("from.version", &raw.from.version)?,
                components: bases,
            },
            to_manifest: Digest::parse_hex("delta head to.manifest", &raw.to.manifest)?,
            to_version: version("to.version", &raw.to.version)?,
            components,
        })
    }

    /// What the old release held in the slot of `class`, if it filled one.
    pub fn base(&self, class: &str) -> Option<&BaseComponent> {
        self.from
            .components
            .iter()
            .find(|b| b.slot_class.as_str() == class)
    }
}

/// Encodes the fixed delta header for a head of `head_len` bytes.
pub fn encode_header(head_len: u32) -> [u8; DELTA_HEADER_LEN] {
    let mut out = [0u8; DELTA_HEADER_LEN];
    out[..8].copy_from_slice(&DELTA_MAGIC);
    out[8..10].copy_from_slice(&DELTA_LAYOUT_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&head_len.to_le_bytes());
    out
}

/// One patch: the content of `count` chunks from `first` on, as one zstd frame of
/// `frame_len` bytes made against the old content's bytes `prefix_offset..+prefix_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    /// The first chunk (index into the new chunk table) it produces.
    pub first: u32,
    /// How many chunks it produces, in order.
    pub count: u32,
    /// Where its reference starts in the old content of the same slot class.
    pub prefix_offset: u64,
    /// The reference's length (0: none).
    pub prefix_len: u32,
    /// The frame's length in the delta.
    pub frame_len: u32,
}

impl Patch {
    /// Decodes one entry.
    pub fn decode(b: &[u8]) -> Patch {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        Patch {
            first: u32_at(0),
            count: u32_at(4),
            prefix_offset: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            prefix_len: u32_at(16),
            frame_len: u32_at(20),
        }
    }

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.first.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.prefix_offset.to_le_bytes());
        out.extend_from_slice(&self.prefix_len.to_le_bytes());
        out.extend_from_slice(&self.frame_len.to_le_bytes());
    }
}

/// Random access to content: an old release's component, or a running slot.
pub trait ReadAt {
    /// Fills `buf` with the bytes at `offset`; fails if there are not that many.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        let src = self
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The running slot a delta is applied against.
pub trait Base: ReadAt {
    /// Puts the content the slot holds for the chunk named by `entry` into `buf` and says
    /// whether it did (unchecked: the caller hashes it against the name).
    fn chunk(&self, entry: &ChunkEntry, buf: &mut Vec<u8>) -> bool;
}

/// Old content with its chunk table, as a [`Base`]: what a server or a tool applies a delta
/// against to check it.
pub struct TableBase<C> {
    content: C,
    at: std::collections::HashMap<Digest, (u64, u32)>,
}

impl<C: ReadAt> TableBase<C> {
    /// `content`, cut as `table` says.
    pub fn new(content: C, table: &[ChunkEntry]) -> TableBase<C> {
        let mut at = std::collections::HashMap::with_capacity(table.len());
        let mut offset = 0u64;
        for e in table {
            at.entry(e.digest).or_insert((offset, e.length));
            offset += u64::from(e.length);
        }
        TableBase { content, at }
    }
}

impl<C: ReadAt> ReadAt for TableBase<C> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.content.read_at(offset, buf)
    }
}

impl<C: ReadAt> Base for TableBase<C> {
    fn chunk(&self, entry: &ChunkEntry, buf: &mut Vec<u8>) -> bool {
        let Some(&(offset, len)) = self.at.get(&entry.digest) else {
            return false;
        };
        buf.resize(len as usize, 0);
        self.content.read_at(offset, buf).is_ok()
    }
}

/// What applying one component of a delta did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Chunks produced by patches.
    pub patched_chunks: u64,
    /// Their content bytes.
    pub patched_bytes: u64,
    /// Patch frame bytes read from the delta.
    pub frame_bytes: u64,
    /// Reference bytes read from the running slot for the patches.
    pub prefix_bytes: u64,
    /// Chunks copied from the running slot by name.
    pub copied_chunks: u64,
    /// Their content bytes.
    pub copied_bytes: u64,
}

/// A delta whose header and head have been read, and its bundle's head after them.
pub struct DeltaReader<R> {
    head: DeltaHead,
    lead: u64,
    bundle: BundleReader<R>,
}

/// A delta whose bundle head passed the [`Policy`] and whose head matches it.
pub struct VerifiedDelta<R> {
    head: DeltaHead,
    /// Bytes before the bundle head: the delta header and head.
    lead: u64,
    bundle: VerifiedBundle<R>,
    /// The patches of the component whose chunk table was read last.
    pending: Option<Vec<Patch>>,
}

impl<R: Read> DeltaReader<R> {
    /// Reads the delta header and head, then the bundle head, bounded by `limits`.
    pub fn open(src: R, limits: Limits) -> Result<DeltaReader<R>> {
        let mut src = Counted { inner: src, pos: 0 };
        let mut fixed = [0u8; DELTA_HEADER_LEN];
        src.read_exact_as(&mut fixed, "delta header")?;
        if fixed[..8] != DELTA_MAGIC {
            return Err(Error::bad_format("not an Abide delta (wrong magic)"));
        }
        let layout = u16::from_le_bytes([fixed[8], fixed[9]]);
        if layout != DELTA_LAYOUT_VERSION {
            return Err(Error::bad_format(format!(
                "delta layout version {layout} is not supported (expected {DELTA_LAYOUT_VERSION})"
            )));
        }
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        if flags != 0 {
            return Err(Error::bad_format(format!(
                "unknown delta header flags {flags:#06x}"
            )));
        }
        let head_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
        if head_len == 0 || head_len > limits.max_delta_head_bytes {
            return Err(Error::limit(
                "delta head length",
                head_len.into(),
                limits.max_delta_head_bytes.into(),
            ));
        }
        let mut head = vec![0u8; head_len as usize];
        src.read_exact_as(&mut head, "delta head")?;
        let lead = DELTA_HEADER_LEN as u64 + head.len() as u64;
        let head = DeltaHead::parse(&head, &limits)?;
        let bundle = BundleReader::open(src.inner, limits)?;
        Ok(DeltaReader { head, lead, bundle })
    }

    /// The head, as read (not yet checked against the bundle's manifest).
    pub fn head(&self) -> &DeltaHead {
        &self.head
    }

    /// The bundle head inside, for inspection.
    pub fn bundle(&self) -> &BundleReader<R> {
        &self.bundle
    }

    /// Checks the bundle's signatures and policy exactly as for the bundle itself, then that
    /// the head describes that bundle (its manifest digest, version and components).
    pub fn verify(self, policy: &Policy<'_>) -> Result<VerifiedDelta<R>> {
        let manifest_digest = Digest::of(self.bundle.manifest_bytes());
        let bundle = self.bundle.verify(policy)?;
        let head = self.head;
        if head.to_manifest != manifest_digest {
            return Err(Error::bad_format(format!(
                "the delta head names manifest {}, the delta carries {manifest_digest}",
                head.to_manifest
            )));
        }
        let manifest = bundle.manifest();
        if head.to_version != manifest.version {
            return Err(Error::bad_format(format!(
                "the delta head says version {}, the manifest {}",
                head.to_version, manifest.version
            )));
        }
        let names: Vec<&str> = head.components.iter().map(|(n, _)| n.as_str()).collect();
        let expected: Vec<&str> = manifest
            .components
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        if names != expected {
            return Err(Error::bad_format(format!(
                "the delta head lists components {names:?}, the manifest {expected:?}"
            )));
        }
        for ((_, patches), c) in head.components.iter().zip(&manifest.components) {
            if *patches > c.chunk_table.count {
                return Err(Error::limit(
                    format!("patches of component {}", c.name),
                    *patches,
                    c.chunk_table.count,
                ));
            }
        }
        Ok(VerifiedDelta {
            head,
            lead: self.lead,
            bundle,
            pending: None,
        })
    }
}

impl<R: Read> VerifiedDelta<R> {
    /// The new release's verified manifest.
    pub fn manifest(&self) -> &Manifest {
        self.bundle.manifest()
    }

    /// The head, checked against the manifest.
    pub fn head(&self) -> &DeltaHead {
        &self.head
    }

    /// The distinct trusted keys whose signatures (the new release's) verified.
    pub fn signers(&self) -> &[crate::KeyId] {
        self.bundle.signers()
    }

    /// How much the content is hashed: chunks are always checked against their names; with
    /// [`Checks::Every`] the whole component against its digest too.
    pub fn set_checks(&mut self, checks: Checks) {
        self.bundle.set_checks(checks);
    }

    /// The length of the new bundle's head inside the delta (header, manifest, signatures).
    pub fn bundle_head_len(&self) -> u64 {
        self.bundle.head_len()
    }

    /// Delta bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.lead + self.bundle.position()
    }

    /// The component the stream is at.
    pub fn next_component(&self) -> Result<&Component> {
        self.bundle.current()
    }

    /// Reads and checks the next component's chunk table and patch table.
    pub fn read_tables(&mut self) -> Result<(Vec<ChunkEntry>, Vec<Patch>)> {
        let component = self.bundle.current()?.clone();
        let table = self.bundle.read_chunk_table()?;
        let count = self.head.components[self.bundle.next_index()].1 as usize;
        let mut bytes = vec![0u8; count * PATCH_ENTRY_LEN];
        self.bundle.src().read_exact_as(&mut bytes, "patch table")?;
        let patches: Vec<Patch> = bytes
            .chunks_exact(PATCH_ENTRY_LEN)
            .map(Patch::decode)
            .collect();
        let base = self.head.base(component.slot_class.as_str());
        check_patches(&component, &table, &patches, base, self.bundle_limits())?;
        self.pending = Some(patches.clone());
        Ok((table, patches))
    }

    fn bundle_limits(&self) -> &Limits {
        self.bundle.limits()
    }

    /// Writes the next component: each chunk a patch covers from the patch (its frame
    /// decompressed against the reference read from `base`), every other chunk from `base` by
    /// name; each hashed against its name before `sink` sees it. `base` is the running slot of
    /// the component's class (`None` when it has none: then every chunk must be patched
    /// without a reference). If this fails, what `sink` received must be discarded.
    pub fn apply(
        &mut self,
        table: &[ChunkEntry],
        base: Option<&dyn Base>,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<Applied> {
        let component = self.bundle.current()?.clone();
        let patches = self.pending.take().ok_or_else(|| Error::InvalidArgument {
            what: "read_tables comes before apply".into(),
        })?;
        let every = self.bundle.checks() == Checks::Every;
        let limits = self.bundle_limits().clone();
        let src = self.bundle.src();
        let applied =
            apply_component(&component, table, &patches, base, src, &limits, every, sink)?;
        self.bundle.advance();
        Ok(applied)
    }

    /// Passes over the next component's patch frames after [`VerifiedDelta::read_tables`]
    /// (checking only that they are all there): for checking a delta without the content it
    /// was made against.
    pub fn skip_component(&mut self) -> Result<()>
    where
        R: Source,
    {
        let patches = self.pending.take().ok_or_else(|| Error::InvalidArgument {
            what: "read_tables comes before skip_component".into(),
        })?;
        let frames: u64 = patches.iter().map(|p| u64::from(p.frame_len)).sum();
        self.bundle.src().skip_as(frames, "patch frame")?;
        self.bundle.advance();
        Ok(())
    }

    /// Checks that the delta ends right after the last component.
    pub fn finish(&mut self) -> Result<()> {
        if self.bundle.next_index() < self.manifest().components.len() {
            return Err(Error::InvalidArgument {
                what: "components remain to be read".into(),
            });
        }
        let mut probe = [0u8; 1];
        let src = self.bundle.src();
        let n = src.read(&mut probe).map_err(|source| Error::Io {
            what: "reading the delta",
            source,
        })?;
        if n != 0 {
            return Err(Error::bad_format(format!(
                "trailing bytes after the last component at byte {}",
                src.pos - 1
            )));
        }
        Ok(())
    }
}

impl<R: Source> VerifiedDelta<R> {
    /// The source, for callers that hint a network source.
    pub fn source_mut(&mut self) -> &mut R {
        &mut self.bundle.src().inner
    }
}

/// Checks a component's patch table: in order, not overlapping, inside the chunk table, each
/// within the limits, and referencing only old content that exists.
fn check_patches(
    component: &Component,
    table: &[ChunkEntry],
    patches: &[Patch],
    base: Option<&BaseComponent>,
    limits: &Limits,
) -> Result<()> {
    let name = component.name.to_string();
    let mut next_free = 0u64;
    for (k, p) in patches.iter().enumerate() {
        let first = u64::from(p.first);
        let end = first + u64::from(p.count);
        if p.count == 0 || first < next_free || end > table.len() as u64 {
            return Err(Error::bad_format(format!(
                "patch {k} of component {name} covers chunks {first}..{end}: patches must be non-empty, in order, without overlap, inside the {} chunks",
                table.len()
            )));
        }
        next_free = end;
        let content: u64 = table[first as usize..end as usize]
            .iter()
            .map(|e| u64::from(e.length))
            .sum();
        if content > u64::from(limits.max_patch_content) {
            return Err(Error::limit(
                format!("content of patch {k} of component {name}"),
                content,
                limits.max_patch_content.into(),
            ));
        }
        if p.prefix_len > limits.max_patch_prefix {
            return Err(Error::limit(
                format!("reference of patch {k} of component {name}"),
                p.prefix_len.into(),
                limits.max_patch_prefix.into(),
            ));
        }
        let bound = stored_bound(content as u32);
        if p.frame_len == 0 || p.frame_len > bound {
            return Err(Error::limit(
                format!("frame of patch {k} of component {name}"),
                p.frame_len.into(),
                bound.into(),
            ));
        }
        let base_size = base.map_or(0, |b| b.size);
        if p.prefix_len > 0
            && p.prefix_offset
                .checked_add(p.prefix_len.into())
                .is_none_or(|e| e > base_size)
        {
            return Err(Error::bad_format(format!(
                "patch {k} of component {name} refers to old bytes {}..+{} past the old content's {base_size} bytes",
                p.prefix_offset, p.prefix_len
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn apply_component<R: Read>(
    component: &Component,
    table: &[ChunkEntry],
    patches: &[Patch],
    base: Option<&dyn Base>,
    src: &mut Counted<R>,
    limits: &Limits,
    every: bool,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<Applied> {
    use sha2::{Digest as _, Sha256};
    let name = component.name.to_string();
    let mut applied = Applied::default();
    let mut whole = every.then(Sha256::new);
    let mut emit = |content: &[u8], whole: &mut Option<Sha256>| -> Result<()> {
        if let Some(h) = whole {
            h.update(content);
        }
        sink(content).map_err(|source| Error::Io {
            what: "writing component content",
            source,
        })
    };
    let mut frame = Vec::new();
    let mut prefix = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = Vec::new();
    let mut patches = patches.iter().peekable();
    let mut index = 0usize;
    while index < table.len() {
        if let Some(p) = patches.next_if(|p| p.first as usize == index) {
            let run = &table[index..index + p.count as usize];
            let content: usize = run.iter().map(|e| e.length as usize).sum();
            debug_assert!(content <= limits.max_patch_content as usize);
            frame.resize(p.frame_len as usize, 0);
            src.read_exact_as(&mut frame, "patch frame")?;
            prefix.resize(p.prefix_len as usize, 0);
            if p.prefix_len > 0 {
                let base = base.ok_or_else(|| Error::DeltaBase {
                    component: name.clone(),
                    what: "a patch refers to old content, and the device has none for this slot"
                        .into(),
                })?;
                base.read_at(p.prefix_offset, &mut prefix)
                    .map_err(|source| Error::Io {
                        what: "reading the running slot",
                        source,
                    })?;
            }
            decode_patch(&prefix, &frame, content, &mut out).map_err(|what| {
                Error::ChunkCorrupt {
                    component: name.clone(),
                    index,
                    what: format!("patch for chunks {index}..+{}: {what}", p.count),
                }
            })?;
            let mut at = 0usize;
            for (k, e) in run.iter().enumerate() {
                let piece = &out[at..at + e.length as usize];
                if Digest::of(piece) != e.digest {
                    return Err(Error::ChunkDigest {
                        component: name.clone(),
                        index: index + k,
                        expected: e.digest,
                    });
                }
                emit(piece, &mut whole)?;
                at += e.length as usize;
            }
            applied.patched_chunks += u64::from(p.count);
            applied.patched_bytes += content as u64;
            applied.frame_bytes += u64::from(p.frame_len);
            applied.prefix_bytes += u64::from(p.prefix_len);
            index += p.count as usize;
            continue;
        }
        let e = &table[index];
        chunk.clear();
        let held = base.is_some_and(|b| b.chunk(e, &mut chunk))
            && chunk.len() == e.length as usize
            && Digest::of(&chunk) == e.digest;
        if !held {
            return Err(Error::DeltaBase {
                component: name.clone(),
                what: format!(
                    "chunk {index} ({}) is not patched and the running slot does not hold it",
                    e.digest
                ),
            });
        }
        emit(&chunk, &mut whole)?;
        applied.copied_chunks += 1;
        applied.copied_bytes += u64::from(e.length);
        index += 1;
    }
    if let Some(h) = whole {
        let actual = Digest(h.finalize().into());
        if actual != component.digest {
            return Err(Error::ComponentDigest {
                component: name,
                expected: component.digest,
                actual,
            });
        }
    }
    Ok(applied)
}

/// Decompresses one patch frame against `prefix` into `out`, which ends up exactly `content`
/// bytes long; the frame can never make it longer.
fn decode_patch(
    prefix: &[u8],
    frame: &[u8],
    content: usize,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    use zstd::zstd_safe::{DParameter, get_error_name};
    out.clear();
    out.reserve_exact(content);
    // A context per patch: it borrows the reference for as long as it lives (creating one
    // allocates little; the one-shot decoder needs no window buffer).
    let mut dctx = zstd::zstd_safe::DCtx::create();
    // A window up to the reference plus the content (16 MiB + 16 MiB in the default limits):
    // the one-shot decoder keeps no window of its own, it reads the reference in place.
    dctx.set_parameter(DParameter::WindowLogMax(26))
        .map_err(|c| get_error_name(c).to_owned())?;
    if !prefix.is_empty() {
        dctx.ref_prefix(prefix)
            .map_err(|c| get_error_name(c).to_owned())?;
    }
    // zstd writes into the spare capacity (exactly `content`) and never past it.
    match dctx.decompress(out, frame) {
        Ok(n) if n == content => Ok(()),
        Ok(n) => Err(format!(
            "decompresses to {n} bytes, the chunk table says {content}"
        )),
        Err(c) => Err(format!(
            "not a frame that decompresses to {content} bytes: {}",
            get_error_name(c)
        )),
    }
}

/// SHA-256 of a chunk list as the device's chunk index records it: per chunk its name and
/// length (u32 LE), in order.
pub fn index_digest(table: &[ChunkEntry]) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for e in table {
        h.update(e.digest.0);
        h.update(e.length.to_le_bytes());
    }
    Digest(h.finalize().into())
}
