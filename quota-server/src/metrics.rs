//! Prometheus metrics in the text exposition format, served at `/metrics`.
//!
//! Labels are bounded: domains and limit names come from the configuration
//! (and the bounded runtime rules), never from request keys; decisions for
//! domains the configuration does not know are not recorded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::service::{Decided, Source};
use crate::storage::Item;

/// What happened to one limit of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Under the limit.
    Ok,
    /// Over the limit: refused.
    OverLimit,
    /// Over a shadow-mode limit: reported, not refused.
    Shadow,
    /// Storage failed and the domain failed open.
    FailureOpen,
    /// Storage failed and the domain failed closed.
    FailureClosed,
    /// The client is allow-listed: not counted.
    Allowed,
    /// The client is deny-listed or banned.
    Denied,
}

impl Outcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::OverLimit => "over_limit",
            Outcome::Shadow => "shadow",
            Outcome::FailureOpen => "failure_open",
            Outcome::FailureClosed => "failure_closed",
            Outcome::Allowed => "allow_list",
            Outcome::Denied => "denied",
        }
    }
}

/// Upper bounds of the storage latency buckets, in seconds: the Redis
/// timeout is tens of milliseconds, so the buckets are dense below it.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations at or below each bound (not cumulative; summed when rendered).
    counts: [AtomicU64; BUCKETS.len()],
    /// Observations above the last bound.
    over: AtomicU64,
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        match BUCKETS.iter().position(|&b| secs <= b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Storage failure counts kept by the decider, read when rendering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureCounts {
    /// Storage calls that failed or timed out.
    pub storage_errors: u64,
    /// Requests decided by a domain's fallback limit.
    pub fallbacks: u64,
}

/// Every metric the server exports.
#[derive(Debug, Default)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<(String, String, Outcome), u64>>,
    storage_latency: Histogram,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Metrics {
    /// Counts one decision of `domain`'s limit `rule`.
    pub fn decision(&self, domain: &str, rule: &str, outcome: Outcome) {
        // Counted under a lock: a map insert per decision is far below the
        // cost of the storage call it accompanies.
        let mut map = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((domain.to_string(), rule.to_string(), outcome))
            .or_default() += 1;
    }

    /// Counts the decisions of one request's `items` in `domain`.
    pub fn decided(&self, domain: &str, items: &[Item<'_>], decided: &Decided) {
        if items.is_empty() {
            return;
        }
        let mut map = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        for (i, item) in items.iter().enumerate() {
            let got = decided.outcomes.as_ref().and_then(|o| o.get(i));
            let outcome = match (decided.source, got) {
                (Source::FailedClosed, _) => Outcome::FailureClosed,
                (Source::FailedOpen, _) => Outcome::FailureOpen,
                (Source::Storage, Some(o)) if !o.allowed && item.enforce => Outcome::OverLimit,
                (Source::Storage, Some(o)) if !o.allowed => Outcome::Shadow,
                (Source::Storage, _) => Outcome::Ok,
            };
            *map.entry((domain.to_string(), item.limit.name.clone(), outcome))
                .or_default() += 1;
        }
    }

    /// Records how long one storage call took.
    pub fn storage_call(&self, elapsed: Duration) {
        self.storage_latency.observe(elapsed);
    }

    /// Counts a configuration reload.
    pub fn reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful and failed reloads so far.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// The text exposition of every metric.
    pub fn render(&self, failures: FailureCounts) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP sluice_decisions_total Limit decisions by domain, rule and outcome.\n\
             # TYPE sluice_decisions_total counter\n",
        );
        {
            let map = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
            for ((domain, rule, outcome), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "sluice_decisions_total{{domain=\"{}\",rule=\"{}\",outcome=\"{}\"}} {n}",
                    escape(domain),
                    escape(rule),
                    outcome.label()
                );
            }
        }
        out.push_str(
            "# HELP sluice_storage_round_trip_seconds Time of one storage call (a Redis round trip with the redis backend).\n\
             # TYPE sluice_storage_round_trip_seconds histogram\n",
        );
        self.storage_latency
            .render(&mut out, "sluice_storage_round_trip_seconds");
        let (ok, failed) = self.reloads();
        let counters = [
            (
                "sluice_storage_errors_total",
                "Storage calls that failed or timed out.",
                failures.storage_errors,
            ),
            (
                "sluice_fallbacks_total",
                "Requests decided by a domain's local fallback limit while storage failed.",
                failures.fallbacks,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_config_reloads_total Configuration reloads by result.\n\
             # TYPE sluice_config_reloads_total counter\n\
             sluice_config_reloads_total{{result=\"ok\"}} {ok}\n\
             sluice_config_reloads_total{{result=\"failed\"}} {failed}"
        );
        out
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.decision("api", "user \"x\"", Outcome::OverLimit);
        m.decision("api", "user \"x\"", Outcome::OverLimit);
        m.storage_call(Duration::from_micros(300));
        m.storage_call(Duration::from_secs(2));
        m.reload(true);
        let text = m.render(FailureCounts {
            storage_errors: 3,
            fallbacks: 1,
        });
        assert!(text.contains(
            "sluice_decisions_total{domain=\"api\",rule=\"user \\\"x\\\"\",outcome=\"over_limit\"} 2"
        ));
        assert!(text.contains("sluice_storage_round_trip_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("sluice_storage_round_trip_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("sluice_storage_errors_total 3"));
        assert!(text.contains("sluice_config_reloads_total{result=\"ok\"} 1"));
    }
}
