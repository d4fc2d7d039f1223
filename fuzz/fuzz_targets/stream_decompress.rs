//! Decompression stacking: gzip/xz/zstd/bzip2/zip layers unwrapped as a forward-only import does (see
//! `boundimport_fuzz::exercise_stream_decompress`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_stream_decompress(data));
