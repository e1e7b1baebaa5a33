//! The filter's Envoy stats.
//!
//! Names are `sluice_http.rule.<rule>.outcome.<outcome>`; the example
//! Envoy configs carry `stats_tags` that turn them into Prometheus labels
//! (`sluice_http{rule="...",outcome="..."}`). Labels stay bounded: rules
//! and outcomes, never keys.

use crate::host::{Host, MetricId};
use sluice_core::policy::Policy;

/// What happened to a request, for one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The rule allowed it (and the request went through).
    Allowed,
    /// The rule limited it.
    Limited,
    /// A shadow rule would have limited it.
    ShadowLimited,
    /// The rule held it before allowing it.
    Delayed,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Allowed,
        Outcome::Limited,
        Outcome::ShadowLimited,
        Outcome::Delayed,
    ];

    /// The name in stats.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Limited => "limited",
            Outcome::ShadowLimited => "shadow_limited",
            Outcome::Delayed => "delayed",
        }
    }

    fn slot(self) -> usize {
        match self {
            Outcome::Allowed => 0,
            Outcome::Limited => 1,
            Outcome::ShadowLimited => 2,
            Outcome::Delayed => 3,
        }
    }
}

/// Counter ids, defined once per VM at configuration time.
#[derive(Debug, Default)]
pub struct Metrics {
    per_rule: Vec<[Option<MetricId>; 4]>,
    errors: Option<MetricId>,
    evictions: Option<MetricId>,
}

impl Metrics {
    /// Defines the counters for `policy`'s rules.
    pub fn define(host: &impl Host, policy: &Policy) -> Metrics {
        let per_rule = policy
            .rules
            .iter()
            .map(|rule| {
                Outcome::ALL.map(|o| {
                    host.define_counter(&format!(
                        "sluice_http.rule.{}.outcome.{}",
                        rule.name,
                        o.name()
                    ))
                })
            })
            .collect();
        Metrics {
            per_rule,
            errors: host.define_counter("sluice_http.errors"),
            evictions: host.define_counter("sluice_http.live_evictions"),
        }
    }

    /// Counts one outcome of the rule at `rule_index`.
    pub fn count(&self, host: &impl Host, rule_index: usize, outcome: Outcome) {
        if let Some(Some(id)) = self.per_rule.get(rule_index).map(|ids| ids[outcome.slot()]) {
            host.increment(id, 1);
        }
    }

    /// Counts an internal failure (the request was let through).
    pub fn error(&self, host: &impl Host) {
        if let Some(id) = self.errors {
            host.increment(id, 1);
        }
    }

    /// Counts keys that displaced a live key in a full slot table.
    pub fn evictions(&self, host: &impl Host, n: u64) {
        if let (Some(id), true) = (self.evictions, n > 0) {
            host.increment(id, n);
        }
    }
}
