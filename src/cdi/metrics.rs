//! Progress for the CDI controller: Prometheus text over HTTPS (default `:8443`, any path, as CDI's promhttp
//! handler), with a self-signed certificate generated at start.
//!
//! `kubevirt_cdi_import_progress_total{ownerUID="..."}` is the percentage the controller scrapes with the regex
//! `kubevirt_cdi_import_progress_total\{ownerUID="<uid>"\} (\d{1,3}\.?\d*)`: always rendered in plain decimal
//! with at most two decimals (never an exponent the regex would misread), it only grows, and reaches 100 only
//! once the import is complete and durable. The `boundimport_` gauges show the bound holding: bytes written, the
//! memory budget, and the pod cgroup's usage and dirty + writeback page cache, read at each scrape.

use crate::cgroup::MemCgroup;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::Progress;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The metric CDI's controller reads.
pub const PROGRESS_METRIC: &str = "kubevirt_cdi_import_progress_total";

/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 8;

/// Longest a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head accepted.
const MAX_REQUEST: usize = 16 * 1024;

/// What the metrics endpoint shows.
pub struct Metrics {
    owner_uid: String,
    progress: Arc<Progress>,
    cgroup: Option<MemCgroup>,
    /// Published progress in hundredths of a percent (0..=10000); only grows.
    hundredths: AtomicU64,
    complete: AtomicBool,
    budget: AtomicU64,
}

impl Metrics {
    /// Metrics for the import owned by `owner_uid`, following `progress`, reading `cgroup` at each scrape.
    pub fn new(owner_uid: impl Into<String>, progress: Arc<Progress>, cgroup: Option<MemCgroup>) -> Self {
        Metrics {
            owner_uid: owner_uid.into(),
            progress,
            cgroup,
            hundredths: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            budget: AtomicU64::new(0),
        }
    }

    /// Records the memory budget in bytes.
    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// Marks the import complete: the progress metric reads 100 from now on.
    pub fn complete(&self) {
        self.complete.store(true, Ordering::SeqCst);
        self.hundredths.store(10_000, Ordering::SeqCst);
    }

    /// The progress now, in hundredths of a percent: the counters' percentage rounded down, held below 100 until
    /// [`complete`](Self::complete), never lower than a value already published.
    pub fn observe(&self) -> u64 {
        if self.complete.load(Ordering::SeqCst) {
            return 10_000;
        }
        let now = ((self.progress.percent() * 100.0).floor().max(0.0) as u64).min(9_999);
        self.hundredths.fetch_max(now, Ordering::SeqCst).max(now)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP {PROGRESS_METRIC} The import progress in percentage");
        let _ = writeln!(out, "# TYPE {PROGRESS_METRIC} counter");
        let _ = writeln!(
            out,
            "{PROGRESS_METRIC}{{ownerUID=\"{}\"}} {}",
            escape_label(&self.owner_uid),
            format_hundredths(self.observe())
        );
        out.push_str(&self.render_gauges());
        out
    }

    /// The `boundimport_` gauges alone (for front ends whose CDI counterpart exports no progress metric).
    pub fn render_gauges(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "boundimport_written_bytes",
            "Bytes written to the destination as data (zero ranges excluded).",
            self.progress.written(),
        );
        gauge(
            "boundimport_processed_bytes",
            "Bytes of the image (or archive stream) processed so far, zeros included.",
            self.progress.processed(),
        );
        gauge(
            "boundimport_total_bytes",
            "Bytes of the image (virtual size) or archive stream to process.",
            self.progress.total(),
        );
        let budget = self.budget.load(Ordering::Relaxed);
        if budget > 0 {
            gauge("boundimport_budget_bytes", "Memory budget of the import: the pod cgroup's limit.", budget);
        }
        if let Some(cgroup) = &self.cgroup {
            match cgroup.stat() {
                Ok(stat) => {
                    gauge(
                        "boundimport_cgroup_usage_bytes",
                        "Memory charged to the pod's cgroup (anonymous memory and page cache).",
                        stat.usage,
                    );
                    gauge(
                        "boundimport_cgroup_dirty_writeback_bytes",
                        "Dirty and under-writeback page cache of the pod's cgroup.",
                        stat.dirty_writeback(),
                    );
                }
                Err(e) => log::debug!("metrics: cannot read the memory cgroup: {e}"),
            }
        }
        out
    }
}

/// Hundredths of a percent as the shortest plain decimal: 4534 -> "45.34", 4530 -> "45.3", 10000 -> "100".
pub fn format_hundredths(hundredths: u64) -> String {
    let whole = hundredths / 100;
    match hundredths % 100 {
        0 => whole.to_string(),
        f if f % 10 == 0 => format!("{whole}.{}", f / 10),
        f => format!("{whole}.{f:02}"),
    }
}

/// A Prometheus label value with backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The addresses to try for a Go-style listen address: `:8443` means every interface (IPv6 and IPv4, else IPv4
/// alone); `host:port` resolves as usual.
pub fn listen_candidates(addr: &str) -> Result<Vec<SocketAddr>> {
    let bad = || Error::usage(format!("invalid --metrics-addr {addr:?}: expected [HOST]:PORT"));
    if let Some(port) = addr.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(vec![
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        ]);
    }
    let candidates: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|_| bad())?.collect();
    if candidates.is_empty() {
        return Err(bad());
    }
    Ok(candidates)
}

/// A TLS configuration with a freshly generated self-signed certificate (ECDSA P-256).
pub fn self_signed_tls() -> Result<Arc<ServerConfig>> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::new(ErrorKind::Io, format!("{what}: {e}"));
    let names = vec!["localhost".to_string(), "boundimport-importer".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| fail("generating a certificate", &e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("configuring TLS", &e))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|e| fail("configuring TLS", &e))?;
    Ok(Arc::new(config))
}

/// Binds `addr` and serves `metrics` over HTTPS on a background thread for the life of the process. Returns the
/// bound address.
pub fn start(addr: &str, metrics: Arc<Metrics>) -> Result<SocketAddr> {
    let tls = self_signed_tls()?;
    let mut last_error = None;
    let mut listener = None;
    for candidate in listen_candidates(addr)? {
        match TcpListener::bind(candidate) {
            Ok(bound) => {
                listener = Some(bound);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let listener = match (listener, last_error) {
        (Some(listener), _) => listener,
        (None, Some(e)) => return Err(Error::io(format!("listening on {addr}"), e)),
        (None, None) => return Err(Error::usage(format!("nothing to listen on for {addr:?}"))),
    };
    let local = listener.local_addr().map_err(|e| Error::io("reading the listening address", e))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, tls, metrics))
        .map_err(|e| Error::io("starting the metrics thread", e))?;
    Ok(local)
}

fn accept_loop(listener: TcpListener, tls: Arc<ServerConfig>, metrics: Arc<Metrics>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (tls, metrics, active) = (tls.clone(), metrics.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            if let Err(e) = serve_connection(stream, tls, &metrics) {
                log::debug!("metrics: connection ended: {e}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            log::warn!("metrics: cannot start a connection thread");
        }
    }
}

/// Serves one request (TLS handshake, request head, answer) and closes the connection.
fn serve_connection(stream: TcpStream, tls: Arc<ServerConfig>, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let connection = ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut tls = StreamOwned::new(connection, stream);
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_REQUEST {
            break false;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = complete && matches!(request.parse(&head), Ok(httparse::Status::Complete(_)));
    let (status, body, send_body) = match (parsed, request.method) {
        (false, _) => ("400 Bad Request", "bad request\n".to_string(), true),
        (true, Some("GET")) => ("200 OK", metrics.render(), true),
        (true, Some("HEAD")) => ("200 OK", metrics.render(), false),
        (true, _) => ("405 Method Not Allowed", "only GET and HEAD\n".to_string(), true),
    };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if send_body {
        answer.push_str(&body);
    }
    tls.write_all(answer.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_render_without_exponents() {
        assert_eq!(format_hundredths(0), "0");
        assert_eq!(format_hundredths(1), "0.01");
        assert_eq!(format_hundredths(4534), "45.34");
        assert_eq!(format_hundredths(4530), "45.3");
        assert_eq!(format_hundredths(9999), "99.99");
        assert_eq!(format_hundredths(10_000), "100");
    }

    #[test]
    fn progress_is_monotonic_and_100_only_when_complete() {
        let progress = Arc::new(Progress::default());
        let metrics = Metrics::new("uid-1", progress.clone(), None);
        assert_eq!(metrics.observe(), 0);
        progress.set_total(1000);
        progress.advance(500, 500);
        assert_eq!(metrics.observe(), 5000);
        progress.advance(500, 1000);
        assert_eq!(metrics.observe(), 9999, "held below 100 until complete");
        // A total that grows (a second stage) never makes the metric go back.
        progress.set_total(4000);
        assert_eq!(metrics.observe(), 9999);
        metrics.complete();
        assert_eq!(metrics.observe(), 10_000);
        let text = metrics.render();
        assert!(text.contains("\nkubevirt_cdi_import_progress_total{ownerUID=\"uid-1\"} 100\n"), "{text}");
        assert!(text.starts_with(
            "# HELP kubevirt_cdi_import_progress_total The import progress in percentage\n\
             # TYPE kubevirt_cdi_import_progress_total counter\n"
        ));
        assert!(text.contains("\nboundimport_processed_bytes 1000\n"), "{text}");
    }

    #[test]
    fn listen_addresses() {
        let any = listen_candidates(":8443").unwrap();
        assert_eq!(any.len(), 2);
        assert!(any.iter().all(|a| a.port() == 8443 && a.ip().is_unspecified()));
        assert_eq!(listen_candidates("127.0.0.1:0").unwrap()[0].to_string(), "127.0.0.1:0");
        assert!(listen_candidates(":x").is_err());
        assert!(listen_candidates("nonsense").is_err());
        assert_eq!(escape_label("a\"b\\"), "a\\\"b\\\\");
    }
}
