//! `sluice filter simulate`: a traffic script through core's engine, over
//! the same slot store the filter keeps in Envoy's shared data, on a
//! simulated clock (core never reads one).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Write;
use std::path::Path;

use sluice_core::access::Access;
use sluice_core::config::ConfigError;
use sluice_core::engine::{self, Verdict, VerdictKind};
use sluice_core::policy::{Attributes, HttpRequest, OnFailure, Policy, SyncMode};
use sluice_core::store::{InProcessShared, SlotStore, StoreError};
use sluice_core::time::{Nanos, Span};

use super::script::{self, ScriptError};
use super::{read_input, read_policy, shown, Format};
use crate::cli::simulate::{request_line, synthetic_start};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum FilterSimulateError {
    /// A file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is refused (run `sluice filter validate` for
    /// every error).
    #[error("{path}: {source}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        source: ConfigError,
    },
    /// The traffic script does not parse.
    #[error("{path}: {source}")]
    Script {
        /// The script.
        path: String,
        /// Where and why.
        source: ScriptError,
    },
    /// The store refused (a bug: it is private to this run).
    #[error("engine: {0}")]
    Engine(#[from] StoreError),
    /// Standard output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// How one rule fared over the run.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    allowed: u64,
    delayed: u64,
    limited: u64,
    shadow_limited: u64,
    degraded: u64,
}

/// A request due to be decided: when, its number in the script, its
/// script line, and when it was first seen (earlier when a delay rule
/// holds it).
type Due = Reverse<(Nanos, u64, usize, Nanos)>;

/// Runs `traffic` through the filter configuration `config`, writing each
/// request's decision, its headers, and a summary per rule to `out`.
pub fn simulate(
    config: &Path,
    traffic: &Path,
    out: &mut impl Write,
) -> Result<(), FilterSimulateError> {
    let read = |path: &Path| {
        read_input(path).map_err(|source| FilterSimulateError::Read {
            path: shown(path),
            source,
        })
    };
    let (_, policy) = read_policy(&read(config)?, Format::of(config)).map_err(|source| {
        FilterSimulateError::Config {
            path: shown(config),
            source,
        }
    })?;
    let script = script::parse(&read(traffic)?).map_err(|source| FilterSimulateError::Script {
        path: shown(traffic),
        source,
    })?;
    let local = simulated_rules(&policy, out)?;

    let shared = InProcessShared::default();
    // The key hash's seed only spreads keys over slots: any fixed one will
    // do for a run no client can aim at.
    let mut store = SlotStore::open(&shared, &policy, || Some(0x5eed))?;
    // As the filter sees each line's request: its client address taken
    // from the peer or `X-Forwarded-For` as the configuration says.
    let requests: Vec<HttpRequest> = script
        .lines
        .iter()
        .map(|line| {
            let mut request = line.request.clone();
            let forwarded = request.header("x-forwarded-for");
            let client_ip = policy.client_ip.resolve(request.client_ip, forwarded);
            request.client_ip = client_ip;
            request
        })
        .collect();
    let start = synthetic_start(policy.rules.iter().map(|r| r.quota.per()));
    let mut due: BinaryHeap<Due> = BinaryHeap::new();
    let mut number = 0u64;
    for (index, line) in script.lines.iter().enumerate() {
        for i in 0..line.count {
            number += 1;
            let at = start
                .plus(line.at)
                .plus(Span(line.every.as_nanos().saturating_mul(i)));
            due.push(Reverse((at, number, index, at)));
        }
    }

    // Requests held by delay rules, by (rule, key): new requests queue
    // behind them, as in the filter.
    let mut held: HashMap<(usize, String), usize> = HashMap::new();
    let mut tallies = vec![Tally::default(); policy.rules.len()];
    let (mut allowed, mut delayed, mut limited, mut denied) = (0u64, 0u64, 0u64, 0u64);
    while let Some(Reverse((now, number, index, since))) = due.pop() {
        let Some(request) = requests.get(index) else {
            continue;
        };
        let what = match request.query.as_str() {
            "" => format!("{} {}", request.method, request.path),
            query => format!("{} {}?{query}", request.method, request.path),
        };
        // The configuration's access lists, before every rule, as in the
        // filter (the quota server's lists are not known here).
        let listed = match policy.access.check(request.client_ip, [], now) {
            Access::Neutral => None,
            Access::Allowed => {
                allowed += 1;
                Some(("allowed", "(allow-listed: no rule applies)"))
            }
            Access::Denied => {
                denied += 1;
                Some(("denied", "(deny-listed: 403)"))
            }
        };
        if let Some((outcome, why)) = listed {
            let detail = format!("{what} {why}");
            out.write_all(request_line(number, now.since(start), outcome, &detail).as_bytes())?;
            continue;
        }
        let keys: Vec<(usize, String)> = engine::applicable_rules(&policy, request)
            .into_iter()
            .filter(|(i, _)| local.get(*i).copied().unwrap_or(false))
            .collect();
        let waited = now.since(since);
        if waited > Span::ZERO {
            hold(&mut held, &keys, false);
        }
        let costs = engine::Costs::of(&policy, request, &keys);
        let verdict = engine::decide_keys(&policy, &mut store, &keys, &costs, now, waited)?;
        let verdict = if waited == Span::ZERO {
            engine::behind_queue(&policy, &mut store, verdict, &keys, now, |i, k| {
                held.get(&(i, k.to_owned())).copied().unwrap_or(0)
            })
        } else {
            verdict
        };
        let held_for = if waited > Span::ZERO {
            format!(" held {waited}")
        } else {
            String::new()
        };
        match verdict.kind {
            VerdictKind::Wait { wait } => {
                // At least a nanosecond on, so that the clock always moves.
                let wake = now.plus(wait.max(Span(1)));
                due.push(Reverse((wake, number, index, since)));
                hold(&mut held, &keys, true);
                continue;
            }
            VerdictKind::Allowed => {
                allowed += 1;
                let names = names(&policy, &verdict);
                let outcome = if waited > Span::ZERO {
                    delayed += 1;
                    "delayed"
                } else if verdict.is_degraded() {
                    "degraded"
                } else {
                    "allowed"
                };
                let detail = format!("{what}{held_for}{names}");
                out.write_all(request_line(number, now.since(start), outcome, &detail).as_bytes())?;
                for d in &verdict.decisions {
                    if let Some(t) = tallies.get_mut(d.rule_index) {
                        t.allowed += 1;
                        t.delayed += u64::from(waited > Span::ZERO);
                        t.shadow_limited += u64::from(d.shadow_limited);
                        t.degraded += u64::from(d.degraded);
                    }
                }
                if let Some(header) = &policy.degrade_header {
                    let rules: Vec<&str> = verdict.degraded_by(&policy).collect();
                    if !rules.is_empty() {
                        writeln!(out, "       upstream {header}: {}", rules.join(","))?;
                    }
                }
                if policy.headers_on_allowed || verdict.is_degraded() {
                    write_headers(&policy, &verdict, out)?;
                }
            }
            VerdictKind::Limited { rule_index } => {
                limited += 1;
                let rule = policy.rules.get(rule_index);
                let name = rule.map_or("", |r| r.name.as_str());
                // Every refusal by a blocking rule starts or serves a block.
                let blocked = match rule.and_then(|r| r.block_duration) {
                    Some(_) => verdict
                        .shown(&policy)
                        .map(|d| format!(" (blocked, {} left)", d.retry_after))
                        .unwrap_or_default(),
                    None => String::new(),
                };
                let detail = format!("{what}{held_for} by {name}{blocked}");
                out.write_all(
                    request_line(number, now.since(start), "limited", &detail).as_bytes(),
                )?;
                if let Some(t) = tallies.get_mut(rule_index) {
                    t.limited += 1;
                }
                write_headers(&policy, &verdict, out)?;
            }
        }
    }

    writeln!(out)?;
    for (rule, t) in policy.rules.iter().zip(&tallies) {
        write!(out, "rule {}: {} allowed", rule.name, t.allowed)?;
        if t.delayed > 0 {
            write!(out, " ({} after a delay)", t.delayed)?;
        }
        write!(out, ", {} limited", t.limited)?;
        if t.shadow_limited > 0 {
            write!(
                out,
                ", {} over its limit (shadow: let through)",
                t.shadow_limited
            )?;
        }
        if t.degraded > 0 {
            write!(
                out,
                ", {} over its limit (degraded: let through marked)",
                t.degraded
            )?;
        }
        writeln!(out)?;
    }
    write!(
        out,
        "{allowed} of {number} allowed ({delayed} after a delay), {limited} limited"
    )?;
    if denied > 0 {
        write!(out, ", {denied} denied by the access list")?;
    }
    writeln!(out)?;
    Ok(())
}

/// Counts a request as held on each of its keys (`true`), or as no longer
/// held.
fn hold(held: &mut HashMap<(usize, String), usize>, keys: &[(usize, String)], on: bool) {
    for key in keys {
        if on {
            *held.entry(key.clone()).or_default() += 1;
        } else if let Some(n) = held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                held.remove(key);
            }
        }
    }
}

/// Which rules the run decides locally, by position; writes a note for
/// each rule it cannot simulate as the filter would.
fn simulated_rules(policy: &Policy, out: &mut impl Write) -> std::io::Result<Vec<bool>> {
    let mut local = Vec::with_capacity(policy.rules.len());
    for (index, rule) in policy.rules.iter().enumerate() {
        let name = &rule.name;
        let simulated = if !rule.counts.at_request() {
            writeln!(
                out,
                "note: rule {name} counts stream messages or bytes: not simulated"
            )?;
            false
        } else if let Some(sync) = policy.sync_of(index) {
            let mode = match sync.mode {
                SyncMode::Exact => "exact",
                SyncMode::Leased(_) => "leased",
            };
            if sync.on_failure == OnFailure::Fallback {
                writeln!(
                    out,
                    "note: rule {name} is synced ({mode}): the quota server decides it for the \
                     fleet, which cannot be simulated here; simulated with its local fallback limit"
                )?;
                true
            } else {
                writeln!(
                    out,
                    "note: rule {name} is synced ({mode}): the quota server decides it for the \
                     fleet, which cannot be simulated here, and it has no fallback limit: skipped"
                )?;
                false
            }
        } else {
            true
        };
        local.push(simulated);
    }
    Ok(local)
}

/// ` (rules: a, b)`: the rules that allowed a request, if any.
fn names(policy: &Policy, verdict: &Verdict) -> String {
    let names: Vec<&str> = verdict
        .decisions
        .iter()
        .filter_map(|d| policy.rules.get(d.rule_index).map(|r| r.name.as_str()))
        .collect();
    if names.is_empty() {
        " (no rule applies)".to_owned()
    } else {
        format!(" (rules: {})", names.join(", "))
    }
}

/// The headers the filter sends with this verdict, one a line, indented.
fn write_headers(policy: &Policy, verdict: &Verdict, out: &mut impl Write) -> std::io::Result<()> {
    let mut result = Ok(());
    verdict.headers(policy, |name, value| {
        if result.is_ok() {
            result = writeln!(out, "       {name}: {value}");
        }
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates into a string (tests).
    fn simulate_text(config: &str, traffic: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| -> std::path::PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (config, traffic) = (write("filter.json", config), write("traffic.txt", traffic));
        let mut out = Vec::new();
        simulate(&config, &traffic, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_delay_rule_holds_then_lets_through() {
        let text = simulate_text(
            r#"{"rules": [{"name": "slow", "limit": {"count": 1, "per": "1s"},
                "action": "delay", "max_delay": "2s", "algorithm": "gcra", "key": ["method"]}]}"#,
            "repeat 2 every 0s GET /a\n",
        );
        assert!(
            text.contains("#1     t=0ns allowed   GET /a (rules: slow)"),
            "{text}"
        );
        assert!(
            text.contains("#2     t=1s delayed   GET /a held 1s"),
            "{text}"
        );
        assert!(
            text.contains("rule slow: 2 allowed (1 after a delay), 0 limited"),
            "{text}"
        );
    }

    #[test]
    fn blocks_and_degraded_requests_are_shown() {
        let text = simulate_text(
            r#"{"rules": [
                {"name": "login", "match": {"path": {"prefix": "/login"}}, "key": ["method"],
                 "limit": {"count": 2, "per": "1s"}, "algorithm": "fixed_window", "block_duration": "3s"},
                {"name": "cheap", "match": {"path": {"prefix": "/search"}}, "key": ["method"],
                 "limit": {"count": 1, "per": "1h"}, "action": "degrade"}
            ], "headers": {"on_allowed": false}}"#,
            "repeat 3 every 0s POST /login\nat 1.5s POST /login\nat 3s POST /login\nrepeat 2 every 0s GET /search\n",
        );
        assert!(
            text.contains("#3     t=0ns limited   POST /login by login (blocked, 3s left)"),
            "{text}"
        );
        assert!(
            text.contains("#4     t=1500ms limited   POST /login by login (blocked, 1500ms left)"),
            "{text}"
        );
        assert!(text.contains("#5     t=3s allowed   POST /login"), "{text}");
        assert!(
            text.contains("degraded  GET /search (rules: cheap)"),
            "{text}"
        );
        assert!(text.contains("upstream x-sluice-limited: cheap"), "{text}");
        assert!(
            text.contains(
                "rule cheap: 2 allowed, 0 limited, 1 over its limit (degraded: let through marked)"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_request_queued_past_max_delay_is_refused_at_once() {
        let text = simulate_text(
            r#"{"rules": [{"name": "slow", "limit": {"count": 1, "per": "1s"},
                "action": "delay", "max_delay": "1.5s", "algorithm": "gcra", "key": ["method"]}]}"#,
            "repeat 3 every 0s GET /a\n",
        );
        // The second is held until 1s; the third's turn would come at 2s.
        assert!(
            text.contains("#2     t=1s delayed   GET /a held 1s"),
            "{text}"
        );
        assert!(
            text.contains("#3     t=0ns limited   GET /a by slow"),
            "{text}"
        );
        assert!(text.contains("retry-after: 1"), "{text}");
    }

    #[test]
    fn the_client_address_comes_from_trusted_hops() {
        let text = simulate_text(
            r#"{"rules": [{"name": "ip", "limit": {"count": 1, "per": "1m"}}],
                "client_ip": {"trusted_hops": 1}}"#,
            "GET /a client=10.0.0.9 header:x-forwarded-for=192.0.2.1\n\
             GET /a client=10.0.0.9 header:x-forwarded-for=192.0.2.2\n\
             GET /a client=10.0.0.8 header:x-forwarded-for=192.0.2.1\n",
        );
        assert!(text.contains("#2     t=0ns allowed"), "{text}");
        assert!(
            text.contains("#3     t=0ns limited   GET /a by ip"),
            "{text}"
        );
    }

    #[test]
    fn query_strings_in_the_script_are_matched_and_keyed() {
        let text = simulate_text(
            r#"{"rules": [{"name": "per-user", "limit": {"count": 1, "per": "1m"},
                "match": {"query": [{"name": "debug", "present": false}]},
                "key": [["query:user", "client_ip"]]}]}"#,
            "GET /a?user=ann client=10.0.0.1\n\
             GET /a?user=%61nn client=10.0.0.2\n\
             GET /a?user=bob client=10.0.0.1\n\
             GET /a client=10.0.0.1\n\
             GET /a?debug client=10.0.0.1\n",
        );
        assert!(
            text.contains("#2     t=0ns limited   GET /a?user=%61nn by per-user"),
            "{text}"
        );
        assert!(text.contains("#3     t=0ns allowed"), "{text}");
        assert!(text.contains("#4     t=0ns allowed"), "{text}");
        assert!(
            text.contains("#5     t=0ns allowed   GET /a?debug (no rule applies)"),
            "{text}"
        );
        assert!(
            text.contains("rule per-user: 3 allowed, 1 limited"),
            "{text}"
        );
    }

    #[test]
    fn synced_rules_are_noted() {
        let text = simulate_text(
            r#"{"rules": [
                {"name": "fleet", "key": ["method"], "sync": {"mode": "exact", "domain": "d",
                 "fallback": {"count": 1, "per": "1m"}}},
                {"name": "remote", "key": ["method"], "sync": {"mode": "exact", "domain": "d"}}]}"#,
            "repeat 2 every 1s GET /a\n",
        );
        assert!(
            text.contains("note: rule fleet is synced (exact)"),
            "{text}"
        );
        assert!(
            text.contains("simulated with its local fallback limit"),
            "{text}"
        );
        assert!(
            text.contains("note: rule remote is synced (exact)"),
            "{text}"
        );
        assert!(text.contains("no fallback limit: skipped"), "{text}");
        assert!(
            text.contains("#2     t=1s limited   GET /a by fleet"),
            "{text}"
        );
        assert!(text.contains("rule remote: 0 allowed, 0 limited"), "{text}");
    }
}
