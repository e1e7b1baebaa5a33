//! A scenario's run as the page shows it: totals, per-rule tallies, counts
//! over time per rule and key with the remaining budget, and the first
//! requests in detail with the exact headers a client gets.

use serde::Serialize;
use sluice_core::engine::VerdictKind;
use sluice_core::policy::{Policy, SyncMode};
use sluice_core::simulation::{self, Decided, Outcome, RuleMode, Tally};
use sluice_core::store::StoreError;
use sluice_core::time::Span;

use crate::traffic::Requests;

/// How many slices of time the plot has.
pub const BUCKETS: usize = 60;
/// How many (rule, key) lanes are plotted; later keys are summed in one
/// more lane per rule.
pub const MAX_LANES: usize = 16;
/// How many requests are kept in detail (headers and all).
pub const MAX_DETAILED: usize = 2000;

/// What a request got, as plotted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Went through at once (degraded ones included).
    Allowed,
    /// Went through after a delay rule held it.
    Delayed,
    /// Refused by a rule (429) or the deny list (403).
    Limited,
}

impl Class {
    /// The class of a request's fate.
    pub fn of(fate: &Decided) -> Class {
        if !fate.is_allowed() {
            Class::Limited
        } else if fate.held > Span::ZERO {
            Class::Delayed
        } else {
            Class::Allowed
        }
    }
}

/// Requests of each class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Went through at once.
    pub allowed: u64,
    /// Went through after a hold.
    pub delayed: u64,
    /// Refused.
    pub limited: u64,
}

impl Counts {
    fn add(&mut self, class: Class) {
        match class {
            Class::Allowed => self.allowed += 1,
            Class::Delayed => self.delayed += 1,
            Class::Limited => self.limited += 1,
        }
    }
}

/// One slice of a lane: its counts and the budget left after its last
/// request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Slice {
    /// Requests of each class decided in the slice.
    #[serde(flatten)]
    pub counts: Counts,
    /// Permits left after the slice's last request (none without one).
    pub remaining: Option<u64>,
}

/// One rule's key over time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lane {
    /// The rule's name.
    pub rule: String,
    /// The key (`None`: the rule's keys past [`MAX_LANES`], summed).
    pub key: Option<String>,
    /// Most permits usable at once (the remaining budget's scale).
    pub capacity: u64,
    /// Its slices.
    pub slices: Vec<Slice>,
    /// Its totals.
    pub totals: Counts,
}

/// One rule over the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleSummary {
    /// Its name.
    pub name: String,
    /// Its algorithm.
    pub algorithm: &'static str,
    /// How the run treats it, when not as the filter decides it alone.
    pub note: Option<String>,
    /// Requests it let through.
    pub allowed: u64,
    /// Of those, held first.
    pub delayed: u64,
    /// Requests it refused.
    pub limited: u64,
    /// Requests a shadow rule would have refused.
    pub shadow_limited: u64,
    /// Requests a degrade rule let through marked.
    pub degraded: u64,
}

/// One rule's part in a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RulePart {
    /// The rule.
    pub rule: String,
    /// The request's key under it.
    pub key: String,
    /// Whether the rule let it through.
    pub allowed: bool,
    /// Permits left.
    pub remaining: u64,
    /// Permits per window.
    pub limit: u64,
}

/// One request in detail.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestView {
    /// Its number, in sending order.
    pub number: u64,
    /// When it was decided, milliseconds from the start.
    pub at_ms: f64,
    /// Who sent it.
    pub client: String,
    /// `GET /path?query`.
    pub request: String,
    /// What it got.
    pub class: Class,
    /// The status a client sees: 200, 429 or 403.
    pub status: u16,
    /// The rule that refused it.
    pub limited_by: Option<String>,
    /// How long a delay rule held it, milliseconds.
    pub held_ms: f64,
    /// Every applicable rule's decision.
    pub rules: Vec<RulePart>,
    /// The response headers, in order, as the filter sends them.
    pub headers: Vec<(String, String)>,
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Requests sent.
    pub total: u64,
    /// Requests of each class.
    pub totals: Counts,
    /// Refused by the configuration's deny list (counted as limited).
    pub denied: u64,
    /// Each rule's tally.
    pub rules: Vec<RuleSummary>,
    /// Milliseconds each slice spans.
    pub slice_ms: f64,
    /// All requests over time.
    pub slices: Vec<Counts>,
    /// Each plotted (rule, key) over time.
    pub lanes: Vec<Lane>,
    /// The first [`MAX_DETAILED`] requests.
    pub requests: Vec<RequestView>,
}

/// Runs `traffic` through `policy` with core's simulation, as the filter
/// would decide it.
pub fn run(policy: &Policy, traffic: &Requests) -> Result<Report, StoreError> {
    let modes = simulation::rule_modes(policy);
    // Slices span the sending time; held requests decided after it count
    // in the last one.
    let slice = (traffic.last().as_nanos() / BUCKETS as u64).max(1) + 1;
    let mut report = Report {
        total: 0,
        totals: Counts::default(),
        denied: 0,
        rules: Vec::new(),
        slice_ms: slice as f64 / 1e6,
        slices: vec![Counts::default(); BUCKETS],
        lanes: Vec::new(),
        requests: Vec::new(),
    };
    let mut tallies = vec![Tally::default(); policy.rules.len()];
    let mut lane_of: std::collections::HashMap<(usize, String), usize> = Default::default();
    let mut overflow_of: std::collections::HashMap<usize, usize> = Default::default();
    simulation::run(
        policy,
        &traffic.requests,
        traffic.arrivals.iter().copied(),
        |fate| {
            let class = Class::of(&fate);
            let bucket = usize::try_from(fate.at.as_nanos() / slice)
                .map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
            report.total += 1;
            report.totals.add(class);
            report.denied += u64::from(fate.outcome == Outcome::AccessDenied);
            if let Some(s) = report.slices.get_mut(bucket) {
                s.add(class);
            }
            Tally::add(&mut tallies, &fate);
            if let Outcome::Decided(verdict) = &fate.outcome {
                for d in &verdict.decisions {
                    let Some((_, key)) = fate.keys.iter().find(|(i, _)| *i == d.rule_index) else {
                        continue;
                    };
                    let lane = lane(
                        policy,
                        &mut report.lanes,
                        &mut lane_of,
                        &mut overflow_of,
                        d.rule_index,
                        key,
                        d.decision.capacity,
                    );
                    // A request another rule refused took nothing from this
                    // one: its key does not count it (as in the tallies).
                    let class = match verdict.kind {
                        VerdictKind::Limited { rule_index } if rule_index != d.rule_index => {
                            continue
                        }
                        _ => class,
                    };
                    if let Some(lane) = report.lanes.get_mut(lane) {
                        lane.totals.add(class);
                        if let Some(s) = lane.slices.get_mut(bucket) {
                            s.counts.add(class);
                            s.remaining = Some(d.decision.remaining);
                        }
                    }
                }
            }
            if report.requests.len() < MAX_DETAILED {
                report.requests.push(view(policy, traffic, &fate, class));
            }
        },
    )?;
    report.rules = policy
        .rules
        .iter()
        .zip(&tallies)
        .zip(&modes)
        .map(|((rule, t), mode)| RuleSummary {
            name: rule.name.clone(),
            algorithm: rule.limiter.kind().name(),
            note: note(*mode),
            allowed: t.allowed,
            delayed: t.delayed,
            limited: t.limited,
            shadow_limited: t.shadow_limited,
            degraded: t.degraded,
        })
        .collect();
    Ok(report)
}

/// The lane of a rule's key, made on first sight.
fn lane(
    policy: &Policy,
    lanes: &mut Vec<Lane>,
    lane_of: &mut std::collections::HashMap<(usize, String), usize>,
    overflow_of: &mut std::collections::HashMap<usize, usize>,
    rule_index: usize,
    key: &str,
    capacity: u64,
) -> usize {
    if let Some(lane) = lane_of.get(&(rule_index, key.to_owned())) {
        return *lane;
    }
    let rule = policy
        .rules
        .get(rule_index)
        .map_or("", |r| r.name.as_str())
        .to_owned();
    let new = |key| Lane {
        rule: rule.clone(),
        key,
        capacity,
        slices: vec![Slice::default(); BUCKETS],
        totals: Counts::default(),
    };
    if lane_of.len() < MAX_LANES {
        lanes.push(new(Some(key.to_owned())));
        lane_of.insert((rule_index, key.to_owned()), lanes.len() - 1);
        return lanes.len() - 1;
    }
    *overflow_of.entry(rule_index).or_insert_with(|| {
        lanes.push(new(None));
        lanes.len() - 1
    })
}

/// Why a rule is not decided as the filter alone would.
fn note(mode: RuleMode) -> Option<String> {
    let mode_name = |mode| match mode {
        SyncMode::Exact => "exact",
        SyncMode::Leased(_) => "leased",
    };
    match mode {
        RuleMode::Local => None,
        RuleMode::SkippedStreams => Some("counts stream messages or bytes: not simulated".into()),
        RuleMode::Fallback(m) => Some(format!(
            "synced ({}): the quota server decides it for the fleet; simulated with its local fallback limit",
            mode_name(m)
        )),
        RuleMode::SkippedSynced(m) => Some(format!(
            "synced ({}) without a fallback limit: the quota server decides it; skipped",
            mode_name(m)
        )),
    }
}

/// One request in detail.
fn view(policy: &Policy, traffic: &Requests, fate: &Decided, class: Class) -> RequestView {
    let request = traffic.requests.get(fate.request);
    let what = request.map_or_else(String::new, simulation::request_text);
    let rule_name = |i: usize| {
        policy
            .rules
            .get(i)
            .map_or("", |r| r.name.as_str())
            .to_owned()
    };
    let (status, limited_by, rules, headers) = match &fate.outcome {
        Outcome::AccessAllowed => (200, None, Vec::new(), Vec::new()),
        Outcome::AccessDenied => (403, Some("(deny list)".to_owned()), Vec::new(), Vec::new()),
        Outcome::Decided(verdict) => {
            let rules = verdict
                .decisions
                .iter()
                .map(|d| RulePart {
                    rule: rule_name(d.rule_index),
                    key: fate
                        .keys
                        .iter()
                        .find(|(i, _)| *i == d.rule_index)
                        .map_or_else(String::new, |(_, k)| k.clone()),
                    allowed: d.decision.allowed,
                    remaining: d.decision.remaining,
                    limit: d.decision.limit,
                })
                .collect();
            let (status, limited_by, sent) = match verdict.kind {
                VerdictKind::Limited { rule_index } => (429, Some(rule_name(rule_index)), true),
                _ => (
                    200,
                    None,
                    policy.headers_on_allowed || verdict.is_degraded(),
                ),
            };
            let headers = if sent {
                simulation::headers(policy, verdict)
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v))
                    .collect()
            } else {
                Vec::new()
            };
            (status, limited_by, rules, headers)
        }
    };
    RequestView {
        number: fate.number,
        at_ms: fate.at.as_nanos() as f64 / 1e6,
        client: traffic
            .clients
            .get(fate.request)
            .cloned()
            .unwrap_or_default(),
        request: what,
        class,
        status,
        limited_by,
        held_ms: fate.held.as_nanos() as f64 / 1e6,
        rules,
        headers,
    }
}
