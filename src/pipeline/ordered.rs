//! Bookkeeping for work that completes out of order: the digest of the output (which must see bytes in guest
//! order) and the watermark below which everything is written.

use crate::buffer::AlignedBuf;
use crate::checksum::Hasher;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Zeros fed to the digest for zero items, a slice at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// How often a digest thread waiting for the next piece checks whether the run was halted.
const HALT_POLL: Duration = Duration::from_millis(50);

/// A piece of the output handed to the digest thread.
pub enum Piece {
    /// Guest `[guest, guest + len)` holds the first `len` bytes of `buffer`. The worker keeps its own reference
    /// and writes from it meanwhile; dropping `done` (after hashing) tells it the buffer is free again.
    Bytes {
        /// Guest offset.
        guest: u64,
        /// Number of bytes.
        len: usize,
        /// The worker's buffer, shared read-only while both write and hash it.
        buffer: Arc<AlignedBuf>,
        /// Dropped once hashed: held only for that.
        #[allow(dead_code)]
        done: SyncSender<()>,
    },
    /// Guest `[guest, guest + len)` reads as zeros.
    Zeros {
        /// Guest offset.
        guest: u64,
        /// Number of bytes.
        len: u64,
    },
}

impl Piece {
    fn guest(&self) -> u64 {
        match self {
            Piece::Bytes { guest, .. } | Piece::Zeros { guest, .. } => *guest,
        }
    }
}

/// The digest of the output, computed on its own thread in guest order while workers, finishing out of order,
/// go on writing: a worker hashes nothing and waits only if the digest falls behind.
pub struct OrderedDigest {
    sender: Sender<Piece>,
}

impl OrderedDigest {
    /// Starts the digest thread in `scope`, continuing `prefix` (a digest of guest `[0, prefix.1)` already
    /// hashed). It stops when every sender is dropped or `halt` is raised; the handle yields the digest and how
    /// many bytes it covers.
    pub fn spawn<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        prefix: (Hasher, u64),
        halt: &'scope AtomicBool,
    ) -> (Self, std::thread::ScopedJoinHandle<'scope, (Vec<u8>, u64)>) {
        let (sender, receiver) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("digest".into())
            .spawn_scoped(scope, move || digest_in_order(receiver, prefix, halt))
            .expect("spawning the digest thread");
        (OrderedDigest { sender }, handle)
    }

    /// A handle for one worker.
    pub fn feeder(&self) -> Sender<Piece> {
        self.sender.clone()
    }
}

fn digest_in_order(receiver: Receiver<Piece>, prefix: (Hasher, u64), halt: &AtomicBool) -> (Vec<u8>, u64) {
    let (mut hasher, mut next) = prefix;
    // Workers never wait on the digest in practice (measured: tens of ms over a 3 GiB import), but on a 2-core pod
    // its hashing competes with I/O submission and the block layer's threads. Yielding to them measured 4.1 s
    // against 4.4 s for a 3 GiB qcow2 onto a direct-io loop device.
    let _ = crate::sys::lower_thread_priority(10);
    // Pieces that arrived before their turn; at most one per worker, since a worker waits for its piece to be
    // hashed before it refills its buffer.
    let mut waiting: BTreeMap<u64, Piece> = BTreeMap::new();
    loop {
        while let Some(piece) = waiting.remove(&next) {
            next += match &piece {
                Piece::Bytes { len, buffer, .. } => {
                    hasher.update(&buffer[..*len]);
                    *len as u64
                }
                Piece::Zeros { len, .. } => {
                    let mut left = *len;
                    while left > 0 {
                        let n = left.min(ZEROS.len() as u64) as usize;
                        hasher.update(&ZEROS[..n]);
                        left -= n as u64;
                    }
                    *len
                }
            };
            // Dropping the piece drops `done`: its worker may reuse the buffer.
        }
        if halt.load(Ordering::Relaxed) {
            break;
        }
        match receiver.recv_timeout(HALT_POLL) {
            Ok(piece) => {
                waiting.insert(piece.guest(), piece);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    (hasher.finish(), next)
}

/// Tracks completed guest ranges; the watermark is the end of the longest completed prefix.
#[derive(Default)]
pub struct Completion {
    state: Mutex<(u64, BTreeMap<u64, u64>)>,
}

impl Completion {
    /// Tracking that starts with `[0, start)` already complete.
    pub fn starting_at(start: u64) -> Self {
        Completion { state: Mutex::new((start, BTreeMap::new())) }
    }

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
    use crate::checksum::Algorithm;

    fn buffer_with(bytes: &[u8]) -> Arc<AlignedBuf> {
        let mut buffer = AlignedBuf::new(bytes.len());
        buffer[..bytes.len()].copy_from_slice(bytes);
        Arc::new(buffer)
    }

    #[test]
    fn out_of_order_pieces_produce_the_in_order_digest() {
        let pieces: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let mut expected = Hasher::new(Algorithm::Sha256);
        let mut layout = Vec::new();
        let mut at = 0u64;
        for (i, p) in pieces.iter().enumerate() {
            if i == 3 {
                expected.update(&vec![0u8; 70_000]);
                layout.push((at, None));
                at += 70_000;
            }
            expected.update(p);
            layout.push((at, Some(p.clone())));
            at += p.len() as u64;
        }
        let halt = AtomicBool::new(false);
        let (digest, fed) = std::thread::scope(|scope| {
            let (digest, handle) = OrderedDigest::spawn(scope, (Hasher::new(Algorithm::Sha256), 0), &halt);
            let mut waits = Vec::new();
            for (guest, bytes) in layout.into_iter().rev() {
                let piece = match bytes {
                    Some(bytes) => {
                        let (done, freed) = mpsc::sync_channel(0);
                        waits.push(freed);
                        Piece::Bytes { guest, len: bytes.len(), buffer: buffer_with(&bytes), done }
                    }
                    None => Piece::Zeros { guest, len: 70_000 },
                };
                digest.feeder().send(piece).unwrap();
            }
            drop(digest);
            for freed in waits {
                // The digest thread drops `done` after hashing: recv reports the disconnection.
                assert!(freed.recv().is_err());
            }
            handle.join().unwrap()
        });
        assert_eq!(fed, at);
        assert_eq!(hex(&digest), hex(&expected.finish()));
    }

    #[test]
    fn halt_releases_workers_waiting_on_a_missing_piece() {
        let halt = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (digest, handle) = OrderedDigest::spawn(scope, (Hasher::new(Algorithm::Sha256), 0), &halt);
            let (done, freed) = mpsc::sync_channel(0);
            // Offset 100 can never be hashed: nothing covers 0..100.
            digest.feeder().send(Piece::Bytes { guest: 100, len: 10, buffer: buffer_with(&[1; 10]), done }).unwrap();
            halt.store(true, Ordering::Relaxed);
            assert!(freed.recv().is_err(), "the worker's buffer must be released");
            handle.join().unwrap();
            drop(digest);
        });
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
