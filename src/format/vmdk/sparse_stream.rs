//! monolithicSparse vmdk read forward only (a `disk.vmdk.gz`, or a server without Range): the header and its
//! embedded descriptor, then the grain directory and every grain table as the stream reaches them (after the
//! redundant copies, which are passed over), then each grain placed by its grain table entry. Grains live past
//! the header's overhead, so nothing before it is ever kept; data passed before its grain table waits in the
//! stash.

use super::header::{self, GTE_ZERO};
use super::{descriptor, refuse_parent};
use crate::error::{Error, Result};
use crate::format::stream::{Placement, Stash};
use crate::format::table_stream::{place_runs, Runs, TableCursor};
use std::io::Read;
use std::sync::atomic::AtomicBool;

/// Whether the first sector is an uncompressed sparse extent header (monolithicSparse, or one extent of a split
/// image, which a stream cannot be).
pub fn is_sparse(sector: &[u8]) -> bool {
    let Ok(sector) = <&[u8; 512]>::try_from(sector) else {
        return false;
    };
    header::parse_sparse_header(sector, u64::MAX).is_ok_and(|h| !h.compressed)
}

/// Walks the monolithicSparse vmdk in `reader` (from its first byte), placing its grains through `place`; returns
/// the virtual size and the bytes stashed.
pub fn walk(
    reader: &mut dyn Read,
    name: &str,
    stash: &mut dyn Stash,
    place: &mut dyn Placement,
    stop: &AtomicBool,
) -> Result<(u64, u64)> {
    let mut cursor = TableCursor::new(reader, name, stash, stop);
    let sector: [u8; 512] = cursor.meta(0, 512, "the vmdk header")?.try_into().expect("512 bytes");
    let h = header::parse_sparse_header(&sector, u64::MAX).map_err(|e| e.at_path(name))?;
    if h.compressed || h.gd_at_end() {
        return Err(Error::unsupported(
            "vmdk sparse extent with compressed grains or its grain directory in a footer, without markers, cannot be \
             read as a stream",
        )
        .at_path(name));
    }
    let overhead = u64::from_le_bytes(sector[64..72].try_into().expect("8 bytes")).saturating_mul(512);
    cursor.data_starts_at(overhead);
    if h.desc_offset != 0 && h.desc_size != 0 {
        let at = h.desc_offset.saturating_mul(512);
        let size = h.desc_size.saturating_mul(512).min(descriptor::MAX_DESCRIPTOR);
        let text = cursor.meta(at, size, "the vmdk embedded descriptor")?;
        let embedded = descriptor::parse(&String::from_utf8_lossy(&text), false).map_err(|e| e.at_offset(at))?;
        refuse_parent(&embedded).map_err(|e| e.at_path(name))?;
    }
    let size = h.size();
    let (grain, span) = (h.grain_size(), h.gt_span());
    let gd_at = h.gd_offset.saturating_mul(512);
    let gd = cursor.meta(gd_at, h.gd_entries() * 4, "the vmdk grain directory")?;
    // Grain tables in stream order: (sector, grain directory index), 8 bytes each.
    let mut tables: Vec<(u32, u32)> = gd
        .chunks_exact(4)
        .enumerate()
        .map(|(i, e)| (u32::from_le_bytes(e.try_into().expect("4 bytes")), i as u32))
        .filter(|&(sector, _)| sector != 0)
        .collect();
    drop(gd);
    tables.sort_unstable();
    let mut runs = Runs::default();
    for (sector, index) in tables {
        let base = u64::from(index) * span;
        let gt = cursor.meta(u64::from(sector) * 512, u64::from(h.gtes_per_gt) * 4, "a vmdk grain table")?;
        for (i, entry) in gt.chunks_exact(4).enumerate() {
            let entry = u32::from_le_bytes(entry.try_into().expect("4 bytes"));
            let guest = base + i as u64 * grain;
            if entry == 0 || (entry == GTE_ZERO && h.has_zero_grain()) || guest >= size {
                continue;
            }
            runs.push(name, u64::from(entry) * 512, guest, grain.min(size - guest))?;
        }
    }
    place.begin(size)?;
    let stashed = place_runs(cursor, runs, size, place)?;
    Ok((size, stashed))
}
