//! A rule's match conditions as written into a [`Matcher`]: methods, path,
//! headers, query parameters, client networks, gRPC or WebSocket, and
//! their negation.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::error::Errors;
use super::schema::{MatchConfig, PathConfig, PathsConfig, ValueMatchConfig};
use crate::access::Cidr;
use crate::policy::{Glob, GrpcMatch, Matcher, PathMatch, ValueMatch, Wanted};

/// The most header conditions, and the most query conditions, per `match`.
pub const MAX_VALUE_CONDITIONS: usize = 32;
/// The most `values` of one header or query condition.
pub const MAX_MATCH_VALUES: usize = 64;
/// The longest name or value of a header or query condition, in bytes.
pub const MAX_MATCH_TEXT: usize = 1024;
/// The most networks of a `client_ip` condition.
pub const MAX_CLIENT_NETWORKS: usize = 256;
/// How deep `not`s may nest (`not` inside `not`...).
pub const MAX_NOT_DEPTH: usize = 3;

/// Where a named value comes from, for its checks and messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Query,
}

/// The conditions of the rule at `at`, recording every problem.
pub(super) fn validate_match(raw: &MatchConfig, at: &str, errors: &mut Errors) -> Matcher {
    validate_conditions(raw, at, ".match", 0, errors)
}

/// The conditions at `field` of the rule at `at`, `depth` `not`s deep.
fn validate_conditions(
    raw: &MatchConfig,
    at: &str,
    field: &str,
    depth: usize,
    errors: &mut Errors,
) -> Matcher {
    let mut methods = Vec::new();
    for (j, method) in raw.methods.iter().enumerate() {
        if is_token(method) {
            methods.push(method.to_ascii_uppercase());
        } else {
            errors.add(
                at,
                &format!("{field}.methods[{j}]"),
                format!("{method:?} is not an HTTP method"),
            );
        }
    }
    let paths = match &raw.path {
        None => Vec::new(),
        Some(PathsConfig::One(p)) => validate_path(p, at, &format!("{field}.path"), errors)
            .into_iter()
            .collect(),
        Some(PathsConfig::AnyOf(list)) => {
            if list.is_empty() || list.len() > MAX_MATCH_VALUES {
                errors.add(
                    at,
                    &format!("{field}.path"),
                    format!("give 1 to {MAX_MATCH_VALUES} path conditions"),
                );
            }
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| validate_path(p, at, &format!("{field}.path[{i}]"), errors))
                .collect()
        }
    };
    let headers = validate_values(&raw.headers, Source::Header, at, field, errors);
    let query = validate_values(&raw.query, Source::Query, at, field, errors);
    let client_ip = validate_networks(&raw.client_ip, at, field, errors);
    let grpc = raw.grpc.as_ref().map(|g| GrpcMatch {
        service: g.service.as_deref().map(Glob::new),
        method: g.method.as_deref().map(Glob::new),
    });
    // `false` would read as "not a WebSocket upgrade", which `not` says.
    if raw.websocket == Some(false) {
        errors.add(
            at,
            &format!("{field}.websocket"),
            "only true is a condition: leave websocket out to match every request, or use not: {\"websocket\": true}".into(),
        );
    }
    let websocket = raw.websocket.unwrap_or(false);
    if grpc.is_some() && websocket {
        errors.add(
            at,
            field,
            "a request is either a gRPC call or a WebSocket upgrade: use grpc or websocket".into(),
        );
    }
    let not = raw.not.as_ref().and_then(|nested| {
        let not_field = format!("{field}.not");
        if depth >= MAX_NOT_DEPTH {
            errors.add(
                at,
                &not_field,
                format!("not may nest at most {MAX_NOT_DEPTH} deep"),
            );
            return None;
        }
        if **nested == MatchConfig::default() {
            errors.add(
                at,
                &not_field,
                "without conditions it holds for every request, so the rule would match none: give it conditions".into(),
            );
        }
        let negated = validate_conditions(nested, at, &not_field, depth + 1, errors);
        Some(Box::new(negated))
    });
    Matcher {
        methods,
        paths,
        headers,
        query,
        client_ip,
        grpc,
        websocket,
        not,
    }
}

/// Header or query conditions at `field.headers` or `field.query`.
fn validate_values(
    raw: &[ValueMatchConfig],
    source: Source,
    at: &str,
    field: &str,
    errors: &mut Errors,
) -> Vec<ValueMatch> {
    let list = match source {
        Source::Header => "headers",
        Source::Query => "query",
    };
    if raw.len() > MAX_VALUE_CONDITIONS {
        errors.add(
            at,
            &format!("{field}.{list}"),
            format!("at most {MAX_VALUE_CONDITIONS} conditions"),
        );
        return Vec::new();
    }
    let mut conditions = Vec::new();
    for (j, condition) in raw.iter().enumerate() {
        let here = format!("{field}.{list}[{j}]");
        let before = errors.count();
        let name = match source {
            Source::Header if is_token(&condition.name) => condition.name.to_ascii_lowercase(),
            Source::Header => {
                errors.add(
                    at,
                    &format!("{here}.name"),
                    format!("{:?} is not a header name", condition.name),
                );
                String::new()
            }
            Source::Query => {
                let problem = match condition.name.is_empty() {
                    true => Some("must not be empty".into()),
                    false => text_problem(&condition.name, source),
                };
                if let Some(problem) = problem {
                    errors.add(at, &format!("{here}.name"), problem);
                }
                condition.name.clone()
            }
        };
        let values = match (&condition.value, &condition.values) {
            (Some(_), Some(_)) => {
                errors.add(at, &here, "set value or values, not both".into());
                None
            }
            (Some(value), None) => Some(core::slice::from_ref(value)),
            (None, Some(values)) => {
                if values.is_empty() || values.len() > MAX_MATCH_VALUES {
                    errors.add(
                        at,
                        &format!("{here}.values"),
                        format!("give 1 to {MAX_MATCH_VALUES} values"),
                    );
                }
                Some(values.as_slice())
            }
            (None, None) => None,
        };
        let wanted = match (values, condition.present) {
            (Some(_), Some(_)) => {
                errors.add(
                    at,
                    &format!("{here}.present"),
                    "value and values imply present: remove present".into(),
                );
                Wanted::Present
            }
            (Some(values), None) => {
                for (k, value) in values.iter().enumerate() {
                    if let Some(problem) = text_problem(value, source) {
                        let at_value = match &condition.values {
                            Some(_) => format!("{here}.values[{k}]"),
                            None => format!("{here}.value"),
                        };
                        errors.add(at, &at_value, problem);
                    }
                }
                Wanted::OneOf(values.to_vec())
            }
            (None, Some(false)) => Wanted::Absent,
            (None, Some(true) | None) => Wanted::Present,
        };
        if errors.count() == before {
            conditions.push(ValueMatch { name, wanted });
        }
    }
    conditions
}

/// Why `text` can never be a header's or query parameter's name or value,
/// if it cannot.
fn text_problem(text: &str, source: Source) -> Option<String> {
    if text.len() > MAX_MATCH_TEXT {
        return Some(format!("at most {MAX_MATCH_TEXT} bytes"));
    }
    match source {
        Source::Query => None,
        // Envoy refuses control characters in header values and trims
        // the whitespace around them: such a value never matches.
        Source::Header if text.chars().any(|c| c.is_control() && c != '\t') => {
            Some("a header value has no control characters: this never matches".into())
        }
        Source::Header if text.trim_matches([' ', '\t']) != text => {
            Some("Envoy trims the whitespace around header values: this never matches".into())
        }
        Source::Header => None,
    }
}

/// The networks of a `client_ip` condition at `field.client_ip`.
fn validate_networks(raw: &[String], at: &str, field: &str, errors: &mut Errors) -> Vec<Cidr> {
    if raw.len() > MAX_CLIENT_NETWORKS {
        errors.add(
            at,
            &format!("{field}.client_ip"),
            format!("at most {MAX_CLIENT_NETWORKS} networks"),
        );
        return Vec::new();
    }
    let mut networks = Vec::new();
    for (j, text) in raw.iter().enumerate() {
        match Cidr::parse(text) {
            Ok(network) => networks.push(network),
            Err(e) => errors.add(at, &format!("{field}.client_ip[{j}]"), e.to_string()),
        }
    }
    networks
}

/// One path condition at `field`, or `None` after recording why not.
fn validate_path(p: &PathConfig, at: &str, field: &str, errors: &mut Errors) -> Option<PathMatch> {
    let set = [&p.exact, &p.prefix, &p.glob]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set != 1 {
        errors.add(at, field, "set exactly one of exact, prefix or glob".into());
        return None;
    }
    let (kind, text) = match (&p.exact, &p.prefix, &p.glob) {
        (Some(t), _, _) => ("exact", t),
        (_, Some(t), _) => ("prefix", t),
        (_, _, Some(t)) => ("glob", t),
        _ => return None,
    };
    let anchored = text.starts_with('/') || (kind == "glob" && text.starts_with('*'));
    if !anchored {
        errors.add(at, &format!("{field}.{kind}"), "must start with '/'".into());
        return None;
    }
    let ignore_case = p.ignore_case.unwrap_or(false);
    Some(match kind {
        "exact" => PathMatch::exact(text, ignore_case),
        "prefix" => PathMatch::prefix(text, ignore_case),
        _ if ignore_case => PathMatch::glob(Glob::ignoring_case(text)),
        _ => PathMatch::glob(Glob::new(text)),
    })
}

/// An HTTP token (RFC 9110): what method and header names are made of.
pub(super) fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;
    use crate::config::errors_of;
    use crate::policy::{HttpRequest, Policy};

    fn rule_with_match(conditions: &str) -> String {
        format!(
            r#"{{"rules":[{{"name":"r","match":{conditions},"limit":{{"count":1,"per":"1s"}}}}]}}"#
        )
    }

    #[test]
    fn every_form_of_condition_is_read() {
        let policy = Policy::from_json(&rule_with_match(
            r#"{"headers":[{"name":"X-Tier","values":["free","trial"]},{"name":"x-a","present":false},
                {"name":"x-b","present":true},{"name":"x-c","value":"1"}],
               "query":[{"name":"page","value":"a b"}],
               "client_ip":["10.0.0.0/8"],
               "not":{"methods":["get"],"not":{"path":{"prefix":"/x"}}}}"#,
        ))
        .unwrap();
        let m = &policy.rules[0].matcher;
        assert_eq!(
            m.headers,
            vec![
                ValueMatch {
                    name: "x-tier".into(),
                    wanted: Wanted::OneOf(vec!["free".into(), "trial".into()])
                },
                ValueMatch {
                    name: "x-a".into(),
                    wanted: Wanted::Absent
                },
                ValueMatch {
                    name: "x-b".into(),
                    wanted: Wanted::Present
                },
                ValueMatch {
                    name: "x-c".into(),
                    wanted: Wanted::OneOf(vec!["1".into()])
                },
            ]
        );
        assert_eq!(m.client_ip, vec![Cidr::parse("10.0.0.0/8").unwrap()]);
        assert_eq!(m.nested().count(), 3);
        assert!(policy.needs_query() && policy.needs_client_ip() && policy.needs_method());
        assert!(policy.needs_path() && !policy.needs_protocol());
        assert_eq!(policy.headers_needed(), ["x-tier", "x-a", "x-b", "x-c"]);
        let request = HttpRequest::new("POST", "/?page=a+b")
            .with_header("x-tier", "trial")
            .with_header("x-b", "")
            .with_header("x-c", "1")
            .with_client_ip("10.0.0.1".parse().unwrap());
        assert!(m.matches(&request));
    }

    #[test]
    fn bad_conditions_are_reported_with_their_paths() {
        let long = "v".repeat(MAX_MATCH_TEXT + 1);
        let errors = errors_of(&rule_with_match(&format!(
            r#"{{"headers":[{{"name":"x","value":"a","values":["b"]}},{{"name":"y","values":[]}},
                {{"name":"z","value":"a","present":false}},{{"name":"w","value":" padded"}},
                {{"name":"bad name"}},{{"name":"v","values":["ok","{long}"]}}],
               "query":[{{"name":""}},{{"name":"q","values":["a\nb"]}}],
               "client_ip":["10.0.0.0/8","10.0.0.0/33","nope"],
               "not":{{"not":{{"websocket":true}}}}}}"#
        )));
        assert_eq!(
            errors,
            [
                "rules[0].match.headers[0]: set value or values, not both",
                "rules[0].match.headers[1].values: give 1 to 64 values",
                "rules[0].match.headers[2].present: value and values imply present: remove present",
                "rules[0].match.headers[3].value: Envoy trims the whitespace around header values: this never matches",
                "rules[0].match.headers[4].name: \"bad name\" is not a header name",
                "rules[0].match.headers[5].values[1]: at most 1024 bytes",
                "rules[0].match.query[0].name: must not be empty",
                "rules[0].match.client_ip[1]: prefix \"33\" must be a number from 0 to 32 for this address family",
                "rules[0].match.client_ip[2]: \"nope\" is not an IP address (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 1.2.3.4)",
            ]
        );
        // A query value may hold anything once decoded, a newline too.
        assert!(!errors.iter().any(|e| e.contains("query[1]")));
    }

    #[test]
    fn a_list_of_paths_matches_any_of_them() {
        let policy = Policy::from_json(&rule_with_match(
            r#"{"path":[{"exact":"/api/search"},{"prefix":"/api/export/"}]}"#,
        ))
        .unwrap();
        let matcher = &policy.rules[0].matcher;
        for (path, expected) in [
            ("/api/search", true),
            ("/api/export/csv", true),
            ("/api/searching", false),
            ("/api/export", false),
        ] {
            assert_eq!(
                matcher.matches(&HttpRequest::new("GET", path)),
                expected,
                "{path}"
            );
        }
        assert_eq!(
            errors_of(&rule_with_match(
                r#"{"path":[{"exact":"/a"},{"prefix":"b"},{"exact":"/c","glob":"/d"}]}"#
            )),
            [
                "rules[0].match.path[1].prefix: must start with '/'",
                "rules[0].match.path[2]: set exactly one of exact, prefix or glob",
            ]
        );
        assert_eq!(
            errors_of(&rule_with_match(r#"{"path":[]}"#)),
            ["rules[0].match.path: give 1 to 64 path conditions"]
        );
    }

    #[test]
    fn negations_are_bounded_and_never_empty() {
        assert_eq!(
            errors_of(&rule_with_match(r#"{"path":{"prefix":"/"},"not":{}}"#)),
            ["rules[0].match.not: without conditions it holds for every request, so the rule would match none: give it conditions"]
        );
        assert_eq!(
            errors_of(&rule_with_match(
                r#"{"not":{"not":{"not":{"not":{"methods":["GET"]}}}}}"#
            )),
            ["rules[0].match.not.not.not.not: not may nest at most 3 deep"]
        );
        assert_eq!(
            errors_of(&rule_with_match(r#"{"not":{"methods":["G T"]}}"#)),
            ["rules[0].match.not.methods[0]: \"G T\" is not an HTTP method"]
        );
        // Nested gRPC or WebSocket conditions do not make a stream rule.
        let errors = errors_of(
            r#"{"rules":[{"name":"r","match":{"not":{"websocket":true}},"counts":"messages",
                "limit":{"count":1,"per":"1s"}}]}"#,
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("rules[0].counts: "), "{errors:?}");
        let policy = Policy::from_json(&rule_with_match(r#"{"not":{"websocket":true}}"#)).unwrap();
        assert!(policy.needs_protocol());
    }

    #[test]
    fn list_sizes_are_bounded() {
        let many = |n: usize, item: &dyn Fn(usize) -> String| {
            (0..n).map(item).collect::<Vec<_>>().join(",")
        };
        let headers = many(MAX_VALUE_CONDITIONS + 1, &|i| {
            format!(r#"{{"name":"h{i}"}}"#)
        });
        let query = many(MAX_VALUE_CONDITIONS, &|i| format!(r#"{{"name":"q{i}"}}"#));
        let values = many(MAX_MATCH_VALUES + 1, &|i| format!(r#""v{i}""#));
        let networks = many(MAX_CLIENT_NETWORKS + 1, &|i| {
            format!(r#""10.0.{}.{}""#, i / 256, i % 256)
        });
        let errors = errors_of(&rule_with_match(&format!(
            r#"{{"headers":[{headers}],"query":[{query},{{"name":"x","values":[{values}]}}],"client_ip":[{networks}]}}"#
        )));
        assert_eq!(
            errors,
            [
                "rules[0].match.headers: at most 32 conditions",
                "rules[0].match.query: at most 32 conditions",
                "rules[0].match.client_ip: at most 256 networks",
            ]
        );
        let one_short = errors_of(&rule_with_match(&format!(
            r#"{{"query":[{{"name":"x","values":[{values}]}}],"not":{{}}}}"#
        )));
        assert_eq!(
            one_short[0],
            "rules[0].match.query[0].values: give 1 to 64 values"
        );
        assert_eq!(one_short.len(), 2, "{one_short:?}");
    }
}
