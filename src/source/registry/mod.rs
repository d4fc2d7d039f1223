//! containerDisks: the disk file of an OCI or Docker image, read straight out of its layers as a forward-only
//! stream, never written to scratch space.
//!
//! Two transports, as CDI names them: `docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]` (a registry speaking the
//! Distribution API v2, [`client`]) and `oci-archive:PATH[:TAG]` (an OCI layout in a tar file, [`archive`]). Both
//! are a [`BlobStore`]: a manifest by reference, a blob by digest. [`manifest`] parses what they return and picks
//! the platform; [`layers`] walks the layers in order, each once, verifying every blob against its digest as it
//! streams, and hands out the bytes of the first regular file under `disk/` — the file CDI takes.
//!
//! The disk's last bytes are held back until its layer's digest has been checked, so an import from a corrupt
//! layer fails before it could complete.

pub mod archive;
pub mod client;
pub mod layers;
pub mod manifest;

use crate::error::{Error, ErrorKind, Result};
use crate::source::HttpOptions;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

/// The registry of an image named without one (`docker://fedora`), as Docker and containers/image default it.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Where that registry's API is served.
const DEFAULT_REGISTRY_API: &str = "registry-1.docker.io";
/// Largest manifest or index accepted (containers/image's own limit).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image configuration accepted.
pub const MAX_CONFIG: u64 = 4 << 20;
/// Most image indexes followed from the reference to a manifest (an index may name another index).
pub const MAX_INDEX_DEPTH: usize = 4;

/// An image to import, as written (`docker://…` or `oci-archive:…`), and the platform to pick from an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The reference as given.
    pub spec: String,
    /// `ARCH` or `ARCH/VARIANT` to choose from a multi-platform index; `None`: the host's architecture, and a
    /// single-platform image is taken whatever its architecture (as CDI does without an architecture).
    pub arch: Option<String>,
}

impl ImageRef {
    /// Whether `text` names an image rather than a file or URL.
    pub fn is_image(text: &str) -> bool {
        text.starts_with("docker://") || text.starts_with("oci-archive:")
    }

    /// An image reference, parsed when it is opened.
    pub fn new(spec: impl Into<String>) -> Self {
        ImageRef { spec: spec.into(), arch: None }
    }

    /// The parsed reference; a malformed one is a usage error naming it.
    pub fn parse(&self) -> Result<Reference> {
        Reference::parse(&self.spec)
            .map_err(|why| Error::usage(format!("invalid image reference: {why}")).at_path(&self.spec))
    }

    /// The platform wanted, parsed from [`arch`](Self::arch).
    pub fn platform(&self) -> Result<manifest::Wanted> {
        manifest::Wanted::parse(self.arch.as_deref()).map_err(|why| Error::usage(why).at_path(&self.spec))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl serde::Serialize for ImageRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.spec)
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// An image in a registry.
    Docker(DockerRef),
    /// An OCI layout archived in a tar file.
    OciArchive {
        /// The archive.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` to pick from its index; `None`: the index's only manifest.
        tag: Option<String>,
    },
}

/// `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerRef {
    /// Registry host and port as written (`docker.io` when the name has none).
    pub registry: String,
    /// Repository path (`library/fedora` for Docker Hub's short names).
    pub repository: String,
    /// Tag or digest.
    pub tag_or_digest: TagOrDigest,
}

/// How a repository's manifest is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagOrDigest {
    /// A tag (`latest` when none is given).
    Tag(String),
    /// `sha256:HEX`.
    Digest(String),
}

impl TagOrDigest {
    /// The path component of the manifest URL.
    pub fn as_str(&self) -> &str {
        match self {
            TagOrDigest::Tag(t) | TagOrDigest::Digest(t) => t,
        }
    }
}

impl DockerRef {
    /// `host:port` of the API (Docker Hub's API lives elsewhere than its name).
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            DEFAULT_REGISTRY_API
        } else {
            &self.registry
        }
    }

    /// `docker://` spelling of the same repository pinned to `digest`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("docker://{}/{}@{digest}", self.registry, self.repository)
    }
}

impl Reference {
    /// Parses `docker://…` or `oci-archive:…`; the error says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Reference, String> {
        if let Some(rest) = text.strip_prefix("docker://") {
            return parse_docker(rest).map(Reference::Docker);
        }
        if let Some(rest) = text.strip_prefix("oci-archive:") {
            // PATH[:TAG]: a tag never contains a slash, so a colon followed by one is part of the path.
            let (path, tag) = match rest.rsplit_once(':') {
                Some((path, tag)) if !tag.contains('/') && !path.is_empty() => (path, Some(tag)),
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err("oci-archive: needs a path".into());
            }
            if let Some(tag) = tag {
                if !valid_tag(tag) {
                    return Err(format!("invalid tag {tag:?}"));
                }
            }
            return Ok(Reference::OciArchive { path: PathBuf::from(path), tag: tag.map(str::to_string) });
        }
        Err("expected docker://HOST/REPO[:TAG|@sha256:HEX] or oci-archive:PATH[:TAG]".into())
    }
}

fn parse_docker(rest: &str) -> std::result::Result<DockerRef, String> {
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (rest, None),
    };
    // A tag is after the last colon that follows the last slash (a colon before it is a port).
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    if name.is_empty() {
        return Err("no repository name".into());
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_string(), path.to_string())
        }
        _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
    };
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    if registry.is_empty() || registry.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("invalid registry host {registry:?}"));
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
    };
    if repository.len() > 255 || !repository.split('/').all(component_ok) {
        return Err(format!("invalid repository name {repository:?} (lower-case letters, digits and . _ - /)"));
    }
    let tag_or_digest = match (tag, digest) {
        (Some(_), Some(_)) => return Err("a reference with both a tag and a digest is not supported".into()),
        (_, Some(digest)) => TagOrDigest::Digest(parse_digest(digest)?),
        (Some(tag), None) if valid_tag(tag) => TagOrDigest::Tag(tag.to_string()),
        (Some(tag), None) => return Err(format!("invalid tag {tag:?}")),
        (None, None) => TagOrDigest::Tag("latest".into()),
    };
    Ok(DockerRef { registry, repository, tag_or_digest })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !matches!(tag.as_bytes()[0], b'.' | b'-')
}

/// Checks a digest's form: `sha256:` and 64 lower-case hex digits (the only algorithm accepted).
pub fn parse_digest(text: &str) -> std::result::Result<String, String> {
    match text.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(text.to_string())
        }
        Some(("sha256", _)) => Err(format!("invalid sha256 digest {text:?}")),
        Some((algorithm, _)) => Err(format!("unsupported digest algorithm {algorithm:?} (only sha256)")),
        None => Err(format!("invalid digest {text:?}")),
    }
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::checksum::hex(&Sha256::digest(bytes)))
}

/// An error in `step` of importing `image`, wrapping `cause` (its kind is kept): one line naming the image, the
/// step and what went wrong.
pub fn step_error(image: &str, step: &str, cause: Error) -> Error {
    Error::new(cause.kind(), step.to_string()).at_path(image).with_source(cause)
}

/// A new error of `kind` in `step` of importing `image`.
pub fn fail(image: &str, kind: ErrorKind, step: &str, what: impl fmt::Display) -> Error {
    Error::new(kind, format!("{step}: {what}")).at_path(image)
}

/// Where manifests and blobs come from: a registry or an OCI archive.
pub trait BlobStore: Send + Sync {
    /// The top-level manifest or index of the reference: its bytes (at most [`MAX_MANIFEST`]), the media type
    /// the store declared for it, and the digest it must have (a pinned reference's, or what the registry said).
    fn top(&self) -> Result<Fetched>;

    /// The manifest or index with `digest` (at most [`MAX_MANIFEST`] bytes), unverified.
    fn manifest(&self, digest: &str, media_type: &str) -> Result<Fetched>;

    /// The blob with `digest` from its start, as stored, unverified: [`verified`] checks it.
    fn blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>>;
}

/// What a store fetched for a manifest.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The declared media type (`Content-Type`, or the descriptor's).
    pub media_type: Option<String>,
    /// The digest the bytes must have, when the store knows it.
    pub digest: Option<String>,
}

/// A blob checked as it streams: no more than `size` bytes, and at its end exactly `size` bytes whose SHA-256 is
/// `digest`; a mismatch is an error of kind [`ErrorKind::ChecksumMismatch`].
pub struct Verified {
    inner: Box<dyn Read + Send>,
    image: String,
    what: String,
    digest: String,
    size: u64,
    read: u64,
    hasher: Option<Sha256>,
    /// Read to its end with the right length and digest.
    ok: bool,
}

/// Verifies `inner` (the blob `digest` of `size` bytes of `image`, called `what` in messages).
pub fn verified(inner: Box<dyn Read + Send>, image: &str, what: &str, digest: &str, size: u64) -> Verified {
    Verified {
        inner,
        image: image.to_string(),
        what: what.to_string(),
        digest: digest.to_string(),
        size,
        read: 0,
        hasher: Some(Sha256::new()),
        ok: false,
    }
}

impl Verified {
    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.read
    }

    /// Whether the whole blob was read and matched its digest.
    pub fn is_verified(&self) -> bool {
        self.ok
    }

    fn mismatch(&self, what: String) -> io::Error {
        io::Error::other(fail(&self.image, ErrorKind::ChecksumMismatch, &format!("verifying {}", self.what), what))
    }
}

impl Read for Verified {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ok || buf.is_empty() {
            return Ok(0);
        }
        if self.hasher.is_none() {
            return Err(self.mismatch("digest mismatch".into()));
        }
        // One byte more than the blob may hold, so a longer one is caught without reading it all.
        let room = (self.size - self.read).saturating_add(1).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room])?;
        if n == 0 {
            if self.read < self.size {
                return Err(io::Error::other(fail(
                    &self.image,
                    ErrorKind::BadImage,
                    &format!("reading {}", self.what),
                    format!("the blob ends after {} of its {} bytes", self.read, self.size),
                )));
            }
            let computed = format!("sha256:{}", crate::checksum::hex(&self.hasher.take().expect("open").finalize()));
            if computed != self.digest {
                self.hasher = None;
                return Err(self.mismatch(format!(
                    "digest mismatch: the blob's sha256 is {computed}, its descriptor says {}",
                    self.digest
                )));
            }
            self.ok = true;
            return Ok(0);
        }
        if self.read + n as u64 > self.size {
            self.hasher = None;
            return Err(self.mismatch(format!("the blob is longer than the {} bytes its descriptor says", self.size)));
        }
        self.hasher.as_mut().expect("open").update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// What [`inspect`] found out about an image without reading its layers.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// The same image pinned to the digest of the platform manifest chosen (reading it again reads these bytes).
    pub pinned: ImageRef,
    /// Termination-message labels from the configuration's environment, as CDI's `envsToLabels` makes them.
    pub labels: BTreeMap<String, String>,
    /// The image's architecture, from its configuration.
    pub architecture: String,
}

/// The store `image` names, and its HTTP client for a registry.
type Store = (Reference, Arc<dyn BlobStore>, Option<Arc<crate::source::http::Client>>);

fn store_for(image: &ImageRef, options: &HttpOptions) -> Result<Store> {
    let reference = image.parse()?;
    Ok(match &reference {
        Reference::Docker(docker) => {
            let registry = client::Registry::connect(&image.spec, docker, options)?;
            let http = registry.client();
            (reference, Arc::new(registry), Some(http))
        }
        Reference::OciArchive { path, tag } => {
            let archive = archive::OciArchive::open(&image.spec, path, tag.as_deref())?;
            (reference, Arc::new(archive), None)
        }
    })
}

/// Reads the image's manifest and configuration (not its layers): checks its platform and that it is no bootc
/// image, and returns its labels and a reference pinned to the manifest chosen.
pub fn inspect(image: &ImageRef, options: &HttpOptions) -> Result<Inspected> {
    let (reference, store, _) = store_for(image, options)?;
    let resolved = manifest::resolve(&image.spec, store.as_ref(), &image.platform()?)?;
    let pinned = match &reference {
        Reference::Docker(docker) => docker.pinned(&resolved.digest),
        // An archive is pinned by being a local file; its tag picks the same manifest again.
        Reference::OciArchive { .. } => image.spec.clone(),
    };
    let pinned = ImageRef { spec: pinned, arch: image.arch.clone() };
    Ok(Inspected {
        pinned,
        labels: manifest::envs_to_labels(&resolved.config.env),
        architecture: resolved.config.architecture,
    })
}

/// The disk of an image, opened.
pub struct OpenedDisk {
    /// Its bytes as stored in the layer, front to back.
    pub reader: Box<dyn Read + Send>,
    /// Their number.
    pub len: u64,
    /// What names them: the digest of the manifest read, which names every layer by its digest.
    pub identity: String,
    /// The registry's HTTP client (none for an archive).
    pub client: Option<Arc<crate::source::http::Client>>,
}

impl From<OpenedDisk> for crate::source::open::Opened {
    fn from(disk: OpenedDisk) -> Self {
        let input = crate::source::open::Input::Stream {
            reader: disk.reader,
            len: Some(disk.len),
            identity: Some(disk.identity),
        };
        crate::source::open::Opened { input, client: disk.client }
    }
}

/// Opens the disk file of `image` as a forward-only stream.
pub fn open(image: &ImageRef, options: &HttpOptions) -> Result<OpenedDisk> {
    let (_, store, client) = store_for(image, options)?;
    let resolved = manifest::resolve(&image.spec, store.as_ref(), &image.platform()?)?;
    log::info!(
        "{}: manifest {} ({}, {} layers)",
        image.spec,
        resolved.digest,
        resolved.config.architecture,
        resolved.layers.len()
    );
    let identity = format!("manifest {}", resolved.digest);
    let disk = layers::DiskReader::open(&image.spec, store, resolved.layers)?;
    let len = disk.len();
    Ok(OpenedDisk { reader: Box::new(disk), len, identity, client })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker(text: &str) -> DockerRef {
        match Reference::parse(text).unwrap() {
            Reference::Docker(d) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn docker_references() {
        let d = docker("docker://127.0.0.1:5000/containerdisks/fedora:41");
        assert_eq!((d.registry.as_str(), d.repository.as_str()), ("127.0.0.1:5000", "containerdisks/fedora"));
        assert_eq!(d.tag_or_digest, TagOrDigest::Tag("41".into()));
        let d = docker("docker://quay.io/containerdisks/fedora");
        assert_eq!(d.tag_or_digest, TagOrDigest::Tag("latest".into()));
        let d = docker("docker://fedora");
        assert_eq!(
            (d.registry.as_str(), d.repository.as_str(), d.api_host()),
            ("docker.io", "library/fedora", "registry-1.docker.io")
        );
        let d = docker("docker://localhost/a/b/c:v1.0-rc_1");
        assert_eq!((d.registry.as_str(), d.repository.as_str()), ("localhost", "a/b/c"));
        let hex = "a".repeat(64);
        let d = docker(&format!("docker://h:1/r@sha256:{hex}"));
        assert_eq!(d.tag_or_digest, TagOrDigest::Digest(format!("sha256:{hex}")));
        assert_eq!(d.pinned("sha256:x"), "docker://h:1/r@sha256:x");
        for bad in [
            "docker://",
            "docker://h:1/Upper",
            "docker://h:1/r:bad tag",
            "docker://h:1/r@sha256:abc",
            "docker://h:1/r@md5:abc",
            &format!("docker://h:1/r:t@sha256:{hex}"),
            "docker://h:1/r:",
            "docker://h:1/-r",
            "ftp://x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn archive_references() {
        assert_eq!(
            Reference::parse("oci-archive:/tmp/a.tar:v1").unwrap(),
            Reference::OciArchive { path: "/tmp/a.tar".into(), tag: Some("v1".into()) }
        );
        assert_eq!(
            Reference::parse("oci-archive:/tmp/a.tar").unwrap(),
            Reference::OciArchive { path: "/tmp/a.tar".into(), tag: None }
        );
        assert_eq!(
            Reference::parse("oci-archive:/tmp/x:y/a.tar").unwrap(),
            Reference::OciArchive { path: "/tmp/x:y/a.tar".into(), tag: None }
        );
        assert!(Reference::parse("oci-archive:").is_err());
        assert!(
            ImageRef::is_image("docker://x/y") && ImageRef::is_image("oci-archive:a") && !ImageRef::is_image("a.img")
        );
    }

    #[test]
    fn verified_blobs_check_length_and_digest() {
        let data = b"hello blob".to_vec();
        let digest = sha256_digest(&data);
        let mut ok = verified(Box::new(io::Cursor::new(data.clone())), "img", "layer 1", &digest, data.len() as u64);
        let mut out = Vec::new();
        ok.read_to_end(&mut out).unwrap();
        assert!(ok.is_verified());
        assert_eq!(out, data);
        let err = |reader: &mut Verified| {
            let e = reader.read_to_end(&mut Vec::new()).unwrap_err();
            let e = *e.into_inner().unwrap().downcast::<Error>().unwrap();
            (e.kind(), e.to_string())
        };
        let (kind, text) =
            err(&mut verified(Box::new(io::Cursor::new(b"hello blub".to_vec())), "img", "layer 1", &digest, 10));
        assert_eq!(kind, ErrorKind::ChecksumMismatch);
        assert!(text.starts_with("img: verifying layer 1: digest mismatch"), "{text}");
        let (kind, _) = err(&mut verified(Box::new(io::Cursor::new(data.clone())), "img", "layer 1", &digest, 9));
        assert_eq!(kind, ErrorKind::ChecksumMismatch);
        let (kind, text) = err(&mut verified(Box::new(io::Cursor::new(data.clone())), "img", "layer 1", &digest, 11));
        assert_eq!(kind, ErrorKind::BadImage);
        assert!(text.contains("ends after 10 of its 11 bytes"), "{text}");
    }
}
