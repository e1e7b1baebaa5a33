//! The filter's Envoy stats.
//!
//! Counters `sluice_<protocol>.rule.<rule>.outcome.<outcome>` (protocol
//! `http`, `grpc` or `websocket`) and gauges `sluice_grpc.rule.<rule>.in_flight`
//! and `sluice_websocket.rule.<rule>.connections`, and for synced rules
//! `sluice_sync.rule.<rule>.outcome.<sync outcome>`, and with synced rules
//! `sluice_access.outcome.<allowed|denied>` for requests the quota server's
//! access controls decided; the example Envoy configs
//! carry `stats_tags` that turn the rule and outcome segments into
//! Prometheus labels. Labels stay bounded: rules and outcomes, never keys.
//!
//! Outcome counters (rule, sync and access outcomes) are counted on every
//! request, and each host call costs Envoy about as much as a small part
//! of the filter: their increments gather in the VM and reach Envoy in one
//! call per counter per flush. A flush happens when a counter has
//! [`FLUSH_AT_COUNT`] increments waiting, when a request finds the last
//! flush [`FLUSH_EVERY`] old, and on the root context's tick (which runs
//! while increments wait, so stats settle when traffic stops). The gauges
//! of open calls and connections move twice per stream (up when it opens,
//! down when it ends): their deltas gather the same way and reach Envoy
//! summed at the same flushes, so a short call opened and ended between
//! two flushes costs no host call. They are for watching, not deciding
//! (in-flight limits keep their own counts), so a lag of up to a flush
//! interval is harmless. The error and key counters are rare: they reach
//! Envoy at once.

use std::cell::Cell;

use crate::host::{Host, MetricId};
use sluice_core::policy::{Policy, Protocol, Rule};
use sluice_core::store::SlotStats;
use sluice_core::time::{Nanos, Span};

/// Increments of one counter that make it reach Envoy at once.
pub const FLUSH_AT_COUNT: u64 = 1024;
/// How old the last flush may get before a request flushes every counter.
pub const FLUSH_EVERY: Span = Span::SECOND;
/// The tick period while increments wait and nothing else ticks faster.
pub const FLUSH_TICK_MILLIS: u32 = 1000;

/// A counter defined with the host and the increments not yet sent to it.
#[derive(Debug)]
struct Counter {
    id: MetricId,
    pending: Cell<u64>,
}

impl Counter {
    fn new(id: Option<MetricId>) -> Option<Counter> {
        id.map(|id| Counter {
            id,
            pending: Cell::new(0),
        })
    }

    /// Sends the waiting increments to the host.
    fn flush(&self, host: &impl Host) {
        let pending = self.pending.replace(0);
        if pending > 0 {
            host.increment(self.id, pending);
        }
    }
}

/// A gauge defined with the host and the net delta not yet sent to it.
#[derive(Debug)]
struct Gauge {
    id: MetricId,
    pending: Cell<i64>,
}

impl Gauge {
    /// Sends the waiting delta to the host, if the moves since the last
    /// flush did not cancel out.
    fn flush(&self, host: &impl Host) {
        let pending = self.pending.replace(0);
        if pending != 0 {
            host.add_to_gauge(self.id, pending);
        }
    }
}

/// What happened to a request or message, for one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The rule allowed it (and it went through).
    Allowed,
    /// The rule limited it.
    Limited,
    /// A shadow rule would have limited it.
    ShadowLimited,
    /// The rule delayed it before allowing it.
    Delayed,
    /// The rule discarded a WebSocket message.
    Dropped,
    /// A degrade rule limited it: it went through marked for the upstream.
    Degraded,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::Limited,
        Outcome::ShadowLimited,
        Outcome::Delayed,
        Outcome::Dropped,
        Outcome::Degraded,
    ];

    /// The name in stats.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Limited => "limited",
            Outcome::ShadowLimited => "shadow_limited",
            Outcome::Delayed => "delayed",
            Outcome::Dropped => "dropped",
            Outcome::Degraded => "degraded",
        }
    }
}

/// How a synced rule's quota server call went, for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The quota server decided.
    Ok,
    /// The call failed and the rule let the request through (or applied
    /// its fallback limit).
    FailedOpen,
    /// The call failed and the rule refused the request.
    FailedClosed,
    /// No answer within the timeout (the failure mode applied).
    Timeout,
}

impl SyncOutcome {
    const ALL: [SyncOutcome; 4] = [
        SyncOutcome::Ok,
        SyncOutcome::FailedOpen,
        SyncOutcome::FailedClosed,
        SyncOutcome::Timeout,
    ];

    /// The name in stats.
    pub fn name(self) -> &'static str {
        match self {
            SyncOutcome::Ok => "ok",
            SyncOutcome::FailedOpen => "failed_open",
            SyncOutcome::FailedClosed => "failed_closed",
            SyncOutcome::Timeout => "timeout",
        }
    }
}

/// What the quota server's access controls decided for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessOutcome {
    /// Allow-listed: it bypassed every rule.
    Allowed,
    /// Deny-listed or banned: refused before the rules.
    Denied,
}

impl AccessOutcome {
    const ALL: [AccessOutcome; 2] = [AccessOutcome::Allowed, AccessOutcome::Denied];

    /// The name in stats.
    pub fn name(self) -> &'static str {
        match self {
            AccessOutcome::Allowed => "allowed",
            AccessOutcome::Denied => "denied",
        }
    }
}

fn protocol_slot(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Http => 0,
        Protocol::Grpc => 1,
        Protocol::WebSocket => 2,
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http => "http",
        Protocol::Grpc => "grpc",
        Protocol::WebSocket => "websocket",
    }
}

/// The protocols a rule can see: its own if it matches on one, else every
/// protocol the policy tells apart.
fn protocols(rule: &Rule, policy_tells_protocols: bool) -> &'static [Protocol] {
    match (
        &rule.matcher.grpc,
        rule.matcher.websocket,
        policy_tells_protocols,
    ) {
        (Some(_), _, _) => &[Protocol::Grpc],
        (None, true, _) => &[Protocol::WebSocket],
        (None, false, true) => &[Protocol::Http, Protocol::Grpc, Protocol::WebSocket],
        (None, false, false) => &[Protocol::Http],
    }
}

#[derive(Debug, Default)]
struct RuleMetrics {
    /// Per protocol, per outcome.
    outcomes: [[Option<Counter>; Outcome::ALL.len()]; 3],
    /// Open gRPC calls or WebSocket connections the rule applies to.
    open: Option<Gauge>,
    /// Per sync outcome (synced rules only).
    sync: [Option<Counter>; 4],
}

/// Metric ids, defined once per VM at configuration time, and the
/// outcome increments waiting for the next flush.
#[derive(Debug, Default)]
pub struct Metrics {
    per_rule: Vec<RuleMetrics>,
    errors: Option<MetricId>,
    /// Counters of [`SlotStats`], field by field.
    keys: [Option<MetricId>; 3],
    /// Per access outcome (policies with synced rules or access lists only).
    access: [Option<Counter>; 2],
    /// Some counter has increments waiting.
    pending: Cell<bool>,
    /// When a request last flushed (ticks flush whatever the time).
    flushed_at: Cell<Nanos>,
}

impl Metrics {
    /// Defines the stats for `policy`'s rules.
    pub fn define(host: &impl Host, policy: &Policy) -> Metrics {
        let tells = policy.needs_protocol();
        let per_rule = policy
            .rules
            .iter()
            .enumerate()
            .map(|(rule_index, rule)| {
                let mut m = RuleMetrics::default();
                if policy.sync_of(rule_index).is_some() {
                    m.sync = SyncOutcome::ALL.map(|o| {
                        Counter::new(host.define_counter(&format!(
                            "sluice_sync.rule.{}.outcome.{}",
                            rule.name,
                            o.name()
                        )))
                    });
                }
                for &protocol in protocols(rule, tells) {
                    let Some(outcomes) = m.outcomes.get_mut(protocol_slot(protocol)) else {
                        continue;
                    };
                    *outcomes = Outcome::ALL.map(|o| {
                        Counter::new(host.define_counter(&format!(
                            "sluice_{}.rule.{}.outcome.{}",
                            protocol_name(protocol),
                            rule.name,
                            o.name()
                        )))
                    });
                }
                let gauge = match (&rule.matcher.grpc, rule.matcher.websocket) {
                    (Some(_), _) => {
                        host.define_gauge(&format!("sluice_grpc.rule.{}.in_flight", rule.name))
                    }
                    (None, true) => host
                        .define_gauge(&format!("sluice_websocket.rule.{}.connections", rule.name)),
                    (None, false) => None,
                };
                m.open = gauge.map(|id| Gauge {
                    id,
                    pending: Cell::new(0),
                });
                m
            })
            .collect();
        Metrics {
            per_rule,
            errors: host.define_counter("sluice_http.errors"),
            keys: [
                "sluice_http.live_evictions",
                "sluice_http.new_keys_overflowed",
                "sluice_http.new_keys_refused",
            ]
            .map(|name| host.define_counter(name)),
            access: if policy.synced.is_empty() && policy.access.is_empty() {
                Default::default()
            } else {
                AccessOutcome::ALL.map(|o| {
                    Counter::new(
                        host.define_counter(&format!("sluice_access.outcome.{}", o.name())),
                    )
                })
            },
            pending: Cell::new(false),
            flushed_at: Cell::new(Nanos::ZERO),
        }
    }

    /// Adds one to `counter`, sending it on at once when enough waited.
    fn add_one(&self, host: &impl Host, counter: &Counter) {
        let pending = counter.pending.get().saturating_add(1);
        if pending >= FLUSH_AT_COUNT {
            counter.pending.set(0);
            host.increment(counter.id, pending);
        } else {
            counter.pending.set(pending);
            self.pending.set(true);
        }
    }

    /// Every counter of the outcomes, sync outcomes and access outcomes.
    fn counters(&self) -> impl Iterator<Item = &Counter> {
        self.per_rule
            .iter()
            .flat_map(|m| m.outcomes.iter().flatten().chain(&m.sync))
            .chain(&self.access)
            .flatten()
    }

    /// Whether increments (or gauge deltas) wait for a flush (the root
    /// context then ticks).
    pub fn has_pending(&self) -> bool {
        self.pending.get()
    }

    /// Sends every waiting increment and gauge delta to the host.
    pub fn flush(&self, host: &impl Host) {
        if self.pending.replace(false) {
            for counter in self.counters() {
                counter.flush(host);
            }
            for gauge in self.per_rule.iter().filter_map(|m| m.open.as_ref()) {
                gauge.flush(host);
            }
        }
    }

    /// Flushes if the last flush by a request or a fast tick is
    /// [`FLUSH_EVERY`] older than `now` (a clock reading the caller
    /// already made).
    pub fn flush_if_due(&self, host: &impl Host, now: Nanos) {
        if self.pending.get() && now.since(self.flushed_at.get()) >= FLUSH_EVERY {
            self.flushed_at.set(now);
            self.flush(host);
        }
    }

    /// Counts a request the access controls decided.
    pub fn access(&self, host: &impl Host, outcome: AccessOutcome) {
        if let Some(Some(counter)) = self.access.get(outcome as usize) {
            self.add_one(host, counter);
        }
    }

    /// Counts one outcome of the rule at `rule_index` for a `protocol` request.
    pub fn count(&self, host: &impl Host, protocol: Protocol, rule_index: usize, outcome: Outcome) {
        let counter = self
            .per_rule
            .get(rule_index)
            .and_then(|m| m.outcomes.get(protocol_slot(protocol)))
            .and_then(|outcomes| outcomes.get(outcome as usize))
            .and_then(Option::as_ref);
        if let Some(counter) = counter {
            self.add_one(host, counter);
        }
    }

    /// Counts how the quota server call went for the synced rule at `rule_index`.
    pub fn sync(&self, host: &impl Host, rule_index: usize, outcome: SyncOutcome) {
        let counter = self
            .per_rule
            .get(rule_index)
            .and_then(|m| m.sync.get(outcome as usize))
            .and_then(Option::as_ref);
        if let Some(counter) = counter {
            self.add_one(host, counter);
        }
    }

    /// Moves the open-streams gauge of the rule at `rule_index` by `delta`
    /// at the next flush; true if it has one.
    pub fn open(&self, rule_index: usize, delta: i64) -> bool {
        match self.per_rule.get(rule_index).and_then(|m| m.open.as_ref()) {
            Some(gauge) if delta != 0 => {
                gauge.pending.set(gauge.pending.get().saturating_add(delta));
                self.pending.set(true);
                true
            }
            _ => false,
        }
    }

    /// Counts an internal failure (the request was let through).
    pub fn error(&self, host: &impl Host) {
        if let Some(id) = self.errors {
            host.increment(id, 1);
        }
    }

    /// Counts what happened to keys that needed room since `before`:
    /// live keys displaced, new keys sent to the overflow slot or refused.
    pub fn keys(&self, host: &impl Host, before: SlotStats, now: SlotStats) {
        let deltas = [
            now.live_evictions.saturating_sub(before.live_evictions),
            now.overflowed.saturating_sub(before.overflowed),
            now.refused.saturating_sub(before.refused),
        ];
        for (id, n) in self.keys.iter().zip(deltas) {
            if let (Some(id), true) = (id, n > 0) {
                host.increment(*id, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    const NAME: &str = "sluice_http.rule.r.outcome.allowed";

    fn defined(host: &FakeHost) -> Result<Metrics, String> {
        let policy =
            Policy::from_json(r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1s"}}]}"#)
                .map_err(|e| e.to_string())?;
        Ok(Metrics::define(host, &policy))
    }

    fn allowed(metrics: &Metrics, host: &FakeHost, times: u64) {
        for _ in 0..times {
            metrics.count(host, Protocol::Http, 0, Outcome::Allowed);
        }
    }

    #[test]
    fn increments_wait_for_a_flush_and_none_is_lost() -> Result<(), String> {
        let host = FakeHost::default();
        let metrics = defined(&host)?;
        allowed(&metrics, &host, 3);
        assert_eq!(host.counter(NAME), 0, "nothing sent before a flush");
        assert!(metrics.has_pending());
        metrics.flush(&host);
        assert_eq!(host.counter(NAME), 3);
        assert!(!metrics.has_pending());
        metrics.flush(&host);
        assert_eq!(host.counter(NAME), 3, "a flush sends nothing twice");
        Ok(())
    }

    #[test]
    fn a_counter_with_many_waiting_reaches_the_host_at_once() -> Result<(), String> {
        let host = FakeHost::default();
        let metrics = defined(&host)?;
        allowed(&metrics, &host, FLUSH_AT_COUNT - 1);
        assert_eq!(host.counter(NAME), 0);
        allowed(&metrics, &host, 1);
        assert_eq!(host.counter(NAME), FLUSH_AT_COUNT as i64);
        Ok(())
    }

    #[test]
    fn gauge_moves_wait_for_a_flush_and_cancelled_ones_cost_no_call() -> Result<(), String> {
        let host = FakeHost::default();
        let policy = Policy::from_json(
            r#"{"rules":[{"name":"g","match":{"grpc":{}},"limit":{"count":1,"per":"1s"}}]}"#,
        )
        .map_err(|e| e.to_string())?;
        let metrics = Metrics::define(&host, &policy);
        let gauge = "sluice_grpc.rule.g.in_flight";
        assert!(metrics.open(0, 1));
        assert!(metrics.open(0, 1));
        assert_eq!(host.counter(gauge), 0, "nothing sent before a flush");
        assert!(metrics.has_pending());
        metrics.flush(&host);
        assert_eq!(host.counter(gauge), 2);
        // A call that opens and ends between two flushes nets to nothing:
        // the fake host refuses a delta of 0, as Envoy does.
        assert!(metrics.open(0, 1));
        assert!(metrics.open(0, -1));
        metrics.flush(&host);
        assert_eq!(host.counter(gauge), 2);
        assert!(metrics.open(0, -1));
        metrics.flush(&host);
        assert_eq!(host.counter(gauge), 1);
        assert!(!metrics.open(1, 1), "no such rule");
        Ok(())
    }

    #[test]
    fn a_request_flushes_once_the_last_flush_is_old() -> Result<(), String> {
        let host = FakeHost::default();
        let metrics = defined(&host)?;
        let start = Nanos(1_000_000_000_000);
        allowed(&metrics, &host, 1);
        metrics.flush_if_due(&host, start);
        assert_eq!(host.counter(NAME), 1, "the first request flushes");
        allowed(&metrics, &host, 2);
        metrics.flush_if_due(&host, start.plus(Span::from_millis(999)));
        assert_eq!(host.counter(NAME), 1, "too soon after the last flush");
        metrics.flush_if_due(&host, start.plus(FLUSH_EVERY));
        assert_eq!(host.counter(NAME), 3);
        Ok(())
    }
}
