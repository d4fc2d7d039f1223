//! Forward-only imports: a source that can only be read front to back (a compressed image, a server without Range
//! support) is unwrapped layer by layer, its format detected from its first bytes, and then:
//! - raw: copied chunk by chunk ([`raw`]); the image is as long as the stream;
//! - qcow2: walked cluster by cluster ([`qcow2`]), spooling only data seen before the table that maps it;
//! - streamOptimized vmdk: walked marker by marker ([`vmdk`]);
//! - anything else (vhd, vhdx, vdi, sparse vmdk): spooled whole to `--scratch` and imported from there.
//!
//! Writes go through the same destination and zero-run splitting as the random-access pipeline, from a fixed pool
//! of chunk buffers ([`writer`]). The source checksum is a tap on the bytes as they arrive, before decompression.

pub mod assemble;
pub mod qcow2;
pub mod spool;
pub mod vmdk;
pub mod writer;

use crate::checksum::{hex, Algorithm};
use crate::error::{Error, ErrorKind, Result};
use crate::format::detect::{detect_bytes, Detected};
use crate::import::{self, Context, Outcome, Plan};
use crate::progress::Progress;
use crate::size::human;
use crate::source::decompress::{unwrap_layers, Compression};
use crate::source::sequential::{read_full, stream_error, HashingReader, StreamTap};
use crate::source::{FileSource, ReadAt};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use writer::{with_writer, Item, Writer};

/// Memory an xz decoder may use for this budget: a quarter of it, between 16 and 72 MiB (enough for `xz -9`'s
/// 64 MiB dictionary when the budget allows, refused with a clear error otherwise).
pub fn xz_memlimit(budget: u64) -> u64 {
    (budget / 4).clamp(16 << 20, 72 << 20)
}

/// Imports the stream `reader` (`len` bytes as stored, if known) for `plan`.
pub fn import(
    plan: &Plan,
    ctx: &Context,
    reader: Box<dyn Read + Send>,
    len: Option<u64>,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let name = plan.source.to_string();
    if plan.resume.is_some() {
        log::warn!("{name}: --resume is not available for a source read as a stream; importing from the start");
    }
    let tap = StreamTap::new(plan.checksum.as_ref().map(|c| c.algorithm));
    let tapped = Box::new(HashingReader::new(reader, tap.clone()));
    let (mut stream, layers) = unwrap_layers(tapped, &name, xz_memlimit(ctx.budget.bytes))?;
    let head = stream.peek(512).map_err(|e| stream_error(e, &name, 0))?.to_vec();
    let detected = detect_bytes(&head);
    let wrapped = layers.iter().map(Compression::to_string).collect::<Vec<_>>().join(" in ");
    log::info!(
        "{name}: read as a stream{}{}",
        if wrapped.is_empty() { String::new() } else { format!(", {wrapped}-compressed") },
        len.map_or(String::new(), |l| format!(", {l} bytes ({})", human(l)))
    );
    let verify = |outcome: &mut Outcome| -> Result<()> {
        if let Some(expected) = &plan.checksum {
            let digest = tap.finish().unwrap_or_default();
            expected.verify(&digest, &name)?;
            outcome.source_checksum = Some(expected.to_string());
        }
        Ok(())
    };

    let streamed = match detected {
        Detected::Raw => Some(Kind::Raw),
        Detected::Qcow2 => Some(Kind::Qcow2),
        Detected::Vmdk if vmdk::is_stream_optimized(&head) => Some(Kind::Vmdk),
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
            return Err(Error::unsupported(format!(
                "{what} image read as a stream (compressed, or from a server without Range support) needs random access: pass --scratch DIR to spool it there first"
            ))
            .at_path(&name));
        };
        let (file, spooled) = spool::spool_all(&mut stream, &name, dir, stop)?;
        log::info!("{name}: spooled {} ({spooled} bytes) to {}", human(spooled), file.path().display());
        let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(file.path())?);
        // The source is fully read: check it before anything is written.
        let mut placeholder = None::<String>;
        if let Some(expected) = &plan.checksum {
            expected.verify(&tap.finish().unwrap_or_default(), &name)?;
            placeholder = Some(expected.to_string());
        }
        let mut outcome = import::import_random(plan, ctx, source, None, None, true, progress, stop)?;
        outcome.source = plan.source.clone();
        outcome.source_checksum = placeholder;
        outcome.spooled_bytes = spooled;
        outcome.compression = layers;
        return Ok(outcome);
    };

    let raw_unknown_size = kind == Kind::Raw && !(layers.is_empty() && len.is_some());
    let size_hint = match kind {
        Kind::Raw if !raw_unknown_size => len.unwrap_or(0),
        Kind::Raw => 0,
        // The drivers check the headers fully; the destination only needs the size.
        Kind::Qcow2 => u64::from_be_bytes(head[24..32].try_into().expect("a qcow2 header")) & !511,
        Kind::Vmdk => u64::from_le_bytes(head[12..20].try_into().expect("a vmdk header")).saturating_mul(512),
    };
    let dest = import::open_destination(plan, ctx, size_hint, false)?;
    log::info!("{}: writing {} ({})", plan.destination.display(), dest.io_name(), dest.io_reason);
    let sizing = &ctx.sizing;
    let digest = plan.output_digest.then_some(Algorithm::Sha256);
    let chunk = sizing.chunk as usize;
    let mut spooled = 0;
    let produced = with_writer(&dest, progress, digest, sizing.workers.max(2), chunk, |writer| match kind {
        Kind::Raw => {
            if !raw_unknown_size {
                progress.set_total(size_hint);
            }
            raw(&mut stream, &name, writer, &dest, stop)
        }
        Kind::Qcow2 => {
            // The header's virtual size: the writer advances over data and zeros alike.
            progress.set_total(size_hint);
            let stats = qcow2::import(&mut stream, &name, plan.scratch.as_deref(), writer, stop)?;
            spooled = stats.spooled;
            Ok(stats.virtual_size)
        }
        Kind::Vmdk => {
            progress.set_total(size_hint);
            vmdk::import(&mut stream, &name, writer, stop)
        }
    });
    let format_name = match kind {
        Kind::Raw => "raw",
        Kind::Qcow2 => "qcow2",
        Kind::Vmdk => "vmdk",
    };
    let produced = produced.and_then(|(size, written)| {
        // Read to the end of the stream: the checksum covers every byte, and a decompressor checks its trailer.
        let mut rest = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(stream_error(e, &name, tap.bytes())),
            }
        }
        Ok((size, written))
    });
    if let Err(err) = &produced {
        if err.kind() == ErrorKind::Interrupted {
            dest.finish()?;
        } else if err.kind() == ErrorKind::ChecksumMismatch {
            // A source that failed its own verification (a registry layer's digest) wrote the wrong bytes.
            discard(&dest, err);
        }
    }
    let (virtual_size, written) = produced?;
    let governor = dest.finish()?;
    if kind == Kind::Qcow2 {
        log::info!("{name}: spooled {} ({spooled} bytes) of the qcow2 stream", human(spooled));
    }
    let mut outcome = import::outcome_of(
        plan,
        ctx,
        &dest,
        format_name,
        virtual_size,
        progress,
        written.digest.as_deref().map(hex),
        governor,
    );
    outcome.spooled_bytes = spooled;
    outcome.compression = layers;
    if let Err(mismatch) = verify(&mut outcome) {
        discard(&dest, &mismatch);
        return Err(mismatch);
    }
    Ok(outcome)
}

/// After a checksum mismatch: what was written came from the wrong bytes, so throw it away.
pub(crate) fn discard(dest: &crate::sink::Destination, why: &Error) {
    log::warn!("{why}; discarding what was written to {}", dest.path().display());
    if let Err(e) = dest.discard() {
        log::warn!("could not discard the written image: {e}");
    }
}

/// The formats read forward only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2,
    Vmdk,
}

/// A raw image: the stream is the disk; the destination grows as it arrives. Returns the image size.
fn raw(
    reader: &mut dyn Read,
    name: &str,
    writer: &mut Writer,
    dest: &crate::sink::Destination,
    stop: &AtomicBool,
) -> Result<u64> {
    let chunk = writer.chunk();
    let mut guest = 0u64;
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
        dest.grow(guest + n as u64)?;
        writer.submit(Item::Data { guest, buf, len: n })?;
        guest += n as u64;
        if n < chunk {
            break;
        }
    }
    Ok(guest)
}
