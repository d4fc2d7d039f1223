//! What a forward-only walker (a qcow2 or streamOptimized vmdk read front to back) hands its results to. The
//! walkers parse tables as they pass and place guest bytes by table entry; where those bytes go (chunk buffers,
//! the destination) and where bytes seen before their mapping wait (memory, a scratch file) are the pipeline's
//! business, behind these two traits, so format code stays a pure function of the bytes it is given.
//!
//! Each format read forward is a [`Walker`], and [`walker_for`] picks one by detection: the forward driver knows
//! no format. A new forward-only format is its walk function, a `Walker` below, and a line in [`WALKERS`].

use super::detect::Detected;
use super::{qcow2, vdi, vhd, vhdx, vmdk};
use crate::bytes::{be64, le64};
use crate::error::Result;
use std::io::Read;
use std::sync::atomic::AtomicBool;

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

/// A format read front to back.
pub trait Walker: Sync {
    /// The format's name in reports, as qemu-img names it ("qcow2", "vpc", …).
    fn format_name(&self) -> &'static str;
    /// Whether this walker reads a stream detected as `detected` whose first bytes are `head` (512 of them, or
    /// the whole of a shorter stream).
    fn reads(&self, detected: &Detected, head: &[u8]) -> bool;
    /// The virtual size the first bytes state, for opening the destination before the walk; `None` when only
    /// the walk finds it (the destination then grows as bytes are placed).
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>>;
    /// Walks the stream: tables parsed as they pass, guest bytes placed, data seen before its table stashed.
    /// Returns the virtual size and the bytes stashed.
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)>;
}

/// Every format with a forward walk, in the order they are asked.
pub static WALKERS: &[&dyn Walker] =
    &[&Qcow2Walker, &StreamOptimizedVmdk, &MonolithicSparseVmdk, &DynamicVhd, &VdiWalker, &VhdxWalker];

/// The walker for a stream detected as `detected` with first bytes `head`; `None` when the format needs random
/// access (a vmdk descriptor, whose extents are other files).
pub fn walker_for(detected: &Detected, head: &[u8]) -> Option<&'static dyn Walker> {
    WALKERS.iter().copied().find(|walker| walker.reads(detected, head))
}

/// The first 512 bytes of `head`, or a message saying the stream ends inside `what`.
fn first_sector<'h>(head: &'h [u8], what: &str) -> Result<&'h [u8; 512]> {
    head.get(..512)
        .and_then(|h| <&[u8; 512]>::try_from(h).ok())
        .ok_or_else(|| crate::bad_image!("the stream ends inside {what} ({} bytes)", head.len()))
}

struct Qcow2Walker;

impl Walker for Qcow2Walker {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn reads(&self, detected: &Detected, _: &[u8]) -> bool {
        *detected == Detected::Qcow2
    }
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>> {
        // The walk checks the header fully; the destination needs only the size.
        if head.len() < 32 {
            return Err(crate::bad_image!("the stream ends inside its qcow2 header ({} bytes)", head.len()));
        }
        Ok(Some(be64(head, 24) & !511))
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        qcow2::stream::walk(reader, name, stash, place, stop).map(|stats| (stats.virtual_size, stats.spooled))
    }
}

struct StreamOptimizedVmdk;

impl Walker for StreamOptimizedVmdk {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }
    fn reads(&self, detected: &Detected, head: &[u8]) -> bool {
        *detected == Detected::Vmdk && vmdk::stream::is_stream_optimized(head)
    }
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>> {
        Ok(Some(le64(first_sector(head, "its vmdk header")?, 12).saturating_mul(512)))
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        _: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        // Markers carry their grain's place: nothing waits for a table.
        vmdk::stream::walk(reader, name, place, stop).map(|size| (size, 0))
    }
}

struct MonolithicSparseVmdk;

impl Walker for MonolithicSparseVmdk {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }
    fn reads(&self, detected: &Detected, head: &[u8]) -> bool {
        *detected == Detected::Vmdk && vmdk::sparse_stream::is_sparse(head)
    }
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>> {
        Ok(Some(le64(first_sector(head, "its vmdk header")?, 12).saturating_mul(512)))
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        vmdk::sparse_stream::walk(reader, name, stash, place, stop)
    }
}

struct DynamicVhd;

impl Walker for DynamicVhd {
    fn format_name(&self) -> &'static str {
        "vpc"
    }
    fn reads(&self, detected: &Detected, _: &[u8]) -> bool {
        *detected == Detected::Vhd
    }
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>> {
        Ok(Some(vhd::parse_footer(first_sector(head, "its vhd footer copy")?)?.virtual_size()))
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        vhd::walk_stream(reader, name, stash, place, stop)
    }
}

struct VdiWalker;

impl Walker for VdiWalker {
    fn format_name(&self) -> &'static str {
        "vdi"
    }
    fn reads(&self, detected: &Detected, _: &[u8]) -> bool {
        *detected == Detected::Vdi
    }
    fn size_from_head(&self, head: &[u8]) -> Result<Option<u64>> {
        Ok(Some(vdi::parse_header(first_sector(head, "its vdi header")?, u64::MAX)?.disk_size))
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        vdi::walk_stream(reader, name, stash, place, stop)
    }
}

struct VhdxWalker;

impl Walker for VhdxWalker {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }
    fn reads(&self, detected: &Detected, _: &[u8]) -> bool {
        *detected == Detected::Vhdx
    }
    fn size_from_head(&self, _: &[u8]) -> Result<Option<u64>> {
        // The virtual size is in the metadata region, which only the walk reaches.
        Ok(None)
    }
    fn walk(
        &self,
        reader: &mut dyn Read,
        name: &str,
        stash: &mut dyn Stash,
        place: &mut dyn Placement,
        stop: &AtomicBool,
    ) -> Result<(u64, u64)> {
        vhdx::stream::walk(reader, name, stash, place, stop)
    }
}
