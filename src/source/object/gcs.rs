//! GCS: objects read through the JSON API's media download on `https://storage.googleapis.com`, CDI's custom
//! `http(s)://HOST/BUCKET/OBJECT` endpoint's host, or `STORAGE_EMULATOR_HOST` as Google's libraries take it, with a bearer token
//! from a service-account key file (`GOOGLE_APPLICATION_CREDENTIALS`: the JWT bearer grant, RS256-signed with ring),
//! else from the metadata server (workload identity; `GCE_METADATA_HOST` overrides its address), else anonymous.

use super::{encode_component, ObjectRef, Pinned};
use crate::error::{Error, ErrorKind, Result};
use crate::source::http::{base64, Authorize, Client};
use crate::source::HttpOptions;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use url::Url;

/// Tokens are renewed this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Largest token answer read.
const MAX_TOKEN_ANSWER: u64 = 64 << 10;
/// Largest key file read.
const MAX_KEY_FILE: u64 = 64 << 10;
/// Read-only access to objects.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";
/// The metadata server's name inside Google Cloud.
const METADATA_HOST: &str = "metadata.google.internal";

/// The client for `object` with a token source found as Google's libraries find one.
pub(super) fn client(
    object: &ObjectRef,
    options: &HttpOptions,
    env: &dyn Fn(&str) -> Option<String>,
    pinned: Arc<Pinned>,
) -> Result<Client> {
    let base = match (&object.endpoint, env("STORAGE_EMULATOR_HOST")) {
        (Some(endpoint), _) => endpoint.clone(),
        (None, Some(emulator)) if emulator.contains("://") => emulator.trim_end_matches('/').to_string(),
        (None, Some(emulator)) => format!("http://{emulator}"),
        (None, None) => "https://storage.googleapis.com".to_string(),
    };
    // The JSON API's media download: the same path on Google's endpoint, a custom one and fake-gcs-server.
    let url = format!(
        "{base}/storage/v1/b/{}/o/{}?alt=media",
        encode_component(&object.bucket),
        encode_component(&object.key)
    );
    let token_options = HttpOptions { username: None, password: None, headers: Vec::new(), ..options.clone() };
    let source = match env("GOOGLE_APPLICATION_CREDENTIALS") {
        Some(path) => TokenSource::ServiceAccount(Box::new(ServiceAccount::load(&path, &token_options)?)),
        None => match metadata_client(&token_options, env) {
            Some(client) => TokenSource::Metadata(Box::new(client)),
            None => TokenSource::Anonymous,
        },
    };
    log::info!("{object}: GCS object at {url}, {}", source.describe());
    let authorizer = Bearer { object: object.clone(), source, token: Mutex::new(None), pinned };
    Client::with_authorizer(&url, &object.to_string(), options, Arc::new(authorizer))
}

/// The metadata server's client, when `GCE_METADATA_HOST` is set or its name resolves (inside Google Cloud).
fn metadata_client(options: &HttpOptions, env: &dyn Fn(&str) -> Option<String>) -> Option<Client> {
    use std::net::ToSocketAddrs;
    let host = match env("GCE_METADATA_HOST") {
        Some(host) => host,
        None => {
            (METADATA_HOST, 80).to_socket_addrs().ok()?.next()?;
            METADATA_HOST.to_string()
        }
    };
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token");
    Client::new(&url, options).ok()
}

/// Where bearer tokens come from.
enum TokenSource {
    ServiceAccount(Box<ServiceAccount>),
    Metadata(Box<Client>),
    Anonymous,
}

impl TokenSource {
    fn describe(&self) -> String {
        match self {
            TokenSource::ServiceAccount(account) => format!("service account {}", account.email),
            TokenSource::Metadata(client) => format!("tokens from the metadata server {}", client.name()),
            TokenSource::Anonymous => "anonymous".to_string(),
        }
    }

    /// A new token and how long it lasts.
    fn fetch(&self) -> Result<(String, Duration)> {
        let response = match self {
            TokenSource::Anonymous => unreachable!("anonymous access has no token"),
            TokenSource::ServiceAccount(account) => {
                let form = format!(
                    "grant_type={}&assertion={}",
                    encode_component("urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    account.assertion(SystemTime::now())?
                );
                (account.token_client.post_form(&account.token_uri, &form)?, &account.token_client)
            }
            TokenSource::Metadata(client) => {
                let url = Url::parse(client.name()).map_err(|e| client.error(ErrorKind::Usage, e.to_string()))?;
                (client.request(&url, None, false, &[("Metadata-Flavor", "Google")])?, client.as_ref())
            }
        };
        let (response, client) = response;
        let status = response.status;
        let mut body = Vec::new();
        response.take(MAX_TOKEN_ANSWER).read_to_end(&mut body).map_err(|e| client.io_error("reading the token", e))?;
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = answer["access_token"].as_str().filter(|t| !t.is_empty());
        match (status, token) {
            (200, Some(token)) => {
                let lifetime = Duration::from_secs(answer["expires_in"].as_u64().unwrap_or(3600));
                Ok((token.to_string(), lifetime))
            }
            _ => {
                let why = answer["error_description"].as_str().or(answer["error"].as_str()).unwrap_or("no token");
                Err(client.error(ErrorKind::Io, format!("getting an OAuth2 token failed (HTTP {status}): {why}")))
            }
        }
    }
}

/// A service-account key file's parts that the JWT bearer grant needs.
struct ServiceAccount {
    email: String,
    key_id: Option<String>,
    key: ring::signature::RsaKeyPair,
    token_uri: Url,
    token_client: Client,
}

impl ServiceAccount {
    fn load(path: &str, options: &HttpOptions) -> Result<ServiceAccount> {
        let bad = |what: String| Error::usage(format!("service-account key file: {what}")).at_path(path);
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_KEY_FILE).read_to_string(&mut text))
            .map_err(|e| Error::io("reading GOOGLE_APPLICATION_CREDENTIALS", e).at_path(path))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let field = |name: &str| json[name].as_str().filter(|v| !v.is_empty()).map(str::to_string);
        if field("type").as_deref() != Some("service_account") {
            return Err(bad(format!("type {:?} is not \"service_account\"", field("type").unwrap_or_default())));
        }
        let email = field("client_email").ok_or_else(|| bad("no client_email".into()))?;
        let pem = field("private_key").ok_or_else(|| bad("no private_key".into()))?;
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| bad(format!("private_key is not a PKCS#8 PEM key: {e}")))?
        };
        let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| bad(format!("private_key is not an RSA key: {e}")))?;
        let token_uri = field("token_uri").unwrap_or_else(|| "https://oauth2.googleapis.com/token".to_string());
        let token_client = Client::new(&token_uri, options)?;
        let token_uri = Url::parse(&token_uri).map_err(|e| bad(format!("token_uri: {e}")))?;
        Ok(ServiceAccount { email, key_id: field("private_key_id"), key, token_uri, token_client })
    }

    /// The signed JWT asking `token_uri` for a read-only storage token, valid an hour from `now`.
    fn assertion(&self, now: SystemTime) -> Result<String> {
        let iat = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        let claims = serde_json::json!({
            "iss": self.email, "scope": SCOPE, "aud": self.token_uri.as_str(), "iat": iat, "exp": iat + 3600,
        });
        let signing_input =
            format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()));
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| Error::new(ErrorKind::Io, "signing the token request failed"))?;
        Ok(format!("{signing_input}.{}", base64url(&signature)))
    }
}

/// Base64url without padding (RFC 7515).
fn base64url(bytes: &[u8]) -> String {
    base64(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

/// Adds `Authorization: Bearer` with a cached token, renewed before it expires.
struct Bearer {
    object: ObjectRef,
    source: TokenSource,
    token: Mutex<Option<(String, Instant)>>,
    pinned: Arc<Pinned>,
}

impl Authorize for Bearer {
    fn headers(&self, _url: &Url) -> Result<Vec<(String, String)>> {
        let mut headers: Vec<(String, String)> = self.pinned.header().into_iter().collect();
        if matches!(self.source, TokenSource::Anonymous) {
            return Ok(headers);
        }
        let mut cached = self.token.lock().unwrap_or_else(|p| p.into_inner());
        let valid = |(_, until): &&(String, Instant)| *until > Instant::now() + REFRESH_BEFORE;
        let token = match cached.as_ref().filter(valid) {
            Some((token, _)) => token.clone(),
            None => {
                let (token, lifetime) = self.source.fetch().map_err(|e| e.at_path(self.object.to_string()))?;
                log::debug!("{}: new OAuth2 token, valid {} s", self.object, lifetime.as_secs());
                *cached = Some((token.clone(), Instant::now() + lifetime));
                token
            }
        };
        headers.push(("Authorization".to_string(), format!("Bearer {token}")));
        Ok(headers)
    }

    fn explain(&self, status: u16, body: &[u8]) -> Option<String> {
        if let Some(changed) = self.pinned.changed(&self.object, status) {
            return Some(changed);
        }
        let text = String::from_utf8_lossy(body);
        let detail = super::xml_text(&text, "Code")
            .map(|code| {
                format!("{code}{}", super::xml_text(&text, "Message").map(|m| format!(": {m}")).unwrap_or_default())
            })
            .or_else(|| {
                let json: serde_json::Value = serde_json::from_str(&text).ok()?;
                json["error"]["message"].as_str().map(str::to_string)
            })
            .or_else(|| Some(text.trim().chars().take(200).collect::<String>()).filter(|t| !t.is_empty()))
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        let what = match status {
            404 => "object doesn't exist",
            401 | 403 => "access denied",
            _ => "request failed",
        };
        Some(format!(
            "storage: {what}: bucket \"{}\" object \"{}\" (HTTP {status}{detail})",
            self.object.bucket, self.object.key
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_has_no_padding_or_plus() {
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
    }
}
