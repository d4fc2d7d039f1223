//! Objects in S3 and GCS buckets. An object is an HTTP(S) resource that honours Range requests, so it is opened
//! through the HTTP source (`source/http/`) with a [`Authorize`](super::http::Authorize) hook that signs every
//! request: qcow2/vmdk/… objects are read in place, compressed ones stream front to back, with the HTTP source's
//! retries, stall timeout, ETag checks and counts.
//!
//! `s3.rs` addresses and signs S3 requests (SigV4 through the AWS SDK's own signer), `aws.rs` finds AWS
//! credentials the way the SDKs do, `gcs.rs` addresses GCS objects and gets their OAuth2 tokens.

mod aws;
mod gcs;
mod s3;

use super::http::{self, Client, Remote};
use super::HttpOptions;
use crate::error::{Error, Result};
use crate::source::ReadAt;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// Which object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Amazon S3 or a server speaking its API.
    S3,
    /// Google Cloud Storage (or fake-gcs-server).
    Gcs,
}

/// One object: `s3://BUCKET/KEY`, `gs://BUCKET/OBJECT`, or CDI's `http(s)://HOST[:PORT]/BUCKET/KEY` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// The store's API.
    pub store: Store,
    /// `scheme://host[:port]` of the server, when not the store's own (AWS, storage.googleapis.com); a
    /// command-line `--endpoint-url` applies when this is `None`.
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// The key (object name), `/` and spaces included, not encoded.
    pub key: String,
    /// The S3 region the endpoint names, as CDI's `extractRegion` derives it; explicit settings win.
    pub region: Option<String>,
}

impl ObjectRef {
    /// `s3://BUCKET/KEY` or `gs://BUCKET/OBJECT`; `None` when `text` has neither scheme.
    pub fn parse_uri(text: &str) -> Option<std::result::Result<ObjectRef, String>> {
        let (store, rest) = if let Some(rest) = strip_prefix_ignore_case(text, "s3://") {
            (Store::S3, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(text, "gs://") {
            (Store::Gcs, rest)
        } else {
            return None;
        };
        Some(split_bucket_key(rest).map(|(bucket, key)| ObjectRef { store, endpoint: None, bucket, key, region: None }))
    }

    /// CDI's endpoint form `http(s)://HOST[:PORT]/BUCKET/KEY` (path-style); for S3 the region comes from the host
    /// as CDI's `extractRegion` takes it.
    pub fn from_endpoint_url(store: Store, text: &str) -> std::result::Result<ObjectRef, String> {
        let url = url::Url::parse(text).map_err(|e| format!("invalid endpoint {text:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("invalid endpoint {text:?}: expected http(s)://HOST[:PORT]/BUCKET/KEY"));
        }
        let path = percent_decode(url.path().trim_start_matches('/'));
        let (bucket, key) = split_bucket_key(&path)?;
        let host = http::host_header(&url);
        let region = (store == Store::S3).then(|| s3::extract_region(&host));
        let endpoint = format!("{}://{host}", url.scheme());
        Ok(ObjectRef { store, endpoint: Some(endpoint), bucket, key, region })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.endpoint, self.store) {
            (Some(endpoint), _) => write!(f, "{endpoint}/{}/{}", self.bucket, self.key),
            (None, Store::S3) => write!(f, "s3://{}/{}", self.bucket, self.key),
            (None, Store::Gcs) => write!(f, "gs://{}/{}", self.bucket, self.key),
        }
    }
}

impl serde::Serialize for ObjectRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How to reach object stores, besides the HTTP options (CA directories, retries, stall timeout).
#[derive(Debug, Clone, Default)]
pub struct ObjectOptions {
    /// The S3 endpoint for `s3://` objects (`--endpoint-url`, `AWS_ENDPOINT_URL`); AWS when `None`.
    pub endpoint_url: Option<String>,
    /// The S3 region (`--region`, `AWS_REGION`), overriding the one the endpoint or profile gives.
    pub region: Option<String>,
    /// Address buckets in the path (`https://HOST/BUCKET/KEY`) even where virtual-hosted style would work.
    pub path_style: bool,
}

/// Opens `object` as an HTTP source whose requests are authorized for its store. Credentials given in `options`
/// (`username` = access key id, `password` = secret key) are S3 keys.
pub fn open(object: &ObjectRef, options: &HttpOptions) -> Result<(Arc<Client>, Remote)> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let pinned = Arc::new(Pinned::default());
    let client = match object.store {
        Store::S3 => s3::client(object, options, &env, pinned.clone())?,
        Store::Gcs => gcs::client(object, options, &env, pinned.clone())?,
    };
    let (client, remote) = http::open_with(Arc::new(client))?;
    let identity = match &remote {
        Remote::Random(source) => source.identity(),
        Remote::Stream(stream) => stream.identity(),
    };
    if let Some(etag) = identity.as_deref().and_then(|i| i.strip_prefix("etag ")) {
        pinned.0.get_or_init(|| etag.to_string());
    }
    Ok((client, remote))
}

/// The ETag the probe saw: every later request carries `If-Match` with it, so the server refuses (412) to serve
/// a replaced object's bytes instead of the import mixing two versions.
#[derive(Default)]
pub(super) struct Pinned(OnceLock<String>);

impl Pinned {
    /// `If-Match`, once the ETag is known.
    fn header(&self) -> Option<(String, String)> {
        self.0.get().map(|etag| ("If-Match".to_string(), etag.clone()))
    }

    /// The message for a 412 answer to a request that carried `If-Match`.
    fn changed(&self, object: &ObjectRef, status: u16) -> Option<String> {
        let etag = self.0.get().filter(|_| status == 412)?;
        Some(format!(
            "the object changed during the import: bucket \"{}\" key \"{}\" no longer has ETag {etag} (HTTP 412)",
            object.bucket, object.key
        ))
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// `BUCKET/KEY` split at the first `/`, both non-empty.
fn split_bucket_key(path: &str) -> std::result::Result<(String, String), String> {
    match path.split_once('/') {
        Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok((bucket.to_string(), key.to_string())),
        _ => Err(format!("{path:?} does not name an object: expected BUCKET/KEY")),
    }
}

/// Percent-encodes a key for a URL path: everything but RFC 3986 unreserved bytes and `/` (S3's and GCS's XML
/// API's rule, which SigV4's canonical URI repeats).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes a form or query value (everything but unreserved bytes).
fn encode_component(value: &str) -> String {
    encode_key(value).replace('/', "%2F")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|d| std::str::from_utf8(d).ok());
        match (bytes[i], hex.and_then(|d| u8::from_str_radix(d, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text of the first `<tag>…</tag>` in an XML answer (S3 errors, STS results), entities decoded.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    let text = &xml[start..end];
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// An error about `object`, for usage mistakes found before any request.
fn usage(object: &ObjectRef, what: impl Into<String>) -> Error {
    Error::usage(what).at_path(object.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_uris_split_at_the_first_slash() {
        let o = ObjectRef::parse_uri("s3://bkt/dir/a b.qcow2").unwrap().unwrap();
        assert_eq!((o.store, o.bucket.as_str(), o.key.as_str()), (Store::S3, "bkt", "dir/a b.qcow2"));
        assert_eq!(o.to_string(), "s3://bkt/dir/a b.qcow2");
        let g = ObjectRef::parse_uri("GS://b/o").unwrap().unwrap();
        assert_eq!(g.store, Store::Gcs);
        assert!(ObjectRef::parse_uri("s3://bucket-only").unwrap().is_err());
        assert!(ObjectRef::parse_uri("s3:///key").unwrap().is_err());
        assert!(ObjectRef::parse_uri("https://h/b/k").is_none());
    }

    #[test]
    fn cdi_endpoints_are_path_style_with_the_region_from_the_host() {
        let o = ObjectRef::from_endpoint_url(Store::S3, "https://s3.eu-west-1.amazonaws.com/bkt/d/a%20b.img").unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("https://s3.eu-west-1.amazonaws.com"));
        assert_eq!((o.bucket.as_str(), o.key.as_str()), ("bkt", "d/a b.img"));
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        let local = ObjectRef::from_endpoint_url(Store::S3, "http://minio.local:9000/b/k").unwrap();
        assert_eq!(local.region.as_deref(), Some("minio"));
        assert_eq!(local.endpoint.as_deref(), Some("http://minio.local:9000"));
        assert!(ObjectRef::from_endpoint_url(Store::Gcs, "http://h:4443/bucket").is_err());
    }

    #[test]
    fn keys_are_encoded_like_s3_canonical_uris() {
        assert_eq!(encode_key("dir/a b+c~d_e.qcow2"), "dir/a%20b%2Bc~d_e.qcow2");
        assert_eq!(encode_key("ü"), "%C3%BC");
        assert_eq!(encode_component("a/b c"), "a%2Fb%20c");
        assert_eq!(percent_decode("a%20b%2Fc%zz"), "a b/c%zz");
        let xml = "<Error><Code>NoSuchKey</Code><Message>a &amp; b</Message></Error>";
        assert_eq!(xml_text(xml, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(xml_text(xml, "Message").as_deref(), Some("a & b"));
        assert_eq!(xml_text(xml, "Key"), None);
    }
}
