//! Raw images: guest offset = source offset. The virtual size is the source length rounded up to a 512-byte sector,
//! as qemu sizes raw images (the padding reads as zeros). Holes the source can report (SEEK_HOLE on a local file) map to zero
//! extents, so a sparse raw image is neither read nor written where it is empty.

use super::{push_extent, Content, Extent, Image};
use crate::error::Result;
use crate::source::ReadAt;
use std::sync::Arc;

/// A raw disk image.
pub struct RawImage {
    source: Arc<dyn ReadAt>,
}

impl RawImage {
    /// A raw image whose virtual size is the source's length.
    pub fn new(source: Arc<dyn ReadAt>) -> Self {
        RawImage { source }
    }
}

impl Image for RawImage {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn virtual_size(&self) -> u64 {
        crate::buffer::align_up(self.source.len(), 512)
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset + len;
        // Past the end of the source (the sector padding) there is nothing to read.
        let data_limit = end.min(self.source.len());
        let mut cursor = offset;
        while cursor < data_limit {
            let (data_start, data_end) = match self.source.next_data(cursor)? {
                Some(run) if run.start < data_limit && run.end > run.start.max(cursor) => {
                    (run.start.max(cursor), run.end.min(data_limit))
                }
                // A run that makes no progress is not trusted: the rest is data.
                Some(run) if run.start < data_limit => (cursor, data_limit),
                _ => (data_limit, data_limit),
            };
            push_extent(out, Extent { guest: cursor, len: data_start - cursor, content: Content::Zero });
            let data = Content::Data { source: 0, offset: data_start };
            push_extent(out, Extent { guest: data_start, len: data_end - data_start, content: data });
            cursor = data_end;
        }
        push_extent(out, Extent { guest: cursor, len: end - cursor, content: Content::Zero });
        Ok(())
    }
}
