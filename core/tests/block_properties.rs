//! Blocks (`block_duration`) against a model: a key refused by its rule
//! is refused until exactly the block's end, blocked attempts take
//! nothing and never extend it, and both stores (Envoy's shared-data
//! slots, one process's memory) decide alike.

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use sluice_core::algorithm::{AlgorithmKind, Outcome};
use sluice_core::engine::{decide_keys, Costs};
use sluice_core::policy::Policy;
use sluice_core::store::{InProcessShared, MemoryStore, SlotStore, StateStore};
use sluice_core::time::{Nanos, Span};

const MS: u64 = 1_000_000;

fn policy(kind: AlgorithmKind, block_ms: u64) -> Policy {
    Policy::from_json(&format!(
        r#"{{"rules":[{{"name":"b","key":["header:k"],"limit":{{"count":3,"per":"1s"}},"algorithm":"{}","block_duration":"{block_ms}ms"}}]}}"#,
        kind.name()
    ))
    .unwrap()
}

/// The engine's verdict for one request of `key` at `now`: allowed, and
/// the rule's retry-after.
fn ask(p: &Policy, store: &mut impl StateStore, now: Nanos) -> (bool, Span) {
    let v = decide_keys(
        p,
        store,
        &[(0, "k".to_string())],
        &Costs::default(),
        now,
        Span::ZERO,
    )
    .unwrap();
    (v.is_allowed(), v.decisions[0].decision.retry_after)
}

proptest! {
    #[test]
    fn blocks_follow_the_model(
        kind in prop::sample::select(AlgorithmKind::ALL.to_vec()),
        block_ms in 1u64..5_000,
        gaps in prop::collection::vec(0u64..800, 1..80),
    ) {
        let p = policy(kind, block_ms);
        let rule = &p.rules[0];
        let block = Span::from_millis(block_ms);
        let mut memory = MemoryStore::new(8);
        let shared = InProcessShared::default();
        let mut slots = SlotStore::open(&shared, &p, || Some(7)).unwrap();
        let mut state = rule.limiter.fresh_state();
        let mut blocked_until = Nanos::ZERO;
        let mut now = Nanos(1_000 * 1_000 * MS);
        for gap in gaps {
            now = now.plus(Span(gap * MS));
            let expected: Outcome = if now < blocked_until {
                let peek = rule.limiter.peek(&mut state, now, 1);
                peek.blocked_until(blocked_until, now)
            } else {
                let outcome = rule.limiter.check(&mut state, now, 1);
                if outcome.allowed {
                    outcome
                } else {
                    blocked_until = now.plus(block);
                    outcome.blocked_until(blocked_until, now)
                }
            };
            let want = (expected.allowed, expected.retry_after);
            prop_assert_eq!(ask(&p, &mut memory, now), want, "memory at {:?}", now);
            prop_assert_eq!(ask(&p, &mut slots, now), want, "slots at {:?}", now);
            if !expected.allowed {
                prop_assert!(expected.retry_after >= blocked_until.since(now));
            }
        }
    }
}
