#!/usr/bin/env python3
"""An independent reader of the Abide bundle format, written from docs/bundle-format.md alone.

It checks the layout, the canonical manifest, every chunk table digest, every stored-chunk
digest, every raw chunk's content and, for components whose chunks are all raw, the component
digest. It does not check signatures (no ed25519 in the Python standard library) or decompress
zstd frames (no zstd either). It prints one JSON line describing the bundle, or exits 1 naming
the first failed check.

usage: second-reader.py BUNDLE
"""

import hashlib
import json
import struct
import sys

MAGIC = b"\x89ABIDE\r\n"
ENTRY = 72


def fail(what):
    print(f"second reader: {what}", file=sys.stderr)
    sys.exit(1)


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def main(path):
    data = open(path, "rb").read()
    if len(data) < 20 or data[:8] != MAGIC:
        fail("bad magic")
    layout, flags, mlen, scount = struct.unpack_from("<HHII", data, 8)
    if layout != 1 or flags != 0:
        fail("layout version or flags")
    mstart = 20
    manifest_bytes = data[mstart : mstart + mlen]
    if len(manifest_bytes) != mlen:
        fail("truncated manifest")
    manifest = json.loads(manifest_bytes.decode("utf-8"))
    if canonical(manifest) != manifest_bytes:
        fail("manifest is not canonical")
    signers = []
    for i in range(scount):
        entry = data[mstart + mlen + 96 * i : mstart + mlen + 96 * (i + 1)]
        if len(entry) != 96:
            fail("truncated signatures")
        signers.append(hashlib.sha256(entry[:32]).hexdigest()[:32])
    start = mstart + mlen + 96 * scount
    offset = 0
    components = []
    for c in manifest["components"]:
        t = c["chunk_table"]
        if t["offset"] != offset:
            fail(f"{c['name']}: table offset")
        table_at = start + t["offset"]
        table = data[table_at : table_at + ENTRY * t["count"]]
        if hashlib.sha256(table).hexdigest() != t["digest"]:
            fail(f"{c['name']}: chunk table digest")
        at = table_at + len(table)
        size = stored_total = raw = 0
        whole = hashlib.sha256()
        for k in range(t["count"]):
            name, stored_digest = table[ENTRY * k : ENTRY * k + 32], table[ENTRY * k + 32 : ENTRY * k + 64]
            length, stored_length = struct.unpack_from("<II", table, ENTRY * k + 64)
            stored = data[at : at + stored_length]
            if hashlib.sha256(stored).digest() != stored_digest:
                fail(f"{c['name']}: stored digest of chunk {k}")
            if name == stored_digest:
                raw += 1
                if stored_length != length:
                    fail(f"{c['name']}: raw chunk {k} length")
                whole.update(stored)
            at += stored_length
            size += length
            stored_total += stored_length
        if size != c["size"] or stored_total != t["data_size"]:
            fail(f"{c['name']}: sizes")
        if raw == t["count"] and whole.hexdigest() != c["digest"]:
            fail(f"{c['name']}: component digest")
        offset = t["offset"] + len(table) + stored_total
        components.append({"name": c["name"], "chunks": t["count"], "raw": raw, "size": size})
    if start + offset != len(data):
        fail("trailing bytes")
    print(json.dumps({"version": manifest["version"], "signers": signers, "components": components}))


if __name__ == "__main__":
    main(sys.argv[1])
