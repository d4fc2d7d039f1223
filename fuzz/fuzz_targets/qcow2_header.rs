//! The qcow2 header parser alone, on the input as the first cluster; the claimed file length comes from the
//! input's last 8 bytes so placement checks see both short and huge files.
#![no_main]

use boundimport::format::qcow2::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
