//! Fixed window: at most `count` permits per window, windows aligned to
//! multiples of `per` since the epoch (so with the Unix epoch, `1m` windows
//! start on the minute). `burst` is ignored.

use serde::{Deserialize, Serialize};

use super::meter::span;
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A fixed window counter enforcing a [`Quota`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    quota: Quota,
}

/// Per-key fixed window state: the current window and what it has used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedWindowState {
    /// Start of the window `used` belongs to.
    pub(super) start: Nanos,
    /// Permits taken in that window.
    pub(super) used: u64,
}

/// Start of the window of length `per` containing `now`.
pub(super) fn window_start(now: Nanos, per: Span) -> Nanos {
    // per >= 1ms, so the remainder never divides by zero.
    Nanos(now.0 - now.0 % per.0.max(1))
}

impl FixedWindow {
    /// A fixed window counter for `quota`.
    pub fn new(quota: Quota) -> Self {
        FixedWindow { quota }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Moves `state` to the window of `now` and returns the time to decide at
    /// (never before the state's window: time going back is no time).
    fn roll(&self, state: &mut FixedWindowState, now: Nanos) -> Nanos {
        let start = window_start(now, self.quota.per());
        if start > state.start {
            state.start = start;
            state.used = 0;
        }
        now.max(state.start)
    }
}

impl Algorithm for FixedWindow {
    type State = FixedWindowState;

    fn acquire(&self, state: &mut FixedWindowState, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        let now = self.roll(state, now);
        let count = self.quota.count();
        let free = count.saturating_sub(state.used);
        let allowed = cost <= free;
        let used_after = if allowed {
            state.used.saturating_add(cost)
        } else {
            state.used
        };
        if allowed && mode == Mode::Consume {
            state.used = used_after;
        }
        let end = u128::from(state.start.0) + u128::from(self.quota.per().0);
        let to_end = span(end - u128::from(now.0));
        Outcome {
            allowed,
            remaining: count.saturating_sub(used_after),
            // Nothing used: the allowance is already whole.
            reset_after: if used_after == 0 { Span::ZERO } else { to_end },
            retry_after: if allowed {
                Span::ZERO
            } else if cost > count {
                Span::NEVER
            } else {
                to_end
            },
        }
    }

    fn refund(&self, state: &mut FixedWindowState, now: Nanos, cost: u64) {
        // Permits of an earlier window are already back.
        if window_start(now, self.quota.per()) <= state.start {
            state.used = state.used.saturating_sub(cost);
        }
    }

    fn charge(&self, state: &mut FixedWindowState, now: Nanos, cost: u64) {
        self.roll(state, now);
        state.used = state.used.saturating_add(cost);
    }

    fn is_fresh(&self, state: &FixedWindowState, now: Nanos) -> bool {
        state.used == 0 || window_start(now, self.quota.per()) > state.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn fw(count: u64, per: u64) -> FixedWindow {
        FixedWindow::new(Quota::new(count, Span(per), None).unwrap())
    }

    #[test]
    fn nth_allowed_next_denied_until_window_end() {
        let alg = fw(3, 10 * SEC);
        let mut s = FixedWindowState::default();
        let now = Nanos(24 * SEC);
        for i in 0..3 {
            let o = alg.check(&mut s, now, 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 2 - i);
            assert_eq!(o.reset_after, Span(6 * SEC));
        }
        let o = alg.check(&mut s, now, 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(6 * SEC));
        assert_eq!(o.reset_after, Span(6 * SEC));
        assert!(!alg.check(&mut s, Nanos(30 * SEC - 1), 1).allowed);
        let o = alg.check(&mut s, Nanos(30 * SEC), 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 2);
        assert_eq!(o.reset_after, Span(10 * SEC));
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let alg = fw(7, 3 * SEC);
        let mut s = FixedWindowState::default();
        assert!(alg.check(&mut s, Nanos(3 * SEC - 1), 7).allowed);
        assert!(!alg.check(&mut s, Nanos(3 * SEC - 1), 1).allowed);
        assert!(alg.check(&mut s, Nanos(3 * SEC), 7).allowed);
        assert_eq!(s.start, Nanos(3 * SEC));
    }

    #[test]
    fn cost_above_count_is_never() {
        let alg = fw(5, SEC);
        let mut s = FixedWindowState::default();
        let o = alg.check(&mut s, Nanos(0), 6);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span::NEVER);
        assert_eq!(o.remaining, 5);
        assert_eq!(o.reset_after, Span::ZERO);
    }

    #[test]
    fn refund_only_in_same_window() {
        let alg = fw(2, SEC);
        let mut s = FixedWindowState::default();
        let first = alg.check(&mut s, Nanos(100), 2);
        alg.refund(&mut s, Nanos(200), 2);
        assert_eq!(alg.check(&mut s, Nanos(100), 2), first);
        alg.refund(&mut s, Nanos(SEC + 1), 2);
        assert_eq!(s.used, 2);
        assert!(alg.is_fresh(&s, Nanos(SEC + 1)));
        assert!(!alg.is_fresh(&s, Nanos(SEC - 1)));
    }

    #[test]
    fn peek_does_not_consume_and_time_backwards_stays_in_window() {
        let alg = fw(1, SEC);
        let mut s = FixedWindowState::default();
        assert!(alg.peek(&mut s, Nanos(5 * SEC), 1).allowed);
        assert!(alg.check(&mut s, Nanos(5 * SEC), 1).allowed);
        let o = alg.check(&mut s, Nanos(SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(SEC));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let alg = fw(u64::MAX, u64::MAX);
        let mut s = FixedWindowState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        let o = alg.check(&mut s, Nanos(u64::MAX), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span::NEVER);
        alg.refund(&mut s, Nanos(u64::MAX), u64::MAX);
        assert!(alg.is_fresh(&s, Nanos(u64::MAX)));
    }

    #[test]
    fn a_charge_goes_over_the_limit_until_the_window_rolls() {
        let alg = fw(10, 10 * SEC);
        let mut s = FixedWindowState::default();
        assert!(alg.check(&mut s, Nanos(SEC), 1).allowed);
        alg.charge(&mut s, Nanos(2 * SEC), 30);
        let o = alg.peek(&mut s, Nanos(3 * SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(7 * SEC));
        assert!(!alg.is_fresh(&s, Nanos(10 * SEC - 1)));
        // The debt ends with its window.
        assert!(alg.check(&mut s, Nanos(10 * SEC), 10).allowed);
    }
}
