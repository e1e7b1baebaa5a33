//! Token bucket: up to `burst` permits available at once, refilled
//! continuously at `count` per `per`.
//!
//! The state records the tokens spent and not yet refilled (a level that
//! drains, see [`super::meter`]) rather than the tokens left, so that the
//! all-zero default state is a full bucket.

use serde::{Deserialize, Serialize};

use super::meter::{Bucket, Meter};
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::Nanos;

/// A token bucket enforcing a [`Quota`]: capacity `burst`, refill `count` per `per`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    bucket: Bucket,
}

/// Per-key token bucket state: the tokens missing from a full bucket at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenBucketState(pub(super) Meter);

impl TokenBucket {
    /// A token bucket for `quota`.
    pub fn new(quota: Quota) -> Self {
        TokenBucket {
            bucket: Bucket::new(quota),
        }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.bucket.quota()
    }
}

impl Algorithm for TokenBucket {
    type State = TokenBucketState;

    fn acquire(&self, state: &mut TokenBucketState, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        state.0.acquire(&self.bucket, now, cost, mode)
    }

    fn refund(&self, state: &mut TokenBucketState, now: Nanos, cost: u64) {
        state.0.refund(&self.bucket, now, cost);
    }

    fn charge(&self, state: &mut TokenBucketState, now: Nanos, cost: u64) {
        state.0.charge(&self.bucket, now, cost);
    }

    fn is_fresh(&self, state: &TokenBucketState, now: Nanos) -> bool {
        state.0.is_empty_at(&self.bucket, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    const SEC: u64 = 1_000_000_000;

    fn tb(count: u64, per: u64, burst: Option<u64>) -> TokenBucket {
        TokenBucket::new(Quota::new(count, Span(per), burst).unwrap())
    }

    #[test]
    fn nth_allowed_next_denied() {
        let alg = tb(10, SEC, None);
        let mut s = TokenBucketState::default();
        for i in 0..10 {
            let o = alg.check(&mut s, Nanos(5), 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 9 - i);
            assert_eq!(o.retry_after, Span::ZERO);
            // Refill of i+1 tokens at 10/s takes (i+1) * 100ms.
            assert_eq!(o.reset_after, Span((i + 1) * 100_000_000));
        }
        let o = alg.check(&mut s, Nanos(5), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(100_000_000));
        assert_eq!(o.reset_after, Span(SEC));
    }

    #[test]
    fn refills_after_exactly_the_right_time() {
        let alg = tb(10, SEC, None);
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 10).allowed);
        let mut early = s.clone();
        assert!(!alg.check(&mut early, Nanos(100_000_000 - 1), 1).allowed);
        let o = alg.check(&mut s, Nanos(100_000_000), 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
    }

    #[test]
    fn odd_rate_seven_per_three_seconds() {
        let alg = tb(7, 3 * SEC, None);
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 7).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        // 3e9 / 7 = 428571428.57.. ns, rounded up.
        assert_eq!(o.retry_after, Span(428_571_429));
        assert!(!alg.peek(&mut s.clone(), Nanos(428_571_428), 1).allowed);
        assert!(alg.peek(&mut s.clone(), Nanos(428_571_429), 1).allowed);
        // All seven back after exactly 3 s, not a ns earlier.
        assert_eq!(alg.peek(&mut s.clone(), Nanos(3 * SEC - 1), 0).remaining, 6);
        assert_eq!(alg.peek(&mut s.clone(), Nanos(3 * SEC), 0).remaining, 7);
        assert!(alg.is_fresh(&s, Nanos(3 * SEC)));
        assert!(!alg.is_fresh(&s, Nanos(3 * SEC - 1)));
    }

    #[test]
    fn burst_above_count() {
        let alg = tb(1, SEC, Some(3));
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 3).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        assert_eq!(o.retry_after, Span(SEC));
        assert_eq!(o.reset_after, Span(3 * SEC));
    }

    #[test]
    fn cost_above_burst_is_never() {
        let alg = tb(5, SEC, None);
        let mut s = TokenBucketState::default();
        let o = alg.check(&mut s, Nanos(0), 6);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span::NEVER);
        assert_eq!(o.remaining, 5);
        assert_eq!(o.reset_after, Span::ZERO);
    }

    #[test]
    fn refund_restores_and_caps() {
        let alg = tb(5, SEC, None);
        let mut s = TokenBucketState::default();
        let first = alg.check(&mut s, Nanos(0), 3);
        alg.refund(&mut s, Nanos(0), 3);
        assert_eq!(alg.check(&mut s, Nanos(0), 3), first);
        alg.refund(&mut s, Nanos(0), 100);
        assert!(alg.is_fresh(&s, Nanos(0)));
        assert_eq!(alg.peek(&mut s, Nanos(0), 0).remaining, 5);
    }

    #[test]
    fn peek_does_not_consume() {
        let alg = tb(2, SEC, None);
        let mut s = TokenBucketState::default();
        for _ in 0..5 {
            let o = alg.peek(&mut s, Nanos(0), 2);
            assert!(o.allowed);
            assert_eq!(o.remaining, 0);
        }
        assert!(alg.check(&mut s, Nanos(0), 2).allowed);
    }

    #[test]
    fn time_backwards_is_no_time() {
        let alg = tb(1, SEC, None);
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(10 * SEC), 1).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(SEC));
        assert!(alg.check(&mut s, Nanos(11 * SEC), 1).allowed);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let alg = tb(u64::MAX, Span::NEVER.0, Some(u64::MAX));
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        let o = alg.check(&mut s, Nanos(u64::MAX), u64::MAX);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span::NEVER);
        alg.refund(&mut s, Nanos(u64::MAX), u64::MAX);
        let small = tb(1, 1_000_000, None);
        let mut s = TokenBucketState::default();
        assert!(!small.check(&mut s, Nanos(u64::MAX), u64::MAX).allowed);
        assert!(small.check(&mut s, Nanos(u64::MAX), 1).allowed);
    }

    #[test]
    fn a_charge_beyond_the_bucket_is_repaid_at_the_refill_rate() {
        let alg = tb(10, SEC, None);
        let mut s = TokenBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 1).allowed);
        alg.charge(&mut s, Nanos(0), 25);
        // 26 spent of 10: one token is back once 17 have refilled.
        let o = alg.peek(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(1_700_000_000));
        assert_eq!(o.reset_after, Span(2_600_000_000));
        assert!(!alg.check(&mut s, Nanos(1_700_000_000 - 1), 1).allowed);
        assert!(alg.check(&mut s, Nanos(1_700_000_000), 1).allowed);
    }
}
