//! Synced rules in exact mode through real Envoys: two Envoys (two
//! workers each) share one budget kept by `sluice serve` (memory backend),
//! each request asking it once. Failure modes are checked by killing the
//! quota server mid-traffic, accuracy by restarting it.
//!
//! Needs Envoy (`make setup`), the filter (`make wasm`) and the `sluice`
//! binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::{free_port, sluice_binary};
use sluice_quota_server::launcher::{Launcher, QuotaServer};
use tokio::task::JoinSet;

/// What the quota server admits per key of rule `fleet`, for the fleet.
const FLEET_LIMIT: usize = 20;
/// The timeout of rules `open` and `closed`.
const TIMEOUT: Duration = Duration::from_millis(200);
/// What a request may take beyond its rule's timeout (a loaded machine).
const MARGIN: Duration = Duration::from_millis(800);

/// `sluice serve` with domain `edge` on 127.0.0.1:`port`. Per hour, so no
/// refill during a test.
fn quota_server(port: u16) -> QuotaServer {
    let config = format!(
        r#"listen: {{grpc: "127.0.0.1:{port}"}}
domains:
  - name: edge
    rules:
      - {{name: fleet, limit: {{count: {FLEET_LIMIT}, per: 1h}}}}
      - {{name: open, limit: {{count: 1000000, per: 1h}}}}
      - {{name: closed, limit: {{count: 1000000, per: 1h}}}}
"#
    );
    Launcher::new(sluice_binary().unwrap_or_else(|e| panic!("{e}")))
        .start_text(&config)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The filter's rules: `fleet` per `x-client` header (fails closed, so a
/// failed call can only lower the count), `open` and `closed` for their
/// failure modes.
fn filter_config() -> Value {
    let sync = |timeout: &str, failure: &str| json!({"mode": "exact", "domain": "edge", "timeout": timeout, "failure_mode": failure});
    json!({"rules": [
        {"name": "fleet", "match": {"path": {"prefix": "/fleet"}}, "key": ["header:x-client"],
         "sync": sync("1s", "closed")},
        {"name": "open", "match": {"path": {"prefix": "/open"}}, "sync": sync("200ms", "open")},
        {"name": "closed", "match": {"path": {"prefix": "/closed"}}, "sync": sync("200ms", "closed")},
    ]})
}

/// Two Envoys with two workers each, calling the quota server on `port`.
async fn fleet(test: &str, upstream: &Upstream, port: u16) -> [Envoy; 2] {
    let start = |instance: &'static str| {
        Envoy::builder(test)
            .instance(instance)
            .upstream(upstream.port())
            .concurrency(2)
            .quota_server(port)
            .sluice(&filter_config())
            .start()
    };
    let (a, b) = tokio::join!(start("a"), start("b"));
    [a, b].map(|e| e.unwrap_or_else(|e| panic!("starting Envoy: {e:#}")))
}

async fn get(client: Client, path: &str, headers: &[(&str, &str)]) -> Reply {
    client
        .get_with(path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// Sends `count` requests for `path` with `x-client: key`, alternating
/// between `clients`, eight at a time; returns their statuses.
async fn burst(
    clients: [Client; 2],
    path: &'static str,
    key: &'static str,
    count: usize,
) -> Vec<u16> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let next = Arc::clone(&next);
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return statuses;
                }
                let reply = get(clients[i % 2], path, &[("x-client", key)]).await;
                statuses.push(reply.status);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(statuses) = tasks.join_next().await {
        all.extend(statuses.unwrap());
    }
    all
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// The sum over both Envoys of a synced rule's sync outcome counter.
async fn sync_outcome(envoys: &[Envoy; 2], rule: &str, outcome: &str) -> u64 {
    let name = format!("wasmcustom.sluice_sync.rule.{rule}.outcome.{outcome}");
    let mut total = 0;
    for envoy in envoys {
        total += envoy.stat(&name).await.unwrap().unwrap_or(0);
    }
    total
}

/// Median of the sequential latencies of `n` GETs of `path`.
async fn median_latency(client: Client, path: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let reply = get(client, path, &[]).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        times.push(reply.elapsed);
    }
    times.sort();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_envoys_admit_exactly_the_fleet_limit_per_key() {
    let server = quota_server(free_port().unwrap());
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet("two_envoys_admit_exactly", &upstream, server.grpc.port()).await;
    let clients = [envoys[0].client(), envoys[1].client()];

    let statuses = burst(clients, "/fleet", "alice", 3 * FLEET_LIMIT).await;
    assert_eq!(count(&statuses, 200), FLEET_LIMIT, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 2 * FLEET_LIMIT, "{statuses:?}");
    // Another key has its own budget, whatever alice used.
    let statuses = burst(clients, "/fleet", "bob", FLEET_LIMIT + 5).await;
    assert_eq!(count(&statuses, 200), FLEET_LIMIT, "{statuses:?}");
    assert_eq!(
        sync_outcome(&envoys, "fleet", "ok").await,
        (4 * FLEET_LIMIT + 5) as u64,
        "every request asked the quota server once"
    );
    // Both Envoys took part in admitting.
    for envoy in &envoys {
        let allowed = envoy.sluice_counter("fleet", "allowed").await.unwrap();
        assert!(allowed > 0, "an Envoy admitted nothing");
    }
    assert_eq!(upstream.requests(), (2 * FLEET_LIMIT) as u64);

    // What exact mode costs: a request asking the quota server against one
    // that no rule matches (printed; loopback, debug build of the server).
    let synced = median_latency(clients[0], "/open", 50).await;
    let plain = median_latency(clients[0], "/none", 50).await;
    eprintln!("exact mode: median {synced:?} per request vs {plain:?} without a rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_modes_hold_while_the_quota_server_is_down_and_accuracy_returns() {
    let port = free_port().unwrap();
    let mut server = quota_server(port);
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet("failure_modes_hold", &upstream, port).await;
    let clients = [envoys[0].client(), envoys[1].client()];
    for client in clients {
        assert_eq!(get(client, "/closed", &[]).await.status, 200);
    }

    // Traffic on both rules through both Envoys while the server is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(&'static str, Reply)>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for t in 0..4 {
        let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
        let path = if t % 2 == 0 { "/open" } else { "/closed" };
        tasks.spawn(async move {
            for i in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let reply = get(clients[(t + i) % 2], path, &[]).await;
                seen.lock().unwrap().push((path, reply));
            }
        });
    }
    let wait_for = |n: usize| {
        let seen = Arc::clone(&seen);
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "traffic stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(40).await;
    server.kill();
    let killed_at = seen.lock().unwrap().len();
    wait_for(killed_at + 80).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    for (path, reply) in &seen {
        assert!(
            matches!(reply.status, 200 | 429),
            "{path}: status {} (never a 503 from a dead VM): {}",
            reply.status,
            reply.text()
        );
        assert!(
            reply.elapsed < TIMEOUT + MARGIN,
            "{path} waited {:?}",
            reply.elapsed
        );
        if *path == "/open" {
            assert_eq!(reply.status, 200, "open never refuses: {}", reply.text());
        }
    }
    let refused_closed = seen
        .iter()
        .filter(|(p, r)| *p == "/closed" && r.status == 429)
        .count();
    assert!(refused_closed > 0, "no /closed request was refused");

    // Once it is down, each rule does what its failure mode says.
    for client in clients {
        let open = get(client, "/open", &[]).await;
        assert_eq!(open.status, 200);
        let closed = get(client, "/closed", &[]).await;
        assert_eq!(closed.status, 429, "{}", closed.text());
        assert_eq!(closed.json().unwrap()["error"], "rate_limit_unavailable");
        assert_eq!(closed.json().unwrap()["rule"], "closed");
        assert!(closed.elapsed < TIMEOUT + MARGIN);
    }
    assert!(sync_outcome(&envoys, "open", "failed_open").await > 0);
    assert!(sync_outcome(&envoys, "closed", "failed_closed").await > 0);

    // Back on the same port: the fleet is exact again.
    let _server = quota_server(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    for client in clients {
        while get(client, "/closed", &[]).await.status != 200 {
            assert!(
                Instant::now() < deadline,
                "the quota server is not used again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let statuses = burst(clients, "/fleet", "carol", 2 * FLEET_LIMIT).await;
    assert_eq!(count(&statuses, 200), FLEET_LIMIT, "{statuses:?}");
}
