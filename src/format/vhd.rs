//! VHD (Virtual PC) images, fixed and dynamic.
//!
//! A 512-byte big-endian footer ("conectix") ends every VHD. A fixed disk is raw data followed by that footer; a
//! dynamic disk also keeps a copy of it at offset 0, and the footer's data offset points at a 1 KiB dynamic header
//! ("cxsparse") which locates the block allocation table (BAT): one big-endian u32 sector number per block,
//! 0xffffffff when the block is not allocated (reads as zeros). An allocated block starts with a sector bitmap,
//! then the block's data. Differencing disks are refused, naming their parent.
//!
//! Rules follow qemu's block/vpc.c (`vpc_open`), qemu-img being the reference for what an image holds:
//! - the virtual size comes from the CHS geometry unless the creator application is one known to use the
//!   footer's current size ("win ", "qem2", "d2v ", "CTXS", "tap\0") or the geometry is the maximum one;
//! - a footer whose checksum does not match is refused (qemu has refused it since 2018: "Incorrect header
//!   checksum");
//! - sector bitmaps are not consulted for dynamic disks: qemu reads an allocated block's data as stored.

use super::block_table::BlockTable;
use super::{push_extent, Content, Extent, Image};
use crate::bytes::{be32, be64};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};
use std::sync::Arc;

/// Footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Dynamic header cookie.
pub const DYNAMIC_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk type: fixed.
pub const TYPE_FIXED: u32 = 2;
/// Disk type: dynamic.
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing.
pub const TYPE_DIFFERENCING: u32 = 4;
/// The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track), in sectors.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// Largest virtual size qemu opens, in sectors (2040 GiB).
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// BAT entry of an unallocated block.
pub const UNALLOCATED: u32 = 0xffff_ffff;

/// The VHD checksum: the one's complement of the byte sum, with the checksum field itself counted as zeros.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(b as u32));
    !sum
}

/// Whether `buf`, the last 512 bytes of a file or stream, is the footer of a fixed disk holding the `data_len`
/// bytes before it: valid checksum, fixed disk type, and a current size equal to that length. Both the
/// random-access detection and a stream's held-back tail ask this, so a fixed VHD reads the same either way, and a
/// raw disk whose last sector merely starts with "conectix" stays raw.
pub fn is_fixed_footer(buf: &[u8; 512], data_len: u64) -> bool {
    buf.starts_with(FOOTER_COOKIE)
        && be32(buf, 60) == TYPE_FIXED
        && checksum(buf, 64) == be32(buf, 64)
        && be64(buf, 48) == data_len
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header (dynamic and differencing disks).
    pub data_offset: u64,
    /// Creator application, four bytes ("qemu", "win ", "vpc ").
    pub creator_app: [u8; 4],
    /// Size in the footer's current-size field.
    pub current_size: u64,
    /// CHS geometry: cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// Disk type (2, 3 or 4).
    pub disk_type: u32,
}

impl Footer {
    /// Sectors of the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        let (c, h, s) = self.geometry;
        c as u64 * h as u64 * s as u64
    }

    /// The virtual size qemu presents, in bytes (see the module documentation).
    pub fn virtual_size(&self) -> u64 {
        let uses_current_size = matches!(&self.creator_app, b"win " | b"qem2" | b"d2v " | b"CTXS" | b"tap\0");
        let chs = self.chs_sectors();
        let sectors = if uses_current_size || chs == MAX_GEOMETRY_SECTORS { self.current_size / 512 } else { chs };
        sectors * 512
    }
}

/// Parses a footer (a 512-byte sector starting with "conectix" and a matching checksum).
pub fn parse_footer(buf: &[u8; 512]) -> Result<Footer> {
    if !buf.starts_with(FOOTER_COOKIE) {
        return Err(crate::bad_image!("vhd footer has no \"conectix\" cookie"));
    }
    let (stored, computed) = (be32(buf, 64), checksum(buf, 64));
    if stored != computed {
        return Err(crate::bad_image!(
            "vhd footer checksum is {stored:#010x} but its bytes sum to {computed:#010x} (qemu refuses it too)"
        )
        .at_offset(64));
    }
    let footer = Footer {
        data_offset: be64(buf, 16),
        creator_app: buf[28..32].try_into().expect("4 bytes"),
        current_size: be64(buf, 48),
        geometry: (u16::from_be_bytes([buf[56], buf[57]]), buf[58], buf[59]),
        disk_type: be32(buf, 60),
    };
    match footer.disk_type {
        TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING => {}
        other => {
            return Err(crate::bad_image!("vhd disk type {other} is not fixed (2), dynamic (3) or differencing (4)"))
        }
    }
    let sectors = footer.virtual_size() / 512;
    if sectors > MAX_SECTORS {
        return Err(Error::unsupported(format!(
            "vhd virtual size of {sectors} sectors is larger than the format's 2040 GiB"
        )));
    }
    Ok(footer)
}

/// A parsed dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (a power of two, at least 512).
    pub block_size: u32,
    /// Parent name (differencing disks), decoded from UTF-16BE.
    pub parent_name: String,
}

impl DynamicHeader {
    /// Bytes of the sector bitmap in front of each block's data (rounded up to whole sectors).
    pub fn bitmap_size(&self) -> u64 {
        (self.block_size as u64 / (8 * 512)).div_ceil(512) * 512
    }
}

/// Parses and validates the dynamic header for a disk of `virtual_size` bytes in a file of `file_len` bytes.
pub fn parse_dynamic_header(buf: &[u8; 1024], virtual_size: u64, file_len: u64) -> Result<DynamicHeader> {
    if !buf.starts_with(DYNAMIC_COOKIE) {
        return Err(crate::bad_image!("vhd dynamic header has no \"cxsparse\" cookie"));
    }
    let units: Vec<u16> =
        buf[64..576].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    let header = DynamicHeader {
        table_offset: be64(buf, 16),
        max_table_entries: be32(buf, 28),
        block_size: be32(buf, 32),
        parent_name: String::from_utf16_lossy(&units),
    };
    let block_size = header.block_size as u64;
    if !block_size.is_power_of_two() || block_size < 512 {
        return Err(
            crate::bad_image!("vhd block size {block_size} is not a power of two of at least 512").at_offset(32)
        );
    }
    let needed = virtual_size.div_ceil(block_size);
    if needed > header.max_table_entries as u64 {
        return Err(crate::bad_image!(
            "vhd BAT has {} entries, {needed} are needed for {virtual_size} bytes",
            header.max_table_entries
        )
        .at_offset(28));
    }
    let bat_end = header.table_offset.checked_add(needed * 4);
    if bat_end.is_none_or(|end| end > file_len) {
        return Err(crate::bad_image!(
            "vhd BAT at {} ends past the end of the file ({file_len} bytes)",
            header.table_offset
        )
        .at_offset(16));
    }
    Ok(header)
}

/// An opened VHD image.
pub struct VhdImage {
    source: Arc<dyn ReadAt>,
    footer: Footer,
    /// `None` for fixed disks.
    dynamic: Option<DynamicHeader>,
}

impl VhdImage {
    /// Reads the footer (the copy at offset 0, else the last sector) and, for dynamic disks, the dynamic header.
    pub fn open(source: Arc<dyn ReadAt>) -> Result<Self> {
        let ctx = |e: Error| e.at_path(source.name());
        let len = source.len();
        let mut buf = [0u8; 512];
        read_exact_at(source.as_ref(), 0, &mut buf, "vhd footer")?;
        let mut footer_at = 0;
        if !buf.starts_with(FOOTER_COOKIE) {
            if len < 512 {
                return Err(ctx(crate::bad_image!("file is too small for a vhd footer")));
            }
            footer_at = len - 512;
            read_exact_at(source.as_ref(), footer_at, &mut buf, "vhd footer")?;
        }
        let footer = parse_footer(&buf).map_err(|e| ctx(e.within(footer_at)))?;
        if footer_at != 0 && footer.disk_type != TYPE_FIXED {
            return Err(ctx(crate::bad_image!(
                "vhd footer at the end of the file is not a fixed disk's and there is none at offset 0"
            )
            .at_offset(footer_at)));
        }
        let virtual_size = footer.virtual_size();
        let dynamic = if footer.disk_type == TYPE_FIXED {
            None
        } else {
            let mut buf = [0u8; 1024];
            read_exact_at(source.as_ref(), footer.data_offset, &mut buf, "vhd dynamic header")?;
            let header =
                parse_dynamic_header(&buf, virtual_size, len).map_err(|e| ctx(e.within(footer.data_offset)))?;
            if footer.disk_type == TYPE_DIFFERENCING {
                return Err(ctx(Error::unsupported(format!(
                    "vhd differencing disk with parent {:?} is not supported (convert it with its parent first)",
                    header.parent_name
                ))));
            }
            Some(header)
        };
        Ok(VhdImage { source, footer, dynamic })
    }

    /// The parsed footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

impl Image for VhdImage {
    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn virtual_size(&self) -> u64 {
        self.footer.virtual_size()
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let Some(dynamic) = &self.dynamic else {
            // Fixed: guest offset = file offset, as qemu reads it (bytes past the data read as zeros).
            push_extent(out, Extent { guest: offset, len, content: Content::Data { source: 0, offset } });
            return Ok(());
        };
        let bitmap = dynamic.bitmap_size();
        let table = BlockTable {
            source: self.source.as_ref(),
            offset: dynamic.table_offset,
            block: dynamic.block_size as u64,
            big_endian: true,
            what: "vhd BAT",
        };
        let file_len = self.source.len();
        table.map(offset, len, out, |entry, within| {
            let start = entry as u64 * 512 + bitmap;
            if entry == UNALLOCATED {
                Ok(Content::Zero)
            } else if start >= file_len {
                Err(format!("block at sector {entry} lies past the end of the file ({file_len} bytes)"))
            } else {
                Ok(Content::Data { source: 0, offset: start + within })
            }
        })
    }
}

/// Walks the dynamic vhd in `reader` (from its first byte) forward only: the footer copy, the dynamic header and
/// the BAT as the stream reaches them, then each allocated block's data (after its sector bitmap, which qemu does
/// not consult either) placed by its BAT entry; bytes passed before the BAT wait in `stash`. Returns the virtual
/// size and the bytes stashed.
pub fn walk_stream(
    reader: &mut dyn std::io::Read,
    name: &str,
    stash: &mut dyn super::stream::Stash,
    place: &mut dyn super::stream::Placement,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(u64, u64)> {
    use super::table_stream::{place_runs, Runs, TableCursor};
    let mut cursor = TableCursor::new(reader, name, stash, stop);
    let buf: [u8; 512] = cursor.meta(0, 512, "the vhd footer copy")?.try_into().expect("512 bytes");
    let footer = parse_footer(&buf).map_err(|e| e.at_path(name))?;
    if footer.disk_type == TYPE_FIXED {
        return Err(
            Error::unsupported("vhd stream starts with a fixed disk's footer, which belongs at its end").at_path(name)
        );
    }
    let size = footer.virtual_size();
    let buf: [u8; 1024] =
        cursor.meta(footer.data_offset, 1024, "the vhd dynamic header")?.try_into().expect("1024 bytes");
    // The stream's length is unknown: a BAT or block past its end is found when the stream ends there.
    let header = parse_dynamic_header(&buf, size, u64::MAX).map_err(|e| e.within(footer.data_offset).at_path(name))?;
    if footer.disk_type == TYPE_DIFFERENCING {
        return Err(Error::unsupported(format!(
            "vhd differencing disk with parent {:?} is not supported (convert it with its parent first)",
            header.parent_name
        ))
        .at_path(name));
    }
    let block = header.block_size as u64;
    let blocks = size.div_ceil(block);
    let bat = cursor.meta(header.table_offset, blocks * 4, "the vhd BAT")?;
    let mut runs = Runs::default();
    for (index, entry) in bat.chunks_exact(4).enumerate() {
        let entry = be32(entry, 0);
        if entry == UNALLOCATED {
            continue;
        }
        let guest = index as u64 * block;
        let host = entry as u64 * 512 + header.bitmap_size();
        runs.push(name, host, guest, block.min(size - guest))?;
    }
    drop(bat);
    place.begin(size)?;
    let stashed = place_runs(cursor, runs, size, place)?;
    Ok((size, stashed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A footer of a dynamic disk made by qemu: 4 MiB current size, geometry 130/16/63 (2 MiB short of it).
    fn valid_footer() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes());
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[16..24].copy_from_slice(&512u64.to_be_bytes());
        b[28..32].copy_from_slice(b"qemu");
        b[40..48].copy_from_slice(&(4u64 << 20).to_be_bytes());
        b[48..56].copy_from_slice(&(4u64 << 20).to_be_bytes());
        b[56..58].copy_from_slice(&130u16.to_be_bytes());
        b[58] = 16;
        b[59] = 63;
        b[60..64].copy_from_slice(&TYPE_DYNAMIC.to_be_bytes());
        reseal(&mut b);
        b
    }

    fn reseal(b: &mut [u8; 512]) {
        let sum = checksum(b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
    }

    /// A dynamic header with a 2 MiB block size and 2 BAT entries at 1536.
    fn valid_dynamic() -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[..8].copy_from_slice(DYNAMIC_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&1536u64.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&2u32.to_be_bytes());
        b[32..36].copy_from_slice(&(2u32 << 20).to_be_bytes());
        b
    }

    #[test]
    fn qemu_footers_use_chs_and_qem2_footers_current_size() {
        let f = parse_footer(&valid_footer()).unwrap();
        assert_eq!(f.virtual_size(), 130 * 16 * 63 * 512);
        let mut b = valid_footer();
        b[28..32].copy_from_slice(b"qem2");
        reseal(&mut b);
        assert_eq!(parse_footer(&b).unwrap().virtual_size(), 4 << 20);
        let mut b = valid_footer();
        b[56..58].copy_from_slice(&65535u16.to_be_bytes());
        b[59] = 255;
        reseal(&mut b);
        assert_eq!(parse_footer(&b).unwrap().virtual_size(), 4 << 20);
    }

    #[test]
    fn bad_checksum_is_refused_naming_both_sums() {
        let mut b = valid_footer();
        let stored = be32(&b, 64) ^ 0x0100_0000;
        b[64] ^= 1;
        let err = parse_footer(&b).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadImage);
        let text = err.to_string();
        assert!(text.contains(&format!("{stored:#010x}")), "{text}");
        assert!(text.contains(&format!("{:#010x}", checksum(&b, 64))), "{text}");
        assert_eq!(err.offset(), Some(64));
    }

    #[test]
    fn malformed_footers_are_refused() {
        let mut b = valid_footer();
        b[0] = b'C';
        assert_eq!(parse_footer(&b).unwrap_err().kind(), ErrorKind::BadImage);
        let mut b = valid_footer();
        b[60..64].copy_from_slice(&5u32.to_be_bytes());
        reseal(&mut b);
        assert!(parse_footer(&b).unwrap_err().to_string().contains("disk type 5"));
        let mut b = valid_footer();
        b[28..32].copy_from_slice(b"win ");
        b[48..56].copy_from_slice(&(3u64 << 40).to_be_bytes());
        reseal(&mut b);
        assert_eq!(parse_footer(&b).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn fixed_footer_detection_needs_type_checksum_and_length() {
        let mut b = valid_footer();
        b[60..64].copy_from_slice(&TYPE_FIXED.to_be_bytes());
        reseal(&mut b);
        assert!(is_fixed_footer(&b, 4 << 20));
        assert!(!is_fixed_footer(&b, (4 << 20) + 512), "data longer than the footer's current size");
        assert!(!is_fixed_footer(&b, (4 << 20) - 512), "data shorter than the footer's current size");
        b[100] = 1;
        assert!(!is_fixed_footer(&b, 4 << 20));
        assert!(!is_fixed_footer(&valid_footer(), 4 << 20));
    }

    const SIZE: u64 = 4 << 20;

    #[test]
    fn dynamic_header_parses() {
        let h = parse_dynamic_header(&valid_dynamic(), SIZE, 1 << 20).unwrap();
        assert_eq!(h.block_size, 2 << 20);
        assert_eq!(h.bitmap_size(), 512);
        assert_eq!(h.table_offset, 1536);
    }

    #[test]
    fn malformed_dynamic_headers_are_refused() {
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (0, b"cxsparsX".to_vec()),
            (32, 3000u32.to_be_bytes().to_vec()),
            (32, 256u32.to_be_bytes().to_vec()),
            (28, 1u32.to_be_bytes().to_vec()),
            (16, (1u64 << 20).to_be_bytes().to_vec()),
            (16, u64::MAX.to_be_bytes().to_vec()),
        ];
        for (at, bytes) in cases {
            let mut b = valid_dynamic();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let err = parse_dynamic_header(&b, SIZE, 1 << 20).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::BadImage, "field at {at}: {err}");
        }
    }

    #[test]
    fn parent_name_is_decoded() {
        let mut b = valid_dynamic();
        for (i, u) in "base.vhd".encode_utf16().enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        assert_eq!(parse_dynamic_header(&b, SIZE, 1 << 20).unwrap().parent_name, "base.vhd");
    }
}
