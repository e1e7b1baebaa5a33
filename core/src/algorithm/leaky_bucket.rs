//! Leaky bucket as a meter: each admission pours `cost` into a bucket of
//! capacity `burst` (default `count`) that leaks continuously at `count` per
//! `per`; a request that would overflow it is refused.
//!
//! How it differs from the [token bucket](super::TokenBucket): the state is
//! the water level, which drains, rather than tokens that refill. Its
//! decisions are the same for the same quota (water = capacity − tokens); it
//! is the shaping view: the time for the water ahead of a request to leak
//! out is the queueing delay a leaky-bucket queue would impose, so a `delay`
//! action that waits `retry_after` shapes traffic to the leak rate.

use serde::{Deserialize, Serialize};

use super::meter::{Bucket, Meter};
use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::Nanos;

/// A leaky bucket enforcing a [`Quota`]: capacity `burst`, leaking `count` per `per`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakyBucket {
    bucket: Bucket,
}

/// Per-key leaky bucket state: the water level at a time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeakyBucketState(pub(super) Meter);

impl LeakyBucket {
    /// A leaky bucket for `quota`.
    pub fn new(quota: Quota) -> Self {
        LeakyBucket {
            bucket: Bucket::new(quota),
        }
    }

    /// The quota it enforces.
    pub fn quota(&self) -> Quota {
        self.bucket.quota()
    }
}

impl Algorithm for LeakyBucket {
    type State = LeakyBucketState;

    fn acquire(&self, state: &mut LeakyBucketState, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        state.0.acquire(&self.bucket, now, cost, mode)
    }

    fn refund(&self, state: &mut LeakyBucketState, now: Nanos, cost: u64) {
        state.0.refund(&self.bucket, now, cost);
    }

    fn charge(&self, state: &mut LeakyBucketState, now: Nanos, cost: u64) {
        state.0.charge(&self.bucket, now, cost);
    }

    fn is_fresh(&self, state: &LeakyBucketState, now: Nanos) -> bool {
        state.0.is_empty_at(&self.bucket, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    const SEC: u64 = 1_000_000_000;

    fn lb(count: u64, per: u64, burst: Option<u64>) -> LeakyBucket {
        LeakyBucket::new(Quota::new(count, Span(per), burst).unwrap())
    }

    #[test]
    fn fills_to_capacity_then_refuses() {
        let alg = lb(4, SEC, None);
        let mut s = LeakyBucketState::default();
        for i in 0..4 {
            let o = alg.check(&mut s, Nanos(0), 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 3 - i);
            // Time to leak out all water poured so far.
            assert_eq!(o.reset_after, Span((i + 1) * 250_000_000));
        }
        let o = alg.check(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.retry_after, Span(250_000_000));
        assert_eq!(o.reset_after, Span(SEC));
    }

    #[test]
    fn retry_is_the_queueing_delay() {
        // Level 3 of 4 at 4/s: a cost of 2 must wait until the level is <= 2,
        // that is 1 permit leaked = 250ms.
        let alg = lb(4, SEC, None);
        let mut s = LeakyBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 3).allowed);
        let o = alg.check(&mut s, Nanos(0), 2);
        assert_eq!(o.retry_after, Span(250_000_000));
        assert!(!alg.peek(&mut s.clone(), Nanos(250_000_000 - 1), 2).allowed);
        assert!(alg.check(&mut s, Nanos(250_000_000), 2).allowed);
    }

    #[test]
    fn odd_rate_drains_exactly() {
        let alg = lb(7, 3 * SEC, None);
        let mut s = LeakyBucketState::default();
        assert!(alg.check(&mut s, Nanos(0), 7).allowed);
        assert!(!alg.is_fresh(&s, Nanos(3 * SEC - 1)));
        assert!(alg.is_fresh(&s, Nanos(3 * SEC)));
        // Six permits leak in 6 * 3e9 / 7 = 2571428571.43 ns: at 2571428572 ns
        // and not before.
        let o = alg.peek(&mut s.clone(), Nanos(2_571_428_572), 1);
        assert_eq!(o.remaining, 5);
        let o = alg.peek(&mut s.clone(), Nanos(2_571_428_571), 1);
        assert_eq!(o.remaining, 4);
    }

    #[test]
    fn capacity_from_burst_and_never() {
        let alg = lb(1, SEC, Some(2));
        let mut s = LeakyBucketState::default();
        assert_eq!(alg.check(&mut s, Nanos(0), 3).retry_after, Span::NEVER);
        assert!(alg.check(&mut s, Nanos(0), 2).allowed);
        assert_eq!(alg.check(&mut s, Nanos(0), 1).retry_after, Span(SEC));
    }

    #[test]
    fn refund_lowers_level_not_below_empty() {
        let alg = lb(3, SEC, None);
        let mut s = LeakyBucketState::default();
        let first = alg.check(&mut s, Nanos(7), 2);
        alg.refund(&mut s, Nanos(7), 2);
        assert_eq!(alg.check(&mut s, Nanos(7), 2), first);
        alg.refund(&mut s, Nanos(7), 50);
        assert!(alg.is_fresh(&s, Nanos(7)));
    }

    #[test]
    fn peek_and_backwards_time() {
        let alg = lb(1, SEC, None);
        let mut s = LeakyBucketState::default();
        assert!(alg.peek(&mut s, Nanos(SEC), 1).allowed);
        assert!(alg.check(&mut s, Nanos(SEC), 1).allowed);
        let o = alg.check(&mut s, Nanos(0), 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Span(SEC));
    }
}
