//! The qcow2 header parser alone (see `boundimport_fuzz::exercise_qcow2_header`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_qcow2_header(data));
