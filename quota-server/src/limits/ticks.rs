//! The Redis decision script's time unit: Lua numbers are doubles, exact
//! below 2^53, so each limit is counted in ticks of one microsecond when
//! its values fit, else of one millisecond (see `storage::redis`).

use sluice_core::algorithm::{AlgorithmKind, Quota};

/// Values the script handles must stay below this (a margin under 2^53 so
/// that its corrected integer division stays exact).
const EXACT_LIMIT: u128 = 1 << 52;

/// Why a quota cannot run in the script.
#[derive(Debug, thiserror::Error)]
#[error(
    "too large for the Redis backend's exact arithmetic: count and burst times the window \
     must stay below 2^52 microseconds, or 2^52 milliseconds for windows in whole \
     milliseconds (e.g. at most {max_per_day} per day); use a smaller count or window, \
     or the memory backend"
)]
pub struct Unrepresentable {
    max_per_day: u128,
}

/// Microseconds per script tick for `quota` under `algorithm`: 1 when it
/// fits, else 1000. The bucket and sliding algorithms multiply counts by
/// the window; a fixed window only compares counts and times, so each
/// must fit on its own (a monthly plan may count millions).
pub fn tick_micros(algorithm: AlgorithmKind, quota: &Quota) -> Result<u64, Unrepresentable> {
    let per = u128::from(quota.per().as_nanos());
    let widest = u128::from(quota.count().max(quota.burst()));
    for tick_us in [1u64, 1000] {
        let tick_ns = u128::from(tick_us) * 1000;
        let ticks = per / tick_ns;
        let fits = if algorithm == AlgorithmKind::FixedWindow {
            widest < EXACT_LIMIT && ticks < EXACT_LIMIT
        } else {
            widest * ticks < EXACT_LIMIT
        };
        if per % tick_ns == 0 && fits {
            return Ok(tick_us);
        }
    }
    Err(Unrepresentable {
        max_per_day: EXACT_LIMIT / 86_400_000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::time::Span;

    fn quota(count: u64, per: Span, burst: Option<u64>) -> Quota {
        Quota::new(count, per, burst).unwrap()
    }

    #[test]
    fn ticks_are_microseconds_when_they_fit() {
        let gcra = |q| tick_micros(AlgorithmKind::Gcra, &q);
        assert_eq!(gcra(quota(100, Span::SECOND, None)).unwrap(), 1);
        assert_eq!(
            gcra(quota(1_000_000, Span::from_secs(86_400), None)).unwrap(),
            1000
        );
        assert_eq!(gcra(quota(1, Span(1_000_001), None)).ok(), None);
        assert!(gcra(quota(1 << 40, Span::from_secs(86_400), None)).is_err());
    }

    #[test]
    fn fixed_windows_bound_counts_and_times_apart() {
        let fixed = |q| tick_micros(AlgorithmKind::FixedWindow, &q);
        let month = Span::from_secs(31 * 86_400);
        assert_eq!(fixed(quota(100_000_000, month, None)).unwrap(), 1);
        assert_eq!(fixed(quota(1 << 51, month, None)).unwrap(), 1);
        assert!(fixed(quota(1 << 52, month, None)).is_err());
    }
}
