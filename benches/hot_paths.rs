//! Criterion benchmarks of the per-byte hot paths of an import: zero detection on every buffer, SHA-256 of the
//! written image, decompression of compressed clusters, and qcow2 guest-to-file mapping.
//!
//! `cargo bench --bench hot_paths`; the qcow2 mapping bench builds its image with qemu-img and is left out
//! (with a message) when qemu-img is missing.

use boundimport::checksum::{Algorithm, Hasher};
use boundimport::format::codec::decompress;
use boundimport::format::{self, BackingPolicy, Codec};
use boundimport::sink::is_zero;
use boundimport::source::{FileSource, ReadAt};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// The pipeline's chunk size at CDI's 600M budget.
const CHUNK: usize = 2 << 20;
/// qcow2's default cluster size: the unit a compressed cluster inflates to.
const CLUSTER: usize = 64 << 10;

/// Deterministic bytes: `entropy` of every 8 bytes random, the rest zeros, so the data compresses like a
/// typical disk (some text and code, some zeros) rather than like either extreme.
fn sample(len: usize, entropy: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = entropy.min(chunk.len());
        chunk[..n].copy_from_slice(&state.to_le_bytes()[..n]);
    }
    out
}

fn zero_detection(c: &mut Criterion) {
    let mut group = c.benchmark_group("is_zero");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    let zeros = vec![0u8; CHUNK];
    let mut last_set = zeros.clone();
    last_set[CHUNK - 1] = 1;
    group.bench_function("2MiB all zero", |b| b.iter(|| is_zero(black_box(&zeros))));
    group.bench_function("2MiB last byte set", |b| b.iter(|| is_zero(black_box(&last_set))));
    group.finish();
}

fn sha256(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    let data = sample(CHUNK, 8);
    group.bench_function("2MiB", |b| {
        b.iter(|| {
            let mut hasher = Hasher::new(Algorithm::Sha256);
            hasher.update(black_box(&data));
            hasher.finish()
        })
    });
    group.finish();
}

fn decompression(c: &mut Criterion) {
    let mut group = c.benchmark_group("decompress");
    group.throughput(Throughput::Bytes(CLUSTER as u64));
    let data = sample(CLUSTER, 3);
    let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut deflated = vec![0u8; compressor.deflate_compress_bound(data.len())];
    let n = compressor.deflate_compress(&data, &mut deflated).expect("deflate compresses");
    deflated.truncate(n);
    let zstd = zstd::bulk::compress(&data, 3).expect("zstd compresses");
    let mut out = vec![0u8; CLUSTER];
    for (codec, input) in [(Codec::Deflate, &deflated), (Codec::Zstd, &zstd)] {
        group.bench_with_input(BenchmarkId::new(format!("{codec:?}"), "64KiB cluster"), input, |b, input| {
            b.iter(|| decompress(codec, black_box(input), &mut out).expect("decompresses"))
        });
    }
    group.finish();
}

/// Virtual size of the mapping bench's image: 8 GiB of 64 KiB clusters, 131072 L2 entries.
const MAP_VIRTUAL: u64 = 8 << 30;
/// Guest range the scheduler asks the format for at a time.
const MAP_STEP: u64 = 64 << 20;

fn qcow2_mapping(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("metadata.qcow2");
    if let Err(why) = make_preallocated_qcow2(&path) {
        eprintln!("skipping qcow2 mapping bench: {why}");
        return;
    }
    let source: Arc<dyn ReadAt> = Arc::new(FileSource::open(&path).expect("opens the image"));
    let mut group = c.benchmark_group("qcow2_map");
    group.throughput(Throughput::Elements(MAP_VIRTUAL / CLUSTER as u64));
    group.bench_function("8GiB all clusters allocated", |b| {
        b.iter(|| {
            // A fresh open each time, so L2 tables are read and decoded rather than served from a warm cache.
            let mut image = format::open(source.clone(), &BackingPolicy::default()).expect("opens qcow2");
            let mut extents = Vec::new();
            let mut offset = 0;
            while offset < MAP_VIRTUAL {
                image.map(offset, MAP_STEP, &mut extents).expect("maps");
                offset += MAP_STEP;
            }
            extents.len()
        })
    });
    group.finish();
}

/// An 8 GiB qcow2 whose every cluster is allocated (metadata preallocation): mapping it decodes every L2 entry.
fn make_preallocated_qcow2(path: &Path) -> Result<(), String> {
    let status = Command::new(std::env::var_os("QEMU_IMG").unwrap_or_else(|| "qemu-img".into()))
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"])
        .arg(path)
        .arg(MAP_VIRTUAL.to_string())
        .status()
        .map_err(|e| format!("running qemu-img: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("qemu-img create failed ({status})"))
    }
}

criterion_group!(benches, zero_detection, sha256, decompression, qcow2_mapping);
criterion_main!(benches);
