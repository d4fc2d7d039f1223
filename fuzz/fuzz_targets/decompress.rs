//! Compressed-cluster and grain decompression, `codec::decompress` (see `boundimport_fuzz::exercise_decompress`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_decompress(data));
