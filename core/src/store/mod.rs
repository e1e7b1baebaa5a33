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
//!
//! A rule with a `block_duration` blocks a key it refuses: the store keeps
//! the block's end beside the key's state ([`Marks::blocked_until`]),
//! written by compare-and-swap like the state itself, so every worker
//! sharing the store sees it; a blocked key is protected until the block
//! ends. Only a key with a state of its own is blocked: the overflow
//! state, shared by many keys, never is.

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

/// What a store remembers about a key besides its state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// Refused until about then (see [`StateStore::refuse`]): not evicted
    /// before.
    pub limited_until: Nanos,
    /// Blocked by its rule's `block_duration` until exactly then: refused
    /// whatever its state says, and not evicted before.
    pub blocked_until: Nanos,
}

impl Marks {
    /// These marks with the key limited for at least `limited` from
    /// `now` ([`Span::ZERO`]: unchanged), as a charge into debt marks it.
    pub fn limited_for_at_least(self, limited: Span, now: Nanos) -> Marks {
        if limited == Span::ZERO {
            return self;
        }
        Marks {
            limited_until: self.limited_until.max(now.plus(limited)),
            ..self
        }
    }

    /// Both marks at their later value.
    pub fn max(self, other: Marks) -> Marks {
        Marks {
            limited_until: self.limited_until.max(other.limited_until),
            blocked_until: self.blocked_until.max(other.blocked_until),
        }
    }
}

impl Standing {
    /// The standing at `now` of a key of `limiter`'s rule with `state`
    /// and `marks`. A blocked key is protected even if its state is fresh:
    /// dropping it would lift the block.
    pub fn of(limiter: &Limiter, state: &State, marks: Marks, now: Nanos) -> Standing {
        if now < marks.blocked_until {
            Standing::Protected
        } else if limiter.is_fresh(state, now) {
            Standing::Fresh
        } else if now < marks.limited_until || limiter.kind() == AlgorithmKind::Concurrency {
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
    /// The key is blocked until then (see [`Marks::blocked_until`]; zero
    /// for a key never blocked).
    pub blocked_until: Nanos,
}

impl<V> Loaded<V> {
    /// Runs `rule`'s limiter on the state, or refuses when there is no room.
    pub fn acquire(&mut self, rule: &Rule, now: Nanos, cost: u64, mode: Mode) -> Outcome {
        match self.room {
            Room::Own | Room::Overflow => {
                rule_outcome(rule, &mut self.state, self.blocked_until, now, cost, mode)
            }
            Room::Full => no_room(rule),
        }
    }
}

/// `rule`'s limiter run on `state`, unless the key is blocked until
/// `blocked_until`: then it takes nothing and is refused until the later
/// of the block's end and when its budget allows again. A block counts
/// only while the rule has a `block_duration` (a reload that removes it
/// lifts every block of the rule).
pub fn rule_outcome(
    rule: &Rule,
    state: &mut State,
    blocked_until: Nanos,
    now: Nanos,
    cost: u64,
    mode: Mode,
) -> Outcome {
    if rule.block_duration.is_none() || now >= blocked_until {
        return rule.limiter.acquire(state, now, cost, mode);
    }
    rule.limiter
        .acquire(state, now, cost, Mode::Peek)
        .blocked_until(blocked_until, now)
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
    /// evicts it meanwhile, and blocked until `blocked_until` if that is
    /// later than its current block (an earlier or zero value changes no
    /// block). Only a key holding a state of its own is marked.
    fn refuse(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Self::Version,
        outcome: &Outcome,
        blocked_until: Nanos,
        now: Nanos,
    );

    /// Whether the state checked out at `version` is still the one
    /// stored, checked before a refusal rests on it. A store that may
    /// check out its own last write instead of reading it ([`SlotStore`])
    /// cannot know otherwise: a save presenting `version` proves it, but a
    /// refusal saves nothing. `false`: check the state out again (the
    /// store then reads it).
    fn confirm(
        &mut self,
        _slot: Slot<'_>,
        _version: &Self::Version,
        _now: Nanos,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

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
    /// decided; `None` when another writer got in first, or a refusal
    /// could not be confirmed ([`StateStore::confirm`]). Stores that can
    /// update in place override it; this default checks the state out,
    /// checks it and saves it. It honours a key's block but never starts
    /// one: a block starts on a final refusal, which only the engine knows
    /// (it decides rules with a `block_duration` through `load`).
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
            if !self.confirm(slot, &l.version, now)? {
                return Ok(None);
            }
            self.refuse(slot, l.state, l.version, &outcome, Nanos::ZERO, now);
            return Ok(Some((outcome, room)));
        }
        Ok(match self.save(slot, l.state, l.version, now)? {
            Saved::Stored => Some((outcome, room)),
            Saved::Conflict => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_mark_only_lengthens() {
        let marks = Marks {
            limited_until: Nanos(50),
            blocked_until: Nanos(70),
        };
        assert_eq!(marks.limited_for_at_least(Span::ZERO, Nanos(100)), marks);
        assert_eq!(marks.limited_for_at_least(Span(10), Nanos(30)), marks);
        let longer = marks.limited_for_at_least(Span(10), Nanos(100));
        assert_eq!(longer.limited_until, Nanos(110));
        assert_eq!(longer.blocked_until, Nanos(70));
        let end = marks.limited_for_at_least(Span::NEVER, Nanos(100));
        assert_eq!(end.limited_until, Nanos(u64::MAX));
    }
}
