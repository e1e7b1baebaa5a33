//! Time as plain numbers: the core never reads a clock, callers pass `Nanos` in.

use core::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A point in time: nanoseconds since an epoch chosen by the caller.
///
/// Hosts that share state (Envoy workers, quota servers) must agree on the
/// epoch; the filter and the quota server use the Unix epoch so that fixed
/// windows line up with wall-clock minutes, hours and days.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The epoch itself.
    pub const ZERO: Nanos = Nanos(0);

    /// Nanoseconds since the epoch.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The time `span` later, saturating at the end of time.
    pub const fn plus(self, span: Span) -> Nanos {
        Nanos(self.0.saturating_add(span.0))
    }

    /// How long after `earlier` this is; zero if `earlier` is later.
    pub const fn since(self, earlier: Nanos) -> Span {
        Span(self.0.saturating_sub(earlier.0))
    }
}

/// A length of time in nanoseconds.
///
/// Written in config as a number with a unit (`"250ms"`, `"1.5s"`, `"5m"`,
/// `"1h"`, `"1d"`), or as a bare integer meaning seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(pub u64);

impl Span {
    /// No time at all.
    pub const ZERO: Span = Span(0);
    /// Longer than any real wait: used for "never" (e.g. a cost above capacity).
    pub const NEVER: Span = Span(u64::MAX);
    /// One millisecond.
    pub const MILLISECOND: Span = Span(1_000_000);
    /// One second.
    pub const SECOND: Span = Span(1_000_000_000);

    /// A span of `n` milliseconds.
    pub const fn from_millis(n: u64) -> Span {
        Span(n.saturating_mul(1_000_000))
    }

    /// A span of `n` seconds.
    pub const fn from_secs(n: u64) -> Span {
        Span(n.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds in this span.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds, rounded up (as `Retry-After` needs: never tell a client
    /// to come back before it may).
    pub const fn as_secs_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000_000)
    }

    /// Whole milliseconds, rounded up.
    pub const fn as_millis_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000)
    }

    /// Parses a number with a unit: `"250ms"`, `"1s"`, `"1.5m"`; a bare
    /// number is seconds. A decimal is taken exactly, so it must come to a
    /// whole number of nanoseconds (`"1.5ns"` is refused, not rounded).
    pub fn parse(text: &str) -> Result<Span, SpanError> {
        let text = text.trim();
        let (whole, rest) = split_digits(text);
        if whole.is_empty() {
            return Err(SpanError::NoNumber);
        }
        let (fraction, unit) = match rest.strip_prefix('.') {
            Some(after) => match split_digits(after) {
                ("", _) => return Err(SpanError::NoFraction),
                (digits, unit) => (digits.trim_end_matches('0'), unit),
            },
            None => ("", rest),
        };
        let unit_nanos: u64 = match unit.trim() {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "" | "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            _ => return Err(SpanError::UnknownUnit),
        };
        let whole: u64 = whole.parse().map_err(|_| SpanError::TooLarge)?;
        let whole_nanos = whole.checked_mul(unit_nanos).ok_or(SpanError::TooLarge)?;
        let fraction_nanos = fraction_of(fraction, unit_nanos)?;
        whole_nanos
            .checked_add(fraction_nanos)
            .map(Span)
            .ok_or(SpanError::TooLarge)
    }
}

/// `text` split after its leading ASCII digits.
fn split_digits(text: &str) -> (&str, &str) {
    text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    )
}

/// The nanoseconds in `0.<digits>` of a unit of `unit_nanos`, when whole.
/// `digits` has no trailing zeros.
fn fraction_of(digits: &str, unit_nanos: u64) -> Result<u64, SpanError> {
    // No unit has more than 19 decimal digits of nanoseconds (a day has
    // 14), so a longer fraction without trailing zeros cannot be whole.
    const MAX_DIGITS: usize = 19;
    if digits.len() > MAX_DIGITS {
        return Err(SpanError::FinerThanNanos);
    }
    if digits.is_empty() {
        return Ok(0);
    }
    let numerator = digits
        .parse::<u128>()
        .map_err(|_| SpanError::FinerThanNanos)?
        * u128::from(unit_nanos);
    let denominator = 10u128.pow(digits.len() as u32);
    if numerator % denominator != 0 {
        return Err(SpanError::FinerThanNanos);
    }
    u64::try_from(numerator / denominator).map_err(|_| SpanError::TooLarge)
}

/// Why a duration could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    /// The text does not start with digits.
    #[error("expected a duration such as \"500ms\", \"1s\", \"5m\", \"1h\" or \"1d\"")]
    NoNumber,
    /// A decimal point is not followed by digits.
    #[error("expected digits after the decimal point, as in \"1.5s\"")]
    NoFraction,
    /// A decimal that does not come to a whole number of nanoseconds.
    #[error("not a whole number of nanoseconds: use fewer decimals or a smaller unit")]
    FinerThanNanos,
    /// The unit is not one of the known ones.
    #[error("unknown unit: use ns, us, ms, s, m, h or d")]
    UnknownUnit,
    /// The value does not fit in 64-bit nanoseconds (about 584 years).
    #[error("duration too large")]
    TooLarge,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 6] = [
            (86_400_000_000_000, "d"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
        ];
        for (size, name) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{}", self.0 / size, name);
            }
        }
        write!(f, "{}ns", self.0)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Span, D::Error> {
        struct SpanVisitor;
        impl de::Visitor<'_> for SpanVisitor {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"1s\", \"5m\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Span, E> {
                secs.checked_mul(1_000_000_000)
                    .map(Span)
                    .ok_or_else(|| E::custom(SpanError::TooLarge))
            }
            fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Span, E> {
                u64::try_from(secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
                    .and_then(|s| self.visit_u64(s))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Span, E> {
                Span::parse(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SpanVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn parses_units() {
        assert_eq!(Span::parse("250ms"), Ok(Span::from_millis(250)));
        assert_eq!(Span::parse("1m"), Ok(Span::from_secs(60)));
        assert_eq!(Span::parse("2d"), Ok(Span::from_secs(172_800)));
        assert_eq!(Span::parse("7"), Ok(Span::from_secs(7)));
        assert_eq!(Span::parse("ms"), Err(SpanError::NoNumber));
        assert_eq!(Span::parse("3 weeks"), Err(SpanError::UnknownUnit));
        assert_eq!(
            Span::parse("99999999999999999999s"),
            Err(SpanError::TooLarge)
        );
    }

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Span::parse("1.5s"), Ok(Span::from_millis(1500)));
        assert_eq!(Span::parse("0.25m"), Ok(Span::from_secs(15)));
        assert_eq!(Span::parse("1.5"), Ok(Span::from_millis(1500)));
        assert_eq!(Span::parse("2.500ms"), Ok(Span(2_500_000)));
        assert_eq!(Span::parse("0.000000001s"), Ok(Span(1)));
        // Trailing zeros cost nothing, however many.
        assert_eq!(
            Span::parse("1.50000000000000000000000000000s"),
            Ok(Span::from_millis(1500))
        );
        assert_eq!(Span::parse("1.0001d"), Ok(Span(86_408_640_000_000)));
        assert_eq!(Span::parse("1.5ns"), Err(SpanError::FinerThanNanos));
        assert_eq!(Span::parse("0.0000000001s"), Err(SpanError::FinerThanNanos));
        assert_eq!(
            Span::parse("1.12345678901234567890123s"),
            Err(SpanError::FinerThanNanos)
        );
        assert_eq!(Span::parse("1.s"), Err(SpanError::NoFraction));
        assert_eq!(Span::parse(".5s"), Err(SpanError::NoNumber));
        assert_eq!(Span::parse("1.5.5s"), Err(SpanError::UnknownUnit));
        assert_eq!(
            Span::parse("18446744073.709551616s"),
            Err(SpanError::TooLarge)
        );
        assert_eq!(Span::parse("18446744073.709551615s"), Ok(Span(u64::MAX)));
        assert_eq!(
            SpanError::FinerThanNanos.to_string(),
            "not a whole number of nanoseconds: use fewer decimals or a smaller unit"
        );
    }

    #[test]
    fn displays_in_largest_exact_unit() {
        assert_eq!(Span::from_secs(3600).to_string(), "1h");
        assert_eq!(Span::from_millis(1500).to_string(), "1500ms");
        assert_eq!(Span(7).to_string(), "7ns");
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(Span(1).as_secs_ceil(), 1);
        assert_eq!(Span::from_secs(2).as_secs_ceil(), 2);
        assert_eq!(Span::from_millis(2001).as_secs_ceil(), 3);
        assert_eq!(Span::ZERO.as_secs_ceil(), 0);
    }
}
