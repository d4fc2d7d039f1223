//! The HTTP/1.1 side of the upload server: one request per TLS connection, its head read within a time limit and a
//! size cap, its body handed out as a forward-only [`Body`] (`Content-Length` or chunked, `Expect: 100-continue`
//! honoured when the body is first read), and plain-text answers closing the connection.
//!
//! Every size that comes from the client is capped before it sizes anything: the request head
//! ([`MAX_HEAD`], [`MAX_HEADERS`]), a chunk-size line ([`MAX_CHUNK_LINE`]) and the trailers ([`MAX_HEAD`]).

use rustls::{ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest request head (request line and headers) accepted; larger gets 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted, as Go's 4096.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Read buffer of a connection.
const BUFFER: usize = 64 * 1024;

/// A TLS connection with a read buffer. The socket's read timeout is short (a tick); a read that gets nothing
/// retries until the idle limit, and gives up early when the stop flag is raised.
pub struct Conn {
    /// The TLS stream.
    pub tls: StreamOwned<ServerConnection, TcpStream>,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    stop: &'static AtomicBool,
    idle_limit: Duration,
}

/// Whether `e` is a socket read timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Conn {
    /// Wraps an accepted TLS stream (see [`handshake`](Self::handshake)); reads give up when `stop` is raised.
    pub fn new(tls: StreamOwned<ServerConnection, TcpStream>, stop: &'static AtomicBool) -> Self {
        Conn {
            tls,
            buf: vec![0u8; BUFFER].into_boxed_slice(),
            pos: 0,
            end: 0,
            stop,
            idle_limit: Duration::from_secs(10),
        }
    }

    /// How long a read may get nothing before it fails.
    pub fn set_idle_limit(&mut self, limit: Duration) {
        self.idle_limit = limit;
    }

    /// Completes the TLS handshake by `deadline`.
    pub fn handshake(&mut self, deadline: Instant) -> io::Result<()> {
        while self.tls.conn.is_handshaking() {
            match self.tls.conn.complete_io(&mut self.tls.sock) {
                Ok(_) => {}
                Err(e) if timed_out(&e) && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One read from the TLS stream, retried over socket timeouts up to the idle limit.
    fn read_tls(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.tls.read(out) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if timed_out(&e) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(io::Error::other("stopped by a signal"));
                    }
                    if started.elapsed() >= self.idle_limit {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the client sent nothing for {} s", self.idle_limit.as_secs()),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        let end = self.end;
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.read_tls(&mut buf[end..]);
        self.buf = buf;
        let n = result?;
        self.end += n;
        Ok(n)
    }

    /// Reads one line ending in LF (CR LF or LF), at most `max` bytes; returns it without the line end.
    pub fn read_line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            if let Some(i) = self.buf[self.pos..self.end].iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&self.buf[self.pos..self.pos + i]);
                self.pos += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            line.extend_from_slice(&self.buf[self.pos..self.end]);
            self.pos = self.end;
            if line.len() > max {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("line longer than {max} bytes")));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a line"));
            }
        }
    }

    /// Reads the request head (through the empty line). `Ok(None)`: the client closed before sending anything.
    pub fn read_head(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, HeadError> {
        let mut head = Vec::new();
        loop {
            let window_start = head.len().saturating_sub(3);
            head.extend_from_slice(&self.buf[self.pos..self.end]);
            let consumed = self.end - self.pos;
            self.pos = self.end;
            if let Some(i) = head[window_start..].windows(4).position(|w| w == b"\r\n\r\n") {
                let head_end = window_start + i + 4;
                if head_end > MAX_HEAD {
                    return Err(HeadError::TooLarge);
                }
                // Give back what belongs to the body.
                let extra = head.len() - head_end;
                self.pos -= extra.min(consumed);
                head.truncate(head_end);
                return Ok(Some(head));
            }
            if head.len() > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            if Instant::now() >= deadline {
                return Err(HeadError::Io(io::Error::new(io::ErrorKind::TimedOut, "request head timed out")));
            }
            self.idle_limit = deadline.saturating_duration_since(Instant::now());
            match self.fill() {
                Ok(0) if head.is_empty() => return Ok(None),
                Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(HeadError::Io(e)),
            }
        }
    }

    /// Writes a complete answer and closes the TLS session (close_notify).
    pub fn respond(&mut self, status: u16, body: &str) -> io::Result<()> {
        let answer = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            reason(status),
            body.len()
        );
        self.tls.write_all(answer.as_bytes())?;
        self.tls.conn.send_close_notify();
        self.tls.flush()
    }

    /// Reads and discards up to `limit` bytes or for at most `time` (after a refusal, so closing the socket with
    /// unread data does not reset the connection before the client has read the answer).
    pub fn drain(&mut self, limit: u64, time: Duration) {
        let deadline = Instant::now() + time;
        // Our side is finished: the client sees the end of the answer even while it still sends.
        let _ = self.tls.sock.shutdown(std::net::Shutdown::Write);
        let mut drained = (self.end - self.pos) as u64;
        self.pos = self.end;
        self.idle_limit = time;
        while drained < limit && Instant::now() < deadline {
            match self.fill() {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    drained += n as u64;
                    self.pos = self.end;
                }
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.end {
            if out.len() >= self.buf.len() {
                return self.read_tls(out);
            }
            if self.fill()? == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.end - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Why a request head could not be read.
#[derive(Debug)]
pub enum HeadError {
    /// Larger than [`MAX_HEAD`].
    TooLarge,
    /// The connection failed or timed out.
    Io(io::Error),
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    /// The method, as sent.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Header fields in order (names as sent).
    pub headers: Vec<(String, String)>,
}

/// Why a request head is refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal { status, message: message.into() }
    }
}

impl Request {
    /// Parses a complete head.
    pub fn parse(head: &[u8]) -> Result<Request, Refusal> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(Refusal::new(400, "400 Bad Request: incomplete request")),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::new(431, "431 Request Header Fields Too Large"));
            }
            Err(e) => return Err(Refusal::new(400, format!("400 Bad Request: {e}"))),
        }
        if request.version != Some(1) {
            return Err(Refusal::new(505, "505 HTTP Version Not Supported"));
        }
        let target = request.path.unwrap_or("/");
        let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
        let headers = request
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
            .collect();
        Ok(Request { method: request.method.unwrap_or("").to_string(), path, headers })
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// How the body is framed.
    pub fn framing(&self) -> Result<Framing, Refusal> {
        let encodings: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if !encodings.is_empty() {
            return match encodings.as_slice() {
                [one] if one.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                _ => Err(Refusal::new(501, format!("Unsupported transfer encoding: {}", encodings.join(", ")))),
            };
        }
        let mut length = None;
        for (_, value) in self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
            let parsed = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Refusal::new(400, format!("400 Bad Request: bad Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(Refusal::new(400, "400 Bad Request: conflicting Content-Length headers"));
            }
            length = Some(parsed);
        }
        Ok(Framing::Length(length.unwrap_or(0)))
    }

    /// Whether the client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` bytes (0 when there is no length and no chunking).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A shared connection: the body reads it while the handler waits, then answers on it.
pub type Shared = Arc<Mutex<Conn>>;

/// Locks `conn`, whether or not a reader panicked while holding it.
pub fn lock(conn: &Shared) -> MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Clone, Copy)]
enum BodyState {
    Length { remaining: u64 },
    ChunkStart,
    InChunk { remaining: u64 },
    Done,
}

/// A request body as a forward-only stream: exactly the body's bytes, then end of stream; a client that stops
/// early is an error (`UnexpectedEof`), never a short body.
pub struct Body {
    conn: Shared,
    state: BodyState,
    total: Option<u64>,
    received: u64,
    send_continue: bool,
}

impl Body {
    /// The body of a request framed as `framing` on `conn`; `send_continue` answers `100 Continue` on first read.
    pub fn new(conn: Shared, framing: Framing, send_continue: bool) -> Self {
        let (state, total) = match framing {
            Framing::Length(0) => (BodyState::Done, Some(0)),
            Framing::Length(n) => (BodyState::Length { remaining: n }, Some(n)),
            Framing::Chunked => (BodyState::ChunkStart, None),
        };
        Body { conn, state, total, received: 0, send_continue }
    }

    /// How long the client may send nothing before the body fails.
    pub fn set_idle_limit(&mut self, limit: Duration) {
        lock(&self.conn).set_idle_limit(limit);
    }

    /// The body length, when the client declared it.
    pub fn len(&self) -> Option<u64> {
        self.total
    }

    fn ended(&mut self) {
        self.state = BodyState::Done;
    }

    fn early_end(&self) -> io::Error {
        let what = match self.total {
            Some(total) => format!("the client closed the connection after {} of {total} body bytes", self.received),
            None => {
                format!("the client closed the connection after {} body bytes (chunked, no last chunk)", self.received)
            }
        };
        io::Error::new(io::ErrorKind::UnexpectedEof, what)
    }

    fn read_body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut conn = lock(&self.conn);
        if std::mem::take(&mut self.send_continue) {
            conn.tls.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            conn.tls.flush()?;
        }
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length { remaining } | BodyState::InChunk { remaining } => {
                    let want = out.len().min(remaining.min(usize::MAX as u64) as usize);
                    let n = match conn.read(&mut out[..want]) {
                        Ok(0) => return Err(self.early_end()),
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(self.early_end()),
                        Err(e) => {
                            return Err(io::Error::new(e.kind(), format!("{e} (after {} body bytes)", self.received)))
                        }
                    };
                    self.received += n as u64;
                    let left = remaining - n as u64;
                    match self.state {
                        BodyState::Length { .. } if left == 0 => {
                            drop(conn);
                            self.ended();
                            return Ok(n);
                        }
                        BodyState::Length { .. } => self.state = BodyState::Length { remaining: left },
                        BodyState::InChunk { .. } if left == 0 => {
                            let crlf = conn.read_line(2).map_err(|e| self.chunk_error(e))?;
                            if !crlf.is_empty() {
                                return Err(bad_chunk("chunk data not followed by CRLF"));
                            }
                            self.state = BodyState::ChunkStart;
                        }
                        _ => self.state = BodyState::InChunk { remaining: left },
                    }
                    return Ok(n);
                }
                BodyState::ChunkStart => {
                    let line = conn.read_line(MAX_CHUNK_LINE).map_err(|e| self.chunk_error(e))?;
                    let size = parse_chunk_size(&line)?;
                    if size == 0 {
                        // Trailers, through the empty line.
                        let mut trailer_bytes = 0;
                        loop {
                            let trailer = conn.read_line(MAX_HEAD).map_err(|e| self.chunk_error(e))?;
                            if trailer.is_empty() {
                                break;
                            }
                            trailer_bytes += trailer.len();
                            if trailer_bytes > MAX_HEAD {
                                return Err(bad_chunk("trailers too large"));
                            }
                        }
                        drop(conn);
                        self.ended();
                        return Ok(0);
                    }
                    self.state = BodyState::InChunk { remaining: size };
                }
            }
        }
    }

    fn chunk_error(&self, e: io::Error) -> io::Error {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => self.early_end(),
            io::ErrorKind::InvalidData => bad_chunk(&e.to_string()),
            _ => e,
        }
    }
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.read_body(out)
    }
}

fn bad_chunk(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed chunked body: {what}"))
}

/// The size of a chunk from its size line (hex digits, then optional `;extensions`).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad_chunk(&format!("bad chunk size line {:?}", String::from_utf8_lossy(line))));
    }
    let text = std::str::from_utf8(digits).map_err(|_| bad_chunk("chunk size is not ASCII"))?;
    u64::from_str_radix(text, 16).map_err(|_| bad_chunk("chunk size out of range"))
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Request {
        Request::parse(head.as_bytes()).unwrap()
    }

    #[test]
    fn parses_heads_and_framing() {
        let r = request(
            "POST /v1beta1/upload?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Cdi-Content-Type: archive\r\n\r\n",
        );
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1beta1/upload"));
        assert_eq!(r.header("x-cdi-content-type"), Some("archive"));
        assert_eq!(r.framing(), Ok(Framing::Length(12)));
        let r = request("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(r.framing(), Ok(Framing::Chunked));
        assert_eq!(request("GET / HTTP/1.1\r\n\r\n").framing(), Ok(Framing::Length(0)));
        assert_eq!(request("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").framing().unwrap_err().status, 501);
        for bad in ["-1", "1x", "", "99999999999999999999999"] {
            let r = request(&format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n"));
            assert_eq!(r.framing().unwrap_err().status, 400, "{bad:?}");
        }
        let r = request("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(r.framing().unwrap_err().status, 400);
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(Request::parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err().status, 431);
        assert_eq!(Request::parse(b"GET / HTTP/1.0\r\n\r\n").unwrap_err().status, 505);
        assert_eq!(Request::parse(b"\x00\x01 / HTTP/1.1\r\n\r\n").unwrap_err().status, 400);
    }

    #[test]
    fn mangled_heads_never_panic() {
        let valid: &[u8] = b"POST /v1beta1/upload-form?x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\
                             Transfer-Encoding: chunked\r\n\r\n";
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut head = valid.to_vec();
            for _ in 0..(next() % 6 + 1) {
                let at = (next() % head.len() as u64) as usize;
                match next() % 3 {
                    0 => head[at] = next() as u8,
                    1 => {
                        head.remove(at);
                    }
                    _ => head.insert(at, next() as u8),
                }
            }
            if let Ok(request) = Request::parse(&head) {
                let _ = (request.framing(), request.expects_continue(), request.header("content-type"));
            }
        }
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a").unwrap(), 26);
        assert_eq!(parse_chunk_size(b"0;name=value").unwrap(), 0);
        assert_eq!(parse_chunk_size(b"FFFFFFFFFFFFFFFF").unwrap(), u64::MAX);
        for bad in [&b""[..], b"g", b"11111111111111111", b" ;", b"-1"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}
