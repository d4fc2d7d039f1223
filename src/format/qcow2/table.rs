//! Decoding L1 and L2 table entries: standard and extended L2 entries, compressed cluster descriptors.
//!
//! Pure functions of an entry and the image geometry. They say what an entry means or why it is invalid; the
//! caller knows where the entry lives and turns the reason into an error naming the table, index and offset.
//! Which entries qemu rejects: qcow2_get_cluster_type / qcow2_get_subcluster_type (block/qcow2.h) and
//! qcow2_get_host_offset (block/qcow2-cluster.c).

/// Bits 9-55 of an L1 or standard L2 entry: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Reserved bits of an L1 entry: 0-8 and 56-62 (bit 63 is the "copied" flag).
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// Bit 62 of an L2 entry: the cluster is compressed.
const L2_COMPRESSED: u64 = 1 << 62;

/// Bit 0 of a standard L2 entry: the cluster reads as zeros (version 3 without extended L2 only).
const L2_ZERO: u64 = 1;

/// Reserved bits of a standard L2 entry: 1-8 and 56-61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Compressed clusters must start below 2^56, whatever room the descriptor leaves.
const MAX_COMPRESSED_OFFSET: u64 = 1 << 56;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// What decoding needs to know about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether L2 entries carry a subcluster bitmap.
    pub extended_l2: bool,
    /// Header version (2 has no zero flag).
    pub version: u32,
}

impl Layout {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the subcluster size (only meaningful with extended L2 entries).
    pub fn subcluster_bits(&self) -> u32 {
        self.cluster_bits - 5
    }
}

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not allocated: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored verbatim at this cluster-aligned host offset.
    Data(u64),
    /// Stored compressed.
    Compressed {
        /// Host offset of the compressed bytes (not aligned).
        offset: u64,
        /// Number of bytes the descriptor covers (whole sectors minus the offset's position in its sector).
        len: u64,
    },
    /// Extended L2 entry with a mix of states; subcluster `i` is bit `i` of `alloc` or `zero`, or neither.
    Subclusters {
        /// Host offset of the cluster (0 when no subcluster is allocated).
        host: u64,
        /// Subclusters stored at `host + i * subcluster_size`.
        alloc: u32,
        /// Subclusters that read as zeros.
        zero: u32,
    },
}

/// State of one subcluster of a [`Cluster::Subclusters`] entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Not allocated: backing file or zeros.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored in the host cluster.
    Data,
}

/// The state of subcluster `index` given the two halves of an extended L2 bitmap.
pub fn subcluster_state(alloc: u32, zero: u32, index: u32) -> Subcluster {
    let bit = 1u32 << index;
    if alloc & bit != 0 {
        Subcluster::Data
    } else if zero & bit != 0 {
        Subcluster::Zero
    } else {
        Subcluster::Unallocated
    }
}

/// Decodes an L1 entry into the offset of its L2 table (`None`: unallocated), checking reserved bits and
/// alignment. The caller checks where the table lies.
pub fn decode_l1(entry: u64, layout: &Layout) -> Result<Option<u64>, String> {
    if entry & L1_RESERVED != 0 {
        return Err(format!("entry {entry:#018x} has reserved bits {:#x} set", entry & L1_RESERVED));
    }
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if offset % layout.cluster_size() != 0 {
        return Err(format!(
            "L2 table offset {offset:#x} is not aligned to the cluster size {}",
            layout.cluster_size()
        ));
    }
    Ok(Some(offset))
}

/// Refuses an L2 table (one cluster at `l2`) that overlaps the L1 table of `l1_entries` entries at `l1_offset`:
/// its entries would be read from L1 entries. Shared by the random-access reader and the stream walker.
pub fn check_l2_clear_of_l1(l2: u64, layout: &Layout, l1_offset: u64, l1_entries: u64) -> Result<(), String> {
    let l1_end = l1_offset.saturating_add(l1_entries.saturating_mul(8));
    if l2 < l1_end && l1_offset < l2.saturating_add(layout.cluster_size()) {
        return Err(format!("L2 table at {l2:#x} overlaps the L1 table at {l1_offset:#x}"));
    }
    Ok(())
}

/// Decodes an L2 entry (`bitmap` is the second half of an extended entry; 0 otherwise).
pub fn decode_l2(entry: u64, bitmap: u64, layout: &Layout) -> Result<Cluster, String> {
    if entry & L2_COMPRESSED != 0 {
        return decode_compressed(entry, bitmap, layout);
    }
    if entry & L2_RESERVED != 0 {
        return Err(format!("entry {entry:#018x} has reserved bits {:#x} set", entry & L2_RESERVED));
    }
    let host = entry & OFFSET_MASK;
    if host % layout.cluster_size() != 0 {
        return Err(format!("cluster offset {host:#x} is not aligned to the cluster size {}", layout.cluster_size()));
    }
    if !layout.extended_l2 {
        if entry & L2_ZERO != 0 {
            if layout.version < 3 {
                // qemu refuses these too ("Zero cluster entry found in pre-v3 image").
                return Err(format!("entry {entry:#018x} has the zero flag, which version 2 images do not have"));
            }
            return Ok(Cluster::Zero);
        }
        return Ok(if host == 0 { Cluster::Unallocated } else { Cluster::Data(host) });
    }
    // Extended L2: bit 0 is unused (qemu ignores it); the bitmap decides.
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err(format!(
            "subclusters {:#010x} are marked both allocated and zero (bitmap {bitmap:#018x})",
            alloc & zero
        ));
    }
    if host == 0 && alloc != 0 {
        return Err(format!("subclusters {alloc:#010x} are marked allocated but the cluster has no host offset"));
    }
    Ok(match (alloc, zero) {
        (u32::MAX, _) => Cluster::Data(host),
        (0, u32::MAX) => Cluster::Zero,
        (0, 0) => Cluster::Unallocated,
        _ => Cluster::Subclusters { host, alloc, zero },
    })
}

/// Decodes a compressed cluster descriptor (x = 62 - (cluster_bits - 8): offset in bits 0..x, additional sectors
/// in bits x..62).
fn decode_compressed(entry: u64, bitmap: u64, layout: &Layout) -> Result<Cluster, String> {
    if layout.extended_l2 && bitmap != 0 {
        return Err(format!("compressed cluster has a non-zero subcluster bitmap {bitmap:#018x}"));
    }
    let sector_bits = layout.cluster_bits - 8;
    let shift = 62 - sector_bits;
    let offset = entry & ((1 << shift) - 1);
    let sectors = ((entry >> shift) & ((1 << sector_bits) - 1)) + 1;
    if offset >= MAX_COMPRESSED_OFFSET {
        return Err(format!("compressed cluster offset {offset:#x} is beyond the 2^56 limit"));
    }
    if offset < layout.cluster_size() {
        return Err(format!("compressed cluster offset {offset:#x} lies inside the header cluster"));
    }
    Ok(Cluster::Compressed { offset, len: sectors * 512 - (offset & 511) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Layout = Layout { cluster_bits: 16, extended_l2: false, version: 3 };
    const EXT: Layout = Layout { cluster_bits: 16, extended_l2: true, version: 3 };
    const COPIED: u64 = 1 << 63;

    #[test]
    fn l1_entries() {
        assert_eq!(decode_l1(0, &STD), Ok(None));
        assert_eq!(decode_l1(COPIED | 0x50000, &STD), Ok(Some(0x50000)));
        assert!(decode_l1(0x50000 | 1, &STD).unwrap_err().contains("reserved bits 0x1"));
        assert!(decode_l1(1 << 56, &STD).unwrap_err().contains("reserved"));
        assert!(decode_l1(0x50200, &STD).unwrap_err().contains("not aligned"));
    }

    #[test]
    fn standard_l2_entries() {
        assert_eq!(decode_l2(0, 0, &STD), Ok(Cluster::Unallocated));
        assert_eq!(decode_l2(COPIED | 0x70000, 0, &STD), Ok(Cluster::Data(0x70000)));
        assert_eq!(decode_l2(1, 0, &STD), Ok(Cluster::Zero));
        assert_eq!(decode_l2(COPIED | 0x70001, 0, &STD), Ok(Cluster::Zero));
        let v2 = Layout { version: 2, ..STD };
        assert!(decode_l2(1, 0, &v2).unwrap_err().contains("version 2"));
        assert!(decode_l2(0x70002, 0, &STD).unwrap_err().contains("reserved bits 0x2"));
        assert!(decode_l2(1 << 60, 0, &STD).unwrap_err().contains("reserved"));
        assert!(decode_l2(0x70200, 0, &STD).unwrap_err().contains("not aligned"));
        assert!(decode_l2(0x70201, 0, &STD).unwrap_err().contains("not aligned"));
    }

    #[test]
    fn compressed_descriptors() {
        // 64 KiB clusters: x = 54; offset in bits 0..54, additional sectors in bits 54..62.
        let entry = L2_COMPRESSED | (3 << 54) | 0x12_3456;
        assert_eq!(decode_l2(entry, 0, &STD), Ok(Cluster::Compressed { offset: 0x12_3456, len: 4 * 512 - 0x056 }));
        // 2 MiB clusters: x = 49.
        let big = Layout { cluster_bits: 21, ..STD };
        let entry = L2_COMPRESSED | (0x1fff << 49) | 0x40_0000;
        assert_eq!(decode_l2(entry, 0, &big), Ok(Cluster::Compressed { offset: 0x40_0000, len: 0x2000 * 512 }));
        // 512-byte clusters: x = 61, offset bits above 55 must be zero.
        let small = Layout { cluster_bits: 9, ..STD };
        assert_eq!(
            decode_l2(L2_COMPRESSED | (1 << 61) | 0x400, 0, &small),
            Ok(Cluster::Compressed { offset: 0x400, len: 1024 })
        );
        assert!(decode_l2(L2_COMPRESSED | (1 << 57), 0, &small).unwrap_err().contains("2^56"));
        assert!(decode_l2(L2_COMPRESSED | 0x100, 0, &STD).unwrap_err().contains("header cluster"));
        assert!(decode_l2(L2_COMPRESSED | 0x12_3456, 1, &EXT).unwrap_err().contains("non-zero subcluster bitmap"));
        assert!(matches!(decode_l2(L2_COMPRESSED | 0x12_3456, 0, &EXT), Ok(Cluster::Compressed { .. })));
    }

    #[test]
    fn extended_l2_entries() {
        let host = COPIED | 0x70000;
        assert_eq!(decode_l2(0, 0, &EXT), Ok(Cluster::Unallocated));
        assert_eq!(decode_l2(host, 0, &EXT), Ok(Cluster::Unallocated));
        assert_eq!(decode_l2(host, 0xffff_ffff, &EXT), Ok(Cluster::Data(0x70000)));
        assert_eq!(decode_l2(0, 0xffff_ffff << 32, &EXT), Ok(Cluster::Zero));
        // Bit 0 is not a zero flag with extended entries.
        assert_eq!(decode_l2(host | 1, 0xffff_ffff, &EXT), Ok(Cluster::Data(0x70000)));
        assert_eq!(
            decode_l2(host, 0x0000_0f00_0000_00f0, &EXT),
            Ok(Cluster::Subclusters { host: 0x70000, alloc: 0xf0, zero: 0xf00 })
        );
        assert!(decode_l2(host, 0x0000_0010_0000_0010, &EXT).unwrap_err().contains("both allocated and zero"));
        assert!(decode_l2(0, 1, &EXT).unwrap_err().contains("no host offset"));
        assert_eq!(subcluster_state(0xf0, 0xf00, 4), Subcluster::Data);
        assert_eq!(subcluster_state(0xf0, 0xf00, 8), Subcluster::Zero);
        assert_eq!(subcluster_state(0xf0, 0xf00, 31), Subcluster::Unallocated);
    }
}
