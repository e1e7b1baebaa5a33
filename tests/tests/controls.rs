//! The quota server's access controls reach every Envoy's filter: a ban
//! made with `sluice ban` or the admin API refuses the client on two
//! Envoys (two workers each), on local rules' paths too, within one poll
//! interval of the quota server's answer that carried it; lifting it lets
//! the client through again.
//!
//! The controls travel on exact-mode `Check` answers here (an Envoy learns
//! them on its next synced request, and its other worker on its next
//! tick); the sync service will carry them the same way on `Sync` answers.
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

/// `local`: a local rule on `/local`; `fleet`: a synced rule on `/fleet`
/// keyed by `x-client` (so `2:k9` is the key of `x-client: k9`).
fn filter_config() -> Value {
    json!({
        "client_ip": {"trusted_hops": 1},
        "rules": [
            {"name": "local", "match": {"path": {"prefix": "/local"}},
             "limit": {"count": 100000, "per": "1m"}},
            {"name": "fleet", "match": {"path": {"prefix": "/fleet"}}, "key": ["header:x-client"],
             "sync": {"mode": "exact", "domain": "edge", "timeout": "1s", "failure_mode": "closed"}},
        ]
    })
}

async fn fleet(upstream: &Upstream, port: u16) -> [Envoy; 2] {
    let start = |instance: &'static str| {
        Envoy::builder("access_controls")
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

/// Polls until `probe` holds for eight requests (fresh connections, so
/// both workers) on each Envoy, within `ONE_INTERVAL` of `since`.
async fn within_one_interval(
    what: &str,
    since: Instant,
    clients: [Client; 2],
    probe: impl Fn(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) {
    'poll: loop {
        assert!(
            since.elapsed() < ONE_INTERVAL,
            "not within {ONE_INTERVAL:?}: {what}"
        );
        for client in clients {
            for _ in 0..8 {
                if !probe(client).await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue 'poll;
                }
            }
        }
        return;
    }
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
async fn a_ban_reaches_every_envoy_within_one_interval_and_lifting_it_too() {
    let server = quota_server(free_port().unwrap());
    let admin_url = format!("http://{}", server.admin.expect("the admin API"));
    let admin = Admin {
        base: admin_url.clone(),
        token: Some(TOKEN.into()),
    };
    let upstream = Upstream::start().await.unwrap();
    let envoys = fleet(&upstream, server.grpc.port()).await;
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
    within_one_interval("the banned client is refused", since, clients, |c| {
        Box::pin(async move { get(c, "/local", BANNED, "k").await.status == 403 })
    })
    .await;
    within_one_interval("the banned key is refused", since, clients, |c| {
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
            .stat("wasmcustom.sluice_access.outcome.denied")
            .await
            .unwrap()
            .unwrap_or(0);
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
        |c| Box::pin(async move { get(c, "/local", BANNED, "k").await.status == 200 }),
    )
    .await;
}
