//! Fixed window: at most `count` permits per window, windows aligned to
//! multiples of `per` since the epoch (so with the Unix epoch, `1m` windows
//! start on the minute), or one window the caller gives (a calendar month
//! in a time zone, which core cannot compute without a clock's calendar).
//! `burst` is ignored.

use serde::{Deserialize, Serialize};

use super::meter::span;
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A fixed window counter enforcing a [`Quota`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    quota: Quota,
    windows: Windows,
}

/// Where a fixed window counter's windows fall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Windows {
    /// Multiples of the quota's period since the epoch.
    Aligned,
    /// The window `[start, end)` containing the times decided: the caller
    /// computes it for each decision (a calendar day, week or month).
    Given {
        /// Its first instant.
        start: Nanos,
        /// The first instant after it.
        end: Nanos,
    },
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
    /// A fixed window counter for `quota`, windows aligned to its period.
    pub fn new(quota: Quota) -> Self {
        FixedWindow {
            quota,
            windows: Windows::Aligned,
        }
    }

    /// A fixed window counter for `quota` deciding in the window
    /// `[start, end)` only (the quota's period is not used): the caller
    /// builds one per decision, for the window holding its time.
    pub fn within(quota: Quota, start: Nanos, end: Nanos) -> Self {
        FixedWindow {
            quota,
            windows: Windows::Given { start, end },
        }
    }

    /// Start and end (exclusive, past `u64` for the last aligned window)
    /// of the window containing `now`.
    fn window(&self, now: Nanos) -> (Nanos, u128) {
        match self.windows {
            Windows::Aligned => {
                let start = window_start(now, self.quota.per());
                let end = u128::from(start.0) + u128::from(self.quota.per().0);
                (start, end)
            }
            Windows::Given { start, end } => (start, u128::from(end.0)),
        }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Moves `state` to the window of `now` and returns the time to decide at
    /// (never before the state's window: time going back is no time).
    fn roll(&self, state: &mut FixedWindowState, now: Nanos) -> (Nanos, u128) {
        let (start, end) = self.window(now);
        if start > state.start {
            state.start = start;
            state.used = 0;
        }
        (now.max(state.start), end)
    }
}

impl Algorithm for FixedWindow {
    type State = FixedWindowState;

    fn acquire(&self, state: &mut FixedWindowState, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        let (now, end) = self.roll(state, now);
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
        // A state ahead of the window (time went back) keeps its own
        // window: an aligned one's end is known; a given one's is not, and
        // the end given bounds the report (time going back is no time).
        let end = match self.windows {
            Windows::Aligned => u128::from(state.start.0) + u128::from(self.quota.per().0),
            Windows::Given { .. } => end,
        };
        let to_end = span(end.saturating_sub(u128::from(now.0)));
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
        if self.window(now).0 <= state.start {
            state.used = state.used.saturating_sub(cost);
        }
    }

    fn charge(&self, state: &mut FixedWindowState, now: Nanos, cost: u64) {
        self.roll(state, now);
        state.used = state.used.saturating_add(cost);
    }

    fn is_fresh(&self, state: &FixedWindowState, now: Nanos) -> bool {
        state.used == 0 || self.window(now).0 > state.start
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
    fn a_given_window_is_used_whatever_its_length() {
        // A 25-hour day (the end of summer time) starting at 100 s.
        let quota = Quota::new(2, Span(86_400 * SEC), None).unwrap();
        let (start, end) = (Nanos(100 * SEC), Nanos((100 + 25 * 3_600) * SEC));
        let alg = FixedWindow::within(quota, start, end);
        let mut s = FixedWindowState::default();
        let o = alg.check(&mut s, Nanos(160 * SEC), 2);
        assert!(o.allowed);
        assert_eq!(o.reset_after, Span((25 * 3_600 - 60) * SEC));
        let o = alg.check(&mut s, Nanos(end.0 - 1), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(1));
        alg.refund(&mut s, Nanos(200 * SEC), 1);
        assert_eq!(s.used, 1);
        // The next window, as the caller gives it, starts afresh.
        let next = FixedWindow::within(quota, end, Nanos(end.0 + 24 * 3_600 * SEC));
        assert!(next.is_fresh(&s, end));
        next.refund(&mut s, end, 1);
        assert_eq!(s.used, 1, "no refund into an ended window");
        let o = next.check(&mut s, end, 2);
        assert!(o.allowed);
        assert_eq!(o.reset_after, Span(24 * 3_600 * SEC));
        // Given the previous window again (a clock behind): the state's
        // later window counts, and nothing is refunded into the old one.
        let o = alg.check(&mut s, Nanos(end.0 - 1), 1);
        assert!(!o.allowed);
        assert_eq!(o.reset_after, Span::ZERO);
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
