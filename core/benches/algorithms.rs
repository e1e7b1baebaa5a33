//! `make bench-core`: nanoseconds per rate-limit decision, Sluice against
//! the `governor` crate, measured in the same run on the same workloads.
//! `scripts/bench-core-ratio.py` prints the table and the ratio afterwards.
//!
//! # Workloads
//!
//! - `hot_key`: the same key on every call with a quota of 1e9 per second
//!   (burst 1e9), so every call takes the admit path on both sides. The
//!   sliding window log gets 10,000 per ms instead (config caps its count
//!   at 10,000; that is 1e10/s), also admitting every call.
//! - `distinct_1m`: 1,000,000 distinct keys (`10.a.b.c` strings built once
//!   before timing; no allocation for keys in the timed loop), called
//!   round-robin with the same quotas. One untimed pass inserts every key
//!   first, so the timed loop is the steady state: one existing, cache-cold
//!   key per call.
//! - `hot_key_denied` (for information): one key, 1 per hour; after the
//!   first call every call is denied.
//!
//! Every call's decision is checked against the expected one (counted
//! in the timed loop, asserted after it); after each benchmark one more
//! call checks that nothing was evicted (`max_keys` is 2,000,000) and, for `distinct_1m`,
//! that every key is held.
//!
//! # Time: the fairest setup
//!
//! Sluice's core never reads a clock: the host passes `Nanos` in. Governor
//! reads the clock it is built with on every call. To compare the limiters
//! and not the clocks, both sides get the same simulated time from the same
//! driver ([`Workload::step`]), which moves 1 ms every 1,024 calls. Sluice
//! receives it as an argument (starting at a Unix-epoch instant, as the
//! filter uses); governor reads it from its `FakeRelativeClock` (starting
//! at 0), whose `now()` is one relaxed atomic load and which is advanced (a
//! CAS) only on those ticks. Time moves in whole ms so the sliding window
//! log holds one merged entry per tick rather than one per call.
//! For information, governor with its default clock (`QuantaClock`, a TSC
//! read per call) is measured too (`*_quanta_clock`): that is what
//! `RateLimiter::keyed(quota)` gives a governor user.
//!
//! # What each row does per call
//!
//! - `sluice_checkout/<algorithm>`: [`MemoryStore`] through the
//!   [`StateStore`] trait: `load` (removes the entry), `Limiter::check`,
//!   then `save` (re-inserts it) when allowed or `release` when denied.
//!   Two hash-map operations per call. The engine adds a `peek` before the
//!   check and per-request `Vec`s for multi-rule atomicity; that is
//!   `sluice_engine/gcra` (hot key only, for information:
//!   `engine::decide_keys` with one rule).
//! - `sluice_inplace/<algorithm>`: [`StateStore::check`], the store's
//!   one-step keyed decision, which the engine uses for a single rule; for
//!   `MemoryStore` it is [`MemoryStore::acquire`]: one hash lookup and the
//!   check on the state in place.
//! - `governor_keyed_fake_clock_foldhash`: `check_key(&String)` on
//!   governor's keyed limiter with its default store (`DashMap`), given
//!   the hasher Sluice's `MemoryStore` uses (hashbrown's default,
//!   foldhash). `_siphash` (for information) keeps governor's default
//!   hasher (`RandomState`, SipHash-1-3), which a governor user gets.
//! - `governor_direct_*` (for information): the non-keyed limiter, `check()`.
//!
//! Production paths (for information, hot key, GCRA):
//!
//! - `sluice_engine_slot_store/gcra`: what the Envoy filter runs per
//!   request: `engine::decide_keys` over a [`SlotStore`], whose
//!   `StateStore::check` reads the key's slot, decodes it, decides and
//!   writes it back by compare-and-swap. The shared bytes are
//!   [`InProcessShared`], the in-process double of Envoy's shared data: a
//!   map that copies the value on every get and set, where Envoy makes a
//!   host call.
//! - `sluice_engine_sharded_mutex/gcra`: the quota server's in-memory
//!   path as core sees it: the key's shard picked by SipHash (the
//!   server's `RandomState`), that shard's `Mutex<MemoryStore>` locked
//!   (uncontended) and `engine::decide_claims_unlisted` over it. Without the
//!   server's request parsing and reply.
//!
//! # The headline: the same work on both sides
//!
//! Governor implements GCRA only; `core_vs_governor_ratio` is
//! `hot_key/sluice_inplace/gcra` over
//! `hot_key/governor_keyed_fake_clock_foldhash` (criterion medians): both
//! hash the same `String` key with foldhash, look it up in a hash map,
//! take one GCRA step on the same simulated time and answer allowed or
//! denied; every answer is checked against the expected one (a wrong
//! answer fails the bench). The checkout path's ratio and the SipHash
//! governor's are printed beside it, for information.
//!
//! # Not the same thing
//!
//! Governor's keyed store is concurrent: a sharded `DashMap` (a shard read
//! lock) and an atomic compare-and-swap per call, usable from many threads
//! at once through `&self`. Sluice's `MemoryStore` is single-owner (`&mut
//! self`, no synchronisation); the quota server shards it behind mutexes
//! (`sluice_engine_sharded_mutex`), and the Envoy filter shares counters
//! through a `SlotStore` (`sluice_engine_slot_store`). Everything runs on
//! one thread, so governor's synchronisation is uncontended but still
//! paid. Sluice's `Outcome` also carries more (remaining, reset and retry
//! times) than governor's `Result`.

// Benchmark setup: a failure to build the fixture should abort loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use governor::clock::{Clock, FakeRelativeClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota as GovQuota, RateLimiter};
use sluice_core::algorithm::AlgorithmKind;
use sluice_core::engine;
use sluice_core::policy::{Policy, Rule};
use sluice_core::store::{InProcessShared, MemoryStore, Slot, SlotStore, StateStore};
use sluice_core::time::{Nanos, Span};

/// Distinct keys in the `distinct_1m` workload.
const DISTINCT_KEYS: usize = 1_000_000;
/// Per-rule key bound of the `MemoryStore`s: above `DISTINCT_KEYS`, so
/// nothing is evicted.
const MAX_KEYS: usize = 2 * DISTINCT_KEYS;
/// The policies' `max_keys`, which sizes only the hot-key `SlotStore`
/// table: config bounds it by what a `SlotStore` in shared data could
/// take, which the sliding log's large state would exceed at `MAX_KEYS`.
const POLICY_MAX_KEYS: usize = 1000;
/// Calls between two ticks of the simulated clock (a power of two).
const CALLS_PER_TICK: u64 = 1024;
const _: () = assert!(CALLS_PER_TICK.is_power_of_two());
/// How far the simulated clock moves on a tick.
const TICK: Span = Span::MILLISECOND;
/// Where Sluice's simulated time starts: a Unix-epoch instant, as the filter uses.
const SLUICE_EPOCH: Nanos = Nanos(1_750_000_000 * 1_000_000_000);
/// The admit-path quota: 1e9 per second, burst 1e9.
const BIG_COUNT: u32 = 1_000_000_000;

/// Same keys, same time, same bookkeeping for every contestant.
struct Workload<'k> {
    keys: &'k [String],
    next: usize,
    calls: u64,
    now: Nanos,
    /// The decision every call must get.
    expect_allowed: bool,
    /// Calls that got another decision.
    wrong: u64,
}

impl<'k> Workload<'k> {
    fn new(keys: &'k [String], expect: Expect) -> Self {
        Workload {
            keys,
            next: 0,
            calls: 0,
            now: SLUICE_EPOCH,
            expect_allowed: expect == Expect::Allowed,
            wrong: 0,
        }
    }

    /// Counts a decision that is not the expected one.
    #[inline(always)]
    fn tally(&mut self, allowed: bool) -> bool {
        self.wrong += u64::from(allowed != self.expect_allowed);
        allowed
    }

    /// Fails the bench if any call got an unexpected decision.
    fn assert_all_expected(&self, id: &str) {
        assert_eq!(
            self.wrong, 0,
            "{id}: {} of {} calls decided wrongly",
            self.wrong, self.calls
        );
    }

    /// The next key and time; `true` when the clock ticked on this call.
    #[inline(always)]
    fn step(&mut self) -> (&'k String, Nanos, bool) {
        let key = &self.keys[self.next];
        self.next += 1;
        if self.next == self.keys.len() {
            self.next = 0;
        }
        self.calls += 1;
        let ticked = self.calls & (CALLS_PER_TICK - 1) == 0;
        if ticked {
            self.now = self.now.plus(TICK);
        }
        (key, self.now, ticked)
    }
}

/// What the decisions of a workload are expected to be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Denied,
}

/// One case: a key set, a quota and the expected decisions.
struct Case<'k> {
    group: &'static str,
    keys: &'k [String],
    /// Sluice limit as config JSON (`{"count": .., "per": ..}`).
    limit: &'static str,
    /// The same for the sliding window log, whose config caps `count`.
    log_limit: &'static str,
    governor: GovQuota,
    expect: Expect,
    /// Insert every key before timing (the distinct-keys case).
    prefill: bool,
}

fn policy(kind: AlgorithmKind, limit: &str) -> Policy {
    let json = format!(
        r#"{{"rules": [{{"name": "bench", "limit": {limit}, "algorithm": "{}"}}],
            "max_keys": {POLICY_MAX_KEYS}}}"#,
        kind.name()
    );
    Policy::from_json(&json).expect("bench policy is valid")
}

/// `load` → `check` → `save` (allowed) or `release` (denied), as the engine does.
#[inline(always)]
fn checkout(store: &mut MemoryStore, rule: &Rule, key: &str, now: Nanos) -> bool {
    let slot = Slot {
        rule_index: 0,
        rule,
        key,
    };
    let Ok(loaded) = store.load(slot, now) else {
        return false;
    };
    let mut state = loaded.state;
    let outcome = rule.limiter.check(&mut state, now, rule.cost);
    if outcome.allowed {
        let _ = store.save(slot, state, loaded.version, now);
    } else {
        store.release(slot, state, loaded.version, now);
    }
    outcome.allowed
}

#[inline(always)]
fn inplace(store: &mut MemoryStore, rule: &Rule, key: &str, now: Nanos) -> bool {
    let slot = Slot {
        rule_index: 0,
        rule,
        key,
    };
    matches!(StateStore::check(store, slot, 1, now), Ok(Some((o, _))) if o.allowed)
}

/// Untimed calls before measuring: every key once for a prefilled case
/// (the steady state), else one call (a denied case's first call is its
/// only allowed one). Then the count of wrong decisions starts over.
fn prime<'k>(
    case: &Case<'_>,
    w: &mut Workload<'k>,
    mut call: impl FnMut(&mut Workload<'k>) -> bool,
) {
    let calls = if case.prefill { case.keys.len() } else { 1 };
    for _ in 0..calls {
        call(w);
    }
    w.wrong = 0;
}

/// Measures `call` as `id`, checking every decision it makes.
fn measure<'k>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &Case<'k>,
    id: &str,
    mut call: impl FnMut(&mut Workload<'k>) -> bool,
) {
    let mut w = Workload::new(case.keys, case.expect);
    prime(case, &mut w, &mut call);
    g.bench_function(id, |b| {
        b.iter(|| {
            let allowed = call(&mut w);
            black_box(w.tally(allowed))
        })
    });
    let allowed = call(&mut w);
    w.tally(allowed);
    w.assert_all_expected(&format!("{}/{id}", case.group));
}

fn check_store(case: &Case<'_>, id: &str, store: &MemoryStore) {
    assert_eq!(
        store.evictions().live + store.evictions().fresh,
        0,
        "{id}: evicted"
    );
    if case.prefill {
        assert_eq!(store.len(0), case.keys.len(), "{id}: keys held");
    }
}

fn sluice_rows(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    for kind in AlgorithmKind::ALL {
        let limit = if kind == AlgorithmKind::SlidingWindowLog {
            case.log_limit
        } else {
            case.limit
        };
        let policy = policy(kind, limit);
        let rule = &policy.rules[0];

        let id = format!("sluice_checkout/{}", kind.name());
        let mut store = MemoryStore::new(MAX_KEYS);
        measure(g, case, &id, |w| {
            let (key, now, _) = w.step();
            checkout(&mut store, rule, black_box(key), now)
        });
        check_store(case, &id, &store);
        drop(store);

        let id = format!("sluice_inplace/{}", kind.name());
        let mut store = MemoryStore::new(MAX_KEYS);
        measure(g, case, &id, |w| {
            let (key, now, _) = w.step();
            inplace(&mut store, rule, black_box(key), now)
        });
        check_store(case, &id, &store);
    }
}

/// Governor keyed on a fake clock driven by the workload; `hasher` picks the map's hasher.
fn governor_keyed_fake<S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &Case<'_>,
    id: &str,
    hasher: S,
) where
    S: BuildHasher + Default + Clone,
{
    let clock = FakeRelativeClock::default();
    let limiter: RateLimiter<
        String,
        DashMapStateStore<String, S>,
        FakeRelativeClock,
        NoOpMiddleware<<FakeRelativeClock as Clock>::Instant>,
    > = RateLimiter::dashmap_with_clock_and_hasher(case.governor, clock.clone(), hasher);
    let tick = Duration::from_nanos(TICK.as_nanos());
    measure(g, case, id, |w| {
        let (key, _, ticked) = w.step();
        if ticked {
            clock.advance(tick);
        }
        limiter.check_key(black_box(key)).is_ok()
    });
    if case.prefill {
        assert_eq!(limiter.len(), case.keys.len(), "{id}: keys held");
    }
}

/// Governor's non-keyed limiter on a fake clock driven by the workload.
fn governor_direct_fake(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    let clock = FakeRelativeClock::default();
    let limiter = RateLimiter::direct_with_clock(case.governor, clock.clone());
    let tick = Duration::from_nanos(TICK.as_nanos());
    measure(g, case, "governor_direct_fake_clock", |w| {
        let (_, _, ticked) = w.step();
        if ticked {
            clock.advance(tick);
        }
        limiter.check().is_ok()
    });
}

/// Governor with its default clock (`QuantaClock`), keyed and direct: for information.
fn governor_quanta(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    let keyed = RateLimiter::keyed(case.governor);
    measure(g, case, "governor_keyed_quanta_clock", |w| {
        let (key, _, _) = w.step();
        keyed.check_key(black_box(key)).is_ok()
    });
    let direct = RateLimiter::direct(case.governor);
    measure(g, case, "governor_direct_quanta_clock", |w| {
        let _ = w.step();
        direct.check().is_ok()
    });
}

/// The whole engine decision for one rule on the hot key over a
/// single-owner `MemoryStore` (information).
fn sluice_engine(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    let policy = policy(AlgorithmKind::Gcra, case.limit);
    engine_on_hot_key(
        g,
        case,
        "sluice_engine/gcra",
        &policy,
        MemoryStore::new(MAX_KEYS),
    );
}

/// The Envoy filter's path: the engine over a `SlotStore` on the
/// in-process double of Envoy's shared data (see the module doc).
fn sluice_engine_slot_store(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    let policy = policy(AlgorithmKind::Gcra, case.limit);
    let shared = InProcessShared::default();
    let seed = 0x5eed_u64;
    let store = SlotStore::open(&shared, &policy, || Some(seed)).unwrap();
    engine_on_hot_key(g, case, "sluice_engine_slot_store/gcra", &policy, store);
}

/// Measures `engine::decide_keys` for the first rule of `policy` on the
/// case's hot key over `store`, as row `id`.
fn engine_on_hot_key<S: StateStore>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &Case<'_>,
    id: &str,
    policy: &Policy,
    mut store: S,
) {
    let keys = [(0usize, case.keys[0].clone())];
    let costs = engine::Costs::default();
    measure(g, case, id, |w| {
        let (_, now, _) = w.step();
        let verdict = engine::decide_keys(
            policy,
            &mut store,
            black_box(&keys),
            &costs,
            now,
            Span::ZERO,
        );
        verdict.unwrap().is_allowed()
    });
}

/// The quota server's in-memory path: a SipHash-picked shard's
/// `Mutex<MemoryStore>` and the engine over it (see the module doc).
fn sluice_engine_sharded_mutex(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    /// The shard count the server picks on a 2-core machine (4 per core).
    const SHARDS: usize = 8;
    let policy = policy(AlgorithmKind::Gcra, case.limit);
    let rule = &policy.rules[0];
    let shards: Vec<Mutex<MemoryStore>> = (0..SHARDS)
        .map(|_| Mutex::new(MemoryStore::new(MAX_KEYS / SHARDS)))
        .collect();
    let hasher = RandomState::new();
    measure(g, case, "sluice_engine_sharded_mutex/gcra", |w| {
        let (key, now, _) = w.step();
        let key = black_box(key.as_str());
        let shard = (hasher.hash_one(key) % SHARDS as u64) as usize;
        let mut store = shards[shard].lock().unwrap();
        let claim = engine::Claim {
            slot: Slot {
                rule_index: 0,
                rule,
                key,
            },
            cost: rule.cost,
        };
        let verdict = engine::decide_claims_unlisted(&mut *store, &[claim], now, Span::ZERO);
        verdict.unwrap().is_allowed()
    });
}

fn big_governor_quota() -> GovQuota {
    GovQuota::per_second(NonZeroU32::new(BIG_COUNT).unwrap())
}

/// Governor keyed with Sluice's hasher (the fair pair) and with its own.
fn governor_rows(g: &mut BenchmarkGroup<'_, WallTime>, case: &Case<'_>) {
    governor_keyed_fake(
        g,
        case,
        "governor_keyed_fake_clock_foldhash",
        hashbrown::DefaultHashBuilder::default(),
    );
    governor_keyed_fake(
        g,
        case,
        "governor_keyed_fake_clock_siphash",
        RandomState::new(),
    );
}

fn benches(c: &mut Criterion) {
    let hot = vec![String::from("203.0.113.7")];
    let distinct: Vec<String> = (0..DISTINCT_KEYS)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    let big_limit = r#"{"count": 1000000000, "per": "1s"}"#;
    // Config caps the log at 10,000 entries: 1e4 per ms (1e10/s) instead.
    let big_log_limit = r#"{"count": 10000, "per": "1ms"}"#;

    let hot_case = Case {
        group: "hot_key",
        keys: &hot,
        limit: big_limit,
        log_limit: big_log_limit,
        governor: big_governor_quota(),
        expect: Expect::Allowed,
        prefill: false,
    };
    let mut g = c.benchmark_group(hot_case.group);
    sluice_rows(&mut g, &hot_case);
    sluice_engine(&mut g, &hot_case);
    sluice_engine_slot_store(&mut g, &hot_case);
    sluice_engine_sharded_mutex(&mut g, &hot_case);
    governor_rows(&mut g, &hot_case);
    governor_direct_fake(&mut g, &hot_case);
    governor_quanta(&mut g, &hot_case);
    g.finish();

    let distinct_case = Case {
        group: "distinct_1m",
        keys: &distinct,
        limit: big_limit,
        log_limit: big_log_limit,
        governor: big_governor_quota(),
        expect: Expect::Allowed,
        prefill: true,
    };
    let mut g = c.benchmark_group(distinct_case.group);
    sluice_rows(&mut g, &distinct_case);
    governor_rows(&mut g, &distinct_case);
    g.finish();

    let denied_case = Case {
        group: "hot_key_denied",
        keys: &hot,
        limit: r#"{"count": 1, "per": "1h"}"#,
        log_limit: r#"{"count": 1, "per": "1h"}"#,
        governor: GovQuota::per_hour(NonZeroU32::MIN),
        expect: Expect::Denied,
        prefill: false,
    };
    let mut g = c.benchmark_group(denied_case.group);
    sluice_rows(&mut g, &denied_case);
    governor_rows(&mut g, &denied_case);
    governor_direct_fake(&mut g, &denied_case);
    g.finish();
}

fn config() -> Criterion {
    // ~50 benchmarks: about 2 s each keeps the run near 2 minutes on 2 cores.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(400))
        .measurement_time(Duration::from_millis(1500))
        .without_plots()
}

criterion_group! {
    name = algorithms;
    config = config();
    targets = benches
}
criterion_main!(algorithms);
