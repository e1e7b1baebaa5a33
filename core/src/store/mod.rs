//! Where per-key rule state lives.
//!
//! A store checks a state out (`load`), and the engine gives it back
//! (`save` after consuming, `release` when nothing changed). `save` is
//! optimistic: a store shared between threads or processes answers
//! [`Saved::Conflict`] when someone else wrote the state since `load`,
//! and the engine retries. This one shape serves VM memory, Envoy shared
//! data (compare-and-swap) and a quota server's map.

mod memory;
mod slots;

pub use memory::{EvictionStats, MemoryStore};
pub use slots::{hash, InProcessShared, SharedBytes, SlotStore, WriteOutcome};

use crate::algorithm::{Outcome, State};
use crate::policy::Rule;
use crate::time::Nanos;

/// Which state: a rule (by position in the policy) and a key.
#[derive(Clone, Copy, Debug)]
pub struct Slot<'a> {
    /// Position of the rule in [`crate::policy::Policy::rules`].
    pub rule_index: usize,
    /// The rule itself (its limiter tells fresh states from live ones).
    pub rule: &'a Rule,
    /// The key built for the request.
    pub key: &'a str,
}

/// A checked-out state and the version it was read at.
#[derive(Debug)]
pub struct Loaded<V> {
    /// The state (a fresh one if none was stored).
    pub state: State,
    /// Handed back to `save` for the conflict check.
    pub version: V,
}

/// The result of a `save`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    /// Written.
    Stored,
    /// Someone else wrote first; load again.
    Conflict,
}

/// Why a store could not serve a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backing store refused an operation.
    #[error("state store unavailable: {0}")]
    Unavailable(&'static str),
    /// Stored bytes could not be read back.
    #[error("stored state is corrupt: {0}")]
    Corrupt(crate::algorithm::DecodeError),
}

/// Per-key state storage; see the module doc.
pub trait StateStore {
    /// What `load` returns for `save` to check against.
    type Version;

    /// Checks out the state at `slot`.
    fn load(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Loaded<Self::Version>, StoreError>;

    /// Writes `state` back unless it changed since `version`.
    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Self::Version,
        now: Nanos,
    ) -> Result<Saved, StoreError>;

    /// Gives back a state that was not changed.
    fn release(&mut self, slot: Slot<'_>, state: State, version: Self::Version, now: Nanos);

    /// Takes `cost` permits at `slot` if allowed, in one step (what a
    /// decision over a single rule needs); `None` when another writer got
    /// in first. Stores that can update in place override it; this default
    /// checks the state out, checks it and saves it.
    fn check(
        &mut self,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Result<Option<Outcome>, StoreError> {
        let mut l = self.load(slot, now)?;
        let outcome = slot.rule.limiter.check(&mut l.state, now, cost);
        if !outcome.allowed {
            self.release(slot, l.state, l.version, now);
            return Ok(Some(outcome));
        }
        Ok(match self.save(slot, l.state, l.version, now)? {
            Saved::Stored => Some(outcome),
            Saved::Conflict => None,
        })
    }
}
