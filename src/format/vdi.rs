//! VirtualBox VDI images, static and dynamic (header version 1.1).
//!
//! A 512-byte header (signature 0xbeda107f at 0x40) locates a block map of little-endian u32 entries, one per
//! 1 MiB block: the index of the block in the data area, or 0xffffffff (never written) / 0xfffffffe (discarded),
//! both of which read as zeros. Which headers qemu refuses: `vdi_open` in qemu's block/vdi.c; the rules below
//! follow it, plus the caps this reader needs. Differencing images (non-null parent or link UUID) are refused.

use super::block_table::BlockTable;
use super::{Content, Extent, Image};
use crate::bytes::{le32, le64};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};
use std::sync::Arc;

/// The signature at [`SIGNATURE_OFFSET`].
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Where the signature sits.
pub const SIGNATURE_OFFSET: usize = 0x40;
/// Header version 1.1, the only one qemu (and this reader) opens.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Image type: blocks allocated on write.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: every block preallocated.
pub const TYPE_STATIC: u32 = 2;
/// The only block size qemu opens.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// Most blocks qemu accepts (0x3fffffff, just under 1 PiB of 1 MiB blocks).
pub const MAX_BLOCKS: u32 = 0x3fff_ffff;
/// Block map entry of a block never written.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry of a discarded block (reads as zeros).
pub const DISCARDED: u32 = 0xffff_fffe;

/// A validated VDI header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// [`TYPE_DYNAMIC`] or [`TYPE_STATIC`] (other types with no parent are read the same way).
    pub image_type: u32,
    /// Offset of the block map (sector-aligned).
    pub offset_bmap: u64,
    /// Offset of the data area (sector-aligned).
    pub offset_data: u64,
    /// Disk size in bytes, rounded up to whole sectors as qemu does.
    pub disk_size: u64,
    /// Number of block map entries.
    pub blocks_in_image: u32,
}

/// Parses and validates the first 512 bytes of a VDI file whose length is `file_len`.
pub fn parse_header(buf: &[u8; 512], file_len: u64) -> Result<Header> {
    let signature = le32(buf, SIGNATURE_OFFSET);
    if signature != SIGNATURE {
        return Err(crate::bad_image!("not a vdi image (signature {signature:#010x})").at_offset(0x40));
    }
    let version = le32(buf, 0x44);
    if version != VERSION_1_1 {
        return Err(Error::unsupported(format!(
            "vdi header version {}.{} is not supported (only 1.1)",
            version >> 16,
            version & 0xffff
        ))
        .at_offset(0x44));
    }
    let image_type = le32(buf, 0x4c);
    let offset_bmap = le32(buf, 0x154) as u64;
    let offset_data = le32(buf, 0x158) as u64;
    let sector_size = le32(buf, 0x168);
    let mut disk_size = le64(buf, 0x170);
    let block_size = le32(buf, 0x178);
    let block_extra = le32(buf, 0x17c);
    let blocks_in_image = le32(buf, 0x180);
    let uuid_link = &buf[0x1a8..0x1b8];
    let uuid_parent = &buf[0x1b8..0x1c8];
    if uuid_parent.iter().any(|&b| b != 0) || uuid_link.iter().any(|&b| b != 0) {
        return Err(Error::unsupported(format!(
            "vdi differencing image (parent UUID {}) is not supported",
            uuid_text(uuid_parent)
        )));
    }
    if offset_bmap % 512 != 0 || offset_bmap < 512 {
        return Err(
            crate::bad_image!("vdi block map offset {offset_bmap:#x} is not a sector past the header").at_offset(0x154)
        );
    }
    if offset_data % 512 != 0 || offset_data < 512 {
        return Err(
            crate::bad_image!("vdi data offset {offset_data:#x} is not a sector past the header").at_offset(0x158)
        );
    }
    if sector_size != 512 {
        return Err(Error::unsupported(format!("vdi sector size {sector_size} is not 512")).at_offset(0x168));
    }
    if block_size != BLOCK_SIZE {
        return Err(Error::unsupported(format!("vdi block size {block_size} is not {BLOCK_SIZE}")).at_offset(0x178));
    }
    if block_extra != 0 {
        return Err(Error::unsupported(format!("vdi block_extra {block_extra} is not 0")).at_offset(0x17c));
    }
    if blocks_in_image > MAX_BLOCKS {
        return Err(
            crate::bad_image!("vdi has too many blocks ({blocks_in_image}, at most {MAX_BLOCKS})").at_offset(0x180)
        );
    }
    let room = blocks_in_image as u64 * block_size as u64;
    if disk_size > room {
        return Err(crate::bad_image!(
            "vdi disk size {disk_size} is larger than its {blocks_in_image} blocks ({room} bytes)"
        )
        .at_offset(0x170));
    }
    // qemu rounds an odd size (VBoxManage convertfromraw makes them) up to whole sectors; `room` is a multiple
    // of the block size, so this stays within it.
    disk_size = disk_size.div_ceil(512) * 512;
    let map_end = offset_bmap + blocks_in_image as u64 * 4;
    if map_end > file_len {
        return Err(crate::bad_image!("vdi block map ends at {map_end}, past the end of the file ({file_len})")
            .at_offset(0x154));
    }
    Ok(Header { image_type, offset_bmap, offset_data, disk_size, blocks_in_image })
}

/// A UUID as text (byte order as stored).
fn uuid_text(uuid: &[u8]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

/// An opened VDI image.
pub struct VdiImage {
    source: Arc<dyn ReadAt>,
    header: Header,
}

impl VdiImage {
    /// Reads and validates the header.
    pub fn open(source: Arc<dyn ReadAt>) -> Result<Self> {
        let mut buf = [0u8; 512];
        read_exact_at(source.as_ref(), 0, &mut buf, "vdi header")?;
        let header = parse_header(&buf, source.len()).map_err(|e| e.at_path(source.name()))?;
        Ok(VdiImage { source, header })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

impl Image for VdiImage {
    fn format_name(&self) -> &'static str {
        "vdi"
    }

    fn virtual_size(&self) -> u64 {
        self.header.disk_size
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let block = BLOCK_SIZE as u64;
        let data = self.header.offset_data;
        let table = BlockTable {
            source: self.source.as_ref(),
            offset: self.header.offset_bmap,
            block,
            big_endian: false,
            what: "vdi block map",
        };
        let file_len = self.source.len();
        table.map(offset, len, out, |entry, within| {
            let start = data + entry as u64 * block;
            if entry >= DISCARDED {
                Ok(Content::Zero)
            } else if start >= file_len {
                Err(format!("block at {start:#x} lies past the end of the file ({file_len} bytes)"))
            } else {
                Ok(Content::Data { source: 0, offset: start + within })
            }
        })
    }
}

/// Walks the vdi in `reader` (from its first byte) forward only: the header, then the block map when the stream
/// reaches it, then each allocated block placed by its map entry; bytes passed between the map and the data area
/// are padding and never kept, data passed before the map waits in `stash`. Returns the virtual size and the
/// bytes stashed.
pub fn walk_stream(
    reader: &mut dyn std::io::Read,
    name: &str,
    stash: &mut dyn super::stream::Stash,
    place: &mut dyn super::stream::Placement,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(u64, u64)> {
    use super::table_stream::{place_runs, Runs, TableCursor};
    let mut cursor = TableCursor::new(reader, name, stash, stop);
    let buf: [u8; 512] = cursor.meta(0, 512, "the vdi header")?.try_into().expect("512 bytes");
    // The stream's length is unknown: a map or block past its end is found when the stream ends there.
    let header = parse_header(&buf, u64::MAX).map_err(|e| e.at_path(name))?;
    let size = header.disk_size;
    let block = BLOCK_SIZE as u64;
    cursor.data_starts_at(header.offset_data);
    let map = cursor.meta(header.offset_bmap, size.div_ceil(block) * 4, "the vdi block map")?;
    let mut runs = Runs::default();
    for (index, entry) in map.chunks_exact(4).enumerate() {
        let entry = le32(entry, 0);
        if entry >= DISCARDED {
            continue;
        }
        let guest = index as u64 * block;
        runs.push(name, header.offset_data + entry as u64 * block, guest, block.min(size - guest))?;
    }
    drop(map);
    place.begin(size)?;
    let stashed = place_runs(cursor, runs, size, place)?;
    Ok((size, stashed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A header for a 3 MiB + 512 B dynamic image with its map at 0x200 and data at 0x400.
    fn valid_header() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..0x20].copy_from_slice(b"<<< Oracle VM VirtualBox Disk >>");
        b[0x40..0x44].copy_from_slice(&SIGNATURE.to_le_bytes());
        b[0x44..0x48].copy_from_slice(&VERSION_1_1.to_le_bytes());
        b[0x48..0x4c].copy_from_slice(&0x180u32.to_le_bytes());
        b[0x4c..0x50].copy_from_slice(&TYPE_DYNAMIC.to_le_bytes());
        b[0x154..0x158].copy_from_slice(&0x200u32.to_le_bytes());
        b[0x158..0x15c].copy_from_slice(&0x400u32.to_le_bytes());
        b[0x168..0x16c].copy_from_slice(&512u32.to_le_bytes());
        b[0x170..0x178].copy_from_slice(&((3u64 << 20) + 512).to_le_bytes());
        b[0x178..0x17c].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        b[0x180..0x184].copy_from_slice(&4u32.to_le_bytes());
        b
    }

    fn set32(b: &mut [u8; 512], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    const FILE_LEN: u64 = 8 << 20;

    #[test]
    fn valid_header_parses() {
        let h = parse_header(&valid_header(), FILE_LEN).unwrap();
        assert_eq!(h.disk_size, (3 << 20) + 512);
        assert_eq!(h.blocks_in_image, 4);
        assert_eq!(h.offset_bmap, 0x200);
        assert_eq!(h.offset_data, 0x400);
    }

    #[test]
    fn odd_disk_size_is_rounded_up_to_sectors() {
        let mut b = valid_header();
        b[0x170..0x178].copy_from_slice(&((3u64 << 20) + 700).to_le_bytes());
        assert_eq!(parse_header(&b, FILE_LEN).unwrap().disk_size, (3 << 20) + 1024);
    }

    fn refused(b: &[u8; 512]) -> ErrorKind {
        parse_header(b, FILE_LEN).unwrap_err().kind()
    }

    #[test]
    fn malformed_headers_are_refused() {
        let cases: Vec<(usize, u32, ErrorKind)> = vec![
            (0x40, 0x1234, ErrorKind::BadImage),
            (0x44, 0x0001_0000, ErrorKind::Unsupported),
            (0x154, 0x201, ErrorKind::BadImage),
            (0x154, 0, ErrorKind::BadImage),
            (0x158, 0x401, ErrorKind::BadImage),
            (0x168, 4096, ErrorKind::Unsupported),
            (0x178, 2 << 20, ErrorKind::Unsupported),
            (0x17c, 512, ErrorKind::Unsupported),
            (0x180, 3, ErrorKind::BadImage),
            (0x180, MAX_BLOCKS + 1, ErrorKind::BadImage),
            (0x1b8, 1, ErrorKind::Unsupported),
            (0x1a8, 1, ErrorKind::Unsupported),
        ];
        for (at, value, kind) in cases {
            let mut b = valid_header();
            set32(&mut b, at, value);
            assert_eq!(refused(&b), kind, "field at {at:#x} = {value:#x}");
        }
    }

    #[test]
    fn block_map_past_the_end_is_refused() {
        let mut b = valid_header();
        set32(&mut b, 0x180, 4 << 20);
        b[0x170..0x178].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(refused(&b), ErrorKind::BadImage);
    }

    #[test]
    fn parent_uuid_is_named() {
        let mut b = valid_header();
        b[0x1b8] = 0xab;
        let err = parse_header(&b, FILE_LEN).unwrap_err().to_string();
        assert!(err.contains("differencing") && err.contains("ab00"), "{err}");
    }
}
