//! Registry fixtures: Debian's `docker-registry` (the distribution registry) started on 127.0.0.1 with a config the
//! test writes (storage in a temporary directory; TLS with a CA made here and htpasswd auth, or plain HTTP), OCI
//! image layouts written by the tests (layers made with GNU tar and compressed with gzip/zstd), pushed with
//! Debian's `skopeo`. Every server and directory is cleaned up on drop, failure included.

use super::prereq::Prereq;
use super::{describe, run};
use sha2::{Digest, Sha256};
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Tools the registry tests drive.
pub const TOOLS: &[Prereq] = &[
    Prereq::Tool("docker-registry", "docker-registry"),
    Prereq::Tool("skopeo", "skopeo"),
    Prereq::Tool("htpasswd", "apache2-utils"),
    Prereq::Tool("tar", "tar"),
    Prereq::Tool("gzip", "gzip"),
    Prereq::Tool("zstd", "zstd"),
    Prereq::Tool("xz", "xz-utils"),
    Prereq::Tool("curl", "curl"),
];

/// Whether `test` can run: every tool of [`TOOLS`] installed ([`super::prereq::require`]).
pub fn require_tools(test: &str) -> bool {
    super::prereq::require(test, TOOLS)
}

/// A free TCP port on 127.0.0.1 (released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
pub struct Certs {
    /// Directory holding only `ca.crt` (what `--ca-dir`, `IMPORTER_CERT_DIR` and skopeo's `--dest-cert-dir` take).
    pub ca_dir: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
}

impl Certs {
    /// Makes them under `dir`.
    pub fn make(dir: &Path) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "boundimport test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_dir = dir.join("ca");
        fs::create_dir_all(&ca_dir).unwrap();
        fs::write(ca_dir.join("ca.crt"), ca_cert.pem()).unwrap();
        fs::write(dir.join("server.crt"), cert.pem()).unwrap();
        fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Certs { ca_dir, cert: dir.join("server.crt"), key: dir.join("server.key") }
    }
}

/// How to start a registry.
#[derive(Default)]
pub struct RegistryOptions {
    /// Serve HTTPS with a CA of the test's own.
    pub tls: bool,
    /// htpasswd auth with this user and password.
    pub user: Option<(String, String)>,
}

/// A running `docker-registry`.
pub struct Registry {
    child: Child,
    /// Its directory: config, storage, certificates, log.
    pub dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Certificates, with TLS.
    pub certs: Option<Certs>,
    /// Credentials, with auth.
    pub user: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry and waits until it answers.
    pub fn start(options: RegistryOptions) -> Registry {
        let dir = super::scratch_dir("registry");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).unwrap();
        let port = free_port();
        let certs = options.tls.then(|| Certs::make(dir.path()));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: boundimport-test\n",
            storage.display()
        );
        if let Some(certs) = &certs {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certs.cert.display(),
                certs.key.display()
            ));
        }
        if let Some((user, pass)) = &options.user {
            let out = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: boundimport-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry { child, dir, port, certs, user: options.user };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen on {port}: {}", registry.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/REPO:TAG` (or `@DIGEST` when `tag` starts with `sha256:`).
    pub fn image(&self, repo: &str, tag: &str) -> String {
        if tag.starts_with("sha256:") {
            format!("docker://{}/{repo}@{tag}", self.host())
        } else {
            format!("docker://{}/{repo}:{tag}", self.host())
        }
    }

    /// boundimport's options to reach this registry (CA directory, credentials).
    pub fn client_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(certs) = &self.certs {
            args.extend(["--ca-dir".to_string(), certs.ca_dir.display().to_string()]);
        } else {
            args.push("--insecure".to_string());
        }
        if let Some((user, pass)) = &self.user {
            args.extend(["--user".to_string(), format!("{user}:{pass}")]);
        }
        args
    }

    /// Pushes `tag` of `layout` to `repo:tag` with skopeo.
    pub fn push(&self, layout: &Layout, tag: &str, repo: &str) {
        self.push_with(layout, tag, repo, &["--preserve-digests"]);
    }

    /// Pushes `tag` of `layout` converted to Docker schema 2 (manifest, and manifest list for an index).
    pub fn push_docker(&self, layout: &Layout, tag: &str, repo: &str) {
        self.push_with(layout, tag, repo, &["--format", "v2s2"]);
    }

    fn push_with(&self, layout: &Layout, tag: &str, repo: &str, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--quiet", "--all"]).args(extra);
        match &self.certs {
            Some(certs) => {
                cmd.arg("--dest-cert-dir").arg(&certs.ca_dir);
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        if let Some((user, pass)) = &self.user {
            cmd.arg("--dest-creds").arg(format!("{user}:{pass}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.dir.display())).arg(self.image(repo, tag));
        let output = super::run_any(&mut cmd);
        assert!(
            output.status.success(),
            "{} failed: {}\nregistry log:\n{}",
            describe(&cmd),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }

    /// The stored data file of blob `digest` (for corrupting it behind the registry's back).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!("storage/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A content descriptor of the layout.
#[derive(Debug, Clone)]
pub struct Desc {
    /// Media type.
    pub media_type: String,
    /// `sha256:HEX`.
    pub digest: String,
    /// Length.
    pub size: u64,
}

impl Desc {
    /// As JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// `sha256:HEX` and length of a file.
pub fn file_digest(path: &Path) -> (String, u64) {
    use std::io::Read;
    let mut file = fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    (format!("sha256:{}", hex(&hasher.finalize())), len)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
    /// Plain `tar`.
    None,
}

/// An OCI image layout being written.
pub struct Layout {
    /// Its directory.
    pub dir: PathBuf,
    tagged: Vec<serde_json::Value>,
}

/// One image's manifest in a layout, with what the test needs to know about it.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its descriptor.
    pub desc: Desc,
    /// Its layers.
    pub layers: Vec<Desc>,
}

impl Layout {
    /// An empty layout in `dir`.
    pub fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf(), tagged: Vec::new() }
    }

    /// An existing layout (its index as written).
    pub fn open(dir: &Path) -> Layout {
        let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        Layout { dir: dir.to_path_buf(), tagged: index["manifests"].as_array().cloned().unwrap_or_default() }
    }

    /// The digest of the last layer of the image tagged `tag`.
    pub fn layer_of(&self, tag: &str) -> String {
        let entry = self.tagged.iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(self.blob_path(entry["digest"].as_str().unwrap())).unwrap()).unwrap();
        manifest["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap().to_string()
    }

    /// Stores `bytes` as a blob.
    pub fn blob(&self, bytes: &[u8], media_type: &str) -> Desc {
        let digest = format!("sha256:{}", hex(&Sha256::digest(bytes)));
        fs::write(self.blob_path(&digest), bytes).unwrap();
        Desc { media_type: media_type.to_string(), digest, size: bytes.len() as u64 }
    }

    /// Moves the file at `path` in as a blob.
    pub fn blob_file(&self, path: &Path, media_type: &str) -> Desc {
        let (digest, size) = file_digest(path);
        fs::rename(path, self.blob_path(&digest)).unwrap();
        Desc { media_type: media_type.to_string(), digest, size }
    }

    /// Where blob `digest` lives.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
    }

    /// A layer holding `files` (path in the tar, e.g. `disk/disk.qcow2` or `./disk/x`, and the file to put
    /// there), made with GNU tar and compressed as asked. Returns its descriptor and its diff ID.
    pub fn layer(&self, files: &[(&str, &Path)], compress: Compress) -> (Desc, String) {
        let stage = tempfile::tempdir_in(&self.dir).unwrap();
        let mut members = Vec::new();
        for (inside, source) in files {
            let clean = inside.trim_start_matches("./");
            let at = stage.path().join(clean);
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(fs::canonicalize(source).unwrap(), &at).unwrap();
            members.push(inside.to_string());
        }
        let tar = self.dir.join("layer.tar");
        run(Command::new("tar")
            .args(["--format=pax", "--dereference", "--owner=0", "--group=0", "--numeric-owner", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(stage.path())
            .args(&members));
        let (diff_id, _) = file_digest(&tar);
        let (path, media_type) = match compress {
            Compress::Gzip => {
                run(Command::new("gzip").args(["-n", "-1", "-f"]).arg(&tar));
                (self.dir.join("layer.tar.gz"), "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Compress::Zstd => {
                run(Command::new("zstd").args(["-q", "-1", "-T0", "--rm", "-f"]).arg(&tar));
                (self.dir.join("layer.tar.zst"), "application/vnd.oci.image.layer.v1.tar+zstd")
            }
            Compress::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
        };
        (self.blob_file(&path, media_type), diff_id)
    }

    /// An image of `layers` for `arch` with `env` and `labels` in its configuration; tagged `tag` in the
    /// layout's index when given.
    pub fn image(
        &mut self,
        tag: Option<&str>,
        arch: &str,
        env: &[&str],
        labels: &[(&str, &str)],
        layers: &[(Desc, String)],
    ) -> Manifest {
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": env, "Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()},
        });
        let config = self.blob(config.to_string().as_bytes(), "application/vnd.oci.image.config.v1+json");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": layers.iter().map(|(d, _)| d.json()).collect::<Vec<_>>(),
        });
        let desc = self.blob(manifest.to_string().as_bytes(), "application/vnd.oci.image.manifest.v1+json");
        if let Some(tag) = tag {
            self.tag(&desc, tag, None);
        }
        Manifest { desc, layers: layers.iter().map(|(d, _)| d.clone()).collect() }
    }

    /// A multi-platform index of `images` (manifest and architecture), tagged `tag`.
    pub fn index(&mut self, tag: &str, images: &[(&Manifest, &str)]) -> Desc {
        let manifests: Vec<serde_json::Value> = images
            .iter()
            .map(|(m, arch)| {
                let mut d = m.desc.json();
                d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
                d
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let desc = self.blob(index.to_string().as_bytes(), "application/vnd.oci.image.index.v1+json");
        self.tag(&desc, tag, None);
        desc
    }

    fn tag(&mut self, desc: &Desc, tag: &str, platform: Option<serde_json::Value>) {
        let mut entry = desc.json();
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        if let Some(platform) = platform {
            entry["platform"] = platform;
        }
        self.tagged.push(entry);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.tagged});
        fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}
