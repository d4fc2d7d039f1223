//! What a forward-only walker (a qcow2 or streamOptimized vmdk read front to back) hands its results to. The
//! walkers parse tables as they pass and place guest bytes by table entry; where those bytes go (chunk buffers,
//! the destination) and where bytes seen before their mapping wait (memory, a scratch file) are the pipeline's
//! business, behind these two traits, so format code stays a pure function of the bytes it is given.

use crate::error::Result;

/// Where a walker puts guest bytes as it resolves them: the pipeline's chunk assembler.
pub trait Placement {
    /// Size of the guest chunks bytes are assembled in (a power of two).
    fn chunk(&self) -> u64;
    /// Announces the disk's virtual size; called once, before anything is placed.
    fn begin(&mut self, virtual_size: u64) -> Result<()>;
    /// Places guest bytes `[guest, guest + bytes.len())`. `false` when no chunk buffer is free for them: the
    /// walker keeps them and places them later.
    fn data(&mut self, guest: u64, bytes: &[u8]) -> Result<bool>;
    /// Resolves guest `[guest, guest + len)` as zeros.
    fn zero(&mut self, guest: u64, len: u64) -> Result<()>;
    /// Whether the chunk holding `guest` already has a buffer (so placing into it cannot run out).
    fn has_buffer(&self, guest: u64) -> bool;
    /// Every guest byte is resolved: hand over what is still assembled.
    fn finish(&mut self) -> Result<()>;
}

/// Stream bytes kept for later by their stream offset: data seen before the table that maps it.
pub trait Stash {
    /// Keeps `bytes`, which are stream bytes `[at, at + bytes.len())`.
    fn put(&mut self, at: u64, bytes: &[u8]) -> Result<()>;
    /// Fills `out` with stream bytes from `at`; `false` if they were never kept.
    fn get(&self, at: u64, out: &mut [u8]) -> Result<bool>;
    /// Bytes kept in all.
    fn kept(&self) -> u64;
}
