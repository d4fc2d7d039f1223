//! A whole HTTP body as a forward-only [`Read`], resuming after a dropped connection: with `Range: bytes=N-` where
//! the server honours it, else by fetching the body again and skipping what was already delivered.

use super::client::{is_stop, is_timeout, Client, Response};
use super::random::backoff;
use crate::error::{Error, ErrorKind, Result};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

/// How long to wait, after the declared end of a body, for the server to close rather than send more.
const LINGER: Duration = Duration::from_secs(2);

/// The body of a URL read front to back.
pub struct HttpStream {
    client: Arc<Client>,
    response: Option<Response>,
    /// Bytes delivered so far.
    pos: u64,
    /// Length of the whole body, when the server said.
    total: Option<u64>,
    /// The ETag or Last-Modified of the first answer.
    identity: Option<String>,
    /// Whether resumption may use Range requests.
    ranges: bool,
    /// Failed attempts since the last byte received.
    failures: u32,
    finished: bool,
}

impl HttpStream {
    /// Continues the body of `response` (a 200 answer to a GET of the whole file).
    pub fn from_response(client: Arc<Client>, response: Response, ranges: bool) -> Self {
        HttpStream {
            total: response.content_length(),
            identity: super::validator(&response),
            client,
            response: Some(response),
            pos: 0,
            ranges,
            failures: 0,
            finished: false,
        }
    }

    /// A fresh GET of the whole file.
    pub fn open(client: Arc<Client>, ranges: bool, total: Option<u64>) -> Result<Self> {
        let response = client.get(None, false)?;
        if response.status != 200 {
            return Err(client.error(ErrorKind::Io, format!("server answered HTTP {} to a plain GET", response.status)));
        }
        let mut stream = HttpStream::from_response(client, response, ranges);
        stream.total = stream.total.or(total);
        Ok(stream)
    }

    /// Length of the body, if the server declared it.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The body's ETag or Last-Modified, if the server sent one.
    pub fn identity(&self) -> Option<String> {
        self.identity.clone()
    }

    fn fail(&self, what: String) -> Error {
        self.client.error(ErrorKind::Io, what).at_offset(self.pos)
    }

    /// Opens the body again from `self.pos`.
    fn reopen(&mut self) -> Result<Response> {
        if self.ranges {
            let response = self.client.get(Some((self.pos, None)), false)?;
            return match (response.status, response.content_range()) {
                (206, Some((start, end, total))) if start == self.pos && total == self.total.or(total) => {
                    if self.total.is_some_and(|t| end + 1 != t) {
                        return Err(self.fail(format!("resumed body ends at {end}, not at the declared end")));
                    }
                    Ok(response)
                }
                (416, _) => Err(self.fail(format!(
                    "the body ended early: the server declared {} bytes but has no byte at this offset",
                    self.total.map_or("?".into(), |t| t.to_string())
                ))),
                (status, _) => Err(self.fail(format!("server did not resume with a Range request (HTTP {status})"))),
            };
        }
        let mut response = self.client.get(None, false)?;
        if response.status != 200 || response.content_length() != self.total {
            return Err(self.fail(format!(
                "the file changed on the server (HTTP {}, Content-Length {:?} instead of {:?})",
                response.status,
                response.content_length(),
                self.total
            )));
        }
        // No Range support: read again what was already delivered, and drop it.
        let mut skip = self.pos;
        let mut sink = vec![0u8; 64 << 10];
        while skip > 0 {
            let n = (skip as usize).min(sink.len());
            let got =
                response.read(&mut sink[..n]).map_err(|e| self.client.io_error("skipping to the resume offset", e))?;
            if got == 0 {
                return Err(self.fail("the body ended before the resume offset".into()));
            }
            skip -= got as u64;
        }
        Ok(response)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.response.is_none() {
                self.response = Some(self.reopen()?);
            }
            let response = self.response.as_mut().expect("just opened");
            let why = match response.read(buf) {
                Ok(0) if self.total.is_none_or(|t| self.pos >= t) => {
                    let response = self.response.take().expect("open");
                    response
                        .finish(&self.client, LINGER.min(self.client.options.stall_timeout))
                        .map_err(|e| e.at_offset(self.pos))?;
                    self.finished = true;
                    return Ok(0);
                }
                Ok(0) => "the connection closed before the declared end".to_string(),
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if is_timeout(&e) || is_stop(&e) => {
                    self.response = None;
                    return Err(self.client.io_error("reading the body", e).at_offset(self.pos));
                }
                Err(e) => e.to_string(),
            };
            self.response = None;
            self.failures += 1;
            let retries = self.client.options.retries;
            if self.failures > retries {
                return Err(self.fail(format!("transfer failed {} times in a row, giving up: {why}", self.failures)));
            }
            log::warn!(
                "{}: {why} at offset {}; resuming (retry {} of {retries})",
                self.client.name(),
                self.pos,
                self.failures
            );
            self.client.pause(backoff(self.failures))?;
        }
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf).map_err(io::Error::other)
    }
}
