//! streamOptimized vmdk read forward only: after the header, a sequence of markers. A grain marker (LBA, size) is
//! followed by that many bytes of zlib data inflating to one grain at that LBA; a metadata marker (size 0, a type,
//! and a count of sectors) is followed by grain tables, the grain directory or the footer, all skipped; the
//! end-of-stream marker (or the end of the stream, for images whose tables precede the grains) ends the image. Grains come in LBA order (qemu and VMware write them so): guest space
//! between two grains reads as zeros. No spool is ever needed.

use super::header::{self, SparseHeader, MARKER_EOS};
use crate::error::{Error, Result};
use crate::format::codec;
use crate::format::stream::Placement;
use crate::format::Codec;
use crate::source::sequential::{read_full, stream_error};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the first sector is a streamOptimized header this module can read forward.
pub fn is_stream_optimized(sector: &[u8]) -> bool {
    let Ok(sector) = <&[u8; 512]>::try_from(sector) else {
        return false;
    };
    header::parse_sparse_header(sector, u64::MAX).is_ok_and(|h| h.compressed && h.has_markers())
}

struct Cursor<'a> {
    reader: &'a mut dyn Read,
    name: &'a str,
    pos: u64,
}

impl Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = read_full(self.reader, buf).map_err(|e| stream_error(e, self.name, self.pos))?;
        self.pos += n as u64;
        Ok(n)
    }

    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let at = self.pos;
        if self.read(buf)? < buf.len() {
            return Err(crate::bad_image!("vmdk stream ends inside {what}").at_offset(at).at_path(self.name));
        }
        Ok(())
    }

    fn skip(&mut self, mut len: u64, what: &str) -> Result<()> {
        let mut sink = [0u8; 8192];
        while len > 0 {
            let n = len.min(sink.len() as u64) as usize;
            self.exact(&mut sink[..n], what)?;
            len -= n as u64;
        }
        Ok(())
    }
}

/// Walks the streamOptimized vmdk in `reader` (from its first byte), placing its grains through `place`; returns
/// the virtual size.
pub fn walk(reader: &mut dyn Read, name: &str, place: &mut dyn Placement, stop: &AtomicBool) -> Result<u64> {
    let mut cursor = Cursor { reader, name, pos: 0 };
    let mut sector = [0u8; 512];
    cursor.exact(&mut sector, "the header")?;
    let h: SparseHeader = header::parse_sparse_header(&sector, u64::MAX).map_err(|e| e.at_path(name))?;
    let grain_offset = u64::from_le_bytes(sector[64..72].try_into().expect("8 bytes")) * 512;
    let size = h.size();
    let grain = h.grain_size();
    place.begin(size)?;
    cursor.skip(grain_offset.saturating_sub(512), "the header's overhead")?;
    let mut resolved = 0u64;
    let mut input = Vec::new();
    let mut output = vec![0u8; grain as usize];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::new(crate::error::ErrorKind::Interrupted, "import stopped"));
        }
        let at = cursor.pos;
        let mut marker = [0u8; 12];
        match cursor.read(&mut marker)? {
            // qemu writes no end-of-stream marker when its tables sit before the grains.
            0 => break,
            12 => {}
            _ => return Err(crate::bad_image!("vmdk stream ends inside a marker").at_offset(at).at_path(name)),
        }
        let value = u64::from_le_bytes(marker[..8].try_into().expect("8 bytes"));
        let compressed = u64::from(u32::from_le_bytes(marker[8..12].try_into().expect("4 bytes")));
        if compressed == 0 {
            let mut rest = [0u8; 500];
            cursor.exact(&mut rest, "a metadata marker")?;
            let kind = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            if kind == MARKER_EOS {
                break;
            }
            // Grain table, grain directory or footer: `value` sectors of it follow.
            cursor.skip(value.saturating_mul(512), "vmdk metadata")?;
            continue;
        }
        if compressed > 2 * grain {
            return Err(crate::bad_image!(
                "vmdk grain marker says {compressed} compressed bytes for a {grain}-byte grain"
            )
            .at_offset(at)
            .at_path(name));
        }
        input.resize(compressed as usize, 0);
        cursor.exact(&mut input, "a compressed grain")?;
        cursor.skip((512 - (12 + compressed) % 512) % 512, "grain padding")?;
        let guest = value.checked_mul(512).filter(|&g| g < size && g % grain == 0).ok_or_else(|| {
            crate::bad_image!("vmdk grain at sector {value} lies outside the disk or off a grain boundary")
                .at_offset(at)
                .at_path(name)
        })?;
        if guest < resolved {
            return Err(crate::bad_image!(
                "vmdk grains out of order (sector {value} after guest offset {resolved:#x}); it cannot be read as a stream"
            )
            .at_offset(at)
            .at_path(name));
        }
        let inside = (size - guest).min(grain);
        let len = [inside, grain]
            .into_iter()
            .find(|&len| codec::decompress(Codec::Zlib, &input, &mut output[..len as usize]).is_ok())
            .ok_or_else(|| {
                crate::bad_image!("vmdk grain inflates to neither {inside} nor {grain} bytes")
                    .at_offset(at)
                    .at_path(name)
            })?;
        place.zero(resolved, guest - resolved)?;
        let take = len.min(inside) as usize;
        if !place.data(guest, &output[..take])? {
            return Err(crate::bad_image!("out of chunk buffers placing a vmdk grain").at_offset(at).at_path(name));
        }
        resolved = guest + take as u64;
    }
    place.zero(resolved, size - resolved)?;
    place.finish()?;
    // Whatever follows the end-of-stream marker is read (for the source checksum) and ignored.
    let mut sink = vec![0u8; 64 << 10];
    while cursor.read(&mut sink)? > 0 {}
    Ok(size)
}
