//! How `boundimport cdi` reaches an HTTP source: CA directories, basic auth, extra headers from the environment
//! and from mounted secrets, TLS verification, all as CDI's importer reads them.

use super::env::{self, CdiEnv};
use crate::source::HttpOptions;
use std::path::{Path, PathBuf};

/// How to reach the source: CA directories (the proxy's, when present, and `IMPORTER_CERT_DIR`, which must be
/// readable), basic auth, extra headers from the environment and from secret files, TLS verification.
pub(super) fn http_options(
    proxy_cert_dir: &Path,
    extra_headers_dir: &Path,
    env: &CdiEnv,
) -> std::result::Result<HttpOptions, String> {
    let connect = |what: String| format!("Unable to connect to http data source: {what}");
    let mut ca_dirs = Vec::new();
    let proxy_dirs = [Some(proxy_cert_dir.to_path_buf()), env.proxy_cert_dir.clone()];
    for dir in proxy_dirs.into_iter().flatten() {
        // CDI reads the proxy CA directory when it exists and ignores it otherwise.
        if let Ok(count) = count_pem_certificates(&dir) {
            if count > 0 && !ca_dirs.contains(&dir) {
                ca_dirs.push(dir);
            }
        }
    }
    if let (Some(dir), false) = (&env.cert_dir, env.insecure_tls) {
        // The configured CA directory must be listable; files without certificates are only warned about.
        let count = count_pem_certificates(dir).map_err(|e| {
            connect(format!("Error creating http client: Error listing files in {}: {e}", dir.display()))
        })?;
        if count > 0 && !ca_dirs.contains(dir) {
            ca_dirs.push(dir.clone());
        }
    }
    let mut headers = env.extra_headers.clone();
    headers.extend(
        secret_headers(extra_headers_dir)
            .map_err(|e| connect(format!("Error getting extra headers for HTTP client: {e}")))?,
    );
    Ok(HttpOptions {
        ca_dirs,
        insecure: env.insecure_tls,
        username: env.access_key.clone(),
        password: env.secret_key.clone(),
        headers,
        stop: Some(crate::process::stop_flag()),
        ..HttpOptions::default()
    })
}

/// PEM certificates in the regular files of `dir` (dot files skipped, symlinks to files followed, as CDI reads a
/// mounted ConfigMap); a file without one gets CDI's warning.
fn count_pem_certificates(dir: &Path) -> std::io::Result<usize> {
    use rustls::pki_types::pem::PemObject;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) || !path.is_file() {
            continue;
        }
        let found = rustls::pki_types::CertificateDer::pem_file_iter(&path).map_or(0, |certs| certs.flatten().count());
        if found == 0 {
            log::warn!("No certs in {}", path.display());
        }
        total += found;
    }
    Ok(total)
}

/// Header lines from the files of a mounted secret directory (dot files and dot directories skipped, as in CDI).
fn secret_headers(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(headers),
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    paths.sort();
    for path in paths {
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if std::fs::symlink_metadata(&path)?.is_dir() {
            headers.extend(secret_headers(&path)?);
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        match env::parse_header(text.trim_end_matches(['\n', '\r'])) {
            Some((name, value)) => {
                crate::source::http::check_header(&name, &value).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {}", path.display(), e))
                })?;
                headers.push((name, value))
            }
            None => log::warn!("{}: not a \"Name: value\" header; ignored", path.display()),
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_directories_count_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(count_pem_certificates(dir.path()).unwrap(), 0);
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join(".hidden.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "no certificate here").unwrap();
        assert_eq!(count_pem_certificates(dir.path()).unwrap(), 1);
        assert!(count_pem_certificates(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn secret_header_files_are_read_like_cdi() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("my-secret");
        std::fs::create_dir_all(secret.join("..2024_01_01")).unwrap();
        std::fs::write(secret.join("..2024_01_01/token"), "Authorization: Bearer x\n").unwrap();
        std::os::unix::fs::symlink("..2024_01_01", secret.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", secret.join("token")).unwrap();
        std::fs::write(dir.path().join(".hidden"), "X-No: 1").unwrap();
        let headers = secret_headers(dir.path()).unwrap();
        assert_eq!(headers, [("Authorization".to_string(), "Bearer x".to_string())]);
        assert!(secret_headers(&dir.path().join("missing")).unwrap().is_empty());
    }
}
