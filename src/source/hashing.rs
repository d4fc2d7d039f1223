//! A checksum tap on a source: digests every byte of the source exactly once, in order, while the importer
//! reads what it needs.
//!
//! The importer reads a qcow2 image mostly front to back (header, L1, then L2 tables and data in file order for
//! images qemu-img wrote), so the tap hashes each read as the cursor passes it. Bytes the importer skips (refcount
//! blocks, holes, unused clusters) are read and hashed when a later read jumps past them; reads behind the cursor
//! are not hashed again. At the end the rest of the source up to EOF is hashed. Callers that want a single pass
//! issue their reads in increasing offset order.

use super::ReadAt;
use crate::buffer::AlignedBuf;
use crate::checksum::{Algorithm, Hasher};
use crate::error::Result;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Size of each gap-filling read.
const GAP_READ: usize = 1 << 20;

/// A [`ReadAt`] wrapper that digests the whole underlying source in offset order.
pub struct HashingSource {
    inner: Arc<dyn ReadAt>,
    state: Mutex<TapState>,
}

struct TapState {
    cursor: u64,
    hasher: Hasher,
    /// Bytes read only to be hashed (skipped by the importer).
    gap_bytes: u64,
}

/// The outcome of a hashing pass.
pub struct HashOutcome {
    /// The digest of the whole source.
    pub digest: Vec<u8>,
    /// Bytes read only for the digest, because the importer did not need them or needed them out of order.
    pub gap_bytes: u64,
}

impl HashingSource {
    /// Wraps `inner`, digesting it with `algorithm`.
    pub fn new(inner: Arc<dyn ReadAt>, algorithm: Algorithm) -> Self {
        HashingSource { inner, state: Mutex::new(TapState { cursor: 0, hasher: Hasher::new(algorithm), gap_bytes: 0 }) }
    }

    /// Hashes whatever has not been read yet up to the end of the source and returns the digest.
    pub fn finish(&self) -> Result<HashOutcome> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.fill_gap(&mut state, self.inner.len())?;
        let hasher = std::mem::replace(&mut state.hasher, Hasher::new(Algorithm::Md5));
        Ok(HashOutcome { digest: hasher.finish(), gap_bytes: state.gap_bytes })
    }

    fn fill_gap(&self, state: &mut TapState, until: u64) -> Result<()> {
        if state.cursor >= until {
            return Ok(());
        }
        let mut scratch = AlignedBuf::new(GAP_READ);
        while state.cursor < until {
            let want = (until - state.cursor).min(GAP_READ as u64) as usize;
            let got = self.inner.read_at(state.cursor, &mut scratch[..want])?;
            state.hasher.update(&scratch[..got]);
            state.cursor += got as u64;
            state.gap_bytes += got as u64;
            if got < want {
                break;
            }
        }
        Ok(())
    }
}

impl ReadAt for HashingSource {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.fill_gap(&mut state, offset)?;
        let got = self.inner.read_at(offset, buf)?;
        let end = offset + got as u64;
        if end > state.cursor && offset <= state.cursor {
            let from = (state.cursor - offset) as usize;
            state.hasher.update(&buf[from..got]);
            state.cursor = end;
        }
        Ok(got)
    }

    fn direct_alignment(&self) -> u64 {
        self.inner.direct_alignment()
    }

    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }

    fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        self.inner.next_data(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::hex;
    use crate::error::Error;

    struct Memory(Vec<u8>);

    impl ReadAt for Memory {
        fn name(&self) -> &str {
            "memory"
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
    }

    fn sha256(bytes: &[u8]) -> String {
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(bytes);
        hex(&h.finish())
    }

    #[test]
    fn digest_is_of_the_whole_source_whatever_the_read_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let want = sha256(&data);
        let orders: &[&[(u64, usize)]] = &[
            &[],
            &[(0, 100), (100, 1000), (5000, 70000)],
            &[(2_000_000, 10), (0, 4096), (1_000_000, 500_000)],
            &[(10, 10), (5, 10), (2_999_990, 100)],
        ];
        for reads in orders {
            let tap = HashingSource::new(Arc::new(Memory(data.clone())), Algorithm::Sha256);
            for &(offset, len) in *reads {
                let mut buf = vec![0u8; len];
                let got = tap.read_at(offset, &mut buf).unwrap();
                assert_eq!(&buf[..got], &data[offset as usize..offset as usize + got]);
            }
            let outcome = tap.finish().unwrap();
            assert_eq!(hex(&outcome.digest), want, "{reads:?}");
        }
    }

    #[test]
    fn in_order_reads_need_no_gap_bytes() {
        let data = vec![9u8; 10_000];
        let tap = HashingSource::new(Arc::new(Memory(data.clone())), Algorithm::Sha256);
        let mut buf = vec![0u8; 5000];
        tap.read_at(0, &mut buf).unwrap();
        tap.read_at(5000, &mut buf).unwrap();
        let outcome = tap.finish().unwrap();
        assert_eq!(outcome.gap_bytes, 0);
        assert_eq!(hex(&outcome.digest), sha256(&data));
    }
}
