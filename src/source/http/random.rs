//! An HTTP source with Range support as a [`ReadAt`]: one open-ended `Range: bytes=N-` request is read forward as
//! long as reads keep moving forward, so an image read in file order costs one request; blocks read past on the way
//! stay in a small cache for the reads that arrive slightly out of order (format metadata, the checksum tap).

use super::client::{is_stop, is_timeout, Client, Response};
use super::ranges::{Served, Window};
use crate::error::{ErrorKind, Result};
use crate::source::ReadAt;
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Cache block, and the granularity of requests.
pub const BLOCK: u64 = 64 << 10;
/// Blocks kept in the cache (4 MiB).
pub const CACHE_BLOCKS: usize = 64;
/// A read this far ahead of the open request reads through instead of starting a new one.
pub const SKIP_LIMIT: u64 = 4 << 20;

/// A random-access view of a URL whose server honours Range requests.
pub struct HttpSource {
    client: Arc<Client>,
    len: u64,
    /// The file's ETag or Last-Modified at the probe; every later answer must carry the same.
    identity: Option<String>,
    /// Where a request opened at an offset should end (exclusive), when not at the end of the file.
    request_end: Option<RequestEnd>,
    /// Parallel range requests for reads that run front to back (none on one connection).
    window: Option<Window>,
    state: Mutex<State>,
}

/// Where a request opened at an offset ends: a source that knows which ranges are worth reading (an imageio
/// daemon's extents) asks for just those, so what lies past them is never sent.
pub type RequestEnd = Box<dyn Fn(u64) -> u64 + Send + Sync>;

struct State {
    /// The open request and the file offset its body is at (a multiple of [`BLOCK`], or the end).
    open: Option<(u64, Response)>,
    /// Where the open request's body ends.
    open_end: u64,
    /// Recently passed blocks by index, and their use order.
    cache: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
    /// Failed attempts since the last byte received.
    failures: u32,
}

impl HttpSource {
    /// A source of `len` bytes (the total from the probe's Content-Range) whose version the probe saw as
    /// `identity`.
    pub fn new(client: Arc<Client>, len: u64, identity: Option<String>) -> Self {
        let options = &client.options;
        let window = Window::new(client.clone(), len, identity.clone(), options.connections, options.range_window);
        HttpSource {
            client,
            len,
            identity,
            request_end: None,
            window,
            state: Mutex::new(State {
                open: None,
                open_end: 0,
                cache: HashMap::new(),
                order: VecDeque::new(),
                failures: 0,
            }),
        }
    }

    /// This source, its requests ending where `end` says (rounded up to whole blocks) rather than at the end of
    /// the file.
    pub fn with_request_end(mut self, end: RequestEnd) -> Self {
        self.request_end = Some(end);
        // Chunks of a fixed size would ask for what the ends leave out.
        self.window = None;
        self
    }

    /// Where a request opened at `pos` ends.
    fn end_for(&self, pos: u64) -> u64 {
        match &self.request_end {
            Some(end) => end(pos).div_ceil(BLOCK).saturating_mul(BLOCK).clamp(pos + 1, self.len),
            None => self.len,
        }
    }

    /// Opens a request at `pos` as the open one.
    fn open_in(&self, state: &mut State, pos: u64) -> Result<()> {
        let end = self.end_for(pos);
        let response = self.open_at(pos, end).map_err(|e| if e.offset().is_none() { e.at_offset(pos) } else { e })?;
        state.open = Some((pos, response));
        state.open_end = end;
        Ok(())
    }

    /// Opens `bytes=pos-` (or `bytes=pos-(end-1)`) and checks the answer describes this file from `pos`.
    fn open_at(&self, pos: u64, end: u64) -> Result<Response> {
        let last = (end < self.len).then(|| end - 1);
        let response = self.client.get(Some((pos, last)), true)?;
        let range = response.content_range();
        let expected_len = end - pos;
        match (response.status, range) {
            // An answer without a validator says nothing; one with another says the file was replaced.
            (206, Some(_)) if changed(self.identity.as_deref(), super::validator(&response).as_deref()) => Err(self
                .client
                .error(ErrorKind::Io, format!(
                    "the file changed during the import ({} at first, now {})",
                    self.identity.as_deref().unwrap_or_default(),
                    super::validator(&response).unwrap_or_default()
                ))
                .at_offset(pos)),
            (206, Some((start, last, total))) if start == pos && last + 1 == end && total.is_none_or(|t| t == self.len) => {
                if response.content_length().is_some_and(|l| l != expected_len) {
                    return Err(self
                        .client
                        .error(ErrorKind::Io, format!(
                            "server's Content-Length {} disagrees with its Content-Range {start}-{last}",
                            response.content_length().unwrap_or(0)
                        ))
                        .at_offset(pos));
                }
                Ok(response)
            }
            (206, Some((start, end, total))) => Err(self
                .client
                .error(ErrorKind::Io, format!(
                    "asked for bytes {pos}- of a {}-byte file, got {start}-{end}/{}",
                    self.len,
                    total.map_or("*".into(), |t| t.to_string())
                ))
                .at_offset(pos)),
            (416, _) => Err(self
                .client
                .error(ErrorKind::Io, format!("server says offset {pos} lies past the end of the file (HTTP 416), though it announced {} bytes", self.len))
                .at_offset(pos)),
            (status, _) => Err(self
                .client
                .error(ErrorKind::Io, format!("server stopped honouring Range requests (HTTP {status})"))
                .at_offset(pos)),
        }
    }

    /// Reads `buf.len()` bytes at the open request's position, reopening after a dropped connection.
    fn read_body(&self, state: &mut State, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            if let Some((at, _)) = state.open.as_ref().filter(|(pos, _)| *pos == state.open_end) {
                // The request's body is all read: the next one starts here.
                let at = *at;
                let (_, response) = state.open.take().expect("a request is open");
                response.finish(&self.client, Duration::ZERO).map_err(|e| e.at_offset(at))?;
                self.open_in(state, at)?;
            }
            let (pos, response) = state.open.as_mut().expect("a request is open");
            let at = *pos;
            match response.read(&mut buf[done..]) {
                Ok(n) if n > 0 => {
                    *pos += n as u64;
                    done += n;
                    state.failures = 0;
                    continue;
                }
                Ok(_) => {
                    self.retry(state, at, "the server closed the body early".into())?;
                }
                Err(e) if is_timeout(&e) || is_stop(&e) => {
                    state.open = None;
                    return Err(self.client.io_error("reading the body", e).at_offset(at));
                }
                Err(e) => self.retry(state, at, e.to_string())?,
            }
        }
        let (pos, _) = state.open.as_ref().expect("a request is open");
        if *pos == state.open_end {
            let end = *pos;
            let (_, response) = state.open.take().expect("a request is open");
            response.finish(&self.client, Duration::ZERO).map_err(|e| e.at_offset(end))?;
        }
        Ok(())
    }

    /// After a failed read at `at`: waits and reopens from there, unless the retries are used up.
    fn retry(&self, state: &mut State, at: u64, why: String) -> Result<()> {
        state.open = None;
        state.failures += 1;
        let retries = self.client.options.retries;
        if state.failures > retries {
            return Err(self
                .client
                .error(ErrorKind::Io, format!("transfer failed {} times in a row, giving up: {why}", state.failures))
                .at_offset(at));
        }
        log::warn!("{}: {why} at offset {at}; resuming (retry {} of {retries})", self.client.name(), state.failures);
        self.client.pause(backoff(state.failures))?;
        self.open_in(state, at)
    }

    /// Makes sure block `index` is in the cache, reading forward (and caching what is passed) or opening a new
    /// request.
    fn fetch(&self, state: &mut State, index: u64) -> Result<()> {
        let start = index * BLOCK;
        let usable = matches!(&state.open, Some((pos, _))
            if *pos <= start && start - *pos <= SKIP_LIMIT && start < state.open_end);
        if !usable {
            self.open_in(state, start)?;
        }
        loop {
            let pos = state.open.as_ref().expect("a request is open").0;
            let mut block = self.spare_block(state);
            let len = BLOCK.min(self.len - pos) as usize;
            block.resize(len, 0);
            self.read_body(state, &mut block)?;
            self.insert(state, pos / BLOCK, block);
            if pos >= start {
                return Ok(());
            }
        }
    }

    fn spare_block(&self, state: &mut State) -> Vec<u8> {
        if state.cache.len() >= CACHE_BLOCKS {
            while let Some(old) = state.order.pop_front() {
                if let Some(block) = state.cache.remove(&old) {
                    return block;
                }
            }
        }
        Vec::with_capacity(BLOCK as usize)
    }

    fn insert(&self, state: &mut State, index: u64, block: Vec<u8>) {
        state.order.retain(|&i| i != index);
        state.order.push_back(index);
        state.cache.insert(index, block);
    }
}

/// Whether a later answer's validator shows the file is no longer the one first seen.
pub(super) fn changed(first: Option<&str>, now: Option<&str>) -> bool {
    matches!((first, now), (Some(first), Some(now)) if first != now)
}

/// Pause before retry `n` (1-based): 100 ms doubling, at most 5 s.
pub(crate) fn backoff(n: u32) -> Duration {
    Duration::from_millis(100u64 << n.saturating_sub(1).min(6)).min(Duration::from_secs(5))
}

impl ReadAt for HttpSource {
    fn name(&self) -> &str {
        self.client.name()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.len - offset) as usize;
        let mut done = 0;
        if let Some(window) = &self.window {
            if let Served::Bytes(n) = window.read(offset, &mut buf[..want])? {
                done = n;
                // The one-connection request, if open, is behind the window now.
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state.open = None;
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while done < want {
            let at = offset + done as u64;
            let index = at / BLOCK;
            if let Some(block) = state.cache.get(&index) {
                let from = (at - index * BLOCK) as usize;
                let n = (block.len() - from).min(want - done);
                buf[done..done + n].copy_from_slice(&block[from..from + n]);
                done += n;
                continue;
            }
            // Whole blocks at the open request's position go straight into the caller's buffer.
            let direct = (want - done) as u64 / BLOCK * BLOCK;
            if at % BLOCK == 0 && direct > 0 && matches!(&state.open, Some((pos, _)) if *pos == at) {
                self.read_body(&mut state, &mut buf[done..done + direct as usize])?;
                done += direct as usize;
                continue;
            }
            self.fetch(&mut state, index)?;
        }
        Ok(want)
    }
}
