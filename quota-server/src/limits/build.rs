//! Building the limits registry from the configuration: each domain's
//! descriptor tree and Sluice rules, validated as they are read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use sluice_core::algorithm::{AlgorithmKind, Limiter, Quota};
use sluice_core::config::{Config as CoreConfig, ConfigError, MAX_LOG_COUNT};
use sluice_core::policy::{Action, Counts, KeySpec, Matcher, Rule, Scope};

use super::calendar::Calendar;
use super::ticks::tick_micros;
use super::{Domain, Limit, Limits, Node, NodeLimit, ValueMatch};
use crate::config::{
    self, BackendKind, DescriptorConfig, DomainConfig, FailureMode, FallbackConfig, LimitSpec,
    LoadError, Problems, ServerConfig,
};
use crate::metrics::BoundCounters;

/// Reads the configuration at `path` and builds its limits; descriptor
/// files and the TLS CA file are resolved against the file's directory,
/// and the configuration comes back with those paths resolved.
pub fn load(path: &Path) -> Result<(ServerConfig, Limits), LoadError> {
    let config = config::read_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let limits = Limits::compile(&config, base)?;
    Ok((config.resolved(base), limits))
}

impl Limits {
    /// Validates all of `config` and builds its limits; descriptor files
    /// are resolved against `base`.
    pub fn compile(config: &ServerConfig, base: &Path) -> Result<Limits, LoadError> {
        let mut problems = Problems::default();
        config.validate(base, &mut problems);
        let domains = config.domains(base)?;
        let limits = Limits::build(&domains, config.storage.backend, &mut problems);
        if problems.is_empty() {
            Ok(limits)
        } else {
            Err(LoadError::Invalid(problems.into_vec()))
        }
    }

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
                    name: Arc::from(d.name.as_str()),
                    failure_mode: d.failure_mode,
                    fallback,
                    negative_hits: d.negative_hits,
                    roots,
                    rules,
                },
            );
        }
        limits
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
        let (rules, mut calendars): (Vec<_>, Vec<_>) = d
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| r.for_core(&format!("{at}.rules[{i}]"), problems))
            .unzip();
        let config = CoreConfig {
            rules,
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
                .position(|r| r.rule.name == rule.name)
                .unwrap_or(0);
            let here = format!("{at}.rules[{index}].limit");
            let calendar = calendars.get_mut(index).and_then(Option::take);
            if check_limit(rule.limiter.kind(), rule.quota, backend, &here, problems) {
                let name = rule.name.clone();
                let limit = make_limit(rule, &d.name, Vec::new(), calendar);
                by_name.insert(name, self.push(limit));
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
        let per = match f.per.parse() {
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
        Some(self.push(make_limit(rule, domain, Vec::new(), None)))
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
                    Some(LimitSpec::Limited {
                        algorithm,
                        quota,
                        calendar,
                    }) => {
                        let at = format!("{here}.rate_limit");
                        if check_limit(algorithm, quota, backend, &at, problems) {
                            let name = rl.name.clone().unwrap_or_else(|| path.clone());
                            let replaces = rl.replaces.iter().map(|r| r.name.clone()).collect();
                            let rule = descriptor_rule(name, algorithm, quota, c.shadow_mode);
                            let limit = make_limit(rule, domain, replaces, calendar);
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
                if !domain_limits.iter().any(|o| *o.name == **r) {
                    problems.add(
                        format!("{at}: limit {:?}", l.name),
                        format!("replaces {r:?}, but no limit of this domain has that name"),
                    );
                }
            }
        }
    }
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
        if let Err(e) = tick_micros(algorithm, &quota) {
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
        cost_from: None,
        charge: None,
        action: if shadow {
            Action::Shadow
        } else {
            Action::Reject
        },
        block_duration: None,
        priority: 0,
        group: None,
    }
}

fn make_limit(
    rule: Rule,
    domain: &str,
    replaces: Vec<String>,
    calendar: Option<Calendar>,
) -> Limit {
    let key_prefix = format!(
        "sluice:{{{domain}}}:{}:{}",
        rule.limiter.kind().name(),
        quota_tag(&rule.quota, calendar.as_ref())
    );
    Limit {
        id: 0,
        tick_us: tick_micros(rule.limiter.kind(), &rule.quota).ok(),
        calendar,
        name: Arc::from(rule.name.as_str()),
        shadow: rule.action == Action::Shadow,
        rule,
        replaces,
        key_prefix,
        counters: BoundCounters::default(),
    }
}

/// The quota in keys: a changed window (or calendar, or time zone) starts
/// new counters rather than reading old state under different units.
fn quota_tag(quota: &Quota, calendar: Option<&Calendar>) -> String {
    match calendar {
        None => format!("{}/{}/{}", quota.count(), quota.per(), quota.burst()),
        Some(c) => format!(
            "{}/{}@{}/{}",
            quota.count(),
            c.unit().name(),
            c.zone_name(),
            quota.burst()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        let config = ServerConfig::from_yaml(yaml).unwrap();
        match Limits::compile(&config, Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(LoadError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert!(errors("{}").is_empty());
    }

    #[test]
    fn errors_name_their_fields() {
        let found = errors(
            r#"
listen: {grpc: "nowhere", worker_threads: 5000}
storage: {backend: redis}
domains:
  - name: api
    descriptors:
      - key: remote_address
        rate_limit: {requests_per_unit: 0, unit: second}
      - key: path
        rate_limit: {unit: minute}
"#,
        );
        assert_eq!(
            found,
            vec![
                "listen.grpc: \"nowhere\" is not an address such as \"127.0.0.1:8081\"",
                "listen.worker_threads: must be at most 1024 (0: one per CPU)",
                "storage.redis: required when backend is redis",
                "domains[0].descriptors[0].rate_limit.requests_per_unit: must be at least 1",
                "domains[0].descriptors[1].rate_limit.requests_per_unit: required unless unlimited: true",
            ]
        );
    }

    #[test]
    fn calendar_windows_are_checked_with_their_field_paths() {
        let found = errors(
            r#"
domains:
  - name: api
    descriptors:
      - {key: a, rate_limit: {calendar: month, time_zone: Europe/Atlantis, requests_per_unit: 5}}
      - {key: b, rate_limit: {calendar: day, algorithm: gcra, requests_per_unit: 5}}
      - {key: c, rate_limit: {calendar: week, unit: day, requests_per_unit: 5}}
      - {key: d, rate_limit: {unit: day, time_zone: UTC, requests_per_unit: 5}}
      - {key: e, rate_limit: {calendar: month, time_zone: Europe/Paris, requests_per_unit: 5}}
"#,
        );
        assert_eq!(
            found,
            vec![
                "domains[0].descriptors[0].rate_limit.time_zone: unknown time zone \"Europe/Atlantis\": \
                 use an IANA name such as \"Europe/Paris\", \"America/New_York\" or \"UTC\"",
                "domains[0].descriptors[1].rate_limit.calendar: calendar windows are fixed windows: \
                 use algorithm fixed_window (or leave it out), not gcra",
                "domains[0].descriptors[2].rate_limit.calendar: give one window: calendar, or a \
                 fixed length (unit or per), not both",
                "domains[0].descriptors[3].rate_limit.time_zone: only used with calendar: day, week or month",
            ]
        );
        let config = ServerConfig::from_yaml(
            "domains: [{name: api, descriptors: [{key: k, rate_limit: {calendar: month, \
             time_zone: Europe/Paris, requests_per_unit: 10000}}]}]",
        )
        .unwrap();
        let limits = Limits::compile(&config, Path::new(".")).unwrap();
        let limit = limits.limit(0).unwrap();
        assert_eq!(limit.algorithm(), AlgorithmKind::FixedWindow);
        assert_eq!(limit.calendar.as_ref().unwrap().zone_name(), "Europe/Paris");
        assert_eq!(
            limit.key_prefix,
            "sluice:{api}:fixed_window:10000/month@Europe/Paris/10000"
        );
    }

    #[test]
    fn sluice_rules_are_checked_by_core_under_their_domain() {
        let found = errors(
            r#"
domains:
  - name: api
    rules:
      - {name: ok, limit: {count: 5, per: 1s}}
      - {name: bad, limit: {count: 5, per: "1 fortnight"}}
"#,
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("domains[0].rules[1].limit.per: "),
            "{found:?}"
        );
        let config = ServerConfig::from_yaml(
            "domains: [{name: api, rules: [{name: r, limit: {count: 5, per: 1s}, algorithm: gcra}]}]",
        )
        .unwrap();
        let limits = Limits::compile(&config, Path::new(".")).unwrap();
        let domain = limits.domain("api").unwrap();
        let rule = limits.rule(domain, "r").unwrap();
        assert_eq!(rule.quota().count(), 5);
        assert_eq!(rule.algorithm(), AlgorithmKind::Gcra);
    }

    #[test]
    fn redis_timeout_is_bounded() {
        let found = errors("storage: {redis: {url: \"redis://x\", timeout: 30s}}");
        assert_eq!(
            found,
            vec![
                "storage.redis.timeout: must be between 1ms and 5s (tens of milliseconds is usual)"
            ]
        );
    }

    #[test]
    fn redis_urls_and_the_tls_ca_file() {
        assert!(errors("storage: {redis: {url: \"rediss://x:6380\"}}").is_empty());
        assert_eq!(
            errors("storage: {redis: {url: \"http://x\"}}"),
            vec![
                "storage.redis.url: must start with redis:// or rediss:// (TLS): \
                 redis://[user:password@]host:port[/db]"
            ]
        );
        let found = errors("storage: {redis: {url: \"redis://x\", tls_ca_file: no-such.pem}}");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("only applies to rediss://"), "{found:?}");
        assert!(found[1].contains("cannot read ./no-such.pem"), "{found:?}");
        let config =
            ServerConfig::from_yaml("storage: {redis: {url: \"rediss://x\", tls_ca_file: ca.pem}}")
                .unwrap()
                .resolved(Path::new("/etc/sluice"));
        let ca = config.storage.redis.and_then(|r| r.tls_ca_file);
        assert_eq!(ca, Some(PathBuf::from("/etc/sluice/ca.pem")));
    }
}
