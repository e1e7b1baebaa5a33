//! Synced rules in leased mode through real Envoys: three Envoys (two
//! workers each, each with the lease sync service) share budgets kept by
//! `sluice serve` (memory backend). Checks that fixed windows stay within
//! the limit and near it, that a hot key is refilled on demand, and that
//! requests keep flowing per the failure mode while the quota server is
//! down. The fleet's share per key, and Redis or a slow quota server
//! failing, run in both sync modes in `distributed.rs`.
//!
//! Needs Envoy (`make setup`), the filter (`make wasm`) and the `sluice`
//! binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::{free_port, sluice_binary};
use sluice_quota_server::launcher::{Launcher, QuotaServer};
use tokio::task::JoinSet;

/// Envoys sharing each budget.
const ENVOYS: usize = 3;
/// What the quota server admits per key of rule `fleet`, per hour (no
/// refill during a test).
const FLEET_LIMIT: usize = 300;
/// `fleet`'s lease bound.
const FLEET_LEASE: usize = 20;
/// What rule `hot` admits per hour: one Envoy alone should use it.
const HOT_LIMIT: usize = 400;
/// `hot`'s lease bound.
const HOT_LEASE: usize = 50;
/// What rule `window` admits per second (fixed windows).
const WINDOW_LIMIT: usize = 150;
/// `window`'s lease bound.
const WINDOW_LEASE: usize = 10;
/// The timeout of rules `open` and `closed`.
const TIMEOUT: Duration = Duration::from_millis(200);
/// What a request may take beyond its rule's timeout (a loaded machine).
const MARGIN: Duration = Duration::from_millis(800);
/// The longest lease the quota server grants.
const LEASE_TIME: Duration = Duration::from_secs(1);

/// `sluice serve` with domain `edge` on 127.0.0.1:`port`.
fn quota_server(port: u16) -> QuotaServer {
    let config = format!(
        r#"listen: {{grpc: "127.0.0.1:{port}"}}
domains:
  - name: edge
    rules:
      - {{name: fleet, limit: {{count: {FLEET_LIMIT}, per: 1h}}}}
      - {{name: hot, limit: {{count: {HOT_LIMIT}, per: 1h}}}}
      - {{name: window, algorithm: fixed_window, limit: {{count: {WINDOW_LIMIT}, per: 1s}}}}
      - {{name: open, limit: {{count: 1000000, per: 1h}}}}
      - {{name: closed, limit: {{count: 1000000, per: 1h}}}}
"#
    );
    Launcher::new(sluice_binary().unwrap_or_else(|e| panic!("{e}")))
        .start_text(&config)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The filter's rules, all leased in domain `edge`: `fleet` and `hot` per
/// `x-client` (failing closed, so a failure can only lower the counts),
/// `open` and `closed` for the failure modes.
fn filter_config() -> Value {
    let leased = |extra: Value| {
        let mut sync = json!({"mode": "leased", "domain": "edge", "replicas": ENVOYS,
                              "interval": "100ms", "timeout": "200ms"});
        for (k, v) in extra.as_object().unwrap() {
            sync[k] = v.clone();
        }
        sync
    };
    json!({"rules": [
        {"name": "fleet", "match": {"path": {"prefix": "/fleet"}}, "key": ["header:x-client"],
         "sync": leased(json!({"max_lease": FLEET_LEASE, "failure_mode": "closed"}))},
        {"name": "hot", "match": {"path": {"prefix": "/hot"}}, "key": ["header:x-client"],
         "sync": leased(json!({"max_lease": HOT_LEASE, "failure_mode": "closed"}))},
        {"name": "window", "match": {"path": {"prefix": "/window"}}, "key": ["header:x-client"],
         "sync": leased(json!({"max_lease": WINDOW_LEASE, "failure_mode": "closed"}))},
        {"name": "open", "match": {"path": {"prefix": "/open"}},
         "sync": leased(json!({"failure_mode": "open"}))},
        {"name": "closed", "match": {"path": {"prefix": "/closed"}},
         "sync": leased(json!({"failure_mode": "closed"}))},
    ]})
}

/// Three Envoys with two workers each and the sync service, calling the
/// quota server on `port`.
async fn fleet(test: &str, upstream: &Upstream, port: u16) -> Vec<Envoy> {
    let start = |instance: &'static str| {
        Envoy::builder(test)
            .instance(instance)
            .upstream(upstream.port())
            .concurrency(2)
            .quota_server(port)
            .sluice(&filter_config())
            .sync_service(true)
            .start()
    };
    let (a, b, c) = tokio::join!(start("a"), start("b"), start("c"));
    [a, b, c]
        .into_iter()
        .map(|e| e.unwrap_or_else(|e| panic!("starting Envoy: {e:#}")))
        .collect()
}

async fn get(client: Client, path: &str, headers: &[(&str, &str)]) -> Reply {
    client
        .get_with(path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// Sends `count` requests for `path` with `x-client: key`, going round
/// `clients`, eight at a time; returns their statuses.
async fn burst(
    clients: &[Client],
    path: &'static str,
    key: &'static str,
    count: usize,
) -> Vec<u16> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let next = Arc::clone(&next);
        let clients = clients.to_vec();
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return statuses;
                }
                let reply = get(clients[i % clients.len()], path, &[("x-client", key)]).await;
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

/// The sum over `envoys` of a synced rule's Check outcome counter.
async fn checks(envoys: &[Envoy], rule: &str) -> u64 {
    let name = format!("wasmcustom.sluice_sync.rule.{rule}.outcome.ok");
    let mut total = 0;
    for envoy in envoys {
        total += envoy.stat(&name).await.unwrap().unwrap_or(0);
    }
    total
}

/// A reply to a path, and when it arrived.
type Seen = (&'static str, Instant, Reply);

/// The documented floor under sustained demand: `limit − 2 × N × L`.
fn floor(limit: usize, lease: usize) -> usize {
    limit.saturating_sub(2 * ENVOYS * lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_is_refilled_on_demand() {
    let server = quota_server(free_port().unwrap());
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet("hot_key_refilled", &upstream, server.grpc.port()).await;
    // One Envoy alone uses the key: each lease is at most a third of what
    // remains, so it can only use most of the limit if dry leases are
    // refilled at once rather than once per interval.
    let clients = [envoys[0].client()];
    let started = Instant::now();
    let statuses = burst(&clients, "/hot", "carol", 2 * HOT_LIMIT).await;
    let elapsed = started.elapsed();
    let admitted = count(&statuses, 200);
    let asked = checks(&envoys[..1], "hot").await as usize;
    eprintln!(
        "hot key: one Envoy admitted {admitted} of {HOT_LIMIT} in {elapsed:?}, \
         {asked} Check calls"
    );
    assert!(admitted <= HOT_LIMIT);
    assert!(
        admitted >= HOT_LIMIT.saturating_sub(2 * HOT_LEASE),
        "the hot key starved: {admitted}"
    );
    assert!(
        asked < admitted / 2,
        "{asked} Check calls for {admitted} admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_modes_hold_while_the_quota_server_is_down_and_syncing_resumes() {
    let port = free_port().unwrap();
    let mut server = quota_server(port);
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet("leased_failure_modes", &upstream, port).await;
    let clients: Vec<Client> = envoys.iter().map(Envoy::client).collect();
    for client in &clients {
        assert_eq!(get(*client, "/closed", &[]).await.status, 200);
    }

    // Traffic on both rules through every Envoy while the server is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for t in 0..4 {
        let (stop, seen, clients) = (Arc::clone(&stop), Arc::clone(&seen), clients.clone());
        let path = if t % 2 == 0 { "/open" } else { "/closed" };
        tasks.spawn(async move {
            for i in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let reply = get(clients[(t + i) % clients.len()], path, &[]).await;
                seen.lock().unwrap().push((path, Instant::now(), reply));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    let traffic_for = |d: Duration| async move {
        tokio::time::sleep(d).await;
    };
    traffic_for(Duration::from_millis(700)).await;
    server.kill();
    let killed_at = Instant::now();
    traffic_for(LEASE_TIME + Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    for (path, _, reply) in &seen {
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
    // Closed: leases held at the kill serve until they expire, then every
    // request is refused as unavailable.
    let closed: Vec<_> = seen.iter().filter(|(p, _, _)| *p == "/closed").collect();
    let first_refusal = closed
        .iter()
        .find(|(_, _, r)| r.status == 429)
        .map(|(_, at, _)| at.duration_since(killed_at))
        .expect("no /closed request was refused");
    let admitted_after_expiry = closed
        .iter()
        .filter(|(_, at, r)| r.status == 200 && at.duration_since(killed_at) > LEASE_TIME + MARGIN)
        .count();
    eprintln!("quota server killed: first /closed refusal {first_refusal:?} after");
    assert_eq!(admitted_after_expiry, 0, "a lease outlived its expiry");
    for client in &clients {
        let closed = get(*client, "/closed", &[]).await;
        assert_eq!(closed.status, 429, "{}", closed.text());
        assert_eq!(closed.json().unwrap()["error"], "rate_limit_unavailable");
        assert_eq!(get(*client, "/open", &[]).await.status, 200);
    }

    // Back on the same port: syncing resumes by itself, and requests are
    // admitted from leases again (far fewer Check calls than requests).
    let _server = quota_server(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    for client in &clients {
        while get(*client, "/closed", &[]).await.status != 200 {
            assert!(
                Instant::now() < deadline,
                "the quota server is not used again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let before = checks(&envoys, "closed").await;
    let statuses = burst(&clients, "/closed", "any", 600).await;
    assert_eq!(count(&statuses, 200), 600, "{statuses:?}");
    let asked = checks(&envoys, "closed").await - before;
    eprintln!("after the restart: {asked} Check calls for 600 requests");
    assert!(
        asked < 300,
        "{asked} Check calls: leases are not used again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_window_stays_within_the_limit_and_near_it_under_sustained_demand() {
    let server = quota_server(free_port().unwrap());
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet("leased_windows", &upstream, server.grpc.port()).await;
    let clients: Vec<Client> = envoys.iter().map(Envoy::client).collect();
    // Twelve clients over the three Envoys for about four seconds: far
    // more demand than the limit. Each admission is placed by the (Unix)
    // seconds its request was sent and answered in: admitted in that
    // window when both agree, in one of the two when it straddles them.
    let until = Instant::now() + Duration::from_millis(4200);
    let admitted: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let unix_second = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let mut tasks = JoinSet::new();
    for t in 0..12 {
        let (clients, admitted) = (clients.clone(), Arc::clone(&admitted));
        tasks.spawn(async move {
            for i in 0..20_000 {
                if Instant::now() >= until {
                    break;
                }
                let sent = unix_second();
                let client = clients[(t + i) % clients.len()];
                let reply = get(client, "/window", &[("x-client", "dave")]).await;
                assert!(matches!(reply.status, 200 | 429), "{}", reply.text());
                if reply.status == 200 {
                    admitted.lock().unwrap().push((sent, unix_second()));
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let admitted = std::mem::take(&mut *admitted.lock().unwrap());
    let first = admitted.iter().map(|a| a.0).min().unwrap();
    let last = admitted.iter().map(|a| a.1).max().unwrap();
    // Whole windows only: the first and last are partly outside the run.
    let per_window: Vec<(usize, usize)> = (first + 1..last)
        .map(|s| {
            let surely = admitted.iter().filter(|a| **a == (s, s)).count();
            let maybe = admitted
                .iter()
                .filter(|(sent, answered)| sent != answered && *sent <= s && s <= *answered)
                .count();
            (surely, maybe)
        })
        .collect();
    let floor = floor(WINDOW_LIMIT, WINDOW_LEASE);
    eprintln!(
        "fixed windows of {WINDOW_LIMIT}: admitted (surely, straddling) {per_window:?} per \
         whole window (documented floor {floor})"
    );
    assert!(per_window.len() >= 2, "{per_window:?}");
    for &(surely, maybe) in &per_window {
        assert!(surely <= WINDOW_LIMIT, "overshoot: {per_window:?}");
        assert!(
            surely + maybe >= floor,
            "below the documented share: {per_window:?}"
        );
    }
    // Over the whole run, never more than the windows it touched allow.
    let windows = (last - first + 1) as usize;
    // (Counted once each.)
    assert!(
        admitted.len() <= windows * WINDOW_LIMIT,
        "{} in {windows} windows",
        admitted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_sync_service_every_request_asks_the_quota_server() {
    let server = quota_server(free_port().unwrap());
    let upstream = Upstream::start().await.unwrap();
    let envoy = Envoy::builder("leased_without_service")
        .upstream(upstream.port())
        .concurrency(2)
        .quota_server(server.grpc.port())
        .sluice(&filter_config())
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
    let statuses = burst(&[envoy.client()], "/fleet", "erin", FLEET_LIMIT + 20).await;
    // No leases: exact, one Check call per request.
    assert_eq!(count(&statuses, 200), FLEET_LIMIT, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 20, "{statuses:?}");
    let expected = (FLEET_LIMIT + 20) as u64;
    let asked = envoy
        .stat_settled("wasmcustom.sluice_sync.rule.fleet.outcome.ok", expected)
        .await
        .unwrap();
    assert_eq!(asked, expected);
}
