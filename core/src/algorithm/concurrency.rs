//! In-flight permits: at most `count` held at once, each given back when
//! the request, call or connection holding it ends (a refund). Time plays
//! no part.

use serde::{Deserialize, Serialize};

use super::{Algorithm, Mode, Outcome, Quota};
use crate::time::{Nanos, Span};

/// A concurrency limit: the quota's `count` permits held at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concurrency {
    max: u64,
}

/// Per-key permits currently held.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcurrencyState {
    /// Permits held.
    pub(super) held: u64,
}

/// What a refused caller is told to wait: nothing says when a holder will
/// finish, so this is a hint, not a promise.
pub const RETRY_HINT: Span = Span::SECOND;

impl Concurrency {
    /// A limit of `quota.count()` held permits (its period is ignored).
    pub fn new(quota: Quota) -> Self {
        Concurrency { max: quota.count() }
    }
}

impl Algorithm for Concurrency {
    type State = ConcurrencyState;

    fn acquire(&self, state: &mut ConcurrencyState, _now: Nanos, cost: u64, mode: Mode) -> Outcome {
        let after = state.held.saturating_add(cost);
        let allowed = after <= self.max;
        if allowed && mode == Mode::Consume {
            state.held = after;
        }
        let held = if allowed { after } else { state.held };
        Outcome {
            allowed,
            remaining: self.max.saturating_sub(held),
            reset_after: Span::ZERO,
            retry_after: match (allowed, cost > self.max) {
                (true, _) => Span::ZERO,
                (false, true) => Span::NEVER,
                (false, false) => RETRY_HINT,
            },
        }
    }

    fn refund(&self, state: &mut ConcurrencyState, _now: Nanos, cost: u64) {
        state.held = state.held.saturating_sub(cost);
    }

    fn charge(&self, state: &mut ConcurrencyState, _now: Nanos, cost: u64) {
        state.held = state.held.saturating_add(cost);
    }

    fn is_fresh(&self, state: &ConcurrencyState, _now: Nanos) -> bool {
        state.held == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_max_and_releases_on_refund() {
        let c = Concurrency::new(Quota::new(2, Span::SECOND, None).unwrap());
        let mut s = ConcurrencyState::default();
        assert_eq!(c.check(&mut s, Nanos(0), 1).remaining, 1);
        assert!(c.peek(&mut s, Nanos(0), 1).allowed);
        assert_eq!(c.check(&mut s, Nanos(0), 1).remaining, 0);
        let refused = c.check(&mut s, Nanos(u64::MAX), 1);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, RETRY_HINT);
        assert!(!c.check(&mut s, Nanos(0), 3).allowed);
        c.refund(&mut s, Nanos(0), 1);
        assert!(c.check(&mut s, Nanos(0), 1).allowed);
        c.refund(&mut s, Nanos(0), 5);
        assert!(c.is_fresh(&s, Nanos(0)));
    }

    #[test]
    fn a_charge_holds_beyond_max_until_refunded() {
        let c = Concurrency::new(Quota::new(2, Span::SECOND, None).unwrap());
        let mut s = ConcurrencyState::default();
        c.charge(&mut s, Nanos(0), 3);
        assert!(!c.peek(&mut s, Nanos(0), 1).allowed);
        c.refund(&mut s, Nanos(0), 2);
        assert!(c.check(&mut s, Nanos(0), 1).allowed);
    }
}
