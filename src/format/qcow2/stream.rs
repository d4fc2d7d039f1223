//! qcow2 read forward only (a qcow2.xz, or a server without Range): the header, then every cluster as it passes.
//!
//! Nothing is read twice. The header names the L1 table and the refcount table; when the stream reaches the L1
//! table, its entries name the L2 tables; each L2 table, when reached, maps its guest clusters to host offsets
//! still ahead (data goes straight into its guest chunk as it passes) or says they read as zeros. Bytes that pass
//! before anything names them are spooled by stream offset ([`Stash`]) in case a table read later points back at
//! them; once the L1 table and every L2 table it names have passed, unnamed bytes are dropped. qemu-img writes
//! tables before the data they map, so its images never spool. Header and table parsing are the random-access
//! reader's ([`header`], [`table`]).

use super::header::{self, Header};
use super::table::{
    check_l2_clear_of_l1, decode_l1, decode_l2, subcluster_state, Cluster, Layout, Subcluster, SUBCLUSTERS,
};
use crate::error::{Error, Result};
use crate::format::codec;
use crate::format::stream::{Placement, Stash};
use crate::source::sequential::{read_full, stream_error};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest refcount table whose entries are read (to skip the refcount blocks it names).
const MAX_REFCOUNT_TABLE: u64 = 8 << 20;

/// Bytes read from the stream at a time.
const WINDOW: usize = 1 << 20;

/// Most host ranges the walk waits for at once. Contiguous data clusters merge into one range, so images whose
/// tables come first (preallocated metadata) stay small; an image naming more scattered clusters ahead of the
/// stream than this would need unbounded bookkeeping, and is refused (about 100 bytes a range).
const MAX_PENDING_RANGES: usize = 256 << 10;

/// What a host range is needed for.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The L1 table.
    L1,
    /// The L2 table named by this L1 entry.
    L2(u64),
    /// The refcount table (its entries name refcount blocks, which are never needed).
    RefcountTable,
    /// Guest bytes stored verbatim, starting at this guest offset.
    Data(u64),
    /// A compressed cluster decompressing to the guest cluster at this offset.
    Compressed(u64),
}

/// A host range the import needs, and what it collected of it so far.
struct Need {
    start: u64,
    len: u64,
    target: Target,
    /// Bytes of it received.
    got: u64,
    /// The bytes, for tables and compressed clusters (data goes straight to its chunk).
    bytes: Vec<u8>,
}

/// A piece kept in the spool for want of a chunk buffer.
#[derive(Debug, Clone, Copy)]
enum Deferred {
    /// Host `[host, host + len)` holds guest bytes from `guest`.
    Data { host: u64, guest: u64, len: u64 },
    /// Host `[host, host + len)` holds the compressed cluster of guest offset `guest`.
    Compressed { host: u64, guest: u64, len: u64 },
}

impl Deferred {
    fn guest(&self) -> u64 {
        match *self {
            Deferred::Data { guest, .. } | Deferred::Compressed { guest, .. } => guest,
        }
    }
}

/// What the qcow2 stream import did.
pub struct Qcow2Stats {
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Bytes kept in the spool.
    pub spooled: u64,
}

struct Walker<'a> {
    name: String,
    header: Header,
    layout: Layout,
    cluster: u64,
    size: u64,
    /// Stream offset of the next byte.
    pos: u64,
    needs: BTreeMap<(u64, u64), Need>,
    seq: u64,
    /// Key of the last data range registered ahead of the stream, which the next one may extend.
    last_data: Option<(u64, u64)>,
    l1_seen: bool,
    l2_pending: u64,
    /// Host ranges known to hold nothing the import needs (refcount structures).
    ignored: Vec<(u64, u64)>,
    spool: &'a mut dyn Stash,
    /// Pieces that found no free chunk buffer, kept in the spool until the end.
    deferred: Vec<Deferred>,
    place: &'a mut dyn Placement,
    unit: Vec<u8>,
}

/// Walks the qcow2 image in `reader` (from its first byte), placing its guest bytes through `place`; bytes seen
/// before the table that maps them wait in `spool`.
pub fn walk(
    reader: &mut dyn Read,
    name: &str,
    spool: &mut dyn Stash,
    place: &mut dyn Placement,
    stop: &AtomicBool,
) -> Result<Qcow2Stats> {
    let err = |e: std::io::Error, at: u64| stream_error(e, name, at);
    let mut head = [0u8; 512];
    let got = read_full(reader, &mut head).map_err(|e| err(e, 0))?;
    let cluster = header::peek_cluster_size(&head[..got]).map_err(|e| e.at_path(name))?;
    let mut first = vec![0u8; cluster as usize];
    first[..got].copy_from_slice(&head[..got]);
    let rest = read_full(reader, &mut first[got..]).map_err(|e| err(e, got as u64))?;
    let header = header::parse(&first, u64::MAX).map_err(|e| e.at_path(name))?;
    if let Some(backing) = &header.backing {
        return Err(Error::unsupported(format!(
            "image has a backing file {:?}, which is not followed for a streamed image",
            backing.name
        ))
        .at_path(name));
    }
    let be64 = |at: usize| u64::from_be_bytes(first[at..at + 8].try_into().expect("8 bytes"));
    let refcount_table = be64(48);
    let refcount_clusters = u64::from(u32::from_be_bytes(first[56..60].try_into().expect("4 bytes")));
    let layout = Layout { cluster_bits: header.cluster_bits, extended_l2: header.extended_l2, version: header.version };
    let size = header.virtual_size();
    place.begin(size)?;
    let mut walker = Walker {
        name: name.to_string(),
        layout,
        cluster,
        size,
        pos: (got + rest) as u64,
        needs: BTreeMap::new(),
        seq: 0,
        last_data: None,
        l1_seen: false,
        l2_pending: 0,
        ignored: vec![(0, cluster)],
        spool,
        deferred: Vec::new(),
        place,
        unit: Vec::new(),
        header,
    };
    drop(first);
    let l1_bytes = u64::from(walker.header.l1_size) * 8;
    if walker.header.l1_size == 0 || size == 0 {
        walker.l1_seen = true;
        walker.place.zero(0, size)?;
    } else {
        let l1_needed = walker.header.l1_entries_needed() * 8;
        // The rest of the L1 table's clusters (unused entries, padding) is never needed.
        let l1_start = walker.header.l1_table_offset;
        let l1_end = (l1_start + l1_bytes).div_ceil(cluster) * cluster;
        walker.ignored.push((l1_start + l1_needed.min(l1_bytes), l1_end));
        walker.register(walker.header.l1_table_offset, l1_needed.min(l1_bytes), Target::L1)?;
    }
    if refcount_table != 0 && refcount_clusters > 0 && refcount_clusters <= 1 << 16 {
        walker.register(refcount_table, refcount_clusters * cluster, Target::RefcountTable)?;
    }
    let mut window = vec![0u8; WINDOW];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::new(crate::error::ErrorKind::Interrupted, "import stopped"));
        }
        let n = read_full(reader, &mut window).map_err(|e| err(e, walker.pos))?;
        if n == 0 {
            break;
        }
        walker.pass(&window[..n])?;
    }
    walker.end_of_stream()?;
    Ok(Qcow2Stats { virtual_size: size, spooled: walker.spool.kept() })
}

impl Walker<'_> {
    fn bad(&self, what: String) -> Error {
        crate::bad_image!("{what}").at_path(&self.name)
    }

    /// Whether every table that can name a cluster has passed: bytes nobody needs are then dropped.
    fn mapped(&self) -> bool {
        self.l1_seen && self.l2_pending == 0
    }

    /// Records that host `[start, start + len)` is needed for `target`; the part already passed comes from the
    /// spool.
    fn register(&mut self, start: u64, len: u64, target: Target) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if let (Target::Data(guest), Some(key)) = (target, self.last_data) {
            if let Some(last) = self.needs.get_mut(&key) {
                let Target::Data(last_guest) = last.target else { unreachable!("last_data names a data range") };
                if start >= self.pos && last.start + last.len == start && last_guest + last.len == guest {
                    last.len += len;
                    return Ok(());
                }
            }
        }
        if self.needs.len() >= MAX_PENDING_RANGES {
            return Err(self.bad(format!(
                "the image names more than {MAX_PENDING_RANGES} separate clusters ahead of the stream; import it \
                 from a random-access source (a local file, or a server that supports Range requests)"
            )));
        }
        let mut need = Need { start, len, target, got: 0, bytes: Vec::new() };
        if start < self.pos {
            let passed = (start + len).min(self.pos) - start;
            let mut bytes = vec![0u8; passed as usize];
            if !self.spool.get(start, &mut bytes)? {
                return Err(self.bad(format!(
                    "{target:?} at host offset {start:#x} is named after the stream passed it, and it was not kept"
                )));
            }
            if self.feed(&mut need, &bytes)? {
                return Ok(());
            }
        }
        self.seq += 1;
        let key = (need.start + need.got, self.seq);
        self.last_data = match need.target {
            Target::Data(_) if need.got == 0 => Some(key),
            _ => None,
        };
        self.needs.insert(key, need);
        Ok(())
    }

    /// Gives `need` its next bytes; returns whether it is complete (and then acts on it).
    fn feed(&mut self, need: &mut Need, bytes: &[u8]) -> Result<bool> {
        let host = need.start + need.got;
        match need.target {
            Target::Data(guest) => {
                let at = guest + need.got;
                if !self.place.data(at, bytes)? {
                    self.spool.put(host, bytes)?;
                    self.deferred.push(Deferred::Data { host, guest: at, len: bytes.len() as u64 });
                }
            }
            Target::RefcountTable if need.len > MAX_REFCOUNT_TABLE => {}
            _ => need.bytes.extend_from_slice(bytes),
        }
        need.got += bytes.len() as u64;
        if need.got < need.len {
            return Ok(false);
        }
        let bytes = std::mem::take(&mut need.bytes);
        match need.target {
            Target::L1 => self.on_l1(&bytes)?,
            Target::L2(index) => self.on_l2(index, need.start, &bytes)?,
            Target::RefcountTable => {
                // Refcount blocks are never needed: no reason to spool them when they pass before the L1 table.
                for raw in bytes.chunks_exact(8) {
                    let block = u64::from_be_bytes(raw.try_into().expect("8 bytes")) & !(self.cluster - 1);
                    if block != 0 {
                        // A block claimed near the end of the address space ends there: it is never in a stream.
                        self.ignored.push((block, block.saturating_add(self.cluster)));
                    }
                }
            }
            Target::Compressed(guest) => self.on_compressed(guest, need.start, &bytes)?,
            Target::Data(_) => {}
        }
        Ok(true)
    }

    /// The stream's next bytes.
    fn pass(&mut self, window: &[u8]) -> Result<()> {
        let start = self.pos;
        let end = start + window.len() as u64;
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        while let Some(key) = self.needs.range(..(end, 0)).next().map(|(k, _)| *k) {
            let mut need = self.needs.remove(&key).expect("found above");
            let from = need.start + need.got;
            let to = (need.start + need.len).min(end);
            claimed.push((from.max(start), to));
            let complete = self.feed(&mut need, &window[(from - start) as usize..(to - start) as usize])?;
            if !complete {
                self.needs.insert((need.start + need.got, key.1), need);
            }
        }
        // Keep what nobody named yet, while some table may still name it.
        if !self.mapped() {
            claimed.extend(self.ignored.iter().copied());
            claimed.sort_unstable();
            let mut at = start;
            for (from, to) in claimed {
                if from > at && from < end {
                    self.spool.put(at, &window[(at - start) as usize..(from.min(end) - start) as usize])?;
                }
                at = at.max(to.min(end)).max(start);
            }
            if at < end {
                self.spool.put(at, &window[(at - start) as usize..])?;
            }
        }
        self.pos = end;
        Ok(())
    }

    fn on_l1(&mut self, bytes: &[u8]) -> Result<()> {
        self.l1_seen = true;
        let span = self.cluster * (self.cluster / self.layout_entry_size());
        let l1_start = self.header.l1_table_offset;
        for (index, raw) in bytes.chunks_exact(8).enumerate() {
            let index = index as u64;
            let guest = index * span;
            if guest >= self.size {
                break;
            }
            let entry = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
            let l1_entries = u64::from(self.header.l1_size);
            let l2 = decode_l1(entry, &self.layout)
                .and_then(|l2| match l2 {
                    Some(l2) => check_l2_clear_of_l1(l2, &self.layout, l1_start, l1_entries).map(|()| Some(l2)),
                    None => Ok(None),
                })
                .map_err(|why| self.bad(format!("L1 entry {index}: {why}")).at_offset(l1_start + index * 8))?;
            match l2 {
                None => self.place.zero(guest, span.min(self.size - guest))?,
                Some(l2) => {
                    self.l2_pending += 1;
                    self.register(l2, self.cluster, Target::L2(index))?;
                }
            }
        }
        Ok(())
    }

    fn layout_entry_size(&self) -> u64 {
        if self.layout.extended_l2 {
            16
        } else {
            8
        }
    }

    fn on_l2(&mut self, l1_index: u64, table: u64, bytes: &[u8]) -> Result<()> {
        self.l2_pending -= 1;
        let entry_size = self.layout_entry_size();
        let entries = self.cluster / entry_size;
        let base = l1_index * entries * self.cluster;
        for i in 0..entries {
            let guest = base + i * self.cluster;
            if guest >= self.size {
                break;
            }
            let len = self.cluster.min(self.size - guest);
            let at = (i * entry_size) as usize;
            let word = |o: usize| u64::from_be_bytes(bytes[at + o..at + o + 8].try_into().expect("8 bytes"));
            let bitmap = if self.layout.extended_l2 { word(8) } else { 0 };
            let cluster = decode_l2(word(0), bitmap, &self.layout).map_err(|why| {
                self.bad(format!("L2 entry {i} of the table at {table:#x} (guest offset {guest:#x}): {why}"))
                    .at_offset(table + i * entry_size)
            })?;
            match cluster {
                Cluster::Unallocated | Cluster::Zero => self.place.zero(guest, len)?,
                Cluster::Data(host) => self.register(host, len, Target::Data(guest))?,
                Cluster::Compressed { offset, len: src_len } => {
                    self.register(offset, src_len, Target::Compressed(guest))?
                }
                Cluster::Subclusters { host, alloc, zero } => {
                    let bits = self.layout.subcluster_bits();
                    let mut index = 0;
                    while index < SUBCLUSTERS {
                        let state = subcluster_state(alloc, zero, index);
                        let mut next = index + 1;
                        while next < SUBCLUSTERS && subcluster_state(alloc, zero, next) == state {
                            next += 1;
                        }
                        let from = u64::from(index) << bits;
                        let to = (u64::from(next) << bits).min(len);
                        if from < to {
                            match state {
                                Subcluster::Data => {
                                    self.register(host + from, to - from, Target::Data(guest + from))?
                                }
                                _ => self.place.zero(guest + from, to - from)?,
                            }
                        }
                        index = next;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_compressed(&mut self, guest: u64, host: u64, input: &[u8]) -> Result<()> {
        let cluster = self.cluster as usize;
        self.unit.resize(cluster, 0);
        codec::decompress(self.header.codec, input, &mut self.unit)
            .map_err(|e| e.at_offset(host).at_path(&self.name))?;
        let len = self.cluster.min(self.size - guest) as usize;
        let unit = std::mem::take(&mut self.unit);
        let placed = self.place.data(guest, &unit[..len]);
        self.unit = unit;
        if !placed? {
            // No free chunk buffer: keep the compressed bytes and inflate them again at the end.
            self.spool.put(host, input)?;
            self.deferred.push(Deferred::Compressed { host, guest, len: input.len() as u64 });
        }
        Ok(())
    }

    /// Settles what the stream's end decides: data clusters running past it (a file cut short) and tables that
    /// never came are errors, as the random-access reader's; then the deferred pieces are placed from the spool.
    fn end_of_stream(&mut self) -> Result<()> {
        let end = self.pos;
        let pending: Vec<Need> = std::mem::take(&mut self.needs).into_values().collect();
        for mut need in pending {
            match need.target {
                Target::Compressed(guest) if need.start < end => {
                    let bytes = std::mem::take(&mut need.bytes);
                    self.on_compressed(guest, need.start, &bytes)?;
                }
                Target::RefcountTable => {}
                Target::Data(_) => {
                    let missing = (need.start + need.got).max(end);
                    return Err(self
                        .bad(format!(
                            "image data lies past the end of the stream ({end} bytes): the image is truncated"
                        ))
                        .at_offset(missing));
                }
                target => {
                    return Err(self
                        .bad(format!(
                            "{target:?} at host offset {:#x} lies past the end of the stream ({end} bytes)",
                            need.start
                        ))
                        .at_offset(need.start))
                }
            }
        }
        // Chunks that already hold a buffer first, so they complete and free it.
        let mut deferred = std::mem::take(&mut self.deferred);
        deferred.sort_by_key(|d| (!self.place.has_buffer(d.guest()), d.guest()));
        for piece in deferred {
            let placed = match piece {
                Deferred::Compressed { host, guest, len } => {
                    let mut input = vec![0u8; len as usize];
                    self.spool.get(host, &mut input)?;
                    self.unit.resize(self.cluster as usize, 0);
                    codec::decompress(self.header.codec, &input, &mut self.unit)
                        .map_err(|e| e.at_offset(host).at_path(&self.name))?;
                    let n = self.cluster.min(self.size - guest) as usize;
                    let unit = std::mem::take(&mut self.unit);
                    let placed = self.place.data(guest, &unit[..n]);
                    self.unit = unit;
                    placed?
                }
                Deferred::Data { host, guest, len } => {
                    let mut bytes = vec![0u8; len as usize];
                    self.spool.get(host, &mut bytes)?;
                    self.place.data(guest, &bytes)?
                }
            };
            if !placed {
                return Err(self.bad("out of chunk buffers while placing spooled clusters".into()));
            }
        }
        self.place.finish()
    }
}
