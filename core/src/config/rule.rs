//! One rule as written into a [`Rule`]: its name, key, what it counts,
//! its limit and algorithm, its cost and its action.

use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use super::charging::{validate_charge, validate_cost_from};
use super::conditions::validate_match;
use super::error::Errors;
use super::schema::{
    ActionKind, CountsConfig, DirectionConfig, KeyElementConfig, LimitConfig, RuleConfig,
    ScopeConfig, SpanText,
};
use super::sync::validate_sync;
use super::validate::{check_description, MAX_BLOCK_DURATION, MAX_LOG_COUNT, MAX_RULE_NAME};
use crate::algorithm::{AlgorithmKind, Limiter, Quota, QuotaError};
use crate::policy::{
    Action, Counts, Flow, KeyElement, KeyPart, KeySpec, Matcher, PathMatch, Rule, RuleSync, Scope,
};
use crate::time::Span;

/// The rule at `at` (`rules[i]`) and its link to the quota server if it is
/// synced, or `None` after recording why not.
pub(super) fn validate_rule(
    raw: &RuleConfig,
    at: &str,
    errors: &mut Errors,
) -> Option<(Rule, Option<RuleSync>)> {
    let before = errors.count();
    if !is_valid_name(&raw.name) {
        errors.add(
            at,
            ".name",
            format!("must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, '-' or '_'"),
        );
    }

    check_description(raw.description.as_deref(), at, errors);
    let matcher = validate_match(&raw.matcher, at, errors);

    let scope = match raw.scope {
        Some(ScopeConfig::Global) => Scope::Global,
        Some(ScopeConfig::PerKey) | None => Scope::PerKey,
    };
    let key = match (&raw.key, scope) {
        (Some(_), Scope::Global) => {
            errors.add(
                at,
                ".key",
                "a rule of scope global has one counter and no key; remove key or use scope per_key"
                    .into(),
            );
            KeySpec::default()
        }
        (None, Scope::Global) => KeySpec::default(),
        (None, Scope::PerKey) => KeySpec::new([KeyPart::ClientIp].into()),
        (Some(elements), Scope::PerKey) => validate_key(elements, at, errors),
    };

    // A rule matching paths in either case keys them in one case, so a
    // client cannot get a fresh counter by changing case.
    let key = key.lowering_path(matcher.paths.iter().any(PathMatch::ignores_case));

    let counts = validate_counts(raw, &matcher, at, errors);
    // in_flight and message_size are bounds, not rates: no period, no
    // algorithm choice.
    let is_bound = matches!(counts, Counts::InFlight | Counts::MessageSize(_));
    let algorithm = if is_bound {
        if raw.algorithm.is_some() {
            errors.add(
                at,
                ".algorithm",
                "not used with this counts; remove it".into(),
            );
        }
        AlgorithmKind::Concurrency
    } else {
        match raw.algorithm {
            Some(AlgorithmKind::Concurrency) => {
                errors.add(
                    at,
                    ".algorithm",
                    "concurrency is implied by counts in_flight; choose a rate algorithm".into(),
                );
                AlgorithmKind::TokenBucket
            }
            other => other.unwrap_or_default(),
        }
    };
    // A synced rule's local limit is its fallback, applied only while the
    // quota server fails; without one it never counts locally.
    let quota = match (&raw.sync, &raw.limit) {
        (None, Some(limit)) => validate_quota(limit, ".limit", algorithm, is_bound, at, errors),
        (None, None) => {
            errors.add(at, ".limit", "required".into());
            None
        }
        (Some(sync), _) => match &sync.fallback {
            Some(fallback) => {
                validate_quota(fallback, ".sync.fallback", algorithm, is_bound, at, errors)
            }
            None => Quota::new(u64::MAX, Span::SECOND, None).ok(),
        },
    };
    let sync = raw
        .sync
        .as_ref()
        .and_then(|s| validate_sync(s, raw, at, errors));

    let cost = raw.cost.unwrap_or(1);
    if cost == 0 {
        errors.add(at, ".cost", "must be at least 1".into());
    }
    if raw.cost.is_some() && matches!(counts, Counts::Bytes(_) | Counts::MessageSize(_)) {
        errors.add(
            at,
            ".cost",
            "each byte costs one permit here; remove cost".into(),
        );
    }
    let cost_from = raw
        .cost_from
        .as_ref()
        .and_then(|c| validate_cost_from(c, counts, at, errors));
    let charge = raw
        .charge
        .as_ref()
        .and_then(|c| validate_charge(c, counts, raw.sync.is_some(), at, errors));
    if let (Some(q), false) = (&quota, matches!(counts, Counts::MessageSize(_))) {
        let capacity = if uses_burst(algorithm) {
            q.burst()
        } else {
            q.count()
        };
        // The largest cost a request can be asked for must be grantable.
        let most = [(".cost", cost)]
            .into_iter()
            .chain(cost_from.as_ref().map(|c| (".cost_from.max", c.max)));
        for (field, most) in most {
            if most > capacity {
                errors.add(
                    at,
                    field,
                    format!("{most} exceeds what the limit can ever grant at once ({capacity}); no request could pass"),
                );
            }
        }
    }

    let action = validate_action(raw, counts, &matcher, at, errors);
    let block_duration = validate_block(raw, counts, at, errors);

    if errors.count() > before {
        return None;
    }
    let (Some(quota), Some(action)) = (quota, action) else {
        return None;
    };
    let rule = Rule {
        name: raw.name.clone(),
        matcher,
        key,
        scope,
        counts,
        limiter: Limiter::new(algorithm, quota),
        quota,
        cost,
        cost_from,
        charge,
        action,
        block_duration,
        priority: raw.priority.unwrap_or(0),
        group: raw.group.clone(),
    };
    Some((rule, sync))
}

/// Whether `name` is 1 to [`MAX_RULE_NAME`] characters of `A-Z a-z 0-9 - _`
/// (rule and group names, which appear in stats and headers).
pub(super) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The most elements of a key, and the most parts of a fallback chain.
pub const MAX_KEY_PARTS: usize = 8;

/// The key of a per-key rule at `at`.
fn validate_key(elements: &[KeyElementConfig], at: &str, errors: &mut Errors) -> KeySpec {
    if elements.is_empty() || elements.len() > MAX_KEY_PARTS {
        errors.add(at, ".key", format!("give 1 to {MAX_KEY_PARTS} parts"));
    }
    let mut spec = Vec::new();
    for (j, element) in elements.iter().enumerate() {
        match element {
            KeyElementConfig::Part(text) => {
                if let Some(part) = key_part(text, &format!(".key[{j}]"), at, errors) {
                    spec.push(KeyElement::Part(part));
                }
            }
            KeyElementConfig::FirstOf(texts) => {
                if texts.len() < 2 || texts.len() > MAX_KEY_PARTS {
                    errors.add(
                        at,
                        &format!(".key[{j}]"),
                        format!(
                            "a list is a fallback chain of 2 to {MAX_KEY_PARTS} parts; write a single part as a string"
                        ),
                    );
                }
                let mut chain = Vec::new();
                // The first part every request has: nothing after it is used.
                let mut ended_by: Option<&str> = None;
                for (k, text) in texts.iter().enumerate() {
                    let field = format!(".key[{j}][{k}]");
                    if let Some(first) = ended_by {
                        errors.add(
                            at,
                            &field,
                            format!(
                                "never used: every request has {first:?} before it; end the chain there"
                            ),
                        );
                    }
                    if let Some(part) = key_part(text, &field, at, errors) {
                        if part.always_present() && ended_by.is_none() {
                            ended_by = Some(text);
                        }
                        chain.push(part);
                    }
                }
                spec.push(KeyElement::FirstOf(chain));
            }
        }
    }
    KeySpec::of(spec)
}

/// The key part written `text` at `field`, or `None` after recording why not.
fn key_part(text: &str, field: &str, at: &str, errors: &mut Errors) -> Option<KeyPart> {
    let part = KeyPart::parse(text);
    if part.is_none() {
        errors.add(
            at,
            field,
            format!(
                "unknown key part {text:?}: use client_ip, header:<name>, query:<name>, path, path_segment:<n> or method"
            ),
        );
    }
    part
}

/// The quota of `limit` (the field at `at` + `field`), checked against the
/// algorithm and what the rule counts.
fn validate_quota(
    limit: &LimitConfig,
    field: &str,
    algorithm: AlgorithmKind,
    is_bound: bool,
    at: &str,
    errors: &mut Errors,
) -> Option<Quota> {
    let per_field = format!("{field}.per");
    let per = match (&limit.per, is_bound) {
        (Some(_), true) => {
            errors.add(at, &per_field, "a bound has no period; remove per".into());
            Ok(Quota::MIN_PERIOD)
        }
        (None, true) => Ok(Quota::MIN_PERIOD),
        (Some(per), false) => per.parse(),
        (None, false) => Err("required".to_string()),
    };
    if let Err(message) = &per {
        errors.add(at, &per_field, message.clone());
    }
    let per_unreadable = per.is_err();
    let per = per.unwrap_or(Span::ZERO);
    let quota = match Quota::new(limit.count, per, limit.burst) {
        Ok(q) => Some(q),
        Err(e) => {
            let part = match e {
                QuotaError::ZeroCount => ".count",
                QuotaError::PeriodTooShort => ".per",
                QuotaError::ZeroBurst => ".burst",
            };
            // An unreadable `per` was reported already.
            if !(part == ".per" && per_unreadable) {
                errors.add(at, &format!("{field}{part}"), e.to_string());
            }
            None
        }
    };
    if algorithm == AlgorithmKind::SlidingWindowLog && limit.count > MAX_LOG_COUNT {
        errors.add(
            at,
            &format!("{field}.count"),
            format!(
                "sliding_window_log keeps one entry per request: at most {MAX_LOG_COUNT}; use sliding_window_counter for larger limits"
            ),
        );
    }
    if limit.burst.is_some() && !uses_burst(algorithm) {
        errors.add(
            at,
            &format!("{field}.burst"),
            format!("{} has no burst; remove it", algorithm.name()),
        );
    }

    quota
}

/// Whether `algorithm` has a burst (a capacity above its count).
fn uses_burst(algorithm: AlgorithmKind) -> bool {
    matches!(
        algorithm,
        AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket | AlgorithmKind::Gcra
    )
}

/// What the rule counts, checked against what it matches.
fn validate_counts(raw: &RuleConfig, matcher: &Matcher, at: &str, errors: &mut Errors) -> Counts {
    let flow = match raw.direction {
        None | Some(DirectionConfig::Both) => Flow::Both,
        Some(DirectionConfig::Client) => Flow::Client,
        Some(DirectionConfig::Server) => Flow::Server,
    };
    let counts = match raw.counts.unwrap_or(CountsConfig::Requests) {
        CountsConfig::Requests => Counts::Requests,
        CountsConfig::InFlight => Counts::InFlight,
        CountsConfig::Messages => Counts::Messages(flow),
        CountsConfig::Bytes => Counts::Bytes(flow),
        CountsConfig::MessageSize => Counts::MessageSize(flow),
    };
    let streams = matcher.grpc.is_some() || matcher.websocket;
    if counts.flow().is_some() && !streams {
        errors.add(
            at,
            ".counts",
            "messages, bytes and message_size count stream traffic: add match.grpc or match.websocket"
                .into(),
        );
    }
    if raw.direction.is_some() && counts.flow().is_none() {
        errors.add(
            at,
            ".direction",
            "only used with counts messages, bytes or message_size".into(),
        );
    }
    counts
}

/// The action, checked against what the rule counts and matches.
fn validate_action(
    raw: &RuleConfig,
    counts: Counts,
    matcher: &Matcher,
    at: &str,
    errors: &mut Errors,
) -> Option<Action> {
    let max_delay = raw.max_delay.as_ref().map(SpanText::parse);
    let kind = raw.action.unwrap_or(ActionKind::Reject);
    if kind == ActionKind::Degrade && !counts.at_request() {
        errors.add(
            at,
            ".action",
            "degrade marks requests for the upstream: it needs counts requests or in_flight".into(),
        );
        return None;
    }
    if kind == ActionKind::Delay && counts != Counts::Requests {
        errors.add(
            at,
            ".action",
            "delay only holds requests (counts requests)".into(),
        );
        return None;
    }
    if kind == ActionKind::Drop && !(matcher.websocket && counts.flow().is_some()) {
        errors.add(
            at,
            ".action",
            "drop discards WebSocket messages: it needs match.websocket and counts messages, bytes or message_size"
                .into(),
        );
        return None;
    }
    match (kind, max_delay) {
        (ActionKind::Delay, Some(Ok(max))) if max > Span::ZERO => Some(Action::Delay { max }),
        (ActionKind::Delay, Some(Ok(_))) => {
            errors.add(at, ".max_delay", "must be more than 0".into());
            None
        }
        (ActionKind::Delay, Some(Err(message))) => {
            errors.add(at, ".max_delay", message);
            None
        }
        (ActionKind::Delay, None) => {
            errors.add(at, ".max_delay", "required with action delay".into());
            None
        }
        (_, Some(_)) => {
            errors.add(at, ".max_delay", "only used with action delay".into());
            None
        }
        (ActionKind::Reject, None) => Some(Action::Reject),
        (ActionKind::Shadow, None) => Some(Action::Shadow),
        (ActionKind::Drop, None) => Some(Action::Drop),
        (ActionKind::Degrade, None) => Some(Action::Degrade),
    }
}

/// The `block_duration`, checked against what the rule counts and how it
/// is decided.
fn validate_block(raw: &RuleConfig, counts: Counts, at: &str, errors: &mut Errors) -> Option<Span> {
    let block = match raw.block_duration.as_ref().map(SpanText::parse)? {
        Ok(block) => block,
        Err(message) => {
            errors.add(at, ".block_duration", message);
            return None;
        }
    };
    let problem = if block == Span::ZERO {
        Some("must be more than 0".to_string())
    } else if block > MAX_BLOCK_DURATION {
        Some("must be at most 24h (Retry-After tells at most a day)".to_string())
    } else if !counts.at_request() {
        Some("blocks keys refused at request time: use counts requests or in_flight".to_string())
    } else if raw.sync.is_some() {
        Some(
            "a synced rule is decided by the quota server, a block on this Envoy only: \
             remove block_duration or sync"
                .to_string(),
        )
    } else {
        None
    };
    if let Some(message) = problem {
        errors.add(at, ".block_duration", message);
        return None;
    }
    Some(block)
}

#[cfg(test)]
mod tests {
    use alloc::string::String;
    use alloc::vec;

    use super::*;
    use crate::config::errors_of;
    use crate::policy::Policy;

    fn rule_with_key(key: &str) -> String {
        format!(r#"{{"rules":[{{"name":"r","key":{key},"limit":{{"count":1,"per":"1s"}}}}]}}"#)
    }

    #[test]
    fn keys_take_parts_and_fallback_chains() {
        let policy = Policy::from_json(&rule_with_key(
            r#"[["header:X-Api-Key", "query:user", "client_ip"], "method", "query:page"]"#,
        ))
        .unwrap();
        assert_eq!(
            policy.rules[0].key.elements(),
            [
                KeyElement::FirstOf(vec![
                    KeyPart::Header("x-api-key".into()),
                    KeyPart::Query("user".into()),
                    KeyPart::ClientIp,
                ]),
                KeyElement::Part(KeyPart::Method),
                KeyElement::Part(KeyPart::Query("page".into())),
            ]
        );
        assert!(policy.needs_query() && policy.needs_client_ip() && !policy.needs_path());
        assert_eq!(policy.headers_needed(), ["x-api-key"]);
    }

    #[test]
    fn bad_keys_are_reported_with_their_paths() {
        assert_eq!(
            errors_of(&rule_with_key(
                r#"[["client_ip", "header:x-a", "method"], ["path"], ["query:", "header:x-b"]]"#
            )),
            [
                "rules[0].key[0][1]: never used: every request has \"client_ip\" before it; end the chain there",
                "rules[0].key[0][2]: never used: every request has \"client_ip\" before it; end the chain there",
                "rules[0].key[1]: a list is a fallback chain of 2 to 8 parts; write a single part as a string",
                "rules[0].key[2][0]: unknown key part \"query:\": use client_ip, header:<name>, query:<name>, path, path_segment:<n> or method",
            ]
        );
        assert_eq!(
            errors_of(&rule_with_key(
                r#"["method","method","method","method","method","method","method","method","method"]"#
            )),
            ["rules[0].key: give 1 to 8 parts"]
        );
        assert_eq!(
            errors_of(&rule_with_key("[]")),
            ["rules[0].key: give 1 to 8 parts"]
        );
        let nested = errors_of(&rule_with_key(r#"[[["client_ip"]]]"#));
        assert_eq!(nested.len(), 1);
        assert!(
            nested[0].starts_with("rules[0].key[0]: expected a key part such as \"client_ip\", or a list of parts (the first one present is used)"),
            "{nested:?}"
        );
    }
}
