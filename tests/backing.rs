//! The backing-file policy through the binary: `--allow-backing` follows a chain inside the image's directory
//! only; names that climb out with `..`, absolute names and symlinks pointing elsewhere need
//! `--allow-backing-outside` as well; protocol names are never followed (see also `malformed.rs`).

mod common;

use common::{boundimport, run_any, Workbench, MIB};
use std::path::Path;
use std::process::Output;

/// `boundimport --quiet ARGS SOURCE DEST`.
fn import(args: &[&str], source: &Path, dest: &Path) -> Output {
    run_any(boundimport().arg("--quiet").args(args).arg(source).arg(dest))
}

/// Asserts a successful import whose output hashes like qemu-img's conversion of `image`.
fn assert_imported(output: &Output, image: &Path, dest: &Path, scratch: &Path) {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (want, len) = common::qemu_reference(image, scratch);
    assert_eq!(common::sha256_prefix(dest, len), want, "{}", image.display());
}

/// Asserts a refusal (exit 1, one line) containing `needle`.
fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn backing_chains_stay_in_the_image_directory_unless_allowed_outside() {
    let bench = Workbench::new("backing-policy");
    let images = bench.path("images");
    let outside = bench.path("outside");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    bench.raw_mix("images/base.raw", 4 * MIB, 1);
    bench.raw_mix("images/sub/deep.raw", 4 * MIB, 2);
    bench.raw_mix("outside/base.raw", 4 * MIB, 3);
    std::os::unix::fs::symlink("../outside/base.raw", images.join("link.raw")).unwrap();
    let outside_abs = outside.join("base.raw");
    let cases = [
        ("inside.qcow2", "base.raw".to_string(), None),
        ("inside-sub.qcow2", "sub/../sub/deep.raw".to_string(), None),
        ("dotdot.qcow2", "../outside/base.raw".to_string(), Some("the image's directory")),
        ("symlink.qcow2", "link.raw".to_string(), Some("outside the image's directory")),
        ("absolute.qcow2", outside_abs.display().to_string(), Some("absolute path")),
    ];
    for (name, backing, refusal) in cases {
        let image = images.join(name);
        common::run(
            std::process::Command::new(common::qemu_img())
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
                .arg(&image)
                .current_dir(&images),
        );
        bench.write(&format!("images/{name}"), common::Fill::Random(9), MIB, 64 * 1024);
        let dest = bench.path(&format!("{name}.out"));
        let without = import(&[], &image, &dest);
        assert_refused(&without, "pass --allow-backing");
        let allowed = import(&["--allow-backing"], &image, &dest);
        match refusal {
            None => assert_imported(&allowed, &image, &dest, bench.dir.path()),
            Some(needle) => {
                assert_refused(&allowed, needle);
                assert_refused(&allowed, "--allow-backing-outside");
                let outside = import(&["--allow-backing", "--allow-backing-outside"], &image, &dest);
                assert_imported(&outside, &image, &dest, bench.dir.path());
            }
        }
    }
}

#[test]
fn allow_backing_outside_needs_allow_backing() {
    let output = run_any(boundimport().args(["--allow-backing-outside", "a.qcow2", "b.raw"]));
    assert_eq!(output.status.code(), Some(2), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn bare_relative_names_resolve_beside_the_image() {
    // Run from inside the image's directory with a bare SOURCE name: the image's directory is ".", so backing
    // files and vmdk extent files named in it are found (not "cannot resolve :").
    let bench = Workbench::new("bare-names");
    bench.raw_mix("base.raw", 4 * MIB, 4);
    common::run(
        std::process::Command::new(common::qemu_img())
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "overlay.qcow2"])
            .current_dir(bench.dir.path()),
    );
    bench.write("overlay.qcow2", common::Fill::Random(12), MIB, 64 * 1024);
    let raw = bench.raw_mix("content.raw", 8 * MIB, 6);
    for subformat in ["twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat"] {
        let name = format!("{subformat}.vmdk");
        common::run(
            std::process::Command::new(common::qemu_img())
                .args(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", &format!("subformat={subformat}")])
                .arg(&raw)
                .arg(&name)
                .current_dir(bench.dir.path()),
        );
    }
    let cases = [
        ("overlay.qcow2", vec!["--allow-backing"]),
        ("twoGbMaxExtentSparse.vmdk", vec![]),
        ("monolithicFlat.vmdk", vec![]),
        ("twoGbMaxExtentFlat.vmdk", vec![]),
    ];
    for (name, flags) in cases {
        let dest = format!("{name}.out");
        let output =
            run_any(boundimport().arg("--quiet").args(&flags).arg(name).arg(&dest).current_dir(bench.dir.path()));
        assert_imported(&output, &bench.path(name), &bench.path(&dest), bench.dir.path());
    }
}
