//! Counters in this process, over core's bounded [`MemoryStore`] and its
//! engine (`decide_claims`), so the server decides exactly as the filter.
//!
//! The keys are spread by hash over shards, each a [`MemoryStore`] behind
//! its own lock, so concurrent decisions on different keys rarely wait for
//! each other. A decision locks the shards of its keys in ascending order
//! (so two decisions never wait for each other in a cycle) and decides
//! all of them at once: still all or nothing.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use sluice_core::algorithm::{Outcome, State};
use sluice_core::engine::{decide_claims_unlisted, refund_claims, Claim};
use sluice_core::policy::{Action, Rule};
use sluice_core::store::{Loaded, MemoryStore, Room, Saved, Slot, StateStore, StoreError};
use sluice_core::time::{Nanos, Span};

use super::{system_now, Item, StorageError};

/// Most shards: a few per core of a large machine, beyond which a lock is
/// rarely contended anyway.
const MAX_SHARDS: usize = 64;

/// Fewest keys a shard is given room for: below that, eviction within a
/// shard would drift too far from eviction over the whole bound, so a
/// small `max_keys` gets fewer shards (one under twice this).
const MIN_KEYS_PER_SHARD: usize = 1024;

/// The embedded backend: exact, bounded in keys per limit, not shared
/// between processes.
#[derive(Debug)]
pub struct MemoryBackend {
    shards: Box<[Mutex<MemoryStore>]>,
    /// Picks a key's shard; seeded per process, so that nobody can choose
    /// keys that all land in one shard.
    hasher: RandomState,
}

impl MemoryBackend {
    /// A backend keeping at most `max_keys` keys per limit; at the bound,
    /// keys back to a full allowance go first (see [`MemoryStore`]). The
    /// bound is split evenly over the shards, each evicting on its own.
    pub fn new(max_keys: usize) -> MemoryBackend {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let count = (cores * 4)
            .next_power_of_two()
            .min(MAX_SHARDS)
            .min(max_keys / MIN_KEYS_PER_SHARD)
            .max(1);
        let per_shard = max_keys / count;
        MemoryBackend {
            shards: (0..count)
                .map(|_| Mutex::new(MemoryStore::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard_of(&self, key: &str) -> usize {
        // The hash reduced modulo the shard count; the conversions cannot
        // lose anything that matters for spreading keys.
        let hash = self.hasher.hash_one(key);
        (hash % self.shards.len() as u64) as usize
    }

    /// Runs a store operation over the shards of `claims`' keys, locked
    /// together: `one` on the shard itself when they all share one (a
    /// request of one descriptor, the usual case), else `many` on them all.
    fn with_shards<T>(
        &self,
        claims: &[Claim<'_>],
        one: impl FnOnce(&mut MemoryStore) -> T,
        many: impl FnOnce(&mut Locked<'_, '_>) -> T,
    ) -> T {
        let first = claims.first().map_or(0, |c| self.shard_of(c.slot.key));
        let shared_shard = claims
            .iter()
            .skip(1)
            .all(|c| self.shard_of(c.slot.key) == first);
        if shared_shard {
            if let Some(shard) = self.shards.get(first) {
                return one(&mut lock(shard));
            }
        }
        let mut of_claim: Vec<usize> = claims.iter().map(|c| self.shard_of(c.slot.key)).collect();
        let mut order = of_claim.clone();
        order.sort_unstable();
        order.dedup();
        let guards: Vec<MutexGuard<'_, MemoryStore>> = order
            .iter()
            .filter_map(|&i| self.shards.get(i))
            .map(lock)
            .collect();
        // From shard number to position among the locked guards.
        for shard in &mut of_claim {
            *shard = order.binary_search(shard).unwrap_or(0);
        }
        many(&mut Locked {
            guards,
            claims,
            of_claim,
        })
    }

    /// The all-or-nothing decision, under the locks of the keys' shards.
    pub fn decide(&self, items: &[Item<'_>], now: Nanos) -> Result<Vec<Outcome>, StorageError> {
        let verdict = with_claims(items, now, |claims| {
            self.with_shards(
                claims,
                |store| decide_claims_unlisted(store, claims, now, Span::ZERO),
                |locked| decide_claims_unlisted(locked, claims, now, Span::ZERO),
            )
        })?;
        // The engine reports one decision per claim, in claim order.
        Ok(verdict
            .decisions
            .iter()
            .map(|d| Outcome {
                allowed: d.decision.allowed,
                remaining: d.decision.remaining,
                reset_after: d.decision.reset_after,
                retry_after: d.decision.retry_after,
            })
            .collect())
    }
}

fn lock(shard: &Mutex<MemoryStore>) -> MutexGuard<'_, MemoryStore> {
    // A panic elsewhere while holding the lock cannot leave the store
    // inconsistent (every operation is a load or an insert), so a
    // poisoned lock is still usable.
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shards of one decision's keys, locked: a store that sends each
/// slot to its key's shard.
struct Locked<'g, 'c> {
    guards: Vec<MutexGuard<'g, MemoryStore>>,
    /// The claims being decided, whose keys the engine's slots name.
    claims: &'c [Claim<'c>],
    /// Per claim, the position of its shard in `guards`.
    of_claim: Vec<usize>,
}

type Version = <MemoryStore as StateStore>::Version;

impl Locked<'_, '_> {
    /// The shard of `slot`'s key: found among the claims (a decision names
    /// a handful of keys, so a scan beats hashing again).
    fn store(&mut self, slot: Slot<'_>) -> &mut MemoryStore {
        let at = self
            .claims
            .iter()
            .zip(&self.of_claim)
            .find(|(c, _)| c.slot.rule_index == slot.rule_index && c.slot.key == slot.key)
            .map_or(0, |(_, &at)| at);
        // `with_shards` locked a shard for every claim, so `at` is valid;
        // the first guard is only a fallback that cannot happen.
        let index = if at < self.guards.len() { at } else { 0 };
        &mut self.guards[index]
    }
}

impl StateStore for Locked<'_, '_> {
    type Version = Version;

    fn load(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Loaded<Version>, StoreError> {
        self.store(slot).load(slot, now)
    }

    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Version,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        self.store(slot).save(slot, state, version, now)
    }

    fn save_marked(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Version,
        limited: Span,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        self.store(slot)
            .save_marked(slot, state, version, limited, now)
    }

    fn release(&mut self, slot: Slot<'_>, state: State, version: Version, now: Nanos) {
        self.store(slot).release(slot, state, version, now);
    }

    fn refuse(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: Version,
        outcome: &Outcome,
        blocked_until: Nanos,
        now: Nanos,
    ) {
        self.store(slot)
            .refuse(slot, state, version, outcome, blocked_until, now);
    }

    fn load_charged(
        &mut self,
        slot: Slot<'_>,
        room: Room,
        now: Nanos,
    ) -> Result<Option<Loaded<Version>>, StoreError> {
        self.store(slot).load_charged(slot, room, now)
    }

    fn check(
        &mut self,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Result<Option<(Outcome, Room)>, StoreError> {
        self.store(slot).check(slot, cost, now)
    }
}

/// Runs `with` on the engine's claims for `items` at `now`: kept on the
/// stack for one item (a request of one descriptor, the usual case, which
/// so allocates nothing for them), else in lists.
fn with_claims<T>(items: &[Item<'_>], now: Nanos, with: impl FnOnce(&[Claim<'_>]) -> T) -> T {
    if let [item] = items {
        let rule = rule(item, now);
        return with(&[claim(item, &rule)]);
    }
    let rules: Vec<Cow<'_, Rule>> = items.iter().map(|it| rule(it, now)).collect();
    let claims: Vec<Claim<'_>> = items
        .iter()
        .zip(&rules)
        .map(|(it, r)| claim(it, r))
        .collect();
    with(&claims)
}

/// An item's rule at `now`, as the engine must see it: a calendar limit's
/// fixed window is the one containing `now` (see
/// [`crate::limits::Limit::rule_at`]), and `enforce: false` is the
/// engine's shadow action. Items normally agree with their limit's rule;
/// only calendar limits and fallback limits standing in for shadow ones
/// need a copy.
fn rule<'a>(item: &'a Item<'_>, now: Nanos) -> Cow<'a, Rule> {
    let mut rule = item.limit.rule_at(now);
    if item.enforce != (rule.action != Action::Shadow) {
        rule.to_mut().action = if item.enforce {
            Action::Reject
        } else {
            Action::Shadow
        };
    }
    rule
}

/// The engine's claim for `item` under `rule`.
fn claim<'a>(item: &'a Item<'_>, rule: &'a Rule) -> Claim<'a> {
    Claim {
        slot: Slot {
            rule_index: item.limit.id,
            rule,
            key: &item.key,
        },
        cost: item.cost,
    }
}

impl MemoryBackend {
    /// Checks and consumes at `now` (default: the system clock); see [`super::Store`].
    pub fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<Vec<Outcome>, StorageError> {
        self.decide(items, now.unwrap_or_else(system_now))
    }

    /// Gives back each item's cost at `now` (default: the system clock).
    pub fn refund(&self, items: &[Item<'_>], now: Option<Nanos>) -> Result<(), StorageError> {
        let now = now.unwrap_or_else(system_now);
        Ok(with_claims(items, now, |claims| {
            self.with_shards(
                claims,
                |store| refund_claims(store, claims, now),
                |locked| refund_claims(locked, claims, now),
            )
        })?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, DescriptorFile, DomainConfig, Problems};
    use crate::limits::{Limit, Limits};

    fn limits() -> Limits {
        let file: DescriptorFile = serde_norway::from_str(
            "domain: d
descriptors:
  - {key: wide, rate_limit: {unit: hour, requests_per_unit: 100}}
  - {key: narrow, rate_limit: {unit: hour, requests_per_unit: 1}}
",
        )
        .unwrap();
        let domain = DomainConfig {
            name: file.domain,
            descriptors: file.descriptors,
            ..DomainConfig::default()
        };
        let mut problems = Problems::default();
        let limits = Limits::build(&[("d".into(), domain)], BackendKind::Memory, &mut problems);
        assert!(problems.is_empty());
        limits
    }

    fn item<'a>(limit: &'a Limit, key: &str) -> Item<'a> {
        Item {
            limit,
            key: key.to_owned(),
            cost: 1,
            enforce: true,
        }
    }

    #[test]
    fn a_small_bound_keeps_one_shard_and_a_large_one_splits() {
        assert_eq!(MemoryBackend::new(100).shards.len(), 1);
        assert_eq!(MemoryBackend::new(2 * MIN_KEYS_PER_SHARD).shards.len(), 2);
        assert!(MemoryBackend::new(1_000_000).shards.len() >= 4);
    }

    #[test]
    fn a_decision_over_keys_of_several_shards_is_all_or_nothing() {
        let limits = limits();
        let (wide, narrow) = (limits.limit(0).unwrap(), limits.limit(1).unwrap());
        let backend = MemoryBackend::new(1_000_000);
        // Keys until they span at least two shards.
        let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        let shards: std::collections::HashSet<usize> =
            keys.iter().map(|k| backend.shard_of(k)).collect();
        assert!(shards.len() > 1);
        let now = Nanos(1_000_000_000);
        let spent = backend.decide(&[item(narrow, "spent")], now).unwrap();
        assert!(spent[0].allowed);

        // Every wide key, then the spent narrow key: refused as a whole.
        let mut request: Vec<Item<'_>> = keys.iter().map(|k| item(wide, k)).collect();
        request.push(item(narrow, "spent"));
        let refused = backend.decide(&request, now).unwrap();
        assert!(!refused.last().unwrap().allowed);
        for key in &keys {
            let alone = backend.decide(&[item(wide, key)], now).unwrap();
            assert_eq!(
                alone[0].remaining, 99,
                "{key}: the refused request took nothing"
            );
        }

        // Without the spent key, every wide key is charged, in its own shard.
        request.pop();
        let allowed = backend.decide(&request, now).unwrap();
        assert!(allowed.iter().all(|o| o.allowed && o.remaining == 98));
        backend.refund(&request, Some(now)).unwrap();
        let after = backend.decide(&request, now).unwrap();
        assert!(
            after.iter().all(|o| o.remaining == 98),
            "refunds reach every shard"
        );
    }
}
