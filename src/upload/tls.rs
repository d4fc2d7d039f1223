//! The upload server's TLS: the pod's certificate and key (`TLS_CERT_FILE`, `TLS_KEY_FILE`), client certificates
//! verified against `CLIENT_CERT_FILE` when a client offers one (Go's `VerifyClientCertIfGiven`: a connection
//! without a certificate is accepted and its uploads answered 401, a certificate that does not verify fails the
//! handshake), `TLS_CIPHERS` and `TLS_MIN_VERSION` as CDI's crypto configuration, and the common name of a
//! verified client certificate, read from its DER without a general X.509 parser.

use crate::error::{Error, ErrorKind, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use std::path::Path;
use std::sync::Arc;

/// What the TLS configuration is built from.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles<'a> {
    /// Server certificate chain (PEM).
    pub cert: Option<&'a Path>,
    /// Server private key (PEM).
    pub key: Option<&'a Path>,
    /// CA bundle for client certificates (PEM); without one no client is ever authorised.
    pub client_ca: Option<&'a Path>,
    /// Go names of the TLS 1.2 cipher suites to offer (empty: the defaults). TLS 1.3 suites are always offered,
    /// as in Go.
    pub ciphers: &'a [String],
    /// `VersionTLS12` or `VersionTLS13`; anything else keeps the default (TLS 1.2 and 1.3).
    pub min_version: Option<&'a str>,
}

fn tls_error(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Usage, what)
}

/// Builds the server configuration. Fails (CDI: "Error getting TLS config") when the certificate or key is
/// missing or unreadable.
pub fn server_config(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Vec<String>)> {
    let mut notes = Vec::new();
    let (Some(cert_path), Some(key_path)) = (files.cert, files.key) else {
        return Err(tls_error(
            "Error getting TLS config: invalid TLS config (TLS_CERT_FILE and TLS_KEY_FILE are required)",
        ));
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<std::result::Result<_, _>>())
        .map_err(|e| tls_error(format!("Error getting TLS config: {}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(format!("Error getting TLS config: {}: no certificate", cert_path.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| tls_error(format!("Error getting TLS config: {}: {e}", key_path.display())))?;

    let mut provider = rustls::crypto::ring::default_provider();
    select_ciphers(&mut provider, files.ciphers, &mut notes);
    let provider = Arc::new(provider);
    let versions: &[&'static SupportedProtocolVersion] = match files.min_version {
        Some("VersionTLS13") => &[&rustls::version::TLS13],
        Some("VersionTLS12") | None => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some(other) => {
            notes.push(format!("TLS_MIN_VERSION {other:?}: TLS 1.2 is the oldest version offered"));
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        }
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| tls_error(format!("Error getting TLS config: {e}")))?;

    let builder = match files.client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_path)
                .and_then(|certs| certs.collect::<std::result::Result<_, _>>())
                .map_err(|e| tls_error(format!("Error getting TLS config: {}: {e}", ca_path.display())))?;
            let (added, _ignored) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(tls_error(format!(
                    "Error getting TLS config: {}: no CA certificate for client verification",
                    ca_path.display()
                )));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_error(format!("Error getting TLS config: client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => {
            notes.push("CLIENT_CERT_FILE is not set: no client certificate is verified, every upload gets 401".into());
            builder.with_no_client_auth()
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(format!("Error getting TLS config: {}: {e}", cert_path.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), notes))
}

/// Keeps the TLS 1.2 suites named in `names` (Go's names; unknown names are ignored, as Go's
/// `CipherSuitesIDs` ignores them) and every TLS 1.3 suite.
fn select_ciphers(provider: &mut CryptoProvider, names: &[String], notes: &mut Vec<String>) {
    if names.is_empty() {
        return;
    }
    let canonical = |name: &str| name.trim().trim_end_matches("_SHA256").to_string();
    let wanted: Vec<String> = names.iter().map(|n| canonical(n)).collect();
    let kept: Vec<_> = provider
        .cipher_suites
        .iter()
        .filter(|suite| {
            suite.version() == &rustls::version::TLS13 || wanted.contains(&canonical(&format!("{:?}", suite.suite())))
        })
        .copied()
        .collect();
    if kept.iter().all(|suite| suite.version() == &rustls::version::TLS13) {
        notes.push(format!("TLS_CIPHERS names no TLS 1.2 suite this server has ({names:?}); keeping the defaults"));
        return;
    }
    provider.cipher_suites = kept;
}

/// The common name in the subject of a DER certificate: the last CN attribute, as Go's `Subject.CommonName`
/// reads it. `None` when the certificate has no CN or is not well-formed DER.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = element(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = element(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = element(rest)?;
    if tag == 0xa0 {
        rest = after; // [0] version
    }
    // serialNumber, signature, issuer, validity, then subject.
    for expected in [0x02, 0x30, 0x30, 0x30] {
        let (tag, _, after) = element(rest)?;
        if tag != expected {
            return None;
        }
        rest = after;
    }
    let (tag, subject, _) = element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut found = None;
    let mut sets = subject;
    while !sets.is_empty() {
        let (tag, set, after) = element(sets)?;
        sets = after;
        if tag != 0x31 {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, after) = element(attributes)?;
            attributes = after;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, value) = element(attribute)?;
            if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (tag, text, _) = element(value)?;
                found = Some(decode_string(tag, text)?);
            }
        }
    }
    found
}

/// One DER element: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers never occur in the parts read here
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let bytes = rest.get(..n)?;
            let len = bytes.iter().fold(0usize, |len, &b| (len << 8) | usize::from(b));
            (len, &rest[n..])
        }
        _ => return None,
    };
    if len > rest.len() {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// An X.520 directory string as text.
fn decode_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, T61String, IA5String.
        0x0c | 0x13 | 0x14 | 0x16 => Some(String::from_utf8_lossy(bytes).into_owned()),
        // BMPString: UTF-16BE.
        0x1e if bytes.len() % 2 == 0 => {
            let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            Some(String::from_utf16_lossy(&units))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in names {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_common_name() {
        let der =
            cert_with(&[(rcgen::DnType::OrganizationName, "kubevirt"), (rcgen::DnType::CommonName, "cdi-uploadproxy")]);
        assert_eq!(common_name(&der).as_deref(), Some("cdi-uploadproxy"));
        assert_eq!(common_name(&cert_with(&[(rcgen::DnType::OrganizationName, "x")])), None);
        // Truncations and garbage never panic.
        for len in 0..der.len() {
            let _ = common_name(&der[..len]);
        }
        assert_eq!(common_name(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(common_name(b""), None);
    }

    #[test]
    fn bmp_strings_decode() {
        assert_eq!(decode_string(0x1e, &[0, b'a', 0, b'b']).as_deref(), Some("ab"));
        assert_eq!(decode_string(0x1e, &[0]), None);
        assert_eq!(decode_string(0x04, b"x"), None);
    }

    #[test]
    fn cipher_names_select_tls12_suites() {
        let mut provider = rustls::crypto::ring::default_provider();
        let mut notes = Vec::new();
        select_ciphers(&mut provider, &["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_string()], &mut notes);
        let tls12: Vec<String> = provider
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(tls12, ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"]);
        assert!(notes.is_empty());
        let mut provider = rustls::crypto::ring::default_provider();
        let before = provider.cipher_suites.len();
        select_ciphers(&mut provider, &["TLS_RSA_WITH_RC4_128_SHA".to_string()], &mut notes);
        assert_eq!(provider.cipher_suites.len(), before);
        assert_eq!(notes.len(), 1);
    }
}
