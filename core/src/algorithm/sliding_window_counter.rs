//! Sliding window counter: an approximation of the sliding log with two
//! counters. Windows are aligned as in the fixed window; the estimate at
//! `elapsed` into the current window is
//! `previous × (per − elapsed) / per + current`, compared exactly in
//! integers (`previous × (per − elapsed) + (current + cost) × per ≤ count × per`).
//! `burst` is ignored.

use serde::{Deserialize, Serialize};

use super::fixed_window::window_start;
use super::meter::{div, span};
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A sliding window counter enforcing a [`Quota`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingWindowCounter {
    quota: Quota,
}

/// Per-key counter state: the current window and the counts of it and the one before.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlidingWindowCounterState {
    /// Start of the current window.
    pub(super) start: Nanos,
    /// Permits taken in the window before `start`.
    pub(super) previous: u64,
    /// Permits taken since `start`.
    pub(super) current: u64,
}

impl SlidingWindowCounter {
    /// A sliding window counter for `quota`.
    pub fn new(quota: Quota) -> Self {
        SlidingWindowCounter { quota }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// `state` as seen at `now`: windows that have ended shift out.
    fn rolled(&self, state: &SlidingWindowCounterState, now: Nanos) -> SlidingWindowCounterState {
        let start = window_start(now, self.quota.per());
        if start <= state.start {
            return state.clone();
        }
        let adjacent =
            u128::from(state.start.0) + u128::from(self.quota.per().0) == u128::from(start.0);
        SlidingWindowCounterState {
            start,
            previous: if adjacent { state.current } else { 0 },
            current: 0,
        }
    }

    /// Smallest wait after which `cost` fits, when it does not fit now and
    /// `cost <= count`. The estimate only decreases while nothing arrives,
    /// so the first instant that fits is found window by window.
    fn retry_after(&self, elapsed: u64, previous: u64, current: u64, cost: u64) -> Span {
        let per = u128::from(self.quota.per().0);
        let count = self.quota.count();
        let to_end = per - u128::from(elapsed);
        // Later in this window: previous × (to_end − d) <= slack × per.
        if previous > 0 {
            if let Some(slack) = count.checked_sub(current).and_then(|f| f.checked_sub(cost)) {
                let most_weight = div(u128::from(slack) * per, u128::from(previous));
                if most_weight > 0 && most_weight < to_end {
                    return span(to_end - most_weight);
                }
            }
        }
        // In the next window `current` becomes the previous count: wait until
        // current × (per − e) <= (count − cost) × per. If that needs all of
        // the next window, the one after starts empty and admits any cost <= count.
        let into_next = if current == 0 {
            0
        } else {
            let most_weight = div(u128::from(count - cost) * per, u128::from(current));
            per.saturating_sub(most_weight)
        };
        span(to_end + into_next)
    }
}

impl Algorithm for SlidingWindowCounter {
    type State = SlidingWindowCounterState;

    fn acquire(
        &self,
        state: &mut SlidingWindowCounterState,
        now: Nanos,
        cost: u64,
        mode: Mode,
    ) -> Outcome {
        *state = self.rolled(state, now);
        // Time going back stays in the state's window; it weighs the
        // previous window no less than the real latest time would.
        let now = now.max(state.start);
        let per = u128::from(self.quota.per().0);
        let count = self.quota.count();
        let elapsed = now.0 - state.start.0;
        let weighted_previous = u128::from(state.previous) * (per - u128::from(elapsed));
        let limit = u128::from(count) * per;
        let fits = |current: u64| {
            weighted_previous
                .checked_add(u128::from(current) * per)
                .is_some_and(|estimate| estimate <= limit)
        };
        let allowed = cost <= count.saturating_sub(state.current) && fits(state.current + cost);
        let current_after = if allowed {
            state.current + cost
        } else {
            state.current
        };
        if allowed && mode == Mode::Consume {
            state.current = current_after;
        }
        // ceil(weighted_previous / per) <= previous, so it fits a u64.
        let previous_share =
            u64::try_from(div(weighted_previous + (per - 1), per)).unwrap_or(u64::MAX);
        let end = u128::from(state.start.0) + per;
        let reset_after = if current_after > 0 {
            end + per
        } else if state.previous > 0 {
            end
        } else {
            u128::from(now.0)
        };
        Outcome {
            allowed,
            remaining: count
                .saturating_sub(current_after)
                .saturating_sub(previous_share),
            reset_after: span(reset_after - u128::from(now.0)),
            retry_after: if allowed {
                Span::ZERO
            } else if cost > count {
                Span::NEVER
            } else {
                self.retry_after(elapsed, state.previous, state.current, cost)
            },
        }
    }

    fn refund(&self, state: &mut SlidingWindowCounterState, now: Nanos, cost: u64) {
        // Permits of an earlier window are only in the weighted estimate; leave them.
        if window_start(now, self.quota.per()) <= state.start {
            state.current = state.current.saturating_sub(cost);
        }
    }

    fn charge(&self, state: &mut SlidingWindowCounterState, now: Nanos, cost: u64) {
        *state = self.rolled(state, now);
        state.current = state.current.saturating_add(cost);
    }

    fn is_fresh(&self, state: &SlidingWindowCounterState, now: Nanos) -> bool {
        let view = self.rolled(state, now);
        view.previous == 0 && view.current == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn swc(count: u64, per: u64) -> SlidingWindowCounter {
        SlidingWindowCounter::new(Quota::new(count, Span(per), None).unwrap())
    }

    #[test]
    fn nth_allowed_next_denied_in_first_window() {
        let alg = swc(4, 10 * SEC);
        let mut s = SlidingWindowCounterState::default();
        for i in 0..4 {
            let o = alg.check(&mut s, Nanos(2 * SEC), 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 3 - i);
            // Counted in this window: back to zero at the end of the next.
            assert_eq!(o.reset_after, Span(18 * SEC));
        }
        let o = alg.check(&mut s, Nanos(2 * SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // Next window at 10s: estimate 4 × (10 − e)/10 <= 3 once e >= 2.5s.
        assert_eq!(o.retry_after, Span(8 * SEC + 2_500_000_000));
        assert!(
            !alg.peek(&mut s.clone(), Nanos(12_500_000_000 - 1), 1)
                .allowed
        );
        assert!(alg.peek(&mut s.clone(), Nanos(12_500_000_000), 1).allowed);
    }

    #[test]
    fn previous_window_is_weighted() {
        let alg = swc(10, 10 * SEC);
        let mut s = SlidingWindowCounterState::default();
        assert!(alg.check(&mut s, Nanos(5 * SEC), 10).allowed);
        // 3s into the next window: 10 × 7/10 = 7 counted, 3 free.
        let o = alg.peek(&mut s, Nanos(13 * SEC), 3);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        let o = alg.check(&mut s, Nanos(13 * SEC), 4);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 3);
        // 4 fit once 10 × (10 − e)/10 <= 6: e = 4s, one second from now.
        assert_eq!(o.retry_after, Span(SEC));
        assert_eq!(o.reset_after, Span(7 * SEC));
        assert!(!alg.peek(&mut s.clone(), Nanos(14 * SEC - 1), 4).allowed);
        assert!(alg.check(&mut s, Nanos(14 * SEC), 4).allowed);
    }

    #[test]
    fn retry_rolls_past_a_full_current_window() {
        let alg = swc(3, 10 * SEC);
        let mut s = SlidingWindowCounterState::default();
        assert!(alg.check(&mut s, Nanos(0), 3).allowed);
        // Cost 3 needs the estimate at 0: only in the window after next.
        let o = alg.check(&mut s, Nanos(SEC), 3);
        assert_eq!(o.retry_after, Span(19 * SEC));
        assert!(!alg.peek(&mut s.clone(), Nanos(20 * SEC - 1), 3).allowed);
        assert!(alg.peek(&mut s.clone(), Nanos(20 * SEC), 3).allowed);
    }

    #[test]
    fn odd_period_exact_weights() {
        // 7 per 3s: 7 in window 0; at 1ns into window 1, weight (3e9−1)/3e9.
        let alg = swc(7, 3 * SEC);
        let mut s = SlidingWindowCounterState::default();
        assert!(alg.check(&mut s, Nanos(0), 7).allowed);
        let o = alg.check(&mut s, Nanos(3 * SEC + 1), 1);
        assert!(!o.allowed);
        // 7 × (3e9 − e) <= 6 × 3e9  ⇔  e >= 3e9/7 = 428571428.57.
        assert_eq!(o.retry_after, Span(428_571_429 - 1));
        assert!(alg.check(&mut s, Nanos(3 * SEC + 428_571_429), 1).allowed);
    }

    #[test]
    fn cost_above_count_is_never() {
        let alg = swc(5, SEC);
        let mut s = SlidingWindowCounterState::default();
        let o = alg.check(&mut s, Nanos(0), 6);
        assert_eq!(o.retry_after, Span::NEVER);
        assert_eq!(o.remaining, 5);
        assert_eq!(o.reset_after, Span::ZERO);
    }

    #[test]
    fn refund_in_same_window_only() {
        let alg = swc(2, SEC);
        let mut s = SlidingWindowCounterState::default();
        let first = alg.check(&mut s, Nanos(3), 2);
        alg.refund(&mut s, Nanos(3), 2);
        assert_eq!(alg.check(&mut s, Nanos(3), 2), first);
        alg.refund(&mut s, Nanos(SEC + 3), 2);
        assert_eq!(s.current, 2);
        assert!(!alg.is_fresh(&s, Nanos(2 * SEC - 1)));
        assert!(alg.is_fresh(&s, Nanos(2 * SEC)));
    }

    #[test]
    fn peek_and_backwards_time() {
        let alg = swc(1, SEC);
        let mut s = SlidingWindowCounterState::default();
        assert!(alg.peek(&mut s, Nanos(5 * SEC), 1).allowed);
        assert!(alg.check(&mut s, Nanos(5 * SEC), 1).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(s.start, Nanos(5 * SEC));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let alg = swc(u64::MAX, u64::MAX);
        let mut s = SlidingWindowCounterState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX - 1), u64::MAX).allowed);
        let o = alg.check(&mut s, Nanos(u64::MAX), u64::MAX);
        assert!(!o.allowed);
        alg.refund(&mut s, Nanos(u64::MAX), u64::MAX);
        alg.is_fresh(&s, Nanos(u64::MAX));
    }

    #[test]
    fn a_charge_weighs_on_the_next_window_too() {
        let alg = swc(10, 10 * SEC);
        let mut s = SlidingWindowCounterState::default();
        alg.charge(&mut s, Nanos(5 * SEC), 20);
        let o = alg.peek(&mut s, Nanos(5 * SEC), 1);
        assert!(!o.allowed);
        // Next window: 20 × (10 − e)/10 + 1 <= 10 once e >= 5.5s.
        assert_eq!(o.retry_after, Span(10_500_000_000));
        assert!(
            !alg.peek(&mut s.clone(), Nanos(15_500_000_000 - 1), 1)
                .allowed
        );
        assert!(alg.peek(&mut s.clone(), Nanos(15_500_000_000), 1).allowed);
        assert!(alg.is_fresh(&s, Nanos(30 * SEC)));
    }
}
