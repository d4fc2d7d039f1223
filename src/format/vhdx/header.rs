//! VHDX structures at fixed places and in the metadata region, parsed as pure functions of their bytes.
//!
//! Layout (all little-endian; GUIDs in their on-disk mixed-endian form): the file type identifier "vhdxfile" at 0,
//! two 4 KiB headers at 64 KiB and 128 KiB (the valid one with the higher sequence number is current), a 64 KiB
//! region table at 192 KiB locating the BAT and the metadata region, and in the metadata region a table of items
//! (file parameters, virtual disk size, sector sizes, page 83 data, parent locator). Every structure carries a
//! CRC32C. Which values qemu refuses: `vhdx_parse_header`, `vhdx_open_region_tables`, `vhdx_parse_metadata` in
//! qemu's block/vhdx.c; this module follows them and adds the caps this reader needs.

pub(crate) use crate::bytes::{le16, le32, le64};
use crate::error::{Error, Result};

/// The file type identifier at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Offset of the first header.
pub const HEADER1_OFFSET: u64 = 64 << 10;
/// Offset of the second header.
pub const HEADER2_OFFSET: u64 = 128 << 10;
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4 << 10;
/// Offset of the (first) region table.
pub const REGION_TABLE_OFFSET: u64 = 192 << 10;
/// Bytes the region table's checksum covers; also the largest metadata table.
pub const TABLE_SIZE: usize = 64 << 10;
/// End of the header section (file identifier, headers, region tables), where nothing else may lie.
pub const HEADER_SECTION_END: u64 = 1 << 20;
/// Most region or metadata table entries (the spec's limit).
pub const MAX_TABLE_ENTRIES: usize = 2047;
/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest virtual disk (the spec's 64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Sectors one sector bitmap block describes (2^23): the chunk ratio is this many sectors' worth of blocks.
const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// Region GUID of the block allocation table, 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub const BAT_GUID: [u8; 16] = guid(0x2dc2_7766, 0xf623, 0x4200, [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08]);
/// Region GUID of the metadata region, 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub const METADATA_GUID: [u8; 16] = guid(0x8b7c_a206, 0x4790, 0x4b9a, [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e]);
/// Metadata item: file parameters, CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
pub const FILE_PARAMETERS_GUID: [u8; 16] =
    guid(0xcaa1_6737, 0xfa36, 0x4d43, [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b]);
/// Metadata item: virtual disk size, 2FA54224-CD1B-4876-B211-5DBED83BF4B8.
pub const VIRTUAL_DISK_SIZE_GUID: [u8; 16] =
    guid(0x2fa5_4224, 0xcd1b, 0x4876, [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8]);
/// Metadata item: page 83 data, BECA12AB-B2E6-4523-93EF-C309E000C746.
pub const PAGE83_GUID: [u8; 16] = guid(0xbeca_12ab, 0xb2e6, 0x4523, [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46]);
/// Metadata item: logical sector size, 8141BF1D-A96F-4709-BA47-F233A8FAAB5F.
pub const LOGICAL_SECTOR_SIZE_GUID: [u8; 16] =
    guid(0x8141_bf1d, 0xa96f, 0x4709, [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f]);
/// Metadata item: physical sector size, CDA348C7-445D-4471-9CC9-E9885251C556.
pub const PHYSICAL_SECTOR_SIZE_GUID: [u8; 16] =
    guid(0xcda3_48c7, 0x445d, 0x4471, [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56]);
/// Metadata item: parent locator, A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
pub const PARENT_LOCATOR_GUID: [u8; 16] =
    guid(0xa8d3_5f2d, 0xb30b, 0x454d, [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c]);

/// A GUID in its on-disk byte order (first three fields little-endian).
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]
}

/// CRC32C (Castagnoli) lookup table, reflected polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Continues a CRC32C over `data` (start with `state = !0`, finish with `!state`).
pub fn crc32c_update(mut state: u32, data: &[u8]) -> u32 {
    for &b in data {
        state = CRC32C_TABLE[((state ^ b as u32) & 0xff) as usize] ^ (state >> 8);
    }
    state
}

/// CRC32C of `buf` with the 4-byte checksum field at `field` counted as zeros.
pub fn checksum(buf: &[u8], field: usize) -> u32 {
    let state = crc32c_update(!0, &buf[..field]);
    let state = crc32c_update(state, &[0; 4]);
    !crc32c_update(state, &buf[field + 4..])
}

/// Whether the checksum stored at `field` of `buf` is right.
pub fn checksum_ok(buf: &[u8], field: usize) -> bool {
    le32(buf, field) == checksum(buf, field)
}

fn guid_at(buf: &[u8], at: usize) -> [u8; 16] {
    buf[at..at + 16].try_into().expect("16 bytes")
}

/// The fields of a VHDX header this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Sequence number: the valid header with the higher one is current.
    pub sequence_number: u64,
    /// Log GUID: zero when the log holds nothing to replay.
    pub log_guid: [u8; 16],
    /// Log format version (0).
    pub log_version: u16,
    /// Offset of the log.
    pub log_offset: u64,
    /// Length of the log.
    pub log_length: u32,
}

/// A header if `buf` (4 KiB) is a valid one: signature "head", right CRC32C, version 1.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() != HEADER_SIZE || &buf[..4] != b"head" || !checksum_ok(buf, 4) || le16(buf, 66) != 1 {
        return None;
    }
    Some(Header {
        sequence_number: le64(buf, 8),
        log_guid: guid_at(buf, 48),
        log_version: le16(buf, 64),
        log_length: le32(buf, 68),
        log_offset: le64(buf, 72),
    })
}

/// Picks the current header from the two copies, as qemu does: the only valid one, or the one with the higher
/// sequence number; equal sequence numbers are accepted only when both copies are identical (Disk2VHD makes those).
pub fn select_header(first: &[u8], second: &[u8]) -> Result<Header> {
    let header = match (parse_header(first), parse_header(second)) {
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => return Err(crate::bad_image!("no valid vhdx header (both copies fail their checks)")),
        (Some(a), Some(b)) if a.sequence_number > b.sequence_number => a,
        (Some(a), Some(b)) if b.sequence_number > a.sequence_number => b,
        (Some(a), Some(_)) if first == second => a,
        (Some(a), Some(_)) => {
            return Err(crate::bad_image!(
                "the two vhdx headers differ but have the same sequence number {}",
                a.sequence_number
            ))
        }
    };
    if header.log_version != 0 {
        return Err(Error::unsupported(format!("vhdx log version {} is not supported", header.log_version)));
    }
    Ok(header)
}

/// A region of the file: `[offset, offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start in the file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// Whether the two regions share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// The regions a VHDX region table locates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

/// Parses the 64 KiB region table of a file of `file_len` bytes; `log` is the log region, which regions must
/// not overlap (nor the header section, nor each other).
pub fn parse_region_table(buf: &[u8], log: Region, file_len: u64) -> Result<Regions> {
    if buf.len() != TABLE_SIZE || &buf[..4] != b"regi" {
        return Err(crate::bad_image!("vhdx region table has no \"regi\" signature"));
    }
    if !checksum_ok(buf, 4) {
        return Err(crate::bad_image!("vhdx region table checksum is wrong"));
    }
    let count = le32(buf, 8) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(crate::bad_image!("vhdx region table has {count} entries (at most {MAX_TABLE_ENTRIES})"));
    }
    let mut taken = vec![Region { offset: 0, length: HEADER_SECTION_END }];
    if log.length > 0 {
        taken.push(log);
    }
    let (mut bat, mut metadata) = (None, None);
    for i in 0..count {
        let at = 16 + 32 * i;
        let id = guid_at(buf, at);
        let offset = le64(buf, at + 16);
        let length = le32(buf, at + 24) as u64;
        let required = le32(buf, at + 28) & 1 != 0;
        let region = Region { offset, length };
        match offset.checked_add(length) {
            Some(end) if end <= file_len && length > 0 => {}
            _ => {
                return Err(crate::bad_image!(
                    "vhdx region {i} ({offset}+{length}) lies outside the file ({file_len} bytes)"
                ))
            }
        }
        if let Some(other) = taken.iter().find(|r| r.overlaps(&region)) {
            return Err(crate::bad_image!(
                "vhdx region {i} ({offset}+{length}) overlaps another at {}+{}",
                other.offset,
                other.length
            ));
        }
        taken.push(region);
        let slot = if id == BAT_GUID {
            &mut bat
        } else if id == METADATA_GUID {
            &mut metadata
        } else if required {
            return Err(Error::unsupported(format!(
                "vhdx has a required region this reader does not know ({})",
                guid_text(&id)
            )));
        } else {
            continue;
        };
        if slot.replace(region).is_some() {
            return Err(crate::bad_image!("vhdx region table lists the {} region twice", guid_text(&id)));
        }
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        _ => Err(crate::bad_image!("vhdx region table lacks the BAT or the metadata region")),
    }
}

/// A GUID in its usual text form.
pub fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| if i == 2 { format!("-{b:02X}") } else { format!("{b:02X}") })
            .collect::<String>()
    )
}

/// Where a metadata item lies, relative to the metadata region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Offset from the start of the metadata region.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The metadata items this reader needs (all but the parent locator are required by qemu).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataItems {
    /// File parameters (block size, flags).
    pub file_parameters: Item,
    /// Virtual disk size.
    pub virtual_disk_size: Item,
    /// Logical sector size.
    pub logical_sector_size: Item,
    /// Parent locator (differencing disks only).
    pub parent_locator: Option<Item>,
}

/// Parses the metadata table (the first 64 KiB of a metadata region of `region_len` bytes).
pub fn parse_metadata_table(buf: &[u8], region_len: u64) -> Result<MetadataItems> {
    if buf.len() != TABLE_SIZE || &buf[..8] != b"metadata" {
        return Err(crate::bad_image!("vhdx metadata table has no \"metadata\" signature"));
    }
    let count = le16(buf, 10) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(crate::bad_image!("vhdx metadata table has {count} entries (at most {MAX_TABLE_ENTRIES})"));
    }
    // Slots: file parameters, virtual size, page 83, logical sector, physical sector, parent locator.
    const KNOWN: [([u8; 16], &str, u64); 6] = [
        (FILE_PARAMETERS_GUID, "file parameters", 8),
        (VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8),
        (PAGE83_GUID, "page 83 data", 16),
        (LOGICAL_SECTOR_SIZE_GUID, "logical sector size", 4),
        (PHYSICAL_SECTOR_SIZE_GUID, "physical sector size", 4),
        (PARENT_LOCATOR_GUID, "parent locator", 20),
    ];
    let mut found: [Option<Item>; 6] = [None; 6];
    for i in 0..count {
        let at = 32 + 32 * i;
        let id = guid_at(buf, at);
        let offset = le32(buf, at + 16) as u64;
        let length = le32(buf, at + 20) as u64;
        let required = le32(buf, at + 24) & 4 != 0;
        let Some(slot) = KNOWN.iter().position(|k| k.0 == id) else {
            if required {
                return Err(Error::unsupported(format!(
                    "vhdx has a required metadata item this reader does not know ({})",
                    guid_text(&id)
                )));
            }
            continue;
        };
        let (_, name, min_len) = KNOWN[slot];
        if found[slot].is_some() {
            return Err(crate::bad_image!("vhdx metadata lists the {name} item twice"));
        }
        if length < min_len || offset < TABLE_SIZE as u64 || offset + length > region_len {
            return Err(crate::bad_image!(
                "vhdx {name} metadata item ({offset}+{length}) lies outside the metadata region ({region_len} bytes)"
            ));
        }
        found[slot] = Some(Item { offset, length });
    }
    for (slot, (_, name, _)) in KNOWN.iter().enumerate().take(5) {
        if found[slot].is_none() {
            return Err(crate::bad_image!("vhdx metadata lacks the required {name} item"));
        }
    }
    Ok(MetadataItems {
        file_parameters: found[0].expect("checked"),
        virtual_disk_size: found[1].expect("checked"),
        logical_sector_size: found[3].expect("checked"),
        parent_locator: found[5],
    })
}

/// The guest geometry a VHDX describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size (a power of two in 1..=256 MiB).
    pub block_size: u64,
    /// Virtual size, whole logical sectors.
    pub virtual_size: u64,
    /// Payload blocks per sector bitmap block: the BAT holds one bitmap entry after each run of this many.
    pub chunk_ratio: u64,
    /// BAT entries needed (payload and interleaved bitmap entries).
    pub bat_entries: u64,
    /// Whether the disk is differencing (has a parent).
    pub has_parent: bool,
}

/// File parameters flag: blocks stay allocated (a fixed disk).
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk.
pub const HAS_PARENT: u32 = 2;

/// Validates the file parameters (8 bytes), virtual disk size (8) and logical sector size (4) items.
pub fn parse_geometry(params: &[u8; 8], virtual_disk_size: u64, logical_sector_size: u32) -> Result<Geometry> {
    let block_size = le32(params, 0);
    let flags = le32(params, 4);
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(crate::bad_image!("vhdx block size {block_size} is not a power of two in 1..=256 MiB"));
    }
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(crate::bad_image!("vhdx logical sector size {logical_sector_size} is not 512 or 4096"));
    }
    if virtual_disk_size > MAX_VIRTUAL_SIZE {
        return Err(Error::unsupported(format!(
            "vhdx virtual size {virtual_disk_size} is larger than the format's 64 TiB"
        )));
    }
    let block_size = block_size as u64;
    let sector = logical_sector_size as u64;
    let virtual_size = virtual_disk_size / sector * sector;
    let chunk_ratio = SECTORS_PER_BITMAP * sector / block_size;
    let data_blocks = virtual_size.div_ceil(block_size);
    let bat_entries = if data_blocks == 0 { 0 } else { data_blocks + (data_blocks - 1) / chunk_ratio };
    Ok(Geometry { block_size, virtual_size, chunk_ratio, bat_entries, has_parent: flags & HAS_PARENT != 0 })
}

/// The parent path a parent locator item names (its "relative_path", else "absolute_win32_path", else
/// "volume_path"), for messages; `None` if the item does not parse.
pub fn parent_path(item: &[u8]) -> Option<String> {
    let count = le16(item.get(..20)?, 18) as usize;
    let mut best: Option<(usize, String)> = None;
    for i in 0..count.min(256) {
        let at = 20 + 12 * i;
        let entry = item.get(at..at + 12)?;
        let (key_off, value_off) = (le32(entry, 0) as usize, le32(entry, 4) as usize);
        let (key_len, value_len) = (le16(entry, 8) as usize, le16(entry, 10) as usize);
        let text = |off: usize, len: usize| -> Option<String> {
            let bytes = item.get(off..off.checked_add(len)?)?;
            let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            Some(String::from_utf16_lossy(&units))
        };
        let key = text(key_off, key_len)?;
        let rank = ["relative_path", "absolute_win32_path", "volume_path"].iter().position(|k| *k == key);
        if let Some(rank) = rank {
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, text(value_off, value_len)?));
            }
        }
    }
    best.map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 B.4 check value.
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text_round_trips_the_bat_guid() {
        assert_eq!(guid_text(&BAT_GUID), "2DC27766-F623-4200-9D64-115E9BFD4A08");
    }

    /// A valid header with sequence number `seq` and no log.
    fn valid_header(seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&(1u32 << 20).to_le_bytes());
        b[72..80].copy_from_slice(&(1u64 << 20).to_le_bytes());
        seal(&mut b, 4);
        b
    }

    fn seal(b: &mut [u8], field: usize) {
        let sum = checksum(b, field);
        b[field..field + 4].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn header_selection_follows_sequence_numbers_and_checksums() {
        let (a, b) = (valid_header(5), valid_header(6));
        assert_eq!(select_header(&a, &b).unwrap().sequence_number, 6);
        assert_eq!(select_header(&b, &a).unwrap().sequence_number, 6);
        let mut broken = b.clone();
        broken[100] = 1;
        assert_eq!(select_header(&a, &broken).unwrap().sequence_number, 5);
        assert!(select_header(&broken, &broken).is_err());
        assert_eq!(select_header(&a, &a).unwrap().sequence_number, 5);
        let mut twin = a.clone();
        twin[16] = 9;
        seal(&mut twin, 4);
        assert!(select_header(&a, &twin).is_err());
    }

    #[test]
    fn malformed_headers_are_invalid() {
        let mut sig = valid_header(1);
        sig[0] = b'H';
        seal(&mut sig, 4);
        let mut version = valid_header(1);
        version[66] = 2;
        seal(&mut version, 4);
        let mut log_version = valid_header(1);
        log_version[64] = 1;
        seal(&mut log_version, 4);
        assert!(parse_header(&sig).is_none());
        assert!(parse_header(&version).is_none());
        assert_eq!(select_header(&log_version, &log_version).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    const FILE_LEN: u64 = 8 << 20;
    const LOG: Region = Region { offset: 1 << 20, length: 1 << 20 };

    /// A region table: BAT at 3 MiB, metadata at 2 MiB, each 1 MiB.
    fn valid_region_table() -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        b[..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (id, offset)) in [(BAT_GUID, 3u64 << 20), (METADATA_GUID, 2 << 20)].into_iter().enumerate() {
            let at = 16 + 32 * i;
            b[at..at + 16].copy_from_slice(&id);
            b[at + 16..at + 24].copy_from_slice(&offset.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&(1u32 << 20).to_le_bytes());
            b[at + 28..at + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        seal(&mut b, 4);
        b
    }

    #[test]
    fn region_table_parses() {
        let r = parse_region_table(&valid_region_table(), LOG, FILE_LEN).unwrap();
        assert_eq!(r.bat, Region { offset: 3 << 20, length: 1 << 20 });
        assert_eq!(r.metadata, Region { offset: 2 << 20, length: 1 << 20 });
    }

    #[test]
    fn malformed_region_tables_are_refused() {
        let cases: Vec<(usize, Vec<u8>, ErrorKind)> = vec![
            (0, b"regX".to_vec(), ErrorKind::BadImage),
            (8, 3000u32.to_le_bytes().to_vec(), ErrorKind::BadImage),
            // BAT overlapping the log, the header section, the metadata region; past the end of the file.
            (32, (1u64 << 20).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (32, 0u64.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (32, (2u64 << 20).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (32, (FILE_LEN - 4096).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (32, u64::MAX.to_le_bytes().to_vec(), ErrorKind::BadImage),
            // The metadata entry renamed: unknown and required; or a second BAT.
            (48, [7u8; 16].to_vec(), ErrorKind::Unsupported),
            (48, BAT_GUID.to_vec(), ErrorKind::BadImage),
        ];
        for (at, bytes, kind) in cases {
            let mut b = valid_region_table();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            seal(&mut b, 4);
            let err = parse_region_table(&b, LOG, FILE_LEN).unwrap_err();
            assert_eq!(err.kind(), kind, "field at {at}: {err}");
        }
        let mut b = valid_region_table();
        b[100] ^= 1;
        assert!(parse_region_table(&b, LOG, FILE_LEN).is_err());
        // An unknown optional region is skipped; losing the metadata region is not.
        let mut b = valid_region_table();
        b[48..64].copy_from_slice(&[7u8; 16]);
        b[76..80].copy_from_slice(&0u32.to_le_bytes());
        seal(&mut b, 4);
        assert!(parse_region_table(&b, LOG, FILE_LEN).unwrap_err().to_string().contains("lacks"));
    }

    /// A metadata table with the five required items, each 64 KiB apart.
    fn valid_metadata_table() -> Vec<u8> {
        let mut b = vec![0u8; TABLE_SIZE];
        b[..8].copy_from_slice(b"metadata");
        let ids = [
            FILE_PARAMETERS_GUID,
            VIRTUAL_DISK_SIZE_GUID,
            PAGE83_GUID,
            LOGICAL_SECTOR_SIZE_GUID,
            PHYSICAL_SECTOR_SIZE_GUID,
        ];
        b[10..12].copy_from_slice(&(ids.len() as u16).to_le_bytes());
        for (i, id) in ids.into_iter().enumerate() {
            let at = 32 + 32 * i;
            b[at..at + 16].copy_from_slice(&id);
            b[at + 16..at + 20].copy_from_slice(&((64u32 << 10) + 64 * i as u32).to_le_bytes());
            b[at + 20..at + 24].copy_from_slice(&16u32.to_le_bytes());
            b[at + 24..at + 28].copy_from_slice(&4u32.to_le_bytes());
        }
        b
    }

    #[test]
    fn metadata_table_parses() {
        let m = parse_metadata_table(&valid_metadata_table(), 1 << 20).unwrap();
        assert_eq!(m.file_parameters, Item { offset: 64 << 10, length: 16 });
        assert_eq!(m.virtual_disk_size.offset, (64 << 10) + 64);
        assert_eq!(m.logical_sector_size.offset, (64 << 10) + 192);
        assert_eq!(m.parent_locator, None);
    }

    #[test]
    fn malformed_metadata_tables_are_refused() {
        let cases: Vec<(usize, Vec<u8>, ErrorKind)> = vec![
            (0, b"metadatX".to_vec(), ErrorKind::BadImage),
            (10, 3000u16.to_le_bytes().to_vec(), ErrorKind::BadImage),
            // Second entry (virtual size): duplicate of the first, unknown and required, inside the table,
            // past the region, too short.
            (64, FILE_PARAMETERS_GUID.to_vec(), ErrorKind::BadImage),
            (64, [9u8; 16].to_vec(), ErrorKind::Unsupported),
            (80, 100u32.to_le_bytes().to_vec(), ErrorKind::BadImage),
            (80, (1u32 << 20).to_le_bytes().to_vec(), ErrorKind::BadImage),
            (84, 4u32.to_le_bytes().to_vec(), ErrorKind::BadImage),
            // Entry count of 4 drops the physical sector size.
            (10, 4u16.to_le_bytes().to_vec(), ErrorKind::BadImage),
        ];
        for (at, bytes, kind) in cases {
            let mut b = valid_metadata_table();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let err = parse_metadata_table(&b, 1 << 20).unwrap_err();
            assert_eq!(err.kind(), kind, "field at {at}: {err}");
        }
    }

    fn params(block_size: u32, flags: u32) -> [u8; 8] {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&block_size.to_le_bytes());
        p[4..].copy_from_slice(&flags.to_le_bytes());
        p
    }

    #[test]
    fn geometry_and_bat_entry_count() {
        // 32 MiB blocks, 512-byte sectors: chunk ratio 128; 10 GiB = 320 blocks -> 2 bitmap entries interleaved.
        let g = parse_geometry(&params(32 << 20, 0), 10 << 30, 512).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.bat_entries, 320 + 2);
        let g = parse_geometry(&params(1 << 20, 0), 1000, 4096).unwrap();
        assert_eq!((g.virtual_size, g.chunk_ratio, g.bat_entries), (0, 32768, 0));
        assert!(parse_geometry(&params(1 << 20, HAS_PARENT), 1 << 20, 512).unwrap().has_parent);
    }

    #[test]
    fn malformed_geometry_is_refused() {
        assert!(parse_geometry(&params(3 << 20, 0), 1 << 30, 512).is_err());
        assert!(parse_geometry(&params(512 << 20, 0), 1 << 30, 512).is_err());
        assert!(parse_geometry(&params(1 << 19, 0), 1 << 30, 512).is_err());
        assert!(parse_geometry(&params(1 << 20, 0), 1 << 30, 1024).is_err());
        assert_eq!(
            parse_geometry(&params(1 << 20, 0), (64 << 40) + 512, 512).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn parent_locator_names_the_relative_path() {
        let mut item = vec![0u8; 20 + 24];
        item[18..20].copy_from_slice(&2u16.to_le_bytes());
        let add = |item: &mut Vec<u8>, i: usize, key: &str, value: &str| {
            let k: Vec<u8> = key.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            let v: Vec<u8> = value.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            let (ko, vo) = (item.len(), item.len() + k.len());
            item.extend_from_slice(&k);
            item.extend_from_slice(&v);
            let at = 20 + 12 * i;
            item[at..at + 4].copy_from_slice(&(ko as u32).to_le_bytes());
            item[at + 4..at + 8].copy_from_slice(&(vo as u32).to_le_bytes());
            item[at + 8..at + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
            item[at + 10..at + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
        };
        add(&mut item, 0, "absolute_win32_path", "C:\\vm\\base.vhdx");
        add(&mut item, 1, "relative_path", ".\\base.vhdx");
        assert_eq!(parent_path(&item).as_deref(), Some(".\\base.vhdx"));
        assert_eq!(parent_path(&item[..10]), None);
    }
}
