//! State in one process's memory, bounded in keys per rule.

use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

use super::{Loaded, Saved, Slot, StateStore, StoreError};
use crate::algorithm::{Limiter, Outcome, State};
use crate::time::Nanos;

/// How many keys were dropped to stay within bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvictionStats {
    /// Keys whose state was back to fresh: dropping them changes nothing.
    pub fresh: u64,
    /// Keys still in use, least recently used first: each restarts with a
    /// full allowance if it comes back, so it may be admitted more.
    pub live: u64,
}

#[derive(Debug)]
struct Entry {
    state: State,
    last_used: Nanos,
}

/// One rule's keys.
#[derive(Debug, Default)]
struct Partition {
    entries: HashMap<String, Entry>,
}

/// States in a hash map per rule, at most `max_keys` keys each.
///
/// When a new key arrives at the bound, keys whose state is fresh are
/// dropped first (no effect on any decision); only if that frees too
/// little are the least recently used live keys dropped, a sixteenth of
/// the bound at a time so the sweep's cost is amortised.
#[derive(Debug)]
pub struct MemoryStore {
    partitions: Vec<Partition>,
    max_keys: usize,
    evictions: EvictionStats,
}

impl MemoryStore {
    /// A store keeping at most `max_keys` keys per rule (at least 1).
    pub fn new(max_keys: usize) -> MemoryStore {
        MemoryStore {
            partitions: Vec::new(),
            max_keys: max_keys.max(1),
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
    /// `save` (allowed) or `release` (denied) do, with one hash lookup for a
    /// held key. A new key is stored only when allowed, after
    /// [`MemoryStore`]'s eviction exactly as `save` does it.
    pub fn acquire(
        &mut self,
        rule_index: usize,
        limiter: &Limiter,
        key: &str,
        now: Nanos,
        cost: u64,
    ) -> Outcome {
        if let Some(entry) = self.partition(rule_index).entries.get_mut(key) {
            entry.last_used = now;
            return limiter.check(&mut entry.state, now, cost);
        }
        let mut state = limiter.fresh_state();
        let outcome = limiter.check(&mut state, now, cost);
        if outcome.allowed {
            self.make_room(rule_index, limiter, now);
            let entry = Entry {
                state,
                last_used: now,
            };
            self.partition(rule_index).entries.insert(key.into(), entry);
        }
        outcome
    }

    fn partition(&mut self, rule_index: usize) -> &mut Partition {
        if self.partitions.len() <= rule_index {
            self.partitions
                .resize_with(rule_index + 1, Partition::default);
        }
        &mut self.partitions[rule_index]
    }

    fn make_room(&mut self, rule_index: usize, limiter: &Limiter, now: Nanos) {
        let max_keys = self.max_keys;
        let partition = self.partition(rule_index);
        if partition.entries.len() < max_keys {
            return;
        }
        let before = partition.entries.len();
        partition
            .entries
            .retain(|_, e| !limiter.is_fresh(&e.state, now));
        let fresh = before - partition.entries.len();
        let target = max_keys - (max_keys / 16).max(1);
        let mut live = 0;
        if partition.entries.len() > target {
            let excess = partition.entries.len() - target;
            let mut ages: Vec<Nanos> = partition.entries.values().map(|e| e.last_used).collect();
            let (_, cutoff, _) = ages.select_nth_unstable(excess - 1);
            let cutoff = *cutoff;
            partition.entries.retain(|_, e| {
                let keep = e.last_used > cutoff || live >= excess;
                if !keep {
                    live += 1;
                }
                keep
            });
        }
        self.evictions.fresh += fresh as u64;
        self.evictions.live += live as u64;
    }

    fn put(&mut self, slot: Slot<'_>, key: Option<String>, state: State, now: Nanos) {
        let entry = Entry {
            state,
            last_used: now,
        };
        let key = match key {
            Some(key) => key,
            None => {
                self.make_room(slot.rule_index, &slot.rule.limiter, now);
                slot.key.into()
            }
        };
        self.partition(slot.rule_index).entries.insert(key, entry);
    }
}

impl StateStore for MemoryStore {
    /// The checked-out key, if it was held (re-inserted without a new
    /// allocation). One thread owns the map, so there are no conflicts.
    type Version = Option<String>;

    fn load(&mut self, slot: Slot<'_>, _now: Nanos) -> Result<Loaded<Option<String>>, StoreError> {
        Ok(
            match self
                .partition(slot.rule_index)
                .entries
                .remove_entry(slot.key)
            {
                Some((key, entry)) => Loaded {
                    state: entry.state,
                    version: Some(key),
                },
                None => Loaded {
                    state: slot.rule.limiter.fresh_state(),
                    version: None,
                },
            },
        )
    }

    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        key: Option<String>,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        self.put(slot, key, state, now);
        Ok(Saved::Stored)
    }

    fn check(
        &mut self,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Result<Option<Outcome>, StoreError> {
        Ok(Some(self.acquire(
            slot.rule_index,
            &slot.rule.limiter,
            slot.key,
            now,
            cost,
        )))
    }

    fn release(&mut self, slot: Slot<'_>, state: State, key: Option<String>, now: Nanos) {
        // A key that was not held and did not change stays absent: its
        // fresh state is what absence means.
        if key.is_some() {
            self.put(slot, key, state, now);
        }
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
            store.release(slot, state, loaded.version, now);
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
                let a = in_place.acquire(1, &rule.limiter, key, now, cost);
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
    fn acquire_updates_a_held_key_in_place() {
        let rule = rule(AlgorithmKind::FixedWindow, r#"{"count": 2, "per": "1m"}"#);
        let mut store = MemoryStore::new(10);
        let now = Nanos(60_000_000_000);
        assert!(store.acquire(0, &rule.limiter, "a", now, 1).allowed);
        assert!(store.acquire(0, &rule.limiter, "a", now, 1).allowed);
        let third = store.acquire(0, &rule.limiter, "a", now, 1);
        assert!(!third.allowed);
        assert_eq!(third.remaining, 0);
        assert_eq!(store.len(0), 1);
    }

    #[test]
    fn acquire_does_not_store_a_denied_new_key() {
        let rule = rule(AlgorithmKind::TokenBucket, r#"{"count": 2, "per": "1s"}"#);
        let mut store = MemoryStore::new(10);
        let outcome = store.acquire(0, &rule.limiter, "a", Nanos(5), 3);
        assert!(!outcome.allowed);
        assert_eq!(outcome.retry_after, Span::NEVER);
        assert!(store.is_empty());
    }

    #[test]
    fn acquire_replaces_a_state_of_another_algorithm() {
        let old = rule(AlgorithmKind::Gcra, r#"{"count": 1, "per": "1h"}"#);
        let new = rule(AlgorithmKind::TokenBucket, r#"{"count": 1, "per": "1h"}"#);
        let mut store = MemoryStore::new(10);
        assert!(store.acquire(0, &old.limiter, "a", Nanos(5), 1).allowed);
        assert!(!store.acquire(0, &old.limiter, "a", Nanos(6), 1).allowed);
        // The rule changed algorithm: the key starts afresh under the new one.
        assert!(store.acquire(0, &new.limiter, "a", Nanos(7), 1).allowed);
        assert!(matches!(store.get(0, "a"), Some(State::TokenBucket(_))));
    }
}
