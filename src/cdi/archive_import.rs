//! `IMPORTER_CONTENTTYPE=archive`: the archive job ([`crate::import::archive`]) fed from the endpoint.

use super::env::CdiEnv;
use super::termination::TerminationMessage;
use super::{Context, Finish};
use crate::error::{ErrorKind, Result};
use crate::import::archive::{run_archive, Archive};
use crate::sink::volume::Volume;
use crate::source::open::Input;
use crate::source::sequential::ReadAtReader;
use crate::source::{HttpOptions, Location};
use std::io::Read;

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
        let (reader, length) = match open_stream(&location, &http) {
            Ok(opened) => opened,
            Err(e) => return Finish::Failure(format!("Unable to process data: {e}")),
        };
        let archive = Archive { name: &name, dir, checksum: env.checksum.as_ref(), verbatim: false };
        match run_archive(self.engine, &archive, reader, length, self.progress, self.stop) {
            // CDI never preallocates an extracted archive.
            Ok(_) => Finish::Success(TerminationMessage::import_complete(false)),
            Err(e) if e.kind() == ErrorKind::ChecksumMismatch => {
                Finish::ChecksumMismatch(format!("Unable to process data: {e}"))
            }
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
