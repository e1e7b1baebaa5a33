//! Bounded stores under a flood of made-up keys: a key that is limited
//! never gets a fresh allowance because other keys arrived, in either
//! store (Envoy's shared-data slots, the quota server's memory).

use proptest::prelude::*;
use sluice_core::engine::{decide_keys, Costs};
use sluice_core::policy::Policy;
use sluice_core::store::{hash, InProcessShared, MemoryStore, Seed, SlotStore, StateStore, PROBES};
use sluice_core::time::{Nanos, Span};

/// Helpers (test code: they may unwrap).
#[cfg(test)]
mod support {
    use super::*;

    pub const SEC: u64 = 1_000_000_000;
    /// Well into a fixed window, so no window rolls over during a test.
    pub const START: Nanos = Nanos(3_600 * SEC * 500_000);

    pub fn policy(max_keys: usize, extra: &str) -> Policy {
        Policy::from_json(&format!(
            r#"{{"rules":[{{"name":"r","key":["header:k"],"limit":{{"count":5,"per":"1h"}},"algorithm":"fixed_window"}}],"max_keys":{max_keys}{extra}}}"#
        ))
        .unwrap()
    }

    /// Asks once for `key` at `now`: whether it was allowed.
    pub fn ask(p: &Policy, store: &mut impl StateStore, key: &str, now: Nanos) -> bool {
        let keys = [(0usize, key.to_string())];
        decide_keys(p, store, &keys, &Costs::default(), now, Span::ZERO)
            .unwrap()
            .is_allowed()
    }

    /// Exhausts `key`, then sends `flood` distinct new keys (each asking
    /// twice), then returns how many more times `key` is allowed.
    pub fn allowed_after_flood(
        p: &Policy,
        store: &mut impl StateStore,
        key: &str,
        flood: impl IntoIterator<Item = String>,
    ) -> usize {
        let mut now = START;
        let mut allowed = 0;
        for _ in 0..10 {
            allowed += usize::from(ask(p, store, key, now));
        }
        assert_eq!(allowed, 5, "the victim gets its limit first");
        for other in flood {
            now = now.plus(Span::from_millis(1));
            ask(p, store, &other, now);
            ask(p, store, &other, now);
        }
        (0..10)
            .filter(|_| ask(p, store, key, now.plus(Span::from_millis(1))))
            .count()
    }

    pub fn slot_store<'a>(
        shared: &'a InProcessShared,
        p: &Policy,
        seed: Seed,
    ) -> SlotStore<&'a InProcessShared> {
        let mut store = SlotStore::new(shared, p, seed);
        store.prepare().unwrap();
        store
    }

    /// Fills a tiny table with limited keys, then counts what `new` fresh
    /// keys get in total: with every slot protected, new keys share one
    /// counter with the rule's limit.
    pub fn allowed_to_new_keys_when_full(
        p: &Policy,
        store: &mut impl StateStore,
        residents: usize,
        new: usize,
    ) -> usize {
        let now = START;
        for i in 0..residents {
            let key = format!("resident-{i}");
            while ask(p, store, &key, now) {}
        }
        (0..new)
            .filter(|i| ask(p, store, &format!("newcomer-{i}"), now))
            .count()
    }

    /// Object-safe access to either store for the property test.
    pub trait Probe {
        fn ask(&mut self, p: &Policy, key: &str, now: Nanos) -> bool;
    }

    impl<S: StateStore> Probe for S {
        fn ask(&mut self, p: &Policy, key: &str, now: Nanos) -> bool {
            ask(p, self, key, now)
        }
    }

    #[test]
    pub fn new_keys_are_refused_when_full_if_configured_and_counted() {
        let p = policy(8, r#","when_keys_full":"refuse""#);
        let shared = InProcessShared::default();
        let mut store = slot_store(&shared, &p, [7; 16]);
        assert_eq!(allowed_to_new_keys_when_full(&p, &mut store, 64, 100), 0);
        // Every newcomer, and the residents that found no slot of their own.
        assert!(store.stats().refused >= 100);
        assert_eq!(store.stats().overflowed, 0);
        let mut memory = MemoryStore::with_when_full(p.max_keys, p.when_full);
        assert_eq!(allowed_to_new_keys_when_full(&p, &mut memory, 64, 100), 0);
        assert!(memory.evictions().refused >= 100);
        assert_eq!(memory.evictions().overflowed, 0);
    }

    #[test]
    pub fn overflow_use_is_counted_and_room_comes_back_when_limits_end() {
        let p = policy(8, "");
        let mut memory = MemoryStore::new(p.max_keys);
        assert_eq!(allowed_to_new_keys_when_full(&p, &mut memory, 8, 100), 5);
        assert_eq!(memory.evictions().overflowed, 100);
        assert_eq!(memory.evictions().live, 0, "no limited key was dropped");
        // The next window: every resident is fresh again, a new key gets its own budget.
        let later = START.plus(Span::from_secs(3_600));
        let allowed = (0..6)
            .filter(|_| ask(&p, &mut memory, "late", later))
            .count();
        assert_eq!(allowed, 5);
    }
}

use support::*;

#[test]
fn a_flood_of_new_keys_does_not_reset_a_limited_key_in_slots() {
    let p = policy(64, "");
    let shared = InProcessShared::default();
    let mut store = slot_store(&shared, &p, [0x5e; 16]);
    let flood = (0..2_000).map(|i| format!("flood-{i}"));
    assert_eq!(allowed_after_flood(&p, &mut store, "victim", flood), 0);
}

#[test]
fn a_flood_of_new_keys_does_not_reset_a_limited_key_in_memory() {
    let p = policy(64, "");
    let mut store = MemoryStore::new(p.max_keys);
    let flood = (0..2_000).map(|i| format!("flood-{i}"));
    assert_eq!(allowed_after_flood(&p, &mut store, "victim", flood), 0);
}

#[test]
fn keys_crafted_to_share_the_victims_slots_cannot_evict_it() {
    // The attacker knows the seed (the worst case: say it leaked).
    let seed: Seed = [0x5e; 16];
    let p = policy(1_024, "");
    let slots = p.max_keys as u64;
    let home = hash(&seed, b"victim") % slots;
    let crafted: Vec<String> = (0..)
        .map(|i| format!("crafted-{i}"))
        .filter(|k| {
            let h = hash(&seed, k.as_bytes()) % slots;
            (h + slots - home) % slots < PROBES
        })
        .take(20)
        .collect();
    let shared = InProcessShared::default();
    let mut store = slot_store(&shared, &p, seed);
    assert_eq!(allowed_after_flood(&p, &mut store, "victim", crafted), 0);
}

#[test]
fn new_keys_share_an_overflow_budget_when_every_slot_is_limited() {
    let p = policy(8, "");
    let shared = InProcessShared::default();
    let mut store = slot_store(&shared, &p, [7; 16]);
    // Far more residents than slots: every slot ends up holding a limited
    // key (and residents without a slot drain the overflow budget).
    assert!(allowed_to_new_keys_when_full(&p, &mut store, 64, 100) <= 5);
    // Exactly as many residents as keys: newcomers share one fresh budget.
    let mut memory = MemoryStore::new(p.max_keys);
    assert_eq!(allowed_to_new_keys_when_full(&p, &mut memory, 8, 100), 5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// However other keys arrive (new, repeated, many or few) and whatever
    /// the table size, a key that used up its limit is refused for the
    /// rest of its window, in both stores.
    #[test]
    fn an_exhausted_key_stays_refused_until_its_window_ends(
        max_keys in 1usize..32,
        seed in any::<[u8; 16]>(),
        traffic in proptest::collection::vec(0u16..300, 1..400),
    ) {
        let p = policy(max_keys, "");
        let shared = InProcessShared::default();
        let mut slots = slot_store(&shared, &p, seed);
        let mut memory = MemoryStore::new(max_keys);
        for store in [&mut slots as &mut dyn Probe, &mut memory] {
            let mut now = START;
            let allowed = (0..6).filter(|_| store.ask(&p, "victim", now)).count();
            prop_assert_eq!(allowed, 5);
            for k in &traffic {
                now = now.plus(Span::from_millis(1));
                // Key 0 is the victim coming back now and then.
                let key = if *k == 0 { "victim".to_string() } else { format!("k{k}") };
                let allowed = store.ask(&p, &key, now);
                prop_assert!(!(allowed && key == "victim"), "the victim regained budget");
            }
            prop_assert!(!store.ask(&p, "victim", now));
        }
    }
}
