//! Counters in this process, over core's bounded [`MemoryStore`] and its
//! engine (`decide_claims`), so the server decides exactly as the filter.

use std::borrow::Cow;
use std::sync::Mutex;

use sluice_core::algorithm::Outcome;
use sluice_core::engine::{decide_claims, refund_claims, Claim};
use sluice_core::policy::{Action, Rule};
use sluice_core::store::{MemoryStore, Slot};
use sluice_core::time::{Nanos, Span};

use super::{system_now, Item, StorageError};

/// The embedded backend: exact, bounded in keys per limit, not shared
/// between processes.
#[derive(Debug)]
pub struct MemoryBackend {
    // One lock: a decision is a few hundred nanoseconds of arithmetic, far
    // below what sharding would save at this server's request rates.
    store: Mutex<MemoryStore>,
}

impl MemoryBackend {
    /// A backend keeping at most `max_keys` keys per limit; at the bound,
    /// keys back to a full allowance go first (see [`MemoryStore`]).
    pub fn new(max_keys: usize) -> MemoryBackend {
        MemoryBackend {
            store: Mutex::new(MemoryStore::new(max_keys)),
        }
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut MemoryStore) -> T) -> T {
        // A panic elsewhere while holding the lock cannot leave the store
        // inconsistent (every operation is a load or an insert), so a
        // poisoned lock is still usable.
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut store)
    }

    /// The all-or-nothing decision, under the lock.
    pub fn decide(&self, items: &[Item<'_>], now: Nanos) -> Result<Vec<Outcome>, StorageError> {
        let rules = rules(items, now);
        let claims = claims(items, &rules);
        let verdict = self.with_store(|store| decide_claims(store, &claims, now, Span::ZERO))?;
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

/// Each item's rule at `now`, as the engine must see it: a calendar
/// limit's fixed window is the one containing `now` (see
/// [`crate::limits::Limit::rule_at`]), and `enforce: false` is the
/// engine's shadow action. Items normally agree with their limit's rule;
/// only calendar limits and fallback limits standing in for shadow ones
/// need a copy.
fn rules<'a>(items: &'a [Item<'_>], now: Nanos) -> Vec<Cow<'a, Rule>> {
    items
        .iter()
        .map(|it| {
            let mut rule = it.limit.rule_at(now);
            if it.enforce != (rule.action != Action::Shadow) {
                rule.to_mut().action = if it.enforce {
                    Action::Reject
                } else {
                    Action::Shadow
                };
            }
            rule
        })
        .collect()
}

fn claims<'a>(items: &'a [Item<'_>], rules: &'a [Cow<'a, Rule>]) -> Vec<Claim<'a>> {
    items
        .iter()
        .zip(rules)
        .map(|(it, rule)| Claim {
            slot: Slot {
                rule_index: it.limit.id,
                rule,
                key: &it.key,
            },
            cost: it.cost,
        })
        .collect()
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
        let rules = rules(items, now);
        let claims = claims(items, &rules);
        Ok(self.with_store(|store| refund_claims(store, &claims, now))?)
    }
}
