//! The header of a hosted sparse vmdk extent ("KDMV", versions 1 to 3) and the footer of a streamOptimized one,
//! parsed as pure functions of their bytes.
//!
//! Layout (little-endian, from VMware's Virtual Disk Format 5.0 and qemu's block/vmdk.c): magic, version, flags,
//! capacity (sectors), granularity (sectors per grain), descriptor offset/size (sectors), grain table entries
//! per grain table, redundant and primary grain directory offsets (sectors), overhead (sectors), a newline check,
//! and the compression algorithm. The grain directory (GD) is an array of u32 sector offsets of grain tables
//! (GT); a GT is an array of u32 sector offsets of grains. A streamOptimized writer that does not know the tables
//! up front puts `GD_AT_END` in the header and a copy of the header with the real GD offset in a footer: footer
//! marker, footer header, end-of-stream marker, the last three sectors of the file. Which values qemu refuses:
//! `vmdk_open_vmdk4` and `vmdk_add_extent`; this module follows them, with tighter caps where this reader needs
//! them.

use crate::bytes::{le16, le32, le64};
use crate::error::{Error, Result};
use crate::format::MAX_UNIT_LEN;

/// Magic of a sparse extent.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Header flag: grain table entry 1 means "reads as zeros".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: compressed grains and metadata are preceded by markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Compression algorithm: none.
pub const COMPRESSION_NONE: u16 = 0;
/// Compression algorithm: deflate (zlib-wrapped).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// GD offset meaning "the real header is in the footer".
pub const GD_AT_END: u64 = u64::MAX;
/// Grain table entry meaning "reads as zeros" (when [`FLAG_ZERO_GRAIN`] is set).
pub const GTE_ZERO: u32 = 1;
/// Most grain table entries per grain table qemu accepts.
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest grain of an uncompressed extent (grains become verbatim extents; kept at the pipeline's unit cap).
pub const MAX_GRAIN: u64 = MAX_UNIT_LEN;
/// Largest compressed grain: a grain's compressed bytes (up to two grains, as qemu reads them) must fit one
/// compressed read span of the pipeline.
pub const MAX_COMPRESSED_GRAIN: u64 = 1 << 20;
/// Most grain directory entries (qemu's cap on its L1 table).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Size of a grain marker's header: LBA (u64) and compressed size (u32).
pub const GRAIN_MARKER_LEN: u64 = 12;
/// Marker type of the end-of-stream marker.
pub const MARKER_EOS: u32 = 0;
/// Marker type of the footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// A validated sparse extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 or 3.
    pub version: u32,
    /// Header flags.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Sectors per grain.
    pub granularity: u64,
    /// Embedded descriptor offset, in sectors (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor size, in sectors.
    pub desc_size: u64,
    /// Entries per grain table (1..=512).
    pub gtes_per_gt: u32,
    /// Grain directory offset in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Whether grains are deflate-compressed.
    pub compressed: bool,
}

impl SparseHeader {
    /// Grain size in bytes.
    pub fn grain_size(&self) -> u64 {
        self.granularity * 512
    }

    /// Extent size in bytes.
    pub fn size(&self) -> u64 {
        self.capacity * 512
    }

    /// Guest bytes one grain table covers.
    pub fn gt_span(&self) -> u64 {
        self.gtes_per_gt as u64 * self.grain_size()
    }

    /// Grain directory entries needed to cover the capacity.
    pub fn gd_entries(&self) -> u64 {
        self.size().div_ceil(self.gt_span())
    }

    /// Whether GT entry 1 means zeros.
    pub fn has_zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Whether compressed grains start with a grain marker.
    pub fn has_markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Whether the real header is in the footer.
    pub fn gd_at_end(&self) -> bool {
        self.gd_offset == GD_AT_END
    }
}

/// Parses the first sector of a sparse extent in a file of `file_len` bytes. A header whose GD is at the end
/// is returned without checking the GD; the caller must read the footer and parse its header.
pub fn parse_sparse_header(buf: &[u8; 512], file_len: u64) -> Result<SparseHeader> {
    if &buf[..4] != MAGIC {
        return Err(crate::bad_image!("not a sparse vmdk extent (no \"KDMV\" magic)").at_offset(0));
    }
    let header = SparseHeader {
        version: le32(buf, 4),
        flags: le32(buf, 8),
        capacity: le64(buf, 12),
        granularity: le64(buf, 20),
        desc_offset: le64(buf, 28),
        desc_size: le64(buf, 36),
        gtes_per_gt: le32(buf, 44),
        gd_offset: le64(buf, 56),
        compressed: false,
    };
    let grain_offset = le64(buf, 64);
    let algorithm = le16(buf, 77);
    if !(1..=3).contains(&header.version) {
        return Err(
            Error::unsupported(format!("vmdk sparse extent version {} is not supported", header.version)).at_offset(4)
        );
    }
    let compressed = match algorithm {
        COMPRESSION_NONE => false,
        COMPRESSION_DEFLATE => true,
        other => {
            return Err(Error::unsupported(format!("vmdk compression algorithm {other} is not supported")).at_offset(77))
        }
    };
    let header = SparseHeader { compressed, ..header };
    if header.gtes_per_gt == 0 || header.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(crate::bad_image!(
            "vmdk grain tables of {} entries (1 to {MAX_GTES_PER_GT} allowed)",
            header.gtes_per_gt
        )
        .at_offset(44));
    }
    let max_grain = if compressed { MAX_COMPRESSED_GRAIN } else { MAX_GRAIN };
    if header.granularity == 0 || header.granularity > max_grain / 512 {
        return Err(crate::bad_image!(
            "vmdk grain of {} sectors (1 to {} allowed{})",
            header.granularity,
            max_grain / 512,
            if compressed { " when compressed" } else { "" }
        )
        .at_offset(20));
    }
    if header.capacity > u64::MAX / 512 / 2 {
        return Err(crate::bad_image!("vmdk capacity of {} sectors is too large", header.capacity).at_offset(12));
    }
    if header.gd_entries() > MAX_GD_ENTRIES {
        return Err(crate::bad_image!(
            "vmdk grain directory of {} entries is too large (at most {MAX_GD_ENTRIES})",
            header.gd_entries()
        )
        .at_offset(12));
    }
    if grain_offset.checked_mul(512).is_none_or(|end| end > file_len) {
        return Err(crate::bad_image!(
            "vmdk file is truncated: its grains start at sector {grain_offset}, past the end ({file_len} bytes)"
        )
        .at_offset(64));
    }
    if !header.gd_at_end() {
        let gd_end = header.gd_offset.checked_mul(512).and_then(|start| start.checked_add(header.gd_entries() * 4));
        if header.gd_offset == 0 || gd_end.is_none_or(|end| end > file_len) {
            return Err(crate::bad_image!(
                "vmdk grain directory at sector {} lies outside the file ({file_len} bytes)",
                header.gd_offset
            )
            .at_offset(56));
        }
    }
    Ok(header)
}

/// Checks the last three sectors of a streamOptimized extent (footer marker, footer, end-of-stream marker) and
/// returns the footer's header sector.
pub fn footer_header(tail: &[u8; 1536]) -> Result<[u8; 512]> {
    let (marker, rest) = tail.split_at(512);
    let (footer, eos) = rest.split_at(512);
    let valid = le32(marker, 8) == 0
        && le32(marker, 12) == MARKER_FOOTER
        && &footer[..4] == MAGIC
        && le64(eos, 0) == 0
        && le32(eos, 8) == 0
        && le32(eos, 12) == MARKER_EOS;
    if !valid {
        return Err(crate::bad_image!(
            "vmdk header says the grain directory is in the footer, but there is no valid footer"
        ));
    }
    Ok(footer.try_into().expect("512 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A monolithicSparse header like qemu's: 16 MiB, 64 KiB grains, 512 GTEs, GD at sector 21, grains at 128.
    fn valid_header() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b[12..20].copy_from_slice(&32768u64.to_le_bytes());
        b[20..28].copy_from_slice(&128u64.to_le_bytes());
        b[28..36].copy_from_slice(&1u64.to_le_bytes());
        b[36..44].copy_from_slice(&20u64.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[48..56].copy_from_slice(&21u64.to_le_bytes());
        b[56..64].copy_from_slice(&22u64.to_le_bytes());
        b[64..72].copy_from_slice(&128u64.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        b
    }

    const FILE_LEN: u64 = 1 << 20;

    #[test]
    fn valid_header_parses() {
        let h = parse_sparse_header(&valid_header(), FILE_LEN).unwrap();
        assert_eq!(h.size(), 16 << 20);
        assert_eq!(h.grain_size(), 64 << 10);
        assert_eq!(h.gt_span(), 32 << 20);
        assert_eq!(h.gd_entries(), 1);
        assert!(!h.compressed && !h.has_markers() && !h.has_zero_grain());
    }

    #[test]
    fn malformed_headers_are_refused() {
        let cases: Vec<(usize, Vec<u8>, ErrorKind)> = vec![
            (0, b"KDMX".to_vec(), ErrorKind::BadImage),
            (4, 4u32.to_le_bytes().to_vec(), ErrorKind::Unsupported),
            (4, 0u32.to_le_bytes().to_vec(), ErrorKind::Unsupported),
            (77, 2u16.to_le_bytes().to_vec(), ErrorKind::Unsupported),
            (44, 0u32.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (44, 513u32.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (20, 0u64.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (20, (MAX_GRAIN / 512 + 1).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (12, u64::MAX.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (12, (1u64 << 50).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (64, (FILE_LEN / 512 + 1).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (64, u64::MAX.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (56, 0u64.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (56, (FILE_LEN / 512).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (56, (u64::MAX - 1).to_le_bytes().to_vec(), ErrorKind::BadImage),
        ];
        for (at, bytes, kind) in cases {
            let mut b = valid_header();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let err = parse_sparse_header(&b, FILE_LEN).unwrap_err();
            assert_eq!(err.kind(), kind, "field at {at}: {err}");
        }
    }

    #[test]
    fn compressed_grains_have_a_smaller_cap() {
        let mut b = valid_header();
        b[77..79].copy_from_slice(&COMPRESSION_DEFLATE.to_le_bytes());
        assert!(parse_sparse_header(&b, FILE_LEN).unwrap().compressed);
        b[20..28].copy_from_slice(&(MAX_COMPRESSED_GRAIN / 512 * 2).to_le_bytes());
        assert!(parse_sparse_header(&b, FILE_LEN).is_err());
    }

    #[test]
    fn gd_at_end_defers_the_gd_check() {
        let mut b = valid_header();
        b[56..64].copy_from_slice(&GD_AT_END.to_le_bytes());
        assert!(parse_sparse_header(&b, FILE_LEN).unwrap().gd_at_end());
    }

    fn valid_footer() -> [u8; 1536] {
        let mut t = [0u8; 1536];
        t[12..16].copy_from_slice(&MARKER_FOOTER.to_le_bytes());
        t[512..1024].copy_from_slice(&valid_header());
        t
    }

    #[test]
    fn footer_is_checked() {
        assert_eq!(footer_header(&valid_footer()).unwrap(), valid_header());
        for (at, value) in [(8usize, 1u8), (12, 2), (512, b'X'), (1024, 1), (1032, 1), (1036, 1)] {
            let mut t = valid_footer();
            t[at] = value;
            assert!(footer_header(&t).is_err(), "byte {at}");
        }
    }
}
