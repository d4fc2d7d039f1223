//! The importer image in a real container runtime: `scripts/build-image` builds it offline (a static musl binary,
//! FROM scratch, uid 107) and `scripts/container-test` runs it under podman with runc as a CDI importer pod runs
//! (600m memory limit, uid 107, no capabilities, read-only root, CDI's environment, termination log, metrics
//! port), onto a /data volume and onto a loop device as /dev/cdi-block-volume. Needs root, podman and runc.

mod common;

use common::prereq;
use common::privileged::require_privileged;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The tag both scripts use by default.
const IMAGE: &str = "localhost/boundimport-importer:dev";

/// Whether the container test can run: root and a memory cgroup, podman and runc, and the static build's musl
/// toolchain (the Rust target and musl-gcc); skips (or, when privileges are required, fails) naming what is missing.
fn require_runtime(test: &str) -> bool {
    require_privileged(test)
        && prereq::require(test, &[prereq::PODMAN, prereq::RUNC, prereq::MUSL_TARGET, prereq::MUSL_GCC])
}

fn script(name: &str) -> Command {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name))
}

/// Runs `cmd` with a hang guard, echoing its output; returns stdout and whether it succeeded.
fn run_script(cmd: Command, limit_seconds: u64) -> (bool, String) {
    let mut guarded = Command::new("timeout");
    guarded.arg("--kill-after=10").arg(limit_seconds.to_string()).arg(cmd.get_program()).args(cmd.get_args());
    let output = guarded.output().unwrap_or_else(|e| panic!("running {:?}: {e}", cmd.get_program()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    (output.status.success(), stdout)
}

/// Builds the image once for every test here; the build's summary line.
fn built_image() -> &'static str {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT.get_or_init(|| {
        let (ok, stdout) = run_script(script("build-image"), 3600);
        assert!(ok, "scripts/build-image failed");
        stdout.lines().find(|l| l.starts_with("built ")).expect("no summary line from build-image").to_string()
    })
}

fn inspect(format: &str) -> String {
    let output = Command::new("podman").args(["image", "inspect", "--format", format, IMAGE]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn the_importer_image_builds_offline_from_scratch_as_uid_107() {
    if !require_runtime("the_importer_image_builds_offline_from_scratch_as_uid_107") {
        return;
    }
    eprintln!("{}", built_image());
    assert_eq!(inspect("{{.Config.User}}"), "107:107");
    assert_eq!(inspect("{{json .Config.Entrypoint}}"), r#"["/usr/bin/boundimport","cdi","-alsologtostderr"]"#);
    // FROM scratch: the one layer is ours, holding the binary and the CA bundle and nothing else.
    assert_eq!(inspect("{{len .RootFS.Layers}}"), "1");
    let container = format!("boundimport-ct-list-{}", std::process::id());
    let created = Command::new("podman").args(["create", "--name", &container, IMAGE]).output().unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let exported = Command::new("sh")
        .arg("-c")
        .arg(format!("podman export {container} | tar -t | grep -v '/$' | sort"))
        .output()
        .unwrap();
    let _ = Command::new("podman").args(["rm", "-f", &container]).output();
    let files = String::from_utf8_lossy(&exported.stdout);
    let mut regular: Vec<&str> = files.lines().filter(|f| !f.is_empty()).collect();
    // podman's own mount points (/etc/hosts and the like) appear as empty files in an export.
    regular.retain(|f| !matches!(*f, "etc/hosts" | "etc/hostname" | "etc/resolv.conf" | "run/.containerenv"));
    assert_eq!(regular, ["etc/ssl/certs/ca-certificates.crt", "usr/bin/boundimport"], "{files}");
}

#[test]
fn the_importer_image_imports_like_a_cdi_pod_under_podman() {
    if !require_runtime("the_importer_image_imports_like_a_cdi_pod_under_podman") {
        return;
    }
    eprintln!("{}", built_image());
    let mut test = script("container-test");
    test.args(["--image", IMAGE]);
    // Generous: the 1 GiB run alone takes about 36 s at 30 MB/s.
    let (ok, stdout) = run_script(test, 1200);
    assert!(ok, "scripts/container-test failed");
    let results: Vec<&str> = stdout.lines().filter(|l| l.starts_with("RESULT ")).collect();
    assert_eq!(results.len(), 2, "{stdout}");
}
