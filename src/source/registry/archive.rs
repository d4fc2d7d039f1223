//! `oci-archive:PATH[:TAG]`: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) in a tar file.
//! Its members are found by reading the tar headers only (seeking over the data), and each blob is then read in
//! place through the cache-free file source: nothing is extracted, unlike containers/image, which unpacks the
//! whole archive into a temporary directory first.

use super::manifest::{self, Parsed};
use super::{fail, BlobStore, Fetched, MAX_MANIFEST};
use crate::error::{ErrorKind, Result};
use crate::source::sequential::ReadAtReader;
use crate::source::{FileSource, ReadAt};
use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Most archive members indexed.
const MAX_MEMBERS: usize = 100_000;
/// Largest pax or GNU long-name record read.
const MAX_META: u64 = 64 << 10;
/// The annotation naming a manifest in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI layout archive, indexed.
pub struct OciArchive {
    image: String,
    source: Arc<FileSource>,
    /// Member path → byte range of its data in the archive.
    members: BTreeMap<String, Range<u64>>,
    tag: Option<String>,
}

impl OciArchive {
    /// Indexes the archive at `path`; `tag` names the image to take from its index.
    pub fn open(image: &str, path: &Path, tag: Option<&str>) -> Result<OciArchive> {
        let step = "reading the archive";
        let source = Arc::new(FileSource::open(path).map_err(|e| super::step_error(image, step, e))?);
        let members = index_members(source.as_ref()).map_err(|e| super::step_error(image, step, e))?;
        if !members.contains_key("index.json") {
            return Err(fail(image, ErrorKind::BadImage, step, "no index.json: not an OCI image layout archive"));
        }
        Ok(OciArchive { image: image.to_string(), source, members, tag: tag.map(str::to_string) })
    }

    fn member(&self, path: &str) -> Result<Range<u64>> {
        self.members
            .get(path)
            .cloned()
            .ok_or_else(|| fail(&self.image, ErrorKind::BadImage, "reading the archive", format!("no member {path}")))
    }

    fn read_small(&self, path: &str, cap: u64) -> Result<Vec<u8>> {
        let range = self.member(path)?;
        let len = range.end - range.start;
        if len > cap {
            return Err(fail(
                &self.image,
                ErrorKind::BadImage,
                "reading the archive",
                format!("{path} is {len} bytes, more than the {cap} accepted"),
            ));
        }
        let mut bytes = vec![0u8; len as usize];
        crate::source::read_exact_at(self.source.as_ref(), range.start, &mut bytes, path)
            .map_err(|e| super::step_error(&self.image, "reading the archive", e))?;
        Ok(bytes)
    }

    fn blob_path(digest: &str) -> String {
        format!("blobs/{}", digest.replacen(':', "/", 1))
    }
}

impl BlobStore for OciArchive {
    fn top(&self) -> Result<Fetched> {
        let step = "reading the archive's index";
        let bytes = self.read_small("index.json", MAX_MANIFEST)?;
        let manifests = match manifest::parse(&bytes, Some(manifest::OCI_INDEX)) {
            Ok(Parsed::Index(manifests)) => manifests,
            Ok(Parsed::Manifest { .. }) => {
                return Err(fail(&self.image, ErrorKind::BadImage, step, "index.json is a manifest, not an index"))
            }
            Err(why) => return Err(fail(&self.image, ErrorKind::BadImage, step, why)),
        };
        let chosen = match &self.tag {
            Some(tag) => manifests.iter().find(|d| d.annotations.get(REF_NAME) == Some(tag)).ok_or_else(|| {
                let names: Vec<&str> =
                    manifests.iter().filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str)).take(16).collect();
                fail(
                    &self.image,
                    ErrorKind::BadImage,
                    step,
                    format!("no image tagged {tag:?} (tags: {})", names.join(", ")),
                )
            })?,
            None if manifests.len() == 1 => &manifests[0],
            None => {
                return Err(fail(
                    &self.image,
                    ErrorKind::Usage,
                    step,
                    format!("the archive holds {} images; name one as oci-archive:PATH:TAG", manifests.len()),
                ))
            }
        };
        super::parse_digest(&chosen.digest).map_err(|why| fail(&self.image, ErrorKind::BadImage, step, why))?;
        let mut fetched = self.manifest(&chosen.digest, &chosen.media_type)?;
        fetched.digest = Some(chosen.digest.clone());
        Ok(fetched)
    }

    fn manifest(&self, digest: &str, media_type: &str) -> Result<Fetched> {
        let bytes = self.read_small(&Self::blob_path(digest), MAX_MANIFEST)?;
        Ok(Fetched { bytes, media_type: (!media_type.is_empty()).then(|| media_type.to_string()), digest: None })
    }

    fn blob(&self, digest: &str, _size: u64) -> Result<Box<dyn Read + Send>> {
        let range = self.member(&Self::blob_path(digest))?;
        let slice = Slice { source: self.source.clone(), range };
        Ok(Box::new(ReadAtReader::new(Arc::new(slice))))
    }
}

/// A byte range of a source, as a source.
struct Slice {
    source: Arc<FileSource>,
    range: Range<u64>,
}

impl ReadAt for Slice {
    fn name(&self) -> &str {
        self.source.name()
    }

    fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = self.len();
        if offset >= len {
            return Ok(0);
        }
        let n = (len - offset).min(buf.len() as u64) as usize;
        self.source.read_at(self.range.start + offset, &mut buf[..n])
    }
}

/// Reads the tar headers of `source`, seeking over member data: regular files' paths (leading `./` removed) and
/// data ranges. ustar prefixes, GNU long names and pax `path`/`size` records are understood.
pub fn index_members(source: &dyn ReadAt) -> Result<BTreeMap<String, Range<u64>>> {
    let mut members = BTreeMap::new();
    let mut at = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    let len = source.len();
    loop {
        if at + 512 > len {
            break;
        }
        let mut header = [0u8; 512];
        crate::source::read_exact_at(source, at, &mut header, "tar header")?;
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let sum: u64 =
            header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        let stated =
            octal(&header[148..156]).ok_or_else(|| crate::bad_image!("bad tar header checksum field").at_offset(at))?;
        if sum != stated {
            return Err(crate::bad_image!("tar header checksum mismatch").at_offset(at));
        }
        let size = pax_size
            .take()
            .map_or_else(|| octal(&header[124..136]), Some)
            .ok_or_else(|| crate::bad_image!("bad tar size field").at_offset(at))?;
        let data = at + 512;
        let end = data.checked_add(size).filter(|&e| e <= len).ok_or_else(|| {
            crate::bad_image!("tar member of {size} bytes runs past the end of the archive").at_offset(at)
        })?;
        let typeflag = header[156];
        match typeflag {
            b'x' | b'L' => {
                if size > MAX_META {
                    return Err(crate::bad_image!("tar extension record of {size} bytes").at_offset(at));
                }
                let mut record = vec![0u8; size as usize];
                crate::source::read_exact_at(source, data, &mut record, "tar extension record")?;
                if typeflag == b'L' {
                    long_name = Some(String::from_utf8_lossy(trim_nul(&record)).into_owned());
                } else {
                    for (key, value) in pax_records(&record) {
                        match key.as_str() {
                            "path" => pax_path = Some(value),
                            "size" => pax_size = value.trim().parse().ok(),
                            _ => {}
                        }
                    }
                }
            }
            b'0' | 0 | b'7' => {
                let mut name = String::from_utf8_lossy(trim_nul(&header[0..100])).into_owned();
                if &header[257..263] == b"ustar\0" {
                    let prefix = String::from_utf8_lossy(trim_nul(&header[345..500])).into_owned();
                    if !prefix.is_empty() {
                        name = format!("{prefix}/{name}");
                    }
                }
                let name = pax_path.take().or(long_name.take()).unwrap_or(name);
                let name = name.trim_start_matches("./").to_string();
                if members.len() >= MAX_MEMBERS {
                    return Err(crate::bad_image!("more than {MAX_MEMBERS} archive members").at_offset(at));
                }
                members.insert(name, data..end);
            }
            _ => {
                pax_path = None;
                long_name = None;
            }
        }
        at = end.div_ceil(512) * 512;
    }
    Ok(members)
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        // GNU base-256.
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(trim_nul(field)).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// `LEN KEY=VALUE\n` records.
fn pax_records(mut data: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Some(space) = data.iter().position(|&b| b == b' ') else { break };
        let Some(len) = std::str::from_utf8(&data[..space]).ok().and_then(|s| s.parse::<usize>().ok()) else { break };
        if len <= space + 1 || len > data.len() {
            break;
        }
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&record[..eq]).into_owned(),
                String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
            ));
        }
        data = &data[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source over bytes in memory.
    struct Bytes(Vec<u8>);
    impl ReadAt for Bytes {
        fn name(&self) -> &str {
            "mem"
        }
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
    }

    /// One ustar member: header, data, padding.
    fn member(name: &str, typeflag: u8, data: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 512];
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[100..107].copy_from_slice(b"0000644");
        header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        header[156] = typeflag;
        header[257..263].copy_from_slice(b"ustar\0");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut out = header.to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
        out
    }

    #[test]
    fn members_are_indexed_without_reading_their_data() {
        let long = format!("blobs/sha256/{}", "a".repeat(64));
        let record = format!(" path={long}\n");
        let pax = format!("{}{record}", record.len() + 2);
        let mut tar = member("./oci-layout", b'0', b"{}");
        tar.extend(member("blobs/", b'5', b""));
        tar.extend(member("PaxHeaders/x", b'x', pax.as_bytes()));
        tar.extend(member("short-name", b'0', b"blob bytes"));
        tar.extend(member("index.json", 0, b"[]"));
        tar.extend([0u8; 1024]);
        let members = index_members(&Bytes(tar.clone())).unwrap();
        assert_eq!(members.keys().map(String::as_str).collect::<Vec<_>>(), [long.as_str(), "index.json", "oci-layout"]);
        let range = members[&long].clone();
        assert_eq!(&tar[range.start as usize..range.end as usize], b"blob bytes");

        // A checksum that does not add up, and a member running past the end, are refused.
        let mut bad = tar.clone();
        bad[0] ^= 1;
        assert!(index_members(&Bytes(bad)).unwrap_err().to_string().contains("checksum"));
        let cut = tar[..512 + 100].to_vec();
        let mut huge = member("index.json", b'0', b"");
        huge[124..135].copy_from_slice(b"77777777777");
        let sum: u32 =
            huge[..512].iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u32::from(b) }).sum();
        huge[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        assert!(index_members(&Bytes(huge)).unwrap_err().to_string().contains("past the end"));
        assert!(index_members(&Bytes(cut)).is_ok_and(|m| m.is_empty() || m.contains_key("oci-layout")));
    }
}
