//! boundimport needs no privilege: run as uid/gid 65534 (nobody) with an empty capability set, it imports into a
//! file it may write and onto a loop device chowned to it, byte-identical to qemu-img. Needs root to set up the
//! device and switch user.

mod common;

use boundimport::lab::fixtures::LoopDevice;
use common::privileged::require_privileged;
use common::{Workbench, MIB};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// nobody / nogroup.
const NOBODY: u32 = 65534;

/// Runs boundimport as nobody through a shell that first prints its capability sets, which `exec` keeps.
/// Returns the capability lines and the output.
fn import_as_nobody(source: &Path, dest: &Path) -> (String, std::process::Output) {
    let output = common::run_any(
        Command::new("sh")
            .arg("-c")
            .arg("grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; exec \"$@\"")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_boundimport"))
            .arg("--quiet")
            .arg(source)
            .arg(dest)
            .uid(NOBODY)
            .gid(NOBODY),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let caps = stdout.lines().filter(|l| l.starts_with("Cap")).collect::<Vec<_>>().join("\n");
    (caps, output)
}

/// Asserts every capability set is empty.
fn assert_no_capabilities(caps: &str) {
    assert_eq!(caps.lines().count(), 4, "{caps}");
    for line in caps.lines() {
        assert!(line.ends_with("0000000000000000"), "a capability is set: {line}");
    }
}

#[test]
fn imports_as_nobody_without_capabilities() {
    if !require_privileged("imports_as_nobody_without_capabilities") {
        return;
    }
    let bench = Workbench::new("unprivileged");
    std::fs::set_permissions(bench.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = bench.qcow2_mix("image.qcow2", 24 * MIB, "", &["-c"]);
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (want, len) = common::qemu_reference(&image, bench.dir.path());

    // Into a file in a directory nobody owns.
    let out_dir = bench.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::os::unix::fs::chown(&out_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let dest = out_dir.join("disk.raw");
    let (caps, output) = import_as_nobody(&image, &dest);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_no_capabilities(&caps);
    assert_eq!(common::sha256_prefix(&dest, len), want);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&dest).unwrap().uid(), NOBODY);

    // Onto a loop device chowned to nobody, filled with garbage first so every byte must be written or zeroed.
    let backing = bench.path("disk.img");
    std::fs::write(&backing, vec![0xa5u8; (32 * MIB) as usize]).unwrap();
    let device = LoopDevice::attach(&backing, true).unwrap();
    std::os::unix::fs::chown(device.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let (caps, output) = import_as_nobody(&image, device.path());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_no_capabilities(&caps);
    assert_eq!(common::sha256_prefix(device.path(), len), want);

    // And nobody cannot write where it has no permission: a plain error, not a crash or a partial success.
    let root_only = bench.path("root-only");
    std::fs::create_dir(&root_only).unwrap();
    let (_, output) = import_as_nobody(&image, &root_only.join("disk.raw"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied") && stderr.trim().lines().count() == 1, "{stderr}");
}
