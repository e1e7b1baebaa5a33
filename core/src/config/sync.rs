//! A synced rule's `sync` object into a [`RuleSync`], checked against the
//! rest of the rule: what exact and leased modes can decide remotely.

use alloc::format;
use alloc::string::ToString;

use super::error::Errors;
use super::schema::{
    ActionKind, CountsConfig, FailureModeConfig, RuleConfig, SyncConfig, SyncModeConfig,
};
use crate::lease::LEASE_TIME;
use crate::policy::{Leasing, OnFailure, RuleSync, SyncMode};
use crate::time::Span;

/// The cluster a synced rule calls when it names none.
pub const DEFAULT_QUOTA_CLUSTER: &str = "sluice_quota";
/// How long a request waits for the quota server by default.
pub const DEFAULT_SYNC_TIMEOUT: Span = Span::from_millis(50);
/// The longest `sync.timeout`: a request is held at most this long.
pub const MAX_SYNC_TIMEOUT: Span = Span::from_secs(10);
/// Longest domain and cluster name.
pub const MAX_DOMAIN_NAME: usize = 128;
/// How often a leased key syncs by default.
pub const DEFAULT_SYNC_INTERVAL: Span = Span::from_millis(100);
/// The shortest sync interval: each sync of a key is a quota server call.
pub const MIN_SYNC_INTERVAL: Span = Span::from_millis(10);
/// The longest sync interval: half the longest lease, so that each of a
/// key's two leases is renewed before it expires.
pub const MAX_SYNC_INTERVAL: Span = Span(LEASE_TIME.0 / 2);
/// The most permits one lease holds by default.
pub const DEFAULT_MAX_LEASE: u64 = 100;
/// The largest `max_lease`.
pub const MAX_MAX_LEASE: u64 = 1_000_000;
/// The largest `replicas`.
pub const MAX_REPLICAS: u32 = 10_000;
/// Keys leased at once per Envoy and rule by default.
pub const DEFAULT_LEASED_KEYS: u32 = 1024;
/// The largest `max_keys` of a leased rule: each key has a shared-data
/// cell of about 300 bytes (see [`crate::lease::CELL_BYTES`]).
pub const MAX_LEASED_KEYS: u32 = 65_536;

/// The link of the rule `rule` at `at` (`rules[i]`), or `None` after
/// recording why not.
pub(super) fn validate_sync(
    raw: &SyncConfig,
    rule: &RuleConfig,
    at: &str,
    errors: &mut Errors,
) -> Option<RuleSync> {
    let before = errors.count();
    let mode = match raw.mode {
        SyncModeConfig::Exact => {
            for (field, set) in [
                (".sync.interval", raw.interval.is_some()),
                (".sync.max_lease", raw.max_lease.is_some()),
                (".sync.replicas", raw.replicas.is_some()),
                (".sync.max_keys", raw.max_keys.is_some()),
            ] {
                if set {
                    errors.add(at, field, "only for mode leased; remove it".into());
                }
            }
            SyncMode::Exact
        }
        SyncModeConfig::Leased => {
            let leasing = validate_leasing(raw, at, errors);
            let cost = rule.cost.unwrap_or(1);
            if cost > leasing.max_lease {
                // A lease never holds its cost: every request would ask the
                // quota server while the leases taken for it sit unused.
                errors.add(
                    at,
                    ".cost",
                    format!(
                        "{cost} is more than sync.max_lease ({}): no lease could admit a \
                         request; raise sync.max_lease",
                        leasing.max_lease
                    ),
                );
            }
            if let Some(max) = rule.cost_from.as_ref().map(|c| c.max) {
                if max > leasing.max_lease {
                    errors.add(
                        at,
                        ".cost_from.max",
                        format!(
                            "{max} is more than sync.max_lease ({}): a lease could never admit \
                             a request of that cost; lower it or raise sync.max_lease",
                            leasing.max_lease
                        ),
                    );
                }
            }
            SyncMode::Leased(leasing)
        }
    };
    if rule.limit.is_some() {
        errors.add(
            at,
            ".limit",
            "a synced rule's limit is the quota server's rule of the same name; remove limit \
             (sync.fallback sets a local limit for when the quota server fails)"
                .into(),
        );
    }
    if rule.counts.is_some_and(|c| c != CountsConfig::Requests) {
        errors.add(
            at,
            ".counts",
            "a synced rule counts requests; in-flight and stream rules stay local".into(),
        );
    }
    if rule.action.is_some_and(|a| a != ActionKind::Reject) {
        errors.add(
            at,
            ".action",
            "a synced rule refuses (action reject); a dry run is the quota server rule's shadow"
                .into(),
        );
    }
    if rule.algorithm.is_some() && raw.fallback.is_none() {
        errors.add(
            at,
            ".algorithm",
            "the algorithm of a synced rule is the quota server's; here it only applies to \
             sync.fallback: remove it or add a fallback"
                .into(),
        );
    }
    let cluster = raw
        .cluster
        .clone()
        .unwrap_or_else(|| DEFAULT_QUOTA_CLUSTER.to_string());
    check_name(&cluster, at, ".sync.cluster", errors);
    check_name(&raw.domain, at, ".sync.domain", errors);
    let timeout = match raw.timeout.as_ref().map(|t| t.parse()) {
        None => DEFAULT_SYNC_TIMEOUT,
        Some(Ok(t)) if (Span::MILLISECOND..=MAX_SYNC_TIMEOUT).contains(&t) => t,
        Some(Ok(_)) => {
            errors.add(
                at,
                ".sync.timeout",
                format!(
                    "must be between 1ms and {}s",
                    MAX_SYNC_TIMEOUT.as_secs_ceil()
                ),
            );
            Span::ZERO
        }
        Some(Err(message)) => {
            errors.add(at, ".sync.timeout", message);
            Span::ZERO
        }
    };
    let on_failure = match (raw.failure_mode, raw.fallback.is_some()) {
        (None | Some(FailureModeConfig::Open), false) => OnFailure::Allow,
        (None | Some(FailureModeConfig::Open), true) => OnFailure::Fallback,
        (Some(FailureModeConfig::Closed), false) => OnFailure::Refuse,
        (Some(FailureModeConfig::Closed), true) => {
            errors.add(
                at,
                ".sync.fallback",
                "only used with failure_mode open (closed refuses every request)".into(),
            );
            OnFailure::Refuse
        }
    };
    if errors.count() > before {
        return None;
    }
    Some(RuleSync {
        mode,
        cluster,
        domain: raw.domain.clone(),
        timeout,
        on_failure,
    })
}

/// The options of a leased rule at `at`, recording what is out of range.
fn validate_leasing(raw: &SyncConfig, at: &str, errors: &mut Errors) -> Leasing {
    let interval = match raw.interval.as_ref().map(|t| t.parse()) {
        None => DEFAULT_SYNC_INTERVAL,
        Some(Ok(t)) if (MIN_SYNC_INTERVAL..=MAX_SYNC_INTERVAL).contains(&t) => t,
        Some(Ok(_)) => {
            errors.add(
                at,
                ".sync.interval",
                format!(
                    "must be between {}ms and {}ms (leases last at most {}ms)",
                    MIN_SYNC_INTERVAL.as_millis_ceil(),
                    MAX_SYNC_INTERVAL.as_millis_ceil(),
                    LEASE_TIME.as_millis_ceil()
                ),
            );
            DEFAULT_SYNC_INTERVAL
        }
        Some(Err(message)) => {
            errors.add(at, ".sync.interval", message);
            DEFAULT_SYNC_INTERVAL
        }
    };
    let mut bounded = |field: &str, value: Option<u64>, default: u64, max: u64| match value {
        None => default,
        Some(v) if (1..=max).contains(&v) => v,
        Some(_) => {
            errors.add(at, field, format!("must be between 1 and {max}"));
            default
        }
    };
    let max_lease = bounded(
        ".sync.max_lease",
        raw.max_lease,
        DEFAULT_MAX_LEASE,
        MAX_MAX_LEASE,
    );
    let replicas = bounded(
        ".sync.replicas",
        raw.replicas.map(u64::from),
        1,
        u64::from(MAX_REPLICAS),
    );
    let max_keys = bounded(
        ".sync.max_keys",
        raw.max_keys.map(u64::from),
        u64::from(DEFAULT_LEASED_KEYS),
        u64::from(MAX_LEASED_KEYS),
    );
    Leasing {
        interval,
        max_lease,
        replicas: u32::try_from(replicas).unwrap_or(1),
        max_keys: u32::try_from(max_keys).unwrap_or(DEFAULT_LEASED_KEYS),
    }
}

/// Checks a domain or cluster name: sent to Envoy and the quota server.
fn check_name(name: &str, at: &str, field: &str, errors: &mut Errors) {
    let ok = !name.is_empty()
        && name.len() <= MAX_DOMAIN_NAME
        && name.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        errors.add(
            at,
            field,
            format!("must be 1 to {MAX_DOMAIN_NAME} printable characters without spaces"),
        );
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::config::errors_of;
    use crate::policy::Policy;

    #[test]
    fn synced_rules_get_defaults_and_keep_their_index_after_sorting() {
        let policy = Policy::from_json(
            r#"{"rules":[
                {"name":"local","limit":{"count":5,"per":"1s"}},
                {"name":"fleet","priority":9,"key":["header:x-api-key"],
                 "sync":{"mode":"exact","domain":"edge"}},
                {"name":"guarded","sync":{"mode":"exact","domain":"edge","timeout":"20ms",
                 "fallback":{"count":3,"per":"1s"}},"algorithm":"fixed_window"},
                {"name":"strict","sync":{"mode":"exact","domain":"core","failure_mode":"closed"}}
            ]}"#,
        )
        .unwrap();
        let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fleet", "local", "guarded", "strict"]);
        assert_eq!(policy.sync_of(1), None);
        assert_eq!(
            policy.sync_of(0),
            Some(&RuleSync {
                mode: SyncMode::Exact,
                cluster: DEFAULT_QUOTA_CLUSTER.into(),
                domain: "edge".into(),
                timeout: DEFAULT_SYNC_TIMEOUT,
                on_failure: OnFailure::Allow,
            })
        );
        let guarded = policy.sync_of(2).unwrap();
        assert_eq!(
            (guarded.timeout, guarded.on_failure),
            (Span::from_millis(20), OnFailure::Fallback)
        );
        // The fallback is the rule's local limit.
        assert_eq!(policy.rules[2].quota.count(), 3);
        assert_eq!(
            policy.rules[2].limiter.kind(),
            crate::algorithm::AlgorithmKind::FixedWindow
        );
        assert_eq!(policy.sync_of(3).unwrap().on_failure, OnFailure::Refuse);
    }

    #[test]
    fn what_exact_mode_cannot_do_is_refused_with_paths() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","limit":{"count":1,"per":"1s"},"sync":{"mode":"exact","domain":"d"}},
                {"name":"b","counts":"in_flight","action":"shadow","sync":{"mode":"exact","domain":""}},
                {"name":"c","algorithm":"gcra","sync":{"mode":"exact","domain":"d","timeout":"0ms","failure_mode":"closed","fallback":{"count":1,"per":"1s"}}},
                {"name":"d","sync":{"mode":"exact","domain":"d","cluster":"other","fallback":{"count":0,"per":"1s"}}},
                {"name":"e"}
            ]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].limit: a synced rule's limit is the quota server's rule of the same name; remove limit (sync.fallback sets a local limit for when the quota server fails)",
                "rules[1].counts: a synced rule counts requests; in-flight and stream rules stay local",
                "rules[1].action: a synced rule refuses (action reject); a dry run is the quota server rule's shadow",
                "rules[1].sync.domain: must be 1 to 128 printable characters without spaces",
                "rules[2].sync.timeout: must be between 1ms and 10s",
                "rules[2].sync.fallback: only used with failure_mode open (closed refuses every request)",
                "rules[3].sync.fallback.count: must be at least 1",
                "rules[4].limit: required",
            ]
        );
        let err =
            Policy::from_json(r#"{"rules":[{"name":"a","sync":{"mode":"lazy","domain":"d"}}]}"#)
                .unwrap_err()
                .to_string();
        assert!(
            err.starts_with("rules[0].sync.mode: unknown variant `lazy`"),
            "{err}"
        );
    }

    #[test]
    fn leased_rules_get_defaults_and_their_options() {
        let policy = Policy::from_json(
            r#"{"rules":[
                {"name":"a","sync":{"mode":"leased","domain":"edge"}},
                {"name":"b","sync":{"mode":"leased","domain":"edge","interval":"50ms",
                 "max_lease":20,"replicas":3,"max_keys":64}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            policy.sync_of(0).unwrap().mode,
            SyncMode::Leased(Leasing {
                interval: DEFAULT_SYNC_INTERVAL,
                max_lease: DEFAULT_MAX_LEASE,
                replicas: 1,
                max_keys: DEFAULT_LEASED_KEYS,
            })
        );
        assert_eq!(
            policy.sync_of(1).unwrap().mode,
            SyncMode::Leased(Leasing {
                interval: Span::from_millis(50),
                max_lease: 20,
                replicas: 3,
                max_keys: 64,
            })
        );
    }

    #[test]
    fn leased_options_are_bounded_and_only_for_leased_rules() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","sync":{"mode":"leased","domain":"d","interval":"5ms","max_lease":0,
                 "replicas":10001,"max_keys":70000}},
                {"name":"b","sync":{"mode":"leased","domain":"d","interval":"1s"}},
                {"name":"c","sync":{"mode":"leased","domain":"d","interval":"soon"}},
                {"name":"e","sync":{"mode":"exact","domain":"d","interval":"50ms","max_lease":5,
                 "replicas":2,"max_keys":8}}
            ]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].sync.interval: must be between 10ms and 500ms (leases last at most 1000ms)",
                "rules[0].sync.max_lease: must be between 1 and 1000000",
                "rules[0].sync.replicas: must be between 1 and 10000",
                "rules[0].sync.max_keys: must be between 1 and 65536",
                "rules[1].sync.interval: must be between 10ms and 500ms (leases last at most 1000ms)",
                r#"rules[2].sync.interval: expected a duration such as "500ms", "1s", "5m", "1h" or "1d""#,
                "rules[3].sync.interval: only for mode leased; remove it",
                "rules[3].sync.max_lease: only for mode leased; remove it",
                "rules[3].sync.replicas: only for mode leased; remove it",
                "rules[3].sync.max_keys: only for mode leased; remove it",
            ]
        );
    }

    #[test]
    fn a_leased_rule_costs_at_most_a_lease() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","cost":5,"sync":{"mode":"leased","domain":"d","max_lease":4}},
                {"name":"b","cost":4,"sync":{"mode":"leased","domain":"d","max_lease":4}},
                {"name":"c","cost":500,"sync":{"mode":"exact","domain":"d"}}
            ]}"#,
        );
        assert_eq!(
            errors,
            ["rules[0].cost: 5 is more than sync.max_lease (4): no lease could admit a request; \
              raise sync.max_lease"]
        );
    }

    #[test]
    fn leased_cells_are_bounded_together() {
        let rule = |name: &str| {
            format!(
                r#"{{"name":"{name}","sync":{{"mode":"leased","domain":"d","max_keys":65536}}}}"#
            )
        };
        let rules: Vec<alloc::string::String> =
            ["a", "b", "c", "d", "e"].iter().map(|n| rule(n)).collect();
        let errors = errors_of(&format!(r#"{{"rules":[{}]}}"#, rules.join(",")));
        assert_eq!(
            errors,
            [
                "rules[3].sync.max_keys: the leased rules so far could take 75 MiB of shared data \
              (300 bytes per key), over the 64 MiB budget: lower sync.max_keys"
            ]
        );
    }

    #[test]
    fn synced_rules_call_one_cluster() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","sync":{"mode":"exact","domain":"d"}},
                {"name":"b","sync":{"mode":"exact","domain":"d","cluster":"q2"}}
            ]}"#,
        );
        assert_eq!(
            errors,
            ["rules[1].sync.cluster: every synced rule calls one cluster: rules[0] uses \"sluice_quota\""]
        );
    }
}
