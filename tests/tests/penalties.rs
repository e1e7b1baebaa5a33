//! End-to-end tests of blocks (`block_duration`) and the `degrade` action
//! through a real Envoy, against README.md's Rules table.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Sleeps appear
//! only where time itself is under test (a window refilling under a block).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::wait;

/// The upstream, Envoy with the filter on two workers, and a client.
struct Setup {
    _upstream: Upstream,
    envoy: Envoy,
    client: Client,
}

async fn setup(test: &str, config: Value) -> Setup {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let envoy = Envoy::builder(test)
        .upstream(upstream.port())
        .concurrency(2)
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
    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client
            .get_with(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e:#}"))
    }
}

#[tokio::test]
async fn a_key_over_its_limit_stays_blocked_until_the_block_ends() {
    // Two a second, then blocked for 3 s.
    let s = setup(
        "a_key_over_its_limit_stays_blocked_until_the_block_ends",
        json!({"rules": [{"name": "login", "limit": {"count": 2, "per": "1s"},
                          "block_duration": "3s"}]}),
    )
    .await;
    let mut refused_at = None;
    // A slow machine may let a token refill between requests: keep asking.
    for _ in 0..10 {
        let sent = Instant::now();
        let r = s.get_with("/login", &[]).await;
        if r.status == 429 {
            refused_at = Some((sent, r));
            break;
        }
        assert_eq!(r.status, 200, "{}", r.headers_text());
    }
    let (refused_at, r) = refused_at.expect("requests faster than two a second are refused");
    assert_eq!(r.header_u64("retry-after"), Some(3), "{}", r.headers_text());
    let ratelimit = r.header("ratelimit").unwrap_or_default();
    assert_eq!(ratelimit, "\"login\";r=0;t=3", "{}", r.headers_text());

    // Time itself is under test: the bucket refills within a second.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let r = s.get_with("/login", &[]).await;
    assert_eq!(r.status, 429, "the budget came back, the block must hold");
    let retry = r.header_u64("retry-after").unwrap_or(0);
    assert!((1..=2).contains(&retry), "{}", r.headers_text());

    // Asking again and again does not extend the block: it ends 3 s after
    // the refusal that started it.
    let allowed_at = wait::until("the block to end", Duration::from_secs(10), || async {
        let r = s.get_with("/login", &[]).await;
        match r.status {
            200 => Ok(Instant::now()),
            status => Err(format!(
                "{status} retry-after {:?}",
                r.header("retry-after")
            )),
        }
    })
    .await
    .unwrap();
    assert!(
        allowed_at.duration_since(refused_at) >= Duration::from_secs(3),
        "allowed before the block ended"
    );
    let limited = s
        .envoy
        .stat_when(
            "wasmcustom.sluice_http.rule.login.outcome.limited",
            ">= 2",
            |n| n >= 2,
        )
        .await
        .unwrap();
    assert!(limited >= 2, "limited: {limited}");
}

#[tokio::test]
async fn degraded_requests_reach_the_upstream_marked_and_spoofs_are_stripped() {
    let s = setup(
        "degraded_requests_reach_the_upstream_marked_and_spoofs_are_stripped",
        json!({"rules": [
                {"name": "cheap", "limit": {"count": 2, "per": "1h"}, "action": "degrade"},
                {"name": "hard", "limit": {"count": 4, "per": "1h"}}
            ],
            "headers": {"on_allowed": false}}),
    )
    .await;
    // Within the limit: not marked, even when the client says so, in
    // either spelling a CGI-style upstream reads as the header (the
    // template drops names with `_`).
    for spoof in ["cheap", ""] {
        let spoofs = [("x-sluice-limited", spoof), ("x_sluice_limited", spoof)];
        let r = s.get_with("/a", &spoofs).await;
        assert_eq!(r.status, 200);
        let echo = r.json().unwrap();
        assert_eq!(echo["headers"].get("x-sluice-limited"), None, "{echo}");
        assert_eq!(echo["headers"].get("x_sluice_limited"), None, "{echo}");
        assert_eq!(r.header("ratelimit"), None, "on_allowed is false");
    }
    // Over it: through, marked for the upstream (whatever the client sent),
    // and told its limits, with no Retry-After.
    for spoof in [None, Some("nope")] {
        let headers: Vec<(&str, &str)> = spoof.iter().map(|v| ("x-sluice-limited", *v)).collect();
        let r = s.get_with("/a", &headers).await;
        assert_eq!(r.status, 200, "{}", r.headers_text());
        let echo = r.json().unwrap();
        assert_eq!(echo["headers"]["x-sluice-limited"], "cheap", "{echo}");
        let state = r.header("ratelimit").unwrap_or_default();
        assert!(state.starts_with("\"cheap\";r=0;"), "{}", r.headers_text());
        assert_eq!(r.header("retry-after"), None, "{}", r.headers_text());
    }
    // The reject rule wins once over.
    let r = s.get_with("/a", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        s.envoy
            .sluice_counter_settled("cheap", "degraded", 2)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        s.envoy
            .sluice_counter_settled("hard", "limited", 1)
            .await
            .unwrap(),
        1
    );
}
