//! `IMPORTER_CONTENTTYPE=archive`: a tar stream (compressed or not) extracted into the data directory.

use super::dest::{self, Volume};
use super::env::CdiEnv;
use super::termination::TerminationMessage;
use super::{archive, Context, Finish};
use crate::budget::xz_memlimit;
use crate::error::{Error, Result};
use crate::source::decompress::unwrap_layers;
use crate::source::open::Input;
use crate::source::sequential::{HashingReader, ReadAtReader, StreamTap};
use crate::source::{HttpOptions, Location};
use std::io::Read;
use std::sync::atomic::AtomicBool;

impl Context<'_> {
    /// `IMPORTER_CONTENTTYPE=archive`: a tar stream extracted into the data directory.
    pub(super) fn import_archive(&self, env: &CdiEnv, volume: &Volume, location: Location) -> Finish {
        let Volume::Filesystem(dir) = volume else {
            return Finish::Failure(
                "Unable to process data: content type archive needs a filesystem volume, not a block volume".into(),
            );
        };
        let http = match super::connect::http_options(&self.args.proxy_cert_dir, &self.args.extra_headers_dir, env) {
            Ok(http) => http,
            Err(message) => return Finish::Failure(message),
        };
        let name = location.to_string();
        let (raw, length) = match open_stream(&location, &http) {
            Ok(opened) => opened,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        self.progress.set_total(length.unwrap_or(0));
        // The checksum and the progress follow the bytes as downloaded, before any decompression.
        let tap = StreamTap::new(env.checksum.as_ref().map(|c| c.algorithm));
        let budget = self.engine.budget.bytes;
        let tapped = Box::new(HashingReader::new(raw, tap.clone()));
        let (stream, layers) = match unwrap_layers(tapped, &name, xz_memlimit(budget)) {
            Ok(unwrapped) => unwrapped,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        if !layers.is_empty() {
            let wrapped: Vec<String> = layers.iter().map(ToString::to_string).collect();
            log::info!("{name}: {}-compressed archive", wrapped.join(" in "));
        }
        let mut reader = StopReader { inner: stream, stop: self.stop };
        let pacing = archive::Pacing { cgroup: self.engine.cgroup.clone(), targets: self.pacing_targets() };
        let mut reported = 0u64;
        let extracted = archive::extract(&mut reader, dir, &pacing, |_| {
            let position = tap.bytes();
            if position > reported {
                self.progress.advance(position - reported, position);
                reported = position;
            }
        })
        .and_then(|extracted| {
            // The checksum covers every downloaded byte (the archive's end padding too), and a decompressor
            // checks its trailer.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| Error::io("reading the archive's end", e))?;
            Ok(extracted)
        });
        let extracted = match extracted {
            Ok(extracted) => extracted,
            Err(e) => {
                return Finish::Failure(format!("Unable to process data: unable to untar files from endpoint: {e}"))
            }
        };
        if let Some(expected) = &env.checksum {
            if let Err(e) = expected.verify(&tap.finish().unwrap_or_default(), &name) {
                if let Err(remove) = dest::remove_dir_contents(dir) {
                    log::warn!("{remove}");
                }
                return Finish::ChecksumMismatch(format!("Unable to process data: {e}"));
            }
        }
        log::info!("{extracted}");
        self.progress.note_written(extracted.bytes_written);
        match dest::sync_filesystem(dir) {
            // CDI never preallocates an extracted archive.
            Ok(()) => Finish::Success(TerminationMessage::import_complete(false)),
            Err(e) => Finish::Failure(format!("Unable to process data: {e}")),
        }
    }
}

/// Opens the archive stream (a local file or a URL), as stored: the reader and its length when known.
fn open_stream(location: &Location, http: &HttpOptions) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    let opened = crate::source::open::open(location, http)?;
    Ok(match opened.input {
        Input::Random { source, .. } => {
            let len = source.len();
            (Box::new(ReadAtReader::new(source)), Some(len))
        }
        Input::Stream { reader, len, .. } => (reader, len),
    })
}

/// Stops reading when the import is interrupted.
struct StopReader<'a, R> {
    inner: R,
    stop: &'a AtomicBool,
}

impl<R: Read> Read for StopReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: read_exact would retry that forever.
            return Err(std::io::Error::other("import stopped by a signal"));
        }
        self.inner.read(buf)
    }
}
