//! The validated limits: per domain, a descriptor tree resolved as
//! envoyproxy/ratelimit resolves it, and every limit with its core rule.
//! Built from the configuration by [`build`]; looked up here.
//!
//! The registry is immutable; a reload builds a new one and swaps it in,
//! so requests never see half a config.

mod build;
pub mod calendar;
pub mod ticks;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use sluice_core::algorithm::{AlgorithmKind, FixedWindow, Limiter, Outcome, Quota};
use sluice_core::decision::Decision;
use sluice_core::policy::Rule;
use sluice_core::time::{Nanos, Span};

pub use build::load;
use calendar::{Calendar, Window};

use crate::config::FailureMode;
use crate::metrics::{BoundCounters, Metrics};

/// One limit of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Position in [`Limits`]: the memory store's partition.
    pub id: usize,
    /// Shown in headers, metrics and `replaces`; the `rate_limit.name`,
    /// else the descriptor path (`remote_address/path=/login`). Shared, so
    /// that a metric label costs no allocation.
    pub name: Arc<str>,
    /// The core rule: quota, limiter, shadow action.
    pub rule: Rule,
    /// Whether it only reports.
    pub shadow: bool,
    /// Names of limits this one replaces.
    pub replaces: Vec<String>,
    /// Microseconds per tick in Redis (see `storage::redis`), when representable.
    pub tick_us: Option<u64>,
    /// Prefix of the storage keys: domain and algorithm, hash-tagged by domain.
    pub key_prefix: String,
    /// The calendar of a fixed window following one (a month in a time
    /// zone); its windows replace the quota's period.
    pub calendar: Option<Calendar>,
    /// Its decision counters once the limits are in force.
    pub counters: BoundCounters,
}

impl Limit {
    /// The quota.
    pub fn quota(&self) -> Quota {
        self.rule.quota
    }

    /// The algorithm.
    pub fn algorithm(&self) -> AlgorithmKind {
        self.rule.limiter.kind()
    }

    /// The calendar window containing `now`, for a limit that has one.
    pub fn calendar_window(&self, now: Nanos) -> Option<Window> {
        self.calendar.as_ref().map(|c| c.window_at(now))
    }

    /// The length of the window containing `now`: the calendar's (a
    /// month's days, a day's 23 to 25 hours), else the quota's period.
    pub fn window_length(&self, now: Nanos) -> Span {
        self.calendar_window(now)
            .map_or(self.quota().per(), |w| w.length())
    }

    /// What `outcome` means for headers, with the window of `now`.
    pub fn decision(&self, outcome: &Outcome, now: Nanos) -> Decision {
        let mut decision = Decision::new(&self.quota(), outcome);
        decision.window = self.window_length(now);
        decision
    }

    /// The core rule deciding at `now`: the limit's own, or for a calendar
    /// window a copy whose fixed window is the one containing `now`.
    pub fn rule_at(&self, now: Nanos) -> Cow<'_, Rule> {
        match self.calendar_window(now) {
            None => Cow::Borrowed(&self.rule),
            Some(w) => {
                let mut rule = self.rule.clone();
                rule.limiter =
                    Limiter::FixedWindow(FixedWindow::within(self.quota(), w.start, w.end));
                Cow::Owned(rule)
            }
        }
    }

    /// The storage key for a descriptor's entries. Lengths are written out
    /// so that no choice of keys and values can make two descriptors
    /// collide; a part longer than [`MAX_STORED_PART`] is stored as the
    /// SHA-256 of all of it, so a key's size is bounded whatever a client
    /// sends, and long values differing anywhere keep distinct counters.
    pub fn storage_key<K: AsRef<str>, V: AsRef<str>>(&self, entries: &[(K, V)]) -> String {
        // Sized once: a key is built per decision, and growing it from the
        // prefix's size would reallocate on every one.
        let room = entries
            .iter()
            .map(|(k, v)| stored_len(k.as_ref()) + stored_len(v.as_ref()) + 1)
            .fold(self.key_prefix.len(), usize::saturating_add);
        let mut key = String::with_capacity(room);
        key.push_str(&self.key_prefix);
        for (k, v) in entries {
            key.push(':');
            write_part(&mut key, k.as_ref());
            write_part(&mut key, v.as_ref());
        }
        key
    }
}

/// Longest key or value written into a storage key as it is.
pub const MAX_STORED_PART: usize = 64;

/// The length [`write_part`] writes for `text`: its length's digits, the
/// separator, then the text or its digest in hex.
fn stored_len(text: &str) -> usize {
    let digits = text.len().checked_ilog10().map_or(1, |d| d as usize + 1);
    digits + 1 + text.len().min(MAX_STORED_PART)
}

/// Appends `len:text`, or `len#` and the hex SHA-256 of `text` when it is
/// longer than [`MAX_STORED_PART`] (`#` never follows a literal's length).
fn write_part(out: &mut String, text: &str) {
    if text.len() <= MAX_STORED_PART {
        let _ = write!(out, "{}:{text}", text.len());
        return;
    }
    let _ = write!(out, "{}#", text.len());
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    for byte in digest.as_ref() {
        let _ = write!(out, "{byte:02x}");
    }
}

/// How a node's value matches an entry's value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ValueMatch {
    /// No value given: any value, each with its own counter.
    Any,
    /// Exactly this value.
    Exact(String),
    /// A value starting with this (written `prefix*`).
    Prefix(String),
}

/// What a node does for a descriptor ending at it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NodeLimit {
    None,
    Unlimited,
    Limited(usize),
}

#[derive(Clone, Debug)]
struct Node {
    key: String,
    value: ValueMatch,
    limit: NodeLimit,
    children: Vec<Node>,
}

/// What a descriptor resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// No limit applies.
    NoLimit,
    /// `unlimited: true`.
    Unlimited,
    /// This limit.
    Limited(&'a Limit),
}

/// One domain: failure handling and its descriptor tree.
#[derive(Clone, Debug)]
pub struct Domain {
    /// The name Envoy sends (shared, for metric labels).
    pub name: Arc<str>,
    /// Allow or deny when storage fails.
    pub failure_mode: FailureMode,
    /// The local limit enforced during a storage failure (fail-open).
    pub fallback: Option<usize>,
    /// Whether `is_negative_hits` descriptors may give hits back.
    pub negative_hits: bool,
    roots: Vec<Node>,
    /// Sluice rules by name (for Sluice's own API, which names them).
    rules: HashMap<String, usize>,
}

/// Every domain and limit.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    domains: HashMap<String, Domain>,
    limits: Vec<Limit>,
}

impl Limits {
    /// The domain named `name`.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// The Sluice rule `name` of `domain`.
    pub fn rule(&self, domain: &Domain, name: &str) -> Option<&Limit> {
        domain.rules.get(name).and_then(|&id| self.limits.get(id))
    }

    /// The limit with this id.
    pub fn limit(&self, id: usize) -> Option<&Limit> {
        self.limits.get(id)
    }

    /// How many limits (including fallbacks) there are.
    pub fn len(&self) -> usize {
        self.limits.len()
    }

    /// Whether there are no limits.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Domain names, sorted.
    pub fn domain_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.domains.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Resolves a descriptor's entries in `domain`, as envoyproxy/ratelimit
    /// does: level by level, an exact value beats a prefix (the longest)
    /// beats a node without value; the node reached by the last entry decides.
    pub fn resolve(&self, domain: &Domain, entries: &[(String, String)]) -> Resolved<'_> {
        let mut level = &domain.roots;
        let mut reached = None;
        for (k, v) in entries {
            let Some(node) = best_match(level, k, v) else {
                return Resolved::NoLimit;
            };
            reached = Some(node);
            level = &node.children;
        }
        match reached.map(|n| &n.limit) {
            Some(NodeLimit::Unlimited) => Resolved::Unlimited,
            Some(NodeLimit::Limited(id)) => self
                .limits
                .get(*id)
                .map_or(Resolved::NoLimit, Resolved::Limited),
            Some(NodeLimit::None) | None => Resolved::NoLimit,
        }
    }
}

impl Limits {
    /// Binds every limit to its decision counters in `metrics`, so that
    /// counting a decision is one atomic add (see [`Metrics::decision`]):
    /// done as the limits are put in force.
    pub fn bind_metrics(&mut self, metrics: &Metrics) {
        let mut domain_of: Vec<Option<Arc<str>>> = vec![None; self.limits.len()];
        for domain in self.domains.values() {
            let mut ids: Vec<usize> = domain.rules.values().copied().collect();
            limit_ids(&domain.roots, &mut ids);
            for id in ids {
                if let Some(slot) = domain_of.get_mut(id) {
                    *slot = Some(domain.name.clone());
                }
            }
        }
        for (limit, domain) in self.limits.iter_mut().zip(domain_of) {
            if let Some(domain) = domain {
                let counters = metrics.decision_counters(&domain, &limit.name);
                limit.counters = BoundCounters(Some(Arc::new(counters)));
            }
        }
    }
}

/// Appends the ids of the limits of `nodes` and their descendants.
fn limit_ids(nodes: &[Node], ids: &mut Vec<usize>) {
    for node in nodes {
        if let NodeLimit::Limited(id) = node.limit {
            ids.push(id);
        }
        limit_ids(&node.children, ids);
    }
}

fn best_match<'a>(level: &'a [Node], key: &str, value: &str) -> Option<&'a Node> {
    let candidates = level.iter().filter(|n| n.key == key);
    let rank = |n: &&Node| match &n.value {
        ValueMatch::Exact(v) if v == value => Some((2, v.len())),
        ValueMatch::Prefix(p) if value.starts_with(p.as_str()) => Some((1, p.len())),
        ValueMatch::Any => Some((0, 0)),
        _ => None,
    };
    candidates
        .filter_map(|n| rank(&n).map(|r| (r, n)))
        .max_by_key(|(r, _)| *r)
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, DescriptorFile, DomainConfig, Problems};

    fn build(yaml: &str) -> (Limits, Problems) {
        let file: DescriptorFile = serde_norway::from_str(yaml).unwrap();
        let domain = DomainConfig {
            name: file.domain,
            descriptors: file.descriptors,
            ..DomainConfig::default()
        };
        let mut problems = Problems::default();
        let limits = Limits::build(&[("d".into(), domain)], BackendKind::Redis, &mut problems);
        (limits, problems)
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FILE: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: path
    rate_limit: {unit: hour, requests_per_unit: 1000}
  - key: client
    descriptors:
      - key: plan
        value: free
        rate_limit: {unit: day, requests_per_unit: 50}
      - key: plan
        value: internal
        rate_limit: {unlimited: true}
"#;

    fn limited(l: &Limits, pairs: &[(&str, &str)]) -> Option<(u64, String)> {
        let domain = l.domain("edge").unwrap();
        match l.resolve(domain, &entries(pairs)) {
            Resolved::Limited(limit) => Some((limit.quota().count(), limit.name.to_string())),
            _ => None,
        }
    }

    #[test]
    fn most_specific_value_wins() {
        let (l, problems) = build(FILE);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            limited(&l, &[("path", "/login")]),
            Some((5, "path=/login".into()))
        );
        assert_eq!(limited(&l, &[("path", "/api/x")]).map(|x| x.0), Some(100));
        assert_eq!(limited(&l, &[("path", "/other")]).map(|x| x.0), Some(1000));
        assert_eq!(
            limited(&l, &[("remote_address", "1.2.3.4")]).map(|x| x.0),
            Some(10)
        );
    }

    #[test]
    fn nested_entries_must_all_match() {
        let (l, _) = build(FILE);
        assert_eq!(
            limited(&l, &[("client", "a"), ("plan", "free")]),
            Some((50, "client/plan=free".into()))
        );
        assert_eq!(limited(&l, &[("client", "a")]), None);
        assert_eq!(limited(&l, &[("client", "a"), ("plan", "gold")]), None);
        assert_eq!(
            limited(&l, &[("remote_address", "x"), ("extra", "y")]),
            None
        );
        let domain = l.domain("edge").unwrap();
        assert_eq!(
            l.resolve(domain, &entries(&[("client", "a"), ("plan", "internal")])),
            Resolved::Unlimited
        );
    }

    #[test]
    fn storage_keys_do_not_collide() {
        let (l, _) = build(FILE);
        let limit = l.limit(0).unwrap();
        let a = limit.storage_key(&entries(&[("a:1", "b")]));
        let b = limit.storage_key(&entries(&[("a", "1:b")]));
        assert_ne!(a, b);
        assert!(a.starts_with("sluice:{edge}:fixed_window:"));
    }

    #[test]
    fn long_parts_are_hashed_whole() {
        let (l, _) = build(FILE);
        let limit = l.limit(0).unwrap();
        let long = "v".repeat(60_000);
        let a = limit.storage_key(&entries(&[("user", &format!("{long}a"))]));
        let b = limit.storage_key(&entries(&[("user", &format!("{long}b"))]));
        assert_ne!(a, b, "values sharing a long prefix keep distinct keys");
        assert!(a.len() < limit.key_prefix.len() + 100, "{a}");
        let short = limit.storage_key(&entries(&[("user", "v")]));
        assert!(short.ends_with(":4:user1:v"), "{short}");
        // A literal of hex-like text cannot meet a hashed part's form.
        let edge = "x".repeat(MAX_STORED_PART);
        let literal = limit.storage_key(&entries(&[("user", &edge)]));
        assert!(literal.ends_with(&format!("64:{edge}")), "{literal}");
        for key in [&a, &b, &short, &literal] {
            assert_eq!(key.len(), key.capacity(), "sized exactly, once: {key}");
        }
    }

    #[test]
    fn redis_rejects_limits_beyond_exact_doubles() {
        let (_, problems) = build(
            r#"
domain: edge
descriptors:
  - key: k
    rate_limit: {unit: day, requests_per_unit: 100000000000, algorithm: gcra}
  - key: fixed
    rate_limit: {unit: day, requests_per_unit: 100000000000}
"#,
        );
        let errors: Vec<String> = problems
            .into_vec()
            .iter()
            .map(ToString::to_string)
            .collect();
        // A fixed window only compares counts and times: the same count fits.
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("d.descriptors[0].rate_limit: "),
            "{errors:?}"
        );
    }
}
