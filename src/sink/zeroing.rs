//! Zeroing ranges of a block device without writing zeros through our page cache.
//!
//! Tried in order, the first that works is kept for the rest of the import:
//! 1. `fallocate(PUNCH_HOLE|KEEP_SIZE)`: the device zeroes without data transfer (WRITE_ZEROES with unmap, or a
//!    loop device punching its backing file); fails with EOPNOTSUPP rather than writing.
//! 2. `BLKZEROOUT`: the block layer zeroes, offloaded where possible, else by writing the kernel's zero page.
//! 3. O_DIRECT writes from a zeroed buffer we own.
//!
//! BLKDISCARD is never used: a discard does not promise that the range reads back as zeros.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::sys;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, Ordering};

/// Size of the buffer used when zeros must be written by hand.
const ZERO_WRITE_CHUNK: usize = 1 << 20;

const METHOD_UNKNOWN: u8 = 0;
const METHOD_PUNCH: u8 = 1;
const METHOD_ZEROOUT: u8 = 2;
const METHOD_WRITE: u8 = 3;

/// Zeroes block-device ranges with the cheapest method the device accepts.
pub struct Zeroer {
    method: AtomicU8,
}

impl Default for Zeroer {
    fn default() -> Self {
        Zeroer { method: AtomicU8::new(METHOD_UNKNOWN) }
    }
}

impl Zeroer {
    /// Zeroes `[offset, offset + len)` of the device open as `file` (aligned to its logical block size).
    /// `direct` must be an O_DIRECT handle when one is available, for the write fallback.
    pub fn zero(&self, file: &File, direct: Option<&File>, offset: u64, len: u64) -> Result<()> {
        let mut method = self.method.load(Ordering::Relaxed);
        loop {
            let result = match method {
                METHOD_UNKNOWN | METHOD_PUNCH => {
                    sys::fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
                }
                METHOD_ZEROOUT => sys::blkzeroout(file, offset, len),
                _ => return write_zeros(direct.unwrap_or(file), offset, len),
            };
            match result {
                Ok(()) => {
                    if method == METHOD_UNKNOWN {
                        self.method.store(METHOD_PUNCH, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(e) if is_unsupported(&e) => {
                    method = if method <= METHOD_PUNCH { METHOD_ZEROOUT } else { METHOD_WRITE };
                    self.method.store(method, Ordering::Relaxed);
                }
                Err(e) => return Err(Error::io("zeroing destination range", e).at_offset(offset)),
            }
        }
    }

    /// The method in use, for logs.
    pub fn method_name(&self) -> &'static str {
        match self.method.load(Ordering::Relaxed) {
            METHOD_PUNCH => "fallocate(PUNCH_HOLE)",
            METHOD_ZEROOUT => "BLKZEROOUT",
            METHOD_WRITE => "writing zeros",
            _ => "none needed",
        }
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS))
}

fn write_zeros(file: &File, offset: u64, len: u64) -> Result<()> {
    let zeros = AlignedBuf::new(ZERO_WRITE_CHUNK);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_WRITE_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)
            .map_err(|e| Error::io("writing zeros to destination", e).at_offset(offset + done))?;
        done += n as u64;
    }
    Ok(())
}
