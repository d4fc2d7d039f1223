//! Compressed-cluster and grain decompression (`codec::decompress`): the first byte picks the codec, the next
//! three the output size (up to 16 MiB, past any real unit), the rest is the compressed input.
#![no_main]

use boundimport::format::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let codec = match data[0] % 3 {
        0 => Codec::Deflate,
        1 => Codec::Zlib,
        _ => Codec::Zstd,
    };
    let out_len = (usize::from(data[1]) << 16 | usize::from(data[2]) << 8 | usize::from(data[3])) & 0xff_ffff;
    let mut out = vec![0u8; out_len];
    if boundimport::codec::decompress(codec, &data[4..], &mut out).is_ok() {
        // Deterministic: a second run over a dirty buffer gives the same bytes.
        let mut again = vec![0xa5u8; out_len];
        boundimport::codec::decompress(codec, &data[4..], &mut again).expect("second decompression");
        assert!(out == again, "decompression is not deterministic");
    }
});
