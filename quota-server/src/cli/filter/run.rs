//! `sluice filter simulate`: a traffic script through core's simulation
//! (`sluice_core::simulation`: the engine over the same slot store the
//! filter keeps in Envoy's shared data, on a simulated clock), printed.

use std::io::Write;
use std::path::Path;

use sluice_core::config::ConfigError;
use sluice_core::engine::{Verdict, VerdictKind};
use sluice_core::policy::{HttpRequest, Policy, SyncMode};
use sluice_core::simulation::{self, Decided, Outcome, RuleMode, Tally};
use sluice_core::store::StoreError;
use sluice_core::time::Span;

use super::script::{self, ScriptError};
use super::{read_input, read_policy, shown, Format};
use crate::cli::simulate::request_line;

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
    write_notes(&policy, out)?;

    let requests: Vec<HttpRequest> = script.lines.iter().map(|l| l.request.clone()).collect();
    let arrivals = script.lines.iter().enumerate().flat_map(|(index, line)| {
        (0..line.count).map(move |i| {
            let spread = line.every.as_nanos().saturating_mul(i);
            (Span(line.at.as_nanos().saturating_add(spread)), index)
        })
    });
    let mut tallies = vec![Tally::default(); policy.rules.len()];
    let (mut total, mut allowed, mut delayed, mut limited, mut denied) = (0u64, 0, 0, 0, 0);
    let mut written = Ok(());
    simulation::run(&policy, &requests, arrivals, |fate| {
        total += 1;
        let Some(request) = requests.get(fate.request) else {
            return;
        };
        let tally = match &fate.outcome {
            Outcome::AccessAllowed => (1, 0, 0, 0),
            Outcome::AccessDenied => (0, 0, 0, 1),
            Outcome::Decided(v) if v.is_allowed() => (1, u64::from(fate.held > Span::ZERO), 0, 0),
            Outcome::Decided(_) => (0, 0, 1, 0),
        };
        allowed += tally.0;
        delayed += tally.1;
        limited += tally.2;
        denied += tally.3;
        Tally::add(&mut tallies, &fate);
        if written.is_ok() {
            written = write_fate(&policy, request, &fate, out);
        }
    })?;
    written?;

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
        "{allowed} of {total} allowed ({delayed} after a delay), {limited} limited"
    )?;
    if denied > 0 {
        write!(out, ", {denied} denied by the access list")?;
    }
    writeln!(out)?;
    Ok(())
}

/// One request's line, and its headers when the filter sends any.
fn write_fate(
    policy: &Policy,
    request: &HttpRequest,
    fate: &Decided,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let what = simulation::request_text(request);
    let line = |outcome: &str, detail: &str| request_line(fate.number, fate.at, outcome, detail);
    let verdict = match &fate.outcome {
        Outcome::AccessAllowed => {
            let detail = format!("{what} (allow-listed: no rule applies)");
            return out.write_all(line("allowed", &detail).as_bytes());
        }
        Outcome::AccessDenied => {
            let detail = format!("{what} (deny-listed: 403)");
            return out.write_all(line("denied", &detail).as_bytes());
        }
        Outcome::Decided(verdict) => verdict,
    };
    let held_for = if fate.held > Span::ZERO {
        format!(" held {}", fate.held)
    } else {
        String::new()
    };
    match verdict.kind {
        VerdictKind::Limited { rule_index } => {
            let rule = policy.rules.get(rule_index);
            let name = rule.map_or("", |r| r.name.as_str());
            // Every refusal by a blocking rule starts or serves a block.
            let blocked = match rule.and_then(|r| r.block_duration) {
                Some(_) => verdict
                    .shown(policy)
                    .map(|d| format!(" (blocked, {} left)", d.retry_after))
                    .unwrap_or_default(),
                None => String::new(),
            };
            let detail = format!("{what}{held_for} by {name}{blocked}");
            out.write_all(line("limited", &detail).as_bytes())?;
            write_headers(policy, verdict, out)
        }
        _ => {
            let outcome = if fate.held > Span::ZERO {
                "delayed"
            } else if verdict.is_degraded() {
                "degraded"
            } else {
                "allowed"
            };
            let detail = format!("{what}{held_for}{}", names(policy, verdict));
            out.write_all(line(outcome, &detail).as_bytes())?;
            if let Some(header) = &policy.degrade_header {
                let rules: Vec<&str> = verdict.degraded_by(policy).collect();
                if !rules.is_empty() {
                    writeln!(out, "       upstream {header}: {}", rules.join(","))?;
                }
            }
            if policy.headers_on_allowed || verdict.is_degraded() {
                write_headers(policy, verdict, out)?;
            }
            Ok(())
        }
    }
}

/// Writes a note for each rule the run cannot simulate as the filter would.
fn write_notes(policy: &Policy, out: &mut impl Write) -> std::io::Result<()> {
    for (rule, mode) in policy.rules.iter().zip(simulation::rule_modes(policy)) {
        let name = &rule.name;
        let mode_name = |mode| match mode {
            SyncMode::Exact => "exact",
            SyncMode::Leased(_) => "leased",
        };
        match mode {
            RuleMode::Local => {}
            RuleMode::SkippedStreams => writeln!(
                out,
                "note: rule {name} counts stream messages or bytes: not simulated"
            )?,
            RuleMode::Fallback(sync) => writeln!(
                out,
                "note: rule {name} is synced ({}): the quota server decides it for the \
                 fleet, which cannot be simulated here; simulated with its local fallback limit",
                mode_name(sync)
            )?,
            RuleMode::SkippedSynced(sync) => writeln!(
                out,
                "note: rule {name} is synced ({}): the quota server decides it for the \
                 fleet, which cannot be simulated here, and it has no fallback limit: skipped",
                mode_name(sync)
            )?,
        }
    }
    Ok(())
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
    for (name, value) in simulation::headers(policy, verdict) {
        writeln!(out, "       {name}: {value}")?;
    }
    Ok(())
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
