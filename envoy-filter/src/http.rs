//! HTTP specifics: the request as rules see it, and the 429 reply.

use std::fmt::Write as _;

use sluice_core::client_ip::parse_ip;
use sluice_core::engine::Verdict;
use sluice_core::policy::{split_target, HttpRequest, Policy, Protocol};

use crate::host::Host;
use crate::stream::{grpc_message, GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED};

/// Which request attributes the policy reads: computed once per
/// configuration, so each request fetches only those (every fetch is a
/// host call).
#[derive(Clone, Debug, Default)]
pub struct Needs {
    /// Lower-case header names.
    pub headers: Vec<String>,
    /// The method.
    pub method: bool,
    /// The path.
    pub path: bool,
    /// The query string (kept only for rules that read it).
    pub query: bool,
    /// The client address.
    pub client_ip: bool,
    /// Whether a request is gRPC or WebSocket (some rule matches on it).
    pub protocol: bool,
}

impl Needs {
    /// What `policy`'s rules read.
    pub fn of(policy: &Policy) -> Needs {
        Needs {
            headers: policy
                .headers_needed()
                .into_iter()
                .map(String::from)
                .collect(),
            method: policy.needs_method(),
            path: policy.needs_path(),
            query: policy.needs_query(),
            client_ip: policy.needs_client_ip(),
            protocol: policy.needs_protocol(),
        }
    }
}

/// Fetches from the host what `needs` lists (and the client address when
/// `client_ip`, for the access controls), as a request the policy can
/// evaluate. Absent headers are simply left out.
pub fn fetch_request(
    host: &impl Host,
    policy: &Policy,
    needs: &Needs,
    client_ip: bool,
) -> HttpRequest {
    let header = |wanted: bool, name: &str| {
        if wanted {
            host.request_header(name)
        } else {
            None
        }
    };
    let client_ip = if needs.client_ip || client_ip {
        let forwarded = header(policy.client_ip.trusted_hops > 0, "x-forwarded-for");
        let peer = || host.peer_address().as_deref().and_then(parse_ip);
        policy.client_ip.resolve_with(peer, forwarded.as_deref())
    } else {
        None
    };
    let protocol = if needs.protocol {
        detect_protocol(host)
    } else {
        Protocol::Http
    };
    let mut target = header(needs.path || needs.query, ":path").unwrap_or_default();
    let (path, query) = split_target(&target);
    let path_len = path.len();
    let query = if needs.query { query } else { "" }.to_owned();
    // The path begins the target: the host's string, cut, is the path.
    let path = if needs.path {
        target.truncate(path_len);
        target
    } else {
        String::new()
    };
    HttpRequest {
        protocol,
        method: header(needs.method, ":method").unwrap_or_default(),
        path,
        query,
        headers: needs
            .headers
            .iter()
            .filter_map(|name| host.request_header(name).map(|v| (name.clone(), v)))
            .collect(),
        client_ip,
    }
}

/// The request's protocol, from its headers. An upgrade to WebSocket wins
/// over any content type, so `upgrade` is read first: a WebSocket upgrade
/// costs one header read. A gRPC call still needs both: a client could
/// send a gRPC content type with its upgrade.
pub fn detect_protocol(host: &impl Host) -> Protocol {
    let upgrade = host.request_header("upgrade");
    match Protocol::detect(None, upgrade.as_deref()) {
        Protocol::WebSocket => Protocol::WebSocket,
        _ => Protocol::detect(host.request_header("content-type").as_deref(), None),
    }
}

/// A response the filter sends itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u32,
    /// Headers, lower-case names.
    pub headers: Vec<(&'static str, String)>,
    /// Body bytes (for gRPC: the `grpc-message`).
    pub body: Vec<u8>,
    /// For gRPC: the status Envoy answers with as a trailers-only response.
    pub grpc_status: Option<u32>,
}

/// The refusal for a limited verdict: for gRPC a trailers-only
/// RESOURCE_EXHAUSTED (a 429 would reach gRPC clients as UNAVAILABLE, which
/// they retry at once), otherwise a 429 with a JSON body; both with
/// `retry-after` and the configured rate-limit headers.
pub fn refusal(
    policy: &Policy,
    verdict: &Verdict,
    rule_index: usize,
    protocol: Protocol,
) -> LocalReply {
    // Room for every rate-limit header and the content type.
    let mut headers = Vec::with_capacity(8);
    verdict.headers(policy, |name, value| headers.push((name, value.to_owned())));
    let rule = policy.rules.get(rule_index).map_or("", |r| r.name.as_str());
    let retry_after = verdict.shown(policy).map_or(1, |d| d.retry_after_secs());
    if protocol == Protocol::Grpc {
        return grpc_refusal(
            GRPC_RESOURCE_EXHAUSTED,
            headers,
            &grpc_message(rule, retry_after),
        );
    }
    headers.push(("content-type", "application/json".to_owned()));
    LocalReply {
        status: 429,
        headers,
        body: json_body("rate_limited", Some((rule, retry_after))),
        grpc_status: None,
    }
}

/// How long a client refused for lack of the quota server should wait.
const UNAVAILABLE_RETRY_SECS: u64 = 1;

/// The refusal when the quota server cannot decide for `rule`, a synced
/// rule that fails closed: a 429 (gRPC: RESOURCE_EXHAUSTED) saying so.
pub fn unavailable(rule: &str, protocol: Protocol) -> LocalReply {
    let headers = vec![("retry-after", UNAVAILABLE_RETRY_SECS.to_string())];
    if protocol == Protocol::Grpc {
        let message = format!(
            "rate limit of rule {rule} unavailable (quota server not answering); retry after {UNAVAILABLE_RETRY_SECS}s"
        );
        return grpc_refusal(GRPC_RESOURCE_EXHAUSTED, headers, &message);
    }
    let mut headers = headers;
    headers.push(("content-type", "application/json".to_owned()));
    LocalReply {
        status: 429,
        headers,
        body: json_body(
            "rate_limit_unavailable",
            Some((rule, UNAVAILABLE_RETRY_SECS)),
        ),
        grpc_status: None,
    }
}

/// The refusal of a client the quota server's access controls deny
/// (deny list or ban): a 403 with a JSON body, for gRPC a trailers-only
/// PERMISSION_DENIED. Neither says when to retry: a ban lasts as long as
/// the operator chose.
pub fn forbidden(protocol: Protocol) -> LocalReply {
    if protocol == Protocol::Grpc {
        return grpc_refusal(GRPC_PERMISSION_DENIED, Vec::new(), "access denied");
    }
    LocalReply {
        status: 403,
        headers: vec![("content-type", "application/json".to_owned())],
        body: json_body("access_denied", None),
        grpc_status: None,
    }
}

/// A refusal's JSON body: `{"error":…}`, with `retry_after` and `rule`
/// when `limited` by a rule, keys in sorted order. Written directly: the
/// error codes are constants and rule names (`A-Z a-z 0-9 - _`, checked
/// by the configuration) need no escaping.
fn json_body(error: &'static str, limited: Option<(&str, u64)>) -> Vec<u8> {
    let mut body = String::with_capacity(80);
    let _ = write!(body, r#"{{"error":"{error}""#);
    if let Some((rule, retry_after)) = limited {
        let _ = write!(body, r#","retry_after":{retry_after},"rule":"{rule}""#);
    }
    body.push('}');
    body.into_bytes()
}

/// A trailers-only gRPC `status` carrying `metadata`.
pub fn grpc_refusal(
    status: u32,
    metadata: Vec<(&'static str, String)>,
    message: &str,
) -> LocalReply {
    LocalReply {
        status: 200,
        headers: metadata,
        body: message.as_bytes().to_vec(),
        grpc_status: Some(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;

    fn fetched(config: &str, target: &str) -> Result<HttpRequest, String> {
        let policy = Policy::from_json(config).map_err(|e| e.to_string())?;
        let host = FakeHost::default();
        host.request("GET", target, &[]);
        Ok(fetch_request(&host, &policy, &Needs::of(&policy), false))
    }

    #[test]
    fn an_upgrade_to_websocket_wins_over_a_grpc_content_type() {
        let host = FakeHost::default();
        let grpc = ("content-type", "application/grpc");
        let upgrade = ("upgrade", "WebSocket");
        for (headers, expected) in [
            (&[grpc, upgrade][..], Protocol::WebSocket),
            (&[upgrade][..], Protocol::WebSocket),
            (&[grpc][..], Protocol::Grpc),
            (&[][..], Protocol::Http),
        ] {
            host.request("POST", "/a.B/C", headers);
            assert_eq!(detect_protocol(&host), expected, "{headers:?}");
        }
    }

    #[test]
    fn refusal_bodies_are_the_json_of_their_fields() {
        let cases = [
            (
                json_body("rate_limited", Some(("per-ip_2", 60))),
                serde_json::json!({"error": "rate_limited", "rule": "per-ip_2", "retry_after": 60}),
            ),
            (
                json_body("access_denied", None),
                serde_json::json!({"error": "access_denied"}),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(String::from_utf8_lossy(&body), expected.to_string());
        }
    }

    #[test]
    fn the_query_is_kept_only_for_rules_that_read_it() -> Result<(), String> {
        let by_path = r#"{"rules":[{"name":"r","match":{"path":{"prefix":"/a"}},"limit":{"count":1,"per":"1s"}}]}"#;
        let request = fetched(by_path, "/a/b?page=2#top")?;
        assert_eq!(
            (request.path.as_str(), request.query.as_str()),
            ("/a/b", "")
        );
        let by_query =
            r#"{"rules":[{"name":"r","key":["query:page"],"limit":{"count":1,"per":"1s"}}]}"#;
        let request = fetched(by_query, "/a/b?page=2#top")?;
        assert_eq!(
            (request.path.as_str(), request.query.as_str()),
            ("", "page=2")
        );
        let by_both = r#"{"rules":[{"name":"r","match":{"path":{"prefix":"/a"},"query":[{"name":"page"}]},"limit":{"count":1,"per":"1s"}}]}"#;
        let request = fetched(by_both, "/a/b?page=2")?;
        assert_eq!(
            (request.path.as_str(), request.query.as_str()),
            ("/a/b", "page=2")
        );
        Ok(())
    }
}
