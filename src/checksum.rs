//! Checksums: `ALGO:HEX` expectations over source bytes (as CDI defines them) and the running digests behind
//! them.

use crate::error::{Error, ErrorKind, Result};
use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// A digest algorithm accepted in `--checksum` / `IMPORTER_CHECKSUM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5 (accepted because CDI accepts it; not a security property).
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

/// An expected checksum: algorithm and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The expected digest bytes.
    pub digest: Vec<u8>,
}

impl FromStr for Checksum {
    type Err = Error;

    /// Parses `algo:hex`, e.g. `sha256:9f86d0...`.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::usage(format!("invalid checksum {text:?}: {why}"));
        let (algo, hex) = text.split_once(':').ok_or_else(|| bad("expected ALGO:HEX"))?;
        let algorithm = match algo.to_ascii_lowercase().as_str() {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad("algorithm must be md5, sha1, sha256 or sha512")),
        };
        let hex = hex.trim();
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) && hex.len() != algorithm.digest_len() * 2 {
            return Err(bad(&format!(
                "the digest has {} hex digits, but a {} digest has {}",
                hex.len(),
                algorithm.name(),
                algorithm.digest_len() * 2
            )));
        }
        let digest = decode_hex(hex).ok_or_else(|| bad("digest is not hexadecimal"))?;
        if digest.len() != algorithm.digest_len() {
            return Err(bad(&format!("a {} digest has {} hex digits", algorithm.name(), algorithm.digest_len() * 2)));
        }
        Ok(Checksum { algorithm, digest })
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), hex(&self.digest))
    }
}

impl Checksum {
    /// Compares a computed digest with the expectation; the error message contains "checksum mismatch" (CDI's
    /// controller and tests look for it).
    pub fn verify(&self, computed: &[u8], what: &str) -> Result<()> {
        if computed == self.digest.as_slice() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::ChecksumMismatch,
            format!(
                "checksum mismatch for {what}: expected {}:{}, computed {}:{}",
                self.algorithm.name(),
                hex(&self.digest),
                self.algorithm.name(),
                hex(computed)
            ),
        ))
    }
}

/// A running digest of one of the supported algorithms.
#[derive(Clone)]
pub enum Hasher {
    /// MD5.
    Md5(md5::Md5),
    /// SHA-1.
    Sha1(sha1::Sha1),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh digest of `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(md5::Md5::new()),
            Algorithm::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(bytes),
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The final digest.
    pub fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

/// Lower-case hexadecimal rendering.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_verifies_each_algorithm() {
        // Digests of "abc" from the algorithms' published test vectors.
        let vectors = [
            ("md5", "900150983cd24fb0d6963f7d28e17f72"),
            ("sha1", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            ("sha256", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            (
                "SHA512",
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd\
                 454d4423643ce80e2a9ac94fa54ca49f",
            ),
        ];
        for (algo, digest) in vectors {
            let checksum: Checksum = format!("{algo}:{digest}").parse().unwrap();
            let mut hasher = Hasher::new(checksum.algorithm);
            hasher.update(b"ab");
            hasher.update(b"c");
            checksum.verify(&hasher.finish(), "test").unwrap();
        }
    }

    #[test]
    fn mismatch_message_names_both_digests() {
        let checksum: Checksum =
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".parse().unwrap();
        let err = checksum.verify(&[0u8; 32], "disk.img").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(err.to_string().contains(&"00".repeat(32)));
    }

    #[test]
    fn rejects_malformed_checksums() {
        for text in ["sha256", "crc32:00", "sha256:xyz", "sha256:abcd", "md5:0"] {
            assert!(text.parse::<Checksum>().is_err(), "{text}");
        }
    }
}
