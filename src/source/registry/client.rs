//! The Distribution API v2 over the crate's HTTP client: the `/v2/` ping (HTTPS, or plain HTTP for an insecure
//! registry without TLS), anonymous, basic and Bearer-token auth from the `WWW-Authenticate` challenge, manifests
//! by tag or digest, and blobs as resumable streams. Redirects (a blob served from object storage) are followed
//! without sending the registry's `Authorization` to another origin.

use super::manifest::ACCEPT;
use super::{fail, step_error, BlobStore, DockerRef, Fetched, TagOrDigest, MAX_MANIFEST};
use crate::error::{Error, ErrorKind, Result};
use crate::source::http::{backoff, basic_auth_value, is_stop, is_timeout, Client, Response};
use crate::source::HttpOptions;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use url::Url;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;
/// Largest token-service answer accepted.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// Largest error body read (for its message).
const MAX_ERROR_BODY: u64 = 16 << 10;

/// A repository in a registry.
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    /// The image, for messages.
    image: String,
    http: Arc<Client>,
    /// `scheme://host:port/`.
    base: Url,
    repository: String,
    reference: TagOrDigest,
    credentials: Option<(String, String)>,
    /// `Authorization` sent to the registry's origin.
    auth: Mutex<Option<String>>,
    retries: u32,
}

impl Registry {
    /// Pings `docker`'s registry (HTTPS; with `options.insecure` also plain HTTP when TLS fails) and
    /// authenticates as its challenge asks.
    pub fn connect(image: &str, docker: &DockerRef, options: &HttpOptions) -> Result<Registry> {
        let credentials = options.username.clone().map(|user| (user, options.password.clone().unwrap_or_default()));
        // Credentials are sent by this module, to the registry and its token service only.
        let http_options = HttpOptions { username: None, password: None, ..options.clone() };
        let host = docker.api_host();
        let schemes: &[&str] = if options.insecure { &["https", "http"] } else { &["https"] };
        let mut last = None;
        for scheme in schemes {
            let base = Url::parse(&format!("{scheme}://{host}/"))
                .map_err(|e| Error::usage(format!("invalid registry host {host:?}: {e}")).at_path(image))?;
            let http = Client::new(base.as_str(), &http_options)
                .map(Arc::new)
                .map_err(|e| step_error(image, "connecting to the registry", e))?;
            let inner = Inner {
                image: image.to_string(),
                http,
                base,
                repository: docker.repository.clone(),
                reference: docker.tag_or_digest.clone(),
                credentials: credentials.clone(),
                auth: Mutex::new(None),
                retries: options.retries,
            };
            match inner.ping() {
                Ok(()) => return Ok(Registry { inner: Arc::new(inner) }),
                Err(e) if *scheme == "https" && options.insecure && e.kind() == ErrorKind::Io => {
                    log::info!("{image}: HTTPS failed ({e}); trying plain HTTP (insecure registry)");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| fail(image, ErrorKind::Io, "connecting to the registry", "no scheme left")))
    }
}

impl Registry {
    /// The HTTP client (its request count goes into the report).
    pub fn client(&self) -> Arc<Client> {
        self.inner.http.clone()
    }
}

impl Inner {
    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .map_err(|e| fail(&self.image, ErrorKind::BadImage, "building a request", format!("{path:?}: {e}")))
    }

    fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
    }

    /// `GET /v2/`: reachable, and what auth it wants.
    fn ping(&self) -> Result<()> {
        let step = "connecting to the registry";
        let url = self.url("v2/")?;
        let response = self.http.request(&url, None, true, &[]).map_err(|e| {
            let e = step_error(&self.image, step, e);
            if url.scheme() == "https" {
                log::info!("{}: a registry that serves plain HTTP needs --insecure (INSECURE_TLS=true)", self.image);
            }
            e
        })?;
        match response.status {
            200..=299 => {
                drain(response, &self.http);
                log::debug!("{}: {} needs no authentication", self.image, self.base);
                Ok(())
            }
            401 => {
                let challenge = response.header("www-authenticate").map(str::to_string);
                drop(response);
                self.authorize(challenge.as_deref(), None)
            }
            status => Err(fail(
                &self.image,
                ErrorKind::Io,
                step,
                format!("{url} answered HTTP {status}: not a Distribution v2 registry"),
            )),
        }
    }

    /// Sets the `Authorization` the registry's challenge asks for: basic credentials, or a token from its token
    /// service (for `scope`, else pull access to the repository).
    fn authorize(&self, challenge: Option<&str>, scope: Option<&str>) -> Result<()> {
        let step = "authenticating";
        let Some((scheme, params)) = challenge.and_then(parse_challenge) else {
            return Err(fail(&self.image, ErrorKind::Io, step, "HTTP 401 without a usable WWW-Authenticate challenge"));
        };
        match scheme.as_str() {
            "basic" => match &self.credentials {
                Some((user, pass)) => {
                    *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(basic_auth_value(user, pass));
                    Ok(())
                }
                None => Err(fail(
                    &self.image,
                    ErrorKind::Io,
                    step,
                    "the registry requires credentials (HTTP 401); pass --user",
                )),
            },
            "bearer" => {
                let token = self.token(&params, scope)?;
                *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("Bearer {token}"));
                Ok(())
            }
            other => Err(fail(
                &self.image,
                ErrorKind::Unsupported,
                step,
                format!("unsupported authentication scheme {other:?}"),
            )),
        }
    }

    /// A Bearer token from the realm of a challenge (basic credentials sent to it when given).
    fn token(&self, params: &[(String, String)], scope: Option<&str>) -> Result<String> {
        let step = "authenticating";
        let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let realm =
            param("realm").ok_or_else(|| fail(&self.image, ErrorKind::Io, step, "Bearer challenge without a realm"))?;
        let mut url = Url::parse(realm)
            .map_err(|e| fail(&self.image, ErrorKind::Io, step, format!("invalid token realm {realm:?}: {e}")))?;
        let default_scope = format!("repository:{}:pull", self.repository);
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = param("service") {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope.or(param("scope")).unwrap_or(&default_scope));
        }
        let basic = self.credentials.as_ref().map(|(u, p)| basic_auth_value(u, p));
        let mut headers = vec![("Accept", "application/json")];
        if let Some(basic) = &basic {
            headers.push(("Authorization", basic));
        }
        let response = self.http.request(&url, None, true, &headers).map_err(|e| step_error(&self.image, step, e))?;
        match response.status {
            200..=299 => {}
            401 | 403 => {
                let what = if basic.is_some() { "credentials refused" } else { "anonymous access refused" };
                return Err(fail(
                    &self.image,
                    ErrorKind::Io,
                    step,
                    format!("{what} by the token service (HTTP {})", response.status),
                ));
            }
            status => {
                return Err(fail(&self.image, ErrorKind::Io, step, format!("token service answered HTTP {status}")))
            }
        }
        let body = read_capped(response, &self.http, MAX_TOKEN_ANSWER).map_err(|e| step_error(&self.image, step, e))?;
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| fail(&self.image, ErrorKind::Io, step, format!("unreadable token answer: {e}")))?;
        let token = if answer.token.is_empty() { answer.access_token } else { answer.token };
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(fail(&self.image, ErrorKind::Io, step, "the token service gave no usable token"));
        }
        log::debug!("{}: token from {}", self.image, url.origin().ascii_serialization());
        Ok(token)
    }

    /// `GET url` with `accept`, following redirects (no `Authorization` to another origin) and answering one 401
    /// with a new token; any status but 2xx is an error of `step`.
    fn get(&self, url: Url, accept: Option<&str>, range: Option<u64>, step: &str) -> Result<Response> {
        let mut url = url;
        let mut reauthorized = false;
        for _ in 0..=MAX_REDIRECTS {
            let auth =
                if self.same_origin(&url) { self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone() } else { None };
            let mut headers = Vec::new();
            if let Some(accept) = accept {
                headers.push(("Accept", accept));
            }
            if let Some(auth) = &auth {
                headers.push(("Authorization", auth.as_str()));
            }
            let response = self
                .http
                .request(&url, range.map(|start| (start, None)), true, &headers)
                .map_err(|e| step_error(&self.image, step, e))?;
            match response.status {
                200..=299 => return Ok(response),
                301 | 302 | 303 | 307 | 308 => {
                    let location = response
                        .header("location")
                        .ok_or_else(|| {
                            fail(
                                &self.image,
                                ErrorKind::Io,
                                step,
                                format!("redirect {} without a Location", response.status),
                            )
                        })?
                        .to_string();
                    drop(response);
                    url = url.join(&location).map_err(|e| {
                        fail(&self.image, ErrorKind::Io, step, format!("redirect to an invalid location: {e}"))
                    })?;
                    log::debug!("{}: redirected to {}", self.image, url.origin().ascii_serialization());
                }
                401 if !reauthorized && self.same_origin(&url) => {
                    let challenge = response.header("www-authenticate").map(str::to_string);
                    drop(response);
                    let had_auth = auth.is_some();
                    let scope = challenge
                        .as_deref()
                        .and_then(parse_challenge)
                        .and_then(|(_, p)| p.into_iter().find(|(k, _)| k == "scope").map(|(_, v)| v));
                    if had_auth
                        && challenge
                            .as_deref()
                            .is_some_and(|c| c.trim_start().to_ascii_lowercase().starts_with("basic"))
                    {
                        return Err(fail(&self.image, ErrorKind::Io, step, "credentials refused (HTTP 401)"));
                    }
                    self.authorize(challenge.as_deref(), scope.as_deref())?;
                    reauthorized = true;
                }
                401 | 403 => {
                    let what = if self.credentials.is_some() {
                        "credentials refused"
                    } else {
                        "authentication required; pass --user"
                    };
                    let status = response.status;
                    let detail = error_detail(response, &self.http);
                    return Err(fail(&self.image, ErrorKind::Io, step, format!("{what} (HTTP {status}{detail})")));
                }
                status => {
                    let detail = error_detail(response, &self.http);
                    return Err(fail(
                        &self.image,
                        ErrorKind::Io,
                        step,
                        format!("registry answered HTTP {status}{detail}"),
                    ));
                }
            }
        }
        Err(fail(&self.image, ErrorKind::Io, step, format!("more than {MAX_REDIRECTS} redirects")))
    }

    fn fetch_manifest(&self, reference: &str, accept: &str) -> Result<Fetched> {
        let step = "fetching the manifest";
        let url = self.url(&format!("v2/{}/manifests/{reference}", self.repository))?;
        let response = self.get(url, Some(accept), None, step)?;
        if let Some(len) = response.content_length() {
            if len > MAX_MANIFEST {
                return Err(fail(
                    &self.image,
                    ErrorKind::BadImage,
                    step,
                    format!("the manifest is {len} bytes, more than the {MAX_MANIFEST} accepted"),
                ));
            }
        }
        let media_type = response.header("content-type").map(str::to_string);
        let header_digest = response.header("docker-content-digest").map(|d| d.trim().to_string());
        let bytes = read_capped(response, &self.http, MAX_MANIFEST).map_err(|e| {
            if e.kind() == ErrorKind::BadImage {
                fail(
                    &self.image,
                    ErrorKind::BadImage,
                    step,
                    format!("the manifest is more than the {MAX_MANIFEST} bytes accepted"),
                )
            } else {
                step_error(&self.image, step, e)
            }
        })?;
        let pinned = reference.starts_with("sha256:").then(|| reference.to_string());
        let digest = match (pinned, header_digest.filter(|d| d.starts_with("sha256:"))) {
            (Some(pinned), Some(header)) if pinned != header => {
                return Err(fail(
                    &self.image,
                    ErrorKind::ChecksumMismatch,
                    step,
                    format!("the registry says the manifest is {header}, but it was asked for {pinned}"),
                ))
            }
            (Some(pinned), _) => Some(pinned),
            (None, header) => header,
        };
        Ok(Fetched { bytes, media_type, digest })
    }
}

impl BlobStore for Registry {
    fn top(&self) -> Result<Fetched> {
        self.inner.fetch_manifest(self.inner.reference.as_str(), ACCEPT)
    }

    fn manifest(&self, digest: &str, media_type: &str) -> Result<Fetched> {
        let accept = if media_type.is_empty() { ACCEPT } else { media_type };
        self.inner.fetch_manifest(digest, accept)
    }

    fn blob(&self, digest: &str, size: u64) -> Result<Box<dyn Read + Send>> {
        let mut stream = BlobStream {
            inner: self.inner.clone(),
            digest: digest.to_string(),
            size,
            pos: 0,
            response: None,
            failures: 0,
        };
        stream.response = Some(stream.open()?);
        Ok(Box::new(stream))
    }
}

/// A blob read front to back, resuming with `Range` after a dropped connection.
struct BlobStream {
    inner: Arc<Inner>,
    digest: String,
    size: u64,
    pos: u64,
    response: Option<Response>,
    failures: u32,
}

impl BlobStream {
    fn step(&self) -> String {
        format!("downloading blob {}", self.digest)
    }

    fn open(&self) -> Result<Response> {
        let url = self.inner.url(&format!("v2/{}/blobs/{}", self.inner.repository, self.digest))?;
        let range = (self.pos > 0).then_some(self.pos);
        let mut response = self.inner.get(url, None, range, &self.step())?;
        if self.pos > 0 {
            match (response.status, response.content_range()) {
                (206, Some((start, _, _))) if start == self.pos => {}
                (200, _) => {
                    // No Range support: read again what was delivered, and drop it.
                    let mut skip = self.pos;
                    let mut sink = vec![0u8; 64 << 10];
                    while skip > 0 {
                        let n = (skip as usize).min(sink.len());
                        let got = response
                            .read(&mut sink[..n])
                            .map_err(|e| self.error(format!("skipping to the resume offset: {e}")))?;
                        if got == 0 {
                            return Err(self.error("the blob ended before the resume offset".into()));
                        }
                        skip -= got as u64;
                    }
                }
                (status, _) => return Err(self.error(format!("the registry did not resume the blob (HTTP {status})"))),
            }
        }
        Ok(response)
    }

    fn error(&self, what: String) -> Error {
        fail(&self.inner.image, ErrorKind::Io, &self.step(), what).at_offset(self.pos)
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.response.is_none() {
                self.response = Some(self.open()?);
            }
            let response = self.response.as_mut().expect("just opened");
            let why = match response.read(buf) {
                Ok(0) if self.pos >= self.size => {
                    let response = self.response.take().expect("open");
                    response
                        .finish(&self.inner.http, Duration::ZERO)
                        .map_err(|e| step_error(&self.inner.image, &self.step(), e))?;
                    return Ok(0);
                }
                // A registry that sends fewer bytes than the descriptor says: the digest check names it.
                Ok(0) if response.content_length().is_some_and(|l| response.delivered() >= l) => return Ok(0),
                Ok(0) => "the connection closed before the end of the blob".to_string(),
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if is_stop(&e) => return Err(self.inner.http.io_error("reading a blob", e)),
                Err(e) if is_timeout(&e) => {
                    return Err(self.error(format!(
                        "no data for {} s (stalled)",
                        self.inner.http.options.stall_timeout.as_secs_f64()
                    )));
                }
                Err(e) => e.to_string(),
            };
            self.response = None;
            self.failures += 1;
            if self.failures > self.inner.retries {
                return Err(self.error(format!("transfer failed {} times in a row, giving up: {why}", self.failures)));
            }
            log::warn!(
                "{}: {why} at offset {} of blob {}; resuming (retry {} of {})",
                self.inner.image,
                self.pos,
                self.digest,
                self.failures,
                self.inner.retries
            );
            self.inner.http.pause(backoff(self.failures))?;
        }
    }
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_some(buf).map_err(io::Error::other)
    }
}

/// Reads a whole body of at most `cap` bytes (more is a [`ErrorKind::BadImage`] error) and recycles the
/// connection.
fn read_capped(response: Response, http: &Client, cap: u64) -> Result<Vec<u8>> {
    let mut response = response;
    let mut bytes = Vec::new();
    (&mut response).take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io("reading the answer", e))?;
    if bytes.len() as u64 > cap {
        return Err(Error::bad_image(format!("answer longer than {cap} bytes")));
    }
    response.finish(http, Duration::ZERO)?;
    Ok(bytes)
}

/// Reads the rest of a small body so its connection can be reused.
fn drain(response: Response, http: &Client) {
    let _ = read_capped(response, http, MAX_ERROR_BODY);
}

/// `: CODE: message` from a registry's JSON error body, when it has one.
fn error_detail(response: Response, http: &Client) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let Ok(bytes) = read_capped(response, http, MAX_ERROR_BODY) else { return String::new() };
    let Ok(body) = serde_json::from_slice::<Body>(&bytes) else { return String::new() };
    let parts: Vec<String> = body
        .errors
        .iter()
        .take(3)
        .map(|e| {
            let text = format!("{}: {}", e.code, e.message);
            text.chars().filter(|c| !c.is_control()).take(200).collect()
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(", {}", parts.join("; "))
    }
}

/// Parses a `WWW-Authenticate` challenge: the scheme (lower case) and its `key="value"` parameters.
pub fn parse_challenge(text: &str) -> Option<(String, Vec<(String, String)>)> {
    let text = text.trim();
    let (scheme, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            break;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.to_ascii_lowercase(), value));
        if params.len() > 32 {
            break;
        }
    }
    Some((scheme.to_ascii_lowercase(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(scheme, "bearer");
        assert_eq!(
            params,
            [
                ("realm".to_string(), "https://auth.example/token".to_string()),
                ("service".to_string(), "registry.example".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string())
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!((scheme.as_str(), params.len()), ("basic", 1));
        let (_, params) = parse_challenge(r#"Bearer realm=x, error="a \"q\"""#).unwrap();
        assert_eq!(params[1].1, "a \"q\"");
        assert!(parse_challenge("").is_none());
    }
}
