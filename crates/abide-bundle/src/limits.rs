//! Bounds on every size and count read from untrusted input.

/// Upper bounds applied to everything a bundle or trust root declares before it is trusted.
///
/// Every length, count and size read from a bundle is checked against these values before any
/// memory is allocated for it, so hostile input cannot make a reader allocate or loop without
/// bound. The defaults suit images up to tens of GiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest, in bytes. Default 1 MiB.
    pub max_manifest_bytes: u32,
    /// Most signatures on one bundle. Default 32.
    pub max_signatures: u32,
    /// Most components in one bundle. Default 64.
    pub max_components: usize,
    /// Most compatible hardware ids. Default 256.
    pub max_compatible: usize,
    /// Most install hooks. Default 32.
    pub max_hooks: usize,
    /// Longest name (component, kind, slot class, product, hook, hardware id). Default 64.
    pub max_name_len: usize,
    /// Largest component, in bytes. Default 1 TiB.
    pub max_component_size: u64,
    /// Most chunks in one component. Default 4 Mi (a 160 MiB chunk table).
    pub max_chunks: u64,
    /// Largest uncompressed chunk, in bytes. Default 1 MiB.
    pub max_chunk_size: u32,
    /// Largest trust root file, in bytes. Default 1 MiB.
    pub max_trust_bytes: usize,
    /// Most keys in a trust root. Default 64.
    pub max_trust_keys: usize,
    /// Largest delta head, in bytes. Default 1 MiB.
    pub max_delta_head_bytes: u32,
    /// Most content one delta patch produces, in bytes. Default 16 MiB.
    pub max_patch_content: u32,
    /// Longest reference a delta patch reads from the running slot, in bytes. Default 16 MiB.
    pub max_patch_prefix: u32,
}

impl Limits {
    /// Largest stored (compressed) chunk allowed for a given uncompressed limit: the zstd
    /// worst-case bound for that size.
    pub fn max_stored_chunk_size(&self) -> u32 {
        stored_bound(self.max_chunk_size)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 1 << 20,
            max_signatures: 32,
            max_components: 64,
            max_compatible: 256,
            max_hooks: 32,
            max_name_len: 64,
            max_component_size: 1 << 40,
            max_chunks: 4 << 20,
            max_chunk_size: 1 << 20,
            max_trust_bytes: 1 << 20,
            max_trust_keys: 64,
            max_delta_head_bytes: 1 << 20,
            max_patch_content: 16 << 20,
            max_patch_prefix: 16 << 20,
        }
    }
}

/// The most bytes a zstd frame of `n` input bytes may take (zstd's `ZSTD_COMPRESSBOUND` plus
/// room for the frame header), so a stored chunk longer than this cannot be honest.
pub fn stored_bound(n: u32) -> u32 {
    let n = u64::from(n);
    let small = if n < (128 << 10) {
        ((128 << 10) - n) >> 11
    } else {
        0
    };
    (n + (n >> 8) + small + 64).min(u64::from(u32::MAX)) as u32
}
