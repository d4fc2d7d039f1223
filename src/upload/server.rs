//! The upload server: CDI's routes and answers over HTTPS, one upload at a time, and the state the process
//! waits on (done, failed in the background, deadline).
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` (any method) | `200 OK` |
//! | `/metrics` (GET) | the `boundimport_` gauges (CDI's upload server exports none; no certificate needed) |
//! | `/v1beta1/upload`, `/v1alpha1/upload` (POST) | the body is the image; 200 once written and synced |
//! | `…/upload-async` (POST; HEAD: 200) | 200 once the whole body is received; the rest goes on in the background |
//! | `…/upload-archive` (POST) | the body is a tar archive for the data directory |
//! | `…/upload-form`, `…/upload-form-async` (POST) | `multipart/form-data`, the image in the part named `file` |
//! | anything else | 404 |
//!
//! An upload needs a client certificate verified against `CLIENT_CERT_FILE` whose common name is `CLIENT_NAME`
//! (else 401); a second upload while one runs gets 503, one after the upload is done 409. A failed upload answers
//! 400 (the image does not fit) or 500 (`Saving stream failed: …`), cleans up, and the server waits for the next
//! attempt, as CDI's does.

use super::http::{lock, Body, Conn, Framing, HeadError, Refusal, Request, Shared};
use super::multipart;
use super::process::{Content, Done, Job};
use super::tls::common_name;
use crate::cdi::metrics::Metrics;
use crate::error::{Error, ErrorKind};
use crate::progress::Progress;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Time for the TLS handshake and the request head (Go's `ReadHeaderTimeout` in CDI: 10 s).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read timeout: how often a blocked read looks at the stop flag.
const READ_TICK: Duration = Duration::from_secs(1);
/// Longest a write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// After a refusal: how much of an unread body is drained so the answer is not lost to a connection reset (a
/// client that reads its answer only once its body is sent, unlike Go's and curl's, still gets it).
const DRAIN_LIMIT: u64 = 256 << 20;
/// And for how long.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// The upload's place in CDI's state machine.
#[derive(Debug, Default)]
struct Status {
    /// A request is receiving a body.
    uploading: bool,
    /// An async upload's body was received; its processing goes on.
    processing: bool,
    /// The upload is complete.
    done: Option<Done>,
    /// Background processing failed: the server exits with this.
    fatal: Option<String>,
}

/// How the server's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// An upload completed.
    Done(Done),
    /// The deadline passed without a completed upload.
    DeadlinePassed,
    /// Background processing failed.
    Failed(String),
    /// Stopped by a signal.
    Stopped,
}

/// Everything the connection threads share.
pub struct Server {
    tls: Arc<ServerConfig>,
    client_name: String,
    job: Job,
    /// The memory budget shown on the gauges.
    budget: Option<u64>,
    /// The gauges of the current (or last) upload attempt: each attempt counts from zero.
    metrics: Mutex<Arc<Metrics>>,
    stop: &'static AtomicBool,
    body_timeout: Duration,
    status: Mutex<Status>,
    changed: Condvar,
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Healthz,
    Metrics,
    Upload { asynchronous: bool, form: bool, archive: bool },
    NotFound,
}

fn route(path: &str) -> Route {
    let upload = |asynchronous, form, archive| Route::Upload { asynchronous, form, archive };
    match path {
        "/healthz" => Route::Healthz,
        "/metrics" => Route::Metrics,
        "/v1beta1/upload" | "/v1alpha1/upload" => upload(false, false, false),
        "/v1beta1/upload-async" | "/v1alpha1/upload-async" => upload(true, false, false),
        "/v1beta1/upload-archive" | "/v1alpha1/upload-archive" => upload(false, false, true),
        "/v1beta1/upload-form" | "/v1alpha1/upload-form" => upload(false, true, false),
        "/v1beta1/upload-form-async" | "/v1alpha1/upload-form-async" => upload(true, true, false),
        _ => Route::NotFound,
    }
}

/// The processing of one upload, as the handler sees it.
enum Event {
    /// The whole body was received.
    BodyDone,
    /// The processing ended.
    Finished(crate::error::Result<Done>),
}

impl Server {
    /// A server for `job`, accepting clients whose certificate names `client_name`; `budget` is shown on the
    /// gauges.
    pub fn new(
        tls: Arc<ServerConfig>,
        client_name: String,
        job: Job,
        budget: Option<u64>,
        stop: &'static AtomicBool,
        body_timeout: Duration,
    ) -> Arc<Server> {
        let (_, metrics) = Self::gauges(&job, budget);
        Arc::new(Server {
            tls,
            client_name,
            job,
            budget,
            metrics: Mutex::new(metrics),
            stop,
            body_timeout,
            status: Mutex::new(Status::default()),
            changed: Condvar::new(),
        })
    }

    /// Fresh progress counters and the gauges that show them.
    fn gauges(job: &Job, budget: Option<u64>) -> (Arc<Progress>, Arc<Metrics>) {
        let progress = Arc::new(Progress::default());
        let metrics = Metrics::new(String::new(), progress.clone(), job.ctx.cgroup.clone());
        if let Some(budget) = budget {
            metrics.set_budget(budget);
        }
        (progress, Arc::new(metrics))
    }

    fn current_gauges(&self) -> String {
        let metrics = self.metrics.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        metrics.render_gauges()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status());
        self.changed.notify_all();
    }

    /// Accepts connections on `listener` on a background thread, for the life of the process.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> crate::error::Result<()> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("upload-accept".into())
            .spawn(move || server.accept_loop(listener))
            .map(|_| ())
            .map_err(|e| Error::io("starting the upload server thread", e))
    }

    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let active = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    log::debug!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                log::warn!("more than {MAX_CONNECTIONS} connections: closing a new one");
                continue;
            }
            let (server, active) = (self.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("upload-conn".into()).spawn(move || {
                let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
                if let Err(e) = server.connection(stream) {
                    log::debug!("{peer}: connection ended: {e}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                log::warn!("cannot start a connection thread");
            }
        }
    }

    /// Serves one request on a new connection.
    fn connection(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(READ_TICK))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let session = ServerConnection::new(self.tls.clone()).map_err(io::Error::other)?;
        let mut conn = Conn::new(StreamOwned::new(session, stream), self.stop);
        let deadline = Instant::now() + HEAD_TIMEOUT;
        if let Err(e) = conn.handshake(deadline) {
            // As Go's server logs "http: TLS handshake error from ...": a client certificate the CA did not sign
            // shows here.
            let peer = conn.tls.sock.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
            log::info!("TLS handshake error from {peer}: {e}");
            return Ok(());
        }
        let head = match conn.read_head(deadline) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(HeadError::TooLarge) => return conn.respond(431, "431 Request Header Fields Too Large"),
            Err(HeadError::Io(e)) => return Err(e),
        };
        let request = match Request::parse(&head) {
            Ok(request) => request,
            Err(refusal) => return conn.respond(refusal.status, &refusal.message),
        };
        log::debug!("{} {}", request.method, request.path);
        match route(&request.path) {
            Route::Healthz => conn.respond(200, "OK"),
            Route::Metrics if request.method == "GET" => conn.respond(200, &self.current_gauges()),
            Route::Metrics | Route::NotFound => refuse(conn, &request, 404, "404 page not found\n"),
            Route::Upload { asynchronous, form, archive } => self.upload(conn, &request, asynchronous, form, archive),
        }
    }

    /// Whether the connection's verified client certificate names the accepted client.
    fn authorised(&self, conn: &Conn) -> bool {
        let Some(leaf) = conn.tls.conn.peer_certificates().and_then(|certs| certs.first()) else {
            log::info!("upload refused: no client certificate");
            return false;
        };
        match common_name(leaf) {
            Some(name) if name == self.client_name && !name.is_empty() => true,
            name => {
                log::info!("upload refused: client certificate CN {name:?} is not {:?}", self.client_name);
                false
            }
        }
    }

    fn upload(&self, conn: Conn, request: &Request, asynchronous: bool, form: bool, archive: bool) -> io::Result<()> {
        if asynchronous && request.method == "HEAD" {
            return refuse(conn, request, 200, "");
        }
        if request.method != "POST" {
            return refuse(conn, request, 404, "");
        }
        if !self.authorised(&conn) {
            return refuse(conn, request, 401, "");
        }
        {
            let mut status = self.status();
            if status.uploading || status.processing {
                log::warn!("Got concurrent upload request");
                drop(status);
                return refuse(conn, request, 503, "");
            }
            if status.done.is_some() {
                log::warn!("Got upload request after already done");
                drop(status);
                return refuse(conn, request, 409, "");
            }
            status.uploading = true;
        }
        // Whatever happens, even a panic, this request no longer uploads once it is over.
        let _uploading = Uploading(self);
        self.receive(conn, request, asynchronous, form, archive)
    }

    /// Runs an accepted upload; `uploading` is set.
    fn receive(&self, conn: Conn, request: &Request, asynchronous: bool, form: bool, archive: bool) -> io::Result<()> {
        let header = request.header("x-cdi-content-type");
        log::info!("Content type header is {:?}", header.unwrap_or(""));
        let content = Content::of(archive, header);
        let framing = match request.framing() {
            Ok(framing) => framing,
            Err(Refusal { status, message }) => return refuse(conn, request, status, &message),
        };
        if asynchronous && content.is_clone() {
            return refuse(conn, request, 500, "Saving stream failed: async clone not supported");
        }
        let shared: Shared = Arc::new(Mutex::new(conn));
        let mut body = Body::new(shared.clone(), framing, request.expects_continue());
        body.set_idle_limit(self.body_timeout);
        let (events, received) = mpsc::channel::<Event>();
        let (reader, len): (Box<dyn Read + Send>, Option<u64>) = if form {
            let boundary = match multipart::boundary(request.header("content-type")) {
                Ok(boundary) => boundary,
                Err(message) => return respond_shared(&shared, request, 400, &message),
            };
            match multipart::file_part(body, &boundary) {
                Ok(part) => (Box::new(part), None),
                Err(e) => return respond_shared(&shared, request, 400, &format!("Saving stream failed: {e}")),
            }
        } else {
            let len = body.len();
            (Box::new(body), len)
        };
        let signal = events.clone();
        let reader =
            Box::new(EndSignal { inner: reader, on_end: Some(Box::new(move || drop(signal.send(Event::BodyDone)))) });

        // The processing runs on its own thread so an async upload can be answered when its body is in.
        let (progress, metrics) = Self::gauges(&self.job, self.budget);
        *self.metrics.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = metrics;
        std::thread::scope(|scope| {
            let finished = events;
            let progress = &progress;
            scope.spawn(move || {
                let run = || self.job.run(content, reader, len, progress, self.stop);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::new(ErrorKind::Io, format!("internal error: {what}")))
                });
                let _ = finished.send(Event::Finished(result));
            });
            let mut answered = false;
            loop {
                match received.recv() {
                    Ok(Event::BodyDone) if asynchronous && !answered => {
                        log::info!("Returning success to caller, continue processing in background");
                        answered = true;
                        self.update(|status| {
                            status.uploading = false;
                            status.processing = true;
                        });
                        let _ = respond_shared(&shared, request, 200, "");
                    }
                    Ok(Event::BodyDone) => {}
                    Ok(Event::Finished(Ok(done))) => {
                        log::info!("Wrote data to {}", self.job.image.display());
                        // Done before the answer goes out: a client that uploads again on the 200 gets 409, not
                        // the 503 of an upload still running.
                        self.update(|status| {
                            status.uploading = false;
                            status.processing = false;
                            status.done = Some(done);
                        });
                        if !answered {
                            let _ = respond_shared(&shared, request, 200, "");
                        }
                        return Ok(());
                    }
                    Ok(Event::Finished(Err(e))) => {
                        if answered {
                            log::error!("Error during resumed processing: {e}");
                            self.update(|status| {
                                status.processing = false;
                                status.fatal = Some(format!("Unable to process data: {e}"));
                            });
                            return Ok(());
                        }
                        // Ready for the next attempt before the answer goes out (as CDI resets `uploading` first).
                        self.update(|status| status.uploading = false);
                        return respond_shared(&shared, request, failure_status(&e), &failure_message(&e));
                    }
                    Err(_) => return Ok(()),
                }
            }
        })
    }

    /// Waits until an upload completes, background processing fails, the deadline passes with no upload
    /// running, or a signal stops the server; then keeps answering (409 to uploads) for `linger`.
    pub fn wait(&self, deadline: Option<std::time::SystemTime>, linger: Duration) -> Ended {
        let mut status = self.status();
        let ended = loop {
            if let Some(fatal) = &status.fatal {
                break Ended::Failed(fatal.clone());
            }
            if let Some(done) = status.done {
                break Ended::Done(done);
            }
            let idle = !status.uploading && !status.processing;
            if idle && self.stop.load(Ordering::SeqCst) {
                break Ended::Stopped;
            }
            if idle && deadline.is_some_and(|d| std::time::SystemTime::now() >= d) {
                log::info!("deadline exceeded, upload not done, process exiting");
                break Ended::DeadlinePassed;
            }
            status = self
                .changed
                .wait_timeout(status, Duration::from_millis(200))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        };
        drop(status);
        if matches!(ended, Ended::Done(_)) && !linger.is_zero() {
            log::info!("upload done; answering for {:.1}s more", linger.as_secs_f64());
            let until = Instant::now() + linger;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        ended
    }
}

/// Clears `uploading` when dropped.
struct Uploading<'a>(&'a Server);

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        self.0.update(|status| status.uploading = false);
    }
}

/// HTTP status for a failed upload: 400 when the image does not fit (CDI's `IsNoCapacityError`), else 500.
fn failure_status(e: &Error) -> u16 {
    if e.kind() == ErrorKind::TooSmall {
        400
    } else {
        500
    }
}

/// CDI's answer text for a failed upload (out-of-space errors in Go's words, as CDI's upload server answers).
fn failure_message(e: &Error) -> String {
    let text = if e.kind() == ErrorKind::TooSmall {
        format!("Saving stream failed: effective image size is larger than the reported available storage: {e}")
    } else {
        format!("Saving stream failed: {e}")
    };
    crate::cdi::termination::controller_wording(&text)
}

/// Answers `status` without reading the body, then drains some of it so the answer arrives.
fn refuse(mut conn: Conn, request: &Request, status: u16, message: &str) -> io::Result<()> {
    if status >= 400 && !message.is_empty() {
        log::info!("{} {}: {status} {}", request.method, request.path, message.trim_end());
    }
    conn.respond(status, message)?;
    let has_body = !matches!(request.framing(), Ok(Framing::Length(0)));
    if has_body && !request.expects_continue() {
        conn.drain(DRAIN_LIMIT, DRAIN_TIME);
    }
    Ok(())
}

/// [`refuse`] for a connection shared with a body reader.
fn respond_shared(shared: &Shared, request: &Request, status: u16, message: &str) -> io::Result<()> {
    let mut conn = lock(shared);
    if status >= 400 {
        log::error!("{} {}: {status} {message}", request.method, request.path);
    }
    conn.respond(status, message)?;
    if status >= 400 {
        conn.drain(DRAIN_LIMIT, DRAIN_TIME);
    } else {
        // What a successful upload left unread (a form's closing delimiter, say) must not reset the connection
        // before the client has its answer.
        conn.drain(1 << 20, Duration::from_millis(500));
    }
    Ok(())
}

/// Calls `on_end` when its reader reaches the end of its stream.
struct EndSignal {
    inner: Box<dyn Read + Send>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl Read for EndSignal {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(on_end) = self.on_end.take() {
                on_end();
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_cdi() {
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/v1beta1/upload"), Route::Upload { asynchronous: false, form: false, archive: false });
        assert_eq!(route("/v1alpha1/upload-async"), Route::Upload { asynchronous: true, form: false, archive: false });
        assert_eq!(route("/v1beta1/upload-archive"), Route::Upload { asynchronous: false, form: false, archive: true });
        assert_eq!(
            route("/v1beta1/upload-form-async"),
            Route::Upload { asynchronous: true, form: true, archive: false }
        );
        assert_eq!(route("/v1beta1/upload/"), Route::NotFound);
        assert_eq!(route("/"), Route::NotFound);
    }

    #[test]
    fn failures_answer_like_cdi() {
        let small =
            Error::new(ErrorKind::TooSmall, "virtual image size 2 is larger than the reported available storage 1");
        assert_eq!(failure_status(&small), 400);
        assert!(failure_message(&small).starts_with("Saving stream failed: effective image size is larger"));
        let other = Error::bad_image("truncated");
        assert_eq!(
            (failure_status(&other), failure_message(&other).as_str()),
            (500, "Saving stream failed: truncated")
        );
        let full = Error::io("writing destination", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(failure_message(&full), "Saving stream failed: writing destination: no space left on device");
    }
}
