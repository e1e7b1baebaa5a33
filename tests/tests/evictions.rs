//! End-to-end tests of the filter's bounded key tables through a real
//! Envoy: a flood of made-up clients never gives a limited client a fresh
//! allowance nor a client its open connections back, and configuring costs no time per possible key (or is
//! refused, with a clear error, beyond the memory budget).
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`).

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::client::Client;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::ws_client::{connect, Upgrade, Ws};
use sluice_e2e::ws_upstream::WsUpstream;
use tokio::task::JoinSet;

/// Distinct made-up clients in the flood: far more than `max_keys`.
const FLOOD: u32 = 1_000;
/// Requests in flight at once during the flood.
const PARALLEL: u32 = 32;

async fn status_as(client: &Client, ip: &str) -> u16 {
    client
        .get_with("/", &[("x-forwarded-for", ip)])
        .await
        .unwrap_or_else(|e| panic!("GET / as {ip}: {e:#}"))
        .status
}

fn rules(n: usize, count: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"name": format!("r{i}"), "limit": {"count": count, "per": "1h"}}))
        .collect()
}

/// A client limited to 5 per hour, in a table of 64 keys, sees 1,000 other
/// clients arrive (each twice) across two workers: it stays refused.
#[tokio::test]
async fn a_flood_of_new_clients_does_not_reset_a_limited_client() {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let config = json!({
        "rules": [{"name": "per-ip", "limit": {"count": 5, "per": "1h"}, "algorithm": "fixed_window"}],
        "client_ip": {"trusted_hops": 1},
        "max_keys": 64
    });
    let envoy = Envoy::builder("a_flood_of_new_clients_does_not_reset_a_limited_client")
        .upstream(upstream.port())
        .concurrency(2)
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let victim = "192.0.2.1";
    let client = envoy.client();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(status_as(&client, victim).await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429],
        "the victim's budget"
    );

    let mut flood = JoinSet::new();
    for i in 0..FLOOD {
        if flood.len() >= PARALLEL as usize {
            flood
                .join_next()
                .await
                .expect("a flood task")
                .expect("join");
        }
        let client = envoy.client();
        flood.spawn(async move {
            let ip = format!("10.1.{}.{}", i / 256, i % 256);
            status_as(&client, &ip).await;
            status_as(&client, &ip).await;
        });
    }
    while let Some(done) = flood.join_next().await {
        done.expect("join");
    }

    let mut after = Vec::new();
    for _ in 0..10 {
        after.push(status_as(&client, victim).await);
    }
    assert_eq!(after, [429; 10], "the limited client after the flood");
    let evictions = envoy
        .stat("wasmcustom.sluice_http.live_evictions")
        .await
        .expect("reading Envoy's stats")
        .unwrap_or(0);
    assert!(
        evictions > 0,
        "the flood filled the table and evicted its own keys"
    );
    let errors = envoy.filter_errors().await.expect("reading Envoy's stats");
    assert_eq!(errors, 0);
}

/// A WebSocket upgrade as client `ip`: the open connection, or `None`
/// when refused (with a 429).
async fn upgrade_as(envoy: &Envoy, ip: &str) -> Option<Box<Ws>> {
    match connect(envoy.addr(), "/ws", &[("x-forwarded-for", ip)]).await {
        Ok(Upgrade::Open(ws)) => Some(ws),
        Ok(Upgrade::Refused(response)) => {
            assert_eq!(response.status().as_u16(), 429, "upgrade as {ip}");
            None
        }
        Err(e) => panic!("upgrade as {ip}: {e:#}"),
    }
}

/// A client holding its 2 allowed connections, in a table of 4 keys, sees
/// 8 other clients connect and stay connected: it still may not open a
/// third (its state, holding permits, is never evicted).
#[tokio::test]
async fn new_clients_do_not_give_a_client_its_open_connections_back() {
    let upstream = WsUpstream::start()
        .await
        .expect("starting the WebSocket upstream");
    let config = json!({
        "rules": [{"name": "open", "match": {"websocket": true}, "counts": "in_flight", "limit": {"count": 2}}],
        "client_ip": {"trusted_hops": 1},
        "max_keys": 4
    });
    let test = "new_clients_do_not_give_a_client_its_open_connections_back";
    let envoy = with_upstreams(Envoy::builder(test), None, Some(upstream.port()))
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let victim = "192.0.2.1";
    let mut held = Vec::new();
    for n in 1..=2 {
        let ws = upgrade_as(&envoy, victim).await;
        held.push(ws.unwrap_or_else(|| panic!("the victim's connection {n} was refused")));
    }
    for i in 0..8 {
        // Some are refused once the table is full: they share the overflow.
        held.extend(upgrade_as(&envoy, &format!("10.1.0.{i}")).await);
    }
    assert!(
        upgrade_as(&envoy, victim).await.is_none(),
        "the victim opened a third connection"
    );
    let evictions = envoy
        .stat("wasmcustom.sluice_http.live_evictions")
        .await
        .expect("reading Envoy's stats")
        .unwrap_or(0);
    assert_eq!(evictions, 0, "no key holding connections was evicted");
}

/// 1,000 per-key rules with 2,000 keys each (2 million possible keys):
/// Envoy is ready in seconds because slots are created as keys arrive.
#[tokio::test]
async fn many_rules_with_a_large_max_keys_start_fast() {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let config = json!({"rules": rules(1_000, 1), "max_keys": 2_000});
    let started = Instant::now();
    let envoy = Envoy::builder("many_rules_with_a_large_max_keys_start_fast")
        .upstream(upstream.port())
        .sluice(&config)
        .start_timeout(Duration::from_secs(30))
        .start()
        .await
        .unwrap_or_else(|e| panic!("Envoy did not become ready: {e:#}"));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "ready after {took:?}");
    let client = envoy.client();
    assert_eq!(status_as(&client, "192.0.2.1").await, 200);
    assert_eq!(status_as(&client, "192.0.2.1").await, 429);
}

/// 10,000 per-key rules at the default `max_keys` (a billion possible
/// keys) are refused at startup, naming the field and the bound that fits.
#[tokio::test]
async fn a_configuration_over_the_key_memory_budget_is_refused() {
    let config = json!({"rules": rules(10_000, 5)});
    let failure = Envoy::builder("a_configuration_over_the_key_memory_budget_is_refused")
        .sluice(&config)
        .start_timeout(Duration::from_secs(60))
        .start_expect_failure()
        .await
        .expect("running Envoy");
    assert!(!failure.status.success(), "Envoy must exit non-zero");
    let expected = "invalid sluice configuration: max_keys: 10000 per-key rules with 100000 keys \
                    each could take";
    assert!(
        failure.log.contains(expected) && failure.log.contains("set max_keys to at most 216,"),
        "log:\n{}",
        failure.log
    );
}
