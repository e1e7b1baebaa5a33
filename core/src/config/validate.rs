//! The whole configuration into a [`Policy`]: its rules (see `rule`),
//! excluded statuses, key bound and client address options.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::access::validate_access;
use super::charging::excluded_grpc_status;
use super::error::{ConfigError, Errors};
use super::groups::validate_groups;
use super::rule::validate_rule;
use super::schema::{Config, SpanText, StatusSpec};
use crate::client_ip::ClientIpSource;
use crate::decision::HeaderSets;
use crate::lease::CELL_BYTES;
use crate::policy::{Action, Policy, Rule, Scope, StatusSet, SyncMode, SyncedRule};
use crate::store::{slot_bytes, MAX_STORED_KEY};
use crate::time::Span;

/// Longest rule name: it appears in stats names and headers.
pub const MAX_RULE_NAME: usize = 64;
/// Largest `count` for the sliding window log, which keeps an entry per
/// admitted request.
pub const MAX_LOG_COUNT: u64 = 10_000;
/// Largest `max_keys`.
pub const MAX_KEYS_LIMIT: u64 = 10_000_000;
/// The most memory all rules' keys may take together, each slot at its
/// worst ([`slot_bytes`]) (1 GiB).
pub const KEYS_MEMORY_BUDGET: u64 = 1 << 30;
/// The most memory the lease cells of all leased rules may take together
/// in shared data, each at [`CELL_BYTES`] (64 MiB).
pub const LEASE_CELLS_BUDGET: u64 = 64 << 20;
/// Most trusted hops accepted.
pub const MAX_TRUSTED_HOPS: u32 = 32;
/// Longest `block_duration`: `Retry-After` tells at most a day.
pub const MAX_BLOCK_DURATION: Span = Span::from_secs(86_400);
/// Longest `degrade_header` name.
pub const MAX_DEGRADE_HEADER: usize = 64;
/// Longest `grpc_cut_grace`: a cut call's client must learn its fate soon.
pub const MAX_GRPC_CUT_GRACE: Span = Span::from_secs(60);
/// Longest `description`, of the configuration or of a rule (bytes).
pub const MAX_DESCRIPTION: usize = 4096;

impl Config {
    /// Checks every field and builds the policy, or lists every problem.
    pub fn validate(&self) -> Result<Policy, ConfigError> {
        let mut errors = Errors::default();
        check_description(self.description.as_deref(), "", &mut errors);
        let mut rules = Vec::with_capacity(self.rules.len());
        let mut cluster: Option<(usize, String)> = None;
        let mut lease_cells = 0u64;
        for (i, raw) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if self.rules[..i].iter().any(|r| r.name == raw.name) {
                errors.add(&at, ".name", format!("duplicate rule name {:?}", raw.name));
            }
            if let Some((rule, sync)) = validate_rule(raw, &at, &mut errors) {
                // One quota server call per request: to one cluster.
                match (&sync, &cluster) {
                    (Some(s), Some((first, c))) if s.cluster != *c => errors.add(
                        &at,
                        ".sync.cluster",
                        format!("every synced rule calls one cluster: rules[{first}] uses {c:?}"),
                    ),
                    (Some(s), None) => cluster = Some((i, s.cluster.clone())),
                    _ => {}
                }
                if let Some(SyncMode::Leased(leasing)) = sync.as_ref().map(|s| s.mode) {
                    let before = lease_cells;
                    lease_cells += u64::from(leasing.max_keys) * CELL_BYTES;
                    if lease_cells > LEASE_CELLS_BUDGET && before <= LEASE_CELLS_BUDGET {
                        errors.add(
                            &at,
                            ".sync.max_keys",
                            format!(
                                "the leased rules so far could take {} MiB of shared data \
                                 ({CELL_BYTES} bytes per key), over the {} MiB budget: \
                                 lower sync.max_keys",
                                lease_cells >> 20,
                                LEASE_CELLS_BUDGET >> 20
                            ),
                        );
                    }
                }
                if raw.enabled.unwrap_or(true) {
                    rules.push((rule, sync));
                }
            }
        }
        validate_groups(&self.rules, &mut errors);
        // Stable: equal priorities keep config order.
        rules.sort_by_key(|(r, _): &(Rule, _)| core::cmp::Reverse(r.priority));
        let synced = rules
            .iter()
            .enumerate()
            .filter_map(|(rule_index, (_, sync))| {
                sync.clone().map(|sync| SyncedRule { rule_index, sync })
            })
            .collect();
        let rules: Vec<Rule> = rules.into_iter().map(|(r, _)| r).collect();

        let mut exclude_statuses = StatusSet::default();
        for (i, spec) in self.exclude_statuses.iter().enumerate() {
            let at = format!("exclude_statuses[{i}]");
            match spec {
                StatusSpec::Code(code @ 100..=599) => exclude_statuses.add_code(*code as u16),
                StatusSpec::Class(class) => match (excluded_grpc_status(class), class.as_bytes()) {
                    (Some(Ok(code)), _) => exclude_statuses.add_grpc(code),
                    (Some(Err(message)), _) => errors.add(&at, "", message),
                    (None, [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X']) => {
                        exclude_statuses.add_class(u16::from(d - b'0'))
                    }
                    (None, _) => errors.add(
                        &at,
                        "",
                        "expected a class such as \"5xx\" or a gRPC status such as \"grpc:UNAVAILABLE\"".into(),
                    ),
                },
                StatusSpec::Code(_) => errors.add(&at, "", "must be between 100 and 599".into()),
            }
        }
        let max_keys = self.max_keys.unwrap_or(Policy::DEFAULT_MAX_KEYS as u64);
        if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
            errors.add(
                "max_keys",
                "",
                format!("must be between 1 and {MAX_KEYS_LIMIT}"),
            );
        }
        let worst = keys_memory(&rules, max_keys);
        if worst > KEYS_MEMORY_BUDGET {
            let keyed = rules.iter().filter(|r| r.scope == Scope::PerKey);
            let per_key: u64 = keyed.clone().map(slot_bytes).sum();
            let largest = keyed.clone().map(slot_bytes).max().unwrap_or(0);
            let fit = KEYS_MEMORY_BUDGET.saturating_sub(keys_memory(&rules, 0)) / per_key.max(1);
            errors.add(
                "max_keys",
                "",
                format!(
                    "{} per-key rules with {max_keys} keys each could take {} MiB \
                     (up to {largest} bytes per key: a {MAX_STORED_KEY}-byte key, the \
                     algorithm's largest state and slot overhead), over the {} MiB budget: \
                     set max_keys to at most {fit}, use fewer per-key rules \
                     or lower sliding_window_log counts",
                    keyed.count(),
                    worst >> 20,
                    KEYS_MEMORY_BUDGET >> 20
                ),
            );
        }
        if self.client_ip.trusted_hops > MAX_TRUSTED_HOPS {
            errors.add(
                "client_ip.trusted_hops",
                "",
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            );
        }
        let grpc_cut_grace = match self.grpc_cut_grace.as_ref().map(SpanText::parse) {
            None => Policy::DEFAULT_GRPC_CUT_GRACE,
            Some(Ok(grace)) if grace <= MAX_GRPC_CUT_GRACE => grace,
            Some(Ok(_)) => {
                errors.add("grpc_cut_grace", "", "must be at most 60s".into());
                Span::ZERO
            }
            Some(Err(message)) => {
                errors.add("grpc_cut_grace", "", message);
                Span::ZERO
            }
        };
        let ipv4_prefix = validate_prefix(
            self.client_ip.ipv4_prefix,
            ClientIpSource::DEFAULT_IPV4_PREFIX,
            32,
            "client_ip.ipv4_prefix",
            &mut errors,
        );
        let ipv6_prefix = validate_prefix(
            self.client_ip.ipv6_prefix,
            ClientIpSource::DEFAULT_IPV6_PREFIX,
            128,
            "client_ip.ipv6_prefix",
            &mut errors,
        );
        let access = validate_access(self.access.as_ref(), &mut errors);
        let degrade_header = validate_degrade_header(
            self.degrade_header.as_deref(),
            rules.iter().any(|r| r.action == Action::Degrade),
            &mut errors,
        );
        errors.finish()?;
        Ok(Policy {
            rules,
            header_sets: HeaderSets::from_sets(&self.headers.sets),
            headers_on_allowed: self.headers.on_allowed,
            exclude_statuses,
            client_ip: ClientIpSource {
                trusted_hops: self.client_ip.trusted_hops,
                ipv4_prefix,
                ipv6_prefix,
            },
            max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
            when_full: self.when_keys_full.unwrap_or_default(),
            grpc_cut_grace,
            degrade_header,
            synced,
            access,
        })
    }
}

/// Records a problem if the `description` of the configuration (`at`
/// empty) or of the rule at `at` is longer than [`MAX_DESCRIPTION`].
pub(super) fn check_description(text: Option<&str>, at: &str, errors: &mut Errors) {
    if text.is_some_and(|t| t.len() > MAX_DESCRIPTION) {
        let (at, field) = if at.is_empty() {
            ("description", "")
        } else {
            (at, ".description")
        };
        errors.add(
            at,
            field,
            format!("must be at most {MAX_DESCRIPTION} bytes"),
        );
    }
}

/// The degrade header's name when some rule degrades: `raw` or the
/// default. A name must be a lower-case HTTP token (HTTP/2 and gRPC
/// metadata need lower case), not a pseudo-header and not one Envoy or
/// HTTP itself give a meaning to, so that marking a request never changes
/// how it is routed or framed.
fn validate_degrade_header(
    raw: Option<&str>,
    some_rule_degrades: bool,
    errors: &mut Errors,
) -> Option<String> {
    const RESERVED: [&str; 10] = [
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "keep-alive",
        "proxy-connection",
        "authorization",
    ];
    let name = match (raw, some_rule_degrades) {
        (Some(_), false) => {
            errors.add(
                "degrade_header",
                "",
                "only used with a rule of action degrade".into(),
            );
            return None;
        }
        (None, false) => return None,
        (name, true) => name.unwrap_or(Policy::DEFAULT_DEGRADE_HEADER),
    };
    let token = !name.is_empty()
        && name.len() <= MAX_DEGRADE_HEADER
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !token {
        errors.add(
            "degrade_header",
            "",
            format!("must be 1 to {MAX_DEGRADE_HEADER} characters of a-z, 0-9, '-' or '_'"),
        );
        return None;
    }
    if RESERVED.contains(&name) || name.starts_with("x-envoy-") || name.starts_with("grpc-") {
        errors.add(
            "degrade_header",
            "",
            format!("{name:?} has a meaning of its own to HTTP, gRPC or Envoy; choose another name such as \"x-sluice-limited\""),
        );
        return None;
    }
    Some(name.into())
}

/// A client address prefix length from 1 to `max` bits (`default` when
/// absent), recording a problem at `path` otherwise.
fn validate_prefix(raw: Option<u32>, default: u8, max: u8, path: &str, errors: &mut Errors) -> u8 {
    match raw.map(u8::try_from) {
        None => default,
        Some(Ok(bits)) if (1..=max).contains(&bits) => bits,
        Some(_) => {
            errors.add(
                path,
                "",
                format!("must be from 1 to {max} (bits of the address that key a client)"),
            );
            default
        }
    }
}

/// The worst-case memory of the keys of `rules`, per-key ones with
/// `max_keys` each: every key's slot at its largest ([`slot_bytes`]), plus
/// per rule its global or overflow slot and its creation lock (counted as
/// slots too, which they never exceed).
pub fn keys_memory(rules: &[Rule], max_keys: u64) -> u64 {
    rules
        .iter()
        .map(|rule| {
            let slots = match rule.scope {
                Scope::PerKey => max_keys.saturating_add(3),
                Scope::Global => 3,
            };
            slots.saturating_mul(slot_bytes(rule))
        })
        .fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;

    use super::*;
    use crate::algorithm::AlgorithmKind;
    use crate::config::errors_of;
    use crate::policy::{Action, Counts, Flow, KeyElement, KeyPart};
    use crate::time::Span;

    #[test]
    fn minimal_rule_gets_defaults() {
        let policy =
            Policy::from_json(r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1m"}}]}"#)
                .unwrap();
        let rule = &policy.rules[0];
        assert_eq!(rule.key.elements(), [KeyElement::Part(KeyPart::ClientIp)]);
        assert_eq!(rule.limiter.kind(), AlgorithmKind::TokenBucket);
        assert_eq!(rule.action, Action::Reject);
        assert_eq!(rule.quota.per(), Span::from_secs(60));
        assert_eq!(
            policy.header_sets,
            HeaderSets {
                ietf: true,
                x_ratelimit: false
            }
        );
        assert!(policy.headers_on_allowed);
        assert_eq!(policy.max_keys, Policy::DEFAULT_MAX_KEYS);
    }

    #[test]
    fn key_memory_beyond_the_budget_is_refused_naming_max_keys() {
        let rules = |n: usize| {
            (0..n)
                .map(|i| format!(r#"{{"name":"r{i}","limit":{{"count":1,"per":"1s"}}}}"#))
                .collect::<Vec<_>>()
                .join(",")
        };
        // 10,000 per-key rules at the default max_keys: a billion keys.
        let err = Policy::from_json(&format!(r#"{{"rules":[{}]}}"#, rules(10_000)))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("max_keys: 10000 per-key rules with 100000 keys each could take"));
        assert!(
            err.ends_with(
                "(up to 490 bytes per key: a 256-byte key, the algorithm's largest state and \
                 slot overhead), over the 1024 MiB budget: set max_keys to at most 216, use \
                 fewer per-key rules or lower sliding_window_log counts"
            ),
            "{err}"
        );
        // The suggested bound is accepted, and one more is not.
        let fits = format!(r#"{{"rules":[{}],"max_keys":216}}"#, rules(10_000));
        assert!(Policy::from_json(&fits).is_ok());
        let over = format!(r#"{{"rules":[{}],"max_keys":217}}"#, rules(10_000));
        assert!(Policy::from_json(&over).is_err());
        // Global rules take one slot each, whatever max_keys.
        let global = r#"{"rules":[{"name":"g","scope":"global","limit":{"count":1,"per":"1s"}}],"max_keys":10000000}"#;
        assert!(Policy::from_json(global).is_ok());
    }

    #[test]
    fn key_memory_counts_each_algorithms_largest_state() {
        // A full log of 10,000 entries is about 160 KB a key.
        let log =
            r#"{"name":"log","algorithm":"sliding_window_log","limit":{"count":10000,"per":"1m"}}"#;
        let err = Policy::from_json(&format!(r#"{{"rules":[{log}],"max_keys":100000}}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("(up to 160478 bytes per key")
                && err.contains("set max_keys to at most 6687,"),
            "{err}"
        );
        let fits = format!(r#"{{"rules":[{log}],"max_keys":6687}}"#);
        assert!(Policy::from_json(&fits).is_ok());
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"ok","limit":{"count":1,"per":"1s"}},
                {"name":"ok","limit":{"count":0,"per":"1s"}},
                {"name":"bad name","limit":{"count":1,"per":"0ms"},"key":["ip"]},
                {"name":"d","limit":{"count":1,"per":"1s"},"action":"delay"},
                {"name":"c","limit":{"count":2,"per":"1s"},"cost":3,"algorithm":"fixed_window","match":{"path":{"exact":"x","prefix":"/"}}}
            ],"exclude_statuses":["6xx", 99]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[1].name: duplicate rule name \"ok\"",
                "rules[1].limit.count: must be at least 1",
                "rules[2].name: must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'",
                "rules[2].key[0]: unknown key part \"ip\": use client_ip, header:<name>, query:<name>, path, path_segment:<n> or method",
                "rules[2].limit.per: must be at least 1ms",
                "rules[3].max_delay: required with action delay",
                "rules[4].match.path: set exactly one of exact, prefix or glob",
                "rules[4].cost: 3 exceeds what the limit can ever grant at once (2); no request could pass",
                "exclude_statuses[0]: expected a class such as \"5xx\" or a gRPC status such as \"grpc:UNAVAILABLE\"",
                "exclude_statuses[1]: must be between 100 and 599",
            ]
        );
    }

    #[test]
    fn blocks_and_degrade_are_checked_with_their_paths() {
        let ok = Policy::from_json(
            r#"{"rules":[
                {"name":"a","limit":{"count":2,"per":"1h"},"block_duration":"10m"},
                {"name":"b","limit":{"count":2,"per":"1h"},"action":"degrade","block_duration":"24h"}
            ],"degrade_header":"x-cheap"}"#,
        )
        .unwrap();
        assert_eq!(ok.rules[0].block_duration, Some(Span::from_secs(600)));
        assert_eq!(ok.rules[1].action, Action::Degrade);
        assert_eq!(ok.degrade_header.as_deref(), Some("x-cheap"));
        let none = Policy::from_json(r#"{"rules":[{"name":"a","limit":{"count":2,"per":"1h"}}]}"#);
        assert_eq!(none.unwrap().degrade_header, None);
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","limit":{"count":1,"per":"1s"},"block_duration":"0s"},
                {"name":"b","limit":{"count":1,"per":"1s"},"block_duration":"25h"},
                {"name":"c","limit":{"count":1,"per":"1s"},"block_duration":"soon"},
                {"name":"d","match":{"grpc":{}},"counts":"messages","limit":{"count":1,"per":"1s"},"block_duration":"1m"},
                {"name":"e","sync":{"mode":"exact","domain":"edge"},"block_duration":"1m"},
                {"name":"f","match":{"grpc":{}},"counts":"messages","limit":{"count":1,"per":"1s"},"action":"degrade"},
                {"name":"g","sync":{"mode":"exact","domain":"edge"},"action":"degrade"}
            ],"degrade_header":"X-Limited"}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].block_duration: must be more than 0",
                "rules[1].block_duration: must be at most 24h (Retry-After tells at most a day)",
                "rules[2].block_duration: expected a duration such as \"500ms\", \"1s\", \"5m\", \"1h\" or \"1d\"",
                "rules[3].block_duration: blocks keys refused at request time: use counts requests or in_flight",
                "rules[4].block_duration: a synced rule is decided by the quota server, a block on this Envoy only: remove block_duration or sync",
                "rules[5].action: degrade marks requests for the upstream: it needs counts requests or in_flight",
                "rules[6].action: a synced rule refuses (action reject); a dry run is the quota server rule's shadow",
                "degrade_header: only used with a rule of action degrade",
            ]
        );
        let header = |name: &str| {
            errors_of(&format!(
                r#"{{"rules":[{{"name":"a","limit":{{"count":1,"per":"1s"}},"action":"degrade"}}],"degrade_header":"{name}"}}"#
            ))
        };
        assert_eq!(
            header("X-Limited"),
            ["degrade_header: must be 1 to 64 characters of a-z, 0-9, '-' or '_'"]
        );
        assert_eq!(
            header("host"),
            ["degrade_header: \"host\" has a meaning of its own to HTTP, gRPC or Envoy; choose another name such as \"x-sluice-limited\""]
        );
        assert_eq!(header("grpc-status").len(), 1);
        let policy = Policy::from_json(
            r#"{"rules":[{"name":"a","limit":{"count":1,"per":"1s"},"action":"degrade"}],"degrade_header":"x-degraded"}"#,
        );
        assert_eq!(
            policy.unwrap().degrade_header.as_deref(),
            Some("x-degraded")
        );
    }

    #[test]
    fn client_ip_prefixes_default_and_are_bounded() {
        let rule = r#"{"name":"r","limit":{"count":1,"per":"1s"}}"#;
        let policy = Policy::from_json(&format!(r#"{{"rules":[{rule}]}}"#)).unwrap();
        assert_eq!(
            (policy.client_ip.ipv4_prefix, policy.client_ip.ipv6_prefix),
            (32, 64)
        );
        let policy = Policy::from_json(&format!(
            r#"{{"rules":[{rule}],"client_ip":{{"ipv4_prefix":24,"ipv6_prefix":128}}}}"#
        ))
        .unwrap();
        assert_eq!(
            (policy.client_ip.ipv4_prefix, policy.client_ip.ipv6_prefix),
            (24, 128)
        );
        let errors = errors_of(&format!(
            r#"{{"rules":[{rule}],"client_ip":{{"ipv4_prefix":33,"ipv6_prefix":0}}}}"#
        ));
        assert_eq!(
            errors,
            [
                "client_ip.ipv4_prefix: must be from 1 to 32 (bits of the address that key a client)",
                "client_ip.ipv6_prefix: must be from 1 to 128 (bits of the address that key a client)",
            ]
        );
    }

    #[test]
    fn rules_sorted_by_priority_and_disabled_dropped() {
        let policy = Policy::from_json(
            r#"{"rules":[
                {"name":"a","limit":{"count":1,"per":1}},
                {"name":"b","limit":{"count":1,"per":1},"priority":5},
                {"name":"c","limit":{"count":1,"per":1},"enabled":false},
                {"name":"d","limit":{"count":1,"per":1}}
            ]}"#,
        )
        .unwrap();
        let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "d"]);
    }

    #[test]
    fn stream_rules_are_checked_against_what_they_match() {
        let ok = Policy::from_json(
            r#"{"rules":[
                {"name":"calls","match":{"grpc":{"service":"chat.*","method":"Send*"}},"limit":{"count":5,"per":"1m"}},
                {"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":3}},
                {"name":"msgs","match":{"grpc":{}},"counts":"messages","direction":"server","limit":{"count":9,"per":"1s"}},
                {"name":"size","match":{"websocket":true},"counts":"message_size","limit":{"count":65536},"action":"drop"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(ok.rules[1].counts, Counts::InFlight);
        assert_eq!(ok.rules[1].limiter.kind(), AlgorithmKind::Concurrency);
        assert_eq!(ok.rules[2].counts, Counts::Messages(Flow::Server));
        assert_eq!(ok.rules[3].action, Action::Drop);
        assert!(ok.needs_protocol());
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","counts":"messages","limit":{"count":1,"per":"1s"}},
                {"name":"b","match":{"websocket":true},"counts":"in_flight","limit":{"count":1,"per":"1s"}},
                {"name":"c","match":{"grpc":{}},"counts":"messages","limit":{"count":1,"per":"1s"},"action":"drop"},
                {"name":"d","direction":"client","limit":{"count":1,"per":"1s"}},
                {"name":"e","match":{"grpc":{},"websocket":true},"limit":{"count":1}},
                {"name":"f","match":{"websocket":true},"counts":"in_flight","limit":{"count":2},"action":"delay","max_delay":"1s"}
            ]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].counts: messages, bytes and message_size count stream traffic: add match.grpc or match.websocket",
                "rules[1].limit.per: a bound has no period; remove per",
                "rules[2].action: drop discards WebSocket messages: it needs match.websocket and counts messages, bytes or message_size",
                "rules[3].direction: only used with counts messages, bytes or message_size",
                "rules[4].match: a request is either a gRPC call or a WebSocket upgrade: use grpc or websocket",
                "rules[4].limit.per: required",
                "rules[5].action: delay only holds requests (counts requests)",
            ]
        );
    }

    #[test]
    fn descriptions_are_documentation_and_bounded() {
        let with = Policy::from_json(
            r#"{"description":"login limits","rules":[{"name":"a","description":"per IP","limit":{"count":1,"per":"1s"}}]}"#,
        )
        .unwrap();
        let without =
            Policy::from_json(r#"{"rules":[{"name":"a","limit":{"count":1,"per":"1s"}}]}"#)
                .unwrap();
        assert_eq!(with, without);
        let long = "x".repeat(MAX_DESCRIPTION + 1);
        let json = format!(
            r#"{{"description":"{long}","rules":[{{"name":"a","description":"{long}","limit":{{"count":1,"per":"1s"}}}}]}}"#
        );
        assert_eq!(
            errors_of(&json),
            [
                "description: must be at most 4096 bytes",
                "rules[0].description: must be at most 4096 bytes",
            ]
        );
    }

    #[test]
    fn grpc_cut_grace_defaults_to_a_second_and_is_bounded() {
        let policy = Policy::from_json(r#"{"rules":[]}"#).unwrap();
        assert_eq!(policy.grpc_cut_grace, Span::SECOND);
        let policy = Policy::from_json(r#"{"grpc_cut_grace":"250ms"}"#).unwrap();
        assert_eq!(policy.grpc_cut_grace, Span::from_millis(250));
        assert_eq!(
            errors_of(r#"{"grpc_cut_grace":"2m"}"#),
            ["grpc_cut_grace: must be at most 60s"]
        );
    }

    #[test]
    fn websocket_false_is_refused() {
        assert_eq!(
            errors_of(r#"{"rules":[{"name":"r","match":{"websocket":false},"limit":{"count":1,"per":"1m"}}]}"#),
            ["rules[0].match.websocket: only true is a condition: leave websocket out to match every request, or use not: {\"websocket\": true}"]
        );
    }
}
