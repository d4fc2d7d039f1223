//! Whether a VHDX log holds entries that must be replayed before the image reads consistently.
//!
//! qemu refuses to open such an image read-only (qemu-img convert's case) and asks for `qemu-img check -r all`;
//! this reader refuses it the same way instead of replaying. An entry counts when its header carries the
//! signature "loge", the log GUID of the current header, a sane length, and a CRC32C that matches over the whole
//! entry (the log is circular: an entry may wrap past its end). qemu also chains entries by sequence number and
//! checks descriptors; an entry that passes the checks here but not those would make this reader refuse an image
//! qemu opens — the safe direction.

use super::header::{crc32c_update, le32, le64, Header};
use crate::error::{Error, Result};
use crate::source::{read_exact_at, ReadAt};

/// Log sector size: entries start on these boundaries and are whole multiples of it.
pub const LOG_SECTOR: u64 = 4096;
/// Bytes of the log read at once while looking for entry headers.
const SCAN_CHUNK: u64 = 1 << 20;
/// Most bytes checksummed while verifying candidate entries; a log needing more is refused unverified.
const MAX_VERIFIED_BYTES: u64 = 256 << 20;

/// The length of the entry whose header starts `sector` if it is a candidate for the log `log_guid` of
/// `log_length` bytes: signature, GUID, length (a non-zero multiple of 4 KiB within the log), non-zero sequence
/// number, and descriptors that fit. The checksum is checked separately.
pub fn candidate_entry(sector: &[u8], log_guid: &[u8; 16], log_length: u64) -> Option<u64> {
    if sector.len() < 64 || &sector[..4] != b"loge" || &sector[32..48] != log_guid {
        return None;
    }
    let entry_length = le32(sector, 8) as u64;
    let sequence = le64(sector, 16);
    let descriptors = le32(sector, 24) as u64;
    let fits = entry_length > 0
        && entry_length % LOG_SECTOR == 0
        && entry_length <= log_length
        && sequence != 0
        && 64 + descriptors * 32 <= entry_length;
    fits.then_some(entry_length)
}

/// Whether the log of `header` (in `source`) holds an entry that would be replayed.
pub fn needs_replay(source: &dyn ReadAt, header: &Header) -> Result<bool> {
    if header.log_guid == [0; 16] {
        return Ok(false);
    }
    let (offset, length) = (header.log_offset, header.log_length as u64);
    let inside = offset.checked_add(length).is_some_and(|end| end <= source.len());
    if length == 0 || length % LOG_SECTOR != 0 || offset % LOG_SECTOR != 0 || !inside {
        return Err(crate::bad_image!("vhdx log ({offset}+{length}) is not whole 4 KiB sectors inside the file")
            .at_offset(offset));
    }
    let mut chunk = vec![0u8; SCAN_CHUNK.min(length) as usize];
    let mut verified = 0u64;
    let mut at = 0;
    while at < length {
        let n = (length - at).min(SCAN_CHUNK);
        read_exact_at(source, offset + at, &mut chunk[..n as usize], "vhdx log")?;
        for sector in (0..n).step_by(LOG_SECTOR as usize) {
            let s = &chunk[sector as usize..(sector + LOG_SECTOR) as usize];
            let Some(entry_length) = candidate_entry(s, &header.log_guid, length) else {
                continue;
            };
            verified += entry_length;
            if verified > MAX_VERIFIED_BYTES {
                return Err(Error::unsupported(
                    "vhdx log has too many candidate entries to verify; replay it with `qemu-img check -r all`",
                )
                .at_offset(offset + at + sector));
            }
            if entry_checksum_ok(source, offset, length, at + sector, entry_length)? {
                return Ok(true);
            }
        }
        at += n;
    }
    Ok(false)
}

/// Whether the entry of `entry_length` bytes at `start` (relative to the log) has a matching CRC32C, reading
/// it around the end of the circular log if it wraps.
fn entry_checksum_ok(
    source: &dyn ReadAt,
    log_offset: u64,
    log_length: u64,
    start: u64,
    entry_length: u64,
) -> Result<bool> {
    let mut buf = vec![0u8; entry_length.min(SCAN_CHUNK) as usize];
    let mut state = !0u32;
    let mut stored = 0u32;
    let mut done = 0;
    while done < entry_length {
        let pos = (start + done) % log_length;
        let n = (entry_length - done).min(SCAN_CHUNK).min(log_length - pos);
        let piece = &mut buf[..n as usize];
        read_exact_at(source, log_offset + pos, piece, "vhdx log entry")?;
        if done == 0 {
            stored = le32(piece, 4);
            piece[4..8].fill(0);
        }
        state = crc32c_update(state, piece);
        done += n;
    }
    Ok(!state == stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: [u8; 16] = [3; 16];

    fn entry_header() -> Vec<u8> {
        let mut s = vec![0u8; 4096];
        s[..4].copy_from_slice(b"loge");
        s[8..12].copy_from_slice(&4096u32.to_le_bytes());
        s[16..24].copy_from_slice(&7u64.to_le_bytes());
        s[24..28].copy_from_slice(&1u32.to_le_bytes());
        s[32..48].copy_from_slice(&GUID);
        s
    }

    #[test]
    fn candidate_entries() {
        assert_eq!(candidate_entry(&entry_header(), &GUID, 1 << 20), Some(4096));
        assert_eq!(candidate_entry(&entry_header(), &[4; 16], 1 << 20), None);
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (0, b"logX".to_vec()),
            (8, 0u32.to_le_bytes().to_vec()),
            (8, 5000u32.to_le_bytes().to_vec()),
            (8, (2u32 << 20).to_le_bytes().to_vec()),
            (16, 0u64.to_le_bytes().to_vec()),
            (24, 200u32.to_le_bytes().to_vec()),
        ];
        for (at, bytes) in cases {
            let mut s = entry_header();
            s[at..at + bytes.len()].copy_from_slice(&bytes);
            assert_eq!(candidate_entry(&s, &GUID, 1 << 20), None, "field at {at}");
        }
    }
}
