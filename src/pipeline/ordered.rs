//! Bookkeeping for work that completes out of order: the digest of the output (which must see bytes in guest
//! order) and the watermark below which everything is written.

use crate::checksum::{Algorithm, Hasher};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Zeros fed to the digest for zero items, a slice at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A digest of the output fed in guest order by workers that finish out of order: each waits for its turn.
pub struct OrderedDigest {
    state: Mutex<(u64, Hasher)>,
    turn: Condvar,
}

impl OrderedDigest {
    /// A digest starting at guest offset 0.
    pub fn new(algorithm: Algorithm) -> Self {
        OrderedDigest {
            state: Mutex::new((0, Hasher::new(algorithm))),
            turn: Condvar::new(),
        }
    }

    /// Feeds the bytes of guest `[guest, guest + bytes.len())` (or that many zeros when `bytes` is `None`) once
    /// everything before them has been fed. Returns early without feeding if `stop` is raised.
    pub fn feed(&self, guest: u64, len: u64, bytes: Option<&[u8]>, stop: &AtomicBool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while state.0 != guest {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            state = self.turn.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        match bytes {
            Some(bytes) => state.1.update(bytes),
            None => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64) as usize;
                    state.1.update(&ZEROS[..n]);
                    left -= n as u64;
                }
            }
        }
        state.0 += len;
        self.turn.notify_all();
    }

    /// Wakes every waiting worker (after `stop` was raised).
    pub fn wake_all(&self) {
        let _guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.turn.notify_all();
    }

    /// The digest, and how many bytes it covers.
    pub fn finish(self) -> (Vec<u8>, u64) {
        let (fed, hasher) = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        (hasher.finish(), fed)
    }
}

/// Tracks completed guest ranges; the watermark is the end of the longest completed prefix.
#[derive(Default)]
pub struct Completion {
    state: Mutex<(u64, BTreeMap<u64, u64>)>,
}

impl Completion {
    /// Records `[start, end)` as done; returns the new watermark.
    pub fn complete(&self, start: u64, end: u64) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (watermark, ahead) = &mut *state;
        ahead.insert(start, end);
        while let Some(end) = ahead.remove(watermark) {
            *watermark = end;
        }
        *watermark
    }

    /// Everything below this guest offset is done.
    pub fn watermark(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::hex;
    use std::sync::Arc;

    #[test]
    fn out_of_order_feeders_produce_the_in_order_digest() {
        let pieces: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let mut expected = Hasher::new(Algorithm::Sha256);
        let mut offsets = Vec::new();
        let mut at = 0u64;
        for (i, p) in pieces.iter().enumerate() {
            if i == 3 {
                expected.update(&vec![0u8; 70_000]);
                offsets.push((at, None));
                at += 70_000;
            }
            expected.update(p);
            offsets.push((at, Some(p.clone())));
            at += p.len() as u64;
        }
        let digest = Arc::new(OrderedDigest::new(Algorithm::Sha256));
        let stop = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = offsets
            .into_iter()
            .rev()
            .map(|(guest, bytes)| {
                let (digest, stop) = (digest.clone(), stop.clone());
                std::thread::spawn(move || {
                    let len = bytes.as_ref().map_or(70_000, |b| b.len() as u64);
                    digest.feed(guest, len, bytes.as_deref(), &stop)
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let (got, fed) = Arc::try_unwrap(digest).ok().unwrap().finish();
        assert_eq!(fed, at);
        assert_eq!(hex(&got), hex(&expected.finish()));
    }

    #[test]
    fn stop_releases_waiters() {
        let digest = Arc::new(OrderedDigest::new(Algorithm::Sha256));
        let stop = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (digest, stop) = (digest.clone(), stop.clone());
            std::thread::spawn(move || digest.feed(100, 10, Some(&[1; 10]), &stop))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        digest.wake_all();
        waiter.join().unwrap();
    }

    #[test]
    fn watermark_advances_over_contiguous_completions() {
        let c = Completion::default();
        assert_eq!(c.complete(10, 20), 0);
        assert_eq!(c.complete(30, 40), 0);
        assert_eq!(c.complete(0, 10), 20);
        assert_eq!(c.complete(20, 30), 40);
        assert_eq!(c.watermark(), 40);
    }
}
