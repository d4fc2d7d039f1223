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
fn replay(target: &str, mut run: impl FnMut(&[u8])) -> usize {
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
    for target in ["image_qcow2", "image_vmdk", "image_vhd", "image_vhdx", "image_vdi"] {
        replay(target, harness::exercise_stream_walk);
    }
    replay("stream_walk", harness::exercise_stream_walk);
}

#[test]
fn every_image_seed_walks_forward_to_what_the_random_reader_reads() {
    // The stream_walk target's seeds are the image targets'; a real image walked front to back must place exactly
    // the disk the random-access reader reads, and every walker must get through at least one with data in it.
    let mut walked = std::collections::BTreeMap::new();
    for (target, family) in [
        ("image_qcow2", "qcow2"),
        ("image_vmdk", "vmdk"),
        ("image_vhd", "vhd"),
        ("image_vhdx", "vhdx"),
        ("image_vdi", "vdi"),
    ] {
        replay(target, |data| {
            let Some(walk) = harness::walk_for_comparison(data) else { return };
            let (Some((disk, placed)), Some(whole)) = (walk.disk, harness::read_whole(data)) else { return };
            assert_eq!(disk.len(), whole.len(), "{target}: the walk's disk size");
            let differs = (0..disk.len()).find(|&i| (if placed[i] { disk[i] } else { 0 }) != whole[i]);
            assert_eq!(differs, None, "{target}: the walk and the random-access reader differ at this offset");
            let data_bytes = whole.iter().filter(|&&b| b != 0).count();
            *walked.entry(family).or_insert(0) += usize::from(data_bytes > 0);
        });
    }
    for family in ["qcow2", "vmdk", "vhd", "vhdx", "vdi"] {
        assert!(walked.get(family).copied().unwrap_or(0) > 0, "no {family} seed with data walked: {walked:?}");
    }
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
