//! What the cluster reads from boundimport's pods besides the image: klog lines on stderr (log tooling parses
//! CDI's that way), and termination messages in the words CDI's controller pattern-matches.

mod common;

use common::http::{ServerOptions, TestServer};
use common::privileged::require_privileged;
use common::{boundimport, scratch_dir, write_raw, Fill, MIB};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// klog's header: `Lmmdd hh:mm:ss.uuuuuu PID file:line] ` with the pid right-aligned in 7 columns.
const KLOG_LINE: &str = r"^(?P<level>[IWEF])(?P<month>\d{2})(?P<day>\d{2}) (?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})\.\d{6} (?P<pid>[ \d]{7}) (?P<file>[\w.-]+\.rs):(?P<line>[1-9]\d*)\] (?P<message>.*)$";

/// The UTC month and day, as `date` gives them.
fn utc_month_day() -> String {
    let output = Command::new("date").args(["-u", "+%m%d"]).output().expect("running date");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Asserts every line of `stderr` is a klog line from process `pid`, dated today (UTC); returns their levels.
fn assert_klog_lines(stderr: &str, pid: u32, days: &[String]) -> String {
    let re = regex::Regex::new(KLOG_LINE).unwrap();
    let mut levels = String::new();
    for line in stderr.lines() {
        let caps = re.captures(line).unwrap_or_else(|| panic!("not a klog line: {line:?}\nstderr:\n{stderr}"));
        assert_eq!(caps["pid"].trim_start().parse::<u32>().unwrap(), pid, "{line}");
        assert!(days.iter().any(|d| *d == format!("{}{}", &caps["month"], &caps["day"])), "{line} vs {days:?}");
        assert!(caps["h"].parse::<u32>().unwrap() < 24 && caps["m"].parse::<u32>().unwrap() < 60, "{line}");
        assert!(!caps["message"].is_empty(), "{line}");
        levels.push_str(&caps["level"]);
    }
    levels
}

fn cdi_command(dir: &Path, data: &Path) -> Command {
    let mut cmd = boundimport();
    cmd.args(["cdi", "-alsologtostderr", "-v=1"])
        .arg("--data-dir")
        .arg(data)
        .arg("--block-path")
        .arg(dir.join("no-block-volume"))
        .arg("--termination-log")
        .arg(dir.join("termination-log"))
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--proxy-cert-dir", "/nonexistent-proxycerts", "--extra-headers-dir", "/nonexistent-headers"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("OWNER_UID", "0b7c2e4a-9f31-4d68-a5e2-6c1d8b3f7a90"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
        ]);
    cmd
}

#[test]
fn cdi_and_upload_server_write_klog_lines() {
    let dir = scratch_dir("klog-lines");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let before = utc_month_day();

    let mut cdi = cdi_command(dir.path(), &data);
    cdi.envs([("IMPORTER_SOURCE", "none"), ("IMPORTER_IMAGE_SIZE", "1Mi")]).stderr(Stdio::piped());
    let child = cdi.spawn().expect("running boundimport cdi");
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    let days = [before.clone(), utc_month_day()];
    let levels = assert_klog_lines(&stderr, pid, &days);
    assert!(levels.len() >= 3 && levels.chars().all(|l| l == 'I'), "{levels}\n{stderr}");
    assert!(stderr.contains("] serving progress metrics on https://127.0.0.1:"), "{stderr}");

    // The upload server without its TLS environment fails at start: an error line, klog too.
    let mut upload = boundimport();
    upload
        .args(["upload-server", "-alsologtostderr", "-v=1"])
        .arg("--termination-log")
        .arg(dir.path().join("upload-termination-log"))
        .arg("--data-dir")
        .arg(&data)
        .env_clear()
        .stderr(Stdio::piped());
    let child = upload.spawn().expect("running boundimport upload-server");
    let pid = child.id();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let levels = assert_klog_lines(&stderr, pid, &[before, utc_month_day()]);
    assert!(levels.contains('E'), "{levels}\n{stderr}");
}

#[test]
fn an_unknown_argument_is_one_klog_line_and_reaches_the_termination_log_given() {
    let dir = scratch_dir("klog-usage");
    for (mode, log) in [("cdi", "cdi-termination"), ("upload-server", "upload-termination")] {
        let termination = dir.path().join(log);
        let before = utc_month_day();
        let child = boundimport()
            .args([mode, "-v=1", "--termination-log"])
            .arg(&termination)
            .arg("--no-such-flag")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert_eq!(assert_klog_lines(&stderr, pid, &[before, utc_month_day()]), "E", "{mode}: {stderr}");
        assert!(stderr.contains("--no-such-flag"), "{stderr}");
        let message = std::fs::read_to_string(&termination).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(message.starts_with("invalid arguments: "), "{mode}: {message:?}");
    }
}

#[test]
fn a_volume_filled_mid_import_says_no_space_left_on_device() {
    if !require_privileged("a_volume_filled_mid_import_says_no_space_left_on_device") {
        return;
    }
    use boundimport::lab::fixtures::{LoopDevice, MountedExt4};
    use std::os::unix::process::CommandExt;
    const POD_UID: u32 = 107;
    let dir = scratch_dir("enospc");
    let before = utc_month_day();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The image fits the volume when the importer measures it; a co-tenant then fills the volume.
    let serve = dir.path().join("serve");
    std::fs::create_dir(&serve).unwrap();
    write_raw(&serve.join("disk.raw"), 24 * MIB, &[(0, 24 * MIB, Fill::Random(0x5ace))]);
    let server = TestServer::start(&serve, ServerOptions { ranges: true, rate: Some(4_000_000), ..Default::default() });
    let backing = dir.path().join("volume.img");
    std::fs::File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let device = LoopDevice::attach(&backing, false).expect("attaching a loop device");
    let volume = MountedExt4::create(device.path()).expect("making the volume's filesystem");
    let termination = dir.path().join("termination-log");
    std::fs::File::create(&termination).unwrap();
    for path in [volume.path(), termination.as_path()] {
        std::os::unix::fs::chown(path, Some(POD_UID), Some(POD_UID)).unwrap();
    }

    let mut cmd = cdi_command(dir.path(), volume.path());
    cmd.envs([("IMPORTER_SOURCE", "http"), ("IMPORTER_ENDPOINT", &server.url("disk.raw"))])
        .uid(POD_UID)
        .gid(POD_UID)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running boundimport cdi");
    let pid = child.id();
    let (lines, seen) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let measured = Duration::from_secs(60);
    loop {
        let line = seen.recv_timeout(measured).expect("no 'space available' line from the importer");
        if line.contains("space available for the image") {
            break;
        }
    }
    // The co-tenant (root, so the reserved blocks go too) takes every block left.
    let mut filler = std::fs::File::create(volume.path().join("co-tenant")).unwrap();
    let block = vec![0x5au8; MIB as usize];
    let full = loop {
        if let Err(e) = filler.write_all(&block).and_then(|()| filler.sync_data()) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the import did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    let message = std::fs::read_to_string(&termination).unwrap();
    eprintln!("termination message: {message}");
    assert_eq!(status.code(), Some(1), "{message}\n{stderr}");
    // simplifyKnownMessage (pkg/controller/util.go) shows this as "DataVolume too small to contain image".
    assert!(message.starts_with("Unable to process data: "), "{message}");
    assert!(message.contains("no space left on device"), "{message}");
    assert!(!message.contains("os error"), "{message}");
    assert!(!message.contains('\n') && message.len() <= 4096, "{message}");
    let levels = assert_klog_lines(&stderr, pid, &[before, utc_month_day()]);
    assert!(levels.ends_with('E'), "{levels}\n{stderr}");
    drop(filler);
    drop(volume);
    drop(device);
}

/// What a `boundimport cdi` pod run left: exit code, termination message, stderr.
struct Ended {
    code: Option<i32>,
    termination: String,
    stderr: String,
}

/// Runs `boundimport cdi` once onto a fresh filesystem volume with `env` added (IMPORTER_SOURCE=http).
fn run_pod(label: &str, env: &[(&str, &str)]) -> Ended {
    let dir = scratch_dir(label);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut cmd = cdi_command(dir.path(), &data);
    cmd.env("IMPORTER_SOURCE", "http").envs(env.iter().copied()).stdout(Stdio::null());
    let output = common::run_any(&mut cmd);
    let termination = std::fs::read_to_string(dir.path().join("termination-log")).unwrap_or_default();
    Ended { code: output.status.code(), termination, stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
}

/// A directory served over HTTP holding a 4 MiB raw `disk.img`, and its sha256.
fn served_disk(dir: &Path, options: ServerOptions) -> TestServer {
    write_raw(&dir.join("disk.img"), 4 * MIB, &[(0, 4 * MIB, Fill::Random(0xcd1))]);
    TestServer::start(dir, options)
}

/// CDI's importer writes `Unable to connect to http data source: expected status code 200, got 404. Status: 404 Not
/// Found` (the prefix CDI's e2e tests match): boundimport writes the same, then its own error.
#[test]
fn a_missing_image_says_what_cdi_says_for_a_404() {
    let dir = scratch_dir("cdi-msg-404");
    let server = served_disk(dir.path(), ServerOptions::default());
    let url = server.url("missing.img");
    let ended = run_pod("cdi-msg-404-pod", &[("IMPORTER_ENDPOINT", &url)]);
    assert_eq!(ended.code, Some(1), "{}", ended.stderr);
    let cdi = "Unable to connect to http data source: expected status code 200, got 404. Status: 404 Not Found: ";
    let detail = ended.termination.strip_prefix(cdi).unwrap_or_else(|| panic!("{:?}", ended.termination));
    assert!(detail.contains(&url) && detail.contains("HTTP 404"), "{detail}");
}

/// An answer asking for credentials is a status too: `got 401. Status: 401 Unauthorized`.
#[test]
fn refused_credentials_say_what_cdi_says_for_a_401() {
    let dir = scratch_dir("cdi-msg-401");
    let auth = Some(("user".to_string(), "secret".to_string()));
    let server = served_disk(dir.path(), ServerOptions { auth, ..Default::default() });
    let url = server.url("disk.img");
    let ended = run_pod(
        "cdi-msg-401-pod",
        &[("IMPORTER_ENDPOINT", &url), ("IMPORTER_ACCESS_KEY_ID", "user"), ("IMPORTER_SECRET_KEY", "wrong")],
    );
    assert_eq!(ended.code, Some(1), "{}", ended.stderr);
    let cdi = "Unable to connect to http data source: expected status code 200, got 401. Status: 401 Unauthorized: ";
    let detail = ended.termination.strip_prefix(cdi).unwrap_or_else(|| panic!("{:?}", ended.termination));
    assert!(detail.contains(&url), "{detail}");
}

/// No answer at all — a refused connection, an unknown host, a certificate nobody vouches for — is CDI's
/// `Unable to connect to http data source: HTTP request errored: …`, then boundimport's error naming the URL.
#[test]
fn no_answer_says_what_cdi_says_for_a_failed_request() {
    let dir = scratch_dir("cdi-msg-request");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://127.0.0.1:{}/disk.img", closed.local_addr().unwrap().port());
    drop(closed);
    let tls_server = served_disk(dir.path(), ServerOptions { tls: true, ..Default::default() });
    let untrusted = tls_server.url("disk.img");
    assert!(untrusted.starts_with("https://"), "{untrusted}");
    let cases = [
        (refused.as_str(), "connecting to"),
        ("http://no-such-host.invalid/disk.img", "resolving no-such-host.invalid"),
        (untrusted.as_str(), "starting TLS"),
    ];
    for (url, step) in cases {
        let ended = run_pod("cdi-msg-request-pod", &[("IMPORTER_ENDPOINT", url)]);
        assert_eq!(ended.code, Some(1), "{url}: {}", ended.stderr);
        let cdi = "Unable to connect to http data source: HTTP request errored: ";
        let detail = ended.termination.strip_prefix(cdi).unwrap_or_else(|| panic!("{url}: {:?}", ended.termination));
        assert!(detail.starts_with(url) && detail.contains(step), "{url}: {detail}");
    }
}

/// A checksum mismatch is CDI's JSON message `Unable to process data: Unable to transfer source data to target file:
/// … checksum mismatch …`, exit 0 (the controller's no-retry case); the image is gone.
#[test]
fn a_checksum_mismatch_says_what_cdi_says() {
    let dir = scratch_dir("cdi-msg-checksum");
    let server = served_disk(dir.path(), ServerOptions::default());
    let wrong = format!("sha256:{}", "0".repeat(64));
    let ended = run_pod(
        "cdi-msg-checksum-pod",
        &[("IMPORTER_ENDPOINT", &server.url("disk.img")), ("IMPORTER_CHECKSUM", &wrong)],
    );
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    let json: serde_json::Value = serde_json::from_str(&ended.termination).expect("a JSON termination message");
    let message = json["message"].as_str().unwrap();
    let cdi = "Unable to process data: Unable to transfer source data to target file: ";
    let detail = message.strip_prefix(cdi).unwrap_or_else(|| panic!("{message:?}"));
    assert!(detail.contains("checksum mismatch") && detail.contains(&"0".repeat(64)), "{detail}");
}

/// An image larger than the volume is CDI's `Unable to process data: Unable to convert source data to target
/// format: virtual image size N is larger than the reported available storage M. A larger PVC is required`.
#[test]
fn an_image_larger_than_the_volume_says_what_cdi_says() {
    let dir = scratch_dir("cdi-msg-size");
    let server = served_disk(dir.path(), ServerOptions::default());
    let ended =
        run_pod("cdi-msg-size-pod", &[("IMPORTER_ENDPOINT", &server.url("disk.img")), ("IMPORTER_IMAGE_SIZE", "1Mi")]);
    assert_eq!(ended.code, Some(1), "{}", ended.stderr);
    // The size named is the image's, or for a raw stream of unknown length the point where it outgrew the volume.
    let re = regex::Regex::new(concat!(
        r"^Unable to process data: Unable to convert source data to target format: virtual image size (\d+) ",
        r"is larger than the reported available storage (\d+)\. A larger PVC is required$"
    ))
    .unwrap();
    let caps = re.captures(&ended.termination).unwrap_or_else(|| panic!("{:?}", ended.termination));
    assert_eq!(caps[2].parse::<u64>().unwrap(), MIB, "{}", ended.termination);
    assert!(caps[1].parse::<u64>().unwrap() > MIB, "{}", ended.termination);
}
