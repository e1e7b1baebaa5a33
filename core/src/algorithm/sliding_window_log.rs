//! Sliding window log: exact over any trailing window of length `per`.
//!
//! Every admission is remembered as `(time, cost)` (admissions at the same
//! instant merged) until it is `per` old. Memory is bounded by the limit:
//! an admission is logged only while the live costs sum below `count`, each
//! entry costs at least 1, and a charge beyond the limit joins the newest
//! entry once there are `count`, so there are never more than `count`
//! entries. `burst` is ignored.

use alloc::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::meter::span;
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A sliding window log enforcing a [`Quota`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingWindowLog {
    quota: Quota,
}

/// Per-key log state: the admissions still inside the window, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "LogForm")]
pub struct SlidingWindowLogState {
    /// Latest time seen, so that time going back never revives expired entries.
    pub(super) last: Nanos,
    /// `(time, cost)` of admissions, strictly increasing in time, costs >= 1.
    pub(super) entries: VecDeque<(Nanos, u64)>,
    /// Sum of the entries' costs, kept so a decision is not a walk of the
    /// log; derived on reading, never stored.
    #[serde(skip_serializing)]
    total: u64,
}

/// The serialised form: the log without its derived total.
#[derive(Deserialize)]
struct LogForm {
    last: Nanos,
    entries: VecDeque<(Nanos, u64)>,
}

impl From<LogForm> for SlidingWindowLogState {
    fn from(form: LogForm) -> Self {
        SlidingWindowLogState::from_parts(form.last, form.entries)
    }
}

impl SlidingWindowLogState {
    /// A state holding `entries`, with their total derived.
    pub(super) fn from_parts(last: Nanos, entries: VecDeque<(Nanos, u64)>) -> Self {
        let total = total_of(&entries);
        SlidingWindowLogState {
            last,
            entries,
            total,
        }
    }
}

/// The entries' costs summed, saturating.
fn total_of(entries: &VecDeque<(Nanos, u64)>) -> u64 {
    entries
        .iter()
        .fold(0u64, |sum, &(_, c)| sum.saturating_add(c))
}

impl SlidingWindowLog {
    /// A sliding window log for `quota`.
    pub fn new(quota: Quota) -> Self {
        SlidingWindowLog { quota }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// When an admission at `at` leaves the window, in u128 so it never overflows.
    fn expiry(&self, at: Nanos) -> u128 {
        u128::from(at.0) + u128::from(self.quota.per().0)
    }

    fn expired(&self, at: Nanos, now: Nanos) -> bool {
        self.expiry(at) <= u128::from(now.0)
    }

    /// Time from `now` until the entry at `at` leaves the window.
    fn until_expiry(&self, at: Nanos, now: Nanos) -> Span {
        span(self.expiry(at).saturating_sub(u128::from(now.0)))
    }

    /// Logs `cost` (at least 1) taken at `now` (the state's latest time).
    /// A log already holding `count` entries (only charges beyond the limit
    /// get there) adds it to the newest entry, moved to `now`: those
    /// permits then leave the window later than they would, which is
    /// stricter, and memory stays bounded by `count` entries.
    fn record(&self, state: &mut SlidingWindowLogState, now: Nanos, cost: u64) {
        state.total = state.total.saturating_add(cost);
        let full = state.entries.len() as u64 >= self.quota.count();
        match state.entries.back_mut() {
            Some((at, c)) if *at == now || full => {
                *at = now;
                *c = c.saturating_add(cost);
            }
            _ => state.entries.push_back((now, cost)),
        }
    }

    /// Shortest wait after which `excess` permits' worth of the oldest
    /// entries have left the window.
    fn wait_for(&self, state: &SlidingWindowLogState, now: Nanos, excess: u128) -> Span {
        let mut freed: u128 = 0;
        for &(at, cost) in &state.entries {
            freed += u128::from(cost);
            if freed >= excess {
                return self.until_expiry(at, now);
            }
        }
        // Only reachable if the log holds less than `excess`, i.e. never for
        // a consistent state; the newest entry is the last to go.
        state
            .entries
            .back()
            .map_or(Span::ZERO, |&(at, _)| self.until_expiry(at, now))
    }
}

impl Algorithm for SlidingWindowLog {
    type State = SlidingWindowLogState;

    fn acquire(
        &self,
        state: &mut SlidingWindowLogState,
        now: Nanos,
        cost: u64,
        mode: Mode,
    ) -> Outcome {
        let now = now.max(state.last);
        state.last = now;
        let saturated = state.total == u64::MAX;
        while let Some(&(at, _)) = state.entries.front() {
            if !self.expired(at, now) {
                break;
            }
            if let Some((_, c)) = state.entries.pop_front() {
                state.total = state.total.saturating_sub(c);
            }
        }
        // See `refund`.
        if saturated {
            state.total = total_of(&state.entries);
        }
        let used = state.total;
        let count = self.quota.count();
        let allowed = cost <= count.saturating_sub(used);
        if allowed {
            if mode == Mode::Consume && cost > 0 {
                self.record(state, now, cost);
            }
            let newest = if cost > 0 {
                Some(now)
            } else {
                state.entries.back().map(|&(at, _)| at)
            };
            return Outcome {
                allowed: true,
                remaining: count.saturating_sub(used) - cost,
                reset_after: newest.map_or(Span::ZERO, |at| self.until_expiry(at, now)),
                retry_after: Span::ZERO,
            };
        }
        let retry_after = if cost > count {
            Span::NEVER
        } else {
            let excess = u128::from(used) + u128::from(cost) - u128::from(count);
            self.wait_for(state, now, excess)
        };
        Outcome {
            allowed: false,
            remaining: count.saturating_sub(used),
            reset_after: state
                .entries
                .back()
                .map_or(Span::ZERO, |&(at, _)| self.until_expiry(at, now)),
            retry_after,
        }
    }

    fn refund(&self, state: &mut SlidingWindowLogState, _now: Nanos, cost: u64) {
        // A saturated total (charges can pass 2^64) no longer tells the
        // sum after a subtraction: it is summed again below.
        let saturated = state.total == u64::MAX;
        // The refunded permits are the most recent ones.
        let mut left = cost;
        while left > 0 {
            let Some((_, c)) = state.entries.back_mut() else {
                break;
            };
            let taken = (*c).min(left);
            *c -= taken;
            left -= taken;
            state.total = state.total.saturating_sub(taken);
            if *c == 0 {
                state.entries.pop_back();
            }
        }
        if saturated {
            state.total = total_of(&state.entries);
        }
    }

    fn charge(&self, state: &mut SlidingWindowLogState, now: Nanos, cost: u64) {
        // Expires what has left the window and brings `last` up to `now`.
        self.acquire(state, now, 0, Mode::Peek);
        if cost > 0 {
            let now = state.last;
            self.record(state, now, cost);
        }
    }

    fn is_fresh(&self, state: &SlidingWindowLogState, now: Nanos) -> bool {
        let now = now.max(state.last);
        state
            .entries
            .back()
            .is_none_or(|&(at, _)| self.expired(at, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn log(count: u64, per: u64) -> SlidingWindowLog {
        SlidingWindowLog::new(Quota::new(count, Span(per), None).unwrap())
    }

    #[test]
    fn nth_allowed_next_denied() {
        let alg = log(3, 10 * SEC);
        let mut s = SlidingWindowLogState::default();
        for (i, t) in [1, 2, 3].into_iter().enumerate() {
            let o = alg.check(&mut s, Nanos(t * SEC), 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 2 - i as u64);
            assert_eq!(o.reset_after, Span(10 * SEC));
        }
        let o = alg.check(&mut s, Nanos(4 * SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // The entry at 1s leaves at 11s; the newest (3s) at 13s.
        assert_eq!(o.retry_after, Span(7 * SEC));
        assert_eq!(o.reset_after, Span(9 * SEC));
        assert!(!alg.check(&mut s, Nanos(11 * SEC - 1), 1).allowed);
        assert!(alg.check(&mut s, Nanos(11 * SEC), 1).allowed);
    }

    #[test]
    fn retry_waits_for_enough_oldest_entries() {
        let alg = log(5, 10 * SEC);
        let mut s = SlidingWindowLogState::default();
        assert!(alg.check(&mut s, Nanos(0), 1).allowed);
        assert!(alg.check(&mut s, Nanos(SEC), 1).allowed);
        assert!(alg.check(&mut s, Nanos(2 * SEC), 3).allowed);
        let o = alg.check(&mut s, Nanos(5 * SEC), 2);
        // Needs 2 freed: entries at 0s and 1s, the second leaves at 11s.
        assert_eq!(o.retry_after, Span(6 * SEC));
        let o = alg.check(&mut s, Nanos(5 * SEC), 5);
        assert_eq!(o.retry_after, Span(7 * SEC));
    }

    #[test]
    fn same_instant_merges_and_memory_is_bounded() {
        let alg = log(4, SEC);
        let mut s = SlidingWindowLogState::default();
        for _ in 0..4 {
            assert!(alg.check(&mut s, Nanos(5), 1).allowed);
        }
        assert_eq!(s.entries.len(), 1);
        for t in 0..1000u64 {
            alg.check(&mut s, Nanos(t * SEC / 7), 1 + t % 2);
            if t % 5 == 0 {
                alg.refund(&mut s, Nanos(t * SEC / 7), 1);
            }
            assert!(s.entries.len() <= 4);
            // The cached total always matches the entries.
            assert_eq!(
                s,
                SlidingWindowLogState::from_parts(s.last, s.entries.clone())
            );
        }
    }

    #[test]
    fn odd_period_and_never() {
        let alg = log(7, 3 * SEC);
        let mut s = SlidingWindowLogState::default();
        assert!(alg.check(&mut s, Nanos(0), 7).allowed);
        assert_eq!(alg.check(&mut s, Nanos(0), 8).retry_after, Span::NEVER);
        assert!(!alg.is_fresh(&s, Nanos(3 * SEC - 1)));
        assert!(alg.is_fresh(&s, Nanos(3 * SEC)));
    }

    #[test]
    fn refund_removes_most_recent() {
        let alg = log(5, SEC);
        let mut s = SlidingWindowLogState::default();
        assert!(alg.check(&mut s, Nanos(0), 2).allowed);
        let first = alg.check(&mut s, Nanos(10), 3);
        alg.refund(&mut s, Nanos(10), 4);
        assert_eq!(s.entries, VecDeque::from([(Nanos(0), 1)]));
        alg.refund(&mut s, Nanos(10), 1);
        assert!(alg.check(&mut s, Nanos(0), 2).allowed);
        assert_eq!(alg.check(&mut s, Nanos(10), 3), first);
    }

    #[test]
    fn peek_does_not_consume_and_backwards_is_no_time() {
        let alg = log(1, SEC);
        let mut s = SlidingWindowLogState::default();
        assert!(alg.peek(&mut s, Nanos(0), 1).allowed);
        assert!(alg.check(&mut s, Nanos(0), 1).allowed);
        // Seen 2s: the entry at 0 is gone and stays gone when time goes back.
        assert!(alg.peek(&mut s, Nanos(2 * SEC), 1).allowed);
        assert!(alg.check(&mut s, Nanos(SEC / 2), 1).allowed);
        assert_eq!(s.entries, VecDeque::from([(Nanos(2 * SEC), 1)]));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let alg = log(u64::MAX, u64::MAX);
        let mut s = SlidingWindowLogState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        let o = alg.check(&mut s, Nanos(u64::MAX), 1);
        assert_eq!(o.retry_after, Span::NEVER);
        assert_eq!(o.reset_after, Span::NEVER);
    }

    #[test]
    fn charges_beyond_the_limit_stay_within_count_entries() {
        let alg = log(3, 10 * SEC);
        let mut s = SlidingWindowLogState::default();
        for t in 0..10 {
            alg.charge(&mut s, Nanos(t * SEC), 2);
        }
        assert!(s.entries.len() <= 3);
        // 20 permits charged: the newest entry holds the last ones, moved
        // to 9s, and leaves the window at 19s.
        let o = alg.peek(&mut s, Nanos(9 * SEC), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(10 * SEC));
        assert!(!alg.check(&mut s, Nanos(19 * SEC - 1), 1).allowed);
        assert!(alg.check(&mut s, Nanos(19 * SEC), 3).allowed);
    }
}
