//! Human quantities on the command line: sizes ("24GB", "24GiB", "512MB"), bandwidths
//! ("24GB/s", "1Gbit", "10Gbit/s") and durations ("50us", "1ms"). B is bytes and b or bit
//! is bits; k/M/G/T are powers of 1000 and Ki/Mi/Gi/Ti powers of 1024, as vendors label
//! memory and links. A bare number is refused (but 0): `--device-mem 24` meaning 24 bytes
//! is never what was meant, so the unit is always written.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
#[error("`{value}`: expected {expected}")]
pub struct UnitError {
    pub value: String,
    pub expected: &'static str,
}

const SIZE: &str = "a size with its unit, like 24GB, 24GiB or 512MB";
const RATE: &str = "a bandwidth with its unit, like 24GB/s, 1Gbit or 10Gbit/s";
const TIME: &str = "a duration with its unit, like 50us, 1ms or 2s";

fn split(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let value: f64 = s[..end].parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value, s[end..].trim()))
}

fn prefix(p: &str) -> Option<f64> {
    Some(match p {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        _ => return None,
    })
}

/// (multiplier to bytes, is it bits) for units like "GB", "GiB", "Gbit", "Gb".
fn data_unit(u: &str) -> Option<f64> {
    for (suffix, per_byte) in [("bit", 1.0 / 8.0), ("B", 1.0), ("b", 1.0 / 8.0)] {
        if let Some(p) = u.strip_suffix(suffix) {
            return prefix(p).map(|m| m * per_byte);
        }
    }
    None
}

/// Bytes: a number and a unit (a bare 0 needs none).
pub fn parse_bytes(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError { value: s.to_string(), expected: SIZE };
    let (v, unit) = split(s).ok_or_else(err)?;
    let mult = match unit {
        "" if v == 0.0 => 1.0,
        "" => return Err(err()),
        _ => data_unit(unit).filter(|_| !unit.ends_with('b') && !unit.ends_with("bit")).ok_or_else(err)?,
    };
    Ok((v * mult).round() as u64)
}

/// Bytes per second; "/s" and "ps" are optional, so "1Gbit" is a link speed.
pub fn parse_rate(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError { value: s.to_string(), expected: RATE };
    let (v, unit) = split(s).ok_or_else(err)?;
    let unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(unit);
    let mult = data_unit(unit).ok_or_else(err)?;
    let rate = v * mult;
    if rate > 0.0 {
        Ok(rate)
    } else {
        Err(err())
    }
}

/// Seconds: a number and a unit (a bare 0 needs none).
pub fn parse_seconds(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError { value: s.to_string(), expected: TIME };
    let (v, unit) = split(s).ok_or_else(err)?;
    let mult = match unit {
        "" if v == 0.0 => 1.0,
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        _ => return Err(err()),
    };
    Ok(v * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("24GB"), Ok(24_000_000_000));
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("512MB"), Ok(512_000_000));
        assert_eq!(parse_bytes("1.5 TB"), Ok(1_500_000_000_000));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "GB", "24XB", "24Gbit", "-1GB", "24 G B", "24", "4096"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("24GB/s"), Ok(24e9));
        assert_eq!(parse_rate("1Gbit"), Ok(125e6));
        assert_eq!(parse_rate("10Gbit/s"), Ok(1.25e9));
        assert_eq!(parse_rate("1Gbps"), Ok(125e6));
        assert_eq!(parse_rate("100Mb/s"), Ok(12.5e6));
        for bad in ["0GB/s", "fast", "1Gbit/h", "24", "24/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times() {
        let close = |s: &str, v: f64| (parse_seconds(s).unwrap() - v).abs() < 1e-15;
        assert!(close("50us", 50e-6) && close("1ms", 1e-3) && close("100ns", 1e-7));
        assert_eq!(parse_seconds("2s"), Ok(2.0));
        assert_eq!(parse_seconds("0"), Ok(0.0));
        assert!(parse_seconds("1h").is_err() && parse_seconds("2").is_err());
    }
}
