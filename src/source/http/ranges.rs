//! Parallel range requests: once an [`HttpSource`](super::HttpSource) is read front to back, the bytes ahead of
//! the reader are cut into chunks fetched on several connections and handed on in order from a reorder window.
//!
//! One connection to an object store or CDN gets a capped share of the network (S3's guidance is parallel
//! byte-range GETs); the formats above read in file order (the random driver reads a network source serially, a
//! compressed stream is read front to back), so reading ahead along the file is reading ahead along the extent
//! map. The window holds at most `slots` chunks, fetched or being fetched, so its memory is fixed by the budget
//! whatever the server says; a chunk is dropped as soon as the reader has moved past it.
//!
//! Connections start at one and grow one at a time while the aggregate rate grows (slow start); a 429 or 503, or a
//! connection that cannot be opened, takes one away. A server that answers a range with `200` (Range no longer
//! honoured) hands the reader back to the one-connection path; a different range than asked, or another ETag or
//! Last-Modified than the probe's, fails the import naming the URL and offset: versions are never mixed.

use super::client::{is_stall, is_stop, is_timeout, Client, Response};
use super::random::{backoff, changed};
use crate::error::{Error, ErrorKind, Result};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Window for a source opened without the engine's budget: the window of the default 600 MB budget.
pub const DEFAULT_WINDOW: u64 = 16 << 20;
/// Chunk size: the unit of a range request. At 20 ms of latency and 20 MB/s a connection, a 1 MiB range spends
/// 72% of its time moving bytes; larger chunks would mean fewer of them in the same window.
const CHUNK: u64 = 1 << 20;
/// Fewest chunks a window holds (two connections and one chunk being read).
const MIN_SLOTS: u64 = 4;
/// Most connections the slow start goes to.
const MAX_CONNECTIONS: usize = 8;
/// Connections a slow start begins with: one, so that a server as fast on one connection as on several (a local
/// one, measured 0.49 s for 512 MiB on one against 0.60 s on two) keeps one.
const START_CONNECTIONS: usize = 1;
/// A rate counts as grown when it gained at least this share of what one more connection would add if each
/// carried as much as the others (going from n - 1 to n connections could add 1/(n - 1)).
const GROWTH: f64 = 0.5;
/// Shortest measuring period of the slow start.
const PERIOD: Duration = Duration::from_millis(300);

/// What a read asked of the window.
pub(super) enum Served {
    /// This many bytes were copied from the window.
    Bytes(usize),
    /// The window does not hold these bytes: read them over the one-connection path.
    Pass,
}

/// The reorder window of one source.
pub(super) struct Window {
    shared: Arc<Shared>,
}

struct Shared {
    client: Arc<Client>,
    len: u64,
    identity: Option<String>,
    chunk: u64,
    slots: u64,
    /// Connections the slow start may reach (or the fixed number).
    cap: usize,
    /// `--connections N`: no slow start.
    fixed: bool,
    /// Raised when the source is dropped: workers leave after their current read.
    closed: AtomicBool,
    /// Requests whose body is being received now, and the most at once: the connections that carried bytes.
    receiving: AtomicUsize,
    peak: AtomicUsize,
    state: Mutex<State>,
    /// A chunk arrived, or the window failed or went off.
    arrived: Condvar,
    /// The window moved or a connection was allowed: workers look for a chunk to fetch.
    moved: Condvar,
}

struct State {
    /// Whether reads are being served from the window.
    active: bool,
    /// Where the last read ended, for seeing reads run front to back.
    last_end: u64,
    /// First chunk index kept; chunks `base..base + slots` may be fetched.
    base: u64,
    /// Next chunk index to hand to a worker.
    next: u64,
    /// Chunks given back by a worker that backed off, fetched before `next`.
    requeued: BTreeSet<u64>,
    /// Chunks fetched and not yet passed.
    ready: HashMap<u64, Vec<u8>>,
    /// Chunks being fetched (each holds one buffer).
    fetching: usize,
    /// Buffers for reuse.
    spare: Vec<Vec<u8>>,
    /// Bumped whenever the window restarts elsewhere: a chunk of an older generation is dropped on arrival.
    generation: u64,
    /// Worker threads alive, and how many may be.
    workers: usize,
    allowed: usize,
    /// The slow start's measurement.
    growth: Growth,
    /// Range support was lost: every read takes the one-connection path.
    off: bool,
    /// The failure that ended the window (URL, offset and cause), handed to the reader.
    failed: Option<Error>,
}

struct Growth {
    since: Instant,
    bytes: u64,
    best: f64,
    settled: bool,
}

/// How a worker's fetch of one chunk ended.
enum Fetched {
    Done,
    /// The server would not take this request now (429, 503, or no connection): fewer connections.
    Refused(String),
    /// The server answered `200`: Range is no longer honoured.
    NoRange,
    Failed(Error),
}

impl Window {
    /// A window for `client`'s `len`-byte file seen as `identity`, holding at most `bytes`, on `connections`
    /// (`None`: a slow start); `None` when one connection is asked for or the file is too small to gain.
    pub(super) fn new(
        client: Arc<Client>,
        len: u64,
        identity: Option<String>,
        connections: Option<usize>,
        bytes: u64,
    ) -> Option<Window> {
        let slots = (bytes / CHUNK).max(MIN_SLOTS);
        if connections == Some(1) || len < 2 * CHUNK {
            return None;
        }
        let cap = connections.unwrap_or(MAX_CONNECTIONS).clamp(1, slots as usize - 1);
        let fixed = connections.is_some();
        let state = State {
            active: false,
            last_end: u64::MAX,
            base: 0,
            next: 0,
            requeued: BTreeSet::new(),
            ready: HashMap::new(),
            fetching: 0,
            spare: Vec::new(),
            generation: 0,
            workers: 0,
            allowed: if fixed { cap } else { START_CONNECTIONS.min(cap) },
            growth: Growth { since: Instant::now(), bytes: 0, best: 0.0, settled: fixed },
            off: false,
            failed: None,
        };
        let shared = Shared {
            client,
            len,
            identity,
            chunk: CHUNK,
            slots,
            cap,
            fixed,
            closed: AtomicBool::new(false),
            receiving: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            state: Mutex::new(state),
            arrived: Condvar::new(),
            moved: Condvar::new(),
        };
        Some(Window { shared: Arc::new(shared) })
    }

    /// Copies bytes at `offset` into `buf` from the window, starting it when this read continues the last one.
    /// `Pass` when these bytes are not the window's: the caller reads them over one connection.
    pub(super) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Served> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if let Some(error) = &state.failed {
            return Err(copy(error));
        }
        if state.off || buf.is_empty() {
            return Ok(Served::Pass);
        }
        let index = offset / shared.chunk;
        let inside = state.active && index >= state.base && index < state.base + shared.slots;
        if !inside && state.active && index < state.base {
            // Behind the window (a table the format looks up again): one request, and the window stays.
            return Ok(Served::Pass);
        }
        if !inside {
            let sequential = offset == state.last_end;
            state.last_end = offset + buf.len() as u64;
            if state.active {
                // A jump away from the window: what it holds will not be read.
                shared.stop_window(&mut state);
            }
            if !sequential {
                return Ok(Served::Pass);
            }
            self.start(&mut state, index);
        }
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let index = at / shared.chunk;
            if index > state.base {
                shared.advance(&mut state, index);
            }
            let chunk = loop {
                if let Some(error) = &state.failed {
                    return Err(copy(error));
                }
                if state.off {
                    state.last_end = u64::MAX;
                    return Ok(if done > 0 { Served::Bytes(done) } else { Served::Pass });
                }
                if let Some(chunk) = state.ready.get(&index) {
                    break chunk;
                }
                state = shared.arrived.wait(state).unwrap_or_else(|p| p.into_inner());
            };
            let from = (at - index * shared.chunk) as usize;
            let n = (chunk.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            done += n;
        }
        state.last_end = offset + done as u64;
        Ok(Served::Bytes(done))
    }

    /// Starts the window at chunk `index`, with workers up to the connections allowed.
    fn start(&self, state: &mut State, index: u64) {
        let shared = &self.shared;
        state.active = true;
        state.generation += 1;
        state.base = index;
        state.next = index;
        state.requeued.clear();
        if state.workers == 0 {
            log::info!(
                "{}: reading ahead with parallel range requests: {}{} connections, a {} MiB window",
                shared.client.name(),
                if shared.fixed { "" } else { "up to " },
                if shared.fixed { state.allowed } else { shared.cap },
                (shared.slots * shared.chunk) >> 20
            );
            state.growth = Growth { since: Instant::now(), ..state.growth };
        }
        while state.workers < state.allowed && spawn(shared, state) {}
        if state.workers == 0 {
            state.off = true;
        }
        shared.moved.notify_all();
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        let peak = self.shared.peak.load(Ordering::Relaxed);
        if peak > 0 {
            log::info!("{}: parallel range requests used up to {peak} connections", self.shared.client.name());
        }
        // Under the lock, so no worker is between looking at `closed` and waiting.
        let _state = self.shared.lock();
        self.shared.moved.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the window's start to chunk `index`, dropping the chunks before it.
    fn advance(&self, state: &mut State, index: u64) {
        state.base = index;
        state.next = state.next.max(index);
        state.requeued.retain(|&i| i >= index);
        let passed: Vec<u64> = state.ready.keys().copied().filter(|&i| i < index).collect();
        for i in passed {
            let buffer = state.ready.remove(&i).expect("listed");
            state.spare.push(buffer);
        }
        self.moved.notify_all();
    }

    /// Stops serving from the window; chunks in flight are dropped when they arrive.
    fn stop_window(&self, state: &mut State) {
        state.active = false;
        state.generation += 1;
        state.requeued.clear();
        let held: Vec<Vec<u8>> = state.ready.drain().map(|(_, b)| b).collect();
        state.spare.extend(held);
    }

    /// Chunks in the file.
    fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk)
    }

    /// The next chunk a worker should fetch, if any.
    fn claim(&self, state: &mut State) -> Option<u64> {
        if !state.active || state.off || state.failed.is_some() {
            return None;
        }
        // Buffers held (fetched and being fetched) never exceed the window.
        if state.ready.len() + state.fetching >= self.slots as usize {
            return None;
        }
        if let Some(index) = state.requeued.pop_first() {
            return Some(index);
        }
        let end = (state.base + self.slots).min(self.chunks());
        if state.next < end {
            state.next += 1;
            return Some(state.next - 1);
        }
        None
    }

    /// A worker's loop: fetch chunks while the window wants them.
    fn work(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let mut state = self.lock();
            let index = loop {
                if self.closed.load(Ordering::Relaxed) || state.workers > state.allowed || state.off {
                    state.workers -= 1;
                    return;
                }
                if let Some(index) = self.claim(&mut state) {
                    break index;
                }
                state = self.moved.wait(state).unwrap_or_else(|p| p.into_inner());
            };
            let generation = state.generation;
            state.fetching += 1;
            let mut buffer = state.spare.pop().unwrap_or_default();
            drop(state);

            let start = index * self.chunk;
            let end = (start + self.chunk).min(self.len);
            let fetched = self.fetch(start, end, &mut buffer);

            let mut state = self.lock();
            state.fetching -= 1;
            let current = generation == state.generation && index >= state.base;
            match fetched {
                Fetched::Done => {
                    failures = 0;
                    if current {
                        state.ready.insert(index, buffer);
                        self.grow(&mut state, end - start);
                    } else {
                        state.spare.push(buffer);
                    }
                    self.arrived.notify_all();
                }
                Fetched::Refused(why) => {
                    state.spare.push(buffer);
                    if current {
                        state.requeued.insert(index);
                    }
                    state.growth.settled = true;
                    if state.workers > 1 {
                        state.allowed = (state.workers - 1).min(state.allowed).max(1);
                        log::warn!(
                            "{}: {why} at offset {start}; continuing on {} connection{}",
                            self.client.name(),
                            state.allowed,
                            if state.allowed == 1 { "" } else { "s" }
                        );
                        state.workers -= 1;
                        self.moved.notify_all();
                        return;
                    }
                    failures += 1;
                    if failures > self.client.options.retries {
                        state.failed = Some(
                            self.client
                                .error(ErrorKind::Io, format!("{why}, {failures} times in a row; giving up"))
                                .at_offset(start),
                        );
                        self.arrived.notify_all();
                        state.workers -= 1;
                        return;
                    }
                    log::warn!("{}: {why} at offset {start}; retrying", self.client.name());
                    drop(state);
                    if let Err(e) = self.client.pause(backoff(failures)) {
                        self.fail(e);
                    }
                    self.moved.notify_all();
                }
                Fetched::NoRange => {
                    state.spare.push(buffer);
                    if !state.off {
                        log::warn!(
                            "{}: the server answered a range request at offset {start} with the whole file; \
                             reading on one connection",
                            self.client.name()
                        );
                    }
                    state.off = true;
                    self.stop_window(&mut state);
                    state.workers -= 1;
                    self.arrived.notify_all();
                    self.moved.notify_all();
                    return;
                }
                Fetched::Failed(error) => {
                    if current && state.failed.is_none() {
                        state.failed = Some(error);
                    }
                    state.workers -= 1;
                    self.arrived.notify_all();
                    return;
                }
            }
        }
    }

    /// Ends the window with `error` (a stop asked for while waiting to retry).
    fn fail(&self, error: Error) {
        let mut state = self.lock();
        if state.failed.is_none() {
            state.failed = Some(error);
        }
        self.arrived.notify_all();
    }

    /// The slow start: counts `bytes` arrived; at the end of each period, one more connection if the rate grew.
    fn grow(self: &Arc<Self>, state: &mut State, bytes: u64) {
        if state.growth.settled {
            return;
        }
        state.growth.bytes += bytes;
        let elapsed = state.growth.since.elapsed();
        if elapsed < PERIOD || state.growth.bytes < 2 * state.allowed as u64 * self.chunk {
            return;
        }
        let rate = state.growth.bytes as f64 / elapsed.as_secs_f64();
        let expected = 1.0 / (state.allowed.max(2) - 1) as f64;
        let grew = rate > state.growth.best * (1.0 + GROWTH * expected);
        let verdict = match (grew, state.allowed < self.cap) {
            (true, true) => "; adding one",
            (true, false) => "; the most allowed",
            (false, _) => ": no faster than with one fewer, going back to it",
        };
        log::debug!("{}: {:.1} MB/s on {} connections{verdict}", self.client.name(), rate / 1e6, state.allowed);
        if grew && state.allowed < self.cap {
            state.growth.best = rate;
            if spawn(self, state) {
                state.allowed += 1;
            } else {
                state.growth.settled = true;
            }
        } else {
            if !grew && state.allowed > START_CONNECTIONS {
                // The last one added did not pay: its worker leaves at its next chunk.
                state.allowed -= 1;
            }
            state.growth.settled = true;
        }
        state.growth.since = Instant::now();
        state.growth.bytes = 0;
    }

    /// Fetches bytes `start..end` into `buffer`, resuming a dropped transfer where it stopped.
    fn fetch(&self, start: u64, end: u64, buffer: &mut Vec<u8>) -> Fetched {
        // The window's own chunk size, never the server's word, sizes the buffer.
        buffer.resize((end - start) as usize, 0);
        let mut got = 0usize;
        let mut failures = 0u32;
        loop {
            let at = start + got as u64;
            let why = match self.fetch_part(at, end, &mut buffer[got..]) {
                Ok(n) => {
                    got += n;
                    if at + n as u64 == end {
                        return Fetched::Done;
                    }
                    "the server closed the body early".to_string()
                }
                Err(Part::Fetched(fetched)) if got == 0 || !matches!(fetched, Fetched::Refused(_)) => return fetched,
                Err(Part::Fetched(Fetched::Refused(why))) => why,
                Err(Part::Fetched(_)) => unreachable!("matched above"),
                Err(Part::Dropped(n, why)) => {
                    got += n;
                    why
                }
            };
            if self.closed.load(Ordering::Relaxed) {
                return Fetched::Failed(self.client.error(ErrorKind::Interrupted, "source closed"));
            }
            failures += 1;
            let retries = self.client.options.retries;
            let at = start + got as u64;
            if failures > retries {
                return Fetched::Failed(
                    self.client
                        .error(ErrorKind::Io, format!("transfer failed {failures} times in a row, giving up: {why}"))
                        .at_offset(at),
                );
            }
            log::warn!("{}: {why} at offset {at}; resuming (retry {failures} of {retries})", self.client.name());
            if let Err(e) = self.client.pause(backoff(failures)) {
                return Fetched::Failed(e);
            }
        }
    }

    /// One request for `at..end`, read into `out` (its length is `end - at`): the bytes read, or why it ended.
    fn fetch_part(&self, at: u64, end: u64, out: &mut [u8]) -> std::result::Result<usize, Part> {
        let client = &self.client;
        let response = match client.get_any(Some((at, Some(end - 1))), true) {
            Ok(response) => response,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Err(Part::Fetched(Fetched::Failed(e))),
            // A stall fails as on one connection: within the stall timeout.
            Err(e) if is_stall(&e) => return Err(Part::Fetched(Fetched::Failed(e.at_offset(at)))),
            // No connection (refused, reset): the server takes fewer connections than asked.
            Err(e) => return Err(Part::Fetched(Fetched::Refused(e.to_string()))),
        };
        let fail = |what: String| Part::Fetched(Fetched::Failed(client.error(ErrorKind::Io, what).at_offset(at)));
        match (response.status, response.content_range()) {
            (206, range) => {
                let now = super::validator(&response);
                if changed(self.identity.as_deref(), now.as_deref()) {
                    return Err(fail(format!(
                        "the file changed during the import ({} at first, now {})",
                        self.identity.as_deref().unwrap_or_default(),
                        now.unwrap_or_default()
                    )));
                }
                let last = end - 1;
                match range {
                    Some((first, got_last, total))
                        if first == at && got_last == last && total.is_none_or(|t| t == self.len) => {}
                    Some((first, got_last, total)) => {
                        return Err(fail(format!(
                            "asked for bytes {at}-{last} of a {}-byte file, got {first}-{got_last}/{}",
                            self.len,
                            total.map_or("*".into(), |t| t.to_string())
                        )))
                    }
                    None => {
                        return Err(fail(format!("asked for bytes {at}-{last}, got an answer without Content-Range")))
                    }
                }
                if response.content_length().is_some_and(|l| l != end - at) {
                    return Err(fail(format!(
                        "server's Content-Length {} disagrees with its Content-Range {at}-{last}",
                        response.content_length().unwrap_or(0)
                    )));
                }
            }
            (200, _) => return Err(Part::Fetched(Fetched::NoRange)),
            (429 | 503, _) => {
                return Err(Part::Fetched(Fetched::Refused(format!("server answered HTTP {}", response.status))))
            }
            (416, _) => {
                return Err(fail(format!(
                    "server says offset {at} lies past the end of the file (HTTP 416), though it announced {} bytes",
                    self.len
                )))
            }
            (_, _) => return Err(Part::Fetched(Fetched::Failed(client.refusal(response).at_offset(at)))),
        }
        let receiving = self.receiving.fetch_add(1, Ordering::Relaxed) + 1;
        if self.peak.fetch_max(receiving, Ordering::Relaxed) < receiving {
            self.client.note_parallel(receiving, self.slots * self.chunk);
        }
        let read = self.read_body(response, at, end, out);
        self.receiving.fetch_sub(1, Ordering::Relaxed);
        read
    }

    /// Reads the body of the range `at..end` into `out`.
    fn read_body(&self, mut response: Response, at: u64, end: u64, out: &mut [u8]) -> std::result::Result<usize, Part> {
        let client = &self.client;
        let mut done = 0;
        while done < out.len() {
            if self.closed.load(Ordering::Relaxed) {
                return Err(Part::Fetched(Fetched::Failed(client.error(ErrorKind::Interrupted, "source closed"))));
            }
            match response.read(&mut out[done..]) {
                Ok(0) => return Err(Part::Dropped(done, "the server closed the body early".into())),
                Ok(n) => done += n,
                Err(e) if is_timeout(&e) || is_stop(&e) => {
                    return Err(Part::Fetched(Fetched::Failed(
                        client.io_error("reading the body", e).at_offset(at + done as u64),
                    )))
                }
                Err(e) => return Err(Part::Dropped(done, e.to_string())),
            }
        }
        if let Err(e) = response.finish(client, Duration::ZERO) {
            return Err(Part::Fetched(Fetched::Failed(e.at_offset(end))));
        }
        Ok(done)
    }
}

/// Why one request ended before its bytes were all read.
enum Part {
    /// The request's outcome as a whole.
    Fetched(Fetched),
    /// The body broke off after this many bytes.
    Dropped(usize, String),
}

/// Starts one more worker (the caller holds the lock and has checked the connections allowed); whether it could.
fn spawn(shared: &Arc<Shared>, state: &mut State) -> bool {
    let worker = shared.clone();
    match thread::Builder::new().name("http-range".into()).spawn(move || worker.work()) {
        Ok(_) => {
            state.workers += 1;
            true
        }
        Err(e) => {
            log::warn!("{}: no thread for another connection: {e}", shared.client.name());
            false
        }
    }
}

/// The window's failure again, for each read that meets it.
fn copy(error: &Error) -> Error {
    let mut copy = Error::new(error.kind(), error.operation());
    if let Some(path) = error.path() {
        copy = copy.at_path(path);
    }
    match error.offset() {
        Some(offset) => copy.at_offset(offset),
        None => copy,
    }
}
