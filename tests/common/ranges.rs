//! An in-process HTTP/1.1 server on 127.0.0.1 that serves one file with Range support and misbehaves on purpose
//! in the ways parallel range requests must survive (no real server does so on request): answering a range with
//! another range, changing its ETag mid-way, or refusing connections past a limit with 429/503. It counts the
//! connections open at once. Stops when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy)]
pub enum Misbehave {
    /// Serves every range as asked.
    Nothing,
    /// After this many range answers, answers each range with the one 4096 bytes further on.
    WrongRange { after: u64 },
    /// After this many range answers, sends another ETag (the file was replaced).
    NewEtag { after: u64 },
    /// A request arriving while this many other connections are open is answered with `status` and closed.
    Limit { connections: usize, status: u16 },
}

/// A running server.
pub struct RangeServer {
    port: u16,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

struct Shared {
    body: Vec<u8>,
    misbehave: Misbehave,
    /// Range answers sent.
    ranges: AtomicU64,
    /// Connections open now, and the most at once that were served a range.
    open: AtomicUsize,
    peak: AtomicUsize,
    /// Statuses sent, in order.
    statuses: Mutex<Vec<u16>>,
}

impl RangeServer {
    /// Serves `body` at every path.
    pub fn start(body: Vec<u8>, misbehave: Misbehave) -> RangeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the range server");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            body,
            misbehave,
            ranges: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            statuses: Mutex::new(Vec::new()),
        });
        let (stop2, shared2) = (stop.clone(), shared.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let shared = shared2.clone();
                shared.open.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(&shared, tcp);
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        RangeServer { port, stop, shared }
    }

    /// The URL of the file, named `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// The most connections open at once while a range was being served.
    pub fn peak_connections(&self) -> usize {
        self.shared.peak.load(Ordering::SeqCst)
    }

    /// Statuses sent so far, in order.
    pub fn statuses(&self) -> Vec<u16> {
        self.shared.statuses.lock().unwrap().clone()
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(shared: &Shared, tcp: TcpStream) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let mut out = tcp.try_clone().unwrap();
    let mut reader = BufReader::new(tcp);
    loop {
        let mut range = None;
        let mut any = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            any = true;
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("range") {
                    range = Some(value.trim().to_string());
                }
            }
        }
        if !any || !answer(shared, &mut out, range.as_deref()) {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Answers one request; whether the connection stays open.
fn answer(shared: &Shared, out: &mut TcpStream, range: Option<&str>) -> bool {
    let len = shared.body.len() as u64;
    let status = |code: u16| shared.statuses.lock().unwrap().push(code);
    if let Misbehave::Limit { connections, status: refusal } = shared.misbehave {
        if shared.open.load(Ordering::SeqCst) > connections {
            status(refusal);
            let _ = write!(out, "HTTP/1.1 {refusal} Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return false;
        }
    }
    let parsed = range.and_then(|r| {
        let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
        let a: u64 = a.parse().ok()?;
        let b: u64 = if b.is_empty() { len - 1 } else { b.parse::<u64>().ok()?.min(len - 1) };
        Some((a, b))
    });
    let Some((mut a, mut b)) = parsed else {
        status(200);
        let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"v1\"\r\n\r\n");
        return out.write_all(&shared.body).is_ok();
    };
    if a >= len {
        status(416);
        let _ = write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
        );
        return true;
    }
    let served = shared.ranges.fetch_add(1, Ordering::SeqCst);
    shared.peak.fetch_max(shared.open.load(Ordering::SeqCst), Ordering::SeqCst);
    let mut etag = "\"v1\"";
    match shared.misbehave {
        Misbehave::WrongRange { after } if served >= after && b + 4096 < len => {
            a += 4096;
            b += 4096;
        }
        Misbehave::NewEtag { after } if served >= after => etag = "\"v2\"",
        _ => {}
    }
    status(206);
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{len}\r\nContent-Length: {}\r\nETag: {etag}\r\n\r\n",
        b + 1 - a
    );
    out.write_all(head.as_bytes()).is_ok() && out.write_all(&shared.body[a as usize..=b as usize]).is_ok()
}
