//! Byte sources: where image bytes come from. Formats read through the [`ReadAt`] trait and never see a file
//! descriptor, so the same parser serves a local file, a backing file, or (later) an HTTP range reader.

mod file;
mod hashing;

pub use file::FileSource;
pub use hashing::HashingSource;

use crate::error::Result;
use std::ops::Range;

/// A random-access byte source.
pub trait ReadAt: Send + Sync {
    /// What to call this source in messages (a path or URL).
    fn name(&self) -> &str;

    /// Total length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset`; returns fewer only when the end of the source is reached.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;

    /// Offset/length/address alignment under which `read_at` goes straight to the device without a copy
    /// (1 when any request is direct).
    fn direct_alignment(&self) -> u64 {
        1
    }

    /// The next range at or after `offset` that may hold non-zero bytes, or `None` if the rest reads as zeros.
    /// Sources that cannot tell report everything as data.
    fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        Ok((offset < self.len()).then(|| offset..self.len()))
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, failing with a bad-image error naming the offset if the source
/// ends first.
pub fn read_exact_at(source: &dyn ReadAt, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    let got = source.read_at(offset, buf)?;
    if got < buf.len() {
        return Err(
            crate::bad_image!("{what} ends past the end of the file ({} bytes)", source.len())
                .at_offset(offset)
                .at_path(source.name()),
        );
    }
    Ok(())
}
