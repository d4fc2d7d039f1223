//! Forward-only imports: a source that can only be read front to back (a compressed image, a server without Range
//! support) is unwrapped layer by layer, its format detected from its first bytes, and then:
//! - raw: copied chunk by chunk ([`raw`]); the image is as long as the stream;
//! - qcow2: walked cluster by cluster ([`qcow2::stream`]), spooling only data seen before the table that maps it;
//! - streamOptimized vmdk: walked marker by marker ([`vmdk::stream`]);
//! - anything else (vhd, vhdx, vdi, sparse vmdk): spooled whole to `--scratch` and imported from there by the
//!   random-access driver.
//!
//! The walkers place guest bytes into the pipeline's chunk assembler, whose writer thread writes through the same
//! destination and zero-run splitting as the random-access workers, from a fixed pool of chunk buffers. The source
//! checksum is a tap on the bytes as they arrive, before decompression.

use super::engine::{Engine, Produced};
use super::random::{self, Random};
use super::{Context, Outcome, Plan};
use crate::budget::xz_memlimit;
use crate::checksum::Algorithm;
use crate::error::{Error, Result};
use crate::format::detect::{detect_bytes, Detected};
use crate::format::{qcow2, vmdk};
use crate::pipeline::assemble::Placer;
use crate::pipeline::spool::{self, Spool};
use crate::pipeline::writer::{with_writer, Item, Writer};
use crate::progress::Progress;
use crate::size::human;
use crate::source::decompress::{unwrap_layers, Compression};
use crate::source::sequential::{read_full, stream_error, HashingReader, StreamTap};
use crate::source::{FileSource, ReadAt};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Imports the stream `reader` (`len` bytes as stored, if known) for `plan`.
pub(super) fn import(
    ctx: &Context,
    plan: &Plan,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let name = plan.source.to_string();
    if plan.resume.is_some() {
        log::info!("{name}: resuming is not available for a source read as a stream; importing from the start");
    }
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
        Detected::Qcow2 => Some(Kind::Qcow2),
        Detected::Vmdk if vmdk::stream::is_stream_optimized(&head) => Some(Kind::Vmdk),
        _ => None,
    };
    let Some(kind) = streamed else {
        // Formats that need random access: spool the whole (decompressed) image, then import it from there.
        let what = match &detected {
            Detected::Unsupported(what) => {
                return Err(Error::unsupported(format!("unsupported image format: {what}")).at_path(&name))
            }
            Detected::Vmdk => "a sparse vmdk",
            Detected::Vhd => "a vhd",
            Detected::Vhdx => "a vhdx",
            Detected::Vdi => "a vdi",
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

    let raw_unknown_size = kind == Kind::Raw && !(layers.is_empty() && len.is_some());
    let size_hint = match kind {
        Kind::Raw if !raw_unknown_size => len.unwrap_or(0),
        Kind::Raw => 0,
        // The walkers check the headers fully; the destination only needs the size.
        Kind::Qcow2 => u64::from_be_bytes(head[24..32].try_into().expect("a qcow2 header")) & !511,
        Kind::Vmdk => u64::from_le_bytes(head[12..20].try_into().expect("a vmdk header")).saturating_mul(512),
    };
    // Progress: against the virtual size the header gives (qcow2, vmdk) or the raw stream's length; a compressed
    // raw stream's size is known only at its end, so its progress is the share of the source consumed.
    match (kind, raw_unknown_size) {
        (Kind::Raw, true) => progress.set_stored_total(len.unwrap_or(0)),
        _ => progress.set_total(size_hint),
    }
    let engine = Engine::open(plan, ctx, progress, size_hint, None)?;
    let dest = engine.dest();
    let sizing = &ctx.sizing;
    let digest = plan.output_digest.then_some(Algorithm::Sha256);
    let chunk = sizing.chunk as usize;
    let mut spooled = 0;
    let produced = with_writer(dest, progress, digest, sizing.stream_buffers(), chunk, |writer| match kind {
        Kind::Raw => {
            let disk = raw(&mut stream, &name, writer, dest, stop, || progress.note_stored(tap.bytes()))?;
            if !plan.verbatim {
                super::note_headerless(&name, disk.len, disk.size);
            }
            Ok(disk.size)
        }
        Kind::Qcow2 => {
            let mut spool = Spool::new(&name, plan.scratch.as_deref());
            let stats = qcow2::stream::walk(&mut stream, &name, &mut spool, &mut Placer::new(writer), stop)?;
            spooled = stats.spooled;
            Ok(stats.virtual_size)
        }
        Kind::Vmdk => vmdk::stream::walk(&mut stream, &name, &mut Placer::new(writer), stop),
    });
    let produced = produced.and_then(|(virtual_size, written)| {
        // Read to the end of the stream: the checksum covers every byte, and a decompressor checks its trailer.
        let mut rest = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(stream_error(e, &name, tap.bytes())),
            }
        }
        if kind == Kind::Qcow2 {
            log::info!("{name}: spooled {} ({spooled} bytes) of the qcow2 stream", human(spooled));
        }
        Ok(Produced {
            output_digest: written.digest,
            compression: layers,
            spooled_bytes: spooled,
            ..Produced::new(kind.format_name(), virtual_size)
        })
    });
    engine.finish(produced, verify)
}

/// The formats read forward only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2,
    Vmdk,
}

impl Kind {
    fn format_name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
            Kind::Vmdk => "vmdk",
        }
    }
}

/// What a raw stream made: its length, and the disk (whole sectors).
struct RawDisk {
    len: u64,
    size: u64,
}

/// A raw image: the stream is the disk; the destination grows as it arrives.
fn raw(
    reader: &mut dyn Read,
    name: &str,
    writer: &mut Writer,
    dest: &crate::sink::Destination,
    stop: &AtomicBool,
    mut consumed: impl FnMut(),
) -> Result<RawDisk> {
    let chunk = writer.chunk();
    let (mut guest, mut len) = (0u64, 0u64);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::interrupted(dest.path(), guest));
        }
        let mut buf = writer.buffer()?.expect("the raw copy holds no buffer");
        let n = read_full(reader, &mut buf[..chunk]).map_err(|e| stream_error(e, name, guest))?;
        if n == 0 {
            writer.give_back(buf);
            break;
        }
        consumed();
        // A disk is whole sectors: qemu-img pads a raw image's last partial sector with zeros, and so do we.
        let padded = n.next_multiple_of(512).min(chunk);
        buf[n..padded].fill(0);
        dest.grow(guest + padded as u64)?;
        writer.submit(Item::Data { guest, buf, len: padded })?;
        len += n as u64;
        guest += padded as u64;
        if n < chunk {
            break;
        }
    }
    Ok(RawDisk { len, size: guest })
}
