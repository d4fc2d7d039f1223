//! Hostile HTTP peers, through the binary, for the CLI and `boundimport cdi` (issue 30):
//! - credentials across redirects: a server on 127.0.0.1 redirects (301, 302, 307, 308) to one on 127.0.0.2 that
//!   records what it was sent; the user's `Authorization` and `Cookie` headers must not arrive there, and must
//!   arrive after a redirect to another port of the same host (Go's rule, which CDI's importer follows);
//! - a header carrying CR, LF or NUL is refused before anything is sent;
//! - a stop signal while the download is blocked (a server that sends its head and then nothing) or trickling
//!   (a byte every 2 s) ends the import at once with 128 + the signal, the resume checkpoint kept;
//! - a new connection dropped after the request, before any answer, is retried under `--retries`.
//!
//! The servers are small scripted ones in this file, each answering every connection the same way.

mod common;

use common::{boundimport, scratch_dir, Running, SplitMix64, MIB};
use nix::sys::signal::Signal;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a scripted server does after reading a request head (its header lines are passed in).
type Answer = dyn Fn(&mut TcpStream, &[String]) + Send + Sync;

/// A server on `ip` answering every request with `answer`, recording each request's header lines.
struct Scripted {
    addr: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Scripted {
    fn start(ip: &str, answer: Arc<Answer>) -> Scripted {
        let listener = TcpListener::bind((ip, 0)).expect("binding a loopback address");
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut tcp) = conn else { continue };
                let (seen, answer, stop) = (seen2.clone(), answer.clone(), stop2.clone());
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = BufReader::new(tcp.try_clone().unwrap());
                    while !stop.load(Ordering::SeqCst) {
                        let mut lines = Vec::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let line = line.trim_end().to_string();
                            if line.is_empty() {
                                break;
                            }
                            lines.push(line);
                        }
                        seen.lock().unwrap().push(lines.clone());
                        answer(&mut tcp, &lines);
                    }
                });
            }
        });
        Scripted { addr, stop, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    /// The header lines of every request so far.
    fn requests(&self) -> Vec<Vec<String>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Pseudo-random bytes no format detector takes for an image header: a raw disk.
fn disk_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    SplitMix64::new(30).fill(&mut bytes);
    bytes[..8].copy_from_slice(b"RAWDISK!");
    bytes
}

/// Serves `body` whole (no Range support) to every request.
fn serve_body(body: Arc<Vec<u8>>) -> Arc<Answer> {
    Arc::new(move |tcp: &mut TcpStream, _: &[String]| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"disk\"\r\n\r\n", body.len());
        let _ = tcp.write_all(head.as_bytes()).and_then(|()| tcp.write_all(&body));
    })
}

/// Answers every request with `status` and a Location of `target`.
fn redirect_to(status: u16, target: String) -> Arc<Answer> {
    Arc::new(move |tcp: &mut TcpStream, _: &[String]| {
        let head = format!("HTTP/1.1 {status} Moved\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n");
        let _ = tcp.write_all(head.as_bytes());
    })
}

/// Whether `request` carried header `name` (case-insensitive).
fn has_header(request: &[String], name: &str) -> bool {
    request.iter().any(|line| line.split_once(':').is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name)))
}

const SECRET_HEADERS: [&str; 2] = ["Authorization: Bearer t0ken", "Cookie: session=s3cret"];

/// Runs the CLI on `url` with the secret headers and one harmless one; the destination must equal `body`.
fn cli_import(url: &str, body: &[u8]) {
    let dir = scratch_dir("redirect-cli");
    let dest = dir.path().join("out.raw");
    let mut cmd = boundimport();
    cmd.args(["--progress", "none"]);
    for header in SECRET_HEADERS.iter().chain(&["X-Trace: 42"]) {
        cmd.args(["--header", header]);
    }
    let output = cmd.arg(url).arg(&dest).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(std::fs::read(&dest).unwrap() == body, "the import equals the served disk");
}

/// The requests `target` got must carry the secret headers or not, and always the harmless one.
fn assert_credentials(target: &Scripted, expected: bool, label: &str) {
    let requests = target.requests();
    assert!(!requests.is_empty(), "{label}: the redirect target was reached");
    for request in &requests {
        for name in ["Authorization", "Cookie"] {
            assert_eq!(has_header(request, name), expected, "{label}: {name} in {request:?}");
        }
        assert!(has_header(request, "X-Trace"), "{label}: other headers follow the redirect: {request:?}");
    }
}

#[test]
fn credentials_do_not_follow_a_redirect_to_another_host() {
    let body = Arc::new(disk_bytes(MIB as usize));
    for status in [301, 302, 307, 308] {
        let elsewhere = Scripted::start("127.0.0.2", serve_body(body.clone()));
        let redirector = Scripted::start("127.0.0.1", redirect_to(status, elsewhere.url("disk.raw")));
        cli_import(&redirector.url("disk.raw"), &body);
        assert_credentials(&elsewhere, false, &format!("{status} to 127.0.0.2"));
        for request in redirector.requests() {
            assert!(has_header(&request, "Authorization") && has_header(&request, "Cookie"), "{request:?}");
        }
    }
    // Another port of the same host is the same host for Go: the credentials go along.
    let same_host = Scripted::start("127.0.0.2", serve_body(body.clone()));
    let redirector = Scripted::start("127.0.0.2", redirect_to(302, same_host.url("disk.raw")));
    cli_import(&redirector.url("disk.raw"), &body);
    assert_credentials(&same_host, true, "302 to the same host");
}

#[test]
fn cdi_credentials_do_not_follow_a_redirect_to_another_host() {
    let body = Arc::new(disk_bytes(MIB as usize));
    for (label, other_host) in [("another host", true), ("the same host", false)] {
        let target = Scripted::start(if other_host { "127.0.0.2" } else { "127.0.0.1" }, serve_body(body.clone()));
        let redirector = Scripted::start("127.0.0.1", redirect_to(307, target.url("disk.raw")));
        let pod = scratch_dir("redirect-cdi");
        let headers = pod.path().join("extraheaders");
        std::fs::create_dir_all(headers.join("secret")).unwrap();
        std::fs::write(headers.join("secret/cookie"), format!("{}\n", SECRET_HEADERS[1])).unwrap();
        let mut cmd = cdi_command(pod.path(), &redirector.url("disk.raw"), &headers);
        cmd.env("IMPORTER_EXTRA_HEADER_0", SECRET_HEADERS[0]).env("IMPORTER_EXTRA_HEADER_1", "X-Trace: 42");
        let output = cmd.output().unwrap();
        assert!(output.status.success(), "{label}: {}", String::from_utf8_lossy(&output.stderr));
        let disk = std::fs::read(pod.path().join("data/disk.img")).unwrap();
        assert!(disk[..body.len()] == body[..], "{label}: the disk holds the served bytes");
        assert_credentials(&target, !other_host, &format!("cdi, 307 to {label}"));
    }
}

#[test]
fn headers_with_line_breaks_are_refused() {
    let body = Arc::new(disk_bytes(64 << 10));
    let server = Scripted::start("127.0.0.1", serve_body(body));
    let dir = scratch_dir("header-injection");
    for bad in ["X-A: v\r\nHost: evil", "X-A: v\nEvil: 1", "X-A: v\rw"] {
        let dest = dir.path().join("out.raw");
        let output = boundimport().args(["--header", bad]).arg(server.url("disk.raw")).arg(&dest).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("X-A") && stderr.contains("line break"), "{bad:?}: {stderr}");
        assert!(!dest.exists());
    }
    // `cdi`: from the environment and from a secret file.
    for (env, file) in [(Some("X-A: v\r\nEvil: 1"), None), (None, Some("X-A: v\r\nEvil: 1\n"))] {
        let pod = scratch_dir("header-injection-cdi");
        let headers = pod.path().join("extraheaders");
        std::fs::create_dir_all(&headers).unwrap();
        if let Some(text) = file {
            std::fs::write(headers.join("h"), text).unwrap();
        }
        let mut cmd = cdi_command(pod.path(), &server.url("disk.raw"), &headers);
        if let Some(value) = env {
            cmd.env("IMPORTER_EXTRA_HEADER_0", value);
        }
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        let termination = std::fs::read_to_string(pod.path().join("termination-log")).unwrap_or_default();
        assert!(termination.contains("X-A") && termination.contains("line break"), "{termination:?} {stderr}");
    }
    assert_eq!(server.requests().len(), 0, "nothing was sent");
}

/// `boundimport cdi` importing `url` into `pod/data`, its termination log in `pod`.
fn cdi_command(pod: &Path, url: &str, extra_headers: &Path) -> Command {
    std::fs::create_dir_all(pod.join("data")).unwrap();
    let mut cmd = boundimport();
    cmd.args(["cdi", "-alsologtostderr", "-v=3"])
        .arg("--data-dir")
        .arg(pod.join("data"))
        .arg("--block-path")
        .arg(pod.join("no-block-volume"))
        .arg("--termination-log")
        .arg(pod.join("termination-log"))
        .arg("--scratch-dir")
        .arg(pod.join("scratch"))
        .args(["--metrics-addr", "127.0.0.1:0", "--proxy-cert-dir", "/nonexistent-proxycerts"])
        .arg("--extra-headers-dir")
        .arg(extra_headers)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("OWNER_UID", "3f1e2d4c-5b6a-4789-8abc-def012345678"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
            ("INSECURE_TLS", "false"),
            ("IMPORTER_IMAGE_SIZE", "64Mi"),
            ("IMPORTER_ENDPOINT", url),
        ]);
    cmd
}

// ---- Stop signals while the download is blocked.

/// Bytes sent before a server stalls or trickles: enough for the import to have written and checkpointed some.
const PREFIX: usize = 24 << 20;

/// A server that sends the head of a 64 MiB body and its first [`PREFIX`] bytes, then either nothing more
/// (`trickle` false), or one byte every 2 s.
fn stalling(trickle: bool) -> (Scripted, Arc<AtomicBool>) {
    let body = Arc::new(disk_bytes(64 << 20));
    let prefix_sent = Arc::new(AtomicBool::new(false));
    let sent = prefix_sent.clone();
    let answer = Arc::new(move |tcp: &mut TcpStream, _: &[String]| {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"disk\"\r\n\r\n", body.len());
        if tcp.write_all(head.as_bytes()).and_then(|()| tcp.write_all(&body[..PREFIX])).is_err() {
            return;
        }
        sent.store(true, Ordering::SeqCst);
        let mut at = PREFIX;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_secs(2));
            if trickle && (at >= body.len() || tcp.write_all(&body[at..at + 1]).is_err()) {
                return;
            }
            at += 1;
        }
    });
    (Scripted::start("127.0.0.1", answer), prefix_sent)
}

/// Starts `cmd` against a stalled or trickling server, sends `signal` once the prefix is out and the import has
/// had time to block, and checks the exit: 128 + the signal within 3 s, the stop line, the checkpoint `state`.
fn stops_at_once(mut cmd: Command, prefix_sent: &AtomicBool, signal: Signal, state: &Path, label: &str) -> Output {
    let running = Running::start(&mut cmd);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !prefix_sent.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "{label}: the server never sent its prefix");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Past a checkpoint interval, and into the stall.
    std::thread::sleep(Duration::from_secs(3));
    running.signal(signal);
    let signalled = Instant::now();
    let finished = running.finish_within(Duration::from_secs(90));
    let took = finished.ended - signalled;
    assert_eq!(finished.status.code(), Some(128 + signal as i32), "{label}: {}", finished.stderr);
    assert!(took < Duration::from_secs(3), "{label}: ended {took:?} after the signal\n{}", finished.stderr);
    assert!(
        !finished.stderr.contains("resuming (retry"),
        "{label}: the stop is not a network fault\n{}",
        finished.stderr
    );
    assert!(finished.stderr.contains(&format!("stopped by {signal}")), "{label}: {}", finished.stderr);
    assert!(state.exists(), "{label}: the resume checkpoint {} is kept\n{}", state.display(), finished.stderr);
    Output { status: finished.status, stdout: Vec::new(), stderr: finished.stderr.into_bytes() }
}

#[test]
fn a_stop_signal_ends_a_stalled_or_trickling_download_at_once() {
    for (trickle, signal) in [(false, Signal::SIGTERM), (true, Signal::SIGTERM), (true, Signal::SIGINT)] {
        let label = format!("cli, {}, {signal}", if trickle { "trickling" } else { "stalled" });
        let (server, prefix_sent) = stalling(trickle);
        let dir = scratch_dir("stop-blocked");
        let dest = dir.path().join("out.raw");
        let mut cmd = boundimport();
        cmd.args(["--progress", "none", "--resume", "--stall-timeout", "60"]).arg(server.url("disk.raw")).arg(&dest);
        stops_at_once(cmd, &prefix_sent, signal, &dir.path().join(".out.raw.boundimport-resume"), &label);
    }
}

#[test]
fn cdi_stops_a_stalled_or_trickling_download_at_once() {
    for trickle in [false, true] {
        let label = format!("cdi, {}", if trickle { "trickling" } else { "stalled" });
        let (server, prefix_sent) = stalling(trickle);
        let pod = scratch_dir("cdi-stop-blocked");
        let cmd = cdi_command(pod.path(), &server.url("disk.raw"), Path::new("/nonexistent-headers"));
        let state = pod.path().join("data/.disk.img.boundimport-resume");
        stops_at_once(cmd, &prefix_sent, Signal::SIGTERM, &state, &label);
    }
}

/// A server (or the balancer in front of it) that drops a new connection after reading the request, before any
/// answer: a GET is sent again under `--retries`, and the import is whole; with too few retries it fails on one
/// line naming the URL.
#[test]
fn a_connection_dropped_before_its_answer_is_retried() {
    let body = Arc::new(disk_bytes(3 * MIB as usize));
    let dropped = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let serve = serve_body(body.clone());
    let counted = dropped.clone();
    let server = Scripted::start(
        "127.0.0.1",
        Arc::new(move |tcp: &mut TcpStream, request: &[String]| {
            if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                let _ = tcp.shutdown(std::net::Shutdown::Both);
            } else {
                serve(tcp, request);
            }
        }),
    );
    let dir = scratch_dir("dropped-before-answer");
    let dest = dir.path().join("out.raw");
    let url = server.url("disk.raw");
    let output = boundimport().args(["--progress", "none", "--retries", "2"]).arg(&url).arg(&dest).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(std::fs::read(&dest).unwrap() == *body, "the import equals the served disk");
    assert!(dropped.load(Ordering::SeqCst) >= 3, "the server dropped two connections, then answered");

    dropped.store(0, Ordering::SeqCst);
    let output = boundimport().args(["--progress", "none", "--retries", "1"]).arg(&url).arg(&dest).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().last().unwrap_or_default();
    assert!(line.contains(&url) && line.contains("connection closed before a response"), "{stderr}");
    assert_eq!(dropped.load(Ordering::SeqCst), 2, "one try and one retry: {stderr}");
}
