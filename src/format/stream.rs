//! What a forward-only walker (a qcow2 or streamOptimized vmdk read front to back) hands its results to. The
//! walkers parse tables as they pass and place guest bytes by table entry; where those bytes go (chunk buffers,
//! the destination) and where bytes seen before their mapping wait (memory, a scratch file) are the pipeline's
//! business, behind these two traits, so format code stays a pure function of the bytes it is given.
//!
//! Each format read forward is a [`Walker`], a row of [`WALKERS`], and [`walker_for`] picks one by detection: the
//! forward driver knows no format. A new forward-only format is its walk function and a row.

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

/// How a walk is called: the stream, its name for messages, where early data waits, where guest bytes go, the
/// stop flag. Returns the virtual size and the bytes stashed.
pub type WalkFn = fn(&mut dyn Read, &str, &mut dyn Stash, &mut dyn Placement, &AtomicBool) -> Result<(u64, u64)>;

/// A format read front to back: a row of [`WALKERS`].
pub struct Walker {
    /// The format's name in reports, as qemu-img names it ("qcow2", "vpc", …).
    pub format_name: &'static str,
    /// Whether it reads a stream detected as this with these first bytes (512, or the whole of a shorter stream).
    reads: fn(&Detected, &[u8]) -> bool,
    /// The virtual size the first bytes state, for opening the destination before the walk; `None` when only the
    /// walk finds it (the destination then grows as bytes are placed).
    pub size_from_head: fn(&[u8]) -> Result<Option<u64>>,
    /// The walk: tables parsed as they pass, guest bytes placed, data seen before its table stashed.
    pub walk: WalkFn,
}

/// Every format with a forward walk, in the order they are asked.
pub static WALKERS: &[Walker] = &[
    Walker {
        format_name: "qcow2",
        reads: |detected, _| *detected == Detected::Qcow2,
        // The walk checks the header fully; the destination needs only the size.
        size_from_head: |head| match head.len() {
            0..32 => Err(crate::bad_image!("the stream ends inside its qcow2 header ({} bytes)", head.len())),
            _ => Ok(Some(be64(head, 24) & !511)),
        },
        walk: |reader, name, stash, place, stop| {
            qcow2::stream::walk(reader, name, stash, place, stop).map(|stats| (stats.virtual_size, stats.spooled))
        },
    },
    Walker {
        format_name: "vmdk",
        reads: |detected, head| *detected == Detected::Vmdk && vmdk::stream::is_stream_optimized(head),
        size_from_head: vmdk_size,
        // Markers carry their grain's place: nothing waits for a table.
        walk: |reader, name, _, place, stop| vmdk::stream::walk(reader, name, place, stop).map(|size| (size, 0)),
    },
    Walker {
        format_name: "vmdk",
        reads: |detected, head| *detected == Detected::Vmdk && vmdk::sparse_stream::is_sparse(head),
        size_from_head: vmdk_size,
        walk: vmdk::sparse_stream::walk,
    },
    Walker {
        format_name: "vpc",
        reads: |detected, _| *detected == Detected::Vhd,
        size_from_head: |head| Ok(Some(vhd::parse_footer(first_sector(head, "its vhd footer copy")?)?.virtual_size())),
        walk: vhd::walk_stream,
    },
    Walker {
        format_name: "vdi",
        reads: |detected, _| *detected == Detected::Vdi,
        size_from_head: |head| Ok(Some(vdi::parse_header(first_sector(head, "its vdi header")?, u64::MAX)?.disk_size)),
        walk: vdi::walk_stream,
    },
    Walker {
        format_name: "vhdx",
        reads: |detected, _| *detected == Detected::Vhdx,
        // The virtual size is in the metadata region, which only the walk reaches.
        size_from_head: |_| Ok(None),
        walk: vhdx::stream::walk,
    },
];

/// The walker for a stream detected as `detected` with first bytes `head`; `None` when the format needs random
/// access (a vmdk descriptor, whose extents are other files).
pub fn walker_for(detected: &Detected, head: &[u8]) -> Option<&'static Walker> {
    WALKERS.iter().find(|walker| (walker.reads)(detected, head))
}

/// The first 512 bytes of `head`, or a message saying the stream ends inside `what`.
fn first_sector<'h>(head: &'h [u8], what: &str) -> Result<&'h [u8; 512]> {
    head.get(..512)
        .and_then(|h| <&[u8; 512]>::try_from(h).ok())
        .ok_or_else(|| crate::bad_image!("the stream ends inside {what} ({} bytes)", head.len()))
}

/// A sparse vmdk's capacity, in its header's sectors.
fn vmdk_size(head: &[u8]) -> Result<Option<u64>> {
    Ok(Some(le64(first_sector(head, "its vmdk header")?, 12).saturating_mul(512)))
}
