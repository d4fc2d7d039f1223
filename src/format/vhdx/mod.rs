//! VHDX images, fixed and dynamic (differencing disks are refused, naming their parent).
//!
//! [`header`] parses the fixed structures and metadata items; [`log`] decides whether the log needs replaying
//! (refused, as qemu-img does for a read-only open). Mapping reads the BAT on demand: payload block `i` has BAT
//! entry `i + i / chunk_ratio` (a sector bitmap entry follows every `chunk_ratio` payload entries). Block states:
//! not present, undefined, zero and unmapped read as zeros; fully present blocks are data at the entry's 1 MiB
//! aligned file offset; partially present blocks only occur in differencing disks.

pub mod header;
pub mod log;
pub mod stream;

use super::{push_extent, Content, Extent, Image};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};
use header::{Geometry, Region};
use std::sync::Arc;

/// BAT state: block not present (reads as zeros without a parent).
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
/// BAT state: contents undefined (read as zeros).
pub const PAYLOAD_UNDEFINED: u64 = 1;
/// BAT state: block reads as zeros.
pub const PAYLOAD_ZERO: u64 = 2;
/// BAT state: block unmapped (reads as zeros).
pub const PAYLOAD_UNMAPPED: u64 = 3;
/// BAT state: unmapped, as written by pre-1.0 (v0.95) implementations.
pub const PAYLOAD_UNMAPPED_V095: u64 = 5;
/// BAT state: block data present in the file.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// BAT state: some sectors present, the rest from the parent (differencing disks).
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// Payload blocks whose BAT entries are read with one request while mapping.
const MAP_CHUNK_BLOCKS: u64 = 8 << 10;
/// Largest parent locator item read to name the parent of a differencing disk.
const MAX_PARENT_LOCATOR: u64 = 64 << 10;

/// An opened VHDX image.
pub struct VhdxImage {
    source: Arc<dyn ReadAt>,
    geometry: Geometry,
    bat: Region,
    /// Header section, log, BAT and metadata region: payload blocks must not overlap them.
    reserved: Vec<Region>,
}

impl VhdxImage {
    /// Validates the headers, log, region table and metadata, and prepares to map guest ranges.
    pub fn open(source: Arc<dyn ReadAt>) -> Result<Self> {
        let name = source.name().to_string();
        Self::open_inner(source).map_err(|e| e.at_path(name))
    }

    fn open_inner(source: Arc<dyn ReadAt>) -> Result<Self> {
        let src = source.as_ref();
        let len = src.len();
        let mut signature = [0u8; 8];
        read_exact_at(src, 0, &mut signature, "vhdx file identifier")?;
        if &signature != header::FILE_SIGNATURE {
            return Err(crate::bad_image!("not a vhdx image (no \"vhdxfile\" identifier)").at_offset(0));
        }
        let mut first = vec![0u8; header::HEADER_SIZE];
        let mut second = vec![0u8; header::HEADER_SIZE];
        read_exact_at(src, header::HEADER1_OFFSET, &mut first, "vhdx header")?;
        read_exact_at(src, header::HEADER2_OFFSET, &mut second, "vhdx header")?;
        let current = header::select_header(&first, &second).map_err(|e| e.at_offset(header::HEADER1_OFFSET))?;
        if log::needs_replay(src, &current)? {
            return Err(Error::unsupported(
                "vhdx log holds entries that need replaying (the image was not closed cleanly); \
                 replay it with `qemu-img check -r all` first",
            )
            .at_offset(current.log_offset));
        }
        let log_region = Region { offset: current.log_offset, length: current.log_length as u64 };
        let mut table = vec![0u8; header::TABLE_SIZE];
        read_exact_at(src, header::REGION_TABLE_OFFSET, &mut table, "vhdx region table")?;
        let regions = header::parse_region_table(&table, log_region, len)
            .map_err(|e| e.at_offset(header::REGION_TABLE_OFFSET))?;
        let meta = regions.metadata;
        read_exact_at(src, meta.offset, &mut table, "vhdx metadata table")?;
        let items = header::parse_metadata_table(&table, meta.length).map_err(|e| e.at_offset(meta.offset))?;
        let mut params = [0u8; 8];
        read_exact_at(src, meta.offset + items.file_parameters.offset, &mut params, "vhdx file parameters")?;
        let mut size = [0u8; 8];
        read_exact_at(src, meta.offset + items.virtual_disk_size.offset, &mut size, "vhdx virtual disk size")?;
        let mut sector = [0u8; 4];
        read_exact_at(src, meta.offset + items.logical_sector_size.offset, &mut sector, "vhdx logical sector size")?;
        let geometry = header::parse_geometry(&params, u64::from_le_bytes(size), u32::from_le_bytes(sector))
            .map_err(|e| e.at_offset(meta.offset))?;
        if geometry.has_parent {
            let parent = match items.parent_locator {
                Some(item) => {
                    let mut buf = vec![0u8; item.length.min(MAX_PARENT_LOCATOR) as usize];
                    read_exact_at(src, meta.offset + item.offset, &mut buf, "vhdx parent locator")?;
                    header::parent_path(&buf).map_or_else(|| "an unreadable parent".to_string(), |p| format!("{p:?}"))
                }
                None => "no parent locator".to_string(),
            };
            return Err(Error::unsupported(format!(
                "vhdx differencing disk with parent {parent} is not supported (convert it with its parent first)"
            )));
        }
        if geometry.bat_entries * 8 > regions.bat.length {
            return Err(crate::bad_image!(
                "vhdx BAT region of {} bytes is too small for {} entries",
                regions.bat.length,
                geometry.bat_entries
            )
            .at_offset(regions.bat.offset));
        }
        let mut reserved =
            vec![Region { offset: 0, length: header::HEADER_SECTION_END }, regions.bat, regions.metadata];
        if log_region.length > 0 {
            reserved.push(log_region);
        }
        Ok(VhdxImage { source, geometry, bat: regions.bat, reserved })
    }

    /// The guest geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// BAT index of payload block `block`.
    fn bat_index(&self, block: u64) -> u64 {
        block + block / self.geometry.chunk_ratio
    }

    /// The extent content of payload block `block` from its BAT entry, for guest bytes starting `within` it.
    fn content(&self, block: u64, entry: u64, within: u64) -> Result<Content> {
        let bat_at = self.bat.offset + self.bat_index(block) * 8;
        let bad = |what: String| Err(crate::bad_image!("{what}").at_offset(bat_at).at_path(self.source.name()));
        match entry & 7 {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_V095 => {
                Ok(Content::Zero)
            }
            PAYLOAD_FULLY_PRESENT => {
                let offset = entry & !0xf_ffff;
                let data = Region { offset, length: self.geometry.block_size };
                if offset.checked_add(self.geometry.block_size).is_none() {
                    return bad(format!("vhdx block {block} at {offset} lies past any file"));
                }
                if offset >= self.source.len() {
                    // Bytes past the end would read as zeros: a truncated file must not import as zeros.
                    return bad(format!(
                        "vhdx block {block} at {offset:#x} lies past the end of the file ({} bytes)",
                        self.source.len()
                    ));
                }
                if let Some(r) = self.reserved.iter().find(|r| r.overlaps(&data)) {
                    return bad(format!(
                        "vhdx block {block} at {offset} overlaps metadata at {}+{}",
                        r.offset, r.length
                    ));
                }
                Ok(Content::Data { source: 0, offset: offset + within })
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(Error::unsupported(format!(
                "vhdx block {block} is partially present, which only differencing disks use"
            ))
            .at_offset(bat_at)
            .at_path(self.source.name())),
            state => bad(format!("vhdx block {block} has unknown BAT state {state}")),
        }
    }
}

impl Image for VhdxImage {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    fn virtual_size(&self) -> u64 {
        self.geometry.virtual_size
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let block = self.geometry.block_size;
        let end = offset + len;
        let mut guest = offset;
        let mut entries = Vec::new();
        while guest < end {
            let first = guest / block;
            let last = ((end - 1) / block).min(first + MAP_CHUNK_BLOCKS - 1);
            let (first_index, last_index) = (self.bat_index(first), self.bat_index(last));
            entries.resize(((last_index - first_index + 1) * 8) as usize, 0);
            read_exact_at(self.source.as_ref(), self.bat.offset + first_index * 8, &mut entries, "vhdx BAT")?;
            for index in first..=last {
                let at = ((self.bat_index(index) - first_index) * 8) as usize;
                let entry = u64::from_le_bytes(entries[at..at + 8].try_into().expect("8 bytes"));
                let block_end = ((index + 1) * block).min(end);
                let content = self.content(index, entry, guest - index * block)?;
                push_extent(out, Extent { guest, len: block_end - guest, content });
                guest = block_end;
            }
        }
        Ok(())
    }
}
