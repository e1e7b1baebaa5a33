//! A rule's `cost_from` and `charge`, and the gRPC entries of
//! `exclude_statuses`.

use alloc::format;
use alloc::string::String;

use super::conditions::is_token;
use super::error::Errors;
use super::schema::{ChargeConfig, CostFromConfig};
use crate::policy::charging::grpc_status_code;
use crate::policy::{ChargeFrom, CostFrom, Counts, ReportedIn};

/// The validated `cost_from` of the rule at `at`.
pub(super) fn validate_cost_from(
    raw: &CostFromConfig,
    counts: Counts,
    at: &str,
    errors: &mut Errors,
) -> Option<CostFrom> {
    let before = errors.count();
    only_for_requests(counts, ".cost_from", at, errors);
    let header = header_name(&raw.header, ".cost_from.header", at, errors);
    if raw.max == 0 {
        errors.add(at, ".cost_from.max", "must be at least 1".into());
    }
    (errors.count() == before).then(|| CostFrom {
        header: header.unwrap_or_default(),
        max: raw.max,
    })
}

/// The validated `charge` of the rule at `at`; `synced` when the rule has
/// `sync`, which cannot be charged after the response yet.
pub(super) fn validate_charge(
    raw: &ChargeConfig,
    counts: Counts,
    synced: bool,
    at: &str,
    errors: &mut Errors,
) -> Option<ChargeFrom> {
    let before = errors.count();
    only_for_requests(counts, ".charge", at, errors);
    if synced {
        errors.add(
            at,
            ".charge",
            "not supported with sync yet (the quota server only takes permits before a request); \
             remove charge or sync"
                .into(),
        );
    }
    let (reported_in, name, field) = match (&raw.response_header, &raw.response_trailer) {
        (Some(name), None) => (ReportedIn::Header, name, ".charge.response_header"),
        (None, Some(name)) => (ReportedIn::Trailer, name, ".charge.response_trailer"),
        _ => {
            errors.add(
                at,
                ".charge",
                "needs exactly one of response_header and response_trailer".into(),
            );
            return None;
        }
    };
    let name = header_name(name, field, at, errors);
    if raw.max == 0 {
        errors.add(at, ".charge.max", "must be at least 1".into());
    }
    (errors.count() == before).then(|| ChargeFrom {
        reported_in,
        name: name.unwrap_or_default(),
        max: raw.max,
    })
}

/// The gRPC status code of an `exclude_statuses` entry `grpc:<name or
/// number>`; `None` if `text` is not one, `Some(Err)` if it is malformed.
pub(super) fn excluded_grpc_status(text: &str) -> Option<Result<u8, String>> {
    let status = text.strip_prefix("grpc:")?;
    Some(grpc_status_code(status).ok_or_else(|| {
        format!(
            "unknown gRPC status {status:?}: use a name such as \"grpc:UNAVAILABLE\" or a code \
             from 0 to 16 such as \"grpc:14\""
        )
    }))
}

fn only_for_requests(counts: Counts, field: &str, at: &str, errors: &mut Errors) {
    if counts != Counts::Requests {
        errors.add(at, field, "only for counts requests".into());
    }
}

/// `name` lower-cased, if it is a header name.
fn header_name(name: &str, field: &str, at: &str, errors: &mut Errors) -> Option<String> {
    if is_token(name) {
        Some(name.to_ascii_lowercase())
    } else {
        errors.add(at, field, format!("{name:?} is not a header name"));
        None
    }
}

#[cfg(test)]
mod tests {
    use crate::config::errors_of;
    use crate::policy::{Policy, ReportedIn};

    #[test]
    fn cost_from_and_charge_are_read() {
        let p = Policy::from_json(
            r#"{"rules":[{"name":"llm","key":["header:x-api-key"],"limit":{"count":10000,"per":"1h"},
                "cost_from":{"header":"X-Max-Tokens","max":4000},
                "charge":{"response_header":"X-Tokens-Used","max":8000}}],
                "exclude_statuses":[503,"grpc:UNAVAILABLE","grpc:4"]}"#,
        )
        .unwrap();
        let rule = &p.rules[0];
        let from = rule.cost_from.as_ref().unwrap();
        assert_eq!((from.header.as_str(), from.max), ("x-max-tokens", 4000));
        let charge = rule.charge.as_ref().unwrap();
        assert_eq!(charge.reported_in, ReportedIn::Header);
        assert_eq!((charge.name.as_str(), charge.max), ("x-tokens-used", 8000));
        assert!(p.headers_needed().contains(&"x-max-tokens"));
        assert!(p.exclude_statuses.contains(503) && p.exclude_statuses.has_grpc());
        assert!(p.exclude_statuses.contains_grpc("14") && p.exclude_statuses.contains_grpc("4"));
        assert!(!p.exclude_statuses.contains_grpc("13") && !p.exclude_statuses.contains_grpc("x"));
    }

    #[test]
    fn every_mistake_is_named() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","limit":{"count":100,"per":"1m"},"cost_from":{"header":"bad name","max":0}},
                {"name":"b","limit":{"count":100,"per":"1m","burst":50},"cost_from":{"header":"x-cost","max":51}},
                {"name":"c","limit":{"count":10,"per":"1m"},"charge":{"response_header":"x","response_trailer":"y","max":5}},
                {"name":"d","limit":{"count":10,"per":"1m"},"charge":{"response_trailer":"x-used","max":0}},
                {"name":"e","counts":"in_flight","limit":{"count":10},"cost_from":{"header":"x","max":1},"charge":{"response_header":"x","max":1}},
                {"name":"f","charge":{"response_header":"x","max":9},"sync":{"mode":"exact","domain":"d"}},
                {"name":"g","cost_from":{"header":"x","max":101},"sync":{"mode":"leased","domain":"d"}}
            ],"exclude_statuses":["grpc:17","grpc:NOPE","grpc:"]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].cost_from.header: \"bad name\" is not a header name",
                "rules[0].cost_from.max: must be at least 1",
                "rules[1].cost_from.max: 51 exceeds what the limit can ever grant at once (50); no request could pass",
                "rules[2].charge: needs exactly one of response_header and response_trailer",
                "rules[3].charge.max: must be at least 1",
                "rules[4].cost_from: only for counts requests",
                "rules[4].charge: only for counts requests",
                "rules[5].charge: not supported with sync yet (the quota server only takes permits before a request); remove charge or sync",
                "rules[6].cost_from.max: 101 is more than sync.max_lease (100): a lease could never admit a request of that cost; lower it or raise sync.max_lease",
                "exclude_statuses[0]: unknown gRPC status \"17\": use a name such as \"grpc:UNAVAILABLE\" or a code from 0 to 16 such as \"grpc:14\"",
                "exclude_statuses[1]: unknown gRPC status \"NOPE\": use a name such as \"grpc:UNAVAILABLE\" or a code from 0 to 16 such as \"grpc:14\"",
                "exclude_statuses[2]: unknown gRPC status \"\": use a name such as \"grpc:UNAVAILABLE\" or a code from 0 to 16 such as \"grpc:14\"",
            ]
        );
    }
}
