//! `boundimport cdi` run the way CDI's controller runs its importer: a CDI-shaped environment, `-alsologtostderr
//! -v=N`, a data directory or a block device, the termination log read back byte for byte, and the progress
//! metric scraped over HTTPS (self-signed certificate accepted) with the controller's own regex.
//!
//! Sources are local files (the endpoint may name a path) and the in-process HTTP(S) server of
//! tests/common/http.rs (TLS with a CA directory, basic auth, extra headers, no-Range streaming, a rate limit so
//! progress is scraped mid-import). Tests needing root (loop devices, a write throttle, switching to uid 107)
//! follow tests/common/privileged.rs.

mod common;

use common::privileged::require_privileged;
use common::{boundimport, qemu_reference, run, scratch_dir, sha256_prefix, write_raw, Fill, Workbench, MIB};
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The uid CDI's importer pods run as.
const POD_UID: u32 = 107;

/// OWNER_UID of every test pod.
const OWNER: &str = "3f1e2d4c-5b6a-4789-8abc-def012345678";

/// What CDI writes after a successful import without preallocation.
const COMPLETE: &str = r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#;

/// A CDI importer pod's world inside a scratch directory: the data directory, where the termination log goes,
/// the environment, and optionally a block device.
struct Pod {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    block: Option<PathBuf>,
    uid: Option<u32>,
    extra_args: Vec<String>,
}

/// How a pod run ended.
struct Ended {
    code: i32,
    termination: String,
    stderr: String,
}

impl Pod {
    /// A pod with an empty data directory and the environment every controller-made pod has.
    fn new(label: &str) -> Pod {
        let dir = scratch_dir(label);
        fs::create_dir(dir.path().join("data")).unwrap();
        fs::create_dir(dir.path().join("run")).unwrap();
        let mut pod = Pod { dir, env: Vec::new(), block: None, uid: None, extra_args: Vec::new() };
        for (k, v) in [
            ("IMPORTER_SOURCE", "http"),
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("OWNER_UID", OWNER),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
            ("INSECURE_TLS", "false"),
            ("CACHE_MODE", ""),
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

    /// Where the pod's scratch volume is mounted, when it has one ([`with_scratch`](Self::with_scratch)).
    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }

    /// Mounts a scratch volume, as the controller does after an importer asked for one.
    fn with_scratch(&mut self) -> &mut Self {
        fs::create_dir(self.scratch()).unwrap();
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(self.scratch(), Some(uid), Some(uid)).unwrap();
        }
        self
    }

    fn termination_log(&self) -> PathBuf {
        self.dir.path().join("run/termination-log")
    }

    /// Runs the pod as uid 107 (the data and run directories are handed to it).
    fn as_pod_user(&mut self) -> &mut Self {
        for path in [self.dir.path().to_path_buf(), self.data(), self.dir.path().join("run")] {
            std::os::unix::fs::chown(&path, Some(POD_UID), Some(POD_UID)).unwrap();
        }
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        self.uid = Some(POD_UID);
        self
    }

    fn command(&self) -> Command {
        let mut cmd = boundimport();
        cmd.args(["cdi", "-alsologtostderr", "-v=3"])
            .arg("--data-dir")
            .arg(self.data())
            .arg("--block-path")
            .arg(self.block.clone().unwrap_or_else(|| self.dir.path().join("no-block-volume")))
            .arg("--termination-log")
            .arg(self.termination_log())
            .arg("--scratch-dir")
            .arg(self.scratch())
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--proxy-cert-dir", "/nonexistent-proxycerts", "--extra-headers-dir", "/nonexistent-headers"])
            .args(&self.extra_args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(uid) = self.uid {
            cmd.uid(uid).gid(uid);
        }
        cmd
    }

    /// Runs to the end.
    fn run(&self) -> Ended {
        let output = self.command().output().expect("running boundimport cdi");
        let ended = Ended {
            code: output.status.code().unwrap_or(-1),
            termination: fs::read_to_string(self.termination_log()).unwrap_or_default(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        assert!(!ended.termination.contains('\n'), "termination log is one line: {:?}", ended.termination);
        assert!(ended.termination.len() <= 4096);
        ended
    }

    /// Starts the pod and samples its progress metric every 100 ms until it exits. The pod lingers 3 s after
    /// success (`--metrics-linger`) so the final value is seen before it exits.
    fn run_scraping(&mut self) -> (Ended, Vec<f64>, String) {
        let (ended, values, texts) = self.run_scraping_in(None);
        (ended, values, texts.last().cloned().unwrap_or_default())
    }

    /// [`run_scraping`](Self::run_scraping) in a memory cgroup of its own (a pod's), returning every scrape.
    fn run_scraping_in(
        &mut self,
        cgroup: Option<&boundimport::lab::fixtures::ChildCgroup>,
    ) -> (Ended, Vec<f64>, Vec<String>) {
        self.extra_args.extend(["--metrics-linger".to_string(), "3".to_string()]);
        let mut command = self.command();
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = match cgroup {
            Some(cgroup) => cgroup.spawn(&mut command).expect("starting the pod in its cgroup"),
            None => command.spawn().unwrap(),
        };
        let (addr, stderr, reader) = metrics_address(&mut child);
        let mut values = Vec::new();
        let mut texts = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut scrapes_after_result = 0;
        while child.try_wait().unwrap().is_none() && scrapes_after_result < 2 && Instant::now() < deadline {
            // Once the termination log exists, the import is over: two more scrapes see its final state.
            if self.termination_log().exists() {
                scrapes_after_result += 1;
            }
            if let Ok(text) = scrape(&addr) {
                values.extend(controller_progress(&text, OWNER));
                texts.push(text);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = child.wait().unwrap();
        reader.join().unwrap();
        let stderr = stderr.lock().unwrap().clone();
        let termination = fs::read_to_string(self.termination_log()).unwrap_or_default();
        (Ended { code: status.code().unwrap_or(-1), termination, stderr }, values, texts)
    }
}

/// Reads the child's stderr until it says where the metrics are served; keeps collecting the rest.
fn metrics_address(child: &mut Child) -> (String, Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let stderr = child.stderr.take().unwrap();
    let collected = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let sink = collected.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("serving progress metrics on https://").nth(1) {
                let _ = tx.send(rest.trim_end_matches("/metrics").to_string());
            }
            let mut all = sink.lock().unwrap();
            all.push_str(&line);
            all.push('\n');
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no metrics address in stderr: {}", collected.lock().unwrap()));
    (addr, collected, reader)
}

/// Accepts any server certificate: the importer's is self-signed, and CDI's controller skips verification too.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// GET https://ADDR/metrics with a 2 s timeout (the controller's), returning the body.
fn scrape(addr: &str) -> std::io::Result<String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("importer.pod").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: importer.pod\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// The controller's parse: `regexp.MustCompile(fmt.Sprintf("(%s)\\{ownerUID\\=%q\\} (\\d{1,3}\\.?\\d*)", ...))`.
fn controller_progress(body: &str, owner: &str) -> Option<f64> {
    let pattern = format!("(kubevirt_cdi_import_progress_total)\\{{ownerUID\\=\"{owner}\"\\}} (\\d{{1,3}}\\.?\\d*)");
    let re = regex::Regex::new(&pattern).unwrap();
    let captures = re.captures(body)?;
    captures.get(captures.len() - 1)?.as_str().parse().ok()
}

/// Asserts a metric series the controller would accept: values in 0..=100, never decreasing, 100 at the end.
fn assert_progress_series(values: &[f64], want_mid_import: bool) {
    assert!(!values.is_empty(), "no progress scraped");
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "progress went back: {values:?}");
    assert!(values.iter().all(|v| (0.0..=100.0).contains(v)), "{values:?}");
    assert_eq!(*values.last().unwrap(), 100.0, "{values:?}");
    if want_mid_import {
        assert!(values.iter().any(|&v| v > 0.0 && v < 100.0), "never scraped mid-import: {values:?}");
    }
}

fn ended_ok(ended: &Ended) {
    assert_eq!(ended.code, 0, "termination {:?}\nstderr:\n{}", ended.termination, ended.stderr);
}

/// The import succeeded and told the controller so, as CDI's importer does.
fn ended_complete(ended: &Ended) {
    ended_ok(ended);
    assert_eq!(ended.termination, COMPLETE);
}

/// A qcow2 of the standard mix, its reference digest and virtual size.
fn qcow2_image(bench: &Workbench, size: u64) -> (PathBuf, String, u64) {
    let image = bench.qcow2_mix("disk.qcow2", size, "", &[]);
    let (digest, len) = qemu_reference(&image, bench.dir.path());
    fs::set_permissions(bench.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    (image, digest, len)
}

#[test]
fn qcow2_into_a_file_volume_is_sized_like_cdi() {
    let bench = Workbench::new("cdi-file");
    let (image, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    let mut pod = Pod::new("cdi-file-pod");
    // A stale partial image of an earlier attempt: removed before anything is measured or written.
    write_raw(&pod.data().join("disk.img"), 200 * MIB, &[(0, MIB, Fill::Random(9))]);
    pod.set("IMPORTER_ENDPOINT", image.to_str().unwrap())
        .set("IMPORTER_IMAGE_SIZE", "64Mi")
        .set("FILESYSTEM_OVERHEAD", "0.055");
    let (ended, values, text) = pod.run_scraping();
    ended_complete(&ended);
    assert_progress_series(&values, false);
    for gauge in ["boundimport_written_bytes ", "boundimport_budget_bytes ", "boundimport_processed_bytes "] {
        assert!(text.contains(&format!("\n{gauge}")), "{gauge} missing from:\n{text}");
    }

    let disk = pod.data().join("disk.img");
    let meta = fs::metadata(&disk).unwrap();
    // CDI: RoundDown(ceil(min(64Mi, free) / 1.055), 1Mi) = 60 MiB, never below the virtual size.
    assert_eq!(meta.len(), 60 * MIB);
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(sha256_prefix(&disk, virtual_size), digest);
    let tail = fs::read(&disk).unwrap()[virtual_size as usize..].to_vec();
    assert!(tail.iter().all(|&b| b == 0), "grown part reads as zeros");
    assert!(ended.stderr.contains("removed a stale image"), "{}", ended.stderr);
}

#[test]
fn preallocated_import_reports_it_and_allocates_the_file() {
    let bench = Workbench::new("cdi-prealloc");
    let (image, digest, virtual_size) = qcow2_image(&bench, 16 * MIB);
    let mut pod = Pod::new("cdi-prealloc-pod");
    pod.set("IMPORTER_ENDPOINT", &format!("file://{}", image.display()))
        .set("IMPORTER_IMAGE_SIZE", "32Mi")
        .set("PREALLOCATION", "true");
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(
        ended.termination,
        r#"{"scratchSpaceRequired":false,"preallocationApplied":true,"message":"Import Complete"}"#
    );
    let disk = pod.data().join("disk.img");
    let meta = fs::metadata(&disk).unwrap();
    assert_eq!(meta.len(), 32 * MIB);
    assert!(meta.blocks() * 512 >= 32 * MIB, "preallocated: {} blocks", meta.blocks());
    assert_eq!(sha256_prefix(&disk, virtual_size), digest);
}

#[test]
fn image_larger_than_the_volume_is_refused_before_writing() {
    let bench = Workbench::new("cdi-small");
    let (image, _, virtual_size) = qcow2_image(&bench, 24 * MIB);
    let mut pod = Pod::new("cdi-small-pod");
    pod.set("IMPORTER_ENDPOINT", image.to_str().unwrap()).set("IMPORTER_IMAGE_SIZE", "16Mi");
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert_eq!(
        ended.termination,
        format!(
            "Unable to process data: Unable to convert source data to target format: virtual image size \
             {virtual_size} is larger than the reported available \
             storage {}. A larger PVC is required",
            16 * MIB
        )
    );
    assert!(ended.termination.contains("is larger than the reported available"));
    assert!(!pod.data().join("disk.img").exists(), "nothing written");
}

#[test]
fn bad_preallocation_fails_with_one_line() {
    for value in ["maybe", ""] {
        let mut pod = Pod::new("cdi-prealloc-bad");
        pod.set("IMPORTER_ENDPOINT", "/nonexistent.img").set("PREALLOCATION", value);
        let ended = pod.run();
        assert_eq!(ended.code, 1);
        assert_eq!(
            ended.termination,
            format!(
                "the PREALLOCATION environment variable is with a wrong value {value:?}; should be \"true\" or \
                 \"false\""
            )
        );
        assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0);
    }
}

#[test]
fn unsupported_sources_fail_with_one_line() {
    for source in ["vddk", "nbd"] {
        let mut pod = Pod::new("cdi-source");
        pod.set("IMPORTER_SOURCE", source).set("IMPORTER_ENDPOINT", "s3://bucket/disk.img");
        let ended = pod.run();
        assert_eq!(ended.code, 1);
        assert_eq!(
            ended.termination,
            format!(
                "Unknown data source: {source} (unsupported source: boundimport cdi imports from http, s3, gcs, registry, imageio and none)"
            )
        );
    }
}

#[test]
fn checksum_mismatch_removes_the_image_and_exits_0() {
    let bench = Workbench::new("cdi-checksum");
    let (image, digest, virtual_size) = qcow2_image(&bench, 8 * MIB);
    let file_digest = sha256_prefix(&image, fs::metadata(&image).unwrap().len());

    let mut pod = Pod::new("cdi-checksum-bad");
    pod.set("IMPORTER_ENDPOINT", image.to_str().unwrap())
        .set("IMPORTER_CHECKSUM", &format!("sha256:{}", "0".repeat(64)));
    let ended = pod.run();
    assert_eq!(ended.code, 0, "CDI exits 0 so that kubelet does not retry: {}", ended.stderr);
    let prefix = r#"{"message":"Unable to process data: "#;
    assert!(ended.termination.starts_with(prefix), "{}", ended.termination);
    assert!(ended.termination.ends_with("\"}"), "{}", ended.termination);
    assert!(ended.termination.contains("checksum mismatch"), "{}", ended.termination);
    assert!(ended.termination.contains(&file_digest), "{}", ended.termination);
    let parsed: serde_json::Value = serde_json::from_str(&ended.termination).unwrap();
    assert_eq!(parsed.as_object().unwrap().len(), 1);
    assert!(!pod.data().join("disk.img").exists(), "unverified data removed");

    let mut good = Pod::new("cdi-checksum-good");
    good.set("IMPORTER_ENDPOINT", image.to_str().unwrap()).set("IMPORTER_CHECKSUM", &format!("sha256:{file_digest}"));
    let ended = good.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&good.data().join("disk.img"), virtual_size), digest);
}

#[test]
fn blank_disks_on_a_filesystem_volume() {
    let mut pod = Pod::new("cdi-blank");
    pod.set("IMPORTER_SOURCE", "none").set("IMPORTER_ENDPOINT", "").set("IMPORTER_IMAGE_SIZE", "64Mi");
    write_raw(&pod.data().join("disk.img"), 8 * MIB, &[(0, MIB, Fill::Random(1))]);
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, r#"{"preallocationApplied":false,"message":"Import Complete"}"#);
    let meta = fs::metadata(pod.data().join("disk.img")).unwrap();
    assert_eq!((meta.len(), meta.blocks(), meta.mode() & 0o777), (64 * MIB, 0, 0o660));

    let mut pod = Pod::new("cdi-blank-prealloc");
    pod.set("IMPORTER_SOURCE", "none")
        .set("IMPORTER_IMAGE_SIZE", "64Mi")
        .set("FILESYSTEM_OVERHEAD", "0.055")
        .set("PREALLOCATION", "true");
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, r#"{"preallocationApplied":true,"message":"Import Complete"}"#);
    let meta = fs::metadata(pod.data().join("disk.img")).unwrap();
    // RoundDown(ceil(64Mi / 1.055), 1Mi) = 60 MiB, all of it allocated.
    assert_eq!(meta.len(), 60 * MIB);
    assert!(meta.blocks() * 512 >= 60 * MIB);

    let mut pod = Pod::new("cdi-blank-archive");
    pod.set("IMPORTER_SOURCE", "none").set("IMPORTER_CONTENTTYPE", "archive").set("IMPORTER_IMAGE_SIZE", "1Mi");
    let ended = pod.run();
    assert_eq!((ended.code, ended.termination.as_str()), (1, "Cannot create empty disk with content type archive"));
}

/// A GNU tar of `stage` (and then of `append` appended), made by the system's tar.
fn make_tar(out: &Path, stage: &Path, append: Option<&Path>, format: &str) {
    run(Command::new("tar")
        .arg(format!("--format={format}"))
        .args(["--sparse", "-cf"])
        .arg(out)
        .arg("-C")
        .arg(stage)
        .arg("."));
    if let Some(more) = append {
        run(Command::new("tar").arg(format!("--format={format}")).arg("-rf").arg(out).arg("-C").arg(more).arg("."));
    }
}

#[test]
fn archives_are_extracted_without_following_links() {
    let bench = Workbench::new("cdi-archive");
    let outside = bench.path("outside");
    fs::create_dir(&outside).unwrap();
    let stage = bench.path("stage");
    fs::create_dir_all(stage.join("dir/sub")).unwrap();
    write_raw(&stage.join("disk.img"), 16 * MIB, &[(MIB, 3 * MIB, Fill::Random(5)), (9 * MIB, 100_000, Fill::Pattern)]);
    fs::write(stage.join("dir/sub/readme.txt"), "hello\n").unwrap();
    fs::set_permissions(stage.join("dir/sub/readme.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("sub/readme.txt", stage.join("dir/inside")).unwrap();
    std::os::unix::fs::symlink(&outside, stage.join("escape-abs")).unwrap();
    std::os::unix::fs::symlink("../../outside", stage.join("dir/escape-rel")).unwrap();
    // Appended members that try to write through the escaping links' names.
    let append = bench.path("append");
    fs::create_dir_all(append.join("escape-abs")).unwrap();
    fs::create_dir_all(append.join("dir/escape-rel")).unwrap();
    fs::write(append.join("escape-abs/pwned"), "x").unwrap();
    fs::write(append.join("dir/escape-rel/pwned"), "x").unwrap();
    let disk_digest = sha256_prefix(&stage.join("disk.img"), 16 * MIB);

    for format in ["gnu", "posix"] {
        let archive = bench.path(&format!("archive-{format}.tar"));
        make_tar(&archive, &stage, Some(&append), format);
        let mut pod = Pod::new("cdi-archive-pod");
        pod.set("IMPORTER_CONTENTTYPE", "archive").set("IMPORTER_ENDPOINT", archive.to_str().unwrap());
        let (ended, values, _) = pod.run_scraping();
        ended_ok(&ended);
        assert_eq!(ended.termination, COMPLETE, "{format}");
        assert_progress_series(&values, false);

        let data = pod.data();
        assert_eq!(sha256_prefix(&data.join("disk.img"), 16 * MIB), disk_digest, "{format}");
        let meta = fs::metadata(data.join("disk.img")).unwrap();
        assert_eq!(meta.len(), 16 * MIB);
        assert!(meta.blocks() * 512 < 8 * MIB, "{format}: holes kept ({} blocks)", meta.blocks());
        assert_eq!(fs::read_to_string(data.join("dir/sub/readme.txt")).unwrap(), "hello\n");
        assert_eq!(fs::metadata(data.join("dir/sub/readme.txt")).unwrap().mode() & 0o777, 0o640);
        assert_eq!(fs::read_link(data.join("dir/inside")).unwrap(), Path::new("sub/readme.txt"));
        // The escaping links were not created; the members behind their names landed inside, as directories.
        for name in ["escape-abs", "dir/escape-rel"] {
            let meta = fs::symlink_metadata(data.join(name)).unwrap();
            assert!(meta.is_dir(), "{format}: {name} is a real directory");
            assert_eq!(fs::read_to_string(data.join(name).join("pwned")).unwrap(), "x");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{format}: nothing written outside");
        assert!(ended.stderr.contains("points outside the data directory"), "{}", ended.stderr);
    }
}

#[test]
fn archive_members_climbing_out_are_refused() {
    let bench = Workbench::new("cdi-archive-dotdot");
    let stage = bench.path("stage");
    fs::create_dir_all(stage.join("a")).unwrap();
    fs::write(stage.join("a/x"), "x").unwrap();
    let archive = bench.path("dotdot.tar");
    // GNU tar stores "a/../../escaped" as given with -P (absolute names and ".." kept).
    run(Command::new("tar")
        .args(["-P", "--transform=s,^a/x$,a/../../escaped,", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&stage)
        .arg("a/x"));
    let mut pod = Pod::new("cdi-archive-dotdot-pod");
    pod.set("IMPORTER_CONTENTTYPE", "archive").set("IMPORTER_ENDPOINT", archive.to_str().unwrap());
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(ended.termination.starts_with("Unable to process data: unable to untar files from endpoint: "));
    assert!(ended.termination.contains("\"..\""), "{}", ended.termination);
    assert!(!pod.dir.path().join("escaped").exists());
    assert!(!pod.data().join("../escaped").exists());
}

#[test]
fn archive_checksum_mismatch_empties_the_data_directory() {
    let bench = Workbench::new("cdi-archive-sum");
    let stage = bench.path("stage");
    fs::create_dir_all(stage.join("d")).unwrap();
    fs::write(stage.join("d/f"), "content").unwrap();
    let archive = bench.path("a.tar");
    make_tar(&archive, &stage, None, "gnu");
    let mut pod = Pod::new("cdi-archive-sum-pod");
    pod.set("IMPORTER_CONTENTTYPE", "archive")
        .set("IMPORTER_ENDPOINT", archive.to_str().unwrap())
        .set("IMPORTER_CHECKSUM", &format!("md5:{}", "f".repeat(32)));
    let ended = pod.run();
    assert_eq!(ended.code, 0, "{}", ended.stderr);
    assert!(
        ended.termination.starts_with(r#"{"message":"Unable to process data: checksum mismatch"#),
        "{}",
        ended.termination
    );
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0, "data directory emptied, kept itself");
    assert!(pod.data().is_dir());
}

/// Lays out what a volume holds before an import: `lost+found/` with a file in it, a file at the top, and a
/// directory the archive also writes into. Returns the paths that must survive a failed import.
fn volume_with_prior_contents(data: &Path) -> Vec<PathBuf> {
    fs::create_dir(data.join("lost+found")).unwrap();
    fs::write(data.join("lost+found/#12"), "recovered").unwrap();
    fs::write(data.join("keep.txt"), "kept").unwrap();
    fs::create_dir(data.join("shared")).unwrap();
    fs::write(data.join("shared/old"), "old").unwrap();
    ["lost+found", "lost+found/#12", "keep.txt", "shared", "shared/old"].iter().map(|p| data.join(p)).collect()
}

/// An archive that writes a new tree, a new top-level file, and a file into the pre-existing `shared/`.
fn archive_over_prior_contents(bench: &Workbench) -> PathBuf {
    let stage = bench.path("stage-prior");
    fs::create_dir_all(stage.join("d/e")).unwrap();
    fs::write(stage.join("d/e/f"), "content").unwrap();
    fs::write(stage.join("top.txt"), "top").unwrap();
    fs::create_dir(stage.join("shared")).unwrap();
    fs::write(stage.join("shared/new"), "new").unwrap();
    let archive = bench.path("prior.tar");
    make_tar(&archive, &stage, None, "gnu");
    archive
}

#[test]
fn a_failed_archive_import_removes_only_what_it_extracted() {
    let bench = Workbench::new("cdi-archive-prior");
    let archive = archive_over_prior_contents(&bench);
    // A checksum mismatch (reported, exit 0) and a stream cut short (exit 1) both fail after extracting.
    let truncated = bench.path("truncated.tar");
    let bytes = fs::read(&archive).unwrap();
    // Cut inside the last member's data: everything before it extracts, then the stream ends.
    let last_data = bytes.iter().rposition(|&b| b != 0).unwrap();
    fs::write(&truncated, &bytes[..last_data]).unwrap();
    for (label, source, checksum, code) in
        [("checksum", &archive, Some(format!("md5:{}", "f".repeat(32))), 0), ("truncated", &truncated, None, 1)]
    {
        let mut pod = Pod::new(&format!("cdi-archive-prior-{label}"));
        let kept = volume_with_prior_contents(&pod.data());
        pod.set("IMPORTER_CONTENTTYPE", "archive").set("IMPORTER_ENDPOINT", source.to_str().unwrap());
        if let Some(checksum) = &checksum {
            pod.set("IMPORTER_CHECKSUM", checksum);
        }
        let ended = pod.run();
        assert_eq!(ended.code, code, "{label}: {}", ended.stderr);
        for path in &kept {
            assert!(
                path.exists(),
                "{label}: {} was there before the import and is gone: {}",
                path.display(),
                ended.stderr
            );
        }
        assert_eq!(fs::read(pod.data().join("lost+found/#12")).unwrap(), b"recovered");
        for gone in ["d", "top.txt", "shared/new"] {
            assert!(!pod.data().join(gone).exists(), "{label}: extracted {gone} left behind: {}", ended.stderr);
        }
        let mut left: Vec<String> =
            fs::read_dir(pod.data()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["keep.txt", "lost+found", "shared"], "{label}");
    }
    // The same archive whole and unchecked extracts beside what was there.
    let mut pod = Pod::new("cdi-archive-prior-ok");
    let kept = volume_with_prior_contents(&pod.data());
    pod.set("IMPORTER_CONTENTTYPE", "archive").set("IMPORTER_ENDPOINT", archive.to_str().unwrap());
    let ended = pod.run();
    ended_complete(&ended);
    assert!(kept.iter().all(|p| p.exists()));
    assert_eq!(fs::read(pod.data().join("d/e/f")).unwrap(), b"content");
    assert_eq!(fs::read(pod.data().join("shared/new")).unwrap(), b"new");
}

#[test]
fn invoked_as_cdi_importer_it_is_the_cdi_entrypoint() {
    let dir = scratch_dir("cdi-argv0");
    let link = dir.path().join("cdi-importer");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_boundimport"), &link).unwrap();
    let term = dir.path().join("term");
    let output = Command::new(&link)
        .args(["-alsologtostderr", "-v=1", "--termination-log"])
        .arg(&term)
        .args(["--metrics-addr", "127.0.0.1:0", "--block-path", "/nonexistent", "--data-dir"])
        .arg(dir.path())
        .env_clear()
        .env("IMPORTER_SOURCE", "vddk")
        .env("PREALLOCATION", "false")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(fs::read_to_string(&term).unwrap().starts_with("Unknown data source: vddk"));
}

/// A loop device over a sparse backing file filled with garbage, so zero ranges must really be zeroed.
fn garbage_loop_device(dir: &Path, size: u64) -> (boundimport::lab::fixtures::LoopDevice, PathBuf) {
    let backing = dir.join("block.img");
    write_raw(&backing, size, &[(0, size, Fill::Random(0xbad))]);
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).expect("attaching a loop device");
    (device, backing)
}

#[test]
fn qcow2_onto_a_block_volume_reports_progress_mid_import() {
    if !require_privileged("qcow2_onto_a_block_volume_reports_progress_mid_import") {
        return;
    }
    let bench = Workbench::new("cdi-block");
    let (image, digest, virtual_size) = qcow2_image(&bench, 48 * MIB);
    let (device, _backing) = garbage_loop_device(bench.dir.path(), 64 * MIB);
    // Slow storage: 12 MiB/s, so the import takes a few seconds and is scraped in the middle.
    let _throttle = boundimport::lab::fixtures::WriteThrottle::set(device.path(), 12 * MIB, None).expect("throttle");
    let mut pod = Pod::new("cdi-block-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.set("IMPORTER_ENDPOINT", image.to_str().unwrap())
        .set("IMPORTER_IMAGE_SIZE", "64Mi")
        .set("FILESYSTEM_OVERHEAD", "0.055");
    let (ended, values, _) = pod.run_scraping();
    ended_complete(&ended);
    assert_progress_series(&values, true);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0, "nothing written to the data directory");
}

#[test]
fn block_volume_too_small_is_refused_before_writing() {
    if !require_privileged("block_volume_too_small_is_refused_before_writing") {
        return;
    }
    let bench = Workbench::new("cdi-block-small");
    let (image, _, virtual_size) = qcow2_image(&bench, 24 * MIB);
    let (device, backing) = garbage_loop_device(bench.dir.path(), 16 * MIB);
    let before = sha256_prefix(&backing, 16 * MIB);
    let mut pod = Pod::new("cdi-block-small-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.set("IMPORTER_ENDPOINT", image.to_str().unwrap()).set("IMPORTER_IMAGE_SIZE", "64Mi");
    let ended = pod.run();
    assert_eq!(ended.code, 1);
    assert_eq!(
        ended.termination,
        format!(
            "Unable to process data: Unable to convert source data to target format: virtual image size \
             {virtual_size} is larger than the reported available \
             storage {}. A larger PVC is required",
            16 * MIB
        )
    );
    assert_eq!(sha256_prefix(device.path(), 16 * MIB), before, "device untouched");
}

#[test]
fn blank_block_volumes() {
    if !require_privileged("blank_block_volumes") {
        return;
    }
    let dir = scratch_dir("cdi-blank-block");
    let backing = dir.path().join("block.img");
    fs::File::create(&backing).unwrap().set_len(32 * MIB).unwrap();
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap();

    let mut pod = Pod::new("cdi-blank-block-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.set("IMPORTER_SOURCE", "none").set("IMPORTER_IMAGE_SIZE", "32Mi");
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, r#"{"preallocationApplied":false,"message":"Import Complete"}"#);
    assert_eq!(fs::metadata(&backing).unwrap().blocks(), 0, "an empty block volume is the blank disk");

    pod.set("PREALLOCATION", "true").set("IMPORTER_IMAGE_SIZE", "24Mi");
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, r#"{"preallocationApplied":true,"message":"Import Complete"}"#);
    let allocated = fs::metadata(&backing).unwrap().blocks() * 512;
    assert!(allocated >= 24 * MIB, "preallocated: {allocated} bytes allocated under the loop device");
    assert_eq!(sha256_prefix(device.path(), 24 * MIB), sha256_prefix(Path::new("/dev/zero"), 24 * MIB));
}

#[test]
fn runs_unprivileged_as_uid_107() {
    if !require_privileged("runs_unprivileged_as_uid_107") {
        return;
    }
    let bench = Workbench::new("cdi-uid");
    let (image, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();

    // File volume owned by the pod user.
    let mut pod = Pod::new("cdi-uid-file");
    pod.as_pod_user().set("IMPORTER_ENDPOINT", image.to_str().unwrap()).set("IMPORTER_IMAGE_SIZE", "32Mi");
    let (ended, values, _) = pod.run_scraping();
    ended_complete(&ended);
    assert_progress_series(&values, false);
    let disk = pod.data().join("disk.img");
    assert_eq!(fs::metadata(&disk).unwrap().uid(), POD_UID);
    assert_eq!(fs::metadata(&disk).unwrap().len(), 32 * MIB);
    assert_eq!(sha256_prefix(&disk, virtual_size), digest);

    // Block volume: the device node handed to the pod user, as kubelet does for volumeDevices.
    let (device, _backing) = garbage_loop_device(bench.dir.path(), 32 * MIB);
    std::os::unix::fs::chown(device.path(), Some(POD_UID), Some(POD_UID)).unwrap();
    let mut pod = Pod::new("cdi-uid-block");
    pod.block = Some(device.path().to_path_buf());
    pod.as_pod_user().set("IMPORTER_ENDPOINT", image.to_str().unwrap());
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
    std::os::unix::fs::chown(device.path(), Some(0), Some(6)).unwrap();
}

#[test]
fn unsupported_sources_go_to_a_fallback_importer_when_one_is_named() {
    let mut pod = Pod::new("cdi-fallback");
    let script = pod.dir.path().join("cdi-importer.orig");
    let record = pod.dir.path().join("fallback-ran");
    fs::write(&script, format!("#!/bin/sh\necho \"$IMPORTER_SOURCE $*\" > {}\nexit 7\n", record.display())).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    pod.set("IMPORTER_SOURCE", "vddk").set("BOUNDIMPORT_CDI_FALLBACK", script.to_str().unwrap());
    let ended = pod.run();
    assert_eq!(ended.code, 7, "the fallback's own exit code: {}", ended.stderr);
    assert_eq!(fs::read_to_string(&record).unwrap(), "vddk -alsologtostderr -v=3\n");
    assert!(ended.termination.is_empty(), "the fallback owns the termination log");

    // Sources boundimport imports stay with boundimport.
    pod.set("IMPORTER_SOURCE", "none").set("IMPORTER_IMAGE_SIZE", "1Mi");
    fs::remove_file(&record).unwrap();
    let ended = pod.run();
    ended_ok(&ended);
    assert!(!record.exists());
}

// ---- HTTP(S) sources, through the in-process test server of tests/common/http.rs.

use common::http::{ServerOptions, TestServer};

/// A directory served over HTTP(S) holding a qcow2 of the standard mix, and its reference digest.
fn served_qcow2(bench: &Workbench, size: u64) -> (String, u64) {
    let (_, digest, virtual_size) = qcow2_image(bench, size);
    (digest, virtual_size)
}

/// Writes the server's certificate where IMPORTER_CERT_DIR will point.
fn cert_dir(pod: &Pod, server: &TestServer) -> PathBuf {
    let dir = pod.dir.path().join("certs");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("ca.pem"), server.cert_pem.as_ref().unwrap()).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn https_qcow2_into_a_file_volume_with_auth_headers_and_progress() {
    let bench = Workbench::new("cdi-https-file");
    let (digest, virtual_size) = served_qcow2(&bench, 40 * MIB);
    let qcow2_len = fs::metadata(bench.path("disk.qcow2")).unwrap().len();
    // About 4 s for the whole file: scraped mid-import at 100 ms intervals.
    let server = TestServer::start(
        bench.dir.path(),
        ServerOptions {
            ranges: true,
            tls: true,
            auth: Some(("importer".into(), "s3cret".into())),
            rate: Some(qcow2_len / 4),
            ..Default::default()
        },
    );
    let mut pod = Pod::new("cdi-https-file-pod");
    let certs = cert_dir(&pod, &server);
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"))
        .set("IMPORTER_IMAGE_SIZE", "64Mi")
        .set("IMPORTER_CERT_DIR", certs.to_str().unwrap())
        .set("IMPORTER_ACCESS_KEY_ID", "importer")
        .set("IMPORTER_SECRET_KEY", "s3cret")
        .set("IMPORTER_EXTRA_HEADER_0", "X-Tenant: blue")
        .set("IMPORTER_EXTRA_HEADER_1", "X-Trace:42");
    let (ended, values, text) = pod.run_scraping();
    ended_complete(&ended);
    assert_progress_series(&values, true);
    assert!(text.contains("\nboundimport_written_bytes "), "{text}");
    let disk = pod.data().join("disk.img");
    assert_eq!(fs::metadata(&disk).unwrap().len(), 64 * MIB);
    assert_eq!(sha256_prefix(&disk, virtual_size), digest);
    let requests = server.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_ne!(request.status, 401, "basic auth sent on every request");
        let has = |line: &str| request.headers.iter().any(|h| h.eq_ignore_ascii_case(line));
        assert!(has("X-Tenant: blue") && has("X-Trace: 42"), "extra headers: {:?}", request.headers);
    }
}

#[test]
fn https_without_a_trusted_certificate_fails_unless_insecure() {
    let bench = Workbench::new("cdi-https-trust");
    let (digest, virtual_size) = served_qcow2(&bench, 8 * MIB);
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: true, tls: true, ..Default::default() });
    let mut pod = Pod::new("cdi-https-untrusted");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    let cdi = "Unable to connect to http data source: HTTP request errored: ";
    assert!(ended.termination.starts_with(cdi), "{}", ended.termination);

    pod.set("INSECURE_TLS", "true");
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
}

#[test]
fn http_without_ranges_streams_a_compressed_image_and_checks_its_checksum() {
    let bench = Workbench::new("cdi-http-stream");
    let (digest, virtual_size) = served_qcow2(&bench, 24 * MIB);
    run(Command::new("gzip").args(["-k", "-1"]).arg(bench.path("disk.qcow2")));
    let gz = bench.path("disk.qcow2.gz");
    let gz_digest = sha256_prefix(&gz, fs::metadata(&gz).unwrap().len());
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });

    let mut pod = Pod::new("cdi-http-stream-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2.gz")).set("IMPORTER_CHECKSUM", &format!("sha256:{gz_digest}"));
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);

    let mut bad = Pod::new("cdi-http-stream-bad");
    bad.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2.gz"))
        .set("IMPORTER_CHECKSUM", &format!("sha256:{}", "1".repeat(64)));
    let ended = bad.run();
    assert_eq!(ended.code, 0, "{}", ended.stderr);
    assert!(ended.termination.starts_with(r#"{"message":"Unable to process data: "#), "{}", ended.termination);
    assert!(ended.termination.contains("checksum mismatch"), "{}", ended.termination);
    assert!(ended.termination.contains(&gz_digest), "{}", ended.termination);
    assert!(!bad.data().join("disk.img").exists(), "unverified data removed");
}

/// What CDI writes when its import needs a scratch volume it does not have.
const SCRATCH_REQUIRED: &str =
    r#"{"scratchSpaceRequired":true,"preallocationApplied":false,"message":"Import Complete"}"#;

#[test]
fn a_qcow2_stream_spooling_past_memory_asks_for_scratch_space_and_then_uses_it() {
    let bench = Workbench::new("cdi-scratch");
    let (qcow2, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    bench.qcow2_with_l2_after_data(&qcow2, "reordered.qcow2");
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });

    // No scratch volume: the data ahead of its table outgrows the memory spool; nothing is left on the volume.
    let mut pod = Pod::new("cdi-scratch-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("reordered.qcow2"));
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, SCRATCH_REQUIRED, "{}", ended.stderr);
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0, "nothing left on the volume");

    // The controller's second pod has /scratch: the stream is spooled there and imported.
    pod.with_scratch();
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
    assert_eq!(fs::read_dir(pod.scratch()).unwrap().count(), 0, "spool file removed");
}

#[test]
fn a_vhdx_streamed_without_ranges_needs_no_scratch_space() {
    let bench = Workbench::new("cdi-vhdx-stream");
    let (qcow2, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    let vhdx = bench.path("disk.vhdx");
    run(Command::new(common::qemu_img()).args(["convert", "-O", "vhdx"]).arg(&qcow2).arg(&vhdx));
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });
    // Its tables come before its data: read forward, placed by its BAT, no scratch volume asked for.
    let mut pod = Pod::new("cdi-vhdx-stream-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.vhdx"));
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
}

#[test]
fn a_qcow2_stream_spooling_past_memory_onto_a_block_volume_asks_for_scratch_and_then_uses_it() {
    if !require_privileged("a_qcow2_stream_spooling_past_memory_onto_a_block_volume_asks_for_scratch_and_then_uses_it")
    {
        return;
    }
    let bench = Workbench::new("cdi-scratch-block");
    let (qcow2, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    bench.qcow2_with_l2_after_data(&qcow2, "reordered.qcow2");
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });
    let (device, _backing) = garbage_loop_device(bench.dir.path(), 32 * MIB);
    let mut pod = Pod::new("cdi-scratch-block-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.set("IMPORTER_ENDPOINT", &server.url("reordered.qcow2"));

    // Known only part-way: the data ahead of its table outgrows the memory spool after writing has begun.
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, SCRATCH_REQUIRED, "{}", ended.stderr);
    let mut ends = vec![0u8; MIB as usize];
    let mut file = fs::File::open(device.path()).unwrap();
    for at in [0, 31 * MIB] {
        file.seek(std::io::SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut ends).unwrap();
        assert!(ends.iter().all(|&b| b == 0), "the partial image does not look like a disk (MiB at {at})");
    }

    pod.with_scratch();
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
    assert_eq!(fs::read_dir(pod.scratch()).unwrap().count(), 0, "spool file removed");
}

/// The watermark a running pod's last checkpoint recorded: in the state file beside `disk.img`, or in the last
/// 4 KiB of its block volume.
fn recorded_watermark(pod: &Pod) -> Option<u64> {
    let text = match &pod.block {
        None => fs::read_to_string(pod.data().join(".disk.img.boundimport-resume")).ok()?,
        Some(device) => {
            let mut file = fs::File::open(device).ok()?;
            let len = file.seek(std::io::SeekFrom::End(0)).ok()?;
            let mut tail = vec![0u8; 4096];
            file.seek(std::io::SeekFrom::Start(len - 4096)).ok()?;
            file.read_exact(&mut tail).ok()?;
            let record = tail.strip_prefix(b"boundimport-resume\n")?;
            let end = record.iter().position(|&b| b == 0)?;
            String::from_utf8(record[..end].to_vec()).ok()?
        }
    };
    serde_json::from_str::<serde_json::Value>(&text).ok()?["watermark"].as_u64()
}

/// Starts the pod and SIGKILLs it (a node drain, a preemption: no chance to clean up) once a checkpoint records
/// at least `at_least` bytes. Returns the recorded watermark.
fn kill_after_checkpoint(pod: &Pod, at_least: u64) -> u64 {
    let mut child = pod.command().stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let watermark = loop {
        assert!(child.try_wait().unwrap().is_none(), "the pod ended before a checkpoint of {at_least} bytes");
        assert!(Instant::now() < deadline, "no checkpoint of {at_least} bytes within 120 s");
        match recorded_watermark(pod) {
            Some(watermark) if watermark >= at_least => break watermark,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    watermark
}

/// The offset a pod's log says it resumed from.
fn resumed_offset(stderr: &str) -> Option<u64> {
    stderr.split("resuming at offset ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Serves a qcow2 of `size` virtual bytes slowly (about 10 s for the whole file), with ETags.
fn slow_etag_server(bench: &Workbench, size: u64) -> (TestServer, String, u64, u64) {
    let (image, digest, virtual_size) = qcow2_image(bench, size);
    let len = fs::metadata(&image).unwrap().len();
    let options = ServerOptions { ranges: true, etag: true, rate: Some(len / 10), ..Default::default() };
    (TestServer::start(bench.dir.path(), options), digest, virtual_size, len)
}

/// A killed pod's successor continues from the recorded watermark, reports progress from there, fetches well
/// under the whole image again, and ends byte-identical to qemu-img's conversion with no state left behind.
fn assert_resumes(pod: &mut Pod, server: &TestServer, digest: &str, virtual_size: u64, len: u64) {
    let watermark = kill_after_checkpoint(pod, virtual_size / 3);
    let served_before = server.bytes_served();
    let (ended, values, _) = pod.run_scraping();
    ended_complete(&ended);
    let served = server.bytes_served() - served_before;
    let resumed = resumed_offset(&ended.stderr).unwrap_or_else(|| panic!("did not resume:\n{}", ended.stderr));
    eprintln!("killed at watermark {watermark}, resumed at {resumed} of {virtual_size}; fetched {served} of {len} bytes again");
    assert!(resumed >= watermark, "resumed at {resumed}, below the recorded {watermark}");
    assert!(served < len * 3 / 4, "the second pod fetched {served} of {len} bytes");
    let first = values.iter().copied().find(|&v| v > 0.0).expect("progress was scraped");
    let resumed_percent = resumed as f64 * 100.0 / virtual_size as f64;
    assert!(first >= resumed_percent - 0.01, "progress restarted at {first}%, resumed at {resumed_percent:.2}%");
    assert_progress_series(&values, false);
    let image = pod.block.clone().unwrap_or_else(|| pod.data().join("disk.img"));
    assert_eq!(sha256_prefix(&image, virtual_size), digest);
    assert_eq!(recorded_watermark(pod), None, "resume state cleared");
}

#[test]
fn a_pod_killed_mid_import_resumes_in_the_next_pod() {
    let bench = Workbench::new("cdi-resume");
    let (server, digest, virtual_size, len) = slow_etag_server(&bench, 64 * MIB);
    let mut pod = Pod::new("cdi-resume-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    assert_resumes(&mut pod, &server, &digest, virtual_size, len);
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 1, "only disk.img is left");
}

#[test]
fn a_pod_killed_mid_import_onto_a_block_volume_resumes_in_the_next_pod() {
    if !require_privileged("a_pod_killed_mid_import_onto_a_block_volume_resumes_in_the_next_pod") {
        return;
    }
    let bench = Workbench::new("cdi-resume-block");
    let (server, digest, virtual_size, len) = slow_etag_server(&bench, 64 * MIB);
    let (device, _backing) = garbage_loop_device(bench.dir.path(), virtual_size + MIB);
    let mut pod = Pod::new("cdi-resume-block-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    assert_resumes(&mut pod, &server, &digest, virtual_size, len);
    let mut tail = vec![0u8; 4096];
    let mut file = fs::File::open(device.path()).unwrap();
    file.seek(std::io::SeekFrom::Start(virtual_size + MIB - 4096)).unwrap();
    file.read_exact(&mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "the state block is zeroed after success");
}

#[test]
fn a_changed_source_starts_over_in_the_next_pod() {
    let bench = Workbench::new("cdi-resume-changed");
    let (server, _, virtual_size, _) = slow_etag_server(&bench, 64 * MIB);
    let mut pod = Pod::new("cdi-resume-changed-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    kill_after_checkpoint(&pod, virtual_size / 4);

    // The same URL now serves another image (another size, so another ETag).
    let other = Workbench::new("cdi-resume-other");
    let (replacement, digest, virtual_size) = qcow2_image(&other, 40 * MIB);
    fs::copy(&replacement, bench.path("disk.qcow2")).unwrap();
    let len = fs::metadata(&replacement).unwrap().len();
    let served_before = server.bytes_served();
    let ended = pod.run();
    ended_complete(&ended);
    assert!(ended.stderr.contains("ignoring resume state"), "{}", ended.stderr);
    assert_eq!(resumed_offset(&ended.stderr), None);
    assert!(server.bytes_served() - served_before >= len, "the whole new image was fetched");
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
    assert_eq!(recorded_watermark(&pod), None, "resume state cleared");
}

#[test]
fn node_pull_imports_take_their_labels_from_the_sidecars_info() {
    let bench = Workbench::new("cdi-node-pull");
    let (_, digest, virtual_size) = qcow2_image(&bench, 24 * MIB);
    // What CDI's containerimage-server answers at /info: the image's environment.
    let env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
        "PREFERENCE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora",
    ];
    fs::write(bench.path("info"), serde_json::json!({ "env": env }).to_string()).unwrap();
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: true, ..Default::default() });

    // The controller's node-pull pod: the endpoint names disk.img, the sidecar's ready file the real name.
    let mut pod = Pod::new("cdi-node-pull-pod");
    let ready = pod.dir.path().join("run/ready");
    let done = pod.dir.path().join("run/done");
    fs::write(&ready, "disk.qcow2").unwrap();
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.img"))
        .set("IMPORTER_PULL_METHOD", "node")
        .set("IMPORTER_READY_FILE", ready.to_str().unwrap())
        .set("IMPORTER_DONE_FILE", done.to_str().unwrap());
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(
        ended.termination,
        r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"labels":{"instancetype.kubevirt.io/default-instancetype":"u1.small","preference.kubevirt.io/default-preference":"fedora"},"message":"Import Complete"}"#
    );
    assert!(done.exists(), "the sidecar is told the import is done");
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
    let info = server.requests().into_iter().filter(|r| r.path == "/info").collect::<Vec<_>>();
    assert_eq!(info.len(), 1, "one /info request");
    assert!(!info[0].headers.iter().any(|h| h.to_ascii_lowercase().starts_with("authorization")));

    // Without a usable /info the import still succeeds, without labels (CDI logs the error).
    fs::remove_file(bench.path("info")).unwrap();
    fs::remove_file(&done).unwrap();
    let ended = pod.run();
    ended_complete(&ended);
    assert!(ended.stderr.contains("containerimage-server info"), "{}", ended.stderr);

    // Not a node pull: no /info request at all.
    let before = server.requests().len();
    let mut plain = Pod::new("cdi-not-node-pull");
    plain.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    ended_complete(&plain.run());
    assert!(server.requests()[before..].iter().all(|r| r.path != "/info"));
}

#[test]
fn https_through_an_https_proxy_from_the_environment() {
    let bench = Workbench::new("cdi-https-proxy");
    let (digest, virtual_size) = served_qcow2(&bench, 24 * MIB);
    // A host only the proxy knows: no resolver here has heard of it, so a direct connection cannot succeed.
    let host = "images.proxied.test";
    let options = ServerOptions { ranges: true, tls: true, tls_names: vec![host.into()], ..Default::default() };
    let server = TestServer::start(bench.dir.path(), options);
    let proxy = common::proxy::TlsProxy::start(bench.dir.path(), server.port());

    let mut pod = Pod::new("cdi-https-proxy-pod");
    let certs = cert_dir(&pod, &server);
    let endpoint = format!("https://{host}:{}/disk.qcow2", server.port());
    pod.set("IMPORTER_ENDPOINT", &endpoint)
        .set("IMPORTER_CERT_DIR", certs.to_str().unwrap())
        .set("IMPORTER_PROXY_CERT_DIR", proxy.ca_dir.to_str().unwrap())
        .set("HTTPS_PROXY", &proxy.url(Some("puser:p%40ss")))
        .set("https_proxy", "http://127.0.0.1:9/ignored-the-upper-case-one-wins")
        .set("NO_PROXY", "10.0.0.0/8,.example.com,images.proxied.test:1");
    let ended = pod.run();
    ended_complete(&ended);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
    let connects = proxy.connects();
    assert!(!connects.is_empty(), "nothing went through the proxy");
    let authority = format!("CONNECT {host}:{} HTTP/1.1", server.port());
    let auth = "Proxy-Authorization: Basic cHVzZXI6cEBzcw=="; // puser:p@ss
    for head in &connects {
        assert_eq!(head[0], authority, "{head:?}");
        assert!(head.iter().any(|l| l == auth), "{head:?}");
    }

    // The proxy's certificate must verify: without its CA the import fails, naming the proxy.
    let mut untrusted = Pod::new("cdi-https-proxy-untrusted");
    let certs = cert_dir(&untrusted, &server);
    untrusted
        .set("IMPORTER_ENDPOINT", &endpoint)
        .set("IMPORTER_CERT_DIR", certs.to_str().unwrap())
        .set("HTTPS_PROXY", &proxy.url(None));
    let ended = untrusted.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(ended.termination.contains("starting TLS with the proxy"), "{}", ended.termination);
    assert!(!untrusted.data().join("disk.img").exists());

    // A NO_PROXY entry for the host (its port given) sends it direct, where it does not resolve.
    let mut direct = Pod::new("cdi-https-no-proxy");
    let certs = cert_dir(&direct, &server);
    direct
        .set("IMPORTER_ENDPOINT", &endpoint)
        .set("IMPORTER_CERT_DIR", certs.to_str().unwrap())
        .set("IMPORTER_PROXY_CERT_DIR", proxy.ca_dir.to_str().unwrap())
        .set("HTTPS_PROXY", &proxy.url(None))
        .set("NO_PROXY", &format!(".test:{}", server.port()));
    let before = proxy.connects().len();
    let ended = direct.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(ended.termination.contains("resolving images.proxied.test"), "{}", ended.termination);
    assert_eq!(proxy.connects().len(), before, "no_proxy bypassed the proxy");
}

#[test]
fn http_image_too_large_for_the_volume_is_refused_before_writing() {
    let bench = Workbench::new("cdi-http-small");
    let (_, virtual_size) = served_qcow2(&bench, 24 * MIB);
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: false, ..Default::default() });
    let mut pod = Pod::new("cdi-http-small-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2")).set("IMPORTER_IMAGE_SIZE", "16Mi");
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(
        ended.termination.contains(&format!(
            "virtual image size {virtual_size} is larger than the reported available storage {}",
            16 * MIB
        )),
        "{}",
        ended.termination
    );
    assert!(!pod.data().join("disk.img").exists());

    // A compressed raw image states no size: the import stops when it grows past the volume.
    write_raw(&bench.path("big.raw"), 24 * MIB, &[(0, 24 * MIB, Fill::Pattern)]);
    run(Command::new("gzip").args(["-1"]).arg(bench.path("big.raw")));
    let mut pod = Pod::new("cdi-http-small-raw");
    pod.set("IMPORTER_ENDPOINT", &server.url("big.raw.gz")).set("IMPORTER_IMAGE_SIZE", "16Mi");
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(ended.termination.starts_with("Unable to process data: "), "{}", ended.termination);
    assert!(
        ended.termination.contains("is larger than the reported available storage 16777216"),
        "{}",
        ended.termination
    );
}

#[test]
fn http_compressed_archive_is_extracted() {
    let bench = Workbench::new("cdi-http-archive");
    let stage = bench.path("stage");
    fs::create_dir_all(stage.join("images")).unwrap();
    write_raw(&stage.join("images/disk.img"), 8 * MIB, &[(MIB, MIB, Fill::Random(3))]);
    std::os::unix::fs::symlink("/etc/passwd", stage.join("passwd")).unwrap();
    let tar = bench.path("bundle.tar");
    make_tar(&tar, &stage, None, "posix");
    run(Command::new("xz").args(["-k", "-1"]).arg(&tar));
    let served = bench.path("bundle.tar.xz");
    let sum = sha256_prefix(&served, fs::metadata(&served).unwrap().len());
    let server = TestServer::start(bench.dir.path(), ServerOptions { ranges: true, ..Default::default() });
    let mut pod = Pod::new("cdi-http-archive-pod");
    pod.set("IMPORTER_CONTENTTYPE", "archive")
        .set("IMPORTER_ENDPOINT", &server.url("bundle.tar.xz"))
        .set("IMPORTER_CHECKSUM", &format!("sha256:{sum}"));
    let (ended, values, _) = pod.run_scraping();
    ended_complete(&ended);
    assert_progress_series(&values, false);
    assert_eq!(
        sha256_prefix(&pod.data().join("images/disk.img"), 8 * MIB),
        sha256_prefix(&stage.join("images/disk.img"), 8 * MIB)
    );
    assert!(fs::symlink_metadata(pod.data().join("passwd")).is_err(), "an absolute symlink is not created");
}

#[test]
fn http_onto_a_block_volume_as_uid_107_reports_progress_mid_import() {
    if !require_privileged("http_onto_a_block_volume_as_uid_107_reports_progress_mid_import") {
        return;
    }
    let bench = Workbench::new("cdi-http-block");
    let (digest, virtual_size) = served_qcow2(&bench, 40 * MIB);
    let qcow2_len = fs::metadata(bench.path("disk.qcow2")).unwrap().len();
    let server = TestServer::start(
        bench.dir.path(),
        ServerOptions { ranges: true, rate: Some(qcow2_len / 4), ..Default::default() },
    );
    let (device, _backing) = garbage_loop_device(bench.dir.path(), 48 * MIB);
    std::os::unix::fs::chown(device.path(), Some(POD_UID), Some(POD_UID)).unwrap();
    let mut pod = Pod::new("cdi-http-block-pod");
    pod.block = Some(device.path().to_path_buf());
    pod.as_pod_user().set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    let (ended, values, _) = pod.run_scraping();
    std::os::unix::fs::chown(device.path(), Some(0), Some(6)).unwrap();
    ended_complete(&ended);
    assert_progress_series(&values, true);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
}

/// The value of a `boundimport_` gauge in one scrape.
fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn in_a_pod_cgroup_the_gauges_show_the_bound_holding() {
    if !require_privileged("in_a_pod_cgroup_the_gauges_show_the_bound_holding") {
        return;
    }
    const LIMIT: u64 = 256 * MIB;
    let bench = Workbench::new("cdi-cgroup");
    let (digest, virtual_size) = served_qcow2(&bench, 96 * MIB);
    let qcow2_len = fs::metadata(bench.path("disk.qcow2")).unwrap().len();
    let server = TestServer::start(
        bench.dir.path(),
        ServerOptions { ranges: true, rate: Some(qcow2_len / 4), ..Default::default() },
    );
    let cgroup = boundimport::lab::fixtures::ChildCgroup::create("boundimport-cdi-test", LIMIT).expect("cgroup");
    let mut pod = Pod::new("cdi-cgroup-pod");
    pod.set("IMPORTER_ENDPOINT", &server.url("disk.qcow2"));
    let (ended, values, texts) = pod.run_scraping_in(Some(&cgroup));
    ended_complete(&ended);
    assert_progress_series(&values, true);
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
    // The budget is the pod cgroup's own limit; what the cgroup holds stays well inside it all along.
    let mid: Vec<&String> =
        texts.iter().filter(|t| gauge(t, "boundimport_written_bytes").is_some_and(|w| w > 0)).collect();
    assert!(!mid.is_empty(), "no scrape while writing");
    let peak = |name: &str| texts.iter().filter_map(|t| gauge(t, name)).max().unwrap_or(0);
    eprintln!(
        "{} scrapes: peak cgroup usage {} B, peak dirty + writeback {} B, budget {LIMIT} B",
        texts.len(),
        peak("boundimport_cgroup_usage_bytes"),
        peak("boundimport_cgroup_dirty_writeback_bytes")
    );
    for text in &texts {
        assert_eq!(gauge(text, "boundimport_budget_bytes"), Some(LIMIT), "{text}");
        let usage = gauge(text, "boundimport_cgroup_usage_bytes").expect("usage gauge");
        let dirty = gauge(text, "boundimport_cgroup_dirty_writeback_bytes").expect("dirty gauge");
        assert!(usage < LIMIT / 2, "usage {usage} of a {LIMIT} limit");
        assert!(dirty <= LIMIT / 4, "dirty + writeback {dirty}");
    }
}

// ---- IMPORTER_SOURCE=registry: containerDisks from a real docker-registry (tests/common/registry.rs).

use common::registry::{require_tools, Compress, Layout, Registry, RegistryOptions};

/// A TLS + htpasswd registry holding `containerdisks/test:v1` (a qcow2 of `size` in a gzip layer above a base
/// layer, with instancetype and preference environment), `:bootc`, and the layout directory; plus the disk's
/// reference digest and virtual size.
fn registry_with_containerdisk(bench: &Workbench, size: u64) -> (Registry, tempfile::TempDir, String, u64) {
    let (image, digest, virtual_size) = qcow2_image(bench, size);
    let registry = Registry::start(RegistryOptions { tls: true, user: Some(("cdi".into(), "pull-secret".into())) });
    let layout = push_containerdisk(bench, &registry, &image);
    (registry, layout, digest, virtual_size)
}

/// Pushes `image` as the disk of `containerdisks/test:v1` (in a gzip layer above a base layer, with instancetype
/// and preference environment) and of `:bootc`; returns the layout directory.
fn push_containerdisk(bench: &Workbench, registry: &Registry, image: &Path) -> tempfile::TempDir {
    let dir = scratch_dir("cdi-registry-layout");
    let mut layout = Layout::new(dir.path());
    let hostname = bench.path("hostname");
    fs::write(&hostname, "containerdisk\n").unwrap();
    let base = layout.layer(&[("etc/hostname", &hostname)], Compress::None);
    let disk = layout.layer(&[("disk/disk.qcow2", image)], Compress::Gzip);
    let env = [
        "PATH=/usr/bin",
        "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.medium",
        "PREFERENCE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora",
    ];
    layout.image(Some("v1"), "amd64", &env, &[], &[base, disk.clone()]);
    layout.image(Some("bootc"), "amd64", &[], &[("ostree.bootable", "1")], &[disk]);
    registry.push(&layout, "v1", "containerdisks/test");
    registry.push(&layout, "bootc", "containerdisks/test");
    dir
}

/// A pod importing `tag` from `registry` with its CA and credentials.
fn registry_pod(label: &str, registry: &Registry, tag: &str) -> Pod {
    let mut pod = Pod::new(label);
    let (user, pass) = registry.user.clone().unwrap();
    pod.set("IMPORTER_SOURCE", "registry")
        .set("IMPORTER_ENDPOINT", &registry.image("containerdisks/test", tag))
        .set("IMPORTER_ACCESS_KEY_ID", &user)
        .set("IMPORTER_SECRET_KEY", &pass)
        .set("IMPORTER_CERT_DIR", registry.certs.as_ref().unwrap().ca_dir.to_str().unwrap())
        .set("IMPORTER_IMAGE_SIZE", "64Mi");
    pod
}

const REGISTRY_COMPLETE: &str = r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"labels":{"instancetype.kubevirt.io/default-instancetype":"u1.medium","preference.kubevirt.io/default-preference":"fedora"},"message":"Import Complete"}"#;

#[test]
fn registry_containerdisk_into_a_file_volume_with_labels() {
    if !require_tools("registry_containerdisk_into_a_file_volume_with_labels") {
        return;
    }
    let bench = Workbench::new("cdi-registry-file");
    let (registry, _layout, digest, virtual_size) = registry_with_containerdisk(&bench, 40 * MIB);
    let mut pod = registry_pod("cdi-registry-file-pod", &registry, "v1");
    pod.with_scratch();
    let scratch = pod.scratch();
    let (ended, values, _) = pod.run_scraping();
    ended_ok(&ended);
    assert_eq!(ended.termination, REGISTRY_COMPLETE);
    assert_progress_series(&values, false);
    let image = pod.data().join("disk.img");
    assert_eq!(sha256_prefix(&image, virtual_size), digest);
    assert_eq!(fs::metadata(&image).unwrap().len(), 64 * MIB, "resized to the requested size like CDI");
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "no scratch space used");

    // The platform CDI was asked for, and a bootc image: one plain line, exit 1, no image left.
    let mut arm = registry_pod("cdi-registry-arch", &registry, "v1");
    arm.set("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64");
    let ended = arm.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(
        ended.termination.starts_with("Unable to process data: Failed to read registry image: docker://")
            && ended
                .termination
                .contains(r#"manifest image architecture: "amd64" doesn't match requested architecture: "arm64""#),
        "{}",
        ended.termination
    );
    let ended = registry_pod("cdi-registry-bootc", &registry, "bootc").run();
    assert_eq!(ended.code, 1);
    assert!(ended.termination.contains("bootc image detected"), "{}", ended.termination);
    let mut wrong = registry_pod("cdi-registry-401", &registry, "v1");
    wrong.set("IMPORTER_SECRET_KEY", "wrong");
    let ended = wrong.run();
    assert_eq!(ended.code, 1);
    assert!(ended.termination.contains("401") && !ended.termination.contains("wrong"), "{}", ended.termination);
    assert!(!wrong.data().join("disk.img").exists());
}

#[test]
fn registry_containerdisk_onto_a_block_volume_reports_progress_mid_import() {
    if !require_tools("registry_containerdisk_onto_a_block_volume_reports_progress_mid_import")
        || !require_privileged("registry_containerdisk_onto_a_block_volume_reports_progress_mid_import")
    {
        return;
    }
    let bench = Workbench::new("cdi-registry-block");
    let (registry, _layout, digest, virtual_size) = registry_with_containerdisk(&bench, 48 * MIB);
    let (device, _backing) = garbage_loop_device(bench.dir.path(), 64 * MIB);
    let _throttle = boundimport::lab::fixtures::WriteThrottle::set(device.path(), 12 * MIB, None).expect("throttle");
    let mut pod = registry_pod("cdi-registry-block-pod", &registry, "v1");
    pod.block = Some(device.path().to_path_buf());
    pod.set("FILESYSTEM_OVERHEAD", "0");
    let (ended, values, _) = pod.run_scraping();
    ended_ok(&ended);
    assert_eq!(ended.termination, REGISTRY_COMPLETE);
    assert_progress_series(&values, true);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
    assert_eq!(fs::read_dir(pod.data()).unwrap().count(), 0, "nothing written to the data directory");
}

/// A qcow2 of `size` random bytes (every cluster is data: a replay that skipped nothing would show in the bytes
/// written), its reference digest and virtual size.
fn random_qcow2(bench: &Workbench, name: &str, size: u64, seed: u64) -> (PathBuf, String, u64) {
    let raw = bench.path(&format!("{name}.raw"));
    write_raw(&raw, size, &[(0, size, Fill::Random(seed))]);
    bench.qemu_img(&["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), name]);
    let image = bench.path(name);
    let (digest, virtual_size) = qemu_reference(&image, bench.dir.path());
    (image, digest, virtual_size)
}

/// The data bytes a pod's log says it wrote.
fn bytes_written(stderr: &str) -> Option<u64> {
    stderr.split("bytes: ").nth(1)?.split(" bytes written").next()?.parse().ok()
}

#[test]
fn a_registry_import_killed_mid_way_resumes_in_the_next_pod_and_a_new_manifest_starts_over() {
    let test = "a_registry_import_killed_mid_way_resumes_in_the_next_pod_and_a_new_manifest_starts_over";
    if !require_tools(test) || !require_privileged(test) {
        return;
    }
    let bench = Workbench::new("cdi-registry-resume");
    let (image, digest, virtual_size) = random_qcow2(&bench, "disk.qcow2", 48 * MIB, 21);
    let registry = Registry::start(RegistryOptions { tls: true, user: Some(("cdi".into(), "pull-secret".into())) });
    let _layout = push_containerdisk(&bench, &registry, &image);
    // A slow volume (about 4 s for the image), so the pod can be killed part-way.
    let (device, _backing) = garbage_loop_device(bench.dir.path(), virtual_size + MIB);
    let _throttle = boundimport::lab::fixtures::WriteThrottle::set(device.path(), 12 * MIB, None).expect("throttle");
    let mut pod = registry_pod("cdi-registry-resume-pod", &registry, "v1");
    pod.block = Some(device.path().to_path_buf());
    pod.set("FILESYSTEM_OVERHEAD", "0");

    // The layer is gzip: it cannot be entered part-way, so it is read again, and only what lies past the
    // watermark is written.
    let watermark = kill_after_checkpoint(&pod, virtual_size / 3);
    let (ended, values, _) = pod.run_scraping();
    ended_ok(&ended);
    assert_eq!(ended.termination, REGISTRY_COMPLETE, "{}", ended.stderr);
    let resumed = resumed_offset(&ended.stderr).unwrap_or_else(|| panic!("did not resume:\n{}", ended.stderr));
    let written = bytes_written(&ended.stderr).unwrap_or_else(|| panic!("no bytes written:\n{}", ended.stderr));
    eprintln!("killed at watermark {watermark}, resumed at {resumed} of {virtual_size}; wrote {written} bytes");
    assert!(resumed >= watermark, "resumed at {resumed}, below the recorded {watermark}");
    assert!(ended.stderr.contains("reading it again from its start"), "{}", ended.stderr);
    // At most one chunk straddling the resume point is written again.
    assert!(written + resumed <= virtual_size + 8 * MIB, "wrote {written} bytes after resuming at {resumed}");
    let first = values.iter().copied().find(|&v| v > 0.0).expect("progress was scraped");
    let resumed_percent = resumed as f64 * 100.0 / virtual_size as f64;
    assert!(first >= resumed_percent - 0.01, "progress restarted at {first}%, resumed at {resumed_percent:.2}%");
    assert_progress_series(&values, false);
    assert_eq!(sha256_prefix(device.path(), virtual_size), digest);
    assert_eq!(recorded_watermark(&pod), None, "resume state cleared");

    // Killed again; meanwhile the tag moves to another image: the manifest digest differs, so it starts over.
    kill_after_checkpoint(&pod, virtual_size / 3);
    let (other, other_digest, other_size) = random_qcow2(&bench, "other.qcow2", 40 * MIB, 22);
    let other_layout = push_containerdisk(&bench, &registry, &other);
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(ended.termination, REGISTRY_COMPLETE, "{}", ended.stderr);
    assert!(ended.stderr.contains("ignoring resume state"), "{}", ended.stderr);
    assert_eq!(resumed_offset(&ended.stderr), None);
    assert_eq!(sha256_prefix(device.path(), other_size), other_digest);
    assert_eq!(recorded_watermark(&pod), None, "resume state cleared");

    // Killed once more, then the layer is corrupted behind the registry's back (its gzip header's MTIME: it still
    // inflates, but no longer matches its digest). The next pod resumes, fails the digest at the layer's end, and
    // leaves no record that a later pod could resume over.
    kill_after_checkpoint(&pod, other_size / 3);
    let layer = Layout::open(other_layout.path()).layer_of("v1");
    let data = registry.blob_data(&layer);
    let mut bytes = fs::read(&data).unwrap();
    bytes[4] ^= 0x01;
    fs::write(&data, &bytes).unwrap();
    let ended = pod.run();
    assert_eq!(ended.code, 1, "{}", ended.stderr);
    assert!(resumed_offset(&ended.stderr).is_some(), "{}", ended.stderr);
    assert!(ended.termination.contains("digest mismatch"), "{}", ended.termination);
    assert_eq!(recorded_watermark(&pod), None, "no record left over bytes that failed their digest");
}

/// `boundimport_written_bytes` in a scrape, if present.
fn written_bytes(text: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix("boundimport_written_bytes ")?.trim().parse().ok())
}

#[test]
fn streamed_imports_report_progress_mid_import() {
    // A server without Range: qcow2 and a gzipped raw image are read forward only, and their progress must move
    // while they are written (against the qcow2's virtual size, and the share of the .gz consumed).
    let bench = Workbench::new("cdi-stream-progress");
    let (digest, virtual_size) = served_qcow2(&bench, 40 * MIB);
    let raw = bench.raw_mix("plain.raw", 32 * MIB, 11);
    common::run(Command::new("gzip").arg("-k").arg(&raw));
    let raw_digest = sha256_prefix(&raw, 32 * MIB);
    for (name, want, size) in [("disk.qcow2", &digest, virtual_size), ("plain.raw.gz", &raw_digest, 32 * MIB)] {
        let len = fs::metadata(bench.path(name)).unwrap().len();
        let server = TestServer::start(
            bench.dir.path(),
            ServerOptions { ranges: false, rate: Some(len / 4), ..Default::default() },
        );
        let mut pod = Pod::new("cdi-stream-progress-pod");
        pod.set("IMPORTER_ENDPOINT", &server.url(name)).set("IMPORTER_IMAGE_SIZE", "64Mi");
        let (ended, values, texts) = pod.run_scraping_in(None);
        ended_complete(&ended);
        assert!(ended.stderr.contains("read as a stream"), "{name} was not streamed: {}", ended.stderr);
        assert_progress_series(&values, true);
        let written: Vec<u64> = texts.iter().filter_map(|t| written_bytes(t)).collect();
        assert!(written.iter().any(|&w| w > 0 && w < size), "{name}: written bytes never seen mid-import: {written:?}");
        let disk = pod.data().join("disk.img");
        assert_eq!(sha256_prefix(&disk, size), *want, "{name}");
    }
}

#[test]
fn registry_without_tls_is_reached_with_insecure_tls() {
    if !require_tools("registry_without_tls_is_reached_with_insecure_tls") {
        return;
    }
    let bench = Workbench::new("cdi-registry-plain");
    let (image, digest, virtual_size) = qcow2_image(&bench, 8 * MIB);
    let dir = scratch_dir("cdi-registry-plain-layout");
    let mut layout = Layout::new(dir.path());
    let layer = layout.layer(&[("disk/disk.qcow2", &image)], Compress::Zstd);
    layout.image(Some("v1"), "amd64", &["KUBEVIRT_IO_OS=linux"], &[], &[layer]);
    let registry = Registry::start(RegistryOptions::default());
    registry.push(&layout, "v1", "plain/disk");
    let mut pod = Pod::new("cdi-registry-plain-pod");
    pod.set("IMPORTER_SOURCE", "registry").set("IMPORTER_ENDPOINT", &registry.image("plain/disk", "v1"));
    let ended = pod.run();
    assert_eq!(ended.code, 1, "plain HTTP without INSECURE_TLS: {}", ended.stderr);
    assert!(ended.termination.contains("connecting to the registry"), "{}", ended.termination);
    pod.set("INSECURE_TLS", "true");
    let ended = pod.run();
    ended_ok(&ended);
    assert_eq!(
        ended.termination,
        r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"labels":{"kubevirt.io/os":"linux"},"message":"Import Complete"}"#
    );
    assert_eq!(sha256_prefix(&pod.data().join("disk.img"), virtual_size), digest);
}
