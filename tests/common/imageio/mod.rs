//! A real ovirt-imageio daemon (PyPI `ovirt-imageio`, installed by .ci/run) on 127.0.0.1 with TLS and
//! `drop_privileges = false`, qemu-nbd exports of qcow2 disks behind its nbd backend, and `engine.py` beside this
//! file: a stand-in for the oVirt engine's REST calls that installs real tickets in the daemon through its control
//! socket. The daemon runs under `$BOUNDIMPORT_IMAGEIO_PYTHON` (.ci/run's virtualenv) or `python3`. Everything started here is stopped, and its directory removed, when the [`Ovirt`] is dropped.

use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The engine user and password the stand-in accepts.
pub const USER: &str = "admin@internal";
pub const PASSWORD: &str = "s3cret pass&word";

/// How a volume is served by the daemon.
pub enum Backend {
    /// A file, byte for byte (the daemon's file backend).
    File(PathBuf),
    /// An image's guest view through `qemu-nbd --format=FORMAT` (the daemon's nbd backend, as vdsm serves
    /// downloads): its block status gives the extents. A qcow2 volume is also served as itself, byte for byte
    /// (`qemu-nbd --format=raw`), for a download in `cow` format (a warm migration's delta), as vdsm does.
    Nbd(PathBuf, &'static str),
}

/// A disk of the stand-in's inventory.
pub struct DiskSpec {
    /// Its id (`IMPORTER_DISK_ID`).
    pub id: String,
    /// The volume a raw download serves.
    pub raw: Backend,
    /// Its snapshots (checkpoints) by id, each with the guest view a raw download of it serves.
    pub snapshots: Vec<(String, Backend)>,
}

/// What a test may change about the stand-in.
#[derive(Default)]
pub struct Options {
    /// Seconds a ticket lives (default 300).
    pub ticket_timeout: Option<u64>,
    /// Seconds the transfer stays initializing after its first poll (a ticket may expire meanwhile).
    pub transferring_delay: Option<u64>,
    /// The transfer's `transfer_url` points at this closed port, its `proxy_url` at the daemon.
    pub broken_transfer_url: bool,
    /// Seconds a transfer's ticket may stay idle at the daemon before the engine pauses the transfer and removes the
    /// ticket, as oVirt's engine does past the transfer's inactivity timeout (default: never).
    pub inactivity_pause: Option<u64>,
}

/// The daemon, the NBD servers and the engine stand-in.
pub struct Ovirt {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    engine: Option<Child>,
    nbd: Vec<Child>,
    engine_port: u16,
    daemon_port: u16,
}

fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Ovirt {
    /// Starts everything for `disks`.
    pub fn start(disks: Vec<DiskSpec>, options: Options) -> Ovirt {
        // A short path: the control and NBD sockets must fit in sun_path.
        let dir = tempfile::Builder::new().prefix("imageio-").tempdir_in("/tmp").unwrap();
        let path = dir.path().to_path_buf();
        let mut ovirt = Ovirt { dir, daemon: None, engine: None, nbd: Vec::new(), engine_port: 0, daemon_port: 0 };
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        fs::write(path.join("cert.pem"), key.cert.pem()).unwrap();
        fs::write(path.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
        fs::create_dir(path.join("ca")).unwrap();
        fs::write(path.join("ca/engine.pem"), key.cert.pem()).unwrap();
        fs::create_dir_all(path.join("conf/conf.d")).unwrap();
        fs::create_dir(path.join("run")).unwrap();
        let p = path.display();
        fs::write(
            path.join("conf/conf.d/99-test.conf"),
            format!(
                "[daemon]\ndrop_privileges = false\nsystemd_enable = false\nrun_dir = {p}/run\npoll_interval = 0.1\n\
                 [tls]\nenable = true\nkey_file = {p}/key.pem\ncert_file = {p}/cert.pem\n\
                 [remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n\
                 [control]\ntransport = unix\nsocket = {p}/run/sock\n\
                 [logger_root]\nlevel = DEBUG\nhandlers = logfile\n\
                 [handler_logfile]\nargs = ('{p}/daemon.log',)\nkwargs = {{}}\nlevel = DEBUG\n"
            ),
        )
        .unwrap();
        let stderr = fs::File::create(path.join("daemon.stderr")).unwrap();
        ovirt.daemon = Some(
            Command::new(std::env::var("BOUNDIMPORT_IMAGEIO_PYTHON").unwrap_or_else(|_| "python3".into()))
                .args(["-c", "from ovirt_imageio._internal import server; server.main()", "--conf-dir"])
                .arg(path.join("conf"))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("starting ovirt-imageio (pip install ovirt-imageio; .ci/run installs it)"),
        );
        ovirt.daemon_port = wait_for("the imageio daemon to listen", Duration::from_secs(30), || {
            let log = fs::read_to_string(path.join("daemon.log")).unwrap_or_default();
            let line = log.lines().find(|l| l.contains("remote.service listening on"))?;
            let port = line.rsplit(',').next()?.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
            path.join("run/sock").exists().then_some(port)
        });

        let mut inventory = serde_json::Map::new();
        for (n, disk) in disks.iter().enumerate() {
            let mut volume = ovirt.volume(&disk.raw, 2 * n);
            let mut snapshots = serde_json::Map::new();
            for (m, (id, backend)) in disk.snapshots.iter().enumerate() {
                snapshots.insert(id.clone(), ovirt.volume(backend, 100 * (n + 1) + 2 * m));
            }
            volume["image_id"] = json!(format!("{}-active", disk.id));
            volume["snapshots"] = json!(snapshots);
            inventory.insert(disk.id.clone(), volume);
        }
        let mut config = json!({
            "user": USER, "password": PASSWORD, "control_socket": path.join("run/sock"),
            "daemon_port": ovirt.daemon_port, "disks": inventory,
        });
        if let Some(t) = options.ticket_timeout {
            config["ticket_timeout"] = json!(t);
        }
        if let Some(t) = options.transferring_delay {
            config["transferring_delay"] = json!(t);
        }
        if let Some(t) = options.inactivity_pause {
            config["inactivity_pause"] = json!(t);
        }
        if options.broken_transfer_url {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            config["broken_transfer_url"] = json!(closed);
        }
        fs::write(path.join("engine.json"), config.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/imageio/engine.py");
        let stderr = fs::File::create(path.join("engine.stderr")).unwrap();
        ovirt.engine = Some(
            Command::new("python3")
                .arg(script)
                .args([path.join("engine.json"), path.join("state.json"), path.join("engine.port")])
                .args([path.join("cert.pem"), path.join("key.pem")])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        );
        ovirt.engine_port = wait_for("the engine stand-in to listen", Duration::from_secs(30), || {
            fs::read_to_string(path.join("engine.port")).ok()?.trim().parse().ok()
        });
        ovirt
    }

    /// The stand-in's record of a volume: its daemon URLs and sizes for `raw` downloads and, for a qcow2, `cow`
    /// ones (a snapshot's `actual_size` is its `cow` size). NBD sockets are numbered from `n`.
    fn volume(&mut self, backend: &Backend, n: usize) -> Value {
        let (raw, raw_size) = self.serve(backend, n);
        let (cow, cow_size) = match backend {
            Backend::Nbd(image, "qcow2") => {
                let (url, size) = self.serve(&Backend::Nbd(image.clone(), "raw"), n + 1);
                (Some(url), size)
            }
            _ => (None, raw_size),
        };
        let mut urls = json!({"raw": raw});
        if let Some(cow) = cow {
            urls["cow"] = json!(cow);
        }
        json!({"urls": urls, "sizes": {"raw": raw_size, "cow": cow_size}})
    }

    /// The daemon URL and size of `backend`, starting qemu-nbd for a qcow2.
    fn serve(&mut self, backend: &Backend, n: usize) -> (String, u64) {
        match backend {
            Backend::File(file) => (format!("file://{}", file.display()), fs::metadata(file).unwrap().len()),
            Backend::Nbd(image, format) => {
                let socket = self.dir.path().join(format!("nbd{n}.sock"));
                let child = Command::new("qemu-nbd")
                    .args(["--read-only", "--persistent", "--shared=8", "--socket"])
                    .arg(&socket)
                    .arg(format!("--format={format}"))
                    .arg(image)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting qemu-nbd");
                self.nbd.push(child);
                wait_for("qemu-nbd's socket", Duration::from_secs(10), || socket.exists().then_some(()));
                let size = match *format {
                    "raw" => fs::metadata(image).unwrap().len(),
                    _ => virtual_size(image),
                };
                (format!("nbd:unix:{}", socket.display()), size)
            }
        }
    }

    /// The engine's API URL (`IMPORTER_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}/ovirt-engine/api", self.engine_port)
    }

    /// A directory holding the CA of the engine and the daemon (`IMPORTER_CERT_DIR`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The transfers the engine made, with their phases.
    pub fn transfers(&self) -> Vec<Value> {
        let text = fs::read_to_string(self.dir.path().join("state.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["transfers"].as_array().cloned().unwrap_or_default()
    }

    /// Bytes of the disk the daemon sent for the only transfer: its ticket's `transferred` (the union of the ranges
    /// its reads covered), as read by the engine before removing the ticket.
    pub fn transferred(&self) -> u64 {
        let transfers = self.transfers();
        assert_eq!(transfers.len(), 1, "one transfer: {transfers:?}");
        transfers[0]["transferred"].as_u64().unwrap_or_else(|| panic!("no transferred count: {transfers:?}"))
    }

    /// Kills the daemon (a host going away mid-transfer).
    pub fn kill_daemon(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }

    /// Waits until the daemon has started serving a read.
    pub fn wait_for_first_read(&self) {
        wait_for("the daemon's first read", Duration::from_secs(60), || {
            fs::read_to_string(self.dir.path().join("daemon.log")).ok()?.contains(" READ size=").then_some(())
        });
    }
}

impl Drop for Ovirt {
    fn drop(&mut self) {
        for child in self.engine.iter_mut().chain(self.daemon.iter_mut()).chain(self.nbd.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A qcow2's virtual size, from qemu-img.
pub fn virtual_size(image: &Path) -> u64 {
    let out = Command::new("qemu-img").args(["info", "--output=json"]).arg(image).output().unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["virtual-size"].as_u64().unwrap()
}
