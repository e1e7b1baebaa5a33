//! Compact binary form of [`State`], for hosts that share state as bytes
//! (Envoy shared data).
//!
//! Layout: a format version byte, an algorithm tag byte, then the state's
//! fields as little-endian integers. The sliding log adds a `u32` entry
//! count followed by `(time, cost)` pairs.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::meter::Meter;
use super::{
    AlgorithmKind, ConcurrencyState, FixedWindowState, GcraState, LeakyBucketState,
    SlidingWindowCounterState, SlidingWindowLogState, State, TokenBucketState,
};
use crate::time::Nanos;

/// Bumped whenever the layout changes; older bytes are then refused, not misread.
const VERSION: u8 = 1;

const TAG_TOKEN_BUCKET: u8 = 1;
const TAG_LEAKY_BUCKET: u8 = 2;
const TAG_FIXED_WINDOW: u8 = 3;
const TAG_SLIDING_WINDOW_LOG: u8 = 4;
const TAG_SLIDING_WINDOW_COUNTER: u8 = 5;
const TAG_GCRA: u8 = 6;
const TAG_CONCURRENCY: u8 = 7;

/// Bytes of one sliding log entry: time and cost.
const ENTRY_LEN: usize = 16;

/// Why bytes could not be read back as limiter state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    #[error("limiter state is truncated: {needed} bytes needed, {found} present; discard it and start fresh")]
    Truncated {
        /// Bytes the layout needs up to the field being read.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// Written by a Sluice with another state layout.
    #[error("limiter state has format version {0}, this Sluice reads version 1; discard it and start fresh")]
    UnsupportedVersion(u8),
    /// The algorithm tag is not one this Sluice knows.
    #[error("limiter state names unknown algorithm tag {0}; discard it and start fresh")]
    UnknownAlgorithm(u8),
    /// Bytes left over after a complete state.
    #[error("limiter state has {0} unexpected trailing bytes; discard it and start fresh")]
    TrailingBytes(usize),
    /// Sliding log entries that no limiter could have written.
    #[error("sliding window log entries must be in increasing time order, cost at least 1 and not after the last update; discard the state and start fresh")]
    InvalidLog,
}

/// The most bytes [`encode_state`] writes for a state of `kind` under a
/// limit of `count`: the sliding log keeps at most `count` entries (each
/// admission costs at least one), every other state has a fixed size.
pub(crate) fn max_encoded_len(kind: AlgorithmKind, count: u64) -> u64 {
    // Version and tag, then the fields (u64 each unless said).
    let fields = |n: u64| 2 + 8 * n;
    match kind {
        AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket => fields(3),
        AlgorithmKind::FixedWindow | AlgorithmKind::Gcra => fields(2),
        AlgorithmKind::SlidingWindowCounter => fields(3),
        AlgorithmKind::Concurrency => fields(1),
        // The last update, a u32 entry count, then the entries.
        AlgorithmKind::SlidingWindowLog => fields(1) + 4 + count.saturating_mul(ENTRY_LEN as u64),
    }
}

/// Appends the binary form of `state` to `out`.
pub(crate) fn encode_state(state: &State, out: &mut Vec<u8>) {
    let put = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    let meter = |out: &mut Vec<u8>, tag: u8, m: &Meter| {
        out.extend_from_slice(&[VERSION, tag]);
        put(out, m.at.0);
        put(out, m.permits);
        put(out, m.fraction);
    };
    match state {
        State::TokenBucket(TokenBucketState(m)) => meter(out, TAG_TOKEN_BUCKET, m),
        State::LeakyBucket(LeakyBucketState(m)) => meter(out, TAG_LEAKY_BUCKET, m),
        State::FixedWindow(s) => {
            out.extend_from_slice(&[VERSION, TAG_FIXED_WINDOW]);
            put(out, s.start.0);
            put(out, s.used);
        }
        State::SlidingWindowLog(s) => {
            // A log longer than u32::MAX entries cannot exist (it is bounded
            // by the count and by memory); clamp rather than fail.
            let n = u32::try_from(s.entries.len()).unwrap_or(u32::MAX);
            out.reserve((n as usize).saturating_mul(ENTRY_LEN).saturating_add(14));
            out.extend_from_slice(&[VERSION, TAG_SLIDING_WINDOW_LOG]);
            put(out, s.last.0);
            out.extend_from_slice(&n.to_le_bytes());
            for &(at, cost) in s.entries.iter().take(n as usize) {
                put(out, at.0);
                put(out, cost);
            }
        }
        State::SlidingWindowCounter(s) => {
            out.extend_from_slice(&[VERSION, TAG_SLIDING_WINDOW_COUNTER]);
            put(out, s.start.0);
            put(out, s.previous);
            put(out, s.current);
        }
        State::Gcra(s) => {
            out.extend_from_slice(&[VERSION, TAG_GCRA]);
            put(out, s.tat.0);
            put(out, s.fraction);
        }
        State::Concurrency(s) => {
            out.extend_from_slice(&[VERSION, TAG_CONCURRENCY]);
            put(out, s.held);
        }
    }
}

/// Reads the form written by [`encode_state`]; any other bytes give an error.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<State, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let state = match r.u8()? {
        TAG_TOKEN_BUCKET => State::TokenBucket(TokenBucketState(r.meter()?)),
        TAG_LEAKY_BUCKET => State::LeakyBucket(LeakyBucketState(r.meter()?)),
        TAG_FIXED_WINDOW => State::FixedWindow(FixedWindowState {
            start: Nanos(r.u64()?),
            used: r.u64()?,
        }),
        TAG_SLIDING_WINDOW_LOG => State::SlidingWindowLog(r.log()?),
        TAG_SLIDING_WINDOW_COUNTER => State::SlidingWindowCounter(SlidingWindowCounterState {
            start: Nanos(r.u64()?),
            previous: r.u64()?,
            current: r.u64()?,
        }),
        TAG_GCRA => State::Gcra(GcraState {
            tat: Nanos(r.u64()?),
            fraction: r.u64()?,
        }),
        TAG_CONCURRENCY => State::Concurrency(ConcurrencyState { held: r.u64()? }),
        tag => return Err(DecodeError::UnknownAlgorithm(tag)),
    };
    match bytes.len() - r.pos {
        0 => Ok(state),
        extra => Err(DecodeError::TrailingBytes(extra)),
    }
}

/// A cursor that reports truncation instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let truncated = DecodeError::Truncated {
            needed: self.pos.saturating_add(N),
            found: self.bytes.len(),
        };
        let chunk = self
            .bytes
            .get(self.pos..)
            .and_then(|rest| rest.first_chunk::<N>())
            .ok_or(truncated)?;
        self.pos += N;
        Ok(*chunk)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn meter(&mut self) -> Result<Meter, DecodeError> {
        Ok(Meter {
            at: Nanos(self.u64()?),
            permits: self.u64()?,
            fraction: self.u64()?,
        })
    }

    fn log(&mut self) -> Result<SlidingWindowLogState, DecodeError> {
        let last = Nanos(self.u64()?);
        let n = self.u32()? as usize;
        // Check the length before allocating: the count alone is untrusted.
        let needed = n
            .checked_mul(ENTRY_LEN)
            .and_then(|len| len.checked_add(self.pos))
            .unwrap_or(usize::MAX);
        if needed > self.bytes.len() {
            return Err(DecodeError::Truncated {
                needed,
                found: self.bytes.len(),
            });
        }
        let mut entries = VecDeque::with_capacity(n);
        let mut previous: Option<Nanos> = None;
        for _ in 0..n {
            let at = Nanos(self.u64()?);
            let cost = self.u64()?;
            if cost == 0 || at > last || previous.is_some_and(|p| p >= at) {
                return Err(DecodeError::InvalidLog);
            }
            previous = Some(at);
            entries.push_back((at, cost));
        }
        Ok(SlidingWindowLogState::from_parts(last, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::{AlgorithmKind, Limiter, Quota};
    use crate::time::Span;

    fn round_trip(state: &State) -> usize {
        let mut bytes = Vec::new();
        encode_state(state, &mut bytes);
        assert_eq!(decode_state(&bytes).as_ref(), Ok(state));
        bytes.len()
    }

    #[test]
    fn every_algorithm_round_trips() {
        let quota = Quota::new(7, Span::from_secs(3), Some(9)).unwrap();
        for kind in AlgorithmKind::ALL {
            let limiter = Limiter::new(kind, quota);
            let mut state = limiter.fresh_state();
            round_trip(&state);
            for t in [1u64, 5, 5, 1_000_000_007, 2_000_000_000] {
                limiter.check(&mut state, Nanos(t), 2);
            }
            assert_ne!(state, limiter.fresh_state());
            round_trip(&state);
        }
    }

    #[test]
    fn states_never_encode_longer_than_their_bound() {
        let quota = Quota::new(50, Span::from_secs(1), None).unwrap();
        let mut kinds = AlgorithmKind::ALL.to_vec();
        kinds.push(AlgorithmKind::Concurrency);
        for kind in kinds {
            let limiter = Limiter::new(kind, quota);
            let mut state = limiter.fresh_state();
            let mut longest = round_trip(&state);
            // Admissions of cost 1 as fast as allowed, then past the window.
            for t in (0..200u64).chain([5_000_000_000]) {
                limiter.check(&mut state, Nanos(t * 1_000_000), 1);
                longest = longest.max(round_trip(&state));
            }
            let bound = max_encoded_len(kind, quota.count());
            assert!(longest as u64 <= bound, "{kind:?}: {longest} > {bound}");
            if kind == AlgorithmKind::SlidingWindowLog {
                assert_eq!(longest as u64, bound, "a full log reaches the bound");
            }
        }
    }

    #[test]
    fn serde_form_round_trips_too() {
        let quota = Quota::new(7, Span::from_secs(3), None).unwrap();
        for kind in AlgorithmKind::ALL {
            let limiter = Limiter::new(kind, quota);
            let mut state = limiter.fresh_state();
            limiter.check(&mut state, Nanos(3_000_000_001), 3);
            let json = serde_json::to_string(&state).unwrap();
            assert!(json.contains(kind.name()), "{json}");
            assert_eq!(serde_json::from_str::<State>(&json).unwrap(), state);
        }
    }

    #[test]
    fn sizes_are_compact() {
        let meter = Meter {
            at: Nanos(1),
            permits: 2,
            fraction: 3,
        };
        assert_eq!(round_trip(&State::TokenBucket(TokenBucketState(meter))), 26);
        assert_eq!(round_trip(&State::LeakyBucket(LeakyBucketState(meter))), 26);
        let fixed = FixedWindowState {
            start: Nanos(u64::MAX),
            used: 4,
        };
        assert_eq!(round_trip(&State::FixedWindow(fixed)), 18);
        assert_eq!(
            round_trip(&State::Concurrency(ConcurrencyState { held: 7 })),
            10
        );
        let counter = SlidingWindowCounterState {
            start: Nanos(9),
            previous: 1,
            current: 2,
        };
        assert_eq!(round_trip(&State::SlidingWindowCounter(counter)), 26);
        let gcra = GcraState {
            tat: Nanos(77),
            fraction: 6,
        };
        assert_eq!(round_trip(&State::Gcra(gcra)), 18);
        let log = SlidingWindowLogState::from_parts(
            Nanos(10),
            VecDeque::from([(Nanos(3), 1), (Nanos(10), 5)]),
        );
        assert_eq!(round_trip(&State::SlidingWindowLog(log)), 14 + 32);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert_eq!(
            decode_state(&[]),
            Err(DecodeError::Truncated {
                needed: 1,
                found: 0
            })
        );
        assert_eq!(
            decode_state(&[2, 1]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            decode_state(&[1, 99]),
            Err(DecodeError::UnknownAlgorithm(99))
        );
        assert_eq!(
            decode_state(&[1, TAG_GCRA, 0, 0]),
            Err(DecodeError::Truncated {
                needed: 10,
                found: 4
            })
        );
        let mut bytes = Vec::new();
        encode_state(&State::Gcra(GcraState::default()), &mut bytes);
        bytes.push(0);
        assert_eq!(decode_state(&bytes), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn huge_log_count_does_not_allocate() {
        let mut bytes = alloc::vec![VERSION, TAG_SLIDING_WINDOW_LOG];
        bytes.extend_from_slice(&5u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_state(&bytes),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_inconsistent_logs() {
        let bad = [
            VecDeque::from([(Nanos(3), 0)]),
            VecDeque::from([(Nanos(3), 1), (Nanos(3), 1)]),
            VecDeque::from([(Nanos(4), 1), (Nanos(3), 1)]),
            VecDeque::from([(Nanos(11), 1)]),
        ];
        for entries in bad {
            let mut bytes = Vec::new();
            encode_state(
                &State::SlidingWindowLog(SlidingWindowLogState::from_parts(Nanos(10), entries)),
                &mut bytes,
            );
            assert_eq!(decode_state(&bytes), Err(DecodeError::InvalidLog));
        }
    }
}
