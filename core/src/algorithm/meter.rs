//! The continuous level shared by the token bucket and the leaky bucket,
//! plus the exact scaled arithmetic the other algorithms reuse.
//!
//! The level is kept in scaled units: one permit is `per` units and the
//! level drains by `count` units per elapsed nanosecond, so a rate such as
//! 7 per 3 s is exact in integers. The token bucket's level is the tokens
//! spent and not yet refilled; the leaky bucket's is the water in it. Both
//! are the same quantity (capacity minus tokens = water), which is why the
//! decision logic lives here once.

use serde::{Deserialize, Serialize};

use super::{Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// `a / b`, using the cheap 64-bit division when both fit (the usual case).
#[inline]
pub(super) fn div(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) if b != 0 => u128::from(a / b),
        _ => a.checked_div(b).unwrap_or(u128::MAX),
    }
}

/// Division by a divisor fixed when a limiter is built, as a multiplication
/// and shifts: the hot path divides by the quota's period and count on
/// every decision, and a hardware division costs tens of cycles.
///
/// With `k = ceil(log2 d)` and `m = ceil(2^(63+k) / d)` (below 2^64),
/// `floor(n·m / 2^(63+k)) = floor(n / d)` for every `n < 2^63`: the error
/// `e = m·d − 2^(63+k)` is below `d ≤ 2^k`, so `n·e < 2^(63+k)` and the
/// product overshoots `n / d` by less than `1 / d`, never reaching the
/// next multiple. `n·m / 2^(63+k)` is the high word of `2n·m` shifted
/// right by `k`. Larger numerators divide in hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Divisor {
    divisor: u64,
    multiplier: u64,
    /// `k`, up to 64.
    shift: u32,
}

impl Divisor {
    /// Numerators below this are divided by multiplication.
    const FAST_BELOW: u128 = 1 << 63;

    /// The divisor `d` (at least 1).
    pub(super) fn new(divisor: u64) -> Divisor {
        let divisor = divisor.max(1);
        let k = u64::BITS - (divisor - 1).leading_zeros();
        // 2^(63+k) fits since k ≤ 64; the quotient is below 2^64.
        let multiplier = (1u128 << (63 + k)).div_ceil(u128::from(divisor));
        Divisor {
            divisor,
            multiplier: u64::try_from(multiplier).unwrap_or(u64::MAX),
            shift: k,
        }
    }

    /// `n / d`, rounded down.
    #[inline]
    pub(super) fn divide(&self, n: u128) -> u128 {
        match u64::try_from(n) {
            Ok(n) if u128::from(n) < Self::FAST_BELOW => {
                // 2n fits in 64 bits; the product's high word, shifted by
                // k (a shift by 64, for d above 2^63, gives 0 = n / d).
                let high = (u128::from(2 * n) * u128::from(self.multiplier)) >> 64;
                let high = u64::try_from(high).unwrap_or(u64::MAX);
                u128::from(high.checked_shr(self.shift).unwrap_or(0))
            }
            _ => div(n, u128::from(self.divisor)),
        }
    }
}

/// `ceil(units / per_ns)` nanoseconds, saturating at [`Span::NEVER`].
#[inline]
pub(super) fn span_ceil(units: u128, per_ns: u64) -> Span {
    if units == 0 {
        return Span::ZERO;
    }
    let ns = div(units - 1, u128::from(per_ns)).saturating_add(1);
    Span(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A span from a u128 nanosecond count, saturating.
#[inline]
pub(super) fn span(ns: u128) -> Span {
    Span(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// A quota turned into meter units, computed once per limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Bucket {
    quota: Quota,
    /// `burst * per`: the most the level may hold.
    capacity: u128,
}

impl Bucket {
    /// The meter for `quota`.
    pub(super) fn new(quota: Quota) -> Bucket {
        let capacity = u128::from(quota.burst()) * u128::from(quota.per().as_nanos());
        Bucket { quota, capacity }
    }

    /// The quota it enforces.
    pub(super) fn quota(&self) -> Quota {
        self.quota
    }

    fn per(&self) -> u64 {
        self.quota.per().as_nanos()
    }

    /// `permits` expressed in units.
    pub(super) fn units(&self, permits: u64) -> u128 {
        u128::from(permits) * u128::from(self.per())
    }

    /// Time for the level to drain from `level` down to `target`, rounded up
    /// so that waiting exactly that long is always enough.
    pub(super) fn time_to_drain(&self, level: u128, target: u128) -> Span {
        span_ceil(level.saturating_sub(target), self.quota.count())
    }

    /// Splits a level into whole permits and the leftover units (`< per`).
    fn split(&self, level: u128) -> (u64, u64) {
        let per = u128::from(self.per());
        let whole = div(level, per);
        // The remainder is below `per`, a u64; whole fits a u64 unless a
        // debt passed 2^64 permits, where it saturates.
        let frac = u64::try_from(level - whole * per).unwrap_or(u64::MAX);
        (u64::try_from(whole).unwrap_or(u64::MAX), frac)
    }
}

/// A level that drains continuously, brought up to date lazily.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meter {
    /// When the level was last brought up to date; never moves backwards.
    pub(super) at: Nanos,
    /// Whole permits in the level.
    pub(super) permits: u64,
    /// The part of a permit beyond `permits`, in units (below `per`).
    pub(super) fraction: u64,
}

impl Meter {
    /// The level at `now` (no earlier than `at`), drained. Above capacity
    /// it is a debt (a charge, or a state written under a larger quota):
    /// it drains at the same rate, and nothing fits until it has.
    pub(super) fn level_at(&self, bucket: &Bucket, now: Nanos) -> u128 {
        // Cannot overflow: (2^64-1)^2 + (2^64-1) < 2^128.
        let stored = bucket.units(self.permits) + u128::from(self.fraction);
        let drained = u128::from(now.since(self.at).as_nanos()) * u128::from(bucket.quota.count());
        stored.saturating_sub(drained)
    }

    fn store(&mut self, now: Nanos, permits: u64, fraction: u64) {
        self.at = now;
        self.permits = permits;
        self.fraction = fraction;
    }

    /// Adds `cost` permits to the level if it stays within capacity.
    pub(super) fn acquire(
        &mut self,
        bucket: &Bucket,
        now: Nanos,
        cost: u64,
        mode: Mode,
    ) -> Outcome {
        let now = now.max(self.at);
        let level = self.level_at(bucket, now);
        let (whole, frac) = bucket.split(level);
        let burst = bucket.quota.burst();
        let count = bucket.quota.count();
        let added = bucket.units(cost);
        let after = if cost <= burst {
            level.checked_add(added).filter(|&a| a <= bucket.capacity)
        } else {
            None
        };
        match after {
            Some(after) => {
                // Adding whole permits leaves the fraction as it was: no second division.
                let after_whole = whole.saturating_add(cost);
                if mode == Mode::Consume {
                    self.store(now, after_whole, frac);
                } else {
                    self.store(now, whole, frac);
                }
                Outcome {
                    allowed: true,
                    remaining: free_permits(burst, after_whole, frac),
                    reset_after: span_ceil(after, count),
                    retry_after: Span::ZERO,
                }
            }
            None => {
                self.store(now, whole, frac);
                let retry_after = if cost > burst {
                    Span::NEVER
                } else {
                    bucket.time_to_drain(level, bucket.capacity - added)
                };
                Outcome {
                    allowed: false,
                    remaining: free_permits(burst, whole, frac),
                    reset_after: span_ceil(level, count),
                    retry_after,
                }
            }
        }
    }

    /// Removes `cost` permits from the level, not below empty.
    pub(super) fn refund(&mut self, bucket: &Bucket, now: Nanos, cost: u64) {
        let now = now.max(self.at);
        let level = self
            .level_at(bucket, now)
            .saturating_sub(bucket.units(cost));
        let (whole, frac) = bucket.split(level);
        self.store(now, whole, frac);
    }

    /// Adds `cost` permits to the level whatever it holds (see
    /// [`super::Algorithm::charge`]).
    pub(super) fn charge(&mut self, bucket: &Bucket, now: Nanos, cost: u64) {
        let now = now.max(self.at);
        let level = self
            .level_at(bucket, now)
            .saturating_add(bucket.units(cost));
        let (whole, frac) = bucket.split(level);
        self.store(now, whole, frac);
    }

    /// Whether the level is zero at `now`, as in a fresh meter.
    pub(super) fn is_empty_at(&self, bucket: &Bucket, now: Nanos) -> bool {
        self.level_at(bucket, now.max(self.at)) == 0
    }
}

/// Whole permits that still fit: `floor(capacity - level)` in permits.
fn free_permits(burst: u64, whole: u64, frac: u64) -> u64 {
    burst
        .saturating_sub(whole)
        .saturating_sub(u64::from(frac != 0))
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;

    fn bucket(count: u64, per_ns: u64, burst: Option<u64>) -> Bucket {
        Bucket::new(Quota::new(count, Span(per_ns), burst).unwrap())
    }

    #[test]
    fn rounds_up_and_saturates() {
        assert_eq!(span_ceil(0, 7), Span::ZERO);
        assert_eq!(span_ceil(1, 7), Span(1));
        assert_eq!(span_ceil(7, 7), Span(1));
        assert_eq!(span_ceil(8, 7), Span(2));
        assert_eq!(span_ceil(u128::MAX, 1), Span::NEVER);
        assert_eq!(div(u128::MAX, 0), u128::MAX);
        assert_eq!(div(u128::MAX, 1), u128::MAX);
        assert_eq!(div(10, 3), 3);
    }

    #[test]
    fn divisor_matches_hardware_division() {
        let divisors = [
            1,
            2,
            3,
            7,
            10,
            1_000_000,
            1_000_000_000,
            3_000_000_000,
            (1 << 32) - 1,
            1 << 32,
            (1 << 32) + 1,
            (1 << 63) - 1,
            1 << 63,
            (1 << 63) + 1,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        // Random values of every magnitude: xorshift, shifted right by its
        // own low bits.
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed >> (seed % 64)
        };
        let random: Vec<u64> = (0..200).map(|_| next()).collect();
        for d in divisors.into_iter().chain(random) {
            let d = d.max(1);
            let divisor = Divisor::new(d);
            let edges = [
                0,
                1,
                d - 1,
                d,
                d.saturating_add(1),
                (1 << 63) - 1,
                1 << 63,
                u64::MAX,
            ];
            let mut numerators: Vec<u128> = edges.into_iter().map(u128::from).collect();
            numerators.extend([u128::MAX, u128::from(u64::MAX) * 3]);
            numerators.extend((0..200).map(|_| u128::from(next())));
            // Multiples of d and their neighbours, where rounding bites.
            for _ in 0..50 {
                let m = u128::from(d) * u128::from(next());
                numerators.extend([m.saturating_sub(1), m, m + 1]);
            }
            for n in numerators {
                assert_eq!(divisor.divide(n), n / u128::from(d), "{n} / {d}");
            }
        }
    }

    #[test]
    fn drains_exactly_at_odd_rates() {
        // 7 per 3 s: one permit every 3/7 s, so 7 permits drain in exactly 3 s.
        let b = bucket(7, 3_000_000_000, None);
        let mut m = Meter::default();
        for _ in 0..7 {
            assert!(m.acquire(&b, Nanos(0), 1, Mode::Consume).allowed);
        }
        assert_eq!(m.level_at(&b, Nanos(3_000_000_000)), 0);
        assert_eq!(m.level_at(&b, Nanos(2_999_999_999)), 7);
        // One permit is 3e9 units; 7 units drain per ns.
        assert_eq!(b.time_to_drain(b.units(1), 0), Span(428_571_429));
    }

    #[test]
    fn stored_level_splits_into_permits_and_fraction() {
        let b = bucket(7, 3_000_000_000, None);
        let mut m = Meter::default();
        m.acquire(&b, Nanos(0), 2, Mode::Consume);
        m.acquire(&b, Nanos(1), 0, Mode::Peek);
        assert_eq!(m.at, Nanos(1));
        assert_eq!(m.permits, 1);
        assert_eq!(m.fraction, 3_000_000_000 - 7);
    }

    #[test]
    fn oversized_stored_level_is_a_debt_that_drains() {
        let b = bucket(1, 1_000_000, Some(2));
        let mut m = Meter {
            at: Nanos(0),
            permits: u64::MAX,
            fraction: u64::MAX,
        };
        assert!(m.level_at(&b, Nanos(0)) > b.capacity);
        let refused = m.acquire(&b, Nanos(0), 1, Mode::Peek);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        // A debt of 3 permits beyond a burst of 2 at 1 per ms: one fits after 2ms.
        let mut m = Meter::default();
        m.charge(&b, Nanos(0), 5);
        assert_eq!(
            m.acquire(&b, Nanos(0), 1, Mode::Peek).retry_after,
            Span(4_000_000)
        );
        assert!(
            !m.acquire(&b, Nanos(4_000_000 - 1), 1, Mode::Consume)
                .allowed
        );
        assert!(m.acquire(&b, Nanos(4_000_000), 1, Mode::Consume).allowed);
    }
}
