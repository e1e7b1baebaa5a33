//! The validated limits: per domain, a descriptor tree resolved as
//! envoyproxy/ratelimit resolves it, and every limit with its core rule.
//!
//! The registry is immutable; a reload builds a new one and swaps it in
//! (see [`crate::service::Shared`]), so requests never see half a config.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use sluice_core::algorithm::{AlgorithmKind, Limiter, Quota};
use sluice_core::config::{Config as CoreConfig, ConfigError, MAX_LOG_COUNT};
use sluice_core::policy::{Action, Counts, KeySpec, Matcher, Rule, Scope};

use crate::config::{
    parse_span, BackendKind, DescriptorConfig, DomainConfig, FailureMode, FallbackConfig,
    LimitSpec, Problems,
};
use crate::storage::redis::tick_micros;

/// One limit of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// Position in [`Limits`]: the memory store's partition.
    pub id: usize,
    /// Shown in headers and `replaces`; the `rate_limit.name`, else the
    /// descriptor path (`remote_address/path=/login`).
    pub name: String,
    /// The core rule: quota, limiter, shadow action.
    pub rule: Rule,
    /// Whether it only reports.
    pub shadow: bool,
    /// Names of limits this one replaces.
    pub replaces: Vec<String>,
    /// Per-value statistics wanted.
    pub detailed_metric: bool,
    /// Microseconds per tick in Redis (see `storage::redis`), when representable.
    pub tick_us: Option<u64>,
    /// Prefix of the storage keys: domain and algorithm, hash-tagged by domain.
    pub key_prefix: String,
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

    /// The storage key for a descriptor's entries. Lengths are written out
    /// so that no choice of keys and values can make two descriptors collide.
    pub fn storage_key(&self, entries: &[(String, String)]) -> String {
        let mut key = self.key_prefix.clone();
        for (k, v) in entries {
            let _ = write!(key, ":{}:{k}{}:{v}", k.len(), v.len());
        }
        key
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
    /// The name Envoy sends.
    pub name: String,
    /// Allow or deny when storage fails.
    pub failure_mode: FailureMode,
    /// The local limit enforced during a storage failure (fail-open).
    pub fallback: Option<usize>,
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
    /// Builds the registry from validated-as-we-go domains; problems are
    /// recorded under each domain's path. `backend` decides whether limits
    /// must fit the Redis scripts' arithmetic.
    pub fn build(
        domains: &[(String, DomainConfig)],
        backend: BackendKind,
        problems: &mut Problems,
    ) -> Limits {
        let mut limits = Limits::default();
        for (at, d) in domains {
            if d.name.is_empty() {
                problems.add(format!("{at}.name"), "must not be empty");
                continue;
            }
            if limits.domains.contains_key(&d.name) {
                problems.add(
                    format!("{at}.name"),
                    format!("duplicate domain {:?}", d.name),
                );
                continue;
            }
            let fallback = d
                .fallback
                .as_ref()
                .and_then(|f| limits.add_fallback(&d.name, f, &format!("{at}.fallback"), problems));
            if fallback.is_some() && d.failure_mode == FailureMode::Closed {
                problems.add(
                    format!("{at}.fallback"),
                    "only used with failure_mode: open (closed denies everything)",
                );
            }
            let first_limit = limits.limits.len();
            let roots = limits.nodes(
                &d.name,
                &d.descriptors,
                &format!("{at}.descriptors"),
                "",
                backend,
                problems,
            );
            limits.check_replaces(first_limit, at, problems);
            let rules = limits.rules(d, at, backend, problems);
            limits.domains.insert(
                d.name.clone(),
                Domain {
                    name: d.name.clone(),
                    failure_mode: d.failure_mode,
                    fallback,
                    roots,
                    rules,
                },
            );
        }
        limits
    }

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

    /// Validates the domain's Sluice rules with core (errors keep core's
    /// field paths under the domain's) and registers them by name.
    fn rules(
        &mut self,
        d: &DomainConfig,
        at: &str,
        backend: BackendKind,
        problems: &mut Problems,
    ) -> HashMap<String, usize> {
        let mut by_name = HashMap::new();
        if d.rules.is_empty() {
            return by_name;
        }
        let config = CoreConfig {
            rules: d.rules.clone(),
            ..CoreConfig::default()
        };
        let policy = match config.validate() {
            Ok(policy) => policy,
            Err(ConfigError::Invalid(errors)) => {
                problems.extend_under(at, errors);
                return by_name;
            }
            Err(e) => {
                problems.add(format!("{at}.rules"), e.to_string());
                return by_name;
            }
        };
        for rule in policy.rules {
            let index = d
                .rules
                .iter()
                .position(|r| r.name == rule.name)
                .unwrap_or(0);
            let here = format!("{at}.rules[{index}].limit");
            if check_limit(rule.limiter.kind(), rule.quota, backend, &here, problems) {
                let name = rule.name.clone();
                by_name.insert(
                    name,
                    self.push(make_limit(rule, &d.name, Vec::new(), false)),
                );
            }
        }
        by_name
    }

    fn push(&mut self, mut limit: Limit) -> usize {
        limit.id = self.limits.len();
        self.limits.push(limit);
        self.limits.len() - 1
    }

    fn add_fallback(
        &mut self,
        domain: &str,
        f: &FallbackConfig,
        at: &str,
        problems: &mut Problems,
    ) -> Option<usize> {
        let per = match parse_span(&f.per) {
            Ok(per) => per,
            Err(e) => {
                problems.add(format!("{at}.per"), e);
                return None;
            }
        };
        let algorithm = f.algorithm.unwrap_or_default();
        let spec = quota_or_report(f.count, per, f.burst, at, problems)?;
        let name = format!("{domain}/fallback");
        let rule = descriptor_rule(name, algorithm, spec, false);
        Some(self.push(make_limit(rule, domain, Vec::new(), false)))
    }

    fn nodes(
        &mut self,
        domain: &str,
        configs: &[DescriptorConfig],
        at: &str,
        parent: &str,
        backend: BackendKind,
        problems: &mut Problems,
    ) -> Vec<Node> {
        let mut nodes: Vec<Node> = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let here = format!("{at}[{i}]");
            if c.key.is_empty() {
                problems.add(format!("{here}.key"), "must not be empty");
            }
            let value = match &c.value {
                None => ValueMatch::Any,
                Some(v) => match v.strip_suffix('*') {
                    Some(prefix) => ValueMatch::Prefix(prefix.into()),
                    None => ValueMatch::Exact(v.clone()),
                },
            };
            if nodes.iter().any(|n| n.key == c.key && n.value == value) {
                problems.add(
                    format!("{here}.value"),
                    format!("duplicate descriptor key {:?} with this value", c.key),
                );
            }
            let path = match &c.value {
                Some(v) => format!("{parent}{}={v}", c.key),
                None => format!("{parent}{}", c.key),
            };
            let limit = match &c.rate_limit {
                None => NodeLimit::None,
                Some(rl) => match rl.validate(&format!("{here}.rate_limit"), problems) {
                    None => NodeLimit::None,
                    Some(LimitSpec::Unlimited) => NodeLimit::Unlimited,
                    Some(LimitSpec::Limited { algorithm, quota }) => {
                        let at = format!("{here}.rate_limit");
                        if check_limit(algorithm, quota, backend, &at, problems) {
                            let name = rl.name.clone().unwrap_or_else(|| path.clone());
                            let replaces = rl.replaces.iter().map(|r| r.name.clone()).collect();
                            let rule = descriptor_rule(name, algorithm, quota, c.shadow_mode);
                            let limit = make_limit(rule, domain, replaces, c.detailed_metric);
                            NodeLimit::Limited(self.push(limit))
                        } else {
                            NodeLimit::None
                        }
                    }
                },
            };
            let children = self.nodes(
                domain,
                &c.descriptors,
                &format!("{here}.descriptors"),
                &format!("{path}/"),
                backend,
                problems,
            );
            nodes.push(Node {
                key: c.key.clone(),
                value,
                limit,
                children,
            });
        }
        nodes
    }

    /// Every `replaces` must name a limit of the same domain.
    fn check_replaces(&self, first: usize, at: &str, problems: &mut Problems) {
        let domain_limits = &self.limits[first..];
        for l in domain_limits {
            for r in &l.replaces {
                if !domain_limits.iter().any(|o| &o.name == r) {
                    problems.add(
                        format!("{at}: limit {:?}", l.name),
                        format!("replaces {r:?}, but no limit of this domain has that name"),
                    );
                }
            }
        }
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

fn quota_or_report(
    count: u64,
    per: sluice_core::time::Span,
    burst: Option<u64>,
    at: &str,
    problems: &mut Problems,
) -> Option<Quota> {
    Quota::new(count, per, burst)
        .map_err(|e| problems.add(at, e.to_string()))
        .ok()
}

/// Checks what only this server needs: the log's size bound and, with
/// Redis, that the scripts' double arithmetic stays exact.
fn check_limit(
    algorithm: AlgorithmKind,
    quota: Quota,
    backend: BackendKind,
    at: &str,
    problems: &mut Problems,
) -> bool {
    let mut ok = true;
    if algorithm == AlgorithmKind::SlidingWindowLog && quota.count() > MAX_LOG_COUNT {
        problems.add(
            format!("{at}.requests_per_unit"),
            format!("sliding_window_log keeps one entry per request: at most {MAX_LOG_COUNT}"),
        );
        ok = false;
    }
    if backend == BackendKind::Redis {
        if let Err(e) = tick_micros(&quota) {
            problems.add(at, e.to_string());
            ok = false;
        }
    }
    ok
}

/// The core rule behind a descriptor's limit: keys come from the
/// descriptor, so it matches everything and builds no key itself.
fn descriptor_rule(name: String, algorithm: AlgorithmKind, quota: Quota, shadow: bool) -> Rule {
    Rule {
        name,
        matcher: Matcher::default(),
        key: KeySpec::default(),
        scope: Scope::PerKey,
        counts: Counts::Requests,
        quota,
        limiter: Limiter::new(algorithm, quota),
        cost: 1,
        action: if shadow {
            Action::Shadow
        } else {
            Action::Reject
        },
        priority: 0,
    }
}

fn make_limit(rule: Rule, domain: &str, replaces: Vec<String>, detailed_metric: bool) -> Limit {
    let key_prefix = format!(
        "sluice:{{{domain}}}:{}:{}",
        rule.limiter.kind().name(),
        quota_tag(&rule.quota)
    );
    Limit {
        id: 0,
        tick_us: tick_micros(&rule.quota).ok(),
        name: rule.name.clone(),
        shadow: rule.action == Action::Shadow,
        rule,
        replaces,
        detailed_metric,
        key_prefix,
    }
}

/// The quota in keys: a changed window starts new counters rather than
/// reading old state under different units.
fn quota_tag(quota: &Quota) -> String {
    format!("{}/{}/{}", quota.count(), quota.per(), quota.burst())
}

/// Shared, swappable registry handle.
pub type SharedLimits = Arc<std::sync::RwLock<Arc<Limits>>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DescriptorFile, Problems};

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
            Resolved::Limited(limit) => Some((limit.quota().count(), limit.name.clone())),
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
    fn redis_rejects_limits_beyond_exact_doubles() {
        let (_, problems) = build(
            r#"
domain: edge
descriptors:
  - key: k
    rate_limit: {unit: day, requests_per_unit: 100000000000}
"#,
        );
        let errors: Vec<String> = problems
            .into_vec()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("d.descriptors[0].rate_limit: "),
            "{errors:?}"
        );
    }
}
