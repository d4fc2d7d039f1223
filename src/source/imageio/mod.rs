//! oVirt imageio: a disk served by the ovirt-imageio daemon behind an image transfer the engine set up
//! ([`engine`]). The daemon's `/images/<ticket>` honours Range requests, so the disk is an ordinary
//! [`HttpSource`] (one forward request at a time); its `extents` API tells which ranges read as zeros, so
//! [`ReadAt::next_data`] skips them and they are never downloaded: they become the sink's zeroing.
//!
//! One connection: the daemon allows several (`max_readers` in its `OPTIONS`), which a parallel-range reader for
//! every HTTP source would use; this source keeps to one until that exists.

pub mod engine;

use super::http::{self, Client, HttpSource, Remote, Response};
use super::{HttpOptions, ReadAt};
use crate::error::{Error, ErrorKind, Result};
use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

/// Largest `extents` answer accepted (a JSON object is about 50 bytes: a million extents).
const MAX_EXTENTS_ANSWER: usize = 64 << 20;
/// Largest `OPTIONS` answer accepted.
const MAX_OPTIONS_ANSWER: usize = 64 << 10;

/// Where an image transfer serves the disk: the host's daemon, and the engine's proxy to fall back on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TransferUrls {
    /// `transfer_url`: the daemon on the host.
    pub transfer_url: Option<String>,
    /// `proxy_url`: the engine's imageio proxy.
    pub proxy_url: Option<String>,
}

impl TransferUrls {
    /// The URL tried first, for messages.
    pub fn primary(&self) -> &str {
        self.transfer_url.as_deref().or(self.proxy_url.as_deref()).unwrap_or("imageio:(no transfer URL)")
    }
}

/// One extent of the daemon's `extents` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
struct Extent {
    start: u64,
    length: u64,
    #[serde(default)]
    zero: bool,
}

/// A disk served by an imageio daemon.
pub struct ImageioSource {
    http: Arc<HttpSource>,
    /// Byte ranges that may hold data, in order, merged; `None` when the daemon has no `extents` feature.
    data: Option<Arc<Vec<Range<u64>>>>,
}

impl ImageioSource {
    /// Bytes of the disk that are data according to the daemon (all of it without extents).
    pub fn data_bytes(&self) -> u64 {
        match &self.data {
            Some(runs) => runs.iter().map(|r| r.end - r.start).sum(),
            None => self.http.len(),
        }
    }
}

/// Opens the transfer at `urls.transfer_url`, falling back to `urls.proxy_url` when the host's daemon cannot be
/// reached (as CDI's importer does).
pub fn open(urls: &TransferUrls, options: &HttpOptions) -> Result<(Arc<Client>, Arc<ImageioSource>)> {
    let candidates: Vec<&String> = urls.transfer_url.iter().chain(urls.proxy_url.iter()).collect();
    let Some((last, first)) = candidates.split_last() else {
        return Err(Error::new(ErrorKind::Io, "Error transfer url not available"));
    };
    for url in first {
        match open_url(url, options) {
            Ok(opened) => return Ok(opened),
            Err(e) => log::warn!("{e}; trying the engine's proxy_url"),
        }
    }
    open_url(last, options)
}

fn open_url(url: &str, options: &HttpOptions) -> Result<(Arc<Client>, Arc<ImageioSource>)> {
    let (client, source) = match http::open(url, options)? {
        (client, Remote::Random(source)) => (client, source),
        (client, Remote::Stream(_)) => {
            return Err(client.error(ErrorKind::Io, "the imageio daemon does not honour Range requests"))
        }
    };
    let features = options_of(&client)?;
    let imageio = if features.iter().any(|f| f == "extents") {
        let extents = extents_of(&client)?;
        let runs = Arc::new(data_runs(&extents, source.len()).map_err(|e| e.at_path(client.name()))?);
        // Each request asks for one data run, so the bytes after it are never sent.
        let bounds = runs.clone();
        let end = Box::new(move |pos: u64| run_end(&bounds, pos));
        let http = HttpSource::new(client.clone(), source.len(), source.identity()).with_request_end(end);
        ImageioSource { http: Arc::new(http), data: Some(runs) }
    } else {
        log::info!("{}: the daemon offers no extents; reading every byte", client.name());
        ImageioSource { http: source, data: None }
    };
    log::info!(
        "{}: {} bytes, {} of them data by the daemon's extents",
        client.name(),
        imageio.len(),
        imageio.data_bytes()
    );
    Ok((client, Arc::new(imageio)))
}

/// The ticket's features from `OPTIONS` (CDI reads `features` the same way).
fn options_of(client: &Client) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Options {
        #[serde(default)]
        features: Vec<String>,
        #[serde(default)]
        max_readers: Option<u32>,
    }
    let url = url::Url::parse(client.name()).map_err(|e| client.error(ErrorKind::Io, e.to_string()))?;
    let response = client.call("OPTIONS", &url, &[], &[])?;
    if response.status != 200 {
        log::info!("{}: OPTIONS answered HTTP {}; no extents", client.name(), response.status);
        return Ok(Vec::new());
    }
    let body = read_capped(client, response, MAX_OPTIONS_ANSWER, "the OPTIONS answer")?;
    let options: Options = serde_json::from_slice(&body)
        .map_err(|e| client.error(ErrorKind::Io, format!("unable to decode options response: {e}")))?;
    log::debug!("{}: features {:?}, max_readers {:?}", client.name(), options.features, options.max_readers);
    Ok(options.features)
}

/// `GET …/extents`.
fn extents_of(client: &Client) -> Result<Vec<Extent>> {
    let url = url::Url::parse(&format!("{}/extents", client.name().trim_end_matches('/')))
        .map_err(|e| client.error(ErrorKind::Io, e.to_string()))?;
    let response = client.request(&url, None, true, &[])?;
    if response.status != 200 {
        return Err(client.error(ErrorKind::Io, format!("failed to query extents: HTTP {}", response.status)));
    }
    let body = read_capped(client, response, MAX_EXTENTS_ANSWER, "the extents answer")?;
    serde_json::from_slice(&body).map_err(|e| client.error(ErrorKind::Io, format!("unable to decode extents: {e}")))
}

/// The data ranges of `extents`, merged, after checking they tile the disk's `len` bytes from 0.
fn data_runs(extents: &[Extent], len: u64) -> Result<Vec<Range<u64>>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let mut at = 0u64;
    for extent in extents {
        let end = extent.start.checked_add(extent.length).filter(|_| extent.start == at && extent.length > 0);
        let Some(end) = end.filter(|&e| e <= len) else {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the daemon's extents do not tile the {len}-byte disk: extent {}+{} where {at} was expected",
                    extent.start, extent.length
                ),
            )
            .at_offset(at));
        };
        if !extent.zero {
            match runs.last_mut() {
                Some(last) if last.end == extent.start => last.end = end,
                _ => runs.push(extent.start..end),
            }
        }
        at = end;
    }
    if at != len {
        return Err(Error::new(ErrorKind::Io, format!("the daemon's extents cover {at} of the disk's {len} bytes")));
    }
    Ok(runs)
}

/// Where a request at `pos` should end: the end of the data run holding it, or just past `pos` in a zero run
/// (only format probing reads there).
fn run_end(runs: &[Range<u64>], pos: u64) -> u64 {
    match runs.get(runs.partition_point(|r| r.end <= pos)) {
        Some(run) if run.start <= pos => run.end,
        _ => pos + 1,
    }
}

/// Reads the transfer's first 512 bytes on a connection of its own: activity the daemon and the engine both see,
/// while the import is busy zeroing.
pub fn touch(urls: &TransferUrls, options: &HttpOptions) -> Result<()> {
    let url = urls
        .transfer_url
        .as_ref()
        .or(urls.proxy_url.as_ref())
        .ok_or_else(|| Error::new(ErrorKind::Io, "no transfer URL"))?;
    let client = Client::new(url, options)?;
    let response = client.get(Some((0, Some(511))), false)?;
    read_capped(&client, response, 512, "a keep-alive read").map(drop)
}

/// Reads a whole (small) answer body, refusing one longer than `cap`.
pub(crate) fn read_capped(client: &Client, response: Response, cap: usize, what: &str) -> Result<Vec<u8>> {
    if response.content_length().is_some_and(|l| l > cap as u64) {
        return Err(client.error(ErrorKind::Io, format!("{what} is larger than {cap} bytes")));
    }
    let mut body = Vec::new();
    let mut limited = response.take(cap as u64 + 1);
    limited.read_to_end(&mut body).map_err(|e| client.io_error(&format!("reading {what}"), e))?;
    if body.len() > cap {
        return Err(client.error(ErrorKind::Io, format!("{what} is larger than {cap} bytes")));
    }
    let response = limited.into_inner();
    response.finish(client, std::time::Duration::ZERO)?;
    Ok(body)
}

impl ReadAt for ImageioSource {
    fn name(&self) -> &str {
        self.http.name()
    }

    fn len(&self) -> u64 {
        self.http.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.http.read_at(offset, buf)
    }

    fn next_data(&self, offset: u64) -> Result<Option<Range<u64>>> {
        let Some(runs) = &self.data else {
            return self.http.next_data(offset);
        };
        let first = runs.partition_point(|r| r.end <= offset);
        Ok(runs.get(first).map(|r| r.start.max(offset)..r.end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, zero: bool) -> Extent {
        Extent { start, length, zero }
    }

    #[test]
    fn zero_extents_are_left_out_and_data_merged() {
        let extents = [ext(0, 10, false), ext(10, 5, false), ext(15, 100, true), ext(115, 5, false)];
        assert_eq!(data_runs(&extents, 120).unwrap(), vec![0..15, 115..120]);
    }

    #[test]
    fn requests_end_with_their_data_run_and_zero_runs_are_skipped() {
        let runs = [0..15, 115..120];
        assert_eq!((run_end(&runs, 0), run_end(&runs, 14), run_end(&runs, 15), run_end(&runs, 116)), (15, 15, 16, 120));
    }

    #[test]
    fn extents_that_do_not_tile_the_disk_are_refused() {
        assert!(data_runs(&[ext(0, 10, false), ext(11, 5, false)], 16).is_err());
        assert!(data_runs(&[ext(0, 10, false)], 16).is_err());
        assert!(data_runs(&[ext(0, 20, false)], 16).is_err());
        assert!(data_runs(&[ext(0, u64::MAX, false), ext(u64::MAX, 2, true)], 16).is_err());
        assert!(data_runs(&[ext(0, 0, false)], 0).is_err());
    }
}
