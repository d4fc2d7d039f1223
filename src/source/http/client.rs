//! A small blocking HTTP/1.1 client: GET with optional Range, Content-Length and chunked bodies, redirects, basic
//! auth, extra headers, proxies from the environment, TLS through rustls.
//!
//! Blocking on purpose: the importer is synchronous, so each transfer is read straight into the caller's buffer
//! with the socket as the only buffer (back-pressure is the TCP window), and the stall timeout is the socket's read
//! timeout. Owning the connection also lets us check what async clients hide: a body that ends before its
//! Content-Length, and bytes sent past it.

use super::tls;
use crate::error::{Error, ErrorKind, Result};
use crate::source::HttpOptions;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use url::Url;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Idle keep-alive connections kept for reuse: one for each connection parallel range requests may open.
const MAX_IDLE: usize = 16;
/// Socket read buffer.
const READ_BUFFER: usize = 64 << 10;
/// Longest a socket read blocks before the stop flag is looked at again: how late a stop may end a stalled or
/// trickling download (a signal's EINTR reaches only the thread it lands on, so it cannot be relied on).
const STOP_POLL: Duration = Duration::from_millis(200);

/// Per-request authorization for sources whose credentials sign each request (S3's SigV4) or expire (GCS's
/// OAuth2 tokens): the client asks for the headers just before sending, so a retry or a late range request carries
/// fresh ones, and asks it to put an error answer into words.
pub trait Authorize: Send + Sync {
    /// Headers that authorize one `GET` of `url` (sent only to the source's own origin).
    fn headers(&self, url: &Url) -> Result<Vec<(String, String)>>;

    /// The message for an error answer (status ≥ 400), given the start of its body; `None` keeps the client's.
    fn explain(&self, status: u16, body: &[u8]) -> Option<String>;
}

/// Most bytes of an error answer's body read for [`Authorize::explain`].
const MAX_ERROR_BODY: u64 = 16 << 10;

/// A byte stream a request runs over: plain TCP or TLS.
pub(crate) trait Transport: Read + Write + Send {}
impl<T: Read + Write + Send> Transport for T {}

/// One open connection, with the origin it talks to.
pub(crate) struct Conn {
    /// `scheme://host:port` of the origin.
    origin: String,
    /// Buffered reads over the transport.
    io: BufReader<Box<dyn Transport>>,
    /// How long a read may wait for a byte, in milliseconds: the stall timeout, or a linger at a body's end.
    wait: Arc<AtomicU64>,
}

/// The TCP socket under a connection, read in short waits: a read fails when the stop flag is raised (at once,
/// whatever the peer does) or when no byte came for the connection's wait; EINTR is never an error of its own.
struct Watched {
    tcp: TcpStream,
    wait: Arc<AtomicU64>,
    stop: Option<&'static AtomicBool>,
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        loop {
            check_stop(self.stop)?;
            match self.tcp.read(buf) {
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    let wait = Duration::from_millis(self.wait.load(Ordering::Relaxed));
                    if started.elapsed() >= wait {
                        check_stop(self.stop)?;
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no data"));
                    }
                }
                other => return other,
            }
        }
    }
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        check_stop(self.stop)?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// The error a read or wait ends with once a stop was asked for: an interruption, never a network fault to retry.
fn check_stop(stop: Option<&'static AtomicBool>) -> io::Result<()> {
    match stop {
        Some(stop) if stop.load(Ordering::Relaxed) => {
            Err(io::Error::other(Error::new(ErrorKind::Interrupted, "download stopped")))
        }
        _ => Ok(()),
    }
}

/// Whether `e` is the stop of [`check_stop`].
pub(crate) fn is_stop(e: &io::Error) -> bool {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()).is_some_and(|e| e.kind() == ErrorKind::Interrupted)
}

/// The HTTP client for one source URL.
pub struct Client {
    /// The URL as given, without credentials.
    url: Url,
    /// The URL to request now: the given one, or where it redirected to.
    current: Mutex<Url>,
    /// A redirect left the hosts the user's credential headers were given for: they are not sent again, even if a
    /// later redirect comes back (Go's client, which CDI uses, strips them for the rest of the chain too).
    left_trust: AtomicBool,
    /// What to call the source in messages: the given URL without credentials.
    name: String,
    /// `Authorization` value for the source's origin.
    auth: Option<String>,
    /// Options from the plan.
    pub(crate) options: HttpOptions,
    /// TLS settings, built on first use.
    tls: OnceLock<std::result::Result<Arc<rustls::ClientConfig>, String>>,
    /// Idle keep-alive connections.
    idle: Mutex<Vec<Conn>>,
    /// Requests sent, redirects included.
    requests: AtomicU64,
    /// Body bytes received, over every response.
    received: Arc<AtomicU64>,
    /// Signs each request to the source's origin, for object stores.
    authorizer: Option<Arc<dyn Authorize>>,
    /// Most connections that carried range requests at once (0 until parallel ranges ran).
    connections: AtomicU64,
    /// Bytes of the parallel ranges' reorder window (0 when they never ran).
    window: AtomicU64,
}

/// A response whose body is read through [`Read`].
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

/// How the end of a body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    /// Chunked: bytes left in the current chunk (0: a size line comes next).
    Chunked(u64),
    /// Until the server closes the connection.
    Close,
    /// The body is complete.
    Done,
}

struct Body {
    conn: Option<Conn>,
    framing: Framing,
    /// Whether the connection may be reused once the body is read.
    keep_alive: bool,
    /// Declared Content-Length, for messages.
    declared: Option<u64>,
    /// Bytes of body delivered.
    delivered: u64,
    /// The client's count of body bytes received.
    received: Arc<AtomicU64>,
}

impl Client {
    /// A client for `url` with `options`; credentials in the URL's userinfo become basic auth (options win).
    pub fn new(url: &str, options: &HttpOptions) -> Result<Self> {
        let mut parsed = Url::parse(url).map_err(|e| Error::usage(format!("invalid URL: {e}")).at_path(url))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(Error::usage("only http:// and https:// URLs with a host are supported").at_path(url));
        }
        let url_user = percent_decode(parsed.username());
        let url_pass = parsed.password().map(percent_decode);
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        parsed.set_fragment(None);
        let user = options.username.clone().or((!url_user.is_empty()).then_some(url_user));
        let pass = options.password.clone().or(url_pass);
        let auth = user.map(|u| basic_auth(&u, pass.as_deref().unwrap_or("")));
        for (name, value) in &options.headers {
            check_header(name, value)?;
        }
        Ok(Client {
            name: parsed.to_string(),
            current: Mutex::new(parsed.clone()),
            left_trust: AtomicBool::new(false),
            url: parsed,
            auth,
            options: options.clone(),
            tls: OnceLock::new(),
            idle: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            received: Arc::new(AtomicU64::new(0)),
            authorizer: None,
            connections: AtomicU64::new(0),
            window: AtomicU64::new(0),
        })
    }

    /// A client for `url`, called `name` in messages (an `s3://` or `gs://` object), whose requests `authorizer`
    /// signs (basic auth from `options` is not sent).
    pub fn with_authorizer(
        url: &str,
        name: &str,
        options: &HttpOptions,
        authorizer: Arc<dyn Authorize>,
    ) -> Result<Self> {
        let options = HttpOptions { username: None, password: None, ..options.clone() };
        Ok(Client { authorizer: Some(authorizer), name: name.to_string(), ..Client::new(url, &options)? })
    }

    /// The URL without credentials, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Body bytes received so far (as sent: compressed layers count as stored).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Most connections that carried this source's bytes at once: 1 unless parallel range requests ran.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed).max(1)
    }

    /// Bytes of the reorder window parallel range requests used, if they ran.
    pub fn window(&self) -> Option<u64> {
        Some(self.window.load(Ordering::Relaxed)).filter(|&w| w > 0)
    }

    /// Records that parallel range requests ran on `connections` at once through a `window`-byte window.
    pub(crate) fn note_parallel(&self, connections: usize, window: u64) {
        self.connections.fetch_max(connections as u64, Ordering::Relaxed);
        self.window.fetch_max(window, Ordering::Relaxed);
    }

    /// An error about this URL.
    pub(crate) fn error(&self, kind: ErrorKind, what: impl Into<String>) -> Error {
        Error::new(kind, what).at_path(&self.name)
    }

    /// Sends `GET` with an optional `Range: bytes=START-[END]`, following redirects, and returns the response head
    /// with its body unread. Statuses other than 2xx and 416 are errors.
    pub fn get(&self, range: Option<(u64, Option<u64>)>, keep_alive: bool) -> Result<Response> {
        let response = self.get_any(range, keep_alive)?;
        match response.status {
            200..=299 => Ok(response),
            // An object store's 416 comes with its own explanation.
            416 if self.authorizer.is_none() => Ok(response),
            _ => Err(self.refusal(response)),
        }
    }

    /// [`get`](Self::get), returning the final answer whatever its status (redirects followed): for a caller that
    /// treats some refusals (429, 503) as a reason to slow down rather than fail.
    pub(crate) fn get_any(&self, range: Option<(u64, Option<u64>)>, keep_alive: bool) -> Result<Response> {
        let mut url = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for _ in 0..=MAX_REDIRECTS {
            let response = self.send("GET", &url, range, keep_alive, &[], &[])?;
            match response.status {
                301 | 302 | 303 | 307 | 308 => {
                    let location = response.header("location").ok_or_else(|| {
                        self.error(ErrorKind::Io, format!("redirect {} without a Location", response.status))
                    })?;
                    let next = url.join(location).map_err(|e| {
                        self.error(ErrorKind::Io, format!("redirect to an invalid location {location:?}: {e}"))
                    })?;
                    if !matches!(next.scheme(), "http" | "https") {
                        return Err(self.error(ErrorKind::Io, format!("redirect to unsupported URL {next}")));
                    }
                    log::debug!("{}: redirected ({}) to {next}", self.name, response.status);
                    if !self.trusts(&next) && !self.left_trust.swap(true, Ordering::Relaxed) {
                        log::debug!("{}: not sending credential headers to {}", self.name, origin(&next));
                    }
                    drop(response);
                    url = next;
                }
                200..=299 | 416 => {
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) = url;
                    return Ok(response);
                }
                _ => return Ok(response),
            }
        }
        Err(self.error(ErrorKind::Io, format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// The error for a refused `GET` (a status other than 2xx, 3xx and 416), in the object store's words when it
    /// has some.
    pub(crate) fn refusal(&self, response: Response) -> Error {
        let status = response.status;
        if let (Some(authorizer), 400..) = (&self.authorizer, status) {
            let mut body = Vec::new();
            let _ = response.take(MAX_ERROR_BODY).read_to_end(&mut body);
            if let Some(message) = authorizer.explain(status, &body) {
                return self.error(ErrorKind::Io, message);
            }
            return self.error(ErrorKind::Io, format!("server answered HTTP {status}"));
        }
        match status {
            401 | 407 => {
                let what = if self.auth.is_some() { "credentials refused" } else { "authentication required" };
                self.error(ErrorKind::Io, format!("{what} (HTTP {status})"))
            }
            _ => self.error(ErrorKind::Io, format!("server answered HTTP {status}")),
        }
    }

    /// Sends one `GET` to `url` (any origin: a registry's blob redirect, its token service) with `headers` added
    /// (an `Accept` given here replaces the default), and returns the response head whatever its status, without
    /// following redirects: the caller decides what to do with 3xx and 401 answers. The client's own basic auth is
    /// sent only to its own origin, as for [`get`](Self::get).
    pub fn request(
        &self,
        url: &Url,
        range: Option<(u64, Option<u64>)>,
        keep_alive: bool,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.error(ErrorKind::Io, format!("unsupported URL {url}")));
        }
        self.send("GET", url, range, keep_alive, headers, &[])
    }

    /// Sends one `method` request (`POST`, `OPTIONS`, …) to `url` with `headers` and `body`, and returns the
    /// response head whatever its status, without following redirects: an API call (an oVirt engine's REST
    /// service, an imageio daemon's `OPTIONS`) whose answer the caller interprets.
    pub fn call(&self, method: &str, url: &Url, headers: &[(&str, &str)], body: &[u8]) -> Result<Response> {
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.error(ErrorKind::Io, format!("unsupported URL {url}")));
        }
        self.send(method, url, None, true, headers, body)
    }

    /// Sends one `POST` of the form `form` (`application/x-www-form-urlencoded`) to `url`, without redirects
    /// (an OAuth2 token request), and returns the response head whatever its status.
    pub fn post_form(&self, url: &Url, form: &str) -> Result<Response> {
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.error(ErrorKind::Io, format!("unsupported URL {url}")));
        }
        self.send("POST", url, None, false, &[("Content-Type", "application/x-www-form-urlencoded")], form.as_bytes())
    }

    /// Sends one request to `url` (a `GET`, or a `POST` of `body`) and reads the response head. A GET whose new
    /// connection is dropped before any answer (a restarting server or balancer, a reset) is sent again, under the
    /// same retry budget as a body cut short: it is safe to repeat.
    fn send(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, Option<u64>)>,
        keep_alive: bool,
        given: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        let mut attempt = 0;
        loop {
            match self.send_once(method, url, range, keep_alive, given, body) {
                Ok(response) => return Ok(response),
                Err(Unanswered(e)) if method == "GET" && attempt < self.options.retries => {
                    attempt += 1;
                    log::warn!("{}: {e} (retry {attempt} of {})", self.name, self.options.retries);
                    self.pause(super::backoff(attempt))?;
                }
                Err(Unanswered(e)) => return Err(self.io_error("reading the response", e)),
                Err(Failed(e)) => return Err(e),
            }
        }
    }

    /// One attempt of `send`.
    fn send_once(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, Option<u64>)>,
        keep_alive: bool,
        given: &[(&str, &str)],
        body: &[u8],
    ) -> std::result::Result<Response, SendFailure> {
        let origin = origin(url);
        let proxy = ProxyEnv::from_process().proxy_for(url);
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            match idle.iter().rposition(|conn| conn.origin == origin) {
                Some(at) if proxy.is_none() => Some(idle.swap_remove(at)),
                _ => None,
            }
        };
        let signed = match &self.authorizer {
            Some(authorizer) if origin == self::origin(&self.url) => authorizer.headers(url).map_err(Failed)?,
            _ => Vec::new(),
        };
        // The body's length goes into the head with the method (`request_head`).
        let extra: Vec<(&str, &str)> =
            given.iter().copied().chain(signed.iter().map(|(n, v)| (n.as_str(), v.as_str()))).collect();
        let extra = extra.as_slice();
        let fresh = reused.is_none();
        let mut conn = match reused {
            Some(conn) => conn,
            None => self.connect(url, proxy.as_ref()).map_err(Failed)?,
        };
        let head = self.request_head(method, url, range, keep_alive, proxy.as_ref(), extra, body.len());
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = conn
            .io
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|()| conn.io.get_mut().write_all(body))
            .and_then(|()| conn.io.get_mut().flush());
        let response = sent.and_then(|()| read_head(&mut conn.io));
        match response {
            Ok((status, headers)) => Ok(Response::new(status, headers, conn, keep_alive, self.received.clone())),
            // A reused connection the server had closed meanwhile: once more on a new one.
            Err(_) if !fresh => self.send_once(method, url, range, keep_alive, given, body),
            Err(e) if dropped_before_answer(&e) => Err(Unanswered(e)),
            Err(e) => Err(Failed(self.io_error("reading the response", e))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn request_head(
        &self,
        method: &str,
        url: &Url,
        range: Option<(u64, Option<u64>)>,
        keep_alive: bool,
        proxy: Option<&Url>,
        extra: &[(&str, &str)],
        body_len: usize,
    ) -> String {
        let target = match proxy {
            Some(_) if url.scheme() == "http" => url.as_str().to_string(),
            _ => {
                let mut t = url.path().to_string();
                if let Some(q) = url.query() {
                    t.push('?');
                    t.push_str(q);
                }
                t
            }
        };
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: boundimport/{}\r\nAccept-Encoding: identity\r\n",
            host_header(url),
            env!("CARGO_PKG_VERSION")
        );
        if !extra.iter().any(|(name, _)| name.eq_ignore_ascii_case("accept")) {
            head.push_str("Accept: */*\r\n");
        }
        for (name, value) in extra {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if method != "GET" {
            head.push_str(&format!("Content-Length: {body_len}\r\n"));
        }
        match range {
            Some((start, Some(end))) => head.push_str(&format!("Range: bytes={start}-{end}\r\n")),
            Some((start, None)) => head.push_str(&format!("Range: bytes={start}-\r\n")),
            None => {}
        }
        if let Some(auth) = &self.auth {
            // Credentials go only to the origin they were given for, not to where it redirects.
            if origin(url) == origin(&self.url) {
                head.push_str(&format!("Authorization: {auth}\r\n"));
            }
        }
        if let (Some(proxy), "http") = (proxy, url.scheme()) {
            if let Some(auth) = proxy_auth(proxy) {
                head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
            }
        }
        let credentials_ok = self.trusts(url) && !self.left_trust.load(Ordering::Relaxed);
        for (name, value) in &self.options.headers {
            if credentials_ok || !is_credential(name) {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
        head
    }

    /// Opens a connection to `url`'s origin, through `proxy` if given (CONNECT for https).
    fn connect(&self, url: &Url, proxy: Option<&Url>) -> Result<Conn> {
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default().unwrap_or(80);
        let (dial_host, dial_port) = match proxy {
            Some(p) => (
                p.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string(),
                p.port_or_known_default().unwrap_or(3128),
            ),
            None => (host.to_string(), port),
        };
        let tcp = self.dial(&dial_host, dial_port)?;
        let wait = Arc::new(AtomicU64::new(self.options.stall_timeout.as_millis() as u64));
        let mut transport: Box<dyn Transport> = Box::new(Watched { tcp, wait: wait.clone(), stop: self.options.stop });
        if let Some(proxy) = proxy.filter(|p| p.scheme() == "https") {
            // TLS to the proxy itself, verified like the origin (CDI mounts the proxy's CA in /proxycerts).
            transport = tls::wrap(self.tls_config()?, &dial_host, transport)
                .map_err(|e| self.io_error(&format!("starting TLS with the proxy {}", origin(proxy)), e))?;
        }
        if url.scheme() == "https" {
            if let Some(proxy) = proxy {
                transport = self.tunnel(transport, host, port, proxy)?;
            }
            transport = tls::wrap(self.tls_config()?, host, transport).map_err(|e| self.io_error("starting TLS", e))?;
        }
        Ok(Conn { origin: origin(url), io: BufReader::with_capacity(READ_BUFFER, transport), wait })
    }

    /// The TLS settings, built on first use.
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        self.tls
            .get_or_init(|| tls::client_config(&self.options).map(Arc::new))
            .clone()
            .map_err(|why| self.error(ErrorKind::Usage, why))
    }

    fn dial(&self, host: &str, port: u16) -> Result<TcpStream> {
        check_stop(self.options.stop).map_err(|e| self.io_error("connecting", e))?;
        let timeout = self.options.stall_timeout;
        let addrs = (host, port).to_socket_addrs().map_err(|e| self.io_error(&format!("resolving {host}"), e))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    tcp.set_read_timeout(Some(STOP_POLL.min(timeout)))
                        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
                        .map_err(|e| self.io_error("configuring the socket", e))?;
                    return Ok(tcp);
                }
                Err(e) => last = e,
            }
        }
        Err(self.io_error(&format!("connecting to {host}:{port}"), last))
    }

    /// Asks an HTTP proxy for a tunnel to `host:port`.
    fn tunnel(
        &self,
        mut transport: Box<dyn Transport>,
        host: &str,
        port: u16,
        proxy: &Url,
    ) -> Result<Box<dyn Transport>> {
        let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = proxy_auth(proxy) {
            head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        self.requests.fetch_add(1, Ordering::Relaxed);
        transport.write_all(head.as_bytes()).map_err(|e| self.io_error("talking to the proxy", e))?;
        // Read the proxy's answer byte by byte: nothing past its head may be consumed.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() > MAX_HEAD {
                return Err(self.error(ErrorKind::Io, "proxy answer too long"));
            }
            match transport.read(&mut byte) {
                Ok(0) => return Err(self.error(ErrorKind::Io, "proxy closed the connection")),
                Ok(_) => answer.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("reading the proxy's answer", e)),
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(&answer) {
            Ok(httparse::Status::Complete(_)) if parsed.code.is_some_and(|c| (200..300).contains(&c)) => Ok(transport),
            Ok(_) => Err(self.error(
                ErrorKind::Io,
                format!("proxy {} refused the tunnel (HTTP {})", origin(proxy), parsed.code.unwrap_or(0)),
            )),
            Err(e) => Err(self.error(ErrorKind::Io, format!("bad proxy answer: {e}"))),
        }
    }

    /// Whether the user's credential headers may go to `url`: Go's `shouldCopyHeaderOnRedirect` (the host, without
    /// port, is the given URL's host or a subdomain of it), and, stricter than Go, never from https down to
    /// plain http, where anyone on the path would read them.
    fn trusts(&self, url: &Url) -> bool {
        let downgrade = self.url.scheme() == "https" && url.scheme() == "http";
        !downgrade && is_domain_or_subdomain(&host_name(url), &host_name(&self.url))
    }

    /// Waits `pause` before a retry, or fails at once with an interruption when a stop is asked for meanwhile.
    pub(crate) fn pause(&self, pause: Duration) -> Result<()> {
        let until = Instant::now() + pause;
        loop {
            check_stop(self.options.stop).map_err(|e| self.io_error("waiting to retry", e))?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(STOP_POLL));
        }
    }

    /// Keeps a connection whose body was read completely for the next request.
    fn recycle(&self, conn: Conn) {
        conn.wait.store(self.options.stall_timeout.as_millis() as u64, Ordering::Relaxed);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(conn);
    }

    /// An I/O error about this URL, saying "stalled" for a read timeout.
    pub(crate) fn io_error(&self, what: &str, e: io::Error) -> Error {
        if is_timeout(&e) {
            return self.error(
                ErrorKind::Io,
                format!("{what}: no data for {} s {STALLED}", self.options.stall_timeout.as_secs_f64()),
            );
        }
        match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
            Some(_) => {
                let inner = e.into_inner().expect("checked above").downcast::<Error>().expect("checked above");
                *inner
            }
            None => Error::io(what, e).at_path(&self.name),
        }
    }
}

/// Why one attempt to send a request failed.
enum SendFailure {
    /// The connection was dropped before any answer came.
    Unanswered(io::Error),
    /// Anything else (dialling, TLS, a timeout, a stop, a malformed answer).
    Failed(Error),
}
use SendFailure::{Failed, Unanswered};

/// Whether `e` says the peer went away before answering (rather than a timeout, a stop or a malformed answer).
fn dropped_before_answer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// How [`Client::io_error`] ends the message of a stall.
const STALLED: &str = "(stalled)";

/// Whether `e` is a stall as [`Client::io_error`] words it: the server is there but sends nothing.
pub(crate) fn is_stall(e: &Error) -> bool {
    e.operation().ends_with(STALLED)
}

/// Whether `e` is a socket read/write timeout.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Response {
    fn new(
        status: u16,
        headers: Vec<(String, String)>,
        conn: Conn,
        asked_keep_alive: bool,
        received: Arc<AtomicU64>,
    ) -> Self {
        let find = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        let chunked = find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let declared = find("content-length").and_then(|v| v.trim().parse::<u64>().ok());
        let close = find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let framing = if status == 204 || status == 304 {
            Framing::Done
        } else if chunked {
            Framing::Chunked(0)
        } else if let Some(len) = declared {
            Framing::Length(len)
        } else {
            Framing::Close
        };
        Response {
            status,
            body: Body {
                conn: Some(conn),
                framing,
                keep_alive: asked_keep_alive && !close && framing != Framing::Close,
                declared: if chunked { None } else { declared },
                delivered: 0,
                received,
            },
            headers,
        }
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The declared Content-Length of the body, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.body.declared
    }

    /// `Content-Range: bytes START-END/TOTAL` as numbers (TOTAL `None` when `*`).
    pub fn content_range(&self) -> Option<(u64, u64, Option<u64>)> {
        let value = self.header("content-range")?.trim();
        let rest = value.strip_prefix("bytes")?.trim_start();
        let (span, total) = rest.split_once('/')?;
        let (start, end) = span.split_once('-')?;
        let total = match total.trim() {
            "*" => None,
            t => Some(t.parse().ok()?),
        };
        Some((start.trim().parse().ok()?, end.trim().parse().ok()?, total))
    }

    /// Body bytes read so far.
    pub fn delivered(&self) -> u64 {
        self.body.delivered
    }

    /// After the body was read to its end: checks that the server sent nothing past it, waiting up to `linger` for a
    /// connection the request asked to close, and keeps a reusable connection in `client`.
    pub fn finish(mut self, client: &Client, linger: Duration) -> Result<()> {
        let Some(mut conn) = self.body.conn.take() else {
            return Ok(());
        };
        if self.body.framing != Framing::Done {
            return Ok(());
        }
        let mut extra = conn.io.buffer().len();
        if extra == 0 && !self.body.keep_alive && linger > Duration::ZERO {
            // The server was asked to close: anything but an end of stream now is more body than it declared.
            let mut probe = [0u8; 1];
            conn.wait.store(linger.as_millis() as u64, Ordering::Relaxed);
            extra = conn.io.read(&mut probe).unwrap_or(0);
        }
        if extra > 0 {
            return Err(client.error(
                ErrorKind::Io,
                format!(
                    "server sent more than its Content-Length of {} bytes",
                    self.body.declared.map_or("?".into(), |d| d.to_string())
                ),
            ));
        }
        if self.body.keep_alive {
            client.recycle(conn);
        }
        Ok(())
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.body.read(buf)?;
        self.body.received.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(0);
            };
            match self.framing {
                Framing::Done => return Ok(0),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(0);
                }
                Framing::Length(left) => {
                    let want = (left.min(buf.len() as u64)) as usize;
                    let n = conn.io.read(&mut buf[..want]).or_else(eof_as_zero)?;
                    if n == 0 {
                        self.conn = None;
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "connection closed after {} of {} body bytes",
                                self.delivered,
                                self.declared.unwrap_or(0)
                            ),
                        ));
                    }
                    self.framing = Framing::Length(left - n as u64);
                    self.delivered += n as u64;
                    if left == n as u64 {
                        self.framing = Framing::Done;
                    }
                    return Ok(n);
                }
                Framing::Close => {
                    let n = conn.io.read(buf).or_else(eof_as_zero)?;
                    if n == 0 {
                        self.framing = Framing::Done;
                        self.conn = None;
                    }
                    self.delivered += n as u64;
                    return Ok(n);
                }
                Framing::Chunked(0) => {
                    let size = read_chunk_size(&mut conn.io)?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        loop {
                            let line = read_line(&mut conn.io)?;
                            if line.is_empty() {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        return Ok(0);
                    }
                    self.framing = Framing::Chunked(size);
                }
                Framing::Chunked(left) => {
                    let want = (left.min(buf.len() as u64)) as usize;
                    let n = conn.io.read(&mut buf[..want]).or_else(eof_as_zero)?;
                    if n == 0 {
                        self.conn = None;
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection closed inside a chunk after {} body bytes", self.delivered),
                        ));
                    }
                    if left == n as u64 {
                        let line = read_line(&mut conn.io)?;
                        if !line.is_empty() {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                        }
                    }
                    self.framing = Framing::Chunked(left - n as u64);
                    self.delivered += n as u64;
                    return Ok(n);
                }
            }
        }
    }
}

/// A TLS peer that closes without close_notify looks like EOF to us; the framing decides whether that was early.
fn eof_as_zero(e: io::Error) -> io::Result<usize> {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Ok(0)
    } else {
        Err(e)
    }
}

fn read_line(io: &mut BufReader<Box<dyn Transport>>) -> io::Result<String> {
    let mut line = Vec::new();
    let n = io.by_ref().take(8192).read_until(b'\n', &mut line)?;
    if n == 0 || !line.ends_with(b"\n") {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a chunk header"));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

fn read_chunk_size(io: &mut BufReader<Box<dyn Transport>>) -> io::Result<u64> {
    let line = read_line(io)?;
    let digits = line.split(';').next().unwrap_or("").trim();
    u64::from_str_radix(digits, 16)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size line {line:?}")))
}

/// Reads a response head (skipping 1xx interim responses): status and headers.
fn read_head(io: &mut BufReader<Box<dyn Transport>>) -> io::Result<(u16, Vec<(String, String)>)> {
    loop {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            let n = io.by_ref().take((MAX_HEAD - head.len()) as u64 + 1).read_until(b'\n', &mut head)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
            }
            if head.len() > MAX_HEAD {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response head too long"));
            }
            let line = &head[before..];
            if line == b"\r\n" || line == b"\n" {
                if before == 0 {
                    head.clear();
                    continue;
                }
                break;
            }
        }
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut slots);
        match parsed.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "incomplete response head"))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad response head: {e}"))),
        }
        let status = parsed.code.unwrap_or(0);
        if (100..200).contains(&status) {
            continue;
        }
        let headers = parsed
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect();
        return Ok((status, headers));
    }
}

/// Headers Go's client drops on a redirect to another host: they carry credentials.
fn is_credential(name: &str) -> bool {
    ["authorization", "www-authenticate", "cookie", "cookie2"].iter().any(|c| name.eq_ignore_ascii_case(c))
}

/// Refuses a header that would break the request head: a CR or LF would start a header (or a request) of the
/// sender's choosing, a NUL is cut short by some servers.
pub fn check_header(name: &str, value: &str) -> Result<()> {
    if name.contains(['\r', '\n', '\0']) || value.contains(['\r', '\n', '\0']) {
        return Err(Error::usage(format!(
            "header {:?} contains a line break or NUL character; refused",
            name.trim_end_matches(['\r', '\n', '\0'])
        )));
    }
    Ok(())
}

/// The host name without brackets or port, lower case, as Go compares hosts for redirects.
fn host_name(url: &Url) -> String {
    url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()
}

/// Whether `sub` is `parent` or a subdomain of it (an IPv6 address never is a subdomain: Go's rule).
fn is_domain_or_subdomain(sub: &str, parent: &str) -> bool {
    if sub == parent {
        return true;
    }
    if sub.contains([':', '%']) {
        return false;
    }
    sub.strip_suffix(parent).is_some_and(|rest| rest.ends_with('.'))
}

/// `scheme://host:port`.
fn origin(url: &Url) -> String {
    format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0))
}

/// The `Host` header the client sends for `url` (what a request signature must cover).
pub(crate) fn host_header(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = digits.and_then(|d| u8::from_str_radix(d, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Basic base64(user:pass)`.
pub(crate) fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

fn proxy_auth(proxy: &Url) -> Option<String> {
    let user = percent_decode(proxy.username());
    (!user.is_empty()).then(|| basic_auth(&user, &percent_decode(proxy.password().unwrap_or(""))))
}

/// Standard base64 with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The proxy settings of the environment, read as Go's `httpproxy.FromEnvironment` reads them (CDI's importer is
/// a Go program; the cluster's proxy reaches its pods through these variables): `HTTP_PROXY`, `HTTPS_PROXY` and
/// `NO_PROXY`, each upper case first, then lower case.
#[derive(Debug, Default)]
struct ProxyEnv {
    http: Option<String>,
    https: Option<String>,
    no_proxy: String,
}

impl ProxyEnv {
    fn from_process() -> Self {
        let var = |names: [&str; 2]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
        ProxyEnv {
            http: var(["HTTP_PROXY", "http_proxy"]),
            https: var(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: var(["NO_PROXY", "no_proxy"]).unwrap_or_default(),
        }
    }

    /// The proxy for `url`: the scheme's setting (a URL, or `host[:port]` meaning `http://`), unless
    /// [`uses_proxy`] says the host goes direct.
    fn proxy_for(&self, url: &Url) -> Option<Url> {
        let setting = match url.scheme() {
            "https" => self.https.as_deref(),
            _ => self.http.as_deref(),
        }?;
        let port = url.port_or_known_default().unwrap_or(0);
        if !uses_proxy(url.host_str().unwrap_or_default(), port, &self.no_proxy) {
            return None;
        }
        let setting = setting.trim();
        let parsed = Url::parse(setting).ok().filter(|u| matches!(u.scheme(), "http" | "https" | "socks5"));
        match parsed.or_else(|| Url::parse(&format!("http://{setting}")).ok()) {
            Some(proxy) if matches!(proxy.scheme(), "http" | "https") && proxy.host_str().is_some() => Some(proxy),
            Some(proxy) => {
                log::warn!("ignoring proxy {}: only http:// and https:// proxies are supported", origin(&proxy));
                None
            }
            None => {
                log::warn!("ignoring unparsable proxy setting {setting:?}");
                None
            }
        }
    }
}

/// Whether a request to `host:port` goes through the proxy, by Go's rules for `NO_PROXY`: never for `localhost`
/// or a loopback address; not when an entry matches: `*`; an address prefix in CIDR notation (`10.0.0.0/8`,
/// `fd00::/8`); an address (`1.2.3.4`, `::1`), optionally with a port (`1.2.3.4:80`, `[::1]:443`); a domain
/// (`example.com` matches it and its subdomains, `.example.com` and `*.example.com` only subdomains), optionally
/// with a port. A port in an entry must equal the request's (the scheme's default when the URL has none).
pub(crate) fn uses_proxy(host: &str, port: u16, no_proxy: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    if host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()) {
        return false;
    }
    let port = port.to_string();
    for entry in no_proxy.split(',') {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() {
            continue;
        }
        if entry == "*" {
            return false;
        }
        if let Some(cidr) = Cidr::parse(&entry) {
            if ip.is_some_and(|ip| cidr.contains(ip)) {
                return false;
            }
            continue;
        }
        let (entry_host, entry_port) = split_host_port(&entry);
        if entry_host.is_empty() {
            continue;
        }
        let port_matches = entry_port.is_none_or(|p| p == port);
        if let Ok(entry_ip) = entry_host.parse::<IpAddr>() {
            if ip == Some(entry_ip) && port_matches {
                return false;
            }
            continue;
        }
        let entry_host = entry_host.strip_prefix('*').filter(|rest| rest.starts_with('.')).unwrap_or(entry_host);
        let (suffix, or_itself) = match entry_host.strip_prefix('.') {
            Some(_) => (entry_host.to_string(), false),
            None => (format!(".{entry_host}"), true),
        };
        if (host.ends_with(&suffix) || (or_itself && host == suffix[1..])) && port_matches {
            return false;
        }
    }
    true
}

/// `host:port` or `[v6]:port` split as Go's `net.SplitHostPort` splits them; anything else is a host alone.
fn split_host_port(entry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once("]:") {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        };
    }
    match entry.split_once(':') {
        Some((host, port)) if !port.contains(':') => (host, Some(port)),
        _ => (entry, None),
    }
}

/// An address prefix: `ADDRESS/BITS`.
struct Cidr {
    network: IpAddr,
    bits: u32,
}

impl Cidr {
    fn parse(text: &str) -> Option<Cidr> {
        let (address, bits) = text.split_once('/')?;
        let network: IpAddr = address.parse().ok()?;
        let bits: u32 = bits.parse().ok()?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        (bits <= width).then_some(Cidr { network, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let prefix = |value: u128, width: u32| match self.bits {
            0 => 0,
            bits => value >> (width - bits),
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix(u32::from(net).into(), 32) == prefix(u32::from(ip).into(), 32),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix(u128::from(net), 128) == prefix(u128::from(ip), 128),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, coded) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        assert_eq!(basic_auth("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn no_proxy_matches_like_go() {
        let direct = |host: &str, port: u16, no_proxy: &str| !uses_proxy(host, port, no_proxy);
        // Loopback never goes through a proxy.
        for host in ["localhost", "127.0.0.1", "127.9.9.9", "[::1]"] {
            assert!(direct(host, 80, ""), "{host}");
        }
        assert!(!direct("example.com", 443, ""));
        assert!(direct("anything", 443, "*"));
        // Domains: the name and its subdomains; a leading dot or *. only subdomains.
        assert!(direct("example.com", 443, "foo, example.com"));
        assert!(direct("a.example.com", 443, "example.com"));
        assert!(!direct("badexample.com", 443, "example.com"));
        assert!(direct("a.example.com", 443, ".example.com"));
        assert!(!direct("example.com", 443, ".example.com"));
        assert!(direct("a.b.example.com", 443, "*.example.com"));
        assert!(!direct("example.com", 443, "*.example.com"));
        assert!(direct("Example.COM", 443, " EXAMPLE.com "));
        // Ports: an entry's port must be the request's.
        assert!(direct("example.com", 8080, "example.com:8080"));
        assert!(!direct("example.com", 443, "example.com:8080"));
        assert!(direct("10.1.2.3", 80, "10.1.2.3:80"));
        assert!(!direct("10.1.2.3", 443, "10.1.2.3:80"));
        assert!(direct("[2001:db8::1]", 443, "[2001:db8::1]:443"));
        assert!(direct("[2001:db8::1]", 443, "2001:db8::1"));
        // CIDRs, IPv4 and IPv6, only for addresses.
        assert!(direct("10.200.3.4", 443, "192.168.0.0/16,10.0.0.0/8"));
        assert!(!direct("11.0.0.1", 443, "10.0.0.0/8"));
        assert!(direct("192.168.7.1", 443, "192.168.7.1/32"));
        assert!(!direct("192.168.7.2", 443, "192.168.7.1/32"));
        assert!(direct("8.8.8.8", 443, "0.0.0.0/0"));
        assert!(direct("[fd00::1234]", 443, "fd00::/8"));
        assert!(!direct("[fe80::1]", 443, "fd00::/8"));
        assert!(!direct("10.0.0.1", 443, "10.0.0.0/33,bogus/8"));
        assert!(!direct("host", 443, ", ,:80"));
    }

    #[test]
    fn proxy_settings_are_read_like_go() {
        let url = |text: &str| Url::parse(text).unwrap();
        let env = ProxyEnv {
            http: Some("proxy.corp:3128".into()),
            https: Some("https://user:pw@secure.corp:8443".into()),
            no_proxy: ".internal".into(),
        };
        let proxy = |target: &str| env.proxy_for(&url(target)).map(|p| p.to_string());
        assert_eq!(proxy("http://example.com/x").as_deref(), Some("http://proxy.corp:3128/"));
        assert_eq!(proxy("https://example.com/x").as_deref(), Some("https://user:pw@secure.corp:8443/"));
        assert_eq!(proxy("https://a.internal/x"), None);
        assert_eq!(proxy("https://127.0.0.1/x"), None);
        let socks = ProxyEnv { https: Some("socks5://s:1080".into()), ..Default::default() };
        assert_eq!(socks.proxy_for(&url("https://example.com/")), None, "socks5 is not supported");
        assert_eq!(ProxyEnv::default().proxy_for(&url("https://example.com/")), None);
    }

    #[test]
    fn credential_headers_follow_gos_redirect_rule() {
        let options = HttpOptions { headers: vec![("Cookie".into(), "c=1".into())], ..Default::default() };
        let client = Client::new("https://example.com/x.img", &options).unwrap();
        let trusted = |url: &str| client.trusts(&Url::parse(url).unwrap());
        assert!(trusted("https://example.com:8443/y"), "another port of the same host");
        assert!(trusted("https://cdn.example.com/y"), "a subdomain");
        assert!(!trusted("https://badexample.com/y"));
        assert!(!trusted("https://com/y"), "a parent domain");
        assert!(!trusted("http://example.com/y"), "https down to http");
        assert!(!trusted("https://127.0.0.1/y"));
        assert!(is_credential("COOKIE") && is_credential("authorization") && !is_credential("X-Auth"));
        assert!(!is_domain_or_subdomain("::1%.example.com", "example.com"));
    }

    #[test]
    fn header_injection_is_refused() {
        for (name, value) in [("X-A", "v\r\nEvil: 1"), ("X-A", "v\nx"), ("X-A", "v\0"), ("X\rA", "v")] {
            let error = check_header(name, value).unwrap_err().to_string();
            assert!(error.contains("line break"), "{error}");
        }
        assert!(check_header("X-A", "a:b c").is_ok());
        let options = HttpOptions { headers: vec![("X-A".into(), "v\r\nHost: evil".into())], ..Default::default() };
        assert!(Client::new("http://example.com/", &options).is_err());
    }

    #[test]
    fn userinfo_becomes_basic_auth_and_leaves_the_name() {
        let client = Client::new("http://us%40er:p%3Ass@example.com:8080/x.img", &HttpOptions::default()).unwrap();
        assert_eq!(client.name(), "http://example.com:8080/x.img");
        assert_eq!(client.auth.as_deref(), Some(basic_auth("us@er", "p:ss").as_str()));
    }
}
