//! Raw images: guest offset = source offset. The virtual size is the source length rounded up to a 512-byte sector,
//! as qemu sizes raw images (the padding reads as zeros).

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
        // Holes of a sparse source are found by the scheduler for every format; past the end of the source (the
        // sector padding) there is nothing to read.
        let end = offset + len;
        let data_end = end.min(self.source.len()).max(offset);
        push_extent(
            out,
            Extent { guest: offset, len: data_end - offset, content: Content::Data { source: 0, offset } },
        );
        push_extent(out, Extent { guest: data_end, len: end - data_end, content: Content::Zero });
        Ok(())
    }
}
