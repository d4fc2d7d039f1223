//! The environment CDI's upload controller gives the upload server pod (cmd/cdi-uploadserver), parsed the way
//! CDI parses it: lenient where CDI is lenient (`FILESYSTEM_OVERHEAD`, `PREALLOCATION`, `LISTEN_PORT`), fatal where
//! it is fatal (`DEADLINE`).

use crate::cdi::env::parse_go_bool;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// CDI's default listen port.
pub const DEFAULT_PORT: u16 = 8443;
/// CDI's default listen address.
pub const DEFAULT_ADDRESS: &str = "0.0.0.0";
/// CDI's block destination; a `DESTINATION` equal to it means the block volume (`--block-path`).
pub const WRITE_BLOCK_PATH: &str = "/dev/cdi-block-volume";
/// CDI's file destination; a `DESTINATION` equal to it means `<--data-dir>/disk.img`.
pub const WRITE_FILE_PATH: &str = "/data/disk.img";

/// What the upload server pod's environment says.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadEnv {
    /// `TLS_KEY_FILE`: the server's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// `TLS_CERT_FILE`: the server's certificate chain (PEM).
    pub tls_cert_file: Option<PathBuf>,
    /// `CLIENT_CERT_FILE`: the CA bundle that signs accepted client certificates (PEM).
    pub client_cert_file: Option<PathBuf>,
    /// `CLIENT_NAME`: the only client certificate common name accepted.
    pub client_name: String,
    /// `UPLOAD_IMAGE_SIZE`: the requested size in bytes.
    pub image_size: Option<u64>,
    /// `FILESYSTEM_OVERHEAD`: unparseable reads as 0, as in CDI.
    pub filesystem_overhead: f64,
    /// `PREALLOCATION`: unparseable reads as false, as in CDI's upload server.
    pub preallocation: bool,
    /// `LISTEN_ADDRESS` (set but empty means every interface, as in Go).
    pub listen_address: String,
    /// `LISTEN_PORT` (unparseable reads as the default).
    pub listen_port: u16,
    /// `DESTINATION`, when set and not empty.
    pub destination: Option<PathBuf>,
    /// `DEADLINE` (RFC 3339).
    pub deadline: Option<SystemTime>,
    /// `TLS_CIPHERS`: Go cipher-suite names (comma-separated); empty means the defaults.
    pub ciphers: Vec<String>,
    /// `TLS_MIN_VERSION`: `VersionTLS12` or `VersionTLS13` (older versions are not offered at all).
    pub min_tls_version: Option<String>,
    /// Lenient parses worth a log line.
    pub warnings: Vec<String>,
}

impl UploadEnv {
    /// Parses the process environment.
    pub fn from_process() -> Result<UploadEnv> {
        Self::parse(std::env::vars())
    }

    /// Parses `vars` (name, value pairs).
    pub fn parse(vars: impl IntoIterator<Item = (String, String)>) -> Result<UploadEnv> {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        let get = |name: &str| vars.get(name).map(String::as_str).unwrap_or("");
        let path = |name: &str| Some(get(name)).filter(|v| !v.is_empty()).map(PathBuf::from);
        let mut warnings = Vec::new();

        let overhead_text = get("FILESYSTEM_OVERHEAD");
        let filesystem_overhead = match overhead_text.trim().parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 0.0 => value,
            Ok(_) => {
                return Err(Error::usage(format!(
                    "invalid FILESYSTEM_OVERHEAD {overhead_text:?}: expected a fraction such as 0.055"
                )))
            }
            Err(_) => {
                if !overhead_text.is_empty() {
                    warnings.push(format!("FILESYSTEM_OVERHEAD {overhead_text:?} is not a number; using 0"));
                }
                0.0
            }
        };
        let preallocation_text = get("PREALLOCATION");
        let preallocation = parse_go_bool(preallocation_text).unwrap_or_else(|| {
            if !preallocation_text.is_empty() {
                warnings.push(format!("PREALLOCATION {preallocation_text:?} is not a boolean; using false"));
            }
            false
        });
        let size_text = get("UPLOAD_IMAGE_SIZE");
        let image_size = match size_text.trim() {
            "" => None,
            text => Some(
                crate::size::parse_quantity(text)
                    .map_err(|e| Error::usage(format!("invalid UPLOAD_IMAGE_SIZE {size_text:?}: {e}")))?,
            ),
        };
        let listen_address = vars.get("LISTEN_ADDRESS").cloned().unwrap_or_else(|| DEFAULT_ADDRESS.to_string());
        let port_text = get("LISTEN_PORT");
        let listen_port = match port_text {
            "" => DEFAULT_PORT,
            text => text.parse::<u16>().unwrap_or_else(|_| {
                warnings.push(format!("LISTEN_PORT {text:?} is not a port number; using {DEFAULT_PORT}"));
                DEFAULT_PORT
            }),
        };
        let deadline = match get("DEADLINE") {
            "" => None,
            text => {
                Some(parse_rfc3339(text).ok_or_else(|| Error::usage(format!("Failed to parse deadline: {text:?}")))?)
            }
        };
        let ciphers =
            get("TLS_CIPHERS").split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
        let min_tls_version = Some(get("TLS_MIN_VERSION").trim()).filter(|v| !v.is_empty()).map(String::from);
        Ok(UploadEnv {
            tls_key_file: path("TLS_KEY_FILE"),
            tls_cert_file: path("TLS_CERT_FILE"),
            client_cert_file: path("CLIENT_CERT_FILE"),
            client_name: get("CLIENT_NAME").to_string(),
            image_size,
            filesystem_overhead,
            preallocation,
            listen_address,
            listen_port,
            destination: path("DESTINATION"),
            deadline,
            ciphers,
            min_tls_version,
            warnings,
        })
    }

    /// The address to bind: Go's `host:port`, an empty host meaning every interface.
    pub fn bind_address(&self) -> String {
        let host = match self.listen_address.as_str() {
            "" => "0.0.0.0",
            host if host.contains(':') && !host.starts_with('[') => return format!("[{host}]:{}", self.listen_port),
            host => host,
        };
        format!("{host}:{}", self.listen_port)
    }
}

/// Parses an RFC 3339 timestamp (`2026-12-01T10:00:00Z`, `2026-12-01T12:00:00.5+02:00`), as Go's
/// `time.Parse(time.RFC3339, ...)` accepts it.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let bytes = text.as_bytes();
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = bytes.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let at = |i: usize, c: u8| bytes.get(i) == Some(&c);
    if !(at(4, b'-') && at(7, b'-') && (at(10, b'T') || at(10, b't')) && at(13, b':') && at(16, b':')) {
        return None;
    }
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    let (hour, minute, second) = (digits(11, 2)?, digits(14, 2)?, digits(17, 2)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 59 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u32;
    if at(i, b'.') || at(i, b',') {
        i += 1;
        let start = i;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(bytes[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset_seconds = match bytes.get(i) {
        Some(b'Z' | b'z') if i + 1 == bytes.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == bytes.len() && at(i + 3, b':') => {
            let (h, m) = (digits(i + 1, 2)?, digits(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let magnitude = h * 3600 + m * 60;
            if *sign == b'+' {
                magnitude
            } else {
                -magnitude
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let base = if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds as u64))?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(seconds.unsigned_abs()))?
    };
    base.checked_add(Duration::from_nanos(u64::from(nanos)))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<UploadEnv> {
        UploadEnv::parse(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    fn unix(text: &str) -> i128 {
        let t = parse_rfc3339(text).unwrap_or_else(|| panic!("{text}"));
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        }
    }

    #[test]
    fn rfc3339_like_go() {
        assert_eq!(unix("1970-01-01T00:00:00Z"), 0);
        assert_eq!(unix("2026-12-01T10:00:00Z"), 1_796_119_200 * 1_000_000_000);
        assert_eq!(unix("2026-12-01T12:00:00+02:00"), 1_796_119_200 * 1_000_000_000);
        assert_eq!(unix("2026-12-01T10:00:00.25Z"), 1_796_119_200 * 1_000_000_000 + 250_000_000);
        assert_eq!(unix("1969-12-31T23:59:59Z"), -1_000_000_000);
        assert_eq!(unix("2024-02-29T00:00:00-00:30"), 1_709_166_600 * 1_000_000_000);
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01 10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00:00+0200",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:00:00Zjunk",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_lenient_values_like_cdi() {
        let e = env(&[]).unwrap();
        assert_eq!(e.bind_address(), "0.0.0.0:8443");
        assert_eq!((e.preallocation, e.filesystem_overhead, e.image_size), (false, 0.0, None));
        assert!(e.deadline.is_none() && e.destination.is_none() && e.ciphers.is_empty());
        let e = env(&[
            ("LISTEN_ADDRESS", ""),
            ("LISTEN_PORT", "x"),
            ("PREALLOCATION", "yes"),
            ("FILESYSTEM_OVERHEAD", "abc"),
            ("UPLOAD_IMAGE_SIZE", "1Gi"),
            ("TLS_CIPHERS", "TLS_A, TLS_B,"),
            ("CLIENT_NAME", "cdi-uploadproxy"),
        ])
        .unwrap();
        assert_eq!(e.bind_address(), "0.0.0.0:8443");
        assert_eq!(e.warnings.len(), 3, "{:?}", e.warnings);
        assert_eq!((e.preallocation, e.image_size), (false, Some(1 << 30)));
        assert_eq!(e.ciphers, ["TLS_A", "TLS_B"]);
        assert_eq!(e.client_name, "cdi-uploadproxy");
        let e = env(&[("LISTEN_ADDRESS", "::1"), ("LISTEN_PORT", "0"), ("PREALLOCATION", "1")]).unwrap();
        assert_eq!(e.bind_address(), "[::1]:0");
        assert!(e.preallocation);
        assert!(env(&[("DEADLINE", "tomorrow")]).unwrap_err().to_string().contains("Failed to parse deadline"));
        assert!(env(&[("UPLOAD_IMAGE_SIZE", "lots")]).is_err());
        assert!(env(&[("FILESYSTEM_OVERHEAD", "-1")]).is_err());
    }
}
