//! An in-process HTTP/1.1 test server on 127.0.0.1: serves the files of a directory, with or without Range support,
//! optionally over TLS (a self-signed certificate made with rcgen) and behind basic auth, with fault injection
//! (drop the connection at a file offset some number of times, stall at an offset, lie about Content-Length), and a
//! log of the requests it answered. Stops when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server behaves.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Honour `Range: bytes=A-[B]` with 206 answers; otherwise always send the whole file with 200.
    pub ranges: bool,
    /// Serve over TLS with a fresh self-signed certificate for 127.0.0.1 and localhost.
    pub tls: bool,
    /// Require these basic-auth credentials.
    pub auth: Option<(String, String)>,
    /// Close the connection when a body reaches this file offset, this many times.
    pub drop_at: Option<(u64, u32)>,
    /// Stop sending (but keep the connection open) when a body reaches this file offset.
    pub stall_at: Option<u64>,
    /// Send bodies at about this many bytes per second in all, however many connections share it (slow storage
    /// behind a fast importer, for progress and for killing an import part-way).
    pub rate: Option<u64>,
    /// Send each connection's bodies at about this many bytes per second (what an object store or CDN gives one
    /// connection: parallel range requests pay).
    pub connection_rate: Option<u64>,
    /// Added to the true length in the Content-Length of whole-file answers (negative: the body is longer than
    /// declared; positive: the body stops short and the connection closes).
    pub length_lie: i64,
    /// Names (besides 127.0.0.1 and localhost) the TLS certificate is for: a host reached only through a proxy.
    pub tls_names: Vec<String>,
    /// Send an ETag (from the file's length and modification time) with every file answer, as web servers do.
    pub etag: bool,
}

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Request path.
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
    /// Status sent.
    pub status: u16,
    /// The request's header lines, `Name: value` as received.
    pub headers: Vec<String>,
}

/// A running test server.
pub struct TestServer {
    port: u16,
    tls: bool,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
    served: Arc<AtomicU64>,
    /// PEM of the self-signed certificate (TLS only), to put in a `--ca-dir`.
    pub cert_pem: Option<String>,
}

struct Shared {
    root: PathBuf,
    options: ServerOptions,
    drops_left: AtomicU32,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
    served: Arc<AtomicU64>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// When the server-wide `rate` lets the next bytes go.
    paced_until: Mutex<std::time::Instant>,
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

impl TestServer {
    /// Serves the files in `root` as configured.
    pub fn start(root: &Path, options: ServerOptions) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicU64::new(0));
        let (tls, cert_pem) = if options.tls {
            let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
            names.extend(options.tls_names.iter().cloned());
            let key = rcgen::generate_simple_self_signed(names).unwrap();
            let cert_der = key.cert.der().clone();
            let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert_der], key_der)
                .unwrap();
            (Some(Arc::new(config)), Some(key.cert.pem()))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            drops_left: AtomicU32::new(options.drop_at.map_or(0, |(_, n)| n)),
            options,
            stop: stop.clone(),
            log: log.clone(),
            served: served.clone(),
            tls,
            paced_until: Mutex::new(std::time::Instant::now()),
        });
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve_connection(&shared, tcp));
            }
        });
        TestServer { port, tls: cert_pem.is_some(), stop, log, served, cert_pem }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of file `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}://127.0.0.1:{}/{name}", if self.tls { "https" } else { "http" }, self.port)
    }

    /// Body bytes sent so far, over every request.
    pub fn bytes_served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_connection(shared: &Shared, tcp: TcpStream) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let socket = tcp.try_clone().unwrap();
    let stream: Box<dyn Stream> = match &shared.tls {
        Some(config) => {
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        None => Box::new(tcp),
    };
    let mut io = BufReader::new(stream);
    loop {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match io.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            lines.push(line);
        }
        let Some(request_line) = lines.first() else { return };
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let header = |name: &str| {
            lines.iter().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let range = header("range");
        let headers = lines[1..].to_vec();
        let keep = respond(shared, io.get_mut(), &path, range.clone(), header("authorization"), close, headers);
        if !keep || close {
            let _ = io.get_mut().flush();
            drop(io);
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Answers one request; returns whether the connection may serve another.
fn respond(
    shared: &Shared,
    out: &mut Box<dyn Stream>,
    path: &str,
    range: Option<String>,
    auth: Option<String>,
    close: bool,
    headers: Vec<String>,
) -> bool {
    let log = |status: u16| {
        shared.log.lock().unwrap().push(Logged {
            path: path.to_string(),
            range: range.clone(),
            status,
            headers: headers.clone(),
        });
    };
    let conn_header = if close { "Connection: close\r\n" } else { "" };
    if let Some((user, pass)) = &shared.options.auth {
        let expected = format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()));
        if auth.as_deref() != Some(expected.as_str()) {
            log(401);
            let _ = write!(out, "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n{conn_header}\r\n");
            return true;
        }
    }
    let name = path.trim_start_matches('/');
    let Ok(data) = std::fs::File::open(shared.root.join(name)) else {
        log(404);
        let _ = write!(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n{conn_header}\r\n");
        return true;
    };
    let meta = data.metadata().unwrap();
    let len = meta.len();
    let etag = match shared.options.etag {
        true => {
            use std::os::unix::fs::MetadataExt;
            format!("ETag: \"{len:x}-{:x}{:09x}\"\r\n", meta.mtime(), meta.mtime_nsec())
        }
        false => String::new(),
    };
    let parsed = range.as_deref().filter(|_| shared.options.ranges).and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a: u64 = a.trim().parse().ok()?;
        let b: u64 =
            if b.trim().is_empty() { len.saturating_sub(1) } else { b.trim().parse::<u64>().ok()?.min(len - 1) };
        Some((a, b))
    });
    let (from, to, head) = match parsed {
        Some((a, _)) if a >= len => {
            log(416);
            let _ = write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n{conn_header}\r\n");
            return true;
        }
        Some((a, b)) => {
            log(206);
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nAccept-Ranges: bytes\r\nContent-Range: bytes {a}-{b}/{len}\r\nContent-Length: {}\r\n{etag}{conn_header}\r\n",
                b + 1 - a
            );
            (a, b + 1, head)
        }
        None => {
            log(200);
            let declared = (len as i64 + shared.options.length_lie).max(0);
            // A lying server sends its own length and closes: the client has to notice.
            let conn = if shared.options.length_lie != 0 { "Connection: close\r\n" } else { conn_header };
            (0, len, format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n{etag}{conn}\r\n"))
        }
    };
    if out.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut reader = BufReader::new(data);
    let mut at = from;
    use std::io::Seek;
    reader.seek(std::io::SeekFrom::Start(from)).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    while at < to {
        let mut limit = to;
        let mut drop_here = false;
        if let Some((x, _)) = shared.options.drop_at {
            if at <= x && x < to && shared.drops_left.load(Ordering::SeqCst) > 0 {
                limit = x;
                drop_here = true;
            }
        }
        let mut stall_here = false;
        if let Some(x) = shared.options.stall_at {
            if at <= x && x < limit {
                limit = x;
                stall_here = true;
            }
        }
        while at < limit {
            let n = ((limit - at) as usize).min(buf.len());
            reader.read_exact(&mut buf[..n]).unwrap();
            if out.write_all(&buf[..n]).is_err() {
                return false;
            }
            shared.served.fetch_add(n as u64, Ordering::SeqCst);
            at += n as u64;
            if let Some(rate) = shared.options.connection_rate {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate.max(1) as f64));
            }
            if let Some(rate) = shared.options.rate {
                let until = {
                    let mut paced = shared.paced_until.lock().unwrap();
                    let start = (*paced).max(std::time::Instant::now());
                    *paced = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
                    *paced
                };
                std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
            }
        }
        if stall_here {
            let _ = out.flush();
            while !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return false;
        }
        if drop_here && shared.drops_left.fetch_sub(1, Ordering::SeqCst) > 0 {
            let _ = out.flush();
            return false;
        }
    }
    let _ = out.flush();
    !(shared.options.length_lie != 0 && parsed.is_none())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= group.len() { ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' });
        }
    }
    out
}
