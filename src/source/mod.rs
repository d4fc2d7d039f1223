//! Byte sources: where image bytes come from. Formats read through the [`ReadAt`] trait and never see a file
//! descriptor, so the same parser serves a local file, a backing file, or an HTTP range reader. A [`Location`]
//! names a source; [`HttpOptions`] say how to reach a URL.

pub mod decompress;
mod file;
pub mod files;
mod hashing;
pub(crate) mod http;
pub mod imageio;
pub mod object;
pub(crate) mod open;
pub mod registry;
pub(crate) mod sequential;
pub(crate) mod tar;
mod zip;

pub use file::FileSource;
pub use hashing::HashingSource;

use crate::error::Result;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Location {
    /// A local file or block device.
    Path(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
    /// A containerDisk: `docker://…` or `oci-archive:…`.
    Registry(registry::ImageRef),
    /// A disk behind an oVirt image transfer, served by an imageio daemon.
    Imageio(imageio::TransferUrls),
    /// An object in an S3 or GCS bucket: `s3://…`, `gs://…`.
    Object(object::ObjectRef),
}

impl Location {
    /// A URL when `text` starts with `http://` or `https://`, an object for `s3://` and `gs://`, else a path.
    pub fn parse(text: &str) -> Location {
        let lower = text.to_ascii_lowercase();
        if let Some(Ok(object)) = object::ObjectRef::parse_uri(text) {
            Location::Object(object)
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            Location::Url(text.to_string())
        } else if registry::ImageRef::is_image(text) {
            Location::Registry(registry::ImageRef::new(text))
        } else {
            Location::Path(PathBuf::from(text))
        }
    }
}

impl Location {
    /// Opens the source, as its own module does: the one place a source kind is dispatched (`open::open` then
    /// reads compressed random-access bytes as a stream).
    fn reach(&self, options: &HttpOptions) -> Result<open::Opened> {
        use open::Opened;
        Ok(match self {
            Location::Path(path) => Opened::random(Arc::new(FileSource::open(path)?), Some(path.clone()), None),
            Location::Url(url) => http::open(url, options)?.into(),
            Location::Registry(image) => registry::open(image, options)?.into(),
            Location::Imageio(urls) => {
                let (client, source) = imageio::open(urls, options)?;
                Opened::random(source, None, Some(client))
            }
            Location::Object(object) => object::open(object, options)?.into(),
        })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Path(path) => write!(f, "{}", path.display()),
            Location::Url(url) => f.write_str(url),
            Location::Registry(image) => write!(f, "{image}"),
            Location::Imageio(urls) => f.write_str(urls.primary()),
            Location::Object(object) => write!(f, "{object}"),
        }
    }
}

/// How to reach HTTP(S) sources.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Directories of extra PEM CA certificates trusted besides the system roots.
    pub ca_dirs: Vec<PathBuf>,
    /// Skip TLS certificate verification.
    pub insecure: bool,
    /// Basic-auth user name (also taken from the URL's userinfo).
    pub username: Option<String>,
    /// Basic-auth password.
    pub password: Option<String>,
    /// Extra request headers, `Name: value`.
    pub headers: Vec<(String, String)>,
    /// A transfer that delivers no byte for this long fails.
    pub stall_timeout: Duration,
    /// Reconnections (with Range) after a dropped connection before giving up.
    pub retries: u32,
    /// Object-store settings (S3 endpoint, region, addressing).
    pub object: object::ObjectOptions,
    /// The front end's stop flag (raised by SIGTERM/SIGINT): a download blocked on the network ends at once with
    /// an interruption when it is raised.
    pub stop: Option<&'static AtomicBool>,
    /// Connections for parallel range requests: `None` adapts (a slow start up to a cap), `Some(1)` reads over one
    /// connection as a plain stream would.
    pub connections: Option<usize>,
    /// Bytes the parallel range requests' reorder window may hold (the engine sizes it from the memory budget).
    pub range_window: u64,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            ca_dirs: Vec::new(),
            insecure: false,
            username: None,
            password: None,
            headers: Vec::new(),
            stall_timeout: Duration::from_secs(60),
            retries: 5,
            object: object::ObjectOptions::default(),
            stop: None,
            connections: None,
            range_window: http::DEFAULT_WINDOW,
        }
    }
}

/// A random-access byte source.
pub trait ReadAt: Send + Sync {
    /// What to call this source in messages (a path or URL).
    fn name(&self) -> &str;

    /// Total length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset`; returns fewer only when the end of the source is reached.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;

    /// Offset/length/address alignment under which `read_at` goes straight to the device without a copy
    /// (1 when any request is direct).
    fn direct_alignment(&self) -> u64 {
        1
    }

    /// Something that changes when the source's contents are replaced (a file's modification time, an HTTP
    /// ETag), for checking that a resumed import reads the same source; `None` when the source cannot tell.
    fn identity(&self) -> Option<String> {
        None
    }

    /// Bytes read from the underlying file or device so far (alignment padding included), where the source counts.
    fn bytes_read(&self) -> Option<u64> {
        None
    }

    /// The next range at or after `offset` that may hold non-zero bytes, or `None` if the rest reads as zeros.
    /// Sources that cannot tell report everything as data.
    fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        Ok((offset < self.len()).then(|| offset..self.len()))
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, failing with a bad-image error naming the offset if the source
/// ends first.
pub fn read_exact_at(source: &dyn ReadAt, offset: u64, buf: &mut [u8], what: &str) -> Result<()> {
    let got = source.read_at(offset, buf)?;
    if got < buf.len() {
        return Err(crate::bad_image!("{what} ends past the end of the file ({} bytes)", source.len())
            .at_offset(offset)
            .at_path(source.name()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_urls_only_with_an_http_scheme() {
        assert_eq!(Location::parse("https://h/x.qcow2"), Location::Url("https://h/x.qcow2".into()));
        assert_eq!(Location::parse("HTTP://h/x"), Location::Url("HTTP://h/x".into()));
        assert_eq!(Location::parse("disk.qcow2"), Location::Path("disk.qcow2".into()));
        assert_eq!(Location::parse("./http:x"), Location::Path("./http:x".into()));
    }
}
