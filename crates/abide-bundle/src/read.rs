//! Reading a bundle front to back: header, manifest, signatures, then each component's chunk
//! table and chunks, every one checked before its bytes are handed on.

use std::collections::BTreeSet;
use std::io::{self, Read};

use jiff::Timestamp;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{
    CHUNK_ENTRY_LEN, ChunkEntry, HEADER_LEN, Header, SIGNATURE_ENTRY_LEN, SignatureEntry,
};
use crate::keys::{KeyId, MANIFEST_DOMAIN};
use crate::limits::{Limits, stored_bound};
use crate::manifest::{Component, Manifest};
use crate::name::HardwareId;
use crate::time::{ExpirationEnforcement, format_time};
use crate::trust::TrustRoot;

/// What a bundle must satisfy to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The keys that count and how many must sign.
    pub trust: &'a TrustRoot,
    /// The current time, for expiry.
    pub now: Timestamp,
    /// Whether expiry is enforced.
    pub expiration: ExpirationEnforcement,
    /// The hardware id the bundle must list, if any.
    pub compatible: Option<&'a HardwareId>,
    /// The lowest acceptable security version (anti-rollback).
    pub min_security_version: u64,
}

/// A bundle whose header, manifest bytes and signatures have been read but not yet trusted.
pub struct BundleReader<R> {
    src: Counted<R>,
    header: Header,
    manifest_bytes: Vec<u8>,
    signatures: Vec<SignatureEntry>,
    limits: Limits,
}

/// A bundle whose signatures and manifest passed the [`Policy`]; its components can be read.
pub struct VerifiedBundle<R> {
    reader: BundleReader<R>,
    manifest: Manifest,
    signers: Vec<KeyId>,
    next: usize,
    checks: crate::chunks::Checks,
}

impl<R: Read> BundleReader<R> {
    /// Reads the header, the manifest bytes and the signature entries, bounded by `limits`.
    pub fn open(src: R, limits: Limits) -> Result<BundleReader<R>> {
        let mut src = Counted { inner: src, pos: 0 };
        let mut head = [0u8; HEADER_LEN];
        src.read_exact_as(&mut head, "header")?;
        let header = Header::decode(&head, &limits)?;
        let mut manifest_bytes = vec![0u8; header.manifest_len as usize];
        src.read_exact_as(&mut manifest_bytes, "manifest")?;
        let mut signatures = Vec::with_capacity(header.signature_count as usize);
        for _ in 0..header.signature_count {
            let mut entry = [0u8; SIGNATURE_ENTRY_LEN];
            src.read_exact_as(&mut entry, "signatures")?;
            signatures.push(SignatureEntry::decode(&entry));
        }
        Ok(BundleReader {
            src,
            header,
            manifest_bytes,
            signatures,
            limits,
        })
    }

    /// The header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The manifest exactly as stored (what the signatures cover).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The signature entries, unchecked.
    pub fn signatures(&self) -> &[SignatureEntry] {
        &self.signatures
    }

    /// Parses the manifest without checking any signature: for inspection only.
    pub fn manifest_unverified(&self) -> Result<Manifest> {
        Manifest::parse(&self.manifest_bytes, &self.limits)
    }

    /// Checks the signatures against the trust root, then parses the manifest and checks
    /// expiry, hardware compatibility and the security version.
    pub fn verify(self, policy: &Policy<'_>) -> Result<VerifiedBundle<R>> {
        let signers = check_signatures(&self.manifest_bytes, &self.signatures, policy.trust)?;
        let manifest = Manifest::parse(&self.manifest_bytes, &self.limits)?;
        check_policy(&manifest, policy)?;
        Ok(VerifiedBundle {
            reader: self,
            manifest,
            signers,
            next: 0,
            checks: crate::chunks::Checks::default(),
        })
    }

    /// Parses the manifest and gives its components to read *without checking any
    /// signature*: for tools that derive a file which whoever uses it verifies again (a delta
    /// carries this bundle's signatures to the device). Every other check still applies.
    pub fn without_signatures(self) -> Result<VerifiedBundle<R>> {
        let manifest = Manifest::parse(&self.manifest_bytes, &self.limits)?;
        Ok(VerifiedBundle {
            reader: self,
            manifest,
            signers: Vec::new(),
            next: 0,
            checks: crate::chunks::Checks::default(),
        })
    }

    /// The head exactly as read: header, manifest and signature entries.
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut head = self.header.encode().to_vec();
        head.extend_from_slice(&self.manifest_bytes);
        for s in &self.signatures {
            head.extend_from_slice(&s.encode());
        }
        head
    }

    /// Gives back the source, positioned at the start of the data section.
    pub fn into_source(self) -> R {
        self.src.inner
    }
}

impl<R: Read> VerifiedBundle<R> {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The distinct trusted keys whose signatures verified.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }

    /// How much the chunks read from now on are hashed (default [`Checks::Stored`]: the signed
    /// stored bytes only).
    ///
    /// [`Checks::Stored`]: crate::chunks::Checks::Stored
    pub fn set_checks(&mut self, checks: crate::chunks::Checks) {
        self.checks = checks;
    }

    /// The index of the component the stream is at (components are read in order).
    pub fn next_index(&self) -> usize {
        self.next
    }

    /// Reads and checks the next component's chunk table.
    pub fn read_chunk_table(&mut self) -> Result<Vec<ChunkEntry>> {
        let component = self.current()?.clone();
        read_table(&mut self.reader.src, &component)
    }

    /// Reads the chunks of the next component after [`VerifiedBundle::read_chunk_table`] gave
    /// `table`: each chunk's stored bytes are checked against the table before they are
    /// decompressed (never past the declared length) and `sink` sees the content; with
    /// [`Checks::Every`](crate::chunks::Checks::Every) each chunk's content is checked against
    /// its name too, and the whole-component digest at the end.
    /// `sink` receives the content in order; if this returns an error, what `sink` received
    /// must be discarded.
    pub fn read_chunks(
        &mut self,
        table: &[ChunkEntry],
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<()> {
        let component = self.current()?.clone();
        crate::chunks::read_chunks(&mut self.reader.src, &component, table, self.checks, sink)?;
        self.next += 1;
        Ok(())
    }

    /// Like [`VerifiedBundle::read_chunks`], but takes the content of a chunk from `local`
    /// when it has it (a slot of the running group holding the same chunk): `local` is asked
    /// to put each chunk's content into the (empty) buffer it is given and to say whether it
    /// did; its answer is used only if it hashes to the chunk's name, and then the chunk's
    /// stored bytes are passed over (not read, where the source can seek).
    pub fn read_chunks_reusing(
        &mut self,
        table: &[ChunkEntry],
        local: &(dyn Fn(&ChunkEntry, &mut Vec<u8>) -> bool + Sync),
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<crate::chunks::Reuse>
    where
        R: crate::source::Source,
    {
        let component = self.current()?.clone();
        let reuse = crate::chunks::read_chunks_reusing(
            &mut self.reader.src,
            &component,
            table,
            self.checks,
            local,
            sink,
        )?;
        self.next += 1;
        Ok(reuse)
    }

    /// How many bundle bytes have been consumed (read or passed over) so far.
    pub fn position(&self) -> u64 {
        self.reader.src.pos
    }

    /// Reads and checks the whole next component, handing its content to `sink`.
    pub fn read_component(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<&Component> {
        let table = self.read_chunk_table()?;
        self.read_chunks(&table, sink)?;
        Ok(&self.manifest.components[self.next - 1])
    }

    /// Passes over the next component without checking it (its bytes reach nobody).
    pub fn skip_component(&mut self) -> Result<()> {
        let t = self.current()?.chunk_table;
        let len = t.table_len() + t.data_size;
        let copied =
            io::copy(&mut (&mut self.reader.src).take(len), &mut io::sink()).map_err(|source| {
                Error::Io {
                    what: "reading the bundle",
                    source,
                }
            })?;
        if copied < len {
            return Err(Error::Truncated {
                what: "component data",
                offset: self.reader.src.pos,
            });
        }
        self.next += 1;
        Ok(())
    }

    /// Checks every remaining component and that nothing follows the last one.
    pub fn verify_rest(&mut self) -> Result<()> {
        while self.next < self.manifest.components.len() {
            self.read_component(&mut |_| Ok(()))?;
        }
        self.finish()
    }

    /// Checks that the stream ends right after the last component.
    pub fn finish(&mut self) -> Result<()> {
        while self.next < self.manifest.components.len() {
            self.skip_component()?;
        }
        let mut probe = [0u8; 1];
        let n = read_full(&mut self.reader.src, &mut probe).map_err(|source| Error::Io {
            what: "reading the bundle",
            source,
        })?;
        if n != 0 {
            return Err(Error::bad_format(format!(
                "trailing bytes after the last component at byte {}",
                self.reader.src.pos - 1
            )));
        }
        Ok(())
    }

    /// The source, positioned where the next component's data starts (for the delta reader).
    pub(crate) fn src(&mut self) -> &mut Counted<R> {
        &mut self.reader.src
    }

    /// Moves on to the next component (for the delta reader, which reads its own layout).
    pub(crate) fn advance(&mut self) {
        self.next += 1;
    }

    /// The length of the head: header, manifest and signatures.
    pub(crate) fn head_len(&self) -> u64 {
        self.reader.header.data_start()
    }

    /// The limits the bundle is read with.
    pub(crate) fn limits(&self) -> &Limits {
        &self.reader.limits
    }

    /// The checks in force.
    pub(crate) fn checks(&self) -> crate::chunks::Checks {
        self.checks
    }

    pub(crate) fn current(&self) -> Result<&Component> {
        self.manifest
            .components
            .get(self.next)
            .ok_or_else(|| Error::InvalidArgument {
                what: "every component has been read".into(),
            })
    }
}

/// Checks every signature and counts the distinct trusted keys among them against the
/// threshold. Every signature must verify under the key it carries, trusted or not: a bundle
/// carrying one that does not is refused even when enough others do, so no byte of the
/// signature block can change unnoticed. The error says whether nothing, a bad signature, only
/// untrusted keys, or too few keys signed.
pub fn check_signatures(
    manifest: &[u8],
    signatures: &[SignatureEntry],
    trust: &TrustRoot,
) -> Result<Vec<KeyId>> {
    if signatures.is_empty() {
        return Err(Error::Unsigned);
    }
    let mut valid = BTreeSet::new();
    let mut bad_untrusted = None;
    for entry in signatures {
        let key = entry.key();
        let verifies = key
            .as_ref()
            .is_some_and(|k| k.verify(MANIFEST_DOMAIN, manifest, &entry.signature));
        match key.filter(|k| trust.contains(k)) {
            Some(key) if verifies => {
                valid.insert(key.id());
            }
            Some(key) => return Err(Error::BadSignature { key: key.id() }),
            None if verifies => {}
            None => {
                bad_untrusted.get_or_insert(KeyId::of_bytes(&entry.public));
            }
        }
    }
    // A changed key is untrusted before its signature is bad; once a trusted key signed, any
    // signature that does not verify refuses the bundle.
    if let (Some(key), false) = (bad_untrusted, valid.is_empty()) {
        return Err(Error::BadSignature { key });
    }
    if valid.len() >= trust.threshold() {
        return Ok(valid.into_iter().collect());
    }
    if valid.is_empty() {
        let keys = signatures
            .iter()
            .map(|e| KeyId::of_bytes(&e.public))
            .collect();
        return Err(Error::UntrustedKey { keys });
    }
    Err(Error::SignatureThreshold {
        valid: valid.len(),
        threshold: trust.threshold(),
        role: "",
    })
}

/// Checks expiry, compatibility and the security version of a verified manifest.
pub fn check_policy(manifest: &Manifest, policy: &Policy<'_>) -> Result<()> {
    if let (ExpirationEnforcement::Safe, Some(expires)) = (policy.expiration, manifest.expires)
        && expires <= policy.now
    {
        return Err(Error::Expired {
            expires: format_time(expires),
        });
    }
    if let Some(hw) = policy.compatible
        && !manifest.compatible.contains(hw)
    {
        return Err(Error::Incompatible {
            compatible: hw.to_string(),
            bundle: manifest
                .compatible
                .iter()
                .map(ToString::to_string)
                .collect(),
        });
    }
    if manifest.security_version < policy.min_security_version {
        return Err(Error::Downgrade {
            security_version: manifest.security_version,
            minimum: policy.min_security_version,
        });
    }
    Ok(())
}

/// Checks a chunk table against its component: digest first, then every entry's sizes.
pub fn parse_chunk_table(component: &Component, bytes: &[u8]) -> Result<Vec<ChunkEntry>> {
    let name = || component.name.to_string();
    if Digest::of(bytes) != component.chunk_table.digest {
        return Err(Error::ChunkTableDigest { component: name() });
    }
    let max_stored = stored_bound(component.chunking.max_size);
    let mut size = 0u64;
    let mut stored = 0u64;
    let mut table = Vec::with_capacity(bytes.len() / CHUNK_ENTRY_LEN);
    for (index, raw) in bytes.chunks_exact(CHUNK_ENTRY_LEN).enumerate() {
        let e = ChunkEntry::decode(raw);
        if e.length > component.chunking.max_size {
            return Err(Error::limit(
                format!("chunk {index} of component {} length", name()),
                e.length.into(),
                component.chunking.max_size.into(),
            ));
        }
        if e.stored_length > max_stored {
            return Err(Error::limit(
                format!("chunk {index} of component {} stored length", name()),
                e.stored_length.into(),
                max_stored.into(),
            ));
        }
        if e.is_raw() && e.stored_length != e.length {
            return Err(Error::SizeMismatch {
                component: name(),
                what: format!(
                    "raw chunk {index} is stored in {} bytes but is {} long",
                    e.stored_length, e.length
                ),
            });
        }
        if e.length == 0 || e.stored_length == 0 {
            return Err(Error::SizeMismatch {
                component: name(),
                what: format!("chunk {index} is empty"),
            });
        }
        size += u64::from(e.length);
        stored += u64::from(e.stored_length);
        table.push(e);
    }
    if size != component.size {
        return Err(Error::SizeMismatch {
            component: name(),
            what: format!(
                "chunks add up to {size} bytes, the manifest says {}",
                component.size
            ),
        });
    }
    if stored != component.chunk_table.data_size {
        return Err(Error::SizeMismatch {
            component: name(),
            what: format!(
                "stored chunks add up to {stored} bytes, the manifest says {}",
                component.chunk_table.data_size
            ),
        });
    }
    Ok(table)
}

fn read_table<R: Read>(src: &mut Counted<R>, component: &Component) -> Result<Vec<ChunkEntry>> {
    // The count was bounded by `Limits::max_chunks` when the manifest was parsed.
    let mut bytes = vec![0u8; component.chunk_table.table_len() as usize];
    src.read_exact_as(&mut bytes, "chunk table")?;
    parse_chunk_table(component, &bytes)
}

/// A reader that knows how many bytes it has handed out, for error offsets.
pub(crate) struct Counted<R> {
    pub(crate) inner: R,
    pub(crate) pos: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: crate::source::Source> Counted<R> {
    /// Passes over `n` bytes of `what`.
    pub(crate) fn skip_as(&mut self, n: u64, what: &'static str) -> Result<()> {
        let start = self.pos;
        let k = self.inner.skip(n).map_err(|source| Error::Io {
            what: "reading the bundle",
            source,
        })?;
        self.pos += k;
        if k < n {
            return Err(Error::Truncated {
                what,
                offset: start + k,
            });
        }
        Ok(())
    }
}

impl<R: Read> Counted<R> {
    pub(crate) fn read_exact_as(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let start = self.pos;
        let n = read_full(self, buf).map_err(|source| Error::Io {
            what: "reading the bundle",
            source,
        })?;
        if n < buf.len() {
            return Err(Error::Truncated {
                what,
                offset: start + n as u64,
            });
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
