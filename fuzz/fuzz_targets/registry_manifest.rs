//! containerDisk manifests, indexes and configurations (see `boundimport_fuzz::exercise_registry_manifest`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_registry_manifest(data));
