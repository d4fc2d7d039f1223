//! HTTP(S) sources. [`open`] probes the server with a one-byte Range request: a `206` with a Content-Range total
//! makes the URL a random-access [`HttpSource`]; a `200` (no Range support) makes it a forward-only
//! [`HttpStream`] that continues the probe's own body.

mod client;
mod random;
mod ranges;
mod stream;
mod tls;

pub(crate) use client::base64;
pub(crate) use client::basic_auth as basic_auth_value;
pub(crate) use client::host_header;
pub use client::Authorize;
pub(crate) use client::Response;
pub use client::{check_header, Client};
pub(crate) use client::{is_stop, is_timeout};
pub(crate) use random::backoff;
pub use random::HttpSource;
pub use ranges::DEFAULT_WINDOW;
pub use stream::HttpStream;

use super::HttpOptions;
use crate::error::{ErrorKind, Result};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// What a URL turned out to be.
pub enum Remote {
    /// The server honours Range requests.
    Random(Arc<HttpSource>),
    /// It does not: the body is read once, front to back.
    Stream(Box<HttpStream>),
}

/// Probes `url` and opens it as random access or as a stream.
pub fn open(url: &str, options: &HttpOptions) -> Result<(Arc<Client>, Remote)> {
    open_with(Arc::new(Client::new(url, options)?))
}

/// Probes the URL of `client` (one that may sign its requests, for an object store) and opens it.
pub fn open_with(client: Arc<Client>) -> Result<(Arc<Client>, Remote)> {
    let mut probe = client.get(Some((0, Some(0))), true)?;
    match (probe.status, probe.content_range()) {
        (206, Some((0, 0, Some(total)))) => {
            let mut byte = [0u8; 2];
            let mut got = 0;
            while got < 1 {
                match probe.read(&mut byte[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(client.io_error("reading the probe", e)),
                }
            }
            let identity = validator(&probe);
            probe.finish(&client, Duration::ZERO)?;
            log::debug!(
                "{}: server honours Range requests; {total} bytes, {}",
                client.name(),
                identity.as_deref().unwrap_or("no ETag or Last-Modified")
            );
            Ok((client.clone(), Remote::Random(Arc::new(HttpSource::new(client, total, identity)))))
        }
        (206, _) => {
            drop(probe);
            log::debug!("{}: Range answer without a usable Content-Range; reading as a stream", client.name());
            let stream = HttpStream::open(client.clone(), false, None)?;
            Ok((client, Remote::Stream(Box::new(stream))))
        }
        (416, _) => Err(client.error(ErrorKind::BadImage, "the file is empty (HTTP 416 for its first byte)")),
        (_, _) => {
            log::debug!(
                "{}: no Range support (HTTP {}); reading as a stream of {} bytes",
                client.name(),
                probe.status,
                probe.content_length().map_or("unknown".into(), |l| l.to_string())
            );
            let stream = HttpStream::from_response(client.clone(), probe, false);
            Ok((client, Remote::Stream(Box::new(stream))))
        }
    }
}

/// What identifies this version of the file: its ETag, else its Last-Modified date (both are what HTTP offers
/// for telling a changed file apart, RFC 9110 §8.8).
pub(crate) fn validator(response: &Response) -> Option<String> {
    let value = |name: &str| response.header(name).map(str::trim).filter(|v| !v.is_empty());
    match (value("etag"), value("last-modified")) {
        (Some(etag), _) => Some(format!("etag {etag}")),
        (None, Some(date)) => Some(format!("last-modified {date}")),
        (None, None) => None,
    }
}
