//! Shared code of boundimport's fuzz targets: an in-memory sparse image decoded from the fuzzer's input, and the
//! driver that opens it through `boundimport::format::open` and reads bounded guest windows through the real
//! map-and-fill path, checking the invariants the pipeline relies on.
//!
//! # Input encoding
//!
//! Disk images are mostly zeros (a vhdx keeps its metadata 1 MiB apart; a vhd or vdi block is 1-2 MiB), so the
//! input describes a sparse file instead of spelling out every byte:
//!
//! ```text
//! u64 BE   claimed file length (the source's len(); may be far larger than the records)
//! repeat:  u32 BE byte offset, u16 BE length, that many bytes      (later records overwrite earlier ones)
//! ```
//!
//! Bytes no record covers read as zeros; reads stop at the claimed length. `scripts/fuzz seeds` encodes real
//! qemu-img images this way (`fuzz/encode.py`).

use boundimport::error::Result;
use boundimport::format::qcow2::header;
use boundimport::format::{self, BackingPolicy, Codec, Content, Detected, Extent};
use boundimport::pipeline::fill::{self, Scratch};
use boundimport::source::ReadAt;
use std::sync::Arc;

/// Largest claimed file length honoured (1 TiB): big enough to place tables anywhere a 32-bit offset reaches and
/// far beyond, small enough that `u64` arithmetic on it cannot overflow by accident in the harness.
pub const MAX_FILE_LEN: u64 = 1 << 40;

/// Most records decoded from one input.
pub const MAX_RECORDS: usize = 256;

/// A sparse file held as records over zeros.
pub struct SparseImage {
    len: u64,
    records: Vec<(u64, Vec<u8>)>,
}

impl SparseImage {
    /// Decodes the input encoding described in the crate docs. A truncated last record keeps the bytes present.
    pub fn decode(data: &[u8]) -> SparseImage {
        let (claimed, mut rest) = match data.split_first_chunk::<8>() {
            Some((len, rest)) => (u64::from_be_bytes(*len) % (MAX_FILE_LEN + 1), rest),
            None => (0, &[][..]),
        };
        let mut records = Vec::new();
        let mut end = 0u64;
        while records.len() < MAX_RECORDS {
            let Some((head, tail)) = rest.split_first_chunk::<6>() else { break };
            let offset = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
            let len = usize::from(u16::from_be_bytes([head[4], head[5]])).min(tail.len());
            let (bytes, tail) = tail.split_at(len);
            end = end.max(offset + len as u64);
            records.push((offset, bytes.to_vec()));
            rest = tail;
        }
        // The claimed length wins when it is larger; records past it are cut off by reads.
        SparseImage { len: if claimed == 0 { end } else { claimed }, records }
    }

    /// Encodes `bytes` as a sparse image (the inverse of [`decode`](Self::decode) for seeds): 512-byte blocks
    /// that are all zero are left out.
    pub fn encode(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u64).to_be_bytes().to_vec();
        let mut at = 0;
        while at < bytes.len() {
            let block = &bytes[at..(at + 512).min(bytes.len())];
            if block.iter().all(|&b| b == 0) {
                at += 512;
                continue;
            }
            let start = at;
            while at < bytes.len() && at - start < 32768 {
                let block = &bytes[at..(at + 512).min(bytes.len())];
                if block.iter().all(|&b| b == 0) {
                    break;
                }
                at += block.len();
            }
            out.extend_from_slice(&(start as u32).to_be_bytes());
            out.extend_from_slice(&((at - start) as u16).to_be_bytes());
            out.extend_from_slice(&bytes[start..at]);
        }
        out
    }
}

impl ReadAt for SparseImage {
    fn name(&self) -> &str {
        "fuzz.img"
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64) as usize;
        let out = &mut buf[..n];
        out.fill(0);
        let end = offset + n as u64;
        for (at, bytes) in &self.records {
            let from = (*at).max(offset);
            let to = (*at + bytes.len() as u64).min(end);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        Ok(n)
    }
}

/// Guest bytes read per window; windows are placed at the start, the end, the middle and at input-derived offsets.
pub const WINDOW: u64 = 256 << 10;

/// Opens the sparse image in `data`; if it is detected as `family`, maps and reads bounded guest windows. Errors
/// are expected (the input is hostile); panics, hangs, overflows and huge allocations are the findings.
pub fn exercise_image(data: &[u8], family: Detected) {
    let image = SparseImage::decode(data);
    match format::detect(&image) {
        Ok(found) if found == family => {}
        _ => return,
    }
    let source: Arc<dyn ReadAt> = Arc::new(image);
    let Ok(mut image) = format::open(source, &BackingPolicy::default()) else {
        return;
    };
    let size = image.virtual_size();
    if size == 0 {
        return;
    }
    let sources = image.sources();
    let mut seed = data
        .iter()
        .rev()
        .take(16)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut starts = vec![0, size.saturating_sub(WINDOW), (size / 2) & !511];
    for _ in 0..2 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        starts.push((seed >> 11) % size);
    }
    let mut extents = Vec::new();
    let mut buf = vec![0u8; WINDOW as usize];
    let mut scratch = Scratch::default();
    for start in starts {
        let len = (size - start).min(WINDOW - (start % 4096));
        extents.clear();
        if image.map(start, len, &mut extents).is_err() {
            return;
        }
        check_tiling(&extents, start, len, sources.len());
        let _ = fill::fill(&sources, &extents, start, &mut buf[..len as usize], &mut scratch);
    }
}

/// Asserts what the pipeline relies on from `Image::map`: extents in order, non-empty, exactly covering
/// `[start, start + len)`, naming existing sources, with source offsets and compressed slices that do not
/// overflow.
fn check_tiling(extents: &[Extent], start: u64, len: u64, sources: usize) {
    let mut cursor = start;
    for e in extents {
        assert_eq!(e.guest, cursor, "extents leave a gap or overlap: {extents:?}");
        assert!(e.len > 0, "empty extent: {extents:?}");
        cursor = e.guest.checked_add(e.len).expect("extent end overflows");
        match e.content {
            Content::Zero => {}
            Content::Data { source, offset } => {
                assert!(source < sources, "unknown source {source}");
                assert!(offset.checked_add(e.len).is_some(), "data extent overflows: {e:?}");
            }
            Content::Compressed(unit) => {
                assert!(unit.source < sources, "unknown source {}", unit.source);
                assert!(unit.skip + e.len <= unit.unit_len, "compressed slice outside its unit: {e:?}");
            }
        }
    }
    assert_eq!(cursor, start + len, "extents do not cover the window: {extents:?}");
}

/// The `qcow2_header` target: the header parser alone, on the input as the first cluster; the claimed file length
/// comes from the input's last 8 bytes (shifted by the first byte) so placement checks see short and huge files.
pub fn exercise_qcow2_header(data: &[u8]) {
    let file_len = match data.len().checked_sub(8) {
        Some(at) => u64::from_be_bytes(data[at..].try_into().expect("8 bytes")) >> (data[0] & 31),
        None => data.len() as u64,
    };
    let _ = header::peek_cluster_size(data);
    if let Ok(parsed) = header::parse(data, file_len) {
        // Everything the reader relies on after a successful parse.
        assert!((header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&parsed.cluster_bits));
        assert!(u64::from(parsed.l1_size) >= parsed.l1_entries_needed());
        assert!(u64::from(parsed.l1_size) * 8 <= header::MAX_L1_BYTES);
        if parsed.l1_size > 0 {
            assert_eq!(parsed.l1_table_offset % parsed.cluster_size(), 0);
            assert!(parsed.l1_table_offset >= parsed.cluster_size());
            assert!(parsed.l1_table_offset + u64::from(parsed.l1_size) * 8 <= file_len);
        }
    }
}

/// The `decompress` target: byte 0 picks the codec, bytes 1-3 the output size (up to 16 MiB, past any real
/// unit), the rest is the compressed input. A success must be repeatable over a dirty buffer.
pub fn exercise_decompress(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let codec = match data[0] % 3 {
        0 => Codec::Deflate,
        1 => Codec::Zlib,
        _ => Codec::Zstd,
    };
    let out_len = ((usize::from(data[1]) << 16) | (usize::from(data[2]) << 8) | usize::from(data[3])) & 0xff_ffff;
    let mut out = vec![0u8; out_len];
    if boundimport::format::codec::decompress(codec, &data[4..], &mut out).is_ok() {
        let mut again = vec![0xa5u8; out_len];
        boundimport::format::codec::decompress(codec, &data[4..], &mut again).expect("second decompression");
        assert!(out == again, "decompression is not deterministic");
    }
}

/// Most decompressed bytes read per input by the stacking target: enough to get through every layer's framing and
/// into the image, bounded so a decompression bomb costs time linear in this cap, not in its claims.
pub const MAX_STREAM_OUTPUT: usize = 8 << 20;

/// The `stream_decompress` target: gzip/xz/zstd layers around an image, unwrapped as the forward-only import does
/// (`source::decompress::unwrap_layers`, with the xz memory limit a 600M budget gets), then the innermost stream
/// peeked for format detection and read up to [`MAX_STREAM_OUTPUT`] bytes.
pub fn exercise_stream_decompress(data: &[u8]) {
    use boundimport::source::decompress::unwrap_layers;
    use std::io::Read;
    let reader = Box::new(std::io::Cursor::new(data.to_vec()));
    let memlimit = boundimport::budget::xz_memlimit(600_000_000);
    let Ok((mut stream, layers)) = unwrap_layers(reader, "fuzz.img", memlimit) else {
        return;
    };
    assert!(layers.len() <= boundimport::source::decompress::MAX_LAYERS);
    let Ok(head) = stream.peek(512) else {
        return;
    };
    let _ = format::detect::detect_bytes(head);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while total < MAX_STREAM_OUTPUT {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// Registry manifests, indexes and image configurations: parsing under every declared media type, the platform
/// choice over whatever index comes out, CDI's label mapping of whatever environment comes out (checking its
/// caps), and the `WWW-Authenticate` challenge parser on the same bytes as text.
pub fn exercise_registry_manifest(data: &[u8]) {
    use boundimport::source::registry::{client, manifest};
    for declared in [None, Some(manifest::OCI_MANIFEST), Some(manifest::OCI_INDEX), Some("application/json")] {
        if let Ok(manifest::Parsed::Index(list)) = manifest::parse(data, declared) {
            assert!(list.len() <= manifest::MAX_LAYERS);
            for arch in [None, Some("amd64"), Some("arm64"), Some("arm/v7")] {
                let wanted = manifest::Wanted::parse(arch).expect("valid architecture");
                if let Ok(chosen) = manifest::choose(&list, &wanted) {
                    assert_eq!(chosen.platform.as_ref().map(|p| p.os.as_str()), Some("linux"));
                }
            }
        }
    }
    if let Ok(config) = manifest::parse_config(data) {
        let labels = manifest::envs_to_labels(&config.env);
        assert!(labels.len() <= manifest::MAX_LABELS);
        assert!(labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= manifest::MAX_LABEL_BYTES);
        let _ = manifest::is_bootc(&config.labels);
    }
    let _ = client::parse_challenge(&String::from_utf8_lossy(data));
}

/// Most disk bytes read from one fuzz input (a small zstd frame may claim gigabytes).
const MAX_LAYER_OUTPUT: u64 = 64 << 20;

/// The image walk on arbitrary bytes as an image's only layer (its digest the true one, so the walk gets past
/// verification): compression detection, the tar walk, the disk entry's hold-back and the layer's finish. The
/// disk, if one is found, never yields more bytes than its entry says.
pub fn exercise_registry_layer(data: &[u8]) {
    use boundimport::source::registry::layers::DiskReader;
    use boundimport::source::registry::manifest::Descriptor;
    use boundimport::source::registry::{sha256_digest, BlobStore, Fetched};
    use std::io::Read;

    struct Layer(Vec<u8>);
    impl BlobStore for Layer {
        fn top(&self) -> Result<Fetched> {
            Err(boundimport::error::Error::bad_image("no manifest"))
        }
        fn manifest(&self, _: &str, _: &str) -> Result<Fetched> {
            Err(boundimport::error::Error::bad_image("no manifest"))
        }
        fn blob(&self, _: &str, _: u64) -> Result<Box<dyn Read + Send>> {
            Ok(Box::new(std::io::Cursor::new(self.0.clone())))
        }
    }
    let descriptor = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: sha256_digest(data),
        size: data.len() as i64,
        platform: None,
        annotations: Default::default(),
    };
    let Ok(disk) = DiskReader::open("fuzz", Arc::new(Layer(data.to_vec())), vec![descriptor]) else { return };
    let len = disk.len();
    let mut reader = disk.take(MAX_LAYER_OUTPUT);
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    assert!(total <= len, "the disk yielded {total} bytes, its entry says {len}");
}

/// Longest stream a walker is fed while fuzzing (the sparse image's claimed length is cut to it): a 1 TiB claim
/// read front to back would take hours, and most inputs claim far more than their records.
pub const MAX_WALK_STREAM: u64 = 8 << 20;

/// Longest stream walked for a comparison with the random-access reader (every real seed is shorter).
pub const MAX_COMPARED_STREAM: u64 = 64 << 20;

/// Largest virtual disk whose placed bytes are kept for comparison with the random-access reader.
pub const MAX_COMPARED_DISK: u64 = 64 << 20;

/// Most bytes a walk may stash (data seen before its table), as a memory spool caps them.
const MAX_STASH: u64 = 16 << 20;

/// What a forward-only walk produced: the virtual size, and the disk's bytes when it is at most
/// [`MAX_COMPARED_DISK`] (bytes no placement reached read as `None`).
pub struct Walked {
    /// The virtual size the walker announced.
    pub virtual_size: u64,
    /// Guest bytes as placed (data or zeros), with the ranges placed.
    pub disk: Option<(Vec<u8>, Vec<bool>)>,
}

/// The walker's results, checked as the pipeline's assembler relies on them: `begin` once and first, every range
/// inside the announced disk, chunk sizes honoured by nothing but the checker.
struct CheckedPlacement {
    virtual_size: Option<u64>,
    /// Whether to keep the disk (a comparison) or only check.
    keep: bool,
    disk: Option<(Vec<u8>, Vec<bool>)>,
}

impl CheckedPlacement {
    fn record(&mut self, guest: u64, len: u64, bytes: Option<&[u8]>) {
        let size = self.virtual_size.expect("placed before begin");
        let end = guest.checked_add(len).expect("placement end overflows");
        assert!(end <= size, "placed [{guest}, {end}) past the {size}-byte disk");
        if let Some((disk, placed)) = &mut self.disk {
            let (from, to) = (guest as usize, end as usize);
            match bytes {
                Some(bytes) => disk[from..to].copy_from_slice(bytes),
                None => disk[from..to].fill(0),
            }
            placed[from..to].fill(true);
        }
    }
}

impl format::stream::Placement for CheckedPlacement {
    fn chunk(&self) -> u64 {
        64 << 10
    }
    fn begin(&mut self, virtual_size: u64) -> Result<()> {
        assert!(self.virtual_size.is_none(), "begin called twice");
        self.virtual_size = Some(virtual_size);
        if self.keep && virtual_size <= MAX_COMPARED_DISK {
            self.disk = Some((vec![0; virtual_size as usize], vec![false; virtual_size as usize]));
        }
        Ok(())
    }
    fn data(&mut self, guest: u64, bytes: &[u8]) -> Result<bool> {
        self.record(guest, bytes.len() as u64, Some(bytes));
        Ok(true)
    }
    fn zero(&mut self, guest: u64, len: u64) -> Result<()> {
        self.record(guest, len, None);
        Ok(())
    }
    fn has_buffer(&self, _: u64) -> bool {
        true
    }
    fn finish(&mut self) -> Result<()> {
        assert!(self.virtual_size.is_some(), "finish before begin");
        Ok(())
    }
}

/// A memory stash capped at [`MAX_STASH`], as the pipeline's spool is without a scratch directory.
#[derive(Default)]
struct MemoryStash {
    kept: std::collections::BTreeMap<u64, Vec<u8>>,
    bytes: u64,
}

impl format::stream::Stash for MemoryStash {
    fn put(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        if self.bytes + bytes.len() as u64 > MAX_STASH {
            return Err(boundimport::error::Error::bad_image("stash full"));
        }
        self.bytes += bytes.len() as u64;
        self.kept.insert(at, bytes.to_vec());
        Ok(())
    }
    fn get(&self, at: u64, out: &mut [u8]) -> Result<bool> {
        let end = at + out.len() as u64;
        let mut cursor = at;
        for (&from, bytes) in self.kept.range(..end) {
            let to = from + bytes.len() as u64;
            if to <= cursor || from > cursor {
                continue;
            }
            let n = (to.min(end) - cursor) as usize;
            let skip = (cursor - from) as usize;
            out[(cursor - at) as usize..(cursor - at) as usize + n].copy_from_slice(&bytes[skip..skip + n]);
            cursor += n as u64;
        }
        Ok(cursor == end)
    }
    fn kept(&self) -> u64 {
        self.bytes
    }
}

/// A sparse image read front to back, cut at `limit`.
struct Forward {
    image: SparseImage,
    pos: u64,
    limit: u64,
}

impl std::io::Read for Forward {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.image.len.min(self.limit).saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        let got = self.image.read_at(self.pos, &mut buf[..n]).map_err(std::io::Error::other)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// The `stream_walk` target: the sparse image in `data` read front to back by the walker its first sector
/// selects, as the forward-only import does (qcow2, streamOptimized and monolithicSparse vmdk, dynamic vhd, vdi,
/// vhdx). Errors are expected; panics, placements outside the disk, a second `begin` and huge allocations are the
/// findings.
pub fn exercise_stream_walk(data: &[u8]) {
    walk(data, MAX_WALK_STREAM, false);
}

/// [`exercise_stream_walk`] for a comparison: a longer stream, and what a successful walk placed.
pub fn walk_for_comparison(data: &[u8]) -> Option<Walked> {
    walk(data, MAX_COMPARED_STREAM, true)
}

fn walk(data: &[u8], limit: u64, keep: bool) -> Option<Walked> {
    use boundimport::format::{qcow2, vdi, vhd, vhdx, vmdk};
    let image = SparseImage::decode(data);
    let mut head = [0u8; 512];
    let got = image.read_at(0, &mut head).ok()?;
    let head = &head[..got];
    let family = format::detect::detect_bytes(head);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut reader = Forward { image, pos: 0, limit };
    let mut place = CheckedPlacement { virtual_size: None, keep, disk: None };
    let mut stash = MemoryStash::default();
    let name = "fuzz.img";
    let walked = match family {
        Detected::Qcow2 => {
            qcow2::stream::walk(&mut reader, name, &mut stash, &mut place, &stop).map(|s| s.virtual_size)
        }
        Detected::Vmdk if vmdk::stream::is_stream_optimized(head) => {
            vmdk::stream::walk(&mut reader, name, &mut place, &stop)
        }
        Detected::Vmdk if vmdk::sparse_stream::is_sparse(head) => {
            vmdk::sparse_stream::walk(&mut reader, name, &mut stash, &mut place, &stop).map(|(size, _)| size)
        }
        Detected::Vhd => vhd::walk_stream(&mut reader, name, &mut stash, &mut place, &stop).map(|(size, _)| size),
        Detected::Vdi => vdi::walk_stream(&mut reader, name, &mut stash, &mut place, &stop).map(|(size, _)| size),
        Detected::Vhdx => vhdx::stream::walk(&mut reader, name, &mut stash, &mut place, &stop).map(|(size, _)| size),
        _ => return None,
    };
    let virtual_size = walked.ok()?;
    assert_eq!(place.virtual_size, Some(virtual_size), "the walk returned a size it did not announce");
    Some(Walked { virtual_size, disk: place.disk })
}

/// The disk the random-access reader makes of the sparse image in `data`, when it is at most
/// [`MAX_COMPARED_DISK`]: what a successful walk of a real image must equal.
pub fn read_whole(data: &[u8]) -> Option<Vec<u8>> {
    let source: Arc<dyn ReadAt> = Arc::new(SparseImage::decode(data));
    let mut image = format::open(source, &BackingPolicy::default()).ok()?;
    let size = image.virtual_size();
    if size > MAX_COMPARED_DISK {
        return None;
    }
    let sources = image.sources();
    let mut disk = vec![0u8; size as usize];
    let mut scratch = Scratch::default();
    for (window, start) in disk.chunks_mut(WINDOW as usize).zip((0..size).step_by(WINDOW as usize)) {
        let mut extents = Vec::new();
        image.map(start, window.len() as u64, &mut extents).ok()?;
        fill::fill(&sources, &extents, start, window, &mut scratch).ok()?;
    }
    Some(disk)
}
