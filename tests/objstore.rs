//! S3 and GCS sources against real servers started here on 127.0.0.1 (tests/common/objstore.rs): SeaweedFS's S3
//! gateway, which checks SigV4 signatures (plain and TLS with a CA made here), and fake-gcs-server. Every import
//! is compared with `qemu-img convert -O raw` of the same image; errors must name bucket and key and leave no
//! destination behind. The service-account JWT grant is checked against a token endpoint in this process (no
//! Google peer exists here), which verifies the RS256 signature with the key file's public key.

mod common;

use common::objstore::{
    encode_path, require_servers, service_account_key, CutOnce, FakeGcs, Seaweed, ACCESS_KEY, SECRET_KEY,
};
use common::privileged::require_privileged;
use common::{boundimport, qemu_img, qemu_reference, run, scratch_dir, sha256_prefix, write_raw, Fill, MIB};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// A guest disk of random, patterned and zero runs, and the image files made from it: qcow2, vmdk
/// streamOptimized, raw, raw.xz and qcow2.gz.
fn images(dir: &Path, size: u64) -> Vec<PathBuf> {
    let raw = dir.join("disk.raw");
    let mut segments = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < size {
        let len = (3 * MIB / 2).min(size - at);
        segments.push((at, len, [Fill::Random(i), Fill::Zero, Fill::Pattern][i as usize % 3]));
        at += len;
        i += 1;
    }
    write_raw(&raw, size, &segments);
    let convert = |format: &str, options: &[&str], out: &str| {
        run(Command::new(qemu_img())
            .args(["convert", "-f", "raw", "-O", format])
            .args(options)
            .arg(&raw)
            .arg(dir.join(out)));
        dir.join(out)
    };
    let qcow2 = convert("qcow2", &[], "disk.qcow2");
    let vmdk = convert("vmdk", &["-o", "subformat=streamOptimized"], "disk.vmdk");
    run(Command::new("xz").args(["-k", "-0", "-T1"]).arg(&raw));
    run(Command::new("sh").arg("-c").arg(format!("gzip -c {0} > {0}.gz", qcow2.display())));
    vec![qcow2.clone(), vmdk, raw.clone(), dir.join("disk.raw.xz"), dir.join("disk.qcow2.gz")]
}

/// `boundimport --json SOURCE DEST` with `env`.
fn import(source: &str, dest: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = boundimport();
    command.args(["--progress", "none", "--json", "--retries", "2"]).args(args).arg(source).arg(dest);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "STORAGE_EMULATOR_HOST",
    ] {
        command.env_remove(var);
    }
    command.env("HOME", dest.parent().unwrap()).envs(env.iter().copied());
    command.output().unwrap()
}

fn keys() -> [(&'static str, &'static str); 2] {
    [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)]
}

fn summary(output: &Output, what: &str) -> serde_json::Value {
    assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The ETag the S3 gateway answers a signed HEAD of `path` with (curl signs it).
fn s3_etag(port: u16, path: &str) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-I", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
        .arg(format!("http://127.0.0.1:{port}/{path}"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("etag:").map(|v| v.trim().to_string()))
}

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "should have failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.lines().find(|l| l.contains("error:")).unwrap_or_default().to_string()
}

#[test]
fn s3_objects_of_every_kind_match_qemu_by_cli_with_a_key_holding_slashes_and_spaces() {
    if !require_servers("s3_objects_of_every_kind_match_qemu") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-s3");
    for image in images(work.path(), 12 * MIB) {
        let name = image.file_name().unwrap().to_str().unwrap().to_string();
        let key = format!("images/with space/{name}");
        s3.put("disks", &key, &image);
        let dest = work.path().join(format!("{name}.out"));
        let json =
            summary(&import(&format!("s3://disks/{key}"), &dest, &["--endpoint-url", &s3.endpoint()], &keys()), &name);
        let plain = work.path().join(name.trim_end_matches(".gz").trim_end_matches(".xz"));
        let (digest, len) = qemu_reference(&plain, work.path());
        assert_eq!(sha256_prefix(&dest, len), digest, "{name}: contents");
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), len, "{name}: length");
        assert_eq!(json["spooled_bytes"], 0, "{name}: nothing spooled");
        assert_eq!(json["source"], format!("s3://disks/{key}"));
        assert!(json["http_requests"].as_u64().unwrap() >= 1);
        // Compressed objects stream once, front to back; the others are read in place.
        if name.ends_with(".gz") || name.ends_with(".xz") {
            assert_eq!(
                json["downloaded_bytes"],
                std::fs::metadata(&image).unwrap().len() + 1,
                "{name}: probe byte + one stream"
            );
        }
        std::fs::remove_file(&dest).unwrap();
    }
}

#[test]
fn s3_refusals_name_bucket_and_key_and_leave_no_destination() {
    if !require_servers("s3_refusals_name_bucket_and_key") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-s3-errors");
    let raw = work.path().join("small.raw");
    write_raw(&raw, MIB, &[(0, MIB, Fill::Random(7))]);
    s3.put("disks", "dir/a b.raw", &raw);
    let dest = work.path().join("out.raw");
    let endpoint = ["--endpoint-url", &s3.endpoint()];

    // The server itself refuses a wrong secret: the signature it computes differs.
    let wrong = [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", "not-the-secret")];
    let line = one_line_error(&import("s3://disks/dir/a b.raw", &dest, &endpoint, &wrong));
    assert!(
        line.contains("SignatureDoesNotMatch") && line.contains("\"disks/dir/a b.raw\"") && line.contains("403"),
        "{line}"
    );
    // Unsigned requests are refused too: the bucket is not public.
    let line = one_line_error(&import("s3://disks/dir/a b.raw", &dest, &endpoint, &[]));
    assert!(line.contains("AccessDenied") && line.contains("disks/dir/a b.raw"), "{line}");
    let line = one_line_error(&import("s3://disks/dir/missing.raw", &dest, &endpoint, &keys()));
    assert!(line.contains("NoSuchKey") && line.contains("\"disks/dir/missing.raw\"") && line.contains("404"), "{line}");
    let line = one_line_error(&import("s3://nobucket/dir/a b.raw", &dest, &endpoint, &keys()));
    assert!(line.contains("NoSuchBucket") && line.contains("\"nobucket/dir/a b.raw\""), "{line}");
    assert!(!dest.exists(), "a refused import leaves no destination");

    // The same key from a profile in the shared files, and with the right secret the object imports.
    let aws = work.path().join(".aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!("[objstore]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    summary(&import("s3://disks/dir/a b.raw", &dest, &endpoint, &[("AWS_PROFILE", "objstore")]), "profile");
    assert_eq!(sha256_prefix(&dest, MIB), sha256_prefix(&raw, MIB));
    // --checksum covers the object's bytes as downloaded; a wrong one discards the import.
    let good = format!("sha256:{}", sha256_prefix(&raw, MIB));
    let args = ["--endpoint-url", &s3.endpoint(), "--checksum", &good];
    summary(&import("s3://disks/dir/a b.raw", &dest, &args, &keys()), "checksum");
    let bad = format!("sha256:{}", "0".repeat(64));
    let args = ["--endpoint-url", &s3.endpoint(), "--checksum", &bad];
    let line = one_line_error(&import("s3://disks/dir/a b.raw", &dest, &args, &keys()));
    assert!(line.contains("checksum"), "{line}");
}

#[test]
fn s3_over_tls_trusts_only_the_given_ca() {
    if !require_servers("s3_over_tls_trusts_only_the_given_ca") {
        return;
    }
    let s3 = Seaweed::start(true);
    let work = scratch_dir("objstore-s3-tls");
    let image = &images(work.path(), 4 * MIB)[0];
    s3.put("disks", "tls/disk.qcow2", image);
    let dest = work.path().join("out.raw");
    let ca = s3.certs.as_ref().unwrap().ca_dir.to_str().unwrap().to_string();
    let line =
        one_line_error(&import("s3://disks/tls/disk.qcow2", &dest, &["--endpoint-url", &s3.endpoint()], &keys()));
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    let args = ["--endpoint-url", &s3.endpoint(), "--ca-dir", &ca];
    summary(&import("s3://disks/tls/disk.qcow2", &dest, &args, &keys()), "tls");
    let (digest, len) = qemu_reference(image, work.path());
    assert_eq!(sha256_prefix(&dest, len), digest);
}

#[test]
fn an_s3_object_replaced_mid_import_fails_clearly() {
    if !require_servers("an_s3_object_replaced_mid_import_fails_clearly") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-s3-replaced");
    let raw = work.path().join("disk.raw");
    write_raw(&raw, 16 * MIB, &[(0, 16 * MIB, Fill::Random(3))]);
    s3.put("disks", "disk.raw", &raw);
    // The importer talks to the gateway through a forwarder that holds every connection once 4 MiB went through,
    // however the importer splits its reads; meanwhile the object is replaced; then the held connections are cut
    // and the importer resumes with new range requests.
    let first_etag = s3_etag(s3.s3_port, "disks/disk.raw");
    assert!(first_etag.is_some(), "no ETag from the S3 gateway");
    let forward = CutOnce::start(s3.s3_port, 4 * MIB);
    let dest = work.path().join("out.raw");
    let endpoint = format!("http://127.0.0.1:{}", forward.port);
    let child = {
        let mut command = boundimport();
        command
            .args(["--progress", "none", "--retries", "2", "--endpoint-url", &endpoint, "s3://disks/disk.raw"])
            .arg(&dest);
        command
            .envs(keys())
            .env_remove("AWS_PROFILE")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        command.spawn().unwrap()
    };
    forward.paused.recv_timeout(std::time::Duration::from_secs(60)).expect("the transfer reached 4 MiB");
    let replacement = work.path().join("other.raw");
    write_raw(&replacement, 16 * MIB, &[(0, 16 * MIB, Fill::Random(4))]);
    s3.put("disks", "disk.raw", &replacement);
    // The put goes through the filer; the S3 gateway learns of it from the filer's metadata feed, which lags under
    // load: let the connection go only once the gateway itself serves the new ETag.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s3_etag(s3.s3_port, "disks/disk.raw") == first_etag {
        assert!(std::time::Instant::now() < deadline, "the S3 gateway still serves the replaced object's ETag");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    forward.go_on();
    let output = child.wait_with_output().unwrap();
    let line = one_line_error(&output);
    // The resumed request carries If-Match with the first ETag: the server itself refuses the new object.
    assert!(line.contains("s3://disks/disk.raw") && line.contains("changed during the import"), "{line}");
    assert!(
        line.contains("bucket \"disks\" key \"disk.raw\" no longer has ETag") && line.contains("HTTP 412"),
        "{line}"
    );
}

/// A token endpoint that checks each JWT bearer assertion's RS256 signature with `public_key` and its claims, and
/// answers with a token; counts the grants.
fn token_endpoint(public_key: Vec<u8>) -> (String, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/token", listener.local_addr().unwrap().port());
    let grants = Arc::new(AtomicU32::new(0));
    let counted = grants.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            let assertion = body.split('&').find_map(|p| p.strip_prefix("assertion=")).unwrap_or_default();
            let grant = body.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
            let parts: Vec<&str> = assertion.split('.').collect();
            let decode = |text: &str| {
                let standard = text.replace('-', "+").replace('_', "/");
                let padded = format!("{standard}{}", "=".repeat((4 - standard.len() % 4) % 4));
                base64_decode(&padded)
            };
            let valid = parts.len() == 3 && grant && {
                let key =
                    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &public_key);
                let signed = format!("{}.{}", parts[0], parts[1]);
                let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap_or_default();
                key.verify(signed.as_bytes(), &decode(parts[2])).is_ok()
                    && claims["iss"] == "importer@test.iam.gserviceaccount.com"
                    && claims["scope"].as_str().is_some_and(|s| s.contains("devstorage.read_only"))
            };
            let (status, answer) = if valid {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                ("200 OK", format!(r#"{{"access_token":"token-{n}","expires_in":3600,"token_type":"Bearer"}}"#))
            } else {
                ("400 Bad Request", r#"{"error":"invalid_grant","error_description":"bad assertion"}"#.to_string())
            };
            let mut stream = stream;
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}", answer.len());
        }
    });
    (url, grants)
}

fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut bits = 0u32;
    let mut count = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let Some(v) = ALPHABET.iter().position(|&a| a == c) else { return Vec::new() };
        bits = (bits << 6) | v as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}

#[test]
fn gcs_objects_match_qemu_anonymous_and_with_a_service_account_token() {
    if !require_servers("gcs_objects_match_qemu") {
        return;
    }
    let work = scratch_dir("objstore-gcs");
    let files = images(work.path(), 6 * MIB);
    let objects: Vec<(String, &PathBuf)> =
        files.iter().map(|f| (format!("dir/with space/{}", f.file_name().unwrap().to_str().unwrap()), f)).collect();
    let preload: Vec<(&str, &str, &Path)> =
        objects.iter().map(|(name, f)| ("gbucket", name.as_str(), f.as_path())).collect();
    let gcs = FakeGcs::start(&preload);
    let emulator = [("STORAGE_EMULATOR_HOST", gcs.host())];
    let emulator: Vec<(&str, &str)> = emulator.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (name, file) in &objects {
        let dest = work.path().join("out.raw");
        let json = summary(&import(&format!("gs://gbucket/{name}"), &dest, &[], &emulator), name);
        let plain = PathBuf::from(file.to_str().unwrap().trim_end_matches(".gz").trim_end_matches(".xz"));
        let (digest, len) = qemu_reference(&plain, work.path());
        assert_eq!(sha256_prefix(&dest, len), digest, "{name}");
        assert_eq!(json["spooled_bytes"], 0);
        std::fs::remove_file(&dest).unwrap();
    }
    let dest = work.path().join("out.raw");
    let line = one_line_error(&import("gs://gbucket/dir/missing.qcow2", &dest, &[], &emulator));
    assert!(line.contains("\"gbucket\"") && line.contains("\"dir/missing.qcow2\"") && line.contains("404"), "{line}");
    assert!(!dest.exists());

    // A service-account key: one JWT grant at the token endpoint, its token reused for every request.
    // The endpoint needs the key's public half and the key file the endpoint's URL: make the key, then point it.
    let keydir = scratch_dir("objstore-gcs-key");
    let (key_file, public_key) = service_account_key(keydir.path(), "http://127.0.0.1:1/unused");
    let (token_uri, grants) = token_endpoint(public_key);
    let mut key: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    key["token_uri"] = token_uri.into();
    std::fs::write(&key_file, key.to_string()).unwrap();
    let mut with_key = emulator.clone();
    with_key.push(("GOOGLE_APPLICATION_CREDENTIALS", key_file.to_str().unwrap()));
    let (name, file) = &objects[0];
    summary(&import(&format!("gs://gbucket/{name}"), &dest, &[], &with_key), "service account");
    let (digest, len) = qemu_reference(file, work.path());
    assert_eq!(sha256_prefix(&dest, len), digest);
    assert_eq!(grants.load(Ordering::SeqCst), 1, "one grant, the token cached");
}

/// `boundimport cdi` with a CDI-shaped environment onto a filesystem volume (`data`) or a block device.
fn cdi(dir: &Path, block: Option<&Path>, env: &[(&str, &str)]) -> (i32, String) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let termination = dir.join("termination-log");
    let _ = std::fs::remove_file(&termination);
    let mut command = boundimport();
    command
        .args(["cdi", "-alsologtostderr", "-v=3", "--metrics-addr", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .arg("--block-path")
        .arg(block.map_or_else(|| dir.join("no-block-volume"), Path::to_path_buf))
        .arg("--termination-log")
        .arg(&termination)
        .arg("--scratch-dir")
        .arg(dir.join("no-scratch"))
        .args(["--proxy-cert-dir", "/nonexistent-proxycerts", "--extra-headers-dir", "/nonexistent-headers"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("IMPORTER_CONTENTTYPE", "kubevirt"),
            ("OWNER_UID", "u1"),
            ("FILESYSTEM_OVERHEAD", "0"),
            ("PREALLOCATION", "false"),
        ])
        .envs(env.iter().copied());
    let output = command.output().unwrap();
    let message = std::fs::read_to_string(&termination).unwrap_or_default();
    assert!(!message.contains('\n'), "one line: {message:?}");
    (output.status.code().unwrap_or(-1), message)
}

const COMPLETE: &str = r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#;

#[test]
fn cdi_imports_s3_and_gcs_objects_onto_file_and_block_volumes_without_scratch() {
    if !require_servers("cdi_imports_s3_and_gcs_objects") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-cdi");
    let files = images(work.path(), 8 * MIB);
    let pod = scratch_dir("objstore-cdi-pod");
    let creds = [("IMPORTER_ACCESS_KEY_ID", ACCESS_KEY), ("IMPORTER_SECRET_KEY", SECRET_KEY)];
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        let key = format!("cdi/with space/{name}");
        s3.put("disks", &key, file);
        let endpoint = format!("{}/disks/{}", s3.endpoint(), encode_path(&key));
        let mut env =
            vec![("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", endpoint.as_str()), ("IMPORTER_IMAGE_SIZE", "64Mi")];
        env.extend(creds);
        let (code, message) = cdi(pod.path(), None, &env);
        assert_eq!((code, message.as_str()), (0, COMPLETE), "{name}");
        let plain = PathBuf::from(file.to_str().unwrap().trim_end_matches(".gz").trim_end_matches(".xz"));
        let (digest, len) = qemu_reference(&plain, work.path());
        assert_eq!(sha256_prefix(&pod.path().join("data/disk.img"), len), digest, "{name}");
    }
    // An object larger than the volume is refused before anything is written.
    let key = "cdi/with space/disk.qcow2";
    let endpoint = format!("{}/disks/{}", s3.endpoint(), encode_path(key));
    let mut env =
        vec![("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", endpoint.as_str()), ("IMPORTER_IMAGE_SIZE", "1Mi")];
    env.extend(creds);
    std::fs::remove_file(pod.path().join("data/disk.img")).unwrap();
    let (code, message) = cdi(pod.path(), None, &env);
    assert!(code == 1 && message.contains("is larger than the reported available"), "{message}");
    assert!(!pod.path().join("data/disk.img").exists(), "nothing written for an image larger than the volume");

    // CDI's messages for a refused object, naming it; no disk.img is left that looks complete.
    let endpoint = format!("{}/disks/cdi/missing.qcow2", s3.endpoint());
    let mut env = vec![("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", endpoint.as_str())];
    env.extend(creds);
    let (code, message) = cdi(pod.path(), None, &env);
    assert_eq!(code, 1);
    assert!(
        message.starts_with("Unable to connect to s3 data source:")
            && message.contains("NoSuchKey")
            && message.contains("\"disks/cdi/missing.qcow2\""),
        "{message}"
    );
    assert!(!pod.path().join("data/disk.img").exists());
    let wrong = [
        ("IMPORTER_SOURCE", "s3"),
        ("IMPORTER_ENDPOINT", endpoint.as_str()),
        ("IMPORTER_ACCESS_KEY_ID", ACCESS_KEY),
        ("IMPORTER_SECRET_KEY", "wrong"),
    ];
    let (code, message) = cdi(pod.path(), None, &wrong);
    assert!(code == 1 && message.contains("SignatureDoesNotMatch"), "{message}");

    // GCS in CDI's custom-endpoint form, anonymous.
    let qcow2 = &files[0];
    let gcs = FakeGcs::start(&[("gbucket", "cdi/disk one.qcow2", qcow2.as_path())]);
    let endpoint = format!("http://{}/gbucket/cdi/disk%20one.qcow2", gcs.host());
    let (code, message) = cdi(pod.path(), None, &[("IMPORTER_SOURCE", "gcs"), ("IMPORTER_ENDPOINT", &endpoint)]);
    assert_eq!((code, message.as_str()), (0, COMPLETE));
    let (digest, len) = qemu_reference(qcow2, work.path());
    assert_eq!(sha256_prefix(&pod.path().join("data/disk.img"), len), digest);

    // Onto a block volume (a loop device over a file of garbage): the image is written at its start.
    if !require_privileged("cdi_imports_s3_and_gcs_objects onto a block volume") {
        return;
    }
    let backing = work.path().join("volume.img");
    write_raw(&backing, 16 * MIB, &[(0, 16 * MIB, Fill::Random(99))]);
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, false).unwrap();
    let key = "cdi/with space/disk.qcow2";
    let endpoint = format!("{}/disks/{}", s3.endpoint(), encode_path(key));
    let mut env = vec![("IMPORTER_SOURCE", "s3"), ("IMPORTER_ENDPOINT", endpoint.as_str())];
    env.extend(creds);
    let block_pod = scratch_dir("objstore-cdi-block");
    let (code, message) = cdi(block_pod.path(), Some(device.path()), &env);
    assert_eq!((code, message.as_str()), (0, COMPLETE));
    assert_eq!(sha256_prefix(device.path(), len), digest);
}

// ---- Memory: objects into a 600M memory cgroup on a loop device, beside CDI's way.

/// CDI's importer pod limit.
const POD_LIMIT: u64 = 600_000_000;

/// One measured run in a fresh 600M memory cgroup.
struct Measured {
    seconds: f64,
    peak: u64,
    scratch: u64,
    json: Option<serde_json::Value>,
}

fn measure(name: &str, command: &mut Command, scratch: Option<&Path>) -> Measured {
    let cgroup =
        boundimport::lab::fixtures::ChildCgroup::create(&format!("objstore-{name}-{}", std::process::id()), POD_LIMIT)
            .unwrap();
    boundimport::lab::fixtures::drop_caches().unwrap();
    let started = std::time::Instant::now();
    let child =
        cgroup.spawn(command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped())).unwrap();
    let output = child.wait_with_output().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    let peak = cgroup.reader().peak().unwrap().unwrap();
    let json = serde_json::from_slice(&output.stdout).ok();
    let scratch = scratch.and_then(|s| std::fs::metadata(s).ok()).map_or(0, |m| m.len());
    eprintln!("{name}: {seconds:.1} s, peak {} MiB, scratch {} MiB", peak / MIB, scratch / MIB);
    Measured { seconds, peak, scratch, json }
}

/// A `size`-byte incompressible raw object and its qcow2, imported by boundimport from S3 onto a loop device in a
/// 600M cgroup (peak ≤ 64 MiB, nothing spooled); with `cdi_way`, also as CDI does it: the raw object through the
/// page cache with one fsync at the end (curl | dd conv=fsync), the qcow2 downloaded to a scratch file and
/// converted with `qemu-img convert -t writeback`.
fn bounded_objects(size: u64, cdi_way: bool) {
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-bounded");
    let raw = work.path().join("big.raw");
    write_raw(&raw, size, &[(0, size, Fill::Random(2026))]);
    let digest = sha256_prefix(&raw, size);
    let qcow2 = work.path().join("big.qcow2");
    run(Command::new(qemu_img()).args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    s3.put("disks", "big.raw", &raw);
    s3.put("disks", "big.qcow2", &qcow2);
    std::fs::remove_file(&raw).unwrap();
    let backing = work.path().join("volume.img");
    std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
    let device = boundimport::lab::fixtures::LoopDevice::attach(&backing, true).unwrap();
    let mut table = Vec::new();
    for object in ["big.raw", "big.qcow2"] {
        let mut command = boundimport();
        command
            .args(["--progress", "none", "--json", "--endpoint-url", &s3.endpoint()])
            .arg(format!("s3://disks/{object}"))
            .arg(device.path());
        command.envs(keys());
        let run = measure(&format!("boundimport-{object}"), &mut command, None);
        assert_eq!(sha256_prefix(device.path(), size), digest, "{object}: contents");
        let json = run.json.as_ref().unwrap();
        assert_eq!(json["spooled_bytes"], 0, "{object}: nothing spooled");
        assert!(run.peak <= 64 * MIB, "{object}: peak {} MiB in the 600M cgroup", run.peak / MIB);
        table.push((format!("boundimport {object}"), run));
    }
    if cdi_way {
        let curl = |object: &str| {
            format!(
                "curl -sSf --aws-sigv4 aws:amz:us-east-1:s3 --user {ACCESS_KEY}:{SECRET_KEY} {}/disks/{object}",
                s3.endpoint()
            )
        };
        let mut raw_copy = Command::new("sh");
        raw_copy.arg("-c").arg(format!(
            "{} | dd of={} bs=1M iflag=fullblock conv=fsync status=none",
            curl("big.raw"),
            device.path().display()
        ));
        let run = measure("cdi-raw", &mut raw_copy, None);
        assert_eq!(sha256_prefix(device.path(), size), digest, "CDI's raw copy");
        table.push(("CDI: raw, io.Copy + fsync".to_string(), run));
        let scratch = work.path().join("scratch.qcow2");
        let mut convert = Command::new("sh");
        convert.arg("-c").arg(format!(
            "{} -o {} && qemu-img convert -t writeback -p -O raw {} {} >/dev/null",
            curl("big.qcow2"),
            scratch.display(),
            scratch.display(),
            device.path().display()
        ));
        let run = measure("cdi-qcow2", &mut convert, Some(&scratch));
        assert_eq!(sha256_prefix(device.path(), size), digest, "CDI's qcow2 convert");
        table.push(("CDI: qcow2, scratch + qemu-img -t writeback".to_string(), run));
    }
    eprintln!("| {} MiB object, 600M memcg, loop device | wall | peak | scratch |", size / MIB);
    for (name, run) in &table {
        eprintln!("| {name} | {:.1} s | {} MiB | {} MiB |", run.seconds, run.peak / MIB, run.scratch / MIB);
    }
}

#[test]
fn s3_raw_and_qcow2_objects_stay_under_64_mib_in_a_600m_cgroup() {
    if !require_servers("s3_objects_stay_under_64_mib") || !require_privileged("s3_objects_stay_under_64_mib") {
        return;
    }
    bounded_objects(256 * MIB, false);
}

/// The issue's measurement: run with `cargo test --release --test objstore -- --ignored --nocapture`.
#[test]
#[ignore = "2 GiB objects: about 8 GiB of disk and a few minutes"]
fn two_gib_objects_beside_cdis_way() {
    if !require_servers("two_gib_objects_beside_cdis_way") || !require_privileged("two_gib_objects_beside_cdis_way") {
        return;
    }
    bounded_objects(2 << 30, true);
}

/// An STS endpoint that answers `AssumeRoleWithWebIdentity` for `token` and `role` with the S3 server's keys
/// (SeaweedFS has no STS of its own here); counts the calls.
fn sts_endpoint(token: &'static str, role: &'static str) -> (String, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/", listener.local_addr().unwrap().port());
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let wanted = [
                "Action=AssumeRoleWithWebIdentity".to_string(),
                format!("RoleArn={}", encode_path(role).replace('/', "%2F")),
                format!("WebIdentityToken={token}"),
            ];
            let (status, body) = if wanted.iter().all(|w| request_line.contains(w.as_str())) {
                counted.fetch_add(1, Ordering::SeqCst);
                ("200 OK", format!("<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{ACCESS_KEY}</AccessKeyId><SecretAccessKey>{SECRET_KEY}</SecretAccessKey><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"))
            } else {
                ("403 Forbidden", "<ErrorResponse><Error><Code>AccessDenied</Code><Message>bad token</Message></Error></ErrorResponse>".to_string())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, calls)
}

#[test]
fn s3_credentials_from_a_web_identity_token_exchanged_at_sts() {
    if !require_servers("s3_credentials_from_a_web_identity_token") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-irsa");
    let image = &images(work.path(), 4 * MIB)[0];
    s3.put("disks", "irsa/disk.qcow2", image);
    let role = "arn:aws:iam::123456789012:role/importer";
    let (sts, calls) = sts_endpoint("projected-token", role);
    let token_file = work.path().join("token");
    std::fs::write(&token_file, "projected-token\n").unwrap();
    let env = [
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
        ("AWS_ROLE_ARN", role),
        ("AWS_ENDPOINT_URL_STS", sts.as_str()),
    ];
    let dest = work.path().join("out.raw");
    summary(&import("s3://disks/irsa/disk.qcow2", &dest, &["--endpoint-url", &s3.endpoint()], &env), "irsa");
    let (digest, len) = qemu_reference(image, work.path());
    assert_eq!(sha256_prefix(&dest, len), digest);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one exchange, its credentials reused");
    // A token STS refuses: its error, naming the role.
    std::fs::write(&token_file, "stolen-token").unwrap();
    let line = one_line_error(&import("s3://disks/irsa/disk.qcow2", &dest, &["--endpoint-url", &s3.endpoint()], &env));
    assert!(
        line.contains("AssumeRoleWithWebIdentity") && line.contains(role) && line.contains("AccessDenied"),
        "{line}"
    );
}

#[test]
fn an_s3_import_that_stalled_resumes_from_its_checkpoint_in_the_next_run() {
    if !require_servers("an_s3_import_that_stalled_resumes") {
        return;
    }
    let s3 = Seaweed::start(false);
    let work = scratch_dir("objstore-resume");
    let size = 64 * MIB;
    let raw = work.path().join("disk.raw");
    write_raw(&raw, size, &[(0, size, Fill::Random(5))]);
    s3.put("disks", "resume/disk.raw", &raw);
    let dest = work.path().join("out.raw");
    // The first run reads through a forwarder that holds the transfer at 40 MiB until the importer gives up on
    // the stall, as a pod whose network died would. What has been written by then lies up to a range window
    // (16 MiB) and the writer's buffers behind what was received: the checkpoint is well past 0.
    let hold_at = 40 * MIB;
    let forward = CutOnce::start(s3.s3_port, hold_at);
    let start = |endpoint: &str| {
        let mut command = boundimport();
        command.args(["--progress", "none", "--json", "--resume", "--stall-timeout", "2", "--endpoint-url", endpoint]);
        command.arg("s3://disks/resume/disk.raw").arg(&dest);
        command.envs(keys()).env_remove("AWS_PROFILE");
        command.output().unwrap()
    };
    let failed = start(&format!("http://127.0.0.1:{}", forward.port));
    let line = one_line_error(&failed);
    assert!(line.contains("stalled") && line.contains("s3://disks/resume/disk.raw"), "{line}");
    forward.go_on();
    // The next run, straight to the gateway, continues from the last checkpoint: the object's ETag is the same.
    let json = summary(&start(&s3.endpoint()), "resumed");
    let resumed_at = json["resumed_at"].as_u64().unwrap();
    assert!(resumed_at > 0 && resumed_at <= hold_at, "{json}");
    assert!(json["downloaded_bytes"].as_u64().unwrap() < size, "{json}");
    assert_eq!(sha256_prefix(&dest, size), sha256_prefix(&raw, size));
}
