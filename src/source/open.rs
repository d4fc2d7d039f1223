//! Opening a [`Location`]: random access where the bytes allow it (a local file, an HTTP server honouring Range),
//! a forward-only stream otherwise (an HTTP server without Range, or any compressed wrapper).

use super::decompress::{sniff, SNIFF_LEN};
use super::http::{Client, Remote};
use super::sequential::ReadAtReader;
use super::{HttpOptions, Location, ReadAt};
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

impl Opened {
    /// A random-access source.
    pub(crate) fn random(source: Arc<dyn ReadAt>, local_path: Option<PathBuf>, client: Option<Arc<Client>>) -> Self {
        Opened { input: Input::Random { source, local_path }, client }
    }
}

impl From<(Arc<Client>, Remote)> for Opened {
    /// A URL (or an object read through the HTTP source) as the server lets it be read.
    fn from((client, remote): (Arc<Client>, Remote)) -> Self {
        match remote {
            Remote::Random(source) => Opened::random(source, None, Some(client)),
            Remote::Stream(stream) => {
                let (len, identity) = (stream.total(), stream.identity());
                Opened { input: Input::Stream { reader: stream, len, identity }, client: Some(client) }
            }
        }
    }
}

/// Opens `location`; a random-access source whose first bytes are a compression magic becomes a stream.
pub fn open(location: &Location, options: &HttpOptions) -> Result<Opened> {
    let opened = location.reach(options)?;
    let Input::Random { source, .. } = &opened.input else {
        return Ok(opened);
    };
    let mut head = [0u8; SNIFF_LEN];
    let got = source.read_at(0, &mut head)?;
    if let Some(kind) = sniff(&head[..got]) {
        log::debug!("{}: {kind}-compressed; reading it as a stream", source.name());
        let (len, identity) = (Some(source.len()), source.identity());
        let reader = Box::new(ReadAtReader::new(source.clone()));
        return Ok(Opened { input: Input::Stream { reader, len, identity }, client: opened.client });
    }
    Ok(opened)
}
