//! Formats that store the disk in fixed-size blocks listed in a table of 32-bit entries (vdi's block map, vhd's
//! BAT): one mapping loop for all of them.
//!
//! A block that starts past the end of the file is an error, not zeros: reads there would return nothing, and a
//! truncated download must not import as a disk full of zeros.

use super::{push_extent, Content, Extent};
use crate::error::Result;
use crate::source::{read_exact_at, ReadAt};

/// Table entries read with one request while mapping.
const ENTRIES_PER_READ: u64 = 16 << 10;

/// A table of 32-bit block entries.
pub struct BlockTable<'a> {
    /// Where the table is read from.
    pub source: &'a dyn ReadAt,
    /// Offset of entry 0.
    pub offset: u64,
    /// Guest bytes per block.
    pub block: u64,
    /// Entries are big-endian (vhd) rather than little-endian (vdi).
    pub big_endian: bool,
    /// What to call the table in errors.
    pub what: &'static str,
}

impl BlockTable<'_> {
    /// Appends extents for guest `[offset, offset + len)`: `content(entry, within)` says what the guest bytes
    /// from `within` bytes into a block with table entry `entry` to the block's end hold, or why the entry is
    /// invalid (reported naming the entry and its file offset).
    pub fn map(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
        content: impl Fn(u32, u64) -> std::result::Result<Content, String>,
    ) -> Result<()> {
        let end = offset + len;
        let mut guest = offset;
        let mut entries = Vec::new();
        while guest < end {
            let first = guest / self.block;
            let last = (end - 1) / self.block;
            let count = (last - first + 1).min(ENTRIES_PER_READ);
            entries.resize(count as usize * 4, 0);
            read_exact_at(self.source, self.offset + first * 4, &mut entries, self.what)?;
            for (i, raw) in entries.chunks_exact(4).enumerate() {
                let index = first + i as u64;
                let block_end = ((index + 1) * self.block).min(end);
                let raw: [u8; 4] = raw.try_into().expect("4 bytes");
                let entry = if self.big_endian { u32::from_be_bytes(raw) } else { u32::from_le_bytes(raw) };
                let content = content(entry, guest - index * self.block).map_err(|why| {
                    crate::bad_image!("{} entry {index}: {why}", self.what)
                        .at_offset(self.offset + index * 4)
                        .at_path(self.source.name())
                })?;
                push_extent(out, Extent { guest, len: block_end - guest, content });
                guest = block_end;
            }
        }
        Ok(())
    }
}
