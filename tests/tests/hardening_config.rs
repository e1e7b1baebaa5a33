//! End-to-end tests of configuration hardening through a real Envoy: array
//! configurations refused, decimal periods, IPv6 clients keyed per network,
//! case-insensitive path matching, and the path-parameter advice in
//! README.md.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Each test starts
//! its own upstream and Envoy (port 0, dynamic base id).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::client::Client;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;

/// The upstream, Envoy with the filter, and a client for Envoy's listener.
struct Setup {
    _upstream: Upstream,
    envoy: Envoy,
    client: Client,
}

async fn setup(test: &str, config: Value) -> Setup {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let envoy = Envoy::builder(test)
        .upstream(upstream.port())
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let client = envoy.client();
    Setup {
        _upstream: upstream,
        envoy,
        client,
    }
}

impl Setup {
    /// Statuses of GET `path` sent once with each X-Forwarded-For value.
    async fn statuses_from(&self, path: &str, clients: &[&str]) -> Vec<u16> {
        let mut statuses = Vec::new();
        for xff in clients {
            let reply = self
                .client
                .get_with(path, &[("x-forwarded-for", xff)])
                .await
                .unwrap_or_else(|e| panic!("GET {path} as {xff}: {e:#}"));
            statuses.push(reply.status);
        }
        statuses
    }

    /// Statuses of GET on each path in turn.
    async fn statuses_of(&self, paths: &[&str]) -> Vec<u16> {
        let mut statuses = Vec::new();
        for path in paths {
            let reply = self
                .client
                .get(path)
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
            statuses.push(reply.status);
        }
        statuses
    }

    /// The filter reported no internal failure.
    async fn assert_no_errors(&self) {
        let errors = self
            .envoy
            .filter_errors()
            .await
            .expect("reading Envoy's stats");
        assert_eq!(errors, 0, "sluice_http.errors: expected 0, got {errors}");
    }
}

/// A configuration written as positional arrays (`[[rules]]`) was read as
/// `{"rules": [...]}`; Envoy now refuses it at startup, naming the place.
#[tokio::test]
async fn a_configuration_written_as_an_array_is_refused() {
    let failure = Envoy::builder("a_configuration_written_as_an_array_is_refused")
        .sluice_raw(r#"[[{"name":"r","limit":{"count":1,"per":"1s"}}]]"#)
        .start_timeout(Duration::from_secs(30))
        .start_expect_failure()
        .await
        .expect("running Envoy");
    assert!(!failure.status.success(), "Envoy must exit non-zero");
    let expected =
        "invalid sluice configuration: (document): invalid type: sequence, expected an object";
    assert!(failure.log.contains(expected), "log:\n{}", failure.log);
}

/// `"per": "1.5s"` was refused as an unknown unit; it is now 1500ms.
#[tokio::test]
async fn a_decimal_period_is_accepted() {
    let config = json!({"rules": [
        {"name": "r", "limit": {"count": 1, "per": "1.5s"}, "algorithm": "fixed_window"}
    ]});
    let s = setup("a_decimal_period_is_accepted", config).await;
    let first = s.client.get("/").await.expect("GET / (1)");
    assert_eq!(first.status, 200, "request 1");
    // The window is shown in whole seconds, rounded up.
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"r\";q=1;w=2"),
        "request 1 headers:\n{}",
        first.headers_text()
    );
    let second = s.client.get("/").await.expect("GET / (2)");
    assert_eq!(second.status, 429, "request 2");
    s.assert_no_errors().await;
}

fn per_client(client_ip: Value) -> Value {
    json!({
        "rules": [{"name": "per-client", "limit": {"count": 1, "per": "1h"}}],
        "client_ip": client_ip,
    })
}

/// By default, IPv6 clients in one /64 share a counter: one host cannot
/// rotate through its addresses for fresh budgets. Other /64s are apart.
#[tokio::test]
async fn ipv6_clients_in_one_64_share_a_limit() {
    let config = per_client(json!({"trusted_hops": 1}));
    let s = setup("ipv6_clients_in_one_64_share_a_limit", config).await;
    let statuses = s
        .statuses_from(
            "/",
            &[
                "2001:db8:0:1::1",
                "2001:db8:0:1::2",
                "2001:db8:0:1:ffff:ffff:ffff:ffff",
                "2001:db8:0:2::1",
                "2001:db8:0:3::1",
            ],
        )
        .await;
    assert_eq!(
        statuses,
        [200, 429, 429, 200, 200],
        "three addresses of 2001:db8:0:1::/64, then two other /64s"
    );
    s.assert_no_errors().await;
}

/// `ipv6_prefix: 128` keys each IPv6 address apart.
#[tokio::test]
async fn ipv6_prefix_128_keys_each_address() {
    let config = per_client(json!({"trusted_hops": 1, "ipv6_prefix": 128}));
    let s = setup("ipv6_prefix_128_keys_each_address", config).await;
    let statuses = s
        .statuses_from(
            "/",
            &["2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:1::2"],
        )
        .await;
    assert_eq!(statuses, [200, 200, 429], "::1, ::2, ::2 of one /64");
    s.assert_no_errors().await;
}

fn by_path(ignore_case: bool) -> Value {
    json!({"rules": [{
        "name": "api",
        "match": {"path": {"prefix": "/api/", "ignore_case": ignore_case}},
        "key": ["path"],
        "limit": {"count": 1, "per": "1h"},
    }]})
}

/// With `ignore_case`, `/API/x` and `/Api/X` match `/api/` and count
/// against the same key as `/api/x`.
#[tokio::test]
async fn paths_ignoring_case_are_limited_together() {
    let s = setup("paths_ignoring_case_are_limited_together", by_path(true)).await;
    let statuses = s
        .statuses_of(&["/api/x", "/API/x", "/Api/X", "/api/y"])
        .await;
    assert_eq!(
        statuses,
        [200, 429, 429, 200],
        "/api/x, /API/x, /Api/X, /api/y"
    );
    s.assert_no_errors().await;
}

/// Without `ignore_case` (the default), case matters: `/API/x` is not
/// matched by `/api/`, so it is never limited by the rule.
#[tokio::test]
async fn paths_are_case_sensitive_by_default() {
    let s = setup("paths_are_case_sensitive_by_default", by_path(false)).await;
    let statuses = s
        .statuses_of(&["/api/x", "/api/x", "/API/x", "/API/x", "/Api/X"])
        .await;
    assert_eq!(
        statuses,
        [200, 429, 200, 200, 200],
        "/api/x twice, then other cases"
    );
    s.assert_no_errors().await;
}

/// README's advice on path parameters: Envoy passes `/api;v=1/users` as
/// written, so `{"prefix": "/api/"}` misses it; `{"glob": "/api*/**"}`
/// catches it with `/api/users`.
#[tokio::test]
async fn path_parameters_reach_the_filter_as_written() {
    let rule = |name: &str, path: Value| {
        json!({"name": name, "match": {"path": path}, "scope": "global",
               "limit": {"count": 1, "per": "1h"}})
    };
    let config = json!({"rules": [
        rule("prefix", json!({"prefix": "/api/"})),
        rule("glob", json!({"glob": "/api*/**"})),
    ]});
    let s = setup("path_parameters_reach_the_filter_as_written", config).await;
    let first = s.client.get("/api;v=1/users").await.expect("GET (1)");
    assert_eq!(first.status, 200, "the first request");
    // Only the glob rule applied: it alone is listed.
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"glob\";q=1;w=3600"),
        "headers:\n{}",
        first.headers_text()
    );
    let second = s.client.get("/api/users").await.expect("GET (2)");
    assert_eq!(second.status, 429, "/api/users after /api;v=1/users");
    s.assert_no_errors().await;
}
