//! The random-access driver: the format maps guest space to extents, the pipeline's scheduler cuts them into
//! chunks and its workers fill and write them, in any order, from a source that can be read anywhere.

use super::engine::{Engine, Produced, Resumable};
use super::{Context, Outcome, Plan};
use crate::checksum::Checksum;
use crate::error::Result;
use crate::format::{self, BackingPolicy};
use crate::pipeline::{self, schedule::Scheduler};
use crate::progress::Progress;
use crate::size::human;
use crate::source::files::{LocalFiles, Opener};
use crate::source::{HashingSource, ReadAt};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A source read anywhere.
pub(super) struct Random<'p> {
    /// Its bytes.
    pub source: Arc<dyn ReadAt>,
    /// For a local image: the opener of the files it names.
    pub local: Option<LocalFiles>,
    /// The checksum to verify over the source's bytes (a tap then reads it whole, in order).
    pub checksum: Option<&'p Checksum>,
    /// Read in offset order (a network source reads best front to back).
    pub serial: bool,
}

/// Imports `input` for `plan`.
pub(super) fn import(
    ctx: &Context,
    plan: &Plan,
    input: Random,
    progress: &Progress,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let file = input.source;
    let tap = input.checksum.map(|c| Arc::new(HashingSource::new(file.clone(), c.algorithm)));
    let source: Arc<dyn ReadAt> = match &tap {
        Some(tap) => tap.clone(),
        None => file.clone(),
    };
    let files = input.local.map(|local| Arc::new(local) as Arc<dyn Opener>);
    let rebase = plan.delta.as_ref().map(|delta| delta.rebase(&plan.destination)).transpose()?;
    let policy = BackingPolicy { allow: plan.allow_backing, files, rebase };
    let mut image = format::open(source, &policy)?;
    let virtual_size = image.virtual_size();
    let format_name = image.format_name();
    match format_name {
        "raw" => super::note_headerless(&plan.source.to_string(), file.len(), virtual_size),
        _ => log::info!(
            "{}: {format_name} image, virtual size {virtual_size} bytes ({})",
            plan.source,
            human(virtual_size)
        ),
    }
    // The whole mapping is read once before the destination is touched: a table pointing outside the file, or
    // any other error in it, fails here. Through an image of its own when the source is tapped: the tap wants
    // its reads in order.
    match &tap {
        Some(_) => validate_mapping(format::open(file.clone(), &policy)?.as_mut())?,
        None => validate_mapping(image.as_mut())?,
    }

    progress.set_total(virtual_size);
    // A delta is never resumed: rerun, it writes the same bytes again.
    let resumable = plan.delta.is_none().then_some(Resumable::Random(file.as_ref()));
    let engine = Engine::open(plan, ctx, progress, virtual_size, resumable)?;
    let sizing = ctx.sizing;
    let config = pipeline::Config {
        workers: sizing.workers,
        chunk: sizing.chunk,
        serial_reads: tap.is_some() || input.serial,
        // A delta writes part of the image: there is no whole output to digest.
        output_digest: if plan.delta.is_some() { None } else { engine.digest_prefix()? },
    };
    let scheduler = match plan.delta {
        Some(_) => Scheduler::delta(image, sizing.chunk, engine.dest().block()),
        None => Scheduler::starting_at(image, sizing.chunk, engine.start()),
    };
    let produced =
        engine.produce(|| pipeline::run(scheduler, engine.dest(), &config, progress, stop)).map(|run| Produced {
            output_digest: run.output_digest,
            source_bytes_read: file.bytes_read(),
            ..Produced::new(format_name, virtual_size)
        });
    let name = plan.source.to_string();
    engine.finish(produced, || match (input.checksum, &tap) {
        (Some(expected), Some(tap)) => {
            let hashed = tap.finish()?;
            if hashed.gap_bytes > 0 {
                log::debug!("read {} extra to checksum the source", human(hashed.gap_bytes));
            }
            expected.verify(&hashed.digest, &name)?;
            Ok(Some(expected.to_string()))
        }
        _ => Ok(None),
    })
}

/// Guest bytes mapped per call when validating: from 16 MiB, doubling while the image maps as one extent per
/// call (unallocated or contiguous), to at most 256 MiB, so the extents of even the most fragmented window (512 B
/// clusters) stay around 20 MB.
const VALIDATE_WINDOW: (u64, u64) = (16 << 20, 256 << 20);

/// Map calls the validation may make: 16 TiB of guest space at the largest window. An image whose virtual size is
/// beyond that (a hostile header claiming an exabyte) is checked as far as that and then as it is written, where
/// the destination's own size limit refuses it first.
const VALIDATE_CALLS: u64 = 1 << 16;

/// Maps the guest space of `image` once, keeping nothing: costs one pass over its metadata (a qcow2's L2 tables
/// are 1/8192 of its virtual size at 64 KiB clusters), read without page cache like everything else.
fn validate_mapping(image: &mut dyn format::Image) -> Result<()> {
    let size = image.virtual_size();
    let (smallest, largest) = VALIDATE_WINDOW;
    let mut window = smallest;
    let mut extents = Vec::new();
    let mut at = 0;
    for _ in 0..VALIDATE_CALLS {
        if at >= size {
            return Ok(());
        }
        let len = window.min(size - at);
        extents.clear();
        image.map(at, len, &mut extents)?;
        window = if extents.len() <= 1 { (window * 2).min(largest) } else { smallest };
        at += len;
    }
    log::debug!("mapping checked ahead up to guest offset {at:#x}; the rest is checked as it is written");
    Ok(())
}
