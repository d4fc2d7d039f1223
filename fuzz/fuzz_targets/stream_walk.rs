//! The forward-only walkers (qcow2, vmdk, vhd, vdi, vhdx read front to back) on a sparse image (see
//! `boundimport_fuzz::exercise_stream_walk`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| boundimport_fuzz::exercise_stream_walk(data));
