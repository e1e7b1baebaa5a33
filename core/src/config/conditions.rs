//! A rule's match conditions as written into a [`Matcher`]: methods, path,
//! headers, and gRPC or WebSocket.

use alloc::format;
use alloc::vec::Vec;

use super::error::Errors;
use super::schema::MatchConfig;
use crate::policy::{Glob, GrpcMatch, HeaderMatch, Matcher, PathMatch};

/// The conditions of the rule at `at`, recording every problem.
pub(super) fn validate_match(raw: &MatchConfig, at: &str, errors: &mut Errors) -> Matcher {
    let mut methods = Vec::new();
    for (j, method) in raw.methods.iter().enumerate() {
        if is_token(method) {
            methods.push(method.to_ascii_uppercase());
        } else {
            errors.add(
                at,
                &format!(".match.methods[{j}]"),
                format!("{method:?} is not an HTTP method"),
            );
        }
    }
    let path = raw.path.as_ref().and_then(|p| {
        let set = [&p.exact, &p.prefix, &p.glob]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            errors.add(
                at,
                ".match.path",
                "set exactly one of exact, prefix or glob".into(),
            );
            return None;
        }
        let (field, text) = match (&p.exact, &p.prefix, &p.glob) {
            (Some(t), _, _) => ("exact", t),
            (_, Some(t), _) => ("prefix", t),
            (_, _, Some(t)) => ("glob", t),
            _ => return None,
        };
        let anchored = text.starts_with('/') || (field == "glob" && text.starts_with('*'));
        if !anchored {
            errors.add(
                at,
                &format!(".match.path.{field}"),
                "must start with '/'".into(),
            );
            return None;
        }
        let ignore_case = p.ignore_case.unwrap_or(false);
        Some(match field {
            "exact" => PathMatch::exact(text, ignore_case),
            "prefix" => PathMatch::prefix(text, ignore_case),
            _ if ignore_case => PathMatch::glob(Glob::ignoring_case(text)),
            _ => PathMatch::glob(Glob::new(text)),
        })
    });
    let mut headers = Vec::new();
    for (j, h) in raw.headers.iter().enumerate() {
        if is_token(&h.name) {
            headers.push(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            });
        } else {
            errors.add(
                at,
                &format!(".match.headers[{j}].name"),
                format!("{:?} is not a header name", h.name),
            );
        }
    }
    let grpc = raw.grpc.as_ref().map(|g| GrpcMatch {
        service: g.service.as_deref().map(Glob::new),
        method: g.method.as_deref().map(Glob::new),
    });
    // `false` would read as "not a WebSocket upgrade", which no condition
    // expresses: refuse it rather than match every request.
    if raw.websocket == Some(false) {
        errors.add(
            at,
            ".match.websocket",
            "only true is a condition: leave websocket out to match every request".into(),
        );
    }
    let websocket = raw.websocket.unwrap_or(false);
    if grpc.is_some() && websocket {
        errors.add(
            at,
            ".match",
            "a request is either a gRPC call or a WebSocket upgrade: use grpc or websocket".into(),
        );
    }
    Matcher {
        methods,
        path,
        headers,
        grpc,
        websocket,
    }
}

/// An HTTP token (RFC 9110): what method and header names are made of.
pub(super) fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
