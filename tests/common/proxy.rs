//! An in-process forward proxy on 127.0.0.1 reached over TLS (an `https://` proxy), with a certificate signed by a
//! CA the test makes: it answers `CONNECT host:port` with 200 and then relays bytes both ways to one upstream port
//! on 127.0.0.1 whatever host was asked for (its own DNS, so a name that resolves nowhere can be proxied), and logs
//! each CONNECT's head. Stops when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running proxy.
pub struct TlsProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Vec<String>>>>,
    /// Directory holding only the CA's certificate (`ca.crt`), to trust the proxy with.
    pub ca_dir: PathBuf,
}

impl TlsProxy {
    /// Starts a proxy relaying to 127.0.0.1:`upstream`, its CA written under `dir`.
    pub fn start(dir: &Path, upstream: u16) -> TlsProxy {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "boundimport test proxy CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_dir = dir.join("proxy-ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        std::fs::write(ca_dir.join("ca.crt"), ca_cert.pem()).unwrap();

        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stopping, logging) = (stop.clone(), log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(tcp) = conn else { continue };
                let (config, log, stop) = (config.clone(), logging.clone(), stopping.clone());
                std::thread::spawn(move || relay(tcp, config, upstream, &log, &stop));
            }
        });
        TlsProxy { port, stop, log, ca_dir }
    }

    /// The proxy's URL, with `userinfo@` if given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        format!("https://{}127.0.0.1:{}", userinfo.map_or(String::new(), |u| format!("{u}@")), self.port)
    }

    /// The heads of the CONNECT requests received, each as its lines.
    pub fn connects(&self) -> Vec<Vec<String>> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one client connection: TLS, the CONNECT head, then bytes both ways until either side closes.
fn relay(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    upstream: u16,
    log: &Mutex<Vec<Vec<String>>>,
    stop: &AtomicBool,
) {
    let socket = tcp.try_clone().unwrap();
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut client = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match client.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let is_connect = head.first().is_some_and(|l| l.starts_with("CONNECT "));
    log.lock().unwrap().push(head);
    if !is_connect {
        let _ = client.get_mut().write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = client.get_mut().write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let mut client = client.into_inner();
    if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").and_then(|()| client.flush()).is_err() {
        return;
    }
    // One thread, both directions: short read timeouts let it turn from one side to the other.
    let _ = socket.set_read_timeout(Some(Duration::from_millis(2)));
    let _ = server.set_read_timeout(Some(Duration::from_millis(2)));
    let mut buf = vec![0u8; 64 << 10];
    let waiting = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    while !stop.load(Ordering::SeqCst) {
        match client.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if server.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if waiting(&e) => {}
            Err(_) => return,
        }
        match server.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if client.write_all(&buf[..n]).and_then(|()| client.flush()).is_err() {
                    return;
                }
            }
            Err(e) if waiting(&e) => {}
            Err(_) => return,
        }
    }
}
