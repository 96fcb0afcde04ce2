//! The corpus of bad bundles: one entry per attack, each with the check that must refuse it.
//!
//! Every entry is verified with the same policy ([`policy_inputs`]): trusted keys 0 and 1 with
//! the entry's threshold, hardware `acme-gw`, minimum security version 5, at [`crate::now`].
//! The valid base bundle ([`base`]) passes that policy.

use abide_bundle::format::{CHUNK_ENTRY_LEN, HEADER_LEN, SIGNATURE_ENTRY_LEN};
use serde_json::{Value, json};

use crate::parts::{Parts, sign};
use crate::{Fixture, key};

/// One hostile bundle.
pub struct Attack {
    /// A short name (also a file name).
    pub name: String,
    /// The bundle bytes.
    pub bytes: Vec<u8>,
    /// The machine code of the check that must refuse it.
    pub code: &'static str,
    /// The trust threshold to verify with (keys 0 and 1 are trusted).
    pub threshold: usize,
    /// Signed by a trusted key with every stored byte as the chunk table names it, and wrong
    /// only in what the content hashes to: a bug of the writer that made it. Refused with
    /// every hash checked (`Checks::Every`, `--paranoid`, the fleet server's upload); the
    /// default single pass over the stored bytes installs what the signers signed.
    pub writer_bug: bool,
}

/// The attacks that are writer bugs (see [`Attack::writer_bug`]).
pub const WRITER_BUGS: [&str; 3] = [
    "chunk-named-wrongly",
    "chunks-swapped",
    "wrong-component-digest",
];

/// The hardware id the corpus verifies for.
pub const COMPATIBLE: &str = "acme-gw";
/// The minimum security version the corpus verifies with.
pub const MIN_SECURITY_VERSION: u64 = 5;

/// The valid bundle every attack starts from: two components, signed by key 0.
pub fn base() -> Vec<u8> {
    Fixture::default().build(&[&key(0)])
}

/// The trusted keys (0 and 1) and the threshold of an attack, for building its trust root.
pub fn policy_inputs(attack: &Attack) -> (&'static [u8], usize) {
    (&[0, 1], attack.threshold)
}

/// Every attack.
pub fn attacks() -> Vec<Attack> {
    let base = base();
    let parts = Parts::split(&base);
    let data_start = parts.data_start(1);
    let manifest_len = parts.manifest_bytes().len();
    // Attacks verified against a 2-of-2 trust root.
    let manifest = parts.manifest_bytes();
    let dup = sign(&key(0), &manifest);
    let threshold_two = vec![
        Attack {
            name: "duplicate-signatures-one-key".into(),
            bytes: parts.assemble_raw(&manifest, &[dup.clone(), dup]),
            code: "signature-threshold",
            threshold: 2,
            writer_bug: false,
        },
        Attack {
            name: "threshold-not-met".into(),
            bytes: parts.assemble(&[&key(0), &key(7)]),
            code: "signature-threshold",
            threshold: 2,
            writer_bug: false,
        },
    ];
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, code: &'static str| {
        out.push(Attack {
            name: name.to_owned(),
            bytes,
            code,
            threshold: 1,
            writer_bug: WRITER_BUGS.contains(&name),
        })
    };

    // Truncation at many offsets.
    let c0_table = parts.components[0].table.len() * CHUNK_ENTRY_LEN;
    for (label, at) in [
        ("empty", 0),
        ("in-magic", 5),
        ("in-header", HEADER_LEN - 1),
        ("after-header", HEADER_LEN),
        ("in-manifest", HEADER_LEN + manifest_len / 2),
        ("after-manifest", HEADER_LEN + manifest_len),
        (
            "in-signature",
            HEADER_LEN + manifest_len + SIGNATURE_ENTRY_LEN / 2,
        ),
        ("at-data", data_start),
        ("in-chunk-table", data_start + c0_table / 2),
        ("in-first-chunk", data_start + c0_table + 10),
        ("in-second-component", base.len() - 2000),
        ("last-byte", base.len() - 1),
    ] {
        add(
            &format!("truncated-{label}"),
            base[..at].to_vec(),
            "truncated",
        );
    }

    // Bit flips in the header.
    add("flip-magic", flip(&base, 1, 0x01), "bad-format");
    add("flip-layout-version", flip(&base, 8, 0x02), "bad-format");
    add("flip-flags", flip(&base, 10, 0x01), "bad-format");
    add(
        "manifest-len-near-2^32",
        put_u32(&base, 12, u32::MAX - 1),
        "limit-exceeded",
    );
    add(
        "manifest-len-over-limit",
        put_u32(&base, 12, (1 << 20) + 1),
        "limit-exceeded",
    );
    add(
        "signature-count-near-2^32",
        put_u32(&base, 16, u32::MAX),
        "limit-exceeded",
    );
    add("manifest-len-zero", put_u32(&base, 12, 0), "bad-format");
    // Bit flips in the signed parts and the data.
    add(
        "flip-manifest",
        flip(&base, HEADER_LEN + manifest_len / 3, 0x01),
        "bad-signature",
    );
    add(
        "flip-signature",
        flip(&base, HEADER_LEN + manifest_len + 40, 0x80),
        "bad-signature",
    );
    add(
        "flip-signer-key",
        flip(&base, HEADER_LEN + manifest_len + 3, 0x10),
        "untrusted-key",
    );
    add(
        "flip-chunk-table",
        flip(&base, data_start + 7, 0x01),
        "chunk-table-digest",
    );
    add(
        "flip-chunk-table-length",
        flip(&base, data_start + 33, 0x01),
        "chunk-table-digest",
    );
    let c1_table = data_start
        + parts.components[0].table.len() * CHUNK_ENTRY_LEN
        + parts.components[0]
            .chunks
            .iter()
            .map(Vec::len)
            .sum::<usize>();
    add(
        "flip-second-chunk-table",
        flip(&base, c1_table + 1, 0x04),
        "chunk-table-digest",
    );
    let first_chunk = data_start + c0_table;
    add(
        "flip-chunk-frame-magic",
        flip(&base, first_chunk, 0x01),
        "chunk-digest",
    );
    let raw_at = raw_chunk_offset(&parts, 0);
    add(
        "flip-chunk-data",
        flip(&base, data_start + c0_table + raw_at, 0x01),
        "chunk-digest",
    );
    let mut trailing = base.clone();
    trailing.extend_from_slice(b"tail");
    add("trailing-bytes", trailing, "bad-format");

    // Signatures.
    add("unsigned", parts.assemble(&[]), "unsigned");
    add("wrong-key", parts.assemble(&[&key(7)]), "untrusted-key");
    let foreign = {
        let mut p = parts.clone();
        p.manifest["version"] = "9.9.9".into();
        sign(&key(0), &p.manifest_bytes())
    };
    add(
        "signature-from-other-manifest",
        parts.assemble_raw(&manifest, &[foreign]),
        "bad-signature",
    );

    // Policy.
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut p = parts.clone();
        f(&mut p.manifest);
        p.assemble(&[&key(0)])
    };
    add(
        "expired",
        edit(&|m| m["expires"] = "2020-01-01T00:00:00Z".into()),
        "expired",
    );
    // The same instants spelled another way: one signed form only.
    add(
        "created-with-offset",
        edit(&|m| m["created"] = "2026-11-29T12:00:00+00:00".into()),
        "bad-format",
    );
    add(
        "expires-with-fraction",
        edit(&|m| m["expires"] = "2099-01-01T00:00:00.000Z".into()),
        "bad-format",
    );
    add(
        "created-lowercase",
        edit(&|m| m["created"] = "2026-11-29t12:00:00z".into()),
        "bad-format",
    );
    add(
        "downgrade",
        edit(&|m| m["security_version"] = 4.into()),
        "downgrade",
    );
    add(
        "other-hardware",
        edit(&|m| m["compatible"] = json!(["other-board"])),
        "incompatible",
    );
    add(
        "no-hardware",
        edit(&|m| m["compatible"] = json!([])),
        "incompatible",
    );

    // Declared sizes and counts.
    let c0 = |f: &dyn Fn(&mut Value)| edit(&|m| f(&mut m["components"][0]));
    add(
        "size-2^63",
        c0(&|c| c["size"] = (1u64 << 63).into()),
        "limit-exceeded",
    );
    add(
        "size-near-2^32",
        c0(&|c| c["size"] = ((1u64 << 32) + 5).into()),
        "size-mismatch",
    );
    add(
        "size-u64-max",
        c0(&|c| c["size"] = u64::MAX.into()),
        "limit-exceeded",
    );
    add(
        "chunk-count-2^63",
        c0(&|c| c["chunk_table"]["count"] = (1u64 << 63).into()),
        "limit-exceeded",
    );
    add(
        "data-size-2^63",
        c0(&|c| c["chunk_table"]["data_size"] = (1u64 << 63).into()),
        "limit-exceeded",
    );
    add(
        "table-offset-2^63",
        c0(&|c| c["chunk_table"]["offset"] = (1u64 << 63).into()),
        "bad-format",
    );
    add(
        "max-chunk-near-2^32",
        c0(&|c| c["chunking"]["max_size"] = ((1u64 << 32) + 1).into()),
        "limit-exceeded",
    );
    add(
        "max-chunk-over-limit",
        c0(&|c| c["chunking"]["max_size"] = (2u64 << 20).into()),
        "limit-exceeded",
    );
    add(
        "too-many-components",
        edit(&|m| {
            let one = m["components"][1].clone();
            let many: Vec<Value> = (0..65)
                .map(|i| {
                    let mut c = one.clone();
                    c["name"] = format!("c{i}").into();
                    c
                })
                .collect();
            m["components"] = many.into();
        }),
        "limit-exceeded",
    );
    add(
        "too-many-compatible",
        edit(&|m| {
            m["compatible"] = (0..300)
                .map(|i| format!("hw{i}"))
                .collect::<Vec<_>>()
                .into()
        }),
        "limit-exceeded",
    );
    let table_edit = |f: &dyn Fn(&mut crate::parts::ComponentData)| {
        let mut p = parts.clone();
        f(&mut p.components[0]);
        p.fix_layout();
        p.assemble(&[&key(0)])
    };
    add(
        "chunk-length-near-2^32",
        table_edit(&|c| c.table[0].length = u32::MAX),
        "limit-exceeded",
    );
    add(
        "chunk-stored-length-near-2^32",
        table_edit(&|c| c.table[0].stored_length = u32::MAX),
        "limit-exceeded",
    );
    add(
        "chunk-length-zero",
        table_edit(&|c| c.table[0].length = 0),
        "size-mismatch",
    );
    add(
        "raw-chunk-longer-than-stored",
        table_edit(&|c| {
            let raw = c
                .table
                .iter()
                .position(|e| e.is_raw())
                .expect("a raw chunk");
            c.table[raw].length += 1;
        }),
        "size-mismatch",
    );
    add(
        "compressed-chunk-declared-raw",
        table_edit(&|c| {
            let packed = c
                .table
                .iter()
                .position(|e| !e.is_raw())
                .expect("a compressed chunk");
            c.table[packed].stored_digest = c.table[packed].digest;
            c.table[packed].stored_length = c.table[packed].length;
        }),
        "chunk-digest",
    );

    // Hostile names.
    for (label, field, value) in [
        ("dotdot-name", "name", "../etc"),
        ("slash-name", "name", "a/b"),
        ("backslash-name", "name", "a\\b"),
        ("nul-name", "name", "a\u{0}b"),
        ("long-name", "name", &"n".repeat(65)),
        ("dotdot-slot", "slot_class", ".."),
        ("dot-kind", "kind", ".hidden"),
        ("newline-name", "name", "a\nb"),
    ] {
        add(label, c0(&|c| c[field] = value.into()), "bad-name");
    }
    add(
        "bad-product",
        edit(&|m| m["product"] = "acme gateway".into()),
        "bad-name",
    );
    add(
        "bad-hook",
        edit(&|m| m["hooks"] = json!(["x/../../bin/sh"])),
        "bad-name",
    );
    add(
        "bad-hardware-id",
        edit(&|m| m["compatible"] = json!(["acme-gw", "../x"])),
        "bad-name",
    );

    // Non-canonical and malformed JSON, validly signed.
    let text = String::from_utf8(manifest.clone()).expect("UTF-8");
    let raw = |m: Vec<u8>| parts.assemble_raw(&m, &[sign(&key(0), &m)]);
    add(
        "json-white-space",
        raw(text.replacen(",", ", ", 1).into_bytes()),
        "non-canonical",
    );
    add(
        "json-unsorted-keys",
        raw(text
            .replacen("{\"compatible\"", "{\"zzz\":1,\"compatible\"", 1)
            .into_bytes()),
        "non-canonical",
    );
    add(
        "json-duplicate-key",
        raw(text
            .replacen(
                "\"created\"",
                "\"created\":\"2020-01-01T00:00:00Z\",\"created\"",
                1,
            )
            .into_bytes()),
        "non-canonical",
    );
    add(
        "json-float",
        raw(text
            .replacen("\"security_version\":5", "\"security_version\":5.0", 1)
            .into_bytes()),
        "non-canonical",
    );
    add(
        "json-escaped-letter",
        raw(text
            .replacen("acme-gateway", "\\u0061cme-gateway", 1)
            .into_bytes()),
        "non-canonical",
    );
    let mut bad_utf8 = manifest.clone();
    let pos = text.find("acme-gateway").expect("product") + 1;
    bad_utf8[pos] = 0xff;
    add("json-invalid-utf8", raw(bad_utf8), "non-canonical");
    add(
        "json-trailing-newline",
        raw([manifest.as_slice(), b"\n"].concat()),
        "non-canonical",
    );
    add("json-not-an-object", raw(b"[1,2,3]".to_vec()), "bad-format");
    add(
        "unknown-field",
        edit(&|m| m["install_anywhere"] = true.into()),
        "bad-format",
    );
    add(
        "version-not-semver",
        edit(&|m| m["version"] = "1.4".into()),
        "bad-format",
    );
    add(
        "created-not-a-time",
        edit(&|m| m["created"] = "yesterday".into()),
        "bad-format",
    );
    add("format-2", edit(&|m| m["format"] = 2.into()), "bad-format");
    add(
        "unknown-compression",
        c0(&|c| c["compression"] = "lz4".into()),
        "bad-format",
    );

    // Content that does not match what was signed.
    add(
        "decompression-bomb",
        table_edit(&|c| {
            let content = vec![0u8; 1 << 20];
            c.table[0].digest = abide_bundle::Digest::of(&content[..c.table[0].length as usize]);
            c.replace_stored(0, zstd::bulk::compress(&content, 19).expect("compress"));
        }),
        "decompression-bomb",
    );
    add(
        "chunk-shorter-than-declared",
        table_edit(&|c| {
            c.replace_stored(0, zstd::bulk::compress(&[1u8; 100], 3).expect("compress"));
        }),
        "chunk-corrupt",
    );
    add(
        "chunk-not-zstd",
        table_edit(&|c| {
            c.replace_stored(0, vec![0x55; 300]);
        }),
        "chunk-corrupt",
    );
    add(
        "chunk-stored-bytes-swapped",
        table_edit(&|c| {
            c.chunks[0] = zstd::bulk::compress(b"other", 3).expect("compress");
            c.table[0].stored_length = c.chunks[0].len() as u32;
        }),
        "chunk-digest",
    );
    add(
        "chunk-named-wrongly",
        table_edit(&|c| c.table[1].digest = abide_bundle::Digest::of(b"another chunk")),
        "chunk-digest",
    );
    add(
        "chunks-swapped",
        table_edit(&|c| {
            c.table.swap(0, 1);
            c.chunks.swap(0, 1);
        }),
        "component-digest",
    );
    add(
        "wrong-component-digest",
        c0(&|c| c["digest"] = abide_bundle::Digest::of(b"not the content").to_hex().into()),
        "component-digest",
    );
    add(
        "chunks-sum-short-of-size",
        c0(&|c| c["size"] = (c["size"].as_u64().expect("size") + 1).into()),
        "size-mismatch",
    );
    out.extend(threshold_two);
    out
}

fn flip(bytes: &[u8], at: usize, mask: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at] ^= mask;
    out
}

fn put_u32(bytes: &[u8], at: usize, value: u32) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at..at + 4].copy_from_slice(&value.to_le_bytes());
    out
}

/// The offset, from the first chunk of component `c`, of a byte in the middle of a raw
/// (stored uncompressed) chunk: flipping it changes stored bytes and content alike.
fn raw_chunk_offset(parts: &Parts, c: usize) -> usize {
    let data = &parts.components[c];
    let mut offset = 0;
    for (i, chunk) in data.chunks.iter().enumerate() {
        if data.table[i].is_raw() && chunk.len() > 1000 {
            return offset + chunk.len() / 2;
        }
        offset += chunk.len();
    }
    panic!("the fixture has no raw chunk");
}
