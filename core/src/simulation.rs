//! Requests through the engine on a simulated clock, as the filter decides
//! them: over the same slot store it keeps in Envoy's shared data, with its
//! access lists, delay queues and client address resolution. One piece
//! shared by `sluice filter simulate` and the browser playground, so both
//! give the filter's answers.

use alloc::collections::BinaryHeap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Reverse;

use hashbrown::HashMap;

use crate::access::Access;
use crate::engine::{self, Verdict, VerdictKind};
use crate::policy::{Attributes, HttpRequest, OnFailure, Policy, SyncMode};
use crate::store::{InProcessShared, SlotStore, StoreError};
use crate::time::{Nanos, Span};

/// How the simulation treats a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMode {
    /// Decided here, as the filter decides it.
    Local,
    /// Synced: the quota server decides it for the fleet, which cannot be
    /// simulated; its local fallback limit is used instead.
    Fallback(SyncMode),
    /// Synced without a fallback limit: skipped.
    SkippedSynced(SyncMode),
    /// Counts stream messages or bytes: not simulated.
    SkippedStreams,
}

impl RuleMode {
    /// Whether the simulation decides the rule.
    pub fn is_simulated(self) -> bool {
        matches!(self, RuleMode::Local | RuleMode::Fallback(_))
    }
}

/// How the simulation treats each rule of `policy`, by position.
pub fn rule_modes(policy: &Policy) -> Vec<RuleMode> {
    (0..policy.rules.len())
        .zip(&policy.rules)
        .map(|(index, rule)| {
            if !rule.counts.at_request() {
                RuleMode::SkippedStreams
            } else if let Some(sync) = policy.sync_of(index) {
                if sync.on_failure == OnFailure::Fallback {
                    RuleMode::Fallback(sync.mode)
                } else {
                    RuleMode::SkippedSynced(sync.mode)
                }
            } else {
                RuleMode::Local
            }
        })
        .collect()
}

/// What happened to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The configuration's allow list let it through before every rule.
    AccessAllowed,
    /// The configuration's deny list refused it (403).
    AccessDenied,
    /// The rules decided: allowed (after `held`, if a delay rule held it)
    /// or limited; the verdict carries every rule's decision and the
    /// headers.
    Decided(Verdict),
}

/// One request's fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// Its number, 1-based, in the order the arrivals were given.
    pub number: u64,
    /// Which of the given requests it is.
    pub request: usize,
    /// When it was decided, from the start.
    pub at: Span,
    /// How long a delay rule held it (zero if not held).
    pub held: Span,
    /// The rules that applied, each with its key (simulated rules only).
    pub keys: Vec<(usize, String)>,
    /// What it got.
    pub outcome: Outcome,
}

impl Decided {
    /// Whether it went through now or after a hold.
    pub fn is_allowed(&self) -> bool {
        match &self.outcome {
            Outcome::AccessAllowed => true,
            Outcome::AccessDenied => false,
            Outcome::Decided(verdict) => verdict.is_allowed(),
        }
    }
}

/// How one rule fared over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests it let through (held ones included).
    pub allowed: u64,
    /// Of those, requests a delay rule held first.
    pub delayed: u64,
    /// Requests it refused.
    pub limited: u64,
    /// Requests a shadow rule would have refused (let through).
    pub shadow_limited: u64,
    /// Requests a degrade rule let through marked.
    pub degraded: u64,
}

impl Tally {
    /// Adds one request's fate to its rules' tallies (`tallies` by rule
    /// position): the rule that refused it, or every rule that let it
    /// through.
    pub fn add(tallies: &mut [Tally], fate: &Decided) {
        let Outcome::Decided(verdict) = &fate.outcome else {
            return;
        };
        if let VerdictKind::Limited { rule_index } = verdict.kind {
            if let Some(t) = tallies.get_mut(rule_index) {
                t.limited += 1;
            }
            return;
        }
        for d in &verdict.decisions {
            if let Some(t) = tallies.get_mut(d.rule_index) {
                t.allowed += 1;
                t.delayed += u64::from(fate.held > Span::ZERO);
                t.shadow_limited += u64::from(d.shadow_limited);
                t.degraded += u64::from(d.degraded);
            }
        }
    }
}

/// A request due to be decided: when, its number, which request, and when
/// it first arrived (earlier when a delay rule holds it).
type Due = Reverse<(Nanos, u64, usize, Nanos)>;

/// Runs `arrivals` (each a time from the start and a position in
/// `requests`) through `policy`'s engine, calling `each` with every
/// request's fate in the order they are decided. Requests are seen as the
/// filter sees them: the client address taken from the peer or
/// `X-Forwarded-For` as the configuration says.
pub fn run(
    policy: &Policy,
    requests: &[HttpRequest],
    arrivals: impl IntoIterator<Item = (Span, usize)>,
    mut each: impl FnMut(Decided),
) -> Result<(), StoreError> {
    let modes = rule_modes(policy);
    let shared = InProcessShared::default();
    // The key hash's seed only spreads keys over slots: any fixed one will
    // do for a run no client can aim at.
    let mut store = SlotStore::open(&shared, policy, || Some(0x5eed))?;
    let requests: Vec<HttpRequest> = requests
        .iter()
        .map(|request| {
            let mut request = request.clone();
            let forwarded = request.header("x-forwarded-for");
            request.client_ip = policy.client_ip.resolve(request.client_ip, forwarded);
            request
        })
        .collect();
    let start = synthetic_start(policy.rules.iter().map(|r| r.quota.per()));
    let mut due: BinaryHeap<Due> = arrivals
        .into_iter()
        .zip(1u64..)
        .map(|((at, index), number)| {
            let at = start.plus(at);
            Reverse((at, number, index, at))
        })
        .collect();

    // Requests held by delay rules, by (rule, key): new requests queue
    // behind them, as in the filter.
    let mut held: HashMap<(usize, String), usize> = HashMap::new();
    while let Some(Reverse((now, number, index, since))) = due.pop() {
        let Some(request) = requests.get(index) else {
            continue;
        };
        let fate = |keys, held, outcome| Decided {
            number,
            request: index,
            at: now.since(start),
            held,
            keys,
            outcome,
        };
        // The configuration's access lists, before every rule, as in the
        // filter (the quota server's lists are not known here).
        match policy.access.check(request.client_ip, [], now) {
            Access::Neutral => {}
            Access::Allowed => {
                each(fate(Vec::new(), Span::ZERO, Outcome::AccessAllowed));
                continue;
            }
            Access::Denied => {
                each(fate(Vec::new(), Span::ZERO, Outcome::AccessDenied));
                continue;
            }
        }
        let keys: Vec<(usize, String)> = engine::applicable_rules(policy, request)
            .into_iter()
            .filter(|(i, _)| modes.get(*i).is_some_and(|m| m.is_simulated()))
            .collect();
        let waited = now.since(since);
        if waited > Span::ZERO {
            hold(&mut held, &keys, false);
        }
        let costs = engine::Costs::of(policy, request, &keys);
        let verdict = engine::decide_keys(policy, &mut store, &keys, &costs, now, waited)?;
        let verdict = if waited == Span::ZERO {
            engine::behind_queue(policy, &mut store, verdict, &keys, now, |i, k| {
                held.get(&(i, k.into())).copied().unwrap_or(0)
            })
        } else {
            verdict
        };
        if let VerdictKind::Wait { wait } = verdict.kind {
            // At least a nanosecond on, so that the clock always moves.
            let wake = now.plus(wait.max(Span(1)));
            due.push(Reverse((wake, number, index, since)));
            hold(&mut held, &keys, true);
            continue;
        }
        each(fate(keys, waited, Outcome::Decided(verdict)));
    }
    Ok(())
}

/// Counts a request as held on each of its keys (`true`), or as no longer
/// held.
fn hold(held: &mut HashMap<(usize, String), usize>, keys: &[(usize, String)], on: bool) {
    for key in keys {
        if on {
            *held.entry(key.clone()).or_default() += 1;
        } else if let Some(n) = held.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(key);
            }
        }
    }
}

/// Where a simulation's synthetic clock starts: at a boundary of every one
/// of `windows` where it can (else of the longest), so that fixed windows
/// do not roll over partway by accident.
pub fn synthetic_start(windows: impl IntoIterator<Item = Span>) -> Nanos {
    let mut common = Some(1u64);
    let mut longest = 1u64;
    for w in windows {
        let w = w.as_nanos().max(1);
        longest = longest.max(w);
        common = common.and_then(|c| c.checked_mul(w / gcd(c, w)));
    }
    let boundary = common.unwrap_or(longest);
    Nanos(boundary.checked_mul(1_000).unwrap_or(boundary))
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The words of one line of a traffic text, without its `#` comment.
pub fn line_words(line: &str) -> Vec<&str> {
    line.split('#')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// A request as a log line shows it: `GET /path?query`.
pub fn request_text(request: &HttpRequest) -> String {
    match request.query.as_str() {
        "" => alloc::format!("{} {}", request.method, request.path),
        query => alloc::format!("{} {}?{query}", request.method, request.path),
    }
}

/// The verdict's headers as (name, value) pairs, as the filter sends them.
pub fn headers(policy: &Policy, verdict: &Verdict) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    verdict.headers(policy, |name, value| out.push((name, value.into())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Policy {
        Policy::from_json(json).unwrap()
    }

    fn fates(
        policy: &Policy,
        requests: &[HttpRequest],
        arrivals: &[(Span, usize)],
    ) -> Vec<Decided> {
        let mut out = Vec::new();
        run(policy, requests, arrivals.iter().copied(), |d| out.push(d)).unwrap();
        out
    }

    #[test]
    fn a_fixed_window_allows_its_count_then_limits_until_the_next_window() {
        let policy = policy(
            r#"{"rules": [{"name": "r", "limit": {"count": 2, "per": "1s"},
                "algorithm": "fixed_window", "key": ["method"]}]}"#,
        );
        let requests = [HttpRequest::new("GET", "/")];
        let at = |ms| (Span::from_millis(ms), 0);
        let fates = fates(&policy, &requests, &[at(0), at(100), at(200), at(1000)]);
        let allowed: Vec<bool> = fates.iter().map(Decided::is_allowed).collect();
        assert_eq!(allowed, [true, true, false, true]);
        assert_eq!(fates[2].keys, [(0, "3:GET".into())]);
        let Outcome::Decided(verdict) = &fates[2].outcome else {
            panic!("decided by the rule")
        };
        let headers = headers(&policy, verdict);
        assert!(
            headers.iter().any(|(n, _)| *n == "retry-after"),
            "{headers:?}"
        );
    }

    #[test]
    fn a_delay_rule_holds_a_request_and_reports_the_hold() {
        let policy = policy(
            r#"{"rules": [{"name": "slow", "limit": {"count": 1, "per": "1s"},
                "action": "delay", "max_delay": "2s", "algorithm": "gcra", "key": ["method"]}]}"#,
        );
        let requests = [HttpRequest::new("GET", "/")];
        let fates = fates(&policy, &requests, &[(Span::ZERO, 0), (Span::ZERO, 0)]);
        assert_eq!(fates.len(), 2);
        assert_eq!((fates[1].number, fates[1].held), (2, Span::from_secs(1)));
        assert!(fates[1].is_allowed());
    }

    #[test]
    fn synced_rules_fall_back_or_are_skipped() {
        let policy = policy(
            r#"{"rules": [
                {"name": "fleet", "key": ["method"], "sync": {"mode": "exact", "domain": "d",
                 "fallback": {"count": 1, "per": "1m"}}},
                {"name": "remote", "key": ["method"], "sync": {"mode": "exact", "domain": "d"}}]}"#,
        );
        assert_eq!(
            rule_modes(&policy),
            [
                RuleMode::Fallback(SyncMode::Exact),
                RuleMode::SkippedSynced(SyncMode::Exact)
            ]
        );
    }

    #[test]
    fn the_clock_starts_at_every_window_boundary() {
        let start = synthetic_start([Span::from_secs(60), Span::from_secs(7)]).0;
        assert_eq!(start % Span::from_secs(420).as_nanos(), 0);
        assert!(start > 0);
        // Windows whose common multiple overflows: the longest one's.
        let odd = [Span(u64::MAX / 3), Span(u64::MAX / 5 + 1)];
        assert_eq!(synthetic_start(odd).0 % odd[0].as_nanos(), 0);
    }
}
