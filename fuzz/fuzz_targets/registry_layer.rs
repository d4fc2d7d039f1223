//! containerDisk layers: decompression, tar walk, digest, hold-back (see `boundimport_fuzz::exercise_registry_layer`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_registry_layer(data));
