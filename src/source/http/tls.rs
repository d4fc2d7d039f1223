//! TLS for the HTTP client: rustls with the system's roots plus `--ca-dir` PEM files, or no verification at all
//! with `--insecure`.

use super::client::Transport;
use crate::source::HttpOptions;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme, StreamOwned};
use std::io;
use std::sync::Arc;

/// The client configuration `options` ask for.
pub fn client_config(options: &HttpOptions) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("configuring TLS: {e}"))?;
    if options.insecure {
        log::warn!("TLS certificate verification is disabled (--insecure)");
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth());
    }
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(system.certs);
    log::debug!("{added} system CA certificates");
    for dir in &options.ca_dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: reading CA directory: {e}", dir.display()))?;
        let mut found = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_file() {
                continue;
            }
            let Ok(certs) = CertificateDer::pem_file_iter(&path) else {
                continue;
            };
            for cert in certs.flatten() {
                if roots.add(cert).is_ok() {
                    found += 1;
                }
            }
        }
        if found == 0 {
            return Err(format!("{}: no PEM CA certificate in this directory", dir.display()));
        }
        log::debug!("{}: {found} CA certificates", dir.display());
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Starts TLS with `host` over `transport`; the handshake happens on first use.
pub fn wrap(config: Arc<ClientConfig>, host: &str, transport: Box<dyn Transport>) -> io::Result<Box<dyn Transport>> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid TLS server name {host:?}: {e}")))?;
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, transport);
    // Handshake now, so a certificate error is reported as such rather than as a failed request.
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(Box::new(stream))
}

/// Accepts any certificate (`--insecure`) but still checks handshake signatures.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
