//! Replays fuzz inputs without libFuzzer, through the fuzz targets' own harness code (`fuzz/src/lib.rs`, included
//! here): every committed seed in `fuzz/seeds/TARGET/` and every regression input in `fuzz/regressions/TARGET/`
//! (where a finding goes once its bug is fixed). So `cargo test` checks the harness invariants on real images and
//! keeps every finding fixed, while the fuzzing itself stays in its own workspace.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use boundimport::format::Detected;
use std::path::Path;

/// Runs every file under `fuzz/{seeds,regressions}/target/` through `run`; returns how many there were.
fn replay(target: &str, run: impl Fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
            assert!(result.is_ok(), "{} panicked", path.display());
            count += 1;
        }
    }
    count
}

#[test]
fn every_fuzz_seed_and_regression_input_runs_clean() {
    let images = [
        ("image_qcow2", Detected::Qcow2),
        ("image_vmdk", Detected::Vmdk),
        ("image_vhd", Detected::Vhd),
        ("image_vhdx", Detected::Vhdx),
        ("image_vdi", Detected::Vdi),
        ("image_raw", Detected::Raw),
    ];
    for (target, family) in images {
        let n = replay(target, |data| harness::exercise_image(data, family.clone()));
        assert!(n > 0, "no inputs for {target}");
    }
    assert!(replay("qcow2_header", harness::exercise_qcow2_header) > 0);
    assert!(replay("decompress", harness::exercise_decompress) > 0);
    assert!(replay("stream_decompress", harness::exercise_stream_decompress) > 0);
    assert!(replay("registry_manifest", harness::exercise_registry_manifest) > 0);
    assert!(replay("registry_layer", harness::exercise_registry_layer) > 0);
}

#[test]
fn seeds_open_as_their_format() {
    // The seeds must reach the parsers they are for, or the fuzzer starts from nothing.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (target, family) in [
        ("image_qcow2", Detected::Qcow2),
        ("image_vhd", Detected::Vhd),
        ("image_vhdx", Detected::Vhdx),
        ("image_vdi", Detected::Vdi),
    ] {
        for entry in std::fs::read_dir(root.join(target)).unwrap() {
            let path = entry.unwrap().path();
            let image = harness::SparseImage::decode(&std::fs::read(&path).unwrap());
            assert_eq!(boundimport::format::detect(&image).unwrap(), family, "{}", path.display());
        }
    }
}
