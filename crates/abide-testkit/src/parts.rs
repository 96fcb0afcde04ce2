//! A bundle taken apart into its manifest (as editable JSON), signatures and per-component
//! chunk tables and chunks, and put back together: how the corpus forges hostile bundles.

use abide_bundle::digest::Digest;
use abide_bundle::format::{
    CHUNK_ENTRY_LEN, ChunkEntry, HEADER_LEN, Header, SIGNATURE_ENTRY_LEN, SignatureEntry,
};
use abide_bundle::keys::MANIFEST_DOMAIN;
use abide_bundle::{Limits, SecretKey};
use serde_json::Value;

/// The pieces of a bundle.
#[derive(Debug, Clone)]
pub struct Parts {
    /// The manifest as JSON.
    pub manifest: Value,
    /// Per component, in order.
    pub components: Vec<ComponentData>,
}

/// One component's stored data.
#[derive(Debug, Clone)]
pub struct ComponentData {
    /// Its chunk table.
    pub table: Vec<ChunkEntry>,
    /// Its stored (compressed) chunks.
    pub chunks: Vec<Vec<u8>>,
}

impl ComponentData {
    /// Replaces chunk `index`'s stored bytes, with a table entry that vouches for them (as a
    /// signer with bad intent would make it).
    pub fn replace_stored(&mut self, index: usize, stored: Vec<u8>) {
        self.table[index].stored_length = stored.len() as u32;
        self.table[index].stored_digest = abide_bundle::Digest::of(&stored);
        self.chunks[index] = stored;
    }

    /// The table's bytes.
    pub fn table_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.table {
            e.encode_into(&mut out);
        }
        out
    }
}

impl Parts {
    /// Takes a well-formed bundle apart (panics on a malformed one: it is for fixtures).
    pub fn split(bundle: &[u8]) -> Parts {
        let header = Header::decode(
            bundle[..HEADER_LEN].try_into().expect("header"),
            &Limits::default(),
        )
        .expect("header");
        let manifest_end = HEADER_LEN + header.manifest_len as usize;
        let manifest: Value =
            serde_json::from_slice(&bundle[HEADER_LEN..manifest_end]).expect("manifest");
        let mut at = header.data_start() as usize;
        let mut components = Vec::new();
        for c in manifest["components"].as_array().expect("components") {
            let count = c["chunk_table"]["count"].as_u64().expect("count") as usize;
            let table: Vec<ChunkEntry> = bundle[at..at + count * CHUNK_ENTRY_LEN]
                .chunks_exact(CHUNK_ENTRY_LEN)
                .map(ChunkEntry::decode)
                .collect();
            at += count * CHUNK_ENTRY_LEN;
            let mut chunks = Vec::new();
            for e in &table {
                chunks.push(bundle[at..at + e.stored_length as usize].to_vec());
                at += e.stored_length as usize;
            }
            components.push(ComponentData { table, chunks });
        }
        Parts {
            manifest,
            components,
        }
    }

    /// Makes the manifest's layout fields (table digest, count, offset, stored size) agree with
    /// the component data again, after an edit.
    pub fn fix_layout(&mut self) {
        let mut offset = 0u64;
        let comps = self.manifest["components"]
            .as_array_mut()
            .expect("components");
        for (c, data) in comps.iter_mut().zip(&self.components) {
            let table = data.table_bytes();
            let stored: u64 = data.table.iter().map(|e| u64::from(e.stored_length)).sum();
            c["chunk_table"]["digest"] = Digest::of(&table).to_hex().into();
            c["chunk_table"]["count"] = (data.table.len() as u64).into();
            c["chunk_table"]["offset"] = offset.into();
            c["chunk_table"]["data_size"] = stored.into();
            offset += table.len() as u64 + stored;
        }
    }

    /// The canonical bytes of the (possibly edited) manifest.
    pub fn manifest_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.manifest).expect("JSON")
    }

    /// Assembles a bundle whose manifest is signed by `signers`.
    pub fn assemble(&self, signers: &[&SecretKey]) -> Vec<u8> {
        let manifest = self.manifest_bytes();
        let signatures: Vec<SignatureEntry> = signers.iter().map(|k| sign(k, &manifest)).collect();
        self.assemble_raw(&manifest, &signatures)
    }

    /// Assembles a bundle from exact manifest bytes and signature entries.
    pub fn assemble_raw(&self, manifest: &[u8], signatures: &[SignatureEntry]) -> Vec<u8> {
        let header = Header {
            manifest_len: manifest.len() as u32,
            signature_count: signatures.len() as u32,
        };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(manifest);
        for s in signatures {
            out.extend_from_slice(&s.encode());
        }
        for c in &self.components {
            out.extend_from_slice(&c.table_bytes());
            for chunk in &c.chunks {
                out.extend_from_slice(chunk);
            }
        }
        out
    }

    /// Byte offset of the data section in [`Parts::assemble`]'s output with `signatures` entries.
    pub fn data_start(&self, signatures: usize) -> usize {
        HEADER_LEN + self.manifest_bytes().len() + signatures * SIGNATURE_ENTRY_LEN
    }
}

/// A signature entry by `key` over `manifest`.
pub fn sign(key: &SecretKey, manifest: &[u8]) -> SignatureEntry {
    SignatureEntry {
        public: *key.public().as_bytes(),
        signature: key.sign(MANIFEST_DOMAIN, manifest),
    }
}
