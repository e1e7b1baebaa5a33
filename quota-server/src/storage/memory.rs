//! Counters in this process, over core's bounded [`MemoryStore`].

use std::sync::Mutex;

use sluice_core::algorithm::Outcome;
use sluice_core::store::{Loaded, MemoryStore, Slot, StateStore};
use sluice_core::time::Nanos;

use super::{system_now, Backend, Item, StorageError};

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
    pub fn decide(&self, items: &[Item<'_>], now: Nanos) -> Vec<Outcome> {
        self.with_store(|store| {
            let slots: Vec<Slot<'_>> = items.iter().map(slot).collect();
            let mut loaded: Vec<Loaded<Option<String>>> = Vec::with_capacity(items.len());
            for s in &slots {
                // MemoryStore never fails to load.
                if let Ok(l) = store.load(*s, now) {
                    loaded.push(l);
                }
            }
            let mut outcomes: Vec<Outcome> = items
                .iter()
                .zip(loaded.iter_mut())
                .map(|(it, l)| it.limit.rule.limiter.peek(&mut l.state, now, it.cost))
                .collect();
            let admitted = items
                .iter()
                .zip(&outcomes)
                .all(|(it, o)| o.allowed || !it.enforce);
            for (i, (s, mut l)) in slots.iter().zip(loaded).enumerate() {
                if admitted && outcomes[i].allowed {
                    outcomes[i] = s.rule.limiter.check(&mut l.state, now, items[i].cost);
                    let _ = store.save(*s, l.state, l.version, now);
                } else {
                    store.release(*s, l.state, l.version, now);
                }
            }
            outcomes
        })
    }
}

fn slot<'a>(item: &'a Item<'_>) -> Slot<'a> {
    Slot {
        rule_index: item.limit.id,
        rule: &item.limit.rule,
        key: &item.key,
    }
}

impl Backend for MemoryBackend {
    async fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<Vec<Outcome>, StorageError> {
        Ok(self.decide(items, now.unwrap_or_else(system_now)))
    }

    async fn refund(&self, items: &[Item<'_>], now: Option<Nanos>) -> Result<(), StorageError> {
        let now = now.unwrap_or_else(system_now);
        self.with_store(|store| {
            for it in items {
                let s = slot(it);
                if let Ok(mut l) = store.load(s, now) {
                    it.limit.rule.limiter.refund(&mut l.state, now, it.cost);
                    let _ = store.save(s, l.state, l.version, now);
                }
            }
        });
        Ok(())
    }
}
