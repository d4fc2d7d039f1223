//! Fixed-width integers read out of a byte buffer, in the byte order a format stores them. Callers check the
//! buffer's length first (a header's size is validated before its fields are read): an index past the end is a
//! bug, and panics like any slice index.

/// Big-endian u16 at `at`.
pub fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

/// Big-endian u32 at `at`.
pub fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Big-endian u64 at `at`.
pub fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Little-endian u16 at `at`.
pub fn le16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

/// Little-endian u32 at `at`.
pub fn le32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Little-endian u64 at `at`.
pub fn le64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_byte_orders_at_an_offset() {
        let buf = [0xff, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(be16(&buf, 1), 0x0102);
        assert_eq!(le16(&buf, 1), 0x0201);
        assert_eq!(be32(&buf, 1), 0x0102_0304);
        assert_eq!(le32(&buf, 1), 0x0403_0201);
        assert_eq!(be64(&buf, 1), 0x0102_0304_0506_0708);
        assert_eq!(le64(&buf, 1), 0x0807_0605_0403_0201);
    }
}
