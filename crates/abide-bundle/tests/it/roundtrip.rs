//! Bundles made by the writer read back byte for byte, with the layout the spec describes.

use abide_bundle::format::{HEADER_LEN, MAGIC};
use abide_bundle::{BundleReader, ExpirationEnforcement, Limits, add_signature};
use abide_testkit::{Fixture, key, trust};
use expect_test::expect;

use crate::verify;

fn read_all(bytes: &[u8], trust: &abide_bundle::TrustRoot) -> Vec<(String, Vec<u8>)> {
    let policy = crate::any_device(trust);
    let mut bundle = BundleReader::open(bytes, Limits::default())
        .unwrap()
        .verify(&policy)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..bundle.manifest().components.len() {
        let mut content = Vec::new();
        let c = bundle
            .read_component(&mut |d| {
                content.extend_from_slice(d);
                Ok(())
            })
            .unwrap();
        out.push((c.name.to_string(), content));
    }
    bundle.finish().unwrap();
    out
}

#[test]
fn content_comes_back_exactly_and_digests_match_sha256sum() {
    let fixture = Fixture::default();
    let bytes = fixture.build(&[&key(0)]);
    assert_eq!(bytes[..8], MAGIC);
    let back = read_all(&bytes, &trust(&[0], 1));
    assert_eq!(back.len(), 2);
    for ((name, content), (want_name, _, _, want)) in back.iter().zip(&fixture.components) {
        assert_eq!(name, want_name);
        assert_eq!(content, want);
    }
    let manifest = verify(&bytes, &trust(&[0, 1], 1)).unwrap();
    assert_eq!(
        manifest.components[0].digest,
        abide_bundle::Digest::of(&fixture.components[0].3)
    );
}

#[test]
fn the_manifest_is_canonical_json_with_the_documented_fields() {
    let fixture = Fixture {
        components: vec![("rootfs", "rootfs", "rootfs", b"hello abide\n".to_vec())],
        ..Fixture::default()
    };
    let bytes = fixture.build(&[&key(0)]);
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let manifest = std::str::from_utf8(&bytes[HEADER_LEN..HEADER_LEN + len]).unwrap();
    expect![[r#"{"compatible":["acme-gw","acme-gw-rev2"],"components":[{"chunk_table":{"count":1,"data_size":12,"digest":"c74805c3e054873a77ea3bd94164c8ee952889be6ea56330fd5f0ee091d29a20","offset":0},"chunking":{"algorithm":"fastcdc-2020","avg_size":16384,"max_size":65536,"min_size":4096},"compression":"zstd","digest":"f011236188c8cce23d58b5080c38643a684af132df37e171ea8c855257c44388","kind":"rootfs","name":"rootfs","size":12,"slot_class":"rootfs"}],"created":"2026-11-01T12:00:00Z","expires":"2100-01-01T00:00:00Z","format":1,"product":"acme-gateway","security_version":5,"version":"1.4.0"}"#]]
    .assert_eq(manifest);
}

#[test]
fn equal_content_gives_equal_chunks_across_releases() {
    // A 5% edit in the middle of an image leaves most chunk names unchanged: the basis of
    // delta updates.
    let old = abide_testkit::image(2 << 20, 9);
    let mut new = old.clone();
    let mid = old.len() / 2;
    for b in &mut new[mid..mid + old.len() / 20] {
        *b = b.wrapping_add(1);
    }
    let names = |content: &[u8]| {
        let fixture = Fixture {
            components: vec![("rootfs", "rootfs", "rootfs", content.to_vec())],
            ..Fixture::default()
        };
        let parts = abide_testkit::parts::Parts::split(&fixture.build(&[&key(0)]));
        parts.components[0]
            .table
            .iter()
            .map(|e| e.digest)
            .collect::<std::collections::HashSet<_>>()
    };
    let (a, b) = (names(&old), names(&new));
    let shared = a.intersection(&b).count();
    assert!(
        shared * 100 >= a.len() * 85,
        "only {shared} of {} chunks shared",
        a.len()
    );
}

#[test]
fn runs_of_zeros_are_cut_and_stored_exactly_as_fastcdc_cuts_them() {
    // The writer names, compresses and cuts a run of zeros once and reuses the result; the
    // chunk table must be the one plain FastCDC gives, whatever the run's length and place.
    let fixture = Fixture::default();
    let c = fixture.chunking;
    let max = c.max_size as usize;
    let random = abide_testkit::image(3 * max, 4);
    let mut content = Vec::new();
    for zeros in [max / 3, max, max + 1, 5 * max + 77, 2 * max - 1, 0, 7 * max] {
        content.extend(std::iter::repeat_n(0u8, zeros));
        content.extend_from_slice(&random[..max / 2 + zeros % 1000]);
    }
    // A run of zeros at the end that is longer than the cutter's read block.
    content.extend(std::iter::repeat_n(0u8, (5 << 20) + 3));
    let fixture = Fixture {
        components: vec![("rootfs", "rootfs", "rootfs", content.clone())],
        ..fixture
    };
    let bytes = fixture.build(&[&key(0)]);
    let parts = abide_testkit::parts::Parts::split(&bytes);
    let lengths = parts.components[0]
        .table
        .iter()
        .map(|e| e.length as usize)
        .collect::<Vec<_>>();
    let want = fastcdc::v2020::FastCDC::new(&content, c.min_size, c.avg_size, c.max_size)
        .map(|chunk| chunk.length)
        .collect::<Vec<_>>();
    assert_eq!(lengths, want);
    let mut offset = 0;
    for entry in &parts.components[0].table {
        let piece = &content[offset..offset + entry.length as usize];
        assert_eq!(entry.digest, abide_bundle::Digest::of(piece));
        offset += entry.length as usize;
    }
    let zero_chunks = parts.components[0]
        .table
        .iter()
        .filter(|e| e.length as usize == max && e.digest == abide_bundle::Digest::of(&vec![0; max]))
        .count();
    assert!(zero_chunks >= 90, "{zero_chunks} chunks of zeros");
    let back = read_all(&bytes, &trust(&[0], 1));
    assert!(back[0].1 == content, "the content comes back byte for byte");
}

#[test]
fn signatures_can_be_added_one_by_one_to_reach_a_threshold() {
    let bytes = Fixture::default().build(&[&key(0)]);
    let two = trust(&[0, 1], 2);
    assert_eq!(
        verify(&bytes, &two).unwrap_err().code(),
        "signature-threshold"
    );
    let mut signed = Vec::new();
    add_signature(
        &mut bytes.as_slice(),
        &key(1),
        &mut signed,
        Limits::default(),
    )
    .unwrap();
    verify(&signed, &two).unwrap();
    let mut again = Vec::new();
    let err = add_signature(
        &mut signed.as_slice(),
        &key(1),
        &mut again,
        Limits::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), "duplicate-signature");
    // Reading the data back is unchanged by the extra signature.
    assert_eq!(read_all(&signed, &two), read_all(&bytes, &trust(&[0], 1)));
}

#[test]
fn an_empty_component_round_trips() {
    let fixture = Fixture {
        components: vec![
            ("config", "config", "config", Vec::new()),
            ("app", "app", "app", b"x".to_vec()),
        ],
        ..Fixture::default()
    };
    let back = read_all(&fixture.build(&[&key(0)]), &trust(&[0], 1));
    assert_eq!(back[0].1, b"");
    assert_eq!(back[1].1, b"x");
}

#[test]
fn extracting_one_component_skips_the_others_unchecked() {
    let fixture = Fixture::default();
    let mut bytes = fixture.build(&[&key(0)]);
    // Corrupt the first component's data: the second must still come out verified.
    let parts = abide_testkit::parts::Parts::split(&bytes);
    let at = parts.data_start(1)
        + parts.components[0].table.len() * abide_bundle::format::CHUNK_ENTRY_LEN
        + 5;
    bytes[at] ^= 0xff;
    let t = trust(&[0], 1);
    let policy = crate::any_device(&t);
    let mut bundle = BundleReader::open(bytes.as_slice(), Limits::default())
        .unwrap()
        .verify(&policy)
        .unwrap();
    bundle.skip_component().unwrap();
    let mut content = Vec::new();
    bundle
        .read_component(&mut |d| {
            content.extend_from_slice(d);
            Ok(())
        })
        .unwrap();
    assert_eq!(content, fixture.components[1].3);
}

#[test]
fn expiry_is_enforced_only_when_safe() {
    let fixture = Fixture {
        expires: Some("2026-01-01T00:00:00Z".parse().unwrap()),
        ..Fixture::default()
    };
    let bytes = fixture.build(&[&key(0)]);
    let t = trust(&[0], 1);
    let mut policy = crate::any_device(&t);
    let err = BundleReader::open(bytes.as_slice(), Limits::default())
        .unwrap()
        .verify(&policy)
        .err()
        .unwrap();
    assert_eq!(err.code(), "expired");
    policy.expiration = ExpirationEnforcement::Unsafe;
    assert!(
        BundleReader::open(bytes.as_slice(), Limits::default())
            .unwrap()
            .verify(&policy)
            .is_ok()
    );
}

#[test]
fn repeated_chunks_are_each_checked() {
    // Free space in an image gives many identical chunks; every copy's stored bytes are still
    // checked even though its content is decoded once.
    let mut content = abide_testkit::image(50_000, 5);
    content.extend(std::iter::repeat_n(0u8, 1 << 20));
    content.extend(abide_testkit::image(50_000, 6));
    let fixture = Fixture {
        components: vec![("rootfs", "rootfs", "rootfs", content.clone())],
        ..Fixture::default()
    };
    let bytes = fixture.build(&[&key(0)]);
    let back = read_all(&bytes, &trust(&[0], 1));
    assert_eq!(back[0].1, content);

    let parts = abide_testkit::parts::Parts::split(&bytes);
    let table = &parts.components[0].table;
    let repeat = (1..table.len())
        .find(|&j| table[..j].contains(&table[j]))
        .expect("a repeated chunk");
    let offset: usize = parts.components[0].chunks[..repeat]
        .iter()
        .map(Vec::len)
        .sum();
    let mut bad = bytes.clone();
    let at = parts.data_start(1) + table.len() * abide_bundle::format::CHUNK_ENTRY_LEN + offset + 4;
    bad[at] ^= 0x01;
    assert_eq!(
        verify(&bad, &trust(&[0, 1], 1)).unwrap_err().code(),
        "chunk-digest"
    );
}

#[test]
fn reusing_local_chunks_gives_the_same_content_and_stops_cleanly_on_a_bad_chunk() {
    // Over 32 chunks, so the local fetcher is still running when the bad chunk is met.
    let content = abide_testkit::image(3_000_000, 31);
    let fixture = Fixture {
        components: vec![("rootfs", "rootfs", "rootfs", content.clone())],
        ..Fixture::default()
    };
    let bytes = fixture.build(&[&key(0)]);
    let t = trust(&[0], 1);
    let policy = crate::any_device(&t);
    let parts = abide_testkit::parts::Parts::split(&bytes);
    let table = parts.components[0].table.clone();
    assert!(table.len() > 40, "{} chunks", table.len());
    // The "local slot" holds the even chunks' content (and garbage for chunk 2).
    let mut offsets = Vec::new();
    let mut at = 0usize;
    for e in &table {
        offsets.push(at);
        at += e.length as usize;
    }
    let local = |e: &abide_bundle::format::ChunkEntry, c: &mut Vec<u8>| {
        let Some(i) = table.iter().position(|t| t == e) else {
            return false;
        };
        if i % 2 == 1 {
            return false;
        }
        c.extend_from_slice(&content[offsets[i]..offsets[i] + e.length as usize]);
        if i == 2 {
            c[0] ^= 1;
        }
        true
    };
    let mut bundle = BundleReader::open(bytes.as_slice(), Limits::default())
        .unwrap()
        .verify(&policy)
        .unwrap();
    let t2 = bundle.read_chunk_table().unwrap();
    let mut got = Vec::new();
    let reuse = bundle
        .read_chunks_reusing(&t2, &local, &mut |d| {
            got.extend_from_slice(d);
            Ok(())
        })
        .unwrap();
    assert_eq!(got, content);
    assert_eq!(
        reuse.chunks as usize,
        table.len().div_ceil(2) - 1,
        "every even chunk but the damaged one"
    );
    bundle.finish().unwrap();

    // A damaged bundle chunk early on: an error, not a hang, while the fetcher is ahead.
    let mut bad = bytes.clone();
    let at = parts.data_start(1)
        + table.len() * abide_bundle::format::CHUNK_ENTRY_LEN
        + parts.components[0].chunks[0].len()
        + 3;
    bad[at] ^= 1;
    let mut bundle = BundleReader::open(bad.as_slice(), Limits::default())
        .unwrap()
        .verify(&policy)
        .unwrap();
    let t3 = bundle.read_chunk_table().unwrap();
    let err = bundle
        .read_chunks_reusing(&t3, &|_, _| false, &mut |_| Ok(()))
        .unwrap_err();
    assert_eq!(err.code(), "chunk-digest");
}

/// Under a 2-of-3 root a bundle signed by all three keys carries one signature more than it
/// needs; a change to any byte of any of the three entries (the key or the signature) is
/// still refused, and so is a fourth signature by an untrusted key that does not verify.
#[test]
fn every_byte_of_every_signature_counts_even_past_the_threshold() {
    let bytes = Fixture::default().build(&[&key(0), &key(1), &key(2)]);
    let root = trust(&[0, 1, 2], 2);
    verify(&bytes, &root).unwrap();
    let m = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    assert_eq!(u32::from_le_bytes(bytes[16..20].try_into().unwrap()), 3);
    let block = HEADER_LEN + m..HEADER_LEN + m + 3 * 96;
    let mut codes = std::collections::BTreeMap::new();
    for at in block.clone() {
        let mut changed = bytes.clone();
        changed[at] ^= 0x01;
        let err = verify(&changed, &root).expect_err(&format!("byte {at} of the signatures"));
        *codes.entry(err.code()).or_insert(0) += 1;
    }
    // A changed signature is bad; a changed key is no longer trusted, and its signature no
    // longer verifies under it.
    assert_eq!(codes.values().sum::<usize>(), 288, "{codes:?}");
    assert_eq!(
        codes.keys().copied().collect::<Vec<_>>(),
        ["bad-signature"],
        "{codes:?}"
    );
    // An extra signature by an untrusted key: fine when it verifies, refused when it does not.
    let mut four = Vec::new();
    add_signature(&mut bytes.as_slice(), &key(9), &mut four, Limits::default()).unwrap();
    verify(&four, &root).unwrap();
    let last = HEADER_LEN + m + 3 * 96 + 40;
    four[last] ^= 0x80;
    assert_eq!(verify(&four, &root).unwrap_err().code(), "bad-signature");
}
