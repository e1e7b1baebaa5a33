//! Glob rules cost little whatever the path: `/g/**/a/**/a/**/edit` against
//! a 3.2 KB path of `/a` segments took a backtracking matcher seconds of an
//! Envoy worker per request. Through a real Envoy, twenty such requests and
//! the ordinary ones after them must all get the right answer well within
//! one deadline.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::json;
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;

const RULE: &str = "edits";
const GLOB: &str = "/g/**/a/**/a/**/edit";
const LIMIT: u64 = 2;
const ADVERSARIAL_REQUESTS: u64 = 20;
/// Before the fix, each adversarial request alone took longer than 1/20 of this.
const DEADLINE: Duration = Duration::from_secs(30);

async fn get(client: &Client, path: &str) -> Reply {
    client
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("GET {}…: {e:#}", &path[..path.len().min(40)]))
}

/// The rule did not apply: 200 and none of its headers.
fn assert_unmatched(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: status");
    assert_eq!(reply.header("ratelimit"), None, "{what}: the rule applied");
}

/// The rule applied and allowed the request, leaving `remaining`.
fn assert_allowed(reply: &Reply, remaining: u64, what: &str) {
    assert_eq!(reply.status, 200, "{what}: status");
    assert_eq!(reply.remaining(), Some(remaining), "{what}: ratelimit r=");
}

#[tokio::test]
async fn adversarial_glob_paths_are_answered_promptly() {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let config = json!({"rules": [{
        "name": RULE,
        "match": {"path": {"glob": GLOB}},
        "limit": {"count": LIMIT, "per": "1h"}
    }]});
    let envoy = Envoy::builder("adversarial_glob_paths_are_answered_promptly")
        .upstream(upstream.port())
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let client = envoy.client();
    // 3202 bytes: matches up to the last segment, which is not `edit`.
    let adversarial = format!("/g{}", "/a".repeat(1600));

    tokio::time::timeout(DEADLINE, async {
        for i in 0..ADVERSARIAL_REQUESTS {
            let reply = get(&client, &adversarial).await;
            assert_unmatched(&reply, &format!("adversarial request {i}"));
            let forwarded = reply.json().unwrap()["path"].clone();
            assert_eq!(forwarded, adversarial.as_str(), "path the upstream saw");
        }
        let reply = get(&client, &format!("{adversarial}/edit")).await;
        assert_allowed(&reply, 1, "the adversarial path ending in /edit");
        let reply = get(&client, "/g/x/a/y/a/z/edit?next=/a/a").await;
        assert_allowed(&reply, 0, "an ordinary edit");
        let reply = get(&client, "/g/x/a/y/a/z/edit").await;
        assert_eq!(reply.status, 429, "an edit over the limit");
        let reply = get(&client, "/g/a/a/edit").await;
        assert_unmatched(&reply, "a path where /**/ would need empty segments");
    })
    .await
    .unwrap_or_else(|_| panic!("the requests took longer than {DEADLINE:?} in all"));

    let counter = |outcome, expected| envoy.sluice_counter_settled(RULE, outcome, expected);
    assert_eq!(counter("allowed", LIMIT).await.unwrap(), LIMIT);
    assert_eq!(counter("limited", 1).await.unwrap(), 1);
    let errors = envoy.filter_errors().await.expect("reading Envoy's stats");
    assert_eq!(errors, 0, "sluice_http.errors");
    // Everything but the 429 reached the upstream.
    assert_eq!(upstream.requests(), ADVERSARIAL_REQUESTS + 3);
}
