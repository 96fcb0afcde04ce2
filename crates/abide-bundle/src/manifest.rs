//! The manifest: what a bundle holds, for which hardware, and how its content is laid out.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::canonical::{parse_canonical, to_canonical};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::CHUNK_ENTRY_LEN;
use crate::limits::Limits;
use crate::name::{HardwareId, Name};
use crate::time::{format_time, parse_time};

/// The manifest format this code reads and writes.
pub const FORMAT: u32 = 1;
/// The only chunking algorithm: FastCDC (2020 variant, normalization level 1, default gear table).
pub const CHUNKING_FASTCDC: &str = "fastcdc-2020";
/// The only chunk compression: one zstd frame per chunk.
pub const COMPRESSION_ZSTD: &str = "zstd";

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The product this bundle is for.
    pub product: Name,
    /// Hardware ids the bundle may be installed on.
    pub compatible: Vec<HardwareId>,
    /// The release version.
    pub version: semver::Version,
    /// The anti-rollback counter.
    pub security_version: u64,
    /// When the bundle was made.
    pub created: Timestamp,
    /// After this time the bundle is refused.
    pub expires: Option<Timestamp>,
    /// The components, in the order their data is stored.
    pub components: Vec<Component>,
    /// Install hooks, by name.
    pub hooks: Vec<Name>,
}

/// One component of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Its name, unique in the bundle.
    pub name: Name,
    /// What it is (`rootfs`, `kernel`, `app`, …).
    pub kind: Name,
    /// The class of slot it installs to.
    pub slot_class: Name,
    /// Its size in bytes, uncompressed.
    pub size: u64,
    /// SHA-256 of its whole content.
    pub digest: Digest,
    /// How it was cut into chunks.
    pub chunking: Chunking,
    /// Where its chunk table and chunks are, and the table's digest.
    pub chunk_table: ChunkTableRef,
}

/// Chunking parameters (FastCDC sizes in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Smallest chunk (except the last).
    pub min_size: u32,
    /// Target average.
    pub avg_size: u32,
    /// Largest chunk.
    pub max_size: u32,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            min_size: 16 << 10,
            avg_size: 64 << 10,
            max_size: 256 << 10,
        }
    }
}

/// Where a component's data lies in the bundle's data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTableRef {
    /// SHA-256 of the chunk table bytes.
    pub digest: Digest,
    /// Number of chunks (table entries).
    pub count: u64,
    /// Offset of the table from the start of the data section.
    pub offset: u64,
    /// Total stored (compressed) bytes of the chunks that follow the table.
    pub data_size: u64,
}

impl ChunkTableRef {
    /// Length of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.count * CHUNK_ENTRY_LEN as u64
    }

    /// Offset of the first chunk from the start of the data section.
    pub fn data_offset(&self) -> u64 {
        self.offset + self.table_len()
    }

    /// Offset just past this component's data.
    pub fn end(&self) -> u64 {
        self.data_offset() + self.data_size
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: u64,
    product: String,
    compatible: Vec<String>,
    version: String,
    security_version: u64,
    created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<String>,
    components: Vec<RawComponent>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    hooks: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    name: String,
    kind: String,
    slot_class: String,
    size: u64,
    digest: String,
    chunking: RawChunking,
    compression: String,
    chunk_table: RawChunkTable,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChunking {
    algorithm: String,
    min_size: u64,
    avg_size: u64,
    max_size: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChunkTable {
    digest: String,
    count: u64,
    offset: u64,
    data_size: u64,
}

impl Manifest {
    /// Parses manifest bytes: canonical JSON, known fields only, every value validated against
    /// `limits`.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Manifest> {
        if bytes.len() > limits.max_manifest_bytes as usize {
            return Err(Error::limit(
                "manifest bytes",
                bytes.len() as u64,
                limits.max_manifest_bytes.into(),
            ));
        }
        let value = parse_canonical("manifest", bytes)?;
        let raw: RawManifest = serde_json::from_value(value)
            .map_err(|e| Error::bad_format(format!("manifest: {e}")))?;
        Manifest::from_raw(raw, limits)
    }

    /// The canonical bytes of this manifest (what is signed).
    pub fn to_canonical(&self) -> Result<Vec<u8>> {
        to_canonical("manifest", &self.to_raw())
    }

    /// The component called `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name.as_str() == name)
    }

    /// Checks the rules that hold between fields (also applied by `parse`).
    pub fn validate(&self, limits: &Limits) -> Result<()> {
        if self.components.is_empty() {
            return Err(Error::bad_format(
                "manifest: a bundle needs at least one component",
            ));
        }
        if self.components.len() > limits.max_components {
            return Err(Error::limit(
                "components",
                self.components.len() as u64,
                limits.max_components as u64,
            ));
        }
        if self.compatible.len() > limits.max_compatible {
            return Err(Error::limit(
                "compatible ids",
                self.compatible.len() as u64,
                limits.max_compatible as u64,
            ));
        }
        if self.hooks.len() > limits.max_hooks {
            return Err(Error::limit(
                "hooks",
                self.hooks.len() as u64,
                limits.max_hooks as u64,
            ));
        }
        let mut expected_offset = 0u64;
        for (i, c) in self.components.iter().enumerate() {
            if self.components[..i].iter().any(|o| o.name == c.name) {
                return Err(Error::bad_format(format!(
                    "manifest: component {} appears twice",
                    c.name
                )));
            }
            let field = |f: &str| format!("component {} {f}", c.name);
            if c.size > limits.max_component_size {
                return Err(Error::limit(
                    field("size"),
                    c.size,
                    limits.max_component_size,
                ));
            }
            let t = &c.chunk_table;
            if t.count > limits.max_chunks {
                return Err(Error::limit(
                    field("chunk count"),
                    t.count,
                    limits.max_chunks,
                ));
            }
            let k = &c.chunking;
            if !(64 <= k.min_size && k.min_size <= k.avg_size && k.avg_size <= k.max_size) {
                return Err(Error::bad_format(format!(
                    "{}: need 64 <= min_size <= avg_size <= max_size",
                    field("chunking")
                )));
            }
            if k.max_size > limits.max_chunk_size {
                return Err(Error::limit(
                    field("max chunk size"),
                    k.max_size.into(),
                    limits.max_chunk_size.into(),
                ));
            }
            // Every chunk but the last is at least 1 byte and at most max_size, so the count is
            // bounded by the size both ways.
            let most = c.size;
            let least = c.size.div_ceil(u64::from(k.max_size));
            if t.count < least || t.count > most {
                return Err(Error::SizeMismatch {
                    component: c.name.to_string(),
                    what: format!(
                        "{} chunks cannot hold {} bytes of chunks up to {} bytes",
                        t.count, c.size, k.max_size
                    ),
                });
            }
            let max_data = t
                .count
                .saturating_mul(u64::from(limits.max_stored_chunk_size()));
            if t.data_size > max_data {
                return Err(Error::limit(
                    field("stored data size"),
                    t.data_size,
                    max_data,
                ));
            }
            if t.offset != expected_offset {
                return Err(Error::bad_format(format!(
                    "{}: offset is {}, the data before it ends at {expected_offset}",
                    field("chunk table"),
                    t.offset
                )));
            }
            expected_offset = t
                .table_len()
                .checked_add(t.offset)
                .and_then(|x| x.checked_add(t.data_size))
                .ok_or_else(|| Error::limit(field("data end"), u64::MAX, u64::MAX - 1))?;
        }
        Ok(())
    }

    fn from_raw(raw: RawManifest, limits: &Limits) -> Result<Manifest> {
        if raw.format != u64::from(FORMAT) {
            return Err(Error::bad_format(format!(
                "manifest format {} is not supported (expected {FORMAT})",
                raw.format
            )));
        }
        if raw.components.len() > limits.max_components {
            return Err(Error::limit(
                "components",
                raw.components.len() as u64,
                limits.max_components as u64,
            ));
        }
        if raw.compatible.len() > limits.max_compatible {
            return Err(Error::limit(
                "compatible ids",
                raw.compatible.len() as u64,
                limits.max_compatible as u64,
            ));
        }
        let n = limits.max_name_len;
        if raw.version.len() > n {
            return Err(Error::limit(
                "version length",
                raw.version.len() as u64,
                n as u64,
            ));
        }
        let version = semver::Version::parse(&raw.version).map_err(|e| {
            Error::bad_format(format!("version {:?} is not SemVer: {e}", raw.version))
        })?;
        if version.to_string() != raw.version {
            return Err(Error::bad_format(format!(
                "version {:?} is not in normal SemVer form",
                raw.version
            )));
        }
        let mut components = Vec::with_capacity(raw.components.len());
        for (i, c) in raw.components.into_iter().enumerate() {
            let name = Name::parse(&format!("components[{i}].name"), &c.name, n)?;
            let field = |f: &str| format!("component {name} {f}");
            if c.chunking.algorithm != CHUNKING_FASTCDC {
                return Err(Error::bad_format(format!(
                    "{}: unknown algorithm {:?}",
                    field("chunking"),
                    c.chunking.algorithm
                )));
            }
            if c.compression != COMPRESSION_ZSTD {
                return Err(Error::bad_format(format!(
                    "{}: unknown compression {:?}",
                    field("compression"),
                    c.compression
                )));
            }
            let size32 = |f: &str, v: u64| {
                u32::try_from(v)
                    .map_err(|_| Error::limit(field(f), v, limits.max_chunk_size.into()))
            };
            components.push(Component {
                kind: Name::parse(&field("kind"), &c.kind, n)?,
                slot_class: Name::parse(&field("slot_class"), &c.slot_class, n)?,
                size: c.size,
                digest: Digest::parse_hex(&field("digest"), &c.digest)?,
                chunking: Chunking {
                    min_size: size32("chunking min_size", c.chunking.min_size)?,
                    avg_size: size32("chunking avg_size", c.chunking.avg_size)?,
                    max_size: size32("chunking max_size", c.chunking.max_size)?,
                },
                chunk_table: ChunkTableRef {
                    digest: Digest::parse_hex(&field("chunk_table digest"), &c.chunk_table.digest)?,
                    count: c.chunk_table.count,
                    offset: c.chunk_table.offset,
                    data_size: c.chunk_table.data_size,
                },
                name,
            });
        }
        let manifest = Manifest {
            product: Name::parse("product", &raw.product, n)?,
            compatible: raw
                .compatible
                .iter()
                .enumerate()
                .map(|(i, id)| HardwareId::parse(&format!("compatible[{i}]"), id, n))
                .collect::<Result<_>>()?,
            version,
            security_version: raw.security_version,
            created: parse_time("created", &raw.created)?,
            expires: raw
                .expires
                .as_deref()
                .map(|s| parse_time("expires", s))
                .transpose()?,
            components,
            hooks: raw
                .hooks
                .iter()
                .enumerate()
                .map(|(i, h)| Name::parse(&format!("hooks[{i}]"), h, n))
                .collect::<Result<_>>()?,
        };
        manifest.validate(limits)?;
        Ok(manifest)
    }

    fn to_raw(&self) -> RawManifest {
        RawManifest {
            format: FORMAT.into(),
            product: self.product.to_string(),
            compatible: self.compatible.iter().map(|c| c.to_string()).collect(),
            version: self.version.to_string(),
            security_version: self.security_version,
            created: format_time(self.created),
            expires: self.expires.map(format_time),
            components: self
                .components
                .iter()
                .map(|c| RawComponent {
                    name: c.name.to_string(),
                    kind: c.kind.to_string(),
                    slot_class: c.slot_class.to_string(),
                    size: c.size,
                    digest: c.digest.to_hex(),
                    chunking: RawChunking {
                        algorithm: CHUNKING_FASTCDC.into(),
                        min_size: c.chunking.min_size.into(),
                        avg_size: c.chunking.avg_size.into(),
                        max_size: c.chunking.max_size.into(),
                    },
                    compression: COMPRESSION_ZSTD.into(),
                    chunk_table: RawChunkTable {
                        digest: c.chunk_table.digest.to_hex(),
                        count: c.chunk_table.count,
                        offset: c.chunk_table.offset,
                        data_size: c.chunk_table.data_size,
                    },
                })
                .collect(),
            hooks: self.hooks.iter().map(|h| h.to_string()).collect(),
        }
    }
}
