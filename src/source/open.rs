//! Opening a [`Location`]: random access where the bytes allow it (a local file, an HTTP server honouring Range),
//! a forward-only stream otherwise (an HTTP server without Range, or any compressed wrapper).

use super::decompress::{sniff, SNIFF_LEN};
use super::http::{self, Client, Remote};
use super::sequential::ReadAtReader;
use super::{FileSource, HttpOptions, Location, ReadAt};
use crate::error::Result;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

/// How the source's bytes can be read.
pub enum Input {
    /// Random access.
    Random {
        /// The bytes.
        source: Arc<dyn ReadAt>,
        /// Path of a local image, beside which its backing and extent files are found.
        local_path: Option<PathBuf>,
    },
    /// Front to back only, compressed or not (unwrapping is the stream importer's job).
    Stream {
        /// The bytes as stored.
        reader: Box<dyn Read + Send>,
        /// Their number, when known.
        len: Option<u64>,
        /// What names their contents (a file's modification time, an ETag, a registry manifest digest), for
        /// recognising the same source when resuming.
        identity: Option<String>,
    },
}

/// An opened source.
pub struct Opened {
    /// Its bytes.
    pub input: Input,
    /// The HTTP client, for a URL (its request count goes into the report).
    pub client: Option<Arc<Client>>,
}

/// Opens a URL, or an object through the HTTP source with signed requests.
fn open_remote(location: &Location, options: &HttpOptions) -> Result<(Arc<Client>, Remote)> {
    match location {
        Location::Object(object) => super::object::open(object, options),
        Location::Url(url) => http::open(url, options),
        _ => unreachable!("only URLs and objects are remote"),
    }
}

/// Opens `location`; a random-access source whose first bytes are a compression magic becomes a stream.
pub fn open(location: &Location, options: &HttpOptions) -> Result<Opened> {
    let (source, local_path, client): (Arc<dyn ReadAt>, _, _) = match location {
        Location::Path(path) => (Arc::new(FileSource::open(path)?), Some(path.clone()), None),
        Location::Registry(image) => {
            let disk = super::registry::open(image, options)?;
            return Ok(Opened {
                input: Input::Stream { reader: disk.reader, len: Some(disk.len), identity: Some(disk.identity) },
                client: disk.client,
            });
        }
        Location::Imageio(urls) => {
            let (client, source) = super::imageio::open(urls, options)?;
            (source, None, Some(client))
        }
        Location::Url(_) | Location::Object(_) => match open_remote(location, options)? {
            (client, Remote::Random(source)) => (source, None, Some(client)),
            (client, Remote::Stream(stream)) => {
                let (len, identity) = (stream.total(), stream.identity());
                return Ok(Opened { input: Input::Stream { reader: stream, len, identity }, client: Some(client) });
            }
        },
    };
    let mut head = [0u8; SNIFF_LEN];
    let got = source.read_at(0, &mut head)?;
    if let Some(kind) = sniff(&head[..got]) {
        log::debug!("{}: {kind}-compressed; reading it as a stream", source.name());
        let (len, identity) = (Some(source.len()), source.identity());
        let reader = Box::new(ReadAtReader::new(source));
        return Ok(Opened { input: Input::Stream { reader, len, identity }, client });
    }
    Ok(Opened { input: Input::Random { source, local_path }, client })
}
