//! Byte sizes as written in the config file: `1048576`, `"512"`, `"64KiB"`,
//! `"1 MiB"`, `"10KB"`.
//!
//! [`parse_size`] returns a `u64`; each key checks its own range, so keys
//! with very different scales (a packet size, a disk budget) share it.
//! Units are case-sensitive: decimal `KB`/`MB`/`GB`/`TB` are powers of 1000,
//! binary `KiB`/`MiB`/`GiB`/`TiB` powers of 1024, `B` (or no unit) is bytes.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// The units [`parse_size`] accepts, with their multipliers.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing but white space.
    #[error("empty size; write a number of bytes, optionally with a unit, like \"1MiB\"")]
    Empty,
    /// The text does not start with a digit.
    #[error("a size starts with a whole number of bytes, like \"512\" or \"1MiB\"")]
    NoNumber,
    /// A decimal point, as in `"1.5MiB"`.
    #[error("fractions are not supported; use a smaller unit, like \"1536KiB\"")]
    Fraction,
    /// The text after the number is not a known unit.
    #[error("unknown unit \"{unit}\"{hint}; units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
        /// `" (units are case-sensitive: did you mean \"MiB\"?)"` or empty.
        hint: String,
    },
    /// The value does not fit in 64 bits.
    #[error("too large")]
    TooLarge,
}

/// Parses a size such as `"64KiB"` or `"1 MB"` into bytes.
///
/// ```
/// use ferrymq_config::size::parse_size;
/// assert_eq!(parse_size("1 MiB"), Ok(1_048_576));
/// assert_eq!(parse_size("10KB"), Ok(10_000));
/// ```
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, rest) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NoNumber);
    }
    if rest.starts_with('.') {
        return Err(SizeError::Fraction);
    }
    let unit = rest.trim_start();
    let Some(&(_, multiplier)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        let hint = UNITS
            .iter()
            .find(|(name, _)| !name.is_empty() && name.eq_ignore_ascii_case(unit))
            .map(|(name, _)| format!(" (units are case-sensitive: did you mean \"{name}\"?)"))
            .unwrap_or_default();
        return Err(SizeError::UnknownUnit {
            unit: unit.to_owned(),
            hint,
        });
    };
    let number: u64 = digits.parse().map_err(|_| SizeError::TooLarge)?;
    number.checked_mul(multiplier).ok_or(SizeError::TooLarge)
}

/// A size key in the raw TOML: an integer (bytes) or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawSize(pub(crate) u64);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = RawSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: an integer number of bytes or a string like \"1MiB\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
        Ok(RawSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
        u64::try_from(v)
            .map(RawSize)
            .map_err(|_| E::custom(format!("a size cannot be negative, got {v}")))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<RawSize, E> {
        if v < 0 {
            return Err(E::custom(format!("a size cannot be negative, got {v}")));
        }
        u64::try_from(v)
            .map(RawSize)
            .map_err(|_| E::custom(format!("size {v} is too large")))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<RawSize, E> {
        u64::try_from(v)
            .map(RawSize)
            .map_err(|_| E::custom(format!("size {v} is too large")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
        parse_size(v)
            .map(RawSize)
            .map_err(|err| E::custom(format!("invalid size \"{v}\": {err}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<u64, &str>) {
        let actual = parse_size(text).map_err(|e| e.to_string());
        assert_eq!(
            actual,
            expected.map_err(str::to_owned),
            "parse_size({text:?})"
        );
    }

    #[test]
    fn sizes() {
        check("0", Ok(0));
        check("512", Ok(512));
        check("512B", Ok(512));
        check("64KiB", Ok(65_536));
        check("1MiB", Ok(1_048_576));
        check("1 MiB", Ok(1_048_576));
        check("  1  MiB  ", Ok(1_048_576));
        check("1GiB", Ok(1_073_741_824));
        check("2TiB", Ok(2 << 40));
        check("10KB", Ok(10_000));
        check("1MB", Ok(1_000_000));
        check("3GB", Ok(3_000_000_000));
        check("1TB", Ok(1_000_000_000_000));
        check("18446744073709551615", Ok(u64::MAX));
    }

    #[test]
    fn bad_sizes() {
        check(
            "",
            Err("empty size; write a number of bytes, optionally with a unit, like \"1MiB\""),
        );
        check(
            "MiB",
            Err("a size starts with a whole number of bytes, like \"512\" or \"1MiB\""),
        );
        check(
            "-5",
            Err("a size starts with a whole number of bytes, like \"512\" or \"1MiB\""),
        );
        check(
            "1.5MiB",
            Err("fractions are not supported; use a smaller unit, like \"1536KiB\""),
        );
        check(
            "1XB",
            Err("unknown unit \"XB\"; units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"),
        );
        check(
            "1mib",
            Err(
                "unknown unit \"mib\" (units are case-sensitive: did you mean \"MiB\"?); \
                 units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
            ),
        );
        check(
            "1 M iB",
            Err("unknown unit \"M iB\"; units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"),
        );
        check("18446744073709551616", Err("too large"));
        check("17179869184GiB", Err("too large"));
    }
}
