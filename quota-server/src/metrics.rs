//! Prometheus metrics (`prometheus-client`), served at `/metrics` in the
//! text exposition format.
//!
//! Labels are bounded: domains and limit names come from the configuration
//! (and the bounded runtime rules), never from request keys; decisions for
//! domains the configuration does not know are not recorded. Recording a
//! decision takes no lock and allocates nothing: each limit of the limits
//! in force has its counters ([`DecisionCounters`], bound when the limits
//! are put in force), and the storage latency histogram is atomic.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::limits::Limit;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// What happened to one limit of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// How many outcomes there are: [`DecisionCounters`] holds one counter each.
const OUTCOMES: usize = 7;

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.label())
    }
}

/// The labels of `sluice_decisions_total`, in their exposition order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    domain: Arc<str>,
    rule: Arc<str>,
    outcome: Outcome,
}

/// The label of `sluice_config_reloads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ReloadResult {
    Ok,
    Failed,
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Failed => "failed",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

/// One limit's `sluice_decisions_total` counters, one per outcome: each is
/// looked up in the family at its first decision (so a series appears
/// only once it counts something, and a reload that keeps a limit's
/// domain and name keeps counting in the same series), then incremented
/// with one atomic add.
#[derive(Debug)]
pub struct DecisionCounters {
    family: Family<DecisionLabels, Counter>,
    domain: Arc<str>,
    rule: Arc<str>,
    by_outcome: [OnceLock<Counter>; OUTCOMES],
}

impl DecisionCounters {
    fn count(&self, outcome: Outcome) {
        let Some(slot) = self.by_outcome.get(outcome as usize) else {
            return;
        };
        slot.get_or_init(|| {
            self.family
                .get_or_create(&DecisionLabels {
                    domain: self.domain.clone(),
                    rule: self.rule.clone(),
                    outcome,
                })
                .clone()
        })
        .inc();
    }
}

/// The decision counters bound to a limit of the limits in force (none
/// for a limit built but not yet put in force). Not part of what a limit
/// is: two limits equal in configuration are equal whatever their
/// counters.
#[derive(Clone, Debug, Default)]
pub struct BoundCounters(pub Option<Arc<DecisionCounters>>);

impl PartialEq for BoundCounters {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for BoundCounters {}

/// A histogram of durations in atomic counters: observing takes no lock
/// (prometheus-client's `Histogram` takes a mutex per observation).
#[derive(Clone, Debug, Default)]
struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    /// Observations per bucket of [`BUCKETS`], not cumulative; the last
    /// one is above every bound (`+Inf`).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let index = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        let cells = &self.0;
        if let Some(bucket) = cells.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        cells.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let cells = &self.0;
        let bounds = BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&cells.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // Relaxed loads while observations go on: the count may differ
        // from the buckets' total by the observations in flight.
        let sum = Duration::from_nanos(cells.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(
            sum,
            cells.count.load(Ordering::Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds of the storage latency buckets, in seconds: the Redis
/// timeout is tens of milliseconds, so the buckets are dense below it.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
];

/// The rule label of decisions made by the access lists, not a limit.
const ACCESS_RULE: &str = "access";

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    storage_latency: AtomicHistogram,
    storage_errors: Counter,
    fallbacks: Counter,
    reloads: Family<ReloadLabels, Counter>,
    access_rule: Arc<str>,
}

impl Default for Metrics {
    fn default() -> Self {
        let decisions = Family::<DecisionLabels, Counter>::default();
        let storage_latency = AtomicHistogram::default();
        let storage_errors = Counter::default();
        let fallbacks = Counter::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        // Both results are shown from the start, at 0.
        for result in [ReloadResult::Ok, ReloadResult::Failed] {
            drop(reloads.get_or_create(&ReloadLabels { result }));
        }
        let mut registry = Registry::default();
        registry.register(
            "sluice_decisions",
            "Limit decisions by domain, rule and outcome",
            decisions.clone(),
        );
        registry.register(
            "sluice_storage_round_trip_seconds",
            "Time of one storage call (a Redis round trip with the redis backend)",
            storage_latency.clone(),
        );
        registry.register(
            "sluice_storage_errors",
            "Storage calls that failed or timed out",
            storage_errors.clone(),
        );
        registry.register(
            "sluice_fallbacks",
            "Requests decided by a domain's local fallback limit while storage failed",
            fallbacks.clone(),
        );
        registry.register(
            "sluice_config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        Metrics {
            registry,
            decisions,
            storage_latency,
            storage_errors,
            fallbacks,
            reloads,
            access_rule: Arc::from(ACCESS_RULE),
        }
    }
}

impl Metrics {
    /// The counters of `domain`'s limit named `rule`, for [`Metrics::decision`].
    pub fn decision_counters(&self, domain: &Arc<str>, rule: &Arc<str>) -> DecisionCounters {
        DecisionCounters {
            family: self.decisions.clone(),
            domain: domain.clone(),
            rule: rule.clone(),
            by_outcome: Default::default(),
        }
    }

    /// Counts one decision of `domain`'s limit `limit`: through the
    /// counters bound to it (see [`crate::limits::Limits::bind_metrics`]),
    /// else through a look-up in the family.
    pub fn decision(&self, domain: &Arc<str>, limit: &Limit, outcome: Outcome) {
        match &limit.counters.0 {
            Some(counters) => counters.count(outcome),
            None => self.count(domain, &limit.name, outcome),
        }
    }

    fn count(&self, domain: &Arc<str>, rule: &Arc<str>, outcome: Outcome) {
        let labels = DecisionLabels {
            domain: domain.clone(),
            rule: rule.clone(),
            outcome,
        };
        self.decisions.get_or_create(&labels).inc();
    }

    /// Counts a request of `domain` settled by the access lists (allowed or
    /// denied), under the rule `access`.
    pub fn access(&self, domain: &Arc<str>, allowed: bool) {
        let outcome = if allowed {
            Outcome::Allowed
        } else {
            Outcome::Denied
        };
        self.count(domain, &self.access_rule, outcome);
    }

    /// Records how long one storage call took.
    pub fn storage_call(&self, elapsed: Duration) {
        self.storage_latency.observe(elapsed);
    }

    /// Counts a failed storage call; returns how many there were so far.
    pub fn storage_error(&self) -> u64 {
        self.storage_errors.inc() + 1
    }

    /// Counts a request decided by a domain's fallback limit.
    pub fn fallback(&self) {
        self.fallbacks.inc();
    }

    /// Counts a configuration reload.
    pub fn reload(&self, ok: bool) {
        let result = if ok {
            ReloadResult::Ok
        } else {
            ReloadResult::Failed
        };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in the encoder, and then the text so far is still worth serving.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(%e, "metrics encoding stopped early");
            let _ = writeln!(out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        let (api, rule): (Arc<str>, Arc<str>) = (Arc::from("api"), Arc::from("user \"x\""));
        // Once through bound counters, once through the family: one series.
        m.decision_counters(&api, &rule).count(Outcome::OverLimit);
        m.count(&api, &rule, Outcome::OverLimit);
        m.access(&api, false);
        m.storage_call(Duration::from_micros(300));
        m.storage_call(Duration::from_secs(2));
        m.reload(true);
        for _ in 0..3 {
            m.storage_error();
        }
        m.fallback();
        let text = m.render();
        for line in [
            "sluice_decisions_total{domain=\"api\",rule=\"user \\\"x\\\"\",outcome=\"over_limit\"} 2",
            "sluice_decisions_total{domain=\"api\",rule=\"access\",outcome=\"denied\"} 1",
            "sluice_storage_round_trip_seconds_bucket{le=\"0.0005\"} 1",
            "sluice_storage_round_trip_seconds_bucket{le=\"+Inf\"} 2",
            "sluice_storage_round_trip_seconds_count 2",
            "sluice_storage_errors_total 3",
            "sluice_fallbacks_total 1",
            "sluice_config_reloads_total{result=\"ok\"} 1",
            "sluice_config_reloads_total{result=\"failed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
