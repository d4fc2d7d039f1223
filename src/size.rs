//! Byte sizes as Kubernetes quantities (`600M`, `600Mi`, `1.5Gi`, `1e9`, plain bytes), the way pod limits and
//! `IMPORTER_IMAGE_SIZE` are written, and human-readable rendering for logs.

use crate::error::{Error, Result};

/// Parses a Kubernetes-style quantity into bytes, rounding a fractional result up to a whole byte.
pub fn parse_quantity(text: &str) -> Result<u64> {
    let bad = || Error::usage(format!("invalid size {text:?}: expected bytes or a quantity such as 600M, 600Mi, 1Gi"));
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(bad());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    // Exact arithmetic in u128: mantissa as an integer and a power-of-ten divisor.
    let digits = format!("{int_part}{frac_part}");
    if digits.len() > 30 {
        return Err(bad());
    }
    let mantissa: u128 = digits.parse().map_err(|_| bad())?;
    let mut divisor: u128 = 10u128.pow(frac_part.len() as u32);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "P" => 1000u128.pow(5),
        "E" => 1000u128.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| bad())?;
            if exp > 18 {
                return Err(bad());
            }
            10u128.pow(exp)
        }
        "m" => {
            divisor *= 1000;
            1
        }
        _ => return Err(bad()),
    };
    let bytes = (mantissa * multiplier).div_ceil(divisor);
    u64::try_from(bytes).map_err(|_| bad())
}

/// Renders a byte count for people: `1.50 GiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_quantities() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("600M", 600_000_000),
            ("600Mi", 600 * 1024 * 1024),
            ("1G", 1_000_000_000),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("10Gi", 10 << 30),
            ("128k", 128_000),
            ("2Ti", 2 << 40),
            ("1e9", 1_000_000_000),
            ("1500m", 2),
            (" 64Mi ", 64 << 20),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_quantity(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", "M", "12MB", "1.2.3", "-5", "1Zi", "99999999999999999999Ei", ".", "1e99"] {
            let err = parse_quantity(text).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{text}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.50 GiB");
    }
}
