//! End-to-end tests of the Sluice HTTP filter through a real Envoy, against
//! the contract in README.md, "Filter configuration".
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Every test starts
//! its own upstream and Envoy (port 0, dynamic base id), so they run in
//! parallel. On failure, Envoy's files are kept under `.e2e-logs/<test>/`.
//! Sleeps appear only where time itself is under test (windows, delays).

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::{prometheus_value, Envoy};
use sluice_e2e::upstream::Upstream;
use tokio::sync::Semaphore;

/// The upstream, Envoy with the filter, and a client for Envoy's listener.
struct Setup {
    upstream: Upstream,
    envoy: Envoy,
    client: Client,
}

async fn setup(test: &str, config: Value) -> Setup {
    setup_workers(test, config, 1).await
}

async fn setup_workers(test: &str, config: Value, workers: u32) -> Setup {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let envoy = Envoy::builder(test)
        .upstream(upstream.port())
        .concurrency(workers)
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let client = envoy.client();
    Setup {
        upstream,
        envoy,
        client,
    }
}

impl Setup {
    async fn get(&self, path: &str) -> Reply {
        self.client
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client
            .get_with(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e:#}"))
    }

    /// The counter once it reads `expected` (or what it reads after 5 s).
    async fn counter(&self, rule: &str, outcome: &str, expected: u64) -> u64 {
        self.envoy
            .sluice_counter_settled(rule, outcome, expected)
            .await
            .expect("reading Envoy's stats")
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

fn rule(name: &str, count: u64, per: &str) -> Value {
    json!({"name": name, "limit": {"count": count, "per": per}})
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

fn describe(reply: &Reply) -> String {
    format!(
        "status {}\n{}body: {}",
        reply.status,
        reply.headers_text(),
        reply.text()
    )
}

fn assert_status(reply: &Reply, expected: u16, what: &str) {
    assert_eq!(
        reply.status,
        expected,
        "{what}: expected status {expected}, got:\n{}",
        describe(reply)
    );
}

fn assert_header(reply: &Reply, name: &str, expected: &str, what: &str) {
    assert_eq!(
        reply.header(name),
        Some(expected),
        "{what}: header {name}: expected {expected:?}, got:\n{}",
        describe(reply)
    );
}

/// Parses `"<rule>";r=<n>;t=<n>` (the IETF `RateLimit` field).
fn parse_ratelimit(value: &str) -> Option<(String, u64, u64)> {
    let mut parts = value.split(';').map(str::trim);
    let name = parts
        .next()?
        .strip_prefix('"')?
        .strip_suffix('"')?
        .to_owned();
    let (mut r, mut t) = (None, None);
    for part in parts {
        match part.split_once('=') {
            Some(("r", v)) => r = v.parse().ok(),
            Some(("t", v)) => t = v.parse().ok(),
            _ => {}
        }
    }
    Some((name, r?, t?))
}

/// The default header set is the IETF draft's alone: no X-RateLimit-*.
fn assert_no_x_ratelimit(reply: &Reply, what: &str) {
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(
            reply.header(name).is_none(),
            "{what}: {name} without opting in to x_ratelimit:\n{}",
            describe(reply)
        );
    }
}

/// An allowed response with the default header set.
fn assert_allowed(
    reply: &Reply,
    rule: &str,
    count: u64,
    window_s: u64,
    remaining: u64,
    what: &str,
) {
    assert_status(reply, 200, what);
    assert_no_x_ratelimit(reply, what);
    assert_header(
        reply,
        "ratelimit-policy",
        &format!("\"{rule}\";q={count};w={window_s}"),
        what,
    );
    let ratelimit = reply.header("ratelimit").unwrap_or_default();
    let parsed = parse_ratelimit(ratelimit);
    assert!(
        matches!(&parsed, Some((name, r, _)) if name == rule && *r == remaining),
        "{what}: header ratelimit: expected \"{rule}\";r={remaining};t=<n>, got:\n{}",
        describe(reply)
    );
    assert!(
        reply.header("retry-after").is_none(),
        "{what}: retry-after on an allowed response:\n{}",
        describe(reply)
    );
}

/// A 429 from `rule` with the default header set and the JSON body; returns
/// its retry-after (which must be within the window).
fn assert_limited(reply: &Reply, rule: &str, count: u64, window_s: u64, what: &str) -> u64 {
    assert_limited_within(reply, rule, count, window_s, window_s, what)
}

/// [`assert_limited`] with retry-after (and the reset `t`) allowed up to
/// `max_wait_s`: a sliding window counter full in the current window only
/// frees a permit once enough of the next window has passed (up to twice
/// the window).
fn assert_limited_within(
    reply: &Reply,
    rule: &str,
    count: u64,
    window_s: u64,
    max_wait_s: u64,
    what: &str,
) -> u64 {
    assert_status(reply, 429, what);
    let retry_after = reply.header_u64("retry-after").unwrap_or_else(|| {
        panic!(
            "{what}: expected retry-after: <whole seconds>, got:\n{}",
            describe(reply)
        )
    });
    assert!(
        (1..=max_wait_s).contains(&retry_after),
        "{what}: retry-after {retry_after} not in 1..={max_wait_s}:\n{}",
        describe(reply)
    );
    assert_header(reply, "content-type", "application/json", what);
    let body = reply
        .json()
        .unwrap_or_else(|e| panic!("{what}: {e:#}\n{}", describe(reply)));
    assert_eq!(
        body,
        json!({"error": "rate_limited", "rule": rule, "retry_after": retry_after}),
        "{what}: 429 body"
    );
    assert_no_x_ratelimit(reply, what);
    assert_header(
        reply,
        "ratelimit-policy",
        &format!("\"{rule}\";q={count};w={window_s}"),
        what,
    );
    let ratelimit = reply.header("ratelimit").unwrap_or_default();
    let parsed = parse_ratelimit(ratelimit);
    assert!(
        matches!(&parsed, Some((name, 0, t)) if name == rule && (1..=max_wait_s).contains(t)),
        "{what}: header ratelimit: expected \"{rule}\";r=0;t=<1..={max_wait_s}>, got:\n{}",
        describe(reply)
    );
    retry_after
}

/// For windows aligned to the wall clock: waits until at least `margin`
/// remains before the next multiple of `window`.
async fn clear_of_window_boundary(window: Duration, margin: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let into = Duration::from_nanos((now.as_nanos() % window.as_nanos()) as u64);
    let left = window - into;
    if left < margin {
        tokio::time::sleep(left + Duration::from_millis(50)).await;
    }
}

/// The longest a full limit may take to free one permit.
fn max_wait(algorithm: &str, window_s: u64) -> u64 {
    if algorithm == "sliding_window_counter" {
        2 * window_s
    } else {
        window_s
    }
}

// ---------------------------------------------------------------------------
// Each algorithm at its exact boundary: 5 per 60 s.

async fn check_boundary(test: &str, algorithm: &str, exact_retry_after: Option<u64>) {
    let name = format!("b-{}", algorithm.replace('_', "-"));
    let config = json!({"rules": [with(rule(&name, 5, "1m"), json!({"algorithm": algorithm}))]});
    let s = setup(test, config).await;
    clear_of_window_boundary(Duration::from_secs(60), Duration::from_secs(5)).await;
    for i in 1..=5u64 {
        let reply = s.get("/items").await;
        assert_allowed(
            &reply,
            &name,
            5,
            60,
            5 - i,
            &format!("{algorithm}: request {i} of 5"),
        );
    }
    let reply = s.get("/items").await;
    let retry_after = assert_limited_within(
        &reply,
        &name,
        5,
        60,
        max_wait(algorithm, 60),
        &format!("{algorithm}: request 6"),
    );
    if let Some(expected) = exact_retry_after {
        assert_eq!(
            retry_after, expected,
            "{algorithm}: retry-after after 5 of 5 per 60s"
        );
    }
    assert_eq!(
        s.upstream.requests(),
        5,
        "{algorithm}: requests that reached the upstream"
    );
    assert_eq!(
        s.counter(&name, "allowed", 5).await,
        5,
        "{algorithm}: stat allowed"
    );
    assert_eq!(
        s.counter(&name, "limited", 1).await,
        1,
        "{algorithm}: stat limited"
    );
    s.assert_no_errors().await;
}

#[tokio::test]
async fn boundary_token_bucket() {
    // 5 tokens, refill 1 per 12 s.
    check_boundary("boundary_token_bucket", "token_bucket", Some(12)).await;
}

#[tokio::test]
async fn boundary_leaky_bucket() {
    // Capacity 5, leaks 1 per 12 s.
    check_boundary("boundary_leaky_bucket", "leaky_bucket", Some(12)).await;
}

#[tokio::test]
async fn boundary_fixed_window() {
    check_boundary("boundary_fixed_window", "fixed_window", None).await;
}

/// The reset (`X-RateLimit-Reset`, `t`) is the time until the allowance is
/// whole again, so the last allowed answer and the 429 that follows agree
/// on it; only `Retry-After` says when to retry. A rule that did not refuse
/// the 429 gave nothing to it and reports what it really has left.
#[tokio::test]
async fn reset_and_remaining_agree_between_the_last_allowed_answer_and_the_429() {
    // "narrow": 5 per minute (one back every 12 s); "wide": 100 per hour
    // (one back every 36 s), so nothing refills during the test.
    let config = json!({
        "rules": [rule("wide", 100, "1h"), rule("narrow", 5, "1m")],
        "headers": {"sets": ["ietf", "x_ratelimit"]}
    });
    let s = setup("reset_agrees_on_the_429", config).await;
    let mut last_allowed = None;
    for i in 1..=5 {
        let reply = s.get("/").await;
        assert_status(&reply, 200, &format!("request {i}"));
        last_allowed = Some(reply);
    }
    let allowed = last_allowed.unwrap();
    let refused = s.get("/").await;
    assert_status(&refused, 429, "request 6");
    assert_header(&refused, "retry-after", "12", "request 6");
    // 5 permits of "narrow" take 60 s to come back, 5 of "wide" 180 s.
    let expected = "\"wide\";r=95;t=180, \"narrow\";r=0;t=60";
    for (reply, what) in [
        (&allowed, "request 5 (allowed)"),
        (&refused, "request 6 (429)"),
    ] {
        assert_header(reply, "x-ratelimit-reset", "60", what);
        assert_header(reply, "x-ratelimit-remaining", "0", what);
        assert_header(reply, "ratelimit", expected, what);
    }
    assert_eq!(s.upstream.requests(), 5);
    s.assert_no_errors().await;
}

#[tokio::test]
async fn boundary_sliding_window_log() {
    // The oldest of the 5 leaves the window 60 s after it came.
    check_boundary(
        "boundary_sliding_window_log",
        "sliding_window_log",
        Some(60),
    )
    .await;
}

#[tokio::test]
async fn boundary_sliding_window_counter() {
    check_boundary(
        "boundary_sliding_window_counter",
        "sliding_window_counter",
        None,
    )
    .await;
}

#[tokio::test]
async fn boundary_gcra() {
    // Emission interval 12 s, burst 5.
    check_boundary("boundary_gcra", "gcra", Some(12)).await;
}

// ---------------------------------------------------------------------------
// Each algorithm gives a permit back within the retry-after it announced
// (2 per 3 s: a permit frees every 1.5 s at the fastest, so a stalled
// machine does not turn request 3 into a 200; time itself is under test).

async fn check_recovery(test: &str, algorithm: &str) {
    let config = json!({"rules": [with(rule("r", 2, "3s"), json!({"algorithm": algorithm}))]});
    let s = setup(test, config).await;
    clear_of_window_boundary(Duration::from_secs(3), Duration::from_secs(1)).await;
    for i in 1..=2 {
        let reply = s.get("/").await;
        assert_status(&reply, 200, &format!("{algorithm}: request {i} of 2"));
    }
    let reply = s.get("/").await;
    let retry_after = assert_limited_within(
        &reply,
        "r",
        2,
        3,
        max_wait(algorithm, 3),
        &format!("{algorithm}: request 3"),
    );
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let reply = s.get("/").await;
    assert_status(
        &reply,
        200,
        &format!("{algorithm}: a request {retry_after} s (retry-after) + 100 ms after the 429"),
    );
    s.assert_no_errors().await;
}

#[tokio::test]
async fn recovery_token_bucket() {
    check_recovery("recovery_token_bucket", "token_bucket").await;
}

#[tokio::test]
async fn recovery_leaky_bucket() {
    check_recovery("recovery_leaky_bucket", "leaky_bucket").await;
}

#[tokio::test]
async fn recovery_fixed_window() {
    check_recovery("recovery_fixed_window", "fixed_window").await;
}

#[tokio::test]
async fn recovery_sliding_window_log() {
    check_recovery("recovery_sliding_window_log", "sliding_window_log").await;
}

#[tokio::test]
async fn recovery_sliding_window_counter() {
    check_recovery("recovery_sliding_window_counter", "sliding_window_counter").await;
}

#[tokio::test]
async fn recovery_gcra() {
    check_recovery("recovery_gcra", "gcra").await;
}

// ---------------------------------------------------------------------------

/// Rule `all` (10/h) matches every request, rule `tagged` (2/h) only those
/// with `x-b`. Requests denied by `tagged` must not take from `all`: after
/// 5 tagged requests (2 allowed), exactly 8 untagged ones pass.
#[tokio::test]
async fn multiple_rules_are_all_or_nothing() {
    let config = json!({"rules": [
        rule("all", 10, "1h"),
        with(rule("tagged", 2, "1h"), json!({"match": {"headers": [{"name": "x-b"}]}})),
    ]});
    let s = setup("multiple_rules_are_all_or_nothing", config).await;
    let mut statuses = Vec::new();
    for i in 1..=5 {
        let reply = s.get_with("/", &[("x-b", "1")]).await;
        if i > 2 {
            assert_status(&reply, 429, &format!("tagged request {i}"));
            assert_eq!(
                reply
                    .json()
                    .ok()
                    .and_then(|b| b["rule"].as_str().map(str::to_owned)),
                Some("tagged".to_owned()),
                "tagged request {i}: the 429 must name rule `tagged`:\n{}",
                describe(&reply)
            );
        }
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 429, 429, 429],
        "statuses of the 5 tagged requests"
    );
    let mut statuses = Vec::new();
    for _ in 1..=12 {
        statuses.push(s.get("/").await.status);
    }
    let allowed = statuses.iter().filter(|&&st| st == 200).count();
    assert_eq!(
        allowed, 8,
        "untagged requests allowed after 2 tagged were (expected 10 - 2 = 8; \
         fewer means requests denied by `tagged` consumed from `all`): {statuses:?}"
    );
    assert_eq!(
        statuses[8..],
        [429, 429, 429, 429],
        "the last 4 untagged: {statuses:?}"
    );
    assert_eq!(
        s.upstream.requests(),
        10,
        "requests that reached the upstream"
    );
    assert_eq!(
        s.counter("tagged", "limited", 3).await,
        3,
        "stat tagged.limited"
    );
    assert_eq!(s.counter("all", "limited", 4).await, 4, "stat all.limited");
    s.assert_no_errors().await;
}

/// Shadow rules never block; what they would have blocked is counted.
#[tokio::test]
async fn shadow_never_blocks_and_counts() {
    let config = json!({"rules": [with(rule("watch", 2, "1h"), json!({"action": "shadow"}))]});
    let s = setup("shadow_never_blocks_and_counts", config).await;
    for i in 1..=5 {
        let reply = s.get("/").await;
        assert_status(&reply, 200, &format!("shadow request {i}"));
    }
    assert_eq!(s.upstream.requests(), 5);
    assert_eq!(
        s.counter("watch", "shadow_limited", 3).await,
        3,
        "stat watch.shadow_limited"
    );
    assert_eq!(
        s.counter("watch", "limited", 0).await,
        0,
        "stat watch.limited"
    );
    s.assert_no_errors().await;
}

/// `delay`: 1 per 1 s with max_delay 2 s: the 2nd request waits about 1 s and
/// then passes.
#[tokio::test]
async fn delay_holds_the_request_until_a_permit_frees() {
    let config = json!({"rules": [with(rule("slow", 1, "1s"), json!({"action": "delay", "max_delay": "2s"}))]});
    let s = setup("delay_holds_the_request_until_a_permit_frees", config).await;
    let first = s.get("/").await;
    assert_status(&first, 200, "request 1");
    let second = s.get("/").await;
    assert_status(&second, 200, "request 2 (delayed)");
    assert!(
        second.elapsed >= Duration::from_millis(900),
        "request 2 should have been held about 1 s, took {:?}",
        second.elapsed
    );
    assert!(
        second.elapsed <= Duration::from_millis(2500),
        "request 2 was held longer than max_delay: {:?}",
        second.elapsed
    );
    assert_eq!(s.upstream.requests(), 2);
    assert_eq!(
        s.counter("slow", "delayed", 1).await,
        1,
        "stat slow.delayed"
    );
    s.assert_no_errors().await;
}

/// `delay` with max_delay 100 ms cannot wait 1 s: 429 at once.
#[tokio::test]
async fn delay_longer_than_max_delay_is_rejected() {
    let config = json!({"rules": [with(rule("slow", 1, "1s"), json!({"action": "delay", "max_delay": "100ms"}))]});
    let s = setup("delay_longer_than_max_delay_is_rejected", config).await;
    let first = s.get("/").await;
    assert_status(&first, 200, "request 1");
    let second = s.get("/").await;
    assert_limited(&second, "slow", 1, 1, "request 2");
    assert!(
        second.elapsed < Duration::from_millis(900),
        "the 429 should come without waiting for a permit, took {:?}",
        second.elapsed
    );
    assert_eq!(s.upstream.requests(), 1);
    s.assert_no_errors().await;
}

/// `delay` counts the requests already waiting: 1 per 1 s with max_delay
/// 2.5 s, three requests arriving together behind a spent permit would pass
/// at about 1 s, 2 s and 3 s. The third can never make it, which is known
/// when it arrives: its 429 comes at once, not after 2.5 s of waiting. (The
/// half second spares the second one a refusal at wake time when ticks run
/// late on a loaded machine.)
#[tokio::test]
async fn delay_refuses_at_once_a_request_queued_beyond_max_delay() {
    let config = json!({"rules": [with(rule("slow", 1, "1s"), json!({"action": "delay", "max_delay": "2500ms"}))]});
    let s = setup("delay_refuses_at_once_beyond_max_delay", config).await;
    assert_status(&s.get("/").await, 200, "request 1");
    let (a, b, c) = tokio::join!(s.get("/"), s.get("/"), s.get("/"));
    let mut replies = [a, b, c];
    // The refused one first, then the released ones in release order.
    replies.sort_by_key(|r| (r.status != 429, r.elapsed));
    let [refused, first, second] = replies;
    assert_limited(&refused, "slow", 1, 1, "the request queued third");
    // Order, not wall-clock windows (a loaded machine stretches every
    // wait): the 429 comes before the first release, where it used to
    // come only after max_delay, and no release comes before its permit.
    assert!(
        refused.elapsed < first.elapsed,
        "the 429 should come without waiting: it took {:?}, the first release {:?}",
        refused.elapsed,
        first.elapsed
    );
    for (reply, at) in [(&first, 1), (&second, 2)] {
        assert_status(
            reply,
            200,
            &format!("the request released after about {at} s"),
        );
        assert!(
            reply.elapsed >= Duration::from_millis(at * 1000 - 100),
            "released before its permit: expected about {at} s, took {:?}",
            reply.elapsed
        );
    }
    assert_eq!(s.upstream.requests(), 3);
    assert_eq!(
        s.counter("slow", "delayed", 2).await,
        2,
        "stat slow.delayed"
    );
    assert_eq!(
        s.counter("slow", "limited", 1).await,
        1,
        "stat slow.limited"
    );
    s.assert_no_errors().await;
}

/// `key: ["header:x-api-key"]`: each key has its own budget; requests
/// without the header are not limited by the rule.
#[tokio::test]
async fn key_from_header() {
    let config =
        json!({"rules": [with(rule("per-key", 2, "1h"), json!({"key": ["header:x-api-key"]}))]});
    let s = setup("key_from_header", config).await;
    for key in ["alpha", "beta"] {
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(s.get_with("/", &[("x-api-key", key)]).await.status);
        }
        assert_eq!(statuses, [200, 200, 429], "x-api-key: {key}");
    }
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(s.get("/").await.status);
    }
    assert_eq!(statuses, [200; 5], "requests without x-api-key");
    assert_eq!(s.upstream.requests(), 9);
    s.assert_no_errors().await;
}

/// `scope: global`: one counter for every client the rule matches.
#[tokio::test]
async fn global_scope_shares_one_counter_across_clients() {
    let config = json!({
        "rules": [with(rule("everyone", 3, "1h"), json!({"scope": "global"}))],
        "client_ip": {"trusted_hops": 1}
    });
    let s = setup("global_scope_shares_one_counter_across_clients", config).await;
    let clients = ["198.51.100.1", "198.51.100.2", "198.51.100.3"];
    for (remaining, ip) in (0..3).rev().zip(clients) {
        let reply = s.get_with("/", &[("x-forwarded-for", ip)]).await;
        assert_allowed(&reply, "everyone", 3, 3600, remaining, ip);
    }
    for ip in ["198.51.100.4", "198.51.100.1"] {
        let reply = s.get_with("/", &[("x-forwarded-for", ip)]).await;
        assert_limited(
            &reply,
            "everyone",
            3,
            3600,
            &format!("{ip} after three others"),
        );
    }
    assert_eq!(s.upstream.requests(), 3);
    s.assert_no_errors().await;
}

/// `cost: 3` against a limit of 10: three requests take 9 permits, the
/// fourth finds 1 and is refused, taking nothing.
#[tokio::test]
async fn cost_takes_several_permits_per_request() {
    let config = json!({"rules": [with(rule("heavy", 10, "1h"), json!({"cost": 3}))]});
    let s = setup("cost_takes_several_permits_per_request", config).await;
    for remaining in [7, 4, 1] {
        let reply = s.get("/").await;
        assert_allowed(&reply, "heavy", 10, 3600, remaining, "a request of cost 3");
    }
    let reply = s.get("/").await;
    assert_status(&reply, 429, "the fourth request of cost 3");
    let state = parse_ratelimit(reply.header("ratelimit").unwrap_or_default());
    assert!(
        matches!(&state, Some((name, 1, _)) if name == "heavy"),
        "the fourth request: expected \"heavy\";r=1;t=<n>, got:\n{}",
        describe(&reply)
    );
    assert_eq!(
        reply.json().unwrap()["rule"],
        "heavy",
        "{}",
        describe(&reply)
    );
    assert_eq!(s.upstream.requests(), 3);
    s.assert_no_errors().await;
}

/// `key: ["path"]`: each path has its own counter; the query string is
/// not part of the path.
#[tokio::test]
async fn path_key_gives_each_path_its_own_counter() {
    let config = json!({"rules": [with(rule("per-path", 1, "1h"), json!({"key": ["path"]}))]});
    let s = setup("path_key_gives_each_path_its_own_counter", config).await;
    let mut statuses = Vec::new();
    for path in ["/a", "/b", "/a", "/a?page=2", "/b", "/a/b"] {
        statuses.push(s.get(path).await.status);
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429, 200]);
    assert_eq!(s.upstream.requests(), 3);
    s.assert_no_errors().await;
}

/// Default `trusted_hops: 0`: the key is the peer address; a forged
/// X-Forwarded-For does not buy a new budget.
#[tokio::test]
async fn xff_is_ignored_by_default() {
    let config = json!({"rules": [rule("per-ip", 2, "1h")]});
    let s = setup("xff_is_ignored_by_default", config).await;
    let mut statuses = Vec::new();
    for xff in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        statuses.push(s.get_with("/", &[("x-forwarded-for", xff)]).await.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 429],
        "three different X-Forwarded-For from one peer"
    );
    s.assert_no_errors().await;
}

/// `trusted_hops: 1`: the last X-Forwarded-For entry is the client.
#[tokio::test]
async fn xff_with_one_trusted_hop() {
    let config = json!({
        "rules": [rule("per-ip", 2, "1h")],
        "client_ip": {"trusted_hops": 1}
    });
    let s = setup("xff_with_one_trusted_hop", config).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            s.get_with("/", &[("x-forwarded-for", "198.51.100.1")])
                .await
                .status,
        );
    }
    assert_eq!(statuses, [200, 200, 429], "X-Forwarded-For: 198.51.100.1");
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(
            s.get_with("/", &[("x-forwarded-for", "198.51.100.2")])
                .await
                .status,
        );
    }
    assert_eq!(
        statuses,
        [200, 200],
        "X-Forwarded-For: 198.51.100.2 (a new client)"
    );
    // The rightmost entry counts: 198.51.100.1 again, whatever precedes it.
    let reply = s
        .get_with("/", &[("x-forwarded-for", "203.0.113.9, 198.51.100.1")])
        .await;
    assert_status(&reply, 429, "X-Forwarded-For: 203.0.113.9, 198.51.100.1");
    // Without X-Forwarded-For: the peer (127.0.0.1), a budget of its own.
    let reply = s.get("/").await;
    assert_status(&reply, 200, "no X-Forwarded-For (the peer address)");
    // Envoy forwards X-Forwarded-For as sent (skip_xff_append: true).
    let reply = s
        .get_with("/", &[("x-forwarded-for", "198.51.100.3")])
        .await;
    assert_status(&reply, 200, "X-Forwarded-For: 198.51.100.3");
    let echo = reply.json().expect("upstream echo");
    assert_eq!(echo["headers"]["x-forwarded-for"], "198.51.100.3");
    s.assert_no_errors().await;
}

/// Responses with an excluded status give their permit back.
#[tokio::test]
async fn excluded_statuses_are_refunded() {
    let config = json!({
        "rules": [rule("r", 2, "1h")],
        "exclude_statuses": [503]
    });
    let s = setup("excluded_statuses_are_refunded", config).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(s.get("/status/503").await.status);
    }
    assert_eq!(
        statuses, [503; 6],
        "6 requests answered 503 with a limit of 2 (all refunded)"
    );
    // 500 is not excluded: it consumes.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(s.get("/status/500").await.status);
    }
    assert_eq!(statuses, [500, 500, 429], "/status/500 is not excluded");
    assert_eq!(s.upstream.requests(), 8);
    s.assert_no_errors().await;
}

/// Status classes: `"5xx"` refunds every 5xx.
#[tokio::test]
async fn excluded_status_class() {
    let config = json!({
        "rules": [rule("r", 2, "1h")],
        "exclude_statuses": ["5xx"]
    });
    let s = setup("excluded_status_class", config).await;
    let mut statuses = Vec::new();
    for path in [
        "/status/500",
        "/status/502",
        "/status/503",
        "/status/504",
        "/status/599",
    ] {
        statuses.push(s.get(path).await.status);
    }
    assert_eq!(
        statuses,
        [500, 502, 503, 504, 599],
        "5xx with exclude_statuses [\"5xx\"]"
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(s.get("/status/404").await.status);
    }
    assert_eq!(statuses, [404, 404, 429], "404 is not excluded");
    s.assert_no_errors().await;
}

const RATE_LIMIT_HEADERS: [&str; 5] = [
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
];

/// `headers.on_allowed: false`: no rate-limit headers on allowed responses,
/// all of them on 429s.
#[tokio::test]
async fn headers_not_on_allowed() {
    let config = json!({
        "rules": [rule("r", 1, "1h")],
        "headers": {"on_allowed": false}
    });
    let s = setup("headers_not_on_allowed", config).await;
    let reply = s.get("/").await;
    assert_status(&reply, 200, "request 1");
    for name in RATE_LIMIT_HEADERS.iter().chain(&["retry-after"]) {
        assert!(
            reply.header(name).is_none(),
            "{name} on an allowed response with on_allowed: false:\n{}",
            describe(&reply)
        );
    }
    let reply = s.get("/").await;
    assert_limited(&reply, "r", 1, 3600, "request 2");
    s.assert_no_errors().await;
}

/// `headers.sets: []`: only retry-after, on 429s.
#[tokio::test]
async fn header_sets_empty() {
    let config = json!({
        "rules": [rule("r", 1, "1h")],
        "headers": {"sets": []}
    });
    let s = setup("header_sets_empty", config).await;
    let reply = s.get("/").await;
    assert_status(&reply, 200, "request 1");
    let reply2 = s.get("/").await;
    assert_status(&reply2, 429, "request 2");
    for (reply, what) in [(&reply, "the 200"), (&reply2, "the 429")] {
        for name in RATE_LIMIT_HEADERS {
            assert!(
                reply.header(name).is_none(),
                "{name} on {what} with sets: []:\n{}",
                describe(reply)
            );
        }
    }
    assert!(
        reply2.header_u64("retry-after").is_some(),
        "retry-after is always sent on 429:\n{}",
        describe(&reply2)
    );
    s.assert_no_errors().await;
}

/// `headers.sets` chooses the header families: `["x_ratelimit"]` only the
/// X-RateLimit-* headers, `["ietf"]` only RateLimit-Policy and RateLimit.
#[tokio::test]
async fn header_sets_one_family_each() {
    for (set, present, absent) in [
        (
            "x_ratelimit",
            &[
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ][..],
            &["ratelimit", "ratelimit-policy"][..],
        ),
        (
            "ietf",
            &["ratelimit", "ratelimit-policy"][..],
            &[
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ][..],
        ),
    ] {
        let config = json!({
            "rules": [rule("r", 1, "1h")],
            "headers": {"sets": [set]}
        });
        let s = setup(&format!("header_sets_one_family_each_{set}"), config).await;
        let allowed = s.get("/").await;
        assert_status(&allowed, 200, &format!("sets [{set}]: request 1"));
        let limited = s.get("/").await;
        assert_status(&limited, 429, &format!("sets [{set}]: request 2"));
        for (reply, what) in [(&allowed, "200"), (&limited, "429")] {
            for name in present {
                assert!(
                    reply.header(name).is_some(),
                    "sets [{set}]: {name} missing on the {what}:\n{}",
                    describe(reply)
                );
            }
            for name in absent {
                assert!(
                    reply.header(name).is_none(),
                    "sets [{set}]: {name} present on the {what}:\n{}",
                    describe(reply)
                );
            }
        }
        s.assert_no_errors().await;
    }
}

/// Two workers share one budget: 200 requests on 32 concurrent connections
/// against 50 per hour: exactly 50 pass.
#[tokio::test]
async fn two_workers_share_the_limit_exactly() {
    let config = json!({"rules": [rule("shared", 50, "1h")]});
    let s = setup_workers("two_workers_share_the_limit_exactly", config, 2).await;
    let permits = Arc::new(Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = s.client;
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            client.get("/").await
        });
    }
    let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
    while let Some(result) = tasks.join_next().await {
        let reply = result.expect("join").expect("request");
        match reply.status {
            200 => ok += 1,
            429 => limited += 1,
            _ => other.push(describe(&reply)),
        }
    }
    assert!(other.is_empty(), "unexpected responses: {other:#?}");
    assert_eq!(
        (ok, limited),
        (50, 150),
        "(allowed, limited) of 200 with a limit of 50"
    );
    assert_eq!(
        s.upstream.requests(),
        50,
        "requests that reached the upstream"
    );
    let per_worker = s.envoy.worker_connections().await.expect("stats");
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "connections per worker {per_worker:?}: the test needs both workers"
    );
    assert_eq!(
        s.counter("shared", "allowed", 50).await,
        50,
        "stat shared.allowed"
    );
    assert_eq!(
        s.counter("shared", "limited", 150).await,
        150,
        "stat shared.limited"
    );
    s.assert_no_errors().await;
}

/// The filter's stats in `/stats/prometheus`, labelled by the template's
/// stats_tags.
#[tokio::test]
async fn stats_in_prometheus() {
    let config = json!({"rules": [rule("stats-rule", 2, "1h")]});
    let s = setup("stats_in_prometheus", config).await;
    for _ in 0..3 {
        s.get("/").await;
    }
    // Once the batched increments reached Envoy (one flush carries both).
    assert_eq!(
        s.counter("stats-rule", "limited", 1).await,
        1,
        "/stats JSON"
    );
    assert_eq!(
        s.counter("stats-rule", "allowed", 2).await,
        2,
        "/stats JSON"
    );
    let text = s.envoy.prometheus().await.expect("/stats/prometheus");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("sluice")).collect();
    for (outcome, expected) in [("allowed", 2.0), ("limited", 1.0)] {
        let got = prometheus_value(
            &text,
            "sluice_http",
            &[("rule", "stats-rule"), ("outcome", outcome)],
        );
        assert_eq!(
            got,
            Some(expected),
            "sluice_http{{rule=\"stats-rule\",outcome=\"{outcome}\"}}; sluice lines:\n{}",
            lines.join("\n")
        );
    }
    assert!(
        text.contains("# TYPE sluice_http counter"),
        "no `# TYPE sluice_http counter`; sluice lines:\n{}",
        lines.join("\n")
    );
    s.assert_no_errors().await;
}

/// The example `envoy/envoy.yaml` (what users run) passes
/// `envoy --mode validate`, which loads and configures the filter.
#[tokio::test]
async fn example_config_validates() {
    sluice_e2e::wasm_path().unwrap_or_else(|e| panic!("{e:#}"));
    let path = sluice_e2e::demo::example_path();
    let (ok, output) = sluice_e2e::envoy::validate(&path)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        ok,
        "envoy --mode validate -c {} failed:\n{output}",
        path.display()
    );
}

/// The demo rules behave as the demo and the example describe them.
#[tokio::test]
async fn demo_rules() {
    let config = sluice_e2e::demo::plugin_config().expect("demo rules are JSON");
    let s = setup("demo_rules", config).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = s
            .client
            .post("/login", &[("content-length", "0")])
            .await
            .expect("POST /login");
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429], "POST /login: 3 per minute");
    let reply = s.get("/api/items").await;
    assert_status(&reply, 200, "GET /api/items (its own rule)");
    let reply = s.get("/login").await;
    assert_status(&reply, 200, "GET /login (the login rule is POST only)");
    s.assert_no_errors().await;
}

// ---------------------------------------------------------------------------
// Invalid configurations are refused at start-up with the field's path.

async fn check_refused(test: &str, config: &str, expected: &[&str]) {
    let failure = Envoy::builder(test)
        .sluice_raw(config)
        .start_expect_failure()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        !failure.status.success(),
        "Envoy exited with {} for an invalid config",
        failure.status
    );
    for text in expected {
        assert!(
            failure.log.contains(text),
            "Envoy's log does not contain {text:?} for config {config}; log (filtered):\n{}",
            failure
                .log
                .lines()
                .filter(|l| l.contains("wasm") || l.contains("error") || l.contains("critical"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test]
async fn invalid_config_per_zero() {
    check_refused(
        "invalid_config_per_zero",
        r#"{"rules": [{"name": "r", "limit": {"count": 5, "per": "0ms"}}]}"#,
        &["rules[0].limit.per"],
    )
    .await;
}

#[tokio::test]
async fn invalid_config_unknown_field() {
    check_refused(
        "invalid_config_unknown_field",
        r#"{"rules": [{"name": "r", "limit": {"count": 5, "per": "1s"}, "lmit": 3}]}"#,
        &["rules[0]", "lmit"],
    )
    .await;
}

#[tokio::test]
async fn invalid_config_delay_without_max_delay() {
    check_refused(
        "invalid_config_delay_without_max_delay",
        r#"{"rules": [{"name": "ok", "limit": {"count": 1, "per": "1s"}},
                      {"name": "r", "limit": {"count": 1, "per": "1s"}, "action": "delay"}]}"#,
        &["rules[1].max_delay"],
    )
    .await;
}
