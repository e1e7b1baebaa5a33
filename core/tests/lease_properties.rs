//! Lease cells under interleavings: workers read a cell, change it and
//! write it back by compare-and-swap at any point between the service's
//! retires and refills. Whatever the order, no lease admits more than it
//! was granted, and a retired lease's used count is exactly what workers
//! admitted from it.

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use proptest::prelude::*;
use sluice_core::lease::cell::{self, Cell, Grant, Take, Taken};
use sluice_core::store::{InProcessShared, SharedBytes, WriteOutcome};
use sluice_core::time::{Nanos, Span};

const NAME: &str = "sluice/lease/r/0";
const OWNER: u64 = 42;
const WORKERS: usize = 3;

#[derive(Clone, Debug)]
enum Step {
    /// A worker reads the cell (its snapshot may go stale).
    Read(usize),
    /// A worker takes `cost` from its snapshot and tries to write it.
    Take(usize, u64),
    /// A worker gives back its oldest take (read, change, write at once).
    GiveBack(usize),
    /// The service retires a half.
    Retire(usize),
    /// The service refills a half it retired.
    Install(usize, u64),
    /// Time passes.
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..WORKERS).prop_map(Step::Read),
        4 => (0..WORKERS, 1..4u64).prop_map(|(w, c)| Step::Take(w, c)),
        1 => (0..WORKERS).prop_map(Step::GiveBack),
        1 => (0..2usize).prop_map(Step::Retire),
        1 => (0..2usize, 0..8u64).prop_map(|(h, p)| Step::Install(h, p)),
        1 => (1..300u64).prop_map(Step::Tick),
    ]
}

#[derive(Default)]
struct Worker {
    snapshot: Option<(Cell, u32)>,
    taken: Vec<Taken>,
}

proptest! {
    #[test]
    fn leases_never_admit_more_than_granted(steps in prop::collection::vec(step(), 1..200)) {
        let shared = InProcessShared::default();
        let mut backend = &shared;
        assert!(cell::claim(&mut backend, NAME, OWNER).unwrap());
        let mut now = Nanos(1_000);
        let mut workers: Vec<Worker> = (0..WORKERS).map(|_| Worker::default()).collect();
        // Per (half, generation): granted, and net permits workers admitted.
        let mut granted: HashMap<(usize, u32), u64> = HashMap::new();
        let mut admitted: HashMap<(usize, u32), u64> = HashMap::new();
        // Per (half, generation): the used count its retire reported.
        let mut retired: HashMap<(usize, u32), u64> = HashMap::new();
        let mut bytes = Vec::new();
        for step in steps {
            match step {
                Step::Read(w) => workers[w].snapshot = cell::load(&backend, NAME).unwrap(),
                Step::Take(w, cost) => {
                    let Some((mut c, cas)) = workers[w].snapshot.take() else { continue };
                    let outcome = c.take(cost, now);
                    c.encode(&mut bytes);
                    if backend.set(NAME, &bytes, cas).unwrap() == WriteOutcome::Written {
                        if let Take::Taken(t) = outcome {
                            *admitted.entry((t.half, t.generation)).or_default() += t.cost;
                            workers[w].taken.push(t);
                        }
                    }
                }
                Step::GiveBack(w) => {
                    if workers[w].taken.is_empty() { continue }
                    let t = workers[w].taken.remove(0);
                    if cell::give_back(&mut backend, NAME, OWNER, &t).unwrap() {
                        *admitted.get_mut(&(t.half, t.generation)).unwrap() -= t.cost;
                    }
                }
                Step::Retire(h) => {
                    let (r, c) = cell::retire(&mut backend, NAME, OWNER, h).unwrap().unwrap();
                    let generation = c.halves[h].generation;
                    // A half retired twice reports the same final count.
                    let first = *retired.entry((h, generation)).or_insert(r.used);
                    prop_assert_eq!(first, r.used);
                    prop_assert!(r.used <= r.held);
                }
                Step::Install(h, permits) => {
                    let (c, _) = cell::load(&backend, NAME).unwrap().unwrap();
                    if c.halves[h].open { continue } // only a retired half is refilled
                    let grant = Grant {
                        permits,
                        expires_at: now.plus(Span(500)),
                        remaining: 10,
                        ..Grant::default()
                    };
                    assert!(cell::install(&mut backend, NAME, OWNER, h, &grant).unwrap());
                    let (c, _) = cell::load(&backend, NAME).unwrap().unwrap();
                    granted.insert((h, c.halves[h].generation), permits);
                }
                Step::Tick(d) => now = now.plus(Span(d)),
            }
            for (lease, &n) in &admitted {
                prop_assert!(n <= granted.get(lease).copied().unwrap_or(0),
                    "lease {:?} admitted {} of {:?}", lease, n, granted.get(lease));
            }
        }
        // Every retired lease reported exactly what workers admitted from it.
        for (lease, used) in retired {
            prop_assert_eq!(used, admitted.get(&lease).copied().unwrap_or(0), "lease {:?}", lease);
        }
    }
}
