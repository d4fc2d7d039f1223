//! Decompression of compressed units (qcow2 compressed clusters, vmdk grains) into a caller's buffer.
//!
//! A unit always decompresses to a known size, and the compressed input may carry trailing padding (qcow2 only
//! knows compressed sizes to the sector), so the rule is qemu's: the output must be filled exactly, trailing input
//! is ignored.

use super::Codec;
use crate::error::{Error, Result};
use std::cell::RefCell;

thread_local! {
    static INFLATER: RefCell<libdeflater::Decompressor> = RefCell::new(libdeflater::Decompressor::new());
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Largest zstd window accepted (log2): qemu writes frames whose window is at most the 2 MiB cluster size; the
/// cap keeps a hostile frame from asking for a large decoder allocation.
const ZSTD_MAX_WINDOW_LOG: u32 = 23;

/// Decompresses `input` with `codec` so that it fills `output` exactly.
pub fn decompress(codec: Codec, input: &[u8], output: &mut [u8]) -> Result<()> {
    match codec {
        Codec::Deflate | Codec::Zlib => INFLATER.with(|cell| {
            let mut inflater = cell.borrow_mut();
            let result = match codec {
                Codec::Deflate => inflater.deflate_decompress(input, output),
                _ => inflater.zlib_decompress(input, output),
            };
            match result {
                Ok(n) if n == output.len() => Ok(()),
                Ok(n) => Err(crate::bad_image!("compressed data inflates to {n} bytes instead of {}", output.len())),
                Err(e) => Err(crate::bad_image!("invalid deflate data ({e})")),
            }
        }),
        Codec::Zstd => zstd_fill(input, output),
    }
}

fn zstd_fill(input: &[u8], output: &mut [u8]) -> Result<()> {
    use zstd::zstd_safe::{self, DParameter, InBuffer, OutBuffer};
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match slot.as_mut() {
            Some(dctx) => dctx,
            None => {
                let mut dctx = zstd_safe::DCtx::create();
                dctx.set_parameter(DParameter::WindowLogMax(ZSTD_MAX_WINDOW_LOG))
                    .map_err(|code| zstd_error("configuring zstd", code))?;
                slot.insert(dctx)
            }
        };
        dctx.reset(zstd_safe::ResetDirective::SessionOnly).map_err(|code| zstd_error("resetting zstd", code))?;
        let mut inbuf = InBuffer::around(input);
        let mut outbuf = OutBuffer::around(output);
        // Like qemu: decode until the output is full; stop at the end of the frame or of the input.
        while outbuf.pos() < outbuf.capacity() {
            let before = (inbuf.pos, outbuf.pos());
            let hint = dctx
                .decompress_stream(&mut outbuf, &mut inbuf)
                .map_err(|code| zstd_error("invalid zstd data", code))?;
            if hint == 0 || (inbuf.pos, outbuf.pos()) == before {
                break;
            }
        }
        let produced = outbuf.pos();
        if produced != output.len() {
            return Err(crate::bad_image!(
                "compressed data decompresses to {produced} bytes instead of {}",
                output.len()
            ));
        }
        Ok(())
    })
}

fn zstd_error(what: &str, code: usize) -> Error {
    crate::bad_image!("{what} ({})", zstd::zstd_safe::get_error_name(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 300) as u8).collect()
    }

    #[test]
    fn deflate_with_trailing_padding() {
        let data = sample();
        let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let mut packed = vec![0u8; compressor.deflate_compress_bound(data.len())];
        let n = compressor.deflate_compress(&data, &mut packed).unwrap();
        packed.truncate(n);
        packed.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; data.len()];
        decompress(Codec::Deflate, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_with_trailing_padding() {
        let data = sample();
        let mut packed = zstd::bulk::compress(&data, 3).unwrap();
        packed.extend_from_slice(&[0u8; 511]);
        let mut out = vec![0u8; data.len()];
        decompress(Codec::Zstd, &packed, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_input_is_an_error() {
        let data = sample();
        let packed = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; data.len()];
        assert!(decompress(Codec::Zstd, &packed[..packed.len() / 2], &mut out).is_err());
        assert!(decompress(Codec::Zstd, &[0x55; 100], &mut out).is_err());
        assert!(decompress(Codec::Deflate, &[0xff; 100], &mut out).is_err());
        let mut bigger = vec![0u8; data.len() * 2];
        assert!(decompress(Codec::Zstd, &packed, &mut bigger).is_err());
    }
}
