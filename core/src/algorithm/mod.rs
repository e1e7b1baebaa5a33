//! Rate-limiting algorithms behind one small interface.
//!
//! Every algorithm is a pure function of a compact state, the current time
//! and a cost. Arithmetic is exact: rates such as 7 per 3 s are kept as
//! rationals (scaled integers), never rounded to an integer interval.

mod codec;
mod concurrency;
mod fixed_window;
mod gcra;
mod leaky_bucket;
mod meter;
mod sliding_window_counter;
mod sliding_window_log;
mod token_bucket;

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

pub use codec::DecodeError;
pub use concurrency::{Concurrency, ConcurrencyState, RETRY_HINT as CONCURRENCY_RETRY_HINT};
pub use fixed_window::{FixedWindow, FixedWindowState, Windows};
pub use gcra::{Gcra, GcraState};
pub use leaky_bucket::{LeakyBucket, LeakyBucketState};
pub use sliding_window_counter::{SlidingWindowCounter, SlidingWindowCounterState};
pub use sliding_window_log::{SlidingWindowLog, SlidingWindowLogState};
pub use token_bucket::{TokenBucket, TokenBucketState};

use crate::time::{Nanos, Span};

/// How many permits a limit grants, over what period, with what burst.
///
/// Built only through [`Quota::new`], which guarantees `count >= 1`,
/// `burst >= 1` and `per >= 1ms`, so algorithms never divide by zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    count: u64,
    per: Span,
    burst: u64,
}

/// Why a quota is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// `count` is zero.
    #[error("must be at least 1")]
    ZeroCount,
    /// `per` is under a millisecond.
    #[error("must be at least 1ms")]
    PeriodTooShort,
    /// `burst` is zero.
    #[error("must be at least 1")]
    ZeroBurst,
}

impl Quota {
    /// The shortest period accepted.
    pub const MIN_PERIOD: Span = Span::MILLISECOND;

    /// `count` permits per `per`; `burst` defaults to `count`.
    pub fn new(count: u64, per: Span, burst: Option<u64>) -> Result<Quota, QuotaError> {
        if count == 0 {
            return Err(QuotaError::ZeroCount);
        }
        if per < Self::MIN_PERIOD {
            return Err(QuotaError::PeriodTooShort);
        }
        let burst = burst.unwrap_or(count);
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        Ok(Quota { count, per, burst })
    }

    /// Permits per period.
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// The period.
    pub const fn per(&self) -> Span {
        self.per
    }

    /// Most permits usable at once (bucket algorithms); equals `count` unless set.
    pub const fn burst(&self) -> u64 {
        self.burst
    }
}

/// The result of one attempt to take `cost` permits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the attempt is within the limit.
    pub allowed: bool,
    /// Permits still available after this attempt (after consuming, if allowed).
    pub remaining: u64,
    /// Time until the allowance is entirely restored (window end, full bucket).
    pub reset_after: Span,
    /// Zero when allowed; otherwise the time until the same cost would be
    /// allowed if nothing else arrived, or [`Span::NEVER`] when the cost is
    /// larger than the limit could ever grant.
    pub retry_after: Span,
}

impl Outcome {
    /// This outcome for a key blocked until `until` (at `now`): refused
    /// with nothing left, retrying and whole again no sooner than the
    /// block ends.
    pub fn blocked_until(self, until: Nanos, now: Nanos) -> Outcome {
        let left = until.since(now);
        Outcome {
            allowed: false,
            remaining: 0,
            reset_after: self.reset_after.max(left),
            retry_after: if self.allowed {
                left
            } else {
                self.retry_after.max(left)
            },
        }
    }
}

/// Whether an attempt consumes permits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Take the permits when allowed.
    Consume,
    /// Only report what would happen.
    Peek,
}

/// One rate-limiting algorithm configured with a quota.
///
/// `acquire` may bring the state up to date (refill, roll a window) even in
/// [`Mode::Peek`]; that never changes any later decision. Time going
/// backwards is treated as no time passing: it never panics and never
/// admits more.
pub trait Algorithm {
    /// Per-key state: small, cloneable, serialisable.
    type State: Clone + Default + PartialEq + core::fmt::Debug;

    /// Attempts to take `cost` permits at `now`.
    fn acquire(&self, state: &mut Self::State, now: Nanos, cost: u64, mode: Mode) -> Outcome;

    /// Gives back `cost` permits taken at or before `now` (e.g. the response
    /// was excluded from counting). Never raises the allowance above full.
    fn refund(&self, state: &mut Self::State, now: Nanos, cost: u64);

    /// Takes `cost` permits at `now` whether or not they are available
    /// (usage reported after the fact). Beyond the limit the key is in
    /// debt: it is refused until the debt is repaid at the limit's own pace
    /// (buckets: the refill time moves forward; windows: the count stays
    /// over the limit until the window, or both windows, roll).
    fn charge(&self, state: &mut Self::State, now: Nanos, cost: u64);

    /// Whether `state` is indistinguishable from a fresh one at `now`:
    /// such a state can be dropped without changing any decision made at
    /// `now` or later. (It may remember a later time than `now` if the clock
    /// went backwards; dropping it forgets that, which only matters to a
    /// caller whose clock keeps going backwards.)
    fn is_fresh(&self, state: &Self::State, now: Nanos) -> bool;

    /// Takes `cost` permits if allowed.
    fn check(&self, state: &mut Self::State, now: Nanos, cost: u64) -> Outcome {
        self.acquire(state, now, cost, Mode::Consume)
    }

    /// Reports what taking `cost` permits would give, without taking them.
    fn peek(&self, state: &mut Self::State, now: Nanos, cost: u64) -> Outcome {
        self.acquire(state, now, cost, Mode::Peek)
    }
}

/// Names of the algorithms, as written in config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmKind {
    /// Refills continuously up to `burst`.
    #[default]
    TokenBucket,
    /// Fills with each request, drains continuously; nothing beyond capacity.
    LeakyBucket,
    /// Counts per calendar-aligned window.
    FixedWindow,
    /// Remembers each admission: exact over any trailing window.
    SlidingWindowLog,
    /// Weights the previous window's count: approximate, two counters.
    SlidingWindowCounter,
    /// Generic cell rate algorithm: one timestamp per key.
    Gcra,
    /// Permits held at once (for `in_flight` rules; not chosen in config).
    Concurrency,
}

impl AlgorithmKind {
    /// Every rate algorithm (not [`AlgorithmKind::Concurrency`], which has
    /// no period), for tests and benchmarks that cover them all.
    pub const ALL: [AlgorithmKind; 6] = [
        AlgorithmKind::TokenBucket,
        AlgorithmKind::LeakyBucket,
        AlgorithmKind::FixedWindow,
        AlgorithmKind::SlidingWindowLog,
        AlgorithmKind::SlidingWindowCounter,
        AlgorithmKind::Gcra,
    ];

    /// The config name.
    pub const fn name(self) -> &'static str {
        match self {
            AlgorithmKind::TokenBucket => "token_bucket",
            AlgorithmKind::LeakyBucket => "leaky_bucket",
            AlgorithmKind::FixedWindow => "fixed_window",
            AlgorithmKind::SlidingWindowLog => "sliding_window_log",
            AlgorithmKind::SlidingWindowCounter => "sliding_window_counter",
            AlgorithmKind::Gcra => "gcra",
            AlgorithmKind::Concurrency => "concurrency",
        }
    }
}

/// Any algorithm with its quota: what a rule limits with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// See [`TokenBucket`].
    TokenBucket(TokenBucket),
    /// See [`LeakyBucket`].
    LeakyBucket(LeakyBucket),
    /// See [`FixedWindow`].
    FixedWindow(FixedWindow),
    /// See [`SlidingWindowLog`].
    SlidingWindowLog(SlidingWindowLog),
    /// See [`SlidingWindowCounter`].
    SlidingWindowCounter(SlidingWindowCounter),
    /// See [`Gcra`].
    Gcra(Gcra),
    /// See [`Concurrency`].
    Concurrency(Concurrency),
}

/// The state of any algorithm, tagged so a stored state of the wrong kind
/// (the rule's algorithm changed) is detected and replaced by a fresh one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "snake_case")]
pub enum State {
    /// See [`TokenBucketState`].
    TokenBucket(TokenBucketState),
    /// See [`LeakyBucketState`].
    LeakyBucket(LeakyBucketState),
    /// See [`FixedWindowState`].
    FixedWindow(FixedWindowState),
    /// See [`SlidingWindowLogState`].
    SlidingWindowLog(SlidingWindowLogState),
    /// See [`SlidingWindowCounterState`].
    SlidingWindowCounter(SlidingWindowCounterState),
    /// See [`GcraState`].
    Gcra(GcraState),
    /// See [`ConcurrencyState`].
    Concurrency(ConcurrencyState),
}

/// Runs `$body` with the algorithm and its state when they are of the same
/// kind, else `$mismatch`: the dispatch is written once, not once per method.
macro_rules! with_state {
    ($limiter:expr, $state:expr, |$alg:ident, $st:ident| $body:expr, $mismatch:expr) => {
        match ($limiter, $state) {
            (Limiter::TokenBucket($alg), State::TokenBucket($st)) => $body,
            (Limiter::LeakyBucket($alg), State::LeakyBucket($st)) => $body,
            (Limiter::FixedWindow($alg), State::FixedWindow($st)) => $body,
            (Limiter::SlidingWindowLog($alg), State::SlidingWindowLog($st)) => $body,
            (Limiter::SlidingWindowCounter($alg), State::SlidingWindowCounter($st)) => $body,
            (Limiter::Gcra($alg), State::Gcra($st)) => $body,
            (Limiter::Concurrency($alg), State::Concurrency($st)) => $body,
            _ => $mismatch,
        }
    };
}

impl State {
    /// Appends a compact binary form (for Envoy shared data).
    pub fn encode(&self, out: &mut Vec<u8>) {
        codec::encode_state(self, out);
    }

    /// Reads the form written by [`State::encode`].
    pub fn decode(bytes: &[u8]) -> Result<State, DecodeError> {
        codec::decode_state(bytes)
    }

    /// The most bytes [`State::encode`] writes for a state of `kind` under
    /// a limit of `count` (the sliding log grows with `count`).
    pub fn max_encoded_len(kind: AlgorithmKind, count: u64) -> u64 {
        codec::max_encoded_len(kind, count)
    }
}

impl Limiter {
    /// The algorithm `kind` enforcing `quota`.
    pub fn new(kind: AlgorithmKind, quota: Quota) -> Limiter {
        match kind {
            AlgorithmKind::TokenBucket => Limiter::TokenBucket(TokenBucket::new(quota)),
            AlgorithmKind::LeakyBucket => Limiter::LeakyBucket(LeakyBucket::new(quota)),
            AlgorithmKind::FixedWindow => Limiter::FixedWindow(FixedWindow::new(quota)),
            AlgorithmKind::SlidingWindowLog => {
                Limiter::SlidingWindowLog(SlidingWindowLog::new(quota))
            }
            AlgorithmKind::SlidingWindowCounter => {
                Limiter::SlidingWindowCounter(SlidingWindowCounter::new(quota))
            }
            AlgorithmKind::Gcra => Limiter::Gcra(Gcra::new(quota)),
            AlgorithmKind::Concurrency => Limiter::Concurrency(Concurrency::new(quota)),
        }
    }

    /// Which algorithm this is.
    pub fn kind(&self) -> AlgorithmKind {
        match self {
            Limiter::TokenBucket(_) => AlgorithmKind::TokenBucket,
            Limiter::LeakyBucket(_) => AlgorithmKind::LeakyBucket,
            Limiter::FixedWindow(_) => AlgorithmKind::FixedWindow,
            Limiter::SlidingWindowLog(_) => AlgorithmKind::SlidingWindowLog,
            Limiter::SlidingWindowCounter(_) => AlgorithmKind::SlidingWindowCounter,
            Limiter::Gcra(_) => AlgorithmKind::Gcra,
            Limiter::Concurrency(_) => AlgorithmKind::Concurrency,
        }
    }

    /// A fresh state for this algorithm.
    pub fn fresh_state(&self) -> State {
        match self {
            Limiter::TokenBucket(_) => State::TokenBucket(TokenBucketState::default()),
            Limiter::LeakyBucket(_) => State::LeakyBucket(LeakyBucketState::default()),
            Limiter::FixedWindow(_) => State::FixedWindow(FixedWindowState::default()),
            Limiter::SlidingWindowLog(_) => {
                State::SlidingWindowLog(SlidingWindowLogState::default())
            }
            Limiter::SlidingWindowCounter(_) => {
                State::SlidingWindowCounter(SlidingWindowCounterState::default())
            }
            Limiter::Gcra(_) => State::Gcra(GcraState::default()),
            Limiter::Concurrency(_) => State::Concurrency(ConcurrencyState::default()),
        }
    }

    /// See [`Algorithm::acquire`]. A state of another algorithm (the rule
    /// changed algorithm) is replaced by a fresh one first.
    pub fn acquire(&self, state: &mut State, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        with_state!(
            self,
            &mut *state,
            |alg, st| alg.acquire(st, now, cost, mode),
            {
                *state = self.fresh_state();
                self.acquire(state, now, cost, mode)
            }
        )
    }

    /// See [`Algorithm::check`].
    pub fn check(&self, state: &mut State, now: Nanos, cost: u64) -> Outcome {
        self.acquire(state, now, cost, Mode::Consume)
    }

    /// See [`Algorithm::peek`].
    pub fn peek(&self, state: &mut State, now: Nanos, cost: u64) -> Outcome {
        self.acquire(state, now, cost, Mode::Peek)
    }

    /// See [`Algorithm::refund`].
    pub fn refund(&self, state: &mut State, now: Nanos, cost: u64) {
        with_state!(self, state, |alg, st| alg.refund(st, now, cost), ())
    }

    /// See [`Algorithm::charge`]; returns what a request for one permit
    /// would get afterwards (refused while the key is in debt). A state of
    /// another algorithm is replaced by a fresh one first.
    pub fn charge(&self, state: &mut State, now: Nanos, cost: u64) -> Outcome {
        with_state!(self, &mut *state, |alg, st| alg.charge(st, now, cost), {
            *state = self.fresh_state();
            self.charge(state, now, cost);
        });
        self.peek(state, now, 1)
    }

    /// See [`Algorithm::is_fresh`]; a state of another algorithm counts as fresh.
    pub fn is_fresh(&self, state: &State, now: Nanos) -> bool {
        with_state!(self, state, |alg, st| alg.is_fresh(st, now), true)
    }
}
