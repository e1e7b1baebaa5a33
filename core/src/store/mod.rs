//! Where per-key rule state lives.
//!
//! A store checks a state out (`load`), and the engine gives it back
//! (`save` after consuming, `release` when nothing changed). `save` is
//! optimistic: a store shared between threads or processes answers
//! [`Saved::Conflict`] when someone else wrote the state since `load`,
//! and the engine retries. This one shape serves VM memory, Envoy shared
//! data (compare-and-swap) and a quota server's map.
//!
//! Stores are bounded, so a new key may find no room. A store then evicts
//! a key only if that gives no client more than its normal allowance: a
//! key refused by its limit is marked limited until its state would be
//! fresh again (see [`StateStore::refuse`]), and a key holding in-flight
//! permits keeps them until its streams end; neither is ever the victim
//! (see [`Standing`]). A key below its limit may be evicted: if it returns
//! it starts over, with at most its normal allowance. When every candidate
//! is protected, the new key shares the rule's overflow state or is
//! refused, as [`WhenFull`] says: keys made up by a flood can then only
//! limit each other, never give a limited key a fresh allowance.

mod memory;
mod slots;

pub use memory::{EvictionStats, MemoryStore};
pub use slots::{
    hash, shared_seed, slot_bytes, InProcessShared, Seed, SharedBytes, SlotStats, SlotStore,
    WriteOutcome, MAX_STORED_KEY, PROBES, SEED_NAME, SLOT_OVERHEAD,
};

use serde::{Deserialize, Serialize};

use crate::algorithm::{AlgorithmKind, Limiter, Mode, Outcome, State};
use crate::policy::Rule;
use crate::time::{Nanos, Span};

/// What evicting a stored key to make room for a new one would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its state is back to fresh: dropping it changes no decision.
    Fresh,
    /// In use, below its limit: if it returns it starts over, with at most
    /// its normal allowance.
    Live,
    /// Refused and still limited, or holding in-flight permits (which
    /// would be handed out again): never evicted.
    Protected,
}

impl Standing {
    /// The standing at `now` of a key of `limiter`'s rule with `state`,
    /// marked limited until `limited_until`.
    pub fn of(limiter: &Limiter, state: &State, limited_until: Nanos, now: Nanos) -> Standing {
        if limiter.is_fresh(state, now) {
            Standing::Fresh
        } else if now < limited_until || limiter.kind() == AlgorithmKind::Concurrency {
            Standing::Protected
        } else {
            Standing::Live
        }
    }
}

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

/// What a store does with a new key when every place it could take
/// holds a key it must not evict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// The key shares one overflow state per rule, with the rule's limit:
    /// new keys are limited together while the table is full.
    #[default]
    Overflow,
    /// The key is refused until room frees up.
    Refuse,
}

/// Where a checked-out state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// The key's own state (held, or new with a place to keep it).
    Own,
    /// The rule's overflow state, shared by new keys that found no room.
    Overflow,
    /// No room and [`WhenFull::Refuse`]: the key is refused.
    Full,
}

/// A checked-out state and the version it was read at.
#[derive(Debug)]
pub struct Loaded<V> {
    /// The state (a fresh one if none was stored).
    pub state: State,
    /// Handed back to `save` for the conflict check.
    pub version: V,
    /// Whose state this is.
    pub room: Room,
}

impl<V> Loaded<V> {
    /// Runs `rule`'s limiter on the state, or refuses when there is no room.
    pub fn acquire(&mut self, rule: &Rule, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        match self.room {
            Room::Own | Room::Overflow => rule.limiter.acquire(&mut self.state, now, cost, mode),
            Room::Full => no_room(rule),
        }
    }
}

/// The refusal of a new key that found no room: it may try again after a
/// period of the rule, by which time keys may have become evictable.
pub fn no_room(rule: &Rule) -> Outcome {
    let wait = rule.quota.per();
    Outcome {
        allowed: false,
        remaining: 0,
        reset_after: wait,
        retry_after: wait,
    }
}

/// How long a key refused with `outcome` stays protected from eviction:
/// until its allowance is entirely restored, or at least until it may
/// retry.
pub fn limited_for(outcome: &Outcome) -> Span {
    match outcome.retry_after {
        Span::NEVER => outcome.reset_after,
        retry => outcome.reset_after.max(retry),
    }
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

    /// [`StateStore::save`] for a state checked out by
    /// [`StateStore::load_charged`], also marking a key that holds its own
    /// state limited for at least `limited` ([`Span::ZERO`]: the mark stays
    /// as it was). A charge that put the key in debt marks it, so that no
    /// new key evicts it and it never comes back without its debt.
    fn save_marked(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Self::Version,
        limited: Span,
        now: Nanos,
    ) -> Result<Saved, StoreError>;

    /// Gives back a state that was not changed.
    fn release(&mut self, slot: Slot<'_>, state: State, version: Self::Version, now: Nanos);

    /// Gives back a state whose key was just refused with `outcome`: the
    /// store marks the key limited for [`limited_for`] so that no new key
    /// evicts it meanwhile.
    fn refuse(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Self::Version,
        outcome: &Outcome,
        now: Nanos,
    );

    /// Checks out the state a charge taken at `room` went to, to refund
    /// it, without making room for the key: the key's own state while it
    /// still holds one ([`Room::Own`]), or the rule's overflow state
    /// ([`Room::Overflow`]). `None` when the state that took the charge is
    /// gone (the key was evicted) or there is none ([`Room::Full`]).
    fn load_charged(
        &mut self,
        slot: Slot<'_>,
        room: Room,
        now: Nanos,
    ) -> Result<Option<Loaded<Self::Version>>, StoreError>;

    /// Takes `cost` permits at `slot` if allowed, in one step (what a
    /// decision over a single rule needs): the outcome and where it was
    /// decided; `None` when another writer got in first. Stores that can
    /// update in place override it; this default checks the state out,
    /// checks it and saves it.
    fn check(
        &mut self,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Result<Option<(Outcome, Room)>, StoreError> {
        let mut l = self.load(slot, now)?;
        let room = l.room;
        let outcome = l.acquire(slot.rule, now, cost, Mode::Consume);
        if !outcome.allowed {
            self.refuse(slot, l.state, l.version, &outcome, now);
            return Ok(Some((outcome, room)));
        }
        Ok(match self.save(slot, l.state, l.version, now)? {
            Saved::Stored => Some((outcome, room)),
            Saved::Conflict => None,
        })
    }
}
