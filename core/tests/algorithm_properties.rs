//! Properties every algorithm must keep, checked over random quotas, costs
//! and time sequences through the public `Limiter` interface.

use proptest::prelude::*;
use sluice_core::algorithm::{AlgorithmKind, Limiter, Outcome, Quota, State};
use sluice_core::decision::Decision;
use sluice_core::time::{Nanos, Span};

const MS: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
enum Action {
    Check,
    Peek,
    Refund,
    /// Takes three times the op's cost unconditionally (a debt).
    Charge,
}

/// What a charge op takes: enough to go well beyond any limit.
const CHARGE_FACTOR: u64 = 3;

/// One call: at a time (a step after the previous one, or an absolute time),
/// with a cost.
#[derive(Clone, Copy, Debug)]
struct Op {
    time: u64,
    cost: u64,
    action: Action,
}

/// An admission as seen by the bound checks.
#[derive(Clone, Copy, Debug)]
struct Admission {
    /// The time the caller passed.
    real: u64,
    /// The latest time passed so far: the algorithms' own clock, since
    /// time going back counts as no time passing.
    latest: u64,
    cost: u64,
}

fn quota() -> impl Strategy<Value = Quota> {
    let per = prop_oneof![
        Just(MS),
        Just(3 * MS),
        Just(7 * MS),
        MS..=20 * MS,
        Just(1_000 * MS),
    ];
    (1u64..=10, per, prop::option::of(1u64..=15))
        .prop_filter_map("quota out of range", |(count, per, burst)| {
            Quota::new(count, Span(per), burst).ok()
        })
}

/// Costs biased to small values, the limit and just above it.
fn cost(q: Quota) -> impl Strategy<Value = u64> {
    let top = q.count().max(q.burst());
    prop_oneof![
        6 => 0u64..=2,
        2 => 0..=top + 1,
        1 => Just(q.count()),
        1 => Just(q.burst()),
    ]
}

/// Time steps at the scales that matter: none, about one emission
/// interval, about a window, and exactly a window.
fn step(q: Quota) -> impl Strategy<Value = u64> {
    let per = q.per().as_nanos();
    let interval = per / q.count();
    prop_oneof![
        3 => Just(0u64),
        3 => 0..=2 * interval + 2,
        1 => 0..=2 * per,
        1 => Just(per),
        1 => Just(per - 1),
    ]
}

fn action(with_refunds: bool, with_charges: bool) -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => Just(Action::Check),
        2 => Just(Action::Peek),
        1 => Just(Action::Refund),
        1 => Just(Action::Charge),
    ]
    .prop_filter("action not in this test", move |a| match a {
        Action::Refund => with_refunds,
        Action::Charge => with_charges,
        Action::Check | Action::Peek => true,
    })
}

/// A quota and calls whose `time` are steps (time never goes back); with
/// refunds, charges too.
fn forward(with_refunds: bool) -> impl Strategy<Value = (Quota, Vec<Op>)> {
    forward_with(with_refunds, with_refunds)
}

/// [`forward`], choosing refunds and charges apart.
fn forward_with(with_refunds: bool, with_charges: bool) -> impl Strategy<Value = (Quota, Vec<Op>)> {
    quota().prop_flat_map(move |q| {
        let op = (step(q), cost(q), action(with_refunds, with_charges))
            .prop_map(|(time, cost, action)| Op { time, cost, action });
        (Just(q), prop::collection::vec(op, 1..60))
    })
}

/// A quota and calls at absolute times in any order (time goes back often).
fn shuffled() -> impl Strategy<Value = (Quota, Vec<Op>)> {
    quota().prop_flat_map(|q| {
        let span = 3 * q.per().as_nanos();
        let op = (0..=span, cost(q), action(false, false)).prop_map(|(time, cost, action)| Op {
            time,
            cost,
            action,
        });
        (Just(q), prop::collection::vec(op, 1..60))
    })
}

/// Turns steps into absolute times.
fn absolute(ops: &[Op]) -> Vec<Op> {
    let mut t = 0u64;
    ops.iter()
        .map(|op| {
            t += op.time;
            Op { time: t, ..*op }
        })
        .collect()
}

fn is_bucket(kind: AlgorithmKind) -> bool {
    matches!(
        kind,
        AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket | AlgorithmKind::Gcra
    )
}

/// The most one request may ever take.
fn limit(kind: AlgorithmKind, q: Quota) -> u64 {
    if is_bucket(kind) {
        q.burst()
    } else {
        q.count()
    }
}

/// Runs checks and peeks, returning the admissions.
fn admissions(limiter: &Limiter, ops: &[Op]) -> Vec<Admission> {
    let mut state = limiter.fresh_state();
    let mut latest = 0u64;
    let mut admitted = Vec::new();
    for op in ops {
        latest = latest.max(op.time);
        match op.action {
            Action::Check => {
                if limiter.check(&mut state, Nanos(op.time), op.cost).allowed && op.cost > 0 {
                    admitted.push(Admission {
                        real: op.time,
                        latest,
                        cost: op.cost,
                    });
                }
            }
            Action::Peek => {
                limiter.peek(&mut state, Nanos(op.time), op.cost);
            }
            Action::Refund => limiter.refund(&mut state, Nanos(op.time), op.cost),
            Action::Charge => {
                limiter.charge(&mut state, Nanos(op.time), op.cost * CHARGE_FACTOR);
            }
        }
    }
    admitted
}

/// Everything a limiter took, in order: admissions and charges (forward
/// time only), each as `(time, cost, admitted)`.
fn taken(limiter: &Limiter, ops: &[Op]) -> Vec<(u64, u64, bool)> {
    let mut state = limiter.fresh_state();
    let mut taken = Vec::new();
    for op in ops {
        let now = Nanos(op.time);
        match op.action {
            Action::Check => {
                if limiter.check(&mut state, now, op.cost).allowed && op.cost > 0 {
                    taken.push((op.time, op.cost, true));
                }
            }
            Action::Peek => {
                limiter.peek(&mut state, now, op.cost);
            }
            Action::Refund => unreachable!("no refunds here"),
            Action::Charge => {
                let cost = op.cost * CHARGE_FACTOR;
                limiter.charge(&mut state, now, cost);
                taken.push((op.time, cost, false));
            }
        }
    }
    taken
}

/// Fails unless every admission left everything taken up to it (charges
/// included) within the algorithm's limit: a debt is repaid at the limit's
/// pace before anything more passes.
fn assert_debts_repaid(
    kind: AlgorithmKind,
    q: Quota,
    taken: &[(u64, u64, bool)],
) -> Result<(), TestCaseError> {
    let per = u128::from(q.per().as_nanos());
    let count = u128::from(q.count());
    let window = |t: u64| u128::from(t) / per;
    let sum = |it: &mut dyn Iterator<Item = &(u64, u64, bool)>| {
        it.map(|&(_, c, _)| u128::from(c)).sum::<u128>()
    };
    for (j, &(b, _, admitted)) in taken.iter().enumerate() {
        if !admitted {
            continue;
        }
        let upto = &taken[..=j];
        match kind {
            AlgorithmKind::FixedWindow => {
                let in_window = sum(&mut upto.iter().filter(|e| window(e.0) == window(b)));
                prop_assert!(
                    in_window <= count,
                    "{kind:?}: {in_window} in the window of {b}"
                );
            }
            AlgorithmKind::SlidingWindowLog => {
                let trailing = sum(&mut upto
                    .iter()
                    .filter(|e| u128::from(e.0) + per > u128::from(b)));
                prop_assert!(trailing <= count, "log: {trailing} in ({b} - per, {b}]");
            }
            AlgorithmKind::SlidingWindowCounter => {
                let w = window(b);
                let elapsed = u128::from(b) % per;
                let previous = sum(&mut upto.iter().filter(|e| window(e.0) + 1 == w));
                let current = sum(&mut upto.iter().filter(|e| window(e.0) == w));
                prop_assert!(
                    previous * (per - elapsed) + current * per <= count * per,
                    "counter: estimate over {count} at {b}"
                );
            }
            _ => {
                // Any interval [a, b]: taken × per <= burst × per + (b − a) × count.
                for i in 0..=j {
                    let total = sum(&mut upto[i..].iter());
                    let d = u128::from(b - taken[i].0);
                    prop_assert!(
                        total * per <= u128::from(q.burst()) * per + d * count,
                        "{kind:?}: {total} taken within {d}ns up to an admission"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Fails unless the admissions respect the algorithm's own definition of its limit.
fn assert_within_limit(
    kind: AlgorithmKind,
    q: Quota,
    admitted: &[Admission],
) -> Result<(), TestCaseError> {
    let per = q.per().as_nanos();
    let count = q.count();
    // GCRA keeps no latest time: it is bounded in the caller's times.
    let at = |a: &Admission| {
        if kind == AlgorithmKind::Gcra {
            a.real
        } else {
            a.latest
        }
    };
    let window = |a: &Admission| at(a) / per;
    let sum =
        |it: &mut dyn Iterator<Item = &Admission>| it.map(|a| u128::from(a.cost)).sum::<u128>();
    if is_bucket(kind) {
        // Any time interval [a, b]: admitted × per <= burst × per + (b − a) × count.
        let mut sorted: Vec<(u64, u64)> = admitted.iter().map(|a| (at(a), a.cost)).collect();
        sorted.sort_unstable();
        for i in 0..sorted.len() {
            let mut total = 0u128;
            for j in i..sorted.len() {
                total += u128::from(sorted[j].1);
                let d = u128::from(sorted[j].0 - sorted[i].0);
                prop_assert!(
                    total * u128::from(per)
                        <= u128::from(q.burst()) * u128::from(per) + d * u128::from(count),
                    "{kind:?}: {total} admitted within {d}ns"
                );
            }
        }
        return Ok(());
    }
    // Aligned windows (fixed window, sliding counter; implied for the log).
    for a in admitted {
        let w = window(a);
        let in_window = sum(&mut admitted.iter().filter(|b| window(b) == w));
        if kind != AlgorithmKind::SlidingWindowLog {
            prop_assert!(
                in_window <= u128::from(count),
                "{kind:?}: {in_window} in window {w}"
            );
        }
    }
    match kind {
        AlgorithmKind::SlidingWindowLog => {
            for a in admitted {
                let end = at(a);
                let trailing = sum(&mut admitted.iter().filter(|b| {
                    at(b) <= end && u128::from(at(b)) + u128::from(per) > u128::from(end)
                }));
                prop_assert!(
                    trailing <= u128::from(count),
                    "log: {trailing} in ({end} - per, {end}]"
                );
            }
        }
        AlgorithmKind::SlidingWindowCounter => {
            for (j, a) in admitted.iter().enumerate() {
                let w = window(a);
                let elapsed = u128::from(at(a) % per);
                let previous = sum(&mut admitted.iter().filter(|b| window(b) + 1 == w));
                let current = sum(&mut admitted[..=j].iter().filter(|b| window(b) == w));
                let per = u128::from(per);
                prop_assert!(
                    previous * (per - elapsed) + current * per <= u128::from(count) * per,
                    "counter: estimate over {count} at {}",
                    at(a)
                );
            }
        }
        _ => {}
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// (1) No window admits more than the algorithm's limit.
    #[test]
    fn never_over_the_limit((q, ops) in forward(false)) {
        let ops = absolute(&ops);
        for kind in AlgorithmKind::ALL {
            let admitted = admissions(&Limiter::new(kind, q), &ops);
            assert_within_limit(kind, q, &admitted)?;
        }
    }

    /// (8) Charges taken beyond the limit are debts: no admission passes
    /// until they are repaid at the limit's pace, so everything taken stays
    /// within the limit over time.
    #[test]
    fn debts_are_repaid_before_anything_more_passes((q, ops) in forward_with(false, true)) {
        let ops = absolute(&ops);
        for kind in AlgorithmKind::ALL {
            assert_debts_repaid(kind, q, &taken(&Limiter::new(kind, q), &ops))?;
        }
    }

    /// (5) Time going back never panics and never admits more.
    #[test]
    fn time_going_back_never_admits_more((q, ops) in shuffled()) {
        for kind in AlgorithmKind::ALL {
            let admitted = admissions(&Limiter::new(kind, q), &ops);
            assert_within_limit(kind, q, &admitted)?;
        }
    }

    /// (2) Waiting exactly `retry_after` is enough and 1 ns less is not;
    /// (3) a refund restores exactly; (4) peeking consumes nothing and
    /// reports what a check would; (6) states survive encoding.
    #[test]
    fn outcomes_are_exact((q, ops) in forward(true)) {
        let ops = absolute(&ops);
        for kind in AlgorithmKind::ALL {
            let limiter = Limiter::new(kind, q);
            let most = limit(kind, q);
            let mut state = limiter.fresh_state();
            // Receives the same calls except peeks: must decide the same.
            let mut unpeeked = limiter.fresh_state();
            for op in &ops {
                let now = Nanos(op.time);
                let before = state.clone();
                match op.action {
                    Action::Refund => {
                        limiter.refund(&mut state, now, op.cost);
                        limiter.refund(&mut unpeeked, now, op.cost);
                    }
                    Action::Charge => {
                        let after = limiter.charge(&mut state, now, op.cost * CHARGE_FACTOR);
                        limiter.charge(&mut unpeeked, now, op.cost * CHARGE_FACTOR);
                        prop_assert_eq!(after, limiter.peek(&mut state.clone(), now, 1));
                    }
                    Action::Peek => {
                        let peeked = limiter.peek(&mut state, now, op.cost);
                        let checked = limiter.check(&mut before.clone(), now, op.cost);
                        prop_assert_eq!(peeked, checked, "{:?}: peek differs from check", kind);
                        check_outcome(kind, most, &limiter, &state, op, peeked)?;
                    }
                    Action::Check => {
                        let outcome = limiter.check(&mut state, now, op.cost);
                        let shadow = limiter.check(&mut unpeeked, now, op.cost);
                        prop_assert_eq!(outcome, shadow, "{:?}: an earlier peek changed a decision", kind);
                        check_outcome(kind, most, &limiter, &state, op, outcome)?;
                        if outcome.allowed && op.cost > 0 {
                            limiter.refund(&mut state, now, op.cost);
                            let again = limiter.check(&mut state, now, op.cost);
                            prop_assert_eq!(again, outcome, "{:?}: refund did not restore", kind);
                        }
                    }
                }
                let mut bytes = Vec::new();
                state.encode(&mut bytes);
                prop_assert_eq!(State::decode(&bytes), Ok(state.clone()));
            }
        }
    }

    /// (7) The reset a client is told (`X-RateLimit-Reset`, `t`) depends on
    /// the key's state only: the refusal that follows an allowed request at
    /// the same instant reports the same reset, to the nanosecond and in
    /// header seconds. Only `retry_after` (and `allowed`) differ.
    #[test]
    fn reset_is_the_same_on_the_refusal_that_follows((q, ops) in forward(true), cost in 1u64..=16) {
        let ops = absolute(&ops);
        let now = Nanos(ops.last().map_or(0, |op| op.time));
        for kind in AlgorithmKind::ALL {
            let limiter = Limiter::new(kind, q);
            let mut state = limiter.fresh_state();
            for op in &ops {
                let at = Nanos(op.time);
                match op.action {
                    Action::Check => {
                        let _ = limiter.check(&mut state, at, op.cost);
                    }
                    Action::Peek => {
                        let _ = limiter.peek(&mut state, at, op.cost);
                    }
                    Action::Refund => limiter.refund(&mut state, at, op.cost),
                    Action::Charge => {
                        limiter.charge(&mut state, at, op.cost * CHARGE_FACTOR);
                    }
                }
            }
            // Enough checks to spend any limit of the strategy's quotas.
            let mut last_allowed = None;
            for _ in 0..=limit(kind, q) + 1 {
                let outcome = limiter.check(&mut state, now, cost);
                if outcome.allowed {
                    last_allowed = Some(outcome);
                    continue;
                }
                if let Some(allowed) = last_allowed {
                    prop_assert_eq!(allowed.reset_after, outcome.reset_after, "{:?}", kind);
                    prop_assert_eq!(
                        Decision::new(&q, &allowed).reset_secs(),
                        Decision::new(&q, &outcome).reset_secs(),
                        "{:?}", kind
                    );
                    prop_assert_eq!(allowed.remaining, outcome.remaining, "{:?}", kind);
                }
                break;
            }
        }
    }

    /// GCRA admits exactly what the token bucket admits, with the same numbers.
    #[test]
    fn gcra_matches_token_bucket((q, ops) in forward(true)) {
        let tb = Limiter::new(AlgorithmKind::TokenBucket, q);
        let gcra = Limiter::new(AlgorithmKind::Gcra, q);
        let (mut a, mut b) = (tb.fresh_state(), gcra.fresh_state());
        for op in absolute(&ops) {
            let now = Nanos(op.time);
            match op.action {
                Action::Refund => {
                    tb.refund(&mut a, now, op.cost);
                    gcra.refund(&mut b, now, op.cost);
                }
                Action::Charge => prop_assert_eq!(
                    tb.charge(&mut a, now, op.cost * CHARGE_FACTOR),
                    gcra.charge(&mut b, now, op.cost * CHARGE_FACTOR)
                ),
                Action::Peek => prop_assert_eq!(tb.peek(&mut a, now, op.cost), gcra.peek(&mut b, now, op.cost)),
                Action::Check => prop_assert_eq!(tb.check(&mut a, now, op.cost), gcra.check(&mut b, now, op.cost)),
            }
            prop_assert_eq!(tb.is_fresh(&a, now), gcra.is_fresh(&b, now));
        }
    }

    /// (7) Decoding arbitrary bytes never panics, and whatever decodes is
    /// usable and encodes back to the same bytes.
    #[test]
    fn decoding_garbage_is_safe(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            // Valid headers make the fields behind them reachable.
            (1u8..=7, prop::collection::vec(any::<u8>(), 0..80))
                .prop_map(|(tag, rest)| [vec![1, tag], rest].concat()),
            (prop::collection::vec(any::<u8>(), 8..9), 0u8..4, prop::collection::vec(any::<u8>(), 0..70))
                .prop_map(|(last, n, rest)| [vec![1, 4], last, vec![n, 0, 0, 0], rest].concat()),
        ],
        q in quota(),
        now in any::<u64>(),
    ) {
        if let Ok(mut state) = State::decode(&bytes) {
            let mut again = Vec::new();
            state.encode(&mut again);
            prop_assert_eq!(&again, &bytes);
            for kind in AlgorithmKind::ALL {
                let limiter = Limiter::new(kind, q);
                limiter.is_fresh(&state, Nanos(now));
                limiter.check(&mut state, Nanos(now), 1);
                limiter.refund(&mut state, Nanos(now), 1);
            }
        }
    }

    /// Extreme quotas, costs and times: no panic, no overflow, sane outcomes.
    #[test]
    fn extremes_never_panic(
        count in prop_oneof![Just(1u64), Just(u64::MAX), any::<u64>().prop_map(|c| c.max(1))],
        per in prop_oneof![Just(MS), Just(u64::MAX), any::<u64>().prop_map(|p| p.max(MS))],
        burst in prop::option::of(prop_oneof![Just(u64::MAX), any::<u64>().prop_map(|b| b.max(1))]),
        ops in prop::collection::vec(
            (
                prop_oneof![Just(0u64), Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()],
                prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()],
                action(true, true),
            ),
            1..20,
        ),
    ) {
        let q = Quota::new(count, Span(per), burst).unwrap();
        for kind in AlgorithmKind::ALL {
            let limiter = Limiter::new(kind, q);
            let most = limit(kind, q);
            let mut state = limiter.fresh_state();
            for &(time, cost, action) in &ops {
                let now = Nanos(time);
                match action {
                    Action::Refund => limiter.refund(&mut state, now, cost),
                    Action::Charge => {
                        limiter.charge(&mut state, now, cost);
                    }
                    Action::Peek | Action::Check => {
                        let o = if matches!(action, Action::Peek) {
                            limiter.peek(&mut state, now, cost)
                        } else {
                            limiter.check(&mut state, now, cost)
                        };
                        prop_assert!(o.remaining <= most);
                        prop_assert_eq!(o.allowed, o.retry_after == Span::ZERO);
                        if cost > most {
                            prop_assert_eq!(o.retry_after, Span::NEVER);
                        }
                    }
                }
                limiter.is_fresh(&state, now);
                let mut bytes = Vec::new();
                state.encode(&mut bytes);
                prop_assert_eq!(State::decode(&bytes), Ok(state.clone()));
            }
        }
    }
}

/// Checks one outcome against its definition, and `retry_after` by waiting it.
fn check_outcome(
    kind: AlgorithmKind,
    most: u64,
    limiter: &Limiter,
    state: &State,
    op: &Op,
    o: Outcome,
) -> Result<(), TestCaseError> {
    prop_assert!(
        o.remaining <= most,
        "{kind:?}: remaining {} > {most}",
        o.remaining
    );
    if o.allowed {
        prop_assert_eq!(o.retry_after, Span::ZERO);
        return Ok(());
    }
    if op.cost > most {
        prop_assert_eq!(
            o.retry_after,
            Span::NEVER,
            "{:?}: cost above the limit",
            kind
        );
        return Ok(());
    }
    let wait = o.retry_after.as_nanos();
    prop_assert!(
        wait > 0 && wait != u64::MAX,
        "{kind:?}: denied with retry_after {wait}"
    );
    let early = limiter.peek(&mut state.clone(), Nanos(op.time + wait - 1), op.cost);
    prop_assert!(
        !early.allowed,
        "{kind:?}: allowed 1ns before retry_after {wait}"
    );
    let on_time = limiter.peek(&mut state.clone(), Nanos(op.time + wait), op.cost);
    prop_assert!(
        on_time.allowed,
        "{kind:?}: denied after waiting retry_after {wait}"
    );
    // The wait never exceeds the time to full restoration.
    prop_assert!(
        o.reset_after >= o.retry_after,
        "{kind:?}: retry after reset"
    );
    Ok(())
}
