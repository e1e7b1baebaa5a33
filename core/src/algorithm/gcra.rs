//! GCRA (generic cell rate algorithm), virtual scheduling form: one
//! theoretical arrival time (TAT) per key.
//!
//! The emission interval is `T = per / count` and the tolerance `τ = burst × T`;
//! a cost `n` is admitted iff `max(TAT, now) + n·T − now ≤ τ`, and then
//! `TAT ← max(TAT, now) + n·T`. Times are compared in scaled units of
//! `1/count` ns so `T` is exact (it is `per` units). `TAT − now` is the token
//! bucket's spent level, so both admit exactly the same sequences.
//!
//! A charge (usage reported after the fact) moves the TAT forward without
//! the check, possibly beyond `now + τ`: a debt, refused until time catches
//! up with it.
//!
//! Time going back: the state has no "last time", so an earlier `now` is
//! believed; a TAT more than `τ` ahead of it reads as a debt. A lagging
//! clock can therefore only be stricter, never admit more.

use serde::{Deserialize, Serialize};

use super::meter::{div, span, span_ceil, Divisor};
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A GCRA limiter enforcing a [`Quota`]: `count` per `per`, `burst` back to back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gcra {
    quota: Quota,
    /// Whole nanoseconds of the emission interval `per / count`.
    interval_ns: u64,
    /// The rest of the interval, in `1/count` ns (`per % count`).
    interval_rem: u64,
    /// `τ = burst × T` in scaled units: `burst × per`.
    tolerance: u128,
    /// Divides by `per`: units to permits.
    per_divisor: Divisor,
    /// Divides by `count`: units to nanoseconds.
    count_divisor: Divisor,
}

/// Per-key GCRA state: the theoretical arrival time `tat + fraction / count` ns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcraState {
    /// Whole nanoseconds of the TAT.
    pub(super) tat: Nanos,
    /// The rest of the TAT in `1/count` ns (below `count`).
    pub(super) fraction: u64,
}

impl Gcra {
    /// A GCRA limiter for `quota`.
    pub fn new(quota: Quota) -> Self {
        let count = quota.count();
        let per = quota.per().as_nanos();
        Gcra {
            quota,
            interval_ns: per / count,
            interval_rem: per % count,
            tolerance: u128::from(quota.burst()) * u128::from(per),
            per_divisor: Divisor::new(per),
            count_divisor: Divisor::new(count),
        }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The TAT in scaled units; a fraction from a larger count is capped.
    fn tat_units(&self, state: &GcraState) -> u128 {
        let count = self.quota.count();
        u128::from(state.tat.0) * u128::from(count) + u128::from(state.fraction.min(count - 1))
    }

    /// `(ns, fraction) + cost × T`, without dividing in the common case (the
    /// remainder part of `cost × T` is below `count`, always so for cost 1).
    fn advance(&self, ns: u64, fraction: u64, cost: u64) -> (u128, u64) {
        let count = u128::from(self.quota.count());
        let rem = u128::from(cost) * u128::from(self.interval_rem);
        let (carry, rem) = if rem < count {
            (0, rem)
        } else {
            (div(rem, count), rem % count)
        };
        let mut whole = u128::from(ns) + u128::from(cost) * u128::from(self.interval_ns) + carry;
        // Both parts are below count, so their sum carries at most once.
        let mut rem = u128::from(fraction) + rem;
        if rem >= count {
            rem -= count;
            whole += 1;
        }
        (whole, u64::try_from(rem).unwrap_or(u64::MAX))
    }
}

impl Gcra {
    /// `TAT ← max(TAT, now) + cost·T`, saturated at the end of time.
    fn push_back(&self, state: &mut GcraState, now: Nanos, cost: u64) {
        let count = self.quota.count();
        // The fraction is below `count`, so comparing whole nanoseconds
        // compares the TATs: no scaled multiplication.
        let (ns, fraction) = if state.tat >= now {
            (state.tat.0, state.fraction.min(count - 1))
        } else {
            (now.0, 0)
        };
        let (ns, fraction) = self.advance(ns, fraction, cost);
        self.set_tat(state, ns, fraction);
    }

    /// Stores the TAT `ns + fraction / count` (`fraction < count`).
    fn set_tat(&self, state: &mut GcraState, ns: u128, fraction: u64) {
        match u64::try_from(ns) {
            Ok(ns) => {
                state.tat = Nanos(ns);
                state.fraction = fraction;
            }
            // Past the end of time: keep the latest representable TAT.
            Err(_) => {
                state.tat = Nanos(u64::MAX);
                state.fraction = self.quota.count() - 1;
            }
        }
    }
}

impl Algorithm for Gcra {
    type State = GcraState;

    fn acquire(&self, state: &mut GcraState, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        let count = self.quota.count();
        let per = u128::from(self.quota.per().as_nanos());
        // How far the TAT is ahead of now: the bucket's spent level (beyond
        // τ, a debt). `TAT − now` in scaled units, with one multiplication;
        // a TAT behind now is nothing ahead, as its fraction is below one
        // nanosecond.
        let ahead = match state.tat.0.checked_sub(now.0) {
            Some(ns) => {
                u128::from(ns) * u128::from(count) + u128::from(state.fraction.min(count - 1))
            }
            None => 0,
        };
        let wanted = u128::from(cost) * per;
        let after = if cost <= self.quota.burst() {
            ahead.checked_add(wanted).filter(|&a| a <= self.tolerance)
        } else {
            None
        };
        let Some(after) = after else {
            return Outcome {
                allowed: false,
                remaining: u64::try_from(
                    self.per_divisor
                        .divide(self.tolerance.saturating_sub(ahead)),
                )
                .unwrap_or(u64::MAX),
                reset_after: span_ceil(ahead, count),
                retry_after: if cost > self.quota.burst() {
                    Span::NEVER
                } else {
                    // Denied, so ahead + wanted > τ.
                    span_ceil(ahead.saturating_add(wanted) - self.tolerance, count)
                },
            };
        };
        let reset_after = if mode == Mode::Consume && cost > 0 {
            // TAT ← max(TAT, now) + cost·T, which is now + `after` units:
            // split into whole nanoseconds and a fraction below `count`.
            let whole = self.count_divisor.divide(after);
            let fraction = u64::try_from(after - whole * u128::from(count)).unwrap_or(0);
            self.set_tat(state, u128::from(now.0) + whole, fraction);
            span(whole + u128::from(fraction != 0))
        } else {
            span_ceil(after, count)
        };
        Outcome {
            allowed: true,
            remaining: u64::try_from(self.per_divisor.divide(self.tolerance - after))
                .unwrap_or(u64::MAX),
            reset_after,
            retry_after: Span::ZERO,
        }
    }

    fn refund(&self, state: &mut GcraState, now: Nanos, cost: u64) {
        let count = u128::from(self.quota.count());
        let tat = self.tat_units(state);
        let now_units = u128::from(now.0) * count;
        if tat <= now_units {
            return;
        }
        let back = u128::from(cost) * u128::from(self.quota.per().as_nanos());
        let tat = tat.saturating_sub(back).max(now_units);
        let ns = div(tat, count);
        state.tat = Nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        state.fraction = u64::try_from(tat - ns * count).unwrap_or(0);
    }

    fn charge(&self, state: &mut GcraState, now: Nanos, cost: u64) {
        self.push_back(state, now, cost);
    }

    fn is_fresh(&self, state: &GcraState, now: Nanos) -> bool {
        self.tat_units(state) <= u128::from(now.0) * u128::from(self.quota.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn gcra(count: u64, per: u64, burst: Option<u64>) -> Gcra {
        Gcra::new(Quota::new(count, Span(per), burst).unwrap())
    }

    #[test]
    fn burst_then_one_per_interval() {
        let alg = gcra(10, SEC, None);
        let mut s = GcraState::default();
        for i in 0..10 {
            let o = alg.check(&mut s, Nanos(SEC), 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 9 - i);
            assert_eq!(o.reset_after, Span((i + 1) * 100_000_000));
        }
        let o = alg.check(&mut s, Nanos(SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(100_000_000));
        assert_eq!(o.reset_after, Span(SEC));
        assert!(!alg.check(&mut s, Nanos(SEC + 100_000_000 - 1), 1).allowed);
        let o = alg.check(&mut s, Nanos(SEC + 100_000_000), 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
    }

    #[test]
    fn odd_rate_is_exact() {
        // T = 3e9/7 ns = 428571428 + 4/7 ns.
        let alg = gcra(7, 3 * SEC, None);
        assert_eq!((alg.interval_ns, alg.interval_rem), (428_571_428, 4));
        let mut s = GcraState::default();
        for _ in 0..7 {
            assert!(alg.check(&mut s, Nanos(0), 1).allowed);
        }
        // Seven intervals are exactly 3s: no drift from rounding T.
        assert_eq!(
            s,
            GcraState {
                tat: Nanos(3 * SEC),
                fraction: 0
            }
        );
        let o = alg.check(&mut s, Nanos(0), 1);
        assert_eq!(o.retry_after, Span(428_571_429));
        assert!(!alg.peek(&mut s.clone(), Nanos(428_571_428), 1).allowed);
        assert!(alg.peek(&mut s.clone(), Nanos(428_571_429), 1).allowed);
        assert!(!alg.is_fresh(&s, Nanos(3 * SEC - 1)));
        assert!(alg.is_fresh(&s, Nanos(3 * SEC)));
    }

    #[test]
    fn multi_cost_carries_the_remainder() {
        let alg = gcra(7, 3 * SEC, None);
        let mut s = GcraState::default();
        assert!(alg.check(&mut s, Nanos(0), 3).allowed);
        // 3 × 3e9/7 = 1285714285 + 5/7.
        assert_eq!(
            s,
            GcraState {
                tat: Nanos(1_285_714_285),
                fraction: 5
            }
        );
        assert!(alg.check(&mut s, Nanos(0), 4).allowed);
        assert_eq!(
            s,
            GcraState {
                tat: Nanos(3 * SEC),
                fraction: 0
            }
        );
    }

    #[test]
    fn cost_above_burst_is_never() {
        let alg = gcra(5, SEC, Some(2));
        let mut s = GcraState::default();
        let o = alg.check(&mut s, Nanos(0), 3);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span::NEVER);
        assert_eq!(o.remaining, 2);
        assert_eq!(o.reset_after, Span::ZERO);
    }

    #[test]
    fn refund_moves_tat_back_not_below_now() {
        let alg = gcra(5, SEC, None);
        let mut s = GcraState::default();
        let first = alg.check(&mut s, Nanos(10), 3);
        alg.refund(&mut s, Nanos(10), 3);
        assert_eq!(alg.check(&mut s, Nanos(10), 3), first);
        alg.refund(&mut s, Nanos(10), 100);
        assert_eq!(
            s,
            GcraState {
                tat: Nanos(10),
                fraction: 0
            }
        );
        assert!(alg.is_fresh(&s, Nanos(10)));
    }

    #[test]
    fn peek_does_not_consume() {
        let alg = gcra(1, SEC, None);
        let mut s = GcraState::default();
        assert!(alg.peek(&mut s, Nanos(0), 1).allowed);
        assert_eq!(s, GcraState::default());
        assert!(alg.check(&mut s, Nanos(0), 1).allowed);
    }

    #[test]
    fn lagging_clock_reads_as_a_debt() {
        let alg = gcra(1, SEC, None);
        let mut s = GcraState::default();
        assert!(alg.check(&mut s, Nanos(100 * SEC), 1).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // Stricter, never more: the TAT is 101 s ahead of this clock.
        assert_eq!(o.reset_after, Span(101 * SEC));
        assert_eq!(o.retry_after, Span(101 * SEC));
        assert!(alg.check(&mut s, Nanos(101 * SEC), 1).allowed);
    }

    #[test]
    fn a_charge_moves_the_tat_forward_beyond_the_tolerance() {
        let alg = gcra(10, SEC, None);
        let mut s = GcraState::default();
        assert!(alg.check(&mut s, Nanos(0), 1).allowed);
        // 25 permits reported: 16 beyond the 9 left, repaid at 10 per second.
        alg.charge(&mut s, Nanos(0), 25);
        let o = alg.peek(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(1_700_000_000));
        assert_eq!(o.reset_after, Span(2_600_000_000));
        assert!(!alg.check(&mut s, Nanos(1_700_000_000 - 1), 1).allowed);
        assert!(alg.check(&mut s, Nanos(1_700_000_000), 1).allowed);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let alg = gcra(u64::MAX, u64::MAX, Some(u64::MAX));
        let mut s = GcraState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        assert!(!alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        alg.refund(&mut s, Nanos(u64::MAX), u64::MAX);
        let alg = gcra(1, u64::MAX, Some(u64::MAX));
        let mut s = GcraState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        assert_eq!(s.tat, Nanos(u64::MAX));
        alg.is_fresh(&s, Nanos(0));
    }
}
