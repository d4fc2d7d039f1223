//! qcow2 images: detection, open, map and read of bounded guest windows, from a sparse image encoded in the input
//! (see `boundimport_fuzz::SparseImage`).
#![no_main]

use boundimport::format::Detected;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    boundimport_fuzz::exercise_image(data, Detected::Qcow2);
});
