//! vhdx read forward only (a `disk.vhdx.gz`, or a server without Range): the header section (file identifier,
//! both headers, region table), then the log, metadata region and BAT in the order the stream reaches them, then
//! each fully present payload block placed by its BAT entry. A log that would need replaying is refused, as in the
//! random-access reader; an empty one (no log GUID) is passed over unread. Parsing is the random-access reader's
//! ([`header`], [`log`]).

use super::header::{self, Region};
use super::{log, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNMAPPED_V095};
use crate::error::{Error, Result};
use crate::format::stream::{Placement, Stash};
use crate::format::table_stream::{place_runs, Runs, TableCursor};
use crate::source::ReadAt;
use std::io::Read;
use std::sync::atomic::AtomicBool;

/// The log region's bytes, for [`log::needs_replay`], which reads them by file offset.
struct LogBytes {
    at: u64,
    bytes: Vec<u8>,
}

impl ReadAt for LogBytes {
    fn name(&self) -> &str {
        "vhdx log"
    }

    fn len(&self) -> u64 {
        self.at + self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let start =
            offset.checked_sub(self.at).filter(|&s| s <= self.bytes.len() as u64).ok_or_else(|| {
                crate::bad_image!("vhdx log read at {offset} outside the log region").at_offset(offset)
            })? as usize;
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }
}

/// What the stream holds ahead that the walk reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Log,
    Metadata,
    Bat,
}

/// Walks the vhdx in `reader` (from its first byte), placing its payload through `place`; returns the virtual size
/// and the bytes stashed.
pub fn walk(
    reader: &mut dyn Read,
    name: &str,
    stash: &mut dyn Stash,
    place: &mut dyn Placement,
    stop: &AtomicBool,
) -> Result<(u64, u64)> {
    let at_path = |e: Error| e.at_path(name);
    let mut cursor = TableCursor::new(reader, name, stash, stop);
    cursor.data_starts_at(header::HEADER_SECTION_END);
    if &cursor.meta(0, 8, "the vhdx file identifier")?[..] != header::FILE_SIGNATURE {
        return Err(at_path(crate::bad_image!("not a vhdx image (no \"vhdxfile\" identifier)").at_offset(0)));
    }
    let size = header::HEADER_SIZE as u64;
    let first = cursor.meta(header::HEADER1_OFFSET, size, "the first vhdx header")?;
    let second = cursor.meta(header::HEADER2_OFFSET, size, "the second vhdx header")?;
    let current = header::select_header(&first, &second).map_err(|e| at_path(e.at_offset(header::HEADER1_OFFSET)))?;
    let log_region = Region { offset: current.log_offset, length: current.log_length as u64 };
    let table = cursor.meta(header::REGION_TABLE_OFFSET, header::TABLE_SIZE as u64, "the vhdx region table")?;
    let regions = header::parse_region_table(&table, log_region, u64::MAX)
        .map_err(|e| at_path(e.at_offset(header::REGION_TABLE_OFFSET)))?;
    let mut parts = vec![(regions.metadata, Part::Metadata), (regions.bat, Part::Bat)];
    if log_region.length > 0 {
        if current.log_guid == [0; 16] {
            cursor.ignore(log_region.offset, log_region.length);
        } else {
            parts.push((log_region, Part::Log));
        }
    }
    parts.sort_by_key(|(region, _)| region.offset);
    let (mut metadata, mut bat) = (Vec::new(), Vec::new());
    for (region, part) in parts {
        match part {
            Part::Log => {
                let bytes = cursor.meta(region.offset, region.length, "the vhdx log")?;
                if log::needs_replay(&LogBytes { at: region.offset, bytes }, &current).map_err(at_path)? {
                    return Err(at_path(
                        Error::unsupported(
                            "vhdx log holds entries that need replaying (the image was not closed cleanly); \
                             replay it with `qemu-img check -r all` first",
                        )
                        .at_offset(region.offset),
                    ));
                }
            }
            Part::Metadata => metadata = cursor.meta(region.offset, region.length, "the vhdx metadata region")?,
            Part::Bat => bat = cursor.meta(region.offset, region.length, "the vhdx BAT")?,
        }
    }
    let meta = regions.metadata;
    let table_len = (header::TABLE_SIZE as u64).min(meta.length) as usize;
    let items = header::parse_metadata_table(&metadata[..table_len], meta.length)
        .map_err(|e| at_path(e.at_offset(meta.offset)))?;
    let item = |item: header::Item, len: usize| -> Result<&[u8]> {
        metadata.get(item.offset as usize..item.offset as usize + len).ok_or_else(|| {
            at_path(crate::bad_image!("vhdx metadata item lies outside its region").at_offset(meta.offset))
        })
    };
    let params: [u8; 8] = item(items.file_parameters, 8)?.try_into().expect("8 bytes");
    let disk_size = u64::from_le_bytes(item(items.virtual_disk_size, 8)?.try_into().expect("8 bytes"));
    let sector = u32::from_le_bytes(item(items.logical_sector_size, 4)?.try_into().expect("4 bytes"));
    let geometry = header::parse_geometry(&params, disk_size, sector).map_err(|e| at_path(e.at_offset(meta.offset)))?;
    if geometry.has_parent {
        return Err(at_path(Error::unsupported(
            "vhdx differencing disk is not supported (convert it with its parent first)",
        )));
    }
    if geometry.bat_entries * 8 > regions.bat.length {
        return Err(at_path(
            crate::bad_image!(
                "vhdx BAT region of {} bytes is too small for {} entries",
                regions.bat.length,
                geometry.bat_entries
            )
            .at_offset(regions.bat.offset),
        ));
    }
    drop(metadata);
    let mut reserved = vec![Region { offset: 0, length: header::HEADER_SECTION_END }, regions.bat, regions.metadata];
    if log_region.length > 0 {
        reserved.push(log_region);
    }
    let (block, size) = (geometry.block_size, geometry.virtual_size);
    let mut runs = Runs::default();
    for index in 0..size.div_ceil(block) {
        let bat_index = index + index / geometry.chunk_ratio;
        let at = regions.bat.offset + bat_index * 8;
        let entry = u64::from_le_bytes(bat[bat_index as usize * 8..][..8].try_into().expect("8 bytes"));
        let bad = |what: String| at_path(crate::bad_image!("{what}").at_offset(at));
        match entry & 7 {
            PAYLOAD_FULLY_PRESENT => {
                let offset = entry & !0xf_ffff;
                let data = Region { offset, length: block };
                if offset.checked_add(block).is_none() {
                    return Err(bad(format!("vhdx block {index} at {offset} lies past any file")));
                }
                if let Some(r) = reserved.iter().find(|r| r.overlaps(&data)) {
                    return Err(bad(format!(
                        "vhdx block {index} at {offset} overlaps metadata at {}+{}",
                        r.offset, r.length
                    )));
                }
                let guest = index * block;
                runs.push(name, offset, guest, block.min(size - guest))?;
            }
            PAYLOAD_PARTIALLY_PRESENT => {
                return Err(at_path(
                    Error::unsupported(format!(
                        "vhdx block {index} is partially present, which only differencing disks use"
                    ))
                    .at_offset(at),
                ))
            }
            state if state <= PAYLOAD_UNMAPPED_V095 && state != 4 => {}
            state => return Err(bad(format!("vhdx block {index} has unknown BAT state {state}"))),
        }
    }
    drop(bat);
    place.begin(size)?;
    let stashed = place_runs(cursor, runs, size, place)?;
    Ok((size, stashed))
}
