//! `boundimport upload-server` run the way CDI's upload controller runs `cdi-uploadserver`: its environment, its
//! certificates (a CA that signs the server's certificate and the upload proxy's client certificate, `CLIENT_NAME`
//! as the only accepted CN), `-v=N` klog flags, a data directory or a block device, and the termination log read
//! back byte for byte.
//!
//! Clients: curl (plain, `-F` forms, no certificate, wrong certificate), and an in-test client that sends what
//! CDI's upload proxy sends (Go's reverse proxy: `Authorization: Bearer`, `X-Forwarded-For`, `Accept-Encoding:
//! gzip`, an empty `User-Agent` left out, `Content-Length` or chunked bodies) and what CDI's clone source sends
//! (snappy-framed chunked streams with `x-cdi-content-type`). Images are made with qemu-img, gzip and xz; every
//! output is compared with `qemu-img convert -O raw`. Tests needing root (loop devices, a memory cgroup) follow
//! tests/common/privileged.rs.

mod common;

use common::privileged::require_privileged;
use common::{boundimport, qemu_reference, run, scratch_dir, sha256_prefix, write_raw, Fill, Workbench, MIB};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The CN of the upload proxy's client certificate (what the controller puts in CLIENT_NAME).
const CLIENT_NAME: &str = "cdi-uploadproxy";
/// What CDI writes after an upload without preallocation.
const UPLOAD_COMPLETE: &str = r#"{"preallocationApplied":false,"message":"Upload Complete"}"#;

// ---------------------------------------------------------------------------------------------------------------
// Certificates

/// A CA and the certificates signed by it, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA (`ca.pem`), the server's certificate for 127.0.0.1 and localhost (`server.pem`, `server.key`), client
    /// certificates named `client` (CN=CLIENT_NAME) and `wrong-cn` (CN=someone-else) signed by it, and `foreign`
    /// (CN=CLIENT_NAME) signed by another CA.
    fn create(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        fs::create_dir_all(dir).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("cdi-uploadserver-client-signer");
        let (_, foreign) = ca("someone else's CA");
        fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        let leaf = |name: &str, cn: &str, sans: Vec<String>, issuer: &Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, issuer).unwrap();
            fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        leaf("server", "cdi-upload-server", vec!["127.0.0.1".into(), "localhost".into()], &issuer);
        leaf("client", CLIENT_NAME, vec![], &issuer);
        leaf("wrong-cn", "someone-else", vec![], &issuer);
        leaf("foreign", CLIENT_NAME, vec![], &foreign);
        Pki { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The pod and the server process

/// An upload server pod's world inside a scratch directory.
struct Pod {
    dir: tempfile::TempDir,
    pki: Pki,
    env: Vec<(String, String)>,
    block: Option<PathBuf>,
    args: Vec<String>,
    uid: Option<u32>,
}

/// A running upload server.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    termination: PathBuf,
}

/// How a server run ended.
struct Ended {
    code: i32,
    termination: String,
    stderr: String,
}

impl Pod {
    fn new(label: &str) -> Pod {
        let dir = scratch_dir(label);
        for sub in ["data", "run", "scratch"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let pki = Pki::create(&dir.path().join("certs"));
        let mut pod = Pod { dir, pki, env: Vec::new(), block: None, args: Vec::new(), uid: None };
        let (cert, key, ca) = (pod.pki.path("server.pem"), pod.pki.path("server.key"), pod.pki.path("ca.pem"));
        for (k, v) in [
            ("TLS_KEY_FILE", key.to_str().unwrap()),
            ("TLS_CERT_FILE", cert.to_str().unwrap()),
            ("CLIENT_CERT_FILE", ca.to_str().unwrap()),
            ("CLIENT_NAME", CLIENT_NAME),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("UPLOAD_IMAGE_SIZE", ""),
            ("PREALLOCATION", "false"),
            ("TLS_CIPHERS", ""),
            ("TLS_MIN_VERSION", "VersionTLS12"),
            ("LISTEN_ADDRESS", "127.0.0.1"),
            ("LISTEN_PORT", "0"),
        ] {
            pod.set(k, v);
        }
        pod
    }

    fn set(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn image(&self) -> PathBuf {
        self.data().join("disk.img")
    }

    fn command(&self) -> Command {
        let mut cmd = boundimport();
        cmd.args(["upload-server", "-alsologtostderr", "-v=3"])
            .arg("--data-dir")
            .arg(self.data())
            .arg("--block-path")
            .arg(self.block.clone().unwrap_or_else(|| self.dir.path().join("no-block-volume")))
            .arg("--termination-log")
            .arg(self.dir.path().join("run/termination-log"))
            .arg("--scratch-dir")
            .arg(self.dir.path().join("scratch"))
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(uid) = self.uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        cmd
    }

    /// Starts the server and waits until it listens.
    fn start(&self) -> Server {
        Server::spawn(self.command().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn"), self)
    }

    /// Runs the server to its end without any client (for start-up failures and deadlines).
    fn run_alone(&self, limit: Duration) -> Ended {
        let mut child = self.command().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
        let mut stderr = String::new();
        let mut pipe = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let _ = pipe.read_to_string(&mut stderr);
            stderr
        });
        let status = wait_child(&mut child, limit);
        Ended {
            code: status,
            termination: fs::read_to_string(self.dir.path().join("run/termination-log")).unwrap_or_default(),
            stderr: reader.join().unwrap(),
        }
    }
}

/// Waits for `child` at most `limit`; kills it and panics on a hang.
fn wait_child(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the upload server still runs after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// Follows a spawned server's stderr until it says where it listens.
    fn spawn(mut child: Child, pod: &Pod) -> Server {
        let log = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let shared = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Running server on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
                let mut text = shared.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let termination = pod.dir.path().join("run/termination-log");
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => Server { child, addr: addr.parse().expect("listen address"), log, termination },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the upload server did not start:\n{}", log.lock().unwrap());
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit.
    fn finish(mut self, limit: Duration) -> Ended {
        let code = wait_child(&mut self.child, limit);
        // Let the stderr reader catch up with the last lines.
        std::thread::sleep(Duration::from_millis(100));
        Ended { code, termination: fs::read_to_string(&self.termination).unwrap_or_default(), stderr: self.log() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clients

/// curl against the server with the pod's CA; returns the HTTP status (0 when no answer) and curl's exit code.
fn curl(pod: &Pod, server: &Server, cert: Option<&str>, args: &[&str], path: &str) -> (u16, i32, String) {
    let out = pod.dir.path().join("curl.out");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "120", "-o"]).arg(&out).args(["-w", "%{http_code}", "--cacert"]);
    cmd.arg(pod.pki.path("ca.pem"));
    if let Some(name) = cert {
        cmd.arg("--cert").arg(pod.pki.path(&format!("{name}.pem")));
        cmd.arg("--key").arg(pod.pki.path(&format!("{name}.key")));
    }
    let output = cmd.args(args).arg(server.url(path)).output().expect("running curl (install curl)");
    let status = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0);
    let body = fs::read_to_string(&out).unwrap_or_default();
    let _ = fs::remove_file(&out);
    (status, output.status.code().unwrap_or(-1), body)
}

/// A request as CDI's upload proxy (or clone source) sends it.
struct Upload {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Box<dyn Read>>,
    /// Sent as Content-Length; `None` sends the body chunked.
    len: Option<u64>,
    /// Client certificate name in the pod's PKI.
    cert: Option<&'static str>,
    /// Bytes per second, to keep an upload running for a while.
    rate: Option<u64>,
    /// Drop the connection after this many body bytes.
    abort_after: Option<u64>,
    /// Stop sending (keeping the connection open) after this many body bytes, and wait for the answer.
    stall_after: Option<u64>,
}

impl Upload {
    /// A POST of `file` to `path` with the upload proxy's headers and client certificate.
    fn file(path: &str, file: &Path) -> Upload {
        let len = fs::metadata(file).unwrap().len();
        Upload::bytes_from(path, Box::new(fs::File::open(file).unwrap()), Some(len))
    }

    fn bytes(path: &str, bytes: Vec<u8>) -> Upload {
        let len = bytes.len() as u64;
        Upload::bytes_from(path, Box::new(std::io::Cursor::new(bytes)), Some(len))
    }

    fn bytes_from(path: &str, body: Box<dyn Read>, len: Option<u64>) -> Upload {
        Upload {
            method: "POST",
            path: path.to_string(),
            headers: vec![
                ("Authorization".into(), "Bearer eyJhbGciOiJQUzI1NiJ9.eyJwdmMiOiJ0ZXN0In0.c2lnbmF0dXJl".into()),
                ("X-Forwarded-For".into(), "10.244.0.1".into()),
                ("Accept-Encoding".into(), "gzip".into()),
            ],
            body: Some(body),
            len,
            cert: Some("client"),
            rate: None,
            abort_after: None,
            stall_after: None,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Upload {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn chunked(mut self) -> Upload {
        self.len = None;
        self
    }
}

fn client_config(pod: &Pod, cert: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pod.pki.path("ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(pod.pki.path(&format!("{name}.pem")))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
            let key = PrivateKeyDer::from_pem_file(pod.pki.path(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    })
}

/// Sends `upload` and reads the answer: `Ok((status, body))`, or `Err` when the connection failed before an answer.
fn send(pod: &Pod, server: &Server, mut upload: Upload) -> Result<(u16, String), String> {
    let config = client_config(pod, upload.cert);
    let name = ServerName::IpAddress(server.addr.ip().into());
    let session = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut tls = rustls::StreamOwned::new(session, sock);
    let mut head = format!("{} {} HTTP/1.1\r\nHost: cdi-upload-test.default.svc:443\r\n", upload.method, upload.path);
    for (name, value) in &upload.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match (upload.body.is_some(), upload.len) {
        (true, Some(len)) => head.push_str(&format!("Content-Length: {len}\r\n")),
        (true, None) => head.push_str("Transfer-Encoding: chunked\r\n"),
        (false, _) => {}
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).map_err(|e| format!("sending the head: {e}"))?;
    let started = Instant::now();
    let mut sent = 0u64;
    if let Some(body) = upload.body.as_mut() {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = body.read(&mut buf).unwrap();
            let n = match upload.abort_after {
                Some(limit) if sent + n as u64 >= limit => {
                    let keep = (limit - sent) as usize;
                    let _ = tls.write_all(&buf[..keep]);
                    let _ = tls.flush();
                    let _ = tls.sock.shutdown(Shutdown::Both);
                    return Ok((0, format!("aborted after {limit} bytes")));
                }
                _ => n,
            };
            if upload.stall_after.is_some_and(|limit| sent + n as u64 >= limit) {
                break;
            }
            let written = if upload.len.is_none() {
                if n == 0 {
                    tls.write_all(b"0\r\n\r\n")
                } else {
                    tls.write_all(format!("{n:x}\r\n").as_bytes())
                        .and_then(|()| tls.write_all(&buf[..n]))
                        .and_then(|()| tls.write_all(b"\r\n"))
                }
            } else {
                tls.write_all(&buf[..n])
            };
            if written.is_err() {
                break; // the server answered early and closed: read its answer
            }
            if n == 0 {
                break;
            }
            sent += n as u64;
            if let Some(rate) = upload.rate {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let _ = tls.flush();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) if !answer.is_empty() => break,
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("no answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn snappy(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = snap::write::FrameEncoder::new(Vec::new());
    encoder.write_all(bytes).unwrap();
    encoder.into_inner().unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Images

/// Test images of one guest disk in the formats users upload, and the reference digest.
struct Images {
    bench: Workbench,
    digest: String,
    len: u64,
}

const GUEST_SIZE: u64 = 24 * MIB;

impl Images {
    fn make() -> Images {
        let bench = Workbench::new("upload-images");
        let raw = bench.raw_mix("disk.raw", GUEST_SIZE, 77);
        for (name, format, options) in [
            ("disk.qcow2", "qcow2", ""),
            ("disk-stream.vmdk", "vmdk", "subformat=streamOptimized"),
            ("disk-sparse.vmdk", "vmdk", ""),
        ] {
            let mut args = vec!["convert", "-f", "raw", "-O", format];
            if !options.is_empty() {
                args.extend_from_slice(&["-o", options]);
            }
            args.extend_from_slice(&["disk.raw", name]);
            bench.qemu_img(&args);
        }
        run(Command::new("gzip").args(["-k", "-f"]).arg(bench.path("disk.qcow2")));
        run(Command::new("xz").args(["-k", "-f", "-0"]).arg(&raw));
        let (digest, len) = qemu_reference(&bench.path("disk.qcow2"), bench.dir.path());
        for other in ["disk-stream.vmdk", "disk-sparse.vmdk"] {
            assert_eq!(qemu_reference(&bench.path(other), bench.dir.path()), (digest.clone(), len), "{other}");
        }
        assert_eq!(len, GUEST_SIZE);
        Images { bench, digest, len }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.bench.path(name)
    }
}

fn assert_image(pod: &Pod, images: &Images, what: &str) {
    let scratch: Vec<_> = fs::read_dir(pod.dir.path().join("scratch")).unwrap().collect();
    assert!(scratch.is_empty(), "{what}: files left in the scratch directory");
    let image = pod.image();
    let len = fs::metadata(&image).unwrap_or_else(|e| panic!("{what}: {}: {e}", image.display())).len();
    assert_eq!(len, images.len, "{what}: image size");
    assert_eq!(sha256_prefix(&image, len), images.digest, "{what}: contents differ from qemu-img convert -O raw");
}

fn expect_complete(server: Server, what: &str, expected: &str) -> Ended {
    let ended = server.finish(Duration::from_secs(60));
    assert_eq!(ended.code, 0, "{what}: exit code; stderr:\n{}", ended.stderr);
    assert_eq!(ended.termination, expected, "{what}: termination message");
    ended
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_format_uploads_sync_async_and_as_a_form_byte_identical_to_qemu_img() {
    let images = Images::make();
    let formats = ["disk.qcow2", "disk.qcow2.gz", "disk.raw.xz", "disk-stream.vmdk", "disk-sparse.vmdk"];
    for name in formats {
        let file = images.path(name);
        let file_arg = format!("@{}", file.display());

        // Sync, curl.
        let pod = Pod::new("upload-sync");
        let server = pod.start();
        let (status, code, body) =
            curl(&pod, &server, Some("client"), &["--data-binary", &file_arg], "/v1beta1/upload");
        assert_eq!((status, code), (200, 0), "{name} sync: {body}\n{}", server.log());
        expect_complete(server, name, UPLOAD_COMPLETE);
        assert_image(&pod, &images, &format!("{name} sync (curl)"));

        // Async, the upload proxy's request (chunked, as Go's proxy forwards a stream of unknown length).
        let pod = Pod::new("upload-async");
        let server = pod.start();
        let answer = send(&pod, &server, Upload::file("/v1beta1/upload-async", &file).chunked());
        assert_eq!(answer, Ok((200, String::new())), "{name} async\n{}", server.log());
        let ended = expect_complete(server, name, UPLOAD_COMPLETE);
        assert!(ended.stderr.contains("continue processing in background"), "{}", ended.stderr);
        assert_image(&pod, &images, &format!("{name} async (proxy client)"));

        // Form, curl -F (multipart/form-data, Expect: 100-continue for large files).
        let pod = Pod::new("upload-form");
        let server = pod.start();
        let form = format!("file=@{}", file.display());
        let (status, code, body) =
            curl(&pod, &server, Some("client"), &["-F", "note=ignored", "-F", &form], "/v1beta1/upload-form");
        assert_eq!((status, code), (200, 0), "{name} form: {body}\n{}", server.log());
        expect_complete(server, name, UPLOAD_COMPLETE);
        assert_image(&pod, &images, &format!("{name} form (curl)"));
    }

    // The proxy client with Content-Length, sync and form-async.
    let pod = Pod::new("upload-proxy-sync");
    let server = pod.start();
    let answer = send(&pod, &server, Upload::file("/v1alpha1/upload", &images.path("disk.qcow2")));
    assert_eq!(answer, Ok((200, String::new())));
    expect_complete(server, "proxy sync", UPLOAD_COMPLETE);
    assert_image(&pod, &images, "proxy sync");

    let pod = Pod::new("upload-proxy-form-async");
    let server = pod.start();
    let boundary = "cdi-test-boundary-4f1c";
    let mut form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"disk.raw.xz\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    form.extend_from_slice(&fs::read(images.path("disk.raw.xz")).unwrap());
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let upload = Upload::bytes("/v1beta1/upload-form-async", form)
        .header("Content-Type", &format!("multipart/form-data; boundary={boundary}"));
    assert_eq!(send(&pod, &server, upload), Ok((200, String::new())));
    expect_complete(server, "proxy form async", UPLOAD_COMPLETE);
    assert_image(&pod, &images, "proxy form async");
}

#[test]
fn sizes_and_preallocation_follow_cdi() {
    let bench = Workbench::new("upload-size");
    let qcow2 = bench.qcow2_mix("disk.qcow2", 8 * MIB, "", &[]);
    let (digest, len) = qemu_reference(&qcow2, bench.dir.path());

    // Grown to UPLOAD_IMAGE_SIZE, preallocated.
    let mut pod = Pod::new("upload-grow");
    pod.set("UPLOAD_IMAGE_SIZE", "32Mi").set("PREALLOCATION", "true");
    let server = pod.start();
    assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2)), Ok((200, String::new())));
    expect_complete(server, "grow", r#"{"preallocationApplied":true,"message":"Upload Complete"}"#);
    let meta = fs::metadata(pod.image()).unwrap();
    assert_eq!(meta.len(), 32 * MIB);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 >= 32 * MIB, "preallocated");
    assert_eq!(sha256_prefix(&pod.image(), len), digest);
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o660);

    // Too small: 400 before anything is written, and the server waits for a better attempt.
    let mut pod = Pod::new("upload-too-small");
    pod.set("UPLOAD_IMAGE_SIZE", "4Mi");
    let mut server = pod.start();
    let (status, body) = send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2)).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.starts_with("Saving stream failed: effective image size is larger than the reported available storage"),
        "{body}"
    );
    assert!(!pod.image().exists(), "a refused image leaves no disk.img");
    assert!(server.running(), "the server waits for another attempt");
    // An image that fits still goes in.
    let small = bench.qcow2_mix("small.qcow2", 3 * MIB, "", &[]);
    assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &small)), Ok((200, String::new())));
    expect_complete(server, "after a refusal", UPLOAD_COMPLETE);
    assert_eq!(fs::metadata(pod.image()).unwrap().len(), 4 * MIB, "grown to UPLOAD_IMAGE_SIZE");
}

#[test]
fn only_the_named_client_with_a_verified_certificate_may_upload() {
    let bench = Workbench::new("upload-auth");
    let qcow2 = bench.qcow2_mix("disk.qcow2", 4 * MIB, "", &[]);
    let file_arg = format!("@{}", qcow2.display());
    let pod = Pod::new("upload-auth");
    let mut server = pod.start();

    // Health and routing need no certificate.
    assert_eq!(curl(&pod, &server, None, &[], "/healthz"), (200, 0, "OK".to_string()));
    assert_eq!(curl(&pod, &server, None, &["-X", "POST"], "/healthz").0, 200);
    assert_eq!(curl(&pod, &server, None, &[], "/nowhere"), (404, 0, "404 page not found\n".to_string()));
    assert_eq!(curl(&pod, &server, None, &["-I"], "/v1beta1/upload-async").0, 200, "HEAD on the async path");
    assert_eq!(curl(&pod, &server, Some("client"), &[], "/v1beta1/upload").0, 404, "GET on an upload path");
    let (status, _, metrics) = curl(&pod, &server, None, &[], "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("\nboundimport_processed_bytes 0\n") && !metrics.contains("kubevirt_cdi"), "{metrics}");

    // No certificate, the wrong CN: 401.
    let data = ["--data-binary", file_arg.as_str()];
    assert_eq!(curl(&pod, &server, None, &data, "/v1beta1/upload").0, 401);
    assert_eq!(curl(&pod, &server, Some("wrong-cn"), &data, "/v1beta1/upload").0, 401);
    let mut no_cert = Upload::file("/v1beta1/upload", &qcow2);
    no_cert.cert = None;
    assert_eq!(send(&pod, &server, no_cert), Ok((401, String::new())));
    let mut wrong = Upload::file("/v1beta1/upload-async", &qcow2);
    wrong.cert = Some("wrong-cn");
    assert_eq!(send(&pod, &server, wrong), Ok((401, String::new())));
    // A certificate from another CA fails the handshake.
    let (status, code, _) = curl(&pod, &server, Some("foreign"), &data, "/v1beta1/upload");
    assert_eq!(status, 0, "no answer over a failed handshake");
    assert_ne!(code, 0);
    let mut foreign = Upload::file("/v1beta1/upload", &qcow2);
    foreign.cert = Some("foreign");
    assert!(send(&pod, &server, foreign).is_err());
    assert!(!pod.image().exists(), "refused uploads write nothing");
    assert!(server.running());

    // Then the right client.
    let (status, code, body) = curl(&pod, &server, Some("client"), &data, "/v1beta1/upload");
    assert_eq!((status, code), (200, 0), "{body}");
    expect_complete(server, "after refusals", UPLOAD_COMPLETE);
}

#[test]
fn a_second_upload_gets_503_and_one_after_done_409() {
    let bench = Workbench::new("upload-busy");
    let raw = bench.raw_mix("disk.raw", 6 * MIB, 5);
    let mut pod = Pod::new("upload-busy");
    pod.args.extend(["--linger".to_string(), "5".to_string()]);
    let server = pod.start();
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let mut upload = Upload::file("/v1beta1/upload", &raw);
            upload.rate = Some(2 * MIB); // about 3 s
            send(&pod, &server, upload)
        });
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &raw)), Ok((503, String::new())));
        let (status, ..) = curl(&pod, &server, Some("client"), &["--data-binary", "x"], "/v1beta1/upload-async");
        assert_eq!(status, 503);
        assert_eq!(slow.join().unwrap(), Ok((200, String::new())));
    });
    assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &raw)), Ok((409, String::new())));
    assert_eq!(curl(&pod, &server, None, &[], "/healthz").0, 200);
    let (_, _, metrics) = curl(&pod, &server, None, &[], "/metrics");
    assert!(metrics.contains(&format!("\nboundimport_processed_bytes {}\n", 6 * MIB)), "{metrics}");
    assert!(metrics.contains("# TYPE boundimport_written_bytes gauge"), "{metrics}");
    let ended = expect_complete(server, "busy", UPLOAD_COMPLETE);
    assert!(ended.stderr.contains("Got concurrent upload request"), "{}", ended.stderr);
    assert_eq!(sha256_prefix(&pod.image(), 6 * MIB), sha256_prefix(&raw, 6 * MIB));
}

#[test]
fn a_client_that_drops_mid_body_leaves_nothing_and_the_server_waits_for_a_retry() {
    let bench = Workbench::new("upload-drop");
    let qcow2 = bench.qcow2_mix("disk.qcow2", 16 * MIB, "", &[]);
    let raw = bench.raw_mix("disk.raw", 16 * MIB, 9);
    let mut pod = Pod::new("upload-drop");
    pod.args.extend(["--linger".to_string(), "3".to_string()]);
    let mut server = pod.start();
    for (file, chunked, path) in
        [(&qcow2, false, "/v1beta1/upload"), (&raw, true, "/v1beta1/upload"), (&raw, false, "/v1beta1/upload-async")]
    {
        let mut upload = Upload::file(path, file);
        if chunked {
            upload = upload.chunked();
        }
        upload.abort_after = Some(9 * MIB + 12345);
        let _ = send(&pod, &server, upload);
        // The server notices, cleans up and is ready again.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.log().contains("Saving stream failed") || pod.image().exists() {
            assert!(Instant::now() < deadline, "no cleanup after a dropped client:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(server.running(), "a dropped client does not end the server:\n{}", server.log());
        assert!(!pod.image().exists(), "a partial disk.img was left behind");
        assert_eq!(curl(&pod, &server, None, &[], "/healthz").0, 200);
        *server.log.lock().unwrap() = String::new();
    }
    let answer = send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2));
    assert_eq!(answer, Ok((200, String::new())));
    // The gauges count the successful attempt only.
    let (_, _, metrics) = curl(&pod, &server, None, &[], "/metrics");
    assert!(metrics.contains(&format!("\nboundimport_processed_bytes {}\n", 16 * MIB)), "{metrics}");
    expect_complete(server, "retry", UPLOAD_COMPLETE);
    let (digest, len) = qemu_reference(&qcow2, bench.dir.path());
    assert_eq!(sha256_prefix(&pod.image(), len), digest);
}

#[test]
fn the_deadline_ends_an_idle_server_and_waits_for_a_running_upload() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let rfc3339 = |unix: u64| {
        let out = run(Command::new("date").args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%SZ"]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let mut pod = Pod::new("upload-deadline");
    pod.set("DEADLINE", &rfc3339(now + 2));
    let started = Instant::now();
    let ended = pod.run_alone(Duration::from_secs(30));
    assert_eq!(ended.code, 0, "{}", ended.stderr);
    assert_eq!(ended.termination, r#"{"deadlinePassed":true,"message":"Deadline Passed"}"#);
    assert!(started.elapsed() >= Duration::from_millis(900), "ended before the deadline");

    // A deadline passing during an upload waits for it; the upload completes.
    let bench = Workbench::new("upload-deadline-busy");
    let raw = bench.raw_mix("disk.raw", 8 * MIB, 3);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut pod = Pod::new("upload-deadline-busy");
    pod.set("DEADLINE", &rfc3339(now + 2));
    let server = pod.start();
    let mut upload = Upload::file("/v1beta1/upload", &raw);
    upload.rate = Some(2 * MIB); // 4 s, past the deadline
    assert_eq!(send(&pod, &server, upload), Ok((200, String::new())));
    expect_complete(server, "deadline during an upload", UPLOAD_COMPLETE);

    // A malformed deadline is fatal, as in CDI.
    let mut pod = Pod::new("upload-deadline-bad");
    pod.set("DEADLINE", "next tuesday");
    let ended = pod.run_alone(Duration::from_secs(10));
    assert_eq!(ended.code, 1);
    assert!(ended.termination.contains("Failed to parse deadline"), "{}", ended.termination);
}

#[test]
fn start_up_failures_are_one_line_and_exit_1() {
    let mut pod = Pod::new("upload-no-tls");
    pod.set("TLS_CERT_FILE", "");
    let ended = pod.run_alone(Duration::from_secs(10));
    assert_eq!(ended.code, 1);
    assert!(ended.termination.starts_with("UploadServer failed: Error getting TLS config"), "{}", ended.termination);
    assert!(!ended.termination.contains('\n'));
    let mut pod = Pod::new("upload-bad-key");
    let cert = pod.pki.path("server.pem");
    pod.set("TLS_KEY_FILE", cert.to_str().unwrap());
    let ended = pod.run_alone(Duration::from_secs(10));
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(ended.termination.contains("server.pem"), "{}", ended.termination);
    // Invoked as cdi-uploadserver, with klog flags.
    let pod = Pod::new("upload-argv0");
    let link = pod.dir.path().join("cdi-uploadserver");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_boundimport"), &link).unwrap();
    let mut cmd = pod.command();
    let args: Vec<_> = cmd.get_args().skip(1).map(|a| a.to_os_string()).collect();
    let envs: Vec<_> = cmd.get_envs().map(|(k, v)| (k.to_os_string(), v.map(|v| v.to_os_string()))).collect();
    let mut linked = Command::new(&link);
    linked.args(args).env_clear();
    for (k, v) in envs {
        if let Some(v) = v {
            linked.env(k, v);
        }
    }
    cmd = linked;
    let server = Server::spawn(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap(), &pod);
    assert_eq!(curl(&pod, &server, None, &[], "/healthz").0, 200);
}

#[test]
fn archives_and_filesystem_clones_are_extracted_into_the_data_directory() {
    let bench = Workbench::new("upload-archive");
    let tree = bench.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a.txt"), b"alpha\n").unwrap();
    write_raw(&tree.join("disk.img"), 12 * MIB, &[(MIB, 2 * MIB, Fill::Random(4)), (9 * MIB, MIB, Fill::Pattern)]);
    let image_digest = sha256_prefix(&tree.join("disk.img"), 12 * MIB);
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["-czf"])
        .arg(bench.path("tree.tar.gz"))
        .args(["sub", "disk.img"]));
    // CDI's clone source: `tar cv -S <files>` in the source volume, snappy-framed.
    let tar = run(Command::new("tar").current_dir(&tree).args(["cvS", "-f", "-", "disk.img", "sub"])).stdout;

    let pod = Pod::new("upload-archive");
    let server = pod.start();
    let answer = send(&pod, &server, Upload::file("/v1beta1/upload-archive", &bench.path("tree.tar.gz")));
    assert_eq!(answer, Ok((200, String::new())));
    expect_complete(server, "archive", UPLOAD_COMPLETE);
    assert_eq!(fs::read(pod.data().join("sub/a.txt")).unwrap(), b"alpha\n");
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), 12 * MIB), image_digest);

    let pod = Pod::new("upload-fs-clone");
    let server = pod.start();
    let upload = Upload::bytes_from("/v1beta1/upload", Box::new(std::io::Cursor::new(snappy(&tar))), None)
        .header("x-cdi-content-type", "filesystem-clone");
    assert_eq!(send(&pod, &server, upload), Ok((200, String::new())));
    // CDI reports preallocation for a filesystem-to-filesystem clone.
    expect_complete(server, "filesystem clone", r#"{"preallocationApplied":true,"message":"Clone Complete"}"#);
    assert_eq!(fs::read(pod.data().join("sub/a.txt")).unwrap(), b"alpha\n");
    let meta = fs::metadata(pod.data().join("disk.img")).unwrap();
    assert_eq!(meta.len(), 12 * MIB);
    assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 6 * MIB, "holes stay holes");
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), 12 * MIB), image_digest);

    // A truncated archive leaves an empty data directory; async clones are refused as in CDI.
    let pod = Pod::new("upload-archive-bad");
    let mut server = pod.start();
    let mut upload = Upload::file("/v1beta1/upload-archive", &bench.path("tree.tar.gz"));
    upload.abort_after = Some(fs::metadata(bench.path("tree.tar.gz")).unwrap().len() / 2);
    let _ = send(&pod, &server, upload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("Saving stream failed") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0, "a partial extraction was left behind");
    let upload = Upload::bytes_from("/v1beta1/upload-async", Box::new(std::io::Cursor::new(snappy(&tar))), None)
        .header("x-cdi-content-type", "filesystem-clone");
    assert_eq!(send(&pod, &server, upload), Ok((500, "Saving stream failed: async clone not supported".to_string())));
    assert!(server.running());
}

#[test]
fn a_failed_archive_upload_removes_only_what_it_extracted() {
    let bench = Workbench::new("upload-archive-prior");
    let tree = bench.path("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a.txt"), b"alpha\n").unwrap();
    fs::create_dir(tree.join("shared")).unwrap();
    fs::write(tree.join("shared/new"), b"new").unwrap();
    write_raw(&tree.join("disk.img"), 12 * MIB, &[(MIB, 2 * MIB, Fill::Random(4))]);
    // Small members first, so they are extracted before the upload breaks off inside the disk.
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["-czf"])
        .arg(bench.path("t.tar.gz"))
        .args(["sub", "shared", "disk.img"]));
    let pod = Pod::new("upload-archive-prior");
    fs::create_dir(pod.data().join("lost+found")).unwrap();
    fs::write(pod.data().join("lost+found/#12"), b"recovered").unwrap();
    fs::create_dir(pod.data().join("shared")).unwrap();
    fs::write(pod.data().join("shared/old"), b"old").unwrap();
    let server = pod.start();
    let mut upload = Upload::file("/v1beta1/upload-archive", &bench.path("t.tar.gz"));
    upload.abort_after = Some(fs::metadata(bench.path("t.tar.gz")).unwrap().len() / 2);
    let _ = send(&pod, &server, upload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("Saving stream failed") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(pod.data().join("lost+found/#12")).unwrap(), b"recovered", "{}", server.log());
    assert_eq!(fs::read(pod.data().join("shared/old")).unwrap(), b"old");
    let mut left: Vec<String> =
        fs::read_dir(pod.data()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["lost+found", "shared"], "{}", server.log());
    assert!(!pod.data().join("shared/new").exists(), "{}", server.log());
}

#[test]
fn a_block_device_clone_is_written_byte_for_byte() {
    let bench = Workbench::new("upload-block-clone");
    // The "device" holds a qcow2 image: a clone must copy it, not convert it.
    let qcow2 = bench.qcow2_mix("disk.qcow2", 6 * MIB, "", &[]);
    let bytes = fs::read(&qcow2).unwrap();
    let pod = Pod::new("upload-block-clone");
    let server = pod.start();
    let upload = Upload::bytes_from("/v1beta1/upload", Box::new(std::io::Cursor::new(snappy(&bytes))), None)
        .header("x-cdi-content-type", "blockdevice-clone");
    assert_eq!(send(&pod, &server, upload), Ok((200, String::new())));
    expect_complete(server, "block clone", r#"{"preallocationApplied":false,"message":"Clone Complete"}"#);
    assert_eq!(fs::read(pod.image()).unwrap(), bytes, "the clone is the source's bytes");

    // A stream that is not snappy-framed fails with a one-line 500 and leaves nothing.
    let pod = Pod::new("upload-block-clone-bad");
    let mut server = pod.start();
    let upload = Upload::bytes("/v1beta1/upload", bytes.clone()).header("x-cdi-content-type", "blockdevice-clone");
    let (status, body) = send(&pod, &server, upload).unwrap();
    assert_eq!(status, 500);
    assert!(body.starts_with("Saving stream failed: ") && !body.contains('\n'), "{body}");
    assert!(!pod.image().exists());
    assert!(server.running());
}

/// A loop device over a sparse file, detached on drop.
fn loop_device(dir: &Path, size: u64) -> boundimport::lab::fixtures::LoopDevice {
    let backing = dir.join("device");
    fs::File::create(&backing).unwrap().set_len(size).unwrap();
    boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap()
}

#[test]
fn block_volumes_take_images_and_clones_and_are_scrubbed_after_a_failure() {
    if !require_privileged("block_volumes_take_images_and_clones_and_are_scrubbed_after_a_failure") {
        return;
    }
    let bench = Workbench::new("upload-block");
    let qcow2 = bench.qcow2_mix("disk.qcow2", 16 * MIB, "", &[]);
    let (digest, len) = qemu_reference(&qcow2, bench.dir.path());
    let device = loop_device(bench.dir.path(), 64 * MIB);
    let mut pod = Pod::new("upload-block");
    pod.block = Some(device.path().to_path_buf());
    pod.set("DESTINATION", "/dev/cdi-block-volume");
    // Junk where a failed upload would leave a disk header.
    fs::OpenOptions::new().write(true).open(device.path()).unwrap().write_all(&[0xab; 4096]).unwrap();

    let mut server = pod.start();
    let mut upload = Upload::file("/v1beta1/upload", &qcow2);
    upload.abort_after = Some(10 * MIB);
    let _ = send(&pod, &server, upload);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("Saving stream failed") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.running());
    let mut head = vec![0u8; MIB as usize];
    fs::File::open(device.path()).unwrap().read_exact(&mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0), "the device's first MiB still holds part of an image");
    assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2)), Ok((200, String::new())));
    expect_complete(server, "block upload", UPLOAD_COMPLETE);
    assert_eq!(sha256_prefix(device.path(), len), digest);

    // A filesystem clone onto a block volume: the disk.img member of the tar, holes as zeros.
    let tree = bench.path("tree");
    fs::create_dir_all(&tree).unwrap();
    write_raw(&tree.join("disk.img"), 20 * MIB, &[(3 * MIB, MIB, Fill::Random(8)), (19 * MIB, MIB, Fill::Pattern)]);
    let tar = run(Command::new("tar").current_dir(&tree).args(["cvS", "-f", "-", "disk.img"])).stdout;
    let server = pod.start();
    let upload = Upload::bytes_from("/v1beta1/upload", Box::new(std::io::Cursor::new(snappy(&tar))), None)
        .header("x-cdi-content-type", "filesystem-clone");
    assert_eq!(send(&pod, &server, upload), Ok((200, String::new())));
    expect_complete(server, "fs clone to block", r#"{"preallocationApplied":false,"message":"Clone Complete"}"#);
    assert_eq!(sha256_prefix(device.path(), 20 * MIB), sha256_prefix(&tree.join("disk.img"), 20 * MIB));
}

/// The bound: a 2 GiB incompressible qcow2 uploaded into a server in a 600M memory cgroup onto a loop device
/// throttled to 50 MB/s must peak at ≤ 64 MiB with no limit hit.
#[test]
fn a_2_gib_upload_onto_a_throttled_device_stays_under_64_mib_in_a_600m_cgroup() {
    if !require_privileged("a_2_gib_upload_onto_a_throttled_device_stays_under_64_mib_in_a_600m_cgroup") {
        return;
    }
    use boundimport::lab::fixtures::{drop_caches, ChildCgroup, WriteThrottle};
    const SIZE: u64 = 2 << 30;
    const WRITE_BPS: u64 = 50_000_000;
    let (qcow2, digest) = incompressible_qcow2(SIZE);
    let dir = scratch_dir("upload-bounded");
    let device = loop_device(dir.path(), SIZE + 256 * MIB);
    let _throttle = WriteThrottle::set(device.path(), WRITE_BPS, None).unwrap();
    let mut pod = Pod::new("upload-bounded");
    pod.block = Some(device.path().to_path_buf());
    pod.set("DESTINATION", "/dev/cdi-block-volume");
    let cgroup = ChildCgroup::create(&format!("upload-bounded-{}", std::process::id()), 600_000_000).unwrap();
    drop_caches().unwrap();
    let child = cgroup.spawn(pod.command().stdout(Stdio::null()).stderr(Stdio::piped())).unwrap();
    let server = Server::spawn(child, &pod);
    let started = Instant::now();
    // The client runs outside the cgroup, as the upload proxy does.
    let answer = send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2));
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(answer, Ok((200, String::new())), "{}", server.log());
    let ended = expect_complete(server, "bounded upload", UPLOAD_COMPLETE);
    let reader = cgroup.reader();
    let peak = reader.peak().unwrap().unwrap();
    let events = reader.events().unwrap();
    eprintln!(
        "upload-bounded: peak {:.1} MiB, limit hits {}, oom kills {}, 2 GiB in {wall:.1}s ({:.1} MB/s; device {} MB/s)",
        peak as f64 / MIB as f64,
        events.limit_hits,
        events.oom_kills,
        SIZE as f64 / wall / 1e6,
        WRITE_BPS / 1_000_000
    );
    assert_eq!(sha256_prefix(device.path(), SIZE), digest, "{}", ended.stderr);
    assert!(peak <= 64 * MIB, "peak {} MiB", peak / MIB);
    assert_eq!(events.limit_hits, 0);
    assert_eq!(events.oom_kills, 0);
}

/// A qcow2 of `size` incompressible bytes and the sha256 of its guest contents, built once and kept in Cargo's
/// target temp directory. The same file (name, seed, sidecar) as tests/bounded.rs, so a test run builds it once;
/// whichever binary builds it, the sidecar holds the digest of what was built.
fn incompressible_qcow2(size: u64) -> (PathBuf, String) {
    use sha2::{Digest, Sha256};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bounded-incompressible-2g.qcow2");
    let sidecar = dir.join("bounded-incompressible-2g.qcow2.sha256");
    if let (true, Ok(digest)) = (path.exists(), fs::read_to_string(&sidecar)) {
        return (path, digest.trim().to_string());
    }
    let raw = dir.join("bounded-incompressible-2g.raw");
    let mut file = std::io::BufWriter::new(fs::File::create(&raw).unwrap());
    let mut hasher = Sha256::new();
    let mut rng = common::SplitMix64::new(2024);
    let mut block = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        rng.fill(&mut block);
        hasher.update(&block);
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    run(Command::new(common::qemu_img()).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&path));
    fs::remove_file(&raw).unwrap();
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&sidecar, &digest).unwrap();
    (path, digest)
}

/// Sends `request` as is (head and body) with the upload proxy's certificate and returns the raw answer.
fn raw_exchange(pod: &Pod, server: &Server, request: &[u8]) -> String {
    let config = client_config(pod, Some("client"));
    let session = rustls::ClientConnection::new(config, ServerName::IpAddress(server.addr.ip().into())).unwrap();
    let sock = TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = rustls::StreamOwned::new(session, sock);
    let _ = tls.write_all(request).and_then(|()| tls.flush());
    // Nothing more comes from this client (a stream that stops here).
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = tls.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn hostile_requests_get_one_line_answers_and_the_server_carries_on() {
    let pod = Pod::new("upload-hostile");
    let mut server = pod.start();
    let status = |answer: &str| answer.split_whitespace().nth(1).unwrap_or("").to_string();

    let huge = format!("POST /v1beta1/upload HTTP/1.1\r\nX-Junk: {}\r\n\r\n", "a".repeat(70 * 1024));
    assert_eq!(status(&raw_exchange(&pod, &server, huge.as_bytes())), "431");
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    let answer = raw_exchange(&pod, &server, format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert_eq!(status(&answer), "431");
    assert_eq!(status(&raw_exchange(&pod, &server, b"POST /v1beta1/upload HTTP/1.0\r\n\r\n")), "505");
    assert_eq!(status(&raw_exchange(&pod, &server, b"\x16\x03garbage\r\n\r\n")), "400");
    let te = b"POST /v1beta1/upload HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
    assert_eq!(status(&raw_exchange(&pod, &server, te)), "501");
    let cl = b"POST /v1beta1/upload HTTP/1.1\r\nContent-Length: 12x\r\n\r\n";
    assert_eq!(status(&raw_exchange(&pod, &server, cl)), "400");

    // Malformed chunking inside an accepted upload: 500, one line, nothing left, ready for the next attempt.
    for body in [
        "zz\r\nabc\r\n0\r\n\r\n".to_string(),
        format!("{}\r\n", "1".repeat(5000)),
        "4\r\nabcdXX\r\n".to_string(),
        "ffffffffffffffff\r\nabc".to_string(),
    ] {
        let request = format!("POST /v1beta1/upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let answer = raw_exchange(&pod, &server, request.as_bytes());
        assert_eq!(status(&answer), "500", "{answer}");
        let text = answer.split_once("\r\n\r\n").unwrap().1;
        assert!(text.starts_with("Saving stream failed: ") && !text.contains('\n'), "{text}");
        assert!(!pod.image().exists());
    }
    // A form without a file part, a form without a boundary.
    let form = "--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--b--\r\n";
    let request = format!(
        "POST /v1beta1/upload-form HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=b\r\n\
         Content-Length: {}\r\n\r\n{form}",
        form.len()
    );
    assert_eq!(status(&raw_exchange(&pod, &server, request.as_bytes())), "400");
    let request =
        "POST /v1beta1/upload-form HTTP/1.1\r\nContent-Type: multipart/form-data\r\nContent-Length: 1\r\n\r\nx";
    assert_eq!(status(&raw_exchange(&pod, &server, request.as_bytes())), "400");
    // An empty body is no image.
    let answer = raw_exchange(&pod, &server, b"POST /v1beta1/upload HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status(&answer), "500", "{answer}");
    assert!(server.running(), "{}", server.log());
    assert!(!server.log().contains("panicked"), "{}", server.log());
    assert_eq!(curl(&pod, &server, None, &[], "/healthz").0, 200);
}

#[test]
fn tls_versions_and_ciphers_follow_cdis_crypto_configuration() {
    let mut pod = Pod::new("upload-tls13");
    pod.set("TLS_MIN_VERSION", "VersionTLS13");
    let server = pod.start();
    assert_eq!(curl(&pod, &server, None, &["--tlsv1.3"], "/healthz").0, 200);
    let (status, code, _) = curl(&pod, &server, None, &["--tls-max", "1.2"], "/healthz");
    assert_eq!(status, 0, "TLS 1.2 refused");
    assert_ne!(code, 0);
    drop(server);

    let mut pod = Pod::new("upload-ciphers");
    pod.set("TLS_CIPHERS", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384");
    let server = pod.start();
    let tls12 = ["--tls-max", "1.2"];
    let with = |cipher: &str| {
        let mut args = tls12.to_vec();
        args.extend(["--ciphers", cipher]);
        curl(&pod, &server, None, &args, "/healthz").0
    };
    assert_eq!(with("ECDHE-ECDSA-AES256-GCM-SHA384"), 200);
    assert_eq!(with("ECDHE-ECDSA-AES128-GCM-SHA256"), 0, "a suite left out of TLS_CIPHERS");
}

#[test]
fn a_signal_stops_the_server_and_an_interrupted_upload_leaves_nothing() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pod = Pod::new("upload-signal-idle");
    let server = pod.start();
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGTERM).unwrap();
    let ended = server.finish(Duration::from_secs(20));
    assert_eq!(ended.code, 143, "{}", ended.stderr);
    assert!(ended.termination.contains("stopped by a signal"), "{}", ended.termination);

    let bench = Workbench::new("upload-signal");
    let raw = bench.raw_mix("disk.raw", 16 * MIB, 2);
    let pod = Pod::new("upload-signal-busy");
    let server = pod.start();
    let pid = Pid::from_raw(server.child.id() as i32);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            let mut upload = Upload::file("/v1beta1/upload", &raw);
            upload.rate = Some(2 * MIB);
            send(&pod, &server, upload)
        });
        std::thread::sleep(Duration::from_millis(1500));
        kill(pid, Signal::SIGTERM).unwrap();
        let answer = slow.join().unwrap();
        assert!(!matches!(answer, Ok((200, _))), "{answer:?}");
    });
    let ended = server.finish(Duration::from_secs(30));
    assert_eq!(ended.code, 143, "{}", ended.stderr);
    assert!(!pod.image().exists(), "an interrupted upload left a disk.img");
}

#[test]
fn runs_unprivileged_as_the_pod_user() {
    if !require_privileged("runs_unprivileged_as_the_pod_user") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    const POD_UID: u32 = 107;
    let bench = Workbench::new("upload-uid");
    let qcow2 = bench.qcow2_mix("disk.qcow2", 8 * MIB, "", &[]);
    let (digest, len) = qemu_reference(&qcow2, bench.dir.path());
    let mut pod = Pod::new("upload-uid");
    for sub in ["data", "run", "scratch"] {
        std::os::unix::fs::chown(pod.dir.path().join(sub), Some(POD_UID), Some(POD_UID)).unwrap();
    }
    for dir in [pod.dir.path().to_path_buf(), pod.pki.dir.clone()] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    pod.uid = Some(POD_UID);
    let server = pod.start();
    assert_eq!(send(&pod, &server, Upload::file("/v1beta1/upload", &qcow2)), Ok((200, String::new())));
    expect_complete(server, "as uid 107", UPLOAD_COMPLETE);
    let meta = fs::metadata(pod.image()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), POD_UID);
    assert_eq!(sha256_prefix(&pod.image(), len), digest);
}

#[test]
fn a_client_that_stalls_fails_its_upload_after_the_body_timeout() {
    let bench = Workbench::new("upload-stall");
    let raw = bench.raw_mix("disk.raw", 8 * MIB, 4);
    let mut pod = Pod::new("upload-stall");
    pod.args.extend(["--body-timeout".to_string(), "2".to_string()]);
    let mut server = pod.start();
    let mut upload = Upload::file("/v1beta1/upload", &raw);
    upload.stall_after = Some(3 * MIB);
    let started = Instant::now();
    let (status, body) = send(&pod, &server, upload).unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("the client sent nothing for 2 s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!pod.image().exists());
    assert!(server.running());
}
