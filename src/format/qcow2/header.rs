//! The qcow2 header and its header extensions, parsed and validated into a plain [`Header`].
//!
//! Parsing is a pure function of the first cluster's bytes and the file length, so every rule here is unit-tested
//! without I/O. Every size taken from the header is checked before anything uses it to size an allocation or a
//! loop. Layout and rules: qemu's docs/interop/qcow2.txt; which values qemu refuses: qcow2_do_open in block/qcow2.c.

use crate::bytes::{be32, be64};
use crate::error::{Error, Result};
use crate::format::Codec;

/// The four magic bytes at offset 0: "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest cluster_bits the format allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;

/// Largest cluster_bits qemu opens (2 MiB clusters); larger clusters are refused like qemu does.
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Smallest cluster_bits with extended L2 entries: 32 subclusters of at least 512 bytes.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

/// Largest L1 table accepted, in bytes (qemu's QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: u64 = 1023;

/// Longest backing format name accepted (qemu's limit: its backing_format buffer holds 15 characters).
pub const MAX_BACKING_FORMAT: u32 = 15;

/// Most header extensions walked before the header is declared malformed (real images carry a handful).
pub const MAX_HEADER_EXTENSIONS: usize = 1024;

/// Length of a version 2 header; version 3 headers are at least [`V3_MIN_HEADER_LENGTH`].
pub const V2_HEADER_LENGTH: u32 = 72;

/// Smallest header_length of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;

/// Offset of the compression_type byte, present when header_length is larger.
const COMPRESSION_TYPE_OFFSET: usize = 104;

/// Incompatible feature bit 0: refcounts may be inconsistent (irrelevant for reading).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: some structure may be corrupt; qemu still opens such images read-only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: compression_type is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: 16-byte L2 entries with subcluster bitmaps.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible feature bit this reader knows about.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Size of one feature name table entry.
const FEATURE_ENTRY_LEN: usize = 48;

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// The name as stored (a path, relative to the image's directory unless absolute).
    pub name: String,
    /// The format named by the backing format extension ("raw" or "qcow2"), if present.
    pub format: Option<String>,
    /// File offset of the name, for messages about it.
    pub offset: u64,
}

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, within 9..=21.
    pub cluster_bits: u32,
    /// Virtual size as stored in the header.
    pub size: u64,
    /// Number of entries in the active L1 table (at least [`Header::l1_entries_needed`]).
    pub l1_size: u32,
    /// Offset of the active L1 table: cluster-aligned, past the header cluster, inside the file (when l1_size > 0).
    pub l1_table_offset: u64,
    /// Incompatible feature bits (only known, accepted ones remain set).
    pub incompatible_features: u64,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub codec: Codec,
    /// Whether L2 entries are extended (16 bytes, 32 subclusters per cluster).
    pub extended_l2: bool,
    /// The backing file, if the image has one.
    pub backing: Option<BackingFile>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Size of one L2 entry in bytes: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the guest bytes one L1 entry (one L2 table) covers.
    pub fn l1_shift(&self) -> u32 {
        l1_shift(self.cluster_bits, self.extended_l2)
    }

    /// L1 entries needed to map the whole virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(1 << self.l1_shift())
    }

    /// The virtual size qemu presents: the header's size rounded down to whole 512-byte sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Whether the dirty bit is set (refcounts may be stale; harmless for reading).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
}

/// log2 of the guest bytes covered by one L2 table for the given geometry.
fn l1_shift(cluster_bits: u32, extended_l2: bool) -> u32 {
    let entry_bits = if extended_l2 { 4 } else { 3 };
    cluster_bits + (cluster_bits - entry_bits)
}

/// Reads the cluster size from the start of a qcow2 file, validating magic, version and cluster_bits: what
/// [`parse`] needs to know how many bytes to be given.
pub fn peek_cluster_size(head: &[u8]) -> Result<u64> {
    if head.len() < V2_HEADER_LENGTH as usize {
        return Err(crate::bad_image!("qcow2 header truncated: {} of {V2_HEADER_LENGTH} bytes", head.len())
            .at_offset(head.len() as u64));
    }
    if head[..4] != MAGIC {
        return Err(crate::bad_image!("not a qcow2 image: bad magic {:02x?}", &head[..4]).at_offset(0));
    }
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!("qcow2 version {version} is not supported (only 2 and 3)")).at_offset(4));
    }
    let cluster_bits = be32(head, 20);
    if cluster_bits < MIN_CLUSTER_BITS {
        return Err(
            crate::bad_image!("cluster_bits {cluster_bits} is below the minimum of {MIN_CLUSTER_BITS}").at_offset(20)
        );
    }
    if cluster_bits > MAX_CLUSTER_BITS {
        return Err(Error::unsupported(format!(
            "cluster_bits {cluster_bits} is above the maximum of {MAX_CLUSTER_BITS} (2 MiB clusters)"
        ))
        .at_offset(20));
    }
    Ok(1 << cluster_bits)
}

/// One header extension: its type and where its data lies in the header cluster.
struct Extension {
    kind: u32,
    data: std::ops::Range<usize>,
}

/// Parses and validates the header. `first_cluster` is the image's first cluster (zero-padded if the file is
/// shorter); `file_len` is the length of the file, against which table offsets are checked.
///
/// In stages, each its own function: the fixed fields, the version 3 fields, the extensions, what is refused
/// (unknown features, external data, encryption), the compression type, the L1 table's size and place, the
/// backing file.
pub fn parse(first_cluster: &[u8], file_len: u64) -> Result<Header> {
    let cluster_size = peek_cluster_size(first_cluster)?;
    let buf = first_cluster;
    if (buf.len() as u64) < cluster_size {
        return Err(crate::bad_image!("qcow2 header cluster truncated: {} of {cluster_size} bytes", buf.len()));
    }
    let version = be32(buf, 4);
    let cluster_bits = be32(buf, 20);
    let backing_file_offset = be64(buf, 8);
    let size = be64(buf, 24);
    let l1_size = be32(buf, 36);
    let l1_table_offset = be64(buf, 40);
    let (incompatible, header_length) = version_3_fields(buf, version, cluster_size)?;

    // The extension area ends where the backing file name starts, or at the end of the header cluster.
    if backing_file_offset > cluster_size {
        return Err(crate::bad_image!(
            "backing file name offset {backing_file_offset:#x} lies outside the header cluster"
        )
        .at_offset(8));
    }
    let ext_end = if backing_file_offset != 0 { backing_file_offset as usize } else { cluster_size as usize };
    let extensions = read_extensions(buf, header_length as usize, ext_end)?;
    refuse_unsupported(buf, incompatible, &extensions)?;
    let codec = compression(buf, header_length, incompatible)?;
    let extended_l2 = incompatible & INCOMPAT_EXTENDED_L2 != 0;
    if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(crate::bad_image!(
            "extended L2 entries need clusters of at least 16 KiB, not 2^{cluster_bits} bytes"
        )
        .at_offset(20));
    }
    let l1 = L1Placement { size: l1_size, offset: l1_table_offset, cluster_size, file_len };
    l1.check(size, l1_shift(cluster_bits, extended_l2))?;
    let backing = backing_file(buf, cluster_size, &extensions)?;
    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        incompatible_features: incompatible,
        header_length,
        codec,
        extended_l2,
        backing,
    })
}

/// The incompatible feature bits and the header length: a version 2 header has neither (its length is fixed); a
/// version 3 one states both, and its refcount order is checked.
fn version_3_fields(buf: &[u8], version: u32, cluster_size: u64) -> Result<(u64, u32)> {
    if version == 2 {
        return Ok((0, V2_HEADER_LENGTH));
    }
    let header_length = be32(buf, 100);
    if header_length < V3_MIN_HEADER_LENGTH {
        return Err(crate::bad_image!(
            "header_length {header_length} is shorter than the {V3_MIN_HEADER_LENGTH} bytes of a version 3 header"
        )
        .at_offset(100));
    }
    if u64::from(header_length) > cluster_size {
        return Err(
            crate::bad_image!("header_length {header_length} exceeds the cluster size {cluster_size}").at_offset(100)
        );
    }
    let refcount_order = be32(buf, 96);
    if refcount_order > 6 {
        return Err(crate::bad_image!("refcount_order {refcount_order} is above the maximum of 6").at_offset(96));
    }
    Ok((be64(buf, 72), header_length))
}

/// Refuses what boundimport does not read, with the reason: unknown incompatible features (named from the
/// image's own feature table), an external data file, encryption of either kind.
fn refuse_unsupported(buf: &[u8], incompatible: u64, extensions: &[Extension]) -> Result<()> {
    let find = |kind: u32| extensions.iter().find(|e| e.kind == kind);
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let names = find(EXT_FEATURE_TABLE).map_or(&[][..], |e| &buf[e.data.clone()]);
        return Err(Error::unsupported(format!(
            "unsupported incompatible feature {}",
            describe_features(unknown, names)
        ))
        .at_offset(72));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        let name = find(EXT_DATA_FILE)
            .map(|e| format!(" {:?}", String::from_utf8_lossy(&buf[e.data.clone()])))
            .unwrap_or_default();
        return Err(Error::unsupported(format!(
            "image keeps its data in an external data file{name}, which is not supported"
        ))
        .at_offset(72));
    }
    let crypt_method = be32(buf, 32);
    if crypt_method != 0 {
        let how = match crypt_method {
            1 => " (AES)",
            2 => " (LUKS)",
            _ => "",
        };
        return Err(Error::unsupported(format!(
            "encrypted images are not supported: crypt_method {crypt_method}{how}"
        ))
        .at_offset(32));
    }
    if let Some(e) = find(EXT_CRYPTO_HEADER) {
        return Err(Error::unsupported(
            "encrypted images are not supported: full disk encryption header extension present",
        )
        .at_offset(e.data.start as u64 - 8));
    }
    Ok(())
}

/// The codec of compressed clusters: the header's compression type, which must agree with its feature bit.
fn compression(buf: &[u8], header_length: u32, incompatible: u64) -> Result<Codec> {
    let compression_type =
        if header_length as usize > COMPRESSION_TYPE_OFFSET { buf[COMPRESSION_TYPE_OFFSET] } else { 0 };
    let codec = match compression_type {
        0 => Codec::Deflate,
        1 => Codec::Zstd,
        other => {
            return Err(Error::unsupported(format!("compression type {other} is not supported (0 = zlib, 1 = zstd)"))
                .at_offset(COMPRESSION_TYPE_OFFSET as u64));
        }
    };
    let flagged = incompatible & INCOMPAT_COMPRESSION != 0;
    if flagged != (compression_type != 0) {
        return Err(crate::bad_image!(
            "compression type {compression_type} is inconsistent with incompatible feature bit 3 ({})",
            if flagged { "set" } else { "clear" }
        )
        .at_offset(72));
    }
    Ok(codec)
}

/// Where the header says the L1 table is, and what it is checked against.
struct L1Placement {
    size: u32,
    offset: u64,
    cluster_size: u64,
    file_len: u64,
}

impl L1Placement {
    /// The L1 table's size is capped first, then it must cover the virtual size `size` (each entry maps
    /// `1 << shift` bytes), then it must lie cluster-aligned past the header and inside the file.
    fn check(&self, size: u64, shift: u32) -> Result<()> {
        let Self { size: l1_size, offset: l1_table_offset, cluster_size, file_len } = *self;
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(crate::bad_image!(
                "L1 table of {l1_size} entries is larger than the {} MiB maximum",
                MAX_L1_BYTES >> 20
            )
            .at_offset(36));
        }
        let needed = size.div_ceil(1 << shift);
        if u64::from(l1_size) < needed {
            return Err(crate::bad_image!(
                "L1 table of {l1_size} entries is too small for the virtual size {size} (needs {needed})"
            )
            .at_offset(36));
        }
        if l1_size == 0 {
            return Ok(());
        }
        if l1_table_offset % cluster_size != 0 {
            return Err(crate::bad_image!(
                "L1 table offset {l1_table_offset:#x} is not aligned to the cluster size {cluster_size}"
            )
            .at_offset(40));
        }
        if l1_table_offset < cluster_size {
            return Err(
                crate::bad_image!("L1 table offset {l1_table_offset:#x} lies inside the header cluster").at_offset(40)
            );
        }
        if l1_table_offset.checked_add(l1_bytes).is_none_or(|end| end > file_len) {
            return Err(crate::bad_image!(
                "L1 table at {l1_table_offset:#x} ({l1_bytes} bytes) ends past the end of the file ({file_len} bytes)"
            )
            .at_offset(40));
        }
        Ok(())
    }
}

/// The backing file the header names, if any (an empty name is none, as in qemu): its name, capped and UTF-8,
/// and its format from the extension, raw or qcow2 only.
fn backing_file(buf: &[u8], cluster_size: u64, extensions: &[Extension]) -> Result<Option<BackingFile>> {
    let backing_file_offset = be64(buf, 8);
    let backing_file_size = be32(buf, 16);
    if backing_file_offset == 0 || backing_file_size == 0 {
        return Ok(None);
    }
    let len = u64::from(backing_file_size);
    let room = cluster_size - backing_file_offset;
    if len > MAX_BACKING_NAME.min(room) {
        return Err(crate::bad_image!(
            "backing file name of {len} bytes is too long (at most {} here)",
            MAX_BACKING_NAME.min(room)
        )
        .at_offset(16));
    }
    let at = backing_file_offset as usize;
    let raw = &buf[at..at + len as usize];
    let name = String::from_utf8(raw.to_vec()).map_err(|_| {
        Error::unsupported(format!("backing file name {:?} is not UTF-8", String::from_utf8_lossy(raw)))
            .at_offset(backing_file_offset)
    })?;
    let format = match extensions.iter().find(|e| e.kind == EXT_BACKING_FORMAT) {
        None => None,
        Some(e) => {
            let raw = &buf[e.data.clone()];
            let format = String::from_utf8_lossy(raw).into_owned();
            if format != "raw" && format != "qcow2" {
                return Err(Error::unsupported(format!(
                    "backing file {name:?} has format {format:?}; only raw and qcow2 backing files are supported"
                ))
                .at_offset(e.data.start as u64));
            }
            Some(format)
        }
    };
    Ok(Some(BackingFile { name, format, offset: backing_file_offset }))
}

/// Walks the header extensions in `buf[start..end]` (bounded by the header cluster) up to the end marker.
fn read_extensions(buf: &[u8], start: usize, end: usize) -> Result<Vec<Extension>> {
    let end = end.min(buf.len());
    let mut found = Vec::new();
    let mut at = start;
    while at < end {
        if end - at < 8 {
            return Err(crate::bad_image!("header extension header crosses the end of the extension area at {end:#x}")
                .at_offset(at as u64));
        }
        let kind = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if kind == EXT_END {
            break;
        }
        if found.len() == MAX_HEADER_EXTENSIONS {
            return Err(crate::bad_image!("more than {MAX_HEADER_EXTENSIONS} header extensions").at_offset(at as u64));
        }
        let data = at + 8;
        if len > end - data {
            return Err(crate::bad_image!(
                "header extension {kind:#010x} of {len} bytes runs past the end of the extension area at {end:#x}"
            )
            .at_offset(at as u64));
        }
        if kind == EXT_BACKING_FORMAT && len > MAX_BACKING_FORMAT as usize {
            return Err(crate::bad_image!(
                "backing format name of {len} bytes is too long (at most {MAX_BACKING_FORMAT})"
            )
            .at_offset(at as u64));
        }
        found.push(Extension { kind, data: data..data + len });
        // Data is padded to a multiple of 8; `len <= end - data` keeps this from overflowing.
        at = data + len.next_multiple_of(8);
    }
    Ok(found)
}

/// Names incompatible feature bits from the feature name table when it has them: `bits 5 ("foo"), 63`.
fn describe_features(bits: u64, table: &[u8]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1 << bit) == 0 {
            continue;
        }
        let name = table.chunks_exact(FEATURE_ENTRY_LEN).find(|entry| entry[0] == 0 && entry[1] == bit).map(|entry| {
            let raw = &entry[2..];
            let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            String::from_utf8_lossy(raw).into_owned()
        });
        parts.push(match name {
            Some(name) => format!("{bit} ({name:?})"),
            None => bit.to_string(),
        });
    }
    let plural = if parts.len() > 1 { "s" } else { "" };
    format!("bit{plural} {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const CLUSTER: usize = 65536;
    const FILE_LEN: u64 = 1 << 20;

    /// A valid version 3 header: 64 KiB clusters, 1 GiB virtual size, L1 of 2 entries at 0x30000, followed by a
    /// zeroed extension area (end marker).
    fn valid_header() -> Vec<u8> {
        let mut h = vec![0u8; CLUSTER];
        h[0..4].copy_from_slice(&MAGIC);
        put32(&mut h, 4, 3);
        put32(&mut h, 20, 16);
        put64(&mut h, 24, 1 << 30);
        put32(&mut h, 36, 2);
        put64(&mut h, 40, 0x30000);
        put64(&mut h, 48, 0x10000);
        put32(&mut h, 56, 1);
        put32(&mut h, 96, 4);
        put32(&mut h, 100, 112);
        h
    }

    fn put32(h: &mut [u8], at: usize, v: u32) {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(h: &mut [u8], at: usize, v: u64) {
        h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Appends a header extension at `at`, returning where the next one goes.
    fn put_ext(h: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
        put32(h, at, kind);
        put32(h, at + 4, data.len() as u32);
        h[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at + 8 + data.len().next_multiple_of(8)
    }

    fn fails(h: &[u8], kind: ErrorKind, needle: &str) {
        let err = parse(h, FILE_LEN).expect_err(needle);
        assert_eq!(err.kind(), kind, "{err}");
        assert!(err.to_string().contains(needle), "{err:?} lacks {needle:?}");
    }

    #[test]
    fn valid_v3_header_parses() {
        let h = parse(&valid_header(), FILE_LEN).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.virtual_size(), 1 << 30);
        assert_eq!(h.l1_entries_needed(), 2);
        assert_eq!(h.codec, Codec::Deflate);
        assert!(!h.extended_l2 && !h.is_dirty() && !h.is_corrupt());
        assert_eq!(h.backing, None);
    }

    #[test]
    fn valid_v2_header_ignores_v3_fields() {
        let mut h = valid_header();
        put32(&mut h, 4, 2);
        put32(&mut h, 96, 99); // refcount_order and header_length are v3 fields: ignored
        put32(&mut h, 100, 0);
        let parsed = parse(&h, FILE_LEN).unwrap();
        assert_eq!(parsed.version, 2);
        assert_eq!(parsed.header_length, 72);
        assert_eq!(parsed.incompatible_features, 0);
    }

    #[test]
    fn bad_magic() {
        let mut h = valid_header();
        h[3] = 0xfa;
        fails(&h, ErrorKind::BadImage, "bad magic");
    }

    #[test]
    fn unsupported_versions() {
        for v in [1, 4] {
            let mut h = valid_header();
            put32(&mut h, 4, v);
            fails(&h, ErrorKind::Unsupported, &format!("version {v}"));
        }
    }

    #[test]
    fn cluster_bits_out_of_range() {
        let mut h = valid_header();
        put32(&mut h, 20, 8);
        fails(&h, ErrorKind::BadImage, "cluster_bits 8");
        put32(&mut h, 20, 22);
        fails(&h, ErrorKind::Unsupported, "cluster_bits 22");
        put32(&mut h, 20, u32::MAX);
        fails(&h, ErrorKind::Unsupported, "cluster_bits 4294967295");
    }

    #[test]
    fn truncated_header_cluster() {
        let h = valid_header();
        fails(&h[..4096], ErrorKind::BadImage, "truncated");
        fails(&h[..40], ErrorKind::BadImage, "truncated");
    }

    #[test]
    fn l1_too_small() {
        let mut h = valid_header();
        put32(&mut h, 36, 1);
        fails(&h, ErrorKind::BadImage, "too small");
        put64(&mut h, 24, u64::MAX);
        fails(&h, ErrorKind::BadImage, "too small");
    }

    #[test]
    fn l1_absurdly_large() {
        let mut h = valid_header();
        put32(&mut h, 36, u32::MAX);
        fails(&h, ErrorKind::BadImage, "larger than the 32 MiB maximum");
    }

    #[test]
    fn l1_placement() {
        let mut h = valid_header();
        put64(&mut h, 40, 0x30200);
        fails(&h, ErrorKind::BadImage, "not aligned");
        put64(&mut h, 40, 0);
        fails(&h, ErrorKind::BadImage, "inside the header cluster");
        put64(&mut h, 40, FILE_LEN);
        fails(&h, ErrorKind::BadImage, "past the end of the file");
        put64(&mut h, 40, !0xffff);
        fails(&h, ErrorKind::BadImage, "past the end of the file");
        // An empty image needs no L1 table, wherever its offset points.
        put64(&mut h, 24, 0);
        put32(&mut h, 36, 0);
        assert_eq!(parse(&h, FILE_LEN).unwrap().l1_entries_needed(), 0);
    }

    #[test]
    fn header_length_bounds() {
        let mut h = valid_header();
        put32(&mut h, 100, 72);
        fails(&h, ErrorKind::BadImage, "header_length 72");
        put32(&mut h, 100, CLUSTER as u32 + 8);
        fails(&h, ErrorKind::BadImage, "exceeds the cluster size");
    }

    #[test]
    fn refcount_order_too_large() {
        let mut h = valid_header();
        put32(&mut h, 96, 7);
        fails(&h, ErrorKind::BadImage, "refcount_order 7");
    }

    #[test]
    fn accepted_feature_bits() {
        let mut h = valid_header();
        put32(&mut h, 36, 4);
        put64(&mut h, 72, INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTENDED_L2);
        put64(&mut h, 80, u64::MAX); // compatible bits: ignored
        put64(&mut h, 88, u64::MAX); // autoclear bits: ignored
        let parsed = parse(&h, FILE_LEN).unwrap();
        assert!(parsed.is_dirty() && parsed.is_corrupt() && parsed.extended_l2);
        // 64 KiB clusters with 16-byte entries cover 256 MiB per L2 table.
        assert_eq!(parsed.l1_entries_needed(), 4);
    }

    #[test]
    fn extended_l2_needs_l1_room_and_big_clusters() {
        let mut h = valid_header();
        put64(&mut h, 72, INCOMPAT_EXTENDED_L2);
        put64(&mut h, 24, 1 << 30);
        put32(&mut h, 36, 2);
        fails(&h, ErrorKind::BadImage, "too small");
        put32(&mut h, 20, 13);
        put64(&mut h, 24, 1 << 20);
        put64(&mut h, 40, 0x4000);
        fails(&h, ErrorKind::BadImage, "at least 16 KiB");
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = valid_header();
        put64(&mut h, 72, 1 << 5);
        fails(&h, ErrorKind::Unsupported, "feature bit 5");
        let mut entry = vec![0u8; 48];
        entry[1] = 5;
        entry[2..13].copy_from_slice(b"frobnicator");
        let mut other = vec![0u8; 48];
        other[0] = 1; // a compatible feature with the same bit number must not be used
        other[1] = 5;
        other[2..7].copy_from_slice(b"wrong");
        put_ext(&mut h, 112, EXT_FEATURE_TABLE, &[other, entry].concat());
        fails(&h, ErrorKind::Unsupported, "bit 5 (\"frobnicator\")");
        put64(&mut h, 72, (1 << 5) | (1 << 63));
        fails(&h, ErrorKind::Unsupported, "bits 5 (\"frobnicator\"), 63");
    }

    #[test]
    fn external_data_file_refused() {
        let mut h = valid_header();
        put64(&mut h, 72, INCOMPAT_DATA_FILE);
        fails(&h, ErrorKind::Unsupported, "external data file");
        put_ext(&mut h, 112, EXT_DATA_FILE, b"disk.data");
        fails(&h, ErrorKind::Unsupported, "external data file \"disk.data\"");
    }

    #[test]
    fn encryption_refused() {
        let mut h = valid_header();
        put32(&mut h, 32, 2);
        fails(&h, ErrorKind::Unsupported, "encrypted images are not supported");
        let mut h = valid_header();
        put_ext(&mut h, 112, EXT_CRYPTO_HEADER, &[0; 16]);
        fails(&h, ErrorKind::Unsupported, "full disk encryption");
    }

    #[test]
    fn compression_type() {
        let mut h = valid_header();
        h[104] = 1;
        fails(&h, ErrorKind::BadImage, "inconsistent with incompatible feature bit 3");
        put64(&mut h, 72, INCOMPAT_COMPRESSION);
        assert_eq!(parse(&h, FILE_LEN).unwrap().codec, Codec::Zstd);
        h[104] = 2;
        fails(&h, ErrorKind::Unsupported, "compression type 2");
        h[104] = 0;
        fails(&h, ErrorKind::BadImage, "inconsistent with incompatible feature bit 3");
        // With header_length 104 the field is absent: zlib, whatever the byte holds.
        put64(&mut h, 72, 0);
        put32(&mut h, 100, 104);
        h[104] = 0xff;
        h[105..112].fill(0);
        assert_eq!(parse(&h, FILE_LEN).unwrap().codec, Codec::Deflate);
    }

    #[test]
    fn backing_file_and_format() {
        let mut h = valid_header();
        let next = put_ext(&mut h, 112, EXT_BACKING_FORMAT, b"qcow2");
        put32(&mut h, next, EXT_END);
        h[0x1000..0x1009].copy_from_slice(b"base.img!");
        put64(&mut h, 8, 0x1000);
        put32(&mut h, 16, 8);
        let parsed = parse(&h, FILE_LEN).unwrap();
        assert_eq!(
            parsed.backing,
            Some(BackingFile {
                name: "base.img".into(),
                format: Some("qcow2".into()),
                offset: parsed.backing.as_ref().unwrap().offset,
            })
        );
        put_ext(&mut h, 112, EXT_BACKING_FORMAT, b"vmdk\0");
        fails(&h, ErrorKind::Unsupported, "format \"vmdk");
        put_ext(&mut h, 112, EXT_BACKING_FORMAT, &[b'x'; 16]);
        fails(&h, ErrorKind::BadImage, "backing format name of 16 bytes");
    }

    #[test]
    fn backing_name_too_long() {
        let mut h = valid_header();
        put64(&mut h, 8, 0x1000);
        put32(&mut h, 16, 1024);
        fails(&h, ErrorKind::BadImage, "backing file name of 1024 bytes is too long");
        put64(&mut h, 8, CLUSTER as u64 - 10);
        put32(&mut h, 16, 11);
        fails(&h, ErrorKind::BadImage, "backing file name of 11 bytes is too long");
        put64(&mut h, 8, CLUSTER as u64 + 8);
        fails(&h, ErrorKind::BadImage, "outside the header cluster");
        put64(&mut h, 8, 0x1000);
        put32(&mut h, 16, 2);
        h[0x1000..0x1002].copy_from_slice(&[0xff, 0xfe]);
        fails(&h, ErrorKind::Unsupported, "not UTF-8");
        put32(&mut h, 16, 0);
        assert_eq!(parse(&h, FILE_LEN).unwrap().backing, None);
    }

    #[test]
    fn extensions_bounded_by_the_header_cluster_and_backing_name() {
        let mut h = valid_header();
        put32(&mut h, 112, 0x1234_5678);
        put32(&mut h, 116, CLUSTER as u32);
        fails(&h, ErrorKind::BadImage, "runs past the end of the extension area");
        put32(&mut h, 116, u32::MAX);
        fails(&h, ErrorKind::BadImage, "runs past the end of the extension area");
        // The area ends where the backing name starts.
        let mut h = valid_header();
        put_ext(&mut h, 112, 0x1234_5678, &[1; 100]);
        h[0x80..0x84].copy_from_slice(b"base");
        put64(&mut h, 8, 0x80);
        put32(&mut h, 16, 4);
        fails(&h, ErrorKind::BadImage, "runs past the end of the extension area at 0x80");
        // Unknown extensions are skipped, padding included, but not forever.
        let mut h = valid_header();
        let mut at = 112;
        for _ in 0..MAX_HEADER_EXTENSIONS + 1 {
            at = put_ext(&mut h, at, 0x1234_5678, &[7; 3]);
        }
        fails(&h, ErrorKind::BadImage, "more than 1024 header extensions");
    }
}
