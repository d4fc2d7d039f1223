//! Raw images: guest offset = source offset. Holes the source can report (SEEK_HOLE on a local file) map to zero
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
        self.source.len()
    }

    fn sources(&self) -> Vec<Arc<dyn ReadAt>> {
        vec![self.source.clone()]
    }

    fn map(&mut self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let end = offset + len;
        let mut cursor = offset;
        while cursor < end {
            let (data_start, data_end) = match self.source.next_data(cursor)? {
                Some(run) if run.start < end => {
                    let start = run.start.max(cursor);
                    let stop = run.end.min(end);
                    // A source reporting an empty run would never advance: treat the rest as data.
                    if stop > start {
                        (start, stop)
                    } else {
                        (cursor, end)
                    }
                }
                _ => (end, end),
            };
            push_extent(
                out,
                Extent {
                    guest: cursor,
                    len: data_start - cursor,
                    content: Content::Zero,
                },
            );
            push_extent(
                out,
                Extent {
                    guest: data_start,
                    len: data_end - data_start,
                    content: Content::Data {
                        source: 0,
                        offset: data_start,
                    },
                },
            );
            cursor = data_end;
        }
        Ok(())
    }
}
