//! Rule groups, checked across the rules that share one: a group's rules
//! stand in for each other, so they must be decided at the same moment.

use alloc::format;

use super::error::Errors;
use super::rule::is_valid_name;
use super::schema::{CountsConfig, RuleConfig};
use super::validate::MAX_RULE_NAME;

/// Records every group name that is not a name, and every rule whose
/// group mixes rules decided when the request arrives with rules decided
/// per stream message (the choice within a group is made once, at the
/// request, among rules of one kind).
pub(super) fn validate_groups(rules: &[RuleConfig], errors: &mut Errors) {
    for (i, raw) in rules.iter().enumerate() {
        let Some(group) = raw.group.as_deref() else {
            continue;
        };
        let at = format!("rules[{i}]");
        if !is_valid_name(group) {
            errors.add(
                &at,
                ".group",
                format!("must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, '-' or '_'"),
            );
            continue;
        }
        let first = rules
            .iter()
            .enumerate()
            .take(i)
            .find(|(_, r)| r.group.as_deref() == Some(group));
        if let Some((j, first)) = first {
            if at_request(first) != at_request(raw) {
                errors.add(
                    &at,
                    ".group",
                    format!(
                        "group {group:?} mixes rules decided when the request arrives (counts \
                         requests or in_flight) with rules decided per stream message (counts \
                         messages, bytes or message_size): rules[{j}] {}, this rule {}; use \
                         two groups",
                        decided(first),
                        decided(raw)
                    ),
                );
            }
        }
    }
}

/// Whether the rule is decided when the request arrives.
fn at_request(raw: &RuleConfig) -> bool {
    matches!(
        raw.counts.unwrap_or(CountsConfig::Requests),
        CountsConfig::Requests | CountsConfig::InFlight
    )
}

/// When the rule is decided, in words.
fn decided(raw: &RuleConfig) -> &'static str {
    if at_request(raw) {
        "is decided when the request arrives"
    } else {
        "is decided per stream message"
    }
}

#[cfg(test)]
mod tests {
    use crate::config::errors_of;
    use crate::policy::Policy;

    #[test]
    fn groups_hold_one_kind_of_rule_and_are_named_like_rules() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"calls","group":"g","match":{"grpc":{}},"limit":{"count":5,"per":"1m"}},
                {"name":"open","group":"g","match":{"grpc":{}},"counts":"in_flight","limit":{"count":3}},
                {"name":"msgs","group":"g","match":{"grpc":{}},"counts":"messages","limit":{"count":9,"per":"1s"}},
                {"name":"bytes","group":"s","match":{"grpc":{}},"counts":"bytes","limit":{"count":9,"per":"1s"}},
                {"name":"size","group":"s","match":{"grpc":{}},"counts":"message_size","limit":{"count":9}},
                {"name":"bad","group":"no spaces","limit":{"count":1,"per":"1s"}}
            ]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[2].group: group \"g\" mixes rules decided when the request arrives (counts \
                 requests or in_flight) with rules decided per stream message (counts messages, \
                 bytes or message_size): rules[0] is decided when the request arrives, this rule \
                 is decided per stream message; use two groups",
                "rules[5].group: must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'",
            ]
        );
    }

    #[test]
    fn a_disabled_rule_is_checked_but_not_kept() {
        let policy = Policy::from_json(
            r#"{"rules":[
                {"name":"a","group":"g","limit":{"count":1,"per":"1s"},"enabled":false},
                {"name":"b","group":"g","limit":{"count":1,"per":"1s"}}
            ]}"#,
        )
        .unwrap();
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(policy.rules[0].group.as_deref(), Some("g"));
    }
}
