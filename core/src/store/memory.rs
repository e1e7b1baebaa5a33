//! State in one process's memory, bounded in keys per rule.

use alloc::string::String;
use alloc::vec::Vec;

use hashbrown::HashMap;

use super::{Loaded, Saved, Slot, StateStore, StoreError};
use crate::algorithm::{Limiter, State};
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

    fn release(&mut self, slot: Slot<'_>, state: State, key: Option<String>, now: Nanos) {
        // A key that was not held and did not change stays absent: its
        // fresh state is what absence means.
        if key.is_some() {
            self.put(slot, key, state, now);
        }
    }
}
