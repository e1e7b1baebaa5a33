//! A synced rule's `sync` object into a [`RuleSync`], checked against the
//! rest of the rule: what exact mode can decide remotely.

use alloc::format;
use alloc::string::ToString;

use super::error::Errors;
use super::schema::{
    ActionKind, CountsConfig, FailureModeConfig, RuleConfig, SyncConfig, SyncModeConfig,
};
use crate::policy::{OnFailure, RuleSync, SyncMode};
use crate::time::Span;

/// The cluster a synced rule calls when it names none.
pub const DEFAULT_QUOTA_CLUSTER: &str = "sluice_quota";
/// How long a request waits for the quota server by default.
pub const DEFAULT_SYNC_TIMEOUT: Span = Span::from_millis(50);
/// The longest `sync.timeout`: a request is held at most this long.
pub const MAX_SYNC_TIMEOUT: Span = Span::from_secs(10);
/// Longest domain and cluster name.
pub const MAX_DOMAIN_NAME: usize = 128;

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
        SyncModeConfig::Exact => SyncMode::Exact,
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
            Policy::from_json(r#"{"rules":[{"name":"a","sync":{"mode":"leased","domain":"d"}}]}"#)
                .unwrap_err()
                .to_string();
        assert!(
            err.starts_with("rules[0].sync.mode: unknown variant `leased`"),
            "{err}"
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
