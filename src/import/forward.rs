//! Forward-only imports: a source that can only be read front to back (a compressed image, a server without Range
//! support) is unwrapped layer by layer, its format detected from its first bytes, and then:
//! - raw: copied chunk by chunk ([`raw`]); the image is as long as the stream, unless its last 512 bytes are a
//!   fixed VHD footer (a `fixed.vhd.gz`): then it is that vpc image, read the way the random-access reader does;
//! - qcow2: walked cluster by cluster ([`crate::format::qcow2::stream`]), spooling only data seen before the table that maps it;
//! - streamOptimized vmdk: walked marker by marker ([`crate::format::vmdk::stream`]);
//! - dynamic vhd: footer copy, dynamic header and BAT, then blocks placed by BAT entry ([`crate::format::vhd::walk_stream`]);
//! - vdi: header, then block map, then blocks placed by map entry ([`crate::format::vdi::walk_stream`]);
//! - monolithicSparse vmdk: header, grain directory and tables, then grains placed by table entry
//!   ([`crate::format::vmdk::sparse_stream`]);
//! - vhdx: header section, then log (must be empty), metadata and BAT, then payload blocks placed by BAT entry
//!   ([`crate::format::vhdx::stream`]);
//! - anything else (a vmdk descriptor, whose extents are other files): spooled whole to `--scratch` and imported from there by the
//!   random-access driver.
//!
//! The walkers place guest bytes into the pipeline's chunk assembler, whose writer thread writes through the same
//! destination and zero-run splitting as the random-access workers, from a fixed pool of chunk buffers. The source
//! checksum is a tap on the bytes as they arrive, before decompression.

use super::engine::{Engine, Produced, Resumable};
use super::random::{self, Random};
use super::resume::SourceId;
use super::{Context, Outcome, Plan};
use crate::budget::xz_memlimit;
use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::format::detect::{detect_bytes, Detected};
use crate::format::stream::{walker_for, Placement, Walker};
use crate::format::vhd;
use crate::pipeline::assemble::Placer;
use crate::pipeline::spool::{self, Spool};
use crate::pipeline::writer::{with_writer, Item, Start, Writer};
use crate::progress::Progress;
use crate::size::human;
use crate::source::decompress::{unwrap_layers, Compression};
use crate::source::sequential::{read_full, stream_error, HashingReader, StreamTap};
use crate::source::{FileSource, ReadAt};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Imports the stream `reader` (`len` bytes as stored, if known; `identity` names its contents, if anything
/// does) for `plan`.
pub(super) fn import(
    ctx: &Context,
    plan: &Plan,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    identity: Option<String>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let name = plan.source.to_string();
    let tap = StreamTap::new(plan.checksum.as_ref().map(|c| c.algorithm));
    let tapped = Box::new(HashingReader::new(reader, tap.clone()));
    let (mut stream, layers) = match plan.verbatim {
        true => (crate::source::sequential::Peek::new(tapped), Vec::new()),
        false => unwrap_layers(tapped, &name, xz_memlimit(ctx.budget.bytes))?,
    };
    let head = stream.peek(512).map_err(|e| stream_error(e, &name, 0))?.to_vec();
    let detected = if plan.verbatim { Detected::Raw } else { detect_bytes(&head) };
    let wrapped = layers.iter().map(Compression::to_string).collect::<Vec<_>>().join(" in ");
    log::info!(
        "{name}: read as a stream{}{}",
        if wrapped.is_empty() { String::new() } else { format!(", {wrapped}-compressed") },
        len.map_or(String::new(), |l| format!(", {l} bytes ({})", human(l)))
    );
    // The whole stream has passed the tap by the time this runs.
    let verify = || -> Result<Option<String>> {
        match &plan.checksum {
            Some(expected) => {
                expected.verify(&tap.finish().unwrap_or_default(), &name)?;
                Ok(Some(expected.to_string()))
            }
            None => Ok(None),
        }
    };

    let streamed = match detected {
        Detected::Raw => Some(Kind::Raw),
        _ => walker_for(&detected, &head).map(Kind::Walked),
    };
    let Some(kind) = streamed else {
        // Formats that need random access: spool the whole (decompressed) image, then import it from there.
        let what = match &detected {
            Detected::Unsupported(what) => {
                return Err(Error::unsupported(format!("unsupported image format: {what}")).at_path(&name))
            }
            // A text descriptor's extents are other files, opened only beside a local descriptor: spooling it
            // cannot help, so no `--scratch` advice (which led to an error naming the deleted spool file).
            Detected::Vmdk if !head.starts_with(b"KDMV") => {
                return Err(Error::unsupported(
                    "a vmdk text descriptor read as a stream names its extents as other files, which are only opened beside a local descriptor file",
                )
                .at_path(&name))
            }
            Detected::Vmdk => "this vmdk (compressed grains without markers),",
            _ => "this",
        };
        let Some(dir) = &plan.scratch else {
            return Err(Error::needs_scratch(format!(
                "{what} image read as a stream (compressed, or from a server without Range support) needs random access: pass --scratch DIR to spool it there first"
            ))
            .at_path(&name));
        };
        let (file, spooled) = spool::spool_all(&mut stream, &name, dir, stop)?;
        log::info!("{name}: spooled {} ({spooled} bytes) to {}", human(spooled), file.path().display());
        let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(file.path())?);
        // The source is fully read: check it before anything is written.
        let verified = verify()?;
        let random = Random { source, local: None, checksum: None, serial: true };
        let mut outcome = random::import(ctx, plan, random, progress, stop)?;
        outcome.source_checksum = verified;
        outcome.spooled_bytes = spooled;
        outcome.compression = layers;
        return Ok(outcome);
    };

    let is_raw = matches!(kind, Kind::Raw);
    let raw_unknown_size = is_raw && !(layers.is_empty() && len.is_some());
    // The last 512 bytes of a raw stream may be a fixed VHD's footer (a fixed.vhd.gz): they are held back until
    // the end says which, and a destination of known size is opened without them.
    let hold_footer = is_raw && !plan.verbatim;
    // `None`: the size is known only at the stream's end (a compressed raw stream, a vhdx), and the destination
    // grows as the image arrives.
    let stated_size = match kind {
        Kind::Raw if !raw_unknown_size => match len {
            Some(l) if hold_footer && l >= MIN_FIXED_VHD => Some(l - FOOTER),
            other => other,
        },
        Kind::Raw => None,
        Kind::Walked(walker) => (walker.size_from_head)(&head).map_err(|e| e.at_path(&name))?,
    };
    let size_hint = stated_size.unwrap_or(0);
    // Progress: against the virtual size the header gives (qcow2, vmdk) or the raw stream's length; a compressed
    // raw stream's size is known only at its end, so its progress is the share of the source consumed.
    match raw_unknown_size {
        true => progress.set_stored_total(len.unwrap_or(0)),
        false => progress.set_total(size_hint),
    }
    // A stream resumes by being read again from its start (see `resume`): it needs a size known before the walk
    // and something naming its contents.
    let resumable = match (stated_size, len) {
        (None, _) => {
            if plan.resume.is_some() {
                log::info!(
                    "{name}: this stream's image size is known only at its end: an interrupted import starts over"
                );
            }
            None
        }
        (_, None) => {
            if plan.resume.is_some() {
                log::info!("{name}: the stream's length is not known: an interrupted import starts over");
            }
            None
        }
        (Some(_), Some(len)) => Some(Resumable::Stream(SourceId::stream(len, identity))),
    };
    let engine = Engine::open(plan, ctx, progress, size_hint, resumable)?;
    let dest = engine.dest();
    if engine.start() > 0 {
        log::info!(
            "{name}: a stream cannot be entered part-way: reading it again from its start, writing from offset {}",
            engine.start()
        );
    }
    let sizing = &ctx.sizing;
    let start = Start { offset: engine.start(), digest: engine.digest_prefix()?.map(|(hasher, _)| hasher) };
    let chunk = sizing.chunk as usize;
    let mut spooled = 0;
    let write = || {
        with_writer(dest, progress, start, sizing.stream_buffers(), chunk, |writer| match kind {
            Kind::Raw => {
                let consumed = || progress.note_stored(tap.bytes());
                raw(&mut stream, &name, writer, dest, stop, consumed, hold_footer)
            }
            Kind::Walked(walker) => {
                let mut spool = Spool::new(&name, plan.scratch.as_deref());
                let (size, stashed) = match stated_size {
                    Some(_) => (walker.walk)(&mut stream, &name, &mut spool, &mut Placer::new(writer), stop)?,
                    None => {
                        let mut placer = Growing { inner: Placer::new(writer), dest, progress };
                        (walker.walk)(&mut stream, &name, &mut spool, &mut placer, stop)?
                    }
                };
                spooled = stashed;
                Ok((size, walker.format_name))
            }
        })
    };
    let produced = engine.produce(write).and_then(|((virtual_size, format), written)| {
        // Read to the end of the stream: the checksum covers every byte, and a decompressor checks its trailer.
        let mut rest = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(stream_error(e, &name, tap.bytes())),
            }
        }
        if let Kind::Walked(walker) = kind {
            log::info!("{name}: spooled {} ({spooled} bytes) of the {} stream", human(spooled), walker.format_name);
        }
        Ok(Produced {
            output_digest: written.digest,
            compression: layers,
            spooled_bytes: spooled,
            ..Produced::new(format, virtual_size)
        })
    });
    let produced = produced.map_err(|e| super::engine::stop_wins(e, stop, &plan.destination));
    engine.finish(produced, verify)
}

/// How a stream is read forward: copied as the raw disk it is, or walked by its format's walker.
#[derive(Clone, Copy)]
enum Kind {
    Raw,
    Walked(&'static Walker),
}

/// Size of a VHD footer.
const FOOTER: u64 = 512;
/// Shortest stream whose tail is looked at for a fixed VHD footer (as the random-access detection does).
const MIN_FIXED_VHD: u64 = 2 * FOOTER;

/// A raw image: the stream is the disk; the destination grows as it arrives. With `hold_footer`, the last full
/// chunk waits for the next read, so the stream's last 512 bytes are still unwritten when it ends: a fixed VHD
/// footer there ([`vhd::is_fixed_footer`]) makes the image a vpc one, its data everything before the footer.
/// Returns the image size and format.
fn raw(
    reader: &mut dyn Read,
    name: &str,
    writer: &mut Writer,
    dest: &crate::sink::Destination,
    stop: &AtomicBool,
    mut consumed: impl FnMut(),
    hold_footer: bool,
) -> Result<(u64, &'static str)> {
    let chunk = writer.chunk();
    // Guest offset of the next byte to submit.
    let mut guest = 0u64;
    let submit = |writer: &mut Writer, buf: AlignedBuf, len: usize, guest: &mut u64| -> Result<()> {
        if len == 0 {
            writer.give_back(buf);
            return Ok(());
        }
        dest.grow(*guest + len as u64)?;
        writer.submit(Item::Data { guest: *guest, buf, len })?;
        *guest += len as u64;
        Ok(())
    };
    // The last full chunk read, not yet submitted (only while holding the footer back).
    let mut pending: Option<AlignedBuf> = None;
    let (last, n) = loop {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::interrupted(dest.path(), guest));
        }
        let mut buf = writer.buffer()?.expect("the raw copy holds at most one buffer of a pool of two or more");
        let n = read_full(reader, &mut buf[..chunk]).map_err(|e| stream_error(e, name, guest))?;
        if n > 0 {
            consumed();
        }
        if n < chunk {
            break (buf, n);
        }
        if !hold_footer {
            submit(writer, buf, n, &mut guest)?;
        } else if let Some(previous) = pending.replace(buf) {
            submit(writer, previous, chunk, &mut guest)?;
        }
    };
    // The stream ended: `last[..n]` is its end, after `pending` (a full chunk) if that is held.
    let held = pending.as_ref().map_or(0, |_| chunk);
    let total = guest + (held + n) as u64;
    let footer = (hold_footer && total >= MIN_FIXED_VHD).then(|| {
        let mut footer = [0u8; FOOTER as usize];
        let from_last = n.min(FOOTER as usize);
        let from_pending = FOOTER as usize - from_last;
        if let Some(previous) = &pending {
            footer[..from_pending].copy_from_slice(&previous[chunk - from_pending..chunk]);
        }
        footer[from_pending..].copy_from_slice(&last[n - from_last..n]);
        footer
    });
    let data_len = total.saturating_sub(FOOTER);
    let Some(footer) = footer.filter(|f| vhd::is_fixed_footer(f, data_len)) else {
        if let Some(previous) = pending {
            submit(writer, previous, chunk, &mut guest)?;
        }
        // A disk is whole sectors: qemu-img pads a raw image's last partial sector with zeros, and so do we.
        let mut last = last;
        let padded = n.next_multiple_of(512).min(chunk);
        last[n..padded].fill(0);
        submit(writer, last, padded, &mut guest)?;
        if hold_footer {
            super::note_headerless(name, total, guest);
        }
        return Ok((guest, "raw"));
    };
    let footer = vhd::parse_footer(&footer).map_err(|e| e.within(data_len).at_path(name))?;
    let size = footer.virtual_size();
    if size < data_len {
        return Err(crate::bad_image!(
            "fixed vhd read as a stream: its geometry gives {size} bytes, less than its {data_len} bytes of data; import it from a random-access source (a local file, or a server that supports \
             Range requests)"
        )
        .at_offset(data_len)
        .at_path(name));
    }
    log::info!("{name}: the stream ends with a fixed vhd footer: read as vpc, {size} bytes");
    let cut = FOOTER as usize - n.min(FOOTER as usize);
    if let Some(previous) = pending {
        submit(writer, previous, chunk - cut, &mut guest)?;
    }
    submit(writer, last, n - (FOOTER as usize - cut), &mut guest)?;
    if size > data_len {
        // Guest space past the data reads as zeros, as in the random-access reader.
        dest.grow(size)?;
        writer.submit_zero(data_len, size - data_len)?;
    }
    Ok((size, "vpc"))
}

/// A [`Placer`] for a walker that learns the virtual size only after reading ahead (vhdx keeps it in its
/// metadata region): the destination, opened empty, grows to it when the walker announces it.
struct Growing<'a, 'w> {
    inner: Placer<'w>,
    dest: &'a crate::sink::Destination,
    progress: &'a Progress,
}

impl Placement for Growing<'_, '_> {
    fn chunk(&self) -> u64 {
        self.inner.chunk()
    }

    fn begin(&mut self, virtual_size: u64) -> Result<()> {
        self.dest.grow(virtual_size)?;
        self.progress.set_total(virtual_size);
        self.inner.begin(virtual_size)
    }

    fn data(&mut self, guest: u64, bytes: &[u8]) -> Result<bool> {
        self.inner.data(guest, bytes)
    }

    fn zero(&mut self, guest: u64, len: u64) -> Result<()> {
        self.inner.zero(guest, len)
    }

    fn has_buffer(&self, guest: u64) -> bool {
        self.inner.has_buffer(guest)
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }
}
