//! S3: where an object lives (path-style or virtual-hosted), its region, and SigV4 header signing of every GET
//! with `UNSIGNED-PAYLOAD`, done by `aws-sigv4` (the AWS SDK's own signer) so no request crypto is ours.

use super::aws::{self, Credentials, Provider};
use super::{encode_key, usage, xml_text, ObjectRef, Pinned};
use crate::error::Result;
use crate::source::http::{host_header, Authorize, Client};
use crate::source::HttpOptions;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;
use url::Url;

/// Region when nothing names one (the SDKs' global endpoint's).
const DEFAULT_REGION: &str = "us-east-1";

/// The client for `object`: its URL, and a signer with credentials from `options` or the standard chain.
pub(super) fn client(
    object: &ObjectRef,
    options: &HttpOptions,
    env: &dyn Fn(&str) -> Option<String>,
    pinned: Arc<Pinned>,
) -> Result<Client> {
    let given = match (&options.username, &options.password) {
        (Some(key), Some(secret)) => Some(Credentials::new(key, secret, None)),
        _ => None,
    };
    let profile = aws::Profile::load(env);
    let region = options
        .object
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| object.region.clone())
        .or_else(|| profile.as_ref().and_then(|p| p.get("region")))
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    let url = object_url(object, &options.object, &region).map_err(|e| usage(object, e))?;
    let provider = Provider::resolve(given, profile.as_ref(), &region, options, env)?;
    log::info!("{object}: S3 object at {url}, region {region}, {}", provider.describe());
    let signer = Signer { object: object.clone(), region, provider, pinned };
    Client::with_authorizer(url.as_str(), &object.to_string(), options, Arc::new(signer))
}

/// The object's URL: on its own endpoint (CDI's, path-style), on `--endpoint-url`, or on AWS. Buckets go into the
/// host name (virtual-hosted, as the AWS CLI does) unless path style is asked for, the host is an address or
/// `localhost`, or the bucket name is not a DNS label.
fn object_url(object: &ObjectRef, options: &super::ObjectOptions, region: &str) -> std::result::Result<Url, String> {
    let key = encode_key(&object.key);
    let (base, path_style) = match (&object.endpoint, &options.endpoint_url) {
        (Some(endpoint), _) => (endpoint.clone(), true),
        (None, Some(endpoint)) => (endpoint.trim_end_matches('/').to_string(), options.path_style),
        (None, None) => (format!("https://s3.{region}.amazonaws.com"), options.path_style),
    };
    let base = Url::parse(&base).map_err(|e| format!("invalid endpoint {base:?}: {e}"))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        return Err(format!("invalid endpoint {base}: expected http(s)://HOST[:PORT]"));
    }
    let host = base.host_str().unwrap_or_default();
    let addressable = host.trim_matches(['[', ']']).parse::<IpAddr>().is_err() && host != "localhost";
    let text = if path_style || !addressable || !dns_compatible(&object.bucket) {
        format!("{}://{}/{}/{key}", base.scheme(), host_header(&base), encode_key(&object.bucket))
    } else {
        format!("{}://{}.{}/{key}", base.scheme(), object.bucket, host_header(&base))
    };
    Url::parse(&text).map_err(|e| format!("invalid object URL {text:?}: {e}"))
}

/// A bucket name usable as a host label under TLS (no dots, lower case, 3–63 characters).
fn dns_compatible(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !bucket.starts_with('-')
        && !bucket.ends_with('-')
}

/// CDI's `extractRegion`: `s3.REGION.amazonaws.com` gives REGION, any other host its first dot-separated label.
pub(super) fn extract_region(host: &str) -> String {
    if let Some(rest) = host.find("s3.").map(|i| &host[i + 3..]) {
        if let Some(end) = rest.rfind(".amazonaws.com").filter(|&end| end > 0) {
            return rest[..end].to_string();
        }
    }
    host.split('.').next().unwrap_or_default().to_string()
}

/// Signs each request of one object.
struct Signer {
    object: ObjectRef,
    region: String,
    provider: Provider,
    pinned: Arc<Pinned>,
}

impl Authorize for Signer {
    fn headers(&self, url: &Url) -> Result<Vec<(String, String)>> {
        let mut headers: Vec<(String, String)> = self.pinned.header().into_iter().collect();
        if let Some(credentials) = self.provider.credentials()? {
            headers.extend(
                sign(url, &credentials, &self.region, SystemTime::now())
                    .map_err(|e| usage(&self.object, format!("signing the request: {e}")))?,
            );
        }
        Ok(headers)
    }

    fn explain(&self, status: u16, body: &[u8]) -> Option<String> {
        if let Some(changed) = self.pinned.changed(&self.object, status) {
            return Some(changed);
        }
        let xml = String::from_utf8_lossy(body);
        let code = xml_text(&xml, "Code").unwrap_or_else(|| {
            match status {
                403 => "AccessDenied",
                404 => "NotFound",
                _ => "error",
            }
            .to_string()
        });
        let message = xml_text(&xml, "Message").map(|m| format!(": {m}")).unwrap_or_default();
        Some(format!(
            "could not get s3 object: \"{}/{}\": {code}{message} (HTTP {status})",
            self.object.bucket, self.object.key
        ))
    }
}

/// SigV4 header auth for a GET of `url`: `x-amz-date`, `x-amz-content-sha256: UNSIGNED-PAYLOAD`, the session
/// token if any, and `authorization`, over the `host` header the client sends.
fn sign(
    url: &Url,
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
) -> std::result::Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode,
    };
    use aws_sigv4::sign::v4;
    let mut settings = SigningSettings::default();
    // S3 signs the path as sent (encoded once, not normalised) and wants the payload hash header.
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    let identity = aws_credential_types::Credentials::new(
        &credentials.access_key,
        &credentials.secret_key,
        credentials.session_token.clone(),
        None,
        "boundimport",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let host = host_header(url);
    let request =
        SignableRequest::new("GET", url.as_str(), [("host", host.as_str())].into_iter(), SignableBody::UnsignedPayload)
            .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(request, &params).map_err(|e| e.to_string())?.into_parts();
    Ok(instructions.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::object::{ObjectOptions, Store};

    fn object(bucket: &str, key: &str) -> ObjectRef {
        ObjectRef { store: Store::S3, endpoint: None, bucket: bucket.into(), key: key.into(), region: None }
    }

    #[test]
    fn regions_come_from_the_host_as_cdi_takes_them() {
        assert_eq!(extract_region("s3.us-west-2.amazonaws.com"), "us-west-2");
        assert_eq!(extract_region("bucket.s3.eu-central-1.amazonaws.com:443"), "eu-central-1");
        assert_eq!(extract_region("minio.example.com:9000"), "minio");
        assert_eq!(extract_region("127.0.0.1:8333"), "127");
    }

    #[test]
    fn buckets_go_into_the_host_where_they_can() {
        let none = ObjectOptions::default();
        let url = |o: &ObjectRef, options: &ObjectOptions| object_url(o, options, "eu-west-1").unwrap().to_string();
        assert_eq!(url(&object("bkt", "a b/c"), &none), "https://bkt.s3.eu-west-1.amazonaws.com/a%20b/c");
        assert_eq!(url(&object("my.bkt", "k"), &none), "https://s3.eu-west-1.amazonaws.com/my.bkt/k");
        let local = ObjectOptions { endpoint_url: Some("http://127.0.0.1:8333/".into()), ..Default::default() };
        assert_eq!(url(&object("bkt", "k"), &local), "http://127.0.0.1:8333/bkt/k");
        let named = ObjectOptions { endpoint_url: Some("https://s3.corp:9000".into()), ..Default::default() };
        assert_eq!(url(&object("bkt", "k"), &named), "https://bkt.s3.corp:9000/k");
        let path = ObjectOptions { path_style: true, ..named };
        assert_eq!(url(&object("bkt", "k"), &path), "https://s3.corp:9000/bkt/k");
        let cdi = ObjectRef::from_endpoint_url(Store::S3, "https://s3.corp/bkt/k%2B1").unwrap();
        assert_eq!(url(&cdi, &none), "https://s3.corp/bkt/k%2B1");
    }

    #[test]
    fn requests_are_signed_with_unsigned_payload_and_the_session_token() {
        let url = Url::parse("https://bkt.s3.us-east-1.amazonaws.com/a%20b").unwrap();
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", Some("token".into()));
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let headers = sign(&url, &credentials, "us-east-1", time).unwrap();
        let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("x-amz-content-sha256"), Some("UNSIGNED-PAYLOAD"));
        assert_eq!(get("x-amz-date"), Some("20231114T221320Z"));
        assert_eq!(get("x-amz-security-token"), Some("token"));
        let auth = get("authorization").unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/us-east-1/s3/aws4_request"));
        assert!(auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token"), "{auth}");
    }
}
