//! Deltas: made from two bundles, applied against the old content they name, the new content
//! comes out byte for byte; anything else is refused with the check that failed.

use std::io::Cursor;

use abide_bundle::delta::{
    Base, DeltaReader, PATCH_ENTRY_LEN, Patch, ReadAt, TableBase, index_digest,
};
use abide_bundle::delta_write::{DeltaOptions, Release, create, plan};
use abide_bundle::format::ChunkEntry;
use abide_bundle::{BundleReader, Limits, Manifest};
use abide_testkit::{Fixture, image, key, trust};

/// A bundle read out: head, manifest, tables and content.
struct Read {
    head: Vec<u8>,
    manifest: Manifest,
    tables: Vec<Vec<ChunkEntry>>,
    content: Vec<Vec<u8>>,
}

fn read(bytes: &[u8]) -> Read {
    let reader = BundleReader::open(bytes, Limits::default()).unwrap();
    let head = reader.head_bytes();
    let mut bundle = reader.without_signatures().unwrap();
    let manifest = bundle.manifest().clone();
    let (mut tables, mut content) = (Vec::new(), Vec::new());
    for _ in &manifest.components {
        let table = bundle.read_chunk_table().unwrap();
        let mut data = Vec::new();
        bundle
            .read_chunks(&table, &mut |d| {
                data.extend_from_slice(d);
                Ok(())
            })
            .unwrap();
        tables.push(table);
        content.push(data);
    }
    Read {
        head,
        manifest,
        tables,
        content,
    }
}

fn make(old: &Read, new: &Read, options: &DeltaOptions) -> Vec<u8> {
    fn content(r: &Read) -> Vec<&(dyn ReadAt + Sync)> {
        r.content
            .iter()
            .map(|c| c as &(dyn ReadAt + Sync))
            .collect()
    }
    let (oc, nc) = (content(old), content(new));
    let mut out = Cursor::new(Vec::new());
    let stats = create(
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
        &mut out,
    )
    .unwrap();
    let bytes = out.into_inner();
    assert_eq!(stats.size, bytes.len() as u64);
    bytes
}

/// A running slot holding `content`, cut as `table` says.
type Slot = TableBase<Vec<u8>>;

/// Applies `delta` against `slots` (one per component, by position), verified with key 0.
fn apply(delta: &[u8], slots: &[Option<Slot>]) -> abide_bundle::Result<Vec<Vec<u8>>> {
    let trust = trust(&[0], 1);
    let mut d = DeltaReader::open(delta, Limits::default())?.verify(&crate::any_device(&trust))?;
    let mut out = Vec::new();
    for slot in slots {
        let (table, _) = d.read_tables()?;
        let mut content = Vec::new();
        d.apply(&table, slot.as_ref().map(|s| s as &dyn Base), &mut |b| {
            content.extend_from_slice(b);
            Ok(())
        })?;
        out.push(content);
    }
    d.finish()?;
    Ok(out)
}

/// Two releases of a two-component system: the new root file system has a stretch rewritten
/// a little (a rebuilt library), a few bytes inserted and a block changed; the app is new.
fn releases() -> (Fixture, Fixture) {
    let old_root = image(1_200_000, 7);
    let mut new_root = old_root.clone();
    for b in new_root[300_000..420_000].iter_mut().step_by(97) {
        *b = b.wrapping_add(1);
    }
    new_root.splice(800_000..800_000, b"inserted by the update".iter().copied());
    new_root[1_000_000..1_004_096].fill(0x42);
    let old = Fixture {
        version: "1.4.0",
        components: vec![
            ("rootfs", "rootfs", "rootfs", old_root),
            ("app", "app", "appfs", image(90_000, 2)),
        ],
        ..Fixture::default()
    };
    let new = Fixture {
        version: "1.5.0",
        components: vec![
            ("rootfs", "rootfs", "rootfs", new_root),
            ("app", "app", "appfs", image(90_000, 3)),
        ],
        ..Fixture::default()
    };
    (old, new)
}

fn slots(old: &Read) -> Vec<Option<Slot>> {
    old.content
        .iter()
        .zip(&old.tables)
        .map(|(c, t)| Some(Slot::new(c.clone(), t)))
        .collect()
}

#[test]
fn a_delta_turns_the_old_release_into_the_new_byte_for_byte_in_a_fraction_of_the_bundle() {
    let (old, new) = releases();
    let (old_bytes, new_bytes) = (old.build(&[&key(0)]), new.build(&[&key(0)]));
    let (o, n) = (read(&old_bytes), read(&new_bytes));
    let delta = make(&o, &n, &DeltaOptions::default());
    let out = apply(&delta, &slots(&o)).unwrap();
    assert_eq!(out[0], new.components[0].3);
    assert_eq!(out[1], new.components[1].3);
    // The changed root file system costs a small part of its chunks; the new app (nothing in
    // common with the old) costs about what it costs in the bundle.
    let missing: u64 = n.tables[0]
        .iter()
        .filter(|e| !o.tables[0].iter().any(|x| x.digest == e.digest))
        .map(|e| u64::from(e.stored_length))
        .sum();
    let app: u64 = n.tables[1].iter().map(|e| u64::from(e.stored_length)).sum();
    let table_bytes = (n.tables[0].len() + n.tables[1].len()) as u64 * 72;
    let patches = delta.len() as u64 - n.head.len() as u64 - table_bytes;
    assert!(
        patches < app + missing / 4,
        "patches {patches} bytes, the app's chunks {app}, the root's missing chunks {missing}"
    );
    assert!(
        delta.len() < new_bytes.len() / 3,
        "{} of {}",
        delta.len(),
        new_bytes.len()
    );
    // Made again, it is the same file.
    assert_eq!(make(&o, &n, &DeltaOptions::default()), delta);
}

#[test]
fn the_plan_patches_exactly_the_chunks_the_old_release_lacks_against_old_bytes_in_range() {
    let (old, new) = releases();
    let (o, n) = (read(&old.build(&[&key(0)])), read(&new.build(&[&key(0)])));
    let options = DeltaOptions {
        max_patch_content: 64 << 10,
        margin: 4 << 10,
        ..DeltaOptions::default()
    };
    let old_size: u64 = o.tables[0].iter().map(|e| u64::from(e.length)).sum();
    let planned = plan(Some(&o.tables[0]), &n.tables[0], &options);
    let mut covered = vec![false; n.tables[0].len()];
    let mut last_end = 0;
    for p in &planned {
        assert!(
            p.first >= last_end,
            "in order, without overlap: {planned:?}"
        );
        last_end = p.first + p.count;
        let content: u64 = n.tables[0][p.first as usize..last_end as usize]
            .iter()
            .map(|e| u64::from(e.length))
            .sum();
        assert!(p.count == 1 || content <= 64 << 10, "{p:?} makes {content}");
        assert!(
            p.prefix_offset + u64::from(p.prefix_len) <= old_size,
            "{p:?}"
        );
        assert!(
            p.prefix_len > 0 && p.prefix_len <= options.max_prefix,
            "{p:?}"
        );
        for c in &mut covered[p.first as usize..last_end as usize] {
            *c = true;
        }
    }
    for (e, covered) in n.tables[0].iter().zip(covered) {
        let held = o.tables[0].iter().any(|x| x.digest == e.digest);
        assert_eq!(covered, !held, "chunk {} held {held}", e.digest);
    }
    // Without old content there are no references.
    assert!(
        plan(None, &n.tables[1], &options)
            .iter()
            .all(|p| p.prefix_len == 0 && p.prefix_offset == 0)
    );
}

/// Where component 0's patch table and first frame start in `delta`.
fn layout(delta: &[u8], n: &Read, patches: usize) -> (usize, usize) {
    let head_len = u32::from_le_bytes(delta[12..16].try_into().unwrap()) as usize;
    let table = 16 + head_len + n.head.len() + n.tables[0].len() * 72;
    (table, table + patches * PATCH_ENTRY_LEN)
}

#[test]
fn a_delta_for_other_content_or_changed_in_any_part_is_refused_with_the_check_that_failed() {
    let (old, new) = releases();
    let (o, n) = (read(&old.build(&[&key(0)])), read(&new.build(&[&key(0)])));
    let delta = make(&o, &n, &DeltaOptions::default());
    let trust1 = trust(&[0], 1);
    let d = DeltaReader::open(delta.as_slice(), Limits::default())
        .unwrap()
        .verify(&crate::any_device(&trust1))
        .unwrap();
    let patches = d.head().components[0].1 as usize;
    assert_eq!(d.head().from.version.to_string(), "1.4.0");
    assert_eq!(
        d.head().base("rootfs").unwrap().index,
        index_digest(&o.tables[0])
    );
    assert!(patches > 0);
    let (table_at, frames_at) = layout(&delta, &n, patches);
    let first = Patch::decode(&delta[table_at..table_at + PATCH_ENTRY_LEN]);
    let code = |bytes: &[u8], slots: &[Option<Slot>]| match apply(bytes, slots) {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.code().to_owned(),
    };
    let changed = |at: usize, f: &dyn Fn(&mut u8)| {
        let mut d = delta.clone();
        f(&mut d[at]);
        d
    };
    // A device whose running slot holds other content: the chunks the delta copies are not
    // there.
    let other = Fixture {
        components: vec![
            ("rootfs", "rootfs", "rootfs", image(1_200_000, 99)),
            ("app", "app", "appfs", image(90_000, 2)),
        ],
        ..Fixture::default()
    };
    let other = read(&other.build(&[&key(0)]));
    type Case = (&'static str, Vec<u8>, Vec<Option<Slot>>, &'static str);
    let cases: Vec<Case> = vec![
        ("the right base", delta.clone(), slots(&o), "accepted"),
        (
            "another release's slot",
            delta.clone(),
            slots(&other),
            "delta-base",
        ),
        (
            "no running slot",
            delta.clone(),
            vec![None, None],
            "delta-base",
        ),
        (
            "a frame byte changed",
            changed(frames_at + first.frame_len as usize / 2, &|b| *b ^= 0x10),
            slots(&o),
            "chunk-corrupt|chunk-digest",
        ),
        (
            "a reference moved",
            changed(table_at + 8, &|b| *b = b.wrapping_add(1)),
            slots(&o),
            "chunk-corrupt|chunk-digest",
        ),
        (
            "a reference past the old content",
            changed(table_at + 15, &|b| *b = 0x40),
            slots(&o),
            "bad-format",
        ),
        (
            "a frame longer than any honest one",
            changed(table_at + 23, &|b| *b = 0x7f),
            slots(&o),
            "limit-exceeded",
        ),
        (
            "a patch of no chunks",
            {
                let mut d = delta.clone();
                d[table_at + 4..table_at + 8].fill(0);
                d
            },
            slots(&o),
            "bad-format",
        ),
        (
            "a signature byte changed",
            // The last signature entry ends where the bundle head does.
            changed(
                layout(&delta, &n, 0).0 - n.tables[0].len() * 72 - 10,
                &|b| *b ^= 1,
            ),
            slots(&o),
            "bad-signature",
        ),
        (
            "the head naming another manifest",
            {
                let head_len = u32::from_le_bytes(delta[12..16].try_into().unwrap()) as usize;
                let head = std::str::from_utf8(&delta[16..16 + head_len]).unwrap();
                let at = head.find("\"to\":{\"manifest\":\"").unwrap() + 18;
                changed(16 + at, &|b| *b = if *b == b'0' { b'1' } else { b'0' })
            },
            slots(&o),
            "bad-format",
        ),
        (
            "cut short",
            delta[..delta.len() - 1].to_vec(),
            slots(&o),
            "truncated",
        ),
        (
            "a byte appended",
            [delta.as_slice(), b"x"].concat(),
            slots(&o),
            "bad-format",
        ),
        (
            "a bundle, not a delta",
            n.head.clone(),
            slots(&o),
            "bad-format",
        ),
    ];
    for (what, bytes, slots, want) in cases {
        let got = code(&bytes, &slots);
        assert!(
            want.split('|').any(|w| w == got),
            "{what}: {got}, expected {want}"
        );
    }
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// A small pair and its delta, made once.
    fn small() -> &'static (Vec<u8>, Read, Vec<Vec<u8>>) {
        static SMALL: std::sync::OnceLock<(Vec<u8>, Read, Vec<Vec<u8>>)> =
            std::sync::OnceLock::new();
        SMALL.get_or_init(|| {
            let mut root = image(60_000, 5);
            let old = Fixture {
                version: "1.0.0",
                components: vec![("rootfs", "rootfs", "rootfs", root.clone())],
                ..Fixture::default()
            };
            for b in root[20_000..30_000].iter_mut().step_by(7) {
                *b ^= 0x11;
            }
            let new = Fixture {
                version: "1.1.0",
                components: vec![("rootfs", "rootfs", "rootfs", root.clone())],
                ..Fixture::default()
            };
            let o = read(&old.build(&[&key(0)]));
            let n = read(&new.build(&[&key(0)]));
            let delta = make(&o, &n, &DeltaOptions::default());
            let content = o.content.clone();
            (delta, o, vec![content[0].clone(), root])
        })
    }

    /// What a device would write: each chunk as the sink receives it, until an error.
    fn written(delta: &[u8], old: &Read) -> (Vec<u8>, bool) {
        let trust = trust(&[0], 1);
        let mut out = Vec::new();
        let ok = (|| -> abide_bundle::Result<()> {
            let mut d =
                DeltaReader::open(delta, Limits::default())?.verify(&crate::any_device(&trust))?;
            let slot = Slot::new(old.content[0].clone(), &old.tables[0]);
            let (table, _) = d.read_tables()?;
            d.apply(&table, Some(&slot as &dyn Base), &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })?;
            d.finish()
        })()
        .is_ok();
        (out, ok)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Whatever byte of a delta changes, a device writes the new release or a part of it
        /// that it then discards: never anything else.
        #[test]
        fn any_single_byte_change_writes_the_new_release_or_nothing_else(
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let (delta, old, contents) = small();
            let new = &contents[1];
            let mut bad = delta.clone();
            let i = at.index(bad.len());
            bad[i] ^= flip;
            let (out, ok) = written(&bad, old);
            prop_assert!(new.starts_with(&out), "changing byte {} wrote other content", i);
            prop_assert!(!ok || out == *new, "changing byte {} was accepted short", i);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_delta_reader(data in prop::collection::vec(any::<u8>(), 0..4096)) {
            let (_, old, _) = small();
            let _ = written(&data, old);
            let mut forged = b"\x89ABDLT\r\n\x01\x00\x00\x00".to_vec();
            forged.extend_from_slice(&(data.len() as u32).to_le_bytes());
            forged.extend_from_slice(&data);
            let _ = written(&forged, old);
        }
    }

    #[test]
    fn the_small_delta_is_sound() {
        let (delta, old, contents) = small();
        assert_eq!(written(delta, old), (contents[1].clone(), true));
    }
}

#[test]
fn a_patch_past_the_content_or_reference_limit_is_refused_before_it_is_read() {
    let (old, new) = releases();
    let (o, n) = (read(&old.build(&[&key(0)])), read(&new.build(&[&key(0)])));
    let delta = make(&o, &n, &DeltaOptions::default());
    let trust1 = trust(&[0], 1);
    let code = |limits: Limits| {
        let mut d = DeltaReader::open(delta.as_slice(), limits)
            .unwrap()
            .verify(&crate::any_device(&trust1))
            .unwrap();
        d.read_tables().map(|_| ()).unwrap_err().code().to_owned()
    };
    // The same delta read with limits below what its patches need.
    assert_eq!(
        code(Limits {
            max_patch_content: 1,
            ..Limits::default()
        }),
        "limit-exceeded"
    );
    assert_eq!(
        code(Limits {
            max_patch_prefix: 1,
            ..Limits::default()
        }),
        "limit-exceeded"
    );
}

#[test]
fn patches_out_of_order_or_overlapping_are_refused() {
    let (old, new) = releases();
    let (o, n) = (read(&old.build(&[&key(0)])), read(&new.build(&[&key(0)])));
    let delta = make(&o, &n, &DeltaOptions::default());
    let patches = {
        let trust1 = trust(&[0], 1);
        let d = DeltaReader::open(delta.as_slice(), Limits::default())
            .unwrap()
            .verify(&crate::any_device(&trust1))
            .unwrap();
        d.head().components[0].1 as usize
    };
    assert!(
        patches >= 2,
        "the fixture needs two patches, it has {patches}"
    );
    let (table_at, _) = layout(&delta, &n, patches);
    // The second patch starts where the first does (overlap), or before it (out of order).
    for second_first in [
        0u32,
        u32::from_le_bytes(delta[table_at..table_at + 4].try_into().unwrap()),
    ] {
        let mut bad = delta.clone();
        let at = table_at + PATCH_ENTRY_LEN;
        bad[at..at + 4].copy_from_slice(&second_first.to_le_bytes());
        let err = apply(&bad, &slots(&o)).unwrap_err();
        assert_eq!(err.code(), "bad-format", "{err}");
    }
}
