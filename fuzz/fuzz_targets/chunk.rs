//! Fuzzes what lies behind the signatures: chunk table parsing and bounded chunk decoding, with
//! the digests the signed manifest would pin computed here so arbitrary bytes get through.
#![no_main]

use abide_bundle::chunks::open_chunk;
use abide_bundle::format::ChunkEntry;
use abide_bundle::manifest::ChunkTableRef;
use abide_bundle::{Chunking, Component, Digest, Name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let declared = u32::from(u16::from_le_bytes([data[0], data[1]])) * 16 + u32::from(data[2]);
    let stored = &data[4..];
    let name = Name::parse("name", "rootfs", 64).expect("name");
    let component = Component {
        name: name.clone(),
        kind: name.clone(),
        slot_class: name,
        size: u64::from(declared),
        digest: Digest::of(b""),
        chunking: Chunking::default(),
        chunk_table: ChunkTableRef { digest: Digest::of(data), count: 1, offset: 0, data_size: stored.len() as u64 },
    };
    // The table parser over the whole input as a table.
    let _ = abide_bundle::read::parse_chunk_table(&component, data);
    // Bounded decoding of arbitrary frames with a declared length from the input.
    let entry = ChunkEntry {
        digest: Digest::of(b"unknown"),
        stored_digest: Digest::of(stored),
        length: declared,
        stored_length: stored.len() as u32,
    };
    let mut decompressor = zstd::bulk::Decompressor::new().expect("decompressor");
    if let Err(e) = open_chunk(&mut decompressor, &component, 0, &entry, stored) {
        assert!(matches!(e.code(), "chunk-digest" | "chunk-corrupt" | "decompression-bomb"), "{e}");
    }
});
