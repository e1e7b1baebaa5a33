//! State in one process's memory, bounded in keys per rule.

use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

use super::{
    limited_for, no_room, rule_outcome, Loaded, Marks, Room, Saved, Slot, Standing, StateStore,
    StoreError, WhenFull,
};
use crate::algorithm::{Limiter, Mode, Outcome, State};
use crate::policy::Rule;
use crate::time::{Nanos, Span};

/// How many keys were dropped to stay within bounds, and what happened
/// to new keys that found no room.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionStats {
    /// Keys whose state was back to fresh: dropping them changes nothing.
    pub fresh: u64,
    /// Keys still in use but below their limit and holding no in-flight
    /// permits, least recently used first: each restarts with a full
    /// allowance if it comes back.
    pub live: u64,
    /// Requests of new keys that shared the overflow state (every key held
    /// was limited).
    pub overflowed: u64,
    /// Requests of new keys refused for want of room ([`WhenFull::Refuse`]).
    pub refused: u64,
}

#[derive(Debug)]
struct Entry {
    state: State,
    last_used: Nanos,
    /// Refused (or blocked) until then: never evicted before.
    marks: Marks,
}

/// One rule's keys.
#[derive(Debug, Default)]
struct Partition {
    entries: HashMap<String, Entry>,
    /// The state new keys share while every held key is protected.
    overflow: Option<State>,
    /// Set by a sweep that freed less than a batch.
    backoff: Backoff,
}

/// After a sweep that freed `f` places, fewer than a batch (a sixteenth of
/// the bound), the next `batch - f` new keys that find no room are turned
/// away without one, unless enough limits end first: each O(`max_keys`)
/// sweep is paid for by a batch of new keys or of ended limits, whatever
/// the keys held.
#[derive(Debug, Default)]
struct Backoff {
    /// New keys still to turn away without a sweep.
    arrivals: usize,
    /// When `arrivals` limits will have ended: sweep again from then.
    until: Nanos,
}

/// Where a checked-out state came from, to put it back.
#[derive(Debug)]
pub enum Checkout {
    /// A held key, taken out of the map (re-inserted without a new
    /// allocation), with its marks.
    Held(String, Marks),
    /// A held key checked out for a refund: dropped at the bound if the
    /// refund made its state fresh (absence means fresh), which frees its
    /// room at once.
    Charged(String, Marks),
    /// A new key with room to be stored.
    New,
    /// The rule's overflow state.
    Overflow,
    /// A new key without room, refused.
    Full,
}

/// States in a hash map per rule, at most `max_keys` keys each.
///
/// When a new key arrives at the bound, keys whose state is fresh are
/// dropped first (no effect on any decision), then the least recently
/// used [`Standing::Live`] keys, a sixteenth of the bound at a time so the
/// sweep's cost is amortised (and a sweep that frees less is not tried
/// again for a while, see [`Backoff`]). At the bound, a key refunded back
/// to fresh is dropped at once. A limited key or one holding in-flight
/// permits is never dropped: if every key is protected, the new key uses
/// the rule's overflow state or is refused, as [`WhenFull`] says.
#[derive(Debug)]
pub struct MemoryStore {
    partitions: Vec<Partition>,
    max_keys: usize,
    when_full: WhenFull,
    evictions: EvictionStats,
}

impl MemoryStore {
    /// A store keeping at most `max_keys` keys per rule (at least 1); new
    /// keys that find no room share an overflow state.
    pub fn new(max_keys: usize) -> MemoryStore {
        MemoryStore::with_when_full(max_keys, WhenFull::Overflow)
    }

    /// [`MemoryStore::new`], with the choice of what a new key without
    /// room gets.
    pub fn with_when_full(max_keys: usize, when_full: WhenFull) -> MemoryStore {
        MemoryStore {
            partitions: Vec::new(),
            max_keys: max_keys.max(1),
            when_full,
            evictions: EvictionStats::default(),
        }
    }

    /// Keys dropped so far.
    pub fn evictions(&self) -> EvictionStats {
        self.evictions
    }

    /// Keys held for the rule at `rule_index`.
    pub fn len(&self, rule_index: usize) -> usize {
        self.partitions
            .get(rule_index)
            .map_or(0, |p| p.entries.len())
    }

    /// Whether no key is held for any rule.
    pub fn is_empty(&self) -> bool {
        self.partitions.iter().all(|p| p.entries.is_empty())
    }

    /// A copy of the state for a key, if held.
    pub fn get(&self, rule_index: usize, key: &str) -> Option<&State> {
        self.partitions
            .get(rule_index)
            .and_then(|p| p.entries.get(key))
            .map(|e| &e.state)
    }

    /// Forgets one key (an admin reset).
    pub fn remove(&mut self, rule_index: usize, key: &str) -> bool {
        self.partitions
            .get_mut(rule_index)
            .is_some_and(|p| p.entries.remove(key).is_some())
    }

    /// Takes `cost` permits for `key` in place: what `load`, `check`, then
    /// `save` (allowed) or `refuse` (denied) do, with one hash lookup for a
    /// held key. A new key is stored only when allowed. The outcome, and
    /// where it was decided.
    pub fn acquire(
        &mut self,
        rule_index: usize,
        rule: &Rule,
        key: &str,
        now: Nanos,
        cost: u64,
    ) -> (Outcome, Room) {
        if let Some(entry) = self.partition(rule_index).entries.get_mut(key) {
            let blocked_until = entry.marks.blocked_until;
            let outcome = rule_outcome(
                rule,
                &mut entry.state,
                blocked_until,
                now,
                cost,
                Mode::Consume,
            );
            entry.last_used = now;
            if !outcome.allowed {
                let limited_until = &mut entry.marks.limited_until;
                *limited_until = (*limited_until).max(now.plus(limited_for(&outcome)));
            }
            return (outcome, Room::Own);
        }
        let room = self.place_new(rule_index, &rule.limiter, now);
        let outcome = match room {
            Room::Own => {
                let mut state = rule.limiter.fresh_state();
                let outcome = rule.limiter.check(&mut state, now, cost);
                if outcome.allowed {
                    let entry = Entry {
                        state,
                        last_used: now,
                        marks: Marks::default(),
                    };
                    self.partition(rule_index).entries.insert(key.into(), entry);
                }
                outcome
            }
            Room::Overflow => {
                let partition = self.partition(rule_index);
                let state = partition
                    .overflow
                    .get_or_insert_with(|| rule.limiter.fresh_state());
                rule.limiter.check(state, now, cost)
            }
            Room::Full => no_room(rule),
        };
        (outcome, room)
    }

    /// The partition of the rule at `rule_index`, created on first use.
    #[inline]
    fn partition(&mut self, rule_index: usize) -> &mut Partition {
        if self.partitions.len() <= rule_index {
            self.add_partitions(rule_index);
        }
        &mut self.partitions[rule_index]
    }

    /// Out of line: once per rule, so the lookup above stays small.
    #[cold]
    #[inline(never)]
    fn add_partitions(&mut self, rule_index: usize) {
        self.partitions
            .resize_with(rule_index + 1, Partition::default);
    }

    /// Where a new key goes: its own entry if there is or can be made
    /// room, else what [`WhenFull`] says (counted).
    fn place_new(&mut self, rule_index: usize, limiter: &Limiter, now: Nanos) -> Room {
        if self.make_room(rule_index, limiter, now) {
            return Room::Own;
        }
        match self.when_full {
            WhenFull::Overflow => {
                self.evictions.overflowed += 1;
                Room::Overflow
            }
            WhenFull::Refuse => {
                self.evictions.refused += 1;
                Room::Full
            }
        }
    }

    /// Makes room for one more key if that needs no protected key
    /// dropped; whether there is room.
    fn make_room(&mut self, rule_index: usize, limiter: &Limiter, now: Nanos) -> bool {
        let max_keys = self.max_keys;
        let partition = self.partition(rule_index);
        if partition.entries.len() < max_keys {
            return true;
        }
        let backoff = &mut partition.backoff;
        if backoff.arrivals > 0 && now < backoff.until {
            backoff.arrivals -= 1;
            return false;
        }
        let standing = |e: &Entry| Standing::of(limiter, &e.state, e.marks, now);
        let mut fresh = 0;
        let mut ages: Vec<Nanos> = Vec::new();
        let mut limits_end: Vec<Nanos> = Vec::new();
        partition.entries.retain(|_, e| match standing(e) {
            Standing::Fresh => {
                fresh += 1;
                false
            }
            Standing::Live => {
                ages.push(e.last_used);
                true
            }
            Standing::Protected => {
                let until = e.marks.limited_until.max(e.marks.blocked_until);
                if until > now {
                    limits_end.push(until);
                }
                true
            }
        });
        let batch = (max_keys / 16).max(1);
        let target = max_keys - batch;
        let mut live = 0;
        if partition.entries.len() > target {
            let excess = partition.entries.len() - target;
            let evictable = |e: &Entry| standing(e) == Standing::Live;
            if let Some(last) = excess.min(ages.len()).checked_sub(1) {
                let (_, cutoff, _) = ages.select_nth_unstable(last);
                let cutoff = *cutoff;
                partition.entries.retain(|_, e| {
                    let keep = !evictable(e) || e.last_used > cutoff || live >= excess;
                    if !keep {
                        live += 1;
                    }
                    keep
                });
            }
        }
        partition.backoff = match batch.checked_sub(fresh + live) {
            Some(short @ 1..) => Backoff {
                arrivals: short,
                until: match limits_end.len().checked_sub(short) {
                    Some(_) => *limits_end.select_nth_unstable(short - 1).1,
                    None => Nanos(u64::MAX),
                },
            },
            _ => Backoff::default(),
        };
        let room = partition.entries.len() < max_keys;
        self.evictions.fresh += fresh as u64;
        self.evictions.live += live as u64;
        room
    }

    fn put(&mut self, slot: Slot<'_>, checkout: Checkout, state: State, now: Nanos) {
        let max_keys = self.max_keys;
        let partition = self.partition(slot.rule_index);
        let (key, marks) = match checkout {
            Checkout::Held(key, marks) => (key, marks),
            Checkout::Charged(key, marks) => {
                // At the bound, a sweep may be backing off: dropping the
                // key now frees its room for the next new key. Below it,
                // the key stays, as any fresh key does until a sweep.
                let full = partition.entries.len() + 1 >= max_keys;
                let standing = Standing::of(&slot.rule.limiter, &state, marks, now);
                if full && standing == Standing::Fresh {
                    return;
                }
                (key, marks)
            }
            Checkout::New => (slot.key.into(), Marks::default()),
            Checkout::Overflow => {
                partition.overflow = Some(state);
                return;
            }
            Checkout::Full => return,
        };
        let entry = Entry {
            state,
            last_used: now,
            marks,
        };
        partition.entries.insert(key, entry);
    }
}

impl StateStore for MemoryStore {
    /// One thread owns the map, so there are no conflicts.
    type Version = Checkout;

    fn load(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Loaded<Checkout>, StoreError> {
        let fresh = slot.rule.limiter.fresh_state();
        let held = self
            .partition(slot.rule_index)
            .entries
            .remove_entry(slot.key);
        if let Some((key, entry)) = held {
            return Ok(Loaded {
                state: entry.state,
                version: Checkout::Held(key, entry.marks),
                room: Room::Own,
                blocked_until: entry.marks.blocked_until,
            });
        }
        let room = self.place_new(slot.rule_index, &slot.rule.limiter, now);
        let (state, version) = match room {
            Room::Own => (fresh, Checkout::New),
            Room::Overflow => {
                let partition = self.partition(slot.rule_index);
                (
                    partition.overflow.take().unwrap_or(fresh),
                    Checkout::Overflow,
                )
            }
            Room::Full => (fresh, Checkout::Full),
        };
        Ok(Loaded {
            state,
            version,
            room,
            blocked_until: Nanos::ZERO,
        })
    }

    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        checkout: Checkout,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        self.put(slot, checkout, state, now);
        Ok(Saved::Stored)
    }

    fn check(
        &mut self,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Result<Option<(Outcome, Room)>, StoreError> {
        Ok(Some(self.acquire(
            slot.rule_index,
            slot.rule,
            slot.key,
            now,
            cost,
        )))
    }

    fn load_charged(
        &mut self,
        slot: Slot<'_>,
        room: Room,
        _now: Nanos,
    ) -> Result<Option<Loaded<Checkout>>, StoreError> {
        let partition = self.partition(slot.rule_index);
        Ok(match room {
            Room::Own => partition
                .entries
                .remove_entry(slot.key)
                .map(|(key, entry)| Loaded {
                    state: entry.state,
                    version: Checkout::Charged(key, entry.marks),
                    room,
                    blocked_until: entry.marks.blocked_until,
                }),
            Room::Overflow => Some(Loaded {
                state: partition
                    .overflow
                    .take()
                    .unwrap_or_else(|| slot.rule.limiter.fresh_state()),
                version: Checkout::Overflow,
                room,
                blocked_until: Nanos::ZERO,
            }),
            Room::Full => None,
        })
    }

    fn save_marked(
        &mut self,
        slot: Slot<'_>,
        state: State,
        checkout: Checkout,
        limited: Span,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        let mark = |marks: Marks| marks.limited_for_at_least(limited, now);
        let checkout = match checkout {
            Checkout::Held(key, until) => Checkout::Held(key, mark(until)),
            Checkout::Charged(key, until) => Checkout::Charged(key, mark(until)),
            other => other,
        };
        self.put(slot, checkout, state, now);
        Ok(Saved::Stored)
    }

    fn release(&mut self, slot: Slot<'_>, state: State, checkout: Checkout, now: Nanos) {
        // A new key that did not change stays absent: its fresh state is
        // what absence means.
        if !matches!(checkout, Checkout::New) {
            self.put(slot, checkout, state, now);
        }
    }

    fn refuse(
        &mut self,
        slot: Slot<'_>,
        state: State,
        checkout: Checkout,
        outcome: &Outcome,
        blocked_until: Nanos,
        now: Nanos,
    ) {
        let checkout = match checkout {
            Checkout::Held(key, marks) => Checkout::Held(
                key,
                marks.max(Marks {
                    limited_until: now.plus(limited_for(outcome)),
                    blocked_until,
                }),
            ),
            other => other,
        };
        self.release(slot, state, checkout, now);
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;
    use alloc::vec::Vec;

    use super::*;
    use crate::algorithm::AlgorithmKind;
    use crate::policy::{Policy, Rule};
    use crate::time::Span;

    fn rule(kind: AlgorithmKind, limit: &str) -> Rule {
        let json = format!(
            r#"{{"rules": [{{"name": "r", "limit": {limit}, "algorithm": "{}"}}]}}"#,
            kind.name()
        );
        let mut policy = Policy::from_json(&json).unwrap();
        policy.rules.remove(0)
    }

    /// The engine's path for one rule: load, check, then save or release.
    fn checkout(store: &mut MemoryStore, rule: &Rule, key: &str, now: Nanos, cost: u64) -> Outcome {
        let slot = Slot {
            rule_index: 1,
            rule,
            key,
        };
        let loaded = store.load(slot, now).unwrap();
        let mut state = loaded.state;
        let outcome = rule.limiter.check(&mut state, now, cost);
        if outcome.allowed {
            assert_eq!(
                store.save(slot, state, loaded.version, now),
                Ok(Saved::Stored)
            );
        } else {
            store.refuse(slot, state, loaded.version, &outcome, Nanos::ZERO, now);
        }
        outcome
    }

    #[test]
    fn acquire_matches_load_check_save_including_eviction() {
        let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
        for kind in AlgorithmKind::ALL {
            let rule = rule(kind, r#"{"count": 4, "per": "1s"}"#);
            // A bound below the key count forces fresh and live evictions.
            let mut in_place = MemoryStore::new(5);
            let mut checked_out = MemoryStore::new(5);
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut now = Nanos(1_000_000_000);
            for step in 0..3_000 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let key = &keys[(seed >> 33) as usize % keys.len()];
                let cost = [0, 1, 1, 1, 2, 5][(seed >> 20) as usize % 6];
                // Strictly increasing: keys used at the same instant tie for
                // LRU eviction, and two maps may break the tie differently.
                now = now.plus(Span::from_millis(1 + (seed >> 40) % 300));
                let (a, _) = in_place.acquire(1, &rule, key, now, cost);
                let b = checkout(&mut checked_out, &rule, key, now, cost);
                assert_eq!(a, b, "{kind:?} step {step}");
                assert_eq!(in_place.len(1), checked_out.len(1), "{kind:?} step {step}");
                assert_eq!(
                    in_place.evictions(),
                    checked_out.evictions(),
                    "{kind:?} step {step}"
                );
                for k in &keys {
                    assert_eq!(
                        in_place.get(1, k),
                        checked_out.get(1, k),
                        "{kind:?} step {step} {k}"
                    );
                }
            }
            let evicted = in_place.evictions();
            assert!(
                evicted.fresh > 0 && evicted.live > 0,
                "{kind:?}: {evicted:?}"
            );
            assert_eq!(in_place.len(0), 0, "other rules untouched");
        }
    }

    #[test]
    fn a_key_holding_in_flight_permits_is_never_evicted() {
        let policy = Policy::from_json(
            r#"{"rules":[{"name":"r","match":{"websocket":true},"counts":"in_flight","limit":{"count":2}}]}"#,
        )
        .unwrap();
        let rule = &policy.rules[0];
        for in_place in [true, false] {
            let mut store = MemoryStore::new(4);
            let ask = |store: &mut MemoryStore, key: &str, now: Nanos| {
                if in_place {
                    store.acquire(1, rule, key, now, 1).0
                } else {
                    checkout(store, rule, key, now, 1)
                }
            };
            let mut now = Nanos(1_000_000_000);
            assert!(ask(&mut store, "victim", now).allowed);
            assert!(ask(&mut store, "victim", now).allowed);
            for i in 0..8 {
                now = now.plus(Span::SECOND);
                ask(&mut store, &format!("made-up-{i}"), now);
            }
            assert_eq!(store.evictions().live, 0, "every key holds a permit");
            assert!(
                !ask(&mut store, "victim", now).allowed,
                "the victim got its in-flight allowance again (in place: {in_place})"
            );
        }
    }

    /// 63 keys refused (limited for about an hour) and one live key, in a
    /// table of 64: the store holding them, and the time after.
    fn nearly_all_limited(rule: &Rule) -> (MemoryStore, Nanos) {
        let mut store = MemoryStore::new(64);
        let mut now = Nanos(3_600_000_000_000);
        for i in 0..64 {
            now = now.plus(Span::SECOND);
            let key = format!("held-{i}");
            assert!(store.acquire(1, rule, &key, now, 1).0.allowed);
            if i > 0 {
                assert!(!store.acquire(1, rule, &key, now, 1).0.allowed);
            }
        }
        (store, now)
    }

    #[test]
    fn a_sweep_that_frees_little_is_paid_for_by_the_new_keys_after_it() {
        let rule = rule(AlgorithmKind::FixedWindow, r#"{"count": 1, "per": "1h"}"#);
        let (mut store, mut now) = nearly_all_limited(&rule);
        for i in 0..100 {
            now = now.plus(Span::MILLISECOND);
            store.acquire(1, &rule, &format!("new-{i}"), now, 1);
        }
        // Each sweep frees one key; the next three new keys (a sixteenth
        // of the table, less what it freed) overflow without a sweep.
        let evicted = store.evictions();
        assert!(evicted.live <= 100 / 4 + 1, "{evicted:?}");
        assert_eq!(evicted.live + evicted.overflowed, 100, "{evicted:?}");
    }

    #[test]
    fn new_keys_get_room_again_once_enough_limits_have_ended() {
        let rule = rule(AlgorithmKind::FixedWindow, r#"{"count": 1, "per": "1h"}"#);
        let (mut store, now) = nearly_all_limited(&rule);
        assert!(!store.acquire(1, &rule, "held-0", now, 1).0.allowed);
        let (_, room) = store.acquire(1, &rule, "new", now, 1);
        assert_eq!(room, Room::Overflow, "every key is limited");
        // An hour and a quarter later the first limits have ended.
        let later = now.plus(Span::from_secs(75 * 60));
        assert_eq!(store.acquire(1, &rule, "newer", later, 1).1, Room::Own);
    }

    #[test]
    fn a_key_refunded_back_to_fresh_frees_its_room_at_once() {
        let rule = rule(AlgorithmKind::FixedWindow, r#"{"count": 1, "per": "1h"}"#);
        let mut store = MemoryStore::new(1);
        let now = Nanos(3_600_000_000_000);
        assert!(store.acquire(1, &rule, "a", now, 1).0.allowed);
        assert!(!store.acquire(1, &rule, "a", now, 1).0.allowed);
        assert_eq!(store.acquire(1, &rule, "b", now, 1).1, Room::Overflow);
        // a's response is excluded from counting: its state is fresh again.
        let slot = Slot {
            rule_index: 1,
            rule: &rule,
            key: "a",
        };
        let claim = crate::engine::Claim { slot, cost: 1 };
        crate::engine::refund_claims(&mut store, &[claim], now).unwrap();
        assert_eq!(store.acquire(1, &rule, "c", now, 1).1, Room::Own);
    }

    #[test]
    fn acquire_updates_a_held_key_in_place() {
        let rule = rule(AlgorithmKind::FixedWindow, r#"{"count": 2, "per": "1m"}"#);
        let mut store = MemoryStore::new(10);
        let now = Nanos(60_000_000_000);
        assert!(store.acquire(0, &rule, "a", now, 1).0.allowed);
        assert!(store.acquire(0, &rule, "a", now, 1).0.allowed);
        let (third, _) = store.acquire(0, &rule, "a", now, 1);
        assert!(!third.allowed);
        assert_eq!(third.remaining, 0);
        assert_eq!(store.len(0), 1);
    }

    #[test]
    fn acquire_does_not_store_a_denied_new_key() {
        let rule = rule(AlgorithmKind::TokenBucket, r#"{"count": 2, "per": "1s"}"#);
        let mut store = MemoryStore::new(10);
        let (outcome, _) = store.acquire(0, &rule, "a", Nanos(5), 3);
        assert!(!outcome.allowed);
        assert_eq!(outcome.retry_after, Span::NEVER);
        assert!(store.is_empty());
    }

    #[test]
    fn acquire_replaces_a_state_of_another_algorithm() {
        let old = rule(AlgorithmKind::Gcra, r#"{"count": 1, "per": "1h"}"#);
        let new = rule(AlgorithmKind::TokenBucket, r#"{"count": 1, "per": "1h"}"#);
        let mut store = MemoryStore::new(10);
        assert!(store.acquire(0, &old, "a", Nanos(5), 1).0.allowed);
        assert!(!store.acquire(0, &old, "a", Nanos(6), 1).0.allowed);
        // The rule changed algorithm: the key starts afresh under the new one.
        assert!(store.acquire(0, &new, "a", Nanos(7), 1).0.allowed);
        assert!(matches!(store.get(0, "a"), Some(State::TokenBucket(_))));
    }
}
