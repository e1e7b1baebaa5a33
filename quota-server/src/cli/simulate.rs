//! `sluice test`: what N requests would get from one limit, computed
//! offline by core's engine over an in-memory store at a synthetic time.

use std::fmt::Write;
use std::path::PathBuf;

use clap::Args;
use sluice_core::engine::{decide_claims, Claim};
use sluice_core::simulation::synthetic_start;
use sluice_core::store::{MemoryStore, Slot};
use sluice_core::time::Span;

use crate::config::LoadError;
use crate::limits;

/// Arguments of `sluice test`.
#[derive(Args, Clone, Debug)]
pub struct TestArgs {
    /// The configuration file.
    #[arg(long, short, default_value = "sluice.yaml")]
    pub config: PathBuf,
    /// The limit's name (a rule's `name`, a `rate_limit.name`, or its
    /// descriptor path such as `user` or `path=/login`).
    #[arg(long)]
    pub rule: String,
    /// The key the requests share (e.g. a user id).
    #[arg(long)]
    pub key: String,
    /// How many requests.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub requests: u64,
    /// Time between requests, e.g. `100ms` (default: all at once).
    #[arg(long, default_value = "0s")]
    pub interval: String,
    /// Permits each request asks for.
    #[arg(long, default_value_t = 1)]
    pub cost: u64,
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The configuration does not load.
    #[error("{0}")]
    Config(#[from] LoadError),
    /// No limit has that name.
    #[error("no limit named {name:?}; the limits are: {known}")]
    NoSuchRule {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// `--interval` does not parse.
    #[error("--interval: {0}")]
    Interval(String),
    /// The engine refused (a bug: the store is private to this run).
    #[error("engine: {0}")]
    Engine(String),
}

/// Runs the simulation; returns one line per request and a summary.
pub fn simulate(args: &TestArgs) -> Result<String, SimulateError> {
    let (_, limits) = limits::load(&args.config)?;
    let limit = (0..limits.len())
        .filter_map(|id| limits.limit(id))
        .find(|l| *l.name == *args.rule)
        .ok_or_else(|| SimulateError::NoSuchRule {
            name: args.rule.clone(),
            known: (0..limits.len())
                .filter_map(|id| limits.limit(id).map(|l| format!("{:?}", l.name)))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let interval =
        Span::parse(&args.interval).map_err(|e| SimulateError::Interval(e.to_string()))?;
    let mut store = MemoryStore::new(1);
    let quota = limit.quota();
    let mut out = format!(
        "{}: {} per {} ({}, burst {}), key {:?}, cost {}\n",
        limit.name,
        quota.count(),
        quota.per(),
        limit.algorithm().name(),
        quota.burst(),
        args.key,
        args.cost
    );
    let mut allowed = 0u64;
    let start = synthetic_start([quota.per()]);
    for i in 0..args.requests {
        let now = start.plus(Span(interval.as_nanos().saturating_mul(i)));
        let claim = Claim {
            slot: Slot {
                rule_index: 0,
                rule: &limit.rule,
                key: &args.key,
            },
            cost: args.cost,
        };
        let verdict = decide_claims(&mut store, &[claim], now, Span::ZERO)
            .map_err(|e| SimulateError::Engine(e.to_string()))?;
        let Some(d) = verdict.decisions.first().map(|r| r.decision) else {
            continue;
        };
        let at = now.since(start);
        if d.allowed {
            allowed += 1;
            let detail = format!("remaining {}", d.remaining);
            out.push_str(&request_line(i + 1, at, "allowed", &detail));
        } else {
            let detail = format!("retry after {}", d.retry_after);
            out.push_str(&request_line(i + 1, at, "DENIED", &detail));
        }
    }
    let _ = writeln!(
        out,
        "{allowed} of {} allowed, {} denied",
        args.requests,
        args.requests - allowed
    );
    Ok(out)
}

/// One simulated request's line: its number, its time from the start,
/// what it got and the details.
pub(super) fn request_line(number: u64, at: Span, outcome: &str, detail: &str) -> String {
    format!("#{number:<5} t={at} {outcome:<9} {detail}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_window_allows_its_count_then_denies() {
        let dir = std::env::temp_dir().join(format!("sluice-simulate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sluice.yaml");
        std::fs::write(
            &path,
            "domains: [{name: api, descriptors: [{key: user, rate_limit: {unit: minute, requests_per_unit: 3}}]}]",
        )
        .unwrap();
        let args = TestArgs {
            config: path,
            rule: "user".into(),
            key: "alice".into(),
            requests: 5,
            interval: "0s".into(),
            cost: 1,
        };
        let text = simulate(&args).unwrap();
        assert!(text.contains("3 of 5 allowed, 2 denied"), "{text}");
        let missing = simulate(&TestArgs {
            rule: "nope".into(),
            ..args
        })
        .unwrap_err();
        assert!(missing.to_string().contains("\"user\""), "{missing}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
