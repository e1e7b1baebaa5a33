//! The quota server's access controls reach every Envoy's filter: a ban
//! made with `sluice ban` or the admin API refuses the client on every
//! Envoy (two workers each), on local rules' paths too, and lifting it lets
//! the client through again.
//!
//! Two ways there: on exact-mode `Check` answers without the sync service
//! (an Envoy learns them on its next synced request, its other worker on
//! its next tick), and through the sync service in leased mode, whose
//! `Sync` every 100 ms brings them to every Envoy within about 200 ms, one
//! that received no traffic included.
//!
//! Needs Envoy (`make setup`), the filter (`make wasm`) and the `sluice`
//! binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::{prometheus_value, Envoy};
use sluice_e2e::upstream::Upstream;
use sluice_e2e::{free_port, sluice_binary};
use sluice_quota_server::cli::Admin;
use sluice_quota_server::launcher::{Launcher, QuotaServer};

const TOKEN: &str = "e2e-controls-token";
/// The client the tests ban (given by X-Forwarded-For, one trusted hop).
const BANNED: &str = "192.0.2.7";
/// A client never banned: its synced requests carry the controls.
const CARRIER: &str = "192.0.2.8";
/// Ticks poll every 100 ms; the rest is room for a loaded machine.
const ONE_INTERVAL: Duration = Duration::from_millis(1_000);
/// How long a change may take to reach every worker through the sync
/// service: documented about 200 ms (the service's poll, 100 ms, then the
/// workers' tick, 100 ms); the rest is room for six workers, three sync
/// services, the quota server and the test on two cores.
const THROUGH_THE_SERVICE: Duration = Duration::from_millis(1_000);

fn quota_server(port: u16) -> QuotaServer {
    let config = format!(
        r#"listen: {{grpc: "127.0.0.1:{port}", admin: "127.0.0.1:0"}}
admin: {{token: "{TOKEN}"}}
domains:
  - name: edge
    rules:
      - {{name: fleet, limit: {{count: 1000000, per: 1h}}}}
"#
    );
    Launcher::new(sluice_binary().unwrap_or_else(|e| panic!("{e}")))
        .start_text(&config)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `local`: a local rule on `/local`; `fleet`: a rule synced in `mode`
/// (`exact` or `leased`) on `/fleet` keyed by `x-client` (so `2:k9` is the
/// key of `x-client: k9`).
fn filter_config(mode: &str) -> Value {
    json!({
        "client_ip": {"trusted_hops": 1},
        "rules": [
            {"name": "local", "match": {"path": {"prefix": "/local"}},
             "limit": {"count": 100000, "per": "1m"}},
            {"name": "fleet", "match": {"path": {"prefix": "/fleet"}}, "key": ["header:x-client"],
             "sync": {"mode": mode, "domain": "edge", "timeout": "1s", "failure_mode": "closed"}},
        ]
    })
}

/// `N` Envoys of two workers for `test`, their rule synced in exact mode
/// without the sync service, or in leased mode with it.
async fn fleet<const N: usize>(
    test: &str,
    upstream: &Upstream,
    port: u16,
    leased: bool,
) -> [Envoy; N] {
    let config = filter_config(if leased { "leased" } else { "exact" });
    let starts = (0..N).map(|i| {
        Envoy::builder(test)
            .instance(&format!("envoy{i}"))
            .upstream(upstream.port())
            .concurrency(2)
            .quota_server(port)
            .sluice(&config)
            .sync_service(leased)
            .start()
    });
    let envoys = futures_util::future::try_join_all(starts)
        .await
        .unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
    envoys.try_into().unwrap_or_else(|_| unreachable!())
}

async fn get(client: Client, path: &str, from: &str, key: &str) -> Reply {
    client
        .get_with(path, &[("x-forwarded-for", from), ("x-client", key)])
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
}

/// A synced request from the carrier on each Envoy: its answer brings the
/// controls in force to the worker that asked.
async fn carry(clients: [Client; 2]) {
    for client in clients {
        let reply = get(client, "/fleet/x", CARRIER, "c").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

/// A request's check, boxed so that tests can pass closures.
type Probe = dyn Fn(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Polls until `probe` holds for eight requests (fresh connections, so
/// both workers) on each Envoy, within `ONE_INTERVAL` of `since`.
async fn within_one_interval(what: &str, since: Instant, clients: [Client; 2], probe: &Probe) {
    within(what, since, ONE_INTERVAL, &clients, probe).await;
}

/// Polls each of `clients` in turn until `probe` holds for eight requests
/// in a row (fresh connections, so both workers), within `bound` of
/// `since`; returns when each one first did.
async fn within(
    what: &str,
    since: Instant,
    bound: Duration,
    clients: &[Client],
    probe: &Probe,
) -> Vec<Duration> {
    let mut took = Vec::new();
    for (i, &client) in clients.iter().enumerate() {
        let mut in_a_row = 0;
        while in_a_row < 8 {
            assert!(
                since.elapsed() < bound,
                "Envoy {i}: not within {bound:?}: {what}"
            );
            if probe(client).await {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        took.push(since.elapsed());
    }
    took
}

fn sluice(args: &[&str], admin: &str) {
    let out = Command::new(sluice_binary().unwrap())
        .args(args)
        .args(["--admin", admin, "--token", TOKEN])
        .env_remove("SLUICE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice {args:?}: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_a_ban_reaches_every_envoy_on_check_answers_and_lifting_it_too() {
    let server = quota_server(free_port().unwrap());
    let admin_url = format!("http://{}", server.admin.expect("the admin API"));
    let admin = Admin {
        base: admin_url.clone(),
        token: Some(TOKEN.into()),
    };
    let upstream = Upstream::start().await.unwrap();
    let envoys: [Envoy; 2] = fleet("access_controls", &upstream, server.grpc.port(), false).await;
    let clients = [envoys[0].client(), envoys[1].client()];
    carry(clients).await;
    for client in clients {
        assert_eq!(get(client, "/local", BANNED, "k").await.status, 200);
    }

    sluice(
        &["ban", "--cidr", BANNED, "--ttl", "10m", "--reason", "e2e"],
        &admin_url,
    );
    let body = json!({"key": "2:k9", "ttl": "10m", "reason": "e2e"});
    admin
        .call(Method::POST, "/bans", Some(&body))
        .await
        .unwrap();
    carry(clients).await;
    let since = Instant::now();
    within_one_interval("the banned client is refused", since, clients, &|c| {
        Box::pin(async move { get(c, "/local", BANNED, "k").await.status == 403 })
    })
    .await;
    within_one_interval("the banned key is refused", since, clients, &|c| {
        Box::pin(async move { get(c, "/fleet/x", CARRIER, "k9").await.status == 403 })
    })
    .await;

    for client in clients {
        let refused = get(client, "/local", BANNED, "k").await;
        assert_eq!(refused.json().unwrap(), json!({"error": "access_denied"}));
        // Others pass, on local and synced rules.
        assert_eq!(get(client, "/local", CARRIER, "k").await.status, 200);
        assert_eq!(get(client, "/fleet/x", CARRIER, "k8").await.status, 200);
    }
    for envoy in &envoys {
        let per_worker = envoy.worker_connections().await.unwrap();
        assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
        let denied = envoy
            .stat_when("wasmcustom.sluice_access.outcome.denied", ">= 17", |n| {
                n >= 17
            })
            .await
            .unwrap();
        assert!(denied >= 17, "every probe and refusal counted: {denied}");
    }
    let text = envoys[0].prometheus().await.unwrap();
    let labelled = prometheus_value(&text, "sluice_access", &[("outcome", "denied")]);
    assert!(labelled.is_some_and(|v| v >= 17.0), "{labelled:?}");

    admin
        .call(Method::DELETE, &format!("/bans?cidr={BANNED}"), None)
        .await
        .unwrap();
    carry(clients).await;
    within_one_interval(
        "the lifted ban lets the client through",
        Instant::now(),
        clients,
        &|c| Box::pin(async move { get(c, "/local", BANNED, "k").await.status == 200 }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_a_ban_reaches_every_envoy_through_the_sync_service_idle_ones_too() {
    let server = quota_server(free_port().unwrap());
    let admin_url = format!("http://{}", server.admin.expect("the admin API"));
    let admin = Admin {
        base: admin_url.clone(),
        token: Some(TOKEN.into()),
    };
    let upstream = Upstream::start().await.unwrap();
    let envoys: [Envoy; 3] = fleet(
        "access_controls_leased",
        &upstream,
        server.grpc.port(),
        true,
    )
    .await;
    let clients = envoys.each_ref().map(Envoy::client);
    // Envoys 0 and 1 serve the client and the key; Envoy 2 gets no request
    // before the ban: only its sync service's polls can bring it.
    for &client in &clients[..2] {
        assert_eq!(get(client, "/local", BANNED, "k").await.status, 200);
        assert_eq!(get(client, "/fleet/x", CARRIER, "k9").await.status, 200);
    }
    let idle_first = [clients[2], clients[0], clients[1]];

    // A network ban with `sluice ban`, seen on `/local` (a local rule: no
    // quota server call there that could carry it).
    sluice(
        &["ban", "--cidr", BANNED, "--ttl", "10m", "--reason", "e2e"],
        &admin_url,
    );
    let took = within(
        "the banned client is refused",
        Instant::now(),
        THROUGH_THE_SERVICE,
        &idle_first,
        &|c| Box::pin(async move { get(c, "/local", BANNED, "k").await.status == 403 }),
    )
    .await;
    eprintln!("`sluice ban --cidr`: in force on Envoys 2, 0, 1 after {took:?}");

    // A key ban through the admin API, seen on the synced rule.
    let body = json!({"key": "2:k9", "ttl": "10m", "reason": "e2e"});
    admin
        .call(Method::POST, "/bans", Some(&body))
        .await
        .unwrap();
    let took = within(
        "the banned key is refused",
        Instant::now(),
        THROUGH_THE_SERVICE,
        &clients,
        &|c| Box::pin(async move { get(c, "/fleet/x", CARRIER, "k9").await.status == 403 }),
    )
    .await;
    eprintln!("admin API key ban: in force on Envoys 0, 1, 2 after {took:?}");
    for client in clients {
        let refused = get(client, "/fleet/x", CARRIER, "k9").await;
        assert_eq!(refused.json().unwrap(), json!({"error": "access_denied"}));
        // Others pass, on local and synced rules.
        assert_eq!(get(client, "/local", CARRIER, "k").await.status, 200);
        assert_eq!(get(client, "/fleet/x", CARRIER, "k8").await.status, 200);
    }
    let denied = envoys[2]
        .stat_when("wasmcustom.sluice_access.outcome.denied", ">= 16", |n| {
            n >= 16
        })
        .await
        .unwrap();
    assert!(
        denied >= 16,
        "the idle Envoy counted its refusals: {denied}"
    );

    // Lifted (one with `sluice unban`, one through the admin API): every
    // Envoy lets them through again, though all their traffic was refused
    // meanwhile and so asked the quota server nothing.
    sluice(&["unban", "--cidr", BANNED, "--reason", "e2e"], &admin_url);
    admin
        .call(Method::DELETE, "/bans?key=2:k9", None)
        .await
        .unwrap();
    let took = within(
        "the lifted bans let them through",
        Instant::now(),
        THROUGH_THE_SERVICE,
        &clients,
        &|c| {
            Box::pin(async move {
                get(c, "/local", BANNED, "k").await.status == 200
                    && get(c, "/fleet/x", CARRIER, "k9").await.status == 200
            })
        },
    )
    .await;
    eprintln!("bans lifted: on Envoys 0, 1, 2 after {took:?}");
}
